//! Bad upgrades and bad instances get the documented status, with the JSON body and
//! `X-Wsedge-Error-Type`, and the connection is closed; nothing panics and the proxy keeps
//! serving.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use wsedge::config::DataPlaneMode;

fn request_with(replace: &str, with: &str) -> Vec<u8> {
    UPGRADE.replace(replace, with).into_bytes()
}

async fn proxy_with(extra: &str) -> Proxy {
    let echo = start_echo().await;
    start_proxy(config(DataPlaneMode::Kernel, echo, extra)).await
}

/// Asserts that `request` gets 400 `malformed_upgrade`.
async fn assert_malformed(proxy: &Proxy, request: &[u8]) {
    let (status, kind, _) = exchange(proxy.addr, request).await;
    assert_eq!(
        (status, kind.as_str()),
        (400, "malformed_upgrade"),
        "{:?}",
        String::from_utf8_lossy(request)
    );
}

#[tokio::test]
async fn malformed_upgrades_get_400() {
    let proxy = proxy_with("").await;
    for request in [
        b"\x16\x03\x01\x02\x00garbage\r\n\r\n".to_vec(),
        request_with("Upgrade: websocket\r\n", ""),
        request_with("Connection: Upgrade", "Connection: keep-alive"),
        request_with("dGhlIHNhbXBsZSBub25jZQ==", "not-a-key"),
        request_with("Host: test\r\n", ""),
    ] {
        assert_malformed(&proxy, &request).await;
    }
    proxy.stop().await;
}

#[tokio::test]
async fn upgrades_with_a_body_repeated_headers_or_dot_segments_get_400() {
    let proxy = proxy_with("").await;
    let with = |line: &str| request_with("\r\n\r\n", &format!("\r\n{line}\r\n\r\n"));
    for request in [
        with("Content-Length: 4\r\n\r\nbody"),
        with("Transfer-Encoding: chunked"),
        with("Host: other"),
        with("sec-websocket-key: AAAAAAAAAAAAAAAAAAAAAA=="),
        with("Date: Sat, 05 Dec 2026 16:00:00 GMT\r\nDate: Sat, 05 Dec 2026 16:00:01 GMT"),
        with("Authorization: a\r\nAuthorization: b"),
        request_with("GET /echo", "GET /echo/../admin"),
        request_with("GET /echo", "GET /echo/./x"),
        request_with("GET /echo", "GET /echo/%2e%2e/admin"),
    ] {
        assert_malformed(&proxy, &request).await;
    }
    proxy.stop().await;
}

#[tokio::test]
async fn wrong_method_gets_403_and_unknown_route_404() {
    let proxy = proxy_with("").await;
    assert_eq!(
        exchange(proxy.addr, &request_with("GET", "POST")).await.0,
        403
    );
    let (status, kind, _) = exchange(proxy.addr, &request_with("/echo", "/nothing-here")).await;
    assert_eq!((status, kind.as_str()), (404, "no_function"));
    proxy.stop().await;
}

#[tokio::test]
async fn unsupported_version_gets_426_naming_13() {
    let proxy = proxy_with("").await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&request_with("Version: 13", "Version: 8"))
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("the proxy answers and closes")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{text}");
    assert_eq!(parse_error_response(&out).0, 426);
    proxy.stop().await;
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let proxy = proxy_with("max_header_bytes = 4096").await;
    let huge = format!("X-Padding: {}\r\n\r\n", "a".repeat(8000));
    let request = UPGRADE.replace("\r\n\r\n", &format!("\r\n{huge}"));
    let (status, kind, _) = exchange(proxy.addr, request.as_bytes()).await;
    assert_eq!((status, kind.as_str()), (431, "headers_too_large"));
    proxy.stop().await;
}

#[tokio::test]
async fn slow_headers_time_out_with_408() {
    let proxy = proxy_with("handshake_timeout_ms = 300").await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: te")
        .await
        .unwrap();
    let mut out = Vec::new();
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    let (status, kind, _) = parse_error_response(&out);
    assert_eq!((status, kind.as_str()), (408, "handshake_timeout"));
    proxy.stop().await;
}

/// An "instance" that accepts and then does `behaviour` with the request.
async fn fake_instance(behaviour: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                match behaviour {
                    "http-200" => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
                            .await;
                    }
                    "bad-accept" => {
                        let _ = s
                            .write_all(
                                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                                  Connection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
                            )
                            .await;
                    }
                    "crash" => {}
                    _ => tokio::time::sleep(Duration::from_secs(30)).await,
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn instances_that_do_not_answer_with_a_valid_101_get_502_or_504() {
    for (behaviour, status) in [
        ("http-200", 502),
        ("bad-accept", 502),
        ("crash", 502),
        ("silent", 504),
    ] {
        let instance = fake_instance(behaviour).await;
        let proxy = start_proxy(config(
            DataPlaneMode::Kernel,
            instance,
            "instance_timeout_ms = 500",
        ))
        .await;
        let (got, kind, _) = exchange(proxy.addr, UPGRADE.as_bytes()).await;
        assert_eq!(got, status, "{behaviour}: {kind}");
        proxy.stop().await;
    }
    // Nothing listening at all.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = start_proxy(config(DataPlaneMode::Kernel, closed, "")).await;
    let (status, kind, _) = exchange(proxy.addr, UPGRADE.as_bytes()).await;
    assert_eq!((status, kind.as_str()), (502, "instance_unreachable"));
    proxy.stop().await;
}

#[tokio::test]
async fn after_bad_input_the_proxy_still_upgrades_and_admin_reports_ready() {
    let proxy = proxy_with("").await;
    let _ = exchange(proxy.addr, b"\r\n\r\n").await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(UPGRADE.as_bytes()).await.unwrap();
    let (head, _) = read_response_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    assert_eq!(http_get(proxy.admin, "/live").await.0, 200);
    assert_eq!(http_get(proxy.admin, "/ready").await.0, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn the_instance_gets_wsedges_forwarding_headers_not_the_clients() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let instance = listener.local_addr().unwrap();
    let proxy = start_proxy(config(DataPlaneMode::Kernel, instance, "")).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let spoofed = "X-Forwarded-For: 203.0.113.9\r\nx-forwarded-proto: https\r\n\
                   Forwarded: for=203.0.113.9;proto=https\r\nX-Real-IP: 203.0.113.9\r\n\
                   X-Wsedge-Connection-Id: forged\r\nAuthorization: Bearer secret\r\n\
                   X-Custom: kept\r\n";
    client
        .write_all(
            UPGRADE
                .replace("GET /echo ", "GET /echo?room=1&wsedge-date=1 ")
                .replace("\r\n\r\n", &format!("\r\n{spoofed}\r\n"))
                .as_bytes(),
        )
        .await
        .unwrap();
    let (mut s, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("the proxy connects to the instance")
        .unwrap();
    let mut head = Vec::new();
    let mut buf = vec![0u8; 4096];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("the proxy sends the request on")
            .unwrap();
        assert!(n > 0, "the proxy closed mid-head");
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("GET /echo?room=1 HTTP/1.1\r\n"), "{head}");
    assert!(head.contains("\r\nHost: test\r\n"), "{head}");
    assert!(head.contains("\r\nX-Custom: kept\r\n"), "{head}");
    assert!(
        head.contains("\r\nX-Forwarded-For: 127.0.0.1\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\nX-Forwarded-Proto: ws\r\n"), "{head}");
    let lower = head.to_ascii_lowercase();
    for gone in [
        "203.0.113.9",
        "https",
        "forwarded: ",
        "x-real-ip",
        "forged",
        "authorization",
        "wsedge-date",
    ] {
        assert!(
            !lower.contains(gone),
            "{gone:?} reached the instance: {head}"
        );
    }
    assert_eq!(lower.matches("x-forwarded-for").count(), 1, "{head}");
    assert_eq!(lower.matches("x-forwarded-proto").count(), 1, "{head}");
    // The proxy's own connection id: the one /connections lists once the upgrade is done.
    let id = head
        .lines()
        .find_map(|l| l.strip_prefix("X-Wsedge-Connection-Id: "))
        .unwrap_or_else(|| panic!("no X-Wsedge-Connection-Id: {head}"))
        .to_string();
    s.write_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
    )
    .await
    .unwrap();
    let (reply, _) = read_response_head(&mut client).await;
    assert!(reply.starts_with("HTTP/1.1 101"), "{reply}");
    let deadline = std::time::Instant::now() + WAIT;
    let listed = loop {
        let conns = proxy.connections().await;
        if let Some(c) = conns.first() {
            break c.id.clone();
        }
        assert!(std::time::Instant::now() < deadline, "never listed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(listed, id);
    proxy.stop().await;
}

#[tokio::test]
async fn an_upgrade_that_completes_while_draining_gets_503() {
    let mut p = proxy_with("").await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let (first, rest) = UPGRADE.split_at(20);
    s.write_all(first.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    p.begin_stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(rest.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let (status, error_type, _) = parse_error_response(&out);
    assert_eq!((status, error_type.as_str()), (503, "draining"));
    p.stop().await;
}
