//! `network = "egress"`, against real veth pairs and the real `inet wsedge` nftables table
//! (as root; `nft` and `ip` must be installed: these tests fail without them). The instances
//! run `tests/fixtures/egress_probe.py`, which tries TCP connections on request and answers
//! "ok", "refused", "timeout" or "unreachable". The only traffic targets are listeners of this
//! test on the host side, the admin API and the instances themselves.
//!
//! The tests share one host-wide nftables table and look at every `wse*` link, so they run
//! one at a time (`SERIAL`).

mod common;

use std::{net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use common::{Ws, WsedgeProcess as Wsedge, connect, function_config, recv, start_proxy};
use futures_util::SinkExt;
use tokio::{net::TcpListener, sync::Mutex};
use tokio_tungstenite::tungstenite::Message;

const GATEWAY: &str = "10.213.0.1";
static SERIAL: Mutex<()> = Mutex::const_new(());

fn probe() -> String {
    format!(
        "{}/tests/fixtures/egress_probe.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A function running the probe with `network` and `extra` settings.
fn probe_function(name: &str, network: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nroute = \"/{name}\"\ncommand = [\"python3\", \"{}\"]\n\
         network = \"{network}\"\nstart_timeout_ms = 15000\n{extra}\n",
        probe()
    )
}

/// Sends `request` to the probe and returns its answer.
async fn ask(ws: &mut Ws, request: &str) -> String {
    ws.send(Message::text(request)).await.unwrap();
    match recv(ws).await {
        Message::Text(text) => text.to_string(),
        other => panic!("{request}: expected a text answer, got {other:?}"),
    }
}

/// Names of the host's `wse*` links (instance links of any wsedge).
fn instance_links() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-j", "link", "show"])
        .output()
        .expect("`ip` runs (iproute2 is required)");
    assert!(out.status.success(), "ip link: {out:?}");
    let links: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    links
        .iter()
        .filter_map(|l| l["ifname"].as_str())
        .filter(|n| n.starts_with("wse"))
        .map(String::from)
        .collect()
}

/// The `inet wsedge` table as `nft -n` lists it, or `None` when there is none.
fn wsedge_table() -> Option<String> {
    let out = Command::new("nft")
        .args(["-n", "list", "table", "inet", "wsedge"])
        .output()
        .expect("`nft` runs (Debian package nftables is required)");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The host-side link of the instance at `address` (10.213.x.y is `wse` and x, y in hex).
fn link_of(address: &str) -> String {
    let octets: Vec<u8> = address.split('.').map(|o| o.parse().unwrap()).collect();
    format!("wse{:02x}{:02x}", octets[2], octets[3])
}

/// Polls `done` every 50 ms; fails the test with `what` after 10 s.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what} within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP server on the host side (all addresses, so also the gateway address) that records
/// the address each connection came from.
async fn host_service() -> (u16, tokio::sync::mpsc::UnboundedReceiver<SocketAddr>) {
    let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((_, peer)) = listener.accept().await {
            let _ = tx.send(peer);
        }
    });
    (port, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_reaches_host_services_but_not_the_admin_api_and_none_reaches_nothing() {
    let _serial = SERIAL.lock().await;
    let functions = format!(
        "{}\n[[function]]\n{}",
        probe_function("out", "egress", ""),
        probe_function("closed", "none", "")
    );
    let mut config = function_config("userspace", "", &functions);
    // On every address, so that only the firewall keeps instances from it.
    config.server.admin_listen = "0.0.0.0:0".parse().unwrap();
    let proxy = start_proxy(config).await;
    let admin_port = proxy.admin.port();
    let (service_port, mut peers) = host_service().await;

    let mut out = connect(proxy.url("/out")).await.expect("egress upgrade");
    let address = ask(&mut out, "address").await;
    assert!(address.starts_with("10.213."), "egress address {address}");
    assert_ne!(address, GATEWAY);
    assert!(
        instance_links().contains(&link_of(&address)),
        "{:?}",
        instance_links()
    );
    assert_eq!(
        ask(&mut out, &format!("connect {GATEWAY}:{service_port}")).await,
        "ok",
        "egress reaches a host service at the gateway address"
    );
    let peer = tokio::time::timeout(Duration::from_secs(5), peers.recv())
        .await
        .expect("the host service saw the connection")
        .unwrap();
    assert_eq!(
        peer.ip().to_string(),
        address,
        "the host sees the instance's own address"
    );
    // The admin API does listen on the gateway address: only the firewall refuses instances.
    tokio::net::TcpStream::connect((GATEWAY, admin_port))
        .await
        .expect("the host itself reaches the admin API at the gateway address");
    let admin = ask(&mut out, &format!("connect {GATEWAY}:{admin_port}")).await;
    assert_eq!(admin, "refused", "egress must not reach the admin API");

    let mut closed = connect(proxy.url("/closed")).await.expect("none upgrade");
    assert_eq!(ask(&mut closed, "address").await, "none");
    for port in [service_port, admin_port] {
        let answer = ask(&mut closed, &format!("connect {GATEWAY}:{port}")).await;
        assert_ne!(answer, "ok", "network = \"none\" reached {GATEWAY}:{port}");
    }
    assert!(
        peers.try_recv().is_err(),
        "the host service saw a connection from the none instance"
    );
    drop((out, closed));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_egress_instances_cannot_reach_each_other() {
    let _serial = SERIAL.lock().await;
    let function = probe_function(
        "out",
        "egress",
        "instance_concurrency = 1\nmax_instances = 2",
    );
    let proxy = start_proxy(function_config("userspace", "", &function)).await;
    let mut a = connect(proxy.url("/out")).await.expect("first upgrade");
    let mut b = connect(proxy.url("/out")).await.expect("second upgrade");
    let (address_a, address_b) = (ask(&mut a, "address").await, ask(&mut b, "address").await);
    assert!(address_a.starts_with("10.213.") && address_b.starts_with("10.213."));
    assert_ne!(address_a, address_b, "two instances, two addresses");
    // A listens at its address (the host reaches it there), yet B does not get through.
    tokio::net::TcpStream::connect((address_a.as_str(), 9000))
        .await
        .expect("the host reaches instance A at its address");
    let answer = ask(&mut b, &format!("connect {address_a}:9000")).await;
    assert_ne!(answer, "ok", "instance B reached instance A");
    let answer = ask(&mut a, &format!("connect {address_b}:9000")).await;
    assert_ne!(answer, "ok", "instance A reached instance B");
    drop((a, b));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_leaves_no_link_and_no_table() {
    let _serial = SERIAL.lock().await;
    let function = probe_function("out", "egress", "");
    let proxy = start_proxy(function_config("userspace", "", &function)).await;
    let table = wsedge_table().expect("the table exists while an egress function is configured");
    assert!(
        table.contains(&format!("elements = {{ {} }}", proxy.admin.port())),
        "{table}"
    );
    let mut ws = connect(proxy.url("/out")).await.expect("upgrade");
    let address = ask(&mut ws, "address").await;
    assert!(instance_links().contains(&link_of(&address)));
    drop(ws);
    proxy.stop().await;
    assert_eq!(
        instance_links(),
        Vec::<String>::new(),
        "links left after a clean stop"
    );
    assert_eq!(wsedge_table(), None, "table left after a clean stop");
}

/// A `wsedge run` child with JSON logs, killed with SIGKILL when dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_the_next_start_replaces_the_table_and_no_dead_link_remains() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let config: PathBuf = dir.path().join("wsedge.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             data_plane = \"userspace\"\nstate_dir = \"state\"\n[[function]]\n{}",
            probe_function(
                "out",
                "egress",
                // The binary reads only this file: the sandbox's user and the probe's package.
                &format!(
                    "user = \"nobody\"\nenv = {{ PYTHONPATH = {:?} }}",
                    common::python_peers_path()
                )
            )
        ),
    )
    .unwrap();
    let mut crashed = Wsedge::start(&config);
    let mut ws = connect(format!("ws://{}/out", crashed.listen))
        .await
        .expect("upgrade");
    let dead_link = link_of(&ask(&mut ws, "address").await);
    assert!(instance_links().contains(&dead_link));
    crashed.kill();
    drop(ws);
    let leftover = wsedge_table().expect("SIGKILL leaves the table behind");
    let dead_port = crashed.admin.port();
    assert!(leftover.contains(&format!("elements = {{ {dead_port} }}")));

    let function = probe_function("out", "egress", "");
    let proxy = start_proxy(function_config("userspace", "", &function)).await;
    let table = wsedge_table().expect("the new start loaded the table");
    assert!(
        table.contains(&format!("elements = {{ {} }}", proxy.admin.port())),
        "the new server's admin port: {table}"
    );
    assert!(
        !table.contains(&dead_port.to_string()),
        "the dead server's table was replaced, not kept: {table}"
    );
    eventually(
        &format!("the dead instance's link {dead_link} gone"),
        || !instance_links().contains(&dead_link),
    )
    .await;
    proxy.stop().await;
    assert_eq!(wsedge_table(), None);
    assert_eq!(instance_links(), Vec::<String>::new());
}
