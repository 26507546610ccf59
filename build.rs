//! Compiles the gRPC contract with `protox`, a pure-Rust protobuf compiler, so a fresh
//! machine needs nothing but cargo to build the gateway.

use std::{env, path::PathBuf};

const PROTO: &str = "proto/synthome/status/v1/execution_status.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");

    let descriptors = protox::compile([PROTO], ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    // The descriptor set is also kept for server reflection.
    let descriptor_path = out_dir.join("synthome_descriptor.bin");
    std::fs::write(
        &descriptor_path,
        prost::Message::encode_to_vec(&descriptors),
    )?;

    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run()
        .compile_fds(descriptors)?;
    Ok(())
}
