//! `sluice check`: validates limits files and renders the result for a person.
//!
//! Kept apart from `main.rs` so tests can call it and read its output.

use std::io::Write;
use std::path::PathBuf;

use crate::config::load_paths;
use crate::limits::{DomainLimits, RouteLimits};

/// Validates `paths` (files or directories), writes every error or a one-line summary per
/// domain to `out` (naming the file's format: native `sluice` or `envoyproxy/ratelimit`), and
/// returns whether everything was valid.
pub fn check(paths: &[PathBuf], out: &mut dyn Write) -> std::io::Result<bool> {
    match load_paths(paths) {
        Ok(set) => {
            let mut domains: Vec<_> = set.domains.values().collect();
            domains.sort_by(|a, b| a.name.cmp(&b.name));
            for d in &domains {
                let counts = match &d.limits {
                    DomainLimits::Descriptors(tree) => {
                        let nodes = tree.nodes();
                        let limits = nodes.iter().filter(|n| n.limit.is_some()).count();
                        format!("{} descriptors, {limits} limits", nodes.len())
                    }
                    DomainLimits::Native { routes, .. } => {
                        let rules: usize = routes
                            .values()
                            .map(|r| match r.limits.as_ref() {
                                RouteLimits::Global(_) => 1,
                                RouteLimits::Items(items) => {
                                    items.iter().map(|i| i.keys.len()).sum()
                                }
                            })
                            .sum();
                        format!("{} routes, {rules} rules", routes.len())
                    }
                };
                writeln!(
                    out,
                    "ok: domain \"{}\" ({}): {} format, {counts}",
                    d.name,
                    d.file.display(),
                    d.format(),
                )?;
            }
            if domains.is_empty() {
                writeln!(out, "ok: no limits files found")?;
            }
            Ok(true)
        }
        Err(errors) => {
            for e in &errors.0 {
                writeln!(out, "error: {e}")?;
            }
            writeln!(out, "{} error(s)", errors.0.len())?;
            Ok(false)
        }
    }
}
