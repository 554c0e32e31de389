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
