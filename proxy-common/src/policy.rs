//! Decisions both data planes take the same way. Today: which frames are accepted at all.
//! (Per-function quotas, 1009/1008 closes and throttling build on this module.)

use crate::{FrameHeader, maps::MAX_FRAME_WIRE_LEN};

/// Why a frame ends the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameViolation {
    /// Larger (header included) than the kernel can assemble; see [`MAX_FRAME_WIRE_LEN`].
    TooLarge,
}

/// Accepts or refuses one frame header. The kernel parser fails the socket on a refusal;
/// the userspace relay closes the connection.
#[inline(always)]
pub fn check_frame(h: &FrameHeader) -> Result<(), FrameViolation> {
    if h.wire_len() > MAX_FRAME_WIRE_LEN {
        Err(FrameViolation::TooLarge)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_256_kib_message_in_one_frame_is_accepted_and_a_larger_frame_is_not() {
        let mut h = FrameHeader {
            fin: true,
            rsv: 0,
            opcode: 2,
            mask: Some([0; 4]),
            header_len: 14,
            payload_len: 262144,
        };
        assert_eq!(check_frame(&h), Ok(()));
        h.payload_len = MAX_FRAME_WIRE_LEN;
        assert_eq!(check_frame(&h), Err(FrameViolation::TooLarge));
    }
}
