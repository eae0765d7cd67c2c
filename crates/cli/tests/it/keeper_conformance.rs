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
    keeper_made(Through::Cold).await
}

/// How the suite's spawns start.
#[derive(Clone, Copy, PartialEq)]
enum Through {
    /// The keeper clones each one.
    Cold,
    /// A warm slot made for it (`prewarm`, then `spawn_warm`).
    Warm,
    /// The keeper's spare, made before each spawn (`make_spare_now`).
    Spare,
}

/// The process driver with every spawn taking the keeper's spare: a spawn that starts
/// the program must have taken it.
struct SpareFirst(Arc<KeeperDriver>);

#[async_trait::async_trait]
impl bulkhead_driver::Driver for SpareFirst {
    fn kind(&self) -> bulkhead_core::spec::DriverKind {
        self.0.kind()
    }

    async fn spawn(
        &self,
        spec: bulkhead_driver::SpawnSpec,
    ) -> Result<bulkhead_driver::Spawned, bulkhead_driver::SpawnError> {
        assert!(self.0.make_spare_now().await?, "the keeper made no spare");
        let before = self.0.spare_stats().taken;
        let res = self.0.spawn(spec).await;
        if res.is_ok() {
            assert_eq!(
                self.0.spare_stats().taken,
                before + 1,
                "the spawn did not take the spare"
            );
        }
        res
    }

    fn tracks_every_descendant(&self) -> bool {
        self.0.tracks_every_descendant()
    }

    fn runs_host_programs(&self) -> bool {
        self.0.runs_host_programs()
    }

    fn shutdown(&self) {
        self.0.shutdown()
    }
}

/// With `through`, every spawn goes that way.
async fn keeper_made(through: Through) -> Keeper {
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
        driver: match through {
            Through::Cold => Box::new(driver),
            Through::Warm => Box::new(bulkhead_driver::conformance::WarmFirst(driver)),
            Through::Spare => Box::new(SpareFirst(Arc::new(driver))),
        },
    }
}

bulkhead_driver::conformance_tests!(keeper);

/// The whole suite on instances spawned from warm slots: a pooled process instance
/// behaves as a cold one.
mod warm {
    async fn keeper() -> super::Keeper {
        super::keeper_made(super::Through::Warm).await
    }

    bulkhead_driver::conformance_tests!(keeper);
}

/// The whole suite on instances spawned from the keeper's spare (the default path of a
/// process launch without `warm:`): such an instance behaves as a cold one, its user,
/// limits, umask and working directory taken at the hand-over.
mod spare {
    async fn keeper() -> super::Keeper {
        super::keeper_made(super::Through::Spare).await
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
    let k = keeper_made(Through::Warm).await;
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
    let k = keeper_made(Through::Warm).await;
    let fx = bulkhead_driver::conformance::Fixture::temp();
    for _ in 0..20 {
        bulkhead_driver::conformance::stdout_is_captured(k.driver.as_ref(), &fx).await;
    }
}
