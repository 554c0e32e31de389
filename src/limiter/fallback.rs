//! The fallback: a circuit breaker around a remote store, and the answers given while it is
//! open or when one call fails.
//!
//! Every call to the inner store is bounded by the smallest `timeout` of the routes in the
//! batch; an error or a timeout is answered at once by each route's `fallback` mode, so Envoy
//! never waits on a dead store. After `failure_threshold` consecutive failures the breaker
//! opens: no request calls the store at all, and a background probe (a PING every
//! `probe_interval`) closes it as soon as the store answers again. No request is ever used as
//! a probe, so none pays for one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tracing::{info, warn};

use super::backend::Remote;
use super::memory::MemoryStore;
use super::{CounterOp, FallbackMode, HitMode, Outcome, Source, Store, StoreError, StoreFuture};
use crate::metrics::{self, Metrics};

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
    config: FallbackConfig,
    breaker: Arc<Breaker>,
    metrics: Arc<Metrics>,
    /// Turns true at shutdown: a running probe ends instead of being dropped mid-call.
    stop: tokio::sync::watch::Receiver<bool>,
}

/// Closed (calls go to the store) or open (they do not). Atomics, not a lock: the hot path
/// reads it on every request.
struct Breaker {
    open: AtomicBool,
    failures: AtomicU32,
}

impl Fallback {
    /// Wraps `inner`. A store that is not reachable now starts with the breaker open.
    pub fn new(
        inner: Arc<dyn Remote>,
        local: Arc<MemoryStore>,
        config: FallbackConfig,
        metrics: Arc<Metrics>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Arc<Self> {
        let fallback = Arc::new(Self {
            inner,
            local,
            config,
            breaker: Arc::new(Breaker {
                open: AtomicBool::new(false),
                failures: AtomicU32::new(0),
            }),
            metrics,
            stop,
        });
        if let Err(reason) = fallback.inner.ready() {
            fallback.open(&reason);
        }
        fallback
    }

    pub fn is_open(&self) -> bool {
        self.breaker.open.load(Ordering::Acquire)
    }

    fn open(self: &Arc<Self>, reason: &str) {
        if self.breaker.open.swap(true, Ordering::AcqRel) {
            return;
        }
        warn!(
            store = self.inner.source().as_str(),
            reason, "circuit breaker open: the fallback answers"
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
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            let answered = matches!(
                tokio::time::timeout(every, self.inner.probe()).await,
                Ok(Ok(()))
            );
            if answered {
                self.breaker.failures.store(0, Ordering::Release);
                self.breaker.open.store(false, Ordering::Release);
                info!(
                    store = self.inner.source().as_str(),
                    "circuit breaker closed: the store answers again"
                );
                self.metrics
                    .counter(metrics::BREAKER_TRANSITIONS, &[("to", "closed")])
                    .increment(1);
                self.metrics.gauge(metrics::FALLBACK_ACTIVE, &[]).set(0.0);
                return;
            }
        }
    }

    fn failed(self: &Arc<Self>, error: &StoreError) {
        self.metrics
            .counter(
                metrics::STORE_ERRORS,
                &[
                    ("store", self.inner.source().as_str()),
                    ("kind", error.kind()),
                ],
            )
            .increment(1);
        let failures = self.breaker.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures >= self.config.failure_threshold.max(1) {
            self.open(&error.to_string());
        }
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
        for op in ops.iter_mut() {
            // A lease asked of the store (and not answered) is a plain hit here.
            op.block = 0;
            let period = op.threshold.period_ms();
            let reset_ms = period - now % period;
            match op.policy.fallback {
                FallbackMode::Local => {
                    let configured = op.threshold;
                    op.threshold.limit = configured
                        .limit
                        .div_ceil(u64::from(self.config.replicas.max(1)));
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
            op.source = Source::Fallback;
        }
        Ok(())
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
                    return Ok(());
                }
                Ok(Err(e)) => e,
                Err(_) => StoreError::Timeout,
            };
            fallback.failed(&error);
            fallback.answer(ops, now, error)
        })
    }
}
