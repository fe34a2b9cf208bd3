//! The table of open connections behind `GET /connections`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use proxy_common::{SideState, policy::Ending};
use serde::Serialize;

use crate::data_plane::{
    DataPlane,
    kernel::{KernelDataPlane, SplicedPair},
    relay::Direction,
};

/// A connection's id: when it was accepted (ms since the epoch, hex) and a sequence number,
/// formatted on demand so an idle connection does not carry the string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionId {
    epoch_ms: u64,
    key: u64,
}

impl std::fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}-{}", self.epoch_ms, self.key)
    }
}

/// One accepted (upgraded) connection. Kept small: thousands stay open for hours.
pub struct Connection {
    pub id: ConnectionId,
    /// Shared with the route and the instance: not a copy per connection.
    pub function: Arc<str>,
    pub instance: Arc<str>,
    pub client: SocketAddr,
    pub started_at: SystemTime,
    pub data_plane: &'static str,
    /// Counters userspace accounted itself: the whole stream on the relay, only the bytes
    /// forwarded by hand around the handshake on the kernel path.
    sides: Mutex<[SideState; 2]>,
    /// Set once the kernel carries the connection.
    spliced: OnceLock<SplicedPair>,
    /// Monotonic time of the upgrade (the clock of `SideState::last_activity_ns`).
    pub started_ns: u64,
    /// The function's timers and message limit.
    pub limits: Limits,
    /// When the supervisor looks at this connection next (monotonic ns).
    next_check_ns: AtomicU64,
    /// Set once, when the proxy itself ends the connection; the relay wakes on `stop`.
    stop_reason: OnceLock<Ending>,
    stop: tokio::sync::Notify,
}

/// A function's per-connection timers (seconds) and message limit (bytes, both directions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub idle_timeout_s: u64,
    pub execution_timeout_s: u64,
    pub max_message_bytes: u64,
}

/// What `/connections` shows for one connection.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ConnectionView {
    pub id: String,
    pub function: String,
    pub instance: String,
    pub client: String,
    pub started_at: String,
    pub data_plane: String,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub frames_in: u64,
    pub frames_out: u64,
    /// Payload bytes userspace read and wrote itself (zero once the kernel carries frames,
    /// apart from bytes pipelined with the handshake).
    pub bytes_relayed_by_userspace: u64,
}

impl Connection {
    pub fn account<T>(&self, direction: Direction, f: impl FnOnce(&mut SideState) -> T) -> T {
        f(&mut self.sides.lock().expect("sides lock")[direction as usize])
    }

    pub fn set_spliced(&self, pair: SplicedPair) {
        let _ = self.spliced.set(pair);
    }

    pub fn spliced_pair(&self) -> Option<SplicedPair> {
        self.spliced.get().copied()
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

    /// Counters of both directions: userspace's own plus the kernel's, if spliced.
    pub fn totals(&self, kernel: Option<&KernelDataPlane>) -> ([SideState; 2], u64) {
        let [mut inbound, mut outbound] = *self.sides.lock().expect("sides lock");
        let by_userspace = inbound.bytes + outbound.bytes;
        if let (Some(kernel), Some(pair)) = (kernel, self.spliced.get()) {
            add(&mut inbound, kernel.side(pair.client).unwrap_or_default());
            add(
                &mut outbound,
                kernel.side(pair.instance).unwrap_or_default(),
            );
        }
        ([inbound, outbound], by_userspace)
    }

    /// Folds the kernel's final counters in after the connection left the maps.
    pub fn absorb_kernel(&self, inbound: SideState, outbound: SideState) {
        let mut sides = self.sides.lock().expect("sides lock");
        add(&mut sides[0], inbound);
        add(&mut sides[1], outbound);
    }

    pub fn view(&self, data_plane: &DataPlane) -> ConnectionView {
        let kernel = match data_plane {
            DataPlane::Kernel(k) => Some(k.as_ref()),
            DataPlane::Userspace => None,
        };
        let ([i, o], by_userspace) = self.totals(kernel);
        let relayed = if self.data_plane == "userspace" {
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
            data_plane: self.data_plane.to_string(),
            bytes_in: i.bytes,
            bytes_out: o.bytes,
            messages_in: i.messages,
            messages_out: o.messages,
            frames_in: i.frames,
            frames_out: o.frames,
            bytes_relayed_by_userspace: relayed,
        }
    }
}

fn add(total: &mut SideState, more: SideState) {
    total.bytes += more.bytes;
    total.frames += more.frames;
    total.messages += more.messages;
    total.last_activity_ns = total.last_activity_ns.max(more.last_activity_ns);
    if total.flags & proxy_common::maps::FLAG_CLOSE_SEEN == 0 {
        total.close_code = more.close_code;
        total.close_at_ns = more.close_at_ns;
    }
    total.flags |= more.flags;
}

#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<Connection>>>,
}

/// Removes its connection from the registry when dropped, however the connection ends.
pub struct Registered {
    registry: Arc<Registry>,
    key: u64,
    pub conn: Arc<Connection>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry
            .open
            .lock()
            .expect("registry lock")
            .remove(&self.key);
    }
}

impl Registry {
    pub fn register(
        self: &Arc<Self>,
        function: Arc<str>,
        instance: Arc<str>,
        client: SocketAddr,
        data_plane: &'static str,
        limits: Limits,
    ) -> Registered {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let started_at = SystemTime::now();
        let epoch_ms = started_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let conn = Arc::new(Connection {
            id: ConnectionId { epoch_ms, key },
            function,
            instance,
            client,
            started_at,
            data_plane,
            sides: Mutex::new(
                [SideState {
                    max_message_bytes: limits.max_message_bytes,
                    ..SideState::default()
                }; 2],
            ),
            spliced: OnceLock::new(),
            started_ns: crate::data_plane::socket::monotonic_ns(),
            limits,
            next_check_ns: AtomicU64::new(0),
            stop_reason: OnceLock::new(),
            stop: tokio::sync::Notify::new(),
        });
        self.open
            .lock()
            .expect("registry lock")
            .insert(key, conn.clone());
        Registered {
            registry: self.clone(),
            key,
            conn,
        }
    }

    pub fn snapshot(&self) -> Vec<Arc<Connection>> {
        self.open
            .lock()
            .expect("registry lock")
            .values()
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.open.lock().expect("registry lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Open connections per client IP (handshakes included), for `max_connections_per_ip`.
#[derive(Default)]
pub struct ClientCounts {
    open: Mutex<std::collections::HashMap<std::net::IpAddr, u32>>,
}

/// One client connection counted against its IP; uncounted when dropped.
pub struct ClientSlot {
    counts: Arc<ClientCounts>,
    ip: std::net::IpAddr,
}

impl ClientCounts {
    /// Counts a connection from `ip`; `None` when `ip` already has `limit` open.
    pub fn admit(self: &Arc<Self>, ip: std::net::IpAddr, limit: Option<u32>) -> Option<ClientSlot> {
        let mut open = self.open.lock().expect("client counts lock");
        let n = open.entry(ip).or_default();
        if limit.is_some_and(|limit| *n >= limit) {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().expect("client counts lock");
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}
