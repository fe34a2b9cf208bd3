//! The kernel data plane: loads the sockmap programs and splices accepted connections.
//!
//! Splice order (each step matters):
//! 1. userspace forwards, by hand, every byte it read past the handshake, up to a frame
//!    boundary, so the kernel parser starts on a frame header;
//! 2. the connection learns its kernel keys (so the counters of its first frames are seen);
//! 3. both sockets enter `TARGETS` and get their `SIDES` entry, then both enter `SPLICED`:
//!    whichever side sends first, its peer is already a valid redirect target;
//! 4. a receive-path kick makes the parser look at bytes that arrived before insertion.
//!
//! When the maps have no room (or any insert fails) nothing was carried yet: the sockets are
//! handed back and the caller carries the connection in userspace.
//!
//! Layers: `maps` (the kernel's maps and keys) < `spliced` (a carried connection's record and
//! progress) < `zero_hop` (its programs, links and userspace legs) < `teardown` (how a
//! carried connection ends) < this module (loading, starting, stopping, events).

use std::{
    collections::HashMap as StdHashMap,
    io,
    net::TcpStream,
    os::fd::AsRawFd,
    path::Path,
    sync::{Arc, Mutex, OnceLock, Weak},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, RingBuf},
    programs::SkSkb,
};
use proxy_common::{
    SideState,
    maps::{DataPlaneEvent, FLAG_ZERO_HOP, SPLICED_RECEIVE_BUFFER},
    offsets::KERNEL_OFFSETS_SYMBOL,
    policy::Ending,
    trace::TRACE_BUILT_SYMBOL,
};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use maps::Maps;
pub use maps::{WrittenByHand, ZeroHopKeys};
use spliced::{Entered, Spliced};
pub use zero_hop::ZeroHopUnavailable;

use super::{
    hangup::{Hangup, HangupWatcher},
    socket,
};
use crate::conn::{KernelKeys, LiveCounters};

mod maps;
mod pins;
mod spliced;
mod teardown;
mod trace_ring;
mod zero_hop;

pub use pins::PinDir;
pub use trace_ring::TraceRing;

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

/// Maps sized per connection: (name, entries per connection).
const MAPS_PER_CONNECTION: [(&str, u32); 7] = [
    ("SPLICED", 2),
    ("TARGETS", 2),
    ("SIDES", 2),
    ("INSTANCE_SOCKETS", 2),
    ("INSTANCE_RECORDS", 2),
    ("CLIENT_LINKS", 1),
    ("INSTANCE_LINKS", 2),
];

pub struct KernelDataPlane {
    maps: Arc<Mutex<Maps>>,
    hangups: Arc<HangupWatcher<Spliced>>,
    /// Owns the loaded programs and their attachments for the process lifetime (the
    /// zero-hop sock_ops program is attached after load, once the instance cgroup exists).
    ebpf: Mutex<Ebpf>,
    /// Set once the zero-hop programs are attached to the instances' cgroup.
    zero_hop: OnceLock<()>,
    /// Spliced connections by client cookie, for the kernel's events.
    conns: Mutex<StdHashMap<u64, Weak<Spliced>>>,
    /// The kernel's event ring until its reader starts (at the first splice: the reader
    /// needs the plane's `Arc`).
    events: Mutex<Option<RingBuf<MapData>>>,
    /// Records for `wsedge trace`.
    trace: TraceRing,
    /// The maps pinned under bpffs, until a clean stop ([`Self::unpin`]).
    pins: Mutex<Option<PinDir>>,
}

/// How a spliced connection ended, as the relay reports it too: `Closed` (both sides
/// finished with FIN), `InstanceFailed` (the client was sent 1011), the proxy's own ending
/// ([`KernelDataPlane::stop`]), or the error of a socket that failed (both were closed).
pub type SpliceEnd = io::Result<Ending>;

/// Runs once when a spliced connection ends: how, then the final kernel counters
/// (client -> instance, instance -> client).
pub type OnEnd = Box<dyn FnOnce(SpliceEnd, SideState, SideState) + Send>;

/// The kernel could not take a connection (its maps are full, or a socket failed while it
/// was being inserted): nothing was carried, and the sockets come back for userspace.
pub struct NotSpliced {
    pub client: tokio::net::TcpStream,
    pub instance: tokio::net::TcpStream,
    pub reason: io::Error,
    /// The request's `on_end`, not run: whoever carries the connection now reports its end.
    pub on_end: OnEnd,
}

/// What a splice is given: the sockets, what userspace wrote to each by hand, the function's
/// message limit, and where to report its keys and its end.
pub struct SpliceRequest<'a> {
    pub client: tokio::net::TcpStream,
    pub instance: tokio::net::TcpStream,
    pub written: WrittenByHand,
    pub max_message_bytes: u64,
    /// The client's rate quotas, with the meters as the hand-over left them.
    pub rate: proxy_common::rate::RateState,
    /// Told the kernel keys before the sockets enter the maps, and `None` if they never did.
    pub on_keys: &'a dyn Fn(Option<KernelKeys>),
    /// Told what userspace sees of the frames it relays for the kernel.
    pub tracer: Arc<crate::tracer::Tracer>,
    pub on_end: OnEnd,
}

/// How long a half-closed direction may take to flush what the kernel redirected.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

impl LiveCounters for KernelDataPlane {
    fn side(&self, cookie: u64) -> Option<SideState> {
        maps::side_of(&self.maps, cookie)
    }
}

impl KernelDataPlane {
    /// Loads and attaches the splice programs, with maps sized for `connections` at once;
    /// `trace_points: false` loads them without their trace points.
    pub fn load(connections: u32, trace_points: bool) -> Result<KernelDataPlane, LoadError> {
        if OBJECT.is_empty() {
            return Err(LoadError::NotBuilt);
        }
        let offsets = super::btf::kernel_offsets()?;
        let mut loader = EbpfLoader::new();
        loader.override_global(KERNEL_OFFSETS_SYMBOL, &offsets, true);
        let trace_built = u32::from(trace_points);
        loader.override_global(TRACE_BUILT_SYMBOL, &trace_built, true);
        for (name, per_connection) in MAPS_PER_CONNECTION {
            loader.map_max_entries(name, per_connection * connections);
        }
        let mut ebpf = loader.load(OBJECT)?;
        let pins = match PinDir::pin(&ebpf) {
            Ok(pins) => {
                info!(path = %pins.path().display(), "kernel maps pinned");
                Some(pins)
            }
            Err(e) => {
                warn!(error = %e, "kernel maps not pinned: bpftool cannot find them by path");
                None
            }
        };
        let maps = Maps::take(&mut ebpf)?;
        let trace = TraceRing::take(&mut ebpf)?;
        let events = ebpf
            .take_map("EVENTS")
            .ok_or_else(|| LoadError::Map("EVENTS", "missing from object".into()))?;
        let events =
            RingBuf::try_from(events).map_err(|e| LoadError::Map("EVENTS", e.to_string()))?;
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
                .attach(maps.spliced.fd())
                .map_err(|e| LoadError::Program(name, e.to_string()))?;
        }
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|e| LoadError::Runtime(e.to_string()))?;
        let hangups = HangupWatcher::start(move |hangup: Hangup<Spliced>| {
            runtime.spawn(teardown::on_hangup(hangup.conn, hangup.from_client));
        })
        .map_err(|e| LoadError::Runtime(e.to_string()))?;
        Ok(KernelDataPlane {
            maps: Arc::new(Mutex::new(maps)),
            hangups: Arc::new(hangups),
            ebpf: Mutex::new(ebpf),
            zero_hop: OnceLock::new(),
            conns: Mutex::default(),
            events: Mutex::new(Some(events)),
            trace,
            pins: Mutex::new(pins),
        })
    }

    /// Attaches the zero-hop programs to `cgroup_dir`, the parent of every instance's cgroup.
    pub fn enable_zero_hop(self: &Arc<Self>, cgroup_dir: &Path) -> Result<(), ZeroHopUnavailable> {
        {
            let mut ebpf = self.ebpf.lock().expect("ebpf lock");
            zero_hop::attach(&mut ebpf, &self.maps, cgroup_dir)?;
        }
        let _ = self.zero_hop.set(());
        Ok(())
    }

    /// The keys of the instance socket at the other end of `proxy_socket`, if zero-hop is
    /// enabled and the kernel recorded that socket. `None`: use two sockets.
    pub async fn zero_hop_keys(
        &self,
        client: &tokio::net::TcpStream,
        proxy_socket: &tokio::net::TcpStream,
    ) -> Option<ZeroHopKeys> {
        self.zero_hop.get()?;
        zero_hop::keys(&self.maps, client, proxy_socket).await
    }

    /// Hands both sockets to the kernel and returns at once: no task waits while the kernel
    /// carries frames (per connection, userspace then holds only the [`Spliced`] record and
    /// two epoll registrations). `on_end` runs once, with how it ended and the final kernel
    /// counters, when both directions are done or either failed.
    pub fn splice(self: &Arc<Self>, request: SpliceRequest<'_>) -> Result<(), NotSpliced> {
        self.enter(request, None, &[])
    }

    /// Like [`Self::splice`], for an instance on this host whose socket the kernel recorded
    /// (`keys`, from [`Self::zero_hop_keys`]): the client's frames go straight into the
    /// instance's socket and the instance's writes straight out of the client's; the proxy's
    /// socket `instance` stays idle. `pipelined` are the client bytes userspace read past the
    /// handshake, not yet sent to the instance (handed back unsent if the kernel cannot take
    /// the connection).
    pub fn splice_zero_hop(
        self: &Arc<Self>,
        request: SpliceRequest<'_>,
        keys: ZeroHopKeys,
        pipelined: &[u8],
    ) -> Result<(), NotSpliced> {
        self.enter(request, Some(keys), pipelined)
    }

    fn enter(
        self: &Arc<Self>,
        request: SpliceRequest<'_>,
        zero_hop: Option<ZeroHopKeys>,
        pipelined: &[u8],
    ) -> Result<(), NotSpliced> {
        let SpliceRequest {
            client,
            instance,
            written,
            max_message_bytes,
            rate,
            on_keys,
            on_end,
            tracer,
        } = request;
        let (client, instance) = match (client.into_std(), instance.into_std()) {
            (Ok(c), Ok(i)) => (c, i),
            (Err(e), _) | (_, Err(e)) => {
                // into_std fails only when deregistering from the runtime fails: the
                // sockets are gone, nothing is left to carry.
                on_end(Err(e), SideState::default(), SideState::default());
                return Ok(());
            }
        };
        self.start_events();
        let entered = (|| {
            let pair = KernelKeys {
                client: socket::cookie(&client)?,
                // Zero-hop: the proxy socket carries no data; its cookie names the
                // instance -> client counters.
                instance: socket::cookie(&instance)?,
            };
            socket::set_receive_buffer(&client, SPLICED_RECEIVE_BUFFER as usize)?;
            // Zero-hop: a fixed size (no autotuning up to `tcp_rmem`'s 6 MiB) for what the
            // instance's writes park here while the client does not read: with the client
            // socket's send buffer, that is all the proxy path holds for such a client.
            socket::set_receive_buffer(&instance, SPLICED_RECEIVE_BUFFER as usize)?;
            on_keys(Some(pair));
            let flags = if zero_hop.is_some() { FLAG_ZERO_HOP } else { 0 };
            // Each step takes the maps lock itself (a guard kept across the chain would
            // deadlock the next step's lock).
            let sides = self.maps.lock().expect("maps lock").insert_sides(
                pair,
                written,
                max_message_bytes,
                rate,
                flags,
            );
            let inserted = sides.and_then(|()| match zero_hop {
                Some(keys) => {
                    zero_hop::insert(&self.maps, &client, &instance, pair, keys, pipelined)
                }
                None => {
                    let mut maps = self.maps.lock().expect("maps lock");
                    maps.insert_splice(&client, &instance, pair)
                }
            });
            if let Err(e) = inserted {
                self.maps
                    .lock()
                    .expect("maps lock")
                    .remove(pair, zero_hop.as_ref());
                on_keys(None);
                return Err(e);
            }
            socket::kick_receive_path(&client)?;
            if zero_hop.is_none() {
                socket::kick_receive_path(&instance)?;
            }
            Ok::<_, io::Error>(pair)
        })();
        let pair = match entered {
            Ok(pair) => pair,
            Err(reason) => {
                let back = |s: TcpStream| tokio::net::TcpStream::from_std(s);
                return match (back(client), back(instance)) {
                    (Ok(client), Ok(instance)) => Err(NotSpliced {
                        client,
                        instance,
                        reason,
                        on_end,
                    }),
                    (Err(e), _) | (_, Err(e)) => {
                        on_end(Err(e), SideState::default(), SideState::default());
                        Ok(())
                    }
                };
            }
        };
        // The kernel's events no longer concern the connection once it ended.
        let plane = Arc::downgrade(self);
        let on_end: OnEnd = Box::new(move |end, inbound, outbound| {
            if let Some(plane) = plane.upgrade() {
                plane.forget(pair.client);
            }
            on_end(end, inbound, outbound)
        });
        let entered = Entered {
            client,
            instance,
            pair,
            written,
            zero_hop,
            tracer,
        };
        let conn = Arc::new(Spliced::new(
            entered,
            self.maps.clone(),
            self.hangups.clone(),
            on_end,
        ));
        self.conns
            .lock()
            .expect("conns lock")
            .insert(pair.client, Arc::downgrade(&conn));
        self.watch(conn);
        Ok(())
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
            conn.finish(Err(e));
        }
    }

    fn forget(&self, client: u64) {
        self.conns.lock().expect("conns lock").remove(&client);
    }

    /// Starts reading the kernel's events, once.
    fn start_events(self: &Arc<Self>) {
        let Some(events) = self.events.lock().expect("events lock").take() else {
            return;
        };
        // SAFETY: the ring buffer owns its descriptor, open as long as the AsyncFd holds it.
        match unsafe { AsyncFd::register(events) } {
            Ok(reader) => {
                tokio::spawn(read_events(reader, Arc::downgrade(self)));
            }
            // Held clients are then found through their socket error alone.
            Err(e) => tracing::warn!(error = %e, "cannot read the kernel's data-plane events"),
        }
    }

    /// Ends a spliced connection from the proxy's side (see `teardown::stop_by_proxy`).
    pub fn stop(&self, pair: KernelKeys, ending: Ending) {
        if let Some(conn) = self
            .hangups
            .get(pair.client)
            .or_else(|| self.hangups.get(pair.instance))
        {
            tokio::spawn(teardown::stop_by_proxy(conn, ending));
        }
    }

    pub fn trace(&self) -> &TraceRing {
        &self.trace
    }

    /// Removes the pinned maps (a clean stop).
    pub fn unpin(&self) {
        self.pins.lock().expect("pins lock").take();
    }

    /// Ends every spliced connection now (the drain window is over); each one's `on_end`
    /// runs with the error.
    pub fn abort_all(&self) {
        for conn in self.hangups.watched() {
            conn.finish(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "cut at the end of the drain window",
            )));
        }
    }

    /// Each loaded program's name, run count and run time; the kernel counts only while BPF
    /// stats are on, so both may stay 0.
    pub fn program_stats(&self) -> Vec<(String, u64, Duration)> {
        let ebpf = self.ebpf.lock().expect("ebpf lock");
        ebpf.programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                Some((name.to_string(), info.run_count(), info.run_time()))
            })
            .collect()
    }
}

/// Kernel events: the client's frames held for userspace, an instance frame refused.
async fn read_events(mut reader: AsyncFd<RingBuf<MapData>>, plane: Weak<KernelDataPlane>) {
    loop {
        let Ok(mut guard) = reader.readable_mut().await else {
            return;
        };
        let ring = guard.get_inner_mut();
        let mut events: Vec<DataPlaneEvent> = Vec::new();
        maps::drain_records(ring, |event| events.push(event));
        guard.clear_ready();
        let Some(plane) = plane.upgrade() else {
            return;
        };
        for event in events {
            let conn = plane
                .conns
                .lock()
                .expect("conns lock")
                .get(&event.client_cookie)
                .and_then(Weak::upgrade);
            if let Some(conn) = conn {
                teardown::on_event(conn, &event);
            }
        }
    }
}

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
