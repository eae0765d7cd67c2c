//! cgroups: detection, one subtree per daemon, one cgroup per instance, limits, usage,
//! teardown.
//!
//! # Layout
//!
//! Every hierarchy the driver uses gets `<own>/bulkhead/<scope>/<instance>-<seq>`, where
//! `<own>` is the daemon's own cgroup in that hierarchy (from `/proc/self/cgroup`: the
//! processes of a session may already sit in a cgroup made for them, and creating at the
//! controller roots would escape it), `<scope>` names the daemon (the daemon passes a
//! hash of its daemon id, which a copy of a state directory does not share, so that
//! daemons sharing a cgroup never touch each other's instances) and
//! `<seq>` makes every spawn's cgroup new.
//!
//! # Modes (detected by trying, never assumed)
//!
//! - **v2**: `/sys/fs/cgroup` is cgroup2 with the `memory`, `pids` and `cpu` controllers
//!   delegated to our subtree: one cgroup holds membership and limits.
//! - **hybrid** (this machine): a controller-less cgroup2 mount (`/sys/fs/cgroup/unified`)
//!   holds membership (`CLONE_INTO_CGROUP`, `cgroup.kill`, `cgroup.procs`), the v1
//!   controllers (`memory`, `cpu`, `cpuacct`, `pids`, `cpuset`) hold the limits. The child
//!   joins its v1 cgroups itself before exec (writing `0` into `cgroup.procs` files opened
//!   before the clone).
//! - **v1**: only v1 controllers (forced in tests, or when no cgroup2 mount is usable).
//!
//! A hierarchy in which the probe cgroup cannot be created and removed is left out.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bulkhead_core::spec::Resources;
pub use bulkhead_driver::cgroup::SUPERVISOR_LEAF;
use bulkhead_driver::cgroup::{
    cgroup_mounts, instance_dir_name, keyed, kill_members, own_path, own_v2_path, procs,
    remove_dir_retrying, write_file,
};

/// The CFS period used for CPU limits, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

/// Which cgroup hierarchies to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModeChoice {
    /// Whatever works here: v2 if it has controllers, else hybrid, else v1.
    #[default]
    Auto,
    /// Only the v1 controllers (attach before exec).
    V1,
    /// Only the cgroup2 mount (`CLONE_INTO_CGROUP`); limits only if it has controllers.
    Unified,
}

/// What detection found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    V2,
    Hybrid,
    V1,
    /// cgroup2 membership without controllers: no limits can be enforced.
    UnifiedOnly,
}

impl Mode {
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::V2 => "v2",
            Mode::Hybrid => "hybrid",
            Mode::V1 => "v1",
            Mode::UnifiedOnly => "unified-only",
        }
    }
}

/// A v1 controller the driver knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V1 {
    Memory,
    Cpu,
    Cpuacct,
    Pids,
    Cpuset,
}

impl V1 {
    const ALL: [V1; 5] = [V1::Memory, V1::Cpu, V1::Cpuacct, V1::Pids, V1::Cpuset];

    pub fn name(self) -> &'static str {
        match self {
            V1::Memory => "memory",
            V1::Cpu => "cpu",
            V1::Cpuacct => "cpuacct",
            V1::Pids => "pids",
            V1::Cpuset => "cpuset",
        }
    }
}

/// The cgroups could not be set up at start-up.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("no usable cgroup hierarchy (tried {tried}): {reasons}")]
    Nothing { tried: String, reasons: String },
}

/// An instance's cgroup could not be created or limited.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up cgroup {path}: {source}")]
pub struct CreateError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// The daemon's cgroup subtrees.
#[derive(Debug)]
pub struct Cgroups {
    pub mode: Mode,
    /// The kernel's cgroup rwsem favours writers (`favordynmods` on a mount): a v1 attach
    /// then costs ~0.4 ms instead of a ~10 ms RCU grace period.
    pub favordynmods: bool,
    /// `<unified mount>/<own>/bulkhead/<scope>`, with whether it has controllers (v2).
    unified: Option<PathBuf>,
    /// `<mount>/<own>/bulkhead/<scope>` per v1 controller.
    v1: Vec<(V1, PathBuf)>,
    seq: AtomicU64,
}

/// Creates `dir` and its missing parents; in a cpuset hierarchy each new level copies its
/// parent's `cpuset.cpus` and `cpuset.mems` (v1 leaves them empty, which forbids tasks).
fn create_dirs(dir: &Path, cpuset: bool) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dirs(parent, cpuset)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    if cpuset {
        if let Some(parent) = dir.parent() {
            for f in ["cpuset.cpus", "cpuset.mems"] {
                let v = fs::read_to_string(parent.join(f))?;
                write_file(&dir.join(f), v.trim())?;
            }
        }
    }
    Ok(())
}

fn has_dynmods(opts: &str) -> bool {
    opts.split(',').any(|o| o == "favordynmods")
}

/// `mount -o remount` of a cgroup2 mount with its options plus `favordynmods`.
fn remount_favordynmods(mount: &Path, opts: &str) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let data: Vec<&str> = opts
        .split(',')
        .filter(|o| !o.is_empty() && *o != "rw" && *o != "ro")
        .chain(std::iter::once("favordynmods"))
        .collect();
    let target = std::ffi::CString::new(mount.as_os_str().as_bytes())?;
    let data = std::ffi::CString::new(data.join(","))?;
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT,
            data.as_ptr().cast(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes and removes a probe cgroup under `base`: the hierarchy is usable.
fn probe(base: &Path, cpuset: bool) -> io::Result<()> {
    bulkhead_driver::cgroup::create_scope_dir(base, |b| create_dirs(b, cpuset))?;
    let p = base.join(format!("probe-{}", std::process::id()));
    let _ = fs::remove_dir(&p);
    fs::create_dir(&p)?;
    fs::remove_dir(&p)
}

impl Cgroups {
    /// Finds the hierarchies, creates `<own>/bulkhead/<scope>` in each, and removes what a
    /// previous daemon of the same scope left there (killing its processes).
    ///
    /// With `favor_dynmods`, the cgroup2 mount is remounted with `favordynmods` if it is
    /// not already (a system-wide setting: the rwsem it changes is global; forks and exits
    /// everywhere take a slightly slower path, cgroup migrations a much faster one).
    pub fn detect(
        choice: ModeChoice,
        scope: &str,
        favor_dynmods: bool,
    ) -> Result<Cgroups, DetectError> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mut mounts = cgroup_mounts(&mountinfo);
        if favor_dynmods && !mounts.iter().any(|(_, _, o)| has_dynmods(o)) {
            if let Some((m, _, opts)) = mounts.iter().find(|(_, t, _)| t == "cgroup2") {
                match remount_favordynmods(m, opts) {
                    Ok(()) => {
                        let mi = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
                        mounts = cgroup_mounts(&mi);
                    }
                    Err(e) => {
                        tracing::warn!("cannot remount {} with favordynmods: {e}", m.display())
                    }
                }
            }
        }
        let favordynmods = mounts.iter().any(|(_, _, o)| has_dynmods(o));
        let mut reasons = Vec::new();
        let sub = |mount: &Path, own: &str| {
            mount
                .join(own.trim_start_matches('/'))
                .join("bulkhead")
                .join(scope)
        };

        let mut unified = None;
        let mut unified_controllers = false;
        if choice != ModeChoice::V1 {
            // Prefer /sys/fs/cgroup itself, then any other cgroup2 mount.
            let mut v2mounts: Vec<&PathBuf> = mounts
                .iter()
                .filter(|(_, t, _)| t == "cgroup2")
                .map(|(m, _, _)| m)
                .collect();
            v2mounts.sort_by_key(|m| *m != Path::new("/sys/fs/cgroup"));
            if let (Some(mount), Some(own)) = (v2mounts.first(), own_v2_path(&own)) {
                let base = sub(mount, &own);
                match probe(&base, false) {
                    Ok(()) => {
                        let own_dir = mount.join(own.trim_start_matches('/'));
                        unified_controllers = enable_controllers(mount, &own_dir, &base);
                        unified = Some(base);
                    }
                    Err(e) => reasons.push(format!("{}: {e}", base.display())),
                }
            } else {
                reasons.push("no cgroup2 mount".to_owned());
            }
        }
        let mut v1 = Vec::new();
        if choice != ModeChoice::Unified && !unified_controllers {
            for c in V1::ALL {
                let mount = mounts
                    .iter()
                    .find(|(_, t, opts)| t == "cgroup" && opts.split(',').any(|o| o == c.name()));
                let (Some((mount, _, _)), Some(own)) = (mount, own_path(&own, c.name())) else {
                    continue;
                };
                let base = sub(mount, &own);
                match probe(&base, c == V1::Cpuset) {
                    Ok(()) => v1.push((c, base)),
                    Err(e) => reasons.push(format!("{}: {e}", base.display())),
                }
            }
        }
        let mode = match (&unified, unified_controllers, v1.is_empty()) {
            (Some(_), true, _) => Mode::V2,
            (Some(_), false, false) => Mode::Hybrid,
            (Some(_), false, true) => Mode::UnifiedOnly,
            (None, _, false) => Mode::V1,
            (None, _, true) => {
                return Err(DetectError::Nothing {
                    tried: format!("{choice:?}"),
                    reasons: reasons.join("; "),
                })
            }
        };
        let cg = Cgroups {
            mode,
            favordynmods,
            unified,
            v1,
            seq: AtomicU64::new(0),
        };
        cg.remove_stale();
        Ok(cg)
    }

    /// The controllers that enforce limits, for `health`.
    pub fn controllers(&self) -> Vec<String> {
        if self.mode == Mode::V2 {
            return ["memory", "pids", "cpu", "cpuset"]
                .iter()
                .map(|s| (*s).to_owned())
                .collect();
        }
        self.v1.iter().map(|(c, _)| c.name().to_owned()).collect()
    }

    /// Whether the cgroup2 path (`CLONE_INTO_CGROUP`) is used.
    pub fn uses_unified(&self) -> bool {
        self.unified.is_some()
    }

    /// Kills and removes every instance cgroup left under our subtree (a previous daemon
    /// of this scope crashed; its instances are reported `lost` by the next daemon).
    fn remove_stale(&self) {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for base in self.unified.iter().chain(self.v1.iter().map(|(_, b)| b)) {
            if let Ok(rd) = fs::read_dir(base) {
                dirs.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
            }
        }
        if dirs.is_empty() {
            return;
        }
        tracing::warn!("removing {} stale instance cgroup(s)", dirs.len());
        for d in &dirs {
            kill_members(d);
        }
        for d in &dirs {
            if let Err(e) = remove_dir_retrying(d) {
                tracing::warn!("cannot remove stale cgroup {}: {e}", d.display());
            }
        }
    }

    /// Creates the cgroups of one instance and applies `resources`. On error nothing of it
    /// is left.
    pub fn create(
        &self,
        instance: &str,
        resources: Option<&Resources>,
    ) -> Result<InstanceCgroup, CreateError> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let name = instance_dir_name(instance, seq);
        let mut cg = InstanceCgroup {
            unified: None,
            unified_has_controllers: self.mode == Mode::V2,
            v1: Vec::new(),
            memory_limit: resources.and_then(|r| r.memory),
            pids_limit: resources.and_then(|r| r.pids),
        };
        let err = |path: &Path| {
            let path = path.to_owned();
            move |source| CreateError { path, source }
        };
        if let Some(base) = &self.unified {
            let dir = base.join(&name);
            fs::create_dir(&dir).map_err(err(&dir))?;
            cg.unified = Some(dir);
        }
        // Every v1 hierarchy joined costs the child a cgroup migration before exec: only
        // the ones that hold a limit, plus memory (usage, peak, OOM kills). With a cgroup2
        // membership, CPU time comes from its cpu.stat and the process count from its
        // cgroup.procs.
        let unified = self.unified.is_some();
        let wanted = |c: V1| match c {
            V1::Memory => true,
            V1::Cpu => !unified || resources.is_some_and(|r| r.cpu.is_some()),
            V1::Pids => !unified || resources.is_some_and(|r| r.pids.is_some()),
            V1::Cpuacct => !unified,
            V1::Cpuset => resources.is_some_and(|r| r.cpuset.is_some()),
        };
        for (c, base) in &self.v1 {
            if !wanted(*c) {
                continue;
            }
            let dir = base.join(&name);
            if let Err(e) = create_dirs(&dir, *c == V1::Cpuset) {
                cg.remove();
                return Err(err(&dir)(e));
            }
            cg.v1.push((*c, dir));
        }
        if let Err(e) = cg.apply(resources) {
            cg.remove();
            return Err(e);
        }
        Ok(cg)
    }
}

impl Cgroups {
    /// Removes the scope directory in every hierarchy, and the `bulkhead` directory above
    /// it, where they are empty (instance cgroups still in use keep theirs, other
    /// daemons' scopes keep `bulkhead`; the next driver of the scope removes the rest).
    pub fn remove_scope(&self) {
        for base in self.unified.iter().chain(self.v1.iter().map(|(_, b)| b)) {
            bulkhead_driver::cgroup::remove_scope(base);
        }
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        self.remove_scope();
    }
}

/// Turns on memory, pids, cpu and cpuset for our subtree on a cgroup2 mount that has them.
/// Returns whether `base` can enforce memory, pids and cpu limits.
fn enable_controllers(mount: &Path, own_dir: &Path, base: &Path) -> bool {
    let available = fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
    let needed = ["memory", "pids", "cpu"];
    if !needed
        .iter()
        .all(|c| available.split_whitespace().any(|a| a == *c))
    {
        return false;
    }
    // Every level from the mount down to `base`'s parent delegates the controllers.
    let mut levels: Vec<&Path> = base.ancestors().take_while(|p| *p != mount).collect();
    levels.push(mount);
    levels.reverse();
    for dir in levels {
        let have = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        for c in ["memory", "pids", "cpu", "cpuset"] {
            if !have.split_whitespace().any(|a| a == c) {
                continue;
            }
            let control = dir.join("cgroup.subtree_control");
            let mut r = write_file(&control, &format!("+{c}"));
            // EBUSY: processes live in `dir` (cgroup v2's no-internal-process rule). In
            // the daemon's own cgroup (a systemd service with `Delegate=yes`, say) they
            // are the daemon and its children: they move into a leaf, and `dir` can then
            // hand the controller down. Other levels are left alone (the limits are then
            // reported unavailable).
            if r.as_ref()
                .is_err_and(|e| e.raw_os_error() == Some(libc::EBUSY))
                && dir == own_dir
                && dir != mount
                && move_into_leaf(dir)
            {
                r = write_file(&control, &format!("+{c}"));
            }
            if let Err(e) = r {
                tracing::debug!("cannot enable {c} in {}: {e}", control.display());
            }
        }
    }
    let sub = fs::read_to_string(base.join("cgroup.subtree_control")).unwrap_or_default();
    needed
        .iter()
        .all(|c| sub.split_whitespace().any(|a| a == *c))
}

/// Moves every process of `dir` into `dir/`[`SUPERVISOR_LEAF`]; true when `dir` was left
/// empty. A process that forks meanwhile is caught by the next pass.
fn move_into_leaf(dir: &Path) -> bool {
    let leaf = dir.join(SUPERVISOR_LEAF);
    if let Err(e) = fs::create_dir(&leaf) {
        if e.kind() != io::ErrorKind::AlreadyExists {
            tracing::warn!("cannot create {}: {e}", leaf.display());
            return false;
        }
    }
    let mut moved = 0usize;
    for _ in 0..10 {
        let pids = procs(dir);
        if pids.is_empty() {
            tracing::info!(
                "moved {moved} process(es) of {} into {} so that it can delegate \
                 controllers to instances (cgroup v2 allows no processes in a cgroup that \
                 does)",
                dir.display(),
                leaf.display()
            );
            return true;
        }
        for pid in pids {
            // ESRCH: it exited meanwhile.
            if write_file(&leaf.join("cgroup.procs"), &pid.to_string()).is_ok() {
                moved += 1;
            }
        }
    }
    tracing::warn!(
        "{} keeps getting new processes; not delegating",
        dir.display()
    );
    false
}

/// The cgroups of one instance.
#[derive(Debug)]
pub struct InstanceCgroup {
    /// The cgroup2 directory (membership; limits too in v2 mode).
    pub unified: Option<PathBuf>,
    unified_has_controllers: bool,
    pub v1: Vec<(V1, PathBuf)>,
    pub memory_limit: Option<u64>,
    pub pids_limit: Option<u32>,
}

/// Usage read from an instance's cgroups.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
    pub memory_peak_bytes: Option<u64>,
    pub cpu_throttled_seconds: Option<f64>,
    pub pids: u32,
    pub pids_limit_hits: Option<u64>,
    pub oom_kills: u64,
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl InstanceCgroup {
    /// The directory of controller `c`.
    fn v1_dir(&self, c: V1) -> Option<&Path> {
        self.v1
            .iter()
            .find(|(x, _)| *x == c)
            .map(|(_, d)| d.as_path())
    }

    /// The directory holding v2-style limit files, in v2 mode.
    fn v2_dir(&self) -> Option<&Path> {
        self.unified
            .as_deref()
            .filter(|_| self.unified_has_controllers)
    }

    fn apply(&self, r: Option<&Resources>) -> Result<(), CreateError> {
        let Some(r) = r else {
            return Ok(());
        };
        let set = |dir: &Path, file: &str, value: String| {
            let path = dir.join(file);
            write_file(&path, &value).map_err(|source| CreateError { path, source })
        };
        if let Some(d) = self.v2_dir() {
            if let Some(m) = r.memory {
                set(d, "memory.max", m.to_string())?;
                // No swap on top of the limit (absent when swap accounting is off).
                let _ = write_file(&d.join("memory.swap.max"), "0");
                // The OOM killer takes the whole instance, not one process of it.
                let _ = write_file(&d.join("memory.oom.group"), "1");
            }
            if let Some(c) = r.cpu {
                let quota = ((c * CPU_PERIOD_US as f64) as u64).max(1000);
                set(d, "cpu.max", format!("{quota} {CPU_PERIOD_US}"))?;
            }
            if let Some(p) = r.pids {
                set(d, "pids.max", p.to_string())?;
            }
            if let Some(cs) = &r.cpuset {
                set(d, "cpuset.cpus", cs.clone())?;
            }
            return Ok(());
        }
        if let Some(m) = r.memory {
            let Some(d) = self.v1_dir(V1::Memory) else {
                return Err(unavailable("memory"));
            };
            set(d, "memory.limit_in_bytes", m.to_string())?;
            // memory+swap == memory: no swap on top of the limit. Absent without swap
            // accounting; then swappiness 0 is the best there is.
            if write_file(&d.join("memory.memsw.limit_in_bytes"), &m.to_string()).is_err() {
                let _ = write_file(&d.join("memory.swappiness"), "0");
            }
        }
        if let Some(c) = r.cpu {
            let Some(d) = self.v1_dir(V1::Cpu) else {
                return Err(unavailable("cpu"));
            };
            let quota = ((c * CPU_PERIOD_US as f64) as u64).max(1000);
            set(d, "cpu.cfs_period_us", CPU_PERIOD_US.to_string())?;
            set(d, "cpu.cfs_quota_us", quota.to_string())?;
        }
        if let Some(p) = r.pids {
            let Some(d) = self.v1_dir(V1::Pids) else {
                return Err(unavailable("pids"));
            };
            set(d, "pids.max", p.to_string())?;
        }
        if let Some(cs) = &r.cpuset {
            let Some(d) = self.v1_dir(V1::Cpuset) else {
                return Err(unavailable("cpuset"));
            };
            set(d, "cpuset.cpus", cs.clone())?;
        }
        Ok(())
    }

    /// Opens the unified directory for `CLONE_INTO_CGROUP`.
    pub fn open_unified(&self) -> io::Result<Option<OwnedFd>> {
        let Some(d) = &self.unified else {
            return Ok(None);
        };
        let fd = rustix::fs::open(
            d,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        Ok(Some(fd))
    }

    /// v1 only: an eventfd the kernel signals on every OOM event of the instance's memory
    /// cgroup (`cgroup.event_control` on `memory.oom_control`). `None` in v2 mode, where
    /// `memory.oom.group` already makes an OOM kill take the whole instance, and without a
    /// v1 memory cgroup. The kernel also signals it when the cgroup is removed.
    pub fn v1_oom_events(&self) -> io::Result<Option<OwnedFd>> {
        if self.v2_dir().is_some() || self.memory_limit.is_none() {
            return Ok(None);
        }
        let Some(d) = self.v1_dir(V1::Memory) else {
            return Ok(None);
        };
        use std::os::fd::AsRawFd;
        let efd = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?;
        let control = fs::File::open(d.join("memory.oom_control"))?;
        // The registration holds the eventfd; the control file may close afterwards.
        write_file(
            &d.join("cgroup.event_control"),
            &format!("{} {}", efd.as_raw_fd(), control.as_raw_fd()),
        )?;
        Ok(Some(efd))
    }

    /// Opens every v1 `cgroup.procs` for writing, for the child to join before exec.
    pub fn open_v1_procs(&self) -> io::Result<Vec<OwnedFd>> {
        self.v1
            .iter()
            .map(|(_, d)| {
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("cgroup.procs"))?;
                Ok(OwnedFd::from(f))
            })
            .collect()
    }

    /// Whether no process is left in any of the instance's cgroups.
    pub fn is_empty(&self) -> bool {
        self.dirs().all(|d| procs(d).is_empty())
    }

    /// Every process of the instance's cgroups (each once).
    pub fn members(&self) -> Vec<u32> {
        let mut all: Vec<u32> = self.dirs().flat_map(procs).collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.unified
            .iter()
            .map(PathBuf::as_path)
            .chain(self.v1.iter().map(|(_, d)| d.as_path()))
    }

    /// SIGKILL to every member (`cgroup.kill` on the cgroup2 directory, which a racing
    /// fork cannot escape; v1: each listed pid).
    pub fn kill_all(&self) {
        if let Some(d) = &self.unified {
            kill_members(d);
        } else {
            for d in self.dirs() {
                kill_members(d);
            }
        }
    }

    /// Removes every directory (after killing what is left). Best effort; logs failures.
    pub fn remove(&self) {
        for d in self.dirs() {
            if let Err(e) = remove_dir_retrying(d) {
                tracing::warn!("cannot remove cgroup {}: {e}", d.display());
            }
        }
    }

    /// Usage now.
    pub fn usage(&self) -> Usage {
        let mut u = Usage::default();
        if let Some(d) = self.v2_dir() {
            let cpu = fs::read_to_string(d.join("cpu.stat")).unwrap_or_default();
            u.cpu_seconds = keyed(&cpu, "usage_usec").unwrap_or(0) as f64 / 1e6;
            u.cpu_throttled_seconds = keyed(&cpu, "throttled_usec").map(|v| v as f64 / 1e6);
            u.memory_bytes = read_u64(&d.join("memory.current")).unwrap_or(0);
            u.memory_peak_bytes = read_u64(&d.join("memory.peak"));
            let ev = fs::read_to_string(d.join("memory.events")).unwrap_or_default();
            u.oom_kills = keyed(&ev, "oom_kill").unwrap_or(0);
            u.pids = read_u64(&d.join("pids.current")).unwrap_or(0) as u32;
            let pe = fs::read_to_string(d.join("pids.events")).unwrap_or_default();
            u.pids_limit_hits = keyed(&pe, "max");
            return u;
        }
        if let Some(d) = self.v1_dir(V1::Cpuacct) {
            u.cpu_seconds = read_u64(&d.join("cpuacct.usage")).unwrap_or(0) as f64 / 1e9;
        } else if let Some(d) = &self.unified {
            let cpu = fs::read_to_string(d.join("cpu.stat")).unwrap_or_default();
            u.cpu_seconds = keyed(&cpu, "usage_usec").unwrap_or(0) as f64 / 1e6;
        }
        if let Some(d) = self.v1_dir(V1::Cpu) {
            let cpu = fs::read_to_string(d.join("cpu.stat")).unwrap_or_default();
            u.cpu_throttled_seconds = keyed(&cpu, "throttled_time").map(|v| v as f64 / 1e9);
        }
        if let Some(d) = self.v1_dir(V1::Memory) {
            u.memory_bytes = read_u64(&d.join("memory.usage_in_bytes")).unwrap_or(0);
            u.memory_peak_bytes = read_u64(&d.join("memory.max_usage_in_bytes"));
            let oc = fs::read_to_string(d.join("memory.oom_control")).unwrap_or_default();
            u.oom_kills = keyed(&oc, "oom_kill").unwrap_or(0);
        }
        if let Some(d) = self.v1_dir(V1::Pids) {
            u.pids = read_u64(&d.join("pids.current")).unwrap_or(0) as u32;
            let pe = fs::read_to_string(d.join("pids.events")).unwrap_or_default();
            u.pids_limit_hits = keyed(&pe, "max");
        } else if let Some(d) = self.dirs().next() {
            u.pids = procs(d).len() as u32;
        }
        u
    }
}

fn unavailable(controller: &str) -> CreateError {
    CreateError {
        path: PathBuf::from(controller),
        source: io::Error::new(
            io::ErrorKind::Unsupported,
            format!("the {controller} controller is not available to bulkhead here"),
        ),
    }
}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
pub fn mem_available() -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix("MemAvailable:")?;
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_files_are_read() {
        let text = "oom 1\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(keyed(text, "oom_kill"), Some(2));
        assert_eq!(keyed(text, "nope"), None);
        assert_eq!(keyed("max 7\n", "max"), Some(7));
    }

    #[test]
    fn mem_available_is_read() {
        assert!(mem_available().unwrap_or(1) > 0);
    }
}
