//! Warm pools through the real daemon and the real drivers: slots are made, a new key
//! launches in one (the daemon says so in its log), the instance is the same as a cold
//! one (its wall, its output, its teardown), the pool refills, a manifest change replaces
//! the slots, and `kill -9` of the daemon leaks no slot (process, cgroup, container).

use std::time::{Duration, Instant};

use crate::harness::*;

/// Waits until `health` shows `ready` slots in `workload`'s pool.
pub(crate) fn wait_ready_slots(d: &Daemon, workload: &str, ready: u64) {
    let start = Instant::now();
    loop {
        let h = d.json(&["health", "-o", "json"]);
        let n = h["warm"]
            .as_array()
            .and_then(|a| a.iter().find(|w| w["workload"] == workload))
            .and_then(|w| w["ready"].as_u64());
        if n == Some(ready) {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE * 2,
            "the pool of {workload} never had {ready} ready slots: {h}\n{}",
            d.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the daemon's log says `id` was launched from a warm slot.
pub(crate) fn from_slot(d: &Daemon, id: &str) -> bool {
    d.daemon_log()
        .lines()
        .any(|l| l.contains(&format!("{id}: launched from warm slot")))
}

/// Cgroup directories of warm slots under the daemon's sandbox scope.
fn slot_cgroups(scope: &str) -> Vec<std::path::PathBuf> {
    instance_cgroups(scope)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("warm-"))
        .collect()
}

fn notify_python(py: &str) -> String {
    format!(
        "[{py}, -c, 'import os,socket,time; s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.sendto(b\"READY=1\", os.environ[\"NOTIFY_SOCKET\"]); print(\"up\", flush=True); time.sleep(1000)']"
    )
}

#[test]
fn a_new_session_launches_in_a_warm_sandbox_slot_behind_the_same_wall() {
    let Some(py) = system_python3() else { return };
    let m = format!(
        "name: wp\ndriver: sandbox\nisolation: session\ncommand: {}\nreadiness: {{notify: true, timeout: 30s}}\nresources: {{memory: 128Mi, pids: 64}}\nwarm: {{size: 2}}\n",
        notify_python(py)
    );
    let cold = m
        .replace("name: wp", "name: cold")
        .replace("warm: {size: 2}\n", "");
    let mut d = Daemon::start(&[("wp", &m), ("cold", &cold)]);
    if !crate::sandbox::sandbox_available(&d) {
        return;
    }
    wait_ready_slots(&d, "wp", 2);
    let v = d.json(&["launch", "wp", "--session", "s1", "-o", "json"]);
    assert_eq!(v["state"], "ready", "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert!(from_slot(&d, &id), "not from a slot:\n{}", d.daemon_log());
    let c = d.json(&["launch", "cold", "--session", "s2", "-o", "json"]);
    assert_eq!(c["state"], "ready", "{c}");
    let cold_id = c["id"].as_str().unwrap().to_owned();
    assert!(!from_slot(&d, &cold_id));
    // The same wall as a cold instance: PID 1 is our init, the root is not the host's,
    // the ids are a range of the tenant's own (not the host's), the limits hold.
    let inside = |id: &str| {
        let o = d.cli(&[
            "exec",
            id,
            "--",
            "/bin/sh",
            "-c",
            "cat /proc/1/comm; head -1 /proc/self/uid_map; test -e /work && echo host-root; cat /proc/self/cgroup >/dev/null; echo end",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let (w, k) = (inside(&id), inside(&cold_id));
    let shape = |s: &str| {
        let l: Vec<&str> = s.lines().collect();
        let map: Vec<&str> = l[1].split_whitespace().collect();
        (
            l[0].to_owned(),
            map[0].to_owned(),
            map[2].to_owned(),
            l.len(),
        )
    };
    assert_eq!(shape(&w), shape(&k), "warm:\n{w}\ncold:\n{k}");
    let host_id = |s: &str| {
        s.lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    assert!(host_id(&w) >= 1 << 30, "{w}");
    assert_ne!(host_id(&w), host_id(&k), "two tenants, two ranges");
    let g = d.json(&["get", &id, "-o", "json"]);
    assert_eq!(g["usage"]["memory_limit_bytes"], 128 << 20, "{g}");
    assert_eq!(g["usage"]["pids_limit"], 64, "{g}");
    // Its output reaches its log as a cold instance's does.
    let start = Instant::now();
    while !d.logs_text(&id).contains("up") {
        assert!(start.elapsed() < DEADLINE, "no output in the log");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The pool refills.
    wait_ready_slots(&d, "wp", 2);

    // kill -9: the slots' processes go with the daemon, and the next daemon removes
    // their cgroups; only its own new slots remain.
    let scope = cgroup_scope(&d.state);
    let before: Vec<_> = slot_cgroups(&scope);
    assert!(!before.is_empty(), "slot cgroups under {scope}");
    d.kill9();
    d.spawn();
    wait_ready_slots(&d, "wp", 2);
    let after = slot_cgroups(&scope);
    let stale: Vec<_> = after.iter().filter(|p| before.contains(p)).collect();
    assert!(
        stale.is_empty(),
        "slot cgroups of the killed daemon left: {stale:?}"
    );

    // A changed manifest replaces the slots.
    write_workload(&d.workloads, "wp", &m.replace("size: 2", "size: 1"), &[]);
    assert!(d.cli(&["reload"]).status.success());
    let start = Instant::now();
    loop {
        let now = slot_cgroups(&scope);
        if !now.iter().any(|p| after.contains(p)) && !now.is_empty() {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "old slots left: {now:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_ready_slots(&d, "wp", 1);
    // Shutdown removes every slot.
    assert!(d.sigterm().success());
    let start = Instant::now();
    while !slot_cgroups(&scope).is_empty() {
        assert!(
            start.elapsed() < DEADLINE,
            "slots left after shutdown: {:?}",
            slot_cgroups(&scope)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A tenant's workloads share its id range, so a pool's slots are made in sets across
/// pools once the pool has seen a tenant's second workload spawn cold: from then on a
/// namespace's first launch from a slot makes the set its own, and its second workload
/// launches from a slot too, in the same range.
#[test]
fn a_namespaces_second_workload_launches_in_a_warm_slot_in_its_range() {
    let Some(py) = system_python3() else { return };
    let m = |name: &str| {
        format!(
            "name: {name}\ndriver: sandbox\nisolation: namespace\ncommand: {}\nreadiness: {{notify: true, timeout: 30s}}\nwarm: {{size: 1}}\n",
            notify_python(py)
        )
    };
    let (a, b) = (m("wa"), m("wb"));
    let d = Daemon::start(&[("wa", &a), ("wb", &b)]);
    if !crate::sandbox::sandbox_available(&d) {
        return;
    }
    let launch = |w: &str, ns: &str| {
        let v = d.json(&["launch", w, "--namespace", ns, "-o", "json"]);
        assert_eq!(v["state"], "ready", "{v}");
        let id = v["id"].as_str().unwrap().to_owned();
        let o = d.cli(&[
            "exec",
            &id,
            "--",
            "/bin/sh",
            "-c",
            "head -1 /proc/self/uid_map",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let host = String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .nth(1)
            .map(str::to_owned);
        (from_slot(&d, &id), host)
    };
    wait_ready_slots(&d, "wa", 1);
    wait_ready_slots(&d, "wb", 1);
    let (warm, first) = launch("wa", "t1");
    assert!(warm, "{}", d.daemon_log());
    let (warm, second) = launch("wb", "t1");
    assert!(
        !warm,
        "wb's slot has a range of its own until its pool joins sets"
    );
    assert_eq!(first, second, "one tenant, one range");
    assert!(d
        .daemon_log()
        .contains("warm pool of wb: ns:t1:wb spawns cold"));
    // Once wb's slot has joined the set of wa's new one, a new namespace's two
    // workloads both launch from slots, in one range.
    let start = Instant::now();
    for n in 2.. {
        wait_ready_slots(&d, "wa", 1);
        wait_ready_slots(&d, "wb", 1);
        let ns = format!("t{n}");
        let (warm_a, ra) = launch("wa", &ns);
        let (warm_b, rb) = launch("wb", &ns);
        assert_eq!(ra, rb, "one tenant, one range");
        assert!(warm_a);
        if warm_b {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "wb never launched from a slot:\n{}",
            d.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The listening socket's server: answers every connection with its socket's name and
/// its pid, having checked that `LISTEN_PID` is its own.
const SOCKET_SERVER: &str = r#"
import os, socket
assert os.environ["LISTEN_PID"] == str(os.getpid()), "LISTEN_PID is not this process"
s = socket.socket(fileno=3)
while True:
    c, _ = s.accept()
    c.sendall(("hello %s %d" % (os.environ["LISTEN_FDNAMES"], os.getpid())).encode())
    c.close()
"#;

/// Socket activation from a warm pool: the first connection to an on-connection sandbox
/// launches it in a slot, which gets the listening socket with the hand-over (at 3, with
/// `LISTEN_PID` its own pid, PID 2 under our init) and serves the connection that
/// launched it.
/// The pids in the cgroups of warm slots under `scope`, but `instance`'s.
fn slot_pids(scope: &str, instance: u32) -> Vec<u32> {
    slot_cgroups(scope)
        .iter()
        .flat_map(|d| {
            std::fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.parse().ok())
                .collect::<Vec<u32>>()
        })
        .filter(|p| *p != instance)
        .collect()
}

#[test]
fn a_new_key_launches_in_a_warm_process_slot_as_a_cold_one_and_a_killed_daemon_leaks_none() {
    let Some(py) = system_python3() else { return };
    if !crate::basics::is_root() {
        eprintln!("skipped: switching users needs a daemon running as root");
        return;
    }
    // As nobody, in `/`: the slot took the user, the folder and its own process group
    // before it waited; the notify socket is an abstract one, as for a cold spawn.
    let m = format!(
        "name: wp\nisolation: session\nuser: nobody\nworking_dir: /\ncommand: [{py}, -c, 'import os,socket,time; n=os.environ[\"NOTIFY_SOCKET\"]; n=\"\\0\"+n[1:] if n[0]==\"@\" else n; s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.sendto(b\"READY=1\", n); print(\"up\", os.getuid(), os.getcwd(), os.getpgid(0)==os.getpid(), os.environ[\"PORT\"]!=\"\", os.environ[\"GREETING\"], flush=True); time.sleep(1000)']\nenv: {{GREETING: hi}}\nreadiness: {{notify: true, timeout: 30s}}\nwarm: {{size: 2}}\n"
    );
    let cold = m
        .replace("name: wp", "name: cold")
        .replace("warm: {size: 2}\n", "");
    let mut d = Daemon::start(&[("wp", &m), ("cold", &cold)]);
    wait_ready_slots(&d, "wp", 2);
    let v = d.json(&["launch", "wp", "--session", "s1", "-o", "json"]);
    assert_eq!(v["state"], "ready", "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert!(from_slot(&d, &id), "not from a slot:\n{}", d.daemon_log());
    let c = d.json(&["launch", "cold", "--session", "s2", "-o", "json"]);
    assert_eq!(c["state"], "ready", "{c}");
    let cold_id = c["id"].as_str().unwrap().to_owned();
    assert!(!from_slot(&d, &cold_id));
    // The same process as a cold one: its user, folder, group, environment, output.
    let said = |id: &str| {
        let start = Instant::now();
        loop {
            let log = d.logs_text(id);
            if let Some(at) = log
                .lines()
                .find_map(|l| l.find("up ").map(|i| l[i + 3..].to_owned()))
            {
                return at;
            }
            assert!(start.elapsed() < DEADLINE, "no output from {id}: {log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert_eq!(said(&id), "65534 / True True hi");
    assert_eq!(said(&id), said(&cold_id));
    // In a cgroup of the process driver's scope, as a cold one.
    let scope = format!("p{}", &cgroup_scope(&d.state)[1..]);
    let pid = v["pid"].as_u64().unwrap() as u32;
    let cg = |pid: u64| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cg(u64::from(pid)).contains(&scope),
        "{}",
        cg(u64::from(pid))
    );
    assert!(cg(c["pid"].as_u64().unwrap()).contains(&scope));
    wait_ready_slots(&d, "wp", 2);
    let slots = slot_pids(&scope, pid);
    assert_eq!(slots.len(), 2, "two waiting slots: {slots:?}");

    // kill -9: the instance from the slot is adopted (the keeper holds it), the slots
    // of the killed daemon end (their socket's other end closed), new ones are made.
    d.kill9();
    d.spawn();
    let start = Instant::now();
    loop {
        let g = d.json(&["get", &id, "-o", "json"]);
        if g["state"] == "ready" {
            assert_eq!(g["pid"].as_u64(), Some(u64::from(pid)), "{g}");
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{id} not adopted: {g}\n{}",
            d.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_ready_slots(&d, "wp", 2);
    let start = Instant::now();
    while slots.iter().any(|p| alive(*p)) {
        assert!(
            start.elapsed() < DEADLINE,
            "slots of the killed daemon left: {slots:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A clean stop leaves no cgroup of an instance or a slot.
    assert!(d.cli(&["terminate", &id]).status.success());
    assert!(d.sigterm().success());
    let left = instance_cgroups(&scope);
    assert!(left.is_empty(), "cgroups left: {left:?}");
}

#[test]
fn an_on_connection_sandbox_launches_in_a_warm_slot_with_its_socket() {
    use std::io::Read;
    let Some(py) = system_python3() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("web.sock");
    let m = format!(
        "name: web\ndriver: sandbox\nisolation: none\ncommand: [{py}, -c, {SOCKET_SERVER:?}]\nsockets: [{{name: web, listen: \"unix:{}\"}}]\nactivation: {{mode: on-connection}}\nwarm: {{size: 1}}\n",
        sock.display()
    );
    let d = Daemon::start(&[("web", &m)]);
    if !crate::sandbox::sandbox_available(&d) {
        return;
    }
    wait_ready_slots(&d, "web", 1);
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut got = String::new();
    c.read_to_string(&mut got).unwrap();
    assert_eq!(got, "hello web 2", "{}", d.daemon_log());
    assert!(
        from_slot(&d, "shared:web"),
        "not from a slot:\n{}",
        d.daemon_log()
    );
}

#[test]
fn a_new_key_launches_in_a_warm_container_and_a_killed_daemon_leaks_none() {
    if let Some(why) = crate::docker::skip() {
        eprintln!("skipped: {why}");
        return;
    }
    let m = format!(
        "name: wd\ndriver: docker\nisolation: session\ncommand: [/bin/sh, -c, 'echo up-$GREETING; exec sleep 1000']\nenv: {{GREETING: hi}}\nwarm: {{size: 2}}\ndocker:\n  image: {}\n",
        crate::docker::IMAGE
    );
    let mut d = Daemon::start(&[("wd", &m)]);
    wait_ready_slots(&d, "wd", 2);
    let daemon_id = std::fs::read_to_string(d.state.join("daemon-id")).unwrap();
    let mine = format!("bulkhead.daemon={}", daemon_id.trim());
    assert_eq!(
        crate::docker::containers(&mine).len(),
        2,
        "two slot containers"
    );
    let v = d.json(&["launch", "wd", "--session", "s1", "-o", "json"]);
    assert_eq!(v["state"], "ready", "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert!(from_slot(&d, &id), "not from a slot:\n{}", d.daemon_log());
    // The program got its command and environment.
    let start = Instant::now();
    while !d.logs_text(&id).contains("up-hi") {
        assert!(
            start.elapsed() < DEADLINE,
            "no output: {}",
            d.logs_text(&id)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = v["pid"].as_u64().unwrap_or(0);
    wait_ready_slots(&d, "wd", 2);
    assert_eq!(crate::docker::containers(&mine).len(), 3);

    // kill -9, then a new daemon: the claimed container is its instance again, the
    // unclaimed slots are removed, and new ones are made.
    d.kill9();
    d.spawn();
    let start = Instant::now();
    loop {
        let g = d.json(&["get", &id, "-o", "json"]);
        if g["state"] == "ready" || g["state"] == "running" {
            if pid != 0 {
                assert_eq!(g["pid"].as_u64(), Some(pid), "{g}");
            }
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{id} not adopted: {g}\n{}",
            d.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_ready_slots(&d, "wd", 2);
    assert_eq!(
        crate::docker::containers(&mine).len(),
        3,
        "the instance and two new slots, nothing of the killed daemon's pool"
    );
    // Terminate and shutdown leave no container.
    assert!(d.cli(&["terminate", &id]).status.success());
    assert!(d.sigterm().success());
    let start = Instant::now();
    while !crate::docker::containers(&mine).is_empty() {
        assert!(
            start.elapsed() < DEADLINE,
            "containers left: {:?}",
            crate::docker::containers(&mine)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
