//! A read-ahead buffer under rustls. rustls reads at most 4 KiB at a time, which makes a
//! 64 KiB message sixteen `recv` calls; this reads what the socket has, up to 64 KiB, in one
//! and hands it out in rustls' pieces. It reads ahead only after a read filled rustls' whole
//! request (more is likely waiting), so small messages cost no buffer; the buffer exists only
//! while it holds bytes, so an idle connection keeps none.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const READ_AHEAD: usize = 64 * 1024;

pub struct ReadAhead<S> {
    inner: S,
    buf: Vec<u8>,
    at: usize,
    /// The last read filled what it was given: read ahead next time.
    busy: bool,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            buf: Vec::new(),
            at: 0,
            busy: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at == this.buf.len() {
            if !this.busy || out.remaining() >= READ_AHEAD {
                let wanted = out.remaining();
                let before = out.filled().len();
                ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
                this.busy = wanted > 0 && out.filled().len() - before == wanted;
                return Poll::Ready(Ok(()));
            }
            // Uninitialised: zeroing 64 KiB for a 500-byte message would cost more than the
            // calls it saves.
            let mut buf = Vec::with_capacity(READ_AHEAD);
            let mut read = ReadBuf::uninit(buf.spare_capacity_mut());
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            this.busy = n == READ_AHEAD;
            // SAFETY: the reader initialised the first `n` bytes of the spare capacity.
            unsafe { buf.set_len(n) };
            this.buf = buf;
            this.at = 0;
        }
        let n = (this.buf.len() - this.at).min(out.remaining());
        out.put_slice(&this.buf[this.at..this.at + n]);
        this.at += n;
        if this.at == this.buf.len() {
            this.buf = Vec::new();
            this.at = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn small_reads_get_every_byte_in_order_and_the_buffer_goes_when_drained() {
        let (mut tx, rx) = tokio::io::duplex(256 * 1024);
        let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        tx.write_all(&sent).await.unwrap();
        drop(tx);
        let mut reader = ReadAhead::new(rx);
        let mut got = Vec::new();
        let mut piece = [0u8; 4096];
        loop {
            let n = reader.read(&mut piece).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&piece[..n]);
        }
        assert_eq!(got, sent);
        assert_eq!(reader.buf.capacity(), 0, "no buffer kept once drained");
    }
}
