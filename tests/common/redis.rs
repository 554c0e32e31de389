//! `redis-server` for the tests, and the small clients that talk to it.
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
//! The RESP client is hand-written on purpose: it sends exactly the bytes asked for (keys with
//! odd characters, no hidden `HELLO`, `CLIENT SETINFO` or `SELECT`), so tests that count the
//! commands Redis processed see only their own.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::stalls::{PidCell, pid_cell};
use super::{free_port, run_bounded, send_signal};

// ----- availability -----

/// Panics, saying how to install them, unless `redis-server` and `redis-cli` both run.
pub fn require_redis() {
    static FOUND: OnceLock<Result<(), String>> = OnceLock::new();
    let found = FOUND.get_or_init(|| {
        let missing: Vec<&str> = ["redis-server", "redis-cli"]
            .into_iter()
            .filter(|program| {
                !Command::new(program)
                    .arg("--version")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing.join(" and "))
        }
    });
    if let Err(missing) = found {
        panic!(
            "{missing} is not on PATH: run scripts/test.sh (installs it) or \
             `apt-get install redis-server redis-tools`"
        );
    }
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
                "\n(a redis-server built without TLS cannot serve --tls-port; Debian's \
                 redis-server package has TLS: run scripts/test.sh or \
                 `apt-get install redis-server redis-tools`)"
            }
            Probe::Ping => "",
        };
        panic!(
            "redis-server did not start:\n{}{hint}",
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
        let child = Command::new("redis-server")
            .args(&self.argv)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                output.try_clone().expect("redis-server output file"),
            ))
            .stderr(Stdio::from(output))
            .spawn()
            .map_err(|e| format!("cannot run redis-server: {e}"))?;
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
                    "redis-server on port {} exited at start ({status}):\n{}",
                    self.port,
                    self.log()
                ));
            }
            if Instant::now() >= deadline {
                self.kill9();
                return Err(format!(
                    "redis-server on port {} was not ready within {limit:?}:\n{}",
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

// ----- a minimal RESP client (exact bytes, no extra commands) -----

/// A Redis reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Array(Vec<Resp>),
}

impl Resp {
    /// The reply as text (bulk and simple strings; errors as `ERR ...`).
    pub fn text(&self) -> String {
        match self {
            Resp::Simple(s) | Resp::Error(s) => s.clone(),
            Resp::Bulk(b) => String::from_utf8_lossy(b).into_owned(),
            Resp::Int(i) => i.to_string(),
            Resp::Nil => String::new(),
            Resp::Array(items) => items.iter().map(Resp::text).collect::<Vec<_>>().join("\n"),
        }
    }

    /// The elements of an array of bulk strings, as bytes.
    pub fn bulk_list(&self) -> Vec<Vec<u8>> {
        match self {
            Resp::Array(items) => items
                .iter()
                .map(|item| match item {
                    Resp::Bulk(b) => b.clone(),
                    other => panic!("expected bulk strings, got {other:?}"),
                })
                .collect(),
            other => panic!("expected an array, got {other:?}"),
        }
    }

    pub fn int(&self) -> i64 {
        match self {
            Resp::Int(i) => *i,
            other => panic!("expected an integer, got {other:?}"),
        }
    }
}

/// One connection speaking RESP2.
pub struct RespConn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl RespConn {
    pub fn connect(port: u16) -> std::io::Result<Self> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Connects and authenticates (`AUTH user password`) when `auth` is given.
    pub fn connect_as(port: u16, auth: Option<(&str, &str)>) -> std::io::Result<Self> {
        let mut conn = Self::connect(port)?;
        if let Some((user, password)) = auth {
            match conn.call(&[b"AUTH", user.as_bytes(), password.as_bytes()])? {
                Resp::Simple(_) => {}
                other => {
                    return Err(std::io::Error::other(format!("AUTH refused: {other:?}")));
                }
            }
        }
        Ok(conn)
    }

    pub fn send(&mut self, args: &[&[u8]]) -> std::io::Result<()> {
        let mut frame = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            frame.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            frame.extend_from_slice(arg);
            frame.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&frame)
    }

    pub fn call(&mut self, args: &[&[u8]]) -> std::io::Result<Resp> {
        self.send(args)?;
        self.read()
    }

    fn line(&mut self) -> std::io::Result<String> {
        let mut line = Vec::new();
        self.reader.read_until(b'\n', &mut line)?;
        if !line.ends_with(b"\r\n") {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed mid-reply",
            ));
        }
        line.truncate(line.len() - 2);
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    pub fn read(&mut self) -> std::io::Result<Resp> {
        let line = self.line()?;
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
        let (kind, rest) = line
            .split_at_checked(1)
            .ok_or_else(|| bad("empty reply line"))?;
        let number = |s: &str| {
            s.parse::<i64>()
                .map_err(|_| bad(&format!("bad length {s:?}")))
        };
        Ok(match kind {
            "+" => Resp::Simple(rest.to_string()),
            "-" => Resp::Error(rest.to_string()),
            ":" => Resp::Int(number(rest)?),
            "$" => match usize::try_from(number(rest)?) {
                Err(_) => Resp::Nil,
                Ok(n) => {
                    let mut bytes = vec![0; n + 2];
                    self.reader.read_exact(&mut bytes)?;
                    bytes.truncate(n);
                    Resp::Bulk(bytes)
                }
            },
            "*" => match usize::try_from(number(rest)?) {
                Err(_) => Resp::Nil,
                Ok(n) => Resp::Array((0..n).map(|_| self.read()).collect::<Result<_, _>>()?),
            },
            other => return Err(bad(&format!("unknown reply type {other:?}"))),
        })
    }
}

/// One command on a fresh connection; panics if Redis cannot be reached.
pub fn resp(port: u16, args: &[&str]) -> Resp {
    resp_as(port, None, args)
}

/// [`resp`] as an ACL user.
pub fn resp_as(port: u16, auth: Option<(&str, &str)>, args: &[&str]) -> Resp {
    let bytes: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    RespConn::connect_as(port, auth)
        .and_then(|mut c| c.call(&bytes))
        .unwrap_or_else(|e| panic!("redis on port {port}: {args:?}: {e}"))
}

/// Every key matching `pattern`, as exact bytes (`KEYS`; test databases are small).
pub fn keys(port: u16, auth: Option<(&str, &str)>, db: u32, pattern: &str) -> Vec<Vec<u8>> {
    let mut conn = RespConn::connect_as(port, auth).expect("connect to redis");
    let db = db.to_string();
    let selected = conn.call(&[b"SELECT", db.as_bytes()]).expect("SELECT");
    assert_eq!(selected, Resp::Simple("OK".into()), "SELECT {db}");
    let mut found = conn
        .call(&[b"KEYS", pattern.as_bytes()])
        .expect("KEYS")
        .bulk_list();
    found.sort();
    found
}

/// One section of `INFO` as `field -> value`.
pub fn info(port: u16, section: &str) -> BTreeMap<String, String> {
    resp(port, &["INFO", section])
        .text()
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// `INFO commandstats` as `command -> calls` (`evalsha`, `config|resetstat`, ...).
pub fn command_calls(port: u16) -> BTreeMap<String, u64> {
    info(port, "commandstats")
        .into_iter()
        .filter_map(|(name, stats)| {
            let name = name.strip_prefix("cmdstat_")?.to_ascii_lowercase();
            let calls = stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name, calls))
        })
        .collect()
}

/// `total_commands_processed` of `INFO stats`.
pub fn total_commands(port: u16) -> u64 {
    info(port, "stats")
        .get("total_commands_processed")
        .and_then(|v| v.parse().ok())
        .expect("total_commands_processed in INFO stats")
}
