//! Zero-hop data plane: for an instance wsedge spawned on this host, the instance's own
//! socket takes part in the splice and the proxy's loopback hop carries no data.
//!
//! - `record_instance_socket` (sock_ops, on wsedge's instance cgroup) puts every socket an
//!   instance accepts into `INSTANCE_SOCKETS`, keyed by its netns and 4-tuple: the key
//!   userspace can compute from its own end of the same TCP connection. Asking the instance
//!   for its file descriptor (pidfd_getfd) would need the fd number, which only a scan of
//!   /proc could tell; the cgroup hook sees the socket the moment it exists.
//! - Client -> instance: the client socket's verdict (main.rs) puts each frame straight into
//!   the instance socket's receive queue (`BPF_F_INGRESS`).
//! - Instance -> client: `ws_instance_send` (sk_msg on the instance socket) runs inside the
//!   instance's `sendmsg`, one frame (or frame piece) at a time, and sends it out of the
//!   client socket inline.
//!
//! Neither redirect has TCP flow control of its own, so both directions watch the receiving
//! side. An instance write the client socket cannot surely take leaves through the instance
//! socket to the proxy's, and userspace relays it with TCP back-pressure; writes go straight to
//! the client again once userspace has forwarded all of those (acknowledged = forwarded), so
//! none is overtaken. A client whose instance stops reading leaves the kernel path for good
//! ("divert"): its stream parser stops at the next frame boundary without consuming a byte
//! (`FLAG_HELD`), so TCP holds the client back, and userspace relays from that point once the
//! instance has taken every byte the kernel queued for it (`ROLE_QUEUE_PROBE`).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, sk_action::SK_PASS},
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_map_lookup_elem,
        bpf_msg_apply_bytes, bpf_msg_cork_bytes, bpf_msg_pull_data, bpf_sk_release,
        bpf_skc_to_tcp_sock,
    },
    macros::{map, sk_msg, sock_ops},
    maps::{HashMap, LruHashMap, RingBuf, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};
use proxy_common::{
    FrameKind, HeaderParse, MAX_HEADER_LEN, SideState,
    frame::{OPCODE_CLOSE, close_code_end, close_code_in},
    maps::{
        ClientLink, DataPlaneEvent, EVENT_INSTANCE_FRAME_REFUSED, FLAG_CLOSE_SEEN, FLAG_DIVERTED,
        FLAG_MESSAGE_TOO_BIG, FLAG_PROTOCOL_ERROR, HOLD_WAIT_NS, InstanceLink, InstanceRecord,
        MAX_CONNECTIONS, PUSH_END_SET, ROLE_CLIENT_PROBE, ROLE_INSTANCE, ROLE_PROXY_PIPELINED,
        ROLE_QUEUE_PROBE, SendState, SocketKey, ZERO_HOP_CHECK_EVERY,
    },
    parse_header,
    policy::check_frame,
    trace::{
        TRACE_CLOSE_FRAME, TRACE_MESSAGE_TOO_BIG, TRACE_PROTOCOL_ERROR, TRACE_REDIRECT_FAILED,
    },
};

use crate::{
    SIDES, SPLICED, TARGETS,
    kernel::{all_forwarded, offsets, read_at, send_room, stream_position, write_seq},
    trace,
};

/// Instance-side sockets: those instances accepted (inserted by sock_ops) and the proxy's
/// own instance-side sockets of zero-hop connections (inserted by userspace). The sk_msg
/// program is attached here.
#[map]
pub static INSTANCE_SOCKETS: SockHash<SocketKey> =
    SockHash::with_max_entries(2 * MAX_CONNECTIONS, 0);

/// Instance sockets recorded by `record_instance_socket`: userspace cannot ask a sockhash
/// whether it holds a socket, and sk_msg programs cannot look one up. LRU: entries of
/// sockets that closed age out.
#[map]
static INSTANCE_RECORDS: LruHashMap<SocketKey, InstanceRecord> =
    LruHashMap::with_max_entries(2 * MAX_CONNECTIONS, 0);

/// Zero-hop client sockets -> the instance socket their frames go to.
#[map]
pub static CLIENT_LINKS: HashMap<u64, ClientLink> = HashMap::with_max_entries(MAX_CONNECTIONS, 0);

/// Instance-side sockets of zero-hop connections -> their role and peer.
#[map]
static INSTANCE_LINKS: HashMap<SocketKey, InstanceLink> =
    HashMap::with_max_entries(2 * MAX_CONNECTIONS, 0);

/// Diverts and refusals, for userspace to act on.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Frames redirected to an instance socket that the kernel has not yet made readable, beyond
/// which the client's frames move to userspace whatever the instance's receive buffer says.
const MAX_PENDING_FRAMES: u32 = 16;

/// Low bits of `sk_user_data` that are flags, not pointer (`SK_USER_DATA_PTRMASK`).
const SK_USER_DATA_FLAGS: u64 = 7;

/// Ports arrive in network order, and `remote_port` in the upper half on some paths.
#[inline(always)]
fn host_port(raw: u32) -> u32 {
    let raw = if raw > 0xffff { raw >> 16 } else { raw };
    u16::from_be(raw as u16) as u32
}

pub fn notify(client_cookie: u64, kind: u32) {
    let event = DataPlaneEvent {
        client_cookie,
        kind,
        _pad: 0,
    };
    // A full ring only delays userspace until the socket's own events (hang-up, timers).
    let _ = EVENTS.output::<DataPlaneEvent>(&event, 0);
}

#[sock_ops]
pub fn record_instance_socket(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        let key = SocketKey {
            // SAFETY: sock_ops context pointer.
            netns_cookie: unsafe { bpf_get_netns_cookie(ctx.ops.cast()) },
            local_ip4: ctx.local_ip4(),
            remote_ip4: ctx.remote_ip4(),
            local_port: ctx.local_port(),
            remote_port: host_port(ctx.remote_port()),
        };
        // Fails only for sockets a sockmap cannot take; they simply stay two-socket.
        // SAFETY: the context is a valid bpf_sock_ops for the duration of the program.
        if INSTANCE_SOCKETS
            .update(key, unsafe { &mut *ctx.ops }, BPF_ANY as u64)
            .is_ok()
        {
            // SAFETY: sock_ops context; the socket pointer is checked for null first.
            let record = unsafe {
                let sk = (*ctx.ops).__bindgen_anon_2.sk;
                let tp = if sk.is_null() {
                    core::ptr::null_mut()
                } else {
                    bpf_skc_to_tcp_sock(sk.cast())
                };
                InstanceRecord {
                    cookie: bpf_get_socket_cookie(ctx.ops.cast()),
                    sk: tp as u64,
                }
            };
            let _ = INSTANCE_RECORDS.insert(&key, &record, BPF_ANY as u64);
        }
    }
    1
}

/// What the kernel holds for an instance socket that the instance has not read yet.
#[derive(Default)]
struct InstanceQueue {
    /// Redirected frames the kernel has not moved into the readable queue yet.
    pending_skbs: u32,
    /// The readable queue (`ingress_msg`) is empty.
    readable_empty: bool,
    /// Memory charged for what is readable, and the socket's limit for it.
    rmem: i32,
    rcvbuf: i32,
}

/// Looks the instance socket up (sk_skb programs may; the lookup's reference is released).
/// False when it cannot be read.
fn instance_queue(instance: &SocketKey, q: &mut InstanceQueue) -> bool {
    // SAFETY: `INSTANCE_SOCKETS` is a sockhash keyed by SocketKey; released below.
    let sk = unsafe {
        bpf_map_lookup_elem(
            core::ptr::from_ref(&INSTANCE_SOCKETS).cast_mut().cast(),
            core::ptr::from_ref(instance).cast(),
        )
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is a referenced socket from the lookup.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) };
    let read = !tp.is_null() && read_queue(tp as *const u8, q);
    // SAFETY: releases the lookup's reference.
    unsafe { bpf_sk_release(sk) };
    read
}

#[inline(always)]
fn read_queue(sk: *const u8, q: &mut InstanceQueue) -> bool {
    let Some(user_data) = read_at::<u64>(sk, offsets().sk_user_data) else {
        return false;
    };
    let psock = (user_data & !SK_USER_DATA_FLAGS) as usize as *const u8;
    if psock.is_null() {
        return false;
    }
    let msg_at = offsets().psock_ingress_msg;
    let (Some(first_msg), Some(pending), Some(rmem), Some(rcvbuf)) = (
        read_at::<u64>(psock, msg_at),
        read_at::<u32>(psock, offsets().psock_ingress_qlen),
        read_at::<i32>(sk, offsets().sk_rmem_alloc),
        read_at::<i32>(sk, offsets().sk_rcvbuf),
    ) else {
        return false;
    };
    q.pending_skbs = pending;
    // An empty list_head points at itself.
    q.readable_empty = first_msg == psock as u64 + msg_at as u64;
    q.rmem = rmem;
    q.rcvbuf = rcvbuf;
    true
}

/// Client -> instance for a zero-hop connection: called by the client socket's verdict with
/// the frame already accounted. Returns the verdict.
#[inline(always)]
pub fn client_frame(
    ctx: &aya_ebpf::programs::SkBuffContext,
    cookie: u64,
    side: &mut SideState,
    link: &ClientLink,
) -> u32 {
    if side.flags & FLAG_DIVERTED == 0 {
        let mut divert = link.stop != 0;
        if !divert && side.bytes.wrapping_sub(side.backlog_checked_at) >= ZERO_HOP_CHECK_EVERY {
            side.backlog_checked_at = side.bytes;
            // Readable queue at its limit with frames waiting behind it, or the kernel
            // falling behind moving them there: the kernel would otherwise queue the
            // client's frames without bound.
            let mut q = InstanceQueue::default();
            divert = !instance_queue(&link.instance, &mut q)
                || (q.pending_skbs > 0 && q.rmem >= q.rcvbuf)
                || q.pending_skbs >= MAX_PENDING_FRAMES;
        }
        if divert {
            self::divert(side);
        }
    }
    // This frame (or piece) still goes to the instance: the parser stops before the next.
    let verdict = INSTANCE_SOCKETS.redirect_skb(ctx, link.instance, BPF_F_INGRESS as u64) as u32;
    if verdict != SK_PASS {
        trace::emit(cookie, TRACE_REDIRECT_FAILED, 0, 0);
    }
    verdict
}

/// Takes a zero-hop client off the kernel path: its parser stops at the next boundary where
/// it may, and the instance's writes stop going to its socket before that, since the stop's
/// socket error would fail them (see `instance_writes_landed`). Once per connection.
#[inline(always)]
pub fn divert(side: &mut SideState) {
    if side.flags & FLAG_DIVERTED != 0 {
        return;
    }
    side.flags |= FLAG_DIVERTED;
    if let Some(instance_side) = SIDES.get_ptr_mut(&side.peer_cookie) {
        // SAFETY: map value pointer from a successful lookup; an atomic add is also the full
        // barrier the other side's `pushes` pairs with.
        unsafe {
            let sends = &raw mut (*instance_side).sends;
            (*sends).diverted_at_ns = bpf_ktime_get_ns();
            full_barrier_add(&raw mut (*sends).diverted);
        }
    }
}

/// For the client socket's parser, after a divert: whether every instance write sent to the
/// client socket has landed in its TCP stream, so that the parser may stop (which sets the
/// socket error a write still on its way would fail on, after its bytes were accounted).
#[inline(always)]
pub fn instance_writes_landed(cookie: u64, instance_side_cookie: u64) -> bool {
    let Some(instance_side) = SIDES.get_ptr(instance_side_cookie) else {
        return true;
    };
    // SAFETY: map value pointer from a successful lookup, only read.
    let (push_end, diverted_at) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*instance_side).sends.push_end),
            (*instance_side).sends.diverted_at_ns,
        )
    };
    // SAFETY: plain helper call.
    let waited = unsafe { bpf_ktime_get_ns() }.wrapping_sub(diverted_at);
    if push_end & PUSH_END_SET == 0 || waited > HOLD_WAIT_NS {
        return true;
    }
    // SAFETY: `SPLICED` is a sockhash keyed by cookie; the reference is released below.
    let sk = unsafe {
        bpf_map_lookup_elem(
            core::ptr::from_ref(&SPLICED).cast_mut().cast(),
            core::ptr::from_ref(&cookie).cast(),
        )
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is a referenced socket from the lookup.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) };
    let seq = if tp.is_null() {
        None
    } else {
        write_seq(tp as *const u8)
    };
    // SAFETY: releases the lookup's reference.
    unsafe { bpf_sk_release(sk) };
    seq.is_some_and(|seq| seq.wrapping_sub(push_end as u32) as i32 >= 0)
}

#[sk_msg]
pub fn ws_instance_send(ctx: SkMsgContext) -> u32 {
    // Sockets without a link (the handshake, connections not spliced) send normally.
    try_instance_send(&ctx).unwrap_or(SK_PASS)
}

#[inline(always)]
fn own_key(ctx: &SkMsgContext) -> SocketKey {
    // SAFETY: reads of the sk_msg context the program was called with.
    unsafe {
        let md = &*ctx.msg;
        SocketKey {
            netns_cookie: bpf_get_netns_cookie(ctx.msg.cast()),
            local_ip4: md.local_ip4,
            remote_ip4: md.remote_ip4,
            local_port: md.local_port,
            remote_port: host_port(md.remote_port),
        }
    }
}

fn try_instance_send(ctx: &SkMsgContext) -> Result<u32, ()> {
    let key = own_key(ctx);
    // SAFETY: map value pointer from a successful lookup.
    let link = unsafe { &mut *INSTANCE_LINKS.get_ptr_mut(&key).ok_or(())? };
    if link.role == ROLE_CLIENT_PROBE {
        // SAFETY: the context's own socket.
        let tp = unsafe { bpf_skc_to_tcp_sock((*ctx.msg).__bindgen_anon_3.sk.cast()) };
        link.peer_sk = tp as u64;
        return Ok(bounce(ctx, key));
    }
    if link.role == ROLE_QUEUE_PROBE {
        let mut q = InstanceQueue::default();
        // No psock: the socket left the map, which only its closing does; nothing more
        // reaches the instance then.
        let drained = !read_queue(link.peer_sk as usize as *const u8, &mut q)
            || (q.pending_skbs == 0 && q.readable_empty);
        link.drained = drained as u32;
        return Ok(bounce(ctx, key));
    }
    if link.role != ROLE_INSTANCE {
        return Ok(proxy_side_send(ctx, link));
    }
    // SAFETY: as above; the instance socket's sends are serialized by its socket lock.
    let side = unsafe { &mut *SIDES.get_ptr_mut(&link.side_cookie).ok_or(())? };
    // SAFETY: the context's socket; the helper checks it is a TCP socket.
    let own = unsafe { bpf_skc_to_tcp_sock((*ctx.msg).__bindgen_anon_3.sk.cast()) } as *const u8;
    if side.flags & (FLAG_MESSAGE_TOO_BIG | FLAG_PROTOCOL_ERROR) != 0 {
        // After a refused frame: out through the instance socket, where userspace drops it.
        return Ok(SK_PASS);
    }
    let size = ctx.size() as u64;
    // Straight to the client only when nothing the instance sent through its own socket
    // (before the link, or while the client was not keeping up) is still on its way there:
    // all of it acknowledged by the proxy's socket and forwarded by userspace. A redirect
    // that finds the client's send buffer full fails part-way and hands the instance a short
    // write for bytes this program already accounted: only what surely fits goes.
    let mut to_client = link.stop == 0
        && !own.is_null()
        && all_forwarded(own, link.forwarded)
        && send_room(link.peer_sk as usize as *const u8)
            .is_some_and(|room| room >= (size + size / 16 + 4096) as i64);
    // Otherwise the bytes leave through the instance socket itself, whose own send buffer
    // must take them whole for the same reason; the instance blocks on it as on any socket.
    // A piece meant for the client fits there too, in case a divert turns it back below.
    let room = if own.is_null() {
        0
    } else {
        send_room(own).unwrap_or(0)
    };
    // (With everything forwarded, as a write to the client requires, the instance socket's
    // send buffer is empty, so this does not shrink those.)
    let usable = (room - 4096) * 15 / 16;
    let limit = if usable < 1 {
        1
    } else {
        (usable as u64).min(size)
    };
    let n = match next_piece(ctx, link.side_cookie, side, size, limit) {
        Piece::Bytes(n) => n,
        Piece::NeedBytes(needed) => {
            // SAFETY: sk_msg context. The kernel keeps the bytes until `needed` are there.
            unsafe { bpf_msg_cork_bytes(ctx.msg, needed) };
            return Ok(SK_PASS);
        }
        Piece::Refused => {
            // Not a refusal of the write (an sk_msg SK_DROP would fail it, and every later
            // write of the socket): the bytes leave through the instance socket's own
            // stream, and userspace forwards nothing from where they start.
            if let Some(at) = stream_position(own) {
                side.sends.refused_at = at;
            }
            notify(link.client_cookie, EVENT_INSTANCE_FRAME_REFUSED);
            return Ok(SK_PASS);
        }
    };
    if n < size {
        // The verdict covers this piece; the kernel runs the program again for the rest.
        // SAFETY: sk_msg context.
        unsafe { bpf_msg_apply_bytes(ctx.msg, n as u32) };
    }
    if to_client {
        to_client = announce_push(&mut side.sends, link.peer_sk, n);
    }
    if to_client {
        let verdict = TARGETS.redirect_msg(ctx, link.client_cookie, 0) as u32;
        if verdict != SK_PASS {
            trace::emit(link.side_cookie, TRACE_REDIRECT_FAILED, 0, 0);
        }
        Ok(verdict)
    } else {
        Ok(SK_PASS)
    }
}

/// Adds 1 atomically (BPF `XADD`, a locked add on x86 and a fully ordered one on arm64: a
/// full memory barrier). The old value is not used: older BPF CPUs cannot return it.
///
/// # Safety
/// `at` points into a map value.
#[inline(always)]
unsafe fn full_barrier_add(at: *mut u64) {
    // SAFETY: as the caller promises.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(at, 1) };
}

/// Publishes where the client socket's stream will end once this write of `n` bytes lands
/// (`push_end`), then looks for a divert: one that came in between sees the write (and its
/// parser waits for it), or this write sees the divert and goes the instance socket's way.
#[inline(always)]
fn announce_push(sends: &mut SendState, client_sk: u64, n: u64) -> bool {
    let Some(seq) = write_seq(client_sk as usize as *const u8) else {
        return false;
    };
    let before = sends.push_end;
    // SAFETY: fields of a map value this program holds a pointer to.
    unsafe {
        core::ptr::write_volatile(
            &raw mut sends.push_end,
            PUSH_END_SET | seq.wrapping_add(n as u32) as u64,
        );
        full_barrier_add(&raw mut sends.pushes);
        if core::ptr::read_volatile(&raw const sends.diverted) != 0 {
            core::ptr::write_volatile(&raw mut sends.push_end, before);
            return false;
        }
    }
    true
}

enum Piece {
    /// Send this many bytes now (at most one frame, or the rest of one).
    Bytes(u64),
    /// A frame header (and a close code) is split across writes: wait for this many bytes.
    NeedBytes(u32),
    /// The frame breaks the function's limits or the protocol.
    Refused,
}

/// Accounts the frame at the head of the instance's write, or the next piece of the frame
/// being written, and says how many bytes this verdict covers (at most `limit`, except that
/// a frame header is never split).
#[inline(always)]
fn next_piece(
    ctx: &SkMsgContext,
    cookie: u64,
    side: &mut SideState,
    size: u64,
    limit: u64,
) -> Piece {
    if side.frame_remaining > 0 {
        let n = side.frame_remaining.min(limit);
        side.frame_remaining -= n;
        return Piece::Bytes(n);
    }
    let Some((window, avail)) = load_front(ctx, size) else {
        return Piece::Refused;
    };
    let h = match parse_header(&window, avail) {
        HeaderParse::Incomplete { header_len } => return Piece::NeedBytes(header_len as u32),
        HeaderParse::Invalid(_) => {
            side.flags |= FLAG_PROTOCOL_ERROR;
            trace::emit(cookie, TRACE_PROTOCOL_ERROR, 0, 0);
            return Piece::Refused;
        }
        HeaderParse::Complete(h) => h,
    };
    if let Err(violation) = check_frame(&h, &side.tracker, side.max_message_bytes) {
        side.flags |= violation.flag();
        trace::emit(cookie, TRACE_MESSAGE_TOO_BIG, 0, h.payload_len);
        return Piece::Refused;
    }
    let header = h.header_len as u64;
    // A close code sits right after a control frame's header, inside the 14-byte window.
    let head = if h.opcode == OPCODE_CLOSE {
        close_code_end(&h) as u64
    } else {
        header
    };
    if avail < head as usize {
        return Piece::NeedBytes(head as u32);
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if side.account(&h, now) == FrameKind::Close && side.flags & FLAG_CLOSE_SEEN == 0 {
        let code = close_code_in(&window, &h);
        side.record_close(code);
        trace::emit(cookie, TRACE_CLOSE_FRAME, code as u32, 0);
    }
    let wire = h.wire_len();
    let n = wire.min(if limit > head { limit } else { head }).min(size);
    side.frame_remaining = wire - n;
    Piece::Bytes(n)
}

/// The first (up to) 14 bytes of the write, and how many bytes the write holds.
#[inline(always)]
fn load_front(ctx: &SkMsgContext, size: u64) -> Option<([u8; MAX_HEADER_LEN], usize)> {
    let want = if size < MAX_HEADER_LEN as u64 {
        size as u32
    } else {
        MAX_HEADER_LEN as u32
    };
    // Usually the first `want` bytes are directly readable already. Only when they span two
    // pieces of the message does the kernel have to copy them into one, which needs an atomic
    // page allocation that can fail under memory pressure: ask for it only then.
    if ctx.data() + (want as usize) > ctx.data_end() {
        // SAFETY: sk_msg context; makes the first `want` bytes directly readable.
        if unsafe { bpf_msg_pull_data(ctx.msg, 0, want, 0) } != 0 {
            return None;
        }
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    let mut window = [0u8; MAX_HEADER_LEN];
    let mut i = 0;
    while i < MAX_HEADER_LEN {
        if data + i + 1 > end {
            break;
        }
        // SAFETY: bounds checked against data_end just above (the verifier checks it too).
        window[i] = unsafe { *((data + i) as *const u8) };
        i += 1;
    }
    Some((window, size as usize))
}

/// Writes by the proxy's own instance-side socket of a zero-hop connection.
#[inline(always)]
fn proxy_side_send(ctx: &SkMsgContext, link: &InstanceLink) -> u32 {
    if link.role == ROLE_PROXY_PIPELINED {
        // Bytes userspace read past the handshake: into the instance socket's readable queue,
        // where the kernel's first frame will follow them.
        return INSTANCE_SOCKETS.redirect_msg(ctx, link.instance, BPF_F_INGRESS as u64) as u32;
    }
    SK_PASS
}

/// Sends a probing write back into its own socket's receive queue, where userspace reads it.
#[inline(always)]
fn bounce(ctx: &SkMsgContext, own: SocketKey) -> u32 {
    INSTANCE_SOCKETS.redirect_msg(ctx, own, BPF_F_INGRESS as u64) as u32
}
