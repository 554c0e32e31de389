//! One breaker per Redis Cluster shard: when a master dies (`kill -9`), only the counters in
//! its slots are answered by the fallback, continuing their count; counters on the other
//! masters keep being counted in Redis, without a single fallback answer.
//!
//! In process (`server::start`) with the kit's manual clock, against a real three-master
//! cluster. The survivors are told `cluster-require-full-coverage no` (as an operator running
//! without replicas would), so they keep serving their slots after the dead node is marked
//! failed.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::cluster::RedisCluster;
use common::resp::resp;
use common::rls::{Code, metadata};
use common::sluice::Sluice;
use sluice::config::settings::Backend;

const ROUTES: usize = 24;
const LIMIT: u32 = 200;

fn limits() -> String {
    let mut text =
        String::from("domain: shards\ndefaults:\n  fallback: local\n  timeout: 50ms\nroutes:\n");
    for i in 0..ROUTES {
        text.push_str(&format!(
            "  - name: r{i}\n    global_threshold: {{ query_per_hour: {LIMIT} }}\n"
        ));
    }
    text
}

/// The master port holding each route's counter, read from the nodes' keys.
fn owners(cluster: &RedisCluster) -> HashMap<String, u16> {
    let mut owners = HashMap::new();
    for port in cluster.ports() {
        let common::resp::Resp::Array(keys) = resp(port, &["KEYS", "sluice:{shards*"]) else {
            continue;
        };
        for key in keys {
            let key = key.text();
            if let Some(route) = (0..ROUTES)
                .map(|i| format!("r{i}"))
                .filter(|r| key.contains(&format!(":{r}:")))
                .max_by_key(|r| r.len())
            {
                owners.insert(route, port);
            }
        }
    }
    owners
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_master_sends_only_its_own_counters_to_the_fallback() {
    let mut cluster = RedisCluster::start(3);
    let url = cluster.url();
    let mut s = Sluice::start_with(&[("shards.yaml", &limits())], |settings| {
        settings.backend = Backend::Redis;
        settings.redis.url = url;
        settings.fallback.failure_threshold = 1;
        settings.fallback.probe_interval = Duration::from_millis(100);
    })
    .await;
    for i in 0..ROUTES {
        let r = s.ask("shards", &[&[("route", &format!("r{i}"))]]).await;
        assert_eq!(metadata(&r, "source"), Some("redis"), "{r:?}");
    }
    // Each master's own connection is waited for at start; a moment more lets a slow machine
    // finish the cluster handshake before a master dies (no window is crossed: the clock is
    // the manual one).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let owners = owners(&cluster);
    let victim_port = owners["r0"];
    let victim = "r0".to_string();
    let survivor = owners
        .iter()
        .find(|(_, port)| **port != victim_port)
        .map(|(route, _)| route.clone())
        .expect("a route on another master");
    // 100 of the victim's 200 used before its master dies (1 already).
    for _ in 0..99 {
        s.ask("shards", &[&[("route", &victim)]]).await;
    }
    for port in cluster.ports().into_iter().filter(|p| *p != victim_port) {
        resp(
            port,
            &["CONFIG", "SET", "cluster-require-full-coverage", "no"],
        );
    }
    let node = cluster
        .nodes
        .iter_mut()
        .find(|n| n.port == victim_port)
        .expect("victim node");
    node.kill9();

    let (mut victim_admitted, mut victim_fallback) = (0, 0);
    let mut survivor_sources: HashMap<String, u32> = HashMap::new();
    let started = Instant::now();
    for _ in 0..200 {
        let r = s.ask("shards", &[&[("route", &victim)]]).await;
        victim_admitted += u32::from(r.overall_code == Code::Ok as i32);
        victim_fallback += u32::from(metadata(&r, "source") == Some("fallback"));
        let r = s.ask("shards", &[&[("route", &survivor)]]).await;
        *survivor_sources
            .entry(metadata(&r, "source").unwrap_or("none").to_string())
            .or_default() += 1;
    }
    let ready = common::http::get(s.handle().http_addr, "/readyz")
        .await
        .body;
    println!("/readyz: {ready}");
    println!(
        "after the kill ({:?}): victim {victim} admitted {victim_admitted} of 200 \
         ({victim_fallback} from the fallback); survivor {survivor} answered by {survivor_sources:?}",
        started.elapsed()
    );
    assert_eq!(
        survivor_sources.get("redis"),
        Some(&200),
        "a counter on a live master was answered by something else: {survivor_sources:?}"
    );
    assert!(victim_fallback >= 190, "{victim_fallback} fallback answers");
    // 100 used before, so 100 more at most (+2%).
    assert!(
        100 + victim_admitted <= LIMIT + LIMIT / 50,
        "the victim admitted {victim_admitted} after its master died, with 100 of {LIMIT} used"
    );
    s.stop().await;
}
