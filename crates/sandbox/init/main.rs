//! bulkhead-init: PID 1 of a sandbox with an init (`sandbox: {init: true}`, the default).
//!
//! Built by the sandbox crate's build script as a static executable (std only) and
//! embedded; the driver keeps it in a sealed memfd, and the sandbox's first process execs
//! it right after it forked the workload process, so that no long-lived process of an
//! instance is a copy of the daemon (whose pages it would keep, see the crate's docs).
//!
//! Given (see `proto.rs`): the status pipe at 0, the control pipe at 1, the `go` pipe at
//! 2, a warm slot's title pipe at 3 (cold: not open), every signal blocked (the mask the
//! fork left, so that nothing sent since is lost: it is pending), the main process's pid
//! in `BULKHEAD_INIT_MAIN`, and a command line of [`proto::TITLE_ROOM`] bytes whose start
//! is the title. No argument parsing beyond that: nothing but the driver runs it.
//!
//! It makes itself non-dumpable, clears its environment area, reads a slot's title at the
//! hand-over and writes it over its command line, tells the workload process to go on,
//! then runs the loop: signals come from a signalfd (a blocked signal is never discarded,
//! even for a namespace's init), `SIGCHLD` reaps every child (we are PID 1), anything else
//! is forwarded to every process of the namespace. When the main process (`W`, or the one
//! `MAINPID=` named) ends, its pid and raw wait status go to the status pipe and the init
//! waits for the driver's answer: `0`, and it exits (the kernel then kills what is left of
//! the namespace), or another main process to follow. The end of the main process, when
//! it is our child, is reported before it is reaped: it stays a zombie until the driver
//! answers, so the daemon can still tell that the notify messages it sent came from the
//! instance.

#![no_main]

mod proto;
mod wait;

use std::os::raw::{c_char, c_int, c_long, c_ulong, c_void};

use proto::{FD_CTL, FD_GO, FD_STATUS, FD_TITLE, LOST, RECORD};

// What we call of the C library (static glibc), with the kernel's values for the
// architectures we build for (x86_64, aarch64: the same for all of these).
#[repr(C)]
struct PollFd {
    fd: c_int,
    events: i16,
    revents: i16,
}

/// `siginfo_t` as `waitid` fills it for a child (64-bit layout: the union at 16).
#[repr(C)]
struct SigInfo {
    signo: c_int,
    errno: c_int,
    code: c_int,
    _pad0: c_int,
    pid: c_int,
    uid: u32,
    status: c_int,
    _rest: [c_int; 25],
}

extern "C" {
    fn poll(fds: *mut PollFd, n: c_ulong, timeout: c_int) -> c_int;
    fn read(fd: c_int, buf: *mut c_void, n: usize) -> isize;
    fn write(fd: c_int, buf: *const c_void, n: usize) -> isize;
    fn close(fd: c_int) -> c_int;
    fn kill(pid: c_int, sig: c_int) -> c_int;
    fn waitid(idtype: c_int, id: u32, info: *mut SigInfo, options: c_int) -> c_int;
    fn waitpid(pid: c_int, status: *mut c_int, options: c_int) -> c_int;
    fn syscall(n: c_long, ...) -> c_long;
    fn prctl(option: c_int, ...) -> c_int;
    fn signalfd(fd: c_int, mask: *const u64, flags: c_int) -> c_int;
    fn fcntl(fd: c_int, cmd: c_int, ...) -> c_int;
    fn strlen(s: *const c_char) -> usize;
    fn sethostname(name: *const c_char, len: usize) -> c_int;
    fn __errno_location() -> *mut c_int;
    fn _exit(code: c_int) -> !;
}

const POLLIN: i16 = 1;
const P_ALL: c_int = 0;
const P_PIDFD: c_int = 3;
const WNOHANG: c_int = 1;
const WEXITED: c_int = 4;
const WNOWAIT: c_int = 0x0100_0000;
const SIGCHLD: c_int = 17;
const ECHILD: c_int = 10;
const SYS_PIDFD_OPEN: c_long = 434;
const PR_SET_DUMPABLE: c_int = 4;
const PR_SET_NAME: c_int = 15;
const SFD_NONBLOCK: c_int = 0o4000;
const SFD_CLOEXEC: c_int = 0o2_000_000;
const F_GETFD: c_int = 1;
/// `struct signalfd_siginfo`'s size; `ssi_signo` is its first field.
const SIGNALFD_INFO: usize = 128;
/// The longest title a slot's hand-over brings.
const TITLE_BYTES: usize = 512;

/// How often the init looks whether a main process that exited as another process's
/// child is still a zombie.
const ZOMBIE_POLL_MS: c_int = 50;

#[no_mangle]
pub extern "C" fn main(argc: c_int, argv: *const *mut c_char, envp: *const *mut c_char) -> c_int {
    // SAFETY: the arguments are the kernel's argv and envp (NULL-terminated arrays of
    // NUL-terminated strings in our own stack); everything else is a system call on our
    // descriptors and stack buffers.
    unsafe {
        if has_env(envp, proto::ENV_WAIT) {
            wait::main(envp);
        }
        // Nothing of the daemon is here any more, but the workload (same ids) has no
        // business reading this process's memory or attaching to it.
        prctl(
            PR_SET_DUMPABLE,
            0 as c_ulong,
            0 as c_ulong,
            0 as c_ulong,
            0 as c_ulong,
        );
        prctl(
            PR_SET_NAME,
            c"bulkhead-init".as_ptr(),
            0 as c_ulong,
            0 as c_ulong,
            0 as c_ulong,
        );
        let main = main_pid(envp);
        clear_env(envp);
        let title = args_area(argc, argv);
        // A warm slot: its title comes with the hand-over (until then the slot's own).
        if fcntl(FD_TITLE, F_GETFD) >= 0 {
            let mut len = [0u8; 4];
            let mut buf = [0u8; TITLE_BYTES];
            if read_full(FD_TITLE, len.as_mut_ptr(), 4) {
                let n = (u32::from_ne_bytes(len) as usize).min(TITLE_BYTES);
                if read_full(FD_TITLE, buf.as_mut_ptr(), n) {
                    set_title(title, &buf[..n]);
                }
            }
            // The instance's hostname: the UTS namespace is ours, and we are root in it
            // (the slot's waiter, which has given up every capability, cannot).
            if read_full(FD_TITLE, len.as_mut_ptr(), 4) {
                let n = (u32::from_ne_bytes(len) as usize).min(64);
                if read_full(FD_TITLE, buf.as_mut_ptr(), n) {
                    sethostname(buf.as_ptr().cast(), n);
                }
            }
            close(FD_TITLE);
        }
        // RACE: the workload must not read /proc/1/cmdline before it is the instance's:
        // the title is set above, then the workload process is told to go on (it waits
        // for this byte before its exec).
        write(FD_GO, b"g".as_ptr().cast(), 1);
        close(FD_GO);
        let all = [u64::MAX; 16];
        let sfd = signalfd(-1, all.as_ptr(), SFD_CLOEXEC | SFD_NONBLOCK);
        if sfd < 0 {
            // Nothing to wait on: end as if the main process was lost.
            _exit(255);
        }
        let mut init = Init::new(main, sfd);
        loop {
            init.step();
        }
    }
}

/// Whether `entry` is one of the environment's.
unsafe fn has_env(envp: *const *mut c_char, entry: &str) -> bool {
    let mut i = 0;
    // SAFETY: envp is NULL-terminated; each entry NUL-terminated.
    unsafe {
        while !(*envp.add(i)).is_null() {
            let e = *envp.add(i) as *const u8;
            if std::slice::from_raw_parts(e, strlen(e.cast())) == entry.as_bytes() {
                return true;
            }
            i += 1;
        }
    }
    false
}

/// The value of the environment's variable `key` (`NAME=`), if set.
///
/// # Safety
/// `envp` is NULL-terminated, each entry NUL-terminated, and outlives the result.
unsafe fn env_value<'a>(envp: *const *mut c_char, key: &str) -> Option<&'a [u8]> {
    let mut i = 0;
    // SAFETY: per the contract.
    unsafe {
        while !(*envp.add(i)).is_null() {
            let e = *envp.add(i) as *const u8;
            let s = std::slice::from_raw_parts(e, strlen(e.cast()));
            if let Some(v) = s.strip_prefix(key.as_bytes()) {
                return Some(v);
            }
            i += 1;
        }
    }
    None
}

/// `BULKHEAD_INIT_MAIN`'s pid (2 if missing: the first process the init forked).
unsafe fn main_pid(envp: *const *mut c_char) -> c_int {
    // SAFETY: the caller's envp.
    let Some(v) = (unsafe { env_value(envp, proto::ENV_MAIN) }) else {
        return 2;
    };
    let mut pid: c_int = 0;
    for d in v {
        if !d.is_ascii_digit() {
            break;
        }
        pid = pid.saturating_mul(10).saturating_add((d - b'0') as c_int);
    }
    if pid > 0 {
        pid
    } else {
        2
    }
}

/// Zeroes the environment strings (shown in /proc/1/environ).
unsafe fn clear_env(envp: *const *mut c_char) {
    let mut i = 0;
    // SAFETY: as in `main_pid`; we write within each string.
    unsafe {
        while !(*envp.add(i)).is_null() {
            let e = *envp.add(i);
            std::ptr::write_bytes(e, 0, strlen(e));
            i += 1;
        }
    }
}

/// Our command line's area: from the first argument to the end of the last.
unsafe fn args_area(argc: c_int, argv: *const *mut c_char) -> (*mut u8, usize) {
    if argc < 1 {
        return (std::ptr::null_mut(), 0);
    }
    // SAFETY: argv has argc entries, laid out one after the other by the kernel.
    unsafe {
        let first = *argv as *mut u8;
        let last = *argv.add(argc as usize - 1);
        let end = (last as *mut u8).add(strlen(last) + 1);
        (first, end.offset_from(first) as usize)
    }
}

/// Writes `title` over the command line, the rest NUL.
unsafe fn set_title((area, len): (*mut u8, usize), title: &[u8]) {
    if area.is_null() || len == 0 {
        return;
    }
    let n = title.len().min(len - 1);
    // SAFETY: within our own argument area.
    unsafe {
        std::ptr::write_bytes(area, 0, len);
        std::ptr::copy_nonoverlapping(title.as_ptr(), area, n);
    }
}

/// Reads exactly `len` bytes; false on end-of-file or an error.
unsafe fn read_full(fd: c_int, buf: *mut u8, len: usize) -> bool {
    let mut got = 0;
    while got < len {
        // SAFETY: within `buf`'s `len` bytes.
        let r = unsafe { read(fd, buf.add(got).cast(), len - got) };
        if r > 0 {
            got += r as usize;
        } else if r == 0 || unsafe { *__errno_location() } != 4 {
            return false;
        }
    }
    true
}

fn wifexited(st: c_int) -> bool {
    st & 0x7f == 0
}

/// The init's state: which process is main, and whether its end was reported and awaits
/// the driver's answer.
struct Init {
    /// The main process (a pid in the namespace): `W`, or what the driver named.
    main: c_int,
    /// The signalfd.
    signals: c_int,
    /// A pidfd of a main process the driver named (-1 for `W`, always our child): it
    /// tells when that one exits even while another process is its parent.
    pidfd: c_int,
    /// The main process exited as another live process's child (a zombie): it is
    /// ours (and its status real) if that parent exits first, lost if it reaps it.
    zombie: bool,
    /// The end of `main` was written to the status pipe; the driver answers with `0`
    /// (end) or a new main process.
    waiting: bool,
    /// That status.
    last: c_int,
    /// The control pipe is open: ask the driver before ending (it reads the `MAINPID=`
    /// messages queued before the exit first).
    ask: bool,
    /// The end of `main`, our child, was reported and it is left a zombie until the
    /// driver answers. No other child is reaped meanwhile.
    held: bool,
    /// The last processes reaped (pid, status): a process named after its end.
    reaped: [(c_int, c_int); 16],
    next: usize,
}

impl Init {
    fn new(main: c_int, signals: c_int) -> Init {
        Init {
            main,
            signals,
            pidfd: -1,
            zombie: false,
            waiting: false,
            last: 0,
            ask: true,
            held: false,
            reaped: [(0, 0); 16],
            next: 0,
        }
    }

    /// Waits for a signal, the driver or the main process's end, and handles it.
    unsafe fn step(&mut self) {
        let mut fds = [
            PollFd {
                fd: self.signals,
                events: POLLIN,
                revents: 0,
            },
            PollFd {
                fd: if self.ask { FD_CTL } else { -1 },
                events: POLLIN,
                revents: 0,
            },
            PollFd {
                fd: self.pidfd,
                events: POLLIN,
                revents: 0,
            },
        ];
        // A zombie of another parent gives no event when that parent reaps it: looked
        // at again every 50 ms (only then).
        let timeout = if self.zombie { ZOMBIE_POLL_MS } else { -1 };
        // SAFETY: system calls on our descriptors and stack buffers, for the whole block.
        unsafe {
            if poll(fds.as_mut_ptr(), 3, timeout) < 0 {
                return;
            }
            if self.zombie && !self.waiting && kill(self.main, 0) != 0 {
                // Reaped by its parent: its status was that parent's to take.
                self.zombie = false;
                self.ended(LOST);
            }
            if fds[0].revents != 0 {
                self.signals();
            }
            if fds[2].revents != 0 && self.pidfd == fds[2].fd {
                self.pidfd_ready();
            }
            if fds[1].revents != 0 {
                self.control();
            }
        }
    }

    /// Forwards every pending signal but `SIGCHLD` to every process of the namespace but
    /// us; on `SIGCHLD`, reaps every child.
    unsafe fn signals(&mut self) {
        loop {
            let mut si = [0u8; SIGNALFD_INFO];
            // SAFETY: reading into a stack buffer of its size.
            if unsafe { read(self.signals, si.as_mut_ptr().cast(), SIGNALFD_INFO) }
                != SIGNALFD_INFO as isize
            {
                return;
            }
            let sig = u32::from_ne_bytes([si[0], si[1], si[2], si[3]]) as c_int;
            if sig != SIGCHLD {
                // SAFETY: kill(2).
                unsafe { kill(-1, sig) };
                continue;
            }
            // SAFETY: in the init.
            unsafe { self.reap() };
        }
    }

    /// Reaps every child that ended, but reports the end of the main process, when it is
    /// our child and the driver is there to answer, before reaping it (see `held`).
    unsafe fn reap(&mut self) {
        while !self.held {
            // SAFETY: an all-zero SigInfo is valid; waitid into it; WNOWAIT leaves the
            // child as it is.
            let (r, info) = unsafe {
                let mut info: SigInfo = std::mem::zeroed();
                let r = waitid(P_ALL, 0, &mut info, WEXITED | WNOHANG | WNOWAIT);
                (r, info)
            };
            if r < 0 || info.pid == 0 {
                return;
            }
            let (pid, st) = (info.pid, proto::wait_status(info.code, info.status));
            if pid == self.main && !self.waiting && self.ask {
                self.zombie = false;
                self.held = true;
                self.remember(pid, st);
                // SAFETY: in the init.
                unsafe { self.ended(st) };
                return;
            }
            // SAFETY: reaping the child waitid named.
            unsafe { waitpid(pid, std::ptr::null_mut(), WNOHANG) };
            self.remember(pid, st);
            if pid == self.main && !self.waiting {
                self.zombie = false;
                // SAFETY: in the init.
                unsafe { self.ended(st) };
            }
        }
    }

    fn remember(&mut self, pid: c_int, st: c_int) {
        self.reaped[self.next] = (pid, st);
        self.next = (self.next + 1) % self.reaped.len();
    }

    /// The driver answered about a held main process: it is reaped now, and so is what
    /// ended meanwhile.
    unsafe fn release(&mut self, held: c_int) {
        if !self.held {
            return;
        }
        self.held = false;
        // SAFETY: reaping our own child, whose end was reported.
        unsafe {
            waitpid(held, std::ptr::null_mut(), WNOHANG);
            self.reap();
        }
    }

    /// The pidfd of a named main process is readable: it exited. Reaped if it is our
    /// child; otherwise it waits as a zombie for its parent: if that one exits first, the
    /// zombie is ours (reaped on `SIGCHLD`, with its real status); if it reaps it, the
    /// status was its to take, and ours is [`LOST`].
    unsafe fn pidfd_ready(&mut self) {
        // SAFETY: waitid on our pidfd into a zeroed stack struct; errno of this (only)
        // thread.
        unsafe {
            let mut info: SigInfo = std::mem::zeroed();
            let r = waitid(P_PIDFD, self.pidfd as u32, &mut info, WEXITED | WNOHANG);
            if r < 0 {
                if *__errno_location() == ECHILD {
                    // Not (yet) ours: stop polling the pidfd (it stays readable).
                    close(self.pidfd);
                    self.pidfd = -1;
                    if kill(self.main, 0) == 0 {
                        self.zombie = true;
                    } else {
                        self.ended(LOST);
                    }
                }
                return;
            }
            if info.pid == 0 {
                return;
            }
            let st = proto::wait_status(info.code, info.status);
            self.remember(self.main, st);
            self.ended(st);
        }
    }

    /// The main process ended with `st`: written to the status pipe; the init waits for
    /// the driver's answer (or ends now, without a driver to ask).
    unsafe fn ended(&mut self, st: c_int) {
        // SAFETY: closing our own pidfd, writing a stack buffer to our pipe.
        unsafe {
            if self.pidfd >= 0 {
                close(self.pidfd);
                self.pidfd = -1;
            }
            let mut rec = [0u8; RECORD];
            rec[..4].copy_from_slice(&self.main.to_ne_bytes());
            rec[4..].copy_from_slice(&st.to_ne_bytes());
            let written = write(FD_STATUS, rec.as_ptr().cast(), rec.len());
            self.last = st;
            self.waiting = true;
            if !self.ask || written != RECORD as isize {
                self.exit();
            }
        }
    }

    /// A message from the driver: `0` (end: the reported main process was the last), or
    /// the pid of the new main process; end of file: the driver is gone, end when the
    /// main process does.
    unsafe fn control(&mut self) {
        let mut b = [0u8; 4];
        // SAFETY: reading into a stack buffer (4 bytes are written at once: atomic).
        let n = unsafe { read(FD_CTL, b.as_mut_ptr().cast(), b.len()) };
        if n < 0 {
            return;
        }
        // SAFETY: in the init.
        unsafe {
            if n != 4 {
                self.ask = false;
                if self.waiting {
                    self.exit();
                }
                // The driver is gone: nobody asks about a held process any more.
                let held = self.main;
                self.release(held);
                return;
            }
            let pid = c_int::from_ne_bytes(b);
            if pid == 0 {
                if self.waiting {
                    self.exit();
                }
                return;
            }
            if pid != self.main {
                let held = self.main;
                self.moved(pid);
                self.release(held);
            }
        }
    }

    /// `MAINPID=`: `pid` is the main process from now on.
    unsafe fn moved(&mut self, pid: c_int) {
        // SAFETY: closing our own pidfd, opening one.
        unsafe {
            if self.pidfd >= 0 {
                close(self.pidfd);
            }
            self.main = pid;
            self.waiting = false;
            self.zombie = false;
            self.pidfd = syscall(SYS_PIDFD_OPEN, pid as c_long, 0 as c_long) as c_int;
            if self.pidfd >= 0 {
                // Alive (or a zombie): its pidfd polls readable once it has exited.
                return;
            }
            self.pidfd = -1;
            // Gone already: reaped by us (its status is kept), or by its parent.
            let st = self
                .reaped
                .iter()
                .find(|(p, _)| *p == pid)
                .map_or(LOST, |(_, st)| *st);
            self.ended(st);
        }
    }

    /// Ends the run with the last reported status; exiting kills the rest of the
    /// namespace.
    unsafe fn exit(&self) -> ! {
        let st = self.last;
        let code = if st == LOST {
            255
        } else if wifexited(st) {
            (st >> 8) & 0xff
        } else {
            128 + (st & 0x7f)
        };
        // SAFETY: _exit(2).
        unsafe { _exit(code) }
    }
}
