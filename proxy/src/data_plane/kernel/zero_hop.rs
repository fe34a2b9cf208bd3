//! Zero-hop connections: the instance's own socket joins the splice and the proxy's
//! instance-side socket ("the proxy socket") carries no data while the kernel does the work.
//! The kernel side and the reasons for its design are in `proxy-ebpf/src/zero_hop.rs`.
//!
//! Userspace's part: attach the programs, find the instance socket's key for a connection,
//! fill the links in an order that never lets a byte through before its target is known,
//! and relay with ordinary TCP back-pressure what the kernel hands over when a receiving side
//! stops keeping up: the instance's writes arriving on the proxy socket, and, once the client
//! socket's stream parser stopped, the client's frames.

use std::{
    collections::HashMap as StdHashMap,
    fs::File,
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
    sync::{Arc, Mutex, Weak, atomic::Ordering as AtomicOrdering},
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, RingBuf, SockHash},
    programs::{SkMsg, SockOps, links::CgroupAttachMode},
};
use proxy_common::{
    maps::{
        ClientLink, DataPlaneEvent, EVENT_CLIENT_HELD, EVENT_INSTANCE_FRAME_REFUSED, FLAG_HELD,
        FLAG_PROTOCOL_ERROR, InstanceLink, InstanceRecord, ROLE_CLIENT_PROBE, ROLE_INSTANCE,
        ROLE_PROXY_PIPELINED, ROLE_PROXY_SENDS, ROLE_QUEUE_PROBE, SocketKey,
    },
    policy::Ending,
};
use tokio::io::unix::AsyncFd;
use tracing::{debug, info};

use super::{KernelDataPlane, LoadError, Maps, take_map, teardown::Spliced};
use crate::{
    data_plane::{relay::refusal_ending, socket},
    protocols::frames::FrameCursor,
};

/// How many times (1 ms apart) to look for the record of an instance's socket.
const RECORD_LOOKS: u32 = 20;

/// Map update flag: fail if the key exists.
const BPF_NOEXIST: u64 = 1;

/// Why zero-hop is not used; logged once at start.
#[derive(Debug, thiserror::Error)]
pub enum ZeroHopUnavailable {
    #[error("instances have no cgroup of their own (needs root and a writable cgroup2)")]
    NoCgroup,
    #[error("eBPF program {0}: {1}")]
    Program(&'static str, String),
    #[error("opening the instance cgroup {0}: {1}")]
    Cgroup(String, io::Error),
}

/// The two instance-side sockets of one connection, as the kernel keys them.
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
    instance_sk: u64,
}

/// A socket's key as the kernel programs compute it from the socket itself. IPv6 addresses
/// other than v4-mapped ones read as 0 there.
fn socket_key(netns_cookie: u64, local: SocketAddr, remote: SocketAddr) -> SocketKey {
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

pub(super) struct ZeroHopMaps {
    instance_sockets: SockHash<MapData, SocketKey>,
    /// Instance sockets the sock_ops program recorded (a sockhash cannot be queried from
    /// userspace for a socket it holds).
    instance_records: HashMap<MapData, SocketKey, InstanceRecord>,
    client_links: HashMap<MapData, u64, ClientLink>,
    instance_links: HashMap<MapData, SocketKey, InstanceLink>,
    /// Zero-hop connections by client cookie, for the kernel's events.
    conns: StdHashMap<u64, (ZeroHopKeys, Weak<Spliced>)>,
    /// A loopback connection whose first socket asks the kernel about instance queues (its
    /// writes bounce back into it); the second only keeps the first connected.
    probe: Option<(TcpStream, TcpStream, SocketKey)>,
}

impl ZeroHopMaps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<ZeroHopMaps, LoadError> {
        Ok(ZeroHopMaps {
            instance_sockets: take_map(ebpf, "INSTANCE_SOCKETS")?,
            instance_records: take_map(ebpf, "INSTANCE_RECORDS")?,
            client_links: take_map(ebpf, "CLIENT_LINKS")?,
            instance_links: take_map(ebpf, "INSTANCE_LINKS")?,
            conns: StdHashMap::new(),
            probe: None,
        })
    }

    /// Forgets a connection (no-op for two-socket ones).
    pub(super) fn remove(&mut self, client: u64) {
        let _ = self.client_links.remove(&client);
        if let Some((keys, _)) = self.conns.remove(&client) {
            let _ = self.instance_links.remove(&keys.instance);
            let _ = self.instance_links.remove(&keys.proxy);
            let _ = self.instance_records.remove(&keys.instance);
            let _ = self.instance_sockets.remove(&keys.proxy);
            let _ = self.instance_sockets.remove(&keys.client);
        }
    }

    /// Whether the instance socket at `instance_sk` has nothing the kernel queued for it
    /// that the instance has not read.
    fn instance_drained(&mut self, instance_sk: u64) -> io::Result<bool> {
        let to_io = |e: aya::maps::MapError| io::Error::other(e.to_string());
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

    fn update_link(&mut self, key: &SocketKey, change: impl FnOnce(&mut InstanceLink)) {
        if let Ok(mut link) = self.instance_links.get(key, 0) {
            change(&mut link);
            let _ = self.instance_links.insert(key, link, 0);
        }
    }
}

impl KernelDataPlane {
    /// Attaches the zero-hop programs: the sk_msg verdict to the instance-socket map, then
    /// the sock_ops program to `cgroup_dir`, the parent of every instance's cgroup, so each
    /// socket an instance accepts is recorded. Also starts reading the kernel's events.
    pub fn enable_zero_hop(self: &Arc<Self>, cgroup_dir: &Path) -> Result<(), ZeroHopUnavailable> {
        let program_error = |name| {
            move |e: aya::programs::ProgramError| {
                ZeroHopUnavailable::Program(name, super::verifier_summary(&e))
            }
        };
        let mut ebpf = self.ebpf.lock().expect("ebpf lock");
        let events = ebpf
            .take_map("EVENTS")
            .ok_or_else(|| ZeroHopUnavailable::Program("EVENTS", "missing map".into()))?;
        let events = RingBuf::try_from(events)
            .map_err(|e| ZeroHopUnavailable::Program("EVENTS", e.to_string()))?;
        let sk_msg: &mut SkMsg = ebpf
            .program_mut("ws_instance_send")
            .ok_or_else(|| ZeroHopUnavailable::Program("ws_instance_send", "missing".into()))?
            .try_into()
            .map_err(program_error("ws_instance_send"))?;
        sk_msg.load().map_err(program_error("ws_instance_send"))?;
        {
            let maps = self.maps.lock().expect("maps lock");
            sk_msg
                .attach(maps.zero_hop.instance_sockets.fd())
                .map_err(program_error("ws_instance_send"))?;
        }
        let sock_ops: &mut SockOps = ebpf
            .program_mut("record_instance_socket")
            .ok_or_else(|| ZeroHopUnavailable::Program("record_instance_socket", "missing".into()))?
            .try_into()
            .map_err(program_error("record_instance_socket"))?;
        sock_ops
            .load()
            .map_err(program_error("record_instance_socket"))?;
        let cgroup = File::open(cgroup_dir)
            .map_err(|e| ZeroHopUnavailable::Cgroup(cgroup_dir.display().to_string(), e))?;
        // A BPF link (what aya creates on kernels >= 5.7) never displaces another program
        // and takes no attach flags: `Single` is the one that passes none.
        sock_ops
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(program_error("record_instance_socket"))?;
        drop(ebpf);
        self.start_queue_probe()
            .map_err(|e| ZeroHopUnavailable::Program("ws_instance_send", e.to_string()))?;
        let plane = Arc::downgrade(self);
        let reader = with_runtime(events)
            .map_err(|e| ZeroHopUnavailable::Program("EVENTS", e.to_string()))?;
        tokio::spawn(read_events(reader, plane));
        let _ = self.zero_hop.set(());
        Ok(())
    }

    fn start_queue_probe(&self) -> io::Result<()> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let probe = TcpStream::connect(listener.local_addr()?)?;
        let (other, _) = listener.accept()?;
        probe.set_nonblocking(true)?;
        let key = socket_key(
            socket::netns_cookie(&probe)?,
            probe.local_addr()?,
            probe.peer_addr()?,
        );
        let mut m = self.maps.lock().expect("maps lock");
        m.zero_hop
            .instance_sockets
            .insert(key, probe.as_raw_fd(), 0)
            .map_err(|e| io::Error::other(e.to_string()))?;
        m.zero_hop.probe = Some((probe, other, key));
        Ok(())
    }

    /// The keys of the instance socket at the other end of `proxy_socket`, if the kernel
    /// recorded it (the instance runs in wsedge's instance cgroup). `None`: use two sockets.
    pub async fn zero_hop_keys(
        &self,
        client: &tokio::net::TcpStream,
        proxy_socket: &tokio::net::TcpStream,
    ) -> Option<ZeroHopKeys> {
        if !self.zero_hop_ready() {
            return None;
        }
        let netns_cookie = socket::netns_cookie(proxy_socket).ok()?;
        let (local, peer) = (
            proxy_socket.local_addr().ok()?,
            proxy_socket.peer_addr().ok()?,
        );
        if !local.is_ipv4() || !peer.is_ipv4() {
            return None;
        }
        let instance = socket_key(netns_cookie, peer, local);
        let client = socket_key(
            socket::netns_cookie(client).ok()?,
            client.local_addr().ok()?,
            client.peer_addr().ok()?,
        );
        let record = self.instance_record(&instance).await?;
        (record.sk != 0).then_some(ZeroHopKeys {
            instance,
            proxy: socket_key(netns_cookie, local, peer),
            client,
            instance_sk: record.sk,
        })
    }

    /// What the sock_ops program recorded about an instance socket. The kernel queues an
    /// accepted socket for `accept` before it runs the program for it, so on a busy (or
    /// descheduled) CPU the instance can answer the handshake first: look again briefly.
    async fn instance_record(&self, instance: &SocketKey) -> Option<InstanceRecord> {
        for _ in 0..RECORD_LOOKS {
            let found = {
                let m = self.maps.lock().expect("maps lock");
                m.zero_hop.instance_records.get(instance, 0).ok()
            };
            if found.is_some() {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        debug!(
            ?instance,
            "no record of the instance's socket: two-socket splice"
        );
        None
    }
}

/// Fills the maps for one connection whose state ([`Maps::insert_sides`], marked
/// `FLAG_ZERO_HOP`) exists. The order matters: the instance's writes can go to
/// the client once its link exists (the client socket is already a redirect target); the
/// bytes userspace read past the handshake go into the instance socket's queue before any
/// client frame can (the client socket enters `SPLICED` last).
pub(super) fn insert(
    maps: &Mutex<Maps>,
    client: &TcpStream,
    proxy: &TcpStream,
    pair: super::SplicedPair,
    keys: ZeroHopKeys,
    pipelined: &[u8],
) -> io::Result<()> {
    let to_io = |e: aya::maps::MapError| io::Error::other(e.to_string());
    let mut m = maps.lock().expect("maps lock");
    m.targets
        .insert(pair.client, client.as_raw_fd(), 0)
        .map_err(to_io)?;
    let z = &mut m.zero_hop;
    z.conns.insert(pair.client, (keys, Weak::new()));
    let client_sk = locate_client(z, client, &keys)?;
    // What the instance sent before the link: the handshake response and any frames after
    // it that userspace already passed on. Later arrivals on the proxy socket are relayed
    // before the instance's writes may go straight to the client.
    let forwarded = socket::bytes_read(proxy)?;
    z.client_links
        .insert(
            pair.client,
            ClientLink {
                instance: keys.instance,
                ..ClientLink::default()
            },
            0,
        )
        .map_err(to_io)?;
    z.instance_links
        .insert(
            keys.instance,
            InstanceLink {
                client_cookie: pair.client,
                side_cookie: pair.instance,
                role: ROLE_INSTANCE,
                peer_sk: client_sk,
                forwarded,
                ..InstanceLink::default()
            },
            0,
        )
        .map_err(to_io)?;
    z.instance_links
        .insert(
            keys.proxy,
            InstanceLink {
                instance: keys.instance,
                role: ROLE_PROXY_PIPELINED,
                peer_sk: keys.instance_sk,
                ..InstanceLink::default()
            },
            0,
        )
        .map_err(to_io)?;
    z.instance_sockets
        .insert(keys.proxy, proxy.as_raw_fd(), 0)
        .map_err(to_io)?;
    write_all_now(proxy, pipelined)?;
    z.update_link(&keys.proxy, |l| l.role = ROLE_PROXY_SENDS);
    m.spliced
        .insert(pair.client, client.as_raw_fd(), 0)
        .map_err(to_io)?;
    Ok(())
}

/// Asks the kernel where the client socket is (for the instance's sk_msg program, which
/// must see its send buffer and cannot look sockets up): the socket joins the sk_msg map and
/// a probing write records its address and comes back (see [`bounce`]).
fn locate_client(z: &mut ZeroHopMaps, client: &TcpStream, keys: &ZeroHopKeys) -> io::Result<u64> {
    let to_io = |e: aya::maps::MapError| io::Error::other(e.to_string());
    let probe = InstanceLink {
        role: ROLE_CLIENT_PROBE,
        ..InstanceLink::default()
    };
    // NOEXIST: two clients can share a key only if both are IPv6 (see `socket_key`) with the
    // same port; the second then stays two-socket rather than be mistaken for the first.
    z.instance_links
        .insert(keys.client, probe, BPF_NOEXIST)
        .map_err(to_io)?;
    let located = (|| {
        z.instance_sockets
            .insert(keys.client, client.as_raw_fd(), 0)
            .map_err(to_io)?;
        bounce(client)?;
        match z
            .instance_links
            .get(&keys.client, 0)
            .map_err(to_io)?
            .peer_sk
        {
            0 => Err(io::Error::other(
                "the kernel did not record the client socket",
            )),
            sk => Ok(sk),
        }
    })();
    // Later writes by userspace (close frames, relayed bytes) find no link and pass.
    let _ = z.instance_links.remove(&keys.client);
    located
}

/// Registers the connection record for the kernel's events.
pub(super) fn register_conn(maps: &Mutex<Maps>, client: u64, conn: &Arc<Spliced>) {
    let mut m = maps.lock().expect("maps lock");
    if let Some(entry) = m.zero_hop.conns.get_mut(&client) {
        entry.1 = Arc::downgrade(conn);
    }
}

/// Writes one byte that the socket's sk_msg program sends back into the socket's own receive
/// queue (after noting what it was asked), and takes it back.
fn bounce(socket: &TcpStream) -> io::Result<()> {
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

/// The kernel put these bytes into the instance socket's queue synchronously; a refusal
/// would mean the instance socket is gone.
fn write_all_now(mut to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1);
    while !bytes.is_empty() {
        match to.write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Stops both kernel directions of a connection the proxy is ending: client frames go to
/// the client socket's own queue, the instance's writes to the proxy socket.
pub(super) fn stop_kernel_paths(maps: &Mutex<Maps>, client: u64, keys: &ZeroHopKeys) {
    let mut m = maps.lock().expect("maps lock");
    let z = &mut m.zero_hop;
    z.update_link(&keys.instance, |l| l.stop = 1);
    if let Ok(mut link) = z.client_links.get(&client, 0) {
        link.stop = 1;
        let _ = z.client_links.insert(client, link, 0);
    }
}

/// Waits (bounded, and only while the connection lasts) until the instance has taken every
/// byte the kernel put into its socket's queue, so that what the proxy socket sends next (a
/// FIN, a close frame, relayed bytes) cannot overtake them: the instance reads its queue
/// before the socket's own TCP data.
pub(super) async fn wait_instance_drained(
    maps: &Mutex<Maps>,
    conn: &Spliced,
    keys: &ZeroHopKeys,
    limit: Duration,
) -> io::Result<()> {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_micros(200);
    loop {
        if conn.instance_done() {
            // The instance closed its socket: what was queued for it is gone with it.
            return Ok(());
        }
        let drained = maps
            .lock()
            .expect("maps lock")
            .zero_hop
            .instance_drained(keys.instance_sk)?;
        if drained {
            return Ok(());
        }
        if Instant::now() > deadline || conn.finished() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the instance did not take what the kernel queued for it",
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Kernel events: the client's frames held for userspace, an instance frame refused.
async fn read_events(mut reader: AsyncFd<RingBuf<MapData>>, plane: Weak<KernelDataPlane>) {
    loop {
        let Ok(mut guard) = reader.readable_mut().await else {
            return;
        };
        let ring = guard.get_inner_mut();
        let mut events = Vec::new();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<DataPlaneEvent>() {
                // SAFETY: the program writes exactly one DataPlaneEvent per record.
                events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
            }
        }
        guard.clear_ready();
        let Some(plane) = plane.upgrade() else {
            return;
        };
        for event in events {
            on_event(&plane, event);
        }
    }
}

fn on_event(plane: &Arc<KernelDataPlane>, event: DataPlaneEvent) {
    let conn = {
        let m = plane.maps.lock().expect("maps lock");
        m.zero_hop
            .conns
            .get(&event.client_cookie)
            .and_then(|(_, c)| c.upgrade())
    };
    let Some(conn) = conn else {
        return;
    };
    match event.kind {
        EVENT_CLIENT_HELD => take_over_client(plane.maps.clone(), conn),
        EVENT_INSTANCE_FRAME_REFUSED => {
            let function_side = super::teardown::side_of(&plane.maps, conn.pair.instance);
            let ending = if function_side.is_some_and(|s| s.flags & FLAG_PROTOCOL_ERROR != 0) {
                Ending::FunctionProtocolError
            } else {
                Ending::MessageTooBig
            };
            tokio::spawn(super::teardown::stop_by_proxy(
                plane.maps.clone(),
                conn,
                ending,
            ));
        }
        kind => debug!(
            client = event.client_cookie,
            kind, "unknown data-plane event"
        ),
    }
}

/// Whether the client socket's stream parser stopped for userspace to take over.
pub(super) fn client_held(maps: &Mutex<Maps>, client: u64) -> bool {
    super::teardown::side_of(maps, client).is_some_and(|s| s.flags & FLAG_HELD != 0)
}

/// The client socket's stream parser stopped at a frame boundary (`FLAG_HELD`): take the
/// socket out of `SPLICED`, which stops the kernel's programs for it (it stays a redirect
/// target), clear the socket error the stop left, and relay from where the kernel stopped.
/// Once per connection; called for the kernel's event and for the socket error it raised.
pub(super) fn take_over_client(maps: Arc<Mutex<Maps>>, conn: Arc<Spliced>) {
    let Some(zero_hop) = &conn.zero_hop else {
        return;
    };
    if zero_hop.client_relay.swap(true, AtomicOrdering::AcqRel) {
        return;
    }
    if conn.ended_by_proxy() {
        debug!(
            client = conn.pair.client,
            "proxy closing: the client's last frames are relayed by userspace"
        );
    } else {
        info!(
            client = conn.pair.client,
            "instance not keeping up: client frames now relayed by userspace"
        );
    }
    let _ = maps
        .lock()
        .expect("maps lock")
        .spliced
        .remove(&conn.pair.client);
    // The stop's own EAGAIN; anything else is the connection's real end, which the relay
    // meets on its first read.
    let stop_error =
        socket::take_error(&conn.client).filter(|e| e.kind() != io::ErrorKind::WouldBlock);
    tokio::spawn(async move {
        let result = match stop_error {
            Some(e) => Err(e),
            None => relay_client(&maps, &conn).await,
        };
        match result {
            Ok(ClientRelayEnd::Refused(ending)) => {
                super::teardown::stop_by_proxy(maps, conn, ending).await
            }
            Ok(ClientRelayEnd::Eof) => super::teardown::client_relay_done(conn, Ok(())),
            Err(e) => super::teardown::client_relay_done(conn, Err(e)),
        }
    });
}

/// How the userspace relay of a client's frames ended.
enum ClientRelayEnd {
    /// The client's EOF; the instance got everything before it.
    Eof,
    /// A frame refused (a message over the function's limit, or one RFC 6455 forbids): the
    /// frames before it went on, the proxy closes the connection (1009, 1002).
    Refused(Ending),
}

/// Client -> instance once the kernel stopped: the client's bytes from the frame boundary
/// where its parser stopped on wait in the socket's own TCP receive queue (TCP holds the
/// client back while they do). They go out through the proxy socket, accounted with the
/// shared frame parser into the same side state the kernel kept, once the instance has taken
/// everything the kernel queued for it earlier ([`wait_instance_drained`]).
async fn relay_client(maps: &Mutex<Maps>, conn: &Spliced) -> io::Result<ClientRelayEnd> {
    let keys = conn.zero_hop.as_ref().expect("zero-hop connection").keys;
    let client = conn.pair.client;
    let from = with_runtime(OwnedFd::from(conn.client.try_clone()?))?;
    let to = with_runtime(OwnedFd::from(conn.instance.try_clone()?))?;
    // The kernel stopped between frames or between two pieces of a data frame.
    let remaining = super::teardown::side_of(maps, client).map_or(0, |s| s.frame_remaining);
    let mut cursor = FrameCursor::inside_payload(remaining);
    let mut buf = vec![0u8; 64 * 1024];
    let mut drained = false;
    loop {
        let n = read_async(&from, &conn.client, &mut buf).await?;
        if !drained {
            // The first relayed byte must not overtake what the kernel queued.
            wait_instance_drained(maps, conn, &keys, Duration::from_secs(24 * 3600)).await?;
            drained = true;
        }
        if n == 0 {
            return Ok(ClientRelayEnd::Eof);
        }
        let accounted = {
            let mut m = maps.lock().expect("maps lock");
            let mut side = m.sides.get(&client, 0).unwrap_or_default();
            let result = cursor.feed(&buf[..n], &mut side, socket::monotonic_ns());
            let _ = m.sides.insert(client, side, 0);
            result
        };
        if let Err(refusal) = accounted {
            // The whole frames before the refused one still go on.
            let before = cursor.refused_at().unwrap_or(0);
            if !conn.ended_by_proxy() {
                write_all_async(&to, &conn.instance, &buf[..before]).await?;
            }
            return Ok(ClientRelayEnd::Refused(refusal_ending(refusal, true)));
        }
        if conn.ended_by_proxy() {
            continue;
        }
        write_all_async(&to, &conn.instance, &buf[..n]).await?;
    }
}

/// Reads what is there, waiting until something is (0: EOF).
async fn read_async(
    registered: &AsyncFd<OwnedFd>,
    from: &TcpStream,
    buf: &mut [u8],
) -> io::Result<usize> {
    loop {
        let mut guard = registered.readable().await?;
        if let Ok(result) = guard.try_io(|_| (&*from).read(buf)) {
            return result;
        }
    }
}

/// Writes everything, waiting while TCP pushes back.
async fn write_all_async(
    registered: &AsyncFd<OwnedFd>,
    to: &TcpStream,
    mut bytes: &[u8],
) -> io::Result<()> {
    while !bytes.is_empty() {
        match (&*to).write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                registered.writable().await?.clear_ready()
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Instance -> client whenever the instance's writes take its own socket's TCP path (the
/// client's send buffer was full, or the proxy is closing): copy what arrives on the proxy
/// socket to the client, with ordinary back-pressure, until the instance's EOF, and count it
/// so the kernel knows when it may send straight to the client again. Everything it
/// redirected earlier is already in the client socket (redirects are inline).
pub(super) async fn relay_instance(conn: &Spliced) -> io::Result<()> {
    let keys = conn.zero_hop.as_ref().expect("zero-hop connection").keys;
    let from = with_runtime(OwnedFd::from(conn.instance.try_clone()?))?;
    let to = with_runtime(OwnedFd::from(conn.client.try_clone()?))?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = read_async(&from, &conn.instance, &mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        if conn.ended_by_proxy() {
            // After the proxy's own close frame nothing more goes to the client.
            continue;
        }
        // Nothing from the first frame the kernel refused on (`SendState::refused_at`).
        let (refused_at, forwarded) = {
            let m = conn.plane.maps.lock().expect("maps lock");
            let side = m.sides.get(&conn.pair.instance, 0).unwrap_or_default();
            let link = m.zero_hop.instance_links.get(&keys.instance, 0);
            (side.sends.refused_at, link.map_or(0, |l| l.forwarded))
        };
        let allowed = if refused_at == 0 {
            n
        } else {
            refused_at.saturating_sub(forwarded).min(n as u64) as usize
        };
        write_all_async(&to, &conn.client, &buf[..allowed]).await?;
        // Now in the client socket: the instance's next writes may go straight after them.
        conn.plane
            .maps
            .lock()
            .expect("maps lock")
            .zero_hop
            .update_link(&keys.instance, |l| l.forwarded += n as u64);
    }
}

/// Registers a descriptor this module owns (a dup or the ring buffer) with the runtime.
fn with_runtime<T: AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its descriptor, which stays open as long as the AsyncFd holds it.
    unsafe { AsyncFd::register(inner) }.map_err(|e| io::Error::other(e.to_string()))
}
