//! `cargo bench -p bulkhead-bench --bench activation`: what clients see when a
//! socket-activated instance is killed with SIGKILL and restarted by its policy, against
//! the same program binding its own socket.
//!
//! A daemon (in this process, on its own runtime, spawning through a keeper that is this
//! binary in `keeper` mode: the default path) runs two instances of the same tiny HTTP
//! server (this binary in `http-child` mode, std only): `with` gets its socket from the
//! daemon (`sockets: [{listen: "tcp:$PORT"}]`, descriptor 3), `without` binds `$PORT`
//! itself. Both restart `always` after a fixed 50 ms backoff (factor 1, no jitter).
//!
//! One iteration: `kill -9` the instance's pid, then one client connects in a loop, each
//! connection sending a request and reading the answer, until one is answered. Measured:
//! the time from the kill to that first answer, and how many connections were refused in
//! that window (with a loop as fast as one client thread goes). The two variants alternate,
//! so both see the same machine. Options: `--iterations N` (default 30), `--write PATH`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bulkhead_api::v1;
use bulkhead_bench::{ms, ratio, Samples};

/// The tiny server: descriptor 3 when `LISTEN_FDS`/`LISTEN_PID` say so, else `$PORT`.
fn http_child() -> anyhow::Result<()> {
    use std::os::fd::FromRawFd;
    let pid = std::process::id().to_string();
    let activated = std::env::var("LISTEN_PID").ok().as_deref() == Some(pid.as_str())
        && std::env::var("LISTEN_FDS").ok().as_deref() == Some("1");
    let listener = if activated {
        // SAFETY: the sd_listen_fds protocol hands this process descriptor 3, a listening
        // TCP socket it now owns.
        unsafe { std::net::TcpListener::from_raw_fd(3) }
    } else {
        let port: u16 = std::env::var("PORT")?.parse()?;
        // std sets SO_REUSEADDR, as servers do.
        std::net::TcpListener::bind(("127.0.0.1", port))?
    };
    for c in listener.incoming() {
        let Ok(mut c) = c else { continue };
        let mut buf = [0u8; 1024];
        let _ = c.read(&mut buf);
        let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| bulkhead_bench::flag(&args, name);
    match args.get(1).map(String::as_str) {
        Some("keeper") => {
            let state = flag("--state").ok_or_else(|| anyhow::anyhow!("keeper: --state"))?;
            bulkhead_driver::keeper::server::run(std::path::Path::new(&state), 0)?;
            return Ok(());
        }
        Some("http-child") => return http_child(),
        _ => {}
    }
    let iterations: usize = flag("--iterations")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(30);
    let write = flag("--write").map(PathBuf::from);
    let exe = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    let wl = dir.path().join("workloads");
    for (name, sockets) in [
        ("with", "sockets: [{name: http, listen: \"tcp:$PORT\"}]\n"),
        ("without", ""),
    ] {
        std::fs::create_dir_all(wl.join(name))?;
        std::fs::write(
            wl.join(name).join("manifest.yaml"),
            format!(
                "name: {name}\ncommand: [{}, http-child]\nrestart: {{policy: always, max_failures: 100000, backoff: {{initial: 50ms, max: 50ms, factor: 1, jitter: 0}}}}\nshutdown: {{grace: 1s}}\n{sockets}",
                exe.display()
            ),
        )?;
    }
    let mut config = bulkhead_daemon::Config::new(wl.clone(), Some(dir.path().join("state")), None);
    config.keeper = Some(exe.clone());
    let socket = config.socket.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let daemon = rt.block_on(bulkhead_daemon::Daemon::start(config))?;
    let mut client = rt.block_on(bulkhead_api::connect(&socket))?;
    let mut get = |id: &str| -> anyhow::Result<v1::Instance> {
        Ok(rt
            .block_on(client.get(v1::GetRequest {
                id: id.into(),
                ..Default::default()
            }))?
            .into_inner())
    };
    let mut ports = Vec::new();
    {
        let mut c = rt.block_on(bulkhead_api::connect(&socket))?;
        for name in ["with", "without"] {
            let r = rt.block_on(c.launch(v1::LaunchRequest {
                workload: name.into(),
                wait: v1::WaitFor::Ready as i32,
                timeout_ms: 60_000,
                ..Default::default()
            }))?;
            let i = r.into_inner().instance.unwrap_or_default();
            ports.push((i.id.clone(), i.port as u16));
        }
    }

    let mut time = [Samples::new("with"), Samples::new("without")];
    let mut refused: [Vec<usize>; 2] = [Vec::new(), Vec::new()];
    let mut broken = [0usize; 2];
    for it in 0..iterations {
        for (v, (id, port)) in ports.iter().enumerate() {
            // Running, and answering, before the kill.
            let deadline = Instant::now() + Duration::from_secs(30);
            let pid = loop {
                let i = get(id)?;
                if i.restarts as usize == it && i.pid.is_some() && answer(*port).is_ok() {
                    break i.pid.unwrap_or_default();
                }
                anyhow::ensure!(Instant::now() < deadline, "{id} did not come back");
                std::thread::sleep(Duration::from_millis(5));
            };
            let t0 = Instant::now();
            // SAFETY: kill(2) of the instance's pid, read from the daemon just before.
            anyhow::ensure!(unsafe { libc::kill(pid as i32, libc::SIGKILL) } == 0);
            let mut n_refused = 0;
            loop {
                match answer(*port) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => n_refused += 1,
                    // The old program had accepted it, or it closed before answering.
                    Err(_) => broken[v] += 1,
                }
                anyhow::ensure!(t0.elapsed() < Duration::from_secs(30), "{id}: no answer");
            }
            time[v].values.push(t0.elapsed());
            refused[v].push(n_refused);
        }
    }
    rt.block_on(daemon.shutdown());

    let pct = |v: &[usize], p: f64| {
        let mut v = v.to_vec();
        v.sort();
        v.get(((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1)
            .copied()
            .unwrap_or(0)
    };
    let [with, without] = &time;
    let report = format!(
        "| variant (kill -9, restart after 50 ms) | p50 ms | p99 ms | refused p50 | refused max | cut short |\n|---|---|---|---|---|---|\n\
         | sockets from bulkhead (`tcp:$PORT`, fd 3) | {} | {} | {} | {} | {} |\n\
         | program binds `$PORT` itself | {} | {} | {} | {} | {} |\n\n\
         Kill to first answer with sockets: {} of the time without at p50 ({} at p99). \
         {iterations} kills each, spawned through the keeper; one client connecting in a loop.\n",
        ms(with.p50()),
        ms(with.p99()),
        pct(&refused[0], 50.0),
        pct(&refused[0], 100.0),
        broken[0],
        ms(without.p50()),
        ms(without.p99()),
        pct(&refused[1], 50.0),
        pct(&refused[1], 100.0),
        broken[1],
        ratio(with.p50(), without.p50()),
        ratio(with.p99(), without.p99()),
    );
    println!("{report}");
    if let Some(p) = write {
        std::fs::write(p, &report)?;
    }
    Ok(())
}

/// One request on a new connection, answered with `ok`.
fn answer(port: u16) -> std::io::Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    if body.ends_with("ok") {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "no answer",
        ))
    }
}
