//! Compiles the vendored Envoy protos (RLS v3 and RLQS) with protox, a pure-Rust protobuf compiler, so
//! a fresh machine needs no system `protoc`. The encoded descriptor set is also written out
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
    Ok(())
}
