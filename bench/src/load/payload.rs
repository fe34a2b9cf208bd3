//! The timestamped frames edge and bulk send, built without per-message allocation.

use crate::sys::Rng;
use crate::ws;

/// Frames for edge and bulk: an 8-byte send timestamp followed by filler. The filler is
/// pre-masked under a small rotating set of random keys, so each send only masks 8 bytes
/// and copies nothing, yet every frame is genuinely masked.
pub struct Payloads {
    keys: Vec<[u8; 4]>,
    bodies: Vec<Vec<u8>>,
    size: usize,
    next: usize,
    head: [u8; 22],
}

impl Payloads {
    /// `size` is at least 8 (the timestamp).
    pub fn new(size: usize, rng: &mut Rng) -> Payloads {
        let size = size.max(8);
        let filler: Vec<u8> = (0..size - 8).map(|i| b'a' + (i % 26) as u8).collect();
        let keys: Vec<[u8; 4]> = (0..16).map(|_| rng.mask()).collect();
        let bodies = keys
            .iter()
            .map(|&k| {
                let mut b = filler.clone();
                // The filler starts 8 bytes into the payload, a multiple of 4.
                ws::apply_mask(&mut b, k, 8);
                b
            })
            .collect();
        Payloads {
            keys,
            bodies,
            size,
            next: 0,
            head: [0; 22],
        }
    }

    /// Header plus masked timestamp, and the pre-masked filler, for a frame sent at `ts_ns`.
    pub fn frame(&mut self, ts_ns: u64) -> [&[u8]; 2] {
        let k = self.next;
        self.next = (k + 1) % self.keys.len();
        let key = self.keys[k];
        let mut hdr = [0u8; 14];
        let n = ws::encode_header(
            &mut hdr,
            true,
            ws::OPCODE_BINARY,
            Some(key),
            self.size as u64,
        );
        self.head[..n].copy_from_slice(&hdr[..n]);
        let mut ts = ts_ns.to_le_bytes();
        ws::apply_mask(&mut ts, key, 0);
        self.head[n..n + 8].copy_from_slice(&ts);
        [&self.head[..n + 8], &self.bodies[k]]
    }
}

/// The send timestamp embedded in an echoed payload.
pub fn timestamp(prefix: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(prefix.get(..8)?.try_into().ok()?))
}
