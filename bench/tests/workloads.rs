//! Each workload against the in-process echo server, with small numbers: the reports must
//! show real traffic, not just a clean exit. The checks are counts and the report's shape,
//! never how fast the machine was: bounds follow from the configuration (connections, one
//! message in flight, the window closing at its end), not from timing.

mod common;
mod tls_front;

use std::time::{Duration, Instant};

use bench::{LoadConfig, Report, Workload, run_load};
use common::Echo;
use tls_front::TlsFront;

/// What every wss:// connection of the bench should negotiate: the load generator's
/// `tls_sessions` key.
const TLS_SESSION: &str = "TLSv1_3 TLS13_AES_128_GCM_SHA256 X25519 Full";
/// The same, as [`TlsFront`] records it on its side.
const SERVER_SAW: &str = "Some(TLS13_AES_128_GCM_SHA256) Some(X25519) Some(Full)";

fn config(url: String, workload: Workload, connections: usize, size: usize) -> LoadConfig {
    LoadConfig {
        url,
        workload,
        connections,
        rate: 20.0,
        size,
        duration: Duration::from_secs(1),
        warmup: Duration::ZERO,
        rss_pids: vec![std::process::id()],
        connect_rate: 2000.0,
        trust: None,
    }
}

/// What every clean report shows, whatever the machine's speed: every connection up, no
/// error, latencies recorded for what was received (and only that), percentiles in order,
/// and the measurement window at least as long as asked (it closes at its end, never
/// before). Nothing here depends on how fast the run went.
fn assert_clean(r: &Report, cfg: &LoadConfig) {
    assert_eq!(r.connect_errors, 0, "{r:#?}");
    assert_eq!(r.errors, 0, "{r:#?}");
    assert_eq!(r.connections_requested, cfg.connections, "{r:#?}");
    assert_eq!(r.connections_established, cfg.connections, "{r:#?}");
    assert!(r.duration_s >= cfg.duration.as_secs_f64(), "{r:#?}");
    assert!(r.rtt_us.p50 > 0, "{r:#?}");
    assert!(
        r.rtt_us.p50 <= r.rtt_us.p99 && r.rtt_us.p99 <= r.rtt_us.p999,
        "{r:#?}"
    );
    assert!(r.rtt_us.p999 <= r.rtt_us.max, "{r:#?}");
    assert!(r.rss_kb_before > 0 && r.rss_kb_after > 0, "{r:#?}");
    assert!(r.cpu_total_s > 0.0, "{r:#?}");
    assert!((0.0..=1.0).contains(&r.cpu_busy_fraction), "{r:#?}");
}

/// The report's rate is its count over its window.
fn assert_rate_matches(rate: f64, count: u64, r: &Report) {
    let expected = count as f64 / r.duration_s;
    assert!(
        (rate - expected).abs() <= 1e-6 * expected.max(1.0),
        "{rate} is not {count} / {}: {r:#?}",
        r.duration_s
    );
}

#[test]
fn edge_echoes_what_it_sends_at_the_offered_rate() {
    let echo = Echo::start(2);
    let cfg = config(echo.url(), Workload::Edge, 20, 512);
    let r = run_load(&cfg).unwrap();
    assert_clean(&r, &cfg);
    // 20 connections x 20/s each.
    assert_eq!(r.offered_msgs_per_s, Some(400.0));
    // Every message is sent and echoed inside the window, so an echo counted there answers a
    // message counted there: received <= sent, and each one has its round trip recorded.
    assert!(r.messages_received > 0, "real traffic: {r:#?}");
    assert!(r.messages_received <= r.messages_sent, "{r:#?}");
    assert_eq!(r.rtt_us.count, r.messages_received, "{r:#?}");
    assert!(r.late_sends <= r.messages_sent, "{r:#?}");
    assert_rate_matches(r.msgs_per_s, r.messages_received, &r);
    assert_eq!((r.handshakes, r.iterations), (0, 0), "{r:#?}");
}

#[test]
fn bulk_moves_large_messages() {
    let echo = Echo::start(1);
    let cfg = config(echo.url(), Workload::Bulk, 2, 64 << 10);
    let r = run_load(&cfg).unwrap();
    assert_clean(&r, &cfg);
    assert!(r.messages_received > 0, "real traffic: {r:#?}");
    // One message in flight per connection: each connection sent what it got back, plus at
    // most the one still in flight when the window closed.
    assert!(r.messages_sent >= r.messages_received, "{r:#?}");
    assert!(
        r.messages_sent - r.messages_received <= cfg.connections as u64,
        "{r:#?}"
    );
    assert_eq!(r.rtt_us.count, r.messages_received, "{r:#?}");
    assert_rate_matches(r.msgs_per_s, r.messages_received, &r);
    assert_eq!(r.offered_msgs_per_s, None);
}

#[test]
fn handshake_workload_cycles_connections() {
    let echo = Echo::start(1);
    let cfg = config(echo.url(), Workload::Handshake, 4, 64);
    let r = run_load(&cfg).unwrap();
    assert_clean(&r, &cfg);
    // A cycle is connect, upgrade, one echo, close: each counted one has its handshake.
    assert!(r.iterations > 0, "real traffic: {r:#?}");
    assert!(r.handshakes >= r.iterations, "{r:#?}");
    assert_rate_matches(r.handshakes_per_s, r.handshakes, &r);
    assert_eq!(r.offered_msgs_per_s, None);
}

#[test]
fn push_receives_what_the_backend_sends_at_the_asked_rate() {
    let echo = Echo::start(1);
    let mut cfg = config(echo.push_url(), Workload::Push, 20, 512);
    cfg.rate = 10.0;
    cfg.duration = Duration::from_secs(2);
    let started = Instant::now();
    let r = run_load(&cfg).unwrap();
    let ran_us = started.elapsed().as_micros() as u64;
    assert_eq!((r.connect_errors, r.errors), (0, 0), "{r:#?}");
    assert_eq!(r.connections_established, 20, "{r:#?}");
    assert!(r.duration_s >= cfg.duration.as_secs_f64(), "{r:#?}");
    // 20 connections x the asked 10/s.
    assert_eq!(r.offered_msgs_per_s, Some(200.0));
    // The client only receives.
    assert_eq!(r.messages_sent, 0, "{r:#?}");
    assert!(r.messages_received > 0, "real traffic: {r:#?}");
    assert_rate_matches(r.msgs_per_s, r.messages_received, &r);
    // One-way latency from the backend's CLOCK_MONOTONIC stamp, one per message received. A
    // clock mix-up would show as all zeros (clamped to 1 µs) or as the machine's uptime (more
    // than this run lasted, which bounds every message's trip).
    assert_eq!(r.rtt_us.count, r.messages_received, "{r:#?}");
    assert!(r.rtt_us.p50 >= 2, "{r:#?}");
    assert!(
        r.rtt_us.max <= ran_us,
        "longer than the run ({ran_us} µs): {r:#?}"
    );
}

fn tls_config(front: &TlsFront, workload: Workload, connections: usize, size: usize) -> LoadConfig {
    let mut cfg = config(front.url(), workload, connections, size);
    cfg.trust = Some(front.dir.join("cert.pem"));
    cfg
}

/// Every connection the client upgraded negotiated the one suite and group in a full
/// handshake, and the server saw the same of every handshake it completed, `upgraded` or more.
/// (A handshake the client dropped half-done, as the handshake workload's drain can when it
/// times out, fails on the server's side: what it proves is on the client's.)
fn assert_tls(r: &Report, front: &TlsFront, upgraded: u64) {
    assert_eq!(
        r.tls_sessions,
        [(TLS_SESSION.to_string(), upgraded)].into(),
        "{r:#?}"
    );
    let seen = front.handshakes();
    let done: Vec<&String> = seen.iter().filter(|h| !h.starts_with("failed")).collect();
    assert!(done.len() as u64 >= upgraded, "{seen:?}");
    assert!(done.iter().all(|h| *h == SERVER_SAW), "{seen:?}");
}

#[test]
fn wss_edge_echoes_through_tls() {
    let echo = Echo::start(1);
    let front = TlsFront::start(echo.addr);
    let cfg = tls_config(&front, Workload::Edge, 20, 512);
    let r = run_load(&cfg).unwrap();
    assert_clean(&r, &cfg);
    assert_eq!(r.offered_msgs_per_s, Some(400.0));
    assert!(r.messages_received > 0, "real traffic: {r:#?}");
    assert!(r.messages_received <= r.messages_sent, "{r:#?}");
    assert_eq!(r.rtt_us.count, r.messages_received, "{r:#?}");
    assert_tls(&r, &front, 20);
}

#[test]
fn wss_bulk_moves_messages_of_many_records() {
    // 200 KB: a dozen TLS records each way, more than rustls holds as plaintext at once.
    let echo = Echo::start(1);
    let front = TlsFront::start(echo.addr);
    let cfg = tls_config(&front, Workload::Bulk, 2, 200_000);
    let r = run_load(&cfg).unwrap();
    assert_clean(&r, &cfg);
    assert!(r.messages_received > 0, "real traffic: {r:#?}");
    assert!(r.messages_sent >= r.messages_received, "{r:#?}");
    assert!(
        r.messages_sent - r.messages_received <= cfg.connections as u64,
        "{r:#?}"
    );
    assert_tls(&r, &front, 2);
}

#[test]
fn wss_handshakes_are_full_every_time() {
    // The front sends session tickets; a client that used one would show as Resumed.
    let echo = Echo::start(1);
    let front = TlsFront::start(echo.addr);
    let cfg = tls_config(&front, Workload::Handshake, 4, 64);
    let r = run_load(&cfg).unwrap();
    assert_clean(&r, &cfg);
    assert!(r.iterations > 0, "real traffic: {r:#?}");
    assert!(r.handshakes >= r.iterations, "{r:#?}");
    assert_rate_matches(r.handshakes_per_s, r.handshakes, &r);
    // Whole-run counts: every upgrade of the run, warm-up and drain included.
    let upgraded = r.tls_sessions.values().sum::<u64>();
    assert!(upgraded >= r.handshakes, "{r:#?}");
    assert_tls(&r, &front, upgraded);
}

#[test]
fn wss_refuses_a_certificate_it_does_not_pin() {
    let echo = Echo::start(1);
    let front = TlsFront::start(echo.addr);
    let mut cfg = tls_config(&front, Workload::Edge, 3, 64);
    // The CA that signed the served certificate is not the certificate.
    cfg.trust = Some(front.dir.join("ca.pem"));
    cfg.duration = Duration::from_millis(100);
    let r = run_load(&cfg).unwrap();
    assert_eq!((r.connections_established, r.connect_errors), (0, 3));
    assert!(r.tls_sessions.is_empty(), "{r:#?}");
}

#[test]
fn unreachable_target_counts_connect_errors() {
    // Bind then drop a listener so the port is (almost certainly) closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = config(format!("ws://127.0.0.1:{port}/"), Workload::Edge, 3, 64);
    cfg.duration = Duration::from_millis(100);
    let r = run_load(&cfg).unwrap();
    assert_eq!((r.connections_established, r.connect_errors), (0, 3));
}

#[test]
fn usage_errors_are_invalid_input() {
    let mut cfg = config("http://127.0.0.1:1/".into(), Workload::Edge, 1, 64);
    let e = run_load(&cfg).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    cfg.url = "ws://127.0.0.1:1/".into();
    cfg.size = 4;
    assert_eq!(
        run_load(&cfg).unwrap_err().kind(),
        std::io::ErrorKind::InvalidInput
    );
    // wss:// without a certificate to trust.
    cfg.url = "wss://localhost:1/".into();
    cfg.size = 64;
    assert_eq!(
        run_load(&cfg).unwrap_err().kind(),
        std::io::ErrorKind::InvalidInput
    );
}
