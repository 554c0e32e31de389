//! `rate_limit_headers: ietf` over real gRPC: `RateLimit-Policy` lists each descriptor's
//! policy, `RateLimit` reports the most restrictive one, and the numbers are the statuses'.

mod common;

use common::rls::{desc, header, request};
use common::sluice::Sluice;
use sfv::{BareItem, ListEntry, Parser};

const LIMITS: &str = "\
domain: web
defaults:
  rate_limit_headers: ietf
routes:
  - name: api
    global_threshold: { query_per_minute: 100 }
  - name: users
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - { key: '*', query_per_second: 3 }
  - name: legacy
    rate_limit_headers: x_ratelimit
    global_threshold: { query_per_hour: 50 }
  - name: quiet
    rate_limit_headers: none
    show_limit_quota_header: false
    global_threshold: { query_per_second: 1 }
";

/// (policy name, parameters) of each member of a structured-field list.
fn members(value: &str) -> Vec<(String, Vec<(String, i64)>)> {
    let list: sfv::List = Parser::new(value)
        .parse()
        .unwrap_or_else(|e| panic!("{value:?} is not an RFC 9651 list: {e}"));
    list.into_iter()
        .map(|entry| match entry {
            ListEntry::Item(item) => {
                let BareItem::String(name) = &item.bare_item else {
                    panic!("policy name must be an sf-string in {value:?}")
                };
                let params = item
                    .params
                    .iter()
                    .map(|(k, v)| {
                        let n = v.as_integer().expect("integer parameter");
                        (k.as_str().to_string(), i64::from(n))
                    })
                    .collect();
                (name.as_str().to_string(), params)
            }
            ListEntry::InnerList(_) => panic!("no inner lists"),
        })
        .collect()
}

fn param(params: &[(String, i64)], key: &str) -> i64 {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no {key} in {params:?}"))
}

#[tokio::test]
async fn one_descriptor_reports_its_policy_and_quota_from_the_status() {
    let mut sluice = Sluice::start(&[("web.yaml", LIMITS)]).await;
    sluice.to_next_window(60_000);
    let response = sluice
        .call(request("web", vec![desc(&[("route", "api")])]))
        .await;
    let status = &response.statuses[0];
    let policy = members(header(&response, "RateLimit-Policy").expect("RateLimit-Policy"));
    assert_eq!(policy.len(), 1);
    assert_eq!(policy[0].0, "api/global");
    assert_eq!(param(&policy[0].1, "q"), 100);
    assert_eq!(param(&policy[0].1, "w"), 60);
    let current = members(header(&response, "RateLimit").expect("RateLimit"));
    assert_eq!(current[0].0, "api/global");
    assert_eq!(param(&current[0].1, "r"), i64::from(status.limit_remaining));
    let reset = status.duration_until_reset.as_ref().unwrap();
    let reset_secs = reset.seconds + i64::from(reset.nanos > 0);
    assert_eq!(param(&current[0].1, "t"), reset_secs);
    assert!(
        header(&response, "X-RateLimit-Limit").is_none(),
        "ietf only"
    );
}

#[tokio::test]
async fn several_descriptors_list_every_policy_and_report_the_most_restrictive() {
    let mut sluice = Sluice::start(&[("web.yaml", LIMITS)]).await;
    sluice.to_next_window(60_000);
    let mut last = None;
    for _ in 0..2 {
        last = Some(
            sluice
                .call(request(
                    "web",
                    vec![
                        desc(&[("route", "api")]),
                        desc(&[("route", "users"), ("x-api-key", "k1")]),
                    ],
                ))
                .await,
        );
    }
    let response = last.unwrap();
    let policy = members(header(&response, "RateLimit-Policy").unwrap());
    let names: Vec<&str> = policy.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["api/global", "users/per_header:x-api-key=*"]);
    assert_eq!(param(&policy[1].1, "q"), 3);
    assert_eq!(param(&policy[1].1, "w"), 1);
    // users has 1 of 3 left, api 98 of 100: users is reported.
    let current = members(header(&response, "RateLimit").unwrap());
    assert_eq!(current.len(), 1);
    assert_eq!(current[0].0, "users/per_header:x-api-key=*");
    assert_eq!(param(&current[0].1, "r"), 1);
    assert_eq!(response.statuses[1].limit_remaining, 1);
}

#[tokio::test]
async fn styles_are_per_route_and_none_adds_nothing() {
    let mut sluice = Sluice::start(&[("web.yaml", LIMITS)]).await;
    let response = sluice
        .call(request(
            "web",
            vec![desc(&[("route", "legacy")]), desc(&[("route", "api")])],
        ))
        .await;
    assert_eq!(header(&response, "X-RateLimit-Limit"), Some("50"));
    assert_eq!(header(&response, "X-RateLimit-Remaining"), Some("49"));
    let policy = members(header(&response, "RateLimit-Policy").unwrap());
    assert_eq!(policy.len(), 1, "only ietf routes are listed");

    let quiet = sluice
        .call(request("web", vec![desc(&[("route", "quiet")])]))
        .await;
    assert!(quiet.response_headers_to_add.is_empty());
}
