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
    client: Arc<KeeperClient>,
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
    let driver = KeeperDriver::new(Arc::clone(&client));
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
        client,
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

/// A program that is found but cannot be exec'd (an empty executable file: `ENOEXEC`)
/// fails in the slot, after the keeper was told the slot is the instance: the launch gets
/// the same `exec` error as a cold spawn's, and the keeper keeps nothing of it (neither
/// an instance nor a slot), while a slot nobody takes is not an instance either.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_exec_in_a_warm_slot_is_an_exec_error_and_the_keeper_keeps_nothing() {
    use bulkhead_driver::conformance::Fixture;
    let k = keeper_made(true).await;
    let fx = Fixture::temp();
    let prog = fx.path("empty");
    std::fs::write(&prog, b"").unwrap();
    std::fs::set_permissions(&prog, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut spec = fx.spawn_spec("noexec", "unused");
    spec.argv = vec![prog.display().to_string()];
    let e = match k.driver.spawn(spec.clone()).await {
        Ok(_) => panic!("an empty file was exec'd"),
        Err(e) => e,
    };
    assert!(
        matches!(&e, bulkhead_driver::SpawnError::Exec { source, .. } if source.raw_os_error() == Some(libc::ENOEXEC)),
        "{e:?}"
    );
    // A slot made and not taken is no instance of the keeper's either.
    let slot = k
        .driver
        .prewarm(bulkhead_driver::warm::WarmSpec {
            slot: "warm-noexec-x".into(),
            spec: spec.spec.clone(),
            cwd: spec.cwd.clone(),
            ids: None,
            binds: Vec::new(),
            port: 0,
        })
        .await
        .unwrap();
    assert!(slot.alive());
    let start = Instant::now();
    loop {
        let held = k.client.list().await.unwrap();
        if held.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the keeper still holds {} entries",
            held.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    slot.discard().await;
}

/// A program that exits at once from a warm slot keeps its output: the keeper learns
/// the slot is an instance (`Assign`) before it reaps it, or it would forget it as an
/// untaken slot, output and all. Twenty times over, to meet the race if it is there.
#[tokio::test(flavor = "multi_thread")]
async fn output_of_programs_that_exit_at_once_from_warm_slots_is_kept() {
    let k = keeper_made(true).await;
    let fx = bulkhead_driver::conformance::Fixture::temp();
    for _ in 0..20 {
        bulkhead_driver::conformance::stdout_is_captured(k.driver.as_ref(), &fx).await;
    }
}
