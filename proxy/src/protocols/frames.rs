//! Userspace side of frame tracking: walks a byte stream delivered in arbitrary chunks,
//! finds frame boundaries with the shared parser, and accounts every frame into the same
//! [`SideState`] the kernel verdict program updates.

use proxy_common::{
    FrameKind, HeaderParse, MAX_HEADER_LEN, SideState,
    frame::{HeaderError, close_code, header_len},
    parse_header,
    policy::{FrameViolation, check_frame},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid WebSocket frame header: {0:?}")]
    Header(HeaderError),
    #[error("frame refused: {0:?}")]
    Policy(FrameViolation),
    /// Not a refusal: the frame is over the client's rate (`on_exceed = "throttle"`) and may
    /// go on at `until_ns` (monotonic). The cursor is left as it was before the frame, so
    /// its bytes are fed again then.
    #[error("frame over the rate until {until_ns}")]
    Throttled { until_ns: u64 },
}

impl FrameError {
    /// The side-state flag the kernel sets for the same refusal, so both data planes reach
    /// their ending through [`proxy_common::policy::refusal_ending`].
    pub fn flag(self) -> u32 {
        match self {
            FrameError::Header(_) => proxy_common::maps::FLAG_PROTOCOL_ERROR,
            FrameError::Policy(violation) => violation.flag(),
            FrameError::Throttled { .. } => 0,
        }
    }
}

/// Where a stream stands between frame boundaries.
#[derive(Debug, Default, Clone)]
pub struct FrameCursor {
    header: [u8; MAX_HEADER_LEN],
    header_have: usize,
    payload_left: u64,
    /// First two payload bytes of a close frame (with its mask) while they are being read.
    close: Option<CloseCode>,
    /// After a refused or invalid frame: where in the last chunk its header began, when it
    /// began in that chunk (everything before it was whole frames and may still be forwarded).
    /// After a throttled frame: where the rest of its header starts in the chunk (what came
    /// before may go on; from there on waits).
    refused_at: Option<usize>,
}

#[derive(Debug, Clone, Copy)]
struct CloseCode {
    mask: Option<[u8; 4]>,
    bytes: [u8; 2],
    have: usize,
}

impl FrameCursor {
    /// A cursor `payload_left` bytes before the end of a data frame's payload (0: at a frame
    /// boundary), for a stream the kernel parsed up to there.
    pub fn inside_payload(payload_left: u64) -> FrameCursor {
        FrameCursor {
            payload_left,
            ..FrameCursor::default()
        }
    }

    /// True when the bytes seen so far end exactly at a frame boundary.
    pub fn at_boundary(&self) -> bool {
        self.header_have == 0 && self.payload_left == 0
    }

    /// Bytes still needed to reach the next frame boundary: known exactly inside a payload,
    /// or the rest of the header when only part of it was seen (more may follow then).
    pub fn needed_for_boundary(&self) -> u64 {
        if self.header_have > 0 {
            let needed = if self.header_have >= 2 {
                header_len(self.header[1]) as usize
            } else {
                2
            };
            (needed - self.header_have) as u64
        } else {
            self.payload_left
        }
    }

    /// After an error: how many bytes of the chunk came before the refused frame, if its
    /// header began in that chunk.
    pub fn refused_at(&self) -> Option<usize> {
        self.refused_at
    }

    /// After a refusal by policy: the refused frame's payload length (its header is still
    /// in the cursor, whole, since only a whole header is judged).
    pub fn refused_payload_len(&self) -> Option<u64> {
        match parse_header(&self.header, MAX_HEADER_LEN) {
            HeaderParse::Complete(h) => Some(h.payload_len),
            _ => None,
        }
    }

    /// Walks `chunk`, accounting every frame whose header completes in it.
    pub fn feed(
        &mut self,
        mut chunk: &[u8],
        side: &mut SideState,
        now_ns: u64,
    ) -> Result<(), FrameError> {
        let whole = chunk.len();
        while !chunk.is_empty() {
            if self.payload_left > 0 {
                let take = (self.payload_left.min(chunk.len() as u64)) as usize;
                self.take_close_bytes(&chunk[..take], side);
                self.payload_left -= take as u64;
                chunk = &chunk[take..];
                continue;
            }
            let take = (MAX_HEADER_LEN - self.header_have).min(chunk.len());
            self.header[self.header_have..self.header_have + take].copy_from_slice(&chunk[..take]);
            let avail = self.header_have + take;
            match parse_header(&self.header, avail) {
                HeaderParse::Incomplete { .. } => {
                    self.header_have = avail;
                    return Ok(());
                }
                HeaderParse::Invalid(e) => {
                    let at = whole - chunk.len();
                    self.refused_at = (self.header_have == 0).then_some(at);
                    return Err(FrameError::Header(e));
                }
                HeaderParse::Complete(h) => {
                    if let Err(violation) = check_frame(&h, &side.tracker, side.max_message_bytes) {
                        let at = whole - chunk.len();
                        self.refused_at = (self.header_have == 0).then_some(at);
                        return Err(FrameError::Policy(violation));
                    }
                    if let Err(over) = side.rate.admit(&h, now_ns) {
                        let at = whole - chunk.len();
                        if side.rate.closes() {
                            self.refused_at = (self.header_have == 0).then_some(at);
                            return Err(FrameError::Policy(FrameViolation::RateExceeded));
                        }
                        // `header_have` is left as it was: the same bytes come again.
                        self.refused_at = Some(at);
                        return Err(FrameError::Throttled {
                            until_ns: over.until_ns,
                        });
                    }
                    let consumed = h.header_len as usize - self.header_have;
                    chunk = &chunk[consumed..];
                    self.header_have = 0;
                    self.payload_left = h.payload_len;
                    if side.account(&h, now_ns) == FrameKind::Close {
                        if h.payload_len >= 2 {
                            self.close = Some(CloseCode {
                                mask: h.mask,
                                bytes: [0; 2],
                                have: 0,
                            });
                        } else {
                            side.record_close(1005);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn take_close_bytes(&mut self, payload: &[u8], side: &mut SideState) {
        let Some(close) = self.close.as_mut() else {
            return;
        };
        for &b in payload.iter().take(2 - close.have) {
            close.bytes[close.have] = b;
            close.have += 1;
        }
        if close.have == 2 {
            side.record_close(close_code(close.bytes, close.mask));
            self.close = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttled_frame_leaves_the_cursor_where_it_was_so_its_bytes_can_come_again() {
        let mut side = SideState {
            rate: proxy_common::rate::RateState::new(1, 0, false),
            ..SideState::default()
        };
        let mut cursor = FrameCursor::default();
        // Two one-byte binary messages; the second splits its header across chunks.
        cursor.feed(&[0x82, 1, 7, 0x82], &mut side, 1_000).unwrap();
        assert_eq!(side.messages, 1);
        let err = cursor.feed(&[1, 8], &mut side, 2_000).unwrap_err();
        assert!(matches!(err, FrameError::Throttled { until_ns } if until_ns == 900_001_000));
        assert_eq!(cursor.refused_at(), Some(0));
        assert_eq!(
            cursor.needed_for_boundary(),
            1,
            "still one header byte short"
        );
        cursor.feed(&[1, 8], &mut side, 900_001_000).unwrap();
        assert!(cursor.at_boundary());
        assert_eq!((side.messages, side.bytes), (2, 6));
        assert_eq!(side.rate.throttled_ns, 900_001_000 - 2_000);
        let mut closing = SideState {
            rate: proxy_common::rate::RateState::new(1, 0, true),
            ..SideState::default()
        };
        let mut cursor = FrameCursor::default();
        let err = cursor
            .feed(&[0x82, 1, 7, 0x82, 1, 8], &mut closing, 1)
            .unwrap_err();
        assert_eq!(err, FrameError::Policy(FrameViolation::RateExceeded));
        assert_eq!(
            cursor.refused_at(),
            Some(3),
            "the first message still goes on"
        );
    }

    #[test]
    fn counts_frames_split_at_every_byte() {
        // A masked close (1000) frame, an unmasked fragmented message and a ping.
        let mask = [1, 2, 3, 4];
        let mut stream = vec![0x88, 0x82, 1, 2, 3, 4, 0x03 ^ mask[0], 0xE8 ^ mask[1]];
        stream.extend_from_slice(&[0x01, 126, 0, 200]);
        stream.extend(std::iter::repeat_n(b'a', 200));
        stream.extend_from_slice(&[0x89, 1, b'p', 0x80, 0]);
        for split in 1..stream.len() {
            let mut cursor = FrameCursor::default();
            let mut side = SideState::default();
            for part in stream.chunks(split) {
                cursor.feed(part, &mut side, 7).unwrap();
            }
            assert!(cursor.at_boundary());
            assert_eq!(
                (side.frames, side.messages, side.bytes),
                (4, 1, stream.len() as u64)
            );
            assert_eq!(side.close_code, 1000, "split {split}");
        }
    }

    #[test]
    fn reports_what_is_missing_to_reach_a_boundary() {
        let mut cursor = FrameCursor::default();
        let mut side = SideState::default();
        cursor.feed(&[0x82], &mut side, 0).unwrap();
        assert_eq!(cursor.needed_for_boundary(), 1);
        cursor.feed(&[126, 1], &mut side, 0).unwrap();
        assert_eq!(cursor.needed_for_boundary(), 1);
        cursor.feed(&[0, 9, 9], &mut side, 0).unwrap();
        assert_eq!(cursor.needed_for_boundary(), 254);
    }
}

/// A close frame as a client sends it (masked with `mask`), for the proxy to close the
/// instance's side itself.
pub fn masked_close_frame(code: u16, reason: &str, mask: [u8; 4]) -> Vec<u8> {
    let plain = close_frame(code, reason);
    let mut frame = vec![plain[0], plain[1] | 0x80];
    frame.extend_from_slice(&mask);
    frame.extend(plain[2..].iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// An unmasked close frame (server to client) with `code` and a short UTF-8 `reason`.
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    // Control frame payloads are at most 125 bytes: 2 for the code, the rest for the reason.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason.as_bytes()[..end];
    let mut frame = vec![0x88, (2 + reason.len()) as u8];
    frame.extend_from_slice(&code.to_be_bytes());
    frame.extend_from_slice(reason);
    frame
}

#[cfg(test)]
mod close_frame_tests {
    use super::*;

    #[test]
    fn a_close_frame_parses_back_to_its_code_and_is_accounted_as_a_close() {
        let frame = close_frame(1011, "function instance failed");
        let mut side = SideState::default();
        let mut cursor = FrameCursor::default();
        cursor.feed(&frame, &mut side, 1).unwrap();
        assert!(cursor.at_boundary());
        assert_eq!(side.close_code, 1011);
        assert_eq!(close_frame(1000, &"é".repeat(100)).len(), 2 + 2 + 122);
        let masked = masked_close_frame(1001, "idle", [1, 2, 3, 4]);
        let mut side = SideState::default();
        FrameCursor::default().feed(&masked, &mut side, 1).unwrap();
        assert_eq!(side.close_code, 1001, "the cursor unmasks the code");
    }
}
