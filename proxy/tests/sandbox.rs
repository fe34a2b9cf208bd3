//! The instance sandbox, checked from inside a real function (`tests/functions/probe.py`,
//! Python `websockets`) that reports what it can see and do: its user, capabilities,
//! `no_new_privs`, seccomp, environment and filesystem, and its cgroup limits, which the
//! kernel enforces (a fork loop stops at `pids_max`; an instance over `memory_mb` is killed,
//! its client gets 1011 and the log says `oom`).

mod common;

use std::{
    collections::BTreeSet,
    io::Write,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

/// Everything wsedge logs in this test binary, for the assertions on its log lines.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || Writer(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
        buffer
    })
    .clone()
}

struct Writer(Arc<Mutex<Vec<u8>>>);

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A secret in wsedge's own environment, which no function may see.
const SECRET_VAR: &str = "WSEDGE_SANDBOX_TEST_SECRET";

/// wsedge with the probe as function "echo" on "/echo", its working directory a fresh
/// directory every user may write (so the test can tell read-only from forbidden).
async fn probe_proxy(extra: &str) -> (Proxy, tempfile::TempDir) {
    require_python_peer();
    let _ = logs();
    let workdir = instance_dir();
    let probe = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/functions/probe.py");
    let function = format!(
        "name = \"echo\"\nroute = \"/echo\"\ncommand = [\"python3\", {:?}]\n{extra}",
        probe.display().to_string()
    );
    let mut config = function_config("kernel", "", &function);
    config.base_dir = workdir.path().into();
    (start_proxy(config).await, workdir)
}

async fn ask(ws: &mut Ws, command: &str) -> String {
    ws.send(Message::text(command)).await.unwrap();
    match recv(ws).await {
        Message::Text(t) => t.to_string(),
        other => panic!("{command}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_runs_as_its_user_without_capabilities_or_wsedges_environment() {
    // SAFETY: set before wsedge starts; no other thread of this test reads the environment.
    unsafe { std::env::set_var(SECRET_VAR, "do-not-leak") };
    let (p, workdir) = probe_proxy("env = { GREETING = \"hello\" }\n").await;
    let mut ws = open(&p).await;
    let me: serde_json::Value = serde_json::from_str(&ask(&mut ws, "whoami").await).unwrap();
    let nobody = wsedge::instances::sandbox::User::lookup("nobody").unwrap();
    assert_eq!(me["uid"], nobody.uid, "{me}");
    assert_eq!(me["gid"], nobody.gid, "{me}");
    assert_eq!(me["cap_eff"], "0000000000000000", "no capability: {me}");
    assert_eq!(me["cap_bnd"], "0000000000000000", "none to regain: {me}");
    assert_eq!(me["no_new_privs"], "1", "{me}");
    assert_eq!(me["seccomp"], "2", "a seccomp filter: {me}");
    let env = me["env"].as_object().unwrap();
    let names: BTreeSet<&str> = env.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = [
        "PATH",
        "HOME",
        "LANG",
        "PORT",
        "WSEDGE_FUNCTION",
        "WSEDGE_INSTANCE",
        "GREETING",
        // What the test harness gives every function so its packages are found.
        "NODE_PATH",
        "PYTHONPATH",
    ]
    .into();
    assert_eq!(names, expected, "nothing else of wsedge's: {env:?}");
    assert_eq!(env["GREETING"], "hello");
    assert_eq!(env["WSEDGE_FUNCTION"], "echo");
    assert_eq!(env["HOME"], "/tmp");
    assert_eq!(me["cwd"], workdir.path().display().to_string());
    drop(ws);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_is_read_only_its_tmp_private_and_namespaces_refused() {
    let (p, workdir) = probe_proxy("").await;
    let mut ws = open(&p).await;
    // A directory the instance's user may write on the host: refused by the mount.
    assert_eq!(
        ask(&mut ws, "write /var/tmp/wsedge-probe").await,
        "Read-only file system"
    );
    assert_eq!(ask(&mut ws, "write /tmp/probe").await, "ok");
    assert!(
        !std::path::Path::new("/tmp/probe").exists(),
        "its /tmp is its own"
    );
    let inside = workdir.path().join("written-by-the-function");
    assert_eq!(
        ask(&mut ws, &format!("write {}", inside.display())).await,
        "ok",
        "its working directory stays writable"
    );
    assert_eq!(ask(&mut ws, "unshare").await, "Operation not permitted");
    drop(ws);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_the_functions_and_a_fork_loop_stops_at_pids_max() {
    let (p, _workdir) = probe_proxy("memory_mb = 96\npids_max = 24\ncpu = 0.5\n").await;
    let mut ws = open(&p).await;
    let limits: serde_json::Value = serde_json::from_str(&ask(&mut ws, "limits").await).unwrap();
    let memory = limits
        .get("memory.limit_in_bytes")
        .or_else(|| limits.get("memory.max"));
    assert_eq!(memory, Some(&(96u64 << 20).to_string().into()), "{limits}");
    assert_eq!(limits["pids.max"], "24", "{limits}");
    let cpu = match limits.get("cpu.cfs_quota_us") {
        Some(quota) => format!(
            "{} {}",
            quota.as_str().unwrap(),
            limits["cpu.cfs_period_us"].as_str().unwrap()
        ),
        None => limits["cpu.max"].as_str().unwrap().to_string(),
    };
    assert_eq!(cpu, "50000 100000", "{limits}");
    let forked: u32 = ask(&mut ws, "fork 200").await.parse().unwrap();
    assert!(
        (1..24).contains(&forked),
        "{forked} children: the cgroup stops the loop below pids_max"
    );
    drop(ws);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_over_its_memory_is_killed_its_client_gets_1011_and_the_log_says_oom() {
    let (p, _workdir) = probe_proxy("memory_mb = 64\n").await;
    let mut ws = open(&p).await;
    assert_eq!(ask(&mut ws, "write /tmp/warm").await, "ok");
    ws.send(Message::text("allocate 256")).await.unwrap();
    assert_eq!(
        proxy_close_code(&mut ws, Duration::from_secs(20)).await,
        Some(1011),
        "killed like a crash"
    );
    drop(ws);
    p.assert_ended_with(439, 1, "an instance killed for memory")
        .await;
    let metrics = p.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "wsedge_instance_oom_kills_total{function=\"echo\"}"
        ),
        Some(1),
        "{metrics}"
    );
    let logged = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    assert!(
        logged
            .lines()
            .any(|l| l.contains("reason=\"oom\"") && l.contains("function=echo")),
        "the log says oom:\n{logged}"
    );
    // Not routed to again: the next connection gets a fresh instance.
    let mut again = open(&p).await;
    assert_eq!(ask(&mut again, "write /tmp/fresh").await, "ok");
    let instances = p.instances().await;
    assert_eq!(instances.len(), 1, "{instances:?}");
    assert_eq!(instances[0].id, "echo-2");
    drop(again);
    p.stop().await;
}
