//! A route's own limits: its `global_threshold` or its `rule_items`, each threshold checked
//! and compiled, each rule given a stable identity from its content.

use std::net::IpAddr;

use ipnet::IpNet;
use regex::Regex;

use super::schema::*;
use super::{At, FileContext};
use crate::limits::*;

impl FileContext<'_> {
    /// The limits the route sets itself, if any (errors reported, `None` returned on error).
    pub(super) fn own_limits(&mut self, route: &RouteRaw, at: At<'_>) -> Option<RouteLimits> {
        match (&route.global_threshold, &route.rule_items) {
            (Some(_), Some(_)) => {
                self.error(
                    at,
                    "global_threshold",
                    "set either global_threshold or rule_items, not both: one route has one kind \
                     of limit; move the rule items to a child route (parent: ...) if you need both",
                );
                None
            }
            (Some(threshold), None) => {
                let (threshold, more) = self.threshold(threshold, at, "global_threshold")?;
                Some(RouteLimits::Global(Rule {
                    id: rule_id(&["global"], threshold.period_ms()),
                    name: "global".to_string(),
                    threshold,
                    more,
                    index: 0,
                }))
            }
            (None, Some(items)) => {
                if items.is_empty() {
                    self.error(
                        at,
                        "rule_items",
                        "is empty: add at least one item, or use global_threshold",
                    );
                    return None;
                }
                let before = self.errors.len();
                let compiled: Vec<RuleItem> = items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, item)| {
                        let at = At {
                            line: Some(item.referenced.line()),
                            end: items.get(i + 1).map(|n| n.referenced.line()).or(at.end),
                            ..at
                        };
                        self.rule_item(&item.value, at, &format!("rule_items[{i}]"))
                    })
                    .collect();
                (self.errors.len() == before).then(|| {
                    let mut limits = RouteLimits::Items(compiled);
                    limits.number_rules();
                    limits
                })
            }
            (None, None) => None,
        }
    }

    fn threshold(
        &mut self,
        raw: &ThresholdRaw,
        at: At<'_>,
        field: &str,
    ) -> Option<(Threshold, Vec<Threshold>)> {
        if let Some(limit) = raw.concurrent {
            let rates = [
                raw.query_per_second,
                raw.query_per_minute,
                raw.query_per_hour,
                raw.query_per_day,
                raw.requests,
                raw.burst,
            ];
            if rates.iter().any(Option::is_some) || raw.window.is_some() {
                self.error(
                    at,
                    format!("{field}.concurrent"),
                    "limits requests in flight and stands alone: remove the rates (query_per_*, \
                     requests, window, burst) from this threshold, or put them on a route or \
                     rule of their own",
                );
                return None;
            }
            if !(1..=u64::from(u32::MAX)).contains(&limit) {
                self.error(
                    at,
                    format!("{field}.concurrent"),
                    format!(
                        "{limit} is not a number of requests in flight: use 1 to {}",
                        u32::MAX
                    ),
                );
                return None;
            }
            // The period is the route's `max_hold`, set per request from its settings.
            let threshold = Threshold {
                concurrent: true,
                ..Threshold::new(limit, Unit::Second)
            };
            return Some((threshold, Vec::new()));
        }
        let mut set: Vec<(&str, u64, Unit, u32)> = [
            ("query_per_second", raw.query_per_second, Unit::Second),
            ("query_per_minute", raw.query_per_minute, Unit::Minute),
            ("query_per_hour", raw.query_per_hour, Unit::Hour),
            ("query_per_day", raw.query_per_day, Unit::Day),
        ]
        .into_iter()
        .filter_map(|(name, v, unit)| v.map(|v| (name, v, unit, 1)))
        .collect();
        match (raw.requests, raw.window.as_deref()) {
            (None, None) => {}
            (Some(requests), Some(window)) => {
                let (unit, multiplier) = self.window(window, at, field)?;
                set.push(("requests", requests, unit, multiplier));
            }
            (Some(_), None) => {
                self.error(
                    at,
                    format!("{field}.requests"),
                    "needs a window: write e.g. `requests: 100` with `window: 30s`",
                );
                return None;
            }
            (None, Some(_)) => {
                self.error(
                    at,
                    format!("{field}.window"),
                    "needs a number of requests: write e.g. `requests: 100` with `window: 30s`",
                );
                return None;
            }
        }
        if set.is_empty() {
            self.error(
                at,
                field,
                "no rate: set one of query_per_second, query_per_minute, query_per_hour, \
                 query_per_day, requests with window, or concurrent",
            );
            return None;
        }
        // Several rates on one key are several limits, each counted apart (burst and
        // sustained); two of one period would be the same window counted twice.
        for (i, a) in set.iter().enumerate() {
            for b in &set[i + 1..] {
                if a.2.seconds() * u64::from(a.3) == b.2.seconds() * u64::from(b.3) {
                    self.error(
                        at,
                        field,
                        format!(
                            "sets {} and {} for the same period: two limits on one key need \
                             two different windows (e.g. query_per_second and query_per_hour); \
                             keep one",
                            a.0, b.0
                        ),
                    );
                    return None;
                }
            }
        }
        if set.len() > 1 && raw.burst.is_some() {
            self.error(
                at,
                format!("{field}.burst"),
                "applies to a threshold with one rate; with several rates each is its own \
                 limit (the shorter one is the burst): remove burst",
            );
            return None;
        }
        let mut thresholds = Vec::with_capacity(set.len());
        for (name, limit, unit, multiplier) in set {
            if limit > u64::from(u32::MAX) {
                self.error(
                    at,
                    format!("{field}.{name}"),
                    format!(
                        "{limit} is larger than Envoy can carry (at most {})",
                        u32::MAX
                    ),
                );
                return None;
            }
            thresholds.push(Threshold {
                limit,
                unit,
                multiplier,
                burst: raw.burst,
                concurrent: false,
            });
        }
        if raw.burst == Some(0) {
            self.error(
                at,
                format!("{field}.burst"),
                "must be at least 1 (or left out to mean the limit)",
            );
            return None;
        }
        let first = thresholds.remove(0);
        Some((first, thresholds))
    }

    /// A `window:` as Envoy can report it: the largest of second, minute, hour and day that
    /// divides it, times a multiplier (`30s` is SECOND × 30, `90m` MINUTE × 90, `2h` HOUR × 2),
    /// so Envoy's `x-ratelimit-limit` shows `w=<seconds>`.
    fn window(&mut self, text: &str, at: At<'_>, field: &str) -> Option<(Unit, u32)> {
        let field = format!("{field}.window");
        let Ok(window) = humantime::parse_duration(text) else {
            self.error(
                at,
                field,
                format!("\"{text}\" is not a duration: write it like `30s`, `5m` or `36h`"),
            );
            return None;
        };
        if window.subsec_nanos() != 0 {
            self.error(
                at,
                field,
                format!("{text} is not a whole number of seconds: windows are counted in seconds"),
            );
            return None;
        }
        let secs = window.as_secs();
        if !(1..=366 * 86_400).contains(&secs) {
            self.error(
                at,
                field,
                format!("{text} is out of range: a window is 1s to 366d"),
            );
            return None;
        }
        let unit = [Unit::Day, Unit::Hour, Unit::Minute, Unit::Second]
            .into_iter()
            .find(|u| secs % u.seconds() == 0)
            .unwrap_or(Unit::Second);
        let multiplier = u32::try_from(secs / unit.seconds()).unwrap_or(u32::MAX);
        Some((unit, multiplier))
    }

    fn rule_item(&mut self, raw: &RuleItemRaw, at: At<'_>, field: &str) -> Option<RuleItem> {
        let kinds: Vec<(LimitBy, &String)> = [
            (LimitBy::Header, &raw.limit_by_header),
            (LimitBy::Param, &raw.limit_by_param),
            (LimitBy::Cookie, &raw.limit_by_cookie),
            (LimitBy::Consumer, &raw.limit_by_consumer),
            (LimitBy::PerHeader, &raw.limit_by_per_header),
            (LimitBy::PerParam, &raw.limit_by_per_param),
            (LimitBy::PerCookie, &raw.limit_by_per_cookie),
            (LimitBy::PerConsumer, &raw.limit_by_per_consumer),
            (LimitBy::PerIp { from_header: false }, &raw.limit_by_per_ip),
        ]
        .into_iter()
        .filter_map(|(kind, v)| v.as_ref().map(|v| (kind, v)))
        .collect();
        let (kind, value) = match kinds.as_slice() {
            [] => {
                self.error(
                    at,
                    field,
                    "no limit_by_* kind: set one of limit_by_header, limit_by_param, \
                     limit_by_cookie, limit_by_consumer, limit_by_per_header, limit_by_per_param, \
                     limit_by_per_cookie, limit_by_per_consumer, limit_by_per_ip",
                );
                return None;
            }
            [(kind, value)] => (*kind, value.as_str()),
            [first, second, ..] => {
                self.error(
                    at,
                    format!("{field}.{}", second.0.field()),
                    format!(
                        "sets both {} and {}: an item limits by exactly one attribute; split it \
                         into two rule items",
                        first.0.field(),
                        second.0.field()
                    ),
                );
                return None;
            }
        };
        let kind_field = format!("{field}.{}", kind.field());
        let (kind, default_entry) = match kind {
            LimitBy::Consumer | LimitBy::PerConsumer => (kind, "consumer".to_string()),
            LimitBy::PerIp { .. } => {
                if value == "from-remote-addr" {
                    (
                        LimitBy::PerIp { from_header: false },
                        "remote_address".to_string(),
                    )
                } else if let Some(header) = value.strip_prefix("from-header-")
                    && !header.is_empty()
                {
                    (LimitBy::PerIp { from_header: true }, header.to_string())
                } else {
                    self.error(
                        at,
                        kind_field,
                        format!(
                            "\"{value}\" is not an address source: use `from-remote-addr` (Envoy's \
                             remote_address entry) or `from-header-<name>` (e.g. \
                             from-header-x-forwarded-for)"
                        ),
                    );
                    return None;
                }
            }
            _ => {
                if value.is_empty() {
                    self.error(
                        at,
                        kind_field,
                        "is empty: name the descriptor entry that carries the value, e.g. x-api-key",
                    );
                    return None;
                }
                (kind, value.to_string())
            }
        };
        let entry = match raw.descriptor_key.as_deref() {
            Some("") => {
                self.error(
                    at,
                    format!("{field}.descriptor_key"),
                    "must not be empty; leave it out to use the default entry",
                );
                return None;
            }
            Some(key) => key.to_string(),
            None => default_entry,
        };
        let keys_field = format!("{field}.limit_keys");
        let raw_keys = match &raw.limit_keys {
            Some(keys) if !keys.is_empty() => keys,
            _ => {
                self.error(
                    at,
                    keys_field,
                    "is empty: add at least one `{ key: ..., query_per_second: ... }`",
                );
                return None;
            }
        };
        let before = self.errors.len();
        let mut keys = Vec::with_capacity(raw_keys.len());
        for (i, key) in raw_keys.iter().enumerate() {
            let at = At {
                line: Some(key.referenced.line()),
                end: raw_keys.get(i + 1).map(|n| n.referenced.line()).or(at.end),
                ..at
            };
            let key_field = format!("{keys_field}[{i}]");
            let item_name = raw.name.as_deref().filter(|n| !n.is_empty());
            let shared_name = item_name.map(|n| (n, raw_keys.len() > 1));
            if let Some(rule) = self.key_rule(&key.value, kind, &entry, shared_name, at, &key_field)
            {
                keys.push(rule);
            }
        }
        (self.errors.len() == before).then(|| RuleItem {
            kind,
            entry,
            keys,
            quota_mode: raw.quota_mode,
        })
    }

    fn key_rule(
        &mut self,
        raw: &LimitKeyRaw,
        kind: LimitBy,
        entry: &str,
        item_name: Option<(&str, bool)>,
        at: At<'_>,
        field: &str,
    ) -> Option<KeyRule> {
        let Some(key) = raw.key.as_deref() else {
            self.error(
                at,
                format!("{field}.key"),
                "missing: set the value, `regexp:<re>`, `*` or address this key matches",
            );
            return None;
        };
        let key_field = format!("{field}.key");
        let matcher = match kind {
            LimitBy::PerIp { .. } => {
                if key == "*" {
                    KeyMatcher::Any
                } else if let Ok(net) = key.parse::<IpNet>() {
                    KeyMatcher::Net(net.trunc())
                } else if let Ok(ip) = key.parse::<IpAddr>() {
                    KeyMatcher::Net(IpNet::from(ip))
                } else {
                    self.error(
                        at,
                        key_field,
                        format!("\"{key}\" is not an IP address or CIDR range: write e.g. 10.0.0.0/8, 2001:db8::/32 or 192.0.2.7"),
                    );
                    return None;
                }
            }
            _ if kind.per_value() => {
                if key == "*" {
                    KeyMatcher::Any
                } else if let Some(re) = key.strip_prefix("regexp:") {
                    match Regex::new(re) {
                        Ok(re) => KeyMatcher::Regex(re),
                        Err(e) => {
                            let detail = e
                                .to_string()
                                .split_whitespace()
                                .collect::<Vec<_>>()
                                .join(" ");
                            self.error(at, key_field, format!("bad regexp \"{re}\": {detail}"));
                            return None;
                        }
                    }
                } else {
                    self.error(
                        at,
                        key_field,
                        format!(
                            "\"{key}\": keys of {} are `regexp:<re>` or `*` (each matching value \
                             gets its own counter); for one shared counter per exact value use {}",
                            kind.field(),
                            kind.field().replace("_per_", "_")
                        ),
                    );
                    return None;
                }
            }
            _ => {
                if key == "*" || key.starts_with("regexp:") {
                    self.error(
                        at,
                        key_field,
                        format!(
                            "\"{key}\": keys of {} are exact values; for `regexp:` or `*` keys use {}",
                            kind.field(),
                            kind.field().replace("limit_by_", "limit_by_per_")
                        ),
                    );
                    return None;
                }
                KeyMatcher::Exact(key.to_string())
            }
        };
        let (threshold, more) = self.threshold(&raw.threshold(), at, field)?;
        let period = threshold.period_ms();
        // Identity: the key's own name, else its item's name and the key, else its content.
        let (id, name) = match (raw.name.as_deref().filter(|n| !n.is_empty()), item_name) {
            (Some(name), _) => (rule_id(&["name", name], period), name.to_string()),
            (None, Some((item, several_keys))) => (
                rule_id(&["item", item, key], period),
                if several_keys {
                    format!("{item}:{key}")
                } else {
                    item.to_string()
                },
            ),
            (None, None) => (
                rule_id(&[kind.field(), entry, key], period),
                format!(
                    "{}:{entry}={key}",
                    kind.field().trim_start_matches("limit_by_")
                ),
            ),
        };
        Some(KeyRule {
            matcher,
            rule: Rule {
                id,
                name,
                threshold,
                more,
                index: 0,
            },
        })
    }

    /// `burst` only makes sense for a token bucket.
    pub(super) fn check_algorithm(
        &mut self,
        at: At<'_>,
        settings: &RouteSettings,
        limits: &RouteLimits,
    ) {
        let algorithm = settings.algorithm.value;
        let burst_field = match limits {
            RouteLimits::Global(rule) => rule
                .threshold
                .burst
                .map(|_| "global_threshold.burst".to_string()),
            RouteLimits::Items(items) => items.iter().enumerate().find_map(|(i, item)| {
                item.keys
                    .iter()
                    .position(|k| k.rule.threshold.burst.is_some())
                    .map(|k| format!("rule_items[{i}].limit_keys[{k}].burst"))
            }),
        };
        if let Some(field) = burst_field
            && algorithm != Algorithm::TokenBucket
        {
            self.error(
                at,
                field,
                format!(
                    "burst applies to algorithm token_bucket only, and this route counts with {}; \
                     remove burst or set `algorithm: token_bucket`",
                    algorithm.as_str()
                ),
            );
        }
    }
}

/// A rule's identity: a short hash of what it matches and its period (not its position, not
/// its limit), so reordering or retuning a file keeps counters, while a rule that now
/// counts over another period starts afresh.
fn rule_id(parts: &[&str], period_ms: u64) -> String {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.update(&period_ms.to_le_bytes());
    let hash = hasher.finalize();
    hash.to_hex()[..12].to_string()
}
