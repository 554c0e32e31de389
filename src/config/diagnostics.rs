//! How a limits problem is told to the operator: [`ConfigError`] (file, line, route, field,
//! and the fix), and the helpers both formats use to find the line a field is written on and
//! to turn a YAML parser's error into one.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::Spanned;

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

pub(crate) fn file_error(file: &Path, message: String) -> ConfigError {
    ConfigError {
        file: file.to_path_buf(),
        line: None,
        route: None,
        field: String::new(),
        message,
    }
}

/// The last plain key of a field path (`rule_items[0].limit_keys` -> `limit_keys`), or `None`
/// when the path ends at an index.
pub(crate) fn last_key(field: &str) -> Option<&str> {
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

/// A lenient view of a file, used only to find which route a parse error is in: unknown
/// fields are ignored here so it still parses when the strict schema does not.
#[derive(Debug, Deserialize)]
pub struct RouteNames {
    #[serde(default)]
    pub routes: Vec<Spanned<RouteName>>,
}

#[derive(Debug, Deserialize)]
pub struct RouteName {
    pub name: Option<String>,
}
