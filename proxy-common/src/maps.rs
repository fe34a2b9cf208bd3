//! Values of the kernel data plane's maps, shared byte-for-byte with userspace.

use crate::message::MessageTracker;

/// Set in [`SideState::flags`] once a close frame has passed in this direction.
pub const FLAG_CLOSE_SEEN: u32 = 1;
/// Set when a frame header could not be parsed; the stream's framing is lost.
pub const FLAG_PROTOCOL_ERROR: u32 = 2;
/// Set when the connection failed because its peer left more than `MAX_BACKLOG_BYTES`
/// redirected bytes untaken (a reader that stopped reading).
pub const FLAG_PEER_BACKLOG: u32 = 4;
/// Set when a message of this direction went over `max_message_bytes` (closed with 1009).
pub const FLAG_MESSAGE_TOO_BIG: u32 = 8;
/// Zero-hop client side only: the instance stopped keeping up (or the proxy is closing the
/// connection), so the client's frames are to leave the kernel path for good: the verdict
/// stops the instance's writes going to the client socket, and the stream parser stops
/// (`FLAG_HELD`) at the next frame boundary where no such write is still in flight.
pub const FLAG_DIVERTED: u32 = 16;
/// Set by userspace on a zero-hop connection's client side before the socket is spliced: its
/// frames go to the instance socket (`CLIENT_LINKS`), and the two-socket backlog check, whose
/// peer is not in `TARGETS`, does not apply.
pub const FLAG_ZERO_HOP: u32 = 32;
/// Zero-hop client side: the stream parser stopped at a frame boundary with an error
/// (`EAGAIN`) without consuming the next byte, so everything from there on waits in the
/// client socket's TCP receive queue, whose window holds the client back; userspace takes
/// the socket out of `SPLICED` and relays from that point. (Passing frames up to the socket
/// instead, `SK_PASS`, is unusable: on kernels since 6.14 it can move the socket's
/// `copied_seq` past the received data when the passed bytes are not read before the parser's
/// next read, after which the socket stalls.)
pub const FLAG_HELD: u32 = 64;
/// The stream parser's last answer was "need more bytes" (an incomplete header or control
/// frame): the kernel holds those bytes in the parser, so it cannot stop there.
pub const FLAG_PARSER_PENDING: u32 = 128;
/// Set when a client frame went over the rate with `on_exceed = "close"` (closed with 1008).
pub const FLAG_RATE_EXCEEDED: u32 = 256;
/// Two-socket client side: a frame went over the rate with `on_exceed = "throttle"` while the
/// parser could not stop at once; it stops (`FLAG_HELD`) at the next frame boundary and
/// userspace paces the client's frames from there.
pub const FLAG_THROTTLE_NEXT: u32 = 512;

/// One direction of a spliced connection, keyed by the cookie of the socket the bytes
/// arrive on. Userspace creates it before the socket enters the sockhash and reads the
/// counters for `/connections`; the verdict program updates it per frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SideState {
    /// Cookie of the socket this side's frames are redirected to.
    pub peer_cookie: u64,
    /// Bytes userspace wrote to the peer socket itself before the splice (handshake and
    /// pipelined bytes): with `bytes`, all the peer's TCP must take (see `MAX_BACKLOG_BYTES`).
    pub peer_written_by_hand: u64,
    /// `bytes` when the peer's backlog was last checked (see `BACKLOG_CHECK_EVERY`).
    pub backlog_checked_at: u64,
    /// The function's `max_message_bytes` for this direction (0: no message limit).
    pub max_message_bytes: u64,
    /// Wire bytes (headers included) redirected to the peer.
    pub bytes: u64,
    pub frames: u64,
    /// Completed data messages (control frames are not messages).
    pub messages: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the last frame.
    pub last_activity_ns: u64,
    pub tracker: MessageTracker,
    /// `bpf_ktime_get_ns` of the first close frame: which side closed first decides the
    /// function status.
    pub close_at_ns: u64,
    /// Status code of the first close frame seen, 1005 when it carried none.
    pub close_code: u32,
    pub flags: u32,
    /// Bytes of the current frame still to come after the last piece the kernel handled: the
    /// parser hands a data frame over in pieces, and an instance's writes need not follow
    /// frame boundaries.
    pub frame_remaining: u64,
    /// Zero-hop instance side only: how the instance's writes to the client stand.
    pub sends: SendState,
    /// Client side only: the rate quotas and their meters.
    pub rate: crate::rate::RateState,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for SideState {}

/// Most bytes redirected to a peer that its TCP has not taken yet. The kernel queues redirected
/// frames for a peer whose send buffer is full without limit, and the stream parser keeps
/// consuming the sender's socket whatever the peer does, so it cannot apply back-pressure: a
/// connection over this bound fails instead (the parser reports ENOBUFS). Sixteen 256 KiB
/// frames: far above what a peer that reads ever leaves queued. (Not tied to the largest
/// frame: frames are redirected in pieces as they arrive, so a 16 MiB message does not need
/// 16 MiB of room.)
pub const MAX_BACKLOG_BYTES: u64 = 16 * (256 * 1024 + 1024);

/// How many redirected bytes pass between two checks of the peer's backlog: the bound is
/// exceeded by at most this much plus one frame.
pub const BACKLOG_CHECK_EVERY: u64 = 256 * 1024;

/// Connections the kernel maps are sized for (two sockets, two sides each).
pub const MAX_CONNECTIONS: u32 = 16384;

/// Largest `max_message_bytes` a function may set: 16 MiB.
pub const MAX_MESSAGE_BYTES_LIMIT: u64 = 16 * 1024 * 1024;

/// Largest frame (header included) either plane accepts: a message of the largest allowed
/// `max_message_bytes` in one frame with a 14-byte header. Bigger frames are refused
/// (`policy::check_frame`). The kernel hands data frames on in pieces, so it never holds one
/// whole, and the size costs no memory.
pub const MAX_FRAME_WIRE_LEN: u64 = MAX_MESSAGE_BYTES_LIMIT + 14;

/// The receive buffer of a spliced socket: what the kernel holds of one side's frames before
/// TCP flow control holds its sender back.
pub const SPLICED_RECEIVE_BUFFER: u64 = 256 * 1024 + 1024;

impl SideState {
    /// Accounts one frame of this direction. Both data planes call exactly this, so their
    /// counters agree. A close frame's code is recorded separately ([`Self::record_close`])
    /// because it lives in the payload, which the two planes read differently.
    #[inline(always)]
    pub fn account(&mut self, h: &crate::FrameHeader, now_ns: u64) -> crate::FrameKind {
        self.bytes += h.wire_len();
        self.frames += 1;
        self.last_activity_ns = now_ns;
        let kind = self.tracker.on_frame(h);
        if let crate::FrameKind::MessageEnd = kind {
            self.messages += 1;
        }
        kind
    }

    /// A side whose first close frame, with `code`, came at `at_ns`: how tests and tools
    /// state who closed first.
    pub fn with_close(code: u16, at_ns: u64) -> SideState {
        let mut side = SideState {
            last_activity_ns: at_ns,
            ..SideState::default()
        };
        side.record_close(code);
        side
    }

    /// Records the first close frame's status code (1005 when it carried none).
    #[inline(always)]
    pub fn record_close(&mut self, code: u16) {
        if self.flags & FLAG_CLOSE_SEEN == 0 {
            self.flags |= FLAG_CLOSE_SEEN;
            self.close_code = code as u32;
            // `account` ran for this frame just before: its time is the close's time.
            self.close_at_ns = self.last_activity_ns;
        }
    }
}

/// A socket of the instance side of a zero-hop connection, as the socket itself sees it:
/// the network namespace it lives in (instances each have their own, with the same
/// addresses) and its 4-tuple. Addresses as the kernel stores them, ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SocketKey {
    pub netns_cookie: u64,
    pub local_ip4: u32,
    pub remote_ip4: u32,
    pub local_port: u32,
    pub remote_port: u32,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for SocketKey {}

/// What the client socket's verdict needs for a zero-hop connection, keyed by the client
/// socket's cookie. Written by userspace only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientLink {
    /// The instance's own socket, which client frames are put straight into.
    pub instance: SocketKey,
    /// Set by userspace when it ends the connection: client frames stop going to the
    /// instance (they are handed to userspace instead).
    pub stop: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for ClientLink {}

/// [`InstanceLink::role`] of the instance's own socket: its writes go to the client.
pub const ROLE_INSTANCE: u32 = 1;
/// [`InstanceLink::role`] of the proxy's instance-side socket while the bytes userspace read
/// past the handshake are forwarded: they are put into the instance socket's queue, ahead of
/// the first frame the kernel puts there.
pub const ROLE_PROXY_PIPELINED: u32 = 2;
/// [`InstanceLink::role`] of the proxy's instance-side socket afterwards: its writes go out
/// normally (userspace writes only once the instance has taken every byte the kernel put
/// into its queue, see `ROLE_QUEUE_PROBE`, so they cannot overtake them).
pub const ROLE_PROXY_SENDS: u32 = 3;

/// [`InstanceLink::role`] of a zero-hop client socket while userspace asks where it is: the
/// sk_msg program records the socket's address in `peer_sk` (sk_msg programs cannot look
/// sockets up in a map, so the instance's program needs the address) and bounces the write
/// into the socket's own receive queue, where userspace takes it back. (A refusal, SK_DROP,
/// would stick to the socket: the kernel runs the program again only after a pass or a
/// redirect.)
pub const ROLE_CLIENT_PROBE: u32 = 4;
/// [`InstanceLink::role`] of the plane's probe socket: a write asks whether the instance
/// socket at `peer_sk` has nothing queued by the kernel; the answer lands in `drained` and
/// the byte bounces into the probe socket's own receive queue.
pub const ROLE_QUEUE_PROBE: u32 = 5;

/// One socket of a zero-hop connection's instance side, keyed by its [`SocketKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InstanceLink {
    /// `ROLE_INSTANCE`: cookie of the client socket the instance's writes go to.
    pub client_cookie: u64,
    /// `ROLE_INSTANCE`: cookie whose [`SideState`] counts what the instance sends.
    pub side_cookie: u64,
    /// `ROLE_PROXY_*`: the instance's own socket.
    pub instance: SocketKey,
    pub role: u32,
    /// `ROLE_QUEUE_PROBE`, set by the program: the instance socket at `peer_sk` had nothing
    /// queued by the kernel at the last probe.
    pub drained: u32,
    pub _pad: u32,
    /// `ROLE_INSTANCE`, set by userspace when it ends the connection: the instance's writes
    /// go to the proxy's socket instead of the client.
    pub stop: u32,
    /// Address of the other socket's `struct tcp_sock` (kernel memory, read only through
    /// checked reads): `ROLE_INSTANCE`: the client socket, whose send buffer decides whether
    /// a write can go there; `ROLE_PROXY_*`: the instance socket, whose queue the gate watches.
    pub peer_sk: u64,
    /// `ROLE_INSTANCE`, set by userspace: bytes of the instance socket's own TCP stream (the
    /// handshake, and writes that went to the proxy's socket) read by userspace and written
    /// to the client. The instance's writes go straight to the client only when this equals
    /// what the proxy's socket acknowledged, so they never overtake those.
    pub forwarded: u64,
}

/// Kernel-only state of a zero-hop instance socket's writes to the client, in the instance
/// side's [`SideState`] (which the instance's program holds anyway, and which userspace writes
/// only when it creates it: it rewrites whole [`InstanceLink`] values, which would lose
/// concurrent kernel updates).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendState {
    /// Bumped atomically by every write that goes to the client: the full memory barrier
    /// between publishing `push_end` and reading `diverted`.
    pub pushes: u64,
    /// Made non-zero (atomically) by the client's verdict when it diverts: the instance's
    /// writes go to the proxy's socket from then on.
    pub diverted: u64,
    /// `PUSH_END_SET | seq`, where `seq` is the client socket's `write_seq` once the latest
    /// write sent to it has landed there (0: none yet). The client's parser stops only once
    /// the socket got that far: a write that met the stop's socket error would fail after its
    /// bytes were accounted.
    pub push_end: u64,
    /// When the client's verdict diverted (monotonic ns). A write that has not landed
    /// `HOLD_WAIT_NS` later is not on its way any more (it failed, or blocks for kernel
    /// memory), and no longer keeps the client from being held back.
    pub diverted_at_ns: u64,
    /// Where the instance's first refused frame starts in its socket's own byte stream (the
    /// stream the proxy's socket reads, handshake included), 0 while none was. A refused
    /// frame and everything after it leave through that stream, so the instance's writes
    /// succeed as they would toward a client that fails the connection, and userspace
    /// forwards nothing from there on.
    pub refused_at: u64,
}

/// See [`SendState::diverted_at_ns`].
pub const HOLD_WAIT_NS: u64 = 1_000_000_000;

/// Marks [`SendState::push_end`] as set.
pub const PUSH_END_SET: u64 = 1 << 32;

/// What `record_instance_socket` knows about an instance socket, keyed by its [`SocketKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InstanceRecord {
    pub cookie: u64,
    /// Address of its `struct tcp_sock`.
    pub sk: u64,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for InstanceRecord {}

#[cfg(feature = "user")]
unsafe impl aya::Pod for InstanceLink {}

#[cfg(feature = "user")]
unsafe impl aya::Pod for DataPlaneEvent {}

/// Something the kernel programs tell userspace (ring buffer record).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataPlaneEvent {
    /// Cookie of the connection's client socket.
    pub client_cookie: u64,
    pub kind: u32,
    pub _pad: u32,
}

/// The client socket's stream parser stopped (`FLAG_HELD`): userspace takes over its frames.
pub const EVENT_CLIENT_HELD: u32 = 1;
/// The instance's write was refused: a message over `max_message_bytes` (close with 1009) or,
/// with `FLAG_PROTOCOL_ERROR` on its side, a frame RFC 6455 forbids (close with 1002).
pub const EVENT_INSTANCE_FRAME_REFUSED: u32 = 2;

/// Zero-hop: how many client bytes pass between two looks at the instance socket's queue.
/// The instance side then holds at most its receive buffer plus this plus one frame before
/// the client's frames move to userspace (where TCP flow control applies again).
pub const ZERO_HOP_CHECK_EVERY: u64 = 32 * 1024;
