//! sd_notify `MAINPID=` for the process driver, with and without the keeper: the run's
//! main process moves to another process of the instance, as systemd's.
//!
//! A handle keeps the main process it started until
//! [`InstanceHandle::set_main_pid`](crate::InstanceHandle::set_main_pid) names another one,
//! which is opened as a pidfd at once (that pins it). From then on signals go to the new
//! one (and to the cgroup; without one, to the process group while the new one is in it),
//! `pid()` is it, and the run ends when it exits, with its status: once the process that
//! forked it has exited, the daemon (without a keeper: a subreaper) or the keeper (a child
//! subreaper) is its parent and reaps its real status. A new main process that is not the
//! reaper's child when it exits (its parent still runs and reaps it) has no status to
//! collect: it is reported as [`LOST_STATUS`](crate::process::LOST_STATUS) and logged.
//! The exit of the process the driver started is then only logged.
//!
//! Order, as systemd's (it reads notify messages before `SIGCHLD`): when the process the
//! driver started exits, the `MAINPID=` messages it (or its child) sent before are read
//! first, through the hook of [`on_main_exit`](crate::InstanceHandle::on_main_exit), so a
//! program that sends `MAINPID=` and exits at once is followed, not reported as having
//! daemonized.

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;

use bulkhead_core::event::ExitStatus;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::process::LOST_STATUS;
use crate::{reaper, sys};

/// How a main process named by `MAINPID=` ended.
pub(crate) type ExitFuture = Pin<Box<dyn Future<Output = ExitStatus> + Send>>;

/// The main process `MAINPID=` moved a run to.
#[derive(Debug, Clone)]
pub(crate) struct Moved {
    pub pid: u32,
    pub pidfd: Arc<OwnedFd>,
}

/// Who reaps a main process named by `MAINPID=`, and how its status comes back.
pub(crate) trait Follow: Send + Sync + 'static {
    /// Whether a move can be followed at all (an older keeper cannot).
    fn supported(&self) -> Result<(), crate::MainPidError> {
        Ok(())
    }

    /// `pid` is the main process from now on (its reaper must keep its status).
    fn start(&self, pid: u32);
    /// Resolves with `pid`'s exit status.
    fn exited(&self, pid: u32, pidfd: Arc<OwnedFd>) -> ExitFuture;

    /// Whether what held the instance's processes (the keeper) died: then their SIGKILL
    /// was its parent-death signal, not anything they did.
    fn holder_died(&self) -> bool {
        false
    }
}

/// The daemon itself is the reaper (the process driver without a keeper).
pub(crate) struct Direct;

impl Follow for Direct {
    fn start(&self, pid: u32) {
        // Owned from now on: the orphan reaper leaves its status to us.
        reaper::Registry::global().lock().register(pid);
    }

    fn exited(&self, pid: u32, pidfd: Arc<OwnedFd>) -> ExitFuture {
        Box::pin(async move {
            let status = reap(pid, pidfd).await;
            reaper::Registry::global().unregister(pid);
            status
        })
    }
}

/// Waits until `pid` has exited and reaps it if it is our child.
async fn reap(pid: u32, pidfd: Arc<OwnedFd>) -> ExitStatus {
    // SAFETY: the AsyncFd owns a clone of the Arc<OwnedFd>, so the descriptor stays open
    // and the same until the AsyncFd drops.
    let afd = match unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) } {
        Ok(afd) => afd,
        Err(e) => {
            tracing::error!("cannot watch main process {pid}: {}", e.into_parts().1);
            return std::future::pending().await;
        }
    };
    loop {
        let mut ready = match afd.readable().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(pid, "cannot poll the pidfd: {e}");
                return std::future::pending().await;
            }
        };
        match sys::waitid_pidfd(afd.get_ref()) {
            Ok(Some(status)) => return status,
            Ok(None) => ready.clear_ready(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // It exited (the pidfd polled readable) as someone else's child.
                tracing::warn!(
                    pid,
                    "main process {pid} (MAINPID) exited but is not the daemon's child \
                     ({e}): its exit status is unknown, reported as {LOST_STATUS}"
                );
                return LOST_STATUS;
            }
        }
    }
}
