//! Issue 11: a copy of a daemon's state directory, started as a second daemon, must never
//! touch the first daemon's instances. The copy carried the first daemon's `daemon-id`
//! (its docker label and cgroup scope) and its instance table, whose `--no-keeper` rows
//! the second daemon killed as "orphans of a crashed daemon" (matching pid and start
//! time: the first daemon's live processes).

use std::process::Command;

use crate::harness::*;
use crate::sandbox::sandbox_available;

const SLEEPER: &str = "name: sleeper\ncommand: [sleep, '1000']\n";
const WALLED: &str = "name: walled\ndriver: sandbox\ncommand: [sleep, '1000']\n";

fn pid_and_start(d: &Daemon, id: &str) -> (u32, u64) {
    let v = d.json(&["get", id, "-o", "json"]);
    let pid = v["pid"].as_u64().unwrap_or_else(|| panic!("no pid: {v}")) as u32;
    (pid, bulkhead_driver::sys::read_stat(pid).unwrap().starttime)
}

fn still_the_same(pid: u32, start: u64) -> bool {
    bulkhead_driver::sys::read_stat(pid).is_ok_and(|s| s.starttime == start && !s.is_zombie())
}

#[test]
fn a_copied_state_directory_never_touches_the_first_daemons_instances() {
    let first = Daemon::start_with_args(
        &[("sleeper", SLEEPER), ("walled", WALLED)],
        &["--no-keeper"],
    );
    first.json(&["launch", "sleeper", "-o", "json"]);
    let (pid, start) = pid_and_start(&first, "ns:default:sleeper");
    let sandbox = sandbox_available(&first);
    let walled = sandbox.then(|| {
        first.json(&["launch", "walled", "-o", "json"]);
        let p = pid_and_start(&first, "ns:default:walled");
        let cgroups = instance_cgroups(&cgroup_scope(&first.state));
        assert!(!cgroups.is_empty());
        (p, cgroups)
    });

    // The copy, as an operator would make it (sockets and all), and a second daemon on it.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cp = Command::new("cp")
        .arg("-a")
        .arg(&first.state)
        .arg(&state)
        .status()
        .unwrap();
    assert!(cp.success());
    let workloads = dir.path().join("workloads");
    write_workload(&workloads, "sleeper", SLEEPER, &[]);
    let mut second = Daemon {
        child: None,
        socket: dir.path().join("api.sock"),
        state,
        workloads,
        dir,
        extra_args: vec!["--no-keeper".into()],
    };
    second.spawn();

    assert!(
        still_the_same(pid, start),
        "the second daemon killed the first one's instance (pid {pid})\n{}",
        second.daemon_log()
    );
    let id = |d: &Daemon| std::fs::read_to_string(d.state.join("daemon-id")).unwrap();
    assert_ne!(id(&first), id(&second), "the copy has an id of its own");
    assert!(
        second
            .daemon_log()
            .contains("is a copy of another daemon's state directory"),
        "{}",
        second.daemon_log()
    );
    assert_eq!(
        first.json(&["get", "ns:default:sleeper", "-o", "json"])["state"],
        "ready"
    );
    if let Some(((wpid, wstart), cgroups)) = walled {
        assert_ne!(cgroup_scope(&first.state), cgroup_scope(&second.state));
        assert!(
            still_the_same(wpid, wstart),
            "the sandbox instance was killed"
        );
        assert!(
            cgroups.iter().all(|c| c.exists()),
            "the first daemon's cgroups were removed: {cgroups:?}"
        );
    }
    first.cli(&["terminate", "ns:default:sleeper"]);
    first.cli(&["terminate", "ns:default:walled"]);
}

/// The same with the first daemon's docker container: the copy used to carry its label's
/// daemon id and its instance table, so its recovery adopted the first daemon's container
/// (and removed every other one of that id), and its shutdown then removed it.
#[test]
fn a_copied_state_directory_never_removes_the_first_daemons_containers() {
    if let Some(why) = crate::docker::skip() {
        eprintln!("skipped: {why}");
        return;
    }
    let boxed = format!(
        "name: boxed\ndriver: docker\ncommand: [sleep, '1000']\ndocker:\n  image: {}\n",
        crate::docker::IMAGE
    );
    let first = Daemon::start(&[("boxed", &boxed)]);
    first.json(&["launch", "boxed", "-o", "json"]);
    let id = |d: &Daemon| {
        std::fs::read_to_string(d.state.join("daemon-id"))
            .unwrap()
            .trim()
            .to_owned()
    };
    let label = format!("bulkhead.daemon={}", id(&first));
    let before = crate::docker::containers(&label);
    assert_eq!(before.len(), 1, "the first daemon's container");

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    assert!(Command::new("cp")
        .arg("-a")
        .arg(&first.state)
        .arg(&state)
        .status()
        .unwrap()
        .success());
    let workloads = dir.path().join("workloads");
    write_workload(&workloads, "boxed", &boxed, &[]);
    let mut second = Daemon {
        child: None,
        socket: dir.path().join("api.sock"),
        state,
        workloads,
        dir,
        extra_args: Vec::new(),
    };
    second.spawn();
    // Recovery runs before the API serves: it is over once `health` answered.
    assert_eq!(
        crate::docker::containers(&label),
        before,
        "the second daemon removed the first one's container\n{}",
        second.daemon_log()
    );
    // Nor adopted it: its shutdown (which terminates what it holds) leaves it alone.
    assert!(second.sigterm().success());
    assert_eq!(
        crate::docker::containers(&label),
        before,
        "the second daemon's shutdown removed the first one's container\n{}",
        second.daemon_log()
    );
    assert_ne!(id(&first), id(&second));
    assert_eq!(
        first.json(&["get", "ns:default:boxed", "-o", "json"])["state"],
        "ready"
    );
    first.cli(&["terminate", "ns:default:boxed"]);
}
