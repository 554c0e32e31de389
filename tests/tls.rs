//! gRPC over TLS (`settings.tls`): certificates are made at test time by the kit
//! (`common::certs`: a CA, a server certificate for `localhost` and 127.0.0.1, a client
//! certificate); the server runs in process with its files in a temporary directory.
//!
//! - A client trusting the CA is answered; one that does not trust it (no roots, another CA)
//!   or that speaks plaintext gets no answer.
//! - With `client_ca_file`, a client without a certificate (or with one from another CA) is
//!   refused, and one presenting a certificate signed by the CA is answered.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::certs::{Pki, write_pem};
use common::rls::{
    Code, ManualClock, RateLimitResponse, RateLimitServiceClient, START_MS, Unit, desc, limit,
    request,
};
use sluice::config::Settings;
use sluice::server::{ServerHandle, start};
use tempfile::TempDir;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const LIMITS: &str = r#"
domain: tls
routes:
  - name: api
    global_threshold: { query_per_minute: 10 }
"#;

/// An in-process server with TLS from files; stopped on [`Tls::stop`].
struct Tls {
    handle: Option<ServerHandle>,
    _dir: TempDir,
}

impl Tls {
    async fn start(pki: &Pki, require_client_cert: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let limits = dir.path().join("limits");
        std::fs::create_dir(&limits).expect("limits dir");
        std::fs::write(limits.join("tls.yaml"), LIMITS).expect("limits file");
        let write = |name: &str, text: &str| write_pem(dir.path(), name, text);
        let mut settings = Settings {
            grpc_addr: "127.0.0.1:0".into(),
            http_addr: "127.0.0.1:0".into(),
            limits_dir: limits,
            ..Settings::default()
        };
        settings.tls.cert_file = Some(write("server.pem", &pki.server.cert));
        settings.tls.key_file = Some(write("server.key", &pki.server.key));
        if require_client_cert {
            settings.tls.client_ca_file = Some(write("client-ca.pem", &pki.ca));
        }
        let handle = start(&settings, Arc::new(ManualClock::new(START_MS)))
            .await
            .unwrap_or_else(|e| panic!("server with TLS did not start: {e}"));
        Self {
            handle: Some(handle),
            _dir: dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.handle.as_ref().expect("running").grpc_addr
    }

    async fn stop(mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown(Duration::from_secs(1)).await;
        }
    }
}

/// Connects (TLS when `tls` is given, else plaintext) and sends one request; any failure, or
/// no answer within 10 s, is an `Err` describing it.
async fn ask(addr: SocketAddr, tls: Option<ClientTlsConfig>) -> Result<RateLimitResponse, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Channel::from_shared(format!("{scheme}://{addr}"))
        .expect("uri")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("client TLS config: {e:?}"))?;
    }
    let call = async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        RateLimitServiceClient::new(channel)
            .should_rate_limit(request("tls", vec![desc(&[("route", "api")])]))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| format!("call: {s:?}"))
    };
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .unwrap_or_else(|_| Err("no answer within 10 s".into()))
}

fn trusting(ca: &str) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost")
}

fn assert_answered(answer: Result<RateLimitResponse, String>, who: &str) {
    let r = answer.unwrap_or_else(|e| panic!("{who} must be answered: {e}"));
    assert_eq!(r.overall_code, Code::Ok as i32, "{who}: {r:?}");
    assert_eq!(r.statuses.len(), 1, "{who}: {r:?}");
    assert_eq!(
        r.statuses[0].current_limit,
        Some(limit(10, Unit::Minute, "api/global")),
        "{who}: {r:?}"
    );
}

fn assert_refused(answer: Result<RateLimitResponse, String>, who: &str) {
    match answer {
        Ok(r) => panic!("{who} must get no answer, got {r:?}"),
        Err(e) => println!("{who}: refused as expected ({e})"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trusting_the_ca_is_answered_over_tls() {
    let pki = Pki::new("sluice test CA");
    let server = Tls::start(&pki, false).await;
    assert_answered(
        ask(server.addr(), Some(trusting(&pki.ca))).await,
        "a client trusting the CA (server name localhost)",
    );
    // The certificate also names 127.0.0.1, so a client dialing the address verifies it too.
    assert_answered(
        ask(
            server.addr(),
            Some(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca))),
        )
        .await,
        "a client trusting the CA (server name 127.0.0.1)",
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_do_not_trust_the_server_certificate_get_no_answer() {
    let pki = Pki::new("sluice test CA");
    let other = Pki::new("another CA");
    let server = Tls::start(&pki, false).await;
    assert_refused(
        ask(
            server.addr(),
            Some(ClientTlsConfig::new().domain_name("localhost")),
        )
        .await,
        "a TLS client with no trusted roots",
    );
    assert_refused(
        ask(server.addr(), Some(trusting(&other.ca))).await,
        "a TLS client trusting another CA",
    );
    assert_refused(ask(server.addr(), None).await, "a plaintext client");
    // The server is unharmed by the failed handshakes.
    assert_answered(
        ask(server.addr(), Some(trusting(&pki.ca))).await,
        "a client trusting the CA, after the refused ones",
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_client_ca_file_only_clients_presenting_a_certificate_of_that_ca_are_answered() {
    let pki = Pki::new("sluice test CA");
    let other = Pki::new("another CA");
    let server = Tls::start(&pki, true).await;
    assert_refused(
        ask(server.addr(), Some(trusting(&pki.ca))).await,
        "a client without a certificate",
    );
    assert_refused(
        ask(
            server.addr(),
            Some(
                trusting(&pki.ca)
                    .identity(Identity::from_pem(&other.client.cert, &other.client.key)),
            ),
        )
        .await,
        "a client presenting a certificate of another CA",
    );
    assert_refused(ask(server.addr(), None).await, "a plaintext client");
    assert_answered(
        ask(
            server.addr(),
            Some(trusting(&pki.ca).identity(Identity::from_pem(&pki.client.cert, &pki.client.key))),
        )
        .await,
        "a client presenting a certificate signed by the client CA",
    );
    server.stop().await;
}
