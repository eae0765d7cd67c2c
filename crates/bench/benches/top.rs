//! `cargo bench -p bulkhead-bench --bench top`: what `bulkhead top` costs while the
//! instances it shows are idle (issue #17).
//!
//! The real daemon (default configuration) with N idle `sleep` instances (default 1,000;
//! `--instances N`); `bulkhead top` runs in a real terminal (a tmux session, 120x40, the
//! default `--interval 2s`). Over `--seconds S` (default 20) each, in one run:
//!
//! - the daemon's (and keeper's) CPU without `top`: the baseline;
//! - the daemon's CPU with `top` running, and `top`'s own CPU.
//!
//! Idle must cost almost nothing: `top` follows the event stream and reads the usage of
//! the rows on screen only, so neither figure should grow with N.
//! Options: `--write PATH` (also write the markdown table). Needs tmux.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use bulkhead_bench::daemon::{bulkhead_binary, launch_range, sleeper_dir, usage, Daemon};
use bulkhead_bench::flag;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = flag(&args, "--instances")
        .unwrap_or_else(|| "1000".into())
        .parse()?;
    let secs: u64 = flag(&args, "--seconds")
        .unwrap_or_else(|| "20".into())
        .parse()?;
    let write: Option<PathBuf> = flag(&args, "--write").map(PathBuf::from);
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("skipped: tmux is missing (apt-get install tmux)");
        return Ok(());
    }
    let bin = bulkhead_binary()?;
    let (dir, wl) = sleeper_dir("bulkhead-top")?;
    let socket = dir.path().join("api.sock");
    let mut daemon = Daemon::start(&bin, &wl, &dir.path().join("state"), &socket, &[])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let c = bulkhead_api::connect(&socket).await?;
        eprintln!("launching {n} instances");
        launch_range(&c, 0, n).await
    })?;
    std::thread::sleep(Duration::from_secs(3));
    let pids = daemon.pids();
    let cpu = |pids: &[u32], secs: u64| {
        let a = usage(pids).1;
        std::thread::sleep(Duration::from_secs(secs));
        (usage(pids).1 - a) / secs as f64 * 100.0
    };
    eprintln!("{secs} s without top");
    let base = cpu(&pids, secs);

    let server = format!("bulkhead-top-bench-{}", std::process::id());
    let tmux = |a: &[&str]| Command::new("tmux").args(["-L", &server]).args(a).output();
    let top = format!("{} --socket {} top", bin.display(), socket.display());
    let st = tmux(&[
        "-f",
        "/dev/null",
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "120",
        "-y",
        "40",
        &top,
    ])?;
    anyhow::ensure!(st.status.success(), "tmux new-session failed");
    let pane: u32 =
        String::from_utf8_lossy(&tmux(&["display", "-p", "-t", "top", "#{pane_pid}"])?.stdout)
            .trim()
            .parse()?;
    // Its start (one listing of every instance) is not idle: let it pass.
    std::thread::sleep(Duration::from_secs(3));
    eprintln!("{secs} s with top");
    let t0 = usage(&[pane]).1;
    let with = cpu(&pids, secs);
    let top_cpu = (usage(&[pane]).1 - t0) / secs as f64 * 100.0;
    let _ = tmux(&["kill-server"]);
    daemon.stop();

    let table = format!(
        "| idle instances | daemon CPU without top | daemon CPU with top | top's CPU |\n\
         |---|---|---|---|\n\
         | {n} | {base:.2} % | {with:.2} % | {top_cpu:.2} % |\n"
    );
    println!("\n`bulkhead top` at idle, {n} instances, {secs} s each, % of one core:\n\n{table}");
    if let Some(p) = write {
        std::fs::write(p, table)?;
    }
    Ok(())
}
