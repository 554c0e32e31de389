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
    /// The value ends with `*` and matches by prefix.
    pub wildcard: bool,
    /// `key=value/key2`: shown in errors, `/config`, metrics labels and `current_limit.name`.
    pub path: String,
    pub limit: Option<DescriptorLimit>,
    pub shadow_mode: bool,
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
    /// The value without its trailing `*`, for a wildcard.
    pub fn prefix(&self) -> &str {
        let value = self.value.as_deref().unwrap_or("");
        value.strip_suffix('*').unwrap_or(value)
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
            .find(|&&i| value.starts_with(self.nodes[i].prefix()))
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
            "share_threshold": self.share_threshold,
            "detailed_metric": self.detailed_metric,
            "value_to_metric": self.value_to_metric,
        });
        if let Some(limit) = &self.limit {
            v["rate_limit"] = match &limit.threshold {
                Some(t) => json!({
                    "requests_per_unit": t.limit,
                    "unit": t.unit,
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
