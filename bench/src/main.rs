//! `bench echo` serves as the backend; `bench load` drives a URL and prints one JSON report;
//! `bench cert` writes the certificate the TLS modes serve.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use bench::{LoadConfig, Workload, run_echo, run_load_with, sys};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(about = "WebSocket echo backend and load generator for wsedge")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a WebSocket echo server until killed (a `/push` upgrade is also pushed to).
    Echo(EchoArgs),
    /// Drive a WebSocket URL and print a JSON report.
    Load(LoadArgs),
    /// A function instance that reads nothing until a file exists (the slow-reader check).
    HoldInstance(HoldArgs),
    /// Flood a `hold-instance` until held back, let it read, check every byte arrived in order.
    Flood(FloodArgs),
    /// Write a new ECDSA P-256 CA and a leaf it signed for localhost and 127.0.0.1 (PEM).
    Cert(CertArgs),
}

#[derive(Args)]
struct HoldArgs {
    /// Address to listen on; without it 0.0.0.0:$PORT (9000 if unset), as instances do.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// The file whose existence lets the instance read.
    #[arg(long)]
    go: std::path::PathBuf,
}

#[derive(Args)]
struct FloodArgs {
    /// ip:port of the proxy (or instance).
    #[arg(long)]
    addr: SocketAddr,
    /// Request path of the upgrade.
    #[arg(long, default_value = "/")]
    path: String,
    /// The file the instance waits for (created once the client is held back).
    #[arg(long)]
    go: std::path::PathBuf,
}

#[derive(Args)]
struct EchoArgs {
    /// Address to listen on; port 0 picks a free port (printed on stdout). Without it,
    /// 0.0.0.0:$PORT (9000 if unset), as a function instance wsedge starts listens.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Event loops, each with its own SO_REUSEPORT listener.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Run on this CPU only. A flag rather than `taskset` in front: a function instance that
    /// wsedge spawns inherits wsedge's CPU, and this puts it where the bench wants it.
    #[arg(long)]
    cpu: Option<usize>,
}

#[derive(Args)]
struct LoadArgs {
    /// ws://IP:PORT/PATH, or wss://... (with --trust)
    #[arg(long)]
    url: String,
    #[arg(long, value_enum)]
    workload: Workload,
    /// Connections (edge, bulk, push) or concurrent workers (handshake).
    #[arg(long)]
    connections: usize,
    /// Messages per second per connection (edge: sent by the client; push: asked of the
    /// backend, which is sent `?rate=R&size=S` unless the URL has a query; use a `/push` URL).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 512)]
    size: usize,
    #[arg(long)]
    duration_s: f64,
    #[arg(long, default_value_t = 2.0)]
    warmup_s: f64,
    /// Processes whose summed VmRSS is reported before and after connecting.
    #[arg(long, num_args = 1..)]
    rss_pid: Vec<u32>,
    /// New connections per second while ramping up.
    #[arg(long, default_value_t = 2000.0)]
    connect_rate: f64,
    /// Run on this CPU only.
    #[arg(long)]
    cpu: Option<usize>,
    /// Processes whose CPU time is reported as `cpu_processes_s` (with the generator's own);
    /// without any, the `--rss-pid` ones.
    #[arg(long, num_args = 1..)]
    cpu_pid: Vec<u32>,
    /// For a wss:// url: PEM certificates, one of which must be the server's own (pinned,
    /// e.g. the `cert.pem` of `bench cert`).
    #[arg(long)]
    trust: Option<PathBuf>,
}

#[derive(Args)]
struct CertArgs {
    /// Directory for ca.pem, cert.pem, key.pem and cert-key.pem (created if missing).
    #[arg(long)]
    dir: PathBuf,
}

fn secs(v: f64, name: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(v).map_err(|_| format!("--{name} must be a non-negative number"))
}

/// 0.0.0.0:$PORT, the address the platform's function samples listen on.
fn instance_address() -> Result<SocketAddr, String> {
    let port = match std::env::var("PORT") {
        Ok(p) => p
            .parse::<u16>()
            .map_err(|_| format!("PORT={p:?} is not a port"))?,
        Err(_) => 9000,
    };
    Ok(SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)))
}

/// Pins the process to `cpu` (before any thread starts, so every thread inherits it).
fn pin(cpu: Option<usize>) -> Result<(), ExitCode> {
    match cpu.map(sys::pin_to_cpu) {
        Some(Err(e)) => {
            eprintln!("error: pinning to CPU {}: {e}", cpu.unwrap_or_default());
            Err(ExitCode::from(2))
        }
        _ => Ok(()),
    }
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Cert(a) => match bench::tls::Pki::generate().and_then(|p| p.write(&a.dir)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cert: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::HoldInstance(a) => {
            let result = a
                .listen
                .map_or_else(instance_address, Ok)
                .map_err(std::io::Error::other)
                .and_then(|listen| bench::slow::run_hold_instance(listen, &a.go));
            if let Err(e) = result {
                eprintln!("hold-instance: {e}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Cmd::Flood(a) => match bench::slow::run_flood(a.addr, &a.path, &a.go) {
            Ok(report) => {
                println!(
                    "{}",
                    serde_json::to_string(&report).expect("report serializes")
                );
                if report.ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("flood: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Echo(a) => {
            if let Err(code) = pin(a.cpu) {
                return code;
            }
            let listen = match a.listen.map_or_else(instance_address, Ok) {
                Ok(addr) => addr,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let nofile = sys::raise_nofile();
            let (tx, rx) = std::sync::mpsc::channel();
            let stop = Arc::new(AtomicBool::new(false));
            let server = std::thread::spawn(move || run_echo(listen, a.threads, tx, stop));
            if let Ok(addr) = rx.recv() {
                println!("listening on {addr}");
                eprintln!("nofile limit {nofile}");
                let _ = std::io::stdout().flush();
            }
            match server.join() {
                Ok(Ok(())) => ExitCode::SUCCESS,
                Ok(Err(e)) => {
                    eprintln!("echo: {e}");
                    ExitCode::FAILURE
                }
                Err(_) => ExitCode::FAILURE,
            }
        }
        Cmd::Load(a) => {
            if let Err(code) = pin(a.cpu) {
                return code;
            }
            let cfg = match (
                secs(a.duration_s, "duration-s"),
                secs(a.warmup_s, "warmup-s"),
            ) {
                (Ok(duration), Ok(warmup)) => LoadConfig {
                    url: a.url,
                    workload: a.workload,
                    connections: a.connections,
                    rate: a.rate,
                    size: a.size,
                    duration,
                    warmup,
                    rss_pids: a.rss_pid,
                    connect_rate: a.connect_rate,
                    trust: a.trust,
                },
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let cpu_pids = match a.cpu_pid.is_empty() {
                true => cfg.rss_pids.clone(),
                false => a.cpu_pid,
            };
            match run_load_with(&cfg, &cpu_pids) {
                Ok(report) => {
                    println!(
                        "{}",
                        serde_json::to_string(&report).expect("report serializes")
                    );
                    if report.connections_established == 0 {
                        eprintln!("error: no connection could be established");
                        return ExitCode::FAILURE;
                    }
                    ExitCode::SUCCESS
                }
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
