//! The series read at scrape time: open connections, their live traffic, instances and the
//! eBPF programs' run counters.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use super::traffic::{Counts, Open, Traffic};
use crate::{
    conn::{LiveCounters, throttled_ms},
    registry::Registry,
};

/// What a scrape reads from the rest of wsedge.
pub struct Scrape<'a> {
    /// Read here, while no other scrape runs.
    pub connections: &'a Registry,
    pub live: Option<&'a dyn LiveCounters>,
    /// The configured functions: their series read 0 rather than missing.
    pub functions: Vec<Arc<str>>,
    pub instances: Vec<InstanceCount>,
    /// `None` when the kernel does not count the programs' runs (no kernel data plane, or
    /// BPF stats off).
    pub programs: Option<Vec<ProgramStats>>,
}

pub struct InstanceCount {
    pub function: String,
    pub state: &'static str,
    pub count: u64,
}

/// One loaded eBPF program's counters, as the kernel keeps them.
pub struct ProgramStats {
    pub name: String,
    pub runs: u64,
    pub run_time: Duration,
}

type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Clone, Copy)]
enum Value {
    Count(u64),
    Seconds(f64),
}

#[derive(Debug)]
struct Series {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    samples: Vec<(Labels, Value)>,
}

/// A scrape's series, computed before encoding (a collector must own what it encodes).
#[derive(Debug, Default)]
pub(super) struct Collected(Vec<Series>);

impl Collected {
    fn push(
        &mut self,
        name: &'static str,
        help: &'static str,
        kind: MetricType,
        samples: Vec<(Labels, Value)>,
    ) {
        self.0.push(Series {
            name,
            help,
            kind,
            samples,
        });
    }
}

impl Scrape<'_> {
    pub(super) fn collect(
        self,
        traffic: &Traffic,
        planes: &BTreeSet<(String, &'static str)>,
    ) -> Collected {
        let mut open_by_plane: BTreeMap<(String, &'static str), u64> =
            planes.iter().map(|p| (p.clone(), 0)).collect();
        let mut throttled: BTreeMap<String, u64> =
            self.functions.iter().map(|f| (f.to_string(), 0)).collect();
        let mut open = Vec::new();
        for conn in self.connections.snapshot() {
            let (sides, _) = conn.totals(self.live);
            *open_by_plane
                .entry((conn.function.to_string(), conn.plane().as_str()))
                .or_default() += 1;
            if throttled_ms(&sides[0]) > 0 {
                *throttled.entry(conn.function.to_string()).or_default() += 1;
            }
            open.push(Open {
                key: conn.id.key,
                function: conn.function.clone(),
                counts: Counts::of(&sides),
            });
        }
        let mut traffic = traffic.totals(open);
        for f in &self.functions {
            traffic.entry(f.clone()).or_default();
        }

        let mut c = Collected::default();
        c.push(
            "wsedge_connections_open",
            "Open (upgraded) WebSocket connections by function and data plane.",
            MetricType::Gauge,
            open_by_plane
                .into_iter()
                .map(|((function, plane), n)| {
                    let labels = vec![("function", function), ("data_plane", plane.to_string())];
                    (labels, Value::Count(n))
                })
                .collect(),
        );
        c.push(
            "wsedge_connections_throttled",
            "Open connections whose frames have waited for their rate quota, by function.",
            MetricType::Gauge,
            throttled
                .into_iter()
                .map(|(function, n)| (vec![("function", function)], Value::Count(n)))
                .collect(),
        );
        let by_direction = |pick: fn(&Counts) -> [u64; 2]| -> Vec<(Labels, Value)> {
            traffic
                .iter()
                .flat_map(|(function, counts)| {
                    pick(counts).into_iter().zip(["in", "out"]).map(|(n, d)| {
                        let labels =
                            vec![("function", function.to_string()), ("direction", d.into())];
                        (labels, Value::Count(n))
                    })
                })
                .collect()
        };
        c.push(
            "wsedge_messages",
            "Data messages by function and direction (in: client to function): ended connections' and open ones' so far.",
            MetricType::Counter,
            by_direction(|c| c.messages),
        );
        c.push(
            "wsedge_bytes",
            "Wire bytes (frame headers included) by function and direction: ended connections' and open ones' so far.",
            MetricType::Counter,
            by_direction(|c| c.bytes),
        );
        c.push(
            "wsedge_instances",
            "Spawned instances by function and state.",
            MetricType::Gauge,
            self.instances
                .into_iter()
                .map(|i| {
                    let labels = vec![("function", i.function), ("state", i.state.to_string())];
                    (labels, Value::Count(i.count))
                })
                .collect(),
        );
        if let Some(programs) = self.programs {
            let each = |value: fn(&ProgramStats) -> Value| -> Vec<(Labels, Value)> {
                programs
                    .iter()
                    .map(|p| (vec![("program", p.name.clone())], value(p)))
                    .collect()
            };
            c.push(
                "wsedge_bpf_program_runs",
                "Runs of each loaded eBPF program while the kernel's BPF stats were on.",
                MetricType::Counter,
                each(|p| Value::Count(p.runs)),
            );
            c.push(
                "wsedge_bpf_program_run_seconds",
                "Time spent running each loaded eBPF program while the kernel's BPF stats were on.",
                MetricType::Counter,
                each(|p| Value::Seconds(p.run_time.as_secs_f64())),
            );
        }
        c
    }
}

impl Collector for Collected {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for series in &self.0 {
            let mut metric =
                encoder.encode_descriptor(series.name, series.help, None, series.kind)?;
            for (labels, value) in &series.samples {
                let family = metric.encode_family(labels)?;
                match (series.kind, *value) {
                    (MetricType::Counter, Value::Count(n)) => {
                        ConstCounter::new(n).encode(family)?
                    }
                    (MetricType::Counter, Value::Seconds(s)) => {
                        ConstCounter::new(s).encode(family)?
                    }
                    (_, Value::Count(n)) => ConstGauge::new(n).encode(family)?,
                    (_, Value::Seconds(s)) => ConstGauge::new(s).encode(family)?,
                }
            }
        }
        Ok(())
    }
}
