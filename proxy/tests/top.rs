//! `wsedge top` against the real binary under a steady load: inside tmux (a real terminal,
//! read back with `capture-pane`) and with `--once` on a pipe.

mod common;

use std::{
    io::{BufRead, BufReader},
    net::TcpStream,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
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
/// 30 messages/s in and out; the bounds allow for scheduling jitter of a loaded test host.
const EXPECTED_RATE: std::ops::RangeInclusive<f64> = 20.0..=40.0;

/// wsedge serving one function, `ticker`, whose upstream is an echo server in this process,
/// with [`CONNECTIONS`] clients sending at a steady rate until it is dropped.
struct Loaded {
    wsedge: std::process::Child,
    admin: String,
    config: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    clients: Vec<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
    _echo: tokio::runtime::Runtime,
}

impl Loaded {
    fn start() -> Loaded {
        let echo = tokio::runtime::Runtime::new().unwrap();
        let upstream = echo.block_on(common::start_echo());
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("wsedge.toml");
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
                 state_dir = \"state\"\ndata_plane = \"userspace\"\n\
                 [[function]]\nname = \"ticker\"\nroute = \"/ticker\"\nupstreams = [\"{upstream}\"]\n"
            ),
        )
        .unwrap();
        let mut wsedge = Command::new(BIN)
            .args(["run", "--log-format", "json", "-c"])
            .arg(&config)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let serving = serving_line(wsedge.stderr.take().unwrap());
        let listen = serving["fields"]["listen"].as_str().unwrap().to_string();
        let admin = serving["fields"]["admin"].as_str().unwrap().to_string();
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
            _dir: dir,
            _echo: echo,
        }
    }

    /// `wsedge top` for this wsedge: its config, and its admin address (the config's is port 0).
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
        let _ = self.wsedge.kill();
        let _ = self.wsedge.wait();
    }
}

/// The "wsedge serving" log line (it carries the bound addresses); fails after [`WAIT`].
fn serving_line(stderr: std::process::ChildStderr) -> serde_json::Value {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            // Keep draining after the line so that wsedge never blocks on a full pipe.
            if json["fields"]["message"] == "wsedge serving" {
                let _ = tx.send(json);
            }
        }
    });
    rx.recv_timeout(WAIT)
        .expect("wsedge logged \"wsedge serving\" in time")
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

/// Whether `screen` shows the whole load: its connections on the userspace plane, none
/// throttled, and both rates in [`EXPECTED_RATE`].
fn shows_the_load(screen: &str) -> bool {
    let conns = CONNECTIONS.to_string();
    let in_range = |f: &str| f.parse::<f64>().is_ok_and(|r| EXPECTED_RATE.contains(&r));
    screen.contains(&format!("connections {conns}  throttled 0"))
        && ticker_row(screen).is_some_and(|row| {
            row.len() == 6
                && row[1] == "userspace"
                && row[2] == conns
                && row[3] == "0"
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
        Tmux {
            socket: format!("wsedge-top-test-{}", std::process::id()),
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

    fn session_exists(&self) -> bool {
        self.command(&["has-session", "-t", "top"])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
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

#[test]
fn top_in_tmux_shows_the_live_numbers_of_a_running_load_and_quits_on_q() {
    let tmux = Tmux::new();
    let load = Loaded::start();
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
    ];
    new_session.extend(args.iter().map(String::as_str));
    tmux.run(&new_session);

    let deadline = Instant::now() + WAIT;
    let mut screen = tmux.capture();
    while !shows_the_load(&screen) {
        assert!(
            Instant::now() < deadline,
            "within {WAIT:?}, top never showed {CONNECTIONS} userspace connections of \
             `ticker` at {EXPECTED_RATE:?} messages/s each way; the last screen:\n{screen}"
        );
        std::thread::sleep(Duration::from_millis(200));
        screen = tmux.capture();
    }
    assert!(screen.starts_with("wsedge top "), "{screen}");
    assert!(screen.contains("q: quit"), "{screen}");

    tmux.run(&["send-keys", "-t", "top", "q"]);
    let deadline = Instant::now() + WAIT;
    while tmux.session_exists() {
        assert!(
            Instant::now() < deadline,
            "top was still running {WAIT:?} after `q`; its screen:\n{}",
            tmux.capture()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn top_once_on_a_pipe_prints_one_plain_frame_with_the_rates() {
    let load = Loaded::start();
    let args = load.top_args();
    // The load's connections are being made: wait until all are open, so the frame's
    // interval sees each one from start to end.
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
        if shows_the_load(&text) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "within {WAIT:?}, `top --once` never showed the load; the last frame:\n{text}"
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
