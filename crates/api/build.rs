//! Compiles the protocol without a system `protoc`: protox parses the .proto in Rust.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/bulkhead.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    // The encoded descriptors, for the server reflection service.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("bulkhead_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
