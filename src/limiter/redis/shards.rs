//! Which Redis Cluster master holds a counter, as a small number: what gives every shard a
//! breaker of its own, so a failing shard sends only its own counters to the fallback.
//!
//! Each master also gets a client of its own (a plain connection to that node), which the
//! batches of its slots are sent on. Why beside fred's cluster client: that client serves every
//! node through one router, and while one node is unreachable it stalls the calls to all of
//! them until it has reconnected (measured: a `kill -9` of one of three masters timed out the
//! calls of the two live ones for seconds). With a client per master, a dead node's calls
//! fail at once and only its counters go to the fallback. fred's cluster client still tells
//! the topology, and takes what the node clients cannot (a MOVED slot, a node not met yet).
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

/// Makes (and starts connecting) a client to one master, `host` and `port`.
pub type Connect = Box<dyn Fn(&str, u16) -> Option<Client> + Send + Sync>;

pub struct Shards {
    table: ArcSwap<Vec<u8>>,
    /// The masters seen, by index (`host:port`); a master keeps its index for good.
    names: Mutex<Vec<String>>,
    /// Each master's own client, by the same index.
    clients: ArcSwap<Vec<Option<Client>>>,
    connect: Connect,
}

impl Shards {
    pub fn new(connect: Connect) -> Self {
        Self {
            table: ArcSwap::from_pointee(vec![0; SLOTS]),
            names: Mutex::new(Vec::new()),
            clients: ArcSwap::from_pointee(Vec::new()),
            connect,
        }
    }

    /// The own client of the master that holds `slot`, once it is known.
    pub fn client_for(&self, slot: u16) -> Option<Client> {
        let shard = usize::from(self.table.load().get(usize::from(slot)).copied()?);
        self.clients.load().get(shard).cloned().flatten()
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

    /// Rebuilds the table from fred's view of the cluster; whether fred had one yet.
    fn refresh(&self, client: &Client) -> bool {
        let Some(routing) = client.cached_cluster_state() else {
            return false;
        };
        let Ok(mut names) = self.names.lock() else {
            return false;
        };
        let mut table = vec![0u8; SLOTS];
        let mut clients = (**self.clients.load()).clone();
        for range in routing.slots() {
            let name = format!("{}:{}", range.primary.host, range.primary.port);
            let index = match names.iter().position(|n| *n == name) {
                Some(i) => i,
                None => {
                    names.push(name);
                    clients.push((self.connect)(&range.primary.host, range.primary.port));
                    names.len() - 1
                }
            };
            let index = (index % MAX_SHARDS) as u8;
            let (start, end) = (
                usize::from(range.start),
                usize::from(range.end).min(SLOTS - 1),
            );
            if start <= end {
                table[start..=end].fill(index);
            }
        }
        drop(names);
        self.clients.store(Arc::new(clients));
        self.table.store(Arc::new(table));
        true
    }

    /// Waits (at most `within`) until fred knows the cluster and every master's own client is
    /// connected: at start, so the first calls do not fail for a connection still being made.
    pub async fn wait_ready(&self, client: &Client, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while !self.refresh(client) {
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(REFRESH / 10).await;
        }
        for node in self.clients.load().iter().flatten() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let _ = tokio::time::timeout(left, node.wait_for_connect()).await;
        }
    }

    /// Follows the cluster until the store is gone (nothing else holds the shards).
    pub fn follow(shards: Arc<Shards>, pool: Pool) {
        tokio::spawn(async move {
            loop {
                // Until fred knows the cluster (it connects in the background), ask often:
                // the masters' own clients are made from it.
                let known = shards.refresh(pool.next());
                tokio::time::sleep(if known { REFRESH } else { REFRESH / 10 }).await;
                if Arc::strong_count(&shards) == 1 {
                    for client in shards.clients.load().iter().flatten() {
                        let _ = client.quit().await;
                    }
                    return;
                }
            }
        });
    }
}
