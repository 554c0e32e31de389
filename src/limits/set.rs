//! The limits after loading: validated, inheritance resolved, regexes compiled. This is what
//! the matcher reads on every request, so it holds ready-to-use values only (no `Option`
//! meaning "inherit", no strings still to parse).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use regex::Regex;
use serde::Serialize;

use super::{
    Algorithm, DescriptorTree, DomainHandles, FallbackMode, HeaderStyle, Lease, RouteHandles,
    Threshold,
};

/// Every domain's limits, as one immutable set swapped whole on reload.
#[derive(Debug, Default)]
pub struct LimitSet {
    pub domains: HashMap<String, Domain>,
    /// blake3 of every file's name and content, in path order: two replicas serving the same
    /// files show the same hash on `/config`.
    pub content_hash: String,
    /// When this set was loaded (ms since the epoch); set by whoever loads it.
    pub loaded_at_ms: u64,
}

impl LimitSet {
    pub fn domain(&self, name: &str) -> Option<&Domain> {
        self.domains.get(name)
    }
}

#[derive(Debug)]
pub struct Domain {
    pub name: String,
    /// The file it was read from, for messages and `/config`.
    pub file: PathBuf,
    /// Whether a request's `limit` override is honoured.
    pub allow_limit_override: bool,
    pub limits: DomainLimits,
    /// Metric handles of the domain, kept once registered.
    pub handles: DomainHandles,
}

/// A domain is written in one format and matched by its rules, never a mix of both.
#[derive(Debug)]
pub enum DomainLimits {
    /// sluice's own format: routes named by the descriptor entry `route_key`.
    Native {
        /// The descriptor entry whose value names the route.
        route_key: String,
        routes: HashMap<String, Route>,
    },
    /// The envoyproxy/ratelimit format (a file whose top level has `descriptors:`).
    Descriptors(DescriptorTree),
}

/// What `sluice check` and `/config` call the envoyproxy/ratelimit format.
pub const ENVOY_FORMAT: &str = "envoyproxy/ratelimit";

static NO_ROUTES: std::sync::LazyLock<HashMap<String, Route>> =
    std::sync::LazyLock::new(HashMap::new);

impl Domain {
    /// The format of the file the domain was read from, as `sluice check` and `/config` name
    /// it.
    pub fn format(&self) -> &'static str {
        match self.limits {
            DomainLimits::Descriptors(_) => ENVOY_FORMAT,
            DomainLimits::Native { .. } => "sluice",
        }
    }

    /// The routes of a native domain; none for a descriptor tree.
    pub fn routes(&self) -> &HashMap<String, Route> {
        match &self.limits {
            DomainLimits::Native { routes, .. } => routes,
            DomainLimits::Descriptors(_) => &NO_ROUTES,
        }
    }

    /// The descriptor entry naming the route, in a native domain.
    pub fn route_key(&self) -> Option<&str> {
        match &self.limits {
            DomainLimits::Native { route_key, .. } => Some(route_key),
            DomainLimits::Descriptors(_) => None,
        }
    }

    /// The descriptor tree of an envoyproxy/ratelimit domain.
    pub fn tree(&self) -> Option<&DescriptorTree> {
        match &self.limits {
            DomainLimits::Descriptors(tree) => Some(tree),
            DomainLimits::Native { .. } => None,
        }
    }
}

/// A setting's effective value and the route (or `defaults` / `builtin`) it came from.
#[derive(Debug, Clone, Serialize)]
pub struct Setting<T> {
    pub value: T,
    pub from: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RouteSettings {
    pub algorithm: Setting<Algorithm>,
    pub show_limit_quota_header: Setting<bool>,
    /// `x_ratelimit` or `ietf`; unset, `show_limit_quota_header: true` means `x_ratelimit`.
    pub rate_limit_headers: Setting<HeaderStyle>,
    pub rejected_code: Setting<u16>,
    pub rejected_msg: Setting<String>,
    pub shadow_mode: Setting<bool>,
    /// envoyproxy/ratelimit's quota mode: the request is over only if every quota-mode
    /// descriptor is over (or any other descriptor is).
    pub quota_mode: Setting<bool>,
    #[serde(serialize_with = "serialize_duration_setting")]
    pub timeout: Setting<Duration>,
    pub fallback: Setting<FallbackMode>,
    /// Whether hits are taken from the store in blocks ([`Lease`]); `off` counts each one.
    pub lease: Setting<Lease>,
    /// How long a `concurrent` slot is held when its give-back never comes.
    #[serde(serialize_with = "serialize_duration_setting")]
    pub max_hold: Setting<Duration>,
}

fn serialize_duration_setting<S: serde::Serializer>(
    s: &Setting<Duration>,
    ser: S,
) -> Result<S::Ok, S::Error> {
    Setting {
        value: humantime::format_duration(s.value).to_string(),
        from: s.from.clone(),
    }
    .serialize(ser)
}

impl RouteSettings {
    /// Which quota headers the route adds to answers.
    pub fn header_style(&self) -> HeaderStyle {
        match self.rate_limit_headers.value {
            HeaderStyle::None if self.show_limit_quota_header.value => HeaderStyle::XRatelimit,
            style => style,
        }
    }
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub parent: Option<String>,
    pub settings: RouteSettings,
    pub limits: std::sync::Arc<RouteLimits>,
    /// The route whose `global_threshold` / `rule_items` these are (itself or an ancestor).
    pub limits_from: String,
    /// `current_limit.name` of each rule (`route/rule`, by rule `index`), built once.
    pub status_names: Vec<String>,
    /// Metric handles of each rule on this route (children count apart from parents).
    pub handles: RouteHandles,
}

/// A route's limits: one threshold for the whole route, or rule items tried in order.
#[derive(Debug)]
pub enum RouteLimits {
    Global(Rule),
    Items(Vec<RuleItem>),
}

/// One threshold and its identity.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Stable identity from content (or the rule's `name`), never its position, so reordering
    /// a file keeps counters. Already safe to embed in a key.
    pub id: String,
    /// Shown to people: `current_limit.name` is `route/name`.
    pub name: String,
    pub threshold: Threshold,
    /// Further limits on the same key (burst and sustained: `query_per_second` and
    /// `query_per_hour` together), each counted apart; a hit passes only if all admit it.
    pub more: Vec<Threshold>,
    /// Position among its route's rules (0 for a global threshold, then rule items' keys
    /// in order): where the route keeps this rule's status name and metric handles.
    pub index: usize,
}

#[derive(Debug)]
pub struct RuleItem {
    pub kind: LimitBy,
    /// The descriptor entry that carries the attribute.
    pub entry: String,
    pub keys: Vec<KeyRule>,
    /// The item's own `quota_mode`; `None` follows the route's.
    pub quota_mode: Option<bool>,
}

#[derive(Debug)]
pub struct KeyRule {
    pub matcher: KeyMatcher,
    pub rule: Rule,
}

/// What an item limits by. The `Per*` kinds give each distinct value its own counter; the
/// others share one counter per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitBy {
    Header,
    Param,
    Cookie,
    Consumer,
    PerHeader,
    PerParam,
    PerCookie,
    PerConsumer,
    /// `from_header`: the entry holds a comma-separated list (X-Forwarded-For style) whose
    /// first address counts.
    PerIp {
        from_header: bool,
    },
}

impl LimitBy {
    pub fn per_value(self) -> bool {
        !matches!(
            self,
            LimitBy::Header | LimitBy::Param | LimitBy::Cookie | LimitBy::Consumer
        )
    }

    /// The field name in the limits file.
    pub fn field(self) -> &'static str {
        match self {
            LimitBy::Header => "limit_by_header",
            LimitBy::Param => "limit_by_param",
            LimitBy::Cookie => "limit_by_cookie",
            LimitBy::Consumer => "limit_by_consumer",
            LimitBy::PerHeader => "limit_by_per_header",
            LimitBy::PerParam => "limit_by_per_param",
            LimitBy::PerCookie => "limit_by_per_cookie",
            LimitBy::PerConsumer => "limit_by_per_consumer",
            LimitBy::PerIp { .. } => "limit_by_per_ip",
        }
    }
}

#[derive(Debug)]
pub enum KeyMatcher {
    Exact(String),
    Regex(Regex),
    Any,
    Net(IpNet),
}

impl KeyMatcher {
    pub fn matches(&self, value: &str, ip: Option<IpAddr>) -> bool {
        match self {
            KeyMatcher::Exact(exact) => exact == value,
            KeyMatcher::Regex(re) => re.is_match(value),
            KeyMatcher::Any => true,
            KeyMatcher::Net(net) => ip.is_some_and(|ip| net.contains(&ip)),
        }
    }
}

impl LimitSet {
    /// The effective limits as JSON for `GET /config`: every route's settings with the
    /// route each came from, and its limits with the route they came from.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::{Map, json};
        let mut domains: Vec<&Domain> = self.domains.values().collect();
        domains.sort_by(|a, b| a.name.cmp(&b.name));
        let mut out = Map::new();
        for d in domains {
            let mut routes: Vec<&Route> = d.routes().values().collect();
            routes.sort_by(|a, b| a.name.cmp(&b.name));
            let mut route_map = Map::new();
            for r in routes {
                route_map.insert(
                    r.name.clone(),
                    json!({
                        "parent": r.parent,
                        "settings": r.settings,
                        "limits_from": r.limits_from,
                        "limits": r.limits.to_json(),
                    }),
                );
            }
            let shown = match &d.limits {
                // The envoyproxy/ratelimit tree as loaded: every descriptor with its limit.
                DomainLimits::Descriptors(tree) => json!({
                    "file": d.file.display().to_string(),
                    "format": d.format(),
                    "allow_limit_override": d.allow_limit_override,
                    "routes": route_map,
                    "descriptors": tree.to_json(),
                }),
                DomainLimits::Native { route_key, .. } => json!({
                    "file": d.file.display().to_string(),
                    "format": d.format(),
                    "route_key": route_key,
                    "allow_limit_override": d.allow_limit_override,
                    "routes": route_map,
                }),
            };
            out.insert(d.name.clone(), shown);
        }
        serde_json::Value::Object(out)
    }
}

impl RouteLimits {
    /// Every rule, in `index` order.
    pub fn rules(&self) -> Vec<&Rule> {
        match self {
            RouteLimits::Global(rule) => vec![rule],
            RouteLimits::Items(items) => items
                .iter()
                .flat_map(|item| item.keys.iter().map(|k| &k.rule))
                .collect(),
        }
    }

    /// Numbers the rules in order (their `index`).
    pub fn number_rules(&mut self) {
        if let RouteLimits::Items(items) = self {
            for (index, key) in items.iter_mut().flat_map(|i| i.keys.iter_mut()).enumerate() {
                key.rule.index = index;
            }
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            RouteLimits::Global(rule) => json!({ "global_threshold": rule.to_json() }),
            RouteLimits::Items(items) => json!({
                "rule_items": items.iter().map(|item| json!({
                    "limit_by": item.kind.field(),
                    "entry": item.entry,
                    "quota_mode": item.quota_mode,
                    "limit_keys": item.keys.iter().map(|k| {
                        let mut v = k.rule.to_json();
                        v["key"] = json!(k.matcher.to_string());
                        v
                    }).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            }),
        }
    }
}

impl Rule {
    pub fn to_json(&self) -> serde_json::Value {
        if self.threshold.concurrent {
            // No window: slots are held for the route's `max_hold`, shown with its settings.
            return serde_json::json!({
                "name": self.name,
                "id": self.id,
                "concurrent": self.threshold.limit,
            });
        }
        serde_json::json!({
            "name": self.name,
            "id": self.id,
            "also": self.more.iter().map(|t| serde_json::json!({
                "limit": t.limit,
                "unit": t.unit,
                "window": humantime::format_duration(std::time::Duration::from_millis(
                    t.period_ms()
                ))
                .to_string(),
            })).collect::<Vec<_>>(),
            "limit": self.threshold.limit,
            "unit": self.threshold.unit,
            "window": humantime::format_duration(std::time::Duration::from_millis(
                self.threshold.period_ms()
            ))
            .to_string(),
            "burst": self.threshold.burst,
        })
    }
}

impl std::fmt::Display for KeyMatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyMatcher::Exact(value) => f.write_str(value),
            KeyMatcher::Regex(re) => write!(f, "regexp:{}", re.as_str()),
            KeyMatcher::Any => f.write_str("*"),
            KeyMatcher::Net(net) => write!(f, "{net}"),
        }
    }
}
