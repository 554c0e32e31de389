//! RLQS through the real Envoy 1.40: `config/envoy/rlqs.yaml` (the `rate_limit_quota` filter
//! pointed at sluice) in front of a route limited to 10 requests a minute.
//!
//! - One Envoy: of 30 requests in one minute (the first alone, the rest a second later),
//!   9 to 11 pass and the rest get 429.
//! - Two Envoys on one sluice, then two sluice replicas on one Redis with an Envoy each:
//!   together they admit at most the limit plus each Envoy's first (unassigned) request.
//!
//! - The bytes of Envoy's first report are those of `tests/fixtures/rlqs_first_report.bin`
//!   (which `tests/rlqs_shares.rs` decodes on every machine).
//!
//! Real time (Envoy): each test starts well inside a minute window, so its requests all fall
//! in one window of the limit.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::envoy::{
    Envoy, Ports, envoy_bin, replace_once, rlqs_bootstrap, start_h2_server, start_upstream,
};
use common::http;
use common::metrics::{metric, scrape};
use common::redis::RedisServer;
use common::sluice::LiveSluice;
use common::{free_port, repo_path};
use sluice::config::settings::Backend;

/// The domain and buckets of `config/envoy/rlqs.yaml`, with a small limit on `api`.
const LIMITS: &str = r#"
domain: edge
routes:
  - name: api
    global_threshold: { query_per_minute: 10 }
  - name: api-users
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - { key: "*", query_per_minute: 100 }
"#;
const LIMIT: usize = 10;

async fn envoy_for(sluice: &LiveSluice, upstream: u16) -> Envoy {
    let ports = Ports {
        listener: free_port(),
        upstream,
        rls: sluice.grpc_port(),
        admin: free_port(),
    };
    // Envoy holds a connection it answered itself (a 429) open for up to 1 s for the client
    // to close first; the test's client reads to the end, so each 429 would take a second.
    let config = rlqs_bootstrap(&ports, |c| {
        replace_once(
            &c,
            "\n                stat_prefix: edge\n",
            "\n                stat_prefix: edge\n                delayed_close_timeout: 0s\n",
        )
    });
    Envoy::start(&config, ports.listener).await
}

/// Waits, if need be, so that the next `within` all fall in one minute window.
async fn inside_one_window(within: Duration) {
    let now = now_ms();
    let left = 60_000 - now % 60_000;
    if u128::from(left) < within.as_millis() {
        tokio::time::sleep(Duration::from_millis(left + 200)).await;
    }
}

/// Sends `n` requests through `envoy` and returns how many passed; every other one must be
/// Envoy's quota denial (429).
async fn send(envoy: &Envoy, n: usize, headers: &[(&str, &str)]) -> usize {
    send_timed(envoy, n, headers).await.len()
}

/// The same, returning the minute window (of the epoch, as the limit's) each pass fell in.
async fn send_timed(envoy: &Envoy, n: usize, headers: &[(&str, &str)]) -> Vec<u64> {
    let mut passed = Vec::new();
    for _ in 0..n {
        let r = envoy.get("/", headers).await;
        match r.status {
            200 => passed.push(now_ms() / 60_000),
            429 => {}
            other => panic!(
                "a request got {other} ({}), not 200 or 429\n{}",
                r.body,
                envoy.log_text()
            ),
        }
    }
    passed
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_envoy_admits_the_limit_of_a_minute() {
    envoy_bin();
    let upstream = start_upstream().await;
    let sluice = LiveSluice::start(&[("edge.yaml", LIMITS)]).await;
    let envoy = envoy_for(&sluice, upstream).await;
    inside_one_window(Duration::from_secs(10)).await;

    let first = send(&envoy, 1, &[]).await;
    assert_eq!(first, 1, "the first request passes before any assignment");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rest = send(&envoy, 29, &[]).await;
    let passed = first + rest;
    println!("one Envoy: {passed} of 30 passed, limit {LIMIT}");
    assert!(
        (LIMIT - 1..=LIMIT + 1).contains(&passed),
        "{passed} of 30 passed, not about {LIMIT}\n{}",
        envoy.log_text()
    );

    // Another bucket (a per-key rule) is counted apart; sluice shows what it did.
    assert_eq!(send(&envoy, 3, &[("x-api-key", "k1")]).await, 3);
    let page = scrape(sluice.http_addr()).await;
    assert_eq!(metric(&page, "sluice_rlqs_streams"), Some(1.0), "{page}");
    assert!(
        metric(
            &page,
            "sluice_rlqs_assignments_total{kind=\"token_bucket\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{page}"
    );
    let denied = metric(
        &page,
        "sluice_rlqs_reported_requests_total{domain=\"edge\",route=\"api\",result=\"allowed\"}",
    );
    assert!(denied.unwrap_or(0.0) >= 1.0, "{page}");
    let config = http::get(sluice.http_addr(), "/config").await.json();
    assert_eq!(
        config["rlqs"]["edge"]["routes"],
        serde_json::json!(["api", "api-users"]),
        "{config}"
    );
}

/// Two Envoys, each on its own sluice (`replicas`) or both on one. Each Envoy sends its first
/// request, then 20 more a second later. Checks the bound in each minute window the passes fell
/// in (a slow machine can carry the run past a window's end, where a new window's limit
/// begins), and that sharing did not starve them. Returns the passes.
async fn two_envoys(sluices: &[LiveSluice], what: &str) -> usize {
    let upstream = start_upstream().await;
    let a = envoy_for(&sluices[0], upstream).await;
    let b = envoy_for(&sluices[sluices.len() - 1], upstream).await;
    inside_one_window(Duration::from_secs(10)).await;
    let started = std::time::Instant::now();
    let mut passed = send_timed(&a, 1, &[]).await;
    passed.extend(send_timed(&b, 1, &[]).await);
    assert_eq!(
        passed.len(),
        2,
        "each Envoy's first request passes unassigned"
    );
    let first_window = passed[0];
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (x, y) = tokio::join!(send_timed(&a, 20, &[]), send_timed(&b, 20, &[]));
    passed.extend(x);
    passed.extend(y);
    let mut per_window = std::collections::BTreeMap::new();
    for w in &passed {
        *per_window.entry(*w).or_insert(0usize) += 1;
    }
    println!(
        "{what}: {} of 42 passed in {:?}, by minute window {per_window:?}, limit {LIMIT}",
        passed.len(),
        started.elapsed()
    );
    for (w, n) in &per_window {
        let firsts = if *w == first_window { 2 } else { 0 };
        assert!(
            *n <= LIMIT + firsts,
            "{what}: {n} passed in one window, more than the limit {LIMIT} and {firsts} first \
             requests (by window: {per_window:?})"
        );
    }
    assert!(
        passed.len() >= LIMIT - 1,
        "{what}: only {} passed of a limit of {LIMIT}",
        passed.len()
    );
    passed.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_envoys_on_one_sluice_share_the_limit() {
    envoy_bin();
    let sluice = [LiveSluice::start(&[("edge.yaml", LIMITS)]).await];
    two_envoys(&sluice, "two Envoys on one sluice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sluice_replicas_on_one_redis_share_the_limit() {
    envoy_bin();
    let redis = RedisServer::start();
    let url = redis.url();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        replicas.push(
            LiveSluice::start_with(&[("edge.yaml", LIMITS)], |s| {
                s.backend = Backend::Redis;
                s.redis.url = url.clone();
            })
            .await,
        );
    }
    two_envoys(&replicas, "two replicas on one Redis").await;
    // The shares were taken in Redis, not in each replica's memory.
    for replica in &replicas {
        let page = scrape(replica.http_addr()).await;
        assert_eq!(
            metric(&page, "sluice_rlqs_fallback_shares_total"),
            None,
            "{page}"
        );
    }
}

/// Envoy's first report on a stream, read by a bare HTTP/2 server standing in for sluice: the
/// request's path, and the first gRPC message of the stream.
async fn capture_first_report() -> (u16, tokio::sync::mpsc::Receiver<(String, Vec<u8>)>) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let port = start_h2_server(move |(request, _respond)| {
        let tx = tx.clone();
        async move {
            let (parts, mut body) = request.into_parts();
            let mut raw = Vec::new();
            // The stream stays open: read until one whole message is in.
            while let Some(Ok(chunk)) = body.data().await {
                let _ = body.flow_control().release_capacity(chunk.len());
                raw.extend_from_slice(&chunk);
                if let [0, a, b, c, d, rest @ ..] = raw.as_slice() {
                    let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
                    if rest.len() >= len {
                        let _ = tx
                            .send((parts.uri.path().to_string(), rest[..len].to_vec()))
                            .await;
                        return;
                    }
                }
            }
        }
    })
    .await;
    (port, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_s_first_report_is_the_fixture() {
    const FIXTURE: &str = "tests/fixtures/rlqs_first_report.bin";
    envoy_bin();
    let upstream = start_upstream().await;
    let (rlqs, mut captured) = capture_first_report().await;
    let ports = Ports {
        listener: free_port(),
        upstream,
        rls: rlqs,
        admin: free_port(),
    };
    // The fixture's domain; its bucket is the route-wide one, {route: api}.
    let config = rlqs_bootstrap(&ports, |c| {
        replace_once(&c, "domain: edge", "domain: quota")
    });
    let envoy = Envoy::start(&config, ports.listener).await;
    let r = envoy.get("/", &[]).await;
    assert_eq!(r.status, 200, "the first request passes unassigned: {r:?}");
    let (path, message) = tokio::time::timeout(Duration::from_secs(5), captured.recv())
        .await
        .expect("Envoy opened an RLQS stream")
        .expect("a report");
    assert_eq!(
        path,
        "/envoy.service.rate_limit_quota.v3.RateLimitQuotaService/StreamRateLimitQuotas"
    );
    let kept = std::fs::read(repo_path(FIXTURE)).expect("the fixture");
    assert_eq!(
        kept, message,
        "{FIXTURE} differs from what this Envoy sends: capture it again if Envoy changed"
    );
}
