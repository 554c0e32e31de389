//! The Redis store on a Redis Cluster of three masters: the scripts give
//! the memory store's answers there too, counters spread over every master (the hash tag is
//! the counter, not a constant), and one request's batch may span all the nodes.
//!
//! Each test starts its own cluster on free loopback ports (killed on drop).

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::MINUTE;
use common::cluster::RedisCluster;
use common::resp::Resp;
use common::resp::resp;
use common::scenarios::*;
use common::store::connect;
use sluice::limiter::memory::MemoryStore;
use sluice::limiter::redis::RedisStore;
use sluice::limiter::{Algorithm, CounterOp, HitMode, Outcome, Store, Unit};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_table_matches_memory_on_a_cluster() {
    let cluster = RedisCluster::start(3);
    let store = connect(&cluster.url()).await;
    check_table(&store, "table").await;
}

#[test]
fn random_sequences_match_memory_on_a_cluster() {
    let cluster = RedisCluster::start(3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let store = rt.block_on(connect(&cluster.url()));
    check_random(&store, &rt, 60, "random");
}

fn op(counter: String, limit: u64) -> CounterOp {
    CounterOp::new(
        counter,
        Algorithm::FixedWindow,
        per(limit, Unit::Minute),
        1,
        HitMode::Take,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_counters_spread_over_every_master() {
    let cluster = RedisCluster::start(3);
    let store = connect(&cluster.url()).await;
    let now = BASE_MS + 15_250;
    // 300 counters in batches of 30: with 3 masters, the chance that one gets none of them
    // by accident is (2/3)^300.
    for batch in 0..10 {
        let mut ops: Vec<CounterOp> = (0..30)
            .map(|i| op(format!("spread:c{batch}-{i}"), 5))
            .collect();
        store.apply(&mut ops, now).await.expect("batch applied");
        for o in &ops {
            assert_eq!(
                o.outcome,
                Outcome {
                    over: false,
                    remaining: 4,
                    reset_ms: 44_750
                },
                "{}",
                o.counter
            );
        }
    }
    let sizes: BTreeMap<u16, i64> = cluster
        .ports()
        .into_iter()
        .map(|p| (p, cluster.dbsize(p)))
        .collect();
    assert!(sizes.values().all(|&n| n > 0), "keys per master: {sizes:?}");
    assert_eq!(
        sizes.values().sum::<i64>(),
        300,
        "keys per master: {sizes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_batch_spanning_every_node_is_counted_on_each() {
    let cluster = RedisCluster::start(3);
    let store = connect(&cluster.url()).await;
    let now = BASE_MS + 15_250;
    let window = now - now % MINUTE;

    // Two counters per master, chosen by where their keys live.
    let mut chosen: Vec<(String, u16)> = Vec::new();
    let mut per_node: BTreeMap<u16, usize> = BTreeMap::new();
    for i in 0.. {
        let counter = format!("span:c{i}");
        let owner = cluster.owner_of(&RedisStore::key(&counter, window));
        let taken = per_node.entry(owner).or_default();
        if *taken < 2 {
            *taken += 1;
            chosen.push((counter, owner));
        }
        if chosen.len() == 6 {
            break;
        }
        assert!(i < 10_000, "no key landed on some master: {per_node:?}");
    }
    let owners: BTreeSet<u16> = chosen.iter().map(|(_, o)| *o).collect();
    assert_eq!(owners.len(), 3, "{chosen:?}");

    let memory = MemoryStore::new(1_000);
    let expected_remaining = [(false, 1), (false, 0), (true, 0)];
    for (round, &(over, remaining)) in expected_remaining.iter().enumerate() {
        let at = now + round as u64;
        let mut ops: Vec<CounterOp> = chosen.iter().map(|(c, _)| op(c.clone(), 2)).collect();
        let mut in_memory = ops.clone();
        store
            .apply(&mut ops, at)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        memory.apply(&mut in_memory, at).await.expect("memory");
        for (o, m) in ops.iter().zip(&in_memory) {
            let expected = Outcome {
                over,
                remaining,
                reset_ms: MINUTE - at % MINUTE,
            };
            assert_eq!(o.outcome, expected, "round {round}, {}", o.counter);
            assert_eq!(m.outcome, expected, "memory, round {round}, {}", m.counter);
        }
    }
    // Each key is on its own master, holding the three hits.
    for (counter, owner) in &chosen {
        let key = RedisStore::key(counter, window);
        assert_eq!(
            resp(*owner, &["GET", &key]),
            Resp::Bulk(b"3".to_vec()),
            "{key} on {owner}"
        );
    }
}
