//! The keeper's main loop: no async runtime, one `poll` over the listening socket, the
//! connected daemon and a signalfd for SIGCHLD.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use bulkhead_core::event::ExitStatus;
use rustix::event::{PollFd, PollFlags};

use super::{Reply, Request, MAX_MESSAGE};
use crate::sys;

/// The keeper could not start or failed.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on keeper socket {path}: {source}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("keeper: {what}: {source}")]
    Sys {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The keeper's socket, lock and pid file in a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("keeper.sock")
}

fn lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("keeper.lock")
}

struct Held {
    instance: String,
    record: String,
    start_time: u64,
    pidfd: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    exit: Option<ExitStatus>,
}

struct Keeper {
    held: HashMap<u32, Held>,
    client: Option<OwnedFd>,
    shutdown: bool,
}

/// Runs the keeper for `state_dir` until it is told to shut down and holds no instance.
/// Returns at once if another keeper already holds the state directory.
///
/// Call it first thing in the process: it closes every descriptor above 2 (the keeper
/// keeps nothing it inherited).
pub fn run(state_dir: &Path) -> Result<(), KeeperError> {
    // The keeper keeps no descriptor of whoever started it (a daemon that was itself given
    // stray descriptors, a shell): it closes them all before it opens anything, so none
    // can reach an instance. That is why `run` must be the process's first step.
    sys::close_from(3).map_err(|source| KeeperError::Sys {
        what: "cannot close inherited descriptors",
        source,
    })?;
    crate::sys::raise_nofile_limit();
    let lock_file = lock_path(state_dir);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_file)
        .map_err(|source| KeeperError::Lock {
            path: lock_file.clone(),
            source,
        })?;
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        // Another keeper serves this state directory.
        return Ok(());
    }
    let _ = lock.set_len(0);
    let _ = writeln!(&lock, "{}", std::process::id());
    let sys_err = |what| move |source| KeeperError::Sys { what, source };
    sys::set_child_subreaper().map_err(sys_err("cannot become a child subreaper"))?;
    let sigfd = sigchld_fd().map_err(sys_err("cannot watch SIGCHLD"))?;

    let path = socket_path(state_dir);
    let listen_err = |source| KeeperError::Listen {
        path: path.clone(),
        source,
    };
    let _ = std::fs::remove_file(&path);
    let listener = super::seqpacket(true).map_err(listen_err)?;
    let addr = rustix::net::SocketAddrUnix::new(&path).map_err(|e| listen_err(e.into()))?;
    rustix::net::bind(&listener, &addr).map_err(|e| listen_err(e.into()))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(listen_err)?;
    rustix::net::listen(&listener, 16).map_err(|e| listen_err(e.into()))?;

    let mut k = Keeper {
        held: HashMap::new(),
        client: None,
        shutdown: false,
    };
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        if k.shutdown && k.held.values().all(|h| h.exit.is_some()) {
            let _ = std::fs::remove_file(&path);
            return Ok(());
        }
        let (sig_ready, listen_ready, client_ready) = {
            let mut fds = vec![
                PollFd::new(&sigfd, PollFlags::IN),
                PollFd::new(&listener, PollFlags::IN),
            ];
            if let Some(c) = &k.client {
                fds.push(PollFd::new(c, PollFlags::IN));
            }
            match rustix::event::poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    return Err(KeeperError::Sys {
                        what: "poll",
                        source: e.into(),
                    })
                }
            }
            (
                !fds[0].revents().is_empty(),
                !fds[1].revents().is_empty(),
                fds.get(2).is_some_and(|f| !f.revents().is_empty()),
            )
        };
        if sig_ready {
            drain_signalfd(&sigfd);
            k.reap();
        }
        if listen_ready {
            if let Ok(c) = rustix::net::accept_with(
                &listener,
                rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
            ) {
                super::grow_buffers(&c);
                // A new daemon replaces the old connection.
                k.client = Some(c);
            }
        }
        if client_ready {
            k.serve_client(&mut buf);
        }
    }
}

impl Keeper {
    fn serve_client(&mut self, buf: &mut [u8]) {
        loop {
            let Some(client) = &self.client else { return };
            match super::recv::<Request>(client.as_fd(), buf) {
                Ok(Some((req, _fds))) => self.handle(req),
                Ok(None) => {
                    self.client = None;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("bulkhead keeper: dropping the daemon connection: {e}");
                    self.client = None;
                    return;
                }
            }
        }
    }

    fn reply(&mut self, msg: &Reply, fds: &[std::os::fd::BorrowedFd<'_>]) {
        let Some(c) = &self.client else { return };
        // The daemon reads promptly and the buffers are large; a full buffer means the
        // daemon is stuck: drop it rather than block the keeper (it reconnects and lists).
        if let Err(e) = super::send(c.as_fd(), msg, fds) {
            eprintln!("bulkhead keeper: cannot send to the daemon ({e}); dropping the connection");
            self.client = None;
        }
    }

    fn handle(&mut self, req: Request) {
        match req {
            Request::Spawn {
                req,
                instance,
                record,
                argv,
                env,
                cwd,
                cgroup,
            } => match spawn(&argv, &env, &cwd, cgroup.as_deref()) {
                Ok((pid, pidfd, stdout, stderr)) => {
                    let start_time = sys::read_stat(pid).map(|s| s.starttime).unwrap_or(0);
                    let reply = Reply::Spawned {
                        req,
                        pid,
                        start_time,
                    };
                    {
                        let fds = [pidfd.as_fd(), stdout.as_fd(), stderr.as_fd()];
                        let Some(c) = &self.client else { return };
                        if let Err(e) = super::send(c.as_fd(), &reply, &fds) {
                            eprintln!("bulkhead keeper: cannot send to the daemon ({e})");
                            self.client = None;
                        }
                    }
                    self.held.insert(
                        pid,
                        Held {
                            instance,
                            record,
                            start_time,
                            pidfd,
                            stdout,
                            stderr,
                            exit: None,
                        },
                    );
                }
                Err(e) => {
                    let error = format!(
                        "cannot start {}: {e}",
                        argv.first()
                            .map(String::as_str)
                            .unwrap_or("(empty command)")
                    );
                    self.reply(&Reply::SpawnFailed { req, error }, &[]);
                }
            },
            Request::Ack { pid } => {
                if self.held.get(&pid).is_some_and(|h| h.exit.is_some()) {
                    self.held.remove(&pid);
                }
            }
            Request::List { req } => {
                let pids: Vec<u32> = self.held.keys().copied().collect();
                for pid in pids {
                    let Some(h) = self.held.get(&pid) else {
                        continue;
                    };
                    let msg = Reply::Instance {
                        req,
                        instance: h.instance.clone(),
                        record: h.record.clone(),
                        pid,
                        start_time: h.start_time,
                        exit: h.exit,
                    };
                    let Some(c) = &self.client else { return };
                    let fds = [h.pidfd.as_fd(), h.stdout.as_fd(), h.stderr.as_fd()];
                    if let Err(e) = super::send(c.as_fd(), &msg, &fds) {
                        eprintln!("bulkhead keeper: cannot send to the daemon ({e})");
                        self.client = None;
                        return;
                    }
                }
                self.reply(&Reply::ListEnd { req }, &[]);
            }
            Request::Shutdown => self.shutdown = true,
        }
    }

    /// Reaps every exited child. The keeper runs nothing but instances, so every child is
    /// either an instance's main process (its status is kept) or an orphan re-parented to
    /// this subreaper (reaped and forgotten).
    fn reap(&mut self) {
        loop {
            match sys::wait_any_nohang() {
                Ok(Some((pid, status))) => {
                    if let Some(h) = self.held.get_mut(&pid) {
                        h.exit = Some(status);
                        self.reply(&Reply::Exited { pid, status }, &[]);
                    }
                }
                Ok(None) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return, // ECHILD: no children
            }
        }
    }
}

/// Starts one instance: own process group, parent-death signal, pipes for its output, in
/// `cgroup` when given. Returns the pid, a pidfd opened before the keeper can reap it, and
/// the pipe read ends.
fn spawn(
    argv: &[String],
    env: &[(String, String)],
    cwd: &Path,
    cgroup: Option<&Path>,
) -> io::Result<(u32, OwnedFd, OwnedFd, OwnedFd)> {
    let program = argv
        .first()
        .ok_or_else(|| io::Error::other("empty command"))?;
    let program = crate::process::resolve_program(program, env, cwd)?;
    let procs = cgroup
        .map(|dir| {
            let path = dir.join("cgroup.procs");
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map(OwnedFd::from)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
        })
        .transpose()?;
    let keeper = rustix::process::getpid();
    let mut child =
        crate::process::fork_spawn(&program, argv, env, cwd, procs.as_ref(), Some(keeper))?;
    let pid = child.id();
    // The keeper reaps only in its SIGCHLD step of the same loop, after this returns: the
    // child's pid cannot be reused before the pidfd is open.
    let pidfd = sys::pidfd_open(pid)?;
    let stdout = child
        .stdout
        .take()
        .map(OwnedFd::from)
        .ok_or_else(|| io::Error::other("no stdout pipe"))?;
    let stderr = child
        .stderr
        .take()
        .map(OwnedFd::from)
        .ok_or_else(|| io::Error::other("no stderr pipe"))?;
    Ok((pid, pidfd, stdout, stderr))
}

/// A signalfd for SIGCHLD (blocked for normal delivery). std resets the signal mask in
/// the children it spawns, so instances do not inherit the block.
fn sigchld_fd() -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it before use, and
    // pthread_sigmask only reads it. The keeper is single-threaded, so blocking SIGCHLD
    // here blocks it for the whole process.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

fn drain_signalfd(fd: &OwnedFd) {
    let mut buf = [0u8; 128 * 8];
    loop {
        // SAFETY: reads into a stack buffer of the given length from a descriptor we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return;
        }
    }
}
