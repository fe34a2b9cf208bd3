//! `admin_token_env`: every admin API route answers only a request bearing the token (401
//! with `WWW-Authenticate: Bearer` and a JSON body otherwise), and wsedge does not start when
//! the variable is unset or empty.

mod common;

use std::net::SocketAddr;

use common::*;
use wsedge::{Server, config::DataPlaneMode, server::StartError};

const TOKEN_ENV: &str = "WSEDGE_TEST_ADMIN_TOKEN";
const TOKEN: &str = "admin-test-token-5e0b";
const EMPTY_ENV: &str = "WSEDGE_TEST_ADMIN_TOKEN_EMPTY";
const UNSET_ENV: &str = "WSEDGE_TEST_ADMIN_TOKEN_UNSET";

fn set_env() {
    static SET: std::sync::Once = std::sync::Once::new();
    // SAFETY: once, before any test of this binary reads these variables.
    SET.call_once(|| unsafe {
        std::env::set_var(TOKEN_ENV, TOKEN);
        std::env::set_var(EMPTY_ENV, "");
        std::env::remove_var(UNSET_ENV);
    });
}

/// `GET path` with an optional `Authorization` value: (status, head, body).
async fn get(addr: SocketAddr, path: &str, authorization: Option<&str>) -> (u16, String, String) {
    let authorization = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    http_get_with(addr, path, &authorization).await
}

/// Asserts a 401 with the Bearer challenge and the JSON error body.
fn assert_unauthorized((status, head, body): (u16, String, String), path: &str) -> String {
    assert_eq!(status, 401, "{path}: {head}");
    let challenge = header_value(&head, "www-authenticate").unwrap_or_default();
    assert!(challenge.starts_with("Bearer "), "{path}: {head}");
    assert_eq!(
        header_value(&head, "x-wsedge-error-type").as_deref(),
        Some("unauthorized")
    );
    let json: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(json["error_type"], "unauthorized", "{body}");
    assert!(
        json["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(!body.contains(TOKEN), "the token is never echoed");
    challenge
}

const ROUTES: [&str; 5] = ["/live", "/ready", "/connections", "/instances", "/metrics"];

#[tokio::test]
async fn every_admin_route_needs_the_bearer_token() {
    set_env();
    let echo = start_echo().await;
    let p = start_proxy(config(
        DataPlaneMode::Userspace,
        echo,
        &format!("admin_token_env = \"{TOKEN_ENV}\""),
    ))
    .await;
    let mut ws = open(&p).await;
    echo_once(&mut ws, "open while the admin API is asked").await;
    // The ledger's and the trace stream's too (the latter never ends: asked with the token
    // only in its own tests).
    let guarded = ["/billing", "/billing/instances", "/trace", "/no-such-route"];
    for path in ROUTES.into_iter().chain(guarded) {
        let challenge = assert_unauthorized(get(p.admin, path, None).await, path);
        assert!(
            !challenge.contains("error="),
            "no token, no error: {challenge}"
        );
        for wrong in [
            format!("Bearer {TOKEN}x"),
            format!("Bearer {}", &TOKEN[1..]),
            "Bearer ".to_string(),
            format!("Basic {TOKEN}"),
            TOKEN.to_string(),
        ] {
            let challenge = assert_unauthorized(get(p.admin, path, Some(&wrong)).await, path);
            assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
        }
    }
    let right = format!("Bearer {TOKEN}");
    for path in ROUTES {
        let (status, head, _) = get(p.admin, path, Some(&right)).await;
        assert_eq!(status, 200, "{path}: {head}");
    }
    let (_, _, body) = get(p.admin, "/connections", Some(&right)).await;
    let rows: Vec<wsedge::registry::ConnectionView> = serde_json::from_str(&body).unwrap();
    assert_eq!(rows.len(), 1, "{body}");
    let (status, _, _) = get(p.admin, "/no-such-route", Some(&right)).await;
    assert_eq!(
        status, 404,
        "with the token, an unknown route is just not found"
    );
    drop(ws);
    p.stop().await;
}

#[tokio::test]
async fn wsedge_does_not_start_when_the_token_variable_is_unset_or_empty() {
    set_env();
    let echo = start_echo().await;
    for (var, why) in [(UNSET_ENV, "is not set"), (EMPTY_ENV, "is empty")] {
        let config = config(
            DataPlaneMode::Userspace,
            echo,
            &format!("admin_token_env = \"{var}\""),
        );
        let err = match Server::bind(config).await {
            Ok(_) => panic!("wsedge started with ${var} {why}"),
            Err(e) => e,
        };
        assert!(matches!(err, StartError::AdminToken(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("server.admin_token_env: ${var} {why}")
        );
    }
}

#[tokio::test]
async fn a_spawned_instance_does_not_get_the_admin_token_in_its_environment() {
    set_env();
    let dir = instance_dir();
    let seen = dir.path().join("seen");
    let command = format!(
        "printf '%s %s' \"${{{TOKEN_ENV}-unset}}\" \"$PORT\" > {}; exec {}",
        seen.display(),
        echo_fn().display()
    );
    // The instance writes what it saw into `dir`, its working directory: the one place
    // of the host it may write.
    let mut config = function_config(
        "kernel",
        &format!("admin_token_env = \"{TOKEN_ENV}\""),
        &format!("name = \"echo\"\nroute = \"/echo\"\ncommand = [\"sh\", \"-c\", {command:?}]\n"),
    );
    config.base_dir = dir.path().into();
    let p = start_proxy(config).await;
    let head = raw_upgrade(p.addr, &upgrade_request("/echo", "")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(std::fs::read_to_string(&seen).unwrap(), "unset 9000");
    p.stop().await;
}
