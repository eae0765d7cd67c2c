//! The `swarm` driver: one Docker Swarm service per key, through the manager's Engine API
//! ([bollard](https://docs.rs/bollard), the connection and exit-code helpers of
//! `bulkhead-docker`).
//!
//! **What a run is.** A launch creates one service (one replica, restart condition
//! `none`, labelled `bulkhead.daemon=<daemon id>` and `bulkhead.instance=<instance id>`,
//! on the service and its containers). Its one task is the run: when the task ends, the
//! service is removed and the exit is reported with the task's exit code; bulkhead's own
//! restart policy and breaker then decide about the next run (a new service). The swarm
//! never restarts anything by itself.
//!
//! **How tasks are watched.** Swarm emits no task events. One shared poller per driver
//! lists this daemon's tasks (`GET /tasks?filters=label=bulkhead.daemon=<id>`) and the
//! nodes (`GET /nodes`) every [`DEFAULT_POLL`] (100 ms) and routes each task's state to
//! its handle: one request pair per period whatever the number of instances, answered from
//! the manager's in-memory store (about 1.5 KB of JSON per task), and nothing at all while
//! no run is watched and no node is down. Measured (`docs/benchmarks.md`): about 30 ms of
//! the manager's CPU per second with 10 instances (their log streams included); a crash
//! is seen about one period after the manager learns of it. Node-local container events
//! would be faster but need every node's engine, which a swarm does not promise; they are
//! used only where a node is reachable (exec, signals, fencing). A spawn polls its own
//! new service every 10 ms until the task has started, so that a launch does not wait for
//! the shared period.
//!
//! **Readiness** is the task's health check: the manifest's readiness probe becomes the
//! container's `HEALTHCHECK` (exec: the command; tcp: `nc`; http: `wget`, both run inside
//! the task and found in its image), with its period, timeout and failure threshold and
//! the readiness timeout as the start period. A task with a health check stays `starting`
//! until it passes, then is `running`: [`InstanceHandle::engine_readiness`](bulkhead_driver::InstanceHandle::engine_readiness) follows that.
//! Once running, a failing health check makes the engine stop the task (a crash).
//!
//! **Fencing.** After a partition, the manager marks the cut-off node down; bulkhead
//! reports the run lost (SIGKILL), removes its service and its restart policy places the
//! key again, on another node. The old container keeps running on the cut-off node, out
//! of anyone's reach, until the node returns: then the poller sees the node ready again,
//! lists that node's containers of this daemon through the node's engine (node label
//! `bulkhead.engine=<address>`), and removes every one whose task is not a live task of
//! this daemon, logging each (`fenced a stale copy ...`). Without that label the swarm
//! itself stops the stale task when the node returns (its desired state is `shutdown`),
//! after the stop grace. What remains: during the partition two copies of the key run.
//!
//! **Stop.** The stop signal goes to the task's container through its node's engine,
//! SIGKILL at the deadline, then the service is removed; where the node cannot be
//! reached, the service is removed at once and the engine applies the service's stop
//! signal and grace (the manifest's `shutdown`). **Logs** follow the service's log stream
//! into the instance's [`bulkhead_driver::OutputTap`]; an ended run waits until its
//! output has been quiet for 50 ms (at most 500 ms) before its service is removed.
//!
//! **Recovery.** [`Driver::recover`](bulkhead_driver::Driver::recover) lists this
//! daemon's services by label (their task's state gives the exit of those that ended
//! meanwhile); a service name is fixed per key and daemon, so a key never gets a second
//! service while one exists, even when recovery could not reach the manager.
//!
//! **Documented limits.** No pid and no host-side usage (`stats` reports the limits
//! only); exec and signals other than a stop need the task's node reachable through its
//! `bulkhead.engine` label; a missing program is found before the service is created
//! only where a ready node with that label has the image (elsewhere it is a run that
//! exits 127).

pub mod driver;
pub mod task;

pub use driver::{Service, SwarmDriver, DEFAULT_POLL, LABEL_ENGINE};
