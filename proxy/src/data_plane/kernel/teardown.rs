//! A spliced connection's life after the splice: hang-ups passed on once the kernel's
//! redirected bytes are out, the 1011 close for a failed instance, the proxy's own closes
//! (timers, shutdown, message limit), and the end report.

use std::{
    io,
    net::TcpStream,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use proxy_common::{
    SideState,
    maps::{FLAG_MESSAGE_TOO_BIG, FLAG_PROTOCOL_ERROR},
    policy::{
        Ending, close_for_instance_end, closing_handshake_done, proxy_close_code,
        proxy_close_reason,
    },
};

/// How long the proxy's own close waits for in-flight frames to reach a peer's TCP: a peer
/// that does not read by then gets only the FIN.
const STOP_FLUSH: Duration = Duration::from_secs(1);

use super::{
    FLUSH_TIMEOUT, KernelDataPlane, Maps, OnEnd, SpliceEnd, SplicedPair, WrittenByHand,
    zero_hop::{self, ZeroHopKeys},
};
use crate::{
    data_plane::{relay::CLOSE_GRACE, socket},
    protocols::frames::{close_frame, masked_close_frame},
};

/// A spliced connection while the kernel carries it; its sockets close when the last
/// reference (the splice or a teardown task) goes.
pub struct Spliced {
    pub(super) client: TcpStream,
    /// The instance socket, or for a zero-hop connection the proxy's (idle) socket
    /// connected to the instance.
    pub(super) instance: TcpStream,
    pub(super) pair: SplicedPair,
    pub(super) written: WrittenByHand,
    pub(super) plane: Arc<KernelDataPlane>,
    /// Boxed: two-socket connections, the many on an edge, pay one pointer for it.
    pub(super) zero_hop: Option<Box<ZeroHopConn>>,
    pub(super) progress: Mutex<Progress>,
}

pub(super) struct ZeroHopConn {
    pub(super) keys: ZeroHopKeys,
    /// Userspace relays client -> instance (the kernel stopped parsing the client's frames).
    pub(super) client_relay: std::sync::atomic::AtomicBool,
}

pub(super) struct Progress {
    pub(super) client_done: bool,
    pub(super) instance_done: bool,
    /// The instance ended without a close frame: the client's bytes have nowhere to go.
    pub(super) instance_failed: bool,
    /// Runs once both directions are done, or one failed.
    pub(super) on_end: Option<OnEnd>,
    /// Set when the proxy ends the connection: the end is reported as this, however the
    /// peers answer.
    pub(super) by_proxy: Option<Ending>,
}

impl Progress {
    pub(super) fn new(on_end: OnEnd) -> Progress {
        Progress {
            client_done: false,
            instance_done: false,
            instance_failed: false,
            on_end: Some(on_end),
            by_proxy: None,
        }
    }
}

impl Spliced {
    /// The end was reported (the record may still be alive in a task).
    pub(super) fn finished(&self) -> bool {
        self.progress.lock().expect("progress").on_end.is_none()
    }

    pub(super) fn instance_done(&self) -> bool {
        self.progress.lock().expect("progress").instance_done
    }

    /// One side's FIN goes on to the other (everything before it has): the connection ends
    /// when both have. Returns whether it did.
    fn pass_fin(&self, from_client: bool) -> bool {
        // Marked before the FIN is passed on: the peer's answering FIN must find it set.
        let both = {
            let mut p = self.progress.lock().expect("progress");
            if from_client {
                p.client_done = true
            } else {
                p.instance_done = true
            }
            p.client_done && p.instance_done
        };
        socket::shutdown_write(if from_client {
            &self.instance
        } else {
            &self.client
        });
        if both {
            self.finish(SpliceEnd::Closed);
        }
        both
    }

    pub(super) fn ended_by_proxy(&self) -> bool {
        self.progress.lock().expect("progress").by_proxy.is_some()
    }

    /// Sends `frame` to one side once every byte the kernel redirected there has reached its
    /// TCP (so the frame cannot land in the middle of another), then shuts that side's write
    /// half. A side that does not take them within `limit` gets only the FIN.
    async fn close_side(
        &self,
        maps: &Mutex<Maps>,
        to_client: bool,
        frame: &[u8],
        limit: Duration,
    ) -> io::Result<()> {
        let (from, to, written) = if to_client {
            (self.pair.instance, &self.client, self.written.to_client)
        } else {
            (self.pair.client, &self.instance, self.written.to_instance)
        };
        let flushed = match &self.zero_hop {
            // What the kernel sent the client went out inline, in the instance's own writes.
            Some(_) if to_client => Ok(()),
            Some(z) => zero_hop::wait_instance_drained(maps, self, &z.keys, limit).await,
            None => flush(maps, from, to, written, limit).await,
        };
        // A userspace relay of this direction could be inside a frame: only the FIN then.
        let relayed = self.zero_hop.as_ref().is_some_and(|z| {
            !to_client && z.client_relay.load(std::sync::atomic::Ordering::Acquire)
        });
        let sent = match flushed {
            Ok(()) if relayed => Ok(()),
            Ok(()) => write_all_nonblocking(to, frame, limit).await,
            Err(e) => Err(e),
        };
        socket::shutdown_write(to);
        sent
    }

    /// Takes the connection out of the kernel and reports its end (the first call only).
    /// The sockets close when the last reference to this record goes.
    pub(super) fn finish(&self, end: SpliceEnd) {
        let (on_end, by_proxy) = {
            let mut p = self.progress.lock().expect("progress");
            (p.on_end.take(), p.by_proxy)
        };
        let Some(on_end) = on_end else {
            return;
        };
        // Once the proxy ended it, how the peers answered (or failed to) does not matter.
        let end = match by_proxy {
            Some(ending) => SpliceEnd::ByProxy(ending),
            None => end,
        };
        self.plane.hangups.forget(self.pair.client);
        self.plane.hangups.forget(self.pair.instance);
        let (inbound, outbound) = self.plane.remove(self.pair);
        on_end(end, inbound, outbound);
    }
}

pub(super) fn side_of(maps: &Mutex<Maps>, cookie: u64) -> Option<SideState> {
    maps.lock().expect("maps lock").sides.get(&cookie, 0).ok()
}

/// The hang-up watcher fired for one socket. For a zero-hop connection's proxy socket that
/// can also mean the instance's writes started arriving there (diverted): relay them to the
/// client until the instance's EOF, then handle the hang-up as usual.
pub(super) async fn on_hangup(maps: Arc<Mutex<Maps>>, conn: Arc<Spliced>, from_client: bool) {
    if conn.zero_hop.is_some()
        && !from_client
        && let Err(e) = zero_hop::relay_instance(&conn).await
    {
        tracing::debug!(error = %e, "relaying diverted instance frames ended");
    }
    half_close(maps, conn, from_client).await
}

/// The userspace relay of a zero-hop connection's client -> instance direction reached the
/// client's EOF (and the FIN went to the instance after everything else) or failed.
pub(super) fn client_relay_done(conn: Arc<Spliced>, result: io::Result<()>) {
    if let Err(e) = result {
        if conn.ended_by_proxy() {
            return;
        }
        return conn.finish(SpliceEnd::Aborted(e));
    }
    if conn.progress.lock().expect("progress").instance_failed {
        return conn.finish(SpliceEnd::InstanceFailed);
    }
    conn.pass_fin(true);
}

/// One side sent FIN (or failed): pass the FIN on once the kernel's redirected bytes are out.
/// An instance that ended without a close frame gets the client a close frame instead.
pub(super) async fn half_close(maps: Arc<Mutex<Maps>>, conn: Arc<Spliced>, from_client: bool) {
    let (by_proxy, client_ended) = {
        let p = conn.progress.lock().expect("progress");
        (p.by_proxy.is_some(), p.client_done)
    };
    let from_cookie = if from_client {
        conn.pair.client
    } else {
        conn.pair.instance
    };
    let refused = side_of(&maps, from_cookie).map_or(0, |s| s.flags)
        & (FLAG_MESSAGE_TOO_BIG | FLAG_PROTOCOL_ERROR);
    if refused != 0 {
        // The stream parser refused a frame (its refusal is the socket error that woke us),
        // and the frame went nowhere: the proxy closes both sides, 1009 for a message over
        // the limit, 1002 for a frame RFC 6455 forbids (before the instance-failed check: an
        // instance that sent such a frame did not just vanish).
        let _ = socket::take_error(if from_client {
            &conn.client
        } else {
            &conn.instance
        });
        let ending = if refused & FLAG_MESSAGE_TOO_BIG != 0 {
            Ending::MessageTooBig
        } else {
            Ending::protocol_error(from_client)
        };
        return stop_by_proxy(maps, conn, ending).await;
    }
    if !from_client && !by_proxy {
        let function_side = side_of(&maps, conn.pair.instance).unwrap_or_default();
        if let Some(code) = close_for_instance_end(&function_side, client_ended) {
            return instance_failed(&maps, &conn, code).await;
        }
    }
    let (from, to, to_written) = if from_client {
        (&conn.client, &conn.instance, conn.written.to_instance)
    } else {
        (&conn.instance, &conn.client, conn.written.to_client)
    };
    if from_client && conn.progress.lock().expect("progress").instance_failed {
        // The client answered the close the proxy sent for the failed instance.
        return conn.finish(SpliceEnd::InstanceFailed);
    }
    if from_client && conn.zero_hop.is_some() && zero_hop::client_held(&maps, conn.pair.client) {
        // The kernel stopped parsing the client's frames (its stop is the socket error seen
        // here): the relay takes over and finishes this direction after the relayed bytes.
        return zero_hop::take_over_client(maps.clone(), conn.clone());
    }
    if let Some(e) = socket::take_error(from) {
        return conn.finish(SpliceEnd::Aborted(e));
    }
    let flushed = match &conn.zero_hop {
        Some(z) if from_client => {
            zero_hop::wait_instance_drained(&maps, &conn, &z.keys, FLUSH_TIMEOUT).await
        }
        // The instance's writes reached the client inline or through the relay just run.
        Some(_) => Ok(()),
        None => flush(&maps, from_cookie, to, to_written, FLUSH_TIMEOUT).await,
    };
    if let Err(e) = flushed {
        return conn.finish(SpliceEnd::Aborted(e));
    }
    if conn.pass_fin(from_client) {
        return;
    }
    let sides = (
        side_of(&maps, conn.pair.client),
        side_of(&maps, conn.pair.instance),
    );
    if let (false, (Some(client), Some(function))) = (from_client, sides)
        && closing_handshake_done(&client, &function)
    {
        // The instance closed after both close frames, as a server does: the client gets
        // CLOSE_GRACE to close its side, as it would with the instance directly, and the
        // connection (and its billed time) ends then even if it keeps TCP open.
        tokio::time::sleep(CLOSE_GRACE).await;
        conn.finish(SpliceEnd::Closed);
    }
}

/// The instance's side ended (FIN or reset) before the instance sent a close frame: what it
/// sent before still reaches the client, then a close frame with `code`, then FIN; the client
/// gets [`CLOSE_GRACE`] to answer before the connection ends.
async fn instance_failed(maps: &Mutex<Maps>, conn: &Arc<Spliced>, code: u16) {
    let client_already_done = {
        let mut p = conn.progress.lock().expect("progress");
        p.instance_failed = true;
        p.instance_done = true;
        p.client_done
    };
    // A reset instance socket does not change what was already redirected to the client.
    let frame = close_frame(code, "function instance failed");
    if let Err(e) = conn.close_side(maps, true, &frame, FLUSH_TIMEOUT).await {
        tracing::debug!(error = %e, "could not tell the client the instance failed");
    }
    if client_already_done {
        return conn.finish(SpliceEnd::InstanceFailed);
    }
    let conn = conn.clone();
    tokio::spawn(async move {
        tokio::time::sleep(CLOSE_GRACE).await;
        conn.finish(SpliceEnd::InstanceFailed);
    });
}

/// The proxy ends a spliced connection (see [`KernelDataPlane::stop`]).
pub(super) async fn stop_by_proxy(maps: Arc<Mutex<Maps>>, conn: Arc<Spliced>, ending: Ending) {
    {
        let mut p = conn.progress.lock().expect("progress");
        if p.on_end.is_none() || p.by_proxy.is_some() {
            return;
        }
        p.by_proxy = Some(ending);
    }
    if let Some(z) = &conn.zero_hop {
        zero_hop::stop_kernel_paths(&maps, conn.pair.client, &z.keys);
    }
    let Some(code) = proxy_close_code(ending) else {
        return conn.finish(SpliceEnd::ByProxy(ending));
    };
    // Bounded: a peer that stops reading gets no close frame, only the FIN (an idle
    // connection has nothing in flight).
    let reason = proxy_close_reason(ending);
    let mask = (socket::monotonic_ns() as u32).to_ne_bytes();
    let (to_client, to_instance) = (
        close_frame(code, reason),
        masked_close_frame(code, reason, mask),
    );
    let _ = tokio::join!(
        conn.close_side(&maps, true, &to_client, STOP_FLUSH),
        conn.close_side(&maps, false, &to_instance, STOP_FLUSH),
    );
    tokio::time::sleep(CLOSE_GRACE).await;
    conn.finish(SpliceEnd::ByProxy(ending));
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
    maps: &Mutex<Maps>,
    from: u64,
    to: &TcpStream,
    to_written: u64,
    limit: Duration,
) -> io::Result<()> {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_micros(200);
    loop {
        let redirected = side_of(maps, from).map_or(0, |s| s.bytes);
        if socket::bytes_queued_to_tcp(to)? >= to_written + redirected {
            return Ok(());
        }
        if let Some(e) = socket::take_error(to) {
            return Err(e);
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "redirected bytes not flushed",
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}
