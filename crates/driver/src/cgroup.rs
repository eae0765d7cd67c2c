//! Tracking instances by cgroup2 membership: one cgroup per instance, torn down as a whole.
//!
//! A process group is not a container: a program that double-forks and calls `setsid`
//! (`redis-server --daemonize yes`, any classic daemon) leaves it, and nothing that
//! watches process groups can find it again. cgroup membership is inherited by every
//! descendant and cannot be left without write access to the cgroup files, so an
//! instance whose first process starts inside its own cgroup can always be found
//! (`cgroup.procs`) and killed as a whole (`cgroup.kill`), however it forks.
//!
//! # Layout
//!
//! `<cgroup2 mount>/<own>/bulkhead/<scope>/<instance>-<seq>`: `<own>` is the daemon's
//! cgroup2 path from `/proc/self/cgroup` (a session's processes may sit in a cgroup made
//! for them), `<scope>` names one daemon (the daemon passes a hash of its id), `<seq>`
//! makes every spawn's cgroup new. Membership needs no controller: on a hybrid host the
//! controller-less cgroup2 mount (`/sys/fs/cgroup/unified`) does it; on a pure v2 host
//! `/sys/fs/cgroup` itself. [`Tracker::detect`] finds the mount in `/proc/self/mountinfo`
//! and proves the place usable by creating and removing a probe cgroup; where that fails
//! (no cgroup2 mount, no permission) the caller falls back to process-group tracking.
//!
//! # Teardown
//!
//! [`InstanceCgroup::kill_all`] writes `cgroup.kill` (Linux 5.14; a racing `fork` cannot
//! escape it) or, on older kernels, sends SIGKILL to every pid of `cgroup.procs`, each
//! through a pidfd opened first and checked to still be a member; the caller repeats
//! until `cgroup.procs` is empty (a member may have forked between the read and the
//! kill), then removes the directory. Zombies are not members (`cgroup.procs` lists live
//! processes only), so an empty cgroup can be removed at once.

use std::fs;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bulkhead_core::signal::Signal;

use crate::sys;

/// The leaf cgroup that the processes of the daemon's own cgroup move into when that
/// cgroup must hand controllers down (cgroup v2's no-internal-process rule; the sandbox
/// driver does this on a pure v2 host).
pub const SUPERVISOR_LEAF: &str = "bulkhead-supervisor";

/// The cgroup path of `controller` (`""`: the cgroup2 line) from the text of
/// `/proc/self/cgroup`.
pub fn own_path(proc_self_cgroup: &str, controller: &str) -> Option<String> {
    proc_self_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = if controller.is_empty() {
            ctrls.is_empty()
        } else {
            ctrls.split(',').any(|c| c == controller)
        };
        matches.then(|| path.to_owned())
    })
}

/// The cgroup2 path the daemon's subtree hangs from: its own cgroup, or the parent of
/// [`SUPERVISOR_LEAF`] when an earlier detection moved it there.
pub fn own_v2_path(proc_self_cgroup: &str) -> Option<String> {
    let own = own_path(proc_self_cgroup, "")?;
    Some(match own.strip_suffix(&format!("/{SUPERVISOR_LEAF}")) {
        Some("") => "/".to_owned(),
        Some(parent) => parent.to_owned(),
        None => own,
    })
}

/// The cgroup mounts in the text of `/proc/self/mountinfo`: (mount point, fs type, super
/// options).
pub fn cgroup_mounts(mountinfo: &str) -> Vec<(PathBuf, String, String)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let _source = r.next()?;
            let opts = r.next().unwrap_or("");
            (fstype == "cgroup" || fstype == "cgroup2").then(|| {
                (
                    PathBuf::from(mount_point),
                    fstype.to_owned(),
                    opts.to_owned(),
                )
            })
        })
        .collect()
}

/// Writes `value` into an existing file (a cgroup control file).
pub fn write_file(path: &Path, value: &str) -> io::Result<()> {
    let mut f = fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(value.as_bytes())
}

/// The pids listed in `dir/cgroup.procs` (live processes; zombies are not listed).
pub fn procs(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Sends SIGKILL to every process of one cgroup directory: `cgroup.kill` where the kernel
/// has it, else each pid of `cgroup.procs` (see [`signal_members`]).
pub fn kill_members(dir: &Path) {
    if write_file(&dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    signal_members(dir, Signal::KILL, None);
}

/// Sends `signal` to every process listed in `dir/cgroup.procs` except `skip`, each
/// through a pidfd.
///
/// RACE: a pid read from `cgroup.procs` may exit and be reused before it is signalled.
/// The pidfd is opened first and the process's membership checked after (its
/// `/proc/<pid>/cgroup` names `dir`), so the signal reaches a member or nobody. Only
/// for cgroup2 directories (the `0::` line is compared); v1 directories fall back to the
/// pid as read.
pub fn signal_members(dir: &Path, signal: Signal, skip: Option<u32>) -> usize {
    let pids = procs(dir);
    if pids.iter().all(|p| Some(*p) == skip) {
        return 0;
    }
    let rel = cgroup2_relative(dir);
    let mut sent = 0;
    for pid in pids {
        if Some(pid) == skip {
            continue;
        }
        let Ok(fd) = sys::pidfd_open(pid) else {
            continue; // gone already
        };
        if let Some(rel) = &rel {
            let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            if own_path(&text, "").as_deref() != Some(rel.as_str()) {
                continue;
            }
        }
        if sys::pidfd_send_signal(&fd, signal).is_ok() {
            sent += 1;
        }
    }
    sent
}

/// `dir` relative to the root of its cgroup2 mount (`/a/b`), as `/proc/<pid>/cgroup`
/// shows it; `None` when `dir` is not under a cgroup2 mount of this process.
fn cgroup2_relative(dir: &Path) -> Option<String> {
    let mi = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let (mount, _, _) = cgroup_mounts(&mi)
        .into_iter()
        .filter(|(m, t, _)| t == "cgroup2" && dir.starts_with(m))
        .max_by_key(|(m, _, _)| m.as_os_str().len())?;
    let rel = dir.strip_prefix(&mount).ok()?;
    Some(format!("/{}", rel.display()))
}

/// rmdir, retrying while the kernel still counts dying members (`EBUSY`), killing what is
/// left between tries, up to about 2 s. Blocking: call it off the async runtime.
pub fn remove_dir_retrying(dir: &Path) -> io::Result<()> {
    let mut delay = Duration::from_micros(200);
    for _ in 0..40 {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                kill_members(dir);
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    }
    fs::remove_dir(dir)
}

/// Removes a daemon's scope directory `base` (`<own>/bulkhead/<scope>`) if it is empty,
/// then its `bulkhead` parent if that is empty too (other daemons' scopes keep it).
/// Nothing is removed that still holds a cgroup.
pub fn remove_scope(base: &Path) {
    for dir in [Some(base), base.parent()].into_iter().flatten() {
        match fs::remove_dir(dir) {
            Ok(()) => tracing::debug!("removed cgroup {}", dir.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // ENOTEMPTY / EBUSY: instance cgroups or other daemons' scopes live there.
            Err(_) => return,
        }
    }
}

/// Makes a scope directory with `make` (which creates missing parents).
///
/// RACE: another daemon's scope, dropped at the same moment, removes the shared
/// `bulkhead` parent when it is empty ([`remove_scope`]), possibly between our making it
/// and making the scope in it: the scope's mkdir then fails with `NotFound`, and is
/// tried again (a few times at most; once the scope exists, the parent is not empty and
/// stays).
pub fn create_scope_dir(base: &Path, make: impl Fn(&Path) -> io::Result<()>) -> io::Result<()> {
    let mut missing = 0;
    loop {
        match make(base) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && missing < 8 => missing += 1,
            r => return r,
        }
    }
}

/// Removes one scope directory if it is empty (not its parent).
pub fn remove_scope_only(base: &Path) {
    let _ = fs::remove_dir(base);
}

/// A cgroup name made of `instance` (anything but `[A-Za-z0-9-]` becomes `_`) and `seq`.
pub fn instance_dir_name(instance: &str, seq: u64) -> String {
    let name: String = instance
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{name}-{seq}")
}

/// No cgroup2 place could be used for tracking.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("no cgroup2 mount in /proc/self/mountinfo")]
    NoMount,
    #[error("no cgroup2 line in /proc/self/cgroup")]
    NoOwnCgroup,
    #[error("cannot create and remove a cgroup in {path}: {source}")]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An instance's cgroup could not be created.
#[derive(Debug, thiserror::Error)]
#[error("cannot create cgroup {path}: {source}")]
pub struct CreateError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// One daemon's cgroup2 subtree for tracking instances: `<mount>/<own>/bulkhead/<scope>`.
#[derive(Debug)]
pub struct Tracker {
    base: PathBuf,
    seq: AtomicU64,
}

impl Tracker {
    /// Finds a usable cgroup2 mount (`/sys/fs/cgroup` first, then any other) and creates
    /// `<own>/bulkhead/<scope>` in it, proven by creating and removing a probe cgroup.
    pub fn detect(scope: &str) -> Result<Tracker, DetectError> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mut mounts: Vec<PathBuf> = cgroup_mounts(&mountinfo)
            .into_iter()
            .filter(|(_, t, _)| t == "cgroup2")
            .map(|(m, _, _)| m)
            .collect();
        mounts.sort_by_key(|m| m != Path::new("/sys/fs/cgroup"));
        let mount = mounts.first().ok_or(DetectError::NoMount)?;
        let own = own_v2_path(&own).ok_or(DetectError::NoOwnCgroup)?;
        let base = mount
            .join(own.trim_start_matches('/'))
            .join("bulkhead")
            .join(scope);
        let probe = |base: &Path| -> io::Result<()> {
            create_scope_dir(base, |b| fs::create_dir_all(b))?;
            let p = base.join(format!("probe-{}", std::process::id()));
            let _ = fs::remove_dir(&p);
            fs::create_dir(&p)?;
            fs::remove_dir(&p)
        };
        probe(&base).map_err(|source| DetectError::Probe {
            path: base.clone(),
            source,
        })?;
        Ok(Tracker {
            base,
            seq: AtomicU64::new(0),
        })
    }

    /// `<mount>/<own>/bulkhead/<scope>`.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// Creates a new, empty cgroup for one spawn of `instance`.
    pub fn create(&self, instance: &str) -> Result<InstanceCgroup, CreateError> {
        // A cgroup of the same name may be left from an earlier daemon of this scope
        // (adopted instances keep theirs), or made by another tracker of the same scope
        // in this process: skip to the next free name.
        let mut missing = 0;
        loop {
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            let dir = self.base.join(instance_dir_name(instance, seq));
            match fs::create_dir(&dir) {
                Ok(()) => return Ok(InstanceCgroup { dir }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                // RACE: another tracker of the scope removed the (then empty) scope
                // directory as it dropped: make it again, a few times at most.
                Err(e) if e.kind() == io::ErrorKind::NotFound && missing < 8 => {
                    missing += 1;
                    fs::create_dir_all(&self.base).map_err(|source| CreateError {
                        path: self.base.clone(),
                        source,
                    })?;
                }
                Err(source) => return Err(CreateError { path: dir, source }),
            }
        }
    }

    /// Kills and removes every instance cgroup under the scope that is not in `keep`
    /// (left by a daemon of this scope that did not shut down cleanly, and not adopted).
    /// Blocking.
    pub fn remove_stale(&self, keep: &[PathBuf]) -> usize {
        let Ok(rd) = fs::read_dir(&self.base) else {
            return 0;
        };
        let stale: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir() && !keep.contains(p))
            .collect();
        for d in &stale {
            kill_members(d);
        }
        for d in &stale {
            if let Err(e) = remove_dir_retrying(d) {
                tracing::warn!("cannot remove stale cgroup {}: {e}", d.display());
            }
        }
        stale.len()
    }

    /// Removes the scope directory and its `bulkhead` parent where they are empty (a clean
    /// shutdown: every instance is gone).
    pub fn remove_scope(&self) {
        remove_scope(&self.base);
    }
}

impl Drop for Tracker {
    /// Removes the scope where it is empty (a scope with live instance cgroups stays, for
    /// the next daemon of the scope to adopt or clean up).
    fn drop(&mut self) {
        self.remove_scope();
    }
}

/// The cgroup2 directory of one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceCgroup {
    dir: PathBuf,
}

impl InstanceCgroup {
    /// An existing instance cgroup (an adopted instance's, from its record).
    pub fn at(dir: PathBuf) -> InstanceCgroup {
        InstanceCgroup { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory opened `O_PATH | O_DIRECTORY` (close-on-exec), for a child born in
    /// the cgroup (`CLONE_INTO_CGROUP`).
    pub fn open_dir(&self) -> io::Result<OwnedFd> {
        open_cgroup_dir(&self.dir)
    }

    /// The live processes of the instance.
    pub fn members(&self) -> Vec<u32> {
        procs(&self.dir)
    }

    /// A pidfd for each live member, each checked to be a member after it was opened (a
    /// pid read from `cgroup.procs` may have been reused meanwhile).
    pub fn member_pidfds(&self) -> Vec<(u32, OwnedFd)> {
        let pids = procs(&self.dir);
        if pids.is_empty() {
            // The common case at an exit: no mountinfo to read.
            return Vec::new();
        }
        let rel = cgroup2_relative(&self.dir);
        pids.into_iter()
            .filter_map(|pid| {
                let fd = sys::pidfd_open(pid).ok()?;
                if let Some(rel) = &rel {
                    let text =
                        fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
                    if own_path(&text, "").as_deref() != Some(rel.as_str()) {
                        return None;
                    }
                }
                Some((pid, fd))
            })
            .collect()
    }

    /// Sends `signal` to every member but `skip` (see [`signal_members`]); SIGKILL goes
    /// through `cgroup.kill` where the kernel has it.
    pub fn signal(&self, signal: Signal, skip: Option<u32>) {
        if signal == Signal::KILL && write_file(&self.dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        signal_members(&self.dir, signal, skip);
    }

    /// SIGKILL to every member.
    pub fn kill_all(&self) {
        kill_members(&self.dir);
    }

    /// CPU time of every process that ever ran in the cgroup (`cpu.stat` `usage_usec`,
    /// which cgroup2 keeps without any controller), in seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let text = fs::read_to_string(self.dir.join("cpu.stat")).ok()?;
        text.lines().find_map(|l| {
            let v = l.strip_prefix("usage_usec ")?;
            v.trim().parse::<u64>().ok().map(|us| us as f64 / 1e6)
        })
    }

    /// Memory charged to the cgroup (`memory.current`), where the memory controller is
    /// enabled for it (pure cgroup v2 with delegation).
    pub fn memory_current(&self) -> Option<u64> {
        fs::read_to_string(self.dir.join("memory.current"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Removes the directory (after killing what is left). Blocking.
    pub fn remove(&self) -> io::Result<()> {
        remove_dir_retrying(&self.dir)
    }
}

/// A cgroup2 directory opened `O_PATH | O_DIRECTORY | O_CLOEXEC`, for `CLONE_INTO_CGROUP`.
pub fn open_cgroup_dir(dir: &Path) -> io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    Ok(rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// The value after `key ` in a flat-keyed cgroup file (`memory.events`, `cpu.stat`, v1's
/// `memory.oom_control`).
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_whose_parent_vanished_meanwhile_is_made_again_a_few_times_at_most() {
        let calls = std::cell::Cell::new(0);
        let flaky = |_: &Path| {
            calls.set(calls.get() + 1);
            if calls.get() < 3 {
                Err(io::Error::from(io::ErrorKind::NotFound))
            } else {
                Ok(())
            }
        };
        super::create_scope_dir(Path::new("/x"), flaky).unwrap();
        assert_eq!(calls.get(), 3);
        calls.set(0);
        let gone = |_: &Path| {
            calls.set(calls.get() + 1);
            Err(io::Error::from(io::ErrorKind::NotFound))
        };
        assert!(super::create_scope_dir(Path::new("/x"), gone).is_err());
        assert_eq!(calls.get(), 9);
        // Other errors are not retried.
        calls.set(0);
        let denied = |_: &Path| {
            calls.set(calls.get() + 1);
            Err(io::Error::from(io::ErrorKind::PermissionDenied))
        };
        assert!(super::create_scope_dir(Path::new("/x"), denied).is_err());
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn the_supervisor_leaf_is_not_a_level_of_its_own() {
        let v2 = |p: &str| own_v2_path(&format!("0::{p}\n"));
        assert_eq!(
            v2("/system.slice/b.service").as_deref(),
            Some("/system.slice/b.service")
        );
        assert_eq!(
            v2("/system.slice/b.service/bulkhead-supervisor").as_deref(),
            Some("/system.slice/b.service")
        );
        assert_eq!(v2("/bulkhead-supervisor").as_deref(), Some("/"));
        assert_eq!(v2("/").as_deref(), Some("/"));
    }

    #[test]
    fn own_paths_are_found_per_hierarchy() {
        let text = "9:name=systemd:/\n4:memory:/process_api/x\n2:cpu,cpuacct:/a\n0::/u\n";
        assert_eq!(own_path(text, "memory").as_deref(), Some("/process_api/x"));
        assert_eq!(own_path(text, "cpuacct").as_deref(), Some("/a"));
        assert_eq!(own_path(text, "").as_deref(), Some("/u"));
        assert_eq!(own_path(text, "pids"), None);
    }

    #[test]
    fn mountinfo_lines_are_parsed() {
        let text = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                    22 1 0:5 / /proc rw - proc proc rw\n";
        let m = cgroup_mounts(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].0, PathBuf::from("/sys/fs/cgroup/memory"));
        assert_eq!(m[0].2, "rw,memory");
        assert_eq!(m[1].1, "cgroup2");
    }

    #[test]
    fn instance_names_are_made_safe() {
        assert_eq!(instance_dir_name("ns:a:web", 3), "ns_a_web-3");
        assert_eq!(instance_dir_name("../x", 0), "___x-0");
    }
}
