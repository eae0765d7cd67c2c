//! `cargo bench -p bulkhead-bench --bench durability`: what the durable event log costs.
//!
//! Measured in one run, on one machine, against the in-memory log as the baseline:
//! - **throughput**: `P` tokio tasks (default 8) each publish `N` events (default 1000),
//!   awaiting `wait_durable` after every one, as instance actors do. Events per second for
//!   the in-memory log, the SQLite log with `synchronous=FULL` (the daemon's setting) and
//!   with `synchronous=NORMAL`. Rounds are interleaved; the median round is reported.
//! - **publish -> durable latency**: one publisher alone, `publish` then `wait_durable`
//!   (one commit each: the fsync floor).
//! - **beside the instance table**: the same, `synchronous=NORMAL`, while the instance
//!   table's writer (its own connection to the same database, as in the daemon) stores a
//!   3 KiB row every 200 µs: the two writers take turns at SQLite's write lock.
//! - **launch -> ready**: gRPC `Launch(wait=ready)` of a `/bin/sleep` workload (no
//!   readiness section) on three in-process daemons: in-memory events, durable with
//!   `synchronous=FULL`, durable with `NORMAL`; interleaved, the instance terminated after
//!   each sample outside the timing.
//!
//! Options: `--publishers P`, `--events N`, `--rounds R` (default 5), `--iterations I`
//! (launches, default 200), `--write PATH` (also write the markdown report).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_api::v1;
use bulkhead_bench::{flag, ms, ratio, Samples};
use bulkhead_core::event::EventKind;
use bulkhead_core::key::InstanceId;
use bulkhead_daemon::events::EventLog;
use bulkhead_daemon::store::Synchronous;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Memory,
    Full,
    Normal,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Memory => "in-memory log (baseline)",
            Kind::Full => "SQLite, WAL, synchronous=FULL",
            Kind::Normal => "SQLite, WAL, synchronous=NORMAL (default)",
        }
    }

    fn open(self, dir: &Path, round: usize) -> anyhow::Result<EventLog> {
        let path = dir.join(format!("events-{round}.db"));
        Ok(match self {
            Kind::Memory => EventLog::new(),
            Kind::Full => EventLog::open_with(&path, 100_000, Synchronous::Full)?,
            Kind::Normal => EventLog::open_with(&path, 100_000, Synchronous::Normal)?,
        })
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let num = |name: &str, default: usize| -> anyhow::Result<usize> {
        Ok(flag(&args, name)
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(default))
    };
    let publishers = num("--publishers", 8)?;
    let per = num("--events", 1000)?;
    let rounds = num("--rounds", 5)?;
    let iterations = num("--iterations", 200)?;
    let write = flag(&args, "--write");
    let dir = tempfile::tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let id = InstanceId::parse("shared:bench")?.0;

    let kinds = [Kind::Memory, Kind::Full, Kind::Normal];
    eprintln!("throughput: {publishers} publishers x {per} events, {rounds} rounds");
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    for round in 0..rounds {
        for (k, kind) in kinds.iter().enumerate() {
            let log = Arc::new(kind.open(dir.path(), round * kinds.len() + k)?);
            let took = rt.block_on(throughput(&log, &id, publishers, per))?;
            rates[k].push((publishers * per) as f64 / took.as_secs_f64());
        }
    }
    eprintln!("publish -> durable, one publisher, {iterations} samples");
    let mut latency = Vec::new();
    for (k, kind) in kinds.iter().enumerate() {
        let log = kind.open(dir.path(), 1000 + k)?;
        let mut s = Samples::new(kind.name());
        rt.block_on(async {
            for _ in 0..iterations {
                let t = Instant::now();
                let e = log.publish(&id, EventKind::Ready);
                log.wait_durable(e.id).await;
                s.values.push(t.elapsed());
            }
        });
        latency.push(s);
    }

    eprintln!("publish -> durable beside the instance table's writer, {iterations} samples");
    let beside = beside_the_table(&rt, dir.path(), &id, iterations * 5)?;
    latency.push(beside);

    eprintln!("launch -> ready with durable events on and off, {iterations} iterations");
    let launch = launches(dir.path(), iterations)?;
    let off = &launch[0];

    let mut report = String::new();
    report.push_str(&format!(
        "Throughput, {publishers} concurrent publishers x {per} events each, each awaiting `wait_durable`; median of {rounds} interleaved rounds:\n\n| log | events/s (median) | min | max | vs in-memory |\n|---|---|---|---|---|\n"
    ));
    let base = median(&rates[0]);
    for (k, kind) in kinds.iter().enumerate() {
        let r = &rates[k];
        report.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.3}x |\n",
            kind.name(),
            median(r),
            r.iter().cloned().fold(f64::INFINITY, f64::min),
            r.iter().cloned().fold(0.0, f64::max),
            median(r) / base
        ));
    }
    report.push_str(
        "\nOne publisher alone, `publish` -> `wait_durable` resolved:\n\n| log | p50 ms | p99 ms |\n|---|---|---|\n",
    );
    for s in &latency {
        report.push_str(&format!(
            "| {} | {} | {} |\n",
            s.name,
            ms(s.p50()),
            ms(s.p99())
        ));
    }
    report.push_str(&format!(
        "\nLaunch -> ready through the API (`/bin/sleep`, no readiness section), {iterations} interleaved iterations:\n\n| daemon | p50 ms | p99 ms | p50 vs in-memory | p99 vs in-memory |\n|---|---|---|---|---|\n"
    ));
    for s in &launch {
        report.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            s.name,
            ms(s.p50()),
            ms(s.p99()),
            ratio(s.p50(), off.p50()),
            ratio(s.p99(), off.p99())
        ));
    }
    println!("{report}");
    if let Some(path) = write {
        std::fs::write(&path, &report)?;
        eprintln!("wrote {path}");
    }
    Ok(())
}

async fn throughput(
    log: &Arc<EventLog>,
    id: &InstanceId,
    publishers: usize,
    per: usize,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..publishers {
        let log = log.clone();
        let id = id.clone();
        set.spawn(async move {
            for _ in 0..per {
                let e = log.publish(&id, EventKind::Ready);
                log.wait_durable(e.id).await;
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r?;
    }
    let took = t.elapsed();
    anyhow::ensure!(
        log.last_id() == (publishers * per) as u64,
        "not every event became visible"
    );
    Ok(took)
}

fn launches(dir: &Path, iterations: usize) -> anyhow::Result<[Samples; 3]> {
    let wl = dir.join("workloads");
    std::fs::create_dir_all(wl.join("sleeper"))?;
    std::fs::write(
        wl.join("sleeper").join("manifest.yaml"),
        "name: sleeper\ncommand: [/bin/sleep, '1000']\nisolation: session\nshutdown: {grace: 2s}\n",
    )?;
    let daemon_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut daemons = Vec::new();
    let mut sockets = Vec::new();
    for (name, durable, sync) in [
        ("on", true, Synchronous::Full),
        ("normal", true, Synchronous::Normal),
        ("off", false, Synchronous::Full),
    ] {
        let state = dir.join(format!("state-{name}"));
        let mut cfg = bulkhead_daemon::Config::new(wl.clone(), Some(state), None);
        cfg.durable_events = durable;
        cfg.event_sync = sync;
        sockets.push(cfg.socket.clone());
        daemons.push(daemon_rt.block_on(bulkhead_daemon::Daemon::start(cfg))?);
    }
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = client_rt.block_on(async {
        let mut on_c = bulkhead_api::connect(&sockets[0]).await?;
        let mut normal_c = bulkhead_api::connect(&sockets[1]).await?;
        let mut off_c = bulkhead_api::connect(&sockets[2]).await?;
        let mut on = Samples::new("durable events (SQLite, synchronous=FULL)");
        let mut normal = Samples::new("durable events (SQLite, synchronous=NORMAL, the default)");
        let mut off = Samples::new("in-memory events");
        for i in 0..iterations + 5 {
            for (c, s) in [
                (&mut on_c, &mut on),
                (&mut normal_c, &mut normal),
                (&mut off_c, &mut off),
            ] {
                let session = format!("s{i}");
                let t = Instant::now();
                c.launch(v1::LaunchRequest {
                    workload: "sleeper".into(),
                    namespace: None,
                    session: Some(session.clone()),
                    wait: v1::WaitFor::Ready as i32,
                    timeout_ms: 30_000,
                    lease: None,
                })
                .await?;
                // The first five are warm-up.
                if i >= 5 {
                    s.values.push(t.elapsed());
                }
                c.terminate(v1::TerminateRequest {
                    id: format!("session:{session}:sleeper"),
                    grace_ms: None,
                    with_dependencies: false,
                })
                .await?;
            }
        }
        Ok::<_, anyhow::Error>([off, normal, on])
    });
    for d in daemons {
        daemon_rt.block_on(d.shutdown());
    }
    result
}

/// `publish` -> `wait_durable` with the default log while the instance table writes.
fn beside_the_table(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    id: &InstanceId,
    samples: usize,
) -> anyhow::Result<Samples> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let path = dir.join("beside.db");
    let log = EventLog::open_with(&path, 100_000, Synchronous::Normal)?;
    let table = Arc::new(bulkhead_daemon::instances::InstanceTable::open(&path)?);
    let stop = Arc::new(AtomicBool::new(false));
    let putter = {
        let (table, stop) = (Arc::clone(&table), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                table.put(bulkhead_daemon::instances::InstanceRow {
                    id: format!("ns:t{}:w", i % 50),
                    spec: "x".repeat(3000),
                    dir: "/tmp".into(),
                    pid: Some(i),
                    start_time: Some(1),
                    state: "ready".into(),
                    restarts: i,
                    breaker: "closed".into(),
                    consecutive_failures: 0,
                    leases: Vec::new(),
                    updated_ms: 0,
                });
                i += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let mut s = Samples::new(format!(
        "{}, beside the instance table's writer",
        Kind::Normal.name()
    ));
    rt.block_on(async {
        for _ in 0..samples {
            let t = Instant::now();
            let e = log.publish(id, EventKind::Ready);
            log.wait_durable(e.id).await;
            s.values.push(t.elapsed());
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
    });
    stop.store(true, Ordering::Relaxed);
    let _ = putter.join();
    table.close();
    log.close();
    Ok(s)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
