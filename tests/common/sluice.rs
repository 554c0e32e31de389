//! sluice itself, run two ways.
//!
//! In process ([`Sluice`]): `sluice::server::start` on loopback port 0 with a
//! [`ManualClock`], limits written into a temporary directory and a connected gRPC client.
//! Time never passes by itself: tests move the clock across window boundaries instead of
//! sleeping, which keeps them exact and fast. [`LiveSluice`] is the same server on the system
//! clock, for tests whose other side (Envoy) lives in real time.
//!
//! As a process ([`SluiceProcess`], [`sluice_command`]): the real binary, as an operator runs
//! it, for what only a process shows (signals, exit codes, several replicas sharing a Redis,
//! outages under load). Its environment is cleaned of every inherited `SLUICE_*` variable so
//! the developer's shell cannot change what a test runs, its output goes to files (a full
//! pipe could block it) and it is killed and reaped on drop.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::clock::SystemClock;
use sluice::config::Settings;
use sluice::server::{ServerHandle, start};
use tempfile::TempDir;
use tonic::transport::Channel;

use super::rls::*;
use super::{free_port, repo, send_signal};

/// A running server, its clock, its limits directory and a connected client.
pub struct Sluice {
    handle: Option<ServerHandle>,
    pub clock: Arc<ManualClock>,
    pub dir: TempDir,
    pub channel: Channel,
    pub client: RateLimitServiceClient<Channel>,
}

impl Sluice {
    /// Serves the given limits files (`(file name, YAML)`) with default settings.
    pub async fn start(files: &[(&str, &str)]) -> Self {
        Self::start_with(files, |_| {}).await
    }

    /// Serves the given limits files; `configure` may change the settings (bounds, ...).
    pub async fn start_with(files: &[(&str, &str)], configure: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write limits file");
        }
        Self::serve(dir, configure).await
    }

    /// Serves a copy of the example limits of `config/limits`, unchanged.
    pub async fn start_examples() -> Self {
        Self::start_examples_with(|_| {}).await
    }

    /// Serves a copy of the example limits plus the given files.
    pub async fn start_examples_and(files: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        copy_example_limits(dir.path());
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write limits file");
        }
        Self::serve(dir, |_| {}).await
    }

    pub async fn start_examples_with(configure: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        copy_example_limits(dir.path());
        Self::serve(dir, configure).await
    }

    async fn serve(dir: TempDir, configure: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = Settings {
            grpc_addr: "127.0.0.1:0".into(),
            http_addr: "127.0.0.1:0".into(),
            limits_dir: dir.path().to_path_buf(),
            ..Settings::default()
        };
        configure(&mut settings);
        let clock = Arc::new(ManualClock::new(START_MS));
        let handle = start(&settings, clock.clone())
            .await
            .unwrap_or_else(|e| panic!("server did not start: {e}"));
        let channel = Channel::from_shared(format!("http://{}", handle.grpc_addr))
            .expect("uri")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to the server");
        let client = RateLimitServiceClient::new(channel.clone());
        Self {
            handle: Some(handle),
            clock,
            dir,
            channel,
            client,
        }
    }

    /// Stops the server (in-flight requests get a second to finish).
    pub async fn stop(mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown(Duration::from_secs(1)).await;
        }
    }

    pub fn handle(&self) -> &ServerHandle {
        self.handle.as_ref().expect("server running")
    }

    // ----- time -----

    pub fn now(&self) -> u64 {
        use sluice::clock::Clock;
        self.clock.now_ms()
    }

    pub fn advance(&self, ms: u64) {
        self.clock.advance(ms);
    }

    /// Milliseconds from now to the end of the current window of `period` ms.
    pub fn until_reset(&self, period: u64) -> u64 {
        period - self.now() % period
    }

    /// Moves the clock to the first millisecond of the next window of `period` ms.
    pub fn to_next_window(&self, period: u64) {
        self.advance(self.until_reset(period));
    }

    // ----- requests -----

    /// Sends a request and returns the gRPC outcome as is.
    pub async fn send(
        &mut self,
        request: RateLimitRequest,
    ) -> Result<RateLimitResponse, tonic::Status> {
        self.client
            .should_rate_limit(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// Sends a request that must be answered (not refused).
    pub async fn call(&mut self, request: RateLimitRequest) -> RateLimitResponse {
        let shown = format!("{request:?}");
        let descriptors = request.descriptors.len();
        let response = self
            .send(request)
            .await
            .unwrap_or_else(|s| panic!("request refused: {s:?}\nrequest: {shown}"));
        assert_eq!(
            response.statuses.len(),
            descriptors,
            "one status per descriptor"
        );
        response
    }

    /// One request of `domain` with one descriptor per entry list.
    pub async fn ask(
        &mut self,
        domain: &str,
        descriptors: &[&[(&str, &str)]],
    ) -> RateLimitResponse {
        self.call(request(
            domain,
            descriptors.iter().map(|d| desc(d)).collect(),
        ))
        .await
    }

    /// One request with one descriptor; returns the response, whose overall code must agree
    /// with the only status.
    pub async fn ask_one(
        &mut self,
        domain: &str,
        descriptor: RateLimitDescriptor,
    ) -> RateLimitResponse {
        let response = self.call(request(domain, vec![descriptor])).await;
        assert_eq!(response.statuses.len(), 1);
        response
    }

    /// The status of a one-descriptor request.
    pub async fn status(&mut self, domain: &str, pairs: &[(&str, &str)]) -> DescriptorStatus {
        self.ask_one(domain, desc(pairs)).await.statuses[0].clone()
    }

    /// Drives one fresh counter through a whole window and into the next, asserting every
    /// answer in full: `limit` OK answers with `limit_remaining` counting down to 0 and
    /// `duration_until_reset` equal to the window end minus now, then OVER_LIMIT (also at the
    /// window's last millisecond), then OK again with a full quota once the clock crosses the
    /// boundary. Leaves one hit counted in the new window.
    pub async fn assert_full_window(
        &mut self,
        domain: &str,
        descriptor: RateLimitDescriptor,
        expected: RateLimit,
    ) {
        let n = expected.requests_per_unit;
        let period = period_of(Unit::try_from(expected.unit).expect("unit"))
            * u64::from(expected.unit_multiplier.unwrap_or(1));
        const STEP: u64 = 3;
        if self.until_reset(period) <= STEP * (u64::from(n) + 2) {
            self.to_next_window(period);
        }
        for i in 0..n {
            let response = self.ask_one(domain, descriptor.clone()).await;
            assert_eq!(
                response.statuses[0],
                status(Code::Ok, &expected, n - 1 - i, self.until_reset(period)),
                "request {} of {n} ({descriptor:?})",
                i + 1
            );
            assert_eq!(response.overall_code, Code::Ok as i32);
            self.advance(STEP);
        }
        let response = self.ask_one(domain, descriptor.clone()).await;
        assert_eq!(
            response.statuses[0],
            status(Code::OverLimit, &expected, 0, self.until_reset(period)),
            "request {} of {n} is over ({descriptor:?})",
            n + 1
        );
        assert_eq!(response.overall_code, Code::OverLimit as i32);

        // Last millisecond of the window: still over, 1 ms to go.
        self.advance(self.until_reset(period) - 1);
        let response = self.ask_one(domain, descriptor.clone()).await;
        assert_eq!(
            response.statuses[0],
            status(Code::OverLimit, &expected, 0, 1),
            "at the window's last millisecond ({descriptor:?})"
        );

        // The next window starts afresh.
        self.advance(1);
        let response = self.ask_one(domain, descriptor.clone()).await;
        assert_eq!(
            response.statuses[0],
            status(Code::Ok, &expected, n - 1, period),
            "first request of the next window ({descriptor:?})"
        );
        assert_eq!(response.overall_code, Code::Ok as i32);
    }
}

/// Copies `config/limits/*.yaml` into `dir`.
pub fn copy_example_limits(dir: &Path) {
    let examples = repo().join("config/limits");
    let mut copied = 0;
    for entry in std::fs::read_dir(&examples).expect("config/limits") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            std::fs::copy(&path, dir.join(path.file_name().expect("name"))).expect("copy");
            copied += 1;
        }
    }
    assert!(copied > 0, "no example limits in {}", examples.display());
}

/// sluice in process on 127.0.0.1:0 with the system clock (no client of its own), serving
/// `limits` (file name, YAML): for tests whose traffic comes from a real-time peer (Envoy).
pub struct LiveSluice {
    handle: Option<ServerHandle>,
    _dir: TempDir,
}

impl LiveSluice {
    pub async fn start(limits: &[(&str, &str)]) -> Self {
        Self::start_with(limits, |_| {}).await
    }

    /// The same, `configure` changing the settings (a Redis backend, say).
    pub async fn start_with(
        limits: &[(&str, &str)],
        configure: impl FnOnce(&mut Settings),
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, text) in limits {
            std::fs::write(dir.path().join(name), text).expect("write limits");
        }
        let mut settings = Settings {
            grpc_addr: "127.0.0.1:0".into(),
            http_addr: "127.0.0.1:0".into(),
            limits_dir: dir.path().to_path_buf(),
            ..Settings::default()
        };
        configure(&mut settings);
        let handle = start(&settings, Arc::new(SystemClock))
            .await
            .unwrap_or_else(|e| panic!("sluice did not start: {e}"));
        Self {
            handle: Some(handle),
            _dir: dir,
        }
    }

    pub fn grpc_port(&self) -> u16 {
        self.handle.as_ref().expect("running").grpc_addr.port()
    }

    /// Its HTTP address (`/metrics`, `/config`).
    pub fn http_addr(&self) -> std::net::SocketAddr {
        self.handle.as_ref().expect("running").http_addr
    }

    /// Stops sluice: its port refuses connections afterwards.
    pub async fn stop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown(Duration::from_secs(1)).await;
        }
    }
}

// ----- the binary -----

/// Starts `cmd` with `env` added, its stdin closed and its output in `logs` (`stdout`,
/// `stderr`), where [`SluiceProcess::output`] reads it.
fn spawn_logged(mut cmd: Command, env: &[(&str, &str)], logs: &Path, what: &str) -> Child {
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = std::fs::File::create(logs.join("stdout")).expect("stdout file");
    let err = std::fs::File::create(logs.join("stderr")).expect("stderr file");
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"))
}

/// `sluice` (the binary under test) run from the repository root with a clean environment:
/// no inherited `SLUICE_*` variable changes what it does.
pub fn sluice_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.current_dir(repo());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SLUICE_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// The real `sluice` binary as a child process ([`sluice_command`]) with `SLUICE_GRPC_ADDR`
/// and `SLUICE_HTTP_ADDR` on free loopback ports; killed and reaped on drop. Its output goes
/// to files, shown by [`SluiceProcess::output`] when it fails.
pub struct SluiceProcess {
    child: Option<Child>,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    logs: TempDir,
}

impl SluiceProcess {
    /// `sluice serve` with the limits in `limits_dir`, logging at `warn`, plus `env`; returns
    /// once both its ports accept connections (at most 30 s).
    pub fn spawn(limits_dir: &Path, env: &[(&str, &str)]) -> Self {
        let limits_dir = limits_dir.display().to_string();
        let mut all = vec![
            ("SLUICE_LIMITS_DIR", limits_dir.as_str()),
            ("SLUICE_LOG", "warn"),
        ];
        all.extend_from_slice(env);
        let mut process = Self::launch(&["serve"], &all);
        process.wait_until_accepting(Duration::from_secs(30));
        process
    }

    /// `sluice <args>` with the two addresses set and `env` added, without waiting for
    /// anything.
    pub fn launch(args: &[&str], env: &[(&str, &str)]) -> Self {
        let logs = tempfile::tempdir().expect("temp dir for sluice logs");
        let grpc_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let http_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut cmd = sluice_command();
        cmd.args(args)
            .env("SLUICE_GRPC_ADDR", grpc_addr.to_string())
            .env("SLUICE_HTTP_ADDR", http_addr.to_string());
        let child = spawn_logged(cmd, env, logs.path(), "the sluice binary");
        Self {
            child: Some(child),
            grpc_addr,
            http_addr,
            logs,
        }
    }

    /// The binary as envoyproxy/ratelimit's image runs it: through a link named `ratelimit`,
    /// with no arguments, and only `env` (their variables) in its environment, so neither a
    /// `SLUICE_*` nor a `PORT` of the developer's shell changes what it does. Listens on
    /// `grpc_port` and `http_port` (which `env` names as `GRPC_PORT` and `PORT`) on
    /// 127.0.0.1's behalf; returns once both accept (at most 30 s).
    pub fn spawn_as_ratelimit(env: &[(&str, &str)], grpc_port: u16, http_port: u16) -> Self {
        let mut process = Self::launch_clean(None, &[], env, grpc_port, http_port);
        process.wait_until_accepting(Duration::from_secs(30));
        process
    }

    /// `sluice <args>` with only `env` in its environment (no addresses added: `env` sets
    /// them, to `grpc_port` and `http_port`), without waiting for anything.
    pub fn launch_bare(
        args: &[&str],
        env: &[(&str, &str)],
        grpc_port: u16,
        http_port: u16,
    ) -> Self {
        Self::launch_clean(Some("sluice"), args, env, grpc_port, http_port)
    }

    /// The binary under `name` (`None`: as `ratelimit`, through a link) with a cleared
    /// environment plus `env`.
    fn launch_clean(
        name: Option<&str>,
        args: &[&str],
        env: &[(&str, &str)],
        grpc_port: u16,
        http_port: u16,
    ) -> Self {
        let logs = tempfile::tempdir().expect("temp dir for sluice logs");
        let program = match name {
            Some(_) => std::path::PathBuf::from(env!("CARGO_BIN_EXE_sluice")),
            None => {
                let link = logs.path().join("ratelimit");
                std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_sluice"), &link)
                    .expect("link ratelimit -> sluice");
                link
            }
        };
        let mut cmd = Command::new(&program);
        cmd.args(args).current_dir(logs.path()).env_clear();
        let child = spawn_logged(cmd, env, logs.path(), &program.display().to_string());
        Self {
            child: Some(child),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], grpc_port)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], http_port)),
            logs,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A gRPC client on a connection of its own (as one Envoy would have).
    pub async fn client(&self) -> RateLimitServiceClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.grpc_addr))
            .expect("uri")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to sluice: {e}\n{}", self.output()));
        RateLimitServiceClient::new(channel)
    }

    /// Sends `signal` (`TERM`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        send_signal(self.pid().expect("sluice running"), signal);
    }

    /// What the process wrote to standard output so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.logs.path().join("stdout")).unwrap_or_default()
    }

    /// What the process wrote to standard error so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.logs.path().join("stderr")).unwrap_or_default()
    }

    /// What the process wrote so far (stdout, then stderr).
    pub fn output(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout(), self.stderr())
    }

    /// Polls until both ports accept connections, for at most `limit`; fails early, with the
    /// output, if the process exits.
    pub fn wait_until_accepting(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let grpc = TcpStream::connect_timeout(&self.grpc_addr, Duration::from_millis(200));
            let http = TcpStream::connect_timeout(&self.http_addr, Duration::from_millis(200));
            if grpc.is_ok() && http.is_ok() {
                return;
            }
            if let Some(status) = self.try_wait() {
                panic!(
                    "sluice exited before serving ({status}):\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "sluice did not accept on {} and {} within {limit:?}:\n{}",
                self.grpc_addr,
                self.http_addr,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("poll the sluice process"))
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
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
