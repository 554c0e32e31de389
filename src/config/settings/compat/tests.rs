//! The translation of their variables: URL forms, reports, refusals.

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

/// Every variable of envoyproxy/ratelimit's `src/settings/settings.go` (its `envconfig`
/// names, in order).
const THEIRS: &[&str] = &[
    "HOST",
    "PORT",
    "DEBUG_HOST",
    "DEBUG_PORT",
    "GRPC_UDS",
    "GRPC_HOST",
    "GRPC_PORT",
    "GRPC_MAX_CONNECTION_AGE",
    "GRPC_MAX_CONNECTION_AGE_GRACE",
    "GRPC_SERVER_USE_TLS",
    "GRPC_SERVER_TLS_CERT",
    "GRPC_SERVER_TLS_KEY",
    "GRPC_CLIENT_TLS_CACERT",
    "GRPC_CLIENT_TLS_SAN",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "CONFIG_TYPE",
    "FORCE_START_WITHOUT_INITIAL_CONFIG",
    "CONFIG_GRPC_XDS_NODE_ID",
    "CONFIG_GRPC_XDS_NODE_METADATA",
    "CONFIG_GRPC_XDS_SERVER_URL",
    "CONFIG_GRPC_XDS_SERVER_CONNECT_RETRY_INTERVAL",
    "CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS",
    "CONFIG_GRPC_XDS_SERVER_USE_TLS",
    "CONFIG_GRPC_XDS_CLIENT_TLS_CERT",
    "CONFIG_GRPC_XDS_CLIENT_TLS_KEY",
    "CONFIG_GRPC_XDS_SERVER_TLS_CACERT",
    "CONFIG_GRPC_XDS_SERVER_TLS_SAN",
    "XDS_CLIENT_BACKOFF_INITIAL_INTERVAL",
    "XDS_CLIENT_BACKOFF_MAX_INTERVAL",
    "XDS_CLIENT_BACKOFF_RANDOM_FACTOR",
    "XDS_CLIENT_BACKOFF_JITTER",
    "XDS_CLIENT_MAX_MSG_SIZE_IN_BYTES",
    "USE_DOG_STATSD",
    "USE_DOG_STATSD_MOGRIFIERS",
    "USE_STATSD",
    "STATSD_HOST",
    "STATSD_PORT",
    "EXTRA_TAGS",
    "STATS_FLUSH_INTERVAL",
    "DISABLE_STATS",
    "USE_PROMETHEUS",
    "PROMETHEUS_ADDR",
    "PROMETHEUS_PATH",
    "PROMETHEUS_MAPPER_YAML",
    "PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS",
    "RUNTIME_ROOT",
    "RUNTIME_SUBDIRECTORY",
    "RUNTIME_APPDIRECTORY",
    "RUNTIME_IGNOREDOTFILES",
    "RUNTIME_WATCH_ROOT",
    "EXPIRATION_JITTER_MAX_SECONDS",
    "LOCAL_CACHE_SIZE_IN_BYTES",
    "NEAR_LIMIT_RATIO",
    "CACHE_KEY_PREFIX",
    "BACKEND_TYPE",
    "STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT",
    "LIMIT_RESPONSE_HEADERS_ENABLED",
    "LIMIT_LIMIT_HEADER",
    "LIMIT_REMAINING_HEADER",
    "LIMIT_RESET_HEADER",
    "HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED",
    "REDIS_SOCKET_TYPE",
    "REDIS_TYPE",
    "REDIS_URL",
    "REDIS_POOL_SIZE",
    "REDIS_AUTH",
    "REDIS_TLS",
    "REDIS_TLS_CLIENT_CERT",
    "REDIS_TLS_CLIENT_KEY",
    "REDIS_TLS_CACERT",
    "REDIS_TLS_SKIP_HOSTNAME_VERIFICATION",
    "REDIS_PIPELINE_WINDOW",
    "REDIS_PIPELINE_LIMIT",
    "REDIS_CLUSTER_PIPELINE_PARALLELISM",
    "REDIS_PERSECOND",
    "REDIS_PERSECOND_SOCKET_TYPE",
    "REDIS_PERSECOND_TYPE",
    "REDIS_PERSECOND_URL",
    "REDIS_PERSECOND_POOL_SIZE",
    "REDIS_PERSECOND_AUTH",
    "REDIS_PERSECOND_TLS",
    "REDIS_SENTINEL_AUTH",
    "REDIS_PERSECOND_SENTINEL_AUTH",
    "REDIS_PERSECOND_PIPELINE_WINDOW",
    "REDIS_PERSECOND_PIPELINE_LIMIT",
    "REDIS_PERSECOND_CLUSTER_PIPELINE_PARALLELISM",
    "REDIS_HEALTH_CHECK_ACTIVE_CONNECTION",
    "REDIS_TIMEOUT",
    "REDIS_PERSECOND_TIMEOUT",
    "REDIS_POOL_ON_EMPTY_BEHAVIOR",
    "REDIS_PERSECOND_POOL_ON_EMPTY_BEHAVIOR",
    "REDIS_STARTUP_INITIAL_INTERVAL",
    "REDIS_STARTUP_MAX_INTERVAL",
    "REDIS_STARTUP_MAX_ELAPSED_TIME",
    "MEMCACHE_HOST_PORT",
    "MEMCACHE_MAX_IDLE_CONNS",
    "MEMCACHE_SRV",
    "MEMCACHE_SRV_REFRESH",
    "MEMCACHE_TLS",
    "MEMCACHE_TLS_CLIENT_CERT",
    "MEMCACHE_TLS_CLIENT_KEY",
    "MEMCACHE_TLS_CACERT",
    "MEMCACHE_TLS_SKIP_HOSTNAME_VERIFICATION",
    "SHADOW_MODE",
    "QUOTA_MODE",
    "RESPONSE_DYNAMIC_METADATA",
    "MERGE_DOMAIN_CONFIG",
    "TRACING_ENABLED",
    "TRACING_SERVICE_NAME",
    "TRACING_SERVICE_NAMESPACE",
    "TRACING_SERVICE_INSTANCE_ID",
    "TRACING_EXPORTER_PROTOCOL",
    "TRACING_SAMPLING_RATE",
];

/// A value of the variable's type.
fn sample(name: &str) -> &'static str {
    const BOOLS: &[&str] = &[
        "USE_",
        "DISABLE_",
        "FORCE_",
        "HEALTHY_",
        "SHADOW_MODE",
        "QUOTA_MODE",
        "MERGE_",
        "RESPONSE_DYNAMIC",
        "TRACING_ENABLED",
        "RUNTIME_IGNOREDOTFILES",
        "RUNTIME_WATCH_ROOT",
        "LIMIT_RESPONSE_HEADERS_ENABLED",
        "PROMETHEUS_RESPONSE_TIME",
        "STOP_CACHE",
        "REDIS_HEALTH_CHECK",
        "XDS_CLIENT_BACKOFF_JITTER",
    ];
    match name {
        "CONFIG_TYPE" => "GRPC_XDS_SOTW",
        "BACKEND_TYPE" => "redis",
        "REDIS_SOCKET_TYPE" => "tcp",
        "REDIS_TYPE" => "single",
        "REDIS_URL" => "redis:6379",
        "LOG_LEVEL" => "info",
        "LOG_FORMAT" => "json",
        "HOST" | "GRPC_HOST" => "127.0.0.1",
        "CONFIG_GRPC_XDS_NODE_METADATA" => "a=b",
        "CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS" => "a:b",
        "REDIS_PERSECOND" => "true",
        n if BOOLS.iter().any(|b| n.starts_with(b)) => "true",
        n if n.ends_with("_TLS") || n.ends_with("SKIP_HOSTNAME_VERIFICATION") => "true",
        n if n.ends_with("INTERVAL")
            || n.ends_with("TIMEOUT")
            || n.ends_with("WINDOW")
            || n.ends_with("AGE")
            || n.ends_with("GRACE")
            || n.ends_with("REFRESH")
            || n.ends_with("ELAPSED_TIME") =>
        {
            "1s"
        }
        n if n.ends_with("PORT")
            || n.ends_with("SIZE")
            || n.ends_with("BYTES")
            || n.ends_with("LIMIT")
            || n.ends_with("PARALLELISM")
            || n.ends_with("SECONDS")
            || n.ends_with("CONNS") =>
        {
            "1"
        }
        _ => "x",
    }
}

#[test]
fn none_of_their_variables_is_silently_dropped() {
    for name in THEIRS {
        let value = sample(name);
        let mut vars = vec![(*name, value)];
        for (k, v) in [("REDIS_SOCKET_TYPE", "tcp"), ("REDIS_URL", "redis:6379")] {
            if k != *name {
                vars.push((k, v));
            }
        }
        match from(&vars) {
            Ok(t) => {
                let notes: Vec<&String> = t
                    .notes
                    .iter()
                    .filter(|(v, _)| v == name)
                    .map(|(_, what)| what)
                    .collect();
                assert_eq!(notes.len(), 1, "{name}={value}: {notes:?}");
                assert!(
                    notes[0].starts_with("honoured") || notes[0].starts_with("ignored: "),
                    "{name}: {}",
                    notes[0]
                );
            }
            Err(e) => assert!(e.to_string().contains(name), "{name}={value}: {e}"),
        }
    }
    // With the server TLS on, its files are honoured, not ignored.
    let t = from(&[
        ("REDIS_SOCKET_TYPE", "tcp"),
        ("REDIS_URL", "redis:6379"),
        ("GRPC_SERVER_USE_TLS", "true"),
        ("GRPC_SERVER_TLS_CERT", "/c"),
        ("GRPC_SERVER_TLS_KEY", "/k"),
    ])
    .unwrap();
    assert_eq!(t.env["SLUICE_TLS_CERT_FILE"], "/c");
    assert_eq!(t.env["SLUICE_TLS_KEY_FILE"], "/k");
}
