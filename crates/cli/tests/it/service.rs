//! bulkhead as a system service: the readiness protocol towards its own supervisor
//! (sd_notify), the systemd unit, one daemon mode (`serve` autostarts; `up` is `serve` in
//! the foreground), the configuration file and the platform's default locations.

use std::io::Read;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

const SLEEPER: &str = "name: sleeper\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n";
/// Its instance: `ns:default:auto` (the default isolation is the namespace).
const AUTO: &str = "name: auto\nautostart: true\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n";

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A supervisor's notify socket: an abstract-namespace datagram socket, like systemd's
/// `@/org/freedesktop/...` ones. Remembers every message received.
struct Supervisor {
    sock: UnixDatagram,
    name: String,
    seen: std::cell::RefCell<Vec<String>>,
}

impl Supervisor {
    fn bind(tag: &str) -> Supervisor {
        let name = format!("bulkhead-it-{tag}-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        sock.set_read_timeout(Some(DEADLINE)).unwrap();
        Supervisor {
            sock,
            name,
            seen: Default::default(),
        }
    }

    fn env(&self) -> String {
        format!("@{}", self.name)
    }

    /// The next message, or a failure naming what was awaited.
    fn recv(&self, what: &str, log: &dyn Fn() -> String) -> String {
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.borrow_mut().push(m.clone());
                m
            }
            Err(e) => panic!(
                "no notify message ({what}): {e}; got {:?}\n--- daemon log ---\n{}",
                self.seen.borrow(),
                log()
            ),
        }
    }

    /// The next message with `line` (after the ones already returned); fails after
    /// [`DEADLINE`], naming what came instead.
    fn until(&self, line: &str, log: &dyn Fn() -> String) -> String {
        let start = Instant::now();
        loop {
            let m = self.recv(line, log);
            if m.lines().any(|l| l == line) {
                return m;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no {line:?} in {:?}\n--- daemon log ---\n{}",
                self.seen.borrow(),
                log()
            );
        }
    }

    /// Whether any message so far had `line`.
    fn saw(&self, line: &str) -> bool {
        self.seen
            .borrow()
            .iter()
            .any(|m| m.lines().any(|l| l == line))
    }
}

/// A daemon this test started: stopped (SIGTERM, which also ends its keeper and
/// instances) when the test ends, also on a failure.
struct Running(Child);

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            sigterm(&self.0);
            let start = Instant::now();
            while matches!(self.0.try_wait(), Ok(None)) && start.elapsed() < DEADLINE {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(start.elapsed() < DEADLINE, "daemon did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(child: &Child) {
    // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

/// The environment of a process, as `KEY=value` strings.
fn environ(pid: u32) -> Vec<String> {
    let mut raw = Vec::new();
    std::fs::File::open(format!("/proc/{pid}/environ"))
        .unwrap()
        .read_to_end(&mut raw)
        .unwrap();
    raw.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// The keeper of a state directory (`bulkhead keeper --state <state>`).
fn keeper_pid(state: &Path) -> Option<u32> {
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        if args.contains(&&b"keeper"[..]) && args.contains(&state.as_os_str().as_encoded_bytes()) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn the_daemon_tells_its_supervisor_ready_status_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let wl = dir.path().join("workloads");
    write_workload(&wl, "auto", AUTO, &[]);
    let (state, socket) = (dir.path().join("state"), dir.path().join("api.sock"));
    let sup = Supervisor::bind("notify");
    let log_path = dir.path().join("daemon.log");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let logf = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--workloads"])
        .arg(&wl)
        .arg("--state")
        .arg(&state)
        .arg("--socket")
        .arg(&socket)
        .env("NOTIFY_SOCKET", sup.env())
        // 300 ms: a heartbeat every 150 ms.
        .env("WATCHDOG_USEC", "300000")
        .env("BULKHEAD_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(logf.try_clone().unwrap())
        .stderr(logf)
        .spawn()
        .map(Running)
        .unwrap();
    let cli = |args: &[&str]| {
        Command::new(BIN)
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };

    // The first message is READY=1, and the API answers at once: one try, no retry.
    let first = sup.recv("READY=1", &log);
    assert!(first.lines().any(|l| l == "READY=1"), "{first:?}");
    assert!(
        first.lines().any(|l| l.starts_with("STATUS=serving ")),
        "{first:?}"
    );
    let h = cli(&["health", "-o", "json"]);
    assert!(
        h.status.success(),
        "health right after READY=1: {}",
        stderr(&h)
    );

    // The heartbeat repeats.
    for _ in 0..3 {
        sup.until("WATCHDOG=1", &log);
    }
    // `serve` launched the autostart workload; the status follows.
    if !sup.saw("STATUS=serving 1 instance") {
        sup.until("STATUS=serving 1 instance", &log);
    }
    let inst: serde_json::Value =
        serde_json::from_slice(&cli(&["get", "ns:default:auto", "-o", "json"]).stdout).unwrap();
    assert_eq!(inst["state"], "ready", "{inst}");

    // Neither the keeper nor the workload inherits the supervisor's variables.
    let pid = inst["pid"].as_u64().unwrap() as u32;
    let keeper = keeper_pid(&state).expect("the keeper runs");
    for (who, p) in [("instance", pid), ("keeper", keeper)] {
        let env = environ(p);
        assert!(
            !env.iter().any(|v| v.starts_with("NOTIFY_SOCKET=")
                || v.starts_with("WATCHDOG_USEC=")
                || v.starts_with("WATCHDOG_PID=")),
            "the {who} inherited the supervisor's variables: {env:?}"
        );
    }

    sigterm(&child);
    let stopping = sup.until("STOPPING=1", &log);
    assert!(
        stopping
            .lines()
            .any(|l| l == "STATUS=stopping: terminating 1 instance"),
        "{stopping:?}"
    );
    assert!(wait_exit(&mut child).success(), "{}", log());
}

#[test]
fn without_our_pid_in_watchdog_pid_there_is_no_heartbeat_but_still_ready() {
    let d_dir = tempfile::tempdir().unwrap();
    let wl = d_dir.path().join("workloads");
    std::fs::create_dir_all(&wl).unwrap();
    let sup = Supervisor::bind("nopid");
    let log = String::new;
    let mut child = Command::new(BIN)
        .args(["serve", "--workloads"])
        .arg(&wl)
        .arg("--state")
        .arg(d_dir.path().join("state"))
        .arg("--socket")
        .arg(d_dir.path().join("api.sock"))
        .env("NOTIFY_SOCKET", sup.env())
        .env("WATCHDOG_USEC", "100000")
        // Meant for another process (pid 1 is never the daemon here).
        .env("WATCHDOG_PID", "1")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Running)
        .unwrap();
    sup.until("READY=1", &log);
    // Ten heartbeat periods without a WATCHDOG=1.
    sup.sock
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while let Ok(n) = sup.sock.recv(&mut buf) {
        let m = String::from_utf8_lossy(&buf[..n]);
        assert!(!m.lines().any(|l| l == "WATCHDOG=1"), "{m:?}");
    }
    sigterm(&child);
    assert!(wait_exit(&mut child).success());
}

/// Where `systemctl` would put the unit, with ExecStart pointing at this build.
#[test]
fn the_systemd_unit_verifies() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/systemd/bulkhead.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    let settings: Vec<(&str, &str)> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .collect();
    for want in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("Delegate", "yes"),
        ("KillMode", "process"),
        ("Restart", "on-failure"),
        ("LimitNOFILE", "1048576"),
        ("ExecStart", "/usr/local/bin/bulkhead serve"),
    ] {
        assert!(
            settings.contains(&want),
            "the unit lacks {}={}",
            want.0,
            want.1
        );
    }
    assert!(settings.iter().any(|(k, _)| *k == "WatchdogSec"));
    for forbidden in [
        "NoNewPrivileges",
        "ProtectSystem",
        "PrivateTmp",
        "ProtectControlGroups",
    ] {
        assert!(
            !settings.iter().any(|(k, _)| *k == forbidden),
            "{forbidden}= breaks the walls (see the unit's comments)"
        );
    }
    let Ok(which) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("skipped: systemd-analyze is not installed (apt-get install systemd)");
        return;
    };
    assert!(which.status.success());
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("bulkhead.service");
    std::fs::write(
        &copy,
        text.replace(
            "/usr/local/bin/bulkhead",
            &PathBuf::from(BIN).display().to_string(),
        ),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "systemd-analyze verify: {err}");
    // Unknown keys and bad values are only warnings: none may name the unit file.
    assert!(
        !err.contains("bulkhead.service:"),
        "systemd-analyze verify warns: {err}"
    );
}

/// Runs `bulkhead <args>` in `cwd` with the given environment only (plus PATH).
fn run_in(cwd: &Path, env: &[(&str, &Path)], args: &[&str]) -> Output {
    Command::new(BIN)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Waits until `check` passes (the daemon is up) or the child exits.
fn wait_up(child: &mut Child, log: &dyn Fn() -> String, check: &dyn Fn() -> bool) {
    let start = Instant::now();
    loop {
        if check() {
            return;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("daemon exited with {st}:\n{}", log());
        }
        assert!(
            start.elapsed() < DEADLINE,
            "daemon did not come up:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn up_is_serve_in_the_foreground_with_the_same_settings() {
    let dir = tempfile::tempdir().unwrap();
    let wl = dir.path().join("demo");
    write_workload(&wl, "auto", AUTO, &[]);
    write_workload(&wl, "sleeper", SLEEPER, &[]);
    // A setting of `serve` through the configuration file, another as a flag.
    std::fs::write(dir.path().join("up.toml"), "max-instances = 1\n").unwrap();
    let out_path = dir.path().join("up.out");
    let err_path = dir.path().join("up.err");
    let mut child = Command::new(BIN)
        .current_dir(dir.path())
        .env_remove("BULKHEAD_SOCKET")
        .args([
            "up",
            "demo",
            "--config",
            "up.toml",
            "--port-range",
            "23000-23100",
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .map(Running)
        .unwrap();
    let log = || std::fs::read_to_string(&err_path).unwrap_or_default();
    // The local demo directory: the CLI finds ./.bulkhead/bulkhead.sock from here.
    let cli = |args: &[&str]| run_in(dir.path(), &[], args);
    wait_up(&mut child, &log, &|| {
        let o = cli(&["get", "ns:default:auto", "-o", "json"]);
        o.status.success()
            && serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["state"] == "ready"
    });
    assert!(dir.path().join(".bulkhead/bulkhead.sock").exists());
    assert!(log().contains("export BULKHEAD_SOCKET="), "{}", log());
    let inst: serde_json::Value =
        serde_json::from_slice(&cli(&["get", "ns:default:auto", "-o", "json"]).stdout).unwrap();
    let port: u16 = inst["address"]
        .as_str()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {inst}"));
    assert!(
        (23000..=23100).contains(&port),
        "--port-range ignored: {inst}"
    );
    // max-instances = 1 from the file: a second instance is refused.
    let second = cli(&["launch", "sleeper"]);
    assert_eq!(second.status.code(), Some(9), "{}", stderr(&second));
    sigterm(&child);
    assert!(wait_exit(&mut child).success(), "{}", log());
    // Events were printed as they happened.
    let out = std::fs::read_to_string(&out_path).unwrap();
    assert!(
        out.lines()
            .any(|l| l.contains("ns:default:auto") && l.contains("ready")),
        "{out}"
    );
}

#[test]
fn up_without_a_directory_outside_a_checkout_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(dir.path(), &[], &["up"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no workloads directory"),
        "{}",
        stderr(&out)
    );
    assert!(
        !dir.path().join(".bulkhead").exists(),
        "nothing may be served"
    );
}

/// A configuration file with the workloads, state and socket (relative to the file) and
/// `max-instances = 1`; returns (config path, socket path).
fn config_dir(dir: &Path, extra: &str) -> (PathBuf, PathBuf) {
    write_workload(&dir.join("wl"), "sleeper", SLEEPER, &[]);
    let cfg = dir.join("conf/bulkhead.toml");
    std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "workloads = \"../wl\"\nstate = \"../state\"\nsocket = \"../api.sock\"\n\
             max-instances = 1\n{extra}"
        ),
    )
    .unwrap();
    (cfg, dir.join("api.sock"))
}

fn serve_with(cwd: &Path, args: &[&str]) -> Running {
    Command::new(BIN)
        .current_dir(cwd)
        .env_remove("BULKHEAD_SOCKET")
        .arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(cwd.join("daemon.log")).unwrap())
        .spawn()
        .map(Running)
        .unwrap()
}

#[test]
fn a_config_file_value_applies_and_a_flag_overrides_it() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, socket) = config_dir(dir.path(), "");
    let cfg_s = cfg.to_str().unwrap();
    let log = || std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
    let cli = |args: &[&str]| {
        Command::new(BIN)
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let health = || cli(&["health"]).status.success();

    // From the file: workloads, state and socket, and max-instances = 1.
    let mut d = serve_with(dir.path(), &["--config", cfg_s]);
    wait_up(&mut d, &log, &health);
    assert!(dir.path().join("state/bulkhead.db").exists());
    assert!(cli(&["launch", "sleeper", "--namespace", "a"])
        .status
        .success());
    let refused = cli(&["launch", "sleeper", "--namespace", "b"]);
    assert_eq!(refused.status.code(), Some(9), "{}", stderr(&refused));
    sigterm(&d);
    assert!(wait_exit(&mut d).success(), "{}", log());

    // The flag wins over the file.
    let mut d = serve_with(dir.path(), &["--config", cfg_s, "--max-instances", "2"]);
    wait_up(&mut d, &log, &health);
    assert!(cli(&["launch", "sleeper", "--namespace", "a"])
        .status
        .success());
    let b = cli(&["launch", "sleeper", "--namespace", "b"]);
    assert!(b.status.success(), "{}", stderr(&b));
    sigterm(&d);
    assert!(wait_exit(&mut d).success(), "{}", log());
}

#[test]
fn a_bad_config_file_is_refused_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, socket) = config_dir(dir.path(), "# a comment\nmax-instancez = 2\n");
    let out = run_in(
        dir.path(),
        &[],
        &["serve", "--config", cfg.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let want = format!("{}:6:1: key `max-instancez`: unknown field", cfg.display());
    assert!(stderr(&out).contains(&want), "{}", stderr(&out));
    assert!(!socket.exists(), "nothing may be served");

    std::fs::write(&cfg, "event-sync = \"sometimes\"\n").unwrap();
    let out = run_in(
        dir.path(),
        &[],
        &["serve", "--config", cfg.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let want = format!("{}:1:14: key `event-sync`", cfg.display());
    assert!(stderr(&out).contains(&want), "{}", stderr(&out));

    // A --config that does not exist is an error (a missing default file is not).
    let missing = dir.path().join("nope.toml");
    let out = run_in(
        dir.path(),
        &[],
        &["serve", "--config", missing.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "cannot read configuration file {}",
            missing.display()
        )),
        "{}",
        stderr(&out)
    );
}

/// A user's daemon and client with only HOME and the XDG variables: the configuration,
/// workloads, state and socket are where the platform says, and the client finds the
/// socket without --socket. Run as `nobody` when the tests run as root (root's defaults
/// are /etc, /var/lib and /run, tested on the path function, never written here).
#[test]
fn a_user_daemon_uses_the_xdg_locations_and_the_client_finds_it() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (home, config, state, run) = (
        root.join("home"),
        root.join("config"),
        root.join("state"),
        root.join("run"),
    );
    for d in [&home, &config, &state, &run] {
        std::fs::create_dir_all(d).unwrap();
    }
    // The default configuration file is read; its relative workloads path is its own.
    std::fs::create_dir_all(config.join("bulkhead")).unwrap();
    std::fs::write(config.join("bulkhead/config.toml"), "workloads = \"wl\"\n").unwrap();
    write_workload(&config.join("bulkhead/wl"), "sleeper", SLEEPER, &[]);
    let me = euid();
    let as_user = |cmd: &mut Command| {
        if me == 0 {
            cmd.uid(65534).gid(65534);
        }
    };
    if me == 0 {
        chown_tree(root, 65534);
    }
    let env: [(&str, &Path); 4] = [
        ("HOME", &home),
        ("XDG_CONFIG_HOME", &config),
        ("XDG_STATE_HOME", &state),
        ("XDG_RUNTIME_DIR", &run),
    ];
    let log_path = root.join("daemon.log");
    let mut cmd = Command::new(BIN);
    cmd.current_dir(root)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .args(["serve", "--no-sandbox"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap());
    as_user(&mut cmd);
    let mut d = Running(cmd.spawn().unwrap());
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let cli = |args: &[&str]| {
        let mut c = Command::new(BIN);
        c.current_dir(root)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .args(args)
            .stdin(Stdio::null());
        as_user(&mut c);
        c.output().unwrap()
    };
    wait_up(&mut d, &log, &|| cli(&["health"]).status.success());
    assert!(run.join("bulkhead/bulkhead.sock").exists(), "{}", log());
    assert!(state.join("bulkhead/bulkhead.db").exists(), "{}", log());
    let w = cli(&["workloads", "-o", "json"]);
    assert!(
        String::from_utf8_lossy(&w.stdout).contains("sleeper"),
        "the default configuration's workloads: {}",
        String::from_utf8_lossy(&w.stdout)
    );
    sigterm(&d);
    assert!(wait_exit(&mut d).success(), "{}", log());
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

fn chown_tree(p: &Path, uid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(uid)).unwrap();
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            chown_tree(&e.path(), uid);
        }
    }
}

/// `STATUS=` follows `health`: degraded while the keeper is down and cannot be restarted
/// (its log file is a folder), serving again once it can.
#[test]
fn the_status_says_degraded_while_the_keeper_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let wl = dir.path().join("workloads");
    std::fs::create_dir_all(&wl).unwrap();
    let state = dir.path().join("state");
    let sup = Supervisor::bind("degraded");
    let log = String::new;
    let mut child = Command::new(BIN)
        .args(["serve", "--workloads"])
        .arg(&wl)
        .arg("--state")
        .arg(&state)
        .arg("--socket")
        .arg(dir.path().join("api.sock"))
        .env("NOTIFY_SOCKET", sup.env())
        .env("WATCHDOG_USEC", "200000")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Running)
        .unwrap();
    sup.until("READY=1", &log);
    let keeper = keeper_pid(&state).expect("a keeper runs");
    let keeper_log = state.join("keeper.log");
    std::fs::remove_file(&keeper_log).unwrap();
    std::fs::create_dir(&keeper_log).unwrap();
    // SAFETY: kill(2) on the keeper of this test's own state directory.
    unsafe {
        libc::kill(keeper as i32, libc::SIGKILL);
    }
    sup.until(
        "STATUS=degraded: the keeper is down (a new one is starting)",
        &log,
    );
    std::fs::remove_dir(&keeper_log).unwrap();
    sup.until("STATUS=serving 0 instances", &log);
    sigterm(&child);
    assert!(wait_exit(&mut child).success());
}
