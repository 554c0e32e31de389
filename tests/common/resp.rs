//! A minimal RESP2 client for the tests, and the `INFO` readers built on it.
//!
//! Hand-written on purpose: it sends exactly the bytes asked for (keys with odd characters,
//! no hidden `HELLO`, `CLIENT SETINFO` or `SELECT`), so tests that count the commands Redis
//! processed (`INFO commandstats`, `total_commands_processed`) see only their own. Every
//! connection has connect, read and write timeouts.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

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
