//! The process basics a child applies before exec: umask, rlimits, then supplementary
//! groups, gid and uid (`setgroups`, `setresgid`, `setresuid`, in that order, as raw
//! system calls), then the working directory, entered as the new user (as systemd's
//! `WorkingDirectory=`). The manifest side (fields, meaning per driver) is
//! `bulkhead_core::execution`.
//!
//! Names are resolved here, on the host, before the fork ([`resolve_user`], through
//! glibc's NSS with the reentrant calls): a user that does not exist fails the start
//! with its name. The child only reads what [`ChildSetup::prepare`] built: **nothing
//! allocates between fork and exec.**
//!
//! Limits are applied before the uid switch (raising a hard limit needs
//! `CAP_SYS_RESOURCE`, which the switch drops). [`check_limits`] runs in the spawning
//! process before the fork and names the limit it cannot honour: a hard limit above the
//! spawner's own without `CAP_SYS_RESOURCE`.

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use bulkhead_core::execution::{self, Principal, ResolvedLimit};
use bulkhead_core::spec::WorkloadSpec;
use serde::{Deserialize, Serialize};

/// Ids to switch to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary one included, as `initgroups` does).
    pub groups: Vec<u32>,
}

/// One rlimit, by its manifest name; `None` is unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitSetting {
    pub name: String,
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

/// What a process-driver child does before exec beyond the defaults. Travels in the
/// keeper's spawn request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChildSetup {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Credentials>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<LimitSetting>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub umask: Option<u32>,
}

/// The `RLIMIT_*` number of a manifest limit name.
pub fn resource(name: &str) -> Option<libc::__rlimit_resource_t> {
    Some(match name {
        "as" => libc::RLIMIT_AS,
        "core" => libc::RLIMIT_CORE,
        "cpu" => libc::RLIMIT_CPU,
        "data" => libc::RLIMIT_DATA,
        "fsize" => libc::RLIMIT_FSIZE,
        "locks" => libc::RLIMIT_LOCKS,
        "memlock" => libc::RLIMIT_MEMLOCK,
        "msgqueue" => libc::RLIMIT_MSGQUEUE,
        "nice" => libc::RLIMIT_NICE,
        "nofile" => libc::RLIMIT_NOFILE,
        "nproc" => libc::RLIMIT_NPROC,
        "rss" => libc::RLIMIT_RSS,
        "rtprio" => libc::RLIMIT_RTPRIO,
        "rttime" => libc::RLIMIT_RTTIME,
        "sigpending" => libc::RLIMIT_SIGPENDING,
        "stack" => libc::RLIMIT_STACK,
        _ => return None,
    })
}

fn rlim(v: Option<u64>) -> libc::rlim_t {
    v.unwrap_or(libc::RLIM_INFINITY)
}

fn show(v: Option<u64>) -> String {
    v.map_or("unlimited".to_owned(), |n| n.to_string())
}

/// Whether this process has `CAP_SYS_RESOURCE` in its effective set.
fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// Checks, in the spawning process, that every limit can be set in its child: a hard
/// limit above this process's own needs `CAP_SYS_RESOURCE` (`privileged`: the child may
/// still have it at that point; a child in a new user namespace never has it). The error
/// names the limit.
pub fn check_limits(limits: &[LimitSetting], privileged: bool) -> Result<(), String> {
    let can_raise = privileged && has_cap_sys_resource();
    for l in limits {
        let Some(res) = resource(&l.name) else {
            return Err(format!("limits.{}: not a known limit", l.name));
        };
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into `cur`, a value on our stack.
        if unsafe { libc::getrlimit(res, &mut cur) } != 0 {
            continue;
        }
        let own = (cur.rlim_max != libc::RLIM_INFINITY).then_some(cur.rlim_max);
        let above = match (l.hard, own) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(h), Some(o)) => h > o,
        };
        if above && !can_raise {
            return Err(format!(
                "limits.{}: the hard limit {} is above the daemon's own ({}), and raising it \
                 needs CAP_SYS_RESOURCE{}",
                l.name,
                show(l.hard),
                show(own),
                if privileged {
                    ""
                } else {
                    ", which a process in a user namespace does not have"
                }
            ));
        }
    }
    Ok(())
}

/// A user or group database entry could not be found or read.
fn lookup_failed(what: &str, name: &str, err: i32) -> String {
    if err == 0 || err == libc::ENOENT || err == libc::ESRCH {
        format!("{what} {name}: no such {what} in the host's database")
    } else {
        format!(
            "{what} {name}: cannot look it up: {}",
            io::Error::from_raw_os_error(err)
        )
    }
}

/// The passwd entry of `user` (a name or an id): its name, uid and primary gid. `None`
/// for a numeric id without an entry.
fn passwd(user: &Principal<'_>) -> Result<Option<(CString, u32, u32)>, String> {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: passwd is plain data, filled in by the _r call; every pointer passed lives
    // for the call, and the strings it points into live in `buf`, read before it goes.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let (r, shown) = match user {
            Principal::Id(uid) => (
                libc::getpwuid_r(*uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut out),
                uid.to_string(),
            ),
            Principal::Name(n) => {
                let c = CString::new(*n).map_err(|_| format!("user {n}: contains a NUL byte"))?;
                (
                    libc::getpwnam_r(
                        c.as_ptr(),
                        &mut pw,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        &mut out,
                    ),
                    (*n).to_owned(),
                )
            }
        };
        if out.is_null() {
            return match (user, r) {
                (Principal::Id(_), 0 | libc::ENOENT | libc::ESRCH) => Ok(None),
                _ => Err(lookup_failed("user", &shown, r)),
            };
        }
        let name = CStr::from_ptr(pw.pw_name).to_owned();
        Ok(Some((name, pw.pw_uid, pw.pw_gid)))
    }
}

/// The gid of `group` (a name or an id; an id need not have an entry).
fn group_id(group: &str) -> Result<u32, String> {
    let name = match execution::principal(group).map_err(|e| format!("group {group}: {e}"))? {
        Principal::Id(g) => return Ok(g),
        Principal::Name(n) => n,
    };
    let c = CString::new(name).map_err(|_| format!("group {name}: contains a NUL byte"))?;
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: as in `passwd`: plain data filled in by the _r call, pointers live for it.
    unsafe {
        let mut gr: libc::group = std::mem::zeroed();
        let mut out: *mut libc::group = std::ptr::null_mut();
        let r = libc::getgrnam_r(
            c.as_ptr(),
            &mut gr,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        );
        if out.is_null() {
            return Err(lookup_failed("group", name, r));
        }
        Ok(gr.gr_gid)
    }
}

/// The groups `name` belongs to in the group database, `gid` first (`getgrouplist`).
fn group_list(name: &CStr, gid: u32) -> Vec<u32> {
    let mut n: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let want = n;
        // SAFETY: `groups` has room for `n` entries; getgrouplist writes at most that many
        // and sets `n` to the count (or the needed count, returning -1).
        let r = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        if r >= 0 {
            groups.truncate(n as usize);
            return groups;
        }
        if n <= want {
            n = want * 2;
        }
        if n > 65536 {
            return vec![gid];
        }
    }
}

/// The ids `spec`'s `user`, `group` and `groups` name, resolved in the host's user and
/// group databases; `None` when none is set. With no `user`, the uid stays `own_uid`.
pub fn resolve_user(spec: &WorkloadSpec, own_uid: u32) -> Result<Option<Credentials>, String> {
    if spec.user.is_none() && spec.group.is_none() && spec.groups.is_empty() {
        return Ok(None);
    }
    let group = spec.group.as_deref().map(group_id).transpose()?;
    let (uid, gid, mut groups) = match spec.user.as_deref() {
        Some(u) => {
            let p = execution::principal(u).map_err(|e| format!("user {u}: {e}"))?;
            match passwd(&p)? {
                Some((name, uid, primary)) => {
                    let gid = group.unwrap_or(primary);
                    (uid, gid, group_list(&name, gid))
                }
                None => {
                    let Principal::Id(uid) = p else {
                        unreachable!("a name without an entry is an error")
                    };
                    let gid = group.ok_or_else(|| {
                        format!("user {uid}: no such user in the host's database, so it has no primary group: set group too")
                    })?;
                    (uid, gid, vec![gid])
                }
            }
        }
        None => {
            // SAFETY: getgid has no preconditions.
            let gid = group.unwrap_or_else(|| unsafe { libc::getgid() });
            (own_uid, gid, vec![gid])
        }
    };
    for g in &spec.groups {
        let id = group_id(g)?;
        if !groups.contains(&id) {
            groups.push(id);
        }
    }
    Ok(Some(Credentials { uid, gid, groups }))
}

/// The current supplementary groups of this process.
fn own_groups() -> Vec<u32> {
    // SAFETY: with size 0 getgroups only counts; then it fills at most `n` entries.
    unsafe {
        let n = libc::getgroups(0, std::ptr::null_mut());
        if n <= 0 {
            return Vec::new();
        }
        let mut g = vec![0 as libc::gid_t; n as usize];
        let n = libc::getgroups(n, g.as_mut_ptr());
        g.truncate(n.max(0) as usize);
        g
    }
}

/// The child setup of a process-driver instance of `spec`, resolved on this host: the
/// credentials (a daemon not running as root may only name itself), the limits and the
/// umask. `None` when the manifest sets none of them (the spawn stays as it was).
pub fn host_setup(spec: &WorkloadSpec) -> Result<Option<ChildSetup>, String> {
    // SAFETY: geteuid/getegid have no preconditions.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let mut credentials = resolve_user(spec, euid)?;
    if let Some(c) = &credentials {
        if euid != 0 {
            let mut mine = own_groups();
            mine.push(egid);
            let same = c.uid == euid && c.gid == egid && c.groups.iter().all(|g| mine.contains(g));
            if !same {
                let who = spec
                    .user
                    .as_deref()
                    .map(|u| format!("user {u} (uid {})", c.uid))
                    .unwrap_or_else(|| format!("group {}", c.gid));
                return Err(format!(
                    "{who}: the daemon runs as uid {euid}, not root, and cannot switch to it"
                ));
            }
            // Already who it asks for: nothing to switch.
            credentials = None;
        }
    }
    let limits = limit_settings(spec)?;
    let umask = spec
        .umask
        .as_deref()
        .map(execution::parse_umask)
        .transpose()
        .map_err(|e| format!("umask: {e}"))?;
    if credentials.is_none() && limits.is_empty() && umask.is_none() {
        return Ok(None);
    }
    Ok(Some(ChildSetup {
        credentials,
        limits,
        umask,
    }))
}

/// For a `working_dir` on the host (process driver): it must be a directory, or the
/// start fails naming it (the spawn itself would blame the program).
pub fn check_working_dir(spec: &WorkloadSpec, dir: &Path) -> Result<(), String> {
    if spec.working_dir.is_some() && !dir.is_dir() {
        return Err(format!("working_dir {}: no such directory", dir.display()));
    }
    Ok(())
}

/// The manifest's limits as settings.
pub fn limit_settings(spec: &WorkloadSpec) -> Result<Vec<LimitSetting>, String> {
    let limits: Vec<ResolvedLimit> =
        execution::resolve_limits(&spec.limits).map_err(|(f, r)| format!("{f}: {r}"))?;
    Ok(limits
        .into_iter()
        .map(|l| LimitSetting {
            name: l.name.to_owned(),
            soft: l.soft,
            hard: l.hard,
        })
        .collect())
}

/// [`ChildSetup`] ready for a forked child: every buffer made.
pub struct Prepared {
    pub(crate) ids: Option<(u32, u32, Vec<libc::gid_t>)>,
    pub(crate) rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    pub(crate) umask: Option<libc::mode_t>,
    pub(crate) cwd: CString,
}

impl ChildSetup {
    /// Checks the limits (naming one that cannot be set) and builds what the child reads.
    pub fn prepare(&self, cwd: &Path) -> io::Result<Prepared> {
        check_limits(&self.limits, true).map_err(io::Error::other)?;
        let mut rlimits = Vec::with_capacity(self.limits.len());
        for l in &self.limits {
            let res = resource(&l.name)
                .ok_or_else(|| io::Error::other(format!("limits.{}: not a known limit", l.name)))?;
            rlimits.push((
                res,
                libc::rlimit {
                    rlim_cur: rlim(l.soft),
                    rlim_max: rlim(l.hard),
                },
            ));
        }
        Ok(Prepared {
            ids: self
                .credentials
                .as_ref()
                .map(|c| (c.uid, c.gid, c.groups.clone())),
            rlimits,
            umask: self.umask,
            cwd: CString::new(cwd.as_os_str().as_bytes()).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a NUL byte in the working directory",
                )
            })?,
        })
    }
}

impl Prepared {
    /// Applies the setup to the calling process: umask, limits, groups, gid, uid, chdir.
    ///
    /// # Safety
    /// For a forked child before exec: raw system calls on values built before the fork,
    /// no allocation, no lock.
    pub unsafe fn apply(&self) -> io::Result<()> {
        // SAFETY: system calls on plain values and on buffers owned by `self`, which lives
        // until the exec; the caller upholds the fork-child contract.
        unsafe {
            if let Some(m) = self.umask {
                libc::umask(m);
            }
            for (res, lim) in &self.rlimits {
                if libc::setrlimit(*res, lim) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some((uid, gid, groups)) = &self.ids {
                // ORDER: groups and gid while still privileged, the uid last.
                if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0
                    || libc::syscall(libc::SYS_setresgid, *gid, *gid, *gid) != 0
                    || libc::syscall(libc::SYS_setresuid, *uid, *uid, *uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            // As the new user: a directory it may not enter fails the start.
            if libc::chdir(self.cwd.as_ptr()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_core::spec::parse_manifest;

    fn spec(extra: &str) -> WorkloadSpec {
        parse_manifest(
            "w/manifest.yaml",
            "w",
            &format!("name: w\ncommand: [sh]\n{extra}"),
        )
        .unwrap()
    }

    #[test]
    fn a_user_that_does_not_exist_is_an_error_naming_it() {
        let e = resolve_user(&spec("user: no-such-user-here\n"), 0).unwrap_err();
        assert!(
            e.contains("no-such-user-here") && e.contains("no such user"),
            "{e}"
        );
        let e = resolve_user(&spec("user: nobody\ngroup: no-such-group-here\n"), 0).unwrap_err();
        assert!(e.contains("group no-such-group-here"), "{e}");
        // A numeric id without an entry has no primary group to default to.
        let e = resolve_user(&spec("user: 4000000\n"), 0).unwrap_err();
        assert!(e.contains("set group too"), "{e}");
    }

    #[test]
    fn a_user_gets_its_database_groups_and_the_listed_ones() {
        let c = resolve_user(&spec("user: nobody\n"), 0).unwrap().unwrap();
        assert_eq!((c.uid, c.gid), (65534, 65534));
        assert_eq!(c.groups, [65534]);
        let c = resolve_user(&spec("user: nobody\ngroups: [daemon, 7]\n"), 0)
            .unwrap()
            .unwrap();
        assert_eq!(c.groups, [65534, 1, 7]);
        let c = resolve_user(&spec("user: 4000000\ngroup: 4000001\n"), 0)
            .unwrap()
            .unwrap();
        assert_eq!((c.uid, c.gid, c.groups), (4000000, 4000001, vec![4000001]));
        assert_eq!(resolve_user(&spec(""), 0).unwrap(), None);
    }

    #[test]
    fn a_daemon_not_running_as_root_cannot_switch_to_another_user() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to become another user for the check");
            return;
        }
        let other = spec("user: root\n");
        let itself = spec("user: nobody\nlimits: {nofile: 64}\n");
        // SAFETY: the child drops to nobody with raw system calls and only then runs the
        // check (glibc's fork makes malloc usable in the child), and leaves with _exit.
        let code = unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                let dropped = libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<u32>())
                    == 0
                    && libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534) == 0
                    && libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) == 0;
                let refused = matches!(host_setup(&other),
                    Err(e) if e.contains("user root (uid 0): the daemon runs as uid 65534, not root"));
                // Naming itself is no switch: only the limits remain.
                let same = matches!(host_setup(&itself),
                    Ok(Some(s)) if s.credentials.is_none() && s.limits.len() == 1);
                libc::_exit(i32::from(dropped) | i32::from(refused) << 1 | i32::from(same) << 2);
            }
            let mut st = 0;
            assert_eq!(libc::waitpid(pid, &mut st, 0), pid);
            libc::WEXITSTATUS(st)
        };
        assert_eq!(
            code, 7,
            "bit 1: dropped to nobody, 2: refused, 4: itself allowed"
        );
    }

    #[test]
    fn a_hard_limit_above_the_spawners_own_is_refused_without_privilege() {
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: writes one rlimit on our stack.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) }, 0);
        if cur.rlim_max == libc::RLIM_INFINITY {
            eprintln!("skipped: this process has no hard nofile limit to go above");
            return;
        }
        let above = [LimitSetting {
            name: "nofile".into(),
            soft: Some(16),
            hard: Some(cur.rlim_max + 1),
        }];
        let e = check_limits(&above, false).unwrap_err();
        assert!(e.starts_with("limits.nofile: "), "{e}");
        let below = [LimitSetting {
            name: "nofile".into(),
            soft: Some(16),
            hard: Some(cur.rlim_max),
        }];
        assert_eq!(check_limits(&below, false), Ok(()));
    }
}
