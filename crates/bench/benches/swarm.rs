//! The swarm driver against the same steps done with the `docker service` CLI, on the
//! three-node swarm of `.ci/setup-swarm.sh`, interleaved in one run:
//!
//! - launch -> running: `docker service create -d --restart-condition none IMAGE sleep
//!   1000`, then `docker service ps` polled every 50 ms until the task runs (without `-d`
//!   the CLI waits 5 s more for the service to be stable) against bulkhead's launch with
//!   `wait: ready` (no probe: ready once the task runs);
//! - kill -> seen: `docker kill` of the task's container on its node, until
//!   `docker service ps` shows the task failed (polled every 50 ms, as a script would) /
//!   until bulkhead's `crashed` event arrives on a `Watch` stream.
//!
//! Cleanup is outside the timings. Needs the swarm (`bash .ci/setup-swarm.sh`).
//! `cargo bench -p bulkhead-bench --bench swarm -- --iterations 10`

use std::process::Command;
use std::time::{Duration, Instant};

use bulkhead_api::v1;
use bulkhead_bench::{ms, ratio, terminate, Samples};
use tokio_stream::StreamExt;

const IMAGE: &str = "bulkhead-test/busybox:latest";

fn manager() -> String {
    std::env::var("BULKHEAD_SWARM_HOST")
        .unwrap_or_else(|_| "unix:///run/bulkhead-swarm/mgr.sock".to_owned())
}

fn docker(host: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker")
        .arg("-H")
        .arg(host)
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The running task of service `svc`: its node's engine and its container.
fn task_of(svc: &str) -> anyhow::Result<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tasks = docker(&manager(), &["service", "ps", "-q", "--no-trunc", svc])?;
        if let Some(t) = tasks.lines().next() {
            let v: serde_json::Value = serde_json::from_str(&docker(
                &manager(),
                &["inspect", "--format", "{{json .}}", t],
            )?)?;
            let c = v["Status"]["ContainerStatus"]["ContainerID"]
                .as_str()
                .unwrap_or("");
            if v["Status"]["State"] == "running" && !c.is_empty() {
                let node = v["NodeID"].as_str().unwrap_or_default();
                let engine = docker(
                    &manager(),
                    &[
                        "node",
                        "inspect",
                        "--format",
                        "{{index .Spec.Labels \"bulkhead.engine\"}}",
                        node,
                    ],
                )?;
                return Ok((engine, c.to_owned()));
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "no running task for {svc}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The CLI's steps: create (converged), then kill and poll until failed.
fn cli_once(i: usize) -> anyhow::Result<(Duration, Duration)> {
    let name = format!("bench-cli-{}-{i}", std::process::id());
    let t = Instant::now();
    docker(
        &manager(),
        &[
            "service",
            "create",
            "-d",
            "-q",
            "--restart-condition",
            "none",
            "--name",
            &name,
            IMAGE,
            "sleep",
            "1000",
        ],
    )?;
    loop {
        let st = docker(
            &manager(),
            &["service", "ps", "--format", "{{.CurrentState}}", &name],
        )?;
        if st.starts_with("Running") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let create = t.elapsed();
    let (engine, container) = task_of(&name)?;
    let t = Instant::now();
    docker(&engine, &["kill", &container])?;
    loop {
        let st = docker(
            &manager(),
            &["service", "ps", "--format", "{{.CurrentState}}", &name],
        )?;
        if st.starts_with("Failed") || st.starts_with("Complete") || st.starts_with("Shutdown") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = t.elapsed();
    docker(&manager(), &["service", "rm", &name])?;
    Ok((create, seen))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let iterations: usize = bulkhead_bench::flag(&args, "--iterations")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10);
    if docker(
        &manager(),
        &["info", "--format", "{{.Swarm.LocalNodeState}}"],
    )
    .ok()
    .as_deref()
        != Some("active")
    {
        eprintln!(
            "skipped: no swarm manager at {}; run bash .ci/setup-swarm.sh",
            manager()
        );
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let wl = dir.path().join("workloads");
    std::fs::create_dir_all(wl.join("sw"))?;
    std::fs::write(
        wl.join("sw").join("manifest.yaml"),
        format!(
            "name: sw\ndriver: swarm\ncommand: [sleep, '1000']\nisolation: session\nswarm:\n  image: {IMAGE}\n"
        ),
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut cfg = bulkhead_daemon::Config::new(wl, Some(dir.path().join("state")), None);
    cfg.swarm_host = Some(manager());
    let socket = cfg.socket.clone();
    let _daemon = rt.block_on(bulkhead_daemon::Daemon::start(cfg))?;
    let mut cli_launch = Samples::new("docker service create -d + service ps until running (CLI)");
    let mut bh_launch = Samples::new("bulkhead launch -> ready (task running)");
    let mut cli_kill = Samples::new("docker kill -> docker service ps shows it (CLI)");
    let mut bh_kill = Samples::new("docker kill -> bulkhead crashed event");
    let cost = rt.block_on(async {
        let mut c = bulkhead_api::connect(&socket).await?;
        let mut events = c
            .watch(v1::WatchRequest {
                since_id: 0,
                history_only: false,
            })
            .await?
            .into_inner();
        for i in 0..iterations + 1 {
            let (cl, ck) = cli_once(i)?;
            let session = format!("s{i}");
            let t = Instant::now();
            let r = c
                .launch(v1::LaunchRequest {
                    workload: "sw".into(),
                    namespace: None,
                    session: Some(session.clone()),
                    wait: v1::WaitFor::Ready as i32,
                    timeout_ms: 60_000,
                    lease: None,
                })
                .await?
                .into_inner();
            let launched = t.elapsed();
            let id = format!("session:{session}:sw");
            let svc = docker(
                &manager(),
                &[
                    "service",
                    "ls",
                    "-q",
                    "--filter",
                    &format!("label=bulkhead.instance={id}"),
                ],
            )?;
            let (engine, container) = task_of(&svc)?;
            let t = Instant::now();
            docker(&engine, &["kill", &container])?;
            loop {
                let ev = events
                    .next()
                    .await
                    .ok_or_else(|| anyhow::anyhow!("watch ended"))??;
                if ev.instance == id && ev.kind == "crashed" {
                    break;
                }
            }
            let killed = t.elapsed();
            let _ = r;
            let _ = terminate(&mut c, &id).await;
            // The first round warms both paths up.
            if i > 0 {
                cli_launch.values.push(cl);
                cli_kill.values.push(ck);
                bh_launch.values.push(launched);
                bh_kill.values.push(killed);
            }
        }
        // What the shared poller costs the manager: its dockerd's CPU time over 5 s with
        // 10 live instances watched, against 5 s with none (the poller then asks nothing).
        let mut cost = None;
        if let Some(pid) = std::fs::read_to_string("/run/bulkhead-swarm/mgr/docker.pid")
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        {
            let ids: Vec<String> = (0..10).map(|i| format!("session:p{i}:sw")).collect();
            for i in 0..10 {
                c.launch(v1::LaunchRequest {
                    workload: "sw".into(),
                    namespace: None,
                    session: Some(format!("p{i}")),
                    wait: v1::WaitFor::Ready as i32,
                    timeout_ms: 60_000,
                    lease: None,
                })
                .await?;
            }
            let window = Duration::from_secs(5);
            let a = cpu_ms(pid);
            tokio::time::sleep(window).await;
            let busy = cpu_ms(pid) - a;
            for id in &ids {
                let _ = terminate(&mut c, id).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let a = cpu_ms(pid);
            tokio::time::sleep(window).await;
            let idle = cpu_ms(pid) - a;
            cost = Some((busy / window.as_secs_f64(), idle / window.as_secs_f64()));
        }
        anyhow::Ok(cost)
    })?;
    let mut report =
        String::from("| measurement | p50 ms | p99 ms | p50 vs CLI |\n|---|---|---|---|\n");
    for (s, base) in [
        (&cli_launch, &cli_launch),
        (&bh_launch, &cli_launch),
        (&cli_kill, &cli_kill),
        (&bh_kill, &cli_kill),
    ] {
        report.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            s.name,
            ms(s.p50()),
            ms(s.p99()),
            ratio(s.p50(), base.p50())
        ));
    }
    report.push_str(&format!(
        "\n{iterations} iterations, interleaved (after one warm-up round).\n"
    ));
    if let Some((busy, idle)) = cost {
        report.push_str(&format!(
            "\nThe manager's dockerd: {busy:.1} ms of CPU per second with 10 instances \
             watched (one task and one node listing per 100 ms), {idle:.1} ms per second \
             with none.\n"
        ));
    }
    println!("{report}");
    if let Some(path) = bulkhead_bench::flag(&args, "--write") {
        std::fs::write(&path, &report)?;
        eprintln!("wrote {path}");
    }
    Ok(())
}

/// CPU time (user + system) of process `pid`, in milliseconds.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // Fields 14 and 15 (utime, stime), counted from after the command name.
    let ticks = f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1000.0 / hz
}
