//! The record of a connection the kernel carries, and its progress towards its end. Only the
//! methods here change the progress, so every transition is in one place and tested.

use std::{
    net::TcpStream,
    sync::{Arc, Mutex, atomic::AtomicBool},
};

use proxy_common::{SideState, policy::Ending};

use super::{
    OnEnd, SpliceEnd,
    maps::{Maps, WrittenByHand, ZeroHopKeys},
};
use crate::{conn::KernelKeys, data_plane::hangup::HangupWatcher};

/// A spliced connection while the kernel carries it; its sockets close when the last
/// reference (the hang-up watcher's, a teardown task's or a userspace leg's) goes.
pub struct Spliced {
    pub(super) client: TcpStream,
    /// The instance socket, or for a zero-hop connection the proxy's (idle) socket
    /// connected to the instance.
    pub(super) instance: TcpStream,
    pub(super) pair: KernelKeys,
    pub(super) written: WrittenByHand,
    pub(super) maps: Arc<Mutex<Maps>>,
    pub(super) hangups: Arc<HangupWatcher<Spliced>>,
    /// Boxed: two-socket connections, the many on an edge, pay one pointer for it.
    pub(super) zero_hop: Option<Box<ZeroHopConn>>,
    /// Userspace relays client -> instance: the kernel stopped parsing the client's frames
    /// (a zero-hop instance not keeping up, or a client over its rate).
    pub(super) client_relay: AtomicBool,
    progress: Mutex<Progress>,
    /// Woken when the end is reported: userspace legs still running then stop.
    reported: tokio::sync::Notify,
    /// Told what userspace sees of the frames it relays for the kernel.
    pub(super) tracer: Arc<crate::tracer::Tracer>,
}

/// A connection whose sockets entered the maps.
pub(super) struct Entered {
    pub(super) client: TcpStream,
    pub(super) instance: TcpStream,
    pub(super) pair: KernelKeys,
    pub(super) written: WrittenByHand,
    pub(super) zero_hop: Option<ZeroHopKeys>,
    pub(super) tracer: Arc<crate::tracer::Tracer>,
}

pub(super) struct ZeroHopConn {
    pub(super) keys: ZeroHopKeys,
}

/// How a spliced connection stands, apart from its sockets.
pub(super) struct Progress {
    /// Each side's FIN was passed on to the other.
    client_done: bool,
    instance_done: bool,
    phase: Phase,
    /// Runs once, when the end is reported.
    on_end: Option<OnEnd>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The kernel carries frames both ways.
    Open,
    /// The instance's side ended without a close frame: the client was sent one, and its
    /// bytes have nowhere to go.
    InstanceFailed,
    /// The proxy is ending it: reported as this, however the peers answer.
    ByProxy(Ending),
}

impl Progress {
    pub(super) fn new(on_end: OnEnd) -> Progress {
        Progress {
            client_done: false,
            instance_done: false,
            phase: Phase::Open,
            on_end: Some(on_end),
        }
    }

    /// One side's FIN is passed on; true once both sides' are.
    fn side_done(&mut self, from_client: bool) -> bool {
        if from_client {
            self.client_done = true
        } else {
            self.instance_done = true
        }
        self.client_done && self.instance_done
    }

    /// The instance's side ended without a close frame; returns whether the client had
    /// already ended its side.
    fn instance_failed(&mut self) -> bool {
        self.phase = Phase::InstanceFailed;
        self.instance_done = true;
        self.client_done
    }

    /// The proxy ends the connection; false when it already does, or the end was reported.
    fn claim_stop(&mut self, ending: Ending) -> bool {
        if self.on_end.is_none() || matches!(self.phase, Phase::ByProxy(_)) {
            return false;
        }
        self.phase = Phase::ByProxy(ending);
        true
    }

    /// The report, once: the callback and the end to give it (the proxy's own ending wins).
    fn take_report(&mut self, end: SpliceEnd) -> Option<(OnEnd, SpliceEnd)> {
        let on_end = self.on_end.take()?;
        let end = match self.phase {
            Phase::ByProxy(ending) => Ok(ending),
            _ => end,
        };
        Some((on_end, end))
    }
}

impl Spliced {
    pub(super) fn new(
        entered: Entered,
        maps: Arc<Mutex<Maps>>,
        hangups: Arc<HangupWatcher<Spliced>>,
        on_end: OnEnd,
    ) -> Spliced {
        let Entered {
            client,
            instance,
            pair,
            written,
            zero_hop,
            tracer,
        } = entered;
        Spliced {
            client,
            instance,
            pair,
            written,
            maps,
            hangups,
            zero_hop: zero_hop.map(|keys| Box::new(ZeroHopConn { keys })),
            client_relay: AtomicBool::new(false),
            progress: Mutex::new(Progress::new(on_end)),
            reported: tokio::sync::Notify::new(),
            tracer,
        }
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().expect("progress lock")
    }

    /// The end was reported (the record may still be alive in a task).
    pub(super) fn finished(&self) -> bool {
        self.progress().on_end.is_none()
    }

    pub(super) fn instance_done(&self) -> bool {
        self.progress().instance_done
    }

    pub(super) fn client_done(&self) -> bool {
        self.progress().client_done
    }

    pub(super) fn instance_failed(&self) -> bool {
        self.progress().phase == Phase::InstanceFailed
    }

    pub(super) fn ended_by_proxy(&self) -> bool {
        matches!(self.progress().phase, Phase::ByProxy(_))
    }

    /// See [`Progress::instance_failed`].
    pub(super) fn mark_instance_failed(&self) -> bool {
        self.progress().instance_failed()
    }

    /// See [`Progress::claim_stop`].
    pub(super) fn claim_stop(&self, ending: Ending) -> bool {
        self.progress().claim_stop(ending)
    }

    /// One side's FIN goes on to the other (everything before it has): the connection ends
    /// when both have. Returns whether it did.
    pub(super) fn pass_fin(&self, from_client: bool) -> bool {
        // Marked before the FIN is passed on: the peer's answering FIN must find it set.
        let both = self.progress().side_done(from_client);
        crate::data_plane::socket::shutdown_write(if from_client {
            &self.instance
        } else {
            &self.client
        });
        if both {
            self.finish(Ok(Ending::Closed));
        }
        both
    }

    /// Takes the connection out of the kernel and reports its end (the first call only).
    /// The sockets close when the last reference to this record goes.
    pub(super) fn finish(&self, end: SpliceEnd) {
        let Some((on_end, end)) = self.progress().take_report(end) else {
            return;
        };
        self.hangups.forget(self.pair.client);
        self.hangups.forget(self.pair.instance);
        let zero_hop = self.zero_hop.as_ref().map(|z| &z.keys);
        let (inbound, outbound) = self
            .maps
            .lock()
            .expect("maps lock")
            .remove(self.pair, zero_hop);
        on_end(end, inbound, outbound);
        self.reported.notify_waiters();
    }

    /// Resolves once the end was reported: a userspace leg still running then has nothing
    /// left to carry (its peer was closed or cut) and stops, so no task outlives the
    /// connection.
    pub(super) async fn reported(&self) {
        loop {
            let notified = self.reported.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.finished() {
                return;
            }
            notified.await;
        }
    }

    /// One direction's kernel counters, by the cookie of its receiving socket.
    pub(super) fn side(&self, cookie: u64) -> Option<SideState> {
        super::maps::side_of(&self.maps, cookie)
    }
}

/// Calls `check` with a growing pause (200 µs, doubling up to 20 ms) until it says done or
/// fails, or until `limit` has passed (then `TimedOut` with `what`). The kernel gives no
/// wake-up for the conditions teardown waits on (bytes reaching a peer's TCP, an instance
/// draining its queue), so it looks again, often at first and then less.
pub(super) async fn poll_until(
    limit: std::time::Duration,
    what: &'static str,
    mut check: impl FnMut() -> std::io::Result<bool>,
) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + limit;
    let mut pause = std::time::Duration::from_micros(200);
    loop {
        if check()? {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, what));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// The reported end, with an error reduced to its kind (so it can be compared).
    type Reported = Result<Ending, std::io::ErrorKind>;

    fn progress() -> (Progress, mpsc::Receiver<Reported>) {
        let (tx, rx) = mpsc::channel();
        let on_end: OnEnd = Box::new(move |end, _, _| tx.send(end.map_err(|e| e.kind())).unwrap());
        (Progress::new(on_end), rx)
    }

    /// Reports the end if not yet reported; whether it was now.
    fn report(p: &mut Progress, end: SpliceEnd) -> bool {
        match p.take_report(end) {
            Some((on_end, end)) => {
                on_end(end, SideState::default(), SideState::default());
                true
            }
            None => false,
        }
    }

    #[test]
    fn both_fins_end_it_and_the_end_is_reported_once() {
        let (mut p, rx) = progress();
        assert!(!p.side_done(true));
        assert!(p.side_done(false));
        assert!(report(&mut p, Ok(Ending::Closed)));
        assert!(!report(&mut p, Ok(Ending::Closed)), "only once");
        assert_eq!(rx.try_recv().unwrap(), Ok(Ending::Closed));
    }

    #[test]
    fn the_proxys_ending_wins_over_how_the_peers_answered() {
        let (mut p, rx) = progress();
        assert!(p.claim_stop(Ending::IdleTimeout));
        assert!(!p.claim_stop(Ending::Shutdown), "the first stop wins");
        p.side_done(true);
        report(&mut p, Ok(Ending::Closed));
        assert_eq!(rx.try_recv().unwrap(), Ok(Ending::IdleTimeout));
    }

    #[test]
    fn no_stop_after_the_end_was_reported() {
        let (mut p, _rx) = progress();
        report(&mut p, Ok(Ending::Closed));
        assert!(!p.claim_stop(Ending::Shutdown));
    }

    #[test]
    fn a_failed_instance_marks_its_side_done_and_says_whether_the_client_was() {
        let (mut p, _rx) = progress();
        assert!(!p.instance_failed());
        assert_eq!(p.phase, Phase::InstanceFailed);
        let (mut q, _rx) = progress();
        q.side_done(true);
        assert!(q.instance_failed(), "the client had ended first");
        assert!(q.instance_done);
    }
}
