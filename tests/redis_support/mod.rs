//! Redis for the tests: real `redis-server` processes (one node, a cluster, a sentinel
//! setup) on free loopback ports, the scenario table that holds the Redis store to the memory
//! store step by step, a TCP proxy that proves one round trip per request, and tiny clients
//! (RESP, `redis-cli`, HTTP/1.1).
//!
//! Rules kept here: nothing ever listens on or connects to 6379; every process started is
//! killed (SIGKILL) and reaped when its owner is dropped, also when a test panics; every wait
//! is bounded; everything is on 127.0.0.1.
//!
//! When `redis-server` is not installed, [`redis_available`] says so: tests print a note and
//! return (skip), unless the environment variable `CI` is set, where they fail loudly.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sluice::config::settings::RedisSettings;
use sluice::limiter::memory::MemoryStore;
use sluice::limiter::redis::RedisStore;
use sluice::limiter::{Algorithm, CounterOp, HitMode, Outcome, Store, Threshold, Unit};
use tempfile::TempDir;

// ----- availability, ports, bounded commands -----

/// Whether `redis-server` and `redis-cli` can be run. When they cannot: panics if `CI` is set
/// (CI must run these tests), else prints a note so the caller can return early.
pub fn redis_available() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    let found = *FOUND.get_or_init(|| {
        ["redis-server", "redis-cli"].iter().all(|program| {
            Command::new(program)
                .arg("--version")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    });
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!(
                "redis-server or redis-cli is not on PATH, and CI is set: the Redis tests must \
                 run in CI (Debian/Ubuntu: apt-get install redis-server)"
            );
        }
        eprintln!(
            "note: redis-server/redis-cli not found on PATH: skipping this Redis test \
             (install redis-server to run it)"
        );
    }
    found
}

/// A loopback port nothing listens on right now (bound, read, released). Never 6379.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        if port != 6379 {
            return port;
        }
    }
}

/// Runs a command to completion within `limit`, killing it (and failing) past that.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{shown} did not finish within {limit:?}");
            }
        }
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// `redis-cli -h 127.0.0.1 -p <port> <args>`: its standard output (raw format, as when
/// piped). For exact bytes (keys with odd characters) use [`resp`] instead.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    redis_cli_as(port, None, args)
}

/// [`redis_cli`] as an ACL user.
pub fn redis_cli_as(port: u16, auth: Option<(&str, &str)>, args: &[&str]) -> String {
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
            let name = name.strip_prefix("cmdstat_")?.to_string();
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

/// Polls `check` every 50 ms until it returns `Some`, for at most `limit`.
pub fn wait_until<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("gave up after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ----- processes -----

/// One `redis-server` process (a data node or a sentinel), killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Child,
    dir: TempDir,
    auth: Option<(String, String)>,
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

    /// Any `redis-server` command line: `args(port, dir)` builds it (the dir is the process's
    /// own temp dir). A fresh port (and dir) is tried again if the process dies at start (a
    /// port taken between [`free_port`] and the bind).
    pub fn launch(
        fixed_port: Option<u16>,
        auth: Option<(String, String)>,
        args: impl Fn(u16, &Path) -> Vec<String>,
    ) -> Self {
        let attempts = if fixed_port.is_some() { 1 } else { 5 };
        let mut failures = Vec::new();
        for _ in 0..attempts {
            let port = fixed_port.unwrap_or_else(free_port);
            let dir = tempfile::tempdir().expect("temp dir");
            let argv = args(port, dir.path());
            let stderr = File::create(dir.path().join("stderr.txt")).expect("stderr file");
            let child = Command::new("redis-server")
                .args(&argv)
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::from(stderr.try_clone().expect("stderr file")))
                .stderr(Stdio::from(stderr))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run redis-server: {e}"));
            let mut server = RedisServer {
                port,
                child,
                dir,
                auth: auth.clone(),
            };
            match server.wait_ready(Duration::from_secs(10)) {
                Ok(()) => return server,
                Err(e) => failures.push(format!("port {port}: {e}\n{}", server.log())),
            }
        }
        panic!("redis-server did not start:\n{}", failures.join("\n---\n"));
    }

    /// Polls until the server answers PING (PONG, or NOAUTH when the default user is off).
    fn wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("redis-server exited at start ({status})"));
            }
            let answer = RespConn::connect(self.port).and_then(|mut c| c.call(&[b"PING"]));
            match answer {
                Ok(Resp::Simple(s)) if s == "PONG" => return Ok(()),
                Ok(Resp::Error(e)) if e.starts_with("NOAUTH") => return Ok(()),
                _ if Instant::now() >= deadline => {
                    return Err(format!("no PONG within {limit:?}"));
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL and reap; the temp dir goes with `self.dir`.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The common arguments of a data node: loopback only, no persistence, files in `dir`.
fn node_args(port: u16, dir: &Path) -> Vec<String> {
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

/// A Redis Cluster of masters only (no replicas), slots spread by `redis-cli --cluster
/// create`. All nodes are killed on drop.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(masters: usize) -> Self {
        let nodes: Vec<RedisServer> = (0..masters)
            .map(|_| {
                RedisServer::launch(None, None, |port, dir| {
                    let mut args = node_args(port, dir);
                    args.extend([
                        "--cluster-enabled".into(),
                        "yes".into(),
                        "--cluster-config-file".into(),
                        dir.join("nodes.conf").display().to_string(),
                        // The bus port is chosen too (the default, port + 10000, may be taken).
                        "--cluster-port".into(),
                        free_port().to_string(),
                        "--cluster-node-timeout".into(),
                        "5000".into(),
                    ]);
                    args
                })
            })
            .collect();
        let cluster = Self { nodes };
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        create.args(["--cluster-replicas", "0", "--cluster-yes"]);
        let output = run_bounded(&mut create, Duration::from_secs(60));
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && text.contains("All 16384 slots covered"),
            "redis-cli --cluster create failed:\n{text}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        for node in &cluster.nodes {
            wait_until(
                &format!("cluster_state:ok on node {}", node.port),
                Duration::from_secs(30),
                || {
                    let info = resp(node.port, &["CLUSTER", "INFO"]).text();
                    let ok = info.contains("cluster_state:ok")
                        && info.contains(&format!("cluster_known_nodes:{masters}"))
                        && info.contains("cluster_slots_assigned:16384");
                    ok.then_some(())
                },
            );
        }
        cluster
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// `redis-cluster://127.0.0.1:p1?node=127.0.0.1:p2&node=127.0.0.1:p3`.
    pub fn url(&self) -> String {
        let ports = self.ports();
        let others: Vec<String> = ports[1..]
            .iter()
            .map(|p| format!("node=127.0.0.1:{p}"))
            .collect();
        format!(
            "redis-cluster://127.0.0.1:{}?{}",
            ports[0],
            others.join("&")
        )
    }

    /// The port of the master that owns `key`'s slot (asked of the first node: a key it does
    /// not own gets a `MOVED <slot> host:port` redirection naming the owner).
    pub fn owner_of(&self, key: &str) -> u16 {
        let first = self.nodes[0].port;
        match resp(first, &["EXISTS", key]) {
            Resp::Int(_) => first,
            Resp::Error(e) if e.starts_with("MOVED") => e
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("cannot read {e:?}")),
            other => panic!("EXISTS {key}: {other:?}"),
        }
    }

    pub fn dbsize(&self, port: u16) -> i64 {
        resp(port, &["DBSIZE"]).int()
    }
}

/// One master, one replica (`--replicaof`) and sentinels watching the master as `mymaster`
/// (quorum 1). All killed on drop.
pub struct RedisSentinel {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<RedisServer>,
}

pub const SENTINEL_SERVICE: &str = "mymaster";

impl RedisSentinel {
    pub fn start(sentinels: usize) -> Self {
        let master = RedisServer::start();
        let master_port = master.port.to_string();
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &master_port]);
        wait_until(
            "the replica's link to the master",
            Duration::from_secs(20),
            || {
                let up = info(replica.port, "replication")
                    .get("master_link_status")
                    .is_some_and(|s| s == "up");
                up.then_some(())
            },
        );
        let sentinels: Vec<RedisServer> = (0..sentinels)
            .map(|_| {
                let master_port = master.port;
                RedisServer::launch(None, None, move |port, dir| {
                    // Sentinel rewrites its config file, so it lives in the writable temp dir.
                    let conf = dir.join("sentinel.conf");
                    let text = format!(
                        "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {dir}\n\
                         logfile {dir}/sentinel.log\n\
                         sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {master_port} 1\n\
                         sentinel down-after-milliseconds {SENTINEL_SERVICE} 5000\n",
                        dir = dir.display()
                    );
                    std::fs::write(&conf, text).expect("write sentinel.conf");
                    vec![conf.display().to_string(), "--sentinel".into()]
                })
            })
            .collect();
        for sentinel in &sentinels {
            wait_until(
                "the sentinel to know the master",
                Duration::from_secs(20),
                || {
                    let reply = resp(
                        sentinel.port,
                        &["SENTINEL", "get-master-addr-by-name", SENTINEL_SERVICE],
                    );
                    (reply
                        == Resp::Array(vec![
                            Resp::Bulk(b"127.0.0.1".to_vec()),
                            Resp::Bulk(master.port.to_string().into_bytes()),
                        ]))
                    .then_some(())
                },
            );
        }
        Self {
            master,
            replica,
            sentinels,
        }
    }

    /// `redis-sentinel://127.0.0.1:<first sentinel>/0?sentinelServiceName=mymaster`.
    pub fn url(&self) -> String {
        format!(
            "redis-sentinel://127.0.0.1:{}/0?sentinelServiceName={SENTINEL_SERVICE}",
            self.sentinels[0].port
        )
    }
}

// ----- connecting sluice -----

/// Redis settings for tests: generous command timeout (these tests check answers, not
/// latency; a loaded CI machine must not turn a slow reply into a failure).
pub fn redis_settings(url: &str) -> RedisSettings {
    RedisSettings {
        url: url.to_string(),
        pool_size: 2,
        command_timeout: "5s".into(),
        ..RedisSettings::default()
    }
}

/// Switches server settings to the Redis backend at `url` (see [`redis_settings`]).
pub fn use_redis(settings: &mut sluice::config::Settings, url: &str) {
    settings.backend = sluice::config::settings::Backend::Redis;
    settings.redis = redis_settings(url);
}

pub async fn connect(url: &str) -> RedisStore {
    match tokio::time::timeout(
        Duration::from_secs(15),
        RedisStore::connect(&redis_settings(url)),
    )
    .await
    {
        Ok(Ok(store)) => {
            assert!(store.ready().is_ok(), "connected to {url} but not ready");
            store
        }
        Ok(Err(e)) => panic!("cannot connect to {url}: {e}"),
        Err(_) => panic!("RedisStore::connect({url}) hung for 15 s"),
    }
}

// ----- time -----

pub const SECOND: u64 = 1_000;
pub const MINUTE: u64 = 60 * SECOND;
pub const HOUR: u64 = 60 * MINUTE;
pub const DAY: u64 = 24 * HOUR;

/// 2053-12-14T00:00:00Z, day 30660 of the epoch: a multiple of every period (the least
/// common multiple of a week, a 30-day month and a 365-day year is 15330 days), so every
/// window of every unit starts here.
///
/// In the future on purpose: the script gives a key an absolute expiry (`PEXPIREAT window +
/// period`) computed from the caller's `now`, and Redis compares it with its own clock, so a
/// `now` in the past makes Redis drop each key as soon as it is written. That is a finding of
/// its own (see `a_past_clock_counts_like_memory` in `redis_backend.rs`); every other test
/// uses fixed times after the real clock so it checks the counting, not that.
pub const BASE_MS: u64 = 30_660 * DAY;

// ----- conformance: the Redis store against the memory store and the DESIGN formula -----

/// One counter update of a scenario step.
#[derive(Debug, Clone)]
pub struct Op {
    pub counter: String,
    pub threshold: Threshold,
    pub hits: u64,
    pub mode: HitMode,
}

/// One `Store::apply` call: a batch of updates at one `now`.
#[derive(Debug, Clone)]
pub struct Step {
    pub now: u64,
    pub ops: Vec<Op>,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub steps: Vec<Step>,
}

pub const fn per(limit: u64, unit: Unit) -> Threshold {
    Threshold::new(limit, unit)
}

pub const fn per_n(limit: u64, unit: Unit, multiplier: u32) -> Threshold {
    Threshold {
        limit,
        unit,
        multiplier,
        burst: None,
    }
}

pub fn take(counter: &str, threshold: Threshold, hits: u64) -> Op {
    Op {
        counter: counter.to_string(),
        threshold,
        hits,
        mode: HitMode::Take,
    }
}

pub fn give(counter: &str, threshold: Threshold, hits: u64) -> Op {
    Op {
        mode: HitMode::Give,
        ..take(counter, threshold, hits)
    }
}

fn step(now: u64, ops: Vec<Op>) -> Step {
    Step { now, ops }
}

/// `n` steps of one op each at `now`, `now + 1`, ...
fn repeat(now: u64, n: u64, op: &Op) -> Vec<Step> {
    (0..n).map(|i| step(now + i, vec![op.clone()])).collect()
}

/// The conformance table. Times only move forward within a scenario (a clock going back to
/// an old window is not something a store must agree on: memory keeps one window per counter,
/// Redis one key per window).
pub fn scenarios() -> Vec<Scenario> {
    let s = |name: &str, steps: Vec<Step>| Scenario {
        name: name.to_string(),
        steps,
    };
    let t0 = BASE_MS + 15_250;
    let three_a_minute = per(3, Unit::Minute);
    let two_a_second = per(2, Unit::Second);
    let five_a_minute = per(5, Unit::Minute);
    let units = [
        Unit::Second,
        Unit::Minute,
        Unit::Hour,
        Unit::Day,
        Unit::Week,
        Unit::Month,
        Unit::Year,
    ];
    vec![
        s(
            "up to the limit, then over (hits still counted)",
            repeat(t0, 6, &take("c", three_a_minute, 1)),
        ),
        s("over at the window's last ms, fresh at the boundary", {
            let op = take("c", two_a_second, 1);
            vec![
                step(BASE_MS + 500, vec![op.clone()]),
                step(BASE_MS + 600, vec![op.clone()]),
                step(BASE_MS + 700, vec![op.clone()]),
                step(BASE_MS + 999, vec![op.clone()]),
                step(BASE_MS + 1_000, vec![op.clone()]),
                step(BASE_MS + 1_001, vec![op.clone()]),
                step(BASE_MS + 1_999, vec![op.clone()]),
                step(BASE_MS + 5_000, vec![op.clone()]),
            ]
        }),
        s("give back: subtracts, never below zero", {
            let c = |now, op| step(now, vec![op]);
            vec![
                c(t0, take("c", five_a_minute, 3)),
                c(t0 + 1, give("c", five_a_minute, 2)),
                c(t0 + 2, take("c", five_a_minute, 1)),
                c(t0 + 3, give("c", five_a_minute, 10)),
                c(t0 + 4, take("c", five_a_minute, 6)),
                c(t0 + 5, give("c", five_a_minute, 1)),
                c(t0 + 6, take("c", five_a_minute, 1)),
                c(t0 + 7, give("c", five_a_minute, 0)),
            ]
        }),
        s("give on a counter that does not exist yet", {
            vec![
                step(t0, vec![give("c", three_a_minute, 3)]),
                step(t0 + 1, vec![take("c", three_a_minute, 1)]),
                step(t0 + 2, vec![take("c", three_a_minute, 0)]),
                step(t0 + 3, vec![take("c", three_a_minute, 3)]),
            ]
        }),
        s("zero hits checks without counting", {
            let t = per(2, Unit::Hour);
            vec![
                step(t0, vec![take("c", t, 0)]),
                step(t0 + 1, vec![take("c", t, 2)]),
                step(t0 + 2, vec![take("c", t, 0)]),
                step(t0 + 3, vec![take("c", t, 1)]),
                step(t0 + 4, vec![take("c", t, 0)]),
                step(BASE_MS + HOUR, vec![take("c", t, 0)]),
            ]
        }),
        s("more hits than the limit at once, then the next day", {
            let t = per(10, Unit::Day);
            vec![
                step(t0, vec![take("c", t, 25)]),
                step(t0 + 1, vec![take("c", t, 0)]),
                step(t0 + 2, vec![give("c", t, 20)]),
                step(BASE_MS + DAY - 1, vec![take("c", t, 4)]),
                step(BASE_MS + DAY, vec![take("c", t, 10)]),
                step(BASE_MS + DAY + 1, vec![take("c", t, 1)]),
            ]
        }),
        s("limit zero: every counted hit is over", {
            let t = per(0, Unit::Second);
            vec![
                step(t0, vec![take("c", t, 0)]),
                step(t0 + 1, vec![take("c", t, 1)]),
                step(t0 + 2, vec![give("c", t, 1)]),
                step(t0 + 3, vec![take("c", t, 0)]),
            ]
        }),
        s("several counters in one batch, one of them twice", {
            let batch = |now| {
                step(
                    now,
                    vec![
                        take("a", two_a_second, 1),
                        take("b", three_a_minute, 1),
                        take("a", two_a_second, 1),
                        give("c", five_a_minute, 1),
                        take("c", five_a_minute, 2),
                        take("d", per(1, Unit::Hour), 0),
                    ],
                )
            };
            vec![
                batch(BASE_MS + 100),
                batch(BASE_MS + 200),
                batch(BASE_MS + 1_200),
                batch(BASE_MS + 61_000),
            ]
        }),
        s("every unit, across their windows", {
            let batch = |now| {
                step(
                    now,
                    units
                        .iter()
                        .enumerate()
                        .map(|(i, unit)| take(&format!("u{i}"), per(2, *unit), 1))
                        .collect(),
                )
            };
            let mid = BASE_MS + 3 * DAY + 12_345;
            vec![
                batch(BASE_MS),
                batch(mid),
                batch(mid + 1),
                batch(BASE_MS + 7 * DAY),
                batch(BASE_MS + 30 * DAY - 1),
                batch(BASE_MS + 30 * DAY),
                batch(BASE_MS + 365 * DAY - 1),
                batch(BASE_MS + 365 * DAY),
            ]
        }),
        s("multiplied periods (30 s, 5 min, 7 s)", {
            let batch = |now| {
                step(
                    now,
                    vec![
                        take("s30", per_n(2, Unit::Second, 30), 1),
                        take("m5", per_n(3, Unit::Minute, 5), 1),
                        take("s7", per_n(1, Unit::Second, 7), 1),
                    ],
                )
            };
            [
                0, 1, 29_999, 30_000, 31_000, 299_999, 300_000, 306_999, 307_000,
            ]
            .iter()
            .map(|&dt| batch(BASE_MS + dt))
            .collect()
        }),
        s("give back in a new window", {
            vec![
                step(t0, vec![take("c", three_a_minute, 3)]),
                step(t0 + 1, vec![take("c", three_a_minute, 1)]),
                step(BASE_MS + MINUTE, vec![give("c", three_a_minute, 1)]),
                step(BASE_MS + MINUTE + 1, vec![take("c", three_a_minute, 1)]),
                step(BASE_MS + MINUTE + 2, vec![take("c", three_a_minute, 2)]),
                step(BASE_MS + MINUTE + 3, vec![take("c", three_a_minute, 1)]),
            ]
        }),
        s("a burst unlike the limit", {
            let t = Threshold {
                burst: Some(5),
                ..per(2, Unit::Second)
            };
            let mut steps = repeat(t0, 7, &take("c", t, 1));
            steps.push(step(t0 + 400, vec![take("c", t, 1)]));
            steps.push(step(t0 + 2_000, vec![take("c", t, 3)]));
            steps.push(step(t0 + 2_001, vec![give("c", t, 2), take("c", t, 4)]));
            steps
        }),
        s("large but exact counts", {
            let t = per(1_000_000_000_000, Unit::Year);
            vec![
                step(t0, vec![take("c", t, 999_999_999_999)]),
                step(t0 + 1, vec![take("c", t, 1)]),
                step(t0 + 2, vec![take("c", t, 1)]),
                step(t0 + 3, vec![give("c", t, 2)]),
            ]
        }),
    ]
}

/// Periods longer than the time since the epoch (a request-side override with a huge
/// `unit_multiplier`; the period is capped at 100 years): the window starts at 0. Kept out of
/// [`scenarios`] so that table stays a clean signal; run by `redis_backend.rs`.
pub fn capped_period_scenario() -> Scenario {
    let t0 = BASE_MS + 15_250;
    let capped = per_n(5, Unit::Year, 1_000);
    let huge_seconds = per_n(2, Unit::Second, u32::MAX);
    Scenario {
        name: "a huge multiplier: the period is capped at 100 years".into(),
        steps: vec![
            step(t0, vec![take("y", capped, 3), take("s", huge_seconds, 1)]),
            step(
                t0 + DAY,
                vec![take("y", capped, 3), take("s", huge_seconds, 2)],
            ),
        ],
    }
}

/// The DESIGN §3 formula written out once more, keyed like Redis (counter, window), as an
/// independent oracle for both stores.
#[derive(Default)]
pub struct Model {
    counts: HashMap<(String, u64), u64>,
}

impl Model {
    pub fn apply(&mut self, op: &Op, now: u64) -> Outcome {
        let period = op.threshold.period_ms();
        let window = now - now % period;
        let count = self.counts.entry((op.counter.clone(), window)).or_insert(0);
        *count = match op.mode {
            HitMode::Take => count.saturating_add(op.hits),
            HitMode::Give => count.saturating_sub(op.hits),
        };
        Outcome {
            over: *count > op.threshold.limit,
            remaining: op.threshold.limit.saturating_sub(*count),
            reset_ms: window + period - now,
        }
    }
}

/// Every algorithm a store implements; each scenario runs under each of them.
pub const ALGORITHMS: [Algorithm; 3] = [
    Algorithm::FixedWindow,
    Algorithm::SlidingWindow,
    Algorithm::TokenBucket,
];

fn counter_ops(ops: &[Op], prefix: &str, algorithm: Algorithm) -> Vec<CounterOp> {
    ops.iter()
        .map(|op| {
            CounterOp::new(
                format!("{prefix}:{}", op.counter),
                algorithm,
                op.threshold,
                op.hits,
                op.mode,
            )
        })
        .collect()
}

/// Runs `scenario` with `algorithm` through a fresh [`MemoryStore`] and through `store`, with
/// counter ids under `prefix` (unique per run, so runs sharing one Redis never meet); every
/// step's outcomes must be identical. For `fixed_window` both must also equal the DESIGN
/// formula ([`Model`]).
pub async fn check_scenario(
    store: &dyn Store,
    scenario: &Scenario,
    algorithm: Algorithm,
    prefix: &str,
) -> Result<(), String> {
    let memory = MemoryStore::new(1_000_000);
    let mut model = Model::default();
    for (i, step) in scenario.steps.iter().enumerate() {
        let mut in_memory = counter_ops(&step.ops, prefix, algorithm);
        let mut in_store = in_memory.clone();
        let from_model: Vec<Outcome> = step
            .ops
            .iter()
            .map(|op| model.apply(op, step.now))
            .collect();
        memory
            .apply(&mut in_memory, step.now)
            .await
            .map_err(|e| format!("memory store failed: {e}"))?;
        let applied = store.apply(&mut in_store, step.now).await;
        let from_memory: Vec<Outcome> = in_memory.iter().map(|o| o.outcome).collect();
        let context = || {
            format!(
                "{} scenario {:?}, step {i} at now={} ({} ms into the day)\nops: {:?}",
                algorithm.as_str(),
                scenario.name,
                step.now,
                step.now % DAY,
                step.ops
            )
        };
        if let Err(e) = applied {
            return Err(format!(
                "{}\n{} store failed: {e}\nmemory answered: {from_memory:?}",
                context(),
                store.source()
            ));
        }
        let from_store: Vec<Outcome> = in_store.iter().map(|o| o.outcome).collect();
        let expected = if algorithm == Algorithm::FixedWindow {
            from_model
        } else {
            from_memory.clone()
        };
        if from_memory != expected || from_store != expected {
            return Err(format!(
                "{}\nexpected: {expected:?}\nmemory:   {from_memory:?}\n{}:    {from_store:?}",
                context(),
                store.source()
            ));
        }
    }
    Ok(())
}

/// Every scenario of [`scenarios`] under every algorithm; panics with all the failures.
pub async fn check_table(store: &dyn Store, prefix: &str) {
    let table = scenarios();
    let mut failures = Vec::new();
    for algorithm in ALGORITHMS {
        for (i, scenario) in table.iter().enumerate() {
            let prefix = format!("{prefix}:{}:s{i}", algorithm.as_str());
            if let Err(e) = check_scenario(store, scenario, algorithm, &prefix).await {
                failures.push(e);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} runs differ:\n\n{}",
        failures.len(),
        table.len() * ALGORITHMS.len(),
        failures.join("\n\n")
    );
}

/// `cases` random scenarios (proptest, shrinking on failure): a random algorithm; three
/// counters with random small limits, units, multipliers and bursts; 1 to 30 batches of 1 to
/// 4 updates (takes, gives, zero hits) with time moving forward by steps that often cross
/// windows.
pub fn check_random(store: &dyn Store, rt: &tokio::runtime::Runtime, cases: u32, prefix: &str) {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};

    let algorithm = prop::sample::select(ALGORITHMS.to_vec());
    let unit = prop::sample::select(vec![Unit::Second, Unit::Minute, Unit::Hour, Unit::Year]);
    let counter = (0u64..=6, unit, 1u32..=3, prop::option::of(1u64..=8));
    let advance = prop::sample::select(vec![
        0u64, 0, 1, 250, 999, 1_000, 1_001, 29_999, 59_999, 60_000, 3_600_000,
    ]);
    let hits = prop_oneof![4 => 0u64..=3, 1 => 4u64..=12];
    let op = (0usize..3, hits, prop::bool::weighted(0.2));
    let steps = prop::collection::vec((advance, prop::collection::vec(op, 1..=4)), 1..=30);
    let case = (
        algorithm,
        prop::collection::vec(counter, 3),
        steps,
        0u64..DAY,
    );

    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let run = AtomicUsize::new(0);
    let result = runner.run(&case, |(algorithm, counters, steps, offset)| {
        let thresholds: Vec<Threshold> = counters
            .iter()
            .map(|&(limit, unit, multiplier, burst)| Threshold {
                burst,
                ..per_n(limit, unit, multiplier)
            })
            .collect();
        let mut now = BASE_MS + offset;
        let steps = steps
            .into_iter()
            .map(|(advance, ops)| {
                now += advance;
                let ops = ops
                    .into_iter()
                    .map(|(c, hits, is_give)| {
                        let name = format!("r{c}");
                        if is_give {
                            give(&name, thresholds[c], hits)
                        } else {
                            take(&name, thresholds[c], hits)
                        }
                    })
                    .collect();
                Step { now, ops }
            })
            .collect();
        let scenario = Scenario {
            name: "random".into(),
            steps,
        };
        let id = run.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("{prefix}:{id}");
        rt.block_on(check_scenario(store, &scenario, algorithm, &prefix))
            .map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("random conformance failed: {e}");
    }
}

// ----- a TCP proxy that proves one round trip -----

/// What the proxy saw while armed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateReport {
    /// The commands (names, upper case) the client sent since [`Proxy::arm`], in order.
    pub commands: Vec<String>,
    /// A reply had to be let through because the client stopped sending before the armed
    /// number of EVALSHA commands: it was waiting for a reply, i.e. more than one round trip.
    pub timed_out: bool,
}

#[derive(Default)]
struct ProxyState {
    evalsha: AtomicUsize,
    want: AtomicUsize,
    timed_out: AtomicBool,
    commands: Mutex<Vec<String>>,
}

/// A loopback TCP proxy in front of Redis that reads the commands a client sends. Armed with
/// `n`, it holds every reply from Redis until the client has sent `n` EVALSHA commands (or
/// [`GATE_TIMEOUT`] passed). A client that pipelines its batch sends all `n` before it needs
/// any reply, so nothing times out; a client that waits for each reply before sending the
/// next command stalls on the first held reply and the gate times out. That is a direct test
/// of "one round trip per request".
pub struct Proxy {
    pub port: u16,
    state: Arc<ProxyState>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

pub const GATE_TIMEOUT: Duration = Duration::from_secs(3);

impl Proxy {
    pub async fn start(target_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let state = Arc::new(ProxyState::default());
        let tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let accept = {
            let state = state.clone();
            let tasks = tasks.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let up = tokio::spawn(upstream(client_read, server_write, state.clone()));
                    let down = tokio::spawn(downstream(server_read, client_write, state.clone()));
                    let mut tasks = tasks.lock().unwrap_or_else(|e| e.into_inner());
                    tasks.push(up);
                    tasks.push(down);
                }
            })
        };
        tasks.lock().unwrap_or_else(|e| e.into_inner()).push(accept);
        Self { port, state, tasks }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// From now on, replies wait until `n` EVALSHA commands have been seen; commands are
    /// recorded from here.
    pub fn arm(&self, n: usize) {
        self.state.evalsha.store(0, Ordering::SeqCst);
        self.state.timed_out.store(false, Ordering::SeqCst);
        self.state
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.state.want.store(n, Ordering::SeqCst);
    }

    /// Opens the gate and reports what happened since [`Proxy::arm`].
    pub fn disarm(&self) -> GateReport {
        self.state.want.store(0, Ordering::SeqCst);
        GateReport {
            commands: std::mem::take(
                &mut *self
                    .state
                    .commands
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
            ),
            timed_out: self.state.timed_out.load(Ordering::SeqCst),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

/// The name of the first complete command in `buf` (RESP array of bulk strings, or an inline
/// command) and its length in bytes; `None` while it is incomplete.
fn next_command(buf: &[u8]) -> Option<(String, usize)> {
    let line_end = |from: usize| {
        buf.get(from..)?
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| from + p)
    };
    let number = |from: usize, to: usize| -> Option<usize> {
        std::str::from_utf8(&buf[from..to]).ok()?.parse().ok()
    };
    if buf.first()? != &b'*' {
        let end = line_end(0)?;
        let line = String::from_utf8_lossy(&buf[..end]);
        let name = line.split_whitespace().next().unwrap_or("").to_uppercase();
        return Some((name, end + 2));
    }
    let end = line_end(0)?;
    let parts = number(1, end)?;
    let mut pos = end + 2;
    let mut name = String::new();
    for i in 0..parts {
        if buf.get(pos)? != &b'$' {
            return None;
        }
        let end = line_end(pos)?;
        let len = number(pos + 1, end)?;
        let data = buf.get(end + 2..end + 2 + len)?;
        if i == 0 {
            name = String::from_utf8_lossy(data).to_uppercase();
        }
        pos = end + 2 + len + 2;
        if buf.len() < pos {
            return None;
        }
    }
    Some((name, pos))
}

/// Client -> Redis: forwards, and records every command while armed.
async fn upstream(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<ProxyState>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        let mut names = Vec::new();
        while let Some((name, used)) = next_command(&pending) {
            names.push(name);
            pending.drain(..used);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if state.want.load(Ordering::SeqCst) > 0 {
            let evalsha = names.iter().filter(|n| *n == "EVALSHA").count();
            state
                .commands
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(names);
            state.evalsha.fetch_add(evalsha, Ordering::SeqCst);
        }
    }
}

/// Redis -> client: forwards, holding replies while the gate is armed and not yet satisfied.
async fn downstream(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<ProxyState>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let want = state.want.load(Ordering::SeqCst);
        if want > 0 && state.evalsha.load(Ordering::SeqCst) < want {
            let deadline = tokio::time::Instant::now() + GATE_TIMEOUT;
            while state.evalsha.load(Ordering::SeqCst) < want {
                if tokio::time::Instant::now() >= deadline {
                    state.timed_out.store(true, Ordering::SeqCst);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}

// ----- HTTP -----

/// A tiny HTTP/1.1 GET over a tokio `TcpStream`: the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).await?;
        Ok::<_, std::io::Error>(bytes)
    };
    let bytes = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {path} on {addr} took more than 5 s"))
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"));
    let text = String::from_utf8_lossy(&bytes);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    (status, body.to_string())
}
