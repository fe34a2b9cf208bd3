//! HTTP on the same trigger: a request to a function's route that is not a WebSocket upgrade
//! is proxied to an instance as plain HTTP/1.1 (keep-alive, streamed bodies), with the
//! upgrade's auth, Origin, per-IP and error rules, and billed as one `http` invocation.

mod common;

use std::{
    net::SocketAddr,
    sync::{
        Arc, Once,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};
use wsedge::config::DataPlaneMode;

const KEY: &str = "http trigger key";
const KEY_ENV: &str = "WSEDGE_TEST_HTTP_TRIGGER_KEY";

/// Puts the key in the environment once, before anything of the test that asks first runs.
fn key_env() -> &'static str {
    static SET: Once = Once::new();
    // SAFETY: every test here calls this (through `proxy_with`) before it starts a runtime
    // task, a proxy or a process; a second test waits here until the variable is set.
    SET.call_once(|| unsafe { std::env::set_var(KEY_ENV, KEY) });
    KEY_ENV
}

type TestBody = BoxBody<Bytes, hyper::Error>;

/// A function that serves WebSocket (echo) and plain HTTP on one port, as the platforms'
/// samples do. HTTP: `/echo/slow` answers after 500 ms; any other request gets its own body
/// back, streamed, with what it saw of the request in `x-seen-*` headers. Counts the TCP
/// connections it accepted.
async fn start_function() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut peek = [0u8; 2048];
                let n = stream.peek(&mut peek).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&peek[..n]).to_ascii_lowercase();
                if head.contains("upgrade: websocket") {
                    serve_echo(stream).await;
                    return;
                }
                let service = service_fn(|req: Request<Incoming>| async move {
                    let seen = |name: &str| {
                        req.headers()
                            .get(name)
                            .map(|v| v.to_str().unwrap().to_string())
                            .unwrap_or_else(|| "-".into())
                    };
                    let mut response = Response::builder()
                        .header("x-seen-target", req.uri().to_string())
                        .header("x-seen-method", req.method().as_str())
                        .header("x-seen-forwarded-for", seen("x-forwarded-for"))
                        .header("x-seen-proto", seen("x-forwarded-proto"))
                        .header("x-seen-connection-id", seen("x-wsedge-connection-id"))
                        .header("x-seen-authorization", seen("authorization"))
                        .header("x-seen-real-ip", seen("x-real-ip"));
                    if req.uri().path() == "/echo/slow" {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        response = response.header("content-length", "4");
                        let body: TestBody = Full::new(Bytes::from_static(b"slow"))
                            .map_err(|never| match never {})
                            .boxed();
                        return Ok::<_, hyper::Error>(response.body(body).unwrap());
                    }
                    Ok(response.body(req.into_body().boxed()).unwrap())
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, accepted)
}

/// wsedge with "echo" on "/echo" served by `upstream`; `edit` changes the config first.
async fn proxy_with(
    upstream: SocketAddr,
    server: &str,
    edit: impl FnOnce(&mut wsedge::Config),
) -> Proxy {
    key_env();
    let mut config = config(DataPlaneMode::Userspace, upstream, server);
    edit(&mut config);
    start_proxy(config).await
}

type Sender = hyper::client::conn::http1::SendRequest<TestBody>;

/// One keep-alive HTTP/1.1 connection to `addr`.
async fn client(addr: SocketAddr) -> Sender {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

fn request(method: &str, target: &str, body: Bytes) -> Request<TestBody> {
    Request::builder()
        .method(method)
        .uri(target)
        .header("host", "test")
        .body(Full::new(body).map_err(|never| match never {}).boxed())
        .unwrap()
}

/// Sends `request` on `sender`: status, headers and the whole body, within [`WAIT`].
async fn send(
    sender: &mut Sender,
    request: Request<TestBody>,
) -> (StatusCode, http::HeaderMap, Bytes) {
    timeout(WAIT, async {
        sender.ready().await.unwrap();
        let response = sender.send_request(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, body)
    })
    .await
    .expect("answered in time")
}

fn header(headers: &http::HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// Status and `X-Wsedge-Error-Type` of a wsedge refusal, checking its JSON body agrees.
fn refusal(answer: &(StatusCode, http::HeaderMap, Bytes)) -> (u16, String) {
    let (status, headers, body) = answer;
    let json: serde_json::Value = serde_json::from_slice(body).unwrap();
    let kind = header(headers, "x-wsedge-error-type");
    assert_eq!(json["error_type"], kind.as_str(), "body and header agree");
    (status.as_u16(), kind)
}

/// The ledger's rows, once `count` have ended, within [`WAIT`].
async fn ended_rows(proxy: &Proxy, count: usize) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let body = http_get(proxy.admin, "/billing").await.1;
        let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        let ended: Vec<_> = rows
            .into_iter()
            .filter(|r| !r["ended_at"].is_null())
            .collect();
        if ended.len() >= count {
            return ended;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{count} ended rows: {ended:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_get_reaches_the_function_with_wsedges_forwarding_headers() {
    let (function, _) = start_function().await;
    let proxy = proxy_with(function, "", |_| {}).await;
    let mut c = client(proxy.addr).await;
    let mut get = request("GET", "/echo/a?x=1&wsedge-other=2", Bytes::new());
    for (name, value) in [
        ("x-forwarded-for", "10.9.9.9"),
        ("x-real-ip", "10.8.8.8"),
        ("x-wsedge-connection-id", "forged"),
    ] {
        get.headers_mut().insert(name, value.parse().unwrap());
    }
    let (status, headers, body) = send(&mut c, get).await;
    assert_eq!(status, 200);
    assert!(body.is_empty());
    assert_eq!(header(&headers, "x-seen-target"), "/echo/a?x=1");
    assert_eq!(header(&headers, "x-seen-method"), "GET");
    assert_eq!(header(&headers, "x-seen-forwarded-for"), "127.0.0.1");
    assert_eq!(header(&headers, "x-seen-real-ip"), "-");
    assert_eq!(header(&headers, "x-seen-proto"), "http");
    let id = header(&headers, "x-seen-connection-id");
    assert_ne!(id, "forged");
    let rows = ended_rows(&proxy, 1).await;
    assert_eq!(rows[0]["id"], id.as_str());
    assert_eq!(rows[0]["kind"], "http");
    assert_eq!(rows[0]["status"], 200);
    assert_eq!(rows[0]["data_plane"], "userspace");
    let metrics = http_get(proxy.admin, "/metrics").await.1;
    assert!(
        metrics.contains("wsedge_http_requests_total{function=\"echo\",status=\"200\"} 1\n"),
        "{metrics}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_streamed_1_mib_post_reaches_the_function_whole_and_streams_back() {
    let (function, _) = start_function().await;
    let proxy = proxy_with(function, "", |_| {}).await;
    let mut c = client(proxy.addr).await;
    let sent: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    // Chunked, in 64 KiB pieces: no Content-Length, so nothing can be sized up front.
    let chunks: Vec<Result<http_body::Frame<Bytes>, hyper::Error>> = sent
        .chunks(64 * 1024)
        .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let body = StreamBody::new(futures_util::stream::iter(chunks)).boxed();
    let post = Request::builder()
        .method("POST")
        .uri("/echo/upload")
        .header("host", "test")
        .body(body)
        .unwrap();
    let (status, headers, received) = send(&mut c, post).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-seen-method"), "POST");
    assert_eq!(received.len(), sent.len());
    assert!(received == sent, "the function got and returned every byte");
    let rows = ended_rows(&proxy, 1).await;
    assert_eq!(rows[0]["bytes_in"], 1024 * 1024);
    assert_eq!(rows[0]["bytes_out"], 1024 * 1024);
    assert_eq!(
        (
            rows[0]["messages_in"].clone(),
            rows[0]["messages_out"].clone()
        ),
        (1.into(), 1.into())
    );
    proxy.stop().await;
}

#[tokio::test]
async fn keep_alive_serves_two_requests_on_one_connection_as_two_invocations() {
    let (function, _) = start_function().await;
    let proxy = proxy_with(function, "", |_| {}).await;
    let mut c = client(proxy.addr).await;
    let first = send(&mut c, request("POST", "/echo", Bytes::from_static(b"one"))).await;
    let second = send(&mut c, request("POST", "/echo", Bytes::from_static(b"two"))).await;
    assert_eq!((first.0, &first.2[..]), (StatusCode::OK, &b"one"[..]));
    assert_eq!((second.0, &second.2[..]), (StatusCode::OK, &b"two"[..]));
    let ids = [&first.1, &second.1].map(|h| header(h, "x-seen-connection-id"));
    assert_ne!(ids[0], ids[1], "each request is its own invocation");
    let rows = ended_rows(&proxy, 2).await;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["kind"] == "http"));
    proxy.stop().await;
}

#[tokio::test]
async fn a_websocket_upgrade_on_the_same_route_and_port_still_works() {
    let (function, _) = start_function().await;
    let proxy = proxy_with(function, "", |_| {}).await;
    let mut ws = connect(&proxy.url("/echo")).await.expect("upgraded");
    echo_once(&mut ws, "hello").await;
    drop(ws);
    let mut c = client(proxy.addr).await;
    let answer = send(&mut c, request("POST", "/echo", Bytes::from_static(b"hi"))).await;
    assert_eq!(&answer.2[..], b"hi");
    let rows = ended_rows(&proxy, 2).await;
    let mut kinds: Vec<&str> = rows.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    kinds.sort();
    assert_eq!(kinds, ["http", "websocket"]);
    proxy.stop().await;
}

#[tokio::test]
async fn plain_requests_get_the_error_table() {
    let (function, _) = start_function().await;
    let proxy = proxy_with(function, "", |config| {
        let f = &mut config.functions[0];
        f.allowed_origins = vec!["https://ok.example".into()];
        f.limits.max_request_body_bytes = 1024;
    })
    .await;
    let mut c = client(proxy.addr).await;
    let answer = send(&mut c, request("GET", "/nothing", Bytes::new())).await;
    assert_eq!(refusal(&answer), (404, "no_function".into()));
    let mut cross = request("GET", "/echo", Bytes::new());
    cross
        .headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    let answer = send(&mut c, cross).await;
    assert_eq!(refusal(&answer), (403, "origin_refused".into()));
    let answer = send(&mut c, request("POST", "/echo/../x", Bytes::new())).await;
    assert_eq!(refusal(&answer), (400, "malformed_request".into()));
    // Sized: refused before it reaches the function.
    let big = Bytes::from(vec![b'x'; 2048]);
    let answer = send(&mut c, request("POST", "/echo", big.clone())).await;
    assert_eq!(refusal(&answer), (413, "body_too_large".into()));
    // Chunked: cut once the limit is passed.
    let mut c = client(proxy.addr).await;
    let chunks: Vec<Result<http_body::Frame<Bytes>, hyper::Error>> = big
        .chunks(512)
        .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let chunked = Request::builder()
        .method("POST")
        .uri("/echo")
        .header("host", "test")
        .body(StreamBody::new(futures_util::stream::iter(chunks)).boxed())
        .unwrap();
    let answer = send(&mut c, chunked).await;
    assert_eq!(refusal(&answer), (413, "body_too_large".into()));
    // Allowed: an allowed Origin, a body within the limit.
    let mut c = client(proxy.addr).await;
    let mut ok = request("POST", "/echo", Bytes::from_static(b"small"));
    ok.headers_mut()
        .insert("origin", "https://ok.example".parse().unwrap());
    assert_eq!(send(&mut c, ok).await.2, &b"small"[..]);
    proxy.stop().await;
}

#[tokio::test]
async fn a_bad_signature_gets_403_and_a_good_one_passes_without_its_credentials() {
    let (function, _) = start_function().await;
    let proxy = proxy_with(function, "", |config| {
        config.functions[0].auth = toml::from_str(&format!("hmac_key_env = \"{KEY_ENV}\""))
            .map(wsedge::config::Auth::Hmac)
            .unwrap();
    })
    .await;
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let signed = |authorization: &str| {
        let mut r = request("GET", "/echo/x", Bytes::new());
        r.headers_mut().insert("date", date.parse().unwrap());
        r.headers_mut()
            .insert("authorization", authorization.parse().unwrap());
        r
    };
    let mut c = client(proxy.addr).await;
    let bad = wsedge::protocols::auth::sign(b"wrong key", "test", "/echo/x", &date);
    let answer = send(&mut c, signed(&bad)).await;
    assert_eq!(refusal(&answer), (403, "bad_signature".into()));
    let answer = send(&mut c, request("GET", "/echo/x", Bytes::new())).await;
    assert_eq!(refusal(&answer), (400, "missing_auth".into()));
    let good = wsedge::protocols::auth::sign(KEY.as_bytes(), "test", "/echo/x", &date);
    let (status, headers, _) = send(&mut c, signed(&good)).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-seen-authorization"), "-");
    proxy.stop().await;
}

#[tokio::test]
async fn the_per_ip_limit_counts_http_connections() {
    let (function, _) = start_function().await;
    let proxy = proxy_with(function, "max_connections_per_ip = 1", |_| {}).await;
    let mut first = client(proxy.addr).await;
    assert_eq!(
        send(&mut first, request("GET", "/echo", Bytes::new()))
            .await
            .0,
        200
    );
    // The first connection is still open (keep-alive): a second one from this IP is over.
    let (status, kind, _) = exchange(proxy.addr, b"GET /echo HTTP/1.1\r\nHost: test\r\n\r\n").await;
    assert_eq!((status, kind.as_str()), (429, "too_many_connections"));
    proxy.stop().await;
}

#[tokio::test]
async fn an_instance_that_closes_without_answering_gets_502() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            drop(s);
        }
    });
    let proxy = proxy_with(addr, "", |_| {}).await;
    let mut c = client(proxy.addr).await;
    let answer = send(&mut c, request("GET", "/echo", Bytes::new())).await;
    assert_eq!(refusal(&answer), (502, "bad_instance_response".into()));
    let metrics = http_get(proxy.admin, "/metrics").await.1;
    assert!(metrics.contains("wsedge_http_requests_total{function=\"echo\",status=\"502\"} 1\n"));
    proxy.stop().await;
}

#[tokio::test]
async fn the_drain_lets_a_request_in_flight_finish_and_refuses_new_ones_with_503() {
    let (function, _) = start_function().await;
    let mut proxy = proxy_with(function, "", |config| {
        config.server.drain_timeout_s = 5;
    })
    .await;
    // A request whose head is not complete yet: it is read once the drain has begun.
    let mut late = TcpStream::connect(proxy.addr).await.unwrap();
    late.write_all(b"GET /echo HTTP/1.1\r\nHo").await.unwrap();
    let mut c = client(proxy.addr).await;
    let slow =
        tokio::spawn(async move { send(&mut c, request("GET", "/echo/slow", Bytes::new())).await });
    // The slow request is in flight (its function sleeps 500 ms).
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.begin_stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    late.write_all(b"st: test\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    timeout(WAIT, late.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let (status, kind, _) = parse_error_response(&out);
    assert_eq!((status, kind.as_str()), (503, "draining"));
    let (status, _, body) = slow.await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"slow"[..]));
}

#[tokio::test]
async fn plain_http_works_over_tls_too() {
    let ca = common::tls::TestCa::new();
    let leaf = ca.leaf("edge", &["localhost"]);
    let (function, _) = start_function().await;
    let proxy = proxy_with(
        function,
        &common::tls::tls_server_lines(&[&leaf], ""),
        |_| {},
    )
    .await;
    let tls_addr = proxy.tls_addr.expect("tls_listen");
    let tls = common::tls::tls_connect(&ca, tls_addr, "localhost")
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let (status, headers, body) = send(
        &mut sender,
        request("POST", "/echo", Bytes::from_static(b"secret")),
    )
    .await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"secret"[..]));
    assert_eq!(header(&headers, "x-seen-proto"), "https");
    let rows = ended_rows(&proxy, 1).await;
    assert!(
        rows[0]["data_plane"]
            .as_str()
            .unwrap()
            .starts_with("userspace-"),
        "{rows:?}"
    );
    proxy.stop().await;
}
