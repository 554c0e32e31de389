//! The request path with each backend: `RateLimiter::should_rate_limit` counting in memory
//! and in Redis (a `redis-server` started here on a free loopback port and killed at the
//! end), for the same requests, so the cost of the Redis round trip reads directly as the
//! ratio of the two. Run with `cargo bench --bench backends`.
//!
//! The Redis cases are skipped with a note when `redis-server` is not installed.

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::clock::ManualClock;
use sluice::config::load_dir;
use sluice::config::settings::RequestBounds;
use sluice::limiter::Store;
use sluice::limiter::memory::MemoryStore;
use sluice::limiter::redis::RedisStore;
use sluice::proto::descriptor::RateLimitDescriptor;
use sluice::proto::descriptor::rate_limit_descriptor::Entry;
use sluice::proto::rls::RateLimitRequest;
use sluice::service::RateLimiter;

fn request(domain: &str, descriptors: &[&[(&str, &str)]]) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors: descriptors
            .iter()
            .map(|entries| RateLimitDescriptor {
                entries: entries
                    .iter()
                    .map(|(k, v)| Entry {
                        key: (*k).into(),
                        value: (*v).into(),
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        hits_addend: 0,
    }
}

fn limiter(store: Arc<dyn Store>) -> RateLimiter {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/limits");
    let limits = match load_dir(&dir) {
        Ok(limits) => limits,
        Err(e) => panic!("example limits must load: {e}"),
    };
    // A fixed time after the real clock (see common::scenarios::BASE_MS), 15 s into a minute.
    RateLimiter::new(
        limits,
        store,
        Arc::new(ManualClock::new(common::scenarios::BASE_MS + 15_250)),
        RequestBounds::default(),
    )
}

fn bench(c: &mut Criterion) {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    };
    let cases = [
        ("global_threshold", request("edge", &[&[("route", "api")]])),
        (
            "two_descriptors",
            request(
                "edge",
                &[
                    &[("route", "api-users"), ("x-api-key", "vip-42")],
                    &[("route", "api-users"), ("remote_address", "10.1.2.3")],
                ],
            ),
        ),
    ];

    let memory = limiter(Arc::new(MemoryStore::new(1_000_000)));
    // Panics, saying how to install it, when redis-server is missing: a bench that quietly
    // skipped its Redis half would report half a comparison.
    let redis_server = Some(common::redis::RedisServer::start());
    let redis = redis_server.as_ref().map(|server| {
        let store = rt.block_on(async {
            let mut settings = common::store::redis_settings(&server.url());
            settings.pool_size = 4;
            match RedisStore::connect(&settings).await {
                Ok(store) => store,
                Err(e) => panic!("connect to the bench redis: {e}"),
            }
        });
        limiter(Arc::new(store))
    });

    let mut group = c.benchmark_group("should_rate_limit");
    for (name, req) in &cases {
        group.bench_function(format!("memory/{name}"), |b| {
            b.iter(|| black_box(rt.block_on(memory.should_rate_limit(black_box(req)))).is_ok())
        });
        if let Some(redis) = &redis {
            // Every answer must come from Redis, not be an error.
            if let Err(e) = rt.block_on(redis.should_rate_limit(req)) {
                panic!("redis case {name}: {e}");
            }
            group.bench_function(format!("redis/{name}"), |b| {
                b.iter(|| {
                    let answer = rt.block_on(redis.should_rate_limit(black_box(req)));
                    assert!(answer.is_ok(), "{answer:?}");
                    black_box(answer)
                })
            });
        }
    }
    group.finish();
    // The limiter (and its Redis client) goes before the server it talks to.
    drop(redis);
    drop(redis_server);
}

criterion_group!(benches, bench);
criterion_main!(benches);
