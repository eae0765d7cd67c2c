//! The keeper's spare slot: the default path of a process launch (no `warm:`) takes it,
//! and the instance is a cold one (`bulkhead_driver::keeper::spare`).

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::Daemon;

/// Waits until `health` says the spare waits; returns how many launches took one.
pub(crate) fn spare_ready(d: &Daemon) -> u64 {
    let start = Instant::now();
    loop {
        let h = d.json(&["health", "-o", "json"]);
        if h["process_spare"]["ready"] == true {
            return h["process_spare"]["launches"].as_u64().unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no spare: {h}\n{}",
            d.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon's process cgroup scope (`None`: tracked by process group here) and the
/// cgroups in it.
fn scope_cgroups(d: &Daemon) -> Option<(std::path::PathBuf, Vec<String>)> {
    let h = d.json(&["health", "-o", "json"]);
    let scope = std::path::PathBuf::from(h["process_tracking"].as_str()?.strip_prefix("cgroup ")?);
    let cgroups = std::fs::read_dir(&scope)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    Some((scope, cgroups))
}

fn spare_launches(d: &Daemon) -> Option<u64> {
    d.json(&["health", "-o", "json"])["process_spare"]["launches"].as_u64()
}

/// What the program says of itself, and where the daemon put it.
fn launched(d: &Daemon, session: &str) -> (String, Value) {
    let v = d.json(&["launch", "who", "--session", session, "-o", "json"]);
    let id = format!("session:{session}:who");
    let start = Instant::now();
    let line = loop {
        let text = d.logs_text(&id);
        if let Some(l) = text.lines().find(|l| l.starts_with("who:")) {
            break l.to_owned();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    (line, v)
}

/// The same workload launched from the spare and, in a daemon with
/// `--no-process-spare`, cold: the program sees the same user, groups, limits, umask,
/// working directory, environment and process group, under the keeper, in a cgroup
/// of its own.
#[test]
fn a_launch_from_the_spare_is_a_cold_one() {
    let root = rustix::process::geteuid().is_root();
    let user = if root { "user: nobody\n" } else { "" };
    let m = format!(
        "name: who\ncommand: [/bin/sh, -c, 'echo \"who: $(id -u) $(id -G) $(umask) $(ulimit -n) $(ulimit -Hn) $(pwd) $FOO pgid=$(ps -o pgid= $$ | tr -d \" \")\"; exec sleep 1000']\nisolation: session\nenv: {{FOO: bar}}\nlimits: {{nofile: {{soft: 123, hard: 456}}}}\numask: \"0027\"\nworking_dir: /tmp\n{user}"
    );
    let cold = Daemon::start_with_args(&[("who", &m)], &["--no-process-spare"]);
    let warm = Daemon::start(&[("who", &m)]);
    assert_eq!(
        spare_launches(&cold),
        None,
        "no spare with --no-process-spare"
    );
    let (cold_line, _) = launched(&cold, "a");
    assert_eq!(spare_ready(&warm), 0);
    let (line, v) = launched(&warm, "a");
    assert_eq!(spare_launches(&warm), Some(1), "the launch took the spare");
    let pid = v["pid"].as_u64().unwrap();
    // The pids differ: the rest is the same.
    let strip = |l: &str| l.split(" pgid=").next().unwrap().to_owned();
    assert_eq!(strip(&line), strip(&cold_line));
    assert!(line.contains(" 0027 123 456 /tmp bar"), "{line}");
    if root {
        assert!(line.starts_with("who: 65534 "), "{line}");
    }
    assert!(
        line.ends_with(&format!("pgid={pid}")),
        "its own group: {line}"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ppid = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(
        Some(ppid.parse::<u32>().unwrap()),
        warm.keeper_pid(),
        "the keeper is its parent"
    );
    let h = warm.json(&["health", "-o", "json"]);
    if let Some(scope) = h["process_tracking"]
        .as_str()
        .and_then(|t| t.strip_prefix("cgroup "))
    {
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(
            cg.lines()
                .any(|l| l.starts_with("0::") && l.contains("/spare-")),
            "in the spare's cgroup under {scope}: {cg}"
        );
    }
    // The next spare is made once launches have been quiet, and the next launch takes it.
    assert_eq!(spare_ready(&warm), 1);
    let (second, _) = launched(&warm, "b");
    assert_eq!(strip(&second), strip(&cold_line));
    assert_eq!(spare_launches(&warm), Some(2));
}

/// A launch the spare cannot serve spawns cold and fails as a cold one does, and the
/// spare stays for the next launch: a working directory that does not exist.
#[test]
fn a_launch_the_spare_cannot_serve_fails_as_a_cold_one_and_keeps_it() {
    let bad =
        "name: bad\ncommand: [/bin/true]\nisolation: session\nworking_dir: /nonexistent/dir\n";
    let good = "name: who\ncommand: [/bin/sh, -c, 'echo who: $(pwd); exec sleep 1000']\nisolation: session\n";
    let d = Daemon::start(&[("bad", bad), ("who", good)]);
    spare_ready(&d);
    let out = d.cli(&["launch", "bad", "--session", "a"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/dir"), "{err}");
    // Still there, untouched (none made since, well past the refills' quiet time):
    // the next launch takes it.
    std::thread::sleep(Duration::from_millis(200));
    let h = d.json(&["health", "-o", "json"]);
    assert_eq!(h["process_spare"]["launches"], 0, "{h}");
    assert_eq!(h["process_spare"]["made"], 1, "{h}");
    assert_eq!(h["process_spare"]["ready"], true, "{h}");
    let (line, _) = launched(&d, "b");
    assert!(line.starts_with("who: "), "{line}");
    assert_eq!(spare_launches(&d), Some(1));
}

/// A clean shutdown ends the spare and removes its cgroup with the scope; `kill -9` of
/// the daemon ends it too (its end of the socket closes), and the next daemon's sweep
/// removes its cgroup.
#[test]
fn the_spare_goes_with_the_daemon() {
    let m = "name: who\ncommand: [/bin/sh, -c, 'exec sleep 1000']\nisolation: session\n";
    let mut d = Daemon::start(&[("who", m)]);
    spare_ready(&d);
    let spares = |keeper: Option<u32>| -> Vec<u32> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit(") ")
                .next()
                .and_then(|r| r.split(' ').nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if comm.trim() == "bulkhead-slot" && ppid.is_some() && ppid == keeper {
                out.push(pid);
            }
        }
        out
    };
    let gone = |pid: u32| {
        let start = Instant::now();
        while std::path::Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ")
        {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{pid} still runs"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let first = spares(d.keeper_pid());
    assert_eq!(first.len(), 1, "one spare under the keeper");
    d.kill9();
    gone(first[0]);
    d.spawn();
    spare_ready(&d);
    let scope = scope_cgroups(&d).map(|(scope, cgroups)| {
        assert_eq!(cgroups.len(), 1, "only the new spare's: {cgroups:?}");
        scope
    });
    let second = spares(d.keeper_pid());
    assert_eq!(second.len(), 1, "{second:?}");
    // A clean shutdown (SIGTERM, then the wait for the daemon's exit).
    drop(d);
    gone(second[0]);
    if let Some(scope) = scope {
        assert!(!scope.exists(), "{} is left", scope.display());
    }
}

/// A spare dies with its keeper: the daemon removes its cgroup and makes a new one with
/// the keeper that replaces it, which the next launch takes.
#[test]
fn a_spare_that_died_with_its_keeper_is_replaced() {
    let m =
        "name: who\ncommand: [/bin/sh, -c, 'echo who: ok; exec sleep 1000']\nisolation: session\n";
    let d = Daemon::start(&[("who", m)]);
    spare_ready(&d);
    let made = |d: &Daemon| d.json(&["health", "-o", "json"])["process_spare"]["made"].as_u64();
    assert_eq!(made(&d), Some(1));
    let keeper = d.keeper_pid().expect("a keeper");
    // SAFETY: kill(2) of this test's own daemon's keeper.
    assert_eq!(unsafe { libc::kill(keeper as i32, libc::SIGKILL) }, 0);
    let start = Instant::now();
    while made(&d) < Some(2) || d.keeper_pid() == Some(keeper) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no new spare: {}",
            d.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    spare_ready(&d);
    // The dead spare's cgroup is gone (removed in the background: waited for).
    let start = Instant::now();
    while let Some((_, cgroups)) = scope_cgroups(&d).filter(|(_, c)| c.len() != 1) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the dead spare's cgroup is left: {cgroups:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (line, _) = launched(&d, "a");
    assert_eq!(line, "who: ok");
    assert_eq!(spare_launches(&d), Some(1));
    // As `health` prints it.
    spare_ready(&d);
    let out = d.cli(&["health"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l == "process spare: ready (1 launch took one)"),
        "{text}"
    );
}

/// The next launch's notify socket is bound ahead, while no launch is on its way: the
/// launch's `NOTIFY_SOCKET` is the socket that waited in `<state>/notify`, and a new
/// one is bound after it.
#[test]
fn the_next_notify_socket_is_bound_ahead() {
    let m = "name: who\ncommand: [/bin/sh, -c, 'echo \"who: $NOTIFY_SOCKET\"; systemd-notify --pid=$$ --ready; exec sleep 1000']\nisolation: session\nreadiness: {notify: true, timeout: 30s}\n";
    let d = Daemon::start(&[("who", m)]);
    let waiting = || -> Vec<String> {
        std::fs::read_dir(d.state.join("notify"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path().display().to_string())
                    .filter(|p| p.ends_with(".sock"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let bound = |not: Option<&str>| -> String {
        let start = Instant::now();
        loop {
            let w = waiting();
            if let [one] = &w[..] {
                if Some(one.as_str()) != not {
                    return one.clone();
                }
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{w:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let first = bound(None);
    let (line, _) = launched(&d, "a");
    assert_eq!(
        line,
        format!("who: {first}"),
        "the launch took the socket bound ahead"
    );
    // The instance's own socket, and the next one bound ahead.
    let start = Instant::now();
    while waiting().len() != 2 {
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", waiting());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(waiting().contains(&first), "{:?}", waiting());
}
