//! The Redis store held to the memory store, step by step: a table of scenarios (every unit,
//! window edges, give-backs, bursts, huge counts), a random generator (proptest) and an
//! independent model of the fixed-window formula.
//!
//! Shared by the single-node, cluster and sentinel suites so each topology is held to the same
//! table: a difference between them would be a routing bug, never a difference in what was
//! asked. Times are fixed ([`BASE_MS`]) so no test sleeps to cross a window.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use sluice::limiter::memory::MemoryStore;
use sluice::limiter::{Algorithm, CounterOp, HitMode, Outcome, Store, Threshold, Unit};

use super::{DAY, HOUR, MINUTE};

/// 2053-12-14T00:00:00Z, day 30660 of the epoch: a multiple of every period (the least
/// common multiple of a week, a 30-day month and a 365-day year is 15330 days), so every
/// window of every unit starts here.
///
/// In the future on purpose: the script gives a key an absolute expiry (`PEXPIREAT window +
/// period`) computed from the caller's `now`, and Redis compares it with its own clock, so a
/// `now` in the past makes Redis drop each key as soon as it is written. That is a finding of
/// its own (see `a_past_clock_counts_like_memory` in `redis_backend.rs`); every other test
/// uses fixed times after the real clock so it checks the counting, not that.
pub const BASE_MS: u64 = 30_660 * DAY;

// ----- conformance: the Redis store against the memory store and an independent model -----

/// One counter update of a scenario step.
#[derive(Debug, Clone)]
pub struct Op {
    pub counter: String,
    pub threshold: Threshold,
    pub hits: u64,
    pub mode: HitMode,
}

/// One `Store::apply` call: a batch of updates at one `now`.
#[derive(Debug, Clone)]
pub struct Step {
    pub now: u64,
    pub ops: Vec<Op>,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub steps: Vec<Step>,
}

pub const fn per(limit: u64, unit: Unit) -> Threshold {
    Threshold::new(limit, unit)
}

pub const fn per_n(limit: u64, unit: Unit, multiplier: u32) -> Threshold {
    Threshold {
        limit,
        unit,
        multiplier,
        burst: None,
        concurrent: false,
    }
}

pub fn take(counter: &str, threshold: Threshold, hits: u64) -> Op {
    Op {
        counter: counter.to_string(),
        threshold,
        hits,
        mode: HitMode::Take,
    }
}

pub fn give(counter: &str, threshold: Threshold, hits: u64) -> Op {
    Op {
        mode: HitMode::Give,
        ..take(counter, threshold, hits)
    }
}

/// Hits admitted elsewhere (the fallback's write-back): recorded whatever the counter holds.
pub fn charge(counter: &str, threshold: Threshold, hits: u64) -> Op {
    Op {
        mode: HitMode::Charge,
        ..take(counter, threshold, hits)
    }
}

fn step(now: u64, ops: Vec<Op>) -> Step {
    Step { now, ops }
}

/// `n` steps of one op each at `now`, `now + 1`, ...
fn repeat(now: u64, n: u64, op: &Op) -> Vec<Step> {
    (0..n).map(|i| step(now + i, vec![op.clone()])).collect()
}

/// The conformance table. Times only move forward within a scenario (a clock going back to
/// an old window is not something a store must agree on: memory keeps one window per counter,
/// Redis one key per window).
pub fn scenarios() -> Vec<Scenario> {
    let s = |name: &str, steps: Vec<Step>| Scenario {
        name: name.to_string(),
        steps,
    };
    let t0 = BASE_MS + 15_250;
    let three_a_minute = per(3, Unit::Minute);
    let two_a_second = per(2, Unit::Second);
    let five_a_minute = per(5, Unit::Minute);
    let units = [
        Unit::Second,
        Unit::Minute,
        Unit::Hour,
        Unit::Day,
        Unit::Week,
        Unit::Month,
        Unit::Year,
    ];
    vec![
        s(
            "up to the limit, then over (hits still counted)",
            repeat(t0, 6, &take("c", three_a_minute, 1)),
        ),
        s("over at the window's last ms, fresh at the boundary", {
            let op = take("c", two_a_second, 1);
            vec![
                step(BASE_MS + 500, vec![op.clone()]),
                step(BASE_MS + 600, vec![op.clone()]),
                step(BASE_MS + 700, vec![op.clone()]),
                step(BASE_MS + 999, vec![op.clone()]),
                step(BASE_MS + 1_000, vec![op.clone()]),
                step(BASE_MS + 1_001, vec![op.clone()]),
                step(BASE_MS + 1_999, vec![op.clone()]),
                step(BASE_MS + 5_000, vec![op.clone()]),
            ]
        }),
        s("a charge is recorded past the limit", {
            let c = |now, op| step(now, vec![op]);
            vec![
                c(t0, take("c", five_a_minute, 3)),
                c(t0 + 1, charge("c", five_a_minute, 4)),
                c(t0 + 2, take("c", five_a_minute, 1)),
                c(t0 + 3, give("c", five_a_minute, 4)),
                c(t0 + 4, take("c", five_a_minute, 1)),
                c(t0 + 5, charge("c", five_a_minute, 1)),
                c(t0 + 6, take("c", five_a_minute, 0)),
                c(t0 + 60_000, take("c", five_a_minute, 1)),
            ]
        }),
        s("give back: subtracts, never below zero", {
            let c = |now, op| step(now, vec![op]);
            vec![
                c(t0, take("c", five_a_minute, 3)),
                c(t0 + 1, give("c", five_a_minute, 2)),
                c(t0 + 2, take("c", five_a_minute, 1)),
                c(t0 + 3, give("c", five_a_minute, 10)),
                c(t0 + 4, take("c", five_a_minute, 6)),
                c(t0 + 5, give("c", five_a_minute, 1)),
                c(t0 + 6, take("c", five_a_minute, 1)),
                c(t0 + 7, give("c", five_a_minute, 0)),
            ]
        }),
        s("give on a counter that does not exist yet", {
            vec![
                step(t0, vec![give("c", three_a_minute, 3)]),
                step(t0 + 1, vec![take("c", three_a_minute, 1)]),
                step(t0 + 2, vec![take("c", three_a_minute, 0)]),
                step(t0 + 3, vec![take("c", three_a_minute, 3)]),
            ]
        }),
        s(
            "zero hits checks without counting, over once nothing is left",
            {
                let t = per(2, Unit::Hour);
                vec![
                    step(t0, vec![take("c", t, 0)]),
                    step(t0 + 1, vec![take("c", t, 2)]),
                    step(t0 + 2, vec![take("c", t, 0)]),
                    step(t0 + 3, vec![take("c", t, 1)]),
                    step(t0 + 4, vec![take("c", t, 0)]),
                    step(BASE_MS + HOUR, vec![take("c", t, 0)]),
                ]
            },
        ),
        s("more hits than the limit at once, then the next day", {
            let t = per(10, Unit::Day);
            vec![
                step(t0, vec![take("c", t, 25)]),
                step(t0 + 1, vec![take("c", t, 0)]),
                step(t0 + 2, vec![give("c", t, 20)]),
                step(BASE_MS + DAY - 1, vec![take("c", t, 4)]),
                step(BASE_MS + DAY, vec![take("c", t, 10)]),
                step(BASE_MS + DAY + 1, vec![take("c", t, 1)]),
            ]
        }),
        s("limit zero: every counted hit is over", {
            let t = per(0, Unit::Second);
            vec![
                step(t0, vec![take("c", t, 0)]),
                step(t0 + 1, vec![take("c", t, 1)]),
                step(t0 + 2, vec![give("c", t, 1)]),
                step(t0 + 3, vec![take("c", t, 0)]),
            ]
        }),
        s("several counters in one batch, one of them twice", {
            let batch = |now| {
                step(
                    now,
                    vec![
                        take("a", two_a_second, 1),
                        take("b", three_a_minute, 1),
                        take("a", two_a_second, 1),
                        give("c", five_a_minute, 1),
                        take("c", five_a_minute, 2),
                        take("d", per(1, Unit::Hour), 0),
                    ],
                )
            };
            vec![
                batch(BASE_MS + 100),
                batch(BASE_MS + 200),
                batch(BASE_MS + 1_200),
                batch(BASE_MS + 61_000),
            ]
        }),
        s("every unit, across their windows", {
            let batch = |now| {
                step(
                    now,
                    units
                        .iter()
                        .enumerate()
                        .map(|(i, unit)| take(&format!("u{i}"), per(2, *unit), 1))
                        .collect(),
                )
            };
            let mid = BASE_MS + 3 * DAY + 12_345;
            vec![
                batch(BASE_MS),
                batch(mid),
                batch(mid + 1),
                batch(BASE_MS + 7 * DAY),
                batch(BASE_MS + 30 * DAY - 1),
                batch(BASE_MS + 30 * DAY),
                batch(BASE_MS + 365 * DAY - 1),
                batch(BASE_MS + 365 * DAY),
            ]
        }),
        s("multiplied periods (30 s, 5 min, 7 s)", {
            let batch = |now| {
                step(
                    now,
                    vec![
                        take("s30", per_n(2, Unit::Second, 30), 1),
                        take("m5", per_n(3, Unit::Minute, 5), 1),
                        take("s7", per_n(1, Unit::Second, 7), 1),
                    ],
                )
            };
            [
                0, 1, 29_999, 30_000, 31_000, 299_999, 300_000, 306_999, 307_000,
            ]
            .iter()
            .map(|&dt| batch(BASE_MS + dt))
            .collect()
        }),
        s("give back in a new window", {
            vec![
                step(t0, vec![take("c", three_a_minute, 3)]),
                step(t0 + 1, vec![take("c", three_a_minute, 1)]),
                step(BASE_MS + MINUTE, vec![give("c", three_a_minute, 1)]),
                step(BASE_MS + MINUTE + 1, vec![take("c", three_a_minute, 1)]),
                step(BASE_MS + MINUTE + 2, vec![take("c", three_a_minute, 2)]),
                step(BASE_MS + MINUTE + 3, vec![take("c", three_a_minute, 1)]),
            ]
        }),
        s("a burst unlike the limit", {
            let t = Threshold {
                burst: Some(5),
                ..per(2, Unit::Second)
            };
            let mut steps = repeat(t0, 7, &take("c", t, 1));
            steps.push(step(t0 + 400, vec![take("c", t, 1)]));
            steps.push(step(t0 + 2_000, vec![take("c", t, 3)]));
            steps.push(step(t0 + 2_001, vec![give("c", t, 2), take("c", t, 4)]));
            steps
        }),
        s("large but exact counts", {
            let t = per(1_000_000_000_000, Unit::Year);
            vec![
                step(t0, vec![take("c", t, 999_999_999_999)]),
                step(t0 + 1, vec![take("c", t, 1)]),
                step(t0 + 2, vec![take("c", t, 1)]),
                step(t0 + 3, vec![give("c", t, 2)]),
            ]
        }),
    ]
}

/// Periods longer than the time since the epoch (a request-side override with a huge
/// `unit_multiplier`; the period is capped at 100 years): the window starts at 0. Kept out of
/// [`scenarios`] so that table stays a clean signal; run by `redis_backend.rs`.
pub fn capped_period_scenario() -> Scenario {
    let t0 = BASE_MS + 15_250;
    let capped = per_n(5, Unit::Year, 1_000);
    let huge_seconds = per_n(2, Unit::Second, u32::MAX);
    Scenario {
        name: "a huge multiplier: the period is capped at 100 years".into(),
        steps: vec![
            step(t0, vec![take("y", capped, 3), take("s", huge_seconds, 1)]),
            step(
                t0 + DAY,
                vec![take("y", capped, 3), take("s", huge_seconds, 2)],
            ),
        ],
    }
}

/// The fixed-window formula (one count per window `now - now % period`, over once the count
/// passes the limit, reset at the window's end) written out once more, keyed like Redis
/// (counter, window), as an independent oracle for both stores.
#[derive(Default)]
pub struct Model {
    counts: HashMap<(String, u64), u64>,
}

impl Model {
    pub fn apply(&mut self, op: &Op, now: u64) -> Outcome {
        let period = op.threshold.period_ms();
        let window = now - now % period;
        let count = self.counts.entry((op.counter.clone(), window)).or_insert(0);
        *count = match op.mode {
            HitMode::Take | HitMode::Charge => count.saturating_add(op.hits),
            HitMode::Give => count.saturating_sub(op.hits),
        };
        // Zero hits checks whether one more would pass: over when nothing is left.
        let checking = op.mode == HitMode::Take && op.hits == 0;
        Outcome {
            over: *count > op.threshold.limit || (checking && *count >= op.threshold.limit),
            remaining: op.threshold.limit.saturating_sub(*count),
            reset_ms: window + period - now,
        }
    }
}

/// Every algorithm a store implements; each scenario runs under each of them.
pub const ALGORITHMS: [Algorithm; 3] = [
    Algorithm::FixedWindow,
    Algorithm::SlidingWindow,
    Algorithm::TokenBucket,
];

fn counter_ops(ops: &[Op], prefix: &str, algorithm: Algorithm) -> Vec<CounterOp> {
    ops.iter()
        .map(|op| {
            CounterOp::new(
                format!("{prefix}:{}", op.counter),
                algorithm,
                op.threshold,
                op.hits,
                op.mode,
            )
        })
        .collect()
}

/// Runs `scenario` with `algorithm` through a fresh [`MemoryStore`] and through `store`, with
/// counter ids under `prefix` (unique per run, so runs sharing one Redis never meet); every
/// step's outcomes must be identical. For `fixed_window` both must also equal the
/// independent model of the formula ([`Model`]).
pub async fn check_scenario(
    store: &dyn Store,
    scenario: &Scenario,
    algorithm: Algorithm,
    prefix: &str,
) -> Result<(), String> {
    let memory = MemoryStore::new(1_000_000);
    let mut model = Model::default();
    for (i, step) in scenario.steps.iter().enumerate() {
        let mut in_memory = counter_ops(&step.ops, prefix, algorithm);
        let mut in_store = in_memory.clone();
        let from_model: Vec<Outcome> = step
            .ops
            .iter()
            .map(|op| model.apply(op, step.now))
            .collect();
        memory
            .apply(&mut in_memory, step.now)
            .await
            .map_err(|e| format!("memory store failed: {e}"))?;
        let applied = store.apply(&mut in_store, step.now).await;
        let from_memory: Vec<Outcome> = in_memory.iter().map(|o| o.outcome).collect();
        let context = || {
            format!(
                "{} scenario {:?}, step {i} at now={} ({} ms into the day)\nops: {:?}",
                algorithm.as_str(),
                scenario.name,
                step.now,
                step.now % DAY,
                step.ops
            )
        };
        if let Err(e) = applied {
            return Err(format!(
                "{}\n{} store failed: {e}\nmemory answered: {from_memory:?}",
                context(),
                "the store"
            ));
        }
        let from_store: Vec<Outcome> = in_store.iter().map(|o| o.outcome).collect();
        let expected = if algorithm == Algorithm::FixedWindow {
            from_model
        } else {
            from_memory.clone()
        };
        if from_memory != expected || from_store != expected {
            return Err(format!(
                "{}\nexpected: {expected:?}\nmemory:   {from_memory:?}\n{}:    {from_store:?}",
                context(),
                "the store"
            ));
        }
    }
    Ok(())
}

/// Every scenario of [`scenarios`] under every algorithm; panics with all the failures.
pub async fn check_table(store: &dyn Store, prefix: &str) {
    let table = scenarios();
    let mut failures = Vec::new();
    for algorithm in ALGORITHMS {
        for (i, scenario) in table.iter().enumerate() {
            let prefix = format!("{prefix}:{}:s{i}", algorithm.as_str());
            if let Err(e) = check_scenario(store, scenario, algorithm, &prefix).await {
                failures.push(e);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} runs differ:\n\n{}",
        failures.len(),
        table.len() * ALGORITHMS.len(),
        failures.join("\n\n")
    );
}

/// `cases` random scenarios (proptest, shrinking on failure): a random algorithm; three
/// counters with random small limits, units, multipliers and bursts; 1 to 30 batches of 1 to
/// 4 updates (takes, gives, zero hits) with time moving forward by steps that often cross
/// windows.
pub fn check_random(store: &dyn Store, rt: &tokio::runtime::Runtime, cases: u32, prefix: &str) {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};

    let algorithm = prop::sample::select(ALGORITHMS.to_vec());
    let unit = prop::sample::select(vec![Unit::Second, Unit::Minute, Unit::Hour, Unit::Year]);
    let counter = (0u64..=6, unit, 1u32..=3, prop::option::of(1u64..=8));
    let advance = prop::sample::select(vec![
        0u64, 0, 1, 250, 999, 1_000, 1_001, 29_999, 59_999, 60_000, 3_600_000,
    ]);
    let hits = prop_oneof![4 => 0u64..=3, 1 => 4u64..=12];
    let op = (0usize..3, hits, prop::bool::weighted(0.2));
    let steps = prop::collection::vec((advance, prop::collection::vec(op, 1..=4)), 1..=30);
    let case = (
        algorithm,
        prop::collection::vec(counter, 3),
        steps,
        0u64..DAY,
    );

    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let run = AtomicUsize::new(0);
    let result = runner.run(&case, |(algorithm, counters, steps, offset)| {
        let thresholds: Vec<Threshold> = counters
            .iter()
            .map(|&(limit, unit, multiplier, burst)| Threshold {
                burst,
                ..per_n(limit, unit, multiplier)
            })
            .collect();
        let mut now = BASE_MS + offset;
        let steps = steps
            .into_iter()
            .map(|(advance, ops)| {
                now += advance;
                let ops = ops
                    .into_iter()
                    .map(|(c, hits, is_give)| {
                        let name = format!("r{c}");
                        if is_give {
                            give(&name, thresholds[c], hits)
                        } else {
                            take(&name, thresholds[c], hits)
                        }
                    })
                    .collect();
                Step { now, ops }
            })
            .collect();
        let scenario = Scenario {
            name: "random".into(),
            steps,
        };
        let id = run.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("{prefix}:{id}");
        rt.block_on(check_scenario(store, &scenario, algorithm, &prefix))
            .map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("random conformance failed: {e}");
    }
}
