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
    driver: KeeperDriver,
}

impl bulkhead_driver::conformance::DriverUnderTest for Keeper {
    fn driver(&self) -> &dyn bulkhead_driver::Driver {
        &self.driver
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn keeper() -> Keeper {
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
    Keeper {
        child,
        _dir: dir,
        driver: KeeperDriver::new(client),
    }
}

bulkhead_driver::conformance_tests!(keeper);
