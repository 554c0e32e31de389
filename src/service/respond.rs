//! Step three of a request: Envoy's answer from the matches and the store's outcomes:
//! the overall code, one status per descriptor, quota headers, the rejecting route's body,
//! and `dynamic_metadata` for Envoy's access log.

use prost_types::{Struct, Value, value::Kind};
use tracing::debug;

use super::Answer;
use super::headers::{self, Quota};
use super::plan::Slot;
use crate::limiter::{Algorithm, CounterOp, HitMode, Outcome, Source};
use crate::limits::{DEFAULT_REJECTED_CODE, DEFAULT_REJECTED_MSG, HeaderStyle, Threshold, Unit};
use crate::matcher::Matched;
use crate::metrics::{self as m, Decision, Metrics};
use crate::proto::core::HeaderValue;
use crate::proto::rls::RateLimitResponse;
use crate::proto::rls::rate_limit_response::rate_limit::Unit as ProtoUnit;
use crate::proto::rls::rate_limit_response::{Code, DescriptorStatus, RateLimit};

pub fn unlimited(n: usize) -> RateLimitResponse {
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

/// Builds Envoy's response from the slots (in descriptor order) and the store's
/// outcomes (each slot names its op by index).
///
/// With `global_shadow` (the `shadow_mode` setting) every descriptor is answered as if its
/// own shadow mode were on: counted and reported, OK.
pub fn respond(
    domain: &str,
    slots: &[Slot<'_>],
    ops: &[CounterOp],
    metrics: &Metrics,
    global_shadow: bool,
) -> Answer {
    let mut statuses = Vec::with_capacity(slots.len());
    // The descriptor that decides the answer: the first one over the limit (not in shadow
    // mode), else the first one matched. Reported in dynamic_metadata.
    let mut deciding: Option<(&Matched<'_>, Outcome, bool, Source)> = None;
    // The rejecting route's code and message; built-in ones when the limit that rejected
    // came from a request override on no configured route.
    let mut rejected: Option<(u16, &str)> = None;
    // Descriptors whose routes show quota headers, by style.
    let mut quotas: Vec<(HeaderStyle, String, Threshold, Outcome)> = Vec::new();
    let mut overall = Code::Ok;
    // Quota mode (envoyproxy/ratelimit's): a quota-mode descriptor over its limit rejects the
    // request only when every quota-mode descriptor of it is over.
    let mut quota_total = 0usize;
    let mut quota_over: Option<(&Matched<'_>, Outcome, bool, Source)> = None;
    let mut quota_over_count = 0usize;

    for slot in slots {
        let Some(m) = &slot.matched else {
            statuses.push(ok_without_limit());
            continue;
        };
        let route_name = route_label(m);
        if m.unlimited {
            // envoyproxy/ratelimit `unlimited: true`: OK without counting, and the most a
            // count can say as remaining, as upstream.
            metrics.decision(&m.handles.0, [domain, route_name, m.rule], Decision::Ok);
            statuses.push(DescriptorStatus {
                code: Code::Ok as i32,
                limit_remaining: u32::MAX,
                ..Default::default()
            });
            continue;
        }
        // Several limits on one key: over if any is over; the status shows the one that
        // rejected, else the one with the least left.
        let (outcome, source, threshold) = slot
            .op
            .and_then(|(first, count)| ops.get(first..first + count))
            .and_then(|limits| {
                limits.iter().min_by_key(|op| {
                    (
                        !op.outcome.over,
                        op.outcome.remaining,
                        std::cmp::Reverse(op.outcome.reset_ms),
                    )
                })
            })
            .map(|op| (op.outcome, op.source, op.threshold))
            .unwrap_or((Outcome::default(), Source::Pending, m.threshold));
        let shadow = m.shadow || global_shadow;
        let over = outcome.over && !shadow;
        let decision = match (outcome.over, shadow) {
            (true, true) => Decision::Shadow,
            (true, false) => Decision::OverLimit,
            (false, _) if outcome.remaining.saturating_mul(5) <= threshold.limit => {
                Decision::NearLimit
            }
            (false, _) => Decision::Ok,
        };
        metrics.decision(&m.handles.0, [domain, route_name, m.rule], decision);
        if let Some(route) = m.route {
            slot_metrics(metrics, route, [domain, route_name], slot, ops);
        }
        if outcome.over {
            debug!(
                domain,
                route = route_name,
                rule = m.rule,
                shadow,
                "over limit"
            );
        }
        if m.quota_mode && !shadow {
            quota_total += 1;
            if over {
                quota_over_count += 1;
                quota_over.get_or_insert((m, outcome, shadow, source));
            }
        }
        if over && !m.quota_mode && overall == Code::Ok {
            overall = Code::OverLimit;
            rejected = Some(rejection(m));
            deciding = Some((m, outcome, shadow, source));
        } else if deciding.is_none() {
            deciding = Some((m, outcome, shadow, source));
        }
        let limit = current_limit(m, &threshold);
        let style = m
            .route
            .map_or(HeaderStyle::None, |r| r.settings.header_style());
        if style != HeaderStyle::None {
            quotas.push((style, limit.name.clone(), threshold, outcome));
        }
        statuses.push(DescriptorStatus {
            code: if over { Code::OverLimit } else { Code::Ok } as i32,
            current_limit: Some(limit),
            limit_remaining: u32::try_from(outcome.remaining).unwrap_or(u32::MAX),
            duration_until_reset: Some(duration(outcome.reset_ms)),
        });
    }

    if overall == Code::Ok
        && quota_total > 0
        && quota_over_count == quota_total
        && let Some(first) = quota_over
    {
        overall = Code::OverLimit;
        rejected = Some(rejection(first.0));
        deciding = Some(first);
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
        let mut fields = metadata(&[
            (
                "route",
                m.route.map(|r| r.name.as_str()).or(m.path).unwrap_or(""),
            ),
            ("rule", m.rule),
            ("source", source.as_str()),
            ("decision", decision),
        ]);
        // What Envoy's `local_reply_config` can map the 429 to: the deciding route's code
        // and body (`sluice envoy local-reply` prints the mappers).
        if let Some((code, msg)) = rejected {
            fields.fields.insert(
                "rejected_code".to_string(),
                Value {
                    kind: Some(Kind::NumberValue(f64::from(code))),
                },
            );
            fields.fields.insert(
                "rejected_msg".to_string(),
                Value {
                    kind: Some(Kind::StringValue(msg.to_string())),
                },
            );
        }
        fields
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

/// The code and message of the route that rejected (built-in ones for a request-side override
/// on no configured route).
fn rejection<'a>(m: &Matched<'a>) -> (u16, &'a str) {
    m.route
        .map_or((DEFAULT_REJECTED_CODE, DEFAULT_REJECTED_MSG), |r| {
            (
                r.settings.rejected_code.value,
                r.settings.rejected_msg.value.as_str(),
            )
        })
}

/// The `route` label of a match: the route's name, the envoyproxy/ratelimit descriptor path,
/// or `_none` for an override on no route. Configuration names only.
/// Moves the route's slots-in-use gauge by what the store did for the slot's concurrency ops
/// (the fallback's local counting is not the store's count, and is left out).
fn slot_metrics(
    metrics: &Metrics,
    route: &crate::limits::Route,
    labels: [&str; 2],
    slot: &Slot<'_>,
    ops: &[CounterOp],
) {
    let Some(limits) = slot
        .op
        .and_then(|(first, count)| ops.get(first..first + count))
    else {
        return;
    };
    for op in limits {
        if op.algorithm != Algorithm::Concurrent
            || !matches!(op.source, Source::Memory | Source::Redis)
        {
            continue;
        }
        let (taken, given) = match op.mode {
            HitMode::Take | HitMode::Charge => (op.granted, 0),
            HitMode::Give => (0, op.granted),
        };
        let handles = (&route.handles.slots_in_use, &route.handles.slots_expired);
        metrics.slots(handles, labels, taken, given, op.expired);
    }
}

fn route_label<'a>(m: &Matched<'a>) -> &'a str {
    m.route
        .map(|r| r.name.as_str())
        .or(m.path)
        .unwrap_or(m::NO_ROUTE)
}

fn current_limit(m: &Matched<'_>, t: &Threshold) -> RateLimit {
    let unit = match t.unit {
        Unit::Second => ProtoUnit::Second,
        Unit::Minute => ProtoUnit::Minute,
        Unit::Hour => ProtoUnit::Hour,
        Unit::Day => ProtoUnit::Day,
        Unit::Week => ProtoUnit::Week,
        Unit::Month => ProtoUnit::Month,
        Unit::Year => ProtoUnit::Year,
    };
    let name = match (m.status_name, m.route) {
        (Some(name), _) => name.to_string(),
        (None, Some(route)) => format!("{}/{}", route.name, m.rule),
        (None, None) => m.rule.to_string(),
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
