//! Limits charged at stream end, through the real Envoy 1.40 with the shipped files:
//! `config/envoy/stream-end.yaml` in front of sluice serving `config/limits/inflight.yaml`.
//!
//! - `/slow` (`concurrent: 2`): three requests held by a slow upstream give 2 × 200 and
//!   1 × 429; once they finish, two more pass. In memory and in Redis.
//! - `/llm` (1,000 tokens a minute per API key, charged from the response's `x-tokens-used`):
//!   four responses of 250 pass, the fifth request gets 429, another key passes, and a
//!   response costing more than what is left is still charged.
//!
//! Real time (Envoy): the give-backs and charges arrive just after each response, so the tests
//! wait for them on sluice's metrics (polled) rather than guess a delay.

mod common;

use std::time::{Duration, Instant};

use common::envoy::{Envoy, Ports, bootstrap, envoy_bin, start_scripted_upstream};
use common::free_port;
use common::metrics::{metric, scrape};
use common::redis::RedisServer;
use common::rls::{RateLimitServiceClient, desc_hits, request};
use common::sluice::LiveSluice;
use sluice::config::settings::{Backend, Settings};

const BOOTSTRAP: &str = "config/envoy/stream-end.yaml";

fn limits() -> String {
    std::fs::read_to_string(common::repo_path("config/limits/inflight.yaml")).expect("limits")
}

struct Stack {
    sluice: LiveSluice,
    envoy: Envoy,
}

async fn stack(configure: impl FnOnce(&mut Settings)) -> Stack {
    envoy_bin();
    let upstream = start_scripted_upstream().await;
    let sluice = LiveSluice::start_with(&[("inflight.yaml", &limits())], configure).await;
    let ports = Ports {
        listener: free_port(),
        upstream,
        rls: sluice.grpc_port(),
        admin: free_port(),
    };
    let config = bootstrap(BOOTSTRAP, &ports, false, |c| c);
    let envoy = Envoy::start(&config, ports.listener).await;
    Stack { sluice, envoy }
}

/// Waits (at most 5 s) until `series` on sluice's `/metrics` reads `value`.
async fn until_metric(stack: &Stack, series: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = None;
    while Instant::now() < deadline {
        let page = scrape(stack.sluice.http_addr()).await;
        last = metric(&page, series);
        if last == Some(value) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "{series} is {last:?}, not {value}, 5 s on\nEnvoy log:\n{}",
        stack.envoy.log_text()
    );
}

const SLOW_IN_USE: &str = r#"sluice_concurrency_slots_in_use{domain="inflight",route="slow"}"#;

/// `n` requests to `/slow` at once, each held 1.5 s by the upstream; their statuses, sorted.
async fn at_once(stack: &Stack, n: usize) -> Vec<u16> {
    let addr = stack.envoy.addr();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            tokio::spawn(async move {
                let headers = [("host", "localhost"), ("x-delay-ms", "1500")];
                common::http::send(
                    addr,
                    "GET",
                    "/slow",
                    &headers,
                    None,
                    Duration::from_secs(15),
                )
                .await
            })
        })
        .collect();
    let mut codes = Vec::new();
    for t in tasks {
        match t.await.expect("request task") {
            Ok(r) => codes.push(r.status),
            Err(e) => panic!("GET /slow: {e}\nEnvoy log:\n{}", stack.envoy.log_text()),
        }
    }
    codes.sort();
    codes
}

async fn two_in_flight_through_envoy(stack: Stack) {
    assert_eq!(at_once(&stack, 3).await, [200, 200, 429]);
    // Every request gave its slot back at stream end, the rejected one too.
    until_metric(&stack, SLOW_IN_USE, 0.0).await;
    assert_eq!(at_once(&stack, 2).await, [200, 200]);
    until_metric(&stack, SLOW_IN_USE, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_2_admits_two_of_three_in_flight_then_two_more_in_memory() {
    two_in_flight_through_envoy(stack(|_| {}).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_2_admits_two_of_three_in_flight_then_two_more_in_redis() {
    let redis = RedisServer::start();
    let url = redis.url();
    two_in_flight_through_envoy(
        stack(move |s| {
            s.backend = Backend::Redis;
            s.redis.url = url;
        })
        .await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_budget_is_checked_at_start_and_charged_from_the_response() {
    let stack = stack(|_| {}).await;
    // The whole test in one minute window: start with at least 20 s of it left.
    let in_minute = common::now_ms() % 60_000;
    if in_minute > 40_000 {
        tokio::time::sleep(Duration::from_millis(60_000 - in_minute + 20)).await;
    }
    // Each request is one check and, after a 200 response, one charge: sluice has answered
    // both before the next request is sent.
    let calls = std::cell::Cell::new(0.0);
    let get = async |key: &str, cost: &str| {
        let r = stack
            .envoy
            .get("/llm", &[("x-api-key", key), ("x-cost", cost)])
            .await;
        calls.set(calls.get() + if r.status == 200 { 2.0 } else { 1.0 });
        until_metric(&stack, "sluice_requests_total", calls.get()).await;
        r.status
    };
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(get("k1", "250").await);
    }
    assert_eq!(codes, [200, 200, 200, 200, 429], "1,000 tokens, 250 each");
    assert_eq!(
        get("k2", "900").await,
        200,
        "another key has its own budget"
    );
    // Envoy sent the check with hits_addend 0: it counted nothing, only the 900 are charged.
    let channel = tonic::transport::Channel::from_shared(format!(
        "http://127.0.0.1:{}",
        stack.sluice.grpc_port()
    ))
    .expect("uri")
    .connect()
    .await
    .expect("connect to sluice");
    let pairs = [("route", "llm"), ("x-api-key", "k2")];
    let check = request("inflight", vec![desc_hits(&pairs, 0)]);
    let answer = RateLimitServiceClient::new(channel)
        .should_rate_limit(check)
        .await
        .expect("answered")
        .into_inner();
    assert_eq!(answer.statuses[0].limit_remaining, 100);
    calls.set(calls.get() + 1.0);
    // 100 left: the check passes, and the 300 the response cost are charged all the same.
    assert_eq!(get("k2", "300").await, 200);
    assert_eq!(
        get("k2", "1").await,
        429,
        "the charge past the limit was recorded"
    );
}
