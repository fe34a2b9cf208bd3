//! The table of open connections behind `GET /connections`, the `max_connections` count,
//! and the per-IP counts. Knows connections only through [`crate::conn`].

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
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

/// What `max_connections_per_ip` counts against: an IPv4 address, or an IPv6 /64. One
/// IPv6 host usually holds a whole /64 (SLAAC, privacy addresses), so counting per address
/// would let it open 2^64 times the limit. An IPv4-mapped IPv6 address (an IPv4 client on a
/// dual-stack listener) is that IPv4 address: otherwise every IPv4 client would share the
/// one /64 that holds `::ffff:0:0/96`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    V4(Ipv4Addr),
    /// The first 64 bits of the address.
    V6Prefix(u64),
}

impl From<IpAddr> for ClientKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => ClientKey::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(v4),
                None => ClientKey::V6Prefix((v6.to_bits() >> 64) as u64),
            },
        }
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientKey::V4(v4) => write!(f, "{v4}"),
            ClientKey::V6Prefix(prefix) => {
                write!(f, "{}/64", Ipv6Addr::from_bits(u128::from(*prefix) << 64))
            }
        }
    }
}

/// Open connections per client ([`ClientKey`]: IPv4 address or IPv6 /64), handshakes
/// included, for `max_connections_per_ip`.
#[derive(Default)]
pub struct ClientCounts {
    open: Mutex<HashMap<ClientKey, u32>>,
}

/// One client connection counted against its [`ClientKey`]; uncounted when dropped.
pub struct ClientSlot {
    counts: Arc<ClientCounts>,
    key: ClientKey,
}

impl ClientCounts {
    /// Counts a connection from `ip`; `Err` with the key it counts against when that key
    /// already has `limit` open.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        limit: Option<u32>,
    ) -> Result<ClientSlot, ClientKey> {
        let key = ClientKey::from(ip);
        let mut open = self.open.lock().expect("client counts lock");
        let n = open.entry(key).or_default();
        if limit.is_some_and(|limit| *n >= limit) {
            // An entry that was created only to be refused must not stay behind.
            if *n == 0 {
                open.remove(&key);
            }
            return Err(key);
        }
        *n += 1;
        Ok(ClientSlot {
            counts: self.clone(),
            key,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().expect("client counts lock");
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_per_ip_limit_counts_ipv6_per_64_and_ipv4_per_address() {
        let counts = Arc::new(ClientCounts::default());
        let limit = Some(2);
        let _a = counts.admit(ip("2001:db8:1:2::1"), limit).expect("first");
        let _b = counts
            .admit(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"), limit)
            .expect("second, same /64");
        let refused = counts.admit(ip("2001:db8:1:2:abcd::9"), limit).err();
        assert_eq!(
            refused.map(|key| key.to_string()).as_deref(),
            Some("2001:db8:1:2::/64"),
            "a third address of the same /64 is over the limit"
        );
        assert!(
            counts.admit(ip("2001:db8:1:3::1"), limit).is_ok(),
            "the next /64 is another client"
        );
        let _c = counts.admit(ip("192.0.2.1"), limit).expect("IPv4");
        let _d = counts.admit(ip("192.0.2.1"), limit).expect("IPv4 again");
        assert!(counts.admit(ip("192.0.2.1"), limit).is_err());
        assert!(
            counts.admit(ip("192.0.2.2"), limit).is_ok(),
            "IPv4 counts per address, not per prefix"
        );
    }

    #[test]
    fn an_ipv4_mapped_address_counts_as_its_ipv4_address() {
        let counts = Arc::new(ClientCounts::default());
        let _v4 = counts.admit(ip("192.0.2.1"), Some(1)).expect("first");
        let refused = counts.admit(ip("::ffff:192.0.2.1"), Some(1)).err();
        assert_eq!(refused, Some(ClientKey::V4("192.0.2.1".parse().unwrap())));
        // Another IPv4 client on a dual-stack listener is not in the same /64 as the first.
        assert!(counts.admit(ip("::ffff:192.0.2.2"), Some(1)).is_ok());
    }

    #[test]
    fn a_slot_is_given_back_when_dropped_and_refusals_leave_nothing_behind() {
        let counts = Arc::new(ClientCounts::default());
        let slot = counts.admit(ip("2001:db8::1"), Some(1)).expect("first");
        assert!(counts.admit(ip("2001:db8::2"), Some(1)).is_err());
        drop(slot);
        assert!(counts.open.lock().unwrap().is_empty(), "no entry left");
        let _again = counts
            .admit(ip("2001:db8::2"), Some(1))
            .expect("free again");
        assert!(counts.admit(ip("198.51.100.1"), Some(0)).is_err());
        assert_eq!(
            counts.open.lock().unwrap().len(),
            1,
            "the refusal left no entry"
        );
    }
}
