//! The admin API: `/live`, `/ready`, `/connections`, `/instances`, `/metrics`, `/billing`,
//! `/billing/instances`, `/trace`; with `admin_token_env`, each only for a request bearing the token.

use std::sync::{Arc, atomic::Ordering};

use axum::{
    Json, Router,
    extract::{Query, Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::encoding::prometheus_text;
use serde::Deserialize;
use tracing::{info, warn};

use crate::{
    app::AppState,
    conn::ConnectionView,
    instances::InstanceView,
    ledger::{Filter, InstanceBill, LedgerRow, Reader, parse_since},
    metrics::{InstanceCount, Scrape},
};

pub fn router(state: Arc<AppState>) -> Router {
    let routes = Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready))
        .route("/connections", get(connections))
        .route("/instances", get(instances))
        .route("/metrics", get(metrics))
        .route("/billing", get(billing))
        .route("/billing/instances", get(billing_instances))
        .route("/trace", get(super::trace::stream))
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

/// `?since=&function=` of the billing endpoints.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BillingQuery {
    since: Option<String>,
    function: Option<String>,
}

async fn billing(
    State(state): State<Arc<AppState>>,
    Query(query): Query<BillingQuery>,
) -> Result<Json<Vec<LedgerRow>>, Response> {
    read_ledger(&state, query, |reader, filter| reader.rows(filter)).await
}

async fn billing_instances(
    State(state): State<Arc<AppState>>,
    Query(query): Query<BillingQuery>,
) -> Result<Json<Vec<InstanceBill>>, Response> {
    read_ledger(&state, query, |reader, filter| reader.instances(filter)).await
}

/// How long a billing request waits for the ledger writer, so the answer includes every
/// connection that ended before the request; past it, the answer is what is on disk.
const BILLING_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

async fn read_ledger<T: Send + 'static>(
    state: &AppState,
    query: BillingQuery,
    read: impl FnOnce(&Reader, &Filter) -> rusqlite::Result<T> + Send + 'static,
) -> Result<Json<T>, Response> {
    let since = match query.since.as_deref().map(parse_since).transpose() {
        Ok(since) => since,
        Err(e) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &e.to_string(),
            ));
        }
    };
    let filter = Filter {
        since,
        function: query.function,
    };
    if let Err(e) = state.ledger.flush(BILLING_FLUSH).await {
        warn!(error = %e, "billing answered from the ledger as it is on disk");
    }
    let dir = state.config.state_dir();
    let read = tokio::task::spawn_blocking(move || {
        let reader = Reader::open(&dir).map_err(|e| e.to_string())?;
        read(&reader, &filter).map_err(|e| e.to_string())
    })
    .await;
    match read {
        Ok(Ok(rows)) => Ok(Json(rows)),
        Ok(Err(message)) => {
            warn!(error = %message, "billing: cannot read the ledger");
            Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ledger_unavailable",
                &message,
            ))
        }
        Err(e) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &e.to_string(),
        )),
    }
}

/// An error answer shaped like the proxy's others: JSON and `X-Wsedge-Error-Type`.
fn error(status: StatusCode, error_type: &'static str, message: &str) -> Response {
    (
        status,
        [(
            header::HeaderName::from_static("x-wsedge-error-type"),
            error_type,
        )],
        Json(serde_json::json!({ "error_type": error_type, "message": message })),
    )
        .into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let routes = state.routes();
    let mut instances = Vec::new();
    for route in routes.iter() {
        let crate::routing::Backend::Spawned(pool) = &route.backend else {
            continue;
        };
        let views = pool.views();
        for wanted in ["starting", "ready"] {
            instances.push(InstanceCount {
                function: route.function.name.clone(),
                state: wanted,
                count: views.iter().filter(|v| v.state == wanted).count() as u64,
            });
        }
    }
    let scrape = Scrape {
        connections: &state.registry,
        live: state.data_plane.live(),
        functions: routes.iter().map(|r| r.name.clone()).collect(),
        instances,
        programs: state.bpf_stats.programs(&state.data_plane),
    };
    (
        [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
        state.metrics.encode(scrape),
    )
}
