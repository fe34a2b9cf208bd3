//! The example functions under `deploy/examples/` (Rust, Go `gorilla/websocket`, Node.js `ws`,
//! Python `websockets`), each started by wsedge from the config beside it, echo through the
//! kernel data plane. The Go, Node.js and Python cases need their toolchains and libraries
//! (`cargo xtask test` installs them) and fail, saying so, without them.

mod common;

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::{
    Message,
    protocol::{CloseFrame, frame::coding::CloseCode},
};
use wsedge::Config;

/// Echoes text and every frame-length boundary up to 256 KiB, then closes with `close_code`
/// and expects the function to echo that code.
async fn echoes_through_wsedge(config: Config, close_code: CloseCode) {
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
        code: close_code,
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
    assert_eq!(echoed_close, Some(close_code));
    drop(ws);
    p.wait_no_connections().await;
    p.stop().await;
}

#[tokio::test]
async fn the_rust_example_echoes_through_wsedge() {
    let mut config = example_config("echo-rust");
    // The config names the release build; the tests use the debug build of the same crate.
    config.functions[0].command = Some(vec![echo_fn().display().to_string()]);
    echoes_through_wsedge(config, CloseCode::Normal).await;
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
    echoes_through_wsedge(config, CloseCode::Normal).await;
}

#[tokio::test]
async fn the_python_example_echoes_through_wsedge() {
    require_python_peer();
    echoes_through_wsedge(example_config("echo-python"), CloseCode::Normal).await;
}

/// The Go example, built by the harness (the config names `./echo-go`, which a user builds
/// beside it). An application close code goes to the function and comes back unchanged.
#[tokio::test]
async fn the_go_example_echoes_through_wsedge() {
    let mut config = example_config("echo-go");
    config.functions[0].command = Some(vec![go_echo_fn().display().to_string()]);
    echoes_through_wsedge(config, CloseCode::Library(4000)).await;
}

/// The platforms' HTTP trigger: a plain GET on the WebSocket route reaches the same Go
/// function, on the same port, and gets its body.
#[tokio::test]
async fn the_go_example_answers_plain_http_on_the_same_route() {
    let mut config = example_config("echo-go");
    config.functions[0].command = Some(vec![go_echo_fn().display().to_string()]);
    let p = start_proxy(config).await;
    let (status, body) = http_get(p.addr, "/echo").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("echo-go: open a WebSocket"), "{body}");
    // And the upgrade still works on the same route after the plain request.
    let mut ws = connect(p.url("/echo")).await.expect("upgrade");
    ws.send(Message::text("after GET")).await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::text("after GET"));
    drop(ws);
    p.wait_no_connections().await;
    p.stop().await;
}
