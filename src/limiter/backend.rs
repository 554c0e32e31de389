//! The backend as the server assembles it: the store the request path counts with, and what
//! only the operator's side asks about it (is it ready, is the fallback answering, what
//! gauges to publish, what to sweep).
//!
//! Keeping these out of [`Store`] means the wrappers (cache, fallback) implement one method
//! and forward nothing by hand: the backend holds each part by its own type and asks it
//! directly.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::cache::OverLimitCache;
use super::fallback::{Fallback, FallbackConfig, FallbackStore};
use super::lease::Leasing;
use super::memory::MemoryStore;
use super::{Source, Store, StoreFuture};
use crate::metrics::{self, Metrics};

/// A store on the other side of a network: it can be down, and a cheap round trip tells
/// whether it is back (the breaker's probe).
pub trait Remote: Store {
    /// The `source` of its answers and the `store` label of its metrics.
    fn source(&self) -> Source;

    /// `Ok` when a connection is up; the reason otherwise (for `/readyz`).
    fn ready(&self) -> Result<(), String>;

    /// A real write (the counting script on a probe key) that succeeds once the store takes
    /// writes again. Not a PING: a Redis out of memory, read-only or refusing the credentials
    /// answers PING and still cannot count.
    /// `shard` is the one to probe (see [`Remote::shard`]).
    fn probe(&self, shard: usize) -> StoreFuture<'_>;

    /// Which shard holds `counter`, below [`super::redis::MAX_SHARDS`]: each has a breaker of
    /// its own. One store, one shard, unless it is a cluster.
    fn shard(&self, counter: &str) -> usize {
        let _ = counter;
        0
    }

    /// Whether counters live on several shards.
    fn sharded(&self) -> bool {
        false
    }

    /// What to call a shard in the log and `/readyz`.
    fn shard_name(&self, shard: usize) -> String {
        format!("shard {shard}")
    }

    /// Whether the store has answered within `within` (or has nothing outstanding): a call
    /// that timed out then waited behind sluice's own queue, which is load, not a failure.
    fn answering(&self, within: std::time::Duration) -> bool {
        let _ = within;
        false
    }

    /// Registers who is told what the store counted for calls whose requests gave up.
    fn on_orphans(&self, handler: super::redis::batch::Orphans) {
        let _ = handler;
    }

    /// What the operator should fix although the store is ready (for `/readyz`, one line
    /// each), e.g. a Redis eviction policy that can reset counters.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }

    /// Publishes the store's own gauges, just before a scrape.
    fn report(&self, _metrics: &Metrics) {}
}

pub struct Backend {
    /// What the request path counts with: the memory store, or cache → fallback → remote.
    store: Arc<dyn Store>,
    source: Source,
    /// The counters of the memory backend, or of the `local` fallback.
    memory: Arc<MemoryStore>,
    remote: Option<RemoteParts>,
}

/// The three parts a remote backend adds, each held by its own type.
struct RemoteParts {
    remote: Arc<dyn Remote>,
    leasing: Arc<Leasing>,
    fallback: Arc<Fallback>,
    cache: Arc<OverLimitCache>,
}

impl Backend {
    /// Counting in process memory only.
    pub fn memory(memory: Arc<MemoryStore>) -> Self {
        Self {
            store: memory.clone(),
            source: Source::Memory,
            memory,
            remote: None,
        }
    }

    /// Counting in a remote store, wrapped as the request path needs it: the over-limit
    /// cache first (no call for a counter known to be over), then the fallback (a timeout,
    /// a circuit breaker, and local answers while the remote cannot give them), then leases
    /// (blocks of hits for routes with `lease`; other counters pass straight through).
    pub fn remote(
        remote: Arc<dyn Remote>,
        memory: Arc<MemoryStore>,
        fallback: FallbackConfig,
        cache_entries: usize,
        clock: Arc<dyn crate::clock::Clock>,
        metrics: Arc<Metrics>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        let source = remote.source();
        // As many leased counters as the memory store holds counters.
        let leasing = Arc::new(Leasing::new(remote.clone(), memory.capacity()));
        let fallback = Fallback::new(
            leasing.clone(),
            memory.clone(),
            fallback,
            clock,
            metrics,
            stop,
        );
        let cache = Arc::new(OverLimitCache::new(
            Arc::new(FallbackStore(fallback.clone())),
            cache_entries,
        ));
        Self {
            store: cache.clone(),
            source,
            memory,
            remote: Some(RemoteParts {
                remote,
                leasing,
                fallback,
                cache,
            }),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The `store` label of metrics: `memory` or `redis`.
    pub fn source(&self) -> Source {
        self.source
    }

    /// `Ok` when the store can answer now; the reason otherwise.
    pub fn ready(&self) -> Result<(), String> {
        match &self.remote {
            Some(parts) => parts.remote.ready(),
            None => Ok(()),
        }
    }

    /// Why the fallback answers instead of the store, with what to do; `None` when it does not.
    pub fn fallback_reason(&self) -> Option<String> {
        self.remote.as_ref().and_then(|p| p.fallback.reason())
    }

    /// The remote store's warnings for `/readyz` (see [`Remote::warnings`]).
    pub fn warnings(&self) -> Vec<String> {
        self.remote
            .as_ref()
            .map(|p| p.remote.warnings())
            .unwrap_or_default()
    }

    /// Whether the fallback answers instead of the remote store right now.
    pub fn fallback_active(&self) -> bool {
        self.remote.as_ref().is_some_and(|p| p.fallback.is_open())
    }

    /// Drops what expired at `now` (counters, cached over-limit answers).
    pub fn sweep(&self, now: u64) {
        self.memory.sweep(now);
        if let Some(parts) = &self.remote {
            parts.cache.sweep(now);
            parts.fallback.ledger().sweep(now);
            parts.leasing.sweep(now);
        }
    }

    /// Publishes the stores' own gauges, just before a scrape.
    pub fn report(&self, m: &Metrics) {
        m.gauge(metrics::MEMORY_ENTRIES, &[])
            .set(self.memory.len() as f64);
        m.counter(metrics::MEMORY_REJECTED, &[])
            .absolute(self.memory.rejected_inserts());
        if let Some(parts) = &self.remote {
            parts.remote.report(m);
            m.gauge(metrics::OVER_LIMIT_CACHE_ENTRIES, &[])
                .set(parts.cache.len() as f64);
            m.counter(metrics::OVER_LIMIT_CACHE_HITS, &[])
                .absolute(parts.cache.hits());
            let ledger = parts.fallback.ledger();
            m.gauge(metrics::FALLBACK_OWED, &[])
                .set(ledger.outstanding() as f64);
            let stats = ledger.stats();
            for (state, value) in [
                ("owed", &stats.owed),
                ("written_back", &stats.written_back),
                ("expired", &stats.expired),
                ("forgiven", &stats.forgiven),
                ("refused", &stats.refused),
            ] {
                m.counter(metrics::FALLBACK_HITS, &[("state", state)])
                    .absolute(value.load(Ordering::Relaxed));
            }
            let lease = parts.leasing.stats();
            m.counter(metrics::LEASES, &[])
                .absolute(lease.leases.load(Ordering::Relaxed));
            m.counter(metrics::LEASED_HITS, &[])
                .absolute(lease.leased_hits.load(Ordering::Relaxed));
            m.counter(metrics::LEASE_ADMITTED, &[])
                .absolute(lease.admitted.load(Ordering::Relaxed));
        }
    }
}
