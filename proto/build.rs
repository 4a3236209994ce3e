//! Generates the tonic/prost code for `ferry.v1` with the protoc shipped inside the
//! `protoc-bin-vendored` crate, so a fresh machine needs no protoc installed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    // Byte fields of blobs are never printed in full by Debug.
    tonic_prost_build::configure().compile_with_config(config, &["proto/ferry/v1/ferry.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/ferry/v1/ferry.proto");
    Ok(())
}
