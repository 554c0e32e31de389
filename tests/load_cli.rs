//! The `sluice-load` binary against real servers in this process: sluice (manual clock, so
//! the counts are exact) and the no-op baseline (`sluice::server::serve_baseline`), plus the
//! hidden `sluice baseline` subcommand as a process. Every run is a few hundred requests and
//! bounded in time; the JSON report is checked field by field.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice::clock::ManualClock;
use sluice::config::Settings;
use sluice::server::{ServerHandle, serve_baseline, start};
use tempfile::TempDir;

use common::sluice::{SluiceProcess, sluice_command};
use common::{free_port, run_bounded};

const LIMITS: &str = r#"
domain: bench
routes:
  - name: limited
    global_threshold: { query_per_minute: 100 }
  - name: per-key
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - { key: "*", query_per_minute: 1 }
"#;

/// sluice serving [`LIMITS`] with a clock that never moves: no window ends during a run.
async fn sluice() -> (ServerHandle, TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("bench.yaml"), LIMITS).expect("write limits");
    let settings = Settings {
        grpc_addr: "127.0.0.1:0".into(),
        http_addr: "127.0.0.1:0".into(),
        limits_dir: dir.path().to_path_buf(),
        ..Settings::default()
    };
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let handle = start(&settings, clock).await.expect("sluice starts");
    (handle, dir)
}

/// Runs `sluice-load` with `args` (killed past 60 s) and returns its output. The child runs
/// on a blocking thread, so the servers of this process keep answering meanwhile.
async fn load(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        run_bounded(
            Command::new(env!("CARGO_BIN_EXE_sluice-load")).args(&args),
            Duration::from_secs(60),
        )
    })
    .await
    .expect("sluice-load thread")
}

/// Runs `sluice-load --json` against `addr` and returns the parsed report.
async fn load_json(addr: SocketAddr, args: &[&str]) -> Value {
    let target = addr.to_string();
    let mut all = vec![target.as_str(), "--json"];
    all.extend_from_slice(args);
    let out = load(&all).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "sluice-load {all:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn u(report: &Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is not a count: {report}"))
}

/// The latency block: every percentile present, positive and in order.
fn assert_latencies(report: &Value) {
    let latency = &report["latency_ms"];
    let values: Vec<f64> = ["p50", "p90", "p99", "p99_9", "max"]
        .iter()
        .map(|p| {
            latency[p]
                .as_f64()
                .unwrap_or_else(|| panic!("latency_ms.{p} missing: {report}"))
        })
        .collect();
    assert!(values[0] > 0.0, "p50 > 0: {report}");
    assert!(
        values.windows(2).all(|w| w[0] <= w[1]),
        "percentiles in order: {report}"
    );
    assert!(
        latency["mean"].as_f64().is_some_and(|m| m > 0.0),
        "{report}"
    );
    assert!(
        values[4] < 60_000.0,
        "no request can take longer than the run: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_ok_and_over_limit_exactly_against_sluice() {
    let (server, _dir) = sluice().await;
    let report = load_json(
        server.grpc_addr,
        &[
            "-n",
            "300",
            "-c",
            "8",
            "--connections",
            "2",
            "--domain",
            "bench",
            "--descriptor",
            "route=limited",
        ],
    )
    .await;
    assert_eq!(u(&report, "requests"), 300, "{report}");
    assert_eq!(
        u(&report, "ok"),
        100,
        "the limit is 100 per minute: {report}"
    );
    assert_eq!(u(&report, "over_limit"), 200, "{report}");
    assert_eq!(u(&report, "error_count"), 0, "{report}");
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    assert_eq!(u(&report, "concurrency"), 8);
    assert_eq!(u(&report, "connections"), 2);
    assert_eq!(report["domain"], "bench");
    assert!(report["throughput_rps"].as_f64().is_some_and(|t| t > 0.0));
    if cfg!(target_os = "linux") {
        assert!(
            report["client_cpu_s"].as_f64().is_some(),
            "the client's own CPU time: {report}"
        );
    }
    assert_latencies(&report);
    server.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_values_have_the_given_cardinality() {
    let (server, _dir) = sluice().await;
    // Five keys, one request per minute each: exactly five requests pass, whatever the order
    // (300 draws miss one of five values with probability 5 * 0.8^300, about 1e-29).
    let report = load_json(
        server.grpc_addr,
        &[
            "-n",
            "300",
            "-c",
            "4",
            "--domain",
            "bench",
            "--descriptor",
            "route=per-key,x-api-key=key-{rand:5}",
        ],
    )
    .await;
    assert_eq!(u(&report, "requests"), 300, "{report}");
    assert_eq!(u(&report, "ok"), 5, "one per distinct key: {report}");
    assert_eq!(u(&report, "over_limit"), 295, "{report}");
    server.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_counted_by_grpc_code() {
    let (server, _dir) = sluice().await;
    // An empty domain is INVALID_ARGUMENT (Envoy's configuration decides it).
    let report = load_json(server.grpc_addr, &["-n", "200", "-c", "4", "--domain", ""]).await;
    assert_eq!(u(&report, "requests"), 200, "{report}");
    assert_eq!(u(&report, "error_count"), 200, "{report}");
    assert_eq!(
        report["errors"],
        serde_json::json!({"InvalidArgument": 200}),
        "{report}"
    );
    assert_eq!(u(&report, "ok") + u(&report, "over_limit"), 0, "{report}");
    server.shutdown(Duration::from_secs(1)).await;
}

/// The no-op baseline in process: everything is OK, several descriptors included.
async fn baseline() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve_baseline(listener, std::future::pending()));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_baseline_answers_ok_to_everything() {
    let addr = baseline().await;
    let report = load_json(
        addr,
        &[
            "-n",
            "400",
            "-c",
            "16",
            "--connections",
            "4",
            "--domain",
            "anything",
            "--descriptor",
            "route=api,x-api-key={rand:1000}",
            "--descriptor",
            "route=api,remote_address=10.0.0.{rand:256}",
        ],
    )
    .await;
    assert_eq!(u(&report, "requests"), 400, "{report}");
    assert_eq!(u(&report, "ok"), 400, "{report}");
    assert_eq!(
        u(&report, "over_limit") + u(&report, "error_count"),
        0,
        "{report}"
    );
    assert_latencies(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rps_paces_and_duration_bounds_the_run() {
    let addr = baseline().await;
    // 100 requests at 200 per second take about half a second.
    let started = Instant::now();
    let report = load_json(addr, &["-n", "100", "-c", "4", "--rps", "200"]).await;
    assert_eq!(u(&report, "requests"), 100, "{report}");
    let secs = report["duration_s"].as_f64().expect("duration_s");
    assert!(
        (0.45..5.0).contains(&secs),
        "paced run took {secs} s: {report}"
    );
    assert!(started.elapsed() >= Duration::from_millis(450));
    assert_eq!(report["target_rps"].as_f64(), Some(200.0), "{report}");

    // -z ends the run on time; with --rps the count follows the rate.
    let report = load_json(addr, &["-z", "1s", "-c", "2", "--rps", "300"]).await;
    let secs = report["duration_s"].as_f64().expect("duration_s");
    assert!(
        (0.9..3.0).contains(&secs),
        "a 1 s run took {secs} s: {report}"
    );
    let requests = u(&report, "requests");
    // At most the 300 slots of the second; fewer only if this machine is so busy that the
    // workers fall behind the schedule.
    assert!(
        (100..=301).contains(&requests),
        "about 300 requests: {report}"
    );
    assert_eq!(u(&report, "ok"), requests, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_report_and_json_file() {
    let addr = baseline().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("report.json");
    let target = addr.to_string();
    let out = load(&[
        &target,
        "-n",
        "200",
        "-c",
        "4",
        &format!("--json={}", path.display()),
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "requests    200 in",
        "answers     OK 200, OVER_LIMIT 0",
        "errors      0",
        "latency ms  p50",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    // Progress goes to stderr only when it is a terminal; here it is a pipe.
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("report file")).expect("JSON");
    assert_eq!(u(&report, "requests"), 200);
    assert_eq!(u(&report, "ok"), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_and_a_dead_target_fail_clearly() {
    let out = load(&["-c", "0"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = load(&["--descriptor", "route"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("key=value"),
        "{out:?}"
    );

    // Nothing listens there: the run fails at connect, it does not spin.
    let port = free_port();
    let out = load(&[&format!("127.0.0.1:{port}"), "-n", "10"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hidden_baseline_subcommand_serves() {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let _baseline = SluiceProcess::launch(&["baseline", "--grpc-addr", &addr.to_string()], &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "sluice baseline did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = load_json(addr, &["-n", "200", "-c", "4"]).await;
    assert_eq!(u(&report, "ok"), 200, "{report}");

    // Hidden from the help, still there.
    let help = sluice_command()
        .arg("--help")
        .output()
        .expect("sluice --help");
    assert!(!String::from_utf8_lossy(&help.stdout).contains("baseline"));
}
