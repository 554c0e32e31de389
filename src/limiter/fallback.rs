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

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{info, warn};

use super::backend::Remote;
use super::memory::MemoryStore;
use super::reconcile::{Charge, Ledger};
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
/// How long a write-back call may take: it is not on any request's path.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

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
    breaker: Breaker,
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
            breaker: Breaker {
                open: AtomicBool::new(false),
                failures: AtomicU32::new(0),
                reason: Mutex::new(String::new()),
            },
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
            fallback.open(&reason);
        }
        let flusher = Arc::clone(&fallback);
        tokio::spawn(async move { flusher.write_back_while_serving().await });
        fallback
    }

    pub fn is_open(&self) -> bool {
        self.breaker.open.load(Ordering::Acquire)
    }

    /// Why the breaker is open, with what to do about it; `None` while it is closed.
    pub fn reason(&self) -> Option<String> {
        if !self.is_open() {
            return None;
        }
        Some(
            self.breaker
                .reason
                .lock()
                .map(|r| r.clone())
                .unwrap_or_default(),
        )
    }

    /// The ledger of what the fallback admitted (for metrics and `/readyz`).
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    fn set_reason(&self, reason: &str) {
        if let Ok(mut held) = self.breaker.reason.lock() {
            reason.clone_into(&mut held);
        }
    }

    fn open(self: &Arc<Self>, reason: &str) {
        self.set_reason(reason);
        if self.breaker.open.swap(true, Ordering::AcqRel) {
            return;
        }
        warn!(
            store = self.inner.source().as_str(),
            reason,
            "circuit breaker open: the fallback answers, and what it admits is written back when the store answers again"
        );
        self.metrics
            .counter(metrics::BREAKER_TRANSITIONS, &[("to", "open")])
            .increment(1);
        self.metrics.gauge(metrics::FALLBACK_ACTIVE, &[]).set(1.0);
        let this = Arc::clone(self);
        tokio::spawn(async move { this.probe_until_closed().await });
    }

    async fn probe_until_closed(self: Arc<Self>) {
        let every = self.config.probe_interval;
        let mut stop = self.stop.clone();
        let mut said = String::new();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            let error = match tokio::time::timeout(every, self.inner.probe()).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(StoreError::Timeout.to_string()),
            };
            let Some(error) = error else {
                self.close();
                return;
            };
            // A new kind of trouble is said once, not on every probe.
            if error != said {
                warn!(
                    store = self.inner.source().as_str(),
                    error = %error,
                    "the store still cannot take a write; the fallback keeps answering"
                );
                self.set_reason(&error);
                said = error;
            }
        }
    }

    fn close(&self) {
        self.breaker.failures.store(0, Ordering::Release);
        self.breaker.open.store(false, Ordering::Release);
        info!(
            store = self.inner.source().as_str(),
            owed_hits = self.ledger.outstanding(),
            "circuit breaker closed: the store takes writes again; writing back what the fallback admitted"
        );
        self.metrics
            .counter(metrics::BREAKER_TRANSITIONS, &[("to", "closed")])
            .increment(1);
        self.metrics.gauge(metrics::FALLBACK_ACTIVE, &[]).set(0.0);
    }

    fn failed(self: &Arc<Self>, error: &StoreError) {
        self.count_error(error.kind());
        let failures = self.breaker.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures >= self.config.failure_threshold.max(1) {
            self.open(&error.to_string());
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

    /// Answers every op by its route's fallback mode; `error` in any take fails the batch.
    ///
    /// A give-back (`is_negative_hits`, sent by Envoy at stream end) is never failed: nothing
    /// waits on its answer, so under `error` it is answered OK, as `allow` would.
    fn answer(&self, ops: &mut [CounterOp], now: u64, error: StoreError) -> Result<(), StoreError> {
        if ops
            .iter()
            .any(|op| op.policy.fallback == FallbackMode::Error && op.mode == HitMode::Take)
        {
            return Err(StoreError::Declined(Box::new(error)));
        }
        let replicas = u64::from(self.config.replicas.max(1));
        for op in ops.iter_mut() {
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
            if !self.is_open() && self.ledger.owes() {
                self.write_back().await;
            }
            if stopping {
                return;
            }
        }
    }

    /// One round of write-back: every owed hit, in calls of [`FLUSH_BATCH`] grouped by the
    /// time they are counted at.
    async fn write_back(self: &Arc<Self>) {
        let now = self.clock.now_ms();
        let mut charges = self.ledger.drain(now, usize::MAX);
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
            if self.is_open() || !self.send_charges(group, at).await {
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
        self.failed(&error);
        false
    }
}

/// `Store` for the `Arc`, because opening the breaker spawns a probe that owns it.
pub struct FallbackStore(pub Arc<Fallback>);

impl Store for FallbackStore {
    fn apply<'a>(&'a self, ops: &'a mut [CounterOp], now: u64) -> StoreFuture<'a> {
        Box::pin(async move {
            let fallback = &self.0;
            if fallback.is_open() {
                return fallback.answer(
                    ops,
                    now,
                    StoreError::Unavailable("circuit breaker open".into()),
                );
            }
            let budget = ops
                .iter()
                .map(|op| op.policy.timeout)
                .min()
                .unwrap_or(super::DEFAULT_STORE_TIMEOUT);
            let error = match tokio::time::timeout(budget, fallback.inner.apply(ops, now)).await {
                Ok(Ok(())) => {
                    fallback.breaker.failures.store(0, Ordering::Release);
                    fallback.ledger.observe(ops, now);
                    return Ok(());
                }
                Ok(Err(e)) => e,
                Err(_) => StoreError::Timeout,
            };
            if matches!(error, StoreError::Timeout)
                && fallback.inner.answering(budget.max(STALLED_AFTER))
            {
                // The store keeps answering; this request waited behind others. Answered
                // here and written back, but no failure of the store.
                fallback.count_error("queued");
            } else {
                fallback.failed(&error);
            }
            fallback.answer(ops, now, error)
        })
    }
}
