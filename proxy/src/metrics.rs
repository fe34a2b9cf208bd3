//! Counters behind `GET /metrics` (Prometheus text format, names prefixed `wsedge_`).

use std::{collections::BTreeMap, fmt::Write, sync::Mutex};

#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<(&'static str, Labels), u64>>,
}

/// Label pairs of one series, in a fixed order.
type Labels = Vec<(&'static str, String)>;

const HELP: &[(&str, &str)] = &[
    (
        "wsedge_handshake_errors_total",
        "Upgrades refused before the handshake completed, by function, status and error type.",
    ),
    (
        "wsedge_connections_total",
        "Upgraded WebSocket connections.",
    ),
    (
        "wsedge_tls_handshakes_total",
        "TLS handshakes on tls_listen by result (ok, failed, timeout, ktls_failed).",
    ),
    (
        "wsedge_connections_ended_total",
        "Ended connections by function status (\"error\": ended by a socket error).",
    ),
    (
        "wsedge_messages_total",
        "Data messages of ended connections by function and direction (in: client to function).",
    ),
    (
        "wsedge_bytes_total",
        "Wire bytes (frame headers included) of ended connections by function and direction.",
    ),
    (
        "wsedge_quota_events_total",
        "Quota events by function and kind: message_too_big and rate_close closes, throttled connections (counted at their end).",
    ),
    (
        "wsedge_http_requests_total",
        "Plain HTTP requests (not upgrades) by function and status: the instance's, or wsedge's when it refused or the instance failed.",
    ),
    (
        "wsedge_instance_starts_total",
        "Instances started (cold starts).",
    ),
    (
        "wsedge_instance_crashes_total",
        "Instances that exited without being stopped.",
    ),
];

impl Metrics {
    fn add(&self, name: &'static str, labels: Labels) {
        self.add_n(name, labels, 1);
    }

    fn add_n(&self, name: &'static str, labels: Labels, n: u64) {
        *self
            .counters
            .lock()
            .expect("metrics lock")
            .entry((name, labels))
            .or_default() += n;
    }

    /// `function` is empty when the request failed before it was routed.
    pub fn handshake_error(&self, function: &str, status: u16, error_type: &str) {
        self.add(
            "wsedge_handshake_errors_total",
            vec![
                ("function", function.to_string()),
                ("status", status.to_string()),
                ("error_type", error_type.to_string()),
            ],
        );
    }

    pub fn tls_handshake(&self, result: &'static str) {
        self.add(
            "wsedge_tls_handshakes_total",
            vec![("result", result.to_string())],
        );
    }

    pub fn connection(&self, function: &str, data_plane: &str) {
        self.add(
            "wsedge_connections_total",
            vec![
                ("function", function.to_string()),
                ("data_plane", data_plane.to_string()),
            ],
        );
    }

    /// `status` is the function status, `None` when a socket error ended the connection.
    pub fn connection_ended(&self, function: &str, status: Option<u16>) {
        self.add(
            "wsedge_connections_ended_total",
            vec![
                ("function", function.to_string()),
                (
                    "status",
                    status.map_or_else(|| "error".into(), |s| s.to_string()),
                ),
            ],
        );
    }

    /// An ended connection's messages and bytes, by direction (`sides`: client -> function,
    /// function -> client). Counted at the end: a series moves when connections end.
    pub fn connection_traffic(&self, function: &str, sides: &[proxy_common::SideState; 2]) {
        for (side, direction) in sides.iter().zip(["in", "out"]) {
            let labels = vec![
                ("function", function.to_string()),
                ("direction", direction.to_string()),
            ];
            self.add_n("wsedge_messages_total", labels.clone(), side.messages);
            self.add_n("wsedge_bytes_total", labels, side.bytes);
        }
    }

    /// Counts a quota close: 1009 for a message over `max_message_bytes`, 1008 for a rate
    /// with `on_exceed = "close"`; other endings are no quota event.
    pub fn quota_ending(&self, function: &str, ending: proxy_common::policy::Ending) {
        use proxy_common::policy::Ending;
        let kind = match ending {
            Ending::MessageTooBig => "message_too_big",
            Ending::RateExceeded => "rate_close",
            _ => return,
        };
        self.quota_event(function, kind);
    }

    /// A connection whose frames waited for its rate at least once, counted at its end.
    pub fn throttled(&self, function: &str) {
        self.quota_event(function, "throttled");
    }

    fn quota_event(&self, function: &str, kind: &str) {
        self.add(
            "wsedge_quota_events_total",
            vec![
                ("function", function.to_string()),
                ("kind", kind.to_string()),
            ],
        );
    }

    /// One plain HTTP request answered with `status`; `function` is empty when it was not
    /// routed.
    pub fn http_request(&self, function: &str, status: u16) {
        self.add(
            "wsedge_http_requests_total",
            vec![
                ("function", function.to_string()),
                ("status", status.to_string()),
            ],
        );
    }

    pub fn instance_started(&self, function: &str) {
        self.add(
            "wsedge_instance_starts_total",
            vec![("function", function.to_string())],
        );
    }

    pub fn instance_crashed(&self, function: &str) {
        self.add(
            "wsedge_instance_crashes_total",
            vec![("function", function.to_string())],
        );
    }

    /// The counters, then `gauges` (name, help, labels, value) computed by the caller.
    pub fn render(&self, gauges: &[(&str, &str, Labels, u64)]) -> String {
        let mut out = String::new();
        let counters = self.counters.lock().expect("metrics lock");
        for (name, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for ((_, labels), value) in counters.iter().filter(|((n, _), _)| n == name) {
                let _ = writeln!(out, "{name}{} {value}", format_labels(labels));
            }
        }
        let mut last = "";
        for (name, help, labels, value) in gauges {
            if *name != last {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
                last = name;
            }
            let _ = writeln!(out, "{name}{} {value}", format_labels(labels));
        }
        out
    }
}

fn format_labels(labels: &Labels) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_per_label_set_in_prometheus_text() {
        let m = Metrics::default();
        m.handshake_error("echo", 429, "function_busy");
        m.handshake_error("echo", 429, "function_busy");
        m.handshake_error("", 404, "no_function");
        m.instance_started("echo");
        let text = m.render(&[("wsedge_connections_open", "Open connections.", vec![], 3)]);
        assert!(text.contains(
            "wsedge_handshake_errors_total{function=\"echo\",status=\"429\",error_type=\"function_busy\"} 2\n"
        ), "{text}");
        assert!(text.contains(
            "wsedge_handshake_errors_total{function=\"\",status=\"404\",error_type=\"no_function\"} 1\n"
        ));
        assert!(text.contains("wsedge_instance_starts_total{function=\"echo\"} 1\n"));
        assert!(text.contains("# TYPE wsedge_connections_open gauge\nwsedge_connections_open 3\n"));
        assert!(!text.contains("wsedge_instance_crashes_total{"));
    }

    #[test]
    fn traffic_and_quota_events_count_per_function_and_direction() {
        use proxy_common::{SideState, policy::Ending};
        let m = Metrics::default();
        let side = |bytes, messages| SideState {
            bytes,
            messages,
            ..SideState::default()
        };
        m.connection_traffic("echo", &[side(100, 3), side(40, 2)]);
        m.connection_traffic("echo", &[side(1, 1), side(0, 0)]);
        m.quota_ending("echo", Ending::MessageTooBig);
        m.quota_ending("echo", Ending::RateExceeded);
        m.quota_ending("echo", Ending::IdleTimeout);
        m.throttled("echo");
        let text = m.render(&[]);
        for line in [
            "wsedge_bytes_total{function=\"echo\",direction=\"in\"} 101\n",
            "wsedge_bytes_total{function=\"echo\",direction=\"out\"} 40\n",
            "wsedge_messages_total{function=\"echo\",direction=\"in\"} 4\n",
            "wsedge_messages_total{function=\"echo\",direction=\"out\"} 2\n",
            "wsedge_quota_events_total{function=\"echo\",kind=\"message_too_big\"} 1\n",
            "wsedge_quota_events_total{function=\"echo\",kind=\"rate_close\"} 1\n",
            "wsedge_quota_events_total{function=\"echo\",kind=\"throttled\"} 1\n",
        ] {
            assert!(text.contains(line), "{line} in:\n{text}");
        }
        assert_eq!(text.matches("wsedge_quota_events_total{").count(), 3);
    }
}
