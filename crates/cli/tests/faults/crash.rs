//! `kill -9` of the daemon in the middle of launches, restarts and terminations, with
//! instances behind every wall this machine has (process always; sandbox and docker when
//! available, said otherwise).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::*;
use crate::support::*;

const IMAGE: &str = "bulkhead-test/busybox:latest";

/// Whether a Docker engine with the test image answers (`.ci/setup-docker.sh` makes one).
fn docker() -> bool {
    let ok = Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("crash suite: no docker engine with {IMAGE}; the docker wall is left out");
    }
    ok
}

/// Containers of this daemon (any state), with their instance label.
fn containers(state: &Path) -> Vec<(String, String)> {
    let Ok(id) = std::fs::read_to_string(state.join("daemon-id")) else {
        return Vec::new();
    };
    containers_labelled(&id)
}

/// Containers (any state) labelled with daemon id `id`, with their instance label.
fn containers_labelled(id: &str) -> Vec<(String, String)> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-a",
            "--filter",
            &format!("label=bulkhead.daemon={}", id.trim()),
            "--format",
            "{{.ID}} {{.Label \"bulkhead.instance\"}}",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(c, i)| (c.to_owned(), i.to_owned()))
        .collect()
}

fn workloads(mark: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "boxed",
            format!(
                "name: boxed\ndriver: sandbox\ncommand: [/bin/sleep, '1000']\nenv: {{FAULT_MARK: {mark}}}\nresources: {{memory: 64Mi, pids: 16}}\n"
            ),
        ),
        (
            "boat",
            format!(
                "name: boat\ndriver: docker\ncommand: [sleep, '1000']\nenv: {{FAULT_MARK: {mark}}}\ndocker:\n  image: {IMAGE}\n"
            ),
        ),
        (
            "svc",
            format!(
                "name: svc\ncommand: [/bin/sleep, '1000']\nenv: {{FAULT_MARK: {mark}}}\nshutdown: {{grace: 2s}}\n"
            ),
        ),
        (
            "flaky",
            format!(
                "name: flaky\ncommand: [/bin/sh, -c, 'sleep 0.03; exit 1']\nenv: {{FAULT_MARK: {mark}}}\nrestart: {{policy: on-failure, max_failures: 100000, backoff: {{initial: 5ms, max: 20ms}}}}\n"
            ),
        ),
    ]
}

/// Checks the invariants that must hold after any crash and restart.
fn check(d: &Daemon, mark: &str, round: usize) {
    let listed = listed(d);
    // Every key has at most one instance: at most one main process per instance id.
    for (id, pids) in per_instance(mark) {
        if pids.len() > 1 {
            let cmds: Vec<String> = pids
                .iter()
                .map(|p| {
                    let st = bulkhead_driver::sys::read_stat(*p);
                    let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                    format!("{p}: {:?} {st:?}", String::from_utf8_lossy(&cmd))
                })
                .collect();
            let log = d.daemon_log();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            panic!(
                "round {round}: {id} has {} processes:\n{}\n--- daemon log (last lines, newest first) ---\n{}",
                pids.len(),
                cmds.join("\n"),
                tail.join("\n")
            );
        }
        // Every process of ours belongs to an instance the daemon knows and supervises.
        if id.ends_with(":svc") {
            let inst = listed.get(&id).unwrap_or_else(|| {
                panic!("round {round}: process {pids:?} of {id} is not listed: {listed:#?}")
            });
            if inst["pid"].as_u64() != Some(u64::from(pids[0])) {
                let log = d.daemon_log();
                let tail: Vec<&str> = log
                    .lines()
                    .filter(|l| {
                        l.contains(id.as_str()) || l.contains("keeper") || l.contains("adopt")
                    })
                    .collect();
                panic!(
                    "round {round}: {id} runs as {pids:?} but is listed as {inst:#}\nevents: {:#?}\n--- daemon log ---\n{}",
                    d.events().into_iter().filter(|e| e["instance"] == id.as_str()).collect::<Vec<_>>(),
                    tail.join("\n")
                );
            }
        }
    }
    // At most one container per instance.
    let mut per: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (_, inst) in containers(&d.state) {
        *per.entry(inst).or_default() += 1;
    }
    for (inst, n) in per {
        assert!(n <= 1, "round {round}: {inst} has {n} containers");
    }
    // Every recorded instance that claims a live process really has one.
    for (id, inst) in &listed {
        if inst["state"] == "ready" && id.ends_with(":svc") {
            let pid = inst["pid"].as_u64().expect("a ready instance has a pid") as u32;
            assert!(
                alive(pid),
                "round {round}: {id} is ready but pid {pid} is gone"
            );
        }
    }
    assert_gapless(&d.events());
}

#[test]
fn kill_9_during_launches_restarts_and_terminations_keeps_every_invariant() {
    let mark = marker("crash");
    let wl = workloads(&mark);
    let wl: Vec<(&str, &str)> = wl.iter().map(|(n, m)| (*n, m.as_str())).collect();
    let mut d = Daemon::start(&wl);
    let rounds = scale(6, 100);
    let sandbox = d.json(&["health", "-o", "json"])["sandbox"]["available"] == true;
    if !sandbox {
        eprintln!("crash suite: the sandbox driver is unavailable; the sandbox wall is left out");
    }
    let docker = docker();
    for round in 0..rounds {
        // Requests in flight when the daemon dies: launches of new keys, a termination, a
        // workload that keeps restarting.
        let mut kids = Vec::new();
        let mut cli = |args: Vec<String>| {
            kids.push(
                Command::new(BIN)
                    .arg("--socket")
                    .arg(&d.socket)
                    .args(&args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
        };
        for i in 0..3 {
            cli(vec![
                "launch".into(),
                "svc".into(),
                "--namespace".into(),
                format!("r{round}-{i}"),
            ]);
        }
        if round > 0 {
            cli(vec!["terminate".into(), format!("ns:r{}-0:svc", round - 1)]);
        }
        cli(vec![
            "launch".into(),
            "flaky".into(),
            "--namespace".into(),
            format!("f{}", round % 2),
            "--wait".into(),
            "none".into(),
        ]);
        // A different moment each round: before, during and after the requests land.
        std::thread::sleep(Duration::from_millis(((round * 7919) % 45) as u64));
        d.kill9();
        for mut k in kids {
            let _ = k.wait();
        }
        d.spawn();
        check(&d, &mark, round);
    }
    // Everything stops cleanly afterwards and leaves no process behind.
    for id in listed(&d).keys() {
        let _ = d.cli(&["terminate", id]);
    }
    assert!(d.sigterm().success(), "{}", d.daemon_log());
    let state = d.state.clone();
    // Read while the state directory exists (it goes with `d`).
    let scope = cgroup_scope(&state);
    let daemon_id = std::fs::read_to_string(state.join("daemon-id")).unwrap();
    drop(d);
    wait_until("no process of the test left", || marked(&mark).is_empty());
    // Nor a cgroup or a container.
    wait_until("no cgroup of the test left", || {
        instance_cgroups(&scope).is_empty()
    });
    if docker {
        let left = containers_labelled(&daemon_id);
        assert!(left.is_empty(), "containers left: {left:?}");
    }
}
