//! Compiles the .proto files with protox (pure Rust), so building needs no `protoc`.
use std::path::Path;

const PROTOS: &[&str] = &[
    "proto/sealmesh/identity/v1/identity.proto",
    "proto/io/linkerd/proxy/identity/identity.proto",
    "proto/sealmesh/admin/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, [Path::new("proto")])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
