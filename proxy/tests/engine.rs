//! What the connection engine promises beyond the frame contract: `max_connections` refuses
//! with 503 before the upgrade; a connection the kernel maps have no room for is carried by
//! the userspace relay with the same policy (never a 101 followed by an abort); and after
//! the proxy ends a zero-hop connection, nothing of it outlives the close grace, even when
//! the client never sends FIN.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_tungstenite::tungstenite::Message;
use wsedge::config::DataPlaneMode;

/// Waits (5 s at most) until `/connections` lists `n` connections; returns their planes.
async fn planes(p: &Proxy, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let conns = p.connections().await;
        if conns.len() == n {
            let mut planes: Vec<String> = conns.into_iter().map(|c| c.data_plane).collect();
            planes.sort();
            return planes;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} connections: {conns:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn max_connections_refuses_with_503_before_the_upgrade(plane: DataPlaneMode) {
    let echo = start_echo().await;
    let p = start_proxy(config(plane, echo, "max_connections = 1")).await;
    let mut first = open(&p).await;
    echo_once(&mut first, "the one allowed").await;
    let (status, error_type, body) = exchange(p.addr, UPGRADE.as_bytes()).await;
    assert_eq!(
        (status, error_type.as_str()),
        (503, "at_capacity"),
        "{body}"
    );
    first.close(None).await.unwrap();
    p.wait_no_connections().await;
    let mut next = open(&p).await;
    echo_once(&mut next, "a place came back").await;
    next.close(None).await.unwrap();
    p.wait_no_connections().await;
    let metrics = p.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("status=\"503\"") && l.ends_with(" 1")),
        "the refusal is counted once: {metrics}"
    );
    p.stop().await;
}

on_both_planes!(max_connections_refuses_with_503_before_the_upgrade);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_kernel_maps_cannot_hold_is_relayed_with_the_same_policy() {
    let echo = start_echo().await;
    let extra = "kernel_map_connections = 1";
    let mut cfg = config(DataPlaneMode::Kernel, echo, extra);
    cfg.functions[0].limits.max_message_bytes = 1024;
    let p = start_proxy(cfg).await;
    let mut spliced = open(&p).await;
    echo_once(&mut spliced, "in the kernel").await;
    assert_eq!(planes(&p, 1).await, ["kernel"]);
    // The maps hold one connection: the second is upgraded and carried by the relay.
    let mut relayed = open(&p).await;
    echo_once(&mut relayed, "in userspace").await;
    assert_eq!(planes(&p, 2).await, ["kernel", "userspace"]);
    echo_once(&mut spliced, "the first still in the kernel").await;
    // The same message limit on the relayed one: 1009, status 429.
    relayed
        .send(Message::binary(vec![7u8; 2048]))
        .await
        .unwrap();
    assert_eq!(
        proxy_close_code(&mut relayed, Duration::from_secs(5)).await,
        Some(1009)
    );
    drop(relayed);
    assert_eq!(planes(&p, 1).await, ["kernel"]);
    p.assert_one_ended_with(429, "the relayed connection's message over the limit")
        .await;
    spliced.close(None).await.unwrap();
    p.wait_no_connections().await;
    p.stop().await;
}

/// A zero-hop proxy whose function is the Rust example, spawned by wsedge.
async fn zero_hop_proxy() -> Proxy {
    let command = format!("{:?}", echo_fn().display().to_string());
    let function = format!("name = \"echo\"\nroute = \"/echo\"\ncommand = [{command}]\n");
    let mut config = function_config("kernel", "", &function);
    config.server.drain_timeout_s = 10;
    start_proxy(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_hop_client_that_never_sends_fin_is_let_go_within_the_close_grace() {
    let mut p = zero_hop_proxy().await;
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut s, mut pending) = tokio::time::timeout(Duration::from_secs(20), async {
        let mut s = stream;
        s.write_all(UPGRADE.as_bytes()).await.unwrap();
        let (head, pending) = read_response_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        (s, pending)
    })
    .await
    .expect("upgraded in time (cold start included)");
    assert_eq!(planes(&p, 1).await, ["kernel-zero-hop"]);
    s.write_all(&masked_frame(true, 1, b"hello")).await.unwrap();
    assert_eq!(
        read_server_frame(&mut s, &mut pending).await,
        (1, b"hello".to_vec())
    );
    // The drain closes it with 1001. The client does not answer with a close: it sends a
    // data frame (which the kernel now hands to userspace) and keeps TCP open.
    p.begin_stop();
    let (opcode, payload) = read_server_frame(&mut s, &mut pending).await;
    assert_eq!((opcode, &payload[..2]), (8, &1001u16.to_be_bytes()[..]));
    let closed_at = Instant::now();
    // The kernel delivers the first frame after the stop and holds the stream at the next
    // boundary: the second is userspace's to relay (or drop, the connection being over).
    s.write_all(&masked_frame(true, 1, b"still here"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(&masked_frame(true, 1, b"and here"))
        .await
        .unwrap();
    // The proxy's FIN follows its close frame at once; what counts is that it lets the
    // socket go within the close grace: from then on, what the client sends meets a reset.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the proxy's FIN")
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(closed_at.elapsed())).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    let reset = loop {
        if s.write_all(&masked_frame(true, 1, b"anyone?"))
            .await
            .is_err()
        {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        reset,
        "6 s after the proxy's close the client's writes are still taken: its socket is held"
    );
    tokio::time::timeout(Duration::from_secs(8), p.stop())
        .await
        .expect("the drain ends without waiting for its 10 s limit");
}
