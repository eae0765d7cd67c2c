//! `cargo bench -p bulkhead-bench --bench recovery`: recovery time for N running
//! instances (default 1000) after the daemon dies without shutting down.
//!
//! A daemon (in this process, on its own runtime, spawning through a keeper that is this
//! binary in `keeper` mode) launches N idle instances. Then the daemon "crashes": its
//! runtime is dropped and its state-directory lock released without any shutdown, which
//! is what the keeper sees after a `kill -9` (its connection closes; the instances keep
//! running). A new daemon starts on the same state directory; measured: from the start
//! call until it has adopted every instance and serves the API. For scale, the same run
//! reports how long the N launches took. Options: `--instances N`, `--write PATH`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bulkhead_api::v1;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    match args.get(1).map(String::as_str) {
        Some("keeper") => {
            let state = flag("--state").ok_or_else(|| anyhow::anyhow!("keeper: --state"))?;
            bulkhead_driver::keeper::server::run(std::path::Path::new(&state), 0)?;
            return Ok(());
        }
        Some("idle-child") => loop {
            // SAFETY: pause(2) has no preconditions.
            unsafe {
                libc::pause();
            }
        },
        _ => {}
    }
    let n: usize = flag("--instances")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1000);
    let write = flag("--write").map(PathBuf::from);
    let exe = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    let wl = dir.path().join("workloads");
    std::fs::create_dir_all(wl.join("idle"))?;
    std::fs::write(
        wl.join("idle").join("manifest.yaml"),
        format!(
            "name: idle\ncommand: [{}, idle-child]\nisolation: session\nshutdown: {{grace: 2s}}\n",
            exe.display()
        ),
    )?;
    let config = || {
        let mut c = bulkhead_daemon::Config::new(wl.clone(), Some(dir.path().join("state")), None);
        c.keeper = Some(exe.clone());
        c
    };
    let socket = config().socket;

    // 1. Launch N instances through the first daemon.
    let rt1 = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let daemon1 = rt1.block_on(bulkhead_daemon::Daemon::start(config()))?;
    eprintln!("launching {n} instances");
    let launch_time = rt1.block_on(async {
        let c = bulkhead_api::connect(&socket).await?;
        let t = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for chunk in (0..n).collect::<Vec<_>>().chunks(n.div_ceil(32).max(1)) {
            let mut c = c.clone();
            let chunk = chunk.to_vec();
            set.spawn(async move {
                for i in chunk {
                    c.launch(v1::LaunchRequest {
                        workload: "idle".into(),
                        session: Some(format!("s{i}")),
                        wait: v1::WaitFor::Ready as i32,
                        timeout_ms: 60_000,
                        ..Default::default()
                    })
                    .await?;
                }
                Ok::<_, tonic::Status>(())
            });
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
        Ok::<_, anyhow::Error>(t.elapsed())
    })?;

    // 2. The daemon dies without shutting anything down.
    drop(daemon1);
    drop(rt1);
    std::thread::sleep(Duration::from_millis(200));

    // 3. A new daemon adopts them all.
    let rt2 = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    eprintln!("restarting the daemon");
    let t = Instant::now();
    let daemon2 = rt2.block_on(bulkhead_daemon::Daemon::start(config()))?;
    let recovery = t.elapsed();
    let live = rt2.block_on(async {
        let mut c = bulkhead_api::connect(&socket).await?;
        Ok::<_, anyhow::Error>(
            c.health(v1::HealthRequest {})
                .await?
                .into_inner()
                .instances_live,
        )
    })?;
    rt2.block_on(daemon2.shutdown());
    anyhow::ensure!(live as usize == n, "adopted {live} of {n} instances");

    let report = format!(
        "| measurement ({n} instances) | total ms | per instance ms |\n|---|---|---|\n\
         | launch through the API (32 concurrent clients), until each is ready | {:.1} | {:.3} |\n\
         | daemon restart after a crash, until all are adopted and the API serves | {:.1} | {:.3} |\n\n\
         Recovery took {:.2}x the time of the launches.\n",
        launch_time.as_secs_f64() * 1000.0,
        launch_time.as_secs_f64() * 1000.0 / n as f64,
        recovery.as_secs_f64() * 1000.0,
        recovery.as_secs_f64() * 1000.0 / n as f64,
        recovery.as_secs_f64() / launch_time.as_secs_f64(),
    );
    println!("{report}");
    if let Some(p) = write {
        std::fs::write(p, &report)?;
    }
    Ok(())
}
