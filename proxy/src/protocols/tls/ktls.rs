//! Kernel TLS: after rustls' handshake the session keys go into the socket (`TCP_ULP`
//! "tls"), and from then on the kernel encrypts what is written and decrypts what is read.
//! The `ktls` crate installs the keys; the stream here reads and writes the socket itself,
//! because a hostile client can send any record type after the handshake and every one
//! must end in an error or an EOF, never a panic.

use std::{
    io,
    os::fd::{AsRawFd, RawFd},
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::rustls::SupportedCipherSuite;

/// `SOL_TLS` and its control message types (linux/tls.h).
const SOL_TLS: libc::c_int = 282;
const TLS_SET_RECORD_TYPE: libc::c_int = 1;
const TLS_GET_RECORD_TYPE: libc::c_int = 2;
const RECORD_ALERT: u8 = 21;
const RECORD_HANDSHAKE: u8 = 22;
const RECORD_APPLICATION_DATA: u8 = 23;
const ALERT_FATAL: u8 = 2;
const ALERT_CLOSE_NOTIFY: u8 = 0;

/// Which cipher suites this kernel can take over, found by trying each on a loopback socket.
#[derive(Debug)]
pub struct KernelTls {
    ciphers: ktls::CompatibleCiphers,
}

impl KernelTls {
    /// `None` when the kernel has no TLS (`CONFIG_TLS` unset, or the module cannot load).
    pub async fn probe() -> Option<KernelTls> {
        let ciphers = ktls::CompatibleCiphers::new().await.ok()?;
        let any = [&ciphers.tls13, &ciphers.tls12]
            .iter()
            .any(|v| v.aes_gcm_128 || v.aes_gcm_256 || v.chacha20_poly1305);
        any.then_some(KernelTls { ciphers })
    }

    pub fn supports(&self, suite: SupportedCipherSuite) -> bool {
        self.ciphers.is_compatible(suite)
    }
}

/// A TCP socket whose TLS records the kernel encrypts and decrypts.
pub struct KtlsStream {
    tcp: TcpStream,
    /// Plaintext rustls had already decrypted when the keys moved to the kernel (a client may
    /// send its request in the same flight as its Finished).
    drained: Option<(usize, Vec<u8>)>,
    read_closed: bool,
    write_closed: bool,
}

impl KtlsStream {
    /// Moves a finished handshake's keys into the kernel.
    pub async fn from_rustls(
        tls: tokio_rustls::server::TlsStream<ktls::CorkStream<TcpStream>>,
    ) -> Result<KtlsStream, ktls::Error> {
        let (drained, tcp) = ktls::config_ktls_server(tls).await?.into_raw();
        Ok(KtlsStream {
            tcp,
            drained: drained.map(|d| (0, d)),
            read_closed: false,
            write_closed: false,
        })
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }
}

/// What one `recvmsg` on a kTLS socket returned.
enum Record {
    Data(usize),
    Alert {
        level: u8,
        description: u8,
    },
    /// A post-handshake message (a TLS 1.3 key update): the kernel cannot follow it.
    Handshake,
    Other(u8),
}

fn recv_record(fd: RawFd, buf: &mut [u8]) -> io::Result<Record> {
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(1) } as usize;
    let mut control = [0u64; 4];
    debug_assert!(space <= std::mem::size_of_val(&control));
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: zeroed msghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: fd is an open socket; msg points at live buffers.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: msg was filled by the kernel; the macros walk its control buffer.
    let record_type = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null()
            || (*cmsg).cmsg_level != SOL_TLS
            || (*cmsg).cmsg_type != TLS_GET_RECORD_TYPE
        {
            // No record type: end of stream (n == 0) or plain data.
            RECORD_APPLICATION_DATA
        } else {
            *libc::CMSG_DATA(cmsg)
        }
    };
    Ok(match record_type {
        RECORD_APPLICATION_DATA => Record::Data(n),
        RECORD_ALERT if n >= 2 => Record::Alert {
            level: buf[0],
            description: buf[1],
        },
        // A truncated alert still ends the session: every alert here does.
        RECORD_ALERT => Record::Alert {
            level: ALERT_FATAL,
            description: 0xff,
        },
        RECORD_HANDSHAKE => Record::Handshake,
        other => Record::Other(other),
    })
}

/// Sends a TLS alert record (close_notify) through the kernel's encryption.
fn send_close_notify(fd: RawFd) -> io::Result<()> {
    let alert = [1u8, ALERT_CLOSE_NOTIFY];
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(1) } as usize;
    let mut control = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: alert.as_ptr() as *mut _,
        iov_len: alert.len(),
    };
    // SAFETY: as in recv_record; the control buffer is sized by CMSG_SPACE(1).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = SOL_TLS;
        (*cmsg).cmsg_type = TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(cmsg) = RECORD_ALERT;
        if libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl AsyncRead for KtlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some((at, drained)) = &mut this.drained {
            let n = (drained.len() - *at).min(buf.remaining());
            buf.put_slice(&drained[*at..*at + n]);
            *at += n;
            if *at == drained.len() {
                this.drained = None;
            }
            return Poll::Ready(Ok(()));
        }
        if this.read_closed || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(this.tcp.poll_read_ready(cx))?;
            let fd = this.tcp.as_raw_fd();
            let unfilled = buf.initialize_unfilled();
            let record = match this
                .tcp
                .try_io(Interest::READABLE, || recv_record(fd, unfilled))
            {
                Ok(record) => record,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            };
            match record {
                Record::Data(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Record::Alert { description, .. } if description == ALERT_CLOSE_NOTIFY => {
                    this.read_closed = true;
                    return Poll::Ready(Ok(()));
                }
                Record::Alert { level, description } if level == ALERT_FATAL => {
                    this.read_closed = true;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!("client sent TLS alert {description}"),
                    )));
                }
                // A warning alert other than close_notify changes nothing.
                Record::Alert { .. } => continue,
                Record::Handshake => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "post-handshake TLS message (key update) on a kernel TLS socket",
                    )));
                }
                Record::Other(t) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected TLS record type {t}"),
                    )));
                }
            }
        }
    }
}

impl AsyncWrite for KtlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_closed {
            // The alert is one small record; a full send buffer only delays it.
            ready!(self.tcp.poll_write_ready(cx))?;
            let fd = self.tcp.as_raw_fd();
            match self
                .tcp
                .try_io(Interest::WRITABLE, || send_close_notify(fd))
            {
                Ok(()) => self.write_closed = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}
