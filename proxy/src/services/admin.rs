//! The admin API: `/live`, `/ready`, `/connections`, `/instances`, `/metrics`.

use std::sync::{Arc, atomic::Ordering};

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};

use crate::{app::AppState, conn::ConnectionView, instances::InstanceView};

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready))
        .route("/connections", get(connections))
        .route("/instances", get(instances))
        .route("/metrics", get(metrics))
        .with_state(state)
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
