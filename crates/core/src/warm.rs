//! The `warm:` section of a manifest: a pool of instances-to-be prepared ahead of their
//! launch, so that a launch only hands its program over.
//!
//! ```yaml
//! driver: sandbox          # or docker, or process
//! warm: {size: 2, max_idle: 10m}
//! ```
//!
//! A slot is everything of a launch that does not depend on the request: for `sandbox`
//! the cgroups, the namespaces, the mounts and our init, waiting; for `docker` a created
//! and started container whose first process is a small init of ours, waiting for the
//! program; for `process` a child of the keeper in the instance's cgroup, its user,
//! limits and working directory set, waiting for the program. The daemon keeps `size` slots per workload, refills them in the background
//! under a global memory budget, takes one on a launch of a new key when one is ready
//! (never waiting for one), and removes slots unused for `max_idle` (a pool that went
//! idle is refilled on its next launch).
//!
//! What a slot cannot know ahead comes with the launch: `sockets:` are bound for the key
//! and passed with the hand-over (the docker driver refuses `sockets:` altogether), and
//! the tenant's channel space (`channels:`) is mounted into the slot before its program
//! runs.
//!
//! This module is data, validation and the pool's arithmetic ([`plan`]); the pool itself
//! is the daemon's (`daemon/src/warm.rs`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::spec::{DriverKind, WorkloadSpec};

/// The most slots one workload may keep.
pub const MAX_SIZE: u32 = 64;

/// `max_idle` when the manifest says nothing.
pub const DEFAULT_MAX_IDLE: Duration = Duration::from_secs(600);

/// `warm:` of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Warm {
    /// Slots kept ready.
    pub size: u32,
    /// A slot unused this long is removed, and the pool is not refilled until its next
    /// launch.
    #[serde(default = "default_max_idle", with = "crate::duration::serde_duration")]
    pub max_idle: Duration,
}

fn default_max_idle() -> Duration {
    DEFAULT_MAX_IDLE
}

/// Checks `warm:` against the rest of the manifest: `(field, reason)`.
pub fn validate(spec: &WorkloadSpec) -> Result<(), (String, String)> {
    let Some(w) = &spec.warm else {
        return Ok(());
    };
    let fail = |f: &str, r: String| Err((f.to_owned(), r));
    if !matches!(
        spec.driver,
        DriverKind::Process | DriverKind::Sandbox | DriverKind::Docker
    ) {
        return fail(
            "warm",
            format!(
                "not supported by driver {}: only process, sandbox and docker instances \
                 can be prepared ahead",
                spec.driver
            ),
        );
    }
    if w.size == 0 || w.size > MAX_SIZE {
        return fail(
            "warm.size",
            format!("must be 1 to {MAX_SIZE}, not {}", w.size),
        );
    }
    if w.max_idle.is_zero() {
        return fail("warm.max_idle", "must be more than 0".into());
    }
    Ok(())
}

/// One pool as [`plan`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    /// `warm.size`.
    pub size: u32,
    pub max_idle: Duration,
    /// Ready slots.
    pub ready: Vec<SlotView>,
    /// Slots being made now.
    pub making: u32,
    /// The memory a new slot of this pool is expected to hold (the last one's, or 0
    /// before the first).
    pub estimate: u64,
    /// When a slot of the pool was last taken (or the pool made).
    pub last_use: Duration,
    /// The pool was drained for idleness: no refill until its next launch.
    pub dormant: bool,
}

/// One ready slot as [`plan`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotView {
    /// When it was made.
    pub made: Duration,
    /// The memory it holds (bytes).
    pub memory: u64,
    /// It went to a tenant with the rest of its set (its id range is the tenant's): it
    /// serves only that tenant's next launch of the workload, so it does not count
    /// toward `size`, and it gives way when the budget is needed for a slot that can
    /// serve anyone.
    pub owned: bool,
}

/// What the pool manager does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Make one slot for pool `pool`.
    Make { pool: usize },
    /// Remove ready slot `slot` of pool `pool` (unused for `max_idle`, or an owned one
    /// giving way under the budget).
    Expire { pool: usize, slot: usize },
}

/// The next steps for `pools` at `now` (a monotonic clock), under `budget` bytes for
/// every slot together: expiries first, then at most one new slot (the manager makes
/// slots one at a time, so that refills take one core at most), for the pool furthest
/// below its size (owned slots do not count toward it). A new slot is made only if the
/// ready and in-the-making slots' memory plus its estimate stays within the budget;
/// when it does not, the oldest owned slot is removed instead (a slot anyone can take
/// is worth more than one kept for a tenant's possible next launch). Nothing is made
/// while `launching` (a launch is on its way: refills wait for it, they never take its
/// CPU).
pub fn plan(pools: &[PoolView], budget: u64, now: Duration, launching: bool) -> Vec<Step> {
    let live = |v: &PoolView, s: &SlotView| now.saturating_sub(s.made) < v.max_idle;
    let mut steps = Vec::new();
    for (p, v) in pools.iter().enumerate() {
        for (s, slot) in v.ready.iter().enumerate() {
            if !live(v, slot) {
                steps.push(Step::Expire { pool: p, slot: s });
            }
        }
    }
    let making: u32 = pools.iter().map(|v| v.making).sum();
    if launching || making > 0 {
        return steps;
    }
    let held: u64 = pools
        .iter()
        .flat_map(|v| v.ready.iter().filter(move |s| live(v, s)).map(|s| s.memory))
        .sum();
    let want = pools
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.dormant)
        .map(|(p, v)| {
            let free = v.ready.iter().filter(|s| live(v, s) && !s.owned).count() as u32;
            (p, v, v.size.saturating_sub(free))
        })
        .filter(|(_, _, missing)| *missing > 0)
        .max_by_key(|(p, _, missing)| (*missing, std::cmp::Reverse(*p)));
    let Some((p, v, _)) = want else {
        return steps;
    };
    // Before a pool's first slot its size is unknown: at least a byte, so that a budget
    // of 0 keeps none.
    let need = v.estimate.max(1);
    let owned: u64 = pools
        .iter()
        .flat_map(|v| v.ready.iter().filter(move |s| s.owned && live(v, s)))
        .map(|s| s.memory)
        .sum();
    if held.saturating_add(need) <= budget {
        steps.push(Step::Make { pool: p });
    } else if (held - owned).saturating_add(need) > budget {
        // Removing every owned slot would not make room: they stay.
    } else if let Some((q, s, _)) = pools
        .iter()
        .enumerate()
        .flat_map(|(q, v)| {
            v.ready
                .iter()
                .enumerate()
                .filter(move |(_, s)| s.owned && live(v, s))
                .map(move |(s, slot)| (q, s, slot.made))
        })
        .min_by_key(|(_, _, made)| *made)
    {
        steps.push(Step::Expire { pool: q, slot: s });
    }
    steps
}

/// Whether a pool unused for `max_idle` goes dormant (its slots expired and nothing
/// was taken since): it is refilled only on its next launch.
pub fn dormant(v: &PoolView, now: Duration) -> bool {
    now.saturating_sub(v.last_use) >= v.max_idle
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pool(size: u32, ready: &[(u64, u64)]) -> PoolView {
        PoolView {
            size,
            max_idle: Duration::from_secs(60),
            ready: ready
                .iter()
                .map(|(t, m)| SlotView {
                    made: Duration::from_secs(*t),
                    memory: *m,
                    owned: false,
                })
                .collect(),
            making: 0,
            estimate: 10,
            last_use: Duration::ZERO,
            dormant: false,
        }
    }

    #[test]
    fn the_pool_furthest_below_its_size_is_filled_first_one_slot_at_a_time() {
        let pools = [pool(2, &[(0, 10)]), pool(3, &[])];
        let s = plan(&pools, 1000, Duration::from_secs(1), false);
        assert_eq!(s, vec![Step::Make { pool: 1 }]);
        let mut busy = pools.clone();
        busy[1].making = 1;
        assert_eq!(plan(&busy, 1000, Duration::from_secs(1), false), vec![]);
    }

    #[test]
    fn nothing_is_made_while_a_launch_is_on_its_way() {
        let pools = [pool(2, &[])];
        assert_eq!(plan(&pools, 1000, Duration::ZERO, true), vec![]);
        assert_eq!(
            plan(&pools, 1000, Duration::ZERO, false),
            vec![Step::Make { pool: 0 }]
        );
    }

    #[test]
    fn the_budget_stops_a_refill_and_an_expired_slot_is_removed_and_replaced() {
        let pools = [pool(3, &[(0, 10), (50, 10)])];
        // 20 held + 10 expected > 25.
        assert_eq!(plan(&pools, 25, Duration::from_secs(55), false), vec![]);
        assert_eq!(
            plan(&pools, 30, Duration::from_secs(55), false),
            vec![Step::Make { pool: 0 }]
        );
        // At 60 s the first slot expires: removed, and its memory no longer counts.
        assert_eq!(
            plan(&pools, 25, Duration::from_secs(60), false),
            vec![Step::Expire { pool: 0, slot: 0 }, Step::Make { pool: 0 }]
        );
    }

    #[test]
    fn owned_slots_do_not_fill_a_pool_and_give_way_under_the_budget() {
        let mut a = pool(1, &[(0, 10)]);
        a.ready[0].owned = true;
        let b = pool(1, &[(5, 10)]);
        // Pool 0's one slot is a tenant's: it still lacks one anyone can take.
        assert_eq!(
            plan(&[a.clone(), b.clone()], 100, Duration::from_secs(10), false),
            vec![Step::Make { pool: 0 }]
        );
        // 20 held + 10 > 25: the owned slot goes, then the pool is refilled.
        assert_eq!(
            plan(&[a.clone(), b.clone()], 25, Duration::from_secs(10), false),
            vec![Step::Expire { pool: 0, slot: 0 }]
        );
        let mut after = a.clone();
        after.ready.clear();
        assert_eq!(
            plan(&[after, b.clone()], 25, Duration::from_secs(10), false),
            vec![Step::Make { pool: 0 }]
        );
        // A slot anyone can take never gives way.
        assert_eq!(
            plan(&[pool(1, &[]), b], 15, Duration::from_secs(10), false),
            vec![]
        );
    }

    #[test]
    fn a_dormant_pool_is_not_refilled() {
        let mut p = pool(2, &[]);
        p.dormant = true;
        assert_eq!(plan(&[p], 1000, Duration::ZERO, false), vec![]);
        let q = pool(1, &[]);
        assert!(dormant(&q, Duration::from_secs(60)));
        assert!(!dormant(&q, Duration::from_secs(59)));
    }

    #[test]
    fn validation_names_the_file_and_field() {
        let parse = |extra: &str| {
            crate::spec::parse_manifest(
                "w/w/manifest.yaml",
                "w",
                &format!("name: w\ncommand: [x]\n{extra}"),
            )
        };
        let ok = parse("driver: sandbox\nwarm: {size: 2}").unwrap();
        assert_eq!(ok.warm.as_ref().unwrap().max_idle, DEFAULT_MAX_IDLE);
        let docker = parse("driver: docker\ndocker: {image: x}\nwarm: {size: 1, max_idle: 30s}");
        assert_eq!(
            docker.unwrap().warm.unwrap().max_idle,
            Duration::from_secs(30)
        );
        let field = |extra: &str| {
            let e = parse(extra).unwrap_err();
            assert!(e.to_string().contains("w/w/manifest.yaml"), "{e}");
            (e.field.unwrap_or_default(), e.reason)
        };
        assert_eq!(field("driver: sandbox\nwarm: {size: 0}").0, "warm.size");
        assert_eq!(field("driver: sandbox\nwarm: {size: 65}").0, "warm.size");
        assert_eq!(
            field("driver: sandbox\nwarm: {size: 1, max_idle: 0s}").0,
            "warm.max_idle"
        );
        // The process driver's slots are the keeper's children; the cluster engines
        // keep none.
        let mut process = parse("warm: {size: 1}").unwrap();
        process.driver = DriverKind::Swarm;
        let (f, r) = validate(&process).unwrap_err();
        assert_eq!(f, "warm");
        assert!(r.contains("driver swarm"), "{r}");
        // Channels: the tenant's channel space is mounted into the slot at the hand-over.
        let with_channels =
            parse("driver: sandbox\nwarm: {size: 1}\nchannels: {inputs: [{name: a}], outputs: []}");
        assert!(with_channels.is_ok(), "{with_channels:?}");
        // Sockets are passed with the hand-over.
        let with_sockets =
            parse("driver: sandbox\nwarm: {size: 1}\nsockets: [{name: a, listen: 'tcp:$PORT'}]");
        assert!(with_sockets.is_ok(), "{with_sockets:?}");
        let e = parse("driver: sandbox\nwarm: {size: 1, sizee: 2}").unwrap_err();
        assert!(e.to_string().contains("sizee"), "{e}");
    }

    fn arb_pool() -> impl Strategy<Value = PoolView> {
        (
            1u32..5,
            proptest::collection::vec((0u64..200, 0u64..50, any::<bool>()), 0..6),
            0u32..2,
            0u64..50,
            any::<bool>(),
        )
            .prop_map(|(size, ready, making, estimate, dormant)| PoolView {
                size,
                max_idle: Duration::from_secs(100),
                ready: ready
                    .into_iter()
                    .map(|(t, m, owned)| SlotView {
                        made: Duration::from_secs(t),
                        memory: m,
                        owned,
                    })
                    .collect(),
                making,
                estimate,
                last_use: Duration::ZERO,
                dormant,
            })
    }

    proptest! {
        /// Whatever the pools: at most one slot is made at a time, never beyond a pool's
        /// size (owned slots apart), never past the budget, never for a dormant pool,
        /// never while a launch runs; every expired slot is removed, and an owned one
        /// gives way only when the budget stops a slot a pool lacks.
        #[test]
        fn a_plan_keeps_every_bound(
            pools in proptest::collection::vec(arb_pool(), 0..5),
            budget in 0u64..300,
            now in 0u64..300,
            launching in any::<bool>(),
        ) {
            let now = Duration::from_secs(now);
            let live = |v: &PoolView, s: &SlotView| now.saturating_sub(s.made) < v.max_idle;
            let steps = plan(&pools, budget, now, launching);
            let makes: Vec<usize> = steps.iter().filter_map(|s| match s {
                Step::Make { pool } => Some(*pool),
                _ => None,
            }).collect();
            prop_assert!(makes.len() <= 1);
            let expired: Vec<(usize, usize)> = steps.iter().filter_map(|s| match s {
                Step::Expire { pool, slot } => Some((*pool, *slot)),
                _ => None,
            }).collect();
            let stale = expired.iter().filter(|(p, s)| !live(&pools[*p], &pools[*p].ready[*s])).count();
            let stale_all: usize = pools.iter().map(|v| v.ready.iter().filter(|s| !live(v, s)).count()).sum();
            prop_assert_eq!(stale, stale_all);
            let gave_way: Vec<_> = expired.iter().filter(|(p, s)| live(&pools[*p], &pools[*p].ready[*s])).collect();
            prop_assert!(gave_way.len() <= 1);
            prop_assert!(gave_way.is_empty() || makes.is_empty());
            let held: u64 = pools.iter().flat_map(|v| v.ready.iter()
                .filter(|s| live(v, s)).map(|s| s.memory)).sum();
            let owned: u64 = pools.iter().flat_map(|v| v.ready.iter()
                .filter(|s| live(v, s) && s.owned).map(|s| s.memory)).sum();
            for (p, s) in &gave_way {
                prop_assert!(pools[*p].ready[*s].owned && !launching);
                let lacking = pools.iter().any(|v| {
                    let free = v.ready.iter().filter(|s| live(v, s) && !s.owned).count() as u32;
                    let need = v.estimate.max(1);
                    !v.dormant && free < v.size && held + need > budget && held - owned + need <= budget
                });
                prop_assert!(lacking, "an owned slot gave way for nothing");
            }
            if let Some(&p) = makes.first() {
                let v = &pools[p];
                prop_assert!(!launching && !v.dormant);
                prop_assert!(pools.iter().all(|v| v.making == 0));
                let free = v.ready.iter().filter(|s| live(v, s) && !s.owned).count() as u32;
                prop_assert!(free < v.size);
                prop_assert!(held + v.estimate.max(1) <= budget);
            }
        }
    }
}
