//! The `process` driver: a plain child in its own process group and its own cgroup,
//! watched through a pidfd.
//!
//! # Tracking: a cgroup per instance, or the process group
//!
//! Where a cgroup2 mount is usable ([`crate::cgroup::Tracker`], found once at start-up),
//! every instance gets a new cgroup of its own (membership only, no limits) and the child
//! writes itself into its `cgroup.procs` before exec ([`fork_spawn`]): no code of the
//! workload runs outside it, and everything it forks is born inside, whatever process
//! group or session it makes (`setsid`, double-fork daemons). Signals go to every member
//! (each through a pidfd opened and then checked to be a member), SIGKILL through
//! `cgroup.kill`; the sweep after the main process's exit kills the cgroup until it is
//! empty, then removes it. A main process that exits 0 by itself and leaves members
//! behind daemonized: [`ExitCause::Daemonized`].
//!
//! Why fork and not `posix_spawn` there: `posix_spawn` cannot run the join in the child
//! and has no `CLONE_INTO_CGROUP` (glibc 2.36); writing the pid from the parent after the
//! spawn would leave the child running (and forking) outside its cgroup for a moment. The
//! fork costs about 0.6 ms more per spawn than `posix_spawn` in a test process (measured
//! in one run: 1.3-1.5 ms against 0.6-0.9 ms for spawn of `/bin/true`); the keeper forks
//! anyway.
//!
//! Without a usable cgroup2 mount, the driver tracks by process group, as described below
//! (logged once), and uses `posix_spawn`, unless the manifest sets `user`, `limits` or
//! `umask`: those the child applies itself ([`crate::setup`]), so such a spawn forks too.
//! The working directory is the manifest's `working_dir` (default: its folder).
//!
//! # Design
//!
//! Without a cgroup, [`ProcessDriver::spawn`] starts the program with glibc's `posix_spawn`
//! ([`crate::posix_spawn`]: the `vfork`-like fast path, plus file actions `Command` cannot
//! express; a bare program name is looked up in the instance's own `PATH` by the driver).
//! The child:
//!
//! - gets exactly the environment of the [`SpawnSpec`] and its working directory;
//! - leads a new process group (`process_group(0)`: pgid == pid) in the daemon's session;
//! - reads `/dev/null` and writes stdout and stderr into pipes whose read ends are returned
//!   in [`Spawned`];
//! - has no other descriptor: everything above 2 is closed before the exec
//!   (`posix_spawn_file_actions_addclosefrom_np(3)`), so nothing the daemon inherited or
//!   opened reaches a workload;
//! - gets **no** parent-death signal: an instance survives a daemon crash, to be adopted by
//!   the next daemon (a later issue).
//!
//! Right after the spawn the driver opens a pidfd for the child and hands it to a watcher
//! task registered with tokio's reactor: no thread per instance, no `SIGCHLD` handler, no
//! polling. The standard library's `Child` is dropped without being waited (std never
//! reaps on drop); the watcher reaps through the pidfd.
//!
//! # Lifecycle of a handle
//!
//! | phase      | entered when                                   | `signal`            | `try_status` |
//! |------------|------------------------------------------------|---------------------|--------------|
//! | running    | spawn returned                                 | to the group (*)    | `None`       |
//! | sweeping   | the main process was reaped                    | no-op, `Ok`         | `None`       |
//! | done       | no live process of the group is left           | no-op, `Ok`         | `Some`       |
//!
//! (*) `kill(-pgid)`; and if the main process moved itself to another process group
//! (`setpgid`), also to the main process through its pidfd.
//!
//! - running -> sweeping: the pidfd polls readable, `waitid(P_PIDFD, WEXITED)` reaps the
//!   main process and keeps its status exactly (exit code, or signal and core dump).
//! - sweeping -> done: if `kill(-pgid, 0)` says the group is empty (one system call; the
//!   common case), at once. Otherwise the live members are found in `/proc`, each is opened
//!   as a pidfd, checked to still be in the group, sent SIGKILL through its pidfd, and
//!   awaited until its pidfd polls readable; then `/proc` is scanned again, since a member
//!   may have forked in between, until no live member is found. Should that take
//!   64 rounds (a fork bomb), the group is also killed as a whole with
//!   `kill(-pgid, SIGKILL)`, which a racing `fork` cannot escape.
//! - done: the main process's status is published on a `watch` channel; every `wait`
//!   resolves with it.
//!
//! Once the main process is reaped, `signal` does nothing and returns `Ok`: from then on
//! its pid (the pgid) could in principle be reused, and the sweep is killing every process
//! anyway. The reap and `signal` take the same lock, so a signal never reaches a reused
//! pgid.
//!
//! # Policy: the group dies with its main process
//!
//! When the main process exits, by itself or by a signal, every remaining process of its
//! process group is killed with SIGKILL, like systemd's `KillMode=control-group`. A
//! workload that wants a helper to outlive its main process must not run under this
//! driver.
//!
//! # Limits
//!
//! - **Without a cgroup, a process that leaves the process group escapes.** A process
//!   that calls `setsid` or `setpgid` (double-fork daemonization, a shell's job control) is
//!   neither signalled nor swept, and `wait` does not wait for it. The cgroup closes that
//!   hole where there is one. The main process itself is still signalled through its
//!   pidfd if it moves.
//! - **A process that moves itself out of its cgroup** (it needs write access to the
//!   cgroup files: root) escapes too; the process driver is no wall (see the sandbox).
//! - **Orphans become zombies of someone else.** Swept processes are re-parented to the
//!   nearest subreaper or PID 1; whether they are reaped is up to that process (the
//!   daemon is a subreaper and reaps them: [`crate::reaper`]). Zombies hold their pid but
//!   run nothing and are not counted as live.
//! - **Spawns are registered** with [`crate::reaper::Registry`] under its lock, and the
//!   watcher unregisters the main process after reaping it, so a subreaper in the same
//!   process never takes its exit status.
//! - **A process in uninterruptible sleep** (`D`, e.g. on a dead NFS server) does not die
//!   on SIGKILL until the kernel lets it; `wait` keeps waiting and a warning is logged every
//!   few seconds.
//! - **A stolen exit status.** If other code in the daemon reaps our child (for example a
//!   `waitpid(-1)`), the status is lost: it is reported as [`LOST_STATUS`] and an error is
//!   logged.
//! - `stats` with a cgroup reads its `cgroup.procs`, `cpu.stat` and one
//!   `/proc/<pid>/stat` per member; without, one shared scan of `/proc` (one file read per
//!   host process); once the main process is reaped its CPU time is no longer counted.
//! - The watcher needs a tokio runtime with the I/O driver (and, for the slow sweep, the
//!   time driver) enabled. If the runtime shuts down first, the watcher is dropped and the
//!   instance keeps running unwatched, as after a daemon crash.

use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bulkhead_core::event::ExitStatus;
use bulkhead_core::signal::Signal;
use bulkhead_core::spec::DriverKind;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::watch;

use crate::cgroup::{InstanceCgroup, Tracker};
use crate::mainpid::{ExitFuture, Follow, Moved};
use crate::{
    posix_spawn, reaper, sys, Driver, ExitCause, InstanceHandle, MainPidError, SetupStep,
    SignalError, SpawnError, SpawnSpec, Spawned, Stats, StatsError,
};

/// The status reported when the main process's exit status could not be collected because
/// something else reaped it. Real exit codes are 0..=255, so this one cannot be mistaken
/// for a genuine exit.
pub const LOST_STATUS: ExitStatus = ExitStatus::Exited { code: -1 };

/// The `PATH` searched for a bare program name when the instance environment has none
/// (what glibc's `execvp` uses).
pub(crate) const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// After how many rounds of "scan /proc, kill what is found, await it" the sweep also kills
/// the whole group at once with `kill(-pgid, SIGKILL)`. Each round only has to catch
/// processes forked during the previous one, so reaching this takes a fork bomb.
const MAX_SWEEP_ROUNDS: usize = 64;

/// How long a swept process may take to die before a warning is logged.
const SLOW_DEATH_WARNING: Duration = Duration::from_secs(5);

/// Starts plain child processes. See the [module documentation](self).
#[derive(Debug, Default, Clone)]
pub struct ProcessDriver {
    /// Each instance gets its own cgroup here; `None`: process-group tracking.
    tracker: Option<Arc<Tracker>>,
}

impl ProcessDriver {
    /// A driver that tracks its instances by cgroup where this host allows it (a scope
    /// named after this process), by process group otherwise.
    pub fn new() -> ProcessDriver {
        static ONCE: std::sync::Once = std::sync::Once::new();
        let tracker = detect_tracking(&format!("proc-{}", std::process::id()));
        if let Some(t) = &tracker {
            // Scopes of processes that are gone (a test binary whose runtime ended before
            // its watchers removed their cgroups): their cgroups are killed and removed.
            ONCE.call_once(|| remove_dead_process_scopes(t));
        }
        ProcessDriver::with_tracker(tracker)
    }

    /// A driver that tracks by the given cgroup subtree, or by process group (`None`).
    pub fn with_tracker(tracker: Option<Arc<Tracker>>) -> ProcessDriver {
        ProcessDriver { tracker }
    }

    /// The cgroup subtree instances are tracked in, if any.
    pub fn tracker(&self) -> Option<&Arc<Tracker>> {
        self.tracker.as_ref()
    }
}

/// Removes the `proc-<pid>` scopes beside `t`'s whose process no longer exists, and
/// their instance cgroups that are empty (one with live members is left alone: its
/// process may live in another PID namespace).
fn remove_dead_process_scopes(t: &Tracker) {
    let Some(parent) = t.base().parent() else {
        return;
    };
    let Ok(rd) = std::fs::read_dir(parent) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("proc-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(rd) = std::fs::read_dir(e.path()) {
            for cg in rd.flatten().filter(|c| c.path().is_dir()) {
                if crate::cgroup::procs(&cg.path()).is_empty() {
                    let _ = std::fs::remove_dir(cg.path());
                }
            }
        }
        crate::cgroup::remove_scope_only(&e.path());
    }
}

/// Finds the cgroup2 subtree `scope` for tracking instances, or says (once per process,
/// in the log) why instances are tracked by process group instead.
pub fn detect_tracking(scope: &str) -> Option<Arc<Tracker>> {
    match Tracker::detect(scope) {
        Ok(t) => Some(Arc::new(t)),
        Err(e) => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!(
                    "process instances are tracked by process group, not by cgroup ({e}): \
                     a program that double-forks and calls setsid can outlive its instance"
                );
            });
            None
        }
    }
}

/// How a driver tracks its instances, for `health`: `cgroup <dir>` or `process group`.
pub fn tracking_text(tracker: Option<&Arc<Tracker>>) -> String {
    match tracker {
        Some(t) => format!("cgroup {}", t.base().display()),
        None => "process group".to_owned(),
    }
}

#[async_trait]
impl Driver for ProcessDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Process
    }

    async fn spawn(&self, spec: SpawnSpec) -> Result<Spawned, SpawnError> {
        // No await point in here: the spawn cannot be cancelled half-way.
        spawn_now(&spec, self.tracker.as_deref())
    }

    fn shutdown(&self) {
        if let Some(t) = &self.tracker {
            t.remove_scope();
        }
    }

    fn tracks_every_descendant(&self) -> bool {
        self.tracker.is_some()
    }
}

fn spawn_now(spec: &SpawnSpec, tracker: Option<&Tracker>) -> Result<Spawned, SpawnError> {
    let id = &spec.instance;
    let Some(arg0) = spec.argv.first() else {
        return Err(SpawnError::invalid(id, "the command line is empty"));
    };
    let exec_err = |source| SpawnError::Exec {
        program: arg0.clone(),
        source,
    };
    let cwd = bulkhead_core::execution::working_dir(&spec.spec, &spec.cwd);
    crate::setup::check_working_dir(&spec.spec, &cwd)
        .map_err(|e| SpawnError::setup(id, SetupStep::WorkingDir, e))?;
    let program = resolve_program(arg0, &spec.env, &cwd).map_err(exec_err)?;
    // user, limits, umask: applied in a forked child (posix_spawn cannot).
    crate::setup::limit_settings(&spec.spec)
        .map_err(|e| SpawnError::setup(id, SetupStep::Limits, e))?;
    let setup = crate::setup::host_setup(&spec.spec)
        .map_err(|e| SpawnError::setup(id, SetupStep::User, e))?
        .map(|s| s.prepare(&cwd))
        .transpose()
        .map_err(|e| SpawnError::setup(id, SetupStep::Limits, e))?;

    // The instance's cgroup, made before the spawn; the child joins it before exec.
    let cgroup = match tracker {
        Some(t) => {
            let cg = t
                .create(spec.instance.as_str())
                .map_err(|e| SpawnError::setup(id, SetupStep::Cgroup, e))?;
            match cg.open_dir() {
                Ok(fd) => Some((cg, fd)),
                Err(e) => {
                    let _ = cg.remove();
                    return Err(SpawnError::setup(
                        id,
                        SetupStep::Cgroup,
                        format!("cannot open {}: {e}", cg.dir().display()),
                    ));
                }
            }
        }
        None => None,
    };

    let registry = reaper::Registry::global();
    let mut lock = registry.lock();
    // RACE: the reaper lock is held from before the spawn until the pid is registered: a
    // child that exits at once must not be reaped as an orphan (its status is the
    // instance's). The watcher unregisters it after reaping it.
    // With a cgroup the child is born in it; with a setup it switches user, limits and
    // umask; with sockets it fills in LISTEN_PID: each needs code in the child, so a
    // clone (posix_spawn cannot run these steps, see crate::clone_spawn).
    let spawned = if cgroup.is_some() || setup.is_some() || !spec.listen.is_empty() {
        crate::clone_spawn::spawn(crate::clone_spawn::Spawn {
            program: &program,
            argv: &spec.argv,
            env: &spec.env,
            cwd: &cwd,
            cgroup: cgroup.as_ref().map(|(_, dir)| dir),
            death_parent: None,
            setup,
            listen: &spec.listen,
        })
        .map(|c| (c.pid, Some(c.pidfd), Some(c.stdout), Some(c.stderr)))
    } else {
        posix_spawn::spawn(&posix_spawn::Spawn {
            program: &program,
            arg0,
            args: &spec.argv[1..],
            env: &spec.env,
            cwd: &cwd,
        })
        .map(|c| (c.pid, None, Some(c.stdout), Some(c.stderr)))
    };
    let (pid, pidfd, stdout, stderr) = match spawned {
        Ok(x) => x,
        Err(e) => {
            drop(lock);
            if let Some((cg, _)) = &cgroup {
                let _ = cg.remove();
            }
            return Err(exec_err(e));
        }
    };
    lock.register(pid);
    drop(lock);
    let cgroup = cgroup.map(|(cg, _procs)| cg);

    // RACE: the child may already have exited, but it is our unreaped child, so its pid
    // cannot be reused before we wait it: the pidfd names exactly the process we started
    // (a zombie at worst, which pidfd_open accepts and which then polls readable at once).
    let pidfd = match pidfd.map_or_else(|| sys::pidfd_open(pid), Ok) {
        Ok(fd) => Arc::new(fd),
        Err(source) => {
            abandon(pid, cgroup.as_ref());
            return Err(SpawnError::Watch { pid, source });
        }
    };
    // SAFETY: the AsyncFd owns a clone of the Arc<OwnedFd>; the descriptor is closed only
    // when the last clone drops, which is after the AsyncFd drops, and `as_raw_fd` on it
    // always returns that same descriptor.
    let registered =
        unsafe { AsyncFd::register_with_interest(Arc::clone(&pidfd), Interest::READABLE) };
    let afd = match registered {
        Ok(afd) => afd,
        Err(e) => {
            let source = e.into_parts().1;
            abandon(pid, cgroup.as_ref());
            return Err(SpawnError::Watch { pid, source });
        }
    };

    let shared = Arc::new(Shared::new(pid, cgroup, Arc::new(crate::mainpid::Direct)));
    let (tx, rx) = watch::channel(None);
    tokio::spawn(watch_instance(afd, Arc::clone(&shared), tx));
    tracing::debug!(instance = %spec.instance, pid, program = %program.display(), "spawned");

    Ok(Spawned {
        handle: Arc::new(ProcessHandle {
            instance: spec.instance.to_string(),
            shared,
            pidfd: Some(pidfd),
            status: rx,
        }),
        stdout,
        stderr,
        tap: None,
    })
}

/// The error path of a spawn that cannot be watched: kill what may already run and reap
/// the child, so that nothing of the instance is left.
fn abandon(pid: u32, cgroup: Option<&InstanceCgroup>) {
    if let Err(e) = sys::kill_group(pid, Signal::KILL) {
        tracing::error!("cannot kill process group {pid} of an unwatchable child: {e}");
    }
    if let Some(cg) = cgroup {
        cg.kill_all();
    }
    if let Err(e) = sys::reap_blocking(pid) {
        tracing::error!("cannot reap unwatchable child {pid}: {e}");
    }
    reaper::Registry::global().unregister(pid);
    if let Some(cg) = cgroup {
        if let Err(e) = cg.remove() {
            tracing::warn!("cannot remove cgroup {}: {e}", cg.dir().display());
        }
    }
}

/// Finds the file to execute for `arg0`, like `execvp` but in the instance's `PATH`.
///
/// A name containing `/` is used as it is (relative ones resolve against the working
/// directory in the child). A bare name is searched in the `PATH` of `env` (relative
/// entries against `cwd`), falling back to [`DEFAULT_PATH`]; the first regular file with an
/// execute bit wins.
pub(crate) fn resolve_program(
    arg0: &str,
    env: &[(String, String)],
    cwd: &Path,
) -> io::Result<PathBuf> {
    if arg0.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the program name is empty",
        ));
    }
    if arg0.contains('/') {
        return Ok(PathBuf::from(arg0));
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    for dir in path.split(':') {
        // An empty entry means the working directory, as in execvp.
        let dir = if dir.is_empty() {
            OsStr::new(".")
        } else {
            OsStr::new(dir)
        };
        let candidate = cwd.join(dir).join(arg0);
        if let Ok(meta) = candidate.metadata() {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("not found in PATH {path}"),
    ))
}

/// Where a handle is in its life; see the table in the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// The process started exited and the run has not moved (yet) to a `MAINPID=`:
    /// no signal is sent while `main_exit` reads the queued notify messages.
    Deciding,
    Sweeping,
    Done,
}

/// What the handle and its watcher share.
struct Shared {
    /// The process the driver started.
    pid: u32,
    pgid: u32,
    /// The instance's own cgroup, when it is tracked by cgroup.
    cgroup: Option<InstanceCgroup>,
    /// Taken around the reap and around every signal: while the phase is `Running` the
    /// main process is unreaped, so its pid and the pgid still name our processes.
    phase: Mutex<Phase>,
    /// A signal was sent to the instance (a stop): processes left at its exit are then
    /// not a sign that it daemonized.
    signalled: std::sync::atomic::AtomicBool,
    /// Why the instance ended, when the sweep can tell.
    cause: Mutex<Option<ExitCause>>,
    /// The main process `MAINPID=` moved the run to (see [`crate::mainpid`]); taken
    /// after `phase` when both are.
    moved: Mutex<Option<Moved>>,
    /// Bumped at each move, so that the watcher follows.
    moves: watch::Sender<u64>,
    /// Who reaps a moved main process.
    follow: Arc<dyn Follow>,
    /// Reads the `MAINPID=`s queued when the process started exits.
    hook: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
}

impl Shared {
    fn new(pid: u32, cgroup: Option<InstanceCgroup>, follow: Arc<dyn Follow>) -> Shared {
        Shared {
            pid,
            pgid: pid,
            cgroup,
            phase: Mutex::new(Phase::Running),
            signalled: std::sync::atomic::AtomicBool::new(false),
            cause: Mutex::new(None),
            moved: Mutex::new(None),
            moves: watch::Sender::new(0),
            follow,
            hook: Mutex::new(None),
        }
    }

    fn moved(&self) -> Option<Moved> {
        self.moved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The main process now: the one started, or the one `MAINPID=` named.
    fn main_pid(&self) -> u32 {
        self.moved().map_or(self.pid, |m| m.pid)
    }

    /// The process started exited (its pid may be reused from now on; the caller holds
    /// the phase lock): unless the run has moved, nothing is signalled until `main_exit`
    /// has decided.
    fn first_exited(&self, phase: &mut Phase) {
        if self.moved().is_none() && *phase == Phase::Running {
            *phase = Phase::Deciding;
        }
    }

    /// Waits until the run's main process has exited, the one started (`first`) or the
    /// one `MAINPID=` moved it to, and moves the phase to `Sweeping`. See
    /// [`crate::mainpid`].
    async fn main_exit(&self, first: ExitFuture) -> ExitStatus {
        let mut moves = self.moves.subscribe();
        let mut first = Some(first);
        loop {
            moves.borrow_and_update();
            match self.moved() {
                None => {
                    let Some(f) = first.as_mut() else {
                        // Unreachable: a run never moves back to no MAINPID.
                        return LOST_STATUS;
                    };
                    tokio::select! {
                        status = f => {
                            first = None;
                            // ORDER: the MAINPID= messages sent before this exit are read
                            // now, before the run is declared over (systemd: notify
                            // before SIGCHLD).
                            let hook = self.hook.lock().unwrap_or_else(PoisonError::into_inner).clone();
                            if let Some(hook) = hook {
                                hook();
                            }
                            let mut phase = self.phase();
                            if self.moved().is_none() {
                                *phase = Phase::Sweeping;
                                return status;
                            }
                            *phase = Phase::Running;
                            tracing::info!(
                                pid = self.pid,
                                "the process started exited ({status}); the run follows MAINPID={}",
                                self.main_pid()
                            );
                        }
                        _ = moves.changed() => {
                            // Moved while the process started runs: it is reaped on its
                            // own (its status no longer matters).
                            if let Some(f) = first.take() {
                                let pid = self.pid;
                                tokio::spawn(async move {
                                    let status = f.await;
                                    // Debug: through the keeper, this also resolves when
                                    // the entry goes at the end of the run.
                                    tracing::debug!(pid, "the process started ended ({status}); the run follows its MAINPID");
                                });
                            }
                        }
                    }
                }
                Some(m) => {
                    let mut exited = self.follow.exited(m.pid, m.pidfd.clone());
                    tokio::select! {
                        status = &mut exited => {
                            let mut phase = self.phase();
                            if self.moved().map(|n| n.pid) == Some(m.pid) {
                                *phase = Phase::Sweeping;
                                return status;
                            }
                        }
                        _ = moves.changed() => {
                            // Moved again: the previous one is reaped on its own.
                            tokio::spawn(exited);
                        }
                    }
                }
            }
        }
    }

    fn phase(&self) -> MutexGuard<'_, Phase> {
        // The critical sections cannot leave the phase inconsistent: ignore poisoning.
        self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Kills whatever of the instance outlived its main process and waits until it is
    /// gone: the cgroup as a whole when there is one (then removes it), else the process
    /// group. A main process that exited 0 by itself and left processes behind in its
    /// cgroup daemonized: that is recorded as the exit cause.
    async fn sweep(&self, status: ExitStatus) {
        let Some(cg) = &self.cgroup else {
            sweep_group(self.pgid).await;
            return;
        };
        let left = sweep_cgroup(cg).await;
        let asked = self.signalled.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 && status.success() && !asked {
            tracing::warn!(
                pid = self.pid,
                "the main process exited 0 and left {left} process(es) in {}: it \
                 daemonized; they were killed",
                cg.dir().display()
            );
            *self.cause.lock().unwrap_or_else(PoisonError::into_inner) =
                Some(ExitCause::Daemonized { left });
        }
    }
}

/// The watcher task of one instance: reap the main process, sweep the group, publish.
async fn watch_instance(
    afd: AsyncFd<Arc<OwnedFd>>,
    shared: Arc<Shared>,
    tx: watch::Sender<Option<ExitStatus>>,
) {
    let sh = Arc::clone(&shared);
    let first: ExitFuture = Box::pin(async move {
        let status = reap_main(&afd, &sh).await;
        // Reaped (or lost): the reaper may take this pid from now on.
        reaper::Registry::global().unregister(sh.pid);
        drop(afd);
        status
    });
    let status = shared.main_exit(first).await;
    tracing::debug!(pid = shared.main_pid(), %status, "main process exited");
    shared.sweep(status).await;
    *shared.phase() = Phase::Done;
    tx.send_replace(Some(status));
}

/// Kills every process left in the instance's cgroup, waits until each is gone, removes
/// the cgroup. Returns how many live processes were found at the first look.
async fn sweep_cgroup(cg: &InstanceCgroup) -> usize {
    let mut first = None;
    let mut round = 0;
    loop {
        // Opened (and checked to be members) before the kill, so that each can be
        // awaited; a pid reused meanwhile is not a member and is skipped.
        let members = cg.member_pidfds();
        first.get_or_insert(members.len());
        if members.is_empty() {
            break;
        }
        round += 1;
        if round == MAX_SWEEP_ROUNDS {
            tracing::warn!(
                "cgroup {} keeps getting new processes after {MAX_SWEEP_ROUNDS} sweeps",
                cg.dir().display()
            );
        }
        tracing::debug!(dir = %cg.dir().display(), n = members.len(), "killing the rest of the cgroup");
        // `cgroup.kill` (a racing fork cannot escape it) or, on older kernels, SIGKILL
        // to each member through its pidfd; a member forked after the read is caught by
        // the next round.
        cg.kill_all();
        for (pid, fd) in members {
            await_exit(pid, fd).await;
        }
    }
    let dir = cg.dir().to_owned();
    match std::fs::remove_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(_) => {
            // EBUSY: a member is still being torn down by the kernel; retry off the
            // runtime.
            let cg = cg.clone();
            let res = tokio::task::spawn_blocking(move || cg.remove()).await;
            if let Ok(Err(e)) = res {
                tracing::warn!("cannot remove cgroup {}: {e}", dir.display());
            }
        }
    }
    first.unwrap_or(0)
}

/// Waits for the main process to exit and reaps it.
async fn reap_main(afd: &AsyncFd<Arc<OwnedFd>>, shared: &Shared) -> ExitStatus {
    loop {
        let mut ready = match afd.readable().await {
            Ok(ready) => ready,
            Err(e) => {
                // Only when the reactor is gone (runtime shutdown): nobody is left to tell.
                tracing::error!(pid = shared.pid, "cannot poll the pidfd: {e}");
                return std::future::pending().await;
            }
        };
        // The phase lock: no signal is sent to the group while the reap happens.
        let mut phase = shared.phase();
        match sys::waitid_pidfd(afd.get_ref()) {
            Ok(Some(status)) => {
                shared.first_exited(&mut phase);
                return status;
            }
            // Spurious readiness: wait for the next edge.
            Ok(None) => {
                drop(phase);
                ready.clear_ready();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::error!(
                    pid = shared.pid,
                    "cannot reap the main process (did other code reap it?): {e}; \
                     reporting {LOST_STATUS}"
                );
                shared.first_exited(&mut phase);
                return LOST_STATUS;
            }
        }
    }
}

/// Kills every live process left in the group and waits until they are gone.
async fn sweep_group(pgid: u32) {
    // Fast path, one system call: the group died with its main process.
    if !sys::group_has_members(pgid) {
        return;
    }
    let mut round = 0;
    loop {
        let members = sys::group_members(pgid);
        if members.is_empty() {
            return;
        }
        round += 1;
        if round == MAX_SWEEP_ROUNDS {
            // A fork racing a group-wide signal either gets the signal too or fails, so
            // after this nothing in the group can fork any more and the rounds below
            // only await the dying. The group has members (we just saw some), so its
            // number is still ours.
            tracing::warn!(
                pgid,
                "process group {pgid} keeps forking after {MAX_SWEEP_ROUNDS} sweeps; \
                 killing it as a whole"
            );
            if let Err(e) = sys::kill_group(pgid, Signal::KILL) {
                tracing::error!("cannot kill process group {pgid}: {e}");
            }
        }
        tracing::debug!(pgid, ?members, "killing the rest of the process group");
        let mut dying = Vec::with_capacity(members.len());
        for pid in members {
            // RACE: `pid` came from a /proc scan and may have exited and been reused
            // since. Open first, then check that the process is still in our group: from
            // then on the pidfd pins it, and a signal through it cannot reach anyone else.
            let Ok(fd) = sys::pidfd_open(pid) else {
                continue; // gone already
            };
            if sys::getpgid(pid).ok() != Some(pgid) {
                continue;
            }
            if let Err(e) = sys::pidfd_send_signal(&fd, Signal::KILL) {
                tracing::warn!("cannot kill pid {pid} of process group {pgid}: {e}");
                continue;
            }
            dying.push((pid, fd));
        }
        for (pid, fd) in dying {
            await_exit(pid, fd).await;
        }
    }
}

/// Waits until the process a pidfd names has exited (the pidfd polls readable).
async fn await_exit(pid: u32, fd: OwnedFd) {
    // SAFETY: the AsyncFd takes ownership of the OwnedFd: the descriptor stays open and
    // the same until the AsyncFd drops.
    let afd = match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
        Ok(afd) => afd,
        Err(e) => {
            tracing::warn!("cannot watch pid {pid}: {}", e.into_parts().1);
            return;
        }
    };
    loop {
        match tokio::time::timeout(SLOW_DEATH_WARNING, afd.readable()).await {
            // Readable never goes back for an exited process: no need to clear it.
            Ok(Ok(_ready)) => return,
            Ok(Err(e)) => {
                tracing::warn!("cannot poll the pidfd of pid {pid}: {e}");
                return;
            }
            Err(_) => tracing::warn!(
                "pid {pid} is still alive {} s after SIGKILL (uninterruptible sleep?); \
                 still waiting",
                SLOW_DEATH_WARNING.as_secs()
            ),
        }
    }
}

/// A handle for an instance whose main process another process reaps (the keeper):
/// `exit` resolves with its status, then the group is swept as for a direct child, and
/// `after` runs once the status is published.
///
/// The phase lock cannot keep the pid from being reused here (the keeper reaps on its
/// own schedule), but a group is only signalled while its main process has not been
/// reported gone, and a group id stays reserved while any member lives.
#[allow(clippy::too_many_arguments)]
pub(crate) fn foreign_handle(
    instance: String,
    pid: u32,
    pidfd: Option<OwnedFd>,
    cgroup: Option<InstanceCgroup>,
    exit: impl std::future::Future<Output = ExitStatus> + Send + 'static,
    follow: Arc<dyn Follow>,
    moved: Option<Moved>,
    after: impl FnOnce() + Send + 'static,
) -> Arc<dyn InstanceHandle> {
    let mut shared = Shared::new(pid, cgroup, follow);
    // Adopted after a `MAINPID=`: the run already follows that process.
    let adopted_moved = moved.is_some();
    shared.moved = Mutex::new(moved);
    let shared = Arc::new(shared);
    let (tx, rx) = watch::channel(None);
    let sh = Arc::clone(&shared);
    tokio::spawn(async move {
        let first: ExitFuture = if adopted_moved {
            Box::pin(std::future::pending())
        } else {
            let sh = Arc::clone(&sh);
            Box::pin(async move {
                let status = exit.await;
                sh.first_exited(&mut sh.phase());
                status
            })
        };
        let status = sh.main_exit(first).await;
        tracing::debug!(pid = sh.main_pid(), %status, "main process exited (reaped by the keeper)");
        // ORDER: the keeper client marks itself closed before it reports KEEPER_DIED for
        // the instances it held, so a status that came from its death is seen with it.
        if status == crate::keeper::client::KEEPER_DIED && sh.follow.holder_died() {
            *sh.cause.lock().unwrap_or_else(PoisonError::into_inner) = Some(ExitCause::KeeperDied);
        }
        sh.sweep(status).await;
        *sh.phase() = Phase::Done;
        tx.send_replace(Some(status));
        after();
    });
    Arc::new(ProcessHandle {
        instance,
        shared,
        pidfd: pidfd.map(Arc::new),
        status: rx,
    })
}

/// The handle of one process-driver instance.
struct ProcessHandle {
    instance: String,
    shared: Arc<Shared>,
    /// Kept open for as long as the handle lives; the watcher holds a clone. None only
    /// for an adopted instance that had exited already (the keeper reaped it).
    pidfd: Option<Arc<OwnedFd>>,
    status: watch::Receiver<Option<ExitStatus>>,
}

#[async_trait]
impl InstanceHandle for ProcessHandle {
    fn pid(&self) -> Option<u32> {
        Some(self.shared.main_pid())
    }

    fn set_main_pid(&self, pid: u32) -> Result<(), MainPidError> {
        let phase = self.shared.phase();
        if !matches!(*phase, Phase::Running | Phase::Deciding) {
            return Err(MainPidError::Ended);
        }
        if pid == self.shared.main_pid() {
            return Ok(());
        }
        self.shared.follow.supported()?;
        // Pinned from here on: signals through it cannot reach a reused pid.
        let pidfd = sys::pidfd_open(pid).map_err(|source| MainPidError::Watch { pid, source })?;
        self.shared.follow.start(pid);
        *self
            .shared
            .moved
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Moved {
            pid,
            pidfd: Arc::new(pidfd),
        });
        self.shared.moves.send_modify(|n| *n += 1);
        tracing::info!(instance = %self.instance, "main process is now pid {pid} (MAINPID)");
        Ok(())
    }

    fn on_main_exit(&self, hook: Arc<dyn Fn() + Send + Sync>) {
        *self
            .shared
            .hook
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(hook);
    }

    fn signal(&self, signal: Signal) -> Result<(), SignalError> {
        let err = |source| SignalError {
            instance: self.instance.clone(),
            signal,
            source,
        };
        // Held across the kills: the main process cannot be reaped meanwhile, so the pgid
        // (its pid) cannot have been reused.
        let phase = self.shared.phase();
        if *phase != Phase::Running {
            return Ok(());
        }
        let moved = self.shared.moved();
        // No pidfd: an adopted instance whose main process had exited and been reaped by
        // the keeper; its pid may be reused, so nothing is sent (the sweep that follows the
        // exit report kills what is left of it).
        let Some(pidfd) = moved.as_ref().map(|m| &m.pidfd).or(self.pidfd.as_ref()) else {
            return Ok(());
        };
        let main = self.shared.main_pid();
        self.shared
            .signalled
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(cg) = &self.shared.cgroup {
            // Every process of the instance, whatever group or session it made; the main
            // process through its pidfd (it is a member too, unless it moved itself out).
            sys::pidfd_send_signal(pidfd, signal).map_err(err)?;
            cg.signal(signal, Some(main));
            return Ok(());
        }
        if moved.is_some() {
            // MAINPID= moved the run: the process started (the group's leader) may be gone
            // and, with an empty group, its number reused. The group is signalled only
            // while the main process is in it (which keeps the number reserved).
            if sys::getpgid(main).ok() == Some(self.shared.pgid) {
                sys::kill_group(self.shared.pgid, signal).map_err(err)?;
            }
            sys::pidfd_send_signal(pidfd, signal).map_err(err)?;
            return Ok(());
        }
        sys::kill_group(self.shared.pgid, signal).map_err(err)?;
        // The main process may have left its group; it still gets the signal.
        match sys::getpgid(self.shared.pid) {
            Ok(pgid) if pgid != self.shared.pgid => {
                sys::pidfd_send_signal(pidfd, signal).map_err(err)?;
            }
            _ => {}
        }
        Ok(())
    }

    async fn wait(&self) -> ExitStatus {
        let mut rx = self.status.clone();
        let published = rx.wait_for(Option::is_some).await.map(|status| *status);
        match published {
            Ok(Some(status)) => status,
            Ok(None) | Err(_) => {
                // The watcher was dropped without publishing: the runtime is shutting down.
                tracing::error!(
                    instance = %self.instance,
                    "the watcher of pid {} is gone; the status will never be known",
                    self.shared.pid
                );
                std::future::pending().await
            }
        }
    }

    fn try_status(&self) -> Option<ExitStatus> {
        *self.status.borrow()
    }

    fn exit_cause(&self) -> Option<ExitCause> {
        *self
            .shared
            .cause
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn owns_pid(&self, pid: u32) -> Option<bool> {
        let cg = self.shared.cgroup.as_ref()?;
        Some(pid == self.shared.main_pid() || cg.members().contains(&pid))
    }

    fn stats(&self) -> Result<Stats, StatsError> {
        if *self.shared.phase() == Phase::Done {
            return Ok(Stats::default());
        }
        let err = |source| StatsError {
            instance: self.instance.clone(),
            source,
        };
        if let Some(cg) = &self.shared.cgroup {
            return Ok(cgroup_stats(cg, self.shared.main_pid()));
        }
        // One scan of /proc shared by every instance a request asks about (see
        // `sys::ProcTable`): usage is at most `USAGE_MAX_AGE` old.
        let table = sys::ProcTable::recent(USAGE_MAX_AGE);
        let members = table.group(self.shared.pgid);
        let mut stats = Stats::default();
        // The main process, whether or not it is still in the group (read directly when it
        // is newer than the table).
        let main_pid = self.shared.main_pid();
        let main = match table.stats(main_pid) {
            Some(m) => Ok(m),
            None => sys::proc_stats(main_pid),
        };
        match main {
            Ok(main) => {
                stats.cpu_seconds = main.cpu_seconds + main.children_cpu_seconds;
                if !members.contains(&main_pid) {
                    stats.memory_bytes += main.rss_bytes;
                    stats.pids += 1;
                }
            }
            // Reaped meanwhile: the sweep is under way.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        for p in members.iter().filter_map(|&pid| table.stats(pid)) {
            stats.memory_bytes += p.rss_bytes;
            stats.pids += 1;
        }
        Ok(stats)
    }
}

/// Usage from the instance's cgroup: its members (one `/proc/<pid>/stat` read each, for
/// resident memory, unless the memory controller counts it) and the CPU time of every
/// process that ran in it (`cpu.stat`). The cost follows the instance's own processes,
/// not the host's.
fn cgroup_stats(cg: &InstanceCgroup, main: u32) -> Stats {
    let members = cg.members();
    let mut stats = Stats {
        pids: members.len() as u32,
        ..Stats::default()
    };
    let mut rss = 0;
    let mut cpu = 0.0;
    for pid in &members {
        if let Ok(p) = sys::proc_stats(*pid) {
            rss += p.rss_bytes;
            if *pid == main {
                cpu = p.cpu_seconds + p.children_cpu_seconds;
            }
        }
    }
    stats.memory_bytes = cg.memory_current().unwrap_or(rss);
    stats.cpu_seconds = cg.cpu_seconds().unwrap_or(cpu);
    stats
}

/// How old the shared `/proc` table may be when usage is read from it.
const USAGE_MAX_AGE: std::time::Duration = std::time::Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;

    fn env(path: &str) -> Vec<(String, String)> {
        vec![("PATH".to_owned(), path.to_owned())]
    }

    #[test]
    fn bare_names_are_found_in_the_instance_path() {
        let p = resolve_program("sh", &env("/nonexistent:/bin:/usr/bin"), Path::new("/")).unwrap();
        assert!(p.ends_with("sh") && p.is_absolute(), "{}", p.display());
        let e = resolve_program("sh", &env("/nonexistent"), Path::new("/")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        // Without PATH, execvp's default.
        assert!(resolve_program("sh", &[], Path::new("/")).is_ok());
    }

    #[test]
    fn names_with_a_slash_are_used_as_they_are() {
        assert_eq!(
            resolve_program("./server", &env("/bin"), Path::new("/")).unwrap(),
            PathBuf::from("./server")
        );
        assert!(resolve_program("", &env("/bin"), Path::new("/")).is_err());
    }

    #[test]
    fn directories_and_non_executables_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("prog")).unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("prog"), "").unwrap();
        let path = format!("{}:sub", dir.path().display());
        assert!(resolve_program("prog", &env(&path), dir.path()).is_err());
        std::fs::set_permissions(sub.join("prog"), std::fs::Permissions::from_mode(0o755)).unwrap();
        // Relative entries resolve against the working directory.
        assert_eq!(
            resolve_program("prog", &env(&path), dir.path()).unwrap(),
            dir.path().join("sub").join("prog")
        );
    }
}
