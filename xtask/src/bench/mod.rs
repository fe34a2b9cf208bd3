//! `cargo xtask bench`: the same workloads through every mode in one run, reported as
//! ratios against each other (see README, "Benchmark").

mod modes;
mod report;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{cmd, setup};
use modes::Mode;

/// One measured (mode, workload) cell.
#[derive(Debug, Clone)]
pub struct Cell {
    pub mode: Mode,
    pub workload: &'static str,
    pub connections: u64,
    /// The load generator's JSON report.
    pub load: Value,
    pub max_connections: Option<u64>,
}

/// What the load generator is asked to do.
#[derive(Debug, Clone, Copy)]
struct Load {
    workload: &'static str,
    kind: &'static str,
    connections: u64,
    rate: u64,
    size: u64,
    duration_s: u64,
}

/// Connection counts `edge-max` steps through; capped by the 20000-descriptor hard limit
/// (a proxy holds two descriptors per WebSocket).
const EDGE_MAX_STEPS: [u64; 5] = [2000, 4000, 6000, 8000, 9500];

pub fn run(quick: bool) -> Result<()> {
    setup::run()?;
    install_packages(&["nginx", "haproxy"])?;
    cmd::run(cmd::cargo().args(["build", "--release", "-p", "proxy", "-p", "bench"]))?;
    let release = cmd::root().join("target/release");
    let work = cmd::root().join("target/bench-run");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let duration = if quick { 5 } else { 10 };
    let edge = Load {
        workload: "edge",
        kind: "edge",
        connections: 2000,
        rate: 10,
        size: 512,
        duration_s: duration,
    };
    let bulk = Load {
        workload: "bulk",
        kind: "bulk",
        connections: 16,
        rate: 0,
        size: 65536,
        duration_s: duration,
    };
    let handshake = Load {
        workload: "handshake",
        kind: "handshake",
        connections: 32,
        rate: 0,
        size: 64,
        duration_s: duration,
    };
    let mut plan: Vec<Load> = vec![edge, bulk];
    if !quick {
        plan.push(handshake);
    }
    let total = plan.len() * Mode::ALL.len() + if quick { 0 } else { Mode::ALL.len() };
    let mut cells = Vec::new();
    let mut step = 0;
    for load in plan {
        for mode in Mode::ALL {
            step += 1;
            println!(
                "bench: [{step}/{total}] {} through {} ...",
                load.workload,
                mode.name()
            );
            let report = measure(mode, load, &work, &release)?;
            println!("bench:         {}", summary(&report));
            cells.push(Cell {
                mode,
                workload: load.workload,
                connections: load.connections,
                load: report,
                max_connections: None,
            });
        }
    }
    if !quick {
        for mode in Mode::ALL {
            step += 1;
            println!(
                "bench: [{step}/{total}] edge-max through {} ...",
                mode.name()
            );
            cells.push(edge_max(mode, edge, &work, &release)?);
        }
    }
    let machine = report::machine();
    let out = report::write_all(&cells, &machine, quick)?;
    println!("bench: results in {}", out.display());
    Ok(())
}

/// Raises connections step by step until the mode falls below 95 % of the offered rate or
/// its p99 exceeds 50 ms; the last step that held is the mode's capacity.
fn edge_max(mode: Mode, edge: Load, work: &Path, release: &Path) -> Result<Cell> {
    let mut best: Option<(u64, Value)> = None;
    for connections in EDGE_MAX_STEPS {
        let load = Load {
            workload: "edge-max",
            connections,
            ..edge
        };
        let report = measure(mode, load, work, release)?;
        println!(
            "bench:         {connections} connections: {}",
            summary(&report)
        );
        if !holds(&report, connections, edge.rate) {
            break;
        }
        best = Some((connections, report));
    }
    let (max, load) = best.unwrap_or((0, Value::Null));
    Ok(Cell {
        mode,
        workload: "edge-max",
        connections: max,
        load,
        max_connections: Some(max),
    })
}

fn holds(report: &Value, connections: u64, rate: u64) -> bool {
    let offered = (connections * rate) as f64;
    let achieved = report["msgs_per_s"].as_f64().unwrap_or(0.0);
    let p99 = report["rtt_us"]["p99"].as_f64().unwrap_or(f64::MAX);
    report["connections_established"].as_u64() == Some(connections)
        && achieved >= 0.95 * offered
        && p99 <= 50_000.0
}

fn summary(r: &Value) -> String {
    format!(
        "{:.0} msg/s, p50 {} us, p99 {} us, cpu {:.0} %, {} connected, {} errors",
        r["msgs_per_s"].as_f64().unwrap_or(0.0),
        r["rtt_us"]["p50"],
        r["rtt_us"]["p99"],
        100.0 * r["cpu_busy_fraction"].as_f64().unwrap_or(0.0),
        r["connections_established"],
        r["errors"],
    )
}

/// One run: a fresh echo backend, the mode in front of it, the load generator.
fn measure(mode: Mode, load: Load, work: &Path, release: &Path) -> Result<Value> {
    let dir = work.join(format!(
        "{}-{}-{}",
        load.workload,
        mode.name(),
        load.connections
    ));
    std::fs::create_dir_all(&dir)?;
    let (mut backend, backend_addr) = start_backend(release)?;
    let result = (|| {
        let proxy = modes::start(mode, backend_addr, &dir, release)?;
        let mut cmd = Command::new(release.join("bench"));
        cmd.args(["load", "--url", &format!("ws://{}/echo", proxy.target)])
            .args(["--workload", load.kind])
            .args(["--connections", &load.connections.to_string()])
            .args(["--rate", &load.rate.max(1).to_string()])
            .args(["--size", &load.size.to_string()])
            .args(["--duration-s", &load.duration_s.to_string()]);
        for pid in proxy.pids() {
            cmd.args(["--rss-pid", &pid.to_string()]);
        }
        let out = cmd
            .stderr(Stdio::inherit())
            .output()
            .context("running the load generator")?;
        if !out.status.success() {
            bail!(
                "load generator failed ({}) against {}",
                out.status,
                mode.name()
            );
        }
        let report: Value = serde_json::from_slice(&out.stdout).context("load generator JSON")?;
        drop(proxy);
        Ok(report)
    })();
    let _ = backend.kill();
    let _ = backend.wait();
    result
}

fn start_backend(release: &Path) -> Result<(Child, SocketAddr)> {
    let mut child = Command::new(release.join("bench"))
        .args(["echo", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the echo backend")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("echo backend said {line:?}"))?;
    Ok((child, addr))
}

/// Debian packages the comparison needs, installed when missing (as root).
fn install_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !cmd::exists(p))
        .collect();
    cmd::checking(&format!("{} for the comparison", packages.join(" and ")));
    if missing.is_empty() {
        println!("ok");
        return Ok(());
    }
    if !cmd::is_root() {
        bail!(
            "missing {}; install with: apt-get install -y {}",
            missing.join(", "),
            missing.join(" ")
        );
    }
    println!("missing, installing {}", missing.join(" "));
    let apt = |args: &[&str]| {
        cmd::run(
            cmd::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    apt(&["update"])?;
    apt(&[&["install", "-y"][..], &missing].concat())?;
    // Debian starts the packaged services; the bench runs its own instances.
    for service in missing {
        let _ = cmd::new("systemctl").args(["stop", service]).status();
        let _ = cmd::new("pkill").args(["-x", service]).status();
    }
    Ok(())
}

pub fn results_dir() -> PathBuf {
    cmd::root().join("bench/results")
}
