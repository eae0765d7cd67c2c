//! A mixed request load over the Unix socket from concurrent clients: no request fails.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_api::v1;

use crate::harness::*;
use crate::support::*;

#[derive(Default)]
struct Lat {
    launch: Vec<Duration>,
    reuse: Vec<Duration>,
    terminate: Vec<Duration>,
    list: Vec<Duration>,
}

#[test]
fn mixed_load_has_no_errors() {
    let mark = marker("load");
    let m = format!("name: svc\ncommand: [/bin/sleep, '1000']\nenv: {{FAULT_MARK: {mark}}}\n");
    let d = Daemon::start(&[("svc", &m)]);
    let secs = scale(8, 60) as u64;
    let clients = 4;
    let errors = Arc::new(AtomicUsize::new(0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let lat = rt.block_on(async {
        let end = Instant::now() + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for t in 0..clients {
            let socket = d.socket.clone();
            let errors = errors.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = bulkhead_api::connect(&socket).await.unwrap();
                let mut lat = Lat::default();
                let mut live: Vec<String> = Vec::new();
                let mut n = 0u64;
                let launch = |ns: String| v1::LaunchRequest {
                    workload: "svc".into(),
                    namespace: Some(ns),
                    wait: v1::WaitFor::Ready as i32,
                    ..Default::default()
                };
                while Instant::now() < end {
                    n += 1;
                    let start = Instant::now();
                    let (res, bucket) = match n % 4 {
                        0 => (
                            c.launch(launch(format!("l{t}-{n}"))).await.map(|r| {
                                live.push(r.into_inner().instance.unwrap().id);
                            }),
                            &mut lat.launch,
                        ),
                        1 if !live.is_empty() => {
                            let ns = live[0].split(':').nth(1).unwrap().to_owned();
                            (
                                c.launch(launch(ns)).await.map(|r| {
                                    assert!(!r.into_inner().created, "a reuse created an instance");
                                }),
                                &mut lat.reuse,
                            )
                        }
                        2 if !live.is_empty() => {
                            let id = live.remove(0);
                            (
                                c.terminate(v1::TerminateRequest {
                                    id,
                                    grace_ms: None,
                                    with_dependencies: false,
                                })
                                .await
                                .map(|_| ()),
                                &mut lat.terminate,
                            )
                        }
                        _ => (
                            c.list(v1::ListRequest::default()).await.map(|_| ()),
                            &mut lat.list,
                        ),
                    };
                    match res {
                        Ok(()) => bucket.push(start.elapsed()),
                        Err(e) => {
                            eprintln!("client {t}: request failed: {e}");
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                for id in live {
                    let _ = c
                        .terminate(v1::TerminateRequest {
                            id,
                            grace_ms: None,
                            with_dependencies: false,
                        })
                        .await;
                }
                lat
            }));
        }
        let mut all = Lat::default();
        for t in tasks {
            let l = t.await.unwrap();
            all.launch.extend(l.launch);
            all.reuse.extend(l.reuse);
            all.terminate.extend(l.terminate);
            all.list.extend(l.list);
        }
        all
    });
    let mut lat = lat;
    for (name, s) in [
        ("launch", &mut lat.launch),
        ("reuse", &mut lat.reuse),
        ("terminate", &mut lat.terminate),
        ("list", &mut lat.list),
    ] {
        let n = s.len();
        let (p50, p99, max) = percentiles(s);
        println!("load {name}: n={n} p50={p50:.3} ms p99={p99:.3} ms max={max:.3} ms");
        assert!(n > 0, "no {name} request completed");
    }
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "requests failed under load"
    );
    wait_until("every instance of the load is gone", || {
        marked(&mark).is_empty()
    });
}
