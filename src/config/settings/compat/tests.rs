//! The translation of their variables: URL forms, reports, refusals.

use super::*;

fn from(vars: &[(&str, &str)]) -> Result<Translation, SettingsError> {
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    translate(&move |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
}

#[test]
fn redis_url_forms_become_one_url() {
    assert_eq!(
        redis_url("SINGLE", "redis.redis.svc:6379", false).unwrap(),
        "redis://redis.redis.svc:6379"
    );
    assert_eq!(
        redis_url("sentinel", "mymaster,10.0.0.1:26379,10.0.0.2:26379", true).unwrap(),
        "rediss-sentinel://10.0.0.1:26379/0?sentinelServiceName=mymaster&node=10.0.0.2:26379"
    );
    assert_eq!(
        redis_url("cluster", "a:7000,b:7001,c:7002", false).unwrap(),
        "redis-cluster://a:7000?node=b:7001&node=c:7002"
    );
    assert!(redis_url("single", "nohost", false).is_err());
    assert!(redis_url("sentinel", "mymaster", false).is_err());
    assert!(redis_url("ring", "a:1", false).is_err());
}

#[test]
fn every_set_variable_is_reported_once() {
    let t = from(&[
        ("REDIS_SOCKET_TYPE", "tcp"),
        ("REDIS_URL", "r:6379"),
        ("USE_STATSD", "false"),
        ("STATSD_HOST", "x"),
        ("NEAR_LIMIT_RATIO", "0.9"),
        ("GRPC_PORT", "9000"),
    ])
    .unwrap();
    for name in [
        "REDIS_SOCKET_TYPE",
        "REDIS_URL",
        "USE_STATSD",
        "STATSD_HOST",
        "NEAR_LIMIT_RATIO",
        "GRPC_PORT",
    ] {
        let n = t.notes.iter().filter(|(v, _)| v == name).count();
        assert_eq!(n, 1, "{name}: {:?}", t.notes);
    }
    assert_eq!(t.env["SLUICE_GRPC_ADDR"], "0.0.0.0:9000");
    assert_eq!(t.env["SLUICE_LOG"], "warn");
}

#[test]
fn what_cannot_be_kept_is_an_error_naming_the_variable() {
    for (vars, name) in [
        (vec![("BACKEND_TYPE", "memcache")], "BACKEND_TYPE"),
        (vec![("REDIS_URL", "/var/run/r.sock")], "REDIS_SOCKET_TYPE"),
        (
            vec![
                ("REDIS_SOCKET_TYPE", "tcp"),
                ("CONFIG_TYPE", "GRPC_XDS_DELTA"),
            ],
            "CONFIG_TYPE",
        ),
    ] {
        let err = from(&vars).unwrap_err().to_string();
        assert!(err.contains(name), "{err}");
    }
}
