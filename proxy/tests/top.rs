//! `wsedge top` against the real binary under a steady load: inside tmux (a real terminal,
//! read back with `capture-pane`) and with `--once` on a pipe.

mod common;

use std::{
    io::{BufRead, BufReader},
    net::TcpStream,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use tokio_tungstenite::tungstenite;

const BIN: &str = env!("CARGO_BIN_EXE_wsedge");

/// How long any one wait (a log line, a screen, an exit) may take before the test fails.
const WAIT: Duration = Duration::from_secs(20);

/// The load: this many connections, each sending one message per [`TICK`] and reading its
/// echo, so about `CONNECTIONS / TICK` messages/s each way.
const CONNECTIONS: usize = 3;
const TICK: Duration = Duration::from_millis(100);

/// What the screen must show for a load.
struct Expected {
    plane: &'static str,
    throttled: usize,
    /// Messages/s, each way, for the function; wide enough for the scheduling jitter of a
    /// loaded test host, narrow enough to tell the load from no load or a throttled one.
    rate: std::ops::RangeInclusive<f64>,
}

/// The load unhindered: 30 messages/s in and out.
const UNLIMITED: &str = "[function.limits]\nmessages_per_s = 0\n";
const fn unthrottled(plane: &'static str) -> Expected {
    Expected {
        plane,
        throttled: 0,
        rate: 20.0..=40.0,
    }
}

/// wsedge serving one function, `ticker`, whose upstream is an echo server in this process,
/// with [`CONNECTIONS`] clients sending at a steady rate until it is dropped.
struct Loaded {
    wsedge: common::WsedgeProcess,
    admin: String,
    config: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    clients: Vec<std::thread::JoinHandle<()>>,
    dir: tempfile::TempDir,
    _echo: tokio::runtime::Runtime,
}

impl Loaded {
    /// `limits`: the function's `[function.limits]` table.
    fn start(plane: &str, limits: &str) -> Loaded {
        let echo = tokio::runtime::Runtime::new().unwrap();
        let upstream = echo.block_on(common::start_echo());
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("wsedge.toml");
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
                 state_dir = \"state\"\ndata_plane = \"{plane}\"\n\
                 [[function]]\nname = \"ticker\"\nroute = \"/ticker\"\nupstreams = [\"{upstream}\"]\n{limits}"
            ),
        )
        .unwrap();
        let wsedge = common::WsedgeProcess::start(&config);
        let listen = wsedge.listen;
        let admin = wsedge.admin.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..CONNECTIONS)
            .map(|_| {
                let mut ws = ws_connect(&format!("ws://{listen}/ticker"));
                let stop = stop.clone();
                std::thread::spawn(move || {
                    // Bounded even if the test never stops it.
                    let until = Instant::now() + 3 * WAIT;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                        let sent = Instant::now();
                        if ws.send("tick".into()).is_err() || ws.read().is_err() {
                            return;
                        }
                        std::thread::sleep(TICK.saturating_sub(sent.elapsed()));
                    }
                    let _ = ws.close(None);
                })
            })
            .collect();
        Loaded {
            wsedge,
            admin,
            config,
            stop,
            clients,
            dir,
            _echo: echo,
        }
    }

    /// `wsedge top` for this wsedge: its config, and its admin address (the config's is port 0).
    fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn top_args(&self) -> Vec<String> {
        vec![
            BIN.to_string(),
            "top".to_string(),
            "--admin".to_string(),
            self.admin.clone(),
            "-c".to_string(),
            self.config.display().to_string(),
        ]
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients.drain(..) {
            let _ = client.join();
        }
        self.wsedge.kill();
    }
}

fn ws_connect(url: &str) -> tungstenite::WebSocket<TcpStream> {
    let authority = url
        .strip_prefix("ws://")
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    let stream = TcpStream::connect(authority).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    tungstenite::client(url, stream)
        .unwrap_or_else(|e| panic!("upgrade of {url}: {e}"))
        .0
}

/// The `ticker` row's fields: function, plane, conns, throttled, messages/s in and out.
fn ticker_row(screen: &str) -> Option<Vec<&str>> {
    screen
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&"ticker"))
}

/// Whether `screen` shows the whole load as `expected`: every connection, on its plane, the
/// throttled count, and both rates in range.
fn shows_the_load(screen: &str, expected: &Expected) -> bool {
    let conns = CONNECTIONS.to_string();
    let throttled = expected.throttled.to_string();
    let in_range = |f: &str| f.parse::<f64>().is_ok_and(|r| expected.rate.contains(&r));
    screen.contains(&format!("connections {conns}  throttled {throttled}"))
        && ticker_row(screen).is_some_and(|row| {
            row.len() == 6
                && row[1] == expected.plane
                && row[2] == conns
                && row[3] == throttled
                && in_range(row[4])
                && in_range(row[5])
        })
}

/// A tmux server of its own (`-L`), so the test neither sees nor disturbs the user's sessions;
/// killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Tmux {
        let present = Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(present, "tmux is missing (`cargo xtask test` installs it)");
        // One server per test: tests of this binary run in parallel.
        static SERVERS: AtomicUsize = AtomicUsize::new(0);
        let n = SERVERS.fetch_add(1, Ordering::Relaxed);
        Tmux {
            socket: format!("wsedge-top-test-{}-{n}", std::process::id()),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("tmux");
        cmd.arg("-L")
            .arg(&self.socket)
            .args(args)
            .env_remove("TMUX");
        cmd
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        let out = self.command(args).output().unwrap();
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn capture(&self) -> String {
        String::from_utf8(self.run(&["capture-pane", "-p", "-t", "top"]).stdout).unwrap()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self
            .command(&["kill-server"])
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs `wsedge top` in tmux under a load on `plane`, waits for the screen to show it, types
/// `quit_key` (tmux key syntax) and checks that top exited with status 0 and left the
/// alternate screen (the pane shows the empty screen it started from, not a frame).
fn watch_in_tmux(plane: &'static str, quit_key: &str) {
    let tmux = Tmux::new();
    let load = Loaded::start(plane, UNLIMITED);
    let expected = unthrottled(plane);
    let args = load.top_args();
    let mut new_session = vec![
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "160",
        "-y",
        "40",
        "--",
        "sh",
        "-c",
        // tmux's own record of a pane's exit status is sometimes missing (tmux 3.3 can see
        // the pane's end of file and not the status), so the shell writes it down.
        "\"$0\" \"$@\"; echo $? > \"$WSEDGE_TOP_STATUS\"",
    ];
    new_session.extend(args.iter().map(String::as_str));
    let status_file = load.dir().join("top.status");
    let status_env = format!("WSEDGE_TOP_STATUS={}", status_file.display());
    new_session.splice(1..1, ["-e", status_env.as_str()]);
    tmux.run(&new_session);
    // Keep the pane after top exits, to read what it left on screen.
    tmux.run(&["set-option", "-w", "-t", "top", "remain-on-exit", "on"]);

    let deadline = Instant::now() + WAIT;
    let mut screen = tmux.capture();
    while !shows_the_load(&screen, &expected) {
        assert!(
            Instant::now() < deadline,
            "within {WAIT:?}, top never showed {CONNECTIONS} {plane} connections of \
             `ticker` at {:?} messages/s each way; the last screen:\n{screen}",
            expected.rate
        );
        std::thread::sleep(Duration::from_millis(200));
        screen = tmux.capture();
    }
    assert!(screen.starts_with("wsedge top "), "{screen}");
    assert!(screen.contains("q: quit"), "{screen}");

    tmux.run(&["send-keys", "-t", "top", quit_key]);
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Ok(status) = std::fs::read_to_string(&status_file)
            && status.ends_with('\n')
        {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "top was still running {WAIT:?} after {quit_key}; its screen:\n{}",
            tmux.capture()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.trim(), "0", "top's exit status after {quit_key}");
    // tmux reads the pane's last bytes (leaving the alternate screen) on its own time.
    let deadline = Instant::now() + WAIT;
    let mut after = tmux.capture();
    while after.contains("wsedge top") || after.contains("ticker") {
        assert!(
            Instant::now() < deadline,
            "top left its frame on the terminal:\n{after}"
        );
        std::thread::sleep(Duration::from_millis(50));
        after = tmux.capture();
    }
}

#[test]
fn top_in_tmux_shows_a_userspace_load_and_quits_on_q() {
    watch_in_tmux("userspace", "q");
}

#[test]
fn top_in_tmux_shows_a_kernel_load_and_quits_on_ctrl_c() {
    watch_in_tmux("kernel", "C-c");
}

/// Runs `wsedge top --once` with stdout on a pipe until a frame shows the load as
/// `expected`; each frame must be plain text.
fn once_until_it_shows(load: &Loaded, expected: &Expected) {
    let args = load.top_args();
    // The load's connections are being made: ask again until all are open, so that the
    // frame's interval sees each one from start to end.
    let deadline = Instant::now() + WAIT;
    loop {
        let mut top = Command::new(&args[0]);
        top.args(&args[1..])
            .args(["--once", "--interval-ms", "1000"])
            .stdin(Stdio::null());
        let out = top.output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !text.contains('\x1b'),
            "no escape codes on a pipe: {text:?}"
        );
        assert!(text.starts_with("wsedge top "), "{text}");
        if shows_the_load(&text, expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "within {WAIT:?}, `top --once` never showed {CONNECTIONS} {} connections, {} \
             throttled, at {:?} messages/s; the last frame:\n{text}",
            expected.plane,
            expected.throttled,
            expected.rate
        );
    }
}

#[test]
fn top_once_on_a_pipe_prints_one_plain_frame_with_the_rates() {
    once_until_it_shows(
        &Loaded::start("userspace", UNLIMITED),
        &unthrottled("userspace"),
    );
}

/// A quota of 5 messages/s against clients sending 10: every connection is throttled, and
/// the function gets 15 messages/s instead of 30.
#[test]
fn top_once_counts_throttled_connections_and_their_slower_rate() {
    once_until_it_shows(
        &Loaded::start("userspace", "[function.limits]\nmessages_per_s = 5\n"),
        &Expected {
            plane: "userspace",
            throttled: CONNECTIONS,
            rate: 10.0..=19.0,
        },
    );
}

/// Without `--once` on a pipe, frames keep coming, one per interval: the second and later
/// ones with rates.
#[test]
fn top_on_a_pipe_prints_a_frame_each_interval() {
    let load = Loaded::start("userspace", UNLIMITED);
    let args = load.top_args();
    let mut top = Command::new(&args[0]);
    top.args(&args[1..])
        .args(["--interval-ms", "300"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut child = top.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let started = Instant::now();
    let mut totals = Vec::new();
    while totals.len() < 4 {
        let left = (started + WAIT).saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            let _ = child.kill();
            panic!("within {WAIT:?}, top printed only these frames' totals: {totals:#?}");
        };
        assert!(
            !line.contains('\x1b'),
            "no escape codes on a pipe: {line:?}"
        );
        if line.starts_with("connections ") {
            totals.push(line);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    // Four frames 300 ms apart take about 0.9 s; far more would mean no steady interval.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(totals[0].contains("messages/s in -  out -"), "{totals:#?}");
    for later in &totals[1..] {
        assert!(
            !later.contains("in -") && !later.contains("out -"),
            "frames after the first have rates: {totals:#?}"
        );
    }
}

#[test]
fn top_once_fails_naming_the_admin_api_when_nothing_answers() {
    // A port nothing listens on: bind one, then free it.
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wsedge.toml");
    std::fs::write(
        &config,
        format!("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"{admin}\"\n"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["top", "--once", "-c"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("admin API at {admin}")), "{err}");
}
