//! The swarm driver through the real daemon on the real three-node swarm of
//! `.ci/setup-swarm.sh` (manager + 2 workers, each an engine in its own network
//! namespace). Every test prints why it skips when the swarm is missing.

use std::time::{Duration, Instant};

use crate::harness::*;
use crate::swarm_support::*;

macro_rules! require_swarm {
    () => {
        if let Some(why) = skip() {
            eprintln!("skipped: {why}");
            return;
        }
    };
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
        assert_eq!(
            services(&format!("bulkhead.instance={id}")).len(),
            1,
            "one service for {id}"
        );
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
    let seven = d.cli(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "test -x /bin/busybox && exit 7",
    ]);
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
