//! The envoyproxy/ratelimit format as it arrives over xDS: a `RateLimitConfig` message read
//! into the raw form a file is read into, then built by the parent's one builder.

use std::path::Path;

use serde_saphyr::Spanned;

use super::{DescriptorRaw, FileRaw, RateLimitRaw, ReplacesRaw, build};
use crate::config::diagnostics::ConfigError;
use crate::limits::Domain;

/// Validates one `RateLimitConfig` pushed over xDS, as envoyproxy/ratelimit reads it: it
/// turns the message into its YAML form (`ConfigXdsProtoToYaml`) and loads that. Here the
/// message becomes the same raw form a file is read into and goes through the same
/// [`build`], so a file and its push give one domain. `origin` names the resource in errors
/// (in place of a file). Errors have no line; their route and field say where.
///
/// What the message cannot say the way YAML can: a `requests_per_unit` of 0 is read as
/// written (0, blocking every request, as upstream), not as missing; `unit: UNKNOWN` is a
/// missing unit. `metadata` (for upstream's `RESPONSE_DYNAMIC_METADATA`) is ignored, and the
/// number of descriptors carrying it returned so the caller can say so.
pub fn from_proto(
    origin: &Path,
    config: &crate::proto::rls_conf::RateLimitConfig,
) -> Result<(Domain, usize), Vec<ConfigError>> {
    let mut with_metadata = 0;
    let raw = FileRaw {
        domain: Some(spanned(config.domain.clone())),
        descriptors: Some(
            config
                .descriptors
                .iter()
                .map(|d| spanned(descriptor_raw(d, &mut with_metadata)))
                .collect(),
        ),
    };
    build(origin, "", &raw, &[]).map(|domain| (domain, with_metadata))
}

/// A value from a message: it has no place in a text.
fn spanned<T>(value: T) -> Spanned<T> {
    use serde_saphyr::Location;
    Spanned::new(value, Location::UNKNOWN, Location::UNKNOWN)
}

fn descriptor_raw(
    d: &crate::proto::rls_conf::RateLimitDescriptor,
    with_metadata: &mut usize,
) -> DescriptorRaw {
    use crate::proto::rls_conf::RateLimitUnit;
    if d.metadata.as_ref().is_some_and(|m| !m.fields.is_empty()) {
        *with_metadata += 1;
    }
    let rate_limit = d.rate_limit.as_ref().map(|rl| {
        let unit = match RateLimitUnit::try_from(rl.unit) {
            Ok(RateLimitUnit::Unknown) => None,
            Ok(unit) => Some(unit.as_str_name().to_string()),
            // An enum number this proto does not know: reported by the unit check.
            Err(_) => Some(format!("unit number {}", rl.unit)),
        };
        spanned(RateLimitRaw {
            unit: unit.map(spanned),
            requests_per_unit: (!rl.unlimited || rl.requests_per_unit != 0)
                .then(|| spanned(u64::from(rl.requests_per_unit))),
            unit_multiplier: None,
            unlimited: Some(spanned(rl.unlimited)),
            name: Some(spanned(rl.name.clone())),
            replaces: Some(
                rl.replaces
                    .iter()
                    .map(|r| {
                        spanned(ReplacesRaw {
                            name: Some(spanned(r.name.clone())),
                        })
                    })
                    .collect(),
            ),
        })
    });
    DescriptorRaw {
        key: Some(spanned(d.key.clone())),
        value: Some(spanned(d.value.clone())),
        rate_limit,
        descriptors: Some(
            d.descriptors
                .iter()
                .map(|c| spanned(descriptor_raw(c, with_metadata)))
                .collect(),
        ),
        shadow_mode: Some(d.shadow_mode),
        quota_mode: Some(d.quota_mode),
        detailed_metric: Some(d.detailed_metric),
        value_to_metric: None,
        share_threshold: None,
    }
}
