//! Keeper shards: a keeper holds two descriptors per instance (its output pipes), so its
//! open-files limit caps how many it holds; past that the daemon starts the next keeper.
//! The daemon itself holds about one descriptor per instance (its pidfd): output comes
//! forwarded by the keeper. Run here with a small limit (as a service with a low
//! `LimitNOFILE=` gets) so that a few hundred instances need several keepers.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

/// The open-files limit the daemon (and so its keepers) run with.
const LIMIT: u64 = 256;
/// More instances than one keeper holds at that limit ((256 - 64) / 2 = 96).
const N: usize = 150;

fn limited(cmd: &mut Command) {
    // SAFETY: setrlimit is async-signal-safe and allocates nothing; it runs in the child
    // between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: LIMIT,
                rlim_max: LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < DEADLINE * 2,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ticks(d: &Daemon, id: &str) -> usize {
    String::from_utf8_lossy(&d.cli(&["logs", id]).stdout)
        .matches("tick")
        .count()
}

#[test]
fn instances_spread_over_keepers_and_come_back_from_each_after_a_crash() {
    let mut d = Daemon::start_configured(
        &[(
            "t",
            "name: t\ncommand: [/bin/sh, -c, 'echo started >&2; while :; do echo tick; sleep 0.5; done']\nisolation: session\nrestart: {policy: on-failure, backoff: {initial: 10ms}}\n",
        )],
        &[],
        limited,
    );
    for i in 0..N {
        let out = d.cli(&["launch", "t", "--session", &format!("s{i}")]);
        assert!(
            out.status.success(),
            "launch {i} failed: {}\n--- daemon log ---\n{}",
            stderr(&out),
            d.daemon_log()
        );
    }
    let keepers = d.keeper_pids();
    assert!(
        keepers.len() >= 2,
        "{N} instances at an open-files limit of {LIMIT} need a second keeper: {keepers:?}"
    );
    assert!(d.state.join("keeper.1.sock").exists());
    // The daemon holds no pipe of a keeper's instance: well under two descriptors each.
    let daemon = d.child.as_ref().unwrap().id();
    let fds = open_fds(daemon);
    assert!(
        fds < N + 100,
        "the daemon holds {fds} descriptors for {N} instances"
    );
    // The output of an instance of the second keeper (launched last) reaches its log,
    // stdout and stderr alike.
    let last = format!("session:s{}:t", N - 1);
    wait_until("output of the last instance", || ticks(&d, &last) > 0);
    let log = d.logs_text(&last);
    assert!(log.contains("started"), "stderr reaches the log: {log}");
    let before: Vec<u32> = (0..N)
        .map(|i| {
            d.json(&["get", &format!("session:s{i}:t"), "-o", "json"])["pid"]
                .as_u64()
                .unwrap() as u32
        })
        .collect();

    // A crash of the daemon: every keeper keeps its instances, and the next daemon adopts
    // them from all of them.
    d.kill9();
    d.spawn_configured(limited);
    assert_eq!(
        d.keeper_pids(),
        keepers,
        "the same keepers serve the state directory"
    );
    for (i, pid) in before.iter().enumerate() {
        let v = d.json(&["get", &format!("session:s{i}:t"), "-o", "json"]);
        assert_eq!(v["state"], "ready", "instance {i} after the restart: {v}");
        assert_eq!(
            v["pid"].as_u64(),
            Some(u64::from(*pid)),
            "instance {i} adopted"
        );
    }
    // Output flows again from the second keeper.
    let n = ticks(&d, &last);
    wait_until("new output after adoption", || ticks(&d, &last) > n);
    // A workload of a keeper the previous daemon started (not this daemon's descendant)
    // is still refused on the API socket: every keeper is a root of the peer check.
    let rc = d.dir.path().join("intruder.rc");
    let script = format!(
        "{BIN} --socket {} list >/dev/null 2>&1; echo $? > {}; exec sleep 1000",
        d.socket.display(),
        rc.display()
    );
    write_workload(
        &d.workloads,
        "intruder",
        &format!("name: intruder\ncommand: [/bin/sh, -c, {script:?}]\n"),
        &[],
    );
    assert!(d.cli(&["reload"]).status.success());
    let intruder = d.json(&["launch", "intruder", "-o", "json"]);
    let ppid = std::fs::read_to_string(format!("/proc/{}/stat", intruder["pid"]))
        .unwrap()
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u32>()
        .unwrap();
    assert_eq!(
        ppid, keepers[1],
        "the first keeper is full: the second one holds it"
    );
    wait_until("the intruder's attempt", || {
        std::fs::read_to_string(&rc).is_ok_and(|s| s.ends_with('\n'))
    });
    assert_eq!(
        std::fs::read_to_string(&rc).unwrap().trim(),
        "8",
        "a workload of an adopted keeper must be refused"
    );
    assert!(d
        .cli(&["terminate", "ns:default:intruder"])
        .status
        .success());

    // The second keeper dies: its instances are reported and restarted (on a keeper with
    // room), the first keeper's are untouched.
    // SAFETY: kill(2) on a keeper pid read from this test's own state directory.
    unsafe {
        libc::kill(keepers[1] as i32, libc::SIGKILL);
    }
    wait_until("the last instance restarted with a new pid", || {
        let v = d.json(&["get", &last, "-o", "json"]);
        v["state"] == "ready" && v["pid"].as_u64() != Some(u64::from(before[N - 1]))
    });
    let first = d.json(&["get", "session:s0:t", "-o", "json"]);
    assert_eq!(first["pid"].as_u64(), Some(u64::from(before[0])));
    let n = ticks(&d, &last);
    wait_until("output of the restarted instance", || ticks(&d, &last) > n);
}
