//! The keeper and recovery after a daemon crash: instances outlive `kill -9` of the
//! daemon, are adopted by the next one with their real exit statuses, and die with the
//! keeper.

use std::time::{Duration, Instant};

use crate::harness::*;

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kill_9_of_the_daemon_then_restart_adopts_the_same_processes() {
    let mut d = Daemon::start(&[(
        "svc",
        "name: svc\ncommand: [/bin/sh, -c, 'while :; do echo tick; sleep 0.1; done']\nisolation: namespace\n",
    )]);
    let a = d.json(&["launch", "svc", "--namespace", "a", "-o", "json"]);
    let b = d.json(&["launch", "svc", "--namespace", "b", "-o", "json"]);
    let keeper = d.keeper_pid().expect("a keeper runs");
    d.kill9();
    let (pa, pb) = (
        a["pid"].as_u64().unwrap() as u32,
        b["pid"].as_u64().unwrap() as u32,
    );
    assert!(alive(pa) && alive(pb), "instances outlive the daemon");
    d.spawn();
    assert_eq!(
        d.keeper_pid(),
        Some(keeper),
        "the restarted daemon found the same keeper"
    );
    let a2 = d.json(&["get", "ns:a:svc", "-o", "json"]);
    assert_eq!(a2["pid"], a["pid"], "adopted, not restarted");
    assert_eq!(a2["state"], "ready");
    assert_eq!(a2["address"], a["address"], "keeps its port");
    // No key gets a second instance: a launch returns the adopted one.
    let again = d.json(&["launch", "svc", "--namespace", "b", "-o", "json"]);
    assert_eq!(again["pid"], b["pid"]);
    assert_eq!(again["created"], false);
    let adopted = d
        .events()
        .into_iter()
        .filter(|e| e["kind"] == "adopted")
        .count();
    assert_eq!(adopted, 2);
    // Its logs resume.
    let before = d.cli(&["logs", "ns:a:svc"]).stdout.len();
    wait_until("new log output after adoption", || {
        d.cli(&["logs", "ns:a:svc"]).stdout.len() > before
    });
    // And it is still fully supervised: terminate works and leaves nothing behind.
    let t = d.json(&["terminate", "ns:a:svc", "-o", "json"]);
    assert_eq!(t["state"], "terminated");
    assert!(wait_gone(pa));
}

#[test]
fn exit_codes_survive_the_daemon_being_down_and_the_policy_applies() {
    let mut d = Daemon::start(&[]);
    let gate = d.dir.path().join("gate");
    let m = format!(
        "name: job\ncommand: [/bin/sh, -c, 'while [ ! -e {g}.$BULKHEAD_NAMESPACE ]; do sleep 0.02; done; exit 3']\nrestart: {{policy: on-failure, max_failures: 100, backoff: {{initial: 10ms}}}}\n",
        g = gate.display()
    );
    write_workload(&d.workloads, "job", &m, &[]);
    assert!(d.cli(&["reload"]).status.success());
    let down = d.json(&["launch", "job", "--namespace", "down", "-o", "json"]);
    d.json(&["launch", "job", "--namespace", "after", "-o", "json"]);
    d.kill9();
    // One exits while no daemon runs: the keeper keeps its status.
    std::fs::write(format!("{}.down", gate.display()), "").unwrap();
    assert!(wait_gone(down["pid"].as_u64().unwrap() as u32));
    d.spawn();
    // The other exits after the restart.
    std::fs::write(format!("{}.after", gate.display()), "").unwrap();
    for ns in ["down", "after"] {
        let id = format!("ns:{ns}:job");
        let e = d.wait_event("exit of an adopted instance", |e| {
            e["instance"] == id.as_str() && e["kind"] == "exited"
        });
        assert_eq!(e["exit_code"], 3, "{id}: the real exit code, not a guess");
        // The restart policy applies to it.
        d.wait_event("restart", |e| {
            e["instance"] == id.as_str() && e["kind"] == "restarting"
        });
    }
}

#[test]
fn instances_die_with_the_keeper() {
    let d = Daemon::start(&[(
        "svc",
        "name: svc\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n",
    )]);
    let v = d.json(&["launch", "svc", "-o", "json"]);
    let pid = v["pid"].as_u64().unwrap() as u32;
    let keeper = d.keeper_pid().expect("a keeper runs");
    // SAFETY: kill(2) on the keeper of this test's own state directory.
    unsafe {
        libc::kill(keeper as i32, libc::SIGKILL);
    }
    assert!(wait_gone(pid), "parent-death signal: nothing runs unseen");
    // Not a crash of its own: `lost`, saying why (test
    // `an_instance_killed_with_its_keeper_is_reported_lost_not_crashed`).
    let e = d.wait_event("lost", |e| e["kind"] == "lost");
    assert_eq!(
        e["reason"], "killed with the keeper, which died (signal SIGKILL)",
        "{e}"
    );
}

/// Regression: after `kill -9` of the keeper, every later process launch failed with
/// "cannot reach the keeper: Broken pipe", while `health` said ok. A new keeper is started
/// at once (before any launch asks), `health` is ok again, and a new instance lives under
/// the new keeper.
#[test]
fn a_dead_keeper_is_replaced_at_once() {
    let d = Daemon::start(&[
        (
            "svc",
            "name: svc\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n",
        ),
        (
            "other",
            "name: other\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n",
        ),
    ]);
    let v = d.json(&["launch", "svc", "-o", "json"]);
    let old_pid = v["pid"].as_u64().unwrap() as u32;
    let keeper = d.keeper_pid().expect("a keeper runs");
    // SAFETY: kill(2) on the keeper of this test's own state directory.
    unsafe {
        libc::kill(keeper as i32, libc::SIGKILL);
    }
    assert!(wait_gone(keeper) && wait_gone(old_pid));
    d.wait_event("lost", |e| e["kind"] == "lost");
    wait_until("a new keeper, before any launch", || {
        d.keeper_pid().is_some_and(|p| p != keeper)
    });
    wait_until("health ok again", || {
        d.json(&["health", "-o", "json"])["status"] == "serving"
    });
    let v = d.json(&["launch", "other", "-o", "json"]);
    assert_eq!(v["state"], "ready", "{v}");
    let pid = v["pid"].as_u64().unwrap() as u32;
    assert!(alive(pid));
    let fresh = d.keeper_pid().expect("a new keeper runs");
    assert_ne!(fresh, keeper);
    // The new instance is the new keeper's child, so it is adopted after a daemon crash
    // like any other.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let ppid: u32 = stat
        .rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap();
    assert_eq!(ppid, fresh, "{stat}");
}

#[test]
fn a_clean_shutdown_stops_the_keeper_too() {
    let mut d = Daemon::start(&[(
        "svc",
        "name: svc\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n",
    )]);
    let v = d.json(&["launch", "svc", "-o", "json"]);
    let keeper = d.keeper_pid().expect("a keeper runs");
    assert_eq!(d.sigterm().code(), Some(0));
    assert!(wait_gone(v["pid"].as_u64().unwrap() as u32));
    assert!(
        wait_gone(keeper),
        "the keeper exits after a clean daemon shutdown"
    );
}

#[test]
fn restart_counts_breaker_and_leases_survive_a_daemon_crash() {
    let mut d = Daemon::start(&[
        (
            "flaky",
            "name: flaky\ncommand: [/bin/sh, -c, 'sleep 0.05; exit 1']\nrestart: {policy: on-failure, max_failures: 1000, backoff: {initial: 20ms, max: 50ms}}\n",
        ),
        ("held", "name: held\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n"),
    ]);
    d.json(&["launch", "held", "--lease", "alice", "-o", "json"]);
    d.json(&["launch", "flaky", "--wait", "started", "-o", "json"]);
    wait_until("three restarts", || {
        d.json(&["get", "ns:default:flaky", "-o", "json"])["restarts"]
            .as_u64()
            .unwrap()
            >= 3
    });
    // No wait for the instance table: the restart count it may lag is in the event log.
    let before = d.json(&["get", "ns:default:flaky", "-o", "json"])["restarts"]
        .as_u64()
        .unwrap();
    d.kill9();
    d.spawn();
    let after = d.json(&["get", "ns:default:flaky", "-o", "json"]);
    assert!(
        after["restarts"].as_u64().unwrap() >= before,
        "restart count continues: {before} -> {after}"
    );
    let held = d.json(&["get", "ns:default:held", "-o", "json"]);
    assert_eq!(
        held["leases"],
        serde_json::json!(["alice"]),
        "leases survive"
    );
    assert_eq!(held["state"], "ready");
}

#[test]
fn instances_that_died_with_their_keeper_are_lost_and_restarted_by_policy() {
    let mut d = Daemon::start(&[
        (
            "phoenix",
            "name: phoenix\ncommand: [/bin/sh, -c, 'exec sleep 1000']\nrestart: {policy: on-failure, backoff: {initial: 10ms}}\n",
        ),
        ("mortal", "name: mortal\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n"),
    ]);
    let p = d.json(&["launch", "phoenix", "-o", "json"]);
    let m = d.json(&["launch", "mortal", "-o", "json"]);
    std::thread::sleep(Duration::from_millis(200));
    let keeper = d.keeper_pid().expect("a keeper runs");
    d.kill9();
    // The keeper dies while no daemon runs: its instances die with it, unseen.
    // SAFETY: kill(2) on the keeper of this test's own state directory.
    unsafe {
        libc::kill(keeper as i32, libc::SIGKILL);
    }
    assert!(wait_gone(p["pid"].as_u64().unwrap() as u32));
    assert!(wait_gone(m["pid"].as_u64().unwrap() as u32));
    d.spawn();
    let lost = d.wait_event("phoenix lost", |e| {
        e["instance"] == "ns:default:phoenix" && e["kind"] == "lost"
    });
    assert!(
        lost["reason"].as_str().unwrap().contains("was gone"),
        "{lost}"
    );
    // on-failure: restarted as a new process.
    let started = d.wait_event("phoenix restarted", |e| {
        e["instance"] == "ns:default:phoenix"
            && e["kind"] == "started"
            && e["id"].as_u64() > lost["id"].as_u64()
    });
    assert_ne!(started["pid"], p["pid"]);
    // never: reported failed, not restarted.
    d.wait_event("mortal lost", |e| {
        e["instance"] == "ns:default:mortal" && e["kind"] == "lost"
    });
    let mortal = d.json(&["get", "ns:default:mortal", "-o", "json"]);
    assert_eq!(mortal["state"], "failed");
    assert!(mortal["failure"].as_str().unwrap().contains("was gone"));
}

/// Regression: a `terminate` of a workload that ignores SIGTERM, then `kill -9` of the
/// daemon during the grace: the restarted daemon adopted the instance as running and
/// SIGKILL never came. The termination is an intent in the event log (`terminating`,
/// with the grace it was given, durable before anyone sees it) and the next daemon
/// carries it out: SIGKILL when what is left of that grace runs out, then `terminated`.
/// No wait for the instance table: the event is the record.
fn termination_survives_a_crash(manifest: &str) {
    let mut d = Daemon::start(&[("stubborn", manifest)]);
    let v = d.json(&["launch", "stubborn", "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let pid = v["pid"].as_u64().unwrap() as u32;
    let mut term = std::process::Command::new(BIN)
        .args([
            "--socket",
            &d.socket.display().to_string(),
            "terminate",
            &id,
            "--grace",
            "4s",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = d.wait_event("terminating", |e| e["kind"] == "terminating");
    assert_eq!(t["grace_ms"], 4000, "{t}");
    d.kill9();
    let _ = term.wait();
    assert!(
        alive(pid),
        "it ignores SIGTERM: still running within the grace"
    );
    d.spawn();
    assert!(wait_gone(pid), "SIGKILL came after the grace");
    d.wait_event("terminated", |e| {
        e["instance"] == id.as_str() && e["kind"] == "terminated"
    });
    let got = d.json(&["get", &id, "-o", "json"]);
    assert_eq!(got["state"], "terminated", "{got}");
}

#[test]
fn a_termination_in_progress_survives_a_daemon_crash() {
    termination_survives_a_crash(
        "name: stubborn\ncommand: [/bin/sh, -c, \"trap '' TERM; exec sleep 1000\"]\nshutdown: {grace: 3s}\n",
    );
}

#[test]
fn a_termination_in_progress_of_a_container_survives_a_daemon_crash() {
    if let Some(why) = crate::docker::skip() {
        eprintln!("skipped: {why}");
        return;
    }
    termination_survives_a_crash(&format!(
        "name: stubborn\ndriver: docker\ncommand: [/bin/sh, -c, \"trap '' TERM; exec sleep 1000\"]\n\
         shutdown: {{grace: 3s}}\ndocker: {{image: {}}}\n",
        crate::docker::IMAGE
    ));
}

/// A sandbox dies with its daemon: a termination in progress is then complete, and the
/// next daemon says `terminated`; it never restarts it (its policy is `always`).
#[test]
fn a_sandbox_being_terminated_when_the_daemon_dies_ends_terminated_not_restarted() {
    let mut d = Daemon::start(&[(
        "stubborn",
        "name: stubborn\ndriver: sandbox\ncommand: [/bin/sh, -c, \"trap '' TERM; exec sleep 1000\"]\n\
         restart: {policy: always}\nshutdown: {grace: 30s}\n",
    )]);
    if !crate::sandbox::sandbox_available(&d) {
        return;
    }
    let v = d.json(&["launch", "stubborn", "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let mut term = std::process::Command::new(BIN)
        .args([
            "--socket",
            &d.socket.display().to_string(),
            "terminate",
            &id,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    d.wait_event("terminating", |e| e["kind"] == "terminating");
    let before = d
        .events()
        .last()
        .map(|e| e["id"].as_u64().unwrap())
        .unwrap_or(0);
    d.kill9();
    let _ = term.wait();
    d.spawn();
    d.wait_event("terminated", |e| {
        e["instance"] == id.as_str() && e["kind"] == "terminated"
    });
    std::thread::sleep(Duration::from_millis(500));
    let after: Vec<_> = d
        .events()
        .into_iter()
        .filter(|e| e["id"].as_u64().unwrap() > before && e["instance"] == id.as_str())
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(after, vec!["terminated"], "{after:?}");
}

/// A release is recorded before it is acknowledged: while the test holds the database's
/// write lock, `release` does not answer (the instance table is otherwise written off the
/// request path, and a crash right after the answer brought the lease back); once the lock
/// goes it answers, the stored row no longer names the holder, and after a `kill -9` and
/// a restart the lease stays released.
#[test]
fn a_release_is_stored_before_it_is_acknowledged() {
    let mut d = Daemon::start(&[(
        "held",
        "name: held\ncommand: [/bin/sleep, \"1000\"]\nisolation: session\n",
    )]);
    let id = "session:r1:held";
    for holder in ["alice", "bob"] {
        d.json(&[
            "launch",
            "held",
            "--session",
            "r1",
            "--lease",
            holder,
            "-o",
            "json",
        ]);
    }
    let db = d.state.join("bulkhead.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    wait_until("the row names both holders", || {
        conn.query_row("SELECT leases FROM instances WHERE id = ?1", [id], |r| {
            r.get::<_, String>(0)
        })
        .is_ok_and(|l| l.contains("alice") && l.contains("bob"))
    });
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    let mut release = std::process::Command::new(BIN)
        .args([
            "--socket",
            &d.socket.display().to_string(),
            "release",
            id,
            "alice",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        release.try_wait().unwrap().is_none(),
        "release answered while its change could not be stored"
    );
    conn.execute_batch("ROLLBACK").unwrap();
    let st = release.wait().unwrap();
    assert!(st.success(), "{st}");
    let leases: String = conn
        .query_row("SELECT leases FROM instances WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(
        leases.contains("bob") && !leases.contains("alice"),
        "stored {leases:?} when the release answered"
    );
    drop(conn);
    d.kill9();
    d.spawn();
    let v = d.json(&["get", id, "-o", "json"]);
    assert_eq!(v["leases"], serde_json::json!(["bob"]), "{v}");
}

/// `kill -9` of the keeper while launches are in flight: every launch answers (ready, or
/// an error), nothing hangs; afterwards every instance that says it runs is a live child
/// of the new keeper, every other one is final with a dead process, and launches work.
#[test]
fn a_keeper_killed_during_launches_leaves_no_instance_unaccounted_for() {
    let d = Daemon::start(&[(
        "s",
        "name: s\ncommand: [/bin/sleep, \"1000\"]\nisolation: session\nrestart: {policy: never}\n",
    )]);
    let keeper = d.keeper_pid().expect("a keeper runs");
    let answered = std::sync::atomic::AtomicUsize::new(0);
    let (ok, failed) = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|t| {
                let (d, answered) = (&d, &answered);
                s.spawn(move || {
                    let (mut ok, mut failed) = (0, Vec::new());
                    for i in 0..15 {
                        let out = d.cli(&["launch", "s", "--session", &format!("k{t}-{i}")]);
                        answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if out.status.success() {
                            ok += 1;
                        } else {
                            failed.push(crate::harness::stderr(&out));
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        wait_until("some launches done", || {
            answered.load(std::sync::atomic::Ordering::SeqCst) >= 12
        });
        // SAFETY: kill(2) on the keeper of this test's own state directory.
        unsafe {
            libc::kill(keeper as i32, libc::SIGKILL);
        }
        let mut ok = 0;
        let mut failed = Vec::new();
        for w in workers {
            let (o, f) = w.join().unwrap();
            ok += o;
            failed.extend(f);
        }
        (ok, failed)
    });
    assert_eq!(ok + failed.len(), 60);
    for f in &failed {
        assert!(f.contains("keeper"), "a failed launch says why: {f}");
    }
    wait_until("a new keeper and health ok", || {
        d.keeper_pid().is_some_and(|p| p != keeper)
            && d.json(&["health", "-o", "json"])["status"] == "serving"
    });
    let fresh = d.keeper_pid().unwrap();
    wait_until("every instance settled", || {
        d.json(&["list", "-o", "json"])
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["state"] != "starting")
    });
    for v in d.json(&["list", "-o", "json"]).as_array().unwrap() {
        let pid = v["pid"].as_u64().map(|p| p as u32);
        match v["state"].as_str().unwrap() {
            "ready" => {
                let pid = pid.expect("a running instance has a pid");
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
                let ppid: u32 = stat
                    .rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().nth(1))
                    .and_then(|p| p.parse().ok())
                    .unwrap();
                assert_eq!(ppid, fresh, "{v}: a child of the new keeper");
            }
            state => {
                assert!(
                    ["crashed", "failed", "exited", "terminated"].contains(&state),
                    "{v}"
                );
                if let Some(pid) = pid {
                    assert!(wait_gone(pid), "{v}: its process is gone");
                }
            }
        }
    }
    let v = d.json(&["launch", "s", "--session", "after", "-o", "json"]);
    assert_eq!(v["state"], "ready", "{v}");
    eprintln!(
        "{ok} launches ready, {} failed naming the keeper",
        failed.len()
    );
}

/// An instance killed with a keeper that died says so: `lost`, "killed with the keeper,
/// which died", not a bare SIGKILL crash. The control: a program killed by SIGKILL itself
/// is still `crashed`.
#[test]
fn an_instance_killed_with_its_keeper_is_reported_lost_not_crashed() {
    let d = Daemon::start(&[(
        "s",
        "name: s\ncommand: [/bin/sleep, \"1000\"]\nisolation: session\nrestart: {policy: never}\n",
    )]);
    let a = d.json(&["launch", "s", "--session", "a", "-o", "json"]);
    let b = d.json(&["launch", "s", "--session", "b", "-o", "json"]);
    let (a_id, b_id) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    // SAFETY: kill(2) on a process this test's daemon started.
    unsafe {
        libc::kill(b["pid"].as_u64().unwrap() as i32, libc::SIGKILL);
    }
    d.wait_event("b crashed", |e| {
        e["instance"] == b_id && e["kind"] == "crashed"
    });
    let keeper = d.keeper_pid().expect("a keeper runs");
    // SAFETY: kill(2) on the keeper of this test's own state directory.
    unsafe {
        libc::kill(keeper as i32, libc::SIGKILL);
    }
    let lost = d.wait_event("a lost", |e| e["instance"] == a_id && e["kind"] == "lost");
    assert!(
        lost["reason"]
            .as_str()
            .unwrap()
            .contains("killed with the keeper"),
        "{lost}"
    );
    let crashed: Vec<_> = d
        .events()
        .into_iter()
        .filter(|e| e["instance"] == a_id && e["kind"] == "crashed")
        .collect();
    assert!(crashed.is_empty(), "{crashed:?}");
    let g = d.json(&["get", a_id, "-o", "json"]);
    assert_eq!(g["state"], "failed", "{g}");
    assert!(g["failure"].as_str().unwrap().contains("keeper"), "{g}");
}

/// While no daemon is connected the keeper stops reading an instance's output: the
/// instance waits on its full pipe, and once a daemon is back every line arrives, in
/// order, none dropped (1.3 MB here, twenty times a pipe's buffer).
#[test]
fn output_written_while_no_daemon_runs_waits_and_arrives_whole() {
    let mut d = Daemon::start(&[(
        "chatty",
        "name: chatty\ncommand: [/bin/sh, -c, 'sleep 1; seq 1 200000; exec sleep 1000']\n",
    )]);
    let v = d.json(&["launch", "chatty", "-o", "json"]);
    d.kill9();
    // The instance writes its lines meanwhile, and blocks once its pipe is full.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        alive(v["pid"].as_u64().unwrap() as u32),
        "it runs on without a daemon"
    );
    d.spawn();
    let start = Instant::now();
    let log = loop {
        let o = d.cli(&["logs", "ns:default:chatty"]);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        if text.ends_with("\n200000\n") {
            break text;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the output never arrived whole ({} bytes)",
            text.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let numbers: Vec<u32> = log.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(numbers.len(), 200_000, "no line lost or doubled");
    assert!(
        numbers.iter().enumerate().all(|(i, n)| *n == i as u32 + 1),
        "in order"
    );
}
