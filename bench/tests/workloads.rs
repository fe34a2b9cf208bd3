//! Each workload against the in-process echo server, with small numbers: the reports must
//! show real traffic, not just a clean exit.

mod common;

use std::time::Duration;

use bench::{LoadConfig, Report, Workload, run_load};
use common::Echo;

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
    }
}

fn assert_clean(r: &Report) {
    assert_eq!(r.connect_errors, 0, "{r:#?}");
    assert_eq!(r.errors, 0, "{r:#?}");
    assert!(
        r.connections_established == r.connections_requested,
        "{r:#?}"
    );
    assert!((0.9..1.5).contains(&r.duration_s), "{r:#?}");
    assert!(r.rtt_us.count > 0 && r.rtt_us.p50 > 0, "{r:#?}");
    assert!(
        r.rtt_us.p50 <= r.rtt_us.p99 && r.rtt_us.p99 <= r.rtt_us.max,
        "{r:#?}"
    );
    assert!(r.rss_kb_before > 0 && r.rss_kb_after > 0, "{r:#?}");
    assert!(r.cpu_total_s > 0.0, "{r:#?}");
}

#[test]
fn edge_echoes_what_it_sends_at_the_offered_rate() {
    let echo = Echo::start(2);
    let r = run_load(&config(echo.url(), Workload::Edge, 20, 512)).unwrap();
    assert_clean(&r);
    assert_eq!(r.offered_msgs_per_s, Some(400.0));
    // 20 connections x 20/s for ~1 s.
    assert!((360..=440).contains(&r.messages_sent), "{r:#?}");
    assert!(r.messages_received * 10 >= r.messages_sent * 9, "{r:#?}");
    assert!(r.msgs_per_s > 300.0, "{r:#?}");
    assert_eq!(r.handshakes, 0);
}

#[test]
fn bulk_moves_large_messages() {
    let echo = Echo::start(1);
    let r = run_load(&config(echo.url(), Workload::Bulk, 2, 64 << 10)).unwrap();
    assert_clean(&r);
    assert!(r.messages_received > 10, "{r:#?}");
    assert!(r.messages_sent >= r.messages_received, "{r:#?}");
    assert_eq!(r.offered_msgs_per_s, None);
}

#[test]
fn handshake_workload_cycles_connections() {
    let echo = Echo::start(1);
    let r = run_load(&config(echo.url(), Workload::Handshake, 4, 64)).unwrap();
    assert_clean(&r);
    assert!(r.iterations > 10, "{r:#?}");
    assert!(r.handshakes >= r.iterations, "{r:#?}");
    assert!(r.handshakes_per_s > 10.0, "{r:#?}");
}

#[test]
fn push_receives_what_the_backend_sends_at_the_asked_rate() {
    let echo = Echo::start(1);
    let mut cfg = config(echo.push_url(), Workload::Push, 20, 512);
    cfg.rate = 10.0;
    cfg.duration = Duration::from_secs(2);
    let r = run_load(&cfg).unwrap();
    assert_eq!((r.connect_errors, r.errors), (0, 0), "{r:#?}");
    assert_eq!(r.connections_established, 20, "{r:#?}");
    assert!((1.9..2.5).contains(&r.duration_s), "{r:#?}");
    assert_eq!(r.offered_msgs_per_s, Some(200.0));
    // The client only receives: 20 connections x 10/s for ~2 s.
    assert_eq!(r.messages_sent, 0, "{r:#?}");
    assert!((340..=460).contains(&r.messages_received), "{r:#?}");
    assert!(r.msgs_per_s > 150.0, "{r:#?}");
    // One-way latency from the backend's CLOCK_MONOTONIC stamp: a clock mix-up would show as
    // all zeros (clamped to 1 µs) or as the machine's uptime.
    assert!(
        r.rtt_us.count == r.messages_received && r.rtt_us.p50 >= 2,
        "{r:#?}"
    );
    assert!(r.rtt_us.max < 10_000_000, "{r:#?}");
    assert!(r.cpu_busy_s > 0.0, "{r:#?}");
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
}
