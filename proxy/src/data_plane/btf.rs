//! Just enough of a BTF reader to find struct member offsets in the running kernel.
//!
//! The stream parser hands BPF a head skb in which the message may start after earlier
//! bytes (when several frames arrived in one TCP segment); where it starts is kept in
//! `strp_msg.offset` inside `skb->cb`, which `__sk_buff` does not expose. The programs read
//! it with `bpf_probe_read_kernel`; this module finds its location from
//! /sys/kernel/btf/vmlinux so no kernel layout is hard-coded.

use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading kernel BTF: {0}")]
    Io(#[from] std::io::Error),
    #[error("kernel BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no struct {0} with member {1}")]
    Missing(String, String),
}

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

type Members = HashMap<String, (u32, u32)>;

/// Struct name -> member name -> (byte offset, member type id), plus type id -> struct name
/// and type id -> members (anonymous structs have no name).
struct Structs {
    members: HashMap<String, Members>,
    names: HashMap<u32, String>,
    by_id: HashMap<u32, Members>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
        .ok_or(BtfError::Malformed("truncated"))
}

fn parse(data: &[u8]) -> Result<Structs, BtfError> {
    if data.get(0..2) != Some(&[0x9f, 0xeb]) {
        return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
    }
    let hdr_len = u32_at(data, 4)? as usize;
    let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
    let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
    let types = data
        .get(hdr_len + type_off..hdr_len + type_off + type_len)
        .ok_or(BtfError::Malformed("types"))?;
    let strings = data
        .get(hdr_len + str_off..hdr_len + str_off + str_len)
        .ok_or(BtfError::Malformed("strings"))?;
    let name = |off: u32| -> String {
        let s = &strings[(off as usize).min(strings.len())..];
        String::from_utf8_lossy(&s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())])
            .into_owned()
    };
    let mut structs = Structs {
        members: HashMap::new(),
        names: HashMap::new(),
        by_id: HashMap::new(),
    };
    let (mut at, mut id) = (0usize, 1u32);
    while at < types.len() {
        let name_off = u32_at(types, at)?;
        let info = u32_at(types, at + 4)?;
        let (vlen, kind, kflag) = ((info & 0xffff) as usize, (info >> 24) & 0x1f, info >> 31);
        at += 12;
        let extra = match kind {
            1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
            3 => 12,                      // ARRAY
            4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
            6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
            2 | 7..=12 | 16 | 18 => 0,    // PTR, FWD, TYPEDEF, qualifiers, FUNC, FLOAT, TYPE_TAG
            _ => return Err(BtfError::Malformed("unknown type kind")),
        };
        if kind == KIND_STRUCT || kind == KIND_UNION {
            let mut members = HashMap::new();
            for m in 0..vlen {
                let base = at + 12 * m;
                let bits = u32_at(types, base + 8)?;
                let bit_offset = if kflag == 1 { bits & 0xff_ffff } else { bits };
                members.insert(
                    name(u32_at(types, base)?),
                    (bit_offset / 8, u32_at(types, base + 4)?),
                );
            }
            let struct_name = name(name_off);
            structs.names.insert(id, struct_name.clone());
            structs.by_id.insert(id, members.clone());
            structs.members.entry(struct_name).or_insert(members);
        }
        at += extra;
        id += 1;
    }
    Ok(structs)
}

impl Structs {
    fn member(&self, strukt: &str, member: &str) -> Result<(u32, u32), BtfError> {
        self.members
            .get(strukt)
            .and_then(|m| m.get(member))
            .copied()
            .ok_or_else(|| BtfError::Missing(strukt.into(), member.into()))
    }

    /// `strukt.outer.inner`, where `outer` may be of an anonymous struct type.
    fn nested(&self, strukt: &str, outer: &str, inner: &str) -> Result<u32, BtfError> {
        let (at, type_id) = self.member(strukt, outer)?;
        let (inner_at, _) = self
            .by_id
            .get(&type_id)
            .and_then(|m| m.get(inner))
            .copied()
            .ok_or_else(|| BtfError::Missing(format!("{strukt}.{outer}"), inner.into()))?;
        Ok(at + inner_at)
    }
}

pub use proxy_common::offsets::KernelOffsets;

/// The offsets the kernel programs need, found in the running kernel's BTF.
pub fn kernel_offsets() -> Result<KernelOffsets, BtfError> {
    let structs = parse(&std::fs::read("/sys/kernel/btf/vmlinux")?)?;
    Ok(KernelOffsets {
        strp_offset: strp_offset_location(&structs)?,
        strp_full_len: strp_offset_location(&structs)? - structs.member("strp_msg", "offset")?.0
            + structs.member("strp_msg", "full_len")?.0,
        tcp_bytes_acked: structs.member("tcp_sock", "bytes_acked")?.0,
        tcp_snd_una: structs.member("tcp_sock", "snd_una")?.0,
        tcp_write_seq: structs.member("tcp_sock", "write_seq")?.0,
        sk_sndbuf: structs.member("sock", "sk_sndbuf")?.0,
        sk_wmem_queued: structs.member("sock", "sk_wmem_queued")?.0,
        sk_rcvbuf: structs.member("sock", "sk_rcvbuf")?.0,
        sk_rmem_alloc: structs.nested("sock", "sk_backlog", "rmem_alloc")?,
        sk_user_data: structs.member("sock", "sk_user_data")?.0,
        psock_ingress_qlen: structs.nested("sk_psock", "ingress_skb", "qlen")?,
        psock_ingress_msg: structs.member("sk_psock", "ingress_msg")?.0,
    })
}

/// sk_buff.cb -> sk_skb_cb.strp (a struct _strp_msg) -> _strp_msg.strp -> strp_msg.offset.
fn strp_offset_location(structs: &Structs) -> Result<u32, BtfError> {
    let (cb, _) = structs.member("sk_buff", "cb")?;
    let (strp, _) = structs.member("sk_skb_cb", "strp")?;
    let (inner, _) = structs.member("_strp_msg", "strp")?;
    let (offset, _) = structs.member("strp_msg", "offset")?;
    Ok(cb + strp + inner + offset)
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_strparser_and_tcp_offsets_in_this_kernel() {
        let at = super::kernel_offsets().expect("kernel BTF readable");
        // cb[] is 48 bytes starting past the list/sk/tstamp words; the offset lies inside it.
        assert!((24..24 + 48 + 16).contains(&at.strp_offset), "{at:?}");
        // tcp_sock embeds struct sock first, which alone is hundreds of bytes.
        for off in [at.tcp_bytes_acked, at.tcp_snd_una, at.tcp_write_seq] {
            assert!((700..4096).contains(&off), "{at:?}");
        }
        assert_eq!(at.tcp_bytes_acked % 8, 0);
        for off in [
            at.sk_sndbuf,
            at.sk_wmem_queued,
            at.sk_rcvbuf,
            at.sk_rmem_alloc,
        ] {
            assert!((8..1024).contains(&off) && off % 4 == 0, "{at:?}");
        }
        assert_eq!(at.sk_user_data % 8, 0);
        assert!(at.psock_ingress_msg > at.psock_ingress_qlen, "{at:?}");
    }
}
