//! `cargo bench -p bulkhead-bench --bench probe`: what an exec probe (or a `bulkhead exec`
//! on the host) costs the daemon as the daemon grows.
//!
//! This process touches N MiB of heap (a daemon's memory), then spawns `/bin/true` and
//! reaps it: `posix_spawn` (the floor: what `Command` does without a hook), `Command`
//! with a `pre_exec` hook (a fork: how the daemon spawned probes and host `exec`
//! commands before `reaper::spawn_command`), `reaper::spawn_command` (a `clone3` sharing
//! the memory until the exec, as the process driver spawns), and the same into an
//! instance's mount and PID namespaces (a `sleep` under `unshare`; the relay and the
//! command, as `bulkhead exec` into a sandbox; before, that was two forks). After each
//! spawn the process rewrites its heap, as a daemon goes on working: after a fork every
//! page it writes faults once (the fork write-protected them all), so that time is
//! measured too. Each sample is one spawn (timed to the child's reaping) and one rewrite.
//!
//! Options: `--iterations N` (default 200), `--write PATH` (also write the markdown).

use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use bulkhead_bench::{ms, ratio, Samples};
use bulkhead_driver::reaper::{self, CommandIo, CommandSpec};

#[derive(Clone, Copy, PartialEq)]
enum Way {
    PosixSpawn,
    Fork,
    CloneVm,
    Inside,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::PosixSpawn => "posix_spawn (floor)",
            Way::Fork => "Command + pre_exec hook (fork, before)",
            Way::CloneVm => "reaper::spawn_command (clone3, CLONE_VM)",
            Way::Inside => "reaper::spawn_command inside mount + PID namespaces (relay)",
        }
    }
}

/// One spawn of `/bin/true`, reaped; then one rewrite of `mem`. `inside`: the instance
/// [`Way::Inside`] enters.
async fn once(
    way: Way,
    mem: &mut [u8],
    inside: Option<&bulkhead_driver::ExecTarget>,
) -> anyhow::Result<(Duration, Duration)> {
    let argv = vec!["/bin/true".to_string()];
    let env = vec![("PATH".to_string(), "/usr/bin:/bin".to_string())];
    let t = Instant::now();
    let status = match way {
        Way::PosixSpawn => {
            let st = std::process::Command::new("/bin/true")
                .env_clear()
                .status()?;
            anyhow::ensure!(st.success(), "/bin/true: {st}");
            None
        }
        Way::Fork => {
            let mut cmd = std::process::Command::new("/bin/true");
            cmd.env_clear()
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            // SAFETY: an empty hook: it only makes `Command` fork, as a probe with a
            // hook did.
            unsafe { cmd.pre_exec(|| Ok(())) };
            Some(reaper::spawn(&mut cmd)?.child.wait().await?)
        }
        Way::CloneVm | Way::Inside => Some(
            reaper::spawn_command(CommandSpec {
                argv: &argv,
                env: &env,
                cwd: std::path::Path::new("/"),
                setup: None,
                inside: if way == Way::Inside { inside } else { None },
                io: CommandIo::Null,
            })?
            .child
            .wait()
            .await?,
        ),
    };
    let spawn = t.elapsed();
    if let Some(st) = status {
        anyhow::ensure!(
            matches!(st, bulkhead_core::event::ExitStatus::Exited { code: 0 }),
            "/bin/true: {st}"
        );
    }
    let t = Instant::now();
    for b in mem.iter_mut().step_by(4096) {
        *b = b.wrapping_add(1);
    }
    Ok((spawn, t.elapsed()))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| bulkhead_bench::flag(&args, name);
    let iterations: usize = flag("--iterations")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The instance `Inside` enters: a sleep in new mount and PID namespaces.
    let mut instance = std::process::Command::new("unshare")
        .args([
            "--mount",
            "--pid",
            "--fork",
            "--kill-child",
            "sleep",
            "100000",
        ])
        .spawn();
    let target = match &instance {
        Ok(inst) => Some(instance_target(inst.id())?),
        Err(e) => {
            println!("the line inside namespaces is skipped: unshare: {e}");
            None
        }
    };
    let mut ways = vec![Way::PosixSpawn, Way::Fork, Way::CloneVm];
    if target.is_some() {
        ways.push(Way::Inside);
    }
    let mut report = format!(
        "{iterations} samples each (the three ways alternated)\n\n\
         | heap | way | spawn -> reaped p50 / p99 ms | vs floor | heap rewrite after it p50 ms |\n\
         |---|---|---|---|---|\n"
    );
    for mib in [4usize, 64, 256] {
        let mut mem = vec![1u8; mib << 20];
        let mut spawn: Vec<Samples> = ways.iter().map(|w| Samples::new(w.name())).collect();
        let mut rewrite: Vec<Samples> = ways.iter().map(|w| Samples::new(w.name())).collect();
        for _ in 0..iterations {
            for (i, &way) in ways.iter().enumerate() {
                let (s, r) = rt.block_on(once(way, &mut mem, target.as_ref()))?;
                spawn[i].values.push(s);
                rewrite[i].values.push(r);
            }
        }
        std::hint::black_box(&mem);
        let floor = spawn[0].p50();
        for (i, way) in ways.iter().enumerate() {
            report.push_str(&format!(
                "| {mib} MiB | {} | {} / {} | {} | {} |\n",
                way.name(),
                ms(spawn[i].p50()),
                ms(spawn[i].p99()),
                ratio(spawn[i].p50(), floor),
                ms(rewrite[i].p50()),
            ));
        }
    }
    if let Ok(inst) = &mut instance {
        let _ = inst.kill();
        let _ = inst.wait();
    }
    println!("{report}");
    if let Some(path) = flag("--write") {
        std::fs::write(path, &report)?;
    }
    Ok(())
}

/// The first child of `unshare` (PID 1 of its namespaces) as a target to enter.
fn instance_target(unshare: u32) -> anyhow::Result<bulkhead_driver::ExecTarget> {
    let start = Instant::now();
    let pid = loop {
        let found = std::fs::read_dir("/proc")?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            (bulkhead_driver::sys::read_stat(pid).ok()?.ppid == unshare).then_some(pid)
        });
        if let Some(pid) = found {
            break pid;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(30),
            "unshare never forked"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(bulkhead_driver::ExecTarget {
        pidfd: std::sync::Arc::new(bulkhead_driver::sys::pidfd_open(pid)?),
        namespaces: libc::CLONE_NEWNS | libc::CLONE_NEWPID,
        cgroup_procs: Vec::new(),
        restrict: bulkhead_driver::restrict::Restrictions::default(),
    })
}
