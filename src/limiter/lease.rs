//! Leases: a hot counter counted in blocks, so it costs a store call per block, not per hit.
//!
//! One counter lives on one Redis shard, so exact counting of a single hot key can never go
//! faster than one Redis node runs its script, however many replicas or shards there are.
//! A route with `lease` trades a little under-admission for that ceiling: a replica takes a
//! block of hits from the store with one atomic call (the store's lease variant of the
//! algorithm, see [`super::algorithm::fixed_window_lease`]) and admits from it in memory until
//! it is used up or its window ends, then takes another.
//!
//! Why this stays exact about the limit: the store grants a block only out of what the
//! counter has left, so the hits granted to every replica together never pass the limit.
//! What it costs: hits a replica leased and did not use by the window's end are lost, at most
//! one block per replica per window. Blocks are kept small where it matters: `auto` sizes them
//! from this replica's recent demand of the counter ([`AUTO_HORIZON_MS`] of it), and the store
//! caps every block at an eighth of what is left, so the last hits of a window go one by one.
//!
//! Concurrency: requests of one counter that find its block empty while a lease call is out
//! wait for that call instead of each making its own (one call refills for all of them), and
//! go to the store themselves only if the new block does not cover them. The wait is a
//! [`Notify`], never a lock held across an `.await`; a lease call that is dropped mid-way
//! (its request timed out) releases its waiters when dropped.
//!
//! The layer sits right above the remote store, under the fallback: a store error reaches the
//! fallback unchanged, and an open breaker never gets here, so both work as without leases.
//! Over-limit answers come from the store, so the over-limit cache above keeps them as usual.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

use super::backend::Remote;
use super::bounded::BoundedMap;
use super::{Algorithm, CounterOp, HitMode, Lease, Outcome, Source, Store, StoreFuture};

/// `auto` blocks hold about this many milliseconds of the replica's recent demand: long
/// enough that a hot counter makes a store call every few dozen hits, short enough that a
/// replica strands little when the counter runs dry.
pub const AUTO_HORIZON_MS: f64 = 50.0;

/// The largest `auto` block, whatever the rate.
pub const AUTO_MAX_BLOCK: u64 = 10_000;

/// How long a token-bucket block stays usable: tokens leased and kept longer are tokens other
/// replicas could not use, so they are given up after a second (or the bucket's period, if
/// shorter).
pub const BUCKET_BLOCK_TTL_MS: u64 = 1_000;

/// Wakers for requests waiting on a lease call, by a hash of the counter: few enough to keep
/// in one array, enough that unrelated counters rarely wake each other.
const WAKERS: usize = 64;

/// What this replica holds of one counter.
#[derive(Debug, Clone, Copy, Default)]
struct Block {
    /// Hits leased and not yet admitted.
    left: u64,
    /// When the block stops being usable (ms since the epoch): the window's end.
    until: u64,
    /// What the store had left after granting the block, for the answers given from it.
    remaining: u64,
    /// When the counter resets, as the store said at the grant (ms since the epoch).
    reset_at: u64,
    /// Hits asked of this counter here since `since`, and their smoothed rate (hits per ms):
    /// what `auto` sizes the next block from.
    demand: u64,
    since: u64,
    rate: f64,
    /// A lease call for this counter is out and presumed alive until then (ms since the
    /// epoch); others wait for it rather than call too.
    refill_until: u64,
}

impl Block {
    /// The counter's block as it stands at `now`: a new one for a counter seen for the first
    /// time, and nothing left in one whose window has ended.
    fn at(held: Option<&Block>, now: u64) -> Block {
        let mut b = held.copied().unwrap_or(Block {
            since: now,
            ..Block::default()
        });
        if b.until <= now {
            b.left = 0;
        }
        b
    }
}

/// What one op does next.
enum Step {
    /// Admitted from the block.
    Local(Outcome),
    /// Ask the store for a block of this size.
    Refill(u64),
    /// Another request's lease call for this counter is out: wait for it.
    Wait,
}

/// Counts for the metrics, published at scrape time.
#[derive(Debug, Default)]
pub struct LeaseStats {
    /// Blocks taken from the store.
    pub leases: AtomicU64,
    /// Hits those blocks took.
    pub leased_hits: AtomicU64,
    /// Hits admitted from a block without a store call.
    pub admitted: AtomicU64,
}

pub struct Leasing {
    inner: Arc<dyn Remote>,
    blocks: BoundedMap<Block>,
    wakers: Vec<Notify>,
    stats: LeaseStats,
}

impl Leasing {
    /// Leases over `inner`; at most `max_entries` counters are held (past that, counters are
    /// counted exactly, one store call per hit, which is always correct).
    pub fn new(inner: Arc<dyn Remote>, max_entries: usize) -> Self {
        Self {
            inner,
            blocks: BoundedMap::new(max_entries),
            wakers: (0..WAKERS).map(|_| Notify::new()).collect(),
            stats: LeaseStats::default(),
        }
    }

    pub fn stats(&self) -> &LeaseStats {
        &self.stats
    }

    /// Counters held.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Forgets counters whose block and rate no longer matter at `now`.
    pub fn sweep(&self, now: u64) {
        // A counter idle for a second has no useful rate left either.
        self.blocks
            .retain(|b| b.until > now || b.since.saturating_add(1_000) > now);
    }

    fn waker(&self, counter: &str) -> &Notify {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(counter);
        &self.wakers[(hash as usize) % WAKERS]
    }

    /// Decides one op from its counter's block, under that entry's lock. `first` counts its
    /// hits as demand (a retry after a wait does not count them again).
    fn step(&self, op: &CounterOp, now: u64, first: bool, may_wait: bool) -> Step {
        let timeout_ms = (op.policy.timeout.as_millis() as u64).max(1);
        let found = self.blocks.update(&op.counter, |held| {
            let mut b = Block::at(held, now);
            if first {
                b.demand = b.demand.saturating_add(op.hits);
            }
            if b.left >= op.hits {
                b.left -= op.hits;
                let outcome = Outcome {
                    over: false,
                    remaining: b.remaining.saturating_add(b.left),
                    reset_ms: b.reset_at.saturating_sub(now),
                };
                return (Step::Local(outcome), b);
            }
            if may_wait && b.refill_until > now {
                return (Step::Wait, b);
            }
            b.refill_until = now + timeout_ms;
            let size = block_size(&mut b, op.policy.lease, now);
            (Step::Refill(size), b)
        });
        if let Step::Local(_) = found {
            self.stats.admitted.fetch_add(op.hits, Ordering::Relaxed);
        }
        found
    }

    /// Keeps what the store granted for `op` (a lease answer) and wakes its waiters.
    fn granted(&self, op: &mut CounterOp, now: u64) {
        let answer = op.outcome;
        let keep = op.granted.saturating_sub(op.hits);
        let until = match op.algorithm {
            Algorithm::TokenBucket => now + BUCKET_BLOCK_TTL_MS.min(op.threshold.period_ms()),
            _ => now + answer.reset_ms,
        };
        let left = self.blocks.update(&op.counter, |held| {
            let mut b = Block::at(held, now);
            b.refill_until = 0;
            if !answer.over {
                b.left = b.left.saturating_add(keep);
                b.until = until;
                b.remaining = answer.remaining;
                b.reset_at = now + answer.reset_ms;
            }
            (b.left, b)
        });
        if !answer.over {
            self.stats.leases.fetch_add(1, Ordering::Relaxed);
            self.stats
                .leased_hits
                .fetch_add(op.granted, Ordering::Relaxed);
            // Answered like any hit: what is left counts the block still held here.
            op.outcome.remaining = answer.remaining.saturating_add(left);
        }
        op.block = 0;
        self.waker(&op.counter).notify_waiters();
    }

    /// The lease calls of a batch that are out: dropped before they came back (the request
    /// timed out), it releases their counters for the requests waiting on them.
    fn release(&self, counters: &[String]) {
        for counter in counters {
            self.blocks.update(counter, |held| {
                let mut b = held.copied().unwrap_or_default();
                b.refill_until = 0;
                ((), b)
            });
            self.waker(counter).notify_waiters();
        }
    }
}

/// Whether `op` may be served from a lease: a take of some hits on a leased route, counted
/// by an algorithm that can be leased.
fn leasable(op: &CounterOp) -> bool {
    op.policy.lease.is_on()
        && op.mode == HitMode::Take
        && op.hits > 0
        && matches!(
            op.algorithm,
            Algorithm::FixedWindow | Algorithm::TokenBucket
        )
}

/// The block to ask for: `lease: <N>` asks for N; `auto` for [`AUTO_HORIZON_MS`] of the
/// counter's recent demand here (the rate smoothed over the gaps between lease calls).
fn block_size(b: &mut Block, lease: Lease, now: u64) -> u64 {
    let elapsed = now.saturating_sub(b.since);
    if elapsed > 0 {
        let rate = b.demand as f64 / elapsed as f64;
        b.rate = if b.rate == 0.0 {
            rate
        } else {
            (b.rate + rate) / 2.0
        };
        b.demand = 0;
        b.since = now;
    }
    match lease {
        Lease::Block(n) => n,
        Lease::Off => 1,
        // Demand seen within this very millisecond counts too, so a burst is covered at once.
        Lease::Auto => ((b.rate * AUTO_HORIZON_MS).ceil() as u64)
            .max(b.demand)
            .clamp(1, AUTO_MAX_BLOCK),
    }
}

/// Drops with the lease calls of a batch; releases them unless they were answered.
struct Outstanding<'a> {
    leasing: &'a Leasing,
    counters: Vec<String>,
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        if !self.counters.is_empty() {
            self.leasing.release(&self.counters);
        }
    }
}

impl Store for Leasing {
    fn apply<'a>(&'a self, ops: &'a mut [CounterOp], now: u64) -> StoreFuture<'a> {
        Box::pin(async move {
            if !ops.iter().any(leasable) {
                return self.inner.apply(ops, now).await;
            }
            // Ops answered from a block are done; the rest go to the store together.
            let mut send: Vec<usize> = Vec::new();
            let mut outstanding = Outstanding {
                leasing: self,
                counters: Vec::new(),
            };
            for (i, op) in ops.iter_mut().enumerate() {
                if !leasable(op) {
                    send.push(i);
                    continue;
                }
                // Registered before looking, so a lease call answered in between still
                // wakes this request.
                let waker = self.waker(&op.counter);
                let woken = waker.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                let mut step = self.step(op, now, true, true);
                if let Step::Wait = step {
                    woken.await;
                    step = self.step(op, now, false, false);
                }
                match step {
                    Step::Local(outcome) => {
                        op.outcome = outcome;
                        op.granted = op.hits;
                        op.source = Source::Lease;
                    }
                    Step::Refill(size) => {
                        op.block = size;
                        outstanding.counters.push(op.counter.clone());
                        send.push(i);
                    }
                    // A step that may not wait never says so; counted exactly if it did.
                    Step::Wait => send.push(i),
                }
            }
            if send.is_empty() {
                return Ok(());
            }
            if send.len() == ops.len() {
                if let Err(e) = self.inner.apply(ops, now).await {
                    // The fallback above answers these ops as plain hits.
                    ops.iter_mut().for_each(|op| op.block = 0);
                    return Err(e);
                }
                for op in ops.iter_mut().filter(|op| op.block > 0) {
                    self.granted(op, now);
                }
            } else {
                let mut rest: Vec<CounterOp> = send.iter().map(|&i| ops[i].clone()).collect();
                self.inner.apply(&mut rest, now).await?;
                for op in rest.iter_mut().filter(|op| op.block > 0) {
                    self.granted(op, now);
                }
                for (i, done) in send.into_iter().zip(rest) {
                    ops[i] = done;
                }
            }
            // Answered: `granted` released them.
            outstanding.counters.clear();
            Ok(())
        })
    }
}

impl Remote for Leasing {
    fn source(&self) -> Source {
        self.inner.source()
    }

    fn ready(&self) -> Result<(), String> {
        self.inner.ready()
    }

    fn probe(&self, shard: usize) -> StoreFuture<'_> {
        self.inner.probe(shard)
    }

    fn shard(&self, counter: &str) -> usize {
        self.inner.shard(counter)
    }

    fn sharded(&self) -> bool {
        self.inner.sharded()
    }

    fn shard_name(&self, shard: usize) -> String {
        self.inner.shard_name(shard)
    }

    fn answering(&self, within: std::time::Duration) -> bool {
        self.inner.answering(within)
    }

    fn on_orphans(&self, handler: super::redis::batch::Orphans) {
        self.inner.on_orphans(handler);
    }
}
