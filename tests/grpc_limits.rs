//! Limits over real gRPC: every rule kind, matching order, CIDR ranges, delegation, shadow
//! mode, quota headers, body and metadata, hits_addend, request-side overrides, unknown
//! domains and routes, and the example limits of `config/limits` served as they are.
//!
//! Each test runs its own server on a loopback port with a manual clock (time is a dependency: no test
//! sleeps to cross a window) and asserts whole answers.

mod common;

use common::rls::*;
use common::sluice::*;

/// One route per rule kind, each with a named key so `current_limit.name` is `route/name`.
const KINDS: &str = r#"
domain: kinds
routes:
  - name: global
    global_threshold: { query_per_second: 3 }
  - name: header
    rule_items:
      - limit_by_header: x-tier
        limit_keys:
          - { key: gold, name: gold, query_per_minute: 3 }
  - name: param
    rule_items:
      - limit_by_param: plan
        limit_keys:
          - { key: pro, name: pro, query_per_hour: 3 }
  - name: cookie
    rule_items:
      - limit_by_cookie: tier
        limit_keys:
          - { key: free, name: free, query_per_day: 2 }
  - name: consumer
    rule_items:
      - limit_by_consumer: ''
        limit_keys:
          - { key: acme, name: acme, query_per_minute: 3 }
  - name: per-header
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - { key: "regexp:^k-", name: key, query_per_second: 2 }
  - name: per-param
    rule_items:
      - limit_by_per_param: tenant
        limit_keys:
          - { key: "*", name: tenant, query_per_minute: 3 }
  - name: per-cookie
    rule_items:
      - limit_by_per_cookie: session
        limit_keys:
          - { key: "regexp:^[a-f0-9]{4}$", name: session, query_per_hour: 2 }
  - name: per-consumer
    rule_items:
      - limit_by_per_consumer: ''
        limit_keys:
          - { key: "*", name: consumer, query_per_day: 3 }
  - name: per-ip
    rule_items:
      - limit_by_per_ip: from-remote-addr
        limit_keys:
          - { key: "*", name: ip, query_per_minute: 2 }
  - name: per-xff
    rule_items:
      - limit_by_per_ip: from-header-x-forwarded-for
        limit_keys:
          - { key: "*", name: xff, query_per_minute: 2 }
"#;

async fn kinds() -> Sluice {
    Sluice::start(&[("kinds.yaml", KINDS)]).await
}

/// An exact-value kind: the listed value has one counter shared by every request carrying
/// it (whatever else the descriptor holds); other values have no limit.
async fn exact_kind(route: &str, entry: &str, value: &str, expected: RateLimit) {
    let mut s = kinds().await;
    s.assert_full_window(
        "kinds",
        desc(&[("route", route), (entry, value)]),
        expected.clone(),
    )
    .await;
    let period = period_of(Unit::try_from(expected.unit).unwrap());
    let n = expected.requests_per_unit;
    // Two different requests with the same value share the counter (one hit already taken).
    let a = s
        .status(
            "kinds",
            &[("route", route), (entry, value), ("user", "alice")],
        )
        .await;
    assert_eq!(a, status(Code::Ok, &expected, n - 2, s.until_reset(period)));
    let b = s
        .status(
            "kinds",
            &[
                ("remote_address", "192.0.2.1"),
                (entry, value),
                ("route", route),
            ],
        )
        .await;
    assert_eq!(b, status(Code::Ok, &expected, n - 3, s.until_reset(period)));
    // A value that is not listed, or no entry at all: no limit.
    let other = s
        .status("kinds", &[("route", route), (entry, "other")])
        .await;
    assert_eq!(other, unlimited());
    let absent = s.status("kinds", &[("route", route)]).await;
    assert_eq!(absent, unlimited());
    s.stop().await;
}

/// A per-value kind: each distinct value gets its own counter.
async fn per_kind(
    route: &str,
    entry: &str,
    values: [&str; 2],
    non_matching: Option<&str>,
    expected: RateLimit,
) {
    let mut s = kinds().await;
    let period = period_of(Unit::try_from(expected.unit).unwrap());
    let n = expected.requests_per_unit;
    s.assert_full_window(
        "kinds",
        desc(&[("route", route), (entry, values[0])]),
        expected.clone(),
    )
    .await;
    // values[0] has one hit in this window; use up the rest of its quota.
    for remaining in (0..n - 1).rev() {
        let st = s
            .status("kinds", &[("route", route), (entry, values[0])])
            .await;
        assert_eq!(
            st,
            status(Code::Ok, &expected, remaining, s.until_reset(period))
        );
    }
    // A second value has a full quota of its own, in the same window...
    let st = s
        .status("kinds", &[(entry, values[1]), ("route", route)])
        .await;
    assert_eq!(
        st,
        status(Code::Ok, &expected, n - 1, s.until_reset(period))
    );
    // ...and taking it did not free or touch the first value's counter.
    let st = s
        .status("kinds", &[("route", route), (entry, values[0])])
        .await;
    assert_eq!(
        st,
        status(Code::OverLimit, &expected, 0, s.until_reset(period))
    );
    let st = s
        .status("kinds", &[("route", route), (entry, values[1])])
        .await;
    assert_eq!(
        st,
        status(Code::Ok, &expected, n - 2, s.until_reset(period))
    );
    // In the next window, the second value runs a whole window of its own too.
    s.to_next_window(period);
    s.assert_full_window(
        "kinds",
        desc(&[("route", route), (entry, values[1])]),
        expected.clone(),
    )
    .await;
    if let Some(value) = non_matching {
        let other = s.status("kinds", &[("route", route), (entry, value)]).await;
        assert_eq!(other, unlimited(), "{value:?} matches no key");
    }
    let absent = s.status("kinds", &[("route", route)]).await;
    assert_eq!(absent, unlimited());
    s.stop().await;
}

#[tokio::test]
async fn global_threshold_counts_the_whole_route_in_aligned_windows() {
    let mut s = kinds().await;
    let expected = limit(3, Unit::Second, "global/global");
    s.assert_full_window("kinds", desc(&[("route", "global")]), expected.clone())
        .await;
    // Every descriptor naming the route shares the counter, whatever else it carries.
    let st = s
        .status("kinds", &[("route", "global"), ("x-api-key", "k-1")])
        .await;
    assert_eq!(st, status(Code::Ok, &expected, 1, s.until_reset(SECOND)));
    s.stop().await;
}

#[tokio::test]
async fn limit_by_header_shares_one_counter_per_exact_value() {
    exact_kind(
        "header",
        "x-tier",
        "gold",
        limit(3, Unit::Minute, "header/gold"),
    )
    .await;
}

#[tokio::test]
async fn limit_by_param_shares_one_counter_per_exact_value() {
    exact_kind("param", "plan", "pro", limit(3, Unit::Hour, "param/pro")).await;
}

#[tokio::test]
async fn limit_by_cookie_shares_one_counter_per_exact_value() {
    // Limit 2 is too small for exact_kind's two extra shared hits; check sharing by hand.
    let mut s = kinds().await;
    let expected = limit(2, Unit::Day, "cookie/free");
    s.assert_full_window(
        "kinds",
        desc(&[("route", "cookie"), ("tier", "free")]),
        expected.clone(),
    )
    .await;
    let shared = s
        .status(
            "kinds",
            &[("route", "cookie"), ("tier", "free"), ("user", "bob")],
        )
        .await;
    assert_eq!(shared, status(Code::Ok, &expected, 0, s.until_reset(DAY)));
    let over = s
        .status(
            "kinds",
            &[("user", "carol"), ("tier", "free"), ("route", "cookie")],
        )
        .await;
    assert_eq!(
        over,
        status(Code::OverLimit, &expected, 0, s.until_reset(DAY))
    );
    assert_eq!(
        s.status("kinds", &[("route", "cookie"), ("tier", "paid")])
            .await,
        unlimited()
    );
    s.stop().await;
}

#[tokio::test]
async fn limit_by_consumer_reads_the_consumer_entry() {
    exact_kind(
        "consumer",
        "consumer",
        "acme",
        limit(3, Unit::Minute, "consumer/acme"),
    )
    .await;
}

#[tokio::test]
async fn limit_by_per_header_counts_each_value_apart() {
    per_kind(
        "per-header",
        "x-api-key",
        ["k-1", "k-2"],
        Some("other"),
        limit(2, Unit::Second, "per-header/key"),
    )
    .await;
}

#[tokio::test]
async fn limit_by_per_param_counts_each_value_apart() {
    per_kind(
        "per-param",
        "tenant",
        ["t1", "t:2{x}"],
        None,
        limit(3, Unit::Minute, "per-param/tenant"),
    )
    .await;
}

#[tokio::test]
async fn limit_by_per_cookie_counts_each_value_apart() {
    per_kind(
        "per-cookie",
        "session",
        ["ab12", "ffff"],
        Some("ABCD"),
        limit(2, Unit::Hour, "per-cookie/session"),
    )
    .await;
}

#[tokio::test]
async fn limit_by_per_consumer_counts_each_consumer_apart() {
    per_kind(
        "per-consumer",
        "consumer",
        ["acme", "globex"],
        None,
        limit(3, Unit::Day, "per-consumer/consumer"),
    )
    .await;
}

#[tokio::test]
async fn limit_by_per_ip_from_remote_addr_counts_each_address_apart() {
    per_kind(
        "per-ip",
        "remote_address",
        ["192.0.2.1", "2001:db8::7"],
        Some("not-an-address"),
        limit(2, Unit::Minute, "per-ip/ip"),
    )
    .await;
}

#[tokio::test]
async fn limit_by_per_ip_from_header_counts_the_first_forwarded_address() {
    let mut s = kinds().await;
    let expected = limit(2, Unit::Minute, "per-xff/xff");
    let xff = |v: &'static str| desc(&[("route", "per-xff"), ("x-forwarded-for", v)]);
    s.assert_full_window(
        "kinds",
        xff("203.0.113.7, 10.0.0.1, 10.0.0.2"),
        expected.clone(),
    )
    .await;
    // The same first address, alone or followed by other proxies: the same counter.
    let st = s.ask_one("kinds", xff("203.0.113.7")).await.statuses[0].clone();
    assert_eq!(st, status(Code::Ok, &expected, 0, s.until_reset(MINUTE)));
    let st = s
        .ask_one("kinds", xff("203.0.113.7,198.51.100.1"))
        .await
        .statuses[0]
        .clone();
    assert_eq!(
        st,
        status(Code::OverLimit, &expected, 0, s.until_reset(MINUTE))
    );
    // 203.0.113.7 as a later hop does not count for it: the first address is another client.
    s.assert_full_window("kinds", xff("10.0.0.1, 203.0.113.7"), expected.clone())
        .await;
    // The plain remote_address entry is not what this item reads.
    let st = s
        .status(
            "kinds",
            &[("route", "per-xff"), ("remote_address", "203.0.113.8")],
        )
        .await;
    assert_eq!(st, unlimited());
    s.stop().await;
}

#[tokio::test]
async fn cidr_ranges_v4_and_v6_give_each_address_inside_its_own_counter() {
    let yaml = r#"
domain: nets
routes:
  - name: r
    rule_items:
      - limit_by_per_ip: from-remote-addr
        limit_keys:
          - { key: "10.0.0.0/8", name: ten, query_per_minute: 2 }
          - { key: "2001:db8::/32", name: doc6, query_per_minute: 3 }
          - { key: "192.0.2.7", name: one, query_per_minute: 1 }
"#;
    let mut s = Sluice::start(&[("nets.yaml", yaml)]).await;
    let ten = limit(2, Unit::Minute, "r/ten");
    let doc6 = limit(3, Unit::Minute, "r/doc6");
    let one = limit(1, Unit::Minute, "r/one");
    let ip = |a: &'static str| desc(&[("route", "r"), ("remote_address", a)]);

    s.assert_full_window("nets", ip("10.1.2.3"), ten.clone())
        .await;
    s.assert_full_window("nets", ip("2001:db8::1"), doc6.clone())
        .await;
    s.assert_full_window("nets", ip("192.0.2.7"), one.clone())
        .await;
    // In one window, every address of a range counts on its own.
    s.to_next_window(MINUTE);
    let reset = MINUTE;
    let check = async |s: &mut Sluice, addr: &'static str, expected: DescriptorStatus| {
        assert_eq!(
            s.ask_one("nets", ip(addr)).await.statuses[0],
            expected,
            "{addr}"
        );
    };
    check(&mut s, "10.1.2.3", status(Code::Ok, &ten, 1, reset)).await;
    check(&mut s, "10.1.2.3", status(Code::Ok, &ten, 0, reset)).await;
    check(&mut s, "10.1.2.3", status(Code::OverLimit, &ten, 0, reset)).await;
    check(&mut s, "10.255.255.255", status(Code::Ok, &ten, 1, reset)).await;
    check(&mut s, "10.0.0.0", status(Code::Ok, &ten, 1, reset)).await;
    check(&mut s, "2001:db8::1", status(Code::Ok, &doc6, 2, reset)).await;
    check(&mut s, "2001:db8::1", status(Code::Ok, &doc6, 1, reset)).await;
    check(
        &mut s,
        "2001:db8:ffff:ffff::2",
        status(Code::Ok, &doc6, 2, reset),
    )
    .await;
    check(&mut s, "2001:db8::1", status(Code::Ok, &doc6, 0, reset)).await;
    check(&mut s, "192.0.2.7", status(Code::Ok, &one, 0, reset)).await;
    check(&mut s, "192.0.2.7", status(Code::OverLimit, &one, 0, reset)).await;
    // Outside every range: no limit.
    for outside in [
        "11.0.0.1",
        "9.255.255.255",
        "2001:db9::1",
        "192.0.2.8",
        "::1",
    ] {
        assert_eq!(
            s.ask_one("nets", ip(outside)).await.statuses[0],
            unlimited(),
            "{outside}"
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn first_matching_item_and_first_matching_key_win() {
    let yaml = r#"
domain: order
routes:
  - name: r
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - { key: "regexp:^vip-", name: vip, query_per_minute: 5 }
          - { key: "regexp:^vip-gold", name: never, query_per_minute: 1 }
          - { key: "regexp:^basic-", name: basic, query_per_minute: 2 }
      - limit_by_per_ip: from-remote-addr
        limit_keys:
          - { key: "*", name: ip, query_per_minute: 1 }
      - limit_by_header: x-tier
        limit_keys:
          - { key: gold, name: tier, query_per_minute: 4 }
"#;
    let mut s = Sluice::start(&[("order.yaml", yaml)]).await;
    let vip = limit(5, Unit::Minute, "r/vip");
    let basic = limit(2, Unit::Minute, "r/basic");
    let ip = limit(1, Unit::Minute, "r/ip");
    let tier = limit(4, Unit::Minute, "r/tier");
    let reset = s.until_reset(MINUTE);

    // Within an item the first matching key wins, even when a later one also matches.
    let st = s
        .status(
            "order",
            &[
                ("route", "r"),
                ("x-api-key", "vip-gold-1"),
                ("remote_address", "192.0.2.1"),
            ],
        )
        .await;
    assert_eq!(st, status(Code::Ok, &vip, 4, reset));
    // The first item decided, so the address item was not tried: its counter is untouched.
    for _ in 0..3 {
        s.status(
            "order",
            &[
                ("route", "r"),
                ("x-api-key", "basic-1"),
                ("remote_address", "192.0.2.1"),
            ],
        )
        .await;
    }
    let st = s
        .status("order", &[("route", "r"), ("remote_address", "192.0.2.1")])
        .await;
    assert_eq!(
        st,
        status(Code::Ok, &ip, 0, reset),
        "the address item counts from zero"
    );
    let st = s
        .status("order", &[("route", "r"), ("x-api-key", "basic-1")])
        .await;
    assert_eq!(
        st,
        status(Code::OverLimit, &basic, 0, reset),
        "basic-1 was counted 4 times"
    );

    // The entry is present but no key of the first item matches: the next item decides.
    let st = s
        .status(
            "order",
            &[
                ("route", "r"),
                ("x-api-key", "free-1"),
                ("remote_address", "192.0.2.2"),
            ],
        )
        .await;
    assert_eq!(st, status(Code::Ok, &ip, 0, reset));
    // Neither of the first two items applies: the third decides.
    let st = s
        .status(
            "order",
            &[("route", "r"), ("x-api-key", "free-1"), ("x-tier", "gold")],
        )
        .await;
    assert_eq!(st, status(Code::Ok, &tier, 3, reset));
    // The address item comes before the tier item.
    let st = s
        .status(
            "order",
            &[
                ("route", "r"),
                ("x-tier", "gold"),
                ("remote_address", "192.0.2.3"),
            ],
        )
        .await;
    assert_eq!(st, status(Code::Ok, &ip, 0, reset));
    // Matching no item: OK, no limit.
    for pairs in [
        &[("route", "r")][..],
        &[("route", "r"), ("x-api-key", "free-1")],
        &[
            ("route", "r"),
            ("x-tier", "silver"),
            ("remote_address", "not-an-ip"),
        ],
    ] {
        let response = s.ask("order", &[pairs]).await;
        assert_eq!(response.overall_code, Code::Ok as i32);
        assert_eq!(response.statuses, [unlimited()], "{pairs:?}");
    }
    s.stop().await;
}

#[tokio::test]
async fn descriptor_key_names_the_entry_an_item_reads() {
    let yaml = r#"
domain: dk
routes:
  - name: r
    rule_items:
      - limit_by_header: x-region
        descriptor_key: region
        limit_keys:
          - { key: eu-west, name: eu, query_per_minute: 2 }
      - limit_by_per_ip: from-remote-addr
        descriptor_key: client_ip
        limit_keys:
          - { key: "*", name: client, query_per_minute: 3 }
"#;
    let mut s = Sluice::start(&[("dk.yaml", yaml)]).await;
    s.assert_full_window(
        "dk",
        desc(&[("route", "r"), ("region", "eu-west")]),
        limit(2, Unit::Minute, "r/eu"),
    )
    .await;
    s.assert_full_window(
        "dk",
        desc(&[("route", "r"), ("client_ip", "192.0.2.9")]),
        limit(3, Unit::Minute, "r/client"),
    )
    .await;
    // The default entry names are not read any more.
    for pairs in [
        &[("route", "r"), ("x-region", "eu-west")][..],
        &[("route", "r"), ("remote_address", "192.0.2.9")],
    ] {
        assert_eq!(s.status("dk", pairs).await, unlimited(), "{pairs:?}");
    }
    s.stop().await;
}

const FAMILY: &str = r#"
domain: family
routes:
  # A grandchild listed before its ancestors: order in the file does not matter.
  - name: grandchild
    parent: child-a
  - name: base
    show_limit_quota_header: true
    rejected_msg: "base says no"
    global_threshold: { query_per_minute: 2 }
  - name: child-a
    parent: base
  - name: child-b
    parent: base
  - name: child-c
    parent: base
    rejected_msg: "c says no"
    show_limit_quota_header: false
    global_threshold: { query_per_second: 1 }
"#;

#[tokio::test]
async fn a_child_route_inherits_limits_and_settings_but_counts_apart() {
    let mut s = Sluice::start(&[("family.yaml", FAMILY)]).await;
    let reset = s.until_reset(MINUTE);
    for route in ["child-a", "child-b", "grandchild", "base"] {
        let expected = limit(2, Unit::Minute, &format!("{route}/global"));
        let first = s.ask("family", &[&[("route", route)]]).await;
        assert_eq!(
            first.statuses,
            [status(Code::Ok, &expected, 1, reset)],
            "{route}"
        );
        // Inherited show_limit_quota_header.
        assert_eq!(header(&first, "X-RateLimit-Limit"), Some("2"), "{route}");
        assert_eq!(
            header(&first, "X-RateLimit-Remaining"),
            Some("1"),
            "{route}"
        );
        assert!(first.raw_body.is_empty());
        let second = s.ask("family", &[&[("route", route)]]).await;
        assert_eq!(
            second.statuses,
            [status(Code::Ok, &expected, 0, reset)],
            "{route}"
        );
        let third = s.ask("family", &[&[("route", route)]]).await;
        assert_eq!(third.overall_code, Code::OverLimit as i32, "{route}");
        assert_eq!(
            third.statuses,
            [status(Code::OverLimit, &expected, 0, reset)],
            "{route}"
        );
        // Inherited rejected_msg.
        assert_eq!(third.raw_body, b"base says no", "{route}");
        assert_eq!(metadata(&third, "route"), Some(route));
    }
    s.stop().await;
}

#[tokio::test]
async fn a_child_route_overrides_what_it_sets() {
    let mut s = Sluice::start(&[("family.yaml", FAMILY)]).await;
    let expected = limit(1, Unit::Second, "child-c/global");
    let first = s.ask("family", &[&[("route", "child-c")]]).await;
    assert_eq!(
        first.statuses,
        [status(Code::Ok, &expected, 0, s.until_reset(SECOND))]
    );
    assert!(
        first.response_headers_to_add.is_empty(),
        "{:?}",
        first.response_headers_to_add
    );
    let second = s.ask("family", &[&[("route", "child-c")]]).await;
    assert_eq!(
        second.statuses,
        [status(Code::OverLimit, &expected, 0, s.until_reset(SECOND))]
    );
    assert_eq!(second.raw_body, b"c says no");
    assert!(second.response_headers_to_add.is_empty());
    // The parent is untouched by its child's traffic.
    let parent = s.status("family", &[("route", "base")]).await;
    assert_eq!(
        parent,
        status(
            Code::Ok,
            &limit(2, Unit::Minute, "base/global"),
            1,
            s.until_reset(MINUTE)
        )
    );
    s.stop().await;
}

#[tokio::test]
async fn shadow_mode_counts_and_reports_but_answers_ok() {
    let yaml = r#"
domain: shadow
routes:
  - name: try
    shadow_mode: true
    rejected_msg: "would reject"
    global_threshold: { query_per_minute: 2 }
  - name: real
    global_threshold: { query_per_minute: 1 }
"#;
    let mut s = Sluice::start(&[("shadow.yaml", yaml)]).await;
    let tried = limit(2, Unit::Minute, "try/global");
    let reset = s.until_reset(MINUTE);
    for remaining in [1, 0, 0, 0] {
        let response = s.ask("shadow", &[&[("route", "try")]]).await;
        assert_eq!(response.overall_code, Code::Ok as i32);
        assert_eq!(
            response.statuses,
            [status(Code::Ok, &tried, remaining, reset)]
        );
        assert!(response.raw_body.is_empty());
    }
    let response = s.ask("shadow", &[&[("route", "try")]]).await;
    assert_eq!(metadata(&response, "decision"), Some("shadow"));
    assert_eq!(metadata(&response, "route"), Some("try"));

    // With a real limit over in the same request, the answer is OVER_LIMIT because of it.
    let real = limit(1, Unit::Minute, "real/global");
    s.ask("shadow", &[&[("route", "real")]]).await;
    let response = s
        .ask("shadow", &[&[("route", "try")], &[("route", "real")]])
        .await;
    assert_eq!(response.overall_code, Code::OverLimit as i32);
    assert_eq!(
        response.statuses,
        [
            status(Code::Ok, &tried, 0, reset),
            status(Code::OverLimit, &real, 0, reset)
        ]
    );
    assert_eq!(metadata(&response, "route"), Some("real"));
    s.stop().await;
}

#[tokio::test]
async fn quota_headers_describe_the_most_restrictive_descriptor() {
    let yaml = r#"
domain: quota
defaults:
  show_limit_quota_header: true
routes:
  - name: wide
    global_threshold: { query_per_minute: 10 }
  - name: narrow
    global_threshold: { query_per_second: 3 }
  - name: quiet
    show_limit_quota_header: false
    global_threshold: { query_per_minute: 5 }
"#;
    let mut s = Sluice::start(&[("quota.yaml", yaml)]).await;
    // 750 ms left in the second, 44.750 s in the minute; Reset is in whole seconds, rounded up.
    let response = s
        .ask("quota", &[&[("route", "wide")], &[("route", "narrow")]])
        .await;
    assert_eq!(
        response.statuses,
        [
            status(Code::Ok, &limit(10, Unit::Minute, "wide/global"), 9, 44_750),
            status(Code::Ok, &limit(3, Unit::Second, "narrow/global"), 2, 750),
        ]
    );
    assert_eq!(header(&response, "X-RateLimit-Limit"), Some("3"));
    assert_eq!(header(&response, "X-RateLimit-Remaining"), Some("2"));
    assert_eq!(header(&response, "X-RateLimit-Reset"), Some("1"));
    assert_eq!(response.response_headers_to_add.len(), 3);

    // Order does not matter: the most restrictive still wins.
    let response = s
        .ask("quota", &[&[("route", "narrow")], &[("route", "wide")]])
        .await;
    assert_eq!(header(&response, "X-RateLimit-Limit"), Some("3"));
    assert_eq!(header(&response, "X-RateLimit-Remaining"), Some("1"));

    let response = s.ask("quota", &[&[("route", "wide")]]).await;
    assert_eq!(header(&response, "X-RateLimit-Limit"), Some("10"));
    assert_eq!(header(&response, "X-RateLimit-Remaining"), Some("7"));
    assert_eq!(header(&response, "X-RateLimit-Reset"), Some("45"));

    // Off for the route: no headers at all.
    let response = s.ask("quota", &[&[("route", "quiet")]]).await;
    assert_eq!(
        response.statuses,
        [status(
            Code::Ok,
            &limit(5, Unit::Minute, "quiet/global"),
            4,
            44_750
        )]
    );
    assert!(
        response.response_headers_to_add.is_empty(),
        "{:?}",
        response.response_headers_to_add
    );
    s.stop().await;
}

#[tokio::test]
async fn raw_body_and_dynamic_metadata_say_what_decided() {
    let yaml = r#"
domain: body
routes:
  - name: r
    rejected_msg: "slow down, please"
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - { key: "*", name: per-key, query_per_minute: 1 }
"#;
    let mut s = Sluice::start(&[("body.yaml", yaml)]).await;
    let pairs: &[(&str, &str)] = &[("route", "r"), ("x-api-key", "k")];
    let ok = s.ask("body", &[pairs]).await;
    assert_eq!(ok.overall_code, Code::Ok as i32);
    assert!(ok.raw_body.is_empty(), "no body on OK");
    assert_eq!(metadata(&ok, "route"), Some("r"));
    assert_eq!(metadata(&ok, "rule"), Some("per-key"));
    assert_eq!(metadata(&ok, "source"), Some("memory"));
    assert_eq!(metadata(&ok, "decision"), Some("ok"));

    let over = s.ask("body", &[pairs]).await;
    assert_eq!(over.overall_code, Code::OverLimit as i32);
    assert_eq!(over.raw_body, b"slow down, please");
    assert_eq!(metadata(&over, "route"), Some("r"));
    assert_eq!(metadata(&over, "rule"), Some("per-key"));
    assert_eq!(metadata(&over, "source"), Some("memory"));
    assert_eq!(metadata(&over, "decision"), Some("over_limit"));
    s.stop().await;
}

#[tokio::test]
async fn overall_code_is_over_limit_when_any_descriptor_is_and_statuses_keep_order() {
    let yaml = r#"
domain: multi
routes:
  - name: one
    global_threshold: { query_per_minute: 1 }
  - name: many
    global_threshold: { query_per_hour: 100 }
"#;
    let mut s = Sluice::start(&[("multi.yaml", yaml)]).await;
    let one = limit(1, Unit::Minute, "one/global");
    let many = limit(100, Unit::Hour, "many/global");
    s.ask("multi", &[&[("route", "one")]]).await;
    let response = s
        .ask(
            "multi",
            &[
                &[("route", "nowhere")],
                &[("route", "one")],
                &[("route", "many")],
                &[("other", "x")],
            ],
        )
        .await;
    assert_eq!(response.overall_code, Code::OverLimit as i32);
    assert_eq!(
        response.statuses,
        [
            unlimited(),
            status(Code::OverLimit, &one, 0, 44_750),
            status(Code::Ok, &many, 99, 3_584_750),
            unlimited(),
        ]
    );
    let response = s
        .ask("multi", &[&[("route", "many")], &[("route", "nowhere")]])
        .await;
    assert_eq!(response.overall_code, Code::Ok as i32);
    assert_eq!(
        response.statuses,
        [status(Code::Ok, &many, 98, 3_584_750), unlimited()]
    );
    s.stop().await;
}

#[tokio::test]
async fn hits_addend_from_the_request_and_from_each_descriptor() {
    let yaml = r#"
domain: hits
routes:
  - name: r
    global_threshold: { query_per_minute: 10 }
"#;
    let mut s = Sluice::start(&[("hits.yaml", yaml)]).await;
    let l = limit(10, Unit::Minute, "r/global");
    let r: &[(&str, &str)] = &[("route", "r")];
    let reset = 44_750;
    async fn send(s: &mut Sluice, request_hits: u32, d: RateLimitDescriptor) -> DescriptorStatus {
        let mut req = request("hits", vec![d]);
        req.hits_addend = request_hits;
        s.call(req).await.statuses[0].clone()
    }
    // The request's 0 means 1.
    assert_eq!(
        send(&mut s, 0, desc(r)).await,
        status(Code::Ok, &l, 9, reset)
    );
    // The request's 5 takes 5.
    assert_eq!(
        send(&mut s, 5, desc(r)).await,
        status(Code::Ok, &l, 4, reset)
    );
    // The descriptor's own value wins over the request's.
    assert_eq!(
        send(&mut s, 5, desc_hits(r, 3)).await,
        status(Code::Ok, &l, 1, reset)
    );
    // The descriptor's explicit 0 checks without counting, whatever the request says.
    assert_eq!(
        send(&mut s, 7, desc_hits(r, 0)).await,
        status(Code::Ok, &l, 1, reset)
    );
    assert_eq!(
        send(&mut s, 0, desc_hits(r, 0)).await,
        status(Code::Ok, &l, 1, reset)
    );
    // 9 + 2 = 11 > 10: over; a check then reports over without counting more.
    assert_eq!(
        send(&mut s, 0, desc_hits(r, 2)).await,
        status(Code::OverLimit, &l, 0, reset)
    );
    assert_eq!(
        send(&mut s, 0, desc_hits(r, 0)).await,
        status(Code::OverLimit, &l, 0, reset)
    );
    // is_negative_hits gives hits back: 11 - 2 = 9.
    let give = RateLimitDescriptor {
        is_negative_hits: true,
        ..desc_hits(r, 2)
    };
    assert_eq!(send(&mut s, 0, give).await, status(Code::Ok, &l, 1, reset));
    // ... with the request's hits_addend when the descriptor has none: 9 - 3 = 6.
    let give = RateLimitDescriptor {
        is_negative_hits: true,
        ..desc(r)
    };
    assert_eq!(send(&mut s, 3, give).await, status(Code::Ok, &l, 4, reset));
    // Back to normal counting: 6 + 4 = 10, then 11.
    assert_eq!(
        send(&mut s, 4, desc(r)).await,
        status(Code::Ok, &l, 0, reset)
    );
    assert_eq!(
        send(&mut s, 0, desc(r)).await,
        status(Code::OverLimit, &l, 0, reset)
    );
    s.stop().await;
}

#[tokio::test]
async fn hits_addend_larger_than_the_limit_is_over_at_once() {
    let yaml = "domain: big\nroutes:\n  - name: r\n    global_threshold: { query_per_minute: 3 }\n";
    let mut s = Sluice::start(&[("big.yaml", yaml)]).await;
    let l = limit(3, Unit::Minute, "r/global");
    let st = s.ask_one("big", desc_hits(&[("route", "r")], 4)).await;
    assert_eq!(st.overall_code, Code::OverLimit as i32);
    assert_eq!(st.statuses, [status(Code::OverLimit, &l, 0, 44_750)]);
    s.stop().await;
}

const OVERRIDES: &str = r#"
domain: ovr
routes:
  - name: r
    global_threshold: { query_per_minute: 100 }
"#;

const NO_OVERRIDES: &str = r#"
domain: strict
allow_limit_override: false
routes:
  - name: r
    global_threshold: { query_per_minute: 3 }
"#;

#[tokio::test]
async fn a_request_limit_override_replaces_the_matched_rules_limit() {
    let mut s = Sluice::start(&[("ovr.yaml", OVERRIDES)]).await;
    let r: &[(&str, &str)] = &[("route", "r")];
    let two_per_second = limit(2, Unit::Second, "r/global");
    for (code, remaining) in [(Code::Ok, 1), (Code::Ok, 0), (Code::OverLimit, 0)] {
        let response = s
            .ask_one("ovr", desc_override(r, 2, RateLimitUnit::Second, None))
            .await;
        assert_eq!(
            response.statuses,
            [status(code, &two_per_second, remaining, 750)]
        );
        assert_eq!(response.overall_code, code as i32);
    }
    s.to_next_window(SECOND);
    let response = s
        .ask_one("ovr", desc_override(r, 2, RateLimitUnit::Second, None))
        .await;
    assert_eq!(
        response.statuses,
        [status(Code::Ok, &two_per_second, 1, SECOND)]
    );
    s.stop().await;
}

#[tokio::test]
async fn a_limit_override_with_a_unit_multiplier_counts_over_that_many_units() {
    let mut s = Sluice::start(&[("ovr.yaml", OVERRIDES)]).await;
    let r: &[(&str, &str)] = &[("route", "r")];
    let mut expected = limit(1, Unit::Second, "r/global");
    expected.unit_multiplier = Some(30);
    // 15.250 s into a 30 s window aligned to the epoch.
    s.assert_full_window(
        "ovr",
        desc_override(r, 1, RateLimitUnit::Second, Some(30)),
        expected,
    )
    .await;
    s.stop().await;
}

#[tokio::test]
async fn a_limit_override_without_a_matching_rule_limits_domain_and_entries() {
    let mut s = Sluice::start(&[("ovr.yaml", OVERRIDES)]).await;
    let entries_a: &[(&str, &str)] = &[("route", "unknown"), ("user", "a")];
    let entries_b: &[(&str, &str)] = &[("route", "unknown"), ("user", "b")];
    let check = |st: &DescriptorStatus, code: Code, remaining: u32| {
        assert_eq!(st.code, code as i32, "{st:?}");
        assert_eq!(st.limit_remaining, remaining, "{st:?}");
        assert_eq!(st.duration_until_reset, Some(duration(44_750)), "{st:?}");
        let l = st.current_limit.as_ref().expect("current_limit");
        assert_eq!(
            (l.requests_per_unit, l.unit),
            (2, Unit::Minute as i32),
            "{st:?}"
        );
    };
    for (code, remaining) in [(Code::Ok, 1), (Code::Ok, 0), (Code::OverLimit, 0)] {
        let response = s
            .ask_one(
                "ovr",
                desc_override(entries_a, 2, RateLimitUnit::Minute, None),
            )
            .await;
        check(&response.statuses[0], code, remaining);
        assert_eq!(response.overall_code, code as i32);
    }
    // Other entries: another counter.
    let response = s
        .ask_one(
            "ovr",
            desc_override(entries_b, 2, RateLimitUnit::Minute, None),
        )
        .await;
    check(&response.statuses[0], Code::Ok, 1);
    // No route entry at all: still limited by its entries.
    let response = s
        .ask_one(
            "ovr",
            desc_override(&[("user", "a")], 2, RateLimitUnit::Minute, None),
        )
        .await;
    check(&response.statuses[0], Code::Ok, 1);
    // Without the override, the same descriptor has no limit.
    assert_eq!(s.status("ovr", entries_a).await, unlimited());
    s.stop().await;
}

#[tokio::test]
async fn a_domain_can_refuse_limit_overrides() {
    let mut s = Sluice::start(&[("strict.yaml", NO_OVERRIDES)]).await;
    let l = limit(3, Unit::Minute, "r/global");
    for remaining in [2, 1, 0] {
        let response = s
            .ask_one(
                "strict",
                desc_override(&[("route", "r")], 1000, RateLimitUnit::Second, None),
            )
            .await;
        assert_eq!(response.statuses, [status(Code::Ok, &l, remaining, 44_750)]);
    }
    let response = s
        .ask_one(
            "strict",
            desc_override(&[("route", "r")], 1000, RateLimitUnit::Second, None),
        )
        .await;
    assert_eq!(response.statuses, [status(Code::OverLimit, &l, 0, 44_750)]);
    // No rule matched: the override does not create a limit either.
    for _ in 0..3 {
        let response = s
            .ask_one(
                "strict",
                desc_override(
                    &[("route", "x"), ("user", "u")],
                    1,
                    RateLimitUnit::Minute,
                    None,
                ),
            )
            .await;
        assert_eq!(response.statuses, [unlimited()]);
        assert_eq!(response.overall_code, Code::Ok as i32);
    }
    s.stop().await;
}

#[tokio::test]
async fn unknown_domains_and_routes_are_ok_without_a_limit() {
    let mut s = Sluice::start(&[("ovr.yaml", OVERRIDES)]).await;
    for domain in ["nope", "OVR", "ovr "] {
        for _ in 0..3 {
            let response = s
                .ask(
                    domain,
                    &[
                        &[("route", "r")],
                        &[("route", "r"), ("x", "y")],
                        &[("k", "v")],
                    ],
                )
                .await;
            assert_eq!(response.overall_code, Code::Ok as i32, "{domain:?}");
            assert_eq!(
                response.statuses,
                [unlimited(), unlimited(), unlimited()],
                "{domain:?}"
            );
            assert!(response.raw_body.is_empty());
            assert!(response.response_headers_to_add.is_empty());
        }
    }
    for _ in 0..3 {
        let response = s
            .ask(
                "ovr",
                &[
                    &[("route", "other")],
                    &[("route", "R")],
                    &[("path", "r")],
                    &[("x", "r"), ("route", "")],
                ],
            )
            .await;
        assert_eq!(response.overall_code, Code::Ok as i32);
        assert_eq!(
            response.statuses,
            [unlimited(), unlimited(), unlimited(), unlimited()]
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn a_custom_route_key_selects_routes() {
    let yaml = r#"
domain: custom
route_key: service
routes:
  - name: billing
    global_threshold: { query_per_minute: 2 }
"#;
    let mut s = Sluice::start(&[("custom.yaml", yaml)]).await;
    s.assert_full_window(
        "custom",
        desc(&[("service", "billing")]),
        limit(2, Unit::Minute, "billing/global"),
    )
    .await;
    assert_eq!(
        s.status("custom", &[("route", "billing")]).await,
        unlimited()
    );
    s.stop().await;
}

// ----- the example limits of config/limits, served as they are -----

/// Asserts everything but the exact name of an unnamed rule, which must belong to `route`.
fn assert_limited(
    st: &DescriptorStatus,
    code: Code,
    rpu: u32,
    unit: Unit,
    route: &str,
    remaining: u32,
    reset_ms: u64,
) {
    let l = st
        .current_limit
        .as_ref()
        .unwrap_or_else(|| panic!("no current_limit: {st:?}"));
    assert!(
        l.name.starts_with(&format!("{route}/")),
        "name {:?} is not of route {route}",
        l.name
    );
    let expected = limit(rpu, unit, &l.name);
    assert_eq!(*st, status(code, &expected, remaining, reset_ms));
}

/// Takes `hits` at once, in one request with that descriptor `hits_addend`.
async fn fill(s: &mut Sluice, domain: &str, pairs: &[(&str, &str)], hits: u64) {
    if hits > 0 {
        s.ask_one(domain, desc_hits(pairs, hits)).await;
    }
}

#[tokio::test]
async fn example_edge_api_allows_1000_per_minute_route_wide() {
    let mut s = Sluice::start_examples().await;
    let api: &[(&str, &str)] = &[("route", "api")];
    let st = s.status("edge", api).await;
    assert_eq!(
        st,
        status(
            Code::Ok,
            &limit(1000, Unit::Minute, "api/global"),
            999,
            44_750
        )
    );
    fill(&mut s, "edge", api, 998).await;
    let response = s.ask("edge", &[api]).await;
    assert_eq!(
        response.statuses,
        [status(
            Code::Ok,
            &limit(1000, Unit::Minute, "api/global"),
            0,
            44_750
        )]
    );
    // show_limit_quota_header: false in the defaults (the shipped Envoy computes the headers
    // from the status above), so sluice adds none.
    assert!(response.response_headers_to_add.is_empty(), "{response:?}");
    let response = s.ask("edge", &[api]).await;
    assert_eq!(response.overall_code, Code::OverLimit as i32);
    assert_eq!(response.raw_body, b"Too many requests, slow down");
    s.to_next_window(MINUTE);
    let st = s.status("edge", api).await;
    assert_eq!(
        st,
        status(
            Code::Ok,
            &limit(1000, Unit::Minute, "api/global"),
            999,
            MINUTE
        )
    );
    s.stop().await;
}

#[tokio::test]
async fn example_edge_api_users_limits_per_key_and_per_address() {
    let mut s = Sluice::start_examples().await;
    let route = "api-users";
    // VIP keys: 100 per second each; other keys: 10 per second each.
    for (key, rpu) in [
        ("vip-1", 100),
        ("vip-2", 100),
        ("basic-1", 10),
        ("basic-2", 10),
    ] {
        let pairs: &[(&str, &str)] = &[("route", route), ("x-api-key", key)];
        fill(&mut s, "edge", pairs, rpu - 1).await;
        let st = s.status("edge", pairs).await;
        assert_limited(&st, Code::Ok, rpu as u32, Unit::Second, route, 0, 750);
        let response = s.ask("edge", &[pairs]).await;
        assert_limited(
            &response.statuses[0],
            Code::OverLimit,
            rpu as u32,
            Unit::Second,
            route,
            0,
            750,
        );
        // Inherited from api (via the defaults): the body.
        assert_eq!(response.raw_body, b"Too many requests, slow down");
    }
    // Addresses: 600 per minute in 10.0.0.0/8 and 2001:db8::/32, 60 elsewhere in IPv4.
    for (addr, rpu) in [
        ("10.1.2.3", 600),
        ("10.1.2.4", 600),
        ("2001:db8::5", 600),
        ("192.0.2.1", 60),
        ("198.51.100.1", 60),
    ] {
        let pairs: &[(&str, &str)] = &[("route", route), ("remote_address", addr)];
        fill(&mut s, "edge", pairs, rpu - 1).await;
        let st = s.status("edge", pairs).await;
        assert_limited(&st, Code::Ok, rpu as u32, Unit::Minute, route, 0, 44_750);
        let st = s.status("edge", pairs).await;
        assert_limited(
            &st,
            Code::OverLimit,
            rpu as u32,
            Unit::Minute,
            route,
            0,
            44_750,
        );
    }
    // An IPv6 address outside 2001:db8::/32 matches no key; the route has no route-wide limit.
    assert_eq!(
        s.status(
            "edge",
            &[("route", route), ("remote_address", "2001:db9::1")]
        )
        .await,
        unlimited()
    );
    assert_eq!(s.status("edge", &[("route", route)]).await, unlimited());
    s.stop().await;
}

#[tokio::test]
async fn example_edge_api_mobile_inherits_the_api_limit_and_counts_apart() {
    let mut s = Sluice::start_examples().await;
    fill(&mut s, "edge", &[("route", "api-mobile")], 1000).await;
    let response = s.ask("edge", &[&[("route", "api-mobile")]]).await;
    assert_eq!(
        response.statuses,
        [status(
            Code::OverLimit,
            &limit(1000, Unit::Minute, "api-mobile/global"),
            0,
            44_750
        )]
    );
    assert_eq!(response.raw_body, b"Mobile quota exceeded");
    assert!(response.response_headers_to_add.is_empty(), "{response:?}");
    // api itself is untouched.
    let st = s.status("edge", &[("route", "api")]).await;
    assert_eq!(
        st,
        status(
            Code::Ok,
            &limit(1000, Unit::Minute, "api/global"),
            999,
            44_750
        )
    );
    s.stop().await;
}

#[tokio::test]
async fn example_edge_login_limits_the_first_forwarded_address() {
    let mut s = Sluice::start_examples().await;
    let xff = |v: &'static str| -> Vec<(&'static str, &'static str)> {
        vec![("route", "login"), ("x-forwarded-for", v)]
    };
    for remaining in (0..5).rev() {
        let st = s.status("edge", &xff("203.0.113.9, 10.0.0.1")).await;
        assert_limited(&st, Code::Ok, 5, Unit::Minute, "login", remaining, 44_750);
    }
    let st = s.status("edge", &xff("203.0.113.9")).await;
    assert_limited(&st, Code::OverLimit, 5, Unit::Minute, "login", 0, 44_750);
    let st = s.status("edge", &xff("10.0.0.1, 203.0.113.9")).await;
    assert_limited(&st, Code::Ok, 5, Unit::Minute, "login", 4, 44_750);
    s.stop().await;
}

#[tokio::test]
async fn example_edge_login_rule_is_named_by_its_item_name() {
    // edge.yaml names the login item `login-per-client`; a rule's optional name is its
    // identity and what current_limit.name shows.
    let mut s = Sluice::start_examples().await;
    let st = s
        .status(
            "edge",
            &[("route", "login"), ("x-forwarded-for", "203.0.113.9")],
        )
        .await;
    assert_eq!(
        st,
        status(
            Code::Ok,
            &limit(5, Unit::Minute, "login/login-per-client"),
            4,
            44_750
        )
    );
    s.stop().await;
}

#[tokio::test]
async fn example_edge_search_is_in_shadow_mode() {
    let mut s = Sluice::start_examples().await;
    fill(&mut s, "edge", &[("route", "search")], 49).await;
    for _ in 0..3 {
        let response = s.ask("edge", &[&[("route", "search")]]).await;
        assert_eq!(response.overall_code, Code::Ok as i32);
        assert_eq!(
            response.statuses,
            [status(
                Code::Ok,
                &limit(50, Unit::Second, "search/global"),
                0,
                750
            )]
        );
        assert!(response.raw_body.is_empty());
    }
    s.stop().await;
}

#[tokio::test]
async fn example_partners_reports_limits_by_plan_session_and_tenant() {
    let mut s = Sluice::start_examples().await;
    let reports = "reports";
    // plan=gold: one shared counter of 10000 per hour.
    fill(
        &mut s,
        "partners",
        &[("route", reports), ("plan", "gold"), ("user", "a")],
        9_999,
    )
    .await;
    let st = s
        .status(
            "partners",
            &[("route", reports), ("plan", "gold"), ("user", "b")],
        )
        .await;
    assert_limited(&st, Code::Ok, 10_000, Unit::Hour, reports, 0, 3_584_750);
    let response = s
        .ask("partners", &[&[("route", reports), ("plan", "gold")]])
        .await;
    assert_limited(
        &response.statuses[0],
        Code::OverLimit,
        10_000,
        Unit::Hour,
        reports,
        0,
        3_584_750,
    );
    assert_eq!(response.raw_body, b"Partner quota exceeded");
    let st = s
        .status("partners", &[("route", reports), ("plan", "silver")])
        .await;
    assert_limited(&st, Code::Ok, 1_000, Unit::Hour, reports, 999, 3_584_750);
    // A session cookie of 32 hex digits: 120 per minute each.
    let s1 = "0123456789abcdef0123456789abcdef";
    let s2 = "fedcba9876543210fedcba9876543210";
    fill(
        &mut s,
        "partners",
        &[("route", reports), ("session", s1)],
        120,
    )
    .await;
    let st = s
        .status("partners", &[("route", reports), ("session", s1)])
        .await;
    assert_limited(&st, Code::OverLimit, 120, Unit::Minute, reports, 0, 44_750);
    let st = s
        .status("partners", &[("route", reports), ("session", s2)])
        .await;
    assert_limited(&st, Code::Ok, 120, Unit::Minute, reports, 119, 44_750);
    // Not 32 hex digits: the cookie item does not match, and nothing else applies.
    assert_eq!(
        s.status("partners", &[("route", reports), ("session", "short")])
            .await,
        unlimited()
    );
    // tenant: 300 per minute each.
    fill(
        &mut s,
        "partners",
        &[("route", reports), ("tenant", "t1")],
        300,
    )
    .await;
    let st = s
        .status("partners", &[("route", reports), ("tenant", "t1")])
        .await;
    assert_limited(&st, Code::OverLimit, 300, Unit::Minute, reports, 0, 44_750);
    let st = s
        .status("partners", &[("route", reports), ("tenant", "t2")])
        .await;
    assert_limited(&st, Code::Ok, 300, Unit::Minute, reports, 299, 44_750);
    // plan comes first: a gold plan with a tenant counts on the (exhausted) plan counter.
    let st = s
        .status(
            "partners",
            &[("route", reports), ("tenant", "t3"), ("plan", "gold")],
        )
        .await;
    assert_limited(
        &st,
        Code::OverLimit,
        10_000,
        Unit::Hour,
        reports,
        0,
        3_584_750,
    );
    s.stop().await;
}

#[tokio::test]
async fn example_partners_exports_limits_by_consumer_region_and_tier() {
    let mut s = Sluice::start_examples().await;
    let exports = "exports";
    let day_reset = DAY - 15_250;
    // consumer acme: 500 per day; any other consumer: 50 per day each.
    fill(
        &mut s,
        "partners",
        &[("route", exports), ("consumer", "acme")],
        499,
    )
    .await;
    let st = s
        .status("partners", &[("route", exports), ("consumer", "acme")])
        .await;
    assert_limited(&st, Code::Ok, 500, Unit::Day, exports, 0, day_reset);
    let st = s
        .status("partners", &[("route", exports), ("consumer", "acme")])
        .await;
    assert_limited(&st, Code::OverLimit, 500, Unit::Day, exports, 0, day_reset);
    for consumer in ["globex", "initech"] {
        fill(
            &mut s,
            "partners",
            &[("route", exports), ("consumer", consumer)],
            49,
        )
        .await;
        let st = s
            .status("partners", &[("route", exports), ("consumer", consumer)])
            .await;
        assert_limited(&st, Code::Ok, 50, Unit::Day, exports, 0, day_reset);
        let st = s
            .status("partners", &[("route", exports), ("consumer", consumer)])
            .await;
        assert_limited(&st, Code::OverLimit, 50, Unit::Day, exports, 0, day_reset);
    }
    // Region from the entry `region` (descriptor_key), eu-west only: 20 per second.
    fill(
        &mut s,
        "partners",
        &[("route", exports), ("region", "eu-west")],
        19,
    )
    .await;
    let st = s
        .status("partners", &[("route", exports), ("region", "eu-west")])
        .await;
    assert_limited(&st, Code::Ok, 20, Unit::Second, exports, 0, 750);
    assert_eq!(
        s.status("partners", &[("route", exports), ("x-region", "eu-west")])
            .await,
        unlimited()
    );
    assert_eq!(
        s.status("partners", &[("route", exports), ("region", "us-east")])
            .await,
        unlimited()
    );
    // tier=free: 10 per minute, shared.
    fill(
        &mut s,
        "partners",
        &[("route", exports), ("tier", "free"), ("u", "1")],
        10,
    )
    .await;
    let st = s
        .status(
            "partners",
            &[("route", exports), ("tier", "free"), ("u", "2")],
        )
        .await;
    assert_limited(&st, Code::OverLimit, 10, Unit::Minute, exports, 0, 44_750);
    s.stop().await;
}

#[tokio::test]
async fn example_partners_ignores_limit_overrides() {
    let mut s = Sluice::start_examples().await;
    let response = s
        .ask_one(
            "partners",
            desc_override(
                &[("route", "reports"), ("plan", "silver")],
                1,
                RateLimitUnit::Second,
                None,
            ),
        )
        .await;
    assert_limited(
        &response.statuses[0],
        Code::Ok,
        1_000,
        Unit::Hour,
        "reports",
        999,
        3_584_750,
    );
    let response = s
        .ask_one(
            "partners",
            desc_override(&[("route", "reports")], 1, RateLimitUnit::Second, None),
        )
        .await;
    assert_eq!(response.statuses, [unlimited()]);
    // The edge domain does honour them.
    let response = s
        .ask_one(
            "edge",
            desc_override(&[("route", "api")], 7, RateLimitUnit::Hour, None),
        )
        .await;
    assert_eq!(
        response.statuses,
        [status(
            Code::Ok,
            &limit(7, Unit::Hour, "api/global"),
            6,
            3_584_750
        )]
    );
    s.stop().await;
}

#[tokio::test]
async fn distinct_values_never_share_a_counter_however_they_are_spelled() {
    let yaml = r#"
domain: hostile
routes:
  - name: r
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - { key: "*", name: key, query_per_minute: 1 }
"#;
    let mut s = Sluice::start(&[("hostile.yaml", yaml)]).await;
    let l = limit(1, Unit::Minute, "r/key");
    let long = "x".repeat(64);
    let big = "y".repeat(4095);
    let pairs: Vec<(String, String)> = vec![
        (format!("{long}a"), format!("{long}b")),
        (long.clone(), format!("{long}a")),
        (format!("{big}a"), format!("{big}b")),
        ("a:b".into(), "a_b".into()),
        ("a:b".into(), "a".into()),
        ("{x}".into(), "x".into()),
        ("é".into(), "e".into()),
        ("a\nb".into(), "a b".into()),
        ("nul\0".into(), "nul".into()),
        ("".into(), " ".into()),
        ("~".into(), "-".into()),
    ];
    for (first, second) in &pairs {
        s.to_next_window(MINUTE);
        for (value, code) in [
            (first, Code::Ok),
            (first, Code::OverLimit),
            (second, Code::Ok),
        ] {
            let st = s
                .status("hostile", &[("route", "r"), ("x-api-key", value)])
                .await;
            assert_eq!(
                st,
                status(code, &l, 0, MINUTE),
                "{first:?} then {second:?}: {value:?}"
            );
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn identical_rules_on_other_routes_and_domains_count_apart() {
    let rules = r#"
routes:
  - name: a
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - { key: "*", name: key, query_per_minute: 1 }
  - name: b
    rule_items:
      - limit_by_per_header: x-api-key
        limit_keys:
          - { key: "*", name: key, query_per_minute: 1 }
"#;
    let one = format!("domain: one\n{rules}");
    let two = format!("domain: two\n{rules}");
    let mut s = Sluice::start(&[("one.yaml", &one), ("two.yaml", &two)]).await;
    for domain in ["one", "two"] {
        for route in ["a", "b"] {
            let l = limit(1, Unit::Minute, &format!("{route}/key"));
            let pairs: &[(&str, &str)] = &[("route", route), ("x-api-key", "k")];
            assert_eq!(
                s.status(domain, pairs).await,
                status(Code::Ok, &l, 0, 44_750),
                "{domain}/{route}"
            );
            assert_eq!(
                s.status(domain, pairs).await,
                status(Code::OverLimit, &l, 0, 44_750),
                "{domain}/{route}"
            );
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn an_ipv4_mapped_ipv6_address_is_the_ipv4_client() {
    let yaml = r#"
domain: mapped
routes:
  - name: r
    rule_items:
      - limit_by_per_ip: from-remote-addr
        limit_keys:
          - { key: "10.0.0.0/8", name: ten, query_per_minute: 2 }
"#;
    let mut s = Sluice::start(&[("mapped.yaml", yaml)]).await;
    let ten = limit(2, Unit::Minute, "r/ten");
    let st = s
        .status(
            "mapped",
            &[("route", "r"), ("remote_address", "::ffff:10.1.2.3")],
        )
        .await;
    assert_eq!(st, status(Code::Ok, &ten, 1, 44_750));
    let st = s
        .status("mapped", &[("route", "r"), ("remote_address", "10.1.2.3")])
        .await;
    assert_eq!(st, status(Code::Ok, &ten, 0, 44_750));
    s.stop().await;
}
