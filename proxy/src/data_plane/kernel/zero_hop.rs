//! Zero-hop connections: the instance's own socket joins the splice and the proxy's
//! instance-side socket ("the proxy socket") carries no data while the kernel does the work.
//! The kernel side and the reasons for its design are in `proxy-ebpf/src/zero_hop.rs`.
//!
//! Userspace's part: attach the programs, find the instance socket's key for a connection,
//! fill the links in an order that never lets a byte through before its target is known,
//! and the two userspace legs (through the shared copy loop, with ordinary TCP
//! back-pressure) for what the kernel hands over when a receiving side stops keeping up: the
//! instance's writes arriving on the proxy socket, and, once the client socket's stream
//! parser stopped, the client's frames. Teardown decides when they run and what follows.

use std::{
    fs::File,
    io::{self, Write},
    net::TcpStream,
    os::fd::AsRawFd,
    path::Path,
    sync::Mutex,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    programs::{SkMsg, SockOps, links::CgroupAttachMode},
};
use proxy_common::maps::{
    ClientLink, FLAG_HELD, InstanceLink, InstanceRecord, ROLE_CLIENT_PROBE, ROLE_INSTANCE,
    ROLE_PROXY_PIPELINED, ROLE_PROXY_SENDS,
};
use tracing::debug;

use super::{
    maps::{Maps, ZeroHopKeys, ZeroHopMaps, bounce, side_of, socket_key, to_io},
    spliced::{Spliced, poll_until},
};
use crate::{
    conn::KernelKeys,
    data_plane::{
        copy::{Leg, Refusal},
        socket,
    },
    protocols::frames::FrameCursor,
};

/// How many times (1 ms apart) to look for the record of an instance's socket. Generous: on
/// a loaded 2-core host 20 looks were seen to miss it, and the wait is paid only when the
/// record never comes (a socket the sockmap cannot take), by that connection's upgrade.
const RECORD_LOOKS: u32 = 100;

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

/// Attaches the zero-hop programs: the sk_msg verdict to the instance-socket map, then the
/// sock_ops program to `cgroup_dir`, the parent of every instance's cgroup, so each socket an
/// instance accepts is recorded.
pub(super) fn attach(
    ebpf: &mut Ebpf,
    maps: &Mutex<Maps>,
    cgroup_dir: &Path,
) -> Result<(), ZeroHopUnavailable> {
    let program_error = |name| {
        move |e: aya::programs::ProgramError| {
            ZeroHopUnavailable::Program(name, super::verifier_summary(&e))
        }
    };
    let sk_msg: &mut SkMsg = ebpf
        .program_mut("ws_instance_send")
        .ok_or_else(|| ZeroHopUnavailable::Program("ws_instance_send", "missing".into()))?
        .try_into()
        .map_err(program_error("ws_instance_send"))?;
    sk_msg.load().map_err(program_error("ws_instance_send"))?;
    sk_msg
        .attach(
            maps.lock()
                .expect("maps lock")
                .zero_hop
                .instance_sockets
                .fd(),
        )
        .map_err(program_error("ws_instance_send"))?;
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
    start_queue_probe(&mut maps.lock().expect("maps lock").zero_hop)
        .map_err(|e| ZeroHopUnavailable::Program("ws_instance_send", e.to_string()))?;
    Ok(())
}

fn start_queue_probe(z: &mut ZeroHopMaps) -> io::Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let probe = TcpStream::connect(listener.local_addr()?)?;
    let (other, _) = listener.accept()?;
    probe.set_nonblocking(true)?;
    let key = socket_key(
        socket::netns_cookie(&probe)?,
        probe.local_addr()?,
        probe.peer_addr()?,
    );
    z.instance_sockets
        .insert(key, probe.as_raw_fd(), 0)
        .map_err(to_io)?;
    z.probe = Some((probe, other, key));
    Ok(())
}

/// The keys of the instance socket at the other end of `proxy_socket`, if the kernel
/// recorded it (the instance runs in wsedge's instance cgroup). `None`: use two sockets.
pub(super) async fn keys(
    maps: &Mutex<Maps>,
    client: &tokio::net::TcpStream,
    proxy_socket: &tokio::net::TcpStream,
) -> Option<ZeroHopKeys> {
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
    let record = instance_record(maps, &instance).await?;
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
async fn instance_record(
    maps: &Mutex<Maps>,
    instance: &proxy_common::maps::SocketKey,
) -> Option<InstanceRecord> {
    for _ in 0..RECORD_LOOKS {
        let found = {
            let m = maps.lock().expect("maps lock");
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

/// Fills the maps for one connection whose state ([`Maps::insert_sides`], marked
/// `FLAG_ZERO_HOP`) exists. The order matters: the instance's writes can go to the client
/// once its link exists (the client socket is already a redirect target); the bytes userspace
/// read past the handshake go into the instance socket's queue before any client frame can
/// (the client socket enters `SPLICED` last). The maps lock is not held across the write of
/// those bytes, which may wait for the instance's receive buffer.
pub(super) fn insert(
    maps: &Mutex<Maps>,
    client: &TcpStream,
    proxy: &TcpStream,
    pair: KernelKeys,
    keys: ZeroHopKeys,
    pipelined: &[u8],
) -> io::Result<()> {
    {
        let mut m = maps.lock().expect("maps lock");
        m.targets
            .insert(pair.client, client.as_raw_fd(), 0)
            .map_err(to_io)?;
        let z = &mut m.zero_hop;
        let client_sk = locate_client(z, client, &keys)?;
        // What the instance sent before the link: the handshake response and any frames
        // after it that userspace already passed on. Later arrivals on the proxy socket are
        // relayed before the instance's writes may go straight to the client.
        let forwarded = socket::bytes_read(proxy)?;
        let client_link = ClientLink {
            instance: keys.instance,
            ..ClientLink::default()
        };
        z.client_links
            .insert(pair.client, client_link, 0)
            .map_err(to_io)?;
        let instance_link = InstanceLink {
            client_cookie: pair.client,
            side_cookie: pair.instance,
            role: ROLE_INSTANCE,
            peer_sk: client_sk,
            forwarded,
            ..InstanceLink::default()
        };
        z.instance_links
            .insert(keys.instance, instance_link, 0)
            .map_err(to_io)?;
        let proxy_link = InstanceLink {
            instance: keys.instance,
            role: ROLE_PROXY_PIPELINED,
            peer_sk: keys.instance_sk,
            ..InstanceLink::default()
        };
        z.instance_links
            .insert(keys.proxy, proxy_link, 0)
            .map_err(to_io)?;
        z.instance_sockets
            .insert(keys.proxy, proxy.as_raw_fd(), 0)
            .map_err(to_io)?;
    }
    write_all_now(proxy, pipelined)?;
    let mut m = maps.lock().expect("maps lock");
    m.zero_hop
        .update_link(&keys.proxy, |l| l.role = ROLE_PROXY_SENDS);
    m.spliced
        .insert(pair.client, client.as_raw_fd(), 0)
        .map_err(to_io)
}

/// Asks the kernel where the client socket is (for the instance's sk_msg program, which
/// must see its send buffer and cannot look sockets up): the socket joins the sk_msg map and
/// a probing write records its address and comes back (see [`bounce`]).
fn locate_client(z: &mut ZeroHopMaps, client: &TcpStream, keys: &ZeroHopKeys) -> io::Result<u64> {
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
    conn: &Spliced,
    keys: &ZeroHopKeys,
    limit: Duration,
) -> io::Result<()> {
    let what = "the instance did not take what the kernel queued for it";
    poll_until(limit, what, || {
        if conn.instance_done() {
            // The instance closed its socket: what was queued for it is gone with it.
            return Ok(true);
        }
        let drained = conn
            .maps
            .lock()
            .expect("maps lock")
            .zero_hop
            .instance_drained(keys.instance_sk)?;
        if !drained && conn.finished() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, what));
        }
        Ok(drained)
    })
    .await
}

/// Whether the client socket's stream parser stopped for userspace to take over.
pub(super) fn client_held(maps: &Mutex<Maps>, client: u64) -> bool {
    side_of(maps, client).is_some_and(|s| s.flags & FLAG_HELD != 0)
}

/// A descriptor of one of the record's sockets as a stream of the runtime's, for a
/// userspace leg (the record keeps its own descriptor for the hang-up watcher).
pub(super) fn leg_stream(socket: &TcpStream) -> io::Result<tokio::net::TcpStream> {
    tokio::net::TcpStream::from_std(socket.try_clone()?)
}

/// Client -> instance once the kernel stopped: accounted with the shared frame parser into
/// the same side state the kernel kept, from where the kernel stopped (between frames or
/// between two pieces of a data frame). After the proxy ended the connection, what still
/// arrives is read and dropped.
pub(super) struct ClientLeg<'a> {
    conn: &'a Spliced,
    cursor: FrameCursor,
}

impl<'a> ClientLeg<'a> {
    pub(super) fn new(conn: &'a Spliced) -> ClientLeg<'a> {
        let remaining = conn.side(conn.pair.client).map_or(0, |s| s.frame_remaining);
        ClientLeg {
            conn,
            cursor: FrameCursor::inside_payload(remaining),
        }
    }
}

impl Leg for ClientLeg<'_> {
    fn account(&mut self, bytes: &[u8]) -> Result<(), Refusal> {
        let client = self.conn.pair.client;
        let mut m = self.conn.maps.lock().expect("maps lock");
        let mut side = m.sides.get(&client, 0).unwrap_or_default();
        let before = side;
        let result = self
            .cursor
            .feed(bytes, &mut side, crate::clock::monotonic_ns());
        let _ = m.sides.insert(client, side, 0);
        drop(m);
        let fed = crate::tracer::Fed {
            result: &result,
            cursor: &self.cursor,
        };
        self.conn
            .tracer
            .fed_kernel_side(client, &before, &side, &fed);
        result.map_err(|error| Refusal {
            error,
            before: self.cursor.refused_at(),
        })
    }

    fn forwardable(&mut self, n: usize) -> usize {
        if self.conn.ended_by_proxy() { 0 } else { n }
    }
}

/// Instance -> client whenever the instance's writes take its own socket's TCP path (the
/// client's send buffer was full, or the proxy is closing): what arrives on the proxy socket
/// goes to the client, counted so the kernel knows when it may send straight to the client
/// again. The kernel accounted these writes already; nothing from the first frame it refused
/// on goes on, nor anything after the proxy's own close frame.
pub(super) struct InstanceLeg<'a> {
    conn: &'a Spliced,
    keys: ZeroHopKeys,
    /// Bytes taken by the client since `forwarded` was last published.
    unpublished: u64,
}

impl<'a> InstanceLeg<'a> {
    pub(super) fn new(conn: &'a Spliced, keys: ZeroHopKeys) -> InstanceLeg<'a> {
        InstanceLeg {
            conn,
            keys,
            unpublished: 0,
        }
    }
}

impl Leg for InstanceLeg<'_> {
    fn account(&mut self, _bytes: &[u8]) -> Result<(), Refusal> {
        Ok(())
    }

    fn forwardable(&mut self, n: usize) -> usize {
        if self.conn.ended_by_proxy() {
            return 0;
        }
        let (refused_at, forwarded) = {
            let m = self.conn.maps.lock().expect("maps lock");
            let side = m.sides.get(&self.conn.pair.instance, 0).unwrap_or_default();
            let link = m.zero_hop.instance_links.get(&self.keys.instance, 0);
            (side.sends.refused_at, link.map_or(0, |l| l.forwarded))
        };
        if refused_at == 0 {
            n
        } else {
            refused_at.saturating_sub(forwarded).min(n as u64) as usize
        }
    }

    fn forwarded(&mut self, n: usize) {
        self.unpublished += n as u64;
    }

    fn caught_up(&mut self) {
        // Published only once everything read is in the client socket: until then the
        // instance's next writes must not go straight to the client, where they would race
        // this leg's writes for the client's send buffer.
        let n = std::mem::take(&mut self.unpublished);
        self.conn
            .maps
            .lock()
            .expect("maps lock")
            .zero_hop
            .update_link(&self.keys.instance, |l| l.forwarded += n);
    }
}
