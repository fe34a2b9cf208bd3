//! Turns measured cells into `bench/results/<UTC time>.{json,md,svg}` and the README table.
//!
//! Every (mode, workload) is run several times, in interleaved rounds. Each figure is reported
//! as the median over the runs with the lowest and highest beside it. "Added" figures are taken
//! per round (the mode's run minus `direct`'s run of the same round: both met the same state
//! of a shared machine) and then summarised like the others. Ratios against nginx and HAProxy
//! divide medians; the same ratio within each round gives their range.

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use serde_json::{Map, Value, json};

use super::{Cell, modes::Mode, placement::Placement, results_dir};
use crate::cmd;

/// How the run was made, for the report's header.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub quick: bool,
    /// Only some modes or workloads: the README's table is left alone.
    pub filtered: bool,
    pub repeats: usize,
    pub placement: Placement,
    /// Wall time of the measurements (the build and package checks before them excluded).
    pub elapsed: Duration,
}

pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_default();
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")
                .map(|r| r.trim().trim_end_matches(" kB").trim().to_string())
        })
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    json!({
        "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "cpu_model": model,
        "memory_gib": mem_kb / 1024 / 1024,
        "kernel": cmd::output(cmd::new("uname").arg("-r")).unwrap_or_default().trim(),
        "nofile_hard_limit": cmd::output(cmd::new("sh").args(["-c", "ulimit -Hn"])).unwrap_or_default().trim(),
    })
}

fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// The data plane wsedge's `/connections` reported in a run (`data_planes`: counts by plane):
/// the plane's name when all agreed, else every plane with its count, most first.
pub fn data_plane_seen(planes: &Value) -> String {
    let Some(counts) = planes.as_object() else {
        return "unknown (not sampled)".into();
    };
    let mut counts: Vec<(&String, u64)> = counts
        .iter()
        .map(|(plane, n)| (plane, n.as_u64().unwrap_or(0)))
        .collect();
    counts.sort_by_key(|&(plane, n)| (std::cmp::Reverse(n), plane));
    match counts.as_slice() {
        [] => "none (no connection open when sampled)".into(),
        [(plane, _)] => plane.to_string(),
        many => many
            .iter()
            .map(|(plane, n)| format!("{plane} x{n}"))
            .collect::<Vec<_>>()
            .join(" + "),
    }
}

/// The TLS parameters a TLS mode's connections negotiated (`tls_sessions`: the load
/// generator's counts by parameters), in the same form as [`data_plane_seen`].
pub fn tls_seen(sessions: &Value) -> String {
    match sessions.as_object() {
        Some(s) if s.is_empty() => "none (no TLS connection upgraded)".into(),
        Some(_) => data_plane_seen(sessions),
        None => "unknown (not reported)".into(),
    }
}

/// The row for one cell; `added_*` against `direct` in the same workload.
fn entry(cell: &Cell, direct: Option<&Cell>) -> Value {
    let l = &cell.load;
    let received = f(&l["messages_received"]).unwrap_or(0.0);
    // Elapsed minus idle: exact, where the tick-sampled `cpu_busy_s` misses bursts that start
    // with a tick and end before the next (the edge workload's timers wake in step with it).
    // Reports from before the exact figure existed fall back to the sampled one.
    let whole_cpu = |d: &Value| {
        let r = f(&d["messages_received"]).unwrap_or(0.0);
        f(&d["cpu_busy_exact_s"])
            .or_else(|| f(&d["cpu_busy_s"]))
            .filter(|_| r > 0.0)
            .map(|c| c * 1e6 / r)
    };
    let cpu_us_per_msg = whole_cpu(l);
    let rss_per_conn = match (
        cell.mode,
        f(&l["rss_kb_after"]),
        f(&l["rss_kb_before"]),
        f(&l["connections_established"]),
    ) {
        (Mode::Direct, ..) => None,
        (_, Some(after), Some(before), Some(n)) if n > 0.0 => Some((after - before) / n),
        _ => None,
    };
    let direct_load = direct.map(|d| &d.load);
    let added = |key: &dyn Fn(&Value) -> Option<f64>, mine: Option<f64>| match (
        mine,
        direct_load.and_then(key),
    ) {
        (Some(m), Some(d)) if cell.mode != Mode::Direct => Some(m - d),
        _ => None,
    };
    let p99 = f(&l["rtt_us"]["p99"]);
    // The run's own CPU: its processes plus the kernel's worker threads (see bench's
    // HostCounters); what other work on a shared machine does not inflate.
    let own_cpu = |d: &Value| {
        let r = f(&d["messages_received"]).unwrap_or(0.0);
        f(&d["cpu_processes_s"])
            .zip(f(&d["cpu_kthreads_s"]))
            .filter(|_| r > 0.0)
            .map(|(p, k)| (p + k) * 1e6 / r)
    };
    let own_cpu_us_per_msg = own_cpu(l);
    let per_msg =
        |v: Option<f64>, scale: f64| v.filter(|_| received > 0.0).map(|v| v * scale / received);
    let mut e = json!({
        "mode": cell.mode.name(),
        "workload": cell.workload,
        "round": cell.round,
        "connections": cell.connections,
        "msgs_per_s": f(&l["msgs_per_s"]),
        "rtt_p50_us": f(&l["rtt_us"]["p50"]),
        "rtt_p99_us": p99,
        "rtt_p999_us": f(&l["rtt_us"]["p999"]),
        "rtt_max_us": f(&l["rtt_us"]["max"]),
        "added_p99_us": added(&|d: &Value| f(&d["rtt_us"]["p99"]), p99),
        "cpu_us_per_msg": cpu_us_per_msg,
        "added_cpu_us_per_msg": added(&whole_cpu, cpu_us_per_msg),
        "tick_sampled_cpu_us_per_msg": per_msg(f(&l["cpu_busy_s"]), 1e6),
        "proxy_rss_kb_per_conn": rss_per_conn,
        "handshakes_per_s": f(&l["handshakes_per_s"]).filter(|_| cell.workload == "handshake"),
        "own_cpu_us_per_msg": own_cpu_us_per_msg,
        "added_own_cpu_us_per_msg": added(&own_cpu, own_cpu_us_per_msg),
        "kworker_cpu_us_per_msg": per_msg(f(&l["cpu_kthreads_s"]), 1e6),
        "context_switches_per_msg": per_msg(f(&l["context_switches"]), 1.0),
        "ipis_per_msg": per_msg(
            f(&l["resched_ipis"]).zip(f(&l["call_ipis"])).map(|(a, b)| a + b),
            1.0,
        ),
        "errors": l["errors"],
        "connect_errors": l["connect_errors"],
        "placement_seen": l["placement_seen"],
    });
    e["load_report"] = l.clone();
    for (cpu, busy) in l["cpu_busy_exact_s_by_cpu"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        e[format!("cpu{cpu}_us_per_msg")] = json!(per_msg(f(busy), 1e6));
    }
    if let Some(max) = cell.max_connections {
        e["max_connections"] = json!(max);
    }
    for key in ["proxy_exited", "remeasured"] {
        if let Some(v) = l.get(key) {
            e[key] = v.clone();
        }
    }
    if cell.mode.expected_data_plane().is_some() {
        e["data_plane_seen"] = json!(data_plane_seen(&l["data_planes"]));
        e["data_plane_counts"] = l["data_planes"].clone();
    }
    if cell.mode.tls() {
        e["tls_seen"] = json!(tls_seen(&l["tls_sessions"]));
    }
    e
}

fn find<'a>(entries: &'a [Value], mode: &str, workload: &str) -> Option<&'a Value> {
    entries
        .iter()
        .find(|e| e["mode"] == mode && e["workload"] == workload)
}

/// wsedge-kernel (issue 3), wsedge-zero-hop (issue 5) and the userspace relay (issue 11)
/// against the better of nginx and HAProxy, as the issues' targets state them.
fn ratios(entries: &[Value]) -> Value {
    let get = |mode: &str, workload: &str, key: &str| {
        find(entries, mode, workload).and_then(|e| f(&e[key]))
    };
    let better_of = |[a, b]: [&str; 2], workload: &str, key: &str, lower: bool| match (
        get(a, workload, key),
        get(b, workload, key),
    ) {
        (Some(a), Some(b)) => Some(if lower { a.min(b) } else { a.max(b) }),
        (x, y) => x.or(y),
    };
    let better = |workload: &str, key: &str, lower: bool| {
        better_of(["nginx", "haproxy"], workload, key, lower)
    };
    let better_tls = |workload: &str, key: &str, lower: bool| {
        better_of(["nginx-tls", "haproxy-tls"], workload, key, lower)
    };
    let ratio = |mine: Option<f64>, theirs: Option<f64>| match (mine, theirs) {
        (Some(m), Some(t)) if t.abs() > f64::EPSILON => Some(m / t),
        _ => None,
    };
    let k = |workload: &str, key: &str| get("wsedge-kernel", workload, key);
    let z = |workload: &str, key: &str| get("wsedge-zero-hop", workload, key);
    let u = |workload: &str, key: &str| get("wsedge-userspace", workload, key);
    let t = |workload: &str, key: &str| get("wsedge-tls", workload, key);
    // wsedge-tls against the better TLS-terminating proxy on the same workload.
    let vs_tls = |workload: &str, key: &str, lower: bool| {
        ratio(t(workload, key), better_tls(workload, key, lower))
    };
    let mut ratios = json!({
        "tls_edge_added_cpu_vs_best": vs_tls("edge", "added_cpu_us_per_msg", true),
        "tls_edge_added_own_cpu_vs_best": vs_tls("edge", "added_own_cpu_us_per_msg", true),
        "tls_edge_p99_vs_best": vs_tls("edge", "rtt_p99_us", true),
        "tls_bulk_added_cpu_vs_best": vs_tls("bulk", "added_cpu_us_per_msg", true),
        "tls_bulk_added_own_cpu_vs_best": vs_tls("bulk", "added_own_cpu_us_per_msg", true),
        "tls_bulk_p99_vs_best": vs_tls("bulk", "rtt_p99_us", true),
        "tls_handshakes_per_s_vs_best": vs_tls("handshake", "handshakes_per_s", false),
        "relay_edge_added_cpu_vs_best": ratio(u("edge", "added_cpu_us_per_msg"), better("edge", "added_cpu_us_per_msg", true)),
        "relay_edge_added_own_cpu_vs_best": ratio(u("edge", "added_own_cpu_us_per_msg"), better("edge", "added_own_cpu_us_per_msg", true)),
        "relay_edge_p99_vs_best": ratio(u("edge", "rtt_p99_us"), better("edge", "rtt_p99_us", true)),
        "relay_edge_rss_per_conn_vs_haproxy": ratio(u("edge", "proxy_rss_kb_per_conn"), get("haproxy", "edge", "proxy_rss_kb_per_conn")),
        "relay_edge_max_connections_vs_nginx": ratio(u("edge-max", "max_connections"), get("nginx", "edge-max", "max_connections")),
        "edge_added_cpu_vs_best": ratio(k("edge", "added_cpu_us_per_msg"), better("edge", "added_cpu_us_per_msg", true)),
        // Absolute p99s of the same run: "added" values can be negative (direct's p99 is often
        // the highest: wake-from-idle), which makes a ratio of them meaningless.
        "edge_p99_vs_best": ratio(k("edge", "rtt_p99_us"), better("edge", "rtt_p99_us", true)),
        "edge_rss_per_conn_vs_best": ratio(k("edge", "proxy_rss_kb_per_conn"), better("edge", "proxy_rss_kb_per_conn", true)),
        "edge_max_connections_vs_best": ratio(k("edge-max", "max_connections"), better("edge-max", "max_connections", false)),
        "zero_hop_edge_added_cpu_vs_best": ratio(z("edge", "added_cpu_us_per_msg"), better("edge", "added_cpu_us_per_msg", true)),
        "zero_hop_edge_max_connections_vs_best": ratio(z("edge-max", "max_connections"), better("edge-max", "max_connections", false)),
        // The same as the added-CPU ratios, on the run's own CPU (its processes and the
        // kernel's worker threads), which a shared machine's other work hardly moves.
        "edge_added_own_cpu_vs_best": ratio(k("edge", "added_own_cpu_us_per_msg"), better("edge", "added_own_cpu_us_per_msg", true)),
        "zero_hop_edge_added_own_cpu_vs_best": ratio(z("edge", "added_own_cpu_us_per_msg"), better("edge", "added_own_cpu_us_per_msg", true)),
    });
    for c in SAME_PLANE {
        for (metric, key) in SAME_PLANE_METRICS {
            ratios[c.key(metric)] =
                json!(ratio(get(c.mine, "edge", key), get(c.theirs, "edge", key)));
        }
    }
    ratios
}

/// A mode against the same data plane with one thing changed, on the edge workload.
struct SamePlane {
    /// The ratios' keys: `{stem}_edge_{metric}_vs_{vs}`.
    stem: &'static str,
    vs: &'static str,
    /// Divided by `theirs`.
    mine: &'static str,
    theirs: &'static str,
    /// The mode that only runs for this comparison: the report has the section when it ran.
    shown_with: &'static str,
    heading: &'static str,
}

impl SamePlane {
    fn key(&self, metric: &str) -> String {
        format!("{}_edge_{metric}_vs_{}", self.stem, self.vs)
    }
}

const SAME_PLANE: [SamePlane; 2] = [
    SamePlane {
        stem: "quotas",
        vs: "off",
        mine: "wsedge-kernel-quotas",
        theirs: "wsedge-kernel",
        shown_with: "wsedge-kernel-quotas",
        heading: "wsedge-kernel with the default rate quotas on against the same with them off \
                  (issue 13; edge sends exactly the 10 messages/s a connection may)",
    },
    SamePlane {
        stem: "trace_points",
        vs: "none",
        mine: "wsedge-kernel",
        theirs: "wsedge-kernel-notrace",
        shown_with: "wsedge-kernel-notrace",
        heading: "wsedge-kernel (trace points loaded, nobody tracing) against the same loaded \
                  without them (`kernel_trace = false`)",
    },
];

/// What a same-plane comparison divides: (its name in the keys, the entry's field).
const SAME_PLANE_METRICS: [(&str, &str); 3] = [
    ("added_cpu", "added_cpu_us_per_msg"),
    ("added_own_cpu", "added_own_cpu_us_per_msg"),
    ("p99", "rtt_p99_us"),
];

/// The middle value (the mean of the two middle ones for an even count).
fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// Keys of a run's entry that are counts over the whole run: summed, not summarised.
const SUMMED: [&str; 2] = ["errors", "connect_errors"];
/// Numeric keys that are labels, not measurements.
const LABELS: [&str; 1] = ["round"];

/// One (mode, workload) over its runs: every numeric figure becomes the median of the runs
/// that have it, with `range[key] = [min, max]`; the runs themselves stay under `runs`.
fn summarise(runs: &[&Value]) -> Value {
    let first = runs[0];
    let mut out = Map::new();
    out.insert("mode".into(), first["mode"].clone());
    out.insert("workload".into(), first["workload"].clone());
    out.insert("repeats".into(), json!(runs.len()));
    let mut keys: Vec<&String> = runs
        .iter()
        .filter_map(|r| r.as_object())
        .flat_map(|o| o.keys())
        .collect();
    keys.sort();
    keys.dedup();
    let mut range = Map::new();
    for key in keys {
        if LABELS.contains(&key.as_str()) {
            continue;
        }
        let mut values: Vec<f64> = runs.iter().filter_map(|r| f(&r[key])).collect();
        if values.is_empty() {
            // Strings and objects (data plane, placement, exit status) are per run.
            continue;
        }
        if SUMMED.contains(&key.as_str()) {
            out.insert(key.clone(), json!(values.iter().sum::<f64>()));
            continue;
        }
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        out.insert(key.clone(), json!(median(&mut values)));
        range.insert(key.clone(), json!([lo, hi]));
    }
    out.insert("range".into(), Value::Object(range));
    // Planes and TLS parameters seen in the runs: one when they all agree.
    for key in ["data_plane_seen", "tls_seen"] {
        let mut seen: Vec<String> = runs
            .iter()
            .filter_map(|r| r[key].as_str().map(String::from))
            .collect();
        seen.sort();
        seen.dedup();
        if !seen.is_empty() {
            out.insert(key.into(), json!(seen.join("; ")));
        }
    }
    for key in ["proxy_exited", "remeasured"] {
        let n = runs.iter().filter(|r| r.get(key).is_some()).count();
        if n > 0 {
            out.insert(format!("{key}_runs"), json!(n));
        }
    }
    out.insert("runs".into(), json!(runs));
    Value::Object(out)
}

/// The runs grouped by (mode, workload), `edge` first, then workloads in the order they ran,
/// modes in their usual order.
fn summarise_all(runs: &[Value]) -> Vec<Value> {
    let mut workloads: Vec<&str> = Vec::new();
    for r in runs {
        let w = r["workload"].as_str().unwrap_or("");
        if !workloads.contains(&w) {
            workloads.push(w);
        }
    }
    workloads.sort_by_key(|&w| w != "edge");
    let mut out = Vec::new();
    for w in workloads {
        for mode in Mode::ALL {
            let group: Vec<&Value> = runs
                .iter()
                .filter(|r| r["workload"] == w && r["mode"] == mode.name())
                .collect();
            if !group.is_empty() {
                out.push(summarise(&group));
            }
        }
    }
    out
}

/// [`ratios`] of the medians, plus the range of each ratio computed within each round alone.
fn ratios_with_range(summary: &[Value], runs: &[Value], repeats: usize) -> Value {
    let mut out = ratios(summary);
    let per_round: Vec<Value> = (1..=repeats)
        .map(|round| {
            let in_round: Vec<Value> = runs
                .iter()
                .filter(|r| r["round"] == round)
                .cloned()
                .collect();
            ratios(&in_round)
        })
        .collect();
    let mut range = Map::new();
    if let Some(keys) = out
        .as_object()
        .map(|o| o.keys().cloned().collect::<Vec<_>>())
    {
        for key in keys {
            let values: Vec<f64> = per_round.iter().filter_map(|r| f(&r[&key])).collect();
            if values.len() > 1 {
                let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                range.insert(key, json!([lo, hi]));
            }
        }
    }
    out["range_over_rounds"] = Value::Object(range);
    out
}

fn num(v: &Value, digits: usize) -> String {
    v.as_f64().map_or("–".into(), |x| format!("{x:.digits$}"))
}

/// A summarised figure as the table shows it: the median, and the lowest and highest run in
/// brackets when they differ at the shown precision.
fn stat(e: &Value, key: &str, digits: usize) -> String {
    let median = num(&e[key], digits);
    match e["range"][key].as_array().map(Vec::as_slice) {
        Some([lo, hi]) => {
            let (lo, hi) = (num(lo, digits), num(hi, digits));
            match lo == hi {
                true => median,
                false => format!("{median} ({lo}–{hi})"),
            }
        }
        _ => median,
    }
}

/// How a ratio is held against its target.
#[derive(Clone, Copy)]
enum Target {
    AtMost(f64),
    AtLeast(f64),
    Above(f64),
}

impl Target {
    fn holds(self, x: f64) -> bool {
        match self {
            Target::AtMost(l) => x <= l,
            Target::AtLeast(l) => x >= l,
            Target::Above(l) => x > l,
        }
    }
}

/// The ratio of medians against its target. Met or not only when every round's own ratio
/// agrees: a median that one noisy round can carry across the line is no verdict.
fn target(ratios: &Value, key: &str, t: Target) -> String {
    let (sign, limit) = match t {
        Target::AtMost(l) => ("≤", l),
        Target::AtLeast(l) => ("≥", l),
        Target::Above(l) => (">", l),
    };
    let range = ratios["range_over_rounds"][key]
        .as_array()
        .and_then(|r| Some((r.first()?.as_f64()?, r.get(1)?.as_f64()?)));
    let verdict = match (ratios[key].as_f64().map(|x| t.holds(x)), range) {
        (None, _) => "not measured",
        (Some(met), Some((lo, hi))) if t.holds(lo) != t.holds(hi) => match met {
            true => "met by the median, **not in every round**",
            false => "**not met** by the median, met in some round",
        },
        (Some(true), _) => "met",
        (Some(false), _) => "**not met**",
    };
    let rounds = range.map_or(String::new(), |(lo, hi)| {
        format!(" (per round {lo:.2}–{hi:.2})")
    });
    format!(
        "{}{rounds} (target {sign} {limit}): {verdict}",
        num(&ratios[key], 2)
    )
}

/// Which data plane each wsedge mode's connections really ran on, per workload, as sampled
/// from `/connections`; a plane other than the mode's is in bold.
fn data_plane_lines(entries: &[Value]) -> String {
    let mut out = String::new();
    for mode in Mode::ALL {
        let Some(expected) = mode.expected_data_plane() else {
            continue;
        };
        let mut seen: Vec<(String, Vec<&str>)> = Vec::new();
        for e in entries.iter().filter(|e| e["mode"] == mode.name()) {
            let plane = e["data_plane_seen"]
                .as_str()
                .unwrap_or("unknown")
                .to_string();
            let workload = e["workload"].as_str().unwrap_or("");
            match seen.iter_mut().find(|(p, _)| *p == plane) {
                Some((_, w)) => w.push(workload),
                None => seen.push((plane, vec![workload])),
            }
        }
        if seen.is_empty() {
            continue;
        }
        let parts: Vec<String> = seen
            .iter()
            .map(|(plane, workloads)| {
                let shown = match plane == expected {
                    true => format!("`{plane}`"),
                    false => format!("**`{plane}`, not `{expected}`**"),
                };
                match seen.len() {
                    1 => shown,
                    _ => format!("{shown} ({})", workloads.join(", ")),
                }
            })
            .collect();
        let _ = writeln!(out, "- {}: {}", mode.name(), parts.join("; "));
    }
    out
}

/// "9 min 12 s".
fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    format!("{} min {:02} s", s / 60, s % 60)
}

/// The report's opening: the machine, the placement, and how to read the figures.
fn header(machine: &Value, stamp: &str, info: &RunInfo) -> String {
    let n = info.repeats;
    let placement = match info.placement {
        Placement::Unpinned => info.placement.describe(),
        pinned => format!("{} (`--cpus {pinned}`)", pinned.describe()),
    };
    let how = match n {
        1 => "One run of every mode and workload (`--repeats 1`): no spread to show. `added` \
              figures are the mode's run minus `direct`'s."
            .to_string(),
        _ => format!(
            "Each figure is the median of the {n} runs of its mode and workload, the lowest and \
             highest run in brackets. The runs are interleaved: round 1 runs every mode once, \
             then round 2, and so on. `added` figures are taken per round (the mode's run minus \
             `direct`'s run of the same round) and then summarised the same way. A ratio \
             against the better of nginx and HAProxy divides medians (the mode's median by the \
             lower of nginx's and HAProxy's); \"per round\" is the same ratio computed within \
             each round."
        ),
    };
    format!(
        "Run {stamp}{}{}: {n} repeats, measured in {}. Kernel {}, {} CPUs ({}), {} GiB.\n\n\
         Placement: {placement}.\n\n{how}\n\n",
        if info.quick { " (--quick)" } else { "" },
        if info.filtered {
            " (only some modes or workloads)"
        } else {
            ""
        },
        minutes(info.elapsed),
        machine["kernel"].as_str().unwrap_or(""),
        machine["cpus"],
        machine["cpu_model"].as_str().unwrap_or(""),
        machine["memory_gib"],
    )
}

fn markdown(
    entries: &[Value],
    ratios: &Value,
    machine: &Value,
    stamp: &str,
    info: &RunInfo,
) -> String {
    let mut md = header(machine, stamp, info);
    md.push_str(
        "| mode | workload | conns | msgs/s | p50 µs | p99 µs | p99.9 µs | added p99 µs | CPU µs/msg | added CPU µs/msg | proxy RSS KiB/conn | handshakes/s | max conns |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for e in entries {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            e["mode"].as_str().unwrap_or(""),
            e["workload"].as_str().unwrap_or(""),
            stat(e, "connections", 0),
            stat(e, "msgs_per_s", 0),
            stat(e, "rtt_p50_us", 0),
            stat(e, "rtt_p99_us", 0),
            stat(e, "rtt_p999_us", 0),
            stat(e, "added_p99_us", 0),
            stat(e, "cpu_us_per_msg", 1),
            stat(e, "added_cpu_us_per_msg", 1),
            stat(e, "proxy_rss_kb_per_conn", 2),
            stat(e, "handshakes_per_s", 0),
            match e.get("max_connections") {
                Some(_) => stat(e, "max_connections", 0),
                None => String::new(),
            },
        );
    }
    if entries.iter().any(|e| e["workload"] == "push") {
        md.push_str(
            "\nFor `push` (the backend sends, the client only receives) the latency columns are \
             one-way, backend to client.\n",
        );
    }
    md.push_str(&where_cpu_went(entries, machine));
    let stopped: Vec<String> = entries
        .iter()
        .flat_map(|e| e["runs"].as_array().into_iter().flatten())
        .filter_map(|r| {
            let status = r["proxy_exited"].as_str()?;
            Some(format!(
                "- {} on {}, round {}: the proxy exited during the run ({status}), even when \
                 measured again; the run is not a measurement\n",
                r["mode"].as_str().unwrap_or(""),
                r["workload"].as_str().unwrap_or(""),
                r["round"],
            ))
        })
        .collect();
    if !stopped.is_empty() {
        let _ = write!(md, "\n{}", stopped.concat());
    }
    let planes = data_plane_lines(entries);
    if !planes.is_empty() {
        let _ = write!(
            md,
            "\nData plane of wsedge's connections (`GET /connections`, sampled once all were \
             open):\n\n{planes}"
        );
    }
    let _ = write!(
        md,
        "\nwsedge-kernel against the better of nginx and HAProxy (issue 3):\n\n\
         - edge, added CPU per message: {}\n- edge, the same on the run's own CPU: {}\n\
         - edge, p99 (absolute p99s: added p99 can be negative): {}\n\
         - edge, proxy memory per connection: {}\n- edge-max, connections served: {}\n",
        target(ratios, "edge_added_cpu_vs_best", Target::AtMost(0.5)),
        target(ratios, "edge_added_own_cpu_vs_best", Target::AtMost(0.5)),
        target(ratios, "edge_p99_vs_best", Target::AtMost(1.0)),
        target(ratios, "edge_rss_per_conn_vs_best", Target::AtMost(0.25)),
        target(ratios, "edge_max_connections_vs_best", Target::Above(1.0)),
    );
    // The zero-hop targets hold only for the zero-hop plane: say so when the mode's
    // connections ran on another.
    let caveat = entries
        .iter()
        .filter(|e| e["mode"] == "wsedge-zero-hop")
        .filter_map(|e| e["data_plane_seen"].as_str())
        .find(|&p| p != "kernel-zero-hop")
        .map_or(String::new(), |p| {
            format!(" (its connections ran on `{p}`, not the zero-hop plane)")
        });
    let _ = write!(
        md,
        "\nwsedge-zero-hop against the better of nginx and HAProxy (issue 5){caveat}:\n\n\
         - edge, added CPU per message: {}\n- edge, the same on the run's own CPU: {}\n\
         - edge-max, connections served: {}\n",
        target(
            ratios,
            "zero_hop_edge_added_cpu_vs_best",
            Target::AtMost(0.3)
        ),
        target(
            ratios,
            "zero_hop_edge_added_own_cpu_vs_best",
            Target::AtMost(0.3)
        ),
        target(
            ratios,
            "zero_hop_edge_max_connections_vs_best",
            Target::AtLeast(2.0)
        ),
    );
    let _ = write!(
        md,
        "\nwsedge-userspace (the relay) against the better of nginx and HAProxy (issue 11):\n\n\
         - edge, added CPU per message: {}\n- edge, the same on the run's own CPU: {}\n\
         - edge, p99: {}\n- edge, proxy memory per connection against HAProxy's: {}\n\
         - edge-max, connections served against nginx's: {}\n",
        target(ratios, "relay_edge_added_cpu_vs_best", Target::AtMost(0.8)),
        target(
            ratios,
            "relay_edge_added_own_cpu_vs_best",
            Target::AtMost(0.8)
        ),
        target(ratios, "relay_edge_p99_vs_best", Target::AtMost(1.0)),
        target(
            ratios,
            "relay_edge_rss_per_conn_vs_haproxy",
            Target::AtMost(1.0)
        ),
        target(
            ratios,
            "relay_edge_max_connections_vs_nginx",
            Target::AtLeast(1.0)
        ),
    );
    md.push_str(&tls_targets(entries, ratios));
    for c in SAME_PLANE {
        if find(entries, c.shown_with, "edge").is_none() {
            continue;
        }
        let at_most_1 = |metric| target(ratios, &c.key(metric), Target::AtMost(1.0));
        let _ = write!(
            md,
            "\n{}:\n\n- edge, added CPU per message: {}\n\
             - edge, the same on the run's own CPU: {}\n- edge, p99: {}\n",
            c.heading,
            at_most_1("added_cpu"),
            at_most_1("added_own_cpu"),
            at_most_1("p99"),
        );
    }
    md
}

/// wsedge-tls against the better of nginx-tls and haproxy-tls, with what the TLS modes'
/// connections negotiated; nothing when no TLS mode ran.
fn tls_targets(entries: &[Value], ratios: &Value) -> String {
    let tls: Vec<&Value> = entries
        .iter()
        .filter(|e| e.get("tls_seen").is_some())
        .collect();
    if tls.is_empty() {
        return String::new();
    }
    let mut md = String::from(
        "\nTLS sessions the load generator negotiated (every connection of the run, by \
         protocol, cipher suite, key exchange group and handshake kind; all should be the \
         same, full handshakes):\n\n",
    );
    for e in tls {
        let seen = e["tls_seen"].as_str().unwrap_or("");
        let shown = match seen == super::modes::TLS_SESSION {
            true => format!("`{seen}`"),
            false => format!("**`{seen}`**"),
        };
        let _ = writeln!(
            md,
            "- {}, {}: {shown}",
            e["mode"].as_str().unwrap_or(""),
            e["workload"].as_str().unwrap_or("")
        );
    }
    let caveat = entries
        .iter()
        .filter(|e| e["mode"] == "wsedge-tls")
        .filter_map(|e| e["data_plane_seen"].as_str())
        .find(|&p| p != "userspace-tls")
        .map_or(String::new(), |p| {
            format!(" (its connections ran on `{p}`, not `userspace-tls`)")
        });
    let _ = write!(
        md,
        "\nwsedge-tls against the better of nginx-tls and haproxy-tls{caveat}. All three serve \
         the same ECDSA P-256 certificate over TLS 1.3 with TLS_AES_128_GCM_SHA256; `added` \
         figures are against plaintext `direct`, so they include the load generator's own TLS \
         work, the same in every TLS mode:\n\n\
         - edge, added CPU per message: {}\n- edge, the same on the run's own CPU: {}\n\
         - edge, p99: {}\n- bulk, added CPU per message: {}\n\
         - bulk, the same on the run's own CPU: {}\n- bulk, p99: {}\n\
         - handshake, full TLS and WebSocket handshakes per second: {}\n",
        target(ratios, "tls_edge_added_cpu_vs_best", Target::AtMost(1.0)),
        target(
            ratios,
            "tls_edge_added_own_cpu_vs_best",
            Target::AtMost(1.0)
        ),
        target(ratios, "tls_edge_p99_vs_best", Target::AtMost(1.0)),
        target(ratios, "tls_bulk_added_cpu_vs_best", Target::AtMost(1.0)),
        target(
            ratios,
            "tls_bulk_added_own_cpu_vs_best",
            Target::AtMost(1.0)
        ),
        target(ratios, "tls_bulk_p99_vs_best", Target::AtMost(1.0)),
        target(ratios, "tls_handshakes_per_s_vs_best", Target::AtLeast(1.0)),
    );
    md
}

/// Where each mode's CPU went: busy µs per message on each CPU, and the context switches and
/// cross-CPU interrupts per message that explain most of the differences between placements.
fn where_cpu_went(entries: &[Value], machine: &Value) -> String {
    let cpus = machine["cpus"].as_u64().unwrap_or(1) as usize;
    let rows: Vec<&Value> = entries
        .iter()
        .filter(|e| e["workload"] != "edge-max" && f(&e["ipis_per_msg"]).is_some())
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut md = String::from(
        "\nWhere the CPU went, per message in the measurement window. `own CPU`: the run's \
         processes (load generator, proxy, backend or instance) and the kernel's kworker and \
         ksoftirqd threads, by the scheduler's exact run times, which other work on a shared \
         machine hardly inflates (the whole-machine figure above includes it); `added own` is \
         that minus `direct`'s in the same round. `tick-sampled`: the whole-machine figure as \
         the timer tick counts it (what runs before 2026-12 reported). Per-CPU figures, context \
         switches and IPIs (rescheduling and function-call interrupts between CPUs) are \
         whole-machine.\n\n\
         | mode | workload | own CPU µs/msg | added own µs/msg | kworker µs/msg | tick-sampled µs/msg |",
    );
    for cpu in 0..cpus {
        let _ = write!(md, " CPU {cpu} µs/msg |");
    }
    md.push_str(" context switches/msg | IPIs/msg |\n|---|---|");
    md.push_str(&"---:|".repeat(cpus + 6));
    md.push('\n');
    for e in rows {
        let _ = write!(
            md,
            "| {} | {} |",
            e["mode"].as_str().unwrap_or(""),
            e["workload"].as_str().unwrap_or("")
        );
        for key in [
            "own_cpu_us_per_msg",
            "added_own_cpu_us_per_msg",
            "kworker_cpu_us_per_msg",
            "tick_sampled_cpu_us_per_msg",
        ] {
            let _ = write!(md, " {} |", stat(e, key, 1));
        }
        for cpu in 0..cpus {
            let _ = write!(md, " {} |", stat(e, &format!("cpu{cpu}_us_per_msg"), 1));
        }
        let _ = writeln!(
            md,
            " {} | {} |",
            stat(e, "context_switches_per_msg", 2),
            stat(e, "ipis_per_msg", 2)
        );
    }
    md
}

/// Bars of the `edge` workload's latency percentiles and CPU per message by mode: medians,
/// with a line from the lowest to the highest run.
fn svg(entries: &[Value]) -> String {
    let edge: Vec<&Value> = entries.iter().filter(|e| e["workload"] == "edge").collect();
    let (w, h, top, left, band) = (900.0, 360.0, 40.0, 60.0, 380.0);
    let plot_h = h - top - 70.0;
    let hi = |e: &Value, key: &str| {
        e["range"][key]
            .get(1)
            .and_then(Value::as_f64)
            .or_else(|| f(&e[key]))
    };
    let max_lat = edge
        .iter()
        .filter_map(|e| hi(e, "rtt_p999_us"))
        .fold(1.0, f64::max);
    let max_cpu = edge
        .iter()
        .filter_map(|e| hi(e, "cpu_us_per_msg"))
        .fold(1.0, f64::max);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"20\" font-size=\"14\">edge: RTT percentiles (µs, p50/p99/p99.9)</text>\n\
         <text x=\"{}\" y=\"20\" font-size=\"14\">edge: whole-machine CPU µs per message</text>\n",
        left + band + 60.0
    );
    // The min-max line of one bar, centred on it.
    let whisker = |s: &mut String, e: &Value, key: &str, x: f64, scale: f64| {
        if let Some([lo, hi]) = e["range"][key].as_array().map(Vec::as_slice) {
            let (lo, hi) = (lo.as_f64().unwrap_or(0.0), hi.as_f64().unwrap_or(0.0));
            let y = |v: f64| top + plot_h - plot_h * v / scale;
            let _ = writeln!(
                s,
                "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>",
                y(lo),
                y(hi)
            );
        }
    };
    let colors = ["#4c78a8", "#f58518", "#e45756"];
    let slot = band / edge.len().max(1) as f64;
    for (i, e) in edge.iter().enumerate() {
        let x0 = left + i as f64 * slot;
        for (j, key) in ["rtt_p50_us", "rtt_p99_us", "rtt_p999_us"]
            .iter()
            .enumerate()
        {
            let v = f(&e[*key]).unwrap_or(0.0);
            let bh = plot_h * v / max_lat;
            let (bx, bw) = (
                x0 + 4.0 + j as f64 * (slot - 8.0) / 3.0,
                (slot - 8.0) / 3.0 - 2.0,
            );
            let _ = writeln!(
                s,
                "<rect x=\"{bx:.1}\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"{bh:.1}\" fill=\"{}\"><title>{} {key}: {v:.0}</title></rect>",
                top + plot_h - bh,
                colors[j],
                e["mode"].as_str().unwrap_or("")
            );
            whisker(&mut s, e, key, bx + bw / 2.0, max_lat);
        }
        let cpu = f(&e["cpu_us_per_msg"]).unwrap_or(0.0);
        let bh = plot_h * cpu / max_cpu;
        let cx = left + band + 60.0 + i as f64 * slot;
        let _ = writeln!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"#54a24b\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{cpu:.1}</text>",
            cx + 6.0,
            top + plot_h - bh,
            slot - 12.0,
            cx + slot / 2.0,
            top + plot_h - bh - 3.0
        );
        whisker(&mut s, e, "cpu_us_per_msg", cx + slot / 2.0 + 10.0, max_cpu);
        for x in [x0, cx] {
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" transform=\"rotate(-30 {:.1} {:.1})\">{}</text>",
                x + slot / 2.0,
                top + plot_h + 14.0,
                x + slot / 2.0,
                top + plot_h + 14.0,
                e["mode"].as_str().unwrap_or("")
            );
        }
    }
    let _ = writeln!(
        s,
        "<text x=\"{left}\" y=\"{}\">bars: medians; lines: lowest to highest run; max p99.9 {max_lat:.0} µs = full height</text>\n</svg>",
        h - 8.0
    );
    s
}

/// Writes this run's JSON, Markdown and SVG; a run of every mode and workload (or `--quick`)
/// also replaces the README's table, a `filtered` one does not.
pub fn write_all(cells: &[Cell], machine: &Value, info: &RunInfo) -> Result<PathBuf> {
    // edge-max rows hold each mode's own capacity, measured at different connection counts:
    // nothing there to subtract.
    let direct = |workload: &str, round: usize| {
        cells.iter().find(|c| {
            c.mode == Mode::Direct
                && c.workload == workload
                && c.round == round
                && workload != "edge-max"
        })
    };
    let runs: Vec<Value> = cells
        .iter()
        .map(|c| entry(c, direct(c.workload, c.round)))
        .collect();
    let entries = summarise_all(&runs);
    let stamp = cmd::output(cmd::new("date").args(["-u", "+%Y-%m-%dT%H-%M-%SZ"]))
        .unwrap_or_default()
        .trim()
        .to_string();
    let ratios = ratios_with_range(&entries, &runs, info.repeats);
    let workloads: Vec<&str> = {
        let mut w: Vec<&str> = Vec::new();
        for c in cells {
            if !w.contains(&c.workload) {
                w.push(c.workload);
            }
        }
        w
    };
    let report = json!({
        "machine": machine,
        "kernel": machine["kernel"],
        "quick": info.quick,
        "filtered": info.filtered,
        "repeats": info.repeats,
        "placement": info.placement.to_json(),
        "placement_text": info.placement.describe(),
        "elapsed_s": info.elapsed.as_secs_f64(),
        "workloads": workloads,
        "how": "each figure: median over the runs, range = [min, max]; added figures per round \
                (mode's run minus direct's run of the same round), then median; ratios divide \
                medians, range_over_rounds is the same ratio within each round",
        "modes": entries,
        "ratios": ratios,
    });
    let dir = results_dir();
    std::fs::create_dir_all(&dir)?;
    let json_path = dir.join(format!("{stamp}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    let md = markdown(&entries, &ratios, machine, &stamp, info);
    std::fs::write(dir.join(format!("{stamp}.md")), &md)?;
    std::fs::write(dir.join(format!("{stamp}.svg")), svg(&entries))?;
    println!("\n{md}");
    if !info.filtered {
        update_readme(&md, &stamp).context("updating README.md")?;
    }
    Ok(json_path)
}

/// Replaces the table between the README's bench markers with this run's.
fn update_readme(md: &str, stamp: &str) -> Result<()> {
    const START: &str = "<!-- bench:start -->";
    const END: &str = "<!-- bench:end -->";
    let path = cmd::root().join("README.md");
    let text = std::fs::read_to_string(&path)?;
    let (Some(a), Some(b)) = (text.find(START), text.find(END)) else {
        return Ok(());
    };
    let block = format!("{START}\n{md}\n![edge latency and CPU](bench/results/{stamp}.svg)\n{END}");
    std::fs::write(
        &path,
        format!("{}{block}{}", &text[..a], &text[b + END.len()..]),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(mode: &str, round: usize, cpu: f64, added: Option<f64>) -> Value {
        json!({
            "mode": mode, "workload": "edge", "round": round, "cpu_us_per_msg": cpu,
            "added_cpu_us_per_msg": added, "errors": 1, "data_plane_seen": "kernel",
        })
    }

    #[test]
    fn same_plane_comparisons_divide_the_changed_mode_by_its_twin_and_show_when_it_ran() {
        let edge = |mode: &str, cpu: f64, own: f64, p99: f64| {
            json!({"mode": mode, "workload": "edge", "added_cpu_us_per_msg": cpu,
                   "added_own_cpu_us_per_msg": own, "rtt_p99_us": p99})
        };
        let entries = vec![
            edge("wsedge-kernel", 2.0, 4.0, 100.0),
            edge("wsedge-kernel-quotas", 3.0, 5.0, 150.0),
            edge("wsedge-kernel-notrace", 1.0, 8.0, 200.0),
        ];
        let r = ratios(&entries);
        assert_eq!(r["quotas_edge_added_cpu_vs_off"], json!(1.5));
        assert_eq!(r["quotas_edge_added_own_cpu_vs_off"], json!(1.25));
        assert_eq!(r["quotas_edge_p99_vs_off"], json!(1.5));
        assert_eq!(r["trace_points_edge_added_cpu_vs_none"], json!(2.0));
        assert_eq!(r["trace_points_edge_added_own_cpu_vs_none"], json!(0.5));
        assert_eq!(r["trace_points_edge_p99_vs_none"], json!(0.5));
        let without_notrace = ratios(&entries[..2]);
        assert_eq!(
            without_notrace["trace_points_edge_p99_vs_none"],
            Value::Null
        );
    }

    #[test]
    fn medians_ranges_and_per_round_ratios() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
        let runs = vec![
            run("direct", 1, 40.0, None),
            run("wsedge-zero-hop", 1, 50.0, Some(10.0)),
            run("nginx", 1, 80.0, Some(40.0)),
            run("direct", 2, 30.0, None),
            run("wsedge-zero-hop", 2, 60.0, Some(30.0)),
            run("nginx", 2, 60.0, Some(30.0)),
            run("direct", 3, 35.0, None),
            run("wsedge-zero-hop", 3, 55.0, Some(20.0)),
            run("nginx", 3, 70.0, Some(35.0)),
        ];
        let summary = summarise_all(&runs);
        let zero = &summary[1];
        assert_eq!(zero["mode"], "wsedge-zero-hop");
        assert_eq!(
            (zero["repeats"].as_u64(), f(&zero["errors"])),
            (Some(3), Some(3.0))
        );
        assert_eq!(f(&zero["added_cpu_us_per_msg"]), Some(20.0));
        assert_eq!(zero["range"]["added_cpu_us_per_msg"], json!([10.0, 30.0]));
        assert_eq!(zero["data_plane_seen"], "kernel");
        assert_eq!(stat(zero, "added_cpu_us_per_msg", 1), "20.0 (10.0–30.0)");
        assert!(summary[0]["range"].get("added_cpu_us_per_msg").is_none());
        let r = ratios_with_range(&summary, &runs, 3);
        // Medians: 20 / 35; per round 10/40, 30/30, 20/35.
        assert!((f(&r["zero_hop_edge_added_cpu_vs_best"]).unwrap() - 20.0 / 35.0).abs() < 1e-9);
        assert_eq!(
            r["range_over_rounds"]["zero_hop_edge_added_cpu_vs_best"],
            json!([0.25, 1.0])
        );
        let key = "zero_hop_edge_added_cpu_vs_best";
        assert!(
            target(&r, key, Target::AtMost(0.6))
                .ends_with("met by the median, **not in every round**")
        );
        assert!(target(&r, key, Target::AtMost(1.0)).ends_with(": met"));
        assert!(target(&r, key, Target::AtMost(0.2)).ends_with(": **not met**"));
        assert!(
            target(&r, "edge_added_cpu_vs_best", Target::AtMost(0.5)).ends_with("not measured")
        );
    }

    #[test]
    fn tls_targets_take_the_better_tls_proxy() {
        let cell = |mode: &str, workload: &str, key: &str, v: f64| {
            let mut e = json!({ "mode": mode, "workload": workload, "round": 1 });
            e[key] = json!(v);
            e
        };
        let runs = vec![
            cell("wsedge-tls", "handshake", "handshakes_per_s", 3000.0),
            cell("nginx-tls", "handshake", "handshakes_per_s", 1500.0),
            cell("haproxy-tls", "handshake", "handshakes_per_s", 1000.0),
            cell("wsedge-tls", "edge", "rtt_p99_us", 700.0),
            cell("nginx-tls", "edge", "rtt_p99_us", 800.0),
            cell("haproxy-tls", "edge", "rtt_p99_us", 500.0),
            // The plain proxies are not what wsedge-tls is held against.
            cell("nginx", "edge", "rtt_p99_us", 100.0),
            cell("nginx", "handshake", "handshakes_per_s", 20000.0),
        ];
        let r = ratios_with_range(&summarise_all(&runs), &runs, 1);
        // Handshakes: higher is better, so nginx-tls's; p99: lower is better, HAProxy's.
        assert_eq!(f(&r["tls_handshakes_per_s_vs_best"]), Some(2.0));
        assert_eq!(f(&r["tls_edge_p99_vs_best"]), Some(1.4));
        assert!(
            target(&r, "tls_handshakes_per_s_vs_best", Target::AtLeast(1.0)).ends_with(": met")
        );
        assert!(f(&r["tls_bulk_p99_vs_best"]).is_none());
    }
}
