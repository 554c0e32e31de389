//! The examples of envoyproxy/ratelimit's README as limits files in its format, shared by
//! the tests that serve them from files (`tests/envoy_compat.rs`) and the ones that push the
//! same limits over xDS and compare the answers (`tests/xds_source.rs`).
//!
//! [`ALL`] lists every one with the file name it is served under.

/// Example 1: two values of one key, each with its own limit.
pub const EXAMPLE_1: &str = "\
domain: mongo_cps
descriptors:
  - key: database
    value: users
    rate_limit:
      unit: second
      requests_per_unit: 500

  - key: database
    value: default
    rate_limit:
      unit: second
      requests_per_unit: 500
";

/// Example 2: a nested list (marketing messages per number) next to a top-level limit per
/// number, both checked in one request.
pub const EXAMPLE_2: &str = "\
domain: messaging
descriptors:
  # Only allow 5 marketing messages a day
  - key: message_type
    value: marketing
    descriptors:
      - key: to_number
        rate_limit:
          unit: day
          requests_per_unit: 5

  # Only allow 100 messages a day to any unique phone number
  - key: to_number
    rate_limit:
      unit: day
      requests_per_unit: 100
";

/// Example 3: a limit for every address, and a more specific one for one address.
pub const EXAMPLE_3: &str = "\
domain: edge_proxy_per_ip
descriptors:
  - key: remote_address
    rate_limit:
      unit: second
      requests_per_unit: 10

  # Black list IP
  - key: remote_address
    value: 50.0.0.5
    rate_limit:
      unit: second
      requests_per_unit: 0
";

/// Example 4: a request matches only at the depth of its entries.
pub const EXAMPLE_4_FLAT: &str = "\
domain: example4
descriptors:
  - key: key
    value: value
    rate_limit:
      requests_per_unit: 300
      unit: second
";

pub const EXAMPLE_4_NESTED: &str = "\
domain: example4-nested
descriptors:
  - key: key
    value: value
    descriptors:
      - key: subkey
        rate_limit:
          requests_per_unit: 300
          unit: second
";

/// Example 5: an unlimited descriptor next to a limited one.
pub const EXAMPLE_5: &str = "\
domain: internal
descriptors:
  - key: ldap
    rate_limit:
      unlimited: true

  - key: azure
    rate_limit:
      unit: minute
      requests_per_unit: 100
";

/// Example 6: shadow mode on one value.
pub const EXAMPLE_6: &str = "\
domain: example6
descriptors:
  - key: service
    descriptors:
      - key: user
        value: user-a
        rate_limit:
          requests_per_unit: 10
          unit: second
        shadow_mode: true
      - key: user
        value: user-b
        rate_limit:
          requests_per_unit: 20
          unit: second
";

/// Example 7: `replaces` across the descriptors of one request.
pub const EXAMPLE_7: &str = "\
domain: example7
descriptors:
  - key: key_1
    value: value_1
    descriptors:
      - key: user
        value: bkthomps
        rate_limit:
          name: specific_limit
          requests_per_unit: 5
          unit: second
  - key: key_2
    value: value_2
    descriptors:
      - key: user
        value: bkthomps
        rate_limit:
          replaces:
            - name: specific_limit
          requests_per_unit: 10
          unit: second
";

/// Example 8: `detailed_metric` on a descriptor without a value.
pub const EXAMPLE_8: &str = "\
domain: example8
descriptors:
  - key: key1
    detailed_metric: true
    rate_limit:
      unit: minute
      requests_per_unit: 10
  - key: key1
    value: value1
    rate_limit:
      unit: minute
      requests_per_unit: 20
";

/// Example 9: a wildcard value.
pub const EXAMPLE_9: &str = "\
domain: example9
descriptors:
  - key: key1
    value: value*
    rate_limit:
      unit: minute
      requests_per_unit: 20
";

/// The README's `share_threshold` section: every value matching the wildcard shares one
/// threshold, also when the limit sits below the wildcard.
pub const SHARE_THRESHOLD: &str = "\
domain: files
descriptors:
  - key: path
    value: files/*
    share_threshold: true
    rate_limit:
      unit: hour
      requests_per_unit: 100
  - key: path
    value: models/*
    rate_limit:
      unit: hour
      requests_per_unit: 100
  - key: route
    value: api/*
    share_threshold: true
    descriptors:
      - key: user
        rate_limit:
          unit: minute
          requests_per_unit: 5
";

pub const ORDER: &str = "\
domain: order
descriptors:
  - key: k
    rate_limit: { unit: second, requests_per_unit: 4 }
  - key: k
    value: ab*
    rate_limit: { unit: second, requests_per_unit: 2 }
  - key: k
    value: a*
    rate_limit: { unit: second, requests_per_unit: 3 }
  - key: k
    value: abc
    rate_limit: { unit: second, requests_per_unit: 1 }
  - key: parent
    rate_limit: { unit: minute, requests_per_unit: 7 }
    descriptors:
      - key: child
        rate_limit: { unit: minute, requests_per_unit: 6 }
      - key: leaf
        value: only
";

/// Every example: (file name, text).
pub const ALL: &[(&str, &str)] = &[
    ("mongo_cps.yaml", EXAMPLE_1),
    ("messaging.yaml", EXAMPLE_2),
    ("edge_proxy_per_ip.yaml", EXAMPLE_3),
    ("example4.yaml", EXAMPLE_4_FLAT),
    ("example4-nested.yaml", EXAMPLE_4_NESTED),
    ("internal.yaml", EXAMPLE_5),
    ("example6.yaml", EXAMPLE_6),
    ("example7.yaml", EXAMPLE_7),
    ("example8.yaml", EXAMPLE_8),
    ("example9.yaml", EXAMPLE_9),
    ("files.yaml", SHARE_THRESHOLD),
    ("order.yaml", ORDER),
];
