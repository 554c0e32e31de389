//! Quota shares for Envoy's `rate_limit_quota` filter (RLQS): how many tokens of a limit one
//! Envoy may hold, given what every Envoy reporting the same bucket asks for.
//!
//! With RLQS, Envoy admits requests from a token bucket the server assigns it and reports
//! usage every few seconds, so a limit is enforced only as well as the tokens handed out add
//! up. Here tokens are taken, never promised: each grant comes out of the limit's current
//! window with one atomic step (a Lua script on Redis, an entry lock in memory), so the
//! grants of all clients and all replicas sum to at most the limit per period, plus what
//! Envoys admitted before they had an assignment (charged to the window as it is reported,
//! never refused: it already happened).
//!
//! Fairness comes from demand: every client's recent demand (allowed + denied per second) is
//! kept beside the windows for [`DEMAND_TTL_MS`], and a client gets at most its demand's share
//! of what is left, and at least one token while any is left. The maths is [`step`], a pure
//! function of the previous state; the Redis script `lua/quota.lua` is its twin.
//!
//! This module knows counter ids, thresholds and time, never buckets or streams: the RLQS
//! service turns reports into [`QuotaOp`]s and grants into assignments.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::bounded::BoundedMap;
use super::{Source, StoreError, Threshold};

/// How long a client's reported demand counts toward everyone's shares after its report:
/// three of Envoy's 5 s report intervals, so one late report does not drop a client, and a
/// client that went away stops holding a share soon after.
pub const DEMAND_TTL_MS: u64 = 15_000;

/// The most clients one bucket's demand table keeps. Past it a new client still gets its
/// grant, judged as if alone among the known; the table does not grow.
pub const MAX_CLIENTS: usize = 10_000;

/// One client's report on one bucket, and the store's answer.
#[derive(Debug, Clone)]
pub struct QuotaOp {
    /// The counter id of the bucket's limit (as the matcher builds it for the RLS).
    pub counter: String,
    /// Every limit on the key; a grant must fit all of them.
    pub limits: Vec<Threshold>,
    /// The reporting client, unique across replicas.
    pub client: String,
    /// The client's recent demand, in thousandths of a request per second.
    pub rate: u64,
    /// Requests the client admitted without tokens for them (before its first assignment,
    /// or past one): added to the windows, never refused.
    pub charge: u64,
    /// Tokens the client asks for.
    pub want: u64,
    /// Filled by the store: tokens taken for the client (at most `want`).
    pub granted: u64,
    /// Filled by the store: what the tightest limit has left after the grant.
    pub left: u64,
    /// Filled by the store: the clients whose demand counts, this one included.
    pub clients: u64,
}

impl QuotaOp {
    pub fn new(counter: String, limits: Vec<Threshold>, client: String) -> Self {
        Self {
            counter,
            limits,
            client,
            rate: 0,
            charge: 0,
            want: 0,
            granted: 0,
            left: 0,
            clients: 0,
        }
    }

    /// The end (ms since the epoch) of the earliest of the windows `now` falls in: when the
    /// grants of this op stop counting against a limit.
    pub fn window_end(&self, now: u64) -> u64 {
        self.limits
            .iter()
            .map(|t| {
                let period = t.period_ms().max(1);
                now - now % period + period
            })
            .min()
            .unwrap_or(now)
    }
}

/// A bucket's share of a limit: how many tokens `want` may take of `left` when the client's
/// demand is `rate` of everyone's `total`. At most `want`, at most `left`, at most the
/// client's share (`left * rate / total`), and at least 1 while something is left and
/// something is wanted, so a client with little demand is never starved.
pub fn grant(left: u64, want: u64, rate: u64, total: u64) -> u64 {
    if left == 0 || want == 0 {
        return 0;
    }
    let fair = if total == 0 || rate >= total {
        left
    } else {
        // u128: left and rate can each be near u64::MAX in a hostile report.
        (u128::from(left) * u128::from(rate) / u128::from(total)) as u64
    };
    want.min(fair).max(1).min(left)
}

/// One window of one limit: its period, its start and what was taken of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    period: u64,
    start: u64,
    used: u64,
}

/// One client's demand and when it stops counting.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Demand {
    client: String,
    rate: u64,
    expires: u64,
}

/// What one bucket's limit keeps: its windows and its clients' demand.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuotaState {
    windows: Vec<Window>,
    demand: Vec<Demand>,
}

impl QuotaState {
    /// When the state no longer matters: every window over and every demand expired.
    fn expires_at(&self) -> u64 {
        let windows = self
            .windows
            .iter()
            .map(|w| w.start.saturating_add(w.period));
        let demand = self.demand.iter().map(|d| d.expires);
        windows.chain(demand).max().unwrap_or(0)
    }
}

/// Applies `op` at `now` to the bucket's `prev` state: records the client's demand, charges
/// `op.charge` to every window and takes the [`grant`] from them. Fills `granted`, `left` and
/// `clients` and returns the next state.
pub fn step(prev: Option<&QuotaState>, op: &mut QuotaOp, now: u64) -> QuotaState {
    let mut demand: Vec<Demand> = prev
        .map(|p| {
            p.demand
                .iter()
                .filter(|d| d.expires > now && d.client != op.client)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    if demand.len() < MAX_CLIENTS {
        demand.push(Demand {
            client: op.client.clone(),
            rate: op.rate,
            expires: now.saturating_add(DEMAND_TTL_MS),
        });
    }
    let others: u64 = demand
        .iter()
        .filter(|d| d.client != op.client)
        .map(|d| d.rate)
        .fold(0, u64::saturating_add);
    let total = others.saturating_add(op.rate);

    let mut windows: Vec<Window> = op
        .limits
        .iter()
        .map(|t| {
            let period = t.period_ms().max(1);
            let start = now - now % period;
            let used = prev
                .and_then(|p| {
                    p.windows
                        .iter()
                        .find(|w| w.period == period && w.start == start)
                })
                .map_or(0, |w| w.used);
            Window {
                period,
                start,
                used: used.saturating_add(op.charge),
            }
        })
        .collect();
    let left = op
        .limits
        .iter()
        .zip(&windows)
        .map(|(t, w)| t.limit.saturating_sub(w.used))
        .min()
        .unwrap_or(0);
    let granted = grant(left, op.want, op.rate, total);
    for w in &mut windows {
        w.used = w.used.saturating_add(granted);
    }
    op.granted = granted;
    op.left = left - granted;
    op.clients = demand.len() as u64;
    QuotaState { windows, demand }
}

pub type QuotaFuture<'a> = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'a>>;

/// Where quota shares live: in memory for one replica, in Redis for a fleet.
pub trait QuotaStore: Send + Sync + 'static {
    /// Applies `op` at `now` (ms since the epoch), atomically, and fills its answer.
    fn share<'a>(&'a self, op: &'a mut QuotaOp, now: u64) -> QuotaFuture<'a>;
}

/// Shares in process memory: exact for one replica, and what each replica falls back to
/// when the shared store is down.
#[derive(Debug)]
pub struct MemoryQuota {
    buckets: BoundedMap<(QuotaState, u64)>,
}

impl MemoryQuota {
    pub fn new(max_entries: usize) -> Self {
        Self {
            buckets: BoundedMap::new(max_entries),
        }
    }

    pub fn share_now(&self, op: &mut QuotaOp, now: u64) {
        // The key is lent out while the op is changed, then put back.
        let counter = std::mem::take(&mut op.counter);
        self.buckets.update(&counter, |prev| {
            let next = step(prev.map(|(s, _)| s), op, now);
            let expires = next.expires_at();
            ((), (next, expires))
        });
        op.counter = counter;
    }

    /// Drops buckets whose windows and demand are all over.
    pub fn sweep(&self, now: u64) {
        self.buckets.retain(|(_, expires)| *expires > now);
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

impl QuotaStore for MemoryQuota {
    fn share<'a>(&'a self, op: &'a mut QuotaOp, now: u64) -> QuotaFuture<'a> {
        self.share_now(op, now);
        Box::pin(std::future::ready(Ok(())))
    }
}

/// The shares as the RLQS service uses them: the shared store when there is one, and this
/// replica's own [`MemoryQuota`] when it fails, so a stream is always answered.
pub struct QuotaBackend {
    remote: Option<Arc<dyn QuotaStore>>,
    local: MemoryQuota,
    timeout: Duration,
    fallbacks: AtomicU64,
}

/// How long a share may take in the shared store before the local one answers: reports are
/// off the request path, so this is generous next to the RLS's budget.
pub const QUOTA_TIMEOUT: Duration = Duration::from_millis(500);

impl QuotaBackend {
    pub fn new(remote: Option<Arc<dyn QuotaStore>>, max_entries: usize) -> Self {
        Self {
            remote,
            local: MemoryQuota::new(max_entries),
            timeout: QUOTA_TIMEOUT,
            fallbacks: AtomicU64::new(0),
        }
    }

    /// Takes the share of `op` at `now`, from the shared store or, when it fails, from what
    /// this replica knows alone. Returns where the answer came from; never fails.
    pub async fn share(&self, op: &mut QuotaOp, now: u64) -> Source {
        if let Some(remote) = &self.remote {
            match tokio::time::timeout(self.timeout, remote.share(op, now)).await {
                Ok(Ok(())) => return Source::Redis,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "quota share from the local store")
                }
                Err(_) => tracing::debug!("quota share timed out: from the local store"),
            }
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
            self.local.share_now(op, now);
            return Source::Fallback;
        }
        self.local.share_now(op, now);
        Source::Memory
    }

    /// Shares answered locally because the shared store failed.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    pub fn sweep(&self, now: u64) {
        self.local.sweep(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Unit;

    fn per_minute(limit: u64) -> Threshold {
        Threshold::new(limit, Unit::Minute)
    }

    fn op(client: &str, rate: u64, charge: u64, want: u64) -> QuotaOp {
        QuotaOp {
            rate,
            charge,
            want,
            ..QuotaOp::new("c".into(), vec![per_minute(10)], client.into())
        }
    }

    #[test]
    fn a_grant_is_the_demand_share_of_what_is_left_and_at_least_one() {
        assert_eq!(grant(100, 1000, 1, 4), 25);
        assert_eq!(grant(100, 10, 1, 4), 10);
        assert_eq!(grant(100, 1000, 0, 4), 1);
        assert_eq!(grant(1, 1000, 1, 1000), 1);
        assert_eq!(grant(0, 1000, 1, 1), 0);
        assert_eq!(grant(100, 0, 1, 1), 0);
        assert_eq!(
            grant(u64::MAX, u64::MAX, u64::MAX - 1, u64::MAX),
            u64::MAX - 1
        );
    }

    #[test]
    fn a_lone_client_takes_what_is_left_after_its_unassigned_requests() {
        let mut first = op("a", 1000, 1, 100);
        let state = step(None, &mut first, 60_000);
        assert_eq!((first.granted, first.left, first.clients), (9, 0, 1));
        let mut again = op("a", 1000, 0, 5);
        step(Some(&state), &mut again, 61_000);
        assert_eq!(again.granted, 0, "nothing left in this window");
    }

    #[test]
    fn grants_never_sum_past_the_limit_and_follow_demand() {
        let mut state: Option<QuotaState> = None;
        let mut total = 0;
        // Three clients, demand 1:1:2, each asking for more than the limit, round after round.
        for round in 0..5u64 {
            for (client, rate) in [("a", 1000), ("b", 1000), ("c", 2000)] {
                let mut o = op(client, rate, 0, 100);
                o.limits = vec![per_minute(100)];
                state = Some(step(state.as_ref(), &mut o, 120_000 + round * 1000));
                total += o.granted;
            }
        }
        assert_eq!(total, 100);
        // The first round with all three known: c's share is twice b's.
        let mut state = None;
        let mut grants = Vec::new();
        for (client, rate) in [("a", 1000), ("b", 1000), ("c", 2000)] {
            let mut o = op(client, rate, 0, 0);
            o.limits = vec![per_minute(100)];
            state = Some(step(state.as_ref(), &mut o, 0));
        }
        for (client, rate) in [("b", 1000), ("c", 2000)] {
            let mut o = op(client, rate, 0, 100);
            o.limits = vec![per_minute(100)];
            state = Some(step(state.as_ref(), &mut o, 1));
            grants.push(o.granted);
        }
        assert_eq!(grants, vec![25, 37]);
    }

    #[test]
    fn a_new_window_starts_empty_and_demand_expires() {
        let per_second = |client: &str| QuotaOp {
            limits: vec![Threshold::new(10, Unit::Second)],
            ..op(client, 1000, 0, 100)
        };
        let mut a = per_second("a");
        let state = step(None, &mut a, 0);
        assert_eq!(a.granted, 10);
        let mut b = per_second("b");
        let state = step(Some(&state), &mut b, 1000);
        assert_eq!(
            (b.granted, b.clients),
            (5, 2),
            "a new second; a's demand still counts"
        );
        let mut b = per_second("b");
        step(Some(&state), &mut b, 2000 + DEMAND_TTL_MS);
        assert_eq!((b.granted, b.clients), (10, 1), "a's demand expired");
    }

    #[test]
    fn a_grant_fits_every_limit_on_the_key() {
        let mut o = op("a", 1000, 0, 100);
        o.limits = vec![per_minute(10), Threshold::new(3, Unit::Second)];
        let state = step(None, &mut o, 0);
        assert_eq!((o.granted, o.left), (3, 0));
        assert_eq!(o.window_end(0), 1000);
        let mut o2 = op("a", 1000, 0, 100);
        o2.limits = vec![per_minute(10), Threshold::new(3, Unit::Second)];
        step(Some(&state), &mut o2, 1000);
        assert_eq!(o2.granted, 3, "a new second; the minute has 7 left");
    }

    #[test]
    fn the_local_store_answers_when_there_is_no_remote() {
        let backend = QuotaBackend::new(None, 100);
        let mut o = op("a", 1000, 0, 4);
        let source = futures_lite(backend.share(&mut o, 0));
        assert_eq!((source, o.granted), (Source::Memory, 4));
    }

    fn futures_lite<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map(|rt| rt.block_on(f))
            .unwrap_or_else(|e| panic!("runtime: {e}"))
    }
}
