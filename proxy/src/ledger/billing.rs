//! Per-instance billing: an instance is billed for the time at least one of its connections
//! was open (the measure of the union of their intervals), so two overlapping connections on
//! one instance are billed once.

/// One connection's open interval on an instance, in ms since the epoch, and the function's
/// `memory_mb` when it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    pub start_ms: u64,
    pub end_ms: u64,
    pub memory_mb: u32,
}

/// What an instance is billed for a set of intervals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Measure {
    /// Time covered by at least one interval.
    pub billed_ms: u64,
    /// Covered time weighted by memory: each covered millisecond at the largest `memory_mb`
    /// of the intervals covering it (an instance's memory does not add up per connection).
    pub mb_ms: u128,
}

impl Measure {
    /// GB-s: memory_mb / 1024 × billed seconds.
    pub fn gb_s(&self) -> f64 {
        self.mb_ms as f64 / 1024.0 / 1000.0
    }
}

/// The union of `intervals` (in any order; an interval ending before it starts counts as
/// empty).
pub fn measure(intervals: &[Interval]) -> Measure {
    // A sweep over start and end points; at equal times ends come first, so touching
    // intervals are not counted twice and an empty interval adds nothing.
    let mut events: Vec<(u64, bool, u32)> = intervals
        .iter()
        .filter(|i| i.end_ms > i.start_ms)
        .flat_map(|i| {
            [
                (i.start_ms, true, i.memory_mb),
                (i.end_ms, false, i.memory_mb),
            ]
        })
        .collect();
    events.sort_unstable_by_key(|&(at, opens, _)| (at, opens));
    let mut open: std::collections::BTreeMap<u32, usize> = Default::default();
    let mut total = Measure::default();
    let mut last = 0;
    for (at, opens, memory_mb) in events {
        if let Some((&largest, _)) = open.last_key_value() {
            let covered = at - last;
            total.billed_ms += covered;
            total.mb_ms += covered as u128 * largest as u128;
        }
        last = at;
        if opens {
            *open.entry(memory_mb).or_default() += 1;
        } else if let Some(n) = open.get_mut(&memory_mb) {
            *n -= 1;
            if *n == 0 {
                open.remove(&memory_mb);
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn iv(start_ms: u64, end_ms: u64) -> Interval {
        Interval {
            start_ms,
            end_ms,
            memory_mb: 128,
        }
    }

    fn intervals(max_time: u64, max_len: usize) -> impl Strategy<Value = Vec<Interval>> {
        proptest::collection::vec(
            (
                0..max_time,
                0..max_time,
                prop_oneof![Just(128u32), Just(256), 1..4096u32],
            )
                .prop_map(|(a, b, memory_mb)| Interval {
                    start_ms: a.min(b),
                    end_ms: a.max(b),
                    memory_mb,
                }),
            0..max_len,
        )
    }

    /// Counts, millisecond by millisecond, those some interval covers, and the largest memory
    /// covering each.
    fn brute_force(intervals: &[Interval], max_time: u64) -> Measure {
        let mut m = Measure::default();
        for ms in 0..max_time {
            let covering = intervals
                .iter()
                .filter(|i| i.start_ms <= ms && ms < i.end_ms)
                .map(|i| i.memory_mb)
                .max();
            if let Some(memory_mb) = covering {
                m.billed_ms += 1;
                m.mb_ms += memory_mb as u128;
            }
        }
        m
    }

    #[test]
    fn two_overlapping_connections_are_billed_once() {
        let m = measure(&[iv(1_000, 5_000), iv(3_000, 8_000)]);
        assert_eq!(m.billed_ms, 7_000);
        assert_eq!(m.mb_ms, 7_000 * 128);
        assert_eq!(m.gb_s(), 0.125 * 7.0);
    }

    #[test]
    fn disjoint_connections_are_billed_separately_without_the_gap() {
        assert_eq!(measure(&[iv(0, 10), iv(20, 25)]).billed_ms, 15);
        assert_eq!(measure(&[iv(0, 10), iv(10, 25)]).billed_ms, 25);
        assert_eq!(measure(&[]).billed_ms, 0);
    }

    proptest! {
        #[test]
        fn the_union_is_at_most_the_sum_and_at_least_the_longest(ivs in intervals(1 << 40, 40)) {
            let union = measure(&ivs).billed_ms;
            let lengths = ivs.iter().map(|i| i.end_ms - i.start_ms);
            prop_assert!(union <= lengths.clone().sum::<u64>());
            prop_assert!(union >= lengths.max().unwrap_or(0));
            let first = ivs.iter().map(|i| i.start_ms).min().unwrap_or(0);
            let last = ivs.iter().map(|i| i.end_ms).max().unwrap_or(0);
            prop_assert!(union <= last - first, "within first connect to last disconnect");
        }

        #[test]
        fn the_union_equals_a_millisecond_count(ivs in intervals(300, 8)) {
            prop_assert_eq!(measure(&ivs), brute_force(&ivs, 300));
        }

        #[test]
        fn the_order_of_connections_does_not_matter(
            ivs in intervals(10_000, 20),
            seed in any::<u64>(),
        ) {
            let mut shuffled = ivs.clone();
            // A deterministic shuffle from the seed: proptest shrinks it with the rest.
            let mut s = seed | 1;
            for i in (1..shuffled.len()).rev() {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                shuffled.swap(i, (s % (i as u64 + 1)) as usize);
            }
            shuffled.reverse();
            prop_assert_eq!(measure(&ivs), measure(&shuffled));
        }

        #[test]
        fn a_connection_inside_another_adds_nothing(
            (start, end) in (0u64..1_000_000, 0u64..1_000_000).prop_map(|(a, b)| (a.min(b), a.max(b))),
            cut in (0u64..=100, 0u64..=100),
        ) {
            let len = end - start;
            let inner = iv(start + len * cut.0.min(cut.1) / 100, start + len * cut.0.max(cut.1) / 100);
            prop_assert_eq!(measure(&[iv(start, end), inner]), measure(&[iv(start, end)]));
        }
    }
}
