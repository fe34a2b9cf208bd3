//! Where the kernel programs find what `__sk_buff` and the socket contexts do not expose.
//!
//! Userspace reads these offsets from the running kernel's BTF and writes the whole struct
//! into the programs' read-only global [`KERNEL_OFFSETS_SYMBOL`] at load time, so no kernel
//! layout is compiled in and every offset has exactly one name on both sides.

/// The symbol of the programs' global that holds a [`KernelOffsets`].
pub const KERNEL_OFFSETS_SYMBOL: &str = "KERNEL_OFFSETS";

/// Byte offsets into kernel structs, from the running kernel's BTF. Zero means "not set":
/// programs treat it as unknown and refuse to read through it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelOffsets {
    /// From a `struct sk_buff *` to its `strp_msg.offset` (an int): where the parser's
    /// message starts in the head skb.
    pub strp_offset: u32,
    /// From a `struct sk_buff *` to its `strp_msg.full_len` (an int): the message's length.
    pub strp_full_len: u32,
    /// From a `struct tcp_sock *` to `bytes_acked` (u64): with `snd_una` and `write_seq`
    /// (u32), every byte the socket's TCP has taken from its writers.
    pub tcp_bytes_acked: u32,
    /// From a `struct tcp_sock *` to `snd_una` (u32).
    pub tcp_snd_una: u32,
    /// From a `struct tcp_sock *` to `write_seq` (u32).
    pub tcp_write_seq: u32,
    /// From a `struct sock *` to `sk_sndbuf` (int): the send buffer's size.
    pub sk_sndbuf: u32,
    /// From a `struct sock *` to `sk_wmem_queued` (int): the send buffer's use.
    pub sk_wmem_queued: u32,
    /// From a `struct sock *` to `sk_rcvbuf` (int): the receive buffer's size.
    pub sk_rcvbuf: u32,
    /// From a `struct sock *` to `sk_backlog.rmem_alloc` (atomic int): the receive buffer's use.
    pub sk_rmem_alloc: u32,
    /// From a `struct sock *` to `sk_user_data`: the sockmap's psock, tagged in its low bits.
    pub sk_user_data: u32,
    /// From a `struct sk_psock *` to `ingress_skb.qlen`: redirected skbs not yet readable.
    pub psock_ingress_qlen: u32,
    /// From a `struct sk_psock *` to `ingress_msg`: the readable queue's list head.
    pub psock_ingress_msg: u32,
}

impl KernelOffsets {
    /// Every offset unknown: what the programs hold until userspace sets them.
    pub const UNSET: KernelOffsets = KernelOffsets {
        strp_offset: 0,
        strp_full_len: 0,
        tcp_bytes_acked: 0,
        tcp_snd_una: 0,
        tcp_write_seq: 0,
        sk_sndbuf: 0,
        sk_wmem_queued: 0,
        sk_rcvbuf: 0,
        sk_rmem_alloc: 0,
        sk_user_data: 0,
        psock_ingress_qlen: 0,
        psock_ingress_msg: 0,
    };
}

#[cfg(feature = "user")]
// SAFETY: repr(C), only u32 fields, no padding.
unsafe impl aya::Pod for KernelOffsets {}
