//! The one framed copy loop, after linkerd's `duplex`: it knows only `AsyncRead` and
//! `AsyncWrite`, so a plain socket, a dup of one, or a TLS stream plug in alike. What a
//! direction does with the bytes it moves (accounting, refusing a frame, holding some back)
//! is its [`Leg`].
//!
//! Memory: an idle direction holds no buffer. Reads go into one scratch buffer per runtime
//! thread and are written straight on; only bytes the receiver does not take at once are
//! copied into a backlog of this direction's own, freed as soon as it drains. Thousands of
//! idle WebSockets then cost their sockets and a few hundred bytes of state each.

use std::{
    cell::RefCell,
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{clock::monotonic_ns, protocols::frames::FrameError};

/// Bytes taken from the sender per read: a 64 KiB message moves in one. Per runtime thread,
/// not per connection.
const SCRATCH_LEN: usize = 64 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH_LEN].into_boxed_slice());
}

/// A frame a [`Leg`] refused while accounting: `before` bytes of the chunk came before it
/// (whole frames that still go on), when its header began in that chunk.
#[derive(Debug, Clone, Copy)]
pub struct Refusal {
    pub error: FrameError,
    pub before: Option<usize>,
}

/// What one direction does with the bytes it moves.
pub trait Leg {
    /// Accounts bytes just read, in order.
    fn account(&mut self, bytes: &[u8]) -> Result<(), Refusal>;
    /// How many of `n` bytes just accounted may go on; the rest are dropped.
    fn forwardable(&mut self, n: usize) -> usize {
        n
    }
    /// `n` more bytes were taken by the receiver.
    fn forwarded(&mut self, _n: usize) {}
    /// Everything read so far was taken by the receiver (nothing is held back).
    fn caught_up(&mut self) {}
}

/// How a direction stopped without an I/O error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfEnd {
    /// The sender's EOF; everything before it was delivered. The caller passes the FIN on.
    Eof,
    /// A frame was refused; the whole frames before it were delivered, and `whole` says
    /// whether the receiver's stream ends between frames.
    Refused { error: FrameError, whole: bool },
}

/// Which side of a direction failed.
#[derive(Debug)]
pub enum HalfError {
    Read(io::Error),
    Write(io::Error),
}

impl From<HalfError> for io::Error {
    fn from(e: HalfError) -> Self {
        match e {
            HalfError::Read(e) | HalfError::Write(e) => e,
        }
    }
}

/// One direction of a copy: its leg and the bytes its receiver has not taken yet.
pub struct Half<L> {
    pub leg: L,
    backlog: Vec<u8>,
    written: usize,
    refused: Option<(FrameError, bool)>,
    /// Writes in a row that took nothing (see `poll_drain`).
    zero_writes: u32,
    /// Bytes read but not yet accounted because a frame among them is over the sender's
    /// rate: nothing more is read until they have gone on (TCP then holds the sender back).
    /// Empty, and unallocated, unless the sender is being throttled.
    held: Vec<u8>,
    /// When the first frame of `held` may go on.
    held_until: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// How many writes in a row may take nothing before the receiver counts as gone.
const MAX_ZERO_WRITES: u32 = 1000;

impl<L: Leg> Half<L> {
    pub fn new(leg: L) -> Half<L> {
        Half {
            leg,
            backlog: Vec::new(),
            written: 0,
            refused: None,
            zero_writes: 0,
            held: Vec::new(),
            held_until: None,
        }
    }

    /// Whether bytes wait for the sender's rate.
    pub fn throttled(&self) -> bool {
        !self.held.is_empty()
    }

    /// Whether the receiver is waiting for bytes this direction holds: it may be inside a
    /// frame, whatever the sender's stream says.
    pub fn has_backlog(&self) -> bool {
        self.written < self.backlog.len()
    }

    /// Copies until the sender's EOF, a refused frame, or an error; `Pending` while waiting
    /// for either socket.
    pub fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
    ) -> Poll<Result<HalfEnd, HalfError>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            ready!(self.poll_drain(cx, to))?;
            if let Some((error, whole)) = self.refused {
                return Poll::Ready(Ok(HalfEnd::Refused { error, whole }));
            }
            if !self.held.is_empty() {
                if let Some(until) = &mut self.held_until {
                    ready!(until.as_mut().poll(cx));
                    self.held_until = None;
                }
                let held = std::mem::take(&mut self.held);
                ready!(self.take(cx, to, &held))?;
                continue;
            }
            let read = SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let mut buf = ReadBuf::new(&mut scratch[..]);
                match Pin::new(&mut *from).poll_read(cx, &mut buf) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Err(HalfError::Read(e))),
                    Poll::Ready(Ok(())) => {
                        let n = buf.filled().len();
                        if n == 0 {
                            Poll::Ready(Ok(true))
                        } else {
                            let bytes = &scratch[..n];
                            self.take(cx, to, bytes).map(|r| r.map(|()| false))
                        }
                    }
                }
            });
            match ready!(read) {
                Ok(true) => return Poll::Ready(Ok(HalfEnd::Eof)),
                Ok(false) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Accounts `bytes` and writes what may go on, keeping what the receiver does not take.
    fn take<W>(
        &mut self,
        cx: &mut Context<'_>,
        to: &mut W,
        bytes: &[u8],
    ) -> Poll<Result<(), HalfError>>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        let bytes = match self.leg.account(bytes) {
            Ok(()) => &bytes[..self.leg.forwardable(bytes.len())],
            Err(Refusal {
                error: FrameError::Throttled { until_ns },
                before,
            }) => {
                let at = before.unwrap_or(0);
                self.held.extend_from_slice(&bytes[at..]);
                let wait = Duration::from_nanos(until_ns.saturating_sub(monotonic_ns()));
                self.held_until = Some(Box::pin(tokio::time::sleep(wait)));
                &bytes[..self.leg.forwardable(at)]
            }
            Err(refusal) => {
                self.refused = Some((refusal.error, refusal.before.is_some()));
                let before = refusal.before.unwrap_or(0);
                &bytes[..self.leg.forwardable(before)]
            }
        };
        let mut at = 0;
        while at < bytes.len() {
            match Pin::new(&mut *to).poll_write(cx, &bytes[at..]) {
                // Taken up again from the backlog (see `poll_drain`).
                Poll::Ready(Ok(0)) => break,
                Poll::Ready(Ok(n)) => {
                    at += n;
                    self.leg.forwarded(n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(HalfError::Write(e))),
                Poll::Pending => break,
            }
        }
        if at < bytes.len() {
            self.backlog.extend_from_slice(&bytes[at..]);
        } else {
            self.leg.caught_up();
        }
        Poll::Ready(Ok(()))
    }

    /// Writes the backlog, then flushes (a TLS stream seals its records there).
    fn poll_drain<W>(&mut self, cx: &mut Context<'_>, to: &mut W) -> Poll<Result<(), HalfError>>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        while self.written < self.backlog.len() {
            let n = ready!(Pin::new(&mut *to).poll_write(cx, &self.backlog[self.written..]))
                .map_err(HalfError::Write)?;
            if n == 0 {
                // A write that takes nothing is not an error: a closed socket says so with
                // one. A socket in a sockmap reports what its verdict's push kept, which can
                // be nothing for a moment. Yield and try again, a bounded number of times.
                self.zero_writes += 1;
                if self.zero_writes > MAX_ZERO_WRITES {
                    return Poll::Ready(Err(HalfError::Write(io::ErrorKind::WriteZero.into())));
                }
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.zero_writes = 0;
            self.written += n;
            self.leg.forwarded(n);
        }
        if !self.backlog.is_empty() {
            // Freed, not kept: an idle connection holds no buffer.
            self.backlog = Vec::new();
            self.written = 0;
            self.leg.caught_up();
        }
        ready!(Pin::new(&mut *to).poll_flush(cx)).map_err(HalfError::Write)?;
        Poll::Ready(Ok(()))
    }
}

/// Copies one direction until the sender's EOF, a refused frame, or an error.
pub async fn copy<L, R, W>(
    half: &mut Half<L>,
    from: &mut R,
    to: &mut W,
) -> Result<HalfEnd, HalfError>
where
    L: Leg,
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    std::future::poll_fn(|cx| half.poll_copy(cx, from, to)).await
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::protocols::frames::FrameError;

    /// Counts bytes; refuses at a marker byte 0xFF.
    #[derive(Default)]
    struct Counting {
        accounted: usize,
        forwarded: usize,
    }

    impl Leg for Counting {
        fn account(&mut self, bytes: &[u8]) -> Result<(), Refusal> {
            self.accounted += bytes.len();
            match bytes.iter().position(|&b| b == 0xFF) {
                Some(at) => Err(Refusal {
                    error: FrameError::Header(proxy_common::frame::HeaderError::ReservedOpcode),
                    before: Some(at),
                }),
                None => Ok(()),
            }
        }
        fn forwarded(&mut self, n: usize) {
            self.forwarded += n;
        }
    }

    #[tokio::test]
    async fn copies_every_byte_through_a_slow_receiver_then_ends_at_eof() {
        let (mut sender, mut from) = tokio::io::duplex(64 * 1024);
        // A 1 KiB pipe: most writes are short and the rest waits in the backlog.
        let (mut to, mut receiver) = tokio::io::duplex(1024);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            sender.write_all(&data).await.unwrap();
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            receiver.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut half = Half::new(Counting::default());
        let end = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            let end = copy(&mut half, &mut from, &mut to).await.unwrap();
            to.shutdown().await.unwrap();
            end
        })
        .await
        .expect("copy ends");
        drop(to);
        writer.await.unwrap();
        let got = reader.await.unwrap();
        assert_eq!(end, HalfEnd::Eof);
        assert_eq!(got, expected);
        assert_eq!((half.leg.accounted, half.leg.forwarded), (200_000, 200_000));
        assert!(
            !half.has_backlog() && half.backlog.capacity() == 0,
            "backlog freed"
        );
    }

    /// Takes nothing for its first `zeros` writes, then everything.
    struct Hesitant {
        zeros: u32,
        got: Vec<u8>,
    }

    impl AsyncWrite for Hesitant {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.zeros > 0 {
                self.zeros -= 1;
                return Poll::Ready(Ok(0));
            }
            self.got.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_receiver_that_takes_nothing_for_a_moment_is_retried_not_dropped() {
        let (mut sender, mut from) = tokio::io::duplex(1024);
        sender.write_all(b"hello").await.unwrap();
        drop(sender);
        let mut to = Hesitant {
            zeros: 5,
            got: Vec::new(),
        };
        let mut half = Half::new(Counting::default());
        let end = copy(&mut half, &mut from, &mut to).await.unwrap();
        assert_eq!((end, &to.got[..]), (HalfEnd::Eof, &b"hello"[..]));
        let mut gone = Hesitant {
            zeros: u32::MAX,
            got: Vec::new(),
        };
        let (mut sender, mut from) = tokio::io::duplex(1024);
        sender.write_all(b"x").await.unwrap();
        let mut half = Half::new(Counting::default());
        let err = copy(&mut half, &mut from, &mut gone).await.unwrap_err();
        assert!(matches!(err, HalfError::Write(e) if e.kind() == io::ErrorKind::WriteZero));
    }

    /// Throttles the first time it sees the byte 0xEE, for `wait`.
    struct Throttling {
        wait: std::time::Duration,
        throttled: bool,
    }

    impl Leg for Throttling {
        fn account(&mut self, bytes: &[u8]) -> Result<(), Refusal> {
            match bytes.iter().position(|&b| b == 0xEE) {
                Some(at) if !self.throttled => {
                    self.throttled = true;
                    let until_ns = monotonic_ns() + self.wait.as_nanos() as u64;
                    Err(Refusal {
                        error: FrameError::Throttled { until_ns },
                        before: Some(at),
                    })
                }
                _ => Ok(()),
            }
        }
    }

    #[tokio::test]
    async fn a_throttled_chunk_waits_whole_and_in_order_and_nothing_more_is_read_meanwhile() {
        let (mut sender, mut from) = tokio::io::duplex(1024);
        let (mut to, mut receiver) = tokio::io::duplex(1024);
        sender.write_all(&[1, 2, 0xEE, 3]).await.unwrap();
        let mut half = Half::new(Throttling {
            wait: std::time::Duration::from_millis(300),
            throttled: false,
        });
        let started = std::time::Instant::now();
        let copying = async {
            let end = copy(&mut half, &mut from, &mut to).await.unwrap();
            to.shutdown().await.unwrap();
            end
        };
        let feeding = async {
            let mut got = [0u8; 2];
            receiver.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [1, 2], "what came before the throttled frame goes at once");
            // Sent while the copy waits: it must come after the held bytes.
            sender.write_all(&[4]).await.unwrap();
            drop(sender);
            let mut rest = Vec::new();
            receiver.read_to_end(&mut rest).await.unwrap();
            (rest, started.elapsed())
        };
        let (end, (rest, took)) = tokio::join!(copying, feeding);
        assert_eq!(end, HalfEnd::Eof);
        assert_eq!(rest, [0xEE, 3, 4]);
        assert!(took >= std::time::Duration::from_millis(300), "{took:?}");
        assert!(!half.throttled(), "the held bytes are gone");
    }

    #[tokio::test]
    async fn a_refused_frame_delivers_what_came_before_it_and_nothing_after() {
        let (mut sender, mut from) = tokio::io::duplex(1024);
        let (mut to, mut receiver) = tokio::io::duplex(1024);
        sender.write_all(&[1, 2, 3, 0xFF, 4, 5]).await.unwrap();
        let mut half = Half::new(Counting::default());
        let end = copy(&mut half, &mut from, &mut to).await.unwrap();
        drop(to);
        let mut got = Vec::new();
        receiver.read_to_end(&mut got).await.unwrap();
        assert!(
            matches!(end, HalfEnd::Refused { whole: true, .. }),
            "{end:?}"
        );
        assert_eq!(got, [1, 2, 3]);
    }
}
