//! The userspace data plane: copies bytes both ways and walks them with the same frame
//! parser and accounting the kernel uses. Used with `data_plane = "userspace"` and as the
//! fallback when the eBPF programs cannot be loaded.

use std::{
    io,
    sync::atomic::{AtomicBool, Ordering},
};

use proxy_common::policy::{
    Ending, close_for_instance_end, closing_handshake_done, proxy_close_code, proxy_close_reason,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use super::socket::monotonic_ns;
use crate::{
    protocols::frames::{FrameCursor, FrameError, close_frame, masked_close_frame},
    registry::Connection,
};

/// Which way bytes flow, and which of a connection's two sides they are accounted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ClientToInstance = 0,
    InstanceToClient = 1,
}

/// After the proxy closed the client because the instance failed, how long the client gets
/// to answer the close before its socket is closed.
pub const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// How one direction stopped without an error.
enum PumpEnd {
    /// EOF from the sender, passed on as a FIN.
    Eof,
    /// The instance's side ended (EOF or reset) before the instance sent a close frame.
    InstanceFailed,
    /// The proxy ends the connection itself ([`Connection::request_stop`]).
    Stopped,
    /// As `Stopped`, but while a write to the receiver was blocked: no close frame may follow.
    StoppedMidWrite,
    /// A frame was refused (a message over the limit): the proxy ends the connection. What
    /// came before it was forwarded; `whole` says whether that ended between frames.
    Refused { whole: bool },
}

/// Why one direction failed.
enum PumpError {
    /// Reading from the sending side failed.
    Read(io::Error),
    /// Writing to the receiving side failed.
    Write(io::Error),
}

impl From<PumpError> for io::Error {
    fn from(e: PumpError) -> Self {
        match e {
            PumpError::Read(e) | PumpError::Write(e) => e,
        }
    }
}

type PumpResult = (Result<PumpEnd, PumpError>, FrameCursor);

/// Relays until both directions have seen EOF, either fails (then both are closed), the
/// instance's side ends without a close frame (the client gets the close code
/// [`close_for_instance_end`] decides), or the proxy stops the connection (both sides get
/// [`proxy_close_code`]'s close frame, or TCP is cut).
pub async fn relay(
    client: TcpStream,
    instance: TcpStream,
    conn: &Connection,
    cursors: [FrameCursor; 2],
) -> io::Result<Ending> {
    let [inbound, outbound] = cursors;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut instance_read, mut instance_write) = instance.into_split();
    let (mut up, mut down): (Option<PumpResult>, Option<PumpResult>) = (None, None);
    let client_ended = AtomicBool::new(false);
    {
        let up_pump = pump(
            &mut client_read,
            &mut instance_write,
            conn,
            Direction::ClientToInstance,
            inbound,
            &client_ended,
        );
        let down_pump = pump(
            &mut instance_read,
            &mut client_write,
            conn,
            Direction::InstanceToClient,
            outbound,
            &client_ended,
        );
        tokio::pin!(up_pump, down_pump);
        // Set once the instance closed after a complete closing handshake: the client then
        // has CLOSE_GRACE to close its side too, as it would with the instance directly.
        let mut client_grace: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                r = &mut up_pump, if up.is_none() => up = Some(r),
                r = &mut down_pump, if down.is_none() => down = Some(r),
                _ = tokio::time::sleep_until(client_grace.unwrap_or_else(tokio::time::Instant::now)),
                    if client_grace.is_some() => break,
            }
            if client_grace.is_none()
                && up.is_none()
                && matches!(down, Some((Ok(PumpEnd::Eof), _)))
                && closing_handshake_done(
                    &conn.account(Direction::ClientToInstance, |s| *s),
                    &conn.account(Direction::InstanceToClient, |s| *s),
                )
            {
                client_grace = Some(tokio::time::Instant::now() + CLOSE_GRACE);
            }
            let done = match (&up, &down) {
                (Some(_), Some(_)) => true,
                // The client broke the stream: close both.
                (Some((Err(PumpError::Read(_)), _)), _) => true,
                // The client cannot be written to.
                (_, Some((Err(_), _))) => true,
                // The client is told below; its answer has nowhere to go.
                (_, Some((Ok(PumpEnd::InstanceFailed), _))) => true,
                // A failed write to the instance: its side will tell how it ended. A refused
                // frame or a stop: the other direction stops at its next read.
                _ => false,
            };
            if done {
                break;
            }
        }
    }
    if let Some(ending) = conn.stop_reason() {
        // Close frames only where the stream is between frames.
        if let Some(code) = proxy_close_code(ending) {
            let reason = proxy_close_reason(ending);
            if between_frames(&down) {
                let _ = client_write.write_all(&close_frame(code, reason)).await;
            }
            if between_frames(&up) {
                let mask = (monotonic_ns() as u32).to_ne_bytes();
                let frame = masked_close_frame(code, reason, mask);
                let _ = instance_write.write_all(&frame).await;
            }
            let _ = client_write.shutdown().await;
            let _ = instance_write.shutdown().await;
        }
        return Ok(ending);
    }
    match (up, down) {
        (_, Some((Ok(PumpEnd::InstanceFailed), cursor))) => {
            let side = conn.account(Direction::InstanceToClient, |side| *side);
            if let Some(code) = close_for_instance_end(&side, false)
                && cursor.at_boundary()
            {
                let frame = close_frame(code, "function instance failed");
                let _ = client_write.write_all(&frame).await;
            }
            let _ = client_write.shutdown().await;
            // Give the client a moment to answer the close, then close.
            let mut sink = [0u8; 4096];
            let _ = tokio::time::timeout(CLOSE_GRACE, async {
                while matches!(client_read.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
            Ok(Ending::InstanceFailed)
        }
        (Some((Err(e), _)), _) | (_, Some((Err(e), _))) => Err(e.into()),
        _ => Ok(Ending::Closed),
    }
}

/// True when a stopped direction's receiver last got a whole frame, so a close frame may follow.
fn between_frames(result: &Option<PumpResult>) -> bool {
    match result {
        Some((Ok(PumpEnd::Stopped), cursor)) => cursor.at_boundary(),
        Some((Ok(PumpEnd::Refused { whole }), _)) => *whole,
        _ => false,
    }
}

/// Copies until EOF, an error, or a stop request; returns how it ended and the cursor, which
/// says whether the stream stopped on a frame boundary. A stop taken while waiting to read
/// cuts no frame; one taken during a blocked write is reported as such.
async fn pump(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    conn: &Connection,
    direction: Direction,
    mut cursor: FrameCursor,
    client_ended: &AtomicBool,
) -> PumpResult {
    // Per direction and connection: small enough that thousands of idle WebSockets stay
    // cheap, large enough that a 64 KiB message moves in a few reads.
    let mut buf = vec![0u8; 16 * 1024];
    let from_instance = direction == Direction::InstanceToClient;
    loop {
        let read = tokio::select! {
            biased;
            () = conn.stopped() => return (Ok(PumpEnd::Stopped), cursor),
            read = from.read(&mut buf) => read,
        };
        let n = match read {
            Ok(n) => n,
            // A reset instance ended like one that closed without a close frame.
            Err(_) if from_instance => 0,
            Err(e) => return (Err(PumpError::Read(e)), cursor),
        };
        if n == 0 {
            if from_instance {
                let side = conn.account(direction, |side| *side);
                if close_for_instance_end(&side, client_ended.load(Ordering::Relaxed)).is_some() {
                    return (Ok(PumpEnd::InstanceFailed), cursor);
                }
            } else {
                // Before the FIN goes on: the instance's answering EOF must find it set.
                client_ended.store(true, Ordering::Relaxed);
            }
            // Half-close: the peer learns of the FIN, the other direction goes on.
            return match to.shutdown().await {
                Ok(()) => (Ok(PumpEnd::Eof), cursor),
                Err(e) => (Err(PumpError::Write(e)), cursor),
            };
        }
        match conn.account(direction, |side| {
            cursor.feed(&buf[..n], side, monotonic_ns())
        }) {
            Ok(()) => {}
            Err(refusal) => {
                // Forward the whole frames before the refused one, then close: 1009 for a
                // message over the limit, 1002 for a frame RFC 6455 forbids.
                let before = cursor.refused_at();
                if let Some(at) = before
                    && let Err(e) = to.write_all(&buf[..at]).await
                {
                    return (Err(PumpError::Write(e)), cursor);
                }
                conn.request_stop(refusal_ending(refusal, !from_instance));
                let whole = before.is_some();
                return (Ok(PumpEnd::Refused { whole }), cursor);
            }
        }
        // A receiver that stopped reading must not hold a stop off for ever: the write is
        // abandoned, and that side then gets no close frame (it may have half a frame).
        tokio::select! {
            biased;
            written = to.write_all(&buf[..n]) => {
                if let Err(e) = written {
                    return (Err(PumpError::Write(e)), cursor);
                }
            }
            () = conn.stopped() => return (Ok(PumpEnd::StoppedMidWrite), cursor),
        }
    }
}

/// How the proxy ends a connection over a frame it refused (`from_client`: which side sent it).
pub(crate) fn refusal_ending(refusal: FrameError, from_client: bool) -> Ending {
    match refusal {
        FrameError::Policy(_) => Ending::MessageTooBig,
        FrameError::Header(_) => Ending::protocol_error(from_client),
    }
}
