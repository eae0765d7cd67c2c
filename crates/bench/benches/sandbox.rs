//! `cargo bench -p bulkhead-bench --bench sandbox`: launch -> ready of a sandboxed notify
//! workload, against the tools people use and the raw clone3 floor, in one run.
//!
//! The workload is this binary in `notify-child` mode: it sends `READY=1` to
//! `NOTIFY_SOCKET` and exits. Every sample binds a fresh datagram socket, starts the
//! workload, and stops the clock when `READY=1` arrives; the teardown that follows is not
//! timed. Samples of the peers are interleaved (one of each per round) so that they all
//! see the same machine state.
//!
//! - **clone3 floor**: `clone3(CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS)`
//!   then `execve`, nothing else: what any tool with these walls must at least pay.
//! - **bulkhead driver**: `SandboxDriver::spawn` (PID, mount, IPC, UTS namespaces; cgroups
//!   with memory, pids and cpu limits; read-only root, private /tmp, fresh /proc, minimal
//!   /dev; no capabilities, seccomp deny-list, our init) until READY.
//! - **bulkhead driver from a warm slot**: `SandboxDriver::spawn_warm` into a slot that
//!   `prewarm` made outside the clock (at the start of the round: cgroups, namespaces,
//!   mounts, init, the workload process waiting), with the same manifest; the clock runs
//!   from the socket's bind through the hand-over (hostname, argv, environment, the
//!   per-instance steps, exec) to READY. The notify socket is made in the slot's own
//!   directory, as the daemon does.
//! - **bulkhead API**: gRPC Launch(wait=ready) to a daemon (in this process) for the same
//!   workload with `driver: sandbox`, durable event log, one new session per sample;
//!   cold and from a warm pool, each also with `channels:` (the session's channel space
//!   made and bound in; from a slot, mounted in at the hand-over).
//! - **a session's second workload** (a second daemon, after the rounds above, so that
//!   its pools' refills do not share the machine with them): two pooled workloads and a
//!   cold one, the same manifest; each round launches the first pooled one for a new
//!   session (from a slot, not timed), then times the session's second workload cold and
//!   from the slot its set kept for the session (the second pool learns to join sets in
//!   the warm-up: its first launch of a session that holds a range spawns cold).
//! - **bwrap**: `bwrap --unshare-all --ro-bind / / --proc /proc --dev /dev --tmpfs /tmp
//!   --ro-bind EXEDIR EXEDIR --bind DIR DIR` (Debian's bubblewrap; skipped if missing).
//!
//! Runs from any checkout location: every tool with a private `/tmp` is shown this
//! binary's folder (bwrap binds it, runc's bundle binds it, bulkhead's minimal root binds
//! the program a manifest names), so a checkout under `/tmp` is not hidden.
//! - **unshare**: `unshare -p -f -m` (util-linux).
//! - **runc**: `runc run` of an OCI bundle made with `runc spec` (PID, mount, IPC, UTS and
//!   network namespaces, a cgroup, read-only root): the root is an empty folder with the
//!   host's `/usr` (and the merged-usr links), this binary's folder and the socket folder
//!   bound in. `NOTIFY_SOCKET` is in the process's environment only, not runc's, so runc's
//!   own notify proxy stays out of it. Skipped if `runc` is missing.
//!
//! Options: `--iterations N` (default 200), `--write PATH` (also write the markdown),
//! `--workload tiny` (the workload is the small `notify-tiny` program instead of this
//! large binary: how much of each line is the program's own loading), `--daemon-heap
//! MiB` (this process, which hosts the daemon and the driver, first allocates and
//! touches that much memory: how each line grows with the daemon's memory), with
//! `--rewrite` (every round rewrites that memory after its slots are made, as a busy
//! daemon's memory changes while a slot waits).

use bulkhead_driver::sys::CloneArgs;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_api::v1;
use bulkhead_bench::{ms, ratio, Samples};
use bulkhead_driver::Driver;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("notify-child") {
        bulkhead_bench::notify_child();
    }
    let flag = |name: &str| bulkhead_bench::flag(&args, name);
    let iterations: usize = flag("--iterations")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200);
    let write = flag("--write").map(PathBuf::from);
    // The workload: this binary in `notify-child` mode (a large program), or with
    // `--workload tiny` the small `notify-tiny` program.
    let exe = match flag("--workload").as_deref() {
        None | Some("self") => std::env::current_exe()?,
        Some("tiny") => PathBuf::from(env!("CARGO_BIN_EXE_notify-tiny")),
        Some(other) => anyhow::bail!("--workload {other}: expected self or tiny"),
    };
    eprintln!("workload: {}", exe.display());
    let heap_mib: usize = flag("--daemon-heap")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(0);
    let rewrite = args.iter().any(|a| a == "--rewrite");
    // Touched, so that its pages are present (a fork copies their page-table entries).
    let mut heap = vec![1u8; heap_mib << 20];
    let mut generation = 1u8;
    let mut rewrite_heap = || {
        if rewrite {
            generation = generation.wrapping_add(1);
            for page in heap.chunks_mut(4096) {
                page[0] = generation;
            }
        }
    };
    let dir = tempfile::tempdir()?;
    let sock_dir = dir.path().join("sockets");
    std::fs::create_dir_all(&sock_dir)?;
    // The warm slots' own directory (the daemon makes one per slot; one serves here).
    let warm_dir = dir.path().join("warm");
    std::fs::create_dir_all(&warm_dir)?;
    let exe_dir = exe
        .parent()
        .map_or_else(|| "/".to_owned(), |d| d.display().to_string());

    let driver = match bulkhead_sandbox::SandboxDriver::new(bulkhead_sandbox::SandboxConfig {
        scope: format!("bench-{}", std::process::id()),
        ..Default::default()
    }) {
        Ok(d) => d,
        Err(e) => {
            println!("skipped: {e}");
            return Ok(());
        }
    };
    let caps = driver.capabilities();
    // BENCH_RESOURCES / BENCH_SANDBOX replace the sections (to see what each wall costs).
    let resources = std::env::var("BENCH_RESOURCES")
        .unwrap_or_else(|_| "{memory: 256Mi, pids: 64, cpu: 1}".into());
    let sandbox = std::env::var("BENCH_SANDBOX").unwrap_or_else(|_| "{}".into());
    let manifest = format!(
        "name: notify\ndriver: sandbox\ncommand: [{}, notify-child]\nreadiness: {{notify: true, timeout: 30s}}\nresources: {resources}\nsandbox: {sandbox}\nisolation: session\n",
        exe.display()
    );
    eprintln!("resources: {resources}; sandbox: {sandbox}");
    let workload = Arc::new(bulkhead_core::spec::parse_manifest(
        "notify/manifest.yaml",
        "notify",
        &manifest,
    )?);
    let wl = dir.path().join("workloads");
    std::fs::create_dir_all(wl.join("notify"))?;
    std::fs::write(wl.join("notify").join("manifest.yaml"), &manifest)?;
    // The same workload with a warm pool, launched through the API.
    std::fs::create_dir_all(wl.join("notifyw"))?;
    std::fs::write(
        wl.join("notifyw").join("manifest.yaml"),
        manifest.replace("name: notify\n", "name: notifyw\n") + "warm: {size: 1}\n",
    )?;
    // The same with channels, cold and pooled: each new session's channel space is made
    // (a tmpfs, its manager thread, the services) and bound in (from a slot: mounted in
    // at the hand-over). The program does not open them: what is measured is the
    // daemon's and the driver's part.
    let channels =
        "channels: {inputs: [{name: input, max_payload: 4Ki}], outputs: [{name: output, max_payload: 4Ki}]}\n";
    for (name, extra) in [("notifyc", ""), ("notifycw", "warm: {size: 1}\n")] {
        std::fs::create_dir_all(wl.join(name))?;
        std::fs::write(
            wl.join(name).join("manifest.yaml"),
            manifest.replace("name: notify\n", &format!("name: {name}\n")) + channels + extra,
        )?;
    }

    let bwrap = Path::new("/usr/bin/bwrap").exists();
    if !bwrap {
        eprintln!("bwrap skipped: /usr/bin/bwrap is missing (apt-get install -y bubblewrap)");
    }
    let unshare = Path::new("/usr/bin/unshare").exists();
    if !unshare {
        eprintln!("unshare skipped: /usr/bin/unshare is missing");
    }
    let mut runc = match Runc::new(dir.path(), &exe, &sock_dir) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("runc skipped: {e:#}");
            None
        }
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let cfg = bulkhead_daemon::Config::new(wl, Some(dir.path().join("state")), None);
    let socket = cfg.socket.clone();
    let daemon = rt.block_on(bulkhead_daemon::Daemon::start(cfg))?;
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut client = client_rt.block_on(bulkhead_api::connect(&socket))?;

    let mut floor = Samples::new("clone3 floor: PID+mount+IPC+UTS namespaces, exec, READY");
    let mut drv = Samples::new("bulkhead sandbox driver: spawn -> READY");
    let mut wm = Samples::new("bulkhead sandbox driver from a warm slot: hand-over -> READY");
    let mut api = Samples::new("bulkhead API launch -> ready (driver: sandbox)");
    let mut apw = Samples::new("bulkhead API launch -> ready from a warm pool (warm: {size: 1})");
    let mut apc = Samples::new("bulkhead API launch -> ready, cold, with channels");
    let mut apcw = Samples::new("bulkhead API launch -> ready from a warm pool, with channels");
    let mut bw = Samples::new("bwrap --unshare-all -> READY");
    let mut un = Samples::new("unshare -p -f -m -> READY");
    let mut rc = Samples::new("runc run (OCI bundle) -> READY");

    let mut seq = 0usize;
    let mut next_sock = || {
        seq += 1;
        sock_dir.join(format!("n{seq}.sock"))
    };
    let notify_argv = |prefix: &[&str]| -> Vec<String> {
        prefix
            .iter()
            .map(|s| s.to_string())
            .chain([exe.display().to_string(), "notify-child".into()])
            .collect()
    };
    let sd = sock_dir.display().to_string();
    let bwrap_prefix = [
        "/usr/bin/bwrap",
        "--unshare-all",
        "--ro-bind",
        "/",
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        // Its private /tmp would hide this binary in a checkout under /tmp.
        "--ro-bind",
        &exe_dir,
        &exe_dir,
        "--bind",
        &sd,
        &sd,
        "--",
    ];
    let unshare_prefix = ["/usr/bin/unshare", "-p", "-f", "-m", "--"];

    eprintln!("warming up");
    for _ in 0..5 {
        floor_once(&exe, &next_sock())?;
        rt.block_on(driver_once(&driver, &workload, &exe, &next_sock()))?;
        let slot = rt.block_on(slot_for(&driver, &workload, &warm_dir))?;
        rt.block_on(warm_once(&driver, slot, &workload, &exe, &warm_dir))?;
        client_rt.block_on(api_once(&mut client, "notify", "warm"))?;
        client_rt.block_on(bulkhead_bench::wait_for_slot(&mut client, "notifyw"))?;
        client_rt.block_on(api_once(&mut client, "notifyw", "warmw"))?;
        client_rt.block_on(api_once(&mut client, "notifyc", "warmc"))?;
        client_rt.block_on(bulkhead_bench::wait_for_slot(&mut client, "notifycw"))?;
        client_rt.block_on(api_once(&mut client, "notifycw", "warmcw"))?;
        if let Some(r) = runc.as_mut() {
            r.once(&next_sock())?;
        }
    }
    let hits_before = bulkhead_bench::warm_launches(&daemon, "notifyw").0;
    let channel_hits_before = bulkhead_bench::warm_launches(&daemon, "notifycw").0;
    eprintln!("{iterations} rounds, interleaved");
    for i in 0..iterations {
        // The round's slot, made outside the clock and first, so that the machine has
        // settled when its sample runs.
        let slot = rt.block_on(slot_for(&driver, &workload, &warm_dir))?;
        // Not timed: the daemon's memory changes while the slots wait (`--rewrite`).
        rewrite_heap();
        floor.values.push(floor_once(&exe, &next_sock())?);
        drv.values
            .push(rt.block_on(driver_once(&driver, &workload, &exe, &next_sock()))?);
        wm.values
            .push(rt.block_on(warm_once(&driver, slot, &workload, &exe, &warm_dir))?);
        api.values
            .push(client_rt.block_on(api_once(&mut client, "notify", &format!("s{i}")))?);
        // Not timed: the pool has its slot again (it refills while no spawn runs).
        client_rt.block_on(bulkhead_bench::wait_for_slot(&mut client, "notifyw"))?;
        apw.values
            .push(client_rt.block_on(api_once(&mut client, "notifyw", &format!("w{i}")))?);
        // Not timed either: the refill is done before the next sample runs, so that
        // none shares the machine with it.
        client_rt.block_on(bulkhead_bench::wait_for_slot(&mut client, "notifyw"))?;
        apc.values
            .push(client_rt.block_on(api_once(&mut client, "notifyc", &format!("c{i}")))?);
        client_rt.block_on(bulkhead_bench::wait_for_slot(&mut client, "notifycw"))?;
        apcw.values.push(client_rt.block_on(api_once(
            &mut client,
            "notifycw",
            &format!("cw{i}"),
        ))?);
        client_rt.block_on(bulkhead_bench::wait_for_slot(&mut client, "notifycw"))?;
        if bwrap {
            bw.values
                .push(command_once(&notify_argv(&bwrap_prefix), &next_sock())?);
        }
        if unshare {
            un.values
                .push(command_once(&notify_argv(&unshare_prefix), &next_sock())?);
        }
        if let Some(r) = runc.as_mut() {
            rc.values.push(r.once(&next_sock())?);
        }
    }
    drop(client);
    let hits = bulkhead_bench::warm_launches(&daemon, "notifyw").0 - hits_before;
    let channel_hits = bulkhead_bench::warm_launches(&daemon, "notifycw").0 - channel_hits_before;
    rt.block_on(daemon.shutdown());

    // A session's second workload, with a daemon of its own.
    let wl2 = dir.path().join("workloads2");
    for (name, extra) in [
        ("first", "warm: {size: 1}\n"),
        ("second", "warm: {size: 1}\n"),
        ("secondc", ""),
    ] {
        std::fs::create_dir_all(wl2.join(name))?;
        std::fs::write(
            wl2.join(name).join("manifest.yaml"),
            manifest.replace("name: notify\n", &format!("name: {name}\n")) + extra,
        )?;
    }
    let cfg = bulkhead_daemon::Config::new(wl2, Some(dir.path().join("state2")), None);
    let socket = cfg.socket.clone();
    let daemon = rt.block_on(bulkhead_daemon::Daemon::start(cfg))?;
    let mut client = client_rt.block_on(bulkhead_api::connect(&socket))?;
    let mut sc = Samples::new("a session's second workload, cold (its first from a slot)");
    let mut sw = Samples::new("a session's second workload from the slot its set kept");
    let mut second_round = |i: usize, keep: bool| -> anyhow::Result<()> {
        client_rt.block_on(async {
            bulkhead_bench::wait_for_slot(&mut client, "first").await?;
            bulkhead_bench::wait_for_slot(&mut client, "second").await?;
            let session = format!("p{i}");
            let (_, a) = launch(&mut client, "first", &session).await?;
            let (cold, b) = launch(&mut client, "secondc", &session).await?;
            let (warm, c) = launch(&mut client, "second", &session).await?;
            for id in [a, b, c] {
                terminate(&mut client, id).await?;
            }
            if keep {
                sc.values.push(cold);
                sw.values.push(warm);
            }
            anyhow::Ok(())
        })
    };
    for i in 0..5 {
        second_round(i, false)?;
    }
    let second_before = bulkhead_bench::warm_launches(&daemon, "second").0;
    for i in 0..iterations {
        second_round(5 + i, true)?;
    }
    let second_hits = bulkhead_bench::warm_launches(&daemon, "second").0 - second_before;
    drop(client);
    rt.block_on(daemon.shutdown());

    let mut report = String::new();
    report.push_str(&format!(
        "cgroups: {} (limits: {}; born in its cgroup: {}; favordynmods: {}); {iterations} interleaved rounds; \
         daemon process memory: +{heap_mib} MiB touched{}\n\n",
        caps.cgroup_mode,
        caps.controllers.join(", "),
        caps.clone_into_cgroup,
        caps.favordynmods,
        if rewrite { ", rewritten every round after its slots are made" } else { "" }
    ));
    report.push_str("| measurement | p50 ms | p99 ms | p50 vs clone3 floor | p50 vs bulkhead driver |\n|---|---|---|---|---|\n");
    for s in [
        &floor, &drv, &wm, &api, &apw, &apc, &apcw, &sc, &sw, &bw, &un, &rc,
    ] {
        if s.values.is_empty() {
            continue;
        }
        report.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            s.name,
            ms(s.p50()),
            ms(s.p99()),
            ratio(s.p50(), floor.p50()),
            ratio(s.p50(), drv.p50()),
        ));
    }
    report.push_str(&format!(
        "\nAPI launches of the pooled workload from a slot: {hits} of {iterations}; with channels: \
         {channel_hits} of {iterations} (warm-up excluded). Channels from a slot / cold: {}.\n\
         A session's second workload from its set's slot: {second_hits} of {iterations}; \
         from the slot / cold: {}.\n",
        ratio(apcw.p50(), apc.p50()),
        ratio(sw.p50(), sc.p50())
    ));
    if !bw.values.is_empty() {
        report.push_str(&format!(
            "bwrap / bulkhead API launch -> ready: {}; from a warm pool: {}; bwrap / bulkhead \
             driver: {}; bwrap / bulkhead driver from a warm slot: {}\n",
            ratio(bw.p50(), api.p50()),
            ratio(bw.p50(), apw.p50()),
            ratio(bw.p50(), drv.p50()),
            ratio(bw.p50(), wm.p50())
        ));
    }
    if !un.values.is_empty() {
        report.push_str(&format!(
            "unshare / bulkhead API launch -> ready: {}; unshare / bulkhead driver: {}\n",
            ratio(un.p50(), api.p50()),
            ratio(un.p50(), drv.p50())
        ));
    }
    if !rc.values.is_empty() {
        report.push_str(&format!(
            "runc / bulkhead API launch -> ready: {}; runc / bulkhead driver: {}\n",
            ratio(rc.p50(), api.p50()),
            ratio(rc.p50(), drv.p50())
        ));
    }
    println!("{report}");
    if let Some(path) = write {
        std::fs::write(path, &report)?;
    }
    Ok(())
}

/// Waits for READY=1 on `sock` (bounded).
fn await_ready(sock: &UnixDatagram) -> anyhow::Result<()> {
    let mut buf = [0u8; 64];
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    let n = sock.recv(&mut buf)?;
    anyhow::ensure!(&buf[..n] == b"READY=1", "unexpected handshake");
    Ok(())
}

/// The floor: clone3 with the namespaces, execve, READY.
fn floor_once(exe: &Path, path: &Path) -> anyhow::Result<Duration> {
    let prog = CString::new(exe.as_os_str().as_bytes())?;
    let arg1 = CString::new("notify-child")?;
    let env = CString::new([b"NOTIFY_SOCKET=".as_slice(), path.as_os_str().as_bytes()].concat())?;
    let exit = CString::new("BENCH_EXIT_AFTER_READY=1")?;
    let argv = [prog.as_ptr(), arg1.as_ptr(), std::ptr::null()];
    let envp = [env.as_ptr(), exit.as_ptr(), std::ptr::null()];
    let t = Instant::now();
    let sock = UnixDatagram::bind(path)?;
    let mut args = CloneArgs {
        flags: (libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS)
            as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM or a stack behaves like fork; the child only calls
    // execve on buffers prepared above and _exit.
    let pid = unsafe { bulkhead_driver::sys::clone3(&mut args) }
        .map_err(|e| anyhow::anyhow!("clone3: {e}"))?;
    if pid == 0 {
        // SAFETY: in the child: execve, or _exit if it fails.
        unsafe {
            libc::execve(prog.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    }
    await_ready(&sock)?;
    let took = t.elapsed();
    let mut st = 0;
    // SAFETY: waitpid on our own child.
    unsafe { libc::waitpid(pid as libc::pid_t, &mut st, 0) };
    let _ = std::fs::remove_file(path);
    Ok(took)
}

/// The sandbox driver alone: spawn, READY; then wait for the end (not timed).
async fn driver_once(
    d: &bulkhead_sandbox::SandboxDriver,
    workload: &Arc<bulkhead_core::spec::WorkloadSpec>,
    exe: &Path,
    path: &Path,
) -> anyhow::Result<Duration> {
    let (instance, _) = bulkhead_core::key::InstanceId::parse("ns:bench:notify")?;
    let t = Instant::now();
    let sock = UnixDatagram::bind(path)?;
    let spec = bulkhead_driver::SpawnSpec {
        instance,
        argv: vec![exe.display().to_string(), "notify-child".into()],
        env: vec![
            ("NOTIFY_SOCKET".into(), path.display().to_string()),
            ("BENCH_EXIT_AFTER_READY".into(), "1".into()),
        ],
        cwd: PathBuf::from("/"),
        spec: Arc::clone(workload),
        binds: vec![bulkhead_driver::Bind::same(path)],
        ids: None,
        inherited: Vec::new(),
        listen: Vec::new(),
    };
    let spawned = d.spawn(spec).await?;
    // As the daemon does for a program given a notify socket: the driver holds the end
    // of such a run until this hook is there (see `InstanceHandle::on_main_exit`).
    spawned.handle.on_main_exit(Arc::new(|| {}));
    let sock = tokio::net::UnixDatagram::from_std({
        sock.set_nonblocking(true)?;
        sock
    })?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(30), sock.recv(&mut buf)).await??;
    let took = t.elapsed();
    anyhow::ensure!(&buf[..n] == b"READY=1", "unexpected handshake");
    spawned.handle.wait().await;
    let _ = std::fs::remove_file(path);
    Ok(took)
}

/// A warm slot for the workload (not timed): its own directory is `dir`, where the
/// launch's notify socket goes.
async fn slot_for(
    d: &bulkhead_sandbox::SandboxDriver,
    workload: &Arc<bulkhead_core::spec::WorkloadSpec>,
    dir: &Path,
) -> anyhow::Result<Box<dyn bulkhead_driver::warm::Warm>> {
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(d.prewarm(bulkhead_driver::warm::WarmSpec {
        slot: format!("warm-notify-{n}"),
        spec: Arc::clone(workload),
        cwd: PathBuf::from("/"),
        ids: None,
        binds: vec![bulkhead_driver::Bind::same(dir)],
        port: 0,
    })
    .await?)
}

/// The sandbox driver from a warm slot: bind the socket in the slot's directory, hand
/// the program over, READY; then wait for the end (not timed).
async fn warm_once(
    d: &bulkhead_sandbox::SandboxDriver,
    slot: Box<dyn bulkhead_driver::warm::Warm>,
    workload: &Arc<bulkhead_core::spec::WorkloadSpec>,
    exe: &Path,
    dir: &Path,
) -> anyhow::Result<Duration> {
    let (instance, _) = bulkhead_core::key::InstanceId::parse("ns:bench:notify")?;
    let path = dir.join("notify.sock");
    let t = Instant::now();
    let sock = UnixDatagram::bind(&path)?;
    let spec = bulkhead_driver::SpawnSpec {
        instance,
        argv: vec![exe.display().to_string(), "notify-child".into()],
        env: vec![
            ("NOTIFY_SOCKET".into(), path.display().to_string()),
            ("BENCH_EXIT_AFTER_READY".into(), "1".into()),
        ],
        cwd: PathBuf::from("/"),
        spec: Arc::clone(workload),
        binds: vec![bulkhead_driver::Bind::same(dir)],
        ids: None,
        inherited: Vec::new(),
        listen: Vec::new(),
    };
    let spawned = d.spawn_warm(slot, spec).await?;
    // As the daemon does for a program given a notify socket: the driver holds the end
    // of such a run until this hook is there (see `InstanceHandle::on_main_exit`).
    spawned.handle.on_main_exit(Arc::new(|| {}));
    let sock = tokio::net::UnixDatagram::from_std({
        sock.set_nonblocking(true)?;
        sock
    })?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(30), sock.recv(&mut buf)).await??;
    let took = t.elapsed();
    anyhow::ensure!(&buf[..n] == b"READY=1", "unexpected handshake");
    spawned.handle.wait().await;
    let _ = std::fs::remove_file(&path);
    Ok(took)
}

/// Through the daemon's API: Launch(wait=ready), then terminate (not timed).
async fn api_once(
    c: &mut bulkhead_api::BulkheadClient<tonic::transport::Channel>,
    workload: &str,
    session: &str,
) -> anyhow::Result<Duration> {
    let (took, id) = launch(c, workload, session).await?;
    terminate(c, id).await?;
    Ok(took)
}

/// Launch(wait=ready) of `workload` for `session`: how long it took, and the instance.
async fn launch(
    c: &mut bulkhead_api::BulkheadClient<tonic::transport::Channel>,
    workload: &str,
    session: &str,
) -> anyhow::Result<(Duration, String)> {
    let t = Instant::now();
    let r = c
        .launch(v1::LaunchRequest {
            workload: workload.into(),
            namespace: None,
            session: Some(session.into()),
            wait: v1::WaitFor::Ready as i32,
            timeout_ms: 30_000,
            lease: None,
        })
        .await?
        .into_inner();
    let took = t.elapsed();
    Ok((took, r.instance.map(|i| i.id).unwrap_or_default()))
}

async fn terminate(
    c: &mut bulkhead_api::BulkheadClient<tonic::transport::Channel>,
    id: String,
) -> anyhow::Result<()> {
    c.terminate(v1::TerminateRequest {
        id,
        grace_ms: None,
        with_dependencies: false,
    })
    .await?;
    Ok(())
}

/// A peer tool: spawn it, READY; then wait for it to end (not timed).
fn command_once(argv: &[String], path: &Path) -> anyhow::Result<Duration> {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env("NOTIFY_SOCKET", path)
        .env("BENCH_EXIT_AFTER_READY", "1");
    ready_once(&mut cmd, path)
}

/// Binds `path`, starts `cmd`, stops the clock at READY=1 on `path`; then waits for the
/// command to end successfully (not timed).
fn ready_once(cmd: &mut Command, path: &Path) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let sock = UnixDatagram::bind(path)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    await_ready(&sock)?;
    let took = t.elapsed();
    let st = child.wait()?;
    anyhow::ensure!(st.success(), "{cmd:?}: {st}");
    let _ = std::fs::remove_file(path);
    Ok(took)
}

/// runc as a peer: one OCI bundle, its `config.json` rewritten per sample (the socket path
/// changes), outside the clock.
struct Runc {
    bin: PathBuf,
    bundle: PathBuf,
    config: serde_json::Value,
    seq: usize,
}

impl Runc {
    fn new(dir: &Path, exe: &Path, sock_dir: &Path) -> anyhow::Result<Runc> {
        use anyhow::Context;
        let bin = ["/usr/sbin/runc", "/usr/bin/runc"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .context("runc is missing (apt-get install -y runc)")?;
        let bundle = dir.join("runc-bundle");
        let rootfs = bundle.join("rootfs");
        std::fs::create_dir_all(&rootfs)?;
        // Merged /usr: the loader and libraries are reached through these links.
        for (link, to) in [
            ("bin", "usr/bin"),
            ("sbin", "usr/sbin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
        ] {
            if Path::new("/").join(link).is_symlink() {
                std::os::unix::fs::symlink(to, rootfs.join(link))?;
            }
        }
        let out = Command::new(&bin)
            .args(["spec", "--bundle"])
            .arg(&bundle)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "runc spec: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(bundle.join("config.json"))?)?;
        config["process"]["terminal"] = false.into();
        config["process"]["args"] = serde_json::json!([exe.display().to_string(), "notify-child"]);
        config["root"] = serde_json::json!({"path": "rootfs", "readonly": true});
        let bind = |src: &Path, ro: bool| {
            let mut options = vec!["rbind"];
            if ro {
                options.push("ro");
            }
            serde_json::json!({
                "destination": src.display().to_string(),
                "type": "bind",
                "source": src.display().to_string(),
                "options": options,
            })
        };
        let mounts = config["mounts"]
            .as_array_mut()
            .context("runc spec gave no mounts")?;
        mounts.push(bind(Path::new("/usr"), true));
        if let Some(d) = exe.parent() {
            mounts.push(bind(d, true));
        }
        mounts.push(bind(sock_dir, false));
        Ok(Runc {
            bin,
            bundle,
            config,
            seq: 0,
        })
    }

    /// One `runc run` until READY; the container's end and removal are not timed.
    fn once(&mut self, path: &Path) -> anyhow::Result<Duration> {
        self.seq += 1;
        self.config["process"]["env"] = serde_json::json!([
            "PATH=/usr/bin:/bin",
            format!("NOTIFY_SOCKET={}", path.display()),
            "BENCH_EXIT_AFTER_READY=1",
        ]);
        std::fs::write(
            self.bundle.join("config.json"),
            serde_json::to_vec(&self.config)?,
        )?;
        let id = format!("bulkhead-bench-{}-{}", std::process::id(), self.seq);
        let mut cmd = Command::new(&self.bin);
        cmd.args(["run", "--bundle"])
            .arg(&self.bundle)
            .arg(&id)
            .env_remove("NOTIFY_SOCKET");
        ready_once(&mut cmd, path)
    }
}
