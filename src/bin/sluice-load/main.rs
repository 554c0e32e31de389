//! `sluice-load`: a load generator for Envoy RLS v3 servers (sluice, the `sluice baseline`
//! no-op, or any other `ShouldRateLimit` implementation).
//!
//! Sends unary `ShouldRateLimit` calls from `-c` workers over `--connections` HTTP/2
//! connections, for `-n` requests or `-z` time (whichever ends first), unpaced or at a target
//! `--rps`. Each `--descriptor` is a template (`route=api,x-api-key=key-{rand:1000}`): every
//! `{rand:N}` becomes a random integer in `0..N` per request, so N is the cardinality of that
//! value. Reports throughput, answers (OK / OVER_LIMIT), errors by gRPC code and latency
//! percentiles from an HdrHistogram; `--json` prints the same as JSON.
//!
//! Latency is measured from the moment a request was due: when unpaced, the moment it is sent;
//! with `--rps`, its slot in the schedule when the worker is late for it, so a server that
//! falls behind shows the queueing it causes (no coordinated omission). A worker early for its
//! slot sleeps and starts the clock when it sends (the timer's own lateness is not the
//! server's).
//!
//! Everything is bounded: worker and connection counts are capped, every call has a timeout,
//! and a run without `-n` or `-z` stops after 10 000 requests.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::json;
use sluice::proto::rls::rate_limit_response::Code;
use sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient;
use tonic::transport::{Channel, Endpoint};

mod template;

use template::{Rng, Template, build_request, parse_template};

const MAX_CONCURRENCY: usize = 10_000;
const MAX_CONNECTIONS: usize = 1_000;
const DEFAULT_REQUESTS: u64 = 10_000;

#[derive(Parser, Debug)]
#[command(
    name = "sluice-load",
    version,
    about = "Load generator for Envoy RLS v3 (ShouldRateLimit over gRPC)"
)]
struct Args {
    /// Server address: host:port or http://host:port
    #[arg(default_value = "127.0.0.1:8081")]
    target: String,
    /// Concurrent workers, each with one request in flight
    #[arg(short = 'c', long, default_value_t = 16)]
    concurrency: usize,
    /// HTTP/2 connections the workers share (round robin)
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Total requests (default 10000 when -z is not given either)
    #[arg(short = 'n', long)]
    requests: Option<u64>,
    /// Duration of the run, e.g. 10s or 1m
    #[arg(short = 'z', long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Target rate in requests per second over all workers (default: as fast as possible)
    #[arg(long)]
    rps: Option<f64>,
    /// Rate limit domain
    #[arg(long, default_value = "edge")]
    domain: String,
    /// Descriptor template, repeatable (one descriptor each): key=value pairs separated by
    /// commas; {rand:N} in a value is replaced by a random integer below N per request
    #[arg(long = "descriptor", short = 'd', default_value = "route=api")]
    descriptors: Vec<String>,
    /// The request's hits_addend (0 means 1)
    #[arg(long, default_value_t = 0)]
    hits_addend: u32,
    /// Timeout of each call; a call past it counts as a DeadlineExceeded error
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    timeout: Duration,
    /// Runtime worker threads (default: one per CPU)
    #[arg(long)]
    threads: Option<usize>,
    /// Seed of the random values (default: from the clock)
    #[arg(long)]
    seed: Option<u64>,
    /// Print the report as JSON to stdout; --json=PATH writes it to PATH instead (and the text
    /// report still prints)
    #[arg(
        long,
        value_name = "PATH",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "-"
    )]
    json: Option<String>,
}

/// What one worker saw.
struct Tally {
    latency_ns: Histogram<u64>,
    ok: u64,
    over_limit: u64,
    unknown_code: u64,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> Self {
        Self {
            // 1 µs .. 1 h at 3 significant digits.
            latency_ns: Histogram::new_with_bounds(1_000, 3_600_000_000_000, 3)
                .expect("histogram bounds"),
            ok: 0,
            over_limit: 0,
            unknown_code: 0,
            errors: BTreeMap::new(),
        }
    }

    fn merge(&mut self, other: Tally) {
        self.latency_ns
            .add(&other.latency_ns)
            .expect("same histogram bounds");
        self.ok += other.ok;
        self.over_limit += other.over_limit;
        self.unknown_code += other.unknown_code;
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    fn requests(&self) -> u64 {
        self.ok + self.over_limit + self.unknown_code + self.error_count()
    }
}

struct Plan {
    domain: String,
    templates: Vec<Template>,
    hits_addend: u32,
    total: Option<u64>,
    deadline: Option<Instant>,
    start: Instant,
    rps: Option<f64>,
    timeout: Duration,
    issued: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
    stop: AtomicBool,
}

impl Plan {
    /// The index of the next request to send, or None when the run is over.
    fn next(&self) -> Option<u64> {
        if self.stop.load(Ordering::Relaxed) {
            return None;
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        let i = self.issued.fetch_add(1, Ordering::Relaxed);
        if self.total.is_some_and(|n| i >= n) {
            return None;
        }
        Some(i)
    }
}

async fn worker(plan: Arc<Plan>, mut client: RateLimitServiceClient<Channel>, seed: u64) -> Tally {
    let mut tally = Tally::new();
    let mut rng = Rng(seed);
    while let Some(i) = plan.next() {
        let due = match plan.rps {
            Some(rps) => {
                let due = plan.start + Duration::from_secs_f64(i as f64 / rps);
                if plan.deadline.is_some_and(|d| due >= d) {
                    break;
                }
                if due > Instant::now() {
                    // Ahead of schedule: wait for the slot. Tokio's timer wakes up to a
                    // millisecond late; that delay is ours, not the server's, so the clock
                    // starts when the request actually leaves.
                    tokio::time::sleep_until(due.into()).await;
                    Instant::now()
                } else {
                    // Behind schedule: the server kept this worker busy past the slot, and
                    // the wait counts (no coordinated omission).
                    due
                }
            }
            None => Instant::now(),
        };
        let request = build_request(&plan.domain, &plan.templates, plan.hits_addend, &mut rng);
        let answer = tokio::time::timeout(plan.timeout, client.should_rate_limit(request)).await;
        let elapsed = due.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        tally.latency_ns.saturating_record(elapsed.max(1_000));
        match answer {
            Ok(Ok(response)) => match Code::try_from(response.get_ref().overall_code) {
                Ok(Code::Ok) => tally.ok += 1,
                Ok(Code::OverLimit) => tally.over_limit += 1,
                _ => tally.unknown_code += 1,
            },
            Ok(Err(status)) => {
                plan.failed.fetch_add(1, Ordering::Relaxed);
                *tally
                    .errors
                    .entry(format!("{:?}", status.code()))
                    .or_default() += 1;
            }
            Err(_) => {
                plan.failed.fetch_add(1, Ordering::Relaxed);
                *tally
                    .errors
                    .entry("DeadlineExceeded".to_string())
                    .or_default() += 1;
            }
        }
        plan.done.fetch_add(1, Ordering::Relaxed);
    }
    tally
}

fn endpoint_uri(target: &str) -> String {
    if target.contains("://") {
        target.to_string()
    } else {
        format!("http://{target}")
    }
}

fn validate(args: &Args) -> Result<Vec<Template>, String> {
    if args.concurrency == 0 || args.concurrency > MAX_CONCURRENCY {
        return Err(format!("-c must be between 1 and {MAX_CONCURRENCY}"));
    }
    if args.connections == 0 || args.connections > MAX_CONNECTIONS {
        return Err(format!(
            "--connections must be between 1 and {MAX_CONNECTIONS}"
        ));
    }
    if args.connections > args.concurrency {
        return Err("--connections cannot exceed -c (a connection without a worker idles)".into());
    }
    if let Some(rps) = args.rps
        && !(rps.is_finite() && rps > 0.0)
    {
        return Err("--rps must be a positive number".into());
    }
    if args.duration.is_some_and(|d| d.is_zero()) || args.requests == Some(0) {
        return Err("-n and -z must be positive".into());
    }
    args.descriptors.iter().map(|d| parse_template(d)).collect()
}

/// CPU time (user + system) this process has used so far, from `/proc/self/stat` (Linux;
/// None elsewhere). Load tests on one machine share its CPUs with the server, so the client's
/// own share is part of the result.
fn own_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th
    // fields of the line, in USER_HZ ticks (100 per second on Linux).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn ms(ns: u64) -> f64 {
    (ns as f64 / 1_000.0).round() / 1_000.0
}

fn report_json(
    args: &Args,
    tally: &Tally,
    elapsed: Duration,
    cpu: Option<f64>,
) -> serde_json::Value {
    let h = &tally.latency_ns;
    let requests = tally.requests();
    let secs = elapsed.as_secs_f64();
    json!({
        "target": args.target,
        "domain": args.domain,
        "descriptors": args.descriptors,
        "concurrency": args.concurrency,
        "connections": args.connections,
        "target_rps": args.rps,
        "requests": requests,
        "duration_s": (secs * 1000.0).round() / 1000.0,
        "throughput_rps": if secs > 0.0 { (requests as f64 / secs * 10.0).round() / 10.0 } else { 0.0 },
        "ok": tally.ok,
        "over_limit": tally.over_limit,
        "unknown_code": tally.unknown_code,
        "error_count": tally.error_count(),
        "errors": tally.errors,
        "client_cpu_s": cpu.map(|c| (c * 100.0).round() / 100.0),
        "latency_ms": {
            "p50": ms(h.value_at_quantile(0.50)),
            "p90": ms(h.value_at_quantile(0.90)),
            "p99": ms(h.value_at_quantile(0.99)),
            "p99_9": ms(h.value_at_quantile(0.999)),
            "max": ms(h.max()),
            "mean": (h.mean() / 1_000.0).round() / 1_000.0,
        },
    })
}

fn report_text(args: &Args, tally: &Tally, elapsed: Duration, cpu: Option<f64>) -> String {
    let h = &tally.latency_ns;
    let requests = tally.requests();
    let secs = elapsed.as_secs_f64();
    let pace = match args.rps {
        Some(rps) => format!("paced at {rps} req/s"),
        None => "unpaced".to_string(),
    };
    let errors = if tally.errors.is_empty() {
        "0".to_string()
    } else {
        let by_code: Vec<String> = tally
            .errors
            .iter()
            .map(|(code, n)| format!("{code} {n}"))
            .collect();
        format!("{} ({})", tally.error_count(), by_code.join(", "))
    };
    let cpu = match cpu {
        Some(c) if requests > 0 => format!(
            "client cpu  {c:.2} s ({:.1} us per request)\n",
            c * 1e6 / requests as f64
        ),
        _ => String::new(),
    };
    format!(
        "target      {} domain {} descriptors {}\n\
         load        -c {} over {} connection(s), {pace}\n\
         requests    {requests} in {secs:.2} s = {:.1} req/s\n\
         answers     OK {}, OVER_LIMIT {}{}\n\
         errors      {errors}\n\
         latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (mean {:.3})\n\
         {cpu}",
        args.target,
        args.domain,
        args.descriptors.join(" | "),
        args.concurrency,
        args.connections,
        if secs > 0.0 {
            requests as f64 / secs
        } else {
            0.0
        },
        tally.ok,
        tally.over_limit,
        if tally.unknown_code > 0 {
            format!(", other codes {}", tally.unknown_code)
        } else {
            String::new()
        },
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.90)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
        h.mean() / 1_000_000.0,
    )
}

async fn run(args: Args, templates: Vec<Template>) -> Result<(), String> {
    let uri = endpoint_uri(&args.target);
    let endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|e| format!("bad target {:?}: {e}", args.target))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5));
    let mut channels = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {uri}: {e}"))?;
        channels.push(channel);
    }

    let total = match (args.requests, args.duration) {
        (None, None) => Some(DEFAULT_REQUESTS),
        (n, _) => n,
    };
    let start = Instant::now();
    let plan = Arc::new(Plan {
        domain: args.domain.clone(),
        templates,
        hits_addend: args.hits_addend,
        total,
        deadline: args.duration.map(|d| start + d),
        start,
        rps: args.rps,
        timeout: args.timeout,
        issued: AtomicU64::new(0),
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });

    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let mut seeds = Rng(seed);
    let workers: Vec<_> = (0..args.concurrency)
        .map(|w| {
            let client = RateLimitServiceClient::new(channels[w % channels.len()].clone());
            tokio::spawn(worker(plan.clone(), client, seeds.next()))
        })
        .collect();

    // Ctrl-C ends the run early; the report covers what was sent.
    let stopper = {
        let plan = plan.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                plan.stop.store(true, Ordering::Relaxed);
            }
        })
    };
    let progress = std::io::stderr().is_terminal().then(|| {
        let plan = plan.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut last = 0;
            loop {
                tick.tick().await;
                let done = plan.done.load(Ordering::Relaxed);
                let failed = plan.failed.load(Ordering::Relaxed);
                eprint!(
                    "\r[{:>6.1} s] {done} requests, {} req/s, {failed} errors   ",
                    plan.start.elapsed().as_secs_f64(),
                    done - last
                );
                let _ = std::io::stderr().flush();
                last = done;
            }
        })
    });

    let mut tally = Tally::new();
    for w in workers {
        tally.merge(w.await.map_err(|e| format!("worker failed: {e}"))?);
    }
    let elapsed = start.elapsed();
    let cpu = own_cpu_seconds();
    stopper.abort();
    if let Some(progress) = progress {
        progress.abort();
        eprintln!();
    }

    match args.json.as_deref() {
        Some("-") => println!("{}", report_json(&args, &tally, elapsed, cpu)),
        Some(path) => {
            let text = serde_json::to_string_pretty(&report_json(&args, &tally, elapsed, cpu))
                .map_err(|e| e.to_string())?;
            std::fs::write(path, text + "\n").map_err(|e| format!("cannot write {path}: {e}"))?;
            print!("{}", report_text(&args, &tally, elapsed, cpu));
        }
        None => print!("{}", report_text(&args, &tally, elapsed, cpu)),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let templates = match validate(&args) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = args.threads {
        builder.worker_threads(threads.max(1));
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, templates)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::Part;

    #[test]
    fn templates_parse() {
        let t = parse_template("route=api,x-api-key=key-{rand:1000}").unwrap();
        assert_eq!(
            t.entries,
            vec![
                ("route".to_string(), vec![Part::Text("api".into())]),
                (
                    "x-api-key".to_string(),
                    vec![Part::Text("key-".into()), Part::Rand(1000)]
                ),
            ]
        );
        assert!(parse_template("route").is_err());
        assert!(parse_template("a={rand:0}").is_err());
        assert!(parse_template("a={seq}").is_err());
        assert!(parse_template("a={rand:3").is_err());
    }

    #[test]
    fn random_values_stay_below_their_cardinality() {
        let templates = vec![parse_template("k={rand:3}x").unwrap()];
        let mut rng = Rng(7);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            let r = build_request("d", &templates, 0, &mut rng);
            seen.insert(r.descriptors[0].entries[0].value.clone());
        }
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            vec!["0x".to_string(), "1x".into(), "2x".into()]
        );
    }
}
