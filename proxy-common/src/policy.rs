//! Decisions both data planes take the same way: which frames are accepted at all, what the
//! client is told when the function's side ends, and the function status of an ended
//! connection (README, "How a connection ends"). Per-function quotas build on this module.

use crate::{
    FrameHeader, MessageTracker, SideState,
    frame::OPCODE_CONTINUATION,
    maps::{
        FLAG_CLOSE_SEEN, FLAG_MESSAGE_TOO_BIG, FLAG_PROTOCOL_ERROR, FLAG_RATE_EXCEEDED,
        MAX_FRAME_WIRE_LEN,
    },
};

/// Close code the proxy sends the client when the instance's side ended (TCP FIN or reset)
/// without a close frame of its own: the instance crashed, was killed or dropped the socket.
pub const CLOSE_INSTANCE_FAILED: u16 = 1011;

/// `Some(code)` when the proxy must close the client itself because the instance's side ended
/// before the instance sent a close frame (`function_side` counts instance -> client). Not
/// when the client had already ended its side: an instance closing after the client left
/// without a close frame did nothing wrong.
#[inline(always)]
pub fn close_for_instance_end(function_side: &SideState, client_ended: bool) -> Option<u16> {
    if function_side.flags & FLAG_CLOSE_SEEN == 0 && !client_ended {
        Some(CLOSE_INSTANCE_FAILED)
    } else {
        None
    }
}

/// Both sides sent a close frame: the WebSocket is over and only TCP remains, so once the
/// instance has closed (as a server does) the client gets a short grace to close its side,
/// and the connection ends then even if it keeps TCP open.
#[inline(always)]
pub fn closing_handshake_done(client_side: &SideState, function_side: &SideState) -> bool {
    client_side.flags & FLAG_CLOSE_SEEN != 0 && function_side.flags & FLAG_CLOSE_SEEN != 0
}

/// What ended a connection, apart from the close frames each side sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The sockets closed: by close handshake, or by one side dropping TCP.
    Closed,
    /// The instance's side ended without the instance sending a close frame.
    InstanceFailed,
    /// No frame either way for `idle_timeout_s`.
    IdleTimeout,
    /// Open longer than `execution_timeout_s`.
    ExecutionTimeout,
    /// The proxy closed it with 1009: a message over `max_message_bytes`.
    MessageTooBig,
    /// The proxy closed it with 1008: the client went over `messages_per_s` or `bytes_per_s`
    /// with `on_exceed = "close"`.
    RateExceeded,
    /// The proxy closed it because it is shutting down (SIGTERM).
    Shutdown,
    /// The client sent a frame RFC 6455 forbids (a reserved opcode, a fragmented or oversized
    /// control frame, a 64-bit length with its top bit set): the proxy fails the connection
    /// with 1002, as the function would have, and the frame goes nowhere.
    ClientProtocolError,
    /// The same from the function's side.
    FunctionProtocolError,
}

impl Ending {
    /// The protocol-error ending for a frame that came from the client or the function.
    pub fn protocol_error(from_client: bool) -> Ending {
        if from_client {
            Ending::ClientProtocolError
        } else {
            Ending::FunctionProtocolError
        }
    }
}

/// The close frame's reason text for [`proxy_close_code`].
pub fn proxy_close_reason(ending: Ending) -> &'static str {
    match ending {
        Ending::IdleTimeout => "idle timeout",
        Ending::Shutdown => "proxy shutting down",
        Ending::MessageTooBig => "message too big",
        Ending::RateExceeded => "rate limit exceeded",
        Ending::ClientProtocolError | Ending::FunctionProtocolError => "protocol error",
        _ => "closed by the proxy",
    }
}

/// The close code the proxy sends the client when it ends a connection itself, or `None`
/// when it closes TCP without one (the client then sees 1006).
pub fn proxy_close_code(ending: Ending) -> Option<u16> {
    match ending {
        // 1008 "policy violation" to the client that broke the rate.
        Ending::RateExceeded => Some(1008),
        // 1001 "going away": the endpoint is leaving (idle for too long, or shutting down).
        Ending::IdleTimeout | Ending::Shutdown => Some(1001),
        Ending::ExecutionTimeout => None,
        Ending::MessageTooBig => Some(1009),
        // 1002 "protocol error", what the receiving endpoint sends when it fails the
        // connection (RFC 6455 7.4.1).
        Ending::ClientProtocolError | Ending::FunctionProtocolError => Some(1002),
        Ending::Closed | Ending::InstanceFailed => None,
    }
}

/// The close code the function gets for the same ending: the client's, except for a rate
/// close, where the function did nothing wrong and is told its client is going away (1001).
pub fn proxy_close_code_to_function(ending: Ending) -> Option<u16> {
    match ending {
        Ending::RateExceeded => Some(1001),
        _ => proxy_close_code(ending),
    }
}

/// The function status of an ended connection (README, "How a connection ends"), from how it ended
/// and the first close frame of each direction (`client_side` counts client -> instance).
pub fn function_status(ending: Ending, client_side: &SideState, function_side: &SideState) -> u16 {
    match ending {
        Ending::MessageTooBig | Ending::RateExceeded => return 429,
        Ending::ExecutionTimeout => return 433,
        Ending::IdleTimeout => return 455,
        Ending::InstanceFailed => return 439,
        // The side that broke the protocol ended it, with a code other than a plain close.
        Ending::ClientProtocolError => return 456,
        Ending::FunctionProtocolError => return 439,
        // Neither side failed: the platform ended it (the status table has no row for it).
        Ending::Shutdown => return 200,
        Ending::Closed => {}
    }
    let client_closed = client_side.flags & FLAG_CLOSE_SEEN != 0;
    let function_closed = function_side.flags & FLAG_CLOSE_SEEN != 0;
    let client_first = match (client_closed, function_closed) {
        (true, true) => client_side.close_at_ns <= function_side.close_at_ns,
        (true, false) => true,
        (false, true) => false,
        // Neither sent a close frame: the client dropped TCP (a function dropping it is
        // `InstanceFailed`).
        (false, false) => return 456,
    };
    // A close frame without a code (1005 on receipt) is a plain close, as 1000 is: browsers
    // send one for `ws.close()` without arguments.
    if client_first {
        match client_side.close_code {
            1000 | 1005 | 1010 => 200,
            _ => 456,
        }
    } else {
        match function_side.close_code {
            1000 | 1005 | 1011 => 200,
            _ => 439,
        }
    }
}

/// Why a frame ends the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameViolation {
    /// Larger (header included) than the kernel can assemble; see [`MAX_FRAME_WIRE_LEN`].
    TooLarge,
    /// Its message (all fragments so far and this one) is over `max_message_bytes`: the
    /// connection is closed with 1009.
    MessageTooBig,
    /// A client frame over the rate with `on_exceed = "close"`: closed with 1008.
    RateExceeded,
}

impl FrameViolation {
    /// The side-state flag the kernel sets for a refused frame, which userspace reads back
    /// with [`refusal_ending`]. A frame too large to assemble is refused as too big, as a
    /// message over the limit is.
    #[inline(always)]
    pub fn flag(self) -> u32 {
        match self {
            FrameViolation::MessageTooBig | FrameViolation::TooLarge => FLAG_MESSAGE_TOO_BIG,
            FrameViolation::RateExceeded => FLAG_RATE_EXCEEDED,
        }
    }
}

/// How the proxy ends a connection over a frame its sender's side state says was refused
/// (`flags` of the side that sent it; `from_client`: which side that is), or `None` when
/// nothing was refused: 1009 for a message over the limit, 1008 for a client over its rate,
/// 1002 for a frame RFC 6455 forbids.
#[inline(always)]
pub fn refusal_ending(flags: u32, from_client: bool) -> Option<Ending> {
    if flags & FLAG_MESSAGE_TOO_BIG != 0 {
        Some(Ending::MessageTooBig)
    } else if flags & FLAG_RATE_EXCEEDED != 0 {
        Some(Ending::RateExceeded)
    } else if flags & FLAG_PROTOCOL_ERROR != 0 {
        Some(Ending::protocol_error(from_client))
    } else {
        None
    }
}

/// Accepts or refuses one frame header, given the message it continues (`tracker`, before
/// this frame) and the function's `max_message_bytes` (0: no message limit). The kernel
/// parser fails the socket on a refusal and userspace closes the connection; the relay
/// closes it directly.
#[inline(always)]
pub fn check_frame(
    h: &FrameHeader,
    tracker: &MessageTracker,
    max_message_bytes: u64,
) -> Result<(), FrameViolation> {
    // The message limit first: a single frame over it is a message over it (1009), whatever
    // the kernel could assemble.
    if max_message_bytes != 0 && !h.is_control() {
        let message = if h.opcode == OPCODE_CONTINUATION {
            tracker.message_bytes.saturating_add(h.payload_len)
        } else {
            h.payload_len
        };
        if message > max_message_bytes {
            return Err(FrameViolation::MessageTooBig);
        }
    }
    if h.wire_len() > MAX_FRAME_WIRE_LEN {
        return Err(FrameViolation::TooLarge);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed(code: u16, at: u64) -> SideState {
        SideState::with_close(code, at)
    }

    #[test]
    fn status_follows_whoever_closed_first_and_their_code() {
        let none = SideState::default();
        let s = |c: &SideState, f: &SideState| function_status(Ending::Closed, c, f);
        assert_eq!(s(&closed(1000, 1), &closed(1000, 2)), 200);
        assert_eq!(s(&closed(1010, 1), &none), 200);
        assert_eq!(s(&closed(4000, 1), &closed(1000, 2)), 456);
        assert_eq!(s(&closed(1000, 3), &closed(1011, 2)), 200);
        assert_eq!(s(&closed(1000, 3), &closed(4001, 2)), 439);
        assert_eq!(s(&none, &closed(1010, 2)), 439);
        assert_eq!(s(&none, &none), 456);
        assert_eq!(
            s(&closed(1005, 1), &closed(1005, 2)),
            200,
            "no code is a plain close"
        );
        let f = |e| function_status(e, &none, &none);
        assert_eq!(f(Ending::InstanceFailed), 439);
        assert_eq!(f(Ending::IdleTimeout), 455);
        assert_eq!(f(Ending::ExecutionTimeout), 433);
        assert_eq!(f(Ending::MessageTooBig), 429);
        assert_eq!(f(Ending::RateExceeded), 429);
        assert_eq!(f(Ending::Shutdown), 200);
        assert_eq!(f(Ending::ClientProtocolError), 456);
        assert_eq!(f(Ending::FunctionProtocolError), 439);
    }

    #[test]
    fn a_protocol_error_either_way_fails_the_connection_with_1002() {
        for from_client in [true, false] {
            let ending = Ending::protocol_error(from_client);
            assert_eq!(proxy_close_code(ending), Some(1002));
            assert_eq!(proxy_close_reason(ending), "protocol error");
        }
    }

    #[test]
    fn the_closing_handshake_is_done_only_once_both_sides_sent_a_close_frame() {
        let none = SideState::default();
        assert!(closing_handshake_done(&closed(1000, 1), &closed(1000, 2)));
        assert!(!closing_handshake_done(&closed(1000, 1), &none));
        assert!(!closing_handshake_done(&none, &closed(1000, 2)));
    }

    #[test]
    fn a_rate_close_tells_the_client_1008_and_the_function_1001() {
        assert_eq!(proxy_close_code(Ending::RateExceeded), Some(1008));
        assert_eq!(
            proxy_close_code_to_function(Ending::RateExceeded),
            Some(1001)
        );
        assert_eq!(
            proxy_close_code_to_function(Ending::MessageTooBig),
            Some(1009)
        );
        assert_eq!(
            refusal_ending(FrameViolation::RateExceeded.flag(), true),
            Some(Ending::RateExceeded)
        );
    }

    #[test]
    fn idle_and_shutdown_close_with_1001_and_the_execution_limit_cuts_tcp() {
        assert_eq!(proxy_close_code(Ending::IdleTimeout), Some(1001));
        assert_eq!(proxy_close_code(Ending::Shutdown), Some(1001));
        assert_eq!(proxy_close_code(Ending::ExecutionTimeout), None);
    }

    #[test]
    fn the_client_is_closed_with_1011_only_when_the_instance_sent_no_close_and_it_is_still_there() {
        assert_eq!(
            close_for_instance_end(&SideState::default(), false),
            Some(1011)
        );
        assert_eq!(close_for_instance_end(&closed(1000, 1), false), None);
        assert_eq!(close_for_instance_end(&SideState::default(), true), None);
    }

    #[test]
    fn a_message_up_to_the_limit_in_one_frame_is_accepted_and_a_larger_frame_is_not() {
        let mut h = FrameHeader {
            fin: true,
            rsv: 0,
            opcode: 2,
            mask: Some([0; 4]),
            header_len: 14,
            payload_len: 262144,
        };
        let fresh = MessageTracker::default();
        assert_eq!(check_frame(&h, &fresh, 262144), Ok(()));
        assert_eq!(
            check_frame(&h, &fresh, 262143),
            Err(FrameViolation::MessageTooBig)
        );
        h.payload_len = MAX_FRAME_WIRE_LEN;
        assert_eq!(check_frame(&h, &fresh, 0), Err(FrameViolation::TooLarge));
        h.payload_len = 16 * 1024 * 1024;
        assert_eq!(
            check_frame(&h, &fresh, 16 * 1024 * 1024),
            Ok(()),
            "16 MiB is allowed"
        );
        assert_eq!(
            check_frame(&h, &fresh, 262144),
            Err(FrameViolation::MessageTooBig),
            "one frame over the message limit is a message over it"
        );
    }

    #[test]
    fn the_message_limit_counts_every_fragment_and_ignores_control_frames() {
        let frame = |fin, opcode, payload_len| FrameHeader {
            fin,
            rsv: 0,
            opcode,
            mask: None,
            header_len: 4,
            payload_len,
        };
        let mut tracker = MessageTracker::default();
        let first = frame(false, 1, 100_000);
        assert_eq!(check_frame(&first, &tracker, 262144), Ok(()));
        tracker.on_frame(&first);
        let second = frame(false, OPCODE_CONTINUATION, 100_000);
        assert_eq!(check_frame(&second, &tracker, 262144), Ok(()));
        tracker.on_frame(&second);
        let ping = frame(true, 9, 125);
        assert_eq!(check_frame(&ping, &tracker, 262144), Ok(()));
        let last = frame(true, OPCODE_CONTINUATION, 62_145);
        assert_eq!(
            check_frame(&last, &tracker, 262144),
            Err(FrameViolation::MessageTooBig)
        );
        let fitting = frame(true, OPCODE_CONTINUATION, 62_144);
        assert_eq!(check_frame(&fitting, &tracker, 262144), Ok(()));
    }
}
