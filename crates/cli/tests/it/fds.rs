//! Issue 11, inherited descriptors: a daemon started with a stray descriptor (a directory
//! fd without close-on-exec at 251, as a careless launcher or an attacker who controls the
//! daemon's parent would leave it) must not pass it on to a workload, an exec'd command, an
//! exec probe or the keeper. A directory fd inherited this way let a sandbox escape its mounts
//! (`/proc/<pid>/fd/N/..`).
//!
//! Descriptor tables are read from outside (`/proc/<pid>/fd`), so the listing is exact (a
//! process listing its own table sees the descriptor it lists with). Every test first
//! checks that the daemon really holds the stray descriptor, so it cannot pass vacuously.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Daemon, DEADLINE};

/// The descriptor number the stray directory gets in the daemon.
const STRAY: i32 = 251;

/// The workload: its main process is `sleep` itself, exec'd by sh.
const SLEEPER: &str = "name: sleeper\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n";

/// (fd number, link target) of every descriptor of `pid`.
fn fds_of(pid: u32) -> Vec<(i32, PathBuf)> {
    let mut out: Vec<(i32, PathBuf)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("cannot list /proc/{pid}/fd: {e}"))
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.parse().ok()?;
            Some((n, std::fs::read_link(e.path()).unwrap_or_default()))
        })
        .collect();
    out.sort();
    out
}

/// Starts a daemon that inherits a directory fd (no close-on-exec) at [`STRAY`], and
/// checks that the daemon really holds it.
fn daemon_with_stray_fd(args: &[&str]) -> (Daemon, tempfile::TempDir) {
    let marker = tempfile::tempdir().unwrap();
    let dir = std::fs::File::open(marker.path()).unwrap();
    let raw = dir.as_raw_fd();
    let probe_out = marker.path().with_extension("probe-fds");
    // The probe's shell forks `find`, which lists the shell's table (the probe's own) into
    // the file itself: a shell redirection would add the shell's saved copies (fd 10+).
    let probed = format!(
        "name: probed\ncommand: [sleep, '1000']\nreadiness:\n  exec: [/bin/sh, -c, 'find /proc/$$/fd -mindepth 1 -fprintf {} \"%f -> %l\\n\"; true']\n  timeout: 30s\n",
        probe_out.display()
    );
    let d = Daemon::start_configured(&[("sleeper", SLEEPER), ("probed", &probed)], args, |cmd| {
        // SAFETY: runs in the forked child before exec; dup2 is async-signal-safe and the
        // source descriptor stays open in the parent until the spawn returns. dup2 gives
        // the copy no close-on-exec flag: the daemon inherits it.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(raw, STRAY) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    drop(dir);
    let daemon_pid = d.child.as_ref().unwrap().id();
    let held = fds_of(daemon_pid);
    assert!(
        held.iter()
            .any(|(n, p)| *n == STRAY && p.as_path() == marker.path()),
        "the daemon should hold the stray fd {STRAY} -> {}: {held:?}",
        marker.path().display()
    );
    (d, marker)
}

/// Where the `probed` workload's readiness probe writes its descriptor listing.
fn probe_listing(marker: &Path) -> PathBuf {
    marker.with_extension("probe-fds")
}

/// The pid of the running instance `id`.
fn instance_pid(d: &Daemon, id: &str) -> u32 {
    let v = d.json(&["get", id, "-o", "json"]);
    v["pid"].as_u64().unwrap_or_else(|| panic!("no pid in {v}")) as u32
}

/// Waits until `pid` runs `sleep` (sh has exec'd it), then returns its descriptors once
/// they have settled: `sleep` itself opens files while it starts (the gconv cache), but
/// an inherited descriptor never goes away, so a table that still has more than 0, 1 and
/// 2 after a few seconds is returned as it is (and fails the caller's check).
pub(crate) fn fds_of_sleep(pid: u32) -> Vec<(i32, PathBuf)> {
    let start = Instant::now();
    loop {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.starts_with(b"sleep\0") {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "{pid} never exec'd sleep");
        std::thread::sleep(Duration::from_millis(10));
    }
    let settled = Instant::now();
    loop {
        let fds = fds_of(pid);
        if fds.iter().all(|(n, _)| *n <= 2) || settled.elapsed() > Duration::from_secs(3) {
            return fds;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn assert_only_std_streams(what: &str, fds: &[(i32, PathBuf)], marker: &Path) {
    let numbers: Vec<i32> = fds.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        numbers,
        vec![0, 1, 2],
        "{what} must have only stdin, stdout and stderr: {fds:?}"
    );
    assert!(
        fds.iter().all(|(_, p)| !p.starts_with(marker)),
        "{what} holds the stray directory: {fds:?}"
    );
}

/// A workload, a `bulkhead exec`'d command and the keeper see only 0, 1 and 2.
fn no_inherited_descriptor(args: &[&str], keeper: bool) {
    let (d, marker) = daemon_with_stray_fd(args);
    d.json(&["launch", "sleeper", "-o", "json"]);
    let id = "ns:default:sleeper";
    let pid = instance_pid(&d, id);
    assert_only_std_streams("the workload", &fds_of_sleep(pid), marker.path());

    // The exec'd command prints its pid and becomes `sleep`; it is read from outside.
    let mut exec = Command::new(crate::harness::BIN)
        .arg("--socket")
        .arg(&d.socket)
        .args(["exec", id, "--", "sh", "-c", "echo $$; exec sleep 1000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(exec.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let exec_pid: u32 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("exec printed {line:?}"));
    let exec_fds = fds_of_sleep(exec_pid);
    let _ = exec.kill();
    let _ = exec.wait();
    // Only stdin, stdout and stderr: the exec pipes, nothing else.
    assert_only_std_streams("the exec'd command", &exec_fds, marker.path());

    // An exec probe: its lines are "<fd> -> <target>".
    d.json(&["launch", "probed", "-o", "json"]);
    let listing = std::fs::read_to_string(probe_listing(marker.path())).unwrap();
    let mut probe_fds: Vec<(i32, PathBuf)> = listing
        .lines()
        .filter_map(|l| {
            let (left, target) = l.split_once(" -> ")?;
            Some((
                left.rsplit(' ').next()?.parse().ok()?,
                PathBuf::from(target),
            ))
        })
        .collect();
    probe_fds.sort();
    assert_only_std_streams("the exec probe", &probe_fds, marker.path());

    if keeper {
        let kp = d.keeper_pid().expect("a keeper runs");
        let kfds = fds_of(kp);
        assert!(
            kfds.iter().all(|(_, p)| !p.starts_with(marker.path())),
            "the keeper holds the stray directory: {kfds:?}"
        );
    }
    d.cli(&["terminate", id]);
    d.cli(&["terminate", "ns:default:probed"]);
}

#[test]
fn inherited_descriptors_never_reach_keeper_instances_or_exec() {
    no_inherited_descriptor(&[], true);
}

#[test]
fn inherited_descriptors_never_reach_process_instances_or_exec() {
    no_inherited_descriptor(&["--no-keeper"], false);
}
