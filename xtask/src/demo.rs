//! `cargo xtask demo`: set up, build, start the demo echo function and wsedge in the foreground.

use std::{
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    process::{Child, Command},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{self, SigSet, Signal},
    unistd::Pid,
};

use crate::{cmd, setup};

const CONFIG: &str = "deploy/demo.toml";
const ECHO_PORT: u16 = 9000;
const URL: &str = "ws://127.0.0.1:8080/echo";
const ADMIN_URL: &str = "http://127.0.0.1:9901/connections";

pub fn run() -> Result<()> {
    setup::run()?;
    cmd::run(cmd::cargo().args(["build", "--release", "-p", "proxy", "-p", "echo-fn"]))?;
    if !cmd::root().join(CONFIG).is_file() {
        bail!("{CONFIG} is missing");
    }
    let release = cmd::root().join("target/release");

    // Both children get their own process group, so a Ctrl-C in the terminal reaches only us
    // and wsedge gets exactly one signal: the one we forward. Block the signals before any
    // thread exists, so the forwarding thread below is the only one that receives them
    // (children inherit the mask: `spawn` unblocks them again in the child).
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().context("blocking SIGINT/SIGTERM")?;

    let echo_addr = SocketAddr::from(([127, 0, 0, 1], ECHO_PORT));
    if TcpStream::connect_timeout(&echo_addr, Duration::from_millis(200)).is_ok() {
        bail!("port {ECHO_PORT} is already in use: stop what listens there first");
    }
    let mut echo = spawn(
        cmd::new(release.join("echo-fn")).env("PORT", ECHO_PORT.to_string()),
        "echo-fn",
        signals,
    )?;
    if let Err(err) = wait_listening(&mut echo, echo_addr) {
        let _ = echo.kill();
        let _ = echo.wait();
        return Err(err);
    }
    println!("xtask: echo function listening on 0.0.0.0:{ECHO_PORT}");
    println!();
    println!("  connect to:  {URL}");
    println!("  try:         websocat {URL}");
    println!(
        "          or: python3 -c 'from websockets.sync.client import connect; \
         c = connect(\"{URL}\"); c.send(\"hello\"); print(c.recv())'"
    );
    println!("  connections: curl {ADMIN_URL}");
    println!("  stop:        Ctrl-C");
    println!();

    let result = run_wsedge(&release, signals);
    let _ = echo.kill();
    let _ = echo.wait();
    result
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
    println!("xtask: wsedge stopped ({status}), stopping the echo function");
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

/// Waits until the echo function accepts connections (10 s at most).
fn wait_listening(echo: &mut Child, addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = echo.try_wait()? {
            bail!("echo-fn exited before listening on port {ECHO_PORT}: {status}");
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("echo-fn did not listen on port {ECHO_PORT} within 10 s");
        }
        thread::sleep(Duration::from_millis(100));
    }
}
