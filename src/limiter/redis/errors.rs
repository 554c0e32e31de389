//! What a Redis error means for sluice: refused credentials (fatal at start), a lost script
//! cache (NOSCRIPT: load and resend), a replica's refusal (READONLY), and the refusals of a
//! Redis that is up and cannot count (OOM, NOAUTH, ...), each with a fixed label and what to do.

use fred::prelude::*;

use super::describe;
use crate::limiter::StoreError;

/// Whether Redis itself refused the credentials, which retrying cannot fix. Decided from
/// Redis's reply (fred maps `WRONGPASS` and `NOAUTH` to an auth error), never from words in
/// a message: a connect error to a host named `auth-cache` is not a refusal.
pub(super) fn refused_credentials(e: &Error) -> bool {
    matches!(e.kind(), ErrorKind::Auth)
        || e.details().starts_with("WRONGPASS")
        || e.details().starts_with("NOAUTH")
        // A password given to a Redis that has none: a configuration error as well.
        || (e.details().starts_with("ERR AUTH") && e.details().contains("without any password"))
}

pub(crate) fn is_noscript(e: &Error) -> bool {
    e.details().starts_with("NOSCRIPT") || e.to_string().contains("NOSCRIPT")
}

/// A write refused by a replica (directly, or from inside the script).
pub(crate) fn is_readonly(e: &Error) -> bool {
    e.details().starts_with("READONLY") || e.to_string().contains("READONLY You can't write")
}

pub(super) fn store_error(e: &Error) -> StoreError {
    let message = describe(e, None);
    if matches!(e.kind(), ErrorKind::Timeout) {
        return StoreError::Timeout;
    }
    match refusal(&message) {
        Some((kind, advice)) => StoreError::Refused {
            kind,
            detail: format!("Redis refuses to count ({message}): {advice}"),
        },
        None => StoreError::Unavailable(message),
    }
}

/// The errors of a Redis that is up and still cannot count, each with a fixed label and what
/// the operator can do. Read from Redis's own error codes (the first word of its reply, which
/// fred keeps in the message; inside a script's error too).
pub(super) fn refusal(message: &str) -> Option<(&'static str, &'static str)> {
    const KNOWN: [(&str, &str, &str); 8] = [
        (
            "OOM",
            "oom",
            "Redis is at maxmemory and refuses writes; raise maxmemory or free memory (with maxmemory-policy noeviction, which keeps counters from being evicted)",
        ),
        (
            "READONLY",
            "readonly",
            "the node sluice writes to is a replica (a failover demoted it, or redis.url names a replica); point redis.url at the master or at the sentinels",
        ),
        (
            "NOAUTH",
            "noauth",
            "Redis requires a password sluice did not send; set redis.password (SLUICE_REDIS_PASSWORD or redis.password_file) and redis.username if ACLs are used",
        ),
        (
            "WRONGPASS",
            "noauth",
            "Redis refused the credentials; check redis.username and redis.password",
        ),
        (
            "NOPERM",
            "noperm",
            "the Redis user may not run the counting script; allow EVALSHA, SCRIPT and the keys sluice:* for it",
        ),
        (
            "MISCONF",
            "misconf",
            "Redis refuses writes because it cannot save its snapshot (stop-writes-on-bgsave-error); fix its disk or persistence settings",
        ),
        (
            "LOADING",
            "loading",
            "Redis is loading its dataset; it counts again once loaded",
        ),
        (
            "CLUSTERDOWN",
            "clusterdown",
            "the Redis Cluster is down (slots without a master); it counts again once every slot is served",
        ),
    ];
    KNOWN
        .iter()
        .find(|(code, _, _)| {
            message.starts_with(code)
                || message.contains(&format!(" {code} "))
                || message.contains(&format!("-{code} "))
        })
        .map(|(_, kind, advice)| (*kind, *advice))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_redis_refusing_the_credentials_is_a_credentials_error() {
        for refused in [
            Error::new(ErrorKind::Auth, "WRONGPASS invalid username-password pair"),
            Error::new(ErrorKind::Unknown, "NOAUTH Authentication required."),
            Error::new(
                ErrorKind::Unknown,
                "ERR AUTH <password> called without any password configured for the default user.",
            ),
        ] {
            assert!(refused_credentials(&refused), "{refused:?}");
        }
        // Words in a connect error are not a refusal: the host may be called auth-cache.
        for other in [
            Error::new(
                ErrorKind::IO,
                "connect to auth-cache:6379: connection refused",
            ),
            Error::new(ErrorKind::IO, "AUTH timed out"),
            Error::new(ErrorKind::Timeout, "Request timed out after AUTH"),
            Error::new(ErrorKind::Unknown, "ERR unknown command 'AUTHX'"),
        ] {
            assert!(!refused_credentials(&other), "{other:?}");
        }
    }
}
