//! The Linux system calls the drivers use, behind one small seam.
//!
//! Every function here is a thin, documented wrapper: [`rustix`] where it has the call,
//! `libc` only for `sysconf`, and a few lines of `/proc` parsing. Nothing keeps state except
//! two cached `sysconf` values.
//!
//! Requirements: Linux 5.4 or later (`pidfd_open` 5.3, `waitid(P_PIDFD)` 5.4), and `/proc`
//! mounted for the daemon's own PID namespace (pids read from it are fed back to `kill` and
//! `pidfd_open`).
//!
//! About pids: a pid number names a process only until that process is reaped; after that
//! the number may be reused. The functions taking a `pid` say which guarantee the caller
//! must bring. A pidfd never has that problem, which is why signals to one chosen process
//! go through [`pidfd_send_signal`].

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bulkhead_core::event::ExitStatus;
use bulkhead_core::signal::Signal;
use rustix::process::{self as rp, Pid, PidfdFlags, WaitId, WaitIdOptions, WaitOptions};

/// Converts a host pid into rustix's [`Pid`], rejecting 0 and numbers above `i32::MAX`.
fn to_pid(pid: u32) -> io::Result<Pid> {
    i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("invalid pid {pid}")))
}

/// Converts a signal into rustix's type.
///
/// Named signals convert directly; real-time signals only within libc's
/// `SIGRTMIN()..=SIGRTMAX()`. The two or three numbers below `SIGRTMIN()` (32 and 33 with
/// glibc) are used by the C library itself and are refused with `EINVAL`-like
/// `InvalidInput`.
fn to_rustix_signal(signal: Signal) -> io::Result<rp::Signal> {
    let n = signal.number();
    if let Some(s) = rp::Signal::from_named_raw(n) {
        return Ok(s);
    }
    if (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&n) {
        // SAFETY: `n` lies within libc's SIGRTMIN()..=SIGRTMAX() (so it is non-zero and a
        // valid signal number), the range libc leaves to applications: it is not one of the
        // numbers libc reserves for itself, which is the condition of `from_raw_unchecked`.
        return Ok(unsafe { rp::Signal::from_raw_unchecked(n) });
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{signal} is reserved by the C library and cannot be sent"),
    ))
}

/// `pidfd_open(pid, 0)`: a file descriptor that names exactly one process (close-on-exec).
///
/// The caller must know that `pid` still names the intended process: either it is the
/// caller's own unreaped child (its number cannot be reused before the caller waits it),
/// or the caller checks the process's identity after opening (for example its process
/// group with [`getpgid`]). Opening a zombie succeeds.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    Ok(rp::pidfd_open(to_pid(pid)?, PidfdFlags::empty())?)
}

/// `pidfd_send_signal(fd, signal, NULL, 0)`: signals exactly the process the pidfd names.
/// A process that has already exited (`ESRCH`) counts as success.
pub fn pidfd_send_signal(pidfd: &OwnedFd, signal: Signal) -> io::Result<()> {
    match rp::pidfd_send_signal(pidfd.as_fd(), to_rustix_signal(signal)?) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// `waitid(P_PIDFD, fd, WEXITED | WNOHANG)`: reaps the child the pidfd names if it has
/// exited, and returns how it ended; `None` if it is still running.
///
/// The status is kept exactly as the kernel reports it in `si_code`: `CLD_EXITED` gives
/// [`ExitStatus::Exited`] with the exit code, `CLD_KILLED` and `CLD_DUMPED` give
/// [`ExitStatus::Signaled`] with the signal and whether a core was dumped.
///
/// Only works for the caller's own children (`ECHILD` otherwise, or when somebody else
/// already reaped it).
pub fn waitid_pidfd(pidfd: &OwnedFd) -> io::Result<Option<ExitStatus>> {
    rp::waitid(
        WaitId::PidFd(pidfd.as_fd()),
        WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
    )?
    .map(exit_status)
    .transpose()
}

/// `waitid(P_PID, pid, WEXITED | WNOHANG)`: reaps the child `pid` if it has exited, and
/// returns how it ended (as [`waitid_pidfd`] does); `None` if it is still running.
///
/// The caller must know that nobody else waits for this child (see [`crate::reaper`]):
/// reaping it takes its status away from anyone who does. `ECHILD` when `pid` is not our
/// child (any more).
pub fn waitid_pid(pid: u32) -> io::Result<Option<ExitStatus>> {
    rp::waitid(
        WaitId::Pid(to_pid(pid)?),
        WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
    )?
    .map(exit_status)
    .transpose()
}

/// `waitpid(-1, WNOHANG)`: reaps any exited child and returns its pid and status.
///
/// Only for a process that owns every one of its children (the keeper): anywhere else it
/// steals exit statuses that other code waits for (see [`crate::reaper`]).
pub fn wait_any_nohang() -> io::Result<Option<(u32, ExitStatus)>> {
    let mut status = 0;
    // SAFETY: waitpid writes the status into a local integer; no other memory is touched.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        return Ok(None);
    }
    let st = if libc::WIFEXITED(status) {
        ExitStatus::Exited {
            code: libc::WEXITSTATUS(status),
        }
    } else if libc::WIFSIGNALED(status) {
        ExitStatus::Signaled {
            signal: libc::WTERMSIG(status),
            core_dumped: libc::WCOREDUMP(status),
        }
    } else {
        // Stopped or continued children are not reported without WUNTRACED/WCONTINUED.
        return Ok(None);
    };
    Ok(Some((pid as u32, st)))
}

/// `waitid(P_ALL, WEXITED | WNOHANG | WNOWAIT)`: whether any child of this process has
/// exited and waits to be reaped. Reaps nothing (`WNOWAIT`); `false` when there are no
/// children at all (`ECHILD`).
///
/// The kernel reports one zombie, always the same first one while it stays unreaped, so
/// this only says *whether* there is one; [`zombie_children`] says which.
pub fn any_child_exited() -> io::Result<bool> {
    match rp::waitid(
        WaitId::All,
        WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT,
    ) {
        Ok(st) => Ok(st.is_some()),
        Err(rustix::io::Errno::CHILD) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Keeps the status of an exited child exactly as the kernel reports it in `si_code`.
fn exit_status(st: rp::WaitIdStatus) -> io::Result<ExitStatus> {
    if let Some(code) = st.exit_status() {
        // CLD_EXITED
        return Ok(ExitStatus::Exited { code });
    }
    if let Some(signal) = st.terminating_signal() {
        // CLD_KILLED or CLD_DUMPED
        return Ok(ExitStatus::Signaled {
            signal,
            core_dumped: st.dumped(),
        });
    }
    Err(io::Error::other(format!(
        "waitid returned unexpected si_code {} for an exited child",
        st.raw_code()
    )))
}

/// `prctl(PR_SET_CHILD_SUBREAPER, 1)`: orphaned descendants of this process are
/// re-parented to it instead of to PID 1, so it must reap them (see [`crate::reaper`]).
/// Not inherited by children; kept across `execve`.
pub fn set_child_subreaper() -> io::Result<()> {
    // rustix passes the pid's number as the prctl argument; any non-zero value turns the
    // attribute on, and `Pid::INIT` is 1.
    Ok(rp::set_child_subreaper(Some(Pid::INIT))?)
}

/// The children of `parent` that have exited and wait to be reaped (zombies whose
/// `ppid` is `parent`), by scanning `/proc/*/stat`.
///
/// A snapshot, at the cost of one file read per process on the host. (The cheaper
/// `/proc/<pid>/task/<tid>/children` needs `CONFIG_PROC_CHILDREN`, which kernels often
/// lack.)
pub fn zombie_children(parent: u32) -> Vec<u32> {
    scan_proc(|st| st.ppid == parent && st.is_zombie())
}

/// `waitpid(pid, 0)`: blocks until the child `pid` exits and reaps it, discarding the
/// status. Only for error paths where no pidfd could be had (a child just killed).
pub fn reap_blocking(pid: u32) -> io::Result<()> {
    loop {
        match rp::waitpid(Some(to_pid(pid)?), WaitOptions::empty()) {
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// `kill(-pgid, signal)`: signals every process of the process group. A group that no
/// longer exists (`ESRCH`) counts as success.
///
/// The caller must know that `pgid` still names the intended group: a group's number stays
/// taken while any member (zombies included) exists, and the leader's own number while the
/// leader is unreaped.
pub fn kill_group(pgid: u32, signal: Signal) -> io::Result<()> {
    match rp::kill_process_group(to_pid(pgid)?, to_rustix_signal(signal)?) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// `kill(-pgid, 0)`: whether the process group still has any member, zombies included.
///
/// One system call: this is the fast path after a main process exits. `EPERM` (a member
/// exists that we may not signal) counts as a member; so does any other unexpected error,
/// to stay on the safe side.
pub fn group_has_members(pgid: u32) -> bool {
    let Ok(pgid) = to_pid(pgid) else {
        return false;
    };
    !matches!(
        rp::test_kill_process_group(pgid),
        Err(rustix::io::Errno::SRCH)
    )
}

/// `getpgid(pid)`: the process group of a process; 0 when the group's leader lives outside
/// our PID namespace.
///
/// Calls libc rather than rustix: rustix's `getpgid` asserts a non-zero answer and would
/// panic on that (legal) 0.
pub fn getpgid(pid: u32) -> io::Result<u32> {
    let pid = to_pid(pid)?;
    // SAFETY: getpgid takes a plain integer and touches no memory of ours.
    let pgid = unsafe { libc::getpgid(pid.as_raw_nonzero().get()) };
    if pgid < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pgid.unsigned_abs())
}

/// The fields bulkhead uses from one `/proc/<pid>/stat` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatLine {
    /// The state letter (`R`, `S`, `D`, `Z`, ...).
    pub state: char,
    pub ppid: u32,
    pub pgrp: u32,
    /// The session id; 0 when the session leader lives outside the reader's PID namespace.
    pub session: u32,
    /// User and system time, in clock ticks.
    pub utime: u64,
    pub stime: u64,
    /// User and system time of reaped children, in clock ticks.
    pub cutime: u64,
    pub cstime: u64,
    pub num_threads: u64,
    /// Resident set size, in pages.
    pub rss_pages: u64,
    /// When the process started, in clock ticks after boot: with the pid, it names one
    /// process (a reused pid has a later start time).
    pub starttime: u64,
}

impl StatLine {
    /// Whether the process has finished: a zombie with no live thread left. A thread-group
    /// leader that exited while other threads still run also shows `Z`, but its process is
    /// alive; the thread count tells them apart.
    pub fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X') && self.num_threads <= 1
    }
}

/// Parses one `/proc/<pid>/stat` line.
///
/// The second field is the command name in parentheses and may itself contain spaces and
/// `)` (it is whatever the process put in `comm`), so the line is split at the *last* `)`;
/// everything after it is space-separated numbers. Returns `None` on any malformed line.
pub fn parse_stat(line: &str) -> Option<StatLine> {
    let (_, rest) = line.rsplit_once(')')?;
    // Fields after the comm, numbered from 0: 0 state, 1 ppid, 2 pgrp, 3 session, ...,
    // 11 utime, 12 stime, 13 cutime, 14 cstime, 17 num_threads, 21 rss (proc(5) numbers
    // these 3.. from 1).
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    let num = |i: usize| f.get(i)?.parse::<u64>().ok();
    // cutime and cstime are signed in the kernel's format; never negative in practice.
    let signed = |i: usize| {
        f.get(i)?
            .parse::<i64>()
            .ok()
            .map(|v| v.max(0).unsigned_abs())
    };
    let mut state = f.first()?.chars();
    let state_char = state.next()?;
    if state.next().is_some() {
        return None;
    }
    Some(StatLine {
        state: state_char,
        ppid: u32::try_from(num(1)?).ok()?,
        pgrp: u32::try_from(signed(2)?).ok()?,
        session: u32::try_from(signed(3)?).ok()?,
        utime: num(11)?,
        stime: num(12)?,
        cutime: signed(13)?,
        cstime: signed(14)?,
        num_threads: signed(17)?,
        rss_pages: signed(21)?,
        starttime: num(19)?,
    })
}

/// The pids in `/proc` whose stat line satisfies `pick` (processes that exit during the
/// scan are skipped).
fn scan_proc(pick: impl Fn(&StatLine) -> bool) -> Vec<u32> {
    SCANS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let name = entry.ok()?.file_name();
        let pid: u32 = name.to_str()?.parse().ok()?;
        let st = read_stat(pid).ok()?;
        pick(&st).then_some(pid)
    })
    .collect()
}

/// Reads and parses `/proc/<pid>/stat`. `NotFound` when the process is gone (reaped).
pub fn read_stat(pid: u32) -> io::Result<StatLine> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("cannot parse /proc/{pid}/stat"),
        )
    })
}

/// The live (non-zombie) members of a process group, by scanning `/proc/*/stat`.
///
/// Costs one file read per process on the host; use [`group_has_members`] first. The
/// answer is a snapshot: a member may fork or exit right after. Processes whose stat cannot
/// be read (they exited during the scan) are skipped. Threads are not listed (only
/// thread-group leaders appear in `/proc`).
pub fn group_members(pgid: u32) -> Vec<u32> {
    scan_proc(|st| st.pgrp == pgid && !st.is_zombie())
}

/// One read of every `/proc/<pid>/stat`, grouped by process group: what the usage of many
/// instances is computed from, so that `list` or a metrics scrape of N instances costs one
/// scan of `/proc`, not N (each of which read every process: N x processes).
#[derive(Debug)]
pub struct ProcTable {
    stats: HashMap<u32, StatLine>,
    /// Live (non-zombie) members of each process group.
    groups: HashMap<u32, Vec<u32>>,
    taken: Instant,
}

/// How many times this process read every `/proc/<pid>/stat` (a [`ProcTable`], a group's
/// members).
static SCANS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many full scans of `/proc` this process made (for tests and diagnostics).
pub fn proc_scans() -> u64 {
    SCANS.load(std::sync::atomic::Ordering::Relaxed)
}

/// The shared [`ProcTable`] and the lock a scan is taken under.
fn shared_table() -> &'static Mutex<Option<Arc<ProcTable>>> {
    static TABLE: OnceLock<Mutex<Option<Arc<ProcTable>>>> = OnceLock::new();
    TABLE.get_or_init(|| Mutex::new(None))
}

impl ProcTable {
    /// Scans `/proc` now.
    pub fn scan() -> ProcTable {
        SCANS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut stats = HashMap::new();
        let mut groups: HashMap<u32, Vec<u32>> = HashMap::new();
        if let Ok(dir) = fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                    continue;
                };
                // A process that exits during the scan is simply not in the table.
                let Ok(st) = read_stat(pid) else { continue };
                if !st.is_zombie() {
                    groups.entry(st.pgrp).or_default().push(pid);
                }
                stats.insert(pid, st);
            }
        }
        ProcTable {
            stats,
            groups,
            taken: Instant::now(),
        }
    }

    /// The shared table, scanned again when it is older than `max_age`. Callers that
    /// arrive during a scan wait for it and share it (the lock is held across the scan):
    /// concurrent requests never scan twice.
    pub fn recent(max_age: Duration) -> Arc<ProcTable> {
        let mut slot = shared_table().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = slot.as_ref() {
            if t.taken.elapsed() <= max_age {
                return Arc::clone(t);
            }
        }
        let t = Arc::new(ProcTable::scan());
        *slot = Some(Arc::clone(&t));
        t
    }

    /// The live members of process group `pgid` when the table was taken.
    pub fn group(&self, pgid: u32) -> &[u32] {
        self.groups.get(&pgid).map_or(&[], Vec::as_slice)
    }

    /// CPU and memory use of `pid` when the table was taken.
    pub fn stats(&self, pid: u32) -> Option<ProcStats> {
        self.stats.get(&pid).map(ProcStats::of)
    }

    /// How many processes the table holds.
    pub fn len(&self) -> usize {
        self.stats.len()
    }

    /// Whether the table holds no process.
    pub fn is_empty(&self) -> bool {
        self.stats.is_empty()
    }
}

/// CPU and memory use of one process, from `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ProcStats {
    /// User + system CPU time of the process itself.
    pub cpu_seconds: f64,
    /// User + system CPU time of its children it has reaped.
    pub children_cpu_seconds: f64,
    /// Resident set size.
    pub rss_bytes: u64,
}

/// `sysconf(_SC_CLK_TCK)`, cached: the unit of the times in `/proc/<pid>/stat`.
pub fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        // SAFETY: sysconf only reads a configuration value; any name is allowed and an
        // unknown one returns -1, which is handled below.
        let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        u64::try_from(v).ok().filter(|&v| v > 0).unwrap_or(100)
    })
}

/// `sysconf(_SC_PAGESIZE)`, cached: the unit of `rss` in `/proc/<pid>/stat`.
fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: as in `clock_ticks`: a read of a configuration value, -1 handled below.
        let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(v).ok().filter(|&v| v > 0).unwrap_or(4096)
    })
}

/// CPU time (utime + stime, and the same for reaped children) and resident memory
/// (rss pages x page size) of one process. `NotFound` when the process is gone.
pub fn proc_stats(pid: u32) -> io::Result<ProcStats> {
    Ok(ProcStats::of(&read_stat(pid)?))
}

impl ProcStats {
    fn of(st: &StatLine) -> ProcStats {
        let ticks = clock_ticks() as f64;
        ProcStats {
            cpu_seconds: (st.utime + st.stime) as f64 / ticks,
            children_cpu_seconds: (st.cutime + st.cstime) as f64 / ticks,
            rss_bytes: st.rss_pages.saturating_mul(page_size()),
        }
    }
}

/// The open-file limit the daemon asks for when it may raise its hard limit.
pub const NOFILE_WANTED: u64 = 131_072;

/// Raises the soft limit on open files to the hard limit (as root, both to
/// [`NOFILE_WANTED`] first) and returns the new soft limit.
///
/// A supervisor holds several descriptors per instance (pidfd, output pipes, notify
/// socket); the common default soft limit of 1024 would cap it at a few hundred
/// instances. Children inherit the raised limit.
pub fn raise_nofile_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    // The daemon holds about one descriptor per keeper instance (its pidfd) and three per
    // sandbox instance (pidfd, output pipes); a keeper two per instance (the pipes).
    // Keepers shard when full, but the sandbox driver does not: 1,024 or even 20,000
    // (hard limits some service managers and containers give) cap it. With CAP_SYS_RESOURCE (root) the hard limit
    // itself is raised, to NOFILE_WANTED (or the kernel's `fs.nr_open`, if lower); not to
    // `nr_open` itself: children inherit the limit, and programs that loop over every
    // possible descriptor at start-up get slow with a limit in the millions.
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(NOFILE_WANTED);
    let want = NOFILE_WANTED.min(nr_open);
    let lim = getrlimit(Resource::Nofile);
    if lim.maximum.is_some_and(|m| m < want) {
        let raised = Rlimit {
            current: Some(want),
            maximum: Some(want),
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return want;
        }
    }
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        lim.current = lim.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            tracing::warn!("cannot raise the open-file limit: {e}");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Reads into `buf` until it is full or the writers are gone (end-of-file), retrying
/// interrupted reads; returns how many bytes came (a short count: end-of-file first).
pub fn read_full(fd: impl AsFd, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match rustix::io::read(&fd, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(got)
}

/// Writes all of `data` (to a pipe or socket that has room for it, or blocking),
/// retrying interrupted writes.
pub fn write_all(fd: impl AsFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match rustix::io::write(&fd, data) {
            Ok(n) => data = &data[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Closes every descriptor from 3 up but those of `keep` (negative entries ignored), in
/// a child before exec: what it still needs stays, and the numbers under a low
/// `nofile` are free again for the descriptors its last steps open. No allocation (a
/// sort on the stack).
///
/// # Safety
/// Only in a child between its clone and its exec: descriptors the caller owns elsewhere
/// (in a shared table) would be closed.
pub unsafe fn close_all_but<const N: usize>(mut keep: [RawFd; N]) {
    keep.sort_unstable();
    let mut from: u32 = 3;
    // SAFETY: close_range on this process's own descriptor table.
    unsafe {
        for fd in keep {
            if fd < from as RawFd {
                continue;
            }
            let fd = fd as u32;
            if fd > from {
                libc::syscall(libc::SYS_close_range, from, fd - 1, 0u32);
            }
            from = fd + 1;
        }
        libc::syscall(libc::SYS_close_range, from, u32::MAX, 0u32);
    }
}

/// Marks every descriptor from `first` up close-on-exec:
/// `close_range(first, ~0, CLOSE_RANGE_CLOEXEC)` (Linux 5.11).
///
/// One raw system call, no allocation, no lock: safe between fork and exec, where it is
/// what a `pre_exec` hook uses instead of closing outright (closing would also close the
/// standard library's exec-status pipe, which must stay open until the `exec` itself).
/// An error (an older kernel: `EINVAL`/`ENOSYS`) is returned, never ignored: a child that
/// cannot shed its inherited descriptors must not run.
pub fn cloexec_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range only changes descriptor flags of this process; it takes no
    // pointers and cannot invalidate memory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Closes every descriptor from `first` up: `close_range(first, ~0, 0)`. Only for a
/// process's first step, before anything of its own is open (the keeper).
pub fn close_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range takes no pointers. The caller guarantees that nothing in this
    // process owns a descriptor in the range (no OwnedFd is closed behind its back).
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Marks every descriptor above 2 that this process inherited close-on-exec, so that no
/// child exec'd later gets them (the daemon's and the keeper's first step, while they are
/// still single-threaded). bulkhead takes no descriptor over from its parent on purpose
/// (no systemd `LISTEN_FDS` socket activation), so there is no exception.
pub fn cloexec_inherited() -> io::Result<()> {
    cloexec_from(3)
}

/// `clone3` flag: store a pidfd of the child at `CloneArgs::pidfd` (Linux 5.2).
pub const CLONE_PIDFD: u64 = 0x1000;
/// `clone3` flag: the child is born in the cgroup2 directory `CloneArgs::cgroup` (5.7).
pub const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` (version 2, with `cgroup`), for `clone3`: libc has no wrapper.
#[repr(C)]
#[derive(Debug, Default)]
pub struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

/// `clone3(args)` without a new stack: returns 0 in the child, the child's pid in the
/// parent.
///
/// # Safety
/// As `fork`: `args` must not ask for `CLONE_VM` nor a stack, and the child (a copy of the
/// address space, on a copy of this thread's stack) may only make async-signal-safe calls
/// until it execs or `_exit`s.
pub unsafe fn clone3(args: &mut CloneArgs) -> io::Result<u32> {
    // SAFETY: per the contract; the kernel reads `args` (of the size given).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real line from a kernel 6.x /proc/<pid>/stat, comm `sleep`.
    const SLEEP: &str = "4242 (sleep) S 4241 4241 4000 34816 4241 4194304 95 0 0 0 \
        7 3 2 1 20 0 1 0 123456 5726208 201 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 \
        17 1 0 0 0 0 0 0 0 0 0 0 0 0 0";

    #[test]
    fn parses_a_plain_line() {
        let st = parse_stat(SLEEP).unwrap();
        assert_eq!(st.state, 'S');
        assert_eq!(st.ppid, 4241);
        assert_eq!(st.pgrp, 4241);
        assert_eq!((st.utime, st.stime, st.cutime, st.cstime), (7, 3, 2, 1));
        assert_eq!(st.num_threads, 1);
        assert_eq!(st.rss_pages, 201);
        assert!(!st.is_zombie());
    }

    #[test]
    fn comm_with_spaces_and_parens_splits_at_the_last_paren() {
        let line = SLEEP.replace("(sleep) S", "(a) Z 1 2 (x) ) S");
        let st = parse_stat(&line).unwrap();
        assert_eq!(st.state, 'S');
        assert_eq!(st.pgrp, 4241);
    }

    #[test]
    fn zombies_are_recognised_unless_threads_live_on() {
        let z = parse_stat(&SLEEP.replace("(sleep) S", "(sleep) Z")).unwrap();
        assert!(z.is_zombie());
        // A zombie leader whose other threads still run: the process is alive.
        let line = SLEEP.replace(" 20 0 1 0 123456", " 20 0 3 0 123456");
        let leader = parse_stat(&line.replace("(sleep) S", "(sleep) Z")).unwrap();
        assert_eq!(leader.num_threads, 3);
        assert!(!leader.is_zombie());
    }

    #[test]
    fn malformed_lines_are_rejected() {
        assert_eq!(parse_stat(""), None);
        assert_eq!(parse_stat("12 (x"), None);
        assert_eq!(parse_stat("12 (x) S 1 2"), None);
        assert_eq!(parse_stat(&SLEEP.replace("(sleep) S", "(sleep) SS")), None);
    }

    #[test]
    fn reads_our_own_stat() {
        let me = std::process::id();
        let st = read_stat(me).unwrap();
        assert_eq!(st.pgrp, getpgid(me).unwrap());
        assert!(!st.is_zombie());
        let ps = proc_stats(me).unwrap();
        assert!(ps.rss_bytes > 0);
    }

    #[test]
    fn signals_convert() {
        assert_eq!(to_rustix_signal(Signal::KILL).unwrap(), rp::Signal::KILL);
        let rt = Signal::from_number(libc::SIGRTMIN() + 1).unwrap();
        assert_eq!(to_rustix_signal(rt).unwrap().as_raw(), libc::SIGRTMIN() + 1);
        if libc::SIGRTMIN() > 32 {
            assert!(to_rustix_signal(Signal::from_number(32).unwrap()).is_err());
        }
    }

    #[test]
    fn missing_groups_and_pids() {
        assert!(to_pid(0).is_err());
        assert!(to_pid(u32::MAX).is_err());
        // pid_max is at most 2^22, so this group cannot exist.
        assert!(!group_has_members(i32::MAX.unsigned_abs()));
        assert!(kill_group(i32::MAX.unsigned_abs(), Signal::TERM).is_ok());
        assert!(group_members(i32::MAX.unsigned_abs()).is_empty());
    }
}

#[cfg(test)]
mod proc_table_tests {
    use super::*;

    #[test]
    fn one_scan_finds_every_group_and_is_shared_while_recent() {
        let me = std::process::id();
        let t = ProcTable::scan();
        let st = t
            .stats
            .get(&me)
            .copied()
            .expect("this process is in the table");
        assert!(t.group(st.pgrp).contains(&me));
        assert!(t.stats(me).is_some_and(|s| s.rss_bytes > 0));
        assert!(t.len() > 1 && !t.is_empty());
        // Shared while recent: one scan for every caller of a request.
        let a = ProcTable::recent(Duration::from_secs(60));
        let b = ProcTable::recent(Duration::from_secs(60));
        assert!(Arc::ptr_eq(&a, &b));
        // Scanned again once too old.
        let c = ProcTable::recent(Duration::ZERO);
        assert!(!Arc::ptr_eq(&a, &c));
    }
}
