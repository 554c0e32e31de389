//! Limits files in the envoyproxy/ratelimit format: a file whose top
//! level has `descriptors:` is read with that project's schema and matching rules, so its users
//! switch without rewriting their limits.
//!
//! The first tests are the examples of envoyproxy/ratelimit's README, each with the README's
//! configuration and requests and the code, `current_limit`, `limit_remaining` and
//! `duration_until_reset` it documents, served by an in-process sluice over real gRPC with a
//! manual clock. Then the matching rules the README states only in prose, global shadow mode,
//! the load errors (each naming file, line, descriptor path and field) and `sluice check` on a
//! directory mixing both formats.
//!
//! `current_limit.name` of an envoyproxy/ratelimit limit is its `rate_limit.name`, else the
//! path of the descriptor it belongs to (`key=value/key2`).

mod common;

use common::envoy_examples::*;

use std::path::Path;

use common::config::{Expect, Files, assert_error, errors_of, find, line_of, render, single};
use common::repo;
use common::rls::*;
use common::sluice::*;
use serde_json::json;
use sluice::config::{LimitSet, load_paths};
use sluice::limiter::Unit as LimitUnit;

/// The status of an `unlimited: true` descriptor, as envoyproxy/ratelimit answers it: OK, no
/// `current_limit`, and the most `limit_remaining` can say.
fn unlimited_limit() -> DescriptorStatus {
    DescriptorStatus {
        code: Code::Ok as i32,
        limit_remaining: u32::MAX,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// README examples.

#[tokio::test]
async fn readme_example_1_each_listed_value_has_its_own_limit() {
    let mut s = Sluice::start(&[("mongo_cps.yaml", EXAMPLE_1)]).await;
    let users = limit(500, Unit::Second, "database=users");
    let default = limit(500, Unit::Second, "database=default");

    assert_eq!(
        s.status("mongo_cps", &[("database", "users")]).await,
        status(Code::Ok, &users, 499, 750)
    );
    assert_eq!(
        s.status("mongo_cps", &[("database", "default")]).await,
        status(Code::Ok, &default, 499, 750)
    );
    // A value the file does not list has no limit.
    assert_eq!(
        s.status("mongo_cps", &[("database", "orders")]).await,
        unlimited()
    );

    // 500 per second for users: the 500th passes, the 501st does not; default counts apart.
    let r = s
        .ask_one("mongo_cps", desc_hits(&[("database", "users")], 499))
        .await;
    assert_eq!(r.statuses[0], status(Code::Ok, &users, 0, 750));
    let r = s.ask_one("mongo_cps", desc(&[("database", "users")])).await;
    assert_eq!(r.statuses[0], status(Code::OverLimit, &users, 0, 750));
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(
        s.status("mongo_cps", &[("database", "default")]).await,
        status(Code::Ok, &default, 498, 750)
    );

    // The next second starts afresh.
    s.to_next_window(SECOND);
    assert_eq!(
        s.status("mongo_cps", &[("database", "users")]).await,
        status(Code::Ok, &users, 499, SECOND)
    );
    s.stop().await;
}

#[tokio::test]
async fn readme_example_2_nested_descriptors_and_one_request_for_both_limits() {
    let mut s = Sluice::start(&[("messaging.yaml", EXAMPLE_2)]).await;
    let marketing = limit(5, Unit::Day, "message_type=marketing/to_number");
    let per_number = limit(100, Unit::Day, "to_number");
    let day = s.until_reset(DAY);
    let both: &[&[(&str, &str)]] = &[
        &[("message_type", "marketing"), ("to_number", "2061111111")],
        &[("to_number", "2061111111")],
    ];

    // The README's request: both descriptors, each limited by its own rule.
    let r = s.ask("messaging", both).await;
    assert_eq!(
        r.statuses,
        vec![
            status(Code::Ok, &marketing, 4, day),
            status(Code::Ok, &per_number, 99, day)
        ]
    );
    for left in (0..4).rev() {
        let r = s.ask("messaging", both).await;
        assert_eq!(r.statuses[0], status(Code::Ok, &marketing, left, day));
    }
    // The sixth marketing message of the day is refused; the per-number limit still counts.
    let r = s.ask("messaging", both).await;
    assert_eq!(
        r.statuses,
        vec![
            status(Code::OverLimit, &marketing, 0, day),
            status(Code::Ok, &per_number, 94, day)
        ]
    );
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(r.raw_body, b"Too many requests");

    // Each number has its own 5 and its own 100.
    let r = s
        .ask(
            "messaging",
            &[
                &[("message_type", "marketing"), ("to_number", "2062222222")],
                &[("to_number", "2062222222")],
            ],
        )
        .await;
    assert_eq!(
        r.statuses,
        vec![
            status(Code::Ok, &marketing, 4, day),
            status(Code::Ok, &per_number, 99, day)
        ]
    );
    // Another message type matches no rule at all: message_type has only the marketing value.
    assert_eq!(
        s.status(
            "messaging",
            &[
                ("message_type", "transactional"),
                ("to_number", "2061111111")
            ]
        )
        .await,
        unlimited()
    );
    s.stop().await;
}

#[tokio::test]
async fn readme_example_3_key_value_is_matched_before_key_alone() {
    let mut s = Sluice::start(&[("per_ip.yaml", EXAMPLE_3)]).await;
    let per_ip = limit(10, Unit::Second, "remote_address");
    let blocked = limit(0, Unit::Second, "remote_address=50.0.0.5");

    assert_eq!(
        s.status("edge_proxy_per_ip", &[("remote_address", "50.0.0.1")])
            .await,
        status(Code::Ok, &per_ip, 9, 750)
    );
    // The listed address gets its own limit, written after the generic one: 0 blocks it.
    let r = s
        .ask_one("edge_proxy_per_ip", desc(&[("remote_address", "50.0.0.5")]))
        .await;
    assert_eq!(r.statuses[0], status(Code::OverLimit, &blocked, 0, 750));
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    // Every other address has 10 per second of its own.
    s.assert_full_window(
        "edge_proxy_per_ip",
        desc(&[("remote_address", "50.0.0.2")]),
        per_ip.clone(),
    )
    .await;
    s.stop().await;
}

#[tokio::test]
async fn readme_example_4_a_request_matches_configuration_of_its_own_depth() {
    let mut s = Sluice::start(&[
        ("example4.yaml", EXAMPLE_4_FLAT),
        ("example4-nested.yaml", EXAMPLE_4_NESTED),
    ])
    .await;
    let two = [("key", "value"), ("subkey", "subvalue")];
    // Two entries do not match a one-level configuration...
    assert_eq!(s.status("example4", &two).await, unlimited());
    // ...but one entry does.
    assert_eq!(
        s.status("example4", &[("key", "value")]).await,
        status(Code::Ok, &limit(300, Unit::Second, "key=value"), 299, 750)
    );
    // And the nested configuration matches the two entries, not the first alone.
    assert_eq!(
        s.status("example4-nested", &two).await,
        status(
            Code::Ok,
            &limit(300, Unit::Second, "key=value/subkey"),
            299,
            750
        )
    );
    assert_eq!(
        s.status("example4-nested", &[("key", "value")]).await,
        unlimited()
    );
    s.stop().await;
}

#[tokio::test]
async fn readme_example_5_unlimited_answers_ok_with_the_maximum_remaining() {
    let mut s = Sluice::start(&[("internal.yaml", EXAMPLE_5)]).await;
    assert_eq!(
        s.status("internal", &[("ldap", "bind")]).await,
        unlimited_limit()
    );
    // However many hits: never counted, never over.
    let r = s
        .ask_one("internal", desc_hits(&[("ldap", "bind")], 1_000_000))
        .await;
    assert_eq!(r.statuses[0], unlimited_limit());
    assert_eq!(r.overall_code, Code::Ok as i32);
    // Distinguishable from a descriptor that matches nothing (remaining 0).
    assert_eq!(s.status("internal", &[("gcp", "x")]).await, unlimited());
    // With a limited descriptor in the same request, only that one counts.
    let r = s
        .ask("internal", &[&[("ldap", "bind")], &[("azure", "blob")]])
        .await;
    assert_eq!(
        r.statuses,
        vec![
            unlimited_limit(),
            status(
                Code::Ok,
                &limit(100, Unit::Minute, "azure"),
                99,
                s.until_reset(MINUTE)
            )
        ]
    );
    s.stop().await;
}

#[tokio::test]
async fn readme_example_6_shadow_mode_counts_but_never_limits() {
    let mut s = Sluice::start(&[("example6.yaml", EXAMPLE_6)]).await;
    let user_a = limit(10, Unit::Second, "service/user=user-a");
    let user_b = limit(20, Unit::Second, "service/user=user-b");
    let a = [("service", "auth-service"), ("user", "user-a")];
    let b = [("service", "auth-service"), ("user", "user-b")];

    let r = s.ask_one("example6", desc_hits(&a, 10)).await;
    assert_eq!(r.statuses[0], status(Code::Ok, &user_a, 0, 750));
    // Past the limit: still OK, with the count reported (nothing remaining).
    for _ in 0..3 {
        let r = s.ask_one("example6", desc(&a)).await;
        assert_eq!(r.statuses[0], status(Code::Ok, &user_a, 0, 750));
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert_eq!(metadata(&r, "decision"), Some("shadow"));
        assert_eq!(metadata(&r, "route"), Some("service/user=user-a"));
    }
    // user-b is limited at 20 per second.
    let r = s.ask_one("example6", desc_hits(&b, 20)).await;
    assert_eq!(r.statuses[0], status(Code::Ok, &user_b, 0, 750));
    let r = s.ask_one("example6", desc(&b)).await;
    assert_eq!(r.statuses[0], status(Code::OverLimit, &user_b, 0, 750));
    assert_eq!(r.overall_code, Code::OverLimit as i32);

    // The breach is visible in the metrics, labelled by the descriptor path (never a value).
    let metrics = s.handle().limiter.metrics().render();
    let shadow = metrics.lines().find(|l| {
        l.starts_with("sluice_decisions_total")
            && l.contains("decision=\"shadow\"")
            && l.contains("route=\"service/user=user-a\"")
    });
    let count: f64 = shadow
        .unwrap_or_else(|| panic!("no shadow decisions in:\n{metrics}"))
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a count");
    assert_eq!(count, 3.0, "{metrics}");
    assert!(!metrics.contains("auth-service"), "{metrics}");
    s.stop().await;
}

#[tokio::test]
async fn readme_example_7_replaces_drops_the_named_limit_of_the_same_request() {
    let mut s = Sluice::start(&[("example7.yaml", EXAMPLE_7)]).await;
    let specific = limit(5, Unit::Second, "specific_limit");
    let replacing = limit(10, Unit::Second, "key_2=value_2/user=bkthomps");
    let one = [("key_1", "value_1"), ("user", "bkthomps")];
    let two = [("key_2", "value_2"), ("user", "bkthomps")];

    // Both match: 10 per second, and the replaced 5 is not applied (nor counted).
    for left in (0..10).rev() {
        let r = s.ask("example7", &[&one, &two]).await;
        assert_eq!(
            r.statuses,
            vec![unlimited(), status(Code::Ok, &replacing, left, 750)],
            "{left} left"
        );
    }
    let r = s.ask("example7", &[&one, &two]).await;
    assert_eq!(
        r.statuses,
        vec![unlimited(), status(Code::OverLimit, &replacing, 0, 750)]
    );
    assert_eq!(r.overall_code, Code::OverLimit as i32);

    // The original limit was not affected: alone, (key_1, user) still has all of its 5.
    assert_eq!(
        s.status("example7", &one).await,
        status(Code::Ok, &specific, 4, 750)
    );
    // And (key_2, user) alone is its own 10 per second, already spent.
    assert_eq!(
        s.status("example7", &two).await,
        status(Code::OverLimit, &replacing, 0, 750)
    );

    // The order of the descriptors does not matter.
    s.to_next_window(SECOND);
    let r = s.ask("example7", &[&two, &one]).await;
    assert_eq!(
        r.statuses,
        vec![status(Code::Ok, &replacing, 9, SECOND), unlimited()]
    );
    s.stop().await;
}

#[tokio::test]
async fn readme_example_8_detailed_metric_limits_as_usual_and_keeps_metrics_bounded() {
    let mut s = Sluice::start(&[("example8.yaml", EXAMPLE_8)]).await;
    let unspecified = limit(10, Unit::Minute, "key1");
    let value1 = limit(20, Unit::Minute, "key1=value1");
    let minute = s.until_reset(MINUTE);
    // The README: (key_1, unspecified_value): 10, (key_1, unspecified_value2): 10, each its
    // own counter; (key_1, value_1): 20.
    assert_eq!(
        s.status("example8", &[("key1", "unspecified_value")]).await,
        status(Code::Ok, &unspecified, 9, minute)
    );
    assert_eq!(
        s.status("example8", &[("key1", "unspecified_value")]).await,
        status(Code::Ok, &unspecified, 8, minute)
    );
    assert_eq!(
        s.status("example8", &[("key1", "unspecified_value2")])
            .await,
        status(Code::Ok, &unspecified, 9, minute)
    );
    assert_eq!(
        s.status("example8", &[("key1", "value1")]).await,
        status(Code::Ok, &value1, 19, minute)
    );
    // sluice's metric labels come from the configuration only: detailed_metric does not add
    // a label per request value.
    let metrics = s.handle().limiter.metrics().render();
    assert!(metrics.contains("route=\"key1\""), "{metrics}");
    assert!(metrics.contains("route=\"key1=value1\""), "{metrics}");
    assert!(!metrics.contains("unspecified_value"), "{metrics}");
    s.stop().await;
}

#[tokio::test]
async fn readme_example_9_a_trailing_wildcard_matches_by_prefix_with_a_counter_per_value() {
    let mut s = Sluice::start(&[("example9.yaml", EXAMPLE_9)]).await;
    let wild = limit(20, Unit::Minute, "key1=value*");
    let minute = s.until_reset(MINUTE);
    assert_eq!(
        s.status("example9", &[("key1", "value_1")]).await,
        status(Code::Ok, &wild, 19, minute)
    );
    assert_eq!(
        s.status("example9", &[("key1", "value_1")]).await,
        status(Code::Ok, &wild, 18, minute)
    );
    // (key_1, value_2): 20 of its own.
    assert_eq!(
        s.status("example9", &[("key1", "value_2")]).await,
        status(Code::Ok, &wild, 19, minute)
    );
    assert_eq!(
        s.status("example9", &[("key1", "value")]).await,
        status(Code::Ok, &wild, 19, minute)
    );
    assert_eq!(
        s.status("example9", &[("key1", "other")]).await,
        unlimited()
    );
    s.stop().await;
}

#[tokio::test]
async fn readme_share_threshold_makes_all_values_of_a_wildcard_share_one_counter() {
    let mut s = Sluice::start(&[("files.yaml", SHARE_THRESHOLD)]).await;
    let files = limit(100, Unit::Hour, "path=files/*");
    let models = limit(100, Unit::Hour, "path=models/*");
    let hour = s.until_reset(HOUR);
    let mut left = 100;
    for value in ["files/a.pdf", "files/b.csv", "files/c.txt", "files/a.pdf"] {
        left -= 1;
        assert_eq!(
            s.status("files", &[("path", value)]).await,
            status(Code::Ok, &files, left, hour),
            "{value}"
        );
    }
    // Without share_threshold each value has its own 100.
    for value in ["models/a", "models/b"] {
        assert_eq!(
            s.status("files", &[("path", value)]).await,
            status(Code::Ok, &models, 99, hour),
            "{value}"
        );
    }
    // Shared by the wildcard entry, per value for the entry below it.
    let per_user = limit(5, Unit::Minute, "route=api/*/user");
    let minute = s.until_reset(MINUTE);
    assert_eq!(
        s.status("files", &[("route", "api/orders"), ("user", "u1")])
            .await,
        status(Code::Ok, &per_user, 4, minute)
    );
    assert_eq!(
        s.status("files", &[("route", "api/users"), ("user", "u1")])
            .await,
        status(Code::Ok, &per_user, 3, minute)
    );
    assert_eq!(
        s.status("files", &[("route", "api/orders"), ("user", "u2")])
            .await,
        status(Code::Ok, &per_user, 4, minute)
    );
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Matching rules beyond the examples.

#[tokio::test]
async fn exact_value_then_wildcards_in_file_order_then_key_alone() {
    let mut s = Sluice::start(&[("order.yaml", ORDER)]).await;
    for (value, rate, name) in [
        ("abc", 1, "k=abc"),
        ("abd", 2, "k=ab*"),
        ("ab", 2, "k=ab*"),
        ("axe", 3, "k=a*"),
        ("b", 4, "k"),
        ("", 4, "k"),
    ] {
        let got = s.status("order", &[("k", value)]).await;
        assert_eq!(
            got.current_limit,
            Some(limit(rate, Unit::Second, name)),
            "value {value:?}"
        );
    }
    let minute = s.until_reset(MINUTE);
    // A node with a limit and children limits at both depths.
    assert_eq!(
        s.status("order", &[("parent", "p")]).await,
        status(Code::Ok, &limit(7, Unit::Minute, "parent"), 6, minute)
    );
    assert_eq!(
        s.status("order", &[("parent", "p"), ("child", "c")]).await,
        status(Code::Ok, &limit(6, Unit::Minute, "parent/child"), 5, minute)
    );
    // A node without rate_limit and without children admits without a limit; a longer
    // request than the tree, or an unknown key on the way, has no limit.
    for entries in [
        &[("parent", "p"), ("leaf", "only")][..],
        &[("parent", "p"), ("leaf", "other")],
        &[("parent", "p"), ("child", "c"), ("deeper", "d")],
        &[("k", "abc"), ("child", "c")],
        &[("nothing", "x")],
    ] {
        assert_eq!(s.status("order", entries).await, unlimited(), "{entries:?}");
    }
    s.stop().await;
}

#[tokio::test]
async fn a_request_override_limits_a_counter_of_its_entries_as_upstream() {
    let mut s = Sluice::start(&[("example9.yaml", EXAMPLE_9)]).await;
    let minute = s.until_reset(MINUTE);
    // Whether or not the tree has a limit for the entries, the override applies.
    for (entries, left) in [
        (&[("key1", "value_1")][..], 1),
        (&[("key1", "value_1")], 0),
        (&[("key1", "nothing")], 1),
    ] {
        let r = s
            .ask_one(
                "example9",
                desc_override(entries, 2, RateLimitUnit::Minute, None),
            )
            .await;
        assert_eq!(
            r.statuses[0],
            status(Code::Ok, &limit(2, Unit::Minute, "override"), left, minute),
            "{entries:?}"
        );
    }
    // The tree's own counter was not touched by the overrides.
    assert_eq!(
        s.status("example9", &[("key1", "value_1")]).await,
        status(
            Code::Ok,
            &limit(20, Unit::Minute, "key1=value*"),
            19,
            minute
        )
    );
    s.stop().await;
}

#[test]
fn counters_are_domain_entries_and_period_with_untrusted_values_hashed() {
    let files = Files::new();
    files.write("example9.yaml", EXAMPLE_9);
    files.write("files.yaml", SHARE_THRESHOLD);
    let set = load_paths(&[files.path().to_path_buf()]).unwrap_or_else(|e| panic!("{e}"));
    let counter = |domain: &str, entries: &[(&str, &str)]| {
        let d = set.domain(domain).expect("domain");
        sluice::matcher::match_descriptor(d, &desc(entries))
            .expect("a limit")
            .counter
    };
    assert_eq!(
        counter("example9", &[("key1", "value_1")]),
        "example9:rl:key1:value_1:60"
    );
    // A value that is not short plain text is hashed: no `:`, `{` or `}` gets through.
    let hostile = counter("example9", &[("key1", "value:{x}")]);
    assert!(hostile.starts_with("example9:rl:key1:~"), "{hostile}");
    assert!(
        !hostile.contains('{') && !hostile.contains("x}"),
        "{hostile}"
    );
    // share_threshold: the wildcard stands for every value.
    let a = counter("files", &[("path", "files/a.pdf")]);
    assert_eq!(a, counter("files", &[("path", "files/b.csv")]));
    assert_ne!(
        counter("files", &[("path", "models/a")]),
        counter("files", &[("path", "models/b")])
    );
    assert_eq!(
        counter("files", &[("route", "api/a"), ("user", "u1")]),
        counter("files", &[("route", "api/b"), ("user", "u1")])
    );
    assert_ne!(
        counter("files", &[("route", "api/a"), ("user", "u1")]),
        counter("files", &[("route", "api/a"), ("user", "u2")])
    );
}

// ---------------------------------------------------------------------------------------------
// Global shadow mode (settings `shadow_mode`).

const NATIVE: &str = "\
domain: edge
routes:
  - name: api
    global_threshold: { query_per_second: 2 }
";

#[tokio::test]
async fn global_shadow_mode_counts_and_reports_but_always_answers_ok() {
    let mut s = Sluice::start_with(
        &[("edge.yaml", NATIVE), ("example3.yaml", EXAMPLE_3)],
        |settings| settings.shadow_mode = true,
    )
    .await;
    let api = limit(2, Unit::Second, "api/global");
    let blocked = limit(0, Unit::Second, "remote_address=50.0.0.5");
    for left in [1, 0, 0, 0] {
        let r = s.ask_one("edge", desc(&[("route", "api")])).await;
        assert_eq!(r.statuses[0], status(Code::Ok, &api, left, 750));
        assert_eq!(r.overall_code, Code::Ok as i32);
    }
    let r = s
        .ask(
            "edge_proxy_per_ip",
            &[
                &[("remote_address", "50.0.0.5")],
                &[("remote_address", "50.0.0.1")],
            ],
        )
        .await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(r.statuses[0], status(Code::Ok, &blocked, 0, 750));
    assert_eq!(metadata(&r, "decision"), Some("shadow"));
    assert!(r.raw_body.is_empty());
    let metrics = s.handle().limiter.metrics().render();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sluice_decisions_total")
                && l.contains("decision=\"shadow\"")
                && l.contains("route=\"api\"")),
        "{metrics}"
    );
    s.stop().await;

    // Off (the default), the same requests are limited.
    let mut s = Sluice::start(&[("example3.yaml", EXAMPLE_3)]).await;
    let r = s
        .ask_one("edge_proxy_per_ip", desc(&[("remote_address", "50.0.0.5")]))
        .await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The loaded model, /config and formats side by side.

#[tokio::test]
async fn config_shows_the_descriptor_tree_of_an_envoyproxy_domain() {
    let s = Sluice::start(&[("edge.yaml", NATIVE), ("example7.yaml", EXAMPLE_7)]).await;
    let limits = s.handle().limiter.limits();
    let shown = limits.to_json();
    assert_eq!(shown["edge"]["format"], json!("sluice"));
    let d = &shown["example7"];
    assert_eq!(d["format"], json!("envoyproxy/ratelimit"), "{shown:#}");
    assert_eq!(d["routes"], json!({}));
    assert_eq!(
        d["descriptors"][0]["descriptors"][0],
        json!({
            "key": "user",
            "value": "bkthomps",
            "path": "key_1=value_1/user=bkthomps",
            "shadow_mode": false,
            "quota_mode": false,
            "share_threshold": false,
            "detailed_metric": false,
            "value_to_metric": false,
            "rate_limit": {
                "requests_per_unit": 5,
                "unit": "second",
                "unit_multiplier": 1,
                "name": "specific_limit",
                "replaces": [],
            },
        }),
        "{shown:#}"
    );
    assert_eq!(
        d["descriptors"][1]["descriptors"][0]["rate_limit"]["replaces"],
        json!(["specific_limit"])
    );
    s.stop().await;
}

#[test]
fn units_are_read_in_any_case_and_flags_are_kept() {
    let files = Files::new();
    files.write(
        "units.yaml",
        "\
domain: units
descriptors:
  - { key: s, rate_limit: { unit: SECOND, requests_per_unit: 1 } }
  - { key: m, rate_limit: { unit: Minute, requests_per_unit: 1 } }
  - { key: h, rate_limit: { unit: hour, requests_per_unit: 1 } }
  - { key: d, rate_limit: { unit: day, requests_per_unit: 1 } }
  - { key: w, rate_limit: { unit: week, requests_per_unit: 1 } }
  - { key: mo, rate_limit: { unit: month, requests_per_unit: 1 } }
  - { key: y, rate_limit: { unit: year, requests_per_unit: 1 } }
  - key: flags
    value: x*
    shadow_mode: true
    detailed_metric: true
    value_to_metric: true
    share_threshold: true
",
    );
    let set: LimitSet = load_paths(&[files.path().to_path_buf()]).unwrap_or_else(|e| panic!("{e}"));
    let domain = set.domain("units").unwrap();
    assert!(domain.routes().is_empty());
    let tree = domain.tree().expect("an envoyproxy/ratelimit tree");
    let units: Vec<LimitUnit> = tree
        .nodes()
        .iter()
        .filter_map(|n| n.limit.as_ref()?.threshold.map(|t| t.unit))
        .collect();
    assert_eq!(
        units,
        [
            LimitUnit::Second,
            LimitUnit::Minute,
            LimitUnit::Hour,
            LimitUnit::Day,
            LimitUnit::Week,
            LimitUnit::Month,
            LimitUnit::Year
        ]
    );
    let flags = tree.nodes().into_iter().find(|n| n.key == "flags").unwrap();
    assert!(flags.shadow_mode && flags.detailed_metric && flags.value_to_metric);
    assert!(flags.share_threshold && flags.wildcard && flags.limit.is_none());
}

// ---------------------------------------------------------------------------------------------
// Load errors: file, line, descriptor path (in `route`) and field.

fn at<'a>(file: &'a Path, line: u64, path: Option<&'a str>, field: &'a str) -> Expect<'a> {
    Expect {
        file,
        line,
        route: path,
        field,
    }
}

#[test]
fn a_missing_or_empty_domain_is_an_error() {
    let (file, errors) = errors_of(
        "\
descriptors:
  - key: a
    rate_limit: { unit: second, requests_per_unit: 1 }
",
    );
    let err = single(&errors);
    assert_error(err, at(&file, 1, None, "domain"));

    let text = "\
# a comment
domain: \"\"
descriptors: []
";
    let (file, errors) = errors_of(text);
    assert_error(
        single(&errors),
        at(&file, line_of(text, "domain:"), None, "domain"),
    );
}

#[test]
fn a_missing_or_empty_key_is_an_error() {
    let text = "\
domain: d
descriptors:
  - key: a
    value: b
    descriptors:
      - key: c
        rate_limit: { unit: second, requests_per_unit: 1 }
      - key: \"\"
        rate_limit: { unit: second, requests_per_unit: 1 }
  - value: x
    rate_limit: { unit: second, requests_per_unit: 1 }
";
    let (file, errors) = errors_of(text);
    assert_eq!(errors.len(), 2, "{}", render(&errors));
    assert_error(
        find(&errors, Some("a=b/descriptors[1]"), "key"),
        at(
            &file,
            line_of(text, "key: \"\""),
            Some("a=b/descriptors[1]"),
            "key",
        ),
    );
    assert_error(
        find(&errors, Some("descriptors[1]"), "key"),
        at(
            &file,
            line_of(text, "- value: x"),
            Some("descriptors[1]"),
            "key",
        ),
    );
}

#[test]
fn the_same_key_and_value_twice_at_one_level_is_an_error() {
    let text = "\
domain: d
descriptors:
  - key: database
    value: users
    rate_limit: { unit: second, requests_per_unit: 1 }
  - key: to_number
    rate_limit: { unit: second, requests_per_unit: 1 }
  - key: database
    value: default
    rate_limit: { unit: second, requests_per_unit: 1 }
  - key: database
    value: users # again
    rate_limit: { unit: minute, requests_per_unit: 1 }
  - key: to_number # again
    rate_limit: { unit: minute, requests_per_unit: 1 }
  - key: parent
    descriptors:
      # The same key and value at another level is fine.
      - key: database
        value: users
        rate_limit: { unit: second, requests_per_unit: 1 }
";
    let (file, errors) = errors_of(text);
    assert_eq!(errors.len(), 2, "{}", render(&errors));
    let err = find(&errors, Some("database=users"), "value");
    assert_error(
        err,
        at(
            &file,
            line_of(text, "value: users # again"),
            Some("database=users"),
            "value",
        ),
    );
    assert!(err.message.contains("duplicate"), "{err}");
    assert!(err.message.contains("line 3"), "{err}");
    assert_error(
        find(&errors, Some("to_number"), "key"),
        at(
            &file,
            line_of(text, "key: to_number # again"),
            Some("to_number"),
            "key",
        ),
    );
}

#[test]
fn an_invalid_or_missing_unit_is_an_error() {
    let text = "\
domain: d
descriptors:
  - key: a
    value: b
    descriptors:
      - key: c
        rate_limit:
          unit: fortnight
          requests_per_unit: 1
  - key: e
    rate_limit:
      requests_per_unit: 5
";
    let (file, errors) = errors_of(text);
    assert_eq!(errors.len(), 2, "{}", render(&errors));
    let err = find(&errors, Some("a=b/c"), "rate_limit.unit");
    assert_error(
        err,
        at(
            &file,
            line_of(text, "unit: fortnight"),
            Some("a=b/c"),
            "rate_limit.unit",
        ),
    );
    assert!(err.message.contains("fortnight"), "{err}");
    // Absent: the line of the rate_limit that lacks it.
    assert_error(
        find(&errors, Some("e"), "rate_limit.unit"),
        at(
            &file,
            line_of(text, "  - key: e") + 1,
            Some("e"),
            "rate_limit.unit",
        ),
    );
}

#[test]
fn a_missing_or_too_large_requests_per_unit_is_an_error() {
    let text = "\
domain: d
descriptors:
  - key: a
    rate_limit: { unit: second }
  - key: b
    rate_limit: { unit: second, requests_per_unit: 4294967296 }
";
    let (file, errors) = errors_of(text);
    assert_eq!(errors.len(), 2, "{}", render(&errors));
    let err = find(&errors, Some("a"), "rate_limit.requests_per_unit");
    assert_error(
        err,
        at(
            &file,
            line_of(text, "{ unit: second }"),
            Some("a"),
            "rate_limit.requests_per_unit",
        ),
    );
    assert!(err.message.contains("0 blocks"), "{err}");
    assert_error(
        find(&errors, Some("b"), "rate_limit.requests_per_unit"),
        at(
            &file,
            line_of(text, "4294967296"),
            Some("b"),
            "rate_limit.requests_per_unit",
        ),
    );
}

#[test]
fn unlimited_with_a_unit_or_a_rate_is_an_error() {
    let text = "\
domain: d
descriptors:
  - key: ldap
    rate_limit:
      unlimited: true
      unit: second
  - key: ad
    rate_limit:
      unlimited: true
      requests_per_unit: 10
";
    let (file, errors) = errors_of(text);
    assert_eq!(errors.len(), 2, "{}", render(&errors));
    assert_error(
        find(&errors, Some("ldap"), "rate_limit.unit"),
        at(
            &file,
            line_of(text, "unit: second"),
            Some("ldap"),
            "rate_limit.unit",
        ),
    );
    assert_error(
        find(&errors, Some("ad"), "rate_limit.requests_per_unit"),
        at(
            &file,
            line_of(text, "requests_per_unit: 10"),
            Some("ad"),
            "rate_limit.requests_per_unit",
        ),
    );
}

#[test]
fn an_empty_or_self_naming_replaces_is_an_error() {
    let text = "\
domain: d
descriptors:
  - key: a
    rate_limit:
      name: mine
      unit: second
      requests_per_unit: 1
      replaces:
        - name: other
        - name: \"\"
        - name: mine
  - key: b
    rate_limit:
      unit: second
      requests_per_unit: 1
      replaces:
        - {}
";
    let (file, errors) = errors_of(text);
    assert_eq!(errors.len(), 3, "{}", render(&errors));
    assert_error(
        find(&errors, Some("a"), "rate_limit.replaces[1].name"),
        at(
            &file,
            line_of(text, "- name: \"\""),
            Some("a"),
            "rate_limit.replaces[1].name",
        ),
    );
    let err = find(&errors, Some("a"), "rate_limit.replaces[2].name");
    assert_error(
        err,
        at(
            &file,
            line_of(text, "- name: mine"),
            Some("a"),
            "rate_limit.replaces[2].name",
        ),
    );
    assert!(err.message.contains("own name"), "{err}");
    assert_error(
        find(&errors, Some("b"), "rate_limit.replaces[0].name"),
        at(
            &file,
            line_of(text, "- {}"),
            Some("b"),
            "rate_limit.replaces[0].name",
        ),
    );
}

#[test]
fn share_threshold_without_a_wildcard_value_is_an_error() {
    let text = "\
domain: d
descriptors:
  - key: path
    value: files
    share_threshold: true
    rate_limit: { unit: hour, requests_per_unit: 1 }
";
    let (file, errors) = errors_of(text);
    assert_error(
        single(&errors),
        at(
            &file,
            line_of(text, "share_threshold"),
            Some("path=files"),
            "share_threshold",
        ),
    );
}

#[test]
fn unknown_keys_anywhere_are_errors() {
    let text = "\
domain: d
routes: []
descriptors:
  - key: a
    value: b
    shadowmode: true
    descriptors:
      - key: c
        rate_limit:
          unit: second
          requests_per_unit: 1
          quota_mode: true
          replaces:
            - name: x
              nmae: y
";
    let (file, errors) = errors_of(text);
    assert_eq!(errors.len(), 4, "{}", render(&errors));
    let top = find(&errors, None, "routes");
    assert_error(top, at(&file, line_of(text, "routes: []"), None, "routes"));
    assert!(top.message.contains("envoyproxy/ratelimit"), "{top}");
    assert_error(
        find(&errors, Some("a=b"), "shadowmode"),
        at(
            &file,
            line_of(text, "shadowmode"),
            Some("a=b"),
            "shadowmode",
        ),
    );
    assert_error(
        find(&errors, Some("a=b/c"), "rate_limit.quota_mode"),
        at(
            &file,
            line_of(text, "quota_mode"),
            Some("a=b/c"),
            "rate_limit.quota_mode",
        ),
    );
    assert_error(
        find(&errors, Some("a=b/c"), "rate_limit.replaces[0].nmae"),
        at(
            &file,
            line_of(text, "nmae"),
            Some("a=b/c"),
            "rate_limit.replaces[0].nmae",
        ),
    );
}

#[test]
fn a_value_of_the_wrong_type_names_its_descriptor() {
    let text = "\
domain: d
descriptors:
  - key: a
    descriptors:
      - key: b
        value: c
        rate_limit:
          unit: second
          requests_per_unit: lots
";
    let (file, errors) = errors_of(text);
    let err = single(&errors);
    assert_eq!(err.file, file);
    assert_eq!(err.line, Some(line_of(text, "lots")), "{err}");
    assert_eq!(err.route.as_deref(), Some("a/b=c"), "{err}");
    assert_eq!(err.field, "requests_per_unit", "{err}");
}

#[test]
fn a_domain_in_both_formats_is_a_duplicate() {
    let files = Files::new();
    files.write("a.yaml", NATIVE);
    let compat = files.write(
        "b.yaml",
        "domain: edge\ndescriptors:\n  - key: k\n    rate_limit: { unit: second, requests_per_unit: 1 }\n",
    );
    let errors = load_paths(&[files.path().to_path_buf()]).unwrap_err().0;
    let err = single(&errors);
    assert_eq!(err.file, compat);
    assert_eq!(err.field, "domain");
    assert!(err.message.contains("already defined"), "{err}");
}

#[test]
fn every_error_of_a_file_is_reported_at_once() {
    let text = "\
domain: d
descriptors:
  - key: a
    rate_limit: { unit: weekly, requests_per_unit: 1 }
  - key: b
    share_threshold: true
  - key: c
    rate_limit: { unlimited: true, unit: day }
";
    let (_, errors) = errors_of(text);
    let fields: Vec<(Option<&str>, &str)> = errors
        .iter()
        .map(|e| (e.route.as_deref(), e.field.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            (Some("a"), "rate_limit.unit"),
            (Some("b"), "share_threshold"),
            (Some("c"), "rate_limit.unit")
        ],
        "{}",
        render(&errors)
    );
}

// ---------------------------------------------------------------------------------------------
// `sluice check`.

fn sluice_check(paths: &[&Path]) -> (Option<i32>, String, String) {
    let out = sluice_command()
        .arg("check")
        .args(paths)
        .output()
        .expect("run sluice check");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_reads_both_formats_in_one_directory_and_names_each_format() {
    let files = Files::new();
    std::fs::copy(
        repo().join("config/limits/edge.yaml"),
        files.path().join("edge.yaml"),
    )
    .expect("copy the native example");
    files.write("messaging.yaml", EXAMPLE_2);
    let (code, stdout, stderr) = sluice_check(&[files.path()]);
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines[0].starts_with("ok: domain \"edge\""), "{stdout}");
    assert!(lines[0].contains("sluice format, 5 routes"), "{stdout}");
    assert!(lines[1].starts_with("ok: domain \"messaging\""), "{stdout}");
    assert!(
        lines[1].contains("messaging.yaml")
            && lines[1].contains("envoyproxy/ratelimit format, 3 descriptors, 2 limits"),
        "{stdout}"
    );

    // One broken envoyproxy/ratelimit file fails the whole check and is named with its line,
    // descriptor and field.
    let broken_text = "\
domain: broken
descriptors:
  - key: user
    rate_limit:
      unit: fortnight
      requests_per_unit: 1
";
    let broken = files.write("broken.yaml", broken_text);
    let (code, stdout, stderr) = sluice_check(&[files.path()]);
    assert_eq!(code, Some(1), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let errors: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{stdout}");
    let expected = format!(
        "{}:{}: route \"user\": rate_limit.unit: ",
        broken.display(),
        line_of(broken_text, "fortnight")
    );
    assert!(errors[0].contains(&expected), "{stdout}");
    assert!(stdout.contains("1 error(s)"), "{stdout}");
}

/// Upstream now allows `*` anywhere in a value; a migrated `pre*fix` or `a*b*c` must limit,
/// not silently match nothing.
#[tokio::test]
async fn wildcards_anywhere_in_a_value_match_and_count() {
    let yaml = r#"
domain: wild
descriptors:
  - key: path
    value: "pre*fix"
    rate_limit: { unit: minute, requests_per_unit: 1 }
  - key: path
    value: "a*b*c"
    share_threshold: true
    rate_limit: { unit: minute, requests_per_unit: 2 }
"#;
    let mut s = Sluice::start(&[("wild.yaml", yaml)]).await;
    let ask = |v: &'static str| desc(&[("path", v)]);
    // `pre*fix`: each matching value has a counter of its own (no share_threshold).
    for value in ["prefix", "pre-and-fix"] {
        let r = s.call(request("wild", vec![ask(value)])).await;
        assert_eq!(r.overall_code, Code::Ok as i32, "{value}: {r:?}");
        let r = s.call(request("wild", vec![ask(value)])).await;
        assert_eq!(r.overall_code, Code::OverLimit as i32, "{value}: {r:?}");
    }
    // Not matching the pattern: no limit at all.
    let r = s.call(request("wild", vec![ask("prefixx")])).await;
    assert!(r.statuses[0].current_limit.is_none(), "{r:?}");
    // `a*b*c` with share_threshold: every matching value shares one counter of 2.
    let r = s.call(request("wild", vec![ask("a-b-c")])).await;
    assert_eq!(r.overall_code, Code::Ok as i32, "{r:?}");
    let r = s.call(request("wild", vec![ask("abc")])).await;
    assert_eq!(r.overall_code, Code::Ok as i32, "{r:?}");
    let r = s.call(request("wild", vec![ask("axbyc")])).await;
    assert_eq!(
        r.overall_code,
        Code::OverLimit as i32,
        "shared counter: {r:?}"
    );
    let r = s.call(request("wild", vec![ask("a-c-b")])).await;
    assert!(r.statuses[0].current_limit.is_none(), "{r:?}");
    s.stop().await;
}
