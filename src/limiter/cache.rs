//! The over-limit cache: a counter found over its limit is answered from process memory,
//! without a store call, until it can pass again (DESIGN §3).
//!
//! A wrapper around any [`Store`]. Only answers the store gave (not the fallback's) are
//! remembered, so when Redis comes back its counts decide again at once. Bounded: at
//! `max_entries` new over-limit counters are simply not remembered (they still get correct
//! answers from the store); expired entries are dropped by [`OverLimitCache::sweep`].
//! A reload that raises a limit takes effect for a cached counter at its reset time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

use super::{CounterOp, HitMode, Outcome, Store, StoreFuture};

/// The `source` of answers given from the cache.
pub const SOURCE: &str = "local_cache";

pub struct OverLimitCache {
    inner: Arc<dyn Store>,
    /// Counter id -> time (ms since the epoch) it can admit again.
    until: DashMap<String, u64>,
    max_entries: usize,
    hits: AtomicU64,
}

impl OverLimitCache {
    pub fn new(inner: Arc<dyn Store>, max_entries: usize) -> Self {
        Self {
            inner,
            until: DashMap::new(),
            max_entries,
            hits: AtomicU64::new(0),
        }
    }

    fn cached(&self, op: &CounterOp, now: u64) -> Option<u64> {
        if op.mode != HitMode::Take {
            return None;
        }
        self.until
            .get(op.counter.as_str())
            .map(|u| *u)
            .filter(|until| *until > now)
    }

    fn remember(&self, ops: &[CounterOp], now: u64) {
        for op in ops {
            let from_store = op.source == self.inner.source();
            if op.outcome.over && op.mode == HitMode::Take && from_store && op.outcome.reset_ms > 0
            {
                if self.until.len() >= self.max_entries
                    && !self.until.contains_key(op.counter.as_str())
                {
                    continue;
                }
                self.until
                    .insert(op.counter.clone(), now + op.outcome.reset_ms);
            }
        }
    }

    pub fn sweep(&self, now: u64) {
        self.until.retain(|_, until| *until > now);
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
                        op.source = SOURCE;
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

    fn source(&self) -> &'static str {
        self.inner.source()
    }

    fn ready(&self) -> Result<(), String> {
        self.inner.ready()
    }

    fn probe(&self) -> StoreFuture<'_> {
        self.inner.probe()
    }

    fn fallback_active(&self) -> bool {
        self.inner.fallback_active()
    }

    fn report(&self, metrics: &crate::metrics::Metrics) {
        metrics
            .gauge(crate::metrics::OVER_LIMIT_CACHE_ENTRIES, &[])
            .set(self.len() as f64);
        metrics
            .counter(crate::metrics::OVER_LIMIT_CACHE_HITS, &[])
            .absolute(self.hits());
        self.inner.report(metrics);
    }
}
