//! The real `sluice` binary as an operator runs it: `sluice serve` from the repository root
//! with no flags serves `config/limits` in memory, answers Envoy, and exits 0 on SIGTERM;
//! `sluice version` prints the version; broken limits stop `serve` with the file and route.

mod common;

use std::time::Duration;

use common::sluice::{SluiceProcess, sluice_command};
use sluice::proto::descriptor::RateLimitDescriptor;
use sluice::proto::descriptor::rate_limit_descriptor::Entry;
use sluice::proto::rls::RateLimitRequest;
use sluice::proto::rls::rate_limit_response::Code;
use sluice::proto::rls::rate_limit_response::rate_limit::Unit;
use sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_no_flags_answers_envoy_and_exits_cleanly_on_sigterm() {
    // No flags: everything but the two addresses comes from the defaults. The HTTP port is
    // moved off 8080 only so the test cannot collide with anything else on the machine.
    let mut server = SluiceProcess::launch(&["serve"], &[]);
    server.wait_until_accepting(Duration::from_secs(30));
    let addr = server.grpc_addr;

    let mut client = RateLimitServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let response = client
        .should_rate_limit(RateLimitRequest {
            domain: "edge".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry {
                    key: "route".into(),
                    value: "api".into(),
                }],
                ..Default::default()
            }],
            hits_addend: 0,
        })
        .await
        .expect("ShouldRateLimit")
        .into_inner();
    assert_eq!(response.overall_code, Code::Ok as i32, "{response:?}");
    assert_eq!(response.statuses.len(), 1);
    let status = &response.statuses[0];
    assert_eq!(status.code, Code::Ok as i32);
    let limit = status.current_limit.as_ref().expect("current_limit");
    assert_eq!(limit.requests_per_unit, 1000, "{limit:?}");
    assert_eq!(limit.unit, Unit::Minute as i32, "{limit:?}");
    assert_eq!(limit.name, "api/global");
    assert_eq!(status.limit_remaining, 999);

    // SIGTERM, as Kubernetes and systemd send it; the client connection is still open.
    server.signal("TERM");
    let exit = tokio::task::block_in_place(|| server.wait_for_exit(Duration::from_secs(5)));
    let (out, err) = (server.stdout(), server.stderr());
    let exit = exit.unwrap_or_else(|| panic!("still running 5 s after SIGTERM\nstderr: {err}"));
    assert!(
        exit.success(),
        "exit after SIGTERM: {exit}\nstdout: {out}\nstderr: {err}"
    );
    drop(client);
}

#[test]
fn version_prints_the_crate_version() {
    let out = sluice_command()
        .arg("version")
        .output()
        .expect("run sluice version");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.trim(),
        format!("sluice {}", env!("CARGO_PKG_VERSION"))
    );

    let out = sluice_command()
        .arg("--version")
        .output()
        .expect("run sluice --version");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")),
        "{out:?}"
    );
}

#[test]
fn serve_with_broken_limits_exits_non_zero_naming_file_and_route() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.yaml");
    std::fs::write(
        &file,
        r#"domain: broken
routes:
  - name: fine
    global_threshold: { query_per_minute: 10 }
  - name: both-kinds
    global_threshold: { query_per_minute: 10 }
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - { key: "*", query_per_second: 1 }
"#,
    )
    .unwrap();
    let limits = dir.path().display().to_string();
    let mut server = SluiceProcess::launch(&["serve"], &[("SLUICE_LIMITS_DIR", &limits)]);
    let exit = server.wait_for_exit(Duration::from_secs(20));
    let (out, err) = (server.stdout(), server.stderr());
    let exit =
        exit.unwrap_or_else(|| panic!("sluice kept running with broken limits\nstderr: {err}"));
    assert!(
        !exit.success(),
        "exit {exit} with broken limits\nstderr: {err}"
    );
    let text = format!("{out}{err}");
    assert!(
        text.contains("broken.yaml"),
        "the file is not named:\n{text}"
    );
    assert!(
        text.contains("both-kinds"),
        "the route is not named:\n{text}"
    );
    assert!(
        text.contains("global_threshold") && text.contains("rule_items"),
        "the problem is not named:\n{text}"
    );
}
