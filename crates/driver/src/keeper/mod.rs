//! The keeper: a small process that parents the instances so they outlive the daemon.
//!
//! A process that is not your child cannot be waited on, so a daemon that crashes loses
//! the exit statuses of the instances it started. The keeper (`bulkhead keeper`, a plain
//! poll loop with no async runtime) spawns instances on the daemon's behalf and is their
//! parent and child subreaper. It:
//!
//! - spawns each instance in its own process group with `PR_SET_PDEATHSIG(SIGKILL)`: if
//!   the keeper dies, its instances die with it, so nothing ever runs unseen; and, when
//!   the daemon gives one, in the instance's cgroup (the child joins it before exec), so
//!   that what an instance forks, `setsid` or not, is found and killed with it by the
//!   daemon (a double-forked process has no parent-death signal of its own); the child
//!   applies the manifest's user, groups, rlimits and umask the daemon resolved
//!   ([`crate::setup::ChildSetup`], checked in the keeper: its limits are the child's);
//! - holds the read ends of each instance's stdout and stderr pipes and forwards what
//!   they carry to the daemon as output packets (so the daemon holds no pipe: one
//!   descriptor per instance, its pidfd). A pipe is read only once the daemon has
//!   attached the instance's log (`Attach`, on each connection), and only while the
//!   daemon keeps up: otherwise the pipe fills and the instance waits, as it would on a
//!   slow terminal; output resumes when a daemon reconnects and attaches. What was in
//!   flight on the connection when a daemon crashed (at most its socket buffer) is lost;
//! - opens a pidfd for an instance whenever it hands one to the daemon (on spawn, on
//!   `List`); it is the parent and reaps only in its own loop, so the pid is pinned;
//! - reaps every child (orphaned grandchildren included: no zombie survives) and keeps each
//!   instance's exit status until the daemon acknowledges it, across daemon restarts;
//! - follows an instance's `MAINPID=` (`MainPid`): the named process, its child once its
//!   own parent has exited, is the instance's main process, and its exit is reported
//!   instead of the first process's;
//! - keeps a copy of an instance's listening sockets (`sockets:`, passed with the spawn)
//!   until its entry goes, and hands them back with it on `List`, so they outlive a
//!   daemon crash;
//! - stores an opaque record per instance (the daemon's JSON: key, spec as launched,
//!   counters) and returns it on `List`, which is how a restarted daemon adopts instances;
//! - makes warm slots (`Prewarm`): children that took every step of a spawn but the exec
//!   and wait for a program the daemon writes to them directly; a slot is not listed
//!   until `Assign` makes it an instance, and is forgotten once it exits (`warm.rs`).
//!
//! **Shards.** A keeper holds two descriptors per instance, so its open-files limit caps
//! how many it can hold; past that it refuses a spawn as `full` and the daemon starts the
//! next keeper of the state directory (shard 1, 2, ...; socket `keeper.<n>.sock`). With a
//! limit of 20,000 a keeper holds 9,968 instances; with systemd's `LimitNOFILE=` raised,
//! one keeper holds them all.
//!
//! The protocol is JSON over a `SOCK_SEQPACKET` Unix socket at `<state>/keeper.sock` (one
//! message per packet, file descriptors attached), see [`Request`] and [`Reply`], plus
//! binary output packets ([`output_packet`]). One daemon is connected at a time; a new
//! connection replaces the old one. A keeper that dies is replaced at once
//! (`client::KeeperDriver::supervise`; the daemon's `health` says degraded meanwhile).
//!
//! The daemon side is [`client::KeeperClient`] and the driver [`client::KeeperDriver`].

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use crate::Stream;
use bulkhead_core::event::ExitStatus;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

pub mod client;
pub mod server;
pub mod spare;
mod warm;

/// The most descriptors one message carries: a spawn's listening sockets (`sockets:`).
pub const FDS_PER_MESSAGE: usize = bulkhead_core::sockets::MAX_SOCKETS + 3;

/// The largest message, in bytes (a record carries the workload spec as launched).
pub const MAX_MESSAGE: usize = 1024 * 1024;

/// What the daemon asks of the keeper.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Start an instance. Answered by `Spawned` (fd: its pidfd) or `SpawnFailed`.
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
        /// user, limits, umask (resolved by the daemon); the child applies them before
        /// exec and enters `cwd` as the new user.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        setup: Option<Box<crate::setup::ChildSetup>>,
        /// The names of the listening sockets attached to the message (SCM_RIGHTS, in
        /// order): the child gets them at 3.. with `LISTEN_*` (`crate::listen`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        listen: Vec<String>,
    },
    /// The daemon has the exit status of `pid`: forget the instance.
    Ack { pid: u32 },
    /// The daemon's log of `pid` is ready: start reading and forwarding its output (on
    /// each connection, after `Spawned` or `Instance`; before, the pipes are not read).
    Attach { pid: u32 },
    /// Every instance the keeper holds: one `Instance` each, then `ListEnd`.
    List { req: u64 },
    /// Exit once no instance is left (a clean daemon shutdown).
    Shutdown,
    /// sd_notify `MAINPID=`: instance `pid`'s main process is now `main`. Its exit is
    /// reported as `Exited { pid: main }` (from the statuses of recently reaped orphans
    /// if it is gone already) and the first process's exit no longer is.
    MainPid { pid: u32, main: u32 },
    /// Make a warm slot (`warm:`): a child that has taken every step of a spawn but the
    /// exec (`clone_spawn::spawn_slot`) and waits for its program on a socket whose other
    /// end the daemon gets. Answered by `Spawned` (fds: its pidfd, then that end) or
    /// `SpawnFailed`. Sent only to a keeper that said `prewarms`.
    Prewarm {
        req: u64,
        /// The slot's name (the keeper's logs say it).
        slot: String,
        cwd: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cgroup: Option<PathBuf>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        setup: Option<Box<crate::setup::ChildSetup>>,
    },
    /// The daemon hands slot `pid` its program (directly, on the slot's socket): from
    /// now on it is `instance`, with `record`, like a spawned one. Sent before the
    /// hand-over, so a daemon that dies in between leaves an instance the next one
    /// adopts or discards, never a slot running a program unseen.
    Assign {
        pid: u32,
        instance: String,
        record: String,
        /// Names of the instance's listening sockets, attached in order: the keeper keeps
        /// them for the instance as it keeps a spawned one's, so that they outlive a
        /// daemon crash. (An older keeper ignores the field and drops the copies.)
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        listen: Vec<String>,
    },
}

/// What the keeper tells the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Reply {
    Spawned {
        req: u64,
        pid: u32,
        start_time: u64,
        /// The child applied the request's `setup`. A keeper older than `setup` leaves
        /// it out; the daemon then kills the instance rather than let it run as it was
        /// not meant to.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        setup_applied: bool,
        /// This keeper understands `MainPid` (an older one drops a connection that sends
        /// it, so the daemon sends it only when this is set).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        follows_main_pid: bool,
        /// This keeper understands `Prewarm` and `Assign` (likewise).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        prewarms: bool,
        /// In the answer to a `Prewarm`: the slot takes a spare's hand-over, whose steps
        /// (user, limits, umask, working directory) come with the program
        /// (`clone_spawn::spare_handover_message`). An older keeper's slot would refuse
        /// it, so the daemon makes no spare of it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        takes_steps: bool,
    },
    SpawnFailed {
        req: u64,
        error: String,
        /// The program could not be started (not found, not executable, no such working
        /// directory): the cause, and its errno when the system gave one. Absent: the
        /// keeper failed before that (`error` says how).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exec: Option<(Option<i32>, String)>,
        /// The keeper holds as many instances as its descriptor limit allows: the
        /// daemon asks the next keeper.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        full: bool,
    },
    /// The keeper reaped an instance's main process.
    Exited { pid: u32, status: ExitStatus },
    /// One held instance (fd: its pidfd, unless it has exited).
    Instance {
        req: u64,
        instance: String,
        record: String,
        pid: u32,
        start_time: u64,
        exit: Option<ExitStatus>,
        /// Which of stdout and stderr are still open (their output follows as packets).
        #[serde(default = "both_open")]
        open: [bool; 2],
        /// Names of the instance's listening sockets, attached first (before the pidfd).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        listen: Vec<String>,
        /// The main process `MAINPID=` moved it to (the pidfd is that one's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        main: Option<u32>,
        /// As in `Spawned`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        follows_main_pid: bool,
    },
    ListEnd {
        req: u64,
        /// As in `Spawned`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        prewarms: bool,
    },
}

fn both_open() -> [bool; 2] {
    [true, true]
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
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
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

/// First byte of an output packet: `O`, the pid (u32, little-endian), the stream (1
/// stdout, 2 stderr), then the bytes; no bytes means the stream ended. A JSON message
/// starts with `{`.
pub const OUTPUT_TAG: u8 = b'O';
/// The most output bytes in one packet.
pub const OUTPUT_CHUNK: usize = 32 * 1024;
const OUTPUT_HEADER: usize = 6;

/// An output packet (see [`OUTPUT_TAG`]).
pub fn output_packet(pid: u32, stream: Stream, data: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(OUTPUT_HEADER + data.len());
    p.push(OUTPUT_TAG);
    p.extend_from_slice(&pid.to_le_bytes());
    p.push(match stream {
        Stream::Stdout => 1,
        Stream::Stderr => 2,
    });
    p.extend_from_slice(data);
    p
}

/// Sends bytes as one packet, without descriptors. The socket may be non-blocking.
pub fn send_raw(sock: BorrowedFd<'_>, packet: &[u8]) -> io::Result<()> {
    let n = rustix::net::send(sock, packet, SendFlags::DONTWAIT | SendFlags::NOSIGNAL)?;
    if n != packet.len() {
        return Err(io::Error::other("short write on the keeper socket"));
    }
    Ok(())
}

/// What the daemon receives from the keeper.
pub enum Incoming {
    Reply(Reply, Vec<OwnedFd>),
    /// Output of `pid`; empty `data`: the stream ended.
    Output {
        pid: u32,
        stream: Stream,
        data: Vec<u8>,
    },
}

/// Receives one packet and its fds into `buf`: its length. `Ok(None)` at end of stream.
fn recv_packet(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
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
    if msg.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return Err(io::Error::other(
            "keeper message carried more descriptors than allowed",
        ));
    }
    Ok(Some((msg.bytes, fds)))
}

/// Receives one message and its fds. `Ok(None)` at end of stream.
pub fn recv<T: for<'de> Deserialize<'de>>(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
    let Some((n, fds)) = recv_packet(sock, buf)? else {
        return Ok(None);
    };
    let value = serde_json::from_slice(&buf[..n])
        .map_err(|e| io::Error::other(format!("bad keeper message: {e}")))?;
    Ok(Some((value, fds)))
}

/// Receives one reply or output packet. `Ok(None)` at end of stream.
pub fn recv_incoming(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<Incoming>> {
    let Some((n, fds)) = recv_packet(sock, buf)? else {
        return Ok(None);
    };
    if buf[0] == OUTPUT_TAG {
        if n < OUTPUT_HEADER {
            return Err(io::Error::other("short keeper output packet"));
        }
        let pid = u32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]);
        let stream = match buf[5] {
            1 => Stream::Stdout,
            2 => Stream::Stderr,
            s => return Err(io::Error::other(format!("bad keeper output stream {s}"))),
        };
        return Ok(Some(Incoming::Output {
            pid,
            stream,
            data: buf[OUTPUT_HEADER..n].to_vec(),
        }));
    }
    let reply = serde_json::from_slice(&buf[..n])
        .map_err(|e| io::Error::other(format!("bad keeper message: {e}")))?;
    Ok(Some(Incoming::Reply(reply, fds)))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A keeper from before `setup` answers without `setup_applied`: read as not applied,
    /// so the daemon kills the instance; and such a keeper never sees a `setup` it could
    /// mistake for something else (the field is left out when there is none).
    #[test]
    fn a_spawn_reply_without_setup_applied_reads_as_not_applied() {
        let old: Reply =
            serde_json::from_str(r#"{"op":"spawned","req":1,"pid":2,"start_time":3}"#).unwrap();
        assert_eq!(
            old,
            Reply::Spawned {
                req: 1,
                pid: 2,
                start_time: 3,
                setup_applied: false,
                follows_main_pid: false,
                prewarms: false,
                takes_steps: false,
            }
        );
        let plain = Request::Spawn {
            req: 1,
            instance: "i".into(),
            record: String::new(),
            argv: vec!["sh".into()],
            env: Vec::new(),
            cwd: PathBuf::from("/"),
            cgroup: None,
            setup: None,
            listen: Vec::new(),
        };
        assert!(!serde_json::to_string(&plain).unwrap().contains("setup"));
    }
}
