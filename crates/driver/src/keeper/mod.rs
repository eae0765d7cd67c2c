//! The keeper: a small process that parents the instances so they outlive the daemon.
//!
//! A process that is not your child cannot be waited on, so a daemon that crashes loses
//! the exit statuses of the instances it started. The keeper (one per state directory,
//! `bulkhead keeper`, a plain poll loop with no async runtime) spawns instances on the
//! daemon's behalf and is their parent and child subreaper. It:
//!
//! - spawns each instance in its own process group with `PR_SET_PDEATHSIG(SIGKILL)`: if
//!   the keeper dies, its instances die with it, so nothing ever runs unseen; and, when
//!   the daemon gives one, in the instance's cgroup (the child joins it before exec), so
//!   that what an instance forks, `setsid` or not, is found and killed with it by the
//!   daemon (a double-forked process has no parent-death signal of its own);
//! - opens a pidfd for each instance before it can reap it, and hands the daemon the pidfd
//!   and the read ends of the instance's stdout/stderr pipes (`SCM_RIGHTS`), keeping its own
//!   copies so that the pipes stay open (and the instance keeps running) while no daemon is
//!   connected; logs resume when a daemon reconnects;
//! - reaps every child (orphaned grandchildren included: no zombie survives) and keeps each
//!   instance's exit status until the daemon acknowledges it, across daemon restarts;
//! - stores an opaque record per instance (the daemon's JSON: key, spec as launched,
//!   counters) and returns it on `List`, which is how a restarted daemon adopts instances.
//!
//! The protocol is JSON over a `SOCK_SEQPACKET` Unix socket at `<state>/keeper.sock` (one
//! message per packet, file descriptors attached), see [`Request`] and [`Reply`]. One
//! daemon is connected at a time; a new connection replaces the old one.
//!
//! The daemon side is [`client::KeeperClient`] and the driver [`client::KeeperDriver`].

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use bulkhead_core::event::ExitStatus;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

pub mod client;
pub mod server;

/// The largest message, in bytes (a record carries the workload spec as launched).
pub const MAX_MESSAGE: usize = 1024 * 1024;

/// What the daemon asks of the keeper.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Start an instance. Answered by `Spawned` (fds: pidfd, stdout, stderr) or
    /// `SpawnFailed`.
    Spawn {
        req: u64,
        instance: String,
        record: String,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: PathBuf,
        /// The instance's cgroup (made by the daemon): the child joins it before exec.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cgroup: Option<PathBuf>,
    },
    /// The daemon has the exit status of `pid`: forget the instance.
    Ack { pid: u32 },
    /// Every instance the keeper holds: one `Instance` each, then `ListEnd`.
    List { req: u64 },
    /// Exit once no instance is left (a clean daemon shutdown).
    Shutdown,
}

/// What the keeper tells the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Reply {
    Spawned {
        req: u64,
        pid: u32,
        start_time: u64,
    },
    SpawnFailed {
        req: u64,
        error: String,
    },
    /// The keeper reaped an instance's main process.
    Exited {
        pid: u32,
        status: ExitStatus,
    },
    /// One held instance (fds: pidfd, stdout, stderr).
    Instance {
        req: u64,
        instance: String,
        record: String,
        pid: u32,
        start_time: u64,
        exit: Option<ExitStatus>,
    },
    ListEnd {
        req: u64,
    },
}

/// Sends one message with `fds` attached. The socket may be non-blocking: `WouldBlock`
/// is returned as is.
pub fn send<T: Serialize>(sock: BorrowedFd<'_>, msg: &T, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let data = serde_json::to_vec(msg).map_err(io::Error::other)?;
    if data.len() > MAX_MESSAGE {
        return Err(io::Error::other(format!(
            "keeper message of {} bytes is too large",
            data.len()
        )));
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other(
            "too many file descriptors for one keeper message",
        ));
    }
    let n = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&data)],
        &mut control,
        SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
    )?;
    if n != data.len() {
        return Err(io::Error::other("short write on the keeper socket"));
    }
    Ok(())
}

/// Receives one message and its fds. `Ok(None)` at end of stream.
pub fn recv<T: for<'de> Deserialize<'de>>(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = rustix::net::recvmsg(
        sock,
        &mut iov,
        &mut control,
        RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for c in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = c {
            fds.extend(rights);
        }
    }
    if msg.bytes == 0 {
        return Ok(None);
    }
    if msg.flags.contains(rustix::net::ReturnFlags::TRUNC) {
        return Err(io::Error::other("keeper message truncated"));
    }
    let value = serde_json::from_slice(&buf[..msg.bytes])
        .map_err(|e| io::Error::other(format!("bad keeper message: {e}")))?;
    Ok(Some((value, fds)))
}

/// A `SOCK_SEQPACKET` Unix socket, close-on-exec.
pub(crate) fn seqpacket(nonblocking: bool) -> io::Result<OwnedFd> {
    let mut flags = rustix::net::SocketFlags::CLOEXEC;
    if nonblocking {
        flags |= rustix::net::SocketFlags::NONBLOCK;
    }
    Ok(rustix::net::socket_with(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        flags,
        None,
    )?)
}

/// Larger socket buffers so that a record-carrying message fits in one packet.
pub(crate) fn grow_buffers(fd: impl AsFd) {
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(&fd, 4 * MAX_MESSAGE);
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&fd, 4 * MAX_MESSAGE);
}
