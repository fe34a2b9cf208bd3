//! `cargo xtask demo`: set up, build, run wsedge in the foreground with `deploy/demo.toml`;
//! wsedge starts the Rust echo function itself on the first connection.

use std::{
    os::unix::process::CommandExt,
    process::{Child, Command},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{self, SigSet, Signal},
    unistd::Pid,
};

use crate::{cmd, setup};

const CONFIG: &str = "deploy/demo.toml";
const URL: &str = "ws://127.0.0.1:8080/echo";
const TLS_URL: &str = "wss://localhost:8443/echo";
/// Where the demo's certificate goes (`deploy/demo.toml` names these files).
const TLS_DIR: &str = "target/wsedge-demo-tls";
const ADMIN_URL: &str = "http://127.0.0.1:9901/connections";
const INSTANCES_URL: &str = "http://127.0.0.1:9901/instances";

pub fn run() -> Result<()> {
    setup::run()?;
    cmd::run(cmd::cargo().args([
        "build",
        "--release",
        "-p",
        "proxy",
        "-p",
        "echo-fn",
        "-p",
        "bench",
    ]))?;
    if !cmd::root().join(CONFIG).is_file() {
        bail!("{CONFIG} is missing");
    }
    let release = cmd::root().join("target/release");
    let tls_dir = cmd::root().join(TLS_DIR);
    if !tls_dir.join("cert.pem").is_file() {
        println!(
            "xtask: writing a demo CA and a localhost certificate for wss:// to {}",
            tls_dir.display()
        );
        cmd::run(
            Command::new(release.join("bench"))
                .arg("cert")
                .arg("--dir")
                .arg(&tls_dir),
        )?;
    }
    let ca = tls_dir.join("ca.pem");

    // Both children get their own process group, so a Ctrl-C in the terminal reaches only us
    // and wsedge gets exactly one signal: the one we forward. Block the signals before any
    // thread exists, so the forwarding thread below is the only one that receives them
    // (children inherit the mask: `spawn` unblocks them again in the child).
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().context("blocking SIGINT/SIGTERM")?;

    let echo = release.join("echo-fn");
    println!(
        "xtask: wsedge starts {} on the first connection (a cold start), in its own network \
         namespace on port 9000 when run as root",
        echo.display()
    );
    println!();
    println!("  connect to:  {URL}");
    println!("  try:         websocat {URL}");
    println!(
        "          or: python3 -c 'from websockets.sync.client import connect; \
         c = connect(\"{URL}\"); c.send(\"hello\"); print(c.recv())'"
    );
    println!(
        "  wss://:      python3 -c 'import ssl; from websockets.sync.client import connect; \
         c = connect(\"{TLS_URL}\", ssl=ssl.create_default_context(cafile=\"{}\")); \
         c.send(\"hello\"); print(c.recv())'",
        ca.display()
    );
    println!("  connections: curl {ADMIN_URL}");
    println!("  instances:   curl {INSTANCES_URL}");
    println!(
        "  watch:       {} top -c {CONFIG}   |   {} trace -c {CONFIG}",
        release.join("wsedge").display(),
        release.join("wsedge").display()
    );
    println!("  stop:        Ctrl-C");
    println!();

    run_wsedge(&release, signals)
}

/// Runs wsedge until it exits, forwarding SIGINT/SIGTERM to it.
fn run_wsedge(release: &std::path::Path, signals: SigSet) -> Result<()> {
    let mut wsedge = spawn(
        cmd::new(release.join("wsedge")).args(["run", "-c", CONFIG]),
        "wsedge",
        signals,
    )?;
    let pid = Pid::from_raw(wsedge.id() as i32);
    let stopping = Arc::new(AtomicBool::new(false));
    let forwarded = Arc::clone(&stopping);
    // Lives until the process exits; it never returns on its own.
    thread::spawn(move || {
        while let Ok(sig) = signals.wait() {
            println!("\nxtask: {sig}, stopping wsedge");
            forwarded.store(true, Ordering::SeqCst);
            let _ = signal::kill(pid, sig);
        }
    });
    let status = wsedge.wait().context("waiting for wsedge")?;
    if !status.success() && !stopping.load(Ordering::SeqCst) {
        bail!("wsedge exited: {status}");
    }
    println!("xtask: wsedge stopped ({status}); it stopped its function instances");
    Ok(())
}

/// Starts a child in its own process group, with `blocked` unblocked again.
fn spawn(cmd: &mut Command, name: &str, blocked: SigSet) -> Result<Child> {
    let line = cmd::display(cmd);
    println!("xtask: starting `{line}`");
    cmd.process_group(0);
    // SAFETY: pthread_sigmask is async-signal-safe and the closure allocates nothing, so it
    // may run between fork and exec.
    unsafe {
        cmd.pre_exec(move || blocked.thread_unblock().map_err(std::io::Error::from));
    }
    cmd.spawn()
        .with_context(|| format!("could not start {name} (`{line}`)"))
}
