//! Redis over TLS with a custom CA (`redis.tls_ca_file`) and client certificates
//! (`redis.tls_client_cert_file` / `tls_client_key_file`), against a real `redis-server`
//! listening only on a TLS port on 127.0.0.1. Certificates are made at test time with rcgen.
//!
//! - Trusting the server's CA: the store connects and counts a batch.
//! - System roots (no `tls_ca_file`) or another CA: no connection is established.
//! - Redis requiring client certificates: counted with one signed by its CA.
//! - Bad files are set-up errors naming the file.
//!
//! When `redis-server` lacks TLS support, the Redis tests print a note and return, unless
//! `CI` is set, where they fail.

mod redis_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fred::prelude::ClientLike as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use redis_support::{free_port, redis_available};
use sluice::config::settings::RedisSettings;
use sluice::limiter::redis::{RedisSetupError, RedisStore};
use sluice::limiter::{Algorithm, CounterOp, HitMode, Store, Threshold, Unit};
use tempfile::TempDir;

const NOW: u64 = 1_700_000_040_000;

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).expect("self-signed CA");
    (cert.pem(), Issuer::new(params, key))
}

/// A certificate signed by `issuer`, and its key (PEM).
fn leaf(
    issuer: &Issuer<'static, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let key = KeyPair::generate().expect("leaf key");
    let mut params =
        CertificateParams::new(names.iter().map(|n| (*n).to_string()).collect::<Vec<_>>())
            .expect("leaf params");
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, issuer).expect("sign leaf");
    (cert.pem(), key.serialize_pem())
}

/// Certificate files: the server's CA and its server certificate, a client certificate
/// signed by that CA, and an unrelated CA (with a client certificate of its own).
struct Files {
    dir: TempDir,
}

impl Files {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (ca_pem, issuer) = ca("sluice test redis CA");
        let (server_cert, server_key) = leaf(
            &issuer,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) =
            leaf(&issuer, &["sluice"], ExtendedKeyUsagePurpose::ClientAuth);
        let (other_ca, other_issuer) = ca("some other CA");
        let (other_cert, other_key) = leaf(
            &other_issuer,
            &["sluice"],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        for (name, pem) in [
            ("ca.pem", ca_pem),
            ("server.pem", server_cert),
            ("server.key", server_key),
            ("client.pem", client_cert),
            ("client.key", client_key),
            ("other-ca.pem", other_ca),
            ("other-client.pem", other_cert),
            ("other-client.key", other_key),
        ] {
            std::fs::write(dir.path().join(name), pem).expect("write PEM");
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A `redis-server` with only a TLS port on 127.0.0.1; killed and reaped on drop.
struct TlsRedis {
    child: Child,
    port: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TlsRedis {
    /// `None` (after a note) when redis-server is missing or built without TLS; panics then
    /// if `CI` is set.
    fn start(files: &Files, require_client_certs: bool) -> Option<Self> {
        if !redis_available() {
            return None;
        }
        let port = free_port();
        let workdir = files.dir.path();
        let mut child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", "0"])
            .args(["--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(files.path("server.pem"))
            .arg("--tls-key-file")
            .arg(files.path("server.key"))
            .arg("--tls-ca-cert-file")
            .arg(files.path("ca.pem"))
            .args([
                "--tls-auth-clients",
                if require_client_certs { "yes" } else { "no" },
            ])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn redis-server");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = child.try_wait().expect("poll redis-server") {
                let out = child.wait_with_output().expect("redis-server output");
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                let note = format!(
                    "redis-server --tls-port exited at start ({status}); built without TLS? {}",
                    text.trim()
                );
                if std::env::var_os("CI").is_some() {
                    panic!("{note} (CI is set: the Redis TLS tests must run)");
                }
                eprintln!("note: skipping this Redis TLS test: {note}");
                return None;
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                // Never let the pipes fill up and block the server.
                drop(child.stdout.take());
                drop(child.stderr.take());
                return Some(Self { child, port });
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on TLS port {port} within 5 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn settings(&self) -> RedisSettings {
        RedisSettings {
            url: format!("rediss://127.0.0.1:{}", self.port),
            pool_size: 1,
            connect_timeout: "1s".into(),
            command_timeout: "5s".into(),
            ..RedisSettings::default()
        }
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
    let Some(redis) = TlsRedis::start(&files, false) else {
        return;
    };
    let trusted = RedisSettings {
        tls_ca_file: Some(files.path("ca.pem")),
        ..redis.settings()
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

    not_connected(&redis.settings(), "system roots").await;
    not_connected(
        &RedisSettings {
            tls_ca_file: Some(files.path("other-ca.pem")),
            ..redis.settings()
        },
        "another CA",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presents_a_client_certificate_when_redis_requires_one() {
    let files = Files::new();
    let Some(redis) = TlsRedis::start(&files, true) else {
        return;
    };
    let trusted = RedisSettings {
        tls_ca_file: Some(files.path("ca.pem")),
        ..redis.settings()
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
    std::fs::write(&key, KeyPair::generate().expect("key").serialize_pem()).expect("write");
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
