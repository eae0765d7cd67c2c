//! The clone3 spawn: everything is prepared before the clone, the child only makes raw
//! system calls, and our init (PID 1 of the new PID namespace) reaps and forwards signals.
//!
//! # Sequence in the child (`C`, PID 1 of its namespace)
//!
//! 1. `PR_SET_PDEATHSIG(SIGKILL)`: the child dies with the spawner thread (a long-lived
//!    thread of the daemon, see [`crate::driver`]). The window between clone3 and this
//!    call is not covered (a daemon crash in those microseconds leaves an instance that the
//!    next daemon's stale-cgroup sweep kills).
//! 2. With a user namespace (`CLONE_NEWUSER` in the same clone3, so it owns every other
//!    new namespace): block on the sync pipe until the parent has written
//!    `/proc/<pid>/uid_map` and `gid_map` (nothing before needs an id; everything after
//!    does: mounts create inodes, and `setresuid` needs a mapped id), then run the
//!    leading mount steps (make `/` private, clone the bind sources: still with the
//!    daemon's host ids, but no capability on the host), then become root *inside*: `setgroups(0)` (drops the daemon's supplementary groups, root's group
//!    among them, which would otherwise still count on host files), `setresgid(0)`,
//!    `setresuid(0)`. From here every access to host files is made as the mapped uid,
//!    with capabilities that count only inside the namespace. The uid switch clears the
//!    parent-death signal: it is set again right after.
//!
//!    The user namespace is the default (`user_namespace: auto`: the driver picks the
//!    tenant's id range); `user_namespace: host` leaves it out.
//! 3. v1 cgroups: write `0` into every v1 `cgroup.procs` opened before the clone. The
//!    cgroup2 membership came with the clone itself (`CLONE_INTO_CGROUP`): no window.
//!    The v1 window is our own code before exec, never the workload. The kernel checks
//!    the credentials the fd was opened with (the daemon's), so this works from inside a
//!    user namespace too; the cgroup directories stay the daemon's (not delegated).
//! 4. `setsid()`: the instance leads its own session and process group (the notify socket
//!    accepts messages from the group).
//! 5. hostname, `lo` up (new network namespace), the mount program ([`MountOp`]). With
//!    the default minimal root: a tmpfs on `/tmp` becomes `/` (`pivot_root`; on an
//!    initial ramfs, which refuses it, a move over `/` and a chroot, as `switch_root`
//!    does), the system directories are attached read-only, the old root stays at
//!    `/.bulkhead-old-root` until `/proc` (and `/sys`) are mounted (a user namespace may only mount
//!    them while a full one is visible), runc's read-only and masked paths follow, then
//!    the old root is detached and the root tmpfs made read-only.
//! 6. With init: block every signal, `clone(SIGCHLD)` (raw: glibc's `fork` runs atfork
//!    handlers that take malloc locks another thread of the daemon may have held at the
//!    clone), the new process (`W`, PID 2) continues below; `C` makes itself
//!    non-dumpable, puts its status, control and `go` pipes (and a slot's title pipe) at
//!    the places `init/proto.rs` names, closes everything else and execs
//!    `bulkhead-init` (`init/main.rs`: a small static program the driver keeps in a
//!    sealed memfd; `execveat` of that descriptor) with `BULKHEAD_INIT_MAIN=<W's pid>`
//!    and its title as command line. So no long-lived process of an instance is a copy
//!    of the daemon (a copy would keep, for the instance's whole life, every page the
//!    daemon rewrites after the clone). The signals stay blocked through the exec
//!    (pending, not lost); `bulkhead-init` reads them from a signalfd, sets a slot's
//!    title, then writes one byte on `go`.
//! 7. `W`: default signal dispositions and an empty mask, stdio, the manifest's `umask`
//!    and `limits`, `chdir` (its `working_dir`), with an init a wait for `go` (so the
//!    program never sees the init before it is non-dumpable and titled), the
//!    capability bounding set, uid/gid/groups, capability sets, `no_new_privs`, seccomp,
//!    `execve`.
//!
//! `W`'s last step before exec marks every descriptor above 2 close-on-exec.
//!
//! Any failure before exec writes `(stage, errno)` into the error pipe (close-on-exec)
//! and exits 127: the parent reads either that record or end-of-file (exec succeeded).
//!
//! # Shared memory (a cold spawn)
//!
//! A clone without `CLONE_VM` copies the daemon's page tables and write-protects its
//! memory, and the child's exec tears the copy down: a cost that grows with the daemon
//! (with 256 MiB more in it, a cold launch took 15 ms instead of 5.5; `docs/benchmarks.md`),
//! which the daemon then pays again in faults as it writes its own pages. So a cold
//! spawn, where `clone3_vm` exists (x86_64, aarch64), runs `C` and `W` in the daemon's
//! memory itself, as `posix_spawn` does, each on a stack of its own
//! (`bulkhead_driver::Stack`):
//!
//! - `C` is cloned with `CLONE_VM | CLONE_VFORK`: the spawner thread stays suspended
//!   until `C` has exec'd the init (or exited), and `W` with the same flags from `C`, so
//!   `C` stays suspended until `W` has exec'd. One of them runs at a time, on the
//!   spawner thread's errno; the memory they read (`Ctx`, `Prepared`) does not change
//!   meanwhile. The spawner thread blocks every signal around the clone (inherited), and
//!   `W` sets every disposition to its default before it unblocks them: no handler of the
//!   daemon's ever runs in them.
//! - With an init, `W` cannot wait for the init's `go` before its exec (`C` execs only
//!   after it), so it execs the waiter as a warm slot's workload process does (step 7 up
//!   to its restrictions, then `init/wait.rs`), with a hand-over the parent wrote into
//!   its pipe before the clone (and the listening sockets on their pair, which the
//!   waiter puts at 3.. with `LISTEN_PID`). The waiter reports `STAGE_WAITING` (skipped
//!   by the parent), waits for `go` and execs the program. A hand-over that does not fit
//!   a pipe (more than `HANDOVER_BYTES` of strings) makes the spawn fork instead.
//! - The id maps of a user namespace must be written by the daemon while `C` waits, and
//!   the spawner thread is suspended: `C` writes its pid (as the daemon sees it, stored
//!   by the kernel with `CLONE_PARENT_SETTID` before `C` ran) on an ask pipe, and the
//!   id-map writer thread (`IdMapWriter`) writes the maps and releases it on the sync
//!   pipe. The writer's own error is the spawn's error.
//! - `C`'s switch to root inside and the init's `PR_SET_DUMPABLE(0)` apply to the memory,
//!   which is the daemon's: the spawner puts the daemon's flag back after the clone.
//!
//! A warm slot with an init is made the same way (its `W` execs the waiter at once, its
//! hand-over comes later); the spawner thread then waits through the slot's setup
//! instead of returning after a fork. A slot without an init forks (its `W` waits as a
//! copy), as does every spawn on other architectures. Test:
//! `walls::neither_a_cold_spawn_nor_a_slot_copies_the_daemons_memory`.
//!
//! # Warm slots
//!
//! `spawn_slot` makes the same child with two more pipes, made before the clone: the
//! hand-over pipe (grown to hold a whole hand-over, so that the launch's write never
//! waits) and, with an init, the title pipe; for a workload with `sockets:` a seqpacket
//! pair the listening sockets come through (`SCM_RIGHTS`). The child closes its copies of
//! the parent's ends first. Steps 1 to 6 run as above (the hostname is the slot's for
//! now); then:
//!
//! - `W` (without an init: the first process itself) runs step 7 up to its restrictions
//!   with what the
//!   slot was made for (stdio, `umask`, `limits`, `chdir`, bounding set, ids,
//!   capabilities, `no_new_privs`, Landlock, seccomp: none depends on the request, all
//!   survive an exec), then puts the error, hand-over and `go` pipes and the sockets'
//!   pair at the places `init/proto.rs` names and execs the waiter (`bulkhead-init` in
//!   its other mode, `init/wait.rs`), so that a waiting slot holds nothing of the
//!   daemon's memory and the hand-over's exec has none of it to tear down. The waiter
//!   writes `STAGE_WAITING` and blocks reading `[length, argc, envc, sockets]` then the
//!   strings (hostname, working directory, program, argv, environment, NUL-terminated),
//!   then that many listening sockets from the pair (exactly that many, or the
//!   hand-over fails), puts them at 3.. with `LISTEN_PID` its pid, waits for `go` and
//!   execs the program; its failures are the same records (`E2BIG` or `EINVAL` for a
//!   bad hand-over, the exec's errno). The hostname is the init's to set (the waiter has
//!   no capability left), without an init the driver's (it enters the slot's UTS
//!   namespace from a thread of its own at the hand-over, before it writes the strings;
//!   there is no `go` then), and the working directory is the one the slot was made for
//!   (the driver refuses a launch with another).
//! - The init execs `bulkhead-init` as in step 6, with the title pipe: `bulkhead-init`
//!   reads the instance's title (`bulkhead-init <instance id>`) and hostname at the
//!   hand-over, writes the title over its command line, sets the hostname, then writes
//!   `go` and runs its loop. The workload's exec waits for that word, so that the
//!   workload never sees the slot's title or hostname. (The init's exec closes its end
//!   of the error pipe: `W`'s is the last one, and its end-of-file still means exec.)
//!
//! The parent awaits `STAGE_WAITING` on the runtime, not on the spawner thread; at the
//! hand-over it writes the title and the strings, then reads the error pipe to its end
//! as a cold spawn does.
//!
//! # The init (`init/main.rs`)
//!
//! Signals stay blocked and are read from a signalfd (a blocked signal is never
//! discarded, even for a namespace's init, which the kernel otherwise protects from
//! signals it has no handler for), polled with the driver's control pipe (and the pidfd
//! of a main process named by `MAINPID=`). `SIGCHLD`: reap everything (we are PID 1:
//! every orphan of the namespace is ours), except that the end of the main process, when
//! it is our child, is reported before it is reaped: it stays a zombie until the driver
//! answers, so the daemon can still tell that the notify messages it sent came from the
//! instance. Anything
//! else is forwarded to every process of the namespace (`kill(-1, sig)`). When the main
//! process (`W`, or the one `MAINPID=` named, see `crate::mainpid`) ends, the init
//! writes its pid and raw wait status into the status pipe and waits for the driver's
//! answer: `0`, and it exits (the kernel then kills what is left of the namespace), or
//! another main process to follow. The driver reports the status from the pipe, so exit
//! codes and signals (with core dump) come through unchanged. An init killed before that
//! (SIGKILL, OOM) reports its own status.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::init_proto as proto;
use bulkhead_core::sandbox::{Root, SandboxSpec};
use bulkhead_driver::restrict::{Restrictions, Step};
use bulkhead_driver::sys::{CloneArgs, CLONE_INTO_CGROUP, CLONE_PIDFD};
use bulkhead_driver::Stack;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;

const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
const MOUNT_ATTR_RDONLY: u64 = 1;
const AT_EMPTY_PATH: libc::c_uint = 0x1000;
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 4;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// One step of the mount program, run in order in the child's new mount namespace.
#[derive(Debug)]
pub(crate) enum MountOp {
    /// `/` and everything below: private propagation (nothing leaks back to the host).
    MakePrivate,
    /// Clones the tree at `path` (detached) into fd slot `slot`, before anything hides it.
    OpenTree {
        path: CString,
        slot: usize,
    },
    /// Everything below `/` read-only (`mount_setattr` with `AT_RECURSIVE`).
    ReadOnlyRoot,
    /// The minimal root: a tmpfs mounted on `/tmp` becomes `/` (`pivot_root`), the old
    /// root stays attached at `/.bulkhead-old-root` until [`MountOp::DetachOldRoot`] (a fresh
    /// `/proc` or `/sys` may only be mounted in a user namespace while a full one is
    /// visible in the mount namespace, as bubblewrap does it).
    PivotToTmpfs,
    /// Detaches the old root (recursively) and removes its mount point.
    DetachOldRoot,
    /// Only the root tmpfs itself read-only (the mounts on it keep their own flags).
    ReadOnlyRootTmpfs,
    Tmpfs {
        path: CString,
        flags: libc::c_ulong,
        data: CString,
    },
    Proc,
    /// A fresh sysfs, read-only (only with a network namespace of the instance's own).
    Sysfs,
    Devpts,
    /// `mkdir`, errors ignored (the target may exist, or sit on a read-only mount; the
    /// move that follows reports a missing target).
    Mkdir {
        path: CString,
    },
    /// Creates an empty file as a bind target, errors ignored likewise.
    Touch {
        path: CString,
    },
    Mknod {
        path: CString,
        dev: libc::dev_t,
    },
    Symlink {
        target: CString,
        path: CString,
    },
    /// Attaches the tree of `slot` at `target`.
    Move {
        slot: usize,
        target: CString,
    },
    /// Makes the mount at `path` (and below) read-only.
    ReadOnly {
        path: CString,
    },
    /// `path` (if it exists) becomes a read-only bind of itself (runc's read-only paths).
    ReadOnlyBind {
        path: CString,
    },
    /// `/dev/null` bound over the file `path`, if it exists (runc's masked files).
    MaskFile {
        path: CString,
    },
    /// An empty read-only tmpfs over the directory `path`, if it exists.
    MaskDir {
        path: CString,
    },
}

/// Set in the child when the minimal root was moved over an initial ramfs instead of
/// pivoted to (the child's own copy of the flag; the parent never sets it).
static ROOT_MOVED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Where the old root hangs during the setup of a minimal root.
const OLD_ROOT: &CStr = c"/.bulkhead-old-root";

/// runc's (and Docker's) read-only paths of `/proc`.
const PROC_READONLY: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// runc's masked files (plus `/proc/interrupts`, which Docker masks since 25.0).
const PROC_MASKED_FILES: [&str; 7] = [
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/interrupts",
];

/// Masked directories of `/proc` and `/sys`.
const MASKED_DIRS: [&str; 5] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// The system's program directories a minimal root shows read-only (those the host has).
pub(crate) const SYSTEM_DIRS: [&str; 9] = [
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt",
];

impl MountOp {
    /// Whether this step only makes `/` private or clones a bind source.
    pub(crate) fn is_early(&self) -> bool {
        matches!(self, MountOp::MakePrivate | MountOp::OpenTree { .. })
    }

    fn describe(&self) -> String {
        let s = |c: &CString| c.to_string_lossy().into_owned();
        match self {
            MountOp::MakePrivate => "make / private".into(),
            MountOp::OpenTree { path, .. } => format!("open bind source {}", s(path)),
            MountOp::ReadOnlyRoot => "make / read-only".into(),
            MountOp::PivotToTmpfs => "make the minimal root (tmpfs, pivot_root)".into(),
            MountOp::DetachOldRoot => "detach the host's root".into(),
            MountOp::ReadOnlyRootTmpfs => "make the minimal root read-only".into(),
            MountOp::Tmpfs { path, .. } => format!("mount tmpfs on {}", s(path)),
            MountOp::Proc => "mount /proc".into(),
            MountOp::Sysfs => "mount /sys".into(),
            MountOp::Devpts => "mount /dev/pts".into(),
            MountOp::Mkdir { path } => format!("create {}", s(path)),
            MountOp::Touch { path } => format!("create {}", s(path)),
            MountOp::Mknod { path, .. } => format!("create device {}", s(path)),
            MountOp::Symlink { path, .. } => format!("create symlink {}", s(path)),
            MountOp::Move { target, .. } => format!("bind on {}", s(target)),
            MountOp::ReadOnly { path } => format!("make {} read-only", s(path)),
            MountOp::ReadOnlyBind { path } => format!("make {} read-only", s(path)),
            MountOp::MaskFile { path } | MountOp::MaskDir { path } => format!("mask {}", s(path)),
        }
    }
}

fn cstr(s: impl AsRef<[u8]>) -> io::Result<CString> {
    CString::new(s.as_ref().to_vec())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"))
}

fn cpath(p: &Path) -> io::Result<CString> {
    cstr(p.as_os_str().as_bytes())
}

/// One bind to set up: host `source` at `target`.
#[derive(Debug, Clone)]
pub(crate) struct BindPlan {
    pub source: PathBuf,
    pub target: PathBuf,
    pub readonly: bool,
}

/// A system directory of the host as the minimal root shows it.
#[derive(Debug, Clone)]
pub(crate) enum SystemEntry {
    /// Bound read-only at the same path.
    Dir(PathBuf),
    /// A symlink (merged `/usr`: `/bin -> usr/bin`), made again inside.
    Symlink { path: PathBuf, target: PathBuf },
}

/// The host's [`SYSTEM_DIRS`], as they are (missing ones left out).
pub(crate) fn system_entries() -> Vec<SystemEntry> {
    SYSTEM_DIRS
        .iter()
        .filter_map(|d| {
            let path = PathBuf::from(d);
            let meta = std::fs::symlink_metadata(&path).ok()?;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).ok()?;
                Some(SystemEntry::Symlink { path, target })
            } else if meta.is_dir() {
                Some(SystemEntry::Dir(path))
            } else {
                None
            }
        })
        .collect()
}

/// Paths the fresh mounts hide: a bind target under one of them needs its parents made.
fn hidden_by(target: &Path, masks: &[PathBuf]) -> bool {
    masks.iter().any(|m| target.starts_with(m))
}

/// The device nodes of the minimal `/dev`: name, major, minor.
const DEVICES: [(&str, u32, u32); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// `mkdir -p` as mount steps: every ancestor of `path` from the top down, then `path`.
fn mkdir_all(ops: &mut Vec<MountOp>, path: &Path) -> io::Result<()> {
    let mut parts: Vec<&Path> = path.ancestors().filter(|p| p.parent().is_some()).collect();
    parts.reverse();
    for p in parts {
        ops.push(MountOp::Mkdir { path: cpath(p)? });
    }
    Ok(())
}

/// What the mount program is built from, besides the manifest's section.
pub(crate) struct MountInputs<'a> {
    /// Binds: the spawn's own paths first (notify socket, data plane; read-write), the
    /// workload's folder and program (minimal root), then the manifest's.
    pub binds: &'a [BindPlan],
    /// A user namespace is made (no `mknod`; device nodes are host binds).
    pub userns: bool,
    /// The host's system directories, for a minimal root.
    pub system: &'a [SystemEntry],
}

/// Builds the mount program for `sb`; returns it and the number of fd slots it uses.
///
/// In a user namespace `mknod` is refused and a tmpfs mounted there is `nodev` whatever
/// the flags: the device nodes are then the host's, bind-mounted (slots after the binds'),
/// like bubblewrap does.
pub(crate) fn mount_program(
    sb: &SandboxSpec,
    inputs: &MountInputs<'_>,
) -> io::Result<(Vec<MountOp>, usize)> {
    let binds = inputs.binds;
    let userns = inputs.userns;
    let minimal = sb.root == Root::Minimal;
    let mut ops = vec![MountOp::MakePrivate];
    for (slot, b) in binds.iter().enumerate() {
        ops.push(MountOp::OpenTree {
            path: cpath(&b.source)?,
            slot,
        });
    }
    let mut slot_count = binds.len();
    let dev_slot = slot_count;
    if userns {
        // Cloned before the /dev tmpfs hides them.
        for (i, (name, _, _)) in DEVICES.iter().enumerate() {
            ops.push(MountOp::OpenTree {
                path: cstr(format!("/dev/{name}"))?,
                slot: dev_slot + i,
            });
        }
        slot_count += DEVICES.len();
    }
    let mut system_slots = Vec::new();
    if minimal {
        for e in inputs.system {
            if let SystemEntry::Dir(d) = e {
                ops.push(MountOp::OpenTree {
                    path: cpath(d)?,
                    slot: slot_count,
                });
                system_slots.push((slot_count, d.clone()));
                slot_count += 1;
            }
        }
        ops.push(MountOp::PivotToTmpfs);
        for e in inputs.system {
            if let SystemEntry::Symlink { path, target } = e {
                ops.push(MountOp::Symlink {
                    target: cpath(target)?,
                    path: cpath(path)?,
                });
            }
        }
        for (slot, d) in &system_slots {
            ops.push(MountOp::Mkdir { path: cpath(d)? });
            ops.push(MountOp::Move {
                slot: *slot,
                target: cpath(d)?,
            });
            ops.push(MountOp::ReadOnly { path: cpath(d)? });
        }
    } else if sb.readonly_root {
        ops.push(MountOp::ReadOnlyRoot);
    }
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    let mut masks: Vec<PathBuf> = vec!["/tmp".into(), "/dev".into(), "/proc".into()];
    if minimal {
        // Everything is hidden in a minimal root: every bind target needs its parents.
        masks.push("/".into());
    }
    let tmpfs = |ops: &mut Vec<MountOp>, path: &str, data: &str| -> io::Result<()> {
        if minimal {
            mkdir_all(ops, Path::new(path))?;
        }
        ops.push(MountOp::Tmpfs {
            path: cstr(path)?,
            flags: nosuid_nodev,
            data: cstr(data)?,
        });
        Ok(())
    };
    tmpfs(&mut ops, "/tmp", "mode=1777")?;
    if minimal {
        tmpfs(&mut ops, "/run", "mode=755")?;
    }
    for t in &sb.tmpfs {
        masks.push(PathBuf::from(t));
        if !minimal {
            ops.push(MountOp::Mkdir { path: cstr(t)? });
        }
        tmpfs(&mut ops, t, "mode=1777")?;
    }
    // A minimal /dev: device nodes on a tmpfs (not nodev, or they would not open).
    ops.push(MountOp::Mkdir {
        path: cstr("/dev")?,
    });
    ops.push(MountOp::Tmpfs {
        path: cstr("/dev")?,
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: cstr("mode=755")?,
    });
    for (i, (name, major, minor)) in DEVICES.into_iter().enumerate() {
        let path = cstr(format!("/dev/{name}"))?;
        if userns {
            ops.push(MountOp::Touch { path: path.clone() });
            ops.push(MountOp::Move {
                slot: dev_slot + i,
                target: path,
            });
        } else {
            ops.push(MountOp::Mknod {
                path,
                dev: libc::makedev(major, minor),
            });
        }
    }
    ops.push(MountOp::Mkdir {
        path: cstr("/dev/pts")?,
    });
    ops.push(MountOp::Devpts);
    ops.push(MountOp::Mkdir {
        path: cstr("/dev/shm")?,
    });
    ops.push(MountOp::Tmpfs {
        path: cstr("/dev/shm")?,
        flags: nosuid_nodev,
        data: cstr("mode=1777")?,
    });
    for (target, path) in [
        ("pts/ptmx", "/dev/ptmx"),
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
    ] {
        ops.push(MountOp::Symlink {
            target: cstr(target)?,
            path: cstr(path)?,
        });
    }
    // /proc after /dev: its masks are binds of /dev/null.
    ops.push(MountOp::Mkdir {
        path: cstr("/proc")?,
    });
    ops.push(MountOp::Proc);
    if minimal {
        ops.push(MountOp::Mkdir {
            path: cstr("/sys")?,
        });
        if sb.network.isolated() {
            // A fresh sysfs shows the instance's own network namespace. With the host's
            // network it would show the host's devices: no /sys then (bind it to open).
            ops.push(MountOp::Sysfs);
        }
    }
    if sb.protect_kernel {
        for p in PROC_READONLY {
            ops.push(MountOp::ReadOnlyBind { path: cstr(p)? });
        }
        for p in PROC_MASKED_FILES {
            ops.push(MountOp::MaskFile { path: cstr(p)? });
        }
        for p in MASKED_DIRS {
            ops.push(MountOp::MaskDir { path: cstr(p)? });
        }
    }
    for (slot, b) in binds.iter().enumerate() {
        if hidden_by(&b.target, &masks) {
            // Parents from the top down, then the target itself.
            let mut parents: Vec<&Path> = b.target.ancestors().skip(1).collect();
            parents.reverse();
            for p in parents.into_iter().filter(|p| hidden_by(p, &masks)) {
                ops.push(MountOp::Mkdir { path: cpath(p)? });
            }
            if b.source.is_dir() {
                ops.push(MountOp::Mkdir {
                    path: cpath(&b.target)?,
                });
            } else {
                ops.push(MountOp::Touch {
                    path: cpath(&b.target)?,
                });
            }
        }
        ops.push(MountOp::Move {
            slot,
            target: cpath(&b.target)?,
        });
        if b.readonly {
            ops.push(MountOp::ReadOnly {
                path: cpath(&b.target)?,
            });
        }
    }
    if minimal {
        ops.push(MountOp::DetachOldRoot);
        if sb.readonly_root {
            ops.push(MountOp::ReadOnlyRootTmpfs);
        }
    }
    Ok((ops, slot_count))
}

/// Everything the child needs, allocated before the clone.
pub(crate) struct Prepared {
    pub program: CString,
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
    pub cwd: CString,
    pub hostname: Vec<u8>,
    pub net: bool,
    pub init: bool,
    pub mounts: Vec<MountOp>,
    /// How many leading `mounts` only make `/` private or clone bind sources (run
    /// before the uid switch in a user namespace).
    pub early_mounts: usize,
    pub slots: usize,
    /// Capabilities, uid/gid, no_new_privs and seccomp, applied last before exec (and
    /// to every command `exec` runs inside).
    pub restrict: Restrictions,
    /// A new user namespace: the contents of `uid_map` and `gid_map`.
    pub userns: Option<(String, String)>,
    /// The manifest's `umask` and `limits` (name, resource, value), set in the workload's
    /// process before its working directory and restrictions.
    pub umask: Option<libc::mode_t>,
    pub rlimits: Vec<(String, libc::__rlimit_resource_t, libc::rlimit)>,
    pub cgroup_fd: Option<OwnedFd>,
    pub v1_procs: Vec<OwnedFd>,
    /// What the init shows as its command line (`bulkhead-init <instance id>`, NUL
    /// terminated; a slot's until its hand-over brings the instance's).
    pub title: Vec<u8>,
    /// The init's executable (the driver's sealed memfd of `bulkhead-init`), exec'd by
    /// the instance's first process once it forked the workload process.
    pub init_exe: RawFd,
    /// Listening sockets, put at 3.. in the workload (`env` has `LISTEN_PID` as a
    /// placeholder, filled in by the workload with the pid it sees).
    pub listen: Vec<bulkhead_driver::listen::ListenFd>,
}

/// What clone3 gave back.
pub(crate) struct Child {
    pub pid: u32,
    pub pidfd: OwnedFd,
    /// Read end of the init's status pipe (only with init).
    pub status: Option<OwnedFd>,
    /// Write end of the init's control pipe (only with init; see [`crate::mainpid`]).
    pub ctl: Option<OwnedFd>,
}

/// A failure before exec, as reported by the child.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChildError {
    #[error("cannot create the instance's process: {0}")]
    Clone(#[source] io::Error),
    #[error("cannot {what} in the sandbox: {source}")]
    Setup {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start {program}: {source}")]
    Exec {
        program: String,
        #[source]
        source: io::Error,
    },
}

// Stages reported through the error pipe; mount op `i` is `STAGE_MOUNT + i`.
const STAGE_CGROUP: u32 = 1;
const STAGE_SETSID: u32 = 2;
const STAGE_HOSTNAME: u32 = 3;
const STAGE_NET: u32 = 4;
const STAGE_FORK: u32 = 5;
const STAGE_STDIO: u32 = 6;
const STAGE_CHDIR: u32 = 7;
const STAGE_BSET: u32 = 8;
const STAGE_USER: u32 = 9;
const STAGE_CAPS: u32 = 10;
const STAGE_NNP: u32 = 11;
const STAGE_SECCOMP: u32 = 12;
const STAGE_EXEC: u32 = crate::init_proto::STAGE_EXEC;
const STAGE_PDEATHSIG: u32 = 14;
const STAGE_USERNS_WAIT: u32 = 15;
const STAGE_USERNS_ROOT: u32 = 16;
const STAGE_LANDLOCK: u32 = 17;
const STAGE_LISTEN: u32 = crate::init_proto::STAGE_LISTEN;
/// A slot's workload process waits for its hand-over (not a failure: see [`spawn_slot`]).
pub(crate) const STAGE_WAITING: u32 = crate::init_proto::STAGE_WAITING;
const STAGE_HANDOVER: u32 = crate::init_proto::STAGE_HANDOVER;
const STAGE_INIT: u32 = 21;
const STAGE_WAITER: u32 = 22;
const STAGE_MOUNT: u32 = 1000;
/// `STAGE_LIMIT + i`: setting `Prepared::rlimits[i]`.
const STAGE_LIMIT: u32 = 900;

fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
}

/// The pair a hand-over's listening sockets come through (`SCM_RIGHTS`).
fn sockets_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Clones and sets up the instance; returns once it has exec'd (or failed, in which case
/// the child is killed and reaped, and nothing of it is left).
///
/// Must run on the long-lived spawner thread (parent-death signal); the caller takes the
/// reaper lock before, and `on_pid` registers the pid and releases it (a failed child is
/// unregistered here once reaped).
pub(crate) fn spawn(
    p: &Prepared,
    stdout: &OwnedFd,
    stderr: &OwnedFd,
    on_pid: impl FnOnce(u32),
) -> Result<Child, ChildError> {
    clone_instance(p, stdout, stderr, on_pid, None).map(|(child, _)| child)
}

/// The clone and the parent's side of it; with `slot`, returns as soon as the child
/// runs (and has its id maps), with the ends of its hand-over.
fn clone_instance(
    p: &Prepared,
    stdout: &OwnedFd,
    stderr: &OwnedFd,
    on_pid: impl FnOnce(u32),
    slot: Option<SlotPipes>,
) -> Result<(Child, Option<SlotEnds>), ChildError> {
    let (err_r, err_w) = pipe_cloexec().map_err(ChildError::Clone)?;
    let (status_r, status_w) = pipe_cloexec().map_err(ChildError::Clone)?;
    // The driver tells the init through this one that the main process moved (MAINPID=).
    let (ctl_r, ctl_w) = pipe_cloexec().map_err(ChildError::Clone)?;
    // The child waits on this one until the parent has written its id maps (user
    // namespace only; otherwise unused).
    let (sync_r, sync_w) = pipe_cloexec().map_err(ChildError::Clone)?;
    let devnull = rustix::fs::open(
        "/dev/null",
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| ChildError::Clone(e.into()))?;
    let ptr_list = |v: &[CString]| -> Vec<*const libc::c_char> {
        v.iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect()
    };
    let argv = ptr_list(&p.argv);
    let mut envp = ptr_list(&p.env);
    // LISTEN_PID is written in place by the workload: a writable copy of that entry.
    let pid_prefix = format!("LISTEN_PID={}", bulkhead_driver::listen::PID_PLACEHOLDER);
    let mut pid_entry: Option<Vec<u8>> = None;
    let mut pid_at: *mut u8 = std::ptr::null_mut();
    if let Some(i) = p
        .env
        .iter()
        .position(|e| e.as_bytes() == pid_prefix.as_bytes())
    {
        let entry = pid_entry.insert(p.env[i].as_bytes_with_nul().to_vec());
        envp[i] = entry.as_ptr().cast();
        pid_at = entry[b"LISTEN_PID=".len()..].as_mut_ptr();
    }
    let listen: Vec<RawFd> = p.listen.iter().map(|l| l.fd.as_raw_fd()).collect();
    let mut listen_tmp: Vec<RawFd> = vec![-1; listen.len()];
    // The init tells the workload process through this one that it runs (see `go_r`).
    let go = if p.init {
        Some(pipe_cloexec().map_err(ChildError::Clone)?)
    } else {
        None
    };
    let mut slots: Vec<RawFd> = vec![-1; p.slots];
    // The first processes run in this memory until their exec ("Shared memory" above),
    // where the architecture has `clone3_vm`; with an init, the workload process execs
    // the waiter, whose hand-over a cold spawn fills here. A cold hand-over too large
    // for its pipe, and a slot without an init, make a copy instead.
    let mut cold = None;
    let vm = bulkhead_driver::SHARED_MEMORY_SPAWN
        && match &slot {
            // A slot's processes exec bulkhead-init's modes when it is made.
            Some(_) => true,
            None => {
                !p.init || {
                    cold = ColdHandover::new(p).map_err(ChildError::Clone)?;
                    cold.is_some()
                }
            }
        };
    let stacks = if vm {
        let w = if p.init {
            Some(Stack::take().map_err(ChildError::Clone)?)
        } else {
            None
        };
        Some((Stack::take().map_err(ChildError::Clone)?, w))
    } else {
        None
    };
    // Where the kernel stores the first process's pid (as we see it) for the id-map
    // writer (`CLONE_PARENT_SETTID`).
    let host_pid = AtomicI32::new(0);
    let mut sync_w = Some(sync_w);
    let maps = match (&p.userns, vm) {
        (Some(maps), true) => Some(
            IdMapWriter::start(maps.clone(), sync_w.take().expect("sync_w"))
                .map_err(ChildError::Clone)?,
        ),
        _ => None,
    };
    let ctx = Ctx {
        p,
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        program: p.program.as_ptr(),
        cwd: p.cwd.as_ptr(),
        title: p.title.as_ptr(),
        slot: match (&slot, &cold) {
            (Some(s), _) => s.child_side(),
            (_, Some(c)) => SlotCtx {
                handover_r: c.handover_r.as_raw_fd(),
                fds_r: c.fds_r.as_ref().map_or(-1, |r| r.as_raw_fd()),
                ..SlotCtx::NONE
            },
            _ => SlotCtx::NONE,
        },
        slots: slots.as_mut_ptr(),
        err_w: err_w.as_raw_fd(),
        status_w: status_w.as_raw_fd(),
        ctl_r: ctl_r.as_raw_fd(),
        sync_r: sync_r.as_raw_fd(),
        sync_w: match (&sync_w, &maps) {
            (Some(w), _) => w.as_raw_fd(),
            (None, Some(m)) => m.sync_w,
            (None, None) => -1,
        },
        ask_w: maps.as_ref().map_or(-1, |m| m.ask_w.as_raw_fd()),
        host_pid: &host_pid,
        w_stack: stacks.as_ref().and_then(|(_, w)| w.as_ref()),
        devnull: devnull.as_raw_fd(),
        stdout: stdout.as_raw_fd(),
        stderr: stderr.as_raw_fd(),
        // With the waiter, the sockets and `LISTEN_PID` are its to put in place.
        pid_at: if cold.is_some() {
            std::ptr::null_mut()
        } else {
            pid_at
        },
        listen: listen.as_ptr(),
        listen_tmp: listen_tmp.as_mut_ptr(),
        listen_n: if cold.is_some() { 0 } else { listen.len() },
        go_r: go.as_ref().map_or(-1, |(r, _)| r.as_raw_fd()),
        go_w: go.as_ref().map_or(-1, |(_, w)| w.as_raw_fd()),
        init_exe: p.init_exe,
    };

    let mut flags = CLONE_PIDFD
        | (libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) as u64;
    if p.net {
        flags |= libc::CLONE_NEWNET as u64;
    }
    if p.userns.is_some() {
        // Created first by the kernel, so it owns the other new namespaces: the child's
        // capabilities count inside them and nowhere on the host.
        flags |= libc::CLONE_NEWUSER as u64;
    }
    let mut pidfd: RawFd = -1;
    let mut args = CloneArgs {
        flags,
        pidfd: &mut pidfd as *mut RawFd as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    if let Some(fd) = &p.cgroup_fd {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = fd.as_raw_fd() as u64;
    }
    let ret = if let Some((stack, _)) = &stacks {
        args.flags |= (libc::CLONE_VM | libc::CLONE_VFORK) as u64;
        stack.set(&mut args);
        if maps.is_some() {
            args.flags |= libc::CLONE_PARENT_SETTID as u64;
            args.parent_tid = host_pid.as_ptr() as u64;
        }
        // SAFETY: prctl reads of this process's flag.
        let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
        let blocked = bulkhead_driver::Blocked::all().map_err(ChildError::Clone)?;
        // SAFETY: the child runs `child_entry(&ctx)` on `stack` in this address space
        // while this thread is suspended (CLONE_VFORK) until the child's exec or exit,
        // and the workload process it clones the same way runs while the child is
        // suspended: one of them runs at a time, on this thread's errno. They only read
        // `ctx` (all allocated above, alive until this returns), write into the buffers
        // it points to, and make raw system calls: no allocation, no lock, no return.
        // Every signal is blocked here, so no handler of the daemon's runs in them; the
        // workload process sets every disposition to its default before it unblocks.
        let r = unsafe {
            bulkhead_driver::clone3_vm(
                &mut args,
                child_entry,
                (&ctx as *const Ctx<'_>).cast_mut().cast(),
            )
        };
        // The child's switch to root in its user namespace and the init's
        // `PR_SET_DUMPABLE` applied to the memory they shared with us: put our flag back.
        // SAFETY: prctl on this process's flag.
        unsafe {
            if dumpable >= 0 && libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) != dumpable {
                libc::prctl(libc::PR_SET_DUMPABLE, dumpable as libc::c_ulong, 0, 0, 0);
            }
        }
        drop(blocked);
        if r < 0 {
            return Err(ChildError::Clone(io::Error::from_raw_os_error(-r as i32)));
        }
        r as u32
    } else {
        // SAFETY: clone3 without CLONE_VM and without a stack behaves like fork: the
        // child gets a copy of this thread's stack and of the address space. In the
        // child, `child_main` only reads `ctx` (all allocated above, alive in the copy)
        // and makes raw system calls until exec or _exit; it never returns, never
        // allocates, never takes a lock.
        let ret = unsafe { bulkhead_driver::sys::clone3(&mut args) }.map_err(ChildError::Clone)?;
        if ret == 0 {
            // SAFETY: see above; we are the child.
            unsafe { child_main(&ctx) }
        }
        ret
    };
    let cold_waiter = ctx.slot.handover_r >= 0;
    // The stacks' children have exec'd or exited (CLONE_VFORK, nested).
    if let Some((c, w)) = stacks {
        c.give_back();
        if let Some(w) = w {
            w.give_back();
        }
    }
    drop(cold);
    let pid = ret;
    on_pid(pid);
    // SAFETY: CLONE_PIDFD stored a new descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // The parent's copies of the child's ends: the error pipe reads EOF once the child
    // exec'd (or died), the status pipe once the init wrote and exited.
    drop(err_w);
    drop(status_w);
    drop(ctl_r);
    drop(devnull);
    drop(slots);
    drop(sync_r);
    drop(go);
    if let Some(m) = maps {
        // ORDER: our end of the ask pipe goes first: a child that failed before asking
        // leaves the writer at end-of-file rather than waiting.
        drop(m.ask_w);
        if let Ok(Err(Some(source))) = m.done.recv() {
            abandon(pid, &pidfd);
            return Err(ChildError::Setup {
                what: "write the user namespace's id maps".into(),
                source,
            });
        }
        // Written, or the child failed before it asked (its record says why).
    }
    if let (Some((uid_map, gid_map)), Some(sync_w)) = (&p.userns, &sync_w) {
        // ORDER: the child is blocked reading the sync pipe; the maps are written while
        // it waits, then one byte releases it. `setgroups` stays "allow": we hold
        // CAP_SETGID here, and the child needs setgroups(0) to drop our groups.
        let res = std::fs::write(format!("/proc/{pid}/uid_map"), uid_map)
            .and_then(|()| std::fs::write(format!("/proc/{pid}/gid_map"), gid_map))
            .and_then(|()| Ok(rustix::io::write(sync_w, b"u").map(drop)?));
        if let Err(source) = res {
            abandon(pid, &pidfd);
            return Err(ChildError::Setup {
                what: "write the user namespace's id maps".into(),
                source,
            });
        }
    }
    drop(sync_w);
    if let Some(pipes) = slot {
        // The child's setup runs on; the caller awaits its `STAGE_WAITING` record.
        let child = Child {
            pid,
            pidfd,
            status: p.init.then_some(status_r),
            ctl: p.init.then_some(ctl_w),
        };
        return Ok((child, Some(pipes.parent_side(err_r))));
    }

    loop {
        let mut rec = [0u8; 8];
        match bulkhead_driver::sys::read_full(&err_r, &mut rec) {
            Ok(8) => {}
            Ok(_) => break,
            Err(e) => {
                abandon(pid, &pidfd);
                return Err(ChildError::Clone(e));
            }
        }
        let stage = u32::from_ne_bytes(rec[..4].try_into().unwrap_or_default());
        let errno = i32::from_ne_bytes(rec[4..].try_into().unwrap_or_default());
        // The waiter of a cold spawn reports that it waits, as a slot's does, then
        // execs (its hand-over is in its pipe already) or fails.
        if stage == STAGE_WAITING && cold_waiter {
            continue;
        }
        abandon(pid, &pidfd);
        return Err(record_error(p, stage, errno));
    }
    Ok((
        Child {
            pid,
            pidfd,
            status: p.init.then_some(status_r),
            ctl: p.init.then_some(ctl_w),
        },
        None,
    ))
}

/// A cold spawn's hand-over to its waiter, made before the clone: the message in its
/// pipe, the listening sockets on their pair (the write ends are closed: the child
/// never has them).
struct ColdHandover {
    handover_r: OwnedFd,
    fds_r: Option<OwnedFd>,
}

impl ColdHandover {
    /// `None`: the hand-over does not fit a pipe (the spawn then forks).
    fn new(p: &Prepared) -> io::Result<Option<ColdHandover>> {
        let Ok(msg) = handover_message(
            &p.hostname,
            &p.cwd,
            &p.program,
            &p.argv,
            &p.env,
            p.listen.len(),
            HANDOVER_HEADER + HANDOVER_BYTES,
        ) else {
            return Ok(None);
        };
        let (r, w) = pipe_cloexec()?;
        // Nobody reads yet: the pipe must hold the whole message.
        // SAFETY: fcntl on a descriptor we own.
        let capacity = unsafe {
            if libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ) < msg.len() as libc::c_int {
                libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, msg.len() as libc::c_int);
            }
            libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ)
        };
        if capacity < msg.len() as libc::c_int {
            return Ok(None);
        }
        bulkhead_driver::sys::write_all(&w, &msg)?;
        let fds_r = if p.listen.is_empty() {
            None
        } else {
            let (r, w) = sockets_pair()?;
            let fds: Vec<_> = p
                .listen
                .iter()
                .map(|l| std::os::fd::AsFd::as_fd(&*l.fd))
                .collect();
            send_sockets(&w, &fds)?;
            Some(r)
        };
        Ok(Some(ColdHandover {
            handover_r: r,
            fds_r,
        }))
    }
}

/// Writes a shared-memory spawn's id maps: its thread is suspended until the child's
/// exec, so another thread does it when the child asks (see "Shared memory" above).
struct IdMapWriter {
    ask_w: OwnedFd,
    /// The sync pipe's write end, held by the writer (its number, for the child to
    /// close its copy).
    sync_w: RawFd,
    /// `Err(None)`: the child never asked (it failed first).
    done: mpsc::Receiver<Result<(), Option<io::Error>>>,
}

impl IdMapWriter {
    fn start(maps: (String, String), sync_w: OwnedFd) -> io::Result<IdMapWriter> {
        let (ask_r, ask_w) = pipe_cloexec()?;
        let (tx, done) = mpsc::sync_channel(1);
        let sync_raw = sync_w.as_raw_fd();
        let job: crate::driver::Job = Box::new(move || {
            let _ = tx.send(write_maps_when_asked(&ask_r, &sync_w, &maps));
        });
        crate::driver::lock(id_map_writer())
            .send(job)
            .map_err(|_| io::Error::other("the id map writer thread is gone"))?;
        Ok(IdMapWriter {
            ask_w,
            sync_w: sync_raw,
            done,
        })
    }
}

/// The thread that writes shared-memory spawns' id maps.
fn id_map_writer() -> &'static std::sync::Mutex<mpsc::Sender<crate::driver::Job>> {
    static WRITER: std::sync::OnceLock<std::sync::Mutex<mpsc::Sender<crate::driver::Job>>> =
        std::sync::OnceLock::new();
    WRITER.get_or_init(|| crate::driver::job_thread("bulkhead-sandbox-idmaps"))
}

/// Waits for the child's pid on `ask`, writes its `uid_map` and `gid_map`, then releases
/// it with one byte on `sync`.
fn write_maps_when_asked(
    ask: &OwnedFd,
    sync: &OwnedFd,
    (uid_map, gid_map): &(String, String),
) -> Result<(), Option<io::Error>> {
    let mut b = [0u8; 4];
    if bulkhead_driver::sys::read_full(ask, &mut b).map_err(Some)? < b.len() {
        return Err(None);
    }
    let pid = i32::from_ne_bytes(b);
    std::fs::write(format!("/proc/{pid}/uid_map"), uid_map)?;
    std::fs::write(format!("/proc/{pid}/gid_map"), gid_map)?;
    rustix::io::write(sync, b"u").map_err(io::Error::from)?;
    Ok(())
}

/// The error a failure record `(stage, errno)` of the child stands for.
pub(crate) fn record_error(p: &Prepared, stage: u32, errno: i32) -> ChildError {
    {
        let mut source = io::Error::from_raw_os_error(errno);
        if p.userns.is_some() && errno == libc::EACCES {
            // The usual surprise: host files are checked against the mapped uid.
            source = io::Error::new(
                source.kind(),
                format!(
                    "{source}; in a user namespace the host sees the workload as the \
                     mapped unprivileged uid, which needs access to it"
                ),
            );
        }
        match stage {
            STAGE_EXEC => ChildError::Exec {
                program: p.program.to_string_lossy().into_owned(),
                source,
            },
            s if (STAGE_LIMIT..STAGE_MOUNT).contains(&s) => ChildError::Setup {
                what: p.rlimits.get((s - STAGE_LIMIT) as usize).map_or_else(
                    || format!("run setup stage {s}"),
                    |(name, _, l)| {
                        let show = |v: libc::rlim_t| {
                            if v == libc::RLIM_INFINITY {
                                "unlimited".to_owned()
                            } else {
                                v.to_string()
                            }
                        };
                        format!(
                            "set limits.{name} (soft {}, hard {})",
                            show(l.rlim_cur),
                            show(l.rlim_max)
                        )
                    },
                ),
                source,
            },
            s => ChildError::Setup {
                what: describe_stage(s, &p.mounts),
                source,
            },
        }
    }
}

fn describe_stage(stage: u32, mounts: &[MountOp]) -> String {
    match stage {
        STAGE_CGROUP => "join the v1 cgroups".into(),
        STAGE_SETSID => "start a session".into(),
        STAGE_HOSTNAME => "set the hostname".into(),
        STAGE_NET => "bring lo up".into(),
        STAGE_FORK => "fork the workload from the init".into(),
        STAGE_STDIO => "set up stdin, stdout and stderr".into(),
        STAGE_CHDIR => "enter the working directory".into(),
        STAGE_BSET => Step::BoundingSet.what().into(),
        STAGE_USER => Step::User.what().into(),
        STAGE_CAPS => Step::Capabilities.what().into(),
        STAGE_NNP => Step::NoNewPrivs.what().into(),
        STAGE_LANDLOCK => Step::Landlock.what().into(),
        STAGE_LISTEN => "pass the listening sockets (LISTEN_FDS)".into(),
        STAGE_INIT => "start bulkhead's init".into(),
        STAGE_WAITER => "start the warm slot's waiting program".into(),
        proto::STAGE_WAIT_NOFILE => "set limits.nofile".into(),
        STAGE_SECCOMP => Step::Seccomp.what().into(),
        STAGE_PDEATHSIG => "set the parent-death signal".into(),
        STAGE_USERNS_WAIT => "wait for the user namespace's id maps".into(),
        STAGE_USERNS_ROOT => "become root inside the user namespace".into(),
        STAGE_HANDOVER => "receive the program from the warm slot's hand-over".into(),
        STAGE_WAITING => "wait for the warm slot's hand-over".into(),
        s if s >= STAGE_MOUNT => mounts
            .get((s - STAGE_MOUNT) as usize)
            .map_or_else(|| format!("run mount step {s}"), MountOp::describe),
        s => format!("run setup stage {s}"),
    }
}

/// Kills and reaps a child that failed before exec, and gives up its registration (the
/// caller's `on_pid` made it; the reaper lock is no longer held here).
fn abandon(pid: u32, pidfd: &OwnedFd) {
    let _ = rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::KILL);
    if let Err(e) = bulkhead_driver::sys::reap_blocking(pid) {
        tracing::error!("cannot reap failed sandbox child {pid}: {e}");
    }
    bulkhead_driver::reaper::Registry::global().unregister(pid);
}

/// Raw pointers into [`Prepared`] and the fds the child uses.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    p: &'a Prepared,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// The program and working directory of `execve` and `chdir` (a slot's come with
    /// its hand-over), and the init's title.
    program: *const libc::c_char,
    cwd: *const libc::c_char,
    title: *const u8,
    /// A warm slot's hand-over ([`SlotCtx::NONE`] for a cold spawn).
    slot: SlotCtx,
    slots: *mut RawFd,
    err_w: RawFd,
    status_w: RawFd,
    ctl_r: RawFd,
    sync_r: RawFd,
    sync_w: RawFd,
    /// Shared memory with a user namespace: where the first process gives the id-map
    /// writer its pid (as the daemon sees it, stored by the kernel at `host_pid`).
    ask_w: RawFd,
    host_pid: *const AtomicI32,
    /// Shared memory with an init: the workload process's stack (it is cloned with
    /// `CLONE_VM | CLONE_VFORK` too); `None`: it is forked.
    w_stack: Option<&'a Stack>,
    devnull: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    /// `LISTEN_PID`'s value in the environment (null without sockets).
    pid_at: *mut u8,
    listen: *const RawFd,
    listen_tmp: *mut RawFd,
    listen_n: usize,
    /// The init's word to the workload process that it runs and its title is set (both
    /// ends are the child's; -1 without an init).
    go_r: RawFd,
    go_w: RawFd,
    /// The executable of the init and the waiter (the driver's memfd).
    init_exe: RawFd,
}

/// Reports `(stage, errno)` and exits 127. Async-signal-safe.
///
/// # Safety
/// Only in the child.
unsafe fn fail(ctx: &Ctx<'_>, stage: u32) -> ! {
    // SAFETY: errno location of this (only) thread.
    let errno = unsafe { *libc::__errno_location() };
    let mut rec = [0u8; 8];
    rec[..4].copy_from_slice(&stage.to_ne_bytes());
    rec[4..].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: writing a stack buffer to our fd; _exit never returns.
    unsafe {
        libc::write(ctx.err_w, rec.as_ptr().cast(), rec.len());
        libc::_exit(127)
    }
}

/// The first process's first frame on its own stack (shared memory).
///
/// # Safety
/// Only as the entry of `clone3_vm` in [`clone_instance`], with a `*const Ctx`.
unsafe extern "C" fn child_entry(arg: *mut libc::c_void) -> ! {
    // SAFETY: `clone_instance` passes its `ctx`, alive and unchanged (its thread is
    // suspended) until we have exec'd or exited.
    unsafe { child_main(&*arg.cast::<Ctx<'_>>()) }
}

/// The workload process's first frame on its own stack (shared memory).
///
/// # Safety
/// Only as the entry of `clone3_vm` in [`child_main`], with a `*const Ctx`.
unsafe extern "C" fn workload_entry(arg: *mut libc::c_void) -> ! {
    // SAFETY: the first process passes its `ctx`, alive and unchanged (the first process
    // and the daemon's thread are suspended) until we have exec'd or exited.
    unsafe { workload(&*arg.cast::<Ctx<'_>>()) }
}

/// The child: see the module docs for the sequence.
///
/// # Safety
/// Only right after clone3, in the child. No allocation, no locks.
unsafe fn child_main(ctx: &Ctx<'_>) -> ! {
    let p = ctx.p;
    // SAFETY: for the whole block, raw system calls on pointers into `ctx` (valid in our copy
    // of the address space) and on stack buffers.
    unsafe {
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            fail(ctx, STAGE_PDEATHSIG);
        }
        slot_close_parent_ends(ctx);
        if p.userns.is_some() {
            // ORDER: our copy of the write end goes first, so that a parent that dies or
            // gives up gives end-of-file rather than a hang; then wait for the maps.
            libc::close(ctx.sync_w);
            if ctx.ask_w >= 0 {
                // Our pid is 1 here: the writer thread needs the daemon's view of it,
                // which the kernel stored before we ran.
                let pid = (*ctx.host_pid).load(Ordering::Relaxed).to_ne_bytes();
                if libc::write(ctx.ask_w, pid.as_ptr().cast(), pid.len()) != pid.len() as isize {
                    fail(ctx, STAGE_USERNS_WAIT);
                }
                libc::close(ctx.ask_w);
            }
            let mut b = [0u8; 1];
            let n = loop {
                let n = libc::read(ctx.sync_r, b.as_mut_ptr().cast(), 1);
                if n >= 0 || *libc::__errno_location() != libc::EINTR {
                    break n;
                }
            };
            if n != 1 {
                if n == 0 {
                    *libc::__errno_location() = libc::EPIPE;
                }
                fail(ctx, STAGE_USERNS_WAIT);
            }
            libc::close(ctx.sync_r);
            // ORDER: the bind sources are cloned while we still carry the daemon's host
            // ids (without any capability on the host), so that a source under a
            // root-only directory (the daemon's state: notify sockets) can be reached;
            // what is inside is still checked against the mapped uid once bound. Only
            // the leading private/clone steps: the mounts after them create inodes,
            // which must belong to root inside.
            for (i, op) in p.mounts[..p.early_mounts].iter().enumerate() {
                if !run_mount(op, ctx.slots) {
                    fail(ctx, STAGE_MOUNT + i as u32);
                }
            }
            // Root inside (the mapped uid outside). Raw calls, as for `user` below.
            if libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) != 0
                || libc::syscall(libc::SYS_setresgid, 0u32, 0u32, 0u32) != 0
                || libc::syscall(libc::SYS_setresuid, 0u32, 0u32, 0u32) != 0
            {
                fail(ctx, STAGE_USERNS_ROOT);
            }
            // The kernel clears the parent-death signal on every change of credentials:
            // set it again, or the instance would outlive the daemon.
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                fail(ctx, STAGE_PDEATHSIG);
            }
        }
        for fd in &p.v1_procs {
            if libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                fail(ctx, STAGE_CGROUP);
            }
        }
        if libc::setsid() < 0 {
            fail(ctx, STAGE_SETSID);
        }
        if libc::sethostname(p.hostname.as_ptr().cast(), p.hostname.len()) != 0 {
            fail(ctx, STAGE_HOSTNAME);
        }
        if p.net && lo_up().is_err() {
            fail(ctx, STAGE_NET);
        }
        let done = if p.userns.is_some() {
            p.early_mounts
        } else {
            0
        };
        for (i, op) in p.mounts.iter().enumerate().skip(done) {
            if !run_mount(op, ctx.slots) {
                fail(ctx, STAGE_MOUNT + i as u32);
            }
        }
        if p.init {
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            // Blocked before the fork and kept through the init's exec: no signal is lost
            // between it and the init's loop (a blocked signal stays pending; the init
            // reads them from a signalfd).
            libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
            let pid = match ctx.w_stack {
                // Shared memory: we wait (CLONE_VFORK) until the workload process has
                // exec'd the waiter, then exec the init; the daemon's thread waits for us.
                Some(stack) => {
                    let mut args = CloneArgs {
                        flags: (libc::CLONE_VM | libc::CLONE_VFORK) as u64,
                        exit_signal: libc::SIGCHLD as u64,
                        ..CloneArgs::default()
                    };
                    stack.set(&mut args);
                    let r = bulkhead_driver::clone3_vm(
                        &mut args,
                        workload_entry,
                        (ctx as *const Ctx<'_>).cast_mut().cast(),
                    );
                    if r < 0 {
                        *libc::__errno_location() = -r as i32;
                    }
                    r
                }
                None => libc::syscall(
                    libc::SYS_clone,
                    libc::SIGCHLD as libc::c_ulong,
                    0usize,
                    0usize,
                    0usize,
                    0usize,
                ),
            };
            if pid < 0 {
                fail(ctx, STAGE_FORK);
            }
            if pid > 0 {
                exec_init(ctx, pid as libc::pid_t);
            }
        }
        workload(ctx)
    }
}

/// The init: the first process, once it forked the workload process, execs
/// `bulkhead-init` (see `init/main.rs`) with its status, control and `go` pipes (and a
/// slot's title pipe) at the places `init/proto.rs` names, so that no process of the
/// instance stays a copy of the daemon. Never returns.
///
/// # Safety
/// Only in the child, after the fork of the workload (`main`, its pid here).
unsafe fn exec_init(ctx: &Ctx<'_>, main: libc::pid_t) -> ! {
    // SAFETY: for the whole block, raw system calls on our own descriptors and stack
    // buffers; `ctx.title` is `Prepared::title`, NUL-terminated.
    unsafe {
        // Until the exec this is still a copy of the daemon's memory.
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        // The command line: the title, then NUL up to `TITLE_ROOM` (empty arguments), so
        // that a slot's init has room for the instance's title and shows the same as a
        // cold one.
        let mut line = [0u8; proto::TITLE_ROOM];
        let n = libc::strlen(ctx.title.cast()).min(proto::TITLE_ROOM - 1);
        std::ptr::copy_nonoverlapping(ctx.title, line.as_mut_ptr(), n);
        let mut argv = [std::ptr::null::<libc::c_char>(); proto::TITLE_ROOM + 1];
        argv[0] = line.as_ptr().cast();
        for a in argv.iter_mut().take(proto::TITLE_ROOM - n).skip(1) {
            *a = c"".as_ptr();
        }
        // BULKHEAD_INIT_MAIN=<pid>
        let key = proto::ENV_MAIN.as_bytes();
        let mut var = [0u8; 64];
        var[..key.len()].copy_from_slice(key);
        bulkhead_driver::listen::write_pid(var.as_mut_ptr().add(key.len()), main);
        let envp = [var.as_ptr().cast::<libc::c_char>(), std::ptr::null()];
        // Nothing else of the daemon's; a cold spawn's init has nothing at `FD_TITLE`.
        exec_bulkhead_init(
            ctx,
            [
                (ctx.status_w, proto::FD_STATUS),
                (ctx.ctl_r, proto::FD_CTL),
                (ctx.go_w, proto::FD_GO),
                (ctx.slot.title_r, proto::FD_TITLE),
            ],
            argv.as_ptr(),
            envp.as_ptr(),
            STAGE_INIT,
        )
    }
}

/// Execs the driver's `bulkhead-init` (its memfd) with `argv` and `envp`, descriptor
/// `places[i].0` at `places[i].1` (a negative source: nothing there), and nothing else
/// but the error pipe (close-on-exec: its end-of-file still means exec). A failure is a
/// `stage` record. Never returns.
///
/// # Safety
/// Only in the child; `argv` and `envp` are NULL-terminated arrays of NUL-terminated
/// strings.
unsafe fn exec_bulkhead_init<const N: usize>(
    ctx: &Ctx<'_>,
    places: [(RawFd, RawFd); N],
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    stage: u32,
) -> ! {
    // SAFETY: raw system calls on our own descriptors and stack buffers; the caller's
    // arrays as execve wants them.
    unsafe {
        // Every source copied right above the places first, so that no dup2 overwrites
        // another (the error pipe too: it may sit at one of them; the manifest's
        // `limits`, `nofile` included, may already hold).
        let floor = places.iter().map(|p| p.1).max().unwrap_or(2) + 1;
        let up = |fd: RawFd, cmd: libc::c_int| libc::fcntl(fd, cmd, floor);
        let err = up(ctx.err_w, libc::F_DUPFD_CLOEXEC);
        if err < 0 {
            fail(ctx, stage);
        }
        let ctx = &Ctx { err_w: err, ..*ctx };
        let exe = up(ctx.init_exe, libc::F_DUPFD_CLOEXEC);
        if exe < 0 {
            fail(ctx, stage);
        }
        let mut moved = [-1; N];
        for (m, (src, _)) in moved.iter_mut().zip(places) {
            if src >= 0 {
                *m = up(src, libc::F_DUPFD);
                if *m < 0 {
                    fail(ctx, stage);
                }
            }
        }
        let mut keep = [-1; 8];
        keep[0] = exe;
        keep[1] = err;
        for (i, (m, (_, to))) in moved.iter().zip(places).enumerate() {
            if *m >= 0 {
                if libc::dup2(*m, to) < 0 {
                    fail(ctx, stage);
                }
                if let Some(k) = keep.get_mut(2 + i) {
                    *k = to;
                }
            }
        }
        bulkhead_driver::sys::close_all_but(keep);
        libc::syscall(
            libc::SYS_execveat,
            exe,
            c"".as_ptr(),
            argv,
            envp,
            libc::AT_EMPTY_PATH,
        );
        fail(ctx, stage)
    }
}

/// The records of the init's status pipe, shared with the init (`init/proto.rs`).
pub(crate) use crate::init_proto::{LOST, RECORD};

/// The workload's last steps before exec. Never returns.
///
/// # Safety
/// Only in the child (or the init's fork).
unsafe fn workload(ctx: &Ctx<'_>) -> ! {
    let p = ctx.p;
    // SAFETY: for the whole block, raw system calls on pointers into `ctx` and stack values.
    unsafe {
        // Default dispositions (Rust ignores SIGPIPE; ignored signals survive exec; in
        // shared memory a handler of the daemon's must never run here), real-time ones
        // too (glibc's own two refuse: they have no handler of ours).
        for sig in 1..=libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        // The init's end of `go` is the init's alone: should it die first, our read
        // below ends (end-of-file) instead of waiting for ever.
        if ctx.go_w >= 0 {
            libc::close(ctx.go_w);
        }
        // A warm slot (and a cold spawn in shared memory with an init) goes on with
        // every step that does not depend on the request, then execs the waiter
        // (`exec_waiter`), which takes the hand-over.
        let waiter = ctx.slot.handover_r >= 0;
        if libc::dup2(ctx.devnull, 0) < 0
            || libc::dup2(ctx.stdout, 1) < 0
            || libc::dup2(ctx.stderr, 2) < 0
        {
            fail(ctx, STAGE_STDIO);
        }
        // Only what the steps below use stays open: the daemon's other descriptors
        // (thousands in a busy daemon) would hold every number under the manifest's
        // `nofile`, which the restrictions' own descriptors (Landlock's ruleset) need.
        let mut keep = [-1; 5 + bulkhead_core::sockets::MAX_SOCKETS];
        keep[..5].copy_from_slice(&[
            ctx.err_w,
            ctx.go_r,
            ctx.slot.handover_r,
            ctx.slot.fds_r,
            ctx.init_exe,
        ]);
        for (k, fd) in keep[5..]
            .iter_mut()
            .zip(std::slice::from_raw_parts(ctx.listen, ctx.listen_n))
        {
            *k = *fd;
        }
        bulkhead_driver::sys::close_all_but(keep);
        // Nothing above 2 survives the exec. Close-on-exec rather than closed, so that
        // the error pipe still reports a failed exec.
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) != 0 {
            fail(ctx, STAGE_STDIO);
        }
        if let Some(m) = p.umask {
            libc::umask(m);
        }
        // The waiter needs a few descriptors of its own: a lower `nofile` is set at
        // least that high here, and the waiter sets the manifest's right before its exec.
        let mut nofile = None;
        for (i, (_, res, lim)) in p.rlimits.iter().enumerate() {
            let mut lim = *lim;
            if waiter && *res == libc::RLIMIT_NOFILE {
                nofile = Some(lim);
                lim.rlim_cur = lim.rlim_cur.max(proto::WAIT_NOFILE);
                lim.rlim_max = lim.rlim_max.max(proto::WAIT_NOFILE);
            }
            if libc::setrlimit(*res, &lim) != 0 {
                fail(ctx, STAGE_LIMIT + i as u32);
            }
        }
        // The listening sockets at 3.. (not close-on-exec), and LISTEN_PID: our pid as
        // the program will see it (PID 1 or 2 of the namespace).
        if ctx.listen_n > 0 {
            let src = std::slice::from_raw_parts(ctx.listen, ctx.listen_n);
            let tmp = std::slice::from_raw_parts_mut(ctx.listen_tmp, ctx.listen_n);
            if let Err(e) = bulkhead_driver::listen::install(src, tmp) {
                *libc::__errno_location() = e;
                fail(ctx, STAGE_LISTEN);
            }
        }
        if !ctx.pid_at.is_null() {
            bulkhead_driver::listen::write_pid(ctx.pid_at, libc::getpid());
        }
        if libc::chdir(ctx.cwd) != 0 {
            fail(ctx, STAGE_CHDIR);
        }
        // RACE: the init (exec'd by our parent) sets its title and makes itself
        // non-dumpable before it writes `go`: the program never sees it otherwise.
        // End-of-file (the init is gone, and the namespace with it) goes on as well.
        if ctx.go_r >= 0 && !waiter {
            let mut b = [0u8; 1];
            while libc::read(ctx.go_r, b.as_mut_ptr().cast(), 1) < 0
                && *libc::__errno_location() == libc::EINTR
            {}
            libc::close(ctx.go_r);
        }
        if let Err(step) = p.restrict.apply() {
            fail(
                ctx,
                match step {
                    Step::BoundingSet => STAGE_BSET,
                    Step::User => STAGE_USER,
                    Step::Capabilities => STAGE_CAPS,
                    Step::NoNewPrivs => STAGE_NNP,
                    Step::Landlock => STAGE_LANDLOCK,
                    Step::Seccomp => STAGE_SECCOMP,
                },
            );
        }
        // Without our init the workload is the namespace's PID 1, tied to the daemon by
        // its own parent-death signal, which a switch to `user` just cleared: set it
        // again (no privilege needed; prctl is not in the deny-list).
        if !p.init
            && p.restrict.user.is_some()
            && libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
        {
            fail(ctx, STAGE_PDEATHSIG);
        }
        if waiter {
            exec_waiter(ctx, nofile);
        }
        libc::execve(ctx.program, ctx.argv, ctx.envp);
        fail(ctx, STAGE_EXEC)
    }
}

/// A warm slot's workload process, its request-independent steps done (stdio, `umask`,
/// `limits`, `chdir`, the restrictions): execs the waiter (`bulkhead-init` in its other
/// mode, see `init/main.rs`) with the error, hand-over and `go` pipes and the sockets'
/// pair at the places `init/proto.rs` names, so that a waiting slot holds nothing of the
/// daemon and its hand-over's exec has nothing of it to tear down. The waiter writes
/// `STAGE_WAITING`. Never returns.
///
/// # Safety
/// Only in the workload process of a slot with an init.
unsafe fn exec_waiter(ctx: &Ctx<'_>, nofile: Option<libc::rlimit>) -> ! {
    // SAFETY: raw system calls on our own descriptors and stack buffers.
    unsafe {
        let argv = [c"bulkhead-wait".as_ptr(), std::ptr::null()];
        let mut var = [0u8; 32];
        var[..proto::ENV_WAIT.len()].copy_from_slice(proto::ENV_WAIT.as_bytes());
        // BULKHEAD_WAIT_NOFILE=<soft> <hard>: the manifest's, for the waiter to set.
        let mut limit = [0u8; 64];
        let mut envp = [
            var.as_ptr().cast::<libc::c_char>(),
            std::ptr::null(),
            std::ptr::null(),
        ];
        if let Some(l) = nofile {
            let key = proto::ENV_WAIT_NOFILE.as_bytes();
            limit[..key.len()].copy_from_slice(key);
            let mut at = key.len();
            at += bulkhead_driver::listen::write_decimal(&mut limit[at..], l.rlim_cur);
            limit[at] = b' ';
            bulkhead_driver::listen::write_decimal(&mut limit[at + 1..], l.rlim_max);
            envp[1] = limit.as_ptr().cast();
        }
        exec_bulkhead_init(
            ctx,
            [
                (ctx.err_w, proto::WAIT_ERR),
                (ctx.slot.handover_r, proto::WAIT_HANDOVER),
                (ctx.go_r, proto::WAIT_GO),
                (ctx.slot.fds_r, proto::WAIT_FDS),
            ],
            argv.as_ptr(),
            envp.as_ptr(),
            STAGE_WAITER,
        )
    }
}

/// One mount step; false on failure (errno set).
///
/// # Safety
/// Only in the child; `slots` has room for every slot the program names.
unsafe fn run_mount(op: &MountOp, slots: *mut RawFd) -> bool {
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: for the whole block, raw system calls with NUL-terminated strings prepared
    // before the clone, and slot indices below the slot count (built together).
    unsafe {
        match op {
            MountOp::MakePrivate => {
                libc::mount(
                    null,
                    c"/".as_ptr(),
                    null,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == 0
            }
            MountOp::OpenTree { path, slot } => {
                let fd = libc::syscall(
                    libc::SYS_open_tree,
                    libc::AT_FDCWD,
                    path.as_ptr(),
                    OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | AT_RECURSIVE,
                );
                *slots.add(*slot) = fd as RawFd;
                fd >= 0
            }
            MountOp::ReadOnlyRoot => set_readonly(c"/".as_ptr()),
            MountOp::PivotToTmpfs => {
                // The staging point: the host's /tmp, in our own mount namespace only.
                if libc::mount(
                    c"tmpfs".as_ptr(),
                    c"/tmp".as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    c"mode=755".as_ptr().cast(),
                ) != 0
                    || libc::mkdir(c"/tmp/.bulkhead-old-root".as_ptr(), 0o700) != 0
                {
                    return false;
                }
                if libc::syscall(
                    libc::SYS_pivot_root,
                    c"/tmp".as_ptr(),
                    c"/tmp/.bulkhead-old-root".as_ptr(),
                ) == 0
                {
                    return libc::chdir(c"/".as_ptr()) == 0;
                }
                if *libc::__errno_location() != libc::EINVAL {
                    return false;
                }
                // The host's root is the initial ramfs (a guest init, a VM's initramfs),
                // which pivot_root refuses: move the tmpfs over `/` and chroot into it,
                // as switch_root does. The old root stays beneath, out of every path,
                // and out of the mount table a process inside reads; undoing it would
                // take CAP_SYS_CHROOT or CAP_SYS_ADMIN, which the workload does not have.
                let moved = libc::chdir(c"/tmp".as_ptr()) == 0
                    && libc::mount(
                        c".".as_ptr(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_MOVE,
                        std::ptr::null(),
                    ) == 0
                    && libc::chroot(c".".as_ptr()) == 0
                    && libc::chdir(c"/".as_ptr()) == 0;
                ROOT_MOVED.store(moved, std::sync::atomic::Ordering::Relaxed);
                moved
            }
            MountOp::DetachOldRoot => {
                if ROOT_MOVED.load(std::sync::atomic::Ordering::Relaxed) {
                    // Nothing hangs there after a move (see above): only the mount point.
                    return libc::rmdir(OLD_ROOT.as_ptr()) == 0;
                }
                libc::umount2(OLD_ROOT.as_ptr(), libc::MNT_DETACH) == 0
                    && libc::rmdir(OLD_ROOT.as_ptr()) == 0
            }
            // Not AT_RECURSIVE: the mounts on the root keep their own flags.
            MountOp::ReadOnlyRootTmpfs => set_readonly_at(libc::AT_FDCWD, c"/".as_ptr(), 0),
            MountOp::Sysfs => {
                libc::mount(
                    c"sysfs".as_ptr(),
                    c"/sys".as_ptr(),
                    c"sysfs".as_ptr(),
                    libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                ) == 0
            }
            MountOp::ReadOnlyBind { path } => {
                let fd = libc::syscall(
                    libc::SYS_open_tree,
                    libc::AT_FDCWD,
                    path.as_ptr(),
                    OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | AT_RECURSIVE,
                );
                if fd < 0 {
                    return *libc::__errno_location() == libc::ENOENT;
                }
                let fd = fd as RawFd;
                // ORDER: read-only while still detached, then attached: the path is
                // never writable through the new mount.
                let ok = set_readonly_at(fd, c"".as_ptr(), AT_EMPTY_PATH | AT_RECURSIVE)
                    && attach(fd, path.as_ptr());
                libc::close(fd);
                ok
            }
            MountOp::MaskFile { path } => {
                let mut st: libc::stat = std::mem::zeroed();
                if libc::stat(path.as_ptr(), &mut st) != 0 {
                    return *libc::__errno_location() == libc::ENOENT;
                }
                let fd = libc::syscall(
                    libc::SYS_open_tree,
                    libc::AT_FDCWD,
                    c"/dev/null".as_ptr(),
                    OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
                );
                if fd < 0 {
                    return false;
                }
                let ok = attach(fd as RawFd, path.as_ptr());
                libc::close(fd as RawFd);
                ok
            }
            MountOp::MaskDir { path } => {
                let r = libc::mount(
                    c"tmpfs".as_ptr(),
                    path.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    c"size=4k,mode=555".as_ptr().cast(),
                );
                r == 0 || *libc::__errno_location() == libc::ENOENT
            }
            MountOp::ReadOnly { path } => set_readonly(path.as_ptr()),
            MountOp::Tmpfs { path, flags, data } => {
                libc::mount(
                    c"tmpfs".as_ptr(),
                    path.as_ptr(),
                    c"tmpfs".as_ptr(),
                    *flags,
                    data.as_ptr().cast(),
                ) == 0
            }
            MountOp::Proc => {
                libc::mount(
                    c"proc".as_ptr(),
                    c"/proc".as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                ) == 0
            }
            MountOp::Devpts => {
                libc::mount(
                    c"devpts".as_ptr(),
                    c"/dev/pts".as_ptr(),
                    c"devpts".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NOEXEC,
                    c"newinstance,ptmxmode=0666,mode=0620".as_ptr().cast(),
                ) == 0
            }
            MountOp::Mkdir { path } => {
                libc::mkdir(path.as_ptr(), 0o755);
                true
            }
            MountOp::Touch { path } => {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o644,
                );
                if fd >= 0 {
                    libc::close(fd);
                }
                true
            }
            MountOp::Mknod { path, dev } => {
                libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o666, *dev) == 0
                    && libc::chmod(path.as_ptr(), 0o666) == 0
            }
            MountOp::Symlink { target, path } => libc::symlink(target.as_ptr(), path.as_ptr()) == 0,
            MountOp::Move { slot, target } => {
                let fd = *slots.add(*slot);
                let ok = libc::syscall(
                    libc::SYS_move_mount,
                    fd,
                    c"".as_ptr(),
                    libc::AT_FDCWD,
                    target.as_ptr(),
                    MOVE_MOUNT_F_EMPTY_PATH,
                ) == 0;
                libc::close(fd);
                ok
            }
        }
    }
}

/// `move_mount` of the detached tree `fd` onto `target`.
///
/// # Safety
/// `target` is NUL-terminated; `fd` is a detached tree from `open_tree`.
unsafe fn attach(fd: RawFd, target: *const libc::c_char) -> bool {
    // SAFETY: as the caller's; the empty path names `fd` itself.
    unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            fd,
            c"".as_ptr(),
            libc::AT_FDCWD,
            target,
            MOVE_MOUNT_F_EMPTY_PATH,
        ) == 0
    }
}

/// `mount_setattr(path, AT_RECURSIVE, +RDONLY)`.
///
/// # Safety
/// `path` is NUL-terminated.
unsafe fn set_readonly(path: *const libc::c_char) -> bool {
    // SAFETY: as the caller's.
    unsafe { set_readonly_at(libc::AT_FDCWD, path, AT_RECURSIVE) }
}

/// `mount_setattr(dirfd, path, flags, +RDONLY)`.
///
/// # Safety
/// `path` is NUL-terminated; `dirfd` is `AT_FDCWD` or an open descriptor.
unsafe fn set_readonly_at(dirfd: RawFd, path: *const libc::c_char, flags: libc::c_uint) -> bool {
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: a valid path and a properly sized attribute struct on the stack.
    unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            path,
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        ) == 0
    }
}

/// Brings `lo` up in the new network namespace: one socket, two ioctls.
///
/// # Safety
/// Raw system calls only.
unsafe fn lo_up() -> Result<(), ()> {
    // SAFETY: a stack ifreq with a NUL-terminated name; the socket is closed on all paths.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        ifr.ifr_name[0] = b'l' as libc::c_char;
        ifr.ifr_name[1] = b'o' as libc::c_char;
        let mut ok = libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr) == 0;
        if ok {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            ok = libc::ioctl(s, libc::SIOCSIFFLAGS, &ifr) == 0;
        }
        libc::close(s);
        if ok {
            Ok(())
        } else {
            Err(())
        }
    }
}

// ---------------------------------------------------------------------------------------
// Warm slots: the same clone, stopped before the steps that depend on the request.
// ---------------------------------------------------------------------------------------

/// The most bytes of a hand-over's strings (hostname, working directory, program, argv,
/// environment, each NUL-terminated): what the slot's process can receive without
/// allocating. A launch whose strings do not fit is refused by the slot (the daemon
/// then spawns cold).
pub(crate) const HANDOVER_BYTES: usize = crate::init_proto::HANDOVER_BYTES;
/// The most argv and environment strings a hand-over carries.
pub(crate) const HANDOVER_STRINGS: usize = crate::init_proto::HANDOVER_STRINGS;
/// The most bytes of the init's title (`bulkhead-init <id>`) at the hand-over.
pub(crate) const TITLE_BYTES: usize = 512;
/// `[strings length, argc, envc, listening sockets]`, native-endian `u32`s.
const HANDOVER_HEADER: usize = crate::init_proto::HANDOVER_HEADER;
/// The most listening sockets one hand-over brings (a manifest's most).
pub(crate) const HANDOVER_FDS: usize = crate::init_proto::HANDOVER_FDS;
const _: () = assert!(HANDOVER_FDS == bulkhead_core::sockets::MAX_SOCKETS);

/// The pipes of a slot's hand-over, made before the clone.
pub(crate) struct SlotPipes {
    handover: (OwnedFd, OwnedFd),
    /// The init's title (only with an init).
    title: Option<(OwnedFd, OwnedFd)>,
    /// The listening sockets of the launch (`SCM_RIGHTS` on a seqpacket pair; only for
    /// a workload with `sockets:`).
    fds: Option<(OwnedFd, OwnedFd)>,
    /// What the hand-over pipe holds without blocking its writer.
    capacity: usize,
}

/// What the parent keeps of a slot: the ends of its hand-over.
pub(crate) struct SlotEnds {
    /// The error pipe: `STAGE_WAITING` once the slot waits, then end-of-file at the
    /// workload's exec or a failure record.
    pub err_r: OwnedFd,
    pub handover_w: OwnedFd,
    pub title_w: Option<OwnedFd>,
    /// Where the launch's listening sockets go (a slot made for `sockets:` only).
    pub fds_w: Option<OwnedFd>,
    /// The largest hand-over message that fits the pipe (header included).
    pub capacity: usize,
}

/// A slot's descriptors and buffers as the child sees them (-1 and null: a cold spawn).
#[derive(Clone, Copy)]
struct SlotCtx {
    handover_r: RawFd,
    handover_w: RawFd,
    title_r: RawFd,
    title_w: RawFd,
    fds_r: RawFd,
    fds_w: RawFd,
}

impl SlotCtx {
    const NONE: SlotCtx = SlotCtx {
        handover_r: -1,
        handover_w: -1,
        title_r: -1,
        title_w: -1,
        fds_r: -1,
        fds_w: -1,
    };
}

impl SlotPipes {
    /// The hand-over pipe, grown to hold a whole hand-over (so that the launch's write
    /// never waits for the slot), the title pipe with an init, and with `sockets` the
    /// pair the listening sockets come through.
    pub(crate) fn new(init: bool, sockets: bool) -> io::Result<SlotPipes> {
        let (r, w) = pipe_cloexec()?;
        let want = (HANDOVER_BYTES + HANDOVER_HEADER).next_power_of_two();
        // SAFETY: fcntl on a descriptor we own.
        let capacity = unsafe {
            libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, want as libc::c_int);
            libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ)
        };
        if capacity <= 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(SlotPipes {
            handover: (r, w),
            title: if init { Some(pipe_cloexec()?) } else { None },
            fds: if sockets { Some(sockets_pair()?) } else { None },
            capacity: capacity as usize,
        })
    }

    fn child_side(&self) -> SlotCtx {
        let (tr, tw) = self
            .title
            .as_ref()
            .map_or((-1, -1), |(r, w)| (r.as_raw_fd(), w.as_raw_fd()));
        SlotCtx {
            handover_r: self.handover.0.as_raw_fd(),
            handover_w: self.handover.1.as_raw_fd(),
            title_r: tr,
            title_w: tw,
            fds_r: self.fds.as_ref().map_or(-1, |(r, _)| r.as_raw_fd()),
            fds_w: self.fds.as_ref().map_or(-1, |(_, w)| w.as_raw_fd()),
        }
    }

    /// After the clone: the parent's ends (the child's are closed here).
    fn parent_side(self, err_r: OwnedFd) -> SlotEnds {
        SlotEnds {
            err_r,
            handover_w: self.handover.1,
            title_w: self.title.map(|(_, w)| w),
            fds_w: self.fds.map(|(_, w)| w),
            capacity: self.capacity,
        }
    }
}

/// Clones a slot: the same child as [`spawn`], whose workload process stops before the
/// steps that depend on the request (after its signal mask, before stdio) and waits on
/// the hand-over pipe; with an init, the init waits for its title before its loop.
/// Returns once the child runs (with an init: once both its processes have exec'd); the
/// caller awaits the `STAGE_WAITING` record on [`SlotEnds::err_r`] (or a failure record)
/// without holding the spawner thread.
///
/// `sockets`: the launches bring listening sockets (the workload has `sockets:`).
///
/// Same rules as [`spawn`]: on the spawner thread, the reaper lock until `on_pid`.
pub(crate) fn spawn_slot(
    p: &Prepared,
    sockets: bool,
    stdout: &OwnedFd,
    stderr: &OwnedFd,
    on_pid: impl FnOnce(u32),
) -> Result<(Child, SlotEnds), ChildError> {
    let pipes = SlotPipes::new(p.init, sockets).map_err(ChildError::Clone)?;
    let (child, ends) = clone_instance(p, stdout, stderr, on_pid, Some(pipes))?;
    ends.map(|e| (child, e))
        .ok_or_else(|| ChildError::Clone(io::Error::other("the slot's hand-over ends are missing")))
}

/// The hand-over message of one launch: header, then hostname, working directory,
/// program, argv, environment (each NUL-terminated); `sockets` listening sockets follow
/// on the slot's socket pair ([`send_sockets`]). `Err(needed)`: it would take `needed`
/// bytes (or more strings than [`HANDOVER_STRINGS`]), more than `capacity`.
pub(crate) fn handover_message(
    hostname: &[u8],
    cwd: &CStr,
    program: &CStr,
    argv: &[CString],
    env: &[CString],
    sockets: usize,
    capacity: usize,
) -> Result<Vec<u8>, usize> {
    let strings: usize = [hostname.len() + 1, cwd.to_bytes_with_nul().len()]
        .into_iter()
        .chain([program.to_bytes_with_nul().len()])
        .chain(argv.iter().chain(env).map(|c| c.to_bytes_with_nul().len()))
        .sum();
    let total = HANDOVER_HEADER + strings;
    if strings > HANDOVER_BYTES
        || total > capacity
        || argv.len() + env.len() > HANDOVER_STRINGS
        || argv.is_empty()
    {
        return Err(total);
    }
    let mut m = Vec::with_capacity(total);
    for n in [strings, argv.len(), env.len(), sockets] {
        m.extend_from_slice(&(n as u32).to_ne_bytes());
    }
    m.extend_from_slice(hostname);
    m.push(0);
    m.extend_from_slice(cwd.to_bytes_with_nul());
    m.extend_from_slice(program.to_bytes_with_nul());
    for c in argv.iter().chain(env) {
        m.extend_from_slice(c.to_bytes_with_nul());
    }
    Ok(m)
}

/// Sends a launch's listening sockets to the slot (one packet of one byte with the
/// descriptors attached; the pair is empty, so it never waits).
pub(crate) fn send_sockets(fds_w: &OwnedFd, fds: &[std::os::fd::BorrowedFd<'_>]) -> io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(HANDOVER_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if fds.len() > HANDOVER_FDS || !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other(format!(
            "{} listening sockets, more than a hand-over brings ({HANDOVER_FDS})",
            fds.len()
        )));
    }
    rustix::net::sendmsg(
        fds_w,
        &[io::IoSlice::new(b"s")],
        &mut control,
        SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

/// The init's title message: length, then `title` (at most [`TITLE_BYTES`]); length, then
/// the instance's hostname (the init sets it: the slot's waiter has no capability left).
pub(crate) fn title_message(title: &[u8], hostname: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    for part in [&title[..title.len().min(TITLE_BYTES)], hostname] {
        m.extend_from_slice(&(part.len() as u32).to_ne_bytes());
        m.extend_from_slice(part);
    }
    m
}

/// In the child, first thing: our copies of the parent's ends of a slot's pipes go, so
/// that only the daemon can write a hand-over.
///
/// # Safety
/// Only in the child.
unsafe fn slot_close_parent_ends(ctx: &Ctx<'_>) {
    // SAFETY: closing our copies of descriptors the parent keeps.
    unsafe {
        for fd in [ctx.slot.handover_w, ctx.slot.title_w, ctx.slot.fds_w] {
            if fd >= 0 {
                libc::close(fd);
            }
        }
    }
}
