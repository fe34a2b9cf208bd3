//! The client's side of a connection: plain TCP (`ws://`), or TLS (`wss://`) terminated by
//! rustls in userspace or by the kernel.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::protocols::tls::{ktls::KtlsStream, read_ahead::ReadAhead};

pub enum ClientStream {
    Plain(TcpStream),
    /// rustls encrypts and decrypts in this process.
    Tls(Box<tokio_rustls::server::TlsStream<ReadAhead<TcpStream>>>),
    /// The kernel encrypts and decrypts; reads and writes are plaintext.
    Ktls(KtlsStream),
}

impl ClientStream {
    pub fn tls(&self) -> bool {
        !matches!(self, ClientStream::Plain(_))
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            ClientStream::Plain(s) => s,
            ClientStream::Tls(s) => s.get_ref().0.get_ref(),
            ClientStream::Ktls(s) => s.tcp(),
        }
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            ClientStream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            ClientStream::Tls($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
            ClientStream::Ktls($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match each!(self, s => s.poll_read(cx, buf)) {
            // A TCP close without TLS's close_notify (most browsers and many clients end so):
            // rustls reports a possible truncation. WebSocket frames carry their own lengths
            // and the closing handshake is in-band, so this is the client's EOF, as on `ws://`.
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Ok(())),
            other => other,
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_shutdown(cx))
    }
}
