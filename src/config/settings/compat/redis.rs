//! Their counter store: `BACKEND_TYPE`, `REDIS_*` (one URL of sluice's Redis client from
//! `REDIS_TYPE` and `REDIS_URL`'s forms) and memcache, which sluice does not support.

use super::Reader;

pub(super) fn backend<E: Fn(&str) -> Option<String>>(r: &mut Reader<'_, E>) {
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

pub(super) fn redis<E: Fn(&str) -> Option<String>>(r: &mut Reader<'_, E>) {
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
