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
//! are the slot's ([`WarmSpec::binds`]: the daemon puts what it makes per instance, the
//! notify socket, in the slot's own directory, which the slot shows), plus directories
//! no slot can know ahead (the tenant's channel space), which the driver mounts into the
//! slot at the hand-over, before the program runs ([`bind_into`]).

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

/// A bind [`bind_into`] could not make.
#[derive(Debug, thiserror::Error)]
#[error("cannot show {} at {} in the slot: {what}: {source}", .source_path.display(), .target.display())]
pub struct BindIntoError {
    pub source_path: PathBuf,
    pub target: PathBuf,
    pub what: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// Shows each of `binds` (host directories) in the mount namespace of the process
/// `pidfd` names, at its target: a slot was made before the launch, so what the launch
/// brings that no slot can know ahead (a tenant's channel space) is mounted into it at
/// the hand-over, as a cold spawn would have bound it (a recursive clone of the source,
/// its mount flags kept; a target that does not exist is made, as `owner` when given:
/// the slot's user namespace root, without which a file system mounted inside it refuses
/// the new directory).
///
/// Called before the hand-over, while only our own processes (the slot's init and
/// waiter) run in the slot: no workload code has had a chance to plant a symlink, and
/// the target's last component is not followed anyway. Runs on a thread of its own
/// (`setns` moves only the calling thread, and a thread that entered the slot's
/// namespace must not serve anything else), which ends when it is done. Blocking, short.
pub fn bind_into(
    pidfd: std::os::fd::BorrowedFd<'_>,
    binds: &[Bind],
    owner: Option<(u32, u32)>,
) -> Result<(), BindIntoError> {
    use rustix::mount::{move_mount, open_tree, MoveMountFlags, OpenTreeFlags};
    use rustix::thread::{move_into_thread_name_spaces, ThreadNameSpaceType, UnshareFlags};
    let fail = |b: &Bind, what: &'static str| {
        let b = b.clone();
        move |e: std::io::Error| BindIntoError {
            source_path: b.source,
            target: b.target,
            what,
            source: e,
        }
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            // The sources are cloned in the daemon's namespace, before this thread leaves it.
            let mut trees = Vec::with_capacity(binds.len());
            for b in binds {
                let tree = open_tree(
                    rustix::fs::CWD,
                    &b.source,
                    OpenTreeFlags::OPEN_TREE_CLONE
                        | OpenTreeFlags::OPEN_TREE_CLOEXEC
                        | OpenTreeFlags::AT_RECURSIVE,
                )
                .map_err(|e| fail(b, "cloning the source")(e.into()))?;
                trees.push(tree);
            }
            let Some(first) = binds.first() else {
                return Ok(());
            };
            // SAFETY: FS gives this thread its own root, cwd and umask (setns into a
            // mount namespace requires it); no descriptor table or memory is unshared.
            unsafe { rustix::thread::unshare_unsafe(UnshareFlags::FS) }
                .map_err(|e| fail(first, "a file-system context for the thread")(e.into()))?;
            move_into_thread_name_spaces(pidfd, ThreadNameSpaceType::MOUNT)
                .map_err(|e| fail(first, "entering the slot's mount namespace")(e.into()))?;
            if let Some((uid, gid)) = owner {
                // SAFETY: setfsgid/setfsuid take plain integers and change only this
                // thread's credentials (glibc does not broadcast them); the thread ends
                // after the binds. Group first: with the fsuid not 0 the thread may lack
                // the capability to change it. Mounting needs CAP_SYS_ADMIN, which a
                // change of fsuid leaves.
                unsafe {
                    libc::setfsgid(gid);
                    libc::setfsuid(uid);
                }
            }
            for (b, tree) in binds.iter().zip(&trees) {
                if std::fs::symlink_metadata(&b.target).is_err() {
                    use std::os::unix::fs::DirBuilderExt;
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o755)
                        .create(&b.target)
                        .map_err(fail(b, "making the mount point"))?;
                }
                move_mount(
                    tree,
                    "",
                    rustix::fs::CWD,
                    &b.target,
                    MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
                )
                .map_err(|e| fail(b, "mounting")(e.into()))?;
            }
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| {
            Err(BindIntoError {
                source_path: PathBuf::new(),
                target: PathBuf::new(),
                what: "the mount thread panicked",
                source: std::io::Error::other("panic"),
            })
        })
    })
}
