//! RLQS: Envoy's `rate_limit_quota` filter, served from the same native limits as the RLS.
//!
//! Envoy enforces a token bucket per bucket locally and reports every few seconds what it
//! allowed and denied; sluice answers with assignments. A stream's first report names the
//! domain; each `bucket_id` map is matched as one descriptor of that domain (the route from
//! `route_key`, rule items from their entry keys). A bucket with a limit gets a token bucket
//! whose tokens were taken from the limit's current window (see [`crate::limiter::quota`]), so
//! what every Envoy holds adds up to at most the limit per period. Other buckets get
//! `ALLOW_ALL`, and so does every bucket of a domain this replica does not serve (with a log
//! line: closing the stream would only make Envoy reconnect and fall back the same way).
//!
//! How Envoy 1.40 behaves shapes the assignments:
//! - The first request of a bucket is allowed and reported at once (`time_elapsed` 0): it is
//!   charged to the window, and the first grant follows at once.
//! - A token bucket starts full and is rebuilt only when the assignment differs; re-sending
//!   the same one keeps its tokens. So every new grant is sent as a bucket holding what this
//!   client still has plus the grant, with a `fill_interval` that differs from the last one
//!   and refills one token a day (nothing, in practice: tokens come from grants).
//! - An assignment without a time to live is expired at once (allow all): each carries one
//!   past the window's end, when [`Session::rollover`] replaces it with one from the new
//!   window, without waiting for a report.
//! - Nothing is left when the window is spent: `DENY_ALL` until the window ends.
//!
//! [`Session`] holds one stream's state and is driven by reports and the clock only, so the
//! simulation tests run it with a manual clock; [`RlqsService`] is the tonic face.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::warn;

use crate::clock::Clock;
use crate::config::Limits;
use crate::limiter::quota::QuotaBackend;
use crate::limits::{DomainLimits, LimitSet};
use crate::metrics::{self as m, Metrics};
use crate::proto::rlqs::rate_limit_quota_service_server::RateLimitQuotaService;
use crate::proto::rlqs::{RateLimitQuotaResponse, RateLimitQuotaUsageReports};

mod session;

pub use session::{Session, SessionError};

/// How far ahead a grant should last, at the client's recent demand: two of Envoy's 5 s
/// report intervals, so a client holds enough to reach its next report even if one is late.
pub const HORIZON_MS: u64 = 10_000;

/// How long a token-bucket assignment outlives its window: three report intervals. The
/// rollover replaces it at the window's end; this only matters if sluice cannot.
pub const ASSIGNMENT_MARGIN_MS: u64 = 15_000;

/// How long a `DENY_ALL` outlives its window: if sluice is gone at the window's end, the
/// client's own fallback takes over soon after, rather than denying for long.
pub const DENY_MARGIN_MS: u64 = 1_000;

/// How long `ALLOW_ALL` for a bucket without a limit lasts before it is sent again.
pub const ALLOW_TTL_MS: u64 = 3_600_000;

/// A bucket without demand for this long is abandoned: Envoy forgets it, and its next
/// request starts it again.
pub const ABANDON_AFTER_MS: u64 = 60_000;

/// Bounds on what one stream may make sluice hold.
pub const MAX_BUCKETS: usize = 10_000;
pub const MAX_BUCKET_KEYS: usize = 32;

/// Reports closer together than this on one stream are dropped (Envoy sends one every 5 s).
pub const MIN_REPORT_SPACING_MS: u64 = 100;

/// Fresh buckets are told apart by the nanoseconds of their one-day `fill_interval`.
const FILL_INTERVAL_SECONDS: i64 = 86_400;

/// What the RLQS side shares across streams.
pub struct Rlqs {
    limits: Limits,
    quota: Arc<QuotaBackend>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    /// This replica's part of every client id, so ids are unique across replicas.
    replica: String,
    next_stream: AtomicU64,
}

impl Rlqs {
    pub fn new(
        limits: Limits,
        quota: Arc<QuotaBackend>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Self {
        // Unique enough across replicas: start time and process id, hashed.
        let seed = format!("{}:{}", clock.now_ms(), std::process::id());
        let replica = blake3::hash(seed.as_bytes()).to_hex()[..12].to_string();
        Self {
            limits,
            quota,
            clock,
            metrics,
            replica,
            next_stream: AtomicU64::new(0),
        }
    }

    /// A new session with a client id of its own.
    pub fn session(&self) -> Session {
        let n = self.next_stream.fetch_add(1, Ordering::Relaxed);
        Session::new(format!("{}-{n}", self.replica))
    }

    pub fn quota(&self) -> &QuotaBackend {
        &self.quota
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn ignored(&self, reason: &'static str) {
        self.metrics
            .counter(m::RLQS_IGNORED, &[("reason", reason)])
            .increment(1);
    }

    fn sent(&self, kind: &'static str) {
        self.metrics
            .counter(m::RLQS_ASSIGNMENTS, &[("kind", kind)])
            .increment(1);
    }
}

/// What `/config` shows of RLQS: per domain, the routes a bucket can be limited by (native
/// domains only, without the `concurrent` and shadow-mode rules RLQS cannot enforce).
pub fn visible_routes(limits: &LimitSet) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (name, domain) in &limits.domains {
        let DomainLimits::Native { route_key, routes } = &domain.limits else {
            continue;
        };
        let mut visible: Vec<&str> = routes
            .values()
            .filter(|r| !r.settings.shadow_mode.value)
            .filter(|r| {
                r.limits
                    .rules()
                    .iter()
                    .any(|rule| !rule.threshold.concurrent)
            })
            .map(|r| r.name.as_str())
            .collect();
        visible.sort_unstable();
        out.insert(
            name.clone(),
            serde_json::json!({ "route_key": route_key, "routes": visible }),
        );
    }
    serde_json::Value::Object(out)
}

/// The tonic face: one task per stream, driven by its reports and its windows' ends.
#[derive(Clone)]
pub struct RlqsService {
    rlqs: Arc<Rlqs>,
    stop: watch::Receiver<bool>,
}

impl RlqsService {
    pub fn new(rlqs: Arc<Rlqs>, stop: watch::Receiver<bool>) -> Self {
        Self { rlqs, stop }
    }
}

/// Responses a stream may have queued for a slow Envoy before its task waits.
const OUTBOX: usize = 16;

#[tonic::async_trait]
impl RateLimitQuotaService for RlqsService {
    type StreamRateLimitQuotasStream = ReceiverStream<Result<RateLimitQuotaResponse, Status>>;

    async fn stream_rate_limit_quotas(
        &self,
        request: Request<Streaming<RateLimitQuotaUsageReports>>,
    ) -> Result<Response<Self::StreamRateLimitQuotasStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(OUTBOX);
        let rlqs = self.rlqs.clone();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let stopping = async move {
                let _ = stop.wait_for(|stop| *stop).await;
            };
            tokio::pin!(stopping);
            let mut session = rlqs.session();
            let streams = rlqs.metrics.gauge(m::RLQS_STREAMS, &[]);
            streams.increment(1.0);
            loop {
                let wake = session.next_wake();
                let now = rlqs.clock.now_ms();
                let sleep = async {
                    match wake {
                        Some(at) => {
                            tokio::time::sleep(std::time::Duration::from_millis(
                                at.saturating_sub(now),
                            ))
                            .await
                        }
                        None => std::future::pending().await,
                    }
                };
                let actions = tokio::select! {
                    message = inbound.message() => match message {
                        Ok(Some(report)) => {
                            let now = rlqs.clock.now_ms();
                            match session.report(&rlqs, report, now).await {
                                Ok(actions) => actions,
                                Err(e) => {
                                    warn!(error = %e, "RLQS stream ended");
                                    let _ = tx.send(Err(Status::invalid_argument(e.to_string()))).await;
                                    break;
                                }
                            }
                        }
                        // The Envoy closed its side, or the connection is gone.
                        Ok(None) | Err(_) => break,
                    },
                    () = sleep => session.rollover(&rlqs, rlqs.clock.now_ms()).await,
                    () = &mut stopping => break,
                    () = tx.closed() => break,
                };
                if !actions.is_empty()
                    && tx
                        .send(Ok(RateLimitQuotaResponse {
                            bucket_action: actions,
                        }))
                        .await
                        .is_err()
                {
                    break;
                }
            }
            session.close(&rlqs);
            streams.decrement(1.0);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
