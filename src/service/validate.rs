//! Step one of a request: is its shape one Envoy's configuration can produce?
//!
//! Only what Envoy's own configuration decides is refused. A value that a client of Envoy
//! controls never is: Envoy lets an errored request through uncounted when its
//! `failure_mode_deny` is false (the default), so refusing a long header would be a way past
//! the limit.

use super::RequestError;
use crate::config::settings::RequestBounds;
use crate::proto::rls::RateLimitRequest;

/// Refuses only what Envoy's own configuration decides: the domain, how many descriptors and
/// entries, the entry keys. Entry values come from Envoy's clients (headers, paths,
/// addresses) and are never refused, whatever their length: Envoy lets an errored request
/// through uncounted by default, so an error there would be a way past the limit. They are
/// counted like any other value, their key component hashed to a fixed length.
pub fn validate(request: &RateLimitRequest, bounds: &RequestBounds) -> Result<(), RequestError> {
    let invalid = |m: String| Err(RequestError::Invalid(m));
    if request.domain.is_empty() {
        return invalid("domain is empty: every request names its rate limit domain".into());
    }
    if request.domain.len() > bounds.max_key_bytes {
        return invalid(format!(
            "domain is {} bytes, more than the bound of {} (request.max_key_bytes)",
            request.domain.len(),
            bounds.max_key_bytes
        ));
    }
    if request.descriptors.is_empty() {
        return invalid("no descriptors: a request carries at least one".into());
    }
    if request.descriptors.len() > bounds.max_descriptors {
        return invalid(format!(
            "{} descriptors, more than the bound of {} (request.max_descriptors)",
            request.descriptors.len(),
            bounds.max_descriptors
        ));
    }
    for (i, d) in request.descriptors.iter().enumerate() {
        if d.entries.is_empty() {
            return invalid(format!("descriptor {i} has no entries"));
        }
        if d.entries.len() > bounds.max_entries {
            return invalid(format!(
                "descriptor {i} has {} entries, more than the bound of {} (request.max_entries)",
                d.entries.len(),
                bounds.max_entries
            ));
        }
        for (j, e) in d.entries.iter().enumerate() {
            if e.key.is_empty() {
                return invalid(format!("descriptor {i} entry {j} has an empty key"));
            }
            if e.key.len() > bounds.max_key_bytes {
                return invalid(format!(
                    "descriptor {i} entry {j} has a key (\"{}...\") of {} bytes, more than the bound of {} (request.max_key_bytes); entry keys come from Envoy's descriptor_key settings",
                    truncate(&e.key, 64),
                    e.key.len(),
                    bounds.max_key_bytes
                ));
            }
        }
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
