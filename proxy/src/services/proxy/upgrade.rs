//! The handshake phase of a connection: reading and checking the upgrade, admission (Origin,
//! signature), choosing an instance, and its 101; or the error response. A client over its
//! per-IP limit is refused before any of it ([`refuse_over_ip_limit`]).

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};
use tracing::info;

use crate::{
    app::AppState,
    data_plane::kernel::WrittenByHand,
    instances::Lease,
    protocols::{
        auth,
        error_response::HandshakeError,
        handshake::{RequestHead, UpgradeRequest, parse_upgrade, validate_response},
        head::{Head, HeadError, read_head},
        stream::ClientStream,
    },
    registry::{ClientKey, Limits},
    routing::{Assigned, Route},
};

/// Largest response head accepted from an instance.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// How long a client refused before its request was read is read from (and its bytes
/// dropped) before its socket is closed.
const LINGER: Duration = Duration::from_secs(1);

/// A completed upgrade: the instance socket, and what was read past each head.
pub(super) struct Upgraded {
    pub(super) instance: TcpStream,
    pub(super) function: Arc<str>,
    pub(super) instance_addr: Arc<str>,
    /// The instance slot this connection holds (spawned instances), released at its end.
    pub(super) lease: Option<Lease>,
    pub(super) limits: Limits,
    /// The function's `memory_mb` when the connection was accepted, for its bill.
    pub(super) memory_mb: u32,
    /// Bytes the client sent after its request head (pipelined frames).
    pub(super) client_rest: Vec<u8>,
    /// Bytes the instance sent after its 101.
    pub(super) instance_rest: Vec<u8>,
    pub(super) written: WrittenByHand,
}

/// What was decided about a connection before its request was read.
#[derive(Debug, Clone)]
pub(super) struct Admission {
    /// `max_connections` are open already (503).
    pub(super) at_capacity: bool,
    /// The id the connection will have, for `X-Wsedge-Connection-Id`.
    pub(super) connection_id: String,
}

/// Why a handshake ended.
pub(super) enum Failure {
    Respond(HandshakeError),
    /// The client went away; nobody to answer.
    ClientGone,
}

impl From<HandshakeError> for Failure {
    fn from(e: HandshakeError) -> Self {
        Failure::Respond(e)
    }
}

/// Answers a client over `max_connections_per_ip` with 429 as soon as it is accepted: waiting
/// for its request would let it hold a socket and a task per attempt for up to
/// `handshake_timeout_ms`, past the limit meant to bound exactly that. The function is not
/// known yet: the error is counted without one, as a 404 is.
pub(super) async fn refuse_over_ip_limit(
    state: &AppState,
    mut client: ClientStream,
    peer: SocketAddr,
    key: ClientKey,
) {
    let e = HandshakeError::new(
        429,
        "too_many_connections",
        format!("too many open connections from {key}"),
    );
    refuse(state, &mut client, peer, None, &e).await;
    // Its request arrives unread (now or soon): closing a socket with unread bytes sends a
    // reset, which can destroy the 429 before the client has read it. Read and drop what it
    // sends until it closes, briefly.
    let mut sink = [0u8; 1024];
    let _ = timeout(LINGER, async {
        while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Answers a refused handshake: counts and logs it, writes its response and the FIN.
pub(super) async fn refuse(
    state: &AppState,
    client: &mut ClientStream,
    peer: SocketAddr,
    function: Option<&str>,
    e: &HandshakeError,
) {
    let function = function.unwrap_or_default();
    state
        .metrics
        .handshake_error(function, e.status, e.error_type);
    info!(client = %peer, function, status = e.status, error_type = e.error_type, "handshake refused: {}", e.message);
    let _ = timeout(Duration::from_secs(1), client.write_all(&e.to_response())).await;
    let _ = client.shutdown().await;
}

/// Reads a connection's first request head, within `handshake_timeout_ms`.
pub(super) async fn read_request(
    state: &AppState,
    client: &mut ClientStream,
) -> Result<Head, Failure> {
    let server = &state.config.server;
    match timeout(
        Duration::from_millis(server.handshake_timeout_ms),
        read_head(client, server.max_header_bytes),
    )
    .await
    {
        Err(_) => Err(HandshakeError::handshake_timeout().into()),
        Ok(Err(HeadError::TooLarge(limit))) => Err(HandshakeError::headers_too_large(limit).into()),
        Ok(Err(HeadError::Closed | HeadError::Io(_))) => Err(Failure::ClientGone),
        Ok(Ok(head)) => Ok(head),
    }
}

pub(super) async fn upgrade(
    state: &AppState,
    client: &mut ClientStream,
    peer: SocketAddr,
    head: Head,
    admission: Admission,
    function: &mut Option<Arc<str>>,
) -> Result<Upgraded, Failure> {
    let request = parse_upgrade(&head.head)?;
    // This connection keeps the functions as they are now, whatever a reload does meanwhile.
    let routes = state.routes();
    let route = routes
        .find(&request.host, &request.path)
        .ok_or_else(|| HandshakeError::no_route(&request.host, &request.path))?;
    *function = Some(route.name.clone());
    if state.draining.load(Ordering::Relaxed) {
        return Err(HandshakeError::draining().into());
    }
    if admission.at_capacity {
        return Err(HandshakeError::at_capacity(state.config.server.max_connections).into());
    }
    admit(route, &request)?;
    let assigned = route.assign().await?;
    let forwarded = request.forwarded(peer.ip(), client.tls(), &admission.connection_id);
    let (instance, response) = connect_instance(state, &assigned, &request, &forwarded).await?;
    client
        .write_all(&response.head)
        .await
        .map_err(|_| Failure::ClientGone)?;
    Ok(Upgraded {
        instance,
        function: route.name.clone(),
        instance_addr: assigned.instance,
        lease: assigned.lease,
        limits: Limits {
            idle_timeout_s: route.function.idle_timeout_s,
            execution_timeout_s: route.function.execution_timeout_s,
            max_message_bytes: route.function.limits.max_message_bytes,
            rate: route.function.limits.rate(),
        },
        memory_mb: route.function.memory_mb,
        client_rest: head.rest,
        instance_rest: response.rest,
        written: WrittenByHand {
            to_client: response.head.len() as u64,
            to_instance: forwarded.len() as u64,
        },
    })
}

/// The checks between routing and starting an instance, for upgrades and plain HTTP alike:
/// Origin, signature.
pub(super) fn admit(route: &Route, request: &RequestHead) -> Result<(), HandshakeError> {
    let allowed = &route.function.allowed_origins;
    if let Some(origin) = request.header("origin")
        && !allowed.is_empty()
    {
        let origin = String::from_utf8_lossy(origin);
        if !allowed
            .iter()
            .any(|a| a.eq_ignore_ascii_case(origin.trim()))
        {
            return Err(HandshakeError::new(
                403,
                "origin_refused",
                format!("origin {origin:?} may not connect to this function"),
            ));
        }
    }
    if let Some(key) = &route.hmac_key {
        auth::verify(request, key, SystemTime::now())?;
    }
    Ok(())
}

/// Connects to the instance, sends the upgrade and reads a valid 101 within the timeout.
async fn connect_instance(
    state: &AppState,
    assigned: &Assigned,
    request: &UpgradeRequest,
    forwarded: &[u8],
) -> Result<(TcpStream, Head), HandshakeError> {
    let addr = &assigned.instance;
    let exchange = async {
        let mut instance = assigned.target.connect().await.map_err(|e| {
            HandshakeError::instance_unreachable(format!("connecting to {addr}: {e}"))
        })?;
        let _ = instance.set_nodelay(true);
        instance.write_all(forwarded).await.map_err(|e| {
            HandshakeError::instance_unreachable(format!("sending the upgrade: {e}"))
        })?;
        let response = read_head(&mut instance, MAX_RESPONSE_HEAD)
            .await
            .map_err(|e| HandshakeError::bad_gateway(format!("instance response: {e}")))?;
        validate_response(&response.head, request)?;
        Ok((instance, response))
    };
    let limit = Duration::from_millis(state.config.server.instance_timeout_ms);
    timeout(limit, exchange).await.map_err(|_| {
        HandshakeError::gateway_timeout(format!("no 101 from {addr} within {limit:?}"))
    })?
}
