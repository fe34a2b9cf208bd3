//! The billing ledger end to end: a row per accepted connection with what the client and the
//! function really sent, `/billing`, `/billing/instances` and `wsedge billing` agreeing, rows
//! a `kill -9` left open finished as interrupted at the next start, a locked database
//! retried without losing a row, and `wsedge billing` reading a stopped wsedge's ledger.

#[macro_use]
mod common;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant, SystemTime},
};

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::{
    Message,
    protocol::{CloseFrame, frame::coding::CloseCode},
};
use wsedge::{
    config::DataPlaneMode,
    ledger::{InstanceBill, LedgerRow},
};

const BIN: &str = env!("CARGO_BIN_EXE_wsedge");

fn plane(p: DataPlaneMode) -> &'static str {
    match p {
        DataPlaneMode::Kernel => "kernel",
        _ => "userspace",
    }
}

/// Wire bytes of a frame with `len` payload bytes: a client's is masked (4 more bytes).
fn wire(len: usize, masked: bool) -> u64 {
    let header = match len {
        0..126 => 2,
        126..65536 => 4,
        _ => 10,
    };
    (header + len + if masked { 4 } else { 0 }) as u64
}

/// A config file for `wsedge billing -c` naming `state_dir` (the ledger is all it reads).
fn cli_config(state_dir: &Path) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wsedge.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nstate_dir = {:?}\n[[function]]\nname = \"echo\"\nroute = \"/echo\"\n\
             upstreams = [\"127.0.0.1:9\"]\n",
            state_dir.display().to_string()
        ),
    )
    .unwrap();
    (dir, path)
}

/// Runs `wsedge billing -c config args..`; its stdout, or a failed test with its stderr.
fn billing_cli(config: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("billing")
        .arg("-c")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wsedge billing {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn parse_time(t: &str) -> SystemTime {
    humantime::parse_rfc3339(t).unwrap_or_else(|e| panic!("{t}: {e}"))
}

async fn a_closed_connection_is_billed_with_what_both_sides_sent(p: DataPlaneMode) {
    let echo = start_echo().await;
    let mut config = config(p, echo, "");
    config.functions[0].memory_mb = 256;
    let state_dir = config.state_dir();
    let proxy = start_proxy(config).await;
    let mut ws = connect(proxy.url("/echo")).await.unwrap();
    let sizes = [0usize, 1, 125, 126, 3000];
    let (mut sent, mut echoed) = (0, 0);
    for (i, size) in sizes.into_iter().enumerate() {
        let text: String = (0..size)
            .map(|j| char::from(b'a' + ((i + j) % 26) as u8))
            .collect();
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(recv(&mut ws).await, Message::text(text));
        sent += wire(size, true);
        echoed += wire(size, false);
    }
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
    .await
    .unwrap();
    read_to_end_of(&mut ws).await;
    proxy.wait_no_connections().await;

    let rows: Vec<LedgerRow> = billing(proxy.admin, "/billing").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let r = &rows[0];
    assert_eq!(r.function, "echo");
    assert_eq!(r.instance, echo.to_string());
    assert_eq!(r.kind, "websocket");
    assert_eq!((r.status, r.close_code), (Some(200), Some(1000)), "{r:?}");
    assert_eq!(r.closed_by.as_deref(), Some("client"));
    assert_eq!((r.messages_in, r.messages_out), (5, 5), "{r:?}");
    // The close frames count too: the client's 1000 (2 code bytes, masked) and the echo's.
    assert_eq!(r.bytes_in, sent + wire(2, true), "{r:?}");
    assert_eq!(r.bytes_out, echoed + wire(2, false), "{r:?}");
    assert_eq!(r.throttled_ms, 0);
    let expected_plane = match p {
        DataPlaneMode::Kernel => "kernel",
        _ => "userspace",
    };
    assert_eq!(r.data_plane, expected_plane);
    let (started, ended) = (
        parse_time(&r.started_at),
        parse_time(r.ended_at.as_deref().unwrap()),
    );
    assert_eq!(
        ended.duration_since(started).unwrap().as_millis() as u64,
        r.duration_ms
    );
    // Its instance is billed for exactly this connection.
    let bills: Vec<InstanceBill> = billing(proxy.admin, "/billing/instances").await;
    assert_eq!(bills.len(), 1, "{bills:?}");
    assert_eq!(
        (bills[0].billed_ms, bills[0].invocations),
        (r.duration_ms, 1)
    );
    assert!((bills[0].gb_s - 0.25 * r.duration_ms as f64 / 1000.0).abs() < 1e-9);

    let metrics = proxy.metrics().await;
    for (series, value) in [
        (
            "wsedge_bytes_total{function=\"echo\",direction=\"in\"}",
            r.bytes_in,
        ),
        (
            "wsedge_bytes_total{function=\"echo\",direction=\"out\"}",
            r.bytes_out,
        ),
        (
            "wsedge_messages_total{function=\"echo\",direction=\"in\"}",
            5,
        ),
        (
            "wsedge_messages_total{function=\"echo\",direction=\"out\"}",
            5,
        ),
    ] {
        assert_eq!(metric_value(&metrics, series), Some(value), "{metrics}");
    }
    proxy.stop().await;

    // The command line reads the same rows from the file.
    let (_dir, cli) = cli_config(&state_dir);
    let json = billing_cli(&cli, &["--format", "json"]);
    let from_cli: Vec<LedgerRow> = serde_json::from_str(&json).unwrap();
    assert_eq!(from_cli, rows);
}

async fn two_overlapping_connections_bill_their_instance_once(p: DataPlaneMode) {
    let function = format!(
        "name = \"echo\"\nroute = \"/echo\"\ncommand = [{:?}]\nisolation = \"none\"\n\
         instance_concurrency = 2\nmemory_mb = 512\n",
        echo_fn().display().to_string()
    );
    let proxy = start_proxy(function_config(plane(p), "", &function)).await;
    let mut first = connect(proxy.url("/echo")).await.unwrap();
    echo_once(&mut first, "one").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut second = connect(proxy.url("/echo")).await.unwrap();
    echo_once(&mut second, "two").await;
    let conns = proxy.connections().await;
    assert_eq!(conns.len(), 2);
    assert_eq!(
        conns[0].instance, conns[1].instance,
        "one instance serves both"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    first.close(None).await.unwrap();
    read_to_end_of(&mut first).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    second.close(None).await.unwrap();
    read_to_end_of(&mut second).await;
    proxy.wait_no_connections().await;

    let rows: Vec<LedgerRow> = billing(proxy.admin, "/billing").await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    let start = rows
        .iter()
        .map(|r| parse_time(&r.started_at))
        .min()
        .unwrap();
    let end = rows
        .iter()
        .map(|r| parse_time(r.ended_at.as_deref().unwrap()))
        .max()
        .unwrap();
    let union = end.duration_since(start).unwrap().as_millis() as u64;
    let sum: u64 = rows.iter().map(|r| r.duration_ms).sum();
    let bills: Vec<InstanceBill> = billing(proxy.admin, "/billing/instances").await;
    assert_eq!(bills.len(), 1, "{bills:?}");
    let bill = &bills[0];
    assert_eq!(bill.instance, conns[0].instance);
    assert_eq!(bill.invocations, 2);
    assert_eq!(bill.billed_ms, union, "first connect to last disconnect");
    assert!(
        bill.billed_ms + 500 < sum,
        "the overlap (about 600 ms) is billed once: {bill:?}, connections {sum} ms"
    );
    assert!(
        (bill.gb_s - 0.5 * union as f64 / 1000.0).abs() < 1e-9,
        "{bill:?}"
    );
    assert_eq!(bill.started_at, rows[0].started_at);
    proxy.stop().await;
}

on_both_planes!(
    a_closed_connection_is_billed_with_what_both_sides_sent,
    two_overlapping_connections_bill_their_instance_once,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_reads_a_stopped_wsedges_ledger_with_filters_and_formats() {
    let echo = start_echo().await;
    let functions = format!(
        "name = \"a\"\nroute = \"/a\"\nupstreams = [\"{echo}\"]\n\
         [[function]]\nname = \"b\"\nroute = \"/b\"\nupstreams = [\"{echo}\"]\n"
    );
    let config = function_config("userspace", "", &functions);
    let state_dir = config.state_dir();
    let proxy = start_proxy(config).await;
    let url = |f: &str| proxy.url(&format!("/{f}"));
    let mut before = connect(url("a")).await.unwrap();
    echo_once(&mut before, "early").await;
    before.close(None).await.unwrap();
    read_to_end_of(&mut before).await;
    proxy.wait_no_connections().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let since = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for f in ["a", "b", "b"] {
        let mut ws = connect(url(f)).await.unwrap();
        echo_once(&mut ws, f).await;
        ws.close(None).await.unwrap();
        read_to_end_of(&mut ws).await;
    }
    proxy.wait_no_connections().await;
    // Stopped gracefully: every row is written and finished before wsedge exits.
    proxy.stop().await;

    let (_dir, cli) = cli_config(&state_dir);
    let rows = |args: &[&str]| -> Vec<LedgerRow> {
        let mut all = vec!["--format", "json"];
        all.extend_from_slice(args);
        serde_json::from_str(&billing_cli(&cli, &all)).unwrap()
    };
    let every = rows(&[]);
    assert_eq!(every.len(), 4, "{every:?}");
    assert!(every.iter().all(|r| r.status == Some(200)), "{every:?}");
    let b = rows(&["--function", "b"]);
    assert_eq!(b.len(), 2);
    assert!(b.iter().all(|r| r.function == "b"));
    let later = rows(&["--since", &since]);
    assert_eq!(
        later.len(),
        3,
        "the connection that ended before {since} is left out"
    );
    assert_eq!(rows(&["--since", &since, "--function", "a"]).len(), 1);
    assert_eq!(rows(&["--since", "1h", "--function", "a"]).len(), 2);

    let csv = billing_cli(&cli, &["--format", "csv", "--function", "b"]);
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some(
            "id,function,instance,started_at,ended_at,duration_ms,status,close_code,closed_by,\
             bytes_in,bytes_out,messages_in,messages_out,data_plane,kind,throttled_ms"
        )
    );
    let records: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(records.len(), 2, "{csv}");
    for (record, row) in records.iter().zip(&b) {
        assert_eq!(record[0], row.id);
        assert_eq!(record[1], "b");
        assert_eq!(record[6], "200");
        // `close(None)` sends a close frame without a code: 1005 on receipt.
        assert_eq!((record[7], record[8]), ("1005", "client"), "{csv}");
    }

    let table = billing_cli(&cli, &["--function", "a"]);
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("ID"), "{table}");
    let lines: Vec<&str> = lines.collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains(" a ") && l.contains("client")),
        "{table}"
    );

    let bills: Vec<InstanceBill> =
        serde_json::from_str(&billing_cli(&cli, &["--instances", "--format", "json"])).unwrap();
    assert_eq!(
        bills.len(),
        2,
        "one upstream instance per function: {bills:?}"
    );
    assert_eq!(
        bills.iter().map(|b| b.invocations).collect::<Vec<_>>(),
        [2, 2]
    );
    let csv = billing_cli(&cli, &["--instances", "--format", "csv"]);
    assert!(
        csv.starts_with("instance,function,started_at,ended_at,billed_ms,gb_s,invocations\n"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 3, "{csv}");
}

/// A `wsedge run` child with JSON logs, killed with SIGKILL when dropped.
struct Wsedge {
    child: Child,
    lines: mpsc::Receiver<serde_json::Value>,
    listen: SocketAddr,
    admin: SocketAddr,
    /// What it logged up to "wsedge serving".
    startup: Vec<serde_json::Value>,
}

impl Wsedge {
    fn start(config: &Path) -> Wsedge {
        let mut child = Command::new(BIN)
            .args(["run", "--log-format", "json", "-c"])
            .arg(config)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                let json = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
                if tx.send(json).is_err() {
                    return;
                }
            }
        });
        let mut w = Wsedge {
            child,
            lines,
            listen: "0.0.0.0:0".parse().unwrap(),
            admin: "0.0.0.0:0".parse().unwrap(),
            startup: Vec::new(),
        };
        let mut startup = Vec::new();
        let serving = w.wait_for(
            |l| {
                startup.push(l.clone());
                l["fields"]["message"] == "wsedge serving"
            },
            "serving",
        );
        w.startup = startup;
        let addr = |f: &str| serving["fields"][f].as_str().unwrap().parse().unwrap();
        (w.listen, w.admin) = (addr("listen"), addr("admin"));
        w
    }

    /// The next log line `matches` accepts, or a failed test after 20 s.
    fn wait_for(
        &mut self,
        mut matches: impl FnMut(&serde_json::Value) -> bool,
        what: &str,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if matches(&line) => return line,
                Ok(_) => {}
                Err(e) => panic!("wsedge did not log {what} within 20 s: {e}"),
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Wsedge {
    fn drop(&mut self) {
        self.kill();
    }
}

fn run_config(dir: &Path, upstream: SocketAddr, data_plane: &str) -> PathBuf {
    let path = dir.join("wsedge.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             data_plane = \"{data_plane}\"\nstate_dir = \"state\"\n\
             [[function]]\nname = \"echo\"\nroute = \"/echo\"\nupstreams = [\"{upstream}\"]\n"
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_every_accepted_connection_is_finished_as_interrupted() {
    let echo = start_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let config = run_config(dir.path(), echo, "kernel");
    let mut wsedge = Wsedge::start(&config);
    let url = format!("ws://{}/echo", wsedge.listen);
    let mut clients = Vec::new();
    let mut sent = Vec::new();
    for i in 0..3usize {
        let mut ws = connect(url.as_str()).await.unwrap();
        let text = "x".repeat(10 * (i + 1));
        echo_once(&mut ws, &text).await;
        sent.push(wire(text.len(), true));
        clients.push(ws);
    }
    // The last checkpoint before the kill carries every connection's counters.
    let open = billing_until(
        wsedge.admin,
        |rows| {
            rows.len() == 3
                && rows
                    .iter()
                    .all(|r| r.ended_at.is_none() && r.messages_in == 1 && r.duration_ms > 0)
        },
        "three open rows with their counters checkpointed",
    )
    .await;
    wsedge.kill();
    drop(clients);

    let mut restarted = Wsedge::start(&config);
    // Recovery runs before this run serves anything, and says what it did.
    let recovered = restarted
        .startup
        .iter()
        .find(|l| l["fields"]["connections"] == 3)
        .unwrap_or_else(|| panic!("a recovery log line: {:?}", restarted.startup));
    assert_eq!(recovered["level"], "WARN", "{recovered}");
    let rows: Vec<LedgerRow> = billing(restarted.admin, "/billing").await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    for r in &rows {
        assert_eq!(r.status, Some(500), "{r:?}");
        assert_eq!(r.closed_by.as_deref(), Some("interrupted"), "{r:?}");
        assert_eq!(r.close_code, None);
        let (started, ended) = (
            parse_time(&r.started_at),
            parse_time(r.ended_at.as_deref().unwrap()),
        );
        assert!(ended >= started, "{r:?}");
        let before = open.iter().find(|o| o.id == r.id).expect("the same row");
        assert!(r.duration_ms >= before.duration_ms, "{r:?} {before:?}");
        assert!(sent.contains(&r.bytes_in), "checkpointed counters: {r:?}");
        assert_eq!(r.messages_out, 1);
    }
    let mut bytes: Vec<u64> = rows.iter().map(|r| r.bytes_in).collect();
    bytes.sort();
    assert_eq!(bytes, sent);
    restarted.kill();
    let logged = Command::new(BIN)
        .args(["billing", "--format", "json", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let after: Vec<LedgerRow> = serde_json::from_slice(&logged.stdout).unwrap();
    assert_eq!(after, rows, "the stopped ledger reads the same");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_ledger_is_retried_and_the_row_written_once_it_is_released() {
    let echo = start_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let config = run_config(dir.path(), echo, "userspace");
    let mut wsedge = Wsedge::start(&config);
    let lock = rusqlite::Connection::open(dir.path().join("state/ledger.db")).unwrap();
    lock.busy_timeout(Duration::from_secs(5)).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let mut ws = connect(format!("ws://{}/echo", wsedge.listen).as_str())
        .await
        .unwrap();
    echo_once(&mut ws, "while locked").await;
    ws.close(None).await.unwrap();
    read_to_end_of(&mut ws).await;
    let warned = wsedge.wait_for(
        |l| {
            l["level"] == "WARN"
                && l["fields"]["message"] == "ledger write failed; keeping the batch and retrying"
        },
        "a ledger write warning",
    );
    assert!(
        warned["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("locked")),
        "{warned}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        wsedge.child.try_wait().unwrap().is_none(),
        "wsedge keeps running"
    );
    let rows: Vec<LedgerRow> = billing(wsedge.admin, "/billing").await;
    assert!(rows.is_empty(), "nothing is written while locked: {rows:?}");
    lock.execute_batch("COMMIT").unwrap();
    let rows = billing_until(
        wsedge.admin,
        |rows| rows.len() == 1 && rows[0].status.is_some(),
        "the row, finished, once the lock is released",
    )
    .await;
    assert_eq!(rows[0].status, Some(200), "{rows:?}");
    assert_eq!(rows[0].messages_in, 1);
    wsedge.wait_for(
        |l| l["fields"]["message"] == "ledger writes resumed",
        "the writer resuming",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_drain_closes_is_written_before_wsedge_exits() {
    let echo = start_echo().await;
    let config = config(DataPlaneMode::Kernel, echo, "");
    let state_dir = config.state_dir();
    let proxy = start_proxy(config).await;
    let mut ws = connect(proxy.url("/echo")).await.unwrap();
    echo_once(&mut ws, "open at shutdown").await;
    // The client answers the proxy's 1001 as it reads.
    let client = tokio::spawn(async move { read_to_end_of(&mut ws).await });
    proxy.stop().await;
    client.await.unwrap();

    let (_dir, cli) = cli_config(&state_dir);
    let rows: Vec<LedgerRow> =
        serde_json::from_str(&billing_cli(&cli, &["--format", "json"])).unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let r = &rows[0];
    assert_eq!(
        (r.status, r.close_code, r.closed_by.as_deref()),
        (Some(200), Some(1001), Some("proxy")),
        "{r:?}"
    );
    assert!(r.ended_at.is_some());
}
