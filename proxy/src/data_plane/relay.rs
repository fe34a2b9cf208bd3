//! The userspace path: both directions through the framed copy loop ([`super::copy`]),
//! accounted with the same frame parser and policy the kernel uses. Carries connections with
//! `data_plane = "userspace"`, when the eBPF programs cannot load, and when the kernel's maps
//! are full. Generic over the streams, so a TLS stream is carried the same way.
//!
//! One task per connection polls both directions and the stop signal in one future: no
//! split halves, no per-read select, no buffer while idle.

use std::{
    future::Future,
    io,
    pin::{Pin, pin},
    sync::Arc,
    task::Poll,
};

use proxy_common::policy::{Ending, close_for_instance_end, closing_handshake_done};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    closing::{self, CLOSE_GRACE, ProxyClose, refusal_ending},
    copy::{Half, HalfEnd, HalfError, Leg, Refusal},
};

use crate::{
    clock::monotonic_ns,
    conn::{Connection, Direction},
    protocols::frames::FrameCursor,
};

/// One direction's accounting into the connection's counters.
pub struct RelayLeg {
    conn: Arc<Connection>,
    direction: Direction,
    pub cursor: FrameCursor,
}

impl Leg for RelayLeg {
    fn account(&mut self, bytes: &[u8]) -> Result<(), Refusal> {
        let cursor = &mut self.cursor;
        let tracer = &self.conn.tracer;
        let result = if tracer.listening() {
            // Only while someone traces: the side before and after, to see what changed.
            let (before, after, result) = self.conn.account(self.direction, |side| {
                let before = *side;
                let result = cursor.feed(bytes, side, monotonic_ns());
                (before, *side, result)
            });
            let fed = crate::tracer::Fed {
                result: &result,
                cursor,
            };
            tracer.fed(&self.conn, self.direction, &before, &after, &fed);
            result
        } else {
            self.conn.account(self.direction, |side| {
                cursor.feed(bytes, side, monotonic_ns())
            })
        };
        result.map_err(|error| Refusal {
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

type RelayHalf = (Half<RelayLeg>, State);

/// Relays until both directions have seen EOF, either fails (then both are closed), the
/// instance's side ends without a close frame (the client gets the close code
/// [`close_for_instance_end`] decides), or the proxy stops the connection (both sides get
/// the close sequence of [`closing`]).
pub async fn relay<C, I>(
    client: C,
    instance: I,
    conn: Arc<Connection>,
    cursors: [FrameCursor; 2],
) -> io::Result<Ending>
where
    C: AsyncRead + AsyncWrite + Unpin,
    I: AsyncRead + AsyncWrite + Unpin,
{
    Relay::new(client, instance, conn, cursors).run().await
}

/// A relayed connection: everything its steady state needs, in one struct that the loop
/// borrows, so the future of a connection that idles for hours holds it once and nothing
/// more (build it outside the future that runs it, and call [`Relay::run`] on it in place).
pub struct Relay<C, I> {
    client: C,
    instance: I,
    conn: Arc<Connection>,
    up: RelayHalf,
    down: RelayHalf,
    client_ended: bool,
}

impl<C, I> Relay<C, I>
where
    C: AsyncRead + AsyncWrite + Unpin,
    I: AsyncRead + AsyncWrite + Unpin,
{
    pub fn new(client: C, instance: I, conn: Arc<Connection>, cursors: [FrameCursor; 2]) -> Self {
        let [inbound, outbound] = cursors;
        let leg = |direction, cursor| {
            Half::new(RelayLeg {
                conn: conn.clone(),
                direction,
                cursor,
            })
        };
        Relay {
            up: (leg(Direction::ClientToInstance, inbound), State::Copying),
            down: (leg(Direction::InstanceToClient, outbound), State::Copying),
            client,
            instance,
            conn,
            client_ended: false,
        }
    }

    /// Relays until the connection ends; see [`relay`].
    pub async fn run(&mut self) -> io::Result<Ending> {
        self.carry().await;
        // The closing sequences are boxed: only a connection that is ending pays for them.
        let conn = self.conn.clone();
        if let Some(ending) = conn.stop_reason() {
            if let Some(frames) = ProxyClose::for_ending(ending) {
                let client_ok = between_frames(&self.down);
                let instance_ok = between_frames(&self.up);
                Box::pin(closing::close_streams(
                    Some(&frames),
                    &mut self.client,
                    client_ok,
                    &mut self.instance,
                    instance_ok,
                ))
                .await;
                // The client gets its grace to answer, as on the kernel path; what it still
                // sends is read and dropped, so closing the socket does not reset the
                // connection under the close frame it has not read yet.
                Box::pin(closing::drain_for_grace(&mut self.client)).await;
            }
            return Ok(ending);
        }
        let states = (
            std::mem::replace(&mut self.up.1, State::Copying),
            std::mem::replace(&mut self.down.1, State::Copying),
        );
        match states {
            (_, State::Done(Outcome::InstanceFailed)) => {
                let side = conn.account(Direction::InstanceToClient, |side| *side);
                let down = &self.down.0;
                let at_boundary = down.leg.cursor.at_boundary() && !down.has_backlog();
                let frame = close_for_instance_end(&side, false)
                    .filter(|_| at_boundary)
                    .map(closing::instance_failed_frame);
                Box::pin(closing::after_instance_failed(&mut self.client, frame)).await;
                Ok(Ending::InstanceFailed)
            }
            (State::Done(Outcome::Failed(e)), _) | (_, State::Done(Outcome::Failed(e))) => {
                Err(e.into())
            }
            _ => Ok(Ending::Closed),
        }
    }

    /// Both directions until the connection is over or the proxy stops it.
    async fn carry(&mut self) {
        let conn = &*self.conn.clone();
        let mut stopped = pin!(conn.stopped());
        // Set once the instance closed after a complete closing handshake: the client then
        // has CLOSE_GRACE to close its side too, as it would with the instance directly.
        let mut grace: Option<Pin<Box<tokio::time::Sleep>>> = None;
        std::future::poll_fn(|cx| {
            if stopped.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            let Relay {
                client,
                instance,
                up,
                down,
                client_ended,
                ..
            } = self;
            poll_direction(cx, up, client, instance, conn, client_ended);
            poll_direction(cx, down, instance, client, conn, client_ended);
            if conn.stop_reason().is_some() {
                // A refused frame asked for the stop just now.
                return Poll::Ready(());
            }
            if grace.is_none()
                && matches!(up.1, State::Copying | State::ShuttingDown)
                && matches!(down.1, State::Done(Outcome::Eof))
                && closing_handshake_done(
                    &conn.account(Direction::ClientToInstance, |s| *s),
                    &conn.account(Direction::InstanceToClient, |s| *s),
                )
            {
                grace = Some(Box::pin(tokio::time::sleep(CLOSE_GRACE)));
            }
            if let Some(grace) = &mut grace
                && grace.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(());
            }
            let done = match (&up.1, &down.1) {
                (State::Done(_), State::Done(_)) => true,
                // The client broke the stream: close both.
                (State::Done(Outcome::Failed(HalfError::Read(_))), _) => true,
                // The client cannot be written to.
                (_, State::Done(Outcome::Failed(_))) => true,
                // The client is told in `run`; its answer has nowhere to go.
                (_, State::Done(Outcome::InstanceFailed)) => true,
                // A failed write to the instance: its side will tell how it ended.
                _ => false,
            };
            if done { Poll::Ready(()) } else { Poll::Pending }
        })
        .await
    }
}

/// Moves one direction on as far as it goes without waiting.
fn poll_direction<R, W>(
    cx: &mut std::task::Context<'_>,
    (half, state): &mut RelayHalf,
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
