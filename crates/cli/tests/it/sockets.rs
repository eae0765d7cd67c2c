//! Socket activation (issue 15): sockets the daemon binds before the spawn and keeps
//! across restarts (`sockets:`), handed over with the sd_listen_fds protocol, and
//! instances launched by their first connection (`activation: on-connection`).
//!
//! Every program here is a real one speaking the protocol: a small HTTP server of ours in
//! Python (`socket.socket(fileno=3)`), Python's own `http.server` given `socket.fromfd(3)`,
//! and a checker that reports what it was handed. Descriptor tables are read from outside
//! (`/proc/<pid>/fd`), so the listing is exact.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

/// A small HTTP server: with `LISTEN_FDS` for this pid it serves descriptor 3, otherwise
/// it binds `$PORT` itself (as a program without socket activation does).
const SERVER: &str = r#"
import os, socket
if os.environ.get("LISTEN_PID") == str(os.getpid()) and int(os.environ.get("LISTEN_FDS", "0")) >= 1:
    s = socket.socket(fileno=3)
else:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(os.environ["PORT"])))
    s.listen(128)
while True:
    c, _ = s.accept()
    try:
        c.recv(4096)
        c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    except OSError:
        pass
    c.close()
"#;

/// Reports what it was handed (one JSON line on stdout), then answers `admin` on the
/// Unix socket (descriptor 4) and keeps running.
const CHECKER: &str = r#"
import json, os, socket, sys
out = {"pid": os.getpid(), "listen_pid": os.environ.get("LISTEN_PID"),
       "listen_fds": os.environ.get("LISTEN_FDS"), "names": os.environ.get("LISTEN_FDNAMES")}
n = int(os.environ.get("LISTEN_FDS", "0"))
socks = []
for fd in range(3, 3 + n):
    s = socket.socket(fileno=fd)
    socks.append({"fd": fd, "family": int(s.family), "addr": s.getsockname() if s.family == socket.AF_UNIX else list(s.getsockname()[:2]),
                  "listening": s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1})
    s.detach()
out["sockets"] = socks
print(json.dumps(out), flush=True)
if n >= 2:
    a = socket.socket(fileno=4)
    while True:
        c, _ = a.accept()
        c.sendall(b"admin")
        c.close()
else:
    import time
    time.sleep(1000)
"#;

/// Python's own HTTP server, given the socket systemd-style with `socket.fromfd`.
const STDLIB_HTTP: &str = r#"
import os, socket, http.server
assert os.environ["LISTEN_PID"] == str(os.getpid()), "LISTEN_PID is not this process"
class Server(http.server.HTTPServer):
    def server_bind(self): pass
    def server_activate(self): pass
srv = Server(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler, bind_and_activate=False)
srv.socket.close()
srv.socket = socket.fromfd(3, socket.AF_INET, socket.SOCK_STREAM)
srv.serve_forever()
"#;

fn workload(d: &Daemon, name: &str, manifest: &str, files: &[(&str, &str)]) {
    write_workload(&d.workloads, name, manifest, files);
    let out = d.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The descriptor numbers of `pid`, read from outside.
fn fds_of(pid: u64) -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    v.sort();
    v
}

/// One HTTP request; `Err` carries the error kind (refused, reset, ...).
fn request(port: u16) -> Result<String, std::io::ErrorKind> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.kind())?;
    s.set_read_timeout(Some(DEADLINE)).map_err(|e| e.kind())?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| e.kind())?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(|e| e.kind())?;
    if body.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof);
    }
    Ok(body)
}

/// Waits for `pred` on `get <id>`, generously.
fn wait_get(d: &Daemon, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let out = d.cli(&["get", id, "-o", "json"]);
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            if pred(&v) {
                return v;
            }
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{id}: never {what}; last: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            d.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Debug, Default)]
struct Tally {
    answered: usize,
    refused: usize,
    /// Reset or cut short: a request the killed program had accepted.
    broken: usize,
}

/// Requests to `port` back to back on a thread of their own, tallied.
struct ClientLoop {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<Tally>,
}

impl ClientLoop {
    fn start(port: u16) -> ClientLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let (s, a) = (stop.clone(), answered.clone());
        let thread = std::thread::spawn(move || {
            let mut t = Tally::default();
            while !s.load(Ordering::SeqCst) {
                match request(port) {
                    Ok(body) if body.ends_with("ok") => {
                        t.answered += 1;
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => t.broken += 1,
                    Err(std::io::ErrorKind::ConnectionRefused) => t.refused += 1,
                    Err(_) => t.broken += 1,
                }
            }
            t
        });
        ClientLoop {
            stop,
            answered,
            thread,
        }
    }

    fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }

    /// Waits until `n` requests were answered.
    fn until(&self, n: usize) {
        let start = Instant::now();
        while self.answered() < n {
            assert!(start.elapsed() < DEADLINE, "the server answers no request");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn finish(self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

/// A client loop against `port` while the instance's program is killed with SIGKILL and
/// restarted by its policy: what the clients saw from before the kill until answers
/// come from the new program.
fn kill_and_count(d: &Daemon, id: &str, port: u16) -> Tally {
    let v = wait_get(d, id, "ready", |v| v["state"] == "ready");
    let pid = v["pid"].as_u64().unwrap();
    let client = ClientLoop::start(port);
    client.until(20);
    // SAFETY: plain kill(2) of the instance's pid, read from the daemon just before.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let v = wait_get(d, id, "restarted", |v| {
        v["restarts"].as_u64() >= Some(1) && v["state"] == "ready"
    });
    assert_ne!(v["pid"].as_u64(), Some(pid), "{v}");
    client.until(client.answered() + 20);
    client.finish()
}

fn http_manifest(name: &str, sockets: bool) -> String {
    format!(
        "name: {name}\ncommand: [python3, server.py]\nrestart: {{policy: always, backoff: {{initial: 200ms, max: 1s}}}}\nreadiness: {{tcp: {{}}, timeout: 30s}}\n{}",
        if sockets {
            "sockets: [{name: http, listen: \"tcp:$PORT\"}]\n"
        } else {
            ""
        }
    )
}

#[test]
fn a_kill_9_and_restart_refuse_no_connection_with_sockets() {
    if python3().is_none() {
        return;
    }
    let d = Daemon::start(&[]);
    workload(
        &d,
        "web",
        &http_manifest("web", true),
        &[("server.py", SERVER)],
    );
    let v = d.json(&["launch", "web", "-o", "json"]);
    let port = v["port"].as_u64().unwrap() as u16;
    let t = kill_and_count(&d, "ns:default:web", port);
    eprintln!("with sockets: {t:?}");
    assert_eq!(t.refused, 0, "connections were refused: {t:?}");
    // At most the one request the killed program had accepted is cut.
    assert!(t.broken <= 1, "{t:?}");
    // The restart kept the address: the same port, the same socket.
    let v = d.json(&["get", "ns:default:web", "-o", "json"]);
    assert_eq!(v["port"].as_u64(), Some(port as u64), "{v}");
}

/// The control: the same server binding its own socket sees refusals in the same window,
/// so the test above can fail.
#[test]
fn without_sockets_a_kill_9_and_restart_refuse_connections() {
    if python3().is_none() {
        return;
    }
    let d = Daemon::start(&[]);
    workload(
        &d,
        "web",
        &http_manifest("web", false),
        &[("server.py", SERVER)],
    );
    let v = d.json(&["launch", "web", "-o", "json"]);
    let port = v["port"].as_u64().unwrap() as u16;
    let t = kill_and_count(&d, "ns:default:web", port);
    eprintln!("without sockets: {t:?}");
    assert!(t.refused > 0, "no refusal without socket activation: {t:?}");
}

fn check_handover(extra_args: &[&str], warm: bool) {
    let Some(py) = system_python3() else { return };
    let d = Daemon::start_with_args(&[], extra_args);
    let m = format!(
        "name: chk\ncommand: [{py}, -c, {CHECKER:?}]\nrestart: {{policy: always}}\nsockets:\n  - {{name: http, listen: \"tcp:$PORT\"}}\n  - {{name: admin, listen: \"unix:admin.sock\"}}\n{}",
        if warm { "warm: {size: 1}\n" } else { "" }
    );
    workload(&d, "chk", &m, &[]);
    if warm {
        crate::warm::wait_ready_slots(&d, "chk", 1);
    }
    let v = d.json(&["launch", "chk", "-o", "json"]);
    let port = v["port"].as_u64().unwrap();
    let id = "ns:default:chk";
    assert_eq!(crate::warm::from_slot(&d, id), warm, "{}", d.daemon_log());
    for run in 1..=2u64 {
        let v = wait_get(&d, id, "running", |v| {
            v["restarts"].as_u64() == Some(run - 1) && v["pid"].as_u64().is_some()
        });
        let pid = v["pid"].as_u64().unwrap();
        let report: Value = {
            let start = Instant::now();
            loop {
                let logs = d.logs_text(id);
                if let Some(line) = logs
                    .lines()
                    .filter(|l| l.contains("\"listen_pid\""))
                    .nth(run as usize - 1)
                {
                    let json = &line[line.find('{').unwrap()..];
                    break serde_json::from_str(json).unwrap();
                }
                assert!(start.elapsed() < DEADLINE, "no report: {logs}");
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        // LISTEN_PID is the program's own pid, which is the instance's pid.
        assert_eq!(report["listen_pid"], pid.to_string(), "{report}");
        assert_eq!(report["pid"], pid, "{report}");
        assert_eq!(report["listen_fds"], "2", "{report}");
        assert_eq!(report["names"], "http:admin", "{report}");
        let socks = report["sockets"].as_array().unwrap();
        assert_eq!(
            socks[0]["addr"],
            serde_json::json!(["127.0.0.1", port]),
            "{report}"
        );
        assert_eq!(socks[0]["listening"], true);
        let admin = PathBuf::from(socks[1]["addr"].as_str().unwrap());
        assert!(
            admin.starts_with(d.state.join("sockets")) && admin.ends_with("admin.sock"),
            "{report}"
        );
        assert_eq!(socks[1]["listening"], true);
        // 0-2 and the two sockets: nothing else reaches the workload.
        assert_eq!(fds_of(pid), vec![0, 1, 2, 3, 4], "run {run}");
        // The Unix socket works (mode 0600, the daemon's own user here).
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&admin).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let mut c = std::os::unix::net::UnixStream::connect(&admin).unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).unwrap();
        assert_eq!(got, "admin");
        if run == 1 {
            // SAFETY: kill(2) of the instance's pid.
            assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
        }
    }
    // Terminated: the sockets close and the Unix socket's file goes.
    let admin = d.state.join("sockets").join("ns_default_chk");
    d.json(&["terminate", id, "-o", "json"]);
    let leftover: Vec<_> = std::fs::read_dir(d.state.join("sockets"))
        .map(|r| {
            r.flatten()
                .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten().flatten())
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    assert!(leftover.is_empty(), "{leftover:?} ({})", admin.display());
    assert_eq!(
        TcpStream::connect(("127.0.0.1", port as u16))
            .map_err(|e| e.kind())
            .err(),
        Some(std::io::ErrorKind::ConnectionRefused)
    );
}

#[test]
fn sockets_reach_the_program_with_listen_pid_and_names_through_the_keeper() {
    check_handover(&[], false);
}

#[test]
fn sockets_reach_the_program_with_listen_pid_and_names_without_keeper() {
    check_handover(&["--no-keeper"], false);
}

/// The first run from the keeper's warm slot (the daemon writes the sockets to it), the
/// restart cold or from the refilled slot: the same sockets, names and pid either way.
#[test]
fn sockets_reach_the_program_with_listen_pid_and_names_from_a_warm_process_slot() {
    check_handover(&[], true);
}

#[test]
fn a_workload_without_sockets_gets_no_extra_descriptor() {
    let d = Daemon::start(&[(
        "plain",
        "name: plain\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n",
    )]);
    let v = d.json(&["launch", "plain", "-o", "json"]);
    let pid = v["pid"].as_u64().unwrap();
    // Once `sleep` runs and has settled: while it starts it opens files of its own (the
    // locale archive), which an inherited descriptor is not.
    let fds: Vec<i32> = crate::fds::fds_of_sleep(pid as u32)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(fds, vec![0, 1, 2]);
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        !String::from_utf8_lossy(&env).contains("LISTEN_"),
        "LISTEN_* set without sockets"
    );
}

/// A free TCP port on loopback (for a fixed address).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn python_http_server_is_launched_by_its_first_connection_and_stopped_when_idle() {
    let Some(py) = python3() else { return };
    let port = free_port();
    let d = Daemon::start(&[]);
    let m = format!(
        "name: files\nisolation: none\ncommand: [{py}, -c, {STDLIB_HTTP:?}]\nsockets: [{{name: http, listen: \"tcp:127.0.0.1:{port}\"}}]\nactivation: {{mode: on-connection, idle_stop: 1s}}\n"
    );
    workload(&d, "files", &m, &[("hello.txt", "hi")]);
    // Nothing runs before a connection.
    let list = d.json(&["list", "-o", "json"]);
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
    // The first connection launches it, and it answers that very connection.
    let body = request(port).expect("the first connection is answered");
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    assert!(body.contains("hello.txt"), "{body}");
    let v = wait_get(&d, "shared:files", "running", |v| {
        v["pid"].as_u64().is_some()
    });
    assert_eq!(v["restarts"], 0, "{v}");
    // No connection for idle_stop: stopped.
    wait_get(&d, "shared:files", "terminated", |v| {
        v["state"] == "terminated"
    });
    assert!(
        d.daemon_log().contains("no connection for"),
        "{}",
        d.daemon_log()
    );
    // The socket is still the daemon's: the next connection launches it again.
    let body = request(port).expect("a connection after the idle stop is answered");
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    let launched = d
        .events()
        .into_iter()
        .filter(|e| e["instance"] == "shared:files" && e["kind"] == "launched")
        .count();
    assert_eq!(launched, 2);
}

#[test]
fn our_server_on_a_unix_socket_is_launched_by_its_first_connection() {
    let Some(py) = python3() else { return };
    let d = Daemon::start(&[]);
    let path = d.dir.path().join("run").join("api.sock");
    let m = format!(
        "name: uds\nisolation: none\ncommand: [{py}, server.py]\nsockets: [{{name: api, listen: \"unix:{}\", mode: \"0660\"}}]\nactivation: {{mode: on-connection}}\n",
        path.display()
    );
    workload(&d, "uds", &m, &[("server.py", SERVER)]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o660
    );
    assert!(d.cli(&["get", "shared:uds"]).status.code() != Some(0));
    let mut c = std::os::unix::net::UnixStream::connect(&path).unwrap();
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    c.read_to_string(&mut body).unwrap();
    assert!(body.ends_with("ok"), "{body}");
    let v = wait_get(&d, "shared:uds", "running", |v| v["pid"].as_u64().is_some());
    assert_eq!(v["restarts"], 0, "{v}");
}

#[test]
fn sandboxed_program_gets_its_sockets_and_its_own_pid() {
    let Some(py) = system_python3() else { return };
    let d = Daemon::start(&[]);
    if !crate::sandbox::sandbox_available(&d) {
        return;
    }
    let m = format!(
        "name: boxed\ndriver: sandbox\ncommand: [{py}, -c, {CHECKER:?}]\nsockets:\n  - {{name: http, listen: \"tcp:$PORT\"}}\n  - {{name: admin, listen: \"unix:admin.sock\"}}\nsandbox: {{network: none}}\n"
    );
    workload(&d, "boxed", &m, &[]);
    let v = d.json(&["launch", "boxed", "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let start = Instant::now();
    let report: Value = loop {
        let logs = d.logs_text(&id);
        if let Some(line) = logs.lines().find(|l| l.contains("\"listen_pid\"")) {
            break serde_json::from_str(&line[line.find('{').unwrap()..]).unwrap();
        }
        assert!(start.elapsed() < DEADLINE, "no report: {logs}");
        std::thread::sleep(Duration::from_millis(20));
    };
    // The pid the program sees in its PID namespace.
    assert_eq!(report["listen_pid"], report["pid"].to_string(), "{report}");
    assert_eq!(report["names"], "http:admin", "{report}");
    assert_eq!(report["sockets"][0]["listening"], true, "{report}");
    // Served from inside its own network namespace, through the host's socket.
    let admin = PathBuf::from(report["sockets"][1]["addr"].as_str().unwrap());
    let mut c = std::os::unix::net::UnixStream::connect(&admin).unwrap();
    let mut got = String::new();
    c.read_to_string(&mut got).unwrap();
    assert_eq!(got, "admin");
}

/// The control of the idle stop: a connection held open (accepted, no request yet) is a
/// connection, so the instance is not stopped while it lasts, and is once it closes.
#[test]
fn an_open_connection_keeps_an_on_connection_instance_running() {
    let Some(py) = python3() else { return };
    let port = free_port();
    let d = Daemon::start(&[]);
    let m = format!(
        "name: held\nisolation: none\ncommand: [{py}, -c, {STDLIB_HTTP:?}]\nsockets: [{{name: http, listen: \"tcp:127.0.0.1:{port}\"}}]\nactivation: {{mode: on-connection, idle_stop: 400ms}}\n"
    );
    workload(&d, "held", &m, &[]);
    let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let v = wait_get(&d, "shared:held", "running", |v| {
        v["pid"].as_u64().is_some()
    });
    let pid = v["pid"].as_u64().unwrap();
    // Many idle periods (checks every 100 ms) with the connection open.
    std::thread::sleep(Duration::from_millis(2000));
    let v = d.json(&["get", "shared:held", "-o", "json"]);
    assert_ne!(
        v["state"], "terminated",
        "stopped while a connection was open: {v}"
    );
    assert_eq!(v["pid"].as_u64(), Some(pid), "{v}");
    drop(c);
    wait_get(&d, "shared:held", "terminated", |v| {
        v["state"] == "terminated"
    });
}

/// A program that cannot be executed fails the launch with the reason, with sockets too
/// (the child execs by itself to set LISTEN_PID and reports a failed exec on its own
/// pipe), through the keeper and without it.
#[test]
fn a_missing_program_with_sockets_fails_the_launch_with_its_reason() {
    for args in [&[][..], &["--no-keeper"][..]] {
        let d = Daemon::start_with_args(&[], args);
        workload(
            &d,
            "gone",
            "name: gone\ncommand: [/nonexistent/server]\nsockets: [{name: http, listen: \"tcp:$PORT\"}]\n",
            &[],
        );
        let out = d.cli(&["launch", "gone", "-o", "json"]);
        assert!(!out.status.success(), "{args:?}");
        let err = stderr(&out);
        assert!(
            err.contains("/nonexistent/server") && err.contains("No such file"),
            "{args:?}: {err}"
        );
    }
}

/// The keeper keeps an instance's sockets too: with the daemon killed and the program
/// killed while no daemon runs, a connection waits in the backlog, and the run the
/// restarted daemon starts (restart policy, after adopting the exit) answers it on the
/// same port.
#[test]
fn sockets_survive_a_daemon_crash_with_the_keeper() {
    if python3().is_none() {
        return;
    }
    let mut d = Daemon::start(&[]);
    workload(
        &d,
        "web",
        &http_manifest("web", true),
        &[("server.py", SERVER)],
    );
    // From the keeper's spare (the default path), which gets the sockets with the
    // program and the keeper copies of them with its `Assign`.
    let took = crate::spare::spare_ready(&d);
    let v = d.json(&["launch", "web", "-o", "json"]);
    let h = d.json(&["health", "-o", "json"]);
    assert_eq!(
        h["process_spare"]["launches"].as_u64(),
        Some(took + 1),
        "{h}"
    );
    let port = v["port"].as_u64().unwrap() as u16;
    let pid = v["pid"].as_u64().unwrap();
    assert!(request(port).is_ok());
    d.kill9();
    // SAFETY: kill(2) of the instance's pid (its keeper is its parent and reaps it).
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    assert!(wait_gone(pid as u32));
    // Nothing serves now; the connection is accepted by the kernel and waits.
    let waiting = std::thread::spawn(move || request(port));
    std::thread::sleep(Duration::from_millis(200));
    d.spawn();
    let body = waiting
        .join()
        .unwrap()
        .expect("the waiting connection is answered");
    assert!(body.ends_with("ok"), "{body}");
    let v = wait_get(&d, "ns:default:web", "restarted", |v| {
        v["restarts"].as_u64() >= Some(1) && v["state"] == "ready"
    });
    assert_eq!(v["port"].as_u64(), Some(port as u64), "{v}");
}

/// A rollout onto a changed manifest under a client loop: stop then start, with the
/// key's socket held by bulkhead throughout, so no connection is refused; the control
/// (the program binds `$PORT` itself) sees refusals in the same swap.
fn rollout_under_load(sockets: bool) -> Tally {
    let d = Daemon::start(&[]);
    let manifest = |v: &str| {
        format!(
            "{}env: {{VERSION: \"{v}\"}}\n",
            http_manifest("web", sockets)
        )
    };
    workload(&d, "web", &manifest("1"), &[("server.py", SERVER)]);
    let v = d.json(&["launch", "web", "-o", "json"]);
    let port = v["port"].as_u64().unwrap() as u16;
    let client = ClientLoop::start(port);
    client.until(20);
    workload(&d, "web", &manifest("2"), &[("server.py", SERVER)]);
    let out = d.json(&["rollout", "web", "-o", "json"]);
    assert_eq!(out["steps"][0]["outcome"], "moved", "{out}");
    client.until(client.answered() + 20);
    let t = client.finish();
    let o = d.cli(&[
        "exec",
        "ns:default:web",
        "--",
        "/bin/sh",
        "-c",
        "echo $VERSION",
    ]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "2");
    let v = d.json(&["get", "ns:default:web", "-o", "json"]);
    assert_eq!(
        v["port"].as_u64(),
        Some(port as u64),
        "the address is kept: {v}"
    );
    t
}

#[test]
fn a_rollout_with_sockets_refuses_no_connection() {
    if python3().is_none() {
        return;
    }
    let t = rollout_under_load(true);
    eprintln!("rollout with sockets: {t:?}");
    assert_eq!(t.refused, 0, "connections were refused: {t:?}");
}

#[test]
fn without_sockets_a_rollout_refuses_connections() {
    if python3().is_none() {
        return;
    }
    let t = rollout_under_load(false);
    eprintln!("rollout without sockets: {t:?}");
    assert!(t.refused > 0, "no refusal without sockets: {t:?}");
}

/// Answers each connection on descriptor 3 with `ns=<its namespace> pid=<its pid>`, after
/// reading the request (a connection that sends nothing stays open).
const NS_SERVER: &str = r#"
import os, socket
s = socket.socket(fileno=3)
while True:
    c, _ = s.accept()
    try:
        c.recv(4096)
        c.sendall(("ns=%s pid=%d" % (os.environ["BULKHEAD_NAMESPACE"], os.getpid())).encode())
    except OSError:
        pass
    c.close()
"#;

/// One request on a Unix socket: the whole answer.
fn ask_unix(path: &std::path::Path) -> String {
    let mut c = std::os::unix::net::UnixStream::connect(path)
        .unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    c.write_all(b"hello\n").unwrap();
    let mut body = String::new();
    c.read_to_string(&mut body).unwrap();
    body
}

fn launched(d: &Daemon, id: &str) -> usize {
    d.events()
        .into_iter()
        .filter(|e| e["instance"] == id && e["kind"] == "launched")
        .count()
}

/// On-connection activation with isolation `namespace`: each listed namespace has its
/// own socket (`${NAMESPACE}` in the path; a relative one lives in each instance's own
/// directory); a connection to acme's launches only acme's instance (the key `launch
/// --namespace acme` gives) and is answered by it, globex's stays down until its own
/// connection; `idle_stop` applies to each instance alone.
#[test]
fn on_connection_per_namespace_launches_only_that_namespaces_instance() {
    let Some(py) = python3() else { return };
    let d = Daemon::start(&[]);
    let run = d.dir.path().join("run");
    let m = format!(
        "name: tenant\nisolation: namespace\ncommand: [{py}, -c, {NS_SERVER:?}]\n\
         sockets:\n  - {{name: api, listen: \"unix:{}/${{NAMESPACE}}.sock\"}}\n  - {{name: rel, listen: \"unix:rel.sock\"}}\n\
         activation: {{mode: on-connection, namespaces: [acme, globex], idle_stop: 1s}}\n",
        run.display()
    );
    workload(&d, "tenant", &m, &[]);
    let (acme, globex) = (run.join("acme.sock"), run.join("globex.sock"));
    assert!(
        acme.exists() && globex.exists(),
        "sockets not bound:\n{}",
        d.daemon_log()
    );
    for id in ["ns:acme:tenant", "ns:globex:tenant"] {
        let rel = d.state.join("sockets").join(id).join("rel.sock");
        assert!(rel.exists(), "{} not bound", rel.display());
    }
    let list = d.json(&["list", "-o", "json"]);
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");

    // acme's connection: acme's instance only, and it answers.
    let body = ask_unix(&acme);
    assert!(body.starts_with("ns=acme "), "{body}");
    let a = wait_get(&d, "ns:acme:tenant", "running", |v| {
        v["pid"].as_u64().is_some()
    });
    assert!(body.ends_with(&format!("pid={}", a["pid"])), "{body} {a}");
    assert_eq!(launched(&d, "ns:globex:tenant"), 0);
    assert!(d.cli(&["get", "ns:globex:tenant"]).status.code() != Some(0));

    // globex's own connection launches globex's, a separate instance.
    let body = ask_unix(&globex);
    assert!(body.starts_with("ns=globex "), "{body}");
    let g = wait_get(&d, "ns:globex:tenant", "running", |v| {
        v["pid"].as_u64().is_some()
    });
    assert_ne!(g["pid"], a["pid"]);
    assert_eq!(launched(&d, "ns:acme:tenant"), 1);

    // idle_stop per instance: a connection held open on globex's socket keeps globex's
    // running while acme's, idle, is stopped.
    let held = std::os::unix::net::UnixStream::connect(&globex).unwrap();
    wait_get(&d, "ns:acme:tenant", "stopped when idle", |v| {
        v["state"] == "terminated"
    });
    let v = d.json(&["get", "ns:globex:tenant", "-o", "json"]);
    assert_eq!(v["pid"], g["pid"], "globex's stopped with acme's: {v}");
    assert_ne!(v["state"], "terminated", "{v}");
    drop(held);
    wait_get(&d, "ns:globex:tenant", "stopped when idle", |v| {
        v["state"] == "terminated"
    });
    // The sockets stay the daemon's: the next connection launches acme's again.
    assert!(ask_unix(&acme).starts_with("ns=acme "));
    assert_eq!(launched(&d, "ns:acme:tenant"), 2);
}

/// A manifest asking for on-connection per namespace with an address that cannot differ
/// per namespace (a TCP port) is refused, naming the file and the field.
#[test]
fn on_connection_per_namespace_refuses_a_tcp_socket_naming_the_field() {
    let d = Daemon::start(&[]);
    write_workload(
        &d.workloads,
        "tcpns",
        "name: tcpns\nisolation: namespace\ncommand: [sleep, '100']\nsockets: [{name: http, listen: 'tcp:127.0.0.1:18080'}]\nactivation: {mode: on-connection, namespaces: [acme]}\n",
        &[],
    );
    assert!(d.cli(&["reload"]).status.success());
    let out = d.cli(&["launch", "tcpns", "--namespace", "acme"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("manifest.yaml")
            && err.contains("sockets[0].listen")
            && err.contains("tcp: port cannot differ per namespace"),
        "{err}"
    );
}
