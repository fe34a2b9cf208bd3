use std::{sync::Arc, time::Duration};

use proxy_common::{SideState, policy::Ending, rate::RateState};

use super::*;
use crate::{
    conn::{Direction, Limits, NewConnection, PlaneName},
    registry::Registry as Connections,
};

fn scrape(connections: &Connections) -> Scrape<'_> {
    Scrape {
        connections,
        live: None,
        functions: vec!["echo".into()],
        instances: vec![],
        programs: None,
    }
}

fn encode(m: &Metrics) -> String {
    m.encode(scrape(&Connections::default()))
}

fn side(bytes: u64, messages: u64) -> SideState {
    SideState {
        bytes,
        messages,
        ..SideState::default()
    }
}

fn has(text: &str, line: &str) {
    assert!(text.contains(&format!("{line}\n")), "{line} in:\n{text}");
}

#[test]
fn counters_render_per_label_set_with_their_existing_names() {
    let m = Metrics::default();
    m.handshake_error("echo", 429, "function_busy");
    m.handshake_error("echo", 429, "function_busy");
    m.handshake_error("", 404, "no_function");
    m.instance_started("echo");
    m.connection_ended("echo", Some(200));
    m.connection_ended("echo", None);
    m.http_request("echo", 502);
    m.tls_handshake("timeout");
    let text = encode(&m);
    has(&text, "# TYPE wsedge_handshake_errors_total counter");
    has(
        &text,
        "wsedge_handshake_errors_total{function=\"echo\",status=\"429\",error_type=\"function_busy\"} 2",
    );
    has(
        &text,
        "wsedge_handshake_errors_total{function=\"\",status=\"404\",error_type=\"no_function\"} 1",
    );
    has(&text, "wsedge_instance_starts_total{function=\"echo\"} 1");
    has(
        &text,
        "wsedge_connections_ended_total{function=\"echo\",status=\"200\"} 1",
    );
    has(
        &text,
        "wsedge_connections_ended_total{function=\"echo\",status=\"error\"} 1",
    );
    has(
        &text,
        "wsedge_http_requests_total{function=\"echo\",status=\"502\"} 1",
    );
    has(&text, "wsedge_tls_handshakes_total{result=\"timeout\"} 1");
    assert!(!text.contains("wsedge_instance_crashes_total{"), "{text}");
    assert!(!text.contains("_total_total"), "{text}");
}

#[test]
fn traffic_and_quota_events_count_per_function_and_direction() {
    let m = Metrics::default();
    let f: Arc<str> = "echo".into();
    m.connection_traffic(1, &f, &[side(100, 3), side(40, 2)]);
    m.connection_traffic(2, &f, &[side(1, 1), side(0, 0)]);
    m.quota_ending("echo", Ending::MessageTooBig);
    m.quota_ending("echo", Ending::RateExceeded);
    m.quota_ending("echo", Ending::IdleTimeout);
    m.throttled("echo");
    let text = encode(&m);
    for line in [
        "# TYPE wsedge_bytes_total counter",
        "wsedge_bytes_total{function=\"echo\",direction=\"in\"} 101",
        "wsedge_bytes_total{function=\"echo\",direction=\"out\"} 40",
        "wsedge_messages_total{function=\"echo\",direction=\"in\"} 4",
        "wsedge_messages_total{function=\"echo\",direction=\"out\"} 2",
        "wsedge_quota_events_total{function=\"echo\",kind=\"message_too_big\"} 1",
        "wsedge_quota_events_total{function=\"echo\",kind=\"rate_close\"} 1",
        "wsedge_quota_events_total{function=\"echo\",kind=\"throttled\"} 1",
    ] {
        has(&text, line);
    }
    assert_eq!(text.matches("wsedge_quota_events_total{").count(), 3);
}

#[test]
fn histograms_have_buckets_sum_and_count_in_seconds() {
    let m = Metrics::default();
    m.handshake_done("echo", Duration::from_millis(3));
    m.handshake_done("echo", Duration::from_millis(40));
    m.instance_ready("echo", Duration::from_millis(250));
    m.tls_handshake_done(Duration::from_millis(2));
    (m.ledger_write_lag())(Duration::from_micros(300));
    let text = encode(&m);
    for line in [
        "# TYPE wsedge_handshake_duration_seconds histogram",
        "wsedge_handshake_duration_seconds_bucket{function=\"echo\",le=\"0.004\"} 1",
        "wsedge_handshake_duration_seconds_bucket{function=\"echo\",le=\"+Inf\"} 2",
        "wsedge_handshake_duration_seconds_count{function=\"echo\"} 2",
        "wsedge_instance_cold_start_seconds_count{function=\"echo\"} 1",
        "wsedge_tls_handshake_duration_seconds_count 1",
        "wsedge_tls_handshakes_total{result=\"ok\"} 1",
        "wsedge_ledger_write_lag_seconds_bucket{le=\"0.0005\"} 1",
        "wsedge_ledger_write_lag_seconds_count 1",
    ] {
        has(&text, line);
    }
    let sum = text
        .lines()
        .find_map(|l| l.strip_prefix("wsedge_handshake_duration_seconds_sum{function=\"echo\"} "))
        .map(|v| v.parse::<f64>().unwrap());
    assert!(sum.is_some_and(|s| (s - 0.043).abs() < 1e-9), "{text}");
    assert!(text.contains("# HELP wsedge_ledger_write_lag_seconds Time from a billing ledger change being queued until its transaction committed.\n"), "{text}");
}

fn register(connections: &Arc<Connections>, plane: PlaneName) -> crate::registry::Registered {
    let reservation = connections.reserve(10).unwrap();
    connections.register(
        reservation,
        NewConnection {
            tracer: crate::tracer::Tracer::new(None),
            function: "echo".into(),
            instance: "echo-1".into(),
            client: "127.0.0.1:1".parse().unwrap(),
            plane,
            limits: Limits {
                idle_timeout_s: 10,
                execution_timeout_s: 10,
                max_message_bytes: 1000,
                rate: RateState::default(),
            },
        },
    )
}

#[test]
fn open_connections_show_live_and_by_data_plane() {
    let m = Metrics::default();
    let connections = Arc::new(Connections::default());
    m.connection("echo", "kernel");
    m.connection("echo", "userspace");
    let a = register(&connections, PlaneName::Userspace);
    a.conn.account(Direction::ClientToInstance, |s| {
        s.messages = 2;
        s.bytes = 20;
    });
    let text = m.encode(scrape(&connections));
    for line in [
        "wsedge_connections_total{function=\"echo\",data_plane=\"userspace\"} 1",
        "wsedge_connections_open{function=\"echo\",data_plane=\"userspace\"} 1",
        "wsedge_connections_open{function=\"echo\",data_plane=\"kernel\"} 0",
        "wsedge_connections_throttled{function=\"echo\"} 0",
        "wsedge_messages_total{function=\"echo\",direction=\"in\"} 2",
        "wsedge_bytes_total{function=\"echo\",direction=\"in\"} 20",
        "wsedge_messages_total{function=\"echo\",direction=\"out\"} 0",
    ] {
        has(&text, line);
    }
    // It ends: counted once while it is still registered, and once gone.
    a.conn
        .account(Direction::ClientToInstance, |s| s.messages = 3);
    let sides = a.conn.sides();
    m.connection_traffic(a.conn.id.key, &a.conn.function, &sides);
    has(
        &m.encode(scrape(&connections)),
        "wsedge_messages_total{function=\"echo\",direction=\"in\"} 3",
    );
    drop(a);
    let text = m.encode(scrape(&connections));
    has(
        &text,
        "wsedge_messages_total{function=\"echo\",direction=\"in\"} 3",
    );
    has(
        &text,
        "wsedge_connections_open{function=\"echo\",data_plane=\"userspace\"} 0",
    );
}

#[test]
fn bpf_program_counters_appear_only_when_the_kernel_counts() {
    let m = Metrics::default();
    assert!(!encode(&m).contains("wsedge_bpf_program"));
    let connections = Connections::default();
    let text = m.encode(Scrape {
        programs: Some(vec![ProgramStats {
            name: "parse".into(),
            runs: 12,
            run_time: Duration::from_micros(1500),
        }]),
        ..scrape(&connections)
    });
    has(&text, "wsedge_bpf_program_runs_total{program=\"parse\"} 12");
    has(
        &text,
        "wsedge_bpf_program_run_seconds_total{program=\"parse\"} 0.0015",
    );
}

#[test]
fn label_values_are_escaped() {
    let m = Metrics::default();
    m.instance_started("a\"b\\c\nd");
    has(
        &encode(&m),
        "wsedge_instance_starts_total{function=\"a\\\"b\\\\c\\nd\"} 1",
    );
}
