//! `cargo bench -p bulkhead-bench --bench growth`: how the daemon's cost grows with the
//! number of live instances (issue #12).
//!
//! The real `bulkhead serve` in its default configuration (the keeper, the process
//! driver; plus `--metrics` on loopback, since `/metrics` is what is measured) runs as its
//! own process; this benchmark is a client (gRPC in process; `curl` for `/metrics`, a
//! stock client). It launches `sleep` instances (one `isolation: session` workload, 16
//! launches at a time) up to each level (default 100, 1,000 and 10,000) and measures,
//! at each level, in one run:
//!
//! - `list` (gRPC, every instance with its usage) and a `/metrics` scrape, each against
//!   its floor in the same run: `health` for `list`, a `/ready` fetch for the scrape (the
//!   cost of a request with nothing to do: connection, curl's start);
//! - `health` idle, and while `list` and scrapes run back to back in two other tasks:
//!   the ratio says whether a request waits behind them;
//! - one more launch (and its terminate), one at a time;
//! - the daemon's and the keeper's resident memory, and their CPU over 5 s of idling.
//!
//! Growth should be linear in the instances (not in instances x processes): the report
//! divides each level's figure by the previous level's.
//!
//! Options: `--levels 100,1000,10000`, `--write PATH` (also write the markdown report).
//! Needs root only as far as the daemon's defaults do; the open-file limit must allow
//! ~4 descriptors per instance (the daemon raises its own as far as it may).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bulkhead_api::v1;
use bulkhead_bench::daemon::{
    bulkhead_binary, launch_one, launch_range, sleeper_dir, usage, Daemon,
};
use bulkhead_bench::{flag, ms, Samples};

type Client = bulkhead_api::BulkheadClient<tonic::transport::Channel>;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let levels: Vec<usize> = flag(&args, "--levels")
        .unwrap_or_else(|| "100,1000,10000".into())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let write: Option<PathBuf> = flag(&args, "--write").map(PathBuf::from);
    let bin = bulkhead_binary()?;
    let (dir, wl) = sleeper_dir("bulkhead-growth")?;
    let socket = dir.path().join("api.sock");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let metrics = format!("127.0.0.1:{port}");
    let mut daemon = Daemon::start(
        &bin,
        &wl,
        &dir.path().join("state"),
        &socket,
        &["--metrics", &metrics],
    )?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let rows = rt.block_on(async {
        let c = bulkhead_api::connect(&socket).await?;
        let mut rows = Vec::new();
        let mut live = 0usize;
        for &level in &levels {
            eprintln!("launching up to {level} live instances");
            let t = Instant::now();
            launch_range(&c, live, level).await?;
            eprintln!(
                "  {} launches in {:.1} s",
                level - live,
                t.elapsed().as_secs_f64()
            );
            live = level;
            rows.push(measure(&c, level, port, &daemon).await?);
        }
        eprintln!("terminating");
        let mut c2 = c.clone();
        for i in 0..live {
            let _ = c2
                .terminate(v1::TerminateRequest {
                    id: format!("session:s{i}:s"),
                    grace_ms: Some(0),
                    with_dependencies: false,
                })
                .await;
        }
        anyhow::Ok(rows)
    })?;
    daemon.stop();

    let report = render(&rows);
    println!("{report}");
    if let Some(path) = write {
        std::fs::write(&path, &report)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// One level's figures.
struct Row {
    live: usize,
    list: Duration,
    health_floor: Duration,
    scrape: Duration,
    ready_floor: Duration,
    scrape_bytes: usize,
    health_idle: Samples,
    health_busy: Samples,
    launch: Duration,
    rss_kib: u64,
    cpu_idle: f64,
}

/// `curl` of `path` on the monitoring listener; returns the time and the body's size.
async fn fetch(port: u16, path: &str) -> anyhow::Result<(Duration, usize)> {
    let url = format!("http://127.0.0.1:{port}{path}");
    let t = Instant::now();
    let out = tokio::process::Command::new("curl")
        .args(["-sf", &url])
        .output()
        .await?;
    let took = t.elapsed();
    anyhow::ensure!(out.status.success(), "curl {url} failed: {}", out.status);
    Ok((took, out.stdout.len()))
}

async fn time<F: std::future::Future<Output = anyhow::Result<()>>>(
    f: F,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    f.await?;
    Ok(t.elapsed())
}

async fn health(mut c: Client) -> anyhow::Result<()> {
    c.health(v1::HealthRequest {}).await?;
    Ok(())
}

async fn list(mut c: Client, want: usize) -> anyhow::Result<()> {
    let n = c
        .list(v1::ListRequest::default())
        .await?
        .into_inner()
        .instances
        .len();
    anyhow::ensure!(n >= want, "list showed {n} instances, {want} live");
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

async fn measure(c: &Client, live: usize, port: u16, daemon: &Daemon) -> anyhow::Result<Row> {
    // Idle first: nothing in flight.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pids = daemon.pids();
    let (rss_kib, cpu0) = usage(&pids);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let cpu_idle = (usage(&pids).1 - cpu0) / 5.0;

    let mut health_idle = Samples::new("health idle");
    for _ in 0..20 {
        health_idle.values.push(time(health(c.clone())).await?);
    }
    // Interleaved with their floors, 5 rounds.
    let (mut lists, mut floors, mut scrapes, mut readys) = (vec![], vec![], vec![], vec![]);
    let mut scrape_bytes = 0;
    for _ in 0..5 {
        floors.push(time(health(c.clone())).await?);
        lists.push(time(list(c.clone(), live)).await?);
        readys.push(fetch(port, "/ready").await?.0);
        let (t, bytes) = fetch(port, "/metrics").await?;
        scrapes.push(t);
        scrape_bytes = bytes;
    }

    // Health while list and scrapes run back to back.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = |scrape: bool| {
        let stop = stop.clone();
        let c = c.clone();
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = if scrape {
                    fetch(port, "/metrics").await.map(|_| ())
                } else {
                    list(c.clone(), 0).await
                };
                r?;
            }
            anyhow::Ok(())
        })
    };
    let (l, s) = (load(false), load(true));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut health_busy = Samples::new("health under list + scrape");
    for _ in 0..20 {
        health_busy.values.push(time(health(c.clone())).await?);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    l.await??;
    s.await??;

    // One more launch and its terminate, one at a time.
    let mut launches = vec![];
    for k in 0..5 {
        let i = 1_000_000 + live * 10 + k;
        launches.push(time(launch_one(c.clone(), i)).await?);
        c.clone()
            .terminate(v1::TerminateRequest {
                id: format!("session:s{i}:s"),
                grace_ms: Some(0),
                with_dependencies: false,
            })
            .await?;
    }
    let row = Row {
        live,
        list: median(lists),
        health_floor: median(floors),
        scrape: median(scrapes),
        ready_floor: median(readys),
        scrape_bytes,
        health_idle,
        health_busy,
        launch: median(launches),
        rss_kib,
        cpu_idle,
    };
    eprintln!(
        "  {live}: list {} ms, scrape {} ms, health {} ms idle / {} ms busy, launch {} ms, rss {} MiB",
        ms(row.list),
        ms(row.scrape),
        ms(row.health_idle.p50()),
        ms(row.health_busy.p50()),
        ms(row.launch),
        row.rss_kib / 1024
    );
    Ok(row)
}

fn render(rows: &[Row]) -> String {
    let x = |a: Duration, b: Duration| {
        if b.is_zero() {
            "-".to_owned()
        } else {
            format!("{:.1}x", a.as_secs_f64() / b.as_secs_f64())
        }
    };
    let mut r = String::from(
        "| live instances | `list` ms (vs `health`) | `/metrics` ms (vs `/ready`) | `/metrics` size | `health` p50 / p99 ms idle | `health` p50 / p99 ms during `list` + scrapes (p50 vs idle) | launch ms | daemon + keeper RSS MiB (KiB per instance) | idle CPU % of a core |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for w in rows {
        r.push_str(&format!(
            "| {} | {} ({}) | {} ({}) | {} KiB | {} / {} | {} / {} ({}) | {} | {:.0} ({:.1}) | {:.2} |\n",
            w.live,
            ms(w.list),
            x(w.list, w.health_floor),
            ms(w.scrape),
            x(w.scrape, w.ready_floor),
            w.scrape_bytes / 1024,
            ms(w.health_idle.p50()),
            ms(w.health_idle.p99()),
            ms(w.health_busy.p50()),
            ms(w.health_busy.p99()),
            x(w.health_busy.p50(), w.health_idle.p50()),
            ms(w.launch),
            w.rss_kib as f64 / 1024.0,
            w.rss_kib as f64 / w.live as f64,
            w.cpu_idle * 100.0,
        ));
    }
    r.push_str("\nGrowth from one level to the next (x instances -> x cost is linear):\n\n| from -> to | instances | `list` | `/metrics` | RSS |\n|---|---|---|---|---|\n");
    for p in rows.windows(2) {
        let (a, b) = (&p[0], &p[1]);
        r.push_str(&format!(
            "| {} -> {} | {:.0}x | {} | {} | {:.1}x |\n",
            a.live,
            b.live,
            b.live as f64 / a.live as f64,
            x(b.list, a.list),
            x(b.scrape, a.scrape),
            b.rss_kib as f64 / a.rss_kib.max(1) as f64,
        ));
    }
    r
}
