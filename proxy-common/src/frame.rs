//! The WebSocket frame-header parser (RFC 6455 section 5.2): the single source of truth for
//! where frames start and end, used by the eBPF programs and by the userspace relay.
//!
//! Input is a fixed 14-byte window plus how many of those bytes are valid. The kernel loads
//! at most 14 bytes from the socket buffer into a stack array; userspace copies from its read
//! buffer. A fixed window keeps every index constant, which the verifier needs.

/// The longest possible frame header: 2 bytes, 8-byte extended length, 4-byte mask key.
pub const MAX_HEADER_LEN: usize = 14;

pub const OPCODE_CONTINUATION: u8 = 0x0;
pub const OPCODE_TEXT: u8 = 0x1;
pub const OPCODE_BINARY: u8 = 0x2;
pub const OPCODE_CLOSE: u8 = 0x8;
pub const OPCODE_PING: u8 = 0x9;
pub const OPCODE_PONG: u8 = 0xA;

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    /// RSV1..3 as the low three bits (RSV1 = 0b100). RSV1 is set by permessage-deflate.
    pub rsv: u8,
    pub opcode: u8,
    /// Present when the MASK bit is set (client-to-server frames).
    pub mask: Option<[u8; 4]>,
    /// Bytes of header on the wire: 2, 4, 6, 8, 10 or 14.
    pub header_len: u8,
    pub payload_len: u64,
}

impl FrameHeader {
    /// Header plus payload: the frame's size on the wire.
    pub fn wire_len(&self) -> u64 {
        self.header_len as u64 + self.payload_len
    }

    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// Why a header can never become a valid frame, whatever bytes follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// The 64-bit extended length has its most significant bit set (RFC 6455 5.2).
    LengthOverflow,
    /// A control frame with a payload over 125 bytes or without FIN (RFC 6455 5.5).
    BadControlFrame,
    /// Opcodes 0x3-0x7 and 0xB-0xF are reserved.
    ReservedOpcode,
}

/// Outcome of looking at the first bytes of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderParse {
    /// The header is not complete: at least `header_len` bytes are needed in total.
    Incomplete {
        header_len: u8,
    },
    Complete(FrameHeader),
    Invalid(HeaderError),
}

/// Header length implied by the first two bytes.
#[inline(always)]
pub fn header_len(byte1: u8) -> u8 {
    let ext = match byte1 & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if byte1 & 0x80 != 0 { 4 } else { 0 };
    2 + ext + mask
}

/// Parses a frame header from the first `avail` bytes of `window`.
///
/// `avail` may exceed 14 (the caller has more bytes than the window holds); only the window
/// is read. Never panics and reads only constant indexes.
#[inline(always)]
pub fn parse_header(window: &[u8; MAX_HEADER_LEN], avail: usize) -> HeaderParse {
    if avail < 2 {
        return HeaderParse::Incomplete { header_len: 2 };
    }
    let b0 = window[0];
    let b1 = window[1];
    let needed = header_len(b1);
    if avail < needed as usize {
        return HeaderParse::Incomplete { header_len: needed };
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    let masked = b1 & 0x80 != 0;
    let len7 = b1 & 0x7F;
    let (payload_len, mask_at) = match len7 {
        126 => (u16::from_be_bytes([window[2], window[3]]) as u64, 4),
        127 => {
            let len = u64::from_be_bytes([
                window[2], window[3], window[4], window[5], window[6], window[7], window[8],
                window[9],
            ]);
            if len >> 63 != 0 {
                return HeaderParse::Invalid(HeaderError::LengthOverflow);
            }
            (len, 10)
        }
        n => (n as u64, 2),
    };
    if matches!(opcode, 0x3..=0x7 | 0xB..=0xF) {
        return HeaderParse::Invalid(HeaderError::ReservedOpcode);
    }
    if opcode & 0x8 != 0 && (!fin || payload_len > 125) {
        return HeaderParse::Invalid(HeaderError::BadControlFrame);
    }
    let mask = if masked {
        Some(match mask_at {
            2 => [window[2], window[3], window[4], window[5]],
            4 => [window[4], window[5], window[6], window[7]],
            _ => [window[10], window[11], window[12], window[13]],
        })
    } else {
        None
    };
    HeaderParse::Complete(FrameHeader {
        fin,
        rsv: (b0 >> 4) & 0x7,
        opcode,
        mask,
        header_len: needed,
        payload_len,
    })
}

/// Copies up to 14 bytes of `bytes` into a window; returns the window and how many are valid.
pub fn window_of(bytes: &[u8]) -> ([u8; MAX_HEADER_LEN], usize) {
    let mut window = [0u8; MAX_HEADER_LEN];
    let n = bytes.len().min(MAX_HEADER_LEN);
    window[..n].copy_from_slice(&bytes[..n]);
    (window, bytes.len())
}

/// How many of a close frame's first bytes hold its header and status code: `header_len + 2`
/// (a control frame's header is 2 bytes, 6 with a mask), or just the header when it carries
/// no code.
#[inline(always)]
pub fn close_code_end(h: &FrameHeader) -> usize {
    if h.payload_len >= 2 {
        h.header_len as usize + 2
    } else {
        h.header_len as usize
    }
}

/// The status code of a close frame whose first [`close_code_end`] bytes are in `window`:
/// 1005 ("no status received") when it carries none. Both kernel programs and the userspace
/// cursor's callers read it here, with constant indexes the verifier accepts.
#[inline(always)]
pub fn close_code_in(window: &[u8; MAX_HEADER_LEN], h: &FrameHeader) -> u16 {
    if h.payload_len < 2 {
        return 1005;
    }
    let bytes = if h.mask.is_some() {
        [window[6], window[7]]
    } else {
        [window[2], window[3]]
    };
    close_code(bytes, h.mask)
}

/// Reads a close frame's status code from its first two (possibly masked) payload bytes.
#[inline(always)]
pub fn close_code(payload_start: [u8; 2], mask: Option<[u8; 4]>) -> u16 {
    let [a, b] = payload_start;
    match mask {
        Some(m) => u16::from_be_bytes([a ^ m[0], b ^ m[1]]),
        None => u16::from_be_bytes([a, b]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_code_in_reads_masked_unmasked_and_missing_codes() {
        // Unmasked 1000 "x": 88 03 03 e8 78.
        let (w, n) = window_of(&[0x88, 0x03, 0x03, 0xe8, b'x']);
        let HeaderParse::Complete(h) = parse_header(&w, n) else {
            panic!()
        };
        assert_eq!((close_code_end(&h), close_code_in(&w, &h)), (4, 1000));
        // Masked 1001 with mask 01 02 03 04: payload bytes 03^01, e9^02.
        let (w, n) = window_of(&[0x88, 0x82, 1, 2, 3, 4, 0x03 ^ 1, 0xe9 ^ 2]);
        let HeaderParse::Complete(h) = parse_header(&w, n) else {
            panic!()
        };
        assert_eq!((close_code_end(&h), close_code_in(&w, &h)), (8, 1001));
        // No payload: 1005.
        let (w, n) = window_of(&[0x88, 0x80, 1, 2, 3, 4]);
        let HeaderParse::Complete(h) = parse_header(&w, n) else {
            panic!()
        };
        assert_eq!((close_code_end(&h), close_code_in(&w, &h)), (6, 1005));
    }

    fn parse(bytes: &[u8]) -> HeaderParse {
        let (w, n) = window_of(bytes);
        parse_header(&w, n)
    }

    #[test]
    fn short_unmasked_text_frame() {
        let h = parse(&[0x81, 0x05, b'h', b'e']);
        assert_eq!(
            h,
            HeaderParse::Complete(FrameHeader {
                fin: true,
                rsv: 0,
                opcode: OPCODE_TEXT,
                mask: None,
                header_len: 2,
                payload_len: 5
            })
        );
    }

    #[test]
    fn masked_16_bit_length() {
        let h = parse(&[0x82, 0x80 | 126, 0x01, 0x00, 1, 2, 3, 4]);
        let HeaderParse::Complete(h) = h else {
            panic!("{h:?}")
        };
        assert_eq!(
            (h.header_len, h.payload_len, h.mask),
            (8, 256, Some([1, 2, 3, 4]))
        );
    }

    #[test]
    fn sixty_four_bit_length_with_mask_needs_fourteen_bytes() {
        let mut bytes = [0x02, 0x80 | 127, 0, 0, 0, 0, 0, 4, 0, 0, 9, 9, 9, 9];
        assert_eq!(
            parse(&bytes[..13]),
            HeaderParse::Incomplete { header_len: 14 }
        );
        let HeaderParse::Complete(h) = parse(&bytes) else {
            panic!()
        };
        assert_eq!(
            (h.fin, h.opcode, h.payload_len, h.header_len),
            (false, 2, 262144, 14)
        );
        bytes[2] = 0x80;
        assert_eq!(
            parse(&bytes),
            HeaderParse::Invalid(HeaderError::LengthOverflow)
        );
    }

    #[test]
    fn control_frames_must_be_short_and_final() {
        assert_eq!(
            parse(&[0x09, 0x00]),
            HeaderParse::Invalid(HeaderError::BadControlFrame)
        );
        assert_eq!(
            parse(&[0x89, 126, 0, 126]),
            HeaderParse::Invalid(HeaderError::BadControlFrame)
        );
        assert!(matches!(parse(&[0x89, 125]), HeaderParse::Complete(_)));
    }

    #[test]
    fn reserved_opcodes_are_rejected() {
        assert_eq!(
            parse(&[0x83, 0]),
            HeaderParse::Invalid(HeaderError::ReservedOpcode)
        );
        assert_eq!(
            parse(&[0x8B, 0]),
            HeaderParse::Invalid(HeaderError::ReservedOpcode)
        );
    }

    #[test]
    fn close_code_is_unmasked() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let wire = [0x03 ^ 0x12, 0xE8 ^ 0x34];
        assert_eq!(close_code(wire, Some(mask)), 1000);
        assert_eq!(close_code([0x03, 0xF1], None), 1009);
    }
}
