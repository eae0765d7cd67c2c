//! Fault suites: bulkhead broken on purpose, through the real daemon and real processes.
//!
//! The bounded form runs with `cargo test` (and so in CI); `BULKHEAD_FAULTS_LONG=1` runs the
//! long form (100 crash rounds, 10,000 launch/terminate cycles, 60 s of load). Nothing here
//! asserts a timing: latencies are printed, invariants are asserted.
//!
//! - [`crash`]: `kill -9` of the daemon in the middle of launches, restarts and
//!   terminations; afterwards every key has at most one instance, every recorded instance
//!   is adopted or cleaned up, the event log has no gap, and nothing is orphaned.
//! - [`workload`]: workloads that misbehave (signal storms, readiness that never comes,
//!   liveness that flaps, SIGTERM ignored, double forks) are contained and reported for what
//!   they are.
//! - [`leaks`]: launch/terminate cycles leave the daemon's fds, memory, zombies and state
//!   database bounded.
//! - [`load`]: mixed launch/reuse/terminate/list requests from concurrent clients: no errors.
//! - [`ports`]: bursts of launches that take ports: none fails for want of a port.
//! - [`scale`]: lists, scrapes and launches at once over many live instances (10,000 in
//!   the long form): `health` answered throughout.
//! - [`hostile`]: hostile names and manifests get clear errors and create nothing outside
//!   the state directory.
//! - [`storage`]: the state directory fills up mid-run (a small tmpfs): refused requests,
//!   `health` degraded, no event shown before it is stored, recovery by itself, no id reused
//!   after a crash during the outage.
//! - [`swarm`]: a swarm node cut off from the cluster: the run is reported lost, the key
//!   placed again elsewhere, and the stale copy fenced when the node returns.
//! - [`walls`]: what only a wall contains (fork bomb, memory and CPU hogs, a `setsid`
//!   escape), through the sandbox driver.

#[allow(dead_code)]
#[path = "../it/harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "../it/swarm_support.rs"]
mod swarm_support;
#[path = "../it/tmux.rs"]
mod tmux;

mod crash;
mod hostile;
mod leaks;
mod load;
mod ports;
mod scale;
mod storage;
mod support;
mod swarm;
mod walls;
mod workload;
