//! The pure half of the driver: what service a spawn creates, and what a task's state
//! means for its instance.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bollard::models::{
    HealthConfig, Limit, Mount, MountType, ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated,
    Task, TaskSpec, TaskSpecContainerSpec, TaskSpecPlacement, TaskSpecResources,
    TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum, TaskState,
};
use bulkhead_core::spec::{Readiness, WorkloadSpec};
use bulkhead_core::swarm::SwarmSpec;
use bulkhead_docker::engine::{LABEL_DAEMON, LABEL_INSTANCE, LABEL_WORKLOAD};
use bulkhead_driver::{SpawnError, SpawnSpec};

/// The service name of `instance` for daemon `daemon_id`: readable, unique per key and
/// daemon, and valid for the engine (at most 63 characters of `[a-zA-Z0-9_.-]`).
pub fn service_name(daemon_id: &str, workload: &str, instance: &str) -> String {
    // FNV-1a over the daemon id and the instance id: stable across daemon restarts.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in daemon_id.bytes().chain([0]).chain(instance.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    let readable: String = workload
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(32)
        .collect();
    format!("bh-{readable}-{h:016x}")
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// The container health check for the manifest's readiness probe (one at most; checked
/// when the manifest is read). `port` is the instance's `$PORT`.
pub fn health_check(r: &Readiness, port: Option<u16>) -> Option<HealthConfig> {
    let (test, timing) = if let Some(e) = &r.exec {
        let mut t = vec!["CMD".to_owned()];
        t.extend(e.command.iter().cloned());
        (t, e.timing)
    } else if let Some(t) = &r.tcp {
        let port = t.port.or(port)?;
        (
            vec![
                "CMD-SHELL".to_owned(),
                format!("nc -w 1 127.0.0.1 {port} </dev/null >/dev/null 2>&1"),
            ],
            t.timing(),
        )
    } else if let Some(h) = &r.http {
        let port = h.port.or(port)?;
        let scheme = match h.scheme {
            bulkhead_core::spec::Scheme::Http => "http",
            bulkhead_core::spec::Scheme::Https => "https",
        };
        (
            vec![
                "CMD".to_owned(),
                "wget".to_owned(),
                "-q".to_owned(),
                "-O".to_owned(),
                "/dev/null".to_owned(),
                format!("{scheme}://{}:{port}{}", h.host, h.path),
            ],
            h.timing(),
        )
    } else {
        return None;
    };
    Some(HealthConfig {
        test: Some(test),
        interval: Some(nanos(timing.period)),
        timeout: Some(nanos(timing.timeout)),
        retries: Some(i64::from(timing.failure_threshold)),
        // Failures before the first pass do not count, as bulkhead's own readiness
        // probes: only the readiness timeout ends a launch that never gets ready.
        start_period: Some(nanos(r.timeout)),
        start_interval: None,
    })
}

/// The service a spawn creates.
pub fn service_spec(
    spec: &SpawnSpec,
    sw: &SwarmSpec,
    daemon_id: &str,
) -> Result<ServiceSpec, SpawnError> {
    let w: &WorkloadSpec = &spec.spec;
    let labels = HashMap::from([
        (LABEL_DAEMON.to_owned(), daemon_id.to_owned()),
        (LABEL_INSTANCE.to_owned(), spec.instance.as_str().to_owned()),
        (LABEL_WORKLOAD.to_owned(), w.name.clone()),
    ]);
    let mounts: Vec<Mount> = spec
        .binds
        .iter()
        .map(|b| Mount {
            target: Some(b.target.display().to_string()),
            source: Some(b.source.display().to_string()),
            typ: Some(MountType::BIND),
            read_only: Some(false),
            ..Default::default()
        })
        .collect();
    let under_bind = spec
        .binds
        .iter()
        .any(|b| Path::new(&spec.cwd).starts_with(&b.target));
    let dir = match sw.workdir.as_ref().or(w.working_dir.as_ref()) {
        Some(d) => Some(d.clone()),
        None if under_bind => {
            if !spec.cwd.is_dir() {
                return Err(SpawnError::Setup {
                    instance: spec.instance.as_str().to_owned(),
                    step: bulkhead_driver::SetupStep::WorkingDir,
                    reason: format!("cannot start in {}: no such directory", spec.cwd.display()),
                });
            }
            Some(spec.cwd.display().to_string())
        }
        None => None,
    };
    let user = match (&w.user, &w.group) {
        (Some(u), Some(g)) => Some(format!("{u}:{g}")),
        (Some(u), None) => Some(u.clone()),
        _ => None,
    };
    let port = spec
        .env
        .iter()
        .find(|(k, _)| k == "PORT")
        .and_then(|(_, v)| v.parse::<u16>().ok());
    let res = w.resources.clone().unwrap_or_default();
    let limits = Limit {
        nano_cpus: res.cpu.map(|c| (c * 1e9) as i64),
        memory_bytes: res.memory.map(|m| m as i64),
        pids: res.pids.map(i64::from),
    };
    let ulimits = if w.limits.is_empty() {
        None
    } else {
        let to = |v: Option<u64>| v.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
        let limits = bulkhead_core::execution::resolve_limits(&w.limits).map_err(|(f, r)| {
            SpawnError::Invalid {
                instance: spec.instance.as_str().to_owned(),
                reason: format!("{f}: {r}"),
            }
        })?;
        Some(
            limits
                .into_iter()
                .map(|l| bollard::models::ResourcesUlimits {
                    name: Some(l.name.to_owned()),
                    soft: Some(to(l.soft)),
                    hard: Some(to(l.hard)),
                })
                .collect(),
        )
    };
    let container = TaskSpecContainerSpec {
        image: Some(sw.image.clone()),
        labels: Some(labels.clone()),
        // The command replaces the image's (its entrypoint, if any, stays).
        args: Some(spec.argv.clone()),
        // The daemon's own variables stay out: the image's `ENV` applies unless the
        // manifest sets them.
        env: Some(
            spec.env
                .iter()
                .filter(|(k, _)| !spec.inherited.contains(k))
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
        ),
        dir,
        user,
        groups: (!w.groups.is_empty()).then(|| w.groups.clone()),
        mounts: (!mounts.is_empty()).then_some(mounts),
        stop_signal: Some(w.shutdown.signal.name().to_owned()),
        stop_grace_period: Some(nanos(w.shutdown.grace)),
        health_check: w.readiness.as_ref().and_then(|r| health_check(r, port)),
        init: Some(sw.init),
        ulimits,
        ..Default::default()
    };
    Ok(ServiceSpec {
        name: Some(service_name(daemon_id, &w.name, spec.instance.as_str())),
        labels: Some(labels),
        task_template: Some(TaskSpec {
            container_spec: Some(container),
            resources: Some(TaskSpecResources {
                limits: Some(limits),
                ..Default::default()
            }),
            // bulkhead's restart policy and breaker decide; the swarm restarts nothing.
            restart_policy: Some(TaskSpecRestartPolicy {
                condition: Some(TaskSpecRestartPolicyConditionEnum::NONE),
                max_attempts: Some(0),
                ..Default::default()
            }),
            placement: (!sw.constraints.is_empty()).then(|| TaskSpecPlacement {
                constraints: Some(sw.constraints.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// What a task's state means for its instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// Not started yet (scheduled, preparing); `err` is why it waits, if the engine says.
    Pending { err: Option<String> },
    /// The container runs and its health check has not passed yet.
    Starting,
    /// The container runs (healthy, or without a health check).
    Running,
    /// The task ended. `code`: the container's exit code, if it had one. `never_started`:
    /// it failed before its container ran (rejected: no image on the node; the
    /// container could not be created or started), with the engine's `err`.
    Ended {
        code: Option<i64>,
        never_started: bool,
        err: Option<String>,
    },
}

/// Reads a task's status.
pub fn observe(task: &Task) -> Observed {
    let st = task.status.clone().unwrap_or_default();
    let err = st.err.filter(|e| !e.is_empty());
    let cs = st.container_status.unwrap_or_default();
    let has_container = cs.container_id.as_deref().is_some_and(|c| !c.is_empty());
    match st.state {
        None
        | Some(TaskState::NEW)
        | Some(TaskState::ALLOCATED)
        | Some(TaskState::PENDING)
        | Some(TaskState::ASSIGNED)
        | Some(TaskState::ACCEPTED)
        | Some(TaskState::PREPARING)
        | Some(TaskState::READY) => Observed::Pending { err },
        Some(TaskState::STARTING) => Observed::Starting,
        Some(TaskState::RUNNING) => Observed::Running,
        Some(TaskState::COMPLETE) => Observed::Ended {
            code: Some(cs.exit_code.unwrap_or(0)),
            never_started: false,
            err,
        },
        Some(
            TaskState::FAILED
            | TaskState::SHUTDOWN
            | TaskState::REJECTED
            | TaskState::REMOVE
            | TaskState::ORPHANED,
        ) => {
            // A container that could not start carries the engine's "starting container
            // failed" (or no container at all: rejected).
            let never_started = matches!(st.state, Some(TaskState::REJECTED))
                || !has_container
                || err
                    .as_deref()
                    .is_some_and(|e| e.starts_with("starting container failed"));
            Observed::Ended {
                code: has_container.then_some(cs.exit_code).flatten(),
                never_started,
                err,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{ContainerStatus, TaskStatus};
    use bulkhead_core::spec::parse_manifest;
    use std::sync::Arc;

    fn spawn_spec(extra: &str) -> SpawnSpec {
        let text =
            format!("name: web\ncommand: [sh]\ndriver: swarm\nswarm: {{image: img}}\n{extra}");
        let w = parse_manifest("web/manifest.yaml", "web", &text).unwrap();
        SpawnSpec {
            instance: bulkhead_core::key::InstanceId::parse("ns:a:web").unwrap().0,
            argv: vec!["sh".into(), "-c".into(), "exit 0".into()],
            env: vec![
                ("PORT".into(), "8080".into()),
                ("PATH".into(), "/host/bin".into()),
            ],
            cwd: "/nonexistent".into(),
            spec: Arc::new(w),
            binds: Vec::new(),
            ids: None,
            inherited: vec!["PATH".into()],
            listen: Vec::new(),
        }
    }

    #[test]
    fn a_service_is_one_replica_labelled_with_the_daemon_and_key_that_never_restarts() {
        let s = spawn_spec(
            "resources: {memory: 64Mi, cpu: 0.5, pids: 50}\nshutdown: {signal: INT, grace: 3s}\n",
        );
        let sw = s.spec.swarm.clone().unwrap();
        let svc = service_spec(&s, &sw, "d1").unwrap();
        assert_eq!(
            svc.name.as_deref(),
            Some(service_name("d1", "web", "ns:a:web").as_str())
        );
        let labels = svc.labels.unwrap();
        assert_eq!(labels[LABEL_DAEMON], "d1");
        assert_eq!(labels[LABEL_INSTANCE], "ns:a:web");
        assert_eq!(svc.mode.unwrap().replicated.unwrap().replicas, Some(1));
        let t = svc.task_template.unwrap();
        assert_eq!(
            t.restart_policy.unwrap().condition,
            Some(TaskSpecRestartPolicyConditionEnum::NONE)
        );
        let l = t.resources.unwrap().limits.unwrap();
        assert_eq!(
            (l.memory_bytes, l.nano_cpus, l.pids),
            (Some(64 << 20), Some(500_000_000), Some(50))
        );
        let c = t.container_spec.unwrap();
        assert_eq!(c.labels.unwrap()[LABEL_INSTANCE], "ns:a:web");
        assert_eq!(c.image.as_deref(), Some("img"));
        assert_eq!(c.stop_signal.as_deref(), Some("SIGINT"));
        assert_eq!(c.stop_grace_period, Some(3_000_000_000));
        // The daemon's inherited PATH stays out; the manifest's own variables go in.
        assert_eq!(c.env.unwrap(), ["PORT=8080"]);
        assert_eq!(c.init, Some(true));
        assert!(c.health_check.is_none());
    }

    #[test]
    fn service_names_are_stable_valid_and_differ_per_key_and_daemon() {
        let a = service_name("d1", "web", "ns:a:web");
        assert_eq!(a, service_name("d1", "web", "ns:a:web"));
        assert_ne!(a, service_name("d1", "web", "ns:b:web"));
        assert_ne!(a, service_name("d2", "web", "ns:a:web"));
        let long = service_name("d", &"x".repeat(63), "ns:a:x");
        assert!(long.len() <= 63, "{long}");
        assert!(long
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)));
    }

    #[test]
    fn readiness_probes_become_the_health_check() {
        let s = spawn_spec(
            "readiness: {timeout: 30s, exec: {command: [test, -f, /tmp/ok], period: 250ms, failure_threshold: 2}}\n",
        );
        let sw = s.spec.swarm.clone().unwrap();
        let h = service_spec(&s, &sw, "d")
            .unwrap()
            .task_template
            .unwrap()
            .container_spec
            .unwrap()
            .health_check
            .unwrap();
        assert_eq!(h.test.unwrap(), ["CMD", "test", "-f", "/tmp/ok"]);
        assert_eq!(h.interval, Some(250_000_000));
        assert_eq!(h.retries, Some(2));
        assert_eq!(h.start_period, Some(30_000_000_000));
        let s = spawn_spec("readiness: {http: {path: /healthz}}\n");
        let h = health_check(s.spec.readiness.as_ref().unwrap(), Some(8080)).unwrap();
        assert_eq!(
            h.test.unwrap().last().unwrap(),
            "http://127.0.0.1:8080/healthz"
        );
        let s = spawn_spec("readiness: {tcp: {}}\n");
        let h = health_check(s.spec.readiness.as_ref().unwrap(), Some(9)).unwrap();
        assert!(h.test.unwrap()[1].contains("127.0.0.1 9"));
    }

    fn task(state: TaskState, code: Option<i64>, container: bool, err: Option<&str>) -> Task {
        Task {
            status: Some(TaskStatus {
                state: Some(state),
                err: err.map(str::to_owned),
                container_status: Some(ContainerStatus {
                    container_id: container.then(|| "c1".to_owned()),
                    pid: None,
                    exit_code: code,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn task_states_map_to_the_instances() {
        assert_eq!(
            observe(&task(
                TaskState::PENDING,
                None,
                false,
                Some("no suitable node")
            )),
            Observed::Pending {
                err: Some("no suitable node".into())
            }
        );
        assert_eq!(
            observe(&task(TaskState::STARTING, None, true, None)),
            Observed::Starting
        );
        assert_eq!(
            observe(&task(TaskState::RUNNING, None, true, None)),
            Observed::Running
        );
        assert_eq!(
            observe(&task(
                TaskState::FAILED,
                Some(7),
                true,
                Some("task: non-zero exit (7)")
            )),
            Observed::Ended {
                code: Some(7),
                never_started: false,
                err: Some("task: non-zero exit (7)".into())
            }
        );
        assert_eq!(
            observe(&task(TaskState::COMPLETE, Some(0), true, None)),
            Observed::Ended {
                code: Some(0),
                never_started: false,
                err: None
            }
        );
        let Observed::Ended { never_started, .. } = observe(&task(
            TaskState::REJECTED,
            None,
            false,
            Some("No such image: x"),
        )) else {
            panic!()
        };
        assert!(never_started);
        let Observed::Ended { never_started, .. } = observe(&task(
            TaskState::FAILED,
            Some(128),
            true,
            Some("starting container failed: OCI runtime create failed"),
        )) else {
            panic!()
        };
        assert!(never_started);
    }
}
