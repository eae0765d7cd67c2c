//! Who is on the other end of an API socket connection: an operator, or a workload.
//!
//! The Unix socket is 0600, but a process-driver workload runs as the daemon's uid (and a
//! default sandbox one as root), so the mode alone does not keep workloads out. Every
//! connection is therefore classified once, when it is accepted, from the connecting
//! process's place in the process tree:
//!
//! **A peer is a workload when the daemon or the keeper is one of its ancestors.** Every
//! workload process descends from one of them: the keeper forks the instances (and is
//! their subreaper), the daemon spawns `--no-keeper` instances, sandbox inits, `bulkhead
//! exec`'d commands and probes, and is itself a child subreaper (`serve`), so an orphan of
//! any of those (double fork, `setsid`) is re-parented to the keeper or the daemon and
//! stays a descendant. An operator's CLI descends from a shell, a sibling of the daemon at
//! most. A peer in an ancestor PID namespace shows pid 0 (or a parent pid 0): it cannot
//! descend from the daemon and is an operator. When the daemon is PID 1 of its namespace,
//! every process started inside that namespace counts as a workload (`docker exec` into
//! such a container shows parent pid 0 and stays an operator).
//!
//! Why the ancestry walk and not the alternatives: the cgroup is not there on every driver
//! (the process driver makes none, and the keeper-backed instances share the keeper's);
//! the session and process group can be left with `setsid`; the pid namespace is the
//! daemon's own for process workloads. The parent chain cannot be left without the
//! subreapers catching the process, and costs one `/proc/<pid>/stat` read per ancestor
//! (a handful), once per connection, not per request.
//!
//! # Races (why the check is sound)
//!
//! - **The peer's pid.** `SO_PEERCRED` records the pid that called `connect`; by the time
//!   the daemon reads `/proc`, that process may be gone and the number reused. So the
//!   daemon also takes `SO_PEERPIDFD` (Linux 6.5), a pidfd of the very process that
//!   connected, and checks *after* the walk that it still lives: the stat that was read
//!   was then the peer's own. A peer that is already gone is refused (an operator's CLI
//!   waits for its answers; only a process that hands its connection on and exits gets
//!   here). Without `SO_PEERPIDFD` (older kernels) this step is skipped: the window is the
//!   accept latency, and a reuse needs the whole pid space to cycle in it.
//! - **An ancestor's pid.** Between reading a child's parent pid and reading the parent's
//!   stat, the parent may exit and its number be taken by another process. A parent always
//!   started no later than its child, so a "parent" whose start time is after the child's
//!   is such a reuse; the walk then fails, and the connection is refused (fail closed; a
//!   retry sees the settled tree). A reuse with the same start tick would need the parent
//!   to die and its pid to be taken within the clock tick of the child's birth, by which
//!   time the child is already re-parented and shows its new parent.
//! - **The roots.** The daemon is this process. The keepers' pids come from their
//!   sockets (`SO_PEERCRED` on each keeper connection at start-up: keepers of an earlier
//!   daemon are not this one's descendants); a keeper started later (a new shard, a
//!   replacement) is the daemon's child, so its instances descend from the daemon. If a
//!   keeper died its instances died with it (parent-death signal).
//!
//! A workload's request is answered `PERMISSION_DENIED` naming the process and the
//! ancestor, and is audited (`auth::AuthLayer`).

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

/// `SO_PEERPIDFD` (Linux 6.5), the same number on every architecture bulkhead builds for
/// (the libc crate only has it in its uapi module).
const SO_PEERPIDFD: libc::c_int = 77;

/// How many ancestors the walk follows before it gives up (fail closed).
const MAX_DEPTH: usize = 4096;

/// What a connection's peer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not a descendant of the daemon or the keeper.
    Operator,
    /// `pid` descends from `root` (the daemon's or the keeper's pid).
    Workload {
        pid: u32,
        root: u32,
        root_name: &'static str,
    },
    /// The check could not be made; the connection is refused.
    Unknown(String),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Operator => write!(f, "an operator"),
            Verdict::Workload {
                pid,
                root,
                root_name,
            } => write!(
                f,
                "process {pid} is a workload (it descends from the {root_name}, pid {root})"
            ),
            Verdict::Unknown(why) => write!(f, "{why}"),
        }
    }
}

/// The processes whose descendants are workloads: the daemon and its keepers.
#[derive(Debug, Clone)]
pub struct Roots {
    pub daemon: u32,
    pub keepers: Vec<u32>,
}

impl Roots {
    fn name_of(&self, pid: u32) -> Option<&'static str> {
        if pid == self.daemon {
            Some("daemon")
        } else if self.keepers.contains(&pid) {
            Some("keeper")
        } else {
            None
        }
    }
}

/// What a request on the Unix socket learns about its connection (a request extension,
/// through [`tonic::transport::server::Connected`]).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub uid: Option<u32>,
    pub pid: Option<u32>,
    pub verdict: Arc<Verdict>,
}

/// Walks the parent chain of `pid` (see the module documentation).
pub fn classify_pid(pid: u32, roots: &Roots) -> Verdict {
    if pid == 0 {
        // The peer lives in an ancestor PID namespace: not our descendant.
        return Verdict::Operator;
    }
    let gone = |p: u32, e: io::Error| {
        Verdict::Unknown(format!(
            "cannot tell whether process {p} is a workload: {e}"
        ))
    };
    let mut cur = pid;
    let mut cur_stat = match bulkhead_driver::sys::read_stat(pid) {
        Ok(s) => s,
        Err(e) => return gone(pid, e),
    };
    for _ in 0..MAX_DEPTH {
        let ppid = cur_stat.ppid;
        if ppid == 0 {
            return Verdict::Operator;
        }
        if let Some(root_name) = roots.name_of(ppid) {
            return Verdict::Workload {
                pid,
                root: ppid,
                root_name,
            };
        }
        let parent = match bulkhead_driver::sys::read_stat(ppid) {
            Ok(s) => s,
            Err(e) => return gone(pid, e),
        };
        // RACE: `ppid` may have exited after we read it and been reused: a real parent
        // never started after its child (see the module documentation).
        if parent.starttime > cur_stat.starttime {
            return Verdict::Unknown(format!(
                "cannot tell whether process {pid} is a workload: the process tree changed \
                 under the check (parent {ppid} of {cur}); retry"
            ));
        }
        cur = ppid;
        cur_stat = parent;
    }
    Verdict::Unknown(format!(
        "cannot tell whether process {pid} is a workload: more than {MAX_DEPTH} ancestors"
    ))
}

/// A pidfd of the process that connected `sock` (`SO_PEERPIDFD`); `None` when the kernel
/// does not have it.
fn peer_pidfd(sock: &UnixStream) -> Option<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `fd`, a c_int on our stack, and
    // updates `len`; the socket descriptor is borrowed from a live UnixStream.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 || fd < 0 {
        return None;
    }
    // SAFETY: the kernel just created this descriptor for us; nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the process a pidfd names is still running: a pidfd polls readable once its
/// process has exited (this works across PID namespaces, unlike signal 0).
fn pidfd_alive(pidfd: &OwnedFd) -> bool {
    let mut fds = [rustix::event::PollFd::new(
        pidfd,
        rustix::event::PollFlags::IN,
    )];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match rustix::event::poll(&mut fds, Some(&zero)) {
        Ok(0) => true,
        Ok(_) => false,
        // Cannot tell: fail closed.
        Err(_) => false,
    }
}

/// Classifies the peer of an accepted connection.
pub fn classify(sock: &UnixStream, roots: &Roots) -> PeerInfo {
    let cred = sock.peer_cred().ok();
    let uid = cred.map(|c| c.uid());
    let pid = cred.and_then(|c| c.pid()).map(|p| p as u32);
    let Some(pid) = pid else {
        return PeerInfo {
            uid,
            pid: None,
            verdict: Arc::new(Verdict::Unknown(
                "cannot tell whether the peer is a workload: the kernel gave no pid".into(),
            )),
        };
    };
    let pidfd = peer_pidfd(sock);
    let mut verdict = classify_pid(pid, roots);
    // RACE: the walk read /proc/<pid>; it was the connecting process's only if that
    // process still lives now (a reused pid could otherwise pass for it).
    // (pid 0: outside our PID namespace, and no descendant whatever happens to it.)
    if let (Some(fd), true) = (&pidfd, pid != 0) {
        if verdict == Verdict::Operator && !pidfd_alive(fd) {
            verdict = Verdict::Unknown(format!(
                "process {pid} connected and is gone; its connection is refused"
            ));
        }
    }
    PeerInfo {
        uid,
        pid: Some(pid),
        verdict: Arc::new(verdict),
    }
}

/// An accepted Unix connection with its [`PeerInfo`]; tonic hands the info to every
/// request of the connection as an extension.
pub struct Checked {
    inner: UnixStream,
    info: PeerInfo,
}

impl Checked {
    pub fn new(inner: UnixStream, roots: &Roots) -> Checked {
        let info = classify(&inner, roots);
        if *info.verdict != Verdict::Operator {
            tracing::info!("API connection refused: {}", info.verdict);
        }
        Checked { inner, info }
    }
}

impl tonic::transport::server::Connected for Checked {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for Checked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Checked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_an_operator_and_its_children_are_workloads_of_it() {
        let me = std::process::id();
        let roots = Roots {
            daemon: u32::MAX - 1,
            keepers: Vec::new(),
        };
        assert_eq!(classify_pid(me, &roots), Verdict::Operator);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let roots = Roots {
            daemon: me,
            keepers: Vec::new(),
        };
        let v = classify_pid(child.id(), &roots);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            v,
            Verdict::Workload {
                pid: child.id(),
                root: me,
                root_name: "daemon"
            }
        );
        assert_eq!(classify_pid(0, &roots), Verdict::Operator);
    }
}
