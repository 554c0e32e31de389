//! Server settings: where to listen, which store, bounds on requests, logging.
//!
//! Layers, later wins: built-in defaults, the settings file (`--config`), environment
//! variables, command-line flags. Every setting has an environment variable named after its
//! path: `SLUICE_` + the path joined by `_`, upper-cased (`memory.max_entries` is
//! `SLUICE_MEMORY_MAX_ENTRIES`), derived from the struct itself so a new setting cannot be
//! forgotten.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::limits::{REDACTED, RedisSettings, redact_url};

mod sources;
pub use sources::{LimitsSource, XdsSettings, XdsTlsSettings, parse_pairs};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// gRPC listen address (RLS v3, health, reflection).
    pub grpc_addr: String,
    /// HTTP listen address (metrics, health, config dump, JSON API).
    pub http_addr: String,
    /// A second HTTP listen address serving the same routes, for deployments that scrape
    /// metrics on a port of their own (envoyproxy/ratelimit's `PROMETHEUS_ADDR`; Envoy
    /// Gateway's pod annotations point Prometheus at it).
    pub metrics_addr: Option<String>,
    /// Where the limits come from: the files of `limits_dir`, or an xDS management server
    /// (`xds`).
    pub limits_source: LimitsSource,
    /// Directory of limits files (`*.yaml`), watched for changes (`limits_source: files`).
    pub limits_dir: PathBuf,
    /// The management server the limits are read from (`limits_source: xds`).
    pub xds: XdsSettings,
    /// How often the limits directory is also checked for changes, besides file events and
    /// SIGHUP (a safety net for file systems without events).
    #[serde(with = "humantime_serde")]
    pub limits_poll_interval: Duration,
    /// Where counters live.
    pub backend: Backend,
    /// Log filter, in `tracing` env-filter syntax (`info`, `sluice=debug`).
    pub log: String,
    pub log_format: LogFormat,
    pub memory: MemorySettings,
    pub request: RequestBounds,
    /// Redis connection (used by `backend: redis`).
    pub redis: RedisSettings,
    /// What answers when Redis fails (used by `backend: redis`).
    pub fallback: FallbackSettings,
    /// Counters known to be over, answered without Redis (used by `backend: redis`).
    pub over_limit_cache: OverLimitCacheSettings,
    /// Most requests decided at once; beyond it a request is refused at once with
    /// RESOURCE_EXHAUSTED (HTTP 503) instead of queueing behind the others.
    pub max_in_flight: usize,
    /// Global shadow mode: every descriptor is still counted and reported (metrics decision
    /// `shadow`), but every answer is OK (envoyproxy/ratelimit's `SHADOW_MODE`).
    pub shadow_mode: bool,
    /// gRPC server TLS; off when `cert_file` is not set.
    pub tls: TlsSettings,
    /// How long in-flight requests may take to finish after SIGTERM before the server exits.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            grpc_addr: "0.0.0.0:8081".into(),
            http_addr: "0.0.0.0:8080".into(),
            metrics_addr: None,
            limits_source: LimitsSource::Files,
            limits_dir: PathBuf::from("config/limits"),
            xds: XdsSettings::default(),
            limits_poll_interval: Duration::from_secs(5),
            backend: Backend::Memory,
            log: "info".into(),
            log_format: LogFormat::Text,
            memory: MemorySettings::default(),
            request: RequestBounds::default(),
            redis: RedisSettings::default(),
            fallback: FallbackSettings::default(),
            over_limit_cache: OverLimitCacheSettings::default(),
            shutdown_grace: Duration::from_secs(10),
            max_in_flight: 4096,
            shadow_mode: false,
            tls: TlsSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Memory,
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemorySettings {
    /// Most counters held at once; see `limiter::memory` for what happens at the bound.
    pub max_entries: usize,
    /// How often expired counters are dropped.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
}

impl Default for MemorySettings {
    fn default() -> Self {
        Self {
            max_entries: 1_000_000,
            sweep_interval: Duration::from_secs(10),
        }
    }
}

/// Bounds on the shape of a request: only on what Envoy's own configuration decides (the
/// domain, the number of descriptors and entries, entry keys), never on a value a client of
/// Envoy controls. Envoy lets an errored request through uncounted when `failure_mode_deny`
/// is false (its default), so refusing a long header value would let any client pad its way
/// past a limit; such values are counted, their key component hashed to a fixed length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RequestBounds {
    pub max_descriptors: usize,
    pub max_entries: usize,
    /// Longest domain or entry key, in bytes. Entry values are not bounded here: only the
    /// message bound applies to them. (`max_value_bytes`, its name before values were
    /// exempted, is still read.)
    #[serde(alias = "max_value_bytes")]
    pub max_key_bytes: usize,
    /// Largest encoded gRPC request, in bytes (enforced by the transport). It must hold the
    /// largest headers Envoy forwards (`max_request_headers_kb`, 60 KiB by default) in every
    /// descriptor that carries one: a bigger request is refused by the transport, and Envoy
    /// lets a refused request through.
    pub max_message_bytes: usize,
}

impl Default for RequestBounds {
    fn default() -> Self {
        Self {
            max_descriptors: 64,
            max_entries: 32,
            max_key_bytes: 4096,
            max_message_bytes: 4 << 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FallbackSettings {
    /// Replicas sharing the limits: `local` fallback counting divides each limit by this.
    pub replicas: u32,
    /// Consecutive store failures (errors or timeouts) that open the circuit breaker.
    pub failure_threshold: u32,
    /// While open, how often the store is probed (PING) to close the breaker again.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// Adds `X-Sluice-Fallback: true` to `response_headers_to_add` of answers the fallback
    /// gave, so clients and Envoy's access log can tell them apart.
    pub response_header: bool,
}

impl Default for FallbackSettings {
    fn default() -> Self {
        Self {
            replicas: 1,
            failure_threshold: 3,
            probe_interval: Duration::from_millis(250),
            response_header: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OverLimitCacheSettings {
    /// Most counters remembered; beyond it new over-limit counters are not remembered.
    pub max_entries: usize,
}

impl Default for OverLimitCacheSettings {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain of the gRPC server; setting it turns TLS on.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the gRPC server.
    pub key_file: Option<PathBuf>,
    /// PEM CA bundle: when set, clients must present a certificate signed by it.
    pub client_ca_file: Option<PathBuf>,
}

/// A settings problem, rendered for the operator.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{path}: cannot read settings file: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Parse {
        path: PathBuf,
        line: u64,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Values given on the command line; `None` leaves the lower layers in force.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub grpc_addr: Option<String>,
    pub http_addr: Option<String>,
    pub limits_dir: Option<PathBuf>,
    pub backend: Option<String>,
    pub log: Option<String>,
}

impl Settings {
    /// Builds settings from every layer: defaults < file < environment < flags.
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
        flags: &Overrides,
    ) -> Result<Self, SettingsError> {
        let base = match file {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        let mut tree = serde_json::to_value(&base)
            .map_err(|e| SettingsError::Invalid(format!("cannot represent settings: {e}")))?;
        apply_env(&mut tree, &mut Vec::new(), &env)?;
        let flag_values = [
            ("grpc_addr", flags.grpc_addr.clone()),
            ("http_addr", flags.http_addr.clone()),
            (
                "limits_dir",
                flags.limits_dir.as_ref().map(|p| p.display().to_string()),
            ),
            ("backend", flags.backend.clone()),
            ("log", flags.log.clone()),
        ];
        for (key, value) in flag_values {
            if let (Some(value), Value::Object(map)) = (value, &mut tree) {
                map.insert(key.to_string(), Value::String(value));
            }
        }
        // The path of a bad value names the setting (and so its variable), e.g. a duration
        // written `10 parsecs`.
        let settings: Settings = serde_path_to_error::deserialize(tree).map_err(|e| {
            let path = e.path().to_string();
            SettingsError::Invalid(format!("{path} ({}): {}", env_name(&path), e.into_inner()))
        })?;
        settings.validate()?;
        Ok(settings)
    }

    fn from_file(path: &Path) -> Result<Self, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_saphyr::from_str(&text).map_err(|e| SettingsError::Parse {
            path: path.to_path_buf(),
            line: e.location().map(|l| l.line()).unwrap_or(0),
            message: e
                .to_string()
                .lines()
                .next()
                .unwrap_or("invalid YAML")
                .to_string(),
        })
    }

    fn validate(&self) -> Result<(), SettingsError> {
        for (name, addr) in [
            ("grpc_addr", &self.grpc_addr),
            ("http_addr", &self.http_addr),
        ]
        .into_iter()
        .chain(self.metrics_addr.as_ref().map(|a| ("metrics_addr", a)))
        {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(SettingsError::Invalid(format!(
                    "{name}: \"{addr}\" is not an address: write host:port, e.g. 0.0.0.0:8081"
                )));
            }
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(SettingsError::Invalid(
                "tls: set both cert_file and key_file (or neither to serve without TLS)".into(),
            ));
        }
        if self.tls.client_ca_file.is_some() && self.tls.cert_file.is_none() {
            return Err(SettingsError::Invalid(
                "tls.client_ca_file needs tls.cert_file and tls.key_file: client certificates are verified only over TLS".into(),
            ));
        }
        let mut problems = Vec::new();
        if self.limits_source == LimitsSource::Xds {
            let url = &self.xds.server_url;
            let port_ok = url
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                problems.push(format!(
                    "xds.server_url (SLUICE_XDS_SERVER_URL): \"{url}\" is not host:port: name \
                     the management server, e.g. envoy-gateway.envoy-gateway-system:18001 \
                     (limits_source is xds)"
                ));
            }
            if self.xds.node_id.trim().is_empty() {
                problems.push(
                    "xds.node_id (SLUICE_XDS_NODE_ID): is empty: the management server keys \
                     snapshots by node id; set the one it serves the limits to"
                        .into(),
                );
            }
        }
        for (name, text, separator) in [
            ("xds.node_metadata", &self.xds.node_metadata, '='),
            ("xds.headers", &self.xds.headers, ':'),
        ] {
            if let Err(e) = parse_pairs(text, separator) {
                problems.push(format!("{name} ({}): {e}", env_name(name)));
            }
        }
        if self.xds.tls.cert_file.is_some() != self.xds.tls.key_file.is_some() {
            problems.push(
                "xds.tls: set both cert_file and key_file (or neither, to present no client \
                 certificate)"
                    .into(),
            );
        }
        if self.xds.backoff_initial > self.xds.backoff_max {
            problems.push(format!(
                "xds.backoff_initial ({}) is longer than xds.backoff_max ({}): the first delay \
                 cannot exceed the cap",
                humantime::format_duration(self.xds.backoff_initial),
                humantime::format_duration(self.xds.backoff_max)
            ));
        }
        let mut count = |name: &str, value: u64, min: u64, max: u64| {
            if !(min..=max).contains(&value) {
                problems.push(format!(
                    "{name} ({}): {value} is out of range: allowed {min} to {max}",
                    env_name(name)
                ));
            }
        };
        // Each bound says what the setting can sensibly be on one machine; beyond it a
        // typo (an extra zero, a byte count for a count) would otherwise be taken at its word.
        count("max_in_flight", self.max_in_flight as u64, 1, 1_000_000);
        count(
            "memory.max_entries",
            self.memory.max_entries as u64,
            1,
            1 << 30,
        );
        count(
            "request.max_descriptors",
            self.request.max_descriptors as u64,
            1,
            1024,
        );
        count(
            "request.max_entries",
            self.request.max_entries as u64,
            1,
            1024,
        );
        count(
            "request.max_key_bytes",
            self.request.max_key_bytes as u64,
            16,
            1 << 20,
        );
        count(
            "request.max_message_bytes",
            self.request.max_message_bytes as u64,
            4096,
            256 << 20,
        );
        // fred selects a database with one byte; Redis itself defaults to 16 databases.
        count("redis.database", u64::from(self.redis.database), 0, 255);
        count("redis.pool_size", self.redis.pool_size as u64, 1, 256);
        count(
            "xds.max_message_bytes",
            self.xds.max_message_bytes as u64,
            4096,
            1 << 30,
        );
        count(
            "fallback.replicas",
            u64::from(self.fallback.replicas),
            1,
            100_000,
        );
        count(
            "fallback.failure_threshold",
            u64::from(self.fallback.failure_threshold),
            1,
            1_000_000,
        );
        count(
            "over_limit_cache.max_entries",
            self.over_limit_cache.max_entries as u64,
            1,
            1 << 30,
        );
        let mut span = |name: &str, value: Duration, min: Duration, max: Duration| {
            if !(min..=max).contains(&value) {
                problems.push(format!(
                    "{name} ({}): {} is out of range: allowed {} to {}",
                    env_name(name),
                    humantime::format_duration(value),
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ));
            }
        };
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        span(
            "limits_poll_interval",
            self.limits_poll_interval,
            ms(100),
            secs(3600),
        );
        span(
            "memory.sweep_interval",
            self.memory.sweep_interval,
            ms(100),
            secs(3600),
        );
        span("shutdown_grace", self.shutdown_grace, ms(0), secs(600));
        span(
            "xds.backoff_initial",
            self.xds.backoff_initial,
            ms(10),
            secs(600),
        );
        span("xds.backoff_max", self.xds.backoff_max, ms(10), secs(3600));
        span(
            "xds.connect_timeout",
            self.xds.connect_timeout,
            ms(10),
            secs(300),
        );
        span(
            "redis.connect_timeout",
            self.redis.connect_timeout,
            ms(10),
            secs(60),
        );
        span(
            "redis.command_timeout",
            self.redis.command_timeout,
            ms(1),
            secs(60),
        );
        span(
            "redis.eviction_check_interval",
            self.redis.eviction_check_interval,
            ms(100),
            secs(3600),
        );
        span(
            "fallback.probe_interval",
            self.fallback.probe_interval,
            ms(10),
            secs(60),
        );
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SettingsError::Invalid(problems.join("\n")))
        }
    }

    /// A copy safe to show: passwords replaced, including one inside the Redis URL.
    pub fn redacted(&self) -> Settings {
        let mut shown = self.clone();
        if shown.redis.password.is_some() {
            shown.redis.password = Some(REDACTED.into());
        }
        shown.redis.url = redact_url(&shown.redis.url);
        if !shown.xds.headers.is_empty() {
            // Headers often carry a bearer token.
            shown.xds.headers = REDACTED.into();
        }
        shown
    }
}

/// The environment variable of a setting path (`redis.pool_size` -> `SLUICE_REDIS_POOL_SIZE`).
fn env_name(path: &str) -> String {
    format!("SLUICE_{}", path.replace('.', "_").to_uppercase())
}

/// Replaces every leaf of `tree` whose `SLUICE_<PATH>` variable is set.
fn apply_env(
    tree: &mut Value,
    path: &mut Vec<String>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), SettingsError> {
    match tree {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                path.push(key.clone());
                apply_env(value, path, env)?;
                path.pop();
            }
            Ok(())
        }
        leaf => {
            let name = format!("SLUICE_{}", path.join("_").to_uppercase());
            let Some(raw) = env(&name) else { return Ok(()) };
            *leaf = match leaf {
                Value::Number(_) => raw.trim().parse::<u64>().map(Value::from).map_err(|_| {
                    SettingsError::Invalid(format!("{name}: \"{raw}\" is not a whole number"))
                })?,
                Value::Bool(_) => match raw.trim() {
                    "true" | "1" => Value::Bool(true),
                    "false" | "0" => Value::Bool(false),
                    _ => {
                        return Err(SettingsError::Invalid(format!(
                            "{name}: \"{raw}\" is not true or false"
                        )));
                    }
                },
                _ => Value::String(raw),
            };
            Ok(())
        }
    }
}

pub mod compat;

#[cfg(test)]
mod tests;
