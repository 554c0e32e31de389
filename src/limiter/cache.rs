//! The over-limit cache: a counter found over its limit is answered from process memory,
//! without a store call, until it can pass again: a client hammering a closed limit costs no
//! Redis command at all.
//!
//! A wrapper around any [`Store`]. Only answers the store gave (not the fallback's) are
//! remembered, so when Redis comes back its counts decide again at once. Bounded: at
//! `max_entries` new over-limit counters are simply not remembered (they still get correct
//! answers from the store); expired entries are dropped by [`OverLimitCache::sweep`].
//! A reload that raises a limit takes effect for a cached counter at its reset time. A
//! give-back forgets its counter here (what it returned may let the next hit pass); a cached
//! refusal on another replica lasts until its reset time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::bounded::BoundedMap;
use super::{Algorithm, CounterOp, HitMode, Outcome, Source, Store, StoreFuture};

pub struct OverLimitCache {
    inner: Arc<dyn Store>,
    /// Counter id -> time (ms since the epoch) it can admit again.
    until: BoundedMap<u64>,
    hits: AtomicU64,
}

impl OverLimitCache {
    pub fn new(inner: Arc<dyn Store>, max_entries: usize) -> Self {
        Self {
            inner,
            until: BoundedMap::new(max_entries),
            hits: AtomicU64::new(0),
        }
    }

    fn cached(&self, op: &CounterOp, now: u64) -> Option<u64> {
        // A concurrency take must reach the store even when over: it holds a slot there
        // that its give-back will free.
        if op.mode != HitMode::Take || op.algorithm == Algorithm::Concurrent {
            return None;
        }
        self.until.get(&op.counter).filter(|until| *until > now)
    }

    /// Remembers what the store itself found over; never the fallback's guesses, so when the
    /// store is back its counts decide again at once. A give-back forgets its counter: what
    /// it returned may let the next hit pass, and only the store can say.
    fn remember(&self, ops: &[CounterOp], now: u64) {
        for op in ops {
            if op.mode == HitMode::Give {
                self.until.remove(&op.counter);
                continue;
            }
            let from_store = matches!(op.source, Source::Memory | Source::Redis);
            let windowed = op.algorithm != Algorithm::Concurrent;
            if op.outcome.over
                && op.mode == HitMode::Take
                && from_store
                && windowed
                && op.outcome.reset_ms > 0
            {
                let until = now + op.outcome.reset_ms;
                self.until.update(&op.counter, |_| ((), until));
            }
        }
    }

    pub fn sweep(&self, now: u64) {
        self.until.retain(|until| *until > now);
    }

    pub fn len(&self) -> usize {
        self.until.len()
    }

    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Store for OverLimitCache {
    fn apply<'a>(&'a self, ops: &'a mut [CounterOp], now: u64) -> StoreFuture<'a> {
        Box::pin(async move {
            let mut pending: Vec<usize> = Vec::new();
            for (i, op) in ops.iter_mut().enumerate() {
                match self.cached(op, now) {
                    Some(until) => {
                        self.hits.fetch_add(1, Ordering::Relaxed);
                        op.outcome = Outcome {
                            over: true,
                            remaining: 0,
                            reset_ms: until - now,
                        };
                        op.source = Source::LocalCache;
                    }
                    None => pending.push(i),
                }
            }
            if pending.len() == ops.len() {
                self.inner.apply(ops, now).await?;
                self.remember(ops, now);
            } else if !pending.is_empty() {
                let mut rest: Vec<CounterOp> = pending.iter().map(|&i| ops[i].clone()).collect();
                self.inner.apply(&mut rest, now).await?;
                self.remember(&rest, now);
                for (i, done) in pending.into_iter().zip(rest) {
                    ops[i] = done;
                }
            }
            Ok(())
        })
    }
}
