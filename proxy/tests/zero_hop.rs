//! The zero-hop data plane (issue 5): for a function whose instances wsedge spawns, the kernel
//! redirects client frames straight into the instance's own socket and the instance's writes
//! straight to the client, with no proxy-side socket carrying data.
//!
//! The kernel data-plane suite (sizes, fragments, ping/pong, close codes, 200 concurrent
//! connections, pipelined bytes, a vanishing client, the instance closing first, the size limit)
//! runs against each example function (Rust, Node.js `ws`, Python `websockets`, spawned by
//! wsedge in its own network namespace), and every case checks `/connections` reports
//! `kernel-zero-hop` while the connection is open. Node.js and Python cases need their peers
//! (`node` with `ws`, `python3` with `websockets`; `cargo xtask test` installs them) and fail,
//! saying so, without them.
//!
//! The slow-reader cases use `fixtures/slow_instance.py`, a stdlib-only instance that speaks
//! RFC 6455 on a raw socket: they guard the two hazards an early zero-hop prototype hit:
//! unbounded kernel buffering toward an instance that does not read, and an
//! instance whose write never wakes up again after its client stopped reading.
//!
//! After a closing handshake the tests drop their socket before waiting for the connection to
//! go: the proxy ends a connection when the client's FIN arrives, not at the close frames.

mod common;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::*;
use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpSocket, TcpStream},
};
use tokio_tungstenite::{
    connect_async,
    tungstenite::{
        Message,
        protocol::{
            CloseFrame,
            frame::{
                Frame,
                coding::{CloseCode, Data, OpCode},
            },
        },
    },
};

/// What `/connections` says for a connection on the zero-hop plane.
const ZERO_HOP: &str = "kernel-zero-hop";

/// The most the proxy path (the kernel on wsedge's behalf, and wsedge) may take from a client
/// or an instance whose peer does not read; the writer's own socket buffer is left out (pinned
/// small on the client, measured on the instance). The design holds about 2 MiB per
/// connection plus the client socket's send buffer; this leaves room without letting the
/// prototype's unbounded queueing pass.
const SLOW_READER_BOUND: u64 = 8 * 1024 * 1024;

/// The pinned socket buffer of the slow-reader clients (the kernel doubles it).
const CLIENT_SOCKET_BUFFER: u32 = 64 * 1024;

const SIZES: [usize; 7] = [0, 1, 125, 126, 65535, 65536, 262144];

/// A spawned example function, in the languages the platform docs show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Example {
    Rust,
    Node,
    Python,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

/// Node resolves `require("ws")` through NODE_PATH ([`node_path`]).
fn node_command(script: String) -> Vec<String> {
    vec![
        "env".into(),
        format!("NODE_PATH={}", node_path()),
        "node".into(),
        script,
    ]
}

impl Example {
    /// Fails the test, saying what is missing, when the example's interpreter or WebSocket
    /// library is not installed: a case never passes without running.
    fn require_peer(self) {
        match self {
            Example::Rust => {}
            Example::Node => require_node_peer(),
            Example::Python => require_python_peer(),
        }
    }

    /// The example function itself, unchanged (`deploy/examples/`).
    fn command(self) -> Vec<String> {
        let examples = repo_root().join("deploy/examples");
        match self {
            Example::Rust => vec![echo_fn().display().to_string()],
            Example::Node => {
                node_command(examples.join("echo-node/server.js").display().to_string())
            }
            Example::Python => vec![
                "python3".into(),
                examples.join("echo-python/server.py").display().to_string(),
            ],
        }
    }

    /// The example with one addition: on the text "close:<code>" it closes first with that
    /// code and the reason "bye" (the examples only ever echo).
    fn closing_command(self) -> Vec<String> {
        match self {
            Example::Rust => vec![
                std::env::current_exe()
                    .expect("the test binary")
                    .display()
                    .to_string(),
                "rust_instance_that_can_close_first".into(),
                "--exact".into(),
                "--ignored".into(),
                "--nocapture".into(),
            ],
            Example::Node => node_command(fixture("close_first.js")),
            Example::Python => vec!["python3".into(), fixture("close_first.py")],
        }
    }
}

/// One spawned function "echo" on "/echo". Rates are set far above what the tests send, so
/// they measure the data plane, not throttling.
fn spawned_function(command: &[String], extra: &str) -> String {
    let command: Vec<String> = command.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "name = \"echo\"\nroute = \"/echo\"\ncommand = [{}]\n{extra}\n[function.limits]\n\
         messages_per_s = 1000000\nbytes_per_s = 1073741824\n",
        command.join(", ")
    )
}

async fn start_spawned(command: &[String], extra: &str) -> Proxy {
    start_proxy(function_config(
        "kernel",
        "",
        &spawned_function(command, extra),
    ))
    .await
}

/// wsedge with `example` as its function (the test fails if the example cannot run here).
async fn example_proxy(example: Example, extra: &str) -> Proxy {
    example.require_peer();
    start_spawned(&example.command(), extra).await
}

/// Upgrades `stream` through wsedge with a raw request (the first connection includes the
/// instance's cold start) and checks that it is the one connection, on the zero-hop plane.
async fn upgrade_raw(p: &Proxy, stream: TcpStream) -> (TcpStream, Vec<u8>) {
    let upgraded = tokio::time::timeout(
        Duration::from_secs(20),
        open_raw(stream, UPGRADE.as_bytes()),
    )
    .await
    .expect("upgraded in time (cold start included)");
    // The proxy lists the connection once it has put it on a data plane, which may be just
    // after the 101 left.
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.connections().await.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_zero_hop(p, 1).await;
    upgraded
}

/// After the closing handshake the stream ends: the instance's FIN reached the client.
async fn assert_stream_ends(ws: &mut Ws) {
    let end = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("the stream ends after the closing handshake");
    assert!(end.is_none() || matches!(end, Some(Err(_))), "{end:?}");
}

/// `open` connections are open, all of them on the zero-hop plane.
async fn assert_zero_hop(p: &Proxy, open: usize) {
    let conns = p.connections().await;
    assert_eq!(conns.len(), open, "{conns:?}");
    for c in &conns {
        assert_eq!(
            c.data_plane, ZERO_HOP,
            "a spawned instance's connection is on the zero-hop plane: {c:?}"
        );
    }
}

/// Waits until no connection is open, or panics after `within`.
async fn wait_gone(p: &Proxy, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let conns = p.connections().await;
        if conns.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still open after {within:?}: {conns:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn payload(size: usize, seed: u8) -> Vec<u8> {
    (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Wire bytes of an unmasked server frame with `len` payload bytes.
fn server_wire(len: usize) -> u64 {
    (len + match len {
        0..126 => 2,
        126..65536 => 4,
        _ => 10,
    }) as u64
}

/// A raw client: the upgrade is sent; returns the stream and bytes read past the 101.
async fn open_raw(stream: TcpStream, first_write: &[u8]) -> (TcpStream, Vec<u8>) {
    let mut s = stream;
    s.write_all(first_write).await.unwrap();
    let (head, pending) = read_response_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (s, pending)
}

/// Reads server frames until a close frame; returns its code.
async fn close_code_after(s: &mut TcpStream, pending: &mut Vec<u8>) -> u16 {
    loop {
        let (opcode, payload) = read_server_frame(s, pending).await;
        if opcode == 8 {
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

// --- The kernel data-plane suite, per example -------------------------------------------

async fn echoes_every_size_as_text_and_binary_byte_for_byte_with_exact_counters(example: Example) {
    let p = example_proxy(example, "").await;
    let mut ws = open(&p).await;
    let mut expected_out = 0;
    for (i, size) in SIZES.into_iter().enumerate() {
        let data = payload(size, i as u8);
        ws.send(Message::binary(data.clone())).await.unwrap();
        assert_eq!(recv(&mut ws).await, Message::binary(data), "binary {size}");
        let text: String = (0..size)
            .map(|j| char::from(b'a' + (j % 26) as u8))
            .collect();
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(recv(&mut ws).await, Message::text(text), "text {size}");
        expected_out += 2 * server_wire(size);
    }
    assert_zero_hop(&p, 1).await;
    let c = &p.connections().await[0];
    assert_eq!((c.messages_in, c.messages_out), (14, 14), "{c:?}");
    assert_eq!(c.bytes_out, expected_out, "{c:?}");
    // Client frames are masked: 4 more bytes each.
    let client_wire: u64 = SIZES.iter().map(|&s| 2 * (server_wire(s) + 4)).sum();
    assert_eq!(c.bytes_in, client_wire, "{c:?}");
    assert_eq!(
        c.bytes_relayed_by_userspace, 0,
        "the proxy read no payload byte: {c:?}"
    );
    ws.close(None).await.unwrap();
    assert!(matches!(recv(&mut ws).await, Message::Close(_)));
    assert_stream_ends(&mut ws).await;
    drop(ws);
    wait_gone(&p, Duration::from_secs(5)).await;
    p.stop().await;
}

async fn fragmented_messages_with_an_interleaved_ping_are_reassembled_intact(example: Example) {
    let p = example_proxy(example, "").await;
    let mut ws = open(&p).await;
    let fragment =
        |data: &[u8], opcode, fin| Message::Frame(Frame::message(data.to_vec(), opcode, fin));
    // A text message in three frames, a ping between the first two.
    ws.send(fragment(b"frag", OpCode::Data(Data::Text), false))
        .await
        .unwrap();
    ws.send(Message::Ping(b"mid".to_vec().into()))
        .await
        .unwrap();
    ws.send(fragment(b"mented ", OpCode::Data(Data::Continue), false))
        .await
        .unwrap();
    ws.send(fragment(b"message", OpCode::Data(Data::Continue), true))
        .await
        .unwrap();
    assert_eq!(recv(&mut ws).await, Message::Pong(b"mid".to_vec().into()));
    assert_eq!(recv(&mut ws).await, Message::text("fragmented message"));
    // A binary message whose fragments use all three length encodings.
    let whole = payload(1000 + 70_000 + 5, 3);
    let (a, rest) = whole.split_at(1000);
    let (b, c) = rest.split_at(70_000);
    ws.send(fragment(a, OpCode::Data(Data::Binary), false))
        .await
        .unwrap();
    ws.send(fragment(b, OpCode::Data(Data::Continue), false))
        .await
        .unwrap();
    ws.send(fragment(c, OpCode::Data(Data::Continue), true))
        .await
        .unwrap();
    assert_eq!(recv(&mut ws).await, Message::binary(whole));
    assert_zero_hop(&p, 1).await;
    let c = &p.connections().await[0];
    assert_eq!((c.frames_in, c.messages_in), (7, 2), "{c:?}");
    assert_eq!((c.frames_out, c.messages_out), (3, 2), "{c:?}");
    p.stop().await;
}

async fn pings_get_pongs_with_the_same_payload_and_are_not_messages(example: Example) {
    let p = example_proxy(example, "").await;
    let mut ws = open(&p).await;
    for size in [0, 1, 125] {
        let data = payload(size, 7);
        ws.send(Message::Ping(data.clone().into())).await.unwrap();
        assert_eq!(recv(&mut ws).await, Message::Pong(data.into()), "{size}");
    }
    echo_once(&mut ws, "after the pings").await;
    assert_zero_hop(&p, 1).await;
    let c = &p.connections().await[0];
    assert_eq!((c.frames_in, c.messages_in), (4, 1), "{c:?}");
    assert_eq!((c.frames_out, c.messages_out), (4, 1), "{c:?}");
    p.stop().await;
}

async fn a_client_close_code_comes_back_from_the_instance_and_the_stream_ends(example: Example) {
    let p = example_proxy(example, "").await;
    let mut ws = open(&p).await;
    echo_once(&mut ws, "before closing").await;
    assert_zero_hop(&p, 1).await;
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4001),
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    match recv(&mut ws).await {
        Message::Close(Some(f)) => {
            assert_eq!((u16::from(f.code), f.reason.as_str()), (4001, "bye"))
        }
        other => panic!("expected the echoed close, got {other:?}"),
    }
    assert_stream_ends(&mut ws).await;
    drop(ws);
    wait_gone(&p, Duration::from_secs(5)).await;
    // The client closed with a code other than 1000: 456.
    p.assert_one_ended_with(456, "the client closed with 4001")
        .await;
    p.stop().await;
}

async fn the_instance_closing_first_reaches_the_client_with_its_code_then_eof(example: Example) {
    example.require_peer();
    let p = start_spawned(&example.closing_command(), "").await;
    let mut ws = open(&p).await;
    echo_once(&mut ws, "before the instance closes").await;
    assert_zero_hop(&p, 1).await;
    ws.send(Message::text("close:4000")).await.unwrap();
    match recv(&mut ws).await {
        Message::Close(Some(f)) => {
            assert_eq!((u16::from(f.code), f.reason.as_str()), (4000, "bye"))
        }
        other => panic!("expected the instance's close, got {other:?}"),
    }
    // tungstenite answered the close; the instance then closes TCP and the client sees EOF.
    assert_stream_ends(&mut ws).await;
    drop(ws);
    wait_gone(&p, Duration::from_secs(5)).await;
    // The function closed with a code other than 1000 or 1011: 439.
    p.assert_one_ended_with(439, "the function closed with 4000")
        .await;
    p.stop().await;
}

async fn two_hundred_concurrent_connections_each_get_their_own_echoes(example: Example) {
    // One instance can take them all: the test is about the data plane, not scale-out.
    let p = example_proxy(example, "instance_concurrency = 256\n").await;
    // The cold start first, so 200 handshakes do not all wait on it.
    let mut warm = open(&p).await;
    echo_once(&mut warm, "warm").await;
    let url = p.url("/echo");
    let clients: Vec<_> = (0..200u32)
        .map(|n| {
            let url = url.clone();
            tokio::spawn(async move {
                let (mut ws, _) = connect_async(url).await.expect("upgrade");
                for i in 0..5u32 {
                    echo_once(&mut ws, &format!("connection {n} message {i}")).await;
                }
                ws
            })
        })
        .collect();
    let sockets = tokio::time::timeout(Duration::from_secs(20), async {
        let mut sockets = Vec::new();
        for c in clients {
            sockets.push(c.await.expect("a client task"));
        }
        sockets
    })
    .await
    .expect("200 connections with 5 echoes each within 20 s");
    assert_zero_hop(&p, 201).await;
    let conns = p.connections().await;
    let busy = conns.iter().filter(|c| c.messages_in == 5).count();
    assert_eq!(busy, 200, "each counts only its own messages: {conns:?}");
    assert!(
        conns.iter().all(|c| c.messages_in == c.messages_out),
        "{conns:?}"
    );
    tokio::time::timeout(Duration::from_secs(20), async {
        for mut ws in sockets.into_iter().chain([warm]) {
            ws.close(None).await.unwrap();
            assert!(matches!(recv(&mut ws).await, Message::Close(_)));
        }
    })
    .await
    .expect("201 closing handshakes within 20 s");
    wait_gone(&p, Duration::from_secs(10)).await;
    p.stop().await;
}

async fn frames_pipelined_with_the_handshake_are_forwarded_in_order(example: Example) {
    let p = example_proxy(example, "").await;
    // The request, two whole frames and the first 1000 bytes of a third, in one write.
    let big = payload(70_000, 9);
    let third = masked_frame(true, 2, &big);
    let mut first_write = UPGRADE.as_bytes().to_vec();
    first_write.extend(masked_frame(true, 1, b"one"));
    first_write.extend(masked_frame(true, 1, b"two"));
    first_write.extend_from_slice(&third[..1000]);
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut s, mut pending) =
        tokio::time::timeout(Duration::from_secs(20), open_raw(stream, &first_write))
            .await
            .expect("upgraded in time (cold start included)");
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(&third[1000..]).await.unwrap();
    assert_eq!(
        read_server_frame(&mut s, &mut pending).await,
        (1, b"one".to_vec())
    );
    assert_eq!(
        read_server_frame(&mut s, &mut pending).await,
        (1, b"two".to_vec())
    );
    assert_eq!(read_server_frame(&mut s, &mut pending).await, (2, big));
    // A frame sent once the zero-hop plane carries the connection still works.
    s.write_all(&masked_frame(true, 1, b"after")).await.unwrap();
    assert_eq!(
        read_server_frame(&mut s, &mut pending).await,
        (1, b"after".to_vec())
    );
    assert_zero_hop(&p, 1).await;
    let c = &p.connections().await[0];
    assert_eq!(c.messages_in, 4, "{c:?}");
    p.stop().await;
}

async fn a_frame_sent_alone_right_after_the_101_is_not_stranded(example: Example) {
    let p = example_proxy(example, "").await;
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut s, mut pending) = upgrade_raw(&p, stream).await;
    // Sent at once, possibly before the sockets are in the maps, and nothing after it.
    s.write_all(&masked_frame(true, 1, b"lonely"))
        .await
        .unwrap();
    assert_eq!(
        read_server_frame(&mut s, &mut pending).await,
        (1, b"lonely".to_vec())
    );
    assert_zero_hop(&p, 1).await;
    p.stop().await;
}

async fn a_client_that_vanishes_mid_frame_is_cleaned_up_and_the_next_connection_works(
    example: Example,
) {
    let p = example_proxy(example, "").await;
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut s, mut pending) = upgrade_raw(&p, stream).await;
    s.write_all(&masked_frame(true, 1, b"whole")).await.unwrap();
    assert_eq!(
        read_server_frame(&mut s, &mut pending).await,
        (1, b"whole".to_vec())
    );
    assert_zero_hop(&p, 1).await;
    // Half a frame, then the TCP connection goes without a close frame.
    let partial = masked_frame(true, 2, &payload(5000, 1));
    s.write_all(&partial[..2000]).await.unwrap();
    drop(s);
    wait_gone(&p, Duration::from_secs(5)).await;
    let mut ws = open(&p).await;
    echo_once(&mut ws, "still served").await;
    assert_zero_hop(&p, 1).await;
    p.stop().await;
}

async fn a_message_over_the_limit_closes_the_client_with_1009(example: Example) {
    let p = example_proxy(example, "").await;
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut s, mut pending) = upgrade_raw(&p, stream).await;
    s.write_all(&masked_frame(true, 1, b"ok")).await.unwrap();
    assert_eq!(
        read_server_frame(&mut s, &mut pending).await,
        (1, b"ok".to_vec())
    );
    assert_zero_hop(&p, 1).await;
    // One 1 MiB frame (the limit is 256 KiB), announced and partly sent.
    let huge = masked_frame(true, 2, &payload(1 << 20, 3));
    let _ = s.write_all(&huge[..64 * 1024]).await;
    assert_eq!(close_code_after(&mut s, &mut pending).await, 1009);
    drop(s);
    wait_gone(&p, Duration::from_secs(5)).await;
    p.assert_one_ended_with(429, "the proxy closed it for the size quota")
        .await;
    p.stop().await;
}

/// Defines each named `async fn(Example)` case as three tests, `rust::<name>`,
/// `node::<name>` and `python::<name>`: the same case against each example function. Each
/// fails if it has not finished within `CASE_DEADLINE`.
macro_rules! on_each_example {
    ($($name:ident),* $(,)?) => {
        on_each_example!(@one rust, Rust, $($name),*);
        on_each_example!(@one node, Node, $($name),*);
        on_each_example!(@one python, Python, $($name),*);
    };
    (@one $module:ident, $example:ident, $($name:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    tokio::time::timeout(
                        super::CASE_DEADLINE,
                        super::$name(super::Example::$example),
                    )
                    .await
                    .expect("the case finished within its deadline");
                }
            )*
        }
    };
}

on_each_example!(
    echoes_every_size_as_text_and_binary_byte_for_byte_with_exact_counters,
    fragmented_messages_with_an_interleaved_ping_are_reassembled_intact,
    pings_get_pongs_with_the_same_payload_and_are_not_messages,
    a_client_close_code_comes_back_from_the_instance_and_the_stream_ends,
    the_instance_closing_first_reaches_the_client_with_its_code_then_eof,
    two_hundred_concurrent_connections_each_get_their_own_echoes,
    frames_pipelined_with_the_handshake_are_forwarded_in_order,
    a_frame_sent_alone_right_after_the_101_is_not_stranded,
    a_client_that_vanishes_mid_frame_is_cleaned_up_and_the_next_connection_works,
    a_message_over_the_limit_closes_the_client_with_1009,
);

// --- Which functions get zero-hop ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_data_plane_auto_spawned_instances_get_zero_hop_and_upstreams_the_kernel_splice() {
    let upstream = start_echo().await;
    let functions = format!(
        "{}\n[[function]]\nname = \"fixed\"\nroute = \"/fixed\"\nupstreams = [\"{upstream}\"]\n",
        spawned_function(&Example::Rust.command(), "")
    );
    let p = start_proxy(function_config("auto", "", &functions)).await;
    let mut spawned = open(&p).await;
    echo_once(&mut spawned, "to a spawned instance").await;
    let mut fixed = connect(p.url("/fixed")).await.expect("upgrade");
    echo_once(&mut fixed, "to a fixed upstream").await;
    let conns = p.connections().await;
    let plane_of = |function: &str| {
        conns
            .iter()
            .find(|c| c.function == function)
            .map(|c| c.data_plane.clone())
            .unwrap_or_else(|| panic!("no {function} connection: {conns:?}"))
    };
    assert_eq!(plane_of("echo"), ZERO_HOP, "{conns:?}");
    assert_eq!(plane_of("fixed"), "kernel", "{conns:?}");
    p.stop().await;
}

// --- The proxy ending zero-hop connections -------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_closes_zero_hop_websockets_with_1001_and_ends_once_the_clients_answer() {
    let mut config = function_config(
        "kernel",
        "",
        &spawned_function(&Example::Rust.command(), ""),
    );
    config.server.drain_timeout_s = 10;
    // The pending upgrade below must outlast the test up to the drain.
    config.server.handshake_timeout_ms = 30_000;
    let mut p = start_proxy(config).await;
    // Keeps the drain, and /metrics, going until the ends below are counted.
    let pending = PendingUpgrade::start(p.addr).await;
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut ws = open(&p).await;
        echo_once(&mut ws, &format!("hello {i}")).await;
        clients.push(ws);
    }
    assert_zero_hop(&p, 3).await;
    p.begin_stop();
    for ws in &mut clients {
        // tokio-tungstenite answers the close frame it reads; that answer is a client frame
        // arriving after the proxy took the connection off the kernel path.
        assert_eq!(
            proxy_close_code(ws, Duration::from_secs(5)).await,
            Some(1001)
        );
    }
    drop(clients);
    p.assert_ended_with(200, 3, "a connection the drain closed ends with 200")
        .await;
    pending.finish_with_503().await;
    tokio::time::timeout(Duration::from_secs(8), p.stop())
        .await
        .expect("the drain ends once every connection answered (not at its 10 s limit)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_zero_hop_connection_is_closed_with_1001_and_the_next_one_works() {
    let p = start_spawned(&Example::Rust.command(), "idle_timeout_s = 10").await;
    let mut idle = open(&p).await;
    echo_once(&mut idle, "before going quiet").await;
    assert_zero_hop(&p, 1).await;
    assert_eq!(
        proxy_close_code(&mut idle, Duration::from_secs(16)).await,
        Some(1001)
    );
    drop(idle);
    wait_gone(&p, Duration::from_secs(5)).await;
    p.assert_one_ended_with(455, "no frame either way for idle_timeout_s")
        .await;
    let mut next = open(&p).await;
    echo_once(&mut next, "a fresh connection").await;
    assert_zero_hop(&p, 1).await;
    next.close(None).await.unwrap();
    wait_gone(&p, Duration::from_secs(5)).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_execution_timeout_cuts_a_zero_hop_connection_without_a_close_frame() {
    let p = start_spawned(
        &Example::Rust.command(),
        "idle_timeout_s = 10\nexecution_timeout_s = 10",
    )
    .await;
    let mut ws = open(&p).await;
    echo_once(&mut ws, "before the limit").await;
    assert_zero_hop(&p, 1).await;
    // Busy all along (a message every 0.5 s): only the execution limit can end it. The
    // client sees TCP close with no close frame (tungstenite: the end of the stream or a
    // reset, never Message::Close).
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if ws.send(Message::text("tick")).await.is_err() {
                return "the send failed";
            }
            match tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => panic!("a close frame: {frame:?}"),
                Ok(Some(Ok(_))) => tokio::time::sleep(Duration::from_millis(500)).await,
                Ok(Some(Err(_))) => return "an error",
                Ok(None) => return "the end of the stream",
                Err(_) => return "silence",
            }
        }
    })
    .await
    .expect("cut within 20 s of a 10 s limit");
    assert_ne!(ended, "silence", "TCP closed, not just quiet");
    drop(ws);
    wait_gone(&p, Duration::from_secs(5)).await;
    p.assert_one_ended_with(433, "open longer than execution_timeout_s")
        .await;
    p.stop().await;
}

// --- Slow readers -------------------------------------------------------------------------

/// wsedge spawning `fixtures/slow_instance.py` in `mode`; the instance reports to `dir`.
async fn slow_proxy(mode: &str, dir: &Path) -> Proxy {
    let command = [
        "python3".to_string(),
        fixture("slow_instance.py"),
        mode.to_string(),
        dir.display().to_string(),
    ];
    // The instance reports through files in `dir`: its working directory is the one place
    // of the host it may write.
    let mut config = function_config("kernel", "", &spawned_function(&command, ""));
    config.base_dir = dir.to_path_buf();
    start_proxy(config).await
}

/// A client socket with pinned buffers, so what it gets rid of is what the proxy path holds.
async fn connect_pinned(p: &Proxy, send: bool) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    if send {
        socket.set_send_buffer_size(CLIENT_SOCKET_BUFFER).unwrap();
    } else {
        socket.set_recv_buffer_size(CLIENT_SOCKET_BUFFER).unwrap();
    }
    socket.connect(p.addr).await.unwrap()
}

/// Waits (at most `within`) for a status line of the slow instance starting with `prefix`.
/// Fails at once when the instance reported a failure.
async fn wait_status(dir: &Path, prefix: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        if let Some(line) = status.lines().find(|l| l.starts_with(prefix)) {
            return line.to_string();
        }
        let failed = ["error", "stuck", "unbounded"];
        assert!(
            !status
                .lines()
                .any(|l| failed.iter().any(|f| l.starts_with(f))),
            "the instance failed waiting for {prefix:?}:\n{status}"
        );
        assert!(
            Instant::now() < deadline,
            "no {prefix:?} from the instance within {within:?}:\n{status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The payload of the client's `n`th flood frame: differs per frame, so a lost, repeated or
/// reordered frame changes the hash.
fn flood_payload(n: u32) -> Vec<u8> {
    (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(31).wrapping_add(n.wrapping_mul(7)) % 251) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_flooding_an_instance_that_stops_reading_is_held_back_then_every_byte_arrives_in_order()
 {
    let dir = instance_dir();
    let p = slow_proxy("hold-reads", dir.path()).await;
    let stream = connect_pinned(&p, true).await;
    let (mut s, mut pending) = upgrade_raw(&p, stream).await;
    // Push frames until a write makes no progress for a second: the client is held back.
    let (mut hash, mut payload_bytes, mut pushed) = (Sha256::new(), 0u64, 0u64);
    let (mut frames, mut frame, mut at) = (0u32, Vec::new(), 0);
    let started = Instant::now();
    loop {
        if at == frame.len() {
            let data = flood_payload(frames);
            hash.update(&data);
            payload_bytes += data.len() as u64;
            frame = masked_frame(true, 2, &data);
            at = 0;
            frames += 1;
        }
        match tokio::time::timeout(Duration::from_secs(1), s.write(&frame[at..])).await {
            Err(_) => break,
            Ok(Ok(n)) if n > 0 => {
                pushed += n as u64;
                at += n;
            }
            Ok(result) => panic!(
                "the connection failed after the client pushed {pushed} bytes ({result:?}): \
                 zero-hop holds a client back, it does not cut it"
            ),
        }
        assert!(
            pushed <= SLOW_READER_BOUND,
            "the client pushed {pushed} bytes into an instance that does not read"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the client was never held back ({pushed} bytes in 10 s)"
        );
    }
    eprintln!("held back after {pushed} bytes ({frames} frames started)");
    let status = std::fs::read_to_string(dir.path().join("status")).unwrap_or_default();
    assert!(status.is_empty(), "the instance did not read yet: {status}");
    assert_zero_hop(&p, 1).await;
    // The instance reads now; the client finishes its frame and ends the run.
    std::fs::write(dir.path().join("go"), b"").unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        s.write_all(&frame[at..]).await.unwrap();
        s.write_all(&masked_frame(true, 1, b"end")).await.unwrap();
    })
    .await
    .expect("the client's writes resume once the instance reads");
    wait_status(dir.path(), "answered", Duration::from_secs(10)).await;
    let (opcode, answer) = read_server_frame(&mut s, &mut pending).await;
    assert_eq!(opcode, 1);
    let expected = format!("{payload_bytes} {:x}", hash.finalize());
    assert_eq!(
        String::from_utf8(answer).unwrap(),
        expected,
        "the instance received every byte in order"
    );
    s.write_all(&masked_frame(true, 8, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    assert_eq!(close_code_after(&mut s, &mut pending).await, 1000);
    drop(s);
    wait_gone(&p, Duration::from_secs(5)).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_limit_after_the_client_was_held_back_closes_it_with_1009() {
    let dir = instance_dir();
    let p = slow_proxy("hold-reads", dir.path()).await;
    let stream = connect_pinned(&p, true).await;
    let (mut s, mut pending) = upgrade_raw(&p, stream).await;
    // Held back as in the flooding case: from here on userspace relays the client's frames.
    let (mut frames, mut frame, mut at, mut pushed) = (0u32, Vec::new(), 0, 0u64);
    let started = Instant::now();
    loop {
        if at == frame.len() {
            frame = masked_frame(true, 2, &flood_payload(frames));
            at = 0;
            frames += 1;
        }
        match tokio::time::timeout(Duration::from_secs(1), s.write(&frame[at..])).await {
            Err(_) => break,
            Ok(Ok(n)) if n > 0 => {
                at += n;
                pushed += n as u64;
            }
            Ok(result) => panic!("the connection failed after {pushed} bytes: {result:?}"),
        }
        assert!(
            pushed <= SLOW_READER_BOUND,
            "never held back ({pushed} bytes)"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never held back"
        );
    }
    std::fs::write(dir.path().join("go"), b"").unwrap();
    // The rest of the frame, then the header (and a little) of a 300 KiB message.
    let mut oversized = masked_frame(true, 2, &vec![7u8; 300 * 1024]);
    oversized.truncate(14 + 100);
    tokio::time::timeout(Duration::from_secs(10), async {
        s.write_all(&frame[at..]).await.unwrap();
        s.write_all(&oversized).await.unwrap();
    })
    .await
    .expect("the client's writes resume once the instance reads");
    assert_eq!(
        tokio::time::timeout(
            Duration::from_secs(10),
            close_code_after(&mut s, &mut pending)
        )
        .await
        .expect("the proxy closes the connection"),
        1009
    );
    drop(s);
    wait_gone(&p, Duration::from_secs(5)).await;
    p.stop().await;
}

// --- Frames RFC 6455 forbids ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_frame_with_a_reserved_opcode_fails_the_connection_with_1002() {
    let p = start_spawned(&Example::Rust.command(), "").await;
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut s, mut pending) = upgrade_raw(&p, stream).await;
    s.write_all(&masked_frame(true, 3, b"")).await.unwrap();
    assert_eq!(close_code_after(&mut s, &mut pending).await, 1002);
    drop(s);
    wait_gone(&p, Duration::from_secs(5)).await;
    p.assert_one_ended_with(456, "the client broke the protocol")
        .await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_frame_with_a_reserved_opcode_fails_the_connection_with_1002_both_ways() {
    let dir = instance_dir();
    let p = slow_proxy("garbage", dir.path()).await;
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut s, mut pending) = upgrade_raw(&p, stream).await;
    s.write_all(&masked_frame(true, 1, b"go")).await.unwrap();
    assert_eq!(close_code_after(&mut s, &mut pending).await, 1002);
    assert_eq!(
        wait_status(dir.path(), "closed", Duration::from_secs(10)).await,
        "closed 1002",
        "the instance is told too"
    );
    drop(s);
    wait_gone(&p, Duration::from_secs(5)).await;
    p.assert_one_ended_with(439, "the function broke the protocol")
        .await;
    p.stop().await;
}

/// Reads the numbered binary frames of `slow_instance.py` until its text frame "final <n>":
/// every frame complete, intact and in order, and `n` of them. Returns `n`.
async fn read_numbered_frames(s: &mut TcpStream, pending: &mut Vec<u8>) -> u64 {
    let mut next = 0u64;
    loop {
        let (opcode, data) = read_server_frame(s, pending).await;
        match opcode {
            2 => {
                let seq = u64::from_be_bytes(data[..8].try_into().unwrap());
                assert_eq!(seq, next, "frame {seq} arrived where frame {next} was due");
                assert!(
                    data.len() == 16 * 1024 && data[8..].iter().all(|&b| u64::from(b) == seq % 251),
                    "frame {seq} intact"
                );
                next += 1;
            }
            1 => {
                assert_eq!(String::from_utf8(data).unwrap(), format!("final {next}"));
                return next;
            }
            other => panic!("unexpected opcode {other} after {next} frames"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_an_instance_writes_right_after_its_101_arrive_complete_and_in_order() {
    let dir = instance_dir();
    let p = slow_proxy("burst", dir.path()).await;
    let stream = TcpStream::connect(p.addr).await.unwrap();
    // The instance starts writing the moment its 101 is out, while the proxy is still
    // putting the connection on the zero-hop plane.
    let (mut s, mut pending) = upgrade_raw(&p, stream).await;
    assert_eq!(read_numbered_frames(&mut s, &mut pending).await, 64);
    s.write_all(&masked_frame(true, 8, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    assert_eq!(close_code_after(&mut s, &mut pending).await, 1000);
    drop(s);
    wait_gone(&p, Duration::from_secs(5)).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_pushing_to_a_client_that_stops_reading_is_held_back_and_its_pending_write_completes_once_the_client_reads()
 {
    let dir = instance_dir();
    let p = slow_proxy("push", dir.path()).await;
    let stream = connect_pinned(&p, false).await;
    let (mut s, mut pending) = upgrade_raw(&p, stream).await;
    // The client reads nothing until the instance says its writes stopped progressing.
    let blocked = wait_status(dir.path(), "blocked", Duration::from_secs(10)).await;
    let fields: Vec<u64> = blocked
        .split(' ')
        .skip(1)
        .map(|f| f.parse().unwrap())
        .collect();
    let (pushed, whole_frames, own_queue) = (fields[0], fields[1], fields[2]);
    // What still sits in the instance's own send queue is the instance's memory (as the
    // client's own buffer is in the other direction); the rest is what the proxy path holds.
    let held = pushed - own_queue;
    eprintln!("instance held back after {pushed} bytes, {own_queue} of them in its own socket");
    assert!(
        held <= SLOW_READER_BOUND,
        "the proxy path took {held} bytes for a client that does not read"
    );
    // Now read everything: numbered frames, complete and in order, then the final frame the
    // instance sends once its pending write completed.
    let frames = read_numbered_frames(&mut s, &mut pending).await;
    assert!(
        frames > whole_frames,
        "every frame the instance wrote arrived ({frames} > {whole_frames})"
    );
    wait_status(dir.path(), "final sent", Duration::from_secs(5)).await;
    let status = std::fs::read_to_string(dir.path().join("status")).unwrap();
    assert!(
        status.contains("resumed\n"),
        "the instance's pending write completed once the client read:\n{status}"
    );
    s.write_all(&masked_frame(true, 8, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    assert_eq!(close_code_after(&mut s, &mut pending).await, 1000);
    drop(s);
    wait_gone(&p, Duration::from_secs(5)).await;
    p.stop().await;
}

// --- Fixture programs -----------------------------------------------------------------------

/// Not a test: the Rust instance of `the_instance_closing_first_...`, an echo function like
/// `deploy/examples/echo-rust` (tokio-tungstenite, 0.0.0.0:$PORT) that on the text
/// "close:<code>" closes first with that code and "bye". wsedge spawns this test binary with
/// `rust_instance_that_can_close_first --exact --ignored`; `WSEDGE_INSTANCE`, which wsedge sets
/// for its instances, keeps a plain `cargo test -- --ignored` from serving forever.
#[test]
#[ignore = "an instance program the zero-hop tests spawn through wsedge"]
fn rust_instance_that_can_close_first() {
    if std::env::var_os("WSEDGE_INSTANCE").is_none() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let port = std::env::var("PORT").unwrap_or_else(|_| "9000".into());
        let listener = TcpListener::bind(format!("0.0.0.0:{port}")).await.unwrap();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(serve_echo(stream));
        }
    });
}
