//! A peer that stops reading: neither side can make the proxy (or the kernel on its behalf)
//! hold more than a bounded amount of data. The relay applies TCP back-pressure end to end (the
//! writer blocks). The kernel splice cannot be relied on to (measured before the bound existed:
//! a client pushed 3.2 GB into kernel memory in 5 s toward an instance that did not read), so
//! it fails the connection once `MAX_BACKLOG_BYTES` redirected bytes wait for the peer.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::*;
use proxy_common::maps::MAX_BACKLOG_BYTES;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use wsedge::{config::DataPlaneMode, protocols::handshake::accept_for};

/// Far more than any bound the proxy keeps (its own buffers plus the kernel's).
const CEILING: u64 = 64 * 1024 * 1024;

/// An instance that completes the handshake, then either never reads (`push = false`) or
/// writes binary frames as fast as it can without ever reading (`push = true`). Reports how
/// many bytes it got rid of.
async fn stalled_instance(
    push: bool,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Receiver<u64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let (head, _) = read_request_head(&mut s).await;
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .unwrap()
            .trim()
            .to_string();
        let response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            accept_for(&key)
        );
        s.write_all(response.as_bytes()).await.unwrap();
        let pushed = if push {
            let mut frame = vec![0x82, 126, 0xEA, 0x60];
            frame.extend(std::iter::repeat_n(7u8, 60000));
            push_until_blocked(&mut s, &frame).await
        } else {
            tokio::time::sleep(Duration::from_secs(8)).await;
            0
        };
        let _ = done_tx.send(pushed);
        // Keep the socket open until the test is over.
        tokio::time::sleep(Duration::from_secs(8)).await;
    });
    (addr, done_rx)
}

async fn read_request_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return (String::from_utf8(buf).unwrap(), rest);
        }
    }
}

/// Writes `frame` repeatedly until a write makes no progress for a second, the connection
/// fails, or 5 s pass; returns the bytes the socket accepted.
async fn push_until_blocked(s: &mut TcpStream, frame: &[u8]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut pushed = 0u64;
    while Instant::now() < deadline && pushed < 2 * CEILING {
        // Continue where the last (possibly partial) write stopped: frames stay whole.
        let at = (pushed % frame.len() as u64) as usize;
        match tokio::time::timeout(Duration::from_secs(1), s.write(&frame[at..])).await {
            Ok(Ok(n)) if n > 0 => pushed += n as u64,
            _ => break,
        }
    }
    pushed
}

async fn proxy_to(plane: DataPlaneMode, instance: std::net::SocketAddr) -> Proxy {
    start_proxy(config(plane, instance, "")).await
}

async fn open_raw(p: &Proxy) -> TcpStream {
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(UPGRADE.as_bytes()).await.unwrap();
    let (head, _) = read_response_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

async fn a_client_flooding_an_instance_that_does_not_read_is_bounded(plane: DataPlaneMode) {
    let (instance, _) = stalled_instance(false).await;
    let p = proxy_to(plane, instance).await;
    let mut client = open_raw(&p).await;
    let pushed = push_until_blocked(&mut client, &masked_frame(true, 2, &[9u8; 60000])).await;
    assert!(
        pushed < CEILING,
        "{plane:?}: the client pushed {pushed} bytes"
    );
    match plane {
        DataPlaneMode::Kernel => {
            assert!(
                pushed > MAX_BACKLOG_BYTES,
                "the bound is not hit early: {pushed}"
            );
            p.wait_no_connections().await;
        }
        _ => assert_eq!(
            p.connections().await.len(),
            1,
            "the relay blocks, it does not cut"
        ),
    }
    p.stop().await;
}

async fn an_instance_pushing_to_a_client_that_does_not_read_is_bounded(plane: DataPlaneMode) {
    let (instance, pushed) = stalled_instance(true).await;
    let p = proxy_to(plane, instance).await;
    let _client = open_raw(&p).await;
    let pushed = tokio::time::timeout(Duration::from_secs(10), pushed)
        .await
        .unwrap()
        .unwrap();
    assert!(
        pushed < CEILING,
        "{plane:?}: the instance pushed {pushed} bytes"
    );
    // The kernel either held the instance back (its socket's receive window closed) or cut
    // the connection at the bound; the relay always holds it back.
    if plane == DataPlaneMode::Userspace {
        assert_eq!(p.connections().await.len(), 1);
    }
    p.stop().await;
}

async fn a_connection_stuck_on_a_client_that_does_not_read_still_ends_when_idle(
    plane: DataPlaneMode,
) {
    let (instance, pushed) = stalled_instance(true).await;
    let plane_name = if plane == DataPlaneMode::Kernel {
        "kernel"
    } else {
        "userspace"
    };
    let function = format!(
        "name = \"echo\"\nroute = \"/echo\"\nupstreams = [\"{instance}\"]\nidle_timeout_s = 10\n"
    );
    let p = start_proxy(function_config(plane_name, "", &function)).await;
    let _client = open_raw(&p).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), pushed).await;
    // Nothing moves any more; the idle timer must still end it, although a write (relay) or
    // the kernel's backlog toward the client is stuck.
    let mut ended = false;
    for _ in 0..100 {
        if p.connections().await.is_empty() {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(ended, "{plane:?}: still open: {:?}", p.connections().await);
    p.stop().await;
}

on_both_planes!(
    a_connection_stuck_on_a_client_that_does_not_read_still_ends_when_idle,
    a_client_flooding_an_instance_that_does_not_read_is_bounded,
    an_instance_pushing_to_a_client_that_does_not_read_is_bounded,
);
