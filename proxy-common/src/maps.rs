//! Values of the kernel data plane's maps, shared byte-for-byte with userspace.

use crate::message::MessageTracker;

/// Set in [`SideState::flags`] once a close frame has passed in this direction.
pub const FLAG_CLOSE_SEEN: u32 = 1;
/// Set when a frame header could not be parsed; the stream's framing is lost.
pub const FLAG_PROTOCOL_ERROR: u32 = 2;

/// One direction of a spliced connection, keyed by the cookie of the socket the bytes
/// arrive on. Userspace creates it before the socket enters the sockhash and reads the
/// counters for `/connections`; the verdict program updates it per frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SideState {
    /// Cookie of the socket this side's frames are redirected to.
    pub peer_cookie: u64,
    /// Wire bytes (headers included) redirected to the peer.
    pub bytes: u64,
    pub frames: u64,
    /// Completed data messages (control frames are not messages).
    pub messages: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the last frame.
    pub last_activity_ns: u64,
    pub tracker: MessageTracker,
    /// Status code of the first close frame seen, 1005 when it carried none.
    pub close_code: u32,
    pub flags: u32,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for SideState {}
