//! The real `sluice` binary as an operator runs it: `sluice serve` from the repository root
//! with no flags serves `config/limits` in memory, answers Envoy, and exits 0 on SIGTERM;
//! `sluice version` prints the version; broken limits stop `serve` with the file and route.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sluice::proto::descriptor::RateLimitDescriptor;
use sluice::proto::descriptor::rate_limit_descriptor::Entry;
use sluice::proto::rls::RateLimitRequest;
use sluice::proto::rls::rate_limit_response::Code;
use sluice::proto::rls::rate_limit_response::rate_limit::Unit;
use sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");
const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// A port nothing listens on right now (bound, read, released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `sluice` with a clean environment: no inherited `SLUICE_*` variable changes what it does.
fn sluice() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(REPO);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SLUICE_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// A child process that is killed (by its own pid) if the test ends before it does.
struct Running {
    child: Child,
}

impl Running {
    fn spawn(mut cmd: Command) -> Self {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sluice");
        Self { child }
    }

    /// Waits up to `limit` for the process to exit.
    fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn output(&mut self) -> (String, String) {
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut s) = self.child.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        if let Some(mut s) = self.child.stderr.take() {
            let _ = s.read_to_string(&mut err);
        }
        (out, err)
    }

    /// Polls until `addr` accepts connections (bounded); fails early if the process exits.
    fn wait_until_accepting(&mut self, addr: SocketAddr, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                let (out, err) = self.output();
                panic!("sluice exited before serving ({status}):\nstdout: {out}\nstderr: {err}");
            }
            assert!(
                Instant::now() < deadline,
                "sluice did not accept on {addr} within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_no_flags_answers_envoy_and_exits_cleanly_on_sigterm() {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut cmd = sluice();
    // No flags: everything else comes from the defaults. The HTTP port is moved off 8080 only
    // so the test cannot collide with anything else on the machine.
    cmd.arg("serve")
        .env("SLUICE_GRPC_ADDR", addr.to_string())
        .env("SLUICE_HTTP_ADDR", format!("127.0.0.1:{}", free_port()));
    let mut server = Running::spawn(cmd);
    server.wait_until_accepting(addr, Duration::from_secs(30));

    let mut client = RateLimitServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let response = client
        .should_rate_limit(RateLimitRequest {
            domain: "edge".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry {
                    key: "route".into(),
                    value: "api".into(),
                }],
                ..Default::default()
            }],
            hits_addend: 0,
        })
        .await
        .expect("ShouldRateLimit")
        .into_inner();
    assert_eq!(response.overall_code, Code::Ok as i32, "{response:?}");
    assert_eq!(response.statuses.len(), 1);
    let status = &response.statuses[0];
    assert_eq!(status.code, Code::Ok as i32);
    let limit = status.current_limit.as_ref().expect("current_limit");
    assert_eq!(limit.requests_per_unit, 1000, "{limit:?}");
    assert_eq!(limit.unit, Unit::Minute as i32, "{limit:?}");
    assert_eq!(limit.name, "api/global");
    assert_eq!(status.limit_remaining, 999);

    // SIGTERM, as Kubernetes and systemd send it; the client connection is still open.
    let pid = server.child.id().to_string();
    let kill = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(kill.success(), "kill -TERM {pid}: {kill}");
    let exit = tokio::task::block_in_place(|| server.wait_for_exit(Duration::from_secs(5)));
    let (out, err) = server.output();
    let exit = exit.unwrap_or_else(|| panic!("still running 5 s after SIGTERM\nstderr: {err}"));
    assert!(
        exit.success(),
        "exit after SIGTERM: {exit}\nstdout: {out}\nstderr: {err}"
    );
    drop(client);
}

#[test]
fn version_prints_the_crate_version() {
    let out = sluice()
        .arg("version")
        .output()
        .expect("run sluice version");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.trim(),
        format!("sluice {}", env!("CARGO_PKG_VERSION"))
    );

    let out = sluice()
        .arg("--version")
        .output()
        .expect("run sluice --version");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")),
        "{out:?}"
    );
}

#[test]
fn serve_with_broken_limits_exits_non_zero_naming_file_and_route() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.yaml");
    std::fs::write(
        &file,
        r#"domain: broken
routes:
  - name: fine
    global_threshold: { query_per_minute: 10 }
  - name: both-kinds
    global_threshold: { query_per_minute: 10 }
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - { key: "*", query_per_second: 1 }
"#,
    )
    .unwrap();
    let port = free_port();
    let mut cmd = sluice();
    cmd.arg("serve")
        .env("SLUICE_LIMITS_DIR", dir.path())
        .env("SLUICE_GRPC_ADDR", format!("127.0.0.1:{port}"));
    let mut server = Running::spawn(cmd);
    let exit = server.wait_for_exit(Duration::from_secs(20));
    let (out, err) = server.output();
    let exit =
        exit.unwrap_or_else(|| panic!("sluice kept running with broken limits\nstderr: {err}"));
    assert!(
        !exit.success(),
        "exit {exit} with broken limits\nstderr: {err}"
    );
    let text = format!("{out}{err}");
    assert!(
        text.contains("broken.yaml"),
        "the file is not named:\n{text}"
    );
    assert!(
        text.contains("both-kinds"),
        "the route is not named:\n{text}"
    );
    assert!(
        text.contains("global_threshold") && text.contains("rule_items"),
        "the problem is not named:\n{text}"
    );
}
