//! The kernel data plane: loads the sockmap programs and splices accepted connections.
//!
//! Splice order (each step matters, see TOOLCHAIN.md):
//! 1. userspace forwards, by hand, every byte it read past the handshake, up to a frame
//!    boundary, so the kernel parser starts on a frame header;
//! 2. both sockets enter `TARGETS` and get their `SIDES` entry, then both enter `SPLICED`:
//!    whichever side sends first, its peer is already a valid redirect target;
//! 3. a receive-path kick makes the parser look at bytes that arrived before insertion.
//!
//! Teardown (`teardown.rs`): FIN on one side is noticed by the hang-up watcher (the parser consumes the data,
//! so the socket never turns readable for it); the peer's write side is shut only once
//! everything the kernel redirected has reached the peer's TCP send queue; map entries go
//! only when both directions are done, because a redirect to a removed socket drops data.

use std::{
    io,
    net::TcpStream,
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, SockHash},
    programs::SkSkb,
};
use proxy_common::{
    SideState,
    maps::{FLAG_ZERO_HOP, MAX_FRAME_WIRE_LEN},
    policy::Ending,
};

pub use zero_hop::ZeroHopUnavailable;

use super::{
    hangup::{Hangup, HangupWatcher},
    socket,
};

mod teardown;
mod zero_hop;

use teardown::{Progress, Spliced, on_hangup, side_of, stop_by_proxy};
pub use zero_hop::ZeroHopKeys;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("wsedge was built without its eBPF programs (bpf-linker was missing at build time)")]
    NotBuilt,
    #[error("locating the stream parser's message offset: {0}")]
    Btf(#[from] super::btf::BtfError),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF map {0}: {1}")]
    Map(&'static str, String),
    #[error("eBPF program {0}: {1}")]
    Program(&'static str, String),
    #[error("starting the hang-up watcher: {0}")]
    Runtime(String),
}

struct Maps {
    spliced: SockHash<MapData, u64>,
    targets: SockHash<MapData, u64>,
    sides: HashMap<MapData, u64, SideState>,
    zero_hop: zero_hop::ZeroHopMaps,
}

impl Maps {
    /// Both directions' state, made before either socket enters a map with programs;
    /// `client_flags` marks the client side (zero-hop).
    fn insert_sides(
        &mut self,
        pair: SplicedPair,
        written: WrittenByHand,
        max_message_bytes: u64,
        client_flags: u32,
    ) -> io::Result<()> {
        let side = |peer, peer_written_by_hand, flags| SideState {
            peer_cookie: peer,
            peer_written_by_hand,
            max_message_bytes,
            flags,
            ..SideState::default()
        };
        let client = side(pair.instance, written.to_instance, client_flags);
        let instance = side(pair.client, written.to_client, 0);
        for (cookie, state) in [(pair.client, client), (pair.instance, instance)] {
            self.sides
                .insert(cookie, state, 0)
                .map_err(|e| io::Error::other(e.to_string()))?;
        }
        Ok(())
    }
}

/// Takes a map of the loaded object, typed.
fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| LoadError::Map(name, "missing from object".into()))?;
    T::try_from(map).map_err(|e| LoadError::Map(name, e.to_string()))
}

pub struct KernelDataPlane {
    maps: Arc<Mutex<Maps>>,
    hangups: HangupWatcher<Spliced>,
    /// Owns the loaded programs and their attachments for the process lifetime (the
    /// zero-hop sock_ops program is attached after load, once the instance cgroup exists).
    ebpf: Mutex<Ebpf>,
    /// Set once the zero-hop programs are attached to the instances' cgroup.
    zero_hop: std::sync::OnceLock<()>,
}

/// The two cookies of a spliced connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplicedPair {
    pub client: u64,
    pub instance: u64,
}

/// Bytes userspace itself wrote to each socket before the splice (handshake, leftovers).
#[derive(Debug, Clone, Copy, Default)]
pub struct WrittenByHand {
    pub to_client: u64,
    pub to_instance: u64,
}

/// How a spliced connection ended.
#[derive(Debug)]
pub enum SpliceEnd {
    /// Both sides finished with FIN.
    Closed,
    /// The instance's side ended without a close frame; the client was sent one (1011).
    InstanceFailed,
    /// The proxy ended it ([`KernelDataPlane::stop`]).
    ByProxy(Ending),
    /// A socket failed (reset, parser error); both were closed.
    Aborted(io::Error),
}

/// How long a half-closed direction may take to flush what the kernel redirected.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

impl KernelDataPlane {
    pub fn load() -> Result<KernelDataPlane, LoadError> {
        if OBJECT.is_empty() {
            return Err(LoadError::NotBuilt);
        }
        let offsets = super::btf::kernel_offsets()?;
        let mut ebpf = EbpfLoader::new()
            .override_global("STRP_OFFSET_AT", &offsets.strp_offset, true)
            .override_global("STRP_FULL_LEN_AT", &offsets.strp_full_len, true)
            .override_global("TCP_BYTES_ACKED_AT", &offsets.tcp_bytes_acked, true)
            .override_global("TCP_SND_UNA_AT", &offsets.tcp_snd_una, true)
            .override_global("TCP_WRITE_SEQ_AT", &offsets.tcp_write_seq, true)
            .override_global("SK_SNDBUF_AT", &offsets.sk_sndbuf, true)
            .override_global("SK_WMEM_QUEUED_AT", &offsets.sk_wmem_queued, true)
            .override_global("SK_RCVBUF_AT", &offsets.sk_rcvbuf, true)
            .override_global("SK_RMEM_ALLOC_AT", &offsets.sk_rmem_alloc, true)
            .override_global("SK_USER_DATA_AT", &offsets.sk_user_data, true)
            .override_global("PSOCK_INGRESS_QLEN_AT", &offsets.psock_ingress_qlen, true)
            .override_global("PSOCK_INGRESS_MSG_AT", &offsets.psock_ingress_msg, true)
            .load(OBJECT)?;
        let spliced: SockHash<MapData, u64> = take_map(&mut ebpf, "SPLICED")?;
        let targets = take_map(&mut ebpf, "TARGETS")?;
        let sides = take_map(&mut ebpf, "SIDES")?;
        for name in ["ws_frame_len", "ws_forward"] {
            let program: &mut SkSkb = ebpf
                .program_mut(name)
                .ok_or_else(|| LoadError::Program(name, "missing from object".into()))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| {
                    LoadError::Program(name, e.to_string())
                })?;
            program
                .load()
                .map_err(|e| LoadError::Program(name, verifier_summary(&e)))?;
            program
                .attach(spliced.fd())
                .map_err(|e| LoadError::Program(name, e.to_string()))?;
        }
        let zero_hop = zero_hop::ZeroHopMaps::take(&mut ebpf)?;
        let maps = Arc::new(Mutex::new(Maps {
            spliced,
            targets,
            sides,
            zero_hop,
        }));
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|e| LoadError::Runtime(e.to_string()))?;
        let hangups = HangupWatcher::start({
            let maps = maps.clone();
            move |hangup: Hangup<Spliced>| {
                runtime.spawn(on_hangup(maps.clone(), hangup.conn, hangup.from_client));
            }
        })
        .map_err(|e| LoadError::Runtime(e.to_string()))?;
        let plane = KernelDataPlane {
            maps,
            hangups,
            ebpf: Mutex::new(ebpf),
            zero_hop: std::sync::OnceLock::new(),
        };
        Ok(plane)
    }

    /// Whether connections to instances in the zero-hop cgroup can be spliced zero-hop.
    pub fn zero_hop_ready(&self) -> bool {
        self.zero_hop.get().is_some()
    }

    /// Kernel counters of one direction, keyed by the cookie of the receiving socket.
    pub fn side(&self, cookie: u64) -> Option<SideState> {
        side_of(&self.maps, cookie)
    }

    fn insert(
        &self,
        client: &TcpStream,
        instance: &TcpStream,
        pair: SplicedPair,
        written: WrittenByHand,
        max_message_bytes: u64,
    ) -> io::Result<()> {
        let mut m = self.maps.lock().expect("maps lock");
        let to_io = |e: aya::maps::MapError| io::Error::other(e.to_string());
        m.insert_sides(pair, written, max_message_bytes, 0)?;
        m.targets
            .insert(pair.client, client.as_raw_fd(), 0)
            .map_err(to_io)?;
        m.targets
            .insert(pair.instance, instance.as_raw_fd(), 0)
            .map_err(to_io)?;
        m.spliced
            .insert(pair.instance, instance.as_raw_fd(), 0)
            .map_err(to_io)?;
        m.spliced
            .insert(pair.client, client.as_raw_fd(), 0)
            .map_err(to_io)?;
        Ok(())
    }

    /// Removes a connection from every map and returns its final kernel counters
    /// (client -> instance, instance -> client).
    fn remove(&self, pair: SplicedPair) -> (SideState, SideState) {
        let mut m = self.maps.lock().expect("maps lock");
        for cookie in [pair.client, pair.instance] {
            let _ = m.spliced.remove(&cookie);
        }
        m.zero_hop.remove(pair.client);
        for cookie in [pair.client, pair.instance] {
            let _ = m.targets.remove(&cookie);
        }
        let inbound = m.sides.get(&pair.client, 0).unwrap_or_default();
        let outbound = m.sides.get(&pair.instance, 0).unwrap_or_default();
        let _ = m.sides.remove(&pair.client);
        let _ = m.sides.remove(&pair.instance);
        (inbound, outbound)
    }

    /// Hands both sockets to the kernel and returns at once: no task waits while the kernel
    /// carries frames (per connection, userspace then holds only the [`Spliced`] record and
    /// two epoll registrations). `on_spliced` learns the cookies once frames flow; `on_end`
    /// runs once, with how it ended and the final kernel counters, when both directions are
    /// done or either failed (also when the splice could not be set up).
    pub fn start_splice(
        self: &Arc<Self>,
        client: tokio::net::TcpStream,
        instance: tokio::net::TcpStream,
        written: WrittenByHand,
        max_message_bytes: u64,
        on_spliced: impl FnOnce(SplicedPair),
        on_end: OnEnd,
    ) {
        let entered = self.enter_maps(client, instance, written, max_message_bytes);
        self.carry(entered, written, None, on_spliced, on_end);
    }

    /// Once a splice's maps are filled: the connection's record, told to `on_spliced` and
    /// watched for hang-ups; or, when filling them failed, its end at once.
    fn carry(
        self: &Arc<Self>,
        entered: io::Result<(TcpStream, TcpStream, SplicedPair)>,
        written: WrittenByHand,
        zero_hop: Option<Box<teardown::ZeroHopConn>>,
        on_spliced: impl FnOnce(SplicedPair),
        on_end: OnEnd,
    ) {
        let (client, instance, pair) = match entered {
            Ok(entered) => entered,
            Err(e) => {
                return on_end(
                    SpliceEnd::Aborted(e),
                    SideState::default(),
                    SideState::default(),
                );
            }
        };
        on_spliced(pair);
        let conn = Arc::new(Spliced {
            client,
            instance,
            pair,
            written,
            plane: self.clone(),
            zero_hop,
            progress: Mutex::new(Progress::new(on_end)),
        });
        if conn.zero_hop.is_some() {
            zero_hop::register_conn(&self.maps, pair.client, &conn);
        }
        self.watch(conn);
    }

    /// Hands a spliced connection to the hang-up watcher: FIN or error on either socket, and
    /// for a zero-hop connection also data on the proxy's idle socket (the instance's writes
    /// took the slow path).
    fn watch(&self, conn: Arc<Spliced>) {
        let pair = conn.pair;
        let instance_fd = conn.instance.as_raw_fd();
        let watched = self
            .hangups
            .watch(pair.client, conn.client.as_raw_fd(), conn.clone(), true)
            .and_then(|()| match conn.zero_hop {
                Some(_) => self
                    .hangups
                    .watch_data(pair.instance, instance_fd, conn.clone(), false),
                None => self
                    .hangups
                    .watch(pair.instance, instance_fd, conn.clone(), false),
            });
        if let Err(e) = watched {
            conn.finish(SpliceEnd::Aborted(e));
        }
    }

    /// Like [`Self::start_splice`], for an instance on this host whose socket the kernel
    /// recorded (`keys`, from [`Self::zero_hop_keys`]): the client's frames go straight into
    /// the instance's socket and the instance's writes straight out of the client's; the
    /// proxy's socket `instance` stays idle. `pipelined` are the client bytes userspace read
    /// past the handshake, not yet sent to the instance.
    #[allow(clippy::too_many_arguments)]
    pub fn start_zero_hop(
        self: &Arc<Self>,
        client: tokio::net::TcpStream,
        instance: tokio::net::TcpStream,
        keys: ZeroHopKeys,
        pipelined: Vec<u8>,
        written: WrittenByHand,
        max_message_bytes: u64,
        on_spliced: impl FnOnce(SplicedPair),
        on_end: OnEnd,
    ) {
        let entered = (|| {
            let client = client.into_std()?;
            let instance = instance.into_std()?;
            let pair = SplicedPair {
                client: socket::cookie(&client)?,
                // The proxy socket carries no data: its cookie names the instance -> client
                // counters.
                instance: socket::cookie(&instance)?,
            };
            socket::set_receive_buffer(&client, MAX_FRAME_WIRE_LEN as usize)?;
            // A fixed size (no autotuning up to `tcp_rmem`'s 6 MiB) for what the instance's
            // writes park here while the client does not read: with the client socket's send
            // buffer, that is all the proxy path holds for such a client.
            socket::set_receive_buffer(&instance, MAX_FRAME_WIRE_LEN as usize)?;
            let sides = self.maps.lock().expect("maps lock").insert_sides(
                pair,
                written,
                max_message_bytes,
                FLAG_ZERO_HOP,
            );
            sides
                .and_then(|()| {
                    zero_hop::insert(&self.maps, &client, &instance, pair, keys, &pipelined)
                })
                .inspect_err(|_| {
                    self.remove(pair);
                })?;
            socket::kick_receive_path(&client)?;
            Ok::<_, io::Error>((client, instance, pair))
        })();
        let zero_hop = Box::new(teardown::ZeroHopConn {
            keys,
            client_relay: Default::default(),
        });
        self.carry(entered, written, Some(zero_hop), on_spliced, on_end);
    }

    /// Sizes the buffers, inserts both sockets and kicks the parser.
    fn enter_maps(
        &self,
        client: tokio::net::TcpStream,
        instance: tokio::net::TcpStream,
        written: WrittenByHand,
        max_message_bytes: u64,
    ) -> io::Result<(TcpStream, TcpStream, SplicedPair)> {
        let client = client.into_std()?;
        let instance = instance.into_std()?;
        let pair = SplicedPair {
            client: socket::cookie(&client)?,
            instance: socket::cookie(&instance)?,
        };
        for s in [&client, &instance] {
            socket::set_receive_buffer(s, MAX_FRAME_WIRE_LEN as usize)?;
        }
        self.insert(&client, &instance, pair, written, max_message_bytes)
            .inspect_err(|_| {
                self.remove(pair);
            })?;
        for s in [&client, &instance] {
            socket::kick_receive_path(s)?;
        }
        Ok((client, instance, pair))
    }

    /// Ends a spliced connection from the proxy's side: both peers get a close frame with
    /// [`proxy_close_code`] and a FIN, then [`CLOSE_GRACE`] to answer; or, without a close
    /// code, both sockets are closed at once.
    pub fn stop(&self, pair: SplicedPair, ending: Ending) {
        if let Some(conn) = self
            .hangups
            .get(pair.client)
            .or_else(|| self.hangups.get(pair.instance))
        {
            tokio::spawn(stop_by_proxy(self.maps.clone(), conn, ending));
        }
    }

    /// Ends every spliced connection now (the drain window is over); each one's `on_end`
    /// runs with [`SpliceEnd::Aborted`].
    pub fn abort_all(&self) {
        for conn in self.hangups.watched() {
            conn.finish(SpliceEnd::Aborted(io::Error::new(
                io::ErrorKind::TimedOut,
                "cut at the end of the drain window",
            )));
        }
    }
}

/// Runs once when a spliced connection ends: how, then the final kernel counters
/// (client -> instance, instance -> client).
pub type OnEnd = Box<dyn FnOnce(SpliceEnd, SideState, SideState) + Send>;

/// The error and the last lines of the verifier log, which say why a program was refused.
fn verifier_summary(e: &aya::programs::ProgramError) -> String {
    let text = format!("{e:#}");
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines.len().saturating_sub(4);
    format!(
        "{} ... {}",
        lines.first().copied().unwrap_or_default(),
        lines[tail..].join(" | ")
    )
}
