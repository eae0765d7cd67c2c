//! Launch/terminate cycles leave nothing behind: the daemon's fds and memory stay flat, no
//! zombie piles up, logs are kept only for the instances still remembered, and the state
//! database stays bounded by its retention.

use bulkhead_api::v1;

use crate::harness::*;
use crate::support::*;

async fn cycle(c: &mut bulkhead_api::BulkheadClient<tonic::transport::Channel>, ns: &str) {
    let r = c
        .launch(v1::LaunchRequest {
            workload: "svc".into(),
            namespace: Some(ns.into()),
            wait: v1::WaitFor::Ready as i32,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("launch {ns}: {e}"))
        .into_inner();
    let id = r.instance.expect("an instance").id;
    c.terminate(v1::TerminateRequest {
        id: id.clone(),
        grace_ms: None,
        with_dependencies: false,
    })
    .await
    .unwrap_or_else(|e| panic!("terminate {id}: {e}"));
}

#[test]
fn launch_terminate_cycles_leak_nothing() {
    let mark = marker("leak");
    // One line of output: every instance has a log file.
    let m = format!(
        "name: svc\ncommand: [/bin/sh, -c, 'echo up; exec sleep 1000']\nenv: {{FAULT_MARK: {mark}}}\n"
    );
    let retention = 2000;
    let d = Daemon::start_with_args(&[("svc", &m)], &["--event-retention", "2000"]);
    let daemon = d.child.as_ref().unwrap().id();
    let keeper = d.keeper_pid();
    let cycles = scale(1000, 10_000);
    let warmup = 100;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (fds_before, rss_before, fds_after, rss_after) = rt.block_on(async {
        let mut c = bulkhead_api::connect(&d.socket).await.unwrap();
        for i in 0..warmup {
            cycle(&mut c, &format!("w{i}")).await;
        }
        let before = (fd_count(daemon), rss_kib(daemon));
        for i in 0..cycles {
            cycle(&mut c, &format!("c{i}")).await;
        }
        let after = (fd_count(daemon), rss_kib(daemon));
        (before.0, before.1, after.0, after.1)
    });
    println!(
        "{cycles} cycles: daemon fds {fds_before} -> {fds_after}, rss {rss_before} KiB -> {rss_after} KiB"
    );
    assert!(
        fds_after <= fds_before + 4,
        "the daemon's fds grew from {fds_before} to {fds_after}"
    );
    assert!(
        rss_after <= rss_before + 32 * 1024,
        "the daemon's memory grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert!(
        zombie_children(daemon).is_empty(),
        "zombies under the daemon"
    );
    if let Some(k) = keeper {
        assert!(zombie_children(k).is_empty(), "zombies under the keeper");
    }
    assert!(
        marked(&mark).is_empty(),
        "processes left: {:?}",
        marked(&mark)
    );
    // Each instance had a cgroup of its own (where the host allows it): none is left.
    let h = d.json(&["health", "-o", "json"]);
    if let Some(scope) = h["process_tracking"]
        .as_str()
        .and_then(|t| t.strip_prefix("cgroup "))
    {
        let left: Vec<_> = std::fs::read_dir(scope)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default();
        // But the keeper's spare slot's, which waits for the next launch (at most one).
        let (spares, left): (Vec<_>, Vec<_>) =
            left.into_iter().partition(|p: &std::path::PathBuf| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("spare-"))
            });
        assert!(left.is_empty(), "instance cgroups left: {left:?}");
        assert!(
            spares.len() <= 1,
            "more than one spare's cgroup: {spares:?}"
        );
    }
    // Every key was new: finished instances are remembered only up to a bound, and so
    // are their logs (a forgotten instance's log goes with it).
    let listed = listed(&d).len();
    assert!(
        listed <= bulkhead_daemon::FINISHED_KEPT,
        "{listed} finished instances are still kept"
    );
    let logs = std::fs::read_dir(d.state.join("logs")).unwrap().count();
    println!("{logs} log files kept");
    assert!(
        logs <= bulkhead_daemon::FINISHED_KEPT,
        "{logs} log files left after {} cycles of new keys",
        warmup + cycles
    );
    // The event log is bounded by its retention (trimmed in batches), and so is the file;
    // the instance table holds only what is not final.
    let db = rusqlite::Connection::open_with_flags(
        d.state.join("bulkhead.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let rows: i64 = db
        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .unwrap();
    println!("{rows} events kept in the database (retention {retention})");
    assert!(
        rows as usize <= retention * 2,
        "{rows} events kept with a retention of {retention}"
    );
    let live: i64 = db
        .query_row("SELECT count(*) FROM instances", [], |r| r.get(0))
        .unwrap();
    assert_eq!(live, 0, "the instance table still holds finished instances");
    let db: u64 = ["bulkhead.db", "bulkhead.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(d.state.join(f)).ok())
        .map(|m| m.len())
        .sum();
    println!("state database: {} KiB", db / 1024);
    assert!(db < 64 << 20, "the state database grew to {db} bytes");
}
