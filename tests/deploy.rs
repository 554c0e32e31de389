//! The deployment files agree with the code: the Dockerfile copies paths that exist and runs
//! the binary with the ports and health path the server uses; every Kubernetes manifest
//! parses, its ports, probes and environment match the settings, and the ConfigMap's limits
//! load. No container engine runs here, so these checks are what can be proven.

mod common;

use std::path::Path;

use common::repo;
use serde_json::Value;
use sluice::config::Settings;
use sluice::config::settings::Overrides;

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port")
}

fn yaml_documents(path: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn dockerfile_copies_existing_paths_and_matches_binary_ports_and_health_path() {
    let dockerfile = read("Dockerfile");
    let defaults = Settings::default();
    for line in dockerfile.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("COPY ") {
            if rest.starts_with("--from=") {
                continue;
            }
            let parts: Vec<&str> = rest.split_whitespace().collect();
            for source in &parts[..parts.len() - 1] {
                assert!(
                    repo().join(source).exists(),
                    "Dockerfile copies missing {source}"
                );
            }
        }
    }
    assert!(
        dockerfile.contains("--bin sluice"),
        "builds the sluice binary"
    );
    assert!(
        dockerfile.contains("target/release/sluice "),
        "copies the sluice binary"
    );
    let exposed: Vec<u64> = dockerfile
        .lines()
        .filter_map(|l| l.trim().strip_prefix("EXPOSE "))
        .flat_map(|ports| ports.split_whitespace().map(|p| p.parse::<u64>().unwrap()))
        .collect();
    assert!(
        exposed.contains(&port_of(&defaults.grpc_addr)),
        "{exposed:?}"
    );
    assert!(
        exposed.contains(&port_of(&defaults.http_addr)),
        "{exposed:?}"
    );
    let health = format!("127.0.0.1:{}/healthz", port_of(&defaults.http_addr));
    assert!(dockerfile.contains(&health), "HEALTHCHECK on {health}");
    // The settings file it runs with is the example, whose limits dir is copied beside it.
    assert!(dockerfile.contains("--config\", \"/app/config/sluice.yaml\""));
    assert!(dockerfile.contains("COPY config/limits /app/config/limits"));
    assert_eq!(defaults.limits_dir, Path::new("config/limits"));
    let ignore = read(".dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "target"));
}

#[test]
fn deployment_ports_probes_env_and_mounts_match_the_code() {
    let defaults = Settings::default();
    let docs = yaml_documents("config/kubernetes/deployment.yaml");
    let deployment = &docs[0];
    assert_eq!(deployment["kind"], "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 3);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let ports = container["ports"].as_array().unwrap();
    let port = |name: &str| {
        ports
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap()
    };
    assert_eq!(port("grpc"), port_of(&defaults.grpc_addr));
    assert_eq!(port("http"), port_of(&defaults.http_addr));
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "http");
    assert!(container["resources"]["requests"]["cpu"].is_string());

    // Every SLUICE_* variable is a real setting: loading with them must succeed and use them.
    let env: Vec<(String, String)> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let settings = Settings::load(None, lookup, &Overrides::default()).expect("env is valid");
    assert_eq!(settings.fallback.replicas, 3);
    let mount = &container["volumeMounts"][0];
    assert_eq!(mount["mountPath"].as_str(), settings.limits_dir.to_str());
    assert_eq!(
        deployment["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"],
        "sluice-limits"
    );
    // The Redis URL names the Service of redis.yaml.
    let redis_service = yaml_documents("config/kubernetes/redis.yaml")
        .into_iter()
        .find(|d| d["kind"] == "Service")
        .unwrap();
    let name = redis_service["metadata"]["name"].as_str().unwrap();
    let port = redis_service["spec"]["ports"][0]["port"].as_u64().unwrap();
    assert_eq!(settings.redis.url, format!("redis://{name}:{port}"));
}

#[test]
fn service_and_envoy_snippet_point_at_the_grpc_port() {
    let defaults = Settings::default();
    let service = &yaml_documents("config/kubernetes/service.yaml")[0];
    let ports = service["spec"]["ports"].as_array().unwrap();
    let grpc = ports.iter().find(|p| p["name"] == "grpc").unwrap();
    assert_eq!(grpc["port"].as_u64(), Some(port_of(&defaults.grpc_addr)));
    let http = ports.iter().find(|p| p["name"] == "http").unwrap();
    assert_eq!(http["port"].as_u64(), Some(port_of(&defaults.http_addr)));

    let snippet = &yaml_documents("config/kubernetes/envoy-snippet.yaml")[0];
    let cluster = &snippet["clusters"][0];
    let address = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["socket_address"];
    assert_eq!(
        address["port_value"].as_u64(),
        Some(port_of(&defaults.grpc_addr))
    );
    assert!(
        address["address"]
            .as_str()
            .unwrap()
            .starts_with(service["metadata"]["name"].as_str().unwrap())
    );
    let filter = &snippet["http_filters"][0]["typed_config"];
    assert_eq!(
        filter["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"],
        "sluice"
    );
}

#[test]
fn configmap_limits_load_and_match_the_example() {
    let configmap = &yaml_documents("config/kubernetes/configmap.yaml")[0];
    assert_eq!(configmap["metadata"]["name"], "sluice-limits");
    let data = configmap["data"].as_object().unwrap();
    assert!(!data.is_empty());
    for (file, text) in data {
        let text = text.as_str().unwrap();
        let domain = sluice::config::parse_file(Path::new(file), text)
            .unwrap_or_else(|e| panic!("{file}: {e:?}"));
        assert!(!domain.routes().is_empty());
        let example = read(&format!("config/limits/{file}"));
        assert_eq!(
            text, example,
            "{file} in the ConfigMap differs from config/limits"
        );
    }
}

#[test]
fn the_envoy_gateway_patch_swaps_the_ratelimit_image_for_one_that_runs_as_ratelimit() {
    let config = &yaml_documents("config/kubernetes/envoy-gateway-ratelimit.yaml")[0];
    assert_eq!(config["kind"], "ConfigMap");
    assert_eq!(config["metadata"]["name"], "envoy-gateway-config");
    let text = config["data"]["envoy-gateway.yaml"]
        .as_str()
        .expect("envoy-gateway.yaml");
    let gateway: Value = serde_saphyr::from_str(text).expect("EnvoyGateway YAML");
    assert_eq!(gateway["kind"], "EnvoyGateway");
    let patch = &gateway["provider"]["kubernetes"]["rateLimitDeployment"]["patch"];
    assert_eq!(patch["type"], "StrategicMerge");
    let container = &patch["value"]["spec"]["template"]["spec"]["containers"][0];
    // The container name Envoy Gateway gives its rate limit Deployment (a strategic merge
    // matches containers by name).
    assert_eq!(container["name"], "envoy-ratelimit");
    assert!(
        container["image"]
            .as_str()
            .is_some_and(|i| i.contains("sluice"))
    );
    // Its SLUICE_* variables are real settings.
    let env: Vec<(String, String)> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            (
                e["name"].as_str().expect("name").to_string(),
                e["value"].as_str().expect("value").to_string(),
            )
        })
        .collect();
    assert!(env.iter().all(|(k, _)| k.starts_with("SLUICE_")));
    let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    Settings::load(None, lookup, &Overrides::default()).expect("env is valid");
    // Envoy Gateway runs /bin/ratelimit: the image has it, as a link to sluice.
    assert!(
        read("Dockerfile").contains("RUN ln -s /usr/local/bin/sluice /bin/ratelimit"),
        "the Dockerfile links /bin/ratelimit"
    );
}
