//! Generates the protobuf messages and tonic services from `proto/conduit/*.proto`.
//!
//! protoc comes from `protoc-bin-vendored` (Google's prebuilt binaries shipped inside the crate),
//! so building needs no system protoc and compiles no protobuf compiler.

use std::path::{Path, PathBuf};

/// The shared messages, generated on their own so the services can refer to them by an extern
/// path (`crate::pb::net`) instead of prost's `super::super::net::v1` nesting.
const SHARED: &[&str] = &["proto/conduit/net.proto"];

/// The services.
const SERVICES: &[&str] = &[
    "proto/conduit/destination.proto",
    "proto/conduit/identity.proto",
    "proto/conduit/tap.proto",
    "proto/conduit/api.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let includes = [PathBuf::from("proto"), protoc_bin_vendored::include_path()?];
    generate(&protoc, SHARED, &includes, false)?;
    generate(&protoc, SERVICES, &includes, true)?;
    Ok(())
}

fn generate(
    protoc: &Path,
    protos: &[&str],
    includes: &[PathBuf],
    shared_is_extern: bool,
) -> std::io::Result<()> {
    let protos: Vec<PathBuf> = protos.iter().map(PathBuf::from).collect();
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    // Maps decode into `BTreeMap`: iteration order must never depend on a per-process hasher
    // (STYLE.md §2), and it matches `conduit_core::mesh::Endpoint::labels`.
    config.btree_map(["."]);
    let mut builder = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Clients are built on a caller-supplied channel (the proxy and the simulation bring
        // their own connector), so the `connect(url)` helpers are not generated.
        .build_transport(false);
    if shared_is_extern {
        builder = builder.extern_path(".conduit.net.v1", "crate::pb::net");
    }
    builder.compile_with_config(config, &protos, includes)
}
