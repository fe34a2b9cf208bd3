//! The WebSocket proxy service: one task per accepted TCP connection through the upgrade
//! (`upgrade.rs`); then the relay keeps that task until the WebSocket ends, while a kernel
//! splice ends it and finishes from the hang-up watcher (so an open spliced connection costs
//! no task).

mod upgrade;

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
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
        kernel::{OnEnd, SpliceEnd, ZeroHopKeys},
        relay::{self, Direction},
        socket::monotonic_ns,
    },
    instances::Lease,
    metrics::Metrics,
    protocols::frames::FrameCursor,
    registry::{ClientSlot, Connection, Registered},
    server::AppState,
};
use upgrade::{Failure, Upgraded, refuse, upgrade};

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
    // Zero-hop for instances on this host whose socket the kernel recorded.
    let zero_hop = match &state.data_plane {
        DataPlane::Kernel(k) if upgraded.lease.is_some() => {
            k.zero_hop_keys(&client, &upgraded.instance).await
        }
        _ => None,
    };
    let plane_name = if zero_hop.is_some() {
        "kernel-zero-hop"
    } else {
        state.data_plane.name()
    };
    let registered = state.registry.register(
        upgraded.function.clone(),
        upgraded.instance_addr.clone(),
        peer,
        plane_name,
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
    Box::pin(carry(state, client, upgraded, conn, held, zero_hop)).await;
}

/// Everything released when a connection ends.
struct Held {
    _registered: Registered,
    _lease: Option<Lease>,
    _client_slot: Option<ClientSlot>,
}

/// Logs how a connection ended, with its function status and final counters.
fn log_end(conn: &Connection, result: std::io::Result<Ending>, metrics: &Metrics) {
    // The kernel's final counters were absorbed when the splice ended: only userspace's now.
    let ([inbound, outbound], _) = conn.totals(None);
    let status = result
        .as_ref()
        .ok()
        .map(|ending| function_status(*ending, &inbound, &outbound));
    metrics.connection_ended(&conn.function, status);
    match result {
        Ok(_) => {
            let status = status.unwrap_or_default();
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

/// Carries the WebSocket on the chosen data plane. The relay runs in this task until the
/// connection ends; the kernel splice returns at once and finishes from the hang-up watcher,
/// so a spliced connection keeps no task.
async fn carry(
    state: Arc<AppState>,
    client: TcpStream,
    up: Upgraded,
    conn: Arc<Connection>,
    held: Held,
    zero_hop: Option<ZeroHopKeys>,
) {
    let handed = Box::pin(hand_over(
        &state.data_plane,
        client,
        up,
        &conn,
        &state,
        zero_hop.is_some(),
    ))
    .await;
    let (client, up, cursors) = match handed {
        Ok(handed) => handed,
        Err(e) => return log_end(&conn, Err(e), &state.metrics),
    };
    let Upgraded {
        instance,
        written,
        client_rest,
        ..
    } = up;
    match &state.data_plane {
        DataPlane::Userspace => {
            let result = Box::pin(relay::relay(client, instance, &conn, cursors)).await;
            log_end(&conn, result, &state.metrics);
            drop(held);
        }
        DataPlane::Kernel(k) => {
            let metrics = state.metrics.clone();
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
                log_end(&conn, result, &metrics);
                drop(held);
            });
            let max_message_bytes = spliced.limits.max_message_bytes;
            match zero_hop {
                Some(keys) => k.start_zero_hop(
                    client,
                    instance,
                    keys,
                    client_rest,
                    written,
                    max_message_bytes,
                    |pair| spliced.set_spliced(pair),
                    on_end,
                ),
                None => k.start_splice(
                    client,
                    instance,
                    written,
                    max_message_bytes,
                    |pair| spliced.set_spliced(pair),
                    on_end,
                ),
            }
            // A stop asked for before the splice existed is carried out now.
            if let (Some(ending), Some(pair)) = (spliced.stop_reason(), spliced.spliced_pair()) {
                k.stop(pair, ending);
            }
        }
    }
}

/// Forwards, by hand, what either side sent past its handshake head (on the kernel path up
/// to a frame boundary, so the parser starts on a header), accounting it. With
/// `keep_for_instance` the client's bytes stay in `client_rest`: the zero-hop splice sends
/// them into the instance's socket itself.
async fn hand_over(
    data_plane: &DataPlane,
    mut client: TcpStream,
    mut up: Upgraded,
    conn: &Connection,
    state: &AppState,
    keep_for_instance: bool,
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
    up.written.to_instance += up.client_rest.len() as u64;
    if !keep_for_instance {
        up.instance.write_all(&up.client_rest).await?;
        up.client_rest = Vec::new();
    }
    client.write_all(&up.instance_rest).await?;
    up.written.to_client += up.instance_rest.len() as u64;
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
