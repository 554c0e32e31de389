//! Prometheus metrics: one [`Metrics`] per server, so two servers in one test
//! process never share counts.
//!
//! Labels come from configuration names only (domain, route, rule) or from fixed sets
//! (result, decision, store, kind), never from request values: an unknown domain is counted
//! under `_unknown`, so cardinality is bounded by the config, not by traffic.

use std::sync::OnceLock;

use metrics::{Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Domain label for requests whose domain is not configured (or that were invalid).
pub const UNKNOWN_DOMAIN: &str = "_unknown";
/// Route label for a request-side override that matched no configured route.
pub const NO_ROUTE: &str = "_none";

pub const REQUESTS: &str = "sluice_requests_total";
pub const DECISIONS: &str = "sluice_decisions_total";
pub const UNMATCHED: &str = "sluice_descriptors_unmatched_total";
pub const REQUEST_DURATION: &str = "sluice_request_duration_seconds";
pub const STORE_DURATION: &str = "sluice_store_duration_seconds";
pub const STORE_ERRORS: &str = "sluice_store_errors_total";
pub const FALLBACK_ACTIVE: &str = "sluice_fallback_active";
pub const BREAKER_TRANSITIONS: &str = "sluice_breaker_transitions_total";
/// Hits the fallback admitted and owes the store, written back, expired unwritten, and
/// fallback takes refused because the ledger was full (`state` label).
pub const FALLBACK_HITS: &str = "sluice_fallback_hits_total";
/// Hits admitted by the fallback and not yet recorded by the store.
pub const FALLBACK_OWED: &str = "sluice_fallback_owed_hits";
pub const OVER_LIMIT_CACHE_ENTRIES: &str = "sluice_over_limit_cache_entries";
pub const OVER_LIMIT_CACHE_HITS: &str = "sluice_over_limit_cache_hits_total";
pub const CONFIG_RELOADS: &str = "sluice_config_reloads_total";
pub const CONFIG_LOADED_AT: &str = "sluice_config_last_load_timestamp_seconds";
/// Discovery responses of the xDS limits source, by result (ack, nack).
pub const XDS_RESPONSES: &str = "sluice_xds_responses_total";
/// Streams to the management server opened again after one was lost or refused.
pub const XDS_RECONNECTS: &str = "sluice_xds_reconnects_total";
/// 1 while a stream to the management server is open.
pub const XDS_CONNECTED: &str = "sluice_xds_connected";
/// 1 while a Redis master's `maxmemory-policy` can evict counters (anything but noeviction).
pub const REDIS_EVICTION_UNSAFE: &str = "sluice_redis_eviction_policy_unsafe";
/// 1 for each `maxmemory-policy` the Redis masters report, by `policy` (a fixed set, `other`
/// for a name not in it, `unknown` while it cannot be read); 0 for the rest.
pub const REDIS_EVICTION_POLICY: &str = "sluice_redis_eviction_policy";
/// Moves of the Redis pool to a new master (a Sentinel `+switch-master`, or a node that
/// answered as a replica).
pub const REDIS_FAILOVERS: &str = "sluice_redis_failovers_total";
pub const MEMORY_ENTRIES: &str = "sluice_memory_store_entries";
pub const MEMORY_REJECTED: &str = "sluice_memory_store_rejected_inserts_total";
/// Slots of `concurrent` limits in use, by domain and route; each replica moves it by what
/// its own calls did, so the sum over replicas is the fleet's count.
pub const SLOTS_IN_USE: &str = "sluice_concurrency_slots_in_use";
/// Slots whose give-back never came, freed by their `max_hold`.
pub const SLOTS_EXPIRED: &str = "sluice_concurrency_slots_expired_total";
/// Blocks of hits taken from the store by routes with `lease`.
pub const LEASES: &str = "sluice_leases_total";
/// Hits those blocks took from the store.
pub const LEASED_HITS: &str = "sluice_leased_hits_total";
/// Hits admitted from a leased block, without a store call.
pub const LEASE_ADMITTED: &str = "sluice_lease_admitted_hits_total";
/// RLQS streams open now (Envoy's rate_limit_quota filter).
pub const RLQS_STREAMS: &str = "sluice_rlqs_streams";
/// RLQS buckets the open streams hold.
pub const RLQS_BUCKETS: &str = "sluice_rlqs_buckets";
/// RLQS bucket actions sent, by kind (token_bucket, deny_all, allow_all, abandon).
pub const RLQS_ASSIGNMENTS: &str = "sluice_rlqs_assignments_total";
/// Requests Envoys reported, by domain, route and result (allowed, denied).
pub const RLQS_REPORTED: &str = "sluice_rlqs_reported_requests_total";
/// Reports, or parts of one, sluice did not act on, by reason.
pub const RLQS_IGNORED: &str = "sluice_rlqs_ignored_total";
/// Shares this replica assigned from what it knows alone, because the store failed.
pub const RLQS_FALLBACK: &str = "sluice_rlqs_fallback_shares_total";

/// Histogram buckets (seconds) that resolve sub-millisecond answers: 25 µs to 1 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0,
];

/// The overall result of one request, for `sluice_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestResult {
    Ok,
    OverLimit,
    Invalid,
    Error,
    /// Refused because too many requests were in flight.
    Shed,
}

impl RequestResult {
    /// Position in a domain's request counter slots.
    pub const fn index(self) -> usize {
        match self {
            RequestResult::Ok => 0,
            RequestResult::OverLimit => 1,
            RequestResult::Invalid => 2,
            RequestResult::Error => 3,
            RequestResult::Shed => 4,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            RequestResult::Ok => "ok",
            RequestResult::OverLimit => "over_limit",
            RequestResult::Invalid => "invalid",
            RequestResult::Error => "error",
            RequestResult::Shed => "shed",
        }
    }
}

/// What happened to one descriptor, for `sluice_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Ok,
    /// Admitted, with at most a fifth of the limit left (as envoyproxy/ratelimit's 80%).
    NearLimit,
    OverLimit,
    /// Over, but the route is in shadow mode, so answered OK.
    Shadow,
}

impl Decision {
    /// Position in a rule's decision counter slots.
    pub const fn index(self) -> usize {
        match self {
            Decision::Ok => 0,
            Decision::NearLimit => 1,
            Decision::OverLimit => 2,
            Decision::Shadow => 3,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Decision::Ok => "ok",
            Decision::NearLimit => "near_limit",
            Decision::OverLimit => "over_limit",
            Decision::Shadow => "shadow",
        }
    }
}

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    process: metrics_process::Collector,
    /// Handles of the request path kept once registered, so a request only increments and
    /// records (registering builds label strings and searches the registry).
    request_duration: OnceLock<metrics::Histogram>,
    /// The store histogram of the server's one store, with its label.
    store_duration: OnceLock<(&'static str, metrics::Histogram)>,
    /// Requests of domains that are not configured, by result.
    unknown_requests: [OnceLock<metrics::Counter>; 5],
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), LATENCY_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let process = metrics_process::Collector::default();
        let metrics = Self {
            recorder,
            handle,
            process,
            request_duration: OnceLock::new(),
            store_duration: OnceLock::new(),
            unknown_requests: Default::default(),
        };
        metrics.describe();
        metrics
    }

    fn describe(&self) {
        let r = &self.recorder;
        let counters = [
            (
                REQUESTS,
                "ShouldRateLimit requests by domain and result (ok, over_limit, invalid, error)",
            ),
            (
                DECISIONS,
                "Descriptor decisions by domain, route, rule and decision (ok, near_limit, over_limit, shadow)",
            ),
            (UNMATCHED, "Descriptors that matched no rule, by domain"),
            (STORE_ERRORS, "Counter store errors by store and kind"),
            (
                BREAKER_TRANSITIONS,
                "Circuit breaker transitions by target state",
            ),
            (
                OVER_LIMIT_CACHE_HITS,
                "Requests answered from the over-limit cache",
            ),
            (
                FALLBACK_HITS,
                "Hits the fallback admitted, by state: owed (admitted while the store could not answer), written_back (recorded by the store since), expired (their window ended before the store answered again), forgiven (the store had counted them itself: the call left before the request's deadline passed), refused (takes refused because the ledger of owed hits was full)",
            ),
            (
                CONFIG_RELOADS,
                "Limits loads by result (success, failure); the initial load counts",
            ),
            (
                MEMORY_REJECTED,
                "New counters not stored because the memory store was full",
            ),
            (
                LEASES,
                "Blocks of hits leased from the store (routes with lease)",
            ),
            (
                SLOTS_EXPIRED,
                "Concurrency slots freed by max_hold because their give-back never came, by domain and route",
            ),
            (LEASED_HITS, "Hits taken from the store by leases"),
            (
                RLQS_ASSIGNMENTS,
                "RLQS bucket actions sent to Envoys, by kind (token_bucket, deny_all, allow_all, abandon)",
            ),
            (
                RLQS_REPORTED,
                "Requests Envoys reported over RLQS, by domain, route and result (allowed, denied)",
            ),
            (
                RLQS_IGNORED,
                "RLQS reports or buckets not acted on, by reason",
            ),
            (
                RLQS_FALLBACK,
                "RLQS shares assigned from this replica's knowledge alone because the store failed",
            ),
            (
                XDS_RESPONSES,
                "Discovery responses of the xDS limits source by result (ack, nack)",
            ),
            (
                XDS_RECONNECTS,
                "Reconnects to the xDS management server after a lost or refused stream",
            ),
            (
                LEASE_ADMITTED,
                "Hits admitted from a leased block without a store call",
            ),
            (
                REDIS_FAILOVERS,
                "Moves of the Redis connections to a new master (Sentinel +switch-master, or a node that answered as a replica)",
            ),
        ];
        for (name, help) in counters {
            r.describe_counter(name.into(), None, help.into());
        }
        let gauges = [
            (
                SLOTS_IN_USE,
                "Concurrency slots in use by domain and route, as this replica's calls moved them (sum over replicas)",
            ),
            (
                FALLBACK_ACTIVE,
                "1 while the fallback answers instead of the store",
            ),
            (
                OVER_LIMIT_CACHE_ENTRIES,
                "Counters remembered as over their limit",
            ),
            (
                CONFIG_LOADED_AT,
                "Unix time of the last successful limits load",
            ),
            (MEMORY_ENTRIES, "Counters held by the memory store"),
            (
                FALLBACK_OWED,
                "Hits the fallback admitted that the store has not recorded yet",
            ),
            (
                REDIS_EVICTION_UNSAFE,
                "1 while a Redis maxmemory-policy can evict counters (anything but noeviction), which resets their limits",
            ),
            (
                REDIS_EVICTION_POLICY,
                "1 for each maxmemory-policy the Redis masters report, by policy (other: not a known name; unknown: cannot be read)",
            ),
            (RLQS_STREAMS, "RLQS streams open"),
            (RLQS_BUCKETS, "RLQS buckets held by the open streams"),
            (
                XDS_CONNECTED,
                "1 while the stream to the xDS management server is open",
            ),
        ];
        for (name, help) in gauges {
            r.describe_gauge(name.into(), None, help.into());
        }
        r.describe_histogram(
            REQUEST_DURATION.into(),
            Some(Unit::Seconds),
            "ShouldRateLimit latency".into(),
        );
        r.describe_histogram(
            STORE_DURATION.into(),
            Some(Unit::Seconds),
            "Counter store batch latency".into(),
        );
        metrics::with_local_recorder(r, || self.process.describe());
    }

    /// Registers the label-less and fixed-label series at zero, so dashboards and alerts see
    /// them before the first event.
    pub fn init_series(&self, store: &'static str) {
        self.gauge(FALLBACK_ACTIVE, &[]).set(0.0);
        self.gauge(OVER_LIMIT_CACHE_ENTRIES, &[]).set(0.0);
        self.counter(OVER_LIMIT_CACHE_HITS, &[]).absolute(0);
        for to in ["open", "half_open", "closed"] {
            self.counter(BREAKER_TRANSITIONS, &[("to", to)]).absolute(0);
        }
        self.gauge(FALLBACK_OWED, &[]).set(0.0);
        for state in ["owed", "written_back", "expired", "forgiven", "refused"] {
            self.counter(FALLBACK_HITS, &[("state", state)]).absolute(0);
        }
        for result in ["success", "failure"] {
            self.counter(CONFIG_RELOADS, &[("result", result)])
                .absolute(0);
        }
        for kind in ["timeout", "unavailable", "bad_reply"] {
            self.counter(STORE_ERRORS, &[("store", store), ("kind", kind)])
                .absolute(0);
        }
        let _ = self.histogram(STORE_DURATION, &[("store", store)]);
        let _ = self.histogram(REQUEST_DURATION, &[]);
    }

    fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
        let labels: Vec<Label> = labels
            .iter()
            .map(|(k, v)| Label::new(*k, (*v).to_string()))
            .collect();
        Key::from_parts(name, labels)
    }

    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> metrics::Counter {
        self.recorder
            .register_counter(&Self::key(name, labels), &METADATA)
    }

    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> metrics::Gauge {
        self.recorder
            .register_gauge(&Self::key(name, labels), &METADATA)
    }

    pub fn histogram(
        &self,
        name: &'static str,
        labels: &[(&'static str, &str)],
    ) -> metrics::Histogram {
        self.recorder
            .register_histogram(&Self::key(name, labels), &METADATA)
    }

    /// Counts a request of `domain` (its slots, or `None` for a domain not configured,
    /// labelled `_unknown`) and records its latency.
    pub fn request(
        &self,
        slots: Option<&[OnceLock<metrics::Counter>; 5]>,
        domain: &str,
        result: RequestResult,
        seconds: f64,
    ) {
        let slot = &slots.unwrap_or(&self.unknown_requests)[result.index()];
        slot.get_or_init(|| {
            self.counter(REQUESTS, &[("domain", domain), ("result", result.as_str())])
        })
        .increment(1);
        self.request_duration
            .get_or_init(|| self.histogram(REQUEST_DURATION, &[]))
            .record(seconds);
    }

    /// Counts a decision of (domain, route, rule) in the rule's slots.
    pub fn decision(
        &self,
        slots: &[OnceLock<metrics::Counter>; 4],
        labels: [&str; 3],
        decision: Decision,
    ) {
        let [domain, route, rule] = labels;
        slots[decision.index()]
            .get_or_init(|| {
                self.counter(
                    DECISIONS,
                    &[
                        ("domain", domain),
                        ("route", route),
                        ("rule", rule),
                        ("decision", decision.as_str()),
                    ],
                )
            })
            .increment(1);
    }

    /// Moves the slots in use of (domain, route) by what one concurrency call did: `taken`
    /// (a take, admitted or not) or `given` back, and `expired` found.
    pub fn slots(
        &self,
        handles: (&OnceLock<metrics::Gauge>, &OnceLock<metrics::Counter>),
        labels: [&str; 2],
        taken: u64,
        given: u64,
        expired: u64,
    ) {
        let [domain, route] = labels;
        let labels = [("domain", domain), ("route", route)];
        let in_use = handles.0.get_or_init(|| self.gauge(SLOTS_IN_USE, &labels));
        in_use.increment(taken as f64);
        in_use.decrement((given + expired) as f64);
        if expired > 0 {
            handles
                .1
                .get_or_init(|| self.counter(SLOTS_EXPIRED, &labels))
                .increment(expired);
        }
    }

    /// Counts a descriptor of `domain` that matched no limit, in the domain's slot.
    pub fn unmatched(&self, slot: &OnceLock<metrics::Counter>, domain: &str) {
        slot.get_or_init(|| self.counter(UNMATCHED, &[("domain", domain)]))
            .increment(1);
    }

    pub fn store_call(&self, store: &'static str, seconds: f64, error: Option<&'static str>) {
        let (label, histogram) = self
            .store_duration
            .get_or_init(|| (store, self.histogram(STORE_DURATION, &[("store", store)])));
        if *label == store {
            histogram.record(seconds);
        } else {
            // Another store than the first one seen (not in a server, which has one).
            self.histogram(STORE_DURATION, &[("store", store)])
                .record(seconds);
        }
        if let Some(kind) = error {
            self.counter(STORE_ERRORS, &[("store", store), ("kind", kind)])
                .increment(1);
        }
    }

    pub fn config_loaded(&self, success: bool, unix_seconds: f64) {
        let result = if success { "success" } else { "failure" };
        self.counter(CONFIG_RELOADS, &[("result", result)])
            .increment(1);
        if success {
            self.gauge(CONFIG_LOADED_AT, &[]).set(unix_seconds);
        }
    }

    /// Registers the xDS source's series at zero (only a server reading limits over xDS has
    /// them).
    pub fn init_xds_series(&self) {
        for result in ["ack", "nack"] {
            self.counter(XDS_RESPONSES, &[("result", result)])
                .absolute(0);
        }
        self.counter(XDS_RECONNECTS, &[]).absolute(0);
        self.gauge(XDS_CONNECTED, &[]).set(0.0);
    }

    /// One discovery response of the xDS source, applied (`ack`) or rejected.
    pub fn xds_response(&self, ack: bool) {
        let result = if ack { "ack" } else { "nack" };
        self.counter(XDS_RESPONSES, &[("result", result)])
            .increment(1);
    }

    pub fn xds_reconnect(&self) {
        self.counter(XDS_RECONNECTS, &[]).increment(1);
    }

    pub fn xds_connected(&self, connected: bool) {
        self.gauge(XDS_CONNECTED, &[])
            .set(if connected { 1.0 } else { 0.0 });
    }

    /// The Prometheus text exposition, with process metrics collected now.
    pub fn render(&self) -> String {
        metrics::with_local_recorder(&self.recorder, || self.process.collect());
        self.handle.render()
    }
}
