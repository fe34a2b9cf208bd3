//! `cargo xtask test`: set up, install the test peers, build every target, run every test.
//!
//! The test executables are built once (`cargo test --no-run --message-format=json` names
//! them) and then run one by one, each in its own process group with a time limit, so that
//! every binary runs even after another failed, a binary that crashed or hung counts as
//! failed, and the closing tally sums what every binary reported.

use std::{
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{cmd, setup, vm};

/// The eBPF crate only builds for bpfel-unknown-none (proxy/build.rs builds it), so the host
/// build and test of the whole workspace leave it out.
const HOST_EXCLUDE: [&str; 2] = ["--exclude", "proxy-ebpf"];

/// How long one test binary may run before it is killed and counted as failed
/// (`XTASK_TEST_TIMEOUT_S` overrides it).
const DEFAULT_BINARY_TIMEOUT: Duration = Duration::from_secs(600);

/// After a test binary exits, how long its output may still take to reach end of file (a
/// process it left behind can hold the pipe open).
const OUTPUT_GRACE: Duration = Duration::from_secs(5);

pub fn run(harness_args: &[String]) -> Result<()> {
    setup::run()?;
    setup::test_tools()?;
    let node_modules = install_test_peers()?;
    cmd::run(
        cmd::cargo()
            .args(["build", "--workspace", "--all-targets"])
            .args(HOST_EXCLUDE),
    )?;
    let binaries = test_binaries()?;
    let timeout = binary_timeout()?;
    let mut tally = Tally::default();
    for binary in &binaries {
        let mut command = Command::new(&binary.executable);
        command
            .args(harness_args)
            .current_dir(&binary.package_dir)
            // What `cargo test` sets for a test binary at run time.
            .env("CARGO_MANIFEST_DIR", &binary.package_dir)
            .env(
                "CARGO",
                std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()),
            );
        // Node test peers `require("ws")` from here.
        command.env("NODE_PATH", &node_modules);
        tally.add(&binary.name, run_one(&binary.name, command, timeout)?);
    }
    // Doc-tests are not test executables: rustdoc builds and runs them.
    let mut doc = cmd::cargo();
    doc.args(["test", "--workspace", "--doc"])
        .args(HOST_EXCLUDE);
    if !harness_args.is_empty() {
        doc.arg("--").args(harness_args);
    }
    doc.env("NODE_PATH", &node_modules);
    tally.add("doc-tests", run_one("doc-tests", doc, timeout)?);
    tally.finish(&format!(
        "{} test binaries and the doc-tests",
        binaries.len()
    ))
}

/// The test binaries `cargo xtask test --kernel` runs in the guest: the ones that exercise the
/// kernel data plane, and TLS (kernel TLS where the guest's kernel has it), by target name.
const KERNEL_TESTS: [&str; 10] = [
    "data_plane",
    "zero_hop",
    "engine",
    "slow_readers",
    "timers",
    "tls",
    "quotas",
    "sandbox",
    "trace",
    "metrics",
];

/// A test binary's time limit in the guest: TCG runs everything many times slower
/// (`XTASK_TEST_TIMEOUT_S` overrides it too).
const VM_BINARY_TIMEOUT: Duration = Duration::from_secs(1800);

/// `cargo xtask test --kernel NAME`: builds here, then runs [`KERNEL_TESTS`] in a guest booted
/// with that kernel (see `vm`), and tallies what the guest reported.
pub fn run_on_kernel(harness_args: &[String], kernel: &str, package: Option<&str>) -> Result<()> {
    let started = Instant::now();
    setup::run()?;
    let node_modules = install_test_peers()?;
    vm::tools()?;
    let kernel = vm::prepare_kernel(kernel, package)?;
    println!("xtask: kernel {} ({})", kernel.release, kernel.package);
    cmd::run(
        cmd::cargo()
            .args(["build", "--workspace", "--all-targets"])
            .args(HOST_EXCLUDE),
    )?;
    let binaries = test_binaries()?;
    let timeout = match std::env::var("XTASK_TEST_TIMEOUT_S") {
        Ok(_) => binary_timeout()?,
        Err(_) => VM_BINARY_TIMEOUT,
    };
    let mut env = vm::host_env();
    env.insert(
        "CARGO".into(),
        std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()),
    );
    env.insert(
        "NODE_PATH".into(),
        node_modules.to_string_lossy().into_owned(),
    );
    // One test at a time unless told otherwise: the guest's two emulated CPUs run each
    // test's proxy, instances and clients, and with two tests at once the Python instances'
    // cold starts ran past the tests' 5-10 s deadlines (each of those tests passed alone).
    let harness_args = if harness_args.is_empty() {
        vec!["--test-threads=1".to_owned()]
    } else {
        harness_args.to_vec()
    };
    let mut commands = Vec::new();
    let mut missing = Vec::new();
    for target in KERNEL_TESTS {
        let Some(binary) = binaries
            .iter()
            .find(|b| b.target == target && b.name.ends_with("(test)"))
        else {
            missing.push(target);
            continue;
        };
        let mut env = env.clone();
        env.insert(
            "CARGO_MANIFEST_DIR".into(),
            binary.package_dir.to_string_lossy().into_owned(),
        );
        let mut args = harness_args.clone();
        if target == "tls" {
            // Its tests print the TLS path they ran on (kernel TLS or rustls): show it.
            args.push("--show-output".into());
        }
        commands.push(vm::GuestCommand {
            name: binary.name.clone(),
            program: binary.executable.clone(),
            args,
            cwd: binary.package_dir.clone(),
            env,
            timeout,
            libtest: true,
        });
    }
    let reports = vm::run(&kernel, &commands)?;
    let mut tally = Tally::default();
    println!();
    for target in &missing {
        let outcome = Outcome {
            broken: Some("no such test binary was built".into()),
            ..Outcome::default()
        };
        println!("xtask: {target}: FAILED: no such test binary was built");
        tally.add(target, outcome);
    }
    for command in &commands {
        let outcome = match reports.get(&command.name) {
            Some(report) => Outcome::from_report(report),
            None => Outcome {
                broken: Some("the VM never reported a result".into()),
                ..Outcome::default()
            },
        };
        let took = reports
            .get(&command.name)
            .and_then(|r| r["seconds"].as_f64())
            .map(|s| format!(" in {s:.0}s"))
            .unwrap_or_default();
        match &outcome.broken {
            Some(why) => println!("xtask: {}: FAILED{took}: {why}", command.name),
            None => println!(
                "xtask: {}: ok{took} ({} passed, {} ignored)",
                command.name, outcome.passed, outcome.ignored
            ),
        }
        tally.add(&command.name, outcome);
    }
    println!(
        "xtask: kernel {}: the whole run took {:.0}s",
        kernel.release,
        started.elapsed().as_secs_f64()
    );
    tally.finish(&format!(
        "{} test binaries on kernel {}",
        KERNEL_TESTS.len(),
        kernel.release
    ))
}

/// One test executable, as cargo reported it.
struct TestBinary {
    /// `<package>::<target>` with the kind, e.g. `proxy::zero_hop (test)`.
    name: String,
    /// The target's name, e.g. `zero_hop`.
    target: String,
    executable: PathBuf,
    package_dir: PathBuf,
}

/// Builds every test target and returns the executables, in cargo's order.
fn test_binaries() -> Result<Vec<TestBinary>> {
    let mut build = cmd::cargo();
    build
        .args([
            "test",
            "--workspace",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .args(HOST_EXCLUDE);
    println!("xtask: running `{}`", cmd::display(&build));
    let out = build
        .stderr(Stdio::inherit())
        .output()
        .context("starting cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the tests failed ({})", out.status);
    }
    let binaries = parse_test_binaries(&String::from_utf8_lossy(&out.stdout));
    if binaries.is_empty() {
        bail!("`cargo test --no-run` reported no test executable");
    }
    Ok(binaries)
}

/// The test executables among cargo's JSON messages (`compiler-artifact` with
/// `profile.test` and an `executable`).
fn parse_test_binaries(json_lines: &str) -> Vec<TestBinary> {
    json_lines
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["profile"]["test"] == true)
        .filter_map(|m| {
            let executable = PathBuf::from(m["executable"].as_str()?);
            let package_dir = Path::new(m["manifest_path"].as_str()?).parent()?.to_owned();
            let package = package_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let kind = m["target"]["kind"][0].as_str().unwrap_or("test");
            let target = m["target"]["name"].as_str().unwrap_or("?");
            Some(TestBinary {
                name: format!("{package}::{target} ({kind})"),
                target: target.to_owned(),
                executable,
                package_dir,
            })
        })
        .collect()
}

fn binary_timeout() -> Result<Duration> {
    match std::env::var("XTASK_TEST_TIMEOUT_S") {
        Ok(s) => Ok(Duration::from_secs(s.parse().with_context(|| {
            format!("XTASK_TEST_TIMEOUT_S={s:?} is not a number of seconds")
        })?)),
        Err(_) => Ok(DEFAULT_BINARY_TIMEOUT),
    }
}

/// What one test binary (or the doc-test run) did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    /// `test result:` lines seen (the doc-test run prints one per crate).
    pub summaries: u64,
    /// Tests libtest reported as FAILED, by name.
    pub failed_tests: Vec<String>,
    /// Why the binary itself counts as failed (exit status, no summary, timeout), if it does.
    pub broken: Option<String>,
}

impl Outcome {
    /// An outcome as the guest reported it (`vm::guest`).
    fn from_report(r: &serde_json::Value) -> Outcome {
        let n = |k: &str| r[k].as_u64().unwrap_or(0);
        Outcome {
            passed: n("passed"),
            failed: n("failed"),
            ignored: n("ignored"),
            summaries: n("summaries"),
            failed_tests: r["failed_tests"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect(),
            broken: r["broken"].as_str().map(str::to_owned),
        }
    }

    /// Reads one line of libtest output.
    fn line(&mut self, line: &str) {
        if let Some(summary) = line.strip_prefix("test result: ") {
            self.summaries += 1;
            self.passed += count_before(summary, " passed");
            self.failed += count_before(summary, " failed");
            self.ignored += count_before(summary, " ignored");
        } else if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.strip_suffix(" ... FAILED"))
        {
            self.failed_tests.push(name.to_string());
        }
    }

    /// Judges the run once the process is gone (`None`: it was killed at its time limit).
    fn finish(&mut self, status: Option<ExitStatus>, timeout: Duration) {
        self.broken = match status {
            None => Some(format!("killed after {}s (time limit)", timeout.as_secs())),
            Some(s) if !s.success() => Some(format!("exited with {s}")),
            Some(_) if self.summaries == 0 => Some("printed no `test result:` line".into()),
            Some(_) if self.failed > 0 => Some("reported failures but exited 0".into()),
            Some(_) => None,
        };
    }
}

/// Runs `command` (stdout echoed and read for libtest lines, stderr passed through) in its own
/// process group; after `timeout` the whole group is killed.
pub fn run_one(name: &str, mut command: Command, timeout: Duration) -> Result<Outcome> {
    println!("xtask: running {name}: `{}`", cmd::display(&command));
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let (tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut outcome = Outcome::default();
    let deadline = Instant::now() + timeout;
    let mut exited: Option<(ExitStatus, Instant)> = None;
    let mut reading = true;
    let status = loop {
        if reading {
            match lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    println!("{line}");
                    outcome.line(&line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                // End of output: the binary and everything it started closed stdout.
                Err(mpsc::RecvTimeoutError::Disconnected) => reading = false,
            }
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
        if exited.is_none()
            && let Some(s) = child.try_wait().context("waiting for a test binary")?
        {
            exited = Some((s, Instant::now()));
        }
        match exited {
            // Done, or something it left behind holds stdout open: stop reading.
            Some((s, at)) if !reading || at.elapsed() > OUTPUT_GRACE => break Some(s),
            Some(_) => {}
            None if Instant::now() >= deadline => {
                kill_group(&child);
                let _ = child.wait();
                break None;
            }
            None => {}
        }
    };
    for line in lines.try_iter() {
        println!("{line}");
        outcome.line(&line);
    }
    // A binary that exited leaves no process group behind either.
    kill_group(&child);
    outcome.finish(status, timeout);
    match &outcome.broken {
        Some(why) => println!("xtask: {name}: FAILED: {why}"),
        None => println!("xtask: {name}: ok"),
    }
    Ok(outcome)
}

/// SIGKILL to the process group the child leads (it and what it started).
fn kill_group(child: &std::process::Child) {
    use nix::{sys::signal, unistd::Pid};
    let _ = signal::killpg(Pid::from_raw(child.id() as i32), signal::Signal::SIGKILL);
}

/// The sums over every binary, and what failed.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
    failures: Vec<String>,
}

impl Tally {
    fn add(&mut self, name: &str, outcome: Outcome) {
        self.passed += outcome.passed;
        self.ignored += outcome.ignored;
        self.failed += outcome.failed;
        for test in &outcome.failed_tests {
            self.failures.push(format!("{name}: {test}"));
        }
        if let Some(why) = outcome.broken {
            // A binary that died without reporting a failed test is one failure itself.
            if outcome.failed == 0 {
                self.failed += 1;
            }
            self.failures.push(format!("{name}: {why}"));
        }
    }

    /// Prints the closing tally and the failures; an error if anything failed or nothing ran.
    /// `ran` says what ran, e.g. "12 test binaries and the doc-tests".
    fn finish(&self, ran: &str) -> Result<()> {
        println!();
        println!("xtask: {ran} ran");
        if !self.failures.is_empty() {
            println!("xtask: failed:");
            for failure in &self.failures {
                println!("  {failure}");
            }
        }
        println!(
            "xtask: {} passed, {} failed, {} ignored",
            self.passed, self.failed, self.ignored
        );
        if self.failed > 0 {
            bail!("{} failed", self.failed);
        }
        if self.passed == 0 {
            bail!("no test ran");
        }
        Ok(())
    }
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

/// Installs the real WebSocket peers the tests talk to: Python `websockets` (pip) and Node
/// `ws` (npm, into [`node_peers_dir`]), and Node.js itself (Debian's `nodejs` and `npm`) when
/// it is missing. Fails when a peer cannot be installed: the tests that use it would fail.
/// Returns the node_modules directory holding `ws`.
pub fn install_test_peers() -> Result<PathBuf> {
    python_websockets()?;
    python_peers_for_instances()?;
    node_ws()
}

/// Where the Python functions tests spawn find `websockets`: instances run as an
/// unprivileged user with a clean environment, so a package under root's home (where a
/// per-user Python keeps it) is out of their reach. Tests give them `PYTHONPATH=<this>`.
pub fn python_peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/python-peers")
}

fn python_peers_for_instances() -> Result<()> {
    cmd::checking("Python websockets for sandboxed instances (target/python-peers)");
    let dir = python_peers_dir();
    if dir.join("websockets").is_dir() {
        println!("ok");
        return Ok(());
    }
    println!("missing, installing");
    pip_install_websockets(&["--target".as_ref(), dir.as_os_str()])
        .context("installing Python websockets into target/python-peers")
}

/// `python3 -m pip install websockets` with `extra` arguments, quietly.
fn pip_install_websockets(extra: &[&std::ffi::OsStr]) -> Result<()> {
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
}

fn python_websockets() -> Result<()> {
    cmd::checking("Python websockets");
    if !cmd::exists("python3") {
        println!("missing python3");
        setup::apt_install(&["python3", "python3-pip"], "python3")?;
    }
    if cmd::output(cmd::new("python3").args(["-c", "import websockets"])).is_some() {
        println!("ok");
        return Ok(());
    }
    println!("missing, installing");
    let pip = |extra: &[&str]| {
        let extra: Vec<&std::ffi::OsStr> = extra.iter().map(|e| e.as_ref()).collect();
        pip_install_websockets(&extra)
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

/// The Node.js modules the tests `require`: `ws` (the echo example and test peers), and for
/// the chat example `redis` and `puppeteer-core` (which drives Debian's Chromium and
/// downloads no browser of its own). `redis@5`: the newest that runs on Debian's Node 18.
const NODE_MODULES: [(&str, &str); 3] = [
    ("ws", "ws"),
    ("redis", "redis@5"),
    ("puppeteer-core", "puppeteer-core"),
];

fn node_ws() -> Result<PathBuf> {
    let dir = node_peers_dir();
    let node_modules = dir.join("node_modules");
    let what = format!(
        "Node ws, redis, puppeteer-core ({})",
        node_modules.display()
    );
    cmd::checking(&what);
    if !cmd::exists("node") || !cmd::exists("npm") {
        println!("missing node or npm");
        setup::apt_install(&["nodejs", "npm"], "node and npm")?;
        cmd::checking(&what);
    }
    let missing: Vec<&str> = NODE_MODULES
        .iter()
        .filter(|(name, _)| !node_modules.join(name).join("package.json").is_file())
        .map(|(_, spec)| *spec)
        .collect();
    if missing.is_empty() {
        println!("ok");
        return Ok(node_modules);
    }
    println!("missing {}, installing", missing.join(" "));
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
            .args(&missing),
    )
    .with_context(|| format!("installing {} with npm", missing.join(" ")))?;
    if let Some((name, _)) = NODE_MODULES
        .iter()
        .find(|(name, _)| !node_modules.join(name).join("package.json").is_file())
    {
        bail!("npm finished but {} has no {name}", node_modules.display());
    }
    Ok(node_modules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_are_summed_and_failed_tests_named() {
        let mut o = Outcome::default();
        for line in [
            "running 3 tests",
            "test a ... ok",
            "test b::c ... FAILED",
            "test d ... ignored",
            "test result: FAILED. 11 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.01s",
        ] {
            o.line(line);
        }
        assert_eq!((o.passed, o.failed, o.ignored, o.summaries), (11, 1, 2, 1));
        assert_eq!(o.failed_tests, vec!["b::c".to_string()]);
    }

    fn exit(code: i32) -> ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        ExitStatus::from_raw(code << 8)
    }

    #[test]
    fn a_binary_without_a_summary_or_that_crashed_or_hung_is_a_failure() {
        let timeout = Duration::from_secs(600);
        let mut silent = Outcome::default();
        silent.finish(Some(exit(0)), timeout);
        assert!(silent.broken.is_some());
        let mut crashed = Outcome::default();
        crashed.line("test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        crashed.finish(Some(exit(101)), timeout);
        assert!(crashed.broken.is_some());
        let mut hung = Outcome::default();
        hung.finish(None, timeout);
        assert!(hung.broken.as_deref().unwrap().contains("time limit"));
        let mut tally = Tally::default();
        tally.add("a", silent);
        tally.add("b", crashed);
        tally.add("c", hung);
        assert_eq!((tally.passed, tally.failed), (3, 3));
        assert!(tally.finish("3 binaries").is_err());
    }

    #[test]
    fn a_clean_binary_is_not_a_failure() {
        let mut o = Outcome::default();
        o.line("test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        o.finish(Some(exit(0)), Duration::from_secs(1));
        assert_eq!(o.broken, None);
        let mut tally = Tally::default();
        tally.add("a", o);
        assert_eq!((tally.passed, tally.failed, tally.ignored), (2, 0, 1));
        assert!(tally.finish("1 binary").is_ok());
    }

    #[test]
    fn a_hanging_binary_is_killed_with_its_children_at_the_time_limit() {
        let mut sh = Command::new("sh");
        sh.args(["-c", "sleep 30 & echo started; wait"]);
        let started = Instant::now();
        let outcome = run_one("hang", sh, Duration::from_secs(1)).unwrap();
        assert!(started.elapsed() < Duration::from_secs(20));
        assert!(outcome.broken.unwrap().contains("time limit"));
    }

    #[test]
    fn test_executables_come_from_cargos_json() {
        let json = r#"{"reason":"compiler-artifact","manifest_path":"/w/proxy/Cargo.toml","target":{"kind":["test"],"name":"zero_hop"},"profile":{"test":true},"executable":"/w/target/debug/deps/zero_hop-1"}
{"reason":"compiler-artifact","manifest_path":"/w/proxy/Cargo.toml","target":{"kind":["bin"],"name":"wsedge"},"profile":{"test":false},"executable":"/w/target/debug/wsedge"}
{"reason":"compiler-artifact","manifest_path":"/w/proxy-common/Cargo.toml","target":{"kind":["lib"],"name":"proxy_common"},"profile":{"test":false},"executable":null}
{"reason":"build-finished","success":true}"#;
        let found = parse_test_binaries(json);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name, "proxy::zero_hop (test)");
        assert_eq!(found[0].package_dir, Path::new("/w/proxy"));
    }
}
