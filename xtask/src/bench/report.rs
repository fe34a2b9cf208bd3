//! Turns measured cells into `bench/results/<UTC time>.{json,md,svg}` and the README table.

use std::{fmt::Write as _, path::PathBuf};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::{Cell, modes::Mode, results_dir};
use crate::cmd;

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

/// The row for one cell; `added_*` against `direct` in the same workload.
fn entry(cell: &Cell, direct: Option<&Cell>) -> Value {
    let l = &cell.load;
    let received = f(&l["messages_received"]).unwrap_or(0.0);
    let cpu_us_per_msg = f(&l["cpu_busy_s"])
        .filter(|_| received > 0.0)
        .map(|c| c * 1e6 / received);
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
    let direct_cpu = |d: &Value| {
        let r = f(&d["messages_received"]).unwrap_or(0.0);
        f(&d["cpu_busy_s"]).filter(|_| r > 0.0).map(|c| c * 1e6 / r)
    };
    let mut e = json!({
        "mode": cell.mode.name(),
        "workload": cell.workload,
        "connections": cell.connections,
        "msgs_per_s": f(&l["msgs_per_s"]),
        "rtt_p50_us": f(&l["rtt_us"]["p50"]),
        "rtt_p99_us": p99,
        "rtt_p999_us": f(&l["rtt_us"]["p999"]),
        "rtt_max_us": f(&l["rtt_us"]["max"]),
        "added_p99_us": added(&|d: &Value| f(&d["rtt_us"]["p99"]), p99),
        "cpu_us_per_msg": cpu_us_per_msg,
        "added_cpu_us_per_msg": added(&direct_cpu, cpu_us_per_msg),
        "proxy_rss_kb_per_conn": rss_per_conn,
        "handshakes_per_s": f(&l["handshakes_per_s"]).filter(|_| cell.workload == "handshake"),
        "errors": l["errors"],
        "connect_errors": l["connect_errors"],
    });
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
    e
}

fn find<'a>(entries: &'a [Value], mode: &str, workload: &str) -> Option<&'a Value> {
    entries
        .iter()
        .find(|e| e["mode"] == mode && e["workload"] == workload)
}

/// wsedge-kernel (issue 3) and wsedge-zero-hop (issue 5) against the better of nginx and
/// HAProxy, as the issues' targets state them.
fn ratios(entries: &[Value]) -> Value {
    let get = |mode: &str, workload: &str, key: &str| {
        find(entries, mode, workload).and_then(|e| f(&e[key]))
    };
    let better = |workload: &str, key: &str, lower: bool| {
        let (a, b) = (get("nginx", workload, key), get("haproxy", workload, key));
        match (a, b) {
            (Some(a), Some(b)) => Some(if lower { a.min(b) } else { a.max(b) }),
            (x, y) => x.or(y),
        }
    };
    let ratio = |mine: Option<f64>, theirs: Option<f64>| match (mine, theirs) {
        (Some(m), Some(t)) if t.abs() > f64::EPSILON => Some(m / t),
        _ => None,
    };
    let k = |workload: &str, key: &str| get("wsedge-kernel", workload, key);
    let z = |workload: &str, key: &str| get("wsedge-zero-hop", workload, key);
    json!({
        "edge_added_cpu_vs_best": ratio(k("edge", "added_cpu_us_per_msg"), better("edge", "added_cpu_us_per_msg", true)),
        // Absolute p99s of the same run: "added" values can be negative (direct's p99 is often
        // the highest: wake-from-idle), which makes a ratio of them meaningless.
        "edge_p99_vs_best": ratio(k("edge", "rtt_p99_us"), better("edge", "rtt_p99_us", true)),
        "edge_rss_per_conn_vs_best": ratio(k("edge", "proxy_rss_kb_per_conn"), better("edge", "proxy_rss_kb_per_conn", true)),
        "edge_max_connections_vs_best": ratio(k("edge-max", "max_connections"), better("edge-max", "max_connections", false)),
        "zero_hop_edge_added_cpu_vs_best": ratio(z("edge", "added_cpu_us_per_msg"), better("edge", "added_cpu_us_per_msg", true)),
        "zero_hop_edge_max_connections_vs_best": ratio(z("edge-max", "max_connections"), better("edge-max", "max_connections", false)),
    })
}

fn num(v: &Value, digits: usize) -> String {
    v.as_f64().map_or("–".into(), |x| format!("{x:.digits$}"))
}

/// How a ratio is held against its target.
#[derive(Clone, Copy)]
enum Target {
    AtMost(f64),
    AtLeast(f64),
    Above(f64),
}

fn target(ratios: &Value, key: &str, t: Target) -> String {
    let (met, sign, limit) = match t {
        Target::AtMost(l) => (ratios[key].as_f64().map(|x| x <= l), "≤", l),
        Target::AtLeast(l) => (ratios[key].as_f64().map(|x| x >= l), "≥", l),
        Target::Above(l) => (ratios[key].as_f64().map(|x| x > l), ">", l),
    };
    let verdict = match met {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "not measured",
    };
    format!(
        "{} (target {sign} {limit}): {verdict}",
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

fn markdown(
    entries: &[Value],
    ratios: &Value,
    machine: &Value,
    stamp: &str,
    quick: bool,
    filtered: bool,
) -> String {
    let mut md = format!(
        "Run {stamp}{}{}, kernel {}, {} CPUs ({}), {} GiB.\n\n\
         | mode | workload | conns | msgs/s | p50 µs | p99 µs | p99.9 µs | added p99 µs | CPU µs/msg | added CPU µs/msg | proxy RSS KiB/conn | handshakes/s | max conns |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        if quick { " (--quick)" } else { "" },
        if filtered {
            " (only some modes or workloads)"
        } else {
            ""
        },
        machine["kernel"].as_str().unwrap_or(""),
        machine["cpus"],
        machine["cpu_model"].as_str().unwrap_or(""),
        machine["memory_gib"],
    );
    for e in entries {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            e["mode"].as_str().unwrap_or(""),
            e["workload"].as_str().unwrap_or(""),
            e["connections"],
            num(&e["msgs_per_s"], 0),
            num(&e["rtt_p50_us"], 0),
            num(&e["rtt_p99_us"], 0),
            num(&e["rtt_p999_us"], 0),
            num(&e["added_p99_us"], 0),
            num(&e["cpu_us_per_msg"], 1),
            num(&e["added_cpu_us_per_msg"], 1),
            num(&e["proxy_rss_kb_per_conn"], 2),
            num(&e["handshakes_per_s"], 0),
            e.get("max_connections")
                .map_or("".into(), |m| m.to_string()),
        );
    }
    if entries.iter().any(|e| e["workload"] == "push") {
        md.push_str(
            "\nFor `push` (the backend sends, the client only receives) the latency columns are \
             one-way, backend to client.\n",
        );
    }
    let stopped: Vec<String> = entries
        .iter()
        .filter_map(|e| {
            let status = e["proxy_exited"].as_str()?;
            Some(format!(
                "- {} on {}: the proxy exited during the run ({status}), even when measured \
                 again; the row is not a measurement\n",
                e["mode"].as_str().unwrap_or(""),
                e["workload"].as_str().unwrap_or("")
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
        "\nwsedge-kernel against the better of nginx and HAProxy in this run (issue 3):\n\n\
         - edge, added CPU per message: {}\n- edge, p99 (same run, so added p99 compares alike): {}\n\
         - edge, proxy memory per connection: {}\n- edge-max, connections served: {}\n",
        target(ratios, "edge_added_cpu_vs_best", Target::AtMost(0.5)),
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
        "\nwsedge-zero-hop against the better of nginx and HAProxy in this run (issue 5){caveat}:\n\n\
         - edge, added CPU per message: {}\n- edge-max, connections served: {}\n",
        target(
            ratios,
            "zero_hop_edge_added_cpu_vs_best",
            Target::AtMost(0.3)
        ),
        target(
            ratios,
            "zero_hop_edge_max_connections_vs_best",
            Target::AtLeast(2.0)
        ),
    );
    md
}

/// Bars of latency percentiles and CPU per message for the `edge` workload, by mode.
fn svg(entries: &[Value]) -> String {
    let edge: Vec<&Value> = entries.iter().filter(|e| e["workload"] == "edge").collect();
    let (w, h, top, left, band) = (900.0, 360.0, 40.0, 60.0, 380.0);
    let plot_h = h - top - 70.0;
    let max_lat = edge
        .iter()
        .filter_map(|e| f(&e["rtt_p999_us"]))
        .fold(1.0, f64::max);
    let max_cpu = edge
        .iter()
        .filter_map(|e| f(&e["cpu_us_per_msg"]))
        .fold(1.0, f64::max);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"20\" font-size=\"14\">edge: RTT percentiles (µs, p50/p99/p99.9)</text>\n\
         <text x=\"{}\" y=\"20\" font-size=\"14\">edge: whole-machine CPU µs per message</text>\n",
        left + band + 60.0
    );
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
            let _ = writeln!(
                s,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"><title>{} {key}: {v:.0}</title></rect>",
                x0 + 4.0 + j as f64 * (slot - 8.0) / 3.0,
                top + plot_h - bh,
                (slot - 8.0) / 3.0 - 2.0,
                colors[j],
                e["mode"].as_str().unwrap_or("")
            );
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
        "<text x=\"{left}\" y=\"{}\">max p99.9 {max_lat:.0} µs = full height</text>\n</svg>",
        h - 8.0
    );
    s
}

/// Writes this run's JSON, Markdown and SVG; a run of every mode and workload (or `--quick`)
/// also replaces the README's table, a `filtered` one does not.
pub fn write_all(cells: &[Cell], machine: &Value, quick: bool, filtered: bool) -> Result<PathBuf> {
    // edge-max rows hold each mode's own capacity, measured at different connection counts:
    // nothing there to subtract.
    let direct = |workload: &str| {
        cells
            .iter()
            .find(|c| c.mode == Mode::Direct && c.workload == workload && workload != "edge-max")
    };
    let mut entries: Vec<Value> = cells.iter().map(|c| entry(c, direct(c.workload))).collect();
    // The edge workload's entries first, as the report format asks.
    entries.sort_by_key(|e| e["workload"] != "edge");
    let stamp = cmd::output(cmd::new("date").args(["-u", "+%Y-%m-%dT%H-%M-%SZ"]))
        .unwrap_or_default()
        .trim()
        .to_string();
    let ratios = ratios(&entries);
    let workloads: Vec<&str> = {
        let mut w: Vec<&str> = cells.iter().map(|c| c.workload).collect();
        w.dedup();
        w
    };
    let report = json!({
        "machine": machine,
        "kernel": machine["kernel"],
        "quick": quick,
        "filtered": filtered,
        "workloads": workloads,
        "modes": entries,
        "ratios": ratios,
    });
    let dir = results_dir();
    std::fs::create_dir_all(&dir)?;
    let json_path = dir.join(format!("{stamp}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    let md = markdown(&entries, &ratios, machine, &stamp, quick, filtered);
    std::fs::write(dir.join(format!("{stamp}.md")), &md)?;
    std::fs::write(dir.join(format!("{stamp}.svg")), svg(&entries))?;
    println!("\n{md}");
    if !filtered {
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
