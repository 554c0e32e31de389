//! The envoyproxy/ratelimit limits format, read as that project reads it: its schema and
//! its validation. The loaded tree is matched by the matcher, as upstream matches it.
//!
//! A limits file whose top level has `descriptors:` is in this format. It loads into a
//! [`Domain`] whose limits are a [`DescriptorTree`]. What this module owns:
//!
//! - **Schema.** `domain` and `descriptors`; a descriptor has `key`, optional `value`,
//!   optional `rate_limit { unit, requests_per_unit, unlimited, name, replaces: [{name}] }`,
//!   optional nested `descriptors`, and the flags `shadow_mode`, `detailed_metric`,
//!   `value_to_metric` and `share_threshold`. Units are `second`, `minute`, `hour`, `day`,
//!   `week`, `month` or `year`, in any case (upstream upper-cases them). Any other key is an
//!   error, as upstream.
//! - **Validation.** Every upstream load error (empty domain, empty key, duplicate
//!   descriptor at one level, invalid unit, a unit with `unlimited`, an empty or
//!   self-naming `replaces`, `share_threshold` without a wildcard) and a few upstream lets
//!   pass silently (a missing `requests_per_unit`, which upstream reads as 0 and so blocks
//!   everything; `requests_per_unit` with `unlimited`) become [`ConfigError`]s naming the
//!   file, the line, the descriptor path (in `route`, as `key=value/key2`) and the field.
//!
//! The same format arrives over xDS as `RateLimitConfig` messages ([`from_proto`]): they are
//! read into the raw form a file is read into and built by the same code.
//!
//! `detailed_metric` and `value_to_metric` only change upstream's stats names and are
//! accepted without effect, because sluice's metric labels come from configuration names
//! only (the matched descriptor path, never request values).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::diagnostics::{ConfigError, find_key_line, parse_error};
use crate::limits::{
    DecisionHandles, DescriptorLimit, DescriptorTree, Domain, DomainHandles, DomainLimits, Level,
    Node, Threshold, Unit,
};

mod xds;
pub use xds::from_proto;

/// What `sluice check` and `/config` call this format.
pub const FORMAT: &str = crate::limits::ENVOY_FORMAT;

/// Whether `text` is a limits file in this format: its top level has a `descriptors` key.
/// A file that is not valid YAML is judged by a top-level line starting `descriptors:`, so
/// its syntax error is reported in the format it was meant to be.
pub fn is_envoy_format(text: &str) -> bool {
    match serde_saphyr::from_str::<BTreeMap<String, serde::de::IgnoredAny>>(text) {
        Ok(keys) => keys.contains_key("descriptors"),
        Err(_) => find_key_line(text, "descriptors", None, None).is_some(),
    }
}

// ---------------------------------------------------------------------------------------------
// The file as written.

#[derive(Debug, Deserialize)]
struct FileRaw {
    domain: Option<Spanned<String>>,
    descriptors: Option<Vec<Spanned<DescriptorRaw>>>,
}

#[derive(Debug, Deserialize)]
struct DescriptorRaw {
    key: Option<Spanned<String>>,
    value: Option<Spanned<String>>,
    rate_limit: Option<Spanned<RateLimitRaw>>,
    descriptors: Option<Vec<Spanned<DescriptorRaw>>>,
    shadow_mode: Option<bool>,
    quota_mode: Option<bool>,
    detailed_metric: Option<bool>,
    value_to_metric: Option<bool>,
    share_threshold: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
struct RateLimitRaw {
    unit: Option<Spanned<String>>,
    requests_per_unit: Option<Spanned<u64>>,
    /// The window is `unit_multiplier` units long (as in Envoy's own protos).
    unit_multiplier: Option<Spanned<u32>>,
    unlimited: Option<Spanned<bool>>,
    name: Option<Spanned<String>>,
    replaces: Option<Vec<Spanned<ReplacesRaw>>>,
}

#[derive(Debug, Deserialize)]
struct ReplacesRaw {
    name: Option<Spanned<String>>,
}

/// A lenient view (unknown fields ignored) used only to find which descriptor a YAML or type
/// error is in.
#[derive(Debug, Deserialize)]
struct NamesRaw {
    #[serde(default)]
    descriptors: Vec<Spanned<NameRaw>>,
}

#[derive(Debug, Deserialize)]
struct NameRaw {
    key: Option<String>,
    value: Option<String>,
    #[serde(default)]
    descriptors: Vec<Spanned<NameRaw>>,
}

// ---------------------------------------------------------------------------------------------
// Loading.

/// Parses and validates one limits file in this format, reporting every problem it finds.
pub fn parse_file(file: &Path, text: &str) -> Result<Domain, Vec<ConfigError>> {
    let mut unknown = Vec::new();
    let parsed: Result<FileRaw, _> = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_ignored::deserialize(de, |path| unknown.push(path.to_string()))
    });
    let raw = match parsed {
        Ok(raw) => raw,
        Err(e) => {
            let mut err = parse_error(file, text, &e);
            err.route = err.line.and_then(|line| path_at_line(text, line));
            return Err(vec![err]);
        }
    };
    build(file, text, &raw, &unknown)
}

/// The one builder behind both inputs of this format, a YAML file and a `RateLimitConfig`
/// pushed over xDS: every check and every default lives here once, so the same limits give
/// the same domain whichever way they came.
fn build(
    file: &Path,
    text: &str,
    raw: &FileRaw,
    unknown: &[String],
) -> Result<Domain, Vec<ConfigError>> {
    let mut cx = Cx {
        file,
        text,
        errors: Vec::new(),
    };
    for path in unknown {
        cx.unknown_field(raw, path);
    }
    let name = match &raw.domain {
        Some(d) if !d.value.trim().is_empty() => d.value.clone(),
        Some(d) => {
            cx.error(
                Some(d.referenced.line()),
                None,
                "domain",
                "is empty: name the Envoy rate limit domain, e.g. `domain: edge`",
            );
            String::new()
        }
        None => {
            cx.error(
                Some(1),
                None,
                "domain",
                "missing: a file in the envoyproxy/ratelimit format (it has top-level \
                 `descriptors:`) names its domain, e.g. `domain: edge`",
            );
            String::new()
        }
    };
    let descriptors = raw.descriptors.as_deref().unwrap_or(&[]);
    let level = cx.level(descriptors, None, None);
    if !cx.errors.is_empty() {
        return Err(cx.errors);
    }
    Ok(Domain {
        name,
        file: file.to_path_buf(),
        allow_limit_override: true,
        limits: DomainLimits::Descriptors(DescriptorTree { descriptors: level }),
        handles: DomainHandles::default(),
    })
}

/// The descriptor path a line is in, through the lenient view.
fn path_at_line(text: &str, line: u64) -> Option<String> {
    let names: NamesRaw = serde_saphyr::from_str(text).ok()?;
    let mut level = &names.descriptors;
    let mut path: Option<String> = None;
    while let Some(node) = level.iter().rev().find(|n| n.referenced.line() <= line) {
        let segment = segment(
            node.value.key.as_deref().unwrap_or(""),
            node.value.value.as_deref(),
        );
        path = Some(match path {
            Some(p) => format!("{p}/{segment}"),
            None => segment,
        });
        level = &node.value.descriptors;
    }
    path
}

/// One step of a descriptor path: `key=value`, or `key` for a node without a value.
fn segment(key: &str, value: Option<&str>) -> String {
    match value {
        Some(v) if !v.is_empty() => format!("{key}={v}"),
        _ => key.to_string(),
    }
}

struct Cx<'a> {
    file: &'a Path,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Cx<'_> {
    fn error(
        &mut self,
        line: Option<u64>,
        path: Option<&str>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            // A resource pushed over xDS has no lines: its spans are unknown (line 0).
            line: line.filter(|&l| l != 0),
            route: path.map(str::to_string),
            field: field.into(),
            message: message.into(),
        });
    }

    /// Validates one level of descriptors; `end` is the first line after the level's parent.
    fn level(
        &mut self,
        raw: &[Spanned<DescriptorRaw>],
        parent: Option<&str>,
        end: Option<u64>,
    ) -> Level {
        let mut level = Level::default();
        // (key, value) -> (path, line) of the first node with it, for duplicates.
        let mut seen: HashMap<(String, String), u64> = HashMap::new();
        for (i, node) in raw.iter().enumerate() {
            let line = node.referenced.line();
            let node_end = raw.get(i + 1).map(|n| n.referenced.line()).or(end);
            let d = &node.value;
            let value = d
                .value
                .as_ref()
                .map(|v| v.value.clone())
                .filter(|v| !v.is_empty());
            let key = match &d.key {
                Some(k) if !k.value.is_empty() => Some(k.value.clone()),
                _ => None,
            };
            let own = match &key {
                Some(key) => segment(key, value.as_deref()),
                None => format!("descriptors[{i}]"),
            };
            let path = match parent {
                Some(p) => format!("{p}/{own}"),
                None => own,
            };
            let before = self.errors.len();
            match (&d.key, &key) {
                (Some(k), None) => self.error(
                    Some(k.referenced.line()),
                    Some(&path),
                    "key",
                    "is empty: every descriptor names the descriptor entry key it matches",
                ),
                (None, _) => self.error(
                    Some(line),
                    Some(&path),
                    "key",
                    "missing: every descriptor names the descriptor entry key it matches, \
                     e.g. `key: remote_address`",
                ),
                _ => {}
            }
            if let Some(key) = &key {
                let composite = (key.clone(), value.clone().unwrap_or_default());
                if let Some(first) = seen.get(&composite) {
                    let (field, at) = match &d.value {
                        Some(v) if value.is_some() => ("value", v.referenced.line()),
                        _ => ("key", d.key.as_ref().map_or(line, |k| k.referenced.line())),
                    };
                    self.error(
                        Some(at),
                        Some(&path),
                        field,
                        format!(
                            "duplicate descriptor composite key: `{path}` is already defined at \
                             line {first} of this level; merge the two descriptors or remove one"
                        ),
                    );
                } else {
                    seen.insert(composite, line);
                }
            }
            let wildcard = value.as_deref().is_some_and(|v| v.contains('*'));
            let share_threshold = d.share_threshold.as_ref().is_some_and(|s| s.value);
            if share_threshold && !wildcard {
                let at = d
                    .share_threshold
                    .as_ref()
                    .map_or(line, |s| s.referenced.line());
                self.error(
                    Some(at),
                    Some(&path),
                    "share_threshold",
                    "applies to wildcard values only (a `value` with a `*`, e.g. \
                     `value: files/*`): all values matching the wildcard then share one counter",
                );
            }
            let limit = d
                .rate_limit
                .as_ref()
                .and_then(|rl| self.rate_limit(rl, &path));
            let children = match &d.descriptors {
                Some(children) => self.level(children, Some(&path), node_end),
                None => Level::default(),
            };
            if self.errors.len() == before
                && let Some(key) = key
            {
                level.push(Node {
                    key,
                    value,
                    wildcard,
                    path,
                    limit,
                    shadow_mode: d.shadow_mode.unwrap_or(false),
                    quota_mode: d.quota_mode.unwrap_or(false),
                    share_threshold,
                    detailed_metric: d.detailed_metric.unwrap_or(false),
                    value_to_metric: d.value_to_metric.unwrap_or(false),
                    children,
                    handles: DecisionHandles::default(),
                });
            }
        }
        level
    }

    fn rate_limit(&mut self, rl: &Spanned<RateLimitRaw>, path: &str) -> Option<DescriptorLimit> {
        // Errors about a missing field point at the `rate_limit:` key (the span starts at the
        // block's first field, the line after it).
        let line = key_line_at_or_before(self.text, "rate_limit", rl.referenced.line());
        let raw = &rl.value;
        let before = self.errors.len();
        let unlimited = raw.unlimited.as_ref().is_some_and(|u| u.value);
        let name = raw
            .name
            .as_ref()
            .map(|n| n.value.clone())
            .filter(|n| !n.is_empty());
        let unit = raw.unit.as_ref().and_then(|u| {
            let unit = parse_unit(&u.value);
            if unit.is_none() && !unlimited {
                self.error(
                    Some(u.referenced.line()),
                    Some(path),
                    "rate_limit.unit",
                    format!(
                        "invalid rate limit unit \"{}\": use second, minute, hour, day, week, \
                         month or year",
                        u.value
                    ),
                );
            }
            unit
        });
        let threshold = if unlimited {
            if let Some(u) = &raw.unit {
                self.error(
                    Some(u.referenced.line()),
                    Some(path),
                    "rate_limit.unit",
                    "should not be set with `unlimited: true`: an unlimited descriptor has no \
                     rate; remove unit (or unlimited)",
                );
            }
            if let Some(r) = &raw.requests_per_unit {
                self.error(
                    Some(r.referenced.line()),
                    Some(path),
                    "rate_limit.requests_per_unit",
                    "should not be set with `unlimited: true`: an unlimited descriptor has no \
                     rate; remove requests_per_unit (or unlimited)",
                );
            }
            None
        } else {
            if raw.unit.is_none() {
                self.error(
                    Some(line),
                    Some(path),
                    "rate_limit.unit",
                    "missing: set second, minute, hour, day, week, month or year (or \
                     `unlimited: true`)",
                );
            }
            let requests = match &raw.requests_per_unit {
                None => {
                    self.error(
                        Some(line),
                        Some(path),
                        "rate_limit.requests_per_unit",
                        "missing: set how many requests each unit admits (0 blocks every \
                         request; envoyproxy/ratelimit would silently read a missing value as 0)",
                    );
                    None
                }
                Some(r) if r.value > u64::from(u32::MAX) => {
                    self.error(
                        Some(r.referenced.line()),
                        Some(path),
                        "rate_limit.requests_per_unit",
                        format!(
                            "{} is larger than Envoy can carry (at most {})",
                            r.value,
                            u32::MAX
                        ),
                    );
                    None
                }
                Some(r) => Some(r.value),
            };
            let multiplier = match &raw.unit_multiplier {
                Some(m) if m.value == 0 => {
                    self.error(
                        Some(m.referenced.line()),
                        Some(path),
                        "rate_limit.unit_multiplier",
                        "is 0: a window is at least one unit long; write 1 or more (or leave \
                         it out for 1)",
                    );
                    None
                }
                Some(m) => Some(m.value),
                None => Some(1),
            };
            match (requests, unit, multiplier) {
                (Some(limit), Some(unit), Some(multiplier)) => Some(Threshold {
                    multiplier,
                    ..Threshold::new(limit, unit)
                }),
                _ => None,
            }
        };
        let mut replaces = Vec::new();
        for (j, r) in raw.replaces.as_deref().unwrap_or(&[]).iter().enumerate() {
            let field = format!("rate_limit.replaces[{j}].name");
            match &r.value.name {
                Some(n) if !n.value.is_empty() => {
                    if name.as_deref() == Some(n.value.as_str()) {
                        self.error(
                            Some(n.referenced.line()),
                            Some(path),
                            field,
                            format!(
                                "\"{}\" is this limit's own name: a limit cannot replace itself; \
                                 name the limit this one takes the place of",
                                n.value
                            ),
                        );
                    } else {
                        replaces.push(n.value.clone());
                    }
                }
                Some(n) => self.error(
                    Some(n.referenced.line()),
                    Some(path),
                    field,
                    "is empty: name the `rate_limit.name` of the limit this one replaces",
                ),
                None => self.error(
                    Some(r.referenced.line()),
                    Some(path),
                    field,
                    "missing: every replaces entry names the `rate_limit.name` of the limit \
                     this one replaces, e.g. `- name: per_user`",
                ),
            }
        }
        if self.errors.len() != before {
            return None;
        }
        Some(DescriptorLimit {
            threshold,
            display: name.clone().unwrap_or_else(|| path.to_string()),
            name,
            replaces,
        })
    }

    /// Reports a key upstream does not know, with the descriptor it is in.
    fn unknown_field(&mut self, raw: &FileRaw, path: &str) {
        let tokens: Vec<&str> = path.split('.').filter(|s| *s != "?").collect();
        if tokens
            .last()
            .is_some_and(|s| s.starts_with("__serde_saphyr"))
        {
            return;
        }
        // Walk the path: `descriptors.<i>.value` per level (`value` is the span wrapper),
        // then a descriptor field, `rate_limit.value.<field>` or
        // `rate_limit.value.replaces.<j>.value.<field>`.
        let mut rest = tokens.as_slice();
        let mut level: &[Spanned<DescriptorRaw>] = raw.descriptors.as_deref().unwrap_or(&[]);
        let mut node: Option<&Spanned<DescriptorRaw>> = None;
        let mut path_text: Option<String> = None;
        let mut end: Option<u64> = None;
        while let ["descriptors", index, "value", tail @ ..] = rest
            && let Ok(i) = index.parse::<usize>()
            && let Some(n) = level.get(i)
        {
            let segment = segment(
                n.value.key.as_ref().map_or("", |k| k.value.as_str()),
                n.value.value.as_ref().map(|v| v.value.as_str()),
            );
            path_text = Some(match path_text {
                Some(p) => format!("{p}/{segment}"),
                None => segment,
            });
            end = level.get(i + 1).map(|n| n.referenced.line()).or(end);
            node = Some(n);
            level = n.value.descriptors.as_deref().unwrap_or(&[]);
            rest = tail;
        }
        let mut from = node.map(|n| n.referenced.line());
        let mut field = String::new();
        if let Some(n) = node
            && let ["rate_limit", "value", tail @ ..] = rest
            && let Some(rl) = &n.value.rate_limit
        {
            from = Some(rl.referenced.line());
            field.push_str("rate_limit");
            rest = tail;
            if let ["replaces", index, "value", tail @ ..] = rest
                && let Ok(j) = index.parse::<usize>()
                && let Some(r) = rl.value.replaces.as_deref().and_then(|r| r.get(j))
            {
                from = Some(r.referenced.line());
                field.push_str(&format!(".replaces[{j}]"));
                rest = tail;
            }
        }
        let name = rest.last().copied().unwrap_or("");
        for segment in rest {
            if !field.is_empty() {
                field.push('.');
            }
            field.push_str(segment);
        }
        let line = find_key_line(self.text, name, from, end)
            .or(from)
            .or(Some(1));
        let hint = if node.is_none() {
            " (this file is read in the envoyproxy/ratelimit format because its top level has \
             `descriptors:`; that format has only `domain` and `descriptors` at the top)"
        } else {
            ""
        };
        self.error(
            line,
            path_text.as_deref(),
            field,
            format!("unknown key `{name}`: remove it or correct its spelling{hint}"),
        );
    }
}

/// The line of `key:` at `line` or the closest line before it (a block mapping's span starts
/// at its first field, the line after its key); `line` itself when there is none nearby.
fn key_line_at_or_before(text: &str, key: &str, line: u64) -> u64 {
    (line.saturating_sub(20).max(1)..=line)
        .rev()
        .find(|&n| find_key_line(text, key, Some(n), Some(n + 1)).is_some())
        .unwrap_or(line)
}

/// A unit as upstream reads it: any case.
fn parse_unit(text: &str) -> Option<Unit> {
    Unit::from_name(text)
}

#[cfg(test)]
mod tests;
