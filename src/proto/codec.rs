//! The gRPC codec of the RLS service: prost, except that a request whose strings are not
//! valid UTF-8 is still read.
//!
//! Protobuf `string` fields must hold UTF-8, and prost refuses a message that breaks the
//! rule. But the values in a descriptor come from Envoy's clients: an HTTP header may carry
//! any byte from 0x80 to 0xFF, and Envoy forwards it as it is. Refusing the request would be
//! an error answer, which Envoy (failing open by default) turns into a request let through
//! uncounted: one odd byte in an API key would be a way past every limit. So when the strict
//! decode fails, the request is read again with its strings as bytes, and each invalid byte
//! is written `\xNN`, which keeps distinct values distinct.

use std::marker::PhantomData;

use prost::Message;
use prost::bytes::Buf;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

use super::descriptor::RateLimitDescriptor;
use super::descriptor::rate_limit_descriptor::{Entry, RateLimitOverride};
use super::rls::RateLimitRequest;

/// A message that can be read leniently when its strict decode fails.
pub trait Lenient: Message + Default + Sized {
    /// The message from `bytes` whatever its strings hold; `None` when the bytes are not the
    /// message at all.
    fn decode_lenient(_bytes: &[u8]) -> Option<Self> {
        None
    }
}

impl Lenient for super::rls::RateLimitResponse {}
impl Lenient for super::rlqs::RateLimitQuotaResponse {}

/// An RLQS report's bucket ids are built by Envoy from request headers as well, so a report
/// is read the same way: one odd byte in a header must not end the stream.
impl Lenient for super::rlqs::RateLimitQuotaUsageReports {
    fn decode_lenient(bytes: &[u8]) -> Option<Self> {
        use super::rlqs::BucketId;
        use super::rlqs::rate_limit_quota_usage_reports::BucketQuotaUsage;
        let raw = RawReports::decode(bytes).ok()?;
        Some(Self {
            domain: text(raw.domain),
            bucket_quota_usages: raw
                .bucket_quota_usages
                .into_iter()
                .map(|u| BucketQuotaUsage {
                    bucket_id: u.bucket_id.map(|b| BucketId {
                        bucket: b
                            .bucket
                            .into_iter()
                            .map(|e| (text(e.key), text(e.value)))
                            .collect(),
                    }),
                    time_elapsed: u.time_elapsed,
                    num_requests_allowed: u.num_requests_allowed,
                    num_requests_denied: u.num_requests_denied,
                })
                .collect(),
        })
    }
}

impl Lenient for RateLimitRequest {
    fn decode_lenient(bytes: &[u8]) -> Option<Self> {
        let raw = RawRequest::decode(bytes).ok()?;
        Some(RateLimitRequest {
            domain: text(raw.domain),
            descriptors: raw
                .descriptors
                .into_iter()
                .map(|d| RateLimitDescriptor {
                    entries: d
                        .entries
                        .into_iter()
                        .map(|e| Entry {
                            key: text(e.key),
                            value: text(e.value),
                        })
                        .collect(),
                    limit: d.limit,
                    hits_addend: d.hits_addend,
                    is_negative_hits: d.is_negative_hits,
                })
                .collect(),
            hits_addend: raw.hits_addend,
        })
    }
}

/// `bytes` as text: valid UTF-8 unchanged, each invalid byte as `\xNN`.
fn text(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(valid) => valid,
        Err(e) => {
            let bytes = e.into_bytes();
            let mut out = String::with_capacity(bytes.len() + 8);
            for chunk in bytes.utf8_chunks() {
                out.push_str(chunk.valid());
                for byte in chunk.invalid() {
                    out.push_str(&format!("\\x{byte:02X}"));
                }
            }
            out
        }
    }
}

/// `RateLimitRequest` with its strings read as bytes (same field numbers and wire types).
#[derive(Clone, PartialEq, Message)]
struct RawRequest {
    #[prost(bytes = "vec", tag = "1")]
    domain: Vec<u8>,
    #[prost(message, repeated, tag = "2")]
    descriptors: Vec<RawDescriptor>,
    #[prost(uint32, tag = "3")]
    hits_addend: u32,
}

#[derive(Clone, PartialEq, Message)]
struct RawDescriptor {
    #[prost(message, repeated, tag = "1")]
    entries: Vec<RawEntry>,
    #[prost(message, optional, tag = "2")]
    limit: Option<RateLimitOverride>,
    #[prost(message, optional, tag = "3")]
    hits_addend: Option<u64>,
    #[prost(bool, tag = "4")]
    is_negative_hits: bool,
}

#[derive(Clone, PartialEq, Message)]
struct RawEntry {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// `RateLimitQuotaUsageReports` with its strings read as bytes. A map is, on the wire, a
/// repeated message of key (1) and value (2), which [`RawEntry`] already is.
#[derive(Clone, PartialEq, Message)]
struct RawReports {
    #[prost(bytes = "vec", tag = "1")]
    domain: Vec<u8>,
    #[prost(message, repeated, tag = "2")]
    bucket_quota_usages: Vec<RawUsage>,
}

#[derive(Clone, PartialEq, Message)]
struct RawUsage {
    #[prost(message, optional, tag = "1")]
    bucket_id: Option<RawBucketId>,
    #[prost(message, optional, tag = "2")]
    time_elapsed: Option<prost_types::Duration>,
    #[prost(uint64, tag = "3")]
    num_requests_allowed: u64,
    #[prost(uint64, tag = "4")]
    num_requests_denied: u64,
}

#[derive(Clone, PartialEq, Message)]
struct RawBucketId {
    #[prost(message, repeated, tag = "1")]
    bucket: Vec<RawEntry>,
}

/// prost encoding, lenient decoding (see the module comment).
#[derive(Debug, Clone)]
pub struct LenientCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LenientCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for LenientCodec<T, U>
where
    T: Message + Send + 'static,
    U: Lenient + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = LenientDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        LenientDecoder(PhantomData)
    }
}

#[derive(Debug, Clone)]
pub struct LenientDecoder<U>(PhantomData<U>);

impl<U: Lenient> Decoder for LenientDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let len = buf.remaining();
        // A message is almost always one contiguous chunk: read it in place, and read it
        // again leniently from the same bytes if need be. Only a split message is copied.
        let copied;
        let bytes: &[u8] = if buf.chunk().len() >= len {
            &buf.chunk()[..len]
        } else {
            copied = buf.copy_to_bytes(len);
            &copied
        };
        let decoded = match U::decode(bytes) {
            Ok(message) => Ok(Some(message)),
            Err(e) => U::decode_lenient(bytes)
                .map(Some)
                .ok_or_else(|| Status::internal(e.to_string())),
        };
        if buf.remaining() == len {
            buf.advance(len);
        }
        decoded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_with_invalid_utf8_values_is_read_with_them_escaped() {
        let raw = RawRequest {
            domain: b"edge".to_vec(),
            descriptors: vec![RawDescriptor {
                entries: vec![
                    RawEntry {
                        key: b"route".to_vec(),
                        value: b"api".to_vec(),
                    },
                    RawEntry {
                        key: b"x-api-key".to_vec(),
                        value: b"k\xff\xfe-\xc3\xa9".to_vec(),
                    },
                ],
                limit: None,
                hits_addend: Some(2),
                is_negative_hits: false,
            }],
            hits_addend: 0,
        };
        let bytes = raw.encode_to_vec();
        assert!(RateLimitRequest::decode(bytes.as_slice()).is_err());
        let read = RateLimitRequest::decode_lenient(&bytes).expect("read leniently");
        assert_eq!(read.domain, "edge");
        assert_eq!(read.descriptors[0].entries[1].value, "k\\xFF\\xFE-é");
        assert_eq!(read.descriptors[0].hits_addend, Some(2));
        // Distinct invalid bytes stay distinct.
        assert_ne!(text(b"\xff".to_vec()), text(b"\xfe".to_vec()));
        // Valid requests decode as before.
        let valid = RateLimitRequest {
            domain: "edge".into(),
            ..Default::default()
        };
        assert_eq!(
            RateLimitRequest::decode(valid.encode_to_vec().as_slice()).ok(),
            Some(valid)
        );
    }
}
