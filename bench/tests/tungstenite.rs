//! A third-party client (tokio-tungstenite) must accept the echo server: proof that the
//! backend used in benchmarks speaks conforming WebSocket, not just our own dialect.

mod common;

use std::time::Duration;

use common::Echo;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test]
async fn tungstenite_client_talks_to_echo() {
    let echo = Echo::start(1);
    let url = echo.url();
    let run = async move {
        let (mut ws, resp) = tokio_tungstenite::connect_async(url).await.unwrap();
        assert_eq!(resp.status(), 101);

        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));

        let big: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
        ws.send(Message::binary(big.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(big));

        ws.send(Message::Ping(b"are you there".to_vec().into()))
            .await
            .unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Pong(b"are you there".to_vec().into())
        );

        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        };
        ws.send(Message::Close(Some(frame.clone()))).await.unwrap();
        match ws.next().await.unwrap().unwrap() {
            Message::Close(Some(got)) => assert_eq!(got, frame),
            other => panic!("expected close, got {other:?}"),
        }
        // The server then closes the TCP connection.
        assert!(ws.next().await.is_none());
    };
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("exchange timed out");
}

#[tokio::test]
async fn tungstenite_client_is_pushed_timestamped_messages() {
    let echo = Echo::start(1);
    let url = format!("{}?rate=50&size=512", echo.push_url());
    let run = async move {
        let (mut ws, resp) = tokio_tungstenite::connect_async(url).await.unwrap();
        assert_eq!(resp.status(), 101);
        let mut stamps = Vec::new();
        while stamps.len() < 5 {
            match ws.next().await.unwrap().unwrap() {
                Message::Binary(b) => {
                    assert_eq!(b.len(), 512);
                    stamps.push(u64::from_le_bytes(b[..8].try_into().unwrap()));
                }
                other => panic!("expected a pushed binary message, got {other:?}"),
            }
        }
        let now = bench::sys::monotonic_ns();
        assert!(stamps.windows(2).all(|w| w[0] < w[1]), "{stamps:?}");
        assert!(stamps[0] < now && stamps[4] <= now, "{stamps:?} now {now}");
        // 50/s: the backend sends each connection's next message a period (20 ms) after the
        // last was due, or after it went out when it fell behind, so four gaps span at least
        // 3 periods less the send slack; this checks 2 periods. A slow machine only widens the
        // gaps; a backend ignoring the rate would send all five within a millisecond.
        assert!(stamps[4] - stamps[0] >= 40_000_000, "{stamps:?}");
        // What the client sends is still echoed, between the pushes.
        ws.send(Message::text("still an echo server"))
            .await
            .unwrap();
        loop {
            match ws.next().await.unwrap().unwrap() {
                Message::Binary(_) => {}
                m => break assert_eq!(m, Message::text("still an echo server")),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("push timed out");
}

#[tokio::test]
async fn bad_push_parameters_are_refused() {
    let echo = Echo::start(1);
    let url = format!("{}?rate=0", echo.push_url());
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("the echo server answered within 10 s")
    .unwrap_err();
    assert!(
        matches!(&err, tokio_tungstenite::tungstenite::Error::Http(r) if r.status() == 400),
        "{err:?}"
    );
}
