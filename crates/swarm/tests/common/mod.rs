//! Finding the test swarm that `.ci/setup-swarm.sh` starts.

#![allow(dead_code)]

use bulkhead_driver::conformance::Fixture;
use bulkhead_swarm::SwarmDriver;

/// The image every swarm test runs, imported on every node by `.ci/setup-swarm.sh`.
pub const IMAGE: &str = "bulkhead-test/busybox:latest";

/// The manager's address: `$BULKHEAD_SWARM_HOST`, else the setup script's socket.
pub fn host() -> String {
    std::env::var("BULKHEAD_SWARM_HOST")
        .unwrap_or_else(|_| "unix:///run/bulkhead-swarm/mgr.sock".to_owned())
}

/// A driver on the test swarm (a daemon id of its own), or why the tests cannot run.
pub async fn driver(tag: &str) -> Result<SwarmDriver, String> {
    let id = format!("t{tag}{}", std::process::id());
    let d = SwarmDriver::new(&id, &host());
    let client = d
        .client()
        .await
        .map_err(|e| format!("no swarm at {} ({e}); run .ci/setup-swarm.sh", host()))?;
    let info = client.info().await.map_err(|e| e.to_string())?;
    let active = info
        .swarm
        .and_then(|s| s.local_node_state)
        .is_some_and(|s| s == bollard::models::LocalNodeState::ACTIVE);
    if !active {
        return Err(format!(
            "the engine at {} is not in a swarm; run .ci/setup-swarm.sh",
            host()
        ));
    }
    client
        .inspect_image(IMAGE)
        .await
        .map_err(|e| format!("test image {IMAGE} missing ({e}); run .ci/setup-swarm.sh"))?;
    Ok(d)
}

/// The conformance fixture: the busybox shell, the working directory bound in (every
/// node of the test swarm is on this host).
pub fn fixture() -> Fixture {
    let mut fx = Fixture::temp();
    fx.manifest_extra = format!("driver: swarm\nswarm:\n  image: {IMAGE}\n");
    fx.bind_workdir = true;
    fx.env_extra = vec!["HOSTNAME".into()];
    fx
}
