//! The HTTP side of an in-process server on loopback ports, driven by a
//! `ManualClock`: `/metrics` counts every request and decision exactly and never puts a
//! request value in a label; `/healthz` and `/readyz` say whether to send traffic and why not;
//! `/config` shows every effective setting with the route it came from and no secret;
//! `POST /json` answers like gRPC, with the route's HTTP status, message and quota headers.
//!
//! HTTP is spoken by the kit's tiny HTTP/1.1 client (`common::http`: a plain `TcpStream`, one
//! request per connection, `Connection: close`), so the tests see exactly the bytes a scraper
//! or `curl` would. Time never passes by itself: windows are crossed by moving the clock.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv6Addr, SocketAddr};

use common::http::{HttpResponse, get};
use common::rls::*;
use common::sluice::*;
use serde_json::{Value, json};

/// Limits of the domain `web`, used by every test here.
///
/// - `api`: 10 per minute, rejected with the built-in 429 and the defaults' message.
/// - `api-child` inherits `api`'s limit (counted apart) and timeout, sets its own code (503)
///   and message; `api-grandchild` sets nothing and inherits through `api-child`.
/// - `shadowed`: 5 per minute in shadow mode.
/// - `quiet`: no quota headers.
/// - `keys`: a counter per API key and per client address, with limits too high to reach.
const WEB: &str = r#"
domain: web
defaults:
  show_limit_quota_header: true
  rejected_msg: "Slow down, web"
routes:
  - name: api
    timeout: 20ms
    global_threshold: { query_per_minute: 10 }
  - name: api-child
    parent: api
    rejected_code: 503
    rejected_msg: "Child quota exceeded"
  - name: api-grandchild
    parent: api-child
  - name: shadowed
    shadow_mode: true
    global_threshold: { query_per_minute: 5 }
  - name: quiet
    show_limit_quota_header: false
    global_threshold: { query_per_minute: 100 }
  - name: keys
    rule_items:
      - name: per-key
        limit_by_per_header: x-api-key
        limit_keys:
          - { key: "*", query_per_minute: 1000000 }
      - name: per-ip
        limit_by_per_ip: from-remote-addr
        limit_keys:
          - { key: "0.0.0.0/0", query_per_minute: 1000000 }
          - { key: "::/0", query_per_minute: 1000000 }
"#;

async fn web() -> Sluice {
    Sluice::start(&[("web.yaml", WEB)]).await
}

async fn post_json(addr: SocketAddr, body: &str) -> HttpResponse {
    common::http::post_json(addr, "/json", body).await
}

// ----- the Prometheus text format -----

type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: Labels,
    value: f64,
}

fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(parse_sample)
        .collect()
}

fn not_a_sample(line: &str) -> ! {
    panic!("not a sample line: {line:?}")
}

fn parse_sample(line: &str) -> Sample {
    let name_end = line.find(['{', ' ']).unwrap_or_else(|| not_a_sample(line));
    let name = line[..name_end].to_string();
    let chars: Vec<char> = line[name_end..].chars().collect();
    let mut labels = Labels::new();
    let mut i = 0;
    if chars[0] == '{' {
        i = 1;
        loop {
            match chars.get(i) {
                Some('}') => {
                    i += 1;
                    break;
                }
                Some(',') => i += 1,
                Some(_) => {}
                None => not_a_sample(line),
            }
            if chars.get(i) == Some(&'}') {
                continue;
            }
            let key_start = i;
            while chars.get(i).is_some_and(|c| *c != '=') {
                i += 1;
            }
            let key: String = chars[key_start..i].iter().collect();
            if chars.get(i + 1) != Some(&'"') {
                not_a_sample(line);
            }
            i += 2;
            let mut value = String::new();
            loop {
                match chars.get(i) {
                    Some('\\') => {
                        value.push(match chars.get(i + 1) {
                            Some('n') => '\n',
                            Some(c) => *c,
                            None => not_a_sample(line),
                        });
                        i += 2;
                    }
                    Some('"') => {
                        i += 1;
                        break;
                    }
                    Some(c) => {
                        value.push(*c);
                        i += 1;
                    }
                    None => not_a_sample(line),
                }
            }
            labels.insert(key, value);
        }
    }
    let rest: String = chars[i..].iter().collect();
    let value_text = rest
        .split_whitespace()
        .next()
        .unwrap_or_else(|| not_a_sample(line));
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().unwrap_or_else(|_| not_a_sample(line)),
    };
    Sample {
        name,
        labels,
        value,
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

/// Every series of `name`, by its labels.
fn series(samples: &[Sample], name: &str) -> BTreeMap<Labels, f64> {
    samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| (s.labels.clone(), s.value))
        .collect()
}

fn value_of(samples: &[Sample], name: &str, pairs: &[(&str, &str)]) -> Option<f64> {
    series(samples, name).get(&labels(pairs)).copied()
}

/// The identity (name and labels) of every `sluice_` series.
fn sluice_series(text: &str) -> BTreeSet<String> {
    parse_metrics(text)
        .into_iter()
        .filter(|s| s.name.starts_with("sluice_"))
        .map(|s| format!("{}{:?}", s.name, s.labels))
        .collect()
}

async fn scrape(s: &Sluice) -> String {
    let r = get(s.handle().http_addr, "/metrics").await;
    assert_eq!(r.status, 200, "/metrics: {}", r.body);
    let content_type = r.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain"),
        "/metrics content type: {content_type}"
    );
    r.body
}

// ----- /metrics -----

/// Sends one single-descriptor request to `route` of `web` and checks its code.
async fn hit(s: &mut Sluice, route: &str, expected: Code) {
    let response = s.ask("web", &[&[("route", route)]]).await;
    assert_eq!(
        response.overall_code, expected as i32,
        "route {route}: {response:?}"
    );
}

#[tokio::test]
async fn metrics_count_every_request_and_decision_exactly() {
    let mut s = web().await;

    // api, 10 per minute: 7 ok (remaining 9..3), 3 near the limit (remaining 2, 1, 0, i.e.
    // remaining * 5 <= 10), then 2 over.
    for _ in 0..10 {
        hit(&mut s, "api", Code::Ok).await;
    }
    for _ in 0..2 {
        hit(&mut s, "api", Code::OverLimit).await;
    }
    // api-child counts apart under its own route label, with the rule it inherited.
    for _ in 0..10 {
        hit(&mut s, "api-child", Code::Ok).await;
    }
    hit(&mut s, "api-child", Code::OverLimit).await;
    // shadowed, 5 per minute: 3 ok (remaining 4, 3, 2), 2 near (1, 0), then over but
    // answered OK: shadow.
    for _ in 0..7 {
        hit(&mut s, "shadowed", Code::Ok).await;
    }
    // Two descriptors in one request: one decision each, one request (over).
    let both = s
        .ask("web", &[&[("route", "api")], &[("route", "shadowed")]])
        .await;
    assert_eq!(both.overall_code, Code::OverLimit as i32, "{both:?}");
    // A new window: api is admitted again.
    s.to_next_window(MINUTE);
    hit(&mut s, "api", Code::Ok).await;
    // Per-value rules: the rule's name is the label, never the value.
    let keyed = s
        .ask("web", &[&[("route", "keys"), ("x-api-key", "k-1")]])
        .await;
    assert_eq!(keyed.overall_code, Code::Ok as i32);
    let by_ip = s
        .ask(
            "web",
            &[&[("route", "keys"), ("remote_address", "10.1.2.3")]],
        )
        .await;
    assert_eq!(by_ip.overall_code, Code::Ok as i32);
    // A route the domain does not define: no decision, one unmatched descriptor.
    hit(&mut s, "no-such-route", Code::Ok).await;
    // Unknown domains are answered OK with no limit, counted under `_unknown`.
    for _ in 0..2 {
        let r = s.ask("nowhere", &[&[("route", "api")]]).await;
        assert_eq!(r.overall_code, Code::Ok as i32);
    }
    // Invalid requests: counted under their domain when it is configured, else `_unknown`.
    let empty_domain = s.send(request("", vec![desc(&[("route", "api")])])).await;
    assert_eq!(
        empty_domain.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    let no_descriptors = s.send(request("web", vec![])).await;
    assert_eq!(
        no_descriptors.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );

    let text = scrape(&s).await;
    let samples = parse_metrics(&text);

    let d = |route: &str, rule: &str, decision: &str, n: f64| {
        (
            labels(&[
                ("domain", "web"),
                ("route", route),
                ("rule", rule),
                ("decision", decision),
            ]),
            n,
        )
    };
    let expected_decisions: BTreeMap<Labels, f64> = [
        d("api", "global", "ok", 8.0),
        d("api", "global", "near_limit", 3.0),
        d("api", "global", "over_limit", 3.0),
        d("api-child", "global", "ok", 7.0),
        d("api-child", "global", "near_limit", 3.0),
        d("api-child", "global", "over_limit", 1.0),
        d("shadowed", "global", "ok", 3.0),
        d("shadowed", "global", "near_limit", 2.0),
        d("shadowed", "global", "shadow", 3.0),
        d("keys", "per-key", "ok", 1.0),
        d("keys", "per-ip:0.0.0.0/0", "ok", 1.0),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        series(&samples, "sluice_decisions_total"),
        expected_decisions,
        "sluice_decisions_total in:\n{text}"
    );

    let r =
        |domain: &str, result: &str, n: f64| (labels(&[("domain", domain), ("result", result)]), n);
    // web ok: api 10 + api-child 10 + shadowed 7 + api in the new window 1 + keys 2 +
    // unknown route 1.
    let expected_requests: BTreeMap<Labels, f64> = [
        r("web", "ok", 31.0),
        r("web", "over_limit", 4.0),
        r("web", "invalid", 1.0),
        r("_unknown", "ok", 2.0),
        r("_unknown", "invalid", 1.0),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        series(&samples, "sluice_requests_total"),
        expected_requests,
        "sluice_requests_total in:\n{text}"
    );

    assert_eq!(
        series(&samples, "sluice_descriptors_unmatched_total"),
        [(labels(&[("domain", "web")]), 1.0)].into_iter().collect(),
        "{text}"
    );
    // Every request is timed, whatever its result.
    assert_eq!(
        value_of(&samples, "sluice_request_duration_seconds_count", &[]),
        Some(39.0),
        "{text}"
    );
    assert_eq!(
        value_of(
            &samples,
            "sluice_request_duration_seconds_bucket",
            &[("le", "+Inf")]
        ),
        Some(39.0),
        "{text}"
    );
    // One store batch per request that matched anything: 12 + 11 + 7 + 1 + 1 + 2.
    // (The memory backend has no over-limit cache in front of it: every one reaches it.)
    assert_eq!(
        value_of(
            &samples,
            "sluice_store_duration_seconds_count",
            &[("store", "memory")]
        ),
        Some(34.0),
        "{text}"
    );
    assert_eq!(
        value_of(
            &samples,
            "sluice_config_reloads_total",
            &[("result", "success")]
        ),
        Some(1.0),
        "the initial load counts: {text}"
    );
    s.stop().await;
}

/// SplitMix64, seeded: every run sends the same values.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value no metric name, help text or label could contain by chance.
    fn token(&mut self, prefix: &str) -> String {
        format!("{prefix}{:016x}", self.next())
    }

    /// No zero octet, so no value is a substring of a configured range like `0.0.0.0/0`.
    fn ipv4(&mut self) -> String {
        let b = self.next().to_le_bytes();
        let octet = |x: u8| 1 + x % 254;
        format!(
            "{}.{}.{}.{}",
            octet(b[0]),
            octet(b[1]),
            octet(b[2]),
            octet(b[3])
        )
    }

    /// No zero group, so the canonical text has no `::` and is what was sent.
    fn ipv6(&mut self) -> String {
        let a = self.next();
        let b = self.next();
        let group = |x: u64, i: u32| ((x >> (16 * i)) as u16) | 1;
        Ipv6Addr::new(
            0x2001,
            0x0db8,
            group(a, 0),
            group(a, 1),
            group(a, 2),
            group(b, 0),
            group(b, 1),
            group(b, 2),
        )
        .to_string()
    }
}

/// Values shaped to break out of a label if one ever reached the exposition unescaped.
const HOSTILE: &[&str] = &[
    "evil\"} 1\nsluice_injected_total{a=\"b",
    "x\n# TYPE sluice_injected_total counter\nsluice_injected_total 1",
    "{route=\"sluice_injected\"}",
];

/// Sends every request; all must be answered.
async fn flood(
    mut client: RateLimitServiceClient<tonic::transport::Channel>,
    requests: Vec<RateLimitRequest>,
) {
    for request in requests {
        let shown = format!("{request:?}");
        client
            .should_rate_limit(request)
            .await
            .unwrap_or_else(|e| panic!("refused: {e:?}\n{shown}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn labels_never_carry_request_values() {
    let mut s = web().await;
    let addr = s.handle().http_addr;
    const N: usize = 1500;
    let mut rng = Rng(0x5EED_1AB3);

    let key = |v: &str| request("web", vec![desc(&[("route", "keys"), ("x-api-key", v)])]);
    let ip = |v: &str| {
        request(
            "web",
            vec![desc(&[("route", "keys"), ("remote_address", v)])],
        )
    };
    let domain = |v: &str| request(v, vec![desc(&[("route", "api")])]);
    let route = |v: &str| request("web", vec![desc(&[("route", v)])]);
    // An override on a route the domain lacks: counted under `_none` / `override`.
    let overridden = |v: &str| {
        request(
            "web",
            vec![desc_override(
                &[("route", v)],
                1000,
                RateLimitUnit::Minute,
                None,
            )],
        )
    };
    type Build<'a> = &'a dyn Fn(&str) -> RateLimitRequest;
    let kinds: [(&str, Build<'_>); 6] = [
        ("x-api-key", &key),
        ("remote_address v4", &ip),
        ("remote_address v6", &ip),
        ("domain", &domain),
        ("route", &route),
        ("route with override", &overridden),
    ];

    // Warm up: one request of every kind, so every series the flood can touch exists.
    for (kind, build) in &kinds {
        let value = match *kind {
            "remote_address v4" => rng.ipv4(),
            "remote_address v6" => rng.ipv6(),
            _ => rng.token("warm-"),
        };
        s.call(build(&value)).await;
    }
    let body = json!({"domain": "web", "descriptors": [{"entries": [
        {"key": "route", "value": "keys"}, {"key": "x-api-key", "value": rng.token("warm-json-")}
    ]}]});
    assert_eq!(post_json(addr, &body.to_string()).await.status, 200);
    let first = scrape(&s).await;
    let first_series = sluice_series(&first);

    // The flood: thousands of distinct values of every kind, over gRPC and /json.
    let mut sent: Vec<String> = Vec::new();
    let mut tasks = Vec::new();
    for (kind, build) in &kinds {
        let mut requests = Vec::with_capacity(N + HOSTILE.len());
        for _ in 0..N {
            let value = match *kind {
                "remote_address v4" => rng.ipv4(),
                "remote_address v6" => rng.ipv6(),
                _ => rng.token("v-"),
            };
            requests.push(build(&value));
            sent.push(value);
        }
        if !kind.starts_with("remote_address") {
            for hostile in HOSTILE {
                requests.push(build(hostile));
                sent.push((*hostile).to_string());
            }
        }
        tasks.push(tokio::spawn(flood(s.client.clone(), requests)));
    }
    for task in tasks {
        task.await.expect("flood task");
    }
    let mut json_keys = Vec::new();
    for _ in 0..100 {
        let value = rng.token("json-");
        let body = json!({"domain": "web", "descriptors": [{"entries": [
            {"key": "route", "value": "keys"}, {"key": "x-api-key", "value": value}
        ]}]});
        let r = post_json(addr, &body.to_string()).await;
        assert_eq!(r.status, 200, "{}", r.body);
        json_keys.push(value);
    }
    sent.extend(json_keys);
    assert!(sent.len() > 9000, "{} values sent", sent.len());

    let second = scrape(&s).await;
    let second_series = sluice_series(&second);
    let sample_lines = |text: &str| text.lines().filter(|l| l.starts_with("sluice_")).count();
    assert_eq!(
        sample_lines(&first),
        sample_lines(&second),
        "the number of sluice_ sample lines grew with traffic"
    );
    assert_eq!(sample_lines(&first), first_series.len(), "no series twice");
    assert_eq!(
        first_series.len(),
        second_series.len(),
        "the number of sluice_ series grew with traffic:\nbefore:\n{first}\nafter:\n{second}"
    );
    assert_eq!(
        first_series, second_series,
        "the sluice_ series changed with traffic"
    );
    for (text, when) in [(&first, "first"), (&second, "second")] {
        for value in &sent {
            assert!(
                !text.contains(value.as_str()),
                "request value {value:?} appears in the {when} scrape:\n{text}"
            );
        }
        assert!(
            !text.contains("sluice_injected"),
            "a hostile value reached the {when} scrape:\n{text}"
        );
    }

    // The flood was counted, in the few series the configuration allows.
    let samples = parse_metrics(&second);
    let decided = |route: &str, rule: &str| {
        value_of(
            &samples,
            "sluice_decisions_total",
            &[
                ("domain", "web"),
                ("route", route),
                ("rule", rule),
                ("decision", "ok"),
            ],
        )
    };
    let per_key = (1 + 1 + N + HOSTILE.len() + 100) as f64;
    assert_eq!(decided("keys", "per-key"), Some(per_key), "{second}");
    assert_eq!(
        decided("keys", "per-ip:0.0.0.0/0"),
        Some((1 + N) as f64),
        "{second}"
    );
    assert_eq!(
        decided("keys", "per-ip:::/0"),
        Some((1 + N) as f64),
        "{second}"
    );
    assert_eq!(
        decided("_none", "override"),
        Some((1 + N + HOSTILE.len()) as f64),
        "{second}"
    );
    assert_eq!(
        value_of(
            &samples,
            "sluice_requests_total",
            &[("domain", "_unknown"), ("result", "ok")]
        ),
        Some((1 + N + HOSTILE.len()) as f64),
        "{second}"
    );
    let decision_labels: BTreeSet<(String, String)> = series(&samples, "sluice_decisions_total")
        .keys()
        .map(|l| (l["route"].clone(), l["rule"].clone()))
        .collect();
    assert_eq!(
        decision_labels,
        [
            ("_none", "override"),
            ("keys", "per-key"),
            ("keys", "per-ip:0.0.0.0/0"),
            ("keys", "per-ip:::/0"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect(),
        "{second}"
    );
    s.stop().await;
}

#[tokio::test]
async fn latency_has_sub_millisecond_buckets_and_process_metrics_are_exported() {
    let mut s = web().await;
    for _ in 0..3 {
        hit(&mut s, "api", Code::Ok).await;
    }
    let text = scrape(&s).await;
    let samples = parse_metrics(&text);

    for (name, fixed) in [
        ("sluice_request_duration_seconds", labels(&[])),
        (
            "sluice_store_duration_seconds",
            labels(&[("store", "memory")]),
        ),
    ] {
        let mut buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|x| x.name == format!("{name}_bucket"))
            .map(|x| {
                let mut rest = x.labels.clone();
                let le = rest.remove("le").expect("bucket without le");
                assert_eq!(rest, fixed, "{name} bucket labels");
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or_else(|_| panic!("le {le:?}"))
                };
                (le, x.value)
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let sub_ms = buckets.iter().filter(|(le, _)| *le < 0.001).count();
        assert!(
            sub_ms >= 3,
            "{name} needs buckets below 1 ms to tell fast answers apart; has {buckets:?}"
        );
        assert!(
            buckets.last().is_some_and(|(le, _)| le.is_infinite()),
            "{name} has a +Inf bucket: {buckets:?}"
        );
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{name} buckets are cumulative: {buckets:?}"
        );
        let count = series(&samples, &format!("{name}_count"))
            .get(&fixed)
            .copied();
        assert_eq!(count, Some(3.0), "{name}_count:\n{text}");
        assert_eq!(buckets.last().map(|b| b.1), Some(3.0), "{name} +Inf bucket");
        assert!(
            text.contains(&format!("# TYPE {name} histogram")),
            "{name} is a histogram:\n{text}"
        );
    }

    for name in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        let value = samples
            .iter()
            .find(|x| x.name == name)
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
            .value;
        assert!(value >= 0.0, "{name} = {value}");
    }
    let rss = value_of(&samples, "process_resident_memory_bytes", &[]).unwrap();
    assert!(rss > 1_000_000.0, "resident memory {rss} bytes");
    s.stop().await;
}

// ----- health and readiness -----

#[tokio::test]
async fn healthz_is_live_and_readyz_says_why_it_is_not_ready() {
    let s = web().await;
    let addr = s.handle().http_addr;

    let health = get(addr, "/healthz").await;
    assert_eq!(health.status, 200, "{}", health.body);

    let ready = get(addr, "/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert!(
        ready.body.contains("memory"),
        "/readyz names the store it serves from: {}",
        ready.body
    );

    s.handle().readiness.drain();
    let draining = get(addr, "/readyz").await;
    assert_eq!(draining.status, 503, "{}", draining.body);
    let why = draining.body.to_ascii_lowercase();
    assert!(
        why.contains("shutting down") || why.contains("draining"),
        "/readyz says why it is not ready: {}",
        draining.body
    );
    // Liveness is not readiness: a draining server is still alive.
    assert_eq!(get(addr, "/healthz").await.status, 200);
    s.stop().await;
}

// ----- /config -----

#[tokio::test]
async fn config_shows_effective_settings_and_where_each_came_from() {
    let s = web().await;
    let r = get(s.handle().http_addr, "/config").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{:?}",
        r.headers
    );
    let config = r.json();

    let hash = config["content_hash"].as_str().expect("content_hash");
    assert!(
        hash.len() >= 16 && hash.chars().all(|c| c.is_ascii_hexdigit()),
        "content_hash {hash:?}"
    );
    // Loaded at the manual clock's time.
    assert_eq!(
        config["loaded_at"],
        json!("2023-11-14T00:00:15.250Z"),
        "{config:#}"
    );
    assert_eq!(
        config["settings"]["limits_dir"],
        json!(s.dir.path().display().to_string())
    );
    assert_eq!(config["settings"]["grpc_addr"], json!("127.0.0.1:0"));

    let routes = &config["domains"]["web"]["routes"];
    let setting = |route: &str, name: &str| -> (Value, String) {
        let s = &routes[route]["settings"][name];
        let from = s["from"]
            .as_str()
            .unwrap_or_else(|| panic!("{route}.{name} has no `from`: {routes:#}"));
        (s["value"].clone(), from.to_string())
    };
    let expect = |route: &str, name: &str, value: Value, from: &str| {
        assert_eq!(
            setting(route, name),
            (value, from.to_string()),
            "{route}.{name} in {routes:#}"
        );
    };

    // The parent: its own timeout, the defaults' header and message, built-ins elsewhere.
    expect("api", "timeout", json!("20ms"), "api");
    expect("api", "show_limit_quota_header", json!(true), "defaults");
    expect("api", "rejected_msg", json!("Slow down, web"), "defaults");
    expect("api", "rejected_code", json!(429), "builtin");
    expect("api", "algorithm", json!("fixed_window"), "builtin");
    expect("api", "shadow_mode", json!(false), "builtin");

    // The child: its own code and message; the rest from its parent, the defaults or built-in.
    expect("api-child", "rejected_code", json!(503), "api-child");
    expect(
        "api-child",
        "rejected_msg",
        json!("Child quota exceeded"),
        "api-child",
    );
    expect("api-child", "timeout", json!("20ms"), "api");
    expect(
        "api-child",
        "show_limit_quota_header",
        json!(true),
        "defaults",
    );
    expect("api-child", "algorithm", json!("fixed_window"), "builtin");
    expect("api-child", "shadow_mode", json!(false), "builtin");

    // The grandchild sets nothing: every value names the route it really came from.
    expect("api-grandchild", "rejected_code", json!(503), "api-child");
    expect(
        "api-grandchild",
        "rejected_msg",
        json!("Child quota exceeded"),
        "api-child",
    );
    expect("api-grandchild", "timeout", json!("20ms"), "api");
    expect(
        "api-grandchild",
        "show_limit_quota_header",
        json!(true),
        "defaults",
    );
    expect(
        "api-grandchild",
        "algorithm",
        json!("fixed_window"),
        "builtin",
    );

    expect("shadowed", "shadow_mode", json!(true), "shadowed");
    expect("quiet", "show_limit_quota_header", json!(false), "quiet");

    for (route, limits_from, parent) in [
        ("api", "api", Value::Null),
        ("api-child", "api", json!("api")),
        ("api-grandchild", "api", json!("api-child")),
        ("keys", "keys", Value::Null),
    ] {
        assert_eq!(
            routes[route]["limits_from"],
            json!(limits_from),
            "{route}: {routes:#}"
        );
        assert_eq!(routes[route]["parent"], parent, "{route}: {routes:#}");
        for name in [
            "algorithm",
            "show_limit_quota_header",
            "rejected_code",
            "rejected_msg",
            "shadow_mode",
            "timeout",
        ] {
            let s = &routes[route]["settings"][name];
            assert!(
                s.get("value").is_some() && s["from"].is_string(),
                "{route}.{name} has value and from: {s}"
            );
        }
    }
    assert_eq!(
        routes["api-grandchild"]["limits"]["global_threshold"]["limit"],
        json!(10),
        "{routes:#}"
    );
    s.stop().await;
}

/// Every URL form the Redis backend reads (fred's `Config::from_url`: single, TLS, cluster,
/// sentinel with its own `sentinelPassword`), with the password field set too.
#[tokio::test]
async fn config_never_shows_a_redis_password() {
    const FIELD_SECRET: &str = "field-Secret-9f3a";
    const URL_SECRET: &str = "url-Secret-71c2";
    const SENTINEL_SECRET: &str = "sentinel-Secret-4be8";
    let urls = [
        format!("redis://app:{URL_SECRET}@10.0.0.1:6380/2"),
        format!("rediss://:{URL_SECRET}@redis.internal:6380"),
        format!("redis-cluster://app:{URL_SECRET}@node-1:7000?node=node-2:7001&node=node-3:7002"),
        format!(
            "redis-sentinel://app:{URL_SECRET}@sentinel-1:26379/0?sentinelServiceName=mymaster\
             &node=sentinel-2:26379&sentinelUsername=watcher&sentinelPassword={SENTINEL_SECRET}"
        ),
    ];
    let mut leaks = Vec::new();
    for url in &urls {
        let s = Sluice::start_with(&[("web.yaml", WEB)], |settings| {
            settings.redis.password = Some(FIELD_SECRET.into());
            settings.redis.url = url.clone();
        })
        .await;
        let addr = s.handle().http_addr;
        let config = get(addr, "/config").await;
        assert_eq!(config.status, 200, "{}", config.body);
        let body = config.json();
        assert_eq!(
            body["settings"]["redis"]["password"],
            json!("<redacted>"),
            "{body:#}"
        );
        let shown_url = body["settings"]["redis"]["url"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            shown_url.contains("<redacted>"),
            "the URL shows that it had a password: {shown_url}"
        );
        for path in ["/config", "/metrics", "/readyz", "/healthz"] {
            let r = get(addr, path).await;
            for secret in [FIELD_SECRET, URL_SECRET, SENTINEL_SECRET] {
                if r.body.contains(secret) {
                    leaks.push(format!(
                        "{path} shows {secret:?} for redis.url {url:?} (shown as {shown_url:?})"
                    ));
                }
            }
        }
        s.stop().await;
    }
    assert!(leaks.is_empty(), "passwords shown: {leaks:#?}");
}

// ----- POST /json -----

fn json_request(route: &str) -> String {
    json!({"domain": "web", "descriptors": [{"entries": [{"key": "route", "value": route}]}]})
        .to_string()
}

fn quota_headers(r: &HttpResponse) -> [Option<&str>; 3] {
    [
        r.header("X-RateLimit-Limit"),
        r.header("X-RateLimit-Remaining"),
        r.header("X-RateLimit-Reset"),
    ]
}

#[tokio::test]
async fn json_answers_ok_under_the_limit_and_the_routes_code_over_it() {
    let s = web().await;
    let addr = s.handle().http_addr;

    // 44.750 s left in the minute at the start: X-RateLimit-Reset rounds up to 45.
    for i in 0..10u32 {
        let r = post_json(addr, &json_request("api")).await;
        assert_eq!(r.status, 200, "request {}: {}", i + 1, r.body);
        assert!(
            r.header("content-type")
                .is_some_and(|t| t.starts_with("application/json")),
            "{:?}",
            r.headers
        );
        let body = r.json();
        assert_eq!(body["overallCode"], json!("OK"), "{body:#}");
        let status = &body["statuses"][0];
        assert_eq!(status["code"], json!("OK"), "{body:#}");
        assert_eq!(
            status["currentLimit"]["requestsPerUnit"],
            json!(10),
            "{body:#}"
        );
        assert_eq!(status["currentLimit"]["unit"], json!("MINUTE"), "{body:#}");
        assert_eq!(
            status["currentLimit"]["name"],
            json!("api/global"),
            "{body:#}"
        );
        assert_eq!(
            status["limitRemaining"].as_u64().unwrap_or(0),
            u64::from(9 - i),
            "{body:#}"
        );
        assert_eq!(status["durationUntilReset"], json!("44.750s"), "{body:#}");
        assert!(body.get("rejectedMsg").is_none(), "{body:#}");
        let remaining = (9 - i).to_string();
        assert_eq!(
            quota_headers(&r),
            [Some("10"), Some(remaining.as_str()), Some("45")],
            "{:?}",
            r.headers
        );
    }

    // Over: the route's code (the built-in 429 here), its message, the headers still there.
    let r = post_json(addr, &json_request("api")).await;
    assert_eq!(r.status, 429, "{}", r.body);
    let body = r.json();
    assert_eq!(body["overallCode"], json!("OVER_LIMIT"), "{body:#}");
    assert_eq!(body["statuses"][0]["code"], json!("OVER_LIMIT"), "{body:#}");
    assert_eq!(body["rejectedMsg"], json!("Slow down, web"), "{body:#}");
    assert_eq!(
        quota_headers(&r),
        [Some("10"), Some("0"), Some("45")],
        "{:?}",
        r.headers
    );

    // api-child: its own counter, and its own code and message once over.
    for _ in 0..10 {
        assert_eq!(
            post_json(addr, &json_request("api-child")).await.status,
            200
        );
    }
    let r = post_json(addr, &json_request("api-child")).await;
    assert_eq!(r.status, 503, "{}", r.body);
    let body = r.json();
    assert_eq!(body["overallCode"], json!("OVER_LIMIT"), "{body:#}");
    assert_eq!(
        body["rejectedMsg"],
        json!("Child quota exceeded"),
        "{body:#}"
    );
    assert_eq!(
        quota_headers(&r),
        [Some("10"), Some("0"), Some("45")],
        "{:?}",
        r.headers
    );
    // The grandchild inherits the child's code and message, and counts apart.
    for _ in 0..10 {
        assert_eq!(
            post_json(addr, &json_request("api-grandchild"))
                .await
                .status,
            200
        );
    }
    let r = post_json(addr, &json_request("api-grandchild")).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["rejectedMsg"], json!("Child quota exceeded"));

    // Shadow mode: over, but answered OK with 200.
    for _ in 0..6 {
        let r = post_json(addr, &json_request("shadowed")).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["overallCode"], json!("OK"));
    }

    // Without show_limit_quota_header: no quota headers, even when over.
    let quiet = json!({"domain": "web", "hitsAddend": 100, "descriptors": [{"entries": [
        {"key": "route", "value": "quiet"}]}]});
    let r = post_json(addr, &quiet.to_string()).await;
    assert_eq!(
        r.status, 200,
        "hits_addend 100 reaches the limit: {}",
        r.body
    );
    assert_eq!(quota_headers(&r), [None, None, None], "{:?}", r.headers);
    let r = post_json(addr, &json_request("quiet")).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(quota_headers(&r), [None, None, None], "{:?}", r.headers);

    // An unknown domain is not an error.
    let r = post_json(
        addr,
        r#"{"domain":"nowhere","descriptors":[{"entries":[{"key":"route","value":"r"}]}]}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["overallCode"], json!("OK"));

    // The next window admits again, with the full quota and a full minute to reset.
    s.to_next_window(MINUTE);
    let r = post_json(addr, &json_request("api")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["overallCode"], json!("OK"));
    assert_eq!(
        quota_headers(&r),
        [Some("10"), Some("9"), Some("60")],
        "{:?}",
        r.headers
    );
    // Proto field names are accepted too.
    let r = post_json(
        addr,
        r#"{"domain":"web","hits_addend":2,"descriptors":[{"entries":[{"key":"route","value":"api"}]}]}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.header("X-RateLimit-Remaining"),
        Some("7"),
        "{:?}",
        r.headers
    );
    s.stop().await;
}

/// A request-side `limit` on a route the domain lacks (counted under `_none`): once over, the
/// answer is not a 200; with no route to name a code, the built-in 429.
#[tokio::test]
async fn json_over_limit_without_a_route_is_not_200() {
    let s = web().await;
    let addr = s.handle().http_addr;
    let overridden = json!({"domain": "web", "descriptors": [{
        "entries": [{"key": "route", "value": "unlisted"}],
        "limit": {"requestsPerUnit": 1, "unit": "MINUTE"}
    }]})
    .to_string();
    let r = post_json(addr, &overridden).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["overallCode"], json!("OK"), "{}", r.body);
    let r = post_json(addr, &overridden).await;
    assert_eq!(r.json()["overallCode"], json!("OVER_LIMIT"), "{}", r.body);
    assert_eq!(
        r.status, 429,
        "OVER_LIMIT for a limit override on no configured route: {}",
        r.body
    );
    s.stop().await;
}

#[tokio::test]
async fn json_refuses_malformed_and_invalid_requests_with_a_message() {
    let s = web().await;
    let addr = s.handle().http_addr;
    let cases = [
        ("not JSON", "{\"domain\": \"web\", "),
        ("not an object", "[1, 2, 3]"),
        ("wrong type", r#"{"domain": 5, "descriptors": []}"#),
        (
            "entries not a list",
            r#"{"domain":"web","descriptors":[{"entries":{"key":"route"}}]}"#,
        ),
        ("empty body", ""),
        (
            "empty domain",
            r#"{"domain":"","descriptors":[{"entries":[{"key":"route","value":"api"}]}]}"#,
        ),
        (
            "no domain",
            r#"{"descriptors":[{"entries":[{"key":"route","value":"api"}]}]}"#,
        ),
        ("no descriptors", r#"{"domain":"web","descriptors":[]}"#),
        (
            "empty entries",
            r#"{"domain":"web","descriptors":[{"entries":[]}]}"#,
        ),
    ];
    for (what, body) in cases {
        let r = post_json(addr, body).await;
        assert_eq!(r.status, 400, "{what}: {}", r.body);
        let message = r.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(
            message.len() > 5,
            "{what}: the 400 says what is wrong: {}",
            r.body
        );
        if what.contains("domain") {
            assert!(message.contains("domain"), "{what}: {message}");
        }
    }
    // Nothing was counted against the route.
    let r = post_json(addr, &json_request("api")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("X-RateLimit-Remaining"), Some("9"));
    s.stop().await;
}
