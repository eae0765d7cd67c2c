//! Exit codes, and the mapping from errors to them.
//!
//! | code | meaning                                             |
//! |------|-----------------------------------------------------|
//! | 0    | success                                             |
//! | 1    | any other error                                     |
//! | 2    | bad command line (clap)                             |
//! | 3    | not found (workload or instance)                    |
//! | 4    | invalid request (name, id, duration, bad manifest)  |
//! | 5    | daemon unavailable                                  |
//! | 6    | timeout                                             |
//! | 7    | launch failed                                       |
//! | 8    | permission denied (no valid token, scope not granted) |

use std::fmt;

pub const ERROR: u8 = 1;
pub const NOT_FOUND: u8 = 3;
pub const INVALID: u8 = 4;
pub const UNAVAILABLE: u8 = 5;
pub const TIMEOUT: u8 = 6;
pub const LAUNCH_FAILED: u8 = 7;
pub const USAGE: u8 = 2;
pub const PERMISSION_DENIED: u8 = 8;
/// The daemon is at its limit of live instances.
pub const AT_CAPACITY: u8 = 9;

/// An error with a chosen exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// Exits with `code` and prints nothing (the command of `exec` has said what it had to).
pub fn silent(code: u8) -> anyhow::Error {
    Failure {
        code,
        message: String::new(),
    }
    .into()
}

pub fn fail(code: u8, message: impl Into<String>) -> anyhow::Error {
    Failure {
        code,
        message: message.into(),
    }
    .into()
}

/// Maps an API status to a failure with the documented exit code.
pub fn from_status(s: tonic::Status) -> anyhow::Error {
    use tonic::Code;
    let code = match s.code() {
        Code::NotFound => NOT_FOUND,
        Code::InvalidArgument | Code::FailedPrecondition => INVALID,
        Code::Unavailable => UNAVAILABLE,
        Code::DeadlineExceeded => TIMEOUT,
        Code::Aborted => LAUNCH_FAILED,
        Code::Unauthenticated | Code::PermissionDenied => PERMISSION_DENIED,
        Code::ResourceExhausted => AT_CAPACITY,
        _ => ERROR,
    };
    let mut msg = if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        s.message().to_owned()
    };
    // The connection failed under the call (over TCP: typically the TLS handshake, which
    // refuses a client without a certificate signed by the daemon's client CA).
    // (A status the daemon sent has no source; one made from a transport error has. The
    // daemon never sends CANCELLED.)
    let transport = std::error::Error::source(&s).is_some();
    let broken = match s.code() {
        Code::Cancelled => true,
        Code::Unknown | Code::Unavailable => transport,
        _ => false,
    };
    if broken {
        let mut cause = s.message().to_owned();
        let mut cur = std::error::Error::source(&s);
        while let Some(c) = cur {
            cause = c.to_string();
            cur = c.source();
        }
        msg = format!("the connection to the daemon failed: {cause}");
        if crate::client::is_remote() {
            msg.push_str(" (over --tcp the daemon requires a client certificate signed by its client CA: --tls-cert, --tls-key)");
        }
        return fail(UNAVAILABLE, msg);
    }
    fail(code, msg)
}

/// Whether the error is a write to a closed stdout (EPIPE), directly or inside a
/// serde_json error (whose `source()` skips the io::Error itself).
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        let kind = cause
            .downcast_ref::<std::io::Error>()
            .map(std::io::Error::kind)
            .or_else(|| {
                cause
                    .downcast_ref::<serde_json::Error>()
                    .and_then(serde_json::Error::io_error_kind)
            });
        kind == Some(std::io::ErrorKind::BrokenPipe)
    })
}

/// Prints the error and returns its exit code. A closed stdout (`| head`) is success.
pub fn report(e: anyhow::Error) -> std::process::ExitCode {
    if is_broken_pipe(&e) {
        return std::process::ExitCode::SUCCESS;
    }
    if let Some(f) = e.downcast_ref::<Failure>() {
        // An exit code passed through without a message (`exec`: the command's own).
        if f.message.is_empty() {
            return f.code.into();
        }
    }
    let code = e.downcast_ref::<Failure>().map(|f| f.code).unwrap_or(ERROR);
    // The message may quote what a daemon, a manifest or a workload said: no control
    // character or bidi override reaches the terminal raw (newlines stay).
    let msg = format!("{e:#}");
    eprintln!("bulkhead: {}", bulkhead_core::text::escape_lines(&msg));
    code.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epipe() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::BrokenPipe)
    }

    /// Issue 14: `list -o json | head -1` printed `Broken pipe (os error 32)` and exited 1:
    /// serde_json wraps the io::Error and its `source()` skips it.
    #[test]
    fn broken_pipe_inside_serde_json_is_success() {
        let json: anyhow::Error = serde_json::Error::io(epipe()).into();
        assert!(is_broken_pipe(&json));
        let wrapped = anyhow::Error::from(epipe()).context("writing the list");
        assert!(is_broken_pipe(&wrapped));
        let other: anyhow::Error = std::io::Error::from(std::io::ErrorKind::NotFound).into();
        assert!(!is_broken_pipe(&other));
        assert!(!is_broken_pipe(&fail(ERROR, "broken pipe")));
    }
}
