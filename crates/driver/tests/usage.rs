//! Usage of many instances: one scan of `/proc`, not one per instance. A test binary of
//! its own: the scan counter is process-wide, and other tests' sweeps would move it.

use std::time::Duration;

use bulkhead_core::signal::Signal;
use bulkhead_driver::conformance::{start, Fixture};
use bulkhead_driver::process::ProcessDriver;
use bulkhead_driver::sys;

/// Regression: the usage of each instance was found by scanning every `/proc/<pid>/stat`
/// (instances x processes: `list` of 1,500 instances took 55 s). Usage of many instances
/// now comes from one shared scan.
#[tokio::test(flavor = "multi_thread")]
async fn usage_of_many_instances_comes_from_one_scan_of_proc() {
    let d = ProcessDriver::new();
    let fx = Fixture::temp();
    let mut runs = Vec::new();
    for i in 0..20 {
        runs.push(start(&d, &fx, &format!("usage{i}"), "exec sleep 1000").await);
    }
    // Settle, so that every instance is older than the table taken below.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = sys::proc_scans();
    for r in &runs {
        let s = r.spawned.handle.stats().unwrap();
        assert!(s.pids >= 1 && s.memory_bytes > 0, "{s:?}");
    }
    let scans = sys::proc_scans() - before;
    assert!(scans <= 1, "{scans} scans of /proc for 20 instances");
    for r in &runs {
        r.spawned.handle.signal(Signal::KILL).unwrap();
        r.wait().await;
    }
}
