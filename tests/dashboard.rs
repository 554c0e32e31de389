//! The monitoring examples agree with the server: every metric the Grafana dashboard
//! (`config/grafana/sluice-dashboard.json`) queries is exported by a running sluice, and the
//! Prometheus example (`config/prometheus/prometheus.yml`) scrapes the port and path sluice
//! serves its metrics on by default.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;

use common::repo;
use common::sluice::*;
use regex::Regex;
use serde_json::Value;
use sluice::config::Settings;

const DASHBOARD: &str = "config/grafana/sluice-dashboard.json";
const PROMETHEUS: &str = "config/prometheus/prometheus.yml";

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// Every panel, rows' nested panels included.
fn panels(v: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in v["panels"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        out.push(p);
        out.extend(panels(p));
    }
    out
}

/// `(panel title, expr)` of every query of every panel.
fn exprs(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dashboard) {
        let title = p["title"].as_str().unwrap_or_default();
        for t in p["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: a target without expr: {t}"));
            out.push((title.to_string(), expr.to_string()));
        }
    }
    out
}

/// Metric names in a PromQL expression or a variable query.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let re = Regex::new(r"\b(?:sluice|process)_[a-z_]+").unwrap();
    re.find_iter(expr).map(|m| m.as_str().to_string()).collect()
}

/// A variable query, in either the string or the object form Grafana writes.
fn variable_query(v: &Value) -> Option<&str> {
    v["query"].as_str().or_else(|| v["query"]["query"].as_str())
}

#[test]
fn dashboard_parses_and_queries_through_the_datasource_variable() {
    let d = dashboard();
    let version = d["schemaVersion"].as_u64().expect("schemaVersion");
    assert!(
        (36..=41).contains(&version),
        "schemaVersion {version}, expected about 39"
    );
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(d["uid"].as_str().is_some_and(|t| !t.is_empty()));

    let variables = d["templating"]["list"].as_array().expect("templating.list");
    let datasource = variables
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a `datasource` variable");
    assert_eq!(datasource["type"], "datasource", "{datasource}");
    assert_eq!(datasource["query"], "prometheus", "{datasource}");
    for v in variables.iter().filter(|v| v["type"] == "query") {
        assert_eq!(v["datasource"]["uid"], "${datasource}", "variable {v}");
    }

    let mut ids = BTreeSet::new();
    let mut queried = 0;
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "a panel without a title: {p}");
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("{title}: no id"));
        assert!(ids.insert(id), "panel id {id} ({title}) used twice");
        for key in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][key].is_u64(), "{title}: gridPos.{key}");
        }
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["type"], "prometheus", "{title}");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            if let Some(ds) = t.get("datasource") {
                assert_eq!(ds["uid"], "${datasource}", "{title}: {t}");
            }
        }
        queried += 1;
    }
    assert!(queried >= 11, "{queried} panels with queries");

    // The panels the dashboard promises, by what they query.
    let all: Vec<(String, String)> = exprs(&d);
    let uses = |needle: &str| all.iter().any(|(_, e)| e.contains(needle));
    for metric in [
        "sluice_requests_total",
        "sluice_decisions_total",
        "sluice_request_duration_seconds_bucket",
        "sluice_store_duration_seconds_bucket",
        "sluice_store_errors_total",
        "sluice_fallback_active",
        "sluice_breaker_transitions_total",
        "sluice_over_limit_cache_hits_total",
        "sluice_over_limit_cache_entries",
        "sluice_config_reloads_total",
        "sluice_memory_store_entries",
        "process_resident_memory_bytes",
    ] {
        assert!(uses(metric), "no panel queries {metric}");
    }
    assert!(uses("decision=\"over_limit\""), "an over-limit rate panel");
    for q in ["0.5", "0.9", "0.99"] {
        let found = all.iter().any(|(_, e)| {
            e.contains(&format!("histogram_quantile({q},"))
                && e.contains("sluice_request_duration_seconds_bucket")
        });
        assert!(found, "request latency p{q} panel");
    }
    assert!(
        all.iter()
            .any(|(_, e)| e.contains("histogram_quantile(0.99,")
                && e.contains("sluice_store_duration_seconds_bucket")),
        "store latency p99 panel"
    );
}

const LIMITS: &str = r#"
domain: web
routes:
  - name: api
    global_threshold: { query_per_minute: 2 }
  - name: shadowed
    shadow_mode: true
    global_threshold: { query_per_minute: 1 }
"#;

/// Names exported by `/metrics`: every sample's name, and every `# TYPE` name (so a
/// histogram's base name counts as well as its `_bucket`, `_sum` and `_count`).
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.split_whitespace().next() {
                names.insert(name.to_string());
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

#[tokio::test]
async fn every_metric_on_the_dashboard_is_exported_by_a_running_server() {
    let mut s = Sluice::start(&[("web.yaml", LIMITS)]).await;
    // A few requests: admitted, near the limit, over it, in shadow mode, an unknown domain.
    for _ in 0..3 {
        s.ask("web", &[&[("route", "api")]]).await;
    }
    for _ in 0..2 {
        s.ask("web", &[&[("route", "shadowed")]]).await;
    }
    s.ask("elsewhere", &[&[("route", "api")]]).await;

    let r = common::http::get(s.handle().http_addr, "/metrics").await;
    let text = r.body;
    assert_eq!(r.status, 200, "{text}");
    let exported = exported_names(&text);

    let d = dashboard();
    let mut checked = BTreeSet::new();
    let mut missing = Vec::new();
    let variables = d["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let variable_queries = variables.iter().filter_map(|v| {
        variable_query(v).map(|q| (format!("variable {}", v["name"]), q.to_string()))
    });
    for (place, expr) in exprs(&d).into_iter().chain(variable_queries) {
        for name in metric_names(&expr) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(&name);
            if !exported.contains(&name) && !exported.contains(base) {
                missing.push(format!("{place}: {name}"));
            }
            checked.insert(name);
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the server does not export: {missing:#?}\n/metrics:\n{text}"
    );
    assert!(checked.len() >= 12, "metrics checked: {checked:?}");
    s.stop().await;
}

// ----- Prometheus -----

#[test]
fn prometheus_example_scrapes_sluice_metrics_on_the_http_port() {
    let config: Value =
        serde_saphyr::from_str(&read(PROMETHEUS)).unwrap_or_else(|e| panic!("{PROMETHEUS}: {e}"));
    let http_port = Settings::default()
        .http_addr
        .parse::<SocketAddr>()
        .expect("default http_addr")
        .port();
    assert_eq!(http_port, 8080);

    let jobs = config["scrape_configs"]
        .as_array()
        .expect("scrape_configs is a list");
    let sluice: Vec<&Value> = jobs
        .iter()
        .filter(|j| j["job_name"].as_str().is_some_and(|n| n.contains("sluice")))
        .collect();
    assert_eq!(sluice.len(), 1, "one sluice job: {jobs:?}");
    let job = sluice[0];
    // Prometheus's default path is /metrics too, but the example says it.
    assert_eq!(job["metrics_path"], "/metrics", "{job}");
    assert!(
        job["scheme"].is_null() || job["scheme"] == "http",
        "sluice serves plain HTTP: {job}"
    );
    let targets: Vec<String> = job["static_configs"]
        .as_array()
        .expect("static_configs")
        .iter()
        .flat_map(|c| c["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            t.as_str()
                .unwrap_or_else(|| panic!("target {t} is a string"))
                .to_string()
        })
        .collect();
    assert!(!targets.is_empty(), "{job}");
    for target in &targets {
        let port = target
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .unwrap_or_else(|| panic!("target {target:?} names a port"));
        assert_eq!(
            port, http_port,
            "target {target} scrapes sluice's HTTP port (http_addr)"
        );
    }
}
