//! Quota mode (as envoyproxy/ratelimit's `quota_mode`): a request is OVER_LIMIT if any
//! descriptor not in quota mode is over, or if every quota-mode descriptor is over; an over
//! quota-mode descriptor still says OVER_LIMIT in its own status. In both limits formats and
//! both backends.

mod common;

use common::redis::RedisServer;
use common::rls::*;
use common::sluice::Sluice;
use common::store::use_redis;

const NATIVE: &str = r#"
domain: q
defaults: { timeout: 2s }
routes:
  - name: small
    quota_mode: true
    global_threshold: { query_per_minute: 1 }
  - name: large
    quota_mode: true
    global_threshold: { query_per_minute: 3 }
  - name: strict
    global_threshold: { query_per_minute: 1 }
  # Quota mode on one rule item only: the route itself is not in quota mode.
  - name: plans
    rule_items:
      - limit_by_per_header: x-plan
        quota_mode: true
        limit_keys: [{ key: "*", query_per_minute: 1 }]
      - limit_by_per_header: x-user
        limit_keys: [{ key: "*", query_per_minute: 1 }]
"#;

const DESCRIPTORS: &str = r#"
domain: qd
descriptors:
  - key: small
    quota_mode: true
    rate_limit: { unit: minute, requests_per_unit: 1 }
  - key: large
    quota_mode: true
    rate_limit: { unit: minute, requests_per_unit: 3 }
"#;

fn codes(r: &RateLimitResponse) -> (i32, Vec<i32>) {
    (r.overall_code, r.statuses.iter().map(|s| s.code).collect())
}

const OK: i32 = Code::Ok as i32;
const OVER: i32 = Code::OverLimit as i32;

async fn quota_mode_answers(s: &mut Sluice) {
    s.to_next_window(60_000);
    let both = || {
        request(
            "q",
            vec![desc(&[("route", "small")]), desc(&[("route", "large")])],
        )
    };
    // 1: both within; 2-3: small over, large within: still OK overall; 4: both over.
    let expected = [
        (OK, vec![OK, OK]),
        (OK, vec![OVER, OK]),
        (OK, vec![OVER, OK]),
        (OVER, vec![OVER, OVER]),
    ];
    for (n, want) in expected.into_iter().enumerate() {
        let r = s.call(both()).await;
        assert_eq!(codes(&r), want, "request {}: {r:?}", n + 1);
    }
    // A descriptor not in quota mode decides on its own, whatever the quota-mode ones say
    // (next window: everything fresh).
    s.to_next_window(60_000);
    let mixed = || {
        request(
            "q",
            vec![desc(&[("route", "strict")]), desc(&[("route", "large")])],
        )
    };
    let r = s.call(mixed()).await;
    assert_eq!(codes(&r), (OK, vec![OK, OK]), "{r:?}");
    let r = s.call(mixed()).await;
    assert_eq!(codes(&r), (OVER, vec![OVER, OK]), "strict is over: {r:?}");
    // The only quota-mode descriptor over, alone: every quota-mode descriptor is over.
    let r = s
        .call(request("q", vec![desc(&[("route", "small")])]))
        .await;
    assert_eq!(codes(&r), (OK, vec![OK]), "{r:?}");
    let r = s
        .call(request("q", vec![desc(&[("route", "small")])]))
        .await;
    assert_eq!(codes(&r), (OVER, vec![OVER]), "{r:?}");

    // Quota mode set on a rule item: that item's descriptor over alone is over (every
    // quota-mode descriptor is); with a within-limit descriptor of the other item, which is
    // not in quota mode, the request passes.
    let plan = |v: &str| desc(&[("route", "plans"), ("x-plan", v)]);
    let user = |v: &str| desc(&[("route", "plans"), ("x-user", v)]);
    let r = s.call(request("q", vec![plan("p1"), user("u1")])).await;
    assert_eq!(codes(&r), (OK, vec![OK, OK]), "{r:?}");
    let r = s.call(request("q", vec![plan("p1"), user("u2")])).await;
    assert_eq!(
        codes(&r),
        (OVER, vec![OVER, OK]),
        "the only quota-mode one is over: {r:?}"
    );
    let r = s
        .call(request("q", vec![plan("p1"), plan("p2"), user("u3")]))
        .await;
    assert_eq!(
        codes(&r),
        (OK, vec![OVER, OK, OK]),
        "p2 is within, so not every quota-mode descriptor is over: {r:?}"
    );
    let r = s.call(request("q", vec![user("u1")])).await;
    assert_eq!(
        codes(&r),
        (OVER, vec![OVER]),
        "x-user is not in quota mode: {r:?}"
    );

    // The same in the envoyproxy/ratelimit format.
    let both = || request("qd", vec![desc(&[("small", "a")]), desc(&[("large", "b")])]);
    for (n, want) in [
        (OK, vec![OK, OK]),
        (OK, vec![OVER, OK]),
        (OK, vec![OVER, OK]),
        (OVER, vec![OVER, OVER]),
    ]
    .into_iter()
    .enumerate()
    {
        let r = s.call(both()).await;
        assert_eq!(
            codes(&r),
            want,
            "envoyproxy format, request {}: {r:?}",
            n + 1
        );
    }
}

#[tokio::test]
async fn quota_mode_in_memory() {
    let mut s = Sluice::start(&[("q.yaml", NATIVE), ("qd.yaml", DESCRIPTORS)]).await;
    quota_mode_answers(&mut s).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_mode_in_redis() {
    let redis = RedisServer::start();
    let mut s = Sluice::start_with(
        &[("q.yaml", NATIVE), ("qd.yaml", DESCRIPTORS)],
        |settings| use_redis(settings, &redis.url()),
    )
    .await;
    quota_mode_answers(&mut s).await;
    s.stop().await;
}
