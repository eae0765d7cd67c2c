//! Spawning with `clone3` for the children that need steps of their own before exec.
//!
//! The process driver and the keeper start a workload with code in the child: it joins
//! the instance's cgroup, switches user and limits (`crate::setup`), takes a parent-death
//! signal, or puts its listening sockets in place (`crate::listen`). `posix_spawn` cannot
//! run those steps, and the standard library's `Command` with a `pre_exec` hook did, at a
//! price measured here (2 cores, hybrid cgroups, p50 of 200 spawns of `/bin/true`): 1,035
//! µs for fork + writing `cgroup.procs` + exec, against 68 µs for `posix_spawn` and 103 µs
//! for `clone3(CLONE_VFORK | CLONE_INTO_CGROUP)` + exec. Moving a running process into a
//! cgroup takes the cgroup core's write lock on thread groups, which waits for an RCU
//! grace period; a child born in its cgroup (`CLONE_INTO_CGROUP`, Linux 5.7) never moves.
//! And a fork copies the spawner's page tables and write-protects its memory, which the
//! spawner then pays for again in page faults; `posix_spawn` avoids both by sharing the
//! memory with a child that only runs until its exec (`CLONE_VM | CLONE_VFORK`).
//!
//! So the child is made here with `clone3`:
//!
//! - `CLONE_INTO_CGROUP` with the instance's cgroup2 directory, when it has one: no code
//!   of the workload ever runs outside it, and everything it forks is born inside;
//! - `CLONE_PIDFD`: the pidfd names the child from its birth (no `pidfd_open` race);
//! - `CLONE_VM | CLONE_VFORK`, as `posix_spawn`: the child runs in the spawner's memory
//!   on a stack of its own (mapped here, with a guard page) while the spawning thread is
//!   suspended, until the child's exec or exit. `clone3` with a new stack needs a few
//!   instructions of assembly ([`clone3_vm`]; x86_64 and aarch64); elsewhere the child
//!   gets a copy of the address space instead (no `CLONE_VM`), as after `fork`.
//!
//! Signals: the spawning thread blocks all of them around the clone, and the child sets
//! every signal with a handler back to its default before it unblocks them (a handler of
//! the daemon must not run in the child, which shares the daemon's memory); `SIGPIPE`
//! goes back to its default too (the Rust runtime ignores it), and the child's signal
//! mask is empty, as `Command` leaves it.
//!
//! In the child, in order: `/dev/null` on 0 and the pipes on 1 and 2 (or the streams
//! [`spawn_given`] is given), its own process group (or, on a terminal, its own session
//! with the terminal as its controlling one), the signals as above, every descriptor above 2 marked close-on-exec, the setup
//! (umask, rlimits, ids, then the working directory as the new user) or else the working
//! directory, the parent-death signal, then [`ExecPlan::exec`] (sockets at 3..,
//! `LISTEN_PID`, `execve`). A failed step leaves its errno where the parent reads it (in
//! the shared memory; through a close-on-exec pipe without `CLONE_VM`) and exits 127; the
//! parent reaps such a child and returns the errno. Between the clone and the exec the
//! child only makes system calls on memory built before the clone: no allocation, no lock.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::listen::{ExecPlan, ListenFd, FIRST_FD};

use crate::sys::{CloneArgs, CLONE_INTO_CGROUP, CLONE_PIDFD};

/// What to start and the steps the child runs before exec.
pub(crate) struct Spawn<'a> {
    /// Absolute (resolved) program.
    pub program: &'a Path,
    /// The whole command line, `argv[0]` first.
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    /// Entered by the child unless `setup` enters its own (after the uid switch).
    pub cwd: &'a Path,
    /// The instance's cgroup2 directory (opened `O_PATH | O_DIRECTORY`): the child is
    /// born in it.
    pub cgroup: Option<&'a OwnedFd>,
    /// The pid that must still be the child's parent once it took `SIGKILL` as its
    /// parent-death signal.
    pub death_parent: Option<rustix::process::Pid>,
    pub setup: Option<crate::setup::Prepared>,
    pub listen: &'a [ListenFd],
}

/// The started child: its pid, a pidfd on it, and the read ends of its stdout and stderr.
#[derive(Debug)]
pub(crate) struct Child {
    pub pid: u32,
    pub pidfd: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// What the child reads, all built before the clone.
struct Ctx {
    /// What goes on 0, 1 and 2 (all above 2).
    stdin: RawFd,
    out_w: RawFd,
    err_w: RawFd,
    /// A new session with fd 0 (a terminal) as its controlling terminal, instead of a
    /// new process group.
    session: bool,
    /// The error pipe's write end, above the sockets' places (without `CLONE_VM`).
    fail_w: RawFd,
    /// The errno of a failed step (with `CLONE_VM`: the parent reads it after the clone).
    errno: AtomicI32,
    cwd: CString,
    setup: Option<crate::setup::Prepared>,
    death_parent: Option<rustix::process::Pid>,
    /// What to exec; `None` for a warm slot, which waits for it ([`Wait`]).
    plan: Option<ExecPlan>,
    wait: Option<Wait>,
}

/// What an instance's child is given: `/dev/null` for its stdin, pipes for its stdout
/// and stderr (read end, write end).
struct Stdio {
    devnull: OwnedFd,
    out: (OwnedFd, OwnedFd),
    err: (OwnedFd, OwnedFd),
}

impl Stdio {
    fn new() -> io::Result<Stdio> {
        let devnull = above(
            rustix::fs::open(
                "/dev/null",
                rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )?,
            3,
        )?;
        Ok(Stdio {
            devnull,
            out: pipe(3)?,
            err: pipe(3)?,
        })
    }
}

/// A working directory as the child's `chdir` takes it.
fn c_path(cwd: &Path) -> io::Result<CString> {
    CString::new(cwd.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a NUL byte in the working directory",
        )
    })
}

/// A descriptor at `min` or above (so the child's `dup2` onto 0-2, or the sockets' onto
/// 3.., cannot overwrite it), close-on-exec.
pub(crate) fn above(fd: OwnedFd, min: RawFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() >= min {
        return Ok(fd);
    }
    Ok(rustix::io::fcntl_dupfd_cloexec(&fd, min)?)
}

pub(crate) fn pipe(min: RawFd) -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    Ok((above(r, 3)?, above(w, min)?))
}

/// A child's stack: an anonymous mapping with a guard page at its low end. Also the
/// sandbox driver's, whose first process and workload process run on two of them.
pub struct Stack {
    base: *mut libc::c_void,
    len: usize,
}

/// Enough for `child_main` and the libc calls it makes (glibc's `posix_spawn` uses 32
/// KiB plus the size of the argument list, which here was built before the clone), and
/// for the sandbox's mount program; reserved only (`MAP_NORESERVE`): a page costs
/// memory once a child touched it.
const STACK: usize = 256 * 1024;

impl Stack {
    fn new() -> io::Result<Stack> {
        let page = 4096;
        let len = STACK + page;
        // SAFETY: a new private anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = Stack { base, len };
        // SAFETY: the lowest page of the mapping made above: an overflow faults there.
        if unsafe { libc::mprotect(base, page, libc::PROT_NONE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }
}

// SAFETY: the mapping belongs to the Stack alone; it is only handed to a child while the
// spawning thread holds it (see `spawn`).
unsafe impl Send for Stack {}

/// The stacks of the last spawns, kept for the next ones (a process driver's spawn uses
/// one, a sandbox's two): their pages are already mapped.
static SPARE: std::sync::Mutex<Vec<Stack>> = std::sync::Mutex::new(Vec::new());
const SPARES: usize = 4;

impl Stack {
    /// A spare stack, or a new one.
    pub fn take() -> io::Result<Stack> {
        let spare = SPARE.lock().unwrap_or_else(|e| e.into_inner()).pop();
        spare.map_or_else(Stack::new, Ok)
    }

    /// Keeps the stack for a later spawn. Only once its child has exec'd or exited.
    pub fn give_back(self) {
        let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < SPARES {
            spare.push(self);
        }
    }

    /// Puts the stack in `args` (`stack`, `stack_size`) for [`clone3_vm`].
    pub fn set(&self, args: &mut CloneArgs) {
        args.stack = self.base as u64;
        args.stack_size = self.len as u64;
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: our own mapping; the child that used it has exec'd or exited.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// Every signal blocked in this thread until dropped (then the old mask is back): around
/// a `CLONE_VM` clone, so that no handler of the spawner runs in the child.
pub struct Blocked(libc::sigset_t);

impl Blocked {
    pub fn all() -> io::Result<Blocked> {
        // SAFETY: sigset_t is plain data, initialised by sigfillset/pthread_sigmask.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            let r = libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            if r != 0 {
                return Err(io::Error::from_raw_os_error(r));
            }
            Ok(Blocked(old))
        }
    }
}

impl Drop for Blocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `all`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// Starts the child (see the module's documentation).
pub(crate) fn spawn(s: Spawn<'_>) -> io::Result<Child> {
    spawn_with(s, SHARED_MEMORY_SPAWN)
}

/// Whether [`clone3_vm`] exists on this architecture.
pub const SHARED_MEMORY_SPAWN: bool = cfg!(any(target_arch = "x86_64", target_arch = "aarch64"));

/// [`spawn`], sharing the memory with the child (`CLONE_VM`) or not: the tests run both.
fn spawn_with(s: Spawn<'_>, shared_memory: bool) -> io::Result<Child> {
    let Stdio {
        devnull,
        out: (out_r, out_w),
        err: (err_r, err_w),
    } = Stdio::new()?;
    let streams = Streams {
        stdin: devnull.as_raw_fd(),
        stdout: out_w.as_raw_fd(),
        stderr: err_w.as_raw_fd(),
        session: false,
    };
    let (pid, pidfd) = clone_exec(s, streams, shared_memory)?;
    // The child exec'd: its copies closed on exec.
    drop((out_w, err_w, devnull));
    Ok(Child {
        pid,
        pidfd,
        stdout: out_r,
        stderr: err_r,
    })
}

/// The standard streams a child of [`spawn_given`] gets (each above 2, open until the
/// call returns: `/dev/null`, pipe ends, a terminal).
pub(crate) struct Streams {
    pub stdin: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
    /// A new session with the terminal on fd 0 as its controlling terminal, instead of a
    /// new process group.
    pub session: bool,
}

/// As [`spawn`] (the same steps, the memory shared until the exec), with the standard
/// streams the caller gives: for commands that are not an instance's main process (exec
/// probes, `bulkhead exec`). Returns the pid and a pidfd once the child has exec'd.
pub(crate) fn spawn_given(s: Spawn<'_>, streams: Streams) -> io::Result<(u32, OwnedFd)> {
    clone_exec(s, streams, SHARED_MEMORY_SPAWN)
}

/// The clone and the child's steps up to its exec; the errno of a failed step comes back
/// as the error (the child is reaped then).
fn clone_exec(s: Spawn<'_>, streams: Streams, shared_memory: bool) -> io::Result<(u32, OwnedFd)> {
    let plan = ExecPlan::new(s.program, s.argv, s.env, s.listen)?;
    let cwd = c_path(s.cwd)?;
    // Above every place a socket goes (3..3+n), so that putting them there leaves it.
    let fail = if shared_memory {
        None
    } else {
        Some(pipe(FIRST_FD + s.listen.len() as RawFd)?)
    };
    let mut ctx = Ctx {
        stdin: streams.stdin,
        out_w: streams.stdout,
        err_w: streams.stderr,
        session: streams.session,
        fail_w: fail.as_ref().map_or(-1, |(_, w)| w.as_raw_fd()),
        errno: AtomicI32::new(0),
        cwd,
        setup: s.setup,
        death_parent: s.death_parent,
        plan: Some(plan),
        wait: None,
    };
    let mut pidfd: RawFd = -1;
    let mut args = CloneArgs {
        flags: CLONE_PIDFD | libc::CLONE_VFORK as u64,
        pidfd: &mut pidfd as *mut RawFd as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    if let Some(cg) = s.cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = cg.as_raw_fd() as u64;
    }
    let ret = if shared_memory {
        let stack = Stack::take()?;
        args.flags |= libc::CLONE_VM as u64;
        stack.set(&mut args);
        let blocked = Blocked::all()?;
        // SAFETY: the child runs `child_entry(&mut ctx)` on `stack` in this address
        // space while this thread is suspended (CLONE_VFORK) until its exec or exit; it
        // only reads `ctx`, writes its errno and the exec plan's buffers (all alive until
        // this returns), and makes system calls: no allocation, no lock, no return. All
        // signals are blocked here, so none reaches a handler of ours in the child before
        // it has set them to their defaults.
        let ret = unsafe {
            clone3_vm(
                &mut args,
                child_entry,
                (&mut ctx as *mut Ctx).cast::<libc::c_void>(),
            )
        };
        drop(blocked);
        // The child has exec'd or exited (CLONE_VFORK): the stack is free again.
        stack.give_back();
        ret
    } else {
        // SAFETY: fork semantics (no CLONE_VM, no stack; with CLONE_VFORK this thread
        // waits for the child's exec or exit): the child runs `child_main` on a copy of
        // the address space, which never returns (see above).
        match unsafe { crate::sys::clone3(&mut args) } {
            // SAFETY: see above; we are the child.
            Ok(0) => unsafe { child_main(&mut ctx) },
            Ok(pid) => i64::from(pid),
            Err(e) => -i64::from(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    };
    if ret < 0 {
        return Err(io::Error::from_raw_os_error(-ret as i32));
    }
    let pid = ret as u32;
    // SAFETY: CLONE_PIDFD stored a new descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // The child exec'd (its copies closed on exec) or died (CLONE_VFORK: this thread
    // resumed only then): its errno is final.
    let errno = match fail {
        None => ctx.errno.load(Ordering::SeqCst),
        Some((r, w)) => {
            drop(w);
            let mut b = [0u8; 4];
            let got = match crate::sys::read_full(&r, &mut b) {
                Ok(n) => n,
                Err(e) => {
                    kill_and_reap(&pidfd, pid);
                    return Err(e);
                }
            };
            if got == b.len() {
                i32::from_ne_bytes(b)
            } else {
                0
            }
        }
    };
    if errno != 0 {
        // It exits 127 at once: reaped here, so nobody else sees it.
        kill_and_reap(&pidfd, pid);
        return Err(io::Error::from_raw_os_error(errno));
    }
    Ok((pid, pidfd))
}

/// A command to start inside a running walled instance (`bulkhead exec`, a sandbox's
/// exec probes): [`spawn_inside`].
pub(crate) struct Inside<'a> {
    pub target: &'a crate::ExecTarget,
    /// The command line; `argv[0]` is looked up inside (a name with a `/` as it is, a
    /// bare one in the `PATH` of `env`, as `execvp` does).
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    /// Entered inside, after the namespaces (it may exist only there).
    pub cwd: &'a Path,
}

/// What the relay and the command of [`spawn_inside`] read, all built before the clone.
struct InsideCtx<'a> {
    target: &'a crate::ExecTarget,
    procs: Vec<OwnedFd>,
    cwd: CString,
    streams: Streams,
    plan: ExecPlan,
    /// Where to look for the program, in order.
    candidates: Vec<CString>,
    /// The report pipe's write end: `P` + the command's pid (the relay), `R` + errno (a
    /// step of the relay failed), `C` + errno (a step of the command failed).
    report: RawFd,
    /// The command's stack, with `CLONE_VM`.
    stack: Option<&'a Stack>,
}

/// Starts a command inside a running instance without copying this process (where
/// [`clone3_vm`] exists; elsewhere as after a fork). A relay, cloned here, enters the
/// instance's namespaces through its pidfd (`setns` moves only the caller, and a new PID
/// namespace only the caller's children), joins its cgroups, takes root inside a user
/// namespace, enters the working directory inside, then clones the command with
/// `CLONE_PARENT` (a child of this process, not of the relay) and exits. The command
/// takes its streams, its own group (or session), default signals, no descriptor above
/// 2, the instance's own restrictions ([`crate::restrict`]), then execs. Both clones are
/// `CLONE_VFORK`: this returns once the command has exec'd (or failed, then reaped, with
/// the errno) and the relay has exited (reaped here). Returns the command's pid: an
/// unreaped child of this process.
pub(crate) fn spawn_inside(i: Inside<'_>, streams: Streams) -> io::Result<u32> {
    spawn_inside_with(i, streams, SHARED_MEMORY_SPAWN)
}

fn spawn_inside_with(i: Inside<'_>, streams: Streams, shared_memory: bool) -> io::Result<u32> {
    let procs = i
        .target
        .cgroup_procs
        .iter()
        .map(|p| {
            let fd = rustix::fs::open(
                p,
                rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )?;
            above(fd, 3)
        })
        .collect::<io::Result<Vec<OwnedFd>>>()?;
    let arg0 = i.argv.first().map_or("", String::as_str);
    if arg0.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the program name is empty",
        ));
    }
    let candidates: Vec<CString> = if arg0.contains('/') {
        vec![c_path(Path::new(arg0))?]
    } else {
        let path = i
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map_or(crate::process::DEFAULT_PATH, |(_, v)| v.as_str());
        path.split(':')
            .map(|dir| {
                let dir = if dir.is_empty() { "." } else { dir };
                c_path(&Path::new(dir).join(arg0))
            })
            .collect::<io::Result<_>>()?
    };
    let plan = ExecPlan::new(Path::new(arg0), i.argv, i.env, &[])?;
    let (report_r, report_w) = pipe(3)?;
    let stacks = if shared_memory {
        Some((Stack::take()?, Stack::take()?))
    } else {
        None
    };
    let mut ctx = InsideCtx {
        target: i.target,
        procs,
        cwd: c_path(i.cwd)?,
        streams,
        plan,
        candidates,
        report: report_w.as_raw_fd(),
        stack: stacks.as_ref().map(|(_, g)| g),
    };
    let mut args = CloneArgs {
        flags: libc::CLONE_VFORK as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    let blocked = Blocked::all()?;
    let ret = match &stacks {
        Some((relay, _)) => {
            args.flags |= libc::CLONE_VM as u64;
            relay.set(&mut args);
            // SAFETY: as in `clone_exec`: the relay runs `relay_entry(&mut ctx)` on its
            // stack in this address space while this thread is suspended (CLONE_VFORK)
            // until it exits; it and the command it clones (on the second stack, also
            // CLONE_VFORK) only read `ctx` and make system calls on memory built above:
            // no allocation, no lock, no return. Every signal is blocked here.
            unsafe {
                clone3_vm(
                    &mut args,
                    relay_entry,
                    (&mut ctx as *mut InsideCtx).cast::<libc::c_void>(),
                )
            }
        }
        // SAFETY: fork semantics (no CLONE_VM; CLONE_VFORK: this thread waits for the
        // relay's exit): the relay runs `relay_main` on its copy and never returns.
        None => match unsafe { crate::sys::clone3(&mut args) } {
            // SAFETY: see above; we are the relay.
            Ok(0) => unsafe { relay_main(&mut ctx) },
            Ok(pid) => i64::from(pid),
            Err(e) => -i64::from(e.raw_os_error().unwrap_or(libc::EIO)),
        },
    };
    drop(blocked);
    drop(ctx);
    if let Some((a, b)) = stacks {
        // The relay has exited and the command has exec'd or exited: both are free.
        a.give_back();
        b.give_back();
    }
    if ret < 0 {
        return Err(io::Error::from_raw_os_error(-ret as i32));
    }
    // The relay is gone (CLONE_VFORK): reaped here, nobody else sees it.
    let _ = crate::sys::reap_blocking(ret as u32);
    drop(report_w);
    // ORDER: every writer has written: the command before its exit (a failed step) or
    // never (its exec closed its copy), then the relay before its exit.
    let mut pid = None;
    let mut failed = None;
    let mut buf = [0u8; 15];
    let n = crate::sys::read_full(&report_r, &mut buf)?;
    for m in buf[..n].chunks_exact(5) {
        let v = i32::from_ne_bytes([m[1], m[2], m[3], m[4]]);
        match m[0] {
            b'P' => pid = Some(v as u32),
            _ => failed = Some(v),
        }
    }
    match (pid, failed) {
        (Some(pid), None) => Ok(pid),
        (pid, Some(e)) => {
            // A step failed; a command that failed before its exec has exited: reaped.
            if let Some(pid) = pid {
                let _ = crate::sys::reap_blocking(pid);
            }
            Err(io::Error::from_raw_os_error(e))
        }
        (None, None) => Err(io::Error::other(
            "the relay exited without starting the command",
        )),
    }
}

/// Writes a report message (see [`InsideCtx::report`]).
///
/// # Safety
/// In the relay or the command: one `write`.
unsafe fn report(fd: RawFd, tag: u8, value: i32) {
    let v = value.to_ne_bytes();
    let m = [tag, v[0], v[1], v[2], v[3]];
    // SAFETY: a write of a buffer on this stack.
    unsafe { libc::write(fd, m.as_ptr().cast(), m.len()) };
}

/// Reports errno `e` (EIO if none) under `tag` and exits 127: a failed step of the relay
/// or the command.
///
/// # Safety
/// As [`report`]; only in a process of [`spawn_inside_with`].
unsafe fn fail_with(fd: RawFd, tag: u8, e: i32) -> ! {
    // SAFETY: see the function's contract.
    unsafe {
        report(fd, tag, if e == 0 { libc::EIO } else { e });
        libc::_exit(127)
    }
}

/// The relay's first Rust frame on its own stack.
///
/// # Safety
/// Only as the entry of `clone3_vm` in [`spawn_inside_with`], with its `ctx`.
unsafe extern "C" fn relay_entry(arg: *mut libc::c_void) -> ! {
    // SAFETY: the spawner's `ctx`, alive and untouched while its thread is suspended.
    unsafe { relay_main(&mut *arg.cast::<InsideCtx>()) }
}

/// The relay (see [`spawn_inside`]).
///
/// # Safety
/// Only in the relay of [`spawn_inside_with`].
unsafe fn relay_main(c: &mut InsideCtx) -> ! {
    // SAFETY: system calls on descriptors and buffers of `c`, built before the clone.
    unsafe {
        let errno = || *libc::__errno_location();
        let report_fd = c.report;
        let fail = |e: i32| -> ! { fail_with(report_fd, b'R', e) };
        let t = c.target;
        if libc::setns(t.pidfd.as_raw_fd(), t.namespaces) != 0 {
            fail(errno());
        }
        for fd in &c.procs {
            if libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                fail(errno());
            }
        }
        // ORDER: after the cgroup writes (checked against the daemon's credentials,
        // which opened the files) and before chdir (made as the mapped uid). setns kept
        // the host ids, unmapped in there: take root inside and drop the daemon's
        // supplementary groups (root's group would still count on files).
        if t.namespaces & libc::CLONE_NEWUSER != 0
            && (libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) != 0
                || libc::syscall(libc::SYS_setresgid, 0u32, 0u32, 0u32) != 0
                || libc::syscall(libc::SYS_setresuid, 0u32, 0u32, 0u32) != 0)
        {
            fail(errno());
        }
        // Entering a mount namespace moved the working directory to its root.
        if libc::chdir(c.cwd.as_ptr()) != 0 {
            fail(errno());
        }
        // The command: a sibling, so the spawner's child (clone3 takes no exit signal
        // with CLONE_PARENT: the child gets ours, SIGCHLD), born in the instance's PID
        // namespace and cgroups.
        let mut args = CloneArgs {
            flags: (libc::CLONE_PARENT | libc::CLONE_VFORK) as u64,
            ..CloneArgs::default()
        };
        let pid = match c.stack {
            Some(stack) => {
                args.flags |= libc::CLONE_VM as u64;
                stack.set(&mut args);
                clone3_vm(
                    &mut args,
                    command_entry,
                    (c as *mut InsideCtx).cast::<libc::c_void>(),
                )
            }
            None => match crate::sys::clone3(&mut args) {
                Ok(0) => command_main(c),
                Ok(pid) => i64::from(pid),
                Err(e) => -i64::from(e.raw_os_error().unwrap_or(libc::EIO)),
            },
        };
        if pid < 0 {
            fail(-pid as i32);
        }
        // CLONE_VFORK: the command has exec'd or failed (and said so) by now.
        report(report_fd, b'P', pid as i32);
        libc::_exit(0)
    }
}

/// The command's first Rust frame on its own stack.
///
/// # Safety
/// Only as the entry of `clone3_vm` in [`relay_main`], with its `ctx`.
unsafe extern "C" fn command_entry(arg: *mut libc::c_void) -> ! {
    // SAFETY: the relay's `ctx`, alive while the relay is suspended.
    unsafe { command_main(&mut *arg.cast::<InsideCtx>()) }
}

/// The command's steps (see [`spawn_inside`]).
///
/// # Safety
/// Only in the command cloned by [`relay_main`].
unsafe fn command_main(c: &mut InsideCtx) -> ! {
    // SAFETY: system calls on descriptors and buffers of `c`, built before the clones.
    unsafe {
        let errno = || *libc::__errno_location();
        let report_fd = c.report;
        let fail = |e: i32| -> ! { fail_with(report_fd, b'C', e) };
        if let Err(e) = take_streams(&c.streams) {
            fail(e);
        }
        reset_signals();
        // Every descriptor above 2 goes (the daemon's, the cgroup files) but the report
        // pipe, which its exec closes.
        crate::sys::close_all_but([report_fd]);
        if crate::sys::cloexec_from(3).is_err() {
            fail(errno());
        }
        if c.target.restrict.apply().is_err() {
            fail(errno());
        }
        fail(c.plan.exec_first(&c.candidates))
    }
}

/// Puts the streams on 0-2 and makes the child lead its group, or its session.
///
/// # Safety
/// In a child between its clone and its exec.
unsafe fn take_streams(s: &Streams) -> Result<(), i32> {
    // SAFETY: dup2, setpgid, setsid, ioctl on descriptors the child owns.
    unsafe {
        let errno = || *libc::__errno_location();
        // dup2 clears close-on-exec on the copy; the sources are all above 2.
        if libc::dup2(s.stdin, 0) < 0 || libc::dup2(s.stdout, 1) < 0 || libc::dup2(s.stderr, 2) < 0
        {
            return Err(errno());
        }
        if s.session {
            // Its own session (so its own group), the terminal on 0 its controlling one.
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(errno());
            }
        } else if libc::setpgid(0, 0) != 0 {
            return Err(errno());
        }
        Ok(())
    }
}

/// Every handler back to the default (the spawner's must not run in the child), SIGPIPE
/// too (the Rust runtime ignores it); then nothing blocked.
///
/// # Safety
/// In a child between its clone and its exec.
unsafe fn reset_signals() {
    // SAFETY: sigaction and sigprocmask on structures on this stack.
    unsafe {
        for sig in 1..=libc::SIGRTMAX() {
            let mut sa: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut sa) != 0 {
                continue;
            }
            if sa.sa_sigaction != libc::SIG_DFL
                && (sa.sa_sigaction != libc::SIG_IGN || sig == libc::SIGPIPE)
            {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
}

/// The most bytes of a slot's hand-over (program, argv and environment, each ending in
/// NUL, after the header); a launch with more spawns cold.
pub const HANDOVER_MAX: usize = 128 * 1024;
/// The most strings (program, argv and environment together) of a hand-over.
pub const HANDOVER_STRINGS: usize = 4096;
/// The header of a hand-over: this tag, then the counts of argv and environment
/// strings (u32 each, native order).
pub const HANDOVER_TAG: u32 = u32::from_be_bytes(*b"bkho");
const HANDOVER_HEADER: usize = 12;
/// The header of a spare slot's hand-over ([`spare_handover_message`]): the steps a
/// pool's slot took when it was made come after the counts (see [`Wait::take_steps`]).
pub const HANDOVER_TAG_STEPS: u32 = u32::from_be_bytes(*b"bkhs");
/// Where the steps start, and their fixed part: flags (1: umask, 2: ids), umask, uid,
/// gid, the number of groups, of limits, the working directory's length with its NUL,
/// and two reserved words (u32 each, native order). Then the limits (resource, soft,
/// hard: u64 each), the groups (u32 each), the working directory, each part starting at
/// a multiple of 8.
const STEPS_AT: usize = HANDOVER_HEADER;
const STEPS_FIXED: usize = 36;
const STEP_UMASK: u32 = 1;
const STEP_IDS: u32 = 2;
/// At most this many limits (Linux has 16) and groups (`NGROUPS_MAX`) in a hand-over.
const STEPS_MAX_LIMITS: usize = 64;
const STEPS_MAX_GROUPS: usize = 65536;

fn align8(n: usize) -> usize {
    n.next_multiple_of(8)
}
const MAX_SOCKETS: usize = bulkhead_core::sockets::MAX_SOCKETS;

/// What a warm slot's child needs to take its program: the hand-over socket and the
/// room to read it into, all allocated before the clone.
struct Wait {
    fd: RawFd,
    buf: Vec<u8>,
    ptrs: Vec<*const libc::c_char>,
    fds: [RawFd; MAX_SOCKETS],
    tmp: [RawFd; MAX_SOCKETS],
}

impl Wait {
    /// Reads the hand-over (header, then program, argv and environment, each ending in
    /// NUL; the listening sockets attached), puts the sockets at 3.. and execs. Returns
    /// only on failure, with the errno; exits at once when the daemon's end closed first.
    ///
    /// # Safety
    /// Only in a slot's child (a copy of the address space, single-threaded): raw system
    /// calls on memory allocated before the clone, no allocation.
    unsafe fn receive_and_exec(&mut self, death_parent: Option<rustix::process::Pid>) -> i32 {
        // SAFETY: recvmsg into our buffers; the cmsg walk stays within what the kernel
        // wrote (CMSG_* check the lengths); dup2/execve on descriptors and pointers into
        // `buf`, which holds NUL-ended strings (checked below).
        unsafe {
            let mut control = [0u64; (64 + MAX_SOCKETS * 4) / 8];
            let mut iov = libc::iovec {
                iov_base: self.buf.as_mut_ptr().cast(),
                iov_len: self.buf.len(),
            };
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            let n = loop {
                let r = libc::recvmsg(self.fd, &mut msg, libc::MSG_CMSG_CLOEXEC);
                if r >= 0 || *libc::__errno_location() != libc::EINTR {
                    break r;
                }
            };
            if n < 0 {
                return *libc::__errno_location();
            }
            if n == 0 {
                // The daemon (or its slot) went before a launch took it.
                libc::_exit(0);
            }
            if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
                return libc::E2BIG;
            }
            let mut nfds = 0;
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                    let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..len / std::mem::size_of::<RawFd>() {
                        if nfds == MAX_SOCKETS {
                            return libc::E2BIG;
                        }
                        self.fds[nfds] = std::ptr::read_unaligned(data.add(i));
                        nfds += 1;
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
            let n = n as usize;
            if n < HANDOVER_HEADER {
                return libc::EBADMSG;
            }
            let word = |at: usize| {
                u32::from_ne_bytes([
                    self.buf[at],
                    self.buf[at + 1],
                    self.buf[at + 2],
                    self.buf[at + 3],
                ]) as usize
            };
            let (tag, argc, envc) = (word(0), word(4), word(8));
            let mut at = HANDOVER_HEADER;
            if tag == HANDOVER_TAG_STEPS as usize {
                match self.take_steps(n, death_parent) {
                    Ok(next) => at = next,
                    Err(e) => return e,
                }
            } else if tag != HANDOVER_TAG as usize {
                return libc::EBADMSG;
            }
            // The program, argc arguments, envc variables; two null ends.
            if argc == 0 || 1 + argc + envc > HANDOVER_STRINGS || 3 + argc + envc > self.ptrs.len()
            {
                return libc::EBADMSG;
            }
            // ptrs: [program, argv..., NULL, env..., NULL]
            let mut slot = 0;
            for i in 0..1 + argc + envc {
                let start = at;
                while at < n && self.buf[at] != 0 {
                    at += 1;
                }
                if at == n {
                    return libc::EBADMSG;
                }
                at += 1;
                self.ptrs[slot] = self.buf.as_ptr().add(start).cast();
                slot += 1;
                if i == argc {
                    self.ptrs[slot] = std::ptr::null();
                    slot += 1;
                }
            }
            self.ptrs[slot] = std::ptr::null();
            if let Err(e) = crate::listen::install(&self.fds[..nfds], &mut self.tmp[..nfds]) {
                return e;
            }
            let program = self.ptrs[0];
            libc::execve(
                program,
                self.ptrs.as_ptr().add(1),
                self.ptrs.as_ptr().add(argc + 2),
            );
            *libc::__errno_location()
        }
    }
}

impl Wait {
    /// A spare slot's steps, from the `n` bytes read (see [`HANDOVER_TAG_STEPS`]), taken
    /// in a cold spawn's order: umask, limits, groups, gid, uid, the working directory as
    /// the new user, then the parent-death signal again (a uid switch clears it). Returns
    /// where the strings start, or the errno of the failed step (`EBADMSG`: malformed).
    ///
    /// # Safety
    /// As [`Wait::receive_and_exec`]: in a slot's child, no allocation.
    unsafe fn take_steps(
        &self,
        n: usize,
        death_parent: Option<rustix::process::Pid>,
    ) -> Result<usize, i32> {
        let buf = &self.buf[..n];
        let word = |at: usize| u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        let long = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[at..at + 8]);
            u64::from_ne_bytes(b)
        };
        if n < STEPS_AT + STEPS_FIXED {
            return Err(libc::EBADMSG);
        }
        let flags = word(STEPS_AT);
        let (umask, uid, gid) = (word(STEPS_AT + 4), word(STEPS_AT + 8), word(STEPS_AT + 12));
        let ngroups = word(STEPS_AT + 16) as usize;
        let nlimits = word(STEPS_AT + 20) as usize;
        let cwd_len = word(STEPS_AT + 24) as usize;
        if nlimits > STEPS_MAX_LIMITS || ngroups > STEPS_MAX_GROUPS {
            return Err(libc::EBADMSG);
        }
        let limits_at = align8(STEPS_AT + STEPS_FIXED);
        let groups_at = limits_at + nlimits * 24;
        let cwd_at = align8(groups_at + ngroups * 4);
        let end = cwd_at + cwd_len;
        if cwd_len == 0 || end > n || buf[end - 1] != 0 {
            return Err(libc::EBADMSG);
        }
        let errno = || {
            // SAFETY: this thread's errno.
            unsafe { *libc::__errno_location() }
        };
        // SAFETY: system calls on plain values and on parts of `buf` checked above to lie
        // within what was read (the groups at a multiple of 4 of an allocation aligned
        // to 16; the directory ends in its NUL).
        unsafe {
            if flags & STEP_UMASK != 0 {
                libc::umask(umask as libc::mode_t);
            }
            for i in 0..nlimits {
                let at = limits_at + i * 24;
                let lim = libc::rlimit {
                    rlim_cur: long(at + 8),
                    rlim_max: long(at + 16),
                };
                if libc::setrlimit(long(at) as libc::__rlimit_resource_t, &lim) != 0 {
                    return Err(errno());
                }
            }
            if flags & STEP_IDS != 0 {
                // ORDER: groups and gid while still privileged, the uid last.
                let groups = buf.as_ptr().add(groups_at).cast::<libc::gid_t>();
                if libc::syscall(libc::SYS_setgroups, ngroups, groups) != 0
                    || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                    || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
                {
                    return Err(errno());
                }
            }
            // As the new user: a directory it may not enter fails the start.
            if libc::chdir(buf.as_ptr().add(cwd_at).cast()) != 0 {
                return Err(errno());
            }
            // ORDER: after the uid switch, which clears the parent-death signal.
            if let Some(parent) = death_parent {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(errno());
                }
                // RACE: as in `child_main`: a parent gone since refuses to run unseen.
                if libc::getppid() != parent.as_raw_nonzero().get() {
                    return Err(libc::ESRCH);
                }
            }
        }
        Ok(align8(end))
    }
}

/// What a warm slot's child is made with: every step of [`Spawn`] but the program.
pub(crate) struct SlotSpawn<'a> {
    pub cwd: &'a Path,
    pub cgroup: Option<&'a OwnedFd>,
    pub death_parent: Option<rustix::process::Pid>,
    pub setup: Option<crate::setup::Prepared>,
}

/// A warm slot's child: as [`Child`], and the other end of its hand-over socket.
#[derive(Debug)]
pub(crate) struct SlotChild {
    pub pid: u32,
    pub pidfd: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// Where the child first says whether its steps went through (four bytes: 0, or
    /// the errno of the failed step), then reads its hand-over ([`handover_message`]),
    /// then says the errno of a failed exec; a successful exec closes it.
    pub handover: OwnedFd,
}

/// Makes a warm slot's child: the steps of [`spawn`] (its group, stdio, cgroup, signals,
/// descriptors, setup, parent-death signal), then it waits on its hand-over socket
/// instead of exec'ing. It is a copy of the spawner's address space (no `CLONE_VM`: it
/// outlives this call), so a small spawner (the keeper) makes it; the hand-over's exec
/// drops the copy. Returns at once: the child's steps are reported on the socket.
pub(crate) fn spawn_slot(s: SlotSpawn<'_>) -> io::Result<SlotChild> {
    let cwd = c_path(s.cwd)?;
    let Stdio {
        devnull,
        out: (out_r, out_w),
        err: (err_r, err_w),
    } = Stdio::new()?;
    let (ours, theirs) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    // Above every place a socket goes (3..3+n), so that putting them there leaves it.
    let theirs = above(theirs, FIRST_FD + MAX_SOCKETS as RawFd)?;
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&theirs, 2 * HANDOVER_MAX);
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(&ours, 2 * HANDOVER_MAX);
    let mut ctx = Ctx {
        stdin: devnull.as_raw_fd(),
        out_w: out_w.as_raw_fd(),
        err_w: err_w.as_raw_fd(),
        session: false,
        // A failed step is said on the hand-over socket.
        fail_w: theirs.as_raw_fd(),
        errno: AtomicI32::new(0),
        cwd,
        setup: s.setup,
        death_parent: s.death_parent,
        plan: None,
        wait: Some(Wait {
            fd: theirs.as_raw_fd(),
            // Reserved, not touched: the child's pages are its own once it writes.
            buf: vec![0u8; HANDOVER_MAX],
            ptrs: vec![std::ptr::null(); HANDOVER_STRINGS + 3],
            fds: [-1; MAX_SOCKETS],
            tmp: [-1; MAX_SOCKETS],
        }),
    };
    let mut pidfd: RawFd = -1;
    let mut args = CloneArgs {
        flags: CLONE_PIDFD,
        pidfd: &mut pidfd as *mut RawFd as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    if let Some(cg) = s.cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = cg.as_raw_fd() as u64;
    }
    let blocked = Blocked::all()?;
    // SAFETY: fork semantics (no CLONE_VM, no stack, no CLONE_VFORK: this thread goes on
    // at once): the child runs `child_main` on its copy of the address space and never
    // returns; it allocates nothing (its buffers were made above). Every signal is
    // blocked around the clone, so no handler of ours runs in the child before it has
    // set them to their defaults.
    let ret = match unsafe { crate::sys::clone3(&mut args) } {
        // SAFETY: see above; we are the child.
        Ok(0) => unsafe { child_main(&mut ctx) },
        Ok(pid) => Ok(pid),
        Err(e) => Err(e),
    };
    drop(blocked);
    let pid = ret?;
    // SAFETY: CLONE_PIDFD stored a new descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    drop((out_w, err_w, devnull, theirs));
    Ok(SlotChild {
        pid,
        pidfd,
        stdout: out_r,
        stderr: err_r,
        handover: ours,
    })
}

/// A slot's hand-over message: `program`, `argv` (`argv[0]` first) and `env` (`KEY=value`
/// strings) after the header; for [`send_handover`] with at most `sockets` sockets.
/// Refused (nothing sent yet) when it does not fit a slot.
pub fn handover_message(
    program: &Path,
    argv: &[String],
    env: &[(String, String)],
    sockets: usize,
) -> io::Result<Vec<u8>> {
    handover(program, argv, env, sockets, None)
}

/// A spare slot's hand-over: as [`handover_message`], with the steps a pool's slot took
/// when it was made (`setup`: user, limits, umask and working directory; without, the
/// working directory `cwd` alone). Only a slot of a keeper that said it takes them
/// understands it.
pub fn spare_handover_message(
    program: &Path,
    argv: &[String],
    env: &[(String, String)],
    sockets: usize,
    setup: Option<&crate::setup::Prepared>,
    cwd: &Path,
) -> io::Result<Vec<u8>> {
    let cwd = match setup {
        Some(s) => s.cwd.clone(),
        None => c_path(cwd)?,
    };
    handover(program, argv, env, sockets, Some((setup, cwd)))
}

fn handover(
    program: &Path,
    argv: &[String],
    env: &[(String, String)],
    sockets: usize,
    steps: Option<(Option<&crate::setup::Prepared>, CString)>,
) -> io::Result<Vec<u8>> {
    let strings = 1 + argv.len() + env.len();
    if argv.is_empty() || strings > HANDOVER_STRINGS || sockets > MAX_SOCKETS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the hand-over has {} strings and {} sockets (at most {HANDOVER_STRINGS} and {MAX_SOCKETS})",
                strings, sockets
            ),
        ));
    }
    let mut msg = Vec::with_capacity(4096);
    let tag = if steps.is_some() {
        HANDOVER_TAG_STEPS
    } else {
        HANDOVER_TAG
    };
    msg.extend_from_slice(&tag.to_ne_bytes());
    msg.extend_from_slice(&(argv.len() as u32).to_ne_bytes());
    msg.extend_from_slice(&(env.len() as u32).to_ne_bytes());
    if let Some((setup, cwd)) = steps {
        put_steps(&mut msg, setup, &cwd)?;
    }
    let nul =
        |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("a NUL byte in {what}"));
    for s in
        std::iter::once(program.as_os_str().as_bytes()).chain(argv.iter().map(|a| a.as_bytes()))
    {
        if s.contains(&0) {
            return Err(nul("the command"));
        }
        msg.extend_from_slice(s);
        msg.push(0);
    }
    for (k, v) in env {
        if k.contains('\0') || v.contains('\0') {
            return Err(nul(&format!("environment variable {k}")));
        }
        msg.extend_from_slice(k.as_bytes());
        msg.push(b'=');
        msg.extend_from_slice(v.as_bytes());
        msg.push(0);
    }
    if msg.len() > HANDOVER_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the command and environment take {} bytes, more than a warm slot takes ({HANDOVER_MAX})",
                msg.len()
            ),
        ));
    }
    Ok(msg)
}

/// The steps of a spare slot's hand-over (see [`HANDOVER_TAG_STEPS`]).
fn put_steps(
    msg: &mut Vec<u8>,
    setup: Option<&crate::setup::Prepared>,
    cwd: &CString,
) -> io::Result<()> {
    let (mut flags, mut umask) = (0u32, 0u32);
    let (mut uid, mut gid, mut groups): (u32, u32, &[libc::gid_t]) = (0, 0, &[]);
    let mut limits: &[(libc::__rlimit_resource_t, libc::rlimit)] = &[];
    if let Some(s) = setup {
        if let Some(m) = s.umask {
            flags |= STEP_UMASK;
            umask = m;
        }
        if let Some((u, g, gs)) = &s.ids {
            flags |= STEP_IDS;
            (uid, gid, groups) = (*u, *g, gs);
        }
        limits = &s.rlimits;
    }
    if limits.len() > STEPS_MAX_LIMITS || groups.len() > STEPS_MAX_GROUPS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} limits and {} groups, more than a hand-over takes",
                limits.len(),
                groups.len()
            ),
        ));
    }
    let cwd = cwd.as_bytes_with_nul();
    for w in [
        flags,
        umask,
        uid,
        gid,
        groups.len() as u32,
        limits.len() as u32,
        cwd.len() as u32,
        0,
        0,
    ] {
        msg.extend_from_slice(&w.to_ne_bytes());
    }
    msg.resize(align8(msg.len()), 0);
    for (res, lim) in limits {
        for v in [*res as u64, lim.rlim_cur, lim.rlim_max] {
            msg.extend_from_slice(&v.to_ne_bytes());
        }
    }
    for g in groups {
        msg.extend_from_slice(&g.to_ne_bytes());
    }
    msg.resize(align8(msg.len()), 0);
    msg.extend_from_slice(cwd);
    msg.resize(align8(msg.len()), 0);
    Ok(())
}

/// Sends a [`handover_message`] with `listen` attached, in one message (the socket has
/// room for [`HANDOVER_MAX`] bytes).
pub fn send_handover(
    sock: std::os::fd::BorrowedFd<'_>,
    msg: &[u8],
    listen: &[std::os::fd::BorrowedFd<'_>],
) -> io::Result<()> {
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
    if !listen.is_empty() && !control.push(rustix::net::SendAncillaryMessage::ScmRights(listen)) {
        return Err(io::Error::other("too many sockets for one hand-over"));
    }
    let n = rustix::net::sendmsg(
        sock,
        &[std::io::IoSlice::new(msg)],
        &mut control,
        rustix::net::SendFlags::NOSIGNAL,
    )?;
    if n != msg.len() {
        return Err(io::Error::other("short write of the hand-over"));
    }
    Ok(())
}

fn kill_and_reap(pidfd: &OwnedFd, pid: u32) {
    let _ = crate::sys::pidfd_send_signal(pidfd, bulkhead_core::signal::Signal::KILL);
    let _ = crate::sys::reap_blocking(pid);
}

/// `clone3(args)` with `args.stack` set (and `CLONE_VM`): the child calls `f(arg)` on
/// that stack, which never returns. Returns the child's pid, or `-errno`.
///
/// A `clone3` with a new stack cannot return into Rust code in the child (its frame
/// lives on the parent's stack): the child's first instructions, here, call `f` instead.
/// The kernel starts the child with the parent's registers, `rax`/`x0` = 0 and the stack
/// pointer at the top of the new stack (16-byte aligned: the mapping is page-aligned).
///
/// # Safety
/// `f` must never return and must uphold the vfork-child contract (see [`spawn`]).
#[cfg(target_arch = "x86_64")]
pub unsafe fn clone3_vm(
    args: &mut CloneArgs,
    f: unsafe extern "C" fn(*mut libc::c_void) -> !,
    arg: *mut libc::c_void,
) -> i64 {
    let ret: i64;
    // SAFETY: per the contract; the syscall clobbers rcx and r11 (declared). In the
    // child, r12 and r13 still hold `arg` and `f` (registers are copied).
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") args as *mut CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") arg,
            in("r13") f,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// See the x86_64 version.
///
/// # Safety
/// As there.
#[cfg(target_arch = "aarch64")]
pub unsafe fn clone3_vm(
    args: &mut CloneArgs,
    f: unsafe extern "C" fn(*mut libc::c_void) -> !,
    arg: *mut libc::c_void,
) -> i64 {
    let ret: i64;
    // SAFETY: per the contract. In the child, x20 and x21 still hold `arg` and `f`.
    unsafe {
        std::arch::asm!(
            "svc 0",
            "cbnz x0, 2f",
            "mov x0, x20",
            "blr x21",
            "brk #1",
            "2:",
            inlateout("x0") args as *mut CloneArgs as i64 => ret,
            in("x1") std::mem::size_of::<CloneArgs>(),
            in("x8") libc::SYS_clone3,
            in("x20") arg,
            in("x21") f,
            options(nostack),
        );
    }
    ret
}

/// Not available here: callers check [`SHARED_MEMORY_SPAWN`] first.
///
/// # Safety
/// Never called.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub unsafe fn clone3_vm(
    _args: &mut CloneArgs,
    _f: unsafe extern "C" fn(*mut libc::c_void) -> !,
    _arg: *mut libc::c_void,
) -> i64 {
    unreachable!("shared-memory spawns are only made on x86_64 and aarch64")
}

/// The child's first Rust frame on its own stack.
///
/// # Safety
/// Only as `f` of [`clone3_vm`] from [`spawn`], with a `*mut Ctx`.
unsafe extern "C" fn child_entry(arg: *mut libc::c_void) -> ! {
    // SAFETY: `spawn` passes its `ctx`, alive (and untouched: its thread is suspended)
    // until the child has exec'd or exited.
    unsafe { child_main(&mut *arg.cast::<Ctx>()) }
}

/// The child's steps (see the module's documentation).
///
/// # Safety
/// Only in the child of the clone in [`spawn`] or [`spawn_slot`].
unsafe fn child_main(c: &mut Ctx) -> ! {
    // SAFETY: system calls on descriptors and buffers of `c`, in memory built before the
    // clone; `apply` and `exec` keep the same contract.
    unsafe {
        let fail = |errno: i32| -> ! {
            let errno = if errno == 0 { libc::EIO } else { errno };
            c.errno.store(errno, Ordering::SeqCst);
            if c.fail_w >= 0 {
                let b = errno.to_ne_bytes();
                libc::write(c.fail_w, b.as_ptr().cast(), b.len());
            }
            libc::_exit(127)
        };
        let errno = || *libc::__errno_location();
        let streams = Streams {
            stdin: c.stdin,
            stdout: c.out_w,
            stderr: c.err_w,
            session: c.session,
        };
        if let Err(e) = take_streams(&streams) {
            fail(e);
        }
        reset_signals();
        // Every descriptor above 2 (the spawner's sockets, pidfds, other instances'
        // pipes, anything inherited) goes but the failure pipe and the sockets to put
        // in place: the keeper's thousands would hold every number under a low
        // `nofile`, which `install` needs. What stays is closed by the exec.
        let mut keep = [-1; 1 + bulkhead_core::sockets::MAX_SOCKETS];
        keep[0] = c.fail_w;
        let sockets = c.plan.as_ref().map_or(&[][..], |p| p.sockets());
        for (k, fd) in keep[1..].iter_mut().zip(sockets) {
            *k = *fd;
        }
        crate::sys::close_all_but(keep);
        if let Err(e) = crate::sys::cloexec_from(3) {
            fail(e.raw_os_error().unwrap_or(libc::EIO));
        }
        match &c.setup {
            // umask, rlimits, groups/gid/uid, then chdir as the new user.
            Some(s) => {
                if let Err(e) = s.apply() {
                    fail(e.raw_os_error().unwrap_or(libc::EIO));
                }
            }
            None => {
                if libc::chdir(c.cwd.as_ptr()) != 0 {
                    fail(errno());
                }
            }
        }
        // ORDER: after the uid switch, which clears the parent-death signal.
        if let Some(parent) = c.death_parent {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                fail(errno());
            }
            // RACE: the parent may have died between the clone and prctl; then the death
            // signal will never come, so refuse to run unseen.
            if libc::getppid() != parent.as_raw_nonzero().get() {
                fail(libc::ESRCH);
            }
        }
        if let Some(w) = &mut c.wait {
            // A warm slot: every step is done; say so, then wait for the program. Named
            // for `ps -o comm` and top while it waits (its exec names it again).
            libc::prctl(libc::PR_SET_NAME, c"bulkhead-slot".as_ptr(), 0, 0, 0);
            let zero = 0i32.to_ne_bytes();
            if libc::send(w.fd, zero.as_ptr().cast(), zero.len(), libc::MSG_NOSIGNAL) < 0 {
                fail(errno());
            }
            // Only returns on failure.
            let e = w.receive_and_exec(c.death_parent);
            fail(e)
        }
        match &mut c.plan {
            // Only returns on failure.
            Some(plan) => fail(plan.exec()),
            None => fail(libc::EINVAL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;

    /// Each test runs both ways: with the memory shared (the default here) and as after
    /// a fork (the way of other architectures).
    const WAYS: [bool; 2] = [true, false];

    fn run(shared: bool, program: &str, argv: &[&str], cwd: &str) -> io::Result<(Child, String)> {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let env = vec![("PATH".to_string(), "/usr/bin:/bin".to_string())];
        let c = spawn_with(
            Spawn {
                program: Path::new(program),
                argv: &argv,
                env: &env,
                cwd: Path::new(cwd),
                cgroup: None,
                death_parent: None,
                setup: None,
                listen: &[],
            },
            shared,
        )?;
        let mut out = String::new();
        std::fs::File::from(c.stdout.try_clone()?).read_to_string(&mut out)?;
        crate::sys::reap_blocking(c.pid)?;
        Ok((c, out))
    }

    /// Reads one message of a slot's socket: its four bytes, or `None` at its end.
    fn said(sock: &OwnedFd) -> Option<i32> {
        let mut b = [0u8; 8];
        let (n, _) = rustix::net::recv(sock, &mut b, rustix::net::RecvFlags::empty()).unwrap();
        assert!(
            n == 0 || n == 4,
            "a slot says four bytes or nothing, not {n}"
        );
        (n == 4).then(|| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// How the child ended (reaped through its pidfd).
    fn status(pidfd: &OwnedFd) -> bulkhead_core::event::ExitStatus {
        loop {
            if let Some(s) = crate::sys::waitid_pidfd(pidfd).unwrap() {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn a_command_started_inside_an_instance_is_our_child_in_its_namespaces() {
        // The instance: a sleep in new mount and PID namespaces (PID 1 there). (A user
        // namespace is entered by the daemon's tests: `unshare` denies setgroups in its.)
        let mut inst = match std::process::Command::new("unshare")
            .args(["--mount", "--pid", "--fork", "--kill-child"])
            .args(["sleep", "100"])
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!("skipped: unshare: {e}");
                return;
            }
        };
        let start = std::time::Instant::now();
        let sleep = loop {
            let found = std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                (crate::sys::read_stat(pid).ok()?.ppid == inst.id()).then_some(pid)
            });
            if let Some(pid) = found {
                break pid;
            }
            assert!(start.elapsed().as_secs() < 30, "unshare never forked");
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        let target = crate::ExecTarget {
            pidfd: std::sync::Arc::new(crate::sys::pidfd_open(sleep).unwrap()),
            namespaces: libc::CLONE_NEWNS | libc::CLONE_NEWPID,
            cgroup_procs: Vec::new(),
            restrict: crate::restrict::Restrictions::default(),
        };
        let env = vec![("PATH".to_string(), "/usr/bin:/bin".to_string())];
        let argv: Vec<String> = ["sh", "-c", "echo $$ $(id -u) $(pwd); exit 3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for shared in WAYS {
            let devnull = above(std::fs::File::open("/dev/null").unwrap().into(), 3).unwrap();
            let (out_r, out_w) = pipe(3).unwrap();
            let pid = spawn_inside_with(
                Inside {
                    target: &target,
                    argv: &argv,
                    env: &env,
                    cwd: Path::new("/tmp"),
                },
                Streams {
                    stdin: devnull.as_raw_fd(),
                    stdout: out_w.as_raw_fd(),
                    stderr: out_w.as_raw_fd(),
                    session: false,
                },
                shared,
            )
            .unwrap();
            drop(out_w);
            let mut out = String::new();
            std::fs::File::from(out_r).read_to_string(&mut out).unwrap();
            let f: Vec<&str> = out.split_whitespace().collect();
            assert_eq!(f.len(), 3, "shared {shared}: {out:?}");
            assert_ne!(f[0], pid.to_string(), "its own PID namespace: {out:?}");
            assert_eq!(
                &f[1..],
                ["0", "/tmp"],
                "root inside, in its folder: {out:?}"
            );
            // Our child (CLONE_PARENT): reaped here, with its status.
            let pidfd = crate::sys::pidfd_open(pid).unwrap();
            assert_eq!(
                status(&pidfd),
                bulkhead_core::event::ExitStatus::Exited { code: 3 }
            );
            // A program that is not there inside: the error (the daemon-level test checks
            // that nothing is left behind: here other tests have children too).
            let missing = vec!["no-such-program-here".to_string()];
            let e = spawn_inside_with(
                Inside {
                    target: &target,
                    argv: &missing,
                    env: &env,
                    cwd: Path::new("/"),
                },
                Streams {
                    stdin: devnull.as_raw_fd(),
                    stdout: devnull.as_raw_fd(),
                    stderr: devnull.as_raw_fd(),
                    session: false,
                },
                shared,
            )
            .err()
            .unwrap();
            assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "shared {shared}: {e}");
        }
        let _ = inst.kill();
        let _ = inst.wait();
    }

    fn slot(cwd: &str) -> SlotChild {
        spawn_slot(SlotSpawn {
            cwd: Path::new(cwd),
            cgroup: None,
            death_parent: None,
            setup: None,
        })
        .unwrap()
    }

    #[test]
    fn a_slot_waits_then_execs_what_it_is_handed_with_its_sockets() {
        let c = slot("/tmp");
        assert_eq!(said(&c.handover), Some(0), "the steps went through");
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", c.pid)).unwrap();
        assert_eq!(comm, "bulkhead-slot\n", "named while it waits");
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let argv: Vec<String> = ["sh", "-c", "echo \"$A $(pwd)\"; ls -l /proc/self/fd/3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let env = vec![
            ("A".to_string(), "handed over".to_string()),
            ("PATH".to_string(), "/usr/bin:/bin".to_string()),
        ];
        let msg = handover_message(Path::new("/bin/sh"), &argv, &env, 1).unwrap();
        send_handover(c.handover.as_fd(), &msg, &[l.as_fd()]).unwrap();
        assert_eq!(
            said(&c.handover),
            None,
            "a successful exec closes the socket"
        );
        let mut out = String::new();
        std::fs::File::from(c.stdout.try_clone().unwrap())
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(
            status(&c.pidfd),
            bulkhead_core::event::ExitStatus::Exited { code: 0 }
        );
        assert!(out.starts_with("handed over /tmp\n"), "{out}");
        assert!(
            out.contains("socket:"),
            "the socket is at 3: {out} (port {port})"
        );
    }

    /// A spare slot is made in `/` with no setup; its hand-over carries the steps a
    /// pool's slot took when made.
    fn spare_run(
        setup: Option<&crate::setup::ChildSetup>,
        cwd: &str,
        script: &str,
    ) -> (Option<i32>, String) {
        let c = slot("/");
        assert_eq!(said(&c.handover), Some(0));
        let prepared = setup.map(|s| s.prepare(Path::new(cwd)).unwrap());
        let argv: Vec<String> = ["sh", "-c", script].iter().map(|s| s.to_string()).collect();
        let env = vec![("PATH".to_string(), "/usr/bin:/bin".to_string())];
        let msg = spare_handover_message(
            Path::new("/bin/sh"),
            &argv,
            &env,
            0,
            prepared.as_ref(),
            Path::new(cwd),
        )
        .unwrap();
        send_handover(c.handover.as_fd(), &msg, &[]).unwrap();
        let word = said(&c.handover);
        let mut out = String::new();
        std::fs::File::from(c.stdout.try_clone().unwrap())
            .read_to_string(&mut out)
            .unwrap();
        let _ = status(&c.pidfd);
        (word, out)
    }

    #[test]
    fn a_spare_slot_takes_the_working_directory_user_limits_and_umask_at_its_hand_over() {
        // The working directory alone (a workload without `user:`, limits or umask).
        let (word, out) = spare_run(None, "/tmp", "pwd");
        assert_eq!(word, None, "exec'd");
        assert_eq!(out, "/tmp\n");
        let setup = crate::setup::ChildSetup {
            credentials: None,
            limits: vec![crate::setup::LimitSetting {
                name: "nofile".into(),
                soft: Some(123),
                hard: Some(456),
            }],
            umask: Some(0o027),
        };
        let (word, out) = spare_run(Some(&setup), "/usr", "pwd; umask; ulimit -n; ulimit -Hn");
        assert_eq!(word, None);
        assert_eq!(out, "/usr\n0027\n123\n456\n");
        // Another user, with its groups: only where this test may switch users.
        if rustix::process::geteuid().is_root() {
            let setup = crate::setup::ChildSetup {
                credentials: Some(crate::setup::Credentials {
                    uid: 65534,
                    gid: 65534,
                    groups: vec![65534, 4242],
                }),
                limits: vec![],
                umask: None,
            };
            let (word, out) = spare_run(Some(&setup), "/", "id -u; id -g; id -G");
            assert_eq!(word, None);
            assert_eq!(out, "65534\n65534\n65534 4242\n");
            // A directory the new user may not enter fails the start, as a cold spawn.
            let dir = tempfile::tempdir().unwrap();
            std::fs::set_permissions(
                dir.path(),
                std::os::unix::fs::PermissionsExt::from_mode(0o700),
            )
            .unwrap();
            let (word, _) = spare_run(Some(&setup), dir.path().to_str().unwrap(), "true");
            assert_eq!(word, Some(libc::EACCES));
        } else {
            eprintln!("skipped the user switch: not root");
        }
        // A working directory that does not exist: its errno, no program.
        let (word, out) = spare_run(None, "/nonexistent/dir", "echo ran");
        assert_eq!(word, Some(libc::ENOENT));
        assert_eq!(out, "");
    }

    #[test]
    fn a_slot_says_why_its_exec_failed_and_a_closed_end_ends_it() {
        let c = slot("/");
        assert_eq!(said(&c.handover), Some(0));
        let msg = handover_message(
            Path::new("/nonexistent/program"),
            &["program".into()],
            &[],
            0,
        )
        .unwrap();
        send_handover(c.handover.as_fd(), &msg, &[]).unwrap();
        assert_eq!(said(&c.handover), Some(libc::ENOENT));
        assert_eq!(
            status(&c.pidfd),
            bulkhead_core::event::ExitStatus::Exited { code: 127 }
        );
        // A slot nobody takes: its daemon's end closes, and it exits by itself.
        let c = slot("/");
        assert_eq!(said(&c.handover), Some(0));
        drop(c.handover);
        assert_eq!(
            status(&c.pidfd),
            bulkhead_core::event::ExitStatus::Exited { code: 0 }
        );
        // A step that fails is said first (no such working directory).
        let c = slot("/nonexistent/dir");
        assert_eq!(said(&c.handover), Some(libc::ENOENT));
        assert_eq!(
            status(&c.pidfd),
            bulkhead_core::event::ExitStatus::Exited { code: 127 }
        );
    }

    #[test]
    fn a_hand_over_too_large_or_with_a_nul_is_refused_before_it_is_sent() {
        let big = vec![("X".to_string(), "y".repeat(HANDOVER_MAX))];
        let e = handover_message(Path::new("/bin/true"), &["true".into()], &big, 0).unwrap_err();
        assert!(e.to_string().contains("more than a warm slot takes"), "{e}");
        let e = handover_message(Path::new("/bin/true"), &["t\0".into()], &[], 0).unwrap_err();
        assert!(e.to_string().contains("NUL"), "{e}");
        let e = handover_message(Path::new("/bin/true"), &[], &[], 0).unwrap_err();
        assert!(e.to_string().contains("strings"), "{e}");
        let e = handover_message(Path::new("/bin/true"), &["t".into()], &[], 17).unwrap_err();
        assert!(e.to_string().contains("sockets"), "{e}");
    }

    /// The mask of `/proc/self/status`'s line `key` (hex), as the program sees it.
    fn mask(status: &str, key: &str) -> u64 {
        let line = status.lines().find_map(|l| l.strip_prefix(key)).unwrap();
        u64::from_str_radix(line.trim(), 16).unwrap()
    }

    #[test]
    fn the_program_starts_with_no_signal_blocked_and_sigpipe_at_its_default() {
        for shared in WAYS {
            // The Rust runtime ignores SIGPIPE in this process, and the spawning thread blocks
            // every signal during the clone: neither reaches the program.
            let (_, status) = run(shared, "/bin/cat", &["cat", "/proc/self/status"], "/").unwrap();
            assert_eq!(mask(&status, "SigBlk:"), 0, "{status}");
            assert_eq!(
                mask(&status, "SigIgn:") & (1 << (libc::SIGPIPE - 1)),
                0,
                "{status}"
            );
            // And this thread has its own mask back.
            // SAFETY: reads this thread's mask into a zeroed sigset_t.
            let blocked = unsafe {
                let mut cur: libc::sigset_t = std::mem::zeroed();
                libc::pthread_sigmask(libc::SIG_SETMASK, std::ptr::null(), &mut cur);
                libc::sigismember(&cur, libc::SIGTERM)
            };
            assert_eq!(blocked, 0);
        }
    }

    #[test]
    fn the_program_runs_in_its_own_group_in_its_directory_with_its_output_piped() {
        for shared in WAYS {
            let (c, out) = run(
                shared,
                "/bin/sh",
                &[
                    "sh",
                    "-c",
                    "pwd; ps -o pgid= -p $$ 2>/dev/null || cut -d' ' -f5 /proc/$$/stat",
                ],
                "/tmp",
            )
            .unwrap();
            let mut lines = out.lines();
            assert_eq!(lines.next(), Some("/tmp"), "{out}");
            assert_eq!(
                lines.next().map(str::trim),
                Some(c.pid.to_string().as_str()),
                "{out}"
            );
        }
    }

    #[test]
    fn a_low_nofile_holds_with_sockets_while_the_spawner_holds_more_descriptors() {
        // The control: this process holds far more than the limit (a keeper holds two per
        // instance), so a child that kept them could not put its sockets in place.
        let held: Vec<std::fs::File> = (0..64)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        assert!(std::fs::read_dir("/proc/self/fd").unwrap().count() > 64);
        let sock = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let listen = [ListenFd {
            name: "web".into(),
            fd: std::sync::Arc::new(OwnedFd::from(sock)),
        }];
        let setup = crate::setup::ChildSetup {
            limits: vec![crate::setup::LimitSetting {
                name: "nofile".into(),
                soft: Some(8),
                hard: Some(8),
            }],
            ..Default::default()
        };
        for shared in WAYS {
            let argv: Vec<String> = [
                "sh",
                "-c",
                "ulimit -n; echo $LISTEN_FDS; readlink /proc/self/fd/3",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let env = vec![("PATH".to_string(), "/usr/bin:/bin".to_string())];
            let c = spawn_with(
                Spawn {
                    program: Path::new("/bin/sh"),
                    argv: &argv,
                    env: &env,
                    cwd: Path::new("/"),
                    cgroup: None,
                    death_parent: None,
                    setup: Some(setup.prepare(Path::new("/")).unwrap()),
                    listen: &listen,
                },
                shared,
            )
            .unwrap();
            let mut out = String::new();
            std::fs::File::from(c.stdout.try_clone().unwrap())
                .read_to_string(&mut out)
                .unwrap();
            crate::sys::reap_blocking(c.pid).unwrap();
            let mut lines = out.lines();
            assert_eq!(lines.next(), Some("8"), "{out}");
            assert_eq!(lines.next(), Some("1"), "{out}");
            assert!(
                lines.next().is_some_and(|l| l.starts_with("socket:")),
                "{out}"
            );
        }
        drop(held);
    }

    #[test]
    fn a_failed_exec_or_step_is_its_errno() {
        for shared in WAYS {
            let e = run(shared, "/nonexistent/program", &["x"], "/").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
            let e = run(shared, "/bin/true", &["true"], "/nonexistent-dir").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        }
    }
}
