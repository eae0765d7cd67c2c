//! sd_notify `MAINPID=`, honoured as systemd does (issue 15): a program that double-forks
//! like a classic daemon, announces its grandchild with `MAINPID=` (from the grandchild,
//! or from its first process) and lets its first process exit stays `ready`; `get` shows
//! the new pid; `terminate` stops the new main process and reports its own exit status;
//! `kill -9` of it is a crash that the restart policy answers. The control: without
//! `MAINPID=` the same program is reported as having daemonized. Through the keeper (the
//! default) and without it.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

/// A classic daemon: the first process forks, the child `setsid`s and forks again and
/// exits, the grandchild writes `main.pid`, traps SIGTERM to exit 7 and sends `READY=1`
/// (with `MAINPID=` when `mode` is `child`); with `mode` `parent` the first process sends
/// `MAINPID=<grandchild>`. The first process exits 0 once `main.pid` exists and its
/// message (if any) is sent.
const DAEMON: &str = r#"
import os, signal, socket, sys, time

def notify(msg):
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(msg.encode(), addr)
    s.close()

mode = sys.argv[1]
if os.path.exists("main.pid"):
    os.unlink("main.pid")
child = os.fork()
if child > 0:
    os.waitpid(child, 0)
    while not os.path.exists("main.pid"):
        time.sleep(0.01)
    main = int(open("main.pid").read())
    if mode == "parent":
        notify("MAINPID=%d" % main)
    if mode == "sdk":
        sys.path.insert(0, sys.argv[2])
        import bulkhead_sdk
        bulkhead_sdk.notify_main_pid(main)
    sys.exit(0)
os.setsid()
if os.fork() > 0:
    os._exit(0)
signal.signal(signal.SIGTERM, lambda *_: os._exit(7))
msg = "READY=1"
if mode == "child":
    msg = "MAINPID=%d\nREADY=1" % os.getpid()
notify(msg)
with open("main.pid.tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename("main.pid.tmp", "main.pid")
while True:
    time.sleep(1)
"#;

fn manifest(name: &str, mode: &str, policy: &str) -> String {
    let sdk = concat!(env!("CARGO_MANIFEST_DIR"), "/../../sdk/python");
    format!(
        "name: {name}\ncommand: [python3, daemon.py, {mode}, {sdk}]\n\
         readiness: {{notify: true, timeout: 20s}}\n\
         shutdown: {{grace: 10s}}\n\
         restart: {{policy: {policy}, backoff: {{initial: 50ms, max: 50ms}}}}\n"
    )
}

/// A daemon (with `args`) serving workload `name` in `mode`; `None` (printed) without
/// python3 or without cgroup tracking (needed to tell that the program daemonized).
fn start(name: &str, mode: &str, policy: &str, args: &[&str]) -> Option<Daemon> {
    python3()?;
    let d = Daemon::start_with_args(&[], args);
    write_workload(
        &d.workloads,
        name,
        &manifest(name, mode, policy),
        &[("daemon.py", DAEMON)],
    );
    assert!(d.cli(&["reload"]).status.success());
    let tracking = d.json(&["health", "-o", "json"])["process_tracking"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if !tracking.starts_with("cgroup ") {
        eprintln!("skipped: process instances are tracked by {tracking:?} here");
        return None;
    }
    Some(d)
}

/// The grandchild's pid, once `main.pid` names a new one (not `not`).
fn main_pid(d: &Daemon, name: &str, not: Option<u32>) -> u32 {
    let file = d.workloads.join(name).join("main.pid");
    let start = Instant::now();
    loop {
        if let Some(pid) = std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
            .filter(|p| Some(*p) != not)
        {
            return pid;
        }
        assert!(start.elapsed() < DEADLINE, "no new {}", file.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `get` until `pred` holds; returns the view.
fn get_until(d: &Daemon, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let g = d.json(&["get", id, "-o", "json"]);
        if pred(&g) {
            return g;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{id} never {what}: {g}\n{}",
            d.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The whole behaviour for one sender of `MAINPID=` and one daemon configuration.
fn follows_the_new_main_process(mode: &str, args: &[&str]) {
    let name = format!("mp{mode}");
    let Some(d) = start(&name, mode, "on-failure", args) else {
        return;
    };
    let v = d.json(&["launch", &name, "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let main = main_pid(&d, &name, None);
    // The first process exits 0 after the message; the run stays ready on the new one.
    let g = get_until(&d, &id, "followed the new main process", |g| {
        g["pid"] == main
    });
    assert_eq!(g["state"], "ready", "{g}");
    // Long enough for a first process's exit to have been taken as the end of the run.
    std::thread::sleep(Duration::from_millis(500));
    let g = d.json(&["get", &id, "-o", "json"]);
    assert_eq!(
        (g["state"].clone(), g["pid"].clone()),
        ("ready".into(), main.into()),
        "{g}"
    );
    assert_eq!(g["restarts"], 0, "{g}");
    assert!(alive(main));

    // kill -9 of the new main process: a crash, and on-failure restarts the instance.
    // SAFETY: kill(2) on the pid the test's own workload wrote.
    unsafe { libc::kill(main as i32, libc::SIGKILL) };
    let g = get_until(&d, &id, "restarted after the crash", |g| {
        g["restarts"] == 1 && g["state"] == "ready"
    });
    assert_eq!(g["last_exit"]["signal"], 9, "{g}");
    let main2 = main_pid(&d, &name, Some(main));
    let g = get_until(&d, &id, "followed the second run's main process", |g| {
        g["pid"] == main2
    });
    assert_eq!(g["state"], "ready", "{g}");

    // terminate: SIGTERM reaches the new main process, whose own status (exit 7, its
    // SIGTERM handler) is the one reported.
    assert!(d.cli(&["terminate", &id]).status.success());
    let g = get_until(&d, &id, "terminated", |g| g["state"] == "terminated");
    assert_eq!(g["last_exit"]["code"], 7, "{g}");
    assert!(
        wait_gone(main2),
        "the new main process {main2} outlived its instance"
    );
}

/// The same through the Python SDK's `notify_main_pid` (from the first process).
#[test]
fn mainpid_through_the_python_sdk_is_followed() {
    follows_the_new_main_process("sdk", &[]);
}

#[test]
fn mainpid_from_the_grandchild_is_followed() {
    follows_the_new_main_process("child", &[]);
}

#[test]
fn mainpid_from_the_first_process_is_followed() {
    follows_the_new_main_process("parent", &[]);
}

#[test]
fn mainpid_is_followed_without_the_keeper() {
    follows_the_new_main_process("child", &["--no-keeper"]);
}

#[test]
fn mainpid_from_the_first_process_is_followed_without_the_keeper() {
    follows_the_new_main_process("parent", &["--no-keeper"]);
}

/// The control: the same program without `MAINPID=` is ready (its grandchild sent
/// `READY=1`) until its first process exits 0, and is then reported as having daemonized;
/// its grandchild is killed.
#[test]
fn without_mainpid_the_same_program_daemonized() {
    let Some(d) = start("mpnone", "none", "never", &[]) else {
        return;
    };
    let v = d.json(&["launch", "mpnone", "--wait", "started", "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let main = main_pid(&d, "mpnone", None);
    let g = get_until(&d, &id, "failed", |g| g["state"] == "failed");
    assert!(
        g["failure"]
            .as_str()
            .unwrap_or_default()
            .contains("daemonized"),
        "{g}"
    );
    assert!(
        wait_gone(main),
        "the daemonized process {main} outlived its instance"
    );
}

/// A daemon that restarts (SIGKILL) after the move adopts the run from the keeper with
/// its new main process: same pid, still ready, and `terminate` still reports that
/// process's own status.
#[test]
fn a_restarted_daemon_adopts_the_moved_main_process() {
    let Some(mut d) = start("mpadopt", "child", "never", &[]) else {
        return;
    };
    let v = d.json(&["launch", "mpadopt", "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let main = main_pid(&d, "mpadopt", None);
    get_until(&d, &id, "followed the new main process", |g| {
        g["pid"] == main
    });
    d.kill9();
    d.spawn();
    let g = get_until(&d, &id, "adopted", |g| g["state"] == "ready");
    assert_eq!(g["pid"], main, "{g}");
    assert!(d.cli(&["terminate", &id]).status.success());
    let g = get_until(&d, &id, "terminated", |g| g["state"] == "terminated");
    assert_eq!(g["last_exit"]["code"], 7, "{g}");
    assert!(wait_gone(main));
}

/// The sandbox: a program whose first process forks (the child leads a session of its
/// own: it is the instance's by its PID namespace, not by a process group), sends
/// `READY=1` and `STATUS=main <child>` (with `MAINPID=<child>` when `mode` is `mainpid`,
/// or `MAINPID=<mode>` for any other value but `none`) and exits 0 at once. The pids are
/// the sandbox's own.
const SANDBOXED: &str = r#"import os, signal, socket, sys, time
def notify(msg):
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(msg.encode(), addr)
    s.close()
mode = sys.argv[1]
# Before the fork: the child has it before it is named.
signal.signal(signal.SIGTERM, lambda *_: os._exit(7))
child = os.fork()
if child == 0:
    os.setsid()
    while True:
        time.sleep(1)
msg = "READY=1\nSTATUS=main %d" % child
if mode == "mainpid":
    msg = "MAINPID=%d\n%s" % (child, msg)
elif mode != "none":
    msg = "MAINPID=%s\n%s" % (mode, msg)
notify(msg)
sys.exit(0)
"#;

fn sandboxed(name: &str, py: &str, mode: &str) -> String {
    let script: String = SANDBOXED.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "name: {name}\ndriver: sandbox\ncommand:\n  - {py}\n  - -c\n  - |\n{script}  - '{mode}'\n\
         readiness: {{notify: true, timeout: 30s}}\nrestart: {{policy: never}}\n"
    )
}

/// `pid`'s number in its innermost PID namespace (the sandbox's).
fn inner_pid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

/// The first process of a sandboxed program exits right after `MAINPID=<child>`: the run
/// stays ready on the child (`get` shows its host pid), and the child's own exit status
/// (7, from its SIGTERM handler) ends the run, whether the child is killed directly or
/// through `terminate`.
#[test]
fn a_sandboxed_mainpid_is_followed_and_its_status_reported() {
    sandboxed_mainpid_is_followed("");
}

/// The same with the host's user namespace (the init and the program run as the host's
/// root, no id mapping).
#[test]
fn a_sandboxed_mainpid_is_followed_without_a_user_namespace() {
    sandboxed_mainpid_is_followed("sandbox: {user_namespace: host}\n");
}

fn sandboxed_mainpid_is_followed(extra: &str) {
    let Some(py) = system_python3() else { return };
    let m = format!("{}{extra}", sandboxed("sbmp", py, "mainpid"));
    let d = Daemon::start(&[("sbmp", &m)]);
    if !crate::sandbox::sandbox_available(&d) {
        return;
    }
    let v = d.json(&["launch", "sbmp", "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    // STATUS= names the child as the sandbox sees it; `get` shows its host pid.
    let g = get_until(&d, &id, "followed the child", |g| {
        let inner = g["status_text"]
            .as_str()
            .and_then(|s| s.strip_prefix("main "))
            .and_then(|p| p.parse::<u32>().ok());
        let host = g["pid"].as_u64().map(|p| p as u32);
        inner.is_some() && host.and_then(inner_pid) == inner
    });
    let main = g["pid"].as_u64().unwrap() as u32;
    assert_ne!(
        std::fs::read_to_string(format!("/proc/{main}/comm"))
            .unwrap_or_default()
            .trim(),
        "bulkhead-init",
        "{g}"
    );
    // Long enough for the first process's exit to have been taken as the end of the run.
    std::thread::sleep(Duration::from_millis(500));
    let g = d.json(&["get", &id, "-o", "json"]);
    assert_eq!(
        (g["state"].clone(), g["pid"].clone(), g["restarts"].clone()),
        ("ready".into(), main.into(), 0.into()),
        "{g}\n{}",
        d.daemon_log()
    );
    assert!(alive(main));

    // SAFETY: kill(2) on the host pid of the test's own workload's child.
    unsafe { libc::kill(main as i32, libc::SIGTERM) };
    let e = d.wait_event("the run ended with the child", |e| {
        e["instance"] == id.as_str() && e["kind"] == "exited"
    });
    assert_eq!(e["exit_code"], 7, "{e}");
    let g = d.json(&["get", &id, "-o", "json"]);
    assert_eq!(g["last_exit"]["code"], 7, "{g}");
    assert!(wait_gone(main), "the child {main} outlived its instance");

    // terminate: SIGTERM reaches the new main process of a second run, whose own status
    // (exit 7) is the one reported, not the first process's exit 0.
    let v = d.json(&["launch", "sbmp", "-o", "json"]);
    assert_eq!(v["id"], id.as_str(), "{v}");
    let g = get_until(&d, &id, "followed the second run's child", |g| {
        g["state"] == "ready"
            && g["pid"].as_u64().is_some_and(|p| p as u32 != main)
            && g["status_text"].as_str().is_some_and(|s| {
                s.strip_prefix("main ").and_then(|p| p.parse().ok())
                    == g["pid"].as_u64().and_then(|p| inner_pid(p as u32))
            })
    });
    let main2 = g["pid"].as_u64().unwrap() as u32;
    assert!(d.cli(&["terminate", &id]).status.success());
    let g = get_until(&d, &id, "terminated", |g| g["state"] == "terminated");
    assert_eq!(g["last_exit"]["code"], 7, "{g}");
    assert!(wait_gone(main2), "the child {main2} outlived its instance");
}

/// The control: without `MAINPID=`, the same sandboxed program ends with its first
/// process (exit 0), and its child goes with it.
#[test]
fn without_mainpid_a_sandboxed_program_ends_with_its_first_process() {
    let Some(py) = system_python3() else { return };
    let d = Daemon::start(&[("sbnone", &sandboxed("sbnone", py, "none"))]);
    if !crate::sandbox::sandbox_available(&d) {
        return;
    }
    let v = d.json(&["launch", "sbnone", "--wait", "started", "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let e = d.wait_event("the run ended with the first process", |e| {
        e["instance"] == id.as_str() && e["kind"] == "exited"
    });
    assert_eq!(e["exit_code"], 0, "{e}");
    let g = d.json(&["get", &id, "-o", "json"]);
    assert_eq!(g["state"], "exited", "{g}");
}

/// `MAINPID=` naming a process outside the sandbox (a host pid: the test's own) or the
/// sandbox's init (1) is refused: the run ends with its first process, as without it.
#[test]
fn a_sandboxed_mainpid_outside_the_instance_is_refused() {
    let Some(py) = system_python3() else { return };
    let me = std::process::id().to_string();
    let d = Daemon::start(&[
        ("sbhost", &sandboxed("sbhost", py, &me)),
        ("sbinit", &sandboxed("sbinit", py, "1")),
    ]);
    if !crate::sandbox::sandbox_available(&d) {
        return;
    }
    for (name, value) in [("sbhost", me.as_str()), ("sbinit", "1")] {
        let v = d.json(&["launch", name, "--wait", "started", "-o", "json"]);
        let id = v["id"].as_str().unwrap().to_owned();
        let e = d.wait_event("the run ended with the first process", |e| {
            e["instance"] == id.as_str() && e["kind"] == "exited"
        });
        assert_eq!(e["exit_code"], 0, "{e}");
        let log = d.daemon_log();
        assert!(
            log.contains(&format!("MAINPID={value} is not part of the instance")),
            "{log}"
        );
    }
}
