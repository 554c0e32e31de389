//! The xDS limits source: limits pushed by a management server (Envoy Gateway, any
//! go-control-plane server) as envoyproxy/ratelimit's `RateLimitConfig` resources, over an
//! ADS state-of-the-world stream, instead of read from files.
//!
//! What this module owns:
//!
//! - **The stream.** One `StreamAggregatedResources` stream subscribing to every
//!   [`TYPE_URL`] resource of the node. The first request names the node (id, cluster,
//!   metadata); after a reconnect it also carries the version last applied, so a server that
//!   still has that version need not send it again.
//! - **Validation, whole.** A response is one complete set (state of the world): every
//!   resource is decoded and built by the same code as a limits file in that format
//!   (`config::envoy`), and two resources of one domain are refused as two files are. A
//!   valid set is swapped in and ACKed (its version and nonce); an invalid one is NACKed (the
//!   version still served, the response's nonce, and `error_detail` saying what is wrong,
//!   resource by resource) and the last good set stays in service. Unlike the files source,
//!   an empty set is applied: a control plane that removes every limit means it, where an
//!   emptied directory is far more often a half-applied deployment.
//! - **Reconnects.** A lost or refused stream keeps the last set serving; the next attempt
//!   waits a capped exponential delay with jitter (half to all of it, so replicas that lost
//!   the same server do not come back in step), reset once a response arrives.
//! - **Status** ([`XdsStatus`]) for readiness (`/readyz` and `/healthcheck` wait for the first
//!   set unless told not to), `/config` (the version served) and the logs.

use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{MetadataKey, MetadataValue};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tracing::{error, info, warn};

use super::diagnostics::{ConfigError, ConfigErrors};
use super::load::add_domain;
use super::reload::Limits;
use super::settings::{XdsSettings, parse_pairs};
use crate::clock::Clock;
use crate::limits::LimitSet;
use crate::metrics::Metrics;
use crate::proto::core::Node;
use crate::proto::core::node::UserAgentVersionType;
use crate::proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::proto::discovery::{DiscoveryRequest, DiscoveryResponse};
use crate::proto::google::rpc::Status;
use crate::proto::rls_conf::RateLimitConfig;

/// The resource type of envoyproxy/ratelimit's limits over xDS.
pub const TYPE_URL: &str = "type.googleapis.com/ratelimit.config.ratelimit.v3.RateLimitConfig";

/// `google.rpc.Code.INVALID_ARGUMENT`, the code of a NACK's `error_detail`.
const INVALID_ARGUMENT: i32 = 3;

/// The longest `error_detail` message sent: a server logs it, and one broken template can
/// repeat an error in every resource.
const MAX_DETAIL_BYTES: usize = 8 * 1024;

/// A setting the source cannot start with.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct XdsSetupError(String);

/// What the source has done so far, shared with the HTTP side.
#[derive(Debug, Default)]
pub struct XdsStatus {
    first_set: AtomicBool,
    /// Woken when the first set is applied.
    arrived: tokio::sync::Notify,
    shown: Mutex<XdsShown>,
}

/// The part of [`XdsStatus`] `/config` shows.
#[derive(Debug, Default, Clone, Serialize)]
pub struct XdsShown {
    pub server_url: String,
    pub node_id: String,
    /// The version of the set in service (`None` before the first).
    pub version: Option<String>,
    pub connected: bool,
    pub acks: u64,
    pub nacks: u64,
    pub reconnects: u64,
    /// Why the last rejected response was rejected.
    pub last_nack: Option<String>,
    /// Why the last stream ended or could not be opened.
    pub last_stream_error: Option<String>,
}

impl XdsStatus {
    /// Whether a first set has been applied.
    pub fn has_first_set(&self) -> bool {
        self.first_set.load(Ordering::SeqCst)
    }

    /// Returns once a first set has been applied.
    pub async fn first_set(&self) {
        loop {
            // Made before the check: a set applied between the two still wakes it.
            let arrived = self.arrived.notified();
            if self.has_first_set() {
                return;
            }
            arrived.await;
        }
    }

    pub fn shown(&self) -> XdsShown {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, XdsShown> {
        // A panic while holding it leaves plain data behind: still fine to show.
        self.shown.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The ADS client, ready to run.
pub struct XdsSource {
    endpoint: Endpoint,
    node: Node,
    headers: Vec<(
        MetadataKey<tonic::metadata::Ascii>,
        MetadataValue<tonic::metadata::Ascii>,
    )>,
    settings: XdsSettings,
    limits: Limits,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    status: Arc<XdsStatus>,
}

impl XdsSource {
    /// Checks what can be checked before connecting: the URL, the TLS files, the headers.
    pub fn new(
        settings: &XdsSettings,
        limits: Limits,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, XdsSetupError> {
        let tls = &settings.tls;
        let scheme = if tls.enabled { "https" } else { "http" };
        let uri = format!("{scheme}://{}", settings.server_url);
        let mut endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| {
                XdsSetupError(format!(
                    "xds.server_url (SLUICE_XDS_SERVER_URL): \"{}\" is not host:port: {e}",
                    settings.server_url
                ))
            })?
            .connect_timeout(settings.connect_timeout)
            .tcp_nodelay(true)
            // A management server that vanished without closing (a node lost) is found out
            // by the keepalive, not by the next push that never comes.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let any_tls_file =
            tls.ca_file.is_some() || tls.cert_file.is_some() || tls.server_name.is_some();
        if any_tls_file && !tls.enabled {
            return Err(XdsSetupError(
                "xds.tls: files or server_name are set but xds.tls.enabled \
                 (SLUICE_XDS_TLS_ENABLED) is false: turn TLS on, or remove them"
                    .into(),
            ));
        }
        if tls.enabled {
            let read = |what: &str, path: &PathBuf| {
                std::fs::read(path).map_err(|e| {
                    XdsSetupError(format!(
                        "xds.tls.{what}: cannot read {}: {e}",
                        path.display()
                    ))
                })
            };
            let mut config = ClientTlsConfig::new();
            config = match &tls.ca_file {
                Some(ca) => config.ca_certificate(Certificate::from_pem(read("ca_file", ca)?)),
                None => config.with_native_roots(),
            };
            if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
                config = config.identity(Identity::from_pem(
                    read("cert_file", cert)?,
                    read("key_file", key)?,
                ));
            }
            if let Some(name) = &tls.server_name {
                config = config.domain_name(name.clone());
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| XdsSetupError(format!("xds.tls: {e}")))?;
        }
        let pairs = |name: &str, text: &str, separator| {
            parse_pairs(text, separator).map_err(|e| XdsSetupError(format!("{name}: {e}")))
        };
        let metadata = pairs("xds.node_metadata", &settings.node_metadata, '=')?;
        let mut headers = Vec::new();
        for (key, value) in pairs("xds.headers", &settings.headers, ':')? {
            let name =
                MetadataKey::from_bytes(key.to_ascii_lowercase().as_bytes()).map_err(|_| {
                    XdsSetupError(format!("xds.headers: \"{key}\" is not a header name"))
                })?;
            let value = MetadataValue::try_from(value.as_str()).map_err(|_| {
                XdsSetupError(format!(
                    "xds.headers: the value of \"{key}\" is not a valid header value"
                ))
            })?;
            headers.push((name, value));
        }
        let node = Node {
            id: settings.node_id.clone(),
            cluster: settings.node_cluster.clone(),
            metadata: Some(prost_types::Struct {
                fields: metadata
                    .into_iter()
                    .map(|(k, v)| {
                        let value = prost_types::Value {
                            kind: Some(prost_types::value::Kind::StringValue(v)),
                        };
                        (k, value)
                    })
                    .collect(),
            }),
            user_agent_name: "sluice".into(),
            user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").into(),
            )),
        };
        let status = Arc::new(XdsStatus::default());
        {
            let mut shown = status.lock();
            shown.server_url = settings.server_url.clone();
            shown.node_id = settings.node_id.clone();
        }
        metrics.init_xds_series();
        Ok(Self {
            endpoint,
            node,
            headers,
            settings: settings.clone(),
            limits,
            metrics,
            clock,
            status,
        })
    }

    pub fn status(&self) -> Arc<XdsStatus> {
        self.status.clone()
    }

    /// Keeps a stream open (reconnecting as needed) until `stop` turns true.
    pub fn spawn(self, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut backoff =
                Backoff::new(self.settings.backoff_initial, self.settings.backoff_max);
            let mut attempt = 0u64;
            loop {
                if *stop.borrow() {
                    return;
                }
                if attempt > 0 {
                    self.metrics.xds_reconnect();
                    self.status.lock().reconnects += 1;
                }
                attempt += 1;
                let ended = self.session(&mut stop, &mut backoff).await;
                self.metrics.xds_connected(false);
                {
                    let mut shown = self.status.lock();
                    shown.connected = false;
                    if let Err(e) = &ended {
                        shown.last_stream_error = Some(e.clone());
                    }
                }
                let Err(reason) = ended else { return };
                let delay = backoff.next_delay();
                warn!(
                    server = %self.settings.server_url,
                    error = %reason,
                    retry_in = ?delay,
                    "no xDS stream to the management server (lost or refused); the limits in service stay"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => return,
                }
            }
        })
    }

    /// One stream, from connecting to its end: `Ok` when stopped, `Err` with why it ended.
    async fn session(
        &self,
        stop: &mut watch::Receiver<bool>,
        backoff: &mut Backoff,
    ) -> Result<(), String> {
        let channel = self.endpoint.connect().await.map_err(|e| {
            format!(
                "cannot connect to {}: {}",
                self.settings.server_url,
                chain(&e)
            )
        })?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(self.settings.max_message_bytes);
        let (tx, rx) = mpsc::channel::<DiscoveryRequest>(4);
        let version = self.status.lock().version.clone().unwrap_or_default();
        let first = self.request(version, String::new(), None);
        // The channel is fresh and has room: this send cannot wait.
        tx.send(first)
            .await
            .map_err(|_| "the request stream closed before it opened".to_string())?;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        for (name, value) in &self.headers {
            request.metadata_mut().insert(name.clone(), value.clone());
        }
        let mut responses = client
            .stream_aggregated_resources(request)
            .await
            .map_err(|status| format!("the management server refused the stream: {status}"))?
            .into_inner();
        info!(server = %self.settings.server_url, node = %self.node.id, "xDS stream open; waiting for limits");
        self.metrics.xds_connected(true);
        self.status.lock().connected = true;
        loop {
            let message = tokio::select! {
                message = responses.message() => message,
                _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => return Ok(()),
            };
            let response = match message {
                Ok(Some(response)) => response,
                Ok(None) => return Err("the management server ended the stream".into()),
                Err(status) => return Err(format!("stream error: {status}")),
            };
            backoff.reset();
            if response.type_url != TYPE_URL {
                warn!(type_url = %response.type_url, "xDS response of a type not asked for; ignored");
                continue;
            }
            let reply = self.apply(&response);
            if tx.send(reply).await.is_err() {
                return Err("the request stream closed".into());
            }
        }
    }

    /// Validates a response whole, swaps it in if valid, and answers the ACK or NACK.
    fn apply(&self, response: &DiscoveryResponse) -> DiscoveryRequest {
        let now = self.clock.now_ms();
        match build_set(response) {
            Ok(mut set) => {
                set.loaded_at_ms = now;
                let domains = set.domains.len();
                let hash = set.content_hash.clone();
                self.limits.replace(set);
                self.metrics.config_loaded(true, now as f64 / 1000.0);
                self.metrics.xds_response(true);
                {
                    let mut shown = self.status.lock();
                    shown.version = Some(response.version_info.clone());
                    shown.acks += 1;
                }
                if !self.status.first_set.swap(true, Ordering::SeqCst) {
                    self.status.arrived.notify_waiters();
                }
                info!(
                    version = %response.version_info,
                    domains,
                    hash = %hash,
                    "limits from xDS applied (ACK)"
                );
                self.request(response.version_info.clone(), response.nonce.clone(), None)
            }
            Err(errors) => {
                self.metrics.config_loaded(false, now as f64 / 1000.0);
                self.metrics.xds_response(false);
                let detail = nack_detail(&errors);
                for e in &errors.0 {
                    error!(
                        version = %response.version_info,
                        error = %e,
                        "limits from xDS rejected (NACK); the previous limits stay in service"
                    );
                }
                let served = {
                    let mut shown = self.status.lock();
                    shown.nacks += 1;
                    shown.last_nack = Some(detail.clone());
                    shown.version.clone().unwrap_or_default()
                };
                self.request(
                    served,
                    response.nonce.clone(),
                    Some(Status {
                        code: INVALID_ARGUMENT,
                        message: detail,
                        details: Vec::new(),
                    }),
                )
            }
        }
    }

    fn request(
        &self,
        version_info: String,
        response_nonce: String,
        error_detail: Option<Status>,
    ) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info,
            node: Some(self.node.clone()),
            type_url: TYPE_URL.into(),
            response_nonce,
            error_detail,
            ..Default::default()
        }
    }
}

/// Every resource of a response, decoded and built into one set; every problem of every
/// resource when any is invalid. Resources are named `xds:<name>` in errors and on
/// `/config` (where a domain from a file shows its path).
pub fn build_set(response: &DiscoveryResponse) -> Result<LimitSet, ConfigErrors> {
    let mut set = LimitSet::default();
    let mut errors = Vec::new();
    let mut content = blake3::Hasher::new();
    for (i, any) in response.resources.iter().enumerate() {
        let origin = |name: &str| {
            PathBuf::from(if name.is_empty() {
                format!("xds:resources[{i}]")
            } else {
                format!("xds:{name}")
            })
        };
        let problem = |message: String| ConfigError {
            file: origin(""),
            line: None,
            route: None,
            field: String::new(),
            message,
        };
        if any.type_url != TYPE_URL {
            errors.push(problem(format!(
                "resource of type \"{}\": only {TYPE_URL} is read",
                any.type_url
            )));
            continue;
        }
        content.update(&(any.value.len() as u64).to_le_bytes());
        content.update(&any.value);
        let config = match RateLimitConfig::decode(any.value.as_slice()) {
            Ok(config) => config,
            Err(e) => {
                errors.push(problem(format!("cannot decode a RateLimitConfig: {e}")));
                continue;
            }
        };
        match super::envoy::from_proto(&origin(&config.name), &config) {
            Ok((domain, with_metadata)) => {
                if with_metadata > 0 {
                    warn!(
                        resource = %config.name,
                        descriptors = with_metadata,
                        "descriptor metadata is ignored: sluice does not return it as dynamic \
                         metadata"
                    );
                }
                if let Err(e) = add_domain(&mut set, domain, None) {
                    errors.push(e);
                }
            }
            Err(mut resource_errors) => errors.append(&mut resource_errors),
        }
    }
    set.content_hash = content.finalize().to_hex().to_string();
    if errors.is_empty() {
        Ok(set)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// The `error_detail` message of a NACK: every error, one per line, cut at a bound.
fn nack_detail(errors: &ConfigErrors) -> String {
    let mut text = errors.to_string();
    if text.len() > MAX_DETAIL_BYTES {
        let mut end = MAX_DETAIL_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str(" ... (cut; sluice's log has every error)");
    }
    text
}

/// An error with its causes (tonic's transport errors hide the useful part in the source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Capped exponential delays, each jittered to between half and all of itself.
struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            current: initial,
        }
    }

    fn reset(&mut self) {
        self.current = self.initial;
    }

    fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = base / 2;
        // RandomState is seeded per instance: random enough to spread replicas apart, and
        // no dependency for it.
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let spread = half.as_nanos() as u64;
        let extra = if spread == 0 {
            0
        } else {
            random % (spread + 1)
        };
        half + Duration::from_nanos(extra)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_stays_within_its_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let bounds = [(50, 100), (100, 200), (175, 350), (175, 350)];
        for (low, high) in bounds {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(low) && d <= Duration::from_millis(high),
                "{d:?} not in {low}..={high} ms"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn a_long_nack_is_cut_on_a_char_boundary() {
        let errors = ConfigErrors(vec![ConfigError {
            file: "xds:a".into(),
            line: None,
            route: None,
            field: String::new(),
            message: "é".repeat(MAX_DETAIL_BYTES),
        }]);
        let detail = nack_detail(&errors);
        assert!(detail.len() < MAX_DETAIL_BYTES + 100);
        assert!(detail.ends_with("log has every error)"));
    }
}
