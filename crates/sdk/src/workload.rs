//! The workload's end: its channels as the daemon handed them over in the environment,
//! and sd_notify readiness.

use std::collections::BTreeMap;

use bulkhead_core::channels::{self, Direction, ENV_PREFIX};
use iceoryx2::prelude::*;

use crate::{new_node, Iox2, Ipc, OpenError, Publisher, Subscriber};

/// The workload side could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("environment variable {var} is invalid: {reason}")]
    Env { var: String, reason: String },
    #[error("this workload has no {direction} channel {name:?} (declared: {declared})")]
    Unknown {
        direction: &'static str,
        name: String,
        declared: String,
    },
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("cannot send an sd_notify message to {socket}: {source}")]
    Notify {
        socket: String,
        #[source]
        source: std::io::Error,
    },
}

/// One declared channel, as read from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvChannel {
    pub service: String,
    pub max_payload: u64,
    pub depth: u32,
}

/// A workload's channels, read from `BULKHEAD_CHANNEL_IN_*` / `BULKHEAD_CHANNEL_OUT_*`, on
/// a node named after the instance (`BULKHEAD_INSTANCE`), so that the daemon can tell
/// whose node died.
pub struct Workload {
    node: Node<Ipc>,
    inputs: BTreeMap<String, EnvChannel>,
    outputs: BTreeMap<String, EnvChannel>,
}

impl Workload {
    /// From the process environment.
    pub fn from_env() -> Result<Workload, WorkloadError> {
        Self::from_vars(std::env::vars())
    }

    /// From the given variables (the environment, in tests).
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Workload, WorkloadError> {
        let (mut inputs, mut outputs) = (BTreeMap::new(), BTreeMap::new());
        let mut iox2 = Iox2::default();
        let mut instance = None;
        for (k, v) in vars {
            if k == channels::ENV_IOX2_PREFIX && !v.is_empty() {
                iox2.prefix = Some(v);
                continue;
            }
            if k == channels::ENV_IOX2_ROOT && !v.is_empty() {
                iox2.root = Some(v.into());
                continue;
            }
            if k == "BULKHEAD_INSTANCE" {
                instance = Some(v);
                continue;
            }
            let Some(rest) = k.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let (map, name) = if let Some(n) = rest.strip_prefix("IN_") {
                (&mut inputs, n)
            } else if let Some(n) = rest.strip_prefix("OUT_") {
                (&mut outputs, n)
            } else {
                continue;
            };
            let (service, max_payload, depth) =
                channels::parse_env_value(&v).map_err(|reason| WorkloadError::Env {
                    var: k.clone(),
                    reason,
                })?;
            map.insert(
                name.to_ascii_lowercase(),
                EnvChannel {
                    service,
                    max_payload,
                    depth,
                },
            );
        }
        let name = match instance {
            Some(i) => crate::node_name(&i),
            None => format!("bulkhead-workload:{}", std::process::id()),
        };
        Ok(Workload {
            node: new_node(&iox2, &name)?,
            inputs,
            outputs,
        })
    }

    /// The declared channels, by name.
    pub fn channels(&self, direction: Direction) -> &BTreeMap<String, EnvChannel> {
        match direction {
            Direction::Input => &self.inputs,
            Direction::Output => &self.outputs,
        }
    }

    fn find(&self, direction: Direction, name: &str) -> Result<&EnvChannel, WorkloadError> {
        let map = self.channels(direction);
        map.get(name).ok_or_else(|| WorkloadError::Unknown {
            direction: direction.as_str(),
            name: name.to_owned(),
            declared: map.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }

    /// Subscribes to the input channel `name`.
    pub fn input(&self, name: &str) -> Result<Subscriber, WorkloadError> {
        let c = self.find(Direction::Input, name)?;
        Ok(Subscriber::open(&self.node, &c.service, c.depth as usize)?)
    }

    /// Publishes on the output channel `name`.
    pub fn output(&self, name: &str) -> Result<Publisher, WorkloadError> {
        let c = self.find(Direction::Output, name)?;
        Ok(Publisher::open(
            &self.node,
            &c.service,
            c.max_payload as usize,
        )?)
    }
}

/// Sends one sd_notify message (`KEY=VALUE` lines) to `$NOTIFY_SOCKET`. Returns false,
/// sending nothing, when the variable is not set (the manifest does not ask for notify
/// readiness), so a program can call the helpers unconditionally. An abstract socket
/// (`@name`) works too.
pub fn notify(message: &str) -> Result<bool, WorkloadError> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let fail = |source| WorkloadError::Notify {
        socket: path.to_string_lossy().into_owned(),
        source,
    };
    let sock = std::os::unix::net::UnixDatagram::unbound().map_err(fail)?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name).map_err(fail)?;
        sock.send_to_addr(message.as_bytes(), &addr).map_err(fail)?;
    } else {
        sock.send_to(message.as_bytes(), &path).map_err(fail)?;
    }
    Ok(true)
}

/// `READY=1`: the instance serves (also after a reload).
pub fn notify_ready() -> Result<(), WorkloadError> {
    notify("READY=1").map(drop)
}

/// `STATUS=...`: shown by `bulkhead get` (256 bytes at most).
pub fn notify_status(text: &str) -> Result<(), WorkloadError> {
    notify(&format!("STATUS={}", text.replace('\n', " "))).map(drop)
}

/// `STOPPING=1`: the instance is shutting down by itself.
pub fn notify_stopping() -> Result<(), WorkloadError> {
    notify("STOPPING=1").map(drop)
}

/// `RELOADING=1`: not ready until the next [`notify_ready`].
pub fn notify_reloading() -> Result<(), WorkloadError> {
    notify("RELOADING=1").map(drop)
}

/// `WATCHDOG=1`: alive; with `trigger`, `WATCHDOG=trigger`: treat this instance as having
/// missed its watchdog (it is stopped and its restart policy applies).
pub fn notify_watchdog(trigger: bool) -> Result<(), WorkloadError> {
    notify(if trigger {
        "WATCHDOG=trigger"
    } else {
        "WATCHDOG=1"
    })
    .map(drop)
}

/// `EXTEND_TIMEOUT_USEC=`: while starting, the readiness deadline is at least `by` away.
pub fn notify_extend_timeout(by: std::time::Duration) -> Result<(), WorkloadError> {
    notify(&format!("EXTEND_TIMEOUT_USEC={}", by.as_micros())).map(drop)
}

/// `MAINPID=`: from now on `pid` (a process of this instance, e.g. the child a
/// daemonizing program forked) is the instance's main process: the run ends when it
/// exits, with its status.
pub fn notify_main_pid(pid: u32) -> Result<(), WorkloadError> {
    notify(&format!("MAINPID={pid}")).map(drop)
}

/// The watchdog interval (`$WATCHDOG_USEC`, for this process if `$WATCHDOG_PID` says
/// so), or `None` without one. Send [`notify_watchdog`] at least twice per interval.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| std::time::Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    /// The helpers send systemd's messages to `$NOTIFY_SOCKET`, and nothing without it.
    /// (The only test of this crate that touches the variable.)
    #[test]
    fn the_notify_helpers_send_what_systemd_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        std::env::remove_var("NOTIFY_SOCKET");
        assert!(!super::notify("READY=1").unwrap());
        std::env::set_var("NOTIFY_SOCKET", &path);
        let got = |sent: Result<(), super::WorkloadError>| {
            sent.unwrap();
            let mut buf = [0u8; 128];
            let n = sock.recv(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        assert_eq!(got(super::notify_main_pid(4242)), "MAINPID=4242");
        assert_eq!(got(super::notify_ready()), "READY=1");
        assert_eq!(got(super::notify_reloading()), "RELOADING=1");
        assert_eq!(got(super::notify_watchdog(true)), "WATCHDOG=trigger");
        assert_eq!(
            got(super::notify_extend_timeout(
                std::time::Duration::from_millis(1500)
            )),
            "EXTEND_TIMEOUT_USEC=1500000"
        );
        std::env::remove_var("NOTIFY_SOCKET");
    }
}
