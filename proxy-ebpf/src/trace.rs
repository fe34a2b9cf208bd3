//! Trace points: records for `wsedge trace` (see `proxy_common::trace`). When nobody
//! listens a trace point costs one array lookup and a branch; with `TRACE_BUILT = 0` the
//! verifier removes it entirely.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, RingBuf},
};
use proxy_common::trace::TraceRecord;

/// Set by userspace at load time (`proxy_common::trace::TRACE_BUILT_SYMBOL`).
#[unsafe(no_mangle)]
static TRACE_BUILT: u32 = 1;

/// `[0]`: how many `wsedge trace` readers are listening (written by userspace); `[1]`:
/// records lost to a full ring (read by userspace).
#[map]
static TRACING: Array<u32> = Array::with_max_entries(2, 0);

/// The records, read by userspace while someone listens.
#[map]
static TRACE: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Writes a record about the side keyed by `side_cookie`, if anyone listens.
#[inline(always)]
pub fn emit(side_cookie: u64, kind: u32, detail: u32, value: u64) {
    // SAFETY: a plain read of a load-time constant (volatile: the default must not fold).
    if unsafe { core::ptr::read_volatile(&TRACE_BUILT) } == 0 {
        return;
    }
    match TRACING.get(0) {
        Some(listeners) if *listeners > 0 => {}
        _ => return,
    }
    let record = TraceRecord {
        // SAFETY: plain helper call.
        time_ns: unsafe { bpf_ktime_get_ns() },
        side_cookie,
        kind,
        detail,
        value,
    };
    if TRACE.output::<TraceRecord>(&record, 0).is_err()
        && let Some(lost) = TRACING.get_ptr_mut(1)
    {
        // SAFETY: map value pointer from a successful lookup; programs on other CPUs add too.
        unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(lost, 1) };
    }
}
