//! bulkhead's data plane: zero-copy shared-memory channels between a host and its
//! workloads, over [iceoryx2](https://docs.rs/iceoryx2).
//!
//! A workload's manifest declares `channels:` (inputs and outputs, each with a maximum
//! payload and a queue depth). The daemon creates one iceoryx2 publish-subscribe service of
//! byte slices per channel *before* it starts the instance ([`manager`]), hands the names
//! to the workload in its environment, and removes them (reclaiming the shared memory of a
//! crashed workload through iceoryx2's dead-node cleanup) when the instance goes.
//!
//! - Host side ([`Host`]): open an instance's input for publishing and its output for
//!   subscribing. Messages are loaned from shared memory ([`Publisher::loan`]) and
//!   received without a copy ([`Message`] derefs to the bytes in shared memory).
//! - Workload side ([`Workload`]): the channels from the environment, and sd_notify
//!   readiness ([`notify_ready`]).
//!
//! Ports are not `Send`: iceoryx2 ties a node and its ports to the thread that made them.
//! Waiting ([`Subscriber::recv_timeout`]) spins on the queue briefly, then blocks on the
//! channel's wake-up event (signalled by every send), and always ends at its deadline:
//! a dead peer never blocks the host forever.
//!
//! ```no_run
//! use std::time::Duration;
//! use bulkhead_sdk::{Host, Iox2};
//!
//! let host = Host::new(&Iox2::from_env()).unwrap();
//! let input = host.publisher("bulkhead/session/s1/echo/input", 4096).unwrap();
//! let output = host.subscriber("bulkhead/session/s1/echo/output", 4).unwrap();
//! input.send(b"hello").unwrap();
//! if let Some(msg) = output.recv_timeout(Duration::from_secs(1)).unwrap() {
//!     assert_eq!(&*msg, b"hello");
//! }
//! ```

use std::path::PathBuf;

use iceoryx2::prelude::*;

pub mod manager;
mod port;
pub mod space;
mod workload;

pub use bulkhead_core::channels::{Direction, ResolvedChannel};
pub use port::{Loan, Message, Publisher, Subscriber};
pub use workload::{
    notify, notify_extend_timeout, notify_main_pid, notify_ready, notify_reloading, notify_status,
    notify_stopping, notify_watchdog, watchdog_interval, Workload, WorkloadError,
};

/// The iceoryx2 service type every bulkhead channel uses (inter-process).
pub type Ipc = ipc::Service;

/// Which iceoryx2 installation the channels live in: the file prefix in `/dev/shm` (and
/// in the root directory), and the root directory (iceoryx2's default, `/tmp/iceoryx2`,
/// when `None`). The daemon picks one per state directory and passes it to workloads as
/// `BULKHEAD_IOX2_PREFIX` / `BULKHEAD_IOX2_ROOT`.
///
/// On the host, `space` names the channel space a walled instance's channels live in
/// ([`space`]): a [`Host`] enters it first. A workload never sets it: its walls already
/// show its space at the usual paths.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Iox2 {
    /// `None`: iceoryx2's default (`iox2_`).
    pub prefix: Option<String>,
    pub root: Option<PathBuf>,
    /// The host path of the channel space, if the channels are in one.
    pub space: Option<PathBuf>,
}

/// iceoryx2's default root directory.
pub const DEFAULT_ROOT: &str = "/tmp/iceoryx2";

impl Iox2 {
    /// From `BULKHEAD_IOX2_PREFIX` and `BULKHEAD_IOX2_ROOT` (each optional).
    pub fn from_env() -> Iox2 {
        let var = |k| std::env::var(k).ok().filter(|v: &String| !v.is_empty());
        Iox2 {
            prefix: var(bulkhead_core::channels::ENV_IOX2_PREFIX),
            root: var(bulkhead_core::channels::ENV_IOX2_ROOT).map(PathBuf::from),
            space: None,
        }
    }

    /// The root directory in force.
    pub fn root_dir(&self) -> PathBuf {
        self.root
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT))
    }

    /// The iceoryx2 configuration.
    pub fn config(&self) -> Result<Config, OpenError> {
        let mut cfg = Config::default();
        if let Some(p) = &self.prefix {
            cfg.global.prefix = FileName::new(p.as_bytes()).map_err(|e| OpenError::Config {
                what: format!("prefix {p:?}"),
                reason: format!("{e:?}"),
            })?;
        }
        if let Some(r) = &self.root {
            let path =
                Path::new(r.as_os_str().as_encoded_bytes()).map_err(|e| OpenError::Config {
                    what: format!("root {}", r.display()),
                    reason: format!("{e:?}"),
                })?;
            cfg.global.set_root_path(&path);
        }
        Ok(cfg)
    }
}

/// A node, a service or a port could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("invalid iceoryx2 {what}: {reason}")]
    Config { what: String, reason: String },
    #[error("cannot create iceoryx2 node: {0}")]
    Node(String),
    #[error("{0}")]
    Space(String),
    #[error("invalid channel service name {0:?}")]
    Name(String),
    #[error("cannot open channel {service}: {reason} (is the instance running?)")]
    Service { service: String, reason: String },
    #[error("cannot create a {port} on channel {service}: {reason}")]
    Port {
        port: &'static str,
        service: String,
        reason: String,
    },
}

/// The host's end of the data plane: one iceoryx2 node, on the thread that made it.
pub struct Host {
    node: Node<Ipc>,
}

impl Host {
    /// A host node in the given installation. With a channel space, the calling thread
    /// enters it first, for good ([`space::enter`]: root only).
    pub fn new(iox2: &Iox2) -> Result<Host, OpenError> {
        if let Some(sp) = &iox2.space {
            space::enter(sp, &iox2.root_dir()).map_err(|e| OpenError::Space(e.to_string()))?;
        }
        Ok(Host {
            node: new_node(iox2, &format!("bulkhead-host:{}", std::process::id()))?,
        })
    }

    /// Opens an instance's input channel for publishing messages of up to `max_payload`
    /// bytes.
    pub fn publisher(&self, service: &str, max_payload: usize) -> Result<Publisher, OpenError> {
        Publisher::open(&self.node, service, max_payload)
    }

    /// Opens an instance's output channel for receiving, keeping up to `depth` messages.
    pub fn subscriber(&self, service: &str, depth: usize) -> Result<Subscriber, OpenError> {
        Subscriber::open(&self.node, service, depth)
    }

    /// Opens the host's end of a resolved channel: a publisher for an input, a
    /// subscriber for an output.
    pub fn open(&self, ch: &ResolvedChannel) -> Result<HostEnd, OpenError> {
        Ok(match ch.direction {
            Direction::Input => {
                HostEnd::Publisher(self.publisher(&ch.service, ch.max_payload as usize)?)
            }
            Direction::Output => {
                HostEnd::Subscriber(self.subscriber(&ch.service, ch.depth as usize)?)
            }
        })
    }
}

/// The host's end of one channel.
pub enum HostEnd {
    Publisher(Publisher),
    Subscriber(Subscriber),
}

/// The node name of a workload of `instance`: `bulkhead:<instance id>`, cut to iceoryx2's
/// limit of 128 bytes (ids are ASCII). The daemon matches dead nodes to instances by it.
pub fn node_name(instance: &str) -> String {
    let mut n = format!("bulkhead:{instance}");
    n.truncate(128);
    n
}

/// A node that never installs signal handlers (the daemon and the host own theirs).
pub(crate) fn new_node(iox2: &Iox2, name: &str) -> Result<Node<Ipc>, OpenError> {
    let cfg = iox2.config()?;
    let name = NodeName::new(name).map_err(|e| OpenError::Node(format!("name {name:?}: {e:?}")))?;
    NodeBuilder::new()
        .config(&cfg)
        .name(&name)
        .signal_handling_mode(SignalHandlingMode::Disabled)
        .create::<Ipc>()
        .map_err(|e| OpenError::Node(format!("{e:?}")))
}

pub(crate) fn service_name(service: &str) -> Result<ServiceName, OpenError> {
    ServiceName::new(service).map_err(|_| OpenError::Name(service.to_owned()))
}

/// Files of this installation in `/dev/shm` and under its root directory (or in its
/// channel space's folders, read from the host without entering it; names that
/// start with its prefix), except the one `.global_mgmt` segment iceoryx2 keeps per
/// installation (a persistent node counter, not per channel). Empty when nothing of a
/// channel, node or port is left.
pub fn leftover_files(iox2: &Iox2) -> Vec<PathBuf> {
    let prefix = iox2.prefix.clone().unwrap_or_else(|| "iox2_".into());
    let mut out = Vec::new();
    let shm = match &iox2.space {
        Some(sp) => space::shm_dir(sp),
        None => PathBuf::from("/dev/shm"),
    };
    let mut dirs = vec![
        shm.clone(),
        iox2.space
            .as_deref()
            .map_or_else(|| iox2.root_dir(), space::root_dir),
    ];
    while let Some(d) = dirs.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            if d != shm && e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(path);
            } else if name.starts_with(&prefix) && !name.ends_with(".global_mgmt") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn node_names_fit_iceoryx2() {
        assert_eq!(
            super::node_name("session:s1:echo"),
            "bulkhead:session:s1:echo"
        );
        let long = format!("session:{}:{}", "s".repeat(63), "w".repeat(63));
        let n = super::node_name(&long);
        assert_eq!(n.len(), 128);
        assert!(iceoryx2::prelude::NodeName::new(&n).is_ok());
    }

    #[test]
    fn config_takes_prefix_and_root() {
        let cfg = super::Iox2 {
            prefix: Some("iox2_bhunit_".into()),
            root: Some("/tmp/iceoryx2".into()),
            space: None,
        }
        .config()
        .unwrap();
        assert!(format!("{:?}", cfg.global.root_path()).contains("/tmp/iceoryx2"));
        assert!(format!("{:?}", cfg.global.prefix).contains("iox2_bhunit_"));
        assert!(super::Iox2 {
            prefix: Some("bad/prefix".into()),
            root: None,
            space: None,
        }
        .config()
        .is_err());
    }
}
