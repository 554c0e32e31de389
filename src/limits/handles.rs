//! Slots for metric handles that live beside the limits they count.
//!
//! A decision is counted per (domain, route, rule). Registering a counter means building its
//! label strings and looking it up in the registry, which on every request would cost more
//! than the decision itself; so each (route, rule) carries a slot where the service keeps the
//! handle it registered the first time, and afterwards only increments it. The slots hold
//! handles of the `metrics` crate and nothing of sluice, so this layer still knows no other.
//!
//! A reload builds new slots: the first request after it registers again, and the registry
//! hands back the same underlying counter, so counts carry on.

use std::sync::OnceLock;

/// One counter per decision kind (`ok`, `over_limit`, `near_limit`, `shadow`), each registered
/// on first use so a series appears only once it has something to say.
#[derive(Debug, Default)]
pub struct DecisionHandles(pub [OnceLock<metrics::Counter>; 4]);

/// One counter per request result of a domain (`ok`, `over_limit`, `invalid`, `error`,
/// `shed`), and its unmatched-descriptor counter.
#[derive(Debug, Default)]
pub struct DomainHandles {
    pub requests: [OnceLock<metrics::Counter>; 5],
    pub unmatched: OnceLock<metrics::Counter>,
    /// Decisions of a request-side override that matched no route.
    pub override_decisions: DecisionHandles,
}

/// The decision slots of one route: one per rule of its limits (by [`crate::limits::Rule`]
/// `index`), and one more for a request-side override on the route.
#[derive(Debug, Default)]
pub struct RouteHandles {
    pub rules: Vec<DecisionHandles>,
    pub override_decisions: DecisionHandles,
    /// Slots of the route's `concurrent` limits: in use (a gauge this replica moves by what
    /// its calls took, gave back and found expired) and expired.
    pub slots_in_use: OnceLock<metrics::Gauge>,
    pub slots_expired: OnceLock<metrics::Counter>,
}

impl RouteHandles {
    pub fn new(rules: usize) -> Self {
        Self {
            rules: (0..rules).map(|_| DecisionHandles::default()).collect(),
            override_decisions: DecisionHandles::default(),
            slots_in_use: OnceLock::new(),
            slots_expired: OnceLock::new(),
        }
    }
}
