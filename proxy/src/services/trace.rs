//! `GET /trace?function=F`: the data-plane events as they happen, one JSON object per line
//! (newline-delimited JSON), for `wsedge trace`. The response never ends by itself; the
//! kernel's trace points are on while at least one such response is open.

use std::{sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{Query, State},
    http::header,
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use crate::{
    app::AppState,
    tracer::{Subscription, TraceEvent},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceQuery {
    /// Only this function's events.
    function: Option<String>,
}

/// An empty line this often while nothing happens: a listener that went away is noticed
/// (and the trace points switched off) at the next write, not at the next event.
const HEARTBEAT: Duration = Duration::from_secs(2);

pub async fn stream(
    State(state): State<Arc<AppState>>,
    Query(query): Query<TraceQuery>,
) -> Response {
    let listener = Listener {
        subscription: state.tracer.subscribe(),
        function: query.function,
    };
    let lines = futures_util::stream::unfold(listener, |mut listener| async move {
        let line = listener.next_line().await;
        Some((Ok::<_, std::convert::Infallible>(line), listener))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

struct Listener {
    subscription: Subscription,
    function: Option<String>,
}

impl Listener {
    /// The next line to write: an event of the wanted function, a `lost` notice, or a
    /// heartbeat.
    async fn next_line(&mut self) -> Bytes {
        loop {
            let received = tokio::time::timeout(HEARTBEAT, self.subscription.receiver.recv()).await;
            let event = match received {
                Err(_) => return Bytes::from_static(b"\n"),
                Ok(Ok(event)) => event,
                Ok(Err(RecvError::Lagged(n))) => Arc::new(TraceEvent::lost("proxy", n)),
                // The tracer lives as long as the server.
                Ok(Err(RecvError::Closed)) => return Bytes::from_static(b"\n"),
            };
            let wanted = match &self.function {
                Some(f) => event.function == *f || event.function.is_empty(),
                None => true,
            };
            if wanted {
                let mut line = serde_json::to_vec(&*event).unwrap_or_default();
                line.push(b'\n');
                return Bytes::from(line);
            }
        }
    }
}
