//! The [`Driver`] implementation: admission, cgroup creation, the spawner thread, the
//! watcher that reaps, sweeps the cgroup and removes it.
//!
//! # Lifecycle of a handle
//!
//! | phase    | entered when                          | `signal`                  | `try_status` |
//! |----------|---------------------------------------|---------------------------|--------------|
//! | running  | spawn returned                        | to the init via its pidfd | `None`       |
//! | sweeping | the init (PID 1) was reaped           | no-op, `Ok`               | `None`       |
//! | done     | the cgroup is empty and removed       | no-op, `Ok`               | `Some`       |
//!
//! - running -> sweeping: the pidfd polls readable; `waitid(P_PIDFD)` reaps the init under
//!   the phase lock (so a signal never reaches a reused pid). The instance's status is the
//!   main process's (the workload's, or the one `MAINPID=` named: `crate::mainpid`), read
//!   from the init's status pipe (or the init's own if it was killed).
//! - sweeping -> done: the PID namespace died with its init, so the cgroup is normally
//!   empty at once; if not (a v1-only process that escaped, a slow death), `cgroup.kill`
//!   (or SIGKILL to each listed pid in v1) and poll until empty. The OOM-kill counter is
//!   read, then every cgroup directory is removed, then the status is published: `wait`
//!   means no process and no cgroup is left.
//!
//! # Daemon crashes
//!
//! Instances are children of the daemon's spawner thread and carry
//! `PR_SET_PDEATHSIG(SIGKILL)`: they die with the daemon (the PID namespace with its
//! init). The next daemon's driver removes whatever is left under its cgroup subtree at
//! start-up (kill + rmdir), and the daemon reports those instances `lost`, applying their
//! restart policy. There is no keeper for sandboxed instances. Warm slots (`driver/warm.rs`)
//! are made the same way and die and are swept the same way.

use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bulkhead_core::event::ExitStatus;
use bulkhead_core::key::InstanceId;
use bulkhead_core::sandbox::{
    id_tenant, AbstractSockets, IdBlocks, Root, SandboxSpec, UserNamespace, UserNs, AUTO_ID_BASE,
    AUTO_ID_BLOCKS,
};
use bulkhead_core::signal::Signal;
use bulkhead_core::spec::DriverKind;
use bulkhead_driver::restrict::Restrictions;
use bulkhead_driver::{
    reaper, sys, Driver, ExecTarget, ExitCause, InstanceHandle, MainPidError, SetupStep,
    SignalError, SpawnError, SpawnSpec, Spawned, Stats, StatsError,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{oneshot, watch};

use crate::cgroup::{self, Cgroups, InstanceCgroup, ModeChoice};
use crate::mainpid::MainPid;
use crate::spawn::{self, BindPlan, ChildError, Prepared};

mod warm;

/// A uid and a gid inside the instance's user namespace.
type UidGid = (u32, u32);

/// The default spawn-admission floor: 64 MiB of `MemAvailable`.
pub const DEFAULT_MIN_AVAILABLE_MEMORY: u64 = 64 << 20;

/// How the driver is set up.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Which cgroup hierarchies to use (tests force each).
    pub mode: ModeChoice,
    /// Names this daemon's subtree: `<own cgroup>/bulkhead/<scope>`.
    pub scope: String,
    /// A launch fails at once when `MemAvailable` is below this (0: no check).
    pub min_available_memory: u64,
    /// Remount the cgroup2 mount with `favordynmods` (see [`Cgroups::detect`]): makes the
    /// v1 attach of hybrid and v1 modes ~25x cheaper. Off by default: it is system-wide.
    pub favor_dynmods: bool,
    /// The first host id of the ranges `user_namespace: auto` hands out, and how many
    /// ranges of 65,536 ids there are (one per live tenant).
    pub id_base: u32,
    pub id_blocks: u32,
}

impl Default for SandboxConfig {
    fn default() -> SandboxConfig {
        SandboxConfig {
            mode: ModeChoice::Auto,
            scope: "default".to_owned(),
            min_available_memory: DEFAULT_MIN_AVAILABLE_MEMORY,
            favor_dynmods: false,
            id_base: AUTO_ID_BASE,
            id_blocks: AUTO_ID_BLOCKS,
        }
    }
}

/// The driver cannot work on this machine.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the sandbox driver needs cgroups: {0}")]
    Cgroups(#[from] cgroup::DetectError),
    #[error("the sandbox driver cannot create namespaces here: {0}")]
    Namespaces(io::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("the sandbox driver cannot load its init: {0}")]
    Init(io::Error),
}

/// bulkhead-init (`init/main.rs`), as the build script made it.
static INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/bulkhead-sandbox-init"));

/// `INIT` in a sealed memfd (nothing can change it once made), which each instance's first
/// process execs (`execveat` of the descriptor: no file on any mount, so neither the
/// sandbox's root nor a `noexec` mount matters).
fn init_memfd() -> io::Result<OwnedFd> {
    use rustix::fs::{MemfdFlags, SealFlags};
    if INIT.is_empty() {
        return Err(io::Error::other("it was not built for this platform"));
    }
    let fd = rustix::fs::memfd_create(
        "bulkhead-init",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    let mut rest = INIT;
    while !rest.is_empty() {
        let n = rustix::io::write(&fd, rest)?;
        rest = &rest[n..];
    }
    rustix::fs::fcntl_add_seals(
        &fd,
        SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL,
    )?;
    Ok(fd)
}

/// What the driver found at start-up, for `health`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// `v2`, `hybrid`, `v1` or `unified-only`.
    pub cgroup_mode: String,
    /// The controllers that enforce limits.
    pub controllers: Vec<String>,
    /// Whether instances are born in their cgroup (`CLONE_INTO_CGROUP`).
    pub clone_into_cgroup: bool,
    /// Whether cgroup migrations are cheap (`favordynmods`).
    pub favordynmods: bool,
    /// The kernel's Landlock ABI version (6 or more: abstract sockets are scoped).
    pub landlock_abi: u32,
}

/// Runs instances behind namespaces and cgroup limits. See the crate docs.
pub struct SandboxDriver {
    cgroups: Arc<Cgroups>,
    /// The default filters as classic BPF, compiled once, shared by every instance that
    /// opens no group.
    seccomp: Vec<Arc<[libc::sock_filter]>>,
    cap_last: u32,
    min_available_memory: u64,
    /// The host id ranges of `user_namespace: auto`, one per live tenant.
    ids: Arc<Mutex<IdBlocks>>,
    /// The host's system directories (a minimal root shows them).
    system: Vec<spawn::SystemEntry>,
    /// bulkhead-init, which each instance's first process execs ([`init_memfd`]).
    init_exe: Arc<OwnedFd>,
    /// The kernel's Landlock ABI (abstract-socket scoping needs 6).
    landlock_abi: u32,
}

/// One instance's hold on its tenant's id range; given back when dropped (the instance
/// is over: its watcher ends, or its spawn failed).
struct IdHold {
    ids: Arc<Mutex<IdBlocks>>,
    tenant: String,
}

impl Drop for IdHold {
    fn drop(&mut self) {
        lock(&self.ids).release(&self.tenant);
    }
}

impl std::fmt::Debug for SandboxDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxDriver")
            .field("cgroups", &self.cgroups)
            .finish_non_exhaustive()
    }
}

/// A job for the spawner thread (or the id-map writer's).
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// A long-lived thread named `name` that runs the jobs sent to it, in order; it never
/// exits.
pub(crate) fn job_thread(name: &str) -> Mutex<mpsc::Sender<Job>> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            while let Ok(job) = rx.recv() {
                job();
            }
        })
        .unwrap_or_else(|e| panic!("cannot start the thread {name}: {e}"));
    Mutex::new(tx)
}

/// The one long-lived thread every sandbox spawn runs on: `PR_SET_PDEATHSIG` fires when
/// the spawning *thread* exits, so it must live as long as the daemon (tokio's blocking
/// threads retire after 10 s idle).
fn spawner() -> &'static Mutex<mpsc::Sender<Job>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    SPAWNER.get_or_init(|| job_thread("bulkhead-sandbox-spawner"))
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether this process may create the namespaces: clone3 checks `CAP_SYS_ADMIN` in our
/// user namespace, read from `/proc/self/status` (no probe process is forked). A kernel
/// that still refuses fails the first spawn with the step that failed.
fn can_create_namespaces() -> io::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    if eff & (1 << 21) == 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "CAP_SYS_ADMIN is missing (run the daemon as root)",
        ));
    }
    Ok(())
}

impl SandboxDriver {
    /// Detects cgroups (by creating and removing a probe cgroup), removes stale instance
    /// cgroups of this scope, compiles the seccomp filter.
    pub fn new(cfg: SandboxConfig) -> Result<SandboxDriver, StartError> {
        can_create_namespaces().map_err(StartError::Namespaces)?;
        let cgroups = Cgroups::detect(cfg.mode, &cfg.scope, cfg.favor_dynmods)?;
        Ok(SandboxDriver {
            cgroups: Arc::new(cgroups),
            seccomp: crate::seccomp::programs(&[])?,
            cap_last: bulkhead_driver::restrict::cap_last(),
            min_available_memory: cfg.min_available_memory,
            ids: Arc::new(Mutex::new(IdBlocks::new(cfg.id_base, cfg.id_blocks))),
            system: spawn::system_entries(),
            init_exe: Arc::new(init_memfd().map_err(StartError::Init)?),
            landlock_abi: {
                let abi = bulkhead_driver::restrict::landlock_abi();
                if abi < 6 {
                    tracing::warn!(
                        "the kernel's Landlock ABI is {abi} (6, Linux 6.12, is needed): \
                         sandboxed workloads on the host network can reach the host's \
                         abstract Unix sockets"
                    );
                }
                abi
            },
        })
    }

    /// What the instance's processes, and every command `exec` runs in it, give up
    /// before exec.
    fn restrictions(&self, spec: &SpawnSpec, sb: &SandboxSpec) -> Result<Restrictions, SpawnError> {
        let (user, groups) = self.user(spec, sb)?;
        let seccomp = match sb.seccomp {
            bulkhead_core::sandbox::Seccomp::None => Vec::new(),
            bulkhead_core::sandbox::Seccomp::Default if sb.seccomp_allow.is_empty() => {
                self.seccomp.clone()
            }
            bulkhead_core::sandbox::Seccomp::Default => crate::seccomp::programs(&sb.seccomp_allow)
                .map_err(|e| SpawnError::setup(&spec.instance, SetupStep::Restrictions, e))?,
        };
        Ok(Restrictions {
            keep_caps: sb
                .capability_numbers()
                .iter()
                .fold(0u64, |m, c| m | (1 << c)),
            cap_last: self.cap_last,
            user,
            groups,
            landlock_scopes: if sb.abstract_sockets == AbstractSockets::Scoped
                && self.landlock_abi >= 6
            {
                bulkhead_driver::restrict::LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET
            } else {
                0
            },
            seccomp,
        })
    }

    /// The ids the workload switches to (uid, gid) and its supplementary groups: `sandbox.user`, or the manifest's `user`,
    /// `group` and `groups`, names resolved in the host's databases (which the sandbox
    /// shows at `/etc`), as ids inside the user namespace; each must be mapped there.
    fn user(
        &self,
        spec: &SpawnSpec,
        sb: &SandboxSpec,
    ) -> Result<(Option<UidGid>, Vec<u32>), SpawnError> {
        if let Some(u) = sb.user {
            return Ok((Some((u.uid, u.gid())), Vec::new()));
        }
        let other = |what: String| SpawnError::setup(&spec.instance, SetupStep::User, what);
        let Some(c) = bulkhead_driver::setup::resolve_user(&spec.spec, 0).map_err(other)? else {
            return Ok((None, Vec::new()));
        };
        let count = match &sb.user_namespace {
            UserNs::Auto => Some(bulkhead_core::sandbox::USERNS_COUNT),
            UserNs::Host => None,
            UserNs::Map(m) => Some(m.count),
        };
        if let Some(count) = count {
            let who = spec.spec.user.as_deref().unwrap_or("");
            if c.uid >= count {
                return Err(other(format!(
                    "user {who} (uid {}) is not mapped by the sandbox's user namespace (ids below {count})",
                    c.uid
                )));
            }
            if let Some(g) = c.groups.iter().chain([&c.gid]).find(|g| **g >= count) {
                return Err(other(format!(
                    "group {g} of user {who} is not mapped by the sandbox's user namespace (ids below {count})"
                )));
            }
        }
        Ok((Some((c.uid, c.gid)), c.groups))
    }

    /// The user namespace map of the instance (`None`: the host's ids), and the hold on
    /// its tenant's range for `auto`.
    fn user_namespace(
        &self,
        spec: &SpawnSpec,
        sb: &SandboxSpec,
    ) -> Result<(Option<UserNamespace>, Option<IdHold>), SpawnError> {
        match sb.user_namespace {
            UserNs::Host => Ok((None, None)),
            UserNs::Map(m) => Ok((Some(m), None)),
            // The daemon reserved its tenant's range (it needs the ids before the spawn:
            // the instance's channel space belongs to them).
            UserNs::Auto if spec.ids.is_some() => Ok((spec.ids, None)),
            UserNs::Auto => {
                let tenant = id_tenant(&spec.instance);
                let map = lock(&self.ids)
                    .acquire(&tenant)
                    .map_err(|e| SpawnError::Exhausted {
                        reason: format!("cannot start instance {}: {e}", spec.instance),
                    })?;
                Ok((
                    Some(map),
                    Some(IdHold {
                        ids: Arc::clone(&self.ids),
                        tenant,
                    }),
                ))
            }
        }
    }

    /// What was detected.
    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            cgroup_mode: self.cgroups.mode.as_str().to_owned(),
            controllers: self.cgroups.controllers(),
            clone_into_cgroup: self.cgroups.uses_unified(),
            favordynmods: self.cgroups.favordynmods,
            landlock_abi: self.landlock_abi,
        }
    }

    fn prepare(
        &self,
        spec: &SpawnSpec,
        sb: &SandboxSpec,
        userns: Option<UserNamespace>,
        restrict: Restrictions,
    ) -> Result<Prepared, SpawnError> {
        let arg0 = spec
            .argv
            .first()
            .ok_or_else(|| SpawnError::invalid(&spec.instance, "the command line is empty"))?;
        let exec_err = |source| SpawnError::Exec {
            program: arg0.clone(),
            source,
        };
        let program = resolve_program(arg0, &spec.env, &spec.cwd).map_err(exec_err)?;
        let bad =
            |what: &str| SpawnError::invalid(&spec.instance, format!("{what} contains a NUL byte"));
        let cs = |s: &[u8], what: &str| CString::new(s.to_vec()).map_err(|_| bad(what));
        let argv = spec
            .argv
            .iter()
            .map(|a| cs(a.as_bytes(), "an argument"))
            .collect::<Result<Vec<_>, _>>()?;
        let listen_env = bulkhead_driver::listen::env(&spec.listen);
        let env = spec
            .env
            .iter()
            .filter(|(k, _)| !k.starts_with("LISTEN_"))
            .chain(listen_env.iter())
            .map(|(k, v)| cs(format!("{k}={v}").as_bytes(), "the environment"))
            .collect::<Result<Vec<_>, _>>()?;

        // The spawn's own paths (notify socket, data plane), read-write; the working
        // directory (and, in a minimal root, the program) if the root does not show
        // them, read-only; then the manifest's binds.
        let minimal = sb.root == Root::Minimal;
        let masks: Vec<PathBuf> = ["/tmp", "/dev", "/proc"]
            .iter()
            .map(PathBuf::from)
            .chain(sb.tmpfs.iter().map(PathBuf::from))
            .collect();
        let mut binds: Vec<BindPlan> = spec
            .binds
            .iter()
            .map(|b| BindPlan {
                source: b.source.clone(),
                target: b.target.clone(),
                readonly: false,
            })
            .collect();
        let shown_by_root = |p: &Path| {
            if minimal {
                // A merged-/usr link (`/bin -> usr/bin`) is made again inside, so
                // `/bin/sh` is shown as it is on the host.
                self.system.iter().any(|e| match e {
                    spawn::SystemEntry::Dir(d) => p.starts_with(d),
                    spawn::SystemEntry::Symlink { path, .. } => p.starts_with(path),
                })
            } else {
                !masks.iter().any(|m| p.starts_with(m))
            }
        };
        let covered = |binds: &[BindPlan], p: &Path| {
            binds.iter().any(|b| p.starts_with(&b.target))
                || sb.binds.iter().any(|b| p.starts_with(b.target()))
                || shown_by_root(p)
        };
        let cwd = spec.cwd.canonicalize().unwrap_or_else(|_| spec.cwd.clone());
        // Never the host's `/` itself (a working directory of `/` is the root's own).
        if cwd.parent().is_some() && !covered(&binds, &cwd) {
            binds.push(BindPlan {
                source: cwd.clone(),
                target: cwd.clone(),
                readonly: true,
            });
        }
        if minimal {
            // The program the manifest names, if the minimal root does not show it (a
            // binary of the workload's own, outside its folder).
            let real = program.canonicalize().unwrap_or_else(|_| program.clone());
            if !covered(&binds, &program) && real.is_file() {
                binds.push(BindPlan {
                    source: real,
                    target: program.clone(),
                    readonly: true,
                });
            }
        }
        for b in &sb.binds {
            binds.push(BindPlan {
                source: PathBuf::from(&b.source),
                target: PathBuf::from(b.target()),
                readonly: b.readonly,
            });
        }
        if let Some(ns) = &userns {
            // The spawn's notify socket was made for this instance by the daemon (root):
            // root inside (the mapped uid) must be allowed to send to it.
            for p in spec.binds.iter().map(|b| &b.source) {
                let is_socket = p
                    .symlink_metadata()
                    .is_ok_and(|m| m.file_type().is_socket());
                if is_socket {
                    std::os::unix::fs::chown(p, Some(ns.uid), Some(ns.gid())).map_err(|e| {
                        SpawnError::setup(
                            &spec.instance,
                            SetupStep::Ids,
                            format!("cannot hand {} to the user namespace: {e}", p.display()),
                        )
                    })?;
                }
            }
        }
        let inputs = spawn::MountInputs {
            binds: &binds,
            userns: userns.is_some(),
            system: &self.system,
        };
        let (mounts, slots) = spawn::mount_program(sb, &inputs).map_err(|e| {
            SpawnError::setup(
                &spec.instance,
                SetupStep::Walls,
                format!("bad mount path: {e}"),
            )
        })?;
        // The manifest's working_dir (a path inside, relative ones to the folder).
        let workdir = bulkhead_core::execution::working_dir(&spec.spec, &cwd);
        let limits = bulkhead_driver::setup::limit_settings(&spec.spec)
            .map_err(|e| SpawnError::setup(&spec.instance, SetupStep::Limits, e))?;
        // A child in a new user namespace cannot raise a hard limit at all.
        bulkhead_driver::setup::check_limits(&limits, userns.is_none())
            .map_err(|e| SpawnError::setup(&spec.instance, SetupStep::Limits, e))?;
        let rlimits = limits
            .iter()
            .filter_map(|l| {
                let res = bulkhead_driver::setup::resource(&l.name)?;
                let v = |x: Option<u64>| x.unwrap_or(libc::RLIM_INFINITY);
                Some((
                    l.name.clone(),
                    res,
                    libc::rlimit {
                        rlim_cur: v(l.soft),
                        rlim_max: v(l.hard),
                    },
                ))
            })
            .collect();
        let umask = spec
            .spec
            .umask
            .as_deref()
            .and_then(|m| bulkhead_core::execution::parse_umask(m).ok());
        let hostname = sb
            .hostname
            .clone()
            .unwrap_or_else(|| spec.instance.to_string())
            .into_bytes();
        Ok(Prepared {
            program: cs(program.as_os_str().as_bytes(), "the program path")?,
            argv,
            env,
            cwd: cs(workdir.as_os_str().as_bytes(), "the working directory")?,
            hostname: hostname[..hostname.len().min(64)].to_vec(),
            net: sb.network.isolated(),
            init: sb.init,
            early_mounts: mounts.iter().take_while(|m| m.is_early()).count(),
            mounts,
            slots,
            restrict,
            userns: userns.map(|ns| (ns.uid_map(), ns.gid_map())),
            umask,
            rlimits,
            cgroup_fd: None,
            v1_procs: Vec::new(),
            title: format!("bulkhead-init {}\0", spec.instance).into_bytes(),
            init_exe: std::os::fd::AsRawFd::as_raw_fd(&*self.init_exe),
            listen: spec.listen.clone(),
        })
    }
}

/// Finds the program like `execvp`, in the instance's `PATH` (as the process driver).
fn resolve_program(arg0: &str, env: &[(String, String)], cwd: &Path) -> io::Result<PathBuf> {
    if arg0.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the program name is empty",
        ));
    }
    if arg0.contains('/') {
        return Ok(cwd.join(arg0));
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or("/bin:/usr/bin", |(_, v)| v.as_str());
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
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

#[async_trait]
impl Driver for SandboxDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Sandbox
    }

    /// A clean shutdown: no scope directory is left in any hierarchy (the driver itself
    /// may never be dropped before the process exits).
    fn shutdown(&self) {
        self.cgroups.remove_scope();
    }

    fn prewarms(&self) -> bool {
        true
    }

    async fn prewarm(
        &self,
        spec: bulkhead_driver::warm::WarmSpec,
    ) -> Result<Box<dyn bulkhead_driver::warm::Warm>, SpawnError> {
        Ok(Box::new(self.make_slot(spec).await?))
    }

    async fn spawn_warm(
        &self,
        slot: Box<dyn bulkhead_driver::warm::Warm>,
        spec: SpawnSpec,
    ) -> Result<Spawned, SpawnError> {
        match slot.into_any().downcast::<warm::Slot>() {
            Ok(slot) => self.take_slot(slot, spec).await,
            Err(_) => Err(SpawnError::invalid(
                &spec.instance,
                "the warm slot was not made by the sandbox driver",
            )),
        }
    }

    async fn spawn(&self, spec: SpawnSpec) -> Result<Spawned, SpawnError> {
        let setup = |step, what: String| SpawnError::setup(&spec.instance, step, what);
        if self.min_available_memory > 0 {
            if let Some(avail) = cgroup::mem_available() {
                if avail < self.min_available_memory {
                    return Err(SpawnError::Exhausted {
                        reason: format!(
                            "cannot start instance {}: only {} MiB of memory is available, \
                             below the floor of {} MiB (--min-available-memory)",
                            spec.instance,
                            avail >> 20,
                            self.min_available_memory >> 20
                        ),
                    });
                }
            }
        }
        let sb = spec.spec.sandbox.clone().unwrap_or_default();
        let restrict = self.restrictions(&spec, &sb)?;
        // Held until the instance is over (moved into its watcher below); a failed
        // spawn drops it on return.
        let (userns, id_hold) = self.user_namespace(&spec, &sb)?;
        let mut prepared = self.prepare(&spec, &sb, userns, restrict.clone())?;
        let (cg, (out_r, out_w, err_r, err_w)) = self.cgroups_and_pipes(
            spec.instance.as_str(),
            spec.spec.resources.as_ref(),
            &mut prepared,
            setup,
        )?;

        // The clone happens on the spawner thread; no await point between the result and
        // the watcher start below, so a cancelled spawn cannot lose the child... except
        // here: if this future is dropped while waiting, the job still runs and its
        // result is dropped; the child then dies at once (see `Job` result handling).
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            // RACE: the reaper lock is held from before the clone until the pid is
            // registered, so that the daemon's orphan reaper never takes the status; not
            // longer (the rest of the child's setup is awaited without it, and a failed
            // child is reaped and unregistered: `spawn::abandon`).
            let lock = reaper::Registry::global().lock();
            let res = spawn::spawn(&prepared, &out_w, &err_w, move |pid| {
                let mut lock = lock;
                lock.register(pid)
            });
            drop((out_w, err_w, prepared));
            if let Err(Ok(child)) = tx.send(res) {
                // The caller went away: nothing will watch this instance.
                let _ =
                    rustix::process::pidfd_send_signal(&child.pidfd, rustix::process::Signal::KILL);
                let _ = sys::reap_blocking(child.pid);
                reaper::Registry::global().unregister(child.pid);
            }
        });
        if lock(spawner()).send(job).is_err() {
            cg.remove();
            return Err(setup(SetupStep::Walls, "the spawner thread is gone".into()));
        }
        let child = match rx.await {
            Ok(Ok(child)) => child,
            Ok(Err(e)) => {
                cg.remove();
                return Err(match e {
                    ChildError::Exec { source, .. } => SpawnError::Exec {
                        program: spec.argv[0].clone(),
                        source,
                    },
                    // The clone or a step of the child's walls (namespaces, mounts,
                    // user, restrictions) failed.
                    e => setup(SetupStep::Walls, e.to_string()),
                });
            }
            Err(_) => {
                cg.remove();
                return Err(setup(
                    SetupStep::Walls,
                    "the spawner thread dropped the request".into(),
                ));
            }
        };
        tracing::debug!(instance = %spec.instance, pid = child.pid, "sandbox spawned");
        watch_started(
            &spec.instance,
            Started {
                pid: child.pid,
                pidfd: child.pidfd,
                status: child.status,
                ctl: child.ctl,
                cgroup: cg,
                out_r,
                err_r,
                notify: has_notify_socket(&spec.env),
            },
            &sb,
            userns.is_some(),
            restrict,
            id_hold,
        )
    }
}

impl SandboxDriver {
    /// The cgroups of one instance (or slot) named `name`, limited as `resources` say and
    /// opened into `prepared` for the clone, and its output pipes (read ends first of
    /// each pair). On an error nothing of them is left.
    fn cgroups_and_pipes(
        &self,
        name: &str,
        resources: Option<&bulkhead_core::spec::Resources>,
        prepared: &mut spawn::Prepared,
        setup: impl Fn(SetupStep, String) -> SpawnError,
    ) -> Result<(InstanceCgroup, OutputPipes), SpawnError> {
        let cg = self
            .cgroups
            .create(name, resources)
            .map_err(|e| setup(SetupStep::Cgroup, e.to_string()))?;
        let fds = cg.open_unified().and_then(|u| Ok((u, cg.open_v1_procs()?)));
        match fds {
            Ok((u, v1)) => {
                prepared.cgroup_fd = u;
                prepared.v1_procs = v1;
            }
            Err(e) => {
                cg.remove();
                return Err(setup(
                    SetupStep::Cgroup,
                    format!("cannot open its cgroup: {e}"),
                ));
            }
        }
        let pipes = (|| -> io::Result<_> {
            let (out_r, out_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
            let (err_r, err_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
            Ok((out_r, out_w, err_r, err_w))
        })();
        match pipes {
            Ok(p) => Ok((cg, p)),
            Err(e) => {
                cg.remove();
                Err(setup(
                    SetupStep::Pipes,
                    format!("cannot create output pipes: {e}"),
                ))
            }
        }
    }
}

/// Whether a program started with `env` can send sd_notify messages.
pub(crate) fn has_notify_socket(env: &[(String, String)]) -> bool {
    env.iter().any(|(k, _)| k == "NOTIFY_SOCKET")
}

/// An instance's output pipes: stdout's read and write ends, then stderr's.
type OutputPipes = (OwnedFd, OwnedFd, OwnedFd, OwnedFd);

/// An instance whose program runs (cold, or handed over in a warm slot), before it is
/// watched.
struct Started {
    pid: u32,
    pidfd: OwnedFd,
    /// The init's status pipe (only with our init).
    status: Option<OwnedFd>,
    /// The init's `MAINPID=` control pipe (only with our init).
    ctl: Option<OwnedFd>,
    cgroup: InstanceCgroup,
    out_r: OwnedFd,
    err_r: OwnedFd,
    /// The program was given a `NOTIFY_SOCKET`: the daemon will install a hook with
    /// `on_main_exit` (see [`MainPid::new`]).
    notify: bool,
}

/// The end of every spawn: the instance watched through its pidfd (and its OOM events),
/// as a handle. `user_ns`: it has a user namespace of its own, which `exec` must enter
/// too. `id_hold` is kept until the instance is over.
fn watch_started(
    instance: &InstanceId,
    started: Started,
    sb: &SandboxSpec,
    user_ns: bool,
    restrict: Restrictions,
    id_hold: Option<IdHold>,
) -> Result<Spawned, SpawnError> {
    let Started {
        pid,
        pidfd,
        status,
        ctl,
        cgroup: cg,
        out_r,
        err_r,
        notify,
    } = started;
    let pidfd = Arc::new(pidfd);
    // SAFETY: the AsyncFd owns a clone of the Arc<OwnedFd>; the descriptor is closed
    // only when the last clone drops, after the AsyncFd.
    let registered =
        unsafe { AsyncFd::register_with_interest(Arc::clone(&pidfd), Interest::READABLE) };
    let afd = match registered {
        Ok(afd) => afd,
        Err(e) => {
            let _ = sys::pidfd_send_signal(&pidfd, Signal::KILL);
            let _ = sys::reap_blocking(pid);
            reaper::Registry::global().unregister(pid);
            // The init's end takes its PID namespace; what is left goes with the cgroup.
            cg.kill_all();
            cg.remove();
            return Err(SpawnError::Watch {
                pid,
                source: e.into_parts().1,
            });
        }
    };
    let mut namespaces =
        libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if sb.network.isolated() {
        namespaces |= libc::CLONE_NEWNET;
    }
    if user_ns {
        // exec must enter it too, or its commands would run as the host's root.
        namespaces |= libc::CLONE_NEWUSER;
    }
    let shared = Arc::new(Shared {
        pid,
        namespaces,
        restrict,
        phase: Mutex::new(Phase::Running),
        cause: Mutex::new(None),
        cgroup: cg,
        main: ctl.map(|ctl| Arc::new(MainPid::new(instance.as_str(), pid, ctl, notify))),
    });
    // v1 has no `memory.oom.group`: an OOM kill of one process (not the main one)
    // would leave the instance running without it, unreported. Like v2 (and systemd's
    // default `OOMPolicy=stop`), the instance ends on any OOM kill in it.
    let oom_events = match shared.cgroup.v1_oom_events() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(
                instance = %instance,
                "cannot watch the instance's OOM events (an OOM kill of a child will \
                 be reported only when the instance ends): {e}"
            );
            None
        }
    };
    let (stx, srx) = watch::channel(None);
    tokio::spawn(watch_instance(
        afd,
        status,
        oom_events,
        Arc::clone(&shared),
        stx,
        id_hold,
    ));
    Ok(Spawned {
        handle: Arc::new(SandboxHandle {
            instance: instance.to_string(),
            shared,
            pidfd,
            status: srx,
        }),
        stdout: Some(out_r),
        stderr: Some(err_r),
        tap: None,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Sweeping,
    Done,
}

struct Shared {
    pid: u32,
    namespaces: i32,
    restrict: Restrictions,
    /// Taken around the reap and around every signal (see the table).
    phase: Mutex<Phase>,
    cause: Mutex<Option<ExitCause>>,
    cgroup: InstanceCgroup,
    /// `MAINPID=` (only with our init).
    main: Option<Arc<MainPid>>,
}

/// Decodes a raw wait status as the init wrote it.
pub(crate) fn decode(st: i32) -> ExitStatus {
    if libc::WIFEXITED(st) {
        ExitStatus::Exited {
            code: libc::WEXITSTATUS(st),
        }
    } else {
        ExitStatus::Signaled {
            signal: libc::WTERMSIG(st),
            core_dumped: libc::WCOREDUMP(st),
        }
    }
}

async fn watch_instance(
    afd: AsyncFd<Arc<OwnedFd>>,
    status_pipe: Option<OwnedFd>,
    oom_events: Option<OwnedFd>,
    shared: Arc<Shared>,
    tx: watch::Sender<Option<ExitStatus>>,
    // Given back once the instance is over (dropped at the end of this task).
    _id_hold: Option<IdHold>,
) {
    let oom_watch = oom_events.map(|fd| tokio::spawn(end_on_oom_kill(fd, Arc::clone(&shared))));
    // The init reports its main process's end on the status pipe and waits for our
    // answer (see `crate::mainpid`).
    let followed = (shared.main.clone())
        .zip(status_pipe)
        .map(|(main, fd)| tokio::spawn(main.follow(fd)));
    let init_status = reap_main(&afd, &shared).await;
    if let Some(w) = oom_watch {
        w.abort();
    }
    reaper::Registry::global().unregister(shared.pid);
    drop(afd);
    // The main process's status, as the init reported it; a killed init reported none.
    let status = match followed {
        Some(task) => task.await.ok().flatten(),
        None => None,
    }
    .unwrap_or(init_status);
    let sh = Arc::clone(&shared);
    let swept = tokio::task::spawn_blocking(move || {
        let cg = &sh.cgroup;
        let mut delay = Duration::from_micros(500);
        let mut waited = Duration::ZERO;
        while !cg.is_empty() {
            cg.kill_all();
            std::thread::sleep(delay);
            waited += delay;
            delay = (delay * 2).min(Duration::from_millis(50));
            if waited > Duration::from_secs(5) {
                tracing::warn!(
                    pid = sh.pid,
                    "sandbox processes still alive 5 s after SIGKILL; still waiting"
                );
                waited = Duration::ZERO;
            }
        }
        let usage = cg.usage();
        tracing::debug!(pid = sh.pid, ?usage, "final cgroup usage");
        if usage.oom_kills > 0 {
            *lock(&sh.cause) = Some(ExitCause::OomKilled {
                limit_bytes: cg.memory_limit,
            });
        }
        cg.remove();
    })
    .await;
    if let Err(e) = swept {
        tracing::error!(pid = shared.pid, "sandbox sweep failed: {e}");
    }
    *lock(&shared.phase) = Phase::Done;
    tracing::debug!(pid = shared.pid, %status, "sandbox instance ended");
    tx.send_replace(Some(status));
}

/// v1: waits for an OOM event of the instance's memory cgroup that killed a process, then
/// kills the whole instance; its end is then reported `oom_killed` (the sweep reads the
/// same counter). Aborted when the main process has been reaped.
async fn end_on_oom_kill(eventfd: OwnedFd, shared: Arc<Shared>) {
    // SAFETY: the AsyncFd takes ownership of the OwnedFd: the descriptor stays open and
    // the same until the AsyncFd drops.
    let afd =
        match unsafe { AsyncFd::register_with_interest(eventfd, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
        {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(pid = shared.pid, "cannot poll the OOM eventfd: {e}");
                return;
            }
        };
    loop {
        let Ok(mut ready) = afd.readable().await else {
            return;
        };
        let mut count = [0u8; 8];
        if rustix::io::read(afd.get_ref(), &mut count).is_err() {
            ready.clear_ready();
            continue;
        }
        // The kernel notifies *before* its OOM killer picks a victim, and also when it
        // only reclaimed or when the cgroup goes away: act only on a kill, which follows
        // a notification within milliseconds if it comes at all.
        let mut killed = false;
        for _ in 0..50 {
            if shared.cgroup.usage().oom_kills > 0 {
                killed = true;
                break;
            }
            if *lock(&shared.phase) != Phase::Running {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !killed {
            continue;
        }
        // RACE: the main process may be exiting at this very moment; killing what is left
        // of the cgroup is then what the sweep does anyway, and the phase check keeps us
        // from signalling after the sweep started.
        if *lock(&shared.phase) != Phase::Running {
            return;
        }
        tracing::info!(
            pid = shared.pid,
            "a process of the instance was OOM-killed: ending the instance"
        );
        shared.cgroup.kill_all();
        return;
    }
}

async fn reap_main(afd: &AsyncFd<Arc<OwnedFd>>, shared: &Shared) -> ExitStatus {
    loop {
        let mut ready = match afd.readable().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(pid = shared.pid, "cannot poll the pidfd: {e}");
                return std::future::pending().await;
            }
        };
        let mut phase = lock(&shared.phase);
        match sys::waitid_pidfd(afd.get_ref()) {
            Ok(Some(st)) => {
                *phase = Phase::Sweeping;
                return st;
            }
            Ok(None) => {
                drop(phase);
                ready.clear_ready();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::error!(pid = shared.pid, "cannot reap the sandbox init: {e}");
                *phase = Phase::Sweeping;
                return bulkhead_driver::process::LOST_STATUS;
            }
        }
    }
}

/// The handle of one sandboxed instance.
struct SandboxHandle {
    instance: String,
    shared: Arc<Shared>,
    pidfd: Arc<OwnedFd>,
    status: watch::Receiver<Option<ExitStatus>>,
}

#[async_trait]
impl InstanceHandle for SandboxHandle {
    fn pid(&self) -> Option<u32> {
        let moved = self.shared.main.as_ref().and_then(|m| m.moved());
        Some(moved.unwrap_or(self.shared.pid))
    }

    fn set_main_pid(&self, pid: u32) -> Result<(), MainPidError> {
        if *lock(&self.shared.phase) != Phase::Running {
            return Err(MainPidError::Ended);
        }
        // Without our init the workload is PID 1: its end is the namespace's.
        let main = self.shared.main.as_ref().ok_or(MainPidError::Unsupported)?;
        main.set(pid)
    }

    fn on_main_exit(&self, hook: Arc<dyn Fn() + Send + Sync>) {
        if let Some(main) = &self.shared.main {
            main.on_exit(hook);
        }
    }

    fn host_pid(&self, pid: u32) -> Option<u32> {
        self.shared
            .main
            .as_ref()?
            .host_pid(&self.shared.cgroup, pid)
    }

    fn owns_pid(&self, pid: u32) -> Option<bool> {
        self.shared.main.as_ref()?.owns(pid)
    }

    fn signal(&self, signal: Signal) -> Result<(), SignalError> {
        let phase = lock(&self.shared.phase);
        if *phase != Phase::Running {
            return Ok(());
        }
        // To the init, which forwards it to every process of the namespace; SIGKILL kills
        // the init and with it the whole namespace.
        sys::pidfd_send_signal(&self.pidfd, signal).map_err(|source| SignalError {
            instance: self.instance.clone(),
            signal,
            source,
        })
    }

    async fn wait(&self) -> ExitStatus {
        let mut rx = self.status.clone();
        match rx.wait_for(Option::is_some).await.map(|s| *s) {
            Ok(Some(st)) => st,
            _ => {
                tracing::error!(instance = %self.instance, "the sandbox watcher is gone");
                std::future::pending().await
            }
        }
    }

    fn try_status(&self) -> Option<ExitStatus> {
        *self.status.borrow()
    }

    fn stats(&self) -> Result<Stats, StatsError> {
        if *lock(&self.shared.phase) == Phase::Done {
            return Ok(Stats::default());
        }
        let cg = &self.shared.cgroup;
        let u = cg.usage();
        Ok(Stats {
            cpu_seconds: u.cpu_seconds,
            memory_bytes: u.memory_bytes,
            pids: u.pids,
            memory_peak_bytes: u.memory_peak_bytes,
            cpu_throttled_seconds: u.cpu_throttled_seconds,
            pids_limit_hits: u.pids_limit_hits,
            memory_limit_bytes: cg.memory_limit,
            pids_limit: cg.pids_limit,
        })
    }

    fn exit_cause(&self) -> Option<ExitCause> {
        *lock(&self.shared.cause)
    }

    fn exec_target(&self) -> Option<ExecTarget> {
        if *lock(&self.shared.phase) != Phase::Running {
            return None;
        }
        let cg = &self.shared.cgroup;
        Some(ExecTarget {
            pidfd: Arc::clone(&self.pidfd),
            namespaces: self.shared.namespaces,
            cgroup_procs: cg
                .unified
                .iter()
                .chain(cg.v1.iter().map(|(_, d)| d))
                .map(|d| d.join("cgroup.procs"))
                .collect(),
            restrict: self.shared.restrict.clone(),
        })
    }
}
