//! The admin API: `/live`, `/ready`, `/connections`.

use std::sync::{Arc, atomic::Ordering};

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};

use crate::{registry::ConnectionView, server::AppState};

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready))
        .route("/connections", get(connections))
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
            .map(|c| c.view(&state.data_plane))
            .collect(),
    )
}
