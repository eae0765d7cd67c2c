//! Many live instances, and the requests an operator sends at them all at once: `list`,
//! Prometheus scrapes and launches run concurrently while `health` is asked over and over;
//! every request is answered and nothing fails. Bounded: 300 live `sleep` instances; long
//! (`BULKHEAD_FAULTS_LONG=1`): 10,000 (fewer, printed, where the open-file limit cannot
//! hold them). Latencies are printed, not asserted.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bulkhead_api::v1;

use crate::harness::*;
use crate::support::*;

/// Launches `n` instances of `workload` in namespaces `s0..` (`end`: ends those
/// namespaces, SIGKILL at once) from 32 concurrent clients; returns the failures.
fn for_all(socket: &std::path::Path, workload: &str, n: usize, end: bool) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let failures = Arc::new(Mutex::new(Vec::new()));
    rt.block_on(async {
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (socket, next, failures) = (socket.to_owned(), next.clone(), failures.clone());
            let workload = workload.to_owned();
            tasks.push(tokio::spawn(async move {
                let mut c = bulkhead_api::connect(&socket).await.unwrap();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    let res = if end {
                        let req = v1::EndScopeRequest {
                            name: format!("s{i}"),
                            grace_ms: Some(0),
                        };
                        c.end_namespace(req).await.map(drop)
                    } else {
                        let req = v1::LaunchRequest {
                            workload: workload.clone(),
                            namespace: Some(format!("s{i}")),
                            wait: v1::WaitFor::Started as i32,
                            ..Default::default()
                        };
                        c.launch(req).await.map(drop)
                    };
                    if let Err(e) = res {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("s{i}: {}", e.message()));
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let f = failures.lock().unwrap().clone();
    f
}

#[test]
fn list_scrapes_and_launches_at_scale_leave_health_answered() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("skipped: no curl to scrape /metrics with");
        return;
    }
    let n = if long() {
        raise_nofile();
        sleepers_that_fit(10_000)
    } else {
        300
    };
    let mark = marker("scale");
    let sleeper =
        format!("name: sleeper\ncommand: [/bin/sleep, '100000']\nenv: {{FAULT_MARK: {mark}}}\n");
    let churn = format!(
        "name: churn\ncommand: [/bin/sleep, '100000']\nisolation: session\nenv: {{FAULT_MARK: {mark}}}\n"
    );
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let d = Daemon::start_with_args(
        &[("sleeper", &sleeper), ("churn", &churn)],
        &["--metrics", &addr.to_string()],
    );
    let t = Instant::now();
    let failures = for_all(&d.socket, "sleeper", n, false);
    assert!(
        failures.is_empty(),
        "{} launches failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    println!("scale: {n} launches in {:.1} s", t.elapsed().as_secs_f64());

    // While lists, scrapes and launches run, health is asked over and over: every call is
    // answered (within the suite's generous deadline: a hang, not a slow answer, fails).
    let done = Arc::new(AtomicBool::new(false));
    let busy = |f: Box<dyn FnOnce() + Send>| {
        let done = done.clone();
        std::thread::spawn(move || {
            f();
            done.store(true, Ordering::SeqCst);
        })
    };
    let socket = d.socket.clone();
    let lister = busy(Box::new(move || {
        for _ in 0..5 {
            let o = Command::new(BIN)
                .args(["--socket"])
                .arg(&socket)
                .args(["list", "-o", "json"])
                .output()
                .unwrap();
            assert!(o.status.success(), "list: {}", stderr(&o));
            let listed = serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap();
            assert!(listed.as_array().unwrap().len() >= n);
        }
    }));
    let scraper = std::thread::spawn(move || {
        for _ in 0..5 {
            let o = Command::new("curl")
                // A hang fails, not a slow answer (a debug build at 10,000 instances).
                .args(["-sSf", "--max-time", "300"])
                .arg(format!("http://{addr}/metrics"))
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "a scrape failed ({}): {}",
                o.status,
                stderr(&o)
            );
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(
                text.contains("bulkhead_instances"),
                "scrape: {}",
                &text[..text.len().min(300)]
            );
        }
    });
    let socket = d.socket.clone();
    let launcher = std::thread::spawn(move || {
        for i in 0..20 {
            let id = format!("session:c{i}:churn");
            let cli = |args: &[&str]| {
                Command::new(BIN)
                    .arg("--socket")
                    .arg(&socket)
                    .args(args)
                    .output()
                    .unwrap()
            };
            let o = cli(&["launch", "churn", "--session", &format!("c{i}")]);
            assert!(o.status.success(), "launch: {}", stderr(&o));
            let o = cli(&["terminate", &id]);
            assert!(o.status.success(), "terminate: {}", stderr(&o));
        }
    });
    let mut samples = Vec::new();
    while !done.load(Ordering::SeqCst) || samples.len() < 10 {
        let t = Instant::now();
        let o = d.cli(&["health", "-o", "json"]);
        assert!(
            o.status.success(),
            "health was not answered: {}",
            stderr(&o)
        );
        samples.push(t.elapsed());
        assert!(t.elapsed() < DEADLINE, "health took {:?}", t.elapsed());
    }
    lister.join().expect("the lists");
    scraper.join().expect("the scrapes");
    launcher.join().expect("the launches");
    let (p50, p99, max) = percentiles(&mut samples);
    println!(
        "scale: health at {n} live instances during lists, scrapes and launches: n={} p50 {p50:.1} ms p99 {p99:.1} ms max {max:.1} ms",
        samples.len()
    );

    let failures = for_all(&d.socket, "sleeper", n, true);
    assert!(failures.is_empty(), "{failures:?}");
    wait_until("every instance of the test is gone", || {
        marked(&mark).is_empty()
    });
}

/// `bulkhead top` keeps up with many instances (300; 10,000 with
/// `BULKHEAD_FAULTS_LONG=1`): running in a real terminal while they are launched, its
/// header counts every one, the view scrolls to the last and back, and when all end at
/// once (a burst of events) its counts follow to zero live.
#[test]
fn top_keeps_up_with_many_instances() {
    let n = if long() {
        raise_nofile();
        sleepers_that_fit(10_000)
    } else {
        300
    };
    let mark = marker("top");
    let sleeper =
        format!("name: sleeper\ncommand: [/bin/sleep, '100000']\nenv: {{FAULT_MARK: {mark}}}\n");
    let d = Daemon::start(&[("sleeper", &sleeper)]);
    let Some(t) = crate::tmux::Tmux::start(&d, 100, 30, &[]) else {
        return;
    };
    let started = Instant::now();
    let failures = for_all(&d.socket, "sleeper", n, false);
    assert!(
        failures.is_empty(),
        "{:?}",
        &failures[..failures.len().min(5)]
    );
    let header = |s: &str| s.lines().next().unwrap_or("").to_owned();
    t.wait("every instance counted", |s| {
        header(s).contains(&format!("{n} instances  {n} ready"))
    });
    println!(
        "top: {n} instances launched and counted in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Ids sort as text: the last in the table is the greatest.
    let mut ids: Vec<String> = (0..n).map(|i| format!("ns:s{i}:sleeper")).collect();
    ids.sort();
    t.keys(&["End"]);
    t.wait("the last row", |s| {
        crate::tmux::row(s, &ids[n - 1]).is_some()
    });
    t.keys(&["Home"]);
    t.wait("the first row", |s| crate::tmux::row(s, &ids[0]).is_some());
    let failures = for_all(&d.socket, "sleeper", n, true);
    assert!(
        failures.is_empty(),
        "{:?}",
        &failures[..failures.len().min(5)]
    );
    // Every row terminated, none live. (Rows of ended instances the daemon has since
    // forgotten, past `--finished-kept`, may be gone from the view, so fewer than n.)
    t.wait("every instance ended", |s| {
        let h = header(s);
        let mut w = h.split_whitespace();
        w.position(|x| x == "top");
        let (total, count, state) = (w.next(), w.nth(1), w.next());
        total.is_some() && total == count && state == Some("terminated")
    });
    t.text("q");
    t.wait("top to exit", |s| s.contains("top exited 0"));
}
