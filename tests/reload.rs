//! Hot reload against real files in a temp dir while the server runs: a new domain is served,
//! a broken file keeps the old limits (and is counted and logged), a fix is served, unchanged
//! rules keep their counters, and a Kubernetes-style `..data` symlink swap is picked up from
//! file events alone.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::sluice::{Sluice, SluiceProcess};
use sluice::config::reload::ReloadOutcome;
use sluice::proto::rls::rate_limit_response::Code;

const EDGE: &str = "\
domain: edge
routes:
  - name: api
    global_threshold: { query_per_minute: 3 }
  - name: other
    global_threshold: { query_per_minute: 100 }
";

/// Polls (bounded) until the served content hash differs from `before`.
async fn wait_for_new_limits(sluice: &Sluice, before: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if sluice.handle().limiter.limits().content_hash != before {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

fn hash(sluice: &Sluice) -> String {
    sluice.handle().limiter.limits().content_hash.clone()
}

/// A setting that keeps the poll out of the way, so only file events can trigger.
fn events_only(settings: &mut sluice::config::Settings) {
    settings.limits_poll_interval = std::time::Duration::from_secs(3600);
}

#[tokio::test]
async fn a_new_domain_file_is_served_without_a_restart() {
    let mut sluice = Sluice::start_with(&[("edge.yaml", EDGE)], events_only).await;
    let before = hash(&sluice);
    let status = sluice.status("shop", &[("route", "cart")]).await;
    assert!(status.current_limit.is_none(), "unknown domain before");

    std::fs::write(
        sluice.dir.path().join("shop.yaml"),
        "domain: shop\nroutes:\n  - name: cart\n    global_threshold: { query_per_second: 7 }\n",
    )
    .unwrap();
    assert!(
        wait_for_new_limits(&sluice, &before).await,
        "no reload after a new file"
    );
    let status = sluice.status("shop", &[("route", "cart")]).await;
    assert_eq!(status.current_limit.map(|l| l.requests_per_unit), Some(7));
    assert_eq!(status.limit_remaining, 6);
}

#[tokio::test]
async fn a_broken_file_keeps_the_old_limits_and_a_fix_is_served() {
    let mut sluice = Sluice::start_with(&[("edge.yaml", EDGE)], events_only).await;
    let reload = &sluice.handle().reload;

    let broken = EDGE.replace(
        "query_per_minute: 3 }",
        "query_per_minute: 3, requests: 9, window: 60s }",
    );
    std::fs::write(sluice.dir.path().join("edge.yaml"), &broken).unwrap();
    // Reload explicitly (what SIGHUP does) to read the outcome; file events may race it, and
    // either way the broken set must not be served.
    match reload.reload() {
        ReloadOutcome::Failed(errors) => {
            let text = errors.to_string();
            assert!(text.contains("edge.yaml:4"), "file and line in {text}");
            assert!(text.contains("route \"api\""), "{text}");
        }
        other => panic!("a broken file must fail the reload, got {other:?}"),
    }
    let status = sluice.status("edge", &[("route", "api")]).await;
    assert_eq!(
        status.current_limit.map(|l| l.requests_per_unit),
        Some(3),
        "old limits kept"
    );

    let metrics = sluice.handle().limiter.metrics().render();
    let failures = metrics
        .lines()
        .find(|l| l.starts_with("sluice_config_reloads_total{result=\"failure\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(failures >= 1, "failure counted:\n{metrics}");

    let before = hash(&sluice);
    std::fs::write(
        sluice.dir.path().join("edge.yaml"),
        EDGE.replace("query_per_minute: 3 }", "query_per_minute: 5 }"),
    )
    .unwrap();
    assert!(
        wait_for_new_limits(&sluice, &before).await,
        "fix not picked up"
    );
    let status = sluice.status("edge", &[("route", "api")]).await;
    assert_eq!(status.current_limit.map(|l| l.requests_per_unit), Some(5));
}

#[tokio::test]
async fn counters_of_unchanged_rules_survive_reordering_and_edits_elsewhere() {
    let mut sluice = Sluice::start_with(&[("edge.yaml", EDGE)], events_only).await;
    for expected in [2, 1] {
        let status = sluice.status("edge", &[("route", "api")]).await;
        assert_eq!(status.limit_remaining, expected);
    }
    // Routes reordered, another route retuned, a comment added: `api` is the same rule.
    let edited = "\
# reordered and edited
domain: edge
routes:
  - name: other
    global_threshold: { query_per_minute: 50 }
  - name: api
    global_threshold: { query_per_minute: 3 }
";
    let before = hash(&sluice);
    std::fs::write(sluice.dir.path().join("edge.yaml"), edited).unwrap();
    assert!(wait_for_new_limits(&sluice, &before).await);
    let status = sluice.status("edge", &[("route", "api")]).await;
    assert_eq!(
        status.limit_remaining, 0,
        "the count carried over: third hit of three"
    );
    let status = sluice.status("edge", &[("route", "api")]).await;
    assert_eq!(status.code, Code::OverLimit as i32);
    let other = sluice.status("edge", &[("route", "other")]).await;
    assert_eq!(other.current_limit.map(|l| l.requests_per_unit), Some(50));
}

/// Lays out a directory as Kubernetes mounts a ConfigMap: the files are symlinks into
/// `..data`, itself a symlink to a timestamped directory.
fn configmap_version(dir: &Path, version: &str, text: &str) {
    let target = dir.join(version);
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("edge.yaml"), text).unwrap();
}

#[cfg(unix)]
#[tokio::test]
async fn a_configmap_style_symlink_swap_triggers_a_reload() {
    use std::os::unix::fs::symlink;
    let mut sluice = Sluice::start_with(&[], events_only).await;
    let dir = sluice.dir.path().to_path_buf();
    configmap_version(&dir, "..2026_11_24_10_00_00.1", EDGE);
    symlink("..2026_11_24_10_00_00.1", dir.join("..data")).unwrap();
    symlink("..data/edge.yaml", dir.join("edge.yaml")).unwrap();
    let before = hash(&sluice);
    assert!(
        wait_for_new_limits(&sluice, &before).await,
        "first version not seen"
    );
    let status = sluice.status("edge", &[("route", "api")]).await;
    assert_eq!(status.current_limit.map(|l| l.requests_per_unit), Some(3));

    // The update: a new timestamped dir, a new `..data_tmp` link, renamed over `..data`.
    configmap_version(
        &dir,
        "..2026_11_24_10_05_00.2",
        &EDGE.replace("query_per_minute: 3 }", "query_per_minute: 9 }"),
    );
    symlink("..2026_11_24_10_05_00.2", dir.join("..data_tmp")).unwrap();
    let before = hash(&sluice);
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    assert!(
        wait_for_new_limits(&sluice, &before).await,
        "symlink swap not seen"
    );
    let status = sluice.status("edge", &[("route", "api")]).await;
    assert_eq!(status.current_limit.map(|l| l.requests_per_unit), Some(9));
}

#[cfg(unix)]
#[test]
fn the_binary_logs_a_failed_reload_with_file_and_line_and_survives_sighup() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("edge.yaml"), EDGE).unwrap();
    let limits = dir.path().display().to_string();
    let mut sluice = SluiceProcess::launch(
        &["serve"],
        &[
            ("SLUICE_LIMITS_DIR", &limits),
            ("SLUICE_LIMITS_POLL_INTERVAL", "1h"),
        ],
    );
    sluice.wait_until_accepting(Duration::from_secs(20));
    std::fs::write(
        dir.path().join("edge.yaml"),
        EDGE.replace(
            "query_per_minute: 3 }",
            "query_per_minute: 3, requests: 9, window: 60s }",
        ),
    )
    .unwrap();
    // A file event reloads (and fails); SIGHUP asks again: the process must stay up.
    std::thread::sleep(Duration::from_millis(600));
    sluice.signal("HUP");
    std::thread::sleep(Duration::from_millis(600));
    assert!(sluice.try_wait().is_none(), "SIGHUP must not stop sluice");
    sluice.signal("TERM");
    let status = sluice
        .wait_for_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("still running 10 s after SIGTERM\n{}", sluice.output()));
    let stderr = sluice.stderr();
    assert!(status.success(), "exit after SIGTERM: {status}\n{stderr}");
    let failure = stderr
        .lines()
        .find(|l| l.contains("limits reload failed"))
        .unwrap_or_else(|| panic!("no reload failure logged:\n{stderr}"));
    assert!(failure.contains("edge.yaml:4"), "file and line: {failure}");
    assert!(stderr.contains("SIGHUP"), "SIGHUP logged:\n{stderr}");
}
