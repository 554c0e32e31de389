//! Charged at stream end, over the RLS: `concurrent: N` (a slot taken at request start and
//! given back with `is_negative_hits`, each slot a lease of `max_hold`) and budgets (a check
//! with `hits_addend: 0` at request start, the real cost charged afterwards).
//!
//! In memory and in Redis on a manual clock, the real binary for `max_hold` in real time, and
//! 10,000 concurrent take/give-back pairs. Through the real Envoy: `tests/envoy_stream_end.rs`.

mod common;

use std::time::Duration;

use common::cluster::RedisCluster;
use common::config::{Expect, assert_error, domain_of, errors_of, find, line_of, route};
use common::http::get;
use common::metrics::{metric, scrape};
use common::redis::RedisServer;
use common::rls::{Code, RateLimitDescriptor, RateLimitServiceClient, desc, desc_hits, request};
use common::sluice::{Sluice, SluiceProcess};
use sluice::config::settings::Backend;
use tonic::transport::Channel;

const LIMITS: &str = "\
domain: inflight
defaults:
  timeout: 2s
routes:
  - name: slow
    global_threshold: { concurrent: 2 }
  - name: per-user
    max_hold: 30s
    rule_items:
      - limit_by_per_header: x-user
        limit_keys: [{ key: \"*\", concurrent: 1 }]
  - name: tokens
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys: [{ key: \"*\", query_per_minute: 1000 }]
";

fn give(pairs: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        is_negative_hits: true,
        ..desc_hits(pairs, 1)
    }
}

async fn code(sluice: &mut Sluice, d: RateLimitDescriptor) -> Code {
    let r = sluice.ask_one("inflight", d).await;
    Code::try_from(r.overall_code).unwrap_or(Code::Unknown)
}

async fn in_memory() -> Sluice {
    Sluice::start(&[("inflight.yaml", LIMITS)]).await
}

async fn on_redis(redis: &RedisServer) -> Sluice {
    let url = redis.url();
    Sluice::start_with(&[("inflight.yaml", LIMITS)], move |s| {
        s.backend = Backend::Redis;
        s.redis.url = url;
        s.redis.command_timeout = Duration::from_secs(2);
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// The setting.

#[test]
fn concurrent_and_max_hold_load_and_are_inherited() {
    let domain = domain_of(LIMITS);
    let slow = route(&domain, "slow");
    assert_eq!(slow.settings.max_hold.value, Duration::from_secs(60));
    assert_eq!(slow.settings.max_hold.from, "builtin");
    let user = route(&domain, "per-user");
    assert_eq!(user.settings.max_hold.value, Duration::from_secs(30));
}

#[test]
fn concurrent_beside_a_rate_or_a_bad_max_hold_is_a_load_error() {
    let text = "\
domain: inflight
routes:
  - name: mixed
    global_threshold: { concurrent: 2, query_per_second: 10 }
  - name: hold
    max_hold: 1.5s
    global_threshold: { concurrent: 2 }
";
    let (file, errors) = errors_of(text);
    assert_eq!(errors.len(), 2, "{errors:?}");
    let mixed = find(&errors, Some("mixed"), "global_threshold.concurrent");
    assert!(mixed.message.contains("stands alone"), "{mixed}");
    let hold = find(&errors, Some("hold"), "max_hold");
    assert_error(
        hold,
        Expect {
            file: &file,
            line: line_of(text, "max_hold: 1.5s"),
            route: Some("hold"),
            field: "max_hold",
        },
    );
    assert!(hold.message.contains("whole seconds"), "{hold}");
}

// ---------------------------------------------------------------------------------------------
// Concurrency, on both backends.

async fn slots_are_taken_held_when_rejected_and_given_back(mut sluice: Sluice) {
    let slow = [("route", "slow")];
    let mut codes = Vec::new();
    for _ in 0..3 {
        codes.push(code(&mut sluice, desc(&slow)).await);
    }
    assert_eq!(codes, [Code::Ok, Code::Ok, Code::OverLimit]);
    // The rejected request's give-back frees its own slot: still two in flight.
    assert_eq!(code(&mut sluice, give(&slow)).await, Code::Ok);
    assert_eq!(
        code(&mut sluice, desc_hits(&slow, 0)).await,
        Code::OverLimit
    );
    assert_eq!(code(&mut sluice, give(&slow)).await, Code::Ok);
    assert_eq!(code(&mut sluice, give(&slow)).await, Code::Ok);
    // Once they finish, two more pass.
    assert_eq!(code(&mut sluice, desc(&slow)).await, Code::Ok);
    assert_eq!(code(&mut sluice, desc(&slow)).await, Code::Ok);
    assert_eq!(code(&mut sluice, give(&slow)).await, Code::Ok);
    assert_eq!(code(&mut sluice, give(&slow)).await, Code::Ok);
    // Give-backs never go below zero and never fail.
    for _ in 0..3 {
        assert_eq!(code(&mut sluice, give(&slow)).await, Code::Ok);
    }
    let r = sluice.ask_one("inflight", desc_hits(&slow, 0)).await;
    assert_eq!(r.statuses[0].limit_remaining, 2);

    // Per user: each user has one slot of their own.
    let (a, b) = (
        [("route", "per-user"), ("x-user", "a")],
        [("route", "per-user"), ("x-user", "b")],
    );
    assert_eq!(code(&mut sluice, desc(&a)).await, Code::Ok);
    assert_eq!(code(&mut sluice, desc(&a)).await, Code::OverLimit);
    assert_eq!(code(&mut sluice, desc(&b)).await, Code::Ok);

    // A slot whose give-back never comes is free after max_hold (30 s on this route).
    sluice.advance(29_999);
    assert_eq!(code(&mut sluice, desc_hits(&b, 0)).await, Code::OverLimit);
    sluice.advance(1);
    assert_eq!(code(&mut sluice, desc(&b)).await, Code::Ok);
    // a's two slots (one admitted, one rejected) expired too.
    assert_eq!(code(&mut sluice, desc(&a)).await, Code::Ok);

    // /config shows the limit and the hold; /metrics the slots in use and the expired ones.
    let config = get(sluice.handle().http_addr, "/config").await.json();
    let slow_route = &config["domains"]["inflight"]["routes"]["slow"];
    assert_eq!(
        slow_route["limits"]["global_threshold"]["concurrent"],
        serde_json::json!(2)
    );
    assert_eq!(
        slow_route["settings"]["max_hold"],
        serde_json::json!({"value": "1m", "from": "builtin"})
    );
    let page = scrape(sluice.handle().http_addr).await;
    let in_use = |route: &str| {
        metric(
            &page,
            &format!("sluice_concurrency_slots_in_use{{domain=\"inflight\",route=\"{route}\"}}"),
        )
    };
    assert_eq!(in_use("slow"), Some(0.0), "{page}");
    assert_eq!(in_use("per-user"), Some(2.0), "{page}");
    assert_eq!(
        metric(
            &page,
            "sluice_concurrency_slots_expired_total{domain=\"inflight\",route=\"per-user\"}"
        ),
        Some(3.0),
        "{page}"
    );
    sluice.stop().await;
}

#[tokio::test]
async fn in_memory_slots_are_taken_held_when_rejected_and_given_back() {
    slots_are_taken_held_when_rejected_and_given_back(in_memory().await).await;
}

#[tokio::test]
async fn in_redis_slots_are_taken_held_when_rejected_and_given_back() {
    let redis = RedisServer::start();
    slots_are_taken_held_when_rejected_and_given_back(on_redis(&redis).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_slots_are_taken_held_when_rejected_and_given_back() {
    let cluster = RedisCluster::start(3);
    let url = cluster.url();
    let sluice = Sluice::start_with(&[("inflight.yaml", LIMITS)], move |s| {
        s.backend = Backend::Redis;
        s.redis.url = url;
        s.redis.command_timeout = Duration::from_secs(2);
    })
    .await;
    slots_are_taken_held_when_rejected_and_given_back(sluice).await;
}

/// 10,000 take/give-back pairs from 8 clients at once, over 4 counters with few slots (so
/// many takes are rejected and still given back): every counter ends at 0.
async fn pairs_leave_every_counter_at_zero(sluice: Sluice) {
    const CLIENTS: usize = 8;
    const PAIRS: usize = 10_000;
    let channel = sluice.channel.clone();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let mut client = RateLimitServiceClient::<Channel>::new(channel.clone());
            tokio::spawn(async move {
                let mut refused = 0;
                for i in 0..PAIRS / CLIENTS {
                    let user = format!("u{}", (c + i) % 4);
                    let pairs = [("route", "per-user"), ("x-user", user.as_str())];
                    let take = client
                        .should_rate_limit(request("inflight", vec![desc(&pairs)]))
                        .await
                        .expect("take answered");
                    if take.get_ref().overall_code != Code::Ok as i32 {
                        refused += 1;
                    }
                    let back = client
                        .should_rate_limit(request("inflight", vec![give(&pairs)]))
                        .await
                        .expect("give-back answered");
                    assert_eq!(back.get_ref().overall_code, Code::Ok as i32);
                }
                refused
            })
        })
        .collect();
    let mut refused = 0;
    for t in tasks {
        refused += t.await.expect("client");
    }
    assert!(
        refused > 0,
        "the counters were never full: the test proves nothing"
    );
    let mut sluice = sluice;
    for u in 0..4 {
        let user = format!("u{u}");
        let pairs = [("route", "per-user"), ("x-user", user.as_str())];
        let r = sluice.ask_one("inflight", desc_hits(&pairs, 0)).await;
        assert_eq!(
            (r.overall_code, r.statuses[0].limit_remaining),
            (Code::Ok as i32, 1),
            "{user} after {PAIRS} pairs ({refused} takes refused)"
        );
    }
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_pairs_leave_every_counter_at_zero_in_memory() {
    pairs_leave_every_counter_at_zero(in_memory().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_pairs_leave_every_counter_at_zero_in_redis() {
    let redis = RedisServer::start();
    pairs_leave_every_counter_at_zero(on_redis(&redis).await).await;
    let slots = redis.keys(0, "sluice:*:slots");
    assert!(slots.is_empty(), "slot sets left in Redis: {slots:?}");
}

// ---------------------------------------------------------------------------------------------
// Budgets.

async fn a_budget_checks_at_start_and_records_every_charge(mut sluice: Sluice) {
    let key = [("route", "tokens"), ("x-api-key", "k1")];
    // Four responses of 250 tokens: each request is checked (0 hits), then charged.
    for i in 0..4 {
        assert_eq!(
            code(&mut sluice, desc_hits(&key, 0)).await,
            Code::Ok,
            "request {i}"
        );
        sluice.ask_one("inflight", desc_hits(&key, 250)).await;
    }
    assert_eq!(code(&mut sluice, desc_hits(&key, 0)).await, Code::OverLimit);
    // Another key has its own budget; a charge past what is left is still recorded.
    let other = [("route", "tokens"), ("x-api-key", "k2")];
    sluice.ask_one("inflight", desc_hits(&other, 900)).await;
    assert_eq!(code(&mut sluice, desc_hits(&other, 0)).await, Code::Ok);
    sluice.ask_one("inflight", desc_hits(&other, 300)).await;
    let r = sluice.ask_one("inflight", desc_hits(&other, 0)).await;
    assert_eq!(
        (r.overall_code, r.statuses[0].limit_remaining),
        (Code::OverLimit as i32, 0)
    );
    // The next window starts afresh.
    sluice.to_next_window(60_000);
    assert_eq!(code(&mut sluice, desc_hits(&other, 0)).await, Code::Ok);
    sluice.stop().await;
}

#[tokio::test]
async fn in_memory_a_budget_checks_at_start_and_records_every_charge() {
    a_budget_checks_at_start_and_records_every_charge(in_memory().await).await;
}

#[tokio::test]
async fn in_redis_a_budget_checks_at_start_and_records_every_charge() {
    let redis = RedisServer::start();
    a_budget_checks_at_start_and_records_every_charge(on_redis(&redis).await).await;
}

// ---------------------------------------------------------------------------------------------
// max_hold in real time, the real binary.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_frees_a_slot_whose_give_back_never_comes_after_max_hold() {
    let dir = tempfile::tempdir().expect("temp dir");
    let limits = "\
domain: inflight
routes:
  - name: slow
    max_hold: 1s
    global_threshold: { concurrent: 1 }
";
    std::fs::write(dir.path().join("inflight.yaml"), limits).expect("write limits");
    let sluice = SluiceProcess::spawn(dir.path(), &[]);
    let mut client = sluice.client().await;
    let mut ask = async |d: RateLimitDescriptor| {
        client
            .should_rate_limit(request("inflight", vec![d]))
            .await
            .expect("answered")
            .into_inner()
            .overall_code
    };
    let slow = [("route", "slow")];
    // Taken, never given back (as after an Envoy crash).
    assert_eq!(ask(desc(&slow)).await, Code::Ok as i32);
    let taken = std::time::Instant::now();
    assert_eq!(ask(desc_hits(&slow, 0)).await, Code::OverLimit as i32);
    // Back once max_hold has passed (polled, at most 5 s).
    let mut free_after = None;
    while taken.elapsed() < Duration::from_secs(5) {
        if ask(desc_hits(&slow, 0)).await == Code::Ok as i32 {
            free_after = Some(taken.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let free_after = free_after.unwrap_or_else(|| panic!("never freed\n{}", sluice.output()));
    assert!(
        free_after >= Duration::from_millis(900),
        "freed after {free_after:?}, before max_hold"
    );
    assert_eq!(ask(desc(&slow)).await, Code::Ok as i32);
}

// ---------------------------------------------------------------------------------------------
// A give-back never fails, whatever the fallback.

#[tokio::test]
async fn with_redis_down_a_give_back_is_answered_ok_in_every_fallback_mode() {
    let limits = "\
domain: inflight
routes:
  - name: error
    fallback: error
    global_threshold: { concurrent: 2 }
  - name: deny
    fallback: deny
    global_threshold: { concurrent: 2 }
";
    // A loopback port nothing listens on: Redis is down from the start.
    let port = common::free_port();
    let mut sluice = Sluice::start_with(&[("inflight.yaml", limits)], move |s| {
        s.backend = Backend::Redis;
        s.redis.url = format!("redis://127.0.0.1:{port}");
        s.redis.connect_timeout = Duration::from_millis(100);
    })
    .await;
    for route in ["error", "deny"] {
        let pairs = [("route", route)];
        let back = sluice.send(request("inflight", vec![give(&pairs)])).await;
        assert_eq!(
            back.map(|r| r.overall_code).map_err(|s| s.code()),
            Ok(Code::Ok as i32),
            "{route}: a give-back while Redis is down"
        );
    }
    // Takes still follow their mode: `error` fails (Envoy's failure_mode_deny decides), `deny`
    // rejects.
    let take = sluice
        .send(request("inflight", vec![desc(&[("route", "error")])]))
        .await;
    assert_eq!(
        take.map_err(|s| s.code()).err(),
        Some(tonic::Code::Unavailable)
    );
    assert_eq!(
        code(&mut sluice, desc(&[("route", "deny")])).await,
        Code::OverLimit
    );
    sluice.stop().await;
}
