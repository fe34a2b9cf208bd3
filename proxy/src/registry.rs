//! The table of open connections behind `GET /connections`, the `max_connections` count,
//! and the per-IP counts. Knows connections only through [`crate::conn`].

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::SystemTime,
};

pub use crate::conn::{Connection, ConnectionView, Direction, Limits, PlaneName};
use crate::conn::{ConnectionId, NewConnection};

#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<Connection>>>,
    /// Connections counted against `max_connections`: registered ones and those whose
    /// upgrade is under way.
    reserved: AtomicUsize,
}

/// A place among `max_connections`, taken before the upgrade and kept by the connection it
/// becomes; given back when dropped.
pub struct Reservation {
    registry: Arc<Registry>,
    id: ConnectionId,
}

impl Reservation {
    /// The id the connection will have: known before the upgrade, so the function is told it.
    pub fn id(&self) -> ConnectionId {
        self.id
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.registry.reserved.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Removes its connection from the registry when dropped, however the connection ends.
pub struct Registered {
    registry: Arc<Registry>,
    key: u64,
    pub conn: Arc<Connection>,
    _reservation: Reservation,
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
    /// Takes a place for a connection about to be upgraded; `None` when `max` are taken.
    pub fn reserve(self: &Arc<Self>, max: usize) -> Option<Reservation> {
        self.reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let epoch_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        Some(Reservation {
            registry: self.clone(),
            id: ConnectionId { epoch_ms, key },
        })
    }

    pub fn register(self: &Arc<Self>, reservation: Reservation, new: NewConnection) -> Registered {
        let key = reservation.id.key;
        let conn = Arc::new(Connection::new(reservation.id, SystemTime::now(), new));
        self.open
            .lock()
            .expect("registry lock")
            .insert(key, conn.clone());
        Registered {
            registry: self.clone(),
            key,
            conn,
            _reservation: reservation,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stop_at_max_and_come_back_when_dropped() {
        let registry = Arc::new(Registry::default());
        let a = registry.reserve(2).expect("first");
        let _b = registry.reserve(2).expect("second");
        assert!(registry.reserve(2).is_none(), "a third over max 2");
        drop(a);
        assert!(registry.reserve(2).is_some(), "a place came back");
    }
}
