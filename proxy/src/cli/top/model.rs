//! What `wsedge top` shows, computed from two samples of the admin API, and its plain-text
//! rendering (the terminal view draws the same lines).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use wsedge::instances::InstanceView;
use wsedge::registry::ConnectionView;

/// One reading of `/connections` and `/instances`, and when it was taken.
pub struct Sample {
    pub at: Instant,
    pub connections: Vec<ConnectionView>,
    pub instances: Vec<InstanceView>,
}

/// One row of the view: a function's open connections on one data plane.
#[derive(Debug, Clone, PartialEq)]
pub struct PlaneRow {
    pub function: String,
    /// `-` for a function without open connections.
    pub plane: String,
    pub connections: u64,
    /// Open connections whose frames have waited for their rate quota.
    pub throttled: u64,
    /// `None` on the first frame: a rate needs two samples.
    pub messages_in_per_s: Option<f64>,
    pub messages_out_per_s: Option<f64>,
}

/// Everything one screen shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub rows: Vec<PlaneRow>,
    pub instances: Vec<InstanceView>,
}

/// The rows for `now`, with message rates since `previous`.
///
/// A counter sum over all connections would drop whenever a busy connection ends, so rates
/// are per connection: a connection in both samples adds the growth of its counters, one
/// that opened since `previous` adds all of its counters (they started at zero after
/// `previous` was read), and one that ended adds nothing (its last messages are not
/// observable any more). `functions` are listed even when idle, so rows do not come and go.
pub fn frame(previous: Option<&Sample>, now: &Sample, functions: &[String]) -> Frame {
    let before: HashMap<&str, &ConnectionView> = previous
        .map(|p| p.connections.iter().map(|c| (c.id.as_str(), c)).collect())
        .unwrap_or_default();
    let seconds = previous.map(|p| now.at.saturating_duration_since(p.at).as_secs_f64());
    // Sums per (function, plane): connections, throttled, messages in, messages out.
    let mut sums: BTreeMap<(&str, &str), [u64; 4]> = BTreeMap::new();
    for c in &now.connections {
        let (grown_in, grown_out) = match before.get(c.id.as_str()) {
            Some(old) => (
                c.messages_in.saturating_sub(old.messages_in),
                c.messages_out.saturating_sub(old.messages_out),
            ),
            None => (c.messages_in, c.messages_out),
        };
        let sum = sums
            .entry((c.function.as_str(), c.data_plane.as_str()))
            .or_default();
        sum[0] += 1;
        sum[1] += u64::from(c.throttled_ms > 0);
        sum[2] += grown_in;
        sum[3] += grown_out;
    }
    let rate = |count: u64| match seconds {
        Some(s) if s > 0.0 => Some(count as f64 / s),
        _ => None,
    };
    let mut rows: Vec<PlaneRow> = sums
        .iter()
        .map(
            |(&(function, plane), &[connections, throttled, m_in, m_out])| PlaneRow {
                function: function.to_string(),
                plane: plane.to_string(),
                connections,
                throttled,
                messages_in_per_s: rate(m_in),
                messages_out_per_s: rate(m_out),
            },
        )
        .collect();
    let idle = functions
        .iter()
        .map(String::as_str)
        .chain(now.instances.iter().map(|i| i.function.as_str()))
        .filter(|f| !rows.iter().any(|r| r.function == *f))
        .collect::<std::collections::BTreeSet<_>>();
    for function in idle {
        rows.push(PlaneRow {
            function: function.to_string(),
            plane: "-".to_string(),
            connections: 0,
            throttled: 0,
            messages_in_per_s: rate(0),
            messages_out_per_s: rate(0),
        });
    }
    rows.sort_by(|a, b| (&a.function, &a.plane).cmp(&(&b.function, &b.plane)));
    let mut instances = now.instances.clone();
    instances.sort_by(|a, b| (&a.function, &a.id).cmp(&(&b.function, &b.id)));
    Frame { rows, instances }
}

/// `-` until there is a rate: ASCII, as a terminal over SSH may not be UTF-8.
fn per_second(rate: Option<f64>) -> String {
    rate.map_or_else(|| "-".to_string(), |r| format!("{r:.1}"))
}

impl Frame {
    /// The screen as lines of plain text (no escape codes), after a `title` line.
    pub fn lines(&self, title: &str) -> Vec<String> {
        let total = |f: fn(&PlaneRow) -> u64| self.rows.iter().map(f).sum::<u64>();
        let total_rate = |f: fn(&PlaneRow) -> Option<f64>| {
            self.rows
                .iter()
                .map(f)
                .try_fold(0.0, |sum, r| r.map(|r| sum + r))
        };
        let mut lines = vec![
            title.to_string(),
            format!(
                "connections {}  throttled {}  messages/s in {}  out {}  instances {}",
                total(|r| r.connections),
                total(|r| r.throttled),
                per_second(total_rate(|r| r.messages_in_per_s)),
                per_second(total_rate(|r| r.messages_out_per_s)),
                self.instances.len(),
            ),
            String::new(),
            format!(
                "{:<20} {:<16} {:>6} {:>9} {:>10} {:>10}",
                "FUNCTION", "PLANE", "CONNS", "THROTTLED", "MSG_IN/S", "MSG_OUT/S"
            ),
        ];
        for r in &self.rows {
            lines.push(format!(
                "{:<20} {:<16} {:>6} {:>9} {:>10} {:>10}",
                r.function,
                r.plane,
                r.connections,
                r.throttled,
                per_second(r.messages_in_per_s),
                per_second(r.messages_out_per_s),
            ));
        }
        lines.push(String::new());
        lines.push(format!(
            "{:<20} {:<20} {:<10} {:>6} {:>8}",
            "INSTANCE", "FUNCTION", "STATE", "CONNS", "PID"
        ));
        for i in &self.instances {
            lines.push(format!(
                "{:<20} {:<20} {:<10} {:>6} {:>8}",
                i.id, i.function, i.state, i.connections, i.pid
            ));
        }
        if self.instances.is_empty() {
            lines.push("(no spawned instances: static upstreams only)".to_string());
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn conn(id: &str, function: &str, plane: &str, messages: (u64, u64)) -> ConnectionView {
        ConnectionView {
            id: id.to_string(),
            function: function.to_string(),
            instance: "i1".to_string(),
            client: "127.0.0.1:5000".to_string(),
            started_at: String::new(),
            data_plane: plane.to_string(),
            tls: false,
            bytes_in: 0,
            bytes_out: 0,
            messages_in: messages.0,
            messages_out: messages.1,
            frames_in: messages.0,
            frames_out: messages.1,
            bytes_relayed_by_userspace: 0,
            throttled_ms: 0,
        }
    }

    fn sample(at: Instant, connections: Vec<ConnectionView>) -> Sample {
        Sample {
            at,
            connections,
            instances: Vec::new(),
        }
    }

    fn row<'a>(f: &'a Frame, function: &str, plane: &str) -> &'a PlaneRow {
        f.rows
            .iter()
            .find(|r| r.function == function && r.plane == plane)
            .unwrap_or_else(|| panic!("no row {function}/{plane} in {:?}", f.rows))
    }

    #[test]
    fn rates_are_counter_growth_over_the_interval_by_function_and_plane() {
        let t0 = Instant::now();
        let before = sample(
            t0,
            vec![
                conn("1", "chat", "kernel", (100, 50)),
                conn("2", "chat", "userspace", (10, 10)),
            ],
        );
        let after = sample(
            t0 + Duration::from_secs(2),
            vec![
                conn("1", "chat", "kernel", (140, 70)),
                conn("2", "chat", "userspace", (30, 10)),
            ],
        );
        let f = frame(Some(&before), &after, &[]);
        assert_eq!(row(&f, "chat", "kernel").messages_in_per_s, Some(20.0));
        assert_eq!(row(&f, "chat", "kernel").messages_out_per_s, Some(10.0));
        assert_eq!(row(&f, "chat", "userspace").messages_in_per_s, Some(10.0));
        assert_eq!(row(&f, "chat", "userspace").messages_out_per_s, Some(0.0));
        assert_eq!(f.rows.len(), 2);
    }

    #[test]
    fn an_ended_connection_does_not_make_the_rate_negative_and_a_new_one_counts_from_zero() {
        let t0 = Instant::now();
        let before = sample(
            t0,
            vec![
                conn("old", "echo", "userspace", (1_000, 1_000)),
                conn("stays", "echo", "userspace", (5, 5)),
            ],
        );
        let after = sample(
            t0 + Duration::from_secs(1),
            vec![
                conn("stays", "echo", "userspace", (15, 12)),
                conn("new", "echo", "userspace", (3, 3)),
            ],
        );
        let f = frame(Some(&before), &after, &[]);
        let r = row(&f, "echo", "userspace");
        // 10 from "stays" and 3 from "new"; the 1000 of "old" are not subtracted.
        assert_eq!(r.messages_in_per_s, Some(13.0));
        assert_eq!(r.messages_out_per_s, Some(10.0));
        assert_eq!(r.connections, 2);
    }

    #[test]
    fn an_id_reused_with_smaller_counters_counts_as_no_growth_rather_than_wrapping() {
        let t0 = Instant::now();
        let before = sample(t0, vec![conn("7", "echo", "kernel", (50, 50))]);
        let after = sample(
            t0 + Duration::from_secs(1),
            vec![conn("7", "echo", "kernel", (2, 60))],
        );
        let r = frame(Some(&before), &after, &[]).rows[0].clone();
        assert_eq!(r.messages_in_per_s, Some(0.0));
        assert_eq!(r.messages_out_per_s, Some(10.0));
    }

    #[test]
    fn the_first_frame_has_counts_but_no_rates_and_idle_functions_keep_a_row() {
        let mut throttled = conn("1", "echo", "userspace", (9, 9));
        throttled.throttled_ms = 40;
        let now = sample(
            Instant::now(),
            vec![throttled, conn("2", "echo", "userspace", (1, 1))],
        );
        let f = frame(None, &now, &["echo".to_string(), "idle".to_string()]);
        let r = row(&f, "echo", "userspace");
        assert_eq!((r.connections, r.throttled), (2, 1));
        assert_eq!(r.messages_in_per_s, None);
        let idle = row(&f, "idle", "-");
        assert_eq!(idle.connections, 0);
        let lines = f.lines("title");
        assert!(lines[1].starts_with("connections 2  throttled 1  messages/s in -  out -"));
        assert!(lines.iter().any(|l| l.starts_with("idle ")), "{lines:#?}");
    }

    #[test]
    fn instances_are_listed_with_their_state_and_their_function_gets_a_row() {
        let now = Sample {
            at: Instant::now(),
            connections: Vec::new(),
            instances: vec![InstanceView {
                id: "py-1".to_string(),
                function: "py".to_string(),
                state: "ready".to_string(),
                pid: 4242,
                address: "127.0.0.1:9000".to_string(),
                netns: None,
                connections: 0,
                started_at: String::new(),
            }],
        };
        let f = frame(None, &now, &[]);
        assert_eq!(row(&f, "py", "-").connections, 0);
        let lines = f.lines("title");
        let line = lines.iter().find(|l| l.starts_with("py-1")).unwrap();
        assert!(line.contains(" ready ") && line.ends_with("4242"), "{line}");
    }
}
