//! Reading limits files into a [`LimitSet`]: parsing, validation, inheritance.
//!
//! Every problem becomes a [`ConfigError`] naming the file, the line, the route and the field,
//! with the fix in the message. Loading collects every error of every file rather than
//! stopping at the first, so `sluice check` shows an operator the whole list at once.
//! Inheritance is resolved by walking `parent` links from each route (memoised), so the order
//! of routes in a file does not matter.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use regex::Regex;
use serde_saphyr::Spanned;

use super::model::*;
use super::schema::*;
use crate::limiter::{Algorithm, FallbackMode, Threshold, Unit};
use crate::service::headers::HeaderStyle;

/// One problem in a limits file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<u64>,
    pub route: Option<String>,
    /// The offending field, as a path inside the route (`rule_items[1].limit_keys[0].key`).
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": ")?;
        if let Some(route) = &self.route {
            write!(f, "route \"{route}\": ")?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// All problems found while loading; never empty.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Built-in values of route settings, used when neither the route, its ancestors nor the
/// file's `defaults` set them.
pub const DEFAULT_REJECTED_CODE: u16 = 429;
pub const DEFAULT_REJECTED_MSG: &str = "Too many requests";
pub const DEFAULT_TIMEOUT: Duration = crate::limiter::DEFAULT_STORE_TIMEOUT;

/// Loads every `*.yaml` / `*.yml` file of a directory (not recursive).
pub fn load_dir(dir: &Path) -> Result<LimitSet, ConfigErrors> {
    load_paths(&[dir.to_path_buf()])
}

/// Loads files and directories. Two files with one domain is an error naming both.
pub fn load_paths(paths: &[PathBuf]) -> Result<LimitSet, ConfigErrors> {
    let mut errors = Vec::new();
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            match list_yaml(path) {
                Ok(found) => files.extend(found),
                Err(e) => errors.push(file_error(path, format!("cannot read directory: {e}"))),
            }
        } else {
            files.push(path.clone());
        }
    }
    let mut set = LimitSet::default();
    let mut content = blake3::Hasher::new();
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) => {
                errors.push(file_error(&file, format!("cannot read file: {e}")));
                continue;
            }
        };
        for part in [file.to_string_lossy().as_bytes(), text.as_bytes()] {
            content.update(&(part.len() as u64).to_le_bytes());
            content.update(part);
        }
        match parse_file(&file, &text) {
            Ok(domain) => {
                if let Some(first) = set.domains.get(&domain.name) {
                    errors.push(ConfigError {
                        file: file.clone(),
                        line: find_key_line(&text, "domain", None, None),
                        route: None,
                        field: "domain".into(),
                        message: format!(
                            "domain \"{}\" is already defined in {}; each domain lives in one file, \
                             so merge the two files or rename one domain",
                            domain.name,
                            first.file.display()
                        ),
                    });
                } else {
                    set.domains.insert(domain.name.clone(), domain);
                }
            }
            Err(mut file_errors) => errors.append(&mut file_errors),
        }
    }
    set.content_hash = content.finalize().to_hex().to_string();
    if errors.is_empty() {
        Ok(set)
    } else {
        Err(ConfigErrors(errors))
    }
}

fn list_yaml(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_yaml = path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml");
        // Hidden files are skipped: editors' swap files and Kubernetes' `..data` links.
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if is_yaml && !hidden && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn file_error(file: &Path, message: String) -> ConfigError {
    ConfigError {
        file: file.to_path_buf(),
        line: None,
        route: None,
        field: String::new(),
        message,
    }
}

/// Parses and validates one limits file, reporting every problem it can find: unknown
/// fields do not stop the parse (they are collected with their path), so a typo never hides
/// the file's other errors. A file whose top level has `descriptors:` is in the
/// envoyproxy/ratelimit format and is read by [`super::envoy_compat`]; any other is native.
pub fn parse_file(file: &Path, text: &str) -> Result<Domain, Vec<ConfigError>> {
    if super::envoy_compat::is_envoy_format(text) {
        return super::envoy_compat::parse_file(file, text);
    }
    let mut unknown = Vec::new();
    let parsed: Result<LimitsFile, _> = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_ignored::deserialize(de, |path| unknown.push(path.to_string()))
    });
    let raw = match parsed {
        Ok(raw) => raw,
        Err(e) => return Err(vec![parse_error(file, text, &e)]),
    };
    let route_ends = (0..raw.routes.len())
        .map(|i| raw.routes.get(i + 1).map(|r| r.referenced.line()))
        .collect();
    let mut cx = FileContext {
        file,
        text,
        errors: Vec::new(),
        route_ends,
    };
    for path in &unknown {
        cx.unknown_field(&raw, path);
    }
    let domain = cx.resolve(raw);
    if cx.errors.is_empty() {
        domain.ok_or_else(Vec::new)
    } else {
        Err(cx.errors)
    }
}

/// The last plain key of a field path (`rule_items[0].limit_keys` -> `limit_keys`), or `None`
/// when the path ends at an index.
fn last_key(field: &str) -> Option<&str> {
    let last = field.rsplit('.').next()?;
    (!last.is_empty() && !last.ends_with(']')).then_some(last)
}

/// The first line in `[from, end)` (1-based; the whole file when `from` is `None`, then only
/// at the top level) where `key:` is written, in block or flow style.
pub(crate) fn find_key_line(
    text: &str,
    key: &str,
    from: Option<u64>,
    end: Option<u64>,
) -> Option<u64> {
    let start = from.unwrap_or(1).max(1);
    for (n, line) in text.lines().enumerate() {
        let n = n as u64 + 1;
        if n < start {
            continue;
        }
        if end.is_some_and(|end| n >= end) {
            break;
        }
        let code = line.split(" #").next().unwrap_or(line);
        if from.is_none() && code.starts_with([' ', '\t', '-']) {
            continue;
        }
        let mut search = 0;
        while let Some(pos) = code[search..].find(key) {
            let at = search + pos;
            let before_ok = code[..at]
                .chars()
                .next_back()
                .is_none_or(|c| matches!(c, ' ' | '\t' | '{' | ',' | '-' | '"' | '\''));
            let after = code[at + key.len()..]
                .trim_start_matches(['"', '\''])
                .trim_start();
            if before_ok && after.starts_with(':') {
                return Some(n);
            }
            search = at + key.len();
        }
    }
    None
}

/// Turns a YAML/serde error into a [`ConfigError`], finding the route it is in through a
/// lenient second parse, and adding the fix for the common case of an unknown field.
pub(crate) fn parse_error(file: &Path, text: &str, err: &serde_saphyr::Error) -> ConfigError {
    let line = err.location().map(|l| l.line());
    let full = err.to_string();
    // The first line is serde's message; the rest is a rendering of the source we replace
    // with our own `file:line:` prefix.
    let first = full.lines().next().unwrap_or("invalid YAML").trim();
    // The parser prefixes its own "error: line N column M:"; our prefix already says where.
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let first = match first
        .strip_prefix("line ")
        .and_then(|rest| rest.split_once(": "))
    {
        Some((_, rest)) => rest,
        None => first,
    };
    let mut message = first.to_string();
    let mut field = String::new();
    if let Some(rest) = message.split("unknown field `").nth(1)
        && let Some(name) = rest.split('`').next()
    {
        field = name.to_string();
        message.push_str(" (remove it or correct its spelling)");
    }
    if field.is_empty()
        && let Some(n) = line
        && let Some(text_line) = text.lines().nth(n.saturating_sub(1) as usize)
    {
        let key = text_line
            .trim()
            .trim_start_matches("- ")
            .split(':')
            .next()
            .unwrap_or("")
            .trim();
        if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            field = key.to_string();
        }
    }
    let route = line.and_then(|line| {
        let names: RouteNames = serde_saphyr::from_str(text).ok()?;
        names
            .routes
            .iter()
            .rev()
            .find(|r| r.referenced.line() <= line)
            .and_then(|r| r.value.name.clone())
    });
    ConfigError {
        file: file.to_path_buf(),
        line,
        route,
        field,
        message,
    }
}

struct FileContext<'a> {
    file: &'a Path,
    text: &'a str,
    errors: Vec<ConfigError>,
    /// First line after each route (the next route's first line), by route index.
    route_ends: Vec<Option<u64>>,
}

/// Where a value being validated sits, for error messages: its route, and the lines its
/// YAML node spans (`end` exclusive; `None` is the end of the file). An error about a field
/// points at the line within that span where the field is written.
#[derive(Clone, Copy)]
struct At<'a> {
    route: Option<&'a str>,
    line: Option<u64>,
    end: Option<u64>,
}

/// Resolution state of one route while walking parents.
#[derive(Clone)]
enum Visit {
    Pending,
    InProgress,
    /// `None`: the route has errors (already reported); children do not repeat them.
    Done(Option<Arc<ResolvedRoute>>),
}

struct ResolvedRoute {
    settings: RouteSettings,
    limits: Option<(Arc<RouteLimits>, String)>,
}

impl<'a> FileContext<'a> {
    fn error(&mut self, at: At<'_>, field: impl Into<String>, message: impl Into<String>) {
        let field = field.into();
        let line = last_key(&field)
            .and_then(|key| find_key_line(self.text, key, at.line, at.end))
            .or(at.line);
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            route: at.route.map(str::to_string),
            field,
            message: message.into(),
        });
    }

    /// The span of route `i`.
    fn route_at<'n>(
        &self,
        i: usize,
        routes: &[Spanned<RouteRaw>],
        name: Option<&'n str>,
    ) -> At<'n> {
        At {
            route: name,
            line: routes.get(i).map(|r| r.referenced.line()),
            end: self.route_ends.get(i).copied().flatten(),
        }
    }

    /// Reports a field serde did not know (a typo), with its path inside the route.
    fn unknown_field(&mut self, raw: &LimitsFile, path: &str) {
        let segments: Vec<&str> = path
            .split('.')
            .filter(|s| *s != "?" && *s != "value")
            .collect();
        if segments
            .last()
            .is_some_and(|s| s.starts_with("__serde_saphyr"))
        {
            return;
        }
        let mut at = At {
            route: None,
            line: None,
            end: None,
        };
        let mut field = String::new();
        let mut rest = segments.as_slice();
        if let ["routes", index, tail @ ..] = rest
            && let Ok(i) = index.parse::<usize>()
            && let Some(route) = raw.routes.get(i)
        {
            at = self.route_at(i, &raw.routes, route.value.name.as_deref());
            rest = tail;
            if let ["rule_items", index, tail @ ..] = rest
                && let Ok(j) = index.parse::<usize>()
                && let Some(items) = &route.value.rule_items
                && let Some(item) = items.get(j)
            {
                at.line = Some(item.referenced.line());
                at.end = items.get(j + 1).map(|n| n.referenced.line()).or(at.end);
                field = format!("rule_items[{j}]");
                rest = tail;
                if let ["limit_keys", index, tail @ ..] = rest
                    && let Ok(k) = index.parse::<usize>()
                    && let Some(keys) = &item.value.limit_keys
                    && let Some(key) = keys.get(k)
                {
                    at.line = Some(key.referenced.line());
                    at.end = keys.get(k + 1).map(|n| n.referenced.line()).or(at.end);
                    field.push_str(&format!(".limit_keys[{k}]"));
                    rest = tail;
                }
            }
        } else if let ["defaults", ..] = rest {
            at.line = find_key_line(self.text, "defaults", None, None);
            at.end = raw.routes.first().map(|r| r.referenced.line());
        }
        for segment in rest {
            if segment.parse::<usize>().is_ok() {
                field.push_str(&format!("[{segment}]"));
            } else {
                if !field.is_empty() {
                    field.push('.');
                }
                field.push_str(segment);
            }
        }
        let name = rest.last().copied().unwrap_or("");
        self.error(
            at,
            field,
            format!("unknown field `{name}`: remove it or correct its spelling"),
        );
    }

    fn resolve(&mut self, raw: LimitsFile) -> Option<Domain> {
        let top = At {
            route: None,
            line: None,
            end: None,
        };
        let name = match raw.domain.as_deref().map(str::trim) {
            Some(name) if !name.is_empty() => name.to_string(),
            _ => {
                self.error(
                    top,
                    "domain",
                    "missing: name the Envoy rate limit domain, e.g. `domain: edge`",
                );
                String::new()
            }
        };
        let route_key = raw.route_key.unwrap_or_else(|| "route".to_string());
        if route_key.is_empty() {
            self.error(
                top,
                "route_key",
                "must not be empty (the default is `route`)",
            );
        }
        let defaults_at = At {
            route: None,
            line: find_key_line(self.text, "defaults", None, None),
            end: raw.routes.first().map(|r| r.referenced.line()),
        };
        let defaults =
            self.settings_layer(&raw.defaults, "defaults", None, defaults_at, "defaults.");

        // Index routes by name; duplicates and nameless routes are reported here.
        let mut index: HashMap<String, usize> = HashMap::new();
        for (i, route) in raw.routes.iter().enumerate() {
            let at = self.route_at(i, &raw.routes, route.value.name.as_deref());
            match route.value.name.as_deref() {
                None | Some("") => self.error(
                    At { route: None, ..at },
                    format!("routes[{i}].name"),
                    "missing: every route needs a name, the value of the descriptor entry \
                     that selects it",
                ),
                Some(n) => {
                    if index.insert(n.to_string(), i).is_some() {
                        self.error(
                            at,
                            "name",
                            "duplicate route name: each route name may appear once per domain; \
                             rename one of them",
                        );
                    }
                }
            }
        }

        let mut visits = vec![Visit::Pending; raw.routes.len()];
        let mut routes = HashMap::new();
        // File order, so errors come out in the order a reader meets them.
        for (i, route) in raw.routes.iter().enumerate() {
            let Some(name) = route.value.name.as_ref() else {
                continue;
            };
            if index.get(name) != Some(&i) {
                continue;
            }
            let resolved = self.resolve_route(
                i,
                &raw.routes,
                &index,
                &defaults,
                &mut visits,
                &mut Vec::new(),
            );
            let at = self.route_at(i, &raw.routes, Some(name));
            let Some(resolved) = resolved else { continue };
            let Some((limits, limits_from)) = resolved.limits.clone() else {
                self.error(
                    at,
                    "global_threshold",
                    "the route has no limits: set either global_threshold or rule_items, or a \
                     parent that has them",
                );
                continue;
            };
            self.check_algorithm(at, &resolved.settings, &limits);
            routes.insert(
                name.clone(),
                Route {
                    name: name.clone(),
                    parent: route.value.parent.clone(),
                    settings: resolved.settings.clone(),
                    limits,
                    limits_from,
                },
            );
        }
        Some(Domain {
            name,
            file: self.file.to_path_buf(),
            route_key,
            allow_limit_override: raw.allow_limit_override.unwrap_or(true),
            routes,
            compat: None,
        })
    }

    /// Resolves route `i`, its ancestors first. Returns `None` when it (or an ancestor) has
    /// errors, which are reported once, where they are.
    fn resolve_route(
        &mut self,
        i: usize,
        routes: &[Spanned<RouteRaw>],
        index: &HashMap<String, usize>,
        defaults: &RouteSettings,
        visits: &mut Vec<Visit>,
        chain: &mut Vec<String>,
    ) -> Option<Arc<ResolvedRoute>> {
        let route = &routes[i];
        let name = route.value.name.clone().unwrap_or_default();
        match &visits[i] {
            Visit::Done(done) => return done.clone(),
            Visit::InProgress => {
                chain.push(name.clone());
                let start = chain.iter().position(|n| *n == name).unwrap_or(0);
                let cycle = chain[start..].join(" -> ");
                let at = self.route_at(i, routes, Some(&name));
                self.error(
                    at,
                    "parent",
                    format!("parent cycle {cycle}: a route cannot inherit from itself; remove one parent link"),
                );
                chain.pop();
                visits[i] = Visit::Done(None);
                return None;
            }
            Visit::Pending => {}
        }
        visits[i] = Visit::InProgress;
        chain.push(name.clone());
        let at = self.route_at(i, routes, Some(&name));

        let parent = match route.value.parent.as_deref() {
            None => Ok(None),
            Some(p) => match index.get(p) {
                Some(&pi) => match self.resolve_route(pi, routes, index, defaults, visits, chain) {
                    Some(resolved) => Ok(Some((p, resolved))),
                    None => Err(()),
                },
                None => {
                    self.error(
                        at,
                        "parent",
                        format!(
                            "unknown parent route \"{p}\": define a route named \"{p}\" in this \
                             file, or remove `parent`"
                        ),
                    );
                    Err(())
                }
            },
        };
        chain.pop();
        // A cycle found deeper may already have settled this route.
        if let Visit::Done(done) = &visits[i] {
            return done.clone();
        }
        let errors_before = self.errors.len();
        let own = route.value.settings();
        let base = match &parent {
            Ok(Some((_, p))) => &p.settings,
            _ => defaults,
        };
        let settings = self.settings_layer(&own, &name, Some(base), at, "");

        let own_limits = self.own_limits(&route.value, at);
        let limits = match (own_limits, &parent) {
            (Some(limits), _) => Some((Arc::new(limits), name.clone())),
            (None, Ok(Some((_, p)))) => p.limits.clone(),
            (None, _) => None,
        };
        let ok = parent.is_ok() && self.errors.len() == errors_before;
        let result = ok.then(|| Arc::new(ResolvedRoute { settings, limits }));
        visits[i] = Visit::Done(result.clone());
        result
    }

    /// Builds effective settings: `own` values where set, else `base` (the parent's effective
    /// settings or the file's defaults), else built-ins.
    fn settings_layer(
        &mut self,
        own: &SettingsRaw,
        own_name: &str,
        base: Option<&RouteSettings>,
        at: At<'_>,
        prefix: &str,
    ) -> RouteSettings {
        fn pick<T: Clone>(
            own: Option<T>,
            own_name: &str,
            base: Option<&Setting<T>>,
            builtin: T,
        ) -> Setting<T> {
            match (own, base) {
                (Some(value), _) => Setting {
                    value,
                    from: own_name.to_string(),
                },
                (None, Some(base)) => base.clone(),
                (None, None) => Setting {
                    value: builtin,
                    from: "builtin".to_string(),
                },
            }
        }
        if let Some(code) = own.rejected_code
            && !(100..=599).contains(&code)
        {
            self.error(
                at,
                format!("{prefix}rejected_code"),
                format!("{code} is not an HTTP status: use a code from 100 to 599, e.g. 429"),
            );
        }
        let timeout = own
            .timeout
            .as_deref()
            .and_then(|t| match humantime::parse_duration(t) {
                Ok(d) if !d.is_zero() => Some(d),
                _ => {
                    self.error(
                        at,
                        format!("{prefix}timeout"),
                        format!("\"{t}\" is not a duration: write it like `50ms` or `1s`"),
                    );
                    None
                }
            });
        RouteSettings {
            algorithm: pick(
                own.algorithm,
                own_name,
                base.map(|b| &b.algorithm),
                Algorithm::FixedWindow,
            ),
            show_limit_quota_header: pick(
                own.show_limit_quota_header,
                own_name,
                base.map(|b| &b.show_limit_quota_header),
                false,
            ),
            rate_limit_headers: pick(
                own.rate_limit_headers,
                own_name,
                base.map(|b| &b.rate_limit_headers),
                HeaderStyle::None,
            ),
            rejected_code: pick(
                own.rejected_code,
                own_name,
                base.map(|b| &b.rejected_code),
                DEFAULT_REJECTED_CODE,
            ),
            rejected_msg: pick(
                own.rejected_msg.clone(),
                own_name,
                base.map(|b| &b.rejected_msg),
                DEFAULT_REJECTED_MSG.to_string(),
            ),
            shadow_mode: pick(
                own.shadow_mode,
                own_name,
                base.map(|b| &b.shadow_mode),
                false,
            ),
            timeout: pick(timeout, own_name, base.map(|b| &b.timeout), DEFAULT_TIMEOUT),
            fallback: pick(
                own.fallback,
                own_name,
                base.map(|b| &b.fallback),
                FallbackMode::Local,
            ),
        }
    }

    /// The limits the route sets itself, if any (errors reported, `None` returned on error).
    fn own_limits(&mut self, route: &RouteRaw, at: At<'_>) -> Option<RouteLimits> {
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
                let threshold = self.threshold(threshold, at, "global_threshold")?;
                Some(RouteLimits::Global(Rule {
                    id: rule_id(&["global"], threshold.period_ms()),
                    name: "global".to_string(),
                    threshold,
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
                (self.errors.len() == before).then_some(RouteLimits::Items(compiled))
            }
            (None, None) => None,
        }
    }

    fn threshold(&mut self, raw: &ThresholdRaw, at: At<'_>, field: &str) -> Option<Threshold> {
        let set: Vec<(&str, u64, Unit)> = [
            ("query_per_second", raw.query_per_second, Unit::Second),
            ("query_per_minute", raw.query_per_minute, Unit::Minute),
            ("query_per_hour", raw.query_per_hour, Unit::Hour),
            ("query_per_day", raw.query_per_day, Unit::Day),
        ]
        .into_iter()
        .filter_map(|(name, v, unit)| v.map(|v| (name, v, unit)))
        .collect();
        let (limit, unit) = match set.as_slice() {
            [] => {
                self.error(
                    at,
                    field,
                    "no rate: set one of query_per_second, query_per_minute, query_per_hour, \
                     query_per_day",
                );
                return None;
            }
            [(_, limit, unit)] => (*limit, *unit),
            [first, second, ..] => {
                self.error(
                    at,
                    field,
                    format!(
                        "sets both {} and {}: a threshold names exactly one query_per_* field; \
                         keep one (use two rule items for two rates)",
                        first.0, second.0
                    ),
                );
                return None;
            }
        };
        if limit > u64::from(u32::MAX) {
            self.error(
                at,
                field,
                format!(
                    "{limit} is larger than Envoy can carry (at most {})",
                    u32::MAX
                ),
            );
            return None;
        }
        if raw.burst == Some(0) {
            self.error(
                at,
                format!("{field}.burst"),
                "must be at least 1 (or left out to mean the limit)",
            );
            return None;
        }
        Some(Threshold {
            limit,
            unit,
            multiplier: 1,
            burst: raw.burst,
        })
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
        (self.errors.len() == before).then(|| RuleItem { kind, entry, keys })
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
        let threshold = self.threshold(&raw.threshold(), at, field)?;
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
            },
        })
    }

    /// `burst` only makes sense for a token bucket.
    fn check_algorithm(&mut self, at: At<'_>, settings: &RouteSettings, limits: &RouteLimits) {
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
