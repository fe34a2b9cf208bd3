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
    maps::FLAG_MESSAGE_TOO_BIG,
    policy::{Ending, close_for_instance_end, proxy_close_code, proxy_close_reason},
};

/// How long the proxy's own close waits for in-flight frames to reach a peer's TCP: a peer
/// that does not read by then gets only the FIN.
const STOP_FLUSH: Duration = Duration::from_secs(1);

use super::{FLUSH_TIMEOUT, KernelDataPlane, Maps, OnEnd, SpliceEnd, SplicedPair, WrittenByHand};
use crate::{
    data_plane::{relay::CLOSE_GRACE, socket},
    protocols::frames::{close_frame, masked_close_frame},
};

/// A spliced connection while the kernel carries it; its sockets close when the last
/// reference (the splice or a teardown task) goes.
pub struct Spliced {
    pub(super) client: TcpStream,
    pub(super) instance: TcpStream,
    pub(super) pair: SplicedPair,
    pub(super) written: WrittenByHand,
    pub(super) plane: Arc<KernelDataPlane>,
    pub(super) progress: Mutex<Progress>,
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

impl Spliced {
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
        let sent = match flush(maps, from, to, written, limit).await {
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

/// One side sent FIN (or failed): pass the FIN on once the kernel's redirected bytes are out.
/// An instance that ended without a close frame gets the client a close frame instead.
pub(super) async fn half_close(maps: Arc<Mutex<Maps>>, conn: Arc<Spliced>, from_client: bool) {
    let (by_proxy, client_ended) = {
        let p = conn.progress.lock().expect("progress");
        (p.by_proxy.is_some(), p.client_done)
    };
    if !from_client && !by_proxy {
        let function_side = side_of(&maps, conn.pair.instance).unwrap_or_default();
        if let Some(code) = close_for_instance_end(&function_side, client_ended) {
            return instance_failed(&maps, &conn, code).await;
        }
    }
    let (from, from_cookie, to, to_written) = if from_client {
        (
            &conn.client,
            conn.pair.client,
            &conn.instance,
            conn.written.to_instance,
        )
    } else {
        (
            &conn.instance,
            conn.pair.instance,
            &conn.client,
            conn.written.to_client,
        )
    };
    if from_client && conn.progress.lock().expect("progress").instance_failed {
        // The client answered the close the proxy sent for the failed instance.
        return conn.finish(SpliceEnd::InstanceFailed);
    }
    if let Some(e) = socket::take_error(from) {
        let from_side = side_of(&maps, from_cookie).unwrap_or_default();
        if from_side.flags & FLAG_MESSAGE_TOO_BIG != 0 {
            // The parser refused a message over the limit: close both sides with 1009.
            return stop_by_proxy(maps, conn, Ending::MessageTooBig).await;
        }
        return conn.finish(SpliceEnd::Aborted(e));
    }
    if let Err(e) = flush(&maps, from_cookie, to, to_written, FLUSH_TIMEOUT).await {
        return conn.finish(SpliceEnd::Aborted(e));
    }
    // Marked before the FIN is passed on: the peer's answering FIN must find it set.
    let both = {
        let mut p = conn.progress.lock().expect("progress");
        if from_client {
            p.client_done = true
        } else {
            p.instance_done = true
        }
        p.client_done && p.instance_done
    };
    socket::shutdown_write(to);
    if both {
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
