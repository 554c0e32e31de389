//! One RLQS stream's state and what it does with each report and each window's end: the
//! buckets it holds, the tokens each should still have, and the assignments that follow. No
//! I/O and no clock of its own (`now` comes in), so tests drive it with simulated Envoys.

use std::collections::HashMap;

use tracing::info;

use super::{
    ABANDON_AFTER_MS, ALLOW_TTL_MS, ASSIGNMENT_MARGIN_MS, DENY_MARGIN_MS, FILL_INTERVAL_SECONDS,
    HORIZON_MS, MAX_BUCKET_KEYS, MAX_BUCKETS, MIN_REPORT_SPACING_MS, Rlqs,
};
use crate::limiter::quota::QuotaOp;
use crate::limiter::{Source, Threshold};
use crate::limits::{DomainLimits, LimitSet};
use crate::matcher;
use crate::metrics as m;
use crate::proto::descriptor::RateLimitDescriptor;
use crate::proto::descriptor::rate_limit_descriptor::Entry;
use crate::proto::rlqs::rate_limit_quota_response::BucketAction;
use crate::proto::rlqs::rate_limit_quota_response::bucket_action::{
    AbandonAction, BucketAction as Action, QuotaAssignmentAction,
};
use crate::proto::rlqs::rate_limit_quota_usage_reports::BucketQuotaUsage;
use crate::proto::rlqs::{BucketId, RateLimitQuotaUsageReports};
use crate::proto::unit::rate_limit_strategy::{BlanketRule, Strategy};
use crate::proto::unit::{RateLimitStrategy, TokenBucket};

/// What a bucket is, as matched against the limits.
#[derive(Debug, Clone, PartialEq)]
enum Kind {
    /// No limit applies: `ALLOW_ALL`.
    Unlimited,
    Limited {
        counter: String,
        limits: Vec<Threshold>,
        route: String,
    },
}

/// One bucket of one stream.
#[derive(Debug)]
struct Bucket {
    id: BucketId,
    kind: Kind,
    /// Tokens this client should still hold, as far as its reports tell.
    tokens: u64,
    /// Recent demand, thousandths of a request per second.
    rate: u64,
    /// When the window the tokens were taken from ends (0: none taken yet).
    window_end: u64,
    /// The last time a report showed demand.
    active_at: u64,
    /// When the last `ALLOW_ALL` was sent (unlimited buckets).
    allowed_at: Option<u64>,
    /// Fresh token buckets sent, to tell each from the last.
    generation: u32,
}

/// One stream's state: its domain, its client id, its buckets.
pub struct Session {
    client: String,
    domain: Option<String>,
    buckets: HashMap<Vec<(String, String)>, Bucket>,
    /// `loaded_at_ms` of the limits the buckets were matched against.
    limits_at: u64,
    last_report: Option<u64>,
    unknown_logged: bool,
}

/// Why a stream is ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(
        "the first report of an RLQS stream must name the domain: set `domain` in Envoy's \
         rate_limit_quota filter config"
    )]
    NoDomain,
}

impl Session {
    pub fn new(client: String) -> Self {
        Self {
            client,
            domain: None,
            buckets: HashMap::new(),
            limits_at: 0,
            last_report: None,
            unknown_logged: false,
        }
    }

    pub fn client(&self) -> &str {
        &self.client
    }

    pub fn buckets(&self) -> usize {
        self.buckets.len()
    }

    /// When [`Session::rollover`] has work: the earliest end of a window tokens came from.
    pub fn next_wake(&self) -> Option<u64> {
        self.buckets
            .values()
            .filter(|b| b.window_end > 0)
            .map(|b| b.window_end)
            .min()
    }

    /// Reads one report at `now` and returns the actions to send (possibly none).
    pub async fn report(
        &mut self,
        rlqs: &Rlqs,
        report: RateLimitQuotaUsageReports,
        now: u64,
    ) -> Result<Vec<BucketAction>, SessionError> {
        match (&self.domain, report.domain.as_str()) {
            (None, "") => return Err(SessionError::NoDomain),
            (None, domain) => self.domain = Some(domain.to_string()),
            (Some(ours), theirs) if !theirs.is_empty() && ours != theirs => {
                rlqs.ignored("domain_changed");
                return Ok(Vec::new());
            }
            _ => {}
        }
        if self
            .last_report
            .is_some_and(|at| now.saturating_sub(at) < MIN_REPORT_SPACING_MS)
        {
            rlqs.ignored("too_frequent");
            return Ok(Vec::new());
        }
        self.last_report = Some(now);
        let limits = rlqs.limits.load();
        if limits.loaded_at_ms != self.limits_at {
            self.rematch(&limits);
        }
        let mut actions = Vec::new();
        for usage in report.bucket_quota_usages {
            if let Some(action) = self.usage(rlqs, &limits, usage, now).await {
                actions.push(action);
            }
        }
        self.abandon_idle(rlqs, now, &mut actions);
        Ok(actions)
    }

    /// At a window's end: each bucket whose tokens came from it gets tokens of the new one
    /// (or `DENY_ALL`), sized by its recent demand, so the old window's tokens are not spent
    /// in the new one and no client waits for its next report to admit again.
    pub async fn rollover(&mut self, rlqs: &Rlqs, now: u64) -> Vec<BucketAction> {
        let mut actions = Vec::new();
        let due: Vec<Vec<(String, String)>> = self
            .buckets
            .iter()
            .filter(|(_, b)| b.window_end > 0 && b.window_end <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let Some(bucket) = self.buckets.get_mut(&key) else {
                continue;
            };
            bucket.tokens = 0;
            bucket.window_end = 0;
            let want = need(bucket.rate).max(1);
            if let Some(action) = assign(rlqs, &self.client, bucket, 0, want, now).await {
                actions.push(action);
            }
        }
        actions
    }

    /// Ends the stream: its buckets stop counting in the gauge.
    pub fn close(&mut self, rlqs: &Rlqs) {
        rlqs.metrics
            .gauge(m::RLQS_BUCKETS, &[])
            .decrement(self.buckets.len() as f64);
        self.buckets.clear();
    }

    /// Matches every bucket again after a reload; a bucket whose limit changed starts over.
    fn rematch(&mut self, limits: &LimitSet) {
        self.limits_at = limits.loaded_at_ms;
        let domain = self.domain.clone().unwrap_or_default();
        for (key, bucket) in &mut self.buckets {
            let kind = match_bucket(limits, &domain, key);
            if kind != bucket.kind {
                bucket.kind = kind;
                bucket.tokens = 0;
                bucket.window_end = 0;
                bucket.allowed_at = None;
            }
        }
    }

    async fn usage(
        &mut self,
        rlqs: &Rlqs,
        limits: &LimitSet,
        usage: BucketQuotaUsage,
        now: u64,
    ) -> Option<BucketAction> {
        let id = usage.bucket_id.unwrap_or_default();
        if id.bucket.is_empty() {
            rlqs.ignored("empty_bucket");
            return None;
        }
        if id.bucket.len() > MAX_BUCKET_KEYS {
            rlqs.ignored("too_many_bucket_keys");
            return None;
        }
        let mut key: Vec<(String, String)> = id
            .bucket
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        key.sort();
        let domain = self.domain.as_deref().unwrap_or_default();
        if !self.buckets.contains_key(&key) {
            if self.buckets.len() >= MAX_BUCKETS {
                rlqs.ignored("too_many_buckets");
                return None;
            }
            let kind = match_bucket(limits, domain, &key);
            if limits.domain(domain).is_none() && !self.unknown_logged {
                self.unknown_logged = true;
                info!(
                    domain,
                    "RLQS stream for a domain this replica does not serve: its buckets are \
                     allowed all"
                );
            }
            rlqs.metrics.gauge(m::RLQS_BUCKETS, &[]).increment(1.0);
            self.buckets.insert(
                key.clone(),
                Bucket {
                    id,
                    kind,
                    tokens: 0,
                    rate: 0,
                    window_end: 0,
                    active_at: now,
                    allowed_at: None,
                    generation: 0,
                },
            );
        }
        let bucket = self.buckets.get_mut(&key)?;
        let allowed = usage.num_requests_allowed.min(MAX_REPORTED);
        let denied = usage.num_requests_denied.min(MAX_REPORTED);
        let demand = allowed + denied;
        if demand > 0 {
            bucket.active_at = now;
        }
        let route = match &bucket.kind {
            Kind::Limited { route, .. } => route.as_str(),
            Kind::Unlimited => m::NO_ROUTE,
        };
        for (result, n) in [("allowed", allowed), ("denied", denied)] {
            if n > 0 {
                rlqs.metrics
                    .counter(
                        m::RLQS_REPORTED,
                        &[("domain", domain), ("route", route), ("result", result)],
                    )
                    .increment(n);
            }
        }
        if bucket.kind == Kind::Unlimited {
            if bucket
                .allowed_at
                .is_some_and(|at| now.saturating_sub(at) < ALLOW_TTL_MS / 2)
            {
                return None;
            }
            bucket.allowed_at = Some(now);
            rlqs.sent("allow_all");
            return Some(blanket(&bucket.id, BlanketRule::AllowAll, ALLOW_TTL_MS));
        }

        // Demand per second, smoothed over reports; the first report (time_elapsed 0) reads
        // as one second.
        let elapsed_ms = usage
            .time_elapsed
            .map(|d| {
                let ms = d.seconds.saturating_mul(1000) + i64::from(d.nanos / 1_000_000);
                u64::try_from(ms).unwrap_or(0)
            })
            .unwrap_or(0)
            .max(1000);
        let rate = (demand.saturating_mul(1_000_000) / elapsed_ms).min(MAX_RATE);
        bucket.rate = if bucket.rate == 0 {
            rate
        } else {
            (bucket.rate + rate) / 2
        };
        // What it admitted beyond the tokens it had was admitted without them: charged.
        let charge = allowed.saturating_sub(bucket.tokens);
        bucket.tokens = bucket.tokens.saturating_sub(allowed);
        let want = need(bucket.rate).saturating_sub(bucket.tokens);
        if want == 0 && charge == 0 && bucket.window_end > now {
            // Enough in hand for its next report: nothing to send, its bucket stays as is.
            return None;
        }
        let want = if bucket.window_end <= now {
            // Never assigned in this window (or its window ended): assign now, at least 1.
            want.max(1)
        } else {
            want
        };
        assign(rlqs, &self.client, bucket, charge, want, now).await
    }

    fn abandon_idle(&mut self, rlqs: &Rlqs, now: u64, actions: &mut Vec<BucketAction>) {
        let idle: Vec<Vec<(String, String)>> = self
            .buckets
            .iter()
            .filter(|(_, b)| now.saturating_sub(b.active_at) >= ABANDON_AFTER_MS)
            .map(|(k, _)| k.clone())
            .collect();
        for key in idle {
            if let Some(bucket) = self.buckets.remove(&key) {
                rlqs.metrics.gauge(m::RLQS_BUCKETS, &[]).decrement(1.0);
                rlqs.sent("abandon");
                actions.push(BucketAction {
                    bucket_id: Some(bucket.id),
                    bucket_action: Some(Action::AbandonAction(AbandonAction {})),
                });
            }
        }
    }
}

/// Reported counts above this are read as this: no Envoy admits a billion requests between
/// two reports, and the maths stays far from overflow.
const MAX_REPORTED: u64 = 1_000_000_000;
/// Demand above this (a billion requests a second) is read as this.
const MAX_RATE: u64 = 1_000_000_000_000;

/// Tokens that last [`HORIZON_MS`] at `rate` (thousandths per second), rounded up.
fn need(rate: u64) -> u64 {
    (u128::from(rate) * u128::from(HORIZON_MS)).div_ceil(1_000_000) as u64
}

/// Takes `want` tokens (and charges `charge`) for `bucket` and builds the assignment that
/// holds what it has now: a fresh token bucket, or `DENY_ALL` when it holds nothing.
async fn assign(
    rlqs: &Rlqs,
    client: &str,
    bucket: &mut Bucket,
    charge: u64,
    want: u64,
    now: u64,
) -> Option<BucketAction> {
    let Kind::Limited {
        counter, limits, ..
    } = &bucket.kind
    else {
        return None;
    };
    let mut op = QuotaOp {
        rate: bucket.rate,
        charge,
        want,
        ..QuotaOp::new(counter.clone(), limits.clone(), client.to_string())
    };
    if rlqs.quota.share(&mut op, now).await == Source::Fallback {
        rlqs.metrics.counter(m::RLQS_FALLBACK, &[]).increment(1);
    }
    let window_end = op.window_end(now);
    let renew = bucket.window_end != window_end;
    bucket.window_end = window_end;
    if op.granted == 0 && !renew {
        // Nothing new, same window: the client's bucket already holds what it has.
        return None;
    }
    bucket.tokens = bucket.tokens.saturating_add(op.granted);
    let until_end = window_end.saturating_sub(now);
    if bucket.tokens == 0 {
        rlqs.sent("deny_all");
        return Some(blanket(
            &bucket.id,
            BlanketRule::DenyAll,
            until_end + DENY_MARGIN_MS,
        ));
    }
    bucket.generation = bucket.generation.wrapping_add(1);
    rlqs.sent("token_bucket");
    let max_tokens = u32::try_from(bucket.tokens).unwrap_or(u32::MAX);
    Some(BucketAction {
        bucket_id: Some(bucket.id.clone()),
        bucket_action: Some(Action::QuotaAssignmentAction(QuotaAssignmentAction {
            assignment_time_to_live: Some(duration_ms(until_end + ASSIGNMENT_MARGIN_MS)),
            rate_limit_strategy: Some(RateLimitStrategy {
                strategy: Some(Strategy::TokenBucket(TokenBucket {
                    max_tokens,
                    tokens_per_fill: Some(1),
                    fill_interval: Some(prost_types::Duration {
                        seconds: FILL_INTERVAL_SECONDS,
                        nanos: (bucket.generation % 1_000_000) as i32 * 1000,
                    }),
                })),
            }),
        })),
    })
}

fn blanket(id: &BucketId, rule: BlanketRule, ttl_ms: u64) -> BucketAction {
    BucketAction {
        bucket_id: Some(id.clone()),
        bucket_action: Some(Action::QuotaAssignmentAction(QuotaAssignmentAction {
            assignment_time_to_live: Some(duration_ms(ttl_ms)),
            rate_limit_strategy: Some(RateLimitStrategy {
                strategy: Some(Strategy::BlanketRule(rule as i32)),
            }),
        })),
    }
}

fn duration_ms(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: (ms % 1000) as i32 * 1_000_000,
    }
}

/// A bucket read as one descriptor of `domain`: its limit, if it has one RLQS can serve.
/// A `concurrent` limit cannot (Envoy reports no stream ends), nor can a domain in the
/// envoyproxy/ratelimit format (its tree matches entries in order, and a bucket map has none).
fn match_bucket(limits: &LimitSet, domain: &str, key: &[(String, String)]) -> Kind {
    let Some(domain) = limits.domain(domain) else {
        return Kind::Unlimited;
    };
    if !matches!(domain.limits, DomainLimits::Native { .. }) {
        return Kind::Unlimited;
    }
    let descriptor = RateLimitDescriptor {
        entries: key
            .iter()
            .map(|(k, v)| Entry {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
        limit: None,
        hits_addend: None,
        is_negative_hits: false,
    };
    let Some(matched) = matcher::match_descriptor(domain, &descriptor) else {
        return Kind::Unlimited;
    };
    if matched.unlimited || matched.shadow || matched.threshold.concurrent {
        return Kind::Unlimited;
    }
    let mut thresholds = vec![matched.threshold];
    thresholds.extend_from_slice(matched.more);
    Kind::Limited {
        counter: matched.counter,
        limits: thresholds,
        route: matched
            .route
            .map_or_else(|| m::NO_ROUTE.to_string(), |r| r.name.clone()),
    }
}
