//! `concurrent: N`: requests in flight, as a pure function over the slots a counter holds.
//!
//! A window cannot hold a slot: "at most 5 in flight" needs each request to take a slot when
//! it starts and give it back when it ends, which Envoy 1.40 makes possible (a `rate_limits`
//! entry with `apply_on_stream_done` and `hits_addend.is_negative_hits` sends the give-back
//! at stream end). Two things shape the model:
//!
//! - Envoy sends the give-back for a request it rejected too, so a rejected take must hold
//!   its slot like an admitted one; otherwise that give-back would free another request's.
//! - A give-back can be lost (Envoy crashed, the call failed open), so every slot is a lease
//!   that expires `max_hold` after it was taken (the threshold's period): a lost slot comes back
//!   by itself.
//!
//! The Redis twin (`lua/concurrent.lua`) keeps the same slots in a sorted set scored by their
//! expiry; both drop expired slots first and give back the earliest, so they answer alike.

use super::{HitMode, Outcome, Threshold};

/// A counter takes at most this many slots past its limit: rejected takes hold slots until
/// their give-back, and this bounds what a flood of them (or of requests whose give-back never
/// comes) can store. Takes past it are still answered over, just not recorded.
pub const MAX_HELD_OVER: u64 = 10_000;

/// The slots a counter holds: their expiries (ms since the epoch), earliest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slots {
    pub expiries: Vec<u64>,
}

impl Slots {
    /// When the state can be swept: a second after its last slot expires (as its Redis key
    /// lives), so a call in between still finds and counts the expired slots.
    pub fn expires_at(&self, now: u64) -> u64 {
        let last = self.expiries.last().copied().unwrap_or(now);
        last.max(now).saturating_add(1_000)
    }
}

/// What one call did besides its answer, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotChange {
    /// Slots taken (a take) or given back (a give).
    pub moved: u64,
    /// Slots found expired and dropped by this call.
    pub expired: u64,
}

/// `concurrent`:
///
/// ```text
/// drop the slots whose expiry <= now                 (expired)
/// take:  over = before + max(hits, 1) > limit        (zero hits checks for one)
///        add min(hits, limit + 10000 - before) slots expiring at now + max_hold, over or not
/// give:  remove the min(hits, before) earliest slots (never below zero, never over)
/// remaining = max(0, limit - slots after)
/// reset     = earliest slot's expiry - now (0 with no slot)
/// ```
pub fn concurrent(
    prev: Option<&Slots>,
    now: u64,
    threshold: &Threshold,
    hits: u64,
    mode: HitMode,
) -> (Outcome, Slots, SlotChange) {
    let limit = threshold.limit;
    let hold = threshold.period_ms();
    let mut slots = prev.cloned().unwrap_or_default();
    let live = slots.expiries.partition_point(|&e| e <= now);
    slots.expiries.drain(..live);
    let before = slots.expiries.len() as u64;
    let mut over = false;
    let moved = match mode {
        HitMode::Give => {
            let moved = hits.min(before);
            slots.expiries.drain(..moved as usize);
            moved
        }
        // Never sent for slots (nothing is written back for them); taken as a take.
        HitMode::Take | HitMode::Charge => {
            over = before.saturating_add(hits.max(1)) > limit;
            let room = limit.saturating_add(MAX_HELD_OVER).saturating_sub(before);
            let moved = hits.min(room);
            let expiry = now.saturating_add(hold);
            // Expiries only grow with `now`, but a caller's clock may step back: keep order.
            let at = slots.expiries.partition_point(|&e| e <= expiry);
            slots
                .expiries
                .splice(at..at, std::iter::repeat_n(expiry, moved as usize));
            moved
        }
    };
    let after = slots.expiries.len() as u64;
    let outcome = Outcome {
        over,
        remaining: limit.saturating_sub(after),
        reset_ms: slots.expiries.first().map_or(0, |e| e.saturating_sub(now)),
    };
    let change = SlotChange {
        moved,
        expired: live as u64,
    };
    (outcome, slots, change)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::Unit;

    /// Two in flight, slots held for a minute.
    fn two() -> Threshold {
        Threshold {
            concurrent: true,
            ..Threshold::new(2, Unit::Minute)
        }
    }

    #[test]
    fn a_rejected_take_holds_its_slot_until_its_give_back() {
        let t = two();
        let (a, s, _) = concurrent(None, 1_000, &t, 1, HitMode::Take);
        let (b, s, _) = concurrent(Some(&s), 1_001, &t, 1, HitMode::Take);
        let (c, s, change) = concurrent(Some(&s), 1_002, &t, 1, HitMode::Take);
        assert_eq!((a.over, b.over, c.over), (false, false, true));
        assert_eq!(
            (c.remaining, change.moved),
            (0, 1),
            "the rejected take is held"
        );
        // Its give-back frees its own slot, not an admitted request's.
        let (_, s, _) = concurrent(Some(&s), 1_005, &t, 1, HitMode::Give);
        let (d, s, _) = concurrent(Some(&s), 1_006, &t, 1, HitMode::Take);
        assert!(d.over, "still two in flight");
        let (_, s, _) = concurrent(Some(&s), 1_007, &t, 1, HitMode::Give);
        // One admitted request ends: one slot free.
        let (_, s, _) = concurrent(Some(&s), 1_008, &t, 1, HitMode::Give);
        let (e, s, _) = concurrent(Some(&s), 1_009, &t, 1, HitMode::Take);
        assert_eq!((e.over, e.remaining), (false, 0));
        let (_, s, _) = concurrent(Some(&s), 1_010, &t, 1, HitMode::Give);
        let (_, s, _) = concurrent(Some(&s), 1_011, &t, 1, HitMode::Give);
        assert!(s.expiries.is_empty());
    }

    #[test]
    fn give_backs_never_go_below_zero() {
        let t = two();
        let (out, s, change) = concurrent(None, 1_000, &t, 3, HitMode::Give);
        assert_eq!((out.over, out.remaining, change.moved), (false, 2, 0));
        let (_, s, _) = concurrent(Some(&s), 1_001, &t, 1, HitMode::Take);
        let (_, s, change) = concurrent(Some(&s), 1_002, &t, 5, HitMode::Give);
        assert_eq!((change.moved, s.expiries.len()), (1, 0));
    }

    #[test]
    fn a_slot_whose_give_back_never_comes_is_free_after_max_hold() {
        let t = two();
        let (_, s, _) = concurrent(None, 1_000, &t, 1, HitMode::Take);
        let (_, s, _) = concurrent(Some(&s), 2_000, &t, 1, HitMode::Take);
        let (over, s, _) = concurrent(Some(&s), 60_999, &t, 1, HitMode::Take);
        assert!(over.over);
        assert_eq!(over.reset_ms, 1, "the first slot expires at 61 000");
        // At 61 000 the first slot (taken at 1 000) has expired: one free.
        let (out, _, change) = concurrent(Some(&s), 61_000, &t, 0, HitMode::Take);
        assert_eq!(
            (out.over, change.expired),
            (true, 1),
            "two still held: 2 000 and 60 999"
        );
        let (out, _, change) = concurrent(Some(&s), 62_000, &t, 1, HitMode::Take);
        assert_eq!((out.over, change.expired), (false, 2));
    }

    #[test]
    fn zero_hits_checks_for_one_free_slot_without_taking_it() {
        let t = two();
        let (_, s, _) = concurrent(None, 1_000, &t, 1, HitMode::Take);
        let (out, s, change) = concurrent(Some(&s), 1_001, &t, 0, HitMode::Take);
        assert_eq!((out.over, out.remaining, change.moved), (false, 1, 0));
        let (_, s, _) = concurrent(Some(&s), 1_002, &t, 1, HitMode::Take);
        let (out, _, _) = concurrent(Some(&s), 1_003, &t, 0, HitMode::Take);
        assert!(out.over, "nothing left");
    }

    #[test]
    fn rejected_takes_are_recorded_only_up_to_a_bound() {
        let t = two();
        let (_, s, change) = concurrent(None, 1_000, &t, 20_000, HitMode::Take);
        assert_eq!(change.moved, 2 + MAX_HELD_OVER);
        let (out, s2, change) = concurrent(Some(&s), 1_001, &t, 1, HitMode::Take);
        assert_eq!((out.over, change.moved), (true, 0));
        assert_eq!(s2, s);
    }
}
