//! Eviction refused or announced: a Redis whose `maxmemory-policy` can evict counters (every
//! `allkeys-*` and `volatile-*`: counters have TTLs) would silently reset limits, so the real
//! `sluice serve` says so in its log (WARN, naming the policy and the fix), on `/metrics`
//! (`sluice_redis_eviction_policy_unsafe` and `sluice_redis_eviction_policy{policy}`) and on
//! `/readyz` (still 200, a line after the `ready: ...` one), and with
//! `redis.require_noeviction` it refuses to start. `noeviction` gives none of it; a CONFIG
//! that Redis refuses is shown as unknown and never fails a request; a policy changed while
//! serving shows at the next check (the period is set short with
//! `SLUICE_REDIS_EVICTION_CHECK_INTERVAL`, no test waits for the 60 s default).
//!
//! Also on a cluster (every master is read) and through Sentinel (the master is read).
//!
//! Each test starts its own `redis-server` (the kit's, so the Valkey run of scripts/test.sh
//! checks Valkey too) and its own binary.

mod common;

use std::time::{Duration, Instant};

use common::cluster::RedisCluster;
use common::http::{self, HttpResponse};
use common::metrics::{metric, scrape};
use common::redis::RedisServer;
use common::resp::Resp;
use common::rls::{Code, desc, request};
use common::sentinel::RedisSentinel;
use common::sluice::SluiceProcess;

const LIMITS: &str = r#"
domain: evict
routes:
  - name: api
    global_threshold: { query_per_minute: 1000 }
"#;

const FIX: &str = "CONFIG SET maxmemory-policy noeviction";
const UNSAFE: &str = "sluice_redis_eviction_policy_unsafe";

/// The binary serving [`LIMITS`] from `redis`, with `env` added; logs at INFO so the
/// one-time INFO line of a refused CONFIG shows too.
fn serve(redis: &RedisServer, env: &[(&str, &str)]) -> (SluiceProcess, tempfile::TempDir) {
    let dir = limits_dir();
    let url = redis.url();
    let mut all = vec![
        ("SLUICE_BACKEND", "redis"),
        ("SLUICE_REDIS_URL", url.as_str()),
        ("SLUICE_LOG", "info"),
    ];
    all.extend_from_slice(env);
    (SluiceProcess::spawn(dir.path(), &all), dir)
}

fn limits_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("evict.yaml"), LIMITS).expect("write limits");
    dir
}

fn policy_gauge(page: &str, policy: &str) -> Option<f64> {
    metric(
        page,
        &format!("sluice_redis_eviction_policy{{policy=\"{policy}\"}}"),
    )
}

/// Polls `/metrics` until `policy`'s gauge is 1 (the check has run and seen it), for at most
/// 10 s; returns the page.
async fn wait_for_policy(sluice: &SluiceProcess, policy: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = scrape(sluice.http_addr).await;
        if policy_gauge(&page, policy) == Some(1.0) {
            return page;
        }
        assert!(
            Instant::now() < deadline,
            "sluice_redis_eviction_policy{{policy=\"{policy}\"}} never became 1:\n{page}\n{}",
            sluice.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn readyz(sluice: &SluiceProcess) -> HttpResponse {
    http::get(sluice.http_addr, "/readyz").await
}

/// One request is answered OK (counted in Redis, or by the fallback: never refused).
async fn answered(sluice: &SluiceProcess) {
    let mut client = sluice.client().await;
    let response = client
        .should_rate_limit(request("evict", vec![desc(&[("route", "api")])]))
        .await
        .unwrap_or_else(|s| panic!("request refused: {s:?}\n{}", sluice.output()))
        .into_inner();
    assert_eq!(response.overall_code, Code::Ok as i32, "{response:?}");
}

/// Checks what a policy that can evict gives: the WARN log, both gauges and the `/readyz`
/// line, the replica staying ready.
async fn announced(policy: &str) {
    let redis = RedisServer::start_with(&["--maxmemory-policy", policy]);
    let (sluice, _dir) = serve(&redis, &[]);
    let page = wait_for_policy(&sluice, policy).await;
    assert_eq!(metric(&page, UNSAFE), Some(1.0), "{page}");
    assert_eq!(policy_gauge(&page, "noeviction"), Some(0.0), "{page}");

    let ready = readyz(&sluice).await;
    assert_eq!(
        ready.status, 200,
        "an eviction policy does not unready: {}",
        ready.body
    );
    let lines: Vec<&str> = ready.body.lines().collect();
    assert!(
        lines.len() == 2 && lines[0].starts_with("ready: limits loaded"),
        "the first line keeps its form, the warning follows: {:?}",
        ready.body
    );
    assert!(
        lines[1].contains(policy) && lines[1].contains(FIX),
        "the line names the policy and the fix: {:?}",
        lines[1]
    );

    let log = sluice.output();
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("maxmemory-policy"))
        .collect();
    assert_eq!(warned.len(), 1, "one WARN line (not one per check):\n{log}");
    assert!(
        warned[0].contains(policy) && warned[0].contains(FIX),
        "the WARN names the policy and the fix: {}",
        warned[0]
    );
    answered(&sluice).await;
}

#[tokio::test]
async fn allkeys_lru_is_announced_in_the_log_metrics_and_readyz() {
    announced("allkeys-lru").await;
}

#[tokio::test]
async fn volatile_lru_is_announced_in_the_log_metrics_and_readyz() {
    announced("volatile-lru").await;
}

#[tokio::test]
async fn noeviction_gives_no_warning() {
    let redis = RedisServer::start_with(&["--maxmemory-policy", "noeviction"]);
    let (sluice, _dir) = serve(&redis, &[]);
    let page = wait_for_policy(&sluice, "noeviction").await;
    assert_eq!(metric(&page, UNSAFE), Some(0.0), "{page}");
    let ready = readyz(&sluice).await;
    assert_eq!(ready.status, 200);
    assert_eq!(
        ready.body.lines().count(),
        1,
        "no warning line: {:?}",
        ready.body
    );
    let log = sluice.output();
    assert!(!log.contains("maxmemory-policy"), "nothing to say:\n{log}");
}

#[tokio::test]
async fn a_policy_changed_while_serving_shows_at_the_next_check() {
    let redis = RedisServer::start_with(&["--maxmemory-policy", "noeviction"]);
    let (sluice, _dir) = serve(&redis, &[("SLUICE_REDIS_EVICTION_CHECK_INTERVAL", "200ms")]);
    wait_for_policy(&sluice, "noeviction").await;
    assert_eq!(readyz(&sluice).await.body.lines().count(), 1);

    let set = |policy: &str| {
        let reply = redis.cmd(&["CONFIG", "SET", "maxmemory-policy", policy]);
        assert_eq!(reply, Resp::Simple("OK".into()), "CONFIG SET {policy}");
    };
    set("allkeys-lfu");
    let page = wait_for_policy(&sluice, "allkeys-lfu").await;
    assert_eq!(metric(&page, UNSAFE), Some(1.0), "{page}");
    assert_eq!(policy_gauge(&page, "noeviction"), Some(0.0), "{page}");
    let ready = readyz(&sluice).await;
    assert!(ready.body.contains("allkeys-lfu"), "{}", ready.body);

    // And back: the warning goes with the policy.
    set("noeviction");
    let page = wait_for_policy(&sluice, "noeviction").await;
    assert_eq!(metric(&page, UNSAFE), Some(0.0), "{page}");
    assert_eq!(policy_gauge(&page, "allkeys-lfu"), Some(0.0), "{page}");
    let ready = readyz(&sluice).await;
    assert_eq!(ready.body.lines().count(), 1, "{}", ready.body);
}

#[tokio::test]
async fn a_refused_config_is_unknown_and_never_fails_a_request() {
    // As managed Redis services do: CONFIG renamed away.
    let redis = RedisServer::start_with(&["--rename-command", "CONFIG", ""]);
    let (sluice, _dir) = serve(&redis, &[("SLUICE_REDIS_EVICTION_CHECK_INTERVAL", "200ms")]);
    let page = wait_for_policy(&sluice, "unknown").await;
    assert_eq!(
        metric(&page, UNSAFE),
        Some(0.0),
        "not known to be unsafe: {page}"
    );
    let ready = readyz(&sluice).await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    let lines: Vec<&str> = ready.body.lines().collect();
    assert!(
        lines.len() == 2 && lines[0].starts_with("ready: ") && lines[1].contains("unknown"),
        "{:?}",
        ready.body
    );
    answered(&sluice).await;
    // Several checks later, still said once.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let log = sluice.output();
    let said = log
        .lines()
        .filter(|l| l.contains("cannot read Redis maxmemory-policy"))
        .count();
    assert_eq!(said, 1, "said once, at INFO:\n{log}");
    assert!(
        log.lines()
            .filter(|l| l.contains("cannot read Redis maxmemory-policy"))
            .all(|l| l.contains("INFO")),
        "{log}"
    );
}

#[test]
fn require_noeviction_refuses_to_start_naming_the_policy() {
    let redis = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let dir = limits_dir();
    let limits = dir.path().display().to_string();
    let url = redis.url();
    let mut sluice = SluiceProcess::launch(
        &["serve"],
        &[
            ("SLUICE_LIMITS_DIR", limits.as_str()),
            ("SLUICE_BACKEND", "redis"),
            ("SLUICE_REDIS_URL", url.as_str()),
            ("SLUICE_REDIS_REQUIRE_NOEVICTION", "true"),
        ],
    );
    let status = sluice
        .wait_for_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("sluice kept running:\n{}", sluice.output()));
    assert!(!status.success(), "{status}:\n{}", sluice.output());
    let stderr = sluice.stderr();
    assert!(
        stderr.contains("allkeys-lru") && stderr.contains(FIX),
        "the error names the policy and the fix:\n{}",
        sluice.output()
    );
}

#[tokio::test]
async fn require_noeviction_starts_on_noeviction() {
    let redis = RedisServer::start_with(&["--maxmemory-policy", "noeviction"]);
    let (sluice, _dir) = serve(&redis, &[("SLUICE_REDIS_REQUIRE_NOEVICTION", "true")]);
    wait_for_policy(&sluice, "noeviction").await;
    answered(&sluice).await;
}

#[tokio::test]
async fn on_a_cluster_every_master_is_checked() {
    let cluster = RedisCluster::start(3);
    // One master of three can evict: the warning names it, and only it.
    let evicting = cluster.nodes[2].port;
    let reply = cluster.nodes[2].cmd(&["CONFIG", "SET", "maxmemory-policy", "volatile-ttl"]);
    assert_eq!(reply, Resp::Simple("OK".into()));
    let dir = limits_dir();
    let url = cluster.url();
    let sluice = SluiceProcess::spawn(
        dir.path(),
        &[
            ("SLUICE_BACKEND", "redis"),
            ("SLUICE_REDIS_URL", url.as_str()),
        ],
    );
    let page = wait_for_policy(&sluice, "volatile-ttl").await;
    assert_eq!(metric(&page, UNSAFE), Some(1.0), "{page}");
    assert_eq!(
        policy_gauge(&page, "noeviction"),
        Some(1.0),
        "the others: {page}"
    );
    let ready = readyz(&sluice).await;
    let warning = ready.body.lines().nth(1).unwrap_or_default().to_string();
    assert!(
        warning.contains(&format!("volatile-ttl on 127.0.0.1:{evicting}")),
        "{}",
        ready.body
    );
    for node in &cluster.nodes[..2] {
        assert!(!warning.contains(&node.port.to_string()), "{warning}");
    }
    answered(&sluice).await;
}

#[tokio::test]
async fn through_sentinel_the_master_is_checked() {
    let setup = RedisSentinel::start(1);
    // The master can evict, the replica cannot: only the master's policy counts.
    let reply = setup
        .master
        .cmd(&["CONFIG", "SET", "maxmemory-policy", "allkeys-random"]);
    assert_eq!(reply, Resp::Simple("OK".into()));
    let dir = limits_dir();
    let url = setup.url();
    let sluice = SluiceProcess::spawn(
        dir.path(),
        &[
            ("SLUICE_BACKEND", "redis"),
            ("SLUICE_REDIS_URL", url.as_str()),
        ],
    );
    let page = wait_for_policy(&sluice, "allkeys-random").await;
    assert_eq!(metric(&page, UNSAFE), Some(1.0), "{page}");
    assert_eq!(policy_gauge(&page, "noeviction"), Some(0.0), "{page}");
    let ready = readyz(&sluice).await;
    assert!(ready.body.contains("allkeys-random"), "{}", ready.body);
    answered(&sluice).await;
}
