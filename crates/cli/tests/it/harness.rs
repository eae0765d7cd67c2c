//! Test support: a real `bulkhead serve` on a temporary workloads dir, state dir and
//! socket, and helpers that drive it through the real CLI. Every wait has a generous
//! deadline and fails the test rather than hanging; nothing asserts a maximum runtime.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_bulkhead");
pub const DEADLINE: Duration = Duration::from_secs(30);

pub struct Daemon {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub workloads: PathBuf,
    pub state: PathBuf,
    /// Extra arguments for `bulkhead serve` (see [`Daemon::start_with_args`]).
    pub extra_args: Vec<String>,
}

/// Writes `<workloads>/<name>/manifest.yaml` (and extra files) for a test.
pub fn write_workload(workloads: &Path, name: &str, manifest: &str, files: &[(&str, &str)]) {
    let d = workloads.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("manifest.yaml"), manifest).unwrap();
    for (f, text) in files {
        std::fs::write(d.join(f), text).unwrap();
    }
}

impl Daemon {
    /// Starts a daemon serving the given workloads: (name, manifest, extra files).
    pub fn start(workloads: &[(&str, &str)]) -> Daemon {
        Daemon::start_with_args(workloads, &[])
    }

    /// [`Daemon::start`] with extra `bulkhead serve` arguments (e.g. `--metrics ADDR`).
    pub fn start_with_args(workloads: &[(&str, &str)], extra_args: &[&str]) -> Daemon {
        Daemon::start_configured(workloads, extra_args, |_| {})
    }

    /// [`Daemon::start_with_args`], with `configure` applied to the daemon's `Command`
    /// (e.g. a `pre_exec` hook that hands it an extra descriptor).
    pub fn start_configured(
        workloads: &[(&str, &str)],
        extra_args: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let wl = dir.path().join("workloads");
        std::fs::create_dir_all(&wl).unwrap();
        for (name, manifest) in workloads {
            write_workload(&wl, name, manifest, &[]);
        }
        let mut d = Daemon {
            child: None,
            socket: dir.path().join("api.sock"),
            state: dir.path().join("state"),
            workloads: wl,
            dir,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        };
        d.spawn_configured(configure);
        d
    }

    pub fn spawn(&mut self) {
        self.spawn_configured(|_| {});
    }

    pub fn spawn_configured(&mut self, configure: impl FnOnce(&mut Command)) {
        let log = std::fs::File::create(self.dir.path().join("daemon.log")).unwrap();
        let mut cmd = Command::new(BIN);
        configure(&mut cmd);
        let child = cmd
            .args(["serve", "--workloads"])
            .arg(&self.workloads)
            .arg("--state")
            .arg(&self.state)
            .arg("--socket")
            .arg(&self.socket)
            .args(&self.extra_args)
            .env("BULKHEAD_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if self.socket.exists() && self.cli(&["health"]).status.success() {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "daemon exited at start-up with {st}:\n{}",
                    self.daemon_log()
                );
            }
            assert!(
                start.elapsed() < DEADLINE,
                "daemon did not come up:\n{}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// What `bulkhead logs ID` prints, stdout lines and stderr lines (and run marks)
    /// together.
    pub fn logs_text(&self, id: &str) -> String {
        let o = self.cli(&["logs", id]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    /// Runs the CLI, asserts success, parses stdout as JSON.
    pub fn json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "bulkhead {args:?} failed ({}): {}\n--- daemon log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.daemon_log()
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "bulkhead {args:?}: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// All events so far.
    pub fn events(&self) -> Vec<Value> {
        let out = self.cli(&["events", "-o", "json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits until an event matching `pred` exists; returns it.
    pub fn wait_event(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            if let Some(e) = self.events().into_iter().find(|e| pred(e)) {
                return e;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no event {what}; events: {:#?}",
                self.events()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// SIGTERM to the daemon; returns its exit status.
    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "daemon did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Daemon {
    /// SIGKILL to the daemon (its keeper and instances live on); waits until it is gone.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The pid of the state directory's (first) keeper, if one runs.
    pub fn keeper_pid(&self) -> Option<u32> {
        self.keeper_pid_of("keeper.lock")
    }

    fn keeper_pid_of(&self, lock: &str) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.state.join(lock))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        (alive(pid) && String::from_utf8_lossy(&cmdline).contains("keeper")).then_some(pid)
    }

    /// The pids of every keeper of the state directory (shard 0 first, then the others).
    pub fn keeper_pids(&self) -> Vec<u32> {
        let mut locks: Vec<String> = std::fs::read_dir(&self.state)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.starts_with("keeper.") && n.ends_with(".lock"))
                    .collect()
            })
            .unwrap_or_default();
        locks.sort_by_key(|n| (n.len(), n.clone()));
        locks.iter().filter_map(|l| self.keeper_pid_of(l)).collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let start = Instant::now();
            while c.try_wait().ok().flatten().is_none() && start.elapsed() < Duration::from_secs(15)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // A keeper left behind (a test killed the daemon with SIGKILL): its instances die
        // with it (parent-death signal).
        for k in self.keeper_pids() {
            // SAFETY: kill(2) on a keeper pid read from this test's own state directory.
            unsafe {
                libc::kill(k as i32, libc::SIGKILL);
            }
        }
    }
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    bulkhead_driver::sys::read_stat(pid).is_ok_and(|s| !s.is_zombie())
}

/// Waits until `pid` is gone (a reparented orphan may take a moment to be reaped by init).
pub fn wait_gone(pid: u32) -> bool {
    let start = Instant::now();
    while alive(pid) {
        if start.elapsed() > Duration::from_secs(10) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn python3() -> Option<&'static str> {
    let ok = Command::new("python3")
        .arg("-c")
        .arg("pass")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        Some("python3")
    } else {
        eprintln!("skipping: python3 is not installed");
        None
    }
}

/// The system's python3 (`/usr/bin/python3`), which a sandbox's minimal root shows (a
/// python3 found first in `PATH` may live under `/root` or `/home`, which it hides).
pub fn system_python3() -> Option<&'static str> {
    let py = "/usr/bin/python3";
    if std::path::Path::new(py).exists() {
        Some(py)
    } else {
        eprintln!("skipping: {py} is not installed (apt-get install python3)");
        None
    }
}

/// Wall-clock milliseconds since the Unix epoch (the clock event `time_ms` uses).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The cgroup scope of a daemon's state directory (as `bulkhead_daemon` computes it: from
/// its daemon id, so read it while the state directory exists).
pub fn cgroup_scope(state: &Path) -> String {
    let id = std::fs::read_to_string(state.join("daemon-id"))
        .unwrap_or_else(|e| panic!("no daemon id in {}: {e}", state.display()));
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.trim().as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("d{h:016x}")
}

/// Instance cgroup directories under the scope, in every hierarchy.
/// The daemon scope's own directories (`.../bulkhead/<scope>`) in every hierarchy.
pub fn scope_dirs(scope: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, scope: &str, out: &mut Vec<PathBuf>, depth: u32) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if !p.is_dir() || depth > 6 {
                continue;
            }
            if p.file_name().is_some_and(|n| n == scope) {
                out.push(p);
            } else {
                walk(&p, scope, out, depth + 1);
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), scope, &mut out, 0);
    out
}

pub fn instance_cgroups(scope: &str) -> Vec<PathBuf> {
    scope_dirs(scope)
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()))
        .collect()
}
