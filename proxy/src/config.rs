//! The TOML configuration. Every field is documented; unknown keys are
//! rejected; `Config::validate` names the offending field and the reason.

use std::{net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners, admin API, data plane and state.
    pub server: ServerConfig,
    /// The functions: each a route and the instances that serve it.
    #[serde(default, rename = "function")]
    pub functions: Vec<FunctionConfig>,
    /// Directory of the config file: relative `command` paths and instances' working
    /// directory resolve against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPlaneMode {
    /// Kernel splice when the eBPF programs load, otherwise the userspace relay.
    Auto,
    /// Kernel splice only: start fails if the eBPF programs cannot be loaded.
    Kernel,
    /// Userspace relay only.
    Userspace,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address for plain `ws://` connections, e.g. "0.0.0.0:8080".
    pub listen: SocketAddr,
    /// Address for `wss://` connections (TLS); requires `tls_cert` and `tls_key`.
    #[serde(default)]
    pub tls_listen: Option<SocketAddr>,
    /// PEM certificate chain (leaf first) for `tls_listen`, or a list of them: each client
    /// gets the first whose names match its SNI, and the first one when none does. A
    /// relative path resolves against the config file's directory. Re-read on SIGHUP.
    #[serde(default, with = "one_or_many")]
    pub tls_cert: Vec<PathBuf>,
    /// PEM private key of each `tls_cert`, in the same order.
    #[serde(default, with = "one_or_many")]
    pub tls_key: Vec<PathBuf>,
    /// Seconds a client has to complete the TLS handshake; then it is cut.
    #[serde(default = "default_tls_handshake_timeout_s")]
    pub tls_handshake_timeout_s: u64,
    /// Admin API address (/metrics /live /ready /connections /billing).
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// Name of an environment variable holding the admin API's token, e.g.
    /// "WSEDGE_ADMIN_TOKEN". When given, the variable must be set (non-empty, printable
    /// ASCII) when wsedge starts, every admin API request needs `Authorization: Bearer
    /// <token>` (401 otherwise), and `wsedge conns` sends the token from the same variable.
    /// Unset: the admin API answers whoever reaches `admin_listen`.
    #[serde(default)]
    pub admin_token_env: Option<String>,
    /// Which data plane carries frames after the handshake.
    #[serde(default = "default_data_plane")]
    pub data_plane: DataPlaneMode,
    /// Keep the kernel's BPF statistics on while wsedge runs, so `/metrics` reports how
    /// often the eBPF programs ran and for how long (`wsedge_bpf_program_runs_total`,
    /// `wsedge_bpf_program_run_seconds_total`). The kernel then times every eBPF program run
    /// on the host, wsedge's and others', at a few tens of nanoseconds each. Off, the series
    /// appear only when `kernel.bpf_stats_enabled` is 1. Kernel data plane only.
    #[serde(default)]
    pub bpf_stats: bool,
    /// Directory for wsedge's state (the billing ledger lives here); a relative path resolves
    /// against the config file's directory.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Time a client has to send its complete upgrade request, in milliseconds.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Largest upgrade request head (request line and headers) in bytes; larger gets 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Time to connect to an instance and receive its 101, in milliseconds; then 504.
    #[serde(default = "default_instance_timeout_ms")]
    pub instance_timeout_ms: u64,
    /// On SIGTERM, how long open connections get to close before they are cut, in seconds.
    #[serde(default = "default_drain_timeout_s")]
    pub drain_timeout_s: u64,
    /// Most open connections (handshakes included) from one client: an IPv4 address, or an
    /// IPv6 /64 (an IPv4-mapped IPv6 address counts as its IPv4 address); beyond, 429 at
    /// once, before the request is read. At least 1; unset: no per-IP limit.
    #[serde(default)]
    pub max_connections_per_ip: Option<u32>,
    /// Most open WebSockets in all (upgrades under way included); beyond, 503 before the
    /// upgrade.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// How many connections the kernel's maps hold at once (their size, fixed when the
    /// programs load). A connection beyond it is carried by the userspace relay with the same
    /// policy; it is never refused for it.
    #[serde(default = "default_kernel_map_connections")]
    pub kernel_map_connections: u32,
    /// Whether the kernel programs carry their trace points (`wsedge trace`). While nobody
    /// traces, each costs one map lookup per event; `false` loads the programs without them.
    #[serde(default = "default_true")]
    pub kernel_trace: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    /// Unique function name (used in logs, metrics and billing).
    pub name: String,
    /// Path prefix that routes to this function, e.g. "/echo".
    pub route: String,
    /// Optional Host header (without port) the route also requires.
    #[serde(default)]
    pub host: Option<String>,
    /// Command that starts an instance (a WebSocket server on 0.0.0.0:$PORT); a relative
    /// program path resolves against the config file's directory.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Fixed instances ("host:port"), instead of `command`.
    #[serde(default)]
    pub upstreams: Vec<String>,
    /// Port spawned instances listen on, passed as $PORT (with isolation "none" each
    /// instance gets a free port instead).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Where spawned instances run: "netns" (each in its own network namespace; the default
    /// when wsedge runs as root) or "none" (the host's network, a distinct $PORT each).
    #[serde(default)]
    pub isolation: Option<Isolation>,
    /// Instance memory in MiB: the instance's cgroup memory limit (an instance over it is
    /// killed, its connections end as a crash: 1011, status 439, logged `oom`), and what
    /// GB-s are billed from.
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u32,
    /// Most processes and threads one instance may run (its cgroup's `pids` limit).
    #[serde(default = "default_pids_max")]
    pub pids_max: u32,
    /// CPUs one instance may use (its cgroup's CPU quota), e.g. 0.5 or 2.
    #[serde(default = "default_cpu")]
    pub cpu: f64,
    /// The unprivileged user spawned instances run as (never root; created by the install
    /// script). Its primary group is the instances' group.
    #[serde(default = "default_user")]
    pub user: String,
    /// "none": loopback only (the default); "egress": outbound connections through NAT, for
    /// a function that talks to Redis or a database. Neither reaches the admin API or
    /// another instance.
    #[serde(default)]
    pub network: Network,
    /// Variables the function's instances get, on top of `PORT`, `WSEDGE_FUNCTION`,
    /// `WSEDGE_INSTANCE`, `PATH`, `HOME` and `LANG` (nothing else of wsedge's environment).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Connections one spawned instance serves at once.
    #[serde(default = "default_instance_concurrency")]
    pub instance_concurrency: u32,
    /// Most spawned instances at once; when all are busy, new connections get 429.
    #[serde(default = "default_max_instances")]
    pub max_instances: u32,
    /// Time a spawned instance has to listen on its port, in milliseconds; then 504.
    #[serde(default = "default_start_timeout_ms")]
    pub start_timeout_ms: u64,
    /// Seconds an instance without connections is kept running for the next one (then it
    /// is stopped: scale to zero).
    #[serde(default = "default_keep_warm_s")]
    pub keep_warm_s: u64,
    /// Seconds without a frame either way before the connection is closed (10..=7200).
    #[serde(default = "default_idle_timeout_s")]
    pub idle_timeout_s: u64,
    /// Longest a connection may stay open, in seconds (>= idle_timeout_s).
    #[serde(default = "default_execution_timeout_s")]
    pub execution_timeout_s: u64,
    /// "none", or { hmac_key_env = "VAR" }: upgrades must be signed with the key in $VAR.
    #[serde(default)]
    pub auth: Auth,
    /// Origins allowed to connect (exact, case-insensitive); empty allows any. Requests
    /// without an Origin header (non-browser clients) are always allowed.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Per-connection quotas.
    #[serde(default)]
    pub limits: Limits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// Loopback only.
    #[default]
    None,
    /// Outbound connections through NAT.
    Egress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Each instance in its own network namespace, listening on `port`.
    Netns,
    /// Instances share the host's network, each on a distinct free port.
    None,
}

/// How upgrades to a function are authenticated.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Auth {
    /// `auth = "none"`.
    Named(AuthName),
    /// `auth = { hmac_key_env = "VAR" }`.
    Hmac(HmacAuth),
}

impl Default for Auth {
    fn default() -> Self {
        Auth::Named(AuthName::None)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthName {
    /// Anyone may connect.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HmacAuth {
    /// Environment variable that holds the HMAC-SHA256 key (read at start).
    pub hmac_key_env: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExceed {
    /// Delay frames over the rate, in order, losing none.
    Throttle,
    /// Close the connection with 1008.
    Close,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest reassembled message, in bytes, both directions; larger closes with 1009.
    /// At most 16 MiB.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: u64,
    /// Client-to-function data messages per second (0: no quota). Control frames are not
    /// messages. A frame may come up to 100 ms ahead of an evenly paced schedule.
    #[serde(default = "default_messages_per_s")]
    pub messages_per_s: u32,
    /// Client-to-function data-frame bytes per second, as on the wire (0: no quota).
    #[serde(default = "default_bytes_per_s")]
    pub bytes_per_s: u64,
    /// What happens above the rates: `throttle` delays frames in order (the client is held
    /// back by TCP), `close` closes with 1008 (the function gets 1001; status 429).
    #[serde(default = "default_on_exceed")]
    pub on_exceed: OnExceed,
    /// Largest body of a plain HTTP request (not an upgrade), in bytes; larger gets 413.
    #[serde(default = "default_max_request_body_bytes")]
    pub max_request_body_bytes: u64,
}

impl Limits {
    /// The rate quotas as both data planes meter them.
    pub fn rate(&self) -> proxy_common::rate::RateState {
        proxy_common::rate::RateState::new(
            u64::from(self.messages_per_s),
            self.bytes_per_s,
            self.on_exceed == OnExceed::Close,
        )
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: default_max_message_bytes(),
            messages_per_s: default_messages_per_s(),
            bytes_per_s: default_bytes_per_s(),
            on_exceed: default_on_exceed(),
            max_request_body_bytes: default_max_request_body_bytes(),
        }
    }
}

/// A portable environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn default_admin_listen() -> SocketAddr {
    "127.0.0.1:9901".parse().expect("literal")
}
fn default_data_plane() -> DataPlaneMode {
    DataPlaneMode::Auto
}
fn default_state_dir() -> PathBuf {
    "/var/lib/wsedge".into()
}
fn default_handshake_timeout_ms() -> u64 {
    10_000
}
fn default_max_header_bytes() -> usize {
    16 * 1024
}
fn default_instance_timeout_ms() -> u64 {
    10_000
}
fn default_drain_timeout_s() -> u64 {
    30
}
fn default_max_connections() -> u32 {
    100_000
}
fn default_true() -> bool {
    true
}

fn default_kernel_map_connections() -> u32 {
    proxy_common::maps::MAX_CONNECTIONS
}
fn default_port() -> u16 {
    9000
}
fn default_memory_mb() -> u32 {
    128
}
fn default_pids_max() -> u32 {
    256
}
fn default_cpu() -> f64 {
    1.0
}
fn default_user() -> String {
    "wsedge-fn".into()
}
fn default_instance_concurrency() -> u32 {
    1
}
fn default_max_instances() -> u32 {
    100
}
fn default_start_timeout_ms() -> u64 {
    10_000
}
fn default_keep_warm_s() -> u64 {
    300
}
fn default_idle_timeout_s() -> u64 {
    600
}
fn default_execution_timeout_s() -> u64 {
    7200
}
fn default_max_message_bytes() -> u64 {
    256 * 1024
}
fn default_messages_per_s() -> u32 {
    10
}
fn default_bytes_per_s() -> u64 {
    128 * 1024
}
/// 6 MiB: the request payload limit of the platforms' synchronous invocations.
fn default_max_request_body_bytes() -> u64 {
    6 * 1024 * 1024
}

fn default_on_exceed() -> OnExceed {
    OnExceed::Throttle
}

fn default_tls_handshake_timeout_s() -> u64 {
    10
}

/// A path or a list of paths: `tls_cert = "a.pem"` and `tls_cert = ["a.pem", "b.pem"]`.
mod one_or_many {
    use std::path::PathBuf;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
        Ok(match OneOrMany::deserialize(d)? {
            OneOrMany::One(path) => vec![path],
            OneOrMany::Many(paths) => paths,
        })
    }

    pub fn serialize<S: Serializer>(paths: &[PathBuf], s: S) -> Result<S::Ok, S::Error> {
        match paths {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

impl Config {
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source: Box::new(source),
        })?;
        // Absolute: an instance's program path must not depend on its working directory.
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => std::path::Path::new("."),
        };
        config.base_dir = dir.canonicalize().map_err(|source| ConfigError::Read {
            path: dir.into(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// `server.state_dir`, a relative path resolved against the config file's directory.
    pub fn state_dir(&self) -> PathBuf {
        self.base_dir.join(&self.server.state_dir)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.tls_cert.len() != s.tls_key.len() {
            return Err(invalid(
                "server.tls_key",
                "needs one key per tls_cert, in the same order",
            ));
        }
        match (s.tls_listen, s.tls_cert.is_empty()) {
            (Some(_), true) => {
                return Err(invalid("server.tls_listen", "needs tls_cert and tls_key"));
            }
            (None, false) => {
                return Err(invalid("server.tls_cert", "is only used with tls_listen"));
            }
            _ => {}
        }
        if s.tls_handshake_timeout_s == 0 {
            return Err(invalid(
                "server.tls_handshake_timeout_s",
                "must be at least 1",
            ));
        }
        if s.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        if s.admin_token_env.as_deref() == Some("") {
            return Err(invalid("server.admin_token_env", "must name a variable"));
        }
        if s.max_connections_per_ip == Some(0) {
            return Err(invalid(
                "server.max_connections_per_ip",
                "must be at least 1 (leave it out for no per-IP limit)",
            ));
        }
        if s.kernel_map_connections == 0 || s.kernel_map_connections > 1 << 20 {
            return Err(invalid(
                "server.kernel_map_connections",
                "must be between 1 and 1048576",
            ));
        }
        if s.max_header_bytes < 1024 {
            return Err(invalid("server.max_header_bytes", "must be at least 1024"));
        }
        if s.handshake_timeout_ms == 0 || s.instance_timeout_ms == 0 {
            return Err(invalid(
                "server.handshake_timeout_ms",
                "timeouts must be positive",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, f) in self.functions.iter().enumerate() {
            let at = |field: &str| format!("function[{i}] ({}).{field}", f.name);
            if f.name.is_empty() || !names.insert(f.name.as_str()) {
                return Err(invalid(at("name"), "must be non-empty and unique"));
            }
            if !f.route.starts_with('/') {
                return Err(invalid(at("route"), "must be a path starting with '/'"));
            }
            match (&f.command, f.upstreams.is_empty()) {
                (Some(_), false) => {
                    return Err(invalid(
                        at("command"),
                        "give command or upstreams, not both",
                    ));
                }
                (Some(command), true) if command.first().is_none_or(|p| p.is_empty()) => {
                    return Err(invalid(at("command"), "needs a program to run"));
                }
                (None, true) => return Err(invalid(at("command"), "give command or upstreams")),
                (None, false) if f.isolation.is_some() => {
                    return Err(invalid(
                        at("isolation"),
                        "applies to spawned instances (command), not upstreams",
                    ));
                }
                _ => {}
            }
            if f.port == 0 {
                return Err(invalid(at("port"), "must be 1..=65535"));
            }
            if f.start_timeout_ms == 0 {
                return Err(invalid(at("start_timeout_ms"), "must be positive"));
            }
            if let Auth::Hmac(h) = &f.auth
                && h.hmac_key_env.is_empty()
            {
                return Err(invalid(at("auth.hmac_key_env"), "must name a variable"));
            }
            for u in &f.upstreams {
                if std::net::ToSocketAddrs::to_socket_addrs(u.as_str()).is_err() {
                    return Err(invalid(at("upstreams"), format!("{u:?} is not host:port")));
                }
            }
            if !(10..=7200).contains(&f.idle_timeout_s) {
                return Err(invalid(at("idle_timeout_s"), "must be within 10..=7200"));
            }
            if f.execution_timeout_s < f.idle_timeout_s {
                return Err(invalid(
                    at("execution_timeout_s"),
                    "must be >= idle_timeout_s",
                ));
            }
            if f.pids_max == 0 {
                return Err(invalid(at("pids_max"), "must be at least 1"));
            }
            if !(f.cpu.is_finite() && f.cpu >= 0.01) {
                return Err(invalid(at("cpu"), "must be at least 0.01"));
            }
            if f.memory_mb < 4 {
                return Err(invalid(at("memory_mb"), "must be at least 4"));
            }
            if f.user.is_empty() || f.user == "root" || f.user == "0" {
                return Err(invalid(
                    at("user"),
                    "must name an unprivileged user, never root",
                ));
            }
            if let Some(name) = f.env.keys().find(|k| !valid_env_name(k)) {
                return Err(invalid(
                    at("env"),
                    format!("{name:?} is not a variable name (letters, digits, _)"),
                ));
            }
            if f.instance_concurrency == 0 || f.max_instances == 0 {
                return Err(invalid(at("instance_concurrency"), "must be at least 1"));
            }
            let max = proxy_common::maps::MAX_MESSAGE_BYTES_LIMIT;
            if f.limits.max_message_bytes == 0 || f.limits.max_message_bytes > max {
                return Err(invalid(
                    at("limits.max_message_bytes"),
                    format!("must be 1..={max}"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    const MINIMAL: &str = "[server]\nlisten = \"127.0.0.1:0\"\n[[function]]\nname = \"echo\"\n\
                           route = \"/echo\"\nupstreams = [\"127.0.0.1:9000\"]\n";

    #[test]
    fn defaults_match_the_spec() {
        let c = parse(MINIMAL).unwrap();
        let f = &c.functions[0];
        assert_eq!(
            (f.port, f.idle_timeout_s, f.execution_timeout_s),
            (9000, 600, 7200)
        );
        assert_eq!(
            (f.limits.max_message_bytes, f.limits.messages_per_s),
            (262144, 10)
        );
        assert_eq!(f.limits.bytes_per_s, 131072);
        assert_eq!(c.server.data_plane, DataPlaneMode::Auto);
        assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:9901");
    }

    #[test]
    fn messages_up_to_16_mib_and_rates_of_zero_are_accepted() {
        let limits = |lines: &str| parse(&format!("{MINIMAL}[function.limits]\n{lines}"));
        let c =
            limits("max_message_bytes = 16777216\nmessages_per_s = 0\nbytes_per_s = 0\n").unwrap();
        let l = &c.functions[0].limits;
        assert_eq!(l.max_message_bytes, 16 << 20);
        assert!(!l.rate().limited(), "0 turns the quotas off");
        let err = limits("max_message_bytes = 16777217\n").unwrap_err();
        assert!(err.contains("max_message_bytes"), "{err}");
        let c = limits("on_exceed = \"close\"\n").unwrap();
        assert!(c.functions[0].limits.rate().closes());
        assert!(limits("on_exceed = \"drop\"\n").is_err());
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = parse(&format!("{MINIMAL}colour = \"red\"\n")).unwrap_err();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        let err = parse(&MINIMAL.replace("/echo", "echo")).unwrap_err();
        assert!(err.contains("function[0] (echo).route"), "{err}");
        let err = parse(&format!("{MINIMAL}idle_timeout_s = 5\n")).unwrap_err();
        assert!(err.contains("idle_timeout_s"), "{err}");
        let err = parse(&MINIMAL.replace("127.0.0.1:9000", "nowhere")).unwrap_err();
        assert!(err.contains("upstreams"), "{err}");
    }

    #[test]
    fn admin_token_env_is_optional_and_must_name_a_variable() {
        let with = |v: &str| {
            MINIMAL.replace(
                "[server]\n",
                &format!("[server]\nadmin_token_env = \"{v}\"\n"),
            )
        };
        assert_eq!(parse(MINIMAL).unwrap().server.admin_token_env, None);
        let c = parse(&with("WSEDGE_ADMIN_TOKEN")).unwrap();
        assert_eq!(
            c.server.admin_token_env.as_deref(),
            Some("WSEDGE_ADMIN_TOKEN")
        );
        let err = parse(&with("")).unwrap_err();
        assert!(err.contains("server.admin_token_env"), "{err}");
    }

    #[test]
    fn a_per_ip_limit_of_0_is_refused_and_1_accepted() {
        let with = |n: u32| {
            MINIMAL.replace(
                "[server]\n",
                &format!("[server]\nmax_connections_per_ip = {n}\n"),
            )
        };
        let err = parse(&with(0)).unwrap_err();
        assert!(
            err.contains("server.max_connections_per_ip") && err.contains("at least 1"),
            "{err}"
        );
        assert_eq!(
            parse(&with(1)).unwrap().server.max_connections_per_ip,
            Some(1)
        );
        assert_eq!(parse(MINIMAL).unwrap().server.max_connections_per_ip, None);
    }
}
