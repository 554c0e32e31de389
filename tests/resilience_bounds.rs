//! Bounds under abuse: a flood of distinct keys cannot grow the memory store past
//! `memory.max_entries`, many over-limit counters cannot grow the over-limit cache past
//! `over_limit_cache.max_entries`, and with `max_in_flight` reached a request is refused at once
//! with RESOURCE_EXHAUSTED instead of queueing behind a slow store.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::metrics::{metric, peak_rss_kib, rss_kib, scrape};
use common::redis::RedisServer;
use common::rls::{Code, Unit, desc, limit, metadata, request, status};
use common::sluice::Sluice;
use sluice::clock::ManualClock;
use sluice::config::load_dir;
use sluice::config::settings::{Backend, RequestBounds};
use sluice::limiter::memory::MemoryStore;
use sluice::service::RateLimiter;

const PER_IP: &str = r#"
domain: flood
defaults:
  timeout: 2s
routes:
  - name: per-ip
    rule_items:
      - name: by-ip
        limit_by_per_ip: from-remote-addr
        limit_keys:
          - { key: "0.0.0.0/0", query_per_minute: 1 }
"#;

/// The `i`-th address of the flood: `i -> i * odd ^ c` is a bijection of u32, so the
/// addresses are distinct, and scattered over the whole IPv4 space.
fn address(i: u32) -> String {
    std::net::Ipv4Addr::from(i.wrapping_mul(0x9E37_79B1) ^ 0x5BD1_E995).to_string()
}

/// Drives `n` distinct addresses through the request path, in process, against a memory store
/// bounded at `max`; checks the bound and prints the peak RSS.
fn flood(n: u32, max: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("flood.yaml"), PER_IP).expect("write limits");
    let limits = load_dir(dir.path()).unwrap_or_else(|e| panic!("limits must load: {e}"));
    let store = Arc::new(MemoryStore::new(max));
    let limiter = RateLimiter::new(
        limits,
        store.clone(),
        Arc::new(ManualClock::new(common::rls::START_MS)),
        RequestBounds::default(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let hwm_before = peak_rss_kib();
    let rss_before = rss_kib();
    let started = Instant::now();
    let mut req = request(
        "flood",
        vec![desc(&[("route", "per-ip"), ("remote_address", "0.0.0.0")])],
    );
    let mut over = 0u64;
    rt.block_on(async {
        for i in 0..n {
            req.descriptors[0].entries[1].value = address(i);
            let r = limiter
                .should_rate_limit(&req)
                .await
                .unwrap_or_else(|e| panic!("request {i} refused: {e}"));
            // Every address is new: its first hit is admitted, stored or not.
            if r.overall_code != Code::Ok as i32 {
                over += 1;
            }
        }
    });
    let took = started.elapsed();
    let hwm_after = peak_rss_kib();
    let rss_after = rss_kib();
    let mib =
        |kib: Option<u64>| kib.map_or("?".to_string(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
    println!(
        "flood of {n} distinct addresses, memory.max_entries {max}: {:?} ({:.0} req/s); \
         stored {}, rejected inserts {}; peak RSS (VmHWM) {} before -> {} after; \
         RSS {} -> {}",
        took,
        f64::from(n) / took.as_secs_f64(),
        store.len(),
        store.rejected_inserts(),
        mib(hwm_before),
        mib(hwm_after),
        mib(rss_before),
        mib(rss_after),
    );
    assert_eq!(over, 0, "the first hit of each address is admitted");
    assert!(
        store.len() <= max,
        "memory store holds {} counters, more than memory.max_entries {max}",
        store.len()
    );
    assert!(
        store.rejected_inserts() > 0,
        "a flood past the bound must be refused (rejected_inserts)"
    );
    assert_eq!(
        store.len() as u64 + store.rejected_inserts(),
        u64::from(n),
        "each new address is either stored or counted as a rejected insert"
    );
    if let Some(hwm) = hwm_after {
        assert!(
            hwm < 1024 * 1024,
            "peak RSS {hwm} KiB is over 1 GiB after a flood bounded at {max} counters"
        );
    }
    // A counter stored before the bound was reached still counts exactly.
    req.descriptors[0].entries[1].value = address(0);
    let r = rt
        .block_on(limiter.should_rate_limit(&req))
        .expect("answered");
    assert_eq!(
        r.overall_code,
        Code::OverLimit as i32,
        "address 0 was stored, so its second hit is over: {r:?}"
    );
}

/// The acceptance case: 1,000,000 distinct addresses against a bound of 100,000 (about 20 s
/// in a debug build, a few seconds in release).
#[test]
fn a_flood_of_a_million_distinct_keys_stays_within_memory_max_entries() {
    flood(1_000_000, 100_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_over_limit_counters_do_not_grow_the_over_limit_cache_past_its_bound() {
    let redis = RedisServer::start();
    const BOUND: usize = 5;
    const COUNTERS: u32 = 40;
    let url = redis.url();
    let mut s = Sluice::start_with(&[("flood.yaml", PER_IP)], |s| {
        s.backend = Backend::Redis;
        s.redis.url = url;
        s.redis.command_timeout = std::time::Duration::from_secs(2);
        s.fallback.failure_threshold = 1_000;
        s.over_limit_cache.max_entries = BOUND;
    })
    .await;
    let reset = s.until_reset(common::MINUTE);
    let per_ip = limit(1, Unit::Minute, "per-ip/by-ip");
    let ask = |i: u32| {
        request(
            "flood",
            vec![desc(&[
                ("route", "per-ip"),
                ("remote_address", &address(i)),
            ])],
        )
    };
    for i in 0..COUNTERS {
        let first = s.call(ask(i)).await;
        assert_eq!(first.overall_code, Code::Ok as i32, "{i}: {first:?}");
        let second = s.call(ask(i)).await;
        assert_eq!(
            second.overall_code,
            Code::OverLimit as i32,
            "{i}: {second:?}"
        );
        assert_eq!(
            (second.statuses[0].code, second.statuses[0].limit_remaining),
            (Code::OverLimit as i32, 0),
            "{i}: {second:?}"
        );
    }
    let page = scrape(s.handle().http_addr).await;
    let entries = metric(&page, "sluice_over_limit_cache_entries")
        .unwrap_or_else(|| panic!("no sluice_over_limit_cache_entries on /metrics:\n{page}"));
    println!(
        "{COUNTERS} over-limit counters, over_limit_cache.max_entries {BOUND}: {entries} cached"
    );
    assert!(
        entries <= BOUND as f64,
        "{COUNTERS} over-limit counters grew the cache to {entries} entries, \
         past over_limit_cache.max_entries {BOUND}"
    );
    assert!(entries > 0.0, "the cache remembers over-limit counters");

    // Counters the cache could not remember are still answered right, by Redis.
    let last = s.call(ask(COUNTERS - 1)).await;
    assert_eq!(last.overall_code, Code::OverLimit as i32, "{last:?}");
    assert_eq!(metadata(&last, "source"), Some("redis"), "{last:?}");
    let first = s.call(ask(0)).await;
    assert_eq!(
        first.statuses[0],
        status(Code::OverLimit, &per_ip, 0, reset),
        "{first:?}"
    );
    assert_eq!(metadata(&first, "source"), Some("local_cache"), "{first:?}");
    s.stop().await;
}

/// `max_in_flight: 1` and a store that hangs (Redis frozen with SIGSTOP, route timeout 300 ms,
/// breaker kept closed): while one request waits for the store, every other one is refused
/// with RESOURCE_EXHAUSTED at once, not after the store timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_in_flight_requests_are_refused_at_once_with_resource_exhausted() {
    let mut redis = RedisServer::start();
    const SLOW_LIMITS: &str = r#"
domain: shed
routes:
  - name: slow
    timeout: 300ms
    fallback: local
    global_threshold: { query_per_minute: 1000 }
"#;
    let url = redis.url();
    let mut s = Sluice::start_with(&[("shed.yaml", SLOW_LIMITS)], |s| {
        s.backend = Backend::Redis;
        s.redis.url = url;
        // The route's 300 ms decides, not the client's own command timeout.
        s.redis.command_timeout = std::time::Duration::from_secs(5);
        s.fallback.failure_threshold = 1_000_000;
        s.max_in_flight = 1;
    })
    .await;
    let req = || request("shed", vec![desc(&[("route", "slow")])]);
    let r = s.call(req()).await;
    assert_eq!(metadata(&r, "source"), Some("redis"), "{r:?}");

    redis.stop();
    let mut slow_client = s.client.clone();
    let slow = tokio::spawn(async move {
        let started = Instant::now();
        let answer = slow_client.should_rate_limit(req()).await;
        (answer, started.elapsed())
    });
    // Let the slow request take the only permit.
    tokio::time::sleep(Duration::from_millis(60)).await;
    let shed: Vec<_> = (0..8)
        .map(|_| {
            let mut client = s.client.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let answer =
                    tokio::time::timeout(Duration::from_secs(5), client.should_rate_limit(req()))
                        .await;
                (answer, started.elapsed())
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for (i, task) in shed.into_iter().enumerate() {
        let (answer, took) = task.await.expect("task");
        let answer = answer.unwrap_or_else(|_| panic!("request {i} hung for 5 s"));
        match answer {
            Err(status) => assert_eq!(
                status.code(),
                tonic::Code::ResourceExhausted,
                "request {i} beyond max_in_flight: {status:?}"
            ),
            Ok(r) => panic!(
                "request {i} beyond max_in_flight was decided (after {took:?}) instead of \
                 refused: {r:?}"
            ),
        }
        assert!(
            took < Duration::from_millis(100),
            "request {i} beyond max_in_flight was refused after {took:?}, not at once"
        );
        slowest = slowest.max(took);
    }
    assert!(
        !slow.is_finished(),
        "the request holding the permit was still waiting for the store"
    );
    let (answer, took) = slow.await.expect("task");
    println!("max_in_flight 1: shed answers within {slowest:?}; the held request took {took:?}");
    let r = answer
        .expect("the request that waited for the store is answered")
        .into_inner();
    assert_eq!(r.overall_code, Code::Ok as i32, "{r:?}");
    assert_eq!(metadata(&r, "source"), Some("fallback"), "{r:?}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "the held request waits the route timeout (300 ms), then the fallback answers: {took:?}"
    );

    // The permit is free again.
    redis.cont();
    let r = s.call(req()).await;
    assert_eq!(r.overall_code, Code::Ok as i32, "{r:?}");
    s.stop().await;
}
