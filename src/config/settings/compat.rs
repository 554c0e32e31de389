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

fn backend<E: Fn(&str) -> Option<String>>(r: &mut Reader<'_, E>) {
    let backend = r.get("BACKEND_TYPE").unwrap_or_else(|| "redis".into());
    match backend.to_ascii_lowercase().as_str() {
        "redis" => r.set("SLUICE_BACKEND", "redis"),
        "memcache" => r.error(
            "BACKEND_TYPE",
            "memcache is not supported: sluice counts in Redis (or in memory, with \
             SLUICE_BACKEND=memory)",
        ),
        _ => r.error("BACKEND_TYPE", format!("\"{backend}\" is not redis")),
    }
    if r.get("BACKEND_TYPE").is_some() {
        r.note("BACKEND_TYPE", format!("honoured: {backend}"));
    }
    r.ignored(
        &[
            "MEMCACHE_HOST_PORT",
            "MEMCACHE_MAX_IDLE_CONNS",
            "MEMCACHE_SRV",
            "MEMCACHE_SRV_REFRESH",
            "MEMCACHE_TLS",
            "MEMCACHE_TLS_CLIENT_CERT",
            "MEMCACHE_TLS_CLIENT_KEY",
            "MEMCACHE_TLS_CACERT",
            "MEMCACHE_TLS_SKIP_HOSTNAME_VERIFICATION",
        ],
        "memcache is not supported",
    );
}

/// `REDIS_TYPE` + `REDIS_URL` (their forms) as one URL of sluice's Redis client.
pub fn redis_url(kind: &str, url: &str, tls: bool) -> Result<String, String> {
    let scheme = if tls { "rediss" } else { "redis" };
    let parts: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let host_port = |p: &str| -> Result<(), String> {
        match p.rsplit_once(':') {
            Some((h, port)) if !h.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
            _ => Err(format!("\"{p}\" is not host:port")),
        }
    };
    let nodes = |list: &[&str]| -> Result<String, String> {
        for p in list {
            host_port(p)?;
        }
        Ok(list[1..]
            .iter()
            .map(|p| format!("node={p}"))
            .collect::<Vec<_>>()
            .join("&"))
    };
    match kind.to_ascii_lowercase().as_str() {
        "single" => match parts.as_slice() {
            [one] => {
                host_port(one)?;
                Ok(format!("{scheme}://{one}"))
            }
            _ => Err("REDIS_TYPE=single takes one host:port".into()),
        },
        "sentinel" => match parts.as_slice() {
            [master, first, ..] => {
                let rest = nodes(&parts[1..])?;
                let mut url = format!("{scheme}-sentinel://{first}/0?sentinelServiceName={master}");
                if !rest.is_empty() {
                    url.push('&');
                    url.push_str(&rest);
                }
                Ok(url)
            }
            _ => Err(
                "REDIS_TYPE=sentinel takes the master name then the sentinels, e.g. \
                 mymaster,10.0.0.1:26379,10.0.0.2:26379"
                    .into(),
            ),
        },
        "cluster" => match parts.as_slice() {
            [first, ..] => {
                let rest = nodes(&parts)?;
                Ok(if rest.is_empty() {
                    format!("{scheme}-cluster://{first}")
                } else {
                    format!("{scheme}-cluster://{first}?{rest}")
                })
            }
            _ => Err("REDIS_TYPE=cluster takes host:port,host:port,...".into()),
        },
        _ => Err(format!(
            "REDIS_TYPE \"{kind}\" is not single, sentinel or cluster"
        )),
    }
}

fn redis<E: Fn(&str) -> Option<String>>(r: &mut Reader<'_, E>) {
    let socket = r.get("REDIS_SOCKET_TYPE").unwrap_or_else(|| "unix".into());
    let kind = r.get("REDIS_TYPE").unwrap_or_else(|| "single".into());
    let tls = r.bool("REDIS_TLS", false);
    let url = r.get("REDIS_URL");
    let using_redis = r.out.env.get("SLUICE_BACKEND").is_none_or(|b| b == "redis");
    if using_redis && !socket.eq_ignore_ascii_case("tcp") {
        r.error(
            "REDIS_SOCKET_TYPE",
            format!(
                "\"{socket}\" (envoyproxy/ratelimit's default is unix): sluice reaches Redis \
                 over TCP only; set REDIS_SOCKET_TYPE=tcp and REDIS_URL=host:port"
            ),
        );
    }
    match url {
        Some(url) => match redis_url(&kind, &url, tls) {
            Ok(u) => {
                r.set("SLUICE_REDIS_URL", u);
                for name in ["REDIS_URL", "REDIS_TYPE", "REDIS_SOCKET_TYPE", "REDIS_TLS"] {
                    if r.get(name).is_some() {
                        r.note(name, format!("honoured: Redis {kind}"));
                    }
                }
            }
            Err(e) => r.error("REDIS_URL", e),
        },
        None if using_redis && socket.eq_ignore_ascii_case("tcp") => r.error(
            "REDIS_URL",
            "not set: name the Redis server as host:port (REDIS_TYPE single), \
             master,host:port,... (sentinel) or host:port,host:port (cluster)",
        ),
        None => {}
    }
    if let Some(auth) = r.get("REDIS_AUTH") {
        // Theirs: "password" or "user:password".
        match auth.split_once(':') {
            Some((user, password)) => {
                r.set("SLUICE_REDIS_USERNAME", user);
                r.set("SLUICE_REDIS_PASSWORD", password);
            }
            None => r.set("SLUICE_REDIS_PASSWORD", auth),
        }
        r.note("REDIS_AUTH", "honoured: Redis credentials");
    }
    if r.get("REDIS_SENTINEL_AUTH").is_some() {
        r.error(
            "REDIS_SENTINEL_AUTH",
            "a password for the sentinels themselves is not read from here: put \
             sentinelPassword=... in SLUICE_REDIS_URL instead",
        );
    }
    for (name, sluice) in [
        ("REDIS_TLS_CACERT", "SLUICE_REDIS_TLS_CA_FILE"),
        ("REDIS_TLS_CLIENT_CERT", "SLUICE_REDIS_TLS_CLIENT_CERT_FILE"),
        ("REDIS_TLS_CLIENT_KEY", "SLUICE_REDIS_TLS_CLIENT_KEY_FILE"),
    ] {
        r.path(name, sluice, "TLS to Redis");
    }
    if r.bool("REDIS_TLS_SKIP_HOSTNAME_VERIFICATION", false) {
        r.error(
            "REDIS_TLS_SKIP_HOSTNAME_VERIFICATION",
            "sluice always verifies Redis' certificate name: give a certificate for the name \
             in REDIS_URL and unset it",
        );
    }
    if let Some(n) = r.number("REDIS_POOL_SIZE") {
        r.set("SLUICE_REDIS_POOL_SIZE", n.to_string());
        r.note(
            "REDIS_POOL_SIZE",
            "honoured: connections (sluice pipelines every connection)",
        );
    }
    if let Some(v) = r.duration("REDIS_TIMEOUT") {
        r.set("SLUICE_REDIS_CONNECT_TIMEOUT", v);
        r.note(
            "REDIS_TIMEOUT",
            "honoured as the connect timeout; a request's Redis time is bounded by its route \
             timeout (10 ms by default)",
        );
    }
    r.ignored(
        &[
            "REDIS_PIPELINE_WINDOW",
            "REDIS_PIPELINE_LIMIT",
            "REDIS_CLUSTER_PIPELINE_PARALLELISM",
        ],
        "sluice batches the descriptors of a request into one script call of its own",
    );
    r.ignored(
        &[
            "REDIS_PERSECOND",
            "REDIS_PERSECOND_SOCKET_TYPE",
            "REDIS_PERSECOND_TYPE",
            "REDIS_PERSECOND_URL",
            "REDIS_PERSECOND_POOL_SIZE",
            "REDIS_PERSECOND_AUTH",
            "REDIS_PERSECOND_TLS",
            "REDIS_PERSECOND_SENTINEL_AUTH",
            "REDIS_PERSECOND_PIPELINE_WINDOW",
            "REDIS_PERSECOND_PIPELINE_LIMIT",
            "REDIS_PERSECOND_CLUSTER_PIPELINE_PARALLELISM",
            "REDIS_PERSECOND_TIMEOUT",
            "REDIS_PERSECOND_POOL_ON_EMPTY_BEHAVIOR",
        ],
        "per-second limits count in the same Redis as the others",
    );
    r.ignored(
        &["REDIS_HEALTH_CHECK_ACTIVE_CONNECTION"],
        "sluice's /readyz and /healthcheck always check Redis (and stay healthy while the \
         fallback answers)",
    );
    r.ignored(
        &[
            "REDIS_POOL_ON_EMPTY_BEHAVIOR",
            "REDIS_STARTUP_INITIAL_INTERVAL",
            "REDIS_STARTUP_MAX_INTERVAL",
            "REDIS_STARTUP_MAX_ELAPSED_TIME",
        ],
        "sluice starts without waiting for Redis and reconnects with its own backoff (at \
         most 500 ms apart); requests never wait for a connection",
    );
}

fn stats<E: Fn(&str) -> Option<String>>(r: &mut Reader<'_, E>) {
    // Theirs defaults to statsd: say once that none is sent, even when not set.
    let statsd = r.bool("USE_STATSD", true);
    if statsd {
        r.note(
            "USE_STATSD",
            "ignored: sluice sends no statsd; it exports Prometheus metrics at /metrics on \
             the HTTP port (PORT) and PROMETHEUS_ADDR",
        );
    } else if r.get("USE_STATSD").is_some() {
        r.note("USE_STATSD", "honoured: no statsd");
    }
    r.ignored(
        &[
            "STATSD_HOST",
            "STATSD_PORT",
            "USE_DOG_STATSD",
            "USE_DOG_STATSD_MOGRIFIERS",
            "EXTRA_TAGS",
            "STATS_FLUSH_INTERVAL",
        ],
        "sluice exports Prometheus metrics, not statsd",
    );
    r.ignored(
        &["DISABLE_STATS"],
        "sluice's metrics are always on (their labels are bounded by the configuration)",
    );
    if r.bool("USE_PROMETHEUS", false) {
        let addr = r.get("PROMETHEUS_ADDR").unwrap_or_else(|| ":9090".into());
        let addr = match addr.strip_prefix(':') {
            Some(port) => format!("0.0.0.0:{port}"),
            None => addr,
        };
        r.set("SLUICE_METRICS_ADDR", addr.clone());
        r.note(
            "USE_PROMETHEUS",
            format!("honoured: /metrics also on {addr} (always on the HTTP port)"),
        );
    } else {
        r.ignored(
            &["PROMETHEUS_ADDR"],
            "USE_PROMETHEUS is not true; /metrics is on the HTTP port (PORT)",
        );
    }
    if let Some(path) = r.get("PROMETHEUS_PATH")
        && path != "/metrics"
    {
        r.note(
            "PROMETHEUS_PATH",
            format!("ignored: sluice serves its metrics at /metrics, not {path}"),
        );
    }
    r.ignored(
        &[
            "PROMETHEUS_MAPPER_YAML",
            "PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS",
        ],
        "sluice's metric names are its own (sluice_*, latency in seconds), not mapped from \
         statsd names: see the README",
    );
}

fn behaviour<E: Fn(&str) -> Option<String>>(r: &mut Reader<'_, E>) {
    if r.get("SHADOW_MODE").is_some() {
        let shadow = r.bool("SHADOW_MODE", false);
        r.set("SLUICE_SHADOW_MODE", shadow.to_string());
        r.note("SHADOW_MODE", "honoured: global shadow mode");
    }
    if r.bool("QUOTA_MODE", false) {
        r.note(
            "QUOTA_MODE",
            "ignored: sluice has no global quota mode; mark descriptors `quota_mode: true`",
        );
    }
    r.ignored(
        &["LOCAL_CACHE_SIZE_IN_BYTES"],
        "sluice always keeps an over-limit cache, bounded in entries by \
         SLUICE_OVER_LIMIT_CACHE_MAX_ENTRIES",
    );
    r.ignored(
        &["NEAR_LIMIT_RATIO"],
        "sluice counts near-limit decisions at a fixed 80% (their default)",
    );
    r.ignored(
        &["CACHE_KEY_PREFIX"],
        "sluice's Redis keys have their own prefix (sluice:); two deployments sharing a Redis \
         need different databases (SLUICE_REDIS_DATABASE)",
    );
    r.ignored(
        &["EXPIRATION_JITTER_MAX_SECONDS"],
        "sluice's keys expire at their window's end",
    );
    r.ignored(
        &["STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT"],
        "sluice counts every hit",
    );
    r.ignored(
        &[
            "LIMIT_RESPONSE_HEADERS_ENABLED",
            "LIMIT_LIMIT_HEADER",
            "LIMIT_REMAINING_HEADER",
            "LIMIT_RESET_HEADER",
        ],
        "quota headers are chosen per route in sluice's own limits format \
         (rate_limit_headers), not for the envoyproxy/ratelimit format",
    );
    r.ignored(
        &["RESPONSE_DYNAMIC_METADATA"],
        "sluice does not return descriptor metadata as dynamic metadata",
    );
}

fn grpc_tls<E: Fn(&str) -> Option<String>>(r: &mut Reader<'_, E>) {
    if r.bool("GRPC_SERVER_USE_TLS", false) {
        r.note("GRPC_SERVER_USE_TLS", "honoured: gRPC over TLS");
        for (name, sluice) in [
            ("GRPC_SERVER_TLS_CERT", "SLUICE_TLS_CERT_FILE"),
            ("GRPC_SERVER_TLS_KEY", "SLUICE_TLS_KEY_FILE"),
            ("GRPC_CLIENT_TLS_CACERT", "SLUICE_TLS_CLIENT_CA_FILE"),
        ] {
            r.path(name, sluice, "gRPC server TLS");
        }
        if r.get("GRPC_CLIENT_TLS_SAN").is_some() {
            r.error(
                "GRPC_CLIENT_TLS_SAN",
                "sluice does not check a client certificate's SAN (any certificate signed by \
                 GRPC_CLIENT_TLS_CACERT is accepted); unset it, or use a CA that signs only \
                 the clients allowed",
            );
        }
    } else {
        r.ignored(
            &[
                "GRPC_SERVER_TLS_CERT",
                "GRPC_SERVER_TLS_KEY",
                "GRPC_CLIENT_TLS_CACERT",
                "GRPC_CLIENT_TLS_SAN",
            ],
            "GRPC_SERVER_USE_TLS is not true (as in envoyproxy/ratelimit)",
        );
    }
    // Envoy Gateway sets it; envoyproxy/ratelimit reads GRPC_CLIENT_TLS_CACERT instead.
    r.ignored(
        &["GRPC_SERVER_TLS_CA_CERT"],
        "envoyproxy/ratelimit does not read it either (client certificates are checked \
         against GRPC_CLIENT_TLS_CACERT)",
    );
}

fn not_applicable<E: Fn(&str) -> Option<String>>(r: &mut Reader<'_, E>) {
    r.ignored(
        &[
            "TRACING_ENABLED",
            "TRACING_SERVICE_NAME",
            "TRACING_SERVICE_NAMESPACE",
            "TRACING_SERVICE_INSTANCE_ID",
            "TRACING_EXPORTER_PROTOCOL",
            "TRACING_SAMPLING_RATE",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ],
        "sluice exports no traces; its latency histograms are on /metrics",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(vars: &[(&str, &str)]) -> Result<Translation, SettingsError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        translate(&move |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    #[test]
    fn redis_url_forms_become_one_url() {
        assert_eq!(
            redis_url("SINGLE", "redis.redis.svc:6379", false).unwrap(),
            "redis://redis.redis.svc:6379"
        );
        assert_eq!(
            redis_url("sentinel", "mymaster,10.0.0.1:26379,10.0.0.2:26379", true).unwrap(),
            "rediss-sentinel://10.0.0.1:26379/0?sentinelServiceName=mymaster&node=10.0.0.2:26379"
        );
        assert_eq!(
            redis_url("cluster", "a:7000,b:7001,c:7002", false).unwrap(),
            "redis-cluster://a:7000?node=b:7001&node=c:7002"
        );
        assert!(redis_url("single", "nohost", false).is_err());
        assert!(redis_url("sentinel", "mymaster", false).is_err());
        assert!(redis_url("ring", "a:1", false).is_err());
    }

    #[test]
    fn every_set_variable_is_reported_once() {
        let t = from(&[
            ("REDIS_SOCKET_TYPE", "tcp"),
            ("REDIS_URL", "r:6379"),
            ("USE_STATSD", "false"),
            ("STATSD_HOST", "x"),
            ("NEAR_LIMIT_RATIO", "0.9"),
            ("GRPC_PORT", "9000"),
        ])
        .unwrap();
        for name in [
            "REDIS_SOCKET_TYPE",
            "REDIS_URL",
            "USE_STATSD",
            "STATSD_HOST",
            "NEAR_LIMIT_RATIO",
            "GRPC_PORT",
        ] {
            let n = t.notes.iter().filter(|(v, _)| v == name).count();
            assert_eq!(n, 1, "{name}: {:?}", t.notes);
        }
        assert_eq!(t.env["SLUICE_GRPC_ADDR"], "0.0.0.0:9000");
        assert_eq!(t.env["SLUICE_LOG"], "warn");
    }

    #[test]
    fn what_cannot_be_kept_is_an_error_naming_the_variable() {
        for (vars, name) in [
            (vec![("BACKEND_TYPE", "memcache")], "BACKEND_TYPE"),
            (vec![("REDIS_URL", "/var/run/r.sock")], "REDIS_SOCKET_TYPE"),
            (
                vec![
                    ("REDIS_SOCKET_TYPE", "tcp"),
                    ("CONFIG_TYPE", "GRPC_XDS_DELTA"),
                ],
                "CONFIG_TYPE",
            ),
        ] {
            let err = from(&vars).unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
    }
}
