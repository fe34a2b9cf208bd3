//! `wss://`: TLS termination with verifying clients (tokio-tungstenite over rustls, Python
//! `websockets` with `ssl`), certificates by SNI and on reload, the handshake's timeout and
//! garbage, and the same policy (limits, close codes, statuses, drain) as `ws://`. Every
//! test prints the TLS path it ran on: kernel TLS where the kernel has it, rustls otherwise.

mod common;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{tls::*, *};
use futures_util::{SinkExt, StreamExt};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_tungstenite::tungstenite::{
    Message,
    protocol::{CloseFrame, frame::coding::CloseCode},
};
use wsedge::config::DataPlaneMode;

/// The plane a `wss://` connection must report on this kernel. Decided from the kernel, not
/// from wsedge: `/proc/net/tls_stat` exists once the kernel's TLS is loaded (wsedge's start-up
/// probe loads the module where there is one).
fn expected_tls_plane() -> &'static str {
    let plane = if std::path::Path::new("/proc/net/tls_stat").exists() {
        "userspace-ktls"
    } else {
        "userspace-tls"
    };
    eprintln!("TLS path on this kernel: {plane}");
    plane
}

struct TlsProxy {
    proxy: Proxy,
    ca: TestCa,
    addr: SocketAddr,
}

/// wsedge with `tls_listen` (a `localhost` and 127.0.0.1 certificate) in front of the echo
/// function, on `plane`, with `extra` `[server]` lines.
async fn tls_proxy(plane: DataPlaneMode, extra: &str) -> TlsProxy {
    let ca = TestCa::new();
    let leaf = ca.leaf("site", &["localhost", "127.0.0.1"]);
    let echo = start_echo().await;
    let proxy = start_proxy(config(plane, echo, &tls_server_lines(&[&leaf], extra))).await;
    let addr = proxy.tls_addr.expect("tls_listen bound");
    TlsProxy { proxy, ca, addr }
}

#[tokio::test]
async fn wss_echoes_small_64k_and_256k_messages_on_the_tls_path_of_this_kernel() {
    let t = tls_proxy(DataPlaneMode::Auto, "").await;
    let mut ws = wss_open(&t.ca, t.addr, "/echo").await;
    echo_once(&mut ws, "hello over wss").await;
    for size in [64 * 1024, 256 * 1024] {
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        ws.send(Message::binary(payload.clone())).await.unwrap();
        assert_eq!(
            recv(&mut ws).await,
            Message::binary(payload),
            "{size} bytes"
        );
    }
    let conns = t.proxy.connections().await;
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_eq!(conns[0].data_plane, expected_tls_plane());
    assert!(conns[0].tls);
    if expected_tls_plane() == "userspace-ktls" {
        // The kernel's own count of sockets it encrypts and decrypts in software.
        let stat = std::fs::read_to_string("/proc/net/tls_stat").unwrap();
        for counter in ["TlsCurrTxSw", "TlsCurrRxSw"] {
            let open: u64 = stat
                .lines()
                .find_map(|l| l.strip_prefix(counter)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("{counter} in {stat}"));
            assert!(
                open >= 1,
                "{counter} {open}: the kernel holds the session\n{stat}"
            );
        }
    }
    assert_eq!(conns[0].messages_in, 3);
    ws.close(None).await.unwrap();
    read_to_end_of(&mut ws).await;
    t.proxy
        .assert_one_ended_with(200, "client closed with 1000 over wss")
        .await;
    let metrics = t.proxy.metrics().await;
    assert_eq!(
        metric_value(&metrics, "wsedge_tls_handshakes_total{result=\"ok\"}"),
        Some(1),
        "{metrics}"
    );
}

#[tokio::test]
#[allow(clippy::result_large_err)] // tungstenite's callback type, not ours
async fn the_function_is_told_wss_the_client_address_and_the_connection_id() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let instance = listener.local_addr().unwrap();
    let (tx, mut heads) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let capture = |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
            let _ = tx.send(req.headers().clone());
            Ok(resp)
        };
        let mut ws = tokio_tungstenite::accept_hdr_async(stream, capture)
            .await
            .unwrap();
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_text() && ws.send(msg).await.is_err() {
                return;
            }
        }
    });
    let ca = TestCa::new();
    let leaf = ca.leaf("site", &["localhost"]);
    let proxy = start_proxy(config(
        DataPlaneMode::Auto,
        instance,
        &tls_server_lines(&[&leaf], ""),
    ))
    .await;
    let mut ws = wss_open(&ca, proxy.tls_addr.unwrap(), "/echo").await;
    echo_once(&mut ws, "who am I").await;
    let headers = heads.recv().await.unwrap();
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_string());
    assert_eq!(header("x-forwarded-proto").as_deref(), Some("wss"));
    assert_eq!(header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    let id = header("x-wsedge-connection-id").expect("connection id header");
    assert_eq!(proxy.connections().await[0].id, id);
}

#[tokio::test]
async fn a_message_over_the_limit_on_wss_is_closed_with_1009_and_status_429() {
    let t = tls_proxy(DataPlaneMode::Auto, "").await;
    let mut ws = wss_open(&t.ca, t.addr, "/echo").await;
    echo_once(&mut ws, "fits").await;
    ws.send(Message::binary(vec![7u8; 300 * 1024]))
        .await
        .unwrap();
    assert_eq!(proxy_close_code(&mut ws, WAIT).await, Some(1009));
    t.proxy
        .assert_one_ended_with(429, "message over max_message_bytes on wss")
        .await;
}

#[tokio::test]
async fn close_codes_on_wss_give_the_same_statuses_as_on_ws() {
    let t = tls_proxy(DataPlaneMode::Auto, "").await;
    // The function closes with 4000: the client sees it, status 439.
    let mut ws = wss_open(&t.ca, t.addr, "/echo").await;
    ws.send(Message::text("close:4000")).await.unwrap();
    assert_eq!(proxy_close_code(&mut ws, WAIT).await, Some(4000));
    drop(ws);
    t.proxy
        .assert_one_ended_with(439, "function closed with 4000")
        .await;
    // The client closes with 4001: status 456.
    let mut ws = wss_open(&t.ca, t.addr, "/echo").await;
    echo_once(&mut ws, "then close").await;
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4001),
        reason: "".into(),
    }))
    .await
    .unwrap();
    read_to_end_of(&mut ws).await;
    t.proxy
        .assert_one_ended_with(456, "client closed with 4001")
        .await;
}

#[tokio::test]
async fn a_drain_closes_wss_connections_with_1001() {
    let mut t = tls_proxy(DataPlaneMode::Auto, "").await;
    let mut ws = wss_open(&t.ca, t.addr, "/echo").await;
    echo_once(&mut ws, "before the drain").await;
    t.proxy.begin_stop();
    assert_eq!(proxy_close_code(&mut ws, WAIT).await, Some(1001));
}

#[tokio::test]
async fn handshake_errors_on_wss_get_the_same_statuses() {
    let t = tls_proxy(DataPlaneMode::Auto, "").await;
    for (request, status) in [
        (upgrade_request("/nowhere", ""), 404),
        (
            UPGRADE
                .replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8")
                .into_bytes(),
            426,
        ),
    ] {
        let mut tls = tls_connect(&t.ca, t.addr, "localhost").await.unwrap();
        tls.write_all(&request).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(WAIT, tls.read_to_end(&mut out))
            .await
            .expect("answered and closed")
            .ok();
        assert_eq!(parse_error_response(&out).0, status);
    }
}

#[tokio::test]
async fn sni_picks_the_certificate_named_by_the_client() {
    let ca = TestCa::new();
    let a = ca.leaf("a", &["a.test", "127.0.0.1"]);
    let b = ca.leaf("b", &["b.test", "*.wild.test"]);
    let echo = start_echo().await;
    let proxy = start_proxy(config(
        DataPlaneMode::Auto,
        echo,
        &tls_server_lines(&[&a, &b], ""),
    ))
    .await;
    let addr = proxy.tls_addr.unwrap();
    for (name, leaf) in [
        ("a.test", &a),
        ("b.test", &b),
        ("x.wild.test", &b),
        // An IP address sends no SNI: the first certificate is the default.
        ("127.0.0.1", &a),
    ] {
        let tls = tls_connect(&ca, addr, name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let served = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        assert_eq!(served, leaf.der, "certificate for {name}");
    }
    // A name no certificate has gets the default, which the client rightly refuses.
    let err = tls_connect(&ca, addr, "c.test").await.unwrap_err();
    assert!(err.to_string().contains("not valid for name"), "{err}");
}

#[tokio::test]
async fn a_reload_swaps_the_certificate_keeps_open_connections_and_refuses_a_bad_one() {
    let t = tls_proxy(DataPlaneMode::Auto, "").await;
    let served = |tls: &tokio_rustls::client::TlsStream<TcpStream>| {
        tls.get_ref().1.peer_certificates().unwrap()[0].clone()
    };
    let first = served(&tls_connect(&t.ca, t.addr, "localhost").await.unwrap());
    let mut open = wss_open(&t.ca, t.addr, "/echo").await;
    echo_once(&mut open, "before the reload").await;

    let renewed = t.ca.leaf("site", &["localhost", "127.0.0.1"]);
    assert_ne!(renewed.der, first);
    t.proxy.state.reload_certificates();
    let now = served(&tls_connect(&t.ca, t.addr, "localhost").await.unwrap());
    assert_eq!(
        now, renewed.der,
        "new handshakes get the reloaded certificate"
    );
    echo_once(&mut open, "after the reload").await;

    // A broken certificate file: the reload is refused and the certificate in use stays.
    std::fs::write(&renewed.cert, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
    t.proxy.state.reload_certificates();
    let kept = served(&tls_connect(&t.ca, t.addr, "localhost").await.unwrap());
    assert_eq!(kept, renewed.der);
    // A key that does not belong to the certificate: refused too.
    let one = t.ca.leaf("one", &["localhost"]);
    let another = t.ca.leaf("another", &["localhost"]);
    std::fs::copy(&one.cert, &renewed.cert).unwrap();
    std::fs::copy(&another.key, &renewed.key).unwrap();
    t.proxy.state.reload_certificates();
    let kept = served(&tls_connect(&t.ca, t.addr, "localhost").await.unwrap());
    assert_eq!(kept, renewed.der);
    echo_once(&mut open, "still open").await;
}

#[tokio::test]
async fn an_expired_or_wrong_name_certificate_fails_the_clients_verification() {
    let ca = TestCa::new();
    let expired = ca.expired_leaf("expired", &["localhost"]);
    let elsewhere = ca.leaf("elsewhere", &["elsewhere.test"]);
    let echo = start_echo().await;
    for (leaf, why) in [(&expired, "expired"), (&elsewhere, "not valid for name")] {
        let proxy = start_proxy(config(
            DataPlaneMode::Auto,
            echo,
            &tls_server_lines(&[leaf], ""),
        ))
        .await;
        let err = tls_connect(&ca, proxy.tls_addr.unwrap(), "localhost")
            .await
            .unwrap_err();
        assert!(err.to_string().contains(why), "{why}: {err}");
        proxy.stop().await;
    }
}

#[tokio::test]
async fn a_client_stalling_mid_handshake_is_cut_at_the_timeout_and_holds_nothing() {
    let t = tls_proxy(
        DataPlaneMode::Auto,
        "tls_handshake_timeout_s = 1\nmax_connections_per_ip = 1\n",
    )
    .await;
    let mut stalled = TcpStream::connect(t.addr).await.unwrap();
    // The start of a ClientHello record, and then nothing.
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    let began = Instant::now();
    let mut buf = [0u8; 64];
    let cut = tokio::time::timeout(WAIT, async {
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "the stalled client was cut");
    let after = began.elapsed();
    assert!(
        after >= Duration::from_millis(800) && after < Duration::from_secs(5),
        "cut after {after:?}, expected about 1 s"
    );
    // Its per-IP place is free again: the only one this IP has.
    let mut ws = wss_open(&t.ca, t.addr, "/echo").await;
    echo_once(&mut ws, "after the stalled one").await;
    let metrics = t.proxy.metrics().await;
    assert_eq!(
        metric_value(&metrics, "wsedge_tls_handshakes_total{result=\"timeout\"}"),
        Some(1),
        "{metrics}"
    );
}

#[tokio::test]
async fn plain_http_instead_of_a_client_hello_is_closed_cleanly() {
    let t = tls_proxy(DataPlaneMode::Auto, "").await;
    let mut s = TcpStream::connect(t.addr).await.unwrap();
    s.write_all(UPGRADE.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("closed in time")
        .ok();
    // Nothing but, at most, a TLS alert record: never an HTTP response in plaintext.
    assert!(out.is_empty() || out[0] == 0x15, "{out:?}");
    let mut ws = wss_open(&t.ca, t.addr, "/echo").await;
    echo_once(&mut ws, "still serving").await;
    let metrics = t.proxy.metrics().await;
    assert_eq!(
        metric_value(&metrics, "wsedge_tls_handshakes_total{result=\"failed\"}"),
        Some(1),
        "{metrics}"
    );
    assert!(t.proxy.connections().await.len() == 1);
}

#[tokio::test]
async fn alpn_settles_on_http_1_1() {
    let t = tls_proxy(DataPlaneMode::Auto, "").await;
    let tls = tls_connect(&t.ca, t.addr, "localhost").await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
}

#[tokio::test]
async fn python_websockets_with_ssl_echoes_through_wss() {
    require_python_peer();
    let t = tls_proxy(DataPlaneMode::Auto, "").await;
    let ca = t.ca.ca_file();
    let script = format!(
        r#"
import asyncio, ssl, websockets
async def main():
    ctx = ssl.create_default_context(cafile={ca:?})
    async with websockets.connect("wss://localhost:{port}/echo", ssl=ctx, max_size=None) as ws:
        for size in (5, 64 * 1024, 256 * 1024):
            msg = bytes(i % 251 for i in range(size))
            await ws.send(msg)
            assert await ws.recv() == msg, size
        print("echoed", flush=True)
asyncio.run(asyncio.wait_for(main(), 20))
"#,
        ca = ca.display().to_string(),
        port = t.addr.port()
    );
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("python3")
            .args(["-c", &script])
            .output(),
    )
    .await
    .expect("python finished in time")
    .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("echoed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = expected_tls_plane();
}

/// A TCP forwarder that records every byte in each direction.
struct Recorder {
    addr: SocketAddr,
    to_proxy: Arc<Mutex<Vec<u8>>>,
    to_client: Arc<Mutex<Vec<u8>>>,
}

async fn recorder(target: SocketAddr) -> Recorder {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let to_proxy = Arc::new(Mutex::new(Vec::new()));
    let to_client = Arc::new(Mutex::new(Vec::new()));
    let (up, down) = (to_proxy.clone(), to_client.clone());
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let proxy = TcpStream::connect(target).await.unwrap();
        let (cr, cw) = client.into_split();
        let (pr, pw) = proxy.into_split();
        tokio::join!(pump(cr, pw, up), pump(pr, cw, down));
    });
    Recorder {
        addr,
        to_proxy,
        to_client,
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    log: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 65536];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                log.lock().unwrap().extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

/// Walks `wire` as a sequence of TLS records and returns how many of each content type it
/// holds; panics at the first byte that is not part of a well-formed record.
fn tls_records(wire: &[u8], direction: &str) -> [usize; 4] {
    let mut counts = [0usize; 4];
    let mut at = 0;
    while at < wire.len() {
        assert!(
            at + 5 <= wire.len(),
            "{direction}: a cut record header at {at}"
        );
        let (kind, major, len) = (
            wire[at],
            wire[at + 1],
            u16::from_be_bytes([wire[at + 3], wire[at + 4]]) as usize,
        );
        assert!(
            (20..=23).contains(&kind) && major == 3 && len <= (1 << 14) + 256,
            "{direction}: not a TLS record header at {at}: {:?}",
            &wire[at..at + 5]
        );
        counts[(kind - 20) as usize] += 1;
        at += 5 + len;
    }
    assert_eq!(at, wire.len(), "{direction}: the last record is cut short");
    counts
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn every_byte_on_the_clients_wire_is_a_tls_record_both_ways() {
    let t = tls_proxy(DataPlaneMode::Auto, "").await;
    let rec = recorder(t.addr).await;
    let mut ws = wss_open(&t.ca, rec.addr, "/echo").await;
    let marker = "PLAINTEXT-MARKER";
    // Small, large, and fragmented (three frames of one message) messages, both ways.
    echo_once(&mut ws, &format!("{marker} small")).await;
    let large = marker.repeat(200 * 1024 / marker.len());
    echo_once(&mut ws, &large).await;
    use tokio_tungstenite::tungstenite::protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    };
    for (i, part) in [marker, "-middle-", marker].iter().enumerate() {
        let opcode = if i == 0 {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        let frame = Frame::message(part.as_bytes().to_vec(), opcode, i == 2);
        ws.send(Message::Frame(frame)).await.unwrap();
    }
    assert_eq!(
        recv(&mut ws).await,
        Message::text(format!("{marker}-middle-{marker}"))
    );
    // The proxy's own close frame (its reason is plaintext too).
    ws.send(Message::binary(vec![b'x'; 300 * 1024]))
        .await
        .unwrap();
    assert_eq!(proxy_close_code(&mut ws, WAIT).await, Some(1009));
    read_to_end_of(&mut ws).await;
    drop(ws);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (up, down) = (
        rec.to_proxy.lock().unwrap().clone(),
        rec.to_client.lock().unwrap().clone(),
    );
    for (wire, direction) in [(&up, "client -> proxy"), (&down, "proxy -> client")] {
        let [_, _, handshake, data] = tls_records(wire, direction);
        assert!(
            handshake >= 1 && data >= 4,
            "{direction}: {handshake} handshake, {data} data records"
        );
        for plain in [
            marker.as_bytes(),
            b"message too big",
            b"HTTP/1.1",
            b"websocket",
        ] {
            assert!(
                !contains(wire, plain),
                "{direction}: plaintext {:?} on the wire",
                String::from_utf8_lossy(plain)
            );
        }
    }
    let _ = expected_tls_plane();
}

#[tokio::test]
async fn a_wss_client_over_the_per_ip_limit_gets_429_over_tls() {
    let t = tls_proxy(DataPlaneMode::Auto, "max_connections_per_ip = 1\n").await;
    let mut first = wss_open(&t.ca, t.addr, "/echo").await;
    echo_once(&mut first, "the one this IP may have").await;
    let mut tls = tls_connect(&t.ca, t.addr, "localhost").await.unwrap();
    // The 429 comes without a request: the proxy answers as soon as TLS is up.
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, tls.read_to_end(&mut out))
        .await
        .expect("answered and closed")
        .ok();
    let (status, error_type, _) = parse_error_response(&out);
    assert_eq!((status, error_type.as_str()), (429, "too_many_connections"));
}

#[tokio::test]
async fn tls_1_2_and_1_3_clients_are_both_served() {
    use tokio_rustls::rustls::{ProtocolVersion, version};
    let t = tls_proxy(DataPlaneMode::Auto, "").await;
    for (version, expected) in [
        (&version::TLS12, ProtocolVersion::TLSv1_2),
        (&version::TLS13, ProtocolVersion::TLSv1_3),
    ] {
        let tls = tls_connect_with(t.ca.client_with(&[version]), t.addr, "localhost")
            .await
            .expect("handshake succeeds");
        assert_eq!(tls.get_ref().1.protocol_version(), Some(expected));
        let mut ws = wss_over(tls, t.addr, "/echo").await;
        echo_once(&mut ws, &format!("over {expected:?}")).await;
    }
}
