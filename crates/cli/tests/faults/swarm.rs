//! A swarm node cut off (its veth link down) while it runs an instance: bulkhead reports
//! the run lost, places the key again on another node, and fences the stale copy when the
//! node returns. Real daemon, real three-node swarm (`.ci/setup-swarm.sh`); ~40 s.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::swarm_support::*;

/// The network namespace that holds the swarm's bridge (see `.ci/setup-swarm.sh`).
const NET: &str = "bh-sw-net";

/// Sets a node's link up or down.
fn link(node_host: &str, up: bool) {
    let node = node_host.trim_start_matches("bh-sw-");
    let st = Command::new("ip")
        .args([
            "-n",
            NET,
            "link",
            "set",
            &format!("bhsw-{node}"),
            if up { "up" } else { "down" },
        ])
        .status()
        .unwrap();
    assert!(st.success(), "ip link set bhsw-{node}");
}

/// Brings the cut node back whatever happens to the test.
struct Rejoin(String);

impl Drop for Rejoin {
    fn drop(&mut self) {
        link(&self.0, true);
    }
}

/// This daemon's running containers on the engine at `engine`.
fn running_containers(engine: &str, daemon: &str) -> Vec<String> {
    let out = docker(
        engine,
        &[
            "ps",
            "-q",
            "--filter",
            &format!("label=bulkhead.daemon={daemon}"),
        ],
    );
    out.lines().map(str::to_owned).collect()
}

#[test]
fn a_partitioned_node_loses_its_run_the_key_is_placed_again_and_the_stale_copy_is_fenced() {
    if let Some(why) = skip() {
        eprintln!("skipped: {why}");
        return;
    }
    if !std::path::Path::new(&format!("/var/run/netns/{NET}")).exists() {
        eprintln!(
            "skipped: no network namespace {NET} (the swarm was not made by .ci/setup-swarm.sh)"
        );
        return;
    }
    let m = manifest(
        "fenced",
        "exec sleep 1000",
        "restart: {policy: always, backoff: {initial: 100ms}}\n",
    );
    let d = Daemon::start_with_args(&[("fenced", &m)], &["--swarm-host", &manager()]);
    let daemon = daemon_id(&d);
    let v = d.json(&["launch", "fenced", "--namespace", "t", "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let (engine, stale, host) = running_task(&id);
    let t0 = Instant::now();
    link(&host, false);
    let guard = Rejoin(host.clone());
    // The manager marks the node down; bulkhead reports the run lost (SIGKILL) ...
    let ev = d.wait_event("crashed", |e| e["instance"] == id && e["kind"] == "crashed");
    let lost_after = t0.elapsed();
    assert!(ev.to_string().contains('9'), "{ev}");
    // ... and its restart policy places the key again, on a node that is up.
    let start = Instant::now();
    let (_, fresh, fresh_host) = loop {
        let t = running_task(&id);
        if t.2 != host {
            break t;
        }
        assert!(
            start.elapsed() < DEADLINE * 2,
            "the key was not placed again"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let placed_after = t0.elapsed();
    assert_ne!(fresh, stale);
    // The stale copy still runs on the cut-off node, out of everyone's reach.
    assert!(running_containers(&engine, &daemon).contains(&stale[..12].to_owned()));
    drop(guard);
    let back = Instant::now();
    let needle = format!("fenced a stale copy of instance {id}");
    while !d.daemon_log().contains(&needle) {
        assert!(
            back.elapsed() < DEADLINE * 2,
            "no fencing reported after the node returned:\n{}",
            d.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let fenced_after = back.elapsed();
    assert!(
        running_containers(&engine, &daemon).is_empty(),
        "a copy still runs on {host}"
    );
    // One run of the key is left: the fresh one.
    assert_eq!(services(&format!("bulkhead.instance={id}")).len(), 1);
    assert_eq!(running_task(&id).1, fresh);
    eprintln!(
        "partition: run lost after {lost_after:?}, placed again on {fresh_host} after \
         {placed_after:?}; stale copy fenced {fenced_after:?} after the node returned"
    );
    let out = d.cli(&["terminate", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_no_services(&d);
}
