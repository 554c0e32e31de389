//! A management server for the xDS limits source: a tonic ADS server (state of the world)
//! on a free loopback port that pushes snapshots of `RateLimitConfig` resources to every
//! stream and records every request it receives (the ACKs and NACKs), as Envoy Gateway's
//! would.
//!
//! Like a go-control-plane server it answers a stream's first request with the snapshot it
//! has (if any), then pushes each new snapshot with a fresh nonce. It can be stopped (every
//! stream ends with UNAVAILABLE, the port closes) and started again on the same port, to
//! play a restarted control plane. [`config_from_yaml`] turns an envoyproxy/ratelimit limits
//! file into the message that pushes the same limits.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use prost_types::Any;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

pub use sluice::config::xds::TYPE_URL;
pub use sluice::proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
pub use sluice::proto::discovery::{DiscoveryRequest, DiscoveryResponse};
pub use sluice::proto::rls_conf::{
    RateLimitConfig, RateLimitDescriptor as ConfDescriptor, RateLimitPolicy, RateLimitReplace,
    RateLimitUnit as ConfUnit,
};

use super::free_port;

/// What is pushed: a version and its resources (already packed, so a test can push one of
/// another type or bytes that do not decode).
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub version: String,
    pub resources: Vec<Any>,
}

/// Packs a `RateLimitConfig` as a resource.
pub fn resource(config: &RateLimitConfig) -> Any {
    Any {
        type_url: TYPE_URL.into(),
        value: config.encode_to_vec(),
    }
}

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<DiscoveryRequest>>,
    /// Nonces handed out, numbered across restarts so none repeats.
    nonce: Mutex<u64>,
    /// Sent with each response: (version, nonce) in order.
    sent: Mutex<Vec<(String, String)>>,
}

#[derive(Clone)]
struct Ads {
    shared: Arc<Shared>,
    snapshot: watch::Receiver<Option<Snapshot>>,
    /// Turns true when the server stops: every stream ends.
    closing: watch::Receiver<bool>,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = ResponseStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            let mut snapshot = this.snapshot.clone();
            let mut closing = this.closing.clone();
            let mut subscribed = false;
            loop {
                tokio::select! {
                    message = incoming.message() => match message {
                        Ok(Some(request)) => {
                            this.shared.requests.lock().expect("requests").push(request);
                            if !subscribed {
                                subscribed = true;
                                let current = snapshot.borrow_and_update().clone();
                                if let Some(s) = current
                                    && tx.send(Ok(this.response(&s))).await.is_err()
                                {
                                    return;
                                }
                            }
                        }
                        _ => return,
                    },
                    changed = snapshot.changed(), if subscribed => {
                        if changed.is_err() {
                            return;
                        }
                        let current = snapshot.borrow_and_update().clone();
                        if let Some(s) = current
                            && tx.send(Ok(this.response(&s))).await.is_err()
                        {
                            return;
                        }
                    }
                    _ = async { closing.wait_for(|c| *c).await.map(|_| ()) } => {
                        let _ = tx.send(Err(Status::unavailable("management server stopping"))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl Ads {
    fn response(&self, s: &Snapshot) -> DiscoveryResponse {
        let nonce = {
            let mut n = self.shared.nonce.lock().expect("nonce");
            *n += 1;
            format!("nonce-{n}")
        };
        self.shared
            .sent
            .lock()
            .expect("sent")
            .push((s.version.clone(), nonce.clone()));
        DiscoveryResponse {
            version_info: s.version.clone(),
            resources: s.resources.clone(),
            type_url: TYPE_URL.into(),
            nonce,
            ..Default::default()
        }
    }
}

/// TLS of the management server: its certificate and, when set, the CA its clients'
/// certificates must be signed by.
#[derive(Clone)]
pub struct AdsTls {
    pub cert: String,
    pub key: String,
    pub client_ca: Option<String>,
}

/// The management server. Stopped on drop.
pub struct AdsServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    snapshot: watch::Sender<Option<Snapshot>>,
    closing: Option<watch::Sender<bool>>,
    task: Option<JoinHandle<()>>,
    tls: Option<AdsTls>,
}

impl AdsServer {
    /// Serves on a free loopback port, with no snapshot yet.
    pub async fn start() -> Self {
        Self::start_tls(None).await
    }

    pub async fn start_tls(tls: Option<AdsTls>) -> Self {
        let (snapshot, _) = watch::channel(None);
        let mut server = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            shared: Arc::default(),
            snapshot,
            closing: None,
            task: None,
            tls,
        };
        server.serve().await;
        server
    }

    /// `host:port`, as `xds.server_url` takes it.
    pub fn url(&self) -> String {
        self.addr.to_string()
    }

    async fn serve(&mut self) {
        let (closing, closing_rx) = watch::channel(false);
        let ads = Ads {
            shared: self.shared.clone(),
            snapshot: self.snapshot.subscribe(),
            closing: closing_rx.clone(),
        };
        // The port may be briefly held by the previous run's closing sockets.
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("the ADS server cannot listen on {}: {e}", self.addr),
            }
        };
        let mut builder = Server::builder();
        if let Some(tls) = &self.tls {
            let mut config =
                ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert, &tls.key));
            if let Some(ca) = &tls.client_ca {
                config = config.client_ca_root(Certificate::from_pem(ca));
            }
            builder = builder.tls_config(config).expect("ADS server TLS");
        }
        let mut stop = closing_rx;
        let router = builder.add_service(AggregatedDiscoveryServiceServer::new(ads));
        self.task = Some(tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let _ = router
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|c| *c).await.map(|_| ());
                })
                .await;
        }));
        self.closing = Some(closing);
    }

    /// Pushes a snapshot to every stream (and to streams opened later).
    pub fn push(&self, version: &str, resources: Vec<Any>) {
        self.snapshot.send_replace(Some(Snapshot {
            version: version.into(),
            resources,
        }));
    }

    /// Pushes `RateLimitConfig`s.
    pub fn push_configs(&self, version: &str, configs: &[RateLimitConfig]) {
        self.push(version, configs.iter().map(resource).collect());
    }

    /// Every request received so far, in order (across restarts).
    pub fn requests(&self) -> Vec<DiscoveryRequest> {
        self.shared.requests.lock().expect("requests").clone()
    }

    /// (version, nonce) of every response sent, in order.
    pub fn sent(&self) -> Vec<(String, String)> {
        self.shared.sent.lock().expect("sent").clone()
    }

    /// Waits (at most `limit`) for a request that `matches`, and returns it.
    pub async fn wait_for_request(
        &self,
        what: &str,
        limit: Duration,
        matches: impl Fn(&DiscoveryRequest) -> bool,
    ) -> DiscoveryRequest {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(r) = self.requests().into_iter().find(|r| matches(r)) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {limit:?}; requests: {:#?}",
                self.requests()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The ACK of the response with `nonce`.
    pub async fn ack_of(&self, version: &str, nonce: &str) -> DiscoveryRequest {
        self.wait_for_request(
            &format!("ACK of version {version} (nonce {nonce})"),
            Duration::from_secs(10),
            |r| r.response_nonce == nonce && r.error_detail.is_none(),
        )
        .await
    }

    /// The NACK of the response with `nonce`.
    pub async fn nack_of(&self, nonce: &str) -> DiscoveryRequest {
        self.wait_for_request(
            &format!("NACK of nonce {nonce}"),
            Duration::from_secs(10),
            |r| r.response_nonce == nonce && r.error_detail.is_some(),
        )
        .await
    }

    /// Waits for a response of `version` to have been sent and returns its nonce.
    pub async fn sent_nonce(&self, version: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some((_, nonce)) = self.sent().into_iter().rev().find(|(v, _)| v == version) {
                return nonce;
            }
            assert!(
                Instant::now() < deadline,
                "version {version} was never sent (no stream subscribed?); requests: {:#?}",
                self.requests()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops serving: every stream ends with UNAVAILABLE and the port closes.
    pub async fn stop(&mut self) {
        if let Some(closing) = self.closing.take() {
            let _ = closing.send(true);
        }
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    /// Serves again on the same port, with the snapshot it had.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.serve().await;
    }
}

impl Drop for AdsServer {
    fn drop(&mut self) {
        if let Some(closing) = self.closing.take() {
            let _ = closing.send(true);
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

// ----- limits as messages -----

/// The `RateLimitConfig` pushing the same limits as an envoyproxy/ratelimit limits file (what
/// Envoy Gateway's translator, or `ConfigXdsProtoToYaml` read backwards, makes).
pub fn config_from_yaml(name: &str, text: &str) -> RateLimitConfig {
    let value: Value =
        serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{name} is not YAML: {e}"));
    RateLimitConfig {
        name: name.into(),
        domain: value["domain"].as_str().unwrap_or_default().into(),
        descriptors: descriptors(&value["descriptors"]),
    }
}

fn descriptors(list: &Value) -> Vec<ConfDescriptor> {
    list.as_array()
        .map(|items| items.iter().map(descriptor).collect())
        .unwrap_or_default()
}

fn descriptor(d: &Value) -> ConfDescriptor {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let flag = |v: &Value| v.as_bool().unwrap_or(false);
    ConfDescriptor {
        key: text(&d["key"]),
        value: text(&d["value"]),
        rate_limit: d.get("rate_limit").map(|rl| RateLimitPolicy {
            unit: unit(&text(&rl["unit"])) as i32,
            requests_per_unit: rl["requests_per_unit"].as_u64().unwrap_or(0) as u32,
            unlimited: flag(&rl["unlimited"]),
            name: text(&rl["name"]),
            replaces: rl["replaces"]
                .as_array()
                .map(|r| {
                    r.iter()
                        .map(|x| RateLimitReplace {
                            name: text(&x["name"]),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }),
        descriptors: descriptors(&d["descriptors"]),
        shadow_mode: flag(&d["shadow_mode"]),
        detailed_metric: flag(&d["detailed_metric"]),
        quota_mode: flag(&d["quota_mode"]),
        metadata: None,
    }
}

/// A unit by name, in any case, as upstream reads it.
pub fn unit(name: &str) -> ConfUnit {
    ConfUnit::from_str_name(&name.to_ascii_uppercase()).unwrap_or(ConfUnit::Unknown)
}

/// A descriptor `key`(=`value`) with `requests` per `unit`.
pub fn limited(key: &str, value: &str, requests: u32, unit: ConfUnit) -> ConfDescriptor {
    ConfDescriptor {
        key: key.into(),
        value: value.into(),
        rate_limit: Some(RateLimitPolicy {
            unit: unit as i32,
            requests_per_unit: requests,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A config of one domain.
pub fn config(name: &str, domain: &str, descriptors: Vec<ConfDescriptor>) -> RateLimitConfig {
    RateLimitConfig {
        name: name.into(),
        domain: domain.into(),
        descriptors,
    }
}
