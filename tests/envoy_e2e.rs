//! End to end with the real Envoy binary: what Envoy 1.40 does with sluice's answers.
//!
//! Each test runs, on free loopback ports: a tiny upstream HTTP server (200 "upstream" to
//! anything), sluice in process (`sluice::server::start`, real clock) serving limits written
//! for the test, and Envoy (`$SLUICE_ENVOY_BIN`) with `config/envoy/envoy.yaml`, its ports
//! substituted and, where a test needs it, one setting changed (all from `common::envoy`).
//! The kit's HTTP/1.1 client then talks to Envoy's listener as a user would.
//!
//! Also here: the bytes of one real `ShouldRateLimit` request, captured by pointing Envoy's
//! rate limit cluster at a raw HTTP/2 server, decoded with sluice's vendored protos and kept as
//! `tests/fixtures/envoy_1_40_request.bin`; the fixture test runs everywhere, without Envoy.
//!
//! Without `SLUICE_ENVOY_BIN` the Envoy tests fail and say how to get Envoy (`scripts/test.sh`
//! installs it and sets the variable); they never pass without running. Every process is
//! killed when its test ends, also on panic; every wait is bounded.

mod common;

use std::time::Duration;

use common::envoy::{
    Envoy, Ports, envoy_bin, envoy_config, replace_once, start_h2_server, start_upstream,
    without_draft_headers,
};
use common::http::HttpResponse;
use common::sluice::LiveSluice;
use common::{free_port, now_ms, repo_path};
use prost::Message;
use sluice::proto::descriptor::RateLimitDescriptor;
use sluice::proto::descriptor::rate_limit_descriptor::Entry;
use sluice::proto::rls::rate_limit_response::Code;
use sluice::proto::rls::{RateLimitRequest, RateLimitResponse};
use tokio::sync::mpsc;

const FIXTURE: &str = "tests/fixtures/envoy_1_40_request.bin";

// ----- the stack -----

/// Everything one test needs: upstream, sluice, Envoy.
struct Stack {
    sluice: LiveSluice,
    envoy: Envoy,
}

impl Stack {
    async fn start(
        limits: &str,
        failure_mode_deny: bool,
        edit: impl FnOnce(String) -> String,
    ) -> Self {
        // Fails here, before anything starts, when Envoy is missing.
        envoy_bin();
        let upstream = start_upstream().await;
        let sluice = LiveSluice::start(&[("edge.yaml", limits)]).await;
        let ports = Ports {
            listener: free_port(),
            upstream,
            rls: sluice.grpc_port(),
            admin: free_port(),
        };
        let config = envoy_config(&ports, failure_mode_deny, edit);
        let envoy = Envoy::start(&config, ports.listener).await;
        Self { sluice, envoy }
    }
}

// ----- time -----

/// Seconds left in the current minute window (windows are aligned to the epoch).
fn seconds_left_in_minute() -> f64 {
    (60_000 - now_ms() % 60_000) as f64 / 1000.0
}

/// The limits here count per minute on the real clock, in windows aligned to the epoch. If the
/// requests of one test straddled a minute boundary, the counter would restart mid-test and a
/// request meant to be rejected would pass. A test sends its few requests in well under 10 s,
/// so with less than 10 s left in this minute it first waits for the next one.
async fn avoid_minute_boundary() {
    let left = 60_000 - now_ms() % 60_000;
    if left < 10_000 {
        tokio::time::sleep(Duration::from_millis(left + 100)).await;
    }
}

// ----- the tests -----

/// Two routes: `/` (route `api`, quota headers on) and `/search` (route `search`, off).
const QUOTA_LIMITS: &str = r#"
domain: edge
defaults:
  rejected_msg: "Too many requests, slow down"
routes:
  - name: api
    show_limit_quota_header: true
    rejected_msg: "api quota exhausted"
    global_threshold: { query_per_minute: 3 }
  - name: search
    show_limit_quota_header: false
    global_threshold: { query_per_minute: 2 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_pass_until_the_limit_then_429_with_rejected_msg_and_quota_headers() {
    // Envoy's draft headers off: every x-ratelimit-* header below comes from sluice.
    let stack = Stack::start(QUOTA_LIMITS, false, without_draft_headers).await;
    avoid_minute_boundary().await;

    // show_limit_quota_header on: sluice's headers reach the client on OK and on OVER_LIMIT.
    for i in 1..=3u32 {
        let r = stack.envoy.get("/", &[]).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "upstream"),
            "request {i}: {r:?}"
        );
        assert_eq!(r.header("x-envoy-ratelimited"), None, "{r:?}");
        assert_eq!(r.header("x-ratelimit-limit"), Some("3"), "{r:?}");
        assert_eq!(
            r.header("x-ratelimit-remaining"),
            Some((3 - i).to_string().as_str()),
            "{r:?}"
        );
        let reset: f64 = r
            .header("x-ratelimit-reset")
            .expect("reset")
            .parse()
            .expect("number");
        assert!(
            (reset - seconds_left_in_minute()).abs() <= 1.5,
            "x-ratelimit-reset {reset} should be the seconds left in this minute: {r:?}"
        );
    }
    for _ in 0..2 {
        let r = stack.envoy.get("/", &[]).await;
        assert_eq!(r.status, 429, "{r:?}");
        assert_eq!(
            r.body, "api quota exhausted",
            "the route's rejected_msg: {r:?}"
        );
        assert_eq!(r.header("x-envoy-ratelimited"), Some("true"), "{r:?}");
        assert_eq!(r.header("x-ratelimit-limit"), Some("3"), "{r:?}");
        assert_eq!(r.header("x-ratelimit-remaining"), Some("0"), "{r:?}");
    }

    // show_limit_quota_header off: the same answers, without quota headers; the rejected_msg
    // is inherited from defaults.
    for i in 1..=2 {
        let r = stack.envoy.get("/search", &[]).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "upstream"),
            "search {i}: {r:?}"
        );
        assert!(
            !r.has_header_starting_with("x-ratelimit-"),
            "no quota headers when off: {r:?}"
        );
    }
    let r = stack.envoy.get("/search", &[]).await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.body, "Too many requests, slow down", "{r:?}");
    assert_eq!(r.header("x-envoy-ratelimited"), Some("true"), "{r:?}");
    assert!(
        !r.has_header_starting_with("x-ratelimit-"),
        "no quota headers when off: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_draft_headers_agree_with_sluice_statuses() {
    let limits = r#"
domain: edge
defaults: { show_limit_quota_header: false }
routes:
  - name: api
    global_threshold: { query_per_minute: 5 }
"#;
    // The example bootstrap as it is: enable_x_ratelimit_headers: DRAFT_VERSION_03.
    let stack = Stack::start(limits, false, |c| c).await;
    avoid_minute_boundary().await;
    // Envoy writes the limit of the descriptor with the least remaining, then each limited
    // descriptor's quota policy: limit, window in seconds (from unit and unit_multiplier) and
    // current_limit.name (sluice: route/rule).
    let policy = r#"5, 5;w=60;name="api/global""#;
    for i in 1..=5u32 {
        let r = stack.envoy.get("/", &[]).await;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        assert_eq!(r.header("x-ratelimit-limit"), Some(policy), "{r:?}");
        assert_eq!(
            r.header("x-ratelimit-remaining"),
            Some((5 - i).to_string().as_str()),
            "{r:?}"
        );
        let reset: f64 = r
            .header("x-ratelimit-reset")
            .expect("reset")
            .parse()
            .expect("number");
        assert!(
            (reset - seconds_left_in_minute()).abs() <= 1.5,
            "x-ratelimit-reset {reset} should be sluice's duration_until_reset: {r:?}"
        );
    }
    let r = stack.envoy.get("/", &[]).await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.header("x-envoy-ratelimited"), Some("true"), "{r:?}");
    assert_eq!(r.header("x-ratelimit-limit"), Some(policy), "{r:?}");
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"), "{r:?}");
    assert_eq!(
        r.body, "Too many requests",
        "the built-in rejected_msg: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptors_from_route_header_and_remote_address_select_the_right_rule() {
    // `/users` sends [route=api-users, x-api-key=K] and [route=api-users,
    // remote_address=127.0.0.1]; `/` sends [route=api].
    let limits = r#"
domain: edge
defaults: { show_limit_quota_header: false }
routes:
  - name: api
    global_threshold: { query_per_minute: 100 }
  - name: api-users
    rejected_msg: "users quota exhausted"
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - { key: "*", name: per-key, query_per_minute: 2 }
      - limit_by_per_ip: from-remote-addr
        limit_keys:
          - { key: "10.0.0.0/8", name: private, query_per_minute: 100 }
          - { key: "127.0.0.0/8", name: loopback, query_per_minute: 5 }
"#;
    let stack = Stack::start(limits, false, |c| c).await;
    avoid_minute_boundary().await;
    let both = r#"2;w=60;name="api-users/per-key", 5;w=60;name="api-users/loopback""#;
    let users = |key: &'static str| users(&stack.envoy, key);

    // Key a: its own counter of 2. The address counter (5 for 127.0.0.0/8) counts every request.
    for remaining in [1, 0] {
        let r = users("a").await;
        assert_eq!((r.status, r.body.as_str()), (200, "upstream"), "{r:?}");
        assert_eq!(
            r.header("x-ratelimit-limit"),
            Some(format!("2, {both}").as_str()),
            "{r:?}"
        );
        assert_eq!(
            r.header("x-ratelimit-remaining"),
            Some(remaining.to_string().as_str())
        );
    }
    let r = users("a").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (429, "users quota exhausted"),
        "{r:?}"
    );
    assert_eq!(r.header("x-envoy-ratelimited"), Some("true"), "{r:?}");

    // Key b has a counter of its own: a's being over does not touch it.
    for _ in 0..2 {
        let r = users("b").await;
        assert_eq!(r.status, 200, "key b is independent of key a: {r:?}");
    }
    // The address has now sent 5 requests: key c has quota left, the per-IP rule (127.0.0.0/8,
    // not 10.0.0.0/8) does not, so Envoy reports the address's limit as the tightest.
    let r = users("c").await;
    assert_eq!(r.status, 429, "the per-IP rule applies to 127.0.0.1: {r:?}");
    assert_eq!(
        r.header("x-ratelimit-limit"),
        Some(format!("5, {both}").as_str()),
        "{r:?}"
    );
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"), "{r:?}");

    // Without the header Envoy drops the header descriptor: only the address is asked.
    let r = stack.envoy.get("/users", &[]).await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(
        r.header("x-ratelimit-limit"),
        Some(r#"5, 5;w=60;name="api-users/loopback""#),
        "{r:?}"
    );

    // The generic_key of `/` names another route with a counter of its own.
    let r = stack.envoy.get("/", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "upstream"), "{r:?}");
    assert_eq!(
        r.header("x-ratelimit-limit"),
        Some(r#"100, 100;w=60;name="api/global""#),
        "{r:?}"
    );
    assert_eq!(r.header("x-ratelimit-remaining"), Some("99"), "{r:?}");
}

async fn users(envoy: &Envoy, key: &str) -> HttpResponse {
    envoy.get("/users", &[("x-api-key", key)]).await
}

const ONE_PER_MINUTE: &str = r#"
domain: edge
routes:
  - name: api
    global_threshold: { query_per_minute: 1 }
"#;

/// Proves sluice is wired in (200 then 429), stops it, and returns the answer to the next
/// request, which Envoy must decide on its own.
async fn answer_with_sluice_down(failure_mode_deny: bool) -> HttpResponse {
    let mut stack = Stack::start(ONE_PER_MINUTE, failure_mode_deny, |c| c).await;
    avoid_minute_boundary().await;
    let r = stack.envoy.get("/", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = stack.envoy.get("/", &[]).await;
    assert_eq!(r.status, 429, "sluice answers while it runs: {r:?}");

    stack.sluice.stop().await;
    let r = stack.envoy.get("/", &[]).await;
    assert_eq!(r.header("x-envoy-ratelimited"), None, "{r:?}");
    assert!(
        !r.has_header_starting_with("x-ratelimit-"),
        "nothing from sluice: {r:?}"
    );
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_down_with_failure_mode_deny_false_lets_requests_through() {
    let r = answer_with_sluice_down(false).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "upstream"),
        "fail open: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_down_with_failure_mode_deny_true_answers_500() {
    let r = answer_with_sluice_down(true).await;
    assert_eq!(r.status, 500, "fail closed: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rls_port_closed_follows_failure_mode_deny() {
    envoy_bin();
    let upstream = start_upstream().await;
    for (deny, expected) in [(false, 200), (true, 500)] {
        // Nothing ever listened on this port: every RLS call fails to connect.
        let ports = Ports {
            listener: free_port(),
            upstream,
            rls: free_port(),
            admin: free_port(),
        };
        let envoy = Envoy::start(&envoy_config(&ports, deny, |c| c), ports.listener).await;
        let r = envoy.get("/", &[]).await;
        assert_eq!(r.status, expected, "failure_mode_deny: {deny}: {r:?}");
    }
}

// ----- the bytes of a real Envoy request -----

/// One gRPC call received by the capture server.
struct Captured {
    path: String,
    content_type: String,
    /// The gRPC message: the body without its 5-byte length prefix.
    message: Vec<u8>,
}

/// A raw HTTP/2 server that records each gRPC request it gets and answers
/// `RateLimitResponse { overall_code: OK }`.
async fn start_capture_server() -> (u16, mpsc::Receiver<Captured>) {
    let (tx, rx) = mpsc::channel(16);
    let port = start_h2_server(move |(request, respond)| {
        let tx = tx.clone();
        async move {
            let _ = answer_capture(request, respond, tx).await;
        }
    })
    .await;
    (port, rx)
}

async fn answer_capture(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<bytes::Bytes>,
    tx: mpsc::Sender<Captured>,
) -> Result<(), h2::Error> {
    let (parts, mut body) = request.into_parts();
    let mut raw = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        raw.extend_from_slice(&chunk);
    }
    let response = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())
        .expect("response head");
    let mut send = respond.send_response(response, false)?;
    let answer = RateLimitResponse {
        overall_code: Code::Ok as i32,
        ..Default::default()
    }
    .encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(answer.len() as u32).to_be_bytes());
    frame.extend_from_slice(&answer);
    send.send_data(bytes::Bytes::from(frame), false)?;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    send.send_trailers(trailers)?;

    // gRPC length-prefixed message: compressed flag (0), 4-byte big-endian length, message.
    let message = match raw.as_slice() {
        [0, a, b, c, d, rest @ ..]
            if u32::from_be_bytes([*a, *b, *c, *d]) as usize == rest.len() =>
        {
            rest.to_vec()
        }
        _ => panic!("not one uncompressed gRPC message: {raw:?}"),
    };
    let _ = tx
        .send(Captured {
            path: parts.uri.path().to_string(),
            content_type: parts
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            message,
        })
        .await;
    Ok(())
}

/// What Envoy sends for `GET /users` with `x-api-key: key-1` when the first `rate_limits`
/// entry of the route carries `hits_addend: {number: 3}`.
fn assert_is_the_captured_request(message: &[u8]) {
    let request = RateLimitRequest::decode(message).expect("decodes as RateLimitRequest");
    let entry = |k: &str, v: &str| Entry {
        key: k.into(),
        value: v.into(),
    };
    assert_eq!(
        request,
        RateLimitRequest {
            domain: "edge".into(),
            descriptors: vec![
                RateLimitDescriptor {
                    entries: vec![entry("route", "api-users"), entry("x-api-key", "key-1")],
                    hits_addend: Some(3),
                    ..Default::default()
                },
                RateLimitDescriptor {
                    entries: vec![
                        entry("route", "api-users"),
                        entry("remote_address", "127.0.0.1")
                    ],
                    ..Default::default()
                },
            ],
            hits_addend: 0,
        }
    );
    // Nothing was skipped as an unknown field: re-encoding gives Envoy's bytes back.
    assert_eq!(
        request.encode_to_vec(),
        message,
        "re-encoded bytes differ from Envoy's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_request_bytes_decode_with_the_vendored_protos() {
    envoy_bin();
    let upstream = start_upstream().await;
    let (rls, mut captured) = start_capture_server().await;
    let ports = Ports {
        listener: free_port(),
        upstream,
        rls,
        admin: free_port(),
    };
    let config = envoy_config(&ports, true, |text| {
        // Envoy 1.40 honours `hits_addend` on the filter's own `rate_limits` (which then replace
        // the route's): the same two descriptors as the `/users` route, the first one adding 3
        // hits per request. (On a route's `rate_limits` the field is accepted but not sent.)
        replace_once(
            &text,
            "\n                      domain: edge\n",
            r#"
                      domain: edge
                      rate_limits:
                        - hits_addend: { number: 3 }
                          actions:
                            - generic_key: { descriptor_key: route, descriptor_value: api-users }
                            - request_headers: { header_name: x-api-key, descriptor_key: x-api-key }
                        - actions:
                            - generic_key: { descriptor_key: route, descriptor_value: api-users }
                            - remote_address: {}
"#,
        )
    });
    let envoy = Envoy::start(&config, ports.listener).await;
    let r = envoy.get("/users", &[("x-api-key", "key-1")]).await;
    assert_eq!(r.status, 200, "the capture server answers OK: {r:?}");

    let call = tokio::time::timeout(Duration::from_secs(5), captured.recv())
        .await
        .expect("Envoy called the rate limit service")
        .expect("a captured call");
    assert_eq!(
        call.path,
        "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
    );
    assert!(
        call.content_type.starts_with("application/grpc"),
        "{}",
        call.content_type
    );
    assert_is_the_captured_request(&call.message);

    // Keep the bytes for the test below. Envoy encodes deterministically, so a fixture that
    // differs means Envoy changed: refresh it deliberately with SLUICE_UPDATE_FIXTURES=1.
    let fixture = repo_path(FIXTURE);
    match std::fs::read(&fixture) {
        Ok(kept) if std::env::var_os("SLUICE_UPDATE_FIXTURES").is_none() => assert_eq!(
            kept, call.message,
            "{FIXTURE} differs from what this Envoy sends; rerun with SLUICE_UPDATE_FIXTURES=1 \
             if the change is expected"
        ),
        _ => {
            std::fs::create_dir_all(fixture.parent().expect("fixtures dir")).expect("mkdir");
            // Write then rename: the fixture test may be reading it at this very moment.
            let partial = fixture.with_extension("bin.partial");
            std::fs::write(&partial, &call.message).expect("write the fixture");
            std::fs::rename(&partial, &fixture).expect("move the fixture in place");
            eprintln!("wrote {}", fixture.display());
        }
    }
}

/// Runs everywhere: the bytes Envoy 1.40.0 sent (captured by the test above) decode with the
/// vendored protos, `hits_addend` on the descriptor included.
#[test]
fn envoy_1_40_request_fixture_decodes() {
    let bytes = std::fs::read(repo_path(FIXTURE)).expect(
        "tests/fixtures/envoy_1_40_request.bin (made by envoy_request_bytes_decode_with_the_vendored_protos)",
    );
    assert_is_the_captured_request(&bytes);
}

/// A client that pads its API key must not slip past the limit: sluice counts a value of any
/// length (its key component hashed), where refusing it would make Envoy, failing open by
/// default, let the request through uncounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_8000_byte_api_key_is_limited_like_any_other() {
    let limits = r#"
domain: edge
defaults: { show_limit_quota_header: false }
routes:
  - name: api
    global_threshold: { query_per_minute: 100 }
  - name: api-users
    rejected_msg: "users quota exhausted"
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - { key: "*", name: per-key, query_per_minute: 3 }
"#;
    // The shipped filter settings, unchanged.
    let stack = Stack::start(limits, false, |c| c).await;
    avoid_minute_boundary().await;
    let padded = format!("{}a", "k".repeat(7_999));
    for n in 1..=3 {
        let r = users(&stack.envoy, &padded).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "upstream"),
            "request {n}: {r:?}"
        );
    }
    let r = users(&stack.envoy, &padded).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (429, "users quota exhausted"),
        "the 4th request with the same 8,000-byte key: {r:?}"
    );
    assert_eq!(r.header("x-envoy-ratelimited"), Some("true"), "{r:?}");
    // Another padded key, differing only in its last byte, has a counter of its own.
    let other = format!("{}b", "k".repeat(7_999));
    let r = users(&stack.envoy, &other).await;
    assert_eq!(r.status, 200, "{r:?}");
}

/// A header value that is not UTF-8 (any byte from 0x80 is allowed in HTTP) reaches sluice as
/// an invalid protobuf string. Refused, it would let the request past Envoy uncounted; it is
/// read with the odd bytes escaped and limited like any other value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_value_that_is_not_utf8_is_limited_like_any_other() {
    let limits = r#"
domain: edge
routes:
  - name: api
    global_threshold: { query_per_minute: 100 }
  - name: api-users
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - { key: "*", name: per-key, query_per_minute: 2 }
"#;
    let stack = Stack::start(limits, false, |c| c).await;
    avoid_minute_boundary().await;
    let odd: &[u8] = b"key-\xff\xfe";
    for n in 1..=2 {
        let r = stack.envoy.get_raw_header("/users", "x-api-key", odd).await;
        assert_eq!(
            r.status,
            200,
            "request {n}: {r:?}\n{}",
            stack.envoy.log_text()
        );
    }
    let r = stack.envoy.get_raw_header("/users", "x-api-key", odd).await;
    assert_eq!(
        r.status, 429,
        "the third request with the same odd key is over the limit of 2: {r:?}"
    );
    let r = stack
        .envoy
        .get_raw_header("/users", "x-api-key", b"key-\xff\xfd")
        .await;
    assert_eq!(
        r.status, 200,
        "another odd key has a counter of its own: {r:?}"
    );
}

/// A route's `rejected_code` reaches the client through Envoy: sluice returns it in
/// `dynamic_metadata` and the shipped `local_reply_config` maps Envoy's 429 to it, keeping the
/// route's message and `x-envoy-ratelimited`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_route_answers_503_with_its_message_through_envoy() {
    let limits = r#"
domain: edge
routes:
  - name: api
    global_threshold: { query_per_minute: 100 }
  - name: login
    rejected_code: 503
    rejected_msg: "login temporarily closed"
    global_threshold: { query_per_minute: 1 }
"#;
    let stack = Stack::start(limits, false, |c| c).await;
    avoid_minute_boundary().await;
    let login = || {
        stack
            .envoy
            .get("/login", &[("x-forwarded-for", "10.1.2.3")])
    };
    let r = login().await;
    assert_eq!((r.status, r.body.as_str()), (200, "upstream"), "{r:?}");
    let r = login().await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (503, "login temporarily closed"),
        "{r:?}"
    );
    assert_eq!(r.header("x-envoy-ratelimited"), Some("true"), "{r:?}");
    // Another route over its limit keeps Envoy's 429 (no mapper matches its code).
    for _ in 0..100 {
        stack.envoy.get("/", &[]).await;
    }
    let r = stack.envoy.get("/", &[]).await;
    assert_eq!(r.status, 429, "{r:?}");
}

/// The shipped Envoy config and the shipped limits together send each quota header once:
/// Envoy computes them from sluice's statuses, and the example limits leave sluice's own off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_configs_yield_each_quota_header_once() {
    let limits = std::fs::read_to_string(repo_path("config/limits/edge.yaml")).expect("read");
    let stack = Stack::start(&limits, false, |c| c).await;
    avoid_minute_boundary().await;
    let r = stack.envoy.get("/", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    // `header` fails on a header sent twice.
    for name in [
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
    ] {
        assert!(r.header(name).is_some(), "{name} missing: {r:?}");
    }
}

/// A 30 s window reaches Envoy as SECOND × 30, so its own `x-ratelimit-limit` says `w=30`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thirty_second_window_shows_w30_through_envoy() {
    let limits = r#"
domain: edge
routes:
  - name: api
    global_threshold: { requests: 3, window: 30s }
"#;
    let stack = Stack::start(limits, false, |c| c).await;
    let r = stack.envoy.get("/", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.header("x-ratelimit-limit"),
        Some(r#"3, 3;w=30;name="api/global""#),
        "{r:?}"
    );
}
