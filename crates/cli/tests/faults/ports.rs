//! Port allocation under bursts (regression: 36 of 10,000 launches at 32 concurrent failed
//! with `no free port after 64 tries`; see `crates/daemon/src/ports.rs` for the cause).
//!
//! - Bounded: 300 launches at 32 concurrent of a workload that binds its `$PORT` (busybox
//!   `httpd`, ready once the port accepts), all kept running in a range of 320 ports: every
//!   launch succeeds and no two instances share a port.
//! - Long (`BULKHEAD_FAULTS_LONG=1`), in addition: 10,000 launches at 32 concurrent of
//!   `sleep` (which never binds its port), all kept running in the default range. The old
//!   allocator drew from the 7,058 ports the kernel's autobind uses and could not pass ~6,500.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bulkhead_api::v1;

use crate::harness::*;
use crate::support::*;

const BUSYBOX: &str = "/usr/bin/busybox";

/// Launches `workload` in namespaces `b0..b{n}` from `clients` concurrent clients, each
/// waiting until ready (`end`: ends those namespaces instead); returns the failures
/// (namespace, message).
fn burst(d: &Daemon, workload: &str, n: usize, clients: usize, end: bool) -> Vec<(String, String)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let failures = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    rt.block_on(async {
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (socket, next, failures) = (d.socket.clone(), next.clone(), failures.clone());
            let workload = workload.to_owned();
            tasks.push(tokio::spawn(async move {
                let mut c = bulkhead_api::connect(&socket).await.unwrap();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    let ns = format!("b{i}");
                    let req = v1::LaunchRequest {
                        workload: workload.clone(),
                        namespace: Some(ns.clone()),
                        wait: v1::WaitFor::Ready as i32,
                        ..Default::default()
                    };
                    let res = if end {
                        let req = v1::EndScopeRequest {
                            name: ns.clone(),
                            ..Default::default()
                        };
                        c.end_namespace(req).await.map(|_| ())
                    } else {
                        c.launch(req).await.map(|_| ())
                    };
                    if let Err(e) = res {
                        failures.lock().unwrap().push((ns, e.message().to_owned()));
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    println!(
        "ports burst: {n} {} of {workload} at {clients} concurrent in {:.1} s",
        if end { "ends" } else { "launches" },
        started.elapsed().as_secs_f64()
    );
    let f = failures.lock().unwrap().clone();
    f
}

/// The ports of the live instances of `workload`; asserts they are distinct.
fn distinct_ports(d: &Daemon, workload: &str, expected: usize) -> HashSet<u16> {
    let list = d.json(&["list", "-o", "json"]);
    let live: Vec<&serde_json::Value> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["workload"] == workload && i["state"] == "ready")
        .collect();
    assert_eq!(live.len(), expected, "live instances of {workload}");
    let ports: HashSet<u16> = live
        .iter()
        .map(|i| {
            i["address"]
                .as_str()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap()
        })
        .collect();
    assert_eq!(ports.len(), expected, "two live instances share a port");
    ports
}

#[test]
fn a_burst_of_launches_that_take_ports_never_runs_out() {
    if !std::path::Path::new(BUSYBOX).exists() {
        eprintln!("skipped: {BUSYBOX} is not installed (apt-get install busybox)");
        return;
    }
    let mark = marker("ports");
    let httpd = format!(
        "name: httpd\ncommand: [{BUSYBOX}, httpd, -f, -p, '127.0.0.1:${{PORT}}']\n\
         env: {{FAULT_MARK: {mark}}}\nreadiness: {{tcp: {{period: 20ms}}, timeout: 60s}}\n\
         shutdown: {{grace: 5s}}\n"
    );
    let sleeper =
        format!("name: sleeper\ncommand: [/bin/sleep, '100000']\nenv: {{FAULT_MARK: {mark}}}\n");
    // A range a little larger than the burst, away from the kernel's ephemeral ports; a
    // few ports of it may be in use by other programs (the scan skips them).
    let (n, range) = (300, "24000-24319");
    let mut args = vec!["--port-range".to_owned(), range.to_owned()];
    let long = long();
    if long {
        args = vec!["--port-range".into(), "20000-32000".into()];
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    if long {
        // Before the daemon starts: it inherits the limit.
        raise_nofile();
    }
    let d = Daemon::start_with_args(&[("httpd", &httpd), ("sleeper", &sleeper)], &args);

    let failures = burst(&d, "httpd", n, 32, false);
    assert!(
        failures.is_empty(),
        "{} of {n} launches failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let ports = distinct_ports(&d, "httpd", n);
    if !long {
        let r: bulkhead_core::port::PortRange = range.parse().unwrap();
        assert!(ports.iter().all(|p| r.contains(*p)), "a port outside {r}");
    }

    let m = if long {
        sleepers_that_fit(scale(0, 10_000))
    } else {
        0
    };
    if long {
        let failures = burst(&d, "sleeper", m, 32, false);
        let for_port = failures
            .iter()
            .filter(|f| f.1.contains("no free port"))
            .count();
        assert!(
            failures.is_empty(),
            "{} of {m} launches failed ({for_port} for want of a port), e.g. {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        distinct_ports(&d, "sleeper", m);
    }

    // Everything goes (each instance with its shutdown), and nothing is left.
    let all = n.max(m);
    let failures = burst(&d, "", all, 32, true);
    assert!(failures.is_empty(), "{failures:?}");
    wait_until("every instance of the burst is gone", || {
        marked(&mark).is_empty()
    });
}
