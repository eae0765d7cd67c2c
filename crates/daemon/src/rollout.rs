//! `restart` and `rollout`: a new run for a live instance, with the same key, the same
//! address (its port is kept) and, with `sockets:`, the same listening sockets.
//!
//! A restart stops the current run gracefully (the manifest's shutdown signal and grace)
//! and starts the next one at once: no backoff, not a failure, the breaker untouched
//! (an open breaker gets its trial run now). A rollout restarts each instance of a
//! workload whose manifest changed since its run started, one at a time, onto the
//! catalog's manifest, and waits for it to be ready before the next.
//!
//! Stop, then start: a key never has two runs at once (the promise every isolation key
//! makes: a session's files and ports are its run's alone), so a rollout is not a surge.
//! With `sockets:` the listening sockets stay bound across the swap and connections made
//! meanwhile wait in the backlog: clients see a pause, not a refusal. Without, the port
//! is closed between the runs.
//!
//! A new run that fails (exits, or is not ready within its readiness timeout) stops the
//! rollout there: that instance is restarted on the manifest it ran before (rolled back),
//! the instances after it are left as they are, and the answer says which is which.

use std::sync::Arc;
use std::time::Duration;

use bulkhead_core::instance::State;
use bulkhead_core::key::InstanceId;
use bulkhead_core::spec::WorkloadSpec;

use crate::instance::{Slot, View};
use crate::Shared;

#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error("no instance {0}")]
    NotFound(InstanceId),
    #[error("instance {id} is {state}: nothing runs to restart (launch it again)")]
    Final { id: InstanceId, state: &'static str },
    #[error("instance {id} is being stopped: it cannot be restarted")]
    Stopping { id: InstanceId },
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("restart of {id} failed: {reason}")]
    Failed { id: InstanceId, reason: String },
    #[error("unknown workload {0:?} (see `bulkhead workloads`)")]
    UnknownWorkload(String),
    #[error("workload {name} is invalid: {error}")]
    InvalidWorkload {
        name: String,
        error: crate::catalog::EntryError,
    },
    /// A rollout moves runs, not walls: a changed driver, isolation or channels section
    /// is a different instance.
    #[error("the manifest of {name} changed its {field}: a rollout cannot move a running instance there; terminate it and launch it again")]
    Incompatible { name: String, field: &'static str },
}

/// A restart that happened: the new run is ready, or the new manifest's run failed
/// (the reason) and the instance runs its previous manifest again, ready.
enum Restarted {
    Ready(Box<View>),
    RolledBack(String),
}

/// What a rollout did to one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Runs on the new manifest and is ready.
    Moved,
    /// Already ran the catalog's manifest.
    Current,
    /// The new manifest's run failed (`reason`); the instance was restarted on its old
    /// manifest (`rolled_back`: that run is ready again).
    Failed { reason: String, rolled_back: bool },
    /// Not touched: an earlier instance failed.
    Skipped,
}

impl Shared {
    /// A graceful restart of a live instance (`spec`: onto that manifest). Returns the
    /// instance once its new run is ready; an error with the reason if it fails.
    pub async fn restart(
        &self,
        id: &InstanceId,
        grace: Option<Duration>,
        reason: &str,
        spec: Option<Arc<WorkloadSpec>>,
    ) -> Result<View, RestartError> {
        let slot = self
            .get(id)
            .ok_or_else(|| RestartError::NotFound(id.clone()))?;
        match self.restart_slot(&slot, grace, reason, spec).await? {
            Restarted::Ready(v) => Ok(*v),
            Restarted::RolledBack(reason) => Err(RestartError::Failed {
                id: id.clone(),
                reason: format!("{reason}; it runs its previous manifest again"),
            }),
        }
    }

    async fn restart_slot(
        &self,
        slot: &Slot,
        grace: Option<Duration>,
        reason: &str,
        spec: Option<Arc<WorkloadSpec>>,
    ) -> Result<Restarted, RestartError> {
        if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(RestartError::ShuttingDown);
        }
        {
            let v = slot.view();
            if v.state.is_terminal() {
                return Err(RestartError::Final {
                    id: slot.id.clone(),
                    state: v.state.as_str(),
                });
            }
            if v.state == State::Stopping {
                return Err(RestartError::Stopping {
                    id: slot.id.clone(),
                });
            }
        }
        let Some(done) = slot.restart(grace, reason.to_owned(), spec) else {
            return Err(RestartError::Final {
                id: slot.id.clone(),
                state: slot.view().state.as_str(),
            });
        };
        let failed = |reason: String| RestartError::Failed {
            id: slot.id.clone(),
            reason,
        };
        match done.await {
            Ok(Ok(None)) => Ok(Restarted::Ready(Box::new(slot.view()))),
            Ok(Ok(Some(reason))) => Ok(Restarted::RolledBack(reason)),
            Ok(Err(reason)) => Err(failed(reason)),
            Err(_) => Err(failed(
                "another restart of the instance replaced this one, or it ended".into(),
            )),
        }
    }

    /// Moves every live instance of `workload` onto the catalog's manifest, one at a time
    /// (see the module docs). Returns each instance with what happened to it, in id order.
    pub async fn rollout(
        &self,
        workload: &str,
        grace: Option<Duration>,
    ) -> Result<Vec<(InstanceId, Outcome)>, RestartError> {
        let new = self.catalog_spec(workload)?;
        let mut slots: Vec<Arc<Slot>> = self
            .list()
            .into_iter()
            .filter(|s| s.key.workload() == workload && !s.view().state.is_terminal())
            .collect();
        slots.sort_by(|a, b| a.id.cmp(&b.id));
        // Refused before anything moves: the whole rollout or none of it.
        for s in &slots {
            check_compatible(workload, &s.spec(), &new)?;
        }
        let mut out = Vec::new();
        let mut failed = false;
        for s in slots {
            if failed {
                out.push((s.id.clone(), Outcome::Skipped));
                continue;
            }
            let o = self.move_to(&s, &new, grace).await?;
            failed = matches!(o, Outcome::Failed { .. });
            out.push((s.id.clone(), o));
        }
        Ok(out)
    }
}

impl Shared {
    /// `restart --new-spec`: one instance's rollout onto the catalog's manifest.
    pub async fn rollout_one(
        &self,
        slot: &Slot,
        grace: Option<Duration>,
    ) -> Result<Outcome, RestartError> {
        let workload = slot.key.workload();
        let new = self.catalog_spec(workload)?;
        check_compatible(workload, &slot.spec(), &new)?;
        self.move_to(slot, &new, grace).await
    }

    fn catalog_spec(&self, workload: &str) -> Result<Arc<WorkloadSpec>, RestartError> {
        let catalog = self.catalog();
        let entry = catalog
            .get(workload)
            .ok_or_else(|| RestartError::UnknownWorkload(workload.to_owned()))?;
        entry
            .spec
            .clone()
            .map_err(|error| RestartError::InvalidWorkload {
                name: entry.name.clone(),
                error,
            })
    }

    /// Restarts one instance onto `new`, rolling it back to its manifest if that fails.
    async fn move_to(
        &self,
        s: &Slot,
        new: &Arc<WorkloadSpec>,
        grace: Option<Duration>,
    ) -> Result<Outcome, RestartError> {
        let old = s.spec();
        if same_spec(&old, new) {
            return Ok(Outcome::Current);
        }
        let moved = self
            .restart_slot(
                s,
                grace,
                "rollout to the reloaded manifest",
                Some(new.clone()),
            )
            .await;
        match moved {
            Ok(Restarted::Ready(_)) => Ok(Outcome::Moved),
            Ok(Restarted::RolledBack(reason)) => Ok(Outcome::Failed {
                reason,
                rolled_back: true,
            }),
            Err(RestartError::Failed { reason, .. }) => Ok(Outcome::Failed {
                reason,
                rolled_back: false,
            }),
            // Ended or being stopped meanwhile: nothing to move.
            Err(RestartError::Final { .. } | RestartError::Stopping { .. }) => Ok(Outcome::Skipped),
            Err(e) => Err(e),
        }
    }
}

fn same_spec(a: &WorkloadSpec, b: &WorkloadSpec) -> bool {
    serde_json::to_string(a).ok() == serde_json::to_string(b).ok()
}

/// A rollout keeps the instance's walls and what is bound for its key: the same driver,
/// isolation, channels, sockets and activation.
fn check_compatible(
    name: &str,
    old: &WorkloadSpec,
    new: &WorkloadSpec,
) -> Result<(), RestartError> {
    let field = if old.driver != new.driver {
        "driver"
    } else if old.isolation != new.isolation {
        "isolation"
    } else if old.channels != new.channels {
        "channels"
    } else if old.sockets != new.sockets {
        // The key's sockets stay bound through the swap: they are the old manifest's.
        "sockets"
    } else if old.activation != new.activation {
        "activation"
    } else {
        return Ok(());
    };
    Err(RestartError::Incompatible {
        name: name.to_owned(),
        field,
    })
}
