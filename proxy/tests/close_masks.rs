//! The proxy's own close frames toward the instance (here: the drain's 1001) are masked, as
//! a client's must be, each with its own key from a CSPRNG, and unmask to the right code; on
//! both data planes.

mod common;

use std::{collections::HashSet, net::SocketAddr};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use wsedge::{config::DataPlaneMode, protocols::handshake::accept_for};

/// One close frame as it arrived: its masking key and its unmasked payload.
type RawClose = (Option<[u8; 4]>, Vec<u8>);

/// An instance that answers the upgrade by hand, then reports the first frame it receives
/// exactly as it was on the wire.
async fn raw_instance() -> (SocketAddr, mpsc::UnboundedReceiver<RawClose>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream, tx.clone()));
        }
    });
    (addr, rx)
}

async fn serve(mut s: TcpStream, tx: mpsc::UnboundedSender<RawClose>) {
    let (head, mut pending) = read_response_head(&mut s).await;
    let key = header_value(&head, "sec-websocket-key").expect("a key");
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_for(&key)
    );
    s.write_all(answer.as_bytes()).await.unwrap();
    let mut chunk = [0u8; 256];
    loop {
        if pending.len() >= 2 {
            let masked = pending[1] & 0x80 != 0;
            let len = usize::from(pending[1] & 0x7f);
            let header = 2 + if masked { 4 } else { 0 };
            assert!(len < 126, "a close frame is short");
            if pending.len() >= header + len {
                assert_eq!(pending[0], 0x88, "the first frame is the proxy's close");
                let mask: Option<[u8; 4]> = masked.then(|| pending[2..6].try_into().unwrap());
                let payload = pending[header..header + len]
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ mask.map_or(0, |m| m[i % 4]))
                    .collect();
                let _ = tx.send((mask, payload));
                // Stay until the proxy ends the connection.
                while matches!(s.read(&mut chunk).await, Ok(n) if n > 0) {}
                return;
            }
        }
        match s.read(&mut chunk).await {
            Ok(n) if n > 0 => pending.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    }
}

async fn each_proxy_close_toward_the_instance_has_its_own_random_mask(plane: DataPlaneMode) {
    let (instance, mut closes) = raw_instance().await;
    let p = start_proxy(config(plane, instance, "")).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(open(&p).await);
    }
    let stopped = tokio::spawn(p.stop());
    let mut masks = HashSet::new();
    for _ in 0..3 {
        let (mask, payload) = tokio::time::timeout(WAIT, closes.recv())
            .await
            .expect("the instance got the proxy's close in time")
            .expect("a close");
        let mask = mask.expect("the proxy's close toward the instance is masked");
        assert_eq!(&payload[..2], &1001u16.to_be_bytes(), "unmasks to 1001");
        masks.insert(mask);
    }
    // Three 32-bit keys from a CSPRNG collide with odds of about 1 in 1.4 billion.
    assert_eq!(masks.len(), 3, "one key per close: {masks:02x?}");
    for mut ws in clients {
        assert_eq!(proxy_close_code(&mut ws, WAIT).await, Some(1001));
    }
    stopped.await.unwrap();
}

on_both_planes!(each_proxy_close_toward_the_instance_has_its_own_random_mask);
