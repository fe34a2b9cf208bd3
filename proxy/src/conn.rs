//! One accepted WebSocket as every part of the proxy sees it: who it is, its limits, its
//! counters, and the stop signal the proxy uses to end it. Depends on nothing but the shared
//! policy types: the data planes and the registry both build on it.

use std::{
    net::SocketAddr,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::SystemTime,
};

use proxy_common::{SideState, maps::FLAG_CLOSE_SEEN, policy::Ending, rate::RateState};
use serde::{Deserialize, Serialize};

/// Which way bytes flow, and which of a connection's two sides they are accounted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ClientToInstance = 0,
    InstanceToClient = 1,
}

/// A connection's id: when it was accepted (ms since the epoch, hex) and a sequence number,
/// formatted on demand so an idle connection does not carry the string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionId {
    pub(crate) epoch_ms: u64,
    pub(crate) key: u64,
}

impl std::fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}-{}", self.epoch_ms, self.key)
    }
}

/// A function's per-connection timers (seconds), message limit (bytes, both directions) and
/// client -> function rate quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub idle_timeout_s: u64,
    pub execution_timeout_s: u64,
    pub max_message_bytes: u64,
    /// The quotas, with meters that have seen nothing yet.
    pub rate: RateState,
}

/// The kernel's names for a spliced connection: the cookies of the sockets whose received
/// frames each direction counts (client -> instance on `client`, the other on `instance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelKeys {
    pub client: u64,
    pub instance: u64,
}

/// Where the live counters of a connection the kernel carries come from; implemented by the
/// kernel data plane, so this module and the registry need not know it.
pub trait LiveCounters {
    /// The kernel's counters of one direction, by the cookie of its receiving socket.
    fn side(&self, cookie: u64) -> Option<SideState>;
}

/// Which data plane carries a connection: the names `/connections` and the logs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PlaneName {
    /// The userspace relay.
    Userspace = 0,
    /// The two-socket kernel splice.
    Kernel = 1,
    /// The instance's own socket in the splice.
    KernelZeroHop = 2,
    /// The userspace relay, rustls encrypting and decrypting (`wss://` without kernel TLS).
    UserspaceTls = 3,
    /// The userspace relay reading and writing plaintext, the kernel encrypting and
    /// decrypting the client's TLS records.
    UserspaceKtls = 4,
}

impl PlaneName {
    pub fn as_str(self) -> &'static str {
        match self {
            PlaneName::Userspace => "userspace",
            PlaneName::Kernel => "kernel",
            PlaneName::KernelZeroHop => "kernel-zero-hop",
            PlaneName::UserspaceTls => "userspace-tls",
            PlaneName::UserspaceKtls => "userspace-ktls",
        }
    }

    /// Whether the client connected with `wss://`.
    pub fn tls(self) -> bool {
        matches!(self, PlaneName::UserspaceTls | PlaneName::UserspaceKtls)
    }

    /// Whether the userspace relay carries every byte.
    pub fn relayed(self) -> bool {
        matches!(
            self,
            PlaneName::Userspace | PlaneName::UserspaceTls | PlaneName::UserspaceKtls
        )
    }

    fn from_u8(v: u8) -> PlaneName {
        match v {
            1 => PlaneName::Kernel,
            2 => PlaneName::KernelZeroHop,
            3 => PlaneName::UserspaceTls,
            4 => PlaneName::UserspaceKtls,
            _ => PlaneName::Userspace,
        }
    }
}

/// One accepted (upgraded) connection. Kept small: thousands stay open for hours.
pub struct Connection {
    pub id: ConnectionId,
    /// Shared with the route and the instance: not a copy per connection.
    pub function: std::sync::Arc<str>,
    pub instance: std::sync::Arc<str>,
    pub client: SocketAddr,
    pub started_at: SystemTime,
    /// A [`PlaneName`]: set at registration, changed once if the kernel had no room and the
    /// relay carries the connection instead.
    plane: AtomicU8,
    /// Counters userspace accounted itself: the whole stream on the relay, only the bytes
    /// forwarded by hand around the handshake on the kernel path.
    sides: Mutex<[SideState; 2]>,
    /// Set before the sockets enter the kernel's maps, so the counters of the first frames
    /// the kernel carries are visible; cleared if the splice could not be set up.
    kernel: Mutex<Option<KernelKeys>>,
    /// Monotonic time of the upgrade (the clock of `SideState::last_activity_ns`).
    pub started_ns: u64,
    /// The function's timers and message limit.
    pub limits: Limits,
    /// When the supervisor looks at this connection next (monotonic ns).
    next_check_ns: AtomicU64,
    /// Set once, when the proxy itself ends the connection; the data plane wakes on `stop`.
    stop_reason: OnceLock<Ending>,
    stop: tokio::sync::Notify,
    pub tracer: std::sync::Arc<crate::tracer::Tracer>,
    /// Whether `wsedge trace` was told the client's frames are being throttled.
    trace_throttled: std::sync::atomic::AtomicBool,
}

/// What `/connections` shows for one connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectionView {
    pub id: String,
    pub function: String,
    pub instance: String,
    pub client: String,
    pub started_at: String,
    pub data_plane: String,
    /// Whether the client connected with `wss://`.
    pub tls: bool,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub frames_in: u64,
    pub frames_out: u64,
    /// Payload bytes userspace read and wrote itself (zero once the kernel carries frames,
    /// apart from bytes pipelined with the handshake).
    pub bytes_relayed_by_userspace: u64,
    /// Time the client's frames waited for the rate quotas (`on_exceed = "throttle"`).
    pub throttled_ms: u64,
}

/// Everything a connection is made from at registration.
pub struct NewConnection {
    /// Where its data-plane events go (`wsedge trace`).
    pub tracer: std::sync::Arc<crate::tracer::Tracer>,
    pub function: std::sync::Arc<str>,
    pub instance: std::sync::Arc<str>,
    pub client: SocketAddr,
    pub plane: PlaneName,
    pub limits: Limits,
}

impl Connection {
    pub(crate) fn new(id: ConnectionId, started_at: SystemTime, new: NewConnection) -> Self {
        let NewConnection {
            tracer,
            function,
            instance,
            client,
            plane,
            limits,
        } = new;
        Connection {
            id,
            function,
            instance,
            client,
            started_at,
            plane: AtomicU8::new(plane as u8),
            sides: Mutex::new({
                let side = SideState {
                    max_message_bytes: limits.max_message_bytes,
                    ..SideState::default()
                };
                // Rates apply to what the client sends only.
                let client = SideState {
                    rate: limits.rate,
                    ..side
                };
                [client, side]
            }),
            kernel: Mutex::new(None),
            started_ns: crate::clock::monotonic_ns(),
            limits,
            next_check_ns: AtomicU64::new(0),
            stop_reason: OnceLock::new(),
            stop: tokio::sync::Notify::new(),
            tracer,
            trace_throttled: Default::default(),
        }
    }

    pub fn trace_throttled(&self) -> &std::sync::atomic::AtomicBool {
        &self.trace_throttled
    }

    /// The data plane carrying the connection now.
    pub fn plane(&self) -> PlaneName {
        PlaneName::from_u8(self.plane.load(Ordering::Relaxed))
    }

    /// The kernel had no room: the relay carries the connection from here on.
    pub fn set_plane(&self, plane: PlaneName) {
        self.plane.store(plane as u8, Ordering::Relaxed);
    }

    pub fn account<T>(&self, direction: Direction, f: impl FnOnce(&mut SideState) -> T) -> T {
        f(&mut self.sides.lock().expect("sides lock")[direction as usize])
    }

    /// Both directions' userspace counters (client -> instance, instance -> client).
    pub fn sides(&self) -> [SideState; 2] {
        *self.sides.lock().expect("sides lock")
    }

    /// The kernel carries (or is about to carry) the connection under these keys; `None`:
    /// it does not (any more).
    pub fn set_kernel_keys(&self, keys: Option<KernelKeys>) {
        *self.kernel.lock().expect("kernel keys lock") = keys;
    }

    pub fn kernel_keys(&self) -> Option<KernelKeys> {
        *self.kernel.lock().expect("kernel keys lock")
    }

    /// Asks the data plane to end the connection (the first request wins); false when it
    /// was already asked.
    pub fn request_stop(&self, ending: Ending) -> bool {
        let first = self.stop_reason.set(ending).is_ok();
        if first {
            self.stop.notify_waiters();
        }
        first
    }

    pub fn stop_reason(&self) -> Option<Ending> {
        self.stop_reason.get().copied()
    }

    /// Resolves once [`Connection::request_stop`] was called (also if it already was).
    pub async fn stopped(&self) {
        loop {
            let notified = self.stop.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.stop_reason.get().is_some() {
                return;
            }
            notified.await;
        }
    }

    pub fn next_check_ns(&self) -> u64 {
        self.next_check_ns.load(Ordering::Relaxed)
    }

    pub fn set_next_check_ns(&self, at: u64) {
        self.next_check_ns.store(at, Ordering::Relaxed);
    }

    /// Counters of both directions: userspace's own plus the kernel's live ones, if the kernel
    /// carries the connection; and how many bytes userspace relayed itself.
    pub fn totals(&self, live: Option<&dyn LiveCounters>) -> ([SideState; 2], u64) {
        let [mut inbound, mut outbound] = self.sides();
        let by_userspace = inbound.bytes + outbound.bytes;
        if let (Some(live), Some(keys)) = (live, self.kernel_keys()) {
            add(&mut inbound, live.side(keys.client).unwrap_or_default());
            add(&mut outbound, live.side(keys.instance).unwrap_or_default());
        }
        ([inbound, outbound], by_userspace)
    }

    /// Folds the kernel's final counters in after the connection left the maps.
    pub fn absorb_kernel(&self, inbound: SideState, outbound: SideState) {
        self.set_kernel_keys(None);
        let mut sides = self.sides.lock().expect("sides lock");
        add(&mut sides[0], inbound);
        add(&mut sides[1], outbound);
    }

    pub fn view(&self, live: Option<&dyn LiveCounters>) -> ConnectionView {
        let ([i, o], by_userspace) = self.totals(live);
        let plane = self.plane();
        let relayed = if plane.relayed() {
            i.bytes + o.bytes
        } else {
            by_userspace
        };
        ConnectionView {
            id: self.id.to_string(),
            function: self.function.to_string(),
            instance: self.instance.to_string(),
            client: self.client.to_string(),
            started_at: humantime::format_rfc3339_millis(self.started_at).to_string(),
            data_plane: plane.as_str().to_string(),
            tls: plane.tls(),
            bytes_in: i.bytes,
            bytes_out: o.bytes,
            messages_in: i.messages,
            messages_out: o.messages,
            frames_in: i.frames,
            frames_out: o.frames,
            bytes_relayed_by_userspace: relayed,
            throttled_ms: throttled_ms(&i),
        }
    }
}

/// Time a direction's frames waited for its rate, including a wait still going on.
pub fn throttled_ms(side: &SideState) -> u64 {
    let waiting = match side.rate.waiting_since_ns {
        0 => 0,
        since => crate::clock::monotonic_ns().saturating_sub(since),
    };
    (side.rate.throttled_ns + waiting) / 1_000_000
}

/// Adds one set of a direction's counters to another: sums, the later activity, the first
/// close frame. The rate meters are not summed: each plane hands its meters to the next, so
/// only the throttled time each plane kept adds up.
pub fn add(total: &mut SideState, more: SideState) {
    total.rate.throttled_ns += more.rate.throttled_ns;
    total.rate.throttles += more.rate.throttles;
    total.rate.waiting_since_ns = total.rate.waiting_since_ns.max(more.rate.waiting_since_ns);
    total.bytes += more.bytes;
    total.frames += more.frames;
    total.messages += more.messages;
    total.last_activity_ns = total.last_activity_ns.max(more.last_activity_ns);
    if total.flags & FLAG_CLOSE_SEEN == 0 {
        total.close_code = more.close_code;
        total.close_at_ns = more.close_at_ns;
    }
    total.flags |= more.flags;
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Kernel([SideState; 2]);

    impl LiveCounters for Kernel {
        fn side(&self, cookie: u64) -> Option<SideState> {
            self.0.get(cookie as usize).copied()
        }
    }

    fn conn() -> Connection {
        Connection::new(
            ConnectionId {
                epoch_ms: 1,
                key: 2,
            },
            SystemTime::UNIX_EPOCH,
            NewConnection {
                tracer: crate::tracer::Tracer::new(None),
                function: "f".into(),
                instance: "f-1".into(),
                client: "127.0.0.1:1".parse().unwrap(),
                plane: PlaneName::Kernel,
                limits: Limits {
                    idle_timeout_s: 10,
                    execution_timeout_s: 20,
                    max_message_bytes: 30,
                    rate: RateState::default(),
                },
            },
        )
    }

    #[test]
    fn totals_add_the_kernels_live_counters_only_while_it_carries_the_connection() {
        let c = conn();
        c.account(Direction::ClientToInstance, |s| s.bytes = 5);
        let kernel = Kernel([
            SideState {
                bytes: 100,
                ..SideState::default()
            },
            SideState {
                bytes: 7,
                ..SideState::default()
            },
        ]);
        let ([i, o], by_userspace) = c.totals(Some(&kernel));
        assert_eq!((i.bytes, o.bytes, by_userspace), (5, 0, 5));
        c.set_kernel_keys(Some(KernelKeys {
            client: 0,
            instance: 1,
        }));
        let ([i, o], _) = c.totals(Some(&kernel));
        assert_eq!((i.bytes, o.bytes), (105, 7));
        c.absorb_kernel(kernel.0[0], kernel.0[1]);
        let ([i, o], _) = c.totals(Some(&kernel));
        assert_eq!(
            (i.bytes, o.bytes),
            (105, 7),
            "absorbed once, not added again"
        );
    }

    #[test]
    fn the_plane_name_follows_a_fallback_to_the_relay() {
        let c = conn();
        assert_eq!(c.view(None).data_plane, "kernel");
        c.set_plane(PlaneName::Userspace);
        assert_eq!(c.view(None).data_plane, "userspace");
    }

    #[test]
    fn the_first_stop_request_wins() {
        let c = conn();
        assert!(c.request_stop(Ending::IdleTimeout));
        assert!(!c.request_stop(Ending::Shutdown));
        assert_eq!(c.stop_reason(), Some(Ending::IdleTimeout));
    }
}
