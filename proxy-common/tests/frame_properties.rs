//! Property tests for the frame-header parser (`proxy_common::frame`) and message accounting
//! (`proxy_common::message`). Frames are written by an encoder in the test harness
//! (`fuzz/fuzz_targets/walk.rs`, shared with the fuzz target), written from RFC 6455 5.2
//! independently of the parser.

#[path = "../fuzz/fuzz_targets/walk.rs"]
mod walk;

use proptest::prelude::*;
use proxy_common::frame::{
    FrameHeader, HeaderError, HeaderParse, MAX_HEADER_LEN, OPCODE_BINARY, OPCODE_CLOSE,
    OPCODE_CONTINUATION, OPCODE_PING, OPCODE_PONG, OPCODE_TEXT, close_code, parse_header,
    window_of,
};
use proxy_common::message::FrameKind;
use walk::{LenEncoding, WalkEnd, check_parse, encode_header, walk_in_chunks};

/// Largest payload length a valid frame can declare (the 64-bit length's MSB must be 0).
const MAX_PAYLOAD: u64 = u64::MAX >> 1;

/// A frame header as the generator meant it.
#[derive(Clone, Copy, Debug)]
struct Spec {
    fin: bool,
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
    enc: LenEncoding,
}

impl Spec {
    fn encode(&self) -> Vec<u8> {
        encode_header(
            self.fin,
            self.rsv,
            self.opcode,
            self.mask,
            self.len,
            self.enc,
        )
    }

    /// Header length computed from the spec alone: 2 + extended length + mask key.
    fn header_len(&self) -> u8 {
        let ext = match self.enc {
            LenEncoding::Bits7 => 0,
            LenEncoding::Bits16 => 2,
            LenEncoding::Bits64 => 8,
        };
        2 + ext + if self.mask.is_some() { 4 } else { 0 }
    }

    fn expected(&self) -> FrameHeader {
        FrameHeader {
            fin: self.fin,
            rsv: self.rsv,
            opcode: self.opcode,
            mask: self.mask,
            header_len: self.header_len(),
            payload_len: self.len,
        }
    }
}

fn minimal(len: u64) -> (u64, LenEncoding) {
    (len, LenEncoding::minimal(len))
}

/// Data-frame payload lengths across all three encodings, their edges, and non-minimal
/// encodings (a short length written in 16 or 64 bits, a 16-bit one written in 64 bits).
fn data_len() -> impl Strategy<Value = (u64, LenEncoding)> {
    prop_oneof![
        4 => (0..=125u64).prop_map(minimal),
        3 => (126..=0xFFFFu64).prop_map(minimal),
        3 => (0x1_0000..=MAX_PAYLOAD).prop_map(minimal),
        2 => prop::sample::select(vec![0, 125, 126, 0xFFFF, 0x1_0000, MAX_PAYLOAD]).prop_map(minimal),
        1 => (0..=125u64).prop_map(|len| (len, LenEncoding::Bits16)),
        1 => (0..=0xFFFFu64).prop_map(|len| (len, LenEncoding::Bits64)),
    ]
}

/// Control-frame payload lengths: at most 125, usually in 7 bits, sometimes non-minimal.
fn control_len() -> impl Strategy<Value = (u64, LenEncoding)> {
    (
        0..=125u64,
        prop::sample::select(vec![
            LenEncoding::Bits7,
            LenEncoding::Bits7,
            LenEncoding::Bits7,
            LenEncoding::Bits16,
            LenEncoding::Bits64,
        ]),
    )
}

fn mask() -> impl Strategy<Value = Option<[u8; 4]>> {
    prop::option::of(any::<[u8; 4]>())
}

/// Any valid frame header: data frames with any FIN, control frames with FIN and <= 125 bytes.
fn valid_spec() -> impl Strategy<Value = Spec> {
    let data = (
        any::<bool>(),
        0..=7u8,
        prop::sample::select(vec![OPCODE_CONTINUATION, OPCODE_TEXT, OPCODE_BINARY]),
        mask(),
        data_len(),
    )
        .prop_map(|(fin, rsv, opcode, mask, (len, enc))| Spec {
            fin,
            rsv,
            opcode,
            mask,
            len,
            enc,
        });
    let control = (
        0..=7u8,
        prop::sample::select(vec![OPCODE_CLOSE, OPCODE_PING, OPCODE_PONG]),
        mask(),
        control_len(),
    )
        .prop_map(|(rsv, opcode, mask, (len, enc))| Spec {
            fin: true,
            rsv,
            opcode,
            mask,
            len,
            enc,
        });
    prop_oneof![3 => data, 1 => control]
}

/// `bytes` in a window, then `garbage` in the window's remaining slots.
fn window_with_garbage(bytes: &[u8], garbage: [u8; MAX_HEADER_LEN]) -> [u8; MAX_HEADER_LEN] {
    let mut window = garbage;
    let n = bytes.len().min(MAX_HEADER_LEN);
    window[..n].copy_from_slice(&bytes[..n]);
    window
}

fn parse(bytes: &[u8]) -> HeaderParse {
    let (window, avail) = window_of(bytes);
    parse_header(&window, avail)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// (a) Encode any valid header, parse it: every field and header_len come back unchanged.
    #[test]
    fn encoded_header_parses_back_to_the_same_fields_and_length(spec in valid_spec()) {
        let wire = spec.encode();
        prop_assert_eq!(wire.len(), spec.header_len() as usize);
        prop_assert_eq!(parse(&wire), HeaderParse::Complete(spec.expected()));
    }

    /// (b) Every proper prefix of a header is Incomplete, asking for the whole header once
    /// byte 1 is there (2 before that); the window's bytes at or past `avail` are never read.
    #[test]
    fn every_proper_prefix_is_incomplete_with_the_full_header_len(
        spec in valid_spec(),
        garbage in any::<[u8; MAX_HEADER_LEN]>(),
    ) {
        let wire = spec.encode();
        for avail in 0..wire.len() {
            let window = window_with_garbage(&wire[..avail], garbage);
            let want = if avail < 2 { 2 } else { wire.len() as u8 };
            prop_assert_eq!(
                parse_header(&window, avail),
                HeaderParse::Incomplete { header_len: want },
                "prefix of {} bytes of {:02x?}", avail, wire
            );
        }
    }

    /// (b') Once the header is complete, more available bytes and whatever follows the header
    /// in the window (payload, the next frame) do not change the result.
    #[test]
    fn bytes_after_a_complete_header_do_not_change_the_parse(
        spec in valid_spec(),
        garbage in any::<[u8; MAX_HEADER_LEN]>(),
        extra in 0..=64usize,
    ) {
        let wire = spec.encode();
        let window = window_with_garbage(&wire, garbage);
        prop_assert_eq!(
            parse_header(&window, wire.len() + extra),
            HeaderParse::Complete(spec.expected())
        );
    }

    /// (e) close_code removes exactly the masking the encoder applied to the status code.
    #[test]
    fn close_code_undoes_the_encoders_masking(
        code in any::<u16>(),
        mask in mask(),
        reason in prop::collection::vec(any::<u8>(), 0..=123),
    ) {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(&reason);
        let wire = encode_frame(true, 0, OPCODE_CLOSE, mask, LenEncoding::Bits7, &payload);
        let HeaderParse::Complete(h) = parse(&wire) else {
            return Err(TestCaseError::fail(format!("close frame not parsed: {wire:02x?}")));
        };
        prop_assert_eq!(h.mask, mask);
        prop_assert_eq!(h.payload_len, payload.len() as u64);
        let at = h.header_len as usize;
        prop_assert_eq!(close_code([wire[at], wire[at + 1]], h.mask), code);
    }

    /// Headers with exactly one defect are Invalid with the error that names it.
    #[test]
    fn header_with_one_defect_is_invalid_with_that_error(
        (spec, error) in defective_spec(),
        garbage in any::<[u8; MAX_HEADER_LEN]>(),
        extra in 0..=16usize,
    ) {
        let wire = spec.encode();
        let window = window_with_garbage(&wire, garbage);
        prop_assert_eq!(parse_header(&window, wire.len() + extra), HeaderParse::Invalid(error));
    }
}

/// A header with one thing wrong, and the error the parser must report for it.
fn defective_spec() -> impl Strategy<Value = (Spec, HeaderError)> {
    let reserved_data = (any::<bool>(), 0..=7u8, 0x3..=0x7u8, mask(), data_len()).prop_map(
        |(fin, rsv, opcode, mask, (len, enc))| Spec {
            fin,
            rsv,
            opcode,
            mask,
            len,
            enc,
        },
    );
    let reserved_control = (0..=7u8, 0xB..=0xFu8, mask(), control_len()).prop_map(
        |(rsv, opcode, mask, (len, enc))| Spec {
            fin: true,
            rsv,
            opcode,
            mask,
            len,
            enc,
        },
    );
    let overflow = (
        any::<bool>(),
        prop::sample::select(vec![OPCODE_CONTINUATION, OPCODE_TEXT, OPCODE_BINARY]),
        mask(),
        (MAX_PAYLOAD + 1)..=u64::MAX,
    )
        .prop_map(|(fin, opcode, mask, len)| Spec {
            fin,
            rsv: 0,
            opcode,
            mask,
            len,
            enc: LenEncoding::Bits64,
        });
    let control_opcode = prop::sample::select(vec![OPCODE_CLOSE, OPCODE_PING, OPCODE_PONG]);
    let control_without_fin =
        (control_opcode.clone(), mask(), control_len()).prop_map(|(opcode, mask, (len, enc))| {
            Spec {
                fin: false,
                rsv: 0,
                opcode,
                mask,
                len,
                enc,
            }
        });
    let too_long = prop_oneof![
        Just(126u64),
        Just(127),
        126..=0xFFFFu64,
        0x1_0000..=MAX_PAYLOAD
    ];
    let control_too_long = (control_opcode, mask(), too_long.prop_map(minimal)).prop_map(
        |(opcode, mask, (len, enc))| Spec {
            fin: true,
            rsv: 0,
            opcode,
            mask,
            len,
            enc,
        },
    );
    prop_oneof![
        reserved_data.prop_map(|s| (s, HeaderError::ReservedOpcode)),
        reserved_control.prop_map(|s| (s, HeaderError::ReservedOpcode)),
        overflow.prop_map(|s| (s, HeaderError::LengthOverflow)),
        control_without_fin.prop_map(|s| (s, HeaderError::BadControlFrame)),
        control_too_long.prop_map(|s| (s, HeaderError::BadControlFrame)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// (c) Any 14 bytes with any `avail` in 0..=64: no panic; a Complete header fits in what is
    /// available, has a legal length and wire_len = header_len + payload_len. The harness's
    /// `check_parse` adds the rest (control-frame rules, re-encoding, Incomplete > avail, ...).
    #[test]
    fn arbitrary_window_never_panics_and_complete_headers_are_consistent(
        window in any::<[u8; MAX_HEADER_LEN]>(),
        avail in 0..=64usize,
    ) {
        let result = parse_header(&window, avail);
        if let HeaderParse::Complete(h) = result {
            prop_assert!(h.header_len as usize <= avail.min(MAX_HEADER_LEN));
            prop_assert!([2, 4, 6, 8, 10, 14].contains(&h.header_len));
            prop_assert_eq!(h.wire_len(), h.header_len as u64 + h.payload_len);
        }
        check_parse(&window, avail, &result);
    }
}

// ---- (d) whole streams ----

/// Fills a payload with bytes from a seeded xorshift generator (cheaper than a byte strategy).
fn payload_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Encodes a whole frame; the payload is masked with the key as RFC 6455 5.3 says.
fn encode_frame(
    fin: bool,
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    enc: LenEncoding,
    payload: &[u8],
) -> Vec<u8> {
    let mut wire = encode_header(fin, rsv, opcode, mask, payload.len() as u64, enc);
    let key = mask.unwrap_or([0; 4]);
    wire.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    wire
}

/// How a generated frame is put on the wire (everything but FIN and opcode).
#[derive(Clone, Debug)]
struct Wire {
    rsv: u8,
    mask: Option<[u8; 4]>,
    /// 0: minimal length encoding, 1: 16 bits if it fits, 2: 64 bits.
    enc: u8,
    len: usize,
    seed: u64,
}

fn wire(len: impl Strategy<Value = usize>) -> impl Strategy<Value = Wire> {
    (
        0..=7u8,
        mask(),
        prop_oneof![6 => Just(0u8), 1 => Just(1), 1 => Just(2)],
        len,
        any::<u64>(),
    )
        .prop_map(|(rsv, mask, enc, len, seed)| Wire {
            rsv,
            mask,
            enc,
            len,
            seed,
        })
}

#[derive(Clone, Debug)]
enum Control {
    Ping(Wire),
    Pong(Wire),
    Close { code: u16, wire: Wire },
}

fn control() -> impl Strategy<Value = Control> {
    prop_oneof![
        wire(0..=125usize).prop_map(Control::Ping),
        wire(0..=125usize).prop_map(Control::Pong),
        (any::<u16>(), wire(2..=125usize)).prop_map(|(code, wire)| Control::Close { code, wire }),
    ]
}

/// One message: its opcode, and per fragment how it is sent plus the control frames that
/// follow it.
#[derive(Clone, Debug)]
struct Message {
    opcode: u8,
    fragments: Vec<(Wire, Vec<Control>)>,
}

#[derive(Clone, Debug)]
enum Item {
    Message(Message),
    Control(Control),
}

fn data_payload_len() -> impl Strategy<Value = usize> {
    prop_oneof![12 => 0..=40usize, 4 => 100..=400usize, 1 => 65_530..=65_600usize]
}

fn item() -> impl Strategy<Value = Item> {
    let fragment = (
        wire(data_payload_len()),
        prop::collection::vec(control(), 0..=2),
    );
    let message = (
        prop::sample::select(vec![OPCODE_TEXT, OPCODE_BINARY]),
        prop::collection::vec(fragment, 1..=4),
    )
        .prop_map(|(opcode, fragments)| Item::Message(Message { opcode, fragments }));
    prop_oneof![4 => message, 1 => control().prop_map(Item::Control)]
}

/// The generated stream and everything a walker must find in it.
#[derive(Default)]
struct Expected {
    stream: Vec<u8>,
    /// Offset, header and classification of every frame.
    frames: Vec<(u64, FrameHeader, FrameKind)>,
    /// Payload size of each message, in order.
    messages: Vec<u64>,
    /// Frame offset and status code of each close frame.
    close_codes: Vec<(u64, u16)>,
}

impl Expected {
    fn push(&mut self, fin: bool, opcode: u8, w: &Wire, kind: FrameKind, close: Option<u16>) {
        let mut payload = payload_bytes(w.len, w.seed);
        if let Some(code) = close {
            payload[..2].copy_from_slice(&code.to_be_bytes());
        }
        let len = payload.len() as u64;
        let enc = match w.enc {
            1 if len <= 0xFFFF => LenEncoding::Bits16,
            2 => LenEncoding::Bits64,
            _ => LenEncoding::minimal(len),
        };
        let offset = self.stream.len() as u64;
        let spec = Spec {
            fin,
            rsv: w.rsv,
            opcode,
            mask: w.mask,
            len,
            enc,
        };
        self.stream
            .extend(encode_frame(fin, w.rsv, opcode, w.mask, enc, &payload));
        self.frames.push((offset, spec.expected(), kind));
        if let Some(code) = close {
            self.close_codes.push((offset, code));
        }
    }

    fn push_control(&mut self, c: &Control) {
        match c {
            Control::Ping(w) => self.push(true, OPCODE_PING, w, FrameKind::Control, None),
            Control::Pong(w) => self.push(true, OPCODE_PONG, w, FrameKind::Control, None),
            Control::Close { code, wire } => {
                self.push(true, OPCODE_CLOSE, wire, FrameKind::Close, Some(*code))
            }
        }
    }

    fn build(items: &[Item]) -> Self {
        let mut e = Self::default();
        for item in items {
            match item {
                Item::Control(c) => e.push_control(c),
                Item::Message(m) => {
                    let last = m.fragments.len() - 1;
                    for (i, (w, controls)) in m.fragments.iter().enumerate() {
                        let opcode = if i == 0 {
                            m.opcode
                        } else {
                            OPCODE_CONTINUATION
                        };
                        let kind = if i == last {
                            FrameKind::MessageEnd
                        } else {
                            FrameKind::DataPartial
                        };
                        e.push(i == last, opcode, w, kind, None);
                        for c in controls {
                            e.push_control(c);
                        }
                    }
                    e.messages
                        .push(m.fragments.iter().map(|(w, _)| w.len as u64).sum());
                }
            }
        }
        e
    }
}

/// Chunk sizes a socket might hand over: mostly small (splitting headers), sometimes large.
fn chunk_plan() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![4 => 1..=20usize, 1 => 64..=4096usize], 1..=16)
}

/// Feeds `stream` in chunks whose sizes cycle through `plan`.
fn walk_with_plan(stream: &[u8], plan: &[usize]) -> walk::Walker {
    let mut sizes = plan.iter().copied().cycle();
    walk_in_chunks(stream, move || sizes.next().unwrap_or(1))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// (d) A random conversation (fragmented and whole messages, control frames interleaved
    /// between fragments, random payload bytes) fed in random chunk sizes: the walk finds
    /// exactly the frames that were written, at their offsets, ends on a frame boundary, and
    /// MessageTracker counts the same messages with the same sizes. Close codes read back
    /// from the found frames match the ones written (close_code on masked payloads).
    #[test]
    fn chunked_stream_walk_finds_every_frame_boundary_and_message(
        items in prop::collection::vec(item(), 0..=12),
        plan in chunk_plan(),
    ) {
        let e = Expected::build(&items);
        let w = walk_with_plan(&e.stream, &plan);
        let found: Vec<_> = w.frames.iter().map(|f| (f.offset, f.header, f.kind)).collect();
        prop_assert_eq!(&found, &e.frames);
        prop_assert_eq!(w.end(), WalkEnd::AtBoundary);
        prop_assert_eq!(&w.messages, &e.messages);
        prop_assert_eq!(w.tracker.in_message, 0);
        for &(offset, code) in &e.close_codes {
            let f = w.frames.iter().find(|f| f.offset == offset).expect("close frame found");
            let at = (offset + f.header.header_len as u64) as usize;
            prop_assert_eq!(close_code([e.stream[at], e.stream[at + 1]], f.header.mask), code);
        }
    }

    /// A stream cut at any byte: the walk reports exactly the frames whose headers lie before
    /// the cut, and says whether it stopped in a header, in a payload or on a boundary.
    #[test]
    fn stream_cut_anywhere_yields_the_frames_before_the_cut(
        items in prop::collection::vec(item(), 1..=6),
        plan in chunk_plan(),
        cut in any::<prop::sample::Index>(),
    ) {
        let e = Expected::build(&items);
        let cut = cut.index(e.stream.len() + 1);
        let w = walk_with_plan(&e.stream[..cut], &plan);
        let complete: Vec<_> = e
            .frames
            .iter()
            .filter(|(offset, h, _)| offset + h.header_len as u64 <= cut as u64)
            .copied()
            .collect();
        let found: Vec<_> = w.frames.iter().map(|f| (f.offset, f.header, f.kind)).collect();
        prop_assert_eq!(&found, &complete);
        let cut = cut as u64;
        let expected_end = match e.frames.iter().find(|(o, h, _)| *o <= cut && cut < o + h.wire_len()) {
            None => WalkEnd::AtBoundary,
            Some(&(o, _, _)) if cut == o => WalkEnd::AtBoundary,
            Some(&(o, h, _)) if cut < o + h.header_len as u64 => {
                WalkEnd::InHeader { have: (cut - o) as u8 }
            }
            Some(&(o, h, _)) => WalkEnd::InPayload { remaining: o + h.wire_len() - cut },
        };
        prop_assert_eq!(w.end(), expected_end);
    }

    /// Random sequences of text/binary/continuation/ping frames, in or out of order, are
    /// classified per RFC 6455 5.4 (the harness checks every MessageTracker step against its
    /// own model of the rules), however the stream is chunked.
    #[test]
    fn any_data_frame_order_is_classified_per_rfc_6455_5_4(
        frames in prop::collection::vec(
            (
                any::<bool>(),
                prop::sample::select(vec![OPCODE_CONTINUATION, OPCODE_TEXT, OPCODE_BINARY, OPCODE_PING]),
                mask(),
                0..=3usize,
            ),
            0..=24,
        ),
        chunk_seed in any::<u8>(),
    ) {
        let mut input = vec![chunk_seed];
        let mut out_of_sequence = 0;
        let mut open = false;
        for &(fin, opcode, mask, len) in &frames {
            let fin = fin || opcode == OPCODE_PING;
            input.extend(encode_frame(fin, 0, opcode, mask, LenEncoding::Bits7, &vec![0x5A; len]));
            if opcode != OPCODE_PING {
                if (opcode == OPCODE_CONTINUATION) != open {
                    out_of_sequence += 1;
                } else {
                    open = !fin;
                }
            }
        }
        let w = walk::check_input(&input);
        prop_assert_eq!(w.frames.len(), frames.len());
        let found = w.frames.iter().filter(|f| f.kind == FrameKind::OutOfSequence).count();
        prop_assert_eq!(found, out_of_sequence);
    }

    /// Random bytes pass the fuzz target's invariants (a cheap stand-in for the fuzzer in CI).
    #[test]
    fn random_bytes_pass_the_fuzz_invariants(
        data in prop::collection::vec(any::<u8>(), 0..=256),
    ) {
        walk::check_input(&data);
    }
}
