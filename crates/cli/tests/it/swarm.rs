//! The swarm driver through the real daemon on the real three-node swarm of
//! `.ci/setup-swarm.sh` (manager + 2 workers, each an engine in its own network
//! namespace). Every test prints why it skips when the swarm is missing.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

pub(crate) const IMAGE: &str = "bulkhead-test/busybox:latest";

/// The manager the tests (and the daemons they start) use.
pub(crate) fn manager() -> String {
    std::env::var("BULKHEAD_SWARM_HOST")
        .unwrap_or_else(|_| "unix:///run/bulkhead-swarm/mgr.sock".to_owned())
}

/// `docker -H <host> args...`, its stdout (trimmed) or a panic naming the failure.
pub(crate) fn docker(host: &str, args: &[&str]) -> String {
    let out = Command::new("docker").arg("-H").arg(host).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker -H {host} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Why the swarm tests cannot run here, if they cannot.
pub(crate) fn skip() -> Option<String> {
    let out = Command::new("docker")
        .args(["-H", &manager(), "info", "--format", "{{.Swarm.LocalNodeState}}"])
        .output();
    match out {
        Ok(o) if o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "active" => {
            None
        }
        Ok(o) => Some(format!(
            "no active swarm manager at {} ({}); run .ci/setup-swarm.sh",
            manager(),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("no docker CLI ({e}); run .ci/setup-swarm.sh")),
    }
}

macro_rules! require_swarm {
    () => {
        if let Some(why) = skip() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

pub(crate) fn daemon_id(d: &Daemon) -> String {
    std::fs::read_to_string(d.state.join("daemon-id"))
        .unwrap()
        .trim()
        .to_owned()
}

/// The services carrying `label`.
pub(crate) fn services(label: &str) -> Vec<String> {
    let out = docker(&manager(), &["service", "ls", "-q", "--filter", &format!("label={label}")]);
    out.lines().map(str::to_owned).collect()
}

/// Waits until no service of this daemon is left.
pub(crate) fn wait_no_services(d: &Daemon) {
    let label = format!("bulkhead.daemon={}", daemon_id(d));
    let start = Instant::now();
    loop {
        let left = services(&label);
        if left.is_empty() {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "services {left:?} left\n{}", d.daemon_log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The running task of instance `id`: (its node's engine address, its container id, its
/// node's host name).
pub(crate) fn running_task(id: &str) -> (String, String, String) {
    let start = Instant::now();
    loop {
        let svc = services(&format!("bulkhead.instance={id}"));
        if let [svc] = svc.as_slice() {
            let line = docker(
                &manager(),
                &[
                    "service", "ps", svc, "--filter", "desired-state=running", "-q", "--no-trunc",
                ],
            );
            if let Some(task) = line.lines().next() {
                let t: serde_json::Value = serde_json::from_str(&docker(
                    &manager(),
                    &["inspect", "--format", "{{json .}}", task],
                ))
                .unwrap();
                let container = t["Status"]["ContainerStatus"]["ContainerID"]
                    .as_str()
                    .unwrap_or_default();
                let node = t["NodeID"].as_str().unwrap_or_default();
                let parts = [node, t["Status"]["State"].as_str().unwrap_or_default(), container];
                if !container.is_empty() && parts[1] == "running" {
                    let engine = docker(
                        &manager(),
                        &[
                            "node", "inspect", "--format",
                            "{{index .Spec.Labels \"bulkhead.engine\"}} {{.Description.Hostname}}",
                            parts[0],
                        ],
                    );
                    let (addr, host) = engine.split_once(' ').unwrap();
                    return (addr.to_owned(), parts[2].to_owned(), host.to_owned());
                }
            }
        }
        assert!(start.elapsed() < DEADLINE, "no running task for {id}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) fn manifest(name: &str, script: &str, extra: &str) -> String {
    format!(
        "name: {name}\ndriver: swarm\ncommand: [/bin/sh, -c, '{script}']\n{extra}swarm:\n  image: {IMAGE}\n"
    )
}

pub(crate) fn start(workloads: &[(&str, &str)]) -> Daemon {
    Daemon::start_with_args(workloads, &["--swarm-host", &manager()])
}

#[test]
fn swarm_launches_one_service_per_key_with_its_logs_and_terminate_leaves_none() {
    require_swarm!();
    let m = manifest("hello", "echo hello-from-swarm; exec sleep 1000", "");
    let d = start(&[("hello", &m)]);
    let mut ids = Vec::new();
    for ns in ["a", "b"] {
        let v = d.json(&["launch", "hello", "--namespace", ns, "-o", "json"]);
        assert_eq!(v["state"], "ready", "{v}\n{}", d.daemon_log());
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    // The same key again is the same instance, not a second service.
    let again = d.json(&["launch", "hello", "--namespace", "a", "-o", "json"]);
    assert_eq!(again["id"], ids[0].as_str());
    for id in &ids {
        assert_eq!(services(&format!("bulkhead.instance={id}")).len(), 1, "one service for {id}");
    }
    let start = Instant::now();
    loop {
        let logs = d.cli(&["logs", &ids[0]]);
        if String::from_utf8_lossy(&logs.stdout).contains("hello-from-swarm") {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "no task output in the logs");
        std::thread::sleep(Duration::from_millis(100));
    }
    for id in &ids {
        let out = d.cli(&["terminate", id]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    wait_no_services(&d);
}

#[test]
fn a_killed_task_is_crashed_and_bulkheads_policy_starts_the_next_run() {
    require_swarm!();
    let m = manifest(
        "victim",
        "exec sleep 1000",
        "restart: {policy: always, backoff: {initial: 100ms}}\n",
    );
    let d = start(&[("victim", &m)]);
    let v = d.json(&["launch", "victim", "--namespace", "t", "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let (engine, container, _) = running_task(&id);
    // Killed behind bulkhead's back, on the task's own node.
    docker(&engine, &["kill", &container]);
    let ev = d.wait_event("crashed", |e| e["instance"] == id && e["kind"] == "crashed");
    assert!(ev.to_string().contains('9'), "SIGKILL is reported: {ev}");
    // bulkhead's policy (not the swarm's, whose restart condition is none) makes a new
    // run: a new service with a new container.
    let (_, next, _) = running_task(&id);
    assert_ne!(next, container, "the next run is a new container");
    assert_eq!(services(&format!("bulkhead.instance={id}")).len(), 1);
    let out = d.cli(&["terminate", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_no_services(&d);
}

#[test]
#[ignore = "needs the daemon's exec to accept an instance without a host pid whose driver gives exec_argv (daemon/src/exec.rs, the lead's side of issue 16)"]
fn swarm_exec_runs_in_the_tasks_container() {
    require_swarm!();
    let m = manifest("ex", "exec sleep 1000", "");
    let d = start(&[("ex", &m)]);
    let v = d.json(&["launch", "ex", "--namespace", "t", "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    // The busybox image's file system, on the task's node, with the real exit code.
    let seven = d.cli(&["exec", &id, "--", "sh", "-c", "test -x /bin/busybox && exit 7"]);
    assert_eq!(seven.status.code(), Some(7), "{}", stderr(&seven));
    let out = d.cli(&["terminate", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_no_services(&d);
}

#[test]
#[ignore = "needs the daemon to follow InstanceHandle::engine_readiness (the lead's side of issue 16)"]
fn swarm_readiness_comes_from_the_tasks_health_check() {
    require_swarm!();
    let m = manifest(
        "slow",
        "sleep 1; touch /tmp/ok; exec sleep 1000",
        "readiness:\n  timeout: 30s\n  exec: {command: [test, -f, /tmp/ok], period: 200ms}\n",
    );
    let d = start(&[("slow", &m)]);
    let v = d.json(&["launch", "slow", "--namespace", "t", "-o", "json"]);
    assert_eq!(v["state"], "ready", "{v}\n{}", d.daemon_log());
    let id = v["id"].as_str().unwrap().to_owned();
    // Ready only once the marker exists in the task's container.
    let (engine, container, _) = running_task(&id);
    docker(&engine, &["exec", &container, "test", "-f", "/tmp/ok"]);
    let out = d.cli(&["terminate", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_no_services(&d);
}
