//! `cargo bench -p bulkhead-bench`: launch -> ready, reuse, kill -> event.
//!
//! Measured in one run, on one machine:
//! - **floor**: posix_spawn (std `Command`, no pre_exec) of this very binary in its
//!   `notify-child` mode + the same sd_notify handshake (a datagram socket bound before the
//!   spawn, waiting for `READY=1`), no daemon.
//! - **launch -> ready**: gRPC Launch(wait=ready) over the Unix socket of a real daemon
//!   for a notify workload running the same binary, one new session per iteration:
//!   spawned by the daemon itself (`--no-keeper`), and through the keeper (the default),
//!   which hands the launch to its spare slot; before each round the bench waits, outside
//!   the clock and without sleeping, until the spare is made again, and checks that every
//!   sample took it. `BH_SPARE=0` turns the spare off (the keeper line is then its cold
//!   spawn).
//! - **from a warm pool**: the same through the keeper, for the same workload with
//!   `warm: {size: 1}`; before each sample the bench waits, outside the clock and without
//!   sleeping, until the pool has its slot again, and checks that every sample took one. `BH_POOLED=0`
//!   leaves the pool out (no `warm:`, no such line).
//! - **reuse**: gRPC Launch of a key that is already running.
//! - **API round trip after idle**: gRPC Health after 2 ms with both sides idle, the state
//!   the launch's two gRPC legs are taken in (a program's start is that long).
//! - **kill -> event**: SIGKILL to an instance's pid until a Watch subscriber receives its
//!   `crashed` event.
//!
//! The daemon runs in this process on its own runtime; the client uses another one, so
//! they talk through the socket as separate processes would. Options:
//! `--iterations N` (default 200), `--write PATH` (also write the markdown report).

use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_api::v1;
use bulkhead_bench::{flag, ms, notify_child, ratio, terminate, Samples};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("notify-child") {
        notify_child();
    }
    if args.get(1).map(String::as_str) == Some("keeper") {
        // This binary is also the keeper program of the keeper-backed daemon below.
        let state = flag(&args, "--state").ok_or_else(|| anyhow::anyhow!("keeper: --state"))?;
        bulkhead_driver::keeper::server::run(std::path::Path::new(&state), 0)?;
        return Ok(());
    }
    let iterations: usize = flag(&args, "--iterations")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200);
    let write: Option<PathBuf> = flag(&args, "--write").map(PathBuf::from);
    let exe = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;

    let wl = dir.path().join("workloads");
    // `pooled`: the same workload with a warm pool (the keeper's slots; the daemon
    // without a keeper keeps none and never launches it). BH_POOLED=0 leaves it out, to
    // see what a waiting slot and its refills cost the other lines.
    let pooled = std::env::var("BH_POOLED").map_or(true, |v| v != "0");
    for (name, extra) in [
        ("notify", ""),
        ("victim", ""),
        ("pooled", if pooled { "warm: {size: 1}\n" } else { "" }),
    ] {
        std::fs::create_dir_all(wl.join(name))?;
        std::fs::write(
            wl.join(name).join("manifest.yaml"),
            format!(
                "name: {name}\ncommand: [{}, notify-child]\nisolation: session\nreadiness: {{notify: true, timeout: 30s}}\nshutdown: {{grace: 2s}}\n{extra}",
                exe.display()
            ),
        )?;
    }
    let daemon_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            std::env::var("BH_WORKERS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(2),
        )
        .enable_all()
        .build()?;
    let mut cfg = bulkhead_daemon::Config::new(wl.clone(), Some(dir.path().join("state")), None);
    // BH_EVENTS=memory|normal|full (default: the daemon's default) to compare durability.
    let events_mode = std::env::var("BH_EVENTS").unwrap_or_default();
    match events_mode.as_str() {
        "memory" => cfg.durable_events = false,
        "normal" => cfg.event_sync = bulkhead_daemon::store::Synchronous::Normal,
        "full" => cfg.event_sync = bulkhead_daemon::store::Synchronous::Full,
        _ => {}
    }
    let socket = cfg.socket.clone();
    let (durable, sync) = (cfg.durable_events, cfg.event_sync);
    let daemon = daemon_rt.block_on(bulkhead_daemon::Daemon::start(cfg))?;
    // The same daemon, spawning through a keeper (what `bulkhead serve` does by default).
    let mut kcfg = bulkhead_daemon::Config::new(wl, Some(dir.path().join("kstate")), None);
    kcfg.durable_events = durable;
    kcfg.event_sync = sync;
    kcfg.keeper = Some(exe.clone());
    // BH_SPARE=0: the keeper keeps no spare slot (`--no-process-spare`), so the keeper
    // line is its cold spawn.
    let spare = std::env::var("BH_SPARE").map_or(true, |v| v != "0");
    kcfg.process_spare = spare;
    let ksocket = kcfg.socket.clone();
    let kdaemon = daemon_rt.block_on(bulkhead_daemon::Daemon::start(kcfg))?;

    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let floor_dir = dir.path().to_owned();
    let (floor, launch, klaunch, plaunch, reuse, idle, kill) = client_rt.block_on(async {
        let mut c = bulkhead_api::connect(&socket).await?;
        let mut kc = bulkhead_api::connect(&ksocket).await?;
        for i in 0..5 {
            launch_ready(&mut kc, "notify", &format!("warm{i}")).await?;
            terminate(&mut kc, &format!("session:warm{i}:notify")).await?;
            if pooled {
                bulkhead_bench::wait_for_slot(&mut kc, "pooled").await?;
                launch_ready(&mut kc, "pooled", &format!("warm{i}")).await?;
                terminate(&mut kc, &format!("session:warm{i}:pooled")).await?;
            }
        }
        let hits_before = bulkhead_bench::warm_launches(&kdaemon, "pooled").0;
        let spare_before = spare_taken(&kdaemon);
        // Warm up: the first launches pay for page faults in both processes.
        for i in 0..5 {
            launch_ready(&mut c, "notify", &format!("warm{i}")).await?;
            terminate(&mut c, &format!("session:warm{i}:notify")).await?;
        }
        eprintln!(
            "launch -> ready through the API, interleaved with the floor, {iterations} iterations"
        );
        let mut floor = Samples::new("floor: posix_spawn + sd_notify handshake, no daemon");
        let mut launch = Samples::new("API launch -> ready (notify workload)");
        let mut klaunch = Samples::new(if spare {
            "API launch -> ready through the keeper, the default (its spare slot)"
        } else {
            "API launch -> ready through the keeper, cold (`--no-process-spare`)"
        });
        let mut plaunch = Samples::new(
            "API launch -> ready from a warm pool (`warm: {size: 1}`, the keeper's slot)",
        );
        for i in 0..iterations {
            if pooled {
                // Not timed: the pool has its slot again (made while no launch of its
                // daemon runs, from 20 ms after the last), waited for without sleeping:
                // after milliseconds of idle the next line would pay for waking halted
                // CPUs (see the idle `Health` line). The slot is then made before the
                // round's other lines run, as a pool's slots are made ahead of launches,
                // and no refill runs while a line is timed.
                slot_ready_busy(&mut kc, "pooled").await?;
            }
            if spare {
                // Likewise the keeper's spare (made again once no spawn of its daemon
                // has run for 20 ms).
                spare_ready_busy(&mut kc, &kdaemon).await?;
            }
            // Interleaved so that all see the same machine state. The floor is taken
            // after the cold launches, right before the pooled one: taken right after
            // the wait for the slot it measured 0.3-0.8 ms slower than in a run without
            // a pool (docs/benchmarks.md), which flattered every ratio.
            let t = Instant::now();
            launch_ready(&mut c, "notify", &format!("s{i}")).await?;
            launch.values.push(t.elapsed());
            terminate(&mut c, &format!("session:s{i}:notify")).await?;
            let t = Instant::now();
            launch_ready(&mut kc, "notify", &format!("s{i}")).await?;
            klaunch.values.push(t.elapsed());
            terminate(&mut kc, &format!("session:s{i}:notify")).await?;
            floor.values.push(floor_once(&exe, &floor_dir, i)?);
            if pooled {
                let t = Instant::now();
                launch_ready(&mut kc, "pooled", &format!("s{i}")).await?;
                plaunch.values.push(t.elapsed());
                terminate(&mut kc, &format!("session:s{i}:pooled")).await?;
            }
        }
        let hits = bulkhead_bench::warm_launches(&kdaemon, "pooled").0 - hits_before;
        let spared = spare_taken(&kdaemon) - spare_before;
        anyhow::ensure!(
            !spare || spared == klaunch.values.len() as u64,
            "only {spared} of {iterations} launches through the keeper took its spare"
        );
        anyhow::ensure!(
            hits == plaunch.values.len() as u64,
            "only {hits} of {iterations} pooled launches took a slot"
        );
        eprintln!(
            "reuse launch of a running key, {} iterations",
            iterations * 5
        );
        launch_ready(&mut c, "notify", "reuse").await?;
        let mut reuse = Samples::new("API reuse launch of a running key");
        for _ in 0..iterations * 5 {
            let t = Instant::now();
            let r = launch_ready(&mut c, "notify", "reuse").await?;
            reuse.values.push(t.elapsed());
            anyhow::ensure!(!r.created, "reuse created a new instance");
        }
        // The API's own round trip when both sides have been idle for as long as a
        // program's start (the launch's two gRPC legs are taken in that state).
        let mut idle = Samples::new("API round trip (Health) after 2 ms idle");
        for _ in 0..iterations {
            std::thread::sleep(Duration::from_millis(2));
            let t = Instant::now();
            c.health(v1::HealthRequest {}).await?;
            idle.values.push(t.elapsed());
        }
        eprintln!("kill -> crashed event at a Watch subscriber, {iterations} iterations");
        let mut kill = Samples::new("kill -> `crashed` event at a Watch subscriber");
        let since = c
            .health(v1::HealthRequest {})
            .await?
            .into_inner()
            .last_event_id;
        let mut watch = c
            .watch(v1::WatchRequest {
                since_id: since,
                history_only: false,
            })
            .await?
            .into_inner();
        for i in 0..iterations {
            let session = format!("k{i}");
            let inst = launch_ready(&mut c, "victim", &session)
                .await?
                .instance
                .unwrap();
            let pid = inst.pid.unwrap() as i32;
            let t = Instant::now();
            // SAFETY: kill(2) on the pid the daemon reported for its live instance.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            loop {
                let e = watch
                    .message()
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("watch ended"))?;
                if e.kind == "crashed" && e.instance == inst.id {
                    kill.values.push(t.elapsed());
                    break;
                }
            }
        }
        Ok::<_, anyhow::Error>((floor, launch, klaunch, plaunch, reuse, idle, kill))
    })?;
    daemon_rt.block_on(daemon.shutdown());
    daemon_rt.block_on(kdaemon.shutdown());

    let mut report = String::new();
    report.push_str(&format!(
        "| measurement | p50 ms | p99 ms | p50 vs floor | p99 vs floor |\n|---|---|---|---|---|\n| {} | {} | {} | 1.00x | 1.00x |\n",
        floor.name,
        ms(floor.p50()),
        ms(floor.p99())
    ));
    for l in [&launch, &klaunch, &plaunch] {
        if l.values.is_empty() {
            continue;
        }
        report.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            l.name,
            ms(l.p50()),
            ms(l.p99()),
            ratio(l.p50(), floor.p50()),
            ratio(l.p99(), floor.p99())
        ));
    }
    for s in [&reuse, &idle, &kill] {
        report.push_str(&format!(
            "| {} | {} | {} | - | - |\n",
            s.name,
            ms(s.p50()),
            ms(s.p99())
        ));
    }
    report.push_str(&format!(
        "\nThrough the keeper{}: {} of the direct spawn at p50.",
        if spare {
            ", from its spare (every launch took it)"
        } else {
            ", cold"
        },
        ratio(klaunch.p50(), launch.p50()),
    ));
    if !plaunch.values.is_empty() {
        report.push_str(&format!(
            " A launch from the workload's warm slot is {} of the keeper line \
             (every one of {} took a slot).",
            ratio(plaunch.p50(), klaunch.p50()),
            plaunch.values.len()
        ));
    }
    report.push('\n');
    report.push_str(&format!(
        "\nTargets: launch -> ready through the keeper (the default) p50 <= 1.3x floor (measured {}), reuse p99 <= 0.2 ms (measured {} ms), kill -> event p99 <= 1 ms (measured {} ms). {iterations} iterations ({} for reuse).\n",
        ratio(klaunch.p50(), floor.p50()),
        ms(reuse.p99()),
        ms(kill.p99()),
        iterations * 5
    ));
    println!("{report}");
    if let Some(path) = write {
        std::fs::write(&path, &report)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Waits until `workload`'s pool has a ready slot, asking `health` back to back.
async fn slot_ready_busy(
    c: &mut bulkhead_api::BulkheadClient<tonic::transport::Channel>,
    workload: &str,
) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let h = c.health(v1::HealthRequest {}).await?.into_inner();
        if h.warm.iter().any(|w| w.workload == workload && w.ready > 0) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < until,
            "the warm pool of {workload} stays empty"
        );
    }
}

/// Launches that took the keeper's spare so far.
fn spare_taken(d: &bulkhead_daemon::Daemon) -> u64 {
    d.shared().process_spare().map_or(0, |s| s.taken)
}

/// Waits, as [`slot_ready_busy`] does, until the keeper's spare is made again.
async fn spare_ready_busy(
    c: &mut bulkhead_api::BulkheadClient<tonic::transport::Channel>,
    d: &bulkhead_daemon::Daemon,
) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(30);
    while !d.shared().process_spare_ready() {
        c.health(v1::HealthRequest {}).await?;
        anyhow::ensure!(Instant::now() < until, "the keeper's spare is not made");
    }
    Ok(())
}

/// One floor sample: bind, posix_spawn, wait for READY=1. No daemon involved.
fn floor_once(exe: &Path, dir: &Path, i: usize) -> anyhow::Result<Duration> {
    let path = dir.join(format!("floor-{i}.sock"));
    let t = Instant::now();
    let sock = UnixDatagram::bind(&path)?;
    let mut child = Command::new(exe)
        .arg("notify-child")
        .env_clear()
        .env("NOTIFY_SOCKET", &path)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut buf = [0u8; 64];
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    let n_read = sock.recv(&mut buf)?;
    let took = t.elapsed();
    anyhow::ensure!(&buf[..n_read] == b"READY=1", "unexpected handshake");
    child.kill()?;
    child.wait()?;
    let _ = std::fs::remove_file(&path);
    Ok(took)
}

async fn launch_ready(
    c: &mut bulkhead_api::BulkheadClient<tonic::transport::Channel>,
    workload: &str,
    session: &str,
) -> anyhow::Result<v1::LaunchResponse> {
    Ok(c.launch(v1::LaunchRequest {
        workload: workload.into(),
        namespace: None,
        session: Some(session.into()),
        wait: v1::WaitFor::Ready as i32,
        timeout_ms: 30_000,
        lease: None,
    })
    .await?
    .into_inner())
}
