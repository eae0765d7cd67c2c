//! bulkhead-warm-init: the first process of a docker warm slot.
//!
//! Built by the docker crate's build script as a static executable (it must run in any
//! image, with or without a C library) and bind-mounted read-only into each slot
//! container. Usage: `bulkhead-warm-init SOCKET`.
//!
//! It connects to the driver's socket (its one argument), waits for the hand-over
//! message (`proto.rs`), merges the environment it was given over its own (the image's
//! `ENV` and what the engine adds, as the engine does for a container created with that
//! environment), answers that it starts, and execs the program (a bare name is looked up
//! in the merged `PATH`). If the exec fails it sends the errno back and exits 127. If
//! the driver goes away first (the connection ends), it exits 0: the slot is gone.

mod proto;

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let Some(socket) = std::env::args_os().nth(1) else {
        eprintln!("bulkhead-warm-init: usage: bulkhead-warm-init SOCKET");
        return ExitCode::from(2);
    };
    // std opens the socket close-on-exec: the program never sees it, and its exec closes
    // it, which is how the driver learns that the exec succeeded.
    let mut conn = match UnixStream::connect(&socket) {
        Ok(c) => c,
        Err(e) => {
            let shown = std::path::Path::new(&socket).display().to_string();
            eprintln!("bulkhead-warm-init: cannot connect to {shown}: {e}");
            return ExitCode::from(2);
        }
    };
    let msg = match proto::read_message(&mut conn) {
        Ok(Some(m)) => m,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            let _ = conn.write_all(&[proto::REPLY_BAD_MESSAGE]);
            eprintln!("bulkhead-warm-init: bad hand-over message: {e}");
            return ExitCode::from(2);
        }
    };
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    for entry in msg.env {
        let eq = entry.iter().position(|&b| b == b'=').unwrap_or(entry.len());
        let (k, v) = (&entry[..eq], entry.get(eq + 1..).unwrap_or_default());
        let (k, v) = (OsString::from_vec(k.to_vec()), OsString::from_vec(v.to_vec()));
        match env.iter_mut().find(|(ek, _)| *ek == k) {
            Some(slot) => slot.1 = v,
            None => env.push((k, v)),
        }
    }
    let mut argv = msg.argv.into_iter().map(OsString::from_vec);
    let Some(program) = argv.next() else {
        return ExitCode::from(2);
    };
    if conn.write_all(&[proto::REPLY_STARTING]).is_err() {
        // The driver went away during the hand-over.
        return ExitCode::SUCCESS;
    }
    // With the environment changed, std looks a bare name up in the new `PATH`; it resets
    // the signal mask and SIGPIPE before the exec.
    let err = Command::new(&program)
        .args(argv)
        .env_clear()
        .envs(env)
        .exec();
    let errno = err.raw_os_error().unwrap_or(libc_enoexec());
    let mut reply = vec![proto::REPLY_EXEC_FAILED];
    reply.extend_from_slice(&errno.to_le_bytes());
    let _ = conn.write_all(&reply);
    eprintln!(
        "bulkhead-warm-init: cannot run {}: {err}",
        String::from_utf8_lossy(program.as_bytes())
    );
    ExitCode::from(127)
}

/// ENOEXEC, for an exec error that carries no errno.
fn libc_enoexec() -> i32 {
    8
}
