//! One master, one replica and sentinels watching the master as `mymaster`, on free loopback
//! ports: what sluice's `redis-sentinel://` URL is tested against.
//!
//! Quorum 1, so a single sentinel decides; the tests check that sluice counts on the master
//! the sentinel names, not failover timing. Every process is a [`RedisServer`] (the only
//! starter of `redis-server`); a sentinel's config file lives in its own temporary directory
//! because Sentinel rewrites it.

use std::time::Duration;

use super::redis::RedisServer;
use super::resp::{Resp, info, resp};
use super::wait_until;

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
