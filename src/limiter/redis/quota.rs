//! RLQS quota shares in Redis: one `EVALSHA` of `lua/quota.lua` per bucket report, on the
//! keys of the bucket's counter (one hash tag, so one slot of a cluster).
//!
//! Reports come every few seconds per Envoy, not per request, so these calls skip the
//! request path's batching dispatcher and go straight to a connection.

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand, Value};

use super::{RedisStore, describe, is_noscript, store_error};
use crate::limiter::StoreError;
use crate::limiter::quota::{DEMAND_TTL_MS, MAX_CLIENTS, QuotaFuture, QuotaOp, QuotaStore};

const SCRIPT: &str = include_str!("../lua/quota.lua");

/// The demand table of a bucket's counter, and the key of one window of one of its limits.
fn keys(op: &QuotaOp, now: u64) -> Vec<String> {
    let mut keys = Vec::with_capacity(1 + op.limits.len());
    keys.push(format!("sluice:{{{}}}:q:demand", op.counter));
    for t in &op.limits {
        let period = t.period_ms().max(1);
        keys.push(format!(
            "sluice:{{{}}}:q{}:{}",
            op.counter,
            period / 1000,
            now - now % period
        ));
    }
    keys
}

async fn evalsha(store: &RedisStore, op: &QuotaOp, now: u64) -> Result<Value, Error> {
    let client = store.shared.pool.next_connected();
    if !client.is_connected() {
        return Err(Error::new(
            ErrorKind::IO,
            format!("no connection to {} is up", store.shared.target),
        ));
    }
    store.shared.follower.check(client)?;
    let keys = keys(op, now);
    let slot = fred::util::redis_keyslot(keys[0].as_bytes());
    let command = CustomCommand::new_static("EVALSHA", ClusterHash::Custom(slot), false);
    let int = |v: u64| Value::Integer(i64::try_from(v).unwrap_or(i64::MAX));
    let mut args: Vec<Value> = Vec::with_capacity(10 + keys.len() + 2 * op.limits.len());
    args.push(Value::from(store.quota_sha.as_str()));
    args.push(int(keys.len() as u64));
    args.extend(keys.into_iter().map(Value::from));
    args.push(int(now));
    args.push(Value::from(op.client.as_str()));
    args.extend([
        int(op.rate),
        int(op.charge),
        int(op.want),
        int(DEMAND_TTL_MS),
        int(MAX_CLIENTS as u64),
    ]);
    for t in &op.limits {
        args.push(int(t.limit));
        args.push(int(t.period_ms().max(1)));
    }
    client.custom::<Value, _>(command, args).await
}

impl QuotaStore for RedisStore {
    fn share<'a>(&'a self, op: &'a mut QuotaOp, now: u64) -> QuotaFuture<'a> {
        Box::pin(async move {
            let mut reply = evalsha(self, op, now).await;
            if matches!(&reply, Err(e) if is_noscript(e)) {
                self.shared
                    .pool
                    .next()
                    .script_load_cluster::<Value, _>(SCRIPT)
                    .await
                    .map_err(|e| StoreError::Unavailable(describe(&e, None)))?;
                reply = evalsha(self, op, now).await;
            }
            let reply = reply.map_err(|e| store_error(&e))?;
            let bad = |what: String| {
                StoreError::BadReply(format!("expected {{granted, left, clients}}, got {what}"))
            };
            let Value::Array(items) = reply else {
                return Err(bad(reply.kind().to_string()));
            };
            let ints: Vec<u64> = items
                .iter()
                .map(|v| {
                    v.as_i64()
                        .map(|i| u64::try_from(i).unwrap_or(0))
                        .ok_or_else(|| bad(v.kind().to_string()))
                })
                .collect::<Result<_, _>>()?;
            let [granted, left, clients] = ints[..] else {
                return Err(bad(format!("{} integers", ints.len())));
            };
            // A reply cannot grant more than was asked, whatever Redis holds.
            op.granted = granted.min(op.want);
            op.left = left;
            op.clients = clients;
            Ok(())
        })
    }
}

/// The script's SHA, as Redis names it.
pub fn sha() -> String {
    fred::util::sha1_hash(SCRIPT)
}

/// The script, for loading at connect time.
pub fn script() -> &'static str {
    SCRIPT
}
