//! Builds the sandbox's init (`init/main.rs`) as a static executable with the same rustc,
//! for the crate to embed (`include_bytes!`): the first process of each sandbox execs it,
//! so that no long-lived process of an instance is a copy of the daemon.

#[path = "../driver/static_exe.rs"]
mod static_exe;

fn main() {
    println!("cargo:rerun-if-changed=init/proto.rs");
    println!("cargo:rerun-if-changed=init/wait.rs");
    println!("cargo:rerun-if-changed=../driver/static_exe.rs");
    static_exe::build(
        "init/main.rs",
        "bulkhead_sandbox_init",
        "bulkhead-sandbox-init",
    );
}
