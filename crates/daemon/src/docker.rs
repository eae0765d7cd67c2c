//! The daemon's side of the docker driver: registration, the daemon id its containers are
//! labelled with, and the image cache's API. Shared containers are a property of the
//! manifest (`WorkloadSpec::shared_instance`, in the core).
//!
//! **Recovery** is the driver's own (`DockerDriver::recover`, by label), like every
//! driver's (see `crate::recovery`).

use std::sync::Arc;

use bulkhead_docker::{DockerDriver, Engine, ImageCache};
use bulkhead_driver::Driver;

use crate::server::Config;
use crate::Shared;

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
