//! Restarts, backoff, the circuit breaker, liveness, readiness flapping, leases and the
//! end of a scope. Timing is asserted only as order and lower bounds, from the events'
//! own timestamps.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

fn of(d: &Daemon, id: &str) -> Vec<Value> {
    d.events()
        .into_iter()
        .filter(|e| e["instance"] == id)
        .collect()
}

fn wait_count(d: &Daemon, id: &str, kind: &str, n: usize) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let evs = of(d, id);
        if evs.iter().filter(|e| e["kind"] == kind).count() >= n {
            return evs;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "fewer than {n} {kind} events for {id}: {evs:#?}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn t(e: &Value) -> u64 {
    e["time_ms"].as_u64().unwrap()
}

#[test]
fn on_failure_restarts_with_exponential_backoff() {
    let d = Daemon::start(&[(
        "flaky",
        "name: flaky\ncommand: [/bin/sh, -c, 'exit 3']\nrestart: {policy: on-failure, max_failures: 50, backoff: {initial: 100ms, factor: 2, max: 10s, jitter: 0.2}}\n",
    )]);
    d.json(&["launch", "flaky", "--wait", "started", "-o", "json"]);
    let evs = wait_count(&d, "ns:default:flaky", "started", 4);
    // Each restart: exited -> restarting {attempt, delay} -> started, and the gap between
    // the exit and the next start is at least the delay, which is at least the floor.
    let mut attempt = 0;
    for (i, e) in evs.iter().enumerate() {
        if e["kind"] != "restarting" {
            continue;
        }
        attempt += 1;
        assert_eq!(e["attempt"], attempt);
        let delay = e["delay_ms"].as_u64().unwrap();
        let floor = (100.0 * 2f64.powi(attempt - 1) * 0.8) as u64;
        let cap = (100.0 * 2f64.powi(attempt - 1)) as u64;
        assert!(
            delay >= floor && delay <= cap,
            "attempt {attempt}: delay {delay} not in [{floor}, {cap}]"
        );
        assert_eq!(evs[i - 1]["kind"], "exited");
        assert_eq!(evs[i - 1]["exit_code"], 3);
        if let Some(next) = evs[i + 1..].iter().find(|e| e["kind"] == "started") {
            assert!(
                t(next) >= t(&evs[i - 1]) + delay,
                "restart came before its backoff: {evs:#?}"
            );
        }
    }
    assert!(attempt >= 3, "{evs:#?}");
    let v = d.json(&["get", "ns:default:flaky", "-o", "json"]);
    assert_eq!(v["id"], "ns:default:flaky", "a restart keeps the id");
    assert!(v["restarts"].as_u64().unwrap() >= 3);
    assert_eq!(v["last_exit"]["code"], 3);
    assert_eq!(v["breaker"], "closed");
}

#[test]
fn the_breaker_opens_fails_launches_fast_and_half_opens_after_the_cooldown() {
    let d = Daemon::start(&[(
        "crashy",
        "name: crashy\ncommand: [/bin/sh, -c, 'kill -SEGV $$']\nrestart: {policy: always, max_failures: 3, cooldown: 1s, backoff: {initial: 20ms, jitter: 0}}\n",
    )]);
    d.cli(&["launch", "crashy", "--wait", "started"]);
    let evs = wait_count(&d, "ns:default:crashy", "breaker_open", 1);
    let open = evs
        .iter()
        .find(|e| e["kind"] == "breaker_open")
        .unwrap()
        .clone();
    assert_eq!(open["failures"], 3);
    assert_eq!(evs.iter().filter(|e| e["kind"] == "crashed").count(), 3);
    // While open: launches fail fast with the reason.
    let o = d.cli(&["launch", "crashy"]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("circuit breaker open after 3"),
        "{}",
        stderr(&o)
    );
    let v = d.json(&["get", "ns:default:crashy", "-o", "json"]);
    assert_eq!(v["breaker"], "open");
    assert_eq!(v["state"], "restarting");
    // After the cooldown: half-open, one trial, which crashes: open again.
    let evs = wait_count(&d, "ns:default:crashy", "breaker_open", 2);
    let half = evs
        .iter()
        .find(|e| e["kind"] == "breaker_half_open")
        .unwrap();
    assert!(t(half) >= t(&open) + 1000, "half-open before the cooldown");
    let second_open = evs
        .iter()
        .filter(|e| e["kind"] == "breaker_open")
        .nth(1)
        .unwrap();
    assert!(t(second_open) > t(half));
    // Terminate ends it for good; a new launch starts with a closed breaker.
    let v = d.json(&["terminate", "ns:default:crashy", "-o", "json"]);
    assert_eq!(v["state"], "terminated");
}

#[test]
fn a_successful_trial_closes_the_breaker() {
    let d = Daemon::start(&[]);
    let counter = d.dir.path().join("runs");
    let m = format!(
        "name: heals\ncommand: [/bin/sh, -c, 'n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; [ $n -le 2 ] && exit 1; exec sleep 1000']\nrestart: {{policy: on-failure, max_failures: 2, cooldown: 300ms, backoff: {{initial: 10ms}}}}\n",
        c = counter.display()
    );
    write_workload(&d.workloads, "heals", &m, &[]);
    assert!(d.cli(&["reload"]).status.success());
    d.cli(&["launch", "heals", "--wait", "started"]);
    let evs = wait_count(&d, "ns:default:heals", "breaker_closed", 1);
    let kinds: Vec<&str> = evs.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    let open = kinds.iter().position(|k| *k == "breaker_open").unwrap();
    let half = kinds
        .iter()
        .position(|k| *k == "breaker_half_open")
        .unwrap();
    let closed = kinds.iter().position(|k| *k == "breaker_closed").unwrap();
    assert!(open < half && half < closed, "{kinds:?}");
    let v = d.json(&["launch", "heals", "-o", "json"]);
    assert_eq!(v["state"], "ready");
    assert_eq!(v["breaker"], "closed");
    assert_eq!(v["created"], false);
}

#[test]
fn a_liveness_failure_restarts_the_instance() {
    // Nothing listens on the probed port: liveness fails after two attempts.
    let d = Daemon::start(&[(
        "zombie",
        "name: zombie\ncommand: [/bin/sh, -c, 'exec sleep 1000']\nliveness: {tcp: {period: 50ms, failure_threshold: 2}}\nshutdown: {grace: 1s}\nrestart: {policy: on-failure, max_failures: 100, backoff: {initial: 10ms}}\n",
    )]);
    let first = d.json(&["launch", "zombie", "-o", "json"]);
    let evs = wait_count(&d, "ns:default:zombie", "started", 2);
    let kinds: Vec<&str> = evs.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    let lf = kinds
        .iter()
        .position(|k| *k == "liveness_failed")
        .expect("liveness_failed");
    assert_eq!(
        &kinds[lf..lf + 4],
        &["liveness_failed", "terminating", "terminated", "restarting"]
    );
    assert!(
        evs[lf]["reason"].as_str().unwrap().contains("tcp"),
        "{:?}",
        evs[lf]
    );
    let old_pid = first["pid"].as_u64().unwrap() as u32;
    assert!(wait_gone(old_pid), "the failed process was stopped");
}

#[test]
fn readiness_flapping_is_reported_without_killing() {
    let Some(py) = python3() else { return };
    let d = Daemon::start(&[]);
    let flag = d.dir.path().join("sick");
    let server = format!(
        "import os, http.server\n\nclass H(http.server.BaseHTTPRequestHandler):\n    def do_GET(self):\n        self.send_response(503 if os.path.exists('{}') else 200)\n        self.end_headers()\n    def log_message(self, *a):\n        pass\n\nhttp.server.HTTPServer(('127.0.0.1', int(os.environ['PORT'])), H).serve_forever()\n",
        flag.display()
    );
    write_workload(
        &d.workloads,
        "flappy",
        &format!("name: flappy\ncommand: [{py}, server.py]\nreadiness: {{http: {{path: /healthz, period: 30ms, failure_threshold: 2}}, timeout: 20s}}\n"),
        &[("server.py", &server)],
    );
    assert!(d.cli(&["reload"]).status.success());
    let v = d.json(&["launch", "flappy", "-o", "json"]);
    std::fs::write(&flag, "").unwrap();
    wait_count(&d, "ns:default:flappy", "unhealthy", 1);
    let sick = d.json(&["get", "ns:default:flappy", "-o", "json"]);
    assert_eq!(sick["ready"], false);
    assert_eq!(sick["state"], "ready", "flapping does not kill");
    assert_eq!(sick["pid"], v["pid"]);
    std::fs::remove_file(&flag).unwrap();
    wait_count(&d, "ns:default:flappy", "ready", 2);
    let healed = d.json(&["get", "ns:default:flappy", "-o", "json"]);
    assert_eq!(healed["ready"], true);
    assert_eq!(healed["pid"], v["pid"]);
}

#[test]
fn leases_hold_an_instance_and_idle_timeout_ends_it() {
    let d = Daemon::start(&[(
        "leased",
        "name: leased\ncommand: [/bin/sh, -c, 'exec sleep 1000']\nidle_timeout: 300ms\n",
    )]);
    let v = d.json(&["launch", "leased", "--lease", "alice", "-o", "json"]);
    assert_eq!(v["leases"], serde_json::json!(["alice"]));
    d.json(&["launch", "leased", "--lease", "bob", "-o", "json"]);
    let r = d.json(&["release", "ns:default:leased", "alice", "-o", "json"]);
    assert_eq!(r["leases"], serde_json::json!(["bob"]));
    // Still held by bob: no idle clock runs.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        d.json(&["get", "ns:default:leased", "-o", "json"])["state"],
        "ready"
    );
    // Unknown holder: not found.
    let o = d.cli(&["release", "ns:default:leased", "carol"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let released_at = crate::harness::now_ms();
    d.json(&["release", "ns:default:leased", "bob", "-o", "json"]);
    let evs = wait_count(&d, "ns:default:leased", "terminated", 1);
    let term = evs.iter().find(|e| e["kind"] == "terminating").unwrap();
    assert!(
        t(term) >= released_at + 300,
        "idle timeout ran from the last release"
    );
}

#[test]
fn end_session_and_end_namespace_terminate_their_scope() {
    let d = Daemon::start(&[
        (
            "a",
            "name: a\ncommand: [/bin/sh, -c, 'exec sleep 1000']\nisolation: session\n",
        ),
        (
            "b",
            "name: b\ncommand: [/bin/sh, -c, 'exec sleep 1000']\nisolation: session\n",
        ),
        (
            "n",
            "name: n\ncommand: [/bin/sh, -c, 'exec sleep 1000']\nisolation: namespace\n",
        ),
    ]);
    let mut pids = Vec::new();
    for (w, s) in [("a", "s1"), ("b", "s1"), ("a", "s2")] {
        let v = d.json(&["launch", w, "--session", s, "-o", "json"]);
        pids.push(v["pid"].as_u64().unwrap() as u32);
    }
    let gone = d.json(&["end-session", "s1", "-o", "json"]);
    let ids: Vec<&str> = gone
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["session:s1:a", "session:s1:b"]);
    assert!(!alive(pids[0]) && !alive(pids[1]));
    assert_eq!(
        d.json(&["get", "session:s2:a", "-o", "json"])["state"],
        "ready"
    );
    d.json(&["launch", "n", "--namespace", "t1", "-o", "json"]);
    d.json(&["launch", "n", "--namespace", "t2", "-o", "json"]);
    let gone = d.json(&["end-namespace", "t1", "-o", "json"]);
    assert_eq!(gone.as_array().unwrap().len(), 1);
    assert_eq!(
        d.json(&["get", "ns:t1:n", "-o", "json"])["state"],
        "terminated"
    );
    assert_eq!(d.json(&["get", "ns:t2:n", "-o", "json"])["state"], "ready");
    let o = d.cli(&["end-session", "../x"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
}

/// The sd_notify watchdog through the Python SDK (`sdk/python`): a program that stops
/// sending `WATCHDOG=1` is stopped with the watchdog signal (SIGABRT), reported
/// `watchdog_timeout` with the reason, and restarted by its policy; one that keeps
/// sending it is left alone (the control); `WATCHDOG=trigger` fails it at once;
/// `EXTEND_TIMEOUT_USEC` moves the readiness deadline out; `RELOADING=1` makes a ready
/// instance not ready until its next `READY=1`.
#[test]
fn the_sd_notify_watchdog_and_friends() {
    let Some(py) = python3() else { return };
    let sdk = concat!(env!("CARGO_MANIFEST_DIR"), "/../../sdk/python");
    let script = |body: &str| {
        format!("import sys, time; sys.path.insert(0, {sdk:?}); import bulkhead_sdk as b\n{body}")
    };
    let manifest = |name: &str, body: &str, readiness: &str| {
        format!(
            "name: {name}\ncommand: [{py}, -c, {:?}]\nreadiness: {{{readiness}}}\nrestart: {{policy: on-failure, backoff: {{initial: 10ms}}}}\nshutdown: {{grace: 5s}}\n",
            script(body)
        )
    };
    // Three beats, then silence.
    let stops = manifest(
        "stops",
        "w = b.watchdog_interval(); b.notify_ready()\nfor _ in range(3):\n    time.sleep(w / 3); b.notify_watchdog()\ntime.sleep(1000)",
        "notify: true, watchdog: 2s",
    );
    let beats = manifest(
        "beats",
        "w = b.watchdog_interval(); b.notify_ready()\nwhile True:\n    time.sleep(w / 3); b.notify_watchdog()",
        "notify: true, watchdog: 2s",
    );
    let trigger = manifest(
        "trigger",
        "b.notify_ready(); time.sleep(0.3); b.notify_watchdog(trigger=True); time.sleep(1000)",
        "notify: true, watchdog: 60s",
    );
    let slow = manifest(
        "slow",
        "b.extend_timeout(8); time.sleep(4.5); b.notify_ready(); time.sleep(1000)",
        "notify: true, timeout: 3s",
    );
    let reload = manifest(
        "reload",
        "b.notify_ready(); time.sleep(0.5); b.notify_reloading(); time.sleep(1); b.notify_ready(); time.sleep(1000)",
        "notify: true",
    );
    let d = Daemon::start(&[
        ("stops", &stops),
        ("beats", &beats),
        ("trigger", &trigger),
        ("slow", &slow),
        ("reload", &reload),
    ]);
    for w in ["stops", "beats", "trigger", "reload"] {
        let v = d.json(&["launch", w, "-o", "json"]);
        assert_eq!(v["state"], "ready", "{w}: {v}");
    }
    // The one that fell silent.
    let evs = wait_count(&d, "ns:default:stops", "restarting", 1);
    let kinds: Vec<&str> = evs.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    let at = kinds
        .iter()
        .position(|k| *k == "watchdog_timeout")
        .unwrap_or_else(|| panic!("no watchdog_timeout: {kinds:?}"));
    assert_eq!(
        &kinds[at..at + 4],
        &[
            "watchdog_timeout",
            "terminating",
            "terminated",
            "restarting"
        ]
    );
    assert_eq!(
        evs[at]["reason"],
        "no WATCHDOG=1 within the watchdog interval of 2s"
    );
    assert_eq!(evs[at + 1]["signal"], 6, "the watchdog signal: SIGABRT");
    // Each beat was at least three of them apart from the start: the watchdog does not
    // fire while beats come (order and lower bound only).
    let started = evs.iter().find(|e| e["kind"] == "started").unwrap();
    assert!(evs[at]["time_ms"].as_u64() >= Some(started["time_ms"].as_u64().unwrap() + 2000));
    // The trigger.
    let evs = wait_count(&d, "ns:default:trigger", "watchdog_timeout", 1);
    let e = evs
        .iter()
        .find(|e| e["kind"] == "watchdog_timeout")
        .unwrap();
    assert_eq!(
        e["reason"],
        "the instance triggered its watchdog (WATCHDOG=trigger)"
    );
    // The control: the one that keeps beating has had no watchdog_timeout all along.
    assert!(
        !of(&d, "ns:default:beats")
            .iter()
            .any(|e| e["kind"] == "watchdog_timeout"),
        "{:#?}",
        of(&d, "ns:default:beats")
    );
    assert_eq!(
        d.json(&["get", "ns:default:beats", "-o", "json"])["restarts"],
        0
    );
    // EXTEND_TIMEOUT_USEC: ready after 4.5 s with a 3 s readiness timeout.
    let v = d.json(&["launch", "slow", "-o", "json"]);
    assert_eq!(v["state"], "ready", "{v}");
    assert_eq!(v["restarts"], 0, "{v}");
    // RELOADING=1 then READY=1: unhealthy ("reloading"), then ready again.
    let evs = wait_count(&d, "ns:default:reload", "ready", 2);
    let e = evs.iter().find(|e| e["kind"] == "unhealthy").unwrap();
    assert_eq!(e["reason"], "reloading (sd_notify RELOADING=1)");
    assert!(
        !evs.iter().any(|e| e["kind"] == "terminating"),
        "a reload stops nothing: {evs:#?}"
    );
}

/// `EXTEND_TIMEOUT_USEC=` while stopping moves the SIGKILL out, as systemd's does: a
/// program that needs 1.5 s to shut down under a grace of 500 ms asks for more on SIGTERM
/// and exits 0 by itself; the control, which does not ask, is SIGKILLed at the grace.
#[test]
fn extend_timeout_while_stopping_moves_the_sigkill_out() {
    let Some(py) = python3() else { return };
    let sdk = concat!(env!("CARGO_MANIFEST_DIR"), "/../../sdk/python");
    let manifest = |name: &str, on_term: &str| {
        let body = format!(
            "import signal, sys, time; sys.path.insert(0, {sdk:?}); import bulkhead_sdk as b\n\
             def term(*_):\n    {on_term}time.sleep(1.5); sys.exit(0)\n\
             signal.signal(signal.SIGTERM, term); b.notify_ready()\nwhile True: time.sleep(1)"
        );
        format!(
            "name: {name}\ncommand: [{py}, -c, {body:?}]\nreadiness: {{notify: true}}\nshutdown: {{grace: 500ms}}\n"
        )
    };
    let d = Daemon::start(&[
        ("asks", &manifest("asks", "b.extend_timeout(10); ")),
        ("plain", &manifest("plain", "")),
    ]);
    for w in ["asks", "plain"] {
        d.json(&["launch", w, "--wait", "ready", "-o", "json"]);
    }
    let asks = d.json(&["terminate", "ns:default:asks", "-o", "json"]);
    assert_eq!(asks["last_exit"]["code"], 0, "{asks:#}");
    let plain = d.json(&["terminate", "ns:default:plain", "-o", "json"]);
    assert_eq!(plain["last_exit"]["signal"], 9, "{plain:#}");
}
