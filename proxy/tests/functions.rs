//! Functions with spawned instances on the kernel data plane: cold start, one namespace per
//! instance (all on port 9000), concurrency slots, 429 at `max_instances`, crashes, start
//! failures (500 / 502 / 504) and scale to zero. Instances are the real example functions.

mod common;

use std::{collections::HashSet, time::Duration};

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::{Message, protocol::frame::coding::CloseCode};

fn echo_function(extra: &str) -> String {
    format!(
        "name = \"echo\"\nroute = \"/echo\"\ncommand = [{:?}]\n{extra}",
        echo_fn().display().to_string()
    )
}

async fn proxy(plane: &str, function: &str) -> Proxy {
    start_proxy(function_config(plane, "", function)).await
}

async fn echo_once(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    assert_eq!(recv(ws).await, Message::text(text));
}

async fn open(p: &Proxy) -> Ws {
    let mut ws = connect(p.url("/echo")).await.expect("upgrade");
    echo_once(&mut ws, "hello").await;
    ws
}

fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// True while any process on the host is in the network namespace with this inode.
fn namespace_in_use(inode: u64) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        std::fs::read_link(p.path().join("ns/net"))
            .is_ok_and(|link| link.to_string_lossy() == format!("net:[{inode}]"))
    })
}

#[tokio::test]
async fn first_connection_cold_starts_an_instance_in_its_own_namespace_and_echoes() {
    let p = proxy("kernel", &echo_function("keep_warm_s = 60\n")).await;
    assert!(
        p.instances().await.is_empty(),
        "no instance before a connection"
    );
    let mut ws = open(&p).await;
    let instances = p.instances().await;
    assert_eq!(instances.len(), 1, "{instances:?}");
    let i = &instances[0];
    assert_eq!(
        (i.id.as_str(), i.state.as_str(), i.connections),
        ("echo-1", "ready", 1)
    );
    assert_eq!(i.address, "127.0.0.1:9000");
    let own = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert_ne!(
        Some(own.to_string_lossy().into_owned()),
        i.netns.map(|n| format!("net:[{n}]"))
    );
    let conns = p.connections().await;
    assert_eq!(
        (conns[0].instance.as_str(), conns[0].data_plane.as_str()),
        ("echo-1", "kernel-zero-hop")
    );
    for size in [0, 1, 125, 126, 65535, 65536, 262144] {
        let payload = vec![0xA5u8; size];
        ws.send(Message::binary(payload.clone())).await.unwrap();
        assert_eq!(recv(&mut ws).await, Message::binary(payload));
    }
    ws.close(None).await.unwrap();
    read_to_end_of(&mut ws).await;
    drop(ws);
    p.wait_no_connections().await;
    let metrics = p.metrics().await;
    assert_eq!(
        metric_value(&metrics, "wsedge_instance_starts_total{function=\"echo\"}"),
        Some(1),
        "{metrics}"
    );
    p.assert_one_ended_with(200, "the client closed normally")
        .await;
    let warm = p.instances().await;
    assert_eq!(
        (warm.len(), warm[0].connections),
        (1, 0),
        "kept warm: {warm:?}"
    );
    p.stop().await;
    assert!(
        !process_exists(i.pid),
        "stopping wsedge stops its instances"
    );
}

#[tokio::test]
async fn with_concurrency_1_each_connection_gets_an_instance_on_port_9000_until_429() {
    let p = proxy(
        "kernel",
        &echo_function("instance_concurrency = 1\nmax_instances = 3\n"),
    )
    .await;
    let mut open_ws = Vec::new();
    for _ in 0..3 {
        open_ws.push(open(&p).await);
    }
    let instances = p.instances().await;
    assert_eq!(instances.len(), 3, "{instances:?}");
    assert!(
        instances
            .iter()
            .all(|i| i.address == "127.0.0.1:9000" && i.connections == 1)
    );
    let namespaces: HashSet<_> = instances.iter().map(|i| i.netns.expect("netns")).collect();
    assert_eq!(namespaces.len(), 3, "three namespaces: {instances:?}");
    let (status, error_type, _) = exchange(p.addr, &upgrade_request("/echo", "")).await;
    assert_eq!((status, error_type.as_str()), (429, "function_busy"));
    for ws in &mut open_ws {
        echo_once(ws, "still served").await;
    }
    let metrics = p.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "wsedge_handshake_errors_total{function=\"echo\",status=\"429\",error_type=\"function_busy\"}"
        ),
        Some(1),
        "{metrics}"
    );
    // A slot freed by a closing connection is used again: no fourth instance.
    open_ws.pop().unwrap().close(None).await.unwrap();
    let mut reused = None;
    for _ in 0..100 {
        if let Ok(ws) = connect(p.url("/echo")).await {
            reused = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    echo_once(reused.as_mut().expect("a freed slot is reused"), "again").await;
    assert_eq!(p.instances().await.len(), 3);
    p.stop().await;
}

#[tokio::test]
async fn with_concurrency_2_two_connections_share_one_instance() {
    let p = proxy("kernel", &echo_function("instance_concurrency = 2\n")).await;
    let (a, b) = tokio::join!(open(&p), open(&p));
    let instances = p.instances().await;
    assert_eq!(instances.len(), 1, "{instances:?}");
    assert_eq!(instances[0].connections, 2);
    let conns = p.connections().await;
    assert!(conns.iter().all(|c| c.instance == instances[0].id));
    drop((a, b));
    p.stop().await;
}

async fn killed_instance_closes_the_client_with_1011(plane: &str) {
    let p = proxy(plane, &echo_function("")).await;
    let mut ws = open(&p).await;
    let victim = p.instances().await.remove(0);
    // SAFETY: plain syscall on the instance process this test's proxy started.
    unsafe { libc::kill(victim.pid as i32, libc::SIGKILL) };
    let close = next_within(&mut ws)
        .await
        .expect("a frame: the client hears of the crash")
        .expect("a close frame, not a reset");
    match close {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Error),
        other => panic!("expected close 1011, got {other:?}"),
    }
    p.wait_no_connections().await;
    assert!(
        p.instances().await.iter().all(|i| i.id != victim.id),
        "a crashed instance is never routed to again"
    );
    let mut ws = open(&p).await;
    assert_eq!(p.connections().await[0].instance, "echo-2");
    echo_once(&mut ws, "after the crash").await;
    let metrics = p.metrics().await;
    assert_eq!(
        metric_value(&metrics, "wsedge_instance_crashes_total{function=\"echo\"}"),
        Some(1),
        "{metrics}"
    );
    p.assert_one_ended_with(439, "the instance was killed")
        .await;
    p.stop().await;
}

#[tokio::test]
async fn an_instance_killed_mid_stream_closes_its_client_with_1011_on_the_kernel_path() {
    killed_instance_closes_the_client_with_1011("kernel").await;
}

#[tokio::test]
async fn an_instance_killed_mid_stream_closes_its_client_with_1011_on_the_relay() {
    killed_instance_closes_the_client_with_1011("userspace").await;
}

#[tokio::test]
async fn instances_that_fail_to_start_get_500_502_or_504_and_leave_nothing_running() {
    let cases = [
        (
            r#"command = ["./no-such-function"]"#,
            500,
            "instance_start_failed",
        ),
        (
            r#"command = ["sh", "-c", "exit 3"]"#,
            502,
            "instance_crashed",
        ),
        (r#"command = ["sleep", "30"]"#, 504, "instance_timeout"),
        (
            r#"command = ["python3", "-m", "http.server", "9000"]"#,
            502,
            "bad_instance_response",
        ),
    ];
    for (command, status, error_type) in cases {
        let function =
            format!("name = \"f\"\nroute = \"/echo\"\n{command}\nstart_timeout_ms = 3000\n");
        let p = proxy("kernel", &function).await;
        let (got, got_type, body) = exchange(p.addr, &upgrade_request("/echo", "")).await;
        assert_eq!(
            (got, got_type.as_str()),
            (status, error_type),
            "{command}: {body}"
        );
        if status != 502 || error_type == "instance_crashed" {
            assert!(
                p.instances().await.is_empty(),
                "{command}: failed starts are gone"
            );
        }
        p.stop().await;
    }
}

#[tokio::test]
async fn an_idle_instance_scales_to_zero_with_its_process_and_namespace() {
    let p = proxy("kernel", &echo_function("keep_warm_s = 1\n")).await;
    let mut ws = open(&p).await;
    let instance = p.instances().await.remove(0);
    let netns = instance.netns.expect("netns isolation as root");
    assert!(namespace_in_use(netns));
    ws.close(None).await.unwrap();
    read_to_end_of(&mut ws).await;
    drop(ws);
    let mut gone = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if p.instances().await.is_empty() && !process_exists(instance.pid) {
            gone = true;
            break;
        }
    }
    assert!(gone, "instance still there: {:?}", p.instances().await);
    assert!(
        !namespace_in_use(netns),
        "no process is left in the namespace"
    );
    // The next connection cold-starts a new instance.
    let _ws = open(&p).await;
    assert_eq!(p.instances().await[0].id, "echo-2");
    p.stop().await;
}

#[tokio::test]
async fn with_isolation_none_instances_share_the_host_on_distinct_ports() {
    let p = proxy("kernel", &echo_function("isolation = \"none\"\n")).await;
    let (_a, _b) = tokio::join!(open(&p), open(&p));
    let instances = p.instances().await;
    assert_eq!(instances.len(), 2);
    assert!(instances.iter().all(|i| i.netns.is_none()));
    let ports: HashSet<_> = instances.iter().map(|i| i.address.clone()).collect();
    assert_eq!(ports.len(), 2, "{instances:?}");
    p.stop().await;
}

#[tokio::test]
async fn refused_origins_get_403_and_the_per_ip_limit_429() {
    let echo = start_echo().await;
    let config = function_config(
        "kernel",
        "max_connections_per_ip = 1",
        &format!(
            "name = \"echo\"\nroute = \"/echo\"\nupstreams = [\"{echo}\"]\n\
             allowed_origins = [\"https://app.example\"]\n"
        ),
    );
    let p = start_proxy(config).await;
    let (status, error_type, _) = exchange(
        p.addr,
        &upgrade_request("/echo", "Origin: https://evil.example\r\n"),
    )
    .await;
    assert_eq!((status, error_type.as_str()), (403, "origin_refused"));
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            p.url("/echo"),
        )
        .unwrap();
    request
        .headers_mut()
        .insert("Origin", "https://APP.example".parse().unwrap());
    let mut held = connect(request).await.expect("allowed origin upgrades");
    echo_once(&mut held, "first").await;
    let (status, error_type, _) = exchange(p.addr, &upgrade_request("/echo", "")).await;
    assert_eq!((status, error_type.as_str()), (429, "too_many_connections"));
    held.close(None).await.unwrap();
    read_to_end_of(&mut held).await;
    drop(held);
    p.wait_no_connections().await;
    let mut again = connect(p.url("/echo"))
        .await
        .expect("the slot is free again");
    echo_once(&mut again, "second").await;
    p.stop().await;
}
