//! Any window: `requests` with `window` (whole seconds, 1s to 366d) in the native format, and
//! `unit_multiplier` in the envoyproxy/ratelimit format, reported to Envoy as `unit` ×
//! `unit_multiplier` so its `x-ratelimit-limit` shows `w=<seconds>`. Counted alike in memory
//! and in Redis, with a manual clock.

mod common;

use common::config::errors_of;
use common::redis::RedisServer;
use common::rls::*;
use common::sluice::Sluice;
use common::store::use_redis;
use sluice::config::load_dir;
use sluice::limits::Unit as LimitUnit;

const LIMITS: &str = r#"
domain: win
defaults: { timeout: 2s }
routes:
  - name: half-minute
    global_threshold: { requests: 3, window: 30s }
  - name: ninety-minutes
    global_threshold: { requests: 5, window: 90m }
  - name: two-days
    global_threshold: { requests: 7, window: 2d }
"#;

/// 3 per 30 s: SECOND × 30; the window resets on 30 s boundaries of the epoch.
async fn thirty_second_window_counts_and_resets(s: &mut Sluice) {
    s.to_next_window(30_000);
    s.advance(10_000);
    let expected = RateLimit {
        unit_multiplier: Some(30),
        ..limit(3, Unit::Second, "half-minute/global")
    };
    for remaining in [2, 1, 0] {
        let st = s.status("win", &[("route", "half-minute")]).await;
        assert_eq!(st.code, Code::Ok as i32, "{st:?}");
        assert_eq!(st.current_limit.as_ref(), Some(&expected));
        assert_eq!(st.limit_remaining, remaining);
        assert_eq!(st.duration_until_reset, Some(duration(20_000)));
    }
    let st = s.status("win", &[("route", "half-minute")]).await;
    assert_eq!(st.code, Code::OverLimit as i32, "{st:?}");
    // 19.999 s later: same window, still over; 1 ms more: a new window.
    s.advance(19_999);
    let st = s.status("win", &[("route", "half-minute")]).await;
    assert_eq!(st.code, Code::OverLimit as i32, "{st:?}");
    s.advance(1);
    let st = s.status("win", &[("route", "half-minute")]).await;
    assert_eq!(
        (st.code, st.limit_remaining),
        (Code::Ok as i32, 2),
        "{st:?}"
    );

    let st = s.status("win", &[("route", "ninety-minutes")]).await;
    assert_eq!(
        st.current_limit,
        Some(RateLimit {
            unit_multiplier: Some(90),
            ..limit(5, Unit::Minute, "ninety-minutes/global")
        })
    );
    let st = s.status("win", &[("route", "two-days")]).await;
    assert_eq!(
        st.current_limit,
        Some(RateLimit {
            unit_multiplier: Some(2),
            ..limit(7, Unit::Day, "two-days/global")
        })
    );
}

#[tokio::test]
async fn a_thirty_second_window_in_memory() {
    let mut s = Sluice::start(&[("win.yaml", LIMITS)]).await;
    thirty_second_window_counts_and_resets(&mut s).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thirty_second_window_in_redis() {
    let redis = RedisServer::start();
    let mut s = Sluice::start_with(&[("win.yaml", LIMITS)], |settings| {
        use_redis(settings, &redis.url())
    })
    .await;
    thirty_second_window_counts_and_resets(&mut s).await;
    s.stop().await;
}

#[tokio::test]
async fn unit_multiplier_in_the_envoyproxy_ratelimit_format() {
    let yaml = r#"
domain: rl
descriptors:
  - key: k
    rate_limit: { unit: second, unit_multiplier: 30, requests_per_unit: 2 }
"#;
    let mut s = Sluice::start(&[("rl.yaml", yaml)]).await;
    s.to_next_window(30_000);
    for code in [Code::Ok, Code::Ok, Code::OverLimit] {
        let st = s.status("rl", &[("k", "v")]).await;
        assert_eq!(st.code, code as i32, "{st:?}");
        assert_eq!(
            st.current_limit.as_ref().and_then(|l| l.unit_multiplier),
            Some(30)
        );
        assert_eq!(st.duration_until_reset, Some(duration(30_000)));
    }
    s.advance(30_000);
    let st = s.status("rl", &[("k", "v")]).await;
    assert_eq!(st.code, Code::Ok as i32, "a new 30 s window: {st:?}");
    s.stop().await;
}

#[test]
fn config_shows_the_window() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("win.yaml"), LIMITS).expect("write");
    let set = load_dir(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let json = set.to_json();
    let rule = &json["win"]["routes"]["half-minute"]["limits"]["global_threshold"];
    assert_eq!(rule["window"], "30s", "{rule}");
    let d = set.domain("win").expect("domain");
    let route = &d.routes()["ninety-minutes"];
    match route.limits.as_ref() {
        sluice::limits::RouteLimits::Global(rule) => {
            assert_eq!(rule.threshold.unit, LimitUnit::Minute);
            assert_eq!(rule.threshold.multiplier, 90);
            assert_eq!(rule.threshold.period_ms(), 90 * 60_000);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn windows_that_cannot_be_counted_are_explained() {
    for (threshold, field, says) in [
        (
            "{ requests: 3, window: 1500ms }",
            "window",
            "whole number of seconds",
        ),
        ("{ requests: 3, window: 400d }", "window", "1s to 366d"),
        ("{ requests: 3, window: soon }", "window", "not a duration"),
        ("{ requests: 3 }", "requests", "needs a window"),
        ("{ window: 30s }", "window", "needs a number of requests"),
        (
            "{ requests: 3, window: 60s, query_per_minute: 5 }",
            "global_threshold",
            "same period",
        ),
    ] {
        let yaml = format!("domain: w\nroutes:\n  - name: r\n    global_threshold: {threshold}\n");
        let (_, errors) = errors_of(&yaml);
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert!(
            errors
                .iter()
                .any(|e| e.field.contains(field) && e.message.contains(says)),
            "{threshold}: expected {field:?} saying {says:?}, got {text:?}"
        );
    }
    let yaml = "domain: rl\ndescriptors:\n  - key: k\n    rate_limit: { unit: second, unit_multiplier: 0, requests_per_unit: 2 }\n";
    let (_, errors) = errors_of(yaml);
    assert!(
        errors
            .iter()
            .any(|e| e.field == "rate_limit.unit_multiplier" && e.message.contains("is 0")),
        "{errors:?}"
    );
}
