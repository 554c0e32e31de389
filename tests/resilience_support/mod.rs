//! Harness of the resilience tests: a real `redis-server` on a free loopback port that a test
//! can kill (SIGKILL), freeze (SIGSTOP), thaw (SIGCONT) and restart on the same port; the real
//! `sluice` binary as a child process; a tiny RESP client (for `INFO commandstats`) and a tiny
//! HTTP/1.1 client (for `/metrics`).
//!
//! Rules kept here: everything is on 127.0.0.1 and never on 6379; every process started is
//! killed and reaped when its owner is dropped, also when a test panics (a frozen Redis is
//! thawed first); every wait is bounded.
//!
//! When `redis-server` is missing, [`RedisServer::start`] returns `None` after printing a note
//! (the test skips), unless the environment variable `CI` is set: then it panics, because CI
//! must run these tests.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tempfile::TempDir;

// ----- ports -----

/// A loopback port nothing listens on right now (bound to port 0, read, released).
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind 127.0.0.1:0 to find a free port");
        if port != 6379 {
            return port;
        }
    }
}

// ----- redis-server -----

/// Whether `redis-server` can be run. Panics when it cannot and `CI` is set; otherwise prints
/// a note so the caller can skip.
pub fn redis_available() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    let found = *FOUND.get_or_init(|| {
        Command::new("redis-server")
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!(
                "redis-server is not on PATH and CI is set: the resilience tests must run in CI \
                 (Debian/Ubuntu: apt-get install redis-server)"
            );
        }
        eprintln!(
            "note: redis-server not found on PATH: skipping this resilience test \
             (install redis-server to run it)"
        );
    }
    found
}

/// One `redis-server` process on 127.0.0.1, killed (thawed first if frozen) on drop.
pub struct RedisServer {
    port: u16,
    dir: TempDir,
    child: Option<Child>,
    stopped: bool,
    /// The current process id (0 when none), for [`StallMonitor`].
    pid: PidCell,
}

impl RedisServer {
    /// Starts Redis on a free port and waits until it answers PING. `None` (after a note)
    /// when redis-server is not installed and `CI` is not set.
    pub fn start() -> Option<Self> {
        if !redis_available() {
            return None;
        }
        let mut last = String::new();
        // Another process may take the port between our probe and Redis's bind: retry.
        for _ in 0..5 {
            let mut server = Self {
                port: free_port(),
                dir: tempfile::tempdir().expect("temp dir for redis"),
                child: None,
                stopped: false,
                pid: pid_cell(None),
            };
            match server.spawn() {
                Ok(()) => return Some(server),
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start on a free port after 5 tries: {last}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The process id, kept current across restarts (for [`StallMonitor`]).
    pub fn pid_cell(&self) -> PidCell {
        self.pid.clone()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Spawns `redis-server` on `self.port` and waits (bounded) until it answers PING.
    fn spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "redis-server already running");
        assert_ne!(self.port, 6379, "never on 6379");
        let port = self.port.to_string();
        let log = self.log_path();
        let child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run redis-server: {e}"))?;
        self.pid.store(child.id(), Ordering::Relaxed);
        self.child = Some(child);
        self.stopped = false;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Reply::Simple(pong)) = self.try_command(&["PING"])
                && pong == "PONG"
            {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited ({status}):\n{}",
                    self.port,
                    self.log()
                ));
            }
            if Instant::now() >= deadline {
                self.kill9();
                return Err(format!(
                    "redis-server on port {} did not answer PING within 10 s:\n{}",
                    self.port,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal(&self, name: &str) {
        let pid = self.pid().expect("redis-server running").to_string();
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .stdin(Stdio::null())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {pid}: {status}");
    }

    /// SIGKILL, and reaps the process: Redis dies with its connections.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.stopped {
                // A stopped process dies of SIGKILL too, but thaw it for a clean exit.
                let _ = Command::new("kill")
                    .args(["-CONT", &child.id().to_string()])
                    .status();
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.pid.store(0, Ordering::Relaxed);
        self.stopped = false;
    }

    /// SIGSTOP: Redis keeps its connections but answers nothing.
    pub fn stop(&mut self) {
        self.signal("STOP");
        self.stopped = true;
    }

    /// SIGCONT: Redis answers again (queued commands first).
    pub fn cont(&mut self) {
        if self.stopped {
            self.signal("CONT");
            self.stopped = false;
        }
    }

    /// Starts Redis again on the same port (after [`RedisServer::kill9`]); empty, like a
    /// restarted cache without persistence. Returns once it answers PING.
    pub fn restart(&mut self) {
        self.kill9();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => {
                    panic!("redis-server did not restart on port {}: {e}", self.port)
                }
                // The old socket may linger for a moment; try again.
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn try_command(&self, args: &[&str]) -> std::io::Result<Reply> {
        Resp::connect(self.addr(), Duration::from_millis(500))?.command(args)
    }

    /// Runs one command on a fresh connection; panics on a transport error.
    pub fn command(&self, args: &[&str]) -> Reply {
        self.try_command(args)
            .unwrap_or_else(|e| panic!("redis {args:?} on port {}: {e}", self.port))
    }

    /// `CONFIG RESETSTAT`: command statistics start from zero.
    pub fn reset_stats(&self) {
        let reply = self.command(&["CONFIG", "RESETSTAT"]);
        assert_eq!(reply, Reply::Simple("OK".into()), "CONFIG RESETSTAT");
    }

    /// `INFO commandstats` as command name (lower case) -> calls.
    pub fn command_calls(&self) -> BTreeMap<String, u64> {
        let text = match self.command(&["INFO", "commandstats"]) {
            Reply::Bulk(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            other => panic!("INFO commandstats: unexpected reply {other:?}"),
        };
        parse_commandstats(&text)
    }

    /// Calls of EVALSHA since the last [`RedisServer::reset_stats`].
    pub fn evalsha_calls(&self) -> u64 {
        self.command_calls().get("evalsha").copied().unwrap_or(0)
    }
}

/// Parses `cmdstat_<name>:calls=<n>,...` lines.
pub fn parse_commandstats(text: &str) -> BTreeMap<String, u64> {
    let mut calls = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("cmdstat_") else {
            continue;
        };
        let Some((name, fields)) = rest.split_once(':') else {
            continue;
        };
        let n = fields
            .split(',')
            .find_map(|f| f.strip_prefix("calls="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        calls.insert(name.to_ascii_lowercase(), n);
    }
    calls
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ----- a minimal RESP client -----

/// A Redis reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

/// One connection speaking RESP2, with read and write timeouts.
pub struct Resp {
    reader: BufReader<TcpStream>,
}

impl Resp {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout.max(Duration::from_secs(2))))?;
        stream.set_write_timeout(Some(timeout.max(Duration::from_secs(2))))?;
        Ok(Self {
            reader: BufReader::new(stream),
        })
    }

    pub fn command(&mut self, args: &[&str]) -> std::io::Result<Reply> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        self.reader.get_mut().write_all(&out)?;
        self.read_reply(0)
    }

    fn read_line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "redis closed the connection",
            ));
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }

    fn read_reply(&mut self, depth: usize) -> std::io::Result<Reply> {
        let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        if depth > 8 {
            return Err(bad("reply nested too deep".into()));
        }
        let line = self.read_line()?;
        let (kind, rest) = line.split_at(line.len().min(1));
        let number = |s: &str| {
            s.parse::<i64>()
                .map_err(|_| bad(format!("bad length {s:?}")))
        };
        match kind {
            "+" => Ok(Reply::Simple(rest.to_string())),
            "-" => Ok(Reply::Error(rest.to_string())),
            ":" => Ok(Reply::Int(number(rest)?)),
            "$" => {
                let len = number(rest)?;
                if len < 0 {
                    return Ok(Reply::Bulk(None));
                }
                let mut buf = vec![0; len as usize + 2];
                self.reader.read_exact(&mut buf)?;
                buf.truncate(len as usize);
                Ok(Reply::Bulk(Some(buf)))
            }
            "*" => {
                let len = number(rest)?;
                if len < 0 {
                    return Ok(Reply::Array(None));
                }
                let items = (0..len)
                    .map(|_| self.read_reply(depth + 1))
                    .collect::<std::io::Result<Vec<_>>>()?;
                Ok(Reply::Array(Some(items)))
            }
            _ => Err(bad(format!("unexpected reply line {line:?}"))),
        }
    }
}

// ----- HTTP and metrics -----

/// `GET path` over HTTP/1.1 (connection closed after); returns the status and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send HTTP request");
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("read HTTP answer from {addr}{path}: {e}"));
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {head:?}"));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    for _ in 0..100_000 {
        let Some((size, rest)) = body.split_once("\r\n") else {
            break;
        };
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// The `/metrics` page of a server.
pub fn scrape(http_addr: SocketAddr) -> String {
    let (status, body) = http_get(http_addr, "/metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    body
}

/// The sum of every sample of `name` (any labels) in a Prometheus text page; `None` when the
/// metric has no sample.
pub fn metric(page: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in page.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = if rest.starts_with('{') {
            rest.rsplit_once('}').map(|(_, v)| v)
        } else if rest.starts_with(' ') {
            Some(rest)
        } else {
            None
        };
        if let Some(v) = value.and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

// ----- process memory -----

/// This process's peak resident set size (`VmHWM`), in KiB.
pub fn peak_rss_kib() -> Option<u64> {
    proc_status_kib("VmHWM:")
}

/// This process's current resident set size (`VmRSS`), in KiB.
pub fn rss_kib() -> Option<u64> {
    proc_status_kib("VmRSS:")
}

fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

// ----- the sluice binary -----

/// The real `sluice serve` as a child process with a clean environment plus `env`, on free
/// loopback ports; killed and reaped on drop. Its output goes to files (a full pipe could
/// block it), shown when it fails.
pub struct SluiceProcess {
    child: Option<Child>,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    logs: TempDir,
}

impl SluiceProcess {
    pub fn spawn(limits_dir: &Path, env: &[(&str, &str)]) -> Self {
        let logs = tempfile::tempdir().expect("temp dir for sluice logs");
        let grpc_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let http_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("SLUICE_") {
                cmd.env_remove(name);
            }
        }
        cmd.arg("serve")
            .env("SLUICE_GRPC_ADDR", grpc_addr.to_string())
            .env("SLUICE_HTTP_ADDR", http_addr.to_string())
            .env("SLUICE_LIMITS_DIR", limits_dir)
            .env("SLUICE_LOG", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = std::fs::File::create(logs.path().join("stdout")).expect("stdout file");
        let err = std::fs::File::create(logs.path().join("stderr")).expect("stderr file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start the sluice binary");
        let mut process = Self {
            child: Some(child),
            grpc_addr,
            http_addr,
            logs,
        };
        process.wait_until_accepting(Duration::from_secs(30));
        process
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What the process wrote so far (stdout, then stderr).
    pub fn output(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.logs.path().join(name));
        format!(
            "stdout:\n{}\nstderr:\n{}",
            read("stdout").unwrap_or_default(),
            read("stderr").unwrap_or_default()
        )
    }

    fn wait_until_accepting(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let grpc = TcpStream::connect_timeout(&self.grpc_addr, Duration::from_millis(200));
            let http = TcpStream::connect_timeout(&self.http_addr, Duration::from_millis(200));
            if grpc.is_ok() && http.is_ok() {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!(
                    "sluice exited before serving ({status}):\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "sluice did not accept on {} within {limit:?}:\n{}",
                self.grpc_addr,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for SluiceProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ----- machine stalls -----

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
        let before = self.samples.iter().rev().find(|(t, _)| *t <= from);
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
