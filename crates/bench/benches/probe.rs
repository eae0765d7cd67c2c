//! `cargo bench -p bulkhead-bench --bench probe`: what an exec probe (or a `bulkhead exec`
//! on the host) costs the daemon as the daemon grows.
//!
//! This process touches N MiB of heap (a daemon's memory), then spawns `/bin/true` and
//! reaps it, three ways: `posix_spawn` (the floor: what `Command` does without a hook),
//! `Command` with a `pre_exec` hook (a fork: how the daemon spawned probes and host
//! `exec` commands before `reaper::spawn_command`), and `reaper::spawn_command` (a
//! `clone3` sharing the memory until the exec, as the process driver spawns). After each
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
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::PosixSpawn => "posix_spawn (floor)",
            Way::Fork => "Command + pre_exec hook (fork, before)",
            Way::CloneVm => "reaper::spawn_command (clone3, CLONE_VM)",
        }
    }
}

/// One spawn of `/bin/true`, reaped; then one rewrite of `mem`.
async fn once(way: Way, mem: &mut [u8]) -> anyhow::Result<(Duration, Duration)> {
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
        Way::CloneVm => Some(
            reaper::spawn_command(CommandSpec {
                argv: &argv,
                env: &env,
                cwd: std::path::Path::new("/"),
                setup: None,
                inside: None,
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
    let ways = [Way::PosixSpawn, Way::Fork, Way::CloneVm];
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
                let (s, r) = rt.block_on(once(way, &mut mem))?;
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
    println!("{report}");
    if let Some(path) = flag("--write") {
        std::fs::write(path, &report)?;
    }
    Ok(())
}
