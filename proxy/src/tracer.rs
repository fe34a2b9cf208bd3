//! Data-plane events for `wsedge trace`: one stream that merges the kernel programs' trace
//! records with what userspace sees on the paths it carries (the relay, a client handed back
//! to userspace) and each connection's start and end.
//!
//! `wsedge trace` reads it through the admin API (`GET /trace`), not from the pinned ring
//! itself: a BPF ring buffer has one read position, so two readers would steal each other's
//! records; the kernel knows sockets by cookie only, while the connection id and function are
//! here; and the admin API already has its bearer token.
//!
//! Order: before a userspace event is sent, the kernel ring is drained, so a connection's
//! kernel records (a close frame the kernel passed) come before what userspace saw after them
//! (its end).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, SystemTime},
};

use proxy_common::{
    SideState,
    maps::FLAG_CLOSE_SEEN,
    trace::{self as kernel, TraceRecord},
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::{
    clock::monotonic_ns,
    conn::{Connection, Direction, KernelKeys, PlaneName},
    data_plane::kernel::{KernelDataPlane, TraceRing},
    protocols::frames::{FrameCursor, FrameError},
};

/// One line of `wsedge trace --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceEvent {
    /// RFC 3339 UTC, microseconds.
    pub time: String,
    /// The connection's id, as in `/connections` and the ledger.
    pub id: String,
    pub function: String,
    /// `in` (client -> function) or `out` (function -> client); absent for the connection's
    /// own events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    /// Who sent the frames of `direction`: `client` (in) or `function` (out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub side: Option<String>,
    /// spliced, relayed, handed_to_userspace, close_frame, message_too_big, protocol_error,
    /// throttle_on, throttle_off, rate_close, redirect_failed, ended, lost.
    pub event: String,
    /// `kernel`: a trace point of the kernel programs; `proxy`: userspace.
    pub source: String,
    /// The close frame's code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    /// The function status a connection ended with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_plane: Option<String>,
    /// Why a connection went to userspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The refused frame's payload length; events lost (`lost`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

impl TraceEvent {
    /// `count` events were lost: by `source` (`kernel`: its ring was full; `proxy`: a
    /// listener fell behind). About no connection.
    pub fn lost(source: &str, count: u64) -> TraceEvent {
        TraceEvent {
            time: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            id: String::new(),
            function: String::new(),
            direction: None,
            side: None,
            event: "lost".into(),
            source: source.into(),
            code: None,
            status: None,
            data_plane: None,
            reason: None,
            count: Some(count),
        }
    }
}

/// What a feed of frames through a cursor returned, and the cursor.
pub struct Fed<'a> {
    pub result: &'a Result<(), FrameError>,
    pub cursor: &'a FrameCursor,
}

/// The hub. Sending costs an atomic load while nobody listens.
pub struct Tracer {
    sender: broadcast::Sender<Arc<TraceEvent>>,
    listeners: AtomicU32,
    kernel: Option<Arc<KernelDataPlane>>,
    /// Kernel side cookies -> their connection and direction.
    sides: Mutex<HashMap<u64, (Weak<Connection>, Direction)>>,
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC, for the kernel's timestamps.
    wall_offset_ns: i128,
    /// Kernel records lost to a full ring, as last reported.
    kernel_lost: AtomicU32,
}

/// How many events a listener may fall behind before it is told it lost some.
const BACKLOG: usize = 8192;

impl Tracer {
    pub fn new(kernel: Option<Arc<KernelDataPlane>>) -> Arc<Tracer> {
        let wall = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as i128;
        let tracer = Arc::new(Tracer {
            sender: broadcast::channel(BACKLOG).0,
            listeners: AtomicU32::new(0),
            kernel,
            sides: Mutex::default(),
            wall_offset_ns: wall - monotonic_ns() as i128,
            kernel_lost: AtomicU32::new(0),
        });
        if tracer.kernel.is_some() {
            tokio::spawn(read_kernel(Arc::downgrade(&tracer)));
        }
        tracer
    }

    pub fn listening(&self) -> bool {
        self.listeners.load(Ordering::Relaxed) > 0
    }

    /// A new listener; the kernel's trace points are on while there is at least one.
    pub fn subscribe(self: &Arc<Self>) -> Subscription {
        let receiver = self.sender.subscribe();
        let n = self.listeners.fetch_add(1, Ordering::SeqCst) + 1;
        self.set_kernel_listeners(n);
        Subscription {
            receiver,
            tracer: self.clone(),
        }
    }

    fn set_kernel_listeners(&self, n: u32) {
        if let Some(ring) = &self.kernel
            && let Err(e) = ring.trace().set_listeners(n)
        {
            tracing::warn!(error = %e, "cannot switch the kernel's trace points");
        }
    }

    /// The kernel carries `conn` under `keys` from now on.
    pub fn watch(&self, conn: &Arc<Connection>, keys: KernelKeys) {
        if self.kernel.is_none() {
            return;
        }
        let mut sides = self.sides.lock().expect("trace sides lock");
        sides.insert(
            keys.client,
            (Arc::downgrade(conn), Direction::ClientToInstance),
        );
        sides.insert(
            keys.instance,
            (Arc::downgrade(conn), Direction::InstanceToClient),
        );
    }

    /// `conn` starts on `plane`: spliced into the kernel, or carried by the relay.
    pub fn started(&self, conn: &Connection, plane: PlaneName) {
        let event = match plane {
            PlaneName::Kernel | PlaneName::KernelZeroHop => "spliced",
            _ => "relayed",
        };
        self.send_proxy(conn, None, event, |e| {
            e.data_plane = Some(plane.as_str().into())
        });
    }

    /// The kernel could not take `conn`: the relay carries it.
    pub fn not_spliced(&self, conn: &Connection) {
        self.send_proxy(conn, None, "handed_to_userspace", |e| {
            e.reason = Some("kernel_maps_full".into());
            e.data_plane = Some(PlaneName::Userspace.as_str().into());
        });
    }

    /// `conn` ended with `status` (`None`: a socket error ended it); its kernel records up to
    /// here are sent first.
    pub fn ended(&self, conn: &Connection, status: Option<u16>) {
        self.send_proxy(conn, None, "ended", |e| {
            e.status = status;
            e.data_plane = Some(conn.plane().as_str().into());
        });
        if let Some(keys) = conn.kernel_keys() {
            let mut sides = self.sides.lock().expect("trace sides lock");
            sides.remove(&keys.client);
            sides.remove(&keys.instance);
        }
    }

    /// After userspace fed a direction's frames through its cursor (`before` and `after`
    /// its counters): the close frame, refusal or throttle change that feed saw.
    pub fn fed(
        &self,
        conn: &Connection,
        direction: Direction,
        before: &SideState,
        after: &SideState,
        fed: &Fed<'_>,
    ) {
        if !self.listening() {
            return;
        }
        let result = fed.result;
        // The kernel's records of this connection first: a throttle the kernel began is
        // the one this feed continues.
        self.drain_kernel();
        let dir = Some(direction);
        let throttling = conn.trace_throttled();
        match result {
            Err(FrameError::Throttled { .. }) => {
                if !throttling.swap(true, Ordering::Relaxed) {
                    self.send_proxy(conn, dir, "throttle_on", |_| {});
                }
                return;
            }
            Ok(())
                if direction == Direction::ClientToInstance
                    && after.frames > before.frames
                    && after.rate.waiting_since_ns == 0
                    && after.rate.throttled_ns == before.rate.throttled_ns
                    && throttling.swap(false, Ordering::Relaxed) =>
            {
                self.send_proxy(conn, dir, "throttle_off", |_| {});
            }
            _ => {}
        }
        if before.flags & FLAG_CLOSE_SEEN == 0 && after.flags & FLAG_CLOSE_SEEN != 0 {
            let code = after.close_code as u16;
            self.send_proxy(conn, dir, "close_frame", |e| e.code = Some(code));
        }
        if let Err(error) = result {
            let event = match error {
                FrameError::Header(_) => "protocol_error",
                FrameError::Policy(proxy_common::policy::FrameViolation::RateExceeded) => {
                    "rate_close"
                }
                FrameError::Policy(_) => "message_too_big",
                FrameError::Throttled { .. } => return,
            };
            let length = fed.cursor.refused_payload_len();
            self.send_proxy(conn, dir, event, |e| {
                if event != "protocol_error" {
                    e.count = length
                }
            });
        }
    }

    /// As [`Self::fed`], for a direction the kernel keys by `side_cookie` (a client handed
    /// back to userspace).
    pub fn fed_kernel_side(
        &self,
        side_cookie: u64,
        before: &SideState,
        after: &SideState,
        fed: &Fed<'_>,
    ) {
        if !self.listening() {
            return;
        }
        if let Some((conn, direction)) = self.side(side_cookie) {
            self.fed(&conn, direction, before, after, fed);
        }
    }

    fn send_proxy(
        &self,
        conn: &Connection,
        direction: Option<Direction>,
        event: &str,
        fill: impl FnOnce(&mut TraceEvent),
    ) {
        if !self.listening() {
            return;
        }
        self.drain_kernel();
        self.send(conn, direction, monotonic_ns(), event, "proxy", fill);
    }

    fn send(
        &self,
        conn: &Connection,
        direction: Option<Direction>,
        time_ns: u64,
        event: &str,
        source: &str,
        fill: impl FnOnce(&mut TraceEvent),
    ) {
        let wall = (time_ns as i128 + self.wall_offset_ns).max(0) as u128;
        let time = SystemTime::UNIX_EPOCH
            + Duration::new((wall / 1_000_000_000) as u64, (wall % 1_000_000_000) as u32);
        let mut line = TraceEvent {
            time: humantime::format_rfc3339_micros(time).to_string(),
            id: conn.id.to_string(),
            function: conn.function.to_string(),
            direction: direction.map(|d| direction_name(d).into()),
            side: direction.map(|d| sender(d).into()),
            event: event.into(),
            source: source.into(),
            code: None,
            status: None,
            data_plane: None,
            reason: None,
            count: None,
        };
        fill(&mut line);
        // No receiver left: the last listener went away meanwhile.
        let _ = self.sender.send(Arc::new(line));
    }

    /// Sends every record waiting in the kernel's ring.
    fn drain_kernel(&self) {
        if let Some(ring) = &self.kernel {
            ring.trace().drain(|record| self.kernel_record(&record));
        }
    }

    /// A `lost` notice if the kernel's ring overflowed since the last look (a map read: the
    /// reader task asks, not every feed).
    fn report_kernel_lost(&self) {
        let Some(ring) = &self.kernel else {
            return;
        };
        let ring: &TraceRing = ring.trace();
        let lost = ring.lost();
        let before = self.kernel_lost.swap(lost, Ordering::Relaxed);
        if lost > before {
            let notice = TraceEvent::lost("kernel", u64::from(lost - before));
            // No receiver left: the last listener went away meanwhile.
            let _ = self.sender.send(Arc::new(notice));
        }
    }

    /// The open connection and direction the kernel keys by `side_cookie`.
    fn side(&self, side_cookie: u64) -> Option<(Arc<Connection>, Direction)> {
        let sides = self.sides.lock().expect("trace sides lock");
        let (conn, direction) = sides.get(&side_cookie)?;
        Some((conn.upgrade()?, *direction))
    }

    fn kernel_record(&self, record: &TraceRecord) {
        // A connection that ended meanwhile: its end was already sent.
        let Some((conn, direction)) = self.side(record.side_cookie) else {
            return;
        };
        let (event, detail) = match record.kind {
            kernel::TRACE_CLOSE_FRAME => ("close_frame", None),
            kernel::TRACE_MESSAGE_TOO_BIG => ("message_too_big", None),
            kernel::TRACE_PROTOCOL_ERROR => ("protocol_error", None),
            kernel::TRACE_THROTTLE_ON => {
                conn.trace_throttled().store(true, Ordering::Relaxed);
                ("throttle_on", None)
            }
            kernel::TRACE_RATE_CLOSE => ("rate_close", None),
            kernel::TRACE_REDIRECT_FAILED => ("redirect_failed", None),
            kernel::TRACE_HANDED_TO_USERSPACE => (
                "handed_to_userspace",
                Some(match record.detail {
                    kernel::HANDED_RATE => "rate",
                    _ => "instance_behind",
                }),
            ),
            _ => return,
        };
        self.send(
            &conn,
            Some(direction),
            record.time_ns,
            event,
            "kernel",
            |e| {
                match record.kind {
                    kernel::TRACE_CLOSE_FRAME => e.code = Some(record.detail as u16),
                    kernel::TRACE_MESSAGE_TOO_BIG | kernel::TRACE_RATE_CLOSE => {
                        e.count = Some(record.value)
                    }
                    _ => {}
                }
                e.reason = detail.map(Into::into);
            },
        );
    }
}

/// Who sends the frames of `direction`.
fn sender(direction: Direction) -> &'static str {
    match direction {
        Direction::ClientToInstance => "client",
        Direction::InstanceToClient => "function",
    }
}

/// `in` (client -> function) or `out`.
fn direction_name(direction: Direction) -> &'static str {
    match direction {
        Direction::ClientToInstance => "in",
        Direction::InstanceToClient => "out",
    }
}

/// One listener's stream; the kernel's trace points go off with the last one dropped.
pub struct Subscription {
    pub receiver: broadcast::Receiver<Arc<TraceEvent>>,
    tracer: Arc<Tracer>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let n = self.tracer.listeners.fetch_sub(1, Ordering::SeqCst) - 1;
        self.tracer.set_kernel_listeners(n);
    }
}

/// Sends the kernel's records as they come, while the tracer exists.
async fn read_kernel(tracer: Weak<Tracer>) {
    let fd = {
        let Some(t) = tracer.upgrade() else { return };
        let Some(ring) = &t.kernel else { return };
        match ring.trace().readiness() {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the kernel's trace records");
                return;
            }
        }
    };
    // SAFETY: `fd` is owned here and stays open as long as the AsyncFd holds it.
    let reader = match unsafe { tokio::io::unix::AsyncFd::register(fd) } {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the kernel's trace records");
            return;
        }
    };
    loop {
        let Ok(mut guard) = reader.readable().await else {
            return;
        };
        guard.clear_ready();
        let Some(tracer) = tracer.upgrade() else {
            return;
        };
        tracer.drain_kernel();
        if tracer.listening() {
            tracer.report_kernel_lost();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use proxy_common::{FrameHeader, rate::RateState};

    use super::*;
    use crate::conn::{ConnectionId, Limits, NewConnection};

    fn connection(tracer: &Arc<Tracer>) -> Connection {
        Connection::new(
            ConnectionId {
                epoch_ms: 1,
                key: 7,
            },
            SystemTime::UNIX_EPOCH,
            NewConnection {
                tracer: tracer.clone(),
                function: "echo".into(),
                instance: "echo-1".into(),
                client: "127.0.0.1:1".parse().unwrap(),
                plane: PlaneName::Userspace,
                limits: Limits {
                    idle_timeout_s: 10,
                    execution_timeout_s: 20,
                    max_message_bytes: 30,
                    rate: RateState::default(),
                },
            },
        )
    }

    fn frame() -> FrameHeader {
        FrameHeader {
            fin: true,
            rsv: 0,
            opcode: 1,
            mask: Some([1, 2, 3, 4]),
            header_len: 6,
            payload_len: 4,
        }
    }

    /// Feeds nothing through a fresh cursor: what the tracer compares is `before`/`after`.
    fn fed(
        tracer: &Tracer,
        conn: &Connection,
        before: &SideState,
        after: &SideState,
        result: Result<(), FrameError>,
    ) {
        let cursor = FrameCursor::default();
        let fed = Fed {
            result: &result,
            cursor: &cursor,
        };
        tracer.fed(conn, Direction::ClientToInstance, before, after, &fed);
    }

    #[test]
    fn a_throttle_is_one_on_and_one_off_around_however_many_waits() {
        let tracer = Tracer::new(None);
        let conn = connection(&tracer);
        let mut listener = tracer.subscribe();
        let mut side = SideState::default();
        // Three frames wait in turn, each released later (its wait added to throttled_ns).
        for _ in 0..3 {
            let before = side;
            side.rate.waiting_since_ns = 5;
            fed(
                &tracer,
                &conn,
                &before,
                &side,
                Err(FrameError::Throttled { until_ns: 9 }),
            );
            let before = side;
            side.rate.waiting_since_ns = 0;
            side.rate.throttled_ns += 4;
            side.account(&frame(), 9);
            fed(&tracer, &conn, &before, &side, Ok(()));
        }
        // Then one passes at once: under the rate again.
        let before = side;
        side.account(&frame(), 20);
        fed(&tracer, &conn, &before, &side, Ok(()));
        // And a close frame.
        let before = side;
        side.record_close(1000);
        fed(&tracer, &conn, &before, &side, Ok(()));
        let mut events = Vec::new();
        while let Ok(e) = listener.receiver.try_recv() {
            events.push((e.event.clone(), e.direction.clone(), e.code));
        }
        let in_ = Some("in".to_string());
        assert_eq!(
            events,
            vec![
                ("throttle_on".into(), in_.clone(), None),
                ("throttle_off".into(), in_.clone(), None),
                ("close_frame".into(), in_, Some(1000)),
            ]
        );
        assert_eq!(tracer.listeners.load(Ordering::Relaxed), 1);
        drop(listener);
        assert!(
            !tracer.listening(),
            "the last listener gone turns tracing off"
        );
    }

    #[test]
    fn nothing_is_sent_while_nobody_listens() {
        let tracer = Tracer::new(None);
        let conn = connection(&tracer);
        let side = SideState::default();
        let mut closed = side;
        closed.record_close(1000);
        fed(&tracer, &conn, &side, &closed, Ok(()));
        tracer.ended(&conn, Some(200));
        let mut listener = tracer.subscribe();
        assert!(listener.receiver.try_recv().is_err());
    }
}
