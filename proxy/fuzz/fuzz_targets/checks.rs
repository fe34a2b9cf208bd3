//! Invariants shared by the `upgrade_request` and `signed_url` fuzz targets and by
//! `proxy/tests/fuzz_corpus.rs`, which includes this file with `#[path]` and replays the kept
//! corpora under `cargo test`. It drives only the `wsedge` library's public API, and states
//! the expected results from the contract, not from the code under test.
//!
//! * [`check_upgrade_input`]: byte 0 picks the read sizes, the head limit and the client
//!   address; the rest is what a client sent. `read_head` must find exactly the first head
//!   within the limit however the bytes arrive; `parse_upgrade` must never panic, must agree
//!   on the head alone and on the whole stream, and what it accepts must be forwarded as a
//!   well-formed head that it accepts again, without credentials or `wsedge-*` parameters and
//!   with exactly one of each forwarding header.
//! * [`check_signed_input`]: the input is read as fields (see [`SignedCase::from_input`]). A
//!   request signed from them (header or URL form) must verify and stop verifying outside its
//!   validity; the same request with one byte of what is signed changed must not verify; and
//!   `verify` must not panic on the input's tail taken as a request, at an arbitrary time.

// Each includer uses a different subset of this file.
#![allow(dead_code)]

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    pin::{Pin, pin},
    task::{Context, Poll, Waker},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::io::{AsyncRead, ReadBuf};
use wsedge::protocols::{
    auth::{MAX_CLOCK_SKEW, MAX_URL_EXPIRES, sign, signed_url, verify},
    error_response::HandshakeError,
    handshake::{MAX_HEADERS, UpgradeRequest, parse_upgrade},
    head::{HeadError, read_head},
};

// --- upgrade_request ----------------------------------------------------------------------

/// Head limits the input can pick: small ones so the fuzzer reaches "too large" often.
const HEAD_LIMITS: [usize; 4] = [64, 512, 1024, 16 * 1024];

/// Headers the instance must never get from the client (the contract: credentials wsedge
/// checked, and the forwarding headers wsedge sets itself).
const NEVER_FORWARDED: [&str; 6] = [
    "authorization",
    "x-forwarded-for",
    "x-forwarded-proto",
    "forwarded",
    "x-real-ip",
    "x-wsedge-connection-id",
];

/// The headers wsedge sets for the instance, each exactly once.
const FORWARDING: [&str; 3] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-wsedge-connection-id",
];

const CONNECTION_ID: &str = "19aee2a1f00-7";

/// What one `upgrade_request` input came to, for the replay test's coverage checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeOutcome {
    /// The stream ended before a head (`read_head`: closed).
    Closed,
    /// No head within the limit (`read_head`: too large).
    TooLarge,
    /// A head that `parse_upgrade` refused with this status.
    Refused(u16),
    /// A head the proxy forwards.
    Accepted,
}

/// The `upgrade_request` fuzz entry point; panics on any broken invariant.
pub fn check_upgrade_input(data: &[u8]) -> UpgradeOutcome {
    let Some((&seed, stream)) = data.split_first() else {
        return UpgradeOutcome::Closed;
    };
    // On arbitrary bytes (a head and more, or no head at all): never panics.
    let whole = parse_upgrade(stream);
    if let Ok(request) = &whole {
        check_forwarded(request, seed);
    }

    let limit = HEAD_LIMITS[usize::from(seed >> 6)];
    let expected = expected_head(stream, limit);
    let in_chunks = read_ready(stream, chunk_sizes(seed), limit);
    let in_one = read_ready(stream, || usize::MAX, limit);
    for (how, got) in [("in chunks", in_chunks), ("in one read", in_one)] {
        match (&expected, got) {
            (Expected::Head(end), Ok(head)) => {
                assert_eq!(head.head, stream[..*end], "read_head {how}: the head");
                assert!(
                    stream[*end..].starts_with(&head.rest),
                    "read_head {how}: the bytes after the head are not what followed it"
                );
            }
            (Expected::TooLarge, Err(HeadError::TooLarge(l))) => assert_eq!(l, limit),
            (Expected::Closed, Err(HeadError::Closed)) => {}
            (expected, got) => panic!("read_head {how}: expected {expected:?}, got {got:?}"),
        }
    }
    let end = match expected {
        Expected::Head(end) => end,
        Expected::TooLarge => return UpgradeOutcome::TooLarge,
        Expected::Closed => return UpgradeOutcome::Closed,
    };
    // What the proxy parses is the head alone: the same answer as with what follows it.
    let head_only = parse_upgrade(&stream[..end]);
    assert_eq!(
        format!("{head_only:?}"),
        format!("{whole:?}"),
        "parse_upgrade differs on the head alone and on the whole stream"
    );
    match head_only {
        Ok(_) => UpgradeOutcome::Accepted,
        Err(e) => {
            check_refusal(&e);
            UpgradeOutcome::Refused(e.status)
        }
    }
}

/// Where the first head ends, from the contract: up to and including the first blank line
/// after the empty lines a request may start with (RFC 9112 2.2), if that is within `limit`.
#[derive(Debug)]
enum Expected {
    Head(usize),
    TooLarge,
    Closed,
}

fn expected_head(stream: &[u8], limit: usize) -> Expected {
    let mut start = 0;
    loop {
        if stream[start..].starts_with(b"\r\n") {
            start += 2;
        } else if stream[start..].starts_with(b"\n") {
            start += 1;
        } else {
            break;
        }
    }
    let first = stream[start..]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| start + at);
    match first {
        Some(at) if at + 4 <= limit => Expected::Head(at + 4),
        Some(_) => Expected::TooLarge,
        None if stream.len() > limit => Expected::TooLarge,
        None => Expected::Closed,
    }
}

/// A refused upgrade has a status and type from the contract's table.
fn check_refusal(e: &HandshakeError) {
    let known = matches!(
        (e.status, e.error_type),
        (400, "malformed_upgrade")
            | (403, "method_not_allowed")
            | (426, "unsupported_version")
            | (431, "headers_too_large")
    );
    assert!(known, "unexpected refusal {e:?}");
    assert!(!e.message.is_empty(), "a refusal without a message");
}

/// The client's address the input picks: IPv4 or IPv6, and whether it came over TLS.
fn client_of(seed: u8) -> (IpAddr, bool) {
    let ip = if seed & 1 == 0 {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, seed))
    } else {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(seed)))
    };
    (ip, seed & 2 != 0)
}

fn is_dot_segment(segment: &str) -> bool {
    let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
    decoded == "." || decoded == ".."
}

/// The invariants of an accepted upgrade and of what the instance gets for it.
fn check_forwarded(request: &UpgradeRequest, seed: u8) {
    assert_eq!(request.method, "GET");
    assert!(request.path.starts_with('/'), "target {:?}", request.path);
    assert!(
        !request.path_only().split('/').any(is_dot_segment),
        "a dot-segment was accepted: {:?}",
        request.path
    );
    assert_eq!(request.host, request.host.to_ascii_lowercase());
    assert_eq!(request.key.len(), 24, "a key is 16 bytes in base64");
    let (ip, tls) = client_of(seed);
    let forwarded = request.forwarded(ip, tls, CONNECTION_ID);

    // A well-formed head: one blank line, at its end; CRLF lines; `name: value` headers.
    let text = std::str::from_utf8(&forwarded).ok();
    let end = forwarded.windows(4).position(|w| w == b"\r\n\r\n");
    assert_eq!(
        end,
        Some(forwarded.len() - 4),
        "the forwarded head has its blank line elsewhere than at its end: {text:?}"
    );
    let body = &forwarded[..forwarded.len() - 4];
    let mut lines = body.split(|&b| b == b'\n');
    let target = request.function_target();
    assert_eq!(
        lines.next(),
        Some(format!("GET {target} HTTP/1.1\r").as_bytes()),
        "request line of {text:?}"
    );
    let mut forwarding = [0usize; 3];
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        assert!(!line.contains(&b'\r'), "a bare CR in {text:?}");
        let colon = line.iter().position(|&b| b == b':').expect("name: value");
        let name = std::str::from_utf8(&line[..colon]).expect("an ASCII header name");
        assert!(
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic()),
            "header name {name:?}"
        );
        let lower = name.to_ascii_lowercase();
        assert!(
            !matches!(lower.as_str(), "authorization" | "forwarded" | "x-real-ip"),
            "{name} reached the instance"
        );
        if let Some(i) = FORWARDING.iter().position(|n| *n == lower) {
            forwarding[i] += 1;
        }
    }
    assert_eq!(
        forwarding,
        [1, 1, 1],
        "X-Forwarded-For, X-Forwarded-Proto, X-Wsedge-Connection-Id once each"
    );
    let header_count = body.split(|&b| b == b'\n').count() - 1;
    let again = match parse_upgrade(&forwarded) {
        Ok(again) => again,
        // The three forwarding headers can take a request at the limit over it.
        Err(e) if header_count > MAX_HEADERS => {
            assert_eq!((e.status, e.error_type), (431, "headers_too_large"));
            return;
        }
        Err(e) => panic!("the forwarded head is refused: {e:?}\n{text:?}"),
    };
    assert_eq!(again.path, target, "the instance's target");
    assert!(
        !again
            .query()
            .unwrap_or_default()
            .split('&')
            .any(|p| p.starts_with("wsedge-")),
        "a wsedge-* parameter reached the instance: {:?}",
        again.path
    );
    assert_eq!(again.function_target(), again.path);
    assert_eq!((&again.host, &again.key), (&request.host, &request.key));
    let mut expected: Vec<(String, Vec<u8>)> = request
        .headers
        .iter()
        .filter(|(n, _)| !NEVER_FORWARDED.contains(&n.to_ascii_lowercase().as_str()))
        .cloned()
        .collect();
    let proto = if tls { "wss" } else { "ws" };
    for (name, value) in [
        ("X-Forwarded-For", ip.to_string()),
        ("X-Forwarded-Proto", proto.to_string()),
        ("X-Wsedge-Connection-Id", CONNECTION_ID.to_string()),
    ] {
        expected.push((name.to_string(), value.into_bytes()));
    }
    assert_eq!(again.headers, expected, "the instance's headers");
    // Forwarding is a fixed point: the proxy's own output goes through unchanged.
    assert_eq!(again.forwarded(ip, tls, CONNECTION_ID), forwarded);
}

/// A reader that is always ready and hands out at most the next chunk size per read.
struct Chunked<'a, F> {
    rest: &'a [u8],
    next: F,
}

impl<F: FnMut() -> usize + Unpin> AsyncRead for Chunked<'_, F> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let n = (this.next)()
            .max(1)
            .min(this.rest.len())
            .min(buf.remaining());
        buf.put_slice(&this.rest[..n]);
        this.rest = &this.rest[n..];
        Poll::Ready(Ok(()))
    }
}

/// `read_head` over `stream` fed in chunks: the reader never waits, so neither may it.
fn read_ready(
    stream: &[u8],
    next: impl FnMut() -> usize + Unpin,
    limit: usize,
) -> Result<wsedge::protocols::head::Head, HeadError> {
    let mut reader = Chunked { rest: stream, next };
    let mut future = pin!(read_head(&mut reader, limit));
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(result) => result,
        Poll::Pending => panic!("read_head is pending on a reader that is always ready"),
    }
}

/// Chunk sizes from one seed byte: its low 4 bits give the largest (1..=16), the byte seeds
/// a xorshift generator.
fn chunk_sizes(seed: u8) -> impl FnMut() -> usize + Unpin {
    let max = u32::from(seed & 0x0F) + 1;
    let mut state = u32::from(seed).wrapping_mul(0x9E37_79B9) | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (1 + state % max) as usize
    }
}

// --- signed_url ---------------------------------------------------------------------------

/// What the generated request's host and target are made of: everything a target may hold
/// except `w` and `s`, so the input cannot spell a `wsedge-*` parameter of its own (the
/// signer appends those), and `.`, `%`, `2`, `e`, so dot-segments (refused with 400, not a
/// signature case) can happen.
const HOST_BYTES: &[u8] = b"abcXYZ019-.:";
const TARGET_BYTES: &[u8] = b"abcdeXYZ0129-_~%/.=&?+!$'()*,;@";
/// What a changed byte becomes (never whitespace, which a parser could trim).
const CHANGE_BYTES: &[u8] = b"abcxyzXYZ0129-_~%/.=&?+";

/// The upgrade request lines the generated request is built around.
const REQUEST_REST: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

/// Reads fields off the front of the input; missing bytes read as 0.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        taken
    }
    fn byte(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
    fn u64(&mut self) -> u64 {
        let mut bytes = [0u8; 8];
        for (b, from) in bytes.iter_mut().zip(self.take(8)) {
            *b = *from;
        }
        u64::from_le_bytes(bytes)
    }
    /// Up to `max` bytes (the count comes from the input), mapped onto `alphabet`.
    fn text(&mut self, max: u8, alphabet: &[u8]) -> String {
        let n = self.byte() % (max + 1);
        self.take(usize::from(n))
            .iter()
            .map(|b| char::from(alphabet[usize::from(*b) % alphabet.len()]))
            .collect()
    }
}

/// Which of the two forms the generated request uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Header,
    Url,
}

/// A correctly signed request, as the fuzz input describes it.
#[derive(Debug)]
pub struct SignedCase {
    pub form: Form,
    pub key: Vec<u8>,
    pub host: String,
    /// The target as sent (with the signed-URL parameters in the URL form).
    pub target: String,
    /// The header form's `Date` value.
    pub date: Option<String>,
    /// The header form's `Authorization` value.
    pub authorization: Option<String>,
    /// When the proxy checks it (Unix seconds), within the validity.
    pub now: u64,
    /// The first and last second it is valid at.
    pub valid: (u64, u64),
    /// Where the one changed byte goes and what it becomes.
    change_at: u16,
    change_to: u8,
}

impl SignedCase {
    /// Input layout: flags (bit 0: the URL form), the proxy's clock (8 bytes), the date's
    /// offset and the validity (2 bytes each), the key, the host and the target (each a
    /// length byte, then bytes), the changed byte's place (2 bytes) and value; returns the
    /// rest of the input.
    pub fn from_input(data: &[u8]) -> (SignedCase, &[u8]) {
        let mut input = Input(data);
        let form = if input.byte() & 1 == 0 {
            Form::Header
        } else {
            Form::Url
        };
        // Far enough from the epoch that every validity window starts after it, and within
        // the years an HTTP date can write (before 10000).
        let now = 5_000 + input.u64() % 200_000_000_000;
        let offset = u64::from(input.u16());
        let expires = u64::from(input.u16()) % (MAX_URL_EXPIRES.as_secs() + 1);
        let key_len = input.byte() % 65;
        let key = input.take(usize::from(key_len)).to_vec();
        let host = input.text(32, HOST_BYTES);
        let target = format!("/{}", input.text(200, TARGET_BYTES));
        let (change_at, change_to) = (input.u16(), input.byte());
        let skew = MAX_CLOCK_SKEW.as_secs();
        let case = match form {
            Form::Header => {
                // Sent up to 15 minutes either side of the proxy's clock.
                let sent = now - skew + offset % (2 * skew + 1);
                let date = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(sent));
                SignedCase {
                    form,
                    authorization: Some(sign(&key, &host, &target, &date)),
                    date: Some(date),
                    target,
                    valid: (sent - skew, sent + skew),
                    key,
                    host,
                    now,
                    change_at,
                    change_to,
                }
            }
            Form::Url => {
                // Valid from `skew` before `date` to `expires` after: `now` within that.
                let date = now - expires + offset % (expires + skew + 1);
                SignedCase {
                    form,
                    target: signed_url(&key, &host, &target, date, expires),
                    date: None,
                    authorization: None,
                    valid: (date - skew, date + expires),
                    key,
                    host,
                    now,
                    change_at,
                    change_to,
                }
            }
        };
        (case, input.0)
    }

    /// The request head, and the byte ranges in it that the signature covers.
    pub fn head(&self) -> (Vec<u8>, Vec<std::ops::Range<usize>>) {
        let mut head = String::new();
        let mut signed = Vec::new();
        let mut push = |head: &mut String, before: &str, value: &str, after: &str| {
            head.push_str(before);
            signed.push(head.len()..head.len() + value.len());
            head.push_str(value);
            head.push_str(after);
        };
        push(&mut head, "GET ", &self.target, " HTTP/1.1\r\n");
        push(&mut head, "Host: ", &self.host, "\r\n");
        head.push_str(REQUEST_REST);
        if let (Some(date), Some(authorization)) = (&self.date, &self.authorization) {
            push(&mut head, "Date: ", date, "\r\n");
            push(&mut head, "Authorization: ", authorization, "\r\n");
        }
        head.push_str("\r\n");
        (head.into_bytes(), signed)
    }

    /// The head with one byte of what is signed changed (never only in case within the Host,
    /// which is signed lowercased).
    pub fn changed_head(&self) -> Vec<u8> {
        let (mut head, signed) = self.head();
        let total: usize = signed.iter().map(|r| r.len()).sum();
        let mut at = usize::from(self.change_at) % total;
        let (range, in_host) = signed
            .iter()
            .enumerate()
            .find_map(|(i, r)| {
                if at < r.len() {
                    Some((r.clone(), i == 1))
                } else {
                    at -= r.len();
                    None
                }
            })
            .expect("`at` is within the signed bytes");
        let old = head[range.start + at];
        let mut pick = usize::from(self.change_to);
        let new = loop {
            let candidate = CHANGE_BYTES[pick % CHANGE_BYTES.len()];
            let same = if in_host {
                candidate.eq_ignore_ascii_case(&old)
            } else {
                candidate == old
            };
            if !same {
                break candidate;
            }
            pick += 1;
        };
        head[range.start + at] = new;
        head
    }
}

/// What one `signed_url` input came to, for the replay test's coverage checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedOutcome {
    /// The generated request's form; `None` when its target had a dot-segment (400).
    pub form: Option<Form>,
    /// How the input's tail fared as a request: not an upgrade, or `verify`'s error type.
    pub tail: Option<Result<(), &'static str>>,
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// An authentication refusal has a status and type from the contract.
fn check_auth_refusal(e: &HandshakeError) {
    let known = matches!(
        (e.status, e.error_type),
        (400, "missing_auth")
            | (400, "malformed_date")
            | (400, "malformed_upgrade")
            | (403, "bad_signature")
            | (403, "stale_date")
    );
    assert!(known, "unexpected refusal {e:?}");
}

/// The `signed_url` fuzz entry point; panics on any broken invariant.
pub fn check_signed_input(data: &[u8]) -> SignedOutcome {
    let (case, tail) = SignedCase::from_input(data);
    let form = check_signed_case(&case).then_some(case.form);

    // The tail as a request, checked with the case's key at an arbitrary time (before the
    // epoch too): whatever it is, verify answers without panicking.
    let mut tail_input = Input(tail);
    let (flags, secs) = (tail_input.byte(), tail_input.u64());
    let offset = Duration::from_secs(secs);
    let now = if flags & 1 == 0 {
        UNIX_EPOCH.checked_add(offset)
    } else {
        UNIX_EPOCH.checked_sub(offset)
    }
    .unwrap_or(UNIX_EPOCH);
    let tail = parse_upgrade(tail_input.0).ok().map(|request| {
        verify(&request, &case.key, now).map_err(|e| {
            check_auth_refusal(&e);
            e.error_type
        })
    });
    SignedOutcome { form, tail }
}

/// The generated request verifies within its validity and only then; with one signed byte
/// changed it does not. False when its target has a dot-segment (refused before any check).
fn check_signed_case(case: &SignedCase) -> bool {
    let (head, _) = case.head();
    let text = String::from_utf8_lossy(&head);
    let request = match parse_upgrade(&head) {
        Ok(request) => request,
        Err(e) if e.message.contains("dot-segment") => return false,
        Err(e) => panic!("the generated request is refused: {e:?}\n{text:?}"),
    };
    assert_eq!(
        verify(&request, &case.key, at(case.now)),
        Ok(()),
        "a correctly signed request does not verify at {}: {case:?}\n{text:?}",
        case.now
    );
    let (first, last) = case.valid;
    for edge in [first, last] {
        assert_eq!(
            verify(&request, &case.key, at(edge)),
            Ok(()),
            "not valid at {edge}, within its validity {first}..={last}: {case:?}"
        );
    }
    for outside in [first - 1, last + 1] {
        let e = verify(&request, &case.key, at(outside)).expect_err("valid outside its window");
        assert_eq!(
            (e.status, e.error_type),
            (403, "stale_date"),
            "at {outside}, outside {first}..={last}: {case:?}"
        );
    }
    let mut other_key = case.key.clone();
    match other_key.first_mut() {
        Some(b) => *b ^= 1,
        // Not 0: HMAC pads a short key with zeros, so "" and "\0" are the same key.
        None => other_key.push(1),
    }
    let e = verify(&request, &other_key, at(case.now)).expect_err("verifies under another key");
    assert_eq!((e.status, e.error_type), (403, "bad_signature"));

    let changed = case.changed_head();
    if let Ok(request) = parse_upgrade(&changed) {
        match verify(&request, &case.key, at(case.now)) {
            Ok(()) => panic!(
                "verifies with one signed byte changed: {case:?}\n{:?}",
                String::from_utf8_lossy(&changed)
            ),
            Err(e) => check_auth_refusal(&e),
        }
    }
    true
}
