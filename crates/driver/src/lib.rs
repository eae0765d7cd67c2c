//! Drivers: how an instance's processes are started, signalled, watched and measured.
//!
//! Every driver implements [`Driver`] (spawn) and hands back an [`InstanceHandle`]
//! (signal, wait, stop, stats). The daemon never knows which driver it talks to; the
//! [`conformance`] suite states the behaviour every driver must have (exit-status fidelity,
//! kill escalation, whole-tree teardown, crash detection) and is run against each one.
//!
//! This crate brings the `process` driver ([`process::ProcessDriver`]): a plain child in its
//! own process group and its own cgroup ([`cgroup`], tracking only), watched through a
//! pidfd. Linux system calls sit behind [`sys`].
//!
//! **Invariant — a handle's `wait` resolves only when every process of the instance is
//! gone**, never merely when the main process is: the daemon reports `terminated` and
//! frees the key on that signal, so a straggler must not outlive it.

use std::fmt;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bulkhead_core::event::ExitStatus;
use bulkhead_core::key::InstanceId;
use bulkhead_core::signal::Signal;
use bulkhead_core::spec::{DriverKind, WorkloadSpec};

pub mod cgroup;
mod clone_spawn;
/// The shared-memory clone (`CLONE_VM` on a stack of the child's own) the sandbox driver
/// uses too.
pub use clone_spawn::{clone3_vm, Blocked, Stack, SHARED_MEMORY_SPAWN};
pub mod conformance;
pub mod keeper;
pub mod listen;
mod mainpid;
mod posix_spawn;
pub mod process;
pub mod reaper;
pub mod restrict;
pub mod setup;
pub mod sys;
pub mod warm;

/// Everything a driver needs to start one instance. The daemon has already resolved the
/// program path and expanded `${VAR}`s.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    pub instance: InstanceId,
    /// argv; `argv[0]` is the program (absolute, or a bare name looked up in `PATH`).
    pub argv: Vec<String>,
    /// The complete environment: nothing else is inherited from the daemon.
    pub env: Vec<(String, String)>,
    /// The working directory (the manifest's folder).
    pub cwd: PathBuf,
    /// The workload as launched, for driver-specific sections.
    pub spec: Arc<WorkloadSpec>,
    /// Host paths the instance must reach whatever its walls: its notify socket (at the
    /// same path), its channel space (at `/dev/shm` and iceoryx2's root). Drivers that
    /// hide the host's file system (sandbox, docker) bind each one in, read-write.
    pub binds: Vec<Bind>,
    /// The host ids the daemon reserved for the instance's tenant: a driver that maps a
    /// user namespace by itself (the sandbox's `user_namespace: auto`) maps this range.
    /// `None`: the driver picks one.
    pub ids: Option<bulkhead_core::sandbox::UserNamespace>,
    /// The variables of `env` the daemon passed on from its own environment (`PATH`,
    /// `HOME`, `LANG`, ...) or defaulted, not set by the manifest. A driver whose
    /// instances come with an environment of their own (a container image's `ENV`)
    /// leaves them out, so that the image's apply.
    pub inherited: Vec<String>,
    /// Listening sockets the daemon bound for the instance (`sockets:`): put at
    /// descriptors 3.. in order, with `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID`
    /// (see [`listen`]). Empty: the workload gets nothing above 2.
    pub listen: Vec<listen::ListenFd>,
}

/// A host path shown to an instance at `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub source: PathBuf,
    pub target: PathBuf,
}

impl Bind {
    /// `path` at the same path.
    pub fn same(path: impl Into<PathBuf>) -> Bind {
        let p = path.into();
        Bind {
            source: p.clone(),
            target: p,
        }
    }
}

/// When a stop escalates to SIGKILL. Made with [`KillDeadline::extendable`], the sender
/// it comes with moves it (only ever out) while the stop runs.
pub struct KillDeadline(tokio::sync::watch::Receiver<tokio::time::Instant>);

impl KillDeadline {
    /// `grace` from now, fixed.
    pub fn after(grace: Duration) -> KillDeadline {
        KillDeadline::extendable(grace).0
    }

    /// `grace` from now, and the sender that moves it: see [`extend`].
    pub fn extendable(
        grace: Duration,
    ) -> (
        KillDeadline,
        tokio::sync::watch::Sender<tokio::time::Instant>,
    ) {
        let (tx, rx) = tokio::sync::watch::channel(tokio::time::Instant::now() + grace);
        (KillDeadline(rx), tx)
    }

    /// Resolves once the deadline, as last moved, has passed.
    pub async fn passed(&mut self) {
        loop {
            let at = *self.0.borrow_and_update();
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {
                    // Moved out while this sleep was due: sleep on.
                    if *self.0.borrow() <= at {
                        return;
                    }
                }
                moved = self.0.changed() => {
                    if moved.is_err() {
                        // Nobody can move it any more: it stays where it is.
                        let at = *self.0.borrow();
                        tokio::time::sleep_until(at).await;
                        return;
                    }
                }
            }
        }
    }
}

/// Moves a deadline out to `want` if that is later; never in. Returns whether it moved.
pub fn extend(
    deadline: &tokio::sync::watch::Sender<tokio::time::Instant>,
    want: tokio::time::Instant,
) -> bool {
    deadline.send_if_modified(|at| {
        let later = want > *at;
        if later {
            *at = want;
        }
        later
    })
}

/// A started instance.
pub struct Spawned {
    pub handle: Arc<dyn InstanceHandle>,
    /// Read ends of the instance's stdout and stderr, when the driver captures them
    /// through pipes. The daemon drains them into the instance's log.
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    /// The instance's output when another process drains its pipes and forwards it (the
    /// keeper): the daemon then holds no descriptor for it.
    pub tap: Option<Arc<OutputTap>>,
}

/// Which of an instance's output streams a chunk comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }
}

/// Where forwarded output goes (the instance's log). Called on the task that receives
/// it, in order: writes must not block for long.
pub trait OutputSink: Send + Sync {
    fn write(&self, stream: Stream, data: &[u8]);
    /// The stream reached its end (called once per stream).
    fn close(&self, stream: Stream);
}

/// Forwarded output of one instance. Until a sink is connected, output is kept (up to
/// [`OutputTap::BUFFER`] bytes; beyond that it is dropped and counted), so that nothing
/// written between the spawn and the daemon's attaching the log is lost.
#[derive(Default)]
pub struct OutputTap {
    inner: std::sync::Mutex<TapInner>,
    /// Called once when a sink connects: the forwarder may start sending (the keeper
    /// reads an instance's pipes only from then on, so nothing piles up here).
    on_connect: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

#[derive(Default)]
struct TapInner {
    sink: Option<Arc<dyn OutputSink>>,
    buffered: Vec<(Stream, Vec<u8>)>,
    buffered_bytes: usize,
    dropped: u64,
    closed: [bool; 2],
}

impl OutputTap {
    /// What a tap keeps while no sink is connected.
    pub const BUFFER: usize = 1024 * 1024;

    fn lock(&self) -> std::sync::MutexGuard<'_, TapInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A tap that calls `f` when its sink connects.
    pub fn with_on_connect(f: impl FnOnce() + Send + 'static) -> OutputTap {
        OutputTap {
            on_connect: std::sync::Mutex::new(Some(Box::new(f))),
            ..OutputTap::default()
        }
    }

    /// Sends what was kept, then everything that follows, to `sink`.
    pub fn connect(&self, sink: Arc<dyn OutputSink>) {
        self.connect_sink(sink);
        let f = self
            .on_connect
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(f) = f {
            f();
        }
    }

    fn connect_sink(&self, sink: Arc<dyn OutputSink>) {
        let mut t = self.lock();
        // Under the lock: a chunk arriving meanwhile waits, so the order is kept.
        for (stream, data) in std::mem::take(&mut t.buffered) {
            sink.write(stream, &data);
        }
        t.buffered_bytes = 0;
        if t.dropped > 0 {
            tracing::warn!(
                "{} bytes of output were dropped before the log was attached",
                t.dropped
            );
        }
        for s in [Stream::Stdout, Stream::Stderr] {
            if t.closed[s.index()] {
                sink.close(s);
            }
        }
        t.sink = Some(sink);
    }

    pub fn write(&self, stream: Stream, data: &[u8]) {
        let mut t = self.lock();
        if t.closed[stream.index()] {
            return;
        }
        if let Some(sink) = &t.sink {
            sink.write(stream, data);
        } else if t.buffered_bytes + data.len() <= Self::BUFFER {
            t.buffered_bytes += data.len();
            t.buffered.push((stream, data.to_vec()));
        } else {
            t.dropped += data.len() as u64;
        }
    }

    /// The stream ended. Returns true once both have.
    pub fn close(&self, stream: Stream) -> bool {
        let mut t = self.lock();
        if !t.closed[stream.index()] {
            t.closed[stream.index()] = true;
            if let Some(sink) = &t.sink {
                sink.close(stream);
            }
        }
        t.closed.iter().all(|c| *c)
    }

    /// Ends both streams (the forwarder went away).
    pub fn close_all(&self) {
        self.close(Stream::Stdout);
        self.close(Stream::Stderr);
    }
}

/// A driver could not start an instance.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start {program}: {source}")]
    Exec {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch pid {pid} ({source}); the process was killed")]
    Watch {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    /// Something the instance needs before its program runs could not be made (`step`).
    #[error("cannot start instance {instance}: {reason}")]
    Setup {
        instance: String,
        step: SetupStep,
        reason: String,
    },
    /// The spawn cannot be carried out as asked: an empty command, a NUL byte, a section
    /// the driver needs is missing.
    #[error("cannot start instance {instance}: {reason}")]
    Invalid { instance: String, reason: String },
    /// The keeper could not be reached or failed (not the program).
    #[error("{reason}")]
    Keeper { reason: String },
    /// The container engine is unreachable, refused or failed.
    #[error("{reason}")]
    Engine { reason: String },
    /// The container image is not in the engine or could not be built.
    #[error("{reason}")]
    Image { image: String, reason: String },
    /// A limit of the host or the driver is reached (memory below the floor, every
    /// keeper full, no id range left).
    #[error("{reason}")]
    Exhausted { reason: String },
}

impl SpawnError {
    /// What failed, as the `launch_failed` event carries it.
    pub fn kind(&self) -> bulkhead_core::failure::FailureKind {
        use bulkhead_core::failure::FailureKind as K;
        match self {
            SpawnError::Exec { .. } => K::Exec,
            SpawnError::Watch { .. } => K::Watch,
            SpawnError::Setup { .. } => K::Setup,
            SpawnError::Invalid { .. } => K::Invalid,
            SpawnError::Keeper { .. } => K::Keeper,
            SpawnError::Engine { .. } => K::Engine,
            SpawnError::Image { .. } => K::Image,
            SpawnError::Exhausted { .. } => K::Exhausted,
        }
    }

    /// A [`SpawnError::Setup`] of `instance`.
    pub fn setup(instance: &InstanceId, step: SetupStep, reason: impl fmt::Display) -> SpawnError {
        SpawnError::Setup {
            instance: instance.to_string(),
            step,
            reason: reason.to_string(),
        }
    }

    /// A [`SpawnError::Invalid`] of `instance`.
    pub fn invalid(instance: &InstanceId, reason: impl fmt::Display) -> SpawnError {
        SpawnError::Invalid {
            instance: instance.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// Which part of an instance's set-up failed ([`SpawnError::Setup`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupStep {
    /// The working directory.
    WorkingDir,
    /// The user, groups and umask.
    User,
    /// The resource limits (rlimits).
    Limits,
    /// The instance's cgroup.
    Cgroup,
    /// The output pipes.
    Pipes,
    /// The walls a driver builds around the instance (namespaces, mounts and binds,
    /// the child's own steps up to exec).
    Walls,
    /// Capabilities, seccomp, Landlock.
    Restrictions,
    /// The user namespace's id mapping and what is handed to it.
    Ids,
}

/// A signal could not be delivered.
#[derive(Debug, thiserror::Error)]
#[error("cannot send {signal} to instance {instance}: {source}")]
pub struct SignalError {
    pub instance: String,
    pub signal: Signal,
    #[source]
    pub source: std::io::Error,
}

/// Resource usage of an instance right now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// User + system CPU time of the main process and its reaped children.
    pub cpu_seconds: f64,
    /// Resident memory of the instance's processes.
    pub memory_bytes: u64,
    /// Number of live processes in the instance.
    pub pids: u32,
    /// The most memory the instance has used, where the driver can tell (a cgroup's
    /// `memory.peak` / `memory.max_usage_in_bytes`, the engine's stats).
    pub memory_peak_bytes: Option<u64>,
    /// Time the instance was held back by its CPU limit (cgroup `cpu.stat`).
    pub cpu_throttled_seconds: Option<f64>,
    /// How many times a fork failed at the pids limit (`pids.events` max).
    pub pids_limit_hits: Option<u64>,
    /// The limits in force, for showing usage against them.
    pub memory_limit_bytes: Option<u64>,
    pub pids_limit: Option<u32>,
}

/// Why an instance ended, beyond its exit status, when the driver can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCause {
    /// The kernel's OOM killer acted on the instance at its memory limit.
    OomKilled { limit_bytes: Option<u64> },
    /// The main process exited 0 by itself and left `left` live processes in the
    /// instance's cgroup: the program daemonized (double fork, `setsid`). They were
    /// killed with the instance.
    Daemonized { left: usize },
    /// The keeper that held the instance's processes died, and they with it (its
    /// parent-death signal): nothing the program did.
    KeeperDied,
}

/// How `bulkhead exec` runs a command inside an instance that a driver walls off: enter
/// the namespaces of a process of the instance (`setns` through its pidfd; a new PID
/// namespace applies to children only, so the entering process forks once more), join its
/// cgroups, keep only its capabilities.
#[derive(Debug, Clone)]
pub struct ExecTarget {
    /// A pidfd of a process inside the instance.
    pub pidfd: Arc<OwnedFd>,
    /// The `CLONE_NEW*` flags of the namespaces to enter.
    pub namespaces: i32,
    /// `cgroup.procs` files to join before the command runs.
    pub cgroup_procs: Vec<PathBuf>,
    /// What the command gives up before exec: the instance's own restrictions
    /// (capabilities, user, no_new_privs, seccomp).
    pub restrict: restrict::Restrictions,
}

/// A `MAINPID=` could not be followed ([`InstanceHandle::set_main_pid`]).
#[derive(Debug, thiserror::Error)]
pub enum MainPidError {
    #[error("this driver cannot follow another main process")]
    Unsupported,
    #[error("the run has ended")]
    Ended,
    #[error("the keeper is older than this daemon and cannot follow another main process (restart the keeper)")]
    OldKeeper,
    #[error("pid {pid} is not a process of the instance")]
    NotInInstance { pid: u32 },
    #[error("cannot watch pid {pid}: {source}")]
    Watch {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// Usage could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read usage of instance {instance}: {source}")]
pub struct StatsError {
    pub instance: String,
    #[source]
    pub source: std::io::Error,
}

/// Starts instances of one kind.
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    fn kind(&self) -> DriverKind;

    /// Starts the instance. On success its first process exists; on error nothing of it
    /// is left running.
    async fn spawn(&self, spec: SpawnSpec) -> Result<Spawned, SpawnError>;

    /// Whether every descendant of an instance, one that left its process group and
    /// session included, is found and killed with it (the default: drivers that run
    /// instances in a container or a cgroup of their own). The process driver says no
    /// where it falls back to process-group tracking.
    fn tracks_every_descendant(&self) -> bool {
        true
    }

    /// The daemon shuts down cleanly and every instance is gone: remove what the driver
    /// keeps for its instances (its empty cgroup scope directories). Blocking, quick.
    fn shutdown(&self) {}

    /// Whether `argv[0]` names a program on this host (looked up in the daemon's `PATH`
    /// and checked before the spawn). `false` for drivers whose instances run in an image
    /// of their own (docker and the cluster engines): the program is the image's.
    fn runs_host_programs(&self) -> bool {
        true
    }

    /// Every instance of this daemon the driver still holds, at the daemon's start-up
    /// (before any spawn): running ones with a handle to supervise them again, and ones
    /// that ended while no daemon watched, with their status. The daemon decides which to
    /// adopt (those its instance table knows, one per key) and hands every other one to
    /// [`discard`](Self::discard). An error means the driver could not look (its engine
    /// is unreachable): it is logged, and the table's instances of this driver are
    /// resumed by their restart policy. The default: a driver whose instances die with
    /// the daemon finds none.
    async fn recover(&self) -> Result<Vec<Found>, RecoverError> {
        Ok(Vec::new())
    }

    /// Ends a found instance the daemon does not adopt and removes what is left of it
    /// (its container, service or cgroup): nothing may run unseen. The default kills it
    /// through its handle.
    async fn discard(&self, found: Found) {
        let _ = found.spawned.handle.signal(Signal::KILL);
    }

    /// Whether the driver prepares instances ahead of their launch (`warm:`).
    fn prewarms(&self) -> bool {
        false
    }

    /// Prepares a slot for `spec` ([`warm`]): everything of a launch but the program.
    async fn prewarm(&self, spec: warm::WarmSpec) -> Result<Box<dyn warm::Warm>, SpawnError> {
        Err(SpawnError::Invalid {
            instance: spec.slot,
            reason: format!("driver {} keeps no warm pool", self.kind()),
        })
    }

    /// Starts `spec` in `slot`, which this driver made for the same workload. On an
    /// error the slot is gone (the daemon then spawns cold).
    async fn spawn_warm(
        &self,
        slot: Box<dyn warm::Warm>,
        spec: SpawnSpec,
    ) -> Result<Spawned, SpawnError> {
        slot.discard().await;
        self.spawn(spec).await
    }
}

/// A command to run inside an instance ([`InstanceHandle::engine_exec`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Variables set for the command on top of what the instance's engine gives it.
    pub env: Vec<(String, String)>,
    /// A terminal of this size (rows, columns); `None`: pipes.
    pub tty: Option<(u16, u16)>,
}

/// A command running inside an instance through its driver's engine.
pub struct EngineExec {
    /// Its standard input; shutting it down is the end of input.
    pub stdin: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
    /// Its output as it comes, in order per stream (a terminal's is all stdout); the
    /// channel closes when the command's output ends.
    pub output: tokio::sync::mpsc::Receiver<(Stream, Vec<u8>)>,
    /// Its exit status, asked once the output has ended.
    pub status:
        std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<ExitStatus>> + Send>>,
    /// Resizes its terminal (rows, columns).
    pub resize: Option<Box<dyn Fn(u16, u16) + Send + Sync>>,
    /// Ends it (the client went away).
    pub kill: Box<dyn FnOnce() + Send>,
}

/// An instance of this daemon that a driver found at start-up ([`Driver::recover`]).
pub struct Found {
    pub instance: InstanceId,
    /// The run's main process and its start time (clock ticks since boot, from
    /// `/proc/<pid>/stat`), where the driver has a host process the instance table may
    /// have recorded: a table row is this run's only if both agree. `None`: the driver's
    /// own labels identify the run, and the row with its instance id is its.
    pub process: Option<(u32, u64)>,
    /// How logs name the run ("pid 4242", "container 3f2a9c0d").
    pub describe: String,
    /// The driver's own id of the run (a container's or a service's id), for
    /// [`Driver::discard`]; empty where the handle is enough.
    pub run_id: String,
    /// The manifest and directory the run was started with, when the driver keeps them
    /// (the keeper does); `None`: the instance table's are used, and a run the table does
    /// not know is discarded.
    pub launched: Option<(WorkloadSpec, PathBuf)>,
    /// The environment the run has (what `exec` gets).
    pub env: Vec<(String, String)>,
    /// Set when the run ended while no daemon watched.
    pub exit: Option<ExitStatus>,
    pub spawned: Spawned,
    /// The listening sockets the driver kept for it (`sockets:`), in order.
    pub listen: Vec<listen::ListenFd>,
}

/// A driver could not look for its instances at start-up.
#[derive(Debug, thiserror::Error)]
#[error("{driver} driver: cannot list its instances: {reason}")]
pub struct RecoverError {
    pub driver: DriverKind,
    pub reason: String,
    /// The driver may hold running instances it cannot show: the daemon must not start
    /// (a key could get a second run). Otherwise the error is logged, and the table's
    /// instances of the driver are resumed by their restart policy.
    pub fatal: bool,
}

/// One running (or finished) instance.
#[async_trait]
pub trait InstanceHandle: Send + Sync + 'static {
    /// The main process id as the host sees it, if the driver has one.
    fn pid(&self) -> Option<u32>;

    /// Sends `signal` to every process of the instance. Succeeds when it is already gone.
    fn signal(&self, signal: Signal) -> Result<(), SignalError>;

    /// Resolves when every process of the instance is gone, with the main process's exit
    /// status. Concurrent and repeated calls all get the same status; cancel-safe.
    async fn wait(&self) -> ExitStatus;

    /// The status, if the instance is already gone.
    fn try_status(&self) -> Option<ExitStatus>;

    /// The escalation ladder: `signal` to every process, then after `grace` SIGKILL to every
    /// process; resolves when all are gone.
    async fn stop(&self, signal: Signal, grace: Duration) -> ExitStatus {
        self.stop_until(signal, KillDeadline::after(grace)).await
    }

    /// [`stop`](Self::stop) with a SIGKILL deadline its owner may move out while the stop
    /// runs (sd_notify's `EXTEND_TIMEOUT_USEC` from a program that needs longer to shut
    /// down). Drivers whose engine signals differently (Docker) override this one.
    async fn stop_until(&self, signal: Signal, mut kill_at: KillDeadline) -> ExitStatus {
        if let Some(st) = self.try_status() {
            return st;
        }
        if let Err(e) = self.signal(signal) {
            tracing::warn!("{e}");
        }
        tokio::select! {
            st = self.wait() => st,
            _ = kill_at.passed() => {
                if let Err(e) = self.signal(Signal::KILL) {
                    tracing::warn!("{e}");
                }
                self.wait().await
            }
        }
    }

    /// Current resource usage.
    fn stats(&self) -> Result<Stats, StatsError>;

    /// Why the instance ended, asked once [`wait`](Self::wait) has resolved. Drivers
    /// that enforce limits report an OOM kill here, so that it is not shown as a bare
    /// SIGKILL.
    fn exit_cause(&self) -> Option<ExitCause> {
        None
    }

    /// Where `bulkhead exec` must enter to run a command inside the instance, while it
    /// runs. `None` (the default): the command runs beside the instance, on the host.
    fn exec_target(&self) -> Option<ExecTarget> {
        None
    }

    /// Whether host process `pid` belongs to the instance, when the driver can tell
    /// better than "the main pid or its process group" (the default check, `None`): the
    /// notify socket accepts readiness only from the instance's own processes.
    fn owns_pid(&self, pid: u32) -> Option<bool> {
        let _ = pid;
        None
    }

    /// sd_notify `MAINPID=`: the instance's main process is now host process `pid` (the
    /// caller checked that it belongs to the instance), as systemd's: from now on signals,
    /// [`pid`](Self::pid), [`wait`](Self::wait)'s status and the end of the run follow it,
    /// and the exit of the process the driver started no longer ends the run. The default:
    /// the driver cannot follow another process, which the caller logs.
    fn set_main_pid(&self, pid: u32) -> Result<(), MainPidError> {
        let _ = pid;
        Err(MainPidError::Unsupported)
    }

    /// sd_notify `MAINPID=`'s value, a pid as the instance's processes see it, as the host
    /// sees it; `None`: no process of the instance has it. Drivers whose instances have a
    /// PID namespace of their own translate it; the default: the instance shares the
    /// host's.
    fn host_pid(&self, pid: u32) -> Option<u32> {
        Some(pid)
    }

    /// `hook` runs when the main process the driver started has exited, before the driver
    /// decides that the run ended: the caller reads the `MAINPID=` messages queued before
    /// that exit there (systemd reads notify messages before SIGCHLD for the same reason)
    /// and calls [`set_main_pid`](Self::set_main_pid). Drivers without `set_main_pid`
    /// ignore it. The caller installs it right after the spawn returns, when the program
    /// was given a `NOTIFY_SOCKET`; a driver that can see the exit before that (a task of
    /// its own running from the spawn) holds the decision of such a run until the hook is
    /// there.
    fn on_main_exit(&self, hook: Arc<dyn Fn() + Send + Sync>) {
        let _ = hook;
    }

    /// Readiness judged by the driver's engine (a swarm task's health, a Pod's `Ready`
    /// condition), for instances the daemon cannot probe itself (they run on another
    /// node). `Some`: the driver has mapped the manifest's readiness probes onto the
    /// engine's own, the daemon runs none of them (nor liveness probes: the driver maps
    /// or refuses them), and the instance is ready once this reads `true`. `None` (the
    /// default): the daemon runs the probes.
    fn engine_readiness(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }

    /// Runs a command inside the instance through the driver's engine (docker's exec API,
    /// a Pod's exec subresource), for instances the host cannot enter by itself. `None`
    /// (the default): the daemon runs the command itself, on the host or entering the
    /// instance's namespaces ([`exec_target`](Self::exec_target)).
    async fn engine_exec(&self, req: ExecRequest) -> Option<std::io::Result<EngineExec>> {
        let _ = req;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_kill_deadline_passes_at_its_grace_and_moves_only_out() {
        use tokio::time::{advance, Instant};
        let t0 = Instant::now();
        let mut fixed = KillDeadline::after(Duration::from_secs(2));
        fixed.passed().await;
        assert_eq!(t0.elapsed(), Duration::from_secs(2));

        let t0 = Instant::now();
        let (mut d, mover) = KillDeadline::extendable(Duration::from_secs(2));
        let waiter = tokio::spawn(async move {
            d.passed().await;
            Instant::now()
        });
        advance(Duration::from_secs(1)).await;
        // Out to 5 s from now (6 s after the start); then an attempt to move it in.
        assert!(extend(&mover, Instant::now() + Duration::from_secs(5)));
        assert!(!extend(&mover, Instant::now() + Duration::from_secs(1)));
        drop(mover);
        let at = waiter.await.unwrap();
        assert_eq!(at - t0, Duration::from_secs(6));
    }

    #[derive(Default)]
    struct Seen(std::sync::Mutex<Vec<String>>);

    impl OutputSink for Seen {
        fn write(&self, stream: Stream, data: &[u8]) {
            let s = format!("{stream:?}:{}", String::from_utf8_lossy(data));
            self.0.lock().unwrap().push(s);
        }
        fn close(&self, stream: Stream) {
            self.0.lock().unwrap().push(format!("{stream:?}:end"));
        }
    }

    #[test]
    fn a_tap_keeps_what_comes_before_the_sink_in_order_and_ends_once() {
        let tap = OutputTap::default();
        tap.write(Stream::Stdout, b"a");
        tap.write(Stream::Stderr, b"b");
        assert!(!tap.close(Stream::Stderr));
        tap.write(Stream::Stderr, b"after the end");
        let seen = Arc::new(Seen::default());
        tap.connect(seen.clone());
        tap.write(Stream::Stdout, b"c");
        assert!(tap.close(Stream::Stdout));
        tap.close_all();
        assert_eq!(
            *seen.0.lock().unwrap(),
            [
                "Stdout:a",
                "Stderr:b",
                "Stderr:end",
                "Stdout:c",
                "Stdout:end"
            ]
        );
    }

    #[test]
    fn a_tap_without_a_sink_keeps_a_bounded_amount() {
        let tap = OutputTap::default();
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..(2 * OutputTap::BUFFER / chunk.len()) {
            tap.write(Stream::Stdout, &chunk);
        }
        let seen = Arc::new(Seen::default());
        tap.connect(seen.clone());
        let kept: usize = seen
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.len() - "Stdout:".len())
            .sum();
        assert_eq!(kept, OutputTap::BUFFER);
    }
}
