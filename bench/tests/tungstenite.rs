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
