//! Matching in sluice's own format: the route named by the descriptor, then its
//! `global_threshold`, or its rule items tried in order (the first item whose entry is present
//! and one of whose keys matches decides; within an item the first matching key wins).
//!
//! Per-value kinds (`limit_by_per_*`) give each distinct value its own counter; per-IP items
//! count the address in canonical form, so `::ffff:1.2.3.4` and `1.2.3.4` are one client.

use std::net::IpAddr;

use super::{Matched, find, push_component};
use crate::limits::{
    DecisionHandles, Domain, KeyRule, LimitBy, Route, RouteLimits, Rule, RuleItem,
};
use crate::proto::descriptor::rate_limit_descriptor::Entry;

pub(super) fn match_route<'a>(
    domain: &'a Domain,
    route: &'a Route,
    entries: &[Entry],
) -> Option<Matched<'a>> {
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
    // The match of `rule` on this route, counting `value` apart for per-value kinds.
    let matched = |rule: &'a Rule, value: Option<&str>| Matched {
        more: &rule.more,
        ..Matched::native(
            Some(route),
            &rule.name,
            rule.threshold,
            counter_for(&rule.id, value),
            handles(route, rule),
            route.status_names.get(rule.index).map(String::as_str),
        )
    };
    match route.limits.as_ref() {
        RouteLimits::Global(rule) => Some(matched(rule, None)),
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
            let mut found = matched(rule, per_value);
            if let Some(quota_mode) = item.quota_mode {
                found.quota_mode = quota_mode;
            }
            Some(found)
        }),
    }
}

/// The decision counters of `rule` on `route` (its parent, sharing the rule, counts apart).
fn handles<'a>(route: &'a Route, rule: &Rule) -> &'a DecisionHandles {
    route
        .handles
        .rules
        .get(rule.index)
        .unwrap_or(&route.handles.override_decisions)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_with_ports_and_mapped_forms() {
        assert_eq!(parse_ip("10.1.2.3:8080"), "10.1.2.3".parse().ok());
        assert_eq!(parse_ip("[2001:db8::1]:443"), "2001:db8::1".parse().ok());
        assert_eq!(parse_ip("::ffff:10.0.0.1"), "10.0.0.1".parse().ok());
        assert_eq!(parse_ip("not-an-ip"), None);
    }
}
