//! Warm pools under a burst (issue #18): does a pool's refill take a launch's CPU?
//!
//! One daemon (in this process, default configuration: durable events), one sandbox
//! workload (the bench binary in `notify-child` mode, `isolation: session`, the sandbox
//! bench's limits). A burst is `--keys` new sessions launched with `wait: ready`,
//! `--concurrency` at a time; each launch is timed from the request to its answer.
//! Bursts alternate between the workload with `warm: {size: --size}` (pools refilling
//! during the burst) and the same manifest without `warm:` (a `reload` between them);
//! after each burst its instances are terminated and the pool is given time to refill
//! (not timed). The warm-pool hits and misses of every warm burst are read from the
//! daemon's metrics.
//!
//! ```sh
//! cargo bench -p bulkhead-bench --bench warm -- --rounds 3 --keys 100 --concurrency 4
//! ```
//!
//! `--process-spare`: the same bursts of a process workload through the keeper, with
//! and without the keeper's spare slot (two daemons, alternated).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_api::v1;
use bulkhead_bench::{flag, ms, ratio, Samples};
use tokio::sync::Semaphore;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("notify-child") {
        bulkhead_bench::notify_child();
    }
    let num = |name: &str, default: usize| -> anyhow::Result<usize> {
        Ok(flag(&args, name)
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(default))
    };
    let rounds = num("--rounds", 3)?;
    let keys = num("--keys", 100)?;
    let concurrency = num("--concurrency", 4)?.max(1);
    let size = num("--size", 4)?;
    if args.get(1).map(String::as_str) == Some("keeper") {
        let state = flag(&args, "--state").ok_or_else(|| anyhow::anyhow!("keeper: --state"))?;
        bulkhead_driver::keeper::server::run(std::path::Path::new(&state), 0)?;
        return Ok(());
    }
    if args.iter().any(|a| a == "--process-spare") {
        return process_spare(rounds, keys, concurrency);
    }
    if let Err(e) = bulkhead_sandbox::SandboxDriver::new(bulkhead_sandbox::SandboxConfig {
        scope: format!("bench-warm-probe-{}", std::process::id()),
        ..Default::default()
    }) {
        println!("skipped: the sandbox driver is unavailable here: {e}");
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    let wl = dir.path().join("workloads");
    std::fs::create_dir_all(wl.join("w"))?;
    let manifest = |warm: bool| {
        format!(
            "name: w\ndriver: sandbox\ncommand: [{}, notify-child]\n\
             readiness: {{notify: true, timeout: 30s}}\n\
             resources: {{memory: 256Mi, pids: 64, cpu: 1}}\nisolation: session\n{}",
            exe.display(),
            if warm {
                format!("warm: {{size: {size}}}\n")
            } else {
                String::new()
            }
        )
    };
    let write = |warm: bool| std::fs::write(wl.join("w").join("manifest.yaml"), manifest(warm));
    write(false)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let cfg = bulkhead_daemon::Config::new(wl.clone(), Some(dir.path().join("state")), None);
    let socket = cfg.socket.clone();
    let daemon = rt.block_on(bulkhead_daemon::Daemon::start(cfg))?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let client = client_rt.block_on(bulkhead_api::connect(&socket))?;

    let mut on = Samples::new(format!(
        "burst with warm: {{size: {size}}} (pool refilling)"
    ));
    let mut off = Samples::new("burst without warm:");
    let (mut hits, mut misses) = (0u64, 0u64);
    let mut seq = 0usize;
    for round in 0..rounds * 2 {
        let warm = round % 2 == 1;
        write(warm)?;
        client_rt.block_on(reload(client.clone()))?;
        // A full pool at the start of a warm burst, as after a quiet spell.
        std::thread::sleep(Duration::from_secs(if warm { 2 } else { 1 }));
        let before = bulkhead_bench::warm_launches(&daemon, "w");
        let (took, ids) = client_rt.block_on(burst(client.clone(), &mut seq, keys, concurrency))?;
        let after = bulkhead_bench::warm_launches(&daemon, "w");
        if warm {
            hits += after.0 - before.0;
            misses += after.1 - before.1;
            on.values.extend(took);
        } else {
            off.values.extend(took);
        }
        client_rt.block_on(terminate_all(client.clone(), ids))?;
        eprintln!(
            "round {}/{}: {} burst done",
            round + 1,
            rounds * 2,
            if warm { "warm" } else { "cold" }
        );
    }
    drop(client);
    rt.block_on(daemon.shutdown());

    println!(
        "{rounds} bursts each of {keys} new sessions, {concurrency} at a time, interleaved; \
         sandbox workload, default daemon configuration"
    );
    table(&off, &on);
    println!(
        "with / without pools: p50 {}, p99 {}; warm slots used: {hits} of {} launches",
        ratio(on.p50(), off.p50()),
        ratio(on.p99(), off.p99()),
        hits + misses
    );
    Ok(())
}

type Client = bulkhead_api::BulkheadClient<tonic::transport::Channel>;

/// The two kinds of burst, as a markdown table between blank lines.
fn table(off: &Samples, on: &Samples) {
    println!();
    println!("| burst | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|");
    for s in [off, on] {
        println!(
            "| {} | {} | {} | {} |",
            s.name,
            ms(s.p50()),
            ms(s.p99()),
            ms(s.percentile(100.0))
        );
    }
    println!();
}

/// `--process-spare`: the same bursts of a process workload (no `warm:`) through the
/// keeper, alternating between a daemon that keeps the keeper's spare (the default) and
/// one with `--no-process-spare`: does the spare's refill take a launch's CPU?
fn process_spare(rounds: usize, keys: usize, concurrency: usize) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    let wl = dir.path().join("workloads");
    std::fs::create_dir_all(wl.join("w"))?;
    std::fs::write(
        wl.join("w").join("manifest.yaml"),
        format!(
            "name: w\ncommand: [{}, notify-child]\nreadiness: {{notify: true, timeout: 30s}}\nisolation: session\n",
            exe.display()
        ),
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut daemons = Vec::new();
    for (name, spare) in [("on", true), ("off", false)] {
        let mut cfg = bulkhead_daemon::Config::new(wl.clone(), Some(dir.path().join(name)), None);
        cfg.keeper = Some(exe.clone());
        cfg.process_spare = spare;
        let socket = cfg.socket.clone();
        let d = rt.block_on(bulkhead_daemon::Daemon::start(cfg))?;
        let c = client_rt.block_on(bulkhead_api::connect(&socket))?;
        daemons.push((d, c));
    }
    let mut on = Samples::new("burst through the keeper with its spare (the default)");
    let mut off = Samples::new("burst through the keeper, `--no-process-spare`");
    let mut seq = 0usize;
    let mut took_spare = 0;
    for round in 0..rounds * 2 {
        let spare = round % 2 == 1;
        let (d, c) = &daemons[usize::from(!spare)];
        // As after a quiet spell: the spare is made.
        std::thread::sleep(Duration::from_secs(1));
        let before = d.shared().process_spare().map_or(0, |s| s.taken);
        let (took, ids) = client_rt.block_on(burst(c.clone(), &mut seq, keys, concurrency))?;
        took_spare += d.shared().process_spare().map_or(0, |s| s.taken) - before;
        if spare {
            on.values.extend(took)
        } else {
            off.values.extend(took)
        }
        client_rt.block_on(terminate_all(c.clone(), ids))?;
    }
    for (d, c) in daemons {
        drop(c);
        rt.block_on(d.shutdown());
    }
    println!(
        "{rounds} bursts each of {keys} new sessions, {concurrency} at a time, interleaved; \
         process workload through the keeper, default daemon configuration otherwise"
    );
    table(&off, &on);
    println!(
        "with / without the spare: p50 {}, p99 {}; launches that took the spare: {took_spare} of {}",
        ratio(on.p50(), off.p50()),
        ratio(on.p99(), off.p99()),
        on.values.len()
    );
    Ok(())
}

async fn reload(mut c: Client) -> anyhow::Result<()> {
    c.reload(v1::ReloadRequest {}).await?;
    Ok(())
}

/// `keys` new sessions, `concurrency` at a time: each launch's time, and the ids.
async fn burst(
    c: Client,
    seq: &mut usize,
    keys: usize,
    concurrency: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<String>)> {
    let gate = Arc::new(Semaphore::new(concurrency));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..keys {
        *seq += 1;
        let session = format!("b{seq}");
        let permit = gate.clone().acquire_owned().await?;
        let mut c = c.clone();
        set.spawn(async move {
            let t = Instant::now();
            let r = c
                .launch(v1::LaunchRequest {
                    workload: "w".into(),
                    namespace: None,
                    session: Some(session),
                    wait: v1::WaitFor::Ready as i32,
                    timeout_ms: 60_000,
                    lease: None,
                })
                .await;
            let took = t.elapsed();
            drop(permit);
            r.map(|r| {
                (
                    took,
                    r.into_inner().instance.map(|i| i.id).unwrap_or_default(),
                )
            })
        });
    }
    let (mut took, mut ids) = (Vec::new(), Vec::new());
    while let Some(r) = set.join_next().await {
        let (t, id) = r??;
        took.push(t);
        ids.push(id);
    }
    Ok((took, ids))
}

async fn terminate_all(c: Client, ids: Vec<String>) -> anyhow::Result<()> {
    let mut set = tokio::task::JoinSet::new();
    for id in ids {
        let mut c = c.clone();
        set.spawn(async move {
            c.terminate(v1::TerminateRequest {
                id,
                grace_ms: None,
                with_dependencies: false,
            })
            .await
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}
