//! The platform's per-connection quotas, the same cases on every data plane: the userspace
//! relay, the two-socket kernel splice, zero-hop (a spawned instance) and `wss://`.
//! Throttling delivers every frame, in order, at the rate; `on_exceed = "close"` closes with
//! 1008 to the client and 1001 to the function (status 429); messages up to 16 MiB pass
//! when `max_message_bytes` allows them; the counters equal the bytes the client sent.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::{tls::*, *};
use futures_util::SinkExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, protocol::WebSocketConfig},
};
use wsedge::config::{Config, DataPlaneMode, OnExceed};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plane {
    Userspace,
    Kernel,
    ZeroHop,
    Tls,
}

impl Plane {
    /// Whether `/connections` names the plane so: `wss://` is relayed over kernel TLS where
    /// the kernel has it (`userspace-ktls`), else with rustls (`userspace-tls`).
    fn reported_as(self, name: &str) -> bool {
        match self {
            Plane::Userspace => name == "userspace",
            Plane::Kernel => name == "kernel",
            Plane::ZeroHop => name == "kernel-zero-hop",
            Plane::Tls => name == "userspace-tls" || name == "userspace-ktls",
        }
    }

    /// Whether the test's own instance records the close code the function received (the
    /// zero-hop instance is the spawned example function).
    fn records_function_close(self) -> bool {
        self != Plane::ZeroHop
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Client = WebSocketStream<Box<dyn Io>>;

/// wsedge on `plane` with the function's limits set by `limits`; for the planes with an
/// upstream instance, the close codes that instance receives.
struct Setup {
    proxy: Proxy,
    plane: Plane,
    ca: Option<TestCa>,
    function_closes: Option<tokio::sync::mpsc::UnboundedReceiver<u16>>,
}

async fn setup(plane: Plane, limits: impl Fn(&mut wsedge::config::Limits)) -> Setup {
    let (mut config, ca, closes): (Config, _, _) = match plane {
        Plane::ZeroHop => {
            let command = format!("{:?}", echo_fn().display().to_string());
            let function = format!(
                "name = \"echo\"\nroute = \"/echo\"\ncommand = [{command}]\n[function.limits]\n"
            );
            (function_config("kernel", "", &function), None, None)
        }
        _ => {
            let (upstream, closes) = recording_instance().await;
            let (mode, server, ca) = match plane {
                Plane::Userspace => (DataPlaneMode::Userspace, String::new(), None),
                Plane::Kernel => (DataPlaneMode::Kernel, String::new(), None),
                _ => {
                    let ca = TestCa::new();
                    let leaf = ca.leaf("localhost", &["localhost"]);
                    let lines = tls_server_lines(&[&leaf], "");
                    (DataPlaneMode::Auto, lines, Some(ca))
                }
            };
            let mut config = config(mode, upstream, &server);
            config.functions[0].limits = Default::default();
            (config, ca, Some(closes))
        }
    };
    limits(&mut config.functions[0].limits);
    config.validate().unwrap();
    Setup {
        proxy: start_proxy(config).await,
        plane,
        ca,
        function_closes: closes,
    }
}

impl Setup {
    /// The ledger's one row (`/billing`), once the connection's end is written there.
    async fn finished_row(&self) -> wsedge::ledger::LedgerRow {
        let rows = billing_until(
            self.proxy.admin,
            |rows| rows.iter().any(|r| r.status.is_some()),
            "a finished ledger row",
        )
        .await;
        assert_eq!(rows.len(), 1, "{rows:?}");
        rows.into_iter().next().unwrap()
    }

    async fn open(&self) -> Client {
        // The client must not be the limit: messages up to 16 MiB.
        let big = WebSocketConfig::default()
            .max_message_size(Some(32 << 20))
            .max_frame_size(Some(32 << 20));
        let (stream, url): (Box<dyn Io>, String) = match &self.ca {
            None => {
                let tcp = tokio::net::TcpStream::connect(self.proxy.addr)
                    .await
                    .unwrap();
                (Box::new(tcp), self.proxy.url("/echo"))
            }
            Some(ca) => {
                let addr = self.proxy.tls_addr.expect("tls_listen bound");
                let tls = tls_connect(ca, addr, "localhost").await.unwrap();
                (
                    Box::new(tls),
                    format!("wss://localhost:{}/echo", addr.port()),
                )
            }
        };
        let (ws, response) = tokio::time::timeout(
            Duration::from_secs(20),
            tokio_tungstenite::client_async_with_config(url.as_str(), stream, Some(big)),
        )
        .await
        .expect("upgraded in time (cold start included)")
        .expect("upgrade succeeds");
        assert_eq!(response.status(), 101);
        ws
    }

    async fn only_connection(&self) -> wsedge::conn::ConnectionView {
        let conns = self.proxy.connections().await;
        assert_eq!(conns.len(), 1, "{conns:?}");
        conns.into_iter().next().unwrap()
    }

    /// The close code the function's side received, where the test's instance records it.
    async fn function_close(&mut self) -> Option<u16> {
        let closes = self.function_closes.as_mut()?;
        Some(
            tokio::time::timeout(Duration::from_secs(10), closes.recv())
                .await
                .expect("the function got a close frame in time")
                .expect("the recording instance runs"),
        )
    }
}

/// Wire bytes of a masked client frame with `len` payload bytes.
fn client_wire(len: usize) -> u64 {
    let header = match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    };
    (len + header + 4) as u64
}

async fn thirty_quick_messages_arrive_in_order_at_ten_per_second(plane: Plane) {
    // The defaults: 10 messages/s and 128 KB/s, throttled.
    let s = setup(plane, |_| {}).await;
    let mut ws = s.open().await;
    let start = Instant::now();
    for i in 0..30 {
        ws.feed(Message::text(format!("message {i}")))
            .await
            .unwrap();
    }
    ws.flush().await.unwrap();
    let mut arrivals = Vec::new();
    for i in 0..30 {
        assert_eq!(recv(&mut ws).await, Message::text(format!("message {i}")));
        arrivals.push(start.elapsed());
    }
    // Two pass at once (the 100 ms tolerance), then one per 100 ms: 2.8 s for the last.
    let last = arrivals[29];
    assert!(
        last >= Duration::from_millis(2500) && last < Duration::from_secs(8),
        "the 30th arrived after {last:?}"
    );
    let early = arrivals
        .iter()
        .filter(|t| **t < Duration::from_millis(500))
        .count();
    assert!(
        early <= 6,
        "{early} of 30 arrived in the first 500 ms: {arrivals:?}"
    );
    let c = s.only_connection().await;
    assert!(s.plane.reported_as(&c.data_plane), "{:?}: {c:?}", s.plane);
    assert_eq!(c.messages_in, 30, "{c:?}");
    let sent: u64 = (0..30)
        .map(|i| client_wire(format!("message {i}").len()))
        .sum();
    assert_eq!(c.bytes_in, sent, "{c:?}");
    assert!(c.throttled_ms >= 1500, "{c:?}");
    ws.close(None).await.unwrap();
    read_to_end_of(&mut ws).await;
    s.proxy
        .assert_one_ended_with(200, "a throttled connection ends normally")
        .await;
    // The ledger bills exactly what the client sent, and how long it was held back.
    let row = s.finished_row().await;
    // `close(None)` sends a close frame without a code: 1005 on receipt, a plain close.
    assert_eq!(
        (row.status, row.close_code),
        (Some(200), Some(1005)),
        "{row:?}"
    );
    assert_eq!(
        (row.bytes_in, row.messages_in),
        (sent + 6, 30),
        "{row:?} (+ the close)"
    );
    assert!(row.throttled_ms >= 1500, "{row:?}");
    s.proxy.stop().await;
}

async fn a_client_over_its_rate_with_close_gets_1008_and_the_function_1001(plane: Plane) {
    let mut s = setup(plane, |l| l.on_exceed = OnExceed::Close).await;
    let mut ws = s.open().await;
    // Two are within the tolerance; the third in the same instant is over the rate.
    for i in 0..5 {
        ws.feed(Message::text(format!("burst {i}"))).await.unwrap();
    }
    ws.flush().await.unwrap();
    // The echoes of the first two may or may not beat the proxy's close: it closes at once.
    assert_eq!(
        proxy_close_code(&mut ws, Duration::from_secs(10)).await,
        Some(1008)
    );
    if s.plane.records_function_close() {
        assert_eq!(s.function_close().await, Some(1001));
    }
    drop(ws);
    s.proxy
        .assert_one_ended_with(429, "a rate close is status 429")
        .await;
    let row = s.finished_row().await;
    assert_eq!(
        (row.status, row.close_code, row.closed_by.as_deref()),
        (Some(429), Some(1008), Some("proxy")),
        "{row:?}"
    );
    s.proxy.stop().await;
}

async fn a_byte_rate_holds_large_messages_back_and_loses_none(plane: Plane) {
    let s = setup(plane, |l| {
        l.messages_per_s = 0;
        l.bytes_per_s = 256 * 1024;
    })
    .await;
    let mut ws = s.open().await;
    let start = Instant::now();
    let messages: Vec<Vec<u8>> = (0..4u8)
        .map(|k| (0..256 * 1024).map(|i| (i as u8) ^ k).collect())
        .collect();
    for m in &messages {
        ws.feed(Message::binary(m.clone())).await.unwrap();
    }
    ws.flush().await.unwrap();
    for m in &messages {
        assert_eq!(recv(&mut ws).await, Message::binary(m.clone()));
    }
    // Each costs a little over a second at 256 KiB/s; the fourth waits for the first three.
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(2700), "took {took:?}");
    let c = s.only_connection().await;
    assert_eq!(c.bytes_in, 4 * client_wire(256 * 1024), "{c:?}");
    assert_eq!(c.messages_in, 4, "{c:?}");
    ws.close(None).await.unwrap();
    read_to_end_of(&mut ws).await;
    s.proxy
        .assert_one_ended_with(200, "throttled, then closed")
        .await;
    s.proxy.stop().await;
}

async fn a_four_mib_message_passes_when_the_limit_allows_it_and_one_byte_more_is_1009(
    plane: Plane,
) {
    let mut s = setup(plane, |l| {
        l.max_message_bytes = 4 << 20;
        l.messages_per_s = 0;
        l.bytes_per_s = 0;
    })
    .await;
    let mut ws = s.open().await;
    let big: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 253) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::binary(big));
    let c = s.only_connection().await;
    assert_eq!(c.bytes_in, client_wire(4 << 20), "{c:?}");
    assert_eq!(c.bytes_out, (4 << 20) + 10, "{c:?}");
    let over = vec![7u8; (4 << 20) + 1];
    // The proxy closes at the frame's header, while the client may still be writing it.
    let _ = ws.send(Message::binary(over)).await;
    assert_eq!(
        proxy_close_code(&mut ws, Duration::from_secs(10)).await,
        Some(1009)
    );
    if s.plane.records_function_close() {
        assert_eq!(s.function_close().await, Some(1009));
    }
    drop(ws);
    s.proxy
        .assert_one_ended_with(429, "a message over the limit")
        .await;
    s.proxy.stop().await;
}

async fn pings_are_no_messages_but_a_ping_flood_meets_the_byte_quota(plane: Plane) {
    let s = setup(plane, |l| {
        l.on_exceed = OnExceed::Close;
        l.bytes_per_s = 4096;
    })
    .await;
    let mut ws = s.open().await;
    // Pings at about 2 KB/s pass (each 106 wire bytes, 60 ms apart), and none is a message.
    for _ in 0..5 {
        ws.send(Message::Ping(vec![1u8; 100].into())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    ws.send(Message::text("still here")).await.unwrap();
    loop {
        match recv(&mut ws).await {
            Message::Pong(_) => continue,
            other => break assert_eq!(other, Message::text("still here")),
        }
    }
    let c = s.only_connection().await;
    assert_eq!(c.messages_in, 1, "pings are not messages: {c:?}");
    for _ in 0..200 {
        if ws.send(Message::Ping(vec![2u8; 125].into())).await.is_err() {
            break;
        }
    }
    assert_eq!(
        proxy_close_code(&mut ws, Duration::from_secs(10)).await,
        Some(1008)
    );
    drop(ws);
    s.proxy
        .assert_one_ended_with(429, "a ping flood over the byte rate")
        .await;
    s.proxy.stop().await;
}

macro_rules! on_every_plane {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use super::*;

                async fn run(plane: Plane) {
                    tokio::time::timeout(common::CASE_DEADLINE, super::$name(plane))
                        .await
                        .expect("the case finished within its deadline");
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn userspace() {
                    run(Plane::Userspace).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn kernel() {
                    run(Plane::Kernel).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn zero_hop() {
                    run(Plane::ZeroHop).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn tls() {
                    run(Plane::Tls).await
                }
            }
        )*
    };
}

on_every_plane!(
    thirty_quick_messages_arrive_in_order_at_ten_per_second,
    a_client_over_its_rate_with_close_gets_1008_and_the_function_1001,
    a_byte_rate_holds_large_messages_back_and_loses_none,
    a_four_mib_message_passes_when_the_limit_allows_it_and_one_byte_more_is_1009,
    pings_are_no_messages_but_a_ping_flood_meets_the_byte_quota,
);
