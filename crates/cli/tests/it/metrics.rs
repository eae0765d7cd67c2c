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
        // What Prometheus sends: OpenMetrics preferred.
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\nConnection: close\r\n\r\n"
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
    // Restarts are counted per workload; nothing restarted here.
    assert_eq!(
        value(&m, "bulkhead_restarts_total", &[("workload", "segv")]),
        None
    );
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
    // An instance's series are labelled `id` (Prometheus owns `instance`).
    let inst = [("id", "ns:a:web"), ("workload", "web")];
    assert!(value(&m, "bulkhead_instance_cpu_seconds_total", &inst).unwrap() >= 0.0);
    assert!(value(&m, "bulkhead_instance_resident_memory_bytes", &inst).unwrap() > 0.0);
    assert_eq!(value(&m, "bulkhead_instance_ready", &inst), Some(1.0));
    assert!(
        m.iter().all(|s| !s.labels.contains_key("instance")),
        "no series carries an `instance` label"
    );
    let version = [("version", env!("CARGO_PKG_VERSION"))];
    assert_eq!(value(&m, "bulkhead_build_info", &version), Some(1.0));
    assert!(value(&m, "process_resident_memory_bytes", &[]).unwrap() > 0.0);
    assert!(value(&m, "process_open_fds", &[]).unwrap() > 0.0);

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
    assert_eq!(d.json(&["health", "-o", "json"])["status"], "serving");
    let v = d.json(&["launch", "web", "-o", "json"]);
    assert_eq!(v["state"], "ready", "{v}");
}

const SCRAPE_TOKEN: &str = "scrape-3f9d2c81a7b64e0d9c5b1a2e7f4d8c6b";

/// A token file (the `--tokens` format) with one token, as an operator writes it, and the
/// plain token in a file of its own, as Prometheus' `credentials_file` reads it.
fn token_files(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let tokens = dir.join("metrics-tokens.yaml");
    std::fs::write(
        &tokens,
        format!(
            "tokens:\n  - name: prometheus\n    token_sha256: {}\n",
            bulkhead_daemon::auth::token_sha256_hex(SCRAPE_TOKEN)
        ),
    )
    .unwrap();
    let plain = dir.join("scrape.token");
    std::fs::write(&plain, format!("{SCRAPE_TOKEN}\n")).unwrap();
    (tokens, plain)
}

/// `curl -sS -o BODY -w '%{http_code}' [ARGS] URL`: (status, body).
fn curl(args: &[&str], url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-o", "-", "-w", "\n%{http_code}", "--max-time", "30"])
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn have(program: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("skipping the {program} part: {program} is not installed");
    }
    found
}

/// A daemon whose monitoring listener needs a token (`--metrics-tokens`, files in `dir`),
/// running one instance; its address and the file holding the plain token.
fn guarded_daemon(dir: &std::path::Path) -> (Daemon, SocketAddr, std::path::PathBuf) {
    let (tokens, plain) = token_files(dir);
    let addr = free_addr();
    let d = Daemon::start_with_args(
        &[(
            "web",
            "name: web\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n",
        )],
        &[
            "--metrics",
            &addr.to_string(),
            "--metrics-tokens",
            tokens.to_str().unwrap(),
        ],
    );
    d.json(&["launch", "web", "-o", "json"]);
    (d, addr, plain)
}

/// `--metrics-tokens`: without a valid bearer token every path answers 401 with
/// `WWW-Authenticate: Bearer` (the path is not even looked at); with one, curl (a stock
/// client; `-H @file` and `--oauth2-bearer`, the forms a probe uses) reads /metrics,
/// /health and /ready.
#[test]
fn metrics_tokens_guard_every_path_and_stock_clients_pass_with_the_token() {
    if !have("curl") {
        return;
    }
    let files = tempfile::tempdir().unwrap();
    let (_daemon, addr, plain) = guarded_daemon(files.path());
    for path in ["/metrics", "/health", "/ready", "/nope"] {
        let (status, head, body) = get(addr, path);
        assert_eq!(status, 401, "{path}: {body}");
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: bearer realm=\"bulkhead\""),
            "{head}"
        );
        assert!(!body.contains("bulkhead_"), "{path} leaked: {body}");
    }
    let url = |p: &str| format!("http://{addr}{p}");
    for bad in [
        "Authorization: Bearer wrong",
        "Authorization: Basic c2NyYXBl",
    ] {
        assert_eq!(curl(&["-H", bad], &url("/metrics")).0, 401, "{bad}");
    }
    let header = files.path().join("auth.header");
    std::fs::write(&header, format!("Authorization: Bearer {SCRAPE_TOKEN}\n")).unwrap();
    let from_file = format!("@{}", header.display());
    let (status, metrics) = curl(&["-H", &from_file], &url("/metrics"));
    assert_eq!(status, 200, "{metrics}");
    assert!(
        metrics.contains("bulkhead_launches_total{result=\"created\"} 1"),
        "{metrics}"
    );
    let token = std::fs::read_to_string(&plain).unwrap();
    let (status, health) = curl(&["--oauth2-bearer", token.trim()], &url("/health"));
    assert_eq!(status, 200, "{health}");
    let h: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(h["instances"]["live"], 1);
    assert_eq!(
        curl(&["-H", &from_file], &url("/ready")),
        (200, "ready\n".to_owned())
    );
}

/// A metrics listener on an address that is not loopback needs tokens: without them start-up
/// fails naming the address and the two ways out, and leaves no socket; with
/// `--metrics-insecure` it serves without a token and warns in the log.
#[test]
fn a_non_loopback_metrics_listener_without_tokens_is_refused_unless_insecure() {
    let port = free_addr().port();
    let any = format!("0.0.0.0:{port}");
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
        .args(["--metrics", &any])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("--metrics {any} is not a loopback address"))
            && err.contains("--metrics-tokens")
            && err.contains("--metrics-insecure"),
        "{err}"
    );
    assert!(!socket.exists(), "the API socket is left behind");

    let d = Daemon::start_with_args(&[], &["--metrics", &any, "--metrics-insecure"]);
    let local: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(get(local, "/ready").0, 200);
    assert!(
        d.daemon_log().contains("is not loopback and asks no token"),
        "{}",
        d.daemon_log()
    );
}

/// On loopback no token is asked by default (the existing tests scrape so); the token
/// flags only apply with `--metrics`, and a token file without tokens is refused.
#[test]
fn metrics_token_flags_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.yaml");
    std::fs::write(&empty, "tokens: []\n").unwrap();
    let serve = |args: &[&str]| {
        Command::new(BIN)
            .args(["serve", "--workloads"])
            .arg(dir.path())
            .arg("--state")
            .arg(dir.path().join("state"))
            .arg("--socket")
            .arg(dir.path().join("api.sock"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = serve(&["--metrics-tokens", empty.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("only apply with --metrics ADDR"));
    let addr = free_addr().to_string();
    let out = serve(&[
        "--metrics",
        &addr,
        "--metrics-tokens",
        empty.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the file has no tokens"),
        "{}",
        stderr(&out)
    );
    let missing = dir.path().join("missing.yaml");
    let out = serve(&[
        "--metrics",
        &addr,
        "--metrics-tokens",
        missing.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("cannot read token file {}", missing.display())),
        "{}",
        stderr(&out)
    );
}

/// `promtool check metrics` (Prometheus' own linter, a stock client) accepts what a
/// default `curl` of `/metrics` gets: the classic text format, since curl does not ask
/// for OpenMetrics (Prometheus does, and gets it: the test above). Skipped without
/// `promtool` (CI installs it).
#[test]
fn promtool_accepts_the_metrics_a_plain_client_gets() {
    if !have("promtool") || !have("curl") {
        return;
    }
    let addr = free_addr();
    let d = Daemon::start_with_args(
        &[(
            "web",
            "name: web\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n",
        )],
        &["--metrics", &addr.to_string()],
    );
    d.json(&["launch", "web", "--namespace", "a", "-o", "json"]);
    scrape_until(&d, addr, "the launch", |m| {
        value(m, "bulkhead_starts_total", &[]) == Some(1.0)
    });
    let out = Command::new("curl")
        .args(["-sS", "-D", "-", "--max-time", "30"])
        .arg(format!("http://{addr}/metrics"))
        .output()
        .expect("run curl");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(body.contains("bulkhead_starts_total 1"), "{body}");
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    use std::io::Write as _;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let res = check.wait_with_output().unwrap();
    assert!(
        res.status.success(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
}

/// Kills the Prometheus server a test started, whatever the test's outcome.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real Prometheus server scrapes a daemon with `--metrics-tokens`: the job with
/// `authorization: {credentials_file: ...}` is up and its samples are stored; the same
/// target without credentials (the control) is down. Skipped without `prometheus`.
#[test]
fn prometheus_scrapes_with_a_credentials_file() {
    if !have("prometheus") || !have("curl") {
        return;
    }
    let files = tempfile::tempdir().unwrap();
    let (_daemon, addr, plain) = guarded_daemon(files.path());
    let config = files.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 1s}}\n\
             scrape_configs:\n\
             - job_name: with-token\n  static_configs: [{{targets: ['{addr}']}}]\n  \
             authorization: {{type: Bearer, credentials_file: {}}}\n\
             - job_name: without-token\n  static_configs: [{{targets: ['{addr}']}}]\n",
            plain.display()
        ),
    )
    .unwrap();
    let web = free_addr();
    let log = std::fs::File::create(files.path().join("prometheus.log")).unwrap();
    let _prom = KillOnDrop(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                files.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let query = |q: &str| -> Option<Value> {
        let (status, body) = curl(
            &["-G", "--data-urlencode", &format!("query={q}")],
            &format!("http://{web}/api/v1/query"),
        );
        (status == 200)
            .then(|| serde_json::from_str::<Value>(&body).ok())
            .flatten()
    };
    let up_of = |v: &Value, job: &str| -> Option<String> {
        v["data"]["result"]
            .as_array()?
            .iter()
            .find(|r| r["metric"]["job"] == job)
            .and_then(|r| r["value"][1].as_str().map(str::to_owned))
    };
    let start = Instant::now();
    loop {
        if let Some(v) = query("up") {
            if let (Some(with), Some(without)) =
                (up_of(&v, "with-token"), up_of(&v, "without-token"))
            {
                if with == "1" {
                    assert_eq!(without, "0", "a scrape without a token succeeded: {v}");
                    break;
                }
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "prometheus never scraped the daemon:\n{}",
            std::fs::read_to_string(files.path().join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let start = Instant::now();
    loop {
        let v = query("bulkhead_launches_total{job=\"with-token\",result=\"created\"}");
        if v.as_ref().and_then(|v| {
            v["data"]["result"][0]["value"][1]
                .as_str()
                .map(str::to_owned)
        }) == Some("1".to_owned())
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no stored sample: {v:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The alert rules `docs/metrics.md` documents are valid Prometheus rules. Skipped without
/// `promtool` (CI installs it).
#[test]
fn the_documented_alert_rules_pass_promtool() {
    if !have("promtool") {
        return;
    }
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/alerts.yml");
    let out = Command::new("promtool")
        .args(["check", "rules", rules])
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("SUCCESS: 5 rules found"));
}

/// The keeper's spare slot: ready, its memory, the launches that took it and the spares
/// made (README, "The spare").
#[test]
fn the_process_spare_is_in_the_metrics() {
    let addr = free_addr();
    let d = Daemon::start_with_args(
        &[(
            "web",
            "name: web\nisolation: session\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n",
        )],
        &["--metrics", &addr.to_string()],
    );
    let (_, m) = scrape_until(&d, addr, "a spare", |m| {
        value(m, "bulkhead_process_spare_ready", &[]) == Some(1.0)
    });
    assert!(value(&m, "bulkhead_process_spare_memory_bytes", &[]).unwrap() > 0.0);
    assert_eq!(
        value(&m, "bulkhead_process_spare_launches_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        value(&m, "bulkhead_process_spares_made_total", &[]),
        Some(1.0)
    );
    d.json(&["launch", "web", "--session", "a", "-o", "json"]);
    scrape_until(&d, addr, "the launch from the spare and a new spare", |m| {
        value(m, "bulkhead_process_spare_launches_total", &[]) == Some(1.0)
            && value(m, "bulkhead_process_spares_made_total", &[]) == Some(2.0)
            && value(m, "bulkhead_process_spare_ready", &[]) == Some(1.0)
    });
}
