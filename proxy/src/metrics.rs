//! What `GET /metrics` serves, in the Prometheus text format (0.0.4), every name prefixed
//! `wsedge_`. Events are counted and timed as they happen in a `prometheus-client` registry;
//! what only exists at scrape time (open connections and their live traffic, instances, the
//! eBPF programs' run counters) is read then, by [`Scrape`].

mod bpf;
mod scrape;
mod traffic;

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, prometheus_text},
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

pub use bpf::BpfStats;
pub use scrape::{InstanceCount, ProgramStats, Scrape};
use traffic::{Counts, Traffic};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FunctionLabel {
    function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeErrorLabels {
    function: String,
    status: u16,
    error_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PlaneLabels {
    function: String,
    data_plane: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    function: String,
    /// A status code, or "error" for a connection a socket error ended.
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuotaLabels {
    function: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    function: String,
    status: u16,
}

type Histograms = Family<FunctionLabel, Histogram, fn() -> Histogram>;

/// 0.5 ms to ~16 s: a handshake on a warm instance takes well under a millisecond, one that
/// waits for a cold start or a slow function seconds.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// 10 ms to ~20 s: from a small static binary to a runtime that loads for seconds.
fn cold_start() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 12))
}

pub struct Metrics {
    registry: Registry,
    handshake_errors: Family<HandshakeErrorLabels, Counter>,
    connections: Family<PlaneLabels, Counter>,
    tls_handshakes: Family<ResultLabel, Counter>,
    connections_ended: Family<StatusLabels, Counter>,
    quota_events: Family<QuotaLabels, Counter>,
    http_requests: Family<HttpLabels, Counter>,
    instance_starts: Family<FunctionLabel, Counter>,
    instance_crashes: Family<FunctionLabel, Counter>,
    instance_oom_kills: Family<FunctionLabel, Counter>,
    cold_starts: Histograms,
    handshakes: Histograms,
    tls_handshake_time: Histogram,
    ledger_write_lag: Histogram,
    traffic: Traffic,
    /// Every (function, data plane) a connection was upgraded on: its open gauge then reads
    /// 0 once the last one closed, instead of vanishing (a vanished gauge keeps its last value
    /// on a dashboard until it goes stale).
    planes: Mutex<BTreeSet<(String, &'static str)>>,
    /// One scrape at a time: the live traffic's bookkeeping relies on each scrape reading
    /// the registry after the previous one finished.
    scraping: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Registry::default(),
            handshake_errors: Family::default(),
            connections: Family::default(),
            tls_handshakes: Family::default(),
            connections_ended: Family::default(),
            quota_events: Family::default(),
            http_requests: Family::default(),
            instance_starts: Family::default(),
            instance_crashes: Family::default(),
            instance_oom_kills: Family::default(),
            cold_starts: Family::new_with_constructor(cold_start),
            handshakes: Family::new_with_constructor(latency),
            tls_handshake_time: latency(),
            ledger_write_lag: latency(),
            traffic: Traffic::default(),
            planes: Mutex::default(),
            scraping: Mutex::default(),
        };
        m.register()
    }

    fn register(mut self) -> Metrics {
        let r = &mut self.registry;
        // The encoder adds `_total` to counter names, the unit to others, and a period to
        // every help text.
        r.register(
            "wsedge_handshake_errors",
            "Upgrades refused before the handshake completed, by function, status and error type",
            self.handshake_errors.clone(),
        );
        r.register(
            "wsedge_connections",
            "Upgraded WebSocket connections by function and data plane",
            self.connections.clone(),
        );
        r.register(
            "wsedge_tls_handshakes",
            "TLS handshakes on tls_listen by result (ok, failed, timeout, ktls_failed)",
            self.tls_handshakes.clone(),
        );
        r.register(
            "wsedge_connections_ended",
            "Ended connections by function status (\"error\": ended by a socket error)",
            self.connections_ended.clone(),
        );
        r.register(
            "wsedge_quota_events",
            "Quota events by function and kind: message_too_big and rate_close closes, throttled connections (counted at their end)",
            self.quota_events.clone(),
        );
        r.register(
            "wsedge_http_requests",
            "Plain HTTP requests (not upgrades) by function and status: the instance's, or wsedge's when it refused or the instance failed",
            self.http_requests.clone(),
        );
        r.register(
            "wsedge_instance_starts",
            "Instances started (cold starts)",
            self.instance_starts.clone(),
        );
        r.register(
            "wsedge_instance_crashes",
            "Instances that exited without being stopped",
            self.instance_crashes.clone(),
        );
        r.register(
            "wsedge_instance_oom_kills",
            "Instances the kernel killed for going over their memory_mb",
            self.instance_oom_kills.clone(),
        );
        r.register_with_unit(
            "wsedge_instance_cold_start",
            "Time from spawning an instance until it listens, by function",
            Unit::Seconds,
            self.cold_starts.clone(),
        );
        r.register_with_unit(
            "wsedge_handshake_duration",
            "Time from reading an upgrade request (after any TLS handshake) until its 101 was sent, by function; includes waiting for a cold start",
            Unit::Seconds,
            self.handshakes.clone(),
        );
        r.register_with_unit(
            "wsedge_tls_handshake_duration",
            "Time of the TLS handshakes on tls_listen that completed",
            Unit::Seconds,
            self.tls_handshake_time.clone(),
        );
        r.register_with_unit(
            "wsedge_ledger_write_lag",
            "Time from a billing ledger change being queued until its transaction committed",
            Unit::Seconds,
            self.ledger_write_lag.clone(),
        );
        self
    }

    /// `function` is empty when the request failed before it was routed.
    pub fn handshake_error(&self, function: &str, status: u16, error_type: &str) {
        self.handshake_errors
            .get_or_create(&HandshakeErrorLabels {
                function: function.into(),
                status,
                error_type: error_type.into(),
            })
            .inc();
    }

    /// An upgrade completed: its 101 was sent `took` after its request began to be read.
    pub fn handshake_done(&self, function: &str, took: Duration) {
        self.handshakes
            .get_or_create(&FunctionLabel {
                function: function.into(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn tls_handshake(&self, result: &'static str) {
        self.tls_handshakes
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// A TLS handshake that completed in `took`.
    pub fn tls_handshake_done(&self, took: Duration) {
        self.tls_handshake("ok");
        self.tls_handshake_time.observe(took.as_secs_f64());
    }

    pub fn connection(&self, function: &str, data_plane: &'static str) {
        self.connections
            .get_or_create(&PlaneLabels {
                function: function.into(),
                data_plane,
            })
            .inc();
        self.planes
            .lock()
            .expect("planes lock")
            .insert((function.into(), data_plane));
    }

    /// `status` is the function status, `None` when a socket error ended the connection.
    pub fn connection_ended(&self, function: &str, status: Option<u16>) {
        self.connections_ended
            .get_or_create(&StatusLabels {
                function: function.into(),
                status: status.map_or_else(|| "error".into(), |s| s.to_string()),
            })
            .inc();
    }

    /// An ended connection's final messages and bytes, by direction (`sides`: client ->
    /// function, function -> client); `key` is its registry key: until it leaves the
    /// registry, scrapes must not count it as open too.
    pub fn connection_traffic(
        &self,
        key: u64,
        function: &Arc<str>,
        sides: &[proxy_common::SideState; 2],
    ) {
        self.traffic.ended(key, function, Counts::of(sides));
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

    fn quota_event(&self, function: &str, kind: &'static str) {
        self.quota_events
            .get_or_create(&QuotaLabels {
                function: function.into(),
                kind,
            })
            .inc();
    }

    /// One plain HTTP request answered with `status`; `function` is empty when it was not
    /// routed.
    pub fn http_request(&self, function: &str, status: u16) {
        self.http_requests
            .get_or_create(&HttpLabels {
                function: function.into(),
                status,
            })
            .inc();
    }

    pub fn instance_started(&self, function: &str) {
        self.instance_starts.get_or_create(&label(function)).inc();
    }

    /// An instance listened `took` after it was spawned.
    pub fn instance_ready(&self, function: &str, took: Duration) {
        self.cold_starts
            .get_or_create(&label(function))
            .observe(took.as_secs_f64());
    }

    pub fn instance_crashed(&self, function: &str) {
        self.instance_crashes.get_or_create(&label(function)).inc();
    }

    /// An instance the kernel killed for going over its `memory_mb`.
    pub fn instance_oom(&self, function: &str) {
        self.instance_oom_kills
            .get_or_create(&label(function))
            .inc();
    }

    /// What the ledger's writer calls with each change's time from queued to committed.
    pub fn ledger_write_lag(&self) -> impl Fn(Duration) + Send + 'static {
        let lag = self.ledger_write_lag.clone();
        move |took| lag.observe(took.as_secs_f64())
    }

    /// The whole exposition: the event series, then what `scrape` reads now.
    pub fn encode(&self, scrape: Scrape<'_>) -> String {
        let _one = self.scraping.lock().expect("scrape lock");
        let planes = self.planes.lock().expect("planes lock").clone();
        let mut now = Registry::default();
        now.register_collector(Box::new(scrape.collect(&self.traffic, &planes)));
        let mut out = String::new();
        // Writing to a String cannot fail; the collectors return no errors of their own.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        let _ = prometheus_text::encode(&mut out, &now);
        out
    }
}

fn label(function: &str) -> FunctionLabel {
    FunctionLabel {
        function: function.into(),
    }
}

#[cfg(test)]
mod tests;
