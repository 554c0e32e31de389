//! The over-limit cache: once Redis says a counter is over, sluice answers it from
//! process memory until its window ends, without a single Redis command, and the answers stay
//! exactly what Redis would say (OVER_LIMIT, nothing remaining, the true time to reset).
//!
//! In process (`server::start`, backend redis, a real `redis-server`) with the manual clock of
//! the kit's in-process server (`common::sluice::Sluice`). Redis commands are counted with `CONFIG RESETSTAT` + `INFO commandstats`.

mod common;

use common::MINUTE;
use common::metrics::{metric, scrape};
use common::redis::RedisServer;
use common::rls::{Code, Unit, desc, limit, metadata, request, status};
use common::sluice::Sluice;
use sluice::config::settings::Backend;

const LIMITS: &str = r#"
domain: cache
defaults:
  # Generous, so a slow debug build never turns a Redis answer into a fallback one.
  timeout: 2s
  fallback: local
routes:
  - name: tight
    global_threshold: { query_per_minute: 3 }
  - name: wide
    global_threshold: { query_per_minute: 1000 }
"#;

async fn start(redis: &RedisServer) -> Sluice {
    let url = redis.url();
    Sluice::start_with(&[("cache.yaml", LIMITS)], |s| {
        s.backend = Backend::Redis;
        s.redis.url = url;
        s.redis.command_timeout = std::time::Duration::from_secs(2);
        s.fallback.failure_threshold = 1_000;
    })
    .await
}

/// Redis commands other than the test's own INFO / CONFIG since the last reset.
fn store_commands(redis: &RedisServer) -> Vec<(String, u64)> {
    redis
        .command_calls()
        .into_iter()
        .filter(|(name, calls)| {
            *calls > 0 && !matches!(name.as_str(), "info" | "config" | "config|resetstat")
        })
        .collect()
}

/// Sends `tight` until it is over: three OK answers from Redis, then one OVER_LIMIT from Redis.
async fn drive_tight_over(s: &mut Sluice, window_end: u64) {
    let tight = limit(3, Unit::Minute, "tight/global");
    for remaining in (0..3).rev() {
        let r = s.ask("cache", &[&[("route", "tight")]]).await;
        assert_eq!(
            r.statuses[0],
            status(Code::Ok, &tight, remaining, window_end - s.now()),
            "{r:?}"
        );
        assert_eq!(metadata(&r, "source"), Some("redis"), "{r:?}");
        s.advance(1_000);
    }
    let r = s.ask("cache", &[&[("route", "tight")]]).await;
    assert_eq!(
        r.statuses[0],
        status(Code::OverLimit, &tight, 0, window_end - s.now()),
        "the first over answer comes from Redis: {r:?}"
    );
    assert_eq!(metadata(&r, "source"), Some("redis"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_limit_counter_is_answered_without_redis_until_its_window_ends() {
    let redis = RedisServer::start();
    let mut s = start(&redis).await;
    let window_end = s.now() - s.now() % MINUTE + MINUTE;
    drive_tight_over(&mut s, window_end).await;

    let tight = limit(3, Unit::Minute, "tight/global");
    redis.reset_stats();
    const CACHED: u64 = 20;
    for i in 0..CACHED {
        s.advance(500);
        let r = s.ask("cache", &[&[("route", "tight")]]).await;
        assert_eq!(
            r.overall_code,
            Code::OverLimit as i32,
            "cached answer {i}: {r:?}"
        );
        assert_eq!(
            r.statuses[0],
            status(Code::OverLimit, &tight, 0, window_end - s.now()),
            "cached answer {i}: {r:?}"
        );
        assert_eq!(
            metadata(&r, "source"),
            Some("local_cache"),
            "cached answer {i}: {r:?}"
        );
    }
    let calls = store_commands(&redis);
    assert!(
        calls.is_empty(),
        "{CACHED} requests for a counter known to be over must not reach Redis, \
         but Redis ran {calls:?}"
    );

    let page = scrape(s.handle().http_addr).await;
    assert_eq!(
        metric(&page, "sluice_over_limit_cache_hits_total"),
        Some(CACHED as f64),
        "cache hits on /metrics:\n{page}"
    );
    assert_eq!(
        metric(&page, "sluice_over_limit_cache_entries"),
        Some(1.0),
        "one counter remembered:\n{page}"
    );

    // The window's last millisecond: still over, still from the cache, 1 ms to go.
    s.clock.set(window_end - 1);
    let r = s.ask("cache", &[&[("route", "tight")]]).await;
    assert_eq!(
        r.statuses[0],
        status(Code::OverLimit, &tight, 0, 1),
        "{r:?}"
    );
    assert_eq!(metadata(&r, "source"), Some("local_cache"), "{r:?}");
    assert_eq!(
        redis.evalsha_calls(),
        0,
        "no EVALSHA before the window ends"
    );

    // The window has ended: Redis counts again, in a fresh window.
    s.clock.set(window_end);
    let r = s.ask("cache", &[&[("route", "tight")]]).await;
    assert_eq!(r.overall_code, Code::Ok as i32, "{r:?}");
    assert_eq!(r.statuses[0], status(Code::Ok, &tight, 2, MINUTE), "{r:?}");
    assert_eq!(metadata(&r, "source"), Some("redis"), "{r:?}");
    assert_eq!(
        redis.evalsha_calls(),
        1,
        "after the window ends the counter is counted in Redis again"
    );
    let page = scrape(s.handle().http_addr).await;
    assert_eq!(
        metric(&page, "sluice_over_limit_cache_hits_total"),
        Some(CACHED as f64 + 1.0),
        "{page}"
    );
    s.stop().await;
}

/// A request with a cached counter and a live one: only the live one goes to Redis, and the
/// answer is assembled in descriptor order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_a_cached_counter_sends_only_the_others_to_redis() {
    let redis = RedisServer::start();
    let mut s = start(&redis).await;
    let window_end = s.now() - s.now() % MINUTE + MINUTE;
    drive_tight_over(&mut s, window_end).await;
    s.advance(1_000);

    redis.reset_stats();
    let r = s
        .call(request(
            "cache",
            vec![
                desc(&[("route", "wide")]),
                desc(&[("route", "tight")]),
                desc(&[("route", "nothing")]),
            ],
        ))
        .await;
    let reset = window_end - s.now();
    assert_eq!(r.overall_code, Code::OverLimit as i32, "{r:?}");
    assert_eq!(
        r.statuses[0],
        status(
            Code::Ok,
            &limit(1000, Unit::Minute, "wide/global"),
            999,
            reset
        ),
        "{r:?}"
    );
    assert_eq!(
        r.statuses[1],
        status(
            Code::OverLimit,
            &limit(3, Unit::Minute, "tight/global"),
            0,
            reset
        ),
        "{r:?}"
    );
    assert_eq!(r.statuses[2], common::rls::unlimited(), "{r:?}");
    assert_eq!(
        metadata(&r, "source"),
        Some("local_cache"),
        "the deciding descriptor is the cached one: {r:?}"
    );
    assert_eq!(
        redis.evalsha_calls(),
        1,
        "only the live counter reaches Redis: {:?}",
        redis.command_calls()
    );
    s.stop().await;
}
