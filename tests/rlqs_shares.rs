//! RLQS quota shares without Envoy: sessions driven by simulated Envoys on a manual clock.
//!
//! Each simulated Envoy behaves as Envoy 1.40's `rate_limit_quota` filter was seen to: the
//! first request of a bucket passes and is reported at once, later reports come every 5 s, a
//! token bucket starts full and is rebuilt only when its assignment changes, an expired
//! assignment allows all, `DENY_ALL` denies. The tests check that what all clients admit in a
//! window adds up to at most the limit plus each client's first request, that demand decides
//! the shares, and that bad reports are ignored and counted rather than fatal.

mod common;

use std::sync::Arc;

use prost::Message;
use sluice::clock::ManualClock;
use sluice::config::RedisSettings;
use sluice::config::{Limits, load_dir};
use sluice::limiter::Source;
use sluice::limiter::quota::{MemoryQuota, QuotaBackend, QuotaOp, QuotaStore};
use sluice::limiter::redis::RedisStore;
use sluice::limits::{Threshold, Unit};
use sluice::metrics::Metrics;
use sluice::proto::rlqs::rate_limit_quota_response::bucket_action::BucketAction as Action;
use sluice::proto::rlqs::rate_limit_quota_usage_reports::BucketQuotaUsage;
use sluice::proto::rlqs::{BucketId, RateLimitQuotaResponse, RateLimitQuotaUsageReports};
use sluice::proto::unit::TokenBucket;
use sluice::proto::unit::rate_limit_strategy::{BlanketRule, Strategy};
use sluice::service::rlqs::{Rlqs, Session};

const LIMITS: &str = r#"
domain: quota
routes:
  - name: api
    global_threshold: { query_per_minute: 10 }
  - name: big
    global_threshold: { query_per_minute: 1000 }
  - name: keys
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - { key: "*", query_per_minute: 100 }
"#;

/// The limits above, served with shares in memory (one replica) or a given backend.
fn rlqs_with(quota: Arc<QuotaBackend>) -> Rlqs {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("quota.yaml"), LIMITS).expect("write limits");
    let set = load_dir(dir.path()).expect("limits load");
    Rlqs::new(
        Limits::new(set),
        quota,
        Arc::new(ManualClock::new(0)),
        Arc::new(Metrics::new()),
    )
}

fn rlqs() -> Rlqs {
    rlqs_with(Arc::new(QuotaBackend::new(None, 10_000)))
}

fn bucket(pairs: &[(&str, &str)]) -> BucketId {
    BucketId {
        bucket: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// A 10 ms step, in ms.
const TICK: u64 = 10;
const REPORT_EVERY: u64 = 5_000;

/// What a simulated Envoy enforces for its one bucket.
#[derive(Debug, Clone)]
enum Enforced {
    /// No assignment (or an expired one): the filter's `no_assignment_behavior`, ALLOW_ALL.
    Nothing,
    Allow {
        until: u64,
    },
    Deny {
        until: u64,
    },
    Tokens {
        config: TokenBucket,
        tokens: f64,
        last: u64,
        until: u64,
    },
}

/// One Envoy with one bucket, as Envoy 1.40 behaves.
struct SimEnvoy {
    session: Session,
    id: BucketId,
    enforced: Enforced,
    /// When it reports next; `None` before its bucket's first request.
    next_report: Option<u64>,
    last_report: u64,
    allowed: u64,
    denied: u64,
    domain_sent: bool,
}

impl SimEnvoy {
    fn new(rlqs: &Rlqs, id: BucketId) -> Self {
        Self {
            session: rlqs.session(),
            id,
            enforced: Enforced::Nothing,
            next_report: None,
            last_report: 0,
            allowed: 0,
            denied: 0,
            domain_sent: false,
        }
    }

    /// One request at `now`: whether it passed. The first of the bucket is reported at once.
    async fn request(&mut self, rlqs: &Rlqs, now: u64) -> bool {
        let passed = match &mut self.enforced {
            Enforced::Nothing => true,
            Enforced::Allow { until } | Enforced::Deny { until } if *until <= now => {
                self.enforced = Enforced::Nothing;
                true
            }
            Enforced::Tokens { until, .. } if *until <= now => {
                self.enforced = Enforced::Nothing;
                true
            }
            Enforced::Allow { .. } => true,
            Enforced::Deny { .. } => false,
            Enforced::Tokens {
                config,
                tokens,
                last,
                ..
            } => {
                let fill = config.fill_interval.expect("fill interval");
                let fill_ms = fill.seconds as f64 * 1000.0 + f64::from(fill.nanos) / 1e6;
                let per_ms = f64::from(config.tokens_per_fill.unwrap_or(1)) / fill_ms;
                *tokens =
                    (*tokens + (now - *last) as f64 * per_ms).min(f64::from(config.max_tokens));
                *last = now;
                if *tokens >= 1.0 {
                    *tokens -= 1.0;
                    true
                } else {
                    false
                }
            }
        };
        if passed {
            self.allowed += 1;
        } else {
            self.denied += 1;
        }
        if self.next_report.is_none() {
            self.report(rlqs, now).await;
        }
        passed
    }

    async fn report(&mut self, rlqs: &Rlqs, now: u64) {
        let elapsed = if self.next_report.is_none() {
            0
        } else {
            now - self.last_report
        };
        let report = RateLimitQuotaUsageReports {
            domain: if self.domain_sent {
                String::new()
            } else {
                "quota".to_string()
            },
            bucket_quota_usages: vec![BucketQuotaUsage {
                bucket_id: Some(self.id.clone()),
                time_elapsed: Some(prost_types::Duration {
                    seconds: (elapsed / 1000) as i64,
                    nanos: ((elapsed % 1000) * 1_000_000) as i32,
                }),
                num_requests_allowed: self.allowed,
                num_requests_denied: self.denied,
            }],
        };
        self.domain_sent = true;
        self.allowed = 0;
        self.denied = 0;
        self.last_report = now;
        self.next_report = Some(now + REPORT_EVERY);
        let actions = self
            .session
            .report(rlqs, report, now)
            .await
            .expect("a report is answered");
        self.apply(actions, now);
    }

    /// Reports when due and takes the rollover's assignments.
    async fn tick(&mut self, rlqs: &Rlqs, now: u64) {
        if self.next_report.is_some_and(|at| at <= now) {
            self.report(rlqs, now).await;
        }
        if self.session.next_wake().is_some_and(|at| at <= now) {
            let actions = self.session.rollover(rlqs, now).await;
            self.apply(actions, now);
        }
    }

    fn apply(
        &mut self,
        actions: Vec<sluice::proto::rlqs::rate_limit_quota_response::BucketAction>,
        now: u64,
    ) {
        for action in actions {
            assert_eq!(action.bucket_id.as_ref(), Some(&self.id));
            match action.bucket_action.expect("an action") {
                Action::AbandonAction(_) => {
                    self.enforced = Enforced::Nothing;
                    self.next_report = None;
                }
                Action::QuotaAssignmentAction(a) => {
                    let ttl = a.assignment_time_to_live.expect("a time to live");
                    let until = now + ttl.seconds as u64 * 1000 + ttl.nanos as u64 / 1_000_000;
                    assert!(until > now, "an assignment that expires at once allows all");
                    match a
                        .rate_limit_strategy
                        .and_then(|s| s.strategy)
                        .expect("a strategy")
                    {
                        Strategy::BlanketRule(r) if r == BlanketRule::DenyAll as i32 => {
                            self.enforced = Enforced::Deny { until }
                        }
                        Strategy::BlanketRule(_) => self.enforced = Enforced::Allow { until },
                        Strategy::TokenBucket(config) => {
                            // The same assignment again keeps the bucket as it is.
                            if let Enforced::Tokens {
                                config: old,
                                until: u,
                                ..
                            } = &mut self.enforced
                                && *old == config
                            {
                                *u = until;
                                continue;
                            }
                            self.enforced = Enforced::Tokens {
                                tokens: f64::from(config.max_tokens),
                                config,
                                last: now,
                                until,
                            };
                        }
                        Strategy::RequestsPerTimeUnit(_) => {
                            panic!("Envoy 1.40 does not enforce requests_per_time_unit")
                        }
                    }
                }
            }
        }
    }
}

#[tokio::test]
async fn a_lone_envoy_admits_the_limit_of_a_window_then_the_next_window_s() {
    let rlqs = rlqs();
    let mut envoy = SimEnvoy::new(&rlqs, bucket(&[("route", "api")]));
    // The first request alone, the other 29 a second later; in a fresh minute.
    let start = 60_000;
    let mut passed = u64::from(envoy.request(&rlqs, start).await);
    for _ in 0..29 {
        passed += u64::from(envoy.request(&rlqs, start + 1000).await);
    }
    assert_eq!(
        passed, 10,
        "10 of 30 in the window of a 10 per minute limit"
    );
    // Time passes in ticks: reports, then the window's end brings a fresh assignment.
    let mut now = start + 1000;
    while now < start + 60_000 {
        now += TICK;
        envoy.tick(&rlqs, now).await;
    }
    // Idle for a minute, its demand has faded: the new window starts it with little, and
    // its next report (which shows the demand again) brings the rest.
    let mut next = 0;
    for _ in 0..30 {
        next += u64::from(envoy.request(&rlqs, now + 500).await);
    }
    let at = now + 500;
    while now < at + REPORT_EVERY + 100 {
        now += TICK;
        envoy.tick(&rlqs, now).await;
    }
    for _ in 0..30 {
        next += u64::from(envoy.request(&rlqs, now).await);
    }
    assert!(
        (9..=10).contains(&next),
        "the next window admits its limit again, {next} passed"
    );
}

#[tokio::test]
async fn a_bucket_without_a_limit_and_an_unknown_domain_are_allowed_all() {
    let rlqs = rlqs();
    let mut session = rlqs.session();
    let report = |domain: &str, id: BucketId| RateLimitQuotaUsageReports {
        domain: domain.to_string(),
        bucket_quota_usages: vec![BucketQuotaUsage {
            bucket_id: Some(id),
            time_elapsed: None,
            num_requests_allowed: 1,
            num_requests_denied: 0,
        }],
    };
    let actions = session
        .report(&rlqs, report("quota", bucket(&[("route", "nowhere")])), 0)
        .await
        .expect("answered");
    assert_blanket(&actions, BlanketRule::AllowAll);
    let mut other = rlqs.session();
    let actions = other
        .report(&rlqs, report("elsewhere", bucket(&[("route", "api")])), 0)
        .await
        .expect("an unknown domain is answered, not closed");
    assert_blanket(&actions, BlanketRule::AllowAll);
}

fn assert_blanket(
    actions: &[sluice::proto::rlqs::rate_limit_quota_response::BucketAction],
    rule: BlanketRule,
) {
    assert_eq!(actions.len(), 1, "{actions:?}");
    let Some(Action::QuotaAssignmentAction(a)) = &actions[0].bucket_action else {
        panic!("not an assignment: {actions:?}");
    };
    assert_eq!(
        a.rate_limit_strategy.as_ref().and_then(|s| s.strategy),
        Some(Strategy::BlanketRule(rule as i32))
    );
}

#[tokio::test]
async fn bad_reports_are_refused_or_ignored_never_fatal() {
    let rlqs = rlqs();
    // No domain first: a clear error that names the setting.
    let mut session = rlqs.session();
    let err = session
        .report(&rlqs, RateLimitQuotaUsageReports::default(), 0)
        .await
        .map(|actions| actions.len())
        .expect_err("a stream must name its domain first");
    assert!(err.to_string().contains("domain"), "{err}");

    // An empty bucket map, and a bucket with 10,000 keys: ignored.
    let huge = BucketId {
        bucket: (0..10_000)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect(),
    };
    let mut session = rlqs.session();
    let actions = session
        .report(
            &rlqs,
            RateLimitQuotaUsageReports {
                domain: "quota".into(),
                bucket_quota_usages: vec![
                    BucketQuotaUsage::default(),
                    BucketQuotaUsage {
                        bucket_id: Some(huge),
                        ..Default::default()
                    },
                ],
            },
            0,
        )
        .await
        .expect("answered");
    assert!(actions.is_empty());
    assert_eq!(session.buckets(), 0);

    // A flood of reports: only those at least 100 ms apart are read; buckets are bounded.
    let mut read = 0;
    for i in 0..1000u64 {
        let report = RateLimitQuotaUsageReports {
            domain: String::new(),
            bucket_quota_usages: (0..50)
                .map(|j| BucketQuotaUsage {
                    bucket_id: Some(bucket(&[
                        ("route", "keys"),
                        ("x-api-key", &format!("{i}-{j}")),
                    ])),
                    num_requests_allowed: u64::MAX,
                    num_requests_denied: u64::MAX,
                    ..Default::default()
                })
                .collect(),
        };
        let actions = session
            .report(&rlqs, report, 1000 + i)
            .await
            .expect("answered");
        read += usize::from(!actions.is_empty());
    }
    assert_eq!(read, 10, "one report per 100 ms is read");
    assert!(session.buckets() <= sluice::service::rlqs::MAX_BUCKETS);
    let text = rlqs_metrics(&rlqs);
    for reason in ["empty_bucket", "too_many_bucket_keys", "too_frequent"] {
        assert!(
            text.contains(&format!("sluice_rlqs_ignored_total{{reason=\"{reason}\"}}")),
            "{reason} counted:\n{text}"
        );
    }
}

fn rlqs_metrics(rlqs: &Rlqs) -> String {
    rlqs.metrics().render()
}

/// Envoy 1.40.0's first report, captured from the real binary (a request to a bucket
/// `{route: api}` of domain `quota`): the vendored protos read it as Envoy meant it.
#[test]
fn the_first_report_of_the_real_envoy_decodes() {
    let bytes = std::fs::read(common_fixture("rlqs_first_report.bin")).expect("the fixture");
    let report = RateLimitQuotaUsageReports::decode(bytes.as_slice()).expect("decodes");
    assert_eq!(report.domain, "quota");
    assert_eq!(report.bucket_quota_usages.len(), 1);
    let usage = &report.bucket_quota_usages[0];
    assert_eq!(usage.bucket_id, Some(bucket(&[("route", "api")])));
    assert_eq!(usage.time_elapsed, Some(prost_types::Duration::default()));
    assert_eq!(
        (usage.num_requests_allowed, usage.num_requests_denied),
        (1, 0)
    );
    // And it encodes back to the same bytes: no field was lost or renumbered.
    assert_eq!(report.encode_to_vec(), bytes);
    // An answer encodes as Envoy's own would (field numbers of rlqs.proto).
    let answer = RateLimitQuotaResponse::default();
    assert!(answer.encode_to_vec().is_empty());
}

fn common_fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// 50 Envoys on one bucket with skewed demand (client i asks 1/(i+1) of the most), three
/// times the limit in all, for ten minutes: per window, what they admit stays within the
/// limit (plus each one's first request in the first window), and most of the limit is used.
#[tokio::test]
async fn fifty_envoys_with_skewed_demand_share_the_limit() {
    for replicas in [1, 2] {
        let quota = Arc::new(QuotaBackend::new(None, 10_000));
        let servers: Vec<Rlqs> = (0..replicas).map(|_| rlqs_with(quota.clone())).collect();
        let limit = 1000u64;
        let period = 60_000u64;
        let clients = 50usize;
        let weights: Vec<f64> = (0..clients).map(|i| 1.0 / (i as f64 + 1.0)).collect();
        let sum: f64 = weights.iter().sum();
        // Requests per ms for each client: together 3x the limit's rate.
        let rates: Vec<f64> = weights
            .iter()
            .map(|w| 3.0 * limit as f64 / period as f64 * w / sum)
            .collect();
        let mut envoys: Vec<SimEnvoy> = (0..clients)
            .map(|i| SimEnvoy::new(&servers[i % replicas], bucket(&[("route", "big")])))
            .collect();
        let mut owed = vec![0.0f64; clients];
        let windows = 10u64;
        let start = period;
        let mut admitted = vec![0u64; windows as usize];
        let mut per_client = vec![0u64; clients];
        let mut now = start;
        while now < start + windows * period {
            let w = ((now - start) / period) as usize;
            for i in 0..clients {
                let server = &servers[i % replicas];
                envoys[i].tick(server, now).await;
                owed[i] += rates[i] * TICK as f64;
                while owed[i] >= 1.0 {
                    owed[i] -= 1.0;
                    if envoys[i].request(server, now).await {
                        admitted[w] += 1;
                        per_client[i] += 1;
                    }
                }
            }
            now += TICK;
        }
        let ratios: Vec<f64> = admitted.iter().map(|a| *a as f64 / limit as f64).collect();
        println!(
            "{replicas} replica(s), 50 clients, demand 3x the limit: admitted / limit per \
             window {ratios:.3?}; most and least admitted per client over the run: {:?}, {:?}",
            per_client.iter().max(),
            per_client.iter().min()
        );
        for (w, a) in admitted.iter().enumerate() {
            let first = if w == 0 { clients as u64 } else { 0 };
            assert!(
                *a <= limit + first,
                "window {w} admitted {a}, over the limit {limit} + {first} first requests"
            );
        }
        // After the first window, the limit is nearly used (the last tokens of a window
        // can sit with a client whose demand is low).
        for (w, a) in admitted.iter().enumerate().skip(1) {
            assert!(
                *a >= limit * 8 / 10,
                "window {w} admitted only {a} of {limit}"
            );
        }
        assert!(
            per_client.iter().all(|n| *n > 0),
            "every client got tokens: {per_client:?}"
        );
    }
}

async fn redis_store(server: &common::redis::RedisServer) -> Arc<RedisStore> {
    Arc::new(
        RedisStore::connect(&RedisSettings {
            url: server.url(),
            command_timeout: std::time::Duration::from_secs(2),
            ..RedisSettings::default()
        })
        .await
        .expect("connect to the test redis"),
    )
}

/// The Lua script is the twin of the pure function: the same ops at the same times give the
/// same grants, in memory and in Redis (demand expiring, windows turning, two limits on a
/// key, a charge past the limit, a client returning).
#[tokio::test]
async fn memory_and_redis_take_the_same_shares() {
    let server = common::redis::RedisServer::start();
    let redis = redis_store(&server).await;
    let memory = MemoryQuota::new(100);
    let limits = vec![
        Threshold::new(50, Unit::Minute),
        Threshold::new(8, Unit::Second),
    ];
    let mut seen = Vec::new();
    // Times, clients, demand, charge, want: chosen to cross seconds, a minute and the
    // demand's 15 s lifetime.
    let mut now = 59_000u64;
    for step in 0..200u64 {
        now += [3, 250, 999, 1, 4_000, 16_000][(step % 6) as usize];
        let client = format!("c{}", step % 4);
        let make = || QuotaOp {
            rate: (step * 7919) % 5000,
            charge: if step % 11 == 0 { 3 } else { 0 },
            want: (step * 31) % 12,
            ..QuotaOp::new("parity".into(), limits.clone(), client.clone())
        };
        let (mut in_memory, mut in_redis) = (make(), make());
        memory.share_now(&mut in_memory, now);
        redis
            .share(&mut in_redis, now)
            .await
            .expect("Redis answers");
        let answer = |o: &QuotaOp| (o.granted, o.left, o.clients);
        assert_eq!(
            answer(&in_memory),
            answer(&in_redis),
            "step {step} at {now}: memory and Redis differ"
        );
        seen.push(in_memory.granted);
    }
    assert!(
        seen.iter().any(|g| *g > 1),
        "some grants were real: {seen:?}"
    );
}

/// With Redis gone, shares come from this replica alone, are counted, and keep coming.
#[tokio::test]
async fn with_redis_down_each_replica_assigns_from_what_it_knows() {
    let mut server = common::redis::RedisServer::start();
    let redis = redis_store(&server).await;
    let backend = QuotaBackend::new(Some(redis as Arc<dyn QuotaStore>), 100);
    let make = || QuotaOp {
        rate: 1000,
        want: 4,
        ..QuotaOp::new(
            "down".into(),
            vec![Threshold::new(10, Unit::Minute)],
            "a".into(),
        )
    };
    let mut op = make();
    assert_eq!(backend.share(&mut op, 60_000).await, Source::Redis);
    assert_eq!(op.granted, 4);
    server.kill9();
    let mut op = make();
    assert_eq!(backend.share(&mut op, 61_000).await, Source::Fallback);
    assert_eq!(
        op.granted, 4,
        "the local store knows nothing of Redis's window"
    );
    assert_eq!(backend.fallbacks(), 1);
}

/// A report whose bucket value holds bytes that are not UTF-8 (a client's header, forwarded
/// by Envoy) is read with the bytes escaped, not refused: a refused report would leave the
/// bucket unassigned, which is allowed all.
#[test]
fn a_report_with_a_non_utf8_bucket_value_is_read() {
    use sluice::proto::codec::Lenient;
    let report = RateLimitQuotaUsageReports {
        domain: "quota".into(),
        bucket_quota_usages: vec![BucketQuotaUsage {
            bucket_id: Some(bucket(&[("x-api-key", "k\u{7f}")])),
            num_requests_allowed: 1,
            ..Default::default()
        }],
    };
    let mut bytes = report.encode_to_vec();
    let at = bytes
        .iter()
        .rposition(|b| *b == 0x7f)
        .expect("the marker byte");
    bytes[at] = 0xff;
    assert!(RateLimitQuotaUsageReports::decode(bytes.as_slice()).is_err());
    let read = RateLimitQuotaUsageReports::decode_lenient(&bytes).expect("read leniently");
    let id = read.bucket_quota_usages[0]
        .bucket_id
        .as_ref()
        .expect("bucket");
    assert_eq!(
        id.bucket.get("x-api-key").map(String::as_str),
        Some("k\\xFF")
    );
}

fn one_usage(id: BucketId, allowed: u64, elapsed_s: i64) -> RateLimitQuotaUsageReports {
    RateLimitQuotaUsageReports {
        domain: "quota".into(),
        bucket_quota_usages: vec![BucketQuotaUsage {
            bucket_id: Some(id),
            time_elapsed: Some(prost_types::Duration {
                seconds: elapsed_s,
                nanos: 0,
            }),
            num_requests_allowed: allowed,
            num_requests_denied: 0,
        }],
    }
}

/// A bucket with no demand for a minute is abandoned (Envoy forgets it), and the stream holds
/// it no more.
#[tokio::test]
async fn an_idle_bucket_is_abandoned() {
    let rlqs = rlqs();
    let mut session = rlqs.session();
    let id = bucket(&[("route", "api")]);
    let first = session
        .report(&rlqs, one_usage(id.clone(), 1, 0), 0)
        .await
        .expect("answered");
    assert_eq!(first.len(), 1);
    let mut abandoned = None;
    for n in 1..=13u64 {
        let now = n * 5_000;
        if session.next_wake().is_some_and(|at| at <= now) {
            session.rollover(&rlqs, now).await;
        }
        let actions = session
            .report(&rlqs, one_usage(id.clone(), 0, 5), now)
            .await
            .expect("answered");
        if actions
            .iter()
            .any(|a| matches!(a.bucket_action, Some(Action::AbandonAction(_))))
        {
            abandoned = Some(now);
            break;
        }
    }
    assert_eq!(
        abandoned,
        Some(60_000),
        "abandoned after 60 s without demand"
    );
    assert_eq!(session.buckets(), 0);
}

/// After a reload that changes a bucket's limit, the bucket is matched again and assigned from
/// the new limit at once.
#[tokio::test]
async fn a_reload_matches_the_buckets_again() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("quota.yaml"), LIMITS).expect("write limits");
    let limits = Limits::new(load_dir(dir.path()).expect("limits load"));
    let rlqs = Rlqs::new(
        limits.clone(),
        Arc::new(QuotaBackend::new(None, 100)),
        Arc::new(ManualClock::new(0)),
        Arc::new(Metrics::new()),
    );
    let mut session = rlqs.session();
    let id = bucket(&[("route", "api")]);
    let actions = session
        .report(&rlqs, one_usage(id.clone(), 1, 0), 1_000)
        .await
        .expect("answered");
    assert_eq!(tokens(&actions), Some(9), "10 a minute, 1 already passed");

    std::fs::write(
        dir.path().join("quota.yaml"),
        LIMITS.replace("query_per_minute: 10 }", "query_per_minute: 100 }"),
    )
    .expect("rewrite limits");
    let mut reloaded = load_dir(dir.path()).expect("limits load");
    reloaded.loaded_at_ms = 2_000;
    limits.replace(reloaded);
    let actions = session
        .report(&rlqs, one_usage(id, 9, 5), 6_000)
        .await
        .expect("answered");
    let after = tokens(&actions).expect("a fresh assignment");
    assert!(after > 9, "assigned from the new limit of 100: {after}");
}

/// The tokens of the one token-bucket assignment in `actions`, if there is one.
fn tokens(actions: &[sluice::proto::rlqs::rate_limit_quota_response::BucketAction]) -> Option<u32> {
    actions.iter().find_map(|a| match &a.bucket_action {
        Some(Action::QuotaAssignmentAction(q)) => match q.rate_limit_strategy.as_ref()?.strategy {
            Some(Strategy::TokenBucket(ref t)) => Some(t.max_tokens),
            _ => None,
        },
        _ => None,
    })
}
