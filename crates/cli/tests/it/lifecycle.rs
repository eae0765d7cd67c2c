//! Exit fidelity, termination, and the daemon's own shutdown.

use std::time::{Duration, Instant};

use crate::harness::*;

#[test]
fn crash_and_exit_are_reported_with_full_fidelity() {
    let d = Daemon::start(&[
        (
            "segv",
            "name: segv\ncommand: [/bin/sh, -c, 'sleep 0.1; kill -SEGV $$']\n",
        ),
        (
            "exit42",
            "name: exit42\ncommand: [/bin/sh, -c, 'sleep 0.1; exit 42']\n",
        ),
    ]);
    d.json(&["launch", "segv", "-o", "json"]);
    d.json(&["launch", "exit42", "-o", "json"]);
    let c = d.wait_event("segv crashed", |e| {
        e["kind"] == "crashed" && e["instance"] == "ns:default:segv"
    });
    assert_eq!(c["signal"], 11);
    assert!(c["core_dumped"].is_boolean());
    let x = d.wait_event("exit42 exited", |e| {
        e["kind"] == "exited" && e["instance"] == "ns:default:exit42"
    });
    assert_eq!(x["exit_code"], 42);
    let s = d.json(&["get", "ns:default:segv", "-o", "json"]);
    assert_eq!(s["state"], "crashed");
    assert_eq!(s["last_exit"]["signal"], 11);
    assert!(s["last_exit"]["code"].is_null());
    let e = d.json(&["get", "ns:default:exit42", "-o", "json"]);
    assert_eq!(e["state"], "exited");
    assert_eq!(e["last_exit"]["code"], 42);
    // A new launch of an exited key starts a new process.
    let again = d.json(&["launch", "exit42", "-o", "json"]);
    assert_eq!(again["created"], true);
}

#[test]
fn external_kill_is_seen_as_a_crash() {
    let d = Daemon::start(&[(
        "sleeper",
        "name: sleeper\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n",
    )]);
    let v = d.json(&["launch", "sleeper", "-o", "json"]);
    let pid = v["pid"].as_u64().unwrap() as i32;
    // SAFETY: kill(2) on a pid the daemon just reported as its live instance.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let e = d.wait_event("crashed", |e| e["kind"] == "crashed");
    assert_eq!(e["signal"], 9);
    assert_eq!(e["core_dumped"], false);
}

#[test]
fn terminate_escalates_to_sigkill_after_the_grace_and_kills_the_tree() {
    // Ignores SIGTERM, and so does its grandchild.
    let d = Daemon::start(&[(
        "stubborn",
        "name: stubborn\ncommand: [/bin/sh, -c, 'trap \"\" TERM; (trap \"\" TERM; while :; do sleep 0.05; done) & echo $! > gc.pid; while :; do sleep 0.05; done']\nshutdown: {signal: SIGTERM, grace: 500ms}\n",
    )]);
    let v = d.json(&["launch", "stubborn", "-o", "json"]);
    let pid = v["pid"].as_u64().unwrap() as u32;
    let gc_file = d.workloads.join("stubborn/gc.pid");
    let start = Instant::now();
    while std::fs::read_to_string(&gc_file)
        .map(|s| s.trim().is_empty())
        .unwrap_or(true)
    {
        assert!(start.elapsed() < DEADLINE);
        std::thread::sleep(Duration::from_millis(10));
    }
    let gc: u32 = std::fs::read_to_string(&gc_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(gc));
    let t = Instant::now();
    let out = d.json(&["terminate", "ns:default:stubborn", "-o", "json"]);
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "SIGKILL only after the grace"
    );
    assert_eq!(out["state"], "terminated");
    assert_eq!(out["last_exit"]["signal"], 9);
    assert!(!alive(pid), "main process gone when terminate returns");
    assert!(wait_gone(gc), "grandchild died with the group");
    let kinds: Vec<String> = d
        .events()
        .iter()
        .filter(|e| e["instance"] == "ns:default:stubborn")
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        kinds,
        vec!["launched", "started", "ready", "terminating", "terminated"]
    );
    // --grace overrides the manifest.
    d.json(&["launch", "stubborn", "-o", "json"]);
    let out = d.json(&[
        "terminate",
        "ns:default:stubborn",
        "--grace",
        "0s",
        "-o",
        "json",
    ]);
    assert_eq!(out["last_exit"]["signal"], 9);
}

#[test]
fn sigterm_to_the_daemon_leaves_no_child_behind() {
    let mut d = Daemon::start(&[
        ("plain", "name: plain\ncommand: [/bin/sh, -c, 'sleep 1000 & sleep 1000 & wait']\nisolation: namespace\n"),
        ("stubborn", "name: stubborn\ncommand: [/bin/sh, -c, 'trap \"\" TERM; while :; do sleep 0.05; done']\nshutdown: {grace: 300ms}\n"),
    ]);
    let mut pids = Vec::new();
    for ns in ["a", "b", "c"] {
        let v = d.json(&["launch", "plain", "--namespace", ns, "-o", "json"]);
        pids.push(v["pid"].as_u64().unwrap() as u32);
    }
    let v = d.json(&["launch", "stubborn", "-o", "json"]);
    pids.push(v["pid"].as_u64().unwrap() as u32);
    // The whole process groups: every process whose pgid is one of the instances.
    std::thread::sleep(Duration::from_millis(100));
    let members = group_members(&pids);
    assert!(members.len() > 3 * 3, "{members:?}");
    let st = d.sigterm();
    assert_eq!(
        st.code(),
        Some(0),
        "daemon exits 0 after SIGTERM:\n{}",
        d.daemon_log()
    );
    for p in members {
        assert!(wait_gone(p), "process {p} survived the daemon's shutdown");
    }
    assert!(!d.socket.exists(), "socket removed on shutdown");
}

fn group_members(pgids: &[u32]) -> Vec<u32> {
    pgids
        .iter()
        .flat_map(|&g| bulkhead_driver::sys::group_members(g))
        .collect()
}

#[test]
fn a_second_sigterm_kills_everything_at_once() {
    let mut d = Daemon::start(&[(
        "stubborn",
        "name: stubborn\ncommand: [/bin/sh, -c, 'trap \"\" TERM; while :; do sleep 0.05; done']\nshutdown: {grace: 1h}\n",
    )]);
    let v = d.json(&["launch", "stubborn", "-o", "json"]);
    let pid = v["pid"].as_u64().unwrap() as u32;
    let mut child = d.child.take().unwrap();
    let signal = |c: &std::process::Child| {
        // SAFETY: kill(2) on our own unreaped child, the daemon.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
    };
    signal(&child);
    // The first SIGTERM waits out the instance's grace (an hour): still running a while later.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "daemon must wait for the grace"
    );
    assert!(alive(pid));
    signal(&child);
    let start = Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "daemon did not exit after the second SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(st.code(), Some(0));
    assert!(wait_gone(pid));
}

/// Between runs there is no process: a restarting instance shows no pid (it showed the
/// dead one's, which a client could signal after the kernel reused it).
#[test]
fn a_restarting_instance_shows_no_pid() {
    let d = Daemon::start(&[(
        "flaky",
        "name: flaky\ncommand: [/bin/sh, -c, 'exit 1']\nrestart: {policy: on-failure, max_failures: 100, backoff: {initial: 5s, max: 5s, jitter: 0}}\n",
    )]);
    d.json(&["launch", "flaky", "--wait", "started", "-o", "json"]);
    let start = std::time::Instant::now();
    let v = loop {
        let v = d.json(&["get", "ns:default:flaky", "-o", "json"]);
        if v["state"] == "restarting" {
            break v;
        }
        assert!(start.elapsed() < DEADLINE, "never restarting: {v}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(v["pid"].is_null(), "{v}");
}

/// `--finished-kept N`: at most N finished instances stay listed (with their logs), the
/// oldest go first; the default is 1,024.
/// Launches `quick` for `session` and waits until that run has exited.
fn run_to_exit(d: &Daemon, session: &str) {
    d.cli(&["launch", "quick", "--session", session, "--wait", "started"]);
    let id = format!("session:{session}:quick");
    let start = Instant::now();
    while d.json(&["get", &id, "-o", "json"])["state"] != "exited" {
        assert!(start.elapsed() < DEADLINE, "{id} never exited");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn finished_instances_are_kept_up_to_the_configured_number() {
    let d = Daemon::start_with_args(
        &[(
            "quick",
            "name: quick\ncommand: [/bin/sh, -c, 'echo done']\nisolation: session\nrestart: {policy: never}\n",
        )],
        &["--finished-kept", "2"],
    );
    for i in 0..5 {
        run_to_exit(&d, &format!("f{i}"));
    }
    let listed: Vec<String> = d
        .json(&["list", "-o", "json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        listed,
        vec!["session:f3:quick", "session:f4:quick"],
        "the newest two"
    );
    let logs = std::fs::read_dir(d.state.join("logs")).unwrap().count();
    assert_eq!(logs, 2, "their logs only");
}

/// The logs of instances that finished under an earlier daemon are bounded too: the next
/// daemon keeps the newest `--finished-kept` of them (and `logs` still reads those).
#[test]
fn logs_of_instances_finished_under_an_earlier_daemon_are_bounded() {
    let mut d = Daemon::start_with_args(
        &[(
            "quick",
            "name: quick\ncommand: [/bin/sh, -c, 'echo \"done $BULKHEAD_SESSION\"']\nisolation: session\nrestart: {policy: never}\n",
        )],
        &["--finished-kept", "5"],
    );
    for i in 0..5 {
        run_to_exit(&d, &format!("f{i}"));
        // Distinct modification times, oldest first.
        std::thread::sleep(Duration::from_millis(20));
    }
    let logs = d.state.join("logs");
    let count = || std::fs::read_dir(&logs).unwrap().count();
    assert_eq!(count(), 5);
    assert!(d.sigterm().success());
    d.extra_args = vec!["--finished-kept".into(), "2".into()];
    d.spawn();
    assert_eq!(count(), 2, "the newest two logs stay");
    let o = d.cli(&["logs", "session:f4:quick"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("done f4"),
        "{}",
        stderr(&o)
    );
    let o = d.cli(&["logs", "session:f0:quick"]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "the oldest is gone: {}",
        stderr(&o)
    );
}

/// `end-namespace` with an empty name ends the default namespace, as a launch without one
/// uses it.
#[test]
fn end_namespace_of_an_empty_name_is_the_default_namespace() {
    let d = Daemon::start(&[(
        "svc",
        "name: svc\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n",
    )]);
    let v = d.json(&["launch", "svc", "-o", "json"]);
    assert_eq!(v["id"], "ns:default:svc");
    let out = d.cli(&["end-namespace", ""]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        d.json(&["get", "ns:default:svc", "-o", "json"])["state"],
        "terminated"
    );
}
