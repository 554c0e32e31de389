//! The HTTP side: `/metrics`, `/healthz`, `/readyz`, `/config` and `POST /json`, and
//! `/healthcheck`, envoyproxy/ratelimit's probe (Envoy Gateway's Deployment probes it).
//!
//! `/json` runs the same [`RateLimiter::decide`] as gRPC; requests and responses are mapped
//! with the protobuf JSON mapping (camelCase or proto field names accepted), driven by the
//! same descriptor set as gRPC reflection, so the two APIs cannot drift apart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use serde_json::json;

use super::{RateLimiter, RequestError};
use crate::config::Settings;
use crate::config::xds::XdsStatus;
use crate::limiter::backend::Backend;
use crate::proto;
use crate::proto::rls::{RateLimitRequest, RateLimitResponse};

/// Whether the server should receive traffic: false once shutdown has begun, so load
/// balancers stop sending before in-flight requests are drained.
#[derive(Debug, Default)]
pub struct Readiness {
    draining: AtomicBool,
}

impl Readiness {
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// Protobuf JSON mapping of the RLS request and response.
pub struct JsonCodec {
    request: MessageDescriptor,
    response: MessageDescriptor,
}

impl JsonCodec {
    pub fn new() -> Result<Self, String> {
        let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string())?;
        let get = |name: &str| {
            pool.get_message_by_name(name)
                .ok_or_else(|| format!("descriptor set lacks {name}"))
        };
        Ok(Self {
            request: get("envoy.service.ratelimit.v3.RateLimitRequest")?,
            response: get("envoy.service.ratelimit.v3.RateLimitResponse")?,
        })
    }

    pub fn decode_request(&self, body: &[u8]) -> Result<RateLimitRequest, String> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let message = DynamicMessage::deserialize(self.request.clone(), &mut de)
            .map_err(|e| e.to_string())?;
        de.end().map_err(|e| e.to_string())?;
        message.transcode_to().map_err(|e| e.to_string())
    }

    pub fn encode_response(
        &self,
        response: &RateLimitResponse,
    ) -> Result<serde_json::Value, String> {
        let mut message = DynamicMessage::new(self.response.clone());
        message
            .transcode_from(response)
            .map_err(|e| e.to_string())?;
        serde_json::to_value(&message).map_err(|e| e.to_string())
    }
}

#[derive(Clone)]
pub struct HttpState {
    pub limiter: Arc<RateLimiter>,
    /// The stores, for readiness and their gauges.
    pub backend: Arc<Backend>,
    /// Already redacted: nothing secret is kept here.
    pub settings: Arc<Settings>,
    pub readiness: Arc<Readiness>,
    pub codec: Arc<JsonCodec>,
    /// The xDS limits source, when the limits come from one.
    pub xds: Option<Arc<XdsStatus>>,
    /// Not ready until the xDS source's first set has arrived.
    pub wait_for_limits: bool,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/healthcheck", get(healthcheck))
        .route("/config", get(config))
        .route("/json", post(json_api))
        .with_state(state)
}

async fn metrics(State(s): State<HttpState>) -> Response {
    let metrics = s.limiter.metrics();
    s.backend.report(metrics);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.render(),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<HttpState>) -> (StatusCode, String) {
    if s.readiness.is_draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down, draining in-flight requests\n".into(),
        );
    }
    if let Some(xds) = &s.xds
        && s.wait_for_limits
        && !xds.has_first_set()
    {
        let shown = xds.shown();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: waiting for the first limits from the xDS management server {} \
                 (node {}){}\n",
                shown.server_url,
                shown.node_id,
                shown
                    .last_stream_error
                    .map(|e| format!("; last stream error: {e}"))
                    .unwrap_or_default()
            ),
        );
    }
    let limits = s.limiter.limits();
    let store = &s.backend;
    // The fallback answers every request fast, so the replica stays in rotation: taking
    // every replica out when the shared Redis fails would leave Envoy with no RLS at all.
    // The reason says what the store refuses and what to do.
    let fallback = store.fallback_reason();
    let (status, mut body) = match store.ready() {
        // Connected, and still not counting: the reason says what the store refuses.
        Ok(()) if fallback.is_some() => (
            StatusCode::OK,
            format!(
                "ready: fallback active (store {}: {}); limits loaded ({} domains)\n",
                store.source(),
                fallback.unwrap_or_default(),
                limits.domains.len()
            ),
        ),
        Ok(()) => (
            StatusCode::OK,
            format!(
                "ready: limits loaded ({} domains, hash {}); store {} reachable\n",
                limits.domains.len(),
                &limits.content_hash[..limits.content_hash.len().min(12)],
                store.source()
            ),
        ),
        // The fallback answers every request fast, so the replica stays in rotation: taking
        // every replica out when the shared Redis fails would leave Envoy with no RLS at all.
        Err(reason) if store.fallback_active() => (
            StatusCode::OK,
            format!(
                "ready: fallback active (store {} unreachable: {reason}); limits loaded ({} domains)\n",
                store.source(),
                limits.domains.len()
            ),
        ),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: store {} unreachable: {reason}\n",
                store.source()
            ),
        ),
    };
    // After the first line, which keeps its form: what to fix although the status stands
    // (an eviction policy that can reset counters does not make the replica unready).
    for warning in store.warnings() {
        body.push_str(&warning);
        body.push('\n');
    }
    (status, body)
}

/// envoyproxy/ratelimit's health handler, as it answers: 200 `OK` when healthy, 500 with no
/// body otherwise. Healthy is what `/readyz` calls ready (its reason is in `/readyz`).
async fn healthcheck(state: State<HttpState>) -> (StatusCode, &'static str) {
    match readyz(state).await {
        (StatusCode::OK, _) => (StatusCode::OK, "OK"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, ""),
    }
}

async fn config(State(s): State<HttpState>) -> Response {
    let limits = s.limiter.limits();
    let source = match &s.xds {
        Some(xds) => json!({ "type": "xds", "xds": xds.shown() }),
        None => json!({ "type": "files", "dir": s.settings.limits_dir }),
    };
    let loaded_at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(limits.loaded_at_ms);
    axum::Json(json!({
        "loaded_at": humantime::format_rfc3339_millis(loaded_at).to_string(),
        "content_hash": limits.content_hash,
        "limits_source": source,
        "settings": *s.settings,
        "domains": limits.to_json(),
        // What Envoy's rate_limit_quota filter can be given: buckets naming these routes.
        "rlqs": super::rlqs::visible_routes(&limits),
    }))
    .into_response()
}

fn error_json(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

async fn json_api(State(s): State<HttpState>, body: Bytes) -> Response {
    let request = match s.codec.decode_request(&body) {
        Ok(request) => request,
        Err(e) => {
            return error_json(
                StatusCode::BAD_REQUEST,
                &format!("not a RateLimitRequest in JSON: {e}"),
            );
        }
    };
    let answer = match s.limiter.decide(&request).await {
        Ok(answer) => answer,
        Err(RequestError::Invalid(m)) => return error_json(StatusCode::BAD_REQUEST, &m),
        Err(e @ RequestError::Overloaded(_)) => {
            return error_json(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
        }
        Err(RequestError::Store(e)) => {
            return error_json(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
        }
    };
    let mut body = match s.codec.encode_response(&answer.response) {
        Ok(body) => body,
        Err(e) => return error_json(StatusCode::INTERNAL_SERVER_ERROR, &e),
    };
    let status = match answer.rejected_code {
        Some(code) => {
            // The readable message next to the protobuf fields (where `rawBody` is base64).
            body["rejectedMsg"] = json!(String::from_utf8_lossy(&answer.response.raw_body));
            StatusCode::from_u16(code).unwrap_or(StatusCode::TOO_MANY_REQUESTS)
        }
        None => StatusCode::OK,
    };
    let mut headers = HeaderMap::new();
    for h in &answer.response.response_headers_to_add {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.key.as_bytes()),
            HeaderValue::from_str(&h.value),
        ) {
            headers.insert(name, value);
        }
    }
    (status, headers, axum::Json(body)).into_response()
}
