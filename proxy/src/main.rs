//! The `wsedge` command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use wsedge::{Config, Server};

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
    /// List live connections (from the admin API).
    Conns,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let config = Config::load(&cli.config)?;
    match cli.command {
        Command::Check => {
            wsedge::protocols::tls::check_certificates(&config.server, &config.base_dir)
                .context("tls_cert")?;
            print!(
                "{}",
                toml::to_string_pretty(&config).context("printing the config")?
            );
            Ok(())
        }
        Command::Run => run(config, cli.config),
        Command::Conns => conns(&config),
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

/// Prints `/connections` as a table.
#[tokio::main(flavor = "current_thread")]
async fn conns(config: &Config) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = config.server.admin_listen;
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("admin API at {addr}"))?;
    s.write_all(b"GET /connections HTTP/1.1\r\nHost: wsedge\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).await?;
    let text = String::from_utf8_lossy(&body);
    let json = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .context("malformed admin response")?;
    let rows: Vec<wsedge::registry::ConnectionView> = serde_json::from_str(json)?;
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
