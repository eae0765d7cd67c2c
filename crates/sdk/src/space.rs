//! Channel spaces: where the channels of one isolation scope live.
//!
//! iceoryx2 keeps its shared memory in `/dev/shm` (a path fixed when it is built: its
//! discussion #1220 asks for a way to move it) and its node and service records under
//! its root directory. A channel space is a directory with one folder for each,
//! `<space>/shm` and `<space>/iox2`: the daemon makes it a size-bounded tmpfs of its
//! own for each scope, and every party sees it at the fixed paths.
//!
//! - A walled workload gets both folders bound at `/dev/shm` and at iceoryx2's root by
//!   its driver: it sees its scope's channels and nothing else.
//! - A thread of the host (the daemon's manager of the space, `bulkhead pipe`, a
//!   benchmark) calls [`enter`]: the *thread* gets a mount namespace of its own
//!   (`unshare(CLONE_NEWNS)` implies `CLONE_FS`, which a thread of a threaded process
//!   may unshare; no other thread is affected), with the same two binds, and takes the
//!   space owner's file-system ids (`setfsuid`/`setfsgid` are per thread), so that the
//!   files it creates belong to the user the workloads run as: iceoryx2 makes them mode
//!   0600. iceoryx2 ties nodes and ports to their thread anyway.
//!
//! Entering needs `CAP_SYS_ADMIN` (the daemon's user, root).

use std::path::{Path, PathBuf};

use rustix::mount::{mount_bind, mount_change, MountPropagationFlags};
use rustix::thread::{unshare_unsafe, UnshareFlags};

/// The folder of a space shown at `/dev/shm`.
pub fn shm_dir(space: &Path) -> PathBuf {
    space.join("shm")
}

/// The folder of a space shown at iceoryx2's root directory.
pub fn root_dir(space: &Path) -> PathBuf {
    space.join("iox2")
}

/// The calling thread could not enter a channel space.
#[derive(Debug, thiserror::Error)]
#[error("cannot enter channel space {space}: {what}: {source}")]
pub struct EnterError {
    pub space: PathBuf,
    pub what: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// Moves the calling thread into `space`: its `/dev/shm` and `root` become the space's
/// folders, and its file-system ids the owner's (of `<space>/shm`). For good: a thread
/// that entered a space stays in it until it ends.
pub fn enter(space: &Path, root: &Path) -> Result<(), EnterError> {
    use std::os::unix::fs::MetadataExt;
    let err = |what| {
        let space = space.to_owned();
        move |source: std::io::Error| EnterError {
            space,
            what,
            source,
        }
    };
    let rerr = |what| {
        let f = err(what);
        move |e: rustix::io::Errno| f(e.into())
    };
    let shm = shm_dir(space);
    let meta = std::fs::metadata(&shm).map_err(err("its shm folder"))?;
    // The mount point: on the host (the file system is shared; only mounts are not).
    std::fs::create_dir_all(root).map_err(err("iceoryx2's root directory"))?;
    // SAFETY: NEWNS (with the CLONE_FS it implies) gives this thread its own copy of the
    // mount table, root, cwd and umask; no descriptor table or memory is unshared, so
    // nothing another part of the process holds is invalidated.
    unsafe { unshare_unsafe(UnshareFlags::NEWNS) }
        .map_err(rerr("a mount namespace for the thread"))?;
    // Private first: with `/` shared (systemd's default) the binds below would
    // otherwise propagate back to the host's namespace.
    mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .map_err(rerr("making / private"))?;
    mount_bind(&shm, "/dev/shm").map_err(rerr("binding its shm folder at /dev/shm"))?;
    mount_bind(root_dir(space), root).map_err(rerr("binding its iceoryx2 folder"))?;
    // SAFETY: setfsgid/setfsuid take plain integers and change only this thread's
    // credentials (glibc does not broadcast them to other threads). Group first: once
    // the fsuid is not 0 the thread may lack the capability to change it.
    unsafe {
        libc::setfsgid(meta.gid());
        libc::setfsuid(meta.uid());
    }
    // setfs[ug]id report no error: read them back (an invalid id returns the current).
    // SAFETY: as above; -1 is never a valid id, so these only read.
    let (uid, gid) = unsafe { (libc::setfsuid(u32::MAX), libc::setfsgid(u32::MAX)) };
    if uid as u32 != meta.uid() || gid as u32 != meta.gid() {
        return Err(err("taking its owner's file-system ids")(
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        ));
    }
    Ok(())
}
