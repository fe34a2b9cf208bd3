//! `cargo xtask bench`: the same workloads through every mode in one run, reported as
//! ratios against each other (see README, "Benchmark").

mod modes;
mod placement;
mod report;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{cmd, setup};
use modes::{Mode, Pki};
pub use placement::{DEFAULT as DEFAULT_PLACEMENT, Placement};

/// One measured run of a (mode, workload) cell.
#[derive(Debug, Clone)]
pub struct Cell {
    pub mode: Mode,
    pub workload: &'static str,
    /// Which round of the interleaved repeats (1-based).
    pub round: usize,
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
/// (a proxy holds two descriptors per WebSocket). Fine steps where this 2-core machine's
/// modes part ways (every mode held 2,000 and none 4,000 with steps of 2,000).
const EDGE_MAX_STEPS: [u64; 9] = [2000, 2500, 3000, 3500, 4000, 5000, 6000, 8000, 9500];

/// Every workload, in the order a full run measures them.
const WORKLOADS: [&str; 5] = ["edge", "bulk", "push", "handshake", "edge-max"];
/// `--quick`: the workloads every comparison needs, with a short window (see [`timing`]).
/// `handshake` only through the TLS modes (see [`measured`]).
const QUICK_WORKLOADS: [&str; 4] = ["edge", "bulk", "push", "handshake"];

/// What `cargo xtask bench` was asked for. Empty lists mean "all" (or the quick set).
#[derive(Debug, Clone)]
pub struct Options {
    pub quick: bool,
    pub modes: Vec<String>,
    pub workloads: Vec<String>,
    /// Runs of every (mode, workload), in interleaved rounds.
    pub repeats: usize,
    pub placement: Placement,
}

impl Options {
    /// A run limited by `--modes` or `--workloads`: a partial table, kept out of the README.
    fn filtered(&self) -> bool {
        !self.modes.is_empty() || !self.workloads.is_empty()
    }
}

fn select_modes(names: &[String]) -> Result<Vec<Mode>> {
    for name in names {
        if !Mode::ALL.iter().any(|m| m.name() == name) {
            let known: Vec<&str> = Mode::ALL.iter().map(|m| m.name()).collect();
            bail!("unknown mode {name:?} (modes: {})", known.join(", "));
        }
    }
    Ok(Mode::ALL
        .into_iter()
        .filter(|m| match names.is_empty() {
            true => m.by_default(),
            false => names.iter().any(|n| n == m.name()),
        })
        .collect())
}

fn select_workloads(opts: &Options) -> Result<Vec<&'static str>> {
    for name in &opts.workloads {
        if !WORKLOADS.contains(&name.as_str()) {
            bail!(
                "unknown workload {name:?} (workloads: {})",
                WORKLOADS.join(", ")
            );
        }
    }
    Ok(WORKLOADS
        .into_iter()
        .filter(|w| match opts.workloads.is_empty() {
            true => !opts.quick || QUICK_WORKLOADS.contains(w),
            false => opts.workloads.iter().any(|n| n == w),
        })
        .collect())
}

/// Whether a run measures `workload` through `mode`: what the mode runs (see [`Mode::runs`]),
/// and in a `--quick` run of the default workloads, handshakes only through the TLS modes:
/// the TLS handshake rate is a target, the plain one is not, and measuring it through every
/// mode would take the quick run past 12 minutes.
fn measured(opts: &Options, mode: Mode, workload: &str) -> bool {
    let quick_default = opts.quick && opts.workloads.is_empty();
    mode.runs(workload) && !(quick_default && workload == "handshake" && !mode.tls())
}

/// The load a workload puts on every mode (`edge-max` steps `edge` up).
fn load_of(workload: &'static str, duration_s: u64) -> Load {
    let (kind, connections, rate, size) = match workload {
        "edge" | "edge-max" => ("edge", 2000, 10, 512),
        "bulk" => ("bulk", 16, 0, 65536),
        "handshake" => ("handshake", 32, 0, 64),
        // Same connections and rate as edge, sent by the backend: one-way latency.
        "push" => ("push", 2000, 10, 512),
        other => unreachable!("workload {other} is checked against WORKLOADS"),
    };
    Load {
        workload,
        kind,
        connections,
        rate,
        size,
        duration_s,
    }
}

/// Measurement window and warm-up of one run, in seconds. `--quick`'s 5 s window keeps its
/// 27 (mode, workload) cells x 3 repeats at about 11 minutes on the 2-CPU VM (about 7.8 s a
/// run).
fn timing(quick: bool) -> (u64, f64) {
    match quick {
        true => (5, 2.0),
        false => (10, 2.0),
    }
}

/// Where the runs happen and how: shared by every run of one `cargo xtask bench`.
struct Bench {
    work: PathBuf,
    release: PathBuf,
    placement: Placement,
    warmup_s: f64,
    /// The certificate every TLS mode serves, made once per bench run.
    pki: Pki,
    /// What the load generator trusts for `wss://`: the served certificate itself.
    trust: PathBuf,
}

pub fn run(opts: &Options) -> Result<()> {
    let modes = select_modes(&opts.modes)?;
    let workloads = select_workloads(opts)?;
    if opts.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    opts.placement.check()?;
    setup::run()?;
    install_packages(&["nginx", "haproxy"])?;
    cmd::run(cmd::cargo().args(["build", "--release", "-p", "proxy", "-p", "bench"]))?;
    let (duration, warmup_s) = timing(opts.quick);
    let work = cmd::root().join("target/bench-run");
    let pki_dir = work.join("tls");
    let bench = Bench {
        release: cmd::root().join("target/release"),
        placement: opts.placement,
        warmup_s,
        pki: Pki::in_dir(&pki_dir),
        trust: pki_dir.join("cert.pem"),
        work,
    };
    let _ = std::fs::remove_dir_all(&bench.work);
    std::fs::create_dir_all(&bench.work)?;
    if modes.iter().any(|m| m.tls()) {
        // One ECDSA P-256 certificate for every TLS mode of the run.
        cmd::run(
            Command::new(bench.release.join("bench"))
                .args(["cert", "--dir"])
                .arg(&pki_dir),
        )?;
    }
    println!(
        "bench: {} round(s); placement: {}",
        opts.repeats,
        opts.placement.describe()
    );
    let started = Instant::now();
    let cells_per_round = workloads
        .iter()
        .map(|w| modes.iter().filter(|&&m| measured(opts, m, w)).count())
        .sum::<usize>();
    if cells_per_round == 0 {
        bail!(
            "none of these modes runs these workloads (the TLS modes run edge, bulk and handshake)"
        );
    }
    let total = cells_per_round * opts.repeats;
    let mut cells = Vec::new();
    let mut step = 0;
    // Rounds outermost: every (mode, workload) once per round, so each cell's repeats are
    // spread over the whole run and meet the same drift of a shared machine as every other
    // cell's. Each round starts one mode further on, so no mode always runs right after the
    // same neighbour (whose closing connections and freed memory the kernel is still
    // reclaiming).
    for round in 1..=opts.repeats {
        let order: Vec<Mode> = (0..modes.len())
            .map(|i| modes[(i + round - 1) % modes.len()])
            .collect();
        for &workload in &workloads {
            for &mode in order.iter().filter(|&&m| measured(opts, m, workload)) {
                step += 1;
                println!(
                    "bench: [{step}/{total}] round {round}: {workload} through {} ...",
                    mode.name()
                );
                let cell = match workload {
                    "edge-max" => edge_max(&bench, mode, load_of(workload, duration), round)?,
                    _ => {
                        let load = load_of(workload, duration);
                        let report = measure(&bench, mode, load, round)?;
                        println!("bench:         {}", summary(&report));
                        Cell {
                            mode,
                            workload,
                            round,
                            connections: load.connections,
                            load: report,
                            max_connections: None,
                        }
                    }
                };
                cells.push(cell);
            }
        }
    }
    let info = report::RunInfo {
        quick: opts.quick,
        filtered: opts.filtered(),
        repeats: opts.repeats,
        placement: opts.placement,
        elapsed: started.elapsed(),
    };
    let out = report::write_all(&cells, &report::machine(), &info)?;
    println!(
        "bench: results in {} ({} runs in {:.0} s)",
        out.display(),
        cells.len(),
        info.elapsed.as_secs_f64()
    );
    Ok(())
}

/// Raises connections step by step until the mode falls below 95 % of the offered rate or
/// its p99 exceeds 50 ms; the last step that held is the mode's capacity.
fn edge_max(bench: &Bench, mode: Mode, edge: Load, round: usize) -> Result<Cell> {
    let mut best: Option<(u64, Value)> = None;
    for connections in EDGE_MAX_STEPS {
        let load = Load {
            connections,
            ..edge
        };
        let report = measure(bench, mode, load, round)?;
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
        round,
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

/// [`measure_once`], and once more if the proxy did not live through the run (it never exits
/// by itself: something else on the machine stopped it); the report says so either way.
fn measure(bench: &Bench, mode: Mode, load: Load, round: usize) -> Result<Value> {
    let report = measure_once(bench, mode, load, round)?;
    if report.get("proxy_exited").is_none() {
        return Ok(report);
    }
    println!("bench:         measuring {} again", mode.name());
    let mut again = measure_once(bench, mode, load, round)?;
    again["remeasured"] = json!(true);
    Ok(again)
}

/// One run: a fresh echo backend (or, for the zero-hop mode, wsedge spawning its own), the
/// mode in front of it, the load generator. For wsedge, `/connections` is sampled once all
/// connections are open (during the warm-up, outside the measured window) and the data planes
/// seen are added to the report as `data_planes`; at the same moment the CPUs each process
/// may run on are read back as `placement_seen`.
fn measure_once(bench: &Bench, mode: Mode, load: Load, round: usize) -> Result<Value> {
    let dir = bench.work.join(format!(
        "{}-{}-{}-r{round}",
        load.workload,
        mode.name(),
        load.connections
    ));
    std::fs::create_dir_all(&dir)?;
    let cpus = bench.placement.cpus();
    let mut backend = match mode.needs_backend() {
        true => Some(start_backend(&bench.release, cpus.map(|c| c.backend))?),
        false => None,
    };
    let result = (|| {
        let mut proxy = modes::start(
            mode,
            backend.as_ref().map(|b| b.1),
            &dir,
            &bench.release,
            bench.placement,
            &bench.pki,
        )?;
        let path = if load.kind == "push" { "push" } else { "echo" };
        let mut cmd = Command::new(bench.release.join("bench"));
        cmd.args(["load", "--url", &proxy.url(path)])
            .args(["--workload", load.kind])
            .args(["--connections", &load.connections.to_string()])
            .args(["--rate", &load.rate.max(1).to_string()])
            .args(["--size", &load.size.to_string()])
            .args(["--duration-s", &load.duration_s.to_string()])
            .args(["--warmup-s", &bench.warmup_s.to_string()]);
        if let Some(c) = cpus {
            cmd.args(["--cpu", &c.load.to_string()]);
        }
        if proxy.tls {
            cmd.arg("--trust").arg(&bench.trust);
        }
        for pid in proxy.pids() {
            cmd.args(["--rss-pid", &pid.to_string()]);
        }
        // The zero-hop instance is running already: cold-started by the warm-up upgrade.
        let backend_pids = match &backend {
            Some((b, _)) => vec![b.id()],
            None => proxy.instance_pids(),
        };
        for pid in proxy.pids().into_iter().chain(backend_pids.iter().copied()) {
            cmd.args(["--cpu-pid", &pid.to_string()]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running the load generator")?;
        // Its stderr passes through; "ready N" says every connection is open.
        let stderr = child.stderr.take().expect("piped");
        let (ready_tx, ready) = mpsc::channel();
        let forward = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.starts_with("ready ") {
                    let _ = ready_tx.send(());
                }
                eprintln!("{line}");
            }
        });
        let mut planes = None;
        let is_ready = ready.recv_timeout(READY_WAIT).is_ok();
        let seen = |pids: &[u32]| {
            // nginx's master and worker alike show once.
            let mut lists: Vec<String> = pids.iter().map(|&p| placement::allowed_cpus(p)).collect();
            lists.sort();
            lists.dedup();
            json!(lists.join(", "))
        };
        let placement_seen = json!({
            "load": seen(&[child.id()]),
            "proxy": seen(&proxy.pids()),
            "backend": seen(&backend_pids),
        });
        if mode.expected_data_plane().is_some() && is_ready {
            // Handshake workers connect only now, and their connections are short-lived (over
            // TLS most of a worker's time is the TLS handshake, before wsedge lists it): look
            // again until one is caught, within the warm-up.
            let tries = match load.kind {
                "handshake" => 25,
                _ => 1,
            };
            for _ in 0..tries {
                match proxy.data_planes() {
                    Ok(p) => planes = p,
                    Err(e) => {
                        println!("bench: WARNING: sampling /connections failed: {e:#}");
                        break;
                    }
                }
                if planes.as_ref().is_some_and(|p| !p.is_empty()) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(40));
            }
        }
        let out = child
            .wait_with_output()
            .context("running the load generator")?;
        let _ = forward.join();
        if !out.status.success() {
            bail!(
                "load generator failed ({}) against {}",
                out.status,
                mode.name()
            );
        }
        let mut report: Value =
            serde_json::from_slice(&out.stdout).context("load generator JSON")?;
        if let Some(planes) = planes {
            report["data_planes"] = json!(planes);
        }
        report["placement_seen"] = placement_seen;
        if let Some(c) = cpus {
            let want = json!({
                "load": c.load.to_string(),
                "proxy": if mode == Mode::Direct { String::new() } else { c.proxy.to_string() },
                "backend": c.backend.to_string(),
            });
            if report["placement_seen"] != want {
                println!(
                    "bench: WARNING: {} ran on CPUs {}, not {want}",
                    mode.name(),
                    report["placement_seen"]
                );
            }
        }
        if let Some(status) = proxy.exited() {
            println!(
                "bench: WARNING: {} exited during the run ({status}); its log is in {}",
                mode.name(),
                dir.display()
            );
            report["proxy_exited"] = json!(status.to_string());
        }
        if mode.tls() {
            let seen = report::tls_seen(&report["tls_sessions"]);
            if seen != modes::TLS_SESSION {
                println!(
                    "bench: WARNING: {} connections negotiated {seen}, not {}",
                    mode.name(),
                    modes::TLS_SESSION
                );
            }
        }
        if let Some(expected) = mode.expected_data_plane() {
            let seen = report::data_plane_seen(&report["data_planes"]);
            if seen != expected {
                println!(
                    "bench: WARNING: {} connections ran on data plane {seen}, not {expected}",
                    mode.name()
                );
            }
        }
        drop(proxy);
        Ok(report)
    })();
    if let Some((b, _)) = backend.as_mut() {
        let _ = b.kill();
        let _ = b.wait();
    }
    result
}

/// How long the load generator may take to open its connections (9,500 at 2,000/s, plus
/// its own handshake timeouts).
const READY_WAIT: Duration = Duration::from_secs(120);

fn start_backend(release: &Path, cpu: Option<usize>) -> Result<(Child, SocketAddr)> {
    let mut cmd = Command::new(release.join("bench"));
    cmd.args(["echo", "--listen", "127.0.0.1:0"]);
    if let Some(cpu) = cpu {
        cmd.args(["--cpu", &cpu.to_string()]);
    }
    let mut child = cmd
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
        // nginx and HAProxy print their version for `-v`; `--version` is an error to both.
        .filter(|p| cmd::output(cmd::new(p).arg("-v")).is_none())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cells_per_round(opts: &Options) -> usize {
        let modes = select_modes(&opts.modes).unwrap();
        select_workloads(opts)
            .unwrap()
            .iter()
            .map(|w| modes.iter().filter(|&&m| measured(opts, m, w)).count())
            .sum()
    }

    #[test]
    fn tls_modes_run_edge_bulk_and_handshake() {
        let mut opts = Options {
            quick: true,
            modes: Vec::new(),
            workloads: Vec::new(),
            repeats: 3,
            placement: DEFAULT_PLACEMENT,
        };
        // Edge through all 10 modes (the quotas mode runs only edge), bulk through 9, push
        // through the 6 plain ones, handshake through the 3 TLS ones: what keeps the quick
        // run near 12 minutes.
        assert_eq!(cells_per_round(&opts), 10 + 9 + 6 + 3);
        // Asked for by name, handshakes run through every mode that runs them.
        opts.workloads = vec!["handshake".into()];
        assert_eq!(cells_per_round(&opts), 9);
        opts.quick = false;
        opts.workloads.clear();
        // Push and edge-max only through the plain modes, without the quotas mode.
        assert_eq!(cells_per_round(&opts), 9 * 5 - 3 * 2 + 1);
        opts.modes = vec!["nginx-tls".into(), "haproxy-tls".into()];
        opts.workloads = vec!["push".into()];
        assert_eq!(cells_per_round(&opts), 0);
        // The trace-point comparison runs only when named, and only edge.
        opts.modes = vec!["wsedge-kernel-notrace".into()];
        opts.workloads.clear();
        assert_eq!(cells_per_round(&opts), 1);
        assert!(select_modes(&["wsedge-tls".into()]).is_ok());
    }
}
