//! How the format is told and units are read.

use super::*;

#[test]
fn format_is_told_by_a_top_level_descriptors_key() {
    assert!(is_envoy_format("domain: a\ndescriptors: []\n"));
    assert!(is_envoy_format("domain: a\ndescriptors:\n"));
    assert!(!is_envoy_format("domain: a\nroutes: []\n"));
    // Not valid YAML: judged by the line.
    assert!(is_envoy_format("domain: a\ndescriptors:\n  - key: [\n"));
    assert!(!is_envoy_format("domain: a\nroutes:\n  - descriptors: [\n"));
}

#[test]
fn units_are_read_in_any_case() {
    assert_eq!(parse_unit("second"), Some(Unit::Second));
    assert_eq!(parse_unit("Minute"), Some(Unit::Minute));
    assert_eq!(parse_unit("WEEK"), Some(Unit::Week));
    assert_eq!(parse_unit("unknown"), None);
    assert_eq!(parse_unit(""), None);
}

mod from_proto {
    use super::super::from_proto;
    use crate::limits::{DomainLimits, Unit};
    use crate::proto::rls_conf::{
        RateLimitConfig, RateLimitDescriptor, RateLimitPolicy, RateLimitUnit,
    };
    use std::path::Path;

    fn one(rate_limit: RateLimitPolicy) -> RateLimitConfig {
        RateLimitConfig {
            name: "r".into(),
            domain: "d".into(),
            descriptors: vec![RateLimitDescriptor {
                key: "k".into(),
                rate_limit: Some(rate_limit),
                metadata: Some(prost_types::Struct {
                    fields: [("a".to_string(), prost_types::Value::default())].into(),
                }),
                ..Default::default()
            }],
        }
    }

    #[test]
    fn zero_requests_is_read_as_written_and_metadata_is_counted() {
        let (domain, with_metadata) = from_proto(
            Path::new("xds:r"),
            &one(RateLimitPolicy {
                unit: RateLimitUnit::Hour as i32,
                requests_per_unit: 0,
                ..Default::default()
            }),
        )
        .expect("valid");
        assert_eq!(with_metadata, 1);
        let DomainLimits::Descriptors(tree) = &domain.limits else {
            panic!("a descriptor tree");
        };
        let threshold = tree.descriptors.nodes[0]
            .limit
            .as_ref()
            .and_then(|l| l.threshold)
            .expect("a threshold");
        assert_eq!((threshold.limit, threshold.unit), (0, Unit::Hour));
    }

    #[test]
    fn errors_name_the_resource_and_have_no_line() {
        let errors = from_proto(
            Path::new("xds:r"),
            &one(RateLimitPolicy {
                unit: RateLimitUnit::Hour as i32,
                unlimited: true,
                ..Default::default()
            }),
        )
        .expect_err("a unit with unlimited");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, None);
        assert_eq!(errors[0].field, "rate_limit.unit");
        assert_eq!(
            errors[0].to_string().split(':').next(),
            Some("xds"),
            "{}",
            errors[0]
        );
        // An unlimited one without a unit is fine, with its 0 rate unset.
        let ok = from_proto(
            Path::new("xds:r"),
            &one(RateLimitPolicy {
                unlimited: true,
                ..Default::default()
            }),
        );
        assert!(ok.is_ok(), "{ok:?}");
    }
}
