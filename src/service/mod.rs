//! The request path, independent of the transport, split by step: [`validate`] the request's
//! shape, [`plan`] (match every descriptor, build one store batch), count the batch in the
//! store, [`respond`] with Envoy's answer. [`grpc`] and [`http`] are the two faces.
//!
//! [`grpc`] adapts it to tonic. It holds no lock across the store's `.await`: the limits are
//! an `Arc` snapshot taken once per request, so a reload swaps them without waiting for
//! in-flight requests, which finish on the set they started with.

pub mod grpc;
pub mod headers;
pub mod http;
mod plan;
mod respond;
pub mod rlqs;
mod validate;

use std::sync::Arc;
use std::time::Instant;

use crate::clock::Clock;
use crate::config::Limits;
use crate::config::settings::RequestBounds;
use crate::limiter::{Source, Store, StoreError};
use crate::limits::LimitSet;
use crate::metrics::{self as m, Metrics, RequestResult};
use crate::proto::core::HeaderValue;
use crate::proto::rls::rate_limit_response::Code;
use crate::proto::rls::{RateLimitRequest, RateLimitResponse};
pub use plan::MAX_HITS;
use plan::{Plan, plan};
use respond::{respond, unlimited};
use validate::validate;

/// Why a request got no decision.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The request itself is malformed; the message says how.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// More requests in flight than `max_in_flight`: refused at once rather than queued.
    #[error("too many requests in flight (more than {0}); retry shortly")]
    Overloaded(usize),
}

/// Everything one request needs, shared by all connections.
pub struct RateLimiter {
    limits: Limits,
    store: Arc<dyn Store>,
    /// The `store` label of store metrics (`memory` or `redis`).
    store_label: Source,
    clock: Arc<dyn Clock>,
    bounds: RequestBounds,
    metrics: Arc<Metrics>,
    /// Permits for requests being decided; see `Settings::max_in_flight`.
    in_flight: Arc<tokio::sync::Semaphore>,
    max_in_flight: usize,
    /// Global shadow mode (`Settings::shadow_mode`): count and report, always answer OK.
    shadow_mode: bool,
    /// `fallback.response_header`: mark answers the fallback gave.
    fallback_header: bool,
}

/// Default for [`RateLimiter::with_max_in_flight`].
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4096;

/// A decision and what only the HTTP side needs beyond Envoy's response.
#[derive(Debug, Clone)]
pub struct Answer {
    pub response: RateLimitResponse,
    /// The `rejected_code` of the route that rejected the request, when one did.
    pub rejected_code: Option<u16>,
}

impl RateLimiter {
    pub fn new(
        limits: LimitSet,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        bounds: RequestBounds,
    ) -> Self {
        Self {
            limits: Limits::new(limits),
            store,
            store_label: Source::Memory,
            clock,
            bounds,
            metrics: Arc::new(Metrics::new()),
            in_flight: Arc::new(tokio::sync::Semaphore::new(DEFAULT_MAX_IN_FLIGHT)),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            shadow_mode: false,
            fallback_header: false,
        }
    }

    /// Global shadow mode: every descriptor is counted and reported (metrics decision
    /// `shadow` when over) but answered OK, so the whole answer is OK, as envoyproxy/ratelimit's
    /// `SHADOW_MODE`.
    pub fn with_shadow_mode(mut self, on: bool) -> Self {
        self.shadow_mode = on;
        self
    }

    /// Adds [`FALLBACK_HEADER`] to answers the fallback gave.
    pub fn with_fallback_header(mut self, on: bool) -> Self {
        self.fallback_header = on;
        self
    }

    /// Bounds the requests decided at once (load shedding).
    pub fn with_max_in_flight(mut self, max: usize) -> Self {
        self.in_flight = Arc::new(tokio::sync::Semaphore::new(max.max(1)));
        self.max_in_flight = max.max(1);
        self
    }

    /// Labels store metrics with `source` (`redis` for a Redis backend) instead of `memory`.
    pub fn with_store_label(mut self, source: Source) -> Self {
        self.store_label = source;
        self
    }

    /// Serves from a shared handle (the reloader holds another clone of it).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Records into `metrics` instead of a private registry.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The limits currently served.
    pub fn limits(&self) -> Arc<LimitSet> {
        self.limits.load()
    }

    /// The handle the limits are served from (a reloader swaps through a clone of it).
    pub fn limits_handle(&self) -> &Limits {
        &self.limits
    }

    /// Swaps in a new, already validated, set of limits.
    pub fn replace_limits(&self, limits: LimitSet) {
        self.limits.replace(limits);
    }

    pub async fn should_rate_limit(
        &self,
        request: &RateLimitRequest,
    ) -> Result<RateLimitResponse, RequestError> {
        self.decide(request).await.map(|answer| answer.response)
    }

    /// The whole request path, with metrics: validate, match, count, respond.
    pub async fn decide(&self, request: &RateLimitRequest) -> Result<Answer, RequestError> {
        let started = Instant::now();
        // Shed load rather than queue: a request that cannot start now is refused at once.
        let Ok(_permit) = self.in_flight.try_acquire() else {
            self.metrics.request(
                None,
                m::UNKNOWN_DOMAIN,
                RequestResult::Shed,
                started.elapsed().as_secs_f64(),
            );
            return Err(RequestError::Overloaded(self.max_in_flight));
        };
        let limits = self.limits.load();
        // Label by the configured domain name only; anything else is `_unknown`.
        let domain = limits.domain(&request.domain);
        let domain_label = domain.map(|d| d.name.as_str()).unwrap_or(m::UNKNOWN_DOMAIN);
        let result = self.decide_in(request, &limits).await;
        let outcome = match &result {
            Ok(a) if a.response.overall_code == Code::OverLimit as i32 => RequestResult::OverLimit,
            Ok(_) => RequestResult::Ok,
            Err(RequestError::Invalid(_)) => RequestResult::Invalid,
            Err(RequestError::Store(_)) => RequestResult::Error,
            Err(RequestError::Overloaded(_)) => RequestResult::Shed,
        };
        self.metrics.request(
            domain.map(|d| &d.handles.requests),
            domain_label,
            outcome,
            started.elapsed().as_secs_f64(),
        );
        result
    }

    async fn decide_in(
        &self,
        request: &RateLimitRequest,
        limits: &LimitSet,
    ) -> Result<Answer, RequestError> {
        validate(request, &self.bounds)?;
        let Some(domain) = limits.domain(&request.domain) else {
            // Unknown domain: not an error (Envoy may send domains this replica does not
            // serve yet), OK with no limit for every descriptor.
            return Ok(Answer {
                response: unlimited(request.descriptors.len()),
                rejected_code: None,
            });
        };

        let Plan { slots, mut ops } = plan(domain, request, &self.metrics);
        if !ops.is_empty() {
            let now = self.clock.now_ms();
            let store_started = Instant::now();
            let applied = self.store.apply(&mut ops, now).await;
            // A failure the fallback absorbed or declined was counted there, once.
            let kind = applied
                .as_ref()
                .err()
                .filter(|e| e.uncounted())
                .map(StoreError::kind);
            self.metrics.store_call(
                self.store_label.as_str(),
                store_started.elapsed().as_secs_f64(),
                kind,
            );
            applied?;
        }
        let mut answer = respond(&domain.name, &slots, &ops, &self.metrics, self.shadow_mode);
        if self.fallback_header && ops.iter().any(|op| op.source == Source::Fallback) {
            answer.response.response_headers_to_add.push(HeaderValue {
                key: FALLBACK_HEADER.to_string(),
                value: "true".to_string(),
            });
        }
        Ok(answer)
    }
}

/// The header `fallback.response_header` adds to answers the fallback gave.
pub const FALLBACK_HEADER: &str = "X-Sluice-Fallback";
