//! A function instance that stops reading, and a client that floods it: the slow-reader check
//! `deploy/lts/run-lts.sh` runs on kernels the test suite does not run on (the suite's own
//! case is `proxy/tests/zero_hop.rs`). Plain blocking sockets: nothing here is measured.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use crate::ws::{
    self, Decoder, OPCODE_BINARY, OPCODE_CLOSE, OPCODE_CONTINUATION, OPCODE_TEXT, Piece,
};

/// Payload bytes of each flood frame.
const FLOOD_FRAME: usize = 64 * 1024;
/// Past this the flood stops: the client was never held back.
const FLOOD_LIMIT: u64 = 64 * 1024 * 1024;
/// A write that makes no progress for this long means the client is held back.
const HELD_AFTER: Duration = Duration::from_secs(1);
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// FNV-1a (64-bit) of the binary payload bytes, in order: a lost, repeated or reordered byte
/// changes it.
struct Digest(u64);

impl Digest {
    fn new() -> Digest {
        Digest(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// What the instance answers to the text "end": the binary bytes it read and their digest.
fn answer(bytes: u64, digest: &Digest) -> String {
    format!("{bytes} {:016x}", digest.0)
}

/// Serves WebSocket connections that read nothing until `go` exists, then read every frame,
/// digest the binary payloads, answer the text "end" with [`answer`] and a close with a close.
pub fn run_hold_instance(listen: SocketAddr, go: &Path) -> io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    println!("hold instance listening on {}", listener.local_addr()?);
    serve_hold_instance(listener, go)
}

/// [`run_hold_instance`] on a bound listener.
pub fn serve_hold_instance(listener: TcpListener, go: &Path) -> io::Result<()> {
    for stream in listener.incoming() {
        let (stream, go) = (stream?, go.to_path_buf());
        std::thread::spawn(move || {
            if let Err(e) = serve_held(stream, &go) {
                eprintln!("hold instance: {e}");
            }
        });
    }
    Ok(())
}

fn serve_held(mut s: TcpStream, go: &Path) -> io::Result<()> {
    let (mut buf, head_end, have) = read_head(&mut s)?;
    let mut response = Vec::new();
    if !ws::server_response(&buf[..head_end], &mut response) {
        return Err(io::Error::other("not a WebSocket upgrade"));
    }
    s.write_all(&response)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !go.exists() {
        if Instant::now() > deadline {
            return Err(io::Error::other("never told to read"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut reader = Reader::default();
    let mut leftover = buf[head_end..have].to_vec();
    loop {
        let reply = if leftover.is_empty() {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            reader.feed(&mut buf[..n])?
        } else {
            reader.feed(&mut std::mem::take(&mut leftover))?
        };
        if let Some((opcode, payload)) = reply {
            let mut out = Vec::new();
            ws::write_frame(&mut out, opcode, None, &payload);
            s.write_all(&out)?;
            if opcode == OPCODE_CLOSE {
                return Ok(());
            }
        }
    }
}

/// The held instance's reading side.
struct Reader {
    decoder: Decoder,
    digest: Digest,
    bytes: u64,
    /// Opcode of the message being read (continuations keep it).
    opcode: u8,
    /// Payload of a text or control frame.
    small: Vec<u8>,
}

impl Default for Reader {
    fn default() -> Reader {
        Reader {
            decoder: Decoder::default(),
            digest: Digest::new(),
            bytes: 0,
            opcode: 0,
            small: Vec::new(),
        }
    }
}

impl Reader {
    /// Takes `data`; returns a frame to send back when one is due.
    fn feed(&mut self, mut data: &mut [u8]) -> io::Result<Option<(u8, Vec<u8>)>> {
        let mut reply = None;
        while let Some(piece) = self
            .decoder
            .next(&mut data)
            .map_err(|e| io::Error::other(format!("bad frame: {e:?}")))?
        {
            match piece {
                Piece::Header(h) if h.opcode != OPCODE_CONTINUATION => self.opcode = h.opcode,
                Piece::Header(_) => {}
                Piece::Payload(p) if self.opcode == OPCODE_BINARY => {
                    self.digest.update(p);
                    self.bytes += p.len() as u64;
                }
                Piece::Payload(p) => self.small.extend_from_slice(p),
                Piece::End(h) => {
                    if h.opcode == OPCODE_CLOSE {
                        let code = self.small.get(..2).unwrap_or_default().to_vec();
                        return Ok(Some((OPCODE_CLOSE, code)));
                    }
                    if self.opcode == OPCODE_TEXT && h.fin && self.small == b"end" {
                        reply = Some((OPCODE_TEXT, answer(self.bytes, &self.digest).into_bytes()));
                    }
                    if h.fin {
                        self.small.clear();
                    }
                }
            }
        }
        Ok(reply)
    }
}

/// Reads an HTTP head; returns the buffer, where the head ends and how many bytes were read.
fn read_head(s: &mut TcpStream) -> io::Result<(Vec<u8>, usize, usize)> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut have = 0;
    loop {
        let n = s.read(&mut buf[have..])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        have += n;
        if let Some(end) = ws::head_end(&buf[..have]) {
            return Ok((buf, end, have));
        }
        if have >= ws::MAX_HANDSHAKE {
            return Err(io::Error::other("HTTP head too large"));
        }
    }
}

/// How a flood went.
#[derive(Debug, serde::Serialize)]
pub struct FloodReport {
    /// Bytes the client got rid of before a write made no progress for a second.
    pub held_after: u64,
    /// What the instance answered, and what it should have.
    pub answer: String,
    pub expected: String,
    pub ok: bool,
}

/// Floods `path` at `addr` with 64 KiB binary frames until the client is held back (a write
/// makes no progress for a second), creates `go` so the instance reads, finishes, sends the
/// text "end" and compares the instance's answer with what it sent.
pub fn run_flood(addr: SocketAddr, path: &str, go: &Path) -> io::Result<FloodReport> {
    let mut s = TcpStream::connect(addr)?;
    let mut request = Vec::new();
    ws::client_request(&mut request, &addr.to_string(), path, KEY);
    s.write_all(&request)?;
    let (buf, head_end, have) = read_head(&mut s)?;
    ws::check_response(&buf[..head_end], &ws::accept_key(KEY.as_bytes()))
        .map_err(io::Error::other)?;
    if have > head_end {
        return Err(io::Error::other("the instance wrote before it was asked"));
    }
    let mut digest = Digest::new();
    let (mut bytes, mut pushed, mut frames) = (0u64, 0u64, 0u32);
    let (mut frame, mut at) = (Vec::new(), 0);
    s.set_write_timeout(Some(HELD_AFTER))?;
    let started = Instant::now();
    loop {
        if at == frame.len() {
            let payload: Vec<u8> = (0..FLOOD_FRAME as u32)
                .map(|i| (i.wrapping_mul(31).wrapping_add(frames.wrapping_mul(7)) % 251) as u8)
                .collect();
            digest.update(&payload);
            bytes += payload.len() as u64;
            frame.clear();
            ws::write_frame(&mut frame, OPCODE_BINARY, Some([1, 2, 3, 4]), &payload);
            at = 0;
            frames += 1;
        }
        match s.write(&frame[at..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                at += n;
                pushed += n as u64;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) => return Err(e),
        }
        if pushed > FLOOD_LIMIT || started.elapsed() > Duration::from_secs(30) {
            return Err(io::Error::other(format!(
                "never held back: {pushed} bytes pushed into an instance that does not read"
            )));
        }
    }
    let held_after = pushed;
    std::fs::File::create(go)?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(&frame[at..])?;
    let mut end = Vec::new();
    ws::write_frame(&mut end, OPCODE_TEXT, Some([5, 6, 7, 8]), b"end");
    s.write_all(&end)?;
    let answer = read_text(&mut s)?;
    let mut close = Vec::new();
    ws::write_frame(
        &mut close,
        OPCODE_CLOSE,
        Some([9, 9, 9, 9]),
        &1000u16.to_be_bytes(),
    );
    s.write_all(&close)?;
    let expected = self::answer(bytes, &digest);
    Ok(FloodReport {
        held_after,
        ok: answer == expected,
        answer,
        expected,
    })
}

/// Reads frames until a text message; returns it.
fn read_text(s: &mut TcpStream) -> io::Result<String> {
    let (mut decoder, mut text, mut buf) = (Decoder::default(), Vec::new(), vec![0u8; 4096]);
    let mut opcode = 0;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::other("the connection ended before the answer"));
        }
        let mut data = &mut buf[..n];
        while let Some(piece) = decoder
            .next(&mut data)
            .map_err(|e| io::Error::other(format!("bad frame: {e:?}")))?
        {
            match piece {
                Piece::Header(h) => opcode = h.opcode,
                Piece::Payload(p) if opcode == OPCODE_TEXT => text.extend_from_slice(p),
                Piece::Payload(_) => {}
                Piece::End(h) if opcode == OPCODE_TEXT && h.fin => {
                    return String::from_utf8(text).map_err(io::Error::other);
                }
                Piece::End(h) if h.opcode == OPCODE_CLOSE => {
                    return Err(io::Error::other("closed instead of answering"));
                }
                Piece::End(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(parts: &[&[u8]]) -> u64 {
        let mut d = Digest::new();
        parts.iter().for_each(|p| d.update(p));
        d.0
    }

    #[test]
    fn the_digest_changes_with_a_lost_repeated_or_reordered_byte() {
        let sent = digest_of(&[b"abc", b"def"]);
        assert_eq!(
            sent,
            digest_of(&[b"abcd", b"ef"]),
            "chunking does not matter"
        );
        assert_ne!(sent, digest_of(&[b"abc", b"ef"]));
        assert_ne!(sent, digest_of(&[b"abc", b"ddef"]));
        assert_ne!(sent, digest_of(&[b"abc", b"edf"]));
    }
}
