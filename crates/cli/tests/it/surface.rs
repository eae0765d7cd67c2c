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
        "name: chatty\ncommand: [/bin/sh, -c, 'echo to-stdout; echo to-stderr >&2; echo two; printf no-newline; exec sleep 1000']\n",
    )]);
    d.json(&["launch", "chatty", "-o", "json"]);
    let start = Instant::now();
    // Text: stdout lines on stdout; stderr lines and the daemon's run marks on stderr.
    loop {
        let o = d.cli(&["logs", "ns:default:chatty"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let (out, err) = (String::from_utf8_lossy(&o.stdout), stderr(&o));
        if out.contains("no-newline") {
            assert_eq!(out, "to-stdout\ntwo\nno-newline");
            assert!(err.contains("to-stderr\n"), "{err}");
            assert!(err.contains("--- run 1 started (pid "), "{err}");
            break;
        }
        assert!(start.elapsed() < DEADLINE, "log: {out}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // JSON: one object per line with its time, stream and run.
    let json_lines = |args: &[&str]| -> Vec<serde_json::Value> {
        let o = d.cli(&[&["logs", "ns:default:chatty", "-o", "json"], args].concat());
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let lines = json_lines(&[]);
    // --tail counts lines (of every stream), not bytes.
    assert_eq!(json_lines(&["--tail", "2"]), lines[lines.len() - 2..]);
    let err_line = lines
        .iter()
        .find(|l| l["line"] == "to-stderr")
        .expect("the stderr line");
    assert_eq!(err_line["stream"], "stderr");
    assert_eq!(err_line["run"], 1);
    assert!(err_line["time"].as_str().unwrap().ends_with('Z'));
    let last = lines.iter().rfind(|l| l["stream"] == "stdout").unwrap();
    assert_eq!(
        (&last["line"], &last["partial"]),
        (&"no-newline".into(), &true.into())
    );
    // --timestamps prefixes the time and stream; --since filters by time.
    let o = d.cli(&["logs", "ns:default:chatty", "--timestamps"]);
    let first = String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()
        .unwrap()
        .to_owned();
    assert!(
        first.ends_with(" stdout to-stdout") && first.starts_with("20"),
        "{first}"
    );
    let o = d.cli(&["logs", "ns:default:chatty", "--since", "1h"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("to-stdout"));
    let o = d.cli(&[
        "logs",
        "ns:default:chatty",
        "--since",
        "2999-01-01T00:00:00Z",
    ]);
    assert!(o.status.success() && o.stdout.is_empty(), "{}", stderr(&o));
    let o = d.cli(&["logs", "ns:default:chatty", "--since", "yesterday"]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "a bad --since is an invalid request"
    );
    assert!(stderr(&o).contains("--since"), "{}", stderr(&o));
    let o = d.cli(&["logs", "ns:default:nothing"]);
    assert_eq!(o.status.code(), Some(3));
}

/// Each run of a key is marked in its log, and a launch that fails says why with the
/// last lines its program wrote to stderr.
#[test]
fn runs_are_marked_and_a_failed_launch_shows_its_stderr() {
    let d = Daemon::start(&[
        (
            "flaky",
            "name: flaky\ncommand: [/bin/sh, -c, 'echo run-output; sleep 0.2; exit 3']\nrestart: {policy: on-failure, backoff: {initial: 10ms}, max_failures: 2}\n",
        ),
        (
            "broken",
            "name: broken\ncommand: [/bin/sh, -c, 'echo line-1 >&2; echo \"config error: no port given\" >&2; exit 71']\nreadiness: {tcp: {period: 20ms}}\n",
        ),
    ]);
    let o = d.cli(&["launch", "broken"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("exit code 71"), "{err}");
    assert!(
        err.contains("the last lines of its stderr:")
            && err.contains("config error: no port given"),
        "{err}"
    );
    d.cli(&["launch", "flaky", "--wait", "started"]);
    let start = Instant::now();
    loop {
        let o = d.cli(&["logs", "ns:default:flaky", "-o", "json"]);
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let marks: Vec<String> = lines
            .iter()
            .filter(|l| l["stream"] == "bulkhead")
            .map(|l| format!("{} {}", l["run"], l["line"].as_str().unwrap()))
            .collect();
        if marks.iter().any(|m| m.starts_with("2 run 2 ended")) {
            assert!(marks[0].starts_with("1 run 1 started (pid "), "{marks:?}");
            assert!(
                marks.iter().any(|m| m == "1 run 1 ended: exit code 3"),
                "{marks:?}"
            );
            assert!(
                marks.iter().any(|m| m.starts_with("2 run 2 started")),
                "{marks:?}"
            );
            let runs: Vec<u64> = lines
                .iter()
                .filter(|l| l["line"] == "run-output")
                .map(|l| l["run"].as_u64().unwrap())
                .collect();
            assert_eq!(&runs[..2], [1, 2], "each run's output carries its run");
            break;
        }
        assert!(start.elapsed() < DEADLINE, "marks: {marks:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
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
    for d in ["process", "docker", "kubernetes"] {
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
