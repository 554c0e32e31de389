//! The counting algorithms as pure functions: previous state, `now`, hits in; outcome and
//! next state out. No clock, no storage, no locking here, so the memory store, the fallback
//! and the conformance tests all run exactly the same code, and the Redis Lua scripts can be
//! checked against it step by step.

use serde::{Deserialize, Serialize};

use super::{HitMode, Outcome, Threshold};

/// Which algorithm a route counts with (`algorithm:` in the limits, inherited like every
/// route setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Windows aligned to the epoch; what envoyproxy/ratelimit does.
    #[default]
    FixedWindow,
    SlidingWindow,
    TokenBucket,
}

impl Algorithm {
    pub const fn as_str(self) -> &'static str {
        match self {
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::TokenBucket => "token_bucket",
        }
    }
}

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

/// `fixed_window` (DESIGN §3):
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
/// back (`HitMode::Give`) subtracts, never below zero. Zero hits checks without counting.
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
        HitMode::Take => before.saturating_add(hits),
        HitMode::Give => before.saturating_sub(hits),
    };
    let outcome = Outcome {
        over: count > threshold.limit,
        remaining: threshold.limit.saturating_sub(count),
        reset_ms: window.saturating_add(period) - now,
    };
    (outcome, FixedWindow { window, count })
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
        let (out, s2) = fixed_window(Some(s), 5_100, &t, 0, HitMode::Take);
        assert_eq!((out.over, out.remaining, s2.count), (false, 0, 1));
        let (out, s3) = fixed_window(Some(s2), 5_200, &t, 5, HitMode::Give);
        assert_eq!((out.over, out.remaining, s3.count), (false, 1, 0));
    }
}

/// The state of one counter, whatever its algorithm. A counter whose route changed
/// algorithm on reload finds state of another kind and starts afresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterState {
    Fixed(FixedWindow),
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
        // sliding_window and token_bucket are refused at config load until they have their
        // own functions here (issue 6); counting them as fixed windows keeps this total.
        Algorithm::FixedWindow | Algorithm::SlidingWindow | Algorithm::TokenBucket => {
            let prev = prev.map(|CounterState::Fixed(s)| s);
            let (out, next) = fixed_window(prev, now, threshold, hits, mode);
            (out, CounterState::Fixed(next), next.expires_at(threshold))
        }
    }
}
