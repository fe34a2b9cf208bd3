//! Messages and bytes by function and direction, live: the ended connections' final counts
//! plus the open ones' counters as they are at the scrape.
//!
//! Two things would make that sum go down, which a counter must never do:
//! - a connection is counted as ended before it leaves the registry, so a scrape in between
//!   would count it twice (and the next one once): such connections are remembered until a
//!   scrape has seen them gone;
//! - an open connection's counters can read low for a moment (the kernel's final counts
//!   move to userspace's after they left the kernel's maps): each open connection is
//!   reported with the most it was ever read at, which never exceeds its final counts.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
};

use proxy_common::SideState;

/// One connection's, or a function's, traffic; index 0: in (client -> function), 1: out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub messages: [u64; 2],
    pub bytes: [u64; 2],
}

impl Counts {
    pub fn of(sides: &[SideState; 2]) -> Counts {
        Counts {
            messages: sides.each_ref().map(|s| s.messages),
            bytes: sides.each_ref().map(|s| s.bytes),
        }
    }

    fn add(&mut self, other: &Counts) {
        for i in 0..2 {
            self.messages[i] += other.messages[i];
            self.bytes[i] += other.bytes[i];
        }
    }

    fn raise_to(&mut self, other: &Counts) {
        for i in 0..2 {
            self.messages[i] = self.messages[i].max(other.messages[i]);
            self.bytes[i] = self.bytes[i].max(other.bytes[i]);
        }
    }
}

/// An open connection as a scrape reads it.
pub struct Open {
    /// Its registry key.
    pub key: u64,
    pub function: Arc<str>,
    pub counts: Counts,
}

#[derive(Default)]
pub struct Traffic {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    ended: BTreeMap<Arc<str>, Counts>,
    /// Connections already in `ended` that may still be in the registry; `true` once a
    /// scrape ran after they were counted (so a later scrape that misses them in the
    /// registry read it after they left).
    counted: HashMap<u64, bool>,
    /// The most each open connection was reported with.
    reported: HashMap<u64, Counts>,
}

impl Traffic {
    /// An ended connection's final counts.
    pub fn ended(&self, key: u64, function: &Arc<str>, counts: Counts) {
        let mut state = self.state.lock().expect("traffic lock");
        state
            .ended
            .entry(function.clone())
            .or_default()
            .add(&counts);
        state.counted.insert(key, false);
        state.reported.remove(&key);
    }

    /// Totals by function. `open` is every connection in the registry, read after the
    /// previous call returned (scrapes take turns).
    pub fn totals(&self, open: Vec<Open>) -> BTreeMap<Arc<str>, Counts> {
        let mut state = self.state.lock().expect("traffic lock");
        let State {
            ended,
            counted,
            reported,
        } = &mut *state;
        let mut totals = ended.clone();
        let present: HashSet<u64> = open.iter().map(|o| o.key).collect();
        for o in open {
            if counted.contains_key(&o.key) {
                continue;
            }
            let most = reported.entry(o.key).or_default();
            most.raise_to(&o.counts);
            totals.entry(o.function).or_default().add(most);
        }
        counted.retain(|key, seen| {
            let keep = !*seen || present.contains(key);
            *seen = true;
            keep
        });
        reported.retain(|key, _| present.contains(key));
        totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(messages_in: u64, bytes_in: u64) -> Counts {
        Counts {
            messages: [messages_in, 0],
            bytes: [bytes_in, 0],
        }
    }

    fn open(key: u64, c: Counts) -> Open {
        Open {
            key,
            function: "echo".into(),
            counts: c,
        }
    }

    fn echo(t: &BTreeMap<Arc<str>, Counts>) -> Counts {
        t.get("echo").copied().unwrap_or_default()
    }

    #[test]
    fn open_connections_count_live_and_ended_ones_once() {
        let t = Traffic::default();
        let f: Arc<str> = "echo".into();
        assert_eq!(echo(&t.totals(vec![open(1, counts(2, 20))])), counts(2, 20));
        // Ended, but still in the registry for this scrape: counted once.
        t.ended(1, &f, counts(3, 30));
        assert_eq!(echo(&t.totals(vec![open(1, counts(3, 30))])), counts(3, 30));
        // Gone from the registry.
        assert_eq!(echo(&t.totals(vec![])), counts(3, 30));
        assert!(t.state.lock().unwrap().counted.is_empty(), "forgotten");
    }

    #[test]
    fn a_connection_that_ends_between_two_scrapes_is_not_forgotten_too_early() {
        let t = Traffic::default();
        let f: Arc<str> = "echo".into();
        // Registered after a scrape read the registry, ended before it counted.
        t.ended(7, &f, counts(1, 10));
        assert_eq!(echo(&t.totals(vec![])), counts(1, 10));
        // The next scrape still finds it in the registry: not counted again.
        assert_eq!(echo(&t.totals(vec![open(7, counts(1, 10))])), counts(1, 10));
        assert_eq!(echo(&t.totals(vec![])), counts(1, 10));
    }

    #[test]
    fn a_live_reading_that_drops_for_a_moment_does_not_lower_the_total() {
        let t = Traffic::default();
        let f: Arc<str> = "echo".into();
        assert_eq!(echo(&t.totals(vec![open(1, counts(5, 50))])), counts(5, 50));
        // The kernel's counts are between its maps and userspace's.
        assert_eq!(echo(&t.totals(vec![open(1, counts(1, 10))])), counts(5, 50));
        t.ended(1, &f, counts(6, 60));
        assert_eq!(echo(&t.totals(vec![])), counts(6, 60));
    }
}
