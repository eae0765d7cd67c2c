//! The docker driver through the real daemon and the real engine. Every test prints why it
//! skips when the engine or the test image (`.ci/setup-docker.sh`) is missing.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

pub(crate) const IMAGE: &str = "bulkhead-test/busybox:latest";

/// Why docker tests cannot run here, if they cannot.
pub(crate) fn skip() -> Option<String> {
    match Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .output()
    {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "docker engine or {IMAGE} unavailable ({}); run .ci/setup-docker.sh",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("no docker CLI ({e}); run .ci/setup-docker.sh")),
    }
}

macro_rules! require_docker {
    () => {
        if let Some(why) = skip() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

/// Containers carrying `label` (any state).
pub(crate) fn containers(label: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label={label}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn daemon_id(d: &Daemon) -> String {
    std::fs::read_to_string(d.state.join("daemon-id"))
        .unwrap()
        .trim()
        .to_owned()
}

/// Waits until no container of this daemon is left.
fn wait_no_containers(d: &Daemon) {
    let label = format!("bulkhead.daemon={}", daemon_id(d));
    let start = Instant::now();
    loop {
        let left = containers(&label);
        if left.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "containers {left:?} left\n{}",
            d.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn manifest(name: &str, script: &str, extra: &str) -> String {
    format!(
        "name: {name}\ndriver: docker\ncommand: [/bin/sh, -c, '{script}']\n{extra}docker:\n  image: {IMAGE}\n"
    )
}

#[test]
fn docker_instance_runs_logs_and_leaves_no_container() {
    require_docker!();
    let m = manifest("hello", "echo hello-from-container; exec sleep 1000", "");
    let d = Daemon::start(&[("hello", &m)]);
    let v = d.json(&["launch", "hello", "--namespace", "t", "-o", "json"]);
    assert_eq!(v["state"], "ready", "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let label = format!("bulkhead.instance={id}");
    assert_eq!(
        containers(&label).len(),
        1,
        "one container for the instance"
    );
    let start = Instant::now();
    loop {
        let logs = d.cli(&["logs", &id]);
        if String::from_utf8_lossy(&logs.stdout).contains("hello-from-container") {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no container output in the logs"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // exec runs inside the container (its busybox, its file system) with the real code.
    let seven = d.cli(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "test -x /bin/busybox && exit 7",
    ]);
    assert_eq!(seven.status.code(), Some(7), "{}", stderr(&seven));
    let out = d.cli(&["terminate", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.wait_event("terminated", |e| {
        e["kind"] == "terminated" && e["instance"] == id
    });
    wait_no_containers(&d);
}

#[test]
fn oom_kill_is_an_oom_killed_event_naming_the_limit() {
    require_docker!();
    let m = manifest(
        "hog",
        "a=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; while :; do a=$a$a; done",
        "resources:\n  memory: 16Mi\nrestart: {policy: never}\n",
    );
    let d = Daemon::start(&[("hog", &m)]);
    let v = d.json(&[
        "launch",
        "hog",
        "--namespace",
        "t",
        "--wait",
        "started",
        "-o",
        "json",
    ]);
    let id = v["id"].as_str().unwrap().to_owned();
    let ev = d.wait_event("oom_killed", |e| {
        e["kind"] == "oom_killed" && e["instance"] == id
    });
    assert!(
        ev.to_string().contains(&(16u64 << 20).to_string()) || ev.to_string().contains("16"),
        "the event names the limit: {ev}"
    );
    wait_no_containers(&d);
}

#[test]
fn a_crash_is_detected_from_the_event_stream() {
    require_docker!();
    let m = manifest("victim", "exec sleep 1000", "restart: {policy: never}\n");
    let d = Daemon::start(&[("victim", &m)]);
    let v = d.json(&["launch", "victim", "--namespace", "t", "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let c = containers(&format!("bulkhead.instance={id}"));
    assert_eq!(c.len(), 1);
    // Killed behind bulkhead's back, through the engine.
    let out = Command::new("docker")
        .args(["kill", &c[0]])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let ev = d.wait_event("crashed", |e| {
        e["instance"] == id && (e["kind"] == "crashed" || e["kind"] == "exited")
    });
    assert!(ev.to_string().contains('9'), "SIGKILL is reported: {ev}");
    wait_no_containers(&d);
}

#[test]
fn five_sessions_share_one_container_and_the_last_release_removes_it() {
    require_docker!();
    let m = format!(
        "name: shared\ndriver: docker\ncommand: [sleep, '1000']\ndocker:\n  image: {IMAGE}\n  share: true\n"
    );
    let d = Daemon::start(&[("shared", &m)]);
    let outs: Vec<serde_json::Value> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..5)
            .map(|i| {
                let d = &d;
                s.spawn(move || {
                    let sess = format!("s{i}");
                    d.json(&[
                        "launch",
                        "shared",
                        "--session",
                        &sess,
                        "--lease",
                        &sess,
                        "-o",
                        "json",
                    ])
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let id = outs[0]["id"].as_str().unwrap().to_owned();
    assert!(
        outs.iter().all(|o| o["id"] == id.as_str()),
        "one instance: {outs:?}"
    );
    let label = format!("bulkhead.daemon={}", daemon_id(&d));
    assert_eq!(
        containers(&label).len(),
        1,
        "one container for five sessions"
    );
    for i in 0..2 {
        let out = d.cli(&["release", &id, &format!("s{i}")]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    // Ending a session drops its lease too.
    for i in 2..4 {
        let out = d.cli(&["end-session", &format!("s{i}")]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        containers(&label).len(),
        1,
        "still held by the fifth session"
    );
    let out = d.cli(&["release", &id, "s4"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_no_containers(&d);
}

#[test]
fn a_restarted_daemon_adopts_its_containers_and_removes_stale_ones() {
    require_docker!();
    let m = manifest("keep", "exec sleep 1000", "");
    let mut d = Daemon::start(&[("keep", &m)]);
    let v = d.json(&["launch", "keep", "--namespace", "t", "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let before = containers(&format!("bulkhead.instance={id}"));
    assert_eq!(before.len(), 1);
    // A stale container with this daemon's label and an unknown instance.
    let dl = format!("bulkhead.daemon={}", daemon_id(&d));
    let stale = Command::new("docker")
        .args([
            "run",
            "-d",
            "--label",
            &dl,
            "--label",
            "bulkhead.instance=ns:t:gone",
        ])
        .args([IMAGE, "sleep", "1000"])
        .output()
        .unwrap();
    assert!(stale.status.success(), "{}", stderr(&stale));
    let stale = String::from_utf8_lossy(&stale.stdout).trim().to_owned();
    // A container of someone else: never touched.
    let other = Command::new("docker")
        .args([
            "run",
            "-d",
            "--label",
            "bulkhead.daemon=someone-else",
            IMAGE,
            "sleep",
            "1000",
        ])
        .output()
        .unwrap();
    let other = String::from_utf8_lossy(&other.stdout).trim().to_owned();
    d.kill9();
    d.spawn();
    let v2 = d.json(&["get", &id, "-o", "json"]);
    assert_eq!(
        containers(&format!("bulkhead.instance={id}")),
        before,
        "the same container, adopted: {v2}"
    );
    assert!(d
        .events()
        .iter()
        .any(|e| e["kind"] == "adopted" && e["instance"] == id));
    let start = Instant::now();
    while containers(&dl).contains(&stale[..12].to_owned()) {
        assert!(
            start.elapsed() < DEADLINE,
            "the stale container was not removed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let still = containers("bulkhead.daemon=someone-else");
    let _ = Command::new("docker").args(["rm", "-f", &other]).output();
    assert!(
        still.iter().any(|c| other.starts_with(c.as_str())),
        "another daemon's container was touched"
    );
    // The adopted container still ends cleanly.
    let out = d.cli(&["terminate", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_no_containers(&d);
}

#[test]
fn a_hundred_sequential_sessions_leave_no_container() {
    require_docker!();
    let m = format!(
        "name: seq\ndriver: docker\ncommand: [sleep, '1000']\nisolation: session\ndocker:\n  image: {IMAGE}\n"
    );
    let d = Daemon::start(&[("seq", &m)]);
    for i in 0..100 {
        let sess = format!("q{i}");
        let v = d.json(&["launch", "seq", "--session", &sess, "-o", "json"]);
        assert_eq!(v["state"], "ready", "{v}");
        let out = d.cli(&["end-session", &sess]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    wait_no_containers(&d);
    let nets = Command::new("docker")
        .args(["network", "ls", "-q"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&nets.stdout).lines().count() <= 3,
        "networks beyond the engine's defaults"
    );
    // (Other tests build images concurrently: only this workload's are checked.)
    let out = Command::new("docker")
        .args(["images", "-q", "bulkhead/seq"])
        .output()
        .unwrap();
    assert!(
        out.stdout.is_empty(),
        "no image made for a plain-image workload"
    );
}

#[test]
fn an_http_probe_reaches_the_container_at_the_instance_address() {
    require_docker!();
    let m = format!(
        "name: web\ndriver: docker\ncommand: [/bin/sh, -c, 'echo ok > /tmp/index.html; exec httpd -f -p $PORT -h /tmp']\nreadiness: {{http: {{path: /index.html}}, timeout: 20s}}\ndocker:\n  image: {IMAGE}\n"
    );
    let d = Daemon::start(&[("web", &m)]);
    let v = d.json(&["launch", "web", "--namespace", "t", "-o", "json"]);
    assert_eq!(v["state"], "ready", "{v}");
    let addr = v["address"].as_str().unwrap().to_owned();
    let mut s = std::net::TcpStream::connect(&addr).expect("the instance address answers");
    use std::io::{Read, Write};
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.contains("ok"), "{body}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert!(d.cli(&["terminate", &id]).status.success());
    wait_no_containers(&d);
}

#[test]
fn built_images_are_cached_listed_and_pruned() {
    require_docker!();
    let unique = std::process::id();
    let m = format!(
        "name: built\ndriver: docker\ncommand: [/bin/sh, -c, 'cat /greeting; exec sleep 1000']\ndocker:\n  build:\n    base: {IMAGE}\n    files: {{greeting.txt: /greeting}}\n    run: ['echo built-{unique}']\n"
    );
    let broken = format!(
        "name: broken\ndriver: docker\ncommand: [sleep, '1']\ndocker:\n  build:\n    base: {IMAGE}\n    run: ['echo the-build-says-{unique}; exit 3']\n"
    );
    let d = Daemon::start(&[("broken", &broken)]);
    write_workload(
        &d.workloads,
        "built",
        &m,
        &[("greeting.txt", "hello-built\n")],
    );
    assert!(d.cli(&["reload"]).status.success());
    let v = d.json(&["launch", "built", "--namespace", "t", "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let imgs = d.json(&["images", "-o", "json"]);
    let list = imgs.as_array().unwrap();
    assert_eq!(list.len(), 1, "{imgs}");
    assert_eq!(list[0]["in_use"], true);
    assert!(
        list[0]["tag"]
            .as_str()
            .unwrap()
            .starts_with("bulkhead/built:"),
        "{imgs}"
    );
    // Pruning keeps an image in use.
    let pruned = d.json(&["images", "prune", "-o", "json"]);
    assert_eq!(pruned.as_array().unwrap().len(), 0, "{pruned}");
    // A second session of the same configuration reuses the image.
    let v2 = d.json(&["launch", "built", "--namespace", "u", "-o", "json"]);
    assert_eq!(
        d.json(&["images", "-o", "json"]).as_array().unwrap().len(),
        1
    );
    for i in [&id, v2["id"].as_str().unwrap()] {
        assert!(d.cli(&["terminate", i]).status.success());
    }
    wait_no_containers(&d);
    let pruned = d.json(&["images", "prune", "-o", "json"]);
    assert_eq!(pruned.as_array().unwrap().len(), 1, "{pruned}");
    assert!(d
        .json(&["images", "-o", "json"])
        .as_array()
        .unwrap()
        .is_empty());
    // A failed build shows the tail of its log.
    let out = d.cli(&["launch", "broken", "--namespace", "t"]);
    assert!(!out.status.success());
    let msg = format!("{}{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
    let events = serde_json::to_string(&d.events()).unwrap();
    assert!(
        msg.contains(&format!("the-build-says-{unique}"))
            || events.contains(&format!("the-build-says-{unique}")),
        "{msg}\n{events}"
    );
}

/// An image built from `dockerfile` for one test, removed when dropped.
struct TestImage(String);

impl TestImage {
    fn build(name: &str, dockerfile: &str) -> TestImage {
        let dir = tempfile::tempdir().unwrap();
        let tag = format!("bulkhead-test/{name}:{}", std::process::id());
        std::fs::write(dir.path().join("Dockerfile"), dockerfile).unwrap();
        let built = Command::new("docker")
            .args(["build", "-q", "-t", &tag])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(built.status.success(), "docker build: {}", stderr(&built));
        TestImage(tag)
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
    }
}

/// A container gets its image's environment, as with `docker run`: the image's `ENV`
/// (`PATH`, `HOME`) finds a program the daemon's `PATH` would not, its `WORKDIR` is the
/// working directory, and the daemon's own variables (`LANG` here) never reach it. The
/// manifest's `env` still applies on top.
#[test]
fn a_container_keeps_its_images_env_and_workdir() {
    require_docker!();
    let image = TestImage::build(
        "envimage",
        &format!(
            "FROM {IMAGE}\n\
             RUN mkdir -p /opt/app/bin && printf '#!/bin/sh\\necho \"app PATH=$PATH HOME=$HOME PWD=$(pwd) LANG=${{LANG:-unset}} MODE=$MODE\"\\nexec sleep 1000\\n' > /opt/app/bin/myserver && chmod +x /opt/app/bin/myserver\n\
             ENV PATH=/opt/app/bin:/bin HOME=/opt/app\n\
             WORKDIR /opt/app\n"
        ),
    );
    let tag = &image.0;
    let m = format!(
        "name: app\ndriver: docker\ncommand: [myserver]\nenv: {{MODE: prod}}\ndocker: {{image: {tag:?}}}\n"
    );
    let d = Daemon::start_configured(&[("app", &m)], &[], |c| {
        c.env("LANG", "xx_DAEMON.UTF-8");
    });
    let v = d.json(&["launch", "app", "-o", "json"]);
    assert_eq!(v["state"], "ready", "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let start = Instant::now();
    let line = loop {
        let logs = String::from_utf8_lossy(&d.cli(&["logs", &id]).stdout).into_owned();
        if let Some(l) = logs.lines().find(|l| l.starts_with("app ")) {
            break l.to_owned();
        }
        assert!(start.elapsed() < DEADLINE, "no output: {logs}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        line, "app PATH=/opt/app/bin:/bin HOME=/opt/app PWD=/opt/app LANG=unset MODE=prod",
        "the image's ENV and WORKDIR, the manifest's env, none of the daemon's"
    );
}

/// The image's `ENTRYPOINT` and `USER` are kept, as with `docker run IMAGE ARGS`: the
/// manifest's `command` is the entrypoint's arguments; `docker.entrypoint: []` clears it.
#[test]
fn a_container_keeps_its_images_entrypoint_and_user_unless_the_manifest_sets_them() {
    require_docker!();
    let image = TestImage::build(
        "entryimage",
        &format!(
            "FROM {IMAGE}\n\
             RUN printf '#!/bin/sh\\necho \"entry uid=$(id -u) args=$*\"\\nexec \"$@\"\\n' > /entry.sh && chmod 755 /entry.sh\n\
             USER 4321\n\
             ENTRYPOINT [\"/entry.sh\"]\n"
        ),
    );
    let tag = &image.0;
    let kept = format!(
        "name: kept\ndriver: docker\ncommand: [/bin/sh, -c, 'echo cmd uid=$(id -u); exec sleep 1000']\ndocker: {{image: {tag:?}}}\n"
    );
    let cleared = format!(
        "name: cleared\ndriver: docker\ncommand: [/bin/sh, -c, 'echo cmd uid=$(id -u); exec sleep 1000']\ndocker: {{image: {tag:?}, entrypoint: [], user: '0'}}\n"
    );
    let d = Daemon::start(&[("kept", &kept), ("cleared", &cleared)]);
    let logs_of = |w: &str| {
        let v = d.json(&["launch", w, "-o", "json"]);
        assert_eq!(v["state"], "ready", "{v}");
        let id = v["id"].as_str().unwrap().to_owned();
        let start = Instant::now();
        loop {
            let logs = String::from_utf8_lossy(&d.cli(&["logs", &id]).stdout).into_owned();
            if logs.contains("cmd ") {
                return logs;
            }
            assert!(start.elapsed() < DEADLINE, "no output: {logs}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let logs = logs_of("kept");
    assert!(
        logs.contains("entry uid=4321 args=/bin/sh -c") && logs.contains("cmd uid=4321"),
        "the image's entrypoint ran the command as the image's user: {logs}"
    );
    let logs = logs_of("cleared");
    assert!(
        !logs.contains("entry ") && logs.contains("cmd uid=0"),
        "no entrypoint, the manifest's user: {logs}"
    );
}

/// The escape suite against the docker wall, from inside a default container
/// (`bulkhead exec`): `/proc/sys` is read-only, a new user namespace is refused (the
/// engine's seccomp profile), `/proc/kcore` is masked, the engine's socket is not there.
/// Control: the engine's socket bound in on purpose (`docker.mounts`) is reachable.
#[test]
fn escape_attempts_fail_in_a_default_container() {
    require_docker!();
    let run = "sleep 1000";
    let closed = format!(
        "name: closed\ndriver: docker\ncommand: [/bin/sh, -c, {run:?}]\ndocker: {{image: {IMAGE}}}\n"
    );
    let opened = format!(
        "name: opened\ndriver: docker\ncommand: [/bin/sh, -c, {run:?}]\ndocker:\n  image: {IMAGE}\n  mounts: [{{source: /var/run/docker.sock, target: /run/docker.sock}}]\n"
    );
    let d = Daemon::start(&[("closed", &closed), ("opened", &opened)]);
    let attack = "echo 11 > /proc/sys/kernel/printk_ratelimit_burst && echo SYSCTL_WRITTEN; \
                  unshare -U true && echo USERNS_MADE; \
                  head -c1 /proc/kcore >/dev/null 2>&1 && echo KCORE_READ; \
                  test -S /run/docker.sock && echo SOCKET_THERE; true";
    let inside = |w: &str| {
        let v = d.json(&["launch", w, "-o", "json"]);
        assert_eq!(v["state"], "ready", "{v}");
        let id = v["id"].as_str().unwrap().to_owned();
        let o = d.cli(&["exec", &id, "--", "sh", "-c", attack]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let out = inside("closed");
    for done in [
        "SYSCTL_WRITTEN",
        "USERNS_MADE",
        "KCORE_READ",
        "SOCKET_THERE",
    ] {
        assert!(!out.contains(done), "{done} in a default container: {out}");
    }
    assert!(out.contains("Read-only file system"), "{out}");
    assert!(out.contains("Operation not permitted"), "{out}");
    let out = inside("opened");
    assert!(out.contains("SOCKET_THERE"), "the control: {out}");
}

/// `bulkhead exec` into a container goes through the engine's exec API (no `docker` CLI):
/// stdin reaches the command, stdout and stderr come back apart, the exit code is the
/// command's; and a client that goes away takes its command with it.
#[test]
fn exec_through_the_engine_api_forwards_stdin_and_ends_with_its_client() {
    require_docker!();
    let m = manifest("shell", "exec sleep 1000", "");
    let d = Daemon::start(&[("shell", &m)]);
    let v = d.json(&["launch", "shell", "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let run = |argv: &[&str], input: &[u8]| {
        let mut child = Command::new(BIN)
            .arg("--socket")
            .arg(&d.socket)
            .args(["exec", &id, "--"])
            .args(argv)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = run(
        &[
            "sh",
            "-c",
            "read line; echo \"got $line\"; echo oops >&2; exit 3",
        ],
        b"piped\n",
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got piped\n");
    assert!(stderr(&out).contains("oops"), "{}", stderr(&out));

    // A command whose client is killed does not outlive it in the container.
    let container = containers(&format!("bulkhead.instance={id}"))
        .pop()
        .expect("the instance's container");
    let mut client = Command::new(BIN)
        .arg("--socket")
        .arg(&d.socket)
        .args(["exec", &id, "--", "sleep", "777"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let sleeping = || {
        let ps = Command::new("docker")
            .args(["exec", &container, "ps"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&ps.stdout).contains("sleep 777")
    };
    let start = Instant::now();
    while !sleeping() {
        assert!(start.elapsed() < DEADLINE, "the exec never ran");
        std::thread::sleep(Duration::from_millis(50));
    }
    client.kill().unwrap();
    let _ = client.wait();
    let start = Instant::now();
    while sleeping() {
        assert!(
            start.elapsed() < DEADLINE,
            "the exec outlived its client\n{}",
            d.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
