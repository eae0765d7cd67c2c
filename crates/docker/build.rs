//! Builds the warm-slot init (`init/main.rs`) as a static executable with the same rustc,
//! for the crate to embed (`include_bytes!`). Static, because it runs in any image (a
//! busybox image has no C library).

#[path = "../driver/static_exe.rs"]
mod static_exe;

fn main() {
    println!("cargo:rerun-if-changed=init/proto.rs");
    println!("cargo:rerun-if-changed=../driver/static_exe.rs");
    static_exe::build("init/main.rs", "bulkhead_warm_init", "bulkhead-warm-init");
}
