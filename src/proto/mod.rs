//! Generated types of the vendored Envoy protos (RLS v3, RLQS, and xDS) (see `proto/README.md`).
//!
//! Only re-exports live here, so the rest of the crate names `proto::rls::RateLimitRequest`
//! rather than the long Envoy package paths.

#![allow(clippy::all, missing_docs)]

pub mod codec;

pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod extensions {
        pub mod common {
            pub mod ratelimit {
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.common.ratelimit.v3");
                }
            }
        }
    }
    pub mod r#type {
        pub mod v3 {
            tonic::include_proto!("envoy.r#type.v3");
        }
    }
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
        pub mod ratelimit {
            pub mod v3 {
                tonic::include_proto!("envoy.service.ratelimit.v3");
            }
        }
        pub mod rate_limit_quota {
            pub mod v3 {
                tonic::include_proto!("envoy.service.rate_limit_quota.v3");
            }
        }
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub mod ratelimit {
    pub mod config {
        pub mod ratelimit {
            pub mod v3 {
                tonic::include_proto!("ratelimit.config.ratelimit.v3");
            }
        }
    }
}

/// The ADS state-of-the-world stream (`DiscoveryRequest`, `DiscoveryResponse`), client and
/// server (the server is the test kit's management server).
pub use envoy::service::discovery::v3 as discovery;
/// envoyproxy/ratelimit's `RateLimitConfig`, the resource the xDS limits source reads.
pub use ratelimit::config::ratelimit::v3 as rls_conf;

/// `HeaderValue`, `Node`.
pub use envoy::config::core::v3 as core;
/// `RateLimitDescriptor` and its entries.
pub use envoy::extensions::common::ratelimit::v3 as descriptor;
/// The RLQS service messages (Envoy's `rate_limit_quota` filter), client and server.
pub use envoy::service::rate_limit_quota::v3 as rlqs;
/// The RLS v3 service messages, client and server.
pub use envoy::service::ratelimit::v3 as rls;
/// `RateLimitUnit` (used by request-side limit overrides), and RLQS's `RateLimitStrategy`
/// and `TokenBucket`.
pub use envoy::r#type::v3 as unit;

/// The encoded descriptor set of every vendored proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/rls_descriptor.bin"));
