//! The keeper's main loop: no async runtime, one `poll` over the listening socket, the
//! connected daemon, a signalfd for SIGCHLD and an epoll set of the instances' output
//! pipes (so a round costs the same with 10 instances or 10,000).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use bulkhead_core::event::ExitStatus;
use rustix::event::{epoll, PollFd, PollFlags};

use super::{Reply, Request, MAX_MESSAGE, OUTPUT_CHUNK};
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

/// The socket of the state directory's first keeper (shard 0).
pub fn socket_path(state_dir: &Path) -> PathBuf {
    shard_socket_path(state_dir, 0)
}

/// The socket of keeper shard `shard` (see the module docs of [`super`]).
pub fn shard_socket_path(state_dir: &Path, shard: usize) -> PathBuf {
    match shard {
        0 => state_dir.join("keeper.sock"),
        n => state_dir.join(format!("keeper.{n}.sock")),
    }
}

fn lock_path(state_dir: &Path, shard: usize) -> PathBuf {
    match shard {
        0 => state_dir.join("keeper.lock"),
        n => state_dir.join(format!("keeper.{n}.lock")),
    }
}

/// Descriptors a keeper keeps for itself (its sockets, signalfd, epoll, lock, stdio) and
/// for a spawn in progress (two pipes, the cgroup file, a pidfd), below its limit.
const RESERVED_FDS: u64 = 64;

struct Held {
    instance: String,
    record: String,
    start_time: u64,
    /// The read ends of stdout and stderr, until each reaches its end.
    out: [Option<OwnedFd>; 2],
    exit: Option<ExitStatus>,
    /// The daemon has the exit status; the entry goes once the output has ended too.
    acked: bool,
    /// The pipes are in the epoll set: the connected daemon attached the log.
    watched: bool,
    /// Output read for an earlier connection and not delivered: sent first on `Attach`.
    carry: Option<Vec<u8>>,
    /// The instance's listening sockets (`sockets:`), kept until the entry goes, so a
    /// daemon that restarts gets them back with the instance (`List`).
    listen: Vec<(String, OwnedFd)>,
    /// The main process sd_notify `MAINPID=` moved the instance to (the daemon's
    /// `MainPid`): its exit, not the first process's, is the instance's.
    main: Option<u32>,
    /// A warm slot no launch has taken yet (`Prewarm`, until `Assign`): not listed, and
    /// forgotten once it exits (nobody acknowledges a slot).
    slot: bool,
}

impl Held {
    fn open_streams(&self) -> usize {
        self.out.iter().filter(|o| o.is_some()).count()
    }
}

struct Keeper {
    held: HashMap<u32, Held>,
    client: Option<OwnedFd>,
    shutdown: bool,
    /// Every open output pipe, keyed `pid << 1 | stream index`.
    pipes: OwnedFd,
    /// Pipe and listening-socket descriptors held, against `capacity`.
    open_pipes: u64,
    capacity: u64,
    /// An output packet the daemon's socket had no room for: sent first when it does;
    /// meanwhile no pipe is read.
    pending: Option<Vec<u8>>,
    /// Moved main processes (`MainPid`) -> the instance's first pid.
    mains: HashMap<u32, u32>,
    /// The statuses of the last orphans reaped: a `MainPid` naming one that already
    /// exited gets its real status from here.
    orphans: std::collections::VecDeque<(u32, ExitStatus)>,
}

/// How many reaped orphans' statuses a keeper remembers.
const ORPHANS_KEPT: usize = 256;

/// Runs keeper shard `shard` for `state_dir` until it is told to shut down and holds no
/// instance. Returns at once if another keeper already serves that shard.
///
/// Call it first thing in the process: it closes every descriptor above 2 (the keeper
/// keeps nothing it inherited).
pub fn run(state_dir: &Path, shard: usize) -> Result<(), KeeperError> {
    // The keeper keeps no descriptor of whoever started it (a daemon that was itself given
    // stray descriptors, a shell): it closes them all before it opens anything, so none
    // can reach an instance. That is why `run` must be the process's first step.
    sys::close_from(3).map_err(|source| KeeperError::Sys {
        what: "cannot close inherited descriptors",
        source,
    })?;
    let limit = crate::sys::raise_nofile_limit();
    let lock_file = lock_path(state_dir, shard);
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
        // Another keeper serves this shard of the state directory.
        return Ok(());
    }
    let _ = lock.set_len(0);
    let _ = writeln!(&lock, "{}", std::process::id());
    let sys_err = |what| move |source| KeeperError::Sys { what, source };
    sys::set_child_subreaper().map_err(sys_err("cannot become a child subreaper"))?;
    let sigfd = sigchld_fd().map_err(sys_err("cannot watch SIGCHLD"))?;
    let pipes = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| KeeperError::Sys {
        what: "cannot create an epoll instance",
        source: e.into(),
    })?;

    let path = shard_socket_path(state_dir, shard);
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
        pipes,
        open_pipes: 0,
        capacity: limit.saturating_sub(RESERVED_FDS),
        pending: None,
        mains: HashMap::new(),
        orphans: std::collections::VecDeque::new(),
    };
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut chunk = vec![0u8; OUTPUT_CHUNK];
    loop {
        if k.shutdown && k.held.values().all(|h| h.exit.is_some()) {
            let _ = std::fs::remove_file(&path);
            return Ok(());
        }
        let (sig_ready, listen_ready, client_ready, client_writable, pipes_ready) = {
            let mut fds = vec![
                PollFd::new(&sigfd, PollFlags::IN),
                PollFd::new(&listener, PollFlags::IN),
            ];
            if let Some(c) = &k.client {
                let mut flags = PollFlags::IN;
                if k.pending.is_some() {
                    flags |= PollFlags::OUT;
                }
                fds.push(PollFd::new(c, flags));
                // The pipes are read only while the daemon can take what they carry.
                if k.pending.is_none() {
                    fds.push(PollFd::new(&k.pipes, PollFlags::IN));
                }
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
            let client = fds
                .get(2)
                .map(|f| f.revents())
                .unwrap_or(PollFlags::empty());
            (
                !fds[0].revents().is_empty(),
                !fds[1].revents().is_empty(),
                client.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR),
                client.contains(PollFlags::OUT),
                fds.get(3).is_some_and(|f| !f.revents().is_empty()),
            )
        };
        // ORDER: the daemon's requests before the reaping. A launch from a warm slot
        // sends `Assign` before it hands the slot its program, so by the time the
        // program has run and exited, the `Assign` waits on the socket: handled first,
        // the exit is an instance's (its output kept), not a slot's (forgotten at once).
        if client_ready {
            k.serve_client(&mut buf);
        }
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
                // A new daemon replaces the old connection. It has no log attached yet:
                // no pipe is read until it says so, and an undelivered packet waits for
                // its instance's `Attach`.
                k.client = Some(c);
                k.unwatch_all();
            }
        }
        if client_writable {
            k.flush_pending();
        }
        if pipes_ready {
            k.forward_output(&mut chunk);
        }
    }
}

impl Keeper {
    fn unwatch_all(&mut self) {
        if let Some(p) = self.pending.take() {
            let pid = u32::from_le_bytes([p[1], p[2], p[3], p[4]]);
            if let Some(h) = self.held.get_mut(&pid) {
                h.carry = Some(p);
            }
        }
        for h in self.held.values_mut() {
            if h.watched {
                for fd in h.out.iter().flatten() {
                    let _ = epoll::delete(&self.pipes, fd);
                }
                h.watched = false;
            }
        }
    }

    /// Starts reading `pid`'s pipes (its log is attached on the daemon's side).
    fn attach(&mut self, pid: u32) {
        let Some(h) = self.held.get_mut(&pid) else {
            return;
        };
        if h.watched {
            return;
        }
        h.watched = true;
        let carry = h.carry.take();
        for (i, fd) in h.out.iter().enumerate() {
            if let Some(fd) = fd {
                let key = u64::from(pid) << 1 | i as u64;
                if let Err(e) = epoll::add(
                    &self.pipes,
                    fd,
                    epoll::EventData::new_u64(key),
                    epoll::EventFlags::IN,
                ) {
                    eprintln!("bulkhead keeper: cannot watch the output of pid {pid}: {e}");
                }
            }
        }
        if let Some(p) = carry {
            if self.pending.is_none() {
                self.send_output(p);
            }
        }
    }

    fn serve_client(&mut self, buf: &mut [u8]) {
        loop {
            let Some(client) = &self.client else { return };
            match super::recv::<Request>(client.as_fd(), buf) {
                Ok(Some((req, fds))) => self.handle(req, fds),
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

    /// Sends an output packet; when the socket is full it is kept as `pending` (and no
    /// pipe is read until it has gone). False if it could not be sent now.
    fn send_output(&mut self, packet: Vec<u8>) -> bool {
        let Some(c) = &self.client else {
            self.pending = Some(packet);
            return false;
        };
        match super::send_raw(c.as_fd(), &packet) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.pending = Some(packet);
                false
            }
            Err(e) => {
                eprintln!("bulkhead keeper: cannot send output to the daemon ({e}); dropping the connection");
                self.client = None;
                // Kept for the next daemon.
                self.pending = Some(packet);
                false
            }
        }
    }

    fn flush_pending(&mut self) {
        if let Some(p) = self.pending.take() {
            self.send_output(p);
        }
    }

    /// Reads the pipes that have output (a chunk each, round after round: a noisy instance
    /// does not starve the others) and forwards it, until the daemon's socket is full.
    fn forward_output(&mut self, chunk: &mut [u8]) {
        let mut events = [std::mem::MaybeUninit::<epoll::Event>::uninit(); 256];
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let ready: Vec<u64> = match epoll::wait(&self.pipes, &mut events, Some(&zero)) {
            Ok((ready, _)) => ready.iter().map(|e| e.data.u64()).collect(),
            Err(_) => return,
        };
        for key in ready {
            if self.pending.is_some() || self.client.is_none() {
                return;
            }
            let pid = (key >> 1) as u32;
            let stream = if key & 1 == 0 {
                crate::Stream::Stdout
            } else {
                crate::Stream::Stderr
            };
            let Some(fd) = self
                .held
                .get(&pid)
                .and_then(|h| h.out[stream.index()].as_ref())
            else {
                continue;
            };
            match rustix::io::read(fd, &mut *chunk) {
                Ok(0) => self.end_stream(pid, stream),
                Ok(n) => {
                    self.send_output(super::output_packet(pid, stream, &chunk[..n]));
                }
                Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => {}
                Err(_) => self.end_stream(pid, stream),
            }
        }
    }

    /// A pipe reached its end: closed, and the daemon told.
    fn end_stream(&mut self, pid: u32, stream: crate::Stream) {
        let Some(h) = self.held.get_mut(&pid) else {
            return;
        };
        if let Some(fd) = h.out[stream.index()].take() {
            if h.watched {
                let _ = epoll::delete(&self.pipes, &fd);
            }
            self.open_pipes -= 1;
        }
        let gone = h.acked && h.open_streams() == 0;
        if gone {
            self.forget(pid);
        }
        self.send_output(super::output_packet(pid, stream, &[]));
    }

    /// Forgets an instance: its kept sockets close (its pipes are counted where they
    /// close).
    fn forget(&mut self, pid: u32) -> Option<Held> {
        let h = self.held.remove(&pid)?;
        if let Some(m) = h.main {
            if self.mains.get(&m) == Some(&pid) {
                self.mains.remove(&m);
            }
        }
        self.open_pipes -= h.listen.len() as u64;
        Some(h)
    }

    /// Refuses request `req` as `full` when `fds` more descriptors would pass the limit.
    fn refused_as_full(&mut self, req: u64, fds: u64) -> bool {
        if self.open_pipes + fds <= self.capacity {
            return false;
        }
        let error = format!(
            "the keeper holds {} instances, as many as its open-files limit allows",
            self.held.len()
        );
        self.reply(
            &Reply::SpawnFailed {
                req,
                error,
                exec: None,
                full: true,
            },
            &[],
        );
        true
    }

    /// `pid`'s stdout and stderr read ends, non-blocking and counted (read once the
    /// daemon attaches its log).
    fn take_pipes(&mut self, pid: u32, pipes: [OwnedFd; 2]) -> [Option<OwnedFd>; 2] {
        let mut out = [None, None];
        for (i, fd) in pipes.into_iter().enumerate() {
            if rustix::io::ioctl_fionbio(&fd, true).is_ok() {
                self.open_pipes += 1;
                out[i] = Some(fd);
            } else {
                eprintln!("bulkhead keeper: cannot read the output of pid {pid}");
            }
        }
        out
    }

    /// Forgets `pid`'s entry and closes what is left of its output pipes.
    fn discard_entry(&mut self, pid: u32) {
        if let Some(old) = self.forget(pid) {
            for fd in old.out.into_iter().flatten() {
                if old.watched {
                    let _ = epoll::delete(&self.pipes, &fd);
                }
                self.open_pipes -= 1;
            }
        }
    }

    fn handle(&mut self, req: Request, fds: Vec<OwnedFd>) {
        match req {
            Request::Spawn {
                req,
                instance,
                record,
                argv,
                env,
                cwd,
                cgroup,
                setup,
                listen,
            } => {
                // The sockets came attached, in order; the keeper's copies close once
                // the child has them (end of this arm).
                let listen: Vec<crate::listen::ListenFd> = if listen.len() == fds.len() {
                    listen
                        .into_iter()
                        .zip(fds)
                        .map(|(name, fd)| crate::listen::ListenFd {
                            name,
                            fd: std::sync::Arc::new(fd),
                        })
                        .collect()
                } else {
                    let error = format!(
                        "the spawn names {} listening sockets but carries {} descriptors",
                        listen.len(),
                        fds.len()
                    );
                    self.reply(
                        &Reply::SpawnFailed {
                            req,
                            error,
                            exec: None,
                            full: false,
                        },
                        &[],
                    );
                    return;
                };
                if self.refused_as_full(req, 2 + listen.len() as u64) {
                    return;
                }
                match spawn(
                    &argv,
                    &env,
                    &cwd,
                    cgroup.as_deref(),
                    setup.as_deref(),
                    &listen,
                ) {
                    Ok((pid, pidfd, stdout, stderr)) => {
                        // The sockets stay with the instance (the child has its copies).
                        let kept: Vec<(String, OwnedFd)> = listen
                            .into_iter()
                            .filter_map(|l| Some((l.name, std::sync::Arc::try_unwrap(l.fd).ok()?)))
                            .collect();
                        self.open_pipes += kept.len() as u64;
                        let start_time = sys::read_stat(pid).map(|s| s.starttime).unwrap_or(0);
                        let reply = Reply::Spawned {
                            req,
                            pid,
                            start_time,
                            setup_applied: setup.is_some(),
                            follows_main_pid: true,
                            prewarms: true,
                            takes_steps: false,
                        };
                        self.reply(&reply, &[pidfd.as_fd()]);
                        // The keeper's own pidfd goes: the pid stays pinned until this loop
                        // reaps it, and a new one is opened whenever one is handed over.
                        drop(pidfd);
                        // Read once the daemon attaches the log (`Attach`).
                        let out = self.take_pipes(pid, [stdout, stderr]);
                        // A pid reaped, acknowledged and now reused while the old
                        // instance's output (held by an escaped descendant) was still open:
                        // that output ends here.
                        self.discard_entry(pid);
                        self.held.insert(
                            pid,
                            Held {
                                instance,
                                record,
                                start_time,
                                out,
                                exit: None,
                                acked: false,
                                watched: false,
                                carry: None,
                                listen: kept,
                                main: None,
                                slot: false,
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
                        self.reply(
                            &Reply::SpawnFailed {
                                req,
                                error,
                                exec: Some((e.raw_os_error(), e.to_string())),
                                full: false,
                            },
                            &[],
                        );
                    }
                }
            }
            Request::Ack { pid } => {
                if let Some(h) = self.held.get_mut(&pid) {
                    if h.exit.is_some() {
                        // The output may still be draining: the entry goes when it ends.
                        h.acked = true;
                        if h.open_streams() == 0 {
                            self.forget(pid);
                        }
                    }
                }
            }
            Request::Attach { pid } => self.attach(pid),
            Request::List { req } => {
                let pids: Vec<u32> = self
                    .held
                    .iter()
                    .filter(|(_, h)| !h.acked && !h.slot)
                    .map(|(p, _)| *p)
                    .collect();
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
                        open: [h.out[0].is_some(), h.out[1].is_some()],
                        listen: h.listen.iter().map(|(n, _)| n.clone()).collect(),
                        main: h.main,
                        follows_main_pid: true,
                    };
                    // Not reaped yet (this loop reaps only in its SIGCHLD step), so the pid
                    // names the instance (its moved main process, once its first one has
                    // exited, is this keeper's child too).
                    let pidfd = if h.exit.is_none() {
                        sys::pidfd_open(h.main.unwrap_or(pid)).ok()
                    } else {
                        None
                    };
                    let Some(c) = &self.client else { return };
                    // The sockets first, then the pidfd (when running).
                    let fds: Vec<_> = h
                        .listen
                        .iter()
                        .map(|(_, f)| f.as_fd())
                        .chain(pidfd.iter().map(|f| f.as_fd()))
                        .collect();
                    if let Err(e) = super::send(c.as_fd(), &msg, &fds) {
                        eprintln!("bulkhead keeper: cannot send to the daemon ({e})");
                        self.client = None;
                        return;
                    }
                }
                self.reply(
                    &Reply::ListEnd {
                        req,
                        prewarms: true,
                    },
                    &[],
                );
            }
            Request::Shutdown => self.shutdown = true,
            Request::MainPid { pid, main } => self.main_pid(pid, main),
            Request::Prewarm {
                req,
                slot,
                cwd,
                cgroup,
                setup,
            } => self.prewarm(req, slot, cwd, cgroup, setup),
            Request::Assign {
                pid,
                instance,
                record,
                listen,
            } => {
                if let Some(h) = self.held.get_mut(&pid).filter(|h| h.slot) {
                    h.instance = instance;
                    h.record = record;
                    h.slot = false;
                    // The copies of the instance's sockets (the slot gets its own on its
                    // socket), held as a spawned instance's are.
                    if listen.len() == fds.len() {
                        h.listen = listen.into_iter().zip(fds).collect();
                        self.open_pipes += h.listen.len() as u64;
                    }
                }
            }
        }
    }

    /// Makes a warm slot (`Request::Prewarm`) and holds it like an instance, its output
    /// pipes included, until a launch takes it (`Assign`) or it exits.
    fn prewarm(
        &mut self,
        req: u64,
        slot: String,
        cwd: PathBuf,
        cgroup: Option<PathBuf>,
        setup: Option<Box<crate::setup::ChildSetup>>,
    ) {
        let failed = |error: String| Reply::SpawnFailed {
            req,
            error,
            exec: None,
            full: false,
        };
        if self.refused_as_full(req, 2) {
            return;
        }
        let made = (|| {
            let setup = setup.map(|s| s.prepare(&cwd)).transpose()?;
            let cgroup = cgroup
                .map(|dir| {
                    crate::cgroup::open_cgroup_dir(&dir)
                        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))
                })
                .transpose()?;
            let applied = setup.is_some();
            crate::clone_spawn::spawn_slot(crate::clone_spawn::SlotSpawn {
                cwd: &cwd,
                cgroup: cgroup.as_ref(),
                death_parent: Some(rustix::process::getpid()),
                setup,
            })
            .map(|c| (c, applied))
        })();
        let (child, setup_applied) = match made {
            Ok(c) => c,
            Err(e) => {
                self.reply(&failed(format!("cannot make warm slot {slot}: {e}")), &[]);
                return;
            }
        };
        let pid = child.pid;
        let start_time = sys::read_stat(pid).map(|s| s.starttime).unwrap_or(0);
        self.reply(
            &Reply::Spawned {
                req,
                pid,
                start_time,
                setup_applied,
                follows_main_pid: true,
                prewarms: true,
                takes_steps: true,
            },
            &[child.pidfd.as_fd(), child.handover.as_fd()],
        );
        // The keeper keeps no end of the hand-over socket: the slot sees the daemon's
        // close (its daemon died) as the end of its wait.
        drop((child.pidfd, child.handover));
        let out = self.take_pipes(pid, [child.stdout, child.stderr]);
        self.discard_entry(pid);
        self.held.insert(
            pid,
            Held {
                instance: slot,
                record: String::new(),
                start_time,
                out,
                exit: None,
                acked: false,
                watched: false,
                carry: None,
                listen: Vec::new(),
                main: None,
                slot: true,
            },
        );
    }

    /// sd_notify `MAINPID=`: instance `pid`'s main process is now `main`, a descendant
    /// that is (or will be, once its parent exits) this subreaper's child. Its exit is
    /// reported as `Exited { pid: main }`, and it is the instance's; the first process's
    /// exit is no longer reported.
    fn main_pid(&mut self, pid: u32, main: u32) {
        let Some(h) = self.held.get_mut(&pid) else {
            return;
        };
        if let Some(old) = h.main.replace(main) {
            self.mains.remove(&old);
        }
        // Running again under its new main process (the first one's exit, if reported,
        // does not end it).
        h.exit = None;
        h.acked = false;
        if let Some(at) = self.orphans.iter().position(|(p, _)| *p == main) {
            // It exited (and was reaped as an orphan) before the daemon's word came.
            let (_, status) = self
                .orphans
                .remove(at)
                .unwrap_or((main, ExitStatus::Exited { code: -1 }));
            h.exit = Some(status);
            self.reply(&Reply::Exited { pid: main, status }, &[]);
            return;
        }
        if sys::pidfd_open(main).is_err() {
            // Gone and reaped by someone else (its parent): no status to report.
            let status = crate::process::LOST_STATUS;
            h.exit = Some(status);
            self.reply(&Reply::Exited { pid: main, status }, &[]);
            return;
        }
        self.mains.insert(main, pid);
    }

    /// Reaps every exited child. The keeper runs nothing but instances, so every child is
    /// either an instance's main process (its status is kept), a main process named by
    /// `MAINPID=` (likewise), or an orphan re-parented to this subreaper (reaped; its
    /// status is remembered a while, see [`ORPHANS_KEPT`]).
    fn reap(&mut self) {
        loop {
            match sys::wait_any_nohang() {
                Ok(Some((pid, status))) => {
                    if let Some(first) = self.mains.remove(&pid) {
                        if let Some(h) = self.held.get_mut(&first) {
                            h.exit = Some(status);
                        }
                        self.reply(&Reply::Exited { pid, status }, &[]);
                    } else if let Some(h) = self.held.get_mut(&pid) {
                        // Moved to another main process: this exit does not end it.
                        if h.main.is_none() {
                            h.exit = Some(status);
                            let slot = h.slot;
                            self.reply(&Reply::Exited { pid, status }, &[]);
                            if slot {
                                // A slot no launch took: nobody acknowledges it.
                                self.discard_entry(pid);
                            }
                        }
                    } else {
                        if self.orphans.len() == ORPHANS_KEPT {
                            self.orphans.pop_front();
                        }
                        self.orphans.push_back((pid, status));
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
    setup: Option<&crate::setup::ChildSetup>,
    listen: &[crate::listen::ListenFd],
) -> io::Result<(u32, OwnedFd, OwnedFd, OwnedFd)> {
    let program = argv
        .first()
        .ok_or_else(|| io::Error::other("empty command"))?;
    let program = crate::process::resolve_program(program, env, cwd)?;
    // Checked here, in the keeper: its limits are the ones the child starts from.
    let setup = setup.map(|s| s.prepare(cwd)).transpose()?;
    let cgroup = cgroup
        .map(|dir| {
            crate::cgroup::open_cgroup_dir(dir)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))
        })
        .transpose()?;
    let keeper = rustix::process::getpid();
    let child = crate::clone_spawn::spawn(crate::clone_spawn::Spawn {
        program: &program,
        argv,
        env,
        cwd,
        cgroup: cgroup.as_ref(),
        death_parent: Some(keeper),
        setup,
        listen,
    })?;
    // The pidfd comes from the clone: it names the child from its birth, before the
    // keeper could reap it.
    let (pid, pidfd, stdout, stderr) = (child.pid, child.pidfd, child.stdout, child.stderr);
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
