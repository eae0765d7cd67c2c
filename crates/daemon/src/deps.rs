//! `depends_on` in the daemon: launching a workload's dependencies for the derived key,
//! gating the dependent on their conditions, and restarting dependents whose
//! dependency restarted (`on_dependency_restart: restart`). The graph logic (keys,
//! checks, layers) is `bulkhead_core::deps`; ordered teardown is
//! [`Shared::terminate_where`] and [`Shared::terminate_with_dependencies`].
//!
//! A launch of W for key K launches each dependency for the key derived from K, all
//! branches concurrently (a dependency's own dependencies first, recursively; a live
//! instance is reused, so a diamond launches its shared node once), then waits until each
//! has reached its condition: `started` (its process was started), `ready`, or
//! `completed_successfully` (the instance ended `exited` with code 0; a job that is not
//! live is run again for each dependent created). The first dependency that fails fails
//! the launch with its reason, before W is created. W's first events are `launched`,
//! then `dependencies_ready` naming the instances it waited for.
//!
//! Restart reactions follow the event log from the daemon's start; a follower that falls
//! behind the broadcast channel logs how many events it missed and goes on (a missed
//! `restarting` is a dependent not restarted, never a wrong one). A dependent restarted
//! here is stopped and launched anew, which is not a `restarting` of its own: its own
//! dependents are not restarted in turn.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_core::deps::Condition;
use bulkhead_core::event::{EventKind, ExitStatus};
use bulkhead_core::instance::State;
use bulkhead_core::key::{InstanceId, Key};
use bulkhead_core::spec::WorkloadSpec;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use crate::catalog::Catalog;
use crate::{LaunchArgs, LaunchError, Shared, Slot, View, WaitFor};

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl Shared {
    /// Launches the dependencies of `spec` for `key` (see the module docs); returns the
    /// ids of those met, sorted.
    pub(crate) async fn launch_dependencies(
        self: &Arc<Self>,
        key: &Key,
        spec: &WorkloadSpec,
        catalog: &Catalog,
        deadline: Option<Instant>,
        chain: &[String],
    ) -> Result<Vec<String>, LaunchError> {
        let id = key.instance_id();
        let mut chain = chain.to_vec();
        chain.push(key.workload().to_owned());
        let fail = |dependency: String, e: LaunchError| LaunchError::Dependency {
            id: id.clone(),
            dependency,
            source: Box::new(e),
        };
        let mut set = tokio::task::JoinSet::new();
        for (name, condition) in spec.depends_on.iter() {
            if chain.iter().any(|c| c == name) {
                let reason = format!("a dependency cycle: {} -> {name}", chain.join(" -> "));
                return Err(fail(
                    name.to_owned(),
                    LaunchError::Failed {
                        id: id.clone(),
                        reason,
                    },
                ));
            }
            let dep_key =
                dependency_key(catalog, key, name).map_err(|e| fail(name.to_owned(), e))?;
            let sh = self.clone();
            let chain = chain.clone();
            set.spawn(async move {
                let dep_id = dep_key.instance_id();
                (
                    dep_id,
                    sh.launch_dependency(dep_key, condition, deadline, chain)
                        .await,
                )
            });
        }
        let mut met = Vec::new();
        // Returning early drops the set: the other branches stop waiting (their
        // instances go on, as any launch's that the caller gave up on).
        while let Some(joined) = set.join_next().await {
            let (dep_id, r) = joined.map_err(|e| LaunchError::Failed {
                id: id.clone(),
                reason: format!("launching its dependencies failed: {e}"),
            })?;
            r.map_err(|e| fail(dep_id.to_string(), e))?;
            met.push(dep_id.to_string());
        }
        met.sort();
        Ok(met)
    }

    /// Launches one dependency (and, through it, its own) and waits for its condition.
    /// Boxed: a launch awaits its dependencies' launches.
    fn launch_dependency(
        self: Arc<Self>,
        key: Key,
        condition: Condition,
        deadline: Option<Instant>,
        chain: Vec<String>,
    ) -> Boxed<Result<(), LaunchError>> {
        Box::pin(async move {
            let left = || deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let args = LaunchArgs {
                workload: key.workload().to_owned(),
                namespace: key.namespace().map(str::to_owned),
                session: key.session().map(str::to_owned),
                wait: WaitFor::Nothing,
                timeout: left(),
                lease: None,
            };
            let (view, _) = self.launch_in_chain(args, &chain).await?;
            let slot = self.get(&view.id).ok_or_else(|| LaunchError::Failed {
                id: view.id.clone(),
                reason: "the instance is gone".into(),
            })?;
            let waited = left().unwrap_or_default();
            match condition {
                Condition::Started => {
                    crate::wait_for(&slot, WaitFor::Started, deadline, waited).await?;
                }
                Condition::Ready => {
                    crate::wait_for(&slot, WaitFor::Ready, deadline, waited).await?;
                }
                Condition::CompletedSuccessfully => {
                    wait_completed(&slot, deadline, waited).await?;
                }
            }
            Ok(())
        })
    }

    /// Follows the event log: a `restarting` of an instance restarts the live instances
    /// that depend on it and say `on_dependency_restart: restart`
    /// ([`Shared::restart_for_dependency`]). Ends when the log closes.
    pub(crate) fn follow_dependency_restarts(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let (_, mut rx) = self.events.subscribe(self.events.last_id());
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let e = match rx.recv().await {
                    Ok(e) => e,
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(
                            "dependency restarts: {n} events missed (the follower fell behind)"
                        );
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                };
                if !matches!(e.kind, EventKind::Restarting { .. }) {
                    continue;
                }
                let Some(sh) = weak.upgrade() else { return };
                for dependent in sh.dependents_to_restart(&e.instance) {
                    let sh = sh.clone();
                    let dependency = e.instance.clone();
                    let since_ms = e.time_ms;
                    tokio::spawn(async move {
                        sh.restart_for_dependency(&dependent, &dependency, since_ms)
                            .await;
                    });
                }
            }
        })
    }

    /// The live instances that depend on `dependency` and restart with it (one pass over
    /// the registry; only those that say `restart` have their dependencies derived).
    fn dependents_to_restart(&self, dependency: &InstanceId) -> Vec<InstanceId> {
        use bulkhead_core::deps::OnDependencyRestart;
        self.lock_registry()
            .values()
            .filter(|s| s.spec().on_dependency_restart == OnDependencyRestart::Restart)
            .filter(|s| {
                let st = s.view.borrow().state;
                !st.is_terminal() && st != State::Stopping
            })
            .filter(|s| Shared::dependency_ids(&s.key, &s.spec()).contains(dependency))
            .map(|s| s.id.clone())
            .collect()
    }

    /// Restarts `id` because its dependency `dependency` restarted: a
    /// `dependency_restarted` event on it, its dependencies' conditions met again, then a
    /// graceful restart ([`Shared::restart`]). One restart per dependent at a time: a
    /// restart asked for while one runs is covered by it.
    pub(crate) async fn restart_for_dependency(
        self: &Arc<Self>,
        id: &InstanceId,
        dependency: &InstanceId,
        since_ms: u64,
    ) {
        if !self
            .dependency_restarts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone())
        {
            return;
        }
        let Some(slot) = self.get(id) else {
            self.dependency_restarts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
            return;
        };
        tracing::info!("{id}: restarting because its dependency {dependency} restarted");
        self.events.publish(
            id,
            EventKind::DependencyRestarted {
                dependency: dependency.to_string(),
            },
        );
        // The dependency's new run first: its View may still show the run that ended (the
        // event and the View change are published apart), so wait for a run that started
        // after the `restarting` event, or for it to give up (final, breaker open).
        if let Some(dep) = self.get(dependency) {
            let mut rx = dep.subscribe();
            let _ = rx
                .wait_for(|v| {
                    v.state.is_terminal()
                        || v.breaker == bulkhead_core::restart::BreakerState::Open
                        || (v.started && v.started_at_ms >= since_ms)
                })
                .await;
        }
        // Gated as a launch is: its dependencies meet their conditions again, then a
        // graceful restart: the same key, address, leases and listening sockets.
        let spec = slot.spec();
        let catalog = self.catalog();
        let gated = self
            .launch_dependencies(&slot.key, &spec, &catalog, None, &[])
            .await;
        let result = match gated {
            Ok(_) => self
                .restart(
                    id,
                    None,
                    &format!("its dependency {dependency} restarted"),
                    None,
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = result {
            tracing::warn!("{id}: restart for dependency {dependency} failed: {e}");
            self.events.publish(
                id,
                EventKind::LaunchFailed {
                    reason: format!("restart after its dependency {dependency} restarted: {e}"),
                    failure_kind: Some(bulkhead_core::failure::FailureKind::Dependency),
                },
            );
        }
        self.dependency_restarts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}

/// The key of dependency `name` for `key`, from its manifest in `catalog`.
fn dependency_key(catalog: &Catalog, key: &Key, name: &str) -> Result<Key, LaunchError> {
    let entry = catalog
        .get(name)
        .ok_or_else(|| LaunchError::UnknownWorkload(name.to_owned()))?;
    let spec = entry
        .spec
        .as_ref()
        .map_err(|error| LaunchError::InvalidWorkload {
            name: name.to_owned(),
            error: error.clone(),
        })?;
    let iso = spec.key_isolation();
    Ok(bulkhead_core::deps::dependency_key(key, name, iso)?)
}

/// Waits until a one-shot dependency has exited with code 0.
async fn wait_completed(
    slot: &Slot,
    deadline: Option<Instant>,
    timeout: Duration,
) -> Result<View, LaunchError> {
    // Some(Ok) = done, Some(Err) = failed, None = keep waiting.
    let judge = |v: &View| -> Option<Result<(), String>> {
        match v.state {
            State::Exited if v.last_exit.is_some_and(ExitStatus::success) => Some(Ok(())),
            State::Restarting if v.breaker == bulkhead_core::restart::BreakerState::Open => {
                Some(Err(v
                    .failure
                    .clone()
                    .unwrap_or_else(|| "its circuit breaker is open".into())))
            }
            s if s.is_terminal() => Some(Err(match (v.failure.clone(), v.last_exit) {
                (Some(f), _) => f,
                (None, Some(st)) => format!("it ended {} ({st}), not with exit code 0", s.as_str()),
                (None, None) => format!("it ended {} without completing", s.as_str()),
            })),
            _ => None,
        }
    };
    let mut rx = slot.subscribe();
    let fut = rx.wait_for(|v| judge(v).is_some());
    let view = match deadline {
        Some(d) => match tokio::time::timeout_at(d, fut).await {
            Ok(r) => r.map(|v| v.clone()),
            Err(_) => {
                return Err(LaunchError::Timeout {
                    id: slot.id.clone(),
                    what: "completed",
                    waited: timeout,
                    state: slot.view().state.as_str(),
                })
            }
        },
        None => fut.await.map(|v| v.clone()),
    }
    .unwrap_or_else(|_| slot.view());
    match judge(&view) {
        Some(Err(reason)) => Err(crate::failed_with_stderr(slot, reason).await),
        _ => Ok(view),
    }
}
