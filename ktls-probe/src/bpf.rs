//! Just enough of bpf(2) for the experiments: maps, hand-assembled programs, attach, update.
//!
//! The programs are a few instructions each, assembled here rather than built with aya-ebpf,
//! so that the probe is one small host binary with no eBPF toolchain and can be run on any
//! kernel as it is.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;

pub const MAP_ARRAY: u32 = 2;
pub const MAP_SOCKMAP: u32 = 15;
pub const MAP_SOCKHASH: u32 = 18;

const PROG_SK_SKB: u32 = 14;
const PROG_SK_MSG: u32 = 16;

const ATTACH_STREAM_PARSER: u32 = 4;
const ATTACH_STREAM_VERDICT: u32 = 5;
const ATTACH_MSG_VERDICT: u32 = 7;

const HELPER_MAP_LOOKUP: i32 = 1;
const HELPER_MAP_UPDATE: i32 = 2;
const HELPER_SKB_LOAD_BYTES: i32 = 26;
const HELPER_SK_REDIRECT_MAP: i32 = 52;
const HELPER_MSG_REDIRECT_MAP: i32 = 60;
const HELPER_MSG_REDIRECT_HASH: i32 = 71;
const HELPER_SK_REDIRECT_HASH: i32 = 72;

const SK_PASS: i32 = 1;

/// A zeroed `union bpf_attr`, larger than any field used here: the kernel only requires
/// that bytes past the ones it knows are zero.
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn call(&mut self, cmd: libc::c_long) -> io::Result<i64> {
        // SAFETY: bpf(2) with a pointer to our buffer and its size; every pointer stored in it
        // refers to memory that outlives the call.
        let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, self.0.as_mut_ptr(), self.0.len()) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }
}

fn fd_from(r: i64) -> OwnedFd {
    // SAFETY: a successful bpf(2) call that creates an object returns a new fd we own.
    unsafe { OwnedFd::from_raw_fd(r as RawFd) }
}

pub struct Map {
    pub fd: OwnedFd,
    pub kind: u32,
}

impl Map {
    pub fn new(kind: u32, value_size: u32, entries: u32) -> io::Result<Map> {
        let r = Attr::new()
            .u32(0, kind)
            .u32(4, 4)
            .u32(8, value_size)
            .u32(12, entries)
            .call(BPF_MAP_CREATE)?;
        Ok(Map {
            fd: fd_from(r),
            kind,
        })
    }

    pub fn sockets(kind: u32) -> io::Result<Map> {
        Map::new(kind, 4, 8)
    }

    fn update_raw(&self, key: u32, value: *const u8) -> io::Result<()> {
        Attr::new()
            .u32(0, self.fd.as_raw_fd() as u32)
            .u64(8, &key as *const u32 as u64)
            .u64(16, value as u64)
            .call(BPF_MAP_UPDATE_ELEM)
            .map(drop)
    }

    /// Puts a socket at `key` (a sockmap's index or a sockhash's key).
    pub fn insert(&self, key: u32, sock: &impl AsRawFd) -> io::Result<()> {
        let fd = sock.as_raw_fd() as u32;
        self.update_raw(key, &fd as *const u32 as *const u8)
    }

    pub fn get_u64(&self, key: u32) -> io::Result<u64> {
        let mut v = 0u64;
        Attr::new()
            .u32(0, self.fd.as_raw_fd() as u32)
            .u64(8, &key as *const u32 as u64)
            .u64(16, &mut v as *mut u64 as u64)
            .call(BPF_MAP_LOOKUP_ELEM)?;
        Ok(v)
    }

    fn attach(&self, prog: &OwnedFd, attach_type: u32) -> io::Result<()> {
        Attr::new()
            .u32(0, self.fd.as_raw_fd() as u32)
            .u32(4, prog.as_raw_fd() as u32)
            .u32(8, attach_type)
            .call(BPF_PROG_ATTACH)
            .map(drop)
    }
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

fn ins(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}
fn mov_imm(dst: u8, imm: i32) -> Insn {
    ins(0xb7, dst, 0, 0, imm)
}
fn mov_reg(dst: u8, src: u8) -> Insn {
    ins(0xbf, dst, src, 0, 0)
}
fn add_imm(dst: u8, imm: i32) -> Insn {
    ins(0x07, dst, 0, 0, imm)
}
fn ldx_w(dst: u8, src: u8, off: i16) -> Insn {
    ins(0x61, dst, src, off, 0)
}
fn ldx_dw(dst: u8, src: u8, off: i16) -> Insn {
    ins(0x79, dst, src, off, 0)
}
fn stx_dw(dst: u8, src: u8, off: i16) -> Insn {
    ins(0x7b, dst, src, off, 0)
}
fn st_w(dst: u8, off: i16, imm: i32) -> Insn {
    ins(0x62, dst, 0, off, imm)
}
fn st_dw(dst: u8, off: i16, imm: i32) -> Insn {
    ins(0x7a, dst, 0, off, imm)
}
fn jeq_imm(dst: u8, imm: i32, off: i16) -> Insn {
    ins(0x15, dst, 0, off, imm)
}
fn call(helper: i32) -> Insn {
    ins(0x85, 0, 0, 0, helper)
}
fn exit() -> Insn {
    ins(0x95, 0, 0, 0, 0)
}
/// `dst = map` (BPF_PSEUDO_MAP_FD), two instruction slots.
fn ld_map(dst: u8, map: &Map) -> [Insn; 2] {
    [ins(0x18, dst, 1, 0, map.fd.as_raw_fd()), ins(0, 0, 0, 0, 0)]
}

fn load(prog_type: u32, insns: &[Insn]) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let r = Attr::new()
        .u32(0, prog_type)
        .u32(4, insns.len() as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64)
        .call(BPF_PROG_LOAD);
    match r {
        Ok(fd) => Ok(fd_from(fd)),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Err(io::Error::new(
                e.kind(),
                format!(
                    "{e}; verifier log:\n{}",
                    String::from_utf8_lossy(&log[..end])
                ),
            ))
        }
    }
}

/// Where a verdict program sends what it sees.
#[derive(Clone, Copy)]
pub enum Action<'a> {
    Pass,
    /// Redirect to `key` of `map`; `flags` 0 is egress, 1 (`BPF_F_INGRESS`) ingress.
    Redirect {
        map: &'a Map,
        key: u32,
        flags: i32,
    },
}

/// `key` on the stack at fp-4, for the helpers that take a key pointer: sockmap helpers take
/// the key by value, sockhash helpers by pointer.
fn redirect_insns(out: &mut Vec<Insn>, ctx: u8, action: Action, map_helper: i32, hash_helper: i32) {
    match action {
        Action::Pass => out.extend([mov_imm(0, SK_PASS), exit()]),
        Action::Redirect { map, key, flags } => {
            out.push(mov_reg(1, ctx));
            out.extend(ld_map(2, map));
            if map.kind == MAP_SOCKHASH {
                out.push(st_w(10, -4, key as i32));
                out.push(mov_reg(3, 10));
                out.push(add_imm(3, -4));
                out.push(mov_imm(4, flags));
                out.push(call(hash_helper));
            } else {
                out.push(mov_imm(3, key as i32));
                out.push(mov_imm(4, flags));
                out.push(call(map_helper));
            }
            out.push(exit());
        }
    }
}

/// A stream parser whose every message is the whole skb it is given.
fn parser() -> io::Result<OwnedFd> {
    load(PROG_SK_SKB, &[ldx_w(0, 1, 0), exit()])
}

/// A stream verdict that counts its calls in `record[0]`, keeps the first 8 bytes of the last
/// message in `record[1]` and its length in `record[2]`, then does `action`.
fn verdict(record: &Map, action: Action) -> io::Result<OwnedFd> {
    let mut p = vec![mov_reg(6, 1)];
    // record[0] += 1
    p.push(st_w(10, -4, 0));
    p.extend(ld_map(1, record));
    p.extend([mov_reg(2, 10), add_imm(2, -4), call(HELPER_MAP_LOOKUP)]);
    p.push(jeq_imm(0, 0, 3));
    p.extend([ldx_dw(1, 0, 0), add_imm(1, 1), stx_dw(0, 1, 0)]);
    // record[1] = first 8 bytes (zero when the message is shorter)
    p.push(st_dw(10, -16, 0));
    p.extend([
        mov_reg(1, 6),
        mov_imm(2, 0),
        mov_reg(3, 10),
        add_imm(3, -16),
        mov_imm(4, 8),
        call(HELPER_SKB_LOAD_BYTES),
    ]);
    p.push(st_w(10, -4, 1));
    p.extend(ld_map(1, record));
    p.extend([
        mov_reg(2, 10),
        add_imm(2, -4),
        mov_reg(3, 10),
        add_imm(3, -16),
        mov_imm(4, 0),
        call(HELPER_MAP_UPDATE),
    ]);
    // record[2] = skb->len
    p.extend([ldx_w(1, 6, 0), stx_dw(10, 1, -16), st_w(10, -4, 2)]);
    p.extend(ld_map(1, record));
    p.extend([
        mov_reg(2, 10),
        add_imm(2, -4),
        mov_reg(3, 10),
        add_imm(3, -16),
        mov_imm(4, 0),
        call(HELPER_MAP_UPDATE),
    ]);
    redirect_insns(
        &mut p,
        6,
        action,
        HELPER_SK_REDIRECT_MAP,
        HELPER_SK_REDIRECT_HASH,
    );
    load(PROG_SK_SKB, &p)
}

/// An sk_msg verdict that does `action` with every message.
fn msg_verdict(action: Action) -> io::Result<OwnedFd> {
    let mut p = vec![mov_reg(6, 1)];
    redirect_insns(
        &mut p,
        6,
        action,
        HELPER_MSG_REDIRECT_MAP,
        HELPER_MSG_REDIRECT_HASH,
    );
    load(PROG_SK_MSG, &p)
}

/// A socket map with programs attached (kept open as long as the map is used).
pub struct ProgMap {
    pub map: Map,
    pub record: Map,
    _progs: Vec<OwnedFd>,
}

impl ProgMap {
    /// `kind` with the whole-skb stream parser and the recording verdict doing `action`.
    pub fn skb(kind: u32, action: Action) -> io::Result<ProgMap> {
        let map = Map::sockets(kind)?;
        let record = Map::new(MAP_ARRAY, 8, 4)?;
        let p = parser()?;
        let v = verdict(&record, action)?;
        map.attach(&p, ATTACH_STREAM_PARSER)?;
        map.attach(&v, ATTACH_STREAM_VERDICT)?;
        Ok(ProgMap {
            map,
            record,
            _progs: vec![p, v],
        })
    }

    /// `kind` with an sk_msg verdict doing `action`.
    pub fn msg(kind: u32, action: Action) -> io::Result<ProgMap> {
        let map = Map::sockets(kind)?;
        let record = Map::new(MAP_ARRAY, 8, 4)?;
        let v = msg_verdict(action)?;
        map.attach(&v, ATTACH_MSG_VERDICT)?;
        Ok(ProgMap {
            map,
            record,
            _progs: vec![v],
        })
    }

    /// (calls, first 8 bytes of the last message, its length) as the verdict recorded them.
    pub fn seen(&self) -> (u64, [u8; 8], u64) {
        let calls = self.record.get_u64(0).unwrap_or(0);
        let head = self.record.get_u64(1).unwrap_or(0).to_ne_bytes();
        let len = self.record.get_u64(2).unwrap_or(0);
        (calls, head, len)
    }
}
