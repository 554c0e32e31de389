//! The limits being served, as a cheap-clone handle ([`Limits`]), and hot reload of the limits
//! directory: a new set is read and validated whole, then swapped in atomically; a set that
//! fails keeps the old one in service.
//!
//! Three triggers, because each misses cases the others catch: file events (inotify through
//! `notify`, debounced, on the directory itself so editors that write by rename and
//! Kubernetes' `..data` symlink swap are both seen), SIGHUP, and a periodic poll of the
//! content hash as a safety net. The hash also makes every trigger idempotent: a set whose
//! files did not change is not swapped.
//!
//! Counters survive a reload by construction: counter ids come from domain, route and rule
//! identity, never from positions, so unchanged rules find their counts where they were.
//! Requests in flight finish on the set they started with (they hold its `Arc`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use arc_swap::ArcSwap;

use super::{ConfigErrors, load_dir};
use crate::clock::Clock;
use crate::limits::LimitSet;
use crate::metrics::Metrics;

/// The limits in service. Cloning the handle is an `Arc` clone; every clone sees every swap.
/// Readers take a snapshot (`Arc<LimitSet>`) per request and keep it to the end, so a swap
/// never waits for requests in flight, which finish on the set they started with.
#[derive(Clone, Default)]
pub struct Limits(Arc<ArcSwap<LimitSet>>);

impl Limits {
    pub fn new(set: LimitSet) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(set)))
    }

    /// The set in service now.
    pub fn load(&self) -> Arc<LimitSet> {
        self.0.load_full()
    }

    /// Swaps in a new, already validated, set.
    pub fn replace(&self, set: LimitSet) {
        self.0.store(Arc::new(set));
    }
}

/// What one reload attempt did.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// Files unchanged (same content hash): nothing swapped.
    Unchanged,
    /// A new set is in service.
    Reloaded { domains: usize, hash: String },
    /// The new set is invalid; the old one stays in service.
    Failed(ConfigErrors),
}

#[derive(Clone)]
pub struct Reloader {
    dir: PathBuf,
    limits: Limits,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
}

/// How long file events are gathered before one reload (editors write several events).
const DEBOUNCE: Duration = Duration::from_millis(200);

impl Reloader {
    pub fn new(dir: &Path, limits: Limits, metrics: Arc<Metrics>, clock: Arc<dyn Clock>) -> Self {
        Self {
            dir: dir.to_path_buf(),
            limits,
            metrics,
            clock,
        }
    }

    /// Reads the directory and swaps the set in if it is valid and different.
    pub fn reload(&self) -> ReloadOutcome {
        let metrics = &self.metrics;
        let now = self.clock.now_ms();
        match load_dir(&self.dir) {
            Ok(mut set) => {
                let current = self.limits.load();
                if set.content_hash == current.content_hash {
                    return ReloadOutcome::Unchanged;
                }
                // Every file gone or emptied is far more often a half-applied deployment
                // (a ConfigMap being rewritten, a volume not mounted yet) than a wish to
                // stop limiting: keep what is served and say so loudly. An operator who
                // means it restarts with the empty directory.
                if set.domains.is_empty() && !current.domains.is_empty() {
                    let errors = ConfigErrors(vec![super::ConfigError {
                        file: self.dir.clone(),
                        line: None,
                        route: None,
                        field: String::new(),
                        message: format!(
                            "the directory holds no limits now (it served {} domain(s)); \
                             refusing to drop every limit: put the files back, or restart \
                             sluice to serve an empty directory on purpose",
                            current.domains.len()
                        ),
                    }]);
                    return self.failed(now, errors);
                }
                set.loaded_at_ms = now;
                let domains = set.domains.len();
                let hash = set.content_hash.clone();
                self.limits.replace(set);
                metrics.config_loaded(true, now as f64 / 1000.0);
                info!(dir = %self.dir.display(), domains, hash = %hash, "limits reloaded");
                ReloadOutcome::Reloaded { domains, hash }
            }
            Err(errors) => self.failed(now, errors),
        }
    }

    fn failed(&self, now: u64, errors: ConfigErrors) -> ReloadOutcome {
        self.metrics.config_loaded(false, now as f64 / 1000.0);
        for e in &errors.0 {
            error!(
                file = %e.file.display(),
                line = e.line.unwrap_or(0),
                error = %e,
                "limits reload failed; the previous limits stay in service"
            );
        }
        ReloadOutcome::Failed(errors)
    }

    /// Watches for changes until `stop` turns true.
    pub fn spawn(self, poll_every: Duration, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(async move {
            let (tx, mut events) = mpsc::channel::<()>(16);
            // The watcher lives as long as this task; its callback runs on notify's thread.
            let _watcher = match watch_dir(&self.dir, tx) {
                Ok(w) => Some(w),
                Err(e) => {
                    warn!(dir = %self.dir.display(), error = %e, "cannot watch the limits directory; relying on SIGHUP and polling");
                    None
                }
            };
            let mut hangup = hangup_signal();
            let mut poll = tokio::time::interval(poll_every);
            poll.tick().await;
            loop {
                tokio::select! {
                    // The guard `wait_for` returns is dropped inside, so the task stays Send.
                    _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => return,
                    Some(()) = events.recv() => {
                        // Gather the burst of events an editor or a ConfigMap update makes.
                        tokio::time::sleep(DEBOUNCE).await;
                        while events.try_recv().is_ok() {}
                    }
                    Some(()) = recv_hangup(&mut hangup) => info!("SIGHUP: reloading limits"),
                    _ = poll.tick() => {}
                }
                let this = self.clone();
                // Reading and parsing files is blocking work: keep it off the async workers.
                let _ = tokio::task::spawn_blocking(move || this.reload()).await;
            }
        })
    }
}

fn watch_dir(dir: &Path, tx: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            // Full channel: a reload is already pending, which is all that matters.
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

#[cfg(unix)]
fn hangup_signal() -> Hangup {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

#[cfg(not(unix))]
fn hangup_signal() -> Hangup {
    None
}

#[cfg(unix)]
async fn recv_hangup(hangup: &mut Hangup) -> Option<()> {
    match hangup {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn recv_hangup(_: &mut Hangup) -> Option<()> {
    std::future::pending().await
}
