//! Warm pools (`warm:`, see `bulkhead_core::warm`): slots prepared ahead by the drivers
//! that can ([`Driver::prewarm`]), taken by launches of new keys.
//!
//! One pool per workload of the catalog with `warm:` whose driver prewarms. One task, the
//! manager, makes slots **one at a time** and only while no launch is on its way (the
//! `launching` count, from a spawn's start until its instance is ready) nor was in the
//! last [`QUIET`] (the launch's answer still has to reach its client, and launches come
//! in bursts): a refill never takes a launch's CPU; but it waits at most [`YIELD_MAX`]
//! for a stream of launches or a program slow to be ready, under the global memory
//! budget (`--warm-memory`), as [`bulkhead_core::warm::plan`] decides; it removes slots
//! unused for `max_idle` and lets a pool unused that long go dormant (refilled on its
//! next launch). A launch never waits for a slot: it takes a ready one or spawns cold.
//!
//! What a slot (`warm-<workload>-<daemon pid>-<n>`) is made with: its own directory `<state>/notify/warm-<n>/`
//! (shown inside at the same path), with the instance's notify socket bound in it, a port
//! from the daemon's range (the instance's `$PORT`), and for `user_namespace: auto` a
//! host id range, held under the name of the slot's *set* (`warm-set:<kind>:<n>`). A
//! launch of a tenant that holds no range yet takes a slot of a set nobody owns and
//! hands the whole set to it ([`IdBlocks::hand_over`](bulkhead_core::sandbox::IdBlocks::hand_over):
//! every hold on the range is the tenant's from then on). A set has one slot at first;
//! a pool that saw a tenant which holds a range spawn cold (its second workload) *joins*
//! sets from then on: its new slots join the sets of the other pools of the same kind
//! of tenant, and its slots made alone are replaced, one at a time, off a launch's way.
//! So a tenant's next workloads launch from its set's other slots, which serve no other
//! tenant, while pools whose tenants run one workload lose nothing to sets. An owned
//! slot does not count toward `size`; it goes when its tenant runs nothing any more
//! (every hold left on the range is a slot's), and gives way first under the memory
//! budget ([`bulkhead_core::warm::plan`]). A tenant whose range came from a cold spawn,
//! and a restart (which keeps its range), spawn cold.
//!
//! A manifest change (reload) drains the workload's pool and starts a new one; shutdown
//! drains every pool. After a daemon crash a sandbox slot's processes are gone with it
//! (parent-death signal) and its cgroup is swept like any stale one; a process slot (the
//! keeper's child) exits when its socket's daemon end closes, and its cgroup is swept; the docker driver's
//! `recover` removes this daemon's unclaimed slot containers. Slot directories left
//! behind are removed at start-up.

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bulkhead_core::sandbox::IdBlocks;
use bulkhead_core::spec::WorkloadSpec;
use bulkhead_core::warm::{PoolView, SlotView, Step};
use bulkhead_driver::warm::{Warm, WarmSpec};
use bulkhead_driver::{Bind, Driver};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::dataplane::IdHold;
use crate::instance::Slot;
use crate::Shared;

/// The default `--warm-memory`: what every slot together may hold.
pub const DEFAULT_BUDGET: u64 = 256 << 20;

/// How often the manager looks at the pools when nothing wakes it.
const TICK: Duration = Duration::from_millis(250);

/// How long refills wait for launches on their way: a program that takes longer to be
/// ready (a database recovering) does not hold every pool empty.
const YIELD_MAX: Duration = Duration::from_secs(1);

/// How long after the last launch became ready (or failed) refills still wait. Measured
/// on the sandbox bench (docs/benchmarks.md): a refill started at the instant of `ready`
/// delayed the launch's answer by ~0.15 ms on a 2-core machine (its clone, mounts and v1
/// cgroup attaches ran while the answer was written).
pub(crate) const QUIET: Duration = Duration::from_millis(20);

/// The daemon's pools.
pub(crate) struct Pools {
    inner: Mutex<BTreeMap<String, Pool>>,
    wake: Arc<Notify>,
    launching: AtomicUsize,
    /// When the last launch on its way was done (µs since `epoch`; 0: none yet).
    launched: AtomicU64,
    /// Slots being made, and the signal that one finished (shutdown waits for them).
    making: AtomicUsize,
    made: Notify,
    /// Set by [`Pools::shutdown`]: nothing is made any more.
    closed: std::sync::atomic::AtomicBool,
    epoch: Instant,
    /// The number of the next new id set.
    sets: AtomicU64,
}

struct Pool {
    spec: Arc<WorkloadSpec>,
    dir: PathBuf,
    ready: VecDeque<Ready>,
    making: u32,
    /// The id sets of the slots being made (`user_namespace: auto`).
    making_sets: Vec<String>,
    /// A tenant that already ran something launched this workload (and spawned cold):
    /// its new slots join the sets of the other pools of its kind, instead of each
    /// starting one of its own.
    joins: bool,
    estimate: u64,
    last_use: Instant,
    dormant: bool,
}

/// A slot ready to be taken.
pub(crate) struct Ready {
    pub warm: Box<dyn Warm>,
    pub name: String,
    made: Instant,
    memory: u64,
    /// The instance's `$PORT` (held in the daemon's port set).
    pub port: u16,
    /// The slot's own directory (shown inside at the same path).
    pub dir: PathBuf,
    pub ids: Option<IdHold>,
    /// The channel space made with it (`channels:`), the tenant's if it has none yet.
    pub space: Option<crate::dataplane::WarmSpace>,
    /// The instance's notify socket (`readiness: {notify: true}`), bound in the slot's
    /// directory when it was made: binding it took ~0.1 ms of a launch's path.
    pub notify: Option<crate::readiness::NotifySocket>,
}

/// Counts a launch on its way while it lives: from the start of a spawn until the
/// instance is ready (or its run failed), so that a refill does not compete with a
/// program that is still starting.
pub(crate) struct Launching(Weak<Shared>);

impl Drop for Launching {
    fn drop(&mut self) {
        if let Some(sh) = self.0.upgrade() {
            let pools = &sh.warm;
            if pools.launching.fetch_sub(1, Ordering::SeqCst) == 1 {
                let at = pools.epoch.elapsed().as_micros().max(1);
                pools
                    .launched
                    .store(u64::try_from(at).unwrap_or(u64::MAX), Ordering::SeqCst);
                pools.wake.notify_one();
            }
        }
    }
}

impl Default for Pools {
    fn default() -> Pools {
        Pools {
            inner: Mutex::new(BTreeMap::new()),
            wake: Arc::new(Notify::new()),
            launching: AtomicUsize::new(0),
            launched: Default::default(),
            making: AtomicUsize::new(0),
            made: Notify::new(),
            closed: Default::default(),
            epoch: Instant::now(),
            sets: AtomicU64::new(1),
        }
    }
}

impl Pools {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Pool>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks a launch (any driver's spawn) on its way until the guard drops.
    pub(crate) fn launching(sh: &Arc<Shared>) -> Launching {
        sh.warm.launching.fetch_add(1, Ordering::SeqCst);
        Launching(Arc::downgrade(sh))
    }

    /// Ready slots per workload that any new tenant can take, and the memory every
    /// ready slot of the workload holds, a tenant's too (for `health` and tests).
    pub(crate) fn counts(&self, sh: &Shared) -> BTreeMap<String, (usize, u64)> {
        let map = self.lock();
        let ids = sh.ids.lock().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .map(|(w, p)| {
                let free = p.ready.iter().filter(|r| owner(&ids, r).is_none()).count();
                (w.clone(), (free, p.ready.iter().map(|r| r.memory).sum()))
            })
            .collect()
    }

    /// A ready slot for a spawn of `slot` (a new key's first run, or any run that holds
    /// no host id range of its own), if its workload's pool has one for this manifest.
    /// Never waits.
    pub(crate) fn take(&self, sh: &Arc<Shared>, slot: &Slot) -> Option<Ready> {
        let spec = slot.spec();
        spec.warm.as_ref()?;
        let needs_ids = bulkhead_core::channels::needs_ids(&spec);
        let tenant = bulkhead_core::channels::ids_tenant(&slot.id, &spec);
        // A restart keeps its tenant's range: only a new key's first run takes a slot.
        let restart = needs_ids && slot.ids.lock().unwrap_or_else(|e| e.into_inner()).is_some();
        let mut dead = Vec::new();
        let taken = (|| {
            if restart {
                return None;
            }
            let mut pools = self.lock();
            let pool = pools.get_mut(&spec.name).filter(|p| p.spec == spec)?;
            pool.last_use = Instant::now();
            pool.dormant = false;
            let mut ids = sh.ids.lock().unwrap_or_else(|e| e.into_inner());
            let mut i = 0;
            while i < pool.ready.len() {
                let r = &pool.ready[i];
                if !r.warm.alive() {
                    dead.extend(pool.ready.remove(i));
                    continue;
                }
                let fits = match &r.ids {
                    None => true,
                    // A slot of a set that went to this tenant (it launched another
                    // workload from the set) is in its range; a set nobody owns goes,
                    // with its other pools' slots, to a tenant that holds no range
                    // (`hand_over` refuses one that does: a slot made with another
                    // range cannot serve it). A slot owned by another tenant never
                    // serves this one.
                    Some(h) => match owner(&ids, r) {
                        Some(o) => o == tenant,
                        None => ids.hand_over(&h.tenant, &tenant),
                    },
                };
                if fits {
                    let mut r = pool.ready.remove(i)?;
                    if let Some(h) = r.ids.as_mut() {
                        h.tenant = tenant.clone();
                    }
                    return Some(r);
                }
                i += 1;
            }
            if needs_ids && !pool.joins && ids.owner(&tenant).is_some() {
                // Learned from use: this workload is a tenant's second (or later) one.
                tracing::info!(
                    "warm pool of {}: {} spawns cold (its tenant holds an id range); the \
                     pool's slots now join the sets of its tenants' other workloads",
                    spec.name,
                    slot.id
                );
                pool.joins = true;
                self.wake.notify_one();
            }
            None
        })();
        for r in dead {
            tracing::warn!("warm slot {} died while it waited; removed", r.name);
            discard_later(sh, r);
        }
        sh.metrics.warm_launch(&spec.name, taken.is_some());
        self.wake.notify_one();
        if let Some(r) = &taken {
            tracing::info!("{}: launched from warm slot {}", slot.id, r.name);
        }
        taken
    }

    /// Ends the pools: no slot is made any more, and every ready one is removed (after
    /// the slots being made are done). Shutdown calls it.
    pub(crate) async fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        loop {
            let made = self.made.notified();
            let ready: Vec<Ready> = self
                .lock()
                .values_mut()
                .flat_map(|p| p.ready.drain(..))
                .collect();
            discard_all(ready).await;
            if self.making.load(Ordering::SeqCst) == 0 {
                break;
            }
            made.await;
        }
        self.lock().clear();
    }
}

/// Starts the manager (after recovery: the drivers' leftovers are settled).
pub(crate) fn start(sh: &Arc<Shared>) {
    sweep_dirs(sh, true);
    tokio::spawn(manage(Arc::downgrade(sh)));
}

async fn manage(weak: Weak<Shared>) {
    let mut last_sweep = Instant::now();
    // Since when launches have been on their way without a pause.
    let mut busy_since: Option<Instant> = None;
    loop {
        let next_look: Duration;
        let Some(sh) = weak.upgrade() else { return };
        let pools = &sh.warm;
        let wake_on = pools.wake.clone();
        let wake = wake_on.notified();
        if sh.shutting_down.load(Ordering::SeqCst) || pools.closed.load(Ordering::SeqCst) {
            return;
        }
        sync(&sh);
        let now = Instant::now();
        let (expired, make, busy) = {
            let mut map = pools.lock();
            // A pool unused for `max_idle` goes dormant: its slots go, and it is
            // refilled on its next launch.
            let mut gone = Vec::new();
            for p in map.values_mut() {
                let max_idle = p.spec.warm.as_ref().map(|w| w.max_idle).unwrap_or_default();
                if !p.dormant && now.duration_since(p.last_use) >= max_idle {
                    p.dormant = true;
                    gone.extend(p.ready.drain(..));
                }
            }
            // Busy: a launch on its way, or one done less than QUIET ago.
            let quiet_at = match pools.launched.load(Ordering::SeqCst) {
                0 => None,
                at => Some(pools.epoch + Duration::from_micros(at) + QUIET),
            };
            let busy =
                pools.launching.load(Ordering::SeqCst) > 0 || quiet_at.is_some_and(|q| now < q);
            busy_since = if busy { busy_since.or(Some(now)) } else { None };
            // Woken again when the quiet time is over (a launch's end wakes it too).
            next_look = match quiet_at {
                Some(q) if q > now && pools.launching.load(Ordering::SeqCst) == 0 => {
                    (q - now).min(TICK)
                }
                _ => TICK,
            };
            let yielding = busy_since.is_some_and(|t| now.duration_since(t) < YIELD_MAX);
            let mut ids = sh.ids.lock().unwrap_or_else(|e| e.into_inner());
            if !yielding {
                retire(&mut map, &ids, &mut gone);
            }
            let names: Vec<String> = map.keys().cloned().collect();
            let views: Vec<PoolView> = map.values().map(|p| view(p, pools.epoch, &ids)).collect();

            let steps = bulkhead_core::warm::plan(
                &views,
                sh.cfg.warm_memory,
                now.duration_since(pools.epoch),
                yielding,
            );
            let mut make = None;
            // Expiries come first, per pool in ascending slot order: remove from the back.
            let mut expire: Vec<(usize, usize)> = Vec::new();
            for s in steps {
                match s {
                    Step::Expire { pool, slot } => expire.push((pool, slot)),
                    Step::Make { pool } => make = Some(names[pool].clone()),
                }
            }
            expire.sort_unstable_by(|a, b| b.cmp(a));
            for (p, s) in expire {
                if let Some(r) = map.get_mut(&names[p]).and_then(|pool| pool.ready.remove(s)) {
                    gone.push(r);
                }
            }
            // A new slot that maps a range joins the first set nobody owns that has no
            // slot of its pool yet, or starts a new one: so a tenant's first launch from
            // a slot makes the set's slots of its other workloads its own.
            let make = make.and_then(|w| {
                let set = bulkhead_core::channels::needs_ids(&map.get(&w)?.spec)
                    .then(|| choose_set(&map, &w, &ids, &pools.sets));
                let hold = match set {
                    None => None,
                    Some(set) => match ids.acquire(&set) {
                        Ok(range) => Some(IdHold::new(&sh, set, range)),
                        Err(e) => {
                            tracing::warn!("warm pool of {w}: cannot make a slot ({e})");
                            return None;
                        }
                    },
                };
                let p = map.get_mut(&w)?;
                p.making += 1;
                p.making_sets
                    .extend(hold.as_ref().map(|h| h.tenant.clone()));
                pools.making.fetch_add(1, Ordering::SeqCst);
                Some((w, p.spec.clone(), p.dir.clone(), hold))
            });
            drop(ids);
            (gone, make, busy)
        };
        for r in expired {
            tracing::debug!("warm slot {} unused for its max_idle: removed", r.name);
            discard_later(&sh, r);
        }
        update_gauges(&sh);
        if !busy {
            spare_notify(&sh);
        }
        if let Some((workload, spec, dir, hold)) = make {
            make_slot(&sh, &workload, spec, dir, hold).await;
            update_gauges(&sh);
            continue;
        }
        if last_sweep.elapsed() >= Duration::from_secs(60) {
            sweep_dirs(&sh, false);
            last_sweep = Instant::now();
        }
        drop(sh);
        tokio::select! {
            _ = wake => {}
            _ = tokio::time::sleep(next_look) => {}
        }
    }
}

/// Binds the notify socket the next cold launch takes (`Shared::take_spare_notify`),
/// while no launch is on its way: a bind in the state directory cost 0.1-0.25 ms of a
/// launch on the 2-core VM (docs/benchmarks.md). One at a time; the file is removed
/// when the socket drops (a launch's end, or the daemon's shutdown).
fn spare_notify(sh: &Shared) {
    let mut spare = sh.notify_spare.lock().unwrap_or_else(|e| e.into_inner());
    if spare.is_some() {
        return;
    }
    let path = sh.notify_dir().join(format!("{}.sock", sh.next_seq()));
    match crate::readiness::NotifySocket::bind(&path) {
        Ok(n) => *spare = Some(n),
        Err(e) => tracing::debug!("cannot bind a spare notify socket {}: {e}", path.display()),
    }
}

/// The prefix of an id set's name (`warm-set:<n>`): the holds of its slots, one per
/// pool, are on one range until a launch hands the set to its tenant.
const SET: &str = "warm-set:";

/// The tenant a slot's id set went to (`None`: nobody's yet, or it maps no range).
fn owner<'a>(ids: &'a IdBlocks, r: &'a Ready) -> Option<&'a str> {
    let h = r.ids.as_ref()?;
    ids.owner(&h.tenant).filter(|o| *o != h.tenant)
}

/// Removes the slots that serve nobody any more, off a launch's way: those of a set
/// whose tenant runs nothing (every hold left on its range is a slot's), and one slot
/// (at a time) made before its pool joined sets while a set it could join exists.
fn retire(map: &mut BTreeMap<String, Pool>, ids: &IdBlocks, gone: &mut Vec<Ready>) {
    let mut slot_holds: BTreeMap<&str, u32> = BTreeMap::new();
    for p in map.values() {
        let making = p.making_sets.iter().filter_map(|n| ids.owner(n));
        let ready = p.ready.iter().filter_map(|r| owner(ids, r));
        for o in making.chain(ready) {
            *slot_holds.entry(o).or_default() += 1;
        }
    }
    let orphans: Vec<String> = slot_holds
        .into_iter()
        .filter(|(o, n)| !o.starts_with(SET) && ids.holds(o) == *n)
        .map(|(o, _)| o.to_owned())
        .collect();
    for p in map.values_mut() {
        let mut i = 0;
        while i < p.ready.len() {
            if owner(ids, &p.ready[i]).is_some_and(|o| orphans.iter().any(|x| x == o)) {
                gone.extend(p.ready.remove(i));
            } else {
                i += 1;
            }
        }
    }
    if let Some((w, i)) = alone(map, ids) {
        gone.extend(map.get_mut(&w).and_then(|p| p.ready.remove(i)));
    }
}

/// The kind of tenant a workload's instances belong to, which names its sets: a set's
/// slots can only serve one tenant, so only pools of one kind share sets (`None`: each
/// instance is a tenant of its own, a shared one without channels).
fn set_kind(spec: &WorkloadSpec) -> Option<&'static str> {
    use bulkhead_core::key::Isolation;
    match spec.isolation {
        Isolation::Session => Some("session"),
        Isolation::Namespace => Some("ns"),
        Isolation::None if spec.channels.is_some() => Some("shared"),
        Isolation::None => None,
    }
}

/// The sets nobody owns yet in which `pool` has a slot (ready or being made).
fn sets_of(p: &Pool, ids: &IdBlocks) -> Vec<String> {
    let ready = p
        .ready
        .iter()
        .filter_map(|r| r.ids.as_ref().map(|h| h.tenant.clone()));
    ready
        .chain(p.making_sets.iter().cloned())
        .filter(|n| ids.owner(n) == Some(n.as_str()))
        .collect()
}

/// A set nobody owns, of `workload`'s kind, in which its pool has no slot: the one with
/// the lowest number (`None`: the pool does not join sets, or there is none).
fn joinable_set(map: &BTreeMap<String, Pool>, workload: &str, ids: &IdBlocks) -> Option<String> {
    let p = map.get(workload)?;
    let kind = set_kind(&p.spec).filter(|_| p.joins)?;
    let prefix = format!("{SET}{kind}:");
    let own = sets_of(p, ids);
    let number = |n: &String| n.strip_prefix(&prefix)?.parse::<u64>().ok();
    map.values()
        .flat_map(|q| sets_of(q, ids))
        .filter(|n| !own.contains(n))
        .filter_map(|n| Some((number(&n)?, n)))
        .min()
        .map(|(_, n)| n)
}

/// The set a new slot of `workload`'s pool joins: a joinable one ([`joinable_set`]), or
/// a new one.
fn choose_set(
    map: &BTreeMap<String, Pool>,
    workload: &str,
    ids: &IdBlocks,
    next: &AtomicU64,
) -> String {
    joinable_set(map, workload, ids).unwrap_or_else(|| {
        let kind = map
            .get(workload)
            .and_then(|p| set_kind(&p.spec))
            .unwrap_or("own");
        format!("{SET}{kind}:{}", next.fetch_add(1, Ordering::Relaxed))
    })
}

/// A ready slot of a pool that joins sets, alone in its set while another set it could
/// join exists: made before the pool joined, it is replaced by one that joins.
fn alone(map: &BTreeMap<String, Pool>, ids: &IdBlocks) -> Option<(String, usize)> {
    map.iter().filter(|(_, p)| p.joins).find_map(|(w, p)| {
        joinable_set(map, w, ids)?;
        let i = p.ready.iter().position(|r| {
            r.ids.as_ref().is_some_and(|h| {
                ids.owner(&h.tenant) == Some(h.tenant.as_str()) && ids.holds(&h.tenant) == 1
            })
        })?;
        Some((w.clone(), i))
    })
}

fn view(p: &Pool, epoch: Instant, ids: &IdBlocks) -> PoolView {
    let w = p.spec.warm.clone().unwrap_or(bulkhead_core::warm::Warm {
        size: 0,
        max_idle: Duration::MAX,
    });
    PoolView {
        size: w.size,
        max_idle: w.max_idle,
        ready: p
            .ready
            .iter()
            .map(|r| SlotView {
                made: r.made.duration_since(epoch),
                memory: r.memory,
                owned: owner(ids, r).is_some(),
            })
            .collect(),
        making: p.making,
        estimate: p.estimate,
        last_use: p.last_use.duration_since(epoch),
        dormant: p.dormant,
    }
}

/// Brings the pools in line with the catalog: a pool per workload with `warm:` whose
/// driver prewarms; a changed or removed manifest drains its pool.
fn sync(sh: &Arc<Shared>) {
    let cat = sh.catalog();
    let mut gone = Vec::new();
    {
        let mut map = sh.warm.lock();
        let wanted: BTreeMap<&String, (&Arc<WorkloadSpec>, &PathBuf)> = cat
            .entries
            .iter()
            .filter_map(|(n, e)| Some((n, (e.spec.as_ref().ok()?, &e.dir))))
            .filter(|(_, (s, _))| s.warm.is_some())
            .filter(|(_, (s, _))| sh.drivers.get(&s.driver).is_some_and(|d| d.prewarms()))
            .collect();
        map.retain(|name, p| {
            let keep = wanted.get(name).is_some_and(|(s, _)| **s == p.spec);
            if !keep {
                tracing::info!("warm pool of {name}: its manifest changed or went; drained");
                gone.extend(p.ready.drain(..));
            }
            // A pool still making a slot stays until it is done (the slot is then
            // discarded: its spec no longer matches).
            keep || p.making > 0
        });
        for (name, (spec, dir)) in wanted {
            if map.get(name).is_some_and(|p| p.spec == *spec) {
                continue;
            }
            if map.get(name).is_some_and(|p| p.making > 0) {
                continue;
            }
            map.insert(
                name.clone(),
                Pool {
                    spec: spec.clone(),
                    dir: dir.clone(),
                    ready: VecDeque::new(),
                    making: 0,
                    making_sets: Vec::new(),
                    joins: false,
                    estimate: 0,
                    last_use: Instant::now(),
                    dormant: false,
                },
            );
        }
    }
    for r in gone {
        discard_later(sh, r);
    }
}

/// Makes one slot of `workload`'s pool through its driver.
async fn make_slot(
    sh: &Arc<Shared>,
    workload: &str,
    spec: Arc<WorkloadSpec>,
    cwd: PathBuf,
    ids: Option<IdHold>,
) {
    let set = ids.as_ref().map(|h| h.tenant.clone());
    let result = prepare(sh, workload, &spec, cwd, ids).await;
    let pools = &sh.warm;
    let leftover = {
        let mut map = pools.lock();
        if let Some(p) = map.get_mut(workload) {
            if let Some(i) = p.making_sets.iter().position(|n| Some(n) == set.as_ref()) {
                p.making_sets.remove(i);
            }
        }
        let held: u64 = map.values().flat_map(|p| &p.ready).map(|r| r.memory).sum();
        let pool = map.get_mut(workload);
        let current = pool.filter(|p| p.spec == spec);
        match (result, current) {
            (Ok(r), Some(p)) if !pools.closed.load(Ordering::SeqCst) => {
                p.making -= 1;
                p.estimate = r.memory;
                if held + r.memory > sh.cfg.warm_memory {
                    // Larger than its estimate: the budget holds, the slot goes (and
                    // the new estimate keeps the pool from trying again in vain).
                    tracing::info!(
                        "warm pool of {workload}: a slot holds {} bytes, beyond the \
                         --warm-memory budget; removed",
                        r.memory
                    );
                    Some(r)
                } else {
                    p.ready.push_back(r);
                    None
                }
            }
            (Ok(r), p) => {
                if let Some(p) = p {
                    p.making -= 1;
                }
                Some(r)
            }
            (Err(e), p) => {
                tracing::warn!(
                    "warm pool of {workload}: cannot make a slot ({e}); it waits for its \
                     next launch"
                );
                if let Some(p) = p {
                    p.making -= 1;
                    p.dormant = true;
                }
                None
            }
        }
    };
    // A pool a reload left behind goes at the manager's next `sync`.
    if let Some(r) = leftover {
        discard(sh, r).await;
    }
    pools.making.fetch_sub(1, Ordering::SeqCst);
    pools.made.notify_waiters();
}

async fn prepare(
    sh: &Arc<Shared>,
    workload: &str,
    spec: &Arc<WorkloadSpec>,
    cwd: PathBuf,
    ids: Option<IdHold>,
) -> Result<Ready, String> {
    let driver: Arc<dyn Driver> = sh
        .drivers
        .get(&spec.driver)
        .cloned()
        .ok_or_else(|| format!("driver {} is not available", spec.driver))?;
    let seq = sh.next_seq();
    // The daemon's pid too: names stay unique across a restart (the drivers name
    // cgroups and containers after the slot; a killed daemon's may still be there).
    let name = format!("warm-{workload}-{}-{seq}", std::process::id());
    // Short: a socket path in it must fit `sun_path` (108 bytes) whatever the workload's
    // name (the docker init's hand-over socket, the notify socket).
    let dir = sh.notify_dir().join(format!("warm-{seq}"));
    std::fs::DirBuilder::new()
        .mode(0o711)
        .create(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let port = match sh.ports.allocate() {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_dir(&dir);
            return Err(format!("cannot allocate a port: {e}"));
        }
    };
    // The channel space, made now for the tenant the slot will serve (it will run as
    // the slot's ids): shown by the slot from the start.
    let space = match crate::dataplane::make_warm_space(sh, spec, ids.as_ref().map(|h| h.ids)).await
    {
        Ok(s) => s,
        Err(e) => {
            sh.ports.release(port);
            let _ = std::fs::remove_dir(&dir);
            return Err(e);
        }
    };
    let notify =
        match crate::instance::bind_notify(sh, spec, || dir.join(crate::instance::WARM_NOTIFY)) {
            Ok(n) => n,
            Err(e) => {
                sh.ports.release(port);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
    let mut binds = vec![Bind::same(&dir)];
    binds.extend(space.iter().flat_map(|s| s.binds(sh)));
    let ws = WarmSpec {
        slot: name.clone(),
        spec: spec.clone(),
        cwd,
        ids: ids.as_ref().map(|h| h.ids),
        binds,
        port,
    };
    match driver.prewarm(ws).await {
        Ok(warm) => Ok(Ready {
            memory: warm.memory(),
            warm,
            name,
            made: Instant::now(),
            port,
            dir,
            ids,
            space,
            notify,
        }),
        Err(e) => {
            sh.ports.release(port);
            let _ = std::fs::remove_dir_all(&dir);
            Err(e.to_string())
        }
    }
}

/// Removes a slot and gives back what it held.
async fn discard(sh: &Shared, r: Ready) {
    r.warm.discard().await;
    if let Some(space) = r.space {
        space.remove().await;
    }
    sh.ports.release(r.port);
    let _ = std::fs::remove_dir_all(&r.dir);
    drop(r.ids);
}

fn discard_later(sh: &Arc<Shared>, r: Ready) {
    // Discarding kills processes or removes a container: never on the caller's path.
    let sh = sh.clone();
    tokio::spawn(async move { discard(&sh, r).await });
}

async fn discard_all(ready: Vec<Ready>) {
    let mut set = tokio::task::JoinSet::new();
    for r in ready {
        set.spawn(async move {
            r.warm.discard().await;
            if let Some(space) = r.space {
                space.remove().await;
            }
            let _ = std::fs::remove_dir_all(&r.dir);
        });
    }
    while set.join_next().await.is_some() {}
}

fn update_gauges(sh: &Shared) {
    sh.metrics.warm_slots(&sh.warm.counts(sh));
}

/// Removes slot directories no slot holds: all of them at start-up, later the empty
/// ones of slots a launch took whose instance is gone (a running instance's holds its
/// notify socket).
fn sweep_dirs(sh: &Shared, all: bool) {
    let held: Vec<PathBuf> = sh
        .warm
        .lock()
        .values()
        .flat_map(|p| p.ready.iter().map(|r| r.dir.clone()))
        .collect();
    let Ok(rd) = std::fs::read_dir(sh.notify_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let is_slot = e.file_name().to_string_lossy().starts_with("warm-");
        if !is_slot || held.contains(&p) {
            continue;
        }
        if all {
            let _ = std::fs::remove_dir_all(&p);
        } else {
            let _ = std::fs::remove_dir(&p);
        }
    }
}

#[cfg(test)]
#[path = "warm_tests.rs"]
mod tests;
