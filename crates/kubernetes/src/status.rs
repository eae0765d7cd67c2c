//! What a Pod object says about its instance: started, ready, ended (how), or unable to
//! start. Pure, so that recorded watch streams can be replayed against it.

use bulkhead_core::event::ExitStatus;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};

use crate::pod::CONTAINER;

/// The reading of one Pod object.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    /// The container has started (it runs, or it ran and ended).
    pub started: bool,
    /// The Pod's `Ready` condition is `True`.
    pub ready: bool,
    /// The container (or the Pod) ended.
    pub ended: Option<Ended>,
    /// The container cannot start and will not by itself (image pull, bad config): the
    /// reason and message.
    pub stuck: Option<String>,
    /// The Pod is being deleted (`deletionTimestamp` set).
    pub deleting: bool,
    /// The runtime could not start the container's program (`StartError`,
    /// `ContainerCannotRun`: a missing program, a bad entrypoint): its message.
    pub exec_failed: Option<String>,
}

/// How an instance's Pod ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub status: ExitStatus,
    /// The container's `reason` was `OOMKilled`.
    pub oom_killed: bool,
    /// The Pod was evicted by its node (`status.reason: Evicted`): its message.
    pub evicted: Option<String>,
    /// The container's or Pod's reason, for the log.
    pub reason: Option<String>,
}

/// Waiting reasons after which the container will not start without a change: the spawn
/// fails (bulkhead's restart policy decides what comes next).
const STUCK: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// A container's exit as an exit status. The runtime reports a signal death as
/// `128 + n` (`signal` is set by few runtimes): as the docker driver, 129..=192 is that
/// signal, so `exit 137` and SIGKILL are indistinguishable (a documented limit).
pub fn exit_status(t: &ContainerStateTerminated) -> ExitStatus {
    if let Some(sig) = t.signal.filter(|&s| s > 0) {
        return ExitStatus::Signaled {
            signal: sig,
            core_dumped: false,
        };
    }
    match t.exit_code {
        129..=192 => ExitStatus::Signaled {
            signal: t.exit_code - 128,
            core_dumped: false,
        },
        c @ 0..=255 => ExitStatus::Exited { code: c },
        // Unknown (the runtime lost it).
        _ => killed(),
    }
}

/// What an instance that vanished without a recorded exit reports.
pub fn killed() -> ExitStatus {
    ExitStatus::Signaled {
        signal: 9,
        core_dumped: false,
    }
}

/// Reads a Pod.
pub fn observe(pod: &Pod) -> Observed {
    let mut o = Observed {
        deleting: pod.metadata.deletion_timestamp.is_some(),
        ..Observed::default()
    };
    let Some(st) = &pod.status else { return o };
    o.ready = st
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let main = st
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == CONTAINER);
    let state = main.and_then(|c| c.state.as_ref());
    if let Some(s) = state {
        if s.running.is_some() {
            o.started = true;
        }
        if let Some(t) = &s.terminated {
            if matches!(
                t.reason.as_deref(),
                Some("StartError") | Some("ContainerCannotRun")
            ) && t.started_at.is_none()
            {
                o.exec_failed = Some(
                    t.message
                        .clone()
                        .unwrap_or_else(|| t.reason.clone().unwrap_or_default()),
                );
            } else {
                o.started = true;
            }
            o.ended = Some(Ended {
                status: exit_status(t),
                oom_killed: t.reason.as_deref() == Some("OOMKilled"),
                evicted: None,
                reason: t.reason.clone(),
            });
        }
        if let Some(w) = &s.waiting {
            if let Some(r) = w.reason.as_deref().filter(|r| STUCK.contains(r)) {
                o.stuck = Some(match &w.message {
                    Some(m) => format!("{r}: {m}"),
                    None => r.to_owned(),
                });
            }
        }
    }
    let phase = st.phase.as_deref();
    if matches!(phase, Some("Failed") | Some("Succeeded")) {
        let evicted = (st.reason.as_deref() == Some("Evicted"))
            .then(|| st.message.clone().unwrap_or_else(|| "evicted".into()));
        match &mut o.ended {
            Some(e) => e.evicted = evicted,
            // Failed with no container exit recorded (evicted before the kubelet wrote
            // one, or the node lost): killed.
            None => {
                o.ended = Some(Ended {
                    status: if phase == Some("Succeeded") {
                        ExitStatus::Exited { code: 0 }
                    } else {
                        killed()
                    },
                    oom_killed: false,
                    reason: st.reason.clone(),
                    evicted,
                })
            }
        }
    }
    if o.ended.is_some() {
        o.ready = false;
        o.stuck = None;
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn exit_codes_and_signals_map_to_statuses() {
        let t = |code, signal| ContainerStateTerminated {
            exit_code: code,
            signal,
            ..Default::default()
        };
        assert_eq!(exit_status(&t(3, None)), ExitStatus::Exited { code: 3 });
        assert_eq!(
            exit_status(&t(143, None)),
            ExitStatus::Signaled {
                signal: 15,
                core_dumped: false
            }
        );
        assert_eq!(
            exit_status(&t(0, Some(6))),
            ExitStatus::Signaled {
                signal: 6,
                core_dumped: false
            }
        );
        assert_eq!(exit_status(&t(-1, None)), killed());
    }

    #[test]
    fn a_pull_error_is_stuck_and_a_pending_pod_is_not() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "w"},
            "status": {"phase": "Pending", "containerStatuses": [{
                "name": "main", "image": "nope", "imageID": "", "ready": false,
                "restartCount": 0,
                "state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}}
            }]}
        }));
        let o = observe(&p);
        assert_eq!(o.stuck.as_deref(), Some("ErrImagePull: not found"));
        assert!(!o.started);
        let p = pod(serde_json::json!({
            "metadata": {"name": "w"},
            "status": {"phase": "Pending", "containerStatuses": [{
                "name": "main", "image": "x", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}
            }]}
        }));
        assert_eq!(observe(&p), Observed::default());
    }
}
