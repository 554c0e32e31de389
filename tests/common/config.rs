//! Limits files for the configuration tests: written to a temporary directory, loaded the way
//! the server loads them, with line numbers found in the text and each `ConfigError` checked
//! field by field.
//!
//! An error is compared part by part (file, line, route, field, and that its rendering names
//! each) and every mismatch is reported at once, because a configuration error is only useful
//! to an operator if all of it is right.

use std::path::{Path, PathBuf};

use sluice::config::{ConfigError, Domain, LimitSet, Route, RouteLimits, Rule, load_paths};
use tempfile::TempDir;

/// A temporary directory of limits files.
pub struct Files {
    pub dir: TempDir,
}

impl Files {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("create a temporary directory"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `text` to `name` in the directory and returns the file's path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write a limits file");
        path
    }
}

/// Loads `text` as the only limits file `limits.yaml` and returns its path and the errors.
/// Panics when it loads.
pub fn errors_of(text: &str) -> (PathBuf, Vec<ConfigError>) {
    let files = Files::new();
    let path = files.write("limits.yaml", text);
    match load_paths(std::slice::from_ref(&path)) {
        Ok(set) => panic!(
            "expected load errors, but the file loaded ({} domain(s)):\n{text}",
            set.domains.len()
        ),
        Err(errors) => (path, errors.0),
    }
}

/// Loads `text` as the only limits file and returns its one domain. Panics on errors.
pub fn domain_of(text: &str) -> Domain {
    let files = Files::new();
    let path = files.write("limits.yaml", text);
    let set = load_ok(&[path]);
    let mut domains: Vec<Domain> = set.domains.into_values().collect();
    assert_eq!(domains.len(), 1, "expected one domain");
    domains.pop().unwrap()
}

/// `load_paths`, panicking with every error rendered when it fails.
pub fn load_ok(paths: &[PathBuf]) -> LimitSet {
    match load_paths(paths) {
        Ok(set) => set,
        Err(errors) => panic!("expected the limits to load, got:\n{errors}"),
    }
}

/// The 1-based line of the only line of `text` containing `needle`.
pub fn line_of(text: &str, needle: &str) -> u64 {
    let lines: Vec<u64> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i as u64 + 1)
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "test bug: {needle:?} must appear on exactly one line, found on {lines:?}"
    );
    lines[0]
}

/// The 1-based line of the `n`th (0-based) line of `text` containing `needle`.
pub fn line_of_nth(text: &str, needle: &str, n: usize) -> u64 {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i as u64 + 1)
        .nth(n)
        .unwrap_or_else(|| panic!("test bug: fewer than {} lines contain {needle:?}", n + 1))
}

pub fn render(errors: &[ConfigError]) -> String {
    if errors.is_empty() {
        return "  (no errors)".into();
    }
    errors
        .iter()
        .map(|e| format!("  {e}\n    {e:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The only error; panics listing them all when there are more or none.
pub fn single(errors: &[ConfigError]) -> &ConfigError {
    assert_eq!(
        errors.len(),
        1,
        "expected exactly one error, got {}:\n{}",
        errors.len(),
        render(errors)
    );
    &errors[0]
}

/// The error about `field` of `route`; panics listing every error when there is none.
pub fn find<'a>(errors: &'a [ConfigError], route: Option<&str>, field: &str) -> &'a ConfigError {
    errors
        .iter()
        .find(|e| e.route.as_deref() == route && e.field == field)
        .unwrap_or_else(|| {
            panic!(
                "no error for route {route:?}, field {field:?}; got:\n{}",
                render(errors)
            )
        })
}

/// What one error should say.
pub struct Expect<'a> {
    pub file: &'a Path,
    pub line: u64,
    pub route: Option<&'a str>,
    pub field: &'a str,
}

/// Checks every part of `err` and its rendering, reporting all mismatches at once.
pub fn assert_error(err: &ConfigError, expect: Expect<'_>) {
    let mut wrong = Vec::new();
    if err.file != expect.file {
        wrong.push(format!(
            "file: expected {}, got {}",
            expect.file.display(),
            err.file.display()
        ));
    }
    if err.line != Some(expect.line) {
        wrong.push(format!(
            "line: expected Some({}), got {:?}",
            expect.line, err.line
        ));
    }
    if err.route.as_deref() != expect.route {
        wrong.push(format!(
            "route: expected {:?}, got {:?}",
            expect.route, err.route
        ));
    }
    if err.field != expect.field {
        wrong.push(format!(
            "field: expected {:?}, got {:?}",
            expect.field, err.field
        ));
    }
    let shown = err.to_string();
    let file = expect.file.display().to_string();
    if !shown.contains(&file) {
        wrong.push(format!("display does not name the file {file}"));
    }
    if let Some(route) = expect.route
        && !shown.contains(&format!("\"{route}\""))
    {
        wrong.push(format!("display does not name the route \"{route}\""));
    }
    if !expect.field.is_empty() && !shown.contains(expect.field) {
        wrong.push(format!("display does not name the field {}", expect.field));
    }
    if !err.message.is_empty() && !shown.contains(&err.message) {
        wrong.push("display does not include the message".to_string());
    }
    assert!(
        wrong.is_empty(),
        "error differs from expected:\n  - {}\ndisplayed as: {shown}\n{err:?}",
        wrong.join("\n  - ")
    );
}

/// The route named `name`, panicking when the domain has none.
pub fn route<'a>(domain: &'a Domain, name: &str) -> &'a Route {
    domain.routes().get(name).unwrap_or_else(|| {
        let mut names: Vec<_> = domain.routes().keys().collect();
        names.sort();
        panic!("no route {name:?}; routes are {names:?}")
    })
}

/// Every rule of a route, in order: the global threshold, or each key of each item.
pub fn rules(route: &Route) -> Vec<&Rule> {
    match route.limits.as_ref() {
        RouteLimits::Global(rule) => vec![rule],
        RouteLimits::Items(items) => items
            .iter()
            .flat_map(|i| i.keys.iter().map(|k| &k.rule))
            .collect(),
    }
}

/// The rule of `route` shown as `name`.
pub fn rule<'a>(route: &'a Route, name: &str) -> &'a Rule {
    let all = rules(route);
    let names: Vec<&str> = all.iter().map(|r| r.name.as_str()).collect();
    all.iter()
        .find(|r| r.name == name)
        .copied()
        .unwrap_or_else(|| {
            panic!(
                "route {:?} has no rule {name:?}; rules: {names:?}",
                route.name
            )
        })
}

/// The 1-based line of the only line of `text` equal to `whole` (for needles that are a
/// prefix of other lines).
pub fn line_equal(text: &str, whole: &str) -> u64 {
    let lines: Vec<u64> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| *l == whole)
        .map(|(i, _)| i as u64 + 1)
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "test bug: {whole:?} must be exactly one line, found {lines:?}"
    );
    lines[0]
}
