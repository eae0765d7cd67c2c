//! The `docker` driver: workloads that need their own userland run as Docker containers,
//! through the Engine API ([bollard](https://docs.rs/bollard), version negotiated).
//!
//! - [`engine::Engine`]: the connection, the reachability check (a 2 s ping: an engine
//!   that is down is a clear error, never a hang) and the single event subscription that
//!   reports `die` and `oom` to the containers' handles.
//! - [`driver::DockerDriver`]: creates and starts one container per instance (labels,
//!   limits, binds), streams its output into the daemon's pipes, stops it with the
//!   manifest's signal and grace then SIGKILL, and removes it.
//! - [`images::ImageCache`]: `docker.build` images tagged by a hash of their build
//!   configuration, recorded in SQLite, evicted LRU without touching images in use.
//! - [`debootstrap`]: Debian base images made on the host (no registry) for
//!   `docker.build.debootstrap`, kept by the image cache.
//! - [`recovery`]: after a daemon restart, finds this daemon's containers by label.
//! - [`warm`]: warm slots (`warm:`): containers created and started ahead, whose first
//!   process is a static init of ours (`init/main.rs`, built by `build.rs`) that waits
//!   for the program, its arguments and environment on a Unix socket, then execs it.
//!
//! **Invariant — every container bulkhead creates carries `bulkhead.daemon=<daemon id>`
//! and `bulkhead.instance=<instance id>`**; recovery and the event filter act on those
//! labels only, so containers of other daemons and of users are never touched. A warm
//! slot is made before its instance is known: it carries `bulkhead.warm=<slot>` and an
//! empty `bulkhead.instance`, and the hand-over renames it after its instance
//! ([`warm::claimed_name`]), which recovery reads instead; an unclaimed slot is removed.

pub mod debootstrap;
pub mod driver;
pub mod engine;
pub mod images;
pub mod recovery;
pub mod warm;

pub use driver::{Container, DockerDriver};
pub use engine::{Engine, EngineError};
pub use images::{ImageCache, ImageRecord, Limits};
pub use warm::DockerSlot;
