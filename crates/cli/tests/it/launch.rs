//! Keys and reuse.

use std::time::Instant;

use crate::harness::*;

const SLEEPER: &str =
    "name: sleeper\ncommand: [/bin/sh, -c, 'exec sleep 1000']\nisolation: namespace\n";

#[test]
fn same_key_reuses_the_instance_and_other_keys_do_not() {
    let d = Daemon::start(&[("sleeper", SLEEPER)]);
    let a = d.json(&["launch", "sleeper", "--namespace", "a", "-o", "json"]);
    assert_eq!(a["id"], "ns:a:sleeper");
    assert_eq!(a["created"], true);
    assert_eq!(a["state"], "ready");
    let again = d.json(&["launch", "sleeper", "--namespace", "a", "-o", "json"]);
    assert_eq!(again["created"], false);
    assert_eq!(again["pid"], a["pid"], "same key, same process");
    let b = d.json(&["launch", "sleeper", "--namespace", "b", "-o", "json"]);
    assert_eq!(b["created"], true);
    assert_ne!(b["pid"], a["pid"]);
    assert_ne!(
        b["address"], a["address"],
        "each instance gets its own port"
    );
    let started = d
        .events()
        .into_iter()
        .filter(|e| e["kind"] == "started" && e["instance"] == "ns:a:sleeper")
        .count();
    assert_eq!(started, 1);
}

#[test]
fn twenty_concurrent_launches_of_one_key_start_one_process() {
    let d = Daemon::start(&[("sleeper", SLEEPER)]);
    let outs: Vec<serde_json::Value> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..20)
            .map(|_| s.spawn(|| d.json(&["launch", "sleeper", "--namespace", "c", "-o", "json"])))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let pid = &outs[0]["pid"];
    assert!(pid.is_u64());
    assert!(
        outs.iter().all(|o| &o["pid"] == pid),
        "all callers get the same instance"
    );
    assert_eq!(outs.iter().filter(|o| o["created"] == true).count(), 1);
    let started = d
        .events()
        .into_iter()
        .filter(|e| e["kind"] == "started" && e["instance"] == "ns:c:sleeper")
        .count();
    assert_eq!(started, 1, "one process for one key");
}

#[test]
fn a_slow_ready_workload_does_not_delay_another_key() {
    let Some(py) = python3() else { return };
    let slow = format!(
        "name: slow\ncommand: [{py}, -c, 'import time; time.sleep(5); import socket,os; s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.sendto(b\"READY=1\", os.environ[\"NOTIFY_SOCKET\"]); time.sleep(1000)']\nreadiness: {{notify: true, timeout: 60s}}\n"
    );
    let d = Daemon::start(&[("slow", &slow), ("sleeper", SLEEPER)]);
    std::thread::scope(|s| {
        let slow_launch = s.spawn(|| {
            let t = Instant::now();
            let v = d.json(&["launch", "slow", "--namespace", "x", "-o", "json"]);
            (v, t.elapsed())
        });
        // Wait until the slow instance is really starting, then launch another key.
        d.wait_event("slow started", |e| {
            e["kind"] == "started" && e["instance"] == "ns:x:slow"
        });
        let t = Instant::now();
        let fast = d.json(&["launch", "sleeper", "--namespace", "y", "-o", "json"]);
        let fast_took = t.elapsed();
        assert_eq!(fast["state"], "ready");
        // Ordering, not timing: the other key was ready while the slow one still was not.
        let slow_now = d.json(&["get", "ns:x:slow", "-o", "json"]);
        assert_eq!(
            slow_now["state"], "starting",
            "fast launch returned before slow became ready"
        );
        let (slow_v, slow_took) = slow_launch.join().unwrap();
        assert_eq!(slow_v["state"], "ready");
        assert!(
            fast_took < slow_took,
            "fast {fast_took:?} vs slow {slow_took:?}"
        );
    });
}

#[test]
fn session_isolation_and_environment() {
    let d = Daemon::start(&[]);
    let out = d.dir.path().join("env.txt");
    let manifest = format!(
        "name: envdump\ncommand: [/bin/sh, -c, 'env | sort > {}.$BULKHEAD_SESSION; exec sleep 1000']\nisolation: session\nenv: {{GREETING: hi}}\n",
        out.display()
    );
    write_workload(&d.workloads, "envdump", &manifest, &[]);
    assert!(d.cli(&["reload"]).status.success());
    let v = d.json(&["launch", "envdump", "--session", "s1", "-o", "json"]);
    assert_eq!(v["id"], "session:s1:envdump");
    assert_eq!(v["session"], "s1");
    let file = std::path::PathBuf::from(format!("{}.s1", out.display()));
    let start = Instant::now();
    while !file.exists() || std::fs::read_to_string(&file).unwrap().is_empty() {
        assert!(start.elapsed() < DEADLINE);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    let env = std::fs::read_to_string(&file).unwrap();
    let port = v["port"].as_u64().unwrap();
    assert!(env.contains(&format!("PORT={port}\n")), "{env}");
    assert!(
        env.contains("BULKHEAD_INSTANCE=session:s1:envdump\n"),
        "{env}"
    );
    assert!(env.contains("BULKHEAD_WORKLOAD=envdump\n"), "{env}");
    assert!(env.contains("BULKHEAD_SESSION=s1\n"), "{env}");
    assert!(env.contains("BULKHEAD_NAMESPACE=\n"), "{env}");
    assert!(env.contains("GREETING=hi\n"), "{env}");
    assert!(
        !env.contains("NOTIFY_SOCKET"),
        "no notify socket without notify readiness"
    );
    assert!(
        !env.contains("CARGO"),
        "the daemon's environment is not inherited wholesale"
    );
    // A session is required for a session-isolated workload.
    let o = d.cli(&["launch", "envdump"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("session is required"), "{}", stderr(&o));
}

/// Admission: with `--max-instances 2`, a third live instance is refused (exit 9,
/// naming the limit); reusing a running instance is not; a slot freed by a terminate is
/// taken again.
#[test]
fn a_launch_past_max_instances_is_refused_naming_the_limit() {
    let d = Daemon::start_with_args(
        &[(
            "s",
            "name: s\nisolation: session\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n",
        )],
        &["--max-instances", "2"],
    );
    d.json(&["launch", "s", "--session", "a", "-o", "json"]);
    d.json(&["launch", "s", "--session", "b", "-o", "json"]);
    let out = d.cli(&["launch", "s", "--session", "c"]);
    assert_eq!(out.status.code(), Some(9), "{}", stderr(&out));
    assert!(stderr(&out).contains("--max-instances"), "{}", stderr(&out));
    let again = d.json(&["launch", "s", "--session", "a", "-o", "json"]);
    assert_eq!(again["created"], false);
    let t = d.cli(&["terminate", "session:a:s"]);
    assert!(t.status.success(), "{}", stderr(&t));
    let c = d.json(&["launch", "s", "--session", "c", "-o", "json"]);
    assert_eq!(c["created"], true);
}
