//! The waiter: the program of a warm slot's workload process, and of a cold spawn's made
//! in the daemon's memory (`bulkhead-init` run with `BULKHEAD_WAIT=1`). That process did every step of a launch that does not depend on
//! the request (stdio, `umask`, `limits`, its working directory, the bounding set, ids,
//! capabilities, `no_new_privs`, Landlock, seccomp: all of them survive an exec), then
//! exec'd this, so that a waiting slot holds nothing of the daemon's memory and the
//! hand-over's exec has none of it to tear down.
//!
//! Given (`proto.rs`): the error pipe at 3, the hand-over pipe at 4, the `go` pipe at 5
//! (only with an init), the listening sockets' pair at 6 (only for a workload with
//! `sockets:`). It reports `STAGE_WAITING`, reads the hand-over (the format `proto.rs`
//! describes; the hostname is the init's, or without one the driver's, to set, and the
//! working directory is the one the slot was made for, which the driver checks),
//! receives the sockets and puts them at 3.. with `LISTEN_PID` its pid, waits for `go`
//! (the init has set the instance's title and hostname), and execs the program. A failure is a `(stage, errno)` record on the error pipe and exit
//! 127, as in a cold spawn; a successful exec closes the pipe (close-on-exec).

use std::os::raw::{c_char, c_int, c_void};

use super::proto::{
    HANDOVER_BYTES, HANDOVER_FDS, HANDOVER_HEADER, HANDOVER_STRINGS, STAGE_EXEC, STAGE_HANDOVER,
    STAGE_LISTEN, STAGE_WAITING, WAIT_ERR, WAIT_FDS, WAIT_GO, WAIT_HANDOVER,
};
use super::{__errno_location, _exit, close, fcntl, read, read_full, write, F_GETFD};

#[repr(C)]
struct IoVec {
    base: *mut c_void,
    len: usize,
}

/// `struct msghdr` (64-bit layout).
#[repr(C)]
struct MsgHdr {
    name: *mut c_void,
    namelen: u32,
    iov: *mut IoVec,
    iovlen: usize,
    control: *mut c_void,
    controllen: usize,
    flags: c_int,
}

extern "C" {
    fn recvmsg(fd: c_int, msg: *mut MsgHdr, flags: c_int) -> isize;
    fn execve(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char)
        -> c_int;
    fn dup2(from: c_int, to: c_int) -> c_int;
    fn getpid() -> c_int;
    fn setrlimit(resource: c_int, limit: *const [u64; 2]) -> c_int;
}

const RLIMIT_NOFILE: c_int = 7;

const F_DUPFD_CLOEXEC: c_int = 1030;
const MSG_CMSG_CLOEXEC: c_int = 0x4000_0000;
const MSG_CTRUNC: c_int = 8;
const SOL_SOCKET: c_int = 1;
const SCM_RIGHTS: c_int = 1;
const EINTR: c_int = 4;
const EINVAL: c_int = 22;
const E2BIG: c_int = 7;
const EBADMSG: c_int = 74;
const EPIPE: c_int = 32;
/// `struct cmsghdr`'s size (64-bit): the data follows it.
const CMSG_HEADER: usize = 16;
/// The first descriptor of the sockets, as sd_listen_fds expects.
const FIRST_FD: c_int = 3;

fn errno() -> c_int {
    // SAFETY: errno of this (only) thread.
    unsafe { *__errno_location() }
}

/// Writes `(stage, errno)` to `err`.
fn record(err: c_int, stage: u32, errno: c_int) {
    let mut rec = [0u8; 8];
    rec[..4].copy_from_slice(&stage.to_ne_bytes());
    rec[4..].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: a stack buffer to our pipe.
    unsafe { write(err, rec.as_ptr().cast(), rec.len()) };
}

fn fail(err: c_int, stage: u32, errno: c_int) -> ! {
    record(err, stage, errno);
    // SAFETY: _exit(2).
    unsafe { _exit(127) }
}

/// Receives exactly `n` descriptors (close-on-exec) from the sockets' pair.
fn recv_sockets(n: usize) -> Result<Vec<c_int>, c_int> {
    let mut control = [0u64; (64 + HANDOVER_FDS * 4) / 8];
    let mut byte = [0u8; 1];
    let mut iov = IoVec {
        base: byte.as_mut_ptr().cast(),
        len: 1,
    };
    let mut msg = MsgHdr {
        name: std::ptr::null_mut(),
        namelen: 0,
        iov: &mut iov,
        iovlen: 1,
        control: control.as_mut_ptr().cast(),
        controllen: std::mem::size_of_val(&control),
        flags: 0,
    };
    let got = loop {
        // SAFETY: recvmsg into stack buffers we own.
        let r = unsafe { recvmsg(WAIT_FDS, &mut msg, MSG_CMSG_CLOEXEC) };
        if r >= 0 || errno() != EINTR {
            break r;
        }
    };
    if got < 0 {
        return Err(errno());
    }
    if got == 0 || msg.flags & MSG_CTRUNC != 0 {
        return Err(EBADMSG);
    }
    // SAFETY: the control buffer as bytes, within what the kernel wrote.
    let bytes =
        unsafe { std::slice::from_raw_parts(control.as_ptr().cast::<u8>(), msg.controllen) };
    let mut fds = Vec::new();
    let mut at = 0;
    while at + CMSG_HEADER <= bytes.len() {
        let word = |i: usize, n: usize| -> u64 {
            let mut b = [0u8; 8];
            b[..n].copy_from_slice(&bytes[i..i + n]);
            u64::from_ne_bytes(b)
        };
        let len = word(at, 8) as usize;
        let (level, kind) = (word(at + 8, 4) as c_int, word(at + 12, 4) as c_int);
        if len < CMSG_HEADER || at + len > bytes.len() {
            break;
        }
        if level == SOL_SOCKET && kind == SCM_RIGHTS {
            for i in 0..(len - CMSG_HEADER) / 4 {
                fds.push(word(at + CMSG_HEADER + i * 4, 4) as u32 as c_int);
            }
        }
        at += (len + 7) & !7;
    }
    if fds.len() != n {
        for fd in fds {
            // SAFETY: descriptors we were just given.
            unsafe { close(fd) };
        }
        return Err(EBADMSG);
    }
    Ok(fds)
}

/// `BULKHEAD_WAIT_NOFILE`'s `<soft> <hard>`, if given.
unsafe fn nofile(envp: *const *mut c_char) -> Option<[u64; 2]> {
    // SAFETY: the caller's envp, as `super::env_value` wants it.
    let v = unsafe { super::env_value(envp, super::proto::ENV_WAIT_NOFILE) }?;
    let mut parts = v.split(|b| *b == b' ').map(|p| {
        p.iter().try_fold(0u64, |n, d| {
            d.is_ascii_digit()
                .then(|| n.saturating_mul(10).saturating_add(u64::from(d - b'0')))
        })
    });
    Some([parts.next()??, parts.next()??])
}

/// The waiter; never returns.
///
/// # Safety
/// `envp` is the kernel's.
pub unsafe fn main(envp: *const *mut c_char) -> ! {
    let err = WAIT_ERR;
    // Named for `ps` (an exec of a descriptor names the process after its number).
    // SAFETY: prctl(2) with a static string.
    unsafe {
        super::prctl(
            super::PR_SET_NAME,
            c"bulkhead-wait".as_ptr(),
            0 as u64,
            0 as u64,
            0 as u64,
        )
    };
    record(err, STAGE_WAITING, 0);
    let mut hdr = [0u8; HANDOVER_HEADER];
    // SAFETY: reading into stack and heap buffers of the lengths given.
    if !unsafe { read_full(WAIT_HANDOVER, hdr.as_mut_ptr(), HANDOVER_HEADER) } {
        fail(
            err,
            STAGE_HANDOVER,
            if errno() == 0 { EPIPE } else { errno() },
        );
    }
    let word = |i: usize| {
        u32::from_ne_bytes([hdr[i * 4], hdr[i * 4 + 1], hdr[i * 4 + 2], hdr[i * 4 + 3]]) as usize
    };
    let (len, argc, envc, nfds) = (word(0), word(1), word(2), word(3));
    if len > HANDOVER_BYTES || argc == 0 || argc + envc > HANDOVER_STRINGS || nfds > HANDOVER_FDS {
        fail(err, STAGE_HANDOVER, E2BIG);
    }
    let mut buf = vec![0u8; len];
    // SAFETY: as above.
    if !unsafe { read_full(WAIT_HANDOVER, buf.as_mut_ptr(), len) } {
        fail(
            err,
            STAGE_HANDOVER,
            if errno() == 0 { EPIPE } else { errno() },
        );
    }
    // SAFETY: our own descriptor.
    unsafe { close(WAIT_HANDOVER) };
    // The strings' starts: hostname, working directory, program, argv, environment.
    let mut starts = Vec::with_capacity(3 + argc + envc);
    let mut pos = 0;
    while starts.len() < 3 + argc + envc {
        let Some(end) = buf[pos..].iter().position(|b| *b == 0) else {
            fail(err, STAGE_HANDOVER, EINVAL);
        };
        starts.push(pos);
        pos += end + 1;
    }
    let sockets = if nfds > 0 {
        recv_sockets(nfds).unwrap_or_else(|e| fail(err, STAGE_LISTEN, e))
    } else {
        Vec::new()
    };
    // SAFETY: our own descriptor (not open without sockets: ignored).
    unsafe { close(WAIT_FDS) };
    // `LISTEN_PID`: our pid, over its placeholder.
    if nfds > 0 {
        let key = b"LISTEN_PID=";
        let pid = unsafe { getpid() }.to_string();
        let entry = starts[3 + argc..].iter().copied().find(|s| {
            let e = &buf[*s..];
            e.starts_with(key) && e[key.len()..].iter().position(|b| *b == 0) == Some(10)
        });
        let Some(at) = entry else {
            fail(err, STAGE_LISTEN, EINVAL);
        };
        let value = at + key.len();
        buf[value..value + 10].fill(0);
        buf[value..value + pid.len()].copy_from_slice(pid.as_bytes());
    }
    // The error and `go` pipes move above the sockets' places (close-on-exec), then the
    // sockets go to 3.. (first out of the way, as a source may sit where another goes).
    let n = sockets.len() as c_int;
    // SAFETY: fcntl, dup2 and close on our own descriptors.
    let (err, go) = unsafe {
        let e = fcntl(WAIT_ERR, F_DUPFD_CLOEXEC, FIRST_FD + n);
        // Without an init there is no `go` pipe (nothing to wait for).
        let g = if fcntl(WAIT_GO, F_GETFD) >= 0 {
            fcntl(WAIT_GO, F_DUPFD_CLOEXEC, FIRST_FD + n)
        } else {
            -2
        };
        if e < 0 || g == -1 {
            fail(WAIT_ERR, STAGE_LISTEN, errno());
        }
        close(WAIT_ERR);
        close(WAIT_GO);
        let mut tmp = Vec::with_capacity(sockets.len());
        for fd in &sockets {
            let t = fcntl(*fd, F_DUPFD_CLOEXEC, FIRST_FD + n);
            if t < 0 {
                fail(e, STAGE_LISTEN, errno());
            }
            tmp.push(t);
        }
        for (i, t) in tmp.iter().enumerate() {
            if dup2(*t, FIRST_FD + i as c_int) < 0 {
                fail(e, STAGE_LISTEN, errno());
            }
        }
        (e, g)
    };
    // RACE: the init sets the instance's title and hostname before it writes `go`: the
    // program never sees the slot's. End-of-file (the init is gone, and the namespace
    // with it) goes on as well.
    if go >= 0 {
        let mut b = [0u8; 1];
        // SAFETY: a stack byte from our pipe.
        while unsafe { read(go, b.as_mut_ptr().cast(), 1) } < 0 && errno() == EINTR {}
        // SAFETY: our own descriptor.
        unsafe { close(go) };
    }
    let ptr = |i: usize| buf[starts[i]..].as_ptr().cast::<c_char>();
    let program = ptr(2);
    let argv: Vec<*const c_char> = (3..3 + argc)
        .map(ptr)
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp_out: Vec<*const c_char> = (3 + argc..3 + argc + envc)
        .map(ptr)
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    // The manifest's `nofile`, lower than what this process needed (only lowered here:
    // the workload process set it at least this high while it could).
    // SAFETY: envp is the kernel's; setrlimit on a stack value.
    if let Some(limit) = unsafe { nofile(envp) } {
        if unsafe { setrlimit(RLIMIT_NOFILE, &limit) } != 0 {
            fail(err, super::proto::STAGE_WAIT_NOFILE, errno());
        }
    }
    // SAFETY: NUL-terminated strings in `buf`, NULL-terminated pointer arrays.
    unsafe { execve(program, argv.as_ptr(), envp_out.as_ptr()) };
    fail(err, STAGE_EXEC, errno())
}
