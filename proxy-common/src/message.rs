//! Message accounting over a sequence of frames: what counts as a message, how big the
//! current message is. Both data planes feed every frame header through this.

use crate::frame::{FrameHeader, OPCODE_CLOSE, OPCODE_CONTINUATION};

/// What a frame means for accounting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// Ping, pong: activity, not a message.
    Control,
    /// A close frame.
    Close,
    /// A data frame that does not finish its message.
    DataPartial,
    /// A data frame with FIN: one message completed.
    MessageEnd,
    /// A continuation with no message open, or a new message while one is open (RFC 6455 5.4).
    OutOfSequence,
}

/// Per-direction message state, `#[repr(C)]` so the kernel can keep it in a map value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MessageTracker {
    /// Payload bytes of the message being assembled, including this frame once seen.
    pub message_bytes: u64,
    /// 1 while a fragmented message is open.
    pub in_message: u64,
}

impl MessageTracker {
    /// Accounts one frame and classifies it.
    #[inline(always)]
    pub fn on_frame(&mut self, h: &FrameHeader) -> FrameKind {
        if h.is_control() {
            return if h.opcode == OPCODE_CLOSE {
                FrameKind::Close
            } else {
                FrameKind::Control
            };
        }
        let continuation = h.opcode == OPCODE_CONTINUATION;
        if continuation != (self.in_message != 0) {
            return FrameKind::OutOfSequence;
        }
        if continuation {
            self.message_bytes = self.message_bytes.saturating_add(h.payload_len);
        } else {
            self.message_bytes = h.payload_len;
        }
        if h.fin {
            self.in_message = 0;
            FrameKind::MessageEnd
        } else {
            self.in_message = 1;
            FrameKind::DataPartial
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{OPCODE_BINARY, OPCODE_PING, OPCODE_TEXT};

    fn frame(fin: bool, opcode: u8, len: u64) -> FrameHeader {
        FrameHeader {
            fin,
            rsv: 0,
            opcode,
            mask: None,
            header_len: 2,
            payload_len: len,
        }
    }

    #[test]
    fn fragmented_message_counts_once_and_sums_payload() {
        let mut t = MessageTracker::default();
        assert_eq!(
            t.on_frame(&frame(false, OPCODE_TEXT, 10)),
            FrameKind::DataPartial
        );
        assert_eq!(t.on_frame(&frame(true, OPCODE_PING, 3)), FrameKind::Control);
        assert_eq!(
            t.on_frame(&frame(false, OPCODE_CONTINUATION, 20)),
            FrameKind::DataPartial
        );
        assert_eq!(
            t.on_frame(&frame(true, OPCODE_CONTINUATION, 5)),
            FrameKind::MessageEnd
        );
        assert_eq!(t.message_bytes, 35);
        assert_eq!(
            t.on_frame(&frame(true, OPCODE_BINARY, 7)),
            FrameKind::MessageEnd
        );
        assert_eq!(t.message_bytes, 7);
    }

    #[test]
    fn continuation_without_open_message_is_out_of_sequence() {
        let mut t = MessageTracker::default();
        assert_eq!(
            t.on_frame(&frame(true, OPCODE_CONTINUATION, 1)),
            FrameKind::OutOfSequence
        );
        t.on_frame(&frame(false, OPCODE_TEXT, 1));
        assert_eq!(
            t.on_frame(&frame(true, OPCODE_TEXT, 1)),
            FrameKind::OutOfSequence
        );
    }
}
