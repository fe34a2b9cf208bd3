//! `cargo xtask test`: set up, install the test peers, build every target, run every test.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::{cmd, setup};

/// The eBPF crate only builds for bpfel-unknown-none (proxy/build.rs builds it), so the host
/// build and test of the whole workspace leave it out.
const HOST_EXCLUDE: [&str; 2] = ["--exclude", "proxy-ebpf"];

pub fn run(harness_args: &[String]) -> Result<()> {
    setup::run()?;
    let node_modules = install_test_peers()?;
    cmd::run(
        cmd::cargo()
            .args(["build", "--workspace", "--all-targets"])
            .args(HOST_EXCLUDE),
    )?;
    let mut test = cmd::cargo();
    test.args(["test", "--workspace"]).args(HOST_EXCLUDE);
    if !harness_args.is_empty() {
        test.arg("--").args(harness_args);
    }
    if let Some(dir) = node_modules {
        // Node test peers `require("ws")` from here.
        test.env("NODE_PATH", dir);
    }
    run_and_tally(&mut test)
}

/// Runs `cargo test`, echoing its output, and ends with one plain `N passed, N failed` line
/// summed over every test binary (cargo's own last line is often an empty doc-test run).
fn run_and_tally(test: &mut std::process::Command) -> Result<()> {
    use std::io::{BufRead, BufReader};
    println!("xtask: running `{}`", cmd::display(test));
    let mut child = test
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(summary) = line.strip_prefix("test result: ") {
            passed += count_before(summary, " passed");
            failed += count_before(summary, " failed");
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!("xtask: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("`cargo test` failed ({status})");
    }
    if passed == 0 {
        bail!("`cargo test` ran no test");
    }
    Ok(())
}

/// The number just before `label` in a libtest summary ("ok. 14 passed; 0 failed; ...").
fn count_before(summary: &str, label: &str) -> u64 {
    summary
        .split(';')
        .find_map(|part| {
            part.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .strip_suffix(label)
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Where `npm install ws` puts the Node peer (tests use `NODE_PATH=<this>/node_modules`).
pub fn node_peers_dir() -> PathBuf {
    cmd::root().join("target/node-peers")
}

/// Installs the real WebSocket peers the tests talk to, for each interpreter that exists:
/// Python `websockets` (pip) and Node `ws` (npm, into [`node_peers_dir`]).
/// Returns the node_modules directory when the Node peer is there.
pub fn install_test_peers() -> Result<Option<PathBuf>> {
    python_websockets()?;
    node_ws()
}

fn python_websockets() -> Result<()> {
    cmd::checking("Python websockets");
    if !cmd::exists("python3") {
        println!("skipped (no python3)");
        return Ok(());
    }
    if cmd::output(cmd::new("python3").args(["-c", "import websockets"])).is_some() {
        println!("ok");
        return Ok(());
    }
    println!("missing, installing");
    let pip = |extra: &[&str]| {
        cmd::run(
            cmd::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .args(extra)
                .arg("websockets")
                .env("PIP_ROOT_USER_ACTION", "ignore"),
        )
    };
    if let Err(err) = pip(&[]) {
        // Debian's own python3 refuses pip installs (PEP 668) unless told otherwise.
        if !is_externally_managed() {
            return Err(err).context("installing Python websockets with pip");
        }
        println!("xtask: python3 is externally managed; retrying with --break-system-packages");
        pip(&["--break-system-packages"]).context("installing Python websockets with pip")?;
    }
    if cmd::output(cmd::new("python3").args(["-c", "import websockets"])).is_none() {
        bail!("pip installed websockets but `python3 -c 'import websockets'` still fails");
    }
    Ok(())
}

/// Whether python3 carries the PEP 668 EXTERNALLY-MANAGED marker.
fn is_externally_managed() -> bool {
    let script = "import sysconfig, os; \
                  print(os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))";
    cmd::output(cmd::new("python3").args(["-c", script])).is_some_and(|out| out.trim() == "True")
}

fn node_ws() -> Result<Option<PathBuf>> {
    let dir = node_peers_dir();
    let node_modules = dir.join("node_modules");
    cmd::checking(&format!("Node ws ({})", node_modules.display()));
    if !cmd::exists("node") || !cmd::exists("npm") {
        println!("skipped (no node or npm)");
        return Ok(None);
    }
    if node_modules.join("ws/package.json").is_file() {
        println!("ok");
        return Ok(Some(node_modules));
    }
    println!("missing, installing");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    cmd::run(
        cmd::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                "--prefix",
            ])
            .arg(&dir)
            .arg("ws"),
    )
    .context("installing Node ws with npm")?;
    if !node_modules.join("ws/package.json").is_file() {
        bail!("npm finished but {} has no ws", node_modules.display());
    }
    Ok(Some(node_modules))
}
