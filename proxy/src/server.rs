//! The main loop, after linkerd2-proxy and mini-redis: build everything (binding outside so
//! tests can use port 0), run until the shutdown future resolves, then drain with a timeout.

use std::{
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock, atomic::AtomicBool, atomic::Ordering},
    time::Duration,
};

use tokio::{net::TcpListener, task::JoinSet};
use tracing::{error, info, warn};

use crate::{
    config::{Auth, Config, FunctionConfig, Isolation},
    data_plane::{DataPlane, LoadError},
    instances::{Pool, SpawnSpec, cgroup},
    metrics::Metrics,
    registry::{ClientCounts, Registry},
    routing::{Backend, Route, Routes},
    services,
};

/// State every connection task and the admin API share.
pub struct AppState {
    /// The configuration wsedge started with; `[server]` settings are not reloaded.
    pub config: Config,
    /// The functions, replaced whole on reload (SIGHUP); a connection keeps the route it
    /// was routed with.
    routes: RwLock<Arc<Routes>>,
    /// Pools of functions a reload removed or changed: no new connections, their instances
    /// stop once idle, and shutdown stops what is left.
    retired: Mutex<Vec<Arc<Pool>>>,
    pub data_plane: DataPlane,
    pub registry: Arc<Registry>,
    pub clients: Arc<ClientCounts>,
    pub metrics: Arc<Metrics>,
    pub draining: AtomicBool,
    /// This server's directory for instance cgroups (root with cgroup2 only).
    instance_cgroups: Option<PathBuf>,
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
    #[error("function {function}: {reason}")]
    Function { function: String, reason: String },
}

pub struct Server {
    state: Arc<AppState>,
    listener: TcpListener,
    admin: TcpListener,
}

impl Server {
    /// Loads the data plane and binds the listeners; nothing is served until [`Server::run`].
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let data_plane = DataPlane::select(config.server.data_plane)?;
        info!(data_plane = data_plane.name(), "data plane ready");
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { what, addr, source })
        };
        let listener = bind("listen", config.server.listen).await?;
        let admin = bind("admin_listen", config.server.admin_listen).await?;
        let metrics = Arc::new(Metrics::default());
        let cgroups = instance_cgroups();
        if let Some(dir) = cgroups.as_deref().and_then(|d| d.parent()) {
            cgroup::clean_leftovers(dir);
        }
        enable_zero_hop(&data_plane, cgroups.as_deref(), &config);
        let routes = build_routes(&config, &metrics, None, cgroups.clone())?;
        let state = Arc::new(AppState {
            routes: RwLock::new(Arc::new(routes)),
            retired: Mutex::default(),
            config,
            data_plane,
            registry: Arc::default(),
            clients: Arc::default(),
            metrics,
            draining: AtomicBool::new(false),
            instance_cgroups: cgroups,
        });
        Ok(Server {
            state,
            listener,
            admin,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("bound listener")
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting and gives open connections
    /// `drain_timeout_s` to finish before cutting them.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            state,
            listener,
            admin,
        } = self;
        info!(listen = %listener.local_addr().expect("bound"), admin = %admin.local_addr().expect("bound"), "wsedge serving");
        let admin_task = tokio::spawn({
            let router = services::admin::router(state.clone());
            async move {
                if let Err(e) = axum::serve(admin, router).await {
                    error!(error = %e, "admin API stopped");
                }
            }
        });
        let supervisor = tokio::spawn(services::supervisor::run(state.clone()));
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        connections.spawn(services::proxy::serve(state.clone(), stream, peer));
                    }
                    // Out of descriptors and the like: keep serving open connections.
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        state.draining.store(true, Ordering::Relaxed);
        drop(listener);
        let drain = Duration::from_secs(state.config.server.drain_timeout_s);
        info!(
            open = state.registry.len(),
            ?drain,
            "draining: closing every WebSocket with 1001"
        );
        for conn in state.registry.snapshot() {
            services::supervisor::stop(&state, &conn, proxy_common::policy::Ending::Shutdown);
        }
        // Spliced connections have no task: the registry says when they are gone.
        let finished = tokio::time::timeout(drain, async {
            while connections.join_next().await.is_some() {}
            while !state.registry.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if finished.is_err() {
            warn!(
                cut = state.registry.len(),
                "drain window over; closing remaining connections"
            );
            connections.shutdown().await;
            if let DataPlane::Kernel(kernel) = &state.data_plane {
                kernel.abort_all();
            }
        }
        let routes = state.routes();
        let retired = std::mem::take(&mut *state.retired.lock().expect("retired lock"));
        let pools = routes.pools().chain(retired.iter());
        futures_util::future::join_all(pools.map(|p| p.stop_all())).await;
        if let Some(dir) = &state.instance_cgroups
            && let Err(e) = cgroup::remove_server_dir(dir)
        {
            warn!(cgroup = %dir.display(), error = %e, "cannot remove this server's cgroup");
        }
        supervisor.abort();
        admin_task.abort();
        info!("wsedge stopped");
    }
}

impl AppState {
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
        )?;
        let kept: Vec<&Arc<Pool>> = new.pools().collect();
        let mut retired = self.retired.lock().expect("retired lock");
        for pool in old.pools() {
            if !kept.iter().any(|k| Arc::ptr_eq(k, pool)) {
                pool.retire();
                retired.push(pool.clone());
            }
        }
        info!(functions = config.functions.len(), "functions reloaded");
        *self.routes.write().expect("routes lock") = Arc::new(new);
        Ok(())
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
) -> Result<Routes, StartError> {
    let root = is_root();
    let key_vars: Vec<String> = config
        .functions
        .iter()
        .filter_map(|f| match &f.auth {
            Auth::Hmac(h) => Some(h.hmac_key_env.clone()),
            Auth::Named(_) => None,
        })
        .collect();
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
                let spec = SpawnSpec {
                    function: f.name.clone(),
                    command: command.clone(),
                    base_dir: config.base_dir.clone(),
                    isolation,
                    port: f.port,
                    env_remove: key_vars.clone(),
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
