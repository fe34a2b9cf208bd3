//! `/metrics` against the billing ledger: a run of `ws://` and `wss://` connections to a
//! spawned function on each data plane, one refused handshake, then the exposition (parsed
//! as Prometheus text) agrees with `/billing` on messages, bytes and connections by data
//! plane; the histograms counted every handshake and cold start; the ledger's write lag was
//! observed; and on the kernel plane with `bpf_stats` the eBPF programs' runs were counted.
//! The traffic series are live: an open connection's messages show before it ends.

mod common;

use std::collections::BTreeMap;

use common::{tls::*, *};
use futures_util::{SinkExt, StreamExt};
use prometheus_parse::{Sample, Scrape, Value};
use tokio_tungstenite::tungstenite::{
    self, Message,
    protocol::{CloseFrame, frame::coding::CloseCode},
};

fn echo_function() -> String {
    format!(
        "name = \"echo\"\nroute = \"/echo\"\ncommand = [{:?}]\nmax_instances = 8\n",
        echo_fn().display().to_string()
    )
}

fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text")
}

/// The value of the one sample of `name` with exactly `labels`.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<&Sample> = scrape
        .samples
        .iter()
        .filter(|s| {
            s.metric == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
        .collect();
    assert!(matching.len() <= 1, "{name} {labels:?}: {matching:?}");
    matching.first().map(|s| match &s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{name}: {other:?}"),
    })
}

/// Every sample of `name`: (labels as `k=v,..`, value).
fn all(scrape: &Scrape, name: &str) -> Vec<(String, f64)> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter_map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => {
                Some((s.labels.to_string(), *v))
            }
            _ => None,
        })
        .collect()
}

fn traffic(scrape: &Scrape, what: &str, direction: &str) -> Option<f64> {
    value(
        scrape,
        &format!("wsedge_{what}_total"),
        &[("function", "echo"), ("direction", direction)],
    )
}

/// Polls `/metrics` until `done` holds, or fails the test after 10 s.
async fn metrics_until(proxy: &Proxy, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let text = poll_until(WAIT, what, || proxy.metrics(), |text| done(&parse(text))).await;
    parse(&text)
}

/// Sends `n` text messages and reads each echo.
async fn exchange<S>(ws: &mut S, n: usize, tag: &str)
where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>>
        + futures_util::Sink<Message, Error = tungstenite::Error>
        + Unpin,
{
    for i in 0..n {
        let text = format!("{tag} {i} {}", "x".repeat(i * 40));
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(recv(ws).await, Message::text(text));
    }
}

async fn close<S>(mut ws: S)
where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>>
        + futures_util::Sink<Message, Error = tungstenite::Error>
        + Unpin,
{
    let normal = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    ws.send(Message::Close(Some(normal))).await.unwrap();
    tokio::time::timeout(WAIT, async { while let Some(Ok(_)) = ws.next().await {} })
        .await
        .expect("the WebSocket ended in time");
}

async fn a_run_agrees_with_the_ledger(plane: &str) {
    let ca = TestCa::new();
    let leaf = ca.leaf("site", &["localhost", "127.0.0.1"]);
    let kernel = plane == "kernel";
    let extra = tls_server_lines(&[&leaf], if kernel { "bpf_stats = true" } else { "" });
    let proxy = start_proxy(function_config(plane, &extra, &echo_function())).await;
    let tls_addr = proxy.tls_addr.expect("tls_listen bound");

    match connect(proxy.url("/nope")).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 404),
        other => panic!("an upgrade to /nope is refused with 404, got {other:?}"),
    }

    // Live: what an open connection sent and received shows before it ends.
    let mut first = open(&proxy).await;
    exchange(&mut first, 3, "first").await;
    metrics_until(&proxy, "3 messages each way on the open connection", |s| {
        traffic(s, "messages", "in") == Some(3.0) && traffic(s, "messages", "out") == Some(3.0)
    })
    .await;
    exchange(&mut first, 2, "first more").await;
    let live = metrics_until(&proxy, "5 messages each way, still open", |s| {
        traffic(s, "messages", "in") == Some(5.0) && traffic(s, "messages", "out") == Some(5.0)
    })
    .await;
    let conns = proxy.connections().await;
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_eq!(
        value(
            &live,
            "wsedge_connections_open",
            &[("function", "echo"), ("data_plane", &conns[0].data_plane)]
        ),
        Some(1.0),
        "{:?}",
        all(&live, "wsedge_connections_open")
    );
    assert!(traffic(&live, "bytes", "in").unwrap() > 0.0);

    // While it stays open: two more ws:// and two wss:// connections, one after the other.
    for n in [4, 1] {
        let mut ws = open(&proxy).await;
        exchange(&mut ws, n, "ws").await;
        close(ws).await;
    }
    for n in [2, 6] {
        let mut wss = wss_open(&ca, tls_addr, "/echo").await;
        exchange(&mut wss, n, "wss").await;
        close(wss).await;
    }
    close(first).await;
    proxy.wait_no_connections().await;
    let rows = billing_until(
        proxy.admin,
        |rows| rows.len() == 5 && rows.iter().all(|r| r.ended_at.is_some()),
        "5 ended connections in the ledger",
    )
    .await;

    let text = proxy.metrics().await;
    let m = parse(&text);
    let sum = |f: fn(&wsedge::ledger::LedgerRow) -> u64| rows.iter().map(f).sum::<u64>() as f64;
    assert_eq!(sum(|r| r.messages_in), 3.0 + 2.0 + 4.0 + 1.0 + 2.0 + 6.0);
    for (what, direction, billed) in [
        ("messages", "in", sum(|r| r.messages_in)),
        ("messages", "out", sum(|r| r.messages_out)),
        ("bytes", "in", sum(|r| r.bytes_in)),
        ("bytes", "out", sum(|r| r.bytes_out)),
    ] {
        assert_eq!(
            traffic(&m, what, direction),
            Some(billed),
            "wsedge_{what}_total {direction} against the ledger:\n{text}"
        );
    }
    let mut by_plane: BTreeMap<&str, f64> = BTreeMap::new();
    for r in &rows {
        *by_plane.entry(r.data_plane.as_str()).or_default() += 1.0;
    }
    assert!(by_plane.len() >= 2, "plain and TLS planes: {by_plane:?}");
    for (data_plane, count) in &by_plane {
        let labels = [("function", "echo"), ("data_plane", *data_plane)];
        assert_eq!(
            value(&m, "wsedge_connections_total", &labels),
            Some(*count),
            "{data_plane}:\n{text}"
        );
        assert_eq!(
            value(&m, "wsedge_connections_open", &labels),
            Some(0.0),
            "{text}"
        );
    }
    assert_eq!(
        all(&m, "wsedge_connections_total").len(),
        by_plane.len(),
        "{text}"
    );
    let ended: f64 = all(&m, "wsedge_connections_ended_total")
        .iter()
        .map(|(_, v)| v)
        .sum();
    assert_eq!(ended, 5.0, "{text}");
    assert_eq!(
        value(
            &m,
            "wsedge_handshake_errors_total",
            &[
                ("function", ""),
                ("status", "404"),
                ("error_type", "no_function")
            ]
        ),
        Some(1.0),
        "{text}"
    );

    // Histograms: one observation per upgrade, TLS handshake and cold start.
    let echo = [("function", "echo")];
    assert_eq!(
        value(&m, "wsedge_handshake_duration_seconds_count", &echo),
        Some(5.0),
        "{text}"
    );
    assert!(value(&m, "wsedge_handshake_duration_seconds_sum", &echo).unwrap() > 0.0);
    assert_eq!(
        value(&m, "wsedge_tls_handshakes_total", &[("result", "ok")]),
        Some(2.0)
    );
    assert_eq!(
        value(&m, "wsedge_tls_handshake_duration_seconds_count", &[]),
        Some(2.0),
        "{text}"
    );
    let starts = value(&m, "wsedge_instance_starts_total", &echo).unwrap();
    assert!(
        starts >= 2.0,
        "the first connection held its instance while others came: {text}"
    );
    assert_eq!(
        value(&m, "wsedge_instance_cold_start_seconds_count", &echo),
        Some(starts),
        "{text}"
    );
    // Each connection's row was opened and finished (checkpoints come on top).
    let lag = value(&m, "wsedge_ledger_write_lag_seconds_count", &[]).unwrap();
    assert!(lag >= 10.0, "ledger writes observed: {lag}\n{text}");

    let runs = all(&m, "wsedge_bpf_program_runs_total");
    let run_time = all(&m, "wsedge_bpf_program_run_seconds_total");
    if kernel {
        assert!(
            runs.iter().map(|(_, v)| v).sum::<f64>() > 0.0,
            "bpf_stats = true: the kernel counted the programs' runs: {runs:?}\n{text}"
        );
        assert!(
            run_time.iter().map(|(_, v)| v).sum::<f64>() > 0.0,
            "{run_time:?}"
        );
    } else {
        assert!(runs.is_empty() && run_time.is_empty(), "{text}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_run_on_the_userspace_plane_agrees_with_the_ledger() {
    a_run_agrees_with_the_ledger("userspace").await;
}

#[tokio::test]
async fn a_run_on_the_kernel_plane_agrees_with_the_ledger() {
    a_run_agrees_with_the_ledger("kernel").await;
}
