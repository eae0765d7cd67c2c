//! The sandbox driver through the real daemon: health, a notify workload behind the walls,
//! usage in get, exec into the namespaces, an OOM kill reported as `oom_killed`, and no
//! cgroup left after teardown. Skipped (with the reason) where the daemon reports the
//! sandbox unavailable.

use std::path::{Path, PathBuf};

use crate::harness::*;

/// The daemon's health says the sandbox works; otherwise prints why and returns false.
pub(crate) fn sandbox_available(d: &Daemon) -> bool {
    let h = d.json(&["health", "-o", "json"]);
    let sb = &h["sandbox"];
    if sb["available"] != true {
        eprintln!(
            "skipped: the sandbox driver is unavailable: {}",
            sb["error"]
        );
        return false;
    }
    assert!(
        h["drivers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d == "sandbox"),
        "{h}"
    );
    true
}

#[test]
fn a_notify_workload_runs_behind_the_walls() {
    let Some(py) = system_python3() else { return };
    let m = format!(
        "name: walled\ndriver: sandbox\ncommand: [{py}, -c, 'import os,socket,time; s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.sendto(b\"READY=1\", os.environ[\"NOTIFY_SOCKET\"]); time.sleep(1000)']\nreadiness: {{notify: true, timeout: 30s}}\nresources: {{memory: 128Mi, pids: 64}}\nsandbox: {{network: none}}\n"
    );
    let d = Daemon::start(&[("walled", &m)]);
    if !sandbox_available(&d) {
        return;
    }
    let h = d.json(&["health", "-o", "json"]);
    assert!(
        h["sandbox"]["cgroup_mode"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{h}"
    );
    // health says whether abstract sockets are scoped, as the kernel allows.
    let abi = bulkhead_driver::restrict::landlock_abi();
    assert_eq!(h["sandbox"]["landlock_abi"], abi, "{h}");
    assert_eq!(h["sandbox"]["abstract_sockets_scoped"], abi >= 6, "{h}");

    let v = d.json(&["launch", "walled", "-o", "json"]);
    assert_eq!(v["state"], "ready", "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let g = d.json(&["get", &id, "-o", "json"]);
    let usage = &g["usage"];
    assert_eq!(usage["memory_limit_bytes"], 128 << 20, "{g}");
    assert_eq!(usage["pids_limit"], 64, "{g}");
    assert!(usage["pids"].as_u64().unwrap() >= 2, "{g}");
    assert!(usage["memory_peak_bytes"].as_u64().is_some(), "{g}");
    assert!(!instance_cgroups(&cgroup_scope(&d.state)).is_empty());

    // exec enters the namespaces: the instance's hostname, its PID namespace, no network;
    // and returns the real exit code.
    let o = d.cli(&["exec", &id, "--", "cat", "/proc/sys/kernel/hostname"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        id,
        "{}",
        stderr(&o)
    );
    let o = d.cli(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "cat /proc/1/comm; tail -n +3 /proc/net/dev | wc -l",
    ]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out} {}", stderr(&o));
    assert_eq!(lines[1].trim(), "1", "only lo: {out}");
    let o = d.cli(&["exec", &id, "--", "sh", "-c", "exit 7"]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));

    let t = d.cli(&["terminate", &id]);
    assert!(t.status.success(), "{}", stderr(&t));
    d.wait_event("terminated", |e| {
        e["instance"] == id.as_str() && e["kind"] == "terminated"
    });
    assert_eq!(
        instance_cgroups(&cgroup_scope(&d.state)),
        Vec::<PathBuf>::new()
    );
}

/// An OOM kill is reported `oom_killed` with the limit, not a bare SIGKILL: of the main
/// process (tail keeps the newline-free /dev/zero in memory), and of a child while the
/// main process would live on; the whole instance then ends, as on cgroup v2
/// (`memory.oom.group`) and as systemd's default `OOMPolicy=stop` does, never a silently
/// shrunken instance.
#[test]
fn an_oom_kill_of_the_main_process_or_a_child_is_reported_oom_killed() {
    let m = |name: &str, command: &str| {
        format!(
            "name: {name}\ndriver: sandbox\ncommand: {command}\n\
             resources: {{memory: 32Mi}}\nrestart: {{policy: never}}\n"
        )
    };
    let hog = m("hog", "[tail, -n, '1', /dev/zero]");
    let kid = m(
        "kid",
        "[/bin/sh, -c, 'tail -n 1 /dev/zero & exec sleep 1000']",
    );
    let d = Daemon::start(&[("hog", &hog), ("kid", &kid)]);
    if !sandbox_available(&d) {
        return;
    }
    for name in ["hog", "kid"] {
        let _ = d.cli(&["launch", name, "-o", "json"]);
        let id = format!("ns:default:{name}");
        let e = d.wait_event("oom_killed", |e| {
            e["instance"] == id.as_str() && e["kind"] == "oom_killed"
        });
        assert!(
            e.to_string().contains(&(32u64 << 20).to_string()),
            "the limit is named: {e}"
        );
    }
    assert_eq!(
        instance_cgroups(&cgroup_scope(&d.state)),
        Vec::<PathBuf>::new(),
        "nothing of the instances is left"
    );
}

/// A daemon killed with SIGKILL takes its sandboxed instances with it (parent-death
/// signal); the next daemon removes the stale cgroups and reports the instance `lost`.
/// Regression: the kernel clears the parent-death signal on a uid switch, and a default
/// instance (user namespace) and a workload that is PID 1 with a `user` outlived the
/// daemon; each wall is covered.
#[test]
fn sandboxed_instances_die_with_the_daemon_and_are_reported_lost() {
    let cmd = "command: [/bin/sh, -c, 'exec sleep 1000']";
    let walls = [
        ("sl", "{}"),
        ("sl-noinit", "{init: false, user: {uid: 1000}}"),
        ("sl-host", "{user_namespace: host}"),
    ];
    let manifests: Vec<(String, String)> = walls
        .iter()
        .map(|(n, sb)| {
            (
                n.to_string(),
                format!("name: {n}\ndriver: sandbox\n{cmd}\nsandbox: {sb}\n"),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = manifests
        .iter()
        .map(|(n, m)| (n.as_str(), m.as_str()))
        .collect();
    let mut d = Daemon::start(&refs);
    if !sandbox_available(&d) {
        return;
    }
    let pids: Vec<u32> = walls
        .iter()
        .map(|(n, _)| {
            let v = d.json(&["launch", n, "-o", "json"]);
            v["pid"].as_u64().unwrap() as u32
        })
        .collect();
    assert!(pids.iter().all(|&p| alive(p)));
    d.kill9();
    for ((n, _), pid) in walls.iter().zip(&pids) {
        assert!(
            wait_gone(*pid),
            "the sandbox init of {n} outlived the daemon"
        );
    }
    d.spawn();
    for (n, _) in walls {
        let id = format!("ns:default:{n}");
        d.wait_event("lost", |e| {
            e["instance"] == id.as_str() && e["kind"] == "lost"
        });
    }
    assert_eq!(
        instance_cgroups(&cgroup_scope(&d.state)),
        Vec::<PathBuf>::new()
    );
}

/// With `user_namespace`, root inside is uid 100000 on the host: the daemon's pid of the
/// instance shows it in `/proc/<pid>/status`, `exec` enters as root inside, and a bad
/// mapping is a manifest error naming the field.
#[test]
fn a_user_namespace_instance_is_unprivileged_on_the_host() {
    let m = "name: un\ndriver: sandbox\ncommand: [/bin/sh, -c, 'exec sleep 1000']\nsandbox: {user_namespace: {uid: 100000}}\n";
    let bad = "name: bad\ndriver: sandbox\ncommand: [true]\nsandbox: {user_namespace: {uid: 0}}\n";
    let d = Daemon::start(&[("un", m), ("bad", bad)]);
    if !sandbox_available(&d) {
        return;
    }
    // The manifest's folder sits under a root-only temporary directory: the working
    // directory's bind is cloned before the uid switch, so that works.
    let v = d.json(&["launch", "un", "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let pid = v["pid"].as_u64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(uid["Uid:".len()..].trim(), "100000\t100000\t100000\t100000");
    // exec enters the user namespace too: root inside it (the host's map would read
    // "0 0 4294967295"), so 100000 on the host, never the host's root.
    let o = d.cli(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "id -u; cat /proc/self/uid_map",
    ]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("0"), "{out} {}", stderr(&o));
    let map: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    assert_eq!(map, ["0", "100000", "65536"], "{out}");
    let t = d.cli(&["terminate", &id]);
    assert!(t.status.success(), "{}", stderr(&t));

    let o = d.cli(&["launch", "bad"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("sandbox.user_namespace.uid"),
        "{}",
        stderr(&o)
    );
}

/// sd_notify readiness works from inside a user namespace (the notify socket accepts the
/// mapped uid). The interpreter must be reachable by uid 100000: the system one.
#[test]
fn a_notify_workload_in_a_user_namespace_gets_ready() {
    let py = "/usr/bin/python3";
    if !Path::new(py).exists() {
        eprintln!("skipped: {py} is not installed");
        return;
    }
    let m = format!(
        "name: unr\ndriver: sandbox\ncommand: [{py}, -c, 'import os,socket,time; s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.sendto(b\"READY=1\", os.environ[\"NOTIFY_SOCKET\"]); time.sleep(1000)']\nreadiness: {{notify: true, timeout: 30s}}\nsandbox: {{user_namespace: {{uid: 100000}}}}\n"
    );
    let d = Daemon::start(&[("unr", &m)]);
    if !sandbox_available(&d) {
        return;
    }
    let o = d.cli(&["launch", "unr", "-o", "json"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains("\"ready\""), "{out} {}", stderr(&o));
}

/// A command run with `exec` is as confined as the workload: its user, no capabilities
/// beyond the kept ones, `no_new_privs`, and the seccomp filter (so, for one, it cannot
/// make a user namespace to win capabilities back).
#[test]
fn exec_into_a_sandbox_is_as_confined_as_the_workload() {
    let m = "name: conf\ndriver: sandbox\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n\
             sandbox: {user: {uid: 65534}}\n";
    let d = Daemon::start(&[("conf", m)]);
    if !sandbox_available(&d) {
        return;
    }
    let v = d.json(&["launch", "conf", "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let fields = |status: &str| -> Vec<String> {
        status
            .lines()
            .filter(|l| {
                ["Uid:", "CapEff:", "CapBnd:", "NoNewPrivs:", "Seccomp:"]
                    .iter()
                    .any(|f| l.starts_with(f))
            })
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    };
    let o = d.cli(&["exec", &id, "--", "cat", "/proc/self/status"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let exec = fields(&String::from_utf8_lossy(&o.stdout));
    assert!(
        exec.contains(&"Uid: 65534 65534 65534 65534".to_owned()),
        "{exec:?}"
    );
    assert!(
        exec.contains(&"CapEff: 0000000000000000".to_owned()),
        "{exec:?}"
    );
    assert!(
        exec.contains(&"CapBnd: 0000000000000000".to_owned()),
        "{exec:?}"
    );
    assert!(exec.contains(&"NoNewPrivs: 1".to_owned()), "{exec:?}");
    assert!(exec.contains(&"Seccomp: 2".to_owned()), "{exec:?}");
    // The same as the workload's own process (the sleep, PID 2 under our init), as seen
    // from inside (from the host its ids are the mapped ones).
    let o = d.cli(&["exec", &id, "--", "cat", "/proc/2/status"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let own = fields(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(exec, own, "exec'd command vs the workload process");
    // The filter at work: unshare(2) is denied.
    let o = d.cli(&["exec", &id, "--", "unshare", "-U", "true"]);
    assert!(!o.status.success(), "unshare -U was allowed");
    assert!(
        stderr(&o).contains("Operation not permitted"),
        "{}",
        stderr(&o)
    );
    assert!(d.cli(&["terminate", &id]).status.success());
}

/// A command run with `exec` in a sandbox is the daemon's own child (the process that
/// entered the namespaces for it, a copy of the daemon, is gone once it runs), leads its
/// own group, or its own session with a terminal of the instance's own devpts, comes
/// back with its exact status, and goes with its client.
#[test]
fn exec_into_a_sandbox_is_the_daemons_child_with_its_exact_status() {
    let m = "name: kid\ndriver: sandbox\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n";
    let d = Daemon::start(&[("kid", m)]);
    if !sandbox_available(&d) {
        return;
    }
    let daemon = d.child.as_ref().unwrap().id();
    let v = d.json(&["launch", "kid", "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    for tty in [false, true] {
        let mut args = vec!["exec"];
        if tty {
            args.push("-t");
        }
        args.extend([id.as_str(), "--", "sh", "-c", "kill -TERM $$"]);
        let killed = d.cli(&args);
        assert_eq!(
            killed.status.code(),
            Some(143),
            "tty {tty}: {}",
            stderr(&killed)
        );
        assert!(
            stderr(&killed).contains("SIGTERM (15)"),
            "{}",
            stderr(&killed)
        );
    }
    // Its own group without a terminal, its own session with one (field 5 of stat is
    // the group, 6 the session; $$ is its pid in the instance's PID namespace).
    let o = d.cli(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo $$ $(cut -d' ' -f5,6 /proc/$$/stat)",
    ]);
    let f: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(f.len(), 3, "{f:?} {}", stderr(&o));
    assert_eq!(f[0], f[1], "not its group's leader: {f:?}");
    let o = d.cli(&[
        "exec",
        "-t",
        &id,
        "--",
        "sh",
        "-c",
        "tty; test -c $(tty) && echo term; echo $$ $(cut -d' ' -f6 /proc/$$/stat)",
    ]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    // Its terminal is the instance's own (its devpts), found at its path in there.
    assert!(
        text.starts_with("/dev/pts/0\r\nterm\r\n"),
        "{text:?} {}",
        stderr(&o)
    );
    let f: Vec<&str> = text
        .lines()
        .nth(2)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert!(
        f.len() == 2 && f[0] == f[1],
        "not a session leader: {text:?}"
    );

    // A command that cannot start is an error naming it, and leaves no process behind.
    let missing = d.cli(&["exec", &id, "--", "no-such-command-here"]);
    assert_eq!(missing.status.code(), Some(4), "{}", stderr(&missing));
    assert!(
        stderr(&missing).contains(&format!(
            "cannot start no-such-command-here in instance {id}"
        )),
        "{}",
        stderr(&missing)
    );
    assert!(bulkhead_driver::sys::zombie_children(daemon).is_empty());

    // A long command: its parent on the host is the daemon, nothing in between.
    let mut client = std::process::Command::new(BIN)
        .arg("--socket")
        .arg(&d.socket)
        .args(["exec", &id, "--", "sleep", "4243"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let pid = loop {
        let found = std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            (cmd == b"sleep\x004243\x00").then_some(pid)
        });
        if let Some(pid) = found {
            break pid;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the exec'd command never ran\n{}",
            d.daemon_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let stat = bulkhead_driver::sys::read_stat(pid).unwrap();
    assert_eq!(stat.ppid, daemon, "the command's parent is not the daemon");
    // In the instance's cgroups, as its own processes.
    let cgroups = |pid: u64| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let main = v["pid"].as_u64().unwrap();
    assert_eq!(
        cgroups(u64::from(pid)),
        cgroups(main),
        "not in the instance's cgroups"
    );
    client.kill().unwrap();
    client.wait().unwrap();
    assert!(wait_gone(pid), "the command survived its client");
    // Killed, then reaped by the daemon (a moment after it is a zombie).
    let start = std::time::Instant::now();
    while !bulkhead_driver::sys::zombie_children(daemon).is_empty() {
        assert!(start.elapsed() < DEADLINE, "zombies of the daemon remain");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(d.cli(&["terminate", &id]).status.success());
}

/// An exec probe of a sandboxed instance runs inside it, as `bulkhead exec` does: it sees
/// the instance's private `/tmp` (where the workload says it is ready), runs in its
/// working directory (here one that exists only inside) and is as confined as the
/// workload. Run on the host, it would look at the host's `/tmp` (never
/// ready here) as the daemon's root.
#[test]
fn an_exec_probe_of_a_sandbox_runs_inside_it() {
    let marker = format!("bh-ready-{}", std::process::id());
    // Its working directory exists only inside (a tmpfs of its own).
    let wd = format!("/var/cache/{marker}");
    let m = format!(
        "name: probed\ndriver: sandbox\nworking_dir: {wd}\nsandbox: {{tmpfs: [{wd}]}}\n\
         command: [/bin/sh, -c, 'sleep 0.2; touch /tmp/{marker}; exec sleep 1000']\n\
         readiness: {{exec: [/bin/sh, -c, 'grep -E \"^(NoNewPrivs|Seccomp):\" /proc/self/status > /tmp/probe.status; test $(pwd) = {wd} && test -f /tmp/{marker}'], timeout: 15s}}\n"
    );
    let d = Daemon::start(&[("probed", &m)]);
    if !sandbox_available(&d) {
        return;
    }
    let o = d.cli(&["launch", "probed", "-o", "json"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.contains("\"ready\""),
        "{out} {}\n{}",
        stderr(&o),
        d.daemon_log()
    );
    assert!(
        !Path::new("/tmp").join(&marker).exists(),
        "the workload's /tmp is its own"
    );
    let o = d.cli(&[
        "exec",
        "ns:default:probed",
        "--",
        "cat",
        "/tmp/probe.status",
    ]);
    let status: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(status, ["NoNewPrivs: 1", "Seccomp: 2"], "{}", stderr(&o));
    assert!(!Path::new(&wd).exists(), "{wd} is the instance's alone");
    let o = d.cli(&["exec", "ns:default:probed", "--", "pwd"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        wd,
        "{}",
        stderr(&o)
    );
    assert!(d.cli(&["terminate", "ns:default:probed"]).status.success());
}

/// The API socket trusts every caller that can connect: no sandboxed workload may reach
/// it. Behind the default wall the socket is not even visible; bound in on purpose it is
/// still refused (the workload is an unprivileged uid of its tenant's range, the socket
/// is 0600 root). Control: the host's root and ids, with the socket's folder bound in,
/// reach it, as the first wave's default did.
#[test]
fn a_sandboxed_workload_cannot_reach_the_api_socket() {
    let Some(py) = system_python3() else { return };
    let mut d = Daemon::start(&[]);
    if !sandbox_available(&d) {
        return;
    }
    // The manifests name the daemon's own socket: written once its path is known.
    let socket = d.socket.display().to_string();
    let dir = d.socket.parent().unwrap().display().to_string();
    let workload = |name: &str, sandbox: &str| {
        format!(
            "name: {name}\ndriver: sandbox\ncommand: [{py}, -c, \"import socket,sys,time\\ntry:\\n  s=socket.socket(socket.AF_UNIX); s.connect('{socket}'); print('connected')\\nexcept OSError as e:\\n  print('refused', e.errno)\\nsys.stdout.flush(); time.sleep(1000)\"]\nsandbox: {sandbox}\n"
        )
    };
    let bound = format!("{{binds: [{{source: {dir:?}}}]}}");
    let open = format!("{{root: host, user_namespace: host, binds: [{{source: {dir:?}}}]}}");
    for (name, sandbox) in [("hidden", "{}"), ("bound", &bound), ("open", &open)] {
        write_workload(&d.workloads, name, &workload(name, sandbox), &[]);
    }
    let o = d.cli(&["reload"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = |d: &Daemon, name: &str| -> String {
        let v = d.json(&["launch", name, "-o", "json"]);
        let id = v["id"].as_str().unwrap().to_owned();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let o = d.cli(&["logs", &id]);
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            if text.contains("connected") || text.contains("refused") {
                return text;
            }
            assert!(std::time::Instant::now() < deadline, "no output: {text}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    let hidden = out(&d, "hidden");
    assert!(hidden.contains("refused 2"), "ENOENT: {hidden}");
    let bound = out(&d, "bound");
    assert!(bound.contains("refused 13"), "EACCES: {bound}");
    let open = out(&d, "open");
    assert!(open.contains("connected"), "control: {open}");
    d.sigterm();
}

/// The default wall gives each tenant a host id range of its own: two namespaces' and two
/// sessions' instances run as different unprivileged uids (file permissions separate
/// them), two workloads of one tenant share theirs (they can share files through binds).
#[test]
fn each_tenant_runs_as_its_own_unprivileged_host_uid() {
    let cmd = "command: [/bin/sh, -c, 'exec sleep 1000']";
    let web = format!("name: web\ndriver: sandbox\n{cmd}\n");
    let db = format!("name: db\ndriver: sandbox\n{cmd}\n");
    let s = format!("name: s\ndriver: sandbox\nisolation: session\n{cmd}\n");
    let d = Daemon::start(&[("web", &web), ("db", &db), ("s", &s)]);
    if !sandbox_available(&d) {
        return;
    }
    let host_uid = |args: &[&str]| -> u64 {
        let mut a = vec!["launch"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        let v = d.json(&a);
        let pid = v["pid"].as_u64().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let a_web = host_uid(&["web", "--namespace", "a"]);
    let a_db = host_uid(&["db", "--namespace", "a"]);
    let b_web = host_uid(&["web", "--namespace", "b"]);
    let s1 = host_uid(&["s", "--session", "s1"]);
    let s2 = host_uid(&["s", "--session", "s2"]);
    for uid in [a_web, b_web, s1, s2] {
        assert!(uid >= 1 << 30, "an unprivileged range: {uid}");
    }
    assert_eq!(a_web, a_db, "one tenant, one range");
    let mut all = vec![a_web, b_web, s1, s2];
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 4, "tenants never share a range: {all:?}");
}

/// A clean shutdown leaves no cgroup scope directory in any hierarchy: the driver's scope
/// goes with it (the `bulkhead` folder above too, when no other daemon hangs its own there).
#[test]
fn a_clean_shutdown_leaves_no_cgroup_scope_behind() {
    let m = "name: sc\ndriver: sandbox\ncommand: [/bin/sh, -c, 'exec sleep 1000']\nresources: {memory: 64Mi, pids: 32}\n";
    let mut d = Daemon::start(&[("sc", m)]);
    if !sandbox_available(&d) {
        return;
    }
    d.json(&["launch", "sc", "-o", "json"]);
    let scope = cgroup_scope(&d.state);
    assert!(
        !scope_dirs(&scope).is_empty(),
        "the scope exists while serving"
    );
    assert_eq!(d.sigterm().code(), Some(0));
    assert_eq!(scope_dirs(&scope), Vec::<PathBuf>::new());
}

/// What a sandboxed instance finally gets (the per-driver table in the README): the same
/// environment as the process driver (bulkhead's variables, the manifest's `env`, `PATH`
/// and the like from the daemon, nothing else of it), the workload folder as working
/// directory, and root of its own user namespace.
#[test]
fn a_sandboxed_instance_gets_the_documented_environment() {
    let m = "name: envdump\ndriver: sandbox\ncommand: [/bin/sh, -c, 'env | sort; echo \"cwd=$(pwd -P)\"; echo \"uid=$(id -u)\"; exec sleep 1000']\nenv: {GREETING: hi}\n";
    let d = Daemon::start(&[("envdump", m)]);
    if !sandbox_available(&d) {
        return;
    }
    let v = d.json(&["launch", "envdump", "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let start = std::time::Instant::now();
    let text = loop {
        let t = d.logs_text(&id);
        if t.contains("uid=") {
            break t;
        }
        assert!(start.elapsed() < DEADLINE, "no output: {t}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let port = v["port"].as_u64().unwrap();
    for want in [
        format!("PORT={port}\n"),
        "BULKHEAD_INSTANCE=ns:default:envdump\n".to_owned(),
        "BULKHEAD_WORKLOAD=envdump\n".to_owned(),
        "GREETING=hi\n".to_owned(),
        "PATH=".to_owned(),
        "uid=0\n".to_owned(),
    ] {
        assert!(text.contains(&want), "{want:?} missing: {text}");
    }
    assert!(
        !text.contains("CARGO"),
        "the daemon's environment leaked: {text}"
    );
    let dir = d.workloads.join("envdump").canonicalize().unwrap();
    assert!(
        text.contains(&format!("cwd={}\n", dir.display())),
        "the workload folder is the working directory: {text}"
    );
}
