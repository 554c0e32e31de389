//! The Redis store: counters shared by every replica, updated by atomic Lua scripts.
//!
//! Knows Redis (connection, keys, scripts, replies) and nothing about descriptors. Each
//! algorithm's script is the twin of its pure function in [`super::algorithm`] and receives
//! `now` from the caller, so memory and Redis give identical answers for identical inputs.
//!
//! One request is at most one round trip, and usually a share of one: its counter calls join
//! every call queued by concurrent requests, and the lot goes to Redis as one `EVALSHA` of
//! the batch script ([`batch`]; on a cluster, one per slot). A NOSCRIPT reply (Redis
//! restarted or failed over and lost its script cache) loads the script again and resends
//! the batch once, so no request fails for it.

use std::sync::Arc;

use fred::interfaces::LuaInterface;
use fred::prelude::*;
use fred::types::Value;
use fred::types::config::TlsConnector;
use tracing::{info, warn};

use super::backend::Remote;
pub mod batch;
mod errors;
pub mod eviction;
mod shards;
mod tls;
pub(crate) use errors::{is_noscript, is_readonly};
use errors::{refused_credentials, store_error};
pub use shards::MAX_SHARDS;
use tls::tls_client_config;
mod quota;
mod sentinel;

use super::{CounterOp, Outcome, Source, Store, StoreError, StoreFuture, keys};
use crate::limits::{REDACTED, RedisSettings, redact_url};

/// Why the Redis store could not be set up. Never contains the password.
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    #[error(
        "redis.url is not a Redis URL ({0}): write e.g. redis://host:6379, rediss://host:6380, redis-sentinel://host:26379?sentinelServiceName=mymaster or redis-cluster://host:7000?node=host:7001"
    )]
    Url(String),
    #[error("cannot read redis.password_file {path}: {source}")]
    PasswordFile {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "Redis refused the credentials ({0}): check redis.username and redis.password (or SLUICE_REDIS_PASSWORD / redis.password_file)"
    )]
    Auth(String),
    #[error("Redis client: {0}")]
    Client(String),
    #[error(
        "redis.{setting} is set but redis.url does not use TLS: write rediss:// (or rediss-cluster://, rediss-sentinel://)"
    )]
    TlsWithoutRediss { setting: &'static str },
    #[error("cannot read redis.{setting} {path}: {source}")]
    TlsFile {
        setting: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("redis.{setting} {path} holds no usable {what} in PEM form{detail}")]
    TlsPem {
        setting: &'static str,
        path: String,
        what: &'static str,
        detail: String,
    },
    #[error(
        "redis.tls_client_cert_file and redis.tls_client_key_file go together: set both or neither"
    )]
    TlsClientPair,
    #[error("Redis TLS set-up: {0}")]
    Tls(String),
    /// `redis.require_noeviction` and a policy that may evict counters, or cannot be read
    /// (see [`eviction`]).
    #[error("{0}")]
    EvictionPolicy(String),
}

pub struct RedisStore {
    /// The pool, the batch script and its SHA, shared with the batches in flight.
    shared: Arc<batch::Shared>,
    /// Requests' calls to the dispatcher, which coalesces them (see [`batch`]).
    jobs: tokio::sync::mpsc::UnboundedSender<batch::Job>,
    /// The SHA of the RLQS share script (see [`quota`]).
    quota_sha: String,
    /// What the last `maxmemory-policy` check found (see [`eviction`]).
    eviction: Arc<eviction::EvictionWatch>,
    /// On a cluster, which master holds which counter (see [`shards`]).
    shards: Option<Arc<shards::Shards>>,
}

/// The counter the breaker's probe writes (`sluice:{probe}:<window>`): no matcher builds it,
/// since every counter id of a limit starts with its domain and route.
const PROBE_COUNTER: &str = "probe";

/// The client settings of every connection sluice makes to Redis.
fn node_builder(
    config: Config,
    connect_timeout: std::time::Duration,
    command_timeout: std::time::Duration,
) -> Builder {
    let mut builder = Builder::from_config(config);
    builder
        .with_connection_config(|c| {
            c.connection_timeout = connect_timeout;
            c.internal_command_timeout = connect_timeout;
            // A request must not wait for a reconnect or retry: it fails fast and the
            // caller's fallback answers.
            c.max_command_attempts = 1;
        })
        .with_performance_config(|p| {
            p.default_command_timeout = command_timeout;
        })
        // Reconnect attempts back off to at most 500 ms, so counting returns to Redis within
        // about half a second of it coming back, however long it was down.
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 500, 2));
    builder
}

/// A probe counter whose slot the shard owns (`probe`, `probe-1`, ... until one lands there).
fn probe_counter(shards: &shards::Shards, shard: usize) -> String {
    (0..100_000u32)
        .map(|n| format!("{PROBE_COUNTER}-{n}"))
        .find(|c| shards.of(c) == shard)
        .unwrap_or_else(|| PROBE_COUNTER.to_string())
}

/// Removes anything secret from a fred error before it reaches a log or a client.
pub(crate) fn describe(err: &Error, password: Option<&str>) -> String {
    let text = err.to_string();
    match password {
        Some(p) if !p.is_empty() => text.replace(p, REDACTED),
        _ => text,
    }
}

impl RedisStore {
    /// Builds the client and starts connecting. An unreachable Redis is not an error here:
    /// the client keeps retrying with backoff while `/readyz` reports not ready. Refused
    /// credentials are, since retrying cannot fix them.
    pub async fn connect(settings: &RedisSettings) -> Result<Self, RedisSetupError> {
        let mut config = Config::from_url(&settings.url)
            .map_err(|e| RedisSetupError::Url(redact_url(&e.to_string())))?;
        if let Some(user) = &settings.username {
            config.username = Some(user.clone());
        }
        let password = match (&settings.password_file, &settings.password) {
            (Some(path), _) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| RedisSetupError::PasswordFile {
                        path: path.display().to_string(),
                        source,
                    })?
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
            ),
            (None, Some(p)) => Some(p.clone()),
            (None, None) => None,
        };
        if password.is_some() {
            config.password = password.clone();
        }
        if let Some(client_config) = tls_client_config(settings)? {
            if config.tls.is_none() {
                let setting = if settings.tls_ca_file.is_some() {
                    "tls_ca_file"
                } else {
                    "tls_client_cert_file"
                };
                return Err(RedisSetupError::TlsWithoutRediss { setting });
            }
            config.tls = Some(TlsConnector::from(client_config).into());
        }
        if settings.database != 0 {
            config.database = Some(settings.database as u8);
        }
        let connect_timeout = settings.connect_timeout;
        let command_timeout = settings.command_timeout;
        let target = redact_url(&settings.url);
        let builder = |fail_fast: bool| {
            let mut builder = node_builder(config.clone(), connect_timeout, command_timeout);
            builder.with_config(|c| c.fail_fast = fail_fast);
            builder
        };
        let secret = |e: &Error| describe(e, password.as_deref());

        // A one-off connection that gives up at the first failure, to tell refused
        // credentials (fatal: retrying cannot fix them) from a Redis that is not there yet.
        let probe = builder(true)
            .build()
            .map_err(|e| RedisSetupError::Client(secret(&e)))?;
        let reachable = match tokio::time::timeout(connect_timeout * 2, probe.init()).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                let message = secret(&e);
                if refused_credentials(&e) {
                    let _ = probe.quit().await;
                    return Err(RedisSetupError::Auth(message));
                }
                warn!(redis = %target, error = %message, "Redis unreachable; retrying in the background");
                false
            }
            Err(_) => {
                warn!(redis = %target, "Redis unreachable; retrying in the background");
                false
            }
        };
        let _ = probe.quit().await;

        // The pool never gives up (fail_fast off): it reconnects with backoff for as long as
        // it takes, while the fallback answers.
        let pool = builder(false)
            .build_pool(settings.pool_size.max(1))
            .map_err(|e| RedisSetupError::Client(secret(&e)))?;
        let _connections = pool.connect_pool();
        if reachable {
            match tokio::time::timeout(connect_timeout, pool.wait_for_connect()).await {
                Ok(Ok(())) => info!(redis = %target, "connected to Redis"),
                _ => warn!(redis = %target, "Redis stopped answering during start-up; retrying"),
            }
        }
        let script = batch::script();
        let shared = Arc::new(batch::Shared {
            pool,
            sha: fred::util::sha1_hash(&script),
            script,
            clustered: config.server.is_clustered(),
            target,
            progress: batch::Progress::default(),
            last_error: std::sync::Mutex::new(None),
            shards: std::sync::OnceLock::new(),
            orphans: std::sync::OnceLock::new(),
            follower: sentinel::Follower::new(&config),
        });
        sentinel::start(&shared, &config);
        // What connections report, so a store that cannot connect says why (NOAUTH, ...).
        for client in shared.pool.clients() {
            let errors = Arc::downgrade(&shared);
            let secret = password.clone();
            client.on_error(move |(error, _)| {
                let errors = errors.clone();
                let text = describe(&error, secret.as_deref());
                async move {
                    if let Some(shared) = errors.upgrade()
                        && let Ok(mut last) = shared.last_error.lock()
                    {
                        *last = Some(text);
                    }
                    Ok(())
                }
            });
            let connected = Arc::downgrade(&shared);
            client.on_reconnect(move |_| {
                let connected = connected.clone();
                async move {
                    if let Some(shared) = connected.upgrade()
                        && let Ok(mut last) = shared.last_error.lock()
                    {
                        *last = None;
                    }
                    Ok(())
                }
            });
        }
        let eviction = eviction::start(&shared, reachable, settings).await?;
        let shards = shared.clustered.then(|| {
            // A plain client per master, with the pool's settings (see [`shards`]).
            let node_config = config.clone();
            let connect: shards::Connect = Box::new(move |host: &str, port: u16| {
                let mut config = node_config.clone();
                config.server = fred::types::config::ServerConfig::new_centralized(host, port);
                let client = node_builder(config, connect_timeout, command_timeout)
                    .build()
                    .ok()?;
                let _connection = client.connect();
                Some(client)
            });
            let shards = Arc::new(shards::Shards::new(connect));
            shards::Shards::follow(shards.clone(), shared.pool.clone());
            shards
        });
        if let Some(shards) = &shards {
            if reachable {
                shards.wait_ready(shared.pool.next(), connect_timeout).await;
            }
            let _ = shared.shards.set(shards.clone());
        }
        let store = Self {
            jobs: batch::spawn(shared.clone(), settings.pool_size.max(1)),
            shared,
            quota_sha: quota::sha(),
            eviction,
            shards,
        };
        // Loaded now so the first requests do not pay for a NOSCRIPT round; if Redis is not
        // there yet, the NOSCRIPT path loads them later.
        if store.ready().is_ok()
            && let Err(e) = store.load_scripts().await
        {
            warn!(redis = %store.shared.target, error = %e, "cannot load the script yet");
        }
        Ok(store)
    }

    /// The key of one window of a counter (see [`keys`]).
    pub fn key(counter: &str, window: u64) -> String {
        keys::window(counter, window)
    }

    /// The script every call goes through (for tools that check Redis's script cache).
    pub fn script() -> String {
        batch::script()
    }

    /// The client (for tests and tools that need to talk to the same Redis).
    pub fn pool(&self) -> &Pool {
        &self.shared.pool
    }

    async fn load_scripts(&self) -> Result<(), StoreError> {
        for script in [self.shared.script.as_str(), quota::script()] {
            self.shared
                .pool
                .next()
                .script_load_cluster::<Value, _>(script)
                .await
                .map_err(|e| StoreError::Unavailable(describe(&e, None)))?;
        }
        Ok(())
    }
}

/// Reads a script's `{ over, remaining, reset_ms[, hits taken[, slots expired]] }` reply;
/// anything else is a bad reply. Without the fourth value (sliding window), an admitted take
/// took its hits.
pub(crate) fn outcome(value: Value) -> Result<(Outcome, Option<u64>, u64), StoreError> {
    let bad = |what: &str| {
        StoreError::BadReply(format!("expected {{over, remaining, reset}}, got {what}"))
    };
    let Value::Array(items) = value else {
        return Err(bad(&value.kind().to_string()));
    };
    let ints: Vec<i64> = items
        .iter()
        .map(|v| v.as_i64().ok_or_else(|| bad(&v.kind().to_string())))
        .collect::<Result<_, _>>()?;
    let (over, remaining, reset, taken, expired) = match ints.as_slice() {
        [over, remaining, reset] => (*over, *remaining, *reset, None, 0),
        [over, remaining, reset, taken] => (*over, *remaining, *reset, Some(*taken), 0),
        [over, remaining, reset, taken, expired] => {
            (*over, *remaining, *reset, Some(*taken), *expired)
        }
        _ => return Err(bad(&format!("{} integers", ints.len()))),
    };
    Ok((
        Outcome {
            over: over != 0,
            remaining: u64::try_from(remaining).unwrap_or(0),
            reset_ms: u64::try_from(reset).unwrap_or(0),
        },
        taken.map(|t| u64::try_from(t).unwrap_or(0)),
        u64::try_from(expired).unwrap_or(0),
    ))
}

impl RedisStore {
    /// `Ok` when a connection is up; the reason otherwise.
    pub fn ready(&self) -> Result<(), String> {
        if self.shared.pool.clients().iter().any(|c| c.is_connected()) {
            Ok(())
        } else {
            let note = self.shared.last_error_note();
            // A connection refused for a reason the operator can fix says what to do.
            let advice = errors::refusal(&note)
                .map(|(_, advice)| format!(": {advice}"))
                .unwrap_or_default();
            Err(format!(
                "not connected to {}{note}{advice}",
                self.shared.target
            ))
        }
    }
}

impl Store for RedisStore {
    fn apply<'a>(&'a self, ops: &'a mut [CounterOp], now: u64) -> StoreFuture<'a> {
        Box::pin(async move {
            // With no connection up, fred would queue the batch until it reconnects or the
            // timeout fires; failing now lets the fallback answer at once.
            // (Not on a cluster: a client there is "not connected" while any one node is
            // down, and the other shards' calls must still go; fred fails the dead node's at
            // once, one attempt each.)
            if !self.shared.clustered {
                self.ready().map_err(StoreError::Unavailable)?;
            }
            let (reply, answer) = tokio::sync::oneshot::channel();
            let calls = ops.iter().map(|op| batch::Call::of(op, now)).collect();
            self.jobs
                .send(batch::Job { calls, reply })
                .map_err(|_| StoreError::Unavailable("the Redis dispatcher stopped".into()))?;
            let mut answer = batch::Answer {
                rx: Some(answer),
                shared: &self.shared,
            };
            let replies = answer
                .replies()
                .await
                .ok_or_else(|| StoreError::Unavailable("the Redis batch was dropped".into()))?;
            if replies.len() != ops.len() {
                return Err(StoreError::BadReply(
                    "reply count does not match the batch".into(),
                ));
            }
            // Calls that failed (on a cluster: their shard's) stay unanswered; the others are
            // counted and answered, so only the failing shard's counters go to the fallback.
            let mut failed = None;
            for (op, reply) in ops.iter_mut().zip(replies) {
                let answered = reply.map_err(|e| store_error(&e)).and_then(outcome);
                let (answer, taken, expired) = match answered {
                    Ok(answered) => answered,
                    Err(e) => {
                        op.source = Source::Pending;
                        failed.get_or_insert(e);
                        continue;
                    }
                };
                op.outcome = answer;
                op.expired = expired;
                op.granted = taken.unwrap_or(if op.mode == super::HitMode::Take && !answer.over {
                    op.hits
                } else {
                    0
                });
                op.source = Source::Redis;
            }
            match failed {
                None => Ok(()),
                Some(e) if ops.iter().all(|op| op.source == Source::Pending) => Err(e),
                Some(e) => Err(StoreError::Partial(Box::new(e))),
            }
        })
    }
}

impl Remote for RedisStore {
    fn source(&self) -> Source {
        Source::Redis
    }

    fn probe(&self, shard: usize) -> StoreFuture<'_> {
        Box::pin(async move {
            // Not answered while the pool moves to a new master: the breaker stays open.
            self.shared
                .follower
                .writable()
                .map_err(StoreError::Unavailable)?;
            // The counting script itself, one hit on a key of its own that expires within
            // seconds: only a node that takes this write can count.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            // On a cluster, a key of the probed shard's own.
            let counter = match &self.shards {
                Some(shards) => probe_counter(shards, shard),
                None => PROBE_COUNTER.to_string(),
            };
            let call = batch::Call::of(
                &CounterOp::new(
                    counter,
                    crate::limiter::Algorithm::FixedWindow,
                    crate::limiter::Threshold::new(
                        u64::from(u32::MAX),
                        crate::limiter::Unit::Second,
                    ),
                    1,
                    crate::limiter::HitMode::Take,
                ),
                now,
            );
            let slot = call.slot();
            let mut replies = batch::send(&self.shared, slot, std::slice::from_ref(&call)).await;
            match replies.pop() {
                Some(reply) => outcome(reply.map_err(|e| store_error(&e))?).map(|_| ()),
                None => Err(StoreError::BadReply("no reply to the probe".into())),
            }
        })
    }

    fn answering(&self, within: std::time::Duration) -> bool {
        self.shared.progress.answering(within)
    }

    fn shard(&self, counter: &str) -> usize {
        self.shards.as_ref().map_or(0, |s| s.of(counter))
    }

    fn sharded(&self) -> bool {
        self.shards.is_some()
    }

    fn shard_name(&self, shard: usize) -> String {
        match &self.shards {
            Some(shards) => shards.name(shard),
            None => self.shared.target.clone(),
        }
    }

    fn on_orphans(&self, handler: batch::Orphans) {
        let _ = self.shared.orphans.set(handler);
    }

    fn ready(&self) -> Result<(), String> {
        RedisStore::ready(self)
    }

    fn warnings(&self) -> Vec<String> {
        self.eviction.finding().warning().into_iter().collect()
    }

    fn report(&self, metrics: &crate::metrics::Metrics) {
        self.eviction.report(metrics);
    }
}
