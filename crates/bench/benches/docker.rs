//! The docker driver's launch latency against `docker run` through the Docker CLI, for the
//! same image, interleaved in one run.
//!
//! - baseline: `docker run -d --init IMAGE sleep 1000` until the CLI returns (the container
//!   is started), removal outside the timing;
//! - bulkhead launch -> running (`wait: started`) and launch -> ready (`wait: ready`; the
//!   workload declares no probe, so ready follows the start) through the API of an
//!   embedded daemon, terminate outside the timing;
//! - the docker driver alone (no daemon): a cold `spawn` until it returns (the container
//!   runs), and a spawn from a warm slot (`prewarm` outside the timing, then
//!   `spawn_warm` until it returns: the program has exec'd in the slot's container), each
//!   container removed outside the timing.
//!
//! Needs the engine and `bulkhead-test/busybox:latest` (`.ci/setup-docker.sh`).
//! `cargo bench -p bulkhead-bench --bench docker -- --iterations 30`

use std::process::Command;
use std::time::Instant;

use bulkhead_api::v1;
use bulkhead_bench::{ms, ratio, terminate, Samples};

const IMAGE: &str = "bulkhead-test/busybox:latest";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let iterations: usize = args
        .iter()
        .position(|a| a == "--iterations")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(30);
    let inspect = Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .output();
    if !inspect.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: no docker engine or no {IMAGE}; run .ci/setup-docker.sh");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let wl = dir.path().join("workloads");
    // `dkw`: the same workload with a warm pool (`warm:`).
    for (name, warm) in [("dk", ""), ("dkw", "warm: {size: 2}\n")] {
        std::fs::create_dir_all(wl.join(name))?;
        std::fs::write(
            wl.join(name).join("manifest.yaml"),
            format!(
                "name: {name}\ndriver: docker\ncommand: [sleep, '1000']\nisolation: session\n{warm}docker:\n  image: {IMAGE}\n"
            ),
        )?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let cfg = bulkhead_daemon::Config::new(wl, Some(dir.path().join("state")), None);
    let socket = cfg.socket.clone();
    let daemon = rt.block_on(bulkhead_daemon::Daemon::start(cfg))?;
    let driver = rt.block_on(async {
        bulkhead_docker::DockerDriver::new(
            bulkhead_docker::Engine::new(format!("bench-docker-{}", std::process::id())),
            None,
        )
    });
    let slot_dir = dir.path().join("slot");
    std::fs::create_dir_all(&slot_dir)?;
    let (cli, running, ready, create, start, cold, warm, pooled) = rt.block_on(async {
        let engine = bollard::Docker::connect_with_defaults()?
            .negotiate_version()
            .await?;
        let mut c = bulkhead_api::connect(&socket).await?;
        for i in 0..3 {
            launch(&mut c, &format!("warm{i}"), v1::WaitFor::Ready).await?;
            terminate(&mut c, &format!("session:warm{i}:dk")).await?;
            docker_run_once()?;
        }
        let mut cli = Samples::new("docker run -d (CLI) until it returns");
        let mut running = Samples::new("bulkhead launch -> running");
        let mut ready = Samples::new("bulkhead launch -> ready");
        let mut create = Samples::new("engine API create only");
        let mut start =
            Samples::new("engine API start of a pre-created container (warm pool bound)");
        let mut cold = Samples::new("bulkhead docker driver cold: spawn -> running");
        let mut warm =
            Samples::new("bulkhead docker driver from a warm slot: hand-over -> running");
        let mut pooled =
            Samples::new("bulkhead launch -> ready from a warm pool (warm: {size: 2})");
        for _ in 0..3 {
            driver_once(&driver, &slot_dir, false).await?;
            driver_once(&driver, &slot_dir, true).await?;
        }
        for i in 0..iterations {
            cli.values.push(docker_run_once()?);
            let t = Instant::now();
            launch(&mut c, &format!("r{i}"), v1::WaitFor::Started).await?;
            running.values.push(t.elapsed());
            terminate(&mut c, &format!("session:r{i}:dk")).await?;
            let t = Instant::now();
            launch(&mut c, &format!("y{i}"), v1::WaitFor::Ready).await?;
            ready.values.push(t.elapsed());
            terminate(&mut c, &format!("session:y{i}:dk")).await?;
            let (cr, st) = api_create_start(&engine).await?;
            create.values.push(cr);
            start.values.push(st);
            cold.values
                .push(driver_once(&driver, &slot_dir, false).await?);
            warm.values
                .push(driver_once(&driver, &slot_dir, true).await?);
            // Not timed: the pool has a slot again (it refills while no launch runs).
            bulkhead_bench::wait_for_slot(&mut c, "dkw").await?;
            let t = Instant::now();
            launch_of(&mut c, "dkw", &format!("p{i}"), v1::WaitFor::Ready).await?;
            pooled.values.push(t.elapsed());
            terminate(&mut c, &format!("session:p{i}:dkw")).await?;
        }
        anyhow::Ok((cli, running, ready, create, start, cold, warm, pooled))
    })?;
    let mut report =
        String::from("| measurement | p50 ms | p99 ms | p50 vs CLI |\n|---|---|---|---|\n");
    for s in [
        &cli, &running, &ready, &create, &start, &cold, &warm, &pooled,
    ] {
        report.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            s.name,
            ms(s.p50()),
            ms(s.p99()),
            ratio(s.p50(), cli.p50())
        ));
    }
    let hits = bulkhead_bench::warm_launches(&daemon, "dkw").0;
    report.push_str(&format!(
        "\n{iterations} iterations, interleaved; launches of the pooled workload from a slot: {hits} of {iterations}.\n"
    ));
    println!("{report}");
    // `--write PATH`: also write the report (what `scripts/bench-all` collects).
    if let Some(path) = args
        .iter()
        .position(|a| a == "--write")
        .and_then(|i| args.get(i + 1))
    {
        std::fs::write(path, &report)?;
        eprintln!("wrote {path}");
    }
    Ok(())
}

/// One spawn of `sleep 1000` by the docker driver, timed until it returns: cold, or from a
/// slot made outside the timing (its folder `slot_dir`); the container is removed
/// afterwards.
async fn driver_once(
    driver: &bulkhead_docker::DockerDriver,
    slot_dir: &std::path::Path,
    warm: bool,
) -> anyhow::Result<std::time::Duration> {
    use bulkhead_driver::Driver;
    let m =
        format!("name: dkd\ndriver: docker\ncommand: [sleep, '1000']\ndocker:\n  image: {IMAGE}\n");
    let spec = std::sync::Arc::new(bulkhead_core::spec::parse_manifest(
        "dkd/manifest.yaml",
        "dkd",
        &m,
    )?);
    let (instance, _) = bulkhead_core::key::InstanceId::parse("shared:dkd")?;
    let binds = vec![bulkhead_driver::Bind::same(slot_dir)];
    let launch = bulkhead_driver::SpawnSpec {
        instance,
        argv: vec!["sleep".into(), "1000".into()],
        env: vec![("BENCH".into(), "1".into())],
        cwd: slot_dir.parent().unwrap_or(slot_dir).to_owned(),
        spec: spec.clone(),
        binds: binds.clone(),
        ids: None,
        inherited: Vec::new(),
        listen: Vec::new(),
    };
    let (took, spawned) = if warm {
        let slot = driver
            .prewarm(bulkhead_driver::warm::WarmSpec {
                slot: "warm-dkd-0".into(),
                spec,
                cwd: launch.cwd.clone(),
                ids: None,
                binds,
                port: 0,
            })
            .await?;
        let t = Instant::now();
        let spawned = driver.spawn_warm(slot, launch).await?;
        (t.elapsed(), spawned)
    } else {
        let t = Instant::now();
        let spawned = driver.spawn(launch).await?;
        (t.elapsed(), spawned)
    };
    spawned
        .handle
        .stop(
            bulkhead_core::signal::Signal::KILL,
            std::time::Duration::from_secs(1),
        )
        .await;
    Ok(took)
}

/// Create, then start, through the Engine API directly: what a warm pool of pre-created
/// containers could save (the create) and what it could not (the start).
async fn api_create_start(
    engine: &bollard::Docker,
) -> anyhow::Result<(std::time::Duration, std::time::Duration)> {
    use bollard::models::{ContainerCreateBody, HostConfig};
    let body = ContainerCreateBody {
        image: Some(IMAGE.into()),
        cmd: Some(vec!["sleep".into(), "1000".into()]),
        host_config: Some(HostConfig {
            init: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };
    let t = Instant::now();
    let id = engine
        .create_container(
            None::<bollard::query_parameters::CreateContainerOptions>,
            body,
        )
        .await?
        .id;
    let create = t.elapsed();
    let t = Instant::now();
    engine
        .start_container(
            &id,
            None::<bollard::query_parameters::StartContainerOptions>,
        )
        .await?;
    let start = t.elapsed();
    engine
        .remove_container(
            &id,
            Some(bollard::query_parameters::RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await?;
    Ok((create, start))
}

/// `docker run -d`, timed until the CLI returns; the container is removed afterwards.
fn docker_run_once() -> anyhow::Result<std::time::Duration> {
    let t = Instant::now();
    let out = Command::new("docker")
        .args(["run", "-d", "--init", IMAGE, "sleep", "1000"])
        .output()?;
    let took = t.elapsed();
    anyhow::ensure!(out.status.success(), "docker run failed");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Command::new("docker").args(["rm", "-f", &id]).output()?;
    Ok(took)
}

async fn launch(
    c: &mut bulkhead_api::BulkheadClient<tonic::transport::Channel>,
    session: &str,
    wait: v1::WaitFor,
) -> anyhow::Result<v1::LaunchResponse> {
    launch_of(c, "dk", session, wait).await
}

async fn launch_of(
    c: &mut bulkhead_api::BulkheadClient<tonic::transport::Channel>,
    workload: &str,
    session: &str,
    wait: v1::WaitFor,
) -> anyhow::Result<v1::LaunchResponse> {
    Ok(c.launch(v1::LaunchRequest {
        workload: workload.into(),
        namespace: None,
        session: Some(session.into()),
        wait: wait as i32,
        timeout_ms: 30_000,
        lease: None,
    })
    .await?
    .into_inner())
}
