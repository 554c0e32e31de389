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

use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

use super::algorithm::{self, CounterState};
use super::{CounterOp, Store, StoreFuture};

/// One counter's state and when it can be forgotten.
#[derive(Debug, Clone, Copy)]
struct Entry {
    state: CounterState,
    /// ms since the epoch after which the state no longer matters.
    expires_at: u64,
}

#[derive(Debug)]
pub struct MemoryStore {
    counters: DashMap<String, Entry>,
    max_entries: usize,
    /// New counters refused because the map was full.
    rejected_inserts: AtomicU64,
}

impl MemoryStore {
    pub fn new(max_entries: usize) -> Self {
        Self {
            counters: DashMap::new(),
            max_entries,
            rejected_inserts: AtomicU64::new(0),
        }
    }

    /// Applies one op at `now` and fills its outcome.
    pub fn apply_one(&self, op: &mut CounterOp, now: u64) {
        let run = |prev: Option<Entry>| {
            // State past its expiry is as good as absent (the sweeper may not have run yet).
            let prev = prev.filter(|e| e.expires_at > now).map(|e| e.state);
            algorithm::apply(op.algorithm, prev, now, &op.threshold, op.hits, op.mode)
        };
        // Look up by &str first: the common case (counter exists) allocates nothing.
        if let Some(mut entry) = self.counters.get_mut(op.counter.as_str()) {
            let (outcome, state, expires_at) = run(Some(*entry));
            *entry = Entry { state, expires_at };
            op.outcome = outcome;
            return;
        }
        if self.counters.len() >= self.max_entries {
            self.rejected_inserts.fetch_add(1, Ordering::Relaxed);
            op.outcome = run(None).0;
            return;
        }
        // Another request may have created the counter since the lookup; the entry API
        // applies on top of whatever is there now.
        match self.counters.entry(op.counter.clone()) {
            dashmap::Entry::Occupied(mut occupied) => {
                let (outcome, state, expires_at) = run(Some(*occupied.get()));
                occupied.insert(Entry { state, expires_at });
                op.outcome = outcome;
            }
            dashmap::Entry::Vacant(vacant) => {
                let (outcome, state, expires_at) = run(None);
                vacant.insert(Entry { state, expires_at });
                op.outcome = outcome;
            }
        }
    }

    /// Drops every counter whose state expired at `now`. Run periodically by the server.
    pub fn sweep(&self, now: u64) -> usize {
        let before = self.counters.len();
        self.counters.retain(|_, e| e.expires_at > now);
        before.saturating_sub(self.counters.len())
    }

    pub fn len(&self) -> usize {
        self.counters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counters.is_empty()
    }

    pub fn rejected_inserts(&self) -> u64 {
        self.rejected_inserts.load(Ordering::Relaxed)
    }
}

impl Store for MemoryStore {
    fn apply<'a>(&'a self, ops: &'a mut [CounterOp], now: u64) -> StoreFuture<'a> {
        for op in ops.iter_mut() {
            self.apply_one(op, now);
            op.source = "memory";
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn source(&self) -> &'static str {
        "memory"
    }

    fn report(&self, metrics: &crate::metrics::Metrics) {
        metrics
            .gauge(crate::metrics::MEMORY_ENTRIES, &[])
            .set(self.len() as f64);
        metrics
            .counter(crate::metrics::MEMORY_REJECTED, &[])
            .absolute(self.rejected_inserts());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{Algorithm, HitMode, Threshold, Unit};

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
