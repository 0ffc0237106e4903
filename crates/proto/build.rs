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
    ext_authz_descriptor_set(&out)?;
    Ok(())
}

/// Envoy's `envoy.service.auth.v3.Authorization` and its imports as one descriptor set, for
/// reflection (see `third_party/README.md`).
fn ext_authz_descriptor_set(out: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let third_party = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("third_party");
    let status = std::process::Command::new(protoc_bin_vendored::protoc_bin_path()?)
        .arg("--include_imports")
        .arg(format!("--descriptor_set_out={}", out.join("ext_authz_descriptor.bin").display()))
        .arg("-I")
        .arg(&third_party)
        .arg("-I")
        .arg(protoc_bin_vendored::include_path()?)
        .arg(third_party.join("envoy/service/auth/v3/external_auth.proto"))
        .status()?;
    if !status.success() {
        return Err(format!("protoc failed on the ext_authz protos ({status})").into());
    }
    println!("cargo:rerun-if-changed={}", third_party.display());
    Ok(())
}
