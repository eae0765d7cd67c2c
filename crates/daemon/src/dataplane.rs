//! The data plane in the daemon: an instance's channels are created before its spawn,
//! handed over in its environment (and bound into its walls), and let go when the
//! instance ends; dead nodes are reclaimed and reported as `channel_peer_dead` events.
//!
//! The iceoryx2 side lives in `bulkhead_sdk::manager`, started on first use, so a daemon
//! whose workloads declare no channels never touches shared memory. Its calls block (they
//! create files in `/dev/shm`), so they run on tokio's blocking pool.
//!
//! **Not yet: the data plane per scope** (issue #11). Today channel workloads share the
//! host's `/dev/shm` and iceoryx2 root, so a sandbox with channels must open
//! `user_namespace: host`. The design: one *channel space* per tenant, a size-bounded
//! tmpfs at `<state>/channels/<tenant>` holding the tenant's `shm/` and iceoryx2 root;
//! iceoryx2's `/dev/shm` is a build-time constant, but a mount namespace is per thread
//! (`unshare(CLONE_NEWNS)` implies `CLONE_FS` and is allowed in a threaded process), so
//! the manager runs one thread per space that binds the space's `shm/` over its own
//! `/dev/shm` and sets its fsuid to the tenant's mapped uid (files belong to the tenant,
//! so the default user namespace works); walls bind `shm/` at `/dev/shm`; host tools
//! (`pipe`, the SDK's `Host`) enter the space the same way (`Get` returns its path);
//! the space is unmounted when the tenant's last channel instance is final.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bulkhead_core::channels::{ENV_IOX2_PREFIX, ENV_IOX2_ROOT};
use bulkhead_core::event::EventKind;
use bulkhead_core::key::InstanceId;
use bulkhead_sdk::manager::{DeadPeer, Manager};
use bulkhead_sdk::Iox2;

use crate::instance::Slot;
use crate::Shared;

/// How often the daemon looks for dead nodes besides when an instance ends.
const SCAN_PERIOD: Duration = Duration::from_secs(1);

/// The iceoryx2 installation of a state directory: its own file prefix (so daemons with
/// different state directories never share or clean up each other's channels), and
/// iceoryx2's default root.
pub fn iox2_for(state_dir: &Path) -> Iox2 {
    // FNV-1a: stable across builds, so a restarted daemon finds its channels again.
    let mut h: u32 = 0x811c_9dc5;
    for b in state_dir.as_os_str().as_encoded_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    Iox2 {
        prefix: Some(format!("iox2_bh{h:08x}_")),
        root: None,
    }
}

impl Shared {
    /// The data-plane manager, started on first use (with its dead-node scanner).
    pub(crate) fn dataplane(self: &Arc<Self>) -> Result<Arc<Manager>, String> {
        let m = self.dataplane.get_or_init(|| {
            let m = Manager::start(iox2_for(&self.cfg.state_dir)).map_err(|e| e.to_string())?;
            let m = Arc::new(m);
            tokio::spawn(scanner(Arc::downgrade(self), m.clone()));
            Ok(m)
        });
        m.clone()
    }
}

async fn scanner(sh: Weak<Shared>, m: Arc<Manager>) {
    loop {
        tokio::time::sleep(SCAN_PERIOD).await;
        let Some(sh) = sh.upgrade() else { return };
        if sh.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let m = m.clone();
        if let Ok(dead) = tokio::task::spawn_blocking(move || m.scan()).await {
            report(&sh, dead);
        }
    }
}

/// Creates `slot`'s channels; returns the variables and the host paths the instance needs.
pub(crate) async fn acquire(
    sh: &Arc<Shared>,
    slot: &Slot,
) -> Result<(Vec<(String, String)>, Vec<PathBuf>), String> {
    let channels = slot.view.borrow().channels.clone();
    if slot.spec.channels.is_none() {
        return Ok((Vec::new(), Vec::new()));
    }
    if let Some(why) =
        bulkhead_core::channels::user_conflict(&slot.spec, rustix::process::geteuid().as_raw())
    {
        return Err(why);
    }
    let m = sh.dataplane()?;
    let mut env: Vec<(String, String)> = channels
        .iter()
        .map(|c| (c.env_var(), c.env_value()))
        .collect();
    let iox2 = m.iox2().clone();
    let id = slot.id.to_string();
    let m2 = m.clone();
    tokio::task::spawn_blocking(move || m2.acquire(&id, channels))
        .await
        .map_err(|e| format!("data plane: {e}"))?
        .map_err(|e| e.to_string())?;
    if let Some(p) = &iox2.prefix {
        env.push((ENV_IOX2_PREFIX.into(), p.clone()));
    }
    env.push((ENV_IOX2_ROOT.into(), iox2.root_dir().display().to_string()));
    // Walls that hide the host's files must let iceoryx2's through at the same paths.
    let binds = vec![PathBuf::from("/dev/shm"), iox2.root_dir()];
    Ok((env, binds))
}

/// After a run ended (every process gone): reclaim and report what dead nodes left.
pub(crate) async fn after_exit(sh: &Arc<Shared>, slot: &Slot) {
    if slot.spec.channels.is_none() {
        return;
    }
    let Some(Ok(m)) = sh.dataplane.get().cloned() else {
        return;
    };
    if let Ok(dead) = tokio::task::spawn_blocking(move || m.scan()).await {
        report(sh, dead);
    }
}

/// The instance is final: reclaim dead nodes, then let go of its channels.
pub(crate) async fn release(sh: &Arc<Shared>, slot: &Slot) {
    if slot.spec.channels.is_none() {
        return;
    }
    let Some(Ok(m)) = sh.dataplane.get().cloned() else {
        return;
    };
    let id = slot.id.to_string();
    if let Ok(dead) = tokio::task::spawn_blocking(move || m.release(&id)).await {
        report(sh, dead);
    }
}

/// One `channel_peer_dead` event per instance that shared a channel with a dead node.
fn report(sh: &Shared, dead: Vec<DeadPeer>) {
    for d in dead {
        let peer = d.instance.clone().unwrap_or_else(|| d.node.clone());
        tracing::info!(
            "data plane: node {:?} (pid {}) died; {}",
            d.node,
            d.pid,
            match &d.cleanup_error {
                None => "its shared memory was reclaimed".to_owned(),
                Some(e) => format!("cleanup failed: {e}"),
            }
        );
        for (holder, channel) in d.affected {
            let Ok((id, _)) = InstanceId::parse(&holder) else {
                continue;
            };
            sh.events.publish(
                &id,
                EventKind::ChannelPeerDead {
                    channel,
                    peer: peer.clone(),
                    reclaimed: d.cleanup_error.is_none(),
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefix_is_stable_per_state_dir() {
        let a = super::iox2_for(std::path::Path::new("/var/lib/bulkhead"));
        let b = super::iox2_for(std::path::Path::new("/var/lib/bulkhead"));
        let c = super::iox2_for(std::path::Path::new("/tmp/other"));
        assert_eq!(a, b);
        assert_ne!(a.prefix, c.prefix);
        let p = a.prefix.unwrap();
        assert!(
            p.starts_with("iox2_bh") && p.ends_with('_') && p.len() == 16,
            "{p}"
        );
    }
}
