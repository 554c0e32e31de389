//! The request path of DESIGN §1, independent of the transport: validate the request, match
//! every descriptor, count them in one store batch, and build Envoy's response (§4).
//!
//! [`grpc`] adapts it to tonic. It holds no lock across the store's `.await`: the limits are
//! an `Arc` snapshot taken once per request, so a reload swaps them without waiting for
//! in-flight requests, which finish on the set they started with.

pub mod grpc;
pub mod headers;
pub mod http;

use std::sync::Arc;
use std::time::Instant;

use prost_types::{Struct, Value, value::Kind};
use tracing::debug;

use crate::clock::Clock;
use crate::config::Limits;
use crate::config::settings::RequestBounds;
use crate::limiter::{CounterOp, HitMode, OpPolicy, Outcome, Source, Store, StoreError};
use crate::limits::{
    DEFAULT_REJECTED_CODE, DEFAULT_REJECTED_MSG, HeaderStyle, LimitSet, Threshold, Unit,
};
use crate::matcher::{self, Matched, apply_replaces};
use crate::metrics::{self as m, Decision, Metrics, RequestResult};
use crate::proto::core::HeaderValue;
use crate::proto::descriptor::RateLimitDescriptor;
use crate::proto::rls::rate_limit_response::rate_limit::Unit as ProtoUnit;
use crate::proto::rls::rate_limit_response::{Code, DescriptorStatus, RateLimit};
use crate::proto::rls::{RateLimitRequest, RateLimitResponse};
use headers::Quota;

/// Why a request got no decision.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The request itself is malformed; the message says how.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// More requests in flight than `max_in_flight`: refused at once rather than queued.
    #[error("too many requests in flight (more than {0}); retry shortly")]
    Overloaded(usize),
}

/// Everything one request needs, shared by all connections.
pub struct RateLimiter {
    limits: Limits,
    store: Arc<dyn Store>,
    /// The `store` label of store metrics (`memory` or `redis`).
    store_label: Source,
    clock: Arc<dyn Clock>,
    bounds: RequestBounds,
    metrics: Arc<Metrics>,
    /// Permits for requests being decided; see `Settings::max_in_flight`.
    in_flight: Arc<tokio::sync::Semaphore>,
    max_in_flight: usize,
    /// Global shadow mode (`Settings::shadow_mode`): count and report, always answer OK.
    shadow_mode: bool,
    /// `fallback.response_header`: mark answers the fallback gave.
    fallback_header: bool,
}

/// Default for [`RateLimiter::with_max_in_flight`].
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4096;

/// A decision and what only the HTTP side needs beyond Envoy's response.
#[derive(Debug, Clone)]
pub struct Answer {
    pub response: RateLimitResponse,
    /// The `rejected_code` of the route that rejected the request, when one did.
    pub rejected_code: Option<u16>,
}

impl RateLimiter {
    pub fn new(
        limits: LimitSet,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        bounds: RequestBounds,
    ) -> Self {
        Self {
            limits: Limits::new(limits),
            store,
            store_label: Source::Memory,
            clock,
            bounds,
            metrics: Arc::new(Metrics::new()),
            in_flight: Arc::new(tokio::sync::Semaphore::new(DEFAULT_MAX_IN_FLIGHT)),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            shadow_mode: false,
            fallback_header: false,
        }
    }

    /// Global shadow mode: every descriptor is counted and reported (metrics decision
    /// `shadow` when over) but answered OK, so the whole answer is OK, as envoyproxy/ratelimit's
    /// `SHADOW_MODE`.
    pub fn with_shadow_mode(mut self, on: bool) -> Self {
        self.shadow_mode = on;
        self
    }

    /// Adds [`FALLBACK_HEADER`] to answers the fallback gave.
    pub fn with_fallback_header(mut self, on: bool) -> Self {
        self.fallback_header = on;
        self
    }

    /// Bounds the requests decided at once (load shedding).
    pub fn with_max_in_flight(mut self, max: usize) -> Self {
        self.in_flight = Arc::new(tokio::sync::Semaphore::new(max.max(1)));
        self.max_in_flight = max.max(1);
        self
    }

    /// Labels store metrics with `source` (`redis` for a Redis backend) instead of `memory`.
    pub fn with_store_label(mut self, source: Source) -> Self {
        self.store_label = source;
        self
    }

    /// Serves from a shared handle (the reloader holds another clone of it).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Records into `metrics` instead of a private registry.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The limits currently served.
    pub fn limits(&self) -> Arc<LimitSet> {
        self.limits.load()
    }

    /// The handle the limits are served from (a reloader swaps through a clone of it).
    pub fn limits_handle(&self) -> &Limits {
        &self.limits
    }

    /// Swaps in a new, already validated, set of limits.
    pub fn replace_limits(&self, limits: LimitSet) {
        self.limits.replace(limits);
    }

    pub async fn should_rate_limit(
        &self,
        request: &RateLimitRequest,
    ) -> Result<RateLimitResponse, RequestError> {
        self.decide(request).await.map(|answer| answer.response)
    }

    /// The whole request path, with metrics: validate, match, count, respond.
    pub async fn decide(&self, request: &RateLimitRequest) -> Result<Answer, RequestError> {
        let started = Instant::now();
        // Shed load rather than queue: a request that cannot start now is refused at once.
        let Ok(_permit) = self.in_flight.try_acquire() else {
            self.metrics.request(
                m::UNKNOWN_DOMAIN,
                RequestResult::Shed,
                started.elapsed().as_secs_f64(),
            );
            return Err(RequestError::Overloaded(self.max_in_flight));
        };
        let limits = self.limits.load();
        // Label by the configured domain name only; anything else is `_unknown`.
        let domain = limits.domain(&request.domain);
        let domain_label = domain.map(|d| d.name.as_str()).unwrap_or(m::UNKNOWN_DOMAIN);
        let result = self.decide_in(request, &limits).await;
        let outcome = match &result {
            Ok(a) if a.response.overall_code == Code::OverLimit as i32 => RequestResult::OverLimit,
            Ok(_) => RequestResult::Ok,
            Err(RequestError::Invalid(_)) => RequestResult::Invalid,
            Err(RequestError::Store(_)) => RequestResult::Error,
            Err(RequestError::Overloaded(_)) => RequestResult::Shed,
        };
        self.metrics
            .request(domain_label, outcome, started.elapsed().as_secs_f64());
        result
    }

    async fn decide_in(
        &self,
        request: &RateLimitRequest,
        limits: &LimitSet,
    ) -> Result<Answer, RequestError> {
        validate(request, &self.bounds)?;
        let Some(domain) = limits.domain(&request.domain) else {
            // Unknown domain: not an error (Envoy may send domains this replica does not
            // serve yet), OK with no limit for every descriptor.
            return Ok(Answer {
                response: unlimited(request.descriptors.len()),
                rejected_code: None,
            });
        };

        let request_hits = if request.hits_addend == 0 {
            1
        } else {
            u64::from(request.hits_addend)
        };
        let mut matches: Vec<Option<Matched<'_>>> = Vec::with_capacity(request.descriptors.len());
        for descriptor in &request.descriptors {
            let matched = matcher::match_descriptor(domain, descriptor);
            if matched.is_none() {
                self.metrics.unmatched(&domain.name);
            }
            matches.push(matched);
        }
        apply_replaces(&mut matches);
        let mut ops: Vec<CounterOp> = Vec::with_capacity(request.descriptors.len());
        for (descriptor, matched) in request.descriptors.iter().zip(matches.iter_mut()) {
            if let Some(m) = matched.as_mut().filter(|m| !m.unlimited) {
                let settings = m.route.map(|r| &r.settings);
                ops.push(CounterOp {
                    // The response needs only the rule and route, so the id moves, not copies.
                    counter: std::mem::take(&mut m.counter),
                    algorithm: settings.map(|s| s.algorithm.value).unwrap_or_default(),
                    threshold: m.threshold,
                    hits: hits(descriptor, request_hits),
                    mode: if descriptor.is_negative_hits {
                        HitMode::Give
                    } else {
                        HitMode::Take
                    },
                    policy: settings
                        .map(|s| OpPolicy {
                            timeout: s.timeout.value,
                            fallback: s.fallback.value,
                        })
                        .unwrap_or_default(),
                    outcome: Outcome::default(),
                    source: Source::Pending,
                });
            }
        }
        if !ops.is_empty() {
            let now = self.clock.now_ms();
            let store_started = Instant::now();
            let applied = self.store.apply(&mut ops, now).await;
            // A failure the fallback absorbed or declined was counted there, once.
            let kind = applied
                .as_ref()
                .err()
                .filter(|e| e.uncounted())
                .map(StoreError::kind);
            self.metrics.store_call(
                self.store_label.as_str(),
                store_started.elapsed().as_secs_f64(),
                kind,
            );
            applied?;
        }
        let mut answer = respond(
            &domain.name,
            &matches,
            &ops,
            &self.metrics,
            self.shadow_mode,
        );
        if self.fallback_header && ops.iter().any(|op| op.source == Source::Fallback) {
            answer.response.response_headers_to_add.push(HeaderValue {
                key: FALLBACK_HEADER.to_string(),
                value: "true".to_string(),
            });
        }
        Ok(answer)
    }
}

/// The header `fallback.response_header` adds to answers the fallback gave.
pub const FALLBACK_HEADER: &str = "X-Sluice-Fallback";

/// A descriptor's own `hits_addend` wins (its explicit 0 checks without counting); otherwise
/// the request's, where 0 means 1.
///
/// Capped at [`MAX_HITS`]: limits are at most `u32::MAX`, so no decision changes, and every
/// count stays an exact integer in Redis's Lua (doubles) and far from `i64` overflow.
fn hits(descriptor: &RateLimitDescriptor, request_hits: u64) -> u64 {
    descriptor.hits_addend.unwrap_or(request_hits).min(MAX_HITS)
}

/// The most hits one descriptor can add: 2^40, well above any limit (at most 2^32 - 1).
pub const MAX_HITS: u64 = 1 << 40;

/// Refuses only what Envoy's own configuration decides: the domain, how many descriptors and
/// entries, the entry keys. Entry values come from Envoy's clients (headers, paths,
/// addresses) and are never refused, whatever their length: Envoy lets an errored request
/// through uncounted by default, so an error there would be a way past the limit. They are
/// counted like any other value, their key component hashed to a fixed length.
fn validate(request: &RateLimitRequest, bounds: &RequestBounds) -> Result<(), RequestError> {
    let invalid = |m: String| Err(RequestError::Invalid(m));
    if request.domain.is_empty() {
        return invalid("domain is empty: every request names its rate limit domain".into());
    }
    if request.domain.len() > bounds.max_key_bytes {
        return invalid(format!(
            "domain is {} bytes, more than the bound of {} (request.max_key_bytes)",
            request.domain.len(),
            bounds.max_key_bytes
        ));
    }
    if request.descriptors.is_empty() {
        return invalid("no descriptors: a request carries at least one".into());
    }
    if request.descriptors.len() > bounds.max_descriptors {
        return invalid(format!(
            "{} descriptors, more than the bound of {} (request.max_descriptors)",
            request.descriptors.len(),
            bounds.max_descriptors
        ));
    }
    for (i, d) in request.descriptors.iter().enumerate() {
        if d.entries.is_empty() {
            return invalid(format!("descriptor {i} has no entries"));
        }
        if d.entries.len() > bounds.max_entries {
            return invalid(format!(
                "descriptor {i} has {} entries, more than the bound of {} (request.max_entries)",
                d.entries.len(),
                bounds.max_entries
            ));
        }
        for (j, e) in d.entries.iter().enumerate() {
            if e.key.is_empty() {
                return invalid(format!("descriptor {i} entry {j} has an empty key"));
            }
            if e.key.len() > bounds.max_key_bytes {
                return invalid(format!(
                    "descriptor {i} entry {j} has a key (\"{}...\") of {} bytes, more than the bound of {} (request.max_key_bytes); entry keys come from Envoy's descriptor_key settings",
                    truncate(&e.key, 64),
                    e.key.len(),
                    bounds.max_key_bytes
                ));
            }
        }
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn unlimited(n: usize) -> RateLimitResponse {
    RateLimitResponse {
        overall_code: Code::Ok as i32,
        statuses: vec![ok_without_limit(); n],
        ..Default::default()
    }
}

fn ok_without_limit() -> DescriptorStatus {
    DescriptorStatus {
        code: Code::Ok as i32,
        ..Default::default()
    }
}

/// Builds the response of DESIGN §4 from the matches (in descriptor order) and the store's
/// outcomes (in the same order, for the matched ones only).
///
/// With `global_shadow` (the `shadow_mode` setting) every descriptor is answered as if its
/// own shadow mode were on: counted and reported, OK.
fn respond(
    domain: &str,
    matches: &[Option<Matched<'_>>],
    ops: &[CounterOp],
    metrics: &Metrics,
    global_shadow: bool,
) -> Answer {
    let mut statuses = Vec::with_capacity(matches.len());
    let mut outcomes = ops.iter().map(|op| (op.outcome, op.source));
    // The descriptor that decides the answer: the first one over the limit (not in shadow
    // mode), else the first one matched. Reported in dynamic_metadata.
    let mut deciding: Option<(&Matched<'_>, Outcome, bool, Source)> = None;
    // The rejecting route's code and message; built-in ones when the limit that rejected
    // came from a request override on no configured route.
    let mut rejected: Option<(u16, &str)> = None;
    // Descriptors whose routes show quota headers, by style.
    let mut quotas: Vec<(HeaderStyle, String, Threshold, Outcome)> = Vec::new();
    let mut overall = Code::Ok;

    for m in matches {
        let Some(m) = m else {
            statuses.push(ok_without_limit());
            continue;
        };
        let route_name = route_label(m);
        if m.unlimited {
            // envoyproxy/ratelimit `unlimited: true`: OK without counting, and the most a
            // count can say as remaining, as upstream.
            metrics.decision(domain, route_name, m.rule, Decision::Ok);
            statuses.push(DescriptorStatus {
                code: Code::Ok as i32,
                limit_remaining: u32::MAX,
                ..Default::default()
            });
            continue;
        }
        let (outcome, source) = outcomes.next().unwrap_or_default();
        let shadow = m.shadow || global_shadow;
        let over = outcome.over && !shadow;
        let decision = match (outcome.over, shadow) {
            (true, true) => Decision::Shadow,
            (true, false) => Decision::OverLimit,
            (false, _) if outcome.remaining.saturating_mul(5) <= m.threshold.limit => {
                Decision::NearLimit
            }
            (false, _) => Decision::Ok,
        };
        metrics.decision(domain, route_name, m.rule, decision);
        if outcome.over {
            debug!(
                domain,
                route = route_name,
                rule = m.rule,
                shadow,
                "over limit"
            );
        }
        if over && overall == Code::Ok {
            overall = Code::OverLimit;
            rejected = Some(
                m.route
                    .map_or((DEFAULT_REJECTED_CODE, DEFAULT_REJECTED_MSG), |r| {
                        (
                            r.settings.rejected_code.value,
                            r.settings.rejected_msg.value.as_str(),
                        )
                    }),
            );
            deciding = Some((m, outcome, shadow, source));
        } else if deciding.is_none() {
            deciding = Some((m, outcome, shadow, source));
        }
        let limit = current_limit(m);
        let style = m
            .route
            .map_or(HeaderStyle::None, |r| r.settings.header_style());
        if style != HeaderStyle::None {
            quotas.push((style, limit.name.clone(), m.threshold, outcome));
        }
        statuses.push(DescriptorStatus {
            code: if over { Code::OverLimit } else { Code::Ok } as i32,
            current_limit: Some(limit),
            limit_remaining: u32::try_from(outcome.remaining).unwrap_or(u32::MAX),
            duration_until_reset: Some(duration(outcome.reset_ms)),
        });
    }

    let response_headers_to_add = quota_headers(&quotas);
    let raw_body = rejected
        .map(|(_, msg)| msg.as_bytes().to_vec())
        .unwrap_or_default();
    let dynamic_metadata = deciding.map(|(m, outcome, shadow, source)| {
        let decision = match (outcome.over, shadow) {
            (false, _) => "ok",
            (true, false) => "over_limit",
            (true, true) => "shadow",
        };
        metadata(&[
            (
                "route",
                m.route.map(|r| r.name.as_str()).or(m.path).unwrap_or(""),
            ),
            ("rule", m.rule),
            ("source", source.as_str()),
            ("decision", decision),
        ])
    });
    Answer {
        response: RateLimitResponse {
            overall_code: overall as i32,
            statuses,
            response_headers_to_add,
            request_headers_to_add: Vec::new(),
            raw_body,
            dynamic_metadata,
        },
        rejected_code: rejected.map(|(code, _)| code),
    }
}

/// The `route` label of a match: the route's name, the envoyproxy/ratelimit descriptor path,
/// or `_none` for an override on no route. Configuration names only.
fn route_label<'a>(m: &Matched<'a>) -> &'a str {
    m.route
        .map(|r| r.name.as_str())
        .or(m.path)
        .unwrap_or(m::NO_ROUTE)
}

fn current_limit(m: &Matched<'_>) -> RateLimit {
    let t = &m.threshold;
    let unit = match t.unit {
        Unit::Second => ProtoUnit::Second,
        Unit::Minute => ProtoUnit::Minute,
        Unit::Hour => ProtoUnit::Hour,
        Unit::Day => ProtoUnit::Day,
        Unit::Week => ProtoUnit::Week,
        Unit::Month => ProtoUnit::Month,
        Unit::Year => ProtoUnit::Year,
    };
    let name = match m.route {
        Some(route) => format!("{}/{}", route.name, m.rule),
        None => m.rule.to_string(),
    };
    RateLimit {
        name,
        requests_per_unit: u32::try_from(t.limit).unwrap_or(u32::MAX),
        unit: unit as i32,
        unit_multiplier: (t.multiplier > 1).then_some(t.multiplier),
    }
}

fn duration(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// The quota headers of each style in use, each from the most restrictive descriptor of
/// that style: least remaining, then the longest wait.
fn quota_headers(quotas: &[(HeaderStyle, String, Threshold, Outcome)]) -> Vec<HeaderValue> {
    let mut headers = Vec::new();
    for style in [HeaderStyle::XRatelimit, HeaderStyle::Ietf] {
        let of_style: Vec<Quota<'_>> = quotas
            .iter()
            .filter(|(s, ..)| *s == style)
            .map(|(_, name, threshold, outcome)| Quota {
                name,
                limit: threshold.limit,
                window_secs: threshold.period_ms() / 1000,
                remaining: outcome.remaining,
                reset_secs: outcome.reset_ms.div_ceil(1000),
            })
            .collect();
        let Some(tightest) = of_style
            .iter()
            .min_by_key(|q| (q.remaining, std::cmp::Reverse(q.reset_secs)))
        else {
            continue;
        };
        match style {
            HeaderStyle::XRatelimit => headers.extend(headers::x_ratelimit(tightest)),
            HeaderStyle::Ietf => headers.extend(headers::ietf(&of_style, tightest)),
            HeaderStyle::None => {}
        }
    }
    headers
}

fn metadata(fields: &[(&str, &str)]) -> Struct {
    Struct {
        fields: fields
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_string(),
                    Value {
                        kind: Some(Kind::StringValue((*v).to_string())),
                    },
                )
            })
            .collect(),
    }
}
