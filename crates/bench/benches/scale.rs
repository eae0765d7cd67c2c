//! `cargo bench -p bulkhead-bench --bench scale`: many instances at once.
//!
//! Measured in one run, on one machine:
//! - **1000 concurrent launches**: 1000 gRPC Launch(wait=ready) calls of distinct session
//!   keys in flight at once, until every one is ready, against the floor: 1000 raw
//!   `posix_spawn`s of the same notify workload until 1000 `READY=1` have arrived on one
//!   socket.
//! - **idle cost**: the daemon's resident memory per instance and its CPU use over 10 s
//!   while the 1000 instances idle (the daemon runs in this process; the client is idle
//!   during the window, so the process's CPU time is the daemon's).
//! - **100 parallel launches of distinct keys** until all are ready, against one launch
//!   alone: different keys never wait on each other, so 100 take far less than 100 times
//!   one on 2 cores.
//!
//! Options: `--instances N` (default 1000), `--write PATH` (also write the markdown report).

use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_api::v1;
use bulkhead_bench::{flag, ms, notify_child, ratio, Samples};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("notify-child") {
        notify_child();
    }
    let n: usize = flag(&args, "--instances")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1000);
    let write: Option<PathBuf> = flag(&args, "--write").map(PathBuf::from);
    bulkhead_driver::sys::raise_nofile_limit();
    let exe = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    let wl = dir.path().join("workloads");
    std::fs::create_dir_all(wl.join("notify"))?;
    std::fs::write(
        wl.join("notify").join("manifest.yaml"),
        format!(
            "name: notify\ncommand: [{}, notify-child]\nisolation: session\nreadiness: {{notify: true, timeout: 120s}}\nshutdown: {{grace: 5s}}\n",
            exe.display()
        ),
    )?;

    // The floor first, with no daemon running.
    eprintln!("floor: {n} raw spawns until {n} READY=1");
    let floor = raw_spawn_all(&exe, &dir.path().join("floor.sock"), n)?;

    let daemon_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let cfg = bulkhead_daemon::Config::new(wl, Some(dir.path().join("state")), None);
    let socket = cfg.socket.clone();
    let daemon = daemon_rt.block_on(bulkhead_daemon::Daemon::start(cfg))?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let report = client_rt.block_on(async {
        let c = bulkhead_api::connect(&socket).await?;
        // Warm-up.
        for i in 0..5 {
            launch(c.clone(), format!("warm{i}")).await?;
        }
        let rss0 = rss_kib();
        eprintln!("{n} concurrent launches until all are ready");
        let t = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|i| tokio::spawn(launch(c.clone(), format!("s{i}"))))
            .collect();
        for task in tasks {
            task.await??;
        }
        let all = t.elapsed();
        let rss1 = rss_kib();
        eprintln!("idle window: 10 s with {n} instances");
        let cpu0 = cpu_seconds();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let idle_cpu = cpu_seconds() - cpu0;
        // Tear down (not timed).
        let mut c2 = c.clone();
        for i in 0..n {
            c2.terminate(v1::TerminateRequest {
                id: format!("session:s{i}:notify"),
                grace_ms: None,
                with_dependencies: false,
            })
            .await?;
        }

        eprintln!("one launch alone vs 100 in parallel, 10 rounds");
        let mut one = Samples::new("one launch -> ready");
        let mut hundred = Samples::new("100 parallel launches of distinct keys -> all ready");
        let mut raw100 = Samples::new("floor: 100 raw posix_spawns until all sent READY=1");
        for round in 0..10 {
            raw100.values.push(raw_spawn_all(&exe, &dir.path().join(format!("raw{round}.sock")), 100)?);
            let t = Instant::now();
            launch(c.clone(), format!("one{round}")).await?;
            one.values.push(t.elapsed());
            let t = Instant::now();
            let tasks: Vec<_> = (0..100)
                .map(|i| tokio::spawn(launch(c.clone(), format!("p{round}-{i}"))))
                .collect();
            for task in tasks {
                task.await??;
            }
            hundred.values.push(t.elapsed());
            for i in 0..100 {
                c2.terminate(v1::TerminateRequest {
                    id: format!("session:p{round}-{i}:notify"),
                    grace_ms: None,
                    with_dependencies: false,
                })
                .await?;
            }
        }
        let mut r = String::new();
        r.push_str(&format!(
            "| measurement | p50 ms | p99 ms | p50 vs baseline | p99 vs baseline |\n|---|---|---|---|---|\n| floor: {n} raw posix_spawns until all sent READY=1 | {} | {} | 1.00x | 1.00x |\n| {n} concurrent API launches until all are ready | {} | {} | {} | {} |\n",
            ms(floor), ms(floor), ms(all), ms(all), ratio(all, floor), ratio(all, floor)
        ));
        r.push_str(&format!(
            "| {} | {} | {} | 1.00x | 1.00x |\n| {} | {} | {} | {} | {} |\n| {} | {} | {} | {} | {} |\n",
            raw100.name,
            ms(raw100.p50()),
            ms(raw100.p99()),
            hundred.name,
            ms(hundred.p50()),
            ms(hundred.p99()),
            ratio(hundred.p50(), raw100.p50()),
            ratio(hundred.p99(), raw100.p99()),
            one.name,
            ms(one.p50()),
            ms(one.p99()),
            ratio(one.p50(), raw100.p50()),
            ratio(one.p99(), raw100.p99()),
        ));
        let per_instance = (rss1.saturating_sub(rss0)) as f64 / n as f64;
        r.push_str(&format!(
            "\nWith {n} instances idle: the daemon's resident memory grew by {:.1} MiB ({per_instance:.1} KiB per instance) and it used {:.3} s of CPU in 10 s ({:.2}% of one core). 100 parallel launches took {} one launch alone (a daemon that served them one by one would take about 100x; the raw spawns alone take {}).\n",
            (rss1.saturating_sub(rss0)) as f64 / 1024.0,
            idle_cpu,
            idle_cpu * 10.0,
            ratio(hundred.p50(), one.p50()),
            ratio(raw100.p50(), one.p50()),
        ));
        Ok::<_, anyhow::Error>(r)
    })?;
    daemon_rt.block_on(daemon.shutdown());
    println!("{report}");
    if let Some(path) = write {
        std::fs::write(&path, &report)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

async fn launch(
    mut c: bulkhead_api::BulkheadClient<tonic::transport::Channel>,
    session: String,
) -> anyhow::Result<()> {
    c.launch(v1::LaunchRequest {
        workload: "notify".into(),
        session: Some(session),
        wait: v1::WaitFor::Ready as i32,
        timeout_ms: 120_000,
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// Spawns `n` notify children sharing one socket; returns the time until all are ready.
fn raw_spawn_all(
    exe: &std::path::Path,
    path: &std::path::Path,
    n: usize,
) -> anyhow::Result<Duration> {
    let sock = UnixDatagram::bind(path)?;
    sock.set_read_timeout(Some(Duration::from_secs(60)))?;
    let t = Instant::now();
    let mut kids: Vec<Child> = Vec::with_capacity(n);
    for _ in 0..n {
        kids.push(
            Command::new(exe)
                .arg("notify-child")
                .env_clear()
                .env("NOTIFY_SOCKET", path)
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?,
        );
    }
    let mut buf = [0u8; 64];
    for _ in 0..n {
        let got = sock.recv(&mut buf)?;
        anyhow::ensure!(&buf[..got] == b"READY=1", "unexpected handshake");
    }
    let took = t.elapsed();
    for k in &mut kids {
        let _ = k.kill();
    }
    for mut k in kids {
        let _ = k.wait();
    }
    Ok(took)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    unsafe {
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
