//! Redis outages seen from Envoy's side, black-box: the real `sluice` binary (backend redis)
//! under a steady load while its `redis-server` is killed (SIGKILL) and restarted on the same
//! port, or frozen (SIGSTOP) and thawed (SIGCONT).
//!
//! The fallback: no request waits for a dead store and none fails (route `fallback:
//! local`, `timeout: 20ms`), and counting goes back to Redis once it answers again. Then each
//! other fallback mode answers as specified while Redis is down.
//!
//! Real time is unavoidable here (processes and signals). Each outage run lasts 20 s and the
//! four tests take turns, so the file takes about 65 s.

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::rls::{Code, RateLimitRequest, RateLimitServiceClient, desc, metadata, request};
use common::sluice::SluiceProcess;
use common::stalls::{StallMonitor, Stalls, pid_cell};
use tonic::transport::Channel;

// No `timeout`: the built-in store budget (10 ms) is what is tested.
const LIMITS: &str = r#"
domain: outage
routes:
  # Never over in these tests, so every answer says where it was counted.
  - name: steady
    fallback: local
    global_threshold: { query_per_second: 1000000 }
  # The same, taken from Redis in leased blocks.
  - name: leased
    fallback: local
    lease: auto
    global_threshold: { query_per_second: 1000000 }
  - name: allow
    fallback: allow
    global_threshold: { query_per_minute: 1000000 }
  - name: deny
    fallback: deny
    global_threshold: { query_per_minute: 1000000 }
  - name: error
    fallback: error
    global_threshold: { query_per_minute: 1000000 }
"#;

/// The acceptance bounds: no answer may take longer than Envoy's default ratelimit filter
/// timeout (20 ms), past which Envoy lets the request through uncounted.
const MAX_LATENCY: Duration = Duration::from_millis(20);
/// One request in this many may miss [`MAX_LATENCY`] even net of the stalls seen: on a busy
/// two-core machine a debug build misses it now and then with Redis up and no outage at all
/// (a fresh-clone CI run failed on 2 of 3,987 answers, both from the local fallback, 28 ms
/// net). A sluice that waits for a dead store misses it on every request of the outage, so
/// this does not hide one.
const OUTLIERS_PER: usize = 1000;
/// And none may take this long net of stalls: a wait for a store timeout or a reconnection.
const MAX_WAIT: Duration = Duration::from_millis(200);
const BACK_WITHIN: Duration = Duration::from_secs(2);

/// A wrong-source answer is not held against sluice when the machine stalled this long during
/// it: half the built-in 10 ms store timeout.
const STALL_EXCUSE: Duration = Duration::from_millis(5);

/// How far back a stall can explain a fallback answer: the breaker's probe interval (250 ms)
/// with a wide margin.
const RECENTLY: Duration = Duration::from_secs(1);

/// The tests of this file take turns: on a small machine, two loads, two servers and two Redis
/// at once would measure the machine more than sluice, and a 10 ms store budget is tripped by
/// a machine that is busy rather than by a store that is slow.
static ONE_RUN_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The schedule of one outage run.
const OUTAGE_AT: Duration = Duration::from_secs(5);
const BACK_AT: Duration = Duration::from_secs(12);
const RUN_FOR: Duration = Duration::from_secs(20);
/// Load: `WORKERS` tasks, each sending one request every `EVERY`: one request per 5 ms.
const WORKERS: u32 = 4;
const EVERY: Duration = Duration::from_millis(20);

fn ask(route: &str) -> RateLimitRequest {
    request("outage", vec![desc(&[("route", route)])])
}

/// Starts Redis and the binary serving [`LIMITS`] from it.
fn setup() -> (RedisServer, SluiceProcess, tempfile::TempDir) {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("outage.yaml"), LIMITS).expect("write limits");
    let url = redis.url();
    let sluice = SluiceProcess::spawn(
        dir.path(),
        &[("SLUICE_BACKEND", "redis"), ("SLUICE_REDIS_URL", &url)],
    );
    (redis, sluice, dir)
}

/// Waits (at most 15 s) until `route` is answered from Redis.
async fn until_counted_in_redis(
    client: &mut RateLimitServiceClient<Channel>,
    sluice: &SluiceProcess,
    route: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = String::new();
    while Instant::now() < deadline {
        match client.should_rate_limit(ask(route)).await {
            Ok(r) if matches!(metadata(r.get_ref(), "source"), Some("redis" | "lease")) => return,
            other => last = format!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "route {route} was not counted in Redis within 15 s; last answer {last}\n{}",
        sluice.output()
    );
}

/// One request of the load: when it was sent (from the run's start), how long it took, the
/// answer's source or the gRPC error, and for how long of that the machine was seen stalled.
#[derive(Debug, Clone)]
struct Sample {
    sent: Duration,
    took: Duration,
    answer: Result<String, String>,
    /// Includes the stalls that built a backlog this request queued behind (see `run_outage`).
    stalled: Duration,
    /// The same over the second before it too: a stall trips the store timeout, enough
    /// timeouts open the breaker, and the fallback answers until the next probe.
    stalled_recently: Duration,
}

impl Sample {
    fn answered(&self) -> Duration {
        self.sent + self.took
    }

    /// The latency the machine's stalls do not explain.
    fn net(&self) -> Duration {
        self.took.saturating_sub(self.stalled)
    }

    fn source_is(&self, source: &str) -> bool {
        self.answer.as_deref() == Ok(source)
    }
}

#[derive(Clone, Copy, Debug)]
enum Outage {
    /// SIGKILL, then a new redis-server on the same port.
    Kill,
    /// SIGSTOP, then SIGCONT: Redis hangs instead of dying.
    Freeze,
}

/// Runs the steady load for [`RUN_FOR`], with Redis down from [`OUTAGE_AT`] to [`BACK_AT`],
/// and checks the answers (see [`check`]).
async fn run_outage(outage: Outage, route: &'static str) {
    let _turn = ONE_RUN_AT_A_TIME.lock().await;
    let (mut redis, sluice, _dir) = setup();
    let mut warm = sluice.client().await;
    until_counted_in_redis(&mut warm, &sluice, route).await;

    let start = tokio::time::Instant::now();
    let end = start + RUN_FOR;
    let monitor = StallMonitor::start(
        start.into_std(),
        vec![pid_cell(sluice.pid()), redis.pid_cell()],
    );
    // Several clients, each on its own HTTP/2 connection, as several Envoys would be.
    let mut clients = Vec::new();
    for _ in 0..WORKERS {
        clients.push(sluice.client().await);
    }
    let workers: Vec<_> = (0..WORKERS)
        .zip(clients)
        .map(|(k, mut client)| {
            tokio::spawn(async move {
                let mut samples = Vec::new();
                let first = start + EVERY / WORKERS * k;
                let mut tick = tokio::time::interval_at(first, EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                // Bounded twice: by time and by count.
                let most = (RUN_FOR.as_millis() / EVERY.as_millis()) as usize + 10;
                for _ in 0..most {
                    tick.tick().await;
                    if tokio::time::Instant::now() >= end {
                        break;
                    }
                    let sent = Instant::now();
                    let answer = tokio::time::timeout(
                        Duration::from_secs(2),
                        client.should_rate_limit(ask(route)),
                    )
                    .await;
                    let took = sent.elapsed();
                    let answer = match answer {
                        // A hit from a block leased of Redis was counted in Redis.
                        Ok(Ok(r)) => Ok(match metadata(r.get_ref(), "source").unwrap_or("") {
                            "lease" => "redis".to_string(),
                            other => other.to_string(),
                        }),
                        Ok(Err(status)) => {
                            Err(format!("{:?}: {}", status.code(), status.message()))
                        }
                        Err(_) => Err("no answer within 2 s".to_string()),
                    };
                    samples.push(Sample {
                        sent: sent.duration_since(start.into_std()),
                        took,
                        answer,
                        stalled: Duration::ZERO,
                        stalled_recently: Duration::ZERO,
                    });
                }
                samples
            })
        })
        .collect();

    tokio::time::sleep_until(start + OUTAGE_AT).await;
    let down_at = start.elapsed();
    tokio::task::block_in_place(|| match outage {
        Outage::Kill => redis.kill9(),
        Outage::Freeze => redis.stop(),
    });
    tokio::time::sleep_until(start + BACK_AT).await;
    tokio::task::block_in_place(|| match outage {
        Outage::Kill => redis.restart(),
        Outage::Freeze => redis.cont(),
    });
    // Redis answers PING from here on.
    let back_at = start.elapsed();

    let mut samples = Vec::new();
    for w in workers {
        samples.extend(w.await.expect("load task"));
    }
    let stalls = monitor.finish();
    for s in &mut samples {
        // From as long before the request as it took: a stall leaves a backlog of requests
        // that arrived while nothing ran, and a request sent right after it waits for that
        // backlog to drain, on threads that are running (so no run-queue wait of its own).
        // The backlog a stall leaves drains in less time than the stall lasted, so a request
        // slowed by it spans at most twice its own latency back to the stall's start.
        s.stalled = stalls.explained(s.sent.saturating_sub(s.took), s.answered());
        s.stalled_recently = stalls.explained(s.sent.saturating_sub(RECENTLY), s.answered());
    }
    samples.sort_by_key(|s| s.sent);
    check(outage, &samples, &stalls, down_at, back_at, &sluice);
}

/// Checks the acceptance bounds on the samples of one run; reports every failed check at once.
///
/// Real time on a shared machine: a request during which the machine left a thread of the
/// test, of sluice or of Redis waiting on a run queue (see [`StallMonitor`]) is judged by
/// its latency minus that time, and an answer from the wrong source is not held against sluice
/// when the machine stalled for at least [`STALL_EXCUSE`] during it or in the [`RECENTLY`]
/// before it (the 20 ms store timeout trips when nothing runs, and the breaker it opens stays
/// open until a probe). Both are counted and printed. Delays of sluice's own making are never
/// excused.
fn check(
    outage: Outage,
    samples: &[Sample],
    stalls: &Stalls,
    down_at: Duration,
    back_at: Duration,
    sluice: &SluiceProcess,
) {
    let expected = (RUN_FOR.as_millis() / EVERY.as_millis()) as usize * WORKERS as usize;
    let mut latencies: Vec<Duration> = samples.iter().map(|s| s.took).collect();
    latencies.sort();
    let max = latencies.last().copied().unwrap_or_default();
    let p99 = latencies
        .get(latencies.len() * 99 / 100)
        .copied()
        .unwrap_or_default();
    let p999 = latencies
        .get(latencies.len() * 999 / 1000)
        .copied()
        .unwrap_or_default();
    let max_net = samples.iter().map(Sample::net).max().unwrap_or_default();
    let phase_max = |from: Duration, to: Duration| {
        samples
            .iter()
            .filter(|s| s.sent >= from && s.sent < to)
            .map(|s| s.took)
            .max()
            .unwrap_or_default()
    };
    let back_in_redis = samples
        .iter()
        .find(|s| s.sent >= back_at && s.source_is("redis"))
        .map(|s| s.answered().saturating_sub(back_at));

    println!(
        "{outage:?}: {} requests (of ~{expected} scheduled), Redis down at {down_at:?}, back at \
         {back_at:?}; latency max {max:?} (p99 {p99:?}, p99.9 {p999:?}; max before {:?}, during {:?}, after \
         {:?}; max net of machine stalls {max_net:?}); counted in Redis again \
         {} after it was back; most run-queue wait of one thread of the test, sluice, redis: {:?}",
        samples.len(),
        phase_max(Duration::ZERO, down_at),
        phase_max(down_at, back_at),
        phase_max(back_at, RUN_FOR),
        back_in_redis.map_or("never".to_string(), |d| format!("{d:?}")),
        stalls.total_waits(),
    );

    let mut failures: Vec<String> = Vec::new();
    let mut excused: Vec<&Sample> = Vec::new();
    if samples.len() < expected / 2 {
        failures.push(format!(
            "the load did not run: {} requests of ~{expected}",
            samples.len()
        ));
    }
    let errors: Vec<&Sample> = samples.iter().filter(|s| s.answer.is_err()).collect();
    if !errors.is_empty() {
        failures.push(format!(
            "{} requests got a gRPC error instead of an answer, first ones: {:?}",
            errors.len(),
            &errors[..errors.len().min(5)]
        ));
    }
    let slow: Vec<&Sample> = samples.iter().filter(|s| s.net() >= MAX_LATENCY).collect();
    let outliers = samples.len() / OUTLIERS_PER;
    let stuck: Vec<&Sample> = slow
        .iter()
        .copied()
        .filter(|s| s.net() >= MAX_WAIT)
        .collect();
    if slow.len() > outliers || !stuck.is_empty() {
        failures.push(format!(
            "{} requests took {MAX_LATENCY:?} or more (max {max:?}; at most {outliers} may, \
             none {MAX_WAIT:?}), first ones: {:?}",
            slow.len(),
            &slow[..slow.len().min(10)]
        ));
    } else if !slow.is_empty() {
        println!(
            "{outage:?}: {} requests took {MAX_LATENCY:?} or more net of stalls (at most \
             {outliers} may): {:?}",
            slow.len(),
            slow
        );
    }
    excused.extend(
        samples
            .iter()
            .filter(|s| s.took >= MAX_LATENCY && s.net() < MAX_LATENCY),
    );
    // The scenario did what it says: Redis before, the fallback while Redis was down.
    wrong_source(
        samples,
        &mut failures,
        &mut excused,
        "before the outage",
        "redis",
        |s| s.answered() < down_at,
    );
    wrong_source(
        samples,
        &mut failures,
        &mut excused,
        "while Redis is down",
        "fallback",
        |s| s.sent >= down_at + Duration::from_secs(1) && s.answered() < back_at,
    );
    match back_in_redis {
        None => failures.push(format!(
            "counting never went back to Redis in the {:?} after it was back",
            RUN_FOR.saturating_sub(back_at)
        )),
        Some(back) => {
            if back > BACK_WITHIN {
                failures.push(format!(
                    "counting went back to Redis {back:?} after Redis was back, more than \
                     {BACK_WITHIN:?}"
                ));
            }
            // And it stays there.
            let settled = back_at + back + Duration::from_millis(500);
            wrong_source(
                samples,
                &mut failures,
                &mut excused,
                "once back in Redis,",
                "redis",
                |s| s.sent >= settled,
            );
        }
    }
    excused.sort_by_key(|s| s.sent);
    excused.dedup_by(|a, b| std::ptr::eq(*a, *b));
    if !excused.is_empty() {
        println!(
            "{outage:?}: {} slow or fallback answers overlapped a stall of the whole machine \
             and were not held against sluice: {:?}",
            excused.len(),
            &excused[..excused.len().min(5)]
        );
    }
    assert!(
        failures.is_empty(),
        "{outage:?}: {} check(s) failed:\n- {}\n{}",
        failures.len(),
        failures.join("\n- "),
        sluice.output()
    );
}

/// Answers picked by `picked` that did not come from `wanted`: excused when the machine
/// stalled during them, failures otherwise.
fn wrong_source<'a>(
    samples: &'a [Sample],
    failures: &mut Vec<String>,
    excused: &mut Vec<&'a Sample>,
    what: &str,
    wanted: &str,
    picked: impl Fn(&Sample) -> bool,
) {
    let (stalled, wrong): (Vec<&Sample>, Vec<&Sample>) = samples
        .iter()
        .filter(|s| picked(s) && s.answer.is_ok() && !s.source_is(wanted))
        .partition(|s| s.stalled_recently >= STALL_EXCUSE);
    excused.extend(stalled);
    if !wrong.is_empty() {
        failures.push(format!(
            "{what} every answer comes from {wanted}, but {} did not, first ones: {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_load_no_request_fails_or_waits() {
    run_outage(Outage::Kill, "steady").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_and_thawed_under_load_no_request_fails_or_waits() {
    run_outage(Outage::Freeze, "steady").await;
}

/// The same with `lease` set: blocks leased before the outage do not hold the fallback off,
/// and leasing resumes once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_load_with_leases_no_request_fails_or_waits() {
    run_outage(Outage::Kill, "leased").await;
}

/// While Redis is down, `allow` answers OK, `deny` OVER_LIMIT (both from `fallback`), and
/// `error` fails the call with UNAVAILABLE so Envoy's `failure_mode_deny` decides. Checked
/// right after the kill (breaker still closed) and once the breaker is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_each_fallback_mode_answers_as_configured() {
    let _turn = ONE_RUN_AT_A_TIME.lock().await;
    let (mut redis, sluice, _dir) = setup();
    let mut client = sluice.client().await;
    for route in ["allow", "deny", "error"] {
        until_counted_in_redis(&mut client, &sluice, route).await;
    }
    redis.kill9();
    let mut slowest = Duration::ZERO;
    for round in 0..2 {
        if round == 1 {
            // Past the failure threshold and a few probe intervals: the breaker is open.
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        for i in 0..5 {
            let when = format!("round {round}, request {i}");
            let started = Instant::now();
            let allow = client.should_rate_limit(ask("allow")).await;
            let deny = client.should_rate_limit(ask("deny")).await;
            let error = client.should_rate_limit(ask("error")).await;
            slowest = slowest.max(started.elapsed() / 3);

            let allow = allow
                .unwrap_or_else(|s| panic!("allow ({when}) must be answered: {s:?}"))
                .into_inner();
            assert_eq!(
                allow.overall_code,
                Code::Ok as i32,
                "allow ({when}): {allow:?}"
            );
            assert_eq!(
                allow.statuses[0].code,
                Code::Ok as i32,
                "allow ({when}): {allow:?}"
            );
            assert_eq!(
                metadata(&allow, "source"),
                Some("fallback"),
                "allow ({when}): {allow:?}"
            );

            let deny = deny
                .unwrap_or_else(|s| panic!("deny ({when}) must be answered: {s:?}"))
                .into_inner();
            assert_eq!(
                deny.overall_code,
                Code::OverLimit as i32,
                "deny ({when}): {deny:?}"
            );
            assert_eq!(
                (deny.statuses[0].code, deny.statuses[0].limit_remaining),
                (Code::OverLimit as i32, 0),
                "deny ({when}): {deny:?}"
            );
            assert_eq!(
                metadata(&deny, "source"),
                Some("fallback"),
                "deny ({when}): {deny:?}"
            );

            match error {
                Err(status) => assert_eq!(
                    status.code(),
                    tonic::Code::Unavailable,
                    "error ({when}): {status:?}"
                ),
                Ok(r) => panic!("error ({when}) must fail with UNAVAILABLE, got {r:?}"),
            }
        }
    }
    println!("fallback modes with Redis down: slowest answer {slowest:?} (mean of the three)");
}
