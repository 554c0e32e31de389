//! Which Redis Cluster master holds a counter, as a small number: what gives every shard a
//! breaker of its own, so a failing shard sends only its own counters to the fallback.
//!
//! A table of the 16,384 hash slots, each the index of its master in a list of the masters
//! seen so far, rebuilt from fred's view of the cluster every [`REFRESH`] (and when fred's view
//! is not there yet, every answer stays shard 0). Reading it is a slot hash and an array
//! index: no lock, no allocation on the request path. On a single node or Sentinel every
//! counter is shard 0.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use fred::interfaces::ClusterInterface;
use fred::prelude::*;

/// How often the slot table follows the cluster (a failover moves slots to a new master).
const REFRESH: Duration = Duration::from_millis(500);
/// The most shards told apart; beyond it masters share breakers (a cluster of more than 64
/// masters still works, with coarser breakers).
pub const MAX_SHARDS: usize = 64;
const SLOTS: usize = 16_384;

pub struct Shards {
    table: ArcSwap<Vec<u8>>,
    /// The masters seen, by index (`host:port`); a master keeps its index for good.
    names: Mutex<Vec<String>>,
}

impl Default for Shards {
    fn default() -> Self {
        Self {
            table: ArcSwap::from_pointee(vec![0; SLOTS]),
            names: Mutex::new(Vec::new()),
        }
    }
}

impl Shards {
    /// The shard of a counter: its hash slot's master (counter ids hold no braces, so the slot
    /// of the id is the slot of every key `sluice:{<id>}:...`).
    pub fn of(&self, counter: &str) -> usize {
        let slot = usize::from(fred::util::redis_keyslot(counter.as_bytes()));
        usize::from(self.table.load().get(slot).copied().unwrap_or(0))
    }

    /// The master's address, for the log and `/readyz`.
    pub fn name(&self, shard: usize) -> String {
        self.names
            .lock()
            .ok()
            .and_then(|names| names.get(shard).cloned())
            .unwrap_or_else(|| format!("shard {shard}"))
    }

    /// Rebuilds the table from fred's view of the cluster.
    fn refresh(&self, client: &Client) {
        let Some(routing) = client.cached_cluster_state() else {
            return;
        };
        let Ok(mut names) = self.names.lock() else {
            return;
        };
        let mut table = vec![0u8; SLOTS];
        for range in routing.slots() {
            let name = format!("{}:{}", range.primary.host, range.primary.port);
            let index = match names.iter().position(|n| *n == name) {
                Some(i) => i,
                None => {
                    names.push(name);
                    names.len() - 1
                }
            };
            let index = (index % MAX_SHARDS) as u8;
            for slot in usize::from(range.start)..=usize::from(range.end).min(SLOTS - 1) {
                table[slot] = index;
            }
        }
        drop(names);
        self.table.store(Arc::new(table));
    }

    /// Follows the cluster until the pool is gone.
    pub fn follow(shards: Arc<Shards>, pool: Pool) {
        tokio::spawn(async move {
            loop {
                shards.refresh(&pool.next());
                tokio::time::sleep(REFRESH).await;
                if Arc::strong_count(&shards) == 1 {
                    return;
                }
            }
        });
    }
}
