//! The measurement clock: warmup, then a fixed window in which every count and latency is
//! taken, then drain. Counting only inside the window keeps ramp-up and tail-off out of the
//! rates, and the CPU snapshot brackets exactly the same interval.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::conn::Client;
use crate::sys::{self, CpuTimes, HostCounters};

const RTT_MAX_US: u64 = 60_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Warmup,
    Window,
    Drain,
}

pub struct Meter {
    clock: Instant,
    /// CLOCK_MONOTONIC at `clock`: timestamps are absolute monotonic nanoseconds, the clock a
    /// pushing backend stamps its messages with.
    clock_ns: u64,
    duration: Duration,
    warmup_end: Instant,
    window_end: Instant,
    pub stage: Stage,
    pub opened: Option<(Instant, CpuTimes)>,
    pub closed: Option<(Instant, CpuTimes)>,
    /// Where the CPU went, taken with `opened` and `closed`.
    pub host_opened: Option<HostCounters>,
    pub host_closed: Option<HostCounters>,
    /// The processes under test whose CPU time `host_*` adds up (besides the generator).
    pub cpu_pids: Vec<u32>,
    pub hist: Histogram<u64>,
    pub sent: u64,
    pub received: u64,
    pub late: u64,
    pub handshakes: u64,
    pub iterations: u64,
    /// Whole-run counters (not windowed).
    pub errors: u64,
    pub connect_errors: u64,
    /// Whole run: upgraded `wss://` connections by their TLS parameters.
    pub tls_sessions: BTreeMap<String, u64>,
}

impl Meter {
    /// Starts the schedule now. Embedded send timestamps are CLOCK_MONOTONIC nanoseconds;
    /// `clock` (any earlier instant) anchors the conversion from `Instant`.
    pub fn new(clock: Instant, warmup: Duration, duration: Duration) -> Meter {
        let now = Instant::now();
        let clock_ns = sys::monotonic_ns()
            .saturating_sub(now.saturating_duration_since(clock).as_nanos() as u64);
        Meter {
            clock,
            clock_ns,
            duration,
            warmup_end: now + warmup,
            window_end: now + warmup + duration,
            stage: Stage::Warmup,
            opened: None,
            closed: None,
            host_opened: None,
            host_closed: None,
            cpu_pids: Vec::new(),
            hist: Histogram::new_with_bounds(1, RTT_MAX_US, 3).expect("valid histogram bounds"),
            sent: 0,
            received: 0,
            late: 0,
            handshakes: 0,
            iterations: 0,
            errors: 0,
            connect_errors: 0,
            tls_sessions: BTreeMap::new(),
        }
    }

    pub fn tick(&mut self, now: Instant) -> Stage {
        if self.stage == Stage::Warmup && now >= self.warmup_end {
            self.host_opened = Some(HostCounters::now(&self.cpu_pids));
            let at = Instant::now();
            self.opened = Some((at, sys::cpu_times()));
            // The window is measured from when it really opened, not from the plan.
            self.window_end = at + self.duration;
            self.stage = Stage::Window;
        }
        if self.stage == Stage::Window && now >= self.window_end {
            self.close();
        }
        self.stage
    }

    /// Closes the window if it is open (also used when a run ends early).
    pub fn close(&mut self) {
        if self.stage != Stage::Drain {
            if self.opened.is_none() {
                self.host_opened = Some(HostCounters::now(&self.cpu_pids));
                self.opened = Some((Instant::now(), sys::cpu_times()));
            }
            self.closed = Some((Instant::now(), sys::cpu_times()));
            self.host_closed = Some(HostCounters::now(&self.cpu_pids));
            self.stage = Stage::Drain;
        }
    }

    pub fn until_next_stage(&self, now: Instant) -> Duration {
        match self.stage {
            Stage::Warmup => self.warmup_end.saturating_duration_since(now),
            Stage::Window => self.window_end.saturating_duration_since(now),
            Stage::Drain => Duration::ZERO,
        }
    }

    pub fn measuring(&self) -> bool {
        self.stage == Stage::Window
    }

    /// `t` as CLOCK_MONOTONIC nanoseconds.
    pub fn ns(&self, t: Instant) -> u64 {
        self.clock_ns + t.saturating_duration_since(self.clock).as_nanos() as u64
    }

    pub fn now_ns(&self) -> u64 {
        self.ns(Instant::now())
    }

    pub fn on_sent(&mut self) {
        self.sent += self.measuring() as u64;
    }

    pub fn on_late(&mut self) {
        self.late += self.measuring() as u64;
    }

    /// Counts an upgraded client's TLS parameters (nothing for a plain one).
    pub fn on_tls_session(&mut self, c: &Client) {
        if let Some(s) = c.tls_session() {
            *self.tls_sessions.entry(s).or_insert(0) += 1;
        }
    }

    pub fn on_handshake(&mut self) {
        self.handshakes += self.measuring() as u64;
    }

    /// An echo (or, for push, a pushed message) arrived `rtt_ns` after it was sent.
    pub fn on_echo(&mut self, rtt_ns: u64) {
        if self.measuring() {
            self.received += 1;
            self.record(rtt_ns);
        }
    }

    pub fn record(&mut self, rtt_ns: u64) {
        self.hist
            .saturating_record((rtt_ns / 1000).clamp(1, RTT_MAX_US));
    }
}
