//! Generates the gRPC client of proto/grpc_service.proto (the server's
//! proto, crates/server/build.rs) with a vendored protoc, so building needs
//! no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../../proto/grpc_service.proto";
    // SAFETY: build scripts are single-threaded; nothing else reads the
    // environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_protos(&[proto], &["../../proto"])?;
    Ok(())
}
