//! Aggregation of repeated events per key and interval (SPEC R9.3).
//!
//! What it does: the first occurrence of a key (for the engine: event kind, instance, public
//! IP, protocol, destination) is reported at once and opens a window of `interval` seconds;
//! further occurrences inside the window are only counted. When the window ends, a summary
//! with the count is reported if anything was counted, and a new window starts at once (so a
//! storm that goes on yields one summary per interval, not a new "first" line each time); a
//! window that ends with nothing counted is forgotten. At most `cap` keys have a window at
//! once; occurrences of further keys are counted in one overflow window, summarised the same way.
//!
//! Work is bounded: [`Aggregator::offer`] is one hash lookup; [`Aggregator::due`] does O(1)
//! per window it closes, and closes at most `cap + 1` windows per call.
//!
//! What it does not do: count for metrics. Counters stay exact elsewhere; this only decides
//! which occurrences become event records (and so log lines).

use std::collections::VecDeque;
use std::hash::Hash;

use hashbrown::HashMap;

use crate::units::Time;

/// What [`Aggregator::offer`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// The first occurrence of its key in a window: report it now.
    Report,
    /// Counted in the key's open window; reported later in a [`Summary`].
    Counted,
    /// Too many keys have a window: counted in the overflow window.
    Overflow,
}

/// A closed window with occurrences that were counted, not reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary<K> {
    /// The key; `None` for the overflow window (keys beyond the cap).
    pub key: Option<K>,
    /// Occurrences counted in the window.
    pub count: u64,
    /// When the window opened.
    pub since: Time,
    /// When it closed.
    pub until: Time,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Time,
    end: Time,
    counted: u64,
}

/// Per-key windows; see the module documentation.
#[derive(Debug, Clone)]
pub struct Aggregator<K> {
    interval: Time,
    cap: usize,
    windows: HashMap<K, Window>,
    /// Window ends in non-decreasing order (every window opens at the caller's `now`, which
    /// never decreases, and lasts `interval`).
    queue: VecDeque<(Time, K)>,
    overflow: Option<Window>,
}

impl<K: Hash + Eq + Clone> Aggregator<K> {
    /// Windows of `interval` seconds (at least 1), at most `cap` keys at once.
    pub fn new(interval: Time, cap: usize) -> Self {
        Aggregator {
            interval: interval.max(1),
            cap,
            windows: HashMap::new(),
            queue: VecDeque::new(),
            overflow: None,
        }
    }

    /// The window length, seconds.
    pub fn interval(&self) -> Time {
        self.interval
    }

    /// Changes the window length for windows opened from now on.
    pub fn set_interval(&mut self, interval: Time) {
        self.interval = interval.max(1);
    }

    /// Keys with an open window.
    pub fn open_windows(&self) -> usize {
        self.windows.len()
    }

    /// One occurrence of `key` at `now`. Call [`Aggregator::due`] first so windows that
    /// ended before `now` are closed.
    pub fn offer(&mut self, now: Time, key: &K) -> Offer {
        if let Some(w) = self.windows.get_mut(key) {
            w.counted += 1;
            return Offer::Counted;
        }
        if self.windows.len() >= self.cap {
            let interval = self.interval;
            let w = self.overflow.get_or_insert(Window {
                start: now,
                end: now.saturating_add(interval),
                counted: 0,
            });
            w.counted += 1;
            return Offer::Overflow;
        }
        let end = now.saturating_add(self.interval);
        self.windows.insert(
            key.clone(),
            Window {
                start: now,
                end,
                counted: 0,
            },
        );
        self.queue.push_back((end, key.clone()));
        Offer::Report
    }

    /// Closes every window that ended at or before `now` and returns the summaries of those
    /// that counted something (those windows reopen at `now`).
    pub fn due(&mut self, now: Time) -> Vec<Summary<K>> {
        let mut out = Vec::new();
        let mut budget = self.queue.len();
        while budget > 0 {
            budget -= 1;
            match self.queue.front() {
                Some(&(end, _)) if end <= now => {}
                _ => break,
            }
            let Some((_, key)) = self.queue.pop_front() else {
                break;
            };
            let Some(w) = self.windows.get_mut(&key) else {
                continue;
            };
            if w.counted == 0 {
                self.windows.remove(&key);
                continue;
            }
            out.push(Summary {
                key: Some(key.clone()),
                count: w.counted,
                since: w.start,
                until: now,
            });
            *w = Window {
                start: now,
                end: now.saturating_add(self.interval),
                counted: 0,
            };
            let end = w.end;
            self.queue.push_back((end, key));
        }
        if let Some(w) = self.overflow.filter(|w| w.end <= now) {
            self.overflow = None;
            out.push(Summary {
                key: None,
                count: w.counted,
                since: w.start,
                until: now,
            });
        }
        out
    }

    /// When [`Aggregator::due`] next has something to close, if ever.
    pub fn next_deadline(&self) -> Option<Time> {
        let a = self.queue.front().map(|&(t, _)| t);
        let b = self.overflow.map(|w| w.end);
        match (a, b) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn first_reported_then_counted_then_summarised() {
        let mut a = Aggregator::new(10, 4);
        assert_eq!(a.offer(0, &"k"), Offer::Report);
        for t in 1..10 {
            assert!(a.due(t).is_empty());
            assert_eq!(a.offer(t, &"k"), Offer::Counted);
        }
        // The window [0, 10) closes at 10 with the 9 counted; it reopens at 10.
        let s = a.due(10);
        assert_eq!(
            s,
            vec![Summary {
                key: Some("k"),
                count: 9,
                since: 0,
                until: 10
            }]
        );
        assert_eq!(a.offer(12, &"k"), Offer::Counted, "the storm goes on");
        assert_eq!(a.due(20)[0].count, 1);
        // A quiet window is forgotten: the next occurrence is reported at once again.
        assert!(a.due(30).is_empty());
        assert_eq!(a.open_windows(), 0);
        assert_eq!(a.offer(31, &"k"), Offer::Report);
    }

    #[test]
    fn keys_beyond_the_cap_share_one_overflow_window() {
        let mut a = Aggregator::new(5, 2);
        assert_eq!(a.offer(0, &1), Offer::Report);
        assert_eq!(a.offer(0, &2), Offer::Report);
        assert_eq!(a.offer(1, &3), Offer::Overflow);
        assert_eq!(a.offer(2, &4), Offer::Overflow);
        assert_eq!(a.next_deadline(), Some(5));
        let s = a.due(6);
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].key, s[0].count, s[0].since), (None, 2, 1));
    }

    proptest! {
        /// Every occurrence is either reported at once or counted in exactly one summary,
        /// and a key gets at most one immediate report plus one summary per interval.
        #[test]
        fn nothing_is_lost_and_lines_are_bounded(
            events in proptest::collection::vec((0u32..3, 0u8..6), 1..400),
            interval in 1u32..8,
            cap in 1usize..5,
        ) {
            let mut a = Aggregator::new(interval, cap);
            let (mut now, mut reported, mut summed, mut lines) = (0u32, 0u64, 0u64, 0u64);
            let total = events.len() as u64;
            for (dt, key) in events {
                now += dt;
                for s in a.due(now) {
                    summed += s.count;
                    lines += 1;
                }
                if a.offer(now, &key) == Offer::Report {
                    reported += 1;
                    lines += 1;
                }
            }
            for s in a.due(now + interval) {
                summed += s.count;
                lines += 1;
            }
            prop_assert_eq!(reported + summed, total);
            // Per key (6 keys + overflow), at most 2 lines per interval elapsed, plus one.
            let windows = u64::from(now / interval + 2);
            prop_assert!(lines <= 7 * 2 * windows, "{} lines", lines);
        }
    }
}
