//! Wiring: builds the store, the limiter and the gRPC server from [`Settings`], and runs
//! them until a shutdown signal.
//!
//! Tests use [`start`] directly with their own clock and port 0; `sluice serve` uses [`run`],
//! which adds signal handling and the shutdown grace period. Nothing here decides a request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{info, warn};

use crate::clock::{Clock, SystemClock};
use crate::config::settings::{Backend, LogFormat};
use crate::config::{ConfigErrors, Settings, load_dir};
use crate::limiter::memory::MemoryStore;
use crate::proto;
use crate::proto::rls::rate_limit_service_server::RateLimitServiceServer;
use crate::service::RateLimiter;
use crate::service::grpc::GrpcService;

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
    #[error("backend {0:?} is not available in this version of sluice; use `memory`")]
    Backend(Backend),
    #[error("gRPC server: {0}")]
    Transport(String),
}

/// A running server. Dropping it does not stop it; call [`ServerHandle::shutdown`].
pub struct ServerHandle {
    pub grpc_addr: SocketAddr,
    pub limiter: Arc<RateLimiter>,
    stop: Option<oneshot::Sender<()>>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    sweeper: JoinHandle<()>,
}

impl ServerHandle {
    /// Stops accepting, lets in-flight requests finish (up to `grace`), then returns.
    pub async fn shutdown(mut self, grace: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.sweeper.abort();
        match tokio::time::timeout(grace, &mut self.grpc).await {
            Ok(Ok(Ok(()))) => info!("gRPC server stopped"),
            Ok(Ok(Err(e))) => warn!(error = %e, "gRPC server stopped with an error"),
            Ok(Err(e)) => warn!(error = %e, "gRPC server task failed"),
            Err(_) => {
                warn!(
                    ?grace,
                    "in-flight requests did not finish within the grace period"
                );
                self.grpc.abort();
            }
        }
    }
}

/// Loads the limits, binds the gRPC address and starts serving in the background.
pub async fn start(settings: &Settings, clock: Arc<dyn Clock>) -> Result<ServerHandle, ServeError> {
    if settings.backend != Backend::Memory {
        return Err(ServeError::Backend(settings.backend));
    }
    if !settings.limits_dir.is_dir() {
        return Err(ServeError::NoLimitsDir(
            settings.limits_dir.display().to_string(),
        ));
    }
    let limits = load_dir(&settings.limits_dir)?;
    for domain in limits.domains.values() {
        info!(domain = %domain.name, file = %domain.file.display(), routes = domain.routes.len(), "limits loaded");
    }

    let memory = Arc::new(MemoryStore::new(settings.memory.max_entries));
    let limiter = Arc::new(RateLimiter::new(
        limits,
        memory.clone(),
        clock.clone(),
        settings.request.clone(),
    ));

    let sweep_every = settings.sweep_interval();
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(sweep_every);
        loop {
            tick.tick().await;
            memory.sweep(clock.now_ms());
        }
    });

    let listener = TcpListener::bind(&settings.grpc_addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: settings.grpc_addr.clone(),
            source,
        })?;
    let grpc_addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: settings.grpc_addr.clone(),
        source,
    })?;

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<RateLimitServiceServer<GrpcService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Transport(e.to_string()))?;
    let rls = RateLimitServiceServer::new(GrpcService::new(limiter.clone()))
        .max_decoding_message_size(settings.request.max_message_bytes);

    let (stop, stopped) = oneshot::channel::<()>();
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(reflection)
            .add_service(rls)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            }),
    );
    info!(%grpc_addr, "serving Envoy RLS v3");
    Ok(ServerHandle {
        grpc_addr,
        limiter,
        stop: Some(stop),
        grpc,
        sweeper,
    })
}

/// `sluice serve`: starts, then waits for SIGINT or SIGTERM and shuts down gracefully.
pub async fn run(settings: Settings) -> Result<(), ServeError> {
    let handle = start(&settings, Arc::new(SystemClock)).await?;
    shutdown_signal().await;
    info!("shutting down: finishing in-flight requests");
    handle.shutdown(settings.shutdown_grace()).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
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
