//! The WebSocket proxy service: one connection's whole life, in order.
//!
//! 1. **admit**: count it against its IP's limit (over it: 429 at once, nothing read; on
//!    `tls_listen` once the TLS handshake is done) and `max_connections`; a `wss://` client's
//!    TLS handshake (within `tls_handshake_timeout_s`) happens here, its IP already counted;
//! 2. **upgrade** (`upgrade.rs`): read and check the request, route, admit, pick an
//!    instance, relay its 101 (or answer with the error status); a request that does not ask
//!    for a WebSocket is plain HTTP instead, and `http.rs` serves the connection from here;
//! 3. **register**: choose the path ([`Path`]), enter the registry under its name and open
//!    its billing ledger row;
//! 4. **hand over**: forward what either side sent past its handshake, up to a frame
//!    boundary where the kernel takes over;
//! 5. **carry**: the path carries it; the relay keeps this task, a kernel splice ends it
//!    (an open spliced connection costs no task) and reports from teardown;
//! 6. **end**: log, count and bill how it ended, release everything it held.

mod http;
mod rewind;
mod upgrade;

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
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
    app::AppState,
    clock::monotonic_ns,
    conn::{Connection, Direction, NewConnection},
    data_plane::{Carrying, Handover, Path},
    instances::Lease,
    ledger::Kind,
    protocols::{frames::FrameCursor, handshake::is_websocket_request, stream::ClientStream},
    registry::{ClientSlot, Registered},
};
use upgrade::{Admission, Failure, Upgraded, read_request, refuse, refuse_over_ip_limit, upgrade};

/// Serves one accepted TCP connection; `tls`: it came to `tls_listen`.
pub async fn serve(state: Arc<AppState>, client: TcpStream, peer: SocketAddr, tls: bool) {
    // Steps 1-4 in their own allocation, freed before the connection's long life: what stays
    // for it is only the carrying future (for the relay; a kernel path keeps none).
    if let Some(carrying) = Box::pin(prepare(state, client, peer, tls)).await {
        carrying.await;
    }
}

/// Steps 1-4; `None` when the connection ended before it was handed over.
async fn prepare(
    state: Arc<AppState>,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: bool,
) -> Option<Carrying> {
    let _ = tcp.set_nodelay(true);
    // 1. admit
    let server = &state.config.server;
    // Taken before a TLS handshake: half-done handshakes count against their IP too.
    let admitted = state
        .clients
        .admit(peer.ip(), server.max_connections_per_ip);
    let mut client = match (tls, &state.tls) {
        (true, Some(terminator)) => match timed(terminator.accept(tcp)).await {
            (Ok(stream), took) => {
                state.metrics.tls_handshake_done(took);
                stream
            }
            (Err(e), _) => {
                state.metrics.tls_handshake(e.kind());
                debug!(client = %peer, error = %e, "TLS handshake did not complete");
                return None;
            }
        },
        _ => ClientStream::Plain(tcp),
    };
    let client_slot = match admitted {
        Ok(slot) => slot,
        Err(key) => {
            // Over TLS the 429 can only be said once the handshake is done.
            Box::pin(refuse_over_ip_limit(&state, client, peer, key)).await;
            return None;
        }
    };
    // The handshake's time starts here: a TLS handshake has its own.
    let handshake_began = Instant::now();
    let head = match Box::pin(read_request(&state, &mut client)).await {
        Ok(head) => head,
        Err(Failure::Respond(e)) => {
            Box::pin(refuse(&state, &mut client, peer, None, &e)).await;
            return None;
        }
        Err(Failure::ClientGone) => return None,
    };
    if !is_websocket_request(&head.head) {
        // Plain HTTP: this task serves the connection's requests until it closes.
        http::serve(state, client, peer, head, client_slot).await;
        return None;
    }
    let reservation = state.registry.reserve(server.max_connections as usize);
    let admission = Admission {
        at_capacity: reservation.is_none(),
        connection_id: reservation
            .as_ref()
            .map(|r| r.id().to_string())
            .unwrap_or_default(),
    };
    // 2. upgrade. Boxed phases: the handshake's buffers live in their own allocation, freed
    // before the connection's long life starts, instead of sizing this task's future for it.
    let mut function = None;
    let upgraded = Box::pin(upgrade(
        &state,
        &mut client,
        peer,
        head,
        admission,
        &mut function,
    ))
    .await;
    let (mut upgraded, reservation) = match (upgraded, reservation) {
        (Ok(upgraded), Some(reservation)) => {
            let took = handshake_began.elapsed();
            state.metrics.handshake_done(&upgraded.function, took);
            (upgraded, reservation)
        }
        (Err(Failure::Respond(e)), _) => {
            Box::pin(refuse(&state, &mut client, peer, function.as_deref(), &e)).await;
            return None;
        }
        // The upgrade checks capacity before it connects to an instance.
        (Err(Failure::ClientGone), _) | (Ok(_), None) => return None,
    };
    // 3. register
    let path = state
        .data_plane
        .path_for(&client, &upgraded.instance, upgraded.lease.is_some())
        .await;
    let registered = state.registry.register(
        reservation,
        NewConnection {
            tracer: state.tracer.clone(),
            function: upgraded.function.clone(),
            instance: upgraded.instance_addr.clone(),
            client: peer,
            plane: path.name(),
            limits: upgraded.limits,
        },
    );
    let conn = registered.conn.clone();
    super::ledger::accepted(&state, &conn, upgraded.memory_mb, Kind::WebSocket);
    state
        .metrics
        .connection(&conn.function, path.name().as_str());
    info!(id = %conn.id, function = %conn.function, instance = %conn.instance, client = %peer,
          data_plane = path.name().as_str(), "connection upgraded");
    if state.draining.load(Ordering::Relaxed) {
        // Upgraded while the drain began: it gets the same 1001 as everyone else.
        conn.request_stop(Ending::Shutdown);
    }
    // What must live exactly as long as the connection: its registry entry (with its
    // `max_connections` place), its instance slot and its per-IP count.
    let held = Held {
        _registered: registered,
        _lease: upgraded.lease.take(),
        _client_slot: client_slot,
    };
    // 4. hand over
    let limit = Duration::from_millis(server.handshake_timeout_ms);
    let handed = Box::pin(hand_over(&path, client, upgraded, &conn, limit)).await;
    let (handover, cursors) = match handed {
        Ok(handed) => handed,
        Err(e) => {
            end(&conn, Err(e), &state, held);
            return None;
        }
    };
    // 5. carry, 6. end
    let ended = conn.clone();
    let on_end = move |result| end(&ended, result, &state, held);
    path.carry(handover, conn, cursors, on_end)
}

/// Runs `f`, timing it.
async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let began = Instant::now();
    let out = f.await;
    (out, began.elapsed())
}

/// Everything released when a connection ends.
struct Held {
    _registered: Registered,
    _lease: Option<Lease>,
    _client_slot: ClientSlot,
}

/// Logs, counts and bills how a connection ended, with its function status and final
/// counters, then releases what it held.
fn end(conn: &Connection, result: std::io::Result<Ending>, state: &AppState, held: Held) {
    // The kernel's final counters were absorbed when the splice ended: only userspace's now.
    let [inbound, outbound] = conn.sides();
    let status = result
        .as_ref()
        .ok()
        .map(|ending| function_status(*ending, &inbound, &outbound));
    super::ledger::ended(state, conn, &result, [inbound, outbound]);
    conn.tracer.ended(conn, status);
    let metrics = &state.metrics;
    metrics.connection_ended(&conn.function, status);
    metrics.connection_traffic(conn.id.key, &conn.function, &[inbound, outbound]);
    if let Ok(ending) = &result {
        metrics.quota_ending(&conn.function, *ending);
    }
    if crate::conn::throttled_ms(&inbound) > 0 {
        metrics.throttled(&conn.function);
    }
    match result {
        Ok(_) => {
            let status = status.unwrap_or_default();
            let code = |s: &proxy_common::SideState| {
                (s.flags & FLAG_CLOSE_SEEN != 0).then_some(s.close_code)
            };
            // Everything a fleet's log shipper needs to bill from this line alone.
            let duration_ms = conn.started_at.elapsed().unwrap_or_default().as_millis() as u64;
            info!(id = %conn.id, function = %conn.function, instance = %conn.instance, status,
                  client_close = code(&inbound), function_close = code(&outbound),
                  duration_ms, throttled_ms = crate::conn::throttled_ms(&inbound),
                  data_plane = conn.plane().as_str(),
                  bytes_in = inbound.bytes, bytes_out = outbound.bytes,
                  messages_in = inbound.messages, messages_out = outbound.messages, "connection ended")
        }
        Err(e) => {
            warn!(id = %conn.id, error = %e, bytes_in = inbound.bytes, bytes_out = outbound.bytes,
                  "connection ended abnormally")
        }
    }
    drop(held);
}

/// Forwards, by hand, what either side sent past its handshake head (on a kernel path up
/// to a frame boundary, so the parser starts on a header), accounting it. On zero-hop the
/// client's bytes stay in the hand-over: the splice sends them into the instance's socket.
async fn hand_over(
    path: &Path,
    mut client: ClientStream,
    mut up: Upgraded,
    conn: &Connection,
    limit: Duration,
) -> std::io::Result<(Handover, [FrameCursor; 2])> {
    let mut cursors = [FrameCursor::default(), FrameCursor::default()];
    if path.kernel() {
        // The kernel parser must start on a frame header: read the rest of any frame the
        // pipelined bytes ended inside, in userspace, before the splice.
        timeout(limit, async {
            let [inbound, outbound] = &mut cursors;
            complete_frame(
                &mut client,
                &mut up.client_rest,
                inbound,
                conn,
                Direction::ClientToInstance,
            )
            .await?;
            complete_frame(
                &mut up.instance,
                &mut up.instance_rest,
                outbound,
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
    up.written.to_instance += up.client_rest.len() as u64;
    let pipelined = if path.keeps_pipelined() {
        std::mem::take(&mut up.client_rest)
    } else {
        up.instance.write_all(&up.client_rest).await?;
        Vec::new()
    };
    client.write_all(&up.instance_rest).await?;
    up.written.to_client += up.instance_rest.len() as u64;
    let handover = Handover {
        client,
        instance: up.instance,
        written: up.written,
        pipelined,
    };
    Ok((handover, cursors))
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
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
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
