//! Plain HTTP on a function's route: a connection whose first request does not ask for a
//! WebSocket is served by hyper from its first byte (the head wsedge already read is put
//! back in front, [`Rewound`]), keep-alive, request by request.
//!
//! Each request is routed, checked (Origin, signature) and admitted on its own, exactly as an
//! upgrade is: it takes a place among `max_connections` and an instance slot (so cold start,
//! `instance_concurrency`, `max_instances` and scale-to-zero count it as they count a
//! WebSocket) for as long as it is in flight, is listed in `/connections`, and is refused with
//! the same JSON errors. It goes to its instance over a fresh HTTP/1.1 connection (hyper's
//! client), both bodies streamed. Once the instance's response head arrives it is one
//! invocation in the ledger (`kind` = `http`), from the moment it was admitted until its
//! response body was sent; refused or failed requests are not billed, as failed upgrades
//! are not.

use std::{
    convert::Infallible,
    error::Error as StdError,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use proxy_common::policy::Ending;
use tokio::time::timeout;
use tracing::{debug, info};

use super::{rewind::Rewound, upgrade::admit};
use crate::{
    app::AppState,
    clock::monotonic_ns,
    conn::{Connection, Direction, NewConnection, PlaneName},
    instances::Lease,
    ledger::{ClosedBy, Finished, Kind},
    protocols::{
        error_response::HandshakeError,
        handshake::{NOT_FORWARDED, RequestHead},
        head::Head,
        stream::ClientStream,
    },
    registry::{ClientSlot, Limits, Registered},
};

type BoxError = Box<dyn StdError + Send + Sync>;
type ClientBody = UnsyncBoxBody<Bytes, BoxError>;

/// Headers that describe one hop, not the message: never passed on (hyper frames bodies on
/// each side itself). `Expect` too: hyper already answered the client's `100-continue`.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "expect",
];

#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("the request body exceeds {0} bytes")]
    TooLarge(u64),
    #[error("the request ended: {0}")]
    Stopped(&'static str),
}

/// Serves a plain HTTP connection until the client closes it, it idles past
/// `handshake_timeout_ms` between requests, or the drain begins (then the request in flight
/// finishes and the connection closes). `client_slot`: its per-IP place, held throughout.
pub(super) async fn serve(
    state: Arc<AppState>,
    client: ClientStream,
    peer: SocketAddr,
    first: Head,
    client_slot: ClientSlot,
) {
    let plane = match &client {
        ClientStream::Plain(_) => PlaneName::Userspace,
        ClientStream::Tls(_) => PlaneName::UserspaceTls,
        ClientStream::Ktls(_) => PlaneName::UserspaceKtls,
    };
    let mut read = first.head;
    read.extend_from_slice(&first.rest);
    let io = TokioIo::new(Rewound::new(read, client));
    let server = &state.config.server;
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // Also the keep-alive idle limit: hyper starts it when it waits for the next head.
        .header_read_timeout(Duration::from_millis(server.handshake_timeout_ms))
        .max_buf_size(server.max_header_bytes.max(8192));
    let service_state = state.clone();
    let service = service_fn(move |request| {
        let state = service_state.clone();
        async move { Ok::<_, Infallible>(handle(state, peer, plane, request).await) }
    });
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let drain = state.drain_started.notified();
    tokio::pin!(drain);
    drain.as_mut().enable();
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = drain => {
            // No new request on this connection; the one in flight, if any, finishes.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        debug!(client = %peer, error = %e, "HTTP connection ended with an error");
    }
    drop(client_slot);
}

/// One request: its instance's response, or wsedge's error response.
async fn handle(
    state: Arc<AppState>,
    peer: SocketAddr,
    plane: PlaneName,
    request: Request<Incoming>,
) -> Response<ClientBody> {
    let mut function = None;
    let mut response = match forward(&state, peer, plane, request, &mut function).await {
        Ok(response) => response,
        Err(e) => {
            let function = function.as_deref().unwrap_or_default();
            state.metrics.http_request(function, e.status);
            info!(client = %peer, function, status = e.status, error_type = e.error_type,
                  "HTTP request refused: {}", e.message);
            error_response(&e)
        }
    };
    if state.draining.load(Ordering::Relaxed) {
        // Tells the client not to send another request on this connection.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The same JSON error a refused upgrade gets (the upgrade's 400 is named for requests here).
fn error_response(e: &HandshakeError) -> Response<ClientBody> {
    let error_type = match e.error_type {
        "malformed_upgrade" => "malformed_request",
        other => other,
    };
    let body = serde_json::json!({ "error_type": error_type, "message": e.message }).to_string();
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert("x-wsedge-error-type", HeaderValue::from_static(error_type));
    response
}

/// Routes, checks and admits `request`, and passes it to an instance.
async fn forward(
    state: &Arc<AppState>,
    peer: SocketAddr,
    plane: PlaneName,
    request: Request<Incoming>,
    function: &mut Option<Arc<str>>,
) -> Result<Response<ClientBody>, HandshakeError> {
    let (parts, body) = request.into_parts();
    let head = request_head(&parts)?;
    let routes = state.routes();
    let route = routes
        .find(&head.host, &head.path)
        .ok_or_else(|| HandshakeError::no_route(&head.host, &head.path))?;
    *function = Some(route.name.clone());
    let server = &state.config.server;
    if state.draining.load(Ordering::Relaxed) {
        return Err(HandshakeError::draining());
    }
    let reservation = state
        .registry
        .reserve(server.max_connections as usize)
        .ok_or_else(|| HandshakeError::at_capacity(server.max_connections))?;
    admit(route, &head)?;
    let max_body = route.function.limits.max_request_body_bytes;
    if body.size_hint().lower() > max_body {
        return Err(HandshakeError::body_too_large(max_body));
    }
    let assigned = route.assign().await?;
    let limits = &route.function.limits;
    let registered = state.registry.register(
        reservation,
        NewConnection {
            tracer: state.tracer.clone(),
            function: route.name.clone(),
            instance: assigned.instance.clone(),
            client: peer,
            plane,
            limits: Limits {
                idle_timeout_s: route.function.idle_timeout_s,
                execution_timeout_s: route.function.execution_timeout_s,
                max_message_bytes: limits.max_message_bytes,
                rate: Default::default(),
            },
        },
    );
    let conn = registered.conn.clone();
    let over_limit = Arc::new(AtomicBool::new(false));
    let upstream = Request::from_parts(
        instance_parts(&parts, &head, peer, plane.tls(), &conn)?,
        RequestBody {
            inner: body,
            conn: conn.clone(),
            limit: max_body,
            seen: 0,
            over_limit: over_limit.clone(),
            stopped: Box::pin(stopped_by_proxy(conn.clone())),
        },
    );
    conn.account(Direction::ClientToInstance, |s| s.messages = 1);
    let addr = &assigned.instance;
    let connect_limit = Duration::from_millis(server.instance_timeout_ms);
    let instance = timeout(connect_limit, assigned.target.connect())
        .await
        .map_err(|_| {
            HandshakeError::gateway_timeout(format!("no connection to {addr} in {connect_limit:?}"))
        })?
        .map_err(|e| HandshakeError::instance_unreachable(format!("connecting to {addr}: {e}")))?;
    let _ = instance.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(instance))
        .await
        .map_err(|e| HandshakeError::instance_unreachable(format!("{addr}: {e}")))?;
    // Ends once the response body is read or dropped (its sender is gone by then).
    tokio::spawn(connection);
    let answered = tokio::select! {
        answered = sender.send_request(upstream) => answered,
        ending = stopped_by_proxy(conn.clone()) => {
            return Err(HandshakeError::gateway_timeout(format!(
                "instance {addr} did not answer: {ending:?}"
            )));
        }
    };
    let response = match answered {
        Ok(response) => response,
        Err(_) if over_limit.load(Ordering::Relaxed) => {
            return Err(HandshakeError::body_too_large(max_body));
        }
        Err(e) => {
            return Err(HandshakeError::bad_gateway(format!(
                "instance {addr} did not answer: {e}"
            )));
        }
    };
    let status = response.status().as_u16();
    conn.account(Direction::InstanceToClient, |s| s.messages = 1);
    super::super::ledger::accepted(state, &conn, route.function.memory_mb, Kind::Http);
    state.metrics.http_request(&route.name, status);
    info!(id = %conn.id, function = %conn.function, instance = %conn.instance, client = %peer,
          method = %parts.method, status, "HTTP request forwarded");
    let (mut response_parts, body) = response.into_parts();
    strip_hop_by_hop(&mut response_parts.headers);
    let invocation = Invocation {
        state: state.clone(),
        status,
        outcome: None,
        _registered: registered,
        _lease: assigned.lease,
    };
    let body = ResponseBody {
        inner: body,
        stopped: Box::pin(stopped_by_proxy(conn.clone())),
        conn,
        invocation,
    };
    Ok(Response::from_parts(response_parts, body.boxed_unsync()))
}

/// The request's head as the checks shared with upgrades see it.
fn request_head(parts: &http::request::Parts) -> Result<RequestHead, HandshakeError> {
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.to_string(), |p| p.as_str().to_string());
    let headers = parts
        .headers
        .iter()
        .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec()))
        .collect();
    RequestHead::new(parts.method.to_string(), target, headers)
}

/// The request the instance gets: the client's, without `wsedge-*` query parameters, its
/// credentials, hop-by-hop headers and forwarding headers of its own; with wsedge's
/// `X-Forwarded-For`, `X-Forwarded-Proto` (`http` or `https`) and `X-Wsedge-Connection-Id`.
fn instance_parts(
    client: &http::request::Parts,
    head: &RequestHead,
    peer: SocketAddr,
    tls: bool,
    conn: &Connection,
) -> Result<http::request::Parts, HandshakeError> {
    let (mut parts, ()) = Request::builder()
        .method(client.method.clone())
        .uri(head.function_target().as_ref())
        .body(())
        .map_err(|e| HandshakeError::malformed(format!("request target: {e}")))?
        .into_parts();
    let mut headers = client.headers.clone();
    strip_hop_by_hop(&mut headers);
    for name in NOT_FORWARDED {
        headers.remove(name);
    }
    let value = |v: String| HeaderValue::from_str(&v).expect("an address or an id is a header");
    headers.insert("x-forwarded-for", value(peer.ip().to_string()));
    let proto = if tls { "https" } else { "http" };
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    headers.insert("x-wsedge-connection-id", value(conn.id.to_string()));
    parts.headers = headers;
    Ok(parts)
}

/// Removes the hop-by-hop headers and those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Resolves when the proxy ends the request for a timer (`idle_timeout_s` without a body
/// byte either way, `execution_timeout_s`); never for the drain, which lets requests in
/// flight finish.
async fn stopped_by_proxy(conn: Arc<Connection>) -> Ending {
    conn.stopped().await;
    match conn.stop_reason() {
        Some(Ending::Shutdown) | None => std::future::pending().await,
        Some(ending) => ending,
    }
}

type Stopped = Pin<Box<dyn Future<Output = Ending> + Send>>;

fn account(conn: &Connection, direction: Direction, bytes: usize) {
    conn.account(direction, |s| {
        s.bytes += bytes as u64;
        s.last_activity_ns = monotonic_ns();
    });
}

/// The client's body on its way to the instance: counted, and cut at the function's
/// `max_request_body_bytes` (then the client gets 413).
struct RequestBody {
    inner: Incoming,
    conn: Arc<Connection>,
    limit: u64,
    seen: u64,
    over_limit: Arc<AtomicBool>,
    stopped: Stopped,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.stopped.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(BodyError::Stopped("by the proxy").into())));
        }
        let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref() {
            this.seen += data.len() as u64;
            if this.seen > this.limit {
                this.over_limit.store(true, Ordering::Relaxed);
                return Poll::Ready(Some(Err(BodyError::TooLarge(this.limit).into())));
            }
            account(&this.conn, Direction::ClientToInstance, data.len());
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The instance's body on its way to the client: counted; its end (or its drop, if the
/// client goes away first) ends the invocation.
struct ResponseBody {
    inner: Incoming,
    conn: Arc<Connection>,
    stopped: Stopped,
    invocation: Invocation,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.invocation.outcome.is_some() {
            return Poll::Ready(None);
        }
        if let Poll::Ready(ending) = this.stopped.as_mut().poll(cx) {
            let status = proxy_common::policy::function_status(
                ending,
                &Default::default(),
                &Default::default(),
            );
            this.invocation.outcome = Some((status, ClosedBy::Proxy));
            return Poll::Ready(Some(Err(BodyError::Stopped("by a timer").into())));
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    account(&this.conn, Direction::InstanceToClient, data.len());
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                // The instance failed mid-body: the client sees the connection cut.
                this.invocation.outcome = Some((502, ClosedBy::Function));
                Poll::Ready(Some(Err(e.into())))
            }
            None => {
                this.invocation.outcome = Some((this.invocation.status, ClosedBy::Function));
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.invocation.outcome.is_some() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What one forwarded request holds until its response body is done: its registry entry
/// (its `max_connections` place) and its instance slot. Dropping it finishes its ledger row.
struct Invocation {
    state: Arc<AppState>,
    /// The instance's status.
    status: u16,
    /// How it ended, once known: the row's status and who ended it. `None` at drop: the
    /// client went away (or the drain window ended) before the body was sent.
    outcome: Option<(u16, ClosedBy)>,
    _registered: Registered,
    _lease: Option<Lease>,
}

impl Drop for Invocation {
    fn drop(&mut self) {
        let conn = &self._registered.conn;
        let (status, closed_by) = self.outcome.unwrap_or_else(|| {
            let by = if self.state.draining.load(Ordering::Relaxed) {
                ClosedBy::Proxy
            } else {
                ClosedBy::Client
            };
            (self.status, by)
        });
        let sides = conn.sides();
        self.state.ledger.finish(Finished {
            id: conn.id.to_string(),
            ended_at: SystemTime::now(),
            status,
            close_code: None,
            closed_by,
            counters: crate::services::ledger::counters(&sides),
            data_plane: conn.plane().as_str(),
        });
        info!(id = %conn.id, status, closed_by = closed_by.as_str(), bytes_in = sides[0].bytes,
              bytes_out = sides[1].bytes, "HTTP request ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("content-type", "text/plain"),
            ("content-length", "3"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["content-length", "content-type"]);
    }
}
