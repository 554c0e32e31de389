//! What an operator meets in production: settings out of range, a limits directory emptied or
//! half-written under a running server, a shutdown, a store error counted once.

mod common;

use std::time::Duration;

use common::metrics::metric;
use common::redis::RedisServer;
use common::rls::*;
use common::run_bounded;
use common::sluice::{Sluice, SluiceProcess, sluice_command};
use common::store::use_redis;
use sluice::config::reload::ReloadOutcome;
use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const LIMITS: &str = r#"
domain: ops
routes:
  - name: api
    global_threshold: { query_per_minute: 2 }
"#;

// ----- settings -----

/// Values that once panicked, wrapped or were taken at their word: each one now stops the
/// binary at start with a message naming the variable and what it may be.
#[test]
fn out_of_range_settings_stop_the_binary_with_a_clear_message_never_a_panic() {
    let cases = [
        (
            "SLUICE_MAX_IN_FLIGHT",
            "4611686018427387904",
            "allowed 1 to 1000000",
        ),
        ("SLUICE_REDIS_DATABASE", "300", "allowed 0 to 255"),
        ("SLUICE_REDIS_POOL_SIZE", "1000000", "allowed 1 to 256"),
        ("SLUICE_MEMORY_MAX_ENTRIES", "0", "allowed 1 to"),
        (
            "SLUICE_REQUEST_MAX_MESSAGE_BYTES",
            "18446744073709551615",
            "allowed 4096 to",
        ),
        ("SLUICE_MEMORY_SWEEP_INTERVAL", "0s", "allowed 100ms to 1h"),
        ("SLUICE_SHUTDOWN_GRACE", "whenever", "SLUICE_SHUTDOWN_GRACE"),
        (
            "SLUICE_REDIS_COMMAND_TIMEOUT",
            "-5ms",
            "SLUICE_REDIS_COMMAND_TIMEOUT",
        ),
        ("SLUICE_FALLBACK_REPLICAS", "-1", "SLUICE_FALLBACK_REPLICAS"),
    ];
    for (var, value, says) in cases {
        let out = run_bounded(
            sluice_command()
                .args(["serve"])
                .env(var, value)
                .env("SLUICE_GRPC_ADDR", "127.0.0.1:0")
                .env("SLUICE_HTTP_ADDR", "127.0.0.1:0"),
            Duration::from_secs(20),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{var}={value} was accepted: {stderr}"
        );
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {stderr}");
        assert!(
            !stderr.contains("panicked"),
            "{var}={value} panicked: {stderr}"
        );
        assert!(
            stderr.contains(var),
            "{var}={value}: the message must name it: {stderr}"
        );
        assert!(
            stderr.contains(says),
            "{var}={value}: expected {says:?} in {stderr}"
        );
    }
}

// ----- reload -----

fn reloads(s: &Sluice, result: &str) -> f64 {
    let page = s.handle().limiter.metrics().render();
    page.lines()
        .filter(|l| l.starts_with("sluice_config_reloads_total") && l.contains(result))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn limited(s: &mut Sluice) -> bool {
    s.status("ops", &[("route", "api")])
        .await
        .current_limit
        .is_some()
}

#[tokio::test]
async fn an_emptied_limits_directory_keeps_the_last_good_limits() {
    let mut s = Sluice::start(&[("ops.yaml", LIMITS)]).await;
    assert!(limited(&mut s).await);
    let failed_before = reloads(&s, "failure");

    // Every file deleted (a ConfigMap mid-update, a volume not mounted): refused.
    std::fs::remove_file(s.dir.path().join("ops.yaml")).expect("remove");
    let outcome = s.handle().reload.reload();
    match &outcome {
        ReloadOutcome::Failed(errors) => {
            let text = errors.to_string();
            assert!(text.contains("no limits"), "{text}");
        }
        other => panic!("an empty directory must not be swapped in: {other:?}"),
    }
    assert!(
        limited(&mut s).await,
        "the last good limits stay in service"
    );
    assert_eq!(reloads(&s, "failure"), failed_before + 1.0);

    // An emptied file (zero bytes) is refused as well.
    std::fs::write(s.dir.path().join("ops.yaml"), "").expect("write");
    assert!(matches!(
        s.handle().reload.reload(),
        ReloadOutcome::Failed(_)
    ));
    assert!(limited(&mut s).await);
    assert_eq!(reloads(&s, "failure"), failed_before + 2.0);

    // Files back: served again, counted as a success.
    std::fs::write(s.dir.path().join("ops.yaml"), LIMITS.replace("2 }", "3 }")).expect("write");
    assert!(matches!(
        s.handle().reload.reload(),
        ReloadOutcome::Reloaded { .. }
    ));
    let status = s.status("ops", &[("route", "api")]).await;
    assert_eq!(status.current_limit.map(|l| l.requests_per_unit), Some(3));
    s.stop().await;
}

#[tokio::test]
async fn a_half_written_limits_file_keeps_the_last_good_limits() {
    let mut s = Sluice::start(&[("ops.yaml", LIMITS)]).await;
    let failed_before = reloads(&s, "failure");
    // The writer stopped in the middle of a line.
    let cut = LIMITS.find("query_per_minute").expect("cut point") + 8;
    std::fs::write(s.dir.path().join("ops.yaml"), &LIMITS[..cut]).expect("write");
    assert!(matches!(
        s.handle().reload.reload(),
        ReloadOutcome::Failed(_)
    ));
    // The writer stopped at the end of a line, before the limit.
    let cut = LIMITS.find("    global_threshold").expect("cut point");
    std::fs::write(s.dir.path().join("ops.yaml"), &LIMITS[..cut]).expect("write");
    assert!(matches!(
        s.handle().reload.reload(),
        ReloadOutcome::Failed(_)
    ));
    let status = s.status("ops", &[("route", "api")]).await;
    assert_eq!(status.current_limit.map(|l| l.requests_per_unit), Some(2));
    assert_eq!(reloads(&s, "failure"), failed_before + 2.0);
    s.stop().await;
}

#[tokio::test]
async fn starting_with_an_empty_directory_serves_and_picks_up_files_later() {
    let mut s = Sluice::start(&[]).await;
    let status = s.status("ops", &[("route", "api")]).await;
    assert_eq!(status.code, Code::Ok as i32);
    assert!(status.current_limit.is_none());
    std::fs::write(s.dir.path().join("ops.yaml"), LIMITS).expect("write");
    assert!(matches!(
        s.handle().reload.reload(),
        ReloadOutcome::Reloaded { .. }
    ));
    assert!(limited(&mut s).await);
    s.stop().await;
}

// ----- shutdown -----

/// Envoy's gRPC health checks (and any client watching) learn of a shutdown when `/readyz`
/// does, not when the connection drops.
#[tokio::test]
async fn shutdown_turns_grpc_health_not_serving_with_readiness() {
    let s = Sluice::start(&[("ops.yaml", LIMITS)]).await;
    let mut health = HealthClient::new(s.channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "envoy.service.ratelimit.v3.RateLimitService".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.next().await.expect("first status").expect("status");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let readiness = s.handle().readiness.clone();
    let stopping = tokio::spawn(s.stop());
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("a status within 5 s")
        .expect("the stream carries the change")
        .expect("status");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    assert!(
        readiness.is_draining(),
        "/readyz turned 503 at the same time"
    );
    tokio::time::timeout(Duration::from_secs(15), stopping)
        .await
        .expect("shutdown finishes")
        .expect("shutdown task");
}

/// SIGTERM with Redis unreachable (so the breaker is open and its probe runs): the process
/// ends on its own, well within the grace period, having stopped its background tasks rather
/// than dropped them.
#[test]
fn sigterm_stops_servers_and_background_tasks_cleanly() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("ops.yaml"), LIMITS).expect("write");
    // Nothing listens there.
    let url = format!("redis://127.0.0.1:{}", common::free_port());
    let mut sluice = SluiceProcess::spawn(
        dir.path(),
        &[
            ("SLUICE_BACKEND", "redis"),
            ("SLUICE_REDIS_URL", &url),
            ("SLUICE_LOG", "info"),
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        sluice.output().contains("circuit breaker open"),
        "{}",
        sluice.output()
    );
    sluice.signal("TERM");
    let status = sluice
        .wait_for_exit(Duration::from_secs(8))
        .unwrap_or_else(|| panic!("no exit within 8 s of SIGTERM\n{}", sluice.output()));
    let output = sluice.output();
    assert!(status.success(), "exit {status:?}\n{output}");
    assert!(
        output.contains("servers and background tasks stopped"),
        "{output}"
    );
    assert!(!output.contains("did not finish"), "{output}");
}

// ----- metrics -----

/// With `fallback: error`, a failed store call is one store error, not one per layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_error_with_fallback_error_is_counted_once() {
    let mut redis = RedisServer::start();
    let limits = r#"
domain: ops
defaults: { timeout: 500ms, fallback: error }
routes:
  - name: api
    global_threshold: { query_per_minute: 100 }
"#;
    let mut s = Sluice::start_with(&[("ops.yaml", limits)], |settings| {
        use_redis(settings, &redis.url());
        // One failure must not open the breaker (which would stop calling the store).
        settings.fallback.failure_threshold = 100;
    })
    .await;
    let ok = s.ask("ops", &[&[("route", "api")]]).await;
    assert_eq!(ok.overall_code, Code::Ok as i32);
    redis.kill9();
    let refused = s
        .send(request("ops", vec![desc(&[("route", "api")])]))
        .await
        .expect_err("fallback: error fails the request");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let page = s.handle().limiter.metrics().render();
    assert_eq!(
        metric(&page, "sluice_store_errors_total"),
        Some(1.0),
        "{}",
        page.lines()
            .filter(|l| l.contains("store_errors"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    s.stop().await;
}
