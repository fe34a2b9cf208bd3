//! A spliced connection's life after the splice: hang-ups passed on once the kernel's
//! redirected bytes are out, the close for a failed instance, the proxy's own closes (timers,
//! shutdown, refused frames), the zero-hop userspace legs, and the kernel's events. The close
//! frames and grace periods are [`closing`]'s; this module decides when they happen on a
//! spliced connection and how they reach its sockets.

use std::{
    io,
    net::TcpStream,
    sync::Arc,
    time::{Duration, Instant},
};

use proxy_common::{
    maps::{DataPlaneEvent, EVENT_CLIENT_HELD, EVENT_INSTANCE_FRAME_REFUSED, FLAG_THROTTLE_NEXT},
    policy::{Ending, close_for_instance_end, closing_handshake_done, refusal_ending},
};
use tracing::{debug, info};

use super::{
    FLUSH_TIMEOUT,
    spliced::{Spliced, poll_until},
    zero_hop::{self, ClientLeg, InstanceLeg},
};
use crate::data_plane::{
    closing::{self, CLOSE_GRACE, ProxyClose, STOP_FLUSH},
    copy::{self, Half, HalfEnd},
    socket,
};

impl Spliced {
    /// Sends `frame` to one side once every byte the kernel redirected there has reached its
    /// TCP (so the frame cannot land in the middle of another), then shuts that side's write
    /// half. A side that does not take them within `limit` gets only the FIN.
    async fn close_side(&self, to_client: bool, frame: &[u8], limit: Duration) -> io::Result<()> {
        let (from, to, written) = if to_client {
            (self.pair.instance, &self.client, self.written.to_client)
        } else {
            (self.pair.client, &self.instance, self.written.to_instance)
        };
        let flushed = match &self.zero_hop {
            // What the kernel sent the client went out inline, in the instance's own writes.
            Some(_) if to_client => Ok(()),
            Some(z) => zero_hop::wait_instance_drained(self, &z.keys, limit).await,
            None => flush(self, from, to, written, limit).await,
        };
        // A userspace relay of this direction could be inside a frame: only the FIN then.
        let relayed = !to_client && self.client_relay.load(std::sync::atomic::Ordering::Acquire);
        let sent = match flushed {
            Ok(()) if relayed => Ok(()),
            Ok(()) => write_all_nonblocking(to, frame, limit).await,
            Err(e) => Err(e),
        };
        socket::shutdown_write(to);
        sent
    }
}

/// The hang-up watcher fired for one socket. For a zero-hop connection's proxy socket that
/// can also mean the instance's writes started arriving there (diverted): relay them to the
/// client until the instance's EOF, then handle the hang-up as usual.
pub(super) async fn on_hangup(conn: Arc<Spliced>, from_client: bool) {
    if let (Some(z), false) = (&conn.zero_hop, from_client)
        && let Err(e) = relay_instance(&conn, z.keys).await
    {
        debug!(error = %e, "relaying diverted instance frames ended");
    }
    half_close(conn, from_client).await
}

/// One side sent FIN (or failed): pass the FIN on once the kernel's redirected bytes are out.
/// An instance that ended without a close frame gets the client a close frame instead.
async fn half_close(conn: Arc<Spliced>, from_client: bool) {
    let from_cookie = if from_client {
        conn.pair.client
    } else {
        conn.pair.instance
    };
    let from_flags = conn.side(from_cookie).map_or(0, |s| s.flags);
    if let Some(ending) = refusal_ending(from_flags, from_client) {
        // The stream parser refused a frame (its refusal is the socket error that woke us),
        // and the frame went nowhere: the proxy closes both sides, 1009 for a message over
        // the limit, 1002 for a frame RFC 6455 forbids (before the instance-failed check: an
        // instance that sent such a frame did not just vanish).
        let _ = socket::take_error(if from_client {
            &conn.client
        } else {
            &conn.instance
        });
        return stop_by_proxy(conn, ending).await;
    }
    if !from_client && !conn.ended_by_proxy() {
        let function_side = conn.side(conn.pair.instance).unwrap_or_default();
        if let Some(code) = close_for_instance_end(&function_side, conn.client_done()) {
            return instance_failed(&conn, code).await;
        }
    }
    let (from, to, to_written) = if from_client {
        (&conn.client, &conn.instance, conn.written.to_instance)
    } else {
        (&conn.instance, &conn.client, conn.written.to_client)
    };
    if from_client && conn.instance_failed() {
        // The client answered the close the proxy sent for the failed instance.
        return conn.finish(Ok(Ending::InstanceFailed));
    }
    if from_client && zero_hop::client_held(&conn.maps, conn.pair.client) {
        // The kernel stopped parsing the client's frames (its stop is the socket error seen
        // here): the relay takes over and finishes this direction after the relayed bytes.
        return take_over_client(conn.clone());
    }
    if let Some(e) = socket::take_error(from) {
        return conn.finish(Err(e));
    }
    let flushed = match &conn.zero_hop {
        Some(z) if from_client => {
            zero_hop::wait_instance_drained(&conn, &z.keys, FLUSH_TIMEOUT).await
        }
        // The instance's writes reached the client inline or through the relay just run.
        Some(_) => Ok(()),
        None => flush(&conn, from_cookie, to, to_written, FLUSH_TIMEOUT).await,
    };
    if let Err(e) = flushed {
        return conn.finish(Err(e));
    }
    if conn.pass_fin(from_client) {
        return;
    }
    let sides = (conn.side(conn.pair.client), conn.side(conn.pair.instance));
    if let (false, (Some(client), Some(function))) = (from_client, sides)
        && closing_handshake_done(&client, &function)
    {
        // The instance closed after both close frames, as a server does: the client gets
        // CLOSE_GRACE to close its side, as it would with the instance directly, and the
        // connection (and its billed time) ends then even if it keeps TCP open.
        tokio::time::sleep(CLOSE_GRACE).await;
        conn.finish(Ok(Ending::Closed));
    }
}

/// The instance's side ended (FIN or reset) before the instance sent a close frame: what it
/// sent before still reaches the client, then a close frame with `code`, then FIN; the client
/// gets [`CLOSE_GRACE`] to answer before the connection ends.
async fn instance_failed(conn: &Arc<Spliced>, code: u16) {
    let client_already_done = conn.mark_instance_failed();
    // A reset instance socket does not change what was already redirected to the client.
    let frame = closing::instance_failed_frame(code);
    if let Err(e) = conn.close_side(true, &frame, FLUSH_TIMEOUT).await {
        debug!(error = %e, "could not tell the client the instance failed");
    }
    if client_already_done {
        return conn.finish(Ok(Ending::InstanceFailed));
    }
    let conn = conn.clone();
    tokio::spawn(async move {
        tokio::time::sleep(CLOSE_GRACE).await;
        conn.finish(Ok(Ending::InstanceFailed));
    });
}

/// The proxy ends a spliced connection: both peers get [`ProxyClose`]'s frames once what the
/// kernel sent them is out (a peer that does not read within [`STOP_FLUSH`] gets only the
/// FIN), then [`CLOSE_GRACE`] to answer; without a close code, both sockets close at once.
pub(super) async fn stop_by_proxy(conn: Arc<Spliced>, ending: Ending) {
    if !conn.claim_stop(ending) {
        return;
    }
    if let Some(z) = &conn.zero_hop {
        zero_hop::stop_kernel_paths(&conn.maps, conn.pair.client, &z.keys);
    }
    let Some(frames) = ProxyClose::for_ending(ending) else {
        return conn.finish(Ok(ending));
    };
    // The client's first: on two sockets the kernel still carries what the instance sends,
    // and the instance's answer to its own close frame must not reach the client before
    // the proxy's (the codes differ for a rate close: 1008 and 1001).
    let _ = conn.close_side(true, &frames.to_client, STOP_FLUSH).await;
    let _ = conn
        .close_side(false, &frames.to_instance, STOP_FLUSH)
        .await;
    tokio::time::sleep(CLOSE_GRACE).await;
    conn.finish(Ok(ending));
}

/// What the zero-hop ring buffer reported for one connection.
pub(super) fn on_event(conn: Arc<Spliced>, event: &DataPlaneEvent) {
    match event.kind {
        EVENT_CLIENT_HELD => take_over_client(conn),
        EVENT_INSTANCE_FRAME_REFUSED => {
            let flags = conn.side(conn.pair.instance).map_or(0, |s| s.flags);
            let ending = refusal_ending(flags, false).unwrap_or(Ending::MessageTooBig);
            info!(
                client = conn.pair.client,
                flags,
                ?ending,
                "the kernel refused a frame the function wrote"
            );
            tokio::spawn(stop_by_proxy(conn, ending));
        }
        kind => debug!(
            client = event.client_cookie,
            kind, "unknown data-plane event"
        ),
    }
}

/// The client socket's stream parser stopped at a frame boundary (`FLAG_HELD`): take the
/// socket out of `SPLICED`, which stops the kernel's programs for it (it stays a redirect
/// target), clear the socket error the stop left, and relay from where the kernel stopped.
/// Once per connection; called for the kernel's event and for the socket error it raised.
fn take_over_client(conn: Arc<Spliced>) {
    let flags = conn.side(conn.pair.client).map_or(0, |s| s.flags);
    if let Some(ending) = refusal_ending(flags, true) {
        // The parser stopped over a refused frame (a rate close): nothing is relayed.
        let _ = socket::take_error(&conn.client);
        tokio::spawn(stop_by_proxy(conn, ending));
        return;
    }
    if conn
        .client_relay
        .swap(true, std::sync::atomic::Ordering::AcqRel)
    {
        return;
    }
    let throttled = conn
        .side(conn.pair.client)
        .is_some_and(|s| s.flags & FLAG_THROTTLE_NEXT != 0 || s.rate.waiting_since_ns != 0);
    if conn.ended_by_proxy() {
        debug!(
            client = conn.pair.client,
            "proxy closing: the client's last frames are relayed by userspace"
        );
    } else if throttled {
        info!(
            client = conn.pair.client,
            "client over its rate: its frames are now paced by userspace"
        );
    } else {
        info!(
            client = conn.pair.client,
            "instance not keeping up: client frames now relayed by userspace"
        );
    }
    let _ = conn
        .maps
        .lock()
        .expect("maps lock")
        .spliced
        .remove(&conn.pair.client);
    // The stop's own EAGAIN; anything else is the connection's real end, which the relay
    // meets on its first read.
    let stop_error =
        socket::take_error(&conn.client).filter(|e| e.kind() != io::ErrorKind::WouldBlock);
    tokio::spawn(async move {
        let relayed = match stop_error {
            Some(e) => Err(e),
            None => relay_client(&conn).await,
        };
        match relayed {
            Ok(HalfEnd::Refused { error, .. }) => {
                stop_by_proxy(conn, closing::refusal_ending(error, true)).await
            }
            Ok(HalfEnd::Eof) if conn.instance_failed() => conn.finish(Ok(Ending::InstanceFailed)),
            Ok(HalfEnd::Eof) => {
                conn.pass_fin(true);
            }
            Err(_) if conn.ended_by_proxy() || conn.finished() => {}
            Err(e) => conn.finish(Err(e)),
        }
    });
}

/// Client -> instance once the kernel stopped: the client's bytes from the frame boundary
/// where its parser stopped wait in the socket's own TCP receive queue (TCP holds the client
/// back while they do) and go out through the proxy socket, once everything the kernel sent
/// the instance earlier is out (zero-hop: taken by the instance; two sockets: in the proxy
/// socket's TCP). Ends at the client's EOF, a refused frame, or when the connection's end is
/// reported (a client that never sends FIN holds nothing).
async fn relay_client(conn: &Spliced) -> io::Result<HalfEnd> {
    let mut from = zero_hop::leg_stream(&conn.client)?;
    let mut to = zero_hop::leg_stream(&conn.instance)?;
    let mut half = Half::new(ClientLeg::new(conn));
    // However long the kernel's bytes take (an instance that does not read): the relay
    // ends with the connection.
    let unbounded = Duration::from_secs(24 * 3600);
    tokio::select! {
        copied = async {
            // The first relayed byte must not overtake what the kernel sent.
            match &conn.zero_hop {
                Some(z) => zero_hop::wait_instance_drained(conn, &z.keys, unbounded).await?,
                None => {
                    let to_written = conn.written.to_instance;
                    flush(conn, conn.pair.client, &conn.instance, to_written, unbounded).await?
                }
            }
            copy::copy(&mut half, &mut from, &mut to).await.map_err(io::Error::from)
        } => copied,
        () = conn.reported() => Err(io::Error::other("the connection ended")),
    }
}

/// Instance -> client through the proxy socket ([`InstanceLeg`]), until the instance's EOF,
/// or until the connection's end is reported.
async fn relay_instance(
    conn: &Spliced,
    keys: crate::data_plane::kernel::ZeroHopKeys,
) -> io::Result<()> {
    let mut from = zero_hop::leg_stream(&conn.instance)?;
    let mut to = zero_hop::leg_stream(&conn.client)?;
    let mut half = Half::new(InstanceLeg::new(conn, keys));
    tokio::select! {
        copied = copy::copy(&mut half, &mut from, &mut to) => copied.map(|_| ()).map_err(io::Error::from),
        () = conn.reported() => Ok(()),
    }
}

/// Writes a few bytes to a non-blocking socket, waiting (bounded) for send-buffer space.
async fn write_all_nonblocking(
    mut to: &TcpStream,
    mut bytes: &[u8],
    limit: Duration,
) -> io::Result<()> {
    use std::io::Write;
    let deadline = Instant::now() + limit;
    while !bytes.is_empty() {
        match to.write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits until every byte the kernel redirected from `from` sits in `to`'s TCP queue.
async fn flush(
    conn: &Spliced,
    from: u64,
    to: &TcpStream,
    to_written: u64,
    limit: Duration,
) -> io::Result<()> {
    poll_until(limit, "redirected bytes not flushed", || {
        // A frame is accounted whole at its header and redirected piece by piece.
        let redirected = conn
            .side(from)
            .map_or(0, |s| s.bytes.saturating_sub(s.frame_remaining));
        if socket::bytes_queued_to_tcp(to)? >= to_written + redirected {
            return Ok(true);
        }
        match socket::take_error(to) {
            Some(e) => Err(e),
            None => Ok(false),
        }
    })
    .await
}
