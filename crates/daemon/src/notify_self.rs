//! The daemon's own readiness protocol towards its supervisor (systemd `Type=notify`).
//!
//! When the daemon is started with `$NOTIFY_SOCKET` (systemd sets it for `Type=notify`
//! units), it sends, as datagrams to that socket:
//!
//! - `READY=1` once the API is served: after the keeper's instances were adopted and the
//!   state database's instances recovered, when the accept loop runs;
//! - `STATUS=serving N instances`, or `STATUS=degraded: <reason>` (the reason `health`
//!   gives), whenever it changes;
//! - `WATCHDOG=1` every `$WATCHDOG_USEC / 2` when `$WATCHDOG_USEC` is set (and
//!   `$WATCHDOG_PID`, if set, is this process). It is sent from a task on the daemon's
//!   runtime that also takes the registry lock to count the instances, so a stuck runtime
//!   or a held lock stops the heartbeat and systemd restarts the daemon;
//! - `STOPPING=1` when shutdown begins.
//!
//! [`SelfNotify::take_from_env`] removes the three variables from the environment: the
//! keeper and the workloads must never inherit them (an instance gets a `NOTIFY_SOCKET` of
//! its own only when its readiness is `notify`, see `readiness`). Abstract-namespace
//! addresses (`@name`) and paths are supported; other kinds (`vsock:`) are ignored with a
//! warning. A send that fails is logged and otherwise ignored: the protocol is advisory.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

/// The supervisor's notify socket, and the watchdog interval it asked for.
#[derive(Debug)]
pub struct SelfNotify {
    sock: UnixDatagram,
    addr: SocketAddr,
    /// Where the messages go, for logs (`NOTIFY_SOCKET` as given).
    target: String,
    /// `WATCHDOG_USEC`: the supervisor restarts the daemon when no `WATCHDOG=1` arrives
    /// within this time.
    watchdog: Option<Duration>,
}

/// `NOTIFY_SOCKET` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={0}: not a path or an abstract address (@name)")]
    Address(String),
    #[error("NOTIFY_SOCKET={target}: {source}")]
    Socket {
        target: String,
        #[source]
        source: std::io::Error,
    },
}

const VARS: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

impl SelfNotify {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` and removes them from
    /// this process's environment (present or not, usable or not). `Ok(None)`: no
    /// supervisor asked.
    ///
    /// Call it while the process has one thread (`main` does, before the async runtime
    /// starts): changing the environment races with any other thread reading it.
    pub fn take_from_env() -> Result<Option<SelfNotify>, NotifyError> {
        let vals: Vec<Option<String>> = VARS
            .iter()
            .map(|k| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned()))
            .collect();
        for k in VARS {
            std::env::remove_var(k);
        }
        let Some(target) = vals[0].clone().filter(|t| !t.is_empty()) else {
            return Ok(None);
        };
        let watchdog =
            watchdog_interval(vals[1].as_deref(), vals[2].as_deref(), std::process::id());
        SelfNotify::connect(&target, watchdog).map(Some)
    }

    /// A notifier for `target` (a `NOTIFY_SOCKET` value).
    pub fn connect(target: &str, watchdog: Option<Duration>) -> Result<SelfNotify, NotifyError> {
        let addr = parse_address(target)?;
        let err = |source| NotifyError::Socket {
            target: target.to_owned(),
            source,
        };
        let sock = UnixDatagram::unbound().map_err(err)?;
        // A full receive queue must not block the runtime: the message is dropped instead.
        sock.set_nonblocking(true).map_err(err)?;
        Ok(SelfNotify {
            sock,
            addr,
            target: target.to_owned(),
            watchdog,
        })
    }

    /// The interval the supervisor expects heartbeats within (`WATCHDOG_USEC`).
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one message (newline-separated `KEY=value` lines); failures are logged.
    pub fn send(&self, msg: &str) {
        if let Err(e) = self.sock.send_to_addr(msg.as_bytes(), &self.addr) {
            tracing::warn!("cannot notify the supervisor at {}: {e}", self.target);
        }
    }
}

/// `@name` is an abstract address, `/path` a file.
fn parse_address(target: &str) -> Result<SocketAddr, NotifyError> {
    let err = |source| NotifyError::Socket {
        target: target.to_owned(),
        source,
    };
    if let Some(name) = target.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes()).map_err(err)
    } else if target.starts_with('/') {
        SocketAddr::from_pathname(target).map_err(err)
    } else {
        Err(NotifyError::Address(target.to_owned()))
    }
}

/// The heartbeat deadline from `WATCHDOG_USEC`, unless `WATCHDOG_PID` names another
/// process (the variables were meant for a parent that exec'd us without clearing them).
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|n| *n > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(me) {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// What `STATUS=` says now: `degraded: <reason>` while `health` would say degraded, else
/// `serving N instances`.
fn status(sh: &crate::Shared) -> String {
    match crate::standard::not_ready(sh) {
        Some(reason) => format!("degraded: {reason}"),
        None => {
            let n = sh.live_count();
            format!("serving {n} instance{}", if n == 1 { "" } else { "s" })
        }
    }
}

/// Sends `READY=1` with the first status, then keeps the status current and, when the
/// supervisor asked for it, the watchdog fed. The task runs on the daemon's runtime and
/// computes the status (registry lock included) before each heartbeat: a runtime that
/// no longer polls its tasks, or a registry lock that is never released, stops it.
pub(crate) fn start(n: Arc<SelfNotify>, sh: Arc<crate::Shared>) -> tokio::task::JoinHandle<()> {
    let mut last = status(&sh);
    n.send(&format!("READY=1\nSTATUS={last}"));
    tracing::info!("told the supervisor we are ready ({last})");
    let period = n
        .watchdog()
        .map(|w| (w / 2).max(Duration::from_millis(1)))
        .unwrap_or(Duration::from_secs(5));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if sh.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
                // The shutdown sent STOPPING=1; the heartbeat goes on while instances stop
                // (a long grace must not look like a hang).
                if n.watchdog().is_some() {
                    n.send("WATCHDOG=1");
                }
                continue;
            }
            let now = status(&sh);
            let mut msg = String::new();
            if n.watchdog().is_some() {
                msg.push_str("WATCHDOG=1\n");
            }
            if now != last {
                msg.push_str(&format!("STATUS={now}\n"));
                last = now;
            }
            if !msg.is_empty() {
                n.send(msg.trim_end());
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_needs_a_positive_usec_and_our_pid() {
        assert_eq!(
            watchdog_interval(Some("2000000"), None, 7),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            watchdog_interval(Some("2000000"), Some("7"), 7),
            Some(Duration::from_secs(2))
        );
        assert_eq!(watchdog_interval(Some("2000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("x"), None, 7), None);
        assert_eq!(watchdog_interval(None, Some("7"), 7), None);
    }

    #[test]
    fn addresses_abstract_path_and_other() {
        use std::os::linux::net::SocketAddrExt;
        let a = parse_address("@bulkhead-test").unwrap();
        assert_eq!(a.as_abstract_name(), Some(&b"bulkhead-test"[..]));
        let p = parse_address("/run/systemd/notify").unwrap();
        assert_eq!(
            p.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        assert!(matches!(
            parse_address("vsock:2:1234"),
            Err(NotifyError::Address(_))
        ));
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("bulkhead-notify-unit-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
            .unwrap();
        let n = SelfNotify::connect(&format!("@{name}"), None).unwrap();
        n.send("READY=1");
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
    }
}
