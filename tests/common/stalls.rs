//! Machine stalls: how long the processes on a request's path (the test itself, sluice,
//! Redis) were ready to run but not run, read from `/proc/<pid>/task/*/schedstat`.
//!
//! Why this exists: the outage tests judge latency in real time on a shared two-core machine,
//! where a request can be slow only because nothing ran (another build, another test). A
//! latency check subtracts what [`Stalls::explained`] attributes to the machine; a delay of
//! sluice's own making (work, a lock, a timer, TCP waiting for an ACK) is no run-queue wait,
//! so it is never excused.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A process id that may change (Redis restarted) or vanish (0), for [`StallMonitor`].
pub type PidCell = Arc<AtomicU32>;

pub fn pid_cell(pid: Option<u32>) -> PidCell {
    Arc::new(AtomicU32::new(pid.unwrap_or(0)))
}

/// What a [`StallMonitor`] saw: for each watched process, how long each of its threads had
/// waited on a run queue (ready to run, but the machine ran something else), sampled over time
/// from `/proc/<pid>/task/*/schedstat`.
#[derive(Debug, Default)]
pub struct Stalls {
    samples: Vec<WaitSample>,
}

/// Each thread of one process with its total run-queue wait so far, in ns.
type ThreadWaits = Vec<(u32, u64)>;

/// When (offset from the origin) and, per watched process, its [`ThreadWaits`].
type WaitSample = (Duration, Vec<ThreadWaits>);

fn most_waited(earlier: &[(u32, u64)], later: &[(u32, u64)]) -> u64 {
    later
        .iter()
        .map(|(tid, wait)| {
            let before = earlier
                .iter()
                .find(|(t, _)| t == tid)
                .map_or(0, |(_, w)| *w);
            wait.saturating_sub(before)
        })
        .max()
        .unwrap_or(0)
}

impl Stalls {
    /// How much of `[from, to)` the machine explains rather than the watched processes' own
    /// work: for each process, the longest run-queue wait one of its threads had in that span,
    /// summed over the processes (a request crosses all of them), at most the span. Sampled,
    /// so the span is widened to the samples around it.
    pub fn explained(&self, from: Duration, to: Duration) -> Duration {
        // A span that starts before the first sample (the run's first second, looked at with
        // `RECENTLY` before it) is judged from the first sample on, not as unexplained.
        let before = self
            .samples
            .iter()
            .rev()
            .find(|(t, _)| *t <= from)
            .or(self.samples.first());
        let after = self.samples.iter().find(|(t, _)| *t >= to);
        let (Some((_, a)), Some((_, b))) = (before, after) else {
            return Duration::ZERO;
        };
        let waited: u64 = a.iter().zip(b).map(|(a, b)| most_waited(a, b)).sum();
        Duration::from_nanos(waited).min(to.saturating_sub(from))
    }

    /// For each watched process, the most run-queue wait one of its threads had over the run.
    pub fn total_waits(&self) -> Vec<Duration> {
        let (Some((_, first)), Some((_, last))) = (self.samples.first(), self.samples.last())
        else {
            return Vec::new();
        };
        first
            .iter()
            .zip(last)
            .map(|(a, b)| Duration::from_nanos(most_waited(a, b)))
            .collect()
    }
}

/// Each thread of `pid` with its total run-queue wait (ns); empty when /proc cannot say.
fn run_queue_waits(pid: u32) -> ThreadWaits {
    if pid == 0 {
        return Vec::new();
    }
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|task| {
            let task = task.ok()?;
            let tid: u32 = task.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            let wait = stat.split_whitespace().nth(1)?.parse().ok()?;
            Some((tid, wait))
        })
        .collect()
}

/// Watches, while a real-time test runs, how long the processes on a request's path (this
/// test process, sluice, Redis) were ready to run but not run. On a shared machine (other
/// builds, other tests) a request can be slow because nothing ran, which says nothing about
/// sluice; a latency check can subtract what [`Stalls::explained`] attributes to the machine.
/// A delay of sluice's own making (work, a lock, a timer, TCP waiting for an ACK) is no
/// run-queue wait, so it is never excused.
pub struct StallMonitor {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Stalls>>,
}

impl StallMonitor {
    /// How often the processes are sampled.
    const EVERY: Duration = Duration::from_millis(2);
    /// The monitor stops by itself after this long.
    const MAX_RUN: Duration = Duration::from_secs(180);

    /// Starts watching this process and the `others` (index 0 of each sample is this process,
    /// then `others` in order).
    pub fn start(origin: Instant, others: Vec<PidCell>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Stalls::default();
            let began = Instant::now();
            while !flag.load(Ordering::Relaxed) && began.elapsed() < Self::MAX_RUN {
                let mut waits = vec![run_queue_waits(std::process::id())];
                waits.extend(
                    others
                        .iter()
                        .map(|p| run_queue_waits(p.load(Ordering::Relaxed))),
                );
                seen.samples
                    .push((Instant::now().saturating_duration_since(origin), waits));
                std::thread::sleep(Self::EVERY);
            }
            seen
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the monitor and returns what it saw.
    pub fn finish(mut self) -> Stalls {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for StallMonitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
