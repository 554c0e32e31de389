//! The count holds through Redis faults: what the fallback admits continues Redis's count and
//! is written back once Redis takes writes again, the breaker closes only on a real write, and
//! a give-back reaches past the over-limit cache.
//!
//! In process (`server::start`, backend redis, a real `redis-server`) with the kit's manual
//! clock, so no test crosses a window by sleeping; the waits are for the breaker's probe and
//! the write-back, which run in real time. Faults are made by Redis itself: `maxmemory` with
//! `noeviction` (OOM), `requirepass` with the clients cut (NOAUTH), SIGSTOP (a store that stops
//! answering).

mod common;

use std::time::{Duration, Instant};

use common::http::get;
use common::metrics::{metric, scrape};
use common::redis::RedisServer;
use common::resp::Resp;
use common::rls::{Code, RateLimitDescriptor, desc, desc_hits, metadata, request};
use common::sluice::Sluice;
use sluice::config::settings::Backend;

const LIMITS: &str = r#"
domain: faults
defaults:
  fallback: local
  timeout: 2s
routes:
  - name: fixed
    global_threshold: { query_per_hour: 20 }
  - name: sliding
    algorithm: sliding_window
    global_threshold: { query_per_hour: 20 }
  - name: bucket
    algorithm: token_bucket
    global_threshold: { query_per_hour: 20 }
  - name: wide
    global_threshold: { query_per_hour: 1000000 }
  # A 1 ms budget: at 200 concurrent requests many wait longer than that in sluice's queue.
  - name: queued
    timeout: 1ms
    global_threshold: { query_per_hour: 1000000 }
  - name: refund
    algorithm: sliding_window
    global_threshold: { query_per_hour: 100 }
"#;

async fn start(
    redis: &RedisServer,
    configure: impl FnOnce(&mut sluice::config::Settings),
) -> Sluice {
    let url = redis.url();
    Sluice::start_with(&[("faults.yaml", LIMITS)], |s| {
        s.backend = Backend::Redis;
        s.redis.url = url;
        s.redis.command_timeout = Duration::from_secs(2);
        s.fallback.failure_threshold = 1;
        s.fallback.probe_interval = Duration::from_millis(50);
        configure(s);
    })
    .await
}

fn route(name: &str) -> [(&str, &str); 1] {
    [("route", name)]
}

/// Sends `n` single hits on `route`; returns (admitted, answered by the fallback).
async fn hits(s: &mut Sluice, route_name: &str, n: u32) -> (u32, u32) {
    let (mut admitted, mut fallback) = (0, 0);
    for _ in 0..n {
        let r = s.ask("faults", &[&route(route_name)]).await;
        if r.overall_code == Code::Ok as i32 {
            admitted += 1;
        }
        if metadata(&r, "source") == Some("fallback") {
            fallback += 1;
        }
    }
    (admitted, fallback)
}

/// The hits Redis holds for `route` in its current fixed window (every key of the counter).
fn redis_count(redis: &RedisServer, route_name: &str) -> i64 {
    redis
        .keys(0, &format!("sluice:{{faults*{route_name}*"))
        .iter()
        .map(
            |key| match redis.cmd(&["GET", &String::from_utf8_lossy(key)]) {
                Resp::Bulk(v) => String::from_utf8_lossy(&v).parse::<i64>().unwrap_or(0),
                _ => 0,
            },
        )
        .sum()
}

async fn wait_for(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what} did not happen within {within:?}");
}

async fn readyz(s: &Sluice) -> String {
    get(s.handle().http_addr, "/readyz").await.body
}

async fn breaker(s: &Sluice, to: &str) -> f64 {
    let page = scrape(s.handle().http_addr).await;
    metric(
        &page,
        &format!("sluice_breaker_transitions_total{{to=\"{to}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_oom_the_fallback_continues_the_count_and_writes_it_back() {
    let redis = RedisServer::start();
    let mut s = start(&redis, |_| {}).await;
    assert_eq!(hits(&mut s, "fixed", 15).await, (15, 0));

    // Out of memory with noeviction: Redis answers PING and refuses every write.
    redis.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    redis.cli(&["CONFIG", "SET", "maxmemory", "1"]);
    let (admitted, fallback) = hits(&mut s, "fixed", 10).await;
    assert_eq!(
        admitted, 5,
        "the fallback continues from Redis's 15 of 20, so 5 of 10 pass"
    );
    assert_eq!(fallback, 10);
    // Probed with a real write every 50 ms: the breaker stays open, no flapping.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        breaker(&s, "closed").await,
        0.0,
        "closed on a PING under OOM"
    );
    let ready = readyz(&s).await;
    assert!(
        ready.contains("fallback active") && ready.contains("maxmemory"),
        "{ready}"
    );
    assert_eq!(
        redis_count(&redis, "fixed"),
        15,
        "nothing written under OOM"
    );

    redis.cli(&["CONFIG", "SET", "maxmemory", "0"]);
    wait_for("the write-back", Duration::from_secs(5), async || {
        redis_count(&redis, "fixed") == 20
    })
    .await;
    assert_eq!(breaker(&s, "closed").await, 1.0);
    let page = scrape(s.handle().http_addr).await;
    assert_eq!(
        metric(&page, "sluice_fallback_hits_total{state=\"written_back\"}"),
        Some(5.0),
        "{page}"
    );
    // Redis decides again, with the fallback's admissions in its count.
    let r = s.ask("faults", &[&route("fixed")]).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32, "{r:?}");
    assert_eq!(metadata(&r, "source"), Some("redis"), "{r:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_algorithm_continues_the_count_in_the_fallback() {
    let redis = RedisServer::start();
    let mut s = start(&redis, |_| {}).await;
    for name in ["sliding", "bucket"] {
        assert_eq!(hits(&mut s, name, 12).await, (12, 0), "{name}");
    }
    redis.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    redis.cli(&["CONFIG", "SET", "maxmemory", "1"]);
    for name in ["sliding", "bucket"] {
        let (admitted, fallback) = hits(&mut s, name, 20).await;
        assert_eq!((admitted, fallback), (8, 20), "{name}: 8 of 20 were left");
    }
    redis.cli(&["CONFIG", "SET", "maxmemory", "0"]);
    wait_for("the write-back", Duration::from_secs(5), async || {
        breaker(&s, "closed").await == 1.0
    })
    .await;
    // Written back: Redis refuses the next hit of each.
    wait_for("Redis to refuse", Duration::from_secs(5), async || {
        let mut over = true;
        for name in ["sliding", "bucket"] {
            let r = s.ask("faults", &[&route(name)]).await;
            over &=
                r.overall_code == Code::OverLimit as i32 && metadata(&r, "source") == Some("redis");
        }
        over
    })
    .await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_replicas_each_continues_from_its_share_of_what_was_left() {
    let redis = RedisServer::start();
    let mut s = start(&redis, |settings| settings.fallback.replicas = 2).await;
    // 20 an hour; 8 used: 12 left, 6 for each of two replicas.
    assert_eq!(hits(&mut s, "fixed", 8).await, (8, 0));
    redis.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    redis.cli(&["CONFIG", "SET", "maxmemory", "1"]);
    assert_eq!(hits(&mut s, "fixed", 10).await, (6, 10));
    redis.cli(&["CONFIG", "SET", "maxmemory", "0"]);
    wait_for("the write-back", Duration::from_secs(5), async || {
        redis_count(&redis, "fixed") == 14
    })
    .await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_requires_a_password_keeps_the_breaker_open_and_says_so() {
    let redis = RedisServer::start();
    let mut s = start(&redis, |_| {}).await;
    assert_eq!(hits(&mut s, "fixed", 3).await, (3, 0));
    redis.cli(&["CONFIG", "SET", "requirepass", "sekrit"]);
    // Cut sluice's connections: fred reconnects without a password.
    let _ = redis.cmd(&["AUTH", "sekrit"]);
    redis_cli_auth(&redis, &["CLIENT", "KILL", "TYPE", "normal"]);
    let (admitted, _) = hits(&mut s, "fixed", 5).await;
    assert!(admitted <= 5);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let ready = readyz(&s).await;
    assert!(
        ready.contains("fallback active") && ready.contains("password"),
        "{ready}"
    );
    assert_eq!(
        breaker(&s, "closed").await,
        0.0,
        "closed on a PING with NOAUTH"
    );
    s.stop().await;
}

fn redis_cli_auth(redis: &RedisServer, args: &[&str]) {
    let mut all = vec!["-a", "sekrit", "--no-auth-warning"];
    all.extend_from_slice(args);
    redis.cli(&all);
}

/// Requests that time out behind sluice's own queue while Redis keeps answering are answered
/// by the fallback and written back, and never open the breaker: every admission ends up in
/// Redis's count, exactly once unless its call had already left (then twice, never zero).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_under_load_are_not_failures_and_every_admission_is_counted() {
    let redis = RedisServer::start();
    let s = start(&redis, |settings| settings.fallback.failure_threshold = 3).await;
    const STREAMS: usize = 200;
    const EACH: usize = 50;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..STREAMS {
        let mut client = s.client.clone();
        tasks.spawn(async move {
            let (mut admitted, mut fallback) = (0u64, 0u64);
            let mut said = false;
            for _ in 0..EACH {
                let r = client
                    .should_rate_limit(request("faults", vec![desc(&[("route", "queued")])]))
                    .await
                    .expect("answered");
                let r = r.into_inner();
                if r.overall_code != Code::Ok as i32 && !said {
                    said = true;
                    println!("refused: {r:?}");
                }
                admitted += u64::from(r.overall_code == Code::Ok as i32);
                fallback += u64::from(metadata(&r, "source") == Some("fallback"));
            }
            (admitted, fallback)
        });
    }
    let (mut admitted, mut fallback) = (0, 0);
    while let Some(done) = tasks.join_next().await {
        let (a, f) = done.expect("task");
        admitted += a;
        fallback += f;
    }
    let total = (STREAMS * EACH) as u64;
    assert_eq!(admitted, total);
    println!("{fallback} of {total} answered by the fallback behind the queue");
    assert_eq!(breaker(&s, "open").await, 0.0, "load opened the breaker");
    // Settled: nothing owed, and the corrections of what was counted twice sent (a flush
    // every 100 ms).
    wait_for("the write-back", Duration::from_secs(5), async || {
        let page = scrape(s.handle().http_addr).await;
        redis_count(&redis, "queued") as u64 >= total
            && metric(&page, "sluice_fallback_owed_hits") == Some(0.0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counted = redis_count(&redis, "queued") as u64;
    println!("{admitted} admitted, {counted} in Redis's counter");
    let page = scrape(s.handle().http_addr).await;
    for state in ["owed", "written_back", "forgiven", "expired", "refused"] {
        let name = format!("sluice_fallback_hits_total{{state=\"{state}\"}}");
        println!("  {state}: {:?}", metric(&page, &name));
    }

    assert!(
        counted <= total + total / 100,
        "{counted} counted for {total} admitted"
    );
}

/// On the Redis backend a give-back reaches past the over-limit cache, as in memory: a
/// sliding window of 100, 100 taken, 1 refused, 60 given back: the next 3 pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_give_back_frees_a_cached_refusal_in_memory_and_redis() {
    let redis = RedisServer::start();
    for backend in ["memory", "redis"] {
        let mut s = match backend {
            "redis" => start(&redis, |_| {}).await,
            _ => Sluice::start(&[("faults.yaml", LIMITS)]).await,
        };
        let refund = route("refund");
        let r = s
            .call(request("faults", vec![desc_hits(&refund, 100)]))
            .await;
        assert_eq!(r.overall_code, Code::Ok as i32, "{backend}: {r:?}");
        let r = s.ask("faults", &[&refund]).await;
        assert_eq!(r.overall_code, Code::OverLimit as i32, "{backend}: {r:?}");
        let give = RateLimitDescriptor {
            is_negative_hits: true,
            ..desc_hits(&refund, 60)
        };
        let r = s.call(request("faults", vec![give])).await;
        assert_eq!(r.overall_code, Code::Ok as i32, "{backend}: {r:?}");
        for i in 0..3 {
            let r = s.ask("faults", &[&refund]).await;
            assert_eq!(
                r.overall_code,
                Code::Ok as i32,
                "{backend}: request {i} after the give-back: {r:?}"
            );
        }
        s.stop().await;
    }
}

/// Redis restarted empty (no persistence): the write-back carries the count the fallback
/// started from as a floor, so the restarted Redis gets the whole count back, not just what
/// the fallback added: 15 used, Redis killed, 5 more admitted, Redis back empty: it holds 20.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_empty_gets_the_whole_count_back() {
    let mut redis = RedisServer::start();
    let mut s = start(&redis, |_| {}).await;
    for name in ["fixed", "sliding"] {
        assert_eq!(hits(&mut s, name, 15).await, (15, 0), "{name}");
    }
    redis.kill9();
    for name in ["fixed", "sliding"] {
        let (admitted, fallback) = hits(&mut s, name, 10).await;
        assert_eq!((admitted, fallback), (5, 10), "{name}: 5 of 10 were left");
    }
    redis.restart();
    wait_for("the write-back", Duration::from_secs(10), async || {
        redis_count(&redis, "fixed") == 20 && redis_count(&redis, "sliding") == 20
    })
    .await;
    for name in ["fixed", "sliding"] {
        let r = s.ask("faults", &[&route(name)]).await;
        assert_eq!(r.overall_code, Code::OverLimit as i32, "{name}: {r:?}");
        assert_eq!(metadata(&r, "source"), Some("redis"), "{name}: {r:?}");
    }
    s.stop().await;
}
