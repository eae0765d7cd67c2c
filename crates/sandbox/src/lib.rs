//! The `sandbox` driver: each instance behind Linux namespaces and cgroup limits, without
//! a container runtime.
//!
//! - [`driver::SandboxDriver`]: the [`bulkhead_driver::Driver`]; admission, cgroups, the
//!   spawner thread, the watcher. Its module docs hold the handle's lifecycle table.
//! - [`spawn`]: clone3 (`CLONE_PIDFD | CLONE_INTO_CGROUP | CLONE_NEW{PID,NS,IPC,UTS[,NET]}`),
//!   the child's raw-syscall setup (mounts, capabilities, seccomp) and the PID-1 init.
//! - `mainpid`: sd_notify `MAINPID=`, the init's control pipe and the host/namespace pids.
//! - [`cgroup`]: detection (v2, hybrid, v1), per-instance cgroups, limits, usage, teardown.
//! - [`seccomp`]: the deny-list.
//! - Warm slots (`warm:`; `driver/warm.rs`, and [`spawn`]'s "warm slots"): an instance
//!   cloned, walled and waiting for its program ahead of its launch; the launch hands
//!   argv and environment over a pipe. An instance from a slot is a cold one afterwards.
//!
//! **Invariants.** Nothing allocates between clone and exec (everything is prepared in
//! [`spawn::Prepared`] first). An instance never runs its workload outside its cgroups
//! (cgroup2: born there; v1: joined before exec). `wait` resolves only once every process
//! is gone and the cgroup directories are removed.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use bulkhead_sandbox::{SandboxConfig, SandboxDriver};
//! let driver = SandboxDriver::new(SandboxConfig::default())?;
//! println!("cgroups: {:?}", driver.capabilities());
//! # Ok(()) }
//! ```

pub mod cgroup;
pub mod driver;
#[allow(dead_code)] // `wait_status` is the init's (and the tests')
#[path = "../init/proto.rs"]
pub(crate) mod init_proto;
pub(crate) mod mainpid;
pub mod seccomp;
pub mod spawn;

pub use driver::{Capabilities, SandboxConfig, SandboxDriver, StartError};
