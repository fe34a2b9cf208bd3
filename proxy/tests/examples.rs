//! The example functions under `deploy/examples/` (Rust, Node.js `ws`, Python `websockets`),
//! each started by wsedge from the config beside it, echo through the kernel data plane.
//! Node.js and Python run when their interpreters are on PATH (`cargo xtask test` installs
//! `ws` and `websockets`).

mod common;

use std::{path::Path, time::Duration};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::{
    connect_async,
    tungstenite::{
        Message,
        protocol::{CloseFrame, frame::coding::CloseCode},
    },
};
use wsedge::{Config, config::DataPlaneMode};

fn example_config(dir: &str) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(dir)
        .join("wsedge.toml");
    let mut config = Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    config.server.data_plane = DataPlaneMode::Kernel;
    config
}

fn on_path(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

async fn echoes_through_wsedge(config: Config) {
    let function = config.functions[0].name.clone();
    let p = start_proxy(config).await;
    let (mut ws, _) = tokio::time::timeout(Duration::from_secs(20), connect_async(p.url("/echo")))
        .await
        .expect("cold start in time")
        .expect("upgrade");
    ws.send(Message::text("héllo")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("héllo"));
    for size in [0, 125, 126, 65535, 65536, 262144] {
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        ws.send(Message::binary(payload.clone())).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::binary(payload),
            "{size} bytes"
        );
    }
    let conns = p.connections().await;
    assert_eq!(conns[0].function, function);
    // Spawned on this host: the instance socket joins the splice.
    assert_eq!(conns[0].data_plane, "kernel-zero-hop");
    assert_eq!(conns[0].instance, format!("{function}-1"));
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    }))
    .await
    .unwrap();
    let mut echoed_close = None;
    while let Some(Ok(msg)) = ws.next().await {
        if let Message::Close(frame) = msg {
            echoed_close = frame.map(|f| f.code);
        }
    }
    assert_eq!(echoed_close, Some(CloseCode::Normal));
    drop(ws);
    p.wait_no_connections().await;
    p.stop().await;
}

#[tokio::test]
async fn the_rust_example_echoes_through_wsedge() {
    let mut config = example_config("echo-rust");
    // The config names the release build; the tests use the debug build of the same crate.
    config.functions[0].command = Some(vec![echo_fn().display().to_string()]);
    echoes_through_wsedge(config).await;
}

/// Runs the example in `dir` when `interpreter` is installed.
async fn run_if_installed(interpreter: &str, dir: &str) {
    if !on_path(interpreter) {
        eprintln!("{interpreter} is not installed: the {dir} example is not run");
        return;
    }
    echoes_through_wsedge(example_config(dir)).await;
}

#[tokio::test]
async fn the_node_example_echoes_through_wsedge() {
    run_if_installed("node", "echo-node").await;
}

#[tokio::test]
async fn the_python_example_echoes_through_wsedge() {
    run_if_installed("python3", "echo-python").await;
}
