//! Descriptors to counters: which limit a descriptor falls under, and the counter id and
//! threshold that result. [`native`] matches sluice's own routes and rule items, [`envoy`]
//! walks an envoyproxy/ratelimit descriptor tree; both return the same [`Matched`], and what
//! acts across a request's descriptors (request-side overrides, `replaces`) lives here.
//!
//! Reads the compiled limits and Envoy's descriptor shape; knows nothing about stores, time
//! or responses. Request values are untrusted: they reach a counter id only through
//! [`push_component`], which hashes anything that is not short plain text.

mod envoy;
mod native;

use std::fmt::Write as _;

use crate::limits::{DecisionHandles, Domain, DomainLimits, Route, Threshold, Unit};
use crate::proto::descriptor::RateLimitDescriptor;
use crate::proto::descriptor::rate_limit_descriptor::{Entry, RateLimitOverride};
use crate::proto::unit::RateLimitUnit;

/// Longest component kept verbatim in a counter id.
pub const MAX_PLAIN_COMPONENT: usize = 64;

/// What a descriptor resolved to.
#[derive(Debug)]
pub struct Matched<'a> {
    /// The route named by the descriptor; `None` for an override on no known route and in
    /// envoyproxy/ratelimit domains.
    pub route: Option<&'a Route>,
    /// In an envoyproxy/ratelimit domain, the descriptor path (`key=value/key2`) of the node
    /// whose limit applies: the route label of metrics and `dynamic_metadata`.
    pub path: Option<&'a str>,
    /// The rule's display name (`current_limit.name` is `route/rule`, or `rule` without a
    /// route).
    pub rule: &'a str,
    pub threshold: Threshold,
    /// Further limits on the same key, each with a counter of its own (the rule's `more`).
    pub more: &'a [Threshold],
    /// Counter id: domain, route, rule identity and (per-value rules) the value, each made
    /// safe by [`push_component`] and joined by `:`. Empty for an unlimited match.
    pub counter: String,
    /// Counted and reported, but answered OK: the route's `shadow_mode`, or the
    /// envoyproxy/ratelimit descriptor's.
    pub shadow: bool,
    /// Quota mode: over only counts when every quota-mode descriptor of the request is over.
    pub quota_mode: bool,
    /// envoyproxy/ratelimit `rate_limit.name`: another limit of the same request whose
    /// `replaces` names it takes its place.
    pub limit_name: Option<&'a str>,
    /// envoyproxy/ratelimit `rate_limit.replaces`: the names of limits this one replaces.
    pub replaces: &'a [String],
    /// envoyproxy/ratelimit `unlimited: true`: OK without counting.
    pub unlimited: bool,
    /// Where the service keeps this limit's decision counters once registered.
    pub handles: &'a DecisionHandles,
    /// `current_limit.name`, when built at load (`route/rule` of a configured rule).
    pub status_name: Option<&'a str>,
}

impl<'a> Matched<'a> {
    /// A match of a native route (or of an override on none).
    pub(crate) fn native(
        route: Option<&'a Route>,
        rule: &'a str,
        threshold: Threshold,
        counter: String,
        handles: &'a DecisionHandles,
        status_name: Option<&'a str>,
    ) -> Self {
        Self {
            route,
            path: None,
            rule,
            threshold,
            more: &[],
            counter,
            shadow: route.is_some_and(|r| r.settings.shadow_mode.value),
            quota_mode: route.is_some_and(|r| r.settings.quota_mode.value),
            limit_name: None,
            replaces: &[],
            unlimited: false,
            handles,
            status_name,
        }
    }
}

/// Rule name reported for a limit that came from the request rather than the config.
pub const OVERRIDE_RULE: &str = "override";

/// Finds the limit for one descriptor, or `None` when it has none.
pub fn match_descriptor<'a>(
    domain: &'a Domain,
    descriptor: &RateLimitDescriptor,
) -> Option<Matched<'a>> {
    let entries = &descriptor.entries;
    let override_threshold = descriptor
        .limit
        .as_ref()
        .filter(|_| domain.allow_limit_override)
        .and_then(override_threshold);
    let (route_key, routes) = match &domain.limits {
        DomainLimits::Descriptors(tree) => {
            // As envoyproxy/ratelimit: a request-side limit wins over the tree, on a counter
            // of the domain and the entries, whatever the tree says (no shadow mode, no
            // replaces).
            return match override_threshold {
                Some(threshold) => Some(override_match(domain, None, entries, threshold)),
                None => envoy::match_entries(domain, tree, entries),
            };
        }
        DomainLimits::Native { route_key, routes } => (route_key, routes),
    };
    let route = find(entries, route_key).and_then(|name| routes.get(name));

    let found = route.and_then(|route| native::match_route(domain, route, entries));
    match (found, override_threshold) {
        (Some(mut matched), Some(threshold)) => {
            // The override replaces the rule's limit; a distinct period keeps its own
            // windows so they never mix with the rule's.
            let _ = write!(matched.counter, ":o{}", threshold.period_ms() / 1000);
            matched.threshold = Threshold {
                burst: matched.threshold.burst,
                ..threshold
            };
            // The override is the limit now, alone.
            matched.more = &[];
            Some(matched)
        }
        (Some(matched), None) => Some(matched),
        (None, Some(threshold)) => Some(override_match(domain, route, entries, threshold)),
        (None, None) => None,
    }
}

/// As envoyproxy/ratelimit: an override that matched no rule limits a counter keyed by the
/// domain and every entry of the descriptor.
fn override_match<'a>(
    domain: &'a Domain,
    route: Option<&'a Route>,
    entries: &[Entry],
    threshold: Threshold,
) -> Matched<'a> {
    let mut counter = String::with_capacity(96);
    push_component(&mut counter, &domain.name);
    counter.push_str(":override:");
    let mut hasher = blake3::Hasher::new();
    for e in entries {
        for part in [&e.key, &e.value] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
    }
    let _ = write!(
        counter,
        "{}:o{}",
        &hasher.finalize().to_hex()[..32],
        threshold.period_ms() / 1000
    );
    let handles = match route {
        Some(route) => &route.handles.override_decisions,
        None => &domain.handles.override_decisions,
    };
    Matched::native(route, OVERRIDE_RULE, threshold, counter, handles, None)
}

/// The value of the entry `key`, if the descriptor has one.
fn find<'e>(entries: &'e [Entry], key: &str) -> Option<&'e str> {
    entries
        .iter()
        .find(|e| e.key == key)
        .map(|e| e.value.as_str())
}

fn override_threshold(o: &RateLimitOverride) -> Option<Threshold> {
    let unit = match RateLimitUnit::try_from(o.unit).ok()? {
        RateLimitUnit::Unknown => return None,
        RateLimitUnit::Second => Unit::Second,
        RateLimitUnit::Minute => Unit::Minute,
        RateLimitUnit::Hour => Unit::Hour,
        RateLimitUnit::Day => Unit::Day,
        RateLimitUnit::Month => Unit::Month,
        RateLimitUnit::Year => Unit::Year,
    };
    Some(Threshold {
        limit: u64::from(o.requests_per_unit),
        unit,
        multiplier: o.unit_multiplier.unwrap_or(1).max(1),
        burst: None,
        concurrent: false,
    })
}

/// envoyproxy/ratelimit `replaces`, across the request's descriptors: a limit whose
/// `rate_limit.name` another matched limit names in `replaces` is not applied (its
/// descriptor answers OK with no limit), and an unlimited one is never replaced, as
/// upstream. Free when no match replaces anything (every native domain).
pub fn apply_replaces(matches: &mut [Option<Matched<'_>>]) {
    if matches.iter().flatten().all(|m| m.replaces.is_empty()) {
        return;
    }
    let replaced: Vec<&str> = matches
        .iter()
        .flatten()
        .flat_map(|m| m.replaces.iter().map(String::as_str))
        .collect();
    for slot in matches.iter_mut() {
        let gone = slot.as_ref().is_some_and(|m| {
            !m.unlimited && m.limit_name.is_some_and(|name| replaced.contains(&name))
        });
        if gone {
            *slot = None;
        }
    }
}

/// Appends `part` to a counter id: verbatim when it is short plain text
/// (`[A-Za-z0-9._-]`, 1 to 64 bytes), else `~` and a 128-bit hash in hex. `~` is not plain
/// text, so a verbatim value can never equal a hashed one, and no value can smuggle in `:`,
/// `{`, `}` or unbounded length.
pub fn push_component(buf: &mut String, part: &str) {
    let plain = !part.is_empty()
        && part.len() <= MAX_PLAIN_COMPONENT
        && part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if plain {
        buf.push_str(part);
    } else {
        buf.push('~');
        let hash = blake3::hash(part.as_bytes());
        for byte in &hash.as_bytes()[..16] {
            let _ = write!(buf, "{byte:02x}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(part: &str) -> String {
        let mut s = String::new();
        push_component(&mut s, part);
        s
    }

    #[test]
    fn plain_values_stay_readable_and_others_are_hashed_to_fixed_length() {
        assert_eq!(component("vip-1.a_b"), "vip-1.a_b");
        for hostile in ["a:b", "{x}", "", "a b", "line\nbreak", "nul\0", "é"] {
            let c = component(hostile);
            assert!(c.starts_with('~') && c.len() == 33, "{hostile:?} -> {c}");
        }
        let long_a = format!("{}a", "x".repeat(64));
        let long_b = format!("{}b", "x".repeat(64));
        assert_ne!(component(&long_a), component(&long_b));
        assert_eq!(component(&"y".repeat(10_240)).len(), 33);
    }
}
