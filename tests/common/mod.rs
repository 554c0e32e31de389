//! The one test kit of sluice's integration tests: every test binary declares `mod common;`
//! and finds here what it shares with the others, one file per concept.
//!
//! Why one kit: the helpers had grown apart in four support modules and inside test files
//! (three ways to start `redis-server`, two certificate makers, five HTTP clients), each with
//! its own timeouts and its own idea of what to do when a dependency was missing. Now each
//! thing is done in one place, and a missing dependency (`redis-server`, Envoy) fails the test
//! with instructions: no test ever passes without having run.
//!
//! This file owns what every part of the kit needs: free loopback ports, bounded waits,
//! bounded child processes, the repository root and time constants.
//!
//! Rules the whole kit keeps: everything listens on 127.0.0.1 and never on 6379 (a
//! developer's own Redis); every process started is killed and reaped when its owner is
//! dropped, also when a test panics; every wait is bounded; a panic says what went wrong.
//!
//! Each test binary uses only part of the kit, hence `dead_code` is allowed for all of it
//! (here, so that every file below inherits it).

#![allow(dead_code)]

pub mod certs;
pub mod cluster;
pub mod config;
pub mod envoy;
pub mod envoy_examples;
pub mod http;
pub mod metrics;
pub mod proxy;
pub mod redis;
pub mod resp;
pub mod rls;
pub mod scenarios;
pub mod sentinel;
pub mod sluice;
pub mod stalls;
pub mod store;
pub mod xds;

use std::io::Read;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const SECOND: u64 = 1_000;
pub const MINUTE: u64 = 60 * SECOND;
pub const HOUR: u64 = 60 * MINUTE;
pub const DAY: u64 = 24 * HOUR;

/// The repository root (where `Cargo.toml`, `config/` and `tests/` are).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A path relative to the repository root.
pub fn repo_path(relative: &str) -> PathBuf {
    repo().join(relative)
}

/// A loopback port nothing listens on right now (bound to port 0, read, released). Never
/// 6379. Another process may take it before the caller binds it: starters that can, retry.
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

/// The system clock in milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `limit`; panics naming
/// `what` after that.
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

/// Runs a command to completion within `limit`, killing it (and panicking) past that. Both
/// pipes are drained while it runs, so a chatty child cannot block on a full pipe.
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

/// Sends `signal` (`STOP`, `CONT`, `TERM`, ...) to process `pid` with `kill(1)`; panics if it
/// cannot be delivered.
pub fn send_signal(pid: u32, signal: &str) {
    let pid = pid.to_string();
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run kill -{signal} {pid}: {e}"));
    assert!(status.success(), "kill -{signal} {pid}: {status}");
}
