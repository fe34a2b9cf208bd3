//! The WebSocket proxy service: one task per accepted TCP connection, from the upgrade
//! request to the end of the WebSocket.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use proxy_common::{
    maps::FLAG_CLOSE_SEEN,
    policy::{Ending, function_status},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};
use tracing::{debug, info, warn};

use crate::{
    data_plane::{
        DataPlane,
        kernel::{OnEnd, SpliceEnd, WrittenByHand},
        relay::{self, Direction},
        socket::monotonic_ns,
    },
    instances::Lease,
    protocols::{
        auth,
        error_response::HandshakeError,
        frames::FrameCursor,
        handshake::{UpgradeRequest, parse_upgrade, validate_response},
        head::{Head, HeadError, read_head},
    },
    registry::{ClientSlot, Connection, Limits, Registered},
    routing::{Assigned, Route},
    server::AppState,
};

/// Largest response head accepted from an instance.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// A completed upgrade: the instance socket, and what was read past each head.
struct Upgraded {
    instance: TcpStream,
    function: Arc<str>,
    instance_addr: Arc<str>,
    /// The instance slot this connection holds (spawned instances), released at its end.
    lease: Option<Lease>,
    limits: Limits,
    /// Bytes the client sent after its request head (pipelined frames).
    client_rest: Vec<u8>,
    /// Bytes the instance sent after its 101.
    instance_rest: Vec<u8>,
    written: WrittenByHand,
}

/// Why a handshake ended.
enum Failure {
    Respond(HandshakeError),
    /// The client went away; nobody to answer.
    ClientGone,
}

impl From<HandshakeError> for Failure {
    fn from(e: HandshakeError) -> Self {
        Failure::Respond(e)
    }
}

pub async fn serve(state: Arc<AppState>, mut client: TcpStream, peer: SocketAddr) {
    let _ = client.set_nodelay(true);
    let client_slot = state
        .clients
        .admit(peer.ip(), state.config.server.max_connections_per_ip);
    let over_ip_limit = client_slot.is_none();
    let mut function = None;
    // Boxed phases: the handshake's buffers live in their own allocation, freed before the
    // connection's long life starts, instead of sizing this task's future for its whole life.
    let mut upgraded = match Box::pin(upgrade(
        &state,
        &mut client,
        peer,
        over_ip_limit,
        &mut function,
    ))
    .await
    {
        Ok(upgraded) => upgraded,
        Err(Failure::ClientGone) => return,
        Err(Failure::Respond(e)) => {
            return Box::pin(refuse(&state, client, peer, function, e)).await;
        }
    };
    let registered = state.registry.register(
        upgraded.function.clone(),
        upgraded.instance_addr.clone(),
        peer,
        state.data_plane.name(),
        upgraded.limits,
    );
    let conn = registered.conn.clone();
    state.metrics.connection(&conn.function, conn.data_plane);
    info!(id = %conn.id, function = %conn.function, instance = %conn.instance, client = %peer,
          data_plane = conn.data_plane, "connection upgraded");
    if state.draining.load(Ordering::Relaxed) {
        // Upgraded while the drain began: it gets the same 1001 as everyone else.
        conn.request_stop(Ending::Shutdown);
    }
    // What must live exactly as long as the connection: its registry entry, its instance
    // slot and its per-IP count.
    let held = Held {
        _registered: registered,
        _lease: upgraded.lease.take(),
        _client_slot: client_slot,
    };
    Box::pin(carry(state, client, upgraded, conn, held)).await;
}

/// Everything released when a connection ends.
struct Held {
    _registered: Registered,
    _lease: Option<Lease>,
    _client_slot: Option<ClientSlot>,
}

/// Logs how a connection ended, with its function status and final counters.
fn log_end(conn: &Connection, result: std::io::Result<Ending>) {
    // The kernel's final counters were absorbed when the splice ended: only userspace's now.
    let ([inbound, outbound], _) = conn.totals(None);
    match result {
        Ok(ending) => {
            let status = function_status(ending, &inbound, &outbound);
            let code = |s: &proxy_common::SideState| {
                (s.flags & FLAG_CLOSE_SEEN != 0).then_some(s.close_code)
            };
            info!(id = %conn.id, status, client_close = code(&inbound), function_close = code(&outbound),
                  bytes_in = inbound.bytes, bytes_out = outbound.bytes,
                  messages_in = inbound.messages, messages_out = outbound.messages, "connection ended")
        }
        Err(e) => {
            warn!(id = %conn.id, error = %e, bytes_in = inbound.bytes, bytes_out = outbound.bytes,
                        "connection ended abnormally")
        }
    }
}

/// Answers a refused handshake with its status and closes the connection.
async fn refuse(
    state: &AppState,
    mut client: TcpStream,
    peer: SocketAddr,
    function: Option<Arc<str>>,
    e: HandshakeError,
) {
    let function = function.as_deref().unwrap_or_default();
    state
        .metrics
        .handshake_error(function, e.status, e.error_type);
    info!(client = %peer, function, status = e.status, error_type = e.error_type, "handshake refused: {}", e.message);
    let _ = timeout(Duration::from_secs(1), client.write_all(&e.to_response())).await;
    let _ = client.shutdown().await;
}

async fn upgrade(
    state: &AppState,
    client: &mut TcpStream,
    peer: SocketAddr,
    over_ip_limit: bool,
    function: &mut Option<Arc<str>>,
) -> Result<Upgraded, Failure> {
    let server = &state.config.server;
    let head = match timeout(
        Duration::from_millis(server.handshake_timeout_ms),
        read_head(client, server.max_header_bytes),
    )
    .await
    {
        Err(_) => return Err(HandshakeError::handshake_timeout().into()),
        Ok(Err(HeadError::TooLarge(limit))) => {
            return Err(HandshakeError::headers_too_large(limit).into());
        }
        Ok(Err(HeadError::Closed | HeadError::Io(_))) => return Err(Failure::ClientGone),
        Ok(Ok(head)) => head,
    };
    let request = parse_upgrade(&head.head)?;
    let route = state
        .routes
        .find(&request.host, &request.path)
        .ok_or_else(|| HandshakeError::no_route(&request.host, &request.path))?;
    *function = Some(route.name.clone());
    if state.draining.load(Ordering::Relaxed) {
        return Err(HandshakeError::draining().into());
    }
    admit(route, &request, over_ip_limit, peer)?;
    let assigned = route.assign().await?;
    let forwarded = request.forwarded(peer.ip(), false);
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
        },
        client_rest: head.rest,
        instance_rest: response.rest,
        written: WrittenByHand {
            to_client: response.head.len() as u64,
            to_instance: forwarded.len() as u64,
        },
    })
}

/// The checks between routing and starting an instance: per-IP limit, Origin, signature.
fn admit(
    route: &Route,
    request: &UpgradeRequest,
    over_ip_limit: bool,
    peer: SocketAddr,
) -> Result<(), HandshakeError> {
    if over_ip_limit {
        return Err(HandshakeError::new(
            429,
            "too_many_connections",
            format!("too many open connections from {}", peer.ip()),
        ));
    }
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

/// Carries the WebSocket on the chosen data plane. The relay runs in this task until the
/// connection ends; the kernel splice returns at once and finishes from the hang-up watcher,
/// so a spliced connection keeps no task.
async fn carry(
    state: Arc<AppState>,
    client: TcpStream,
    up: Upgraded,
    conn: Arc<Connection>,
    held: Held,
) {
    let handed = Box::pin(hand_over(&state.data_plane, client, up, &conn, &state)).await;
    let (client, up, cursors) = match handed {
        Ok(handed) => handed,
        Err(e) => return log_end(&conn, Err(e)),
    };
    let Upgraded {
        instance, written, ..
    } = up;
    match &state.data_plane {
        DataPlane::Userspace => {
            let result = Box::pin(relay::relay(client, instance, &conn, cursors)).await;
            log_end(&conn, result);
            drop(held);
        }
        DataPlane::Kernel(k) => {
            let spliced = conn.clone();
            let on_end: OnEnd = Box::new(move |end, inbound, outbound| {
                conn.absorb_kernel(inbound, outbound);
                debug!(id = %conn.id, ?end, "splice ended");
                let result = match end {
                    SpliceEnd::Closed => Ok(Ending::Closed),
                    SpliceEnd::InstanceFailed => Ok(Ending::InstanceFailed),
                    SpliceEnd::ByProxy(ending) => Ok(ending),
                    SpliceEnd::Aborted(e) => Err(e),
                };
                log_end(&conn, result);
                drop(held);
            });
            k.start_splice(
                client,
                instance,
                written,
                spliced.limits.max_message_bytes,
                |pair| spliced.set_spliced(pair),
                on_end,
            );
            // A stop asked for before the splice existed is carried out now.
            if let (Some(ending), Some(pair)) = (spliced.stop_reason(), spliced.spliced_pair()) {
                k.stop(pair, ending);
            }
        }
    }
}

/// Forwards, by hand, what either side sent past its handshake head (on the kernel path up
/// to a frame boundary, so the parser starts on a header), accounting it.
async fn hand_over(
    data_plane: &DataPlane,
    mut client: TcpStream,
    mut up: Upgraded,
    conn: &Connection,
    state: &AppState,
) -> std::io::Result<(TcpStream, Upgraded, [FrameCursor; 2])> {
    let mut cursors = [FrameCursor::default(), FrameCursor::default()];
    let kernel = matches!(data_plane, DataPlane::Kernel(_));
    if kernel {
        // The kernel parser must start on a frame header: read the rest of any frame the
        // pipelined bytes ended inside, in userspace, before the splice.
        let limit = Duration::from_millis(state.config.server.handshake_timeout_ms);
        timeout(limit, async {
            complete_frame(
                &mut client,
                &mut up.client_rest,
                &mut cursors[0],
                conn,
                Direction::ClientToInstance,
            )
            .await?;
            complete_frame(
                &mut up.instance,
                &mut up.instance_rest,
                &mut cursors[1],
                conn,
                Direction::InstanceToClient,
            )
            .await
        })
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "partial frame around the handshake",
            )
        })??;
    } else {
        account(
            &mut cursors[0],
            &up.client_rest,
            conn,
            Direction::ClientToInstance,
        )?;
        account(
            &mut cursors[1],
            &up.instance_rest,
            conn,
            Direction::InstanceToClient,
        )?;
    }
    up.instance.write_all(&up.client_rest).await?;
    client.write_all(&up.instance_rest).await?;
    up.written.to_instance += up.client_rest.len() as u64;
    up.written.to_client += up.instance_rest.len() as u64;
    up.client_rest = Vec::new();
    up.instance_rest = Vec::new();
    Ok((client, up, cursors))
}

fn account(
    cursor: &mut FrameCursor,
    bytes: &[u8],
    conn: &Connection,
    dir: Direction,
) -> std::io::Result<()> {
    conn.account(dir, |side| cursor.feed(bytes, side, monotonic_ns()))
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Accounts `rest` and, if it ends inside a frame, reads exactly up to that frame's end.
async fn complete_frame(
    stream: &mut TcpStream,
    rest: &mut Vec<u8>,
    cursor: &mut FrameCursor,
    conn: &Connection,
    dir: Direction,
) -> std::io::Result<()> {
    account(cursor, rest, conn, dir)?;
    if cursor.at_boundary() {
        return Ok(());
    }
    let mut buf = vec![0u8; 64 * 1024];
    while !cursor.at_boundary() {
        let want = (cursor.needed_for_boundary() as usize).min(buf.len());
        let n = stream.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        account(cursor, &buf[..n], conn, dir)?;
        rest.extend_from_slice(&buf[..n]);
    }
    Ok(())
}
