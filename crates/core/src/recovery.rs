//! Recovery after the daemon's own crash, as a pure function: what the drivers found
//! still holding (or having held) this daemon's instances, plus what the instance table
//! and the event log knew, in; one decision per found run and per table row, out.
//!
//! The rules, in the order they apply:
//!
//! 1. A found run is its table row's when the row has the same instance id and, where the
//!    driver reports a host process, the same pid and start time (a pid reused by another
//!    program after a reboot is not this run).
//! 2. One run per key: of several found runs of one instance, the one with its row is
//!    adopted (else one whose manifest is kept, else the first); every other one is
//!    discarded (the driver ends it).
//! 3. A run the table does not know is adopted only if its driver kept what it was
//!    launched with (the keeper keeps the manifest); otherwise nothing says how to
//!    supervise it: discarded.
//! 4. A row whose run was not found: if a termination was in progress it is complete
//!    (`terminated`); if its driver could not look (engine unreachable) or it was between
//!    runs, it is resumed with no loss; otherwise it is resumed as lost (its process
//!    went while no daemon watched), and its restart policy decides.
//! 5. A row whose manifest cannot be read is forgotten (logged by the caller).
//!
//! The caller carries the decisions out (`daemon::server`); nothing here does I/O.

use std::collections::{HashMap, HashSet};

use crate::key::InstanceId;
use crate::spec::DriverKind;

/// A run a driver found (`bulkhead_driver::Found`, summarised).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundRun {
    pub instance: InstanceId,
    /// Host pid and start time, where the driver has a host process.
    pub process: Option<(u32, u64)>,
    /// Whether the driver kept the manifest it was launched with.
    pub launched: bool,
}

/// A row of the instance table (`daemon::instances::InstanceRow`, summarised).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub instance: InstanceId,
    /// `None`: the stored manifest cannot be read.
    pub driver: Option<DriverKind>,
    pub pid: Option<u32>,
    pub start_time: Option<u64>,
    /// It was between runs (waiting out a restart delay): nothing was running.
    pub between_runs: bool,
}

/// What the start-up knows besides the runs and rows.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// Instances whose termination the last daemon had begun.
    pub stopping: HashSet<InstanceId>,
    /// Drivers that could not look for their instances.
    pub unlisted: HashSet<DriverKind>,
}

/// What becomes of a found run (by its index in the input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunDecision {
    /// Supervised again; `row` is the index of its table row, if any. `resume_stop`: its
    /// termination was in progress and goes on.
    Adopt {
        row: Option<usize>,
        resume_stop: bool,
    },
    /// Ended and removed by its driver.
    Discard { reason: DiscardReason },
}

/// Why a found run is not adopted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscardReason {
    /// Another run of the same instance is adopted.
    SecondRun,
    /// The table does not know it and its driver did not keep its manifest.
    Unknown,
}

impl std::fmt::Display for DiscardReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiscardReason::SecondRun => "a second run of an instance that has one",
            DiscardReason::Unknown => "not in the instance table, and its manifest is not kept",
        })
    }
}

/// What becomes of a table row whose run was not adopted (by its index in the input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowDecision {
    /// Back under supervision by its restart policy; `lost`: its run ended unseen.
    Resume { lost: bool },
    /// Its termination was in progress and nothing of it is left: it is terminated.
    Terminated,
    /// Its manifest cannot be read: forgotten.
    Forget,
}

/// The decisions: one per found run, and one per row not adopted with a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub runs: Vec<RunDecision>,
    /// `(row index, decision)`, in row order.
    pub rows: Vec<(usize, RowDecision)>,
}

/// Decides what becomes of every found run and every row (see the module docs).
pub fn plan(found: &[FoundRun], rows: &[Row], cx: &Context) -> Plan {
    let by_id: HashMap<&InstanceId, usize> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (&r.instance, i))
        .collect();
    let matches = |f: &FoundRun| -> Option<usize> {
        let i = *by_id.get(&f.instance)?;
        let r = &rows[i];
        // A row whose manifest cannot be read cannot supervise anything.
        r.driver?;
        match f.process {
            Some((pid, start)) => {
                (r.pid == Some(pid) && r.start_time.is_none_or(|t| t == start)).then_some(i)
            }
            None => Some(i),
        }
    };
    // Rule 2: per instance, the run with its row wins, else one whose manifest is kept,
    // else the first found.
    let rank = |f: &FoundRun| (matches(f).is_some(), f.launched);
    let mut winner: HashMap<&InstanceId, usize> = HashMap::new();
    for (i, f) in found.iter().enumerate() {
        let better = match winner.get(&f.instance) {
            None => true,
            Some(&w) => rank(f) > rank(&found[w]),
        };
        if better {
            winner.insert(&f.instance, i);
        }
    }
    let mut used_rows = HashSet::new();
    let runs = found
        .iter()
        .enumerate()
        .map(|(i, f)| {
            if winner.get(&f.instance) != Some(&i) {
                return RunDecision::Discard {
                    reason: DiscardReason::SecondRun,
                };
            }
            let row = matches(f);
            if row.is_none() && !f.launched {
                return RunDecision::Discard {
                    reason: DiscardReason::Unknown,
                };
            }
            // The row of an instance adopted without it (another run's) is stale.
            used_rows.extend(by_id.get(&f.instance).copied());
            RunDecision::Adopt {
                row,
                resume_stop: cx.stopping.contains(&f.instance),
            }
        })
        .collect();
    let rows = rows
        .iter()
        .enumerate()
        .filter(|(i, _)| !used_rows.contains(i))
        .map(|(i, r)| {
            let d = match r.driver {
                None => RowDecision::Forget,
                Some(_) if cx.stopping.contains(&r.instance) => RowDecision::Terminated,
                Some(d) => RowDecision::Resume {
                    lost: !(r.between_runs || r.pid.is_none() || cx.unlisted.contains(&d)),
                },
            };
            (i, d)
        })
        .collect();
    Plan { runs, rows }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u8) -> InstanceId {
        InstanceId::parse(&format!("shared:w{n}")).unwrap().0
    }

    fn row(n: u8, pid: Option<u32>, start: Option<u64>) -> Row {
        Row {
            instance: id(n),
            driver: Some(DriverKind::Process),
            pid,
            start_time: start,
            between_runs: false,
        }
    }

    fn run(n: u8, process: Option<(u32, u64)>, launched: bool) -> FoundRun {
        FoundRun {
            instance: id(n),
            process,
            launched,
        }
    }

    #[test]
    fn a_found_run_with_its_row_is_adopted_with_it() {
        let p = plan(
            &[run(1, Some((10, 7)), true)],
            &[row(1, Some(10), Some(7))],
            &Context::default(),
        );
        assert_eq!(
            p.runs,
            vec![RunDecision::Adopt {
                row: Some(0),
                resume_stop: false
            }]
        );
        assert!(p.rows.is_empty());
    }

    #[test]
    fn a_reused_pid_is_not_the_rows_run() {
        // Same pid, another start time: the keeper's record still makes it adoptable,
        // but not with the row's restart counts.
        let p = plan(
            &[run(1, Some((10, 8)), true)],
            &[row(1, Some(10), Some(7))],
            &Context::default(),
        );
        assert_eq!(
            p.runs,
            vec![RunDecision::Adopt {
                row: None,
                resume_stop: false
            }]
        );
        assert!(p.rows.is_empty(), "the stale row is not resumed beside it");
    }

    #[test]
    fn an_unknown_run_without_its_manifest_is_discarded() {
        let p = plan(&[run(1, None, false)], &[], &Context::default());
        assert_eq!(
            p.runs,
            vec![RunDecision::Discard {
                reason: DiscardReason::Unknown
            }]
        );
    }

    #[test]
    fn of_two_unknown_runs_the_one_whose_manifest_is_kept_is_adopted() {
        let p = plan(
            &[run(1, Some((11, 1)), false), run(1, Some((12, 1)), true)],
            &[],
            &Context::default(),
        );
        assert_eq!(
            p.runs,
            vec![
                RunDecision::Discard {
                    reason: DiscardReason::SecondRun
                },
                RunDecision::Adopt {
                    row: None,
                    resume_stop: false
                }
            ]
        );
    }

    #[test]
    fn a_second_run_of_one_key_is_discarded_and_the_rows_run_kept() {
        let p = plan(
            &[run(1, Some((11, 1)), true), run(1, Some((10, 7)), true)],
            &[row(1, Some(10), Some(7))],
            &Context::default(),
        );
        assert_eq!(
            p.runs,
            vec![
                RunDecision::Discard {
                    reason: DiscardReason::SecondRun
                },
                RunDecision::Adopt {
                    row: Some(0),
                    resume_stop: false
                }
            ]
        );
    }

    #[test]
    fn rows_without_a_run_are_resumed_lost_or_terminated() {
        let mut between = row(3, None, None);
        between.between_runs = true;
        let mut docker = row(4, None, None);
        docker.driver = Some(DriverKind::Docker);
        docker.pid = Some(0);
        let mut unreadable = row(5, Some(1), None);
        unreadable.driver = None;
        let cx = Context {
            stopping: [id(2)].into(),
            unlisted: [DriverKind::Docker].into(),
        };
        let p = plan(
            &[],
            &[
                row(1, Some(10), Some(1)),
                row(2, Some(11), Some(1)),
                between,
                docker,
                unreadable,
            ],
            &cx,
        );
        assert_eq!(
            p.rows,
            vec![
                (0, RowDecision::Resume { lost: true }),
                (1, RowDecision::Terminated),
                (2, RowDecision::Resume { lost: false }),
                (3, RowDecision::Resume { lost: false }),
                (4, RowDecision::Forget),
            ]
        );
    }

    #[test]
    fn a_run_being_stopped_is_adopted_and_its_stop_resumed() {
        let cx = Context {
            stopping: [id(1)].into(),
            ..Default::default()
        };
        let p = plan(&[run(1, None, false)], &[row(1, Some(0), None)], &cx);
        assert_eq!(
            p.runs,
            vec![RunDecision::Adopt {
                row: Some(0),
                resume_stop: true
            }]
        );
    }

    fn arb_run() -> impl Strategy<Value = FoundRun> {
        (
            0u8..4,
            proptest::option::of((1u32..4, 1u64..3)),
            any::<bool>(),
        )
            .prop_map(|(n, p, l)| run(n, p, l))
    }

    fn arb_row() -> impl Strategy<Value = Row> {
        (
            0u8..4,
            proptest::option::of(1u32..4),
            proptest::option::of(1u64..3),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(n, pid, st, between, readable)| Row {
                instance: id(n),
                driver: readable.then_some(DriverKind::Process),
                pid,
                start_time: st,
                between_runs: between,
            })
    }

    proptest! {
        /// Whatever was found and stored: every run gets one decision, at most one run per
        /// instance is adopted, a row is used by at most one adoption, and every row is
        /// either adopted with its run or decided on once, so nothing runs unseen and no
        /// key runs twice.
        #[test]
        fn one_run_per_key_and_nothing_unseen(
            found in proptest::collection::vec(arb_run(), 0..6),
            rows in proptest::collection::vec(arb_row(), 0..6)
                .prop_map(|rs| {
                    // The table has one row per instance.
                    let mut seen = HashSet::new();
                    rs.into_iter().filter(|r| seen.insert(r.instance.clone())).collect::<Vec<_>>()
                }),
            stopping in proptest::collection::hash_set(0u8..4, 0..3),
        ) {
            let cx = Context { stopping: stopping.iter().map(|n| id(*n)).collect(), ..Default::default() };
            let p = plan(&found, &rows, &cx);
            prop_assert_eq!(p.runs.len(), found.len());
            let mut adopted = HashSet::new();
            let mut adopted_rows = HashSet::new();
            for (f, d) in found.iter().zip(&p.runs) {
                if let RunDecision::Adopt { row, .. } = d {
                    prop_assert!(adopted.insert(f.instance.clone()), "two runs adopted for one key");
                    if let Some(r) = row {
                        prop_assert!(adopted_rows.insert(*r));
                        prop_assert_eq!(&rows[*r].instance, &f.instance);
                    }
                }
            }
            // A run that is its row's, or whose driver kept its manifest, is never lost
            // for want of the other runs: its key gets an adopted run.
            for f in &found {
                let its_row = rows.iter().any(|r| r.instance == f.instance && r.driver.is_some()
                    && f.process.is_none_or(|(pid, st)| r.pid == Some(pid) && r.start_time.is_none_or(|t| t == st)));
                if f.launched || its_row {
                    prop_assert!(adopted.contains(&f.instance), "{:?} left without a run", f.instance);
                }
            }
            // Rows: decided once, and never resumed beside an adopted run of their key.
            let decided: Vec<usize> = p.rows.iter().map(|(i, _)| *i).collect();
            let uniq: HashSet<_> = decided.iter().collect();
            prop_assert_eq!(uniq.len(), decided.len());
            for (i, r) in rows.iter().enumerate() {
                let with_run = adopted.contains(&r.instance);
                prop_assert_eq!(with_run, !decided.contains(&i), "row {} decided wrongly", i);
                if let Some((_, RowDecision::Resume { .. })) = p.rows.iter().find(|(j, _)| *j == i) {
                    prop_assert!(!cx.stopping.contains(&r.instance), "a stopped instance resumed");
                }
            }
        }
    }
}
