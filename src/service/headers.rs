//! The quota headers a route can ask for in `response_headers_to_add`: the de-facto
//! `X-RateLimit-*` trio, or the IETF draft's `RateLimit-Policy` and `RateLimit` structured
//! fields (draft-ietf-httpapi-ratelimit-headers).
//!
//! Only formatting lives here; which descriptors take part, and which is the most
//! restrictive, is decided by the response builder.
//!
//! The IETF fields are RFC 9651 lists: each policy is an sf-string (its name, `route/rule`)
//! with parameters `q` (quota), `w` (window, seconds) on `RateLimit-Policy`, and `r`
//! (remaining) and `t` (seconds until reset) on `RateLimit`. Names are config names, but they
//! may still hold characters an sf-string cannot carry; those become `_`.

use crate::proto::core::HeaderValue;

/// One descriptor's quota, as the headers show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota<'a> {
    /// `route/rule`.
    pub name: &'a str,
    pub limit: u64,
    pub window_secs: u64,
    pub remaining: u64,
    pub reset_secs: u64,
}

fn header(key: &str, value: String) -> HeaderValue {
    HeaderValue {
        key: key.to_string(),
        value,
    }
}

/// `X-RateLimit-Limit/Remaining/Reset` of one quota (the most restrictive).
pub fn x_ratelimit(quota: &Quota<'_>) -> Vec<HeaderValue> {
    vec![
        header("X-RateLimit-Limit", quota.limit.to_string()),
        header("X-RateLimit-Remaining", quota.remaining.to_string()),
        header("X-RateLimit-Reset", quota.reset_secs.to_string()),
    ]
}

/// `RateLimit-Policy` listing every policy, and `RateLimit` for the most restrictive one.
pub fn ietf(policies: &[Quota<'_>], tightest: &Quota<'_>) -> Vec<HeaderValue> {
    let policy = policies
        .iter()
        .map(|q| {
            format!(
                "{};q={};w={}",
                sf_string(q.name),
                q.limit,
                q.window_secs.max(1)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let current = format!(
        "{};r={};t={}",
        sf_string(tightest.name),
        tightest.remaining,
        tightest.reset_secs
    );
    vec![
        header("RateLimit-Policy", policy),
        header("RateLimit", current),
    ]
}

/// An RFC 9651 sf-string: printable ASCII in quotes, `"` and `\` escaped, anything else `_`.
fn sf_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('_'),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sfv::{BareItem, ListEntry, Parser};

    fn quota(
        name: &str,
        limit: u64,
        window_secs: u64,
        remaining: u64,
        reset_secs: u64,
    ) -> Quota<'_> {
        Quota {
            name,
            limit,
            window_secs,
            remaining,
            reset_secs,
        }
    }

    /// Parses a header as an RFC 9651 list: (name, [(param, integer)]) per member.
    fn parse(value: &str) -> Vec<(String, Vec<(String, i64)>)> {
        let list: sfv::List = Parser::new(value)
            .parse()
            .unwrap_or_else(|e| panic!("{value:?} is not a structured field list: {e}"));
        list.into_iter()
            .map(|entry| match entry {
                ListEntry::Item(item) => {
                    let name = match &item.bare_item {
                        BareItem::String(s) => s.as_str().to_string(),
                        other => panic!("policy name must be an sf-string, got {other:?}"),
                    };
                    let params = item
                        .params
                        .iter()
                        .map(|(k, v)| {
                            let n = v
                                .as_integer()
                                .map(i64::from)
                                .unwrap_or_else(|| panic!("{k:?} not an integer"));
                            (k.as_str().to_string(), n)
                        })
                        .collect();
                    (name, params)
                }
                ListEntry::InnerList(_) => panic!("no inner lists expected"),
            })
            .collect()
    }

    fn value<'a>(headers: &'a [HeaderValue], key: &str) -> &'a str {
        &headers
            .iter()
            .find(|h| h.key == key)
            .unwrap_or_else(|| panic!("no {key}"))
            .value
    }

    #[test]
    fn single_policy_follows_the_draft_syntax() {
        let q = quota("api/global", 100, 60, 42, 17);
        let headers = ietf(&[q], &q);
        assert_eq!(
            value(&headers, "RateLimit-Policy"),
            "\"api/global\";q=100;w=60"
        );
        assert_eq!(value(&headers, "RateLimit"), "\"api/global\";r=42;t=17");
        assert_eq!(
            parse(value(&headers, "RateLimit-Policy")),
            [(
                "api/global".to_string(),
                vec![("q".into(), 100), ("w".into(), 60)]
            )]
        );
        assert_eq!(
            parse(value(&headers, "RateLimit")),
            [(
                "api/global".to_string(),
                vec![("r".into(), 42), ("t".into(), 17)]
            )]
        );
    }

    #[test]
    fn several_policies_are_listed_and_the_tightest_is_reported() {
        let minute = quota("api/global", 1000, 60, 900, 30);
        let second = quota("api-users/per_header:x-api-key=*", 10, 1, 1, 1);
        let headers = ietf(&[minute, second], &second);
        let policies = parse(value(&headers, "RateLimit-Policy"));
        assert_eq!(policies.len(), 2);
        assert_eq!(policies[1].0, "api-users/per_header:x-api-key=*");
        assert_eq!(
            parse(value(&headers, "RateLimit")),
            [(
                second.name.to_string(),
                vec![("r".into(), 1), ("t".into(), 1)]
            )]
        );
    }

    #[test]
    fn names_that_sf_strings_cannot_carry_are_escaped_or_replaced() {
        let q = quota("r\"o\\ute/é\n", 5, 1, 0, 1);
        let headers = ietf(&[q], &q);
        let parsed = parse(value(&headers, "RateLimit"));
        assert_eq!(parsed[0].0, "r\"o\\ute/__");
    }

    #[test]
    fn x_ratelimit_has_the_three_numbers() {
        let headers = x_ratelimit(&quota("a/b", 5, 60, 4, 59));
        let pairs: Vec<(&str, &str)> = headers
            .iter()
            .map(|h| (h.key.as_str(), h.value.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("X-RateLimit-Limit", "5"),
                ("X-RateLimit-Remaining", "4"),
                ("X-RateLimit-Reset", "59")
            ]
        );
    }
}
