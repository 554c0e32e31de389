//! Step two of a request: each descriptor matched to its limit, and the counter updates to
//! send to the store in one batch.
//!
//! Every descriptor keeps a slot, in request order, that names its match and the index of its
//! op in the batch (if it has one), so the response pairs outcomes with descriptors by that
//! index, never by counting along two lists.

use crate::limiter::{CounterOp, HitMode, OpPolicy, Outcome, Source};
use crate::limits::{Algorithm, DEFAULT_MAX_HOLD, Domain};
use crate::matcher::{self, Matched, apply_replaces};
use crate::metrics::Metrics;
use crate::proto::descriptor::RateLimitDescriptor;
use crate::proto::rls::RateLimitRequest;

/// One descriptor of the request, in request order.
#[derive(Debug)]
pub struct Slot<'a> {
    /// Its limit; `None` when it has none (or another limit `replaces` it).
    pub matched: Option<Matched<'a>>,
    /// Where its counter updates are in [`Plan::ops`]: the first index and how many (one per
    /// limit on its key); `None` when nothing is counted (no limit, or `unlimited`).
    pub op: Option<(usize, usize)>,
}

pub struct Plan<'a> {
    pub slots: Vec<Slot<'a>>,
    pub ops: Vec<CounterOp>,
}

pub fn plan<'a>(domain: &'a Domain, request: &RateLimitRequest, metrics: &Metrics) -> Plan<'a> {
    let request_hits = if request.hits_addend == 0 {
        1
    } else {
        u64::from(request.hits_addend)
    };
    let mut matches: Vec<Option<Matched<'a>>> = Vec::with_capacity(request.descriptors.len());
    for descriptor in &request.descriptors {
        let matched = matcher::match_descriptor(domain, descriptor);
        if matched.is_none() {
            metrics.unmatched(&domain.handles.unmatched, &domain.name);
        }
        matches.push(matched);
    }
    apply_replaces(&mut matches);
    let mut ops: Vec<CounterOp> = Vec::with_capacity(request.descriptors.len());
    let mut slots = Vec::with_capacity(request.descriptors.len());
    for (descriptor, mut matched) in request.descriptors.iter().zip(matches) {
        let mut op = None;
        if let Some(m) = matched.as_mut().filter(|m| !m.unlimited) {
            let settings = m.route.map(|r| &r.settings);
            let hits = hits(descriptor, request_hits);
            let mode = if descriptor.is_negative_hits {
                HitMode::Give
            } else {
                HitMode::Take
            };
            let policy = settings
                .map(|s| OpPolicy {
                    timeout: s.timeout.value,
                    fallback: s.fallback.value,
                    lease: s.lease.value,
                })
                .unwrap_or_default();
            let mut algorithm = settings.map(|s| s.algorithm.value).unwrap_or_default();
            let mut threshold = m.threshold;
            let mut hits = hits;
            if threshold.concurrent {
                // Slots, whatever the route's algorithm, held for its `max_hold`; more hits
                // than the limit and one decide nothing more, and would only store slots.
                algorithm = Algorithm::Concurrent;
                let hold = settings.map_or(DEFAULT_MAX_HOLD, |s| s.max_hold.value);
                threshold.multiplier = u32::try_from(hold.as_secs().max(1)).unwrap_or(u32::MAX);
                hits = hits.min(threshold.limit.saturating_add(1));
            }
            let first = ops.len();
            // Each further limit on the key counts apart, on a counter of its own period.
            for threshold in m.more {
                ops.push(CounterOp {
                    counter: format!("{}:p{}", m.counter, threshold.period_ms() / 1000),
                    algorithm,
                    threshold: *threshold,
                    hits,
                    mode,
                    policy,
                    outcome: Outcome::default(),
                    source: Source::Pending,
                    block: 0,
                    granted: 0,
                    expired: 0,
                });
            }
            ops.push(CounterOp {
                // The response needs only the rule and route, so the id moves, not copies.
                counter: std::mem::take(&mut m.counter),
                algorithm,
                threshold,
                hits,
                mode,
                policy,
                outcome: Outcome::default(),
                source: Source::Pending,
                block: 0,
                granted: 0,
                expired: 0,
            });
            op = Some((first, ops.len() - first));
        }
        slots.push(Slot { matched, op });
    }
    Plan { slots, ops }
}

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
