//! The daemon's side of the docker driver: registration, the daemon id its containers are
//! labelled with, the image cache, shared containers and recovery after a restart.
//!
//! **Shared containers.** `docker.share: true` makes the workload's isolation key ignore
//! namespace and session (as `isolation: none`): every launch of the workload reaches one
//! instance, i.e. one container, and each launch with a holder takes a lease on it. When
//! the last lease is released (`release`, `end-session`), the instance's idle clock starts:
//! `docker.idle_timeout` (or the workload's `idle_timeout`), by default zero, after which
//! the container is stopped and removed. Before the first lease arrives the clock is
//! [`FIRST_LEASE_GRACE`], so that the launch creating the instance gets to take its lease.
//!
//! **Recovery** is the driver's own (`DockerDriver::recover`, by label), like every
//! driver's (see `crate::recovery`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_core::key::Isolation;
use bulkhead_core::spec::{DriverKind, WorkloadSpec};
use bulkhead_docker::{DockerDriver, Engine, ImageCache};
use bulkhead_driver::Driver;

use crate::server::Config;
use crate::Shared;

/// How long a shared container with no lease waits for the first one.
pub const FIRST_LEASE_GRACE: Duration = Duration::from_secs(5);

/// The docker driver and what it needs.
pub struct DockerState {
    pub driver: Arc<dyn Driver>,
    pub engine: Arc<Engine>,
    pub images: Option<Arc<ImageCache>>,
}

impl DockerState {
    pub fn new(cfg: &Config, daemon_id: &str) -> DockerState {
        let engine = Engine::new(daemon_id);
        let limits = bulkhead_docker::Limits {
            max_count: cfg.image_cache_max_count,
            max_bytes: cfg.image_cache_max_bytes,
        };
        let images = match ImageCache::open(&cfg.state_dir.join("images.db"), limits) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                tracing::error!("{e}; docker.build workloads cannot launch");
                None
            }
        };
        DockerState {
            driver: Arc::new(DockerDriver::new(engine.clone(), images.clone())),
            engine,
            images,
        }
    }
}

/// The daemon's id and whether its state directory turned out to be a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonId {
    pub id: String,
    /// The id recorded in the directory when it is a copy of another daemon's (that
    /// daemon's id: what this one must never act on).
    pub copied_from: Option<String>,
}

/// The daemon's stable id (`<state>/daemon-id`), made on first use: the value of the
/// `bulkhead.daemon` label on its containers and the name of its sandbox cgroup scope,
/// so that two daemons never touch each other's containers or cgroups. See
/// [`load_daemon_id`].
pub fn daemon_id(state_dir: &Path) -> String {
    load_daemon_id(state_dir).id
}

/// The inode numbers the id is bound to: the state directory's and the id file's.
/// (Not the device number: it is not stable across reboots on overlay, tmpfs or btrfs.)
fn binding(state_dir: &Path, id_file: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    Ok(format!(
        "{} {}",
        std::fs::metadata(state_dir)?.ino(),
        std::fs::metadata(id_file)?.ino()
    ))
}

/// Reads (or makes) the daemon id of `state_dir`, bound to the directory's identity.
///
/// A copy of a state directory carries the original's `daemon-id`: started as a second
/// daemon it would take the original's containers for its own (adopt or remove them) and
/// share its cgroup scope. So the id is bound to the inode numbers of the directory and of
/// the id file (recorded in `<state>/daemon-id.bound`); a copy has new ones, and gets a new
/// id (logged, with [`DaemonId::copied_from`] set). A rename of the directory on the same
/// filesystem keeps the binding; a move to another filesystem is a copy. An id file from
/// before the binding existed is bound as it is found.
pub fn load_daemon_id(state_dir: &Path) -> DaemonId {
    let path = state_dir.join("daemon-id");
    let bound = state_dir.join("daemon-id.bound");
    let fresh = |copied_from: Option<String>| -> DaemonId {
        let id = format!("{:016x}", rand::random::<u64>());
        let written = std::fs::create_dir_all(state_dir)
            .and_then(|()| std::fs::write(&path, &id))
            .and_then(|()| binding(state_dir, &path))
            .and_then(|b| std::fs::write(&bound, b));
        if let Err(e) = written {
            tracing::warn!("cannot write {}: {e}", path.display());
        }
        DaemonId { id, copied_from }
    };
    let Ok(text) = std::fs::read_to_string(&path) else {
        return fresh(None);
    };
    let id = text.trim().to_owned();
    if id.is_empty() {
        return fresh(None);
    }
    let here = match binding(state_dir, &path) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!("cannot stat {}: {e}; keeping its id", path.display());
            return DaemonId {
                id,
                copied_from: None,
            };
        }
    };
    match std::fs::read_to_string(&bound) {
        Ok(b) if b.trim() == here => DaemonId {
            id,
            copied_from: None,
        },
        Ok(b) => {
            let new = fresh(Some(id.clone()));
            tracing::warn!(
                "{} is a copy of another daemon's state directory (daemon id {id}, bound to \
                 inodes {}, here {here}): this daemon takes the new id {} and leaves that \
                 daemon's containers, cgroups and processes alone",
                state_dir.display(),
                b.trim(),
                new.id
            );
            new
        }
        Err(_) => {
            // An id from before the binding: bind it where it is found.
            if let Err(e) = std::fs::write(&bound, &here) {
                tracing::warn!("cannot write {}: {e}", bound.display());
            }
            DaemonId {
                id,
                copied_from: None,
            }
        }
    }
}

/// Whether the workload is a shared docker container (`docker.share: true`).
pub fn is_shared_container(spec: &WorkloadSpec) -> bool {
    spec.driver == DriverKind::Docker && spec.docker.as_ref().is_some_and(|d| d.share)
}

/// The isolation the key is built with: a shared container is one instance for all.
pub fn effective_isolation(spec: &WorkloadSpec) -> Isolation {
    if is_shared_container(spec) {
        Isolation::None
    } else {
        spec.isolation
    }
}

/// The idle timeout after the last lease is released.
pub fn effective_idle_timeout(spec: &WorkloadSpec) -> Option<Duration> {
    if is_shared_container(spec) {
        let dk = spec.docker.as_ref().and_then(|d| d.idle_timeout);
        Some(spec.idle_timeout.or(dk).unwrap_or(Duration::ZERO))
    } else {
        spec.idle_timeout
    }
}

/// The idle clock armed when the instance starts, before any lease.
pub fn initial_idle(spec: &WorkloadSpec) -> Option<Duration> {
    let d = effective_idle_timeout(spec)?;
    Some(if is_shared_container(spec) {
        d.max(FIRST_LEASE_GRACE)
    } else {
        d
    })
}

/// An image-cache request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    #[error(
        "the image cache is not available (it could not be opened at start-up; see the daemon log)"
    )]
    NoCache,
    #[error(transparent)]
    Engine(#[from] bulkhead_docker::EngineError),
    #[error(transparent)]
    Cache(#[from] bulkhead_docker::images::CacheError),
}

impl From<ImagesError> for tonic::Status {
    fn from(e: ImagesError) -> tonic::Status {
        match e {
            ImagesError::NoCache | ImagesError::Engine(_) => {
                tonic::Status::unavailable(e.to_string())
            }
            ImagesError::Cache(_) => tonic::Status::internal(e.to_string()),
        }
    }
}

fn image_proto(r: bulkhead_docker::ImageRecord) -> bulkhead_api::v1::CachedImage {
    bulkhead_api::v1::CachedImage {
        hash: r.hash,
        tag: r.tag,
        workload: r.workload,
        size_bytes: r.size_bytes,
        created_s: r.created,
        last_used_s: r.last_used,
        in_use: r.in_use,
        base: r.base.unwrap_or_default(),
    }
}

/// The cached images, most recently used first.
pub(crate) async fn list_images(
    sh: &Shared,
) -> Result<Vec<bulkhead_api::v1::CachedImage>, ImagesError> {
    let cache = sh.docker.images.as_ref().ok_or(ImagesError::NoCache)?;
    let client = sh.docker.engine.ensure().await?;
    Ok(cache
        .list(client)
        .await?
        .into_iter()
        .map(image_proto)
        .collect())
}

/// Removes every cached image no container uses.
pub(crate) async fn prune_images(
    sh: &Shared,
) -> Result<Vec<bulkhead_api::v1::CachedImage>, ImagesError> {
    let cache = sh.docker.images.as_ref().ok_or(ImagesError::NoCache)?;
    let client = sh.docker.engine.ensure().await?;
    Ok(cache
        .prune(client)
        .await?
        .into_iter()
        .map(image_proto)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 11: a copy of a state directory kept the original's daemon id, so a second
    /// daemon on it removed the first one's containers and shared its cgroup scope.
    #[test]
    fn a_copied_state_directory_gets_its_own_daemon_id() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let first = load_daemon_id(&a);
        assert_eq!(first.copied_from, None);
        // Stable for the same directory, also after a rename.
        assert_eq!(load_daemon_id(&a), first);
        let moved = tmp.path().join("moved");
        std::fs::rename(&a, &moved).unwrap();
        assert_eq!(load_daemon_id(&moved), first);
        // A copy (new inodes) gets a new id, and keeps it.
        let b = tmp.path().join("b");
        std::fs::create_dir(&b).unwrap();
        for f in ["daemon-id", "daemon-id.bound"] {
            std::fs::copy(moved.join(f), b.join(f)).unwrap();
        }
        let copy = load_daemon_id(&b);
        assert_ne!(copy.id, first.id);
        assert_eq!(copy.copied_from.as_deref(), Some(first.id.as_str()));
        assert_eq!(load_daemon_id(&b).id, copy.id);
        assert_eq!(load_daemon_id(&b).copied_from, None);
        // An id file from before the binding is kept and bound.
        let old = tmp.path().join("old");
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join("daemon-id"), "0123456789abcdef\n").unwrap();
        assert_eq!(load_daemon_id(&old).id, "0123456789abcdef");
        assert!(old.join("daemon-id.bound").exists());
    }
}
