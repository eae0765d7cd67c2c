//! The driver conformance suite against the process driver spawning through a real
//! keeper (`bulkhead keeper`), which is what `bulkhead serve` uses by default.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_driver::conformance::{self, Fixture};
use bulkhead_driver::keeper::client::{KeeperClient, KeeperDriver};

use crate::harness::BIN;

struct Keeper {
    child: Child,
    _dir: tempfile::TempDir,
    driver: KeeperDriver,
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

macro_rules! keeper_conformance {
    ($($check:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread")]
        async fn $check() {
            let k = keeper().await;
            let fixture = Fixture::temp();
            conformance::$check(&k.driver, &fixture).await;
        }
    )*};
}

keeper_conformance!(
    exit_code_fidelity,
    signal_fidelity,
    crash_detection,
    stop_graceful,
    stop_escalates_after_grace,
    grandchildren_die_with_group,
    wait_is_shared,
    signal_after_exit_is_ok,
    spawn_error_is_reported,
    stdout_is_captured,
);
