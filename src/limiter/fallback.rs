//! The fallback: a circuit breaker around a remote store, the answers given while it is open
//! or when one call fails, and the write-back that makes those answers count.
//!
//! Every call to the inner store is bounded by the smallest `timeout` of the routes in the
//! batch; past it (or on an error) each route's `fallback` mode answers at once, so Envoy
//! never waits on a dead store. The `local` mode does not count from zero: it continues from
//! what the store last said about the counter, and every hit it admits is owed to the store
//! and written back into the window that admitted it once the store answers again (see
//! [`super::reconcile`]). So the fleet's count includes every admission, and with one replica
//! (or `fallback.replicas` set to the fleet's size) an outage admits no more than the limit
//! plus what was in flight.
//!
//! The breaker reacts to the store, not to load: a timeout counts as a failure only when the
//! store itself stopped answering (a batch out longer than the budget with no reply since),
//! not when the request waited behind sluice's own queue of work for a store that keeps
//! answering. After `failure_threshold` consecutive failures it opens: no request calls the
//! store, and a background probe closes it once the store takes a real write again (the
//! counting script on a probe key: a PING is answered by a Redis that is out of memory,
//! read-only or refusing the credentials, and closing on it would flap). No request is ever
//! used as a probe, so none pays for one.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{info, warn};

use super::backend::Remote;
use super::memory::MemoryStore;
use super::reconcile::{Charge, Ledger};
use super::redis::MAX_SHARDS;
use super::{CounterOp, FallbackMode, HitMode, Outcome, Source, Store, StoreError, StoreFuture};
use crate::clock::Clock;
use crate::metrics::{self, Metrics};

/// How long the store may go without answering anything, while calls are out, before a
/// timeout counts as its failure. A request's budget can be a millisecond; a healthy Redis
/// busy with a large batch on a loaded host can take longer than that, and that is load. A
/// store silent this long is not working (each request is still answered within its budget).
const STALLED_AFTER: Duration = Duration::from_millis(100);

/// How often owed hits are written back while the store answers.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// The most charges one write-back call carries.
const FLUSH_BATCH: usize = 256;
/// How long a write-back call may take: it is not on any request's path, and it outlasts
/// the batch's own wait for a reply, so a reply that comes is never taken for a loss.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy)]
pub struct FallbackConfig {
    /// Replicas sharing the limits: local counting divides each limit by this.
    pub replicas: u32,
    pub failure_threshold: u32,
    pub probe_interval: Duration,
}

pub struct Fallback {
    inner: Arc<dyn Remote>,
    local: Arc<MemoryStore>,
    ledger: Arc<Ledger>,
    config: FallbackConfig,
    /// One per shard of the store (one for a single node or Sentinel): a failing shard
    /// sends only its own counters to the fallback.
    breakers: Box<[Breaker]>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    /// Turns true at shutdown: a running probe ends instead of being dropped mid-call.
    stop: tokio::sync::watch::Receiver<bool>,
}

/// Closed (calls go to the store) or open (they do not). Atomics, not a lock: the hot path
/// reads it on every request; the reason is only written when it opens.
struct Breaker {
    open: AtomicBool,
    failures: AtomicU32,
    /// Why it opened last, with what to do about it (for `/readyz` and the log).
    reason: Mutex<String>,
    /// When it last closed (ms since the epoch, the fallback's clock).
    closed_at: AtomicU64,
}

impl Breaker {
    fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }
}

impl Fallback {
    /// Wraps `inner`. A store that is not reachable now starts with the breaker open.
    pub fn new(
        inner: Arc<dyn Remote>,
        local: Arc<MemoryStore>,
        config: FallbackConfig,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Arc<Self> {
        let fallback = Arc::new(Self {
            inner,
            ledger: Arc::new(Ledger::new(local.capacity())),
            local,
            config,
            breakers: (0..MAX_SHARDS)
                .map(|_| Breaker {
                    open: AtomicBool::new(false),
                    failures: AtomicU32::new(0),
                    reason: Mutex::new(String::new()),
                    closed_at: AtomicU64::new(0),
                })
                .collect(),
            clock,
            metrics,
            stop,
        });
        let ledger = Arc::clone(&fallback.ledger);
        fallback
            .inner
            .on_orphans(Arc::new(move |counter, window, hits| {
                ledger.forgive(counter, window, hits)
            }));
        if let Err(reason) = fallback.inner.ready() {
            fallback.open(0, &reason);
        }
        let flusher = Arc::clone(&fallback);
        tokio::spawn(async move { flusher.write_back_while_serving().await });
        fallback
    }

    /// Whether any shard's breaker is open.
    pub fn is_open(&self) -> bool {
        self.breakers.iter().any(Breaker::is_open)
    }

    fn breaker(&self, shard: usize) -> &Breaker {
        &self.breakers[shard % self.breakers.len()]
    }

    /// Why breakers are open, with what to do about it; `None` while all are closed.
    pub fn reason(&self) -> Option<String> {
        let open: Vec<String> = self
            .breakers
            .iter()
            .enumerate()
            .filter(|(_, b)| b.is_open())
            .map(|(shard, b)| {
                let reason = b.reason.lock().map(|r| r.clone()).unwrap_or_default();
                if self.inner.sharded() {
                    format!("{}: {reason}", self.inner.shard_name(shard))
                } else {
                    reason
                }
            })
            .collect();
        (!open.is_empty()).then(|| open.join("; "))
    }

    /// The ledger of what the fallback admitted (for metrics and `/readyz`).
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    fn set_reason(&self, shard: usize, reason: &str) {
        if let Ok(mut held) = self.breaker(shard).reason.lock() {
            reason.clone_into(&mut held);
        }
    }

    fn open(self: &Arc<Self>, shard: usize, reason: &str) {
        self.set_reason(shard, reason);
        if self.breaker(shard).open.swap(true, Ordering::AcqRel) {
            return;
        }
        warn!(
            store = self.inner.source().as_str(),
            shard = %self.inner.shard_name(shard),
            reason,
            "circuit breaker open: the fallback answers, and what it admits is written back when the store answers again"
        );
        self.metrics
            .counter(metrics::BREAKER_TRANSITIONS, &[("to", "open")])
            .increment(1);
        self.metrics.gauge(metrics::FALLBACK_ACTIVE, &[]).set(1.0);
        let this = Arc::clone(self);
        tokio::spawn(async move { this.probe_until_closed(shard).await });
    }

    async fn probe_until_closed(self: Arc<Self>, shard: usize) {
        let every = self.config.probe_interval;
        let mut stop = self.stop.clone();
        let mut said = String::new();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            let error = match tokio::time::timeout(every, self.inner.probe(shard)).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(StoreError::Timeout.to_string()),
            };
            let Some(error) = error else {
                // What the fallback admitted goes back first, so the store's first answers
                // after the close already hold it.
                self.write_back(Some(shard)).await;
                self.close(shard);
                return;
            };
            // A new kind of trouble is said once, not on every probe.
            if error != said {
                warn!(
                    store = self.inner.source().as_str(),
                    shard = %self.inner.shard_name(shard),
                    error = %error,
                    "the store still cannot take a write; the fallback keeps answering"
                );
                self.set_reason(shard, &error);
                said = error;
            }
        }
    }

    fn close(&self, shard: usize) {
        let breaker = self.breaker(shard);
        breaker.failures.store(0, Ordering::Release);
        breaker
            .closed_at
            .store(self.clock.now_ms(), Ordering::Release);
        breaker.open.store(false, Ordering::Release);
        info!(
            store = self.inner.source().as_str(),
            shard = %self.inner.shard_name(shard),
            owed_hits = self.ledger.outstanding(),
            "circuit breaker closed: the store takes writes again; writing back what the fallback admitted"
        );
        self.metrics
            .counter(metrics::BREAKER_TRANSITIONS, &[("to", "closed")])
            .increment(1);
        if !self.is_open() {
            self.metrics.gauge(metrics::FALLBACK_ACTIVE, &[]).set(0.0);
        }
    }

    /// Counts a failure of `shard`; at `failure_threshold` in a row its breaker opens.
    fn failed(self: &Arc<Self>, shard: usize, error: &StoreError) {
        self.count_error(error.kind());
        let failures = self.breaker(shard).failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures >= self.config.failure_threshold.max(1) {
            self.open(shard, &error.to_string());
        }
    }

    fn count_error(&self, kind: &'static str) {
        self.metrics
            .counter(
                metrics::STORE_ERRORS,
                &[("store", self.inner.source().as_str()), ("kind", kind)],
            )
            .increment(1);
    }

    /// Answers every op (with `pending_only`, every op no store answered) by its route's
    /// fallback mode; `error` in any take fails the batch.
    ///
    /// A give-back (`is_negative_hits`, sent by Envoy at stream end) is never failed: nothing
    /// waits on its answer, so under `error` it is answered OK, as `allow` would.
    fn answer(
        &self,
        ops: &mut [CounterOp],
        now: u64,
        error: StoreError,
        pending_only: bool,
    ) -> Result<(), StoreError> {
        let answers = |op: &CounterOp| !pending_only || op.source == Source::Pending;
        if ops.iter().any(|op| {
            answers(op) && op.policy.fallback == FallbackMode::Error && op.mode == HitMode::Take
        }) {
            return Err(StoreError::Declined(Box::new(error)));
        }
        let replicas = u64::from(self.config.replicas.max(1));
        for op in ops.iter_mut().filter(|op| answers(op)) {
            // A lease asked of the store (and not answered) is a plain hit here.
            op.block = 0;
            let period = op.threshold.period_ms();
            let reset_ms = period - now % period;
            match op.policy.fallback {
                FallbackMode::Local => {
                    let configured = op.threshold;
                    op.threshold.limit = configured.limit.div_ceil(replicas);
                    // Continue from the store's count: its share of it, plus what this replica
                    // admitted and has not written back.
                    if let Some((hits, at)) = self.ledger.seed(op, now, replicas) {
                        self.local.seed(op, at, hits);
                    }
                    self.local.apply_one(op, now);
                    op.threshold = configured;
                }
                // `allow` admits; `deny` and `error` reject, but a give-back is answered OK
                // in every mode: nothing waits on it.
                FallbackMode::Allow | FallbackMode::Deny | FallbackMode::Error => {
                    let admit =
                        op.policy.fallback == FallbackMode::Allow || op.mode == HitMode::Give;
                    op.outcome = Outcome {
                        over: !admit,
                        remaining: if admit { op.threshold.limit } else { 0 },
                        reset_ms,
                    }
                }
            }
            // Every admission is owed to the store; one that cannot be remembered is refused.
            if op.mode == HitMode::Take && !op.outcome.over && !self.ledger.owe(op, now) {
                op.outcome.over = true;
                op.outcome.remaining = 0;
            }
            op.source = Source::Fallback;
        }
        Ok(())
    }

    /// Writes back what the fallback admitted, every [`FLUSH_EVERY`] while the breaker is
    /// closed, until shutdown; then once more.
    async fn write_back_while_serving(self: Arc<Self>) {
        let mut stop = self.stop.clone();
        loop {
            let stopping = tokio::select! {
                _ = tokio::time::sleep(FLUSH_EVERY) => false,
                _ = stop.wait_for(|stop| *stop) => true,
            };
            if self.ledger.owes() {
                self.write_back(None).await;
            }
            if stopping {
                return;
            }
        }
    }

    /// One round of write-back: every owed hit, in calls of [`FLUSH_BATCH`] grouped by the
    /// time they are counted at; not for shards whose breaker is open, but for `closing` (the
    /// shard whose probe just succeeded, written back before its breaker closes).
    async fn write_back(self: &Arc<Self>, closing: Option<usize>) {
        let now = self.clock.now_ms();
        let mut charges = self.ledger.drain(now, usize::MAX);
        // A shard whose breaker is open keeps its charges for later.
        charges.retain(|c| {
            let shard = self.inner.shard(&c.op.counter);
            let open = self.breaker(shard).is_open() && closing != Some(shard);
            if open {
                self.ledger.unsent(c);
            }
            !open
        });
        charges.sort_by_key(|c| c.at);
        let mut rest = charges.as_slice();
        while !rest.is_empty() {
            let at = rest[0].at;
            let same = rest
                .iter()
                .take(FLUSH_BATCH)
                .take_while(|c| c.at == at)
                .count();
            let (group, tail) = rest.split_at(same);
            rest = tail;
            if !self.send_charges(group, at).await {
                // The store failed again: everything not yet sent stays owed.
                rest.iter().for_each(|c| self.ledger.unsent(c));
                return;
            }
        }
    }

    /// Sends one group of charges; whether the store recorded them.
    async fn send_charges(self: &Arc<Self>, group: &[Charge], at: u64) -> bool {
        let mut ops: Vec<CounterOp> = group.iter().map(|c| c.op.clone()).collect();
        let error = match tokio::time::timeout(FLUSH_TIMEOUT, self.inner.apply(&mut ops, at)).await
        {
            Ok(Ok(())) => {
                for (charge, answered) in group.iter().zip(&ops) {
                    self.ledger.settled(charge, answered);
                }
                return true;
            }
            Ok(Err(e)) => e,
            Err(_) => StoreError::Timeout,
        };
        // A write-back that timed out may still land: sent again, it is counted twice,
        // which errs towards limiting.
        group.iter().for_each(|c| self.ledger.unsent(c));
        warn!(
            store = self.inner.source().as_str(),
            error = %error,
            charges = group.len(),
            "writing back the fallback's admissions failed; retrying"
        );
        let shard = group.first().map_or(0, |c| self.inner.shard(&c.op.counter));
        self.failed(shard, &error);
        false
    }
}

/// `Store` for the `Arc`, because opening the breaker spawns a probe that owns it.
pub struct FallbackStore(pub Arc<Fallback>);

impl Fallback {
    /// The shards the ops live on, each once (one store, one shard: no allocation).
    fn shards_of(&self, ops: &[CounterOp]) -> Vec<usize> {
        if !self.inner.sharded() {
            return vec![0];
        }
        let mut shards: Vec<usize> = ops.iter().map(|op| self.inner.shard(&op.counter)).collect();
        shards.sort_unstable();
        shards.dedup();
        shards
    }

    /// Just after a breaker closed, with several replicas: a hit the store admits must also fit
    /// in this replica's own share of the fallback's count, where the fallback counted it.
    /// The other replicas may not have written back what they admitted yet (each closes its
    /// breaker on its own probe, a few hundred ms apart), so the store's count alone would
    /// let this one admit their hits a second time.
    fn settling(&self, ops: &mut [CounterOp], now: u64) {
        let replicas = u64::from(self.config.replicas.max(1));
        if replicas == 1 {
            return;
        }
        let since = now.saturating_sub(self.breakers[0].closed_at.load(Ordering::Acquire));
        let settle = (self.config.probe_interval.as_millis() as u64)
            .saturating_mul(2)
            .saturating_add(FLUSH_EVERY.as_millis() as u64);
        if self.inner.sharded() || since > settle {
            return;
        }
        for op in ops.iter_mut() {
            let counted_here = op.mode == HitMode::Take
                && !op.outcome.over
                && op.policy.fallback == FallbackMode::Local
                && self.local.holds(op);
            if !counted_here {
                continue;
            }
            let mut local = op.clone();
            local.threshold.limit = op.threshold.limit.div_ceil(replicas);
            self.local.apply_one(&mut local, now);
            if local.outcome.over {
                op.outcome.over = true;
                op.outcome.remaining = 0;
            }
        }
    }

    /// Calls the store for `ops` within their budget; what it cannot answer, the fallback does.
    async fn call(self: &Arc<Self>, ops: &mut [CounterOp], now: u64) -> Result<(), StoreError> {
        let budget = ops
            .iter()
            .map(|op| op.policy.timeout)
            .min()
            .unwrap_or(super::DEFAULT_STORE_TIMEOUT);
        let error = match tokio::time::timeout(budget, self.inner.apply(ops, now)).await {
            Ok(Ok(())) => {
                if self.inner.sharded() {
                    for shard in self.shards_of(ops) {
                        self.breaker(shard).failures.store(0, Ordering::Release);
                    }
                } else {
                    self.breaker(0).failures.store(0, Ordering::Release);
                }
                self.ledger.observe(ops, now);
                self.settling(ops, now);
                return Ok(());
            }
            // Part of the batch answered (a cluster with one shard failing): only the failed
            // ops' shards count a failure, and only those ops go to the fallback.
            Ok(Err(StoreError::Partial(error))) => {
                self.ledger.observe(ops, now);
                let failed: Vec<CounterOp> = ops
                    .iter()
                    .filter(|op| op.source == Source::Pending)
                    .cloned()
                    .collect();
                for shard in self.shards_of(&failed) {
                    self.failed(shard, &error);
                }
                return self.answer(ops, now, *error, true);
            }
            Ok(Err(e)) => e,
            Err(_) => StoreError::Timeout,
        };
        if matches!(error, StoreError::Timeout) && self.inner.answering(budget.max(STALLED_AFTER)) {
            // The store keeps answering; this request waited behind others. Answered
            // here and written back, but no failure of the store.
            self.count_error("queued");
        } else {
            for shard in self.shards_of(ops) {
                self.failed(shard, &error);
            }
        }
        self.answer(ops, now, error, false)
    }
}

impl Store for FallbackStore {
    fn apply<'a>(&'a self, ops: &'a mut [CounterOp], now: u64) -> StoreFuture<'a> {
        Box::pin(async move {
            let fallback = &self.0;
            let closed = |op: &CounterOp| {
                !fallback
                    .breaker(fallback.inner.shard(&op.counter))
                    .is_open()
            };
            if ops.iter().all(closed) {
                return fallback.call(ops, now).await;
            }
            let open = || StoreError::Unavailable("circuit breaker open".into());
            if !ops.iter().any(closed) {
                return fallback.answer(ops, now, open(), false);
            }
            // Some shards answer, some do not: the store gets only the former's ops.
            let mut rest: Vec<CounterOp> = ops.iter().filter(|op| closed(op)).cloned().collect();
            let sent: Vec<usize> = (0..ops.len()).filter(|&i| closed(&ops[i])).collect();
            fallback.call(&mut rest, now).await?;
            for (i, done) in sent.into_iter().zip(rest) {
                ops[i] = done;
            }
            fallback.answer(ops, now, open(), true)
        })
    }
}
