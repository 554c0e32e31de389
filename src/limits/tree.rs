//! An envoyproxy/ratelimit domain as served: its descriptor tree, indexed for the walk.
//!
//! Entry *i* of a request descriptor is looked up at level *i* of the tree: a node with that
//! key and exactly that value first, then the level's wildcard values in file order, then a
//! node with that key and no value. The index here makes each lookup a hash probe; the walk
//! itself belongs to the matcher.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::{DecisionHandles, Threshold};

/// A domain's descriptors after loading: what the matcher walks.
#[derive(Debug, Default)]
pub struct DescriptorTree {
    pub descriptors: Level,
}

/// The descriptors of one level, in file order, indexed by key.
#[derive(Debug, Default)]
pub struct Level {
    pub nodes: Vec<Node>,
    by_key: HashMap<String, KeyIndex>,
}

/// The nodes of one key at one level, as positions in [`Level::nodes`].
#[derive(Debug, Default)]
struct KeyIndex {
    /// By exact value (a wildcard's own text too, as upstream's map lookup finds it).
    exact: HashMap<String, usize>,
    /// Wildcard values, in file order.
    wildcards: Vec<usize>,
    /// The node without a value.
    any: Option<usize>,
}

#[derive(Debug)]
pub struct Node {
    pub key: String,
    /// `None`: the node matches any value of its key.
    pub value: Option<String>,
    /// The value holds a `*` and matches by pattern ([`Node::matches_wildcard`]).
    pub wildcard: bool,
    /// `key=value/key2`: shown in errors, `/config`, metrics labels and `current_limit.name`.
    pub path: String,
    pub limit: Option<DescriptorLimit>,
    pub shadow_mode: bool,
    /// Quota mode (as envoyproxy/ratelimit's `quota_mode`): see the route setting.
    pub quota_mode: bool,
    pub share_threshold: bool,
    /// Accepted for compatibility; sluice's metrics never carry request values.
    pub detailed_metric: bool,
    /// Accepted for compatibility; sluice's metrics never carry request values.
    pub value_to_metric: bool,
    pub children: Level,
    /// Metric handles of this node's limit, kept once registered.
    pub handles: DecisionHandles,
}

/// A node's `rate_limit`.
#[derive(Debug)]
pub struct DescriptorLimit {
    /// `None`: `unlimited: true` (answered OK without counting).
    pub threshold: Option<Threshold>,
    /// `rate_limit.name`: what other limits' `replaces` refer to.
    pub name: Option<String>,
    pub replaces: Vec<String>,
    /// The name shown as `current_limit.name` and the `rule` metrics label: `name`, else the
    /// node's path.
    pub display: String,
}

impl Node {
    /// Whether `value` matches this node's wildcard value: each `*` stands for any run of
    /// characters (none included), anywhere and any number of times, as upstream matches
    /// since it allowed `*` in the middle of a value. No allocation.
    pub fn matches_wildcard(&self, value: &str) -> bool {
        glob(
            self.value.as_deref().unwrap_or("").as_bytes(),
            value.as_bytes(),
        )
    }
}

impl Level {
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node entry `key=value` matches here, and whether it matched through a wildcard.
    pub fn find(&self, key: &str, value: &str) -> Option<(&Node, bool)> {
        let index = self.by_key.get(key)?;
        if let Some(&i) = index.exact.get(value) {
            return Some((&self.nodes[i], false));
        }
        if let Some(&i) = index
            .wildcards
            .iter()
            .find(|&&i| self.nodes[i].matches_wildcard(value))
        {
            return Some((&self.nodes[i], true));
        }
        index.any.map(|i| (&self.nodes[i], false))
    }

    /// Adds a node at the end of this level (file order) and indexes it.
    pub fn push(&mut self, node: Node) {
        let i = self.nodes.len();
        let index = self.by_key.entry(node.key.clone()).or_default();
        match &node.value {
            None => index.any = Some(i),
            Some(value) => {
                index.exact.insert(value.clone(), i);
                if node.wildcard {
                    index.wildcards.push(i);
                }
            }
        }
        self.nodes.push(node);
    }

    fn visit<'n>(&'n self, f: &mut impl FnMut(&'n Node)) {
        for node in &self.nodes {
            f(node);
            node.children.visit(f);
        }
    }

    fn to_json(&self) -> Value {
        Value::Array(self.nodes.iter().map(Node::to_json).collect())
    }
}

impl Node {
    fn to_json(&self) -> Value {
        let mut v = json!({
            "key": self.key,
            "value": self.value,
            "path": self.path,
            "shadow_mode": self.shadow_mode,
            "quota_mode": self.quota_mode,
            "share_threshold": self.share_threshold,
            "detailed_metric": self.detailed_metric,
            "value_to_metric": self.value_to_metric,
        });
        if let Some(limit) = &self.limit {
            v["rate_limit"] = match &limit.threshold {
                Some(t) => json!({
                    "requests_per_unit": t.limit,
                    "unit": t.unit,
                    "unit_multiplier": t.multiplier,
                    "name": limit.name,
                    "replaces": limit.replaces,
                }),
                None => json!({
                    "unlimited": true,
                    "name": limit.name,
                    "replaces": limit.replaces,
                }),
            };
        }
        if !self.children.is_empty() {
            v["descriptors"] = self.children.to_json();
        }
        v
    }
}

impl DescriptorTree {
    /// Every node, parents before children, in file order.
    pub fn nodes(&self) -> Vec<&Node> {
        let mut all = Vec::new();
        self.descriptors.visit(&mut |n| all.push(n));
        all
    }

    /// The descriptor tree for `GET /config`.
    pub fn to_json(&self) -> Value {
        self.descriptors.to_json()
    }
}

/// `*`-pattern matching over bytes: linear in the value for each star, with backtracking only
/// to the last star seen (the classic greedy algorithm), so no value can make it explode.
pub fn glob(pattern: &[u8], value: &[u8]) -> bool {
    let (mut p, mut v) = (0, 0);
    // Where the last `*` was in the pattern, and where in the value it started matching.
    let mut star: Option<(usize, usize)> = None;
    while v < value.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, v));
            p += 1;
        } else if p < pattern.len() && pattern[p] == value[v] {
            p += 1;
            v += 1;
        } else if let Some((sp, sv)) = star {
            // Let the last star swallow one more byte and try again from there.
            p = sp + 1;
            v = sv + 1;
            star = Some((sp, sv + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn stars_match_anywhere_any_number_of_times() {
        for (pattern, value, expected) in [
            ("pre*", "prefix", true),
            ("pre*", "pre", true),
            ("pre*", "xpre", false),
            ("pre*fix", "prefix", true),
            ("pre*fix", "pre-and-fix", true),
            ("pre*fix", "prefixx", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "a-b-c", true),
            ("a*b*c", "a-c-b", false),
            ("*", "", true),
            ("*", "anything", true),
            ("*.png", "img/a.png", true),
            ("*.png", "img/a.png.gif", false),
            ("files/*/raw", "files/x/y/raw", true),
            ("exact", "exact", true),
            ("a**b", "ab", true),
        ] {
            assert_eq!(
                glob(pattern.as_bytes(), value.as_bytes()),
                expected,
                "{pattern:?} against {value:?}"
            );
        }
        // A hostile value against a many-star pattern still answers at once.
        let value = "a".repeat(100_000);
        assert!(!glob(b"*a*a*a*a*a*b", value.as_bytes()));
    }
}
