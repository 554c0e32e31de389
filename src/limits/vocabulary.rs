//! The words every layer shares: how a limit is written down (its [`Threshold`] and [`Unit`]),
//! how it is counted ([`Algorithm`]), what answers when the store cannot ([`FallbackMode`]),
//! which quota headers a route shows ([`HeaderStyle`]), and the built-in values of route
//! settings.
//!
//! Plain data with no behaviour beyond arithmetic on itself, so the configuration, the
//! matcher, the counting and the service can all speak it without knowing each other.

use serde::{Deserialize, Serialize};

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
    /// `concurrent: N`: at most `limit` requests in flight, each slot held at most one period
    /// (the route's `max_hold`), instead of `limit` per window.
    pub concurrent: bool,
}

impl Threshold {
    pub const fn new(limit: u64, unit: Unit) -> Self {
        Self {
            limit,
            unit,
            multiplier: 1,
            burst: None,
            concurrent: false,
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

impl Unit {
    /// The unit named in a limits file (`second`, `MINUTE`, ...; any case, as
    /// envoyproxy/ratelimit upper-cases them).
    pub fn from_name(name: &str) -> Option<Unit> {
        Some(match name.to_ascii_lowercase().as_str() {
            "second" => Unit::Second,
            "minute" => Unit::Minute,
            "hour" => Unit::Hour,
            "day" => Unit::Day,
            "week" => Unit::Week,
            "month" => Unit::Month,
            "year" => Unit::Year,
            _ => return None,
        })
    }
}

/// Which algorithm a route counts with (`algorithm:` in the limits, inherited like every
/// route setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Windows aligned to the epoch; what envoyproxy/ratelimit does.
    #[default]
    FixedWindow,
    SlidingWindow,
    TokenBucket,
    /// Requests in flight (a `concurrent: N` threshold), whatever the route's algorithm: set
    /// by the request path, never written in a file.
    #[serde(skip_deserializing)]
    Concurrent,
}

impl Algorithm {
    pub const fn as_str(self) -> &'static str {
        match self {
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::TokenBucket => "token_bucket",
            Algorithm::Concurrent => "concurrent",
        }
    }
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

/// Whether a route counts each hit in the store or takes hits from it in blocks (`lease:`,
/// inherited like every route setting).
///
/// A lease trades a little under-admission for speed: a replica takes a block of hits with
/// one store call and admits from it in memory, so a hot counter costs a store call per block
/// instead of per hit. A block never holds more than the counter has left, so the limit is
/// never passed; what a replica leased and did not use by the window's end is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Lease {
    /// Every hit is counted in the store (exact).
    #[default]
    Off,
    /// Blocks sized from the replica's recent rate of the counter, shrinking near the limit.
    Auto,
    /// Blocks of at most this many hits (still shrinking near the limit).
    Block(u64),
}

/// The largest `lease: <N>`: larger blocks only widen what a replica can strand at a
/// window's end.
pub const MAX_LEASE_BLOCK: u64 = 1_000_000;

impl Lease {
    pub fn is_on(self) -> bool {
        self != Lease::Off
    }
}

impl std::fmt::Display for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lease::Off => f.write_str("off"),
            Lease::Auto => f.write_str("auto"),
            Lease::Block(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for Lease {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Lease::Block(n) => s.serialize_u64(*n),
            other => s.serialize_str(&other.to_string()),
        }
    }
}

/// Which quota headers a route adds (`rate_limit_headers:`; `show_limit_quota_header: true`
/// is the same as `x_ratelimit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderStyle {
    #[default]
    None,
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`.
    XRatelimit,
    /// `RateLimit-Policy` and `RateLimit` of the IETF draft.
    Ietf,
}

/// The route `timeout` when none is set: the most one request waits for the store before the
/// fallback answers. Envoy's ratelimit filter gives up after 20 ms by default (its `timeout`)
/// and then lets the request through uncounted, so the store must be given up on well before
/// that: 10 ms leaves the other half for the fallback, the network and scheduling.
pub const DEFAULT_STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(10);

/// The `max_hold` of a route that sets none: how long a `concurrent` slot is held when its
/// give-back never comes. Long enough for slow requests (LLM answers, uploads), short enough
/// that slots lost to an Envoy crash come back within a minute.
pub const DEFAULT_MAX_HOLD: std::time::Duration = std::time::Duration::from_secs(60);

/// The `rejected_code` of a route that sets none (nor do its ancestors or `defaults`).
pub const DEFAULT_REJECTED_CODE: u16 = 429;
/// The `rejected_msg` of a route that sets none.
pub const DEFAULT_REJECTED_MSG: &str = "Too many requests";
