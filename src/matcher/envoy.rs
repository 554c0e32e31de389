//! Matching in the envoyproxy/ratelimit format, as that project matches: entry *i* of a
//! request descriptor is looked up at level *i* of the tree (exact value, then wildcards in
//! file order, then the node without a value), and the walk descends into the matched node's
//! children for the next entry. The limit is the `rate_limit` of the node matched by the last
//! entry; a walk that stops earlier, or ends on a node without one, has no limit.
//!
//! Counters follow upstream's cache key: the domain, every entry's key and value, the period.
//! A value matched through a `share_threshold` wildcard is replaced by the wildcard itself, so
//! every value it matches shares one counter.

use std::fmt::Write as _;

use super::{Matched, push_component};
use crate::limits::{DescriptorLimit, DescriptorTree, Domain, Node, Threshold, Unit};
use crate::proto::descriptor::rate_limit_descriptor::Entry;

/// The limit of one request descriptor's entries in an envoyproxy/ratelimit domain, or
/// `None` when it has none (see the module comment for the walk). Allocates only the
/// counter id.
pub(super) fn match_entries<'a>(
    domain: &'a Domain,
    tree: &'a DescriptorTree,
    entries: &[Entry],
) -> Option<Matched<'a>> {
    let last = entries.len().checked_sub(1)?;
    let mut level = &tree.descriptors;
    // Whether a value matched a `share_threshold` wildcard, so the counter needs the walk
    // again to put the wildcard in its place.
    let mut shared = false;
    for (i, entry) in entries.iter().enumerate() {
        let (node, via_wildcard) = level.find(&entry.key, &entry.value)?;
        shared |= via_wildcard && node.share_threshold;
        if i < last {
            if node.children.is_empty() {
                return None;
            }
            level = &node.children;
            continue;
        }
        let limit = node.limit.as_ref()?;
        let Some(threshold) = limit.threshold else {
            return Some(compat_match(
                node,
                limit,
                Threshold::new(0, Unit::Second),
                String::new(),
            ));
        };
        // The counter, as upstream's cache key: domain, each entry, period. Built only now
        // that the walk found a limit, so descriptors without one allocate nothing. `rl` and
        // the odd number of components keep these ids apart from native ones (domain, route,
        // rule id and at most one value).
        let mut counter = String::with_capacity(32 + entries.len() * 24);
        push_component(&mut counter, &domain.name);
        counter.push_str(":rl");
        let mut walk = &tree.descriptors;
        for e in entries {
            counter.push(':');
            push_component(&mut counter, &e.key);
            counter.push(':');
            let pattern = if shared {
                let (n, wild) = walk.find(&e.key, &e.value)?;
                walk = &n.children;
                (wild && n.share_threshold).then_some(n.value.as_deref().unwrap_or(""))
            } else {
                None
            };
            push_component(&mut counter, pattern.unwrap_or(&e.value));
        }
        let _ = write!(counter, ":{}", threshold.period_ms() / 1000);
        return Some(compat_match(node, limit, threshold, counter));
    }
    None
}

fn compat_match<'a>(
    node: &'a Node,
    limit: &'a DescriptorLimit,
    threshold: Threshold,
    counter: String,
) -> Matched<'a> {
    Matched {
        route: None,
        path: Some(&node.path),
        rule: &limit.display,
        threshold,
        more: &[],
        counter,
        shadow: node.shadow_mode,
        quota_mode: node.quota_mode,
        limit_name: limit.name.as_deref(),
        replaces: &limit.replaces,
        unlimited: limit.threshold.is_none(),
        handles: &node.handles,
        status_name: Some(&limit.display),
    }
}
