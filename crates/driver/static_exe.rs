//! Shared by the build scripts of the drivers that embed a small static executable of
//! ours (the docker driver's warm-slot init, the sandbox driver's init): builds `src` with
//! the same rustc as a static executable, std only (so that nothing but the toolchain is
//! needed: glibc's static archive comes with libc6-dev, which every Rust build on Debian
//! links against already), into `$OUT_DIR/<name>`. Off Linux it writes an empty file,
//! which the driver refuses to use.

use std::path::PathBuf;
use std::process::Command;

pub fn build(src: &str, crate_name: &str, name: &str) {
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dest = out.join(name);
    let target = std::env::var("TARGET").expect("cargo sets TARGET");
    if !target.contains("linux") {
        std::fs::write(&dest, b"").expect("cannot write the empty executable");
        return;
    }
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let result = Command::new(rustc)
        .args(["--edition", "2021", "--crate-name", crate_name])
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
        .arg(src)
        .arg("-o")
        .arg(&dest)
        .output()
        .unwrap_or_else(|e| panic!("cannot run rustc for {src}: {e}"));
    if !result.status.success() {
        panic!(
            "building {src} (static) failed:\n{}",
            String::from_utf8_lossy(&result.stderr)
        );
    }
}
