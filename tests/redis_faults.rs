//! The fault matrix: how many requests the real `sluice` binary admits on one key while its
//! Redis fails under load, one case per fault, each judged by the same bounds.
//!
//! Every case starts its own `redis-server` (or master, replica and sentinel) and one or three
//! `sluice` processes on it (with three, `SLUICE_FALLBACK_REPLICAS=3` and the load spread over
//! them), sends a paced load from tonic clients on one fixed-window key (`query_per_hour`,
//! route `fallback: local`, the default 10 ms timeout) for about 1.75 times its limit, injects
//! the fault while the count is about half way, recovers it, and then prints one line
//! (`fault-matrix: fault=... replicas=... admitted=... limit=... ratio=... redis=... errors=...
//! recovery=...`; `scripts/faults.sh` makes a table of them) and asserts:
//! - no gRPC error: every request is answered, by Redis or by the fallback;
//! - admitted <= limit x 1.02: the fallback continues Redis's count (its share of it) and owes
//!   what it admits, so the fault does not hand out a second limit;
//! - Redis's final counter >= admitted: every admission ends up in Redis's count (the
//!   fallback's through the write-back), so the next fault starts from the truth;
//! - the fault happened as meant (the store errors metric says `oom`, `/readyz` names the
//!   password, the fallback answered during the failover) and counting went back to Redis.
//!
//! A Redis restarted without persistence has lost its count: the write-back carries the count
//! each replica last saw in the window as a floor, so it gets it back, and the same bounds
//! hold; the same restart on a Redis with an fsynced append-only file is a case of its own.
//!
//! Recovery is the time from the fault's end (the last `CLIENT KILL`, `maxmemory 0`,
//! `requirepass ""`, the sentinel naming the new master) to the first answer from Redis.
//!
//! The healthy case (no fault, many streams) runs at full size (1,000 streams, 100,000
//! requests) with `SLUICE_FAULTS_FULL=1` (as `scripts/faults.sh` does), at a fifth of it
//! without.
//!
//! Real time and real processes: nothing here asserts on speed (recovery is printed, the
//! bounds are counts), and the cases take turns (a busy two-core machine would otherwise
//! measure itself). A case lasts about 20 s.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::http::get;
use common::metrics::scrape;
use common::redis::RedisServer;
use common::resp::{Resp, info, resp, resp_as};
use common::rls::{Code, RateLimitServiceClient, desc, metadata, request};
use common::sentinel::{RedisSentinel, SENTINEL_SERVICE};
use common::sluice::SluiceProcess;
use common::{HOUR, now_ms};
use tempfile::TempDir;
use tokio::time::Instant;
use tonic::transport::Channel;

/// The key's limit in the fault cases, an hour's fixed window.
const LIMIT: u64 = 20_000;
/// Requests sent in a fault case: 1.75 x the limit, so the limit is crossed during or after
/// the fault.
const TOTAL: u64 = LIMIT * 7 / 4;
/// The whole load's pace (requests per second): [`TOTAL`] takes 14 s.
const RATE: f64 = 2_500.0;
/// Tasks sending it, each waiting for its answer before taking the next request.
const TASKS: usize = 64;
/// When the fault starts: 10,000 requests in, half the limit.
const FAULT_AT: Duration = Duration::from_secs(4);
/// How long the OOM and password faults last.
const FAULT_FOR: Duration = Duration::from_secs(5);
/// The bound on admissions: the limit plus 2%.
const SLACK: f64 = 1.02;
/// The password of the NOAUTH case.
const PASSWORD: &str = "faults-sekrit";
/// Everything a case's load may take before it is cut off (it takes ~14 s when on pace).
const LOAD_AT_MOST: Duration = Duration::from_secs(60);

/// The cases take turns: two loads on two cores at once would measure the machine.
static ONE_RUN_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The measured key: one route, one fixed window, the local fallback.
fn limits(limit: u64) -> String {
    format!(
        "domain: faults\nroutes:\n  - name: key\n    fallback: local\n    \
         global_threshold: {{ query_per_hour: {limit} }}\n"
    )
}

/// Another domain, for waiting until each process counts in Redis without touching the
/// measured key.
const WARM: &str = "domain: warm\nroutes:\n  - name: up\n    fallback: local\n    \
                    global_threshold: { query_per_hour: 1000000 }\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// `CLIENT KILL TYPE normal` three times, 300 ms apart: sluice's connections cut.
    ClientKill,
    /// `maxmemory 1mb` (`noeviction`) over more than that for [`FAULT_FOR`], then
    /// `maxmemory 0`: Redis answers and refuses every write.
    Oom,
    /// SIGKILL, then a restart that requires a password (NOAUTH) for [`FAULT_FOR`], then
    /// `CONFIG SET requirepass ""`. The restarted Redis is empty (no persistence).
    NoAuthRestart,
    /// The same on a Redis with an append-only file fsynced on every write, so the restart
    /// keeps every count: what tells the loss of the empty restart from sluice's own doing.
    NoAuthRestartAof,
    /// SIGKILL of the Sentinel master: the fallback answers until the sentinel promotes the
    /// replica (down after 5 s) and sluice counts there.
    SentinelMasterKill,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::ClientKill => "client-kill-x3",
            Fault::Oom => "oom-maxmemory-1mb",
            Fault::NoAuthRestart => "restart-requirepass",
            Fault::NoAuthRestartAof => "restart-requirepass-aof",
            Fault::SentinelMasterKill => "sentinel-master-sigkill",
        }
    }
}

/// The Redis of a case: one node, or a master, a replica and a sentinel.
enum Redis {
    One(RedisServer),
    Sentinel(RedisSentinel),
}

impl Redis {
    fn start(fault: Fault) -> Self {
        match fault {
            Fault::SentinelMasterKill => Redis::Sentinel(RedisSentinel::start(1)),
            Fault::NoAuthRestartAof => Redis::One(RedisServer::start_with(&[
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])),
            _ => Redis::One(RedisServer::start()),
        }
    }

    fn url(&self) -> String {
        match self {
            Redis::One(r) => r.url(),
            Redis::Sentinel(s) => s.url(),
        }
    }

    /// The node that holds the count once the fault is over (the promoted replica after a
    /// failover).
    fn counting_node(&self, failed_over: bool) -> &RedisServer {
        match self {
            Redis::One(r) => r,
            Redis::Sentinel(s) if failed_over => &s.replica,
            Redis::Sentinel(s) => &s.master,
        }
    }

    fn one(&mut self) -> &mut RedisServer {
        match self {
            Redis::One(r) => r,
            Redis::Sentinel(_) => panic!("a single-node fault on a sentinel setup"),
        }
    }
}

/// What Redis holds for the measured key: the sum over its window keys (one, unless an hour
/// boundary fell into the run, which [`clear_of_hour_boundary`] prevents).
fn redis_counter(node: &RedisServer) -> (i64, Vec<String>) {
    let keys: Vec<String> = node
        .keys(0, "sluice:{faults*")
        .iter()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    let total = keys
        .iter()
        .map(|key| match node.cmd(&["GET", key]) {
            Resp::Bulk(v) => String::from_utf8_lossy(&v).parse::<i64>().unwrap_or(0),
            _ => 0,
        })
        .sum();
    (total, keys)
}

/// Waits for the next hour when less than `needed` is left of this one: an hour's fixed
/// window that ends mid-run would hand out a second limit and spread the count over two keys.
async fn clear_of_hour_boundary(needed: Duration) {
    let left = HOUR - now_ms() % HOUR;
    if u128::from(left) < needed.as_millis() {
        println!("waiting {left} ms for the next hour's window");
        tokio::time::sleep(Duration::from_millis(left + 200)).await;
    }
}

/// The sluice processes of a case, all on one Redis.
struct Fleet {
    processes: Vec<SluiceProcess>,
    _dir: TempDir,
}

impl Fleet {
    async fn start(url: &str, replicas: usize, limit: u64) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("faults.yaml"), limits(limit)).expect("write limits");
        std::fs::write(dir.path().join("warm.yaml"), WARM).expect("write limits");
        let shares = replicas.to_string();
        let processes: Vec<SluiceProcess> = (0..replicas)
            .map(|_| {
                SluiceProcess::spawn(
                    dir.path(),
                    &[
                        ("SLUICE_BACKEND", "redis"),
                        ("SLUICE_REDIS_URL", url),
                        ("SLUICE_FALLBACK_REPLICAS", &shares),
                        // Breaker transitions and write-backs are logged at info.
                        ("SLUICE_LOG", "info"),
                        ("NO_COLOR", "1"),
                    ],
                )
            })
            .collect();
        for p in &processes {
            until_counted_in_redis(p).await;
        }
        Self {
            processes,
            _dir: dir,
        }
    }

    /// Every process's output, for a failure message.
    fn output(&self) -> String {
        self.processes
            .iter()
            .enumerate()
            .map(|(i, p)| format!("--- sluice #{i} ---\n{}", tail(&p.output(), 60)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits (at most 15 s) until `process` answers from Redis, on the warm-up domain.
async fn until_counted_in_redis(process: &SluiceProcess) {
    let mut client = process.client().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = String::new();
    while Instant::now() < deadline {
        let ask = request("warm", vec![desc(&[("route", "up")])]);
        match client.should_rate_limit(ask).await {
            Ok(r) if metadata(r.get_ref(), "source") == Some("redis") => return,
            other => last = format!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "sluice did not count in Redis within 15 s; last answer {last}\n{}",
        process.output()
    );
}

/// One request of the load.
#[derive(Clone, Debug)]
struct Answer {
    /// When it was sent and answered, from the load's start.
    sent: Duration,
    answered: Duration,
    /// Which sluice process it went to.
    process: usize,
    /// Admitted or not and the answer's `source`, or the gRPC error.
    outcome: Result<(bool, String), String>,
}

impl Answer {
    fn admitted(&self) -> bool {
        matches!(self.outcome, Ok((true, _)))
    }

    fn source(&self) -> Option<&str> {
        self.outcome.as_ref().ok().map(|(_, s)| s.as_str())
    }
}

/// The load: `tasks` tasks over `clients` (task k on client k mod n), `total` requests on the
/// measured key, request n sent at `n / rate` seconds from `start` (or at once without a
/// rate), each task waiting for its answer before taking the next. Bounded by
/// [`LOAD_AT_MOST`] too.
fn spawn_load(
    clients: Vec<(usize, RateLimitServiceClient<Channel>)>,
    tasks: usize,
    total: u64,
    rate: Option<f64>,
    start: Instant,
) -> Vec<tokio::task::JoinHandle<Vec<Answer>>> {
    let next = Arc::new(AtomicU64::new(0));
    (0..tasks)
        .map(|k| {
            let (process, mut client) = clients[k % clients.len()].clone();
            let next = Arc::clone(&next);
            tokio::spawn(async move {
                let mut answers = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= total || start.elapsed() >= LOAD_AT_MOST {
                        break;
                    }
                    if let Some(rate) = rate {
                        tokio::time::sleep_until(start + Duration::from_secs_f64(n as f64 / rate))
                            .await;
                    }
                    let sent = start.elapsed();
                    let ask = request("faults", vec![desc(&[("route", "key")])]);
                    let answer =
                        tokio::time::timeout(Duration::from_secs(5), client.should_rate_limit(ask))
                            .await;
                    let outcome = match answer {
                        Ok(Ok(r)) => {
                            let r = r.into_inner();
                            Ok((
                                r.overall_code == Code::Ok as i32,
                                metadata(&r, "source").unwrap_or("").to_string(),
                            ))
                        }
                        Ok(Err(status)) => {
                            Err(format!("{:?}: {}", status.code(), status.message()))
                        }
                        Err(_) => Err("no answer within 5 s".to_string()),
                    };
                    answers.push(Answer {
                        sent,
                        answered: start.elapsed(),
                        process,
                        outcome,
                    });
                }
                answers
            })
        })
        .collect()
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Vec<Answer>>>) -> Vec<Answer> {
    let mut answers = Vec::new();
    for t in tasks {
        answers.extend(t.await.expect("load task"));
    }
    answers.sort_by_key(|a| a.sent);
    answers
}

/// Runs a blocking kit call (redis-cli, RESP) without stalling the load's tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// The sum of the samples of `name` whose labels contain every one of `labels`
/// (`kind="oom"`), over a Prometheus text page.
fn metric_where(page: &str, name: &str, labels: &[&str]) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labelset, value) = match rest.strip_prefix('{') {
                Some(r) => r.rsplit_once('}')?,
                None => ("", rest),
            };
            if !labels.iter().all(|want| labelset.contains(want)) {
                return None;
            }
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

/// What a fault did, as seen while it ran.
#[derive(Default)]
struct Seen {
    /// When it started and ended, from the load's start.
    began: Duration,
    ended: Duration,
    /// The distinct `/readyz` bodies of the first process during the fault.
    readyz: Vec<String>,
    /// Notes for the report (Redis's counter when the fault began, memory used, ...).
    notes: Vec<String>,
    /// Redis's counter of the key when the fault began (what an empty restart loses).
    counter_at_fault: i64,
    failed_over: bool,
}

/// Polls `/readyz` of `http` every 200 ms until `until`, keeping each distinct body.
async fn watch_readyz(http: SocketAddr, until: Instant, seen: &mut Vec<String>) {
    while Instant::now() < until {
        let body = get(http, "/readyz").await.body;
        if !seen.contains(&body) {
            seen.push(body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Injects `fault` at [`FAULT_AT`] after `start` and recovers it.
async fn inject(fault: Fault, redis: &mut Redis, http: SocketAddr, start: Instant) -> Seen {
    let mut seen = Seen::default();
    tokio::time::sleep_until(start + FAULT_AT).await;
    seen.counter_at_fault = blocking(|| redis_counter(redis.counting_node(false)).0);
    seen.began = start.elapsed();
    match fault {
        Fault::ClientKill => {
            for i in 0..3 {
                let killed = blocking(|| redis.one().cli(&["CLIENT", "KILL", "TYPE", "normal"]));
                seen.notes.push(format!("kill {i}: {killed} clients"));
                if i < 2 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
            seen.ended = start.elapsed();
            watch_readyz(
                http,
                Instant::now() + Duration::from_secs(1),
                &mut seen.readyz,
            )
            .await;
        }
        Fault::Oom => {
            blocking(|| {
                let node = redis.one();
                node.cli(&["CONFIG", "SET", "maxmemory", "1mb"]);
            });
            watch_readyz(http, start + FAULT_AT + FAULT_FOR, &mut seen.readyz).await;
            blocking(|| redis.one().cli(&["CONFIG", "SET", "maxmemory", "0"]));
            seen.ended = start.elapsed();
        }
        Fault::NoAuthRestart | Fault::NoAuthRestartAof => {
            blocking(|| {
                let node = redis.one();
                node.kill9();
                node.restart_with(&["--requirepass", PASSWORD]);
            });
            watch_readyz(http, start + FAULT_AT + FAULT_FOR, &mut seen.readyz).await;
            let port = redis.one().port;
            let reply = blocking(|| {
                resp_as(
                    port,
                    Some(("default", PASSWORD)),
                    &["CONFIG", "SET", "requirepass", ""],
                )
            });
            assert_eq!(
                reply,
                Resp::Simple("OK".into()),
                "CONFIG SET requirepass \"\""
            );
            seen.ended = start.elapsed();
        }
        Fault::SentinelMasterKill => {
            let Redis::Sentinel(setup) = redis else {
                panic!("the sentinel fault needs the sentinel setup")
            };
            blocking(|| setup.master.kill9());
            let replica = setup.replica.port.to_string().into_bytes();
            let sentinel = setup.sentinels[0].port;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let named = blocking(|| {
                    resp(
                        sentinel,
                        &["SENTINEL", "get-master-addr-by-name", SENTINEL_SERVICE],
                    )
                });
                if matches!(&named, Resp::Array(a) if a.get(1) == Some(&Resp::Bulk(replica.clone())))
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the sentinel did not promote the replica within 30 s: {named:?}"
                );
                let body = get(http, "/readyz").await.body;
                if !seen.readyz.contains(&body) {
                    seen.readyz.push(body);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            seen.ended = start.elapsed();
            seen.failed_over = true;
        }
    }
    seen
}

/// Metrics of every process, summed: the fallback's ledger, the breaker, store errors.
struct Totals {
    owed_now: f64,
    active: f64,
    hits: BTreeMap<&'static str, f64>,
    opened: f64,
    closed: f64,
    errors: BTreeMap<String, f64>,
}

async fn totals(fleet: &Fleet) -> Totals {
    let mut t = Totals {
        owed_now: 0.0,
        active: 0.0,
        hits: BTreeMap::new(),
        opened: 0.0,
        closed: 0.0,
        errors: BTreeMap::new(),
    };
    for p in &fleet.processes {
        let page = scrape(p.http_addr).await;
        t.owed_now += metric_where(&page, "sluice_fallback_owed_hits", &[]);
        t.active += metric_where(&page, "sluice_fallback_active", &[]);
        for state in ["owed", "written_back", "expired", "forgiven", "refused"] {
            *t.hits.entry(state).or_default() += metric_where(
                &page,
                "sluice_fallback_hits_total",
                &[&format!("state=\"{state}\"")],
            );
        }
        t.opened += metric_where(&page, "sluice_breaker_transitions_total", &["to=\"open\""]);
        t.closed += metric_where(
            &page,
            "sluice_breaker_transitions_total",
            &["to=\"closed\""],
        );
        for line in page.lines() {
            if let Some(rest) = line.strip_prefix("sluice_store_errors_total{")
                && let Some((labels, value)) = rest.rsplit_once('}')
                && let Some(kind) = labels
                    .split(',')
                    .find_map(|l| l.strip_prefix("kind=\""))
                    .map(|k| k.trim_end_matches('"').to_string())
            {
                *t.errors.entry(kind).or_default() += value.trim().parse::<f64>().unwrap_or(0.0);
            }
        }
    }
    t
}

/// Waits (at most 10 s) until no process owes a hit or answers from the fallback: every
/// admission is in Redis's counter from then on.
async fn settled(fleet: &Fleet) -> Totals {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = totals(fleet).await;
        if (t.owed_now == 0.0 && t.active == 0.0) || Instant::now() >= deadline {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What one case measured.
struct Measured {
    case: String,
    replicas: usize,
    admitted: u64,
    limit: u64,
    counter: i64,
    errors: usize,
    recovery: Option<Duration>,
}

impl Measured {
    fn ratio(&self) -> f64 {
        self.admitted as f64 / self.limit as f64
    }

    /// The one line `scripts/faults.sh` reads.
    fn print(&self) {
        println!(
            "fault-matrix: fault={} replicas={} admitted={} limit={} ratio={:.4} redis={} \
             errors={} recovery={}",
            self.case,
            self.replicas,
            self.admitted,
            self.limit,
            self.ratio(),
            self.counter,
            self.errors,
            self.recovery
                .map_or("never".to_string(), |d| format!("{}ms", d.as_millis())),
        );
    }
}

/// Admitted answers per source, and refused ones, in each second of the run (relative to
/// the fault's start when there is one): where an over-admission came from.
fn timeline(answers: &[Answer], fault_at: Option<Duration>) -> String {
    let mut rows: BTreeMap<i64, BTreeMap<String, (u64, u64)>> = BTreeMap::new();
    let origin = fault_at.unwrap_or_default().as_millis() as i64;
    for a in answers {
        let second = (a.answered.as_millis() as i64 - origin).div_euclid(1000);
        let source = a.source().unwrap_or("error").to_string();
        let cell = rows.entry(second).or_default().entry(source).or_default();
        if a.admitted() {
            cell.0 += 1;
        } else {
            cell.1 += 1;
        }
    }
    let mut cumulative = 0;
    rows.iter()
        .map(|(second, sources)| {
            let admitted: u64 = sources.values().map(|c| c.0).sum();
            cumulative += admitted;
            let cells: Vec<String> = sources
                .iter()
                .map(|(s, (ok, over))| format!("{s} {ok} ok/{over} over"))
                .collect();
            format!(
                "  t{second:+}s: {} (admitted so far {cumulative})",
                cells.join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One fault case: see the module documentation.
async fn run_fault(fault: Fault, replicas: usize) {
    let _turn = ONE_RUN_AT_A_TIME.lock().await;
    let mut redis = Redis::start(fault);
    if fault == Fault::Oom {
        // More than 1mb in use, so `maxmemory 1mb` is really exceeded: 600 KB of filler.
        let node = redis.one();
        let filler = "x".repeat(100 * 1024);
        for i in 0..6 {
            let key = format!("filler:{i}");
            assert_eq!(node.cmd(&["SET", &key, &filler]), Resp::Simple("OK".into()));
        }
        node.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    }
    let fleet = Fleet::start(&redis.url(), replicas, LIMIT).await;
    if fault == Fault::Oom {
        let used: u64 = info(redis.one().port, "memory")
            .get("used_memory")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(
            used > 1024 * 1024,
            "Redis uses only {used} bytes, not over 1mb"
        );
    }
    let mut clients = Vec::new();
    // Several connections per process, as several Envoys would open.
    for (i, p) in fleet.processes.iter().enumerate() {
        for _ in 0..4 {
            clients.push((i, p.client().await));
        }
    }
    clear_of_hour_boundary(Duration::from_secs(40)).await;
    let start = Instant::now();
    let load = spawn_load(clients, TASKS, TOTAL, Some(RATE), start);
    let seen = inject(fault, &mut redis, fleet.processes[0].http_addr, start).await;
    let answers = collect(load).await;
    let t = settled(&fleet).await;
    let (counter, keys) = blocking(|| redis_counter(redis.counting_node(seen.failed_over)));

    let admitted = answers.iter().filter(|a| a.admitted()).count() as u64;
    let errors: Vec<&Answer> = answers.iter().filter(|a| a.outcome.is_err()).collect();
    let recovery = answers
        .iter()
        .find(|a| a.sent >= seen.ended && a.source() == Some("redis"))
        .map(|a| a.answered.saturating_sub(seen.ended));
    let measured = Measured {
        case: fault.name().to_string(),
        replicas,
        admitted,
        limit: LIMIT,
        counter,
        errors: errors.len(),
        recovery,
    };
    measured.print();
    let fallback_admitted = answers
        .iter()
        .filter(|a| a.admitted() && a.source() == Some("fallback"))
        .count();
    let per_process: Vec<usize> = (0..replicas)
        .map(|i| answers.iter().filter(|a| a.process == i).count())
        .collect();
    println!(
        "{}: {} requests in {:?} (per process {per_process:?}); fault from {:?} to {:?}; Redis's \
         counter {} when it began; {fallback_admitted} admitted by the fallback; fallback hits \
         {:?}; breaker opened {} closed {} times; store errors {:?}; keys {keys:?}; {}",
        fault.name(),
        answers.len(),
        answers.last().map(|a| a.answered).unwrap_or_default(),
        seen.began,
        seen.ended,
        seen.counter_at_fault,
        t.hits,
        t.opened,
        t.closed,
        t.errors,
        seen.notes.join("; "),
    );
    println!("/readyz during the fault: {:?}", seen.readyz);
    // Per process: when it first answered from Redis after the fault, and what Redis admitted
    // through it in the second after: a process back on Redis counts against what Redis holds,
    // which lacks the hits still owed by the processes whose breaker is still open.
    let back: Vec<String> = (0..replicas)
        .map(|i| {
            let mine = || {
                answers
                    .iter()
                    .filter(move |a| a.process == i && a.sent >= seen.ended)
            };
            let first = mine()
                .find(|a| a.source() == Some("redis"))
                .map(|a| a.answered.saturating_sub(seen.ended));
            let admitted = mine()
                .filter(|a| {
                    a.admitted()
                        && a.source() == Some("redis")
                        && a.sent < seen.ended + Duration::from_secs(1)
                })
                .count();
            format!(
                "#{i}: first from Redis at +{}, {admitted} admitted by Redis in the second after",
                first.map_or("never".to_string(), |d| format!("{}ms", d.as_millis()))
            )
        })
        .collect();
    println!("after the fault: {}", back.join("; "));
    println!(
        "admitted and refused per second from the fault's start, by source:\n{}",
        timeline(&answers, Some(seen.began))
    );

    let mut failures = Vec::new();
    if answers.len() as u64 != TOTAL {
        failures.push(format!(
            "the load did not run: {} of {TOTAL} requests within {LOAD_AT_MOST:?}",
            answers.len()
        ));
    }
    if !errors.is_empty() {
        failures.push(format!(
            "{} requests got a gRPC error, first ones: {:?}",
            errors.len(),
            &errors[..errors.len().min(5)]
        ));
    }
    if t.owed_now > 0.0 || t.active > 0.0 {
        failures.push(format!(
            "10 s after the load, {} hits still owed and {} processes on the fallback",
            t.owed_now, t.active
        ));
    }
    // An empty restart loses what Redis counted before it died; the write-back carries the
    // count each replica last saw in the window as a floor, so the restarted Redis gets it
    // back and the plain bound holds there too. What a replica last saw may lag the true
    // count by the calls in flight when Redis died (answered to the others), so Redis's
    // counter may be short of the admissions by at most those.
    let lost = match fault {
        Fault::NoAuthRestart => TASKS as u64,
        _ => 0,
    };
    let bound = (LIMIT as f64 * SLACK) as u64;
    if admitted > bound {
        failures.push(format!(
            "{admitted} admitted, more than {bound} (limit {LIMIT} x {SLACK})"
        ));
    }
    if counter + (lost as i64) < admitted as i64 {
        failures.push(format!(
            "Redis counts {counter} (+{lost} in flight at the restart) for {admitted} \
             admitted: admissions unaccounted for"
        ));
    }
    if admitted >= TOTAL {
        failures.push("nothing was refused: the limit was never reached".into());
    }
    if recovery.is_none() {
        failures.push("no answer came from Redis after the fault ended".into());
    }
    match fault {
        Fault::Oom => {
            let oom = t.errors.get("oom").copied().unwrap_or(0.0);
            if oom == 0.0 {
                failures.push(format!(
                    "no store error of kind oom: the OOM did not happen ({:?})",
                    t.errors
                ));
            }
        }
        Fault::NoAuthRestart | Fault::NoAuthRestartAof => {
            if !seen.readyz.iter().any(|b| b.contains("NOAUTH")) {
                failures.push(format!(
                    "/readyz never named NOAUTH during the fault: {:?}",
                    seen.readyz
                ));
            }
        }
        Fault::SentinelMasterKill => {
            if fallback_admitted == 0 {
                failures.push("the fallback admitted nothing during the failover".into());
            }
        }
        Fault::ClientKill => {}
    }
    assert!(
        failures.is_empty(),
        "{} x{replicas}: {} check(s) failed (the timeline is printed above):\n- {}\n{}",
        fault.name(),
        failures.len(),
        failures.join("\n- "),
        fleet.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_one_replica() {
    run_fault(Fault::ClientKill, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_three_replicas() {
    run_fault(Fault::ClientKill, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_one_replica() {
    run_fault(Fault::Oom, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_three_replicas() {
    run_fault(Fault::Oom, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_requiring_a_password_one_replica() {
    run_fault(Fault::NoAuthRestart, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_requiring_a_password_three_replicas() {
    run_fault(Fault::NoAuthRestart, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_restart_requiring_a_password_one_replica() {
    run_fault(Fault::NoAuthRestartAof, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_master_killed_one_replica() {
    run_fault(Fault::SentinelMasterKill, 1).await;
}

/// Three replicas whose breakers close a few hundred ms apart, each after its own
/// reconnection through the sentinel: each writes back what it admitted before its breaker
/// closes, so the first back does not count against a Redis without the others' hits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_master_killed_three_replicas() {
    run_fault(Fault::SentinelMasterKill, 3).await;
}

/// No fault: many concurrent streams on one replica, as fast as they go. Requests that wait
/// behind sluice's own queue past the 10 ms budget are answered by the fallback and written
/// back (or, when their call had left, forgiven: Redis counted it), so Redis decides the
/// limit and its counter accounts for every hit exactly once: the admissions, plus the
/// refused hits Redis itself saw (a fixed window counts every hit that reaches it, about one
/// per stream in flight when the limit is crossed), within 1%.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_many_streams_one_replica() {
    let _turn = ONE_RUN_AT_A_TIME.lock().await;
    let full = std::env::var("SLUICE_FAULTS_FULL").is_ok_and(|v| v == "1");
    let (limit, streams, total) = if full {
        (50_000, 1_000, 100_000)
    } else {
        (10_000, 200, 20_000)
    };
    let redis = RedisServer::start();
    let fleet = Fleet::start(&redis.url(), 1, limit).await;
    let mut clients = Vec::new();
    for _ in 0..(streams / 25).max(1) {
        clients.push((0, fleet.processes[0].client().await));
    }
    clear_of_hour_boundary(Duration::from_secs(90)).await;
    let start = Instant::now();
    let answers = collect(spawn_load(clients, streams, total, None, start)).await;
    let t = settled(&fleet).await;
    let (counter, keys) = redis_counter(&redis);
    let admitted = answers.iter().filter(|a| a.admitted()).count() as u64;
    let errors: Vec<&Answer> = answers.iter().filter(|a| a.outcome.is_err()).collect();
    let measured = Measured {
        case: format!("none-{streams}-streams"),
        replicas: 1,
        admitted,
        limit,
        counter,
        errors: errors.len(),
        recovery: None,
    };
    measured.print();
    let fallback_admitted = answers
        .iter()
        .filter(|a| a.admitted() && a.source() == Some("fallback"))
        .count();
    println!(
        "healthy: {} requests in {:?}; {fallback_admitted} admitted by the fallback (queued \
         past the budget); fallback hits {:?}; breaker opened {} times; store errors {:?}; \
         keys {keys:?}",
        answers.len(),
        answers.last().map(|a| a.answered).unwrap_or_default(),
        t.hits,
        t.opened,
        t.errors,
    );
    println!("per second, by source:\n{}", timeline(&answers, None));
    let mut failures = Vec::new();
    if answers.len() as u64 != total {
        failures.push(format!(
            "the load did not run: {} of {total}",
            answers.len()
        ));
    }
    if !errors.is_empty() {
        failures.push(format!(
            "{} gRPC errors, first ones: {:?}",
            errors.len(),
            &errors[..errors.len().min(5)]
        ));
    }
    if admitted > limit + limit / 100 {
        failures.push(format!("{admitted} admitted, more than {limit} + 1%"));
    }
    // Hits Redis refused are in its counter too (a fixed window counts them).
    let refused_by_redis = answers
        .iter()
        .filter(|a| !a.admitted() && a.source() == Some("redis"))
        .count() as u64;
    let accounted = admitted + refused_by_redis;
    println!(
        "healthy: {admitted} admitted + {refused_by_redis} refused by Redis = {accounted}; \
         Redis's counter {counter}"
    );
    if (counter as u64) < admitted {
        failures.push(format!(
            "Redis counts {counter} for {admitted} admitted: admissions unaccounted for"
        ));
    }
    if counter.abs_diff(accounted as i64) > accounted / 100 {
        failures.push(format!(
            "Redis counts {counter} for {accounted} hits it should hold ({admitted} admitted, \
             {refused_by_redis} refused by Redis): more than 1% apart"
        ));
    }
    assert!(
        failures.is_empty(),
        "healthy: {} check(s) failed (the timeline is printed above):\n- {}\n{}",
        failures.len(),
        failures.join("\n- "),
        fleet.output()
    );
}
