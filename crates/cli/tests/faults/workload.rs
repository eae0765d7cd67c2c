//! Workloads that misbehave are contained and reported for what they are.

use std::time::Duration;

use serde_json::Value;

use crate::harness::*;
use crate::support::*;

fn of<'a>(events: &'a [Value], id: &str, kind: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["instance"] == id && e["kind"] == kind)
        .collect()
}

fn pid_of(d: &Daemon, id: &str) -> Option<u32> {
    let v = d.json(&["get", id, "-o", "json"]);
    (v["state"] == "ready").then(|| v["pid"].as_u64().map(|p| p as u32))?
}

#[test]
fn sigkill_and_sigsegv_storms_are_each_reported_and_restarted() {
    let mark = marker("storm");
    let m = format!(
        "name: storm\ncommand: [/bin/sleep, '1000']\nisolation: none\nenv: {{FAULT_MARK: {mark}}}\nrestart: {{policy: always, max_failures: 100000, backoff: {{initial: 5ms, max: 10ms}}}}\n"
    );
    let d = Daemon::start(&[("storm", &m)]);
    d.json(&["launch", "storm", "-o", "json"]);
    let n = scale(20, 200);
    let mut last = 0;
    for i in 0..n {
        let mut pid = 0;
        wait_until("the next run", || {
            pid = pid_of(&d, "shared:storm").unwrap_or(0);
            pid != 0 && pid != last
        });
        let sig = if i % 2 == 0 {
            libc::SIGKILL
        } else {
            libc::SIGSEGV
        };
        // SAFETY: kill(2) on the pid of an instance this test owns.
        unsafe {
            libc::kill(pid as i32, sig);
        }
        last = pid;
    }
    wait_until("the last crash is reported", || {
        of(&d.events(), "shared:storm", "crashed").len() >= n
    });
    let ev = d.events();
    let crashed = of(&ev, "shared:storm", "crashed");
    assert_eq!(
        crashed.iter().filter(|e| e["signal"] == 9).count(),
        n.div_ceil(2)
    );
    assert_eq!(crashed.iter().filter(|e| e["signal"] == 11).count(), n / 2);
    assert!(of(&ev, "shared:storm", "restarting").len() >= n);
    wait_until("one process after the storm", || {
        per_instance(&mark).get("shared:storm").map(Vec::len) == Some(1)
    });
    assert!(
        d.cli(&["health"]).status.success(),
        "the daemon is unharmed"
    );
}

#[test]
fn readiness_that_never_comes_fails_the_launch_and_leaves_nothing() {
    let mark = marker("never");
    let m = format!(
        "name: mute\ncommand: [/bin/sleep, '1000']\nenv: {{FAULT_MARK: {mark}}}\nreadiness: {{notify: true, timeout: 300ms}}\n"
    );
    let d = Daemon::start(&[("mute", &m)]);
    let out = d.cli(&["launch", "mute", "--namespace", "x"]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "launch failed: {}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("readiness timeout"),
        "{}",
        stderr(&out)
    );
    let ev = d.events();
    assert_eq!(of(&ev, "ns:x:mute", "launch_failed").len(), 1);
    wait_until("the never-ready process is gone", || {
        marked(&mark).is_empty()
    });
}

#[test]
fn liveness_that_flaps_restarts_each_time_it_fails() {
    let mark = marker("flap");
    let d = Daemon::start(&[]);
    let flag = d.dir.path().join("alive");
    std::fs::write(&flag, "").unwrap();
    let m = format!(
        "name: flap\ncommand: [/bin/sleep, '1000']\nisolation: none\nenv: {{FAULT_MARK: {mark}}}\nliveness: {{exec: {{command: [/bin/test, -e, {f}], period: 30ms, failure_threshold: 2}}}}\nrestart: {{policy: always, max_failures: 1000, backoff: {{initial: 5ms}}}}\n",
        f = flag.display()
    );
    write_workload(&d.workloads, "flap", &m, &[]);
    assert!(d.cli(&["reload"]).status.success());
    d.json(&["launch", "flap", "-o", "json"]);
    for round in 1..=3 {
        let before = pid_of(&d, "shared:flap").expect("ready");
        std::fs::remove_file(&flag).unwrap();
        wait_until("liveness fails", || {
            of(&d.events(), "shared:flap", "liveness_failed").len() == round
        });
        assert!(wait_gone(before), "the failing run was stopped");
        std::fs::write(&flag, "").unwrap();
        wait_until("a new healthy run", || {
            pid_of(&d, "shared:flap").is_some_and(|p| p != before)
        });
    }
    // Healthy again: it stays.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(of(&d.events(), "shared:flap", "liveness_failed").len(), 3);
}

#[test]
fn a_process_that_ignores_sigterm_is_killed_after_the_grace() {
    let mark = marker("stubborn");
    let m = format!(
        "name: stubborn\ncommand: [/bin/sh, -c, \"trap '' TERM; while :; do sleep 0.05; done\"]\nenv: {{FAULT_MARK: {mark}}}\nshutdown: {{grace: 200ms}}\n"
    );
    let d = Daemon::start(&[("stubborn", &m)]);
    d.json(&["launch", "stubborn", "--namespace", "s", "-o", "json"]);
    let t = d.json(&["terminate", "ns:s:stubborn", "-o", "json"]);
    assert_eq!(t["state"], "terminated");
    let ev = d.events();
    let term = of(&ev, "ns:s:stubborn", "terminated");
    assert_eq!(term[0]["signal"], 9, "killed, not exited: {term:?}");
    wait_until("the whole group is gone", || marked(&mark).is_empty());
}

#[test]
fn a_double_forked_daemon_is_stopped_with_its_instance() {
    let mark = marker("daemonize");
    // The classic double fork: the grandchild is orphaned (reparented to the subreaper)
    // but stays in the instance's process group.
    let m = format!(
        "name: forker\ncommand: [/bin/sh, -c, '(sleep 1000 &); exec sleep 1000']\nenv: {{FAULT_MARK: {mark}}}\n"
    );
    let d = Daemon::start(&[("forker", &m)]);
    d.json(&["launch", "forker", "--namespace", "f", "-o", "json"]);
    wait_until("both processes run", || marked(&mark).len() == 2);
    let t = d.json(&["terminate", "ns:f:forker", "-o", "json"]);
    assert_eq!(t["state"], "terminated");
    wait_until("the orphaned grandchild is gone too", || {
        marked(&mark).is_empty()
    });
}
