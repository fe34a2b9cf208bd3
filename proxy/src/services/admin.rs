//! The admin API: `/live`, `/ready`, `/connections`, `/instances`, `/metrics`; with
//! `admin_token_env`, each only for a request bearing the token.

use std::sync::{Arc, atomic::Ordering};

use axum::{
    Json, Router,
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use tracing::info;

use crate::{app::AppState, conn::ConnectionView, instances::InstanceView};

pub fn router(state: Arc<AppState>) -> Router {
    let routes = Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready))
        .route("/connections", get(connections))
        .route("/instances", get(instances))
        .route("/metrics", get(metrics))
        .with_state(state.clone());
    if state.admin_token.is_some() {
        // A layer, not a route layer: unknown paths get 401 too, so an unauthenticated
        // caller learns nothing of what exists.
        routes.layer(middleware::from_fn_with_state(state, require_token))
    } else {
        routes
    }
}

/// Lets a request through only with `Authorization: Bearer <admin token>`; otherwise 401
/// with `WWW-Authenticate: Bearer` and a JSON body like the proxy's other errors.
async fn require_token(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = &state.admin_token else {
        return next.run(request).await;
    };
    let presented = request.headers().get(header::AUTHORIZATION);
    if presented.is_some_and(|value| token.accepts(value.as_bytes())) {
        return next.run(request).await;
    }
    let (challenge, message) = match presented {
        None => (
            "Bearer realm=\"wsedge admin\"",
            "the admin API needs Authorization: Bearer <token>",
        ),
        Some(_) => (
            "Bearer realm=\"wsedge admin\", error=\"invalid_token\"",
            "the admin API token is wrong",
        ),
    };
    info!(path = %request.uri().path(), "admin API request refused: {message}");
    (
        StatusCode::UNAUTHORIZED,
        [
            (header::WWW_AUTHENTICATE, challenge),
            (
                header::HeaderName::from_static("x-wsedge-error-type"),
                "unauthorized",
            ),
        ],
        Json(serde_json::json!({ "error_type": "unauthorized", "message": message })),
    )
        .into_response()
}

async fn ready(State(state): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if state.draining.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

async fn connections(State(state): State<Arc<AppState>>) -> Json<Vec<ConnectionView>> {
    Json(
        state
            .registry
            .snapshot()
            .iter()
            .map(|c| c.view(state.data_plane.live()))
            .collect(),
    )
}

async fn instances(State(state): State<Arc<AppState>>) -> Json<Vec<InstanceView>> {
    Json(state.pools().iter().flat_map(|p| p.views()).collect())
}

async fn metrics(
    State(state): State<Arc<AppState>>,
) -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    let mut gauges = vec![(
        "wsedge_connections_open",
        "Open (upgraded) WebSocket connections.",
        vec![],
        state.registry.len() as u64,
    )];
    for route in state.routes().iter() {
        let crate::routing::Backend::Spawned(pool) = &route.backend else {
            continue;
        };
        let views = pool.views();
        for wanted in ["starting", "ready"] {
            gauges.push((
                "wsedge_instances",
                "Spawned instances by function and state.",
                vec![
                    ("function", route.function.name.clone()),
                    ("state", wanted.to_string()),
                ],
                views.iter().filter(|v| v.state == wanted).count() as u64,
            ));
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(&gauges),
    )
}
