//! Reading a set of limits files into a [`LimitSet`]: listing the directory, telling each
//! file's format, rejecting two files of one domain, hashing the content.
//!
//! Every problem becomes a [`ConfigError`] naming the file, the line, the route and the field,
//! with the fix in the message. Loading collects every error of every file rather than
//! stopping at the first, so `sluice check` shows an operator the whole list at once.

use std::path::{Path, PathBuf};

use super::diagnostics::{ConfigError, ConfigErrors, file_error, find_key_line};
use crate::limits::{Domain, LimitSet};

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
                let line = find_key_line(&text, "domain", None, None);
                if let Err(e) = add_domain(&mut set, domain, line) {
                    errors.push(e);
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

/// Adds a domain to a set being built; a second source (file or xDS resource) of one domain
/// is an error naming both, at `line` of the second when it has lines.
pub(crate) fn add_domain(
    set: &mut LimitSet,
    domain: Domain,
    line: Option<u64>,
) -> Result<(), ConfigError> {
    if let Some(first) = set.domains.get(&domain.name) {
        return Err(ConfigError {
            file: domain.file.clone(),
            line,
            route: None,
            field: "domain".into(),
            message: format!(
                "domain \"{}\" is already defined in {}; each domain lives in one file (or one \
                 xDS resource), so merge the two or rename one domain",
                domain.name,
                first.file.display()
            ),
        });
    }
    set.domains.insert(domain.name.clone(), domain);
    Ok(())
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

/// Parses and validates one limits file, reporting every problem it can find. A file whose
/// top level has `descriptors:` is in the envoyproxy/ratelimit format; any other is native.
pub fn parse_file(file: &Path, text: &str) -> Result<Domain, Vec<ConfigError>> {
    if super::envoy::is_envoy_format(text) {
        super::envoy::parse_file(file, text)
    } else {
        super::native::parse_file(file, text)
    }
}
