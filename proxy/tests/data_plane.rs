//! The data-plane contract, run unchanged against the kernel splice and the userspace relay:
//! every frame arrives intact, counters are exact, and teardown is clean.

#[macro_use]
mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use futures_util::SinkExt;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};
use tokio_tungstenite::tungstenite::{
    Message,
    handshake::derive_accept_key,
    protocol::{
        CloseFrame,
        frame::{
            Frame,
            coding::{CloseCode, Data, OpCode},
        },
    },
};
use wsedge::config::DataPlaneMode;

const SIZES: [usize; 7] = [0, 1, 125, 126, 65535, 65536, 262144];

fn payload(size: usize, seed: u8) -> Vec<u8> {
    (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Wire bytes of an unmasked server frame with `len` payload bytes.
fn server_wire(len: usize) -> u64 {
    (len + if len < 126 {
        2
    } else if len < 65536 {
        4
    } else {
        10
    }) as u64
}

async fn echoes_every_size_as_text_and_binary_byte_for_byte(plane: DataPlaneMode) {
    let proxy = start(plane).await;
    let mut ws = connect(proxy.url("/echo")).await.unwrap();
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
    let conns = proxy.connections().await;
    assert_eq!(conns.len(), 1);
    let c = &conns[0];
    assert_eq!(c.data_plane, plane_name(plane));
    assert_eq!((c.messages_in, c.messages_out), (14, 14), "{c:?}");
    assert_eq!(c.bytes_out, expected_out, "{c:?}");
    let client_wire: u64 = SIZES.iter().map(|&s| 2 * (server_wire(s) + 4)).sum();
    assert_eq!(c.bytes_in, client_wire, "{c:?}");
    if plane == DataPlaneMode::Kernel {
        assert_eq!(
            c.bytes_relayed_by_userspace, 0,
            "the proxy read no payload byte: {c:?}"
        );
    } else {
        assert_eq!(c.bytes_relayed_by_userspace, c.bytes_in + c.bytes_out);
    }
    ws.close(None).await.unwrap();
    assert!(matches!(recv(&mut ws).await, Message::Close(_)));
    drop(ws);
    proxy.wait_no_connections().await;
    proxy.stop().await;
}

fn plane_name(plane: DataPlaneMode) -> &'static str {
    match plane {
        DataPlaneMode::Kernel => "kernel",
        _ => "userspace",
    }
}

async fn fragmented_message_with_interleaved_ping_is_reassembled_and_counted_once(
    plane: DataPlaneMode,
) {
    let proxy = start(plane).await;
    let mut ws = connect(proxy.url("/echo")).await.unwrap();
    let parts: [&[u8]; 3] = [b"frag", b"mented ", b"message"];
    ws.send(Message::Frame(Frame::message(
        parts[0].to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .unwrap();
    ws.send(Message::Ping(b"mid".to_vec().into()))
        .await
        .unwrap();
    ws.send(Message::Frame(Frame::message(
        parts[1].to_vec(),
        OpCode::Data(Data::Continue),
        false,
    )))
    .await
    .unwrap();
    ws.send(Message::Frame(Frame::message(
        parts[2].to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .await
    .unwrap();
    assert_eq!(recv(&mut ws).await, Message::Pong(b"mid".to_vec().into()));
    assert_eq!(recv(&mut ws).await, Message::text("fragmented message"));
    let c = &proxy.connections().await[0];
    assert_eq!((c.frames_in, c.messages_in), (4, 1), "{c:?}");
    assert_eq!((c.frames_out, c.messages_out), (2, 1), "{c:?}");
    proxy.stop().await;
}

async fn close_code_passes_through_both_ways(plane: DataPlaneMode) {
    let proxy = start(plane).await;
    // Client closes with 4001: the function's reply close carries the same code back.
    let mut ws = connect(proxy.url("/echo")).await.unwrap();
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4001),
        reason: "client done".into(),
    }))
    .await
    .unwrap();
    match recv(&mut ws).await {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 4001),
        other => panic!("expected close, got {other:?}"),
    }
    drop(ws);
    // The function closes first with 4000.
    let mut ws = connect(proxy.url("/echo")).await.unwrap();
    ws.send(Message::text("close:4000")).await.unwrap();
    match recv(&mut ws).await {
        Message::Close(Some(f)) => {
            assert_eq!((u16::from(f.code), f.reason.as_str()), (4000, "bye"))
        }
        other => panic!("expected close, got {other:?}"),
    }
    // The stream then ends: the proxy propagated the function's FIN.
    let end = next_within(&mut ws).await;
    assert!(end.is_none() || matches!(end, Some(Err(_))), "{end:?}");
    drop(ws);
    proxy.wait_no_connections().await;
    proxy.stop().await;
}

async fn two_hundred_concurrent_connections_each_get_their_own_echoes(plane: DataPlaneMode) {
    let proxy = start(plane).await;
    let url = proxy.url("/echo");
    let clients = (0..200u32).map(|n| {
        let url = url.clone();
        tokio::spawn(async move {
            let mut ws = connect(url).await.unwrap();
            for i in 0..5u32 {
                let msg = format!("conn {n} message {i}");
                ws.send(Message::text(msg.clone())).await.unwrap();
                assert_eq!(recv(&mut ws).await, Message::text(msg));
            }
            ws
        })
    });
    let mut sockets = Vec::new();
    for c in clients.collect::<Vec<_>>() {
        sockets.push(c.await.unwrap());
    }
    let conns = proxy.connections().await;
    assert_eq!(conns.len(), 200);
    assert!(
        conns
            .iter()
            .all(|c| c.messages_in == 5 && c.messages_out == 5),
        "{conns:?}"
    );
    for mut ws in sockets {
        ws.close(None).await.unwrap();
        assert!(matches!(recv(&mut ws).await, Message::Close(_)));
    }
    proxy.wait_no_connections().await;
    proxy.stop().await;
}

async fn frames_pipelined_with_the_handshake_are_forwarded_in_order(plane: DataPlaneMode) {
    let proxy = start(plane).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    // The request, two whole frames and half of a third, in one write.
    let big = payload(70_000, 9);
    let third = masked_frame(true, 2, &big);
    let mut first_write = UPGRADE.as_bytes().to_vec();
    first_write.extend(masked_frame(true, 1, b"one"));
    first_write.extend(masked_frame(true, 1, b"two"));
    first_write.extend_from_slice(&third[..1000]);
    s.write_all(&first_write).await.unwrap();
    let (head, mut pending) = read_response_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
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
    // A frame sent once the splice is in place still works.
    s.write_all(&masked_frame(true, 1, b"after")).await.unwrap();
    assert_eq!(
        read_server_frame(&mut s, &mut pending).await,
        (1, b"after".to_vec())
    );
    let c = &proxy.connections().await[0];
    assert_eq!(c.messages_in, 4, "{c:?}");
    proxy.stop().await;
}

async fn a_frame_sent_alone_right_after_the_101_is_not_stranded(plane: DataPlaneMode) {
    let proxy = start(plane).await;
    let (mut s, mut pending) = upgraded_raw(proxy.addr).await;
    // Sent at once, possibly before the sockets are in the map, and nothing after it.
    s.write_all(&masked_frame(true, 1, b"lonely"))
        .await
        .unwrap();
    assert_eq!(
        read_server_frame(&mut s, &mut pending).await,
        (1, b"lonely".to_vec())
    );
    proxy.stop().await;
}

async fn a_client_that_vanishes_mid_frame_is_torn_down_cleanly(plane: DataPlaneMode) {
    let proxy = start(plane).await;
    let (mut s, mut pending) = upgraded_raw(proxy.addr).await;
    s.write_all(&masked_frame(true, 1, b"whole")).await.unwrap();
    assert_eq!(
        read_server_frame(&mut s, &mut pending).await,
        (1, b"whole".to_vec())
    );
    let partial = masked_frame(true, 2, &payload(5000, 1));
    s.write_all(&partial[..2000]).await.unwrap();
    drop(s);
    proxy.wait_no_connections().await;
    // The proxy keeps serving.
    let mut ws = connect(proxy.url("/echo")).await.unwrap();
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::text("still here"));
    proxy.stop().await;
}

async fn a_client_keeping_tcp_open_after_the_closing_handshake_is_done_within_the_grace(
    plane: DataPlaneMode,
) {
    let proxy = start(plane).await;
    let (mut s, mut pending) = upgraded_raw(proxy.addr).await;
    s.write_all(&masked_frame(true, 8, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    assert_eq!(close_code_after(&mut s, &mut pending).await, 1000);
    // The instance closes its TCP after the handshake, as servers do; this client never closes
    // its own. The connection must end then (within the grace), not at the idle timeout.
    let started = std::time::Instant::now();
    proxy.wait_no_connections().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    proxy
        .assert_one_ended_with(200, "the closing handshake was done")
        .await;
    drop(s);
    proxy.stop().await;
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

async fn a_message_over_the_limit_closes_both_sides_with_1009(plane: DataPlaneMode) {
    let (instance, mut closes) = recording_instance().await;
    let proxy = start_proxy(config(plane, instance, "")).await;
    for fragmented in [false, true] {
        let (mut s, mut pending) = upgraded_raw(proxy.addr).await;
        s.write_all(&masked_frame(true, 1, b"ok")).await.unwrap();
        if fragmented {
            // 200,000 + 62,145 bytes: one byte over 256 KiB in total.
            s.write_all(&masked_frame(false, 2, &payload(200_000, 1)))
                .await
                .unwrap();
            let _ = s
                .write_all(&masked_frame(true, 0, &payload(62_145, 2)))
                .await;
        } else {
            // One 1 MiB frame, announced and partly sent.
            let huge = masked_frame(true, 2, &payload(1 << 20, 3));
            let _ = s.write_all(&huge[..64 * 1024]).await;
        }
        assert_eq!(
            close_code_after(&mut s, &mut pending).await,
            1009,
            "fragmented: {fragmented}"
        );
        let to_instance = tokio::time::timeout(Duration::from_secs(5), closes.recv()).await;
        assert_eq!(to_instance.unwrap(), Some(1009), "the instance is told too");
        drop(s);
        proxy.wait_no_connections().await;
    }
    proxy
        .assert_ended_with(429, 2, "the proxy closed them for the size quota")
        .await;
    proxy.stop().await;
}

/// The proxy failed the connection over a frame RFC 6455 forbids: 1002 to the client and to
/// the instance, and the connection ended with `status`.
async fn failed_with_1002(
    proxy: Proxy,
    (mut s, mut pending): (TcpStream, Vec<u8>),
    closes: &mut tokio::sync::mpsc::UnboundedReceiver<u16>,
    status: u16,
    why: &str,
) {
    assert_eq!(close_code_after(&mut s, &mut pending).await, 1002);
    let to_instance = tokio::time::timeout(Duration::from_secs(5), closes.recv()).await;
    assert_eq!(to_instance.unwrap(), Some(1002), "the instance is told too");
    drop(s);
    proxy.wait_no_connections().await;
    proxy.assert_one_ended_with(status, why).await;
    proxy.stop().await;
}

/// An instance that answers the handshake itself and, after the client's first frame, sends a
/// frame with the reserved opcode 3 (RFC 6455 5.2: its receiver must fail the connection);
/// reports the close code it gets back.
async fn reserved_opcode_instance() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<u16>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (head, mut pending) = read_response_head(&mut s).await;
                let key = header_value(&head, "sec-websocket-key").expect("a Sec-WebSocket-Key");
                let response = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                    derive_accept_key(key.as_bytes())
                );
                s.write_all(response.as_bytes()).await.unwrap();
                read_server_frame(&mut s, &mut pending).await;
                s.write_all(&[0x83, 0x00]).await.unwrap();
                loop {
                    let (opcode, payload) = read_server_frame(&mut s, &mut pending).await;
                    if opcode == 8 {
                        let _ = tx.send(u16::from_be_bytes([payload[0], payload[1]]));
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

async fn a_client_frame_with_a_reserved_opcode_fails_the_connection_with_1002_both_ways(
    plane: DataPlaneMode,
) {
    let (instance, mut closes) = recording_instance().await;
    let proxy = start_proxy(config(plane, instance, "")).await;
    let (mut s, mut pending) = upgraded_raw(proxy.addr).await;
    s.write_all(&masked_frame(true, 1, b"ok")).await.unwrap();
    assert_eq!(
        read_server_frame(&mut s, &mut pending).await,
        (1, b"ok".to_vec())
    );
    s.write_all(&masked_frame(true, 3, b"")).await.unwrap();
    failed_with_1002(
        proxy,
        (s, pending),
        &mut closes,
        456,
        "the client broke the protocol",
    )
    .await;
}

async fn an_instance_frame_with_a_reserved_opcode_fails_the_connection_with_1002_both_ways(
    plane: DataPlaneMode,
) {
    let (instance, mut closes) = reserved_opcode_instance().await;
    let proxy = start_proxy(config(plane, instance, "")).await;
    let (mut s, pending) = upgraded_raw(proxy.addr).await;
    s.write_all(&masked_frame(true, 1, b"go")).await.unwrap();
    failed_with_1002(
        proxy,
        (s, pending),
        &mut closes,
        439,
        "the function broke the protocol",
    )
    .await;
}

on_both_planes!(
    echoes_every_size_as_text_and_binary_byte_for_byte,
    fragmented_message_with_interleaved_ping_is_reassembled_and_counted_once,
    close_code_passes_through_both_ways,
    two_hundred_concurrent_connections_each_get_their_own_echoes,
    frames_pipelined_with_the_handshake_are_forwarded_in_order,
    a_frame_sent_alone_right_after_the_101_is_not_stranded,
    a_client_that_vanishes_mid_frame_is_torn_down_cleanly,
    a_message_over_the_limit_closes_both_sides_with_1009,
    a_client_keeping_tcp_open_after_the_closing_handshake_is_done_within_the_grace,
    a_client_frame_with_a_reserved_opcode_fails_the_connection_with_1002_both_ways,
    an_instance_frame_with_a_reserved_opcode_fails_the_connection_with_1002_both_ways,
);

#[test]
fn a_metric_value_is_read_from_the_whole_line() {
    let metrics = "# TYPE wsedge_connections_ended_total counter\n\
        wsedge_connections_ended_total{function=\"echo\",status=\"200\"} 12\n\
        wsedge_connections_ended_total{function=\"echo\",status=\"429\"} 1\n";
    assert_eq!(metric_value(metrics, &ended_series(200)), Some(12));
    assert_eq!(metric_value(metrics, &ended_series(429)), Some(1));
    assert_eq!(metric_value(metrics, &ended_series(20)), None);
    assert_eq!(metric_value(metrics, &ended_series(455)), None);
}
