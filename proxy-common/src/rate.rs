//! The per-connection rate quotas (client -> function data messages per second and bytes per
//! second), decided the same way on every data plane.
//!
//! Each quota is a GCRA ("virtual scheduling") meter: it keeps the theoretical arrival time
//! (TAT) of the next unit at the allowed rate, and a frame may pass when it is at most
//! [`RATE_TOLERANCE_NS`] ahead of that schedule. This is a token bucket that needs one
//! timestamp instead of a token count and a refill time, so the kernel updates it with one
//! division and no floating point. A passed frame moves the schedule on by its cost, so one
//! frame larger than a second's worth of bytes (a 256 KB message at 128 KB/s) is allowed and
//! the frames after it wait until its cost has elapsed: the average holds over any window.

use crate::{FrameHeader, frame::OPCODE_CONTINUATION};

/// How far ahead of an evenly paced schedule a frame may arrive and still pass: the burst a
/// quota tolerates. At 10 messages/s a client may send two at once, then one per 100 ms.
/// Small on purpose: "10 messages/s" should mean what it says, and a sender that paces itself
/// at the rate (as the edge workload does) sees up to this much jitter without a delay.
pub const RATE_TOLERANCE_NS: u64 = 100_000_000;

const NS_PER_S: u64 = 1_000_000_000;

/// [`RateState::on_exceed`]: frames over the rate wait (lossless).
pub const ON_EXCEED_THROTTLE: u32 = 0;
/// [`RateState::on_exceed`]: a frame over the rate closes the connection (1008 / 429).
pub const ON_EXCEED_CLOSE: u32 = 1;

/// One direction's rate quotas and meters, in the kernel's side state (`#[repr(C)]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateState {
    /// Data messages per second (0: no message quota).
    pub messages_per_s: u64,
    /// Wire bytes of data frames per second (0: no byte quota).
    pub bytes_per_s: u64,
    /// [`ON_EXCEED_THROTTLE`] or [`ON_EXCEED_CLOSE`].
    pub on_exceed: u32,
    pub _pad: u32,
    /// Monotonic ns when the next message is due on an evenly paced schedule.
    pub message_tat_ns: u64,
    /// Monotonic ns when the next byte is due on an evenly paced schedule.
    pub byte_tat_ns: u64,
    /// Since when the frame at the head of the stream has been waiting (0: none waits).
    pub waiting_since_ns: u64,
    /// Total time frames waited for the rate (the ledger's `throttled_ms`).
    pub throttled_ns: u64,
    /// Times a frame had to wait (throttle episodes), for metrics.
    pub throttles: u64,
}

/// A frame over the rate: it may pass at `until_ns` (monotonic), not before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverRate {
    pub until_ns: u64,
}

impl RateState {
    /// A meter for the given quotas (0: unlimited); `close`: exceeding closes.
    pub fn new(messages_per_s: u64, bytes_per_s: u64, close: bool) -> RateState {
        RateState {
            messages_per_s,
            bytes_per_s,
            on_exceed: if close {
                ON_EXCEED_CLOSE
            } else {
                ON_EXCEED_THROTTLE
            },
            ..RateState::default()
        }
    }

    /// The quotas and schedule for the plane that carries the connection next, without the
    /// throttled time this plane already reported (each plane's own adds up at the end).
    pub fn handed_on(&self) -> RateState {
        RateState {
            waiting_since_ns: 0,
            throttled_ns: 0,
            throttles: 0,
            ..*self
        }
    }

    #[inline(always)]
    pub fn closes(&self) -> bool {
        self.on_exceed == ON_EXCEED_CLOSE
    }

    /// Whether any quota applies.
    #[inline(always)]
    pub fn limited(&self) -> bool {
        self.messages_per_s != 0 || self.bytes_per_s != 0
    }

    /// Decides one frame of this direction at `now_ns`: `Ok` charges it to the meters (it
    /// passes now), `Err` leaves the meters as they were (apart from noting that a frame
    /// waits) and says when it may pass. Control frames are activity, not messages: they
    /// always pass and cost nothing. The caller keeps order: nothing overtakes a waiting frame.
    #[inline(always)]
    pub fn admit(&mut self, h: &FrameHeader, now_ns: u64) -> Result<(), OverRate> {
        if h.is_control() {
            return Ok(());
        }
        let starts_message = h.opcode != OPCODE_CONTINUATION;
        let mut until = 0;
        if starts_message && self.messages_per_s != 0 {
            until = due(self.message_tat_ns, now_ns);
        }
        if self.bytes_per_s != 0 {
            until = until.max(due(self.byte_tat_ns, now_ns));
        }
        if until > now_ns {
            if self.waiting_since_ns == 0 {
                self.waiting_since_ns = now_ns;
                self.throttles += 1;
            }
            return Err(OverRate { until_ns: until });
        }
        self.charge(h, now_ns);
        Ok(())
    }

    /// Charges a data frame that passes at `now_ns`, over the rate or not (the kernel lets
    /// one through when it cannot stop the stream at that point), ending any wait.
    #[inline(always)]
    pub fn charge(&mut self, h: &FrameHeader, now_ns: u64) {
        if h.is_control() {
            return;
        }
        if self.waiting_since_ns != 0 {
            self.throttled_ns += now_ns.saturating_sub(self.waiting_since_ns);
            self.waiting_since_ns = 0;
        }
        if h.opcode != OPCODE_CONTINUATION && self.messages_per_s != 0 {
            self.message_tat_ns = self.message_tat_ns.max(now_ns) + NS_PER_S / self.messages_per_s;
        }
        if let Some(cost) = h
            .wire_len()
            .saturating_mul(NS_PER_S)
            .checked_div(self.bytes_per_s)
        {
            self.byte_tat_ns = self.byte_tat_ns.max(now_ns).saturating_add(cost);
        }
    }
}

/// When a unit whose schedule says `tat_ns` may pass: up to the tolerance early.
#[inline(always)]
fn due(tat_ns: u64, now_ns: u64) -> u64 {
    let earliest = tat_ns.saturating_sub(RATE_TOLERANCE_NS);
    if earliest > now_ns { earliest } else { now_ns }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(opcode: u8, fin: bool, payload_len: u64) -> FrameHeader {
        FrameHeader {
            fin,
            rsv: 0,
            opcode,
            mask: Some([0; 4]),
            header_len: 6,
            payload_len,
        }
    }

    /// Sends `n` one-frame messages as fast as the meter lets them, returning when each passed.
    fn paced(rate: &mut RateState, n: usize, payload: u64) -> [u64; 64] {
        let mut at = [0u64; 64];
        let mut now = 1_000_000_000;
        for slot in at.iter_mut().take(n) {
            loop {
                match rate.admit(&data(2, true, payload), now) {
                    Ok(()) => break,
                    Err(over) => {
                        assert!(over.until_ns > now);
                        now = over.until_ns;
                    }
                }
            }
            *slot = now;
        }
        at
    }

    #[test]
    fn thirty_quick_messages_at_ten_per_second_take_about_three_seconds() {
        let mut rate = RateState::new(10, 0, false);
        let at = paced(&mut rate, 30, 10);
        let span = at[29] - at[0];
        assert_eq!(
            at[1], at[0],
            "the tolerance lets a second one through at once"
        );
        assert_eq!(span, 2_800_000_000);
        for pair in at[1..30].windows(2) {
            assert_eq!(pair[1] - pair[0], 100_000_000);
        }
        // Each of the 28 that waited did so for one period after the previous one passed.
        assert_eq!(rate.throttled_ns, 28 * 100_000_000);
        assert_eq!(rate.throttles, 28);
    }

    #[test]
    fn a_message_paced_at_the_rate_with_jitter_never_waits() {
        let mut rate = RateState::new(10, 128 * 1024, false);
        for k in 0..1000u64 {
            // Each send up to 90 ms behind its slot of a 100 ms period, in no pattern.
            let late = (k * 7919 % 90) * 1_000_000;
            let at = 5_000_000_000 + k * 100_000_000 + late;
            assert_eq!(rate.admit(&data(1, true, 1000), at), Ok(()), "send {k}");
        }
        assert_eq!(rate.throttles, 0);
    }

    #[test]
    fn bytes_are_paced_by_wire_length_and_a_large_frame_is_paid_after_it_passes() {
        let mut rate = RateState::new(0, 128 * 1024, false);
        let big = data(2, true, 256 * 1024 - 6);
        let t0 = 1_000_000_000;
        assert_eq!(
            rate.admit(&big, t0),
            Ok(()),
            "one frame over a second's worth passes"
        );
        let next = rate.admit(&data(2, true, 10), t0 + 1_000_000_000);
        // 256 KiB of wire bytes at 128 KiB/s: due two seconds later, less the tolerance.
        assert_eq!(
            next,
            Err(OverRate {
                until_ns: t0 + 1_900_000_000
            })
        );
    }

    #[test]
    fn continuations_cost_bytes_not_messages_and_control_frames_cost_nothing() {
        let mut rate = RateState::new(1, 10_000, false);
        let t = 1_000_000_000;
        assert_eq!(rate.admit(&data(1, false, 100), t), Ok(()));
        assert_eq!(rate.admit(&data(0, true, 100), t), Ok(()), "same message");
        assert_eq!(rate.admit(&data(9, true, 125), t), Ok(()), "ping");
        assert!(
            rate.admit(&data(1, true, 1), t).is_err(),
            "a second message within 1 s"
        );
    }

    #[test]
    fn a_refused_frame_changes_no_meter_and_unlimited_quotas_always_pass() {
        let mut rate = RateState::new(10, 0, true);
        rate.admit(&data(2, true, 1), 1).unwrap();
        rate.admit(&data(2, true, 1), 1).unwrap();
        let before = rate;
        assert!(rate.admit(&data(2, true, 1), 1).is_err());
        assert_eq!(
            (rate.message_tat_ns, rate.byte_tat_ns),
            (before.message_tat_ns, before.byte_tat_ns)
        );
        let mut open = RateState::default();
        for _ in 0..1000 {
            assert_eq!(open.admit(&data(2, true, 1 << 20), 1), Ok(()));
        }
    }
}
