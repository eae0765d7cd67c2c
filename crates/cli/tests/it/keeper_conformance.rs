//! The driver conformance suite against the process driver spawning through a real
//! keeper (`bulkhead keeper`), which is what `bulkhead serve` uses by default.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_driver::keeper::client::{KeeperClient, KeeperDriver};

use crate::harness::BIN;

struct Keeper {
    child: Child,
    _dir: tempfile::TempDir,
    driver: Box<dyn bulkhead_driver::Driver>,
}

impl bulkhead_driver::conformance::DriverUnderTest for Keeper {
    fn driver(&self) -> &dyn bulkhead_driver::Driver {
        self.driver.as_ref()
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn keeper() -> Keeper {
    keeper_made(false).await
}

/// With `warm`, every spawn goes through a warm slot (`prewarm`, then `spawn_warm`).
async fn keeper_made(warm: bool) -> Keeper {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(BIN)
        .args(["keeper", "--state"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let sock = dir.path().join("keeper.sock");
    let start = Instant::now();
    let client: Arc<KeeperClient> = loop {
        if let Ok(c) = KeeperClient::connect(&sock).await {
            break c;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "keeper did not come up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let driver = KeeperDriver::new(client);
    // Each instance in a cgroup of its own, as `bulkhead serve` does (where it can).
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if let Some(t) =
        bulkhead_driver::process::detect_tracking(&format!("it-keeper-{}-{n}", std::process::id()))
    {
        driver.set_tracker(t);
    }
    Keeper {
        child,
        _dir: dir,
        driver: if warm {
            Box::new(bulkhead_driver::conformance::WarmFirst(driver))
        } else {
            Box::new(driver)
        },
    }
}

bulkhead_driver::conformance_tests!(keeper);

/// The whole suite on instances spawned from warm slots: a pooled process instance
/// behaves as a cold one.
mod warm {
    async fn keeper() -> super::Keeper {
        super::keeper_made(true).await
    }

    bulkhead_driver::conformance_tests!(keeper);
}
