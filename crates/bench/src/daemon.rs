//! The real daemon for the benchmarks that measure it as its users run it: its binary,
//! its start and stop, its processes' usage, launches over gRPC.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_api::v1;

type Client = bulkhead_api::BulkheadClient<tonic::transport::Channel>;

/// The `bulkhead` binary of this checkout's build of the benchmark's profile (built first
/// when missing).
pub fn bulkhead_binary() -> anyhow::Result<PathBuf> {
    // <target>/release/deps/growth-* -> <target>/release/bulkhead
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow::anyhow!("no target directory above {}", exe.display()))?;
    let bin = profile_dir.join("bulkhead");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let release = profile_dir.ends_with("release");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "-p", "bulkhead"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if release {
        cmd.arg("--release");
    }
    let st = cmd.status()?;
    anyhow::ensure!(st.success(), "cannot build the bulkhead binary");
    anyhow::ensure!(bin.exists(), "{} is missing", bin.display());
    Ok(bin)
}

pub struct Daemon {
    pub child: Child,
}

impl Daemon {
    /// `bulkhead serve` on these directories, with `extra` arguments; returns once its
    /// socket exists.
    pub fn start(
        bin: &Path,
        wl: &Path,
        state: &Path,
        socket: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Daemon> {
        let log = std::fs::File::create(state.with_extension("log"))?;
        let child = Command::new(bin)
            .arg("serve")
            .arg("--workloads")
            .arg(wl)
            .arg("--state")
            .arg(state)
            .arg("--socket")
            .arg(socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let t = Instant::now();
        while !socket.exists() {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(30),
                "the daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Daemon { child })
    }

    /// The daemon and its keeper (its child processes named `bulkhead`).
    pub fn pids(&self) -> Vec<u32> {
        let me = self.child.id();
        let mut pids = vec![me];
        let children =
            std::fs::read_to_string(format!("/proc/{me}/task/{me}/children")).unwrap_or_default();
        for p in children
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            if comm.trim() == "bulkhead" {
                pids.push(p);
            }
        }
        pids
    }

    pub fn stop(&mut self) {
        // SAFETY: kill(2) on our own child's pid, which it still is (not reaped yet).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Resident memory (KiB) and CPU seconds (user + system) of `pids`, summed.
pub fn usage(pids: &[u32]) -> (u64, f64) {
    let tick = {
        // SAFETY: sysconf has no preconditions.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if t > 0 {
            t as f64
        } else {
            100.0
        }
    };
    let mut rss = 0;
    let mut cpu = 0.0;
    for p in pids {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        rss += status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        // Fields after the command (which may hold spaces): utime and stime are the 12th
        // and 13th after the closing parenthesis.
        if let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            cpu += (t(11) + t(12)) / tick;
        }
    }
    (rss, cpu)
}

pub async fn launch_one(mut c: Client, i: usize) -> anyhow::Result<()> {
    c.launch(v1::LaunchRequest {
        workload: "s".into(),
        session: Some(format!("s{i}")),
        wait: v1::WaitFor::Ready as i32,
        timeout_ms: 120_000,
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// A scratch directory under `/var/tmp` (the sandbox hides `/tmp`) with a workloads
/// directory holding `s`: `sleep`, one instance per session. Returns both.
pub fn sleeper_dir(prefix: &str) -> anyhow::Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")?;
    let wl = dir.path().join("workloads");
    std::fs::create_dir_all(wl.join("s"))?;
    std::fs::write(
        wl.join("s").join("manifest.yaml"),
        "name: s\ncommand: [/bin/sleep, \"1000000\"]\nisolation: session\nshutdown: {grace: 2s}\n",
    )?;
    Ok((dir, wl))
}

/// Launches sessions `from..to` of workload `s`, 16 at a time.
pub async fn launch_range(c: &Client, from: usize, to: usize) -> anyhow::Result<()> {
    let mut next = from;
    let mut running = tokio::task::JoinSet::new();
    while next < to || !running.is_empty() {
        while next < to && running.len() < 16 {
            running.spawn(launch_one(c.clone(), next));
            next += 1;
        }
        if let Some(r) = running.join_next().await {
            r??;
        }
    }
    Ok(())
}
