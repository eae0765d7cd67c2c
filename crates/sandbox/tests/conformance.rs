//! The driver conformance suite against the sandbox driver, in each cgroup mode.
//!
//! The fixture's working directory lives under `/tmp`, which is private inside a sandbox:
//! the driver under test binds it in read-write (as the daemon does with an instance's
//! notify socket), so that the checks see what the instance writes.

use async_trait::async_trait;
use bulkhead_core::spec::DriverKind;
use bulkhead_driver::{Driver, SpawnError, SpawnSpec, Spawned};
use bulkhead_sandbox::cgroup::ModeChoice;
use bulkhead_sandbox::{SandboxConfig, SandboxDriver};

/// The sandbox driver, with the spawn's working directory bound in read-write. By
/// default every instance runs in the default wall (a user namespace of its tenant's
/// range), so the working directory is opened to that uid; with `host_ids`, instances
/// keep the host's ids (`user_namespace: host`, an opening), so both paths pass the suite.
pub struct WithWorkdir(Box<dyn Driver>, bool);

#[async_trait]
impl Driver for WithWorkdir {
    fn kind(&self) -> DriverKind {
        self.0.kind()
    }

    async fn spawn(&self, mut spec: SpawnSpec) -> Result<Spawned, SpawnError> {
        spec.binds.push(bulkhead_driver::Bind::same(&spec.cwd));
        if self.1 {
            let mut w = (*spec.spec).clone();
            w.sandbox
                .get_or_insert_with(Default::default)
                .user_namespace = bulkhead_core::sandbox::UserNs::Host;
            spec.spec = std::sync::Arc::new(w);
        } else {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&spec.cwd, std::fs::Permissions::from_mode(0o777));
        }
        self.0.spawn(spec).await
    }
}

/// A driver with a scope of its own: a new driver removes what its scope holds, and the
/// tests run in parallel in one process.
fn driver(mode: ModeChoice, scope: &str) -> MaybeDriver {
    driver_with(mode, scope, false)
}

fn driver_with(mode: ModeChoice, scope: &str, host_ids: bool) -> MaybeDriver {
    driver_made(mode, scope, host_ids, false)
}

/// With `warm`, every spawn goes through a warm slot (`prewarm`, then `spawn_warm`).
fn driver_made(mode: ModeChoice, scope: &str, host_ids: bool, warm: bool) -> MaybeDriver {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    MaybeDriver(
        SandboxDriver::new(SandboxConfig {
            mode,
            scope: format!("conformance-{scope}-{}-{seq}", std::process::id()),
            min_available_memory: 0,
            ..SandboxConfig::default()
        })
        .map(|d| -> Box<dyn Driver> {
            if warm {
                Box::new(bulkhead_driver::conformance::WarmFirst(d))
            } else {
                Box::new(d)
            }
        })
        .map(|d| WithWorkdir(d, host_ids))
        .map_err(|e| format!("the sandbox driver cannot start here ({mode:?}): {e}")),
    )
}

/// The sandbox driver, or why it cannot start here (no root, no usable cgroups): then
/// every check prints that reason and passes without running, never against another
/// driver. `.ci/run` runs as root on a host where the `auto` and `v1` modes start
/// (`scripts/vm-cgroup2` covers `unified`), so in CI they run.
pub struct MaybeDriver(Result<WithWorkdir, String>);

impl bulkhead_driver::conformance::DriverUnderTest for MaybeDriver {
    fn driver(&self) -> &dyn Driver {
        match &self.0 {
            Ok(d) => d,
            Err(why) => unreachable!("skip_reason is asked first: {why}"),
        }
    }

    fn skip_reason(&self) -> Option<String> {
        self.0.as_ref().err().cloned()
    }
}

mod auto {
    use super::*;
    async fn sandbox_driver() -> MaybeDriver {
        driver(ModeChoice::Auto, "auto")
    }
    bulkhead_driver::conformance_tests!(sandbox_driver);
}

mod v1 {
    use super::*;
    async fn sandbox_driver() -> MaybeDriver {
        driver(ModeChoice::V1, "v1")
    }
    bulkhead_driver::conformance_tests!(sandbox_driver);
}

mod unified {
    use super::*;
    async fn sandbox_driver() -> MaybeDriver {
        driver(ModeChoice::Unified, "unified")
    }
    bulkhead_driver::conformance_tests!(sandbox_driver);
}

mod host_ids {
    use super::*;
    async fn sandbox_driver() -> MaybeDriver {
        driver_with(ModeChoice::Auto, "host-ids", true)
    }
    bulkhead_driver::conformance_tests!(sandbox_driver);
}

/// The whole suite on instances spawned from warm slots: a pooled instance behaves as a
/// cold one (default wall, and with the host's ids).
mod warm {
    use super::*;
    async fn sandbox_driver() -> MaybeDriver {
        driver_made(ModeChoice::Auto, "warm", false, true)
    }
    bulkhead_driver::conformance_tests!(sandbox_driver);
}

mod warm_host_ids {
    use super::*;
    async fn sandbox_driver() -> MaybeDriver {
        driver_made(ModeChoice::Auto, "warm-host-ids", true, true)
    }
    bulkhead_driver::conformance_tests!(sandbox_driver);
}
