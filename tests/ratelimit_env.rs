//! sluice as a drop-in for envoyproxy/ratelimit: the real binary started as `ratelimit` (the
//! name their image runs) with only their environment.
//!
//! First the environment Envoy Gateway gives its rate limit Deployment (read from its
//! `internal/infrastructure/kubernetes/ratelimit` and the Deployment it renders): limits over
//! xDS from a management server reached over mTLS, gRPC served over TLS, Redis over TCP,
//! Prometheus on its own port, `/healthcheck` probed. Then one test per `REDIS_TYPE` /
//! `REDIS_URL` form (single, sentinel, cluster) against real Redis servers, with limits from
//! files in `RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/RUNTIME_APPDIRECTORY`, and the same
//! environment turned on by `SLUICE_ENV_COMPAT` instead of the name.
//!
//! sluice here runs on the system clock: limits are per hour so a test never crosses a
//! window; every wait is a poll with a deadline.

mod common;

use std::time::{Duration, Instant};

use common::certs::{Pki, write_pem};
use common::cluster::RedisCluster;
use common::free_port;
use common::http;
use common::redis::RedisServer;
use common::rls::*;
use common::sentinel::{RedisSentinel, SENTINEL_SERVICE};
use common::sluice::SluiceProcess;
use common::xds::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const LIMITS: &str = "\
domain: gateway
descriptors:
  - key: remote_address
    rate_limit:
      unit: hour
      requests_per_unit: 2
";

/// Polls `/config` until the xDS version served is `version`.
async fn wait_for_version(sluice: &SluiceProcess, version: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let shown = http::get(sluice.http_addr, "/config").await.json();
        if shown["limits_source"]["xds"]["version"] == version {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "version {version} not served within 15 s: {shown:#}\n{}",
            sluice.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two OK answers then OVER_LIMIT, for a fresh address.
async fn assert_two_per_hour(client: &mut RateLimitServiceClient<Channel>, address: &str) {
    let mut codes = Vec::new();
    for _ in 0..3 {
        let response = client
            .should_rate_limit(request(
                "gateway",
                vec![desc(&[("remote_address", address)])],
            ))
            .await
            .expect("answered")
            .into_inner();
        let s = &response.statuses[0];
        assert_eq!(
            s.current_limit.as_ref().map(|l| l.requests_per_unit),
            Some(2)
        );
        codes.push(Code::try_from(s.code).expect("code"));
    }
    assert_eq!(codes, [Code::Ok, Code::Ok, Code::OverLimit]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_envoy_gateway_sets_serves_pushed_limits_and_answers_healthcheck() {
    let redis = RedisServer::start();
    let pki = Pki::new("envoy gateway test CA");
    let certs = tempfile::tempdir().expect("temp dir");
    let ca = write_pem(certs.path(), "ca.crt", &pki.ca);
    let server_cert = write_pem(certs.path(), "tls.crt", &pki.server.cert);
    let server_key = write_pem(certs.path(), "tls.key", &pki.server.key);
    let client_cert = write_pem(certs.path(), "client.crt", &pki.client.cert);
    let client_key = write_pem(certs.path(), "client.key", &pki.client.key);
    // Envoy Gateway's xDS server requires a client certificate of its CA.
    let ads = AdsServer::start_tls(Some(AdsTls {
        cert: pki.server.cert.clone(),
        key: pki.server.key.clone(),
        client_ca: Some(pki.ca.clone()),
    }))
    .await;
    let (grpc_port, http_port, metrics_port) = (free_port(), free_port(), free_port());
    let (grpc, http_p, metrics) = (
        grpc_port.to_string(),
        http_port.to_string(),
        format!(":{metrics_port}"),
    );
    let xds_url = format!("localhost:{}", ads.addr.port());
    let redis_url = format!("127.0.0.1:{}", redis.port);
    let path = |p: &std::path::Path| p.display().to_string();
    let (ca, server_cert, server_key, client_cert, client_key) = (
        path(&ca),
        path(&server_cert),
        path(&server_key),
        path(&client_cert),
        path(&client_key),
    );
    // Envoy Gateway's Deployment, with its ports made free and its files made here.
    let env = [
        ("RUNTIME_ROOT", "/data"),
        ("RUNTIME_SUBDIRECTORY", "ratelimit"),
        ("RUNTIME_IGNOREDOTFILES", "true"),
        ("RUNTIME_WATCH_ROOT", "false"),
        ("LOG_LEVEL", "info"),
        ("USE_STATSD", "false"),
        ("CONFIG_TYPE", "GRPC_XDS_SOTW"),
        ("CONFIG_GRPC_XDS_SERVER_URL", xds_url.as_str()),
        ("CONFIG_GRPC_XDS_NODE_ID", "envoy-ratelimit"),
        ("GRPC_SERVER_USE_TLS", "true"),
        ("GRPC_SERVER_TLS_CERT", server_cert.as_str()),
        ("GRPC_SERVER_TLS_KEY", server_key.as_str()),
        ("GRPC_SERVER_TLS_CA_CERT", ca.as_str()),
        ("CONFIG_GRPC_XDS_SERVER_USE_TLS", "true"),
        ("CONFIG_GRPC_XDS_CLIENT_TLS_CERT", client_cert.as_str()),
        ("CONFIG_GRPC_XDS_CLIENT_TLS_KEY", client_key.as_str()),
        ("CONFIG_GRPC_XDS_SERVER_TLS_CACERT", ca.as_str()),
        ("FORCE_START_WITHOUT_INITIAL_CONFIG", "true"),
        ("REDIS_SOCKET_TYPE", "tcp"),
        ("REDIS_URL", redis_url.as_str()),
        ("USE_PROMETHEUS", "true"),
        ("PROMETHEUS_ADDR", metrics.as_str()),
        ("PROMETHEUS_MAPPER_YAML", "/etc/statsd-exporter/conf.yaml"),
        ("GRPC_PORT", grpc.as_str()),
        ("PORT", http_p.as_str()),
    ];
    let sluice = SluiceProcess::spawn_as_ratelimit(&env, grpc_port, http_port);

    // Forced start: healthy before any limits, as theirs.
    let health = http::get(sluice.http_addr, "/healthcheck").await;
    assert_eq!(
        (health.status, health.body.as_str()),
        (200, "OK"),
        "{}",
        sluice.output()
    );

    let first = ads
        .wait_for_request("the subscription", Duration::from_secs(15), |_| true)
        .await;
    assert_eq!(
        first.node.as_ref().map(|n| n.id.as_str()),
        Some("envoy-ratelimit")
    );
    assert_eq!(first.type_url, TYPE_URL);
    ads.push_configs("gw-1", &[config_from_yaml("gateway", LIMITS)]);
    wait_for_version(&sluice, "gw-1").await;
    ads.ack_of("gw-1", &ads.sent_nonce("gw-1").await).await;

    // gRPC over TLS, as Envoy reaches it (with its client certificate).
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .identity(Identity::from_pem(&pki.client.cert, &pki.client.key))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://127.0.0.1:{grpc_port}"))
        .expect("uri")
        .tls_config(tls)
        .expect("client TLS")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect over TLS: {e}\n{}", sluice.output()));
    let mut client = RateLimitServiceClient::new(channel);
    assert_two_per_hour(&mut client, "10.1.1.1").await;
    assert!(
        !redis.keys(0, "sluice:*").is_empty(),
        "the counter is in REDIS_URL's Redis"
    );

    // Metrics where Envoy Gateway's pod annotations send Prometheus.
    let metrics_addr = std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let scraped = http::get(metrics_addr, "/metrics").await;
    assert_eq!(scraped.status, 200);
    assert!(
        scraped
            .body
            .contains("sluice_xds_responses_total{result=\"ack\"} 1"),
        "{}",
        scraped.body
    );

    // Every variable accounted for, once: honoured, or ignored with why.
    let log = strip_ansi(&sluice.stderr());
    for (variable, _) in env {
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.ends_with(&format!("variable={variable}")))
            .collect();
        assert_eq!(lines.len(), 1, "{variable}: {lines:?}\n{log}");
        assert!(
            lines[0].contains("honoured") || lines[0].contains("ignored: "),
            "{variable}: {}",
            lines[0]
        );
    }
    for (variable, said) in [
        ("PROMETHEUS_MAPPER_YAML", "ignored"),
        ("RUNTIME_WATCH_ROOT", "ignored"),
        ("GRPC_SERVER_TLS_CA_CERT", "ignored"),
        ("USE_STATSD", "honoured"),
        ("CONFIG_GRPC_XDS_SERVER_URL", "honoured"),
        ("REDIS_URL", "honoured"),
    ] {
        let line = log
            .lines()
            .find(|l| l.ends_with(&format!("variable={variable}")))
            .unwrap_or_default();
        assert!(line.contains(said), "{variable}: {line}");
    }
}

/// The log without its colour codes.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_forced_start_healthcheck_fails_until_the_first_limits() {
    let ads = AdsServer::start().await;
    let redis = RedisServer::start();
    let (grpc_port, http_port) = (free_port(), free_port());
    let (grpc, http_p) = (grpc_port.to_string(), http_port.to_string());
    let (xds_url, redis_url) = (ads.url(), format!("127.0.0.1:{}", redis.port));
    let env = [
        ("CONFIG_TYPE", "GRPC_XDS_SOTW"),
        ("CONFIG_GRPC_XDS_SERVER_URL", xds_url.as_str()),
        ("REDIS_SOCKET_TYPE", "tcp"),
        ("REDIS_URL", redis_url.as_str()),
        ("USE_STATSD", "false"),
        ("GRPC_PORT", grpc.as_str()),
        ("PORT", http_p.as_str()),
    ];
    let sluice = SluiceProcess::spawn_as_ratelimit(&env, grpc_port, http_port);
    let first = ads
        .wait_for_request("the subscription", Duration::from_secs(15), |_| true)
        .await;
    // Their default node id.
    assert_eq!(first.node.map(|n| n.id), Some("default".to_string()));
    let health = http::get(sluice.http_addr, "/healthcheck").await;
    assert_eq!((health.status, health.body.as_str()), (500, ""));
    ads.push_configs("1", &[config_from_yaml("gateway", LIMITS)]);
    wait_for_version(&sluice, "1").await;
    let health = http::get(sluice.http_addr, "/healthcheck").await;
    assert_eq!((health.status, health.body.as_str()), (200, "OK"));
}

/// Limits from files, as `CONFIG_TYPE=FILE` reads them, counted in the Redis of `env`.
async fn serves_from_files_with(
    redis_env: &[(&str, &str)],
    compat_by_variable: bool,
) -> SluiceProcess {
    let root = tempfile::tempdir().expect("temp dir");
    let dir = root.path().join("ratelimit").join("config");
    std::fs::create_dir_all(&dir).expect("runtime dirs");
    std::fs::write(dir.join("gateway.yaml"), LIMITS).expect("limits file");
    let (grpc_port, http_port) = (free_port(), free_port());
    let (grpc, http_p) = (grpc_port.to_string(), http_port.to_string());
    let root_path = root.path().display().to_string();
    let mut env = vec![
        ("RUNTIME_ROOT", root_path.as_str()),
        ("RUNTIME_SUBDIRECTORY", "ratelimit"),
        ("REDIS_SOCKET_TYPE", "tcp"),
        ("USE_STATSD", "false"),
        ("LOG_LEVEL", "info"),
        ("GRPC_PORT", grpc.as_str()),
        ("PORT", http_p.as_str()),
        ("GRPC_HOST", "127.0.0.1"),
        ("HOST", "127.0.0.1"),
    ];
    env.extend_from_slice(redis_env);
    let sluice = if compat_by_variable {
        let mut env = env.clone();
        env.push(("SLUICE_ENV_COMPAT", "envoyproxy-ratelimit"));
        let mut process = SluiceProcess::launch_bare(&["serve"], &env, grpc_port, http_port);
        process.wait_until_accepting(Duration::from_secs(30));
        process
    } else {
        SluiceProcess::spawn_as_ratelimit(&env, grpc_port, http_port)
    };
    // The directory must outlive the process: the limits are watched.
    std::mem::forget(root);
    let mut client = sluice.client().await;
    assert_two_per_hour(&mut client, "10.2.2.2").await;
    let health = http::get(sluice.http_addr, "/healthcheck").await;
    assert_eq!((health.status, health.body.as_str()), (200, "OK"));
    sluice
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_type_single_counts_in_the_redis_of_redis_url() {
    let redis = RedisServer::start();
    let url = format!("127.0.0.1:{}", redis.port);
    let _sluice =
        serves_from_files_with(&[("REDIS_TYPE", "SINGLE"), ("REDIS_URL", &url)], true).await;
    assert_eq!(redis.keys(0, "sluice:*").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_type_sentinel_counts_on_the_master_the_sentinels_name() {
    let setup = RedisSentinel::start(2);
    let url = format!(
        "{SENTINEL_SERVICE},127.0.0.1:{},127.0.0.1:{}",
        setup.sentinels[0].port, setup.sentinels[1].port
    );
    let _sluice =
        serves_from_files_with(&[("REDIS_TYPE", "sentinel"), ("REDIS_URL", &url)], false).await;
    assert_eq!(setup.master.keys(0, "sluice:*").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_type_cluster_counts_in_the_cluster_of_redis_url() {
    let cluster = RedisCluster::start(3);
    let url: Vec<String> = cluster
        .ports()
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let url = url.join(",");
    let _sluice =
        serves_from_files_with(&[("REDIS_TYPE", "cluster"), ("REDIS_URL", &url)], false).await;
    let keys: usize = cluster
        .nodes
        .iter()
        .map(|n| n.keys(0, "sluice:*").len())
        .sum();
    assert_eq!(keys, 1, "one counter in the cluster");
}

#[test]
fn what_sluice_cannot_do_stops_it_naming_the_variable() {
    for (env, variable) in [
        (vec![("BACKEND_TYPE", "memcache")], "BACKEND_TYPE"),
        // Their default: a unix socket.
        (vec![], "REDIS_SOCKET_TYPE"),
    ] {
        let mut env = env.clone();
        env.push(("SLUICE_ENV_COMPAT", "envoyproxy-ratelimit"));
        let (grpc_port, http_port) = (free_port(), free_port());
        let mut process = SluiceProcess::launch_bare(&["serve"], &env, grpc_port, http_port);
        let status = process
            .wait_for_exit(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("sluice kept running with {env:?}"));
        assert_eq!(status.code(), Some(2), "{}", process.output());
        assert!(process.stderr().contains(variable), "{}", process.output());
    }
}
