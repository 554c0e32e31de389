//! Requests as a hostile or careless client sends them: malformed requests get
//! INVALID_ARGUMENT with a message that says what was wrong, never a panic; the
//! health and reflection services answer; and 10,000 seeded random requests over one
//! connection all get an answer.

mod common;

use common::rls::*;
use common::sluice::*;
use sluice::config::settings::RequestBounds;
use tonic::Code as GrpcCode;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

const RLS_SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
const RLQS_SERVICE: &str = "envoy.service.rate_limit_quota.v3.RateLimitQuotaService";

const LIMITS: &str = r#"
domain: d
routes:
  - name: r
    global_threshold: { query_per_minute: 100 }
  - name: keys
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - { key: "*", query_per_second: 2 }
      - limit_by_per_ip: from-header-x-forwarded-for
        limit_keys:
          - { key: "10.0.0.0/8", query_per_minute: 3 }
          - { key: "2001:db8::/32", query_per_minute: 3 }
"#;

/// Small bounds, so exceeding them is cheap.
fn small_bounds(settings: &mut sluice::config::Settings) {
    settings.request = RequestBounds {
        max_descriptors: 2,
        max_entries: 3,
        max_key_bytes: 16,
        max_message_bytes: 4096,
    };
}

async fn small() -> Sluice {
    Sluice::start_with(&[("d.yaml", LIMITS)], small_bounds).await
}

/// Sends `req`, which must be refused with INVALID_ARGUMENT; returns the message.
async fn refused(s: &mut Sluice, req: RateLimitRequest) -> String {
    let shown = format!("{req:?}");
    match s.send(req).await {
        Ok(response) => panic!("accepted: {response:?}\nrequest: {shown}"),
        Err(status) => {
            assert_eq!(
                status.code(),
                GrpcCode::InvalidArgument,
                "{status:?}\nrequest: {shown}"
            );
            status.message().to_string()
        }
    }
}

/// The server still answers a normal request on the same connection.
async fn still_serving(s: &mut Sluice) {
    let response = s.ask("d", &[&[("route", "r")]]).await;
    assert_eq!(response.overall_code, Code::Ok as i32);
    let l = response.statuses[0].current_limit.as_ref().expect("limit");
    assert_eq!((l.requests_per_unit, l.unit), (100, Unit::Minute as i32));
}

fn assert_mentions(message: &str, words: &[&str]) {
    for word in words {
        assert!(
            message.contains(word),
            "message {message:?} does not mention {word:?}"
        );
    }
}

#[tokio::test]
async fn an_empty_domain_is_invalid() {
    let mut s = small().await;
    let message = refused(&mut s, request("", vec![desc(&[("route", "r")])])).await;
    assert_mentions(&message, &["domain", "empty"]);
    still_serving(&mut s).await;
    s.stop().await;
}

#[tokio::test]
async fn a_request_without_descriptors_is_invalid() {
    let mut s = small().await;
    let message = refused(&mut s, request("d", vec![])).await;
    assert_mentions(&message, &["descriptor"]);
    still_serving(&mut s).await;
    s.stop().await;
}

#[tokio::test]
async fn a_descriptor_without_entries_is_invalid() {
    let mut s = small().await;
    let message = refused(
        &mut s,
        request("d", vec![desc(&[("route", "r")]), desc(&[])]),
    )
    .await;
    assert_mentions(&message, &["descriptor 1", "no entries"]);
    still_serving(&mut s).await;
    s.stop().await;
}

#[tokio::test]
async fn an_empty_entry_key_is_invalid() {
    let mut s = small().await;
    let message = refused(
        &mut s,
        request("d", vec![desc(&[("route", "r"), ("", "v")])]),
    )
    .await;
    assert_mentions(&message, &["descriptor 0", "entry 1", "empty key"]);
    still_serving(&mut s).await;
    s.stop().await;
}

#[tokio::test]
async fn more_descriptors_than_the_bound_are_invalid() {
    let mut s = small().await;
    let at_bound = request("d", vec![desc(&[("route", "r")]); 2]);
    assert_eq!(s.call(at_bound).await.statuses.len(), 2);
    let message = refused(&mut s, request("d", vec![desc(&[("route", "r")]); 3])).await;
    assert_mentions(&message, &["3 descriptors", "2", "max_descriptors"]);
    still_serving(&mut s).await;
    s.stop().await;
}

#[tokio::test]
async fn more_entries_than_the_bound_are_invalid() {
    let mut s = small().await;
    let three = desc(&[("route", "r"), ("a", "1"), ("b", "2")]);
    assert_eq!(s.call(request("d", vec![three])).await.statuses.len(), 1);
    let four = desc(&[("route", "r"), ("a", "1"), ("b", "2"), ("c", "3")]);
    let message = refused(&mut s, request("d", vec![desc(&[("route", "r")]), four])).await;
    assert_mentions(&message, &["descriptor 1", "4 entries", "3", "max_entries"]);
    still_serving(&mut s).await;
    s.stop().await;
}

#[tokio::test]
async fn longer_keys_and_domains_than_the_bound_are_invalid_but_long_values_are_counted() {
    let mut s = small().await;
    let sixteen = "v".repeat(16);
    let seventeen = "v".repeat(17);
    // Exactly at the bound: fine.
    let ok = s.ask("d", &[&[("route", "r"), (&sixteen, "v")]]).await;
    assert_eq!(ok.overall_code, Code::Ok as i32);

    // A value is what a client of Envoy sends (a header, a path): never refused, whatever
    // its length, since Envoy lets a refused request through. It is counted.
    // It is counted, under its own counter (route `keys`: 2 per second per key).
    let long = "v".repeat(1000);
    for n in 1..=2 {
        let answer = s
            .ask("d", &[&[("route", "keys"), ("x-api-key", &long)]])
            .await;
        assert_eq!(answer.overall_code, Code::Ok as i32, "request {n}");
    }
    let answer = s
        .ask("d", &[&[("route", "keys"), ("x-api-key", &long)]])
        .await;
    assert_eq!(answer.overall_code, Code::OverLimit as i32, "{answer:?}");
    let other = format!("{}w", "v".repeat(999));
    let answer = s
        .ask("d", &[&[("route", "keys"), ("x-api-key", &other)]])
        .await;
    assert_eq!(answer.overall_code, Code::Ok as i32, "{answer:?}");

    let message = refused(
        &mut s,
        request("d", vec![desc(&[("route", "r"), (&seventeen, "v")])]),
    )
    .await;
    assert_mentions(
        &message,
        &["descriptor 0", "entry 1", "17 bytes", "16", "max_key_bytes"],
    );

    // Bytes, not characters: 9 two-byte characters are 18 bytes.
    let accents = "é".repeat(9);
    let message = refused(&mut s, request("d", vec![desc(&[(&accents, "r")])])).await;
    assert_mentions(&message, &["18 bytes", "16"]);

    let message = refused(
        &mut s,
        request(&"d".repeat(17), vec![desc(&[("route", "r")])]),
    )
    .await;
    assert_mentions(&message, &["domain", "17 bytes", "16"]);
    still_serving(&mut s).await;
    s.stop().await;
}

#[tokio::test]
async fn a_message_larger_than_the_bound_is_refused_and_the_connection_survives() {
    let mut s = small().await;
    // Two descriptors of three entries, each within the value bound, but > 4096 bytes encoded.
    let long = "v".repeat(16);
    let mut req = request("d", vec![]);
    for _ in 0..2 {
        req.descriptors
            .push(desc(&[("route", "r"), ("a", &long), ("b", &long)]));
    }
    req.descriptors[0].entries.extend((0..200).map(|i| Entry {
        key: format!("k{i}"),
        value: long.clone(),
    }));
    let status = s.send(req).await.expect_err("must be refused");
    assert!(
        matches!(
            status.code(),
            GrpcCode::InvalidArgument | GrpcCode::ResourceExhausted | GrpcCode::OutOfRange
        ),
        "{status:?}"
    );
    assert!(status.message().contains("4096"), "{status:?}");
    still_serving(&mut s).await;
    s.stop().await;
}

#[tokio::test]
async fn a_huge_override_period_is_answered_not_crashed() {
    // unit_multiplier can make a period longer than u64 milliseconds can hold.
    let mut s = Sluice::start(&[("d.yaml", LIMITS)]).await;
    for pairs in [&[("route", "r")][..], &[("route", "nowhere"), ("k", "v")]] {
        for unit in [
            RateLimitUnit::Year,
            RateLimitUnit::Month,
            RateLimitUnit::Day,
        ] {
            let d = desc_override(pairs, 5, unit, Some(u32::MAX));
            match s.send(request("d", vec![d])).await {
                Ok(response) => assert_eq!(response.statuses.len(), 1),
                Err(status) => assert_eq!(
                    status.code(),
                    GrpcCode::InvalidArgument,
                    "{unit:?} {pairs:?}: {status:?}"
                ),
            }
        }
    }
    still_serving(&mut s).await;
    s.stop().await;
}

#[tokio::test]
async fn huge_hits_addend_is_answered() {
    let mut s = Sluice::start(&[("d.yaml", LIMITS)]).await;
    // A request-level u32::MAX on one descriptor, a descriptor-level u64::MAX (capped at
    // sluice::service::MAX_HITS) on another counter: both answered, both over.
    let mut req = request(
        "d",
        vec![
            desc(&[("route", "keys"), ("x-api-key", "k")]),
            desc_hits(&[("route", "r")], u64::MAX),
        ],
    );
    req.hits_addend = u32::MAX;
    let response = s.call(req).await;
    assert_eq!(response.overall_code, Code::OverLimit as i32);
    // Giving back as many (capped alike) empties the counter again.
    let give = RateLimitDescriptor {
        is_negative_hits: true,
        ..desc_hits(&[("route", "r")], u64::MAX)
    };
    let response = s.call(request("d", vec![give])).await;
    assert_eq!(response.overall_code, Code::Ok as i32);
    assert_eq!(response.statuses[0].limit_remaining, 100);
    s.stop().await;
}

#[tokio::test]
async fn health_service_answers_serving() {
    let s = small().await;
    let mut health = HealthClient::new(s.channel.clone());
    for service in ["", RLS_SERVICE, RLQS_SERVICE] {
        let response = health
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .unwrap_or_else(|e| panic!("health check of {service:?}: {e:?}"))
            .into_inner();
        assert_eq!(
            response.status,
            ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    s.stop().await;
}

async fn reflect(channel: tonic::transport::Channel, request: MessageRequest) -> MessageResponse {
    let mut client = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection call")
        .into_inner();
    let response: ServerReflectionResponse = stream
        .message()
        .await
        .expect("reflection answer")
        .expect("one answer");
    response.message_response.expect("a message response")
}

#[tokio::test]
async fn reflection_lists_and_describes_the_rate_limit_service() {
    use prost::Message;

    let s = small().await;
    let services = match reflect(
        s.channel.clone(),
        MessageRequest::ListServices(String::new()),
    )
    .await
    {
        MessageResponse::ListServicesResponse(list) => {
            list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
        }
        other => panic!("not a service list: {other:?}"),
    };
    assert!(services.iter().any(|s| s == RLS_SERVICE), "{services:?}");
    assert!(services.iter().any(|s| s == RLQS_SERVICE), "{services:?}");
    assert!(
        services.iter().any(|s| s == "grpc.health.v1.Health"),
        "{services:?}"
    );

    // What grpcurl does next: fetch the file declaring the service, then its imports.
    let files = match reflect(
        s.channel.clone(),
        MessageRequest::FileContainingSymbol(RLS_SERVICE.into()),
    )
    .await
    {
        MessageResponse::FileDescriptorResponse(files) => files.file_descriptor_proto,
        other => panic!("no file for {RLS_SERVICE}: {other:?}"),
    };
    let files: Vec<prost_types::FileDescriptorProto> = files
        .iter()
        .map(|bytes| {
            prost_types::FileDescriptorProto::decode(bytes.as_slice()).expect("file descriptor")
        })
        .collect();
    let rls = files
        .iter()
        .find(|f| f.service.iter().any(|svc| svc.name() == "RateLimitService"))
        .expect("the file declaring RateLimitService");
    assert_eq!(rls.package(), "envoy.service.ratelimit.v3");
    for dependency in &rls.dependency {
        match reflect(
            s.channel.clone(),
            MessageRequest::FileByFilename(dependency.clone()),
        )
        .await
        {
            MessageResponse::FileDescriptorResponse(f) => {
                assert!(!f.file_descriptor_proto.is_empty(), "{dependency}")
            }
            other => panic!("import {dependency} not served: {other:?}"),
        }
    }
    s.stop().await;
}

// ----- fuzz -----

/// SplitMix64: small, fast and seeded, so every run sends the same 10,000 requests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn range(&mut self, lo: u64, hi_inclusive: u64) -> u64 {
        lo + self.below(hi_inclusive - lo + 1)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

const WORDS: &[&str] = &[
    "route",
    "x-api-key",
    "remote_address",
    "x-forwarded-for",
    "consumer",
    "plan",
    "session",
    "tenant",
    "region",
    "tier",
    "api",
    "api-users",
    "api-mobile",
    "login",
    "search",
    "reports",
    "exports",
    "r",
    "keys",
    "gold",
    "silver",
    "free",
    "acme",
    "eu-west",
    "vip-1",
    "10.1.2.3",
    "2001:db8::1",
    "::ffff:10.0.0.1",
    "[2001:db8::1]:443",
    "203.0.113.9, 10.0.0.1",
    " , ,",
    "0123456789abcdef0123456789abcdef",
    "*",
    "regexp:.*",
];

const ODD_CHARS: &[char] = &[
    '{', '}', ':', '\n', '\r', '\0', 'é', '漢', '🦀', ' ', ',', '/', '~', '*', '.', '-', '_',
    '\u{202e}', '\u{feff}', 'a', 'b', 'z', '0', '9', 'A',
];

fn text(rng: &mut Rng) -> String {
    match rng.below(20) {
        0 | 1 => String::new(),
        2..=7 => (*rng.pick(WORDS)).to_string(),
        8..=14 => {
            let n = rng.below(24);
            (0..n).map(|_| *rng.pick(ODD_CHARS)).collect()
        }
        15 | 16 => {
            // Any Unicode scalar value.
            let n = rng.below(12);
            (0..n)
                .filter_map(|_| char::from_u32(rng.below(0x11_0000) as u32))
                .collect()
        }
        17 if rng.percent(25) => {
            // Around the 4 KiB value bound, in one- and two-byte characters.
            if rng.percent(50) {
                "x".repeat(rng.range(4094, 4098) as usize)
            } else {
                "é".repeat(rng.range(2047, 2049) as usize)
            }
        }
        _ => format!("{}-{}", rng.pick(WORDS), rng.below(1000)),
    }
}

fn fuzz_descriptor(rng: &mut Rng) -> RateLimitDescriptor {
    let n = match rng.below(100) {
        0..=4 => 0,
        5..=84 => rng.range(1, 4),
        85..=94 => rng.range(5, 12),
        _ => rng.range(30, 34),
    };
    let mut entries = Vec::new();
    if n > 0 && rng.percent(50) {
        let routes = [
            "api",
            "api-users",
            "api-mobile",
            "login",
            "search",
            "reports",
            "exports",
            "r",
            "keys",
        ];
        entries.push(Entry {
            key: "route".into(),
            value: (*rng.pick(&routes)).to_string(),
        });
    }
    while (entries.len() as u64) < n {
        // Mostly non-empty keys, so that most requests are valid and reach the matcher.
        let mut key = text(rng);
        if key.is_empty() && rng.percent(90) {
            key = (*rng.pick(WORDS)).to_string();
        }
        entries.push(Entry {
            key,
            value: text(rng),
        });
    }
    let hits_addend = match rng.below(10) {
        0..=5 => None,
        6 => Some(0),
        7 => Some(rng.range(1, 10)),
        8 => Some(rng.next()),
        _ => Some(u64::MAX),
    };
    let limit = rng.percent(15).then(|| RateLimitOverride {
        requests_per_unit: match rng.below(5) {
            0 => 0,
            1 => 1,
            2 => rng.range(2, 100) as u32,
            3 => rng.next() as u32,
            _ => u32::MAX,
        },
        unit: rng.range(0, 12) as i32 - 2,
        unit_multiplier: match rng.below(6) {
            0 => None,
            1 => Some(0),
            2 => Some(1),
            3 => Some(30),
            4 => Some(rng.next() as u32),
            _ => Some(u32::MAX),
        },
    });
    RateLimitDescriptor {
        entries,
        limit,
        hits_addend,
        is_negative_hits: rng.percent(10),
    }
}

fn fuzz_request(rng: &mut Rng, max_message_bytes: usize) -> RateLimitRequest {
    use prost::Message;

    let domain = match rng.below(10) {
        0 => String::new(),
        1..=3 => "edge".to_string(),
        4 | 5 => "partners".to_string(),
        6 => "d".to_string(),
        _ => text(rng),
    };
    let n = match rng.below(100) {
        0..=4 => 0,
        5..=79 => rng.range(1, 4),
        80..=94 => rng.range(5, 20),
        _ => rng.range(60, 70),
    };
    let descriptors = (0..n).map(|_| fuzz_descriptor(rng)).collect();
    let mut req = RateLimitRequest {
        domain,
        descriptors,
        hits_addend: match rng.below(6) {
            0..=2 => 0,
            3 => rng.range(1, 10) as u32,
            4 => rng.next() as u32,
            _ => u32::MAX,
        },
    };
    // Stay under the transport's message bound, which is not what this fuzz is about.
    while req.encoded_len() > max_message_bytes - 64 {
        req.descriptors.pop();
    }
    req
}

/// Whether the request-shape rules and the bounds make this request valid.
fn is_valid(req: &RateLimitRequest, b: &RequestBounds) -> bool {
    !req.domain.is_empty()
        && req.domain.len() <= b.max_key_bytes
        && !req.descriptors.is_empty()
        && req.descriptors.len() <= b.max_descriptors
        && req.descriptors.iter().all(|d| {
            !d.entries.is_empty()
                && d.entries.len() <= b.max_entries
                && d.entries.iter().all(|e| {
                    // Values are never refused: a client of Envoy controls them.
                    !e.key.is_empty() && e.key.len() <= b.max_key_bytes
                })
        })
}

fn shorten(text: String) -> String {
    if text.len() <= 600 {
        return text;
    }
    let mut end = 600;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len())
}

/// What is wrong with the answer to `req`, if anything.
fn judge(
    req: &RateLimitRequest,
    bounds: &RequestBounds,
    result: &Result<RateLimitResponse, tonic::Status>,
) -> Option<String> {
    let valid = is_valid(req, bounds);
    let is_code = |c: i32| c == Code::Ok as i32 || c == Code::OverLimit as i32;
    match result {
        Ok(response) if !valid => Some(format!("invalid request answered: {response:?}")),
        Ok(response) if response.statuses.len() != req.descriptors.len() => Some(format!(
            "{} statuses for {} descriptors",
            response.statuses.len(),
            req.descriptors.len()
        )),
        Ok(response)
            if !is_code(response.overall_code)
                || !response.statuses.iter().all(|st| is_code(st.code)) =>
        {
            Some(format!("bad codes: {response:?}"))
        }
        Ok(_) => None,
        Err(status) if status.code() != GrpcCode::InvalidArgument => Some(format!(
            "refused with {:?}: {}",
            status.code(),
            status.message()
        )),
        Err(status) if valid => Some(format!("valid request refused: {}", status.message())),
        Err(status) if status.message().is_empty() => {
            Some("INVALID_ARGUMENT without a message".to_string())
        }
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_random_requests_all_get_an_answer() {
    const REQUESTS: usize = 10_000;
    /// Requests in flight at once, all on the one connection (HTTP/2 streams).
    const IN_FLIGHT: usize = 32;
    let mut s = Sluice::start_examples_and(&[("d.yaml", LIMITS)]).await;
    let bounds = RequestBounds::default();

    let mut rng = Rng(0x5EED_F00D_CAFE_0001);
    let requests: Vec<RateLimitRequest> = (0..REQUESTS)
        .map(|_| fuzz_request(&mut rng, bounds.max_message_bytes))
        .collect();
    let (mut answered, mut refused, mut over) = (0, 0, 0);
    let mut failures: Vec<String> = Vec::new();
    for (batch, chunk) in requests.chunks(IN_FLIGHT).enumerate() {
        if batch % 40 == 39 {
            s.advance(rng.range(1, 2 * MINUTE));
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (j, req) in chunk.iter().enumerate() {
            let mut client = s.client.clone();
            let req = req.clone();
            let i = batch * IN_FLIGHT + j;
            tasks.spawn(async move {
                let result = client.should_rate_limit(req).await;
                (i, result.map(tonic::Response::into_inner))
            });
        }
        while let Some(joined) = tasks.join_next().await {
            let (i, result) = joined.expect("request task");
            match &result {
                Ok(r) if r.overall_code == Code::OverLimit as i32 => {
                    answered += 1;
                    over += 1;
                }
                Ok(_) => answered += 1,
                Err(_) => refused += 1,
            }
            if let Some(problem) = judge(&requests[i], &bounds, &result) {
                let sent = &requests[i];
                let overrides: Vec<_> = sent.descriptors.iter().filter_map(|d| d.limit).collect();
                failures.push(format!(
                    "#{i}: {problem}\n  overrides: {overrides:?}\n  request: {}",
                    shorten(format!("{sent:?}"))
                ));
            }
        }
    }
    failures.sort_by_key(|f| {
        f[1..]
            .split(':')
            .next()
            .and_then(|n| n.parse::<usize>().ok())
    });
    eprintln!(
        "fuzz: {answered} answered ({over} over limit), {refused} refused, {} failures",
        failures.len()
    );

    // The server still answers a normal request at the end.
    s.clock.set(START_MS + 7 * DAY);
    let response = s.ask("edge", &[&[("route", "api")]]).await;
    assert_eq!(response.overall_code, Code::Ok as i32);
    assert_eq!(
        response.statuses,
        [status(
            Code::Ok,
            &limit(1000, Unit::Minute, "api/global"),
            999,
            MINUTE - 15_250
        )]
    );
    assert!(
        failures.is_empty(),
        "{} of {REQUESTS} requests failed; first ones:\n{}",
        failures.len(),
        failures
            .iter()
            .take(8)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        answered > REQUESTS / 3 && refused > REQUESTS / 20,
        "the mix is lopsided: {answered} answered, {refused} refused"
    );
    s.stop().await;
}
