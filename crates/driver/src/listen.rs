//! Listening sockets handed to a workload with the sd_listen_fds protocol.
//!
//! The daemon binds the sockets (`daemon/src/sockets.rs`) and passes them in
//! [`crate::SpawnSpec::listen`]. Every spawner puts them at descriptors 3, 4, ... in the
//! child, in order, after it marked everything above 2 close-on-exec, and sets
//! `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID`, which must be the pid of the program
//! itself: it is known only in the child, so the environment is built before the fork
//! with a fixed-width placeholder ([`PID_PLACEHOLDER`]) that the child overwrites in place
//! with its own pid ([`write_pid`]), without allocating. Inside a PID namespace that is
//! the pid the program sees.
//!
//! Descriptors 0-2 and these are all a workload gets: the close-everything-else
//! guarantee is unchanged.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

/// One listening socket for a workload: its name (in `LISTEN_FDNAMES`) and the bound
/// descriptor, shared by every run of the instance.
#[derive(Debug, Clone)]
pub struct ListenFd {
    pub name: String,
    pub fd: Arc<OwnedFd>,
}

/// The first descriptor of the sockets, as sd_listen_fds expects.
pub const FIRST_FD: RawFd = 3;
/// What `LISTEN_PID` holds until the child writes its pid over it: ten bytes, room for
/// any pid (`pid_max` is at most 4,194,304).
pub const PID_PLACEHOLDER: &str = "##########";

/// The variables to add for `listen` (none when it is empty): `LISTEN_FDS`,
/// `LISTEN_FDNAMES`, and `LISTEN_PID` with [`PID_PLACEHOLDER`] as its value.
pub fn env(listen: &[ListenFd]) -> Vec<(String, String)> {
    if listen.is_empty() {
        return Vec::new();
    }
    vec![
        ("LISTEN_FDS".into(), listen.len().to_string()),
        (
            "LISTEN_FDNAMES".into(),
            listen
                .iter()
                .map(|l| l.name.as_str())
                .collect::<Vec<_>>()
                .join(":"),
        ),
        ("LISTEN_PID".into(), PID_PLACEHOLDER.into()),
    ]
}

/// Everything a child needs to exec with its sockets, allocated before the fork: argv,
/// an environment whose `LISTEN_PID` value is writable in place, and the descriptors.
pub struct ExecPlan {
    program: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _env: Vec<Vec<u8>>,
    env_ptrs: Vec<*const libc::c_char>,
    /// The first byte of `LISTEN_PID`'s value in `_env`.
    pid_at: *mut u8,
    fds: Vec<RawFd>,
    tmp: Vec<RawFd>,
}

impl ExecPlan {
    /// The listening sockets the child puts at 3.. (the descriptors it must keep).
    pub fn sockets(&self) -> &[RawFd] {
        &self.fds
    }
}

// SAFETY: the raw pointers point into the heap buffers this struct owns (which never
// move while it lives); they are only dereferenced in a forked child.
unsafe impl Send for ExecPlan {}
// SAFETY: as above; shared references never write through them.
unsafe impl Sync for ExecPlan {}

fn cstring(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"))
}

impl ExecPlan {
    /// `env` is the instance's environment; the `LISTEN_*` variables are added here.
    /// The descriptors of `listen` must stay open until the child has exec'd.
    pub fn new(
        program: &Path,
        argv: &[String],
        env: &[(String, String)],
        listen: &[ListenFd],
    ) -> io::Result<ExecPlan> {
        let program = cstring(program.as_os_str().as_bytes())?;
        let argv: Vec<CString> = argv
            .iter()
            .map(|a| cstring(a.as_bytes()))
            .collect::<io::Result<_>>()?;
        let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut storage: Vec<Vec<u8>> = env
            .iter()
            .filter(|(k, _)| listen.is_empty() || !k.starts_with("LISTEN_"))
            .chain(self::env(listen).iter())
            .map(|(k, v)| {
                let mut e = Vec::with_capacity(k.len() + v.len() + 2);
                e.extend_from_slice(k.as_bytes());
                e.push(b'=');
                e.extend_from_slice(v.as_bytes());
                if e.contains(&0) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("environment variable {k} contains a NUL byte"),
                    ));
                }
                e.push(0);
                Ok(e)
            })
            .collect::<io::Result<_>>()?;
        let prefix = format!("LISTEN_PID={PID_PLACEHOLDER}\0");
        let pid_at = storage
            .iter_mut()
            .find(|e| e.as_slice() == prefix.as_bytes())
            .map(|e| e[b"LISTEN_PID=".len()..].as_mut_ptr())
            .unwrap_or(std::ptr::null_mut());
        let mut env_ptrs: Vec<*const libc::c_char> =
            storage.iter().map(|e| e.as_ptr().cast()).collect();
        env_ptrs.push(std::ptr::null());
        Ok(ExecPlan {
            program,
            _argv: argv,
            argv_ptrs,
            _env: storage,
            env_ptrs,
            pid_at,
            fds: listen.iter().map(|l| l.fd.as_raw_fd()).collect(),
            tmp: vec![-1; listen.len()],
        })
    }

    /// In the child, last: puts the sockets at 3.., writes the pid and execs. Returns
    /// only on failure, with the errno.
    ///
    /// # Safety
    /// Only in a forked child (single-threaded), after everything above 2 was marked
    /// close-on-exec. Makes raw system calls on memory allocated before the fork.
    pub unsafe fn exec(&mut self) -> i32 {
        // SAFETY: per the contract; `install` and `write_pid` are async-signal-safe and
        // the pointers are valid in this copy of the address space.
        unsafe {
            if let Err(e) = install(&self.fds, &mut self.tmp) {
                return e;
            }
            if !self.pid_at.is_null() {
                write_pid(self.pid_at, libc::getpid());
            }
            libc::execve(
                self.program.as_ptr(),
                self.argv_ptrs.as_ptr(),
                self.env_ptrs.as_ptr(),
            );
            *libc::__errno_location()
        }
    }
}

impl ExecPlan {
    /// Execs the first of `candidates` that runs, as `execvp` does with its `PATH`: one
    /// that is missing (or is not permitted, or has a non-directory on its way) is
    /// skipped. Returns only on failure: the errno of the last try, `EACCES` if one was
    /// not permitted. No sockets are put in place.
    ///
    /// # Safety
    /// As [`ExecPlan::exec`].
    pub unsafe fn exec_first(&mut self, candidates: &[CString]) -> i32 {
        let mut denied = false;
        let mut last = libc::ENOENT;
        for c in candidates {
            // SAFETY: per the contract: pointers into buffers this plan owns.
            unsafe {
                libc::execve(c.as_ptr(), self.argv_ptrs.as_ptr(), self.env_ptrs.as_ptr());
                last = *libc::__errno_location();
            }
            match last {
                libc::EACCES => denied = true,
                libc::ENOENT | libc::ENOTDIR | libc::ENODEV | libc::ESTALE | libc::ETIMEDOUT => {}
                _ => return last,
            }
        }
        if denied {
            libc::EACCES
        } else {
            last
        }
    }
}

/// Puts `src[i]` at descriptor `3 + i`, without close-on-exec. `tmp` is scratch of the
/// same length. Returns the errno of a failed call.
///
/// # Safety
/// Async-signal-safe, for a child between fork and exec: overwrites descriptors 3..3+n.
pub unsafe fn install(src: &[RawFd], tmp: &mut [RawFd]) -> Result<(), i32> {
    let n = src.len() as RawFd;
    // SAFETY: fcntl and dup2 on descriptors; errno of this thread.
    unsafe {
        // ORDER: first out of the way (a source may sit where another goes), close-on-exec
        // so these copies vanish at exec; then into place. dup2 clears close-on-exec on
        // the target; a source already at its place would keep it, hence the copies.
        for (i, fd) in src.iter().enumerate() {
            let t = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, FIRST_FD + n);
            if t < 0 {
                return Err(*libc::__errno_location());
            }
            tmp[i] = t;
        }
        for (i, t) in tmp.iter().enumerate() {
            if libc::dup2(*t, FIRST_FD + i as RawFd) < 0 {
                return Err(*libc::__errno_location());
            }
        }
    }
    Ok(())
}

/// Writes `pid` in decimal at `at` (room for ten digits and the NUL that ends it).
///
/// # Safety
/// `at` must point to at least 11 writable bytes. Async-signal-safe.
pub unsafe fn write_pid(at: *mut u8, pid: libc::pid_t) {
    // SAFETY: the caller's 11 bytes; a pid has at most ten digits.
    let out = unsafe { std::slice::from_raw_parts_mut(at, 11) };
    let n = write_decimal(&mut out[..10], pid.max(0) as u64);
    out[n] = 0;
}

/// Writes `v` in decimal at the start of `out`, which has room for its digits (10 for a
/// pid, 20 for any `u64`); returns how many bytes. No allocation: for a child before
/// exec.
pub fn write_decimal(out: &mut [u8], mut v: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for (o, d) in out.iter_mut().zip(digits[..n].iter().rev()) {
        *o = *d;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_cover_a_whole_u64() {
        let mut out = [b'#'; 21];
        for (v, text) in [
            (0, "0"),
            (7, "7"),
            (4_194_304, "4194304"),
            (u64::MAX, "18446744073709551615"),
        ] {
            let n = write_decimal(&mut out, v);
            assert_eq!(std::str::from_utf8(&out[..n]).unwrap(), text);
        }
    }

    #[test]
    fn pid_digits_replace_the_placeholder() {
        for (pid, want) in [(1, "1"), (42, "42"), (4_194_304, "4194304")] {
            let mut buf = format!("{PID_PLACEHOLDER}\0").into_bytes();
            // SAFETY: 11 bytes.
            unsafe { write_pid(buf.as_mut_ptr(), pid) };
            let end = buf.iter().position(|b| *b == 0).unwrap();
            assert_eq!(std::str::from_utf8(&buf[..end]).unwrap(), want);
        }
    }

    #[test]
    fn env_lists_names_in_order() {
        let fd = |n: &str| ListenFd {
            name: n.into(),
            fd: Arc::new(OwnedFd::from(std::fs::File::open("/dev/null").unwrap())),
        };
        let e = env(&[fd("http"), fd("admin")]);
        assert_eq!(e[0], ("LISTEN_FDS".into(), "2".into()));
        assert_eq!(e[1], ("LISTEN_FDNAMES".into(), "http:admin".into()));
        assert!(env(&[]).is_empty());
    }
}
