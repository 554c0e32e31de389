//! The xDS limits source against the kit's management server (`common::xds`): limits pushed
//! as `RateLimitConfig` resources over ADS are served within seconds, ACKed with the pushed
//! version and nonce; an invalid snapshot is NACKed with what is wrong and the previous
//! limits stay served; a management server that restarts is subscribed to again while the
//! last limits keep answering; and envoyproxy/ratelimit's example configs pushed over xDS
//! answer exactly as the same files read from disk.
//!
//! sluice runs in process on a manual clock (`common::sluice::Sluice`), so rate windows are
//! crossed by moving the clock; only the stream itself lives in real time, and every wait on
//! it is a poll with a deadline.

mod common;

use std::time::{Duration, Instant};

use common::envoy_examples;
use common::http;
use common::rls::*;
use common::sluice::Sluice;
use common::xds::*;
use sluice::config::settings::LimitsSource;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// gRPC health of the RLS service.
async fn grpc_health(s: &Sluice) -> ServingStatus {
    let response = HealthClient::new(s.channel.clone())
        .check(HealthCheckRequest {
            service: "envoy.service.ratelimit.v3.RateLimitService".into(),
        })
        .await
        .expect("health check")
        .into_inner();
    ServingStatus::try_from(response.status).expect("a status")
}

/// sluice reading limits from `ads`, reconnecting fast.
async fn sluice_on(ads: &AdsServer, force: bool) -> Sluice {
    let url = ads.url();
    Sluice::start_with(&[], move |s| {
        s.limits_source = LimitsSource::Xds;
        s.xds.server_url = url;
        s.xds.node_id = "test-node".into();
        s.xds.node_metadata = "zone=a,team=edge".into();
        s.xds.backoff_initial = Duration::from_millis(50);
        s.xds.backoff_max = Duration::from_millis(200);
        s.xds.start_without_initial_config = force;
    })
    .await
}

/// Waits until the version served is `version`; returns how long that took.
async fn served_version(s: &Sluice, version: &str) -> Duration {
    let start = Instant::now();
    let status = s.handle().xds.clone().expect("an xDS source");
    loop {
        if status.shown().version.as_deref() == Some(version) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "version {version} not served within 10 s: {:?}",
            status.shown()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn per_minute(domain: &str, key: &str, n: u32) -> RateLimitConfig {
    config(
        &format!("{domain}-limits"),
        domain,
        vec![limited(key, "", n, ConfUnit::Minute)],
    )
}

/// `n` requests per minute for `key`, as sluice answers it (the limit is named by its path).
fn expected(key: &str, n: u32) -> RateLimit {
    limit(n, Unit::Minute, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_limits_are_served_within_seconds_and_acked_with_version_and_nonce() {
    let ads = AdsServer::start().await;
    let mut s = sluice_on(&ads, false).await;
    let http_addr = s.handle().http_addr;

    // Subscribed: the first request names the node and the resource type.
    let first = ads
        .wait_for_request("the first request", Duration::from_secs(10), |_| true)
        .await;
    assert_eq!(first.type_url, TYPE_URL);
    assert_eq!(first.version_info, "");
    assert_eq!(first.response_nonce, "");
    let node = first.node.expect("the node");
    assert_eq!(node.id, "test-node");
    let metadata = node.metadata.expect("node metadata");
    assert_eq!(metadata.fields.len(), 2, "{metadata:?}");
    // Not ready before the first set; /healthcheck answers as envoyproxy/ratelimit's.
    let ready = http::get(http_addr, "/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert!(
        ready.body.contains("waiting for the first limits"),
        "{}",
        ready.body
    );
    assert_eq!(http::get(http_addr, "/healthcheck").await.status, 500);
    assert_eq!(grpc_health(&s).await, ServingStatus::NotServing);

    ads.push_configs("v1", &[per_minute("edge", "remote_address", 2)]);
    let took = served_version(&s, "v1").await;
    assert!(took < Duration::from_secs(5), "served after {took:?}");
    let nonce = ads.sent_nonce("v1").await;
    let ack = ads.ack_of("v1", &nonce).await;
    assert_eq!(ack.version_info, "v1");
    assert_eq!(ack.response_nonce, nonce);
    assert_eq!(ack.type_url, TYPE_URL);
    assert!(ack.error_detail.is_none());

    let rule = expected("remote_address", 2);
    s.to_next_window(MINUTE);
    for (remaining, code) in [(1, Code::Ok), (0, Code::Ok), (0, Code::OverLimit)] {
        let got = s.status("edge", &[("remote_address", "10.0.0.1")]).await;
        assert_eq!(got, status(code, &rule, remaining, MINUTE));
    }

    let ready = http::get(http_addr, "/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(grpc_health(&s).await, ServingStatus::Serving);
    let health = http::get(http_addr, "/healthcheck").await;
    assert_eq!((health.status, health.body.as_str()), (200, "OK"));
    let shown = http::get(http_addr, "/config").await.json();
    assert_eq!(shown["limits_source"]["type"], "xds");
    assert_eq!(shown["limits_source"]["xds"]["version"], "v1");
    assert_eq!(
        shown["domains"]["edge"]["file"], "xds:edge-limits",
        "{shown:#}"
    );
    let metrics = http::get(http_addr, "/metrics").await.body;
    assert!(
        metrics.contains("sluice_xds_responses_total{result=\"ack\"} 1"),
        "{metrics}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_snapshot_is_nacked_with_the_reason_and_the_previous_limits_stay() {
    let ads = AdsServer::start().await;
    let mut s = sluice_on(&ads, false).await;
    ads.push_configs("v1", &[per_minute("edge", "remote_address", 2)]);
    served_version(&s, "v1").await;
    let v1_nonce = ads.sent_nonce("v1").await;
    ads.ack_of("v1", &v1_nonce).await;

    // A descriptor without a unit, and a second resource of a domain already pushed.
    let mut broken = per_minute("other", "remote_address", 5);
    broken.descriptors[0]
        .rate_limit
        .as_mut()
        .expect("rate limit")
        .unit = ConfUnit::Unknown as i32;
    let mut twin = per_minute("edge", "user", 1);
    twin.name = "edge-twin".into();
    ads.push_configs(
        "v2",
        &[per_minute("edge", "remote_address", 5), broken, twin],
    );
    let v2_nonce = ads.sent_nonce("v2").await;
    let nack = ads.nack_of(&v2_nonce).await;
    // The version still served, the rejected response's nonce, and why.
    assert_eq!(nack.version_info, "v1");
    let detail = nack.error_detail.expect("error_detail");
    assert_eq!(detail.code, 3, "INVALID_ARGUMENT");
    for part in [
        "xds:other-limits",
        "route \"remote_address\"",
        "rate_limit.unit",
        "missing",
        "xds:edge-twin",
        "domain \"edge\" is already defined in xds:edge-limits",
    ] {
        assert!(detail.message.contains(part), "{part}: {}", detail.message);
    }

    // Bytes that are no RateLimitConfig, and a resource of another type.
    ads.push(
        "v3",
        vec![prost_types::Any {
            type_url: TYPE_URL.into(),
            value: vec![0xff, 0xff, 0xff],
        }],
    );
    let nack = ads.nack_of(&ads.sent_nonce("v3").await).await;
    let detail = nack.error_detail.expect("error_detail").message;
    assert!(
        detail.contains("cannot decode a RateLimitConfig"),
        "{detail}"
    );
    assert_eq!(nack.version_info, "v1");

    // v1 still answers.
    let rule = expected("remote_address", 2);
    s.to_next_window(MINUTE);
    let got = s.status("edge", &[("remote_address", "10.0.0.1")]).await;
    assert_eq!(got, status(Code::Ok, &rule, 1, MINUTE));
    let status_now = s.handle().xds.clone().expect("xds").shown();
    assert_eq!(status_now.version.as_deref(), Some("v1"));
    assert_eq!(status_now.nacks, 2);

    // A valid one after is taken.
    ads.push_configs("v4", &[per_minute("edge", "remote_address", 7)]);
    served_version(&s, "v4").await;
    let v4_nonce = ads.sent_nonce("v4").await;
    assert_eq!(ads.ack_of("v4", &v4_nonce).await.version_info, "v4");
    let got = s.status("edge", &[("remote_address", "10.0.0.1")]).await;
    assert_eq!(
        got,
        status(Code::Ok, &expected("remote_address", 7), 5, MINUTE),
        "the counter kept its count across the swap"
    );
    let metrics = http::get(s.handle().http_addr, "/metrics").await.body;
    assert!(
        metrics.contains("sluice_xds_responses_total{result=\"nack\"} 2"),
        "{metrics}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_management_server_is_resubscribed_while_the_last_limits_keep_working() {
    let mut ads = AdsServer::start().await;
    let mut s = sluice_on(&ads, false).await;
    ads.push_configs("v1", &[per_minute("edge", "remote_address", 3)]);
    served_version(&s, "v1").await;
    ads.ack_of("v1", &ads.sent_nonce("v1").await).await;

    ads.stop().await;
    let status_handle = s.handle().xds.clone().expect("xds");
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_handle.shown().connected {
        assert!(Instant::now() < deadline, "the lost stream was not noticed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Down: the last limits answer, and sluice stays ready.
    let rule = expected("remote_address", 3);
    s.to_next_window(MINUTE);
    let got = s.status("edge", &[("remote_address", "10.0.0.1")]).await;
    assert_eq!(got, status(Code::Ok, &rule, 2, MINUTE));
    assert_eq!(http::get(s.handle().http_addr, "/readyz").await.status, 200);

    // Back with a new snapshot: subscribed again, telling the version it has.
    let before = ads.requests().len();
    ads.push_configs("v2", &[per_minute("edge", "remote_address", 4)]);
    ads.restart().await;
    let again = ads
        .wait_for_request("a new subscription", Duration::from_secs(10), |r| {
            r.response_nonce.is_empty() && r.version_info == "v1"
        })
        .await;
    assert_eq!(again.type_url, TYPE_URL);
    assert!(ads.requests().len() > before);
    served_version(&s, "v2").await;
    ads.ack_of("v2", &ads.sent_nonce("v2").await).await;
    let got = s.status("edge", &[("remote_address", "10.0.0.1")]).await;
    assert_eq!(
        got,
        status(Code::Ok, &expected("remote_address", 4), 2, MINUTE)
    );
    let shown = status_handle.shown();
    assert!(shown.reconnects >= 1, "{shown:?}");
    let metrics = http::get(s.handle().http_addr, "/metrics").await.body;
    assert!(
        !metrics.contains("sluice_xds_reconnects_total 0"),
        "reconnects counted: {metrics}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_start_is_ready_before_the_first_set_and_answers_ok() {
    let ads = AdsServer::start().await;
    let mut s = sluice_on(&ads, true).await;
    let ready = http::get(s.handle().http_addr, "/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    let got = s.status("edge", &[("remote_address", "10.0.0.1")]).await;
    assert_eq!(got.code, Code::Ok as i32);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_snapshot_is_applied_not_refused() {
    let ads = AdsServer::start().await;
    let mut s = sluice_on(&ads, false).await;
    ads.push_configs("v1", &[per_minute("edge", "remote_address", 1)]);
    served_version(&s, "v1").await;
    ads.push_configs("v2", &[]);
    served_version(&s, "v2").await;
    ads.ack_of("v2", &ads.sent_nonce("v2").await).await;
    assert!(s.handle().limiter.limits().domains.is_empty());
    for _ in 0..3 {
        let got = s.status("edge", &[("remote_address", "10.0.0.1")]).await;
        assert_eq!(got.code, Code::Ok as i32);
    }
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Acceptance: the same limits from disk and over xDS give the same answers.

/// Fields of the YAML format that `RateLimitConfig` has no field for (upstream's xDS path
/// cannot push them either).
const YAML_ONLY: &[&str] = &["share_threshold", "value_to_metric", "unit_multiplier"];

/// The file as pushable: when a descriptor uses a field of [`YAML_ONLY`], that descriptor
/// (and what is under it) is left out of both sides, and the rest written as JSON (which YAML
/// reads). Returns the text and the paths left out.
fn pushable(text: &str) -> (String, Vec<String>) {
    if !YAML_ONLY.iter().any(|f| text.contains(&format!("{f}:"))) {
        return (text.to_string(), Vec::new());
    }
    let mut tree: serde_json::Value = serde_saphyr::from_str(text).expect("YAML");
    let mut dropped = Vec::new();
    prune(&mut tree["descriptors"], "", &mut dropped);
    (tree.to_string(), dropped)
}

fn prune(level: &mut serde_json::Value, parent: &str, dropped: &mut Vec<String>) {
    let Some(items) = level.as_array_mut() else {
        return;
    };
    items.retain(|d| {
        let yaml_only = YAML_ONLY
            .iter()
            .any(|f| d.get(f).is_some() || d["rate_limit"].get(f).is_some());
        if yaml_only {
            dropped.push(format!(
                "{parent}/{}={}",
                d["key"].as_str().unwrap_or_default(),
                d["value"].as_str().unwrap_or_default()
            ));
        }
        !yaml_only
    });
    for d in items.iter_mut() {
        let path = format!("{parent}/{}", d["key"].as_str().unwrap_or_default());
        prune(&mut d["descriptors"], &path, dropped);
    }
}

/// Every envoyproxy/ratelimit example: the README's and `config/limits-envoy/`.
fn examples() -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = envoy_examples::ALL
        .iter()
        .map(|(name, text)| (name.to_string(), text.to_string()))
        .collect();
    let dir = common::repo_path("config/limits-envoy");
    for entry in std::fs::read_dir(&dir).expect("config/limits-envoy") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let name = path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .to_string();
            all.push((name, std::fs::read_to_string(&path).expect("read example")));
        }
    }
    all
}

/// One request per descriptor path of the tree (a wildcard value filled in, a key without a
/// value given one), plus one with every top-level path at once.
fn requests_of(text: &str) -> Vec<Vec<Vec<(String, String)>>> {
    let tree: serde_json::Value = serde_saphyr::from_str(text).expect("YAML");
    let mut paths = Vec::new();
    walk(&tree["descriptors"], &mut Vec::new(), &mut paths);
    let mut requests: Vec<Vec<Vec<(String, String)>>> =
        paths.iter().map(|p| vec![p.clone()]).collect();
    requests.push(paths);
    requests
}

fn walk(
    level: &serde_json::Value,
    prefix: &mut Vec<(String, String)>,
    out: &mut Vec<Vec<(String, String)>>,
) {
    for d in level.as_array().into_iter().flatten() {
        let key = d["key"].as_str().unwrap_or_default().to_string();
        let value = match d["value"].as_str() {
            Some(v) => v.replace('*', "x"),
            None => "any-value".into(),
        };
        prefix.push((key, value));
        out.push(prefix.clone());
        walk(&d["descriptors"], prefix, out);
        prefix.pop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_configs_pushed_over_xds_answer_as_the_same_files_from_disk() {
    let mut compared = 0;
    let mut files = 0;
    for (name, text) in examples() {
        let (text, dropped) = pushable(&text);
        if !dropped.is_empty() {
            eprintln!(
                "{name}: compared without {dropped:?}, whose fields RateLimitConfig cannot carry"
            );
        }
        files += 1;
        let mut from_files = Sluice::start(&[(name.as_str(), text.as_str())]).await;
        let ads = AdsServer::start().await;
        let mut from_xds = sluice_on(&ads, false).await;
        let config = config_from_yaml(&name, &text);
        ads.push_configs("1", &[config]);
        served_version(&from_xds, "1").await;

        // The loaded domains are the same, but for where they came from.
        let mut a = from_files.handle().limiter.limits().to_json();
        let mut b = from_xds.handle().limiter.limits().to_json();
        for shown in [&mut a, &mut b] {
            for (_, domain) in shown.as_object_mut().expect("domains").iter_mut() {
                domain["file"] = serde_json::Value::Null;
            }
        }
        assert_eq!(a, b, "{name}: the loaded limits differ");

        for request in requests_of(&text) {
            let domain = from_files
                .handle()
                .limiter
                .limits()
                .domains
                .keys()
                .next()
                .cloned()
                .expect("one domain");
            // Up to past the smallest limit of the file, on the same clock readings.
            for i in 0..8 {
                let r = || {
                    common::rls::request(
                        &domain,
                        request
                            .iter()
                            .map(|entries| {
                                let pairs: Vec<(&str, &str)> = entries
                                    .iter()
                                    .map(|(k, v)| (k.as_str(), v.as_str()))
                                    .collect();
                                desc(&pairs)
                            })
                            .collect(),
                    )
                };
                let want = from_files.call(r()).await;
                let got = from_xds.call(r()).await;
                assert_eq!(got, want, "{name}: request {request:?}, hit {}", i + 1);
                from_files.advance(7);
                from_xds.advance(7);
            }
            compared += 1;
        }
        from_files.stop().await;
        from_xds.stop().await;
    }
    assert!(compared >= 20, "only {compared} requests compared");
    assert_eq!(
        files,
        envoy_examples::ALL.len() + 1,
        "every example compared"
    );
}
