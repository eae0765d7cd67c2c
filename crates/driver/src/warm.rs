//! Warm slots (`warm:` in a manifest, see `bulkhead_core::warm`): a driver that can,
//! prepares an instance ahead of its launch ([`Driver::prewarm`](crate::Driver::prewarm))
//! up to the point where only the program is missing, and at the launch hands the
//! program over ([`Driver::spawn_warm`](crate::Driver::spawn_warm)).
//!
//! The contract every driver keeps (the conformance suite's warm checks state it): a
//! pooled instance is indistinguishable afterwards from a cold one (same wall, limits,
//! exit status fidelity, teardown); a slot holds nothing the launch will not use, and a
//! discarded slot leaves nothing behind (process, cgroup, container).
//!
//! What a slot is made with ([`WarmSpec`]) is what every launch of the workload shares;
//! the launch brings the rest in its [`SpawnSpec`](crate::SpawnSpec): argv, environment
//! (with `$PORT` and `NOTIFY_SOCKET` as the slot fixed them), the instance id. Its binds
//! must be among the slot's ([`WarmSpec::binds`]): the daemon puts what it makes per
//! instance (the notify socket) in the slot's own directory, which the slot shows.

use std::any::Any;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bulkhead_core::sandbox::UserNamespace;
use bulkhead_core::spec::WorkloadSpec;

use crate::Bind;

/// What a slot is prepared for.
#[derive(Debug, Clone)]
pub struct WarmSpec {
    /// A name unique among the daemon's slots (`warm-<workload>-<n>`): the driver names
    /// its cgroup, container, ... after it.
    pub slot: String,
    pub spec: Arc<WorkloadSpec>,
    /// The manifest's folder (the instances' default working directory).
    pub cwd: PathBuf,
    /// The host ids the slot maps (`user_namespace: auto`): a range no live tenant holds,
    /// which the daemon gives to the tenant of the launch that takes the slot.
    pub ids: Option<UserNamespace>,
    /// Host paths the slot shows at `target` (today: the slot's own directory, at the
    /// same path, where the daemon binds the instance's notify socket at the launch).
    pub binds: Vec<Bind>,
    /// The instance's `$PORT`, fixed now: a driver that publishes it (docker) does so
    /// when it makes the slot.
    pub port: u16,
}

/// A prepared slot, owned by the daemon's pool until a launch takes it or it is
/// discarded.
#[async_trait]
pub trait Warm: Send + Sync + 'static {
    /// The memory it holds while it waits (bytes; what the pool's budget counts).
    fn memory(&self) -> u64;
    /// Whether it can still be handed a program (its process or container is alive).
    fn alive(&self) -> bool;
    /// Removes it and everything it holds.
    async fn discard(self: Box<Self>);
    /// For the driver that made it, to get its own type back.
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}
