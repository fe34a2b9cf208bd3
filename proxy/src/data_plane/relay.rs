//! The userspace path: both directions through the framed copy loop ([`super::copy`]),
//! accounted with the same frame parser and policy the kernel uses. Carries connections with
//! `data_plane = "userspace"`, when the eBPF programs cannot load, and when the kernel's maps
//! are full. Generic over the streams, so a TLS stream is carried the same way.
//!
//! One task per connection polls both directions and the stop signal in one future: no
//! split halves, no per-read select, no buffer while idle.

use std::{future::Future, io, pin::pin, task::Poll};

use proxy_common::policy::{Ending, close_for_instance_end, closing_handshake_done};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    closing::{self, CLOSE_GRACE, ProxyClose, refusal_ending},
    copy::{Half, HalfEnd, HalfError, Leg, Refusal},
    socket::monotonic_ns,
};
use crate::{
    conn::{Connection, Direction},
    protocols::frames::FrameCursor,
};

/// One direction's accounting into the connection's counters.
pub struct RelayLeg<'a> {
    conn: &'a Connection,
    direction: Direction,
    pub cursor: FrameCursor,
}

impl Leg for RelayLeg<'_> {
    fn account(&mut self, bytes: &[u8]) -> Result<(), Refusal> {
        let cursor = &mut self.cursor;
        self.conn
            .account(self.direction, |side| {
                cursor.feed(bytes, side, monotonic_ns())
            })
            .map_err(|error| Refusal {
                error,
                before: cursor.refused_at(),
            })
    }
}

/// Where one direction of the relay stands.
#[derive(Debug)]
enum State {
    Copying,
    /// The sender's EOF: passing the FIN on.
    ShuttingDown,
    Done(Outcome),
}

/// How one direction ended.
#[derive(Debug)]
enum Outcome {
    /// EOF passed on as a FIN.
    Eof,
    /// The instance's side ended (EOF or reset) before the instance sent a close frame.
    InstanceFailed,
    /// A frame was refused; `whole`: the receiver's stream ends between frames.
    Refused {
        whole: bool,
    },
    Failed(HalfError),
}

type RelayHalf<'a> = (Half<RelayLeg<'a>>, State);

/// Relays until both directions have seen EOF, either fails (then both are closed), the
/// instance's side ends without a close frame (the client gets the close code
/// [`close_for_instance_end`] decides), or the proxy stops the connection (both sides get
/// the close sequence of [`closing`]).
pub async fn relay<C, I>(
    mut client: C,
    mut instance: I,
    conn: &Connection,
    cursors: [FrameCursor; 2],
) -> io::Result<Ending>
where
    C: AsyncRead + AsyncWrite + Unpin,
    I: AsyncRead + AsyncWrite + Unpin,
{
    let [inbound, outbound] = cursors;
    let leg = |direction, cursor| {
        Half::new(RelayLeg {
            conn,
            direction,
            cursor,
        })
    };
    let mut up: RelayHalf = (leg(Direction::ClientToInstance, inbound), State::Copying);
    let mut down: RelayHalf = (leg(Direction::InstanceToClient, outbound), State::Copying);
    let mut client_ended = false;
    {
        let mut stopped = pin!(conn.stopped());
        // Set once the instance closed after a complete closing handshake: the client then
        // has CLOSE_GRACE to close its side too, as it would with the instance directly.
        let mut grace = pin!(tokio::time::sleep(CLOSE_GRACE));
        let mut grace_set = false;
        std::future::poll_fn(|cx| {
            if stopped.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            poll_direction(
                cx,
                &mut up,
                &mut client,
                &mut instance,
                conn,
                &mut client_ended,
            );
            poll_direction(
                cx,
                &mut down,
                &mut instance,
                &mut client,
                conn,
                &mut client_ended,
            );
            if conn.stop_reason().is_some() {
                // A refused frame asked for the stop just now.
                return Poll::Ready(());
            }
            if !grace_set
                && matches!(up.1, State::Copying | State::ShuttingDown)
                && matches!(down.1, State::Done(Outcome::Eof))
                && closing_handshake_done(
                    &conn.account(Direction::ClientToInstance, |s| *s),
                    &conn.account(Direction::InstanceToClient, |s| *s),
                )
            {
                grace_set = true;
                grace
                    .as_mut()
                    .reset(tokio::time::Instant::now() + CLOSE_GRACE);
            }
            if grace_set && grace.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            let done = match (&up.1, &down.1) {
                (State::Done(_), State::Done(_)) => true,
                // The client broke the stream: close both.
                (State::Done(Outcome::Failed(HalfError::Read(_))), _) => true,
                // The client cannot be written to.
                (_, State::Done(Outcome::Failed(_))) => true,
                // The client is told below; its answer has nowhere to go.
                (_, State::Done(Outcome::InstanceFailed)) => true,
                // A failed write to the instance: its side will tell how it ended.
                _ => false,
            };
            if done { Poll::Ready(()) } else { Poll::Pending }
        })
        .await;
    }
    if let Some(ending) = conn.stop_reason() {
        if let Some(frames) = ProxyClose::for_ending(ending) {
            let client_ok = between_frames(&down);
            let instance_ok = between_frames(&up);
            closing::close_streams(
                Some(&frames),
                &mut client,
                client_ok,
                &mut instance,
                instance_ok,
            )
            .await;
        }
        return Ok(ending);
    }
    match (up.1, down.1) {
        (_, State::Done(Outcome::InstanceFailed)) => {
            let side = conn.account(Direction::InstanceToClient, |side| *side);
            let at_boundary = down.0.leg.cursor.at_boundary() && !down.0.has_backlog();
            let frame = close_for_instance_end(&side, false)
                .filter(|_| at_boundary)
                .map(closing::instance_failed_frame);
            closing::after_instance_failed(&mut client, frame).await;
            Ok(Ending::InstanceFailed)
        }
        (State::Done(Outcome::Failed(e)), _) | (_, State::Done(Outcome::Failed(e))) => {
            Err(e.into())
        }
        _ => Ok(Ending::Closed),
    }
}

/// Moves one direction on as far as it goes without waiting.
fn poll_direction<'a, R, W>(
    cx: &mut std::task::Context<'_>,
    (half, state): &mut RelayHalf<'a>,
    from: &mut R,
    to: &mut W,
    conn: &Connection,
    client_ended: &mut bool,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let from_instance = half.leg.direction == Direction::InstanceToClient;
    if let State::Copying = state {
        let end = match half.poll_copy(cx, from, to) {
            Poll::Pending => return,
            Poll::Ready(end) => end,
        };
        *state = match end {
            // A reset instance ended like one that closed without a close frame.
            Ok(HalfEnd::Eof) | Err(HalfError::Read(_)) if from_instance => {
                let side = conn.account(Direction::InstanceToClient, |side| *side);
                if close_for_instance_end(&side, *client_ended).is_some() {
                    State::Done(Outcome::InstanceFailed)
                } else {
                    State::ShuttingDown
                }
            }
            Ok(HalfEnd::Eof) => {
                // Before the FIN goes on: the instance's answering EOF must find it set.
                *client_ended = true;
                State::ShuttingDown
            }
            Ok(HalfEnd::Refused { error, whole }) => {
                // 1009 for a message over the limit, 1002 for a frame RFC 6455 forbids.
                conn.request_stop(refusal_ending(error, !from_instance));
                State::Done(Outcome::Refused { whole })
            }
            Err(e) => State::Done(Outcome::Failed(e)),
        };
    }
    if let State::ShuttingDown = state {
        // Half-close: the peer learns of the FIN, the other direction goes on.
        match std::pin::Pin::new(&mut *to).poll_shutdown(cx) {
            Poll::Pending => {}
            Poll::Ready(Ok(())) => *state = State::Done(Outcome::Eof),
            Poll::Ready(Err(e)) => *state = State::Done(Outcome::Failed(HalfError::Write(e))),
        }
    }
}

/// True when a stopped direction's receiver last got a whole frame, so a close frame may follow.
fn between_frames((half, state): &RelayHalf) -> bool {
    match state {
        State::Copying => half.leg.cursor.at_boundary() && !half.has_backlog(),
        State::Done(Outcome::Refused { whole }) => *whole,
        _ => false,
    }
}
