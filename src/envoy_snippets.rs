//! `sluice envoy local-reply`: the part of Envoy's configuration that makes a route's
//! `rejected_code` reach the client.
//!
//! Envoy answers a rate-limited request with its filter's status (429), whatever the rate
//! limit service says. But sluice puts the deciding route's `rejected_code` in the answer's
//! `dynamic_metadata`, and Envoy's `local_reply_config` can map a local reply by that
//! metadata. This prints one mapper per distinct code other than 429 in use, ready to paste
//! into the HTTP connection manager; the body stays the route's `rejected_msg` (the RLS
//! `raw_body`), and the client still sees `x-envoy-ratelimited: true`.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::limits::LimitSet;

/// The `local_reply_config` block for `limits`, indented by `indent` spaces; `None` when every
/// route answers 429 (nothing to map).
pub fn local_reply(limits: &LimitSet, indent: usize) -> Option<String> {
    let codes: BTreeSet<u16> = limits
        .domains
        .values()
        .flat_map(|d| d.routes().values())
        .map(|r| r.settings.rejected_code.value)
        .filter(|code| *code != 429)
        .collect();
    if codes.is_empty() {
        return None;
    }
    let pad = " ".repeat(indent);
    let mut out = String::new();
    let _ = writeln!(out, "{pad}local_reply_config:");
    let _ = writeln!(out, "{pad}  mappers:");
    for code in codes {
        let _ = writeln!(out, "{pad}    - filter:");
        let _ = writeln!(out, "{pad}        metadata_filter:");
        let _ = writeln!(out, "{pad}          matcher:");
        let _ = writeln!(out, "{pad}            filter: envoy.filters.http.ratelimit");
        let _ = writeln!(out, "{pad}            path: [{{ key: rejected_code }}]");
        let _ = writeln!(
            out,
            "{pad}            value: {{ double_match: {{ exact: {code} }} }}"
        );
        let _ = writeln!(out, "{pad}          match_if_key_not_found: false");
        let _ = writeln!(out, "{pad}      status_code: {code}");
    }
    Some(out)
}
