//! Redis over TLS with a custom CA (`redis.tls_ca_file`) and client certificates
//! (`redis.tls_client_cert_file` / `tls_client_key_file`), against a real `redis-server`
//! listening only on a TLS port on 127.0.0.1. Certificates are made at test time by the kit
//! (`common::certs`).
//!
//! - Trusting the server's CA: the store connects and counts a batch.
//! - System roots (no `tls_ca_file`) or another CA: no connection is established.
//! - Redis requiring client certificates: counted with one signed by its CA.
//! - Bad files are set-up errors naming the file.
//!
//! Without `redis-server`, or with one built without TLS, the tests that need it fail and say
//! how to install one.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::certs::{Pki, key_pem};
use common::redis::RedisServer;
use fred::prelude::ClientLike as _;
use sluice::config::settings::RedisSettings;
use sluice::limiter::redis::{RedisSetupError, RedisStore};
use sluice::limiter::{Algorithm, CounterOp, HitMode, Store, Threshold, Unit};
use tempfile::TempDir;

const NOW: u64 = 1_700_000_040_000;

/// Certificate files: the server's CA, its server certificate and a client certificate
/// signed by that CA (`ca.pem`, `server.*`, `client.*`), and an unrelated CA with a client
/// certificate of its own (`other-ca.pem`, `other-client.*`).
struct Files {
    dir: TempDir,
}

impl Files {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Pki::new("sluice test redis CA").write(dir.path(), "");
        Pki::new("some other CA").write(dir.path(), "other-");
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A `redis-server` with only a TLS port on 127.0.0.1 (see `RedisServer::start_tls`).
fn tls_redis(files: &Files, require_client_certs: bool) -> RedisServer {
    RedisServer::start_tls(
        &files.path("server.pem"),
        &files.path("server.key"),
        &files.path("ca.pem"),
        require_client_certs,
    )
}

fn settings(redis: &RedisServer) -> RedisSettings {
    RedisSettings {
        url: format!("rediss://127.0.0.1:{}", redis.port),
        pool_size: 1,
        connect_timeout: std::time::Duration::from_secs(1),
        command_timeout: std::time::Duration::from_secs(5),
        ..RedisSettings::default()
    }
}

fn op(counter: &str) -> CounterOp {
    CounterOp::new(
        counter.into(),
        Algorithm::FixedWindow,
        Threshold::new(2, Unit::Minute),
        1,
        HitMode::Take,
    )
}

/// Connects, counts three hits of a limit of 2 in one batch and checks the answers.
async fn counts(settings: &RedisSettings, counter: &str) {
    let store = tokio::time::timeout(Duration::from_secs(10), RedisStore::connect(settings))
        .await
        .expect("connect within 10 s")
        .expect("connect over TLS");
    assert!(store.ready().is_ok(), "{:?}", store.ready());
    let mut batch = [op(counter), op(counter), op(counter)];
    tokio::time::timeout(Duration::from_secs(10), store.apply(&mut batch, NOW))
        .await
        .expect("apply within 10 s")
        .expect("counted by Redis over TLS");
    let over: Vec<bool> = batch.iter().map(|o| o.outcome.over).collect();
    assert_eq!(over, [false, false, true], "limit 2, three hits");
    assert!(batch.iter().all(|o| o.source == "redis"));
    let _ = store.pool().quit().await;
}

/// The store gets no connection: not ready, and a batch fails (so the fallback answers).
async fn not_connected(settings: &RedisSettings, why: &str) {
    match tokio::time::timeout(Duration::from_secs(10), RedisStore::connect(settings))
        .await
        .expect("connect returns within 10 s")
    {
        Ok(store) => {
            assert!(store.ready().is_err(), "{why}: connected anyway");
            let mut batch = [op("tls-b")];
            let result =
                tokio::time::timeout(Duration::from_secs(10), store.apply(&mut batch, NOW))
                    .await
                    .expect("apply returns within 10 s");
            assert!(result.is_err(), "{why}: a batch was counted");
            // QUIT on a pool that never connected waits for a connection: bounded here, the
            // rest is dropped with the runtime.
            let _ = tokio::time::timeout(Duration::from_millis(200), store.pool().quit()).await;
        }
        // A handshake failure must not be mistaken for refused credentials.
        Err(e @ RedisSetupError::Auth(_)) => panic!("{why}: reported as credentials: {e}"),
        // Refused at set-up (e.g. no system roots at all): not connected either.
        Err(e) => eprintln!("{why}: set-up refused: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusts_exactly_the_configured_ca() {
    let files = Files::new();
    let redis = tls_redis(&files, false);
    let trusted = RedisSettings {
        tls_ca_file: Some(files.path("ca.pem")),
        ..settings(&redis)
    };
    counts(&trusted, "by-ip").await;
    // The same host by name: the server certificate names localhost too.
    counts(
        &RedisSettings {
            url: format!("rediss://localhost:{}", redis.port),
            ..trusted.clone()
        },
        "by-name",
    )
    .await;

    not_connected(&settings(&redis), "system roots").await;
    not_connected(
        &RedisSettings {
            tls_ca_file: Some(files.path("other-ca.pem")),
            ..settings(&redis)
        },
        "another CA",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presents_a_client_certificate_when_redis_requires_one() {
    let files = Files::new();
    let redis = tls_redis(&files, true);
    let trusted = RedisSettings {
        tls_ca_file: Some(files.path("ca.pem")),
        ..settings(&redis)
    };
    counts(
        &RedisSettings {
            tls_client_cert_file: Some(files.path("client.pem")),
            tls_client_key_file: Some(files.path("client.key")),
            ..trusted.clone()
        },
        "mtls",
    )
    .await;
    not_connected(&trusted, "no client certificate").await;
    not_connected(
        &RedisSettings {
            tls_client_cert_file: Some(files.path("other-client.pem")),
            tls_client_key_file: Some(files.path("other-client.key")),
            ..trusted.clone()
        },
        "client certificate of another CA",
    )
    .await;
}

fn setup_error(settings: RedisSettings) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match rt.block_on(RedisStore::connect(&settings)) {
        Ok(_) => panic!("set-up accepted {settings:?}"),
        Err(e) => e.to_string(),
    }
}

/// No Redis needed: these fail before connecting. Port 1 on loopback never answers anyway.
fn tls_settings(ca: &Path) -> RedisSettings {
    RedisSettings {
        url: "rediss://127.0.0.1:1".into(),
        tls_ca_file: Some(ca.to_path_buf()),
        ..RedisSettings::default()
    }
}

#[test]
fn unreadable_ca_file_is_a_setup_error_naming_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("missing-ca.pem");
    let err = setup_error(tls_settings(&missing));
    assert!(err.contains("redis.tls_ca_file"), "{err}");
    assert!(err.contains(&missing.display().to_string()), "{err}");
}

#[test]
fn ca_file_without_a_certificate_is_a_setup_error_naming_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let empty = dir.path().join("not-a-ca.pem");
    std::fs::write(&empty, "just text, no PEM block\n").expect("write");
    let err = setup_error(tls_settings(&empty));
    assert!(err.contains("redis.tls_ca_file"), "{err}");
    assert!(err.contains(&empty.display().to_string()), "{err}");
    assert!(err.contains("certificate"), "{err}");

    // A key is not a certificate either.
    let key = dir.path().join("key.pem");
    std::fs::write(&key, key_pem()).expect("write");
    let err = setup_error(tls_settings(&key));
    assert!(err.contains(&key.display().to_string()), "{err}");
}

#[test]
fn tls_files_need_a_tls_url_and_client_cert_needs_its_key() {
    let files = Files::new();
    let err = setup_error(RedisSettings {
        url: "redis://127.0.0.1:1".into(),
        ..tls_settings(&files.path("ca.pem"))
    });
    assert!(
        err.contains("rediss://") && err.contains("tls_ca_file"),
        "{err}"
    );
    let err = setup_error(RedisSettings {
        tls_client_cert_file: Some(files.path("client.pem")),
        ..tls_settings(&files.path("ca.pem"))
    });
    assert!(err.contains("tls_client_key_file"), "{err}");
}
