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
fn without_a_swarm_manager_a_swarm_workload_is_refused_naming_the_driver() {
    // No swarm needed: the daemon is started without --swarm-host.
    let d = Daemon::start(&[("noswarm", &manifest("noswarm", "exec sleep 1000", ""))]);
    let o = d.cli(&["launch", "noswarm", "--namespace", "t"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("swarm is not available in this daemon"),
        "{}",
        stderr(&o)
    );
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
fn crashing_tasks_open_bulkheads_breaker_and_each_run_is_one_service() {
    require_swarm!();
    let m = manifest(
        "crashy",
        "exit 3",
        "restart: {policy: on-failure, max_failures: 3, cooldown: 60s, backoff: {initial: 20ms, jitter: 0}}\n",
    );
    let d = start(&[("crashy", &m)]);
    let _ = d.cli(&["launch", "crashy", "--namespace", "t", "--wait", "started"]);
    let id = "ns:t:crashy";
    d.wait_event("breaker_open", |e| {
        e["instance"] == id && e["kind"] == "breaker_open"
    });
    let evs: Vec<_> = d
        .events()
        .into_iter()
        .filter(|e| e["instance"] == id)
        .collect();
    let exits: Vec<_> = evs.iter().filter(|e| e["kind"] == "exited").collect();
    assert_eq!(exits.len(), 3, "{evs:#?}");
    assert!(
        exits.iter().all(|e| e["exit_code"] == 3),
        "the task's exit code: {evs:#?}"
    );
    // While open, launches fail fast; every run's service is gone.
    let o = d.cli(&["launch", "crashy", "--namespace", "t"]);
    assert!(
        stderr(&o).contains("circuit breaker open"),
        "{}",
        stderr(&o)
    );
    wait_no_services(&d);
    let out = d.cli(&["terminate", id]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn after_a_daemon_crash_its_service_is_adopted_and_orphans_are_removed() {
    require_swarm!();
    let m = manifest("kept", "exec sleep 1000", "restart: {policy: never}\n");
    let mut d = start(&[("kept", &m)]);
    let v = d.json(&["launch", "kept", "--namespace", "t", "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let before = services(&format!("bulkhead.instance={id}"));
    assert_eq!(before.len(), 1);
    let (_, container, _) = running_task(&id);
    // A service of this daemon the instance table does not know (left by a crash
    // between create and record), and one of another daemon.
    let me = format!("bulkhead.daemon={}", daemon_id(&d));
    let create = |labels: &[&str], name: &str| {
        let mut args = vec!["service", "create", "-d", "-q", "--name", name];
        for l in labels {
            args.extend(["--label", l]);
        }
        args.extend(["--restart-condition", "none", IMAGE, "sleep", "1000"]);
        docker(&manager(), &args)
    };
    let tag = std::process::id().to_string();
    let orphan = create(
        &[&me, "bulkhead.instance=ns:t:gone"],
        &format!("orphan-{tag}"),
    );
    let other = create(&["bulkhead.daemon=someone-else"], &format!("other-{tag}"));
    d.kill9();
    d.spawn();
    let v2 = d.json(&["get", &id, "-o", "json"]);
    assert_eq!(v2["state"], "ready", "{v2}\n{}", d.daemon_log());
    assert_eq!(
        services(&format!("bulkhead.instance={id}")),
        before,
        "the same service"
    );
    assert!(d
        .events()
        .iter()
        .any(|e| e["kind"] == "adopted" && e["instance"] == id));
    let start = Instant::now();
    while services(&me).contains(&orphan[..12].to_owned()) {
        assert!(
            start.elapsed() < DEADLINE,
            "the orphan service was not removed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let still = services("bulkhead.daemon=someone-else");
    docker(&manager(), &["service", "rm", &other]);
    assert!(
        still.iter().any(|s| other.starts_with(s.as_str())),
        "another daemon's service was touched"
    );
    // The adopted run is watched: a kill of its container is seen.
    let (engine, now, _) = running_task(&id);
    assert_eq!(now, container, "the same task");
    docker(&engine, &["kill", &container]);
    let ev = d.wait_event("crashed", |e| e["instance"] == id && e["kind"] == "crashed");
    assert!(ev.to_string().contains('9'), "{ev}");
    wait_no_services(&d);
}

#[test]
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
