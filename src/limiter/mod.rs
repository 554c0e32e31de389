//! Counting: the algorithms, and the [`Store`] trait every backend implements.
//!
//! This module knows thresholds, counter ids and time; it knows nothing about descriptors,
//! routes or Envoy (that is [`crate::matcher`] and [`crate::service`]). Each algorithm is a
//! pure function in [`algorithm`] over `(previous state, now, hits) -> (outcome, next state)`;
//! a store only decides where the state lives and how it is updated atomically.

pub mod algorithm;
pub mod cache;
pub mod fallback;
pub mod memory;
pub mod redis;

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

pub use algorithm::Algorithm;

/// The unit a threshold is expressed in. Kept (rather than only a period in milliseconds)
/// because Envoy's response names the unit, and its `x-ratelimit-*` headers are built from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Unit {
    pub const fn seconds(self) -> u64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3_600,
            Unit::Day => 86_400,
            Unit::Week => 7 * 86_400,
            // As envoyproxy/ratelimit: a month is 30 days and a year 365, so windows stay
            // fixed-length and aligned to the epoch.
            Unit::Month => 30 * 86_400,
            Unit::Year => 365 * 86_400,
        }
    }
}

/// The longest period a counter can have: 100 years of 365 days.
pub const MAX_PERIOD_MS: u64 = 100 * 365 * 86_400 * 1000;

/// How many requests a counter admits per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Threshold {
    pub limit: u64,
    pub unit: Unit,
    /// The period is `multiplier` units long (1 for every configured limit; request-side
    /// overrides may carry Envoy's `unit_multiplier`).
    pub multiplier: u32,
    /// Token bucket capacity; `None` means `limit`.
    pub burst: Option<u64>,
}

impl Threshold {
    pub const fn new(limit: u64, unit: Unit) -> Self {
        Self {
            limit,
            unit,
            multiplier: 1,
            burst: None,
        }
    }

    /// The period in milliseconds: never zero (a zero multiplier is treated as one) and at
    /// most [`MAX_PERIOD_MS`], so a request-side override with a huge `unit_multiplier`
    /// cannot overflow window arithmetic.
    pub fn period_ms(&self) -> u64 {
        self.unit
            .seconds()
            .saturating_mul(u64::from(self.multiplier.max(1)))
            .saturating_mul(1000)
            .min(MAX_PERIOD_MS)
    }
}

/// Whether a batch entry takes hits or gives them back (Envoy's `is_negative_hits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HitMode {
    Take,
    Give,
}

/// The answer of an algorithm for one counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outcome {
    pub over: bool,
    pub remaining: u64,
    /// Milliseconds until the counter can admit again (over) or resets (not over).
    pub reset_ms: u64,
}

/// What to answer for a counter when its store cannot (route setting `fallback`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackMode {
    /// Count in process memory with the same algorithm, the limit divided by the replicas.
    #[default]
    Local,
    /// Admit.
    Allow,
    /// Reject.
    Deny,
    /// Fail the request (gRPC UNAVAILABLE) so Envoy's `failure_mode_deny` decides.
    Error,
}

/// The route `timeout` when none is set: the most one request waits for the store before the
/// fallback answers. Envoy's ratelimit filter gives up after 20 ms by default (its `timeout`)
/// and then lets the request through uncounted, so the store must be given up on well before
/// that: 10 ms leaves the other half for the fallback, the network and scheduling.
pub const DEFAULT_STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(10);

/// How a counter's route wants store trouble handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpPolicy {
    /// Budget for the store call; past it the fallback answers.
    pub timeout: std::time::Duration,
    pub fallback: FallbackMode,
}

impl Default for OpPolicy {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_STORE_TIMEOUT,
            fallback: FallbackMode::Local,
        }
    }
}

/// One counter update of a request's batch. The store fills `outcome` and `source`.
#[derive(Debug, Clone)]
pub struct CounterOp {
    /// The counter id (see [`crate::matcher::push_component`]); safe to embed in a key.
    pub counter: String,
    pub algorithm: Algorithm,
    pub threshold: Threshold,
    pub hits: u64,
    pub mode: HitMode,
    pub policy: OpPolicy,
    pub outcome: Outcome,
    /// Where the outcome came from (`memory`, `redis`, `local_cache`, `fallback`).
    pub source: &'static str,
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
            source: "",
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
            StoreError::Declined(inner) => inner.kind(),
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

    /// Where answers come from, for `dynamic_metadata` (`memory`, `redis`, ...).
    fn source(&self) -> &'static str;

    /// A cheap round trip to see whether the store answers again (circuit breaker probe).
    fn probe(&self) -> StoreFuture<'_> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// `Ok` when the store can answer now; the reason otherwise (for `/readyz`).
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }

    /// Whether a fallback answers instead of this store right now (for `/readyz`).
    fn fallback_active(&self) -> bool {
        false
    }

    /// Publishes the store's own gauges (size, refusals) just before a scrape.
    fn report(&self, _metrics: &crate::metrics::Metrics) {}
}
