//! A Redis Cluster of masters only, on free loopback ports: enough to prove that counters
//! spread over the nodes and that one request's batch may span them all. Replicas add
//! nothing to what the tests check (the scripts run on masters), so there are none.
//!
//! The nodes are [`RedisServer`]s (the only starter of `redis-server`); the slots are spread
//! by `redis-cli --cluster create`, as an operator would.

use std::process::Command;
use std::time::Duration;

use super::redis::{RedisServer, node_args};
use super::resp::{Resp, resp};
use super::{free_port, run_bounded, wait_until};

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
