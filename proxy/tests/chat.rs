//! The chat room example (`deploy/examples/chat`) in a real browser: two headless Chromium
//! pages load its page through wsedge, join one room, and each sees the other's message.
//! With `instance_concurrency = 1` the two users are served by two instances, which only
//! meet through Redis pub/sub: Debian's `redis-server`, started here on the host side and
//! reached through `network = "egress"`.
//!
//! Needs `redis-server`, `chromium`, and `node` with `ws`, `redis` and `puppeteer-core` in
//! NODE_PATH (`cargo xtask test` installs all of them); fails, saying what is missing,
//! without them.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    process::{Child, Command},
};
use wsedge::instances::egress::GATEWAY;

/// The whole browser session: Chromium's start, two page loads with two cold starts, and the
/// messages (the driver has its own, shorter deadline and says which step failed).
const BROWSERS_DEADLINE: Duration = Duration::from_secs(120);

fn chat_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/chat")
}

/// A `redis-server` of the test's own on a free port, stopped when dropped.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    /// Listens on every address, protected mode off: the instances come from their own
    /// network namespaces through the egress gateway, not from loopback. Nothing is saved.
    async fn start() -> Redis {
        let port = std::net::TcpListener::bind("0.0.0.0:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "0.0.0.0"])
            .args(["--protected-mode", "no", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting redis-server: {e}; install Debian's `redis-server` (`cargo xtask test` does)")
            });
        let redis = Redis { child, port };
        redis.wait_for_pong().await;
        redis
    }

    async fn wait_for_pong(&self) {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(mut s) = TcpStream::connect(addr).await
                && s.write_all(b"PING\r\n").await.is_ok()
            {
                let mut reply = [0u8; 7];
                if tokio::time::timeout(WAIT, s.read_exact(&mut reply))
                    .await
                    .is_ok_and(|r| r.is_ok())
                    && &reply == b"+PONG\r\n"
                {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not answer PING on {addr} within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Panics, saying what is missing, unless Chromium and the Node.js modules are there.
fn require_browser_peers() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).is_file(),
        "{chromium} is missing: install Debian's `chromium` (`cargo xtask test` does)"
    );
    let ok = std::process::Command::new("node")
        .args([
            "-e",
            "require('ws'); require('redis'); require('puppeteer-core')",
        ])
        .env("NODE_PATH", node_path())
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "the chat test needs `node` with `ws`, `redis` and `puppeteer-core` in NODE_PATH={}; \
         `cargo xtask test` installs them",
        node_path()
    );
}

#[tokio::test]
async fn two_browsers_chat_across_two_instances_through_redis() {
    require_browser_peers();
    let redis = Redis::start().await;
    let mut config = example_config("chat");
    // The example as written, but for Redis's port (the test's own server): through the
    // function's `env` table, as an operator would set it. (`example_config` already put
    // `NODE_PATH` there, where the test's Node modules are.)
    config.functions[0].env.insert(
        "REDIS_URL".into(),
        format!("redis://{GATEWAY}:{}", redis.port),
    );
    let p = start_proxy(config).await;

    let url = format!("http://{}/chat?room=r1", p.addr);
    let mut driver = Command::new("node");
    driver
        .arg("test/browsers.js")
        .arg(&url)
        .current_dir(chat_dir())
        .env("NODE_PATH", node_path())
        .kill_on_drop(true);
    let out = tokio::time::timeout(BROWSERS_DEADLINE, driver.output())
        .await
        .unwrap_or_else(|_| panic!("the browsers did not finish within {BROWSERS_DEADLINE:?}"))
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "browsers: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let served: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("no JSON line from the browsers:\n{stdout}\n{stderr}"));
    let (ann, bob) = (served["ann"].as_str(), served["bob"].as_str());
    assert!(
        ann.is_some() && ann != bob,
        "two users on two instances: {served}"
    );

    // wsedge's own account: both instances the pages named are the chat function's.
    let instances = p.instances().await;
    for page in [ann, bob] {
        assert!(
            instances
                .iter()
                .any(|i| Some(i.id.as_str()) == page && i.function == "chat"),
            "{page:?} not among wsedge's instances: {instances:?}"
        );
    }
    p.stop().await;
    drop(redis);
}
