//! Test harness: one sluice server per test, in process, on a loopback port, driven by a
//! [`ManualClock`] and serving limits written into a temporary directory.
//!
//! Time never passes by itself here: tests move the clock across window boundaries instead of
//! sleeping. Every helper talks to the server over real gRPC (tonic client on loopback).

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prost_types::value::Kind;
use sluice::config::Settings;
use sluice::server::{ServerHandle, start};
use tempfile::TempDir;
use tonic::transport::Channel;

pub use sluice::clock::ManualClock;
pub use sluice::proto::descriptor::RateLimitDescriptor;
pub use sluice::proto::descriptor::rate_limit_descriptor::{Entry, RateLimitOverride};
pub use sluice::proto::rls::rate_limit_response::rate_limit::Unit;
pub use sluice::proto::rls::rate_limit_response::{Code, DescriptorStatus, RateLimit};
pub use sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient;
pub use sluice::proto::rls::{RateLimitRequest, RateLimitResponse};
pub use sluice::proto::unit::RateLimitUnit;

pub const SECOND: u64 = 1_000;
pub const MINUTE: u64 = 60 * SECOND;
pub const HOUR: u64 = 60 * MINUTE;
pub const DAY: u64 = 24 * HOUR;

/// 2023-11-14T00:00:00Z: a multiple of a day, hence of every second, minute and hour.
pub const DAY_START_MS: u64 = 1_699_920_000_000;
/// Where every test's clock starts: 15.250 s into that day, so the current second has 750 ms
/// left, the minute 44.750 s, the hour 3584.750 s and the day 86384.750 s.
pub const START_MS: u64 = DAY_START_MS + 15_250;

/// The period of a response unit, in ms.
pub fn period_of(unit: Unit) -> u64 {
    match unit {
        Unit::Second => SECOND,
        Unit::Minute => MINUTE,
        Unit::Hour => HOUR,
        Unit::Day => DAY,
        Unit::Week => 7 * DAY,
        Unit::Month => 30 * DAY,
        Unit::Year => 365 * DAY,
        Unit::Unknown => panic!("no period for Unit::Unknown"),
    }
}

/// A running server, its clock, its limits directory and a connected client.
pub struct Sluice {
    handle: Option<ServerHandle>,
    pub clock: Arc<ManualClock>,
    pub dir: TempDir,
    pub channel: Channel,
    pub client: RateLimitServiceClient<Channel>,
}

impl Sluice {
    /// Serves the given limits files (`(file name, YAML)`) with default settings.
    pub async fn start(files: &[(&str, &str)]) -> Self {
        Self::start_with(files, |_| {}).await
    }

    /// Serves the given limits files; `configure` may change the settings (bounds, ...).
    pub async fn start_with(files: &[(&str, &str)], configure: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write limits file");
        }
        Self::serve(dir, configure).await
    }

    /// Serves a copy of the example limits of `config/limits`, unchanged.
    pub async fn start_examples() -> Self {
        Self::start_examples_with(|_| {}).await
    }

    /// Serves a copy of the example limits plus the given files.
    pub async fn start_examples_and(files: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        copy_example_limits(dir.path());
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write limits file");
        }
        Self::serve(dir, |_| {}).await
    }

    pub async fn start_examples_with(configure: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        copy_example_limits(dir.path());
        Self::serve(dir, configure).await
    }

    async fn serve(dir: TempDir, configure: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = Settings {
            grpc_addr: "127.0.0.1:0".into(),
            http_addr: "127.0.0.1:0".into(),
            limits_dir: dir.path().to_path_buf(),
            ..Settings::default()
        };
        configure(&mut settings);
        let clock = Arc::new(ManualClock::new(START_MS));
        let handle = start(&settings, clock.clone())
            .await
            .unwrap_or_else(|e| panic!("server did not start: {e}"));
        let channel = Channel::from_shared(format!("http://{}", handle.grpc_addr))
            .expect("uri")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to the server");
        let client = RateLimitServiceClient::new(channel.clone());
        Self {
            handle: Some(handle),
            clock,
            dir,
            channel,
            client,
        }
    }

    /// Stops the server (in-flight requests get a second to finish).
    pub async fn stop(mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown(Duration::from_secs(1)).await;
        }
    }

    pub fn handle(&self) -> &ServerHandle {
        self.handle.as_ref().expect("server running")
    }

    // ----- time -----

    pub fn now(&self) -> u64 {
        use sluice::clock::Clock;
        self.clock.now_ms()
    }

    pub fn advance(&self, ms: u64) {
        self.clock.advance(ms);
    }

    /// Milliseconds from now to the end of the current window of `period` ms.
    pub fn until_reset(&self, period: u64) -> u64 {
        period - self.now() % period
    }

    /// Moves the clock to the first millisecond of the next window of `period` ms.
    pub fn to_next_window(&self, period: u64) {
        self.advance(self.until_reset(period));
    }

    // ----- requests -----

    /// Sends a request and returns the gRPC outcome as is.
    pub async fn send(
        &mut self,
        request: RateLimitRequest,
    ) -> Result<RateLimitResponse, tonic::Status> {
        self.client
            .should_rate_limit(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// Sends a request that must be answered (not refused).
    pub async fn call(&mut self, request: RateLimitRequest) -> RateLimitResponse {
        let shown = format!("{request:?}");
        let descriptors = request.descriptors.len();
        let response = self
            .send(request)
            .await
            .unwrap_or_else(|s| panic!("request refused: {s:?}\nrequest: {shown}"));
        assert_eq!(
            response.statuses.len(),
            descriptors,
            "one status per descriptor"
        );
        response
    }

    /// One request of `domain` with one descriptor per entry list.
    pub async fn ask(
        &mut self,
        domain: &str,
        descriptors: &[&[(&str, &str)]],
    ) -> RateLimitResponse {
        self.call(request(
            domain,
            descriptors.iter().map(|d| desc(d)).collect(),
        ))
        .await
    }

    /// One request with one descriptor; returns the response, whose overall code must agree
    /// with the only status.
    pub async fn ask_one(
        &mut self,
        domain: &str,
        descriptor: RateLimitDescriptor,
    ) -> RateLimitResponse {
        let response = self.call(request(domain, vec![descriptor])).await;
        assert_eq!(response.statuses.len(), 1);
        response
    }

    /// The status of a one-descriptor request.
    pub async fn status(&mut self, domain: &str, pairs: &[(&str, &str)]) -> DescriptorStatus {
        self.ask_one(domain, desc(pairs)).await.statuses[0].clone()
    }

    /// Drives one fresh counter through a whole window and into the next, asserting every
    /// answer in full: `limit` OK answers with `limit_remaining` counting down to 0 and
    /// `duration_until_reset` equal to the window end minus now, then OVER_LIMIT (also at the
    /// window's last millisecond), then OK again with a full quota once the clock crosses the
    /// boundary. Leaves one hit counted in the new window.
    pub async fn assert_full_window(
        &mut self,
        domain: &str,
        descriptor: RateLimitDescriptor,
        expected: RateLimit,
    ) {
        let n = expected.requests_per_unit;
        let period = period_of(Unit::try_from(expected.unit).expect("unit"))
            * u64::from(expected.unit_multiplier.unwrap_or(1));
        const STEP: u64 = 3;
        if self.until_reset(period) <= STEP * (u64::from(n) + 2) {
            self.to_next_window(period);
        }
        for i in 0..n {
            let response = self.ask_one(domain, descriptor.clone()).await;
            assert_eq!(
                response.statuses[0],
                status(Code::Ok, &expected, n - 1 - i, self.until_reset(period)),
                "request {} of {n} ({descriptor:?})",
                i + 1
            );
            assert_eq!(response.overall_code, Code::Ok as i32);
            self.advance(STEP);
        }
        let response = self.ask_one(domain, descriptor.clone()).await;
        assert_eq!(
            response.statuses[0],
            status(Code::OverLimit, &expected, 0, self.until_reset(period)),
            "request {} of {n} is over ({descriptor:?})",
            n + 1
        );
        assert_eq!(response.overall_code, Code::OverLimit as i32);

        // Last millisecond of the window: still over, 1 ms to go.
        self.advance(self.until_reset(period) - 1);
        let response = self.ask_one(domain, descriptor.clone()).await;
        assert_eq!(
            response.statuses[0],
            status(Code::OverLimit, &expected, 0, 1),
            "at the window's last millisecond ({descriptor:?})"
        );

        // The next window starts afresh.
        self.advance(1);
        let response = self.ask_one(domain, descriptor.clone()).await;
        assert_eq!(
            response.statuses[0],
            status(Code::Ok, &expected, n - 1, period),
            "first request of the next window ({descriptor:?})"
        );
        assert_eq!(response.overall_code, Code::Ok as i32);
    }
}

/// Copies `config/limits/*.yaml` into `dir`.
pub fn copy_example_limits(dir: &Path) {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/limits");
    let mut copied = 0;
    for entry in std::fs::read_dir(&examples).expect("config/limits") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            std::fs::copy(&path, dir.join(path.file_name().expect("name"))).expect("copy");
            copied += 1;
        }
    }
    assert!(copied > 0, "no example limits in {}", examples.display());
}

// ----- building requests -----

pub fn entries(pairs: &[(&str, &str)]) -> Vec<Entry> {
    pairs
        .iter()
        .map(|(k, v)| Entry {
            key: (*k).to_string(),
            value: (*v).to_string(),
        })
        .collect()
}

/// A descriptor with these entries and nothing else.
pub fn desc(pairs: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries(pairs),
        ..Default::default()
    }
}

/// A descriptor with its own `hits_addend`.
pub fn desc_hits(pairs: &[(&str, &str)], hits: u64) -> RateLimitDescriptor {
    RateLimitDescriptor {
        hits_addend: Some(hits),
        ..desc(pairs)
    }
}

/// A descriptor carrying a `limit` override.
pub fn desc_override(
    pairs: &[(&str, &str)],
    requests_per_unit: u32,
    unit: RateLimitUnit,
    unit_multiplier: Option<u32>,
) -> RateLimitDescriptor {
    RateLimitDescriptor {
        limit: Some(RateLimitOverride {
            requests_per_unit,
            unit: unit as i32,
            unit_multiplier,
        }),
        ..desc(pairs)
    }
}

pub fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.to_string(),
        descriptors,
        hits_addend: 0,
    }
}

// ----- expected answers -----

/// `current_limit` as sluice reports it: `name` is `route/rule`.
pub fn limit(requests_per_unit: u32, unit: Unit, name: &str) -> RateLimit {
    RateLimit {
        name: name.to_string(),
        requests_per_unit,
        unit: unit as i32,
        unit_multiplier: None,
    }
}

pub fn duration(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// The whole status of a limited descriptor.
pub fn status(code: Code, limit: &RateLimit, remaining: u32, reset_ms: u64) -> DescriptorStatus {
    DescriptorStatus {
        code: code as i32,
        current_limit: Some(limit.clone()),
        limit_remaining: remaining,
        duration_until_reset: Some(duration(reset_ms)),
    }
}

/// The status of a descriptor that has no limit: OK, nothing else.
pub fn unlimited() -> DescriptorStatus {
    DescriptorStatus {
        code: Code::Ok as i32,
        ..Default::default()
    }
}

/// A string field of `dynamic_metadata`.
pub fn metadata<'a>(response: &'a RateLimitResponse, field: &str) -> Option<&'a str> {
    let value = response.dynamic_metadata.as_ref()?.fields.get(field)?;
    match &value.kind {
        Some(Kind::StringValue(s)) => Some(s.as_str()),
        _ => None,
    }
}

/// A header of `response_headers_to_add` (case-insensitive name).
pub fn header<'a>(response: &'a RateLimitResponse, name: &str) -> Option<&'a str> {
    response
        .response_headers_to_add
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}
