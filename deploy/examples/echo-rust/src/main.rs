//! The demo function, written the way the platform docs show: a WebSocket server on
//! 0.0.0.0:$PORT (9000 when unset) that echoes every data message back.

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let port = std::env::var("PORT").unwrap_or_else(|_| "9000".into());
    let listener = TcpListener::bind(format!("0.0.0.0:{port}")).await?;
    eprintln!("echo function listening on 0.0.0.0:{port}");
    loop {
        let (stream, peer) = listener.accept().await?;
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                eprintln!("{peer}: handshake failed");
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                    break;
                }
            }
        });
    }
}
