//! Events of types the gateway does not know, counted by name.
//!
//! Such an event is still delivered (PROTOCOL.md §5); counting it by type
//! tells an operator which publisher is ahead of the gateway. The label set
//! of `wsgateway_events_unknown_type_total{type}` is bounded: the first
//! [`MAX_TRACKED_TYPES`] distinct types (the seed's
//! `MAX_UNKNOWN_EVENT_TYPES`) get a label of their own, and every later type
//! is counted under `type="other"`. The first occurrence of each tracked
//! type is logged once, at `warn`, with the seed's text.
//!
//! Two halves. [`UnknownTypes`] sits in `Metrics`: the counters, and the
//! tracked types in first-seen order for `/ws/health/detailed` (the seed's
//! `get_unknown_event_metrics`); its lock is taken only on a first
//! occurrence and by the health route. [`Tracker`] is owned by the
//! dispatcher: a map from type to counter, read without a lock, so an
//! unknown event costs one hash lookup and a known one nothing.

use std::collections::HashMap;

use parking_lot::Mutex;
use prometheus::{IntCounter, IntCounterVec};

/// Distinct unknown types that get a label of their own (the seed's
/// `MAX_UNKNOWN_EVENT_TYPES`).
pub const MAX_TRACKED_TYPES: usize = 100;

/// The label of every type beyond the first [`MAX_TRACKED_TYPES`] (and of a
/// type literally named `other`).
pub const OTHER: &str = "other";

/// Longest label, in bytes: a longer type is cut, at a character boundary,
/// so that a hundred labels stay a few kilobytes whatever is published.
pub const MAX_LABEL_BYTES: usize = 128;

/// The shared half: counters and first-seen order.
pub struct UnknownTypes {
    counters: IntCounterVec,
    other: IntCounter,
    /// Tracked types, oldest first, with their counters.
    seen: Mutex<Vec<(Box<str>, IntCounter)>>,
}

/// What `/ws/health/detailed` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Tracked types, oldest first, with their counts.
    pub types: Vec<(Box<str>, u64)>,
    /// Events counted under `type="other"`.
    pub other: u64,
}

impl Snapshot {
    /// Every unknown event, tracked or not.
    pub fn total(&self) -> u64 {
        self.types.iter().map(|(_, n)| n).sum::<u64>() + self.other
    }
}

impl UnknownTypes {
    /// Wraps `counters`, the `{type}` family declared in the metrics table.
    pub fn new(counters: IntCounterVec) -> UnknownTypes {
        // Exported from start, so that the series exists before the first one.
        let other = counters.with_label_values(&[OTHER]);
        UnknownTypes {
            counters,
            other,
            seen: Mutex::new(Vec::new()),
        }
    }

    /// The counter family, for registration.
    pub fn collector(&self) -> IntCounterVec {
        self.counters.clone()
    }

    pub fn snapshot(&self) -> Snapshot {
        let types = self
            .seen
            .lock()
            .iter()
            .map(|(t, c)| (t.clone(), c.get()))
            .collect();
        Snapshot {
            types,
            other: self.other.get(),
        }
    }
}

/// The dispatcher's half: one per gateway, owned outright.
#[derive(Default)]
pub struct Tracker {
    tracked: HashMap<Box<str>, IntCounter>,
    /// Whether the "at capacity" warning was logged.
    full: bool,
    /// Unknown events recorded, for the log.
    total: u64,
}

impl Tracker {
    /// Counts one event of the unknown type `event_type`.
    pub fn record(&mut self, shared: &UnknownTypes, event_type: &str) {
        self.total += 1;
        let label = label(event_type);
        if let Some(counter) = self.tracked.get(label) {
            counter.inc();
            return;
        }
        if label == OTHER {
            shared.other.inc();
            return;
        }
        if self.tracked.len() >= MAX_TRACKED_TYPES {
            shared.other.inc();
            if !self.full {
                self.full = true;
                tracing::warn!(
                    event_type = label,
                    max_types = MAX_TRACKED_TYPES,
                    total_unknown_count = self.total,
                    "Unknown event types tracker at capacity; further types are counted as other"
                );
            }
            return;
        }
        let counter = shared.counters.with_label_values(&[label]);
        counter.inc();
        shared.seen.lock().push((label.into(), counter.clone()));
        self.tracked.insert(label.into(), counter);
        tracing::warn!(
            event_type = label,
            total_unknown_count = self.total,
            "Unknown event type received (first occurrence)"
        );
    }
}

/// The label of a type: the type, cut to [`MAX_LABEL_BYTES`].
fn label(event_type: &str) -> &str {
    &event_type[..event_type.floor_char_boundary(MAX_LABEL_BYTES)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Opts;

    #[test]
    fn the_first_types_are_counted_by_name_the_rest_as_other() {
        let counters = IntCounterVec::new(Opts::new("unknown_types", "test"), &["type"]).unwrap();
        let shared = UnknownTypes::new(counters);
        let mut t = Tracker::default();
        for i in 0..MAX_TRACKED_TYPES {
            t.record(&shared, &format!("T{i}"));
        }
        t.record(&shared, "T0");
        t.record(&shared, "LATE");
        t.record(&shared, "LATER");
        t.record(&shared, "other");
        let s = shared.snapshot();
        assert_eq!(s.types.len(), MAX_TRACKED_TYPES);
        assert_eq!(s.types[0], ("T0".into(), 2));
        assert_eq!(s.types[99], ("T99".into(), 1));
        assert_eq!(s.other, 3);
        assert_eq!(s.total(), 104);
        assert_eq!(shared.counters.with_label_values(&["T0"]).get(), 2);
        assert_eq!(shared.counters.with_label_values(&[OTHER]).get(), 3);
    }

    #[test]
    fn long_types_are_cut_at_a_character_boundary() {
        let long = "é".repeat(100);
        let cut = label(&long);
        assert!(cut.len() <= MAX_LABEL_BYTES && long.starts_with(cut));
        assert_eq!(cut.len(), MAX_LABEL_BYTES);
        assert_eq!(label("SHORT"), "SHORT");
    }
}
