//! The per-request path without the network: validate, match and count in memory, build the
//! response. Run with `cargo bench --bench request_path`.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::clock::ManualClock;
use sluice::config::load_dir;
use sluice::config::settings::RequestBounds;
use sluice::limiter::memory::MemoryStore;
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

fn limiter() -> RateLimiter {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/limits");
    let limits = match load_dir(&dir) {
        Ok(limits) => limits,
        Err(e) => panic!("example limits must load: {e}"),
    };
    RateLimiter::new(
        limits,
        Arc::new(MemoryStore::new(1_000_000)),
        Arc::new(ManualClock::new(1_700_000_000_000)),
        RequestBounds::default(),
    )
}

fn bench(c: &mut Criterion) {
    let rt = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    };
    let limiter = limiter();
    let cases = [
        ("global_threshold", request("edge", &[&[("route", "api")]])),
        (
            "per_header_and_per_ip",
            request(
                "edge",
                &[
                    &[("route", "api-users"), ("x-api-key", "vip-42")],
                    &[("route", "api-users"), ("remote_address", "10.1.2.3")],
                ],
            ),
        ),
        ("unknown_domain", request("nowhere", &[&[("route", "api")]])),
    ];
    let mut group = c.benchmark_group("should_rate_limit_memory");
    for (name, req) in &cases {
        group.bench_function(*name, |b| {
            b.iter(|| black_box(rt.block_on(limiter.should_rate_limit(black_box(req)))).is_ok())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
