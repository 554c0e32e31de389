//! Settings layering, redaction, and every bound.

use super::*;

#[test]
fn flag_beats_environment_beats_file_beats_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sluice.yaml");
    std::fs::write(
        &file,
        "grpc_addr: 127.0.0.1:1\nhttp_addr: 127.0.0.1:2\nlog: warn\n",
    )
    .unwrap();
    let env = |name: &str| match name {
        "SLUICE_HTTP_ADDR" => Some("127.0.0.1:3".to_string()),
        "SLUICE_GRPC_ADDR" => Some("127.0.0.1:4".to_string()),
        "SLUICE_MEMORY_MAX_ENTRIES" => Some("7".to_string()),
        _ => None,
    };
    let flags = Overrides {
        grpc_addr: Some("127.0.0.1:5".into()),
        ..Default::default()
    };
    let s = Settings::load(Some(&file), env, &flags).unwrap();
    assert_eq!(s.grpc_addr, "127.0.0.1:5");
    assert_eq!(s.http_addr, "127.0.0.1:3");
    assert_eq!(s.log, "warn");
    assert_eq!(s.memory.max_entries, 7);
    assert_eq!(s.limits_dir, PathBuf::from("config/limits"));
}

#[test]
fn redaction_hides_passwords_in_fields_and_urls() {
    let mut s = Settings::default();
    s.redis.password = Some("hunter2".into());
    s.redis.url = "redis://app:hunter2@10.0.0.1:6380/2".into();
    let shown = serde_json::to_string(&s.redacted()).unwrap();
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(
        shown.contains("redis://app:<redacted>@10.0.0.1:6380/2"),
        "{shown}"
    );
}

#[test]
fn bad_values_are_named() {
    let env = |name: &str| (name == "SLUICE_MEMORY_MAX_ENTRIES").then(|| "lots".to_string());
    let err = Settings::load(None, env, &Overrides::default()).unwrap_err();
    assert!(
        err.to_string().contains("SLUICE_MEMORY_MAX_ENTRIES"),
        "{err}"
    );
    let err = Settings::load(
        None,
        |n: &str| (n == "SLUICE_BACKEND").then(|| "disk".into()),
        &Overrides::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("disk"), "{err}");
}

fn load_env(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Settings::load(
        None,
        move |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
        &Overrides::default(),
    )
}

/// Every numeric setting: (variable, smallest allowed, largest allowed).
const COUNTS: &[(&str, u64, u64)] = &[
    ("SLUICE_MAX_IN_FLIGHT", 1, 1_000_000),
    ("SLUICE_MEMORY_MAX_ENTRIES", 1, 1 << 30),
    ("SLUICE_REQUEST_MAX_DESCRIPTORS", 1, 1024),
    ("SLUICE_REQUEST_MAX_ENTRIES", 1, 1024),
    ("SLUICE_REQUEST_MAX_KEY_BYTES", 16, 1 << 20),
    ("SLUICE_REQUEST_MAX_MESSAGE_BYTES", 4096, 256 << 20),
    ("SLUICE_REDIS_DATABASE", 0, 255),
    ("SLUICE_REDIS_POOL_SIZE", 1, 256),
    ("SLUICE_FALLBACK_REPLICAS", 1, 100_000),
    ("SLUICE_FALLBACK_FAILURE_THRESHOLD", 1, 1_000_000),
    ("SLUICE_OVER_LIMIT_CACHE_MAX_ENTRIES", 1, 1 << 30),
];

#[test]
fn every_count_setting_is_checked_against_its_range() {
    for &(var, min, max) in COUNTS {
        for ok in [min, max] {
            let value = ok.to_string();
            assert!(
                load_env(&[(var, &value)]).is_ok(),
                "{var}={value} should be accepted"
            );
        }
        let mut bad = vec![max + 1, u64::MAX];
        if min > 0 {
            bad.push(min - 1);
        }
        for wrong in bad {
            let value = wrong.to_string();
            let err = load_env(&[(var, &value)])
                .expect_err(&format!("{var}={value} should be refused"))
                .to_string();
            assert!(err.contains(var), "{var}={value}: {err}");
            assert!(
                err.contains(&format!("{min} to {max}")) || err.contains(&value),
                "{var}={value} names neither the range nor the value: {err}"
            );
        }
    }
}

#[test]
fn the_reported_settings_that_wrapped_or_panicked_are_refused_with_their_range() {
    let err = load_env(&[("SLUICE_MAX_IN_FLIGHT", "4611686018427387904")]).unwrap_err();
    assert!(err.to_string().contains("allowed 1 to 1000000"), "{err}");
    let err = load_env(&[("SLUICE_REDIS_DATABASE", "300")]).unwrap_err();
    assert!(err.to_string().contains("allowed 0 to 255"), "{err}");
    let err = load_env(&[("SLUICE_REDIS_POOL_SIZE", "1000000")]).unwrap_err();
    assert!(err.to_string().contains("allowed 1 to 256"), "{err}");
    // Wider than the field itself: named, not wrapped.
    let err = load_env(&[("SLUICE_REDIS_DATABASE", "4294967596")]).unwrap_err();
    assert!(err.to_string().contains("SLUICE_REDIS_DATABASE"), "{err}");
    let err = load_env(&[("SLUICE_FALLBACK_REPLICAS", "-1")]).unwrap_err();
    assert!(
        err.to_string().contains("SLUICE_FALLBACK_REPLICAS"),
        "{err}"
    );
}

/// Every duration setting: (variable, smallest allowed, largest allowed).
const SPANS: &[(&str, &str, &str)] = &[
    ("SLUICE_LIMITS_POLL_INTERVAL", "100ms", "1h"),
    ("SLUICE_MEMORY_SWEEP_INTERVAL", "100ms", "1h"),
    ("SLUICE_SHUTDOWN_GRACE", "0s", "10m"),
    ("SLUICE_REDIS_CONNECT_TIMEOUT", "10ms", "1m"),
    ("SLUICE_REDIS_COMMAND_TIMEOUT", "1ms", "1m"),
    ("SLUICE_FALLBACK_PROBE_INTERVAL", "10ms", "1m"),
];

#[test]
fn every_duration_setting_is_typed_and_checked_against_its_range() {
    for &(var, min, max) in SPANS {
        for ok in [min, max] {
            assert!(
                load_env(&[(var, ok)]).is_ok(),
                "{var}={ok} should be accepted"
            );
        }
        let above = humantime::parse_duration(max).unwrap() + Duration::from_millis(1);
        let above = humantime::format_duration(above).to_string();
        let min_d = humantime::parse_duration(min).unwrap();
        let mut bad = vec![above, "10 parsecs".to_string(), "".to_string()];
        if !min_d.is_zero() {
            bad.push(humantime::format_duration(min_d / 2).to_string());
        }
        for wrong in &bad {
            let err = load_env(&[(var, wrong)])
                .expect_err(&format!("{var}={wrong:?} should be refused"))
                .to_string();
            assert!(err.contains(var), "{var}={wrong:?}: {err}");
        }
    }
}

#[test]
fn a_settings_file_with_a_bad_duration_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sluice.yaml");
    std::fs::write(&file, "log: info\nredis:\n  command_timeout: soon\n").unwrap();
    let err = Settings::load(Some(&file), |_: &str| None, &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("sluice.yaml:3"), "{err}");
    std::fs::write(&file, "redis:\n  command_timeout: 5ms\n").unwrap();
    let s = Settings::load(Some(&file), |_: &str| None, &Overrides::default()).unwrap();
    assert_eq!(s.redis.command_timeout, Duration::from_millis(5));
}

#[test]
fn the_old_name_of_the_key_bound_is_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sluice.yaml");
    std::fs::write(&file, "request:\n  max_value_bytes: 512\n").unwrap();
    let s = Settings::load(Some(&file), |_: &str| None, &Overrides::default()).unwrap();
    assert_eq!(s.request.max_key_bytes, 512);
}
