//! What a process inside a wall gives up just before `execve`: the same steps, in the same
//! order, for a walled workload's own process (the sandbox's spawn) and for every command
//! `bulkhead exec` runs inside it, so that an exec'd command is never less confined than
//! the workload.
//!
//! Order (each step needs what the previous one leaves):
//! 1. drop every capability not kept from the bounding set (needs `CAP_SETPCAP`);
//! 2. switch uid/gid (supplementary groups replaced by `groups`; `PR_SET_KEEPCAPS` first when
//!    capabilities are kept, or the switch to a non-root uid clears them);
//! 3. set the effective, permitted and inheritable sets to the kept ones, clear the ambient
//!    set and, for a non-root user, raise the kept ones as ambient (the only way a
//!    non-root process keeps capabilities across exec);
//! 4. `no_new_privs` (which the seccomp filter and Landlock require of an unprivileged
//!    process);
//! 5. Landlock scopes (Linux 6.12+): no connection to an abstract Unix socket made
//!    outside the process's domain (the abstract namespace belongs to the network
//!    namespace, which a workload may share with the host);
//! 6. install the seccomp filter, last: it may deny calls the steps above make.
//!
//! [`Restrictions::apply`] runs in a forked child: it makes raw system calls only (glibc's
//! `setuid` family would signal every thread of the process it believes it is) and
//! allocates nothing; everything it reads was prepared before the fork.

use std::sync::Arc;

const CAP_VERSION_3: u32 = 0x2008_0522;
const PR_CAP_AMBIENT: libc::c_int = 47;
const PR_CAP_AMBIENT_RAISE: libc::c_ulong = 2;
const PR_CAP_AMBIENT_CLEAR_ALL: libc::c_ulong = 4;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The restrictions of one walled instance.
#[derive(Clone, Default)]
pub struct Restrictions {
    /// Bit n set: capability n is kept; every other one is dropped.
    pub keep_caps: u64,
    /// The highest capability number of this kernel (`/proc/sys/kernel/cap_last_cap`).
    pub cap_last: u32,
    /// Switch to this uid/gid (ids as seen in the process's user namespace).
    pub user: Option<(u32, u32)>,
    /// The supplementary groups set with the switch (empty: none).
    pub groups: Vec<u32>,
    /// Landlock scopes to enforce ([`LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET`]); 0: none.
    /// Only set where the kernel supports them ([`landlock_abi`] ≥ 6).
    pub landlock_scopes: u64,
    /// Compiled seccomp filters (classic BPF), installed last, in order (the kernel runs
    /// every one; the most restrictive answer wins).
    pub seccomp: Vec<Arc<[libc::sock_filter]>>,
}

impl std::fmt::Debug for Restrictions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restrictions")
            .field("keep_caps", &format_args!("{:#x}", self.keep_caps))
            .field("cap_last", &self.cap_last)
            .field("user", &self.user)
            .field("groups", &self.groups)
            .field(
                "seccomp",
                &self
                    .seccomp
                    .iter()
                    .map(|p| format!("{} instructions", p.len()))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The step of [`Restrictions::apply`] that failed (`errno` tells why).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    BoundingSet,
    User,
    Capabilities,
    NoNewPrivs,
    Landlock,
    Seccomp,
}

impl Step {
    /// What the step does, for error messages.
    pub fn what(self) -> &'static str {
        match self {
            Step::BoundingSet => "drop capabilities from the bounding set",
            Step::User => "switch uid/gid",
            Step::Capabilities => "set capabilities",
            Step::NoNewPrivs => "set no_new_privs",
            Step::Landlock => "enter the Landlock domain",
            Step::Seccomp => "install the seccomp filter",
        }
    }
}

/// Landlock scope: abstract Unix sockets made outside the domain cannot be connected to.
pub const LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1;
/// Landlock scope: processes outside the domain cannot be signalled.
pub const LANDLOCK_SCOPE_SIGNAL: u64 = 2;

/// `struct landlock_ruleset_attr` (ABI 6).
#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

/// The running kernel's Landlock ABI version (0: none, or disabled at boot).
pub fn landlock_abi() -> u32 {
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    // SAFETY: the version query takes no attribute (null, size 0) and returns a number.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(v).unwrap_or(0)
}

/// The highest capability number of the running kernel (40 if it cannot be read).
pub fn cap_last() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

impl Restrictions {
    /// Applies the restrictions to the calling process; see the [module](self) for the
    /// order. On failure `errno` is left as the failing call set it.
    ///
    /// # Safety
    /// Meant for a forked child before exec: it changes the credentials of the calling
    /// thread only (raw system calls), which in a multi-threaded process would leave the
    /// other threads as they were. It allocates nothing.
    pub unsafe fn apply(&self) -> Result<(), Step> {
        // SAFETY: system calls on plain values and on buffers that live on this stack
        // frame or in `self` for the whole call; the caller upholds the fork-child
        // contract above.
        unsafe {
            for cap in 0..=self.cap_last.min(63) {
                if self.keep_caps & (1 << cap) == 0
                    && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
                {
                    return Err(Step::BoundingSet);
                }
            }
            if let Some((uid, gid)) = self.user {
                if (self.keep_caps != 0 && libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0)
                    || libc::syscall(libc::SYS_setgroups, self.groups.len(), self.groups.as_ptr())
                        != 0
                    || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                    || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
                {
                    return Err(Step::User);
                }
            }
            let lo = (self.keep_caps & 0xffff_ffff) as u32;
            let hi = (self.keep_caps >> 32) as u32;
            let mut hdr = CapHeader {
                version: CAP_VERSION_3,
                pid: 0,
            };
            let data = [
                CapData {
                    effective: lo,
                    permitted: lo,
                    inheritable: lo,
                },
                CapData {
                    effective: hi,
                    permitted: hi,
                    inheritable: hi,
                },
            ];
            if libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) != 0 {
                return Err(Step::Capabilities);
            }
            libc::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
            if self.user.is_some() {
                for cap in 0..=self.cap_last.min(63) {
                    if self.keep_caps & (1 << cap) != 0 {
                        libc::prctl(
                            PR_CAP_AMBIENT,
                            PR_CAP_AMBIENT_RAISE,
                            cap as libc::c_ulong,
                            0,
                            0,
                        );
                    }
                }
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(Step::NoNewPrivs);
            }
            if self.landlock_scopes != 0 {
                let attr = RulesetAttr {
                    handled_access_fs: 0,
                    handled_access_net: 0,
                    scoped: self.landlock_scopes,
                };
                let fd = libc::syscall(
                    libc::SYS_landlock_create_ruleset,
                    &attr as *const RulesetAttr,
                    std::mem::size_of::<RulesetAttr>(),
                    0u32,
                );
                if fd < 0 {
                    return Err(Step::Landlock);
                }
                let r = libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32);
                libc::close(fd as libc::c_int);
                if r != 0 {
                    return Err(Step::Landlock);
                }
            }
            for prog in &self.seccomp {
                let fprog = libc::sock_fprog {
                    len: prog.len() as u16,
                    filter: prog.as_ptr() as *mut libc::sock_filter,
                };
                if libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0usize,
                    &fprog,
                ) != 0
                {
                    return Err(Step::Seccomp);
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP_NET_BIND_SERVICE: libc::c_ulong = 10;
    const CAP_SYS_ADMIN: libc::c_ulong = 21;

    /// Runs `r.apply()` in a forked child and returns what `probe` (also run there) saw
    /// as an exit code.
    fn in_child(r: &Restrictions, probe: fn() -> i32) -> i32 {
        // SAFETY: fork in a test; the child only makes system calls (apply allocates
        // nothing; the probe makes one call) and leaves with _exit.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                let code = match r.apply() {
                    Ok(()) => probe(),
                    Err(_) => 100,
                };
                libc::_exit(code);
            }
            let mut st = 0;
            assert_eq!(libc::waitpid(pid, &mut st, 0), pid);
            assert!(libc::WIFEXITED(st), "status {st:#x}");
            libc::WEXITSTATUS(st)
        }
    }

    #[test]
    fn the_bounding_set_and_no_new_privs_hold_after_apply() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (CAP_SETPCAP) to drop from the bounding set");
            return;
        }
        let r = Restrictions {
            keep_caps: 1 << CAP_NET_BIND_SERVICE,
            cap_last: cap_last(),
            ..Default::default()
        };
        // SAFETY: prctl reads only.
        let code = in_child(&r, || unsafe {
            let nnp = libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0);
            let admin = libc::prctl(libc::PR_CAPBSET_READ, CAP_SYS_ADMIN, 0, 0, 0);
            let bind = libc::prctl(libc::PR_CAPBSET_READ, CAP_NET_BIND_SERVICE, 0, 0, 0);
            nnp * 4 + admin * 2 + bind
        });
        assert_eq!(
            code,
            4 + 1,
            "no_new_privs, no CAP_SYS_ADMIN, CAP_NET_BIND_SERVICE"
        );
    }

    #[test]
    fn a_user_switch_takes_effect() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to switch users");
            return;
        }
        let r = Restrictions {
            cap_last: cap_last(),
            user: Some((65534, 65534)),
            ..Default::default()
        };
        // SAFETY: getuid and getgid have no preconditions.
        let code = in_child(&r, || unsafe {
            i32::from(libc::getuid() == 65534 && libc::getgid() == 65534)
        });
        assert_eq!(code, 1);
    }
}
