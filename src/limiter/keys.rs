//! The Redis key scheme, in one place: `sluice:{<counter id>}:<suffix>`.
//!
//! The braces are a Redis Cluster hash tag, so every key of one counter (the two windows a
//! sliding window reads, say) lands in one slot and one script can touch them atomically,
//! while different counters spread over the cluster. Counter ids are already safe to embed
//! (the matcher hashes anything that is not short plain text), so no value can break the tag.

use std::fmt::Write as _;

use super::Algorithm;

/// The key of one window of a windowed counter; `window` is its start (ms since the epoch).
pub fn window(counter: &str, window: u64) -> String {
    let mut key = String::with_capacity(counter.len() + 32);
    let _ = write!(key, "sluice:{{{counter}}}:{window}");
    key
}

/// The keys a script call of `algorithm` reads at `now`: the first, and for a sliding window
/// the previous window's (for a concurrency counter, its slot ids). A period longer than the time since the epoch has no previous
/// window; a key that is never written stands in for it, so it cannot alias this window's.
pub fn for_call(
    counter: &str,
    algorithm: Algorithm,
    period: u64,
    now: u64,
) -> (String, Option<String>) {
    let start = now - now % period;
    match algorithm {
        Algorithm::TokenBucket => (format!("sluice:{{{counter}}}:tb"), None),
        // The slots (a sorted set) and the last slot id handed out, in one slot of a cluster.
        Algorithm::Concurrent => (
            format!("sluice:{{{counter}}}:slots"),
            Some(format!("sluice:{{{counter}}}:seq")),
        ),
        Algorithm::FixedWindow => (window(counter, start), None),
        Algorithm::SlidingWindow => (
            window(counter, start),
            Some(match start.checked_sub(period) {
                Some(previous) => window(counter, previous),
                None => format!("sluice:{{{counter}}}:none"),
            }),
        ),
    }
}
