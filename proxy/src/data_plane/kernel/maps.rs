//! The kernel's maps as userspace holds them, and the keys it computes for them. The lowest
//! layer of the kernel plane: the splice, the zero-hop path and teardown all build on it.

use std::{
    io,
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    sync::Mutex,
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, RingBuf, SockHash},
};
use proxy_common::{
    SideState,
    maps::{InstanceLink, InstanceRecord, ROLE_QUEUE_PROBE, SocketKey},
};

use super::LoadError;
use crate::conn::KernelKeys;

/// Hands every record waiting in `ring` to `each`, oldest first, as the `T` the programs
/// write one of per record (shorter records, which they never write, are skipped).
pub(super) fn drain_records<T: aya::Pod>(ring: &mut RingBuf<MapData>, mut each: impl FnMut(T)) {
    while let Some(item) = ring.next() {
        if item.len() >= std::mem::size_of::<T>() {
            // SAFETY: at least size_of::<T>() bytes, and any bytes are a valid `T` (Pod).
            each(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
        }
    }
}

/// Bytes userspace itself wrote to each socket before the splice (handshake, leftovers).
#[derive(Debug, Clone, Copy, Default)]
pub struct WrittenByHand {
    pub to_client: u64,
    pub to_instance: u64,
}

pub(super) struct Maps {
    pub(super) spliced: SockHash<MapData, u64>,
    pub(super) targets: SockHash<MapData, u64>,
    pub(super) sides: HashMap<MapData, u64, SideState>,
    pub(super) zero_hop: ZeroHopMaps,
}

/// The maps of the zero-hop path.
pub(super) struct ZeroHopMaps {
    pub(super) instance_sockets: SockHash<MapData, SocketKey>,
    /// Instance sockets the sock_ops program recorded (a sockhash cannot be queried from
    /// userspace for a socket it holds).
    pub(super) instance_records: HashMap<MapData, SocketKey, InstanceRecord>,
    pub(super) client_links: HashMap<MapData, u64, proxy_common::maps::ClientLink>,
    pub(super) instance_links: HashMap<MapData, SocketKey, InstanceLink>,
    /// A loopback connection whose first socket asks the kernel about instance queues (its
    /// writes bounce back into it); the second only keeps the first connected.
    pub(super) probe: Option<(TcpStream, TcpStream, SocketKey)>,
}

/// The two instance-side sockets of one zero-hop connection, as the kernel keys them.
#[derive(Debug, Clone, Copy)]
pub struct ZeroHopKeys {
    /// The socket the instance accepted.
    pub instance: SocketKey,
    /// The proxy's socket connected to it.
    pub proxy: SocketKey,
    /// The client socket's key in `INSTANCE_SOCKETS`: it is there only so that its sk_msg
    /// program can record where the socket is.
    pub client: SocketKey,
    /// Where the instance socket's `struct tcp_sock` is (recorded by the kernel).
    pub(super) instance_sk: u64,
}

/// A socket's key as the kernel programs compute it from the socket itself. IPv6 addresses
/// other than v4-mapped ones read as 0 there.
pub(super) fn socket_key(netns_cookie: u64, local: SocketAddr, remote: SocketAddr) -> SocketKey {
    let ip4 = |a: &SocketAddr| match a {
        SocketAddr::V4(a) => u32::from_ne_bytes(a.ip().octets()),
        SocketAddr::V6(a) => a
            .ip()
            .to_ipv4_mapped()
            .map_or(0, |ip| u32::from_ne_bytes(ip.octets())),
    };
    SocketKey {
        netns_cookie,
        local_ip4: ip4(&local),
        remote_ip4: ip4(&remote),
        local_port: local.port() as u32,
        remote_port: remote.port() as u32,
    }
}

/// Takes a map of the loaded object, typed.
pub(super) fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| LoadError::Map(name, "missing from object".into()))?;
    T::try_from(map).map_err(|e| LoadError::Map(name, e.to_string()))
}

pub(super) fn to_io(e: aya::maps::MapError) -> io::Error {
    io::Error::other(e.to_string())
}

/// One direction's kernel counters, by the cookie of the socket its frames arrive on.
pub(super) fn side_of(maps: &Mutex<Maps>, cookie: u64) -> Option<SideState> {
    maps.lock().expect("maps lock").sides.get(&cookie, 0).ok()
}

impl Maps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Maps, LoadError> {
        Ok(Maps {
            spliced: take_map(ebpf, "SPLICED")?,
            targets: take_map(ebpf, "TARGETS")?,
            sides: take_map(ebpf, "SIDES")?,
            zero_hop: ZeroHopMaps {
                instance_sockets: take_map(ebpf, "INSTANCE_SOCKETS")?,
                instance_records: take_map(ebpf, "INSTANCE_RECORDS")?,
                client_links: take_map(ebpf, "CLIENT_LINKS")?,
                instance_links: take_map(ebpf, "INSTANCE_LINKS")?,
                probe: None,
            },
        })
    }

    /// Both directions' state, made before either socket enters a map with programs;
    /// `client_flags` marks the client side (zero-hop).
    pub(super) fn insert_sides(
        &mut self,
        pair: KernelKeys,
        written: WrittenByHand,
        max_message_bytes: u64,
        rate: proxy_common::rate::RateState,
        client_flags: u32,
    ) -> io::Result<()> {
        let side = |peer, peer_written_by_hand, flags| SideState {
            peer_cookie: peer,
            peer_written_by_hand,
            max_message_bytes,
            flags,
            ..SideState::default()
        };
        let client = SideState {
            rate,
            ..side(pair.instance, written.to_instance, client_flags)
        };
        let instance = side(pair.client, written.to_client, 0);
        for (cookie, state) in [(pair.client, client), (pair.instance, instance)] {
            self.sides.insert(cookie, state, 0).map_err(to_io)?;
        }
        Ok(())
    }

    /// The two-socket splice's entries: both sockets become redirect targets, then both
    /// enter `SPLICED` (whichever side sends first, its peer is already a valid target).
    pub(super) fn insert_splice(
        &mut self,
        client: &TcpStream,
        instance: &TcpStream,
        pair: KernelKeys,
    ) -> io::Result<()> {
        self.targets
            .insert(pair.client, client.as_raw_fd(), 0)
            .map_err(to_io)?;
        self.targets
            .insert(pair.instance, instance.as_raw_fd(), 0)
            .map_err(to_io)?;
        self.spliced
            .insert(pair.instance, instance.as_raw_fd(), 0)
            .map_err(to_io)?;
        self.spliced
            .insert(pair.client, client.as_raw_fd(), 0)
            .map_err(to_io)
    }

    /// Removes a connection from every map and returns its final kernel counters
    /// (client -> instance, instance -> client).
    pub(super) fn remove(
        &mut self,
        pair: KernelKeys,
        zero_hop: Option<&ZeroHopKeys>,
    ) -> (SideState, SideState) {
        for cookie in [pair.client, pair.instance] {
            let _ = self.spliced.remove(&cookie);
        }
        if let Some(keys) = zero_hop {
            self.zero_hop.remove(pair.client, keys);
        }
        for cookie in [pair.client, pair.instance] {
            let _ = self.targets.remove(&cookie);
        }
        let inbound = self.sides.get(&pair.client, 0).unwrap_or_default();
        let outbound = self.sides.get(&pair.instance, 0).unwrap_or_default();
        let _ = self.sides.remove(&pair.client);
        let _ = self.sides.remove(&pair.instance);
        (inbound, outbound)
    }
}

impl ZeroHopMaps {
    fn remove(&mut self, client: u64, keys: &ZeroHopKeys) {
        let _ = self.client_links.remove(&client);
        let _ = self.instance_links.remove(&keys.instance);
        let _ = self.instance_links.remove(&keys.proxy);
        let _ = self.instance_records.remove(&keys.instance);
        let _ = self.instance_sockets.remove(&keys.proxy);
        let _ = self.instance_sockets.remove(&keys.client);
    }

    /// Whether the instance socket at `instance_sk` has nothing the kernel queued for it
    /// that the instance has not read.
    pub(super) fn instance_drained(&mut self, instance_sk: u64) -> io::Result<bool> {
        let Some((probe, _, key)) = &self.probe else {
            return Err(io::Error::other("no probe socket"));
        };
        let link = InstanceLink {
            role: ROLE_QUEUE_PROBE,
            peer_sk: instance_sk,
            ..InstanceLink::default()
        };
        self.instance_links.insert(key, link, 0).map_err(to_io)?;
        bounce(probe)?;
        Ok(self.instance_links.get(key, 0).map_err(to_io)?.drained != 0)
    }

    pub(super) fn update_link(&mut self, key: &SocketKey, change: impl FnOnce(&mut InstanceLink)) {
        if let Ok(mut link) = self.instance_links.get(key, 0) {
            change(&mut link);
            let _ = self.instance_links.insert(key, link, 0);
        }
    }
}

/// Writes one byte that the socket's sk_msg program sends back into the socket's own receive
/// queue (after noting what it was asked), and takes it back.
pub(super) fn bounce(socket: &TcpStream) -> io::Result<()> {
    use std::io::{Read, Write};
    match (&*socket).write(&[0]) {
        Ok(1) => {}
        other => return Err(io::Error::other(format!("probe write: {other:?}"))),
    }
    let mut byte = [0u8; 1];
    match (&*socket).read(&mut byte) {
        Ok(1) => Ok(()),
        other => Err(io::Error::other(format!(
            "probe did not come back: {other:?}"
        ))),
    }
}
