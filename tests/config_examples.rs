//! The example files under `config/` load, say what their comments say, and agree with each
//! other (the Envoy bootstrap asks for routes the limits define). A YAML file added under
//! `config/` without a test here fails `every_yaml_example_under_config_has_a_test`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::config::{route, rules};
use common::repo;
use serde_json::Value;
use sluice::config::settings::{Overrides, Settings};
use sluice::config::{LimitBy, LimitSet, RouteLimits, load_dir, parse_file};
use sluice::limiter::{Threshold, Unit};

/// Every YAML file under `config/`, and the test that loads it.
const KNOWN_EXAMPLES: &[(&str, &str)] = &[
    (
        "config/sluice.yaml",
        "settings_example_documents_the_defaults",
    ),
    (
        "config/limits/edge.yaml",
        "limits_examples_load_and_define_the_documented_routes",
    ),
    (
        "config/limits/partners.yaml",
        "limits_examples_load_and_define_the_documented_routes",
    ),
    (
        "config/limits/inflight.yaml",
        "limits_examples_load_and_define_the_documented_routes",
    ),
    (
        "config/envoy/rlqs.yaml",
        "tests/envoy_rlqs.rs: every test runs the real Envoy with it",
    ),
    (
        "config/envoy/stream-end.yaml",
        "tests/envoy_stream_end.rs: every test runs the real Envoy with it",
    ),
    (
        "config/limits-envoy/ratelimit.yaml",
        "envoyproxy_ratelimit_example_loads_in_that_format_as_its_comments_say",
    ),
    (
        "config/envoy/envoy.yaml",
        "envoy_example_asks_the_edge_domain_for_its_routes",
    ),
    (
        "config/prometheus/prometheus.yml",
        "tests/dashboard.rs: prometheus_example_scrapes_sluice_metrics_on_the_http_port",
    ),
    (
        "config/kubernetes/deployment.yaml",
        "tests/deploy.rs: deployment_ports_probes_env_and_mounts_match_the_code",
    ),
    (
        "config/kubernetes/service.yaml",
        "tests/deploy.rs: service_and_envoy_snippet_point_at_the_grpc_port",
    ),
    (
        "config/kubernetes/envoy-snippet.yaml",
        "tests/deploy.rs: service_and_envoy_snippet_point_at_the_grpc_port",
    ),
    (
        "config/kubernetes/configmap.yaml",
        "tests/deploy.rs: configmap_limits_load_and_match_the_example",
    ),
    (
        "config/kubernetes/redis.yaml",
        "tests/deploy.rs: deployment_ports_probes_env_and_mounts_match_the_code",
    ),
    (
        "config/kubernetes/envoy-gateway-ratelimit.yaml",
        "tests/deploy.rs: the_envoy_gateway_patch_swaps_the_ratelimit_image_for_one_that_runs_as_ratelimit",
    ),
];

fn examples() -> LimitSet {
    match load_dir(&repo().join("config/limits")) {
        Ok(set) => set,
        Err(errors) => panic!("config/limits does not load:\n{errors}"),
    }
}

#[test]
fn settings_example_documents_the_defaults() {
    let path = repo().join("config/sluice.yaml");
    let loaded = Settings::load(Some(&path), |_| None, &Overrides::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded, Settings::default());
}

#[test]
fn limits_examples_load_and_define_the_documented_routes() {
    let set = examples();
    let expected: BTreeMap<&str, (&str, BTreeSet<&str>)> = [
        (
            "edge",
            (
                "edge.yaml",
                BTreeSet::from(["api", "api-users", "api-mobile", "login", "search"]),
            ),
        ),
        (
            "partners",
            ("partners.yaml", BTreeSet::from(["reports", "exports"])),
        ),
        (
            "inflight",
            ("inflight.yaml", BTreeSet::from(["slow", "per-user", "llm"])),
        ),
    ]
    .into_iter()
    .collect();
    let domains: BTreeSet<&str> = set.domains.keys().map(String::as_str).collect();
    assert_eq!(domains, expected.keys().copied().collect());
    for (name, (file, routes)) in &expected {
        let domain = set.domain(name).unwrap();
        assert_eq!(domain.name, *name);
        assert_eq!(
            domain.file.file_name().and_then(|f| f.to_str()),
            Some(*file),
            "domain {name}"
        );
        let found: BTreeSet<&str> = domain.routes().keys().map(String::as_str).collect();
        assert_eq!(&found, routes, "routes of {name}");
        assert_eq!(domain.route_key(), Some("route"), "domain {name}");
    }
    assert!(set.domain("edge").unwrap().allow_limit_override);
    assert!(!set.domain("partners").unwrap().allow_limit_override);

    // Each file also loads alone, as `sluice check <file>` would.
    for file in ["edge.yaml", "partners.yaml", "inflight.yaml"] {
        let path = repo().join("config/limits").join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        if let Err(errors) = parse_file(&path, &text) {
            panic!(
                "{file}:\n{}",
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
}

#[test]
fn envoyproxy_ratelimit_example_loads_in_that_format_as_its_comments_say() {
    let dir = repo().join("config/limits-envoy");
    let set = match load_dir(&dir) {
        Ok(set) => set,
        Err(errors) => panic!("config/limits-envoy does not load:\n{errors}"),
    };
    let domains: Vec<&str> = set.domains.keys().map(String::as_str).collect();
    assert_eq!(domains, ["ratelimit"]);
    let domain = set.domain("ratelimit").unwrap();
    assert_eq!(domain.format(), "envoyproxy/ratelimit");
    assert!(domain.routes().is_empty());
    let tree = domain.tree().expect("a descriptor tree");
    // Per descriptor path: the rate (`None` for unlimited), shadow_mode, share_threshold and
    // replaces.
    type Shown<'a> = (Option<Threshold>, bool, bool, Vec<&'a str>);
    let limits: BTreeMap<&str, Shown<'_>> = tree
        .nodes()
        .into_iter()
        .filter_map(|n| {
            let limit = n.limit.as_ref()?;
            Some((
                n.path.as_str(),
                (
                    limit.threshold,
                    n.shadow_mode,
                    n.share_threshold,
                    limit.replaces.iter().map(String::as_str).collect(),
                ),
            ))
        })
        .collect();
    let plain = |limit, unit| (Some(Threshold::new(limit, unit)), false, false, vec![]);
    let expected: BTreeMap<&str, Shown<'_>> = [
        ("database=users", plain(500, Unit::Second)),
        ("database=default", plain(500, Unit::Second)),
        ("message_type=marketing/to_number", plain(5, Unit::Day)),
        ("to_number", plain(100, Unit::Day)),
        ("remote_address", plain(10, Unit::Second)),
        ("remote_address=50.0.0.5", plain(0, Unit::Second)),
        ("ldap", (None, false, false, vec![])),
        (
            "service/user=user-a",
            (Some(Threshold::new(10, Unit::Second)), true, false, vec![]),
        ),
        ("service/user=user-b", plain(20, Unit::Second)),
        (
            "path=/files/*",
            (Some(Threshold::new(1000, Unit::Hour)), false, true, vec![]),
        ),
        ("user", plain(60, Unit::Minute)),
        (
            "plan=enterprise/user",
            (
                Some(Threshold::new(600, Unit::Minute)),
                false,
                false,
                vec!["per_user"],
            ),
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(limits, expected);
    let per_user = tree.nodes().into_iter().find(|n| n.path == "user").unwrap();
    assert_eq!(
        per_user.limit.as_ref().unwrap().name.as_deref(),
        Some("per_user")
    );
}

#[test]
fn edge_example_resolves_delegation_as_its_comments_say() {
    let set = examples();
    let edge = set.domain("edge").unwrap();

    let api = route(edge, "api");
    match api.limits.as_ref() {
        RouteLimits::Global(rule) => {
            assert_eq!(rule.threshold, Threshold::new(1000, Unit::Minute))
        }
        RouteLimits::Items(_) => panic!("api has a global threshold"),
    }
    assert_eq!(
        (
            api.settings.rejected_msg.value.as_str(),
            api.settings.rejected_msg.from.as_str()
        ),
        ("Too many requests, slow down", "defaults")
    );

    // api-mobile sets no limits: api's global threshold, counted apart.
    let mobile = route(edge, "api-mobile");
    assert_eq!(mobile.parent.as_deref(), Some("api"));
    assert_eq!(mobile.limits_from, "api");
    match mobile.limits.as_ref() {
        RouteLimits::Global(rule) => {
            assert_eq!(rule.threshold, Threshold::new(1000, Unit::Minute))
        }
        RouteLimits::Items(_) => panic!("api-mobile inherits api's global threshold"),
    }
    assert_eq!(
        (
            mobile.settings.rejected_msg.value.as_str(),
            mobile.settings.rejected_msg.from.as_str()
        ),
        ("Mobile quota exceeded", "api-mobile")
    );
    // Inherited from `defaults`: off, since the shipped Envoy computes the quota headers.
    assert_eq!(
        (
            mobile.settings.show_limit_quota_header.value,
            mobile.settings.show_limit_quota_header.from.as_str()
        ),
        (false, "defaults")
    );

    // api-users sets its own rule items: api's threshold is not used.
    let users = route(edge, "api-users");
    assert_eq!(users.parent.as_deref(), Some("api"));
    assert_eq!(users.limits_from, "api-users");
    match users.limits.as_ref() {
        RouteLimits::Items(items) => {
            let shape: Vec<(LimitBy, &str, usize)> = items
                .iter()
                .map(|i| (i.kind, i.entry.as_str(), i.keys.len()))
                .collect();
            assert_eq!(
                shape,
                [
                    (LimitBy::PerHeader, "x-api-key", 2),
                    (LimitBy::PerIp { from_header: false }, "remote_address", 3),
                ]
            );
        }
        RouteLimits::Global(_) => panic!("api-users has rule items"),
    }

    let login = route(edge, "login");
    assert_eq!(login.settings.rejected_code.value, 503);
    match login.limits.as_ref() {
        RouteLimits::Items(items) => {
            assert_eq!(items.len(), 1);
            assert_eq!(items[0].kind, LimitBy::PerIp { from_header: true });
            assert_eq!(items[0].entry, "x-forwarded-for");
        }
        RouteLimits::Global(_) => panic!("login has rule items"),
    }

    // search counts and reports but never rejects.
    let search = route(edge, "search");
    assert_eq!(
        (
            search.settings.shadow_mode.value,
            search.settings.shadow_mode.from.as_str()
        ),
        (true, "search")
    );
    for other in ["api", "api-users", "api-mobile", "login"] {
        assert!(!route(edge, other).settings.shadow_mode.value, "{other}");
    }
}

#[test]
fn partners_example_reads_the_documented_descriptor_entries() {
    let set = examples();
    let partners = set.domain("partners").unwrap();
    let shape = |name: &str| -> Vec<(LimitBy, String)> {
        match route(partners, name).limits.as_ref() {
            RouteLimits::Items(items) => items.iter().map(|i| (i.kind, i.entry.clone())).collect(),
            RouteLimits::Global(_) => panic!("{name} has rule items"),
        }
    };
    assert_eq!(
        shape("reports"),
        [
            (LimitBy::Param, "plan".to_string()),
            (LimitBy::PerCookie, "session".to_string()),
            (LimitBy::PerParam, "tenant".to_string()),
        ]
    );
    assert_eq!(
        shape("exports"),
        [
            (LimitBy::Consumer, "consumer".to_string()),
            (LimitBy::PerConsumer, "consumer".to_string()),
            (LimitBy::Header, "region".to_string()),
            (LimitBy::Cookie, "tier".to_string()),
        ]
    );
    for name in ["reports", "exports"] {
        let r = route(partners, name);
        assert_eq!(
            (
                r.settings.rejected_msg.value.as_str(),
                r.settings.rejected_msg.from.as_str()
            ),
            ("Partner quota exceeded", "defaults"),
            "{name}"
        );
    }
    assert_eq!(rules(route(partners, "reports")).len(), 4);
    assert_eq!(rules(route(partners, "exports")).len(), 4);
}

fn envoy_example() -> Value {
    let path = repo().join("config/envoy/envoy.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every object in `v`, depth first.
fn objects<'a>(v: &'a Value, out: &mut Vec<&'a serde_json::Map<String, Value>>) {
    match v {
        Value::Object(map) => {
            out.push(map);
            for child in map.values() {
                objects(child, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|i| objects(i, out)),
        _ => {}
    }
}

#[test]
fn envoy_example_asks_the_edge_domain_for_its_routes() {
    let envoy = envoy_example();
    let mut all = Vec::new();
    objects(&envoy, &mut all);

    let filters: Vec<_> = all
        .iter()
        .filter(|o| o.get("name").and_then(Value::as_str) == Some("envoy.filters.http.ratelimit"))
        .collect();
    assert_eq!(filters.len(), 1, "one rate limit filter");
    assert_eq!(
        filters[0]["typed_config"]["domain"].as_str(),
        Some("edge"),
        "the filter asks the edge domain"
    );

    let set = examples();
    let edge = set.domain("edge").unwrap();
    let values: Vec<&str> = all
        .iter()
        .filter(|o| o.get("descriptor_key").and_then(Value::as_str) == Some("route"))
        .map(|o| {
            o.get("descriptor_value")
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("descriptor_key route without a value: {o:?}"))
        })
        .collect();
    assert!(!values.is_empty(), "the bootstrap names routes");
    for value in &values {
        assert!(
            edge.routes().contains_key(*value),
            "envoy.yaml names route {value:?}, which edge.yaml does not define"
        );
    }
    assert_eq!(edge.route_key(), Some("route"));
}

#[test]
fn envoy_example_sends_the_entries_its_routes_read() {
    let envoy = envoy_example();
    let mut all = Vec::new();
    objects(&envoy, &mut all);
    let set = examples();
    let edge = set.domain("edge").unwrap();

    let mut checked = 0;
    for limit in all.iter().filter_map(|o| o.get("actions")?.as_array()) {
        let mut route_name = None;
        let mut entries = Vec::new();
        for action in limit {
            if let Some(generic) = action.get("generic_key") {
                if generic["descriptor_key"] == "route" {
                    route_name = generic["descriptor_value"].as_str();
                }
            } else if let Some(headers) = action.get("request_headers") {
                entries.push(headers["descriptor_key"].as_str().unwrap().to_string());
            } else if action.get("remote_address").is_some() {
                entries.push("remote_address".to_string());
            } else {
                panic!("action not covered by this test: {action}");
            }
        }
        let name = route_name.expect("every rate_limits entry names its route");
        let route = route(edge, name);
        let read: Vec<&str> = match route.limits.as_ref() {
            RouteLimits::Items(items) => items.iter().map(|i| i.entry.as_str()).collect(),
            RouteLimits::Global(_) => Vec::new(),
        };
        for entry in entries {
            assert!(
                read.contains(&entry.as_str()),
                "envoy.yaml sends entry {entry:?} for route {name:?}, which reads {read:?}"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 3,
        "the example sends per-key and per-address entries"
    );
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

#[test]
fn every_yaml_example_under_config_has_a_test() {
    let root = repo();
    let mut found = Vec::new();
    yaml_files(&root.join("config"), &mut found);
    let found: BTreeSet<String> = found
        .iter()
        .map(|p| {
            p.strip_prefix(&root)
                .unwrap()
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/")
        })
        .collect();
    let known: BTreeSet<String> = KNOWN_EXAMPLES.iter().map(|(p, _)| p.to_string()).collect();
    let untested: Vec<_> = found.difference(&known).collect();
    assert!(
        untested.is_empty(),
        "example files without a test: {untested:?}; load them in a test in \
         tests/config_examples.rs and add them to KNOWN_EXAMPLES"
    );
    let gone: Vec<_> = known.difference(&found).collect();
    assert!(
        gone.is_empty(),
        "KNOWN_EXAMPLES lists files that no longer exist: {gone:?}"
    );
}

/// The shipped Envoy bootstrap carries exactly the `local_reply_config` that
/// `sluice envoy local-reply` prints for the shipped limits, so a route's `rejected_code`
/// (the `login` route's 503) reaches clients through Envoy.
#[test]
fn envoy_example_carries_the_local_reply_block_for_the_example_limits() {
    let limits = load_dir(&repo().join("config/limits")).unwrap_or_else(|e| panic!("{e}"));
    let block = sluice::envoy_snippets::local_reply(&limits, 16).expect("login answers 503");
    assert!(block.contains("exact: 503"), "{block}");
    let envoy = std::fs::read_to_string(repo().join("config/envoy/envoy.yaml")).expect("read");
    assert!(
        envoy.contains(&block),
        "config/envoy/envoy.yaml must carry, under the HTTP connection manager, what \
         `sluice envoy local-reply` prints:\n{block}"
    );
    let out = common::run_bounded(
        common::sluice::sluice_command().args(["envoy", "local-reply"]),
        std::time::Duration::from_secs(20),
    );
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        sluice::envoy_snippets::local_reply(&limits, 0).unwrap_or_default()
    );
}
