//! The load generator: one thread, one mio poll, many WebSocket clients. Everything per
//! message reuses buffers so the generator's own CPU stays small next to what it measures
//! (the whole machine's CPU is reported, generator included).

mod bulk;
mod conn;
mod edge;
mod handshake;
mod meter;
mod payload;
mod push;

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::{Events, Poll, Registry, Token};
use serde::Serialize;

use crate::sys::{self, Rng};
use crate::tls;
use conn::{Client, Msg, State};
pub use conn::{Target, TlsTarget};
use meter::Meter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Many mostly idle connections, each sending small messages at a fixed rate.
    Edge,
    /// One large message in flight per connection, back to back.
    Bulk,
    /// Connect, upgrade, one echo, close, repeat.
    Handshake,
    /// Many connections the backend pushes small messages to at a fixed rate; the client
    /// only receives (latency is one-way).
    Push,
}

#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub url: String,
    pub workload: Workload,
    pub connections: usize,
    /// Messages per second per connection (edge: sent; push: asked of the backend).
    pub rate: f64,
    pub size: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub rss_pids: Vec<u32>,
    pub connect_rate: f64,
    /// For `wss://`: a PEM file with the certificate(s) the server's own must be one of.
    pub trust: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Rtt {
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub count: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub workload: Workload,
    pub url: String,
    pub connections_requested: usize,
    /// Edge/bulk: connections upgraded. Handshake: workers that completed at least one.
    pub connections_established: usize,
    pub connect_errors: u64,
    pub nofile_limit: u64,
    pub duration_s: f64,
    pub messages_sent: u64,
    pub messages_received: u64,
    pub msgs_per_s: f64,
    /// Established connections times the per-connection rate (edge and push).
    pub offered_msgs_per_s: Option<f64>,
    /// Round trip of an echo; for push, one way (backend send to client receive).
    pub rtt_us: Rtt,
    pub late_sends: u64,
    pub handshakes: u64,
    pub handshakes_per_s: f64,
    /// Handshake workload: connect/upgrade/echo/close cycles completed in the window.
    pub iterations: u64,
    pub cpu_busy_s: f64,
    pub cpu_total_s: f64,
    pub cpu_busy_fraction: f64,
    /// `cpu_busy_s` split by CPU (index = CPU number).
    pub cpu_busy_s_by_cpu: Vec<f64>,
    /// Whole-machine busy CPU seconds as the window's length times the CPUs minus their idle
    /// time: exact where `cpu_busy_s` is sampled by the timer tick (see
    /// [`sys::HostCounters::idle_by_cpu`]).
    pub cpu_busy_exact_s: f64,
    /// `cpu_busy_exact_s` by CPU.
    pub cpu_busy_exact_s_by_cpu: Vec<f64>,
    /// Whole-machine context switches in the window.
    pub context_switches: u64,
    /// Rescheduling IPIs in the window: wake-ups of a task on another CPU.
    pub resched_ipis: u64,
    /// Function-call IPIs in the window.
    pub call_ipis: u64,
    /// CPU seconds of the processes under test (see [`run_load_with`]) and of this generator
    /// in the window: the run's own share of `cpu_busy_s`, hardly touched by other work on
    /// the machine.
    pub cpu_processes_s: f64,
    /// CPU seconds of the kernel's `kworker` and `ksoftirqd` threads in the window.
    pub cpu_kthreads_s: f64,
    pub rss_kb_before: u64,
    pub rss_kb_after: u64,
    pub errors: u64,
    /// `wss://`: upgraded connections by the TLS parameters they negotiated (see
    /// [`conn::Client::tls_session`]), over the whole run; empty for `ws://`.
    pub tls_sessions: BTreeMap<String, u64>,
}

/// State every workload loop needs.
pub(crate) struct Ctx {
    pub poll: Poll,
    pub events: Events,
    pub scratch: Vec<u8>,
    pub rng: Rng,
    pub target: Target,
    pub clock: Instant,
}

/// Cap on connects plus upgrades in progress, so a ramp never floods the accept queue.
const MAX_PENDING: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait after the window for echoes still in flight.
const DRAIN: Duration = Duration::from_secs(2);

fn usage(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

/// Parses `ws://host:port/path` or `wss://...`; the host must resolve without DNS (an IP or
/// localhost). A `wss://` target accepts the certificates in `trust` (a PEM file).
pub fn parse_url(url: &str, trust: Option<&Path>) -> io::Result<Target> {
    let (rest, secure) = match (url.strip_prefix("ws://"), url.strip_prefix("wss://")) {
        (Some(rest), _) => (rest, false),
        (_, Some(rest)) => (rest, true),
        _ => return Err(usage("url must start with ws:// or wss://")),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = match authority.parse() {
        Ok(a) => a,
        Err(_) => match authority.strip_prefix("localhost:") {
            Some(port) => {
                let port: u16 = port.parse().map_err(|_| usage("bad port in url"))?;
                SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port))
            }
            None => return Err(usage("url host must be ip:port or localhost:port")),
        },
    };
    let tls = match secure {
        true => Some(tls_target(authority, trust)?),
        false => None,
    };
    Ok(Target {
        addr,
        host: authority.to_string(),
        path: path.to_string(),
        tls,
    })
}

/// The TLS side of a `wss://` target: SNI from the URL's host, the certificates in `trust`.
fn tls_target(authority: &str, trust: Option<&Path>) -> io::Result<TlsTarget> {
    let trust = trust.ok_or_else(|| usage("a wss:// url needs --trust"))?;
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|_| usage(format!("{host:?} is not a TLS server name")))?;
    Ok(TlsTarget {
        config: tls::client_config(tls::read_certs(trust)?)?,
        name,
    })
}

fn validate(cfg: &LoadConfig) -> io::Result<()> {
    if cfg.connections == 0 {
        return Err(usage("--connections must be at least 1"));
    }
    if matches!(cfg.workload, Workload::Edge | Workload::Push)
        && (cfg.rate.is_nan() || cfg.rate <= 0.0 || cfg.rate.is_infinite())
    {
        return Err(usage("--rate must be positive"));
    }
    if cfg.workload != Workload::Handshake && cfg.size < 8 {
        return Err(usage("--size must be at least 8 (the embedded timestamp)"));
    }
    if cfg.duration.is_zero() {
        return Err(usage("--duration-s must be positive"));
    }
    if cfg.connect_rate.is_nan() || cfg.connect_rate <= 0.0 {
        return Err(usage("--connect-rate must be positive"));
    }
    Ok(())
}

/// Runs one load test. Usage errors come back as `InvalidInput`. The processes whose CPU
/// time is reported as `cpu_processes_s` are `cfg.rss_pids` (and the generator).
pub fn run_load(cfg: &LoadConfig) -> io::Result<Report> {
    run_load_with(cfg, &cfg.rss_pids)
}

/// [`run_load`], with `cpu_pids` as the processes under test for `cpu_processes_s` (the proxy
/// and the backend, where `rss_pids` is only the proxy).
pub fn run_load_with(cfg: &LoadConfig, cpu_pids: &[u32]) -> io::Result<Report> {
    validate(cfg)?;
    let mut target = parse_url(&cfg.url, cfg.trust.as_deref())?;
    if cfg.workload == Workload::Push && !target.path.contains('?') {
        target.path = format!("{}?rate={}&size={}", target.path, cfg.rate, cfg.size);
    }
    let nofile = sys::raise_nofile();
    let rss_before = sys::rss_kb(&cfg.rss_pids);
    let mut ctx = Ctx {
        poll: Poll::new()?,
        events: Events::with_capacity(1024),
        scratch: vec![0; 64 << 10],
        rng: Rng::seeded(),
        target,
        clock: Instant::now(),
    };
    let (meter, established, rss_after) = match cfg.workload {
        Workload::Handshake => {
            eprintln!("ready {}", cfg.connections);
            let mut meter = Meter::new(ctx.clock, cfg.warmup, cfg.duration);
            meter.cpu_pids = cpu_pids.to_vec();
            let (est, rss) = handshake::run(&mut ctx, &mut meter, cfg);
            (meter, est, rss)
        }
        Workload::Edge | Workload::Bulk | Workload::Push => {
            let (mut clients, connect_errors) =
                connect_all(&mut ctx, cfg.connections, cfg.connect_rate);
            let established = clients.iter().filter(|c| c.is_open()).count();
            let rss_after = sys::rss_kb(&cfg.rss_pids);
            eprintln!("ready {established}");
            let mut meter = Meter::new(ctx.clock, cfg.warmup, cfg.duration);
            meter.cpu_pids = cpu_pids.to_vec();
            meter.connect_errors = connect_errors;
            for c in &clients {
                meter.on_tls_session(c);
            }
            if established > 0 {
                match cfg.workload {
                    Workload::Edge => edge::run(&mut ctx, &mut meter, &mut clients, cfg)?,
                    Workload::Push => push::run(&mut ctx, &mut meter, &mut clients)?,
                    _ => bulk::run(&mut ctx, &mut meter, &mut clients, cfg)?,
                }
            }
            meter.close();
            (meter, established, rss_after)
        }
    };
    Ok(report(
        cfg,
        &meter,
        nofile,
        established,
        rss_before,
        rss_after,
    ))
}

fn report(
    cfg: &LoadConfig,
    m: &Meter,
    nofile: u64,
    established: usize,
    rss_before: u64,
    rss_after: u64,
) -> Report {
    let now = (Instant::now(), sys::cpu_times());
    let (t0, c0) = m.opened.unwrap_or(now);
    let (t1, c1) = m.closed.unwrap_or(now);
    let secs = t1.saturating_duration_since(t0).as_secs_f64();
    let per_s = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let tck = sys::clock_ticks_per_s();
    let busy = c1.busy.saturating_sub(c0.busy) as f64;
    let total = c1.total.saturating_sub(c0.total) as f64;
    let host = match (&m.host_opened, &m.host_closed) {
        (Some(a), Some(b)) => b.since(a),
        _ => sys::HostCounters::default(),
    };
    // /proc/stat counts in 1/tck s: the window's own length is known far better.
    let exact_busy: Vec<f64> = host
        .idle_by_cpu
        .iter()
        .map(|&idle| (secs - idle as f64 / tck).max(0.0))
        .collect();
    let q = |p: f64| {
        if m.hist.is_empty() {
            0
        } else {
            m.hist.value_at_quantile(p)
        }
    };
    Report {
        workload: cfg.workload,
        url: cfg.url.clone(),
        connections_requested: cfg.connections,
        connections_established: established,
        connect_errors: m.connect_errors,
        nofile_limit: nofile,
        duration_s: secs,
        messages_sent: m.sent,
        messages_received: m.received,
        msgs_per_s: per_s(m.received),
        offered_msgs_per_s: matches!(cfg.workload, Workload::Edge | Workload::Push)
            .then_some(established as f64 * cfg.rate),
        rtt_us: Rtt {
            p50: q(0.5),
            p99: q(0.99),
            p999: q(0.999),
            max: m.hist.max(),
            count: m.hist.len(),
        },
        late_sends: m.late,
        handshakes: m.handshakes,
        handshakes_per_s: per_s(m.handshakes),
        iterations: m.iterations,
        cpu_busy_s: busy / tck,
        cpu_total_s: total / tck,
        cpu_busy_fraction: if total > 0.0 { busy / total } else { 0.0 },
        cpu_busy_s_by_cpu: host.busy_by_cpu.iter().map(|&j| j as f64 / tck).collect(),
        cpu_busy_exact_s: exact_busy.iter().sum(),
        cpu_busy_exact_s_by_cpu: exact_busy,
        context_switches: host.context_switches,
        resched_ipis: host.resched_ipis,
        call_ipis: host.call_ipis,
        cpu_processes_s: host.process_ticks as f64 / tck,
        cpu_kthreads_s: host.kthread_ticks as f64 / tck,
        rss_kb_before: rss_before,
        rss_kb_after: rss_after,
        errors: m.errors,
        tls_sessions: m.tls_sessions.clone(),
    }
}

/// Sends one timestamped frame; a failed send ends that connection and counts as an error.
fn send_one(
    registry: &Registry,
    m: &mut Meter,
    payloads: &mut payload::Payloads,
    c: &mut Client,
    sent_ns: u64,
) {
    let frame = payloads.frame(sent_ns);
    match c.send(registry, &frame) {
        Ok(()) => {
            c.in_flight += 1;
            m.on_sent();
        }
        Err(_) => {
            m.errors += 1;
            c.kill();
        }
    }
}

fn poll_once(ctx: &mut Ctx, timeout: Duration) -> io::Result<()> {
    match ctx.poll.poll(&mut ctx.events, Some(timeout)) {
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
        r => r,
    }
}

fn pending(c: &Client) -> bool {
    matches!(c.state, State::Connecting | State::Handshaking)
}

/// Opens and upgrades `n` connections at no more than `rate` new connects per second and
/// [`MAX_PENDING`] at a time. Returns all clients (failed ones dead) and the failure count.
fn connect_all(ctx: &mut Ctx, n: usize, rate: f64) -> (Vec<Client>, u64) {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(n as f64 / rate) + 3 * HANDSHAKE_TIMEOUT;
    let mut clients: Vec<Client> = Vec::with_capacity(n);
    let mut in_progress: Vec<usize> = Vec::with_capacity(MAX_PENDING);
    let mut errors = 0;
    while clients.len() < n || !in_progress.is_empty() {
        let now = Instant::now();
        let permitted = (now.duration_since(start).as_secs_f64() * rate) as usize + 1;
        while clients.len() < n.min(permitted) && in_progress.len() < MAX_PENDING {
            let token = Token(clients.len());
            match Client::connect(ctx.poll.registry(), &ctx.target, token) {
                Ok(c) => {
                    in_progress.push(clients.len());
                    clients.push(c);
                }
                Err(_) => {
                    errors += 1;
                    clients.push(Client::dead(token));
                }
            }
        }
        let give_up = now > deadline;
        in_progress.retain(|&i| {
            let c = &mut clients[i];
            let expired = give_up || now.duration_since(c.started) > HANDSHAKE_TIMEOUT;
            if expired && pending(c) {
                c.kill();
                errors += 1;
            }
            pending(c)
        });
        if give_up || (clients.len() == n && in_progress.is_empty()) {
            break;
        }
        let next_permit = start + Duration::from_secs_f64(clients.len() as f64 / rate);
        let timeout = match clients.len() < n && in_progress.len() < MAX_PENDING {
            true => next_permit.saturating_duration_since(now),
            false => Duration::from_millis(100),
        };
        if poll_once(ctx, timeout).is_err() {
            continue;
        }
        for ev in ctx.events.iter() {
            let Some(c) = clients.get_mut(ev.token().0) else {
                continue;
            };
            if pending(c) {
                let r = c.advance(
                    ctx.poll.registry(),
                    &ctx.target,
                    &mut ctx.rng,
                    &mut ctx.scratch,
                );
                if r.is_err() {
                    c.kill();
                    errors += 1;
                }
            }
        }
    }
    (clients, errors)
}

/// Handles one event on an open edge/bulk client: flushes, reads echoes into the meter.
/// Returns the number of echoes; a dead connection counts as an error.
fn pump(c: &mut Client, ev: &Event, registry: &Registry, scratch: &mut [u8], m: &mut Meter) -> u32 {
    if !c.is_open() {
        return 0;
    }
    let (mut echoes, mut bad, mut closed) = (0, 0, false);
    let mut result = Ok(false);
    if ev.is_writable() {
        result = c.flush(registry).map(|_| false);
    }
    let hup = ev.is_read_closed() || ev.is_error();
    if result.is_ok() && (ev.is_readable() || hup) {
        result = c.read_msgs(registry, scratch, hup, |msg| match msg {
            Msg::Data(p) => match payload::timestamp(p) {
                Some(ts) => {
                    m.on_echo(m.now_ns().saturating_sub(ts));
                    echoes += 1;
                }
                None => bad += 1,
            },
            Msg::Close => closed = true,
        });
    }
    c.in_flight = c.in_flight.saturating_sub(echoes);
    m.errors += bad;
    if !matches!(result, Ok(false)) || closed {
        m.errors += 1;
        c.kill();
    }
    echoes
}

/// Waits up to [`DRAIN`] for echoes of messages already sent; they are not counted.
fn drain(ctx: &mut Ctx, m: &mut Meter, clients: &mut [Client]) {
    let deadline = Instant::now() + DRAIN;
    loop {
        let now = Instant::now();
        if now >= deadline || clients.iter().all(|c| c.in_flight == 0 || !c.is_open()) {
            return;
        }
        let timeout = deadline
            .saturating_duration_since(now)
            .min(Duration::from_millis(50));
        if poll_once(ctx, timeout).is_err() {
            continue;
        }
        for ev in ctx.events.iter() {
            if let Some(c) = clients.get_mut(ev.token().0) {
                pump(c, ev, ctx.poll.registry(), &mut ctx.scratch, m);
            }
        }
    }
}
