//! `cargo bench -p bulkhead-bench --bench dataplane`: round trips host -> workload -> host
//! of 4 KiB and 1 MiB messages, in one run, through:
//!
//! - **bulkhead SDK**: a real daemon (in this process) launches an echo workload (this
//!   binary in `echo-sdk` mode) whose channels it created, once per wall: `process`,
//!   `sandbox` and `docker` (the last two skipped, with the reason, where the driver is
//!   unavailable; in docker the binary, its loader and libraries are bound read-only into
//!   `bulkhead-test/busybox`). Each wall's echo runs in a session of its own (`bench`,
//!   `bench-sb`, `bench-dk`): a walled instance's channels live in its scope's channel
//!   space, and all instances of one space run as one host user (a sandbox as its
//!   tenant's uid, a docker container as root), so sandbox and docker cannot share one.
//!   The host end of each wall is a thread of its own: it makes the `bulkhead_sdk::Host`
//!   (which moves that thread, for good, into the instance's `channel_space` when it has
//!   one: its own mount namespace and the space owner's fsuid) and the ports, and runs
//!   the round trips the main loop asks for, timing them itself. The workload forwards
//!   each message into a new loan.
//! - **raw iceoryx2**: the same echo written against iceoryx2 directly (`echo-raw`), on
//!   services this benchmark creates itself in the host's `/dev/shm`, no daemon.
//! - **Unix socket**: a socketpair to a child (`echo-sock`) that reads each message and
//!   writes it back (length-prefixed).
//!
//! Both shared-memory paths are zero-copy: a message is a loan whose first 8 bytes carry
//! a sequence number; the rest stays in place (nobody copies the payload; the socket must).
//! The host's receivers spin; the echoes wait as the SDK does. The main loop interleaves the paths in blocks (each wall's thread is
//! told over a channel to run a block and sends back its samples; only one path runs at a
//! time) so that all of them see the same machine.
//! Then memory: the RSS of the host and the process-wall SDK workload before and after
//! 1,000,000 4 KiB round trips. Then idle CPU: the SDK echo (blocked in `recv_timeout`)
//! and a Python SDK subscriber (blocked in `recv`) while nothing is sent. Options:
//! `--iterations N` (default 2000), `--messages N` (default 1,000,000), `--idle-seconds N`
//! (default 60), `--write PATH` (also write the markdown report).

use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bulkhead_api::v1;
use bulkhead_bench::{flag, ratio, Samples};
use iceoryx2::port::update_connections::UpdateConnections;
use iceoryx2::prelude::*;

const MAX: usize = 1 << 20;
const SIZES: [usize; 2] = [4 << 10, 1 << 20];
/// Round trips measured per block, and the ones before them that are not.
const BLOCK: usize = 50;
const WARM: usize = 5;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("echo-sdk") => return echo_sdk(),
        Some("echo-raw") => return echo_raw(&args[2]),
        Some("echo-sock") => return echo_sock(),
        _ => {}
    }
    let iterations: usize = flag(&args, "--iterations")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(2000);
    let messages: usize = flag(&args, "--messages")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let write: Option<PathBuf> = flag(&args, "--write").map(PathBuf::from);
    let idle_secs: u64 = flag(&args, "--idle-seconds")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(60);
    let exe = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;

    // The daemon and its echo workloads, one per wall, each in a session of its own:
    // sandbox and docker instances cannot share a channel space.
    let wl = dir.path().join("workloads");
    let walls = [
        (
            "echo",
            "process",
            "bench",
            exe.display().to_string(),
            String::new(),
        ),
        (
            "echo-sb",
            "sandbox",
            "bench-sb",
            exe.display().to_string(),
            String::new(),
        ),
        (
            "echo-dk",
            "docker",
            "bench-dk",
            "/bulkhead/bench".to_owned(),
            docker_section(&exe)?,
        ),
    ];
    for (name, driver, _, command, extra) in &walls {
        std::fs::create_dir_all(wl.join(name))?;
        std::fs::write(
            wl.join(name).join("manifest.yaml"),
            format!(
                "name: {name}\ndriver: {driver}\ncommand: [{command:?}, echo-sdk]\nisolation: session\n\
                 readiness: {{notify: true, timeout: 30s}}\nshutdown: {{grace: 2s}}\nchannels:\n  \
                 inputs: [{{name: input, max_payload: 1Mi, depth: 4}}]\n  \
                 outputs: [{{name: output, max_payload: 1Mi, depth: 4}}]\n{extra}"
            ),
        )?;
    }
    let daemon_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let cfg = bulkhead_daemon::Config::new(wl, Some(dir.path().join("state")), None);
    let socket = cfg.socket.clone();
    let daemon = daemon_rt.block_on(bulkhead_daemon::Daemon::start(cfg))?;
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let launch = |workload: &str, session: &str| {
        client_rt.block_on(async {
            let mut c = bulkhead_api::connect(&socket).await?;
            c.launch(v1::LaunchRequest {
                workload: workload.into(),
                namespace: None,
                session: Some(session.into()),
                wait: v1::WaitFor::Ready as i32,
                timeout_ms: 30_000,
                lease: None,
            })
            .await?;
            anyhow::Ok(
                c.get(v1::GetRequest {
                    id: format!("session:{session}:{workload}"),
                    ..Default::default()
                })
                .await?
                .into_inner(),
            )
        })
    };
    // The process wall always; the others where their driver works here.
    let mut sdks: Vec<Wall> = Vec::new();
    let mut iox2_prefix = None;
    let mut echo_pid = 0;
    let mut input_service = String::new();
    for (name, driver, session, _, _) in &walls {
        let inst = match launch(name, session) {
            Ok(i) => i,
            Err(e) if *driver != "process" => {
                eprintln!("skipping the {driver} wall: cannot launch {name}: {e:#}");
                continue;
            }
            Err(e) => return Err(e.context(format!("cannot launch {name}"))),
        };
        let service = |dir: &str| {
            inst.channels
                .iter()
                .find(|c| c.direction == dir)
                .map(|c| c.service.clone())
                .ok_or_else(|| anyhow::anyhow!("the {name} instance has no {dir} channel"))
        };
        let iox2 = bulkhead_sdk::Iox2 {
            prefix: inst.iox2_prefix.clone(),
            root: inst.iox2_root.clone().map(Into::into),
            space: inst.channel_space.clone().map(Into::into),
        };
        if *driver == "process" {
            iox2_prefix = iox2.prefix.clone();
            echo_pid = inst.pid.unwrap_or(0);
            input_service = service("input")?;
        }
        eprintln!(
            "{name} ({driver} wall, session {session}) ready (pid {:?}, channel space {:?})",
            inst.pid, inst.channel_space
        );
        sdks.push(Wall::start(
            driver,
            iox2,
            service("input")?,
            service("output")?,
        )?);
    }

    // Raw iceoryx2: our own services, our own echo child.
    let raw_prefix = format!("iox2_bhbench{}_", std::process::id());
    let raw = Raw::new(&raw_prefix, true)?;
    let mut raw_child = Command::new(&exe)
        .args(["echo-raw", &raw_prefix])
        .stdin(Stdio::null())
        .spawn()?;

    // The socket: the child's stdin is its end of the pair.
    let (mut sock, child_end) = UnixStream::pair()?;
    let mut sock_child = Command::new(&exe)
        .arg("echo-sock")
        .stdin(Stdio::from(OwnedFd::from(child_end)))
        .spawn()?;

    let mut buf = vec![0u8; MAX + 8];
    let mut seq = 0u64;
    // Warm up every path (connections, page faults).
    for w in &sdks {
        eprintln!("warming up: SDK ({} wall)", w.driver);
        for size in SIZES {
            w.run(size, 200, 0)?;
        }
    }
    eprintln!("warming up: raw iceoryx2");
    raw.connect()?;
    for _ in 0..200 {
        for size in SIZES {
            seq += 1;
            raw.round_trip(size, seq)?;
        }
    }
    eprintln!("warming up: socket");
    for _ in 0..200 {
        for size in SIZES {
            sock_round_trip(&mut sock, &mut buf, size)?;
        }
    }
    eprintln!("round trips, interleaved in blocks of {BLOCK}, {iterations} iterations per size");
    let mut rows = Vec::new();
    for size in SIZES {
        let label = if size < (1 << 20) { "4 KiB" } else { "1 MiB" };
        let mut s: Vec<Samples> = sdks
            .iter()
            .map(|w| Samples::new(format!("{label}: bulkhead SDK ({} wall)", w.driver)))
            .collect();
        let mut r = Samples::new(format!("{label}: raw iceoryx2"));
        let mut u = Samples::new(format!("{label}: Unix socketpair"));
        for _ in 0..iterations.div_ceil(BLOCK) {
            // Blocks, not single iterations: an echo idle for more than 2 ms sleeps (as a
            // real workload would), and only one echo at a time spins on the 2 cores. The
            // first round trips of a block wake the echo up and are not counted. A wall's
            // block runs on its host thread while this one waits for the samples.
            for (w, s) in sdks.iter().zip(&mut s) {
                s.values.extend(w.run(size, WARM, BLOCK)?);
            }
            for i in 0..WARM + BLOCK {
                seq += 1;
                let t = Instant::now();
                raw.round_trip(size, seq)?;
                if i >= WARM {
                    r.values.push(t.elapsed());
                }
            }
            for i in 0..WARM + BLOCK {
                let t = Instant::now();
                sock_round_trip(&mut sock, &mut buf, size)?;
                if i >= WARM {
                    u.values.push(t.elapsed());
                }
            }
        }
        rows.push((s, r, u));
    }

    eprintln!("memory over {messages} SDK round trips of 4 KiB (process wall)");
    let before = (rss_kib(std::process::id()), rss_kib(echo_pid));
    sdks[0].run(4 << 10, messages, 0)?;
    let after = (rss_kib(std::process::id()), rss_kib(echo_pid));

    // Idle: the Rust SDK echo (blocked in `recv_timeout`) and a Python SDK subscriber on
    // the same input channel, while nothing is sent.
    eprintln!("idle CPU over {idle_secs} s (process wall)");
    let mut py = python_idle_subscriber(&exe, iox2_prefix.as_deref(), &input_service);
    std::thread::sleep(Duration::from_secs(2)); // the interpreter's start-up is not idle
    let py_pid = py.as_ref().map(|c| c.id()).unwrap_or(0);
    let cpu_before = (cpu_ticks(echo_pid), cpu_ticks(py_pid));
    std::thread::sleep(Duration::from_secs(idle_secs));
    let cpu_after = (cpu_ticks(echo_pid), cpu_ticks(py_pid));
    if let Some(c) = py.as_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let idle_pct = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => format!(
            "{:.3} %",
            (b - a) as f64 / ticks_per_second() / idle_secs as f64 * 100.0
        ),
        _ => "not measured (see the log)".to_owned(),
    };
    let idle_rows = (
        idle_pct(cpu_before.0, cpu_after.0),
        idle_pct(cpu_before.1, cpu_after.1),
    );

    let _ = raw_child.kill();
    let _ = raw_child.wait();
    drop(sock);
    let _ = sock_child.wait();
    // The host threads drop their ports and nodes before the daemon removes the channels.
    for w in sdks {
        w.stop()?;
    }
    drop(raw);
    daemon_rt.block_on(daemon.shutdown());
    // Both host installations are idle now: remove iceoryx2's per-installation counter
    // files from the host's /dev/shm (a channel space's go with its tmpfs).
    for prefix in [iox2_prefix.unwrap_or_default(), raw_prefix.clone()] {
        for e in std::fs::read_dir("/dev/shm")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if !prefix.is_empty() && name.starts_with(&prefix) && name.ends_with(".global_mgmt") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    let us = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e6);
    let mut md = String::new();
    md.push_str("| round trip | p50 µs | p99 µs | p50 vs raw iceoryx2 | p50 vs Unix socket |\n|---|---|---|---|---|\n");
    for (s, r, u) in &rows {
        for x in s.iter().chain([r, u]) {
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                x.name,
                us(x.p50()),
                us(x.p99()),
                ratio(x.p50(), r.p50()),
                ratio(x.p50(), u.p50()),
            ));
        }
    }
    for (s, _, u) in &rows {
        for s in s {
            md.push_str(&format!(
                "\n{}: the Unix socket is {:.0}x slower at p50.",
                s.name,
                u.p50().as_secs_f64() / s.p50().as_secs_f64()
            ));
        }
    }
    md.push_str(&format!(
        "\n\n| idle over {idle_secs} s, nothing sent | CPU (of one core) |\n|---|---|\n\
         | Rust SDK echo workload, blocked in `recv_timeout` | {} |\n\
         | Python SDK subscriber, blocked in `recv` | {} |\n",
        idle_rows.0, idle_rows.1
    ));
    md.push_str(&format!(
        "\n\n| RSS (KiB) | before | after {messages} round trips |\n|---|---|---|\n\
         | host (this benchmark) | {} | {} |\n| SDK echo workload | {} | {} |\n",
        before.0, after.0, before.1, after.1
    ));
    println!("{md}");
    if let Some(p) = write {
        std::fs::write(p, &md)?;
    }
    Ok(())
}

/// A block of round trips for a wall's host thread: `skip` untimed, then `measure` timed,
/// of `size` bytes each.
struct Block {
    size: usize,
    skip: usize,
    measure: usize,
}

/// The host end of one wall: a thread that owns the `Host` and its two ports (iceoryx2
/// ports belong to the thread that made them, and a thread enters at most one channel
/// space) and runs the blocks it is sent.
struct Wall {
    driver: &'static str,
    blocks: mpsc::Sender<Block>,
    samples: mpsc::Receiver<anyhow::Result<Vec<Duration>>>,
    thread: JoinHandle<()>,
}

impl Wall {
    /// Starts the thread and waits until it has entered the space (if any) and opened
    /// `input` for publishing and `output` for receiving.
    fn start(
        driver: &'static str,
        iox2: bulkhead_sdk::Iox2,
        input: String,
        output: String,
    ) -> anyhow::Result<Wall> {
        let (blocks, block_rx) = mpsc::channel::<Block>();
        let (samples_tx, samples) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("host-{driver}"))
            .spawn(move || {
                let opened = (|| -> anyhow::Result<_> {
                    let host = bulkhead_sdk::Host::new(&iox2)?;
                    let tx = host.publisher(&input, MAX)?;
                    let rx = host.subscriber(&output, 4)?;
                    Ok((host, tx, rx))
                })();
                // Declared in this order, dropped in the reverse: ports before the node.
                let (_host, tx, rx) = match opened {
                    Ok(p) => {
                        let _ = samples_tx.send(Ok(Vec::new()));
                        p
                    }
                    Err(e) => {
                        let _ = samples_tx.send(Err(e));
                        return;
                    }
                };
                let mut seq = 0u64;
                // Ends when the main thread drops its sender, or at the first error.
                for b in block_rx {
                    let mut out = Vec::with_capacity(b.measure);
                    let mut result = Ok(());
                    for i in 0..b.skip + b.measure {
                        seq += 1;
                        let t = Instant::now();
                        if let Err(e) = sdk_round_trip(&tx, &rx, b.size, seq) {
                            result = Err(e);
                            break;
                        }
                        if i >= b.skip {
                            out.push(t.elapsed());
                        }
                    }
                    let failed = result.is_err();
                    if samples_tx.send(result.map(|()| out)).is_err() || failed {
                        return;
                    }
                }
            })?;
        let w = Wall {
            driver,
            blocks,
            samples,
            thread,
        };
        w.recv()
            .map_err(|e| e.context(format!("cannot open the {driver} wall's channels")))?;
        Ok(w)
    }

    fn recv(&self) -> anyhow::Result<Vec<Duration>> {
        self.samples
            .recv()
            .map_err(|_| anyhow::anyhow!("the {} wall's host thread ended early", self.driver))?
    }

    /// Runs one block on the wall's thread and returns its timed samples.
    fn run(&self, size: usize, skip: usize, measure: usize) -> anyhow::Result<Vec<Duration>> {
        self.blocks
            .send(Block {
                size,
                skip,
                measure,
            })
            .map_err(|_| anyhow::anyhow!("the {} wall's host thread ended early", self.driver))?;
        self.recv()
    }

    /// Ends the thread (it drops its ports and node) and waits for it.
    fn stop(self) -> anyhow::Result<()> {
        let Wall {
            driver,
            blocks,
            thread,
            ..
        } = self;
        drop(blocks);
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("the {driver} wall's host thread panicked"))
    }
}

/// The `docker` section of the docker wall's echo: the busybox test image, with this
/// binary (at `/bulkhead/bench`), its dynamic loader and the libraries `ldd` resolves
/// bound in read-only at the paths the loader looks for them.
fn docker_section(exe: &std::path::Path) -> anyhow::Result<String> {
    let out = Command::new("ldd").arg(exe).output();
    let libs = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        // A static binary (or no ldd): nothing but the binary to bind.
        _ => String::new(),
    };
    let mut mounts = format!(
        "    - {{source: {:?}, target: /bulkhead/bench, read_only: true}}\n",
        exe.display().to_string()
    );
    // Lines are `name => /path (addr)`, `/path (addr)` (the loader) or `vdso (addr)`.
    for line in libs.lines() {
        let path = line
            .split("=>")
            .last()
            .and_then(|s| s.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(p) = path {
            let src = std::fs::canonicalize(p)
                .map_err(|e| anyhow::anyhow!("cannot resolve library {p}: {e}"))?;
            mounts.push_str(&format!(
                "    - {{source: {:?}, target: {p:?}, read_only: true}}\n",
                src.display().to_string()
            ));
        }
    }
    Ok(format!(
        "docker:\n  image: bulkhead-test/busybox:latest\n  mounts:\n{mounts}"
    ))
}

/// The parent process id: an echo whose parent changed was orphaned and exits.
fn parent() -> u32 {
    std::os::unix::process::parent_id()
}

/// User + system CPU time of `pid` in clock ticks; `None` when it cannot be read.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = bulkhead_driver::sys::read_stat(pid).ok()?;
    Some(stat.utime + stat.stime)
}

fn ticks_per_second() -> f64 {
    bulkhead_driver::sys::clock_ticks() as f64
}

/// A Python process subscribed to `service` through the Python SDK (`sdk/python`), blocked
/// in `recv` for good; `None` (with the reason) where python3 or iceoryx2 is missing.
fn python_idle_subscriber(
    exe: &std::path::Path,
    prefix: Option<&str>,
    service: &str,
) -> Option<std::process::Child> {
    // The SDK beside this checkout: found from the benchmark binary's target directory
    // up, so that it runs from any checkout path.
    let sdk = exe
        .ancestors()
        .map(|a| a.join("sdk/python"))
        .find(|p| p.join("bulkhead_sdk").is_dir())
        .or_else(|| {
            let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../sdk/python");
            here.join("bulkhead_sdk").is_dir().then_some(here)
        });
    let Some(sdk) = sdk else {
        eprintln!("idle: no sdk/python found; the Python subscriber is not measured");
        return None;
    };
    let script = "import os, sys\nfrom bulkhead_sdk import Host\n\
                  h = Host(prefix=os.environ.get('BULKHEAD_IOX2_PREFIX'))\n\
                  s = h.subscriber(sys.argv[1], 4)\n\
                  while True:\n    s.recv(3600.0)\n";
    let child = Command::new("python3")
        .args(["-c", script, service])
        .env("PYTHONPATH", &sdk)
        .env("BULKHEAD_IOX2_PREFIX", prefix.unwrap_or_default())
        .stdin(Stdio::null())
        .spawn();
    match child {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("idle: cannot start python3 ({e}); the Python subscriber is not measured");
            None
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Writes `seq` into the first 8 bytes of an uninitialised loan.
fn stamp(payload: &mut [MaybeUninit<u8>], seq: u64) {
    for (d, s) in payload.iter_mut().zip(seq.to_le_bytes()) {
        d.write(s);
    }
}

fn read_seq(msg: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&msg[..8]);
    u64::from_le_bytes(b)
}

fn sdk_round_trip(
    tx: &bulkhead_sdk::Publisher,
    rx: &bulkhead_sdk::Subscriber,
    size: usize,
    seq: u64,
) -> anyhow::Result<()> {
    let mut loan = tx.loan(size)?;
    stamp(loan.as_uninit_mut(), seq);
    // SAFETY: the loan is a slot of a data segment mapped from a shared-memory file: every
    // byte holds a defined value (zero-filled by the kernel, or an earlier message's). The
    // benchmark writes only the first 8 and never reads the rest.
    unsafe { loan.send_assume_init()? };
    loop {
        if let Some(m) = rx.try_recv()? {
            anyhow::ensure!(m.len() >= 8, "sdk: short echo");
            if read_seq(&m) == seq {
                anyhow::ensure!(m.len() == size, "sdk: wrong length");
                return Ok(());
            }
            // A stale echo: skip it.
            continue;
        }
        std::hint::spin_loop();
    }
}

/// The SDK echo workload (runs under the daemon).
fn echo_sdk() -> anyhow::Result<()> {
    let w = bulkhead_sdk::Workload::from_env()?;
    let rx = w.input("input")?;
    let tx = w.output("output")?;
    bulkhead_sdk::notify_ready()?;
    let parent = parent();
    loop {
        // The SDK's wait: checks the queue for 20 µs, then blocks on the channel's event.
        let Some(m) = rx.recv_timeout(Duration::from_secs(1))? else {
            if self::parent() != parent {
                return Ok(()); // the benchmark is gone
            }
            continue;
        };
        {
            let mut loan = tx.loan(m.len())?;
            stamp(loan.as_uninit_mut(), read_seq(&m));
            drop(m);
            // SAFETY: see `sdk_round_trip`: a shared-memory slot always holds defined
            // bytes; only the first 8 are written and read.
            unsafe { loan.send_assume_init()? };
        }
    }
}

type RawPub = iceoryx2::port::publisher::Publisher<ipc::Service, [u8], ()>;
type RawSub = iceoryx2::port::subscriber::Subscriber<ipc::Service, [u8], ()>;

/// Raw iceoryx2 ports: the host's (`host`: publish on `in`, subscribe to `out`) or the
/// echo's (the other way round).
struct Raw {
    _node: Node<ipc::Service>,
    tx: RawPub,
    rx: RawSub,
}

impl Raw {
    fn new(prefix: &str, host: bool) -> anyhow::Result<Raw> {
        let mut cfg = Config::default();
        cfg.global.prefix = FileName::new(prefix.as_bytes())
            .map_err(|e| anyhow::anyhow!("prefix {prefix}: {e:?}"))?;
        let node = NodeBuilder::new()
            .config(&cfg)
            .signal_handling_mode(SignalHandlingMode::Disabled)
            .create::<ipc::Service>()
            .map_err(|e| anyhow::anyhow!("raw node: {e:?}"))?;
        let svc = |name: &str| -> anyhow::Result<_> {
            node.service_builder(
                &ServiceName::new(name).map_err(|e| anyhow::anyhow!("{name}: {e:?}"))?,
            )
            .publish_subscribe::<[u8]>()
            .max_publishers(2)
            .max_subscribers(4)
            .subscriber_max_buffer_size(4)
            .history_size(4)
            .open_or_create()
            .map_err(|e| anyhow::anyhow!("raw service {name}: {e:?}"))
        };
        let (a, b) = (svc("bench/raw/in")?, svc("bench/raw/out")?);
        let (pub_svc, sub_svc) = if host { (&a, &b) } else { (&b, &a) };
        let tx = pub_svc
            .publisher_builder()
            .initial_max_slice_len(MAX)
            .create()
            .map_err(|e| anyhow::anyhow!("raw publisher: {e:?}"))?;
        let rx = sub_svc
            .subscriber_builder()
            .buffer_size(4)
            .create()
            .map_err(|e| anyhow::anyhow!("raw subscriber: {e:?}"))?;
        Ok(Raw {
            _node: node,
            tx,
            rx,
        })
    }

    /// Sends until the echo child answers (it may connect after our first message).
    fn connect(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            self.tx
                .update_connections()
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let s = self
                .tx
                .loan_slice_uninit(8)
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            s.write_from_slice(&0u64.to_le_bytes())
                .send()
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            std::thread::sleep(Duration::from_millis(20));
            if self
                .rx
                .receive()
                .map_err(|e| anyhow::anyhow!("{e:?}"))?
                .is_some()
            {
                // Drain what else came back.
                while self
                    .rx
                    .receive()
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?
                    .is_some()
                {}
                return Ok(());
            }
        }
        anyhow::bail!("the raw echo child did not answer")
    }

    fn round_trip(&self, size: usize, seq: u64) -> anyhow::Result<()> {
        let mut s = self
            .tx
            .loan_slice_uninit(size)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        stamp(s.payload_mut(), seq);
        // SAFETY: as in `sdk_round_trip`.
        let s = unsafe { s.assume_init() };
        s.send().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        loop {
            if let Some(m) = self.rx.receive().map_err(|e| anyhow::anyhow!("{e:?}"))? {
                if read_seq(m.payload()) == seq {
                    return Ok(());
                }
                // A stale echo of a warm-up message: skip it.
                continue;
            }
            std::hint::spin_loop();
        }
    }
}

fn echo_raw(prefix: &str) -> anyhow::Result<()> {
    let raw = Raw::new(prefix, false)?;
    let mut idle = Instant::now();
    let parent = parent();
    loop {
        match raw.rx.receive().map_err(|e| anyhow::anyhow!("{e:?}"))? {
            Some(m) => {
                let mut s = raw
                    .tx
                    .loan_slice_uninit(m.payload().len())
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                stamp(s.payload_mut(), read_seq(m.payload()));
                drop(m);
                // SAFETY: as in `sdk_round_trip`.
                let s = unsafe { s.assume_init() };
                s.send().map_err(|e| anyhow::anyhow!("{e:?}"))?;
                idle = Instant::now();
            }
            // The same wait as the SDK's, so that only the channel layer differs.
            None => {
                let waited = idle.elapsed();
                if waited < Duration::from_micros(50) {
                    std::hint::spin_loop();
                } else if waited < Duration::from_millis(2) {
                    std::thread::yield_now();
                } else if self::parent() != parent {
                    return Ok(()); // the benchmark is gone
                } else {
                    std::thread::sleep(Duration::from_micros(500));
                }
            }
        }
    }
}

fn sock_round_trip(sock: &mut UnixStream, buf: &mut [u8], size: usize) -> anyhow::Result<()> {
    buf[..8].copy_from_slice(&(size as u64).to_le_bytes());
    sock.write_all(&buf[..8 + size])?;
    sock.read_exact(&mut buf[..8 + size])?;
    Ok(())
}

fn echo_sock() -> anyhow::Result<()> {
    // SAFETY: fd 0 is the socketpair end the parent gave us as stdin; we own it from here.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(0) };
    let mut s = UnixStream::from(fd);
    let mut buf = vec![0u8; MAX + 8];
    loop {
        if s.read_exact(&mut buf[..8]).is_err() {
            return Ok(());
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&buf[..8]);
        let size = (u64::from_le_bytes(n) as usize).min(MAX);
        s.read_exact(&mut buf[8..8 + size])?;
        s.write_all(&buf[..8 + size])?;
    }
}
