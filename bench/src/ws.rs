//! WebSocket wire helpers shared by the echo server and the load generator.
//!
//! Frame boundaries come from `proxy_common::frame`, the same parser the proxy uses, so the
//! benchmark exercises exactly the framing rules the data plane enforces. The decoder streams
//! payloads instead of buffering whole frames: a connection costs a few dozen bytes of state
//! no matter how large its messages are.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use proxy_common::frame::{
    FrameHeader, HeaderError, HeaderParse, MAX_HEADER_LEN, parse_header, window_of,
};
use sha1::{Digest, Sha1};

pub use proxy_common::frame::{
    OPCODE_BINARY, OPCODE_CLOSE, OPCODE_CONTINUATION, OPCODE_PING, OPCODE_PONG, OPCODE_TEXT,
};

const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Upper bound on an HTTP upgrade request or response head.
pub const MAX_HANDSHAKE: usize = 16 * 1024;
/// Length of a base64-encoded SHA-1 digest, i.e. of `Sec-WebSocket-Accept`.
pub const ACCEPT_LEN: usize = 28;

/// `Sec-WebSocket-Accept` for a (base64) `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> [u8; ACCEPT_LEN] {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(ACCEPT_GUID);
    let mut out = [0u8; ACCEPT_LEN];
    let n = STANDARD
        .encode_slice(sha.finalize(), &mut out)
        .expect("28 bytes hold a base64 SHA-1");
    debug_assert_eq!(n, ACCEPT_LEN);
    out
}

/// Offset just past the `\r\n\r\n` ending an HTTP head, if it has arrived.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Case-insensitive header lookup in a raw HTTP head (the first line is skipped).
pub fn header<'a>(head: &'a [u8], name: &str) -> Option<&'a [u8]> {
    head.split(|&b| b == b'\n').skip(1).find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        line[..colon]
            .eq_ignore_ascii_case(name.as_bytes())
            .then(|| line[colon + 1..].trim_ascii())
    })
}

/// The request target of an HTTP request head (`/push?rate=10` in `GET /push?rate=10 HTTP/1.1`).
pub fn request_target(head: &[u8]) -> Option<&[u8]> {
    let line = head.split(|&b| b == b'\n').next()?;
    line.split(|&b| b == b' ').nth(1)
}

/// Writes the server's answer to an upgrade request; false means "refused, close after it".
pub fn server_response(head: &[u8], out: &mut Vec<u8>) -> bool {
    match header(head, "sec-websocket-key") {
        Some(key) if head.starts_with(b"GET ") => {
            out.extend_from_slice(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                  Connection: Upgrade\r\nSec-WebSocket-Accept: ",
            );
            out.extend_from_slice(&accept_key(key));
            out.extend_from_slice(b"\r\n\r\n");
            true
        }
        _ => {
            bad_request(out);
            false
        }
    }
}

/// A 400 answer to a request the server refuses; the connection closes after it.
pub fn bad_request(out: &mut Vec<u8>) {
    out.extend_from_slice(
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
}

pub fn client_request(out: &mut Vec<u8>, host: &str, path: &str, key: &str) {
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(
        b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Key: ",
    );
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
}

/// Checks a server's upgrade response head against the accept value we expect.
pub fn check_response(head: &[u8], accept: &[u8]) -> Result<(), &'static str> {
    if !head.starts_with(b"HTTP/1.1 101") {
        return Err("status is not 101");
    }
    if !header(head, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case(b"websocket")) {
        return Err("missing Upgrade: websocket");
    }
    if header(head, "sec-websocket-accept") != Some(accept) {
        return Err("wrong Sec-WebSocket-Accept");
    }
    Ok(())
}

/// Encodes a frame header into `buf`; returns its length.
pub fn encode_header(
    buf: &mut [u8; MAX_HEADER_LEN],
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
) -> usize {
    buf[0] = (fin as u8) << 7 | (opcode & 0x0F);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut at = 2;
    if len < 126 {
        buf[1] = mask_bit | len as u8;
    } else if len <= u16::MAX as u64 {
        buf[1] = mask_bit | 126;
        buf[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        at = 4;
    } else {
        buf[1] = mask_bit | 127;
        buf[2..10].copy_from_slice(&len.to_be_bytes());
        at = 10;
    }
    if let Some(m) = mask {
        buf[at..at + 4].copy_from_slice(&m);
        at += 4;
    }
    at
}

pub fn write_header(out: &mut Vec<u8>, fin: bool, opcode: u8, mask: Option<[u8; 4]>, len: u64) {
    let mut buf = [0u8; MAX_HEADER_LEN];
    let n = encode_header(&mut buf, fin, opcode, mask, len);
    out.extend_from_slice(&buf[..n]);
}

/// Appends a whole final frame, masking the payload copy when `mask` is set.
pub fn write_frame(out: &mut Vec<u8>, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) {
    write_header(out, true, opcode, mask, payload.len() as u64);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(m) = mask {
        apply_mask(&mut out[start..], m, 0);
    }
}

/// XORs `buf` with `mask`, where `buf` starts `offset` bytes into the payload.
/// Works a word at a time: bulk workloads mask megabytes per second.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: u64) {
    let r = (offset % 4) as usize;
    let m = [
        mask[r],
        mask[(r + 1) % 4],
        mask[(r + 2) % 4],
        mask[(r + 3) % 4],
    ];
    let word = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes((&*c).try_into().expect("8-byte chunk")) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i % 4];
    }
}

/// One step of decoding. Payload pieces are already unmasked (in place).
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    Header(FrameHeader),
    Payload(&'a [u8]),
    End(FrameHeader),
}

/// Streaming frame decoder: never holds more than a partial header.
#[derive(Default)]
pub struct Decoder {
    head: [u8; MAX_HEADER_LEN],
    head_len: u8,
    cur: Option<FrameHeader>,
    remaining: u64,
    offset: u64,
}

impl Decoder {
    /// Takes the next piece off the front of `data`; `Ok(None)` once `data` is used up.
    pub fn next<'a>(&mut self, data: &mut &'a mut [u8]) -> Result<Option<Piece<'a>>, HeaderError> {
        if let Some(h) = self.cur {
            if self.remaining == 0 {
                self.cur = None;
                return Ok(Some(Piece::End(h)));
            }
            if data.is_empty() {
                return Ok(None);
            }
            let n = (self.remaining.min(data.len() as u64)) as usize;
            let (chunk, rest) = std::mem::take(data).split_at_mut(n);
            *data = rest;
            if let Some(m) = h.mask {
                apply_mask(chunk, m, self.offset);
            }
            self.offset += n as u64;
            self.remaining -= n as u64;
            return Ok(Some(Piece::Payload(chunk)));
        }
        if data.is_empty() {
            return Ok(None);
        }
        let had = self.head_len as usize;
        let parsed = if had == 0 {
            let (window, avail) = window_of(data);
            parse_header(&window, avail)
        } else {
            let take = (MAX_HEADER_LEN - had).min(data.len());
            self.head[had..had + take].copy_from_slice(&data[..take]);
            parse_header(&self.head, had + take)
        };
        match parsed {
            HeaderParse::Invalid(e) => Err(e),
            HeaderParse::Incomplete { .. } => {
                // Incomplete means fewer than 14 bytes in total, so all of `data` fits.
                let n = data.len();
                self.head[had..had + n].copy_from_slice(data);
                self.head_len += n as u8;
                *data = &mut std::mem::take(data)[n..];
                Ok(None)
            }
            HeaderParse::Complete(h) => {
                let used = h.header_len as usize - had;
                *data = &mut std::mem::take(data)[used..];
                self.head_len = 0;
                self.cur = Some(h);
                self.remaining = h.payload_len;
                self.offset = 0;
                Ok(Some(Piece::Header(h)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_6455_accept_example() {
        assert_eq!(
            &accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn mask_is_offset_aware_and_involutive() {
        let mask = [1, 2, 3, 4];
        let plain: Vec<u8> = (0..37u8).collect();
        let mut whole = plain.clone();
        apply_mask(&mut whole, mask, 0);
        let mut split = plain.clone();
        let (a, b) = split.split_at_mut(11);
        apply_mask(a, mask, 0);
        apply_mask(b, mask, 11);
        assert_eq!(whole, split);
        assert!(
            whole
                .iter()
                .enumerate()
                .all(|(i, &x)| x == plain[i] ^ mask[i % 4])
        );
    }

    #[test]
    fn decoder_handles_any_split() {
        let payload: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let mut wire = Vec::new();
        write_frame(&mut wire, OPCODE_BINARY, Some([9, 8, 7, 6]), &payload);
        write_frame(&mut wire, OPCODE_PING, None, b"hi");
        for cut in 0..wire.len() {
            let mut bytes = wire.clone();
            let (a, b) = bytes.split_at_mut(cut);
            let mut dec = Decoder::default();
            let (mut got, mut ends) = (Vec::new(), Vec::new());
            for part in [a, b] {
                let mut rest: &mut [u8] = part;
                while let Some(p) = dec.next(&mut rest).unwrap() {
                    match p {
                        Piece::Payload(c) => got.extend_from_slice(c),
                        Piece::End(h) => ends.push(h.opcode),
                        Piece::Header(_) => {}
                    }
                }
            }
            assert_eq!(ends, [OPCODE_BINARY, OPCODE_PING], "cut {cut}");
            assert_eq!(&got[..300], &payload[..]);
            assert_eq!(&got[300..], b"hi");
        }
    }

    #[test]
    fn response_check() {
        let mut out = Vec::new();
        let req =
            b"GET / HTTP/1.1\r\nHost: x\r\nSEC-WEBSOCKET-KEY: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        assert!(server_response(req, &mut out));
        assert_eq!(
            check_response(&out, b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            Ok(())
        );
        assert!(check_response(&out, b"s3pPLMBiTxaQ9kYGzzhZRbK+xOX=").is_err());
        assert_eq!(request_target(req), Some(&b"/"[..]));
        assert_eq!(
            request_target(b"GET /push?rate=10 HTTP/1.1\r\n\r\n"),
            Some(&b"/push?rate=10"[..])
        );
    }
}
