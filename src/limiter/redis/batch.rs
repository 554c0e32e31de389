//! Coalescing: every counter call queued by concurrent requests since the last send goes to
//! Redis as one command, so the cost of a socket write and read (and the context switches
//! around them) is shared by every request in the batch instead of paid by each.
//!
//! Why not fred's own pipelining: fred flushes the socket after every `EVALSHA` and every
//! custom command, whatever is queued behind it, so a pipeline of N script calls is N writes,
//! and concurrent requests never share one. Instead, one script (`batch.lua`, built from the
//! three algorithm scripts as functions) takes any number of calls and runs them in order:
//! one `EVALSHA`, one write, one reply carrying one outcome per call. Each call is still its
//! algorithm's exact script, and the whole batch is atomic, so exactness is unchanged.
//!
//! The dispatcher adds no wait when Redis is idle: it sends as soon as a job arrives. It
//! keeps at most `in_flight` batches outstanding (one per pooled connection); while they are
//! out, new jobs queue, and the next send takes everything queued at once. On a cluster a
//! script may only touch one slot, so a batch is split by slot (a hot key is one slot, and
//! coalesces fully).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use fred::prelude::*;
use fred::types::config::Options;
use fred::types::{ClusterHash, CustomCommand, Value};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::warn;

use super::{describe, is_noscript, is_readonly};
use crate::limiter::{Algorithm, CounterOp, HitMode, keys};

/// How long a batch waits for Redis's reply (whatever `redis.command_timeout` says, which
/// bounds the other commands): long past any request's budget.
const REPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The most calls one `EVALSHA` carries: a batch runs inside Redis without interruption,
/// so it is kept to about a millisecond of script time.
const MAX_CALLS: usize = 256;

/// The batch script: the four algorithm scripts as local functions, and a loop over the
/// calls. `ARGV[1]` is the number of calls; each call then has its algorithm (1 fixed window,
/// 2 sliding window, 3 token bucket, 4 concurrent), its number of keys and its seven arguments (limit,
/// period ms, now ms, hits, 0 to take / 1 to give back / 2 to charge, burst, lease block or 0); `KEYS` holds every
/// call's keys in order.
pub fn script() -> String {
    let function =
        |name: &str, body: &str| format!("local function {name}(KEYS, ARGV)\n{body}\nend\n");
    let mut lua = String::new();
    lua.push_str(&function(
        "fixed_window",
        include_str!("../lua/fixed_window.lua"),
    ));
    lua.push_str(&function(
        "sliding_window",
        include_str!("../lua/sliding_window.lua"),
    ));
    lua.push_str(&function(
        "token_bucket",
        include_str!("../lua/token_bucket.lua"),
    ));
    lua.push_str(&function(
        "concurrent",
        include_str!("../lua/concurrent.lua"),
    ));
    lua.push_str(include_str!("../lua/batch.lua"));
    lua
}

/// One counter call, as the batch script takes it.
#[derive(Clone)]
pub struct Call {
    first: String,
    second: Option<String>,
    algorithm: u8,
    args: [u64; 7],
}

impl Call {
    pub fn of(op: &CounterOp, now: u64) -> Self {
        let period = op.threshold.period_ms();
        let (first, second) = keys::for_call(&op.counter, op.algorithm, period, now);
        Self {
            first,
            second,
            algorithm: match op.algorithm {
                Algorithm::FixedWindow => 1,
                Algorithm::SlidingWindow => 2,
                Algorithm::TokenBucket => 3,
                Algorithm::Concurrent => 4,
            },
            args: [
                op.threshold.limit,
                period,
                now,
                op.hits,
                match op.mode {
                    HitMode::Take => 0,
                    HitMode::Give => 1,
                    HitMode::Charge => 2,
                },
                op.threshold.burst.unwrap_or(op.threshold.limit),
                op.block,
            ],
        }
    }

    /// The cluster slot of the call: every key of a counter shares its hash tag.
    pub fn slot(&self) -> u16 {
        fred::util::redis_keyslot(self.first.as_bytes())
    }
}

/// What one request waits for: one reply (or error) per call, in order.
pub type Replies = Vec<Result<Value, Error>>;

/// One request's calls and where its answer goes.
pub struct Job {
    pub calls: Vec<Call>,
    /// The calls come back with their replies, so a reply nobody reads can still be told
    /// to the orphan handler (see [`Answer`]).
    pub reply: oneshot::Sender<(Vec<Call>, Replies)>,
}

/// A request's wait for its job's replies. Dropped before it read them (the request's
/// deadline passed), it tells what Redis counted to the orphan handler, whether the replies
/// are already there or come later (then the dispatcher finds nobody waiting and does it).
pub struct Answer<'a> {
    pub rx: Option<oneshot::Receiver<(Vec<Call>, Replies)>>,
    pub shared: &'a Shared,
}

impl Answer<'_> {
    /// The replies, once they are there.
    pub async fn replies(&mut self) -> Option<Replies> {
        let rx = self.rx.as_mut()?;
        let answered = rx.await.ok().map(|(_, replies)| replies);
        self.rx = None;
        answered
    }
}

impl Drop for Answer<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if let Ok((calls, replies)) = rx.try_recv() {
                orphaned(self.shared, &calls, replies);
            }
        }
    }
}

/// What the dispatcher and its batches share.
pub struct Shared {
    pub pool: Pool,
    pub sha: String,
    pub script: String,
    /// A cluster takes one batch per slot; a single node or Sentinel master takes any keys.
    pub clustered: bool,
    pub target: String,
    pub progress: Progress,
    /// The last error a connection reported (secrets removed), so "no connection is up"
    /// can say why: a refused password, a full Redis... Cleared when a connection is made.
    pub last_error: std::sync::Mutex<Option<String>>,
    /// On a cluster, each master's own client (see [`super::shards`]).
    pub shards: std::sync::OnceLock<Arc<super::shards::Shards>>,
    /// Told what Redis counted for calls whose requests had given up (see [`orphaned`]).
    pub orphans: std::sync::OnceLock<Orphans>,
    /// The gate of every write: closed while the pool moves to a new master (see [`super::sentinel`]).
    pub follower: super::sentinel::Follower,
}

/// `(counter id, window start or 0 for a token bucket, hits counted)`.
pub type Orphans = Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

impl Shared {
    /// `" (last error: ...)"`, or nothing when no connection error was seen.
    pub fn last_error_note(&self) -> String {
        match self.last_error.lock().ok().and_then(|e| e.clone()) {
            Some(e) => format!(" (last error: {e})"),
            None => String::new(),
        }
    }
}

/// Whether Redis keeps answering: what tells a timeout caused by sluice's own queue (Redis
/// answers, the request waited behind others) from one caused by Redis (nothing came back).
#[derive(Debug)]
pub struct Progress {
    epoch: std::time::Instant,
    /// Batches sent and not answered.
    out: AtomicUsize,
    /// When Redis last answered a batch, or when a batch left while none was out (ms since
    /// `epoch`).
    last: AtomicU64,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            epoch: std::time::Instant::now(),
            out: AtomicUsize::new(0),
            last: AtomicU64::new(0),
        }
    }
}

impl Progress {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn sent(&self) {
        if self.out.fetch_add(1, Ordering::AcqRel) == 0 {
            self.last.store(self.now(), Ordering::Release);
        }
    }

    fn answered(&self) {
        self.last.store(self.now(), Ordering::Release);
        self.out.fetch_sub(1, Ordering::AcqRel);
    }

    /// Nothing is out, or Redis answered something within `within`.
    pub fn answering(&self, within: std::time::Duration) -> bool {
        self.out.load(Ordering::Acquire) == 0
            || self.now().saturating_sub(self.last.load(Ordering::Acquire))
                <= within.as_millis() as u64
    }
}

/// Starts the dispatcher; it ends when every sender is dropped (the store is gone).
pub fn spawn(shared: Arc<Shared>, in_flight: usize) -> mpsc::UnboundedSender<Job> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(dispatch(shared, rx, in_flight.max(1)));
    tx
}

async fn dispatch(shared: Arc<Shared>, mut jobs: mpsc::UnboundedReceiver<Job>, in_flight: usize) {
    let permits = Arc::new(Semaphore::new(in_flight));
    loop {
        // Waiting for a free slot first lets jobs pile up while every batch is out; they all
        // leave together when one comes back.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = jobs.recv().await else {
            return;
        };
        // A job whose request gave up (its deadline passed and the fallback answered it,
        // owing the hits to the store) is not sent: sent, it would be counted twice.
        let mut calls = 0;
        let mut batch = Vec::new();
        if !first.reply.is_closed() {
            calls = first.calls.len();
            batch.push(first);
        }
        while calls < MAX_CALLS {
            match jobs.try_recv() {
                Ok(job) if job.reply.is_closed() => {}
                Ok(job) => {
                    calls += job.calls.len();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            run(&shared, batch).await;
            drop(permit);
        });
    }
}

/// Sends a batch (one command per slot on a cluster, else one) and answers every job.
async fn run(shared: &Arc<Shared>, batch: Vec<Job>) {
    // The jobs' calls in one list, each job remembering how many are its own.
    let mut calls = Vec::new();
    let mut waiting = Vec::with_capacity(batch.len());
    for job in batch {
        waiting.push((job.reply, job.calls.len()));
        calls.extend(job.calls);
    }
    let results = if shared.clustered {
        send_by_slot(shared, &calls).await
    } else {
        send(shared, 0, &calls).await
    };
    let mut results = results.into_iter();
    let mut calls = calls.into_iter();
    for (reply, count) in waiting {
        let own = (
            calls.by_ref().take(count).collect(),
            results.by_ref().take(count).collect(),
        );
        // The request may have given up (its deadline passed and the fallback answered it):
        // Redis counted its hits anyway, which the fallback must not owe as well.
        if let Err((calls, replies)) = reply.send(own) {
            orphaned(shared, &calls, replies);
        }
    }
}

/// What Redis counted for calls whose requests gave up: reported to the orphan handler, so
/// the hits the fallback owes for them are forgiven instead of counted twice.
fn orphaned(shared: &Shared, calls: &[Call], replies: Replies) {
    let Some(handler) = shared.orphans.get() else {
        return;
    };
    for (call, reply) in calls.iter().zip(replies) {
        let [_, period, now, hits, mode, _, _] = call.args;
        if mode != 0 {
            continue;
        }
        let Ok((answer, taken, _)) = reply
            .map_err(drop)
            .and_then(|v| super::outcome(v).map_err(drop))
        else {
            continue;
        };
        let counted = match call.algorithm {
            // A fixed window counts every hit, admitted or not.
            1 => hits,
            _ => taken
                .unwrap_or(if answer.over { 0 } else { hits })
                .min(hits),
        };
        let Some(counter) = call
            .first
            .strip_prefix("sluice:{")
            .and_then(|rest| rest.rsplit_once("}:"))
            .map(|(counter, _)| counter)
        else {
            continue;
        };
        let window = if call.algorithm == 3 {
            0
        } else {
            now - now % period.max(1)
        };
        if counted > 0 {
            handler(counter, window, counted);
        }
    }
}

/// A cluster's batch: one command per slot, all sent at once (different slots live on
/// different nodes); the results in call order.
async fn send_by_slot(shared: &Arc<Shared>, calls: &[Call]) -> Replies {
    let total = calls.len();
    let mut groups: HashMap<u16, (Vec<usize>, Vec<Call>)> = HashMap::new();
    for (i, call) in calls.iter().enumerate() {
        let (positions, group) = groups.entry(call.slot()).or_default();
        positions.push(i);
        group.push(call.clone());
    }
    if groups.len() == 1 {
        let (slot, (_, group)) = groups.into_iter().next().unwrap_or_default();
        return send(shared, slot, &group).await;
    }
    let mut sent = tokio::task::JoinSet::new();
    for (slot, (positions, group)) in groups {
        let shared = shared.clone();
        sent.spawn(async move { (positions, send(&shared, slot, &group).await) });
    }
    let mut results: Vec<Option<Result<Value, Error>>> = (0..total).map(|_| None).collect();
    while let Some(done) = sent.join_next().await {
        if let Ok((positions, replies)) = done {
            for (i, reply) in positions.into_iter().zip(replies) {
                results[i] = Some(reply);
            }
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::new(ErrorKind::Unknown, "batch lost"))))
        .collect()
}

/// One `EVALSHA` of the batch script for `calls` (all in `slot` on a cluster); one result per
/// call. A lost script cache (NOSCRIPT: the script did not run) loads it and sends again.
pub async fn send(shared: &Shared, slot: u16, calls: &[Call]) -> Replies {
    shared.progress.sent();
    let replies = send_tracked(shared, slot, calls).await;
    shared.progress.answered();
    replies
}

async fn send_tracked(shared: &Shared, slot: u16, calls: &[Call]) -> Replies {
    let mut reply = evalsha(shared, slot, calls).await;
    if matches!(&reply, Err(e) if is_noscript(e)) {
        match shared
            .pool
            .next()
            .script_load_cluster::<Value, _>(shared.script.as_str())
            .await
        {
            Ok(_) => reply = evalsha(shared, slot, calls).await,
            Err(e) => {
                warn!(redis = %shared.target, error = %describe(&e, None), "cannot load the script")
            }
        }
    }
    if matches!(&reply, Err(e) if is_readonly(e)) {
        shared.follower.refused_readonly(&shared.target);
    }
    match reply {
        Ok(Value::Array(items)) if items.len() == calls.len() => {
            items.into_iter().map(Ok).collect()
        }
        Ok(other) => {
            let what = format!(
                "batch reply of kind {} for {} calls",
                other.kind(),
                calls.len()
            );
            calls
                .iter()
                .map(|_| Err(Error::new(ErrorKind::Parse, what.clone())))
                .collect()
        }
        Err(e) => calls.iter().map(|_| Err(e.clone())).collect(),
    }
}

async fn evalsha(shared: &Shared, slot: u16, calls: &[Call]) -> Result<Value, Error> {
    // A connection that is down would queue the batch behind its reconnection until a
    // timeout fires: take one that is up, or fail now so the fallback answers at once.
    // On a cluster, the slot's master's own client: a dead master fails its own calls at once
    // and stalls nobody else's. fred's cluster client takes a slot whose master has no
    // client yet, and a slot that moved (MOVED) is sent there again.
    // A master whose own client is down fails its calls at once: sent through fred's client,
    // they would wait for it (and hold a batch slot that other shards' calls need).
    if let Some(node) = shared.shards.get().and_then(|s| s.client_for(slot)) {
        if !node.is_connected() {
            return Err(Error::new(
                ErrorKind::IO,
                format!("no connection to the master of slot {slot} is up"),
            ));
        }
        match evalsha_on(&node, shared, slot, calls).await {
            Err(e) if e.details().starts_with("MOVED") || e.details().starts_with("ASK") => {}
            other => return other,
        }
    }
    let client = shared.pool.next_connected();
    // On a cluster "connected" means every node is: a dead master must not stop the others.
    if !shared.clustered && !client.is_connected() {
        return Err(Error::new(
            ErrorKind::IO,
            format!(
                "no connection to {} is up{}",
                shared.target,
                shared.last_error_note()
            ),
        ));
    }
    // Not to a node the sentinels no longer name, nor while the pool moves to the new one.
    shared.follower.check(client)?;
    evalsha_on(client, shared, slot, calls).await
}

/// One `EVALSHA` of the batch script on `client`.
async fn evalsha_on(
    client: &Client,
    shared: &Shared,
    slot: u16,
    calls: &[Call],
) -> Result<Value, Error> {
    // fred routes custom commands only by an explicit slot (it would hash the SHA).
    let command = CustomCommand::new_static("EVALSHA", ClusterHash::Custom(slot), false);
    let keys: usize = calls
        .iter()
        .map(|c| 1 + usize::from(c.second.is_some()))
        .sum();
    let mut args: Vec<Value> = Vec::with_capacity(3 + keys + calls.len() * 9);
    args.push(Value::from(shared.sha.as_str()));
    args.push(Value::Integer(keys as i64));
    for call in calls {
        args.push(Value::from(call.first.as_str()));
        if let Some(second) = &call.second {
            args.push(Value::from(second.as_str()));
        }
    }
    args.push(Value::Integer(calls.len() as i64));
    for call in calls {
        args.push(Value::Integer(i64::from(call.algorithm)));
        args.push(Value::Integer(1 + i64::from(call.second.is_some())));
        args.extend(
            call.args
                .iter()
                .map(|&v| Value::Integer(i64::try_from(v).unwrap_or(i64::MAX))),
        );
    }
    // A batch waits for its reply longer than any request waits for it: a request whose
    // deadline passes is answered by the fallback meanwhile, and the late reply says what
    // Redis counted for it, so it is counted once (see [`orphaned`]). A batch given up at the
    // request's own timeout could have run and be counted twice.
    let options = Options {
        timeout: Some(REPLY_WAIT),
        ..Options::default()
    };
    client
        .with_options(&options)
        .custom::<Value, _>(command, args)
        .await
}
