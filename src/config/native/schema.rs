//! The native limits file as written by people: serde types that mirror the YAML one to one.
//!
//! Unknown fields are not silently ignored: [`super`] parses through `serde_ignored`
//! and reports each with its path, so a typo (`rejeted_msg`) is a load error that does not
//! hide the file's other errors. Optional everywhere: what is required, and what may not be
//! combined, is decided in [`super`], which can then name the route and the fix instead
//! of serde's generic "missing field".

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::limits::{Algorithm, FallbackMode, HeaderStyle};

#[derive(Debug, Deserialize)]
pub struct LimitsFile {
    pub domain: Option<String>,
    pub route_key: Option<String>,
    pub allow_limit_override: Option<bool>,
    #[serde(default)]
    pub defaults: SettingsRaw,
    #[serde(default)]
    pub routes: Vec<Spanned<RouteRaw>>,
}

/// The settings a route inherits: from `defaults`, from its parent, or set on itself.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct SettingsRaw {
    pub algorithm: Option<Algorithm>,
    pub show_limit_quota_header: Option<bool>,
    pub rate_limit_headers: Option<HeaderStyle>,
    pub rejected_code: Option<u16>,
    pub rejected_msg: Option<String>,
    pub shadow_mode: Option<bool>,
    pub quota_mode: Option<bool>,
    pub timeout: Option<String>,
    pub fallback: Option<FallbackMode>,
    pub lease: Option<LeaseRaw>,
    pub max_hold: Option<String>,
}

/// `lease: auto`, `lease: off` or `lease: <block size>`; checked in [`super`], which can
/// name the route.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum LeaseRaw {
    Block(i64),
    /// YAML reads a bare `off` as false.
    Flag(bool),
    Word(String),
}

/// A route. The settings fields repeat [`SettingsRaw`] rather than `flatten` it, because
/// `flatten` hides unknown fields from `serde_ignored`; [`RouteRaw::settings`] gathers them.
#[derive(Debug, Deserialize)]
pub struct RouteRaw {
    pub name: Option<String>,
    pub parent: Option<String>,
    pub global_threshold: Option<ThresholdRaw>,
    pub rule_items: Option<Vec<Spanned<RuleItemRaw>>>,
    pub algorithm: Option<Algorithm>,
    pub show_limit_quota_header: Option<bool>,
    pub rate_limit_headers: Option<HeaderStyle>,
    pub rejected_code: Option<u16>,
    pub rejected_msg: Option<String>,
    pub shadow_mode: Option<bool>,
    pub quota_mode: Option<bool>,
    pub timeout: Option<String>,
    pub fallback: Option<FallbackMode>,
    pub lease: Option<LeaseRaw>,
    pub max_hold: Option<String>,
}

impl RouteRaw {
    pub fn settings(&self) -> SettingsRaw {
        SettingsRaw {
            algorithm: self.algorithm,
            show_limit_quota_header: self.show_limit_quota_header,
            rate_limit_headers: self.rate_limit_headers,
            rejected_code: self.rejected_code,
            rejected_msg: self.rejected_msg.clone(),
            shadow_mode: self.shadow_mode,
            quota_mode: self.quota_mode,
            timeout: self.timeout.clone(),
            fallback: self.fallback,
            lease: self.lease.clone(),
            max_hold: self.max_hold.clone(),
        }
    }
}

/// Exactly one `query_per_*` must be set; `burst` only for `token_bucket`.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct ThresholdRaw {
    pub query_per_second: Option<u64>,
    pub query_per_minute: Option<u64>,
    pub query_per_hour: Option<u64>,
    pub query_per_day: Option<u64>,
    /// With `window`: `requests` per window of any whole number of seconds (`30s`, `5m`).
    pub requests: Option<u64>,
    pub window: Option<String>,
    pub burst: Option<u64>,
    /// At most this many requests in flight (alone: no rate, no burst).
    pub concurrent: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct RuleItemRaw {
    /// Optional stable name; when set it is the rule's identity (so reordering or retuning never loses its counters).
    pub name: Option<String>,
    pub limit_by_header: Option<String>,
    pub limit_by_param: Option<String>,
    pub limit_by_cookie: Option<String>,
    pub limit_by_consumer: Option<String>,
    pub limit_by_per_header: Option<String>,
    pub limit_by_per_param: Option<String>,
    pub limit_by_per_cookie: Option<String>,
    pub limit_by_per_consumer: Option<String>,
    pub limit_by_per_ip: Option<String>,
    /// Overrides the descriptor entry the item reads.
    pub descriptor_key: Option<String>,
    /// Quota mode for this item's limits, over the route's `quota_mode`.
    pub quota_mode: Option<bool>,
    pub limit_keys: Option<Vec<Spanned<LimitKeyRaw>>>,
}

#[derive(Debug, Deserialize)]
pub struct LimitKeyRaw {
    pub key: Option<String>,
    pub name: Option<String>,
    pub query_per_second: Option<u64>,
    pub query_per_minute: Option<u64>,
    pub query_per_hour: Option<u64>,
    pub query_per_day: Option<u64>,
    /// With `window`: `requests` per window of any whole number of seconds (`30s`, `5m`).
    pub requests: Option<u64>,
    pub window: Option<String>,
    pub burst: Option<u64>,
    pub concurrent: Option<u64>,
}

impl LimitKeyRaw {
    pub fn threshold(&self) -> ThresholdRaw {
        ThresholdRaw {
            query_per_second: self.query_per_second,
            query_per_minute: self.query_per_minute,
            query_per_hour: self.query_per_hour,
            query_per_day: self.query_per_day,
            requests: self.requests,
            window: self.window.clone(),
            burst: self.burst,
            concurrent: self.concurrent,
        }
    }
}
