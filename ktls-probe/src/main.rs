//! How kTLS and BPF sockmaps combine on the running kernel: the questions the kTLS design of
//! wsedge depends on, each answered by doing it and printing the exact outcome (errno names,
//! the bytes that reached the wire, what the verdict program saw).
//!
//! - B1: a socket with the TLS ULP into a sockmap/sockhash, and the reverse order.
//! - B2: what reaches the wire when an sk_skb verdict, or an sk_msg verdict, redirects
//!   (egress) into a kTLS-TX socket.
//! - B3: whether a stream verdict on a TLS_RX socket sees the decrypted records.
//! - B4: splice from a plain socket into a kTLS-TX socket, and from a kTLS-RX socket.
//!
//! TLS 1.3 AES-128-GCM with fixed keys; "the wire" is the plain TCP peer's receive queue, and
//! decrypting means replaying those bytes into a fresh connection whose receiver has TLS_RX
//! with the same key, so the kernel's own kTLS is the reference decoder.
//! Needs root, the `tls` module and `gcm(aes)`; prints one `RESULT` line per check.

mod bpf;

use std::{
    io::{self, Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use bpf::{Action, MAP_SOCKHASH, MAP_SOCKMAP, Map, ProgMap};

const SOL_TLS: libc::c_int = 282;
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
const TCP_ULP: libc::c_int = 31;
const TLS_1_2_VERSION: u16 = 0x0303;
const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;

/// How long a reader waits for bytes that should come (TCG guests are slow).
const WAIT: Duration = Duration::from_secs(3);

/// `struct tls12_crypto_info_aes_gcm_128`.
#[repr(C)]
struct CryptoInfo {
    version: u16,
    cipher_type: u16,
    iv: [u8; 8],
    key: [u8; 16],
    salt: [u8; 4],
    rec_seq: [u8; 8],
}

/// One direction's fixed key; the sender's TLS_TX and the receiver's TLS_RX use the same one.
fn key(n: u8) -> CryptoInfo {
    key_v(n, TLS_1_3_VERSION)
}

fn key_v(n: u8, version: u16) -> CryptoInfo {
    CryptoInfo {
        version,
        cipher_type: TLS_CIPHER_AES_GCM_128,
        iv: [n; 8],
        key: [n.wrapping_add(0x40); 16],
        salt: [n.wrapping_add(0x80); 4],
        rec_seq: [0; 8],
    }
}

fn errno_name(e: &io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(libc::EINVAL) => "EINVAL",
        Some(libc::EBUSY) => "EBUSY",
        Some(libc::EEXIST) => "EEXIST",
        Some(libc::ENOTCONN) => "ENOTCONN",
        Some(libc::EOPNOTSUPP) => "EOPNOTSUPP",
        Some(libc::ENOPROTOOPT) => "ENOPROTOOPT",
        Some(libc::ENOENT) => "ENOENT",
        Some(libc::EPERM) => "EPERM",
        Some(libc::EBADMSG) => "EBADMSG",
        Some(libc::EAGAIN) => "EAGAIN",
        Some(libc::ENOMEM) => "ENOMEM",
        Some(libc::EIO) => "EIO",
        Some(libc::EPIPE) => "EPIPE",
        Some(libc::ENOSPC) => "ENOSPC",
        Some(524) => "ENOTSUPP",
        _ => return e.to_string(),
    };
    format!("{name} ({e})")
}

fn clone_err(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(n) => io::Error::from_raw_os_error(n),
        None => io::Error::other(e.to_string()),
    }
}

fn outcome(r: &io::Result<()>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => format!("error {}", errno_name(e)),
    }
}

fn setsockopt<T>(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: &T,
) -> io::Result<()> {
    // SAFETY: `v` is a live value of the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            v as *const T as *const libc::c_void,
            size_of::<T>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn set_ulp(s: &TcpStream) -> io::Result<()> {
    setsockopt(s, libc::SOL_TCP, TCP_ULP, b"tls")
}
fn set_tx(s: &TcpStream, k: u8) -> io::Result<()> {
    setsockopt(s, SOL_TLS, TLS_TX, &key(k))
}
fn set_rx(s: &TcpStream, k: u8) -> io::Result<()> {
    setsockopt(s, SOL_TLS, TLS_RX, &key(k))
}

/// A connected loopback pair (client, accepted server), both with read timeouts.
fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let c = TcpStream::connect(l.local_addr().unwrap()).expect("connect");
    let (s, _) = l.accept().expect("accept");
    for x in [&c, &s] {
        x.set_read_timeout(Some(WAIT)).unwrap();
        x.set_nodelay(true).unwrap();
    }
    (c, s)
}

/// Reads until `want` bytes came, the stream ended or failed, or [`WAIT`] passed.
fn read_some(s: &mut TcpStream, want: usize) -> (Vec<u8>, Option<io::Error>) {
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    while got.len() < want && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return (got, None),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (got, Some(e)),
        }
    }
    (got, None)
}

/// What `raw` (bytes a kTLS-TX socket put on the wire) decrypts to with key `k`, by the
/// kernel's own TLS_RX.
fn decrypt(raw: &[u8], k: u8) -> io::Result<Vec<u8>> {
    let (mut c, mut s) = pair();
    set_ulp(&s)?;
    set_rx(&s, k)?;
    c.write_all(raw)?;
    let (plain, err) = read_some(&mut s, usize::MAX);
    match err {
        Some(e) if plain.is_empty() => Err(e),
        _ => Ok(plain),
    }
}

/// How the bytes on the wire read: TLS records (and what they decrypt to) or the plaintext.
fn describe_wire(raw: &[u8], marker: &[u8], k: u8) -> String {
    let records = tls_records(raw);
    let has_plain = raw.windows(marker.len()).any(|w| w == marker);
    let mut d = format!(
        "{} bytes on the wire, first {:02x?}; plaintext marker visible: {has_plain}; TLS record headers: {records:?}",
        raw.len(),
        &raw[..raw.len().min(8)]
    );
    if !raw.is_empty() && !has_plain {
        match decrypt(raw, k) {
            Ok(p) => d.push_str(&format!(
                "; decrypts with the TX key to {} bytes, equal to what was sent: {}",
                p.len(),
                p == marker
            )),
            Err(e) => d.push_str(&format!("; decrypting: {}", errno_name(&e))),
        }
    }
    d
}

/// (content type, length) of each whole TLS record header at the start of `raw`.
fn tls_records(raw: &[u8]) -> Vec<(u8, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 5 <= raw.len() && raw[i + 1] == 3 && raw[i + 2] == 3 {
        let len = u16::from_be_bytes([raw[i + 3], raw[i + 4]]) as usize;
        out.push((raw[i], len));
        i += 5 + len;
    }
    out
}

fn marker(what: &str) -> Vec<u8> {
    format!("PLAINTEXT-MARKER<{what}>-0123456789abcdef").into_bytes()
}

fn result(id: &str, what: &str, outcome: impl std::fmt::Display) {
    println!("RESULT {id}: {what}: {outcome}");
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills the two fds, which we then own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn splice(from: &impl AsRawFd, to: &impl AsRawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice(2) between two fds we hold, no offsets.
    let r = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            0,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn show(r: &io::Result<usize>) -> String {
    match r {
        Ok(n) => format!("ok, {n} bytes"),
        Err(e) => format!("error {}", errno_name(e)),
    }
}

fn main() {
    let uname = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("ktls-probe on kernel {}", uname.trim());
    b1();
    b2();
    b3();
    b4();
    println!("ktls-probe: done");
}

fn b1() {
    println!("== B1: TLS ULP and sockmaps, both orders");
    let kinds = [("sockmap", MAP_SOCKMAP), ("sockhash", MAP_SOCKHASH)];
    let tls_states: [(&str, bool, bool); 3] = [
        ("ULP only", false, false),
        ("ULP+TLS_TX", true, false),
        ("ULP+TLS_TX+TLS_RX", true, true),
    ];
    // ULP first, then into a map (with parser+verdict, and without any program).
    for (kname, kind) in kinds {
        for with_progs in [true, false] {
            for (sname, tx, rx) in tls_states {
                let (c, _s) = pair();
                let setup = set_ulp(&c)
                    .and_then(|()| if tx { set_tx(&c, 1) } else { Ok(()) })
                    .and_then(|()| if rx { set_rx(&c, 2) } else { Ok(()) });
                if setup.is_err() {
                    result("B1", &format!("{sname} setsockopt"), outcome(&setup));
                    continue;
                }
                let progs = if with_progs {
                    "with parser+verdict"
                } else {
                    "no programs"
                };
                let insert = if with_progs {
                    ProgMap::skb(kind, Action::Pass).and_then(|m| m.map.insert(0, &c))
                } else {
                    Map::sockets(kind).and_then(|m| m.insert(0, &c))
                };
                result(
                    "B1.ulp-first",
                    &format!("{sname}, then update {kname} ({progs})"),
                    outcome(&insert),
                );
            }
        }
    }
    // A map first, then the ULP and keys.
    for (kname, kind) in kinds {
        for progs in ["parser+verdict", "sk_msg verdict", "no programs"] {
            let (c, _s) = pair();
            // Kept until the end of the iteration: closing the map would take the socket out.
            let map = match progs {
                "parser+verdict" => ProgMap::skb(kind, Action::Pass).map(|m| (Some(m), None)),
                "sk_msg verdict" => ProgMap::msg(kind, Action::Pass).map(|m| (Some(m), None)),
                _ => Map::sockets(kind).map(|m| (None, Some(m))),
            };
            let insert = map.as_ref().map_err(clone_err).and_then(|held| match held {
                (Some(m), _) => m.map.insert(0, &c),
                (_, Some(m)) => m.insert(0, &c),
                _ => unreachable!(),
            });
            let what = format!("in {kname} ({progs}) first");
            result(
                "B1.map-first",
                &format!("{what}: map update"),
                outcome(&insert),
            );
            if insert.is_err() {
                continue;
            }
            let ulp = set_ulp(&c);
            result(
                "B1.map-first",
                &format!("{what}: TCP_ULP tls"),
                outcome(&ulp),
            );
            let tx = set_tx(&c, 1);
            result("B1.map-first", &format!("{what}: TLS_TX"), outcome(&tx));
            let rx = set_rx(&c, 2);
            result("B1.map-first", &format!("{what}: TLS_RX"), outcome(&rx));
            // The socket now has a psock and the ULP: can it go into a second map?
            let second = Map::sockets(MAP_SOCKMAP).and_then(|m| m.insert(0, &c));
            result(
                "B1.map-first",
                &format!("{what}, TLS set: update a second sockmap"),
                outcome(&second),
            );
        }
    }
    // Which part of being in a map makes TLS_TX fail: TLS 1.2 instead of 1.3, and a socket
    // taken out of its map again (the map closed) before the ULP is set.
    {
        let (c, _s) = pair();
        let m = ProgMap::skb(MAP_SOCKMAP, Action::Pass).unwrap();
        let r = m
            .map
            .insert(0, &c)
            .and_then(|()| set_ulp(&c))
            .and_then(|()| setsockopt(&c, SOL_TLS, TLS_TX, &key_v(1, TLS_1_2_VERSION)));
        result(
            "B1.map-first",
            "in sockmap (parser+verdict) first, then ULP + TLS 1.2 TLS_TX",
            outcome(&r),
        );
    }
    {
        let (c, _s) = pair();
        let m = ProgMap::skb(MAP_SOCKMAP, Action::Pass).unwrap();
        let ins = m.map.insert(0, &c);
        drop(m);
        // The map's release (and the psock's) is deferred to RCU/workqueue: give it time.
        std::thread::sleep(Duration::from_millis(500));
        let r = ins.and_then(|()| set_ulp(&c)).and_then(|()| set_tx(&c, 1));
        result(
            "B1.map-first",
            "in sockmap, map closed again, then ULP + TLS_TX",
            outcome(&r),
        );
    }
    // Does a socket put in a map first and then given kTLS still encrypt what it sends
    // itself (the control for B2)?
    let (c, mut s) = pair();
    let m = Map::sockets(MAP_SOCKMAP).unwrap();
    let ok = m
        .insert(0, &c)
        .and_then(|()| set_ulp(&c))
        .and_then(|()| set_tx(&c, 1));
    if ok.is_ok() {
        let mk = marker("own write");
        let sent = (&c).write_all(&mk);
        let (raw, _) = read_some(&mut s, usize::MAX);
        result(
            "B1.control",
            "map-first kTLS-TX socket, userspace write()",
            format!("write {}; {}", outcome(&sent), describe_wire(&raw, &mk, 1)),
        );
    } else {
        result("B1.control", "set-up", outcome(&ok));
    }
}

/// Target: a kTLS-TX client `t` (put in `dst` at key 0 first, then given the ULP and key 1),
/// whose plain peer `t_s` is the wire.
/// Without `tls` the same socket stays plain: the control that shows the redirect itself works.
fn ktls_target(dst: &Map, tls: bool) -> io::Result<(TcpStream, TcpStream)> {
    let (t, t_s) = pair();
    dst.insert(0, &t)?;
    if tls {
        set_ulp(&t)?;
        set_tx(&t, 1)?;
    }
    Ok((t, t_s))
}

fn b2() {
    println!("== B2: redirect (egress) into a kTLS-TX socket");
    let cases = [
        ("sockmap, plain target (control)", MAP_SOCKMAP, false),
        ("sockmap", MAP_SOCKMAP, true),
        ("sockhash", MAP_SOCKHASH, true),
    ];
    for (kname, kind, tls) in cases {
        // sk_skb: what arrives on plain socket a_s is redirected by its verdict to t's egress.
        let run = || -> io::Result<String> {
            let dst = Map::sockets(kind)?;
            let src = ProgMap::skb(
                kind,
                Action::Redirect {
                    map: &dst,
                    key: 0,
                    flags: 0,
                },
            )?;
            let (t, mut t_s) = ktls_target(&dst, tls)?;
            let (mut a, a_s) = pair();
            src.map.insert(0, &a_s)?;
            let mk = marker("sk_skb redirect");
            a.write_all(&mk)?;
            let (raw, err) = read_some(&mut t_s, usize::MAX);
            let (calls, _, _) = src.seen();
            drop(t);
            Ok(format!(
                "verdict ran {calls} times; {}{}",
                describe_wire(&raw, &mk, 1),
                err.map(|e| format!("; read error {}", errno_name(&e)))
                    .unwrap_or_default()
            ))
        };
        match run() {
            Ok(s) => result("B2.sk_skb", &format!("{kname} egress redirect"), s),
            Err(e) => result("B2.sk_skb", &format!("{kname} set-up"), errno_name(&e)),
        }
        // sk_msg: what userspace sends on m is redirected by the msg verdict to t's egress.
        let run = || -> io::Result<String> {
            let dst = Map::sockets(kind)?;
            let src = ProgMap::msg(
                kind,
                Action::Redirect {
                    map: &dst,
                    key: 0,
                    flags: 0,
                },
            )?;
            let (t, mut t_s) = ktls_target(&dst, tls)?;
            let (mut m, mut m_s) = pair();
            src.map.insert(0, &m)?;
            let mk = marker("sk_msg redirect");
            let sent = m.write(&mk);
            let (raw, err) = read_some(&mut t_s, usize::MAX);
            let (on_m, _) = read_some(&mut m_s, 1);
            drop(t);
            Ok(format!(
                "send() -> {}; {}{}; bytes that reached m's own peer: {}",
                match &sent {
                    Ok(n) => format!("{n}"),
                    Err(e) => errno_name(e),
                },
                describe_wire(&raw, &mk, 1),
                err.map(|e| format!("; read error {}", errno_name(&e)))
                    .unwrap_or_default(),
                on_m.len()
            ))
        };
        match run() {
            Ok(s) => result("B2.sk_msg", &format!("{kname} egress redirect"), s),
            Err(e) => result("B2.sk_msg", &format!("{kname} set-up"), errno_name(&e)),
        }
    }
}

fn b3() {
    println!("== B3: stream verdict on a TLS_RX socket");
    // The receiver r_s goes into the map first (the only order B1 allows), then gets TLS_RX;
    // its peer r sends with kTLS-TX, same key.
    let plain_dst = Map::sockets(MAP_SOCKMAP).unwrap();
    let actions: [(&str, Option<Action>); 2] = [
        ("SK_PASS", None),
        (
            "redirect egress to a plain socket",
            Some(Action::Redirect {
                map: &plain_dst,
                key: 0,
                flags: 0,
            }),
        ),
    ];
    for (aname, action) in actions {
        let run = || -> io::Result<String> {
            let (p, mut p_s) = pair();
            plain_dst.insert(0, &p)?;
            let m = ProgMap::skb(MAP_SOCKMAP, action.unwrap_or(Action::Pass))?;
            let (r, mut r_s) = pair();
            m.map.insert(0, &r_s)?;
            set_ulp(&r_s)?;
            set_rx(&r_s, 3)?;
            set_ulp(&r)?;
            set_tx(&r, 3)?;
            let mk = marker("to a TLS_RX socket");
            (&r).write_all(&mk)?;
            // Long enough for the record to be decrypted-ready had anything run on arrival.
            std::thread::sleep(Duration::from_millis(1000));
            let before = m.seen();
            let (got, err) = read_some(&mut r_s, mk.len());
            let after = m.seen();
            let (redirected, _) = read_some(&mut p_s, usize::MAX);
            drop(p);
            let seen = |(calls, head, len): (u64, [u8; 8], u64)| {
                format!("{calls} calls (last message {len} bytes, starting {head:02x?})")
            };
            let has_plain = redirected.windows(mk.len()).any(|w| w == mk.as_slice());
            Ok(format!(
                "before any recv(): verdict {}; recv() on the TLS_RX socket: {} bytes, equal to \
                 the plaintext sent: {}{}; after that recv(): verdict {}; at the redirect \
                 target's peer: {} bytes, first {:02x?}, plaintext marker inside: {has_plain}",
                seen(before),
                got.len(),
                got == mk,
                err.map(|e| format!(", error {}", errno_name(&e)))
                    .unwrap_or_default(),
                seen(after),
                redirected.len(),
                &redirected[..redirected.len().min(8)],
            ))
        };
        match run() {
            Ok(s) => result("B3", &format!("verdict {aname}"), s),
            Err(e) => result("B3", &format!("verdict {aname}: set-up"), errno_name(&e)),
        }
    }
}

fn b4() {
    println!("== B4: splice and kTLS");
    // Plain socket -> pipe -> kTLS-TX socket.
    let run = || -> io::Result<String> {
        let (mut p, p_s) = pair();
        let (k, mut k_s) = pair();
        set_ulp(&k)?;
        set_tx(&k, 4)?;
        let mk = marker("spliced into kTLS-TX");
        p.write_all(&mk)?;
        std::thread::sleep(Duration::from_millis(200));
        let (pr, pw) = pipe();
        let into_pipe = splice(&p_s, &pw, 65536);
        let into_tls = match &into_pipe {
            Ok(n) => splice(&pr, &k, *n),
            Err(_) => Ok(0),
        };
        let (raw, _) = read_some(&mut k_s, usize::MAX);
        Ok(format!(
            "splice(socket->pipe) {}; splice(pipe->kTLS socket) {}; {}",
            show(&into_pipe),
            show(&into_tls),
            describe_wire(&raw, &mk, 4)
        ))
    };
    match run() {
        Ok(s) => result("B4.tx", "plain socket -> pipe -> kTLS-TX socket", s),
        Err(e) => result("B4.tx", "set-up", errno_name(&e)),
    }
    // kTLS-RX socket -> pipe.
    let run = || -> io::Result<String> {
        let (x, x_s) = pair();
        set_ulp(&x)?;
        set_tx(&x, 5)?;
        set_ulp(&x_s)?;
        set_rx(&x_s, 5)?;
        let mk = marker("spliced out of kTLS-RX");
        (&x).write_all(&mk)?;
        std::thread::sleep(Duration::from_millis(200));
        let (pr, pw) = pipe();
        let out = splice(&x_s, &pw, 65536);
        drop(pw);
        let mut got = Vec::new();
        if out.is_ok() {
            // Reading the pipe as a file ends at EOF, since the write end is closed.
            let mut f = std::fs::File::from(pr);
            f.read_to_end(&mut got)?;
        }
        Ok(format!(
            "splice(kTLS socket->pipe) {}; pipe holds {} bytes, equal to the plaintext sent: {}",
            show(&out),
            got.len(),
            got == mk
        ))
    };
    match run() {
        Ok(s) => result("B4.rx", "kTLS-RX socket -> pipe", s),
        Err(e) => result("B4.rx", "set-up", errno_name(&e)),
    }
}
