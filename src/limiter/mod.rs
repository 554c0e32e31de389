//! Counting: the algorithms, and the [`Store`] trait every backend implements.
//!
//! This layer knows thresholds, counter ids and time; it knows nothing about descriptors,
//! routes or Envoy (the matcher and the service do). Each algorithm is a pure function in
//! [`algorithm`] over `(previous state, now, hits) -> (outcome, next state)`; a store only
//! decides where the state lives and how it is updated atomically.
//!
//! [`Store`] has one method, `apply`, because counting is all the request path asks of a
//! store. What only some stores have (being down, being probed, gauges to publish) lives
//! beside it in [`backend`], which is what the server builds and the health endpoints read.
//! The wrappers compose: over-limit [`cache`] → [`fallback`] (with its [`reconcile`] ledger)
//! → [`lease`] → [`redis`], each a `Store`.

pub mod algorithm;
pub mod backend;
pub mod bounded;
pub mod cache;
pub mod concurrency;
pub mod fallback;
pub mod keys;
pub mod lease;
pub mod memory;
pub mod quota;
pub mod reconcile;
pub mod redis;

use std::future::Future;
use std::pin::Pin;

pub use crate::limits::{
    Algorithm, DEFAULT_MAX_HOLD, DEFAULT_STORE_TIMEOUT, FallbackMode, Lease, MAX_PERIOD_MS,
    Threshold, Unit,
};

/// Where an answer came from: `dynamic_metadata.source`, the `X-Sluice-Fallback` header, the
/// over-limit cache (which remembers only what the store itself said) and metrics labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Source {
    /// Not answered yet.
    #[default]
    Pending,
    Memory,
    Redis,
    /// The over-limit cache, without a store call.
    LocalCache,
    /// The fallback, because the store failed or its breaker is open.
    Fallback,
    /// A block this replica leased from the store earlier, without a store call.
    Lease,
}

impl Source {
    pub const fn as_str(self) -> &'static str {
        match self {
            Source::Pending => "",
            Source::Memory => "memory",
            Source::Redis => "redis",
            Source::LocalCache => "local_cache",
            Source::Fallback => "fallback",
            Source::Lease => "lease",
        }
    }
}

impl PartialEq<&str> for Source {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a batch entry takes hits or gives them back (Envoy's `is_negative_hits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HitMode {
    Take,
    Give,
    /// Records hits already admitted elsewhere, whatever the counter holds: what the fallback
    /// writes back when the store answers again (see [`reconcile`]). Never from a request.
    Charge,
}

/// The answer of an algorithm for one counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outcome {
    pub over: bool,
    pub remaining: u64,
    /// Milliseconds until the counter can admit again (over) or resets (not over).
    pub reset_ms: u64,
}

/// How a counter's route wants store trouble handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpPolicy {
    /// Budget for the store call; past it the fallback answers.
    pub timeout: std::time::Duration,
    pub fallback: FallbackMode,
    /// Whether the counter may be taken from the store in blocks (see [`lease`]).
    pub lease: Lease,
}

impl Default for OpPolicy {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_STORE_TIMEOUT,
            fallback: FallbackMode::Local,
            lease: Lease::Off,
        }
    }
}

/// One counter update of a request's batch. The store fills `outcome` and `source`.
#[derive(Debug, Clone)]
pub struct CounterOp {
    /// The counter id, already safe to embed in a key (the matcher hashes unsafe values).
    pub counter: String,
    pub algorithm: Algorithm,
    pub threshold: Threshold,
    pub hits: u64,
    pub mode: HitMode,
    pub policy: OpPolicy,
    pub outcome: Outcome,
    /// Where the outcome came from.
    pub source: Source,
    /// Nonzero asks the store for a lease: take up to this many hits (at least `hits`, never
    /// more than the counter has left) and report in `granted` how many were taken. Only
    /// [`lease`] sets it, and only for `fixed_window` and `token_bucket`.
    pub block: u64,
    /// Hits the store took for this op: `hits` (or a lease's block) when admitted, else 0;
    /// for a `concurrent` counter, the slots taken (admitted or not) or given back.
    pub granted: u64,
    /// Slots of a `concurrent` counter this call found expired (their give-back never came).
    pub expired: u64,
}

impl CounterOp {
    pub fn new(
        counter: String,
        algorithm: Algorithm,
        threshold: Threshold,
        hits: u64,
        mode: HitMode,
    ) -> Self {
        Self {
            counter,
            algorithm,
            threshold,
            hits,
            mode,
            policy: OpPolicy::default(),
            outcome: Outcome::default(),
            source: Source::Pending,
            block: 0,
            granted: 0,
            expired: 0,
        }
    }
}

/// Why a store could not answer. Callers fall back; they never panic on it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store timed out")]
    Timeout,
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store returned an unexpected reply: {0}")]
    BadReply(String),
    /// The store is up but refuses to count (out of memory, read-only, credentials...):
    /// `kind` is a fixed label, `detail` what it said and what to do about it.
    #[error("{detail}")]
    Refused { kind: &'static str, detail: String },
    /// Some calls of the batch were answered and the others failed with this (on a cluster,
    /// one shard failing): the answered ops have their source set, the failed ones are left
    /// `Pending` for the fallback.
    #[error("{0} (for part of the batch)")]
    Partial(Box<StoreError>),
    /// The store failed and a route's `fallback: error` declines to answer in its place.
    /// The failure was counted where it happened (in the fallback), so whoever receives this
    /// must not count it again.
    #[error("{0} (the route's fallback is `error`)")]
    Declined(Box<StoreError>),
}

impl StoreError {
    /// A fixed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Timeout => "timeout",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::BadReply(_) => "bad_reply",
            StoreError::Refused { kind, .. } => kind,
            StoreError::Declined(inner) | StoreError::Partial(inner) => inner.kind(),
        }
    }

    /// Whether this failure still has to be counted in `sluice_store_errors_total`.
    pub fn uncounted(&self) -> bool {
        !matches!(self, StoreError::Declined(_))
    }
}

pub type StoreFuture<'a> = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'a>>;

/// A place where counters live. One call per request carries all of its counter updates, so a
/// remote store can send them in one round trip.
pub trait Store: Send + Sync + 'static {
    /// Applies every op of the batch at time `now` (ms since the epoch) and fills in each
    /// op's `outcome`. Either all outcomes are filled or an error is returned.
    fn apply<'a>(&'a self, ops: &'a mut [CounterOp], now: u64) -> StoreFuture<'a>;
}
