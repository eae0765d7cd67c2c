//! Why a launch failed, for machines: the `failure_kind` of a `launch_failed` event,
//! beside its free-text reason.
//!
//! A spawn error keeps its kind from the driver that raised it (`SpawnError::kind` in
//! `bulkhead-driver`) through the core's `SpawnFailed` to the event, the API and the
//! CLI; the core adds the kinds of the failures it decides itself (an exit or a
//! readiness timeout during start-up).

use std::fmt;

use serde::{Deserialize, Serialize};

/// What failed. The names (`as_str`) are the API's and never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The program could not be executed (not found, not executable, a bad interpreter).
    Exec,
    /// The program started but could not be watched; it was killed.
    Watch,
    /// Something the instance needs before its program runs could not be made: its
    /// working directory, user, limits, cgroup, mounts, restrictions, id mapping, output
    /// pipes, sockets, notify socket, `env_file`s or channels.
    Setup,
    /// The launch cannot be carried out as asked: an empty command, a NUL byte, an unset
    /// `${VAR}`, a driver or a section this daemon does not have.
    Invalid,
    /// The keeper that runs process instances could not be reached or failed (not the
    /// program).
    Keeper,
    /// The container engine refused or failed (unreachable, create, attach, start).
    Engine,
    /// The container image is not in the engine or could not be built.
    Image,
    /// A limit of the host or the daemon is reached: memory below the floor, every
    /// keeper full, no port or id range left.
    Exhausted,
    /// The run ended during start-up (an exit, a signal, the OOM killer).
    Exited,
    /// The main process exited 0 and left its processes behind (it daemonized).
    Daemonized,
    /// Not ready within the readiness timeout.
    ReadinessTimeout,
    /// A restart because a dependency restarted could not be carried out.
    Dependency,
}

impl FailureKind {
    pub const ALL: [FailureKind; 12] = [
        FailureKind::Exec,
        FailureKind::Watch,
        FailureKind::Setup,
        FailureKind::Invalid,
        FailureKind::Keeper,
        FailureKind::Engine,
        FailureKind::Image,
        FailureKind::Exhausted,
        FailureKind::Exited,
        FailureKind::Daemonized,
        FailureKind::ReadinessTimeout,
        FailureKind::Dependency,
    ];

    /// The name in the API, JSON and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Exec => "exec",
            FailureKind::Watch => "watch",
            FailureKind::Setup => "setup",
            FailureKind::Invalid => "invalid",
            FailureKind::Keeper => "keeper",
            FailureKind::Engine => "engine",
            FailureKind::Image => "image",
            FailureKind::Exhausted => "exhausted",
            FailureKind::Exited => "exited",
            FailureKind::Daemonized => "daemonized",
            FailureKind::ReadinessTimeout => "readiness_timeout",
            FailureKind::Dependency => "dependency",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_serde_names_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for k in FailureKind::ALL {
            assert_eq!(
                serde_json::to_value(k).unwrap(),
                serde_json::json!(k.as_str())
            );
            assert!(seen.insert(k.as_str()), "{k} twice");
        }
    }
}
