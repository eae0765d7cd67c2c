//! sd_notify `MAINPID=` in the process driver (without the keeper): the hook that runs
//! when the process started exits can move the run to its child, which is then waited for
//! and reaped with its own status. Its own test binary: it makes itself a subreaper.

use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use bulkhead_core::event::ExitStatus;
use bulkhead_core::signal::Signal;
use bulkhead_driver::conformance::Fixture;
use bulkhead_driver::process::ProcessDriver;
use bulkhead_driver::{sys, Driver, InstanceHandle};

/// `sh` starts a `sleep` in the background, writes its pid and exits 0 at once. With
/// `follow`, the exit hook reads the pid and moves the run there (as the daemon does with
/// a `MAINPID=` queued on the notify socket); the control has no hook.
async fn run(driver: ProcessDriver, follow: bool) -> (ExitStatus, Option<u32>) {
    sys::set_child_subreaper().unwrap();
    let fx = Fixture::temp();
    let file = fx.path("main.pid");
    let spec = fx.spawn_spec(
        "mainpid",
        "sleep 60 & echo $! > main.pid.tmp && mv main.pid.tmp main.pid; exit 0",
    );
    let spawned = driver.spawn(spec).await.unwrap();
    let h = spawned.handle;
    let first = h.pid().unwrap();
    if follow {
        let weak: Arc<OnceLock<Weak<dyn InstanceHandle>>> = Arc::new(OnceLock::new());
        let _ = weak.set(Arc::downgrade(&h));
        let file = file.clone();
        h.on_main_exit(Arc::new(move || {
            let pid = std::fs::read_to_string(&file)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            if let Some(h) = weak.get().and_then(Weak::upgrade) {
                h.set_main_pid(pid).unwrap();
            }
        }));
    }
    let start = Instant::now();
    while !file.exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "no main.pid");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let child: u32 = std::fs::read_to_string(&file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut moved = None;
    if follow {
        // The run follows the child once the first process has exited.
        while h.pid() != Some(child) {
            assert!(start.elapsed() < Duration::from_secs(30), "never moved");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(sys::pidfd_open(child).is_ok(), "the child must still run");
        assert_ne!(first, child);
        moved = h.pid();
        h.signal(Signal::KILL).unwrap();
    }
    let status = tokio::time::timeout(Duration::from_secs(30), h.wait())
        .await
        .expect("the run never ended");
    (status, moved)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hook_moves_the_run_to_the_child_and_its_status_is_reported() {
    for driver in [ProcessDriver::new(), ProcessDriver::with_tracker(None)] {
        let (status, moved) = run(driver, true).await;
        assert!(moved.is_some());
        // The child's own status (killed), reaped by this subreaper: not the first
        // process's exit 0.
        assert_eq!(
            status,
            ExitStatus::Signaled {
                signal: 9,
                core_dumped: false
            }
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_hook_the_first_process_exit_ends_the_run() {
    let (status, _) = run(ProcessDriver::new(), false).await;
    assert_eq!(status, ExitStatus::Exited { code: 0 });
}
