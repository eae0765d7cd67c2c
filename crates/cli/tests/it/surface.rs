//! The user-facing surface: bad input, exit codes, events, logs, reload, health.

use std::time::{Duration, Instant};

use crate::harness::*;

#[test]
fn bad_manifests_and_hostile_names_get_clear_errors_and_the_daemon_stays_up() {
    let d = Daemon::start(&[
        (
            "good",
            "name: good\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n",
        ),
        (
            "unknown-field",
            "name: unknown-field\ncommand: [x]\nbogus: 1\n",
        ),
        (
            "bad-duration",
            "name: bad-duration\ncommand: [x]\nshutdown: {grace: -5s}\n",
        ),
        ("wrong-name", "name: other\ncommand: [x]\n"),
        ("broken-yaml", "name: [unclosed\n"),
    ]);
    let list = d.json(&["workloads", "-o", "json"]);
    let arr = list.as_array().unwrap();
    let find = |n: &str| arr.iter().find(|w| w["name"] == n).unwrap().clone();
    assert_eq!(find("good")["valid"], true);
    for (name, needle) in [
        ("unknown-field", "bogus"),
        ("bad-duration", "negative"),
        ("wrong-name", "field `name`"),
        ("broken-yaml", "manifest.yaml"),
    ] {
        let w = find(name);
        assert_eq!(w["valid"], false, "{name}");
        let err = w["error"].as_str().unwrap();
        assert!(
            err.contains(&format!("{name}/manifest.yaml")),
            "error names the file: {err}"
        );
        assert!(err.contains(needle), "{name}: {err}");
    }
    // Launching an invalid workload: invalid request, with the manifest error.
    let o = d.cli(&["launch", "unknown-field"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("bogus"), "{}", stderr(&o));
    // Unknown workload: not found.
    let o = d.cli(&["launch", "nope"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    // Hostile names.
    let long = "a".repeat(4096);
    for (args, needle) in [
        (
            vec!["launch", "good", "--namespace", "../etc"],
            "contains '..'",
        ),
        (vec!["launch", "good", "--namespace", "a/b"], "contains '/'"),
        (
            vec!["launch", "good", "--namespace", "a\u{1}b"],
            "control character",
        ),
        (
            vec!["launch", "good", "--namespace", long.as_str()],
            "longer than 63",
        ),
        (vec!["launch", "../good"], "invalid workload name"),
        (vec!["get", "ns:../x:good"], "contains '..'"),
        (vec!["get", "garbage"], "invalid instance id"),
        (vec!["terminate", "ns:a:good", "--grace", "-1s"], "negative"),
        (
            vec!["launch", "good", "--timeout", "forever"],
            "invalid duration",
        ),
    ] {
        let o = d.cli(&args);
        let code = o.status.code();
        assert!(
            code == Some(4) || (code == Some(3) && args[1] == "../good"),
            "{args:?}: {code:?} {}",
            stderr(&o)
        );
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).len() < 600, "error stays short: {}", stderr(&o));
    }
    // Nothing was created outside the state dir and the daemon still serves.
    assert!(!d.state.join("../etc").exists());
    assert_eq!(d.json(&["health", "-o", "json"])["status"], "serving");
    assert_eq!(d.json(&["launch", "good", "-o", "json"])["state"], "ready");
}

#[test]
fn exit_codes_for_missing_things() {
    let d = Daemon::start(&[]);
    let o = d.cli(&["get", "ns:default:nothing"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let o = d.cli(&["terminate", "shared:nothing"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let o = std::process::Command::new(BIN)
        .args(["--socket", "/nonexistent/bulkhead.sock", "health"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot reach the bulkhead daemon"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn events_are_monotonic_resumable_and_followable() {
    let d = Daemon::start(&[("t", "name: t\ncommand: [/bin/sh, -c, 'exit 0']\n")]);
    d.json(&["launch", "t", "--wait", "started", "-o", "json"]);
    d.wait_event("exited", |e| e["kind"] == "exited");
    let all = d.events();
    let ids: Vec<u64> = all.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert_eq!(
        ids,
        (1..=ids.len() as u64).collect::<Vec<_>>(),
        "ids start at 1 without gaps"
    );
    for e in &all {
        for f in ["id", "time", "instance", "kind"] {
            assert!(!e[f].is_null(), "{f} in {e}");
        }
    }
    let started = all.iter().find(|e| e["kind"] == "started").unwrap();
    assert!(started["pid"].is_u64());
    let since = d.cli(&["events", "--since", "2", "-o", "json"]);
    let n = String::from_utf8_lossy(&since.stdout).lines().count();
    assert_eq!(n, all.len() - 2);

    // --follow: history first, then live events.
    let mut follow = std::process::Command::new(BIN)
        .args(["--socket"])
        .arg(&d.socket)
        .args(["events", "--follow", "-o", "json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            let done = v["kind"] == "exited" && v["id"].as_u64().unwrap() > 4;
            lines.push(v);
            if done {
                break;
            }
        }
        lines
    });
    d.json(&["launch", "t", "--wait", "started", "-o", "json"]);
    let start = Instant::now();
    while !reader.is_finished() {
        assert!(
            start.elapsed() < DEADLINE,
            "follow did not see the live events"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let got = reader.join().unwrap();
    assert_eq!(got[0]["id"], 1, "history first");
    let ids: Vec<u64> = got.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert_eq!(
        ids,
        (1..=ids.len() as u64).collect::<Vec<_>>(),
        "no gap between history and live"
    );
}

#[test]
fn logs_capture_stdout_and_stderr() {
    let d = Daemon::start(&[(
        "chatty",
        "name: chatty\ncommand: [/bin/sh, -c, 'echo to-stdout; echo to-stderr >&2; exec sleep 1000']\n",
    )]);
    d.json(&["launch", "chatty", "-o", "json"]);
    let start = Instant::now();
    loop {
        let o = d.cli(&["logs", "ns:default:chatty"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let s = String::from_utf8_lossy(&o.stdout);
        if s.contains("to-stdout") && s.contains("to-stderr") {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "log: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = d.cli(&["logs", "ns:default:chatty", "--tail", "10"]);
    assert_eq!(o.stdout.len(), 10);
    let o = d.cli(&["logs", "ns:default:nothing"]);
    assert_eq!(o.status.code(), Some(3));
}

#[test]
fn reload_adds_workloads_and_running_instances_keep_their_spec() {
    let d = Daemon::start(&[(
        "w",
        "name: w\ncommand: [/bin/sh, -c, 'exec sleep 1000']\nshutdown: {grace: 7s}\n",
    )]);
    let v = d.json(&["launch", "w", "-o", "json"]);
    write_workload(
        &d.workloads,
        "w",
        "name: w\ncommand: [/bin/sh, -c, 'exec sleep 1000']\nshutdown: {grace: 1s}\n",
        &[],
    );
    write_workload(
        &d.workloads,
        "new",
        "name: new\ncommand: [/bin/true]\n",
        &[],
    );
    let o = d.cli(&["reload"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("new"));
    // The running instance was launched with grace 7s and keeps it.
    let again = d.json(&["launch", "w", "-o", "json"]);
    assert_eq!(again["pid"], v["pid"]);
    d.cli(&["terminate", "ns:default:w"]);
    let t = d
        .events()
        .into_iter()
        .find(|e| e["kind"] == "terminating")
        .unwrap();
    assert_eq!(t["grace_ms"], 7000);
    // SIGHUP also rescans.
    write_workload(
        &d.workloads,
        "later",
        "name: later\ncommand: [/bin/true]\n",
        &[],
    );
    // SAFETY: kill(2) on our own child, the daemon.
    unsafe {
        libc::kill(d.child.as_ref().unwrap().id() as i32, libc::SIGHUP);
    }
    let start = Instant::now();
    loop {
        let w = d.json(&["workloads", "-o", "json"]);
        if w.as_array().unwrap().iter().any(|w| w["name"] == "later") {
            break;
        }
        assert!(start.elapsed() < DEADLINE);
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn health_and_list() {
    let d = Daemon::start(&[(
        "w",
        "name: w\ncommand: [/bin/sh, -c, 'exec sleep 1000']\nisolation: none\n",
    )]);
    d.json(&["launch", "w", "-o", "json"]);
    let h = d.json(&["health", "-o", "json"]);
    assert_eq!(h["instances_live"], 1);
    let drivers = h["drivers"].as_array().unwrap();
    for d in ["process", "docker"] {
        assert!(drivers.contains(&serde_json::json!(d)), "{drivers:?}");
    }
    // The sandbox driver is there exactly when this machine allows it (health says so).
    assert_eq!(
        drivers.iter().any(|d| d == "sandbox"),
        h["sandbox"]["available"] == true,
        "{h}"
    );
    let l = d.json(&["list", "-o", "json"]);
    let inst = &l.as_array().unwrap()[0];
    for f in [
        "id",
        "workload",
        "isolation",
        "namespace",
        "session",
        "driver",
        "state",
        "pid",
        "address",
        "ready",
        "restarts",
        "started_at",
        "last_exit",
    ] {
        assert!(inst.get(f).is_some(), "field {f} in {inst}");
    }
    assert_eq!(inst["id"], "shared:w");
    assert_eq!(inst["isolation"], "none");
    let text = d.cli(&["list"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("shared:w"));
    // A second daemon on the same state dir is refused with a clear error.
    let o = std::process::Command::new(BIN)
        .args(["serve", "--workloads"])
        .arg(&d.workloads)
        .arg("--state")
        .arg(&d.state)
        .arg("--socket")
        .arg(d.dir.path().join("other.sock"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("another bulkhead daemon"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn logs_follow_continues_across_rotation() {
    // 4 KiB logs: the ~20 KiB this writes rotates the file several times while followed.
    let d = Daemon::start_with_args(
        &[(
            "counter",
            "name: counter\ncommand: [/bin/sh, -c, 'i=0; while [ $i -lt 1500 ]; do echo line-$i; i=$((i+1)); [ $((i % 50)) = 0 ] && sleep 0.02; done; exec sleep 1000']\n",
        )],
        &["--log-max-bytes", "4096"],
    );
    d.json(&["launch", "counter", "--wait", "started", "-o", "json"]);
    let mut follow = std::process::Command::new(BIN)
        .arg("--socket")
        .arg(&d.socket)
        .args(["logs", "ns:default:counter", "--follow"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut seen = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let n: u32 = line.unwrap().trim_start_matches("line-").parse().unwrap();
            seen.push(n);
            if n == 1499 {
                break;
            }
        }
        seen
    });
    let start = Instant::now();
    while !reader.is_finished() {
        assert!(
            start.elapsed() < DEADLINE,
            "follow never reached the last line"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let seen = reader.join().unwrap();
    // Whatever had rotated away before the follow began is gone; from the first line it
    // got, every line arrives, in order, across the rotations.
    let first = seen[0];
    assert_eq!(seen, (first..=1499).collect::<Vec<_>>());
    let rotated = d.state.join("logs/ns:default:counter.log.1");
    assert!(rotated.exists(), "the log rotated");
}
