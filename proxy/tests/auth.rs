//! HMAC-authenticated functions, end to end: an upgrade signed in the
//! header form or as a signed URL reaches the function, which sees neither `Authorization`
//! nor the `wsedge-*` query parameters; a missing `Date` or `Authorization` (and no signed
//! URL) gets 400; a bad signature, a `Date` more than 15 minutes off, or a signed URL outside
//! its validity window gets 403, and none of those reach the function; the function never
//! sees the key.

mod common;

use std::{
    net::SocketAddr,
    sync::Once,
    time::{Duration, SystemTime},
};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::mpsc,
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, client::IntoClientRequest, protocol::Role},
};
use wsedge::protocols::{
    auth::{sign, signed_url},
    handshake::accept_for,
};

const KEY: &str = "correct horse battery staple";
const KEY_ENV: &str = "WSEDGE_TEST_ECHO_KEY";

/// Puts the key in the environment, once, before the test that asks first starts anything.
fn key_env() -> &'static str {
    static SET: Once = Once::new();
    // SAFETY: every test of this binary calls this first, before it starts a runtime task,
    // a proxy or a process; a test that comes second waits here until the variable is set,
    // so no thread reads the environment while it is written.
    SET.call_once(|| unsafe { std::env::set_var(KEY_ENV, KEY) });
    KEY_ENV
}

/// An echo function that records each request head it receives, exactly as it came.
async fn recording_function() -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                // The client sends nothing past its head before the 101.
                let mut head = Vec::new();
                let mut chunk = [0u8; 4096];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8(head).unwrap();
                let key = header_value(&head, "sec-websocket-key").unwrap_or_default();
                let _ = tx.send(head);
                let response = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                    accept_for(&key)
                );
                if stream.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
                let mut ws = WebSocketStream::from_raw_socket(stream, Role::Server, None).await;
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// wsedge with one function, "echo" on "/echo", signed with [`KEY`], served by `upstream`.
async fn signed_proxy(upstream: SocketAddr) -> Proxy {
    start_proxy(function_config(
        "kernel",
        "",
        &format!(
            "name = \"echo\"\nroute = \"/echo\"\nupstreams = [\"{upstream}\"]\n\
             auth = {{ hmac_key_env = \"{}\" }}\n",
            key_env()
        ),
    ))
    .await
}

/// The head the function received for the upgrade just made.
async fn head_received(heads: &mut mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(WAIT, heads.recv())
        .await
        .expect("the upgrade reached the function")
        .unwrap()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn a_header_signed_upgrade_reaches_the_function_without_its_authorization() {
    key_env();
    let (function, mut heads) = recording_function().await;
    let p = signed_proxy(function).await;
    let host = p.addr.to_string();
    let date = httpdate::fmt_http_date(SystemTime::now());
    let mut request = p.url("/echo?room=7").into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert("Date", date.parse().unwrap());
    headers.insert(
        "Authorization",
        sign(KEY.as_bytes(), &host, "/echo?room=7", &date)
            .parse()
            .unwrap(),
    );
    let mut ws = connect(request).await.expect("a signed upgrade passes");
    ws.send(Message::text("signed")).await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::text("signed"));

    let head = head_received(&mut heads).await;
    assert!(head.starts_with("GET /echo?room=7 HTTP/1.1\r\n"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("authorization"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("\r\ndate: {}\r\n", date.to_ascii_lowercase())),
        "the Date header is the function's too: {head}"
    );
    assert!(
        head.contains("\r\nX-Forwarded-For: 127.0.0.1\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\nX-Forwarded-Proto: ws\r\n"), "{head}");
    p.stop().await;
}

#[tokio::test]
async fn a_url_signed_upgrade_reaches_the_function_without_the_wsedge_parameters() {
    key_env();
    let (function, mut heads) = recording_function().await;
    let p = signed_proxy(function).await;
    let host = p.addr.to_string();
    // What a browser does: no headers of its own, the signature in the URL.
    let target = signed_url(
        KEY.as_bytes(),
        &host,
        "/echo?user=ann&room=7",
        unix_now(),
        300,
    );
    assert!(target.contains("wsedge-signature="), "{target}");
    let mut ws = connect(p.url(&target)).await.expect("a signed URL passes");
    ws.send(Message::text("from a browser")).await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::text("from a browser"));

    let head = head_received(&mut heads).await;
    assert!(
        head.starts_with("GET /echo?user=ann&room=7 HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(!head.contains("wsedge-"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("authorization"),
        "{head}"
    );
    p.stop().await;
}

#[tokio::test]
async fn missing_credentials_get_400_and_bad_or_stale_ones_403_without_reaching_the_function() {
    key_env();
    let (function, mut heads) = recording_function().await;
    let p = signed_proxy(function).await;
    // `upgrade_request` sends `Host: test`.
    let now = httpdate::fmt_http_date(SystemTime::now());
    let signed = |target: &str, date: &str, key: &str| {
        format!(
            "Date: {date}\r\nAuthorization: {}\r\n",
            sign(key.as_bytes(), "test", target, date)
        )
    };
    let minutes_off = |minutes: i64| {
        let off = Duration::from_secs(minutes.unsigned_abs() * 60);
        let at = if minutes > 0 {
            SystemTime::now() + off
        } else {
            SystemTime::now() - off
        };
        httpdate::fmt_http_date(at)
    };
    let url = |target: &str, date: u64, expires: u64, key: &str| {
        signed_url(key.as_bytes(), "test", target, date, expires)
    };
    let t = unix_now();
    let good_url = url("/echo?room=7", t, 300, KEY);
    let header_cases = [
        ("/echo", String::new(), 400, "missing_auth"),
        ("/echo", format!("Date: {now}\r\n"), 400, "missing_auth"),
        (
            "/echo",
            format!(
                "Authorization: {}\r\n",
                sign(KEY.as_bytes(), "test", "/echo", &now)
            ),
            400,
            "missing_auth",
        ),
        (
            "/echo",
            signed("/echo", &now, "wrong key"),
            403,
            "bad_signature",
        ),
        ("/echo", signed("/other", &now, KEY), 403, "bad_signature"),
        // The query is signed: a signature over the path alone does not cover it.
        (
            "/echo?room=7",
            signed("/echo", &now, KEY),
            403,
            "bad_signature",
        ),
        // The host is signed.
        (
            "/echo",
            format!(
                "Date: {now}\r\nAuthorization: {}\r\n",
                sign(KEY.as_bytes(), "elsewhere", "/echo", &now)
            ),
            403,
            "bad_signature",
        ),
        (
            "/echo",
            format!("Date: {now}\r\nAuthorization: Bearer abc\r\n"),
            403,
            "bad_signature",
        ),
        // Not an RFC 7231 date (ISO 8601), signed correctly all the same.
        (
            "/echo",
            signed("/echo", "2026-12-05T16:00:00Z", KEY),
            400,
            "malformed_date",
        ),
        (
            "/echo",
            signed("/echo", &minutes_off(-16), KEY),
            403,
            "stale_date",
        ),
        (
            "/echo",
            signed("/echo", &minutes_off(16), KEY),
            403,
            "stale_date",
        ),
    ];
    let url_cases = [
        (url("/echo", t, 300, "wrong key"), 403, "bad_signature"),
        (good_url.replace("room=7", "room=8"), 403, "bad_signature"),
        (
            good_url.replace("/echo?", "/echo/admin?"),
            403,
            "bad_signature",
        ),
        // Expired: signed 400 s ago, valid for 300 s.
        (url("/echo", t - 400, 300, KEY), 403, "stale_date"),
        // Not valid yet: dated 16 minutes ahead.
        (url("/echo", t + 16 * 60, 300, KEY), 403, "stale_date"),
        // Valid for longer than an hour.
        (url("/echo", t, 3601, KEY), 403, "stale_date"),
        (
            good_url.replace("&wsedge-expires=300", ""),
            400,
            "missing_auth",
        ),
        (
            good_url.replace("wsedge-date=", "wsedge-date=x"),
            400,
            "malformed_date",
        ),
    ];
    let cases = header_cases
        .iter()
        .map(|(target, headers, status, error_type)| {
            (upgrade_request(target, headers), *status, *error_type)
        })
        .chain(url_cases.iter().map(|(target, status, error_type)| {
            (upgrade_request(target, ""), *status, *error_type)
        }));
    for (request, status, error_type) in cases {
        let (got, got_type, body) = exchange(p.addr, &request).await;
        assert_eq!(
            (got, got_type.as_str()),
            (status, error_type),
            "{}: {body}",
            String::from_utf8_lossy(&request)
        );
    }
    assert!(
        heads.try_recv().is_err(),
        "no refused upgrade reached the function"
    );

    // Just inside the windows: 14 minutes off, and a URL signed 14 minutes ahead.
    for request in [
        upgrade_request("/echo", &signed("/echo", &minutes_off(-14), KEY)),
        upgrade_request("/echo", &signed("/echo", &minutes_off(14), KEY)),
        upgrade_request(&url("/echo", t + 14 * 60, 60, KEY), ""),
    ] {
        let head = raw_upgrade(p.addr, &request).await;
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "{}: {head}",
            String::from_utf8_lossy(&request)
        );
        head_received(&mut heads).await;
    }
    let metrics = p.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "wsedge_handshake_errors_total{function=\"echo\",status=\"403\",error_type=\"stale_date\"}"
        ),
        Some(5),
        "{metrics}"
    );
    p.stop().await;
}

#[tokio::test]
async fn a_spawned_instance_does_not_get_the_key_in_its_environment() {
    key_env();
    let dir = instance_dir();
    let seen = dir.path().join("seen");
    let command = format!(
        "printf '%s %s' \"${{{KEY_ENV}-unset}}\" \"$PORT\" > {}; exec {}",
        seen.display(),
        echo_fn().display()
    );
    // The instance writes what it saw into `dir`, its working directory: the one place
    // of the host it may write.
    let mut config = function_config(
        "kernel",
        "",
        &format!(
            "name = \"echo\"\nroute = \"/echo\"\ncommand = [\"sh\", \"-c\", {command:?}]\n\
             auth = {{ hmac_key_env = \"{KEY_ENV}\" }}\n"
        ),
    );
    config.base_dir = dir.path().into();
    let p = start_proxy(config).await;
    let date = httpdate::fmt_http_date(SystemTime::now());
    let signature = sign(KEY.as_bytes(), "test", "/echo", &date);
    let head = raw_upgrade(
        p.addr,
        &upgrade_request(
            "/echo",
            &format!("Date: {date}\r\nAuthorization: {signature}\r\n"),
        ),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(std::fs::read_to_string(&seen).unwrap(), "unset 9000");
    p.stop().await;
}
