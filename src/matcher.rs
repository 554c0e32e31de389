//! Descriptors to counters: which route a descriptor names, which rule of it applies, and the
//! counter id and threshold that result (DESIGN §2, "Order" and "Limit keys"). Domains read
//! from the envoyproxy/ratelimit format are matched by [`crate::config::envoy_compat`]
//! instead, which returns the same [`Matched`].
//!
//! Knows the limits model and Envoy's descriptor shape; knows nothing about stores, time or
//! responses. Request values are untrusted: they reach a counter id only through
//! [`push_component`], which hashes anything that is not short plain text.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::config::{Domain, KeyRule, LimitBy, Route, RouteLimits, RuleItem};
use crate::limiter::{Threshold, Unit};
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
    /// Counter id: domain, route, rule identity and (per-value rules) the value, each made
    /// safe by [`push_component`] and joined by `:`. Empty for an unlimited match.
    pub counter: String,
    /// Counted and reported, but answered OK: the route's `shadow_mode`, or the
    /// envoyproxy/ratelimit descriptor's.
    pub shadow: bool,
    /// envoyproxy/ratelimit `rate_limit.name`: another limit of the same request whose
    /// `replaces` names it takes its place.
    pub limit_name: Option<&'a str>,
    /// envoyproxy/ratelimit `rate_limit.replaces`: the names of limits this one replaces.
    pub replaces: &'a [String],
    /// envoyproxy/ratelimit `unlimited: true`: OK without counting.
    pub unlimited: bool,
}

impl<'a> Matched<'a> {
    /// A match of a native route (or of an override on none).
    fn native(
        route: Option<&'a Route>,
        rule: &'a str,
        threshold: Threshold,
        counter: String,
    ) -> Self {
        Self {
            route,
            path: None,
            rule,
            threshold,
            counter,
            shadow: route.is_some_and(|r| r.settings.shadow_mode.value),
            limit_name: None,
            replaces: &[],
            unlimited: false,
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
    if let Some(tree) = &domain.compat {
        // As envoyproxy/ratelimit: a request-side limit wins over the tree, on a counter of
        // the domain and the entries, whatever the tree says (no shadow mode, no replaces).
        return match override_threshold {
            Some(threshold) => Some(override_match(domain, None, entries, threshold)),
            None => crate::config::envoy_compat::match_entries(domain, tree, entries),
        };
    }
    let route = find(entries, &domain.route_key).and_then(|name| domain.routes.get(name));

    let found = route.and_then(|route| match_route(domain, route, entries));
    match (found, override_threshold) {
        (Some(mut matched), Some(threshold)) => {
            // The override replaces the rule's limit; a distinct period keeps its own
            // windows so they never mix with the rule's.
            let _ = write!(matched.counter, ":o{}", threshold.period_ms() / 1000);
            matched.threshold = Threshold {
                burst: matched.threshold.burst,
                ..threshold
            };
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
    Matched::native(route, OVERRIDE_RULE, threshold, counter)
}

fn match_route<'a>(domain: &'a Domain, route: &'a Route, entries: &[Entry]) -> Option<Matched<'a>> {
    let counter_for = |rule_id: &str, value: Option<&str>| {
        let mut counter = String::with_capacity(96);
        push_component(&mut counter, &domain.name);
        counter.push(':');
        push_component(&mut counter, &route.name);
        counter.push(':');
        counter.push_str(rule_id);
        if let Some(value) = value {
            counter.push(':');
            push_component(&mut counter, value);
        }
        counter
    };
    match route.limits.as_ref() {
        RouteLimits::Global(rule) => Some(Matched::native(
            Some(route),
            &rule.name,
            rule.threshold,
            counter_for(&rule.id, None),
        )),
        RouteLimits::Items(items) => items.iter().find_map(|item| {
            let (key, value, ip) = match_item(item, entries)?;
            let rule = &key.rule;
            // Per-value kinds count each value apart: the address itself for per-IP (in
            // canonical form, so `::ffff:...` spellings do not split one client).
            let ip_text;
            let per_value = match (item.kind.per_value(), ip) {
                (false, _) => None,
                (true, Some(ip)) => {
                    ip_text = ip.to_string();
                    Some(ip_text.as_str())
                }
                (true, None) => Some(value),
            };
            Some(Matched::native(
                Some(route),
                &rule.name,
                rule.threshold,
                counter_for(&rule.id, per_value),
            ))
        }),
    }
}

/// The first key of `item` that matches, with the value it matched (and the address, for
/// per-IP items). `None` when the entry is absent, the address unreadable, or no key matches.
fn match_item<'a, 'e>(
    item: &'a RuleItem,
    entries: &'e [Entry],
) -> Option<(&'a KeyRule, &'e str, Option<IpAddr>)> {
    let value = find(entries, &item.entry)?;
    let ip = match item.kind {
        LimitBy::PerIp { from_header } => {
            let text = if from_header {
                value.split(',').next().unwrap_or(value)
            } else {
                value
            };
            Some(parse_ip(text.trim())?)
        }
        _ => None,
    };
    let key = item.keys.iter().find(|k| k.matcher.matches(value, ip))?;
    Some((key, value, ip))
}

/// Parses an address as Envoy and proxies write it: bare, or with a port (`1.2.3.4:80`,
/// `[2001:db8::1]:443`). IPv4-mapped IPv6 addresses count as the IPv4 address they carry.
fn parse_ip(text: &str) -> Option<IpAddr> {
    let ip = text
        .parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))?;
    Some(match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    })
}

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
    })
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

    #[test]
    fn addresses_parse_with_ports_and_mapped_forms() {
        assert_eq!(parse_ip("10.1.2.3:8080"), "10.1.2.3".parse().ok());
        assert_eq!(parse_ip("[2001:db8::1]:443"), "2001:db8::1".parse().ok());
        assert_eq!(parse_ip("::ffff:10.0.0.1"), "10.0.0.1".parse().ok());
        assert_eq!(parse_ip("not-an-ip"), None);
    }
}
