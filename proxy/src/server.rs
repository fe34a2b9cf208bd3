//! The main loop, after linkerd2-proxy and mini-redis: build everything (binding outside so
//! tests can use port 0), run until the shutdown future resolves, then drain with a timeout.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool, atomic::Ordering},
    time::Duration,
};

use tokio::{net::TcpListener, task::JoinSet};
use tracing::{error, info, warn};

use crate::{
    config::Config,
    data_plane::{DataPlane, LoadError},
    registry::Registry,
    routing::Routes,
    services,
};

/// State every connection task and the admin API share.
pub struct AppState {
    pub config: Config,
    pub routes: Routes,
    pub data_plane: DataPlane,
    pub registry: Registry,
    pub draining: AtomicBool,
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
        let state = Arc::new(AppState {
            routes: Routes::new(&config.functions),
            config,
            data_plane,
            registry: Registry::default(),
            draining: AtomicBool::new(false),
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
        info!(open = state.registry.len(), ?drain, "draining");
        let finished = tokio::time::timeout(drain, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if finished.is_err() {
            warn!(
                cut = connections.len(),
                "drain window over; closing remaining connections"
            );
            connections.shutdown().await;
        }
        admin_task.abort();
        info!("wsedge stopped");
    }
}
