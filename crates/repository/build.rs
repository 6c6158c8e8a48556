//! Compiles proto/model_config.proto (the schema of Triton's config.pbtxt)
//! into a descriptor set with a vendored protoc, so building needs no
//! system protobuf compiler. crate::pbtxt parses text format against it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/model_config.proto";
    println!("cargo:rerun-if-changed={proto}");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("model_config.bin");
    let status = std::process::Command::new(protoc_bin_vendored::protoc_bin_path()?)
        .arg("--include_imports")
        .arg(format!("--descriptor_set_out={}", out.display()))
        .arg("-Iproto")
        .arg(proto)
        .status()?;
    if !status.success() {
        return Err(format!("protoc failed on {proto}: {status}").into());
    }
    Ok(())
}
