//! Wiring: builds the store, the limiter, the gRPC (RLS and RLQS) and the HTTP servers from [`Settings`],
//! and runs them until a shutdown signal.
//!
//! Tests use [`start`] directly with their own clock and port 0; `sluice serve` uses [`run`],
//! which adds signal handling and the shutdown grace period. Nothing here decides a request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tracing::{info, warn};

use crate::clock::{Clock, SystemClock};
use crate::config::reload::{Limits, Reloader};
use crate::config::settings::{self, LimitsSource, LogFormat};
use crate::config::xds::{XdsSource, XdsStatus};
use crate::config::{ConfigErrors, Settings, load_dir};
use crate::limiter::Source;
use crate::limiter::backend::Backend as LimiterBackend;
use crate::limiter::fallback::FallbackConfig;
use crate::limiter::memory::MemoryStore;
use crate::limiter::quota::{QuotaBackend, QuotaStore};
use crate::limiter::redis::RedisStore;
use crate::limits::LimitSet;
use crate::metrics::Metrics;
use crate::proto;
use crate::proto::rlqs::rate_limit_quota_service_server::RateLimitQuotaServiceServer;
use crate::proto::rls::rate_limit_service_server::RateLimitServiceServer;
use crate::service::RateLimiter;
use crate::service::grpc::GrpcService;
use crate::service::http::{self, HttpState, JsonCodec, Readiness};
use crate::service::rlqs::{Rlqs, RlqsService};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("limits are invalid:\n{0}")]
    Limits(#[from] ConfigErrors),
    #[error(
        "limits directory {0} does not exist: run from the repository root, or set --limits-dir / SLUICE_LIMITS_DIR"
    )]
    NoLimitsDir(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("redis backend: {0}")]
    Redis(#[from] crate::limiter::redis::RedisSetupError),
    #[error("server setup: {0}")]
    Setup(String),
}

/// A running server. Dropping it does not stop it; call [`ServerHandle::shutdown`].
pub struct ServerHandle {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub limiter: Arc<RateLimiter>,
    pub readiness: Arc<Readiness>,
    stop: watch::Sender<bool>,
    /// gRPC health: turned NOT_SERVING at shutdown together with `/readyz`.
    health: tonic_health::server::HealthReporter,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    http: JoinHandle<std::io::Result<()>>,
    sweeper: JoinHandle<()>,
    reloader: JoinHandle<()>,
    /// Reloads the limits directory now (what SIGHUP does); for tests and tools.
    pub reload: Reloader,
    /// What the xDS limits source has done (`limits_source: xds`).
    pub xds: Option<Arc<XdsStatus>>,
}

impl ServerHandle {
    /// Stops accepting, lets in-flight requests finish (up to `grace`), then returns.
    /// `/readyz` answers 503 and gRPC health NOT_SERVING from the first moment, so balancers
    /// and Envoy's health checks stop sending; the background tasks (sweeper, reloader,
    /// breaker probe) see the same signal and end between two steps, never in the middle
    /// of one.
    pub async fn shutdown(mut self, grace: Duration) {
        self.readiness.drain();
        self.health
            .set_not_serving::<RateLimitServiceServer<GrpcService>>()
            .await;
        self.health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let _ = self.stop.send(true);
        let both = async {
            let grpc = (&mut self.grpc).await;
            let http = (&mut self.http).await;
            let _ = (&mut self.sweeper).await;
            let _ = (&mut self.reloader).await;
            (grpc, http)
        };
        match tokio::time::timeout(grace, both).await {
            Ok((grpc, http)) => {
                if let Ok(Err(e)) = grpc {
                    warn!(error = %e, "gRPC server stopped with an error");
                }
                if let Ok(Err(e)) = http {
                    warn!(error = %e, "HTTP server stopped with an error");
                }
                info!("servers and background tasks stopped");
            }
            Err(_) => {
                warn!(
                    ?grace,
                    "in-flight requests did not finish within the grace period"
                );
                self.grpc.abort();
                self.http.abort();
                self.sweeper.abort();
                self.reloader.abort();
            }
        }
    }
}

async fn bind(addr: &str) -> Result<(TcpListener, SocketAddr), ServeError> {
    let bind_error = |source| ServeError::Bind {
        addr: addr.to_string(),
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    Ok((listener, local))
}

/// Loads the limits, binds both addresses and starts serving in the background.
pub async fn start(settings: &Settings, clock: Arc<dyn Clock>) -> Result<ServerHandle, ServeError> {
    let from_xds = settings.limits_source == LimitsSource::Xds;
    if !from_xds && !settings.limits_dir.is_dir() {
        return Err(ServeError::NoLimitsDir(
            settings.limits_dir.display().to_string(),
        ));
    }
    let metrics = Arc::new(Metrics::new());
    // Over xDS the limits come once the stream is open: until then none (every request is
    // answered OK) and `/readyz` says so.
    let limits = if from_xds {
        LimitSet::default()
    } else {
        let mut limits = match load_dir(&settings.limits_dir) {
            Ok(limits) => limits,
            Err(e) => {
                metrics.config_loaded(false, 0.0);
                return Err(e.into());
            }
        };
        limits.loaded_at_ms = clock.now_ms();
        metrics.config_loaded(true, limits.loaded_at_ms as f64 / 1000.0);
        log_loaded(&limits);
        if limits.domains.is_empty() {
            warn!(
                dir = %settings.limits_dir.display(),
                "the limits directory holds no limits: every request is answered OK until files \
                 are added (they are picked up without a restart)"
            );
        }
        limits
    };

    // One signal ends everything started here: servers, sweeper, reloader, breaker probe.
    let (stop, stopped) = watch::channel(false);

    // The memory store always exists: it is the backend, or the local fallback.
    let memory = Arc::new(MemoryStore::new(settings.memory.max_entries));
    // RLQS shares live where the counters do: Redis for a fleet, else this replica alone.
    let mut shared_quota: Option<Arc<dyn QuotaStore>> = None;
    let backend = Arc::new(match settings.backend {
        settings::Backend::Memory => LimiterBackend::memory(memory),
        settings::Backend::Redis => {
            let redis = Arc::new(RedisStore::connect(&settings.redis).await?);
            redis.count_failovers_in(&metrics);
            shared_quota = Some(redis.clone());
            // Before the fallback: it may open the breaker at once and set these series.
            metrics.init_series(Source::Redis.as_str());
            LimiterBackend::remote(
                redis,
                memory,
                FallbackConfig {
                    replicas: settings.fallback.replicas,
                    failure_threshold: settings.fallback.failure_threshold,
                    probe_interval: settings.fallback.probe_interval,
                },
                settings.over_limit_cache.max_entries,
                clock.clone(),
                metrics.clone(),
                stopped.clone(),
            )
        }
    });
    if backend.source() == Source::Memory {
        metrics.init_series(Source::Memory.as_str());
    }
    let limits = Limits::new(limits);
    let limiter = Arc::new(
        RateLimiter::new(
            LimitSet::default(),
            backend.store().clone(),
            clock.clone(),
            settings.request.clone(),
        )
        .with_limits(limits.clone())
        .with_store_label(backend.source())
        .with_metrics(metrics.clone())
        .with_max_in_flight(settings.max_in_flight)
        .with_fallback_header(settings.fallback.response_header)
        .with_shadow_mode(settings.shadow_mode),
    );

    let quota = Arc::new(QuotaBackend::new(shared_quota, settings.memory.max_entries));
    let rlqs = Arc::new(Rlqs::new(
        limits.clone(),
        quota.clone(),
        clock.clone(),
        metrics.clone(),
    ));

    let sweep_every = settings.memory.sweep_interval;
    let mut sweep_stop = stopped.clone();
    let sweeping = backend.clone();
    let sweep_clock = clock.clone();
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(sweep_every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = sweep_stop.wait_for(|stop| *stop) => return,
            }
            sweeping.sweep(sweep_clock.now_ms());
            quota.sweep(sweep_clock.now_ms());
        }
    });

    let (grpc_listener, grpc_addr) = bind(&settings.grpc_addr).await?;
    let (http_listener, http_addr) = bind(&settings.http_addr).await?;
    let metrics_listener = match &settings.metrics_addr {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };

    let (health_reporter, health, reflection) =
        health_and_reflection::<RateLimitServiceServer<GrpcService>>().await?;
    health_reporter
        .set_serving::<RateLimitQuotaServiceServer<RlqsService>>()
        .await;
    let rls = RateLimitServiceServer::new(GrpcService::new(limiter.clone()))
        .max_decoding_message_size(settings.request.max_message_bytes);
    let rlqs = RateLimitQuotaServiceServer::new(RlqsService::new(rlqs, stopped.clone()))
        .max_decoding_message_size(settings.request.max_message_bytes);

    let reload = Reloader::new(
        &settings.limits_dir,
        limits.clone(),
        metrics.clone(),
        clock.clone(),
    );
    let (reloader, xds) = match settings.limits_source {
        LimitsSource::Files => (
            reload
                .clone()
                .spawn(settings.limits_poll_interval, stopped.clone()),
            None,
        ),
        LimitsSource::Xds => {
            let source = XdsSource::new(&settings.xds, limits, metrics, clock)
                .map_err(|e| ServeError::Setup(e.to_string()))?;
            let status = source.status();
            info!(
                server = %settings.xds.server_url,
                node = %settings.xds.node_id,
                "limits come from the xDS management server"
            );
            (source.spawn(stopped.clone()), Some(status))
        }
    };
    // Over xDS, gRPC health says NOT_SERVING until the first limits, as `/readyz` does (and as
    // envoyproxy/ratelimit's gRPC health does).
    if let Some(status) = xds
        .clone()
        .filter(|_| !settings.xds.start_without_initial_config)
    {
        health_reporter
            .set_not_serving::<RateLimitServiceServer<GrpcService>>()
            .await;
        let reporter = health_reporter.clone();
        let mut stop = stopped.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = status.first_set() => {
                    reporter.set_serving::<RateLimitServiceServer<GrpcService>>().await;
                }
                _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => {}
            }
        });
    }
    let stop_signal = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = server_tls(settings)? {
        builder = builder
            .tls_config(tls)
            .map_err(|e| ServeError::Setup(format!("tls: {e}")))?;
    }
    let grpc = tokio::spawn(
        builder
            .add_service(health)
            .add_service(reflection)
            .add_service(rls)
            .add_service(rlqs)
            .serve_with_incoming_shutdown(
                // TCP_NODELAY: answers are small and must not wait for Nagle (tonic's own
                // setting does not apply to incoming streams built here).
                TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
                stop_signal(stopped.clone()),
            ),
    );

    let readiness = Arc::new(Readiness::default());
    let codec = JsonCodec::new().map_err(ServeError::Setup)?;
    let router = http::router(HttpState {
        limiter: limiter.clone(),
        backend,
        settings: Arc::new(settings.redacted()),
        readiness: readiness.clone(),
        codec: Arc::new(codec),
        xds: xds.clone(),
        wait_for_limits: !settings.xds.start_without_initial_config,
    });
    let second = metrics_listener.map(|(listener, addr)| {
        info!(metrics_addr = %addr, "also serving the HTTP routes (metrics) on");
        let router = router.clone();
        let stopped = stopped.clone();
        async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stop_signal(stopped))
                .await
        }
    });
    let http = tokio::spawn(async move {
        let main = axum::serve(http_listener, router).with_graceful_shutdown(stop_signal(stopped));
        match second {
            Some(second) => tokio::try_join!(async { main.await }, second).map(|_| ()),
            None => main.await,
        }
    });
    info!(%grpc_addr, %http_addr, "serving Envoy RLS v3 on gRPC; metrics and API on HTTP");
    Ok(ServerHandle {
        grpc_addr,
        http_addr,
        limiter,
        readiness,
        stop,
        health: health_reporter,
        grpc,
        http,
        sweeper,
        reloader,
        reload,
        xds,
    })
}

/// What every gRPC server of sluice offers beside its RLS service: health (SERVING for `S`)
/// and reflection over the vendored protos, so grpcurl and ghz need no proto files.
async fn health_and_reflection<S: tonic::server::NamedService>() -> Result<
    (
        tonic_health::server::HealthReporter,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
        tonic_reflection::pb::v1::server_reflection_server::ServerReflectionServer<
            impl tonic_reflection::pb::v1::server_reflection_server::ServerReflection,
        >,
    ),
    ServeError,
> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<S>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Setup(e.to_string()))?;
    Ok((reporter, health, reflection))
}

/// The gRPC server's TLS settings, read from the files named in `settings.tls`.
fn server_tls(
    settings: &Settings,
) -> Result<Option<tonic::transport::ServerTlsConfig>, ServeError> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let (Some(cert), Some(key)) = (&settings.tls.cert_file, &settings.tls.key_file) else {
        return Ok(None);
    };
    let read = |path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| ServeError::Setup(format!("tls: cannot read {}: {e}", path.display())))
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = &settings.tls.client_ca_file {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(tls))
}

/// One info line per load; at debug, every route's effective settings with where each came
/// from (the same view as `GET /config`).
fn log_loaded(limits: &LimitSet) {
    let routes: usize = limits.domains.values().map(|d| d.routes().len()).sum();
    info!(
        domains = limits.domains.len(),
        routes,
        hash = %limits.content_hash,
        "limits loaded"
    );
    for domain in limits.domains.values() {
        for route in domain.routes().values() {
            tracing::debug!(
                domain = %domain.name,
                route = %route.name,
                limits_from = %route.limits_from,
                settings = %serde_json::to_string(&route.settings).unwrap_or_default(),
                "effective route"
            );
        }
    }
}

/// `sluice serve`: starts, then waits for SIGINT or SIGTERM and shuts down gracefully.
pub async fn run(settings: Settings) -> Result<(), ServeError> {
    // Listened for before the ports open: a SIGTERM that comes as soon as they accept must
    // end the server gracefully, not kill it by the signal's default action.
    let stop = ShutdownSignal::install();
    let handle = start(&settings, Arc::new(SystemClock)).await?;
    stop.wait().await;
    info!("shutting down: finishing in-flight requests");
    handle.shutdown(settings.shutdown_grace).await;
    Ok(())
}

async fn shutdown_signal() {
    ShutdownSignal::install().wait().await;
}

/// SIGINT and SIGTERM, registered when made (so none is missed between that and the wait).
struct ShutdownSignal {
    #[cfg(unix)]
    signals: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl ShutdownSignal {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let signals = match (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) {
                (Ok(int), Ok(term)) => Some((int, term)),
                _ => None,
            };
            Self { signals }
        }
        #[cfg(not(unix))]
        {
            Self {}
        }
    }

    async fn wait(self) {
        #[cfg(unix)]
        if let Some((mut int, mut term)) = self.signals {
            tokio::select! {
                _ = int.recv() => {},
                _ = term.recv() => {},
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Installs the log subscriber. Safe to call twice (the second call does nothing).
pub fn init_tracing(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match settings.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The RLS of the benchmarks' no-op servers: answers every `ShouldRateLimit` with OK and one
/// OK status per descriptor, without matching, counting or metrics.
struct NoopRls;

#[tonic::async_trait]
impl proto::rls::rate_limit_service_server::RateLimitService for NoopRls {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<proto::rls::RateLimitRequest>,
    ) -> Result<tonic::Response<proto::rls::RateLimitResponse>, tonic::Status> {
        use crate::proto::rls::rate_limit_response::{Code, DescriptorStatus};
        let ok = DescriptorStatus {
            code: Code::Ok as i32,
            ..Default::default()
        };
        Ok(tonic::Response::new(proto::rls::RateLimitResponse {
            overall_code: Code::Ok as i32,
            statuses: vec![ok; request.get_ref().descriptors.len()],
            ..Default::default()
        }))
    }
}

/// The no-op RLS of the benchmarks on the same tonic stack as [`start`] (health, reflection,
/// TCP_NODELAY on accepted streams, the RLS service). `sluice baseline` serves it, so a load
/// run against it measures the transport alone and sluice's numbers can be read as a ratio.
pub async fn serve_baseline(
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (_reporter, health, reflection) =
        health_and_reflection::<RateLimitServiceServer<NoopRls>>().await?;
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(RateLimitServiceServer::new(NoopRls))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .map_err(|e| ServeError::Setup(format!("baseline server: {e}")))
}

/// `sluice baseline --plain`: the same no-op RLS on a bare tonic server, `Server::builder()`
/// with its defaults binding `addr` itself, and no health or reflection service; serves until
/// SIGINT or SIGTERM. The benchmarks compare it with [`serve_baseline`] to see what sluice's own
/// server settings cost or save.
pub async fn run_plain_baseline(addr: &str) -> Result<(), ServeError> {
    let bind_error = |source| ServeError::Bind {
        addr: addr.to_string(),
        source,
    };
    let socket = tokio::net::lookup_host(addr)
        .await
        .map_err(bind_error)?
        .next()
        .ok_or_else(|| bind_error(std::io::ErrorKind::NotFound.into()))?;
    info!(grpc_addr = %socket, "serving the no-op RLS on a bare tonic server (answers OK to everything)");
    tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::new(NoopRls))
        .serve_with_shutdown(socket, shutdown_signal())
        .await
        .map_err(|e| ServeError::Setup(format!("bare tonic server: {e}")))
}

/// `sluice baseline`: serves [`serve_baseline`] on `addr` until SIGINT or SIGTERM.
pub async fn run_baseline(addr: &str) -> Result<(), ServeError> {
    let (listener, local) = bind(addr).await?;
    info!(grpc_addr = %local, "serving the no-op baseline RLS (answers OK to everything)");
    serve_baseline(listener, shutdown_signal()).await
}
