//! The proxy ends connections itself, on both data planes: no frame
//! either way for `idle_timeout_s` closes both sides with 1001 (pings count as activity);
//! `execution_timeout_s` cuts TCP (the client sees 1006, no close frame); SIGTERM's drain
//! closes every WebSocket with 1001. Each case also checks the function status the connection
//! ended with on `/metrics` (455, 433, 200).

#[macro_use]
mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{Message, protocol::frame::coding::CloseCode};
use wsedge::config::DataPlaneMode;

/// Reads past other messages to the close frame; panics if the stream ends without one.
/// Callers bound it with their own deadline.
async fn next_close(ws: &mut Ws) -> Option<CloseCode> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

fn function(instance: SocketAddr, idle_s: u64, execution_s: u64) -> String {
    format!(
        "name = \"echo\"\nroute = \"/echo\"\nupstreams = [\"{instance}\"]\n\
         idle_timeout_s = {idle_s}\nexecution_timeout_s = {execution_s}\n"
    )
}

fn plane(p: DataPlaneMode) -> &'static str {
    match p {
        DataPlaneMode::Kernel => "kernel",
        _ => "userspace",
    }
}

async fn an_idle_connection_is_closed_with_1001_to_both_sides(p: DataPlaneMode) {
    let (instance, mut closes) = recording_instance().await;
    let proxy = start_proxy(function_config(plane(p), "", &function(instance, 10, 600))).await;
    let mut ws = connect(proxy.url("/echo")).await.unwrap();
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::text("hi"));
    // Pings are activity: at 12 s the connection is open although no message flowed for 10 s.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(4)).await;
        ws.send(Message::Ping(b"alive".to_vec().into()))
            .await
            .unwrap();
    }
    assert_eq!(proxy.connections().await.len(), 1, "pings keep it open");
    let close = tokio::time::timeout(Duration::from_secs(12), next_close(&mut ws))
        .await
        .expect("closed after the idle timeout");
    assert_eq!(close, Some(CloseCode::Away));
    let to_instance = tokio::time::timeout(Duration::from_secs(5), closes.recv())
        .await
        .unwrap();
    assert_eq!(to_instance, Some(1001), "the instance is told too");
    drop(ws);
    proxy.wait_no_connections().await;
    proxy
        .assert_one_ended_with(455, "no frame either way for idle_timeout_s")
        .await;
    proxy.stop().await;
}

async fn the_execution_timeout_cuts_tcp_without_a_close_frame(p: DataPlaneMode) {
    let (instance, _closes) = recording_instance().await;
    let proxy = start_proxy(function_config(plane(p), "", &function(instance, 10, 10))).await;
    let mut ws = connect(proxy.url("/echo")).await.unwrap();
    let started = std::time::Instant::now();
    let ended: Result<(), _> = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            // Busy all along: only the execution limit can end it.
            ws.send(Message::text("tick")).await?;
            match tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => panic!("a close frame: {frame:?}"),
                Ok(Some(Ok(_))) => tokio::time::sleep(Duration::from_millis(500)).await,
                Ok(Some(Err(e))) => return Err(e),
                Ok(None) | Err(_) => {
                    return Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed);
                }
            }
        }
    })
    .await
    .expect("cut within the limit");
    assert!(ended.is_err());
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    drop(ws);
    proxy.wait_no_connections().await;
    proxy
        .assert_one_ended_with(433, "open longer than execution_timeout_s")
        .await;
    proxy.stop().await;
}

async fn the_drain_closes_every_websocket_with_1001_and_they_end_with_200(p: DataPlaneMode) {
    let (instance, mut closes) = recording_instance().await;
    let mut config = function_config(plane(p), "", &function(instance, 600, 7200));
    config.server.drain_timeout_s = 10;
    // The pending upgrade below must outlast the test up to the drain.
    config.server.handshake_timeout_ms = 30_000;
    let mut proxy = start_proxy(config).await;
    // Keeps the drain, and /metrics, going until the ends below are counted.
    let pending = PendingUpgrade::start(proxy.addr).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut ws = connect(proxy.url("/echo")).await.unwrap();
        ws.send(Message::text("hi")).await.unwrap();
        assert_eq!(recv(&mut ws).await, Message::text("hi"));
        clients.push(ws);
    }
    proxy.begin_stop();
    for ws in &mut clients {
        let close = tokio::time::timeout(Duration::from_secs(5), next_close(ws))
            .await
            .expect("closed at the start of the drain");
        assert_eq!(close, Some(CloseCode::Away));
    }
    for _ in 0..3 {
        let code = tokio::time::timeout(Duration::from_secs(5), closes.recv())
            .await
            .unwrap();
        assert_eq!(code, Some(1001), "every instance is told");
    }
    drop(clients);
    proxy
        .assert_ended_with(200, 3, "a connection the drain closed ends with 200")
        .await;
    pending.finish_with_503().await;
    tokio::time::timeout(Duration::from_secs(8), proxy.stop())
        .await
        .expect("the drain ends once every connection closed");
}

on_both_planes!(
    an_idle_connection_is_closed_with_1001_to_both_sides,
    the_execution_timeout_cuts_tcp_without_a_close_frame,
    the_drain_closes_every_websocket_with_1001_and_they_end_with_200,
);
