//! `posix_spawn` with the file actions the standard library's `Command` cannot express.
//!
//! The process driver wants glibc's `posix_spawn` fast path (`clone(CLONE_VM |
//! CLONE_VFORK)`, no page-table copy) *and* a child that inherits no descriptor above 2.
//! `Command` keeps the fast path only without a `pre_exec` hook, and has no way to close
//! descriptors it does not know about. So this module calls `posix_spawn` itself, with:
//!
//! - `/dev/null` opened on 0, the two pipe write ends dup'ed onto 1 and 2;
//! - `posix_spawn_file_actions_addchdir_np` (glibc 2.29) for the working directory;
//! - `posix_spawn_file_actions_addclosefrom_np(3)` (glibc 2.34) **last**, so every other
//!   descriptor of the daemon, inherited or its own and whether close-on-exec or not, is
//!   closed before the exec;
//! - a new process group (`POSIX_SPAWN_SETPGROUP`, pgid 0), an empty signal mask and
//!   `SIGPIPE` back to its default (the Rust runtime ignores it; `Command` resets it too).
//!
//! glibc reports a failed `exec` (and a failed file action) as the return value, so the
//! caller gets `ENOENT`, `EACCES`, ... just as from `Command::spawn`.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What to start; every string is turned into a `CString` before the spawn.
pub(crate) struct Spawn<'a> {
    pub program: &'a Path,
    pub arg0: &'a str,
    pub args: &'a [String],
    pub env: &'a [(String, String)],
    pub cwd: &'a Path,
}

/// The started child: its pid and the read ends of its stdout and stderr pipes.
pub(crate) struct Child {
    pub pid: u32,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a NUL byte in the command line, environment or path",
        )
    })
}

/// Turns a `posix_spawn*` return value (an errno, not -1) into a result.
fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}

/// Owns a `posix_spawn_file_actions_t` and destroys it on drop.
struct FileActions(libc::posix_spawn_file_actions_t);

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: initialised by posix_spawn_file_actions_init in `spawn` before this
        // value was built; destroyed exactly once, here.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

/// Owns a `posix_spawnattr_t` and destroys it on drop.
struct Attr(libc::posix_spawnattr_t);

impl Drop for Attr {
    fn drop(&mut self) {
        // SAFETY: initialised by posix_spawnattr_init in `spawn` before this value was
        // built; destroyed exactly once, here.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

/// Starts `s` (see the [module documentation](self)). The caller holds the reaper lock.
pub(crate) fn spawn(s: &Spawn<'_>) -> io::Result<Child> {
    let program = cstring(s.program.as_os_str().as_bytes())?;
    let cwd = cstring(s.cwd.as_os_str().as_bytes())?;
    let dev_null = cstring(b"/dev/null")?;
    let mut argv = Vec::with_capacity(s.args.len() + 1);
    argv.push(cstring(s.arg0.as_bytes())?);
    for a in s.args {
        argv.push(cstring(a.as_bytes())?);
    }
    let mut envp = Vec::with_capacity(s.env.len());
    for (k, v) in s.env {
        let mut kv = Vec::with_capacity(k.len() + v.len() + 1);
        kv.extend_from_slice(OsStr::new(k).as_bytes());
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        envp.push(cstring(&kv)?);
    }
    let mut argv_ptrs: Vec<*mut libc::c_char> =
        argv.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv_ptrs.push(std::ptr::null_mut());
    let mut envp_ptrs: Vec<*mut libc::c_char> =
        envp.iter().map(|e| e.as_ptr().cast_mut()).collect();
    envp_ptrs.push(std::ptr::null_mut());

    // Close-on-exec pipes: the write ends reach the child only through the dup2 actions.
    let (out_r, out_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let (err_r, err_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;

    // SAFETY: `posix_spawn_file_actions_t` and `posix_spawnattr_t` are plain C structs
    // that their init functions fill in completely; each is initialised before use and
    // destroyed once by its owner's Drop.
    let mut fa = unsafe {
        let mut raw: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        check(libc::posix_spawn_file_actions_init(&mut raw))?;
        FileActions(raw)
    };
    // SAFETY: as above.
    let mut attr = unsafe {
        let mut raw: libc::posix_spawnattr_t = std::mem::zeroed();
        check(libc::posix_spawnattr_init(&mut raw))?;
        Attr(raw)
    };
    // SAFETY: every pointer passed below is valid for the call: the actions and
    // attributes are initialised, the CStrings outlive the spawn (glibc copies the paths
    // of open/chdir actions into the actions object), the sigsets are initialised by
    // sigemptyset before being read, and the pointer arrays are NULL-terminated and point
    // into `argv`/`envp`, which live until after posix_spawn returns. The descriptors are
    // open and owned by this function until then.
    let pid = unsafe {
        check(libc::posix_spawn_file_actions_addopen(
            &mut fa.0,
            0,
            dev_null.as_ptr(),
            libc::O_RDONLY,
            0,
        ))?;
        check(libc::posix_spawn_file_actions_adddup2(
            &mut fa.0,
            out_w.as_raw_fd(),
            1,
        ))?;
        check(libc::posix_spawn_file_actions_adddup2(
            &mut fa.0,
            err_w.as_raw_fd(),
            2,
        ))?;
        check(libc::posix_spawn_file_actions_addchdir_np(
            &mut fa.0,
            cwd.as_ptr(),
        ))?;
        // ORDER: last, after the dup2s: everything above 2 goes, whatever the daemon
        // inherited or opened, close-on-exec or not.
        check(libc::posix_spawn_file_actions_addclosefrom_np(&mut fa.0, 3))?;

        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        let mut pipe_only: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut pipe_only);
        libc::sigaddset(&mut pipe_only, libc::SIGPIPE);
        check(libc::posix_spawnattr_setsigmask(&mut attr.0, &empty))?;
        check(libc::posix_spawnattr_setsigdefault(&mut attr.0, &pipe_only))?;
        check(libc::posix_spawnattr_setpgroup(&mut attr.0, 0))?;
        check(libc::posix_spawnattr_setflags(
            &mut attr.0,
            (libc::POSIX_SPAWN_SETPGROUP
                | libc::POSIX_SPAWN_SETSIGMASK
                | libc::POSIX_SPAWN_SETSIGDEF) as libc::c_short,
        ))?;

        let mut pid: libc::pid_t = 0;
        check(libc::posix_spawn(
            &mut pid,
            program.as_ptr(),
            &fa.0,
            &attr.0,
            argv_ptrs.as_mut_ptr().cast_const(),
            envp_ptrs.as_mut_ptr().cast_const(),
        ))?;
        pid
    };
    drop((out_w, err_w));
    Ok(Child {
        pid: pid as u32,
        stdout: out_r,
        stderr: err_r,
    })
}
