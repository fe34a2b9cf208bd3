//! Maps a request's host and path to a function, and the function to its instances.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use crate::{
    config::FunctionConfig,
    instances::{Lease, Pool, Target},
    protocols::error_response::HandshakeError,
};

/// Where a function's connections go.
pub enum Backend {
    /// Fixed instances somebody else runs and scales, picked round-robin; wsedge does not
    /// limit their concurrency.
    Upstreams {
        /// Each address with its "host:port" name, shared by every connection to it.
        addrs: Vec<(SocketAddr, Arc<str>)>,
        next: AtomicUsize,
    },
    /// Instances wsedge starts, scales and stops.
    Spawned(Arc<Pool>),
}

/// The instance chosen for one connection; a spawned instance's slot is held until drop.
pub struct Assigned {
    pub target: Target,
    /// Instance id (spawned) or "host:port" (upstream), for logs and `/connections`.
    pub instance: Arc<str>,
    pub lease: Option<Lease>,
}

pub struct Route {
    pub function: FunctionConfig,
    /// The function's name, shared by its connections.
    pub name: Arc<str>,
    /// HMAC key read from `auth.hmac_key_env` at start.
    pub hmac_key: Option<Vec<u8>>,
    pub backend: Backend,
}

impl Route {
    pub async fn assign(&self) -> Result<Assigned, HandshakeError> {
        match &self.backend {
            Backend::Upstreams { addrs, next } => {
                let (addr, name) = &addrs[next.fetch_add(1, Ordering::Relaxed) % addrs.len()];
                Ok(Assigned {
                    target: Target::fixed(*addr),
                    instance: name.clone(),
                    lease: None,
                })
            }
            Backend::Spawned(pool) => {
                let lease = pool.acquire().await?;
                let target = lease
                    .target()
                    .ok_or_else(|| HandshakeError::internal("ready instance without a process"))?;
                Ok(Assigned {
                    target,
                    instance: lease.instance_id().clone(),
                    lease: Some(lease),
                })
            }
        }
    }
}

pub struct Routes {
    /// Longest route first, so the most specific prefix wins.
    routes: Vec<Route>,
}

impl Routes {
    pub fn new(mut routes: Vec<Route>) -> Routes {
        routes.sort_by_key(|r| {
            std::cmp::Reverse((r.function.route.len(), r.function.host.is_some()))
        });
        Routes { routes }
    }

    /// The function for `host` (lower-case, no port) and a request target like "/echo?x=1".
    pub fn find(&self, host: &str, target: &str) -> Option<&Route> {
        let path = target.split(['?', '#']).next().unwrap_or(target);
        self.routes.iter().find(|r| {
            let f = &r.function;
            f.host
                .as_deref()
                .is_none_or(|h| h.eq_ignore_ascii_case(host))
                && prefix_matches(&f.route, path)
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }

    pub fn pools(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.routes.iter().filter_map(|r| match &r.backend {
            Backend::Spawned(pool) => Some(pool),
            Backend::Upstreams { .. } => None,
        })
    }
}

/// "/echo" matches "/echo" and "/echo/x", not "/echoes".
fn prefix_matches(route: &str, path: &str) -> bool {
    match path.strip_prefix(route) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || route.ends_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, route: &str, host: Option<&str>) -> Route {
        let text =
            format!("name = \"{name}\"\nroute = \"{route}\"\nupstreams = [\"127.0.0.1:1\"]\n");
        let mut function: FunctionConfig = toml::from_str(&text).unwrap();
        function.host = host.map(String::from);
        Route {
            name: function.name.as_str().into(),
            function,
            hmac_key: None,
            backend: Backend::Upstreams {
                addrs: vec![("127.0.0.1:1".parse().unwrap(), "127.0.0.1:1".into())],
                next: AtomicUsize::new(0),
            },
        }
    }

    #[test]
    fn longest_prefix_and_host_win() {
        let routes = Routes::new(vec![
            route("root", "/", None),
            route("echo", "/echo", None),
            route("chat", "/echo/chat", Some("chat.example")),
        ]);
        let name = |host, path| routes.find(host, path).map(|r| r.function.name.as_str());
        assert_eq!(name("a", "/echo?x=1"), Some("echo"));
        assert_eq!(name("a", "/echo/chat/1"), Some("echo"));
        assert_eq!(name("chat.example", "/echo/chat/1"), Some("chat"));
        assert_eq!(name("a", "/echoes"), Some("root"));
        let no_root = Routes::new(vec![route("echo", "/echo", None)]);
        assert!(no_root.find("a", "/echoes").is_none());
    }
}
