//! Kernel data plane: a stream parser that finds WebSocket frame boundaries and a stream
//! verdict that accounts each frame at its header and redirects it, whole or in pieces, to the
//! peer socket.
//!
//! Why a strparser and not a verdict-only program with frame state carried across skbs
//! (a throwaway prototype measured the latter ~25 % cheaper on raw TCP): a verdict-only program
//! sees TCP-sized chunks, and one 64 KiB skb can hold thousands of 2-byte frames. The verifier
//! only accepts a small bounded loop per skb, so a verdict-only parser would lose frame sync
//! on such input, and with it every count and quota. The strparser hands the verdict one frame,
//! or one piece of one frame (see `frame_message_len`), at a time, however the bytes were
//! segmented, which is what exact accounting and frame-precise quota decisions need. The cost is paid per frame and measured by
//! `cargo xtask bench`; the zero-hop data plane is where the large saving lies.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no atomic read-modify-write types, only the instruction.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod kernel;
mod trace;
mod zero_hop;

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::{
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_map_lookup_elem, bpf_sk_release,
        bpf_skb_load_bytes, bpf_skc_to_tcp_sock,
    },
    macros::{map, stream_parser, stream_verdict},
    maps::{HashMap, SockHash},
    programs::SkBuffContext,
};
use proxy_common::{
    FrameKind, HeaderParse, MAX_HEADER_LEN, MessageTracker, SideState,
    frame::{close_code_end, close_code_in, header_len},
    maps::{
        BACKLOG_CHECK_EVERY, EVENT_CLIENT_HELD, FLAG_CLOSE_SEEN, FLAG_DIVERTED, FLAG_HELD,
        FLAG_PARSER_PENDING, FLAG_PEER_BACKLOG, FLAG_PROTOCOL_ERROR, FLAG_RATE_EXCEEDED,
        FLAG_THROTTLE_NEXT, FLAG_ZERO_HOP, MAX_BACKLOG_BYTES, MAX_CONNECTIONS,
    },
    parse_header,
    policy::{FrameViolation, check_frame},
    trace::{
        HANDED_INSTANCE_BEHIND, HANDED_RATE, TRACE_CLOSE_FRAME, TRACE_HANDED_TO_USERSPACE,
        TRACE_MESSAGE_TOO_BIG, TRACE_PROTOCOL_ERROR, TRACE_RATE_CLOSE, TRACE_REDIRECT_FAILED,
        TRACE_THROTTLE_ON,
    },
};

/// Sockets whose incoming frames these programs parse and redirect (programs attached).
#[map]
pub static SPLICED: SockHash<u64> = SockHash::with_max_entries(2 * MAX_CONNECTIONS, 0);

/// Redirect targets, keyed by socket cookie, with no programs attached. A socket enters
/// this map before either side enters `SPLICED`, so no frame can be redirected to a peer
/// that is not there yet (such a redirect drops the frame).
#[map]
pub static TARGETS: SockHash<u64> = SockHash::with_max_entries(2 * MAX_CONNECTIONS, 0);

/// Per-direction state, keyed by the cookie of the socket the frames arrive on.
#[map]
pub static SIDES: HashMap<u64, SideState> = HashMap::with_max_entries(2 * MAX_CONNECTIONS, 0);

const EMSGSIZE: i64 = 90;
const EBADMSG: i64 = 74;
const ENOBUFS: i64 = 105;
/// The zero-hop hold (`FLAG_HELD`): the least alarming errno for anyone who meets it.
const EAGAIN: i64 = 11;

/// Where the current message starts within the skb (`strp_msg(skb)->offset`).
#[inline(always)]
fn message_offset(ctx: &SkBuffContext) -> Result<u32, ()> {
    control_block_u32(ctx, kernel::offsets().strp_offset)
}

/// Length of the current message (`strp_msg(skb)->full_len`): one frame or a piece of one.
#[inline(always)]
fn message_len(ctx: &SkBuffContext) -> Result<u32, ()> {
    control_block_u32(ctx, kernel::offsets().strp_full_len)
}

/// Reads a u32 of the skb's control block at a location found in the kernel's BTF.
#[inline(always)]
fn control_block_u32(ctx: &SkBuffContext, at: u32) -> Result<u32, ()> {
    kernel::read_at::<u32>(ctx.skb.skb as *const u8, at).ok_or(())
}

/// Loads `N` bytes at `offset` into the front of `window`; `N` is a constant, which is what
/// the verifier needs for the helper's size argument.
#[inline(always)]
fn load_front<const N: usize>(
    ctx: &SkBuffContext,
    offset: u32,
    window: &mut [u8; MAX_HEADER_LEN],
) -> Result<(), ()> {
    // SAFETY: `window` holds 14 >= N bytes.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            offset,
            window.as_mut_ptr().cast(),
            N as u32,
        )
    };
    if rc == 0 { Ok(()) } else { Err(()) }
}

/// Loads the header bytes at the start of the current message into a fixed window.
/// Returns the window, how many message bytes the skb holds, and the message offset.
#[inline(always)]
fn load_window(ctx: &SkBuffContext) -> Result<([u8; MAX_HEADER_LEN], usize, u32), ()> {
    let mut window = [0u8; MAX_HEADER_LEN];
    let offset = message_offset(ctx)?;
    let len = ctx.len();
    let avail = if offset < len { len - offset } else { 0 };
    if avail >= MAX_HEADER_LEN as u32 {
        load_front::<MAX_HEADER_LEN>(ctx, offset, &mut window)?;
    } else if avail >= 2 {
        load_front::<2>(ctx, offset, &mut window)?;
        let needed = header_len(window[1]) as u32;
        if avail >= needed {
            match needed {
                4 => load_front::<4>(ctx, offset, &mut window)?,
                6 => load_front::<6>(ctx, offset, &mut window)?,
                8 => load_front::<8>(ctx, offset, &mut window)?,
                10 => load_front::<10>(ctx, offset, &mut window)?,
                _ => {}
            }
        }
    }
    Ok((window, avail as usize, offset))
}

#[stream_parser]
pub fn ws_frame_len(ctx: SkBuffContext) -> u32 {
    match try_ws_frame_len(&ctx) {
        Ok(len) => len,
        Err(errno) => (-errno) as u32,
    }
}

/// Returns the wire length of the frame at the head of the stream, 0 when more bytes are
/// needed, or a negative errno that makes the kernel report an error on the socket: the
/// frame is refused, the peer has not taken `MAX_BACKLOG_BYTES` of what was redirected to it
/// (checked here, before the frame is consumed, because the verdict cannot hold one), or a
/// zero-hop client is held for userspace (`EAGAIN`, `FLAG_HELD`).
fn try_ws_frame_len(ctx: &SkBuffContext) -> Result<u32, i64> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // SAFETY: map value pointer from a successful lookup; the parser and the verdict of one
    // socket do not run concurrently.
    let mut side = SIDES.get_ptr_mut(cookie).map(|side| unsafe { &mut *side });
    if let Some(side) = side.as_deref_mut()
        && side.flags & (FLAG_DIVERTED | FLAG_THROTTLE_NEXT) != 0
        && side.flags & FLAG_PARSER_PENDING == 0
        && may_hold(cookie, side)
    {
        // A client leaving the kernel path: stop here, at a frame boundary or between two
        // pieces of a data frame, before the kernel consumes a byte of this message. An error is the only way a stream parser stops
        // without taking the bytes; the kernel then reads nothing more from the socket and
        // calls this again only for the rest of an skb it was in (same answer).
        let reason = if side.flags & FLAG_THROTTLE_NEXT != 0 {
            HANDED_RATE
        } else {
            HANDED_INSTANCE_BEHIND
        };
        return Err(hold(cookie, side, reason));
    }
    let len = frame_len(ctx, cookie, side.as_deref_mut())?;
    if let Some(side) = side {
        // The kernel keeps what it has of a message it was told to wait for. (Written only
        // when it changes: this runs for every frame.)
        let pending = side.flags & FLAG_PARSER_PENDING != 0;
        if len == 0 && !pending {
            side.flags |= FLAG_PARSER_PENDING;
        } else if len != 0 && pending {
            side.flags &= !FLAG_PARSER_PENDING;
        }
    }
    Ok(len)
}

/// Whether the client's parser may stop now: a zero-hop client only once the instance's
/// writes to its socket have landed (see `zero_hop::instance_writes_landed`).
#[inline(always)]
fn may_hold(cookie: u64, side: &SideState) -> bool {
    side.flags & FLAG_HELD != 0
        || side.flags & FLAG_ZERO_HOP == 0
        || zero_hop::instance_writes_landed(cookie, side.peer_cookie)
}

/// Stops the client's parser for good (`FLAG_HELD`); userspace relays from here. Userspace
/// learns it from an event: the socket error the stop raises is not enough, since a write
/// to the socket (a frame the kernel sends the client) can clear it before anyone polls.
#[inline(always)]
fn hold(cookie: u64, side: &mut SideState, reason: u32) -> i64 {
    if side.flags & FLAG_HELD == 0 {
        side.flags |= FLAG_HELD;
        zero_hop::notify(cookie, EVENT_CLIENT_HELD);
        trace::emit(cookie, TRACE_HANDED_TO_USERSPACE, reason, 0);
    }
    EAGAIN
}

/// A client data frame over its rate (`policy` decided in `RateState::admit`). With
/// `on_exceed = "close"` the frame goes nowhere and the parser stops for good; userspace
/// closes the connection (1008). With "throttle"
/// the parser stops before it, so TCP holds the client back and userspace releases its frames
/// at the rate; where the parser cannot stop at once (the kernel holds part of this header,
/// or a zero-hop instance write is still on its way to the client) the frame passes, charged
/// to the meters, and the parser stops at the next boundary.
#[inline(always)]
fn over_rate(
    cookie: u64,
    side: &mut SideState,
    h: &proxy_common::FrameHeader,
    now: u64,
    len: u32,
) -> Result<u32, i64> {
    if side.flags & FLAG_ZERO_HOP != 0 {
        zero_hop::divert(side);
    }
    if side.rate.closes() {
        // Refused with the hold's EAGAIN, not a hard error: the stop's error lands on the
        // client socket, where a frame the function is sending at that moment meets it. A
        // hard error would make the kernel give up on every later redirect to the client,
        // the proxy's close frame could then never follow them; EAGAIN is retried.
        side.flags |= FLAG_RATE_EXCEEDED;
        trace::emit(cookie, TRACE_RATE_CLOSE, 0, h.payload_len);
        return Err(hold(cookie, side, HANDED_RATE));
    }
    if side.flags & (FLAG_HELD | FLAG_THROTTLE_NEXT) == 0 {
        trace::emit(cookie, TRACE_THROTTLE_ON, 0, h.payload_len);
    }
    if side.flags & FLAG_PARSER_PENDING == 0 && may_hold(cookie, side) {
        return Err(hold(cookie, side, HANDED_RATE));
    }
    side.flags |= FLAG_THROTTLE_NEXT;
    side.rate.charge(h, now);
    Ok(len)
}

#[inline(always)]
fn frame_len(
    ctx: &SkBuffContext,
    cookie: u64,
    mut side: Option<&mut SideState>,
) -> Result<u32, i64> {
    if let Some(side) = side.as_deref()
        && side.frame_remaining > 0
    {
        // Inside a frame whose header was seen: hand over what is there now (see
        // `frame_message_len`).
        let offset = message_offset(ctx).map_err(|()| EBADMSG)?;
        let avail = ctx.len().saturating_sub(offset) as u64;
        return Ok(side.frame_remaining.min(avail).max(1) as u32);
    }
    if let Some(side) = side.as_deref_mut()
        && side.flags & FLAG_ZERO_HOP == 0
    {
        // Two-socket only (zero-hop watches its instance in `zero_hop::client_frame`, with the
        // same `backlog_checked_at`). The lookup costs a few helper calls: only every
        // BACKLOG_CHECK_EVERY bytes, which a reader that keeps up never lets pile up anyway.
        if side.bytes.wrapping_sub(side.backlog_checked_at) >= BACKLOG_CHECK_EVERY {
            side.backlog_checked_at = side.bytes;
            if peer_backlog(side) > MAX_BACKLOG_BYTES {
                side.flags |= FLAG_PEER_BACKLOG;
                return Err(ENOBUFS);
            }
        }
    }
    let (window, avail, _) = load_window(ctx).map_err(|()| EBADMSG)?;
    match parse_header(&window, avail) {
        HeaderParse::Incomplete { .. } => Ok(0),
        HeaderParse::Complete(h) => {
            let (tracker, limit) = match side.as_deref() {
                Some(side) => (side.tracker, side.max_message_bytes),
                None => (MessageTracker::default(), 0),
            };
            match check_frame(&h, &tracker, limit) {
                Ok(()) => {
                    let len = frame_message_len(&h, avail as u64);
                    match side {
                        // A control frame not yet whole (len 0) is decided once it is.
                        Some(side) if side.rate.limited() && len != 0 => {
                            // SAFETY: plain helper call.
                            let now = unsafe { bpf_ktime_get_ns() };
                            match side.rate.admit(&h, now) {
                                Ok(()) => Ok(len),
                                Err(_) => over_rate(cookie, side, &h, now, len),
                            }
                        }
                        _ => Ok(len),
                    }
                }
                Err(violation) => {
                    if let Some(side) = side {
                        side.flags |= violation.flag();
                    }
                    if matches!(
                        violation,
                        FrameViolation::MessageTooBig | FrameViolation::TooLarge
                    ) {
                        trace::emit(cookie, TRACE_MESSAGE_TOO_BIG, 0, h.payload_len);
                    }
                    Err(EMSGSIZE)
                }
            }
        }
        HeaderParse::Invalid(_) => {
            mark_side(ctx, FLAG_PROTOCOL_ERROR);
            trace::emit(cookie, TRACE_PROTOCOL_ERROR, 0, 0);
            Err(EBADMSG)
        }
    }
}

/// How much of a frame whose header is complete the parser hands over now: a control frame
/// (at most 131 bytes, its close code included) whole, 0 meaning "wait"; a data frame as much
/// as has arrived, the rest following as further pieces. Waiting for a whole data frame would
/// leave its bytes in the socket's receive queue (the stream parser only gathers a message
/// it knows the length of once it is complete), and while that queue is not empty the kernel
/// refuses userspace reads of the socket: with the receive window closed by a reader that is
/// behind, the rest of the frame could never come. Pieces also keep the kernel from holding
/// whole large frames.
#[inline(always)]
fn frame_message_len(h: &proxy_common::FrameHeader, avail: u64) -> u32 {
    let wire = h.wire_len();
    if h.is_control() {
        if avail < wire { 0 } else { wire as u32 }
    } else {
        wire.min(avail) as u32
    }
}

/// Bytes sent toward this side's peer that the peer's TCP has not taken yet: everything
/// written to it (by userspace before the splice, then redirected) minus what its TCP holds or
/// had acknowledged (`bytes_acked + write_seq - snd_una`). 0 when the peer cannot be read.
#[inline(always)]
fn peer_backlog(side: &SideState) -> u64 {
    let key = side.peer_cookie;
    // SAFETY: `TARGETS` is a sockhash keyed by u64; a found socket is released below.
    let sk = unsafe {
        bpf_map_lookup_elem(
            core::ptr::from_ref(&TARGETS).cast_mut().cast(),
            core::ptr::from_ref(&key).cast(),
        )
    };
    if sk.is_null() {
        return 0;
    }
    // SAFETY: `sk` is a referenced socket from the lookup.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) };
    let taken = if tp.is_null() {
        None
    } else {
        kernel::stream_position(tp.cast())
    };
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(sk) };
    match taken {
        Some(taken) => (side.peer_written_by_hand + side.bytes).saturating_sub(taken),
        None => 0,
    }
}

fn mark_side(ctx: &SkBuffContext, flag: u32) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    if let Some(side) = SIDES.get_ptr_mut(cookie) {
        unsafe { (*side).flags |= flag };
    }
}

#[stream_verdict]
pub fn ws_forward(ctx: SkBuffContext) -> u32 {
    try_ws_forward(&ctx).unwrap_or(SK_DROP)
}

/// Accounts a frame at its header and sends it, or the next piece of it, to the peer.
fn try_ws_forward(ctx: &SkBuffContext) -> Result<u32, ()> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // Every spliced socket gets its state before it enters SPLICED and keeps it until it has
    // left, so a frame without state cannot occur; if one did, it would be dropped.
    let side = SIDES.get_ptr_mut(cookie).ok_or(())?;
    let side = unsafe { &mut *side };
    let piece = message_len(ctx)?;
    if side.frame_remaining > 0 {
        // The rest (or more) of a frame already accounted at its header.
        side.frame_remaining = side.frame_remaining.saturating_sub(piece as u64);
        return Ok(forward(ctx, cookie, side));
    }
    let (window, avail, offset) = load_window(ctx)?;
    let HeaderParse::Complete(h) = parse_header(&window, avail) else {
        side.flags |= FLAG_PROTOCOL_ERROR;
        return Ok(SK_PASS);
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if side.account(&h, now) == FrameKind::Close && side.flags & FLAG_CLOSE_SEEN == 0 {
        // A control frame arrives whole: its header and code are in the skb. The window
        // holds only the header so far; load the code's bytes with it.
        let mut window = window;
        match close_code_end(&h) {
            4 => load_front::<4>(ctx, offset, &mut window)?,
            8 => load_front::<8>(ctx, offset, &mut window)?,
            _ => {}
        }
        let code = close_code_in(&window, &h);
        side.record_close(code);
        trace::emit(cookie, TRACE_CLOSE_FRAME, code as u32, 0);
    }
    side.frame_remaining = h.wire_len().saturating_sub(piece as u64);
    Ok(forward(ctx, cookie, side))
}

/// Sends a frame or a piece of one on to the peer.
#[inline(always)]
fn forward(ctx: &SkBuffContext, cookie: u64, side: &mut SideState) -> u32 {
    // The flag spares two-socket connections a map lookup per frame.
    if side.flags & FLAG_ZERO_HOP != 0
        && let Some(link) = zero_hop::CLIENT_LINKS.get_ptr(cookie)
    {
        // SAFETY: map value pointer from a successful lookup, only read.
        return zero_hop::client_frame(ctx, cookie, side, unsafe { &*link });
    }
    let verdict = TARGETS.redirect_skb(ctx, side.peer_cookie, 0) as u32;
    if verdict != SK_PASS {
        trace::emit(cookie, TRACE_REDIRECT_FAILED, 0, 0);
    }
    verdict
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
