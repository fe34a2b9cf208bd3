//! The `wsedge` command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use wsedge::{Config, Server};

/// Subcommands big enough for their own files.
mod cli {
    pub mod top;
    pub mod trace;
}

#[derive(Parser)]
#[command(
    name = "wsedge",
    version,
    about = "eBPF-accelerated WebSocket edge proxy"
)]
struct Cli {
    /// Configuration file.
    #[arg(short, long, global = true, default_value = "/etc/wsedge/wsedge.toml")]
    config: PathBuf,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy in the foreground.
    Run,
    /// Validate the configuration and print the effective configuration.
    Check,
    /// List live connections (from the admin API; with `admin_token_env`, sends the token
    /// from that variable).
    Conns {
        /// Admin API address, instead of the config's `admin_listen`.
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
    },
    /// A live view of connections by function and data plane, messages/s in and out,
    /// throttled connections and instances, redrawn every interval; `q` quits. Prints plain
    /// text frames when stdout is not a terminal.
    Top {
        /// Admin API address, instead of the config's `admin_listen`.
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        /// Time between two samples (and so the window the rates are averaged over).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..))]
        interval_ms: u64,
        /// Print one frame (after one interval, as rates need two samples) and exit.
        #[arg(long)]
        once: bool,
    },
    /// Stream the data-plane events of a running wsedge as they happen: connections spliced
    /// or handed to userspace, close frames, refused messages, throttling, redirect
    /// failures, ends (from the admin API's `/trace`).
    Trace {
        /// Only this function's events.
        #[arg(long)]
        function: Option<String>,
        /// One JSON object per event, as the admin API sends them.
        #[arg(long)]
        json: bool,
        /// Admin API address, instead of the config's `admin_listen`.
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
    },
    /// Print the billing ledger (read directly from `state_dir/ledger.db`, read-only: works
    /// while wsedge runs or is stopped).
    Billing {
        /// Per-instance bills (billed time, GB-s, invocations) instead of connection rows.
        #[arg(long)]
        instances: bool,
        /// Only connections open at or after this time: RFC 3339, a UTC date (YYYY-MM-DD),
        /// or a duration ago (e.g. 1h).
        #[arg(long)]
        since: Option<String>,
        /// Only this function's connections.
        #[arg(long)]
        function: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
    Csv,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let config = Config::load(&cli.config)?;
    match cli.command {
        Command::Check => {
            wsedge::protocols::tls::check_certificates(&config.server, &config.base_dir)
                .context("tls_cert")?;
            if let Some(f) = config
                .functions
                .iter()
                .find(|f| f.command.is_some() && f.network == wsedge::config::Network::Egress)
            {
                wsedge::instances::egress::check_tools()
                    .with_context(|| format!("function {}", f.name))?;
            }
            print!(
                "{}",
                toml::to_string_pretty(&config).context("printing the config")?
            );
            Ok(())
        }
        Command::Run => run(config, cli.config),
        Command::Conns { admin } => conns(&config, admin),
        Command::Top {
            admin,
            interval_ms,
            once,
        } => cli::top::run(
            &config,
            cli::top::Options {
                admin: admin.unwrap_or(config.server.admin_listen),
                interval: std::time::Duration::from_millis(interval_ms),
                once,
            },
        ),
        Command::Trace {
            function,
            json,
            admin,
        } => cli::trace::run(
            &config,
            cli::trace::Options {
                admin: admin.unwrap_or(config.server.admin_listen),
                function,
                json,
            },
        ),
        Command::Billing {
            instances,
            since,
            function,
            format,
        } => billing(&config, instances, since.as_deref(), function, format),
    }
}

/// Prints the ledger's rows, or its instances' bills, in `format`.
fn billing(
    config: &Config,
    instances: bool,
    since: Option<&str>,
    function: Option<String>,
    format: Format,
) -> anyhow::Result<()> {
    use wsedge::ledger::{Filter, Reader, parse_since, report};
    let filter = Filter {
        since: since.map(parse_since).transpose()?,
        function,
    };
    let reader = Reader::open(&config.state_dir())?;
    fn print<R: serde::Serialize + report::Record>(
        records: &[R],
        format: Format,
    ) -> anyhow::Result<()> {
        match format {
            Format::Json => println!("{}", serde_json::to_string_pretty(records)?),
            Format::Csv => print!("{}", report::csv(records)),
            Format::Table => print!("{}", report::table(records)),
        }
        Ok(())
    }
    if instances {
        print(&reader.instances(&filter)?, format)
    } else {
        print(&reader.rows(&filter)?, format)
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn run(config: Config, path: std::path::PathBuf) -> anyhow::Result<()> {
    raise_open_files_limit();
    let server = Server::bind(config).await?;
    tokio::spawn(reload_on_sighup(server.state(), path));
    server.run(shutdown_signal()).await;
    Ok(())
}

/// SIGHUP: read the certificates and the config file again and apply them; certificates or
/// a config that do not load or validate change nothing.
async fn reload_on_sighup(
    state: std::sync::Arc<wsedge::server::AppState>,
    path: std::path::PathBuf,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        tracing::warn!("no SIGHUP handler: reload is unavailable");
        return;
    };
    while hangup.recv().await.is_some() {
        state.reload_certificates();
        let result = Config::load(&path)
            .map_err(anyhow::Error::from)
            .and_then(|config| state.reload(&config).map_err(anyhow::Error::from));
        if let Err(e) = result {
            tracing::warn!(error = %e, config = %path.display(), "reload refused; the running functions are unchanged");
        }
    }
}

/// Every WebSocket holds two descriptors; the default soft limit (often 1024) would cap a
/// proxy at a few hundred connections, so take what the hard limit allows.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!("could not raise the open-files limit");
            }
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    tracing::info!(open_files = limit.rlim_cur, "open-files limit");
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The admin API's token, from the variable `admin_token_env` names, if it names one.
fn admin_token(config: &Config) -> anyhow::Result<Option<String>> {
    let Some(var) = &config.server.admin_token_env else {
        return Ok(None);
    };
    let token = std::env::var(var).with_context(|| {
        format!("server.admin_token_env: ${var} must hold the admin API's token")
    })?;
    Ok(Some(token))
}

/// `GET path` on the admin API at `addr` (with the token from `admin_token_env` when the
/// config names one); the body of a 200 answer.
async fn admin_get(
    config: &Config,
    addr: std::net::SocketAddr,
    path: &str,
) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authorization = match admin_token(config)? {
        Some(token) => format!("Authorization: Bearer {token}\r\n"),
        None => String::new(),
    };
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("admin API at {addr}"))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: wsedge\r\n{authorization}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut response = Vec::new();
    s.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed admin response")?;
    let status = head.split(' ').nth(1).unwrap_or_default();
    anyhow::ensure!(
        status == "200",
        "admin API at {addr}: GET {path} answered {status}: {body}"
    );
    Ok(body.to_string())
}

/// Prints `/connections` as a table.
#[tokio::main(flavor = "current_thread")]
async fn conns(config: &Config, admin: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    let addr = admin.unwrap_or(config.server.admin_listen);
    let json = admin_get(config, addr, "/connections").await?;
    let rows: Vec<wsedge::registry::ConnectionView> = serde_json::from_str(&json)?;
    println!(
        "{:<18} {:<10} {:<22} {:<22} {:<10} {:>10} {:>10} {:>7} {:>7}",
        "ID",
        "FUNCTION",
        "INSTANCE",
        "CLIENT",
        "PLANE",
        "BYTES_IN",
        "BYTES_OUT",
        "MSG_IN",
        "MSG_OUT"
    );
    for r in rows {
        println!(
            "{:<18} {:<10} {:<22} {:<22} {:<10} {:>10} {:>10} {:>7} {:>7}",
            r.id,
            r.function,
            r.instance,
            r.client,
            r.data_plane,
            r.bytes_in,
            r.bytes_out,
            r.messages_in,
            r.messages_out
        );
    }
    Ok(())
}
