//! Issue 12: every process-driver instance in a cgroup of its own, torn down as a whole.
//! A workload whose script double-forks and `setsid`s a `sleep` leaves nothing behind
//! after terminate or a clean daemon shutdown (checked by a marker in argv and by pid),
//! and no cgroup directory; a program that daemonizes during start-up fails with a
//! message that says so. Through the keeper (the default) and without it. Skipped, with
//! the reason, where the daemon tracks by process group (no usable cgroup2 mount).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::harness::*;

/// A marker unique to one test run, put in the daemon's argv (its `sh -c` script).
fn marker(what: &str) -> String {
    format!("bulkhead-it-{what}-{}-{}", std::process::id(), now_ms())
}

/// The script of a workload that double-forks and `setsid`s a process carrying `marker`
/// in its argv (it records its pid in `daemon.pid`), then runs `tail`.
fn script(marker: &str, tail: &str) -> String {
    format!(
        "( setsid sh -c 'echo $$ > daemon.pid; sleep 1000; : {marker}' & )\n\
         while [ ! -s daemon.pid ]; do sleep 0.01; done\n\
         {tail}\n"
    )
}

fn manifest(name: &str) -> String {
    format!("name: {name}\ndriver: process\ncommand: [/bin/sh, run.sh]\n")
}

/// Live processes whose command line contains `marker`.
fn with_marker(marker: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
                && alive(pid)
        })
        .collect()
}

/// Starts a daemon with the workload `name`; `None` (printed) when it tracks process
/// instances by process group.
fn start(name: &str, marker: &str, tail: &str, args: &[&str]) -> Option<Daemon> {
    let d = Daemon::start_with_args(&[], args);
    write_workload(
        &d.workloads,
        name,
        &manifest(name),
        &[("run.sh", &script(marker, tail))],
    );
    assert!(d.cli(&["reload"]).status.success());
    let h = d.json(&["health", "-o", "json"]);
    let tracking = h["process_tracking"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if !tracking.starts_with("cgroup ") {
        eprintln!("skipped: process instances are tracked by {tracking:?} here");
        return None;
    }
    Some(d)
}

/// Waits for the daemonized process to record its pid; returns it.
fn daemon_pid(d: &Daemon, name: &str) -> u32 {
    let file = d.workloads.join(name).join("daemon.pid");
    let start = Instant::now();
    loop {
        if let Some(pid) = std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no {}:\n{}",
            file.display(),
            d.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The cgroup2 directory a live process runs in (its `0::` line under the mount whose
/// subtree holds the daemon's scope).
fn cgroup_of(pid: u32, scope_dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup2 line")
        .to_owned();
    let name = Path::new(&rel).file_name().unwrap();
    let dir = scope_dir.join(name);
    assert!(
        dir.is_dir() && rel.ends_with(&format!("/{}", name.to_string_lossy())),
        "pid {pid} is not in an instance cgroup of {}: {rel}",
        scope_dir.display()
    );
    dir
}

/// The process driver's scope directory of the daemon, from its health.
fn scope_dir(d: &Daemon) -> PathBuf {
    let h = d.json(&["health", "-o", "json"]);
    PathBuf::from(
        h["process_tracking"]
            .as_str()
            .unwrap()
            .strip_prefix("cgroup ")
            .unwrap(),
    )
}

fn assert_gone(d: &Daemon, marker: &str, pids: &[u32], cgroup: &Path) {
    for &pid in pids {
        assert!(
            wait_gone(pid),
            "pid {pid} outlived its instance:\n{}",
            d.daemon_log()
        );
    }
    let left = with_marker(marker);
    assert!(left.is_empty(), "processes {left:?} carry {marker}");
    assert!(!cgroup.exists(), "{} is left", cgroup.display());
}

fn terminate_case(args: &[&str]) {
    let m = marker("terminate");
    let Some(mut d) = start("dbl", &m, "exec sleep 1000", args) else {
        return;
    };
    let v = d.json(&["launch", "dbl", "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let main = v["pid"].as_u64().unwrap() as u32;
    let daemon = daemon_pid(&d, "dbl");
    let scope = scope_dir(&d);
    let cg = cgroup_of(main, &scope);
    assert_eq!(
        cgroup_of(daemon, &scope),
        cg,
        "the setsid'd process's cgroup"
    );
    // The control: the marker is visible while the instance runs.
    assert_eq!(with_marker(&m), vec![daemon]);

    let t = d.cli(&["terminate", &id]);
    assert!(t.status.success(), "{}", stderr(&t));
    d.wait_event("terminated", |e| {
        e["instance"] == id.as_str() && e["kind"] == "terminated"
    });
    assert_gone(&d, &m, &[main, daemon], &cg);
    assert_eq!(d.sigterm().code(), Some(0));
    assert!(
        !scope.exists(),
        "{} is left after shutdown",
        scope.display()
    );
}

/// After terminate, no process of a double-forked, `setsid`'d workload is left, and no
/// cgroup; after the clean shutdown, no scope directory either. Through the keeper.
#[test]
fn a_setsid_descendant_dies_at_terminate() {
    terminate_case(&[]);
}

/// The same without the keeper (`--no-keeper`: the daemon is the instances' parent).
#[test]
fn a_setsid_descendant_dies_at_terminate_without_keeper() {
    terminate_case(&["--no-keeper"]);
}

/// A clean daemon shutdown (SIGTERM) leaves no process of the instance, no instance
/// cgroup and no scope directory.
#[test]
fn a_setsid_descendant_dies_at_a_clean_shutdown() {
    let m = marker("shutdown");
    let Some(mut d) = start("dbl", &m, "exec sleep 1000", &[]) else {
        return;
    };
    let v = d.json(&["launch", "dbl", "-o", "json"]);
    let main = v["pid"].as_u64().unwrap() as u32;
    let daemon = daemon_pid(&d, "dbl");
    let scope = scope_dir(&d);
    let cg = cgroup_of(main, &scope);
    assert_eq!(d.sigterm().code(), Some(0));
    assert_gone(&d, &m, &[main, daemon], &cg);
    assert!(
        !scope.exists(),
        "{} is left after shutdown",
        scope.display()
    );
}

/// A program that daemonizes during start-up (its main process exits 0 and leaves a
/// `setsid`'d process behind) fails its launch with a message that says so and how to
/// fix it, ends `failed`, and its daemon is killed.
#[test]
fn a_program_that_daemonizes_is_told_so() {
    let m = marker("daemonizes");
    let Some(d) = start("dmn", &m, "exit 0", &[]) else {
        return;
    };
    let v = d.json(&["launch", "dmn", "--wait", "started", "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let daemon = daemon_pid(&d, "dmn");
    let e = d.wait_event("launch_failed", |e| {
        e["instance"] == id.as_str() && e["kind"] == "launch_failed"
    });
    let reason = e["reason"].as_str().unwrap();
    assert!(
        reason.contains("daemonized") && reason.contains("foreground"),
        "{reason}"
    );
    let g = d.json(&["get", &id, "-o", "json"]);
    assert_eq!(g["state"], "failed", "{g}");
    assert!(
        g["failure"]
            .as_str()
            .unwrap_or_default()
            .contains("daemonized"),
        "{g}"
    );
    assert!(
        wait_gone(daemon),
        "the daemon (pid {daemon}) outlived its instance"
    );
    assert!(with_marker(&m).is_empty());
}

/// A keeper killed with SIGKILL takes its instances with it (their parent-death signal),
/// but a double-forked, `setsid`'d process has no parent-death signal of its own: the
/// daemon finds it in the instance's cgroup and kills it.
#[test]
fn a_setsid_descendant_dies_with_its_keeper() {
    let m = marker("keeper");
    let Some(d) = start("dbl", &m, "exec sleep 1000", &[]) else {
        return;
    };
    let v = d.json(&["launch", "dbl", "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let main = v["pid"].as_u64().unwrap() as u32;
    let daemon = daemon_pid(&d, "dbl");
    let cg = cgroup_of(main, &scope_dir(&d));
    let keeper = d.keeper_pid().expect("a keeper runs");
    // SAFETY: kill(2) on the keeper pid read from this test's own state directory.
    unsafe {
        libc::kill(keeper as i32, libc::SIGKILL);
    }
    d.wait_event("lost", |e| {
        e["instance"] == id.as_str() && e["kind"] == "lost"
    });
    assert_gone(&d, &m, &[main, daemon], &cg);
}

/// A daemon without a keeper that crashes leaves its instances running, `setsid`'d
/// descendants included (the control); the next daemon kills them with their stale
/// cgroups before it serves.
#[test]
fn a_crashed_daemon_without_keeper_leaves_nothing_after_the_restart() {
    let m = marker("crash");
    let Some(mut d) = start("dbl", &m, "exec sleep 1000", &["--no-keeper"]) else {
        return;
    };
    let v = d.json(&["launch", "dbl", "-o", "json"]);
    let main = v["pid"].as_u64().unwrap() as u32;
    let daemon = daemon_pid(&d, "dbl");
    let scope = scope_dir(&d);
    let cg = cgroup_of(main, &scope);
    d.kill9();
    assert!(
        alive(daemon),
        "the control: the instance outlives a crashed daemon"
    );
    d.spawn();
    assert_gone(&d, &m, &[main, daemon], &cg);
}

/// Where no cgroup2 mount can be used (here: the daemon runs in a mount namespace without
/// one), process instances are tracked by process group, the daemon says so once in its
/// log, and `health` shows it. Needs root (a mount namespace); skipped otherwise.
#[test]
fn without_a_cgroup2_mount_tracking_falls_back_to_the_process_group() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root for a mount namespace without cgroup2");
        return;
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let v2: Vec<std::ffi::CString> = mountinfo
        .lines()
        .filter(|l| {
            l.split_once(" - ")
                .is_some_and(|(_, r)| r.starts_with("cgroup2 "))
        })
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| std::ffi::CString::new(m).unwrap())
        .collect();
    let root = std::ffi::CString::new("/").unwrap();
    let d = Daemon::start_configured(&[], &[], move |cmd| {
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec the hook makes only raw system calls (unshare,
        // mount, umount2) on CStrings built before the fork; nothing allocates.
        unsafe {
            cmd.pre_exec(move || {
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let r = libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                );
                if r != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for m in &v2 {
                    if libc::umount2(m.as_ptr(), libc::MNT_DETACH) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    });
    let h = d.json(&["health", "-o", "json"]);
    assert_eq!(h["process_tracking"], "process group", "{h}");
    let text = d.cli(&["health"]);
    assert!(
        String::from_utf8_lossy(&text.stdout)
            .contains("process instances tracked by: process group"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
    let said = d
        .daemon_log()
        .matches("tracked by process group, not by cgroup")
        .count();
    assert_eq!(said, 1, "{}", d.daemon_log());
    // Launches still work.
    write_workload(
        &d.workloads,
        "plain",
        "name: plain\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n",
        &[],
    );
    assert!(d.cli(&["reload"]).status.success());
    let v = d.json(&["launch", "plain", "-o", "json"]);
    assert_eq!(v["state"], "ready", "{v}");
}

/// The notify socket accepts `READY=1` from any member of the instance's cgroup: here a
/// process that left the main process's group and session (`setsid`), which process-group
/// tracking could not attribute.
#[test]
fn readiness_from_a_setsid_member_of_the_cgroup_is_accepted() {
    let Some(py) = python3() else { return };
    let m = marker("notify");
    let tail = "exec sleep 1000";
    let Some(d) = start("ntf", &m, tail, &[]) else {
        return;
    };
    let notify = format!(
        "( setsid {py} -c 'import os,socket,time; s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.sendto(b\"READY=1\", os.environ[\"NOTIFY_SOCKET\"]); time.sleep(1000)' & )\n{tail}\n"
    );
    write_workload(
        &d.workloads,
        "ntf",
        "name: ntf\ndriver: process\ncommand: [/bin/sh, run.sh]\nreadiness: {notify: true, timeout: 20s}\n",
        &[("run.sh", &notify)],
    );
    assert!(d.cli(&["reload"]).status.success());
    let v = d.json(&["launch", "ntf", "--wait", "ready", "-o", "json"]);
    assert_eq!(v["state"], "ready", "{v}");
}
