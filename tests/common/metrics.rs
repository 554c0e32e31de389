//! Reading what sluice reports about itself on `/metrics` (the Prometheus text format), and
//! what this test process uses in memory.
//!
//! Only the summing reader lives here: the tests that check labels and series in detail
//! (`http_api.rs`) parse the format themselves, because how the format is read is what they
//! test.

use std::net::SocketAddr;

use super::http;

/// The `/metrics` page of a server (status 200 required).
pub async fn scrape(http_addr: SocketAddr) -> String {
    let r = http::get(http_addr, "/metrics").await;
    assert_eq!(r.status, 200, "GET /metrics: {}", r.body);
    r.body
}

/// The sum of every sample of `name` (any labels) in a Prometheus text page; `None` when the
/// metric has no sample.
pub fn metric(page: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in page.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = if rest.starts_with('{') {
            rest.rsplit_once('}').map(|(_, v)| v)
        } else if rest.starts_with(' ') {
            Some(rest)
        } else {
            None
        };
        if let Some(v) = value.and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// This process's peak resident set size (`VmHWM`), in KiB.
pub fn peak_rss_kib() -> Option<u64> {
    proc_status_kib("VmHWM:")
}

/// This process's current resident set size (`VmRSS`), in KiB.
pub fn rss_kib() -> Option<u64> {
    proc_status_kib("VmRSS:")
}

fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
