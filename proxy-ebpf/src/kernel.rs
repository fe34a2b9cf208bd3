//! Reads of kernel structs the program contexts do not expose, through the offsets userspace
//! found in the running kernel's BTF ([`KernelOffsets`], one global set at load time). Every
//! read goes through [`read_at`], so one bound applies to them all.

use aya_ebpf::helpers::bpf_probe_read_kernel;
use proxy_common::offsets::KernelOffsets;

/// Set by userspace at load time (`proxy_common::offsets::KERNEL_OFFSETS_SYMBOL`).
#[unsafe(no_mangle)]
static KERNEL_OFFSETS: KernelOffsets = KernelOffsets::UNSET;

/// Largest offset believed: every field read here sits well inside its struct's first 8 KiB.
const MAX_OFFSET: u32 = 8192;

/// The load-time offsets (a volatile read, so the compiler does not fold the zero default).
#[inline(always)]
pub fn offsets() -> KernelOffsets {
    // SAFETY: a plain read of a load-time constant.
    unsafe { core::ptr::read_volatile(&KERNEL_OFFSETS) }
}

/// Reads a `T` at `base + at`, where `at` came from BTF (0 means "not found": refuse).
#[inline(always)]
pub fn read_at<T>(base: *const u8, at: u32) -> Option<T> {
    if at == 0 || at > MAX_OFFSET {
        return None;
    }
    // SAFETY: a checked kernel read; a bad address fails the helper, not the kernel.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(at as usize).cast::<T>()) }.ok()
}

/// How many bytes of its stream a socket's TCP has taken so far (`bytes_acked` plus what is
/// in flight, `write_seq - snd_una`): where the next byte written starts.
#[inline(always)]
pub fn stream_position(tp: *const u8) -> Option<u64> {
    let o = offsets();
    let acked = read_at::<u64>(tp, o.tcp_bytes_acked)?;
    let una = read_at::<u32>(tp, o.tcp_snd_una)?;
    let seq = read_at::<u32>(tp, o.tcp_write_seq)?;
    Some(acked + seq.wrapping_sub(una) as u64)
}

/// Whether every byte the socket's TCP took is acknowledged and `forwarded` counts them all.
#[inline(always)]
pub fn all_forwarded(tp: *const u8, forwarded: u64) -> bool {
    let o = offsets();
    let (Some(acked), Some(una), Some(seq)) = (
        read_at::<u64>(tp, o.tcp_bytes_acked),
        read_at::<u32>(tp, o.tcp_snd_una),
        read_at::<u32>(tp, o.tcp_write_seq),
    ) else {
        return false;
    };
    una == seq && acked == forwarded
}

/// A socket's `write_seq`: the sequence number its next written byte gets.
#[inline(always)]
pub fn write_seq(tp: *const u8) -> Option<u32> {
    read_at::<u32>(tp, offsets().tcp_write_seq)
}

/// Free space in a socket's send buffer (`sk_sndbuf - sk_wmem_queued`), read through the
/// socket's `tcp_sock` (whose first member is the `struct sock`).
#[inline(always)]
pub fn send_room(tp: *const u8) -> Option<i64> {
    let o = offsets();
    let sndbuf: i32 = read_at(tp, o.sk_sndbuf)?;
    let queued: i32 = read_at(tp, o.sk_wmem_queued)?;
    Some(sndbuf as i64 - queued as i64)
}
