//! Their statistics (statsd, Prometheus), global behaviour (shadow and quota mode, caches,
//! response headers), gRPC server TLS and tracing.

use super::Reader;

pub(super) fn stats<E: Fn(&str) -> Option<String>>(r: &mut Reader<'_, E>) {
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
        if r.get("PROMETHEUS_ADDR").is_some() {
            r.note(
                "PROMETHEUS_ADDR",
                format!("honoured: /metrics also on {addr}"),
            );
        }
    } else {
        r.ignored(
            &["PROMETHEUS_ADDR"],
            "USE_PROMETHEUS is not true; /metrics is on the HTTP port (PORT)",
        );
    }
    match r.get("PROMETHEUS_PATH") {
        Some(path) if path == "/metrics" => {
            r.note("PROMETHEUS_PATH", "honoured: metrics at /metrics");
        }
        Some(path) => r.note(
            "PROMETHEUS_PATH",
            format!("ignored: sluice serves its metrics at /metrics, not {path}"),
        ),
        None => {}
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

pub(super) fn behaviour<E: Fn(&str) -> Option<String>>(r: &mut Reader<'_, E>) {
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

pub(super) fn grpc_tls<E: Fn(&str) -> Option<String>>(r: &mut Reader<'_, E>) {
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

pub(super) fn not_applicable<E: Fn(&str) -> Option<String>>(r: &mut Reader<'_, E>) {
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
