//! A Sentinel failover under load, black-box: two `sluice` binaries on one
//! `redis-sentinel://` URL, a steady load on both, and `SENTINEL FAILOVER` in the middle.
//!
//! What is checked is where the counts go: after the sentinel announces the new master
//! (`+switch-master`), sluice writes there within a second, and no more on the old master,
//! which would drop them when it is demoted and resynchronises. Writes are seen from Redis's
//! side (`INFO commandstats`: sluice sends every batch as one `EVALSHA`), sampled every few
//! ms; the moment of the switch from the test's own subscription to a sentinel. No request may
//! fail meanwhile: the route's `fallback: local` answers while the connections move.
//!
//! Real time is unavoidable (processes, a real failover). Each case takes about 20 s; the two
//! take turns so that the machine is not measured instead of sluice.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::metrics::{metric, scrape};
use common::resp::{Resp, RespConn, resp};
use common::rls::{Code, RateLimitRequest, desc, metadata, request};
use common::sentinel::{RedisSentinel, SENTINEL_SERVICE};
use common::sluice::SluiceProcess;
use common::{HOUR, now_ms, wait_until};

/// Reached during the run (at most 1,500 requests a second for 12 s; a debug build on two
/// cores manages about 1,000), so the admitted total says whether counts were lost.
const LIMIT: u64 = 9_000;

fn limits() -> String {
    format!(
        r#"
domain: failover
routes:
  - name: hot
    fallback: local
    # Generous for a debug build on a busy machine: what is tested is the failover, not the
    # store budget.
    timeout: 100ms
    global_threshold: {{ query_per_hour: {LIMIT} }}
"#
    )
}

/// Load: `TASKS_PER_REPLICA` tasks on each of the two replicas, each sending one request every
/// `EVERY`: 1,500 requests a second in all.
const TASKS_PER_REPLICA: u32 = 3;
const EVERY: Duration = Duration::from_millis(4);
const RUN_FOR: Duration = Duration::from_secs(12);
const FAILOVER_AT: Duration = Duration::from_secs(4);

/// Batches already written when sluice heard of the switch may still be counted by the old
/// master this long after it.
const IN_FLIGHT_GRACE: Duration = Duration::from_millis(100);
/// Writes reach the new master within this of the switch.
const MOVED_WITHIN: Duration = Duration::from_secs(1);
/// How often the masters' `EVALSHA` counts are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);

static ONE_RUN_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn ask() -> RateLimitRequest {
    request("failover", vec![desc(&[("route", "hot")])])
}

/// The URL naming every sentinel of `setup` (the first as host, the others as `node=`).
fn url_of_all(setup: &RedisSentinel) -> String {
    let mut url = format!(
        "redis-sentinel://127.0.0.1:{}/0?sentinelServiceName={SENTINEL_SERVICE}",
        setup.sentinels[0].port
    );
    for sentinel in &setup.sentinels[1..] {
        url.push_str(&format!("&node=127.0.0.1:{}", sentinel.port));
    }
    url
}

/// `calls=` of `cmdstat_evalsha` in an `INFO commandstats` reply.
fn evalsha_calls_in(info: &str) -> u64 {
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:"))
        .and_then(|stats| stats.split(',').find_map(|kv| kv.strip_prefix("calls=")))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Samples `EVALSHA` calls on the old and the new master every [`SAMPLE_EVERY`] until `stop`,
/// on connections of its own (made again if a node drops them: demotion kills clients).
fn sample_evalsha(
    old: u16,
    new: u16,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<(Instant, u64, u64)>> {
    std::thread::spawn(move || {
        let read = |conn: &mut Option<RespConn>, port: u16| -> Option<u64> {
            for _ in 0..2 {
                if conn.is_none() {
                    *conn = RespConn::connect(port).ok();
                }
                match conn.as_mut()?.call(&[b"INFO", b"commandstats"]) {
                    Ok(reply) => return Some(evalsha_calls_in(&reply.text())),
                    Err(_) => *conn = None,
                }
            }
            None
        };
        let (mut old_conn, mut new_conn) = (None, None);
        let mut samples = Vec::new();
        // Bounded by time (the run) and by count.
        for _ in 0..20_000 {
            if stop.load(Ordering::Acquire) {
                break;
            }
            let at = Instant::now();
            if let (Some(o), Some(n)) = (read(&mut old_conn, old), read(&mut new_conn, new)) {
                samples.push((at, o, n));
            }
            std::thread::sleep(SAMPLE_EVERY);
        }
        samples
    })
}

/// The sentinel's events (`PSUBSCRIBE *`) with the time each arrived, up to and including the
/// first `+switch-master` for our service.
fn watch_sentinel(port: u16) -> std::thread::JoinHandle<Vec<(Instant, String, String)>> {
    let mut conn = RespConn::connect(port).expect("connect to the sentinel");
    let reply = conn.call(&[b"PSUBSCRIBE", b"*"]).expect("PSUBSCRIBE");
    assert!(
        matches!(&reply, Resp::Array(items) if items.first() == Some(&Resp::Bulk(b"psubscribe".to_vec()))),
        "{reply:?}"
    );
    std::thread::spawn(move || {
        let mut events = Vec::new();
        // Bounded: each read waits at most 10 s (the kit's read timeout).
        for _ in 0..10_000 {
            let Ok(Resp::Array(items)) = conn.read() else {
                break;
            };
            let at = Instant::now();
            let text: Vec<String> = items.iter().map(Resp::text).collect();
            if let [kind, _, channel, data] = &text[..]
                && kind == "pmessage"
            {
                events.push((at, channel.clone(), data.clone()));
                if channel == "+switch-master" && data.starts_with(SENTINEL_SERVICE) {
                    break;
                }
            }
        }
        events
    })
}

/// One answer of the load: when it was sent, and whether it was admitted (and from where) or
/// what went wrong.
struct Answer {
    sent: Instant,
    result: Result<(bool, String), String>,
}

/// Sentinel's clients subscribed to at least one channel (`sub=` above 0 in `CLIENT LIST`).
fn subscribers(port: u16) -> usize {
    resp(port, &["CLIENT", "LIST"])
        .text()
        .lines()
        .filter(|line| {
            line.split(' ')
                .find_map(|kv| kv.strip_prefix("sub="))
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n > 0)
        })
        .count()
}

/// A failover under load with `sentinels` sentinels; with `restart_first`, the sentinel that
/// will lead it is killed and restarted first, so sluice hears it only if it subscribed again.
async fn run_failover(sentinels: usize, restart_first: bool) {
    let _turn = ONE_RUN_AT_A_TIME.lock().await;
    // The counter is one hourly window: a run that crossed an hour would split it.
    let into_hour = now_ms() % HOUR;
    if HOUR - into_hour < 45_000 {
        tokio::time::sleep(Duration::from_millis(HOUR - into_hour + 500)).await;
    }
    let mut setup = RedisSentinel::start(sentinels);
    let (old, new) = (setup.master.port, setup.replica.port);
    // A forced failover needs a replica the sentinel knows (from the master's INFO).
    for sentinel in &setup.sentinels {
        wait_until(
            "the sentinel to know the replica",
            Duration::from_secs(20),
            || {
                let replicas = resp(sentinel.port, &["SENTINEL", "replicas", SENTINEL_SERVICE]);
                let text = replicas.text();
                (text.contains(&new.to_string()) && text.lines().any(|l| l == "slave"))
                    .then_some(())
            },
        );
    }

    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("failover.yaml"), limits()).expect("write limits");
    let url = url_of_all(&setup);
    let env = [
        ("SLUICE_BACKEND", "redis"),
        ("SLUICE_REDIS_URL", url.as_str()),
        ("SLUICE_FALLBACK_REPLICAS", "2"),
        ("SLUICE_LOG", "info"),
    ];
    let replicas = [
        SluiceProcess::spawn(dir.path(), &env),
        SluiceProcess::spawn(dir.path(), &env),
    ];
    for replica in &replicas {
        let client = replica.client().await;
        wait_until_async("both replicas to count in Redis", || {
            let mut client = client.clone();
            async move {
                matches!(
                    client.should_rate_limit(ask()).await,
                    Ok(r) if metadata(r.get_ref(), "source") == Some("redis")
                )
            }
        })
        .await;
    }

    if restart_first {
        wait_until(
            "both replicas to subscribe",
            Duration::from_secs(10),
            || (subscribers(setup.sentinels[0].port) == 2).then_some(()),
        );
        setup.sentinels[0].restart();
        let restarted = Instant::now();
        wait_until(
            "the restarted sentinel to know the replica",
            Duration::from_secs(20),
            || {
                let replicas = resp(
                    setup.sentinels[0].port,
                    &["SENTINEL", "replicas", SENTINEL_SERVICE],
                );
                let text = replicas.text();
                (text.contains(&new.to_string()) && text.lines().any(|l| l == "slave"))
                    .then_some(())
            },
        );
        wait_until(
            "both replicas to subscribe to the restarted sentinel again",
            Duration::from_secs(10),
            || (subscribers(setup.sentinels[0].port) == 2).then_some(()),
        );
        println!(
            "--- sentinel restarted; both replicas subscribed again within {:?}",
            restarted.elapsed()
        );
    }

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_evalsha(old, new, stop.clone());
    let events = watch_sentinel(setup.sentinels[0].port);

    let start = tokio::time::Instant::now();
    let end = start + RUN_FOR;
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let tasks_in_all = 2 * TASKS_PER_REPLICA;
    for k in 0..tasks_in_all {
        let mut client = replicas[(k % 2) as usize].client().await;
        let sent = sent.clone();
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            let first = start + EVERY / tasks_in_all * k;
            let mut tick = tokio::time::interval_at(first, EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let most = (RUN_FOR.as_millis() / EVERY.as_millis()) as usize + 10;
            for _ in 0..most {
                tick.tick().await;
                if tokio::time::Instant::now() >= end {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                let at = Instant::now();
                let answer =
                    tokio::time::timeout(Duration::from_secs(2), client.should_rate_limit(ask()))
                        .await;
                let result = match answer {
                    Ok(Ok(r)) => {
                        let r = r.into_inner();
                        let source = metadata(&r, "source").unwrap_or("").to_string();
                        Ok((r.overall_code == Code::Ok as i32, source))
                    }
                    Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
                    Err(_) => Err("no answer within 2 s".into()),
                };
                answers.push(Answer { sent: at, result });
            }
            answers
        }));
    }

    tokio::time::sleep_until(start + FAILOVER_AT).await;
    let asked = Instant::now();
    let reply = resp(
        setup.sentinels[0].port,
        &["SENTINEL", "FAILOVER", SENTINEL_SERVICE],
    );
    assert_eq!(reply, Resp::Simple("OK".into()), "SENTINEL FAILOVER");

    let mut answers = Vec::new();
    for task in tasks {
        answers.extend(task.await.expect("load task"));
    }
    // Let batches still on their way land before the last sample.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Release);
    let samples = sampler.join().expect("sampler");
    let events = events.join().expect("sentinel watch");
    let Some(switched) = events
        .iter()
        .find(|(_, channel, _)| channel == "+switch-master")
        .map(|(at, _, _)| *at)
    else {
        panic!(
            "no +switch-master within the run; sentinel events: {events:?}\n{}",
            replicas[0].output()
        );
    };

    // The sentinel's side of the failover, relative to the switch.
    println!(
        "--- {sentinels} sentinel(s): failover asked {:?} before +switch-master",
        switched - asked
    );
    for (at, channel, data) in &events {
        let rel = at.duration_since(asked).as_secs_f64() * 1000.0;
        println!("  +{rel:7.1} ms after FAILOVER  {channel} {data}");
    }

    // (a) The first write on the new master after the switch.
    let before = samples
        .iter()
        .rev()
        .find(|(at, _, _)| *at <= switched)
        .map_or(0, |s| s.2);
    let first_new = samples
        .iter()
        .find(|(at, _, n)| *at > switched && *n > before)
        .map(|(at, _, _)| at.duration_since(switched));
    // From the moment the sentinel is about to promote the replica (plus the grace), the old
    // master takes no write: sluice stops writing there then, not at the switch.
    let promotion_began = events
        .iter()
        .find(|(_, channel, _)| channel == "+failover-state-send-slaveof-noone")
        .map(|(at, _, _)| *at);
    // (b) Writes on the old master after `since` and the grace: sums of increases (a drop
    // would be a stats reset, counted from zero); and when the last one was seen.
    let old_writes_after = |since: Instant| {
        let mut after = 0u64;
        let mut last = None;
        let mut previous: Option<u64> = None;
        for (at, o, _) in samples.iter().filter(|(at, _, _)| *at >= since) {
            if let Some(p) = previous {
                let grew = if *o >= p { o - p } else { *o };
                if grew > 0 {
                    last = Some(at.duration_since(since));
                    if *at >= since + IN_FLIGHT_GRACE {
                        after += grew;
                    }
                }
            }
            previous = Some(*o);
        }
        (after, last)
    };
    let (on_old_after, last_old_write) = old_writes_after(switched);
    let Some(promotion_began) = promotion_began else {
        panic!("no +failover-state-send-slaveof-noone before the switch: {events:?}");
    };
    let (on_old_after_promotion, last_old_write_since_promotion) =
        old_writes_after(promotion_began);
    // Writes the old master took after the sentinel told the replica to become master: the
    // counts the old master drops when it is demoted (before the switch, so not sluice's to
    // avoid; printed for the record).
    let promoting = events
        .iter()
        .find(|(_, channel, _)| channel == "+failover-state-wait-promotion")
        .map(|(at, _, _)| *at);
    let old_at = |when: Instant| samples.iter().find(|(at, _, _)| *at >= when).map(|s| s.1);
    let lost_window = promoting.and_then(|p| Some(old_at(switched)?.saturating_sub(old_at(p)?)));
    let old_stats_at_grace = samples
        .iter()
        .find(|(at, _, _)| *at >= switched + IN_FLIGHT_GRACE)
        .map(|s| s.1);
    // (c) Errors.
    let errors: Vec<&String> = answers
        .iter()
        .filter_map(|a| a.result.as_ref().err())
        .collect();
    let admitted = answers
        .iter()
        .filter(|a| matches!(a.result, Ok((true, _))))
        .count() as u64;
    let from_fallback = answers
        .iter()
        .filter(|a| matches!(&a.result, Ok((_, s)) if s == "fallback"))
        .count();
    let fallback_after_switch = answers
        .iter()
        .filter(|a| a.sent >= switched && matches!(&a.result, Ok((_, s)) if s == "fallback"))
        .count();
    let counted: u64 = setup
        .replica
        .keys(0, "sluice:*")
        .iter()
        .map(|key| {
            let key = String::from_utf8_lossy(key).into_owned();
            setup
                .replica
                .cmd(&["GET", &key])
                .text()
                .parse::<u64>()
                .unwrap_or(0)
        })
        .sum();
    let mut failovers = Vec::new();
    for replica in &replicas {
        let page = scrape(replica.http_addr).await;
        failovers.push(metric(&page, "sluice_redis_failovers_total"));
    }
    let moves: Vec<String> = replicas
        .iter()
        .flat_map(|r| {
            r.output()
                .lines()
                .filter(|l| l.contains("Redis master") || l.contains("promoting"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();

    println!(
        "  requests sent {} ({:.0}/s), admitted {admitted}, limit {LIMIT} ({:+.1}%), \
         counted on the new master {counted}",
        sent.load(Ordering::Relaxed),
        sent.load(Ordering::Relaxed) as f64 / RUN_FOR.as_secs_f64(),
        (admitted as f64 / LIMIT as f64 - 1.0) * 100.0,
    );
    println!(
        "  answered by the fallback: {from_fallback} ({fallback_after_switch} sent after +switch-master)"
    );
    println!("  switch -> first write on the new master: {first_new:?}");
    println!(
        "  last write seen on the old master after the switch: {last_old_write:?}; \
         EVALSHA calls there after switch + {IN_FLIGHT_GRACE:?}: {on_old_after} \
         (calls at that moment {old_stats_at_grace:?}, at the end {:?})",
        samples.last().map(|s| s.1)
    );
    println!(
        "  EVALSHA calls on the old master from +failover-state-wait-promotion to \
         +switch-master (counts it will drop): {lost_window:?}"
    );
    println!(
        "  last write seen on the old master after +failover-state-send-slaveof-noone: \
         {last_old_write_since_promotion:?}; EVALSHA calls there after it + {IN_FLIGHT_GRACE:?}: \
         {on_old_after_promotion}"
    );
    println!("  sluice_redis_failovers_total per replica: {failovers:?}");
    for line in &moves {
        println!("  {line}");
    }

    // What the fallback admits while the connections move continues Redis's count (each
    // replica its half of what was left) and is written back to the new master.
    assert!(
        admitted <= LIMIT + LIMIT / 50,
        "admitted {admitted} of a limit of {LIMIT} through the failover"
    );
    assert!(
        errors.is_empty(),
        "{} gRPC errors, first {:?}",
        errors.len(),
        errors.first()
    );
    let first_new = first_new.unwrap_or_else(|| {
        panic!(
            "no write reached the new master after the switch\n{}",
            replicas[0].output()
        )
    });
    assert!(
        first_new <= MOVED_WITHIN,
        "the first write reached the new master {first_new:?} after +switch-master"
    );
    assert_eq!(
        on_old_after,
        0,
        "writes landed on the old master after +switch-master + {IN_FLIGHT_GRACE:?} \
         (the last {last_old_write:?} after it)\n{}",
        replicas[0].output()
    );
    assert_eq!(
        on_old_after_promotion,
        0,
        "writes landed on the old master after the promotion began + {IN_FLIGHT_GRACE:?} \
         (the last {last_old_write_since_promotion:?} after it)\n{}",
        replicas[0].output()
    );
    for (replica, count) in replicas.iter().zip(&failovers) {
        assert!(
            count.is_some_and(|c| c >= 1.0),
            "sluice_redis_failovers_total {count:?}\n{}",
            replica.output()
        );
    }
}

/// `calls=` plus `rejected_calls=` of `cmdstat_evalsha`: every EVALSHA that reached the node,
/// run or refused.
fn evalsha_attempts(port: u16) -> u64 {
    let info = resp(port, &["INFO", "commandstats"]).text();
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:"))
        .map(|stats| {
            stats
                .split(',')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    matches!(k, "calls" | "rejected_calls").then(|| v.trim().parse::<u64>().ok())?
                })
                .sum()
        })
        .unwrap_or(0)
}

/// A master turned into a replica behind sluice's back (`REPLICAOF`, as a sentinel demotes one,
/// on a plain `redis://` URL where no sentinel tells sluice): the first `READONLY` stops the
/// writes, `ROLE` keeps them stopped while the node is a replica, the fallback answers every
/// request meanwhile, and counting returns to the node once it is a master again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_turned_replica_is_not_written_until_it_is_master_again() {
    let _turn = ONE_RUN_AT_A_TIME.lock().await;
    let node = common::redis::RedisServer::start();
    let other = common::redis::RedisServer::start();
    let mut sluice = common::sluice::Sluice::start_with(&[("failover.yaml", &limits())], |s| {
        common::store::use_redis(s, &node.url())
    })
    .await;
    let source =
        |r: &common::rls::RateLimitResponse| metadata(r, "source").unwrap_or("").to_string();
    let first = sluice.call(ask()).await;
    assert_eq!(source(&first), "redis");

    let port = other.port.to_string();
    assert_eq!(
        node.cmd(&["REPLICAOF", "127.0.0.1", &port]),
        Resp::Simple("OK".into())
    );
    wait_until("the node to replicate", Duration::from_secs(10), || {
        let info = common::resp::info(node.port, "replication");
        (info.get("master_link_status").map(String::as_str) == Some("up")).then_some(())
    });
    // Requests for a second: answered (by the fallback) while the node is a replica, and at most
    // the batches already on their way when the first READONLY came reach it.
    let mut sources = Vec::new();
    let mut attempts_after_first_fallback = None;
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        let answer = sluice.call(ask()).await;
        let from = source(&answer);
        if from == "fallback" && attempts_after_first_fallback.is_none() {
            tokio::time::sleep(IN_FLIGHT_GRACE).await;
            attempts_after_first_fallback = Some(evalsha_attempts(node.port));
        }
        sources.push(from);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let Some(attempts_then) = attempts_after_first_fallback else {
        panic!("no answer came from the fallback while the node was a replica: {sources:?}");
    };
    let attempts_at_end = evalsha_attempts(node.port);
    println!(
        "--- node turned replica: {} requests, {} answered by the fallback; EVALSHA attempts \
         on the replica after the first fallback answer + {IN_FLIGHT_GRACE:?}: {}",
        sources.len(),
        sources.iter().filter(|s| *s == "fallback").count(),
        attempts_at_end - attempts_then
    );
    assert_eq!(
        attempts_at_end, attempts_then,
        "sluice kept writing to a replica"
    );

    assert_eq!(
        node.cmd(&["REPLICAOF", "NO", "ONE"]),
        Resp::Simple("OK".into())
    );
    let back = Instant::now();
    let deadline = back + Duration::from_secs(5);
    loop {
        let answer = sluice.call(ask()).await;
        if source(&answer) == "redis" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "counting did not return to the node within 5 s of it being master again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "  counted on the node again {:?} after REPLICAOF NO ONE",
        back.elapsed()
    );
    sluice.stop().await;
}

/// Polls `check` every 50 ms until it holds, for at most 15 s.
async fn wait_until_async<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within 15 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_with_one_sentinel_moves_the_writes_at_once() {
    run_failover(1, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_with_three_sentinels_one_restarted_moves_the_writes_at_once() {
    run_failover(3, true).await;
}
