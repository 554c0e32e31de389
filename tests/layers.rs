//! The layers of `src/` only look down, and no file grows past what a reader can hold.
//!
//! Read from the source itself: every `crate::<module>` (and `sluice::<module>` in the
//! binaries) outside comments names the layer a file depends on. The allowed arrows:
//!
//! - `limits` imports nothing of sluice: it is the vocabulary under everything.
//! - `config` reads files (and `RateLimitConfig` messages pushed over xDS, hence the protos)
//!   into `limits`; `matcher` reads `limits` and Envoy's protos;
//!   `limiter` counts with `limits` thresholds.
//! - `clock`, `metrics` and `proto` are leaves any layer but `limits` may use (a clock to
//!   read, handles to record into, the wire types).
//! - Only the service layer, the server wiring, `check` and the binaries see everything, and
//!   nothing else imports `service`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Files may hold at most this many lines (unit tests in their own files don't count).
const MAX_LINES: usize = 600;

/// The top-level module a file of `src/` belongs to (`src/config/native/mod.rs` -> `config`,
/// `src/metrics.rs` -> `metrics`, `src/bin/...` -> `bin`).
fn layer_of(relative: &Path) -> String {
    let first = relative
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_default();
    first.trim_end_matches(".rs").to_string()
}

/// What `layer` may import from sluice; `None` means anything.
fn allowed(layer: &str) -> Option<&'static [&'static str]> {
    match layer {
        "limits" | "clock" | "metrics" | "proto" => Some(&[]),
        "config" => Some(&["limits", "clock", "metrics", "proto"]),
        "matcher" => Some(&["limits", "proto"]),
        // Envoy configuration printed from the limits (`sluice envoy ...`).
        "envoy_snippets" => Some(&["limits"]),
        "limiter" => Some(&["limits", "metrics", "clock"]),
        "service" => Some(&[
            "limits", "config", "matcher", "limiter", "metrics", "clock", "proto",
        ]),
        // The wiring and the command line.
        "server" | "check" | "main" | "bin" | "lib" => None,
        _ => Some(&[]),
    }
}

/// The sluice modules a source text refers to, outside comments.
fn references(text: &str, in_binary: bool) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let code = match code.find("//") {
            Some(i) if !code[..i].contains('"') => &code[..i],
            _ => code,
        };
        let prefixes: &[&str] = if in_binary {
            &["crate::", "sluice::"]
        } else {
            &["crate::"]
        };
        for prefix in prefixes {
            let mut rest = code;
            while let Some(i) = rest.find(prefix) {
                let before = rest[..i].chars().last();
                rest = &rest[i + prefix.len()..];
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    continue;
                }
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        }
    }
    found
}

/// Every violation of the arrows in one file.
fn violations(relative: &Path, text: &str) -> Vec<String> {
    let layer = layer_of(relative);
    let in_binary = layer == "bin" || layer == "main";
    let mut out = Vec::new();
    for target in references(text, in_binary) {
        if target == layer {
            continue;
        }
        if target == "service" && !matches!(layer.as_str(), "server" | "main" | "bin" | "lib") {
            out.push(format!(
                "{}: imports `service` (only the wiring and the binary may)",
                relative.display()
            ));
            continue;
        }
        if let Some(ok) = allowed(&layer)
            && !ok.contains(&target.as_str())
        {
            out.push(format!(
                "{}: layer `{layer}` imports `{target}`; it may import only {ok:?}",
                relative.display()
            ));
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn sources() -> Vec<(PathBuf, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(files.len() > 20, "src/ should hold the crate: {files:?}");
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("read source");
            let relative = path.strip_prefix(&src).expect("under src").to_path_buf();
            (relative, text)
        })
        .collect()
}

#[test]
fn layers_only_import_downwards() {
    let mut all = Vec::new();
    for (relative, text) in sources() {
        all.extend(violations(&relative, &text));
    }
    assert!(all.is_empty(), "upward imports:\n{}", all.join("\n"));
}

#[test]
fn the_check_catches_an_upward_import() {
    let upward = "use crate::service::RateLimiter;\nuse crate::limits::Threshold;\n";
    assert_eq!(violations(Path::new("config/reload.rs"), upward).len(), 1);
    let sideways = "use crate::matcher::push_component;\n";
    assert_eq!(violations(Path::new("limiter/redis.rs"), sideways).len(), 1);
    let anything = "use crate::config::Settings;\n";
    assert_eq!(violations(Path::new("limits/set.rs"), anything).len(), 1);
    // Comments and other crates' paths are not imports.
    let harmless = "// see crate::service\nuse tonic::transport::Server; // crate::server\n";
    assert!(violations(Path::new("limits/set.rs"), harmless).is_empty());
    assert!(violations(Path::new("service/mod.rs"), upward).is_empty());
}

#[test]
fn no_source_file_is_longer_than_the_bound() {
    let long: Vec<String> = sources()
        .into_iter()
        .map(|(relative, text)| (relative, text.lines().count()))
        .filter(|(_, lines)| *lines > MAX_LINES)
        .map(|(relative, lines)| format!("{}: {lines} lines", relative.display()))
        .collect();
    assert!(
        long.is_empty(),
        "files over {MAX_LINES} lines: split them by concept:\n{}",
        long.join("\n")
    );
}

#[test]
fn every_module_opens_by_saying_what_it_owns() {
    let silent: Vec<String> = sources()
        .into_iter()
        .filter(|(relative, _)| !relative.ends_with("main.rs"))
        .filter(|(_, text)| !text.trim_start().starts_with("//!"))
        .map(|(relative, _)| relative.display().to_string())
        .collect();
    assert!(silent.is_empty(), "no module doc comment: {silent:?}");
}

#[test]
fn the_code_never_points_at_a_document_outside_the_repository() {
    let citing: Vec<String> = sources()
        .into_iter()
        .filter(|(_, text)| text.contains("DESIGN"))
        .map(|(relative, _)| relative.display().to_string())
        .collect();
    assert!(citing.is_empty(), "files citing DESIGN: {citing:?}");
}
