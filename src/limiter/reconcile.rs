//! Reconciliation: the fallback continues the store's count instead of restarting it, and
//! what it admitted is written back to the store once the store answers again.
//!
//! Two bounded maps, both keyed by counter id:
//! - **known**: what the store last said about each counter (hits used, and when). Every
//!   answer the store gives passes through here on its way up, so this costs one map update
//!   per counter call and no store call. When the fallback starts answering a counter, it
//!   seeds its local state from this (divided among `fallback.replicas`), so a limit 90% used
//!   in Redis is 90% used in the fallback too.
//! - **owed**: hits the fallback admitted and the store has not recorded yet, per window (the
//!   current and the previous one: no algorithm looks further back). A background flush
//!   sends them as [`HitMode::Charge`] calls, recorded unconditionally into the window that
//!   admitted them, then forgets them once the store acknowledged.
//!
//! A request the fallback answered because its deadline passed, whose call had already left,
//! is counted by the store too: the late reply is reported here ([`Ledger::forgive`]) and the
//! hits are no longer owed; if they had already been written back, they become credit, taken
//! from the next hits owed or given back to the store, so such a request is counted once.
//!
//! Errs towards limiting, never the other way: a flush that timed out but landed is charged
//! twice when resent; hits that are being flushed still count against the local answers; a
//! counter the owed map has no room for is refused rather than admitted unaccounted.
//!
//! Knows counters, thresholds and time; nothing of Redis or of the breaker.

use std::sync::atomic::{AtomicU64, Ordering};

use super::bounded::BoundedMap;
use super::{Algorithm, CounterOp, HitMode, Outcome, Source, Threshold};

/// What the store last said about a counter.
#[derive(Debug, Clone, Copy)]
struct Known {
    /// Hits the counter held after that answer (`limit - remaining`; the limit when over).
    used: u64,
    /// When the store answered (ms since the epoch): the seed is replayed at that time, so
    /// the algorithm ages it (a new window, a refilled bucket) as it would have aged there.
    at: u64,
    /// When the answer stops saying anything (the counter's reset).
    expires_at: u64,
    /// Whether the fallback has already started from this answer.
    seeded: bool,
}

/// Hits admitted in one window that the store has not recorded.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    /// Start of the window (ms since the epoch); 0 for a token bucket (no windows).
    start: u64,
    /// The last admission (ms since the epoch).
    last_at: u64,
    /// Admitted and not sent yet.
    hits: u64,
    /// Sent and not acknowledged yet.
    sending: u64,
    /// What the store had counted in this window when the fallback took over (the last answer
    /// before it): sent with the charge as a floor, so a store that lost its data (restarted
    /// empty, or evicted the key) gets the count back, not just what the fallback added. A
    /// floor raises the counter to at least itself, so every replica may send it.
    floor: u64,
    /// Hits the store counted for requests the fallback answered, that arrived after their
    /// owed hits had left in a write-back: the next hits owed in this window are taken from
    /// this first, so neither is counted twice.
    credit: u64,
}

impl Window {
    fn total(&self) -> u64 {
        self.hits.saturating_add(self.sending)
    }
}

/// A counter's unrecorded admissions: its current window and the one before.
#[derive(Debug, Clone, Copy)]
struct Owed {
    /// False for an entry made by a late store reply before its hits were owed: its
    /// algorithm and threshold come with the owing, which follows at once.
    described: bool,
    algorithm: Algorithm,
    threshold: Threshold,
    windows: [Window; 2],
}

/// One write-back call: the charge and the time to send it at.
#[derive(Debug, Clone)]
pub struct Charge {
    pub op: CounterOp,
    /// The `now` the store must count it at: inside the window that admitted it.
    pub at: u64,
    window: u64,
}

/// Totals for the metrics, published at scrape time.
#[derive(Debug, Default)]
pub struct LedgerStats {
    /// Hits the fallback admitted and owed to the store.
    pub owed: AtomicU64,
    /// Hits written back and acknowledged.
    pub written_back: AtomicU64,
    /// Hits whose window ended before they could be written back (they no longer limit
    /// anything, so there is nothing to write).
    pub expired: AtomicU64,
    /// Hits owed that the store turned out to have counted itself (a call that left before
    /// its request's deadline passed).
    pub forgiven: AtomicU64,
    /// Fallback takes refused because the owed map was full.
    pub refused: AtomicU64,
}

pub struct Ledger {
    known: BoundedMap<Known>,
    owed: BoundedMap<Owed>,
    stats: LedgerStats,
}

/// The window of `now` as this ledger keys it.
fn window_of(algorithm: Algorithm, threshold: &Threshold, now: u64) -> u64 {
    match algorithm {
        Algorithm::TokenBucket => 0,
        _ => {
            let period = threshold.period_ms();
            now - now % period
        }
    }
}

/// A counter that owes nothing (dropped at the next [`Ledger::forget_settled`]).
fn empty_owed() -> Owed {
    Owed {
        described: false,
        algorithm: Algorithm::FixedWindow,
        threshold: Threshold::new(0, super::Unit::Second),
        windows: [Window::default(); 2],
    }
}

/// Whether a counter's hits are reconciled: every windowed algorithm. Slots of a
/// `concurrent` counter are leases that expire by themselves and are never written back.
fn reconciled(op: &CounterOp) -> bool {
    op.algorithm != Algorithm::Concurrent
}

impl Ledger {
    /// Remembers at most `max_entries` counters in each map.
    pub fn new(max_entries: usize) -> Self {
        Self {
            known: BoundedMap::new(max_entries),
            owed: BoundedMap::new(max_entries),
            stats: LedgerStats::default(),
        }
    }

    pub fn stats(&self) -> &LedgerStats {
        &self.stats
    }

    /// Records what the store answered for each op of a batch.
    pub fn observe(&self, ops: &[CounterOp], now: u64) {
        for op in ops {
            if !reconciled(op) || !matches!(op.source, Source::Redis | Source::Lease) {
                continue;
            }
            self.observe_one(op, now);
        }
    }

    fn observe_one(&self, op: &CounterOp, now: u64) {
        let limit = op.threshold.limit;
        let used = if op.outcome.over {
            limit
        } else {
            limit.saturating_sub(op.outcome.remaining)
        };
        let expires_at = now.saturating_add(op.outcome.reset_ms.max(1));
        self.known.update(&op.counter, |_| {
            (
                (),
                Known {
                    used,
                    at: now,
                    expires_at,
                    seeded: false,
                },
            )
        });
    }

    /// The hits a fallback answer must start `op`'s counter from, once per store answer:
    /// `Some((hits, at))` when the store answered since the fallback last started from it.
    /// With `replicas` sharing the fallback, each starts from its share of what was used, plus
    /// what it admitted itself and has not written back.
    pub fn seed(&self, op: &CounterOp, now: u64, replicas: u64) -> Option<(u64, u64)> {
        if !reconciled(op) {
            return None;
        }
        let known = self.known.get(&op.counter)?;
        if known.seeded || known.expires_at <= now {
            return None;
        }
        self.known.update(&op.counter, |k| {
            let mut k = k.copied().unwrap_or(known);
            k.seeded = true;
            ((), k)
        });
        let mine = self.unrecorded(op, now);
        Some((
            known.used.div_ceil(replicas.max(1)).saturating_add(mine),
            known.at,
        ))
    }

    /// Hits admitted here for `op`'s counter in the window of `now` and not yet recorded.
    fn unrecorded(&self, op: &CounterOp, now: u64) -> u64 {
        let window = window_of(op.algorithm, &op.threshold, now);
        self.owed.get(&op.counter).map_or(0, |owed| {
            owed.windows
                .iter()
                .filter(|w| w.start == window)
                .map(Window::total)
                .sum()
        })
    }

    /// Owes the store the hits the fallback admitted for `op` at `now`. `false` when there is
    /// no room to remember them: the caller must refuse the hits instead of admitting them
    /// unaccounted.
    pub fn owe(&self, op: &CounterOp, now: u64) -> bool {
        if !reconciled(op) || op.mode != HitMode::Take || op.hits == 0 {
            return true;
        }
        let window = window_of(op.algorithm, &op.threshold, now);
        // The store's count in this window, as last answered (before the fallback took over:
        // nothing is observed while it answers).
        let known = self.known.get(&op.counter).filter(|k| {
            k.expires_at > now && window_of(op.algorithm, &op.threshold, k.at) == window
        });
        let stored = self.owed.try_update(&op.counter, |held| {
            let mut owed = held.copied().unwrap_or_else(empty_owed);
            // The configured threshold, whatever the local answer divided it into.
            owed.described = true;
            owed.algorithm = op.algorithm;
            owed.threshold = op.threshold;
            let slot = match owed.windows.iter().position(|w| w.start == window) {
                Some(i) => i,
                None => {
                    // The older of the two windows makes room: a window two back limits
                    // nothing any more.
                    let i = if owed.windows[0].start <= owed.windows[1].start {
                        0
                    } else {
                        1
                    };
                    let dropped = owed.windows[i];
                    self.stats
                        .expired
                        .fetch_add(dropped.hits, Ordering::Relaxed);
                    owed.windows[i] = Window {
                        start: window,
                        ..Window::default()
                    };
                    i
                }
            };
            let w = &mut owed.windows[slot];
            if let Some(known) = known {
                w.floor = w.floor.max(known.used);
            }
            let from_credit = op.hits.min(w.credit);
            w.credit -= from_credit;
            w.hits = w.hits.saturating_add(op.hits - from_credit);
            w.last_at = w.last_at.max(now);
            ((), owed)
        });
        if stored.is_some() {
            self.stats.owed.fetch_add(op.hits, Ordering::Relaxed);
            true
        } else {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// The store counted `hits` of `counter` in `window` for a request the fallback answered
    /// (its call had already left when its deadline passed): no longer owed. What is no
    /// longer waiting here (already sent, or not owed yet) becomes credit.
    pub fn forgive(&self, counter: &str, window: u64, hits: u64) {
        let _ = self.owed.try_update(counter, |held| {
            let mut owed = held.copied().unwrap_or_else(empty_owed);
            let slot = owed
                .windows
                .iter()
                .position(|w| w.start == window)
                .or_else(|| {
                    owed.windows
                        .iter()
                        .position(|w| w.total() == 0 && w.credit == 0)
                });
            if let Some(i) = slot {
                let w = &mut owed.windows[i];
                w.start = window;
                let from_hits = hits.min(w.hits);
                w.hits -= from_hits;
                w.credit = w.credit.saturating_add(hits - from_hits);
                self.stats.forgiven.fetch_add(hits, Ordering::Relaxed);
            }
            ((), owed)
        });
    }

    /// Whether any hits wait to be written back.
    pub fn owes(&self) -> bool {
        !self.owed.is_empty()
    }

    /// Takes every owed hit that still matters at `now` for sending; the rest is forgotten.
    /// The charges carry the configured threshold and no lease.
    pub fn drain(&self, now: u64, max: usize) -> Vec<Charge> {
        let mut counters = Vec::new();
        // Collected first, so no map lock is held while building the charges.
        self.owed.for_each_key(|key| {
            if counters.len() < max {
                counters.push(key.to_owned());
            }
        });
        let mut charges = Vec::with_capacity(counters.len());
        for counter in counters {
            // Only counters that are there (a concurrent flush may have dropped one).
            if self.owed.get(&counter).is_none() {
                continue;
            }
            self.owed.update(&counter, |held| {
                let Some(mut owed) = held.copied() else {
                    return ((), empty_owed());
                };
                if !owed.described {
                    return ((), owed);
                }
                let period = owed.threshold.period_ms();
                let current = window_of(owed.algorithm, &owed.threshold, now);
                for w in owed.windows.iter_mut() {
                    if w.hits == 0 {
                        // Credit outlives its window no more than owed hits do.
                        if w.start != current && w.start.saturating_add(period) != current {
                            w.credit = 0;
                        }
                        // Credit nothing owed will use, with nothing on its way: the store
                        // counted those hits twice (a write-back and the late call), so they
                        // are given back.
                        if w.credit > 0 && w.sending == 0 && w.start == current {
                            let op = CounterOp::new(
                                counter.clone(),
                                owed.algorithm,
                                owed.threshold,
                                w.credit,
                                HitMode::Give,
                            );
                            charges.push(Charge {
                                op,
                                at: now,
                                window: w.start,
                            });
                            w.credit = 0;
                        }
                        continue;
                    }
                    // Whether the window still limits anything: the current one always; the
                    // previous one only for a sliding window (it weighs in the current one).
                    let relevant = w.start == current
                        || (owed.algorithm == Algorithm::SlidingWindow
                            && w.start.saturating_add(period) == current);
                    if !relevant {
                        self.stats.expired.fetch_add(w.hits, Ordering::Relaxed);
                        w.hits = 0;
                        w.credit = 0;
                        continue;
                    }
                    let at = if w.start == current {
                        now
                    } else {
                        // The window's last millisecond: its key, and a short expiry.
                        w.start.saturating_add(period).saturating_sub(1)
                    };
                    let mut op = CounterOp::new(
                        counter.clone(),
                        owed.algorithm,
                        owed.threshold,
                        w.hits,
                        HitMode::Charge,
                    );
                    op.outcome = Outcome::default();
                    // The floor rides in the lease field, which a charge never uses.
                    op.block = w.floor;
                    charges.push(Charge {
                        op,
                        at,
                        window: w.start,
                    });
                    w.sending = w.sending.saturating_add(w.hits);
                    w.hits = 0;
                }
                ((), owed)
            });
        }
        self.forget_settled();
        charges
    }

    /// The store recorded `charge` and answered `answered` for it: its hits are no longer
    /// owed, and the answer is what the store now says of the counter.
    pub fn settled(&self, charge: &Charge, answered: &CounterOp) {
        if charge.op.mode == HitMode::Give {
            // A correction (see [`Ledger::drain`]): nothing was owed.
            self.observe_one(answered, charge.at);
            return;
        }
        self.stats
            .written_back
            .fetch_add(charge.op.hits, Ordering::Relaxed);
        self.with_window(charge, |w| {
            w.sending = w.sending.saturating_sub(charge.op.hits);
        });
        self.observe_one(answered, charge.at);
        self.forget_settled();
    }

    /// The store did not take `charge`: its hits are owed again, for the next flush.
    pub fn unsent(&self, charge: &Charge) {
        if charge.op.mode == HitMode::Give {
            // Or given back: the credit waits for the next flush.
            if self.owed.get(&charge.op.counter).is_some() {
                self.with_window(charge, |w| {
                    w.credit = w.credit.saturating_add(charge.op.hits)
                });
            } else {
                self.forgive(&charge.op.counter, charge.window, charge.op.hits);
            }
            return;
        }
        self.with_window(charge, |w| {
            let back = charge.op.hits.min(w.sending);
            w.sending -= back;
            w.hits = w.hits.saturating_add(back);
        });
    }

    fn with_window(&self, charge: &Charge, change: impl FnOnce(&mut Window)) {
        if self.owed.get(&charge.op.counter).is_none() {
            return;
        }
        self.owed.update(&charge.op.counter, |held| {
            let mut owed = held.copied().unwrap_or_else(empty_owed);
            if let Some(w) = owed.windows.iter_mut().find(|w| w.start == charge.window) {
                change(w);
            }
            ((), owed)
        });
    }

    /// Drops counters that owe nothing.
    fn forget_settled(&self) {
        self.owed
            .retain(|owed| owed.windows.iter().any(|w| w.total() > 0 || w.credit > 0));
    }

    /// Hits owed and not yet acknowledged, over every counter (for `/readyz` and metrics).
    pub fn outstanding(&self) -> u64 {
        let mut total = 0u64;
        self.owed.for_each_value(|owed| {
            total = total.saturating_add(owed.windows.iter().map(Window::total).sum());
        });
        total
    }

    /// Forgets store answers that no longer say anything at `now`, and late replies whose
    /// owing never came.
    pub fn sweep(&self, now: u64) {
        self.known.retain(|k| k.expires_at > now);
        self.owed.retain(|o| o.described);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::Unit;

    fn op(counter: &str, limit: u64, hits: u64) -> CounterOp {
        CounterOp::new(
            counter.into(),
            Algorithm::FixedWindow,
            Threshold::new(limit, Unit::Hour),
            hits,
            HitMode::Take,
        )
    }

    #[test]
    fn the_seed_is_the_store_count_shared_among_replicas_plus_what_is_owed_here() {
        let ledger = Ledger::new(10);
        let mut answered = op("a", 100, 1);
        answered.outcome = Outcome {
            over: false,
            remaining: 40,
            reset_ms: 1_000,
        };
        answered.source = Source::Redis;
        ledger.observe(std::slice::from_ref(&answered), 10_000);
        assert!(ledger.owe(&op("a", 100, 5), 10_100));
        assert_eq!(
            ledger.seed(&op("a", 100, 1), 10_200, 3),
            Some((20 + 5, 10_000))
        );
        // Once per store answer.
        assert_eq!(ledger.seed(&op("a", 100, 1), 10_300, 3), None);
    }

    #[test]
    fn owed_hits_are_drained_once_and_owed_again_when_unsent() {
        let ledger = Ledger::new(10);
        let now = 3_600_000 * 5 + 10;
        assert!(ledger.owe(&op("a", 100, 2), now));
        assert!(ledger.owe(&op("a", 100, 3), now + 1));
        let charges = ledger.drain(now + 2, 100);
        assert_eq!(charges.len(), 1);
        assert_eq!(charges[0].op.hits, 5);
        assert_eq!(charges[0].op.mode, HitMode::Charge);
        assert!(ledger.drain(now + 3, 100).is_empty(), "sent once");
        // Still counted against local answers while being sent.
        assert_eq!(ledger.unrecorded(&op("a", 100, 1), now + 3), 5);
        ledger.unsent(&charges[0]);
        let again = ledger.drain(now + 4, 100);
        assert_eq!(again[0].op.hits, 5);
        ledger.settled(&again[0], &again[0].op);
        assert!(!ledger.owes());
        assert_eq!(ledger.stats().written_back.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn a_full_ledger_refuses_rather_than_forgets() {
        let ledger = Ledger::new(1);
        assert!(ledger.owe(&op("a", 100, 1), 1_000));
        assert!(!ledger.owe(&op("b", 100, 1), 1_000));
        assert_eq!(ledger.stats().refused.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn an_ended_fixed_window_is_not_written_back() {
        let ledger = Ledger::new(10);
        assert!(ledger.owe(&op("a", 100, 4), 1_000));
        assert!(ledger.drain(3_600_000 + 1_000, 100).is_empty());
        assert_eq!(ledger.stats().expired.load(Ordering::Relaxed), 4);
        assert!(!ledger.owes());
    }
}
