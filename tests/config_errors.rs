//! Load errors of limits files, `sluice check`, and the resolved model
//! (inheritance, rule identity).
//!
//! Every error test checks the error's file, line, route and field, and that its rendering
//! names the file, the route and the field. The expected line is the line where the reported
//! field is written; when the field is absent (a route without limits, an item without
//! `limit_keys`), the line where the route, item or key that lacks it starts.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::config::{
    Expect, Files, assert_error, domain_of, errors_of, find, line_equal, line_of, line_of_nth,
    render, route, rules, single,
};
use common::repo;
use common::sluice::sluice_command;
use sluice::config::{Domain, LimitBy, RouteLimits, load_paths};
use sluice::limiter::{Threshold, Unit};

fn expect<'a>(file: &'a std::path::Path, line: u64, route: &'a str, field: &'a str) -> Expect<'a> {
    Expect {
        file,
        line,
        route: Some(route),
        field,
    }
}

// ---------------------------------------------------------------------------------------------
// Limits: one kind per route, present after inheritance.

#[test]
fn route_with_both_global_threshold_and_rule_items_is_rejected() {
    let text = "\
domain: edge
routes:
  - name: fine
    global_threshold: { query_per_second: 1 }
  - name: both
    global_threshold: { query_per_minute: 10 }
    rule_items:
      - limit_by_header: x-plan
        limit_keys: [{ key: gold, query_per_second: 5 }]
";
    let (file, errors) = errors_of(text);
    let err = single(&errors);
    assert_error(
        err,
        expect(
            &file,
            line_of(text, "global_threshold: { query_per_minute: 10 }"),
            "both",
            "global_threshold",
        ),
    );
    assert!(err.message.contains("rule_items"), "{err}");
}

#[test]
fn route_with_neither_limits_nor_parent_is_rejected() {
    let text = "\
domain: edge
routes:
  - name: fine
    global_threshold: { query_per_second: 1 }
  - name: empty
    rejected_code: 503
";
    let (file, errors) = errors_of(text);
    let err = single(&errors);
    assert_error(
        err,
        expect(
            &file,
            line_of(text, "- name: empty"),
            "empty",
            "global_threshold",
        ),
    );
    assert!(
        err.message.contains("global_threshold") && err.message.contains("rule_items"),
        "the fix names both kinds: {err}"
    );
}

#[test]
fn child_of_a_parent_without_limits_is_rejected_as_well_as_the_parent() {
    let text = "\
domain: edge
routes:
  - name: child
    parent: base
  - name: base
    rejected_code: 503
";
    let (file, errors) = errors_of(text);
    assert_eq!(errors.len(), 2, "{}", render(&errors));
    assert_error(
        find(&errors, Some("child"), "global_threshold"),
        expect(
            &file,
            line_of(text, "- name: child"),
            "child",
            "global_threshold",
        ),
    );
    assert_error(
        find(&errors, Some("base"), "global_threshold"),
        expect(
            &file,
            line_of(text, "- name: base"),
            "base",
            "global_threshold",
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// Thresholds and rule items.

#[test]
fn global_threshold_with_two_rates_of_one_period_is_rejected() {
    // Two rates of different periods are two limits on the key (burst and sustained); two of
    // the same period would count one window twice.
    let text = "\
domain: edge
routes:
  - name: two
    global_threshold:
      requests: 30
      window: 1s
      query_per_second: 1
";
    let (file, errors) = errors_of(text);
    let err = single(&errors);
    assert_error(
        err,
        expect(
            &file,
            line_of(text, "global_threshold:"),
            "two",
            "global_threshold",
        ),
    );
    assert!(
        err.message.contains("query_per_second")
            && err.message.contains("requests")
            && err.message.contains("same period"),
        "{err}"
    );
}

#[test]
fn limit_key_with_two_rates_of_one_period_is_rejected() {
    let text = "\
domain: edge
routes:
  - name: keyed
    rule_items:
      - limit_by_header: x-plan
        limit_keys:
          - { key: silver, query_per_second: 1 }
          - { key: gold, query_per_hour: 100, requests: 5, window: 60m }
";
    let (file, errors) = errors_of(text);
    let err = single(&errors);
    assert_error(
        err,
        expect(
            &file,
            line_of(text, "key: gold"),
            "keyed",
            "rule_items[0].limit_keys[1]",
        ),
    );
    assert!(
        err.message.contains("query_per_hour") && err.message.contains("requests"),
        "{err}"
    );
}

#[test]
fn rule_item_with_two_limit_by_kinds_is_rejected() {
    let text = "\
domain: edge
routes:
  - name: kinds
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys: [{ key: \"*\", query_per_second: 1 }]
      - limit_by_header: x-plan
        limit_by_per_ip: from-remote-addr
        limit_keys: [{ key: gold, query_per_second: 1 }]
";
    let (file, errors) = errors_of(text);
    let err = single(&errors);
    assert_error(
        err,
        expect(
            &file,
            line_of(text, "limit_by_per_ip: from-remote-addr"),
            "kinds",
            "rule_items[1].limit_by_per_ip",
        ),
    );
    assert!(
        err.message.contains("limit_by_header") && err.message.contains("limit_by_per_ip"),
        "{err}"
    );
}

#[test]
fn empty_limit_keys_is_rejected() {
    let text = "\
domain: edge
routes:
  - name: nokeys
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys: []
";
    let (file, errors) = errors_of(text);
    assert_error(
        single(&errors),
        expect(
            &file,
            line_of(text, "limit_keys: []"),
            "nokeys",
            "rule_items[0].limit_keys",
        ),
    );
}

#[test]
fn missing_limit_keys_is_rejected() {
    let text = "\
domain: edge
routes:
  - name: nokeys
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys: [{ key: \"*\", query_per_second: 1 }]
      - limit_by_per_cookie: session
";
    let (file, errors) = errors_of(text);
    assert_error(
        single(&errors),
        expect(
            &file,
            line_of(text, "- limit_by_per_cookie: session"),
            "nokeys",
            "rule_items[1].limit_keys",
        ),
    );
}

#[test]
fn bad_regexp_key_is_rejected() {
    let text = "\
domain: edge
routes:
  - name: re
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - { key: \"regexp:^vip-\", query_per_second: 100 }
          - { key: \"regexp:(\", query_per_second: 10 }
";
    let (file, errors) = errors_of(text);
    let err = single(&errors);
    assert_error(
        err,
        expect(
            &file,
            line_of(text, "regexp:("),
            "re",
            "rule_items[0].limit_keys[1].key",
        ),
    );
    assert!(err.message.contains("regexp"), "{err}");
}

#[test]
fn bad_cidr_and_non_address_keys_are_rejected() {
    let text = "\
domain: edge
routes:
  - name: ips
    rule_items:
      - limit_by_per_ip: from-remote-addr
        limit_keys:
          - { key: \"10.0.0.0/8\", query_per_minute: 600 }
          - { key: \"10.0.0.0/33\", query_per_minute: 60 }
          - { key: \"not-an-address\", query_per_minute: 60 }
";
    let (file, errors) = errors_of(text);
    assert_eq!(errors.len(), 2, "{}", render(&errors));
    let cidr = find(&errors, Some("ips"), "rule_items[0].limit_keys[1].key");
    assert_error(
        cidr,
        expect(
            &file,
            line_of(text, "10.0.0.0/33"),
            "ips",
            "rule_items[0].limit_keys[1].key",
        ),
    );
    assert!(cidr.message.contains("10.0.0.0/33"), "{cidr}");
    let word = find(&errors, Some("ips"), "rule_items[0].limit_keys[2].key");
    assert_error(
        word,
        expect(
            &file,
            line_of(text, "not-an-address"),
            "ips",
            "rule_items[0].limit_keys[2].key",
        ),
    );
    assert!(word.message.contains("not-an-address"), "{word}");
}

#[test]
fn limit_by_per_ip_accepts_only_remote_addr_or_a_named_header() {
    let text = "\
domain: edge
routes:
  - name: ips
    rule_items:
      - limit_by_per_ip: from-somewhere
        limit_keys: [{ key: \"*\", query_per_second: 1 }]
      - limit_by_per_ip: from-header-
        limit_keys: [{ key: \"*\", query_per_second: 1 }]
      - limit_by_per_ip: x-forwarded-for
        limit_keys: [{ key: \"*\", query_per_second: 1 }]
      - limit_by_per_ip: from-header-x-real-ip
        limit_keys: [{ key: \"*\", query_per_second: 1 }]
      - limit_by_per_ip: from-remote-addr
        limit_keys: [{ key: \"*\", query_per_second: 1 }]
";
    let (file, errors) = errors_of(text);
    assert_eq!(errors.len(), 3, "{}", render(&errors));
    for (i, value) in ["from-somewhere", "from-header-", "x-forwarded-for"]
        .into_iter()
        .enumerate()
    {
        let field = format!("rule_items[{i}].limit_by_per_ip");
        let err = find(&errors, Some("ips"), &field);
        assert_error(
            err,
            expect(
                &file,
                line_equal(text, &format!("      - limit_by_per_ip: {value}")),
                "ips",
                &field,
            ),
        );
        assert!(err.message.contains("from-remote-addr"), "{err}");
    }
}

#[test]
fn exact_kind_keys_must_be_values_and_per_kind_keys_must_be_patterns() {
    let text = "\
domain: edge
routes:
  - name: exact
    rule_items:
      - limit_by_header: x-plan
        limit_keys:
          - { key: gold, query_per_second: 10 }
          - { key: \"regexp:^sil\", query_per_second: 5 }
          - { key: \"*\", query_per_second: 1 }
  - name: per
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - { key: \"*\", query_per_second: 10 }
          - { key: vip-1, query_per_second: 100 }
";
    let (file, errors) = errors_of(text);
    assert_eq!(errors.len(), 3, "{}", render(&errors));
    let regexp = find(&errors, Some("exact"), "rule_items[0].limit_keys[1].key");
    assert_error(
        regexp,
        expect(
            &file,
            line_of(text, "regexp:^sil"),
            "exact",
            "rule_items[0].limit_keys[1].key",
        ),
    );
    assert!(regexp.message.contains("limit_by_per_header"), "{regexp}");
    assert_error(
        find(&errors, Some("exact"), "rule_items[0].limit_keys[2].key"),
        expect(
            &file,
            line_of_nth(text, "key: \"*\"", 0),
            "exact",
            "rule_items[0].limit_keys[2].key",
        ),
    );
    let exact = find(&errors, Some("per"), "rule_items[0].limit_keys[1].key");
    assert_error(
        exact,
        expect(
            &file,
            line_of(text, "key: vip-1"),
            "per",
            "rule_items[0].limit_keys[1].key",
        ),
    );
    assert!(exact.message.contains("limit_by_header"), "{exact}");
}

// ---------------------------------------------------------------------------------------------
// Delegation: parents.

#[test]
fn unknown_parent_is_rejected() {
    let text = "\
domain: edge
routes:
  - name: orphan
    parent: nobody
    global_threshold: { query_per_second: 1 }
";
    let (file, errors) = errors_of(text);
    let err = single(&errors);
    assert_error(
        err,
        expect(&file, line_of(text, "parent: nobody"), "orphan", "parent"),
    );
    assert!(err.message.contains("nobody"), "{err}");
}

#[test]
fn parent_cycle_is_rejected() {
    let text = "\
domain: edge
routes:
  - name: a
    parent: b
    global_threshold: { query_per_second: 1 }
  - name: b
    parent: a
  - name: fine
    global_threshold: { query_per_second: 1 }
";
    let (file, errors) = errors_of(text);
    assert!(!errors.is_empty());
    for err in &errors {
        let route = err.route.as_deref();
        let parent_line = match route {
            Some("a") => line_of(text, "parent: b"),
            Some("b") => line_of(text, "parent: a"),
            _ => panic!(
                "a cycle error names a route of the cycle:\n{}",
                render(&errors)
            ),
        };
        assert_error(err, expect(&file, parent_line, route.unwrap(), "parent"));
    }
    assert!(
        errors
            .iter()
            .any(|e| e.message.contains("a -> b -> a") || e.message.contains("b -> a -> b")),
        "the message shows the cycle:\n{}",
        render(&errors)
    );
}

#[test]
fn route_that_is_its_own_parent_is_rejected() {
    let text = "\
domain: edge
routes:
  - name: selfish
    parent: selfish
    global_threshold: { query_per_second: 1 }
";
    let (file, errors) = errors_of(text);
    let err = single(&errors);
    assert_error(
        err,
        expect(&file, line_of(text, "parent: selfish"), "selfish", "parent"),
    );
}

#[test]
fn duplicate_route_names_are_rejected_at_the_second() {
    let text = "\
domain: edge
routes:
  - name: twice
    global_threshold: { query_per_second: 1 }
  - name: other
    global_threshold: { query_per_second: 1 }
  - name: twice
    global_threshold: { query_per_second: 2 }
";
    let (file, errors) = errors_of(text);
    let err = single(&errors);
    assert_error(
        err,
        expect(
            &file,
            line_of_nth(text, "- name: twice", 1),
            "twice",
            "name",
        ),
    );
}

#[test]
fn duplicate_domain_across_two_files_names_both_files() {
    let files = Files::new();
    let first_text = "\
# first
domain: edge
routes:
  - name: a
    global_threshold: { query_per_second: 1 }
";
    let second_text = "\
# second
# defines edge again
domain: edge
routes:
  - name: b
    global_threshold: { query_per_second: 1 }
";
    let first = files.write("a.yaml", first_text);
    let second = files.write("b.yaml", second_text);
    let errors = load_paths(&[files.path().to_path_buf()])
        .expect_err("two files with one domain")
        .0;
    let err = single(&errors);
    let mut wrong = Vec::new();
    if err.file != second {
        wrong.push(format!("file: expected {}", second.display()));
    }
    if err.line != Some(line_of(second_text, "domain: edge")) {
        wrong.push(format!(
            "line: expected Some({}) (the `domain:` line)",
            line_of(second_text, "domain: edge")
        ));
    }
    if err.field != "domain" {
        wrong.push("field: expected \"domain\"".into());
    }
    if err.route.is_some() {
        wrong.push("route: expected None".into());
    }
    let shown = err.to_string();
    for f in [&first, &second] {
        if !shown.contains(&f.display().to_string()) {
            wrong.push(format!("display does not name {}", f.display()));
        }
    }
    if !shown.contains("edge") {
        wrong.push("display does not name the domain".into());
    }
    assert!(
        wrong.is_empty(),
        "{}\ngot: {shown}\n{err:?}",
        wrong.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Typos: unknown fields at every level are errors, never ignored.

/// Checks an unknown-field error: found, located, and naming the misspelt field.
fn assert_unknown_field(text: &str, typo_line: &str, route: Option<&str>, field: &str) {
    let (file, errors) = errors_of(text);
    // Unknown fields are reported first; a typo may also leave a required field missing,
    // which is reported after it (`query_per_secnd` leaves the key without a rate).
    let err = errors
        .first()
        .unwrap_or_else(|| panic!("expected an unknown-field error, got none"));
    assert_error(
        err,
        Expect {
            file: &file,
            line: line_of(text, typo_line),
            route,
            field,
        },
    );
    let name = field.rsplit('.').next().unwrap();
    assert!(err.message.contains(name), "{err}");
}

#[test]
fn unknown_top_level_field_is_rejected() {
    // After the routes, so a route-finding heuristic must not claim it.
    let text = "\
domain: edge
routes:
  - name: a
    global_threshold: { query_per_second: 1 }
alow_limit_override: false
";
    assert_unknown_field(text, "alow_limit_override", None, "alow_limit_override");
}

#[test]
fn unknown_field_in_defaults_is_rejected() {
    let text = "\
domain: edge
defaults:
  rejected_code: 429
  rejeted_msg: slow down
routes:
  - name: a
    global_threshold: { query_per_second: 1 }
";
    assert_unknown_field(text, "rejeted_msg", None, "defaults.rejeted_msg");
}

#[test]
fn unknown_field_in_route_is_rejected() {
    let text = "\
domain: edge
routes:
  - name: a
    global_threshold: { query_per_second: 1 }
  - name: b
    global_threshold: { query_per_second: 1 }
    rejeted_msg: slow down
";
    assert_unknown_field(text, "rejeted_msg", Some("b"), "rejeted_msg");
}

#[test]
fn unknown_field_in_rule_item_is_rejected() {
    let text = "\
domain: edge
routes:
  - name: a
    rule_items:
      - limit_by_header: x-plan
        limit_keys: [{ key: gold, query_per_second: 1 }]
      - limit_by_header: x-region
        descriptor_kee: region
        limit_keys: [{ key: eu, query_per_second: 1 }]
";
    assert_unknown_field(
        text,
        "descriptor_kee",
        Some("a"),
        "rule_items[1].descriptor_kee",
    );
}

#[test]
fn unknown_field_in_limit_key_is_rejected() {
    let text = "\
domain: edge
routes:
  - name: a
    rule_items:
      - limit_by_header: x-plan
        limit_keys:
          - { key: gold, query_per_second: 1 }
          - { key: silver, query_per_secnd: 1 }
";
    assert_unknown_field(
        text,
        "query_per_secnd",
        Some("a"),
        "rule_items[0].limit_keys[1].query_per_secnd",
    );
}

#[test]
fn unknown_field_in_threshold_is_rejected() {
    let text = "\
domain: edge
routes:
  - name: a
    global_threshold:
      query_per_minute: 5
      bust: 10
";
    assert_unknown_field(text, "bust", Some("a"), "global_threshold.bust");
}

// ---------------------------------------------------------------------------------------------
// Route settings.

#[test]
fn burst_on_a_route_that_is_not_token_bucket_is_rejected() {
    let text = "\
domain: edge
routes:
  - name: global
    global_threshold: { query_per_second: 10, burst: 20 }
  - name: keyed
    rule_items:
      - limit_by_header: x-plan
        limit_keys:
          - { key: gold, query_per_second: 10, burst: 20 }
";
    let (file, errors) = errors_of(text);
    assert_eq!(errors.len(), 2, "{}", render(&errors));
    let global = &errors[0];
    assert_error(
        global,
        expect(
            &file,
            line_of(
                text,
                "global_threshold: { query_per_second: 10, burst: 20 }",
            ),
            "global",
            "global_threshold.burst",
        ),
    );
    assert!(global.message.contains("token_bucket"), "{global}");
    assert_error(
        &errors[1],
        expect(
            &file,
            line_of_nth(text, "burst: 20", 1),
            "keyed",
            "rule_items[0].limit_keys[0].burst",
        ),
    );
}

#[test]
fn bad_timeout_is_rejected() {
    let text = "\
domain: edge
routes:
  - name: slow
    global_threshold: { query_per_second: 1 }
    timeout: soon
  - name: zero
    global_threshold: { query_per_second: 1 }
    timeout: 0s
";
    let (file, errors) = errors_of(text);
    assert_eq!(errors.len(), 2, "{}", render(&errors));
    let soon = find(&errors, Some("slow"), "timeout");
    assert_error(
        soon,
        expect(&file, line_of(text, "timeout: soon"), "slow", "timeout"),
    );
    assert!(soon.message.contains("soon"), "{soon}");
    assert_error(
        find(&errors, Some("zero"), "timeout"),
        expect(&file, line_of(text, "timeout: 0s"), "zero", "timeout"),
    );
}

#[test]
fn bad_timeout_in_defaults_is_rejected() {
    let text = "\
domain: edge
defaults:
  timeout: later
routes:
  - name: a
    global_threshold: { query_per_second: 1 }
";
    let (file, errors) = errors_of(text);
    assert!(!errors.is_empty());
    assert_error(
        find(&errors, None, "defaults.timeout"),
        Expect {
            file: &file,
            line: line_of(text, "timeout: later"),
            route: None,
            field: "defaults.timeout",
        },
    );
}

#[test]
fn rejected_code_outside_http_statuses_is_rejected() {
    let text = "\
domain: edge
routes:
  - name: big
    global_threshold: { query_per_second: 1 }
    rejected_code: 600
  - name: small
    global_threshold: { query_per_second: 1 }
    rejected_code: 42
";
    let (file, errors) = errors_of(text);
    assert_eq!(errors.len(), 2, "{}", render(&errors));
    let big = find(&errors, Some("big"), "rejected_code");
    assert_error(
        big,
        expect(
            &file,
            line_of(text, "rejected_code: 600"),
            "big",
            "rejected_code",
        ),
    );
    assert!(big.message.contains("600"), "{big}");
    assert_error(
        find(&errors, Some("small"), "rejected_code"),
        expect(
            &file,
            line_of(text, "rejected_code: 42"),
            "small",
            "rejected_code",
        ),
    );
}

#[test]
fn rejected_code_that_is_not_a_number_is_rejected() {
    let text = "\
domain: edge
routes:
  - name: a
    global_threshold: { query_per_second: 1 }
  - name: teapot
    global_threshold: { query_per_second: 1 }
    rejected_code: teapot
";
    let (file, errors) = errors_of(text);
    assert_error(
        single(&errors),
        expect(
            &file,
            line_of(text, "rejected_code: teapot"),
            "teapot",
            "rejected_code",
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// Every error is reported, not only the first.

#[test]
fn every_error_of_every_file_is_reported() {
    let text = "\
domain: edge
defaults:
  timeout: later
routes:
  - name: ok
    global_threshold: { query_per_second: 1 }
  - name: settings
    global_threshold: { query_per_second: 1 }
    rejected_code: 600
    timeout: soon
  - name: both
    global_threshold: { query_per_second: 1 }
    rule_items:
      - limit_by_header: x
        limit_keys: [{ key: a, query_per_second: 1 }]
  - name: rates
    global_threshold: { query_per_minute: 1, requests: 3, window: 60s }
  - name: items
    rule_items:
      - { limit_by_header: x, limit_by_per_ip: from-remote-addr, limit_keys: [{ key: a, query_per_second: 1 }] }
      - { limit_by_per_header: y, limit_keys: [] }
      - limit_by_per_header: y
        limit_keys:
          - { key: \"regexp:(\", query_per_second: 1 }
          - { key: exact, query_per_second: 1 }
      - { limit_by_per_ip: from-somewhere, limit_keys: [{ key: \"*\", query_per_second: 1 }] }
      - limit_by_per_ip: from-remote-addr
        limit_keys:
          - { key: \"10.0.0.0/33\", query_per_second: 1 }
  - name: orphan
    parent: nobody
  - name: c1
    parent: c2
  - name: c2
    parent: c1
  - name: ok
    global_threshold: { query_per_second: 1 }
  - name: none
";
    let other = "\
domain: other
routes:
  - name: x
    rule_items:
      - limit_by_per_cookie: session
        limit_keys: [{ key: \"regexp:[\", query_per_second: 1 }]
";
    let files = Files::new();
    let file = files.write("a.yaml", text);
    let other_file = files.write("b.yaml", other);
    let errors = load_paths(&[files.path().to_path_buf()])
        .expect_err("broken files")
        .0;
    let expected: &[(&PathBuf, Option<&str>, &str)] = &[
        (&file, None, "defaults.timeout"),
        (&file, Some("settings"), "rejected_code"),
        (&file, Some("settings"), "timeout"),
        (&file, Some("both"), "global_threshold"),
        (&file, Some("rates"), "global_threshold"),
        (&file, Some("items"), "rule_items[0].limit_by_per_ip"),
        (&file, Some("items"), "rule_items[1].limit_keys"),
        (&file, Some("items"), "rule_items[2].limit_keys[0].key"),
        (&file, Some("items"), "rule_items[2].limit_keys[1].key"),
        (&file, Some("items"), "rule_items[3].limit_by_per_ip"),
        (&file, Some("items"), "rule_items[4].limit_keys[0].key"),
        (&file, Some("orphan"), "parent"),
        (&file, Some("ok"), "name"),
        (&file, Some("none"), "global_threshold"),
        (&other_file, Some("x"), "rule_items[0].limit_keys[0].key"),
    ];
    let mut missing = Vec::new();
    for (f, route, field) in expected {
        if !errors
            .iter()
            .any(|e| &e.file == *f && e.route.as_deref() == *route && e.field == *field)
        {
            missing.push(format!("{} {route:?} {field}", f.display()));
        }
    }
    let cycle = errors
        .iter()
        .filter(|e| matches!(e.route.as_deref(), Some("c1" | "c2")) && e.field == "parent")
        .count();
    if cycle == 0 {
        missing.push("the c1/c2 parent cycle".into());
    }
    assert!(
        missing.is_empty(),
        "not reported:\n  {}\nreported:\n{}",
        missing.join("\n  "),
        render(&errors)
    );
    assert_eq!(
        errors.len(),
        expected.len() + cycle,
        "one error per problem:\n{}",
        render(&errors)
    );
}

#[test]
fn a_typo_does_not_hide_the_other_errors_of_the_file() {
    let text = "\
domain: edge
routes:
  - name: typo
    global_threshold: { query_per_second: 1 }
    rejeted_msg: slow down
  - name: both
    global_threshold: { query_per_second: 1 }
    rule_items:
      - limit_by_header: x
        limit_keys: [{ key: a, query_per_second: 1 }]
  - name: second-typo
    global_threshold: { query_per_minute: 1 }
    shadow: true
";
    let (file, errors) = errors_of(text);
    assert_error(
        find(&errors, Some("typo"), "rejeted_msg"),
        expect(&file, line_of(text, "rejeted_msg"), "typo", "rejeted_msg"),
    );
    assert_error(
        find(&errors, Some("second-typo"), "shadow"),
        expect(
            &file,
            line_of(text, "shadow: true"),
            "second-typo",
            "shadow",
        ),
    );
    find(&errors, Some("both"), "global_threshold");
    assert_eq!(errors.len(), 3, "{}", render(&errors));
}

// ---------------------------------------------------------------------------------------------
// `sluice check`.

fn sluice_check(paths: &[&std::path::Path]) -> (Option<i32>, String, String) {
    let out = sluice_command()
        .arg("check")
        .args(paths)
        .output()
        .expect("run sluice check");
    (
        out.status.code(),
        String::from_utf8(out.stdout).expect("utf-8 stdout"),
        String::from_utf8(out.stderr).expect("utf-8 stderr"),
    )
}

#[test]
fn check_fails_on_a_route_with_both_limit_kinds_naming_route_and_file() {
    let files = Files::new();
    let file = files.write(
        "edge.yaml",
        "\
domain: edge
routes:
  - name: greedy-route
    global_threshold: { query_per_second: 1 }
    rule_items:
      - limit_by_header: x
        limit_keys: [{ key: a, query_per_second: 1 }]
",
    );
    let (code, stdout, stderr) = sluice_check(&[&file]);
    assert_eq!(code, Some(1), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.contains("greedy-route"))
        .unwrap_or_else(|| panic!("the route is named:\n{stdout}"));
    assert!(line.contains(&file.display().to_string()), "{line}");
    assert!(line.contains("global_threshold"), "{line}");
    assert!(line.contains("rule_items"), "{line}");
}

#[test]
fn check_prints_every_error_of_every_file_in_a_directory() {
    let files = Files::new();
    let a = files.write(
        "a.yaml",
        "\
domain: a
routes:
  - name: a-both
    global_threshold: { query_per_second: 1 }
    rule_items:
      - limit_by_header: x
        limit_keys: [{ key: a, query_per_second: 1 }]
  - name: a-orphan
    parent: nobody
",
    );
    let b = files.write(
        "b.yaml",
        "\
domain: b
routes:
  - name: b-regexp
    rule_items:
      - limit_by_per_header: y
        limit_keys: [{ key: \"regexp:(\", query_per_second: 1 }]
",
    );
    let c = files.write(
        "c.yml",
        "\
domain: c
routes:
  - name: c-typo
    global_threshold: { query_per_second: 1 }
    rejeted_msg: hi
",
    );
    let (code, stdout, stderr) = sluice_check(&[files.path()]);
    assert_eq!(code, Some(1), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let expected = [
        (&a, "a-both", "global_threshold"),
        (&a, "a-orphan", "parent"),
        (&b, "b-regexp", "rule_items[0].limit_keys[0].key"),
        (&c, "c-typo", "rejeted_msg"),
    ];
    for (file, route, field) in expected {
        let file = file.display().to_string();
        assert!(
            stdout.lines().any(|l| l.starts_with("error: ")
                && l.contains(&file)
                && l.contains(&format!("\"{route}\""))
                && l.contains(field)),
            "no line naming {file}, {route} and {field}:\n{stdout}"
        );
    }
    let errors = stdout.lines().filter(|l| l.starts_with("error: ")).count();
    assert_eq!(errors, expected.len(), "{stdout}");
    assert!(
        stdout.contains(&format!("{} error(s)", expected.len())),
        "{stdout}"
    );
}

#[test]
fn check_accepts_the_example_limits_with_one_summary_line_per_domain() {
    let dir = repo().join("config/limits");
    let (code, stdout, stderr) = sluice_check(&[&dir]);
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[0].starts_with("ok: domain \"edge\""), "{stdout}");
    assert!(lines[0].contains("5 routes"), "{stdout}");
    assert!(lines[1].starts_with("ok: domain \"inflight\""), "{stdout}");
    assert!(lines[1].contains("3 routes"), "{stdout}");
    assert!(lines[2].starts_with("ok: domain \"partners\""), "{stdout}");
    assert!(lines[2].contains("2 routes"), "{stdout}");
}

#[test]
fn check_library_call_reports_errors_and_returns_false() {
    let files = Files::new();
    let file = files.write("edge.yaml", "domain: edge\nroutes:\n  - name: none\n");
    let mut out = Vec::new();
    let ok = sluice::check::check(std::slice::from_ref(&file), &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(!ok, "{out}");
    assert!(out.contains(&file.display().to_string()), "{out}");
    assert!(out.contains("\"none\""), "{out}");
}

// ---------------------------------------------------------------------------------------------
// Delegation: the resolved model.

#[test]
fn child_inherits_every_unset_setting_and_names_where_it_came_from() {
    let domain = domain_of(
        "\
domain: edge
defaults:
  rejected_msg: from defaults
  timeout: 80ms
routes:
  - name: parent
    algorithm: fixed_window
    show_limit_quota_header: true
    rejected_code: 503
    rejected_msg: from parent
    shadow_mode: true
    timeout: 20ms
    global_threshold: { query_per_minute: 100 }
  - name: child
    parent: parent
  - name: plain
    global_threshold: { query_per_minute: 100 }
",
    );
    let child = &route(&domain, "child").settings;
    assert_eq!(child.algorithm.from, "parent");
    assert_eq!(
        (
            child.show_limit_quota_header.value,
            child.show_limit_quota_header.from.as_str()
        ),
        (true, "parent")
    );
    assert_eq!(
        (child.rejected_code.value, child.rejected_code.from.as_str()),
        (503, "parent")
    );
    assert_eq!(
        (
            child.rejected_msg.value.as_str(),
            child.rejected_msg.from.as_str()
        ),
        ("from parent", "parent")
    );
    assert_eq!(
        (child.shadow_mode.value, child.shadow_mode.from.as_str()),
        (true, "parent")
    );
    assert_eq!(
        (child.timeout.value, child.timeout.from.as_str()),
        (std::time::Duration::from_millis(20), "parent")
    );

    let plain = &route(&domain, "plain").settings;
    assert_eq!(
        (
            plain.rejected_msg.value.as_str(),
            plain.rejected_msg.from.as_str()
        ),
        ("from defaults", "defaults")
    );
    assert_eq!(
        (plain.timeout.value, plain.timeout.from.as_str()),
        (std::time::Duration::from_millis(80), "defaults")
    );
    assert_eq!(
        (plain.rejected_code.value, plain.rejected_code.from.as_str()),
        (429, "builtin")
    );
    assert_eq!(
        (plain.shadow_mode.value, plain.shadow_mode.from.as_str()),
        (false, "builtin")
    );
    assert_eq!(
        (
            plain.show_limit_quota_header.value,
            plain.show_limit_quota_header.from.as_str()
        ),
        (false, "builtin")
    );
    assert_eq!(plain.algorithm.from, "builtin");
}

#[test]
fn child_own_setting_wins_over_parent_and_defaults() {
    let domain = domain_of(
        "\
domain: edge
defaults:
  rejected_code: 430
  rejected_msg: from defaults
routes:
  - name: parent
    rejected_code: 503
    timeout: 20ms
    global_threshold: { query_per_minute: 100 }
  - name: child
    parent: parent
    rejected_code: 418
    rejected_msg: from child
    shadow_mode: false
",
    );
    let child = &route(&domain, "child").settings;
    assert_eq!(
        (child.rejected_code.value, child.rejected_code.from.as_str()),
        (418, "child")
    );
    assert_eq!(
        (
            child.rejected_msg.value.as_str(),
            child.rejected_msg.from.as_str()
        ),
        ("from child", "child")
    );
    assert_eq!(
        (child.shadow_mode.value, child.shadow_mode.from.as_str()),
        (false, "child")
    );
    // What it does not set still comes from up the chain.
    assert_eq!(
        (child.timeout.value, child.timeout.from.as_str()),
        (std::time::Duration::from_millis(20), "parent")
    );
    let parent = &route(&domain, "parent").settings;
    assert_eq!(
        (
            parent.rejected_msg.value.as_str(),
            parent.rejected_msg.from.as_str()
        ),
        ("from defaults", "defaults")
    );
}

#[test]
fn limits_are_replaced_whole_never_merged() {
    let domain = domain_of(
        "\
domain: edge
routes:
  - name: global-parent
    global_threshold: { query_per_minute: 100 }
  - name: items-child
    parent: global-parent
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys: [{ key: \"*\", query_per_second: 10 }]
  - name: items-parent
    rule_items:
      - limit_by_header: x-plan
        limit_keys: [{ key: gold, query_per_second: 10 }]
      - limit_by_per_ip: from-remote-addr
        limit_keys: [{ key: \"*\", query_per_second: 1 }]
  - name: global-child
    parent: items-parent
    global_threshold: { query_per_hour: 7 }
  - name: items-over-items
    parent: items-parent
    rule_items:
      - limit_by_per_cookie: session
        limit_keys: [{ key: \"*\", query_per_second: 3 }]
",
    );
    let items_child = route(&domain, "items-child");
    assert_eq!(items_child.limits_from, "items-child");
    match items_child.limits.as_ref() {
        RouteLimits::Items(items) => {
            assert_eq!(items.len(), 1);
            assert_eq!(items[0].kind, LimitBy::PerHeader);
        }
        RouteLimits::Global(_) => panic!("items-child has its own rule items"),
    }
    let global_child = route(&domain, "global-child");
    assert_eq!(global_child.limits_from, "global-child");
    match global_child.limits.as_ref() {
        RouteLimits::Global(rule) => {
            assert_eq!(rule.threshold, Threshold::new(7, Unit::Hour));
        }
        RouteLimits::Items(_) => panic!("global-child has its own global threshold"),
    }
    let over = route(&domain, "items-over-items");
    assert_eq!(over.limits_from, "items-over-items");
    match over.limits.as_ref() {
        RouteLimits::Items(items) => {
            let kinds: Vec<LimitBy> = items.iter().map(|i| i.kind).collect();
            assert_eq!(
                kinds,
                [LimitBy::PerCookie],
                "no item of the parent is added"
            );
        }
        RouteLimits::Global(_) => panic!("items-over-items has rule items"),
    }
}

#[test]
fn child_without_limits_uses_its_ancestors_limits_and_names_them() {
    let domain = domain_of(
        "\
domain: edge
routes:
  - name: grandchild
    parent: child
    rejected_code: 503
  - name: child
    parent: api
  - name: api
    global_threshold: { query_per_minute: 1000 }
",
    );
    for name in ["child", "grandchild"] {
        let r = route(&domain, name);
        assert_eq!(r.limits_from, "api", "{name}");
        match r.limits.as_ref() {
            RouteLimits::Global(rule) => {
                assert_eq!(rule.threshold, Threshold::new(1000, Unit::Minute), "{name}");
                assert_eq!(rule.id, rules(route(&domain, "api"))[0].id, "{name}");
            }
            RouteLimits::Items(_) => panic!("{name} inherits api's global threshold"),
        }
    }
    assert_eq!(
        route(&domain, "grandchild").parent.as_deref(),
        Some("child")
    );
    assert_eq!(route(&domain, "api").limits_from, "api");
}

/// Everything the model says about each route, comparable across loads.
fn summary(domain: &Domain) -> BTreeMap<String, serde_json::Value> {
    domain
        .routes()
        .values()
        .map(|r| {
            let rules: Vec<_> = rules(r)
                .into_iter()
                .map(|rule| {
                    serde_json::json!({
                        "id": rule.id,
                        "name": rule.name,
                        "threshold": rule.threshold,
                    })
                })
                .collect();
            (
                r.name.clone(),
                serde_json::json!({
                    "parent": r.parent,
                    "settings": r.settings,
                    "limits_from": r.limits_from,
                    "rules": rules,
                }),
            )
        })
        .collect()
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![Vec::new()];
    }
    let mut all = Vec::new();
    for rest in permutations(n - 1) {
        for at in 0..=rest.len() {
            let mut p = rest.clone();
            p.insert(at, n - 1);
            all.push(p);
        }
    }
    all
}

#[test]
fn inheritance_chain_resolves_the_same_in_every_route_order() {
    let header = "\
domain: edge
defaults:
  show_limit_quota_header: true
routes:
";
    let routes = [
        "  - name: root
    rejected_msg: from root
    timeout: 20ms
    global_threshold: { query_per_minute: 100 }
",
        "  - name: middle
    parent: root
    timeout: 30ms
",
        "  - name: leaf
    parent: middle
    rejected_code: 503
",
        "  - name: sibling
    parent: middle
    shadow_mode: true
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys: [{ key: \"*\", query_per_second: 10 }]
",
    ];
    let orders = permutations(routes.len());
    assert_eq!(orders.len(), 24);
    let load = |order: &[usize]| {
        let mut text = header.to_string();
        for &i in order {
            text.push_str(routes[i]);
        }
        summary(&domain_of(&text))
    };
    let first = load(&orders[0]);
    let leaf = &first["leaf"];
    assert_eq!(leaf["limits_from"], "root");
    assert_eq!(leaf["settings"]["rejected_msg"]["from"], "root");
    assert_eq!(leaf["settings"]["timeout"]["from"], "middle");
    assert_eq!(leaf["settings"]["rejected_code"]["from"], "leaf");
    assert_eq!(
        leaf["settings"]["show_limit_quota_header"]["from"],
        "defaults"
    );
    assert_eq!(leaf["settings"]["shadow_mode"]["from"], "builtin");
    assert_eq!(first["sibling"]["limits_from"], "sibling");
    for order in &orders[1..] {
        let names: Vec<&str> = order
            .iter()
            .map(|&i| routes[i].split('\n').next().unwrap().trim())
            .collect();
        assert_eq!(load(order), first, "route order {names:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Rule identity.

#[test]
fn rule_ids_do_not_depend_on_the_position_of_items_keys_or_routes() {
    let one = domain_of(
        "\
domain: edge
routes:
  - name: api
    global_threshold: { query_per_minute: 1000 }
  - name: users
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - { key: \"regexp:^vip-\", query_per_second: 100 }
          - { key: \"*\", query_per_second: 10 }
      - limit_by_per_ip: from-remote-addr
        limit_keys:
          - { key: \"10.0.0.0/8\", query_per_minute: 600 }
",
    );
    let two = domain_of(
        "\
domain: edge
routes:
  - name: users
    rule_items:
      - limit_by_per_ip: from-remote-addr
        limit_keys:
          - { key: \"10.0.0.0/8\", query_per_minute: 600 }
      - limit_by_per_header: x-api-key
        limit_keys:
          - { key: \"*\", query_per_second: 10 }
          - { key: \"regexp:^vip-\", query_per_second: 100 }
  - name: api
    global_threshold: { query_per_minute: 1000 }
",
    );
    for name in ["api", "users"] {
        let ids = |d: &Domain| -> BTreeMap<String, String> {
            rules(route(d, name))
                .into_iter()
                .map(|r| (r.name.clone(), r.id.clone()))
                .collect()
        };
        let (a, b) = (ids(&one), ids(&two));
        assert_eq!(a, b, "route {name}");
    }
    assert_eq!(rules(route(&one, "users")).len(), 3);
}

#[test]
fn rule_ids_differ_between_different_keys() {
    let domain = domain_of(
        "\
domain: edge
routes:
  - name: r
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - { key: \"regexp:^vip-\", query_per_second: 100 }
          - { key: \"regexp:^free-\", query_per_second: 100 }
          - { key: \"*\", query_per_second: 100 }
      - limit_by_per_header: x-user
        limit_keys:
          - { key: \"*\", query_per_second: 100 }
      - limit_by_per_param: x-api-key
        limit_keys:
          - { key: \"*\", query_per_second: 100 }
      - limit_by_header: x-plan
        limit_keys:
          - { key: gold, query_per_second: 100 }
          - { key: silver, query_per_second: 100 }
      - limit_by_per_ip: from-remote-addr
        limit_keys:
          - { key: \"10.0.0.0/8\", query_per_second: 100 }
          - { key: \"10.0.0.0/16\", query_per_second: 100 }
",
    );
    let all = rules(route(&domain, "r"));
    assert_eq!(all.len(), 9);
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for r in &all {
        if let Some(other) = seen.insert(&r.id, &r.name) {
            panic!("rules {other:?} and {:?} share id {}", r.name, r.id);
        }
    }
}

/// One rule item, written with `item` (name and attribute lines) and one `*` key.
fn item_rule_id(item: &str) -> String {
    let d = domain_of(&format!(
        "\
domain: edge
routes:
  - name: login
    rule_items:
{item}
        limit_keys:
          - {{ key: \"*\", query_per_minute: 5 }}
"
    ));
    rules(route(&d, "login"))[0].id.clone()
}

#[test]
fn named_rule_item_id_follows_its_name() {
    let named = item_rule_id(
        "      - name: login-per-client\n        limit_by_per_ip: from-header-x-forwarded-for",
    );
    // The same name reading the address elsewhere: the same rule, so it keeps its counters.
    let moved = item_rule_id(
        "      - name: login-per-client\n        limit_by_per_ip: from-header-x-real-ip",
    );
    // The same content under another name, or no name: another rule.
    let renamed = item_rule_id(
        "      - name: login-per-address\n        limit_by_per_ip: from-header-x-forwarded-for",
    );
    let unnamed = item_rule_id("      - limit_by_per_ip: from-header-x-forwarded-for");
    assert_eq!(named, moved, "same name, same id");
    assert_ne!(named, renamed, "another name, another id");
    assert_ne!(named, unnamed, "a name replaces the content-derived id");
}

#[test]
fn named_limit_key_id_follows_its_name() {
    let load = |key: &str| {
        let d = domain_of(&format!(
            "\
domain: edge
routes:
  - name: r
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - {{ {key}, query_per_second: 10 }}
"
        ));
        let r = route(&d, "r");
        let rule = rules(r)[0];
        (rule.id.clone(), rule.name.clone())
    };
    let (named, shown) = load("name: vip, key: \"regexp:^vip-\"");
    assert_eq!(shown, "vip");
    let (rekeyed, _) = load("name: vip, key: \"regexp:^(vip|gold)-\"");
    let (renamed, _) = load("name: gold, key: \"regexp:^vip-\"");
    let (unnamed, _) = load("key: \"regexp:^vip-\"");
    assert_eq!(named, rekeyed, "same name, same id");
    assert_ne!(named, renamed, "another name, another id");
    assert_ne!(named, unnamed, "a name replaces the content-derived id");
}

#[test]
fn rule_id_survives_retuning_the_limit_but_not_changing_the_period() {
    let load = |threshold: &str| {
        let d = domain_of(&format!(
            "\
domain: edge
routes:
  - name: r
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - {{ key: \"*\", {threshold} }}
"
        ));
        rules(route(&d, "r"))[0].id.clone()
    };
    let base = load("query_per_second: 10");
    assert_eq!(base, load("query_per_second: 99"));
    assert_ne!(base, load("query_per_minute: 10"));
}
