//! A deliberately plain WebSocket echo backend: one mio loop per thread, one SO_REUSEPORT
//! listener per loop. It has to be cheap enough that the proxy, not the backend, dominates a
//! measurement, and strict enough (real handshake, unmasking, ping/pong, close) that real
//! clients accept it.
//!
//! A connection upgraded on `/push` is also pushed to (see [`Push`]), the way the documented
//! chat and clock samples send to their clients unasked.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::thread;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token};
use socket2::{Domain, Protocol, Socket, Type};

use crate::sys::{self, Rng};
use crate::ws::{self, Decoder, OPCODE_BINARY, OPCODE_CLOSE, OPCODE_PING, OPCODE_PONG, Piece};

const LISTENER: Token = Token(0);
/// How often an idle loop looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(200);
/// Reads per readiness event before yielding to other connections (fairness under ET).
const READ_BUDGET: usize = 32;
/// Stop reading a connection whose peer does not drain its echoes...
const HIGH_WATER: usize = 1 << 20;
/// ...and resume once this little is still queued.
const LOW_WATER: usize = 256 << 10;
const SCRATCH: usize = 64 << 10;

/// The request path that asks for server push.
pub const PUSH_PATH: &str = "/push";
/// Largest pushed message a client may ask for.
pub const MAX_PUSH_SIZE: usize = 1 << 20;

/// Server push, asked for with the request target `/push`, optionally `?rate=R&size=S`: from
/// the upgrade on, the backend sends the client `R` messages a second (10 by default), each
/// a binary message of `S` bytes (512 by default) whose first 8 are its CLOCK_MONOTONIC send
/// time in nanoseconds (little-endian), so a client on the same machine measures one-way
/// latency. The path passes unchanged through every proxy in the benchmark. Whatever the
/// client sends is still echoed. A client that stops reading misses pushes (nothing queues
/// past [`HIGH_WATER`]) rather than growing the backend's memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Push {
    pub period: Duration,
    pub size: usize,
}

impl Push {
    /// `Ok(None)` for any other target; `Err` for a push request with a bad parameter.
    pub fn from_target(target: &[u8]) -> Result<Option<Push>, String> {
        let Ok(target) = std::str::from_utf8(target) else {
            return Ok(None);
        };
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        if path != PUSH_PATH {
            return Ok(None);
        }
        let (mut rate, mut size) = (10.0_f64, 512_usize);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let bad = || format!("bad push parameter {pair:?}");
            match pair.split_once('=') {
                Some(("rate", v)) => rate = v.parse().map_err(|_| bad())?,
                Some(("size", v)) => size = v.parse().map_err(|_| bad())?,
                _ => return Err(bad()),
            }
        }
        if !(rate > 0.0 && rate <= 1e6) {
            return Err(format!("push rate {rate} is not within (0, 1e6]"));
        }
        if !(8..=MAX_PUSH_SIZE).contains(&size) {
            return Err(format!(
                "push size {size} is not within 8..={MAX_PUSH_SIZE}"
            ));
        }
        Ok(Some(Push {
            period: Duration::from_secs_f64(1.0 / rate),
            size,
        }))
    }
}

/// When each pushing connection sends next: (due, slot, connection serial). The serial
/// tells a slot's current connection from an earlier one that held it.
type PushTimers = BinaryHeap<Reverse<(Instant, usize, u64)>>;

/// Binds `threads` listeners on `addr` (port 0 picks one port for all), reports the bound
/// address on `ready`, then serves until `stop` is set.
pub fn run_echo(
    addr: SocketAddr,
    threads: usize,
    ready: Sender<SocketAddr>,
    stop: Arc<AtomicBool>,
) -> io::Result<()> {
    let first = bind_reuseport(addr)?;
    let bound = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..threads.max(1) {
        listeners.push(bind_reuseport(bound)?);
    }
    let handles = listeners
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let stop = stop.clone();
            thread::Builder::new()
                .name(format!("echo-{i}"))
                .spawn(move || serve(l, &stop))
        })
        .collect::<io::Result<Vec<_>>>()?;
    let _ = ready.send(bound);
    for h in handles {
        h.join()
            .map_err(|_| io::Error::other("echo thread panicked"))??;
    }
    Ok(())
}

fn bind_reuseport(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    Ok(sock.into())
}

struct Conn {
    stream: TcpStream,
    /// The upgrade request while it is still arriving; `None` once upgraded.
    head: Option<Vec<u8>>,
    dec: Decoder,
    /// No more input will be echoed (close frame seen, EOF, or refused handshake); the
    /// socket closes once `wbuf` is flushed.
    closing: bool,
    wbuf: Vec<u8>,
    wpos: usize,
    writable_armed: bool,
    paused: bool,
    /// Set by a `/push` upgrade; `push_armed` once its timer runs.
    push: Option<Push>,
    push_armed: bool,
    serial: u64,
}

impl Conn {
    fn queued(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// Turns received bytes into the bytes to send back, appended to `out`.
    fn process(&mut self, mut data: &mut [u8], out: &mut Vec<u8>) -> io::Result<()> {
        if let Some(head) = &mut self.head {
            let before = head.len();
            head.extend_from_slice(data);
            let Some(end) = ws::head_end(head) else {
                return match head.len() > ws::MAX_HANDSHAKE {
                    true => Err(io::ErrorKind::InvalidData.into()),
                    false => Ok(()),
                };
            };
            let accepted = match ws::request_target(&head[..end]).map(Push::from_target) {
                Some(Err(_)) => {
                    ws::bad_request(out);
                    false
                }
                push => {
                    self.push = push.and_then(Result::ok).flatten();
                    ws::server_response(&head[..end], out)
                }
            };
            if !accepted {
                self.push = None;
                self.closing = true;
            }
            data = &mut data[end - before..];
            self.head = None;
        }
        while !self.closing {
            let piece = self
                .dec
                .next(&mut data)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
            match piece {
                None => break,
                Some(Piece::Header(h)) => {
                    let op = if h.opcode == OPCODE_PING {
                        OPCODE_PONG
                    } else {
                        h.opcode
                    };
                    ws::write_header(out, h.fin, op, None, h.payload_len);
                }
                Some(Piece::Payload(chunk)) => out.extend_from_slice(chunk),
                Some(Piece::End(h)) => self.closing = h.opcode == OPCODE_CLOSE,
            }
        }
        Ok(())
    }

    /// Sends `out` now if nothing is queued ahead of it, otherwise queues it.
    fn send(&mut self, out: &[u8]) -> io::Result<()> {
        let mut done = 0;
        if self.queued() == 0 {
            while done < out.len() {
                match self.stream.write(&out[done..]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        self.wbuf.extend_from_slice(&out[done..]);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        while self.wpos < self.wbuf.len() {
            match self.stream.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        }
        Ok(())
    }

    /// Reads and echoes; true when the read budget ran out before the socket was drained.
    ///
    /// A short read ends the pass without the extra read that would return EAGAIN (one
    /// syscall per message saved): epoll reports any data that arrives later as a new edge.
    /// Only when the event already carried a hang-up must we read on to see the EOF.
    fn read(&mut self, scratch: &mut [u8], out: &mut Vec<u8>, hup: bool) -> io::Result<bool> {
        for _ in 0..READ_BUDGET {
            if self.closing {
                return Ok(false);
            }
            if self.queued() > HIGH_WATER {
                self.paused = true;
                return Ok(false);
            }
            let n = match self.stream.read(scratch) {
                Ok(0) => {
                    self.closing = true;
                    return Ok(false);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            out.clear();
            self.process(&mut scratch[..n], out)?;
            self.send(out)?;
            if n < scratch.len() && !hup {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Handles one readiness event; `Ok(false)` means the connection is finished.
    /// `ev` is (readable, hung up); `None` means "read fully, the event state is unknown".
    fn ready(
        &mut self,
        ev: Option<(bool, bool)>,
        buf: &mut Buffers,
        token: Token,
    ) -> io::Result<bool> {
        self.flush()?;
        let (mut can_read, mut hup) = ev.unwrap_or((true, true));
        if self.paused && self.queued() <= LOW_WATER {
            self.paused = false;
            (can_read, hup) = (true, true);
        }
        if can_read && !self.paused && self.read(&mut buf.scratch, &mut buf.out, hup)? {
            buf.again.push(token);
        }
        if self.closing && self.queued() == 0 {
            let _ = self.stream.shutdown(Shutdown::Write);
            return Ok(false);
        }
        Ok(true)
    }

    /// Sends one pushed message stamped with the time now, unless the client is closing or
    /// not keeping up.
    fn push_one(&mut self, size: usize, buf: &mut Buffers) -> io::Result<()> {
        if self.closing || self.head.is_some() || self.queued() > HIGH_WATER {
            return Ok(());
        }
        if buf.filler.len() < size - 8 {
            buf.filler = (0..size - 8).map(|i| b'a' + (i % 26) as u8).collect();
        }
        buf.out.clear();
        ws::write_header(&mut buf.out, true, OPCODE_BINARY, None, size as u64);
        buf.out
            .extend_from_slice(&sys::monotonic_ns().to_le_bytes());
        buf.out.extend_from_slice(&buf.filler[..size - 8]);
        let out = std::mem::take(&mut buf.out);
        let sent = self.send(&out);
        buf.out = out;
        sent
    }

    fn update_interest(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let want = self.queued() > 0;
        if want != self.writable_armed {
            let interest = match want {
                true => Interest::READABLE | Interest::WRITABLE,
                false => Interest::READABLE,
            };
            registry.reregister(&mut self.stream, token, interest)?;
            self.writable_armed = want;
        }
        Ok(())
    }
}

/// Per-loop buffers: connections own nothing but their unsent bytes.
struct Buffers {
    scratch: Vec<u8>,
    out: Vec<u8>,
    again: Vec<Token>,
    /// The bytes after a pushed message's timestamp.
    filler: Vec<u8>,
}

fn serve(listener: std::net::TcpListener, stop: &AtomicBool) -> io::Result<()> {
    let mut listener = TcpListener::from_std(listener);
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut buf = Buffers {
        scratch: vec![0; SCRATCH],
        out: Vec::with_capacity(SCRATCH + 1024),
        again: Vec::new(),
        filler: Vec::new(),
    };
    let mut timers = PushTimers::new();
    let mut serial = 0u64;
    let mut rng = Rng::seeded();
    while !stop.load(Ordering::Relaxed) {
        let timeout = match timers.peek() {
            _ if !buf.again.is_empty() => Duration::ZERO,
            Some(Reverse((due, ..))) => due.saturating_duration_since(Instant::now()),
            None => STOP_CHECK,
        }
        .min(STOP_CHECK);
        match poll.poll(&mut events, Some(timeout)) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => r?,
        }
        let retry = std::mem::take(&mut buf.again);
        let ready = events.iter().map(|e| {
            let hup = e.is_read_closed() || e.is_error();
            (e.token(), Some((e.is_readable() || hup, hup)))
        });
        for (token, ev) in ready.chain(retry.into_iter().map(|t| (t, None))) {
            if token == LISTENER {
                accept_all(
                    &listener,
                    poll.registry(),
                    &mut conns,
                    &mut free,
                    &mut serial,
                );
                continue;
            }
            let idx = token.0 - 1;
            let Some(conn) = conns.get_mut(idx).and_then(Option::as_mut) else {
                continue;
            };
            let keep = conn
                .ready(ev, &mut buf, token)
                .and_then(|keep| match keep {
                    true => conn.update_interest(poll.registry(), token).map(|_| true),
                    false => Ok(false),
                })
                .unwrap_or(false);
            if !keep {
                conns[idx] = None;
                free.push(idx);
            } else if let Some(p) = conn.push.filter(|_| !conn.push_armed) {
                // The 101 just went out. A random first phase spreads connections that
                // upgraded together over the period.
                conn.push_armed = true;
                let phase = p
                    .period
                    .mul_f64((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64);
                timers.push(Reverse((Instant::now() + phase, idx, conn.serial)));
            }
        }
        push_due(
            &mut timers,
            &mut conns,
            &mut free,
            poll.registry(),
            &mut buf,
        );
    }
    Ok(())
}

/// Sends every push that is due and schedules each connection's next one. A loop that fell
/// more than a period behind resumes from now instead of sending a burst.
fn push_due(
    timers: &mut PushTimers,
    conns: &mut [Option<Conn>],
    free: &mut Vec<usize>,
    registry: &Registry,
    buf: &mut Buffers,
) {
    let now = Instant::now();
    while let Some(&Reverse((due, idx, serial))) = timers.peek() {
        if due > now {
            return;
        }
        timers.pop();
        let Some(conn) = conns[idx].as_mut().filter(|c| c.serial == serial) else {
            continue;
        };
        let Some(p) = conn.push else {
            continue;
        };
        let token = Token(idx + 1);
        if conn
            .push_one(p.size, buf)
            .and_then(|_| conn.update_interest(registry, token))
            .is_err()
        {
            conns[idx] = None;
            free.push(idx);
            continue;
        }
        let next = due + p.period;
        let next = if next > now { next } else { now + p.period };
        timers.push(Reverse((next, idx, serial)));
    }
}

fn accept_all(
    listener: &TcpListener,
    registry: &Registry,
    conns: &mut Vec<Option<Conn>>,
    free: &mut Vec<usize>,
    serial: &mut u64,
) {
    loop {
        let mut stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // WouldBlock ends the batch; EMFILE and friends leave the rest in the backlog.
            Err(_) => return,
        };
        let _ = stream.set_nodelay(true);
        let idx = free.pop().unwrap_or_else(|| {
            conns.push(None);
            conns.len() - 1
        });
        if registry
            .register(&mut stream, Token(idx + 1), Interest::READABLE)
            .is_err()
        {
            free.push(idx);
            continue;
        }
        conns[idx] = Some(Conn {
            stream,
            head: Some(Vec::new()),
            dec: Decoder::default(),
            closing: false,
            wbuf: Vec::new(),
            wpos: 0,
            writable_armed: false,
            paused: false,
            push: None,
            push_armed: false,
            serial: *serial,
        });
        *serial += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_parameters() {
        let p = |t: &str| Push::from_target(t.as_bytes());
        assert_eq!(p("/echo"), Ok(None));
        assert_eq!(p("/pushy"), Ok(None));
        let default = Push {
            period: Duration::from_millis(100),
            size: 512,
        };
        assert_eq!(p("/push"), Ok(Some(default)));
        assert_eq!(
            p("/push?rate=50&size=64"),
            Ok(Some(Push {
                period: Duration::from_millis(20),
                size: 64
            }))
        );
        for bad in [
            "/push?rate=0",
            "/push?size=4",
            "/push?size=x",
            "/push?speed=1",
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }
}
