//! Start-up after the daemon's own crash: each driver reports what it still holds
//! ([`Driver::recover`](bulkhead_driver::Driver::recover)), the pure
//! [`bulkhead_core::recovery::plan`] decides, and this module carries the decisions out.
//! Nothing here knows a driver: a driver's instances are found, adopted and discarded
//! through the trait alone.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bulkhead_core::event::EventKind;
use bulkhead_core::instance::Restored;
use bulkhead_core::key::InstanceId;
use bulkhead_core::recovery::{self, Context, FoundRun, RowDecision, RunDecision};
use bulkhead_core::spec::{DriverKind, WorkloadSpec};
use bulkhead_driver::{Driver, Found, RecoverError};

use crate::instances::InstanceRow;
use crate::Shared;

/// Recovers every driver's instances against the table's `rows`. Returns the instances
/// whose termination it completed (their `terminated` event may not be visible yet).
/// Fails only on a driver's fatal error (see [`RecoverError::fatal`]).
pub(crate) async fn recover(
    shared: &Arc<Shared>,
    rows: Vec<InstanceRow>,
    restored_of: &dyn Fn(&InstanceRow) -> Restored,
) -> Result<HashSet<InstanceId>, RecoverError> {
    // Before any adoption adds its own event: the stops the last daemon had begun.
    let stops = shared.stops_in_progress();
    let specs: Vec<Option<WorkloadSpec>> = rows
        .iter()
        .map(|r| serde_json::from_str(&r.spec).ok())
        .collect();
    let mut found: Vec<(Arc<dyn Driver>, Found)> = Vec::new();
    let mut unlisted = HashSet::new();
    let mut kinds: Vec<DriverKind> = shared.drivers.keys().copied().collect();
    kinds.sort_by_key(|k| k.as_str());
    for kind in kinds {
        let driver = shared.drivers[&kind].clone();
        match driver.recover().await {
            Ok(list) => {
                if !list.is_empty() {
                    tracing::info!("the {kind} driver holds {} instance(s)", list.len());
                }
                found.extend(list.into_iter().map(|f| (driver.clone(), f)));
            }
            Err(e) if e.fatal => return Err(e),
            Err(e) => {
                // Quiet when the table has nothing of this driver (an engine nobody uses).
                if specs.iter().flatten().any(|s| s.driver == kind) {
                    tracing::warn!("{e}; its instances are resumed by their restart policy");
                } else {
                    tracing::debug!("{e}");
                }
                unlisted.insert(kind);
            }
        }
    }
    let table: Vec<recovery::Row> = rows
        .iter()
        .zip(&specs)
        .filter_map(|(r, spec)| {
            Some(recovery::Row {
                instance: InstanceId::parse(&r.id).ok()?.0,
                driver: spec.as_ref().map(|s| s.driver),
                pid: r.pid,
                start_time: r.start_time,
                between_runs: r.state == "restarting",
            })
        })
        .collect();
    // Rows whose id does not parse are left out above: map plan indices back.
    let row_of: Vec<usize> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| InstanceId::parse(&r.id).is_ok())
        .map(|(i, _)| i)
        .collect();
    let runs: Vec<FoundRun> = found
        .iter()
        .map(|(_, f)| FoundRun {
            instance: f.instance.clone(),
            process: f.process,
            launched: f.launched.is_some(),
        })
        .collect();
    let cx = Context {
        stopping: stops.keys().cloned().collect(),
        unlisted,
    };
    let plan = recovery::plan(&runs, &table, &cx);

    let mut adopted: HashMap<DriverKind, usize> = HashMap::new();
    for ((driver, f), decision) in found.into_iter().zip(plan.runs) {
        match decision {
            RunDecision::Discard { reason } => {
                tracing::warn!(
                    "{}: {} found at start-up is {reason}: ending it",
                    f.instance,
                    f.describe
                );
                driver.discard(f).await;
            }
            RunDecision::Adopt { row, resume_stop } => {
                let row = row.map(|i| row_of[i]);
                let launched = f.launched.clone().or_else(|| {
                    let i = row?;
                    Some((specs[i].clone()?, rows[i].dir.clone()))
                });
                let Some((spec, dir)) = launched else {
                    driver.discard(f).await;
                    continue;
                };
                let (restored, leases) = row
                    .map(|i| (restored_of(&rows[i]), rows[i].leases.clone()))
                    .unwrap_or_default();
                let id = f.instance.clone();
                *adopted.entry(driver.kind()).or_default() += 1;
                shared.adopt(f, Arc::new(spec), dir, restored, leases);
                if resume_stop {
                    if let Some((since_ms, grace)) = stops.get(&id) {
                        shared.resume_stop(&id, *since_ms, *grace);
                    }
                }
            }
        }
    }
    for (kind, n) in adopted {
        tracing::info!("adopted {n} {kind} instance(s)");
    }

    let mut ended = HashSet::new();
    for (i, decision) in plan.rows {
        let i = row_of[i];
        let row = &rows[i];
        let Ok((id, key)) = InstanceId::parse(&row.id) else {
            continue;
        };
        match decision {
            RowDecision::Forget => {
                tracing::error!("instance table: unreadable spec for {id}; forgetting it");
            }
            RowDecision::Terminated => {
                // It was being terminated on request, and nothing of it is left: the
                // termination is complete. Its restart policy must not bring it back.
                tracing::warn!(
                    "{id}: was being terminated when the last daemon ended; it is gone: terminated"
                );
                shared
                    .events
                    .publish(&id, EventKind::Terminated { status: None });
                if let Some(t) = &shared.instances {
                    t.remove(&row.id);
                }
                ended.insert(id);
            }
            RowDecision::Resume { lost } => {
                let Some(spec) = specs[i].clone() else {
                    continue;
                };
                let lost = lost.then(|| {
                    let pid = row.pid.unwrap_or(0);
                    if shared
                        .drivers
                        .get(&spec.driver)
                        .is_some_and(|d| d.runs_host_programs())
                    {
                        end_stray(shared, &id, pid, row.start_time);
                    }
                    format!("its process (pid {pid}) was gone when the daemon restarted")
                });
                shared.resume(
                    key,
                    Arc::new(spec),
                    row.dir.clone(),
                    restored_of(row),
                    lost,
                    row.leases.clone(),
                );
            }
        }
    }
    Ok(ended)
}

/// A run recorded with a host process that no driver holds: the process may still run as
/// an orphan (the direct child of a daemon started with `--no-keeper`). It cannot be
/// supervised (no exit status), so it must not run unseen: its group is killed when the
/// pid is still that process (same start time).
fn end_stray(shared: &Shared, id: &InstanceId, pid: u32, start_time: Option<u64>) {
    // A copied state directory's table names the original daemon's processes: they are
    // not ours to kill.
    if let Some(other) = &shared.state_copied_from {
        tracing::warn!(
            "{id}: pid {pid} is recorded by the daemon {other} this state directory was \
             copied from; leaving it alone"
        );
        return;
    }
    if let (Some(t), Ok(stat)) = (start_time, bulkhead_driver::sys::read_stat(pid)) {
        if pid > 0 && stat.starttime == t && !stat.is_zombie() {
            tracing::warn!("{id}: pid {pid} outlived a daemon without a keeper; killing its group");
            let _ = bulkhead_driver::sys::kill_group(pid, bulkhead_core::signal::Signal::KILL);
        }
    }
}
