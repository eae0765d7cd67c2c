//! Readiness: sd_notify, probes, and readiness bounded by liveness.

use std::time::{Duration, Instant};

use crate::harness::*;

fn notify_program(py: &str, before_ready: &str) -> String {
    // An unmodified program using the sd_notify wire protocol from its own process.
    format!(
        "[{py}, -c, 'import os,socket,time; {before_ready}; s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.sendto(b\"STATUS=up\\nREADY=1\", os.environ[\"NOTIFY_SOCKET\"]); time.sleep(1000)']"
    )
}

#[test]
fn notify_readiness_from_an_sd_notify_program() {
    let Some(py) = python3() else { return };
    let m = format!(
        "name: notifier\ncommand: {}\nreadiness: {{notify: true, timeout: 30s}}\n",
        notify_program(py, "time.sleep(0.2)")
    );
    let d = Daemon::start(&[("notifier", &m)]);
    let v = d.json(&["launch", "notifier", "-o", "json"]);
    assert_eq!(v["state"], "ready");
    assert_eq!(v["ready"], true);
    assert_eq!(v["status_text"], "up");
    let kinds: Vec<String> = d
        .events()
        .iter()
        .filter(|e| e["instance"] == "ns:default:notifier")
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, vec!["launched", "started", "ready"]);
}

#[test]
fn systemd_notify_binary_with_pid_is_accepted() {
    if !std::path::Path::new("/usr/bin/systemd-notify").exists() {
        eprintln!("skipping: systemd-notify is not installed");
        return;
    }
    let m = "name: sdn\ncommand: [/bin/sh, -c, 'systemd-notify --pid=$$ --ready; exec sleep 1000']\nreadiness: {notify: true, timeout: 30s}\n";
    let d = Daemon::start(&[("sdn", m)]);
    let v = d.json(&["launch", "sdn", "-o", "json"]);
    assert_eq!(v["state"], "ready");
}

#[test]
fn notify_from_another_instance_is_rejected() {
    let Some(py) = python3() else { return };
    // `victim` never signals readiness itself; `intruder` finds every notify socket in the
    // state dir and tries to mark it ready.
    let d = Daemon::start(&[]);
    let victim = "name: victim\ncommand: [/bin/sh, -c, 'exec sleep 1000']\nreadiness: {notify: true, timeout: 3s}\n";
    let intruder_py = format!(
        "import glob, socket, sys, time\nsent = 0\nfor p in glob.glob('{}/notify/*.sock'):\n    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', p)\n    sent += 1\nprint('sent', sent, flush=True)\ntime.sleep(1000)\n",
        d.state.display()
    );
    write_workload(&d.workloads, "victim", victim, &[]);
    write_workload(
        &d.workloads,
        "intruder",
        &format!("name: intruder\ncommand: [{py}, intruder.py]\n"),
        &[("intruder.py", &intruder_py)],
    );
    assert!(d.cli(&["reload"]).status.success());
    std::thread::scope(|s| {
        let v = s.spawn(|| d.cli(&["launch", "victim", "-o", "json"]));
        d.wait_event("victim started", |e| {
            e["kind"] == "started" && e["instance"] == "ns:default:victim"
        });
        d.json(&["launch", "intruder", "-o", "json"]);
        let start = Instant::now();
        loop {
            let log = String::from_utf8_lossy(&d.cli(&["logs", "ns:default:intruder"]).stdout)
                .into_owned();
            if log.contains("sent 1") {
                break;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "intruder never sent its message: {log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = v.join().unwrap();
        assert_eq!(
            out.status.code(),
            Some(7),
            "victim must not become ready: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains("readiness timeout"),
            "{}",
            stderr(&out)
        );
    });
}

#[test]
fn http_and_tcp_probes() {
    let Some(py) = python3() else { return };
    let http = format!(
        "name: httpd\ncommand: [{py}, -c, 'import time,os,http.server; time.sleep(0.3); http.server.HTTPServer((\"127.0.0.1\", int(os.environ[\"PORT\"])), http.server.SimpleHTTPRequestHandler).serve_forever()']\nreadiness: {{http: {{path: /, period: 20ms}}, timeout: 30s}}\n"
    );
    let tcp = format!(
        "name: tcpd\ncommand: [{py}, -c, 'import time,os,socket; time.sleep(0.3); s=socket.socket(); s.bind((\"127.0.0.1\", int(os.environ[\"PORT\"]))); s.listen(); time.sleep(1000)']\nreadiness: {{tcp: {{period: 20ms}}, timeout: 30s}}\n"
    );
    let h500 = "import os, http.server\n\nclass H(http.server.BaseHTTPRequestHandler):\n    def do_GET(self):\n        self.send_response(500)\n        self.end_headers()\n\nhttp.server.HTTPServer(('127.0.0.1', int(os.environ['PORT'])), H).serve_forever()\n";
    let d = Daemon::start(&[("httpd", &http), ("tcpd", &tcp)]);
    write_workload(
        &d.workloads,
        "http500",
        &format!("name: http500\ncommand: [{py}, h500.py]\nreadiness: {{http: {{path: /healthz, period: 20ms}}, timeout: 1s}}\nshutdown: {{grace: 1s}}\n"),
        &[("h500.py", h500)],
    );
    assert!(d.cli(&["reload"]).status.success());
    let h = d.json(&["launch", "httpd", "-o", "json"]);
    assert_eq!(h["state"], "ready");
    let t = d.json(&["launch", "tcpd", "-o", "json"]);
    assert_eq!(t["state"], "ready");
    let out = d.cli(&["launch", "http500"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("readiness timeout of 1s"),
        "{}",
        stderr(&out)
    );
    let f = d.json(&["get", "ns:default:http500", "-o", "json"]);
    assert_eq!(f["state"], "failed");
    assert!(
        !alive(f["pid"].as_u64().unwrap() as u32),
        "a failed launch leaves no process"
    );
    let log = d.logs_text("ns:default:http500");
    assert!(
        log.contains("\"GET /healthz HTTP/1.1\" 500"),
        "the probe really reached the server: {log}"
    );
}

#[test]
fn readiness_wait_ends_at_once_when_the_process_exits() {
    // Readiness would allow 10 minutes; the process exits after 0.2 s with code 3.
    let m = "name: dies\ncommand: [/bin/sh, -c, 'sleep 0.2; exit 3']\nreadiness: {notify: true, timeout: 10m}\n";
    let d = Daemon::start(&[("dies", m)]);
    let t = Instant::now();
    let out = d.cli(&["launch", "dies"]);
    let took = t.elapsed();
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("exited during start-up with exit code 3"),
        "{}",
        stderr(&out)
    );
    // Bounded by liveness, not by the 10-minute readiness timeout.
    assert!(took < Duration::from_secs(300), "{took:?}");
    let v = d.json(&["get", "ns:default:dies", "-o", "json"]);
    assert_eq!(v["state"], "failed");
    assert_eq!(v["last_exit"]["code"], 3);
    let kinds: Vec<String> = d
        .events()
        .iter()
        .filter(|e| e["instance"] == "ns:default:dies")
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        kinds,
        vec!["launched", "started", "exited", "launch_failed"]
    );
}

#[test]
fn wait_started_returns_before_ready_and_timeout_is_exit_6() {
    let m = "name: never\ncommand: [/bin/sh, -c, 'exec sleep 1000']\nreadiness: {notify: true, timeout: 10m}\n";
    let d = Daemon::start(&[("never", m)]);
    let v = d.json(&["launch", "never", "--wait", "started", "-o", "json"]);
    assert_eq!(v["state"], "starting");
    assert!(v["pid"].is_u64());
    let out = d.cli(&["launch", "never", "--timeout", "300ms"]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains("not ready"), "{}", stderr(&out));
}

/// A readiness probe polls at its `period` until the instance is ready, then at its
/// `ready_period` (default 10 s): `pg_isready` need not run five times a second for
/// ever. Compared with an instance whose `ready_period` is its fast period, over the same
/// wall time (no clock assertion).
#[test]
fn a_readiness_probe_slows_down_once_ready() {
    let d = Daemon::start(&[]);
    let dir = d.dir.path().to_owned();
    for (name, extra) in [("calm", ""), ("busy", ", ready_period: 20ms")] {
        let file = dir.join(format!("{name}.hits"));
        write_workload(
            &d.workloads,
            name,
            &format!(
                "name: {name}\ncommand: [sleep, '1000']\nreadiness: {{exec: {{command: [/bin/sh, -c, 'echo x >> {}'], period: 20ms{extra}}}}}\n",
                file.display()
            ),
            &[],
        );
    }
    assert!(d.cli(&["reload"]).status.success());
    for name in ["calm", "busy"] {
        let v = d.json(&["launch", name, "-o", "json"]);
        assert_eq!(v["state"], "ready", "{v}");
    }
    let hits = |name: &str| {
        std::fs::read_to_string(dir.join(format!("{name}.hits")))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    let (calm0, busy0) = (hits("calm"), hits("busy"));
    let start = std::time::Instant::now();
    while hits("busy") < busy0 + 10 {
        assert!(start.elapsed() < DEADLINE, "the busy probe stopped");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        hits("calm") <= calm0 + 1,
        "the calm probe kept polling at its start-up period: {} -> {}",
        calm0,
        hits("calm")
    );
}
