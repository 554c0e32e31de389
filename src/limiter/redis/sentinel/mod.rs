//! Following a failover at once, and never writing to a node that is not the master.
//!
//! Owns the [`Follower`] of a Redis store: the gate every batch passes before it is written,
//! the subscriptions to the sentinels' `+switch-master` channel, and the task that moves the
//! pool to the new master and checks it.
//!
//! Why not leave it to fred: its Sentinel client asks the sentinels for the master only when
//! a connection breaks, and after `SENTINEL FAILOVER` (or a failover sentinels decide) the old
//! master keeps its connections and answers writes as a master for seconds, until a sentinel
//! demotes it. The old master then resynchronises from the new one and drops what it was
//! given, so every count written there in the meantime is lost and a fleet admits more than
//! the limit. So:
//!
//! - one subscription per sentinel of the URL, each reconnecting on its own, hears the
//!   failover as it goes;
//! - when the sentinel leading it is about to promote a replica (`+failover-state-send-
//!   slaveof-noone`), nothing is written any more (the batch fails fast and the fallback
//!   answers): the old master would drop it. If no switch follows, the old master is written
//!   again once `ROLE` says it still is one;
//! - a `+switch-master` for our service names the new master: from then on a connection to
//!   any other node is not written, and every pooled connection is made to reconnect through
//!   the sentinels;
//! - the gate opens again only when every connection that is up is on the new master and
//!   `ROLE` there says `master`;
//! - after any (re)connect `ROLE` is asked again, and a `READONLY` reply to a batch closes the
//!   gate the same way: a node that says it is a replica is never written, and the pool is
//!   made to reconnect (through the sentinels, or the URL's name for a single node).
//!
//! A cluster is left alone: its nodes move slots with `MOVED`, which fred follows.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::config::{Server, ServerConfig};
use fred::types::{ClusterHash, CustomCommand, Value};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::batch::Shared;
use super::describe;
use crate::metrics::{self, Metrics};

mod news;
use news::{News, news_of};

/// The channel sentinels announce a new master on: `<name> <old ip> <old port> <new ip> <new port>`.
pub const SWITCH_MASTER: &str = "+switch-master";
/// What the sentinel leading a failover publishes just before it tells the chosen replica to
/// become master (`slave <name> <ip> <port> @ <master name> <ip> <port>`): what the old master
/// takes from then on is lost when it is demoted, so nothing is written until the switch.
pub const PROMOTING: &str = "+failover-state-send-slaveof-noone";
/// A failover given up after the replica was told to become master (`master <name> <ip>
/// <port>`): writing resumes on the master, once checked.
pub const ABORTED: &str = "-failover-abort-slave-timeout";
/// The most writes wait for a `+switch-master` after [`PROMOTING`] (a replica is usually
/// promoted within the sentinel's one-second INFO period); then, if `ROLE` still says master,
/// the old master is written again.
const PROMOTION_WAIT: Duration = Duration::from_secs(5);

/// How long one forced reconnection may take before the move checks again (the client keeps
/// reconnecting in the background).
const RECONNECT_WAIT: Duration = Duration::from_secs(1);
/// Pauses between checks of a move that is not done yet (a sentinel that has not heard of the
/// switch may still name the old master): short first, since a move usually takes a few ms.
const FIRST_PAUSE: Duration = Duration::from_millis(20);
const MOST_PAUSE: Duration = Duration::from_millis(500);

/// A node, as sentinels and fred name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addr {
    pub host: String,
    pub port: u16,
}

impl Addr {
    fn of(server: &Server) -> Self {
        Self {
            host: server.host.to_string(),
            port: server.port,
        }
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// What wakes the mover.
#[derive(Debug)]
enum Event {
    /// A sentinel is promoting a replica of our master.
    Promoting,
    /// The failover was given up.
    Aborted,
    /// A sentinel announced a new master for our service.
    Switch { from: Addr },
    /// A batch was refused `READONLY`, or a connection is not on the announced master.
    Stray(String),
    /// A pooled connection was (re)made.
    Connected,
}

/// The gate of one store's writes, and what moves the pool (see the module doc).
pub struct Follower {
    /// Off for a cluster: nothing here applies to it.
    active: bool,
    /// False from the start of a promotion, a `+switch-master`, a `READONLY` or a replica's
    /// `ROLE` until every connection that is up is checked on the master.
    writable: AtomicBool,
    /// The master the latest `+switch-master` named: a connection elsewhere is not written.
    /// `None` until a switch is seen (fred's own choice, checked by `ROLE`, stands).
    expected: Mutex<Option<Addr>>,
    events: mpsc::UnboundedSender<Event>,
    /// The mover's end of `events`, taken when the mover starts.
    inbox: Mutex<Option<mpsc::UnboundedReceiver<Event>>>,
    failovers: OnceLock<::metrics::Counter>,
}

impl Follower {
    pub fn new(config: &Config) -> Self {
        let (events, inbox) = mpsc::unbounded_channel();
        Self {
            active: !config.server.is_clustered(),
            writable: AtomicBool::new(true),
            expected: Mutex::new(None),
            events,
            inbox: Mutex::new(Some(inbox)),
            failovers: OnceLock::new(),
        }
    }

    /// Counts the moves in `metrics` (registered at zero now).
    pub fn count_in(&self, metrics: &Metrics) {
        let counter = metrics.counter(metrics::REDIS_FAILOVERS, &[]);
        counter.absolute(0);
        let _ = self.failovers.set(counter);
    }

    /// `Ok` when `client` may be written now; otherwise the reason, and the mover is told if
    /// the connection is on a node the sentinels no longer name.
    pub fn check(&self, client: &Client) -> Result<(), Error> {
        if !self.active {
            return Ok(());
        }
        if !self.writable.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::IO,
                "a Redis failover is under way: nothing is written until the master is checked",
            ));
        }
        // Every batch passes here: no allocation unless the connection is elsewhere.
        let elsewhere = match lock(&self.expected).as_ref() {
            Some(expected) if !on(client, expected) => Some(expected.to_string()),
            _ => None,
        };
        if let Some(expected) = elsewhere {
            self.close(format!(
                "a connection is not on the master the sentinels name ({expected})"
            ));
            return Err(Error::new(
                ErrorKind::IO,
                format!("the connection is not on the Redis master {expected}"),
            ));
        }
        Ok(())
    }

    /// `Ok` unless a move is under way (for the breaker's probe: it must not close the breaker
    /// on a node that is not written).
    pub fn writable(&self) -> Result<(), String> {
        if !self.active || self.writable.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err("a Redis failover is under way".into())
        }
    }

    /// A batch was refused `READONLY`: the node is a replica now.
    pub fn refused_readonly(&self, target: &str) {
        if self.active {
            self.close(format!("{target} answered READONLY: it is a replica now"));
        }
    }

    fn close(&self, why: String) {
        if self.writable.swap(false, Ordering::AcqRel) {
            let _ = self.events.send(Event::Stray(why));
        }
    }
}

impl super::RedisStore {
    /// Counts the store's moves to a new master in `metrics` (`sluice_redis_failovers_total`).
    pub fn count_failovers_in(&self, metrics: &Metrics) {
        self.shared.follower.count_in(metrics);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether `client`'s connection is to `node`. A connection whose node fred does not know
/// (it learns it from `CLIENT ID`, which a restricted user may not be allowed) counts as on
/// it: `ROLE` and `READONLY` still guard it.
fn on(client: &Client, node: &Addr) -> bool {
    let nodes = client.active_connections();
    nodes.is_empty()
        || nodes
            .iter()
            .any(|s| s.port == node.port && *s.host == *node.host)
}

/// Starts following: the mover, a `ROLE` check now and after every (re)connect of the pool,
/// and for a Sentinel URL one subscription to the failover channels per sentinel. Every task
/// ends once the store is gone.
pub fn start(shared: &Arc<Shared>, config: &Config) {
    let follower = &shared.follower;
    if !follower.active {
        return;
    }
    let Some(inbox) = lock(&follower.inbox).take() else {
        return;
    };
    tokio::spawn(mover(Arc::downgrade(shared), inbox));
    // The connections made before this point are checked once now.
    let _ = follower.events.send(Event::Connected);
    for client in shared.pool.clients() {
        let mut connected = client.reconnect_rx();
        let store = Arc::downgrade(shared);
        tokio::spawn(async move {
            loop {
                match connected.recv().await {
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
                let Some(shared) = store.upgrade() else {
                    return;
                };
                let _ = shared.follower.events.send(Event::Connected);
            }
        });
    }
    if let ServerConfig::Sentinel {
        hosts,
        service_name,
        username,
        password,
    } = &config.server
    {
        for host in hosts {
            let mut watch = Config {
                server: ServerConfig::Centralized {
                    server: host.clone(),
                },
                username: username.clone(),
                password: password.clone(),
                ..Config::default()
            };
            watch.tls = config.tls.clone();
            // A sentinel that is down at start is retried, as one lost later is.
            watch.fail_fast = false;
            tokio::spawn(watch_sentinel(
                Arc::downgrade(shared),
                watch,
                host.clone(),
                service_name.clone(),
            ));
        }
    }
}

/// One sentinel's failover messages, for as long as the store lives: subscribed again
/// after every reconnect (the client retries for ever, with backoff, when the sentinel goes).
async fn watch_sentinel(store: Weak<Shared>, config: Config, host: Server, service: String) {
    let sentinel = Addr::of(&host);
    let client = match Builder::from_config(config)
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.internal_command_timeout = Duration::from_secs(2);
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            warn!(%sentinel, error = %describe(&e, None), "cannot watch the sentinel for failovers");
            return;
        }
    };
    let mut connected = client.reconnect_rx();
    let mut messages = client.message_rx();
    let _task = client.connect();
    // Wakes now and then so the watch ends soon after the store is dropped.
    let mut alive = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            up = connected.recv() => match up {
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    match client.subscribe(vec![SWITCH_MASTER, PROMOTING, ABORTED]).await {
                        Ok(()) => debug!(%sentinel, "watching the sentinel for failovers"),
                        Err(e) => warn!(%sentinel, error = %describe(&e, None), "cannot subscribe to the sentinel's failover channels"),
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            message = messages.recv() => match message {
                Ok(message) => {
                    let Some(shared) = store.upgrade() else { break };
                    match news_of(&message, &service) {
                        Some(News::Switch(from, to)) => switched(&shared, &sentinel, from, to),
                        Some(News::Promoting) => promoting(&shared, &sentinel),
                        Some(News::Aborted) => {
                            let _ = shared.follower.events.send(Event::Aborted);
                        }
                        None => {}
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            _ = alive.tick() => if store.strong_count() == 0 { break },
        }
    }
    let _ = client.quit().await;
}

/// A sentinel named a new master. From now on no connection elsewhere is written; if any
/// connection is elsewhere, the gate closes at once and the mover moves the pool. The same
/// switch heard from another sentinel changes nothing.
fn switched(shared: &Shared, sentinel: &Addr, from: Addr, to: Addr) {
    let follower = &shared.follower;
    {
        let mut expected = lock(&follower.expected);
        if expected.as_ref() == Some(&to) {
            return;
        }
        *expected = Some(to.clone());
    }
    info!(%sentinel, from = %from, to = %to, "the sentinel announced a new Redis master");
    let elsewhere = shared
        .pool
        .clients()
        .iter()
        .any(|c| c.is_connected() && !on(c, &to));
    if elsewhere {
        follower.writable.store(false, Ordering::Release);
    }
    let _ = follower.events.send(Event::Switch { from });
}

/// The leader sentinel is about to promote a replica: from now on the old master's writes would
/// be lost, so none is made until the switch (the fallback answers meanwhile).
fn promoting(shared: &Shared, sentinel: &Addr) {
    info!(%sentinel, "the sentinels are promoting a replica: not writing to Redis until the new master is announced");
    shared.follower.writable.store(false, Ordering::Release);
    let _ = shared.follower.events.send(Event::Promoting);
}

/// How waiting for the switch after [`PROMOTING`] ended.
enum Promotion {
    Switched(Addr),
    GaveUp(&'static str),
    /// The store is gone.
    Closed,
}

async fn await_switch(inbox: &mut mpsc::UnboundedReceiver<Event>) -> Promotion {
    let deadline = tokio::time::sleep(PROMOTION_WAIT);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return Promotion::GaveUp("no +switch-master came after the promotion began"),
            event = inbox.recv() => match event {
                None => return Promotion::Closed,
                Some(Event::Switch { from }) => return Promotion::Switched(from),
                Some(Event::Aborted) => return Promotion::GaveUp("the sentinels gave the failover up"),
                Some(_) => {}
            },
        }
    }
}

/// Moves the pool whenever an event says so, and checks it after every (re)connect.
async fn mover(store: Weak<Shared>, mut inbox: mpsc::UnboundedReceiver<Event>) {
    while let Some(event) = inbox.recv().await {
        let Some(shared) = store.upgrade() else {
            return;
        };
        let follower = &shared.follower;
        let paused = Instant::now();
        let (why, from) = match event {
            Event::Promoting => match await_switch(&mut inbox).await {
                Promotion::Closed => return,
                Promotion::Switched(from) => ("+switch-master", Some(from)),
                Promotion::GaveUp(why) => {
                    if verify(&shared).await.is_ok() {
                        follower.writable.store(true, Ordering::Release);
                        warn!(redis = %shared.target, reason = why, paused_ms = paused.elapsed().as_secs_f64() * 1000.0, "writing to the same Redis master again");
                        continue;
                    }
                    (why, None)
                }
            },
            Event::Aborted => continue,
            Event::Switch { from, .. } => {
                // Every connection already on the new master (it reconnected by itself).
                if follower.writable.load(Ordering::Acquire) && verify(&shared).await.is_ok() {
                    continue;
                }
                ("+switch-master", Some(from))
            }
            Event::Stray(why) => {
                warn!(redis = %shared.target, reason = %why, "not writing to Redis until the connections are checked");
                ("a node that is not the master", None)
            }
            Event::Connected => {
                if follower.writable.load(Ordering::Acquire) {
                    match verify(&shared).await {
                        Ok(_) => continue,
                        Err(Verdict::Wrong(why)) => {
                            warn!(redis = %shared.target, reason = %why, "not writing to this Redis node");
                            follower.writable.store(false, Ordering::Release);
                        }
                        // A connection that is down is not written; its reconnect is checked.
                        Err(Verdict::Down) => continue,
                    }
                }
                ("a node that is not the master", None)
            }
        };
        move_pool(&shared, &mut inbox, why, from, paused).await;
    }
}

/// Without an announced master (a READONLY, a replica's ROLE) every connection is moved.
fn expected_none(follower: &Follower) -> bool {
    lock(&follower.expected).is_none()
}

/// Why the pool may not be written yet.
enum Verdict {
    /// A connection is on a node that is not the master (or not the announced one).
    Wrong(String),
    /// No connection is up.
    Down,
}

/// Checks every connection that is up: on the announced master (once one is) and `ROLE`
/// `master`. Returns the node written to.
async fn verify(shared: &Shared) -> Result<Option<Addr>, Verdict> {
    let expected = lock(&shared.follower.expected).clone();
    let mut node = None;
    let mut up = 0;
    for client in shared.pool.clients() {
        if !client.is_connected() {
            continue;
        }
        let at = client.active_connections().first().map(Addr::of);
        if let Some(expected) = &expected
            && !on(client, expected)
        {
            let at = at.map_or_else(|| "an unknown node".to_string(), |a| a.to_string());
            return Err(Verdict::Wrong(format!(
                "a connection is on {at}, not on the master {expected} the sentinels name"
            )));
        }
        match role(client).await {
            Role::Master => {}
            Role::Other(role) => {
                let at = at.map_or_else(|| shared.target.clone(), |a| a.to_string());
                return Err(Verdict::Wrong(format!("{at} says its ROLE is {role}")));
            }
            // Lost meanwhile: not written, and checked again when it is back.
            Role::Unknown => continue,
        }
        up += 1;
        node = at.or(node);
    }
    if up == 0 {
        return Err(Verdict::Down);
    }
    Ok(node)
}

enum Role {
    Master,
    Other(String),
    /// No answer (the connection went), so nothing is known.
    Unknown,
}

async fn role(client: &Client) -> Role {
    let command = CustomCommand::new_static("ROLE", ClusterHash::FirstKey, false);
    match client.custom::<Value, Value>(command, Vec::new()).await {
        Ok(Value::Array(items)) => match items.first().and_then(Value::as_string) {
            Some(role) if role == "master" => Role::Master,
            Some(role) => Role::Other(role),
            None => Role::Other("unreadable".into()),
        },
        Ok(other) => Role::Other(format!("a reply of kind {}", other.kind())),
        // A user without the right to ask ROLE: fred checked it while connecting through the
        // sentinels, and READONLY replies still close the gate.
        Err(e) if e.details().starts_with("NOPERM") => Role::Master,
        Err(_) => Role::Unknown,
    }
}

/// Makes every connection reconnect (through the sentinels for a Sentinel URL, which name the
/// master) until [`verify`] passes, then opens the gate. Logs and counts the move.
async fn move_pool(
    shared: &Shared,
    inbox: &mut mpsc::UnboundedReceiver<Event>,
    why: &'static str,
    mut from: Option<Addr>,
    paused: Instant,
) {
    let follower = &shared.follower;
    follower.writable.store(false, Ordering::Release);
    let started = Instant::now();
    let mut pause = FIRST_PAUSE;
    // Set when a check failed on connections that were not moved (a node that said it is a
    // replica): the next round moves every connection.
    let mut all = expected_none(follower);
    loop {
        // The connections that are up and not on the announced master: one that is down is
        // reconnecting already, and is checked when it is back.
        let expected = lock(&follower.expected).clone();
        let mut moving = Vec::new();
        for client in shared.pool.clients() {
            let wrong = all || expected.as_ref().is_none_or(|e| !on(client, e));
            if client.is_connected() && wrong {
                if from.is_none() {
                    from = client.active_connections().first().map(Addr::of);
                }
                moving.push(client.clone());
            }
        }
        let moved = !moving.is_empty();
        let mut reconnects = tokio::task::JoinSet::new();
        for client in moving {
            reconnects.spawn(async move {
                tokio::time::timeout(RECONNECT_WAIT, client.force_reconnection()).await
            });
        }
        reconnects.join_all().await;
        all = expected_none(follower);
        match verify(shared).await {
            Ok(to) => {
                follower.writable.store(true, Ordering::Release);
                let took = started.elapsed();
                let from = from.map_or_else(|| "unknown".to_string(), |a| a.to_string());
                let to = to.map_or_else(|| shared.target.clone(), |a| a.to_string());
                info!(
                    from = %from,
                    to = %to,
                    took_ms = took.as_secs_f64() * 1000.0,
                    paused_ms = paused.elapsed().as_secs_f64() * 1000.0,
                    reason = why,
                    "writing to the new Redis master"
                );
                if let Some(counter) = follower.failovers.get() {
                    counter.increment(1);
                }
                return;
            }
            Err(Verdict::Wrong(reason)) => {
                debug!(redis = %shared.target, %reason, "the move is not done yet");
                all = all || !moved;
            }
            Err(Verdict::Down) => {}
        }
        // A newer switch may come meanwhile: its address is already in `expected`.
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            event = inbox.recv() => if event.is_none() { return },
        }
        pause = (pause * 2).min(MOST_PAUSE);
    }
}
