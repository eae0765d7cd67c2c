//! Reaping as a subreaper without stealing anyone's exit status.
//!
//! # Why
//!
//! The daemon parents every instance. When an instance's process forks and the
//! intermediate parent exits, the grandchild is an orphan; with
//! `PR_SET_CHILD_SUBREAPER` ([`sys::set_child_subreaper`]) it is re-parented to the daemon
//! instead of to PID 1, and when it exits it stays a zombie until the daemon reaps it. The
//! same holds when the daemon *is* PID 1 (`bulkhead serve` in a container): every orphan
//! of the PID namespace comes to it.
//!
//! The daemon also has children that somebody waits for: each instance's main process
//! (the process driver reaps it through its pidfd, and its exit status is the instance's),
//! readiness and liveness `exec` probes, and `bulkhead exec` commands. A reaper that
//! collects "any child" (`waitpid(-1)`) would take those statuses away from their owners.
//!
//! # Design: an owned-pid registry
//!
//! - [`Registry`] holds the pids of the children somebody will wait for (a count per pid,
//!   so an unregister that comes after a pid was reused cannot drop the new owner).
//! - A spawner takes [`Registry::lock`] *before* it spawns and registers the new pid
//!   *before* it lets go of the lock ([`SpawnLock::register`]). While the lock is held the
//!   reaper cannot run, so a child that exits at once is never mistaken for an orphan.
//! - An owner reaps its child itself (by pidfd or by pid), then calls
//!   [`Registry::unregister`]. Never before: once unregistered, the reaper may take it.
//! - The reaper ([`run`], started by the daemon) wakes on `SIGCHLD` (and every
//!   [`SAFETY_SCAN`], in case a scan raced an exit), and [`Registry::reap_orphans`]:
//!   1. `waitid(P_ALL, WEXITED | WNOHANG | WNOWAIT)` ([`sys::any_child_exited`]): does any
//!      child wait to be reaped? Usually not, and that costs one system call.
//!   2. If one does: list this process's zombie children from `/proc`
//!      ([`sys::zombie_children`]; `/proc/<pid>/task/<tid>/children` would be cheaper but
//!      needs `CONFIG_PROC_CHILDREN`). `WNOWAIT` alone cannot tell *which*: the kernel keeps
//!      reporting the same first zombie, and while that one is owned (its owner has not
//!      run yet) the rest would stay hidden behind it.
//!   3. Under the registry lock, `waitid(P_PID, pid, WEXITED | WNOHANG)` each listed pid
//!      that is not registered.
//!
//! **Invariant — no exit status is stolen**: the reaper calls `waitid` only on a pid that,
//! under the lock, nobody has registered; every spawner registers under the same lock
//! before its child can be seen, and unregisters only after it has reaped.
//!
//! Every piece of code in the process that spawns a child and waits for it must go through
//! the registry: [`spawn`] (a [`Child`] reaped through its pidfd) or, for code with its own
//! reaping (the process driver), [`Registry::lock`] + [`Registry::unregister`]. A plain
//! `std::process::Command::status()` or `tokio::process` elsewhere in a process that runs
//! the reaper may lose its status (`ECHILD`). That is why the reaper is opt-in for a process
//! that embeds the daemon (`Config::reap_orphans`); `bulkhead serve` turns it on.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bulkhead_core::event::ExitStatus;
use bulkhead_core::signal::Signal;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::sys;

/// How often the reaper looks for orphans without having been woken by `SIGCHLD`.
pub const SAFETY_SCAN: Duration = Duration::from_secs(10);

/// The pids of children that somebody will reap; see the [module documentation](self).
#[derive(Debug, Default)]
pub struct Registry {
    /// pid -> how many owners registered it (1 but for pid reuse; see `unregister`).
    owned: Mutex<BTreeMap<u32, u32>>,
}

static GLOBAL: Registry = Registry::new();

impl Registry {
    pub const fn new() -> Registry {
        Registry {
            owned: Mutex::new(BTreeMap::new()),
        }
    }

    /// The registry of this process: the one every spawner and the reaper use.
    pub fn global() -> &'static Registry {
        &GLOBAL
    }

    fn owned(&self) -> MutexGuard<'_, BTreeMap<u32, u32>> {
        // Every critical section leaves the map consistent: ignore poisoning.
        self.owned.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the lock a spawner holds across its spawn and the registration of the new
    /// pid. Hold it only for that: the reaper waits for it.
    pub fn lock(&self) -> SpawnLock<'_> {
        SpawnLock {
            owned: self.owned(),
        }
    }

    /// Gives up ownership of `pid`, after its owner has reaped it.
    pub fn unregister(&self, pid: u32) {
        let mut owned = self.owned();
        if let Some(n) = owned.get_mut(&pid) {
            // RACE: between our reap and this call the pid may have been reused by a new
            // child that was registered again: the count keeps that registration.
            *n -= 1;
            if *n == 0 {
                owned.remove(&pid);
            }
        }
    }

    /// Whether somebody owns `pid`.
    pub fn is_owned(&self, pid: u32) -> bool {
        self.owned().contains_key(&pid)
    }

    /// Reaps every exited child of this process that nobody owns; returns them with
    /// their statuses. Never blocks on a live child.
    pub fn reap_orphans(&self) -> Vec<(u32, ExitStatus)> {
        match sys::any_child_exited() {
            Ok(true) => {}
            Ok(false) => return Vec::new(),
            Err(e) => {
                tracing::warn!("cannot check for exited children: {e}");
                return Vec::new();
            }
        }
        // The list may be stale by the time we hold the lock; that is fine: a pid is
        // reaped only if, under the lock, it is unowned, and `waitid(P_PID)` on a pid that
        // is not our exited child returns `None` or `ECHILD`.
        let zombies = sys::zombie_children(std::process::id());
        let owned = self.owned();
        let mut reaped = Vec::new();
        for pid in zombies {
            if owned.contains_key(&pid) {
                continue;
            }
            match sys::waitid_pid(pid) {
                Ok(Some(status)) => reaped.push((pid, status)),
                Ok(None) => {}
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {}
                Err(e) => tracing::warn!("cannot reap orphan {pid}: {e}"),
            }
        }
        reaped
    }
}

/// The spawn lock, held across one spawn; see [`Registry::lock`].
pub struct SpawnLock<'a> {
    owned: MutexGuard<'a, BTreeMap<u32, u32>>,
}

impl SpawnLock<'_> {
    /// Registers the child just spawned: the reaper leaves it to its owner, who must call
    /// [`Registry::unregister`] after reaping it.
    pub fn register(&mut self, pid: u32) {
        *self.owned.entry(pid).or_insert(0) += 1;
    }
}

/// The reaper: reaps orphans on every `SIGCHLD` and every [`SAFETY_SCAN`], until the task
/// is aborted. The process should be a subreaper ([`sys::set_child_subreaper`]) or PID 1.
pub async fn run(registry: &'static Registry) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigchld = match signal(SignalKind::child()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(
                "cannot handle SIGCHLD ({e}); reaping orphans every {} s only",
                SAFETY_SCAN.as_secs()
            );
            None
        }
    };
    let mut tick = tokio::time::interval(SAFETY_SCAN);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // The first tick completes at once: orphans from before the start are reaped.
        tokio::select! {
            _ = tick.tick() => {}
            Some(()) = async {
                match sigchld.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        // RACE: a child that exits while we scan sends a new SIGCHLD, which the signal
        // stream keeps: the next recv returns at once and we scan again.
        for (pid, status) in registry.reap_orphans() {
            tracing::debug!(pid, %status, "reaped orphan");
        }
    }
}

/// Makes this process a child subreaper ([`sys::set_child_subreaper`]) and starts [`run`]
/// on the current tokio runtime with the [global](Registry::global) registry. The task
/// stops when the returned handle drops.
pub fn start() -> io::Result<ReaperTask> {
    sys::set_child_subreaper()?;
    Ok(ReaperTask(tokio::spawn(run(Registry::global()))))
}

/// The running reaper task; aborted on drop. (The subreaper attribute stays: orphans
/// that arrive afterwards wait as zombies until the process exits.)
#[derive(Debug)]
pub struct ReaperTask(tokio::task::JoinHandle<()>);

impl Drop for ReaperTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Spawns `cmd` as an owned child of the [global](Registry::global) registry, leading a
/// new process group (`process_group(0)` is set on `cmd`).
///
/// The returned [`Child`] reaps through a pidfd; the parent's ends of the pipes `cmd` asked
/// for (`Stdio::piped()`) come back as [`SpawnedChild::stdin`], `stdout` and `stderr`.
pub fn spawn(cmd: &mut Command) -> io::Result<SpawnedChild> {
    cmd.process_group(0);
    spawn_leader(cmd)
}

/// Like [`spawn`], but leaves the process group to `cmd`, which must make the child lead
/// one (for example `setsid()` in a `pre_exec` hook, for a child that needs its own
/// session and controlling terminal): [`Child`] signals the group named by its pid.
pub fn spawn_leader(cmd: &mut Command) -> io::Result<SpawnedChild> {
    // SAFETY: the hook runs in the child between fork and exec and makes one raw system
    // call (close_range), no allocation, no lock. Registered last, so it runs after the
    // caller's hooks.
    unsafe {
        // Every descriptor above 2 is closed by the exec: the child gets its three
        // standard streams and nothing the daemon inherited or opened. Marked rather
        // than closed: std's exec-status pipe must live until the exec itself.
        cmd.pre_exec(|| sys::cloexec_from(3));
    }
    let registry = Registry::global();
    let mut lock = registry.lock();
    // RACE: the lock is held from before the spawn until the pid is registered. A child
    // that exits at once is a zombie the reaper could otherwise see, find unowned and
    // reap, and its status would be lost to us.
    let mut child = cmd.spawn()?;
    let pid = child.id();
    lock.register(pid);
    drop(lock);
    let stdin = child.stdin.take().map(OwnedFd::from);
    let stdout = child.stdout.take().map(OwnedFd::from);
    let stderr = child.stderr.take().map(OwnedFd::from);
    // Dropping a std Child neither kills nor reaps it: `Child` reaps through the pidfd.
    drop(child);
    watch(pid, registry, stdin, stdout, stderr)
}

/// The owned child `pid` (registered, unreaped), watched through a pidfd.
fn watch(
    pid: u32,
    registry: &'static Registry,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
) -> io::Result<SpawnedChild> {
    owned(pid, sys::pidfd_open(pid), registry, stdin, stdout, stderr)
}

/// The owned child `pid` (registered, unreaped) with its pidfd.
fn owned(
    pid: u32,
    pidfd: io::Result<OwnedFd>,
    registry: &'static Registry,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
) -> io::Result<SpawnedChild> {
    let watched = pidfd.and_then(|fd| {
        // SAFETY: the AsyncFd takes ownership of the OwnedFd: the descriptor stays open
        // and the same until the AsyncFd drops.
        unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
    });
    match watched {
        Ok(pidfd) => Ok(SpawnedChild {
            child: Child {
                pid,
                pidfd: Some(pidfd),
                registry,
            },
            stdin,
            stdout,
            stderr,
        }),
        Err(e) => {
            // Our unreaped child: its pid and group cannot have been reused.
            let _ = sys::kill_group(pid, Signal::KILL);
            let _ = sys::reap_blocking(pid);
            registry.unregister(pid);
            Err(io::Error::new(
                e.kind(),
                format!("cannot watch child {pid}: {e}"),
            ))
        }
    }
}

/// What [`spawn_command`] gives a command for its standard streams.
pub enum CommandIo {
    /// `/dev/null` for all three.
    Null,
    /// Pipes: the parent's ends come back in [`SpawnedChild`].
    Pipes,
    /// A terminal's slave side for all three: the command starts a session with it as
    /// its controlling terminal (so it leads its group).
    Terminal(OwnedFd),
}

/// A command for [`spawn_command`].
pub struct CommandSpec<'a> {
    /// The command line, `argv[0]` first: a name with a `/` is used as it is, a bare one
    /// is looked up in the `PATH` of `env` (as the process driver does).
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    pub cwd: &'a std::path::Path,
    /// The user, groups, limits and umask to take before the exec (the working directory
    /// is then entered as that user). Not with `inside`, which has its own.
    pub setup: Option<crate::setup::Prepared>,
    /// A walled instance to run the command in: its namespaces and cgroups, its own
    /// restrictions; `argv[0]` and `cwd` are then found inside.
    pub inside: Option<&'a crate::ExecTarget>,
    pub io: CommandIo,
}

/// Spawns a command that is not an instance's main process (an exec probe, a `bulkhead
/// exec` on the host) as an owned child of the [global](Registry::global) registry,
/// leading its own process group (or session, with [`CommandIo::Terminal`]), without
/// copying this process: the child runs in this memory until its exec, as the process
/// driver spawns (`clone3(CLONE_VM | CLONE_VFORK)`, see `clone_spawn`), where `Command`
/// with a `pre_exec` hook (which [`spawn`] adds) forks and copies the daemon's page
/// tables on every probe. Signals, descriptors above 2 and the setup are handled as for
/// an instance's spawn.
pub fn spawn_command(c: CommandSpec<'_>) -> io::Result<SpawnedChild> {
    use crate::clone_spawn::{above, pipe, Spawn, Streams};
    use std::os::fd::AsRawFd;
    let arg0 = c.argv.first().map_or("", String::as_str);
    // Inside an instance the program is looked up there, by the command itself.
    let program = match c.inside {
        Some(_) => std::path::PathBuf::new(),
        None => crate::process::resolve_program(arg0, c.env, c.cwd)?,
    };
    let null = || -> io::Result<OwnedFd> {
        let fd = rustix::fs::open(
            "/dev/null",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        above(fd, 3)
    };
    // The child's ends (dropped here once it has exec'd), and the parent's.
    let mut child_ends: Vec<OwnedFd> = Vec::new();
    let (mut stdin, mut stdout, mut stderr) = (None, None, None);
    let streams = match c.io {
        CommandIo::Null => {
            let n = null()?;
            let fd = n.as_raw_fd();
            child_ends.push(n);
            Streams {
                stdin: fd,
                stdout: fd,
                stderr: fd,
                session: false,
            }
        }
        CommandIo::Pipes => {
            let (in_r, in_w) = pipe(3)?;
            let (out_r, out_w) = pipe(3)?;
            let (err_r, err_w) = pipe(3)?;
            let streams = Streams {
                stdin: in_r.as_raw_fd(),
                stdout: out_w.as_raw_fd(),
                stderr: err_w.as_raw_fd(),
                session: false,
            };
            child_ends.extend([in_r, out_w, err_w]);
            (stdin, stdout, stderr) = (Some(in_w), Some(out_r), Some(err_r));
            streams
        }
        CommandIo::Terminal(slave) => {
            let slave = above(slave, 3)?;
            let fd = slave.as_raw_fd();
            child_ends.push(slave);
            Streams {
                stdin: fd,
                stdout: fd,
                stderr: fd,
                session: true,
            }
        }
    };
    let registry = Registry::global();
    let mut lock = registry.lock();
    // RACE: as in `spawn_leader`: registered before the reaper can look.
    let (pid, pidfd) = match c.inside {
        Some(target) => {
            let pid = crate::clone_spawn::spawn_inside(
                crate::clone_spawn::Inside {
                    target,
                    argv: c.argv,
                    env: c.env,
                    cwd: c.cwd,
                },
                streams,
            )?;
            // Our unreaped child (CLONE_PARENT): its pid cannot have been reused.
            (pid, sys::pidfd_open(pid))
        }
        None => {
            let (pid, pidfd) = crate::clone_spawn::spawn_given(
                Spawn {
                    program: &program,
                    argv: c.argv,
                    env: c.env,
                    cwd: c.cwd,
                    cgroup: None,
                    death_parent: None,
                    setup: c.setup,
                    listen: &[],
                },
                streams,
            )?;
            (pid, Ok(pidfd))
        }
    };
    lock.register(pid);
    drop(lock);
    drop(child_ends);
    owned(pid, pidfd, registry, stdin, stdout, stderr)
}

/// A child started by [`spawn`], with the read/write ends of the pipes it was given.
pub struct SpawnedChild {
    pub child: Child,
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// An owned child, leader of its own process group, reaped through its pidfd.
///
/// Dropped before it was reaped, it kills its whole process group with SIGKILL and reaps
/// the leader in a background task (or, outside a runtime, leaves it to the reaper).
pub struct Child {
    pid: u32,
    /// `None` once reaped.
    pidfd: Option<AsyncFd<OwnedFd>>,
    registry: &'static Registry,
}

impl Child {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Resolves when the leader has exited, without reaping it: until [`Child::wait`], its
    /// pid and process group still name our processes. At once if already reaped.
    pub async fn exited(&self) {
        if let Some(fd) = &self.pidfd {
            // Readable never goes back for an exited process; an error means the reactor
            // is gone, and `wait` will find out.
            let _ = fd.readable().await;
        }
    }

    /// Sends `signal` to every process of the child's group. A no-op once reaped (the
    /// group's number could then be reused).
    pub fn signal_group(&self, signal: Signal) -> io::Result<()> {
        if self.pidfd.is_none() {
            return Ok(());
        }
        sys::kill_group(self.pid, signal)
    }

    /// Waits for the leader to exit and reaps it. Cancel-safe: the reap happens in one
    /// poll. A second call after success is an error (`ECHILD`).
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            let Some(fd) = &self.pidfd else {
                return Err(io::Error::from_raw_os_error(libc::ECHILD));
            };
            let mut ready = fd.readable().await?;
            match sys::waitid_pidfd(fd.get_ref()) {
                Ok(Some(status)) => {
                    self.reaped();
                    return Ok(status);
                }
                Ok(None) => ready.clear_ready(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.reaped();
                    return Err(e);
                }
            }
        }
    }

    fn reaped(&mut self) {
        self.pidfd = None;
        self.registry.unregister(self.pid);
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let Some(fd) = self.pidfd.take() else {
            return;
        };
        // Unreaped: the group's number is still ours.
        if let Err(e) = sys::kill_group(self.pid, Signal::KILL) {
            tracing::warn!("cannot kill process group {}: {e}", self.pid);
        }
        let (pid, registry) = (self.pid, self.registry);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let mut child = Child {
                        pid,
                        pidfd: Some(fd),
                        registry,
                    };
                    if let Err(e) = child.wait().await {
                        tracing::warn!("cannot reap child {pid}: {e}");
                    }
                });
            }
            // Nobody will wait for it: the reaper may take it.
            Err(_) => registry.unregister(pid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    /// The tests that reap reap every unowned child of the test process: one at a time.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn serial() -> MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tests that reap hold [`SERIAL`]; the async ones run on their own runtime inside it.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn sh(script: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.args(["-c", script]).stdin(Stdio::null());
        c
    }

    /// Waits (bounded) until `pid` is a zombie.
    fn until_zombie(pid: u32) {
        let start = std::time::Instant::now();
        while !sys::read_stat(pid).map(|s| s.is_zombie()).unwrap_or(false) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{pid} never exited"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn command(script: &str, io: CommandIo) -> io::Result<SpawnedChild> {
        let argv: Vec<String> = ["sh", "-c", script].iter().map(|s| s.to_string()).collect();
        let env = vec![("PATH".to_string(), "/usr/bin:/bin".to_string())];
        spawn_command(CommandSpec {
            argv: &argv,
            env: &env,
            cwd: std::path::Path::new("/tmp"),
            setup: None,
            inside: None,
            io,
        })
    }

    fn read_all(fd: OwnedFd) -> String {
        use std::io::Read;
        let mut s = String::new();
        // A terminal's master reads EIO once the last slave is closed: the end.
        let _ = std::fs::File::from(fd).read_to_string(&mut s);
        s
    }

    #[test]
    fn a_command_spawned_without_a_copy_has_its_streams_its_group_and_its_status() {
        let _g = serial();
        let rt = runtime();
        let _in_rt = rt.enter();
        // Pipes: stdin in, stdout and stderr apart; its own group; the exact status.
        let mut c = command(
            "read x; echo \"$x $(pwd)\"; cut -d' ' -f5 /proc/$$/stat >&2; exit 3",
            CommandIo::Pipes,
        )
        .unwrap();
        let pid = c.child.pid();
        rustix::io::write(c.stdin.take().unwrap(), b"hi\n").unwrap();
        assert_eq!(read_all(c.stdout.take().unwrap()), "hi /tmp\n");
        assert_eq!(
            read_all(c.stderr.take().unwrap()).trim(),
            pid.to_string(),
            "its own group"
        );
        let st = rt.block_on(c.child.wait()).unwrap();
        assert_eq!(st, ExitStatus::Exited { code: 3 });
        assert!(
            !Registry::global().is_owned(pid),
            "unregistered once reaped"
        );

        // /dev/null for all three, and a signal death as such.
        let mut c = command(
            "test -c /dev/stdin && test -c /dev/stdout && kill -TERM $$",
            CommandIo::Null,
        )
        .unwrap();
        assert!(c.stdin.is_none() && c.stdout.is_none() && c.stderr.is_none());
        let st = rt.block_on(c.child.wait()).unwrap();
        assert_eq!(
            st,
            ExitStatus::Signaled {
                signal: libc::SIGTERM,
                core_dumped: false
            }
        );

        // A terminal: the command leads a session with it as its controlling terminal.
        let flags = rustix::pty::OpenptFlags::RDWR
            | rustix::pty::OpenptFlags::NOCTTY
            | rustix::pty::OpenptFlags::CLOEXEC;
        let master = rustix::pty::openpt(flags).unwrap();
        rustix::pty::grantpt(&master).unwrap();
        rustix::pty::unlockpt(&master).unwrap();
        let slave = rustix::pty::ioctl_tiocgptpeer(&master, flags).unwrap();
        let mut c = command(
            "test -t 0 && echo term; echo $$ $(cut -d' ' -f6 /proc/$$/stat); : </dev/tty && echo ctty",
            CommandIo::Terminal(slave),
        )
        .unwrap();
        let pid = c.child.pid();
        let st = rt.block_on(c.child.wait()).unwrap();
        assert_eq!(st, ExitStatus::Exited { code: 0 });
        let out = read_all(master);
        assert_eq!(out, format!("term\r\n{pid} {pid}\r\nctty\r\n"));
    }

    #[test]
    fn a_command_that_cannot_start_is_an_error_and_leaves_nothing() {
        let _g = serial();
        let rt = runtime();
        let _in_rt = rt.enter();
        let argv = vec!["no-such-program-here".to_string()];
        let e = spawn_command(CommandSpec {
            argv: &argv,
            env: &[],
            cwd: std::path::Path::new("/"),
            setup: None,
            inside: None,
            io: CommandIo::Null,
        })
        .err()
        .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        // Found, but not a program: the child's exec fails (and it is reaped here).
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-program");
        std::fs::write(&file, "x").unwrap();
        let argv = vec![file.display().to_string()];
        let e = spawn_command(CommandSpec {
            argv: &argv,
            env: &[],
            cwd: std::path::Path::new("/"),
            setup: None,
            inside: None,
            io: CommandIo::Null,
        })
        .err()
        .unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    }

    #[test]
    fn registrations_are_counted() {
        let r = Registry::new();
        assert!(!r.is_owned(7));
        r.lock().register(7);
        assert!(r.is_owned(7));
        // The pid was reaped and reused by a new child that registered before the first
        // owner's unregister: the second registration survives it.
        r.lock().register(7);
        r.unregister(7);
        assert!(r.is_owned(7));
        r.unregister(7);
        assert!(!r.is_owned(7));
        // Unregistering an unknown pid is harmless.
        r.unregister(7);
        assert!(!r.is_owned(7));
    }

    #[test]
    fn the_lock_is_exclusive() {
        let r = std::sync::Arc::new(Registry::new());
        let lock = r.lock();
        let r2 = r.clone();
        let t = std::thread::spawn(move || {
            r2.lock().register(1);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !t.is_finished(),
            "a second spawner got in while the lock was held"
        );
        drop(lock);
        t.join().unwrap();
        assert!(r.is_owned(1));
    }

    #[test]
    fn orphans_are_reaped_and_owned_children_are_left_alone() {
        let _g = serial();
        let reg = Registry::global();
        // Owned: registered under the lock, as every spawner does.
        let mut lock = reg.lock();
        let owned = sh("exit 3").spawn().unwrap();
        let owned_pid = owned.id();
        lock.register(owned_pid);
        drop(lock);
        // Unowned: nobody will wait for it.
        let orphan = sh("exit 5").spawn().unwrap();
        let orphan_pid = orphan.id();
        until_zombie(owned_pid);
        until_zombie(orphan_pid);

        let reaped = reg.reap_orphans();
        assert!(
            reaped.contains(&(orphan_pid, ExitStatus::Exited { code: 5 })),
            "{reaped:?}"
        );
        assert!(reaped.iter().all(|(p, _)| *p != owned_pid), "{reaped:?}");
        assert!(sys::read_stat(orphan_pid).is_err(), "the orphan is gone");
        // The owner still gets its exact status.
        assert_eq!(
            sys::waitid_pid(owned_pid).unwrap(),
            Some(ExitStatus::Exited { code: 3 })
        );
        reg.unregister(owned_pid);
        drop((owned, orphan));
    }

    #[test]
    fn nothing_to_reap_is_cheap_and_empty() {
        let _g = serial();
        assert!(Registry::global().reap_orphans().is_empty());
    }

    #[test]
    fn owned_children_keep_their_status_while_the_reaper_runs() {
        let _g = serial();
        runtime().block_on(async {
            let reaper = tokio::spawn(run(Registry::global()));
            for i in 0..20 {
                let code = i % 7;
                let spawned = spawn(&mut sh(&format!("exit {code}"))).unwrap();
                let mut child = spawned.child;
                assert!(Registry::global().is_owned(child.pid()));
                // Let the reaper see the zombie before we reap it.
                child.exited().await;
                tokio::task::yield_now().await;
                assert_eq!(child.wait().await.unwrap(), ExitStatus::Exited { code });
                assert!(!Registry::global().is_owned(child.pid()));
            }
            let spawned = spawn(&mut sh("kill -9 $$")).unwrap();
            let mut child = spawned.child;
            assert_eq!(
                child.wait().await.unwrap(),
                ExitStatus::Signaled {
                    signal: 9,
                    core_dumped: false
                }
            );
            reaper.abort();
        });
    }

    #[test]
    fn a_dropped_child_is_killed_with_its_group_and_reaped() {
        let _g = serial();
        runtime().block_on(async {
            let mut cmd = sh("sleep 1000 & echo $!; wait");
            cmd.stdout(Stdio::piped());
            let spawned = spawn(&mut cmd).unwrap();
            let pid = spawned.child.pid();
            // Wait for the grandchild so that the group has two members.
            let out = spawned.stdout.unwrap();
            let mut line = String::new();
            {
                use std::io::BufRead;
                let mut r = std::io::BufReader::new(std::fs::File::from(out));
                r.read_line(&mut line).unwrap();
            }
            let grandchild: u32 = line.trim().parse().unwrap();
            drop(spawned.child);
            let start = std::time::Instant::now();
            loop {
                let leader_gone = sys::read_stat(pid).is_err();
                let gc_dead = sys::read_stat(grandchild)
                    .map(|s| s.is_zombie())
                    .unwrap_or(true);
                if leader_gone && gc_dead && !Registry::global().is_owned(pid) {
                    break;
                }
                assert!(start.elapsed() < Duration::from_secs(30), "not cleaned up");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }
}
