//! Trace records: what the kernel programs tell `wsedge trace` about the frames they carry.
//!
//! They go into their own ring buffer (`TRACE`), apart from the events userspace acts on, so
//! a slow or absent trace reader can never delay a teardown. The programs write one only
//! while someone listens (`TRACING[0] > 0`), and not at all when the object is loaded with
//! `TRACE_BUILT = 0` (the verifier then removes the code as dead).

/// One trace record (ring buffer record).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceRecord {
    /// `bpf_ktime_get_ns`: CLOCK_MONOTONIC.
    pub time_ns: u64,
    /// The cookie that keys the side in `SIDES`: the socket the frames arrive on (two
    /// sockets), or the proxy's instance-side socket for a zero-hop instance's writes.
    pub side_cookie: u64,
    /// One of the `TRACE_*` kinds.
    pub kind: u32,
    /// Kind-specific: the close code, the refusal, why the client left the kernel path.
    pub detail: u32,
    /// Kind-specific: the frame's payload length for a refused frame.
    pub value: u64,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for TraceRecord {}

/// A close frame passed (`detail`: its code, 1005 when it carried none).
pub const TRACE_CLOSE_FRAME: u32 = 1;
/// A frame that would make its message larger than `max_message_bytes` was refused
/// (`value`: that frame's payload length).
pub const TRACE_MESSAGE_TOO_BIG: u32 = 2;
/// A frame RFC 6455 forbids was refused.
pub const TRACE_PROTOCOL_ERROR: u32 = 3;
/// The client went over its rate with `on_exceed = "throttle"`: its frames wait from here.
pub const TRACE_THROTTLE_ON: u32 = 4;
/// The client went over its rate with `on_exceed = "close"`.
pub const TRACE_RATE_CLOSE: u32 = 5;
/// The kernel could not redirect a frame to the peer socket (it is not in the map).
pub const TRACE_REDIRECT_FAILED: u32 = 6;
/// The client's stream parser stopped: userspace carries its frames from here (`detail`:
/// one of the `HANDED_*` reasons).
pub const TRACE_HANDED_TO_USERSPACE: u32 = 7;

/// Handed over because the client is over its rate.
pub const HANDED_RATE: u32 = 1;
/// Handed over because the instance stopped reading (zero-hop divert).
pub const HANDED_INSTANCE_BEHIND: u32 = 2;

/// The programs' read-only global that says whether trace points exist at all (u32, 1 by
/// default; 0 when `server.kernel_trace = false`).
pub const TRACE_BUILT_SYMBOL: &str = "TRACE_BUILT";
