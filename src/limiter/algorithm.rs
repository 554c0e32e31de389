//! The counting algorithms as pure functions: previous state, `now`, hits in; outcome and
//! next state out. No clock, no storage, no locking here, so the memory store, the fallback
//! and the conformance tests all run exactly the same code, and the Redis Lua scripts can be
//! checked against it step by step.

use super::{Algorithm, HitMode, Outcome, Threshold};

/// State of a `fixed_window` counter: which window it counts and how many hits it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedWindow {
    /// Start of the window, ms since the epoch (`now - now % period`).
    pub window: u64,
    pub count: u64,
}

impl FixedWindow {
    /// When the state stops mattering: the end of its window.
    pub fn expires_at(&self, threshold: &Threshold) -> u64 {
        self.window.saturating_add(threshold.period_ms())
    }
}

/// `fixed_window`:
///
/// ```text
/// window    = now - now % period
/// count     = count_in(window) + hits          (hits are counted even when over)
/// over      = count > limit
/// remaining = max(0, limit - count)
/// reset     = window + period - now
/// ```
///
/// Windows are aligned to the epoch, so every replica and Redis agree on them. Giving hits
/// back (`HitMode::Give`) subtracts, never below zero. Zero hits checks without counting, and
/// is over when nothing is left (`count >= limit`): the check of a budget charged later.
pub fn fixed_window(
    prev: Option<FixedWindow>,
    now: u64,
    threshold: &Threshold,
    hits: u64,
    mode: HitMode,
) -> (Outcome, FixedWindow) {
    let period = threshold.period_ms();
    let window = now - now % period;
    let before = match prev {
        Some(state) if state.window == window => state.count,
        _ => 0,
    };
    let count = match mode {
        HitMode::Take | HitMode::Charge => before.saturating_add(hits),
        HitMode::Give => before.saturating_sub(hits),
    };
    // A check (zero hits) asks whether one more hit would pass: over when nothing is left.
    let checking = mode == HitMode::Take && hits == 0;
    let outcome = Outcome {
        over: count > threshold.limit || (checking && count >= threshold.limit),
        remaining: threshold.limit.saturating_sub(count),
        reset_ms: window.saturating_add(period) - now,
    };
    (outcome, FixedWindow { window, count })
}

/// State of a `sliding_window` counter: the hits admitted in its current window and in the
/// window before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlidingWindow {
    pub window: u64,
    pub curr: u64,
    pub prev: u64,
}

/// `sliding_window`: the previous window's count weighted by the part of it still
/// inside the sliding period, plus the current window's count.
///
/// ```text
/// window    = now - now % period,  elapsed = now - window
/// estimate  = ceil(prev * (period - elapsed) / period) + curr
/// admitted  = estimate + max(hits, 1) <= limit   (only admitted hits are counted; 0 checks)
/// remaining = limit - (estimate + hits if admitted else estimate)
/// reset     = admitted: window + period - now
///             over: the first ms at which the decaying previous window lets `hits` pass,
///                   or the end of the window when the current window alone is too full
/// ```
///
/// The approximation (the previous window's hits taken as spread evenly over it) is the usual
/// one of Cloudflare and others; rounding the weighted count up keeps it on the safe side, so
/// with evenly spread traffic no span of one period admits more than `limit`. Traffic bunched
/// at the start of the previous window can still see up to that window's unweighted share
/// pass early, which is the documented price of keeping two counters instead of a log. The arithmetic is done in `f64` on integers below 2^53, exactly
/// as the Lua twin does it, so both give the same answers.
pub fn sliding_window(
    prev: Option<SlidingWindow>,
    now: u64,
    threshold: &Threshold,
    hits: u64,
    mode: HitMode,
) -> (Outcome, SlidingWindow) {
    let period = threshold.period_ms();
    let limit = threshold.limit;
    let window = now - now % period;
    let elapsed = now - window;
    let (curr, before) = match prev {
        Some(s) if s.window == window => (s.curr, s.prev),
        Some(s) if s.window.saturating_add(period) == window => (0, s.curr),
        _ => (0, 0),
    };
    let weighted = weighted_previous(before, period, elapsed);
    let end = window.saturating_add(period) - now;
    let estimate = weighted.saturating_add(curr);
    let (outcome, curr) = match mode {
        HitMode::Give => {
            let curr = curr.saturating_sub(hits);
            let estimate = weighted.saturating_add(curr);
            (
                Outcome {
                    over: estimate > limit,
                    remaining: limit.saturating_sub(estimate),
                    reset_ms: end,
                },
                curr,
            )
        }
        // Admitted elsewhere already: counted whatever the estimate says.
        HitMode::Charge => {
            let after = estimate.saturating_add(hits);
            (
                Outcome {
                    over: after > limit,
                    remaining: limit.saturating_sub(after),
                    reset_ms: end,
                },
                curr.saturating_add(hits),
            )
        }
        HitMode::Take => {
            let after = estimate.saturating_add(hits);
            // A check (zero hits) passes only when one more hit would.
            if estimate.saturating_add(hits.max(1)) <= limit {
                (
                    Outcome {
                        over: false,
                        remaining: limit - after,
                        reset_ms: end,
                    },
                    curr + hits,
                )
            } else {
                let reset_ms =
                    sliding_retry(limit, curr, before, hits.max(1), period, elapsed).unwrap_or(end);
                (
                    Outcome {
                        over: true,
                        remaining: limit.saturating_sub(estimate),
                        reset_ms,
                    },
                    curr,
                )
            }
        }
    };
    (
        outcome,
        SlidingWindow {
            window,
            curr,
            prev: before,
        },
    )
}

/// `ceil(prev * (period - elapsed) / period)`, in the same `f64` steps as the Lua script.
fn weighted_previous(prev: u64, period: u64, elapsed: u64) -> u64 {
    ((prev as f64) * ((period - elapsed) as f64) / (period as f64)).ceil() as u64
}

/// When the previous window has decayed enough for `hits` to pass in this window, as ms from
/// now; `None` when only the next window can admit them.
fn sliding_retry(
    limit: u64,
    curr: u64,
    prev: u64,
    hits: u64,
    period: u64,
    elapsed: u64,
) -> Option<u64> {
    let need = limit.checked_sub(curr.checked_add(hits)?)?;
    if prev == 0 {
        return None;
    }
    // The first offset e in the window with ceil(prev * (period - e) / period) <= need,
    // that is prev * (period - e) / period <= need.
    let at = ((period as f64) - (need as f64) * (period as f64) / (prev as f64)).ceil();
    let at = if at < 0.0 { 0 } else { at as u64 };
    (at < period).then(|| at.saturating_sub(elapsed).max(1))
}

/// State of a `token_bucket` counter: the theoretical arrival time, in µs since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    pub tat_us: u64,
}

/// `token_bucket`, as GCRA, in whole microseconds:
///
/// ```text
/// T         = floor(period_us / limit)   (emission interval, at least 1 µs)
/// capacity  = burst * T                  (burst defaults to limit)
/// tat       = max(stored tat, now)
/// admitted  = tat + max(hits, 1) * T - now <= capacity   (only admitted hits move tat)
/// remaining = floor((capacity - (tat' - now)) / T)   tokens left after the answer
/// reset     = admitted: until the bucket is full again (tat' - now)
///             over: until `hits` tokens are there (tat + hits * T - capacity - now)
/// ```
///
/// Microsecond integers keep every value below 2^53, so the Lua twin (whose numbers are
/// doubles) computes exactly the same; a limit of 0 rejects everything.
pub fn token_bucket(
    prev: Option<TokenBucket>,
    now: u64,
    threshold: &Threshold,
    hits: u64,
    mode: HitMode,
) -> (Outcome, TokenBucket) {
    let period_us = threshold.period_ms().saturating_mul(1000);
    let now_us = now.saturating_mul(1000);
    let stored = prev.map(|p| p.tat_us).unwrap_or(now_us);
    if threshold.limit == 0 {
        let state = TokenBucket { tat_us: stored };
        return (
            Outcome {
                over: true,
                remaining: 0,
                reset_ms: threshold.period_ms(),
            },
            state,
        );
    }
    let interval = (period_us / threshold.limit).max(1);
    let capacity = threshold
        .burst
        .unwrap_or(threshold.limit)
        .saturating_mul(interval);
    let tat = stored.max(now_us);
    let cost = hits.saturating_mul(interval);
    let ms = |us: u64| us.div_ceil(1000);
    match mode {
        HitMode::Give => {
            let tat = tat.saturating_sub(cost).max(now_us);
            let used = tat - now_us;
            (
                Outcome {
                    over: false,
                    remaining: capacity.saturating_sub(used) / interval,
                    reset_ms: ms(used),
                },
                TokenBucket { tat_us: tat },
            )
        }
        // Admitted elsewhere already: the tokens are spent whatever the bucket holds.
        HitMode::Charge => {
            let next = tat.saturating_add(cost);
            let used = next - now_us;
            (
                Outcome {
                    over: used > capacity,
                    remaining: capacity.saturating_sub(used) / interval,
                    reset_ms: ms(used),
                },
                TokenBucket { tat_us: next },
            )
        }
        HitMode::Take => {
            let next = tat.saturating_add(cost);
            // A check (zero hits) passes only when a whole token is there.
            let judged = tat.saturating_add(hits.max(1).saturating_mul(interval));
            if judged - now_us <= capacity {
                let used = next - now_us;
                (
                    Outcome {
                        over: false,
                        remaining: (capacity - used) / interval,
                        reset_ms: ms(used),
                    },
                    TokenBucket { tat_us: next },
                )
            } else {
                let used = tat - now_us;
                (
                    Outcome {
                        over: true,
                        remaining: capacity.saturating_sub(used) / interval,
                        reset_ms: ms(judged - capacity - now_us),
                    },
                    TokenBucket { tat_us: tat },
                )
            }
        }
    }
}

/// A lease takes at most this share of what a counter has left (but always the hits of the
/// request that asks): as the counter nears its limit, blocks shrink towards one hit, so the
/// last hits of a window are counted exactly and no replica strands much of the rest.
pub const LEASE_SHARE: u64 = 8;

/// How many hits a lease takes: the block asked for (at least `hits`), at most what is
/// `left`, and at most [`LEASE_SHARE`]'s part of it unless `hits` alone needs more.
fn lease_grant(hits: u64, block: u64, left: u64) -> u64 {
    block
        .max(hits)
        .min(left)
        .min(hits.max(left.div_ceil(LEASE_SHARE)))
}

/// `fixed_window` with a lease: when the window can admit `hits`, take a block (see
/// [`lease_grant`]) instead, all counted at once; otherwise exactly [`fixed_window`] (the
/// hits are counted, and the answer is over). Returns the hits taken (0 when over).
///
/// ```text
/// left    = max(0, limit - count_in(window))
/// granted = hits <= left ? min(max(block, hits), left, max(hits, ceil(left / 8))) : 0
/// count   = count_in(window) + (granted, or hits when over)
/// ```
pub fn fixed_window_lease(
    prev: Option<FixedWindow>,
    now: u64,
    threshold: &Threshold,
    hits: u64,
    block: u64,
) -> (Outcome, FixedWindow, u64) {
    let period = threshold.period_ms();
    let window = now - now % period;
    let before = match prev {
        Some(state) if state.window == window => state.count,
        _ => 0,
    };
    let left = threshold.limit.saturating_sub(before);
    if hits > left {
        let (outcome, state) = fixed_window(prev, now, threshold, hits, HitMode::Take);
        return (outcome, state, 0);
    }
    let granted = lease_grant(hits, block, left);
    let count = before + granted;
    let outcome = Outcome {
        over: false,
        remaining: threshold.limit - count,
        reset_ms: window.saturating_add(period) - now,
    };
    (outcome, FixedWindow { window, count }, granted)
}

/// `token_bucket` with a lease: when the bucket holds `hits` tokens, take a block of them
/// (see [`lease_grant`]) at once; otherwise exactly [`token_bucket`] (over, state unchanged).
/// Returns the tokens taken (0 when over).
///
/// ```text
/// available = floor((capacity - (tat - now)) / T)
/// granted   = hits <= available ? min(max(block, hits), available, max(hits, ceil(available / 8))) : 0
/// tat'      = tat + granted * T
/// ```
pub fn token_bucket_lease(
    prev: Option<TokenBucket>,
    now: u64,
    threshold: &Threshold,
    hits: u64,
    block: u64,
) -> (Outcome, TokenBucket, u64) {
    let period_us = threshold.period_ms().saturating_mul(1000);
    let now_us = now.saturating_mul(1000);
    if threshold.limit == 0 {
        let (outcome, state) = token_bucket(prev, now, threshold, hits, HitMode::Take);
        return (outcome, state, 0);
    }
    let interval = (period_us / threshold.limit).max(1);
    let capacity = threshold
        .burst
        .unwrap_or(threshold.limit)
        .saturating_mul(interval);
    let tat = prev.map(|p| p.tat_us).unwrap_or(now_us).max(now_us);
    let available = capacity.saturating_sub(tat - now_us) / interval;
    if hits > available {
        let (outcome, state) = token_bucket(prev, now, threshold, hits, HitMode::Take);
        return (outcome, state, 0);
    }
    let granted = lease_grant(hits, block, available);
    let next = tat + granted * interval;
    let used = next - now_us;
    let outcome = Outcome {
        over: false,
        remaining: (capacity - used) / interval,
        reset_ms: used.div_ceil(1000),
    };
    (outcome, TokenBucket { tat_us: next }, granted)
}

/// Takes a lease of up to `block` hits on a `fixed_window` or `token_bucket` counter (a
/// `sliding_window` is never leased: the configuration refuses it, and this falls back to
/// counting `hits`). Returns what [`apply`] returns, and the hits taken.
pub fn apply_lease(
    algorithm: Algorithm,
    prev: Option<CounterState>,
    now: u64,
    threshold: &Threshold,
    hits: u64,
    block: u64,
) -> (Outcome, CounterState, u64, u64) {
    match algorithm {
        Algorithm::FixedWindow => {
            let prev = match prev {
                Some(CounterState::Fixed(s)) => Some(s),
                _ => None,
            };
            let (out, next, granted) = fixed_window_lease(prev, now, threshold, hits, block);
            let expires = next.expires_at(threshold);
            (out, CounterState::Fixed(next), expires, granted)
        }
        Algorithm::TokenBucket => {
            let prev = match prev {
                Some(CounterState::Bucket(s)) => Some(s),
                _ => None,
            };
            let (out, next, granted) = token_bucket_lease(prev, now, threshold, hits, block);
            let expires = next.tat_us.div_ceil(1000).max(now + 1);
            (out, CounterState::Bucket(next), expires, granted)
        }
        Algorithm::SlidingWindow | Algorithm::Concurrent => {
            let (out, next, expires) = apply(algorithm, prev, now, threshold, hits, HitMode::Take);
            let granted = if out.over { 0 } else { hits };
            (out, next, expires, granted)
        }
    }
}

/// The state of one counter, whatever its algorithm. A counter whose route changed
/// algorithm on reload finds state of another kind and starts afresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterState {
    Fixed(FixedWindow),
    Sliding(SlidingWindow),
    Bucket(TokenBucket),
}

/// Runs `algorithm` on `prev` and returns the outcome, the next state and the time (ms since
/// the epoch) after which the next state no longer matters and may be dropped.
pub fn apply(
    algorithm: Algorithm,
    prev: Option<CounterState>,
    now: u64,
    threshold: &Threshold,
    hits: u64,
    mode: HitMode,
) -> (Outcome, CounterState, u64) {
    match algorithm {
        Algorithm::FixedWindow => {
            let prev = match prev {
                Some(CounterState::Fixed(s)) => Some(s),
                _ => None,
            };
            let (out, next) = fixed_window(prev, now, threshold, hits, mode);
            (out, CounterState::Fixed(next), next.expires_at(threshold))
        }
        Algorithm::SlidingWindow => {
            let prev = match prev {
                Some(CounterState::Sliding(s)) => Some(s),
                _ => None,
            };
            let (out, next) = sliding_window(prev, now, threshold, hits, mode);
            // It still matters as the previous window of the next one.
            let expires = next
                .window
                .saturating_add(threshold.period_ms().saturating_mul(2));
            (out, CounterState::Sliding(next), expires)
        }
        Algorithm::TokenBucket => {
            let prev = match prev {
                Some(CounterState::Bucket(s)) => Some(s),
                _ => None,
            };
            let (out, next) = token_bucket(prev, now, threshold, hits, mode);
            // Once full again the state says nothing a fresh bucket would not.
            let expires = next.tat_us.div_ceil(1000).max(now + 1);
            (out, CounterState::Bucket(next), expires)
        }
        // Slots are not windowed state: stores keep them apart and call
        // [`super::concurrency::concurrent`]. Reached only by a caller that did not, which is
        // then answered as a counter holding no slot.
        Algorithm::Concurrent => {
            let (out, _, _) = super::concurrency::concurrent(None, now, threshold, hits, mode);
            (
                out,
                CounterState::Fixed(FixedWindow {
                    window: now,
                    count: 0,
                }),
                now + 1,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::Unit;

    const MIN: u64 = 60_000;

    #[test]
    fn counts_up_to_limit_then_over_and_resets_at_the_aligned_boundary() {
        let t = Threshold::new(3, Unit::Minute);
        let mut state = None;
        let now = 10 * MIN + 15_000;
        let mut outcomes = Vec::new();
        for _ in 0..4 {
            let (out, next) = fixed_window(state, now, &t, 1, HitMode::Take);
            state = Some(next);
            outcomes.push(out);
        }
        let remaining: Vec<u64> = outcomes.iter().map(|o| o.remaining).collect();
        assert_eq!(remaining, [2, 1, 0, 0]);
        assert!(!outcomes[2].over && outcomes[3].over);
        assert_eq!(outcomes[3].reset_ms, 45_000);

        let (out, _) = fixed_window(state, 11 * MIN, &t, 1, HitMode::Take);
        assert_eq!(
            out,
            Outcome {
                over: false,
                remaining: 2,
                reset_ms: MIN
            }
        );
    }

    #[test]
    fn zero_hits_checks_without_counting_and_give_never_goes_negative() {
        let t = Threshold::new(1, Unit::Second);
        let (_, s) = fixed_window(None, 5_000, &t, 1, HitMode::Take);
        // Nothing left: a check is over, and counts nothing.
        let (out, s2) = fixed_window(Some(s), 5_100, &t, 0, HitMode::Take);
        assert_eq!((out.over, out.remaining, s2.count), (true, 0, 1));
        let (out, s3) = fixed_window(Some(s2), 5_200, &t, 5, HitMode::Give);
        assert_eq!((out.over, out.remaining, s3.count), (false, 1, 0));
    }

    #[test]
    fn a_fixed_window_lease_takes_its_block_then_shrinks_to_the_last_hits() {
        let t = Threshold::new(100, Unit::Minute);
        let now = 10 * MIN;
        // 100 left: a block of 50 is capped at an eighth of what is left (13).
        let (out, s, granted) = fixed_window_lease(None, now, &t, 1, 50);
        assert_eq!((granted, out.remaining, out.over), (13, 87, false));
        // A block never passes what is left, and shrinks as the window fills.
        let mut state = s;
        let mut taken = 13;
        let mut grants = Vec::new();
        loop {
            let (out, next, granted) = fixed_window_lease(Some(state), now + 1, &t, 1, 50);
            state = next;
            if out.over {
                assert_eq!(granted, 0);
                break;
            }
            taken += granted;
            grants.push(granted);
        }
        assert_eq!(taken, 100, "the whole limit is leased, never more");
        assert_eq!(grants.last(), Some(&1), "the last hits go one by one");
        assert!(grants.windows(2).all(|w| w[0] >= w[1]), "{grants:?}");
        // Over: the hit is counted as a plain fixed window counts it.
        assert_eq!(state.count, 101);
    }

    #[test]
    fn a_lease_always_covers_the_hits_of_its_request() {
        let t = Threshold::new(100, Unit::Minute);
        let (out, s, granted) = fixed_window_lease(None, 0, &t, 40, 2);
        assert_eq!((granted, out.remaining, s.count), (40, 60, 40));
        let (out, _, granted) = fixed_window_lease(Some(s), 1, &t, 61, 2);
        assert_eq!((granted, out.over), (0, true));
    }

    #[test]
    fn a_token_bucket_lease_takes_only_tokens_that_are_there() {
        // 10 per second, a full bucket of 10.
        let t = Threshold::new(10, Unit::Second);
        let (out, s, granted) = token_bucket_lease(None, 1_000, &t, 1, 100);
        assert_eq!((granted, out.remaining), (2, 8));
        let (out, s, granted) = token_bucket_lease(Some(s), 1_000, &t, 8, 1);
        assert_eq!((granted, out.remaining), (8, 0));
        let (out, s2, granted) = token_bucket_lease(Some(s), 1_000, &t, 1, 5);
        assert_eq!((granted, out.over), (0, true));
        assert_eq!(s2, s, "a refused lease moves nothing");
        // 100 ms later one token is back.
        let (out, _, granted) = token_bucket_lease(Some(s), 1_100, &t, 1, 5);
        assert_eq!((granted, out.over, out.remaining), (1, false, 0));
    }
}
