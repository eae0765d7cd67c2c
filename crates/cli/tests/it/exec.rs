//! `bulkhead exec`, and reaping: orphans of instances are reaped by the daemon (a child
//! subreaper) without ever taking an exit status that somebody else waits for.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

const SLEEPER: &str =
    "name: sleeper\ncommand: [/bin/sh, -c, 'exec sleep 1000']\nenv: {GREETING: hello}\n";

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `bulkhead exec ID -- argv` with `input` on stdin.
fn exec_with_input(socket: &Path, id: &str, argv: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .arg("--socket")
        .arg(socket)
        .args(["exec", id, "--"])
        .args(argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

/// Zombies whose parent is `parent`, from a /proc scan.
fn zombies_of(parent: u32) -> Vec<u32> {
    bulkhead_driver::sys::zombie_children(parent)
}

fn ppid(pid: u32) -> Option<u32> {
    bulkhead_driver::sys::read_stat(pid).ok().map(|s| s.ppid)
}

/// Waits (bounded) until a file holds a number.
fn read_pid_file(path: &Path) -> u32 {
    let start = Instant::now();
    loop {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{} never written",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (bounded) until no zombie has `parent` as its parent.
fn assert_no_zombies_of(parent: u32, daemon: &Daemon) {
    let start = Instant::now();
    loop {
        let z = zombies_of(parent);
        if z.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "zombies of the daemon {parent} remain: {z:?}\n--- daemon log ---\n{}",
            daemon.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn exec_exit_codes_and_signals_are_exact_while_the_reaper_runs() {
    let d = Daemon::start(&[("sleeper", SLEEPER)]);
    d.json(&["launch", "sleeper", "-o", "json"]);
    let id = "ns:default:sleeper";
    for _ in 0..10 {
        let ok = d.cli(&["exec", id, "--", "true"]);
        assert_eq!(code(&ok), Some(0), "{}", stderr(&ok));
        let three = d.cli(&["exec", id, "--", "sh", "-c", "exit 3"]);
        assert_eq!(code(&three), Some(3), "{}", stderr(&three));
        assert_eq!(stderr(&three), "", "a plain exit code prints nothing");
        // The command also leaves an orphan behind, to keep the reaper busy.
        let killed = d.cli(&["exec", id, "--", "sh", "-c", "(sleep 0.01 &); kill -9 $$"]);
        assert_eq!(code(&killed), Some(137), "{}", stderr(&killed));
        assert!(
            stderr(&killed).contains("SIGKILL (9)"),
            "{}",
            stderr(&killed)
        );
    }
    // Output comes back on the right stream.
    let both = d.cli(&[
        "exec",
        id,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(code(&both), Some(7));
    assert_eq!(stdout(&both), "out\n");
    assert_eq!(stderr(&both), "err\n");
}

#[test]
fn exec_runs_in_the_instance_environment_and_directory() {
    let d = Daemon::start(&[("sleeper", SLEEPER)]);
    let v = d.json(&["launch", "sleeper", "-o", "json"]);
    let port = v["port"].as_u64().unwrap();
    let out = d.cli(&[
        "exec",
        "ns:default:sleeper",
        "--",
        "sh",
        "-c",
        "echo \"$BULKHEAD_INSTANCE|$PORT|$GREETING|${NOTIFY_SOCKET-unset}\"; pwd -P",
    ]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some(format!("ns:default:sleeper|{port}|hello|unset").as_str())
    );
    let dir = d.workloads.join("sleeper").canonicalize().unwrap();
    assert_eq!(lines.next(), Some(dir.to_str().unwrap()));
}

#[test]
fn exec_forwards_stdin() {
    let d = Daemon::start(&[("sleeper", SLEEPER)]);
    d.json(&["launch", "sleeper", "-o", "json"]);
    let out = exec_with_input(&d.socket, "ns:default:sleeper", &["cat"], b"hello\nworld\n");
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello\nworld\n");
    // More than one chunk, and end of input reaches the command.
    let big = vec![b'x'; 300_000];
    let out = exec_with_input(&d.socket, "ns:default:sleeper", &["wc", "-c"], &big);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "300000");
}

#[test]
fn exec_errors_have_clear_messages_and_exit_codes() {
    let d = Daemon::start(&[
        ("sleeper", SLEEPER),
        ("quick", "name: quick\ncommand: [/bin/sh, -c, 'exit 0']\n"),
    ]);
    let unknown = d.cli(&["exec", "ns:default:nope", "--", "true"]);
    assert_eq!(code(&unknown), Some(3), "{}", stderr(&unknown));
    assert!(stderr(&unknown).contains("no instance ns:default:nope"));

    d.json(&["launch", "quick", "--wait", "started", "-o", "json"]);
    d.wait_event("quick exited", |e| {
        e["kind"] == "exited" && e["instance"] == "ns:default:quick"
    });
    let stopped = d.cli(&["exec", "ns:default:quick", "--", "true"]);
    assert_eq!(code(&stopped), Some(4), "{}", stderr(&stopped));
    assert!(
        stderr(&stopped).contains("is not running (state exited)"),
        "{}",
        stderr(&stopped)
    );

    d.json(&["launch", "sleeper", "-o", "json"]);
    let missing = d.cli(&["exec", "ns:default:sleeper", "--", "no-such-command-here"]);
    assert_eq!(code(&missing), Some(4), "{}", stderr(&missing));
    assert!(
        stderr(&missing)
            .contains("cannot start no-such-command-here in instance ns:default:sleeper"),
        "{}",
        stderr(&missing)
    );
    // No command at all is a usage error.
    assert_eq!(code(&d.cli(&["exec", "ns:default:sleeper"])), Some(2));
}

#[test]
fn exec_is_killed_with_its_group_when_the_client_goes_away() {
    let d = Daemon::start(&[("sleeper", SLEEPER)]);
    d.json(&["launch", "sleeper", "-o", "json"]);
    let pidfile = d.dir.path().join("exec.pids");
    let script = format!("sleep 1000 & echo $$ $! > {}; wait", pidfile.display());
    let mut client = Command::new(BIN)
        .arg("--socket")
        .arg(&d.socket)
        .args(["exec", "ns:default:sleeper", "--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let pids: Vec<u32> = loop {
        let text = std::fs::read_to_string(&pidfile).unwrap_or_default();
        let pids: Vec<u32> = text
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.len() == 2 && text.ends_with('\n') {
            break pids;
        }
        assert!(start.elapsed() < DEADLINE, "exec never started");
        std::thread::sleep(Duration::from_millis(10));
    };
    client.kill().unwrap();
    client.wait().unwrap();
    for pid in pids {
        assert!(wait_gone(pid), "exec process {pid} survived its client");
    }
}

/// Waits until `orphan` has been re-parented to `reaper` (its parent exits first), then
/// until it is reaped: gone from /proc entirely, not a zombie.
fn assert_reparented_and_reaped(orphan: u32, reaper: u32, d: &Daemon) {
    let start = Instant::now();
    let mut reparented = false;
    while let Some(parent) = ppid(orphan) {
        if parent == reaper {
            reparented = true;
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "orphan {orphan} stays with parent {parent}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        reparented,
        "orphan {orphan} exited before it was seen re-parented to {reaper}"
    );
    let start = Instant::now();
    while std::fs::metadata(format!("/proc/{orphan}")).is_ok() {
        assert!(
            start.elapsed() < DEADLINE,
            "orphan {orphan} was never reaped\n--- daemon log ---\n{}",
            d.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_no_zombies_of(reaper, d);
}

const ORPHANS: &str =
    "name: orphans\ncommand: [/bin/sh, -c, '(sleep 1 & echo $! > gc.pid) ; exec sleep 1000']\n";

#[test]
fn orphaned_grandchildren_of_instances_are_reaped_by_the_daemon() {
    // Without a keeper the daemon parents the instances: their orphans come to it.
    let d = Daemon::start_with_args(&[("orphans", ORPHANS)], &["--no-keeper"]);
    let daemon_pid = d.json(&["health", "-o", "json"])["pid"].as_u64().unwrap() as u32;
    d.json(&["launch", "orphans", "-o", "json"]);
    let gc = read_pid_file(&d.workloads.join("orphans/gc.pid"));
    assert_reparented_and_reaped(gc, daemon_pid, &d);
    // The instance itself is untouched.
    let v = d.json(&["get", "ns:default:orphans", "-o", "json"]);
    assert_eq!(v["state"], "ready");
}

#[test]
fn orphaned_grandchildren_of_instances_are_reaped_by_the_keeper() {
    // With a keeper (the default), the keeper parents the instances and reaps their orphans.
    let d = Daemon::start(&[("orphans", ORPHANS)]);
    d.json(&["launch", "orphans", "-o", "json"]);
    let keeper = d.keeper_pid().expect("a keeper runs");
    let gc = read_pid_file(&d.workloads.join("orphans/gc.pid"));
    assert_reparented_and_reaped(gc, keeper, &d);
}

#[test]
fn orphans_of_exec_commands_are_reaped_by_the_daemon() {
    // exec commands are the daemon's own children, with or without a keeper. `setsid`
    // takes the orphan out of the command's process group, so it outlives the command.
    let d = Daemon::start(&[("sleeper", SLEEPER)]);
    let daemon_pid = d.json(&["health", "-o", "json"])["pid"].as_u64().unwrap() as u32;
    d.json(&["launch", "sleeper", "-o", "json"]);
    let pidfile = d.dir.path().join("orphan.pid");
    // Its output goes elsewhere, or the exec would wait for it (up to its drain limit).
    // The orphan records its own pid once it has left the command's process group
    // (`$!` would name `setsid`, which forks when it leads its group), and the command
    // waits for that: when it exits, what is left in its group is killed.
    let script = format!(
        "setsid sh -c 'echo $$ > {p}.tmp; mv {p}.tmp {p}; exec sleep 1' </dev/null >/dev/null 2>&1 & while [ ! -s {p} ]; do sleep 0.01; done",
        p = pidfile.display()
    );
    let out = d.cli(&["exec", "ns:default:sleeper", "--", "sh", "-c", &script]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let orphan = read_pid_file(&pidfile);
    assert_reparented_and_reaped(orphan, daemon_pid, &d);
}

#[test]
fn instance_exit_codes_are_never_stolen_by_the_reaper() {
    // Every run also orphans a grandchild, so the reaper is woken again and again while
    // the driver reaps the main processes.
    // Without a keeper: the main processes are the daemon's own children, reaped by the
    // driver through their pidfds while the daemon's reaper collects the orphans.
    let d = Daemon::start_with_args(
        &[(
            "three",
            "name: three\ncommand: [/bin/sh, -c, '(sleep 0.01 &); exit 3']\n",
        )],
        &["--no-keeper"],
    );
    let daemon_pid = d.json(&["health", "-o", "json"])["pid"].as_u64().unwrap() as u32;
    const RUNS: usize = 30;
    for i in 0..RUNS {
        let out = d.cli(&["launch", "three", "--wait", "started", "-o", "json"]);
        assert!(out.status.success(), "launch {i}: {}", stderr(&out));
        let start = Instant::now();
        let v = loop {
            let v = d.json(&["get", "ns:default:three", "-o", "json"]);
            if v["state"] != "starting" && v["state"] != "ready" {
                break v;
            }
            assert!(start.elapsed() < DEADLINE, "run {i} never ended: {v}");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(v["state"], "exited", "run {i}: {v}");
        assert_eq!(v["last_exit"]["code"], 3, "run {i}: {v}");
    }
    let exits: Vec<_> = d
        .events()
        .into_iter()
        .filter(|e| e["kind"] == "exited")
        .collect();
    assert_eq!(exits.len(), RUNS);
    assert!(exits.iter().all(|e| e["exit_code"] == 3), "{exits:#?}");
    assert_no_zombies_of(daemon_pid, &d);
}

#[test]
fn serve_works_as_pid_1() {
    if !Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
    {
        eprintln!("skipping: cannot create a PID namespace (unshare --pid needs root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let workloads = dir.path().join("workloads");
    write_workload(
        &workloads,
        "orphans",
        "name: orphans\ncommand: [/bin/sh, -c, '(sleep 0.2 &) ; exec sleep 1000']\n",
        &[],
    );
    let socket = dir.path().join("api.sock");
    let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
    let mut unshare = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
            BIN,
            "serve",
            "--workloads",
        ])
        .arg(&workloads)
        .arg("--state")
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(&socket)
        .env("BULKHEAD_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let daemon_log = || std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
    let cli = |args: &[&str]| {
        Command::new(BIN)
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let start = Instant::now();
    while !(socket.exists() && cli(&["health"]).status.success()) {
        assert!(
            start.elapsed() < DEADLINE,
            "daemon did not come up:\n{}",
            daemon_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let health: serde_json::Value =
        serde_json::from_slice(&cli(&["health", "-o", "json"]).stdout).unwrap();
    assert_eq!(health["pid"], 1, "{health}");
    let out = cli(&["launch", "orphans", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The exec leaves an orphan (out of its group): it comes to PID 1, the daemon.
    let three = cli(&[
        "exec",
        "ns:default:orphans",
        "--",
        "sh",
        "-c",
        "setsid sleep 0.2 & exit 3",
    ]);
    assert_eq!(code(&three), Some(3), "{}", stderr(&three));
    // The host pid of the daemon: unshare's child.
    let host_pid = {
        let start = Instant::now();
        loop {
            let found = std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                (ppid(pid) == Some(unshare.id())).then_some(pid)
            });
            if let Some(p) = found {
                break p;
            }
            assert!(start.elapsed() < DEADLINE, "no daemon under unshare");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // As PID 1 the daemon gets every orphan of the namespace, and reaps them.
    std::thread::sleep(Duration::from_millis(400));
    let start = Instant::now();
    while !zombies_of(host_pid).is_empty() {
        assert!(
            start.elapsed() < DEADLINE,
            "zombies under PID 1: {:?}\n{}",
            zombies_of(host_pid),
            daemon_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGTERM still means a graceful shutdown for PID 1 (which ignores signals it has no
    // handler for).
    // SAFETY: kill(2) on the pid of a process we just found as our grandchild.
    unsafe {
        libc::kill(host_pid as i32, libc::SIGTERM);
    }
    let start = Instant::now();
    let status = loop {
        if let Some(st) = unshare.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "PID 1 daemon did not stop:\n{}",
            daemon_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}\n{}", daemon_log());
    assert!(daemon_log().contains("shutting down"), "{}", daemon_log());
}

#[test]
fn exec_with_a_terminal() {
    let d = Daemon::start(&[("sleeper", SLEEPER)]);
    d.json(&["launch", "sleeper", "-o", "json"]);
    let id = "ns:default:sleeper";
    // The test's stdin is not a terminal: no raw mode, the default size.
    let out = d.cli(&[
        "exec",
        "-t",
        id,
        "--",
        "sh",
        "-c",
        "tty; test -t 0 && test -t 1 && test -t 2 && echo all-terminals; stty size; exit 5",
    ]);
    assert_eq!(code(&out), Some(5), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("/dev/pts/"), "{text:?}");
    assert!(text.contains("all-terminals\r\n"), "{text:?}");
    assert!(text.contains("24 80\r\n"), "{text:?}");
    // The command leads its own session, with the terminal as controlling terminal.
    let out = d.cli(&[
        "exec",
        "-t",
        id,
        "--",
        "sh",
        "-c",
        "ps -o sid= -p $$; echo $$",
    ]);
    let text = stdout(&out);
    let nums: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(nums.len(), 2, "{text:?}");
    assert_eq!(nums[0], nums[1], "not a session leader: {text:?}");
    // Input goes through the terminal (echoed), and its end reaches the command.
    let mut child = Command::new(BIN)
        .arg("--socket")
        .arg(&d.socket)
        .args(["exec", "-t", id, "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello\r\nhello\r\n");
    // A signal death through a terminal.
    let killed = d.cli(&["exec", "-t", id, "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(code(&killed), Some(143), "{}", stderr(&killed));
    assert!(
        stderr(&killed).contains("SIGTERM (15)"),
        "{}",
        stderr(&killed)
    );
}

#[test]
fn exec_probes_work_with_the_reaper_and_timed_out_ones_leave_nothing() {
    let d = Daemon::start(&[
        (
            "probed",
            "name: probed\ncommand: [/bin/sh, -c, 'sleep 0.3; touch ready.flag; exec sleep 1000']\n\
             readiness:\n  exec: {command: [/bin/sh, -c, 'test -f ready.flag'], period: 20ms}\n  timeout: 30s\n",
        ),
        (
            "hangs",
            "name: hangs\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n\
             readiness:\n  exec: {command: [/bin/sh, -c, 'echo $$ >> probe.pids; exec sleep 1000'], period: 50ms, timeout: 100ms}\n  timeout: 1s\n",
        ),
    ]);
    let daemon_pid = d.json(&["health", "-o", "json"])["pid"].as_u64().unwrap() as u32;
    // Failing attempts (exit 1) until the flag exists, then a pass.
    let v = d.json(&["launch", "probed", "-o", "json"]);
    assert_eq!(v["state"], "ready", "{v}");
    // Every attempt times out: each is killed with its group and reaped.
    let out = d.cli(&["launch", "hangs", "-o", "json"]);
    assert_eq!(code(&out), Some(7), "{}", stderr(&out));
    let pids: Vec<u32> = std::fs::read_to_string(d.workloads.join("hangs/probe.pids"))
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(!pids.is_empty());
    for pid in pids {
        let start = Instant::now();
        while std::fs::metadata(format!("/proc/{pid}")).is_ok() {
            assert!(
                start.elapsed() < DEADLINE,
                "probe {pid} was not killed and reaped"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert_no_zombies_of(daemon_pid, &d);
}
