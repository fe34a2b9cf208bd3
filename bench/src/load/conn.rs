//! One client WebSocket connection: nonblocking connect, TLS for `wss://`, upgrade, buffered
//! writes and streaming reads. Workloads decide what to send; this only moves bytes correctly.

use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};

use crate::sys::Rng;
use crate::ws::{self, Decoder, OPCODE_CLOSE, OPCODE_PING, OPCODE_PONG, Piece};

/// Where to connect and what to put in the request line and Host header.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
    /// Set for `wss://`.
    pub tls: Option<TlsTarget>,
}

#[derive(Clone, Debug)]
pub struct TlsTarget {
    pub config: Arc<ClientConfig>,
    /// Sent as SNI (rustls sends none for an IP address).
    pub name: ServerName<'static>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Connecting,
    Handshaking,
    Open,
    Dead,
}

/// A complete received frame. Only the first bytes of a data payload are kept: workloads
/// need the embedded timestamp, never the filler.
pub enum Msg<'a> {
    Data(&'a [u8]),
    Close,
}

/// Control payloads are at most 125 bytes, and data frames only need 8.
const PREFIX: usize = 125;

pub struct Client {
    stream: Option<TcpStream>,
    /// For `wss://`: everything written goes through it, everything read comes out of it.
    tls: Option<Box<ClientConnection>>,
    token: Token,
    pub state: State,
    /// When the connect started: handshake timeouts and connect-to-echo latency.
    pub started: Instant,
    /// Messages sent and not yet echoed.
    pub in_flight: u32,
    accept: [u8; ws::ACCEPT_LEN],
    /// The upgrade response while it arrives, then whatever followed it.
    inbuf: Vec<u8>,
    /// Bytes the socket has not taken (plain connections; TLS ones queue inside rustls).
    wbuf: Vec<u8>,
    wpos: usize,
    writable_armed: bool,
    dec: Decoder,
    opcode: u8,
    prefix: [u8; PREFIX],
    prefix_len: u8,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Client {
    pub fn dead(token: Token) -> Client {
        Client {
            stream: None,
            tls: None,
            token,
            state: State::Dead,
            started: Instant::now(),
            in_flight: 0,
            accept: [0; ws::ACCEPT_LEN],
            inbuf: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            writable_armed: false,
            dec: Decoder::default(),
            opcode: 0,
            prefix: [0; PREFIX],
            prefix_len: 0,
        }
    }

    pub fn connect(registry: &Registry, target: &Target, token: Token) -> io::Result<Client> {
        let tls = match &target.tls {
            Some(t) => {
                let mut conn = ClientConnection::new(t.config.clone(), t.name.clone())
                    .map_err(io::Error::other)?;
                // The workloads bound what is in flight; a limit here would only cut a bulk
                // message short.
                conn.set_buffer_limit(None);
                Some(Box::new(conn))
            }
            None => None,
        };
        let mut stream = TcpStream::connect(target.addr)?;
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        let mut c = Client::dead(token);
        c.stream = Some(stream);
        c.tls = tls;
        c.state = State::Connecting;
        c.writable_armed = true;
        Ok(c)
    }

    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// Drops the socket (which also removes it from the poll).
    pub fn kill(&mut self) {
        self.stream = None;
        self.tls = None;
        self.state = State::Dead;
        self.in_flight = 0;
    }

    /// Moves a connecting or handshaking client on after an event: `Ok(true)` once open.
    pub fn advance(
        &mut self,
        registry: &Registry,
        target: &Target,
        rng: &mut Rng,
        scratch: &mut [u8],
    ) -> io::Result<bool> {
        if self.state == State::Connecting {
            let s = self.stream.as_mut().ok_or(io::ErrorKind::NotConnected)?;
            if let Some(e) = s.take_error()? {
                return Err(e);
            }
            match s.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(false),
                Err(e) => return Err(e),
            }
            s.set_nodelay(true)?;
            let mut key = [0u8; 16];
            rng.fill(&mut key);
            let key = STANDARD.encode(key);
            self.accept = ws::accept_key(key.as_bytes());
            let mut request = Vec::new();
            ws::client_request(&mut request, &target.host, &target.path, &key);
            // Over TLS, rustls holds the request until its handshake is done: the TLS and
            // WebSocket handshakes run back to back with no wait of ours in between.
            self.queue(&[&request]);
            self.state = State::Handshaking;
        }
        if self.state != State::Handshaking {
            return Ok(self.is_open());
        }
        self.flush(registry)?;
        let eof = self.pull(registry, scratch, false, &mut |c, data| {
            c.inbuf.extend_from_slice(data);
            Ok(())
        })?;
        let Some(end) = ws::head_end(&self.inbuf) else {
            return match (self.inbuf.len() > ws::MAX_HANDSHAKE, eof) {
                (true, _) => Err(io::ErrorKind::InvalidData.into()),
                (_, true) => Err(io::ErrorKind::UnexpectedEof.into()),
                _ => Ok(false),
            };
        };
        ws::check_response(&self.inbuf[..end], &self.accept).map_err(io::Error::other)?;
        self.inbuf.drain(..end);
        if self.inbuf.is_empty() {
            self.inbuf = Vec::new();
        }
        self.state = State::Open;
        Ok(true)
    }

    /// Writes `parts` as one contiguous message: straight to the socket (one writev) when
    /// nothing is queued, otherwise behind the queued bytes; over TLS, encrypted and written
    /// as far as the socket takes it.
    pub fn send(&mut self, registry: &Registry, parts: &[&[u8]]) -> io::Result<()> {
        if self.tls.is_some() {
            self.queue(parts);
            return self.flush(registry);
        }
        if self.wpos < self.wbuf.len() {
            parts.iter().for_each(|p| self.wbuf.extend_from_slice(p));
            return Ok(());
        }
        let s = self.stream.as_mut().ok_or(io::ErrorKind::NotConnected)?;
        let mut io = [IoSlice::new(&[]); 4];
        for (slot, p) in io.iter_mut().zip(parts) {
            *slot = IoSlice::new(p);
        }
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut written = loop {
            match s.write_vectored(&io[..parts.len().min(4)]) {
                Ok(n) => break n,
                Err(e) if would_block(&e) => break 0,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        if written == total {
            return Ok(());
        }
        for p in parts {
            let skip = written.min(p.len());
            self.wbuf.extend_from_slice(&p[skip..]);
            written -= skip;
        }
        self.set_interest(registry)
    }

    /// Queues `parts` as one contiguous message behind whatever waits: in `wbuf`, or in
    /// rustls as one record (or as few as its size needs), never a record per part.
    fn queue(&mut self, parts: &[&[u8]]) {
        match self.tls.as_mut() {
            Some(tls) => {
                let mut io = [IoSlice::new(&[]); 4];
                for (slot, p) in io.iter_mut().zip(parts) {
                    *slot = IoSlice::new(p);
                }
                // Without a buffer limit rustls takes everything; it cannot fail.
                let _ = tls.writer().write_vectored(&io[..parts.len().min(4)]);
            }
            None => parts.iter().for_each(|p| self.wbuf.extend_from_slice(p)),
        }
    }

    /// Whether bytes wait for the socket to take them.
    fn write_pending(&self) -> bool {
        match &self.tls {
            Some(tls) => tls.wants_write(),
            None => self.wpos < self.wbuf.len(),
        }
    }

    pub fn flush(&mut self, registry: &Registry) -> io::Result<()> {
        let s = self.stream.as_mut().ok_or(io::ErrorKind::NotConnected)?;
        if let Some(tls) = self.tls.as_mut() {
            while tls.wants_write() {
                match tls.write_tls(s) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(_) => {}
                    Err(e) if would_block(&e) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            return self.set_interest(registry);
        }
        while self.wpos < self.wbuf.len() {
            match s.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.wpos += n,
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        }
        self.set_interest(registry)
    }

    /// Asks for EPOLLOUT only while bytes wait (or the connect is pending), so a busy
    /// connection is not woken for every ACK.
    fn set_interest(&mut self, registry: &Registry) -> io::Result<()> {
        let want = self.state == State::Connecting || self.write_pending();
        if want != self.writable_armed {
            let s = self.stream.as_mut().ok_or(io::ErrorKind::NotConnected)?;
            let interest = match want {
                true => Interest::READABLE | Interest::WRITABLE,
                false => Interest::READABLE,
            };
            registry.reregister(s, self.token, interest)?;
            self.writable_armed = want;
        }
        Ok(())
    }

    /// Reads until the socket is drained, calling `on_msg` per complete frame and answering
    /// pings. Returns true on EOF.
    ///
    /// Unless the event carried a hang-up (`hup`), a short read counts as drained: data that
    /// arrives later raises a new edge, so the read that would return EAGAIN is skipped.
    pub fn read_msgs(
        &mut self,
        registry: &Registry,
        scratch: &mut [u8],
        hup: bool,
        mut on_msg: impl FnMut(Msg<'_>),
    ) -> io::Result<bool> {
        if !self.inbuf.is_empty() {
            let mut early = std::mem::take(&mut self.inbuf);
            self.decode(&mut early, registry, &mut on_msg)?;
        }
        self.pull(registry, scratch, hup, &mut |c, data| {
            c.decode(data, registry, &mut on_msg)
        })
    }

    /// Reads until the socket is drained (see [`Client::read_msgs`] on `hup`), handing what
    /// the peer sent (decrypted, for TLS) to `sink` in pieces. Returns true on EOF.
    fn pull(
        &mut self,
        registry: &Registry,
        scratch: &mut [u8],
        hup: bool,
        sink: &mut dyn FnMut(&mut Client, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<bool> {
        if self.tls.is_some() {
            return self.pull_tls(registry, scratch, hup, sink);
        }
        loop {
            let s = self.stream.as_mut().ok_or(io::ErrorKind::NotConnected)?;
            let n = match s.read(scratch) {
                Ok(0) => return Ok(true),
                Ok(n) => n,
                Err(e) if would_block(&e) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            sink(self, &mut scratch[..n])?;
            if n < scratch.len() && !hup {
                return Ok(false);
            }
        }
    }

    /// [`Client::pull`] through rustls: half of `scratch` takes ciphertext from the socket,
    /// the other half plaintext out of rustls. Plaintext is taken out before each piece of
    /// ciphertext goes in, as rustls refuses more while over a record's worth waits. The
    /// handshake's own answers (the client's Finished) are written on the way.
    fn pull_tls(
        &mut self,
        registry: &Registry,
        scratch: &mut [u8],
        hup: bool,
        sink: &mut dyn FnMut(&mut Client, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<bool> {
        let (cipher, plain) = scratch.split_at_mut(scratch.len() / 2);
        loop {
            let s = self.stream.as_mut().ok_or(io::ErrorKind::NotConnected)?;
            let n = match s.read(cipher) {
                Ok(n) => n,
                Err(e) if would_block(&e) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            // At EOF the empty slice goes in too: that is how rustls learns of it.
            let mut src = &cipher[..n];
            let mut told_eof = false;
            let eof = loop {
                let tls = self.tls.as_mut().ok_or(io::ErrorKind::NotConnected)?;
                match tls.reader().read(plain) {
                    // close_notify.
                    Ok(0) => break true,
                    Ok(m) => {
                        sink(self, &mut plain[..m])?;
                        continue;
                    }
                    Err(e) if would_block(&e) => {}
                    // The TCP connection closed without close_notify: an end all the same,
                    // as for a plain connection.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break true,
                    Err(e) => return Err(e),
                }
                if src.is_empty() && (n > 0 || told_eof) {
                    break n == 0;
                }
                told_eof = n == 0;
                tls.read_tls(&mut src)?;
                tls.process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            };
            if self.write_pending() {
                self.flush(registry)?;
            }
            if eof {
                return Ok(true);
            }
            if n < cipher.len() && !hup {
                return Ok(false);
            }
        }
    }

    /// The TLS session's parameters once its handshake is done (`None` for plain ones), as
    /// "TLSv1_3 TLS13_AES_128_GCM_SHA256 X25519 Full".
    pub fn tls_session(&self) -> Option<String> {
        let tls = self.tls.as_ref()?;
        let kind = tls.handshake_kind()?;
        Some(format!(
            "{:?} {:?} {:?} {kind:?}",
            tls.protocol_version()?,
            tls.negotiated_cipher_suite()?.suite(),
            tls.negotiated_key_exchange_group()?.name(),
        ))
    }

    fn decode(
        &mut self,
        data: &mut [u8],
        registry: &Registry,
        on_msg: &mut impl FnMut(Msg<'_>),
    ) -> io::Result<()> {
        let mut rest = data;
        loop {
            let piece = self
                .dec
                .next(&mut rest)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e:?}")))?;
            match piece {
                None => return Ok(()),
                Some(Piece::Header(h)) => {
                    self.opcode = h.opcode;
                    self.prefix_len = 0;
                }
                Some(Piece::Payload(chunk)) => {
                    let have = self.prefix_len as usize;
                    let take = chunk.len().min(PREFIX - have);
                    self.prefix[have..have + take].copy_from_slice(&chunk[..take]);
                    self.prefix_len += take as u8;
                }
                Some(Piece::End(h)) => {
                    let payload = &self.prefix[..self.prefix_len as usize];
                    match h.opcode {
                        OPCODE_PING => {
                            let mut pong = Vec::with_capacity(PREFIX + 6);
                            ws::write_frame(&mut pong, OPCODE_PONG, Some([7, 3, 5, 1]), payload);
                            self.send(registry, &[&pong])?;
                        }
                        OPCODE_PONG => {}
                        OPCODE_CLOSE => on_msg(Msg::Close),
                        _ if h.fin => on_msg(Msg::Data(payload)),
                        _ => {}
                    }
                }
            }
        }
    }
}
