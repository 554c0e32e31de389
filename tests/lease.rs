//! `lease`: hits taken from Redis in blocks.
//!
//! The setting as written (inherited, refused where it cannot work, shown on `/config`), one
//! replica on a manual clock counting exactly to the limit from leased blocks (fixed window and
//! token bucket), and three real replicas sharing one redis-server under concurrent load: never
//! past the limit, nearly all of it admitted, and few script calls.

mod common;

use std::time::{Duration, Instant};

use common::config::{
    Expect, assert_error, domain_of, errors_of, find, line_equal, line_of, route,
};
use common::http::get;
use common::metrics::{metric, scrape};
use common::redis::RedisServer;
use common::rls::{Code, desc, metadata, request};
use common::sluice::{Sluice, SluiceProcess};
use sluice::config::settings::Backend;
use sluice::limiter::Lease;

// ---------------------------------------------------------------------------------------------
// The setting.

#[test]
fn lease_is_inherited_from_defaults_and_a_route_can_change_or_turn_it_off() {
    let text = "\
domain: edge
defaults:
  lease: auto
routes:
  - name: inherits
    global_threshold: { query_per_second: 100 }
  - name: blocks
    lease: 50
    global_threshold: { query_per_second: 100 }
  - name: exact
    lease: off
    global_threshold: { query_per_second: 100 }
  - name: child
    parent: blocks
";
    let domain = domain_of(text);
    let lease = |name: &str| {
        let s = &route(&domain, name).settings.lease;
        (s.value, s.from.clone())
    };
    assert_eq!(lease("inherits"), (Lease::Auto, "defaults".into()));
    assert_eq!(lease("blocks"), (Lease::Block(50), "blocks".into()));
    assert_eq!(lease("exact"), (Lease::Off, "exact".into()));
    assert_eq!(lease("child"), (Lease::Block(50), "blocks".into()));
}

#[test]
fn a_lease_that_is_not_auto_off_or_a_block_size_is_a_load_error() {
    for bad in ["0", "-3", "sometimes", "1000001", "true"] {
        let text = format!(
            "\
domain: edge
routes:
  - name: api
    lease: {bad}
    global_threshold: {{ query_per_second: 100 }}
"
        );
        let (file, errors) = errors_of(&text);
        let err = find(&errors, Some("api"), "lease");
        assert_error(
            err,
            Expect {
                file: &file,
                line: line_of(&text, "lease:"),
                route: Some("api"),
                field: "lease",
            },
        );
        assert!(
            err.message.contains("auto") && err.message.contains("1000000"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn a_leased_sliding_window_is_a_load_error_where_the_two_meet() {
    let text = "\
domain: edge
defaults:
  lease: auto
routes:
  - name: fine
    global_threshold: { query_per_second: 100 }
  - name: sliding
    algorithm: sliding_window
    global_threshold: { query_per_second: 100 }
  - name: sliding-exact
    algorithm: sliding_window
    lease: off
    global_threshold: { query_per_second: 100 }
";
    let (file, errors) = errors_of(text);
    assert_eq!(errors.len(), 1, "{errors:?}");
    let err = find(&errors, Some("sliding"), "lease");
    assert_error(
        err,
        Expect {
            file: &file,
            line: line_equal(text, "  - name: sliding"),
            route: Some("sliding"),
            field: "lease",
        },
    );
    assert!(
        err.message.contains("sliding_window") && err.message.contains("lease: off"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// One replica, manual clock, real Redis.

const LIMITS: &str = "\
domain: lease
defaults:
  timeout: 2s
routes:
  - name: window
    lease: auto
    global_threshold: { query_per_minute: 100 }
  - name: bucket
    lease: auto
    algorithm: token_bucket
    global_threshold: { query_per_minute: 100 }
  - name: exact
    global_threshold: { query_per_minute: 100 }
";

async fn on_redis(redis: &RedisServer) -> Sluice {
    let url = redis.url();
    Sluice::start_with(&[("lease.yaml", LIMITS)], move |s| {
        s.backend = Backend::Redis;
        s.redis.url = url;
        // A debug build on a busy machine: the store budget is not what is tested here.
        s.redis.command_timeout = Duration::from_secs(2);
    })
    .await
}

/// Sends `n` requests for `route` at the clock's current time; returns (admitted, sources).
async fn burst(sluice: &mut Sluice, route: &str, n: usize) -> (usize, Vec<String>) {
    let mut admitted = 0;
    let mut sources = Vec::new();
    for _ in 0..n {
        let r = sluice.ask_one("lease", desc(&[("route", route)])).await;
        if r.overall_code == Code::Ok as i32 {
            admitted += 1;
        }
        sources.push(metadata(&r, "source").unwrap_or("").to_string());
    }
    (admitted, sources)
}

#[tokio::test]
async fn one_replica_admits_exactly_the_limit_from_leased_blocks_in_both_algorithms() {
    let redis = RedisServer::start();
    let mut sluice = on_redis(&redis).await;
    sluice.to_next_window(60_000);
    for route in ["window", "bucket"] {
        redis.reset_stats();
        let (admitted, sources) = burst(&mut sluice, route, 150).await;
        let calls = redis.evalsha_calls();
        assert_eq!(admitted, 100, "{route}: one replica leaves nothing unused");
        let from_blocks = sources.iter().filter(|s| *s == "lease").count();
        assert!(
            from_blocks >= 60,
            "{route}: {from_blocks} of 150 from blocks: {sources:?}"
        );
        // Blocks grow with the demand, so most hits cost no call; past the limit the
        // over-limit cache answers.
        assert!(
            calls <= 40,
            "{route}: {calls} script calls for 150 requests"
        );
        println!("{route}: 100 of 150 admitted, {from_blocks} from blocks, {calls} EVALSHA");
    }
    // Without a lease every admitted hit is a call.
    redis.reset_stats();
    let (admitted, _) = burst(&mut sluice, "exact", 150).await;
    assert_eq!(admitted, 100);
    assert!(redis.evalsha_calls() >= 100, "{}", redis.evalsha_calls());

    // The bucket refills as usual: 600 ms bring one token back (100 per minute).
    sluice.advance(600);
    let (admitted, _) = burst(&mut sluice, "bucket", 3).await;
    assert_eq!(admitted, 1);
    // The window's leased count resets with the window.
    sluice.to_next_window(60_000);
    let (admitted, _) = burst(&mut sluice, "window", 100).await;
    assert_eq!(admitted, 100);

    // /config shows each route's lease, and /metrics what leasing did.
    let config = get(sluice.handle().http_addr, "/config").await.json();
    let lease =
        |route: &str| config["domains"]["lease"]["routes"][route]["settings"]["lease"].clone();
    assert_eq!(
        lease("window"),
        serde_json::json!({"value": "auto", "from": "window"})
    );
    assert_eq!(
        lease("exact"),
        serde_json::json!({"value": "off", "from": "builtin"})
    );
    let page = scrape(sluice.handle().http_addr).await;
    assert!(
        metric(&page, "sluice_leases_total").unwrap_or(0.0) >= 3.0,
        "{page}"
    );
    assert!(metric(&page, "sluice_lease_admitted_hits_total").unwrap_or(0.0) >= 100.0);
    sluice.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Three replicas, one redis-server, real time.

const SHARED: &str = "\
domain: lease
routes:
  - name: hot
    lease: auto
    # A debug build on a shared machine: Redis, not the store budget, is tested here.
    timeout: 200ms
    global_threshold: { query_per_minute: 3000 }
";

const REPLICAS: usize = 3;
const CLIENTS: usize = 12;
const REQUESTS: usize = 6_000;
const LIMIT: usize = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_sharing_a_leased_key_never_pass_its_limit_and_rarely_call_redis() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("lease.yaml"), SHARED).expect("write limits");
    let url = redis.url();
    let replicas: Vec<SluiceProcess> = (0..REPLICAS)
        .map(|_| {
            SluiceProcess::spawn(
                dir.path(),
                &[
                    ("SLUICE_BACKEND", "redis"),
                    ("SLUICE_REDIS_URL", &url),
                    ("SLUICE_REDIS_COMMAND_TIMEOUT", "200ms"),
                ],
            )
        })
        .collect();
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(replicas[i % REPLICAS].client().await);
    }

    // The whole run must fall in one minute window: start with at least 25 s of it left
    // (waiting out the rest of a window, never crossing one inside the run).
    let in_window = common::now_ms() % 60_000;
    if in_window > 35_000 {
        tokio::time::sleep(Duration::from_millis(60_000 - in_window + 20)).await;
    }
    let window = common::now_ms() / 60_000;
    redis.reset_stats();
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let (mut ok, mut over, mut errors) = (0usize, 0usize, Vec::new());
                for _ in 0..REQUESTS / CLIENTS {
                    let ask = request("lease", vec![desc(&[("route", "hot")])]);
                    match client.should_rate_limit(ask).await {
                        Ok(r) if r.get_ref().overall_code == Code::Ok as i32 => ok += 1,
                        Ok(_) => over += 1,
                        Err(e) => errors.push(format!("{:?}: {}", e.code(), e.message())),
                    }
                }
                (ok, over, errors)
            })
        })
        .collect();
    let (mut admitted, mut refused, mut errors) = (0, 0, Vec::new());
    for task in tasks {
        let (ok, over, errs) = task.await.expect("client task");
        admitted += ok;
        refused += over;
        errors.extend(errs);
    }
    let took = started.elapsed();
    let calls = redis.evalsha_calls();
    assert_eq!(
        common::now_ms() / 60_000,
        window,
        "the run crossed a window ({took:?}); its counts mean nothing"
    );
    let mut page = String::new();
    for r in &replicas {
        page.push_str(&scrape(r.http_addr).await);
    }
    let per_request = calls as f64 / REQUESTS as f64;
    println!(
        "{REPLICAS} replicas, {CLIENTS} clients, {REQUESTS} requests in {took:?}: {admitted} \
         admitted (limit {LIMIT}), {refused} refused, {} errors, {calls} EVALSHA = {per_request:.4} \
         per request",
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "errors: {:?}",
        &errors[..errors.len().min(5)]
    );
    assert!(
        admitted <= LIMIT,
        "{admitted} admitted past the limit of {LIMIT}"
    );
    assert!(
        admitted >= LIMIT * 9 / 10,
        "only {admitted} of {LIMIT} admitted"
    );
    assert!(
        per_request < 0.1,
        "{calls} script calls for {REQUESTS} requests"
    );
    assert!(
        page.contains("sluice_leases_total") && page.contains("sluice_lease_admitted_hits_total"),
        "lease metrics missing"
    );
}
