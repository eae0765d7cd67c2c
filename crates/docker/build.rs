//! Builds the warm-slot init (`init/main.rs`) as a static executable with the same rustc,
//! for the crate to embed (`include_bytes!`). Static, because it runs in any image (a
//! busybox image has no C library); std only, so nothing but the toolchain is needed
//! (glibc's static archive comes with libc6-dev, which every Rust build on Debian links
//! against already).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=init/main.rs");
    println!("cargo:rerun-if-changed=init/proto.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dest = out.join("bulkhead-warm-init");
    let target = std::env::var("TARGET").expect("cargo sets TARGET");
    if !target.contains("linux") {
        // No warm slots off Linux: an empty file, which the driver refuses to install.
        std::fs::write(&dest, b"").expect("cannot write the empty init");
        return;
    }
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let result = Command::new(rustc)
        .args(["--edition", "2021", "--crate-name", "bulkhead_warm_init"])
        .args(["--target", &target])
        .args([
            "-C",
            "opt-level=s",
            "-C",
            "panic=abort",
            "-C",
            "strip=symbols",
        ])
        .args(["-C", "target-feature=+crt-static", "-A", "dead_code"])
        .arg("init/main.rs")
        .arg("-o")
        .arg(&dest)
        .output()
        .expect("cannot run rustc for the warm-slot init");
    if !result.status.success() {
        panic!(
            "building the warm-slot init (init/main.rs, static) failed:\n{}",
            String::from_utf8_lossy(&result.stderr)
        );
    }
}
