//! The in-process store: counters in a [`DashMap`], for single-replica use, tests, and (later)
//! the local fallback when Redis is down.
//!
//! It owns where state lives, its expiry and its bound; the decision itself is the pure
//! algorithm, run under the map's per-shard entry lock so concurrent hits on one counter are
//! applied one after the other. No lock is held across an `.await` (there is none).
//!
//! At the bound (`max_entries`), a new counter is not stored: its hit is judged as the first
//! hit of a fresh counter and counted in `rejected_inserts`. Existing counters keep counting
//! exactly. This keeps memory bounded under a flood of distinct keys, at the price of not
//! limiting the overflow keys until the sweeper frees room.

use super::algorithm::{self, CounterState};
use super::bounded::BoundedMap;
use super::concurrency::{self, Slots};
use super::{Algorithm, CounterOp, HitMode, Source, Store, StoreFuture};

/// One counter's state and when it can be forgotten.
#[derive(Debug, Clone, Copy)]
struct Entry {
    state: CounterState,
    /// ms since the epoch after which the state no longer matters.
    expires_at: u64,
}

/// A concurrency counter's slots and when they can be forgotten.
#[derive(Debug, Clone)]
struct SlotsEntry {
    slots: Slots,
    expires_at: u64,
}

#[derive(Debug)]
pub struct MemoryStore {
    counters: BoundedMap<Entry>,
    /// `concurrent` counters, apart: their state is a list of slots, not a few numbers, so
    /// windowed counters keep their copyable state.
    slots: BoundedMap<SlotsEntry>,
}

impl MemoryStore {
    /// Holds at most `max_entries` windowed counters, and as many concurrency counters.
    pub fn new(max_entries: usize) -> Self {
        Self {
            counters: BoundedMap::new(max_entries),
            slots: BoundedMap::new(max_entries),
        }
    }

    /// Applies one op at `now` and fills its outcome.
    pub fn apply_one(&self, op: &mut CounterOp, now: u64) {
        if op.algorithm == Algorithm::Concurrent {
            let (outcome, change) = self.slots.update(&op.counter, |prev| {
                // Expired slots are dropped (and counted) by the function itself, as Redis does.
                let prev = prev.map(|e| &e.slots);
                let (outcome, slots, change) =
                    concurrency::concurrent(prev, now, &op.threshold, op.hits, op.mode);
                let expires_at = slots.expires_at(now);
                ((outcome, change), SlotsEntry { slots, expires_at })
            });
            op.outcome = outcome;
            op.granted = change.moved;
            op.expired = change.expired;
            return;
        }
        let lease = op.block > 0 && op.hits > 0 && op.mode == HitMode::Take;
        (op.outcome, op.granted) = self.counters.update(&op.counter, |prev| {
            // State past its expiry is as good as absent (the sweeper may not have run yet).
            let prev = prev.filter(|e| e.expires_at > now).map(|e| e.state);
            let (outcome, state, expires_at, granted) = if lease {
                algorithm::apply_lease(op.algorithm, prev, now, &op.threshold, op.hits, op.block)
            } else {
                let (outcome, state, expires_at) =
                    algorithm::apply(op.algorithm, prev, now, &op.threshold, op.hits, op.mode);
                let taken = op.mode == HitMode::Take && !outcome.over;
                (outcome, state, expires_at, if taken { op.hits } else { 0 })
            };
            ((outcome, granted), Entry { state, expires_at })
        });
    }

    /// Whether `op`'s windowed counter has live state here (the fallback counted it).
    pub fn holds(&self, op: &CounterOp) -> bool {
        op.algorithm != Algorithm::Concurrent && self.counters.get(&op.counter).is_some()
    }

    /// Replaces `op`'s counter with one that holds `hits` charged at `at`: where the fallback
    /// starts a counter the store has been counting (see [`super::reconcile`]).
    pub fn seed(&self, op: &CounterOp, at: u64, hits: u64) {
        if op.algorithm == Algorithm::Concurrent {
            return;
        }
        self.counters.update(&op.counter, |_| {
            let (_, state, expires_at) =
                algorithm::apply(op.algorithm, None, at, &op.threshold, hits, HitMode::Charge);
            ((), Entry { state, expires_at })
        });
    }

    /// Drops every counter whose state expired at `now`. Run periodically by the server.
    pub fn sweep(&self, now: u64) -> usize {
        self.counters.retain(|e| e.expires_at > now) + self.slots.retain(|e| e.expires_at > now)
    }

    pub fn len(&self) -> usize {
        self.counters.len() + self.slots.len()
    }

    /// The most counters it holds.
    pub fn capacity(&self) -> usize {
        self.counters.capacity()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn rejected_inserts(&self) -> u64 {
        self.counters.refused() + self.slots.refused()
    }
}

impl Store for MemoryStore {
    fn apply<'a>(&'a self, ops: &'a mut [CounterOp], now: u64) -> StoreFuture<'a> {
        for op in ops.iter_mut() {
            self.apply_one(op, now);
            op.source = Source::Memory;
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{Algorithm, Threshold, Unit};

    fn op(counter: &str, limit: u64) -> CounterOp {
        CounterOp::new(
            counter.to_string(),
            Algorithm::FixedWindow,
            Threshold::new(limit, Unit::Second),
            1,
            HitMode::Take,
        )
    }

    #[test]
    fn counters_are_separate_and_expired_ones_are_swept() {
        let store = MemoryStore::new(10);
        let mut a = op("a", 1);
        let mut b = op("b", 1);
        store.apply_one(&mut a, 1_000);
        store.apply_one(&mut a, 1_100);
        store.apply_one(&mut b, 1_100);
        assert!(a.outcome.over);
        assert!(!b.outcome.over);
        assert_eq!(store.sweep(1_999), 0);
        assert_eq!(store.sweep(2_000), 2);
        assert!(store.is_empty());
    }

    #[test]
    fn at_the_bound_new_counters_are_judged_fresh_and_not_stored() {
        let store = MemoryStore::new(2);
        for name in ["a", "b", "c", "c"] {
            store.apply_one(&mut op(name, 1), 1_000);
        }
        assert_eq!(store.len(), 2);
        assert_eq!(store.rejected_inserts(), 2);
        let mut c = op("c", 1);
        store.apply_one(&mut c, 1_000);
        assert!(!c.outcome.over, "an untracked counter answers as fresh");
    }
}
