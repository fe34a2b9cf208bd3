//! Test harness shared by the `frame_header` fuzz target and the proxy-common integration tests
//! (`tests/fuzz_corpus.rs`, `tests/frame_properties.rs`), which include this file with
//! `#[path]`. It is not part of `proxy-common` itself: it only drives the public API.
//!
//! [`Walker`] walks a WebSocket byte stream the way a proxy does: it parses a header with
//! `parse_header`, skips the payload without looking at it, and carries a partial header across
//! read boundaries in a small buffer. Every `parse_header` result and every `MessageTracker`
//! classification is checked against invariants on the way; a violation panics.
//!
//! [`check_input`] is the fuzz entry point. Input layout: byte 0 picks the chunk sizes the stream
//! is fed in (see [`chunk_sizes`]); bytes 1.. are the stream. The stream is walked once in those
//! chunks and once in one piece, and both walks must agree on everything.

// Each includer uses a different subset of this file.
#![allow(dead_code)]

use proxy_common::frame::{
    FrameHeader, HeaderError, HeaderParse, MAX_HEADER_LEN, OPCODE_CLOSE, OPCODE_CONTINUATION,
    header_len, parse_header,
};
use proxy_common::message::{FrameKind, MessageTracker};

/// Header lengths RFC 6455 allows: 2 + {0, 2, 8} + {0, 4}.
pub const HEADER_LENS: [u8; 6] = [2, 4, 6, 8, 10, 14];

/// How the payload length is written on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LenEncoding {
    /// In the 7 bits of byte 1 (payload 0..=125).
    Bits7,
    /// 126, then a 16-bit big-endian length.
    Bits16,
    /// 127, then a 64-bit big-endian length (MSB must be 0 for a valid frame).
    Bits64,
}

impl LenEncoding {
    /// The shortest encoding RFC 6455 says to use for `len`.
    pub fn minimal(len: u64) -> Self {
        match len {
            0..=125 => Self::Bits7,
            126..=0xFFFF => Self::Bits16,
            _ => Self::Bits64,
        }
    }

    /// The encoding a parsed header of this length must have used.
    pub fn of_header_len(header_len: u8) -> Self {
        match header_len {
            2 | 6 => Self::Bits7,
            4 | 8 => Self::Bits16,
            _ => Self::Bits64,
        }
    }
}

/// Writes a frame header byte by byte from RFC 6455 5.2, independently of the parser.
///
/// `len` must fit `enc` (`Bits7`: <= 125, `Bits16`: <= 65535); `Bits64` writes any `u64`,
/// including ones with the MSB set, so callers can build invalid headers on purpose.
pub fn encode_header(
    fin: bool,
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
    enc: LenEncoding,
) -> Vec<u8> {
    assert!(
        rsv <= 7 && opcode <= 0xF,
        "encoder given out-of-range rsv/opcode"
    );
    let mut out = Vec::with_capacity(MAX_HEADER_LEN);
    out.push(((fin as u8) << 7) | (rsv << 4) | opcode);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match enc {
        LenEncoding::Bits7 => {
            assert!(len <= 125, "7-bit length {len} does not fit");
            out.push(mask_bit | len as u8);
        }
        LenEncoding::Bits16 => {
            let len = u16::try_from(len).expect("16-bit length does not fit");
            out.push(mask_bit | 126);
            out.extend_from_slice(&len.to_be_bytes());
        }
        LenEncoding::Bits64 => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
    out
}

/// Encodes a parsed header back to wire bytes, in the length encoding its `header_len` implies.
pub fn reencode(h: &FrameHeader) -> Vec<u8> {
    encode_header(
        h.fin,
        h.rsv,
        h.opcode,
        h.mask,
        h.payload_len,
        LenEncoding::of_header_len(h.header_len),
    )
}

/// Checks one `parse_header` result against what the window and `avail` allow.
/// `window` must hold the first `min(avail, 14)` bytes of the header.
pub fn check_parse(window: &[u8; MAX_HEADER_LEN], avail: usize, parse: &HeaderParse) {
    match *parse {
        HeaderParse::Incomplete { header_len: need } => {
            assert!(
                HEADER_LENS.contains(&need),
                "Incomplete asks for {need} bytes, not a header length"
            );
            assert!(
                (need as usize) > avail,
                "Incomplete({need}) with {avail} bytes available"
            );
            if avail >= 2 {
                assert_eq!(
                    need,
                    header_len(window[1]),
                    "Incomplete length disagrees with byte 1"
                );
            } else {
                assert_eq!(need, 2, "fewer than 2 bytes must ask for exactly 2");
            }
        }
        HeaderParse::Complete(h) => {
            assert!(
                HEADER_LENS.contains(&h.header_len),
                "Complete header_len {} is not a header length",
                h.header_len
            );
            assert!(
                h.header_len as usize <= avail,
                "Complete({}) with {avail} bytes",
                h.header_len
            );
            assert_eq!(h.header_len, header_len(window[1]));
            assert_eq!(h.wire_len(), h.header_len as u64 + h.payload_len);
            assert_eq!(
                h.payload_len >> 63,
                0,
                "payload length with MSB set accepted"
            );
            assert!(h.rsv <= 7);
            assert!(
                matches!(h.opcode, 0x0..=0x2 | 0x8..=0xA),
                "reserved opcode {:#x} accepted",
                h.opcode
            );
            if h.is_control() {
                assert!(h.fin, "control frame without FIN accepted: {h:?}");
                assert!(
                    h.payload_len <= 125,
                    "control frame payload {} accepted",
                    h.payload_len
                );
            }
            // The header must be exactly what re-encoding the parsed fields produces.
            let hl = h.header_len as usize;
            assert_eq!(
                reencode(&h),
                window[..hl],
                "parsed fields do not re-encode to the wire"
            );
        }
        HeaderParse::Invalid(err) => {
            assert!(
                avail >= 2,
                "Invalid({err:?}) decided from fewer than 2 bytes"
            );
            let b0 = window[0];
            let opcode = b0 & 0x0F;
            let why_ok = match err {
                HeaderError::LengthOverflow => window[1] & 0x7F == 127 && window[2] & 0x80 != 0,
                HeaderError::ReservedOpcode => matches!(opcode, 0x3..=0x7 | 0xB..=0xF),
                HeaderError::BadControlFrame => {
                    opcode & 0x8 != 0 && (b0 & 0x80 == 0 || wire_payload_len(window) > 125)
                }
            };
            assert!(
                why_ok,
                "Invalid({err:?}) for header {:02x?}",
                &window[..avail.min(14)]
            );
        }
    }
}

/// The payload length as written in a header, whatever encoding it uses.
fn wire_payload_len(window: &[u8; MAX_HEADER_LEN]) -> u64 {
    match window[1] & 0x7F {
        126 => u64::from(window[2]) << 8 | u64::from(window[3]),
        127 => window[2..10]
            .iter()
            .fold(0, |acc, &b| acc << 8 | u64::from(b)),
        n => u64::from(n),
    }
}

/// One frame the walker found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameRecord {
    /// Stream offset of the frame's first header byte.
    pub offset: u64,
    pub header: FrameHeader,
    pub kind: FrameKind,
}

/// Where the walk stands once the input has run out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkEnd {
    /// The stream ended exactly at a frame boundary.
    AtBoundary,
    /// The stream ended inside a header: `have` bytes of it are buffered.
    InHeader { have: u8 },
    /// The stream ended inside a payload with `remaining` bytes still to come.
    InPayload { remaining: u64 },
    /// The frame at `offset` has a header that can never be valid; the rest was not looked at.
    Invalid { offset: u64, error: HeaderError },
}

/// A proxy-style stream walker. Feed it chunks with [`Walker::feed`], then call
/// [`Walker::end`].
#[derive(Debug, Default)]
pub struct Walker {
    /// Partial header carried over from earlier chunks (always fewer than 14 bytes).
    carry: [u8; MAX_HEADER_LEN],
    carry_len: usize,
    /// Payload bytes of the current frame still to skip.
    skip: u64,
    /// Stream bytes consumed so far, including the carried header bytes.
    offset: u64,
    invalid: Option<(u64, HeaderError)>,
    pub tracker: MessageTracker,
    /// Every frame header found, in order.
    pub frames: Vec<FrameRecord>,
    /// `message_bytes` of each completed message, in order.
    pub messages: Vec<u64>,
}

impl Walker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next chunk of the stream.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() && self.invalid.is_none() {
            if self.skip > 0 {
                let n = chunk
                    .len()
                    .min(usize::try_from(self.skip).unwrap_or(usize::MAX));
                chunk = &chunk[n..];
                self.skip -= n as u64;
                self.offset += n as u64;
                continue;
            }
            // Window = carried header bytes, then as much of this chunk as fits.
            let mut window = [0u8; MAX_HEADER_LEN];
            window[..self.carry_len].copy_from_slice(&self.carry[..self.carry_len]);
            let from_chunk = chunk.len().min(MAX_HEADER_LEN - self.carry_len);
            window[self.carry_len..self.carry_len + from_chunk]
                .copy_from_slice(&chunk[..from_chunk]);
            let avail = self.carry_len + chunk.len();
            let parse = parse_header(&window, avail);
            check_parse(&window, avail, &parse);
            match parse {
                HeaderParse::Incomplete { .. } => {
                    // check_parse proved avail < need <= 14, so all of it fits in the carry.
                    self.carry[self.carry_len..avail].copy_from_slice(chunk);
                    self.offset += chunk.len() as u64;
                    self.carry_len = avail;
                    chunk = &[];
                }
                HeaderParse::Complete(h) => {
                    let hl = h.header_len as usize;
                    assert!(
                        hl > self.carry_len,
                        "header_len {hl} shrank below the {} bytes already carried",
                        self.carry_len
                    );
                    let frame_offset = self.offset - self.carry_len as u64;
                    let used = hl - self.carry_len;
                    chunk = &chunk[used..];
                    self.offset += used as u64;
                    self.carry_len = 0;
                    self.skip = h.payload_len;
                    self.on_frame(frame_offset, h);
                }
                HeaderParse::Invalid(error) => {
                    self.invalid = Some((self.offset - self.carry_len as u64, error));
                }
            }
        }
    }

    fn on_frame(&mut self, offset: u64, h: FrameHeader) {
        let before = self.tracker;
        let kind = self.tracker.on_frame(&h);
        let t = self.tracker;
        assert!(t.in_message <= 1, "in_message = {}", t.in_message);
        // RFC 6455 5.4/5.5, written out independently of MessageTracker.
        let expected = if h.is_control() {
            if h.opcode == OPCODE_CLOSE {
                FrameKind::Close
            } else {
                FrameKind::Control
            }
        } else if (h.opcode == OPCODE_CONTINUATION) != (before.in_message == 1) {
            FrameKind::OutOfSequence
        } else if h.fin {
            FrameKind::MessageEnd
        } else {
            FrameKind::DataPartial
        };
        assert_eq!(
            kind, expected,
            "MessageTracker misclassified {h:?} in state {before:?}"
        );
        match kind {
            FrameKind::Control | FrameKind::Close | FrameKind::OutOfSequence => {
                assert_eq!(t, before, "{kind:?} frame changed the message state");
            }
            FrameKind::DataPartial | FrameKind::MessageEnd => {
                let want = if h.opcode == OPCODE_CONTINUATION {
                    before.message_bytes.saturating_add(h.payload_len)
                } else {
                    h.payload_len
                };
                assert_eq!(t.message_bytes, want, "message_bytes after {h:?}");
                assert_eq!(t.in_message, (kind == FrameKind::DataPartial) as u64);
                if kind == FrameKind::MessageEnd {
                    self.messages.push(t.message_bytes);
                }
            }
        }
        self.frames.push(FrameRecord {
            offset,
            header: h,
            kind,
        });
    }

    /// Where the stream stopped.
    pub fn end(&self) -> WalkEnd {
        if let Some((offset, error)) = self.invalid {
            WalkEnd::Invalid { offset, error }
        } else if self.carry_len > 0 {
            WalkEnd::InHeader {
                have: self.carry_len as u8,
            }
        } else if self.skip > 0 {
            WalkEnd::InPayload {
                remaining: self.skip,
            }
        } else {
            WalkEnd::AtBoundary
        }
    }

    /// Stream bytes consumed, including carried header bytes; excludes bytes after an invalid header.
    pub fn consumed(&self) -> u64 {
        self.offset
    }
}

/// Chunk sizes derived from one seed byte: the low 4 bits give the largest chunk (1..=16), the
/// whole byte seeds a xorshift generator. Seed 0 means "one chunk, the whole stream".
pub fn chunk_sizes(seed: u8) -> impl FnMut() -> usize {
    let max = (seed & 0x0F) as u32 + 1;
    let mut state = (seed as u32).wrapping_mul(0x9E37_79B9) | 1;
    move || {
        if seed == 0 {
            return usize::MAX;
        }
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (1 + state % max) as usize
    }
}

/// Walks `stream` in chunks whose sizes come from `next_size`.
pub fn walk_in_chunks(stream: &[u8], mut next_size: impl FnMut() -> usize) -> Walker {
    let mut walker = Walker::new();
    let mut rest = stream;
    while !rest.is_empty() {
        let n = next_size().clamp(1, rest.len());
        walker.feed(&rest[..n]);
        rest = &rest[n..];
    }
    walker
}

/// The fuzz entry point (also run over the seed corpus by `cargo test`): byte 0 picks chunk
/// sizes, the rest is the stream. Panics on any invariant violation.
pub fn check_input(data: &[u8]) -> Walker {
    let Some((&seed, stream)) = data.split_first() else {
        return Walker::new();
    };
    let chunked = walk_in_chunks(stream, chunk_sizes(seed));
    let whole = walk_in_chunks(stream, || usize::MAX);
    assert_eq!(
        chunked.frames, whole.frames,
        "chunking changed the frames found"
    );
    assert_eq!(
        chunked.end(),
        whole.end(),
        "chunking changed where the walk stopped"
    );
    assert_eq!(chunked.tracker, whole.tracker);
    assert_eq!(chunked.messages, whole.messages);
    let end = whole.end();
    match end {
        WalkEnd::Invalid { offset, .. } => assert!(offset < stream.len() as u64),
        _ => assert_eq!(whole.consumed(), stream.len() as u64, "walk ended {end:?}"),
    }
    // Frames are contiguous: each starts where the previous one's payload ended.
    let mut next = 0u64;
    for f in &whole.frames {
        assert_eq!(f.offset, next, "frame boundary gap or overlap");
        next = f.offset.saturating_add(f.header.wire_len());
    }
    whole
}
