//! Compiles the vendored protos (Envoy's RLS v3 and RLQS; the xDS client's ADS and
//! RateLimitConfig) with protox, a pure-Rust protobuf compiler, so a fresh machine needs no
//! system `protoc`. The encoded descriptor set is also written out
//! for gRPC server reflection (grpcurl and ghz then work without proto files).

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        [
            "envoy/service/ratelimit/v3/rls.proto",
            "envoy/service/rate_limit_quota/v3/rlqs.proto",
        ],
        ["proto"],
    )?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("rls_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Reads a request (or an RLQS report) whose client-supplied strings are not UTF-8
        // instead of refusing it (a refusal would let the request past Envoy uncounted): see
        // src/proto/codec.rs.
        .codec_path("crate::proto::codec::LenientCodec")
        .compile_fds(fds)?;

    // --- xDS limits source (src/config/xds.rs) ---------------------------------------------
    // The ADS client and envoyproxy/ratelimit's RateLimitConfig, with tonic's default prost
    // codec: the management server is trusted configuration, not client traffic. A separate
    // compile so the RLS block above (and its reflection set) stays as it is; the one file
    // both include (envoy/config/core/v3/base.proto) generates the same module twice.
    let xds = protox::compile(
        [
            "envoy/service/discovery/v3/ads.proto",
            "ratelimit/config/ratelimit/v3/rls_conf.proto",
        ],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(xds)?;
    Ok(())
}
