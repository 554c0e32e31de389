//! The eviction check: whether the Redis that holds the counters may evict them.
//!
//! Every counter key has a TTL (its window), so every `allkeys-*` and `volatile-*`
//! `maxmemory-policy` can evict a counter before its window ends, and an evicted counter
//! starts again from zero: the limit is silently reset (a spray of unique keys under memory
//! pressure is enough). Only `noeviction` keeps limits: when memory is full Redis refuses the
//! writes instead, the store errors and the fallback answers, and no count is lost unseen.
//!
//! This module owns reading `CONFIG GET maxmemory-policy` (on a cluster, from every master
//! fred routes to; through Sentinel, from the master the client is connected to), at connect
//! and then every `redis.eviction_check_interval`, and what sluice makes of it: a WARN log
//! when a policy that can evict is found (and again whenever it changes), the
//! `sluice_redis_eviction_policy_unsafe` and `sluice_redis_eviction_policy` gauges, a warning
//! line for `/readyz` (the replica stays ready: the counts are right until Redis is full),
//! and the refusal to start under `redis.require_noeviction`. A Redis that refuses CONFIG
//! (managed services often rename it) is logged once at INFO and shown as unknown; requests
//! never depend on any of this.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use fred::prelude::*;
use fred::types::config::{Options, Server};
use fred::types::{ClusterHash, CustomCommand, Value};
use tracing::{debug, info, warn};

use super::batch::Shared;
use super::{RedisSetupError, describe};
use crate::limits::RedisSettings;
use crate::metrics::{self, Metrics};

/// The only policy that never evicts a key.
pub const SAFE: &str = "noeviction";

/// The policies Redis and Valkey document, as the `policy` label shows them; anything else
/// is labelled `other` (the value comes from Redis, but a label set must stay fixed).
const KNOWN: &[&str] = &[
    "noeviction",
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
    "volatile-lru",
    "volatile-lfu",
    "volatile-random",
    "volatile-ttl",
];

/// The `policy` label when a policy is not one of [`KNOWN`].
const OTHER: &str = "other";
/// The `policy` label while the policy is not known (not read yet, or CONFIG refused).
const UNKNOWN: &str = "unknown";

/// How long the next check waits while no policy has been read yet (Redis not reachable so
/// far): the first answer then shows within about a second of Redis answering.
const RETRY: Duration = Duration::from_secs(1);

/// The fix, as the log, `/readyz` and the start-up refusal say it.
const FIX: &str = "run `CONFIG SET maxmemory-policy noeviction` on every Redis master and set \
                   `maxmemory-policy noeviction` in redis.conf so it survives a restart";

/// The `policy` label of a policy Redis reported.
pub fn label(policy: &str) -> &'static str {
    KNOWN
        .iter()
        .find(|known| known.eq_ignore_ascii_case(policy))
        .copied()
        .unwrap_or(OTHER)
}

/// What the last check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// No check has had an answer yet (Redis not reachable so far).
    NotChecked,
    /// The policy of each node asked: (node, policy as Redis wrote it).
    Read(Vec<(String, String)>),
    /// Redis answered with an error, or without the parameter: the reason.
    Refused(String),
}

impl Finding {
    /// The nodes whose policy can evict counters, and their policies.
    fn unsafe_nodes(&self) -> Vec<&(String, String)> {
        match self {
            Finding::Read(nodes) => nodes
                .iter()
                .filter(|(_, policy)| !policy.eq_ignore_ascii_case(SAFE))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// "allkeys-lru on 127.0.0.1:7000, volatile-lru on 127.0.0.1:7001".
    fn describe_unsafe(&self) -> String {
        self.unsafe_nodes()
            .iter()
            .map(|(node, policy)| format!("{policy} on {node}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The `/readyz` line, when there is something to say.
    pub fn warning(&self) -> Option<String> {
        match self {
            Finding::NotChecked => None,
            Finding::Read(_) if self.unsafe_nodes().is_empty() => None,
            Finding::Read(_) => Some(format!(
                "warning: Redis maxmemory-policy is {}: Redis may evict counters, which resets \
                 their limits; {FIX}",
                self.describe_unsafe()
            )),
            Finding::Refused(reason) => Some(format!(
                "warning: Redis maxmemory-policy is unknown ({reason}): unless it is noeviction, \
                 Redis may evict counters, which resets their limits"
            )),
        }
    }

    /// The error `redis.require_noeviction` stops the start with, if this finding fails it.
    fn refusal(&self) -> Option<String> {
        match self {
            // Not reachable at start: sluice starts as it always does, and the periodic
            // check warns once Redis answers (a start cannot be refused later).
            Finding::NotChecked => None,
            Finding::Read(_) if self.unsafe_nodes().is_empty() => None,
            Finding::Read(_) => Some(format!(
                "Redis maxmemory-policy is {}, and redis.require_noeviction \
                 (SLUICE_REDIS_REQUIRE_NOEVICTION) is set: any policy but noeviction may evict \
                 counters and reset limits; {FIX}",
                self.describe_unsafe()
            )),
            Finding::Refused(reason) => Some(format!(
                "Redis maxmemory-policy could not be read ({reason}), and \
                 redis.require_noeviction (SLUICE_REDIS_REQUIRE_NOEVICTION) is set: allow \
                 `CONFIG GET maxmemory-policy` for sluice's user and make sure the policy is \
                 noeviction, or turn redis.require_noeviction off"
            )),
        }
    }
}

/// The last finding, shared by the periodic check, `/readyz` and `/metrics`.
#[derive(Debug)]
pub struct EvictionWatch {
    finding: Mutex<Finding>,
    /// A refused CONFIG is said once at INFO, not at every check.
    refusal_logged: AtomicBool,
}

impl Default for EvictionWatch {
    fn default() -> Self {
        Self {
            finding: Mutex::new(Finding::NotChecked),
            refusal_logged: AtomicBool::new(false),
        }
    }
}

impl EvictionWatch {
    pub fn finding(&self) -> Finding {
        match self.finding.lock() {
            Ok(f) => f.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Keeps `new`, logging what changed.
    fn record(&self, new: Finding, target: &str) {
        let old = {
            let mut current = match self.finding.lock() {
                Ok(f) => f,
                Err(poisoned) => poisoned.into_inner(),
            };
            std::mem::replace(&mut *current, new.clone())
        };
        match &new {
            Finding::Read(_) if !new.unsafe_nodes().is_empty() => {
                if old.unsafe_nodes() != new.unsafe_nodes() {
                    warn!(
                        redis = %target,
                        "Redis maxmemory-policy is {}: Redis may evict counters, which \
                         silently resets their limits; {FIX}",
                        new.describe_unsafe()
                    );
                }
            }
            Finding::Read(_) => {
                if !old.unsafe_nodes().is_empty() {
                    info!(redis = %target, "Redis maxmemory-policy is noeviction again");
                }
            }
            Finding::Refused(reason) => {
                if !self.refusal_logged.swap(true, Ordering::Relaxed) {
                    info!(
                        redis = %target,
                        reason = %reason,
                        "cannot read Redis maxmemory-policy; make sure it is noeviction, or \
                         evicted counters reset their limits"
                    );
                }
            }
            Finding::NotChecked => {}
        }
    }

    /// Publishes the gauges: unsafe 0/1, and 1 for each policy label seen (0 for the others,
    /// so a policy that changed does not linger).
    pub fn report(&self, m: &Metrics) {
        let finding = self.finding();
        let unsafe_now = !finding.unsafe_nodes().is_empty();
        m.gauge(metrics::REDIS_EVICTION_UNSAFE, &[])
            .set(if unsafe_now { 1.0 } else { 0.0 });
        let seen: BTreeSet<&str> = match &finding {
            Finding::Read(nodes) => nodes.iter().map(|(_, p)| label(p)).collect(),
            _ => BTreeSet::from([UNKNOWN]),
        };
        for policy in KNOWN.iter().copied().chain([OTHER, UNKNOWN]) {
            let value = if seen.contains(policy) { 1.0 } else { 0.0 };
            m.gauge(metrics::REDIS_EVICTION_POLICY, &[("policy", policy)])
                .set(value);
        }
    }
}

/// Whether an error came from Redis answering (CONFIG renamed, not permitted), rather than
/// from the way there (a lost connection, a timeout), which a later check may get past.
fn answered(e: &Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Unknown
            | ErrorKind::InvalidCommand
            | ErrorKind::InvalidArgument
            | ErrorKind::Auth
    )
}

/// The policy in a `CONFIG GET maxmemory-policy` reply (pairs in RESP2, a map in RESP3).
fn policy_of(reply: Value) -> Result<String, String> {
    let pairs: HashMap<String, String> = reply
        .convert()
        .map_err(|e| format!("unexpected CONFIG GET reply: {e}"))?;
    pairs
        .into_iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("maxmemory-policy"))
        .map(|(_, policy)| policy)
        .ok_or_else(|| "CONFIG GET maxmemory-policy returned nothing".to_string())
}

/// Asks every node once. `None` when no answer came (Redis not reachable): nothing changes.
async fn read(shared: &Shared, timeout: Duration) -> Option<Finding> {
    let client = shared.pool.next();
    // On a cluster each master has its own setting; fred's routing table names them.
    let nodes: Vec<Option<Server>> = if shared.clustered {
        let masters = client
            .cached_cluster_state()
            .map(|state| state.unique_primary_nodes())
            .unwrap_or_default();
        if masters.is_empty() {
            return None;
        }
        masters.into_iter().map(Some).collect()
    } else {
        vec![None]
    };
    let mut found = Vec::with_capacity(nodes.len());
    for node in nodes {
        let name = node
            .as_ref()
            .map(|s| format!("{}:{}", s.host, s.port))
            .unwrap_or_else(|| shared.target.clone());
        let options = Options {
            // Generous: the check is off the request path, and the request-sized
            // command timeout (10 ms by default) would turn a busy moment into no answer.
            timeout: Some(timeout),
            cluster_node: node,
            ..Default::default()
        };
        let command = CustomCommand::new("CONFIG", ClusterHash::Random, false);
        let reply = client
            .with_options(&options)
            .custom::<Value, _>(command, vec!["GET", "maxmemory-policy"])
            .await;
        match reply {
            Ok(reply) => match policy_of(reply) {
                Ok(policy) => found.push((name, policy)),
                Err(reason) => return Some(Finding::Refused(format!("{name}: {reason}"))),
            },
            Err(e) if answered(&e) => {
                return Some(Finding::Refused(format!("{name}: {}", describe(&e, None))));
            }
            Err(e) => {
                debug!(redis = %name, error = %describe(&e, None), "cannot read maxmemory-policy now");
                return None;
            }
        }
    }
    Some(Finding::Read(found))
}

/// One check: reads the policy and records it (logging what changed).
async fn check(shared: &Shared, watch: &EvictionWatch, timeout: Duration) {
    if let Some(finding) = read(shared, timeout).await {
        watch.record(finding, &shared.target);
    }
}

/// The check at connect (when Redis is reachable), the refusal of `redis.require_noeviction`,
/// and the periodic check started in the background. The background task ends once the
/// store is dropped.
pub(super) async fn start(
    shared: &Arc<Shared>,
    reachable: bool,
    settings: &RedisSettings,
) -> Result<Arc<EvictionWatch>, RedisSetupError> {
    let watch = Arc::new(EvictionWatch::default());
    let timeout = settings.connect_timeout.max(Duration::from_secs(1));
    if reachable {
        check(shared, &watch, timeout).await;
    }
    if settings.require_noeviction
        && let Some(refusal) = watch.finding().refusal()
    {
        return Err(RedisSetupError::EvictionPolicy(refusal));
    }
    let period = settings.eviction_check_interval;
    let weak: Weak<Shared> = Arc::downgrade(shared);
    let watching = watch.clone();
    tokio::spawn(async move {
        loop {
            let wait = match watching.finding() {
                Finding::NotChecked => RETRY.min(period),
                _ => period,
            };
            tokio::time::sleep(wait).await;
            let Some(shared) = weak.upgrade() else { return };
            check(&shared, &watching, timeout).await;
        }
    });
    Ok(watch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(policies: &[&str]) -> Finding {
        Finding::Read(
            policies
                .iter()
                .enumerate()
                .map(|(i, p)| (format!("127.0.0.1:{}", 7000 + i), p.to_string()))
                .collect(),
        )
    }

    #[test]
    fn labels_are_a_fixed_set() {
        assert_eq!(label("allkeys-lru"), "allkeys-lru");
        assert_eq!(label("NOEVICTION"), "noeviction");
        assert_eq!(label("allkeys-{evil}\"label"), "other");
        assert_eq!(label(""), "other");
    }

    #[test]
    fn only_noeviction_everywhere_is_safe() {
        assert_eq!(read(&["noeviction", "noeviction"]).warning(), None);
        assert_eq!(read(&["noeviction"]).refusal(), None);
        assert_eq!(Finding::NotChecked.warning(), None);
        assert_eq!(Finding::NotChecked.refusal(), None);
        for policy in ["allkeys-lru", "volatile-ttl", "something-new"] {
            let finding = read(&["noeviction", policy]);
            let warning = finding.warning().expect("a warning");
            assert!(
                warning.contains(&format!("{policy} on 127.0.0.1:7001")),
                "{warning}"
            );
            assert!(!warning.contains("7000"), "{warning}");
            assert!(warning.contains("CONFIG SET maxmemory-policy noeviction"));
            let refusal = finding.refusal().expect("a refusal");
            assert!(refusal.contains(policy) && refusal.contains("require_noeviction"));
        }
        let refused = Finding::Refused("ERR unknown command 'CONFIG'".into());
        assert!(refused.warning().expect("a warning").contains("unknown"));
        assert!(
            refused
                .refusal()
                .expect("a refusal")
                .contains("could not be read")
        );
    }

    #[test]
    fn a_config_get_reply_gives_the_policy() {
        let pairs = Value::Array(vec![
            Value::from("maxmemory-policy"),
            Value::from("allkeys-lru"),
        ]);
        assert_eq!(policy_of(pairs), Ok("allkeys-lru".to_string()));
        assert!(policy_of(Value::Array(vec![])).is_err());
    }
}
