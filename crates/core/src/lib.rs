//! bulkhead's pure core.
//!
//! Everything here is data and decisions, nothing here touches the kernel, the file system,
//! the network or a clock: **invariant — the core never does I/O.** The daemon feeds it
//! inputs (a process was spawned, it exited, readiness passed, a timer fired, a user asked
//! to terminate) and carries out the effects it returns (spawn, stop, start readiness,
//! emit an event). That keeps every race in the shell, where it is commented, and lets the
//! lifecycle be tested exhaustively and fast.
//!
//! - [`name`]: validated workload, namespace and session names.
//! - [`key`]: isolation levels, isolation keys and the instance ids derived from them.
//! - [`port`]: the range of ports handed to instances and the pick from it.
//! - [`lease`]: lease holder names and the per-instance lease limit.
//! - [`deps`]: `depends_on`: dependency keys, the graph's checks and layers.
//! - [`spec`]: manifests (YAML) parsed and validated into [`spec::WorkloadSpec`].
//! - [`instance`]: the instance lifecycle state machine.
//! - [`event`]: lifecycle events and exit statuses; [`failure`]: why a launch failed.
//! - [`expand`]: `${VAR}` expansion of a command line.
//! - [`text`]: free text from untrusted sources made safe to store and to print.
//! - [`channels`]: the data plane's channels (`channels:`), scoped service names.
//! - [`execution`]: the process basics (`working_dir`, `env_file`, `user`, `limits`,
//!   `umask`) and [`envfile`], the dotenv format.
//! - [`sockets`]: listening sockets the daemon owns (`sockets:`, `activation:`).
//! - [`size`]: byte sizes (`512Mi`); [`sandbox`], [`docker`] and [`kubernetes`]: the
//!   driver sections of a manifest.
//!
//! ```
//! use bulkhead_core::spec::parse_manifest;
//! use bulkhead_core::key::{Isolation, Key};
//!
//! let spec = parse_manifest("web/manifest.yaml", "web", "name: web\ncommand: [./server]\n").unwrap();
//! assert_eq!(spec.isolation, Isolation::Namespace);
//! let key = Key::new(&spec.name, spec.isolation, Some("team-a"), None).unwrap();
//! assert_eq!(key.instance_id().as_str(), "ns:team-a:web");
//! ```

pub mod channels;
pub mod deps;
pub mod docker;
pub mod duration;
pub mod envfile;
pub mod event;
pub mod execution;
pub mod expand;
pub mod failure;
pub mod instance;
pub mod key;
pub mod kubernetes;
pub mod lease;
pub mod logline;
pub mod name;
pub mod port;
pub mod recovery;
pub mod restart;
pub mod sandbox;
pub mod signal;
pub mod size;
pub mod sockets;
pub mod spec;
pub mod swarm;
pub mod text;
pub mod time;
pub mod warm;
