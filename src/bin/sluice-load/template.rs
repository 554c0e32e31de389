//! Descriptor templates (`route=api,x-api-key=key-{rand:1000}`) and the requests built from
//! them: each `{rand:N}` becomes a random integer in `0..N` per request, so N is the
//! cardinality of that value.

use sluice::proto::descriptor::RateLimitDescriptor;
use sluice::proto::descriptor::rate_limit_descriptor::Entry;
use sluice::proto::rls::RateLimitRequest;

/// One part of a descriptor value template.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    Rand(u64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub entries: Vec<(String, Vec<Part>)>,
}

pub fn parse_value(value: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = value;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(Part::Text(rest[..open].to_string()));
        }
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("unclosed '{{' in {value:?}"))?
            + open;
        let inner = &rest[open + 1..close];
        let n = inner
            .strip_prefix("rand:")
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                format!("unknown placeholder {{{inner}}} in {value:?}: write {{rand:N}}, N > 0")
            })?;
        parts.push(Part::Rand(n));
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_string()));
    }
    Ok(parts)
}

pub fn parse_template(text: &str) -> Result<Template, String> {
    let mut entries = Vec::new();
    for pair in text.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("descriptor {text:?}: entry {pair:?} is not key=value"))?;
        if key.is_empty() {
            return Err(format!("descriptor {text:?}: empty key in {pair:?}"));
        }
        entries.push((key.to_string(), parse_value(value)?));
    }
    if entries.is_empty() {
        return Err(format!("descriptor {text:?} has no entries"));
    }
    Ok(Template { entries })
}

/// SplitMix64: enough randomness for picking values, no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        // Multiply-shift: unbiased enough for load generation, no division.
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

pub fn build_request(
    domain: &str,
    templates: &[Template],
    hits_addend: u32,
    rng: &mut Rng,
) -> RateLimitRequest {
    let descriptors = templates
        .iter()
        .map(|t| RateLimitDescriptor {
            entries: t
                .entries
                .iter()
                .map(|(key, parts)| {
                    let mut value = String::new();
                    for part in parts {
                        match part {
                            Part::Text(s) => value.push_str(s),
                            Part::Rand(n) => value.push_str(&rng.below(*n).to_string()),
                        }
                    }
                    Entry {
                        key: key.clone(),
                        value,
                    }
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    RateLimitRequest {
        domain: domain.to_string(),
        descriptors,
        hits_addend,
    }
}
