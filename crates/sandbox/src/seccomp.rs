//! The seccomp deny-list, compiled with `seccompiler` (rust-vmm) into BPF programs that
//! the child installs just before exec.
//!
//! Two programs, because seccompiler gives one action per program:
//!
//! 1. **The deny-list** (`EPERM`): mounts and namespace changes, `clone` with any
//!    `CLONE_NEW*` flag (the raw call that creates a user namespace and with it a full set
//!    of capabilities inside: the attack surface runc's and Docker's default profiles
//!    close), ptrace, keyrings, bpf, perf, userfaultfd, io_uring, file handles, module
//!    loading, kexec, reboot, swap, clock and accounting changes.
//! 2. **`clone3` fails with `ENOSYS`**: its flags sit in memory that seccomp cannot read,
//!    so it cannot be filtered by flag; `ENOSYS` (what Docker answers) makes glibc fall
//!    back to `clone`, which the first program checks. `EPERM` would make every
//!    `pthread_create` fail instead.
//!
//! Everything else is allowed. Each program checks the architecture (seccompiler does),
//! so a 32-bit entry cannot bypass it. A manifest opens whole groups by name
//! (`seccomp_allow`, [`bulkhead_core::sandbox::SYSCALL_GROUPS`]); the calls marked
//! "always" are never opened.

use std::collections::BTreeMap;
use std::sync::Arc;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The group of each denied call (`always`: never opened).
pub const DENIED: &[(&str, libc::c_long, &str)] = &[
    ("mount", libc::SYS_mount, "mount"),
    ("umount2", libc::SYS_umount2, "mount"),
    ("pivot_root", libc::SYS_pivot_root, "mount"),
    ("open_tree", libc::SYS_open_tree, "mount"),
    ("move_mount", libc::SYS_move_mount, "mount"),
    ("fsopen", libc::SYS_fsopen, "mount"),
    ("fsconfig", libc::SYS_fsconfig, "mount"),
    ("fsmount", libc::SYS_fsmount, "mount"),
    ("fspick", libc::SYS_fspick, "mount"),
    ("mount_setattr", libc::SYS_mount_setattr, "mount"),
    ("unshare", libc::SYS_unshare, "namespaces"),
    ("setns", libc::SYS_setns, "namespaces"),
    ("ptrace", libc::SYS_ptrace, "ptrace"),
    ("process_vm_readv", libc::SYS_process_vm_readv, "ptrace"),
    ("process_vm_writev", libc::SYS_process_vm_writev, "ptrace"),
    ("kexec_load", libc::SYS_kexec_load, "always"),
    ("kexec_file_load", libc::SYS_kexec_file_load, "always"),
    ("init_module", libc::SYS_init_module, "always"),
    ("finit_module", libc::SYS_finit_module, "always"),
    ("delete_module", libc::SYS_delete_module, "always"),
    ("bpf", libc::SYS_bpf, "bpf"),
    ("reboot", libc::SYS_reboot, "always"),
    ("swapon", libc::SYS_swapon, "always"),
    ("swapoff", libc::SYS_swapoff, "always"),
    ("settimeofday", libc::SYS_settimeofday, "always"),
    ("clock_settime", libc::SYS_clock_settime, "always"),
    ("clock_adjtime", libc::SYS_clock_adjtime, "always"),
    ("adjtimex", libc::SYS_adjtimex, "always"),
    ("add_key", libc::SYS_add_key, "keyring"),
    ("request_key", libc::SYS_request_key, "keyring"),
    ("keyctl", libc::SYS_keyctl, "keyring"),
    ("acct", libc::SYS_acct, "always"),
    ("perf_event_open", libc::SYS_perf_event_open, "perf"),
    ("userfaultfd", libc::SYS_userfaultfd, "userfaultfd"),
    ("io_uring_setup", libc::SYS_io_uring_setup, "io_uring"),
    ("io_uring_enter", libc::SYS_io_uring_enter, "io_uring"),
    ("io_uring_register", libc::SYS_io_uring_register, "io_uring"),
    (
        "open_by_handle_at",
        libc::SYS_open_by_handle_at,
        "file_handles",
    ),
    (
        "name_to_handle_at",
        libc::SYS_name_to_handle_at,
        "file_handles",
    ),
    ("lookup_dcookie", libc::SYS_lookup_dcookie, "always"),
    ("quotactl", libc::SYS_quotactl, "always"),
    ("iopl", libc::SYS_iopl, "always"),
    ("ioperm", libc::SYS_ioperm, "always"),
    ("syslog", libc::SYS_syslog, "always"),
    ("vhangup", libc::SYS_vhangup, "always"),
    ("fanotify_init", libc::SYS_fanotify_init, "always"),
    ("uselib", libc::SYS_uselib, "always"),
];

/// Every `CLONE_NEW*` flag `clone` takes (`CLONE_NEWTIME` shares its bit with the exit
/// signal in `clone` and exists only for `clone3` and `unshare`).
pub const CLONE_NAMESPACE_FLAGS: [libc::c_int; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWCGROUP,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
];

/// The filter could not be built for this machine.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the seccomp filter: {0}")]
pub struct SeccompError(String);

fn arch() -> Result<TargetArch, SeccompError> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|e| SeccompError(e.to_string()))
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    action: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, action, arch()?)
        .map_err(|e| SeccompError(e.to_string()))?;
    BpfProgram::try_from(filter).map_err(|e| SeccompError(e.to_string()))
}

/// The deny-list with the groups in `allow` opened (`EPERM` for what stays denied).
pub fn deny_list(allow: &[String]) -> Result<BpfProgram, SeccompError> {
    let open = |group: &str| allow.iter().any(|a| a == group);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED
        .iter()
        .filter(|(_, _, group)| !open(group))
        .map(|(_, nr, _)| (*nr, Vec::new()))
        .collect();
    if !open("namespaces") {
        // One rule per flag: the call matches when any of them is set.
        let per_flag = CLONE_NAMESPACE_FLAGS
            .iter()
            .map(|&flag| {
                let cond = SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(flag as u64),
                    flag as u64,
                )
                .map_err(|e| SeccompError(e.to_string()))?;
                SeccompRule::new(vec![cond]).map_err(|e| SeccompError(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        rules.insert(libc::SYS_clone, per_flag);
    }
    compile(rules, SeccompAction::Errno(libc::EPERM as u32))
}

/// `clone3` answers `ENOSYS` (see the [module](self) docs).
pub fn clone3_enosys() -> Result<BpfProgram, SeccompError> {
    let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    compile(rules, SeccompAction::Errno(libc::ENOSYS as u32))
}

fn to_kernel(prog: &BpfProgram) -> Arc<[libc::sock_filter]> {
    prog.iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect()
}

/// The programs to install, in order, as the kernel's `sock_filter` arrays. With the
/// `namespaces` group open, `clone3` is allowed too.
pub fn programs(allow: &[String]) -> Result<Vec<Arc<[libc::sock_filter]>>, SeccompError> {
    let mut out = vec![to_kernel(&deny_list(allow)?)];
    if !allow.iter().any(|a| a == "namespaces") {
        out.push(to_kernel(&clone3_enosys()?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use bulkhead_core::sandbox::SYSCALL_GROUPS;

    #[test]
    fn the_deny_list_compiles() {
        let prog = super::deny_list(&[]).unwrap();
        assert!(prog.len() > super::DENIED.len());
        assert_eq!(super::programs(&[]).unwrap().len(), 2);
        let all: Vec<String> = SYSCALL_GROUPS.iter().map(|g| g.to_string()).collect();
        assert_eq!(super::programs(&all).unwrap().len(), 1);
    }

    #[test]
    fn every_group_is_a_manifest_group() {
        for (name, _, group) in super::DENIED {
            assert!(
                *group == "always" || SYSCALL_GROUPS.contains(group),
                "{name}: {group}"
            );
        }
        for g in SYSCALL_GROUPS {
            assert!(
                g == "namespaces" || super::DENIED.iter().any(|(_, _, group)| *group == g),
                "{g} opens nothing"
            );
        }
    }
}
