//! envoyproxy/ratelimit's environment, read when sluice stands in for it: started as
//! `ratelimit` (the name its image runs, `/bin/ratelimit`) or with
//! `SLUICE_ENV_COMPAT=envoyproxy-ratelimit`.
//!
//! Deployments made by Envoy Gateway (and Envoy AI Gateway) set that environment and nothing
//! else, so each of its variables is translated into the sluice setting that does the same
//! (`HOST`+`PORT` become `http_addr`, `REDIS_TYPE`+`REDIS_URL` one Redis URL, `CONFIG_TYPE`
//! the limits source, ...) and fed to [`super::Settings::load`] as the `SLUICE_*` variable of
//! that setting, so every value goes through the same checks as sluice's own. A `SLUICE_*`
//! variable that is set as well wins: it is the operator's explicit choice.
//!
//! No variable is silently dropped: each one set is reported once at start, as honoured
//! (and how) or as ignored (and why: statsd, for one, because sluice exports Prometheus).
//! A variable whose meaning sluice cannot keep and whose loss would change answers
//! (memcache, a unix socket, merging domains) is an error naming it. Defaults are theirs
//! where they differ from sluice's (`LOG_LEVEL` warn, Redis as the backend) and are read from
//! `src/settings/settings.go` of envoyproxy/ratelimit.

use std::collections::BTreeMap;

use super::SettingsError;

mod redis;
mod stats;

pub use redis::redis_url;
use redis::{backend, redis};
use stats::{behaviour, grpc_tls, not_applicable, stats};

/// The value of `SLUICE_ENV_COMPAT` that turns this on.
pub const COMPAT_NAME: &str = "envoyproxy-ratelimit";

/// The program name that turns this on (envoyproxy/ratelimit's image runs `/bin/ratelimit`).
pub const PROGRAM_NAME: &str = "ratelimit";

/// What their environment says, in sluice's terms.
#[derive(Debug, Default)]
pub struct Translation {
    /// `SLUICE_*` variable -> value.
    pub env: BTreeMap<String, String>,
    /// (their variable, what sluice does with it), for each one set: logged once at start.
    pub notes: Vec<(String, String)>,
}

impl Translation {
    /// The environment sluice's settings are read from: real `SLUICE_*` variables first,
    /// then the translation.
    pub fn layered<'a>(
        &'a self,
        env: &'a impl Fn(&str) -> Option<String>,
    ) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| env(name).or_else(|| self.env.get(name).cloned())
    }
}

struct Reader<'a, E: Fn(&str) -> Option<String>> {
    env: &'a E,
    out: Translation,
    errors: Vec<String>,
}

impl<E: Fn(&str) -> Option<String>> Reader<'_, E> {
    /// A set, non-empty value (envconfig treats an empty variable as unset too).
    fn get(&self, name: &str) -> Option<String> {
        (self.env)(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    fn set(&mut self, sluice: &str, value: impl Into<String>) {
        self.out.env.insert(sluice.to_string(), value.into());
    }

    fn note(&mut self, name: &str, what: impl Into<String>) {
        self.out.notes.push((name.to_string(), what.into()));
    }

    fn error(&mut self, name: &str, message: impl Into<String>) {
        self.errors.push(format!("{name}: {}", message.into()));
    }

    /// Go's `strconv.ParseBool`, as envconfig reads a bool.
    fn bool(&mut self, name: &str, default: bool) -> bool {
        match self.get(name) {
            None => default,
            Some(v) => match v.as_str() {
                "1" | "t" | "T" | "TRUE" | "true" | "True" => true,
                "0" | "f" | "F" | "FALSE" | "false" | "False" => false,
                _ => {
                    self.error(name, format!("\"{v}\" is not true or false"));
                    default
                }
            },
        }
    }

    /// A Go duration (`10s`, `1m30s`, `500ms`), checked here so the error names their
    /// variable.
    fn duration(&mut self, name: &str) -> Option<String> {
        let v = self.get(name)?;
        match humantime::parse_duration(&v) {
            Ok(_) => Some(v),
            Err(e) => {
                self.error(
                    name,
                    format!("\"{v}\" is not a duration ({e}): write e.g. 10s"),
                );
                None
            }
        }
    }

    fn number(&mut self, name: &str) -> Option<u64> {
        let v = self.get(name)?;
        match v.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                self.error(name, format!("\"{v}\" is not a whole number"));
                None
            }
        }
    }

    /// Reported as ignored, with why, when set.
    fn ignored(&mut self, names: &[&str], why: &str) {
        for name in names {
            if self.get(name).is_some() {
                self.note(name, format!("ignored: {why}"));
            }
        }
    }

    /// A path setting taken as is.
    fn path(&mut self, name: &str, sluice: &str, what: &str) {
        if let Some(v) = self.get(name) {
            self.set(sluice, v);
            self.note(name, format!("honoured: {what}"));
        }
    }
}

/// Reads envoyproxy/ratelimit's variables from `env`. Errors name every variable that
/// cannot be honoured and must not be ignored.
pub fn translate(env: &impl Fn(&str) -> Option<String>) -> Result<Translation, SettingsError> {
    let mut r = Reader {
        env,
        out: Translation::default(),
        errors: Vec::new(),
    };
    listen(&mut r);
    logging(&mut r);
    limits(&mut r);
    xds(&mut r);
    backend(&mut r);
    redis(&mut r);
    stats(&mut r);
    behaviour(&mut r);
    grpc_tls(&mut r);
    not_applicable(&mut r);
    if r.errors.is_empty() {
        Ok(r.out)
    } else {
        Err(SettingsError::Invalid(format!(
            "envoyproxy/ratelimit environment ({PROGRAM_NAME} / SLUICE_ENV_COMPAT={COMPAT_NAME}):\n{}",
            r.errors.join("\n")
        )))
    }
}

fn listen<E: Fn(&str) -> Option<String>>(r: &mut Reader<'_, E>) {
    for (host, port, default_port, sluice) in [
        ("HOST", "PORT", 8080, "SLUICE_HTTP_ADDR"),
        ("GRPC_HOST", "GRPC_PORT", 8081, "SLUICE_GRPC_ADDR"),
    ] {
        let h = r.get(host).unwrap_or_else(|| "0.0.0.0".into());
        let p = r.number(port).unwrap_or(default_port);
        // An IPv6 host needs brackets in host:port.
        let addr = if h.contains(':') && !h.starts_with('[') {
            format!("[{h}]:{p}")
        } else {
            format!("{h}:{p}")
        };
        if r.get(host).is_some() || r.get(port).is_some() {
            for name in [host, port] {
                if r.get(name).is_some() {
                    r.note(name, format!("honoured: listens on {addr}"));
                }
            }
        }
        r.set(sluice, addr);
    }
    if r.get("GRPC_UDS").is_some() {
        r.error(
            "GRPC_UDS",
            "sluice serves gRPC on TCP only: unset it and use GRPC_HOST/GRPC_PORT",
        );
    }
    r.ignored(
        &["DEBUG_HOST", "DEBUG_PORT"],
        "sluice has no debug listener; its /config, /metrics and health are on the HTTP port \
         (PORT)",
    );
    r.ignored(
        &["GRPC_MAX_CONNECTION_AGE", "GRPC_MAX_CONNECTION_AGE_GRACE"],
        "sluice does not close connections by age (Envoy balances over replicas by its own \
         connection pool)",
    );
}

fn logging<E: Fn(&str) -> Option<String>>(r: &mut Reader<'_, E>) {
    let level = match r.get("LOG_LEVEL") {
        None => "warn".to_string(),
        Some(v) => {
            let level = match v.to_ascii_lowercase().as_str() {
                "trace" => "trace",
                "debug" => "debug",
                "info" => "info",
                "warn" | "warning" => "warn",
                "error" | "fatal" | "panic" => "error",
                _ => {
                    r.error(
                        "LOG_LEVEL",
                        format!("\"{v}\" is not a level: use debug, info, warn or error"),
                    );
                    "warn"
                }
            };
            r.note("LOG_LEVEL", format!("honoured: log level {level}"));
            level.to_string()
        }
    };
    r.set("SLUICE_LOG", level);
    if let Some(v) = r.get("LOG_FORMAT") {
        let format = match v.to_ascii_lowercase().as_str() {
            "json" => "json",
            "text" => "text",
            _ => {
                r.error("LOG_FORMAT", format!("\"{v}\" is not text or json"));
                "text"
            }
        };
        r.set("SLUICE_LOG_FORMAT", format);
        r.note("LOG_FORMAT", format!("honoured: {format} logs"));
    }
}

fn limits<E: Fn(&str) -> Option<String>>(r: &mut Reader<'_, E>) {
    let config_type = r.get("CONFIG_TYPE").unwrap_or_else(|| "FILE".into());
    match config_type.to_ascii_uppercase().as_str() {
        "FILE" => r.set("SLUICE_LIMITS_SOURCE", "files"),
        "GRPC_XDS_SOTW" => r.set("SLUICE_LIMITS_SOURCE", "xds"),
        _ => r.error(
            "CONFIG_TYPE",
            format!("\"{config_type}\" is not FILE or GRPC_XDS_SOTW"),
        ),
    }
    if r.get("CONFIG_TYPE").is_some() {
        r.note(
            "CONFIG_TYPE",
            format!("honoured: limits from {}", config_type.to_ascii_uppercase()),
        );
    }
    // Their files live in RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/RUNTIME_APPDIRECTORY.
    let root = r
        .get("RUNTIME_ROOT")
        .unwrap_or_else(|| "/srv/runtime_data/current".into());
    let sub = r.get("RUNTIME_SUBDIRECTORY").unwrap_or_default();
    let app = r
        .get("RUNTIME_APPDIRECTORY")
        .unwrap_or_else(|| "config".into());
    let mut dir = std::path::PathBuf::from(root);
    if !sub.is_empty() {
        dir.push(sub);
    }
    dir.push(app);
    let dir = dir.display().to_string();
    r.set("SLUICE_LIMITS_DIR", dir.clone());
    for name in [
        "RUNTIME_ROOT",
        "RUNTIME_SUBDIRECTORY",
        "RUNTIME_APPDIRECTORY",
    ] {
        if r.get(name).is_some() {
            r.note(
                name,
                format!("honoured: the limits directory is {dir} (read with CONFIG_TYPE=FILE)"),
            );
        }
    }
    r.ignored(
        &["RUNTIME_IGNOREDOTFILES"],
        "sluice always skips dot files in the limits directory",
    );
    r.ignored(
        &["RUNTIME_WATCH_ROOT"],
        "sluice watches the limits directory itself, which also sees a swapped symlink",
    );
    if r.bool("MERGE_DOMAIN_CONFIG", false) {
        r.error(
            "MERGE_DOMAIN_CONFIG",
            "sluice keeps each domain in one file or resource: merge the files of a domain \
             and unset it",
        );
    }
}

fn xds<E: Fn(&str) -> Option<String>>(r: &mut Reader<'_, E>) {
    // Their defaults, which differ from sluice's own.
    let url = r
        .get("CONFIG_GRPC_XDS_SERVER_URL")
        .unwrap_or_else(|| "localhost:18000".into());
    r.set("SLUICE_XDS_SERVER_URL", url);
    let node = r
        .get("CONFIG_GRPC_XDS_NODE_ID")
        .unwrap_or_else(|| "default".into());
    r.set("SLUICE_XDS_NODE_ID", node);
    r.set("SLUICE_XDS_BACKOFF_INITIAL", "10s");
    r.set("SLUICE_XDS_BACKOFF_MAX", "60s");
    for (name, sluice) in [
        ("CONFIG_GRPC_XDS_SERVER_URL", "xDS management server"),
        ("CONFIG_GRPC_XDS_NODE_ID", "xDS node id"),
    ] {
        if r.get(name).is_some() {
            r.note(name, format!("honoured: {sluice}"));
        }
    }
    if let Some(v) = r.get("CONFIG_GRPC_XDS_NODE_METADATA") {
        // Theirs: key=value pairs split on ",", an entry without "=" skipped.
        let kept: Vec<&str> = v.split(',').filter(|e| e.contains('=')).collect();
        r.set("SLUICE_XDS_NODE_METADATA", kept.join(","));
        r.note("CONFIG_GRPC_XDS_NODE_METADATA", "honoured: node metadata");
    }
    if let Some(v) = r.get("CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS") {
        r.set("SLUICE_XDS_HEADERS", v);
        r.note(
            "CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS",
            "honoured: gRPC metadata of the xDS stream",
        );
    }
    let force = r.bool("FORCE_START_WITHOUT_INITIAL_CONFIG", false);
    // Their health fails until a config is loaded with this set, even when forced to start.
    let healthy_needs_config = r.bool("HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED", false);
    r.set(
        "SLUICE_XDS_START_WITHOUT_INITIAL_CONFIG",
        (force && !healthy_needs_config).to_string(),
    );
    if r.get("FORCE_START_WITHOUT_INITIAL_CONFIG").is_some() {
        r.note(
            "FORCE_START_WITHOUT_INITIAL_CONFIG",
            "honoured: sluice always serves at once (every request OK until the first limits); \
             false keeps /healthcheck and /readyz failing until the first limits arrive",
        );
    }
    if r.get("HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED").is_some() {
        r.note(
            "HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED",
            "honoured: true keeps /healthcheck failing until limits are loaded (with files \
             they are loaded before sluice serves)",
        );
    }
    let tls = r.bool("CONFIG_GRPC_XDS_SERVER_USE_TLS", false);
    if tls {
        r.set("SLUICE_XDS_TLS_ENABLED", "true");
        r.note(
            "CONFIG_GRPC_XDS_SERVER_USE_TLS",
            "honoured: TLS to the management server",
        );
        for (name, sluice) in [
            (
                "CONFIG_GRPC_XDS_CLIENT_TLS_CERT",
                "SLUICE_XDS_TLS_CERT_FILE",
            ),
            ("CONFIG_GRPC_XDS_CLIENT_TLS_KEY", "SLUICE_XDS_TLS_KEY_FILE"),
            (
                "CONFIG_GRPC_XDS_SERVER_TLS_CACERT",
                "SLUICE_XDS_TLS_CA_FILE",
            ),
            (
                "CONFIG_GRPC_XDS_SERVER_TLS_SAN",
                "SLUICE_XDS_TLS_SERVER_NAME",
            ),
        ] {
            r.path(name, sluice, "TLS to the management server");
        }
    } else {
        r.ignored(
            &[
                "CONFIG_GRPC_XDS_CLIENT_TLS_CERT",
                "CONFIG_GRPC_XDS_CLIENT_TLS_KEY",
                "CONFIG_GRPC_XDS_SERVER_TLS_CACERT",
                "CONFIG_GRPC_XDS_SERVER_TLS_SAN",
            ],
            "CONFIG_GRPC_XDS_SERVER_USE_TLS is not true (as in envoyproxy/ratelimit)",
        );
    }
    for (name, sluice, what) in [
        (
            "XDS_CLIENT_BACKOFF_INITIAL_INTERVAL",
            "SLUICE_XDS_BACKOFF_INITIAL",
            "first reconnect delay",
        ),
        (
            "XDS_CLIENT_BACKOFF_MAX_INTERVAL",
            "SLUICE_XDS_BACKOFF_MAX",
            "reconnect delay cap",
        ),
    ] {
        if let Some(v) = r.duration(name) {
            r.set(sluice, v);
            r.note(name, format!("honoured: {what}"));
        }
    }
    r.ignored(
        &[
            "XDS_CLIENT_BACKOFF_RANDOM_FACTOR",
            "XDS_CLIENT_BACKOFF_JITTER",
        ],
        "sluice always jitters each reconnect delay to between half and all of it",
    );
    r.ignored(
        &["CONFIG_GRPC_XDS_SERVER_CONNECT_RETRY_INTERVAL"],
        "connection attempts follow the reconnect backoff (XDS_CLIENT_BACKOFF_*)",
    );
    if let Some(n) = r.number("XDS_CLIENT_MAX_MSG_SIZE_IN_BYTES") {
        r.set("SLUICE_XDS_MAX_MESSAGE_BYTES", n.to_string());
        r.note(
            "XDS_CLIENT_MAX_MSG_SIZE_IN_BYTES",
            "honoured: largest discovery response",
        );
    }
}

#[cfg(test)]
mod tests;
