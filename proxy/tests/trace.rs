//! `wsedge trace` and the pinned maps, against the real binary: a scripted session (open,
//! echo, throttle, close; then a message over the limit) prints exactly its events on every
//! data plane, `--function` keeps other functions' events out, and the maps are pinned under
//! `/sys/fs/bpf/wsedge/<pid>/` (read with `bpftool`) only while wsedge runs.

mod common;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::{
    Message,
    protocol::{CloseFrame, frame::coding::CloseCode},
};
use wsedge::{ledger::LedgerRow, tracer::TraceEvent};

const BIN: &str = env!("CARGO_BIN_EXE_wsedge");

/// How long any one wait (a trace line, an exit, an echo) may take before the test fails.
const WAIT: Duration = Duration::from_secs(20);

/// A `wsedge run` child serving `echo` (and `other`, for the filter), from a config file.
struct Wsedge {
    process: common::WsedgeProcess,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Wsedge {
    /// `echo` behind `upstream` (an echo server in this process), or spawned from the echo
    /// example when `upstream` is `None`; at most 10 messages/s and 1 KiB messages.
    fn start(plane: &str, upstream: Option<SocketAddr>, other: SocketAddr) -> Wsedge {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("wsedge.toml");
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        let echo = match upstream {
            Some(addr) => format!("upstreams = [\"{addr}\"]"),
            None => format!(
                "command = [{:?}]\nuser = \"nobody\"",
                common::echo_fn().display().to_string()
            ),
        };
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
                 state_dir = \"state\"\ndata_plane = \"{plane}\"\ndrain_timeout_s = 2\n\
                 [[function]]\nname = \"echo\"\nroute = \"/echo\"\n{echo}\n\
                 [function.limits]\nmax_message_bytes = 1024\nmessages_per_s = 10\n\
                 [[function]]\nname = \"other\"\nroute = \"/other\"\nupstreams = [\"{other}\"]\n"
            ),
        )
        .unwrap();
        Wsedge {
            process: common::WsedgeProcess::start(&config),
            config,
            _dir: dir,
        }
    }

    fn listen(&self) -> SocketAddr {
        self.process.listen
    }

    fn admin(&self) -> SocketAddr {
        self.process.admin
    }

    fn pin_dir(&self) -> PathBuf {
        Path::new("/sys/fs/bpf/wsedge").join(self.process.child.id().to_string())
    }

    /// SIGTERM, then the exit within [`WAIT`].
    fn stop(mut self) -> PathBuf {
        let pins = self.pin_dir();
        let child = &mut self.process.child;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + WAIT;
        while child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "wsedge did not stop within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        pins
    }
}

/// A `wsedge trace --json` child and the lines it printed.
struct Trace {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Trace {
    fn start(wsedge: &Wsedge, function: Option<&str>) -> Trace {
        let mut command = Command::new(BIN);
        command
            .args([
                "trace",
                "--json",
                "--admin",
                &wsedge.admin().to_string(),
                "-c",
            ])
            .arg(&wsedge.config);
        if let Some(f) = function {
            command.args(["--function", f]);
        }
        let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Trace { child, lines }
    }

    fn next(&self) -> TraceEvent {
        let line = self
            .lines
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("wsedge trace printed nothing within {WAIT:?}"));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    /// The events up to and including `connection`'s end.
    fn until_ended(&self, connection: &str) -> Vec<TraceEvent> {
        let mut events = Vec::new();
        loop {
            let event = self.next();
            let done = event.event == "ended" && event.id == connection;
            events.push(event);
            if done {
                return events;
            }
        }
    }

    /// Waits until the trace is live: connects to `function` until events show, then reads
    /// until a second passes without one (the warm-up connections are over by then). The
    /// stream starts when `wsedge trace` has connected, which the test cannot see otherwise.
    async fn wait_live(&self, listen: SocketAddr, function: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(
                Instant::now() < deadline,
                "the trace never showed a connection"
            );
            let mut ws = common::connect(format!("ws://{listen}/{function}"))
                .await
                .unwrap();
            ws.close(None).await.unwrap();
            common::read_to_end_of(&mut ws).await;
            if self.lines.recv_timeout(Duration::from_millis(500)).is_ok() {
                break;
            }
        }
        while self.lines.recv_timeout(Duration::from_secs(1)).is_ok() {
            assert!(Instant::now() < deadline, "the trace never went quiet");
        }
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An event reduced to what the script decides: (direction, event, code, reason).
fn shape(e: &TraceEvent) -> (String, String, Option<u16>, Option<String>) {
    (
        e.direction.clone().unwrap_or_default(),
        e.event.clone(),
        e.code,
        e.reason.clone(),
    )
}

fn ev(
    dir: &str,
    event: &str,
    code: Option<u16>,
    reason: Option<&str>,
) -> (String, String, Option<u16>, Option<String>) {
    (dir.into(), event.into(), code, reason.map(Into::into))
}

/// The script's first connection: an echo, a burst of 5 messages over the 10/s rate (all
/// delivered, late), a message once the client is under its rate again, a close with 1000.
async fn throttled_session(listen: SocketAddr) {
    let mut ws = common::connect(format!("ws://{listen}/echo"))
        .await
        .unwrap();
    common::echo_once(&mut ws, "hello").await;
    for i in 0..5 {
        ws.send(Message::text(format!("burst {i}"))).await.unwrap();
    }
    for i in 0..5 {
        assert_eq!(
            common::recv(&mut ws).await,
            Message::text(format!("burst {i}"))
        );
    }
    // The meter lets a message through at once again 100 ms after the last was due.
    tokio::time::sleep(Duration::from_millis(400)).await;
    common::echo_once(&mut ws, "after").await;
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
    .await
    .unwrap();
    common::read_to_end_of(&mut ws).await;
}

/// The script's second connection: one message over `max_message_bytes`; the proxy closes
/// with 1009.
async fn oversized_session(listen: SocketAddr) {
    let mut ws = common::connect(format!("ws://{listen}/echo"))
        .await
        .unwrap();
    ws.send(Message::binary(vec![7u8; 2000])).await.unwrap();
    let code = common::proxy_close_code(&mut ws, WAIT).await;
    assert_eq!(code, Some(1009));
}

/// The ledger's rows of `echo`, once `n` of them are finished.
async fn finished_rows(admin: SocketAddr, n: usize) -> Vec<LedgerRow> {
    common::billing_until(
        admin,
        |rows| rows.iter().filter(|r| r.status.is_some()).count() >= n,
        "finished ledger rows",
    )
    .await
}

async fn scripted_session_prints_exactly_its_events(plane: &str, spawned: bool) {
    let echo = common::start_echo().await;
    let other = common::start_echo().await;
    let wsedge = Wsedge::start(plane, (!spawned).then_some(echo), other);
    let trace = Trace::start(&wsedge, Some("echo"));
    trace.wait_live(wsedge.listen(), "echo").await;
    let warmup_rows = finished_rows(wsedge.admin(), 1).await.len();

    // Another function's traffic meanwhile: filtered out.
    let mut unrelated = common::connect(format!("ws://{}/other", wsedge.listen()))
        .await
        .unwrap();
    common::echo_once(&mut unrelated, "not traced").await;
    throttled_session(wsedge.listen()).await;
    let first = trace.next();
    let mut throttled = vec![first.clone()];
    throttled.extend(trace.until_ended(&first.id));
    oversized_session(wsedge.listen()).await;
    let first = trace.next();
    let mut oversized = vec![first.clone()];
    oversized.extend(trace.until_ended(&first.id));
    unrelated.close(None).await.unwrap();
    common::read_to_end_of(&mut unrelated).await;

    let everything = throttled.iter().chain(&oversized);
    for e in everything.clone() {
        assert_eq!(e.function, "echo", "only echo's events: {e:?}");
        let sender = e.direction.as_deref().map(|d| match d {
            "in" => "client",
            _ => "function",
        });
        assert_eq!(e.side.as_deref(), sender, "the side that sent: {e:?}");
        assert!(!e.time.is_empty());
    }
    let kernel = plane == "kernel";
    let start = if kernel { "spliced" } else { "relayed" };
    let mut expected = vec![
        ev("", start, None, None),
        ev("in", "throttle_on", None, None),
    ];
    if kernel {
        expected.push(ev("in", "handed_to_userspace", None, Some("rate")));
    }
    expected.extend([
        ev("in", "throttle_off", None, None),
        ev("in", "close_frame", Some(1000), None),
        ev("out", "close_frame", Some(1000), None),
        ev("", "ended", None, None),
    ]);
    let shapes: Vec<_> = throttled.iter().map(shape).collect();
    assert_eq!(
        shapes, expected,
        "the throttled session's events: {throttled:#?}"
    );
    let mut expected = vec![
        ev("", start, None, None),
        ev("in", "message_too_big", None, None),
    ];
    if kernel {
        // The function's answer to the proxy's close passes the kernel program on the
        // instance side, which reports it; the relay has left the stream by then and reads
        // no further frame.
        expected.push(ev("out", "close_frame", Some(1009), None));
    }
    expected.push(ev("", "ended", None, None));
    let shapes: Vec<_> = oversized.iter().map(shape).collect();
    assert_eq!(
        shapes, expected,
        "the oversized session's events: {oversized:#?}"
    );
    assert_eq!(oversized[1].count, Some(2000), "the refused frame's length");

    // Each connection's events name it, and its end carries the status the ledger bills.
    let rows = finished_rows(wsedge.admin(), warmup_rows + 2).await;
    for session in [&throttled, &oversized] {
        let id = &session[0].id;
        assert!(session.iter().all(|e| e.id == *id), "{session:#?}");
        let row = rows
            .iter()
            .find(|r| r.id == *id)
            .unwrap_or_else(|| panic!("no ledger row {id} in {rows:#?}"));
        let ended = session.last().unwrap();
        assert_eq!(ended.status, row.status, "{ended:?} vs {row:?}");
        assert_eq!(ended.data_plane.as_deref(), Some(row.data_plane.as_str()));
    }
    if kernel {
        let expected_plane = if spawned { "kernel-zero-hop" } else { "kernel" };
        assert_eq!(throttled[0].data_plane.as_deref(), Some(expected_plane));
    }
    drop(trace);
    wsedge.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_userspace_relay_traces_a_scripted_session_exactly() {
    scripted_session_prints_exactly_its_events("userspace", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kernel_splice_traces_a_scripted_session_exactly() {
    scripted_session_prints_exactly_its_events("kernel", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_hop_traces_a_scripted_session_exactly() {
    scripted_session_prints_exactly_its_events("kernel", true).await;
}

/// `bpftool map show pinned PATH`: the map's line, or `None` when bpftool finds none there.
fn bpftool_show(path: &Path) -> Option<String> {
    let out = Command::new("bpftool")
        .args(["map", "show", "pinned"])
        .arg(path)
        .output()
        .expect("bpftool runs (cargo xtask test installs it)");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maps_are_pinned_while_wsedge_runs_and_removed_by_a_clean_stop_or_the_next_start() {
    let echo = common::start_echo().await;
    let wsedge = Wsedge::start("kernel", Some(echo), echo);
    let pins = wsedge.pin_dir();
    for (map, kind) in [
        ("SIDES", "hash"),
        ("SPLICED", "sockhash"),
        ("TARGETS", "sockhash"),
        ("TRACE", "ringbuf"),
        ("TRACING", "array"),
        ("EVENTS", "ringbuf"),
    ] {
        let shown = bpftool_show(&pins.join(map))
            .unwrap_or_else(|| panic!("bpftool finds no map pinned at {map} under {pins:?}"));
        assert!(shown.contains(kind), "{map} is a {kind}: {shown}");
    }
    // The trace points are off while nobody listens, and the listener count is readable.
    let dump = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(pins.join("TRACING"))
        .output()
        .unwrap();
    assert!(dump.status.success());
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(
        text.contains("key: 00 00 00 00  value: 00 00 00 00"),
        "{text}"
    );

    let pins = wsedge.stop();
    assert!(!pins.exists(), "a clean stop removes {pins:?}");
    assert_eq!(bpftool_show(&pins.join("SIDES")), None);

    // A wsedge that is killed leaves its pins; the next one removes them.
    let mut killed = Wsedge::start("kernel", Some(echo), echo);
    let left = killed.pin_dir();
    assert!(bpftool_show(&left.join("SIDES")).is_some());
    killed.process.kill();
    assert!(left.exists(), "SIGKILL leaves {left:?}");
    let next = Wsedge::start("kernel", Some(echo), echo);
    assert!(!left.exists(), "the next start removes {left:?}");
    assert!(next.pin_dir().exists());
    next.stop();
}
