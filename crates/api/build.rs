//! Compiles the protocol without a system `protoc`: protox parses the .proto in Rust.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/bulkhead.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
