//! Helpers for the swarm tests (`it::swarm`, `faults::swarm`): the test swarm of
//! `.ci/setup-swarm.sh`, its services and tasks, seen through the `docker` CLI.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

pub(crate) const IMAGE: &str = "bulkhead-test/busybox:latest";

/// The manager the tests (and the daemons they start) use.
pub(crate) fn manager() -> String {
    std::env::var("BULKHEAD_SWARM_HOST")
        .unwrap_or_else(|_| "unix:///run/bulkhead-swarm/mgr.sock".to_owned())
}

/// `docker -H <host> args...`, its stdout (trimmed) or a panic naming the failure.
pub(crate) fn docker(host: &str, args: &[&str]) -> String {
    let out = Command::new("docker")
        .arg("-H")
        .arg(host)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker -H {host} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Why the swarm tests cannot run here, if they cannot.
pub(crate) fn skip() -> Option<String> {
    let out = Command::new("docker")
        .args([
            "-H",
            &manager(),
            "info",
            "--format",
            "{{.Swarm.LocalNodeState}}",
        ])
        .output();
    match out {
        Ok(o) if o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "active" => {
            None
        }
        Ok(o) => Some(format!(
            "no active swarm manager at {} ({}); run .ci/setup-swarm.sh",
            manager(),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("no docker CLI ({e}); run .ci/setup-swarm.sh")),
    }
}

pub(crate) fn daemon_id(d: &Daemon) -> String {
    std::fs::read_to_string(d.state.join("daemon-id"))
        .unwrap()
        .trim()
        .to_owned()
}

/// The services carrying `label`.
pub(crate) fn services(label: &str) -> Vec<String> {
    let out = docker(
        &manager(),
        &["service", "ls", "-q", "--filter", &format!("label={label}")],
    );
    out.lines().map(str::to_owned).collect()
}

/// Waits until no service of this daemon is left.
pub(crate) fn wait_no_services(d: &Daemon) {
    let label = format!("bulkhead.daemon={}", daemon_id(d));
    let start = Instant::now();
    loop {
        let left = services(&label);
        if left.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "services {left:?} left\n{}",
            d.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The running task of instance `id`: (its node's engine address, its container id, its
/// node's host name).
pub(crate) fn running_task(id: &str) -> (String, String, String) {
    let start = Instant::now();
    loop {
        let svc = services(&format!("bulkhead.instance={id}"));
        if let [svc] = svc.as_slice() {
            let line = docker(
                &manager(),
                &[
                    "service",
                    "ps",
                    svc,
                    "--filter",
                    "desired-state=running",
                    "-q",
                    "--no-trunc",
                ],
            );
            if let Some(task) = line.lines().next() {
                let t: serde_json::Value = serde_json::from_str(&docker(
                    &manager(),
                    &["inspect", "--format", "{{json .}}", task],
                ))
                .unwrap();
                let container = t["Status"]["ContainerStatus"]["ContainerID"]
                    .as_str()
                    .unwrap_or_default();
                let node = t["NodeID"].as_str().unwrap_or_default();
                let parts = [
                    node,
                    t["Status"]["State"].as_str().unwrap_or_default(),
                    container,
                ];
                if !container.is_empty() && parts[1] == "running" {
                    let engine = docker(
                        &manager(),
                        &[
                            "node",
                            "inspect",
                            "--format",
                            "{{index .Spec.Labels \"bulkhead.engine\"}} {{.Description.Hostname}}",
                            parts[0],
                        ],
                    );
                    let (addr, host) = engine.split_once(' ').unwrap();
                    return (addr.to_owned(), parts[2].to_owned(), host.to_owned());
                }
            }
        }
        assert!(start.elapsed() < DEADLINE, "no running task for {id}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) fn manifest(name: &str, script: &str, extra: &str) -> String {
    format!(
        "name: {name}\ndriver: swarm\ncommand: [/bin/sh, -c, '{script}']\n{extra}swarm:\n  image: {IMAGE}\n"
    )
}

pub(crate) fn start(workloads: &[(&str, &str)]) -> Daemon {
    Daemon::start_with_args(workloads, &["--swarm-host", &manager()])
}
