//! What every service shares: the configuration, the functions (replaced whole on reload),
//! the data plane, the registry of connections and the metrics. Built once when the server
//! binds; services depend on this module, not on the server loop.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock, atomic::AtomicBool},
};

use tracing::{error, info, warn};

use crate::{
    config::{Auth, Config, FunctionConfig, Isolation, Network},
    data_plane::{DataPlane, LoadError},
    instances::{
        Pool, SpawnSpec, cgroup, egress,
        limits::{self, Hierarchy, ResourceLimits},
        process,
        sandbox::{Sandbox, User},
    },
    ledger::{Ledger, LedgerError},
    metrics::{BpfStats, Metrics},
    protocols::bearer::{BearerToken, TokenError},
    protocols::tls::{TlsError, TlsTerminator},
    registry::{ClientCounts, Registry},
    routing::{Backend, Route, Routes},
};

/// State every connection task and the admin API share.
pub struct AppState {
    /// The configuration wsedge started with; `[server]` settings are not reloaded.
    pub config: Config,
    /// The functions, replaced whole on reload (SIGHUP); a connection keeps the route it
    /// was routed with.
    pub(crate) routes: RwLock<Arc<Routes>>,
    /// Pools of functions a reload removed or changed: no new connections, their instances
    /// stop once idle, and shutdown stops what is left.
    pub(crate) retired: Mutex<Vec<Arc<Pool>>>,
    pub data_plane: DataPlane,
    pub registry: Arc<Registry>,
    pub clients: Arc<ClientCounts>,
    pub metrics: Arc<Metrics>,
    /// Data-plane events for `wsedge trace` (`GET /trace`).
    pub tracer: Arc<crate::tracer::Tracer>,
    pub draining: AtomicBool,
    /// Notified once when `draining` is set: idle keep-alive HTTP connections close then.
    pub drain_started: tokio::sync::Notify,
    /// TLS for `tls_listen`, when configured.
    pub tls: Option<TlsTerminator>,
    /// This server's directory for instance cgroups (root with cgroup2 only).
    pub(crate) instance_cgroups: Option<PathBuf>,
    /// Where instances' resource limits are enforced (root only).
    limit_hierarchy: Option<Arc<Hierarchy>>,
    /// The token every admin API request must bear (`admin_token_env`), read at start.
    pub admin_token: Option<BearerToken>,
    /// The billing ledger in `state_dir`.
    pub ledger: Ledger,
    /// The kernel's BPF statistics, kept on with `bpf_stats`.
    pub bpf_stats: BpfStats,
    /// The egress firewall, while a function has `network = "egress"`; released at a clean
    /// stop.
    pub(crate) egress: Mutex<EgressState>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("data_plane = \"kernel\" but the eBPF programs cannot be loaded: {0}")]
    DataPlane(#[from] LoadError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("function {function}: {reason}")]
    Function { function: String, reason: String },
    #[error("server.admin_token_env: {0}")]
    AdminToken(#[from] TokenError),
    /// No connection is served unbilled: a ledger that cannot be opened stops the start.
    #[error("billing ledger: {0}")]
    Ledger(#[from] LedgerError),
}

impl AppState {
    /// Loads the data plane and builds the functions of `config`; `tls` serves `tls_listen`.
    pub fn build(config: Config, tls: Option<TlsTerminator>) -> Result<AppState, StartError> {
        // Before anything starts: a missing token must not leave the admin API open.
        let admin_token = match &config.server.admin_token_env {
            Some(var) => Some(BearerToken::from_env(var)?),
            None => None,
        };
        let data_plane = DataPlane::select(
            config.server.data_plane,
            config.server.kernel_map_connections,
            config.server.kernel_trace,
        )?;
        info!(data_plane = data_plane.name(), "data plane ready");
        let metrics = Arc::new(Metrics::default());
        let bpf_stats = BpfStats::start(config.server.bpf_stats, &data_plane);
        // Before anything is accepted: the previous run's open rows are finished first.
        let ledger = Ledger::open(&config.state_dir(), metrics.ledger_write_lag())?;
        let cgroups = instance_cgroups();
        if let Some(dir) = cgroups.as_deref().and_then(|d| d.parent()) {
            cgroup::clean_leftovers(dir);
        }
        enable_zero_hop(&data_plane, cgroups.as_deref(), &config);
        let limit_hierarchy = limit_hierarchy(cgroups.as_deref());
        let routes = build_routes(
            &config,
            &metrics,
            None,
            cgroups.clone(),
            limit_hierarchy.clone(),
        )?;
        let egress = Mutex::new(EgressState {
            admin_port: config.server.admin_listen.port(),
            firewall: None,
        });
        Ok(AppState {
            routes: RwLock::new(Arc::new(routes)),
            retired: Mutex::default(),
            config,
            tracer: crate::tracer::Tracer::new(match &data_plane {
                DataPlane::Kernel(k) => Some(k.clone()),
                DataPlane::Userspace => None,
            }),
            data_plane,
            registry: Arc::default(),
            clients: Arc::default(),
            metrics,
            draining: AtomicBool::new(false),
            drain_started: tokio::sync::Notify::new(),
            tls,
            instance_cgroups: cgroups,
            limit_hierarchy,
            admin_token,
            ledger,
            bpf_stats,
            egress,
        })
    }

    /// Loads the egress firewall if a function of `config` needs it and it is not loaded.
    pub(crate) fn ensure_egress(&self, config: &Config) {
        let mut egress = self.egress.lock().expect("egress lock");
        if egress.firewall.is_none() {
            egress.firewall = egress_firewall(config, egress.admin_port);
        }
    }

    /// Deletes the egress firewall (a clean stop: every instance has stopped).
    pub(crate) fn release_egress(&self) {
        if let Some(firewall) = self.egress.lock().expect("egress lock").firewall.take() {
            firewall.release();
        }
    }

    /// The functions as configured now.
    pub fn routes(&self) -> Arc<Routes> {
        self.routes.read().expect("routes lock").clone()
    }

    /// Every pool, current and retired (for `/instances`).
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        let mut pools: Vec<Arc<Pool>> = self.routes().pools().cloned().collect();
        pools.extend(self.retired.lock().expect("retired lock").iter().cloned());
        pools
    }

    /// Reads the TLS certificates again (SIGHUP): new handshakes get them, open connections
    /// keep theirs; certificates that do not load change nothing.
    pub fn reload_certificates(&self) {
        let Some(tls) = &self.tls else { return };
        match tls.certificates().reload() {
            Ok(()) => info!(
                certificates = tls.certificates().count(),
                "TLS certificates reloaded"
            ),
            Err(e) => {
                warn!(error = %e, "TLS certificate reload refused; the certificates in use stay")
            }
        }
    }

    /// Applies the functions of `config` (SIGHUP) without touching open connections: a
    /// function whose settings did not change keeps its pool and warm instances; a removed
    /// or changed one's pool is retired. `[server]` settings need a restart.
    pub fn reload(&self, config: &Config) -> Result<(), StartError> {
        if config.server != self.config.server {
            warn!("[server] settings changed: they take effect at the next start, not on reload");
        }
        let old = self.routes();
        let new = build_routes(
            config,
            &self.metrics,
            Some(&old),
            self.instance_cgroups.clone(),
            self.limit_hierarchy.clone(),
        )?;
        self.ensure_egress(config);
        let kept: Vec<&Arc<Pool>> = new.pools().collect();
        let mut retired = self.retired.lock().expect("retired lock");
        for pool in old.pools() {
            if !kept.iter().any(|k| Arc::ptr_eq(k, pool)) {
                pool.retire();
                retired.push(pool.clone());
            }
        }
        *self.routes.write().expect("routes lock") = Arc::new(new);
        // Logged once in effect: a request that follows the log line sees the new functions.
        info!(functions = config.functions.len(), "functions reloaded");
        Ok(())
    }
}

pub(crate) struct EgressState {
    /// The admin API's bound port (the config may say 0), fenced off from instances.
    pub(crate) admin_port: u16,
    pub(crate) firewall: Option<egress::Firewall>,
}

/// The egress firewall when a function needs it. A failure is logged, not fatal: the egress
/// functions' instances then fail to start with its reason, the other functions serve.
fn egress_firewall(config: &Config, admin_port: u16) -> Option<egress::Firewall> {
    let egress: Vec<&str> = config
        .functions
        .iter()
        .filter(|f| f.command.is_some() && f.network == Network::Egress)
        .map(|f| f.name.as_str())
        .collect();
    if egress.is_empty() {
        return None;
    }
    match egress::Firewall::install(admin_port) {
        Ok(firewall) => Some(firewall),
        Err(e) => {
            error!(error = %e, functions = ?egress, "egress unavailable: these functions' instances will not start");
            None
        }
    }
}

/// Where this server's spawned instances get their cgroups: only when wsedge can create
/// cgroups (root, writable cgroup2).
fn instance_cgroups() -> Option<PathBuf> {
    if is_root() {
        cgroup::server_dir()
    } else {
        None
    }
}

/// Where instance limits go (v2 controllers where delegated, else the v1 hierarchies), and
/// v1 directories a crashed wsedge left removed. Without it (not root, no controllers)
/// instances run unlimited, which the start-up log says.
fn limit_hierarchy(cgroups: Option<&std::path::Path>) -> Option<Arc<Hierarchy>> {
    let hierarchy = cgroups.and_then(|dir| Hierarchy::detect(Some(dir)));
    match &hierarchy {
        Some(h) => {
            limits::clean_leftovers(h, cgroups.and_then(|dir| dir.parent()));
            info!(
                cgroups = h.name(),
                "instance limits (memory_mb, pids_max, cpu) enforced"
            );
        }
        None => warn!(
            "no cgroup controllers for instance limits: memory_mb, pids_max and cpu are not enforced"
        ),
    }
    hierarchy.map(Arc::new)
}

/// Zero-hop needs the kernel data plane and the instances in a cgroup of this server's.
fn enable_zero_hop(data_plane: &DataPlane, cgroups: Option<&std::path::Path>, config: &Config) {
    let DataPlane::Kernel(kernel) = data_plane else {
        return;
    };
    let spawns = config.functions.iter().any(|f| f.command.is_some());
    let result = match cgroups {
        Some(dir) => kernel.enable_zero_hop(dir),
        None => Err(crate::data_plane::kernel::ZeroHopUnavailable::NoCgroup),
    };
    match result {
        Ok(()) => info!(
            "zero-hop data plane ready: connections to spawned instances skip the proxy's loopback hop"
        ),
        Err(e) if spawns => {
            warn!(reason = %e, "zero-hop data plane unavailable; spawned instances use the two-socket kernel splice")
        }
        Err(e) => info!(reason = %e, "zero-hop data plane unavailable"),
    }
}

/// One route per function: HMAC keys read from the environment, pools for spawned ones
/// (taken over from `previous` when the function is unchanged).
fn build_routes(
    config: &Config,
    metrics: &Arc<Metrics>,
    previous: Option<&Routes>,
    cgroup_root: Option<PathBuf>,
    limit_hierarchy: Option<Arc<Hierarchy>>,
) -> Result<Routes, StartError> {
    let root = is_root();
    let mut routes = Vec::new();
    for f in &config.functions {
        let fail = |reason: String| StartError::Function {
            function: f.name.clone(),
            reason,
        };
        let hmac_key = match &f.auth {
            Auth::Hmac(h) => match std::env::var(&h.hmac_key_env) {
                Ok(key) if !key.is_empty() => Some(key.into_bytes()),
                _ => {
                    return Err(fail(format!(
                        "auth.hmac_key_env: ${} is not set",
                        h.hmac_key_env
                    )));
                }
            },
            Auth::Named(_) => None,
        };
        let unchanged = previous.and_then(|routes| {
            routes.iter().find_map(|r| match &r.backend {
                Backend::Spawned(pool) if r.function == *f => Some(pool.clone()),
                _ => None,
            })
        });
        let backend = match (&f.command, unchanged) {
            (Some(_), Some(pool)) => Backend::Spawned(pool),
            (Some(command), None) => {
                let isolation = match (f.isolation, root) {
                    (Some(Isolation::Netns), false) => {
                        return Err(fail("isolation = \"netns\" needs root".into()));
                    }
                    (Some(i), _) => i,
                    (None, true) => Isolation::Netns,
                    (None, false) => Isolation::None,
                };
                if f.network == Network::Egress && isolation == Isolation::None {
                    return Err(fail(
                        "network = \"egress\" needs isolation = \"netns\" (wsedge as root): with isolation \"none\" an instance shares the host's network, admin API included".into(),
                    ));
                }
                // An instance's user, namespaces and filters need wsedge to be root; otherwise
                // instances run as wsedge's own (unprivileged) user.
                let sandbox = match root {
                    true => {
                        let user = User::lookup(&f.user).map_err(|e| fail(format!("user: {e}")))?;
                        let program = process::resolve_program(&command[0], &config.base_dir);
                        let sandbox = Sandbox::prepare(user, &config.base_dir, &program)
                            .map_err(|e| fail(e.to_string()))?;
                        Some(Arc::new(sandbox))
                    }
                    false => None,
                };
                let spec = SpawnSpec {
                    function: f.name.clone(),
                    command: command.clone(),
                    base_dir: config.base_dir.clone(),
                    isolation,
                    port: f.port,
                    env: f.env.clone(),
                    sandbox,
                    limits: limit_hierarchy.clone().map(|h| {
                        let limits = ResourceLimits {
                            memory_mb: f.memory_mb,
                            pids_max: f.pids_max,
                            cpu: f.cpu,
                        };
                        (h, limits)
                    }),
                    network: f.network,
                };
                info!(function = %f.name, ?isolation, cgroups = cgroup_root.is_some(), "function with spawned instances");
                Backend::Spawned(Pool::new(spec, f, cgroup_root.clone(), metrics.clone()))
            }
            (None, _) => Backend::Upstreams {
                addrs: resolve_upstreams(f).map_err(fail)?,
                next: Default::default(),
            },
        };
        routes.push(Route {
            name: f.name.as_str().into(),
            function: f.clone(),
            hmac_key,
            backend,
        });
    }
    Ok(Routes::new(routes))
}

/// Upstream names are resolved once, at start.
fn resolve_upstreams(f: &FunctionConfig) -> Result<Vec<(SocketAddr, Arc<str>)>, String> {
    f.upstreams
        .iter()
        .map(|u| {
            std::net::ToSocketAddrs::to_socket_addrs(u.as_str())
                .ok()
                .and_then(|mut addrs| addrs.next())
                .map(|addr| (addr, u.as_str().into()))
                .ok_or_else(|| format!("upstream {u:?} does not resolve"))
        })
        .collect()
}

fn is_root() -> bool {
    // SAFETY: plain syscall.
    unsafe { libc::geteuid() == 0 }
}
