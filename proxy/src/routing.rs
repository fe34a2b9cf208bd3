//! Maps a request's host and path to a function, and picks the function's instance.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::FunctionConfig;

pub struct Route {
    pub function: FunctionConfig,
    next_upstream: AtomicUsize,
}

impl Route {
    /// Round-robin over the fixed upstreams.
    pub fn next_upstream(&self) -> &str {
        let n = self.next_upstream.fetch_add(1, Ordering::Relaxed);
        &self.function.upstreams[n % self.function.upstreams.len()]
    }
}

pub struct Routes {
    /// Longest route first, so the most specific prefix wins.
    routes: Vec<Route>,
}

impl Routes {
    pub fn new(functions: &[FunctionConfig]) -> Routes {
        let mut routes: Vec<Route> = functions
            .iter()
            .map(|f| Route {
                function: f.clone(),
                next_upstream: AtomicUsize::new(0),
            })
            .collect();
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

    fn function(name: &str, route: &str, host: Option<&str>) -> FunctionConfig {
        let text =
            format!("name = \"{name}\"\nroute = \"{route}\"\nupstreams = [\"127.0.0.1:1\"]\n");
        let mut f: FunctionConfig = toml::from_str(&text).unwrap();
        f.host = host.map(String::from);
        f
    }

    #[test]
    fn longest_prefix_and_host_win() {
        let routes = Routes::new(&[
            function("root", "/", None),
            function("echo", "/echo", None),
            function("chat", "/echo/chat", Some("chat.example")),
        ]);
        let name = |host, path| routes.find(host, path).map(|r| r.function.name.as_str());
        assert_eq!(name("a", "/echo?x=1"), Some("echo"));
        assert_eq!(name("a", "/echo/chat/1"), Some("echo"));
        assert_eq!(name("chat.example", "/echo/chat/1"), Some("chat"));
        assert_eq!(name("a", "/echoes"), Some("root"));
        let no_root = Routes::new(&[function("echo", "/echo", None)]);
        assert!(no_root.find("a", "/echoes").is_none());
    }
}
