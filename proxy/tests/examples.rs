//! The example functions under `deploy/examples/` (Rust, Node.js `ws`, Python `websockets`),
//! each started by wsedge from the config beside it, echo through the kernel data plane.
//! The Node.js and Python cases need their peers (`node` with `ws`, `python3` with
//! `websockets`; `cargo xtask test` installs them) and fail, saying so, without them.

mod common;

use std::path::Path;

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::{
    Message,
    protocol::{CloseFrame, frame::coding::CloseCode},
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
    config.server.state_dir = state_dir();
    for f in &mut config.functions {
        sandboxed_peers(f, true);
    }
    config
}

async fn echoes_through_wsedge(config: Config) {
    let function = config.functions[0].name.clone();
    let p = start_proxy(config).await;
    let mut ws = connect(p.url("/echo"))
        .await
        .expect("upgrade (cold start included)");
    ws.send(Message::text("héllo")).await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::text("héllo"));
    for size in [0, 125, 126, 65535, 65536, 262144] {
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        ws.send(Message::binary(payload.clone())).await.unwrap();
        assert_eq!(
            recv(&mut ws).await,
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
    while let Some(Ok(msg)) = next_within(&mut ws).await {
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

/// The example in `deploy/examples/echo-node`, unchanged but for how `node` is started:
/// with `NODE_PATH` pointing at the `ws` module `cargo xtask test` installs.
#[tokio::test]
async fn the_node_example_echoes_through_wsedge() {
    require_node_peer();
    let mut config = example_config("echo-node");
    config.functions[0].command = Some(vec![
        "env".into(),
        format!("NODE_PATH={}", node_path()),
        "node".into(),
        "server.js".into(),
    ]);
    echoes_through_wsedge(config).await;
}

#[tokio::test]
async fn the_python_example_echoes_through_wsedge() {
    require_python_peer();
    echoes_through_wsedge(example_config("echo-python")).await;
}
