//! The main loop, after linkerd2-proxy and mini-redis: build everything (binding outside so
//! tests can use port 0), run until the shutdown future resolves, then drain with a timeout.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{net::TcpListener, task::JoinSet};
use tracing::{error, info, warn};

pub use crate::app::{AppState, StartError};
use crate::{
    app::StartError as BindError, config::Config, data_plane::DataPlane, instances::cgroup,
    protocols::tls::TlsTerminator, services,
};

/// How long the drain waits for the ledger writer (a locked or full disk) before stopping.
const LEDGER_FLUSH: Duration = Duration::from_secs(30);

pub struct Server {
    state: Arc<AppState>,
    listener: TcpListener,
    tls_listener: Option<TcpListener>,
    admin: TcpListener,
}

impl Server {
    /// Loads the data plane and binds the listeners; nothing is served until [`Server::run`].
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| BindError::Bind { what, addr, source })
        };
        let listener = bind("listen", config.server.listen).await?;
        let tls_listener = match config.server.tls_listen {
            Some(addr) => Some(bind("tls_listen", addr).await?),
            None => None,
        };
        let admin = bind("admin_listen", config.server.admin_listen).await?;
        let tls = match &tls_listener {
            Some(_) => Some(TlsTerminator::build(&config.server, &config.base_dir).await?),
            None => None,
        };
        if let Some(tls) = &tls {
            let path = match tls.kernel_tls() {
                true => "kernel TLS (rustls handshake, then the kernel encrypts and decrypts)",
                false => {
                    "rustls in userspace (this kernel has no TLS: CONFIG_TLS unset or the tls module missing)"
                }
            };
            info!(
                tls_path = path,
                certificates = tls.certificates().count(),
                "wss:// ready"
            );
        }
        let state = Arc::new(AppState::build(config, tls)?);
        // Before anything is served, with the port the admin API really got.
        state.egress.lock().expect("egress lock").admin_port =
            admin.local_addr().expect("bound listener").port();
        state.ensure_egress(&state.config);
        Ok(Server {
            state,
            listener,
            tls_listener,
            admin,
        })
    }

    /// The `wss://` address, when `tls_listen` is set.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_listener
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener"))
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
            tls_listener,
            admin,
        } = self;
        let tls_addr = tls_listener
            .as_ref()
            .map(|l| l.local_addr().expect("bound").to_string());
        info!(listen = %listener.local_addr().expect("bound"), tls_listen = tls_addr.as_deref(),
              admin = %admin.local_addr().expect("bound"), "wsedge serving");
        let admin_task = tokio::spawn({
            let router = services::admin::router(state.clone());
            async move {
                if let Err(e) = axum::serve(admin, router).await {
                    error!(error = %e, "admin API stopped");
                }
            }
        });
        let supervisor = tokio::spawn(services::supervisor::run(state.clone()));
        let checkpoints = tokio::spawn(services::ledger::checkpoints(state.clone()));
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        connections.spawn(services::proxy::serve(state.clone(), stream, peer, false));
                    }
                    Err(e) => accept_failed(e).await,
                },
                accepted = accept_on(&tls_listener) => match accepted {
                    Ok((stream, peer)) => {
                        connections.spawn(services::proxy::serve(state.clone(), stream, peer, true));
                    }
                    Err(e) => accept_failed(e).await,
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        state.draining.store(true, Ordering::Relaxed);
        state.drain_started.notify_waiters();
        drop(listener);
        drop(tls_listener);
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
            let cut = state.registry.snapshot();
            connections.shutdown().await;
            if let DataPlane::Kernel(kernel) = &state.data_plane {
                kernel.abort_all();
            }
            // A relay task aborted above never reached its end: its row is finished here
            // (the ledger keeps the first end written, so one that did end keeps its own).
            for conn in cut {
                let (sides, _) = conn.totals(state.data_plane.live());
                let result = Err(std::io::ErrorKind::TimedOut.into());
                services::ledger::ended(&state, &conn, &result, sides);
                conn.tracer.ended(&conn, None);
            }
        }
        let routes = state.routes();
        let retired = std::mem::take(&mut *state.retired.lock().expect("retired lock"));
        let pools = routes.pools().chain(retired.iter());
        futures_util::future::join_all(pools.map(|p| p.stop_all())).await;
        state.release_egress();
        if let DataPlane::Kernel(kernel) = &state.data_plane {
            kernel.unpin();
        }
        if let Some(dir) = &state.instance_cgroups
            && let Err(e) = cgroup::remove_server_dir(dir)
        {
            warn!(cgroup = %dir.display(), error = %e, "cannot remove this server's cgroup");
        }
        supervisor.abort();
        checkpoints.abort();
        // Every connection has ended: its row's end is queued; wait until it is on disk.
        if let Err(e) = state.ledger.flush(LEDGER_FLUSH).await {
            error!(error = %e, ledger = %state.ledger.path().display(),
                   "stopping with ledger writes pending: they are lost; rows left open are finished as interrupted at the next start");
        }
        admin_task.abort();
        info!("wsedge stopped");
    }
}

/// Accepts on `listener`, or waits forever when there is none.
async fn accept_on(
    listener: &Option<TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Out of descriptors and the like: keep serving open connections, retry shortly.
async fn accept_failed(e: std::io::Error) {
    warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}
