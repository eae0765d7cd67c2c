//! Admission per namespace (`--max-instances-per-namespace`) and the port range
//! (`--port-range`), through the real daemon.

use std::process::{Command, Stdio};

use crate::harness::*;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn sleeper(name: &str) -> String {
    format!("name: {name}\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n")
}

/// Runs `bulkhead launch` for each argument list at once (one CLI process each); returns
/// (exit code, stdout, stderr) in the same order.
fn launch_concurrently(d: &Daemon, launches: &[Vec<String>]) -> Vec<(Option<i32>, String, String)> {
    let children: Vec<_> = launches
        .iter()
        .map(|args| {
            Command::new(BIN)
                .arg("--socket")
                .arg(&d.socket)
                .arg("launch")
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| {
            let o = c.wait_with_output().unwrap();
            (o.status.code(), stdout(&o), stderr(&o))
        })
        .collect()
}

/// 32 concurrent launches of 32 different workloads into one namespace with
/// `--max-instances-per-namespace 5`: exactly 5 are created (the check and the insert are
/// one step under the registry lock), the others are refused with exit 9 and a message
/// naming the namespace and the limit. Another namespace and sessions are not counted; a
/// terminate frees a place.
#[test]
fn a_namespace_past_its_limit_is_refused_and_concurrent_launches_never_overshoot() {
    let names: Vec<String> = (0..32).map(|i| format!("w{i}")).collect();
    let manifests: Vec<String> = names.iter().map(|n| sleeper(n)).collect();
    let mut workloads: Vec<(&str, &str)> = names
        .iter()
        .zip(&manifests)
        .map(|(n, m)| (n.as_str(), m.as_str()))
        .collect();
    let session = "name: s\nisolation: session\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n";
    workloads.push(("s", session));
    let d = Daemon::start_with_args(&workloads, &["--max-instances-per-namespace", "5"]);

    let args: Vec<Vec<String>> = names
        .iter()
        .map(|n| vec![n.clone(), "--namespace".into(), "team-a".into()])
        .collect();
    let results = launch_concurrently(&d, &args);
    let ok = results.iter().filter(|r| r.0 == Some(0)).count();
    assert_eq!(ok, 5, "{results:#?}");
    for (code, _, err) in results.iter().filter(|r| r.0 != Some(0)) {
        assert_eq!(*code, Some(9), "{err}");
        assert!(
            err.contains("namespace team-a already runs 5 live instances")
                && err.contains("--max-instances-per-namespace"),
            "{err}"
        );
    }
    let list = d.json(&["list", "-o", "json"]);
    let in_a: Vec<&serde_json::Value> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["id"].as_str().unwrap().starts_with("ns:team-a:"))
        .collect();
    assert_eq!(in_a.len(), 5, "{list:#}");
    assert!(in_a.iter().all(|i| i["state"] == "ready"), "{list:#}");

    // Another namespace has its own count; sessions are in no namespace.
    for n in &names[..5] {
        d.json(&["launch", n, "--namespace", "team-b", "-o", "json"]);
    }
    d.json(&[
        "launch",
        "s",
        "--session",
        "x",
        "--namespace",
        "team-a",
        "-o",
        "json",
    ]);
    // Reusing a live instance of the full namespace is not refused.
    let first = in_a[0]["id"].as_str().unwrap().to_owned();
    let w = first.rsplit(':').next().unwrap().to_owned();
    let again = d.json(&["launch", &w, "--namespace", "team-a", "-o", "json"]);
    assert_eq!(again["created"], false);
    // A terminate frees a place.
    let t = d.cli(&["terminate", &first]);
    assert!(t.status.success(), "{}", stderr(&t));
    let free = names
        .iter()
        .find(|n| !in_a.iter().any(|i| i["id"] == format!("ns:team-a:{n}")))
        .unwrap();
    let c = d.json(&["launch", free, "--namespace", "team-a", "-o", "json"]);
    assert_eq!(c["created"], true);
    let out = d.cli(&["launch", &w, "--namespace", "team-a"]);
    assert_eq!(out.status.code(), Some(9), "{}", stderr(&out));
}

fn port_of(instance: &serde_json::Value) -> u16 {
    instance["address"]
        .as_str()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {instance}"))
}

/// A port range of one port that something else binds: no free port is left.
fn taken_port() -> std::net::TcpListener {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap()
}

/// `--port-range`: every instance gets a distinct port of the range; once every port is
/// held the launch fails naming the range; a port in use by another program is skipped.
#[test]
fn ports_come_from_the_range_and_exhaustion_names_it() {
    // Three ports of which one is held by this test: two instances fit.
    let taken = taken_port();
    let p = taken.local_addr().unwrap().port();
    let (low, high) = if p > 2 { (p - 2, p) } else { (p, p + 2) };
    let range = format!("{low}-{high}");
    // The two other ports of the range must be free for the test to mean anything.
    let others: Vec<u16> = (low..=high).filter(|q| *q != p).collect();
    let bound: Vec<_> = others
        .iter()
        .filter_map(|q| std::net::TcpListener::bind(("127.0.0.1", *q)).ok())
        .collect();
    if bound.len() != 2 {
        eprintln!("skipped: ports {others:?} next to {p} are not free on this machine");
        return;
    }
    drop(bound);
    let wl: Vec<String> = (0..3).map(|i| sleeper(&format!("p{i}"))).collect();
    let d = Daemon::start_with_args(
        &[("p0", &wl[0]), ("p1", &wl[1]), ("p2", &wl[2])],
        &["--port-range", &range],
    );
    let a = d.json(&["launch", "p0", "-o", "json"]);
    let b = d.json(&["launch", "p1", "-o", "json"]);
    let mut got = vec![port_of(&a), port_of(&b)];
    got.sort_unstable();
    assert_eq!(got, others, "the ports of the range, not the one in use");
    let out = d.cli(&["launch", "p2"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "no free port in range {range} (2 held by live instances"
        )),
        "{err}"
    );
    // A terminate gives its port back.
    let t = d.cli(&["terminate", a["id"].as_str().unwrap()]);
    assert!(t.status.success(), "{}", stderr(&t));
    let c = d.json(&["launch", "p2", "-o", "json"]);
    assert_eq!(port_of(&c), port_of(&a));
    drop(taken);
}

/// Regression: a restart leaked its run's port (the actor allocated a new one and never
/// released the old), so a crash loop used up the range. With a range of one port, a
/// workload that fails and restarts runs again and again on that port.
#[test]
fn a_restart_gives_its_port_back() {
    let free = taken_port();
    let p = free.local_addr().unwrap().port();
    drop(free);
    let range = p.to_string();
    let d = Daemon::start_with_args(
        &[(
            "flaky",
            "name: flaky\nisolation: none\ncommand: [/bin/sh, -c, 'echo run on $PORT; sleep 0.1; exit 3']\nrestart: {policy: on-failure, backoff: {initial: 10ms, max: 10ms, factor: 1, jitter: 0}, max_failures: 100}\n",
        )],
        &["--port-range", &range],
    );
    d.json(&["launch", "flaky", "--wait", "started", "-o", "json"]);
    let start = std::time::Instant::now();
    loop {
        let started = d
            .events()
            .into_iter()
            .filter(|e| e["kind"] == "started" && e["instance"] == "shared:flaky")
            .count();
        if started >= 4 {
            break;
        }
        let failed = d
            .events()
            .into_iter()
            .any(|e| e["instance"] == "shared:flaky" && e.to_string().contains("no free port"));
        assert!(!failed, "a restart found no port: {:#?}", d.events());
        assert!(
            start.elapsed() < DEADLINE,
            "fewer than 4 runs: {:#?}\n{}",
            d.events(),
            d.daemon_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let logs = d.cli(&["logs", "shared:flaky"]);
    let text = stdout(&logs);
    assert!(text.matches(&format!("run on {p}")).count() >= 3, "{text}");
}

/// A restart keeps the instance's address (the README's promise; every restart took a
/// new port before): a server that crashes after serving is reached again on the same
/// port, in the default range, and a client that kept the address talks to the new run.
#[test]
fn a_restart_keeps_the_instances_address() {
    let d = Daemon::start(&[(
        "srv",
        // No readiness probe: a TCP probe's connection would be the one client this
        // server serves (it raced the test's client for every run, and under load the
        // runs the probe took could end before they were counted ready).
        "name: srv\nisolation: none\ncommand: [/bin/sh, -c, 'echo run on $PORT; exec busybox nc -l -p $PORT -e echo hello']\n\
         restart: {policy: always, backoff: {initial: 10ms, max: 10ms, factor: 1, jitter: 0}}\n",
    )]);
    if Command::new("busybox")
        .arg("nc")
        .arg("--help")
        .output()
        .is_err()
    {
        eprintln!("skipped: no busybox nc");
        return;
    }
    let v = d.json(&["launch", "srv", "-o", "json"]);
    let port = v["port"].as_u64().unwrap() as u16;
    for round in 0..3 {
        // Each connection ends the run (nc -l serves one client), so each is a new run.
        let start = std::time::Instant::now();
        let got = loop {
            let mut out = String::new();
            let ok = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
                use std::io::Read as _;
                s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
                s.read_to_string(&mut out)
            });
            if ok.is_ok() && out.contains("hello") {
                break out;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "round {round}: no answer on {port}: {:#?}\n{}",
                d.events(),
                d.daemon_log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(got.contains("hello"));
    }
    let started = d
        .events()
        .into_iter()
        .filter(|e| e["kind"] == "started" && e["instance"] == "shared:srv")
        .count();
    assert!(started >= 3, "{started} runs");
    let now = d.json(&["get", "shared:srv", "-o", "json"]);
    assert_eq!(now["port"].as_u64(), Some(u64::from(port)), "{now}");
    let text = stdout(&d.cli(&["logs", "shared:srv"]));
    let runs: Vec<&str> = text.lines().filter(|l| l.starts_with("run on ")).collect();
    assert!(runs.len() >= 3, "{text}");
    assert!(
        runs.iter().all(|l| *l == format!("run on {port}")),
        "{runs:?}"
    );
}

/// A bad `--port-range` is a usage error naming what was given.
#[test]
fn a_bad_port_range_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--workloads"])
        .arg(dir.path())
        .args(["--port-range", "9000-80"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("invalid port range \"9000-80\""),
        "{}",
        stderr(&out)
    );
}
