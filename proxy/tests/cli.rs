//! The `wsedge` binary: `check` prints the effective config or names the bad field, and the
//! data-plane choice behaves as documented when eBPF cannot load (run as an unprivileged
//! user, where the kernel really refuses the programs).

mod common;

use std::{
    io::{BufRead, BufReader, Read},
    net::TcpStream,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use tokio_tungstenite::tungstenite::{self, WebSocket};

const BIN: &str = env!("CARGO_BIN_EXE_wsedge");

/// How long a test waits for wsedge to log, answer, or exit.
const WAIT: Duration = Duration::from_secs(20);

/// Runs `cmd` to its end and returns its output; kills it and fails the test if it is still
/// running after [`WAIT`].
fn output_within(mut cmd: Command) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = pipe.read_to_end(&mut out);
            out
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} was still running after {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// A child's stderr, line by line, read on a thread so that waiting for a line can time out.
type Lines = mpsc::Receiver<String>;

fn lines_of(stderr: std::process::ChildStderr) -> Lines {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// A blocking WebSocket client of `url` whose every read and write fails after [`WAIT`].
fn ws_connect(url: &str) -> WebSocket<TcpStream> {
    let authority = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .expect("a ws:// URL");
    let stream = TcpStream::connect(authority).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    tungstenite::client(url, stream)
        .unwrap_or_else(|e| panic!("upgrade of {url}: {e}"))
        .0
}

fn write_config(dir: &tempfile::TempDir, data_plane: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.path().join("wsedge.toml");
    // The ledger's directory, writable by the unprivileged user some of these tests run as.
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\ndata_plane = \"{data_plane}\"\n\
             [[function]]\nname = \"echo\"\nroute = \"/echo\"\nupstreams = [\"127.0.0.1:9\"]\n{extra}"
        ),
    )
    .unwrap();
    path
}

/// A temp dir the unprivileged user can read.
fn readable_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Runs a copy of the binary (the checkout may sit where nobody cannot reach) as `nobody`.
fn as_nobody(dir: &tempfile::TempDir, args: &[&str]) -> Command {
    let bin = dir.path().join("wsedge");
    std::fs::copy(BIN, &bin).unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ]);
    cmd.arg(&bin);
    cmd.args(args);
    cmd
}

fn check(config: &std::path::Path) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["check", "-c"]).arg(config);
    output_within(cmd)
}

#[test]
fn check_prints_the_effective_config_with_defaults() {
    let dir = readable_dir();
    let path = write_config(&dir, "auto", "");
    let out = check(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("max_message_bytes = 262144"), "{text}");
    assert!(text.contains("idle_timeout_s = 600"), "{text}");
}

#[test]
fn check_names_the_bad_field_and_fails() {
    let dir = readable_dir();
    let path = write_config(&dir, "auto", "execution_timeout_s = 5\n");
    let out = check(&path);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("function[0] (echo).execution_timeout_s"),
        "{err}"
    );
    let path = write_config(&dir, "sometimes", "");
    let out = check(&path);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("data_plane"));
}

#[test]
fn check_refuses_a_per_ip_limit_of_0() {
    let dir = readable_dir();
    let path = write_config(&dir, "auto", "");
    let text = std::fs::read_to_string(&path).unwrap();
    let with = |n: u32| {
        text.replace(
            "[server]\n",
            &format!("[server]\nmax_connections_per_ip = {n}\n"),
        )
    };
    std::fs::write(&path, with(0)).unwrap();
    let out = check(&path);
    assert!(
        !out.status.success(),
        "wsedge check accepted max_connections_per_ip = 0"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.max_connections_per_ip: must be at least 1"),
        "{err}"
    );
    std::fs::write(&path, with(1)).unwrap();
    let out = check(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("max_connections_per_ip = 1"), "{printed}");
}

#[test]
fn kernel_data_plane_fails_at_start_when_ebpf_cannot_load() {
    let dir = readable_dir();
    let path = write_config(&dir, "kernel", "");
    let out = output_within(as_nobody(&dir, &["run", "-c", path.to_str().unwrap()]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("data_plane = \"kernel\" but the eBPF programs cannot be loaded"),
        "{err}"
    );
}

#[test]
fn auto_falls_back_to_userspace_with_one_log_line_saying_why() {
    let dir = readable_dir();
    let path = write_config(&dir, "auto", "");
    let mut child = as_nobody(
        &dir,
        &["run", "--log-format", "json", "-c", path.to_str().unwrap()],
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let lines = lines_of(child.stderr.take().unwrap());
    let deadline = Instant::now() + WAIT;
    let mut fallback_lines = 0;
    let mut plane = None;
    let mut serving = false;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(line) = lines.recv_timeout(left) else {
            break;
        };
        let json: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let message = json["fields"]["message"].as_str().unwrap_or_default();
        if message.contains("kernel data plane unavailable") {
            fallback_lines += 1;
            assert!(
                json["fields"]["reason"]
                    .as_str()
                    .is_some_and(|r| !r.is_empty()),
                "{line}"
            );
        }
        if message == "data plane ready" {
            plane = json["fields"]["data_plane"].as_str().map(String::from);
        }
        if message == "wsedge serving" {
            serving = true;
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(serving, "wsedge logged \"wsedge serving\" within {WAIT:?}");
    assert_eq!(fallback_lines, 1);
    assert_eq!(plane.as_deref(), Some("userspace"));
}

/// A child process killed when dropped, also when a test fails: a wsedge left running would
/// hold the test's output open.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `wsedge run` as root with JSON logs; returns the child, its log lines, and the
/// listen address from the "wsedge serving" line.
fn run_json(path: &std::path::Path) -> (Running, Lines, String) {
    let mut child = Command::new(BIN)
        .args(["run", "--log-format", "json", "-c"])
        .arg(path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = lines_of(child.stderr.take().unwrap());
    let child = Running(child);
    let listen = wait_for_log(&mut lines, "wsedge serving")["fields"]["listen"]
        .as_str()
        .unwrap()
        .to_string();
    (child, lines, listen)
}

/// The next log line with `message`; fails if wsedge exits or [`WAIT`] passes first.
fn wait_for_log(lines: &mut Lines, message: &str) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match lines.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("wsedge did not log {message:?} within {WAIT:?}")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("wsedge exited before logging {message:?}")
            }
        };
        let json: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if json["fields"]["message"] == message {
            return json;
        }
    }
}

/// A config for the kernel plane with the Rust example as a spawned function.
fn spawned_echo_config(dir: &tempfile::TempDir, extra: &str) -> std::path::PathBuf {
    let path = dir.path().join("wsedge.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\ndata_plane = \"kernel\"\n\
             [[function]]\nname = \"echo\"\nroute = \"/echo\"\ncommand = [{:?}]\nuser = \"nobody\"\n{extra}",
            common::echo_fn().display().to_string()
        ),
    )
    .unwrap();
    path
}

/// wsedge from `path` (see [`spawned_echo_config`]) with one connection that got an echo:
/// the child, its log lines after the instance's start, the connection and the instance's pid.
fn echo_in_use(path: &std::path::Path) -> (Running, Lines, WebSocket<TcpStream>, u32) {
    let (wsedge, mut lines, listen) = run_json(path);
    let mut ws = ws_connect(&format!("ws://{listen}/echo"));
    ws.send("hi".into()).unwrap();
    assert_eq!(ws.read().unwrap(), "hi".into());
    let started = wait_for_log(&mut lines, "instance starting");
    let pid = started["fields"]["pid"].as_u64().unwrap() as u32;
    (wsedge, lines, ws, pid)
}

fn gone_within(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn instance_output_is_logged_and_instances_die_with_wsedge_and_a_restart_removes_leftovers() {
    let dir = readable_dir();
    let path = spawned_echo_config(&dir, "");
    let (wsedge, mut lines, _ws, pid) = echo_in_use(&path);
    // What the instance prints is wsedge's log, with its function and instance.
    let printed = wait_for_log(&mut lines, "echo function listening on 0.0.0.0:9000");
    assert_eq!(printed["target"], "wsedge::function");
    assert_eq!(
        (
            &printed["fields"]["function"],
            &printed["fields"]["instance"]
        ),
        (&"echo".into(), &"echo-1".into()),
        "{printed}"
    );
    drop(wsedge);
    assert!(
        gone_within(pid, Duration::from_secs(3)),
        "instance {pid} outlived wsedge"
    );

    // What a crashed wsedge could leave: an instance cgroup, owned by a dead pid, with a
    // process still in it. The next start kills it and removes the cgroup.
    let root = wsedge::instances::cgroup::root().expect("cgroup2 is writable as root");
    let mut gone_pid = Command::new("true").spawn().unwrap();
    let dead_owner = gone_pid.id();
    gone_pid.wait().unwrap();
    let leftover = root.join(format!("{dead_owner}-0-echo-1"));
    std::fs::create_dir(&leftover).unwrap();
    let mut orphan = Command::new("sleep").arg("60").spawn().unwrap();
    std::fs::write(leftover.join("cgroup.procs"), orphan.id().to_string()).unwrap();
    let (wsedge, _lines, _) = run_json(&path);
    assert!(
        orphan.try_wait().unwrap().is_some() || {
            std::thread::sleep(Duration::from_millis(200));
            orphan.try_wait().unwrap().is_some()
        },
        "the leftover instance was killed"
    );
    assert!(!leftover.exists(), "the leftover cgroup was removed");
    drop(wsedge);
}

#[test]
fn the_end_of_each_connection_is_logged_with_its_function_status() {
    let dir = readable_dir();
    let path = spawned_echo_config(&dir, "instance_concurrency = 10\n");
    let (wsedge, mut lines, listen) = run_json(&path);
    let url = format!("ws://{listen}/echo");
    // A close handshake the client starts (tungstenite's `close(None)` sends no code): 200.
    let mut ws = ws_connect(&url);
    ws.send("hi".into()).unwrap();
    assert_eq!(ws.read().unwrap(), "hi".into());
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
    drop(ws);
    let ended = wait_for_log(&mut lines, "connection ended");
    assert_eq!(ended["fields"]["status"], 200, "{ended}");
    // The client drops TCP without a close frame; the function then closes too: 456, and
    // the function is not blamed (no 1011 close, no 439).
    let mut ws = ws_connect(&url);
    ws.send("hi".into()).unwrap();
    assert_eq!(ws.read().unwrap(), "hi".into());
    drop(ws);
    let ended = wait_for_log(&mut lines, "connection ended");
    assert_eq!(ended["fields"]["status"], 456, "{ended}");
    drop(wsedge);
}

/// The status line's code of a raw upgrade request to `path`.
fn upgrade_status(listen: &str, path: &str) -> u16 {
    use std::io::Write;
    let mut s = TcpStream::connect(listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&common::upgrade_request(path, "")).unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    String::from_utf8_lossy(&head[9..12]).parse().unwrap()
}

#[test]
fn sighup_reloads_functions_without_touching_open_connections() {
    let dir = readable_dir();
    let echo = common::echo_fn().display().to_string();
    let function = |name: &str| {
        format!(
            "[[function]]\nname = \"{name}\"\nroute = \"/{name}\"\ncommand = [{echo:?}]\n\
             user = \"nobody\"\ninstance_concurrency = 10\nisolation = \"none\"\n"
        )
    };
    let server = "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\n\
                  data_plane = \"kernel\"\n";
    let path = dir.path().join("wsedge.toml");
    std::fs::write(&path, format!("{server}{}{}", function("a"), function("b"))).unwrap();
    let (wsedge, mut lines, listen) = run_json(&path);
    let mut open = ws_connect(&format!("ws://{listen}/a"));
    open.send("before".into()).unwrap();
    assert_eq!(open.read().unwrap(), "before".into());
    assert_eq!(upgrade_status(&listen, "/b"), 101);

    // b removed, c added, a unchanged.
    std::fs::write(&path, format!("{server}{}{}", function("a"), function("c"))).unwrap();
    // SAFETY: plain syscall to the child this test started.
    unsafe { libc::kill(wsedge.0.id() as i32, libc::SIGHUP) };
    wait_for_log(&mut lines, "functions reloaded");
    assert_eq!(upgrade_status(&listen, "/b"), 404, "b is gone");
    assert_eq!(upgrade_status(&listen, "/c"), 101, "c is there");
    open.send("after".into()).unwrap();
    assert_eq!(
        open.read().unwrap(),
        "after".into(),
        "the open connection is untouched"
    );
    let _again = ws_connect(&format!("ws://{listen}/a"));
    let upgraded = wait_for_log(&mut lines, "connection upgraded");
    let upgraded = if upgraded["fields"]["function"] == "a" {
        upgraded
    } else {
        wait_for_log(&mut lines, "connection upgraded")
    };
    assert_eq!(
        upgraded["fields"]["instance"], "a-1",
        "unchanged a keeps its warm instance"
    );

    // A config that does not validate changes nothing.
    std::fs::write(&path, format!("{server}[[function]]\nname = \"a\"\n")).unwrap();
    unsafe { libc::kill(wsedge.0.id() as i32, libc::SIGHUP) };
    wait_for_log(
        &mut lines,
        "reload refused; the running functions are unchanged",
    );
    assert_eq!(upgrade_status(&listen, "/c"), 101);
    drop(wsedge);
}

/// The admin API's token for the `conns` test, in the variable its config names.
const CLI_TOKEN_ENV: &str = "WSEDGE_CLI_TEST_ADMIN_TOKEN";
const CLI_TOKEN: &str = "cli-test-token-8c1f";

#[test]
fn conns_sends_the_admin_token_from_admin_token_env_and_run_refuses_to_start_without_it() {
    let dir = readable_dir();
    let path = dir.path().join("wsedge.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\n\
             data_plane = \"userspace\"\nadmin_token_env = \"{CLI_TOKEN_ENV}\"\n\
             [[function]]\nname = \"echo\"\nroute = \"/echo\"\ncommand = [{:?}]\n\
             user = \"nobody\"\nisolation = \"none\"\n",
            common::echo_fn().display().to_string()
        ),
    )
    .unwrap();

    // Without the variable wsedge does not start (the admin API would be open).
    let mut run = Command::new(BIN);
    run.args(["run", "-c"]).arg(&path).env_remove(CLI_TOKEN_ENV);
    let out = output_within(run);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "server.admin_token_env: ${CLI_TOKEN_ENV} is not set"
        )),
        "{err}"
    );

    let mut child = Command::new(BIN)
        .args(["run", "--log-format", "json", "-c"])
        .arg(&path)
        .env(CLI_TOKEN_ENV, CLI_TOKEN)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = lines_of(child.stderr.take().unwrap());
    let wsedge = Running(child);
    let serving = wait_for_log(&mut lines, "wsedge serving");
    let listen = serving["fields"]["listen"].as_str().unwrap().to_string();
    let admin = serving["fields"]["admin"].as_str().unwrap().to_string();
    let mut ws = ws_connect(&format!("ws://{listen}/echo"));
    ws.send("hi".into()).unwrap();
    assert_eq!(ws.read().unwrap(), "hi".into());

    let conns = |token: Option<&str>| {
        let mut cmd = Command::new(BIN);
        cmd.args(["conns", "--admin", &admin, "-c"]).arg(&path);
        match token {
            Some(token) => cmd.env(CLI_TOKEN_ENV, token),
            None => cmd.env_remove(CLI_TOKEN_ENV),
        };
        output_within(cmd)
    };
    let out = conns(Some(CLI_TOKEN));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 2, "a header and one connection: {table}");
    assert!(rows[0].starts_with("ID "), "{table}");
    assert!(rows[1].contains(" echo "), "{table}");

    let out = conns(Some("not-the-token"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("answered 401"), "{err}");
    let out = conns(None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(CLI_TOKEN_ENV), "{err}");
    drop(ws);
    drop(wsedge);
}

#[test]
fn sighup_reloads_the_tls_certificate_and_logs_a_refused_one() {
    let ca = common::tls::TestCa::new();
    let leaf = ca.leaf("site", &["localhost"]);
    let path = tls_config_file(&ca, &leaf);
    let mut child = Command::new(BIN)
        .args(["run", "--log-format", "json", "-c"])
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = lines_of(child.stderr.take().unwrap());
    let wsedge = Running(child);
    let serving = wait_for_log(&mut lines, "wsedge serving");
    let tls: std::net::SocketAddr = serving["fields"]["tls_listen"]
        .as_str()
        .expect("tls_listen logged")
        .parse()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let served = || {
        rt.block_on(async {
            let tls = common::tls::tls_connect(&ca, tls, "localhost")
                .await
                .unwrap();
            tls.get_ref().1.peer_certificates().unwrap()[0].clone()
        })
    };
    assert_eq!(served(), leaf.der);
    let renewed = ca.leaf("site", &["localhost"]);
    // SAFETY: plain syscall to the child this test started.
    unsafe { libc::kill(wsedge.0.id() as i32, libc::SIGHUP) };
    wait_for_log(&mut lines, "TLS certificates reloaded");
    assert_eq!(served(), renewed.der, "the renewed certificate is served");
    std::fs::write(&renewed.key, "not a key").unwrap();
    unsafe { libc::kill(wsedge.0.id() as i32, libc::SIGHUP) };
    let refused = wait_for_log(
        &mut lines,
        "TLS certificate reload refused; the certificates in use stay",
    );
    assert!(
        refused["fields"]["error"]
            .as_str()
            .unwrap()
            .contains("site.key"),
        "{refused}"
    );
    assert_eq!(served(), renewed.der, "the certificate in use stays");
    drop(wsedge);
}

#[test]
fn check_loads_the_tls_certificates_and_names_a_broken_one() {
    let ca = common::tls::TestCa::new();
    let leaf = ca.leaf("site", &["localhost"]);
    let path = tls_config_file(&ca, &leaf);
    let check = || {
        Command::new(BIN)
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&leaf.key, "not a key").unwrap();
    let out = check();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tls_cert") && err.contains("site.key"),
        "{err}"
    );
}

/// A config in the CA's directory: `tls_listen` with `leaf`, and one function.
fn tls_config_file(ca: &common::tls::TestCa, leaf: &common::tls::Leaf) -> std::path::PathBuf {
    let path = ca.dir.path().join("wsedge.toml");
    let server = common::tls::tls_server_lines(&[leaf], "");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\n{server}\
             [[function]]\nname = \"e\"\nroute = \"/e\"\nupstreams = [\"127.0.0.1:9\"]\n"
        ),
    )
    .unwrap();
    path
}

#[test]
fn a_wsedge_in_another_pid_namespace_leaves_this_ones_instances_alone() {
    let dir = readable_dir();
    let path = spawned_echo_config(&dir, "");
    let (wsedge, _lines, mut ws, instance) = echo_in_use(&path);

    // A second wsedge in a PID namespace of its own (a container sharing the host's cgroups
    // and bpffs): the first one's pid does not exist in its /proc. Its start-up clean-up must
    // still see the first one's cgroups, links and pins as alive.
    let other_dir = readable_dir();
    let other_path = spawned_echo_config(&other_dir, "");
    let mut other = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child", BIN])
        .args(["run", "--log-format", "json", "-c"])
        .arg(&other_path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("unshare runs");
    let stderr = other.stderr.take().unwrap();
    // Killed however the test ends (unshare's --kill-child takes wsedge with it).
    let other = Running(other);
    common::serving_line(stderr);
    assert!(
        std::path::Path::new(&format!("/proc/{instance}")).exists(),
        "the first wsedge's instance {instance} survived the second one's start"
    );
    ws.send("still here".into()).unwrap();
    assert_eq!(ws.read().unwrap(), "still here".into());
    let pins = std::path::Path::new("/sys/fs/bpf/wsedge").join(wsedge.0.id().to_string());
    assert!(pins.join("SIDES").exists(), "{pins:?} kept");
    drop(other);
    drop(wsedge);
}
