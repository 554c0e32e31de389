//! A TCP proxy in front of Redis that reads the commands a client sends and can hold back
//! Redis's replies: the direct test of "one round trip per request" (see [`Proxy`]).
//!
//! Counting round trips from outside needs no cooperation from sluice and no timing
//! assumption: a pipelining client gets through the gate, a client that waits for each reply
//! stalls on it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
