//! The paths that carry a connection after the upgrade, and how one is chosen.
//!
//! [`DataPlane`] is what this process loaded (the kernel programs, or only the relay);
//! [`Path`] is what one connection takes: the userspace relay, the two-socket kernel splice,
//! or zero-hop. Each lifecycle step that differs between paths is one `match` here.

pub mod btf;
pub mod closing;
pub mod copy;
pub mod hangup;
pub mod kernel;
pub mod relay;
pub mod socket;

use std::{io, sync::Arc};

use proxy_common::policy::Ending;
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tracing::warn;

pub use kernel::{KernelDataPlane, LoadError};
use kernel::{NotSpliced, OnEnd, SpliceRequest, WrittenByHand, ZeroHopKeys};
use relay::Relay;

use crate::{
    config::DataPlaneMode,
    conn::{Connection, Direction, LiveCounters, PlaneName},
    protocols::{frames::FrameCursor, stream::ClientStream},
};

#[derive(Clone)]
pub enum DataPlane {
    Kernel(Arc<KernelDataPlane>),
    Userspace,
}

impl DataPlane {
    /// Picks the data plane for `mode`, its kernel maps sized for `map_connections` and with
    /// or without `trace_points`;
    /// `kernel` fails when the programs cannot load, `auto` falls back to the userspace relay
    /// and logs why, once.
    pub fn select(
        mode: DataPlaneMode,
        map_connections: u32,
        trace_points: bool,
    ) -> Result<DataPlane, LoadError> {
        let load = || {
            KernelDataPlane::load(map_connections, trace_points)
                .map(|k| DataPlane::Kernel(Arc::new(k)))
        };
        match mode {
            DataPlaneMode::Userspace => Ok(DataPlane::Userspace),
            DataPlaneMode::Kernel => load(),
            DataPlaneMode::Auto => load().or_else(|e| {
                warn!(reason = %e, "kernel data plane unavailable; using the userspace relay");
                Ok(DataPlane::Userspace)
            }),
        }
    }

    /// The name of the default path, for the start-up log.
    pub fn name(&self) -> &'static str {
        match self {
            DataPlane::Kernel(_) => PlaneName::Kernel.as_str(),
            DataPlane::Userspace => PlaneName::Userspace.as_str(),
        }
    }

    /// Where live kernel counters come from, if anywhere.
    pub fn live(&self) -> Option<&dyn LiveCounters> {
        match self {
            DataPlane::Kernel(k) => Some(k.as_ref()),
            DataPlane::Userspace => None,
        }
    }

    /// The path for one upgraded connection: zero-hop for an instance spawned on this host
    /// whose socket the kernel recorded, else the two-socket splice, or the relay. A `wss://`
    /// client is relayed: its records are encrypted by rustls, or by the kernel's TLS, which
    /// a sockmap redirect would bypass.
    pub async fn path_for(
        &self,
        client: &ClientStream,
        instance: &TcpStream,
        spawned: bool,
    ) -> Path {
        let client = match client {
            ClientStream::Plain(tcp) => tcp,
            ClientStream::Tls(_) => return Path::Relay(RelayOver::RustlsTls),
            ClientStream::Ktls(_) => return Path::Relay(RelayOver::KernelTls),
        };
        match self {
            DataPlane::Userspace => Path::Relay(RelayOver::Tcp),
            DataPlane::Kernel(k) => {
                let keys = match spawned {
                    true => k.zero_hop_keys(client, instance).await,
                    false => None,
                };
                match keys {
                    Some(keys) => Path::ZeroHop(k.clone(), keys),
                    None => Path::TwoSocket(k.clone()),
                }
            }
        }
    }
}

/// The future that carries a connection in userspace until it ends.
pub type Carrying = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The path one connection takes after the upgrade.
pub enum Path {
    Relay(RelayOver),
    TwoSocket(Arc<KernelDataPlane>),
    ZeroHop(Arc<KernelDataPlane>, ZeroHopKeys),
}

/// What the relay reads and writes on the client's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayOver {
    Tcp,
    /// rustls in this process encrypts and decrypts.
    RustlsTls,
    /// The kernel encrypts and decrypts; the relay sees plaintext.
    KernelTls,
}

/// A connection at the hand-over: its sockets, what userspace wrote to each by hand, and
/// the client's bytes past the handshake that the splice itself delivers (zero-hop only;
/// every other path has already forwarded them).
pub struct Handover {
    pub client: ClientStream,
    pub instance: TcpStream,
    pub written: WrittenByHand,
    pub pipelined: Vec<u8>,
}

impl Path {
    pub fn name(&self) -> PlaneName {
        match self {
            Path::Relay(RelayOver::Tcp) => PlaneName::Userspace,
            Path::Relay(RelayOver::RustlsTls) => PlaneName::UserspaceTls,
            Path::Relay(RelayOver::KernelTls) => PlaneName::UserspaceKtls,
            Path::TwoSocket(_) => PlaneName::Kernel,
            Path::ZeroHop(..) => PlaneName::KernelZeroHop,
        }
    }

    /// Whether the kernel takes over the streams: its parser must then start on a frame
    /// header, so the hand-over completes any frame the handshake's leftovers ended inside.
    pub fn kernel(&self) -> bool {
        !matches!(self, Path::Relay(_))
    }

    /// Whether the client's bytes past the handshake stay for the splice to deliver.
    pub fn keeps_pipelined(&self) -> bool {
        matches!(self, Path::ZeroHop(..))
    }

    /// Carries the connection until it ends, then runs `on_end` once with how it ended.
    /// Returns the future that carries it when userspace does (the relay: the caller runs it
    /// as the connection's task); `None` when the kernel does (it then keeps no task, and
    /// `on_end` runs from teardown). When the kernel cannot take the connection (maps full),
    /// the relay carries it with the same policy.
    pub fn carry(
        self,
        handover: Handover,
        conn: Arc<Connection>,
        cursors: [FrameCursor; 2],
        on_end: impl FnOnce(io::Result<Ending>) + Send + 'static,
    ) -> Option<Carrying> {
        let (kernel, zero_hop, client) = match (self, handover.client) {
            (Path::TwoSocket(k), ClientStream::Plain(tcp)) => (k, None, tcp),
            (Path::ZeroHop(k, keys), ClientStream::Plain(tcp)) => (k, Some(keys), tcp),
            // `path_for` chose the relay for every TLS client.
            (_, client) => {
                // Built here, outside the future, which then only borrows it: the relay's
                // state is held once per connection.
                conn.tracer.started(&conn, conn.plane());
                let mut relay = Relay::new(client, handover.instance, conn, cursors);
                return Some(Box::pin(async move { on_end(relay.run().await) }));
            }
        };
        let ended = conn.clone();
        let on_end: OnEnd = Box::new(move |end, inbound, outbound| {
            ended.absorb_kernel(inbound, outbound);
            on_end(end)
        });
        let Handover {
            instance,
            written,
            pipelined,
            ..
        } = handover;
        let request = SpliceRequest {
            client,
            instance,
            written,
            max_message_bytes: conn.limits.max_message_bytes,
            rate: conn.account(Direction::ClientToInstance, |side| side.rate.handed_on()),
            on_keys: &|keys| {
                conn.set_kernel_keys(keys);
                if let Some(keys) = keys {
                    // Before the sockets enter the maps: no kernel record can precede it.
                    conn.tracer.watch(&conn, keys);
                    conn.tracer.started(&conn, conn.plane());
                }
            },
            on_end,
            tracer: conn.tracer.clone(),
        };
        let spliced = match zero_hop {
            Some(keys) => kernel.splice_zero_hop(request, keys, &pipelined),
            None => kernel.splice(request),
        };
        match spliced {
            Ok(()) => {
                // A stop asked for before the splice existed is carried out now.
                if let (Some(ending), Some(keys)) = (conn.stop_reason(), conn.kernel_keys()) {
                    kernel.stop(keys, ending);
                }
                None
            }
            Err(not) => Some(Box::pin(relay_instead(not, conn, pipelined))),
        }
    }

    /// Asks the path to end a connection the proxy is ending (the relay and a connection the
    /// kernel does not carry yet act on [`Connection::request_stop`] themselves).
    pub fn stop(data_plane: &DataPlane, conn: &Connection, ending: Ending) {
        if let (DataPlane::Kernel(k), Some(keys)) = (data_plane, conn.kernel_keys()) {
            k.stop(keys, ending);
        }
    }
}

/// The kernel could not take the connection: the relay carries it from the frame boundary
/// the hand-over reached, with the same policy and counters.
async fn relay_instead(not: NotSpliced, conn: Arc<Connection>, pipelined: Vec<u8>) {
    let NotSpliced {
        client,
        mut instance,
        reason,
        on_end,
    } = not;
    warn!(id = %conn.id, %reason, "the kernel cannot take this connection; the userspace relay carries it");
    conn.set_plane(PlaneName::Userspace);
    conn.tracer.not_spliced(&conn);
    let result = match instance.write_all(&pipelined).await {
        Ok(()) => relay::relay(client, instance, conn, Default::default()).await,
        Err(e) => Err(e),
    };
    on_end(result, Default::default(), Default::default());
}
