//! Leases simulated: 100 replicas share one counter under uneven load, on a manual clock.
//!
//! Each replica is the real stack a Redis backend builds (over-limit cache → leases) over one
//! shared store, which is the memory store running the same lease algorithm as the Redis
//! script. Time is a number advanced by the loop, one millisecond per tick; nothing sleeps.
//! Demand is spread over the replicas by a Zipf law (replica i gets a share ∝ 1/(i+1)), so a
//! few replicas are hot and most see a request every few seconds.
//!
//! What it proves, per window: the replicas together never admit more than the limit; when
//! demand passes the limit they admit nearly all of it; and a store call serves many requests.
//! `cargo test --test lease_simulation -- --nocapture` prints the table the README shows.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sluice::limiter::backend::Remote;
use sluice::limiter::cache::OverLimitCache;
use sluice::limiter::lease::Leasing;
use sluice::limiter::memory::MemoryStore;
use sluice::limiter::{
    Algorithm, CounterOp, HitMode, Lease, OpPolicy, Source, Store, StoreFuture, Threshold, Unit,
};

/// The store every replica shares, counting the calls it gets.
struct SharedStore {
    counters: MemoryStore,
    calls: AtomicU64,
}

impl Store for SharedStore {
    fn apply<'a>(&'a self, ops: &'a mut [CounterOp], now: u64) -> StoreFuture<'a> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.counters.apply(ops, now)
    }
}

impl Remote for SharedStore {
    fn source(&self) -> Source {
        Source::Redis
    }
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
    fn probe(&self, _shard: usize) -> StoreFuture<'_> {
        Box::pin(std::future::ready(Ok(())))
    }
}

const REPLICAS: usize = 100;
/// One window: a hot key is limited per second (10,000/s here), where leases matter.
const WINDOW: u64 = 1_000;
/// The first window starts here (an aligned second), so windows are whole.
const T0: u64 = 1_700_000_040_000;

struct Run {
    /// Requests and admitted hits of each window.
    windows: Vec<(u64, u64)>,
    requests: u64,
    store_calls: u64,
}

/// Runs `windows` windows of `demand` requests per window spread over the replicas.
fn simulate(algorithm: Algorithm, limit: u64, lease: Lease, demand: f64, windows: u64) -> Run {
    let shared = Arc::new(SharedStore {
        counters: MemoryStore::new(1_000),
        calls: AtomicU64::new(0),
    });
    let replicas: Vec<OverLimitCache> = (0..REPLICAS)
        .map(|_| {
            let leasing: Arc<dyn Store> = Arc::new(Leasing::new(shared.clone(), 1_000));
            OverLimitCache::new(leasing, 1_000)
        })
        .collect();
    let weights: Vec<f64> = (0..REPLICAS).map(|i| 1.0 / (i + 1) as f64).collect();
    let total: f64 = weights.iter().sum();
    let per_ms: Vec<f64> = weights
        .iter()
        .map(|w| demand * w / total / WINDOW as f64)
        .collect();
    let mut owed = vec![0.0f64; REPLICAS];
    let threshold = Threshold::new(limit, Unit::Second);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut per_window = vec![(0u64, 0u64); windows as usize];
    let mut requests = 0;
    for tick in 0..windows * WINDOW {
        let now = T0 + tick;
        for r in 0..REPLICAS {
            owed[r] += per_ms[r];
            while owed[r] >= 1.0 {
                owed[r] -= 1.0;
                requests += 1;
                let mut op = [CounterOp {
                    policy: OpPolicy {
                        lease,
                        ..OpPolicy::default()
                    },
                    ..CounterOp::new("sim".to_string(), algorithm, threshold, 1, HitMode::Take)
                }];
                runtime
                    .block_on(replicas[r].apply(&mut op, now))
                    .expect("the shared store always answers");
                let window = &mut per_window[(tick / WINDOW) as usize];
                window.0 += 1;
                if !op[0].outcome.over {
                    window.1 += 1;
                }
            }
        }
    }
    Run {
        windows: per_window,
        requests,
        store_calls: shared.calls.load(Ordering::Relaxed),
    }
}

/// What one row of the table says.
struct Row {
    /// The most and the least any window admitted, as a share of the limit.
    best: f64,
    worst: f64,
    /// Requests refused in windows whose demand stayed within the limit.
    refused_under_limit: u64,
    calls_per_request: f64,
}

/// One row of the table: admitted / limit per window and the store calls per request.
fn row(name: &str, algorithm: Algorithm, limit: u64, lease: Lease, demand: f64) -> Row {
    let run = simulate(algorithm, limit, lease, demand * limit as f64, 3);
    let shares: Vec<f64> = run
        .windows
        .iter()
        .map(|&(_, admitted)| admitted as f64 / limit as f64)
        .collect();
    let best = shares.iter().cloned().fold(0.0, f64::max);
    let worst = shares.iter().cloned().fold(f64::MAX, f64::min);
    let refused_under_limit = run
        .windows
        .iter()
        .filter(|&&(requests, _)| requests <= limit)
        .map(|&(requests, admitted)| requests - admitted)
        .sum();
    let calls_per_request = run.store_calls as f64 / run.requests as f64;
    println!(
        "| {name} | {} | {lease} | {demand:.1}× | {worst:.3}–{best:.3} | {calls_per_request:.4} |",
        algorithm.as_str(),
    );
    Row {
        best,
        worst,
        refused_under_limit,
        calls_per_request,
    }
}

#[test]
fn a_hundred_replicas_never_pass_the_limit_and_leased_blocks_strand_little() {
    println!(
        "| case | algorithm | lease | demand / limit | admitted / limit (per window) | store calls per request |"
    );
    println!("|---|---|---|---:|---:|---:|");
    let limit = 10_000;
    let cases = [
        ("exact (no lease)", Algorithm::FixedWindow, Lease::Off, 2.0),
        ("oversubscribed", Algorithm::FixedWindow, Lease::Auto, 2.0),
        ("just over", Algorithm::FixedWindow, Lease::Auto, 1.1),
        ("under the limit", Algorithm::FixedWindow, Lease::Auto, 0.5),
        (
            "fixed blocks",
            Algorithm::FixedWindow,
            Lease::Block(50),
            2.0,
        ),
        ("exact (no lease)", Algorithm::TokenBucket, Lease::Off, 2.0),
        ("oversubscribed", Algorithm::TokenBucket, Lease::Auto, 2.0),
        ("just over", Algorithm::TokenBucket, Lease::Auto, 1.1),
    ];
    for (name, algorithm, lease, demand) in cases {
        let r = row(name, algorithm, limit, lease, demand);
        match algorithm {
            // A window never admits more than its limit, leased or not.
            Algorithm::FixedWindow => assert!(r.best <= 1.0, "{name}: {} of the limit", r.best),
            // A bucket starts full: its first window may admit the burst and the refill.
            _ => assert!(r.best <= 2.0, "{name}: {} of the limit", r.best),
        }
        if demand > 1.0 {
            assert!(
                r.worst >= 0.95,
                "{name}: only {} of the limit admitted",
                r.worst
            );
        } else {
            assert_eq!(r.refused_under_limit, 0, "{name}: refused under the limit");
        }
        // A drained bucket refills a few tokens per millisecond, and every replica's next
        // request asks for them: leases save little there, and the table shows it.
        if lease.is_on() && demand > 1.0 && algorithm == Algorithm::FixedWindow {
            assert!(
                r.calls_per_request < 0.2,
                "{name}: {} calls per request",
                r.calls_per_request
            );
        }
    }
}

#[test]
fn leases_call_the_store_far_less_than_exact_counting() {
    let limit = 10_000;
    let exact = simulate(Algorithm::FixedWindow, limit, Lease::Off, 20_000.0, 1);
    let leased = simulate(Algorithm::FixedWindow, limit, Lease::Auto, 20_000.0, 1);
    let per_request = |r: &Run| r.store_calls as f64 / r.requests as f64;
    // Exact counting calls the store for every admitted hit (the cache answers the rest).
    assert!(per_request(&exact) >= 0.45, "{}", per_request(&exact));
    assert!(
        per_request(&leased) < per_request(&exact) / 5.0,
        "leased {} vs exact {}",
        per_request(&leased),
        per_request(&exact)
    );
}
