//! sluice's own limits format: validation, inheritance (`defaults`, `parent`) and compiling
//! each route's limits, from [`schema`] (the file as written) into [`crate::limits`] (as
//! served).
//!
//! Inheritance is resolved by walking `parent` links from each route (memoised), so the order
//! of routes in a file does not matter. Unknown fields do not stop the parse (they are
//! collected with their path), so a typo never hides the file's other errors.

mod rules;
pub mod schema;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_saphyr::Spanned;

use super::diagnostics::{ConfigError, find_key_line, last_key, parse_error};
use crate::limits::*;
use schema::*;

/// The `timeout` of a route that sets none: the built-in store budget.
pub const DEFAULT_TIMEOUT: Duration = DEFAULT_STORE_TIMEOUT;

/// Parses and validates one native limits file, reporting every problem it can find:
/// unknown fields do not stop the parse (they are collected with their path), so a typo
/// never hides the file's other errors.
pub fn parse_file(file: &Path, text: &str) -> Result<Domain, Vec<ConfigError>> {
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
            let rules = limits.rules();
            let status_names = rules
                .iter()
                .map(|rule| format!("{name}/{}", rule.name))
                .collect();
            let handles = RouteHandles::new(rules.len());
            routes.insert(
                name.clone(),
                Route {
                    name: name.clone(),
                    parent: route.value.parent.clone(),
                    settings: resolved.settings.clone(),
                    limits,
                    limits_from,
                    status_names,
                    handles,
                },
            );
        }
        Some(Domain {
            name,
            file: self.file.to_path_buf(),
            allow_limit_override: raw.allow_limit_override.unwrap_or(true),
            limits: DomainLimits::Native { route_key, routes },
            handles: DomainHandles::default(),
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
        let max_hold = own
            .max_hold
            .as_deref()
            .and_then(|t| match humantime::parse_duration(t) {
                Ok(d) if d.subsec_nanos() == 0 && (1..=86_400).contains(&d.as_secs()) => Some(d),
                _ => {
                    self.error(
                        at,
                        format!("{prefix}max_hold"),
                        format!(
                            "\"{t}\" is not a hold time: write whole seconds from 1s to 1d, \
                             like `60s` or `5m`"
                        ),
                    );
                    None
                }
            });
        let lease = own.lease.as_ref().and_then(|raw| match raw {
            LeaseRaw::Word(w) if w.eq_ignore_ascii_case("auto") => Some(Lease::Auto),
            LeaseRaw::Word(w) if w.eq_ignore_ascii_case("off") => Some(Lease::Off),
            LeaseRaw::Flag(false) => Some(Lease::Off),
            LeaseRaw::Block(n) if (1..=MAX_LEASE_BLOCK as i64).contains(n) => {
                Some(Lease::Block(*n as u64))
            }
            other => {
                let shown = match other {
                    LeaseRaw::Word(w) => format!("\"{w}\""),
                    LeaseRaw::Block(n) => n.to_string(),
                    LeaseRaw::Flag(b) => b.to_string(),
                };
                self.error(
                    at,
                    format!("{prefix}lease"),
                    format!(
                        "{shown} is not a lease: write `auto` (blocks sized from the traffic), \
                         a block size from 1 to {MAX_LEASE_BLOCK}, or `off`"
                    ),
                );
                None
            }
        });
        let settings = RouteSettings {
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
            quota_mode: pick(own.quota_mode, own_name, base.map(|b| &b.quota_mode), false),
            timeout: pick(timeout, own_name, base.map(|b| &b.timeout), DEFAULT_TIMEOUT),
            fallback: pick(
                own.fallback,
                own_name,
                base.map(|b| &b.fallback),
                FallbackMode::Local,
            ),
            lease: pick(lease, own_name, base.map(|b| &b.lease), Lease::Off),
            max_hold: pick(
                max_hold,
                own_name,
                base.map(|b| &b.max_hold),
                DEFAULT_MAX_HOLD,
            ),
        };
        // Reported where the combination is made: a route inheriting both from a base that
        // was already reported is not reported again.
        if settings.lease.value.is_on()
            && settings.algorithm.value == Algorithm::SlidingWindow
            && (own.lease.is_some() || own.algorithm.is_some())
        {
            self.error(
                at,
                format!("{prefix}lease"),
                format!(
                    "lease: {} (from {}) cannot count a sliding_window (from {}): a block leased \
                     in one window would still weigh in the next. Use fixed_window or \
                     token_bucket with a lease, or set `lease: off`",
                    settings.lease.value, settings.lease.from, settings.algorithm.from
                ),
            );
        }
        settings
    }
}
