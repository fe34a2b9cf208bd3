//! Test harness: a real tokio-tungstenite echo function and an in-process wsedge, both on
//! port 0 of loopback.
#![allow(dead_code)]

pub mod tls;

use std::{net::SocketAddr, time::Duration};

use futures_util::{SinkExt, Stream, StreamExt};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};
use tokio_tungstenite::tungstenite::{
    self, Message,
    protocol::{CloseFrame, frame::coding::CloseCode},
};
use wsedge::{Config, Server, config::DataPlaneMode, registry::ConnectionView};

/// An echo function: echoes data messages; on the text "close:<code>" it closes first
/// with that code.
pub async fn start_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve_echo(stream));
        }
    });
    addr
}

/// One connection of [`start_echo`]'s function: echoes data messages; on the text
/// "close:<code>" it closes first with that code and "bye", then waits for the client's close.
pub async fn serve_echo(stream: TcpStream) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        if let Message::Text(t) = &msg
            && let Some(code) = t.strip_prefix("close:")
        {
            let code: u16 = code.parse().unwrap();
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: "bye".into(),
            };
            let _ = ws.close(Some(frame)).await;
            while ws.next().await.is_some() {}
            return;
        }
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            return;
        }
    }
}

/// An echo instance that reports the close code it receives.
pub async fn recording_instance() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<u16>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if let Message::Close(frame) = &msg {
                        let _ = tx.send(frame.as_ref().map_or(1005, |f| u16::from(f.code)));
                    } else if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// A client that has sent only the start of its upgrade request. While it is pending, a
/// drain waits for it (up to `handshake_timeout_ms`, 10 s by default), and so the admin API
/// stays up: a test can read `/metrics` after every WebSocket the drain closed has ended.
pub struct PendingUpgrade(TcpStream);

impl PendingUpgrade {
    /// Connect before the connections the test wants counted: the proxy accepts in order, so
    /// once those are upgraded this one has been accepted too.
    pub async fn start(addr: SocketAddr) -> PendingUpgrade {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&UPGRADE.as_bytes()[..20]).await.unwrap();
        PendingUpgrade(s)
    }

    /// Sends the rest of the request, which completes while draining: 503 `draining`.
    pub async fn finish_with_503(mut self) {
        self.0.write_all(&UPGRADE.as_bytes()[20..]).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(WAIT, self.0.read_to_end(&mut out))
            .await
            .expect("the proxy answers and closes")
            .unwrap();
        let (status, error_type, _) = parse_error_response(&out);
        assert_eq!((status, error_type.as_str()), (503, "draining"));
    }
}

pub struct Proxy {
    pub addr: SocketAddr,
    /// The `wss://` address, when the config has `tls_listen`.
    pub tls_addr: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub state: std::sync::Arc<wsedge::server::AppState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Proxy {
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    pub async fn connections(&self) -> Vec<ConnectionView> {
        let body = http_get(self.admin, "/connections").await.1;
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    /// Waits until no connection is open (teardown finished), or panics after 10 s.
    pub async fn wait_no_connections(&self) {
        for _ in 0..200 {
            if self.connections().await.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("connections still open: {:?}", self.connections().await);
    }

    /// Starts the shutdown (as SIGTERM does) without waiting for the drain.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops wsedge and waits for it to finish (the drain included), 30 s at most.
    pub async fn stop(mut self) {
        self.begin_stop();
        tokio::time::timeout(Duration::from_secs(30), self.task.take().unwrap())
            .await
            .expect("wsedge stopped within 30 s")
            .unwrap();
    }
}

pub fn config(plane: DataPlaneMode, upstream: SocketAddr, extra_server: &str) -> Config {
    let plane = match plane {
        DataPlaneMode::Auto => "auto",
        DataPlaneMode::Kernel => "kernel",
        DataPlaneMode::Userspace => "userspace",
    };
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_plane = \"{plane}\"\n\
         drain_timeout_s = 1\n{extra_server}\n[[function]]\nname = \"echo\"\nroute = \"/echo\"\nupstreams = [\"{upstream}\"]\n"
    );
    let mut config: Config = toml::from_str(&text).unwrap();
    config.server.state_dir = state_dir();
    unlimited_rates(&mut config);
    config.validate().unwrap();
    config
}

/// A new, empty directory for one wsedge's `state_dir` (its billing ledger), under the
/// target directory: tests never write the host's `/var/lib/wsedge`.
pub fn state_dir() -> std::path::PathBuf {
    tempfile::Builder::new()
        .prefix("state-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
        .keep()
}

/// Spawned instances run as an unprivileged user with an environment of their own: `nobody`
/// unless the test names a user, and the test peers' packages through `NODE_PATH` and
/// `PYTHONPATH` (both under `target/`, which any user can read).
pub fn sandboxed_peers(f: &mut wsedge::config::FunctionConfig, user_given: bool) {
    if !user_given {
        f.user = "nobody".into();
    }
    f.env.entry("NODE_PATH".into()).or_insert_with(node_path);
    f.env
        .entry("PYTHONPATH".into())
        .or_insert_with(python_peers_path);
}

/// A fresh directory a spawned instance may write (files it reports through): outside /tmp,
/// which an instance sees as its own empty tmpfs, and writable by its unprivileged user.
pub fn instance_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    dir
}

/// Where `cargo xtask test` installs `websockets` for spawned Python functions.
pub fn python_peers_path() -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/python-peers")
        .display()
        .to_string()
}

/// Turns the rate quotas off: suites about other behaviour send faster than 10 messages/s
/// and would measure throttling instead. `tests/quotas.rs` sets its own.
pub fn unlimited_rates(config: &mut Config) {
    for f in &mut config.functions {
        f.limits.messages_per_s = 0;
        f.limits.bytes_per_s = 0;
    }
}

/// Starts wsedge; with `DataPlaneMode::Kernel` this fails the test if eBPF cannot load.
pub async fn start_proxy(config: Config) -> Proxy {
    assert!(
        config.state_dir().starts_with(env!("CARGO_TARGET_TMPDIR")),
        "a test's state_dir is its own (common::state_dir()), not {}",
        config.state_dir().display()
    );
    let server = Server::bind(config)
        .await
        .expect("wsedge starts (as root, eBPF must load)");
    let (addr, admin, tls_addr) = (server.local_addr(), server.admin_addr(), server.tls_addr());
    let state = server.state();
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Proxy {
        addr,
        tls_addr,
        admin,
        state,
        stop: Some(stop),
        task: Some(task),
    }
}

pub async fn start(plane: DataPlaneMode) -> Proxy {
    let echo = start_echo().await;
    start_proxy(config(plane, echo, "")).await
}

/// A minimal HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = http_get_with(addr, path, "").await;
    (status, dechunk(&body))
}

/// A GET with `headers` (whole lines, each ending in CRLF) added: (status, head, raw body).
pub async fn http_get_with(addr: SocketAddr, path: &str, headers: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .unwrap_or_else(|_| panic!("GET {path} answered within {WAIT:?}"))
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

/// Undoes chunked transfer-encoding if the body looks chunked.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body.to_string();
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_string();
        };
        if n == 0 {
            return out;
        }
        if after.len() < n {
            return body.to_string();
        }
        out.push_str(&after[..n]);
        rest = after[n..].strip_prefix("\r\n").unwrap_or(&after[n..]);
    }
}

pub const UPGRADE: &str = "GET /echo HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// A masked client frame.
pub fn masked_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// A raw client of `addr` that sent the upgrade and read the 101; returns the stream and the
/// bytes read past the 101.
pub async fn upgraded_raw(addr: SocketAddr) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(UPGRADE.as_bytes()).await.unwrap();
    let (head, pending) = read_response_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (s, pending)
}

/// Reads an HTTP response head from a raw stream; returns it and any bytes after it. 20 s, as
/// [`open`]: a 101 may include the function's cold start (a Python instance takes seconds to
/// start under the kernel matrix's emulated CPU).
pub async fn read_response_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk))
            .await
            .expect("a response head within 20 s (cold start included)")
            .unwrap();
        assert!(
            n > 0,
            "closed before a response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return (String::from_utf8(buf).unwrap(), rest);
        }
    }
}

/// Reads one frame (header and payload) from `pending` + the stream: a server's, or a masked
/// one from a client (the payload comes back unmasked).
pub async fn read_server_frame(s: &mut TcpStream, pending: &mut Vec<u8>) -> (u8, Vec<u8>) {
    loop {
        if pending.len() >= 2 {
            let (hlen, len) = match pending[1] & 0x7f {
                126 if pending.len() >= 4 => {
                    (4, u16::from_be_bytes([pending[2], pending[3]]) as usize)
                }
                127 if pending.len() >= 10 => (
                    10,
                    u64::from_be_bytes(pending[2..10].try_into().unwrap()) as usize,
                ),
                126 | 127 => (usize::MAX, 0),
                n => (2, n as usize),
            };
            let masked = pending[1] & 0x80 != 0;
            let hlen = if masked && hlen != usize::MAX {
                hlen + 4
            } else {
                hlen
            };
            if hlen != usize::MAX && pending.len() >= hlen + len {
                let opcode = pending[0] & 0x0f;
                let mut payload = pending[hlen..hlen + len].to_vec();
                if masked {
                    let mask: [u8; 4] = pending[hlen - 4..hlen].try_into().unwrap();
                    payload
                        .iter_mut()
                        .enumerate()
                        .for_each(|(i, b)| *b ^= mask[i % 4]);
                }
                pending.drain(..hlen + len);
                return (opcode, payload);
            }
        }
        let mut chunk = [0u8; 65536];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "stream closed mid-frame");
        pending.extend_from_slice(&chunk[..n]);
    }
}

/// The Rust example function (`deploy/examples/echo-rust`), built once per test binary.
pub fn echo_fn() -> std::path::PathBuf {
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = std::process::Command::new(cargo)
            .args(["build", "-q", "-p", "echo-fn", "--message-format=json"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("cargo runs");
        assert!(
            out.status.success(),
            "building echo-fn: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| {
                (v["target"]["name"] == "echo-fn")
                    .then(|| v["executable"].as_str().map(std::path::PathBuf::from))
                    .flatten()
            })
            .expect("cargo reports the echo-fn executable")
    })
    .clone()
}

/// The config beside an example under `deploy/examples/` (`dir`), on port 0 of loopback with
/// the kernel data plane and a fresh state directory; its functions as written.
pub fn example_config(dir: &str) -> Config {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(dir)
        .join("wsedge.toml");
    let mut config = Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    config.server.data_plane = DataPlaneMode::Kernel;
    config.server.state_dir = state_dir();
    for f in &mut config.functions {
        sandboxed_peers(f, true);
    }
    config
}

/// The Go example function (`deploy/examples/echo-go`), built once per test binary into the
/// target directory. GOPATH mode against Debian's `golang-github-gorilla-websocket-dev`
/// (`cargo xtask test` installs it with `golang-go`): it builds offline, with no module proxy.
pub fn go_echo_fn() -> std::path::PathBuf {
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out_path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("echo-go");
        let out = std::process::Command::new("go")
            .args(["build", "-o"])
            .arg(&out_path)
            .arg(".")
            .current_dir(root.join("deploy/examples/echo-go"))
            .env("GO111MODULE", "off")
            .env("GOPATH", "/usr/share/gocode")
            .env("GOFLAGS", "")
            .output()
            .unwrap_or_else(|e| {
                panic!("running `go build`: {e}; the Go example needs `go` (Debian's golang-go and golang-github-gorilla-websocket-dev; `cargo xtask test` installs both)")
            });
        assert!(
            out.status.success(),
            "building echo-go: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out_path
    })
    .clone()
}

/// A config with one function given as TOML lines (name, route and the rest); without a
/// `[function.limits]` table of its own, its rates are off (see [`unlimited_rates`]).
pub fn function_config(plane: &str, extra_server: &str, function: &str) -> Config {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_plane = \"{plane}\"\n\
         drain_timeout_s = 1\n{extra_server}\n[[function]]\n{function}\n"
    );
    let mut config: Config = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    if !function.contains("[function.limits]") {
        unlimited_rates(&mut config);
    }
    for f in &mut config.functions {
        sandboxed_peers(f, function.contains("user ="));
    }
    config.base_dir = env!("CARGO_MANIFEST_DIR").into();
    config.server.state_dir = state_dir();
    config.validate().unwrap();
    config
}

impl Proxy {
    pub async fn instances(&self) -> Vec<wsedge::instances::InstanceView> {
        let body = http_get(self.admin, "/instances").await.1;
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    pub async fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").await.1
    }

    /// Asserts that exactly one connection of the function "echo" ended, with `status`.
    pub async fn assert_one_ended_with(&self, status: u16, why: &str) {
        self.assert_ended_with(status, 1, why).await;
    }

    /// Asserts that exactly `count` connections of the function "echo" ended with `status`:
    /// waits (5 s at most) for the counter to get there, then checks it stays there.
    pub async fn assert_ended_with(&self, status: u16, count: u64, why: &str) {
        let series = ended_series(status);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let metrics = self.metrics().await;
            let value = metric_value(&metrics, &series);
            if value == Some(count) {
                return;
            }
            assert!(
                value.unwrap_or(0) < count && tokio::time::Instant::now() < deadline,
                "{why}: expected {series} {count}, got {value:?} in:\n{metrics}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The series of connections of the function "echo" that ended with `status`.
pub fn ended_series(status: u16) -> String {
    format!("wsedge_connections_ended_total{{function=\"echo\",status=\"{status}\"}}")
}

/// The value of `series` (name and labels exactly as exposed) in Prometheus text: the line
/// must be exactly `<series> <value>`, so `..} 1` never matches `..} 12`.
pub fn metric_value(metrics: &str, series: &str) -> Option<u64> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        Some(
            value
                .parse()
                .unwrap_or_else(|e| panic!("{series}: value {value:?}: {e}")),
        )
    })
}

/// How long a test waits for any one thing the peer or the proxy should do.
pub const WAIT: Duration = Duration::from_secs(10);

/// A WebSocket client connection.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next item of a WebSocket stream (`None` at its end), or a panic after [`WAIT`].
pub async fn next_within<S>(ws: &mut S) -> Option<Result<Message, tungstenite::Error>>
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap_or_else(|_| panic!("nothing from the WebSocket within {WAIT:?}"))
}

/// The next message, or a panic: after [`WAIT`], at the end of the stream, or on an error.
pub async fn recv<S>(ws: &mut S) -> Message
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    next_within(ws)
        .await
        .expect("a message, not the end of the stream")
        .expect("a message, not an error")
}

/// Reads (and drops) messages until the stream ends or fails; panics if that takes more than
/// [`WAIT`].
pub async fn read_to_end_of<S>(ws: &mut S)
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    tokio::time::timeout(WAIT, async { while let Some(Ok(_)) = ws.next().await {} })
        .await
        .unwrap_or_else(|_| panic!("the WebSocket did not end within {WAIT:?}"))
}

/// Opens a WebSocket to `request` (a URL or a request), 20 s at most (a cold start included).
pub async fn connect(
    request: impl tungstenite::client::IntoClientRequest + Unpin,
) -> Result<Ws, tungstenite::Error> {
    tokio::time::timeout(
        Duration::from_secs(20),
        tokio_tungstenite::connect_async(request),
    )
    .await
    .expect("the upgrade answered within 20 s")
    .map(|(ws, _)| ws)
}

/// Where the Node peer `ws` is: `$NODE_PATH` (`cargo xtask test` sets it), else where
/// `cargo xtask test` installs it.
pub fn node_path() -> String {
    std::env::var("NODE_PATH").unwrap_or_else(|_| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/node-peers/node_modules")
            .display()
            .to_string()
    })
}

/// Panics, saying what is missing, unless `node` can `require("ws")` from [`node_path`].
/// Tests that need the Node.js peer fail without it; they never pass unrun.
pub fn require_node_peer() {
    let ok = std::process::Command::new("node")
        .args(["-e", "require('ws')"])
        .env("NODE_PATH", node_path())
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "the Node.js test peer is missing: this test needs `node` with the `ws` module in \
         NODE_PATH={}; `cargo xtask test` installs both",
        node_path()
    );
}

/// Panics, saying what is missing, unless `python3` can `import websockets`.
/// Tests that need the Python peer fail without it; they never pass unrun.
pub fn require_python_peer() {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import websockets"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "the Python test peer is missing: this test needs `python3` with the `websockets` \
         module; `cargo xtask test` installs it"
    );
}

/// Sends `request`, reads until the proxy closes: (status, error type header, JSON body).
/// Checks the error response's shape: the JSON body and the header agree, and it has a message.
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, String, serde_json::Value) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .expect("the proxy answers and closes")
        .unwrap();
    parse_error_response(&out)
}

pub fn parse_error_response(out: &[u8]) -> (u16, String, serde_json::Value) {
    let text = String::from_utf8_lossy(out);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head: {text:?}"));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let error_type = head
        .lines()
        // Header names are case-insensitive (hyper writes them in lower case).
        .find_map(|l| {
            let (name, value) = l.split_once(": ")?;
            name.eq_ignore_ascii_case("x-wsedge-error-type")
                .then_some(value)
        })
        .unwrap_or_default()
        .to_string();
    let json: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    assert_eq!(
        json["error_type"],
        error_type.as_str(),
        "body and header agree"
    );
    assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
    (status, error_type, json)
}

/// Sends a raw upgrade request and returns the response head.
pub async fn raw_upgrade(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    read_response_head(&mut s).await.0
}

/// An upgrade request for `path` with extra header lines (each ending in \r\n).
pub fn upgrade_request(path: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .into_bytes()
}

/// How long one case of [`on_both_planes!`] may take in all, its waits included.
pub const CASE_DEADLINE: Duration = Duration::from_secs(180);

/// Defines each named `async fn(DataPlaneMode)` case as two tests, `kernel::<name>` and
/// `userspace::<name>`: the same cases against both data planes. Each fails if it has not
/// finished within [`CASE_DEADLINE`].
#[macro_export]
macro_rules! on_both_planes {
    ($($name:ident),* $(,)?) => {
        mod kernel {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    tokio::time::timeout(
                        super::common::CASE_DEADLINE,
                        super::$name(wsedge::config::DataPlaneMode::Kernel),
                    )
                    .await
                    .expect("the case finished within its deadline");
                }
            )*
        }
        mod userspace {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    tokio::time::timeout(
                        super::common::CASE_DEADLINE,
                        super::$name(wsedge::config::DataPlaneMode::Userspace),
                    )
                    .await
                    .expect("the case finished within its deadline");
                }
            )*
        }
    };
}

/// The value of header `name` (any case) in an HTTP head.
pub fn header_value(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (n, value) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name)
            .then(|| value.trim().to_string())
    })
}

/// Opens a WebSocket to the proxy's `/echo` (20 s: a first connection includes a cold start).
pub async fn open(p: &Proxy) -> Ws {
    tokio::time::timeout(
        Duration::from_secs(20),
        tokio_tungstenite::connect_async(p.url("/echo")),
    )
    .await
    .expect("upgraded in time (cold start included)")
    .expect("upgrade")
    .0
}

/// Sends `text` and asserts that it comes back.
pub async fn echo_once<S>(ws: &mut S, text: &str)
where
    S: Stream<Item = Result<Message, tungstenite::Error>>
        + futures_util::Sink<Message, Error = tungstenite::Error>
        + Unpin,
{
    ws.send(Message::text(text)).await.unwrap();
    assert_eq!(recv(ws).await, Message::text(text));
}

/// Reads past other messages to the proxy's close frame, within `within`; returns its code.
pub async fn proxy_close_code<S>(ws: &mut S, within: Duration) -> Option<u16>
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    tokio::time::timeout(within, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                other => panic!("expected the proxy's close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("the proxy closed the connection in time")
}

/// The "wsedge serving" line a `wsedge run --log-format json` child logs (it carries the
/// bound addresses), read from its stderr within 20 s. The reader keeps draining afterwards,
/// so wsedge never blocks on a full pipe.
pub fn serving_line(stderr: std::process::ChildStderr) -> serde_json::Value {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if json["fields"]["message"] == "wsedge serving" {
                let _ = tx.send(json);
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("wsedge logged \"wsedge serving\" within 20 s")
}

/// `/billing` (or `/billing/instances`) with `query` (e.g. `?function=echo`).
pub async fn billing<T: serde::de::DeserializeOwned>(admin: SocketAddr, path: &str) -> T {
    let (status, body) = http_get(admin, path).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Polls `/billing` until `done` accepts the rows, or fails the test after 15 s.
pub async fn billing_until(
    admin: SocketAddr,
    done: impl Fn(&[wsedge::ledger::LedgerRow]) -> bool,
    what: &str,
) -> Vec<wsedge::ledger::LedgerRow> {
    poll_until(
        Duration::from_secs(15),
        what,
        || billing(admin, "/billing"),
        |rows: &Vec<_>| done(rows),
    )
    .await
}

/// Fetches with `fetch` every 100 ms until `done` holds for what came, and returns that;
/// fails the test, naming `what` and showing the last answer, once `limit` has passed.
pub async fn poll_until<T: std::fmt::Debug, F: std::future::Future<Output = T>>(
    limit: Duration,
    what: &str,
    mut fetch: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let got = fetch().await;
        if done(&got) {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within {limit:?}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `wsedge run --log-format json -c CONFIG` child with the addresses its "wsedge serving"
/// line gave; killed (SIGKILL) when dropped.
pub struct WsedgeProcess {
    pub child: std::process::Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

impl WsedgeProcess {
    pub fn start(config: &std::path::Path) -> WsedgeProcess {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wsedge"))
            .args(["run", "--log-format", "json", "-c"])
            .arg(config)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let serving = serving_line(child.stderr.take().unwrap());
        let addr = |f: &str| serving["fields"][f].as_str().unwrap().parse().unwrap();
        WsedgeProcess {
            listen: addr("listen"),
            admin: addr("admin"),
            child,
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WsedgeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
