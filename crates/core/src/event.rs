//! Lifecycle events and exit statuses.
//!
//! The core decides *which* event happens ([`EventKind`]); the daemon stamps it with a
//! monotonic id and a wall-clock time ([`Event`]) and publishes it.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::key::InstanceId;
use crate::signal::Signal;

/// How a process ended, exactly as the kernel said: an exit code, or a signal and whether
/// it dumped core. Never collapsed into one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ExitStatus {
    Exited { code: i32 },
    Signaled { signal: i32, core_dumped: bool },
}

impl ExitStatus {
    pub fn success(self) -> bool {
        matches!(self, ExitStatus::Exited { code: 0 })
    }

    pub fn code(self) -> Option<i32> {
        match self {
            ExitStatus::Exited { code } => Some(code),
            ExitStatus::Signaled { .. } => None,
        }
    }

    pub fn signal(self) -> Option<i32> {
        match self {
            ExitStatus::Signaled { signal, .. } => Some(signal),
            ExitStatus::Exited { .. } => None,
        }
    }

    pub fn core_dumped(self) -> bool {
        matches!(
            self,
            ExitStatus::Signaled {
                core_dumped: true,
                ..
            }
        )
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitStatus::Exited { code } => write!(f, "exit code {code}"),
            ExitStatus::Signaled {
                signal,
                core_dumped,
            } => {
                let name = Signal::from_number(signal)
                    .map(Signal::name)
                    .unwrap_or_else(|| signal.to_string());
                write!(f, "signal {name}")?;
                if core_dumped {
                    f.write_str(" (core dumped)")?;
                }
                Ok(())
            }
        }
    }
}

/// What happened to an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum EventKind {
    /// A launch created the instance.
    Launched,
    /// The driver started its process.
    Started { pid: Option<u32> },
    /// Every readiness signal passed.
    Ready,
    /// The launch failed: spawn error, exit during start-up, readiness timeout.
    /// `failure_kind` says which, for machines (absent in events stored before it).
    LaunchFailed {
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        failure_kind: Option<crate::failure::FailureKind>,
    },
    /// The process exited by itself with a code.
    Exited { exit_code: i32 },
    /// The process was killed by a signal it did not get from a termination.
    Crashed { signal: i32, core_dumped: bool },
    /// The kernel's OOM killer ended the instance at its memory limit (`limit_bytes`,
    /// when one was set); `signal` is what the main process died of.
    OomKilled {
        limit_bytes: Option<u64>,
        signal: i32,
    },
    /// A termination began: `signal` to the process group, SIGKILL after `grace_ms`.
    Terminating { signal: i32, grace_ms: u64 },
    /// Every process of the instance is gone after a stop bulkhead started (`status` is
    /// absent when no process was running, e.g. during a restart backoff).
    Terminated { status: Option<ExitStatus> },
    /// The restart policy starts the instance again after `delay_ms`.
    Restarting { attempt: u32, delay_ms: u64 },
    /// Too many consecutive failed runs: no more restarts, launches of the key fail fast.
    BreakerOpen { failures: u32, reason: String },
    /// The cooldown passed: one trial run is allowed.
    BreakerHalfOpen,
    /// A healthy run closed the breaker.
    BreakerClosed,
    /// A ready instance's readiness probe failed `failure_threshold` times (not killed).
    Unhealthy { reason: String },
    /// The liveness probe failed `failure_threshold` times; the instance is stopped and
    /// its restart policy applies.
    LivenessFailed { reason: String },
    /// The sd_notify watchdog ran out or was triggered; the instance is stopped with the
    /// watchdog signal and its restart policy applies.
    WatchdogTimeout { reason: String },
    /// A restart was asked for (`bulkhead restart`, a rollout, a dependency's restart):
    /// the current run is stopped gracefully and a new one starts at once, with the same
    /// key and address. It is not a failure and does not count toward the breaker.
    RestartRequested { reason: String },
    /// A restarted daemon took a running instance back under supervision.
    Adopted { pid: Option<u32> },
    /// The instance's processes died of nothing they did: a restarted daemon found them
    /// gone without an exit status (they died unseen, e.g. with their keeper), or the
    /// daemon saw them killed with their keeper when it died; `reason` says which. Its
    /// restart policy applies.
    Lost { reason: String },
    /// The data plane found a node of `peer` (an instance id, or the node's name when it
    /// was not a workload's) dead on `channel` (a service name), and reclaimed its shared
    /// memory (`reclaimed` false: the cleanup failed and is retried by the next scan).
    ChannelPeerDead {
        channel: String,
        peer: String,
        reclaimed: bool,
    },
    /// Right after `launched`: the dependencies (instance ids) this instance was gated on
    /// had all reached their conditions (`depends_on`).
    DependenciesReady { dependencies: Vec<String> },
    /// A dependency (an instance id) restarted and this instance's manifest says
    /// `on_dependency_restart: restart`: this instance is restarted for it.
    DependencyRestarted { dependency: String },
}

impl EventKind {
    /// The kind's name as shown in the API, JSON and the CLI.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Launched => "launched",
            EventKind::Started { .. } => "started",
            EventKind::Ready => "ready",
            EventKind::LaunchFailed { .. } => "launch_failed",
            EventKind::Exited { .. } => "exited",
            EventKind::Crashed { .. } => "crashed",
            EventKind::OomKilled { .. } => "oom_killed",
            EventKind::Terminating { .. } => "terminating",
            EventKind::Terminated { .. } => "terminated",
            EventKind::Restarting { .. } => "restarting",
            EventKind::BreakerOpen { .. } => "breaker_open",
            EventKind::BreakerHalfOpen => "breaker_half_open",
            EventKind::BreakerClosed => "breaker_closed",
            EventKind::Unhealthy { .. } => "unhealthy",
            EventKind::LivenessFailed { .. } => "liveness_failed",
            EventKind::WatchdogTimeout { .. } => "watchdog_timeout",
            EventKind::RestartRequested { .. } => "restart_requested",
            EventKind::Adopted { .. } => "adopted",
            EventKind::Lost { .. } => "lost",
            EventKind::ChannelPeerDead { .. } => "channel_peer_dead",
            EventKind::DependenciesReady { .. } => "dependencies_ready",
            EventKind::DependencyRestarted { .. } => "dependency_restarted",
        }
    }

    /// The event for a process that ended by itself.
    pub fn for_exit(status: ExitStatus) -> EventKind {
        match status {
            ExitStatus::Exited { code } => EventKind::Exited { exit_code: code },
            ExitStatus::Signaled {
                signal,
                core_dumped,
            } => EventKind::Crashed {
                signal,
                core_dumped,
            },
        }
    }
}

/// A published event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Strictly increasing, starting at 1, without gaps.
    pub id: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub instance: InstanceId,
    pub kind: EventKind,
}
