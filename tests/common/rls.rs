//! The messages of the rate limit service as the tests write them: requests and descriptors
//! built from `(key, value)` pairs, and the exact statuses sluice must answer.
//!
//! Expected answers are whole values (code, limit, remaining, reset) compared with `==`, so a
//! wrong field anywhere fails the test; the builders here keep those comparisons one line
//! each. Times are milliseconds on the manual clock the in-process server runs on
//! ([`super::sluice::Sluice`]), which starts at [`START_MS`].

use prost_types::value::Kind;

pub use sluice::clock::ManualClock;
pub use sluice::proto::descriptor::RateLimitDescriptor;
pub use sluice::proto::descriptor::rate_limit_descriptor::{Entry, RateLimitOverride};
pub use sluice::proto::rls::rate_limit_response::rate_limit::Unit;
pub use sluice::proto::rls::rate_limit_response::{Code, DescriptorStatus, RateLimit};
pub use sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient;
pub use sluice::proto::rls::{RateLimitRequest, RateLimitResponse};
pub use sluice::proto::unit::RateLimitUnit;

pub use super::{DAY, HOUR, MINUTE, SECOND};

/// 2023-11-14T00:00:00Z: a multiple of a day, hence of every second, minute and hour.
pub const DAY_START_MS: u64 = 1_699_920_000_000;
/// Where every test's clock starts: 15.250 s into that day, so the current second has 750 ms
/// left, the minute 44.750 s, the hour 3584.750 s and the day 86384.750 s.
pub const START_MS: u64 = DAY_START_MS + 15_250;

/// The period of a response unit, in ms.
pub fn period_of(unit: Unit) -> u64 {
    match unit {
        Unit::Second => SECOND,
        Unit::Minute => MINUTE,
        Unit::Hour => HOUR,
        Unit::Day => DAY,
        Unit::Week => 7 * DAY,
        Unit::Month => 30 * DAY,
        Unit::Year => 365 * DAY,
        Unit::Unknown => panic!("no period for Unit::Unknown"),
    }
}

// ----- building requests -----

pub fn entries(pairs: &[(&str, &str)]) -> Vec<Entry> {
    pairs
        .iter()
        .map(|(k, v)| Entry {
            key: (*k).to_string(),
            value: (*v).to_string(),
        })
        .collect()
}

/// A descriptor with these entries and nothing else.
pub fn desc(pairs: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries(pairs),
        ..Default::default()
    }
}

/// A descriptor with its own `hits_addend`.
pub fn desc_hits(pairs: &[(&str, &str)], hits: u64) -> RateLimitDescriptor {
    RateLimitDescriptor {
        hits_addend: Some(hits),
        ..desc(pairs)
    }
}

/// A descriptor carrying a `limit` override.
pub fn desc_override(
    pairs: &[(&str, &str)],
    requests_per_unit: u32,
    unit: RateLimitUnit,
    unit_multiplier: Option<u32>,
) -> RateLimitDescriptor {
    RateLimitDescriptor {
        limit: Some(RateLimitOverride {
            requests_per_unit,
            unit: unit as i32,
            unit_multiplier,
        }),
        ..desc(pairs)
    }
}

pub fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.to_string(),
        descriptors,
        hits_addend: 0,
    }
}

// ----- expected answers -----

/// `current_limit` as sluice reports it: `name` is `route/rule`.
pub fn limit(requests_per_unit: u32, unit: Unit, name: &str) -> RateLimit {
    RateLimit {
        name: name.to_string(),
        requests_per_unit,
        unit: unit as i32,
        unit_multiplier: None,
    }
}

pub fn duration(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// The whole status of a limited descriptor.
pub fn status(code: Code, limit: &RateLimit, remaining: u32, reset_ms: u64) -> DescriptorStatus {
    DescriptorStatus {
        code: code as i32,
        current_limit: Some(limit.clone()),
        limit_remaining: remaining,
        duration_until_reset: Some(duration(reset_ms)),
    }
}

/// The status of a descriptor that has no limit: OK, nothing else.
pub fn unlimited() -> DescriptorStatus {
    DescriptorStatus {
        code: Code::Ok as i32,
        ..Default::default()
    }
}

/// A string field of `dynamic_metadata`.
pub fn metadata<'a>(response: &'a RateLimitResponse, field: &str) -> Option<&'a str> {
    let value = response.dynamic_metadata.as_ref()?.fields.get(field)?;
    match &value.kind {
        Some(Kind::StringValue(s)) => Some(s.as_str()),
        _ => None,
    }
}

/// A header of `response_headers_to_add` (case-insensitive name).
pub fn header<'a>(response: &'a RateLimitResponse, name: &str) -> Option<&'a str> {
    response
        .response_headers_to_add
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}
