//! Faults that only a wall can contain, through the sandbox driver: a fork bomb, a memory
//! hog, a CPU hog and a workload that escapes its process group with `setsid`. Skipped,
//! with the reason, where the daemon reports the sandbox driver unavailable.

use serde_json::Value;

use crate::harness::*;
use crate::support::*;

fn sandbox(d: &Daemon) -> bool {
    let h = d.json(&["health", "-o", "json"]);
    if h["sandbox"]["available"] != true {
        eprintln!(
            "skipped: the sandbox driver is unavailable: {}",
            h["sandbox"]["error"]
        );
        return false;
    }
    true
}

fn usage(d: &Daemon, id: &str) -> Value {
    d.json(&["get", id, "-o", "json"])["usage"].clone()
}

#[test]
fn a_fork_bomb_stops_at_the_pids_limit_and_the_host_is_unharmed() {
    let mark = marker("bomb");
    // The main shell `exec`s its sleep: a fork there could find every pid taken by the
    // bomb, and the shell would exit ("cannot fork"), ending the instance before the test
    // can read its usage (seen once, under load).
    let m = format!(
        "name: bomb\ndriver: sandbox\ncommand: [/bin/sh, -c, 'b() {{ b | b & }}; b; exec sleep 1000']\nenv: {{FAULT_MARK: {mark}}}\nresources: {{pids: 32, memory: 256Mi}}\nshutdown: {{grace: 1s}}\n"
    );
    let d = Daemon::start(&[("bomb", &m)]);
    if !sandbox(&d) {
        return;
    }
    d.json(&["launch", "bomb", "--namespace", "x", "-o", "json"]);
    // The limit is hit, visibly, and holds.
    wait_until("forks refused at pids.max", || {
        usage(&d, "ns:x:bomb")["pids_limit_hits"]
            .as_u64()
            .unwrap_or(0)
            > 0
    });
    let u = usage(&d, "ns:x:bomb");
    assert!(u["pids"].as_u64().unwrap_or(0) <= 32, "{u}");
    assert!(
        d.cli(&["health"]).status.success(),
        "the daemon is unharmed"
    );
    let t = d.json(&["terminate", "ns:x:bomb", "-o", "json"]);
    assert_eq!(t["state"], "terminated");
    wait_until("every process of the bomb is gone", || {
        marked(&mark).is_empty()
    });
}

#[test]
fn a_memory_hog_is_reported_oom_killed_with_its_limit() {
    let mark = marker("hog");
    let m = format!(
        "name: hog\ndriver: sandbox\ncommand: [/bin/sh, -c, 'x=aaaaaaaaaaaaaaaa; while :; do x=$x$x; done']\nenv: {{FAULT_MARK: {mark}}}\nresources: {{memory: 32Mi}}\n"
    );
    let d = Daemon::start(&[("hog", &m)]);
    if !sandbox(&d) {
        return;
    }
    let _ = d.cli(&["launch", "hog", "--namespace", "x", "--wait", "started"]);
    let e = d.wait_event("oom_killed", |e| {
        e["instance"] == "ns:x:hog" && e["kind"] == "oom_killed"
    });
    assert_eq!(e["limit_bytes"], 32 << 20, "{e}");
    assert!(
        !d.events()
            .iter()
            .any(|e| e["instance"] == "ns:x:hog" && e["kind"] == "crashed"),
        "reported as an OOM kill, not a bare crash"
    );
    wait_until("the hog is gone", || marked(&mark).is_empty());
}

#[test]
fn a_cpu_hog_is_throttled_and_the_throttling_is_visible() {
    let mark = marker("spin");
    let m = format!(
        "name: spin\ndriver: sandbox\ncommand: [/bin/sh, -c, 'while :; do :; done']\nenv: {{FAULT_MARK: {mark}}}\nresources: {{cpu: 0.2}}\n"
    );
    let d = Daemon::start(&[("spin", &m)]);
    if !sandbox(&d) {
        return;
    }
    d.json(&["launch", "spin", "--namespace", "x", "-o", "json"]);
    wait_until("throttled time shows in usage", || {
        usage(&d, "ns:x:spin")["cpu_throttled_seconds"]
            .as_f64()
            .unwrap_or(0.0)
            > 0.0
    });
    let t = d.json(&["terminate", "ns:x:spin", "-o", "json"]);
    assert_eq!(t["state"], "terminated");
    wait_until("the spinner is gone", || marked(&mark).is_empty());
}

#[test]
fn a_workload_that_leaves_its_session_is_still_torn_down_with_its_cgroup() {
    let mark = marker("escape");
    // setsid leaves the process group (the process driver's unit); the sandbox's PID
    // namespace and cgroup still hold it.
    let m = format!(
        "name: escape\ndriver: sandbox\ncommand: [/bin/sh, -c, '(setsid sleep 1000 &); exec sleep 1000']\nenv: {{FAULT_MARK: {mark}}}\n"
    );
    let d = Daemon::start(&[("escape", &m)]);
    if !sandbox(&d) {
        return;
    }
    d.json(&["launch", "escape", "--namespace", "x", "-o", "json"]);
    wait_until("both processes run", || marked(&mark).len() >= 2);
    let t = d.json(&["terminate", "ns:x:escape", "-o", "json"]);
    assert_eq!(t["state"], "terminated");
    wait_until("the escaped process is gone too", || {
        marked(&mark).is_empty()
    });
}
