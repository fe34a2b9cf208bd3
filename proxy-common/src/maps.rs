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
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for SideState {}

/// Most bytes redirected to a peer that its TCP has not taken yet. The kernel queues redirected
/// frames for a peer whose send buffer is full without limit, and the stream parser keeps
/// consuming the sender's socket whatever the peer does, so it cannot apply back-pressure: a
/// connection over this bound fails instead (the parser reports ENOBUFS). Sixteen of the
/// largest frames: far above what a peer that reads ever leaves queued.
pub const MAX_BACKLOG_BYTES: u64 = 16 * MAX_FRAME_WIRE_LEN;

/// How many redirected bytes pass between two checks of the peer's backlog: the bound is
/// exceeded by at most this much plus one frame.
pub const BACKLOG_CHECK_EVERY: u64 = 256 * 1024;

/// Connections the kernel maps are sized for (two sockets, two sides each).
pub const MAX_CONNECTIONS: u32 = 16384;

/// Largest frame (header included) the kernel assembles: a 256 KiB message in one frame with
/// a 14-byte header, rounded up. Bigger frames fail the socket (EMSGSIZE) instead of making the
/// kernel buffer unbounded data; userspace sizes `SO_RCVBUF` so this always fits.
pub const MAX_FRAME_WIRE_LEN: u64 = 256 * 1024 + 1024;

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
