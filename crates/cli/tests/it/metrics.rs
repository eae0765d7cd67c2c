//! `bulkhead serve --metrics ADDR`: the Prometheus exposition, /health and /ready, scraped
//! over plain HTTP from the real daemon after launches, reuses, a failure and a crash.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

/// A port that was free a moment ago (the daemon is told the number; port 0 could not be
/// discovered from outside).
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A plain HTTP/1.1 GET: (status, headers, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let (head, body) = buf
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {buf:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, head.to_owned(), body.to_owned())
}

/// One sample of the exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

/// Parses the OpenMetrics / Prometheus text format: `name{k="v",...} value`, comments
/// and `# EOF` skipped, label values unescaped.
fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let value = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), HashMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("bad labels in {line:?}"));
                (name.to_owned(), parse_labels(body))
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

fn parse_labels(body: &str) -> HashMap<String, String> {
    let mut labels = HashMap::new();
    let mut chars = body.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return labels;
        }
        assert_eq!(
            chars.next(),
            Some('"'),
            "label {key} not quoted in {body:?}"
        );
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => panic!("dangling escape in {body:?}"),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').to_owned(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
}

/// The value of the one sample with this name and these labels (and maybe others).
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert!(found.len() <= 1, "several {name} {labels:?}: {found:?}");
    found.first().map(|s| s.value)
}

/// Scrapes until `ready(samples)` holds (the metrics follow the events asynchronously).
fn scrape_until(
    d: &Daemon,
    addr: SocketAddr,
    what: &str,
    ready: impl Fn(&[Sample]) -> bool,
) -> (String, Vec<Sample>) {
    let start = Instant::now();
    loop {
        let (status, head, body) = get(addr, "/metrics");
        assert_eq!(status, 200, "{head}\n{body}");
        let samples = parse(&body);
        if ready(&samples) {
            return (head, samples);
        }
        assert!(
            start.elapsed() < DEADLINE,
            "metrics never showed {what}:\n{body}\n--- daemon log ---\n{}",
            d.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn metrics_health_and_ready_are_served_over_http() {
    let addr = free_addr();
    let d = Daemon::start_with_args(
        &[
            (
                "web",
                "name: web\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n",
            ),
            (
                "segv",
                "name: segv\nisolation: none\ncommand: [/bin/sh, -c, 'sleep 0.2; kill -SEGV $$']\n",
            ),
        ],
        &["--metrics", &addr.to_string()],
    );
    let a1 = d.json(&["launch", "web", "--namespace", "a", "-o", "json"]);
    assert_eq!(a1["created"], true);
    let b = d.json(&["launch", "web", "--namespace", "b", "-o", "json"]);
    assert_eq!(b["created"], true);
    let a2 = d.json(&["launch", "web", "--namespace", "a", "-o", "json"]);
    assert_eq!(a2["created"], false);
    assert!(!d.cli(&["launch", "nope"]).status.success());
    d.json(&["launch", "segv", "-o", "json"]);
    d.wait_event("segv crashed", |e| {
        e["kind"] == "crashed" && e["instance"] == "shared:segv"
    });

    let (head, m) = scrape_until(&d, addr, "the crash", |m| {
        value(m, "bulkhead_crashes_total", &[("signal", "SIGSEGV")]) == Some(1.0)
    });
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    let launches = |result| value(&m, "bulkhead_launches_total", &[("result", result)]);
    assert_eq!(launches("created"), Some(3.0));
    assert_eq!(launches("reused"), Some(1.0));
    assert_eq!(launches("failed"), Some(1.0));
    assert_eq!(value(&m, "bulkhead_starts_total", &[]), Some(3.0));
    assert_eq!(
        value(&m, "bulkhead_events_total", &[("kind", "launched")]),
        Some(3.0)
    );
    assert_eq!(
        value(&m, "bulkhead_events_total", &[("kind", "crashed")]),
        Some(1.0)
    );
    assert_eq!(value(&m, "bulkhead_restarts_total", &[]), Some(0.0));
    // Every instance became ready once: three launch -> ready samples.
    assert_eq!(
        value(&m, "bulkhead_launch_ready_duration_seconds_count", &[]),
        Some(3.0)
    );
    assert_eq!(
        value(
            &m,
            "bulkhead_launch_ready_duration_seconds_bucket",
            &[("le", "+Inf")]
        ),
        Some(3.0)
    );
    let lag = value(&m, "bulkhead_event_delivery_lag_seconds_count", &[]).unwrap();
    let events: f64 = m
        .iter()
        .filter(|s| s.name == "bulkhead_events_total")
        .map(|s| s.value)
        .sum();
    assert_eq!(lag, events, "one lag sample per event");
    assert_eq!(
        value(
            &m,
            "bulkhead_instances_running",
            &[("workload", "web"), ("isolation", "namespace")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(&m, "bulkhead_instances_running", &[("workload", "segv")]),
        None,
        "a crashed instance is not running"
    );
    assert_eq!(
        value(&m, "bulkhead_instances", &[("state", "ready")]),
        Some(2.0)
    );
    assert_eq!(
        value(&m, "bulkhead_instances", &[("state", "crashed")]),
        Some(1.0)
    );
    let inst = [("instance", "ns:a:web"), ("workload", "web")];
    assert!(value(&m, "bulkhead_instance_cpu_seconds_total", &inst).unwrap() >= 0.0);
    assert!(value(&m, "bulkhead_instance_resident_memory_bytes", &inst).unwrap() > 0.0);

    let (status, head, body) = get(addr, "/health");
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("application/json"));
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["status"], "serving");
    assert!(h["uptime_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(h["instances"]["total"], 3);
    assert_eq!(h["instances"]["live"], 2);
    assert_eq!(h["instances"]["by_state"]["ready"], 2);
    assert_eq!(h["instances"]["by_state"]["crashed"], 1);
    assert_eq!(h["instances"]["by_state"]["terminated"], 0);
    assert_eq!(h["open_breakers"], serde_json::json!([]));
    assert_eq!(h["workloads"]["valid"], 2);
    // How process instances are tracked: the same as `bulkhead health -o json` says.
    assert_eq!(
        h["process_tracking"],
        d.json(&["health", "-o", "json"])["process_tracking"],
        "{h}"
    );
    let tracking = h["process_tracking"].as_str().unwrap();
    assert!(
        tracking.starts_with("cgroup /") || tracking == "process group",
        "{tracking}"
    );

    let (status, _, body) = get(addr, "/ready");
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    assert_eq!(get(addr, "/nope").0, 404);
}

#[test]
fn a_metrics_address_in_use_fails_start_up_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wl = dir.path().join("workloads");
    std::fs::create_dir_all(&wl).unwrap();
    let socket = dir.path().join("api.sock");
    let out = Command::new(BIN)
        .args(["serve", "--workloads"])
        .arg(&wl)
        .arg("--state")
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(&socket)
        .args(["--metrics", &addr.to_string()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("cannot bind metrics listener {addr}")),
        "{err}"
    );
    assert!(!socket.exists(), "the API socket is left behind");
}

/// While the keeper is down and a new one cannot start, `health` says `degraded` and
/// `/ready` answers 503 (regression: both said ok while every process launch failed);
/// once it can start again the daemon recovers by itself.
#[test]
fn health_and_ready_tell_the_truth_while_the_keeper_is_down() {
    let addr = free_addr();
    let d = Daemon::start_with_args(
        &[(
            "web",
            "name: web\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n",
        )],
        &["--metrics", &addr.to_string()],
    );
    assert_eq!(get(addr, "/ready").0, 200);
    let keeper = d.keeper_pid().expect("a keeper runs");
    // A new keeper cannot start: its log file is a folder.
    let log = d.state.join("keeper.log");
    std::fs::remove_file(&log).unwrap();
    std::fs::create_dir(&log).unwrap();
    // SAFETY: kill(2) on the keeper of this test's own state directory.
    unsafe {
        libc::kill(keeper as i32, libc::SIGKILL);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let h = d.json(&["health", "-o", "json"]);
        if h["status"]
            .as_str()
            .is_some_and(|s| s.starts_with("degraded"))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "health never said degraded: {h}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    let (code, _, body) = get(addr, "/ready");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("keeper"), "{body}");
    let (_, _, health) = get(addr, "/health");
    assert!(health.contains("\"degraded\""), "{health}");
    // It can start again: the daemon recovers without help.
    std::fs::remove_dir(&log).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while get(addr, "/ready").0 != 200 {
        assert!(std::time::Instant::now() < deadline, "never ready again");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(d.json(&["health", "-o", "json"])["status"], "ok");
    let v = d.json(&["launch", "web", "-o", "json"]);
    assert_eq!(v["state"], "ready", "{v}");
}
