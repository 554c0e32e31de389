//! No client can pad its way past a limit.
//!
//! A value in a descriptor comes from a client of Envoy (a header, a path, an address). Envoy
//! lets a request through uncounted when the rate limit service answers an error (its
//! `failure_mode_deny` is false by default), so sluice must count a value of any length rather
//! than refuse it. Each long value gets a counter of its own (its key component is a
//! fixed-length hash), in memory and in Redis alike.

mod common;

use common::redis::RedisServer;
use common::rls::*;
use common::sluice::Sluice;
use common::store::use_redis;

const LIMITS: &str = r#"
domain: pad
defaults:
  # A loaded test machine must not turn a slow reply into a fallback answer.
  timeout: 2s
routes:
  - name: keys
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - { key: "*", query_per_minute: 3 }
"#;

/// The lengths a padding client might try: past the old 4 KiB bound, 64 KiB, and far past
/// any header Envoy forwards by default.
const LENGTHS: [usize; 3] = [5_000, 65_536, 300_000];

async fn ask(s: &mut Sluice, key: &str) -> i32 {
    s.ask("pad", &[&[("route", "keys"), ("x-api-key", key)]])
        .await
        .overall_code
}

/// Each value: 3 answered OK, the 4th OVER_LIMIT; a value differing only in its last byte is
/// another counter, fresh.
async fn long_values_are_counted(s: &mut Sluice) {
    for len in LENGTHS {
        let value = format!("{}a", "v".repeat(len - 1));
        for n in 1..=3 {
            assert_eq!(
                ask(s, &value).await,
                Code::Ok as i32,
                "{len} bytes, request {n}"
            );
        }
        assert_eq!(
            ask(s, &value).await,
            Code::OverLimit as i32,
            "{len} bytes, request 4 must be over the limit of 3"
        );
        let sibling = format!("{}b", "v".repeat(len - 1));
        assert_eq!(
            ask(s, &sibling).await,
            Code::Ok as i32,
            "{len} bytes differing in the last byte is another counter"
        );
    }
}

#[tokio::test]
async fn memory_counts_values_of_any_length_each_on_its_own_counter() {
    let mut s = Sluice::start(&[("pad.yaml", LIMITS)]).await;
    long_values_are_counted(&mut s).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_counts_values_of_any_length_each_on_its_own_counter() {
    let redis = RedisServer::start();
    let mut s = Sluice::start_with(&[("pad.yaml", LIMITS)], |settings| {
        use_redis(settings, &redis.url())
    })
    .await;
    long_values_are_counted(&mut s).await;
    // Every answer came from Redis, and no key grew with the value.
    let keys = redis.keys(0, "sluice:*");
    assert_eq!(keys.len(), 2 * LENGTHS.len(), "{keys:?}");
    assert!(keys.iter().all(|k| k.len() < 160), "{keys:?}");
    s.stop().await;
}
