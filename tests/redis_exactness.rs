//! Exact counting across replicas: three real `sluice serve` processes share one Redis (or
//! one 3-master cluster), 32 concurrent clients spread over them, and a counter limited to
//! 100 per minute admits exactly 100 requests, never 99 or 101, however the requests
//! interleave (the script is atomic, every replica agrees on the window).
//!
//! These tests run on the system clock (the real binary), so a minute boundary during the
//! run would split the count over two windows; each test makes sure it starts with at least
//! 15 s left in the current minute (the one wait these tests allow) and checks afterwards that
//! it finished in the same minute.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::cluster::RedisCluster;
use common::http;
use common::now_ms;
use common::redis::RedisServer;
use common::rls::{Code, RateLimitDescriptor, RateLimitServiceClient, desc, request};
use common::sluice::SluiceProcess;
use sluice::limiter::redis::RedisStore;
use tonic::transport::Channel;

/// Store budget and fallback for these limits: a slow reply on a loaded machine must not be
/// answered by the local fallback (which would count apart and break exactness silently);
/// any store failure fails the request instead, and the test reports it.
const LIMITS: &str = r#"
domain: exact
defaults: { timeout: 5s, fallback: error }
routes:
  - name: api
    global_threshold: { query_per_minute: 100 }
  - name: tenants
    rule_items:
      - limit_by_per_header: x-tenant
        limit_keys:
          - { key: "*", name: tenant, query_per_minute: 100 }
"#;

/// Polls `/readyz` until the process serves with Redis reachable (at most 30 s).
async fn wait_ready(process: &mut SluiceProcess) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = process.try_wait() {
            panic!("sluice exited at start ({status}):\n{}", process.output());
        }
        if tokio::net::TcpStream::connect(process.http_addr)
            .await
            .is_ok()
        {
            let ready =
                http::get_within(process.http_addr, "/readyz", Duration::from_secs(5)).await;
            if ready.status == 200
                && ready.body.contains("reachable")
                && !ready.body.contains("fallback")
            {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "sluice on {} not ready after 30 s:\n{}",
            process.http_addr,
            process.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three `sluice serve` processes on `redis_url`, ready, each with a connected client.
async fn start_three(
    redis_url: &str,
    limits: &Path,
) -> (Vec<SluiceProcess>, Vec<RateLimitServiceClient<Channel>>) {
    let mut processes: Vec<SluiceProcess> = tokio::task::block_in_place(|| {
        (0..3)
            .map(|_| {
                SluiceProcess::spawn(
                    limits,
                    &[
                        ("SLUICE_BACKEND", "redis"),
                        ("SLUICE_REDIS_URL", redis_url),
                        ("SLUICE_REDIS_COMMAND_TIMEOUT", "5s"),
                    ],
                )
            })
            .collect()
    });
    let mut clients = Vec::new();
    for p in &mut processes {
        wait_ready(p).await;
        let channel = Channel::from_shared(format!("http://{}", p.grpc_addr))
            .expect("uri")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to sluice");
        clients.push(RateLimitServiceClient::new(channel));
    }
    (processes, clients)
}

/// The one allowed wait: the real binary counts in real minutes, so the run must not cross a
/// minute boundary. If less than 15 s are left in this minute, wait for the next one (plus a
/// margin). Returns the minute the run happens in.
async fn start_of_a_quiet_minute() -> u64 {
    let left = 60_000 - now_ms() % 60_000;
    if left < 15_000 {
        tokio::time::sleep(Duration::from_millis(left + 250)).await;
    }
    now_ms() / 60_000
}

/// What the clients got, per counter: (OK, OVER_LIMIT), plus every failure.
struct Tally {
    per_counter: BTreeMap<usize, (usize, usize)>,
    failures: Vec<String>,
}

/// Sends `total` requests with 32 concurrent clients spread over the processes; request `i`
/// carries the descriptor `descriptors[i % len]`.
async fn hammer(
    clients: &[RateLimitServiceClient<Channel>],
    descriptors: Vec<RateLimitDescriptor>,
    total: usize,
) -> Tally {
    let next = Arc::new(AtomicUsize::new(0));
    let descriptors = Arc::new(descriptors);
    let mut tasks = Vec::new();
    for task in 0..32 {
        let mut client = clients[task % clients.len()].clone();
        let next = next.clone();
        let descriptors = descriptors.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen: Vec<(usize, Result<i32, String>)> = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= total {
                    break;
                }
                let which = i % descriptors.len();
                let call =
                    client.should_rate_limit(request("exact", vec![descriptors[which].clone()]));
                let answer = match tokio::time::timeout(Duration::from_secs(10), call).await {
                    Ok(Ok(response)) => Ok(response.into_inner().overall_code),
                    Ok(Err(status)) => Err(format!("request {i}: {status:?}")),
                    Err(_) => Err(format!("request {i}: no answer in 10 s")),
                };
                seen.push((which, answer));
            }
            seen
        }));
    }
    let mut tally = Tally {
        per_counter: BTreeMap::new(),
        failures: Vec::new(),
    };
    for task in tasks {
        for (which, answer) in task.await.expect("client task") {
            let entry = tally.per_counter.entry(which).or_default();
            match answer {
                Ok(code) if code == Code::Ok as i32 => entry.0 += 1,
                Ok(code) if code == Code::OverLimit as i32 => entry.1 += 1,
                Ok(code) => tally.failures.push(format!("unexpected code {code}")),
                Err(e) => tally.failures.push(e),
            }
        }
    }
    tally
}

fn limits_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("exact.yaml"), LIMITS).expect("write limits");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_on_one_redis_admit_exactly_the_limit() {
    let redis = RedisServer::start();
    let limits = limits_dir();
    let (processes, clients) = start_three(&redis.url(), limits.path()).await;

    let minute = start_of_a_quiet_minute().await;
    let tally = hammer(&clients, vec![desc(&[("route", "api")])], 1_000).await;
    assert_eq!(
        now_ms() / 60_000,
        minute,
        "the run crossed a minute boundary, so it counted in two windows"
    );

    let logs_text = || {
        processes
            .iter()
            .map(SluiceProcess::output)
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    assert!(
        tally.failures.is_empty(),
        "{} requests failed, e.g. {:?}\n{}",
        tally.failures.len(),
        &tally.failures[..tally.failures.len().min(5)],
        logs_text()
    );
    assert_eq!(
        tally.per_counter.get(&0),
        Some(&(100, 900)),
        "(OK, OVER_LIMIT) of 1000 requests against 100 per minute"
    );
    let keys = redis.keys(0, "sluice:*");
    assert_eq!(keys.len(), 1, "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_on_a_cluster_admit_exactly_the_limit_per_counter() {
    let cluster = RedisCluster::start(3);
    let limits = limits_dir();

    // Four tenants per master, chosen by where their counters' keys live.
    let set = sluice::config::load_dir(limits.path()).expect("limits load");
    let domain = set.domain("exact").expect("domain exact");
    let mut tenants: Vec<String> = Vec::new();
    let mut per_node: BTreeMap<u16, usize> = BTreeMap::new();
    for i in 0.. {
        let tenant = format!("tenant-{i}");
        let descriptor = desc(&[("route", "tenants"), ("x-tenant", &tenant)]);
        let matched = sluice::matcher::match_descriptor(domain, &descriptor).expect("a limit");
        let owner = cluster.owner_of(&RedisStore::key(&matched.counter, 0));
        let taken = per_node.entry(owner).or_default();
        if *taken < 4 {
            *taken += 1;
            tenants.push(tenant);
        }
        if tenants.len() == 12 {
            break;
        }
        assert!(i < 10_000, "no counter landed on some master: {per_node:?}");
    }
    assert_eq!(per_node.len(), 3, "{per_node:?}");

    let (processes, clients) = start_three(&cluster.url(), limits.path()).await;
    let descriptors: Vec<_> = tenants
        .iter()
        .map(|t| desc(&[("route", "tenants"), ("x-tenant", t)]))
        .collect();
    let minute = start_of_a_quiet_minute().await;
    let tally = hammer(&clients, descriptors, 12 * 130).await;
    assert_eq!(
        now_ms() / 60_000,
        minute,
        "the run crossed a minute boundary, so it counted in two windows"
    );
    let logs_text = || {
        processes
            .iter()
            .map(SluiceProcess::output)
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    assert!(
        tally.failures.is_empty(),
        "{} requests failed, e.g. {:?}\n{}",
        tally.failures.len(),
        &tally.failures[..tally.failures.len().min(5)],
        logs_text()
    );
    let expected: BTreeMap<usize, (usize, usize)> = (0..12).map(|i| (i, (100, 30))).collect();
    assert_eq!(
        tally.per_counter, expected,
        "(OK, OVER_LIMIT) per tenant: 130 requests each against 100 per minute"
    );
    for port in cluster.ports() {
        assert!(cluster.dbsize(port) > 0, "master {port} holds counters");
    }
}
