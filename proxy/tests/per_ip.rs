//! `max_connections_per_ip`: a client over its limit gets 429 as soon as it is accepted,
//! without sending anything; IPv4 clients count per address, also on a dual-stack listener
//! (where they arrive as IPv4-mapped IPv6 addresses), and IPv6 clients per /64.

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};
use wsedge::config::DataPlaneMode;

/// Well under `handshake_timeout_ms` below: a 429 within it was not sent after a timeout.
const AT_ONCE: Duration = Duration::from_secs(3);

/// Connects from `from` to `to`, sends nothing, and reads until the proxy closes, within
/// [`AT_ONCE`]; returns the parsed error response.
async fn silent_client(from: SocketAddr, to: SocketAddr) -> (u16, String, serde_json::Value) {
    let socket = match from {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .unwrap();
    socket.bind(from).unwrap();
    let mut s = socket.connect(to).await.unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(AT_ONCE, s.read_to_end(&mut out))
        .await
        .unwrap_or_else(|_| panic!("no answer and close within {AT_ONCE:?} of connecting"))
        .unwrap();
    assert!(started.elapsed() < AT_ONCE);
    parse_error_response(&out)
}

/// Sends the upgrade from `from` and returns the status line's code.
async fn upgrade_from(from: SocketAddr, to: SocketAddr) -> (u16, TcpStream) {
    let socket = match from {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .unwrap();
    socket.bind(from).unwrap();
    let mut s = socket.connect(to).await.unwrap();
    s.write_all(UPGRADE.as_bytes()).await.unwrap();
    let (head, _) = read_response_head(&mut s).await;
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, s)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn a_client_over_its_limit_gets_429_at_once_without_sending_its_request() {
    let echo = start_echo().await;
    let p = start_proxy(config(
        DataPlaneMode::Kernel,
        echo,
        "max_connections_per_ip = 1\nhandshake_timeout_ms = 30000",
    ))
    .await;
    let mut held = open(&p).await;
    echo_once(&mut held, "held").await;

    let (status, error_type, body) = silent_client(addr("127.0.0.1:0"), p.addr).await;
    assert_eq!((status, error_type.as_str()), (429, "too_many_connections"));
    assert!(
        body["message"].as_str().unwrap().contains("127.0.0.1"),
        "{body}"
    );
    // A client that does send its request gets the same answer (nothing is lost to a reset).
    for _ in 0..5 {
        let (status, error_type, _) = exchange(p.addr, UPGRADE.as_bytes()).await;
        assert_eq!((status, error_type.as_str()), (429, "too_many_connections"));
    }
    // Before its request was read the function is unknown: counted without one, as a 404.
    let metrics = p.metrics().await;
    let series = "wsedge_handshake_errors_total{function=\"\",status=\"429\",\
                  error_type=\"too_many_connections\"}";
    assert_eq!(metric_value(&metrics, series), Some(6), "{metrics}");
    // The refusals took nothing from the client's one connection.
    echo_once(&mut held, "still here").await;
    held.close(None).await.unwrap();
    read_to_end_of(&mut held).await;
    drop(held);
    p.wait_no_connections().await;
    let mut again = open(&p).await;
    echo_once(&mut again, "the slot came back").await;
    p.stop().await;
}

#[tokio::test]
async fn on_a_dual_stack_listener_ipv4_clients_count_per_address_and_ipv6_per_64() {
    let echo = start_echo().await;
    let mut config = config(
        DataPlaneMode::Userspace,
        echo,
        "max_connections_per_ip = 1\nhandshake_timeout_ms = 30000",
    );
    config.server.listen = addr("[::]:0");
    let p = start_proxy(config).await;
    let port = p.addr.port();
    let v4 = addr(&format!("127.0.0.1:{port}"));
    let v6 = addr(&format!("[::1]:{port}"));

    // 127.0.0.1 arrives as ::ffff:127.0.0.1; it holds the one connection of 127.0.0.1.
    let (status, _held_v4) = upgrade_from(addr("127.0.0.1:0"), v4).await;
    assert_eq!(status, 101);
    let (status, error_type, body) = silent_client(addr("127.0.0.1:0"), v4).await;
    assert_eq!((status, error_type.as_str()), (429, "too_many_connections"));
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .ends_with("from 127.0.0.1"),
        "counted as the IPv4 address: {body}"
    );
    // Another IPv4 address is another client, though both are mapped into one IPv6 /64.
    let (status, _held_v4b) = upgrade_from(addr("127.0.0.2:0"), v4).await;
    assert_eq!(status, 101, "127.0.0.2 is not 127.0.0.1's client");
    // ::1 is its own client; a second connection from its /64 is over the limit.
    let (status, _held_v6) = upgrade_from(addr("[::1]:0"), v6).await;
    assert_eq!(status, 101);
    let (status, error_type, body) = silent_client(addr("[::1]:0"), v6).await;
    assert_eq!((status, error_type.as_str()), (429, "too_many_connections"));
    assert!(
        body["message"].as_str().unwrap().ends_with("from ::/64"),
        "counted as the /64: {body}"
    );
    p.stop().await;
}
