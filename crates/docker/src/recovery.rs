//! Recovery after a daemon restart: this daemon's containers, found by label.

use std::collections::HashMap;
use std::sync::Arc;

use bollard::query_parameters::{ListContainersOptions, RemoveContainerOptions};

use crate::engine::{Engine, LABEL_DAEMON, LABEL_INSTANCE, LABEL_WARM};

/// One container of this daemon.
#[derive(Debug, Clone)]
pub struct Found {
    pub id: String,
    /// The instance label, or for a warm slot the instance its name was claimed for
    /// (empty: an unclaimed slot, which is no run).
    pub instance: String,
    pub running: bool,
    /// The warm slot it was made as (`bulkhead.warm`), if any.
    pub warm: Option<String>,
}

/// Every container labelled with this daemon's id (running or not).
pub async fn list(engine: &Arc<Engine>) -> Result<Vec<Found>, String> {
    let client = engine.ensure().await.map_err(|e| e.to_string())?;
    let filters = HashMap::from([(
        "label".to_owned(),
        vec![format!("{LABEL_DAEMON}={}", engine.daemon_id())],
    )]);
    let list = client
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .map_err(|e| format!("cannot list containers: {e}"))?;
    Ok(list
        .into_iter()
        .filter_map(|c| {
            let labels = c.labels?;
            let warm = labels.get(LABEL_WARM).cloned();
            let instance = match &warm {
                // Claimed: the name carries the instance (`crate::warm`).
                Some(_) => c
                    .names
                    .iter()
                    .flatten()
                    .find_map(|n| crate::warm::instance_of_name(n))
                    .unwrap_or_default(),
                None => labels.get(LABEL_INSTANCE)?.clone(),
            };
            Some(Found {
                id: c.id?,
                instance,
                warm,
                running: c
                    .state
                    .is_some_and(|s| s == bollard::models::ContainerSummaryStateEnum::RUNNING),
            })
        })
        .collect())
}

/// Removes a container (force: a running one is killed).
pub async fn remove(engine: &Arc<Engine>, id: &str) -> Result<(), String> {
    let client = engine.ensure().await.map_err(|e| e.to_string())?;
    match client
        .remove_container(
            id,
            Some(RemoveContainerOptions {
                force: true,
                v: true,
                link: false,
            }),
        )
        .await
    {
        Ok(())
        | Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(e) => Err(format!("cannot remove container {id}: {e}")),
    }
}
