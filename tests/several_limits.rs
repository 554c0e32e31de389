//! Several limits on one key (burst and sustained): a threshold with several rates is several
//! limits, each counted apart; a hit passes only if every one admits it, and the status names
//! the limit that rejected (else the one with the least left). All three algorithms, in memory
//! and in Redis, with a manual clock.

mod common;

use common::config::errors_of;
use common::redis::RedisServer;
use common::rls::*;
use common::sluice::Sluice;
use common::store::use_redis;

fn limits(algorithm: &str) -> String {
    format!(
        r#"
domain: many
defaults: {{ timeout: 2s, algorithm: {algorithm} }}
routes:
  - name: api
    global_threshold: {{ query_per_second: 2, query_per_minute: 5 }}
  - name: keys
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - {{ key: "*", query_per_second: 1, requests: 3, window: 10s }}
"#
    )
}

/// The answers of one scripted run: (code, limit unit, remaining) per request.
async fn run(s: &mut Sluice) -> Vec<(i32, i32, u32)> {
    s.to_next_window(60_000);
    let mut seen = Vec::new();
    // Second 1: 3 requests (burst 2 per second); seconds 2 and 3: 2 each (sustained 5 per
    // minute caps the total).
    for second in 0..3 {
        let n = if second == 0 { 3 } else { 2 };
        for _ in 0..n {
            let st = s.status("many", &[("route", "api")]).await;
            let unit = st.current_limit.as_ref().map_or(0, |l| l.unit);
            seen.push((st.code, unit, st.limit_remaining));
        }
        s.advance(1_000);
    }
    seen
}

/// Fixed windows, exactly: the per-second limit rejects the 3rd hit of the first second, the
/// per-minute one the 6th hit of the minute, and each status names its limit.
async fn fixed_window_exact(s: &mut Sluice) {
    let ok = Code::Ok as i32;
    let over = Code::OverLimit as i32;
    let sec = Unit::Second as i32;
    let min = Unit::Minute as i32;
    assert_eq!(
        run(s).await,
        vec![
            // second 1: 4 left in the minute after the first, then 1 in the second.
            (ok, sec, 1),
            (ok, sec, 0),
            (over, sec, 0),
            // second 2: the minute counted the rejected hit too (fixed windows count all
            // hits), so 5 - 4 = 1 left, then 0: both still admit (a tie on what is left
            // shows the longer window).
            (ok, min, 1),
            (ok, min, 0),
            // second 3: the minute is spent.
            (over, min, 0),
            (over, min, 0),
        ]
    );
    // Per key: 1 per second and 3 per 10 s, reported as SECOND x 10.
    s.to_next_window(60_000);
    let key = [("route", "keys"), ("x-api-key", "k1")];
    let st = s.status("many", &key).await;
    assert_eq!(st.code, ok);
    let st = s.status("many", &key).await;
    assert_eq!(
        (st.code, st.current_limit.map(|l| l.unit_multiplier)),
        (over, Some(None))
    );
    // A second later: the 10 s window holds 2 hits (fixed windows count the rejected one too),
    // so one more passes, and the next is over by the 10 s limit.
    s.advance(1_000);
    assert_eq!(s.status("many", &key).await.code, ok);
    s.advance(1_000);
    let st = s.status("many", &key).await;
    assert_eq!(st.code, over, "the 10 s limit: {st:?}");
    assert_eq!(
        st.current_limit.and_then(|l| l.unit_multiplier),
        Some(10),
        "the status names the limit that rejected"
    );
}

#[tokio::test]
async fn burst_and_sustained_on_one_key_in_memory() {
    let mut s = Sluice::start(&[("many.yaml", &limits("fixed_window"))]).await;
    fixed_window_exact(&mut s).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_and_sustained_on_one_key_in_redis() {
    let redis = RedisServer::start();
    let mut s = Sluice::start_with(&[("many.yaml", &limits("fixed_window"))], |settings| {
        use_redis(settings, &redis.url())
    })
    .await;
    fixed_window_exact(&mut s).await;
    s.stop().await;
}

/// Sliding window and token bucket: memory and Redis give the same answers step by step, and
/// neither admits more than either limit allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_algorithm_answers_alike_in_memory_and_redis() {
    let redis = RedisServer::start();
    for algorithm in ["sliding_window", "token_bucket"] {
        let yaml = limits(algorithm);
        let mut memory = Sluice::start(&[("many.yaml", &yaml)]).await;
        let mut in_redis = Sluice::start_with(&[("many.yaml", &yaml)], |settings| {
            use_redis(settings, &redis.url());
            settings.redis.pool_size = 1;
        })
        .await;
        // Both clocks at the same instant.
        in_redis.clock.set(memory.now());
        let a = run(&mut memory).await;
        let b = run(&mut in_redis).await;
        assert_eq!(a, b, "{algorithm}: memory and Redis disagree");
        let admitted = a
            .iter()
            .filter(|(code, ..)| *code == Code::Ok as i32)
            .count();
        assert!(
            admitted <= 5,
            "{algorithm}: {admitted} admitted over a minute limit of 5"
        );
        let first_second = a[..3]
            .iter()
            .filter(|(code, ..)| *code == Code::Ok as i32)
            .count();
        assert!(first_second <= 2, "{algorithm}: {a:?}");
        memory.stop().await;
        in_redis.stop().await;
        redis.cli(&["FLUSHALL"]);
    }
}

#[test]
fn two_limits_of_one_period_on_a_key_are_explained() {
    for (threshold, says) in [
        (
            "{ query_per_minute: 5, requests: 10, window: 60s }",
            "same period",
        ),
        (
            "{ query_per_second: 5, query_per_hour: 100, burst: 3 }",
            "one rate",
        ),
    ] {
        let yaml = format!("domain: w\nroutes:\n  - name: r\n    global_threshold: {threshold}\n");
        let (_, errors) = errors_of(&yaml);
        assert!(
            errors.iter().any(|e| e.message.contains(says)),
            "{threshold}: expected {says:?}, got {errors:?}"
        );
    }
}
