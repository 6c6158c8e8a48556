//! Generates the ONNX protobuf messages from the vendored `proto/onnx.proto`
//! (onnx 1.23.2, Apache-2.0) with a vendored protoc.
//!
//! The native engine declares by hand only the fields it reads; a tool that
//! rewrites a model must keep every field it does not touch (attribute
//! types, doc strings, value_info, metadata), so it uses the full schema.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/onnx.proto";
    // SAFETY: build scripts are single-threaded; nothing else reads the
    // environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    println!("cargo:rerun-if-changed={proto}");
    prost_build::Config::new().compile_protos(&[proto], &["proto"])?;
    Ok(())
}
