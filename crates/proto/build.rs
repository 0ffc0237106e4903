use std::path::PathBuf;

const SERVICES: &[&str] = &["identity", "keyring", "invitation", "authorizer"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos: Vec<PathBuf> =
        SERVICES.iter().map(|service| root.join(format!("keyshare/{service}/v1/{service}_service.proto"))).collect();

    // The vendored protoc means a fresh machine and CI need no system protobuf-compiler.
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().file_descriptor_set_path(out.join("keyshare_descriptor.bin")).compile_with_config(
        config,
        &protos,
        std::slice::from_ref(&root),
    )?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
