//! The pool manager against a fake driver that prewarms, under paused time: slots are
//! made one at a time up to `size`, within the memory budget, never while a spawn runs;
//! launches take them (with the slot's port, directory and id range); unused slots
//! expire and the pool goes dormant until its next launch; a manifest change and the
//! shutdown drain the pool.

use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bulkhead_core::event::ExitStatus;
use bulkhead_core::instance::State;
use bulkhead_core::key::{Isolation, Key};
use bulkhead_core::signal::Signal;
use bulkhead_core::spec::DriverKind;
use bulkhead_driver::warm::{Warm, WarmSpec};
use bulkhead_driver::{
    Driver, InstanceHandle, SignalError, SpawnError, SpawnSpec, Spawned, Stats, StatsError,
};
use tokio::sync::watch;

use crate::Shared;

/// A spawn the fake made: the instance, the slot it came from (`None`: cold), its
/// environment.
type SpawnRecord = (
    String,
    Option<String>,
    Vec<(String, String)>,
    Option<bulkhead_core::sandbox::UserNamespace>,
);

#[derive(Default)]
struct Fake {
    /// Slots made, by name, and whether each is still alive.
    made: Mutex<Vec<(WarmSpec, Arc<AtomicBool>)>>,
    /// Spawns: (instance, from slot name or cold, env).
    spawns: Mutex<Vec<SpawnRecord>>,
    discarded: Mutex<Vec<String>>,
    /// Each spawn's exit, to end its run.
    exits: Mutex<Vec<Arc<watch::Sender<Option<ExitStatus>>>>>,
}

struct FakeSlot {
    spec: WarmSpec,
    alive: Arc<AtomicBool>,
    fake: Arc<Fake>,
}

#[async_trait]
impl Warm for FakeSlot {
    fn memory(&self) -> u64 {
        10
    }
    fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }
    async fn discard(self: Box<Self>) {
        self.alive.store(false, Ordering::SeqCst);
        self.fake
            .discarded
            .lock()
            .unwrap()
            .push(self.spec.slot.clone());
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

struct FakeDriver(Arc<Fake>);

static PID: AtomicU32 = AtomicU32::new(4_100_000);

struct Run(Arc<watch::Sender<Option<ExitStatus>>>, u32);

#[async_trait]
impl InstanceHandle for Run {
    fn pid(&self) -> Option<u32> {
        Some(self.1)
    }
    fn signal(&self, _: Signal) -> Result<(), SignalError> {
        self.0.send_replace(Some(ExitStatus::Exited { code: 0 }));
        Ok(())
    }
    async fn wait(&self) -> ExitStatus {
        let mut rx = self.0.subscribe();
        let st = rx.wait_for(Option::is_some).await.expect("kept");
        st.expect("waited for")
    }
    fn try_status(&self) -> Option<ExitStatus> {
        *self.0.borrow()
    }
    fn stats(&self) -> Result<Stats, StatsError> {
        Ok(Stats::default())
    }
}

impl FakeDriver {
    fn run(&self, spec: SpawnSpec, slot: Option<String>) -> Spawned {
        self.0
            .spawns
            .lock()
            .unwrap()
            .push((spec.instance.to_string(), slot, spec.env, spec.ids));
        let exit = Arc::new(watch::Sender::new(None));
        self.0.exits.lock().unwrap().push(exit.clone());
        Spawned {
            handle: Arc::new(Run(exit, PID.fetch_add(1, Ordering::Relaxed))),
            stdout: None,
            stderr: None,
            tap: None,
        }
    }
}

#[async_trait]
impl Driver for FakeDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Sandbox
    }
    async fn spawn(&self, spec: SpawnSpec) -> Result<Spawned, SpawnError> {
        Ok(self.run(spec, None))
    }
    fn prewarms(&self) -> bool {
        true
    }
    fn runs_host_programs(&self) -> bool {
        false
    }
    async fn prewarm(&self, spec: WarmSpec) -> Result<Box<dyn Warm>, SpawnError> {
        // Making a slot takes time, as a real one does.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let alive = Arc::new(AtomicBool::new(true));
        self.0
            .made
            .lock()
            .unwrap()
            .push((spec.clone(), alive.clone()));
        Ok(Box::new(FakeSlot {
            spec,
            alive,
            fake: self.0.clone(),
        }))
    }
    async fn spawn_warm(
        &self,
        slot: Box<dyn Warm>,
        spec: SpawnSpec,
    ) -> Result<Spawned, SpawnError> {
        let slot = slot.into_any().downcast::<FakeSlot>().expect("a fake slot");
        let own: Vec<_> = slot.spec.binds.clone();
        assert_eq!(spec.binds, own, "a warm spawn shows the slot's binds");
        assert_eq!(spec.ids, slot.spec.ids, "the slot's id range");
        Ok(self.run(spec, Some(slot.spec.slot.clone())))
    }
}

struct Rig {
    sh: Arc<Shared>,
    fake: Arc<Fake>,
    dir: tempfile::TempDir,
}

const MANIFEST: &str = "name: w\ncommand: [fake]\ndriver: sandbox\nisolation: session\n\
                        readiness: {notify: true}\n";

impl Rig {
    fn new(warm: &str, budget: u64) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        for d in ["logs", "notify"] {
            std::fs::create_dir_all(state.join(d)).unwrap();
        }
        let workloads = dir.path().join("workloads");
        std::fs::create_dir_all(workloads.join("w")).unwrap();
        let mut cfg = crate::Config::new(workloads, Some(state), None);
        cfg.durable_events = false;
        cfg.sandbox = false;
        cfg.warm_memory = budget;
        let mut sh = Shared::new(cfg, crate::events::EventLog::new(), None, None);
        let fake = Arc::new(Fake::default());
        sh.drivers
            .insert(DriverKind::Sandbox, Arc::new(FakeDriver(fake.clone())));
        sh.drivers
            .insert(DriverKind::Process, Arc::new(FakeDriver(fake.clone())));
        let rig = Rig {
            sh: Arc::new(sh),
            fake,
            dir,
        };
        rig.manifest(warm);
        crate::warm::start(&rig.sh);
        rig
    }

    /// Writes the workload's manifest with `warm` and rescans.
    fn manifest(&self, warm: &str) {
        self.write(&format!("{MANIFEST}{warm}"));
    }

    /// Writes the workload's whole manifest and rescans.
    fn write(&self, manifest: &str) {
        self.write_to("w", manifest);
    }

    /// Writes workload `name`'s whole manifest and rescans.
    fn write_to(&self, name: &str, manifest: &str) {
        let dir = self.dir.path().join("workloads").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("manifest.yaml"), manifest).unwrap();
        self.sh.rescan();
    }

    /// Adds workload `name`: the same manifest as `w`'s, with `warm`.
    fn another(&self, name: &str, warm: &str) {
        let m = MANIFEST.replacen("name: w", &format!("name: {name}"), 1);
        self.write_to(name, &format!("{m}{warm}"));
    }

    /// Ready slots of `workload` any tenant can take.
    fn ready_of(&self, workload: &str) -> usize {
        self.sh
            .warm
            .counts(&self.sh)
            .get(workload)
            .map(|c| c.0)
            .unwrap_or(0)
    }

    /// The slot a spawn came from (`None`: cold), and its id range.
    fn spawn(
        &self,
        n: usize,
    ) -> (
        Option<String>,
        Option<bulkhead_core::sandbox::UserNamespace>,
    ) {
        let from = self.fake.spawns.lock().unwrap()[n].1.clone();
        let ids = from.as_ref().and_then(|f| {
            let made = self.fake.made.lock().unwrap();
            made.iter()
                .find(|(w, _)| w.slot == *f)
                .and_then(|(w, _)| w.ids)
        });
        (from, ids)
    }

    fn made(&self) -> usize {
        self.fake.made.lock().unwrap().len()
    }

    fn ready(&self) -> usize {
        self.sh
            .warm
            .counts(&self.sh)
            .get("w")
            .map(|c| c.0)
            .unwrap_or(0)
    }

    /// Launches session `s` of `w` and waits until it runs.
    async fn launch(&self, s: &str) -> Arc<crate::instance::Slot> {
        self.launch_of("w", s).await
    }

    /// Launches session `s` of `workload` and waits until it runs.
    async fn launch_of(&self, workload: &str, s: &str) -> Arc<crate::instance::Slot> {
        let key = Key::new(workload, Isolation::Session, None, Some(s)).unwrap();
        let cat = self.sh.catalog();
        let e = &cat.entries[workload];
        let spec = e.spec.clone().unwrap();
        let slot = crate::instance::start(&self.sh, key, spec, e.dir.clone(), Vec::new());
        let mut rx = slot.subscribe();
        rx.wait_for(|v| v.pid.is_some() || v.state.is_terminal())
            .await
            .unwrap();
        assert_eq!(slot.view().state, State::Starting, "{:?}", slot.view());
        slot
    }
}

/// Lets the manager run until nothing changes for a while (paused time: instant).
async fn settle() {
    tokio::time::sleep(Duration::from_secs(3)).await;
}

#[tokio::test(start_paused = true)]
async fn a_pool_fills_to_its_size_and_a_new_key_launches_in_a_slot() {
    let r = Rig::new("warm: {size: 2}\n", 1 << 20);
    settle().await;
    assert_eq!((r.made(), r.ready()), (2, 2));
    // Each slot's notify socket is bound when it is made, in its own folder.
    let sockets: Vec<std::path::PathBuf> = {
        let made = r.fake.made.lock().unwrap();
        made.iter()
            .map(|(w, _)| w.binds[0].source.join("notify.sock"))
            .collect()
    };
    for s in &sockets {
        use std::os::unix::fs::FileTypeExt;
        let t = std::fs::symlink_metadata(s).map(|m| m.file_type());
        assert!(t.is_ok_and(|t| t.is_socket()), "{}", s.display());
    }
    let slot = r.launch("s1").await;
    let spawns = r.fake.spawns.lock().unwrap().clone();
    assert_eq!(spawns.len(), 1);
    let (id, from, env, _) = &spawns[0];
    assert_eq!(id, "session:s1:w");
    let first = r.fake.made.lock().unwrap()[0].0.clone();
    assert_eq!(
        from.as_deref(),
        Some(first.slot.as_str()),
        "the oldest slot"
    );
    // The slot fixed the port and the notify socket; the id range is now the session's.
    let var = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(var("PORT"), Some(first.port.to_string()));
    let notify = var("NOTIFY_SOCKET").unwrap();
    assert_eq!(notify, sockets[0].display().to_string());
    let held = slot
        .ids
        .lock()
        .unwrap()
        .as_ref()
        .map(|h| (h.tenant.clone(), h.ids));
    assert_eq!(held, Some(("session:s1".to_owned(), first.ids.unwrap())));
    // The pool refills.
    settle().await;
    assert_eq!((r.made(), r.ready()), (3, 2));
    let m = r.sh.metrics.encode(&r.sh).unwrap();
    assert!(
        m.contains("bulkhead_warm_launches_total{workload=\"w\",result=\"hit\"} 1"),
        "{m}"
    );
    assert!(m.contains("bulkhead_warm_slots{workload=\"w\"} 2"), "{m}");
}

#[tokio::test(start_paused = true)]
async fn the_memory_budget_bounds_the_slots_and_none_is_made_while_a_spawn_runs() {
    // Each fake slot holds 10 bytes: 25 fit two.
    let r = Rig::new("warm: {size: 5}\n", 25);
    {
        let _spawning = crate::warm::Pools::launching(&r.sh);
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(r.made(), 0, "no slot is made while a launch is on its way");
        // ... for a second at most: a launch slow to be ready does not starve the pools.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(r.made(), 2, "made after all, up to the budget");
    }
    settle().await;
    assert_eq!((r.made(), r.ready()), (2, 2));
    let none = Rig::new("warm: {size: 5}\n", 0);
    settle().await;
    assert_eq!(none.made(), 0, "a budget of 0 keeps no slot");
    let s = none.launch("s1").await;
    assert_eq!(
        s.view().state,
        State::Starting,
        "a launch never waits for a slot"
    );
    assert_eq!(none.fake.spawns.lock().unwrap()[0].1, None, "cold");
}

#[tokio::test(start_paused = true)]
async fn refills_wait_a_quiet_time_after_the_last_launch() {
    let r = Rig::new("warm: {size: 2}\n", 1 << 20);
    // A launch that was on its way is done now (its answer is still on the wire).
    drop(crate::warm::Pools::launching(&r.sh));
    tokio::time::sleep(crate::warm::QUIET / 2).await;
    assert_eq!(r.made(), 0, "nothing is made right after a launch");
    tokio::time::sleep(crate::warm::QUIET).await;
    assert!(r.made() >= 1, "made once the quiet time is over");
    settle().await;
    assert_eq!(r.ready(), 2);
}

#[tokio::test(start_paused = true)]
async fn unused_slots_expire_and_the_pool_sleeps_until_its_next_launch() {
    let r = Rig::new("warm: {size: 2, max_idle: 60s}\n", 1 << 20);
    settle().await;
    assert_eq!(r.ready(), 2);
    tokio::time::sleep(Duration::from_secs(61)).await;
    settle().await;
    assert_eq!((r.made(), r.ready()), (2, 0), "expired, not refilled");
    assert_eq!(r.fake.discarded.lock().unwrap().len(), 2);
    // The next launch is cold and wakes the pool.
    r.launch("s1").await;
    assert_eq!(r.fake.spawns.lock().unwrap()[0].1, None);
    settle().await;
    assert_eq!(r.ready(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_changed_manifest_drains_its_pool_and_a_dead_slot_is_never_used() {
    let r = Rig::new("warm: {size: 2}\n", 1 << 20);
    settle().await;
    let old: Vec<String> = r
        .fake
        .made
        .lock()
        .unwrap()
        .iter()
        .map(|m| m.0.slot.clone())
        .collect();
    r.manifest("warm: {size: 2}\nenv: {V: '2'}\n");
    settle().await;
    let mut discarded = r.fake.discarded.lock().unwrap().clone();
    discarded.sort();
    assert_eq!(discarded, old);
    assert_eq!((r.made(), r.ready()), (4, 2));
    let made = r.fake.made.lock().unwrap().clone();
    assert!(made[2..]
        .iter()
        .all(|m| m.0.spec.env.get("V").map(String::as_str) == Some("2")));
    // A slot that died while it waited is skipped.
    made[2].1.store(false, Ordering::SeqCst);
    r.launch("s1").await;
    let from = r.fake.spawns.lock().unwrap()[0].1.clone();
    assert_eq!(from.as_deref(), Some(made[3].0.slot.as_str()));
    // Removing the workload's `warm:` drains the pool.
    r.manifest("");
    settle().await;
    assert_eq!(r.ready(), 0);
    assert!(r.sh.warm.counts(&r.sh).is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_tenant_that_holds_a_range_spawns_cold_and_shutdown_discards_every_slot() {
    let r = Rig::new("warm: {size: 3}\n", 1 << 20);
    settle().await;
    // The session's range is held by its running `w`: a second instance of the same
    // tenant cannot take a slot made with another range.
    let key = Key::new("w", Isolation::Session, None, Some("s1")).unwrap();
    let held =
        r.sh.ids
            .lock()
            .unwrap()
            .acquire(&bulkhead_core::sandbox::id_tenant(&key.instance_id()))
            .unwrap();
    r.launch("s1").await;
    assert_eq!(r.fake.spawns.lock().unwrap()[0].1, None, "cold");
    let slot_ids = r.fake.made.lock().unwrap()[0].0.ids.unwrap();
    assert_ne!(slot_ids, held);
    settle().await;
    r.sh.warm.shutdown().await;
    assert_eq!(r.fake.discarded.lock().unwrap().len(), 3);
    assert!(r.sh.warm.counts(&r.sh).is_empty());
    // Their directories are gone too.
    let left: Vec<_> = std::fs::read_dir(r.sh.notify_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("warm-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Slots of pools that map a range are made in sets, one slot per pool on one range,
/// once a pool has seen a tenant's second workload spawn cold: then a tenant's first
/// launch from a slot makes the set its own, so its next workload also launches from a
/// slot, in the same range; another tenant never takes that slot. Before, each slot has
/// a range of its own and a launch takes no other pool's slot.
#[tokio::test(start_paused = true)]
async fn a_tenants_other_workloads_launch_from_the_slots_of_its_set() {
    let r = Rig::new("warm: {size: 1}\n", 1 << 20);
    r.another("v", "warm: {size: 1}\n");
    settle().await;
    assert_eq!((r.ready_of("w"), r.ready_of("v")), (1, 1));
    let ranges = |r: &Rig| -> Vec<_> {
        let made = r.fake.made.lock().unwrap();
        made.iter().map(|(w, _)| (w.slot.clone(), w.ids)).collect()
    };
    let first = ranges(&r);
    assert_ne!(
        first[0].1, first[1].1,
        "a range each until a pool joins sets"
    );

    // s1's second workload spawns cold: its pool learns to join sets.
    r.launch_of("w", "s1").await;
    assert!(r.spawn(0).0.is_some());
    assert_eq!(r.ready_of("v"), 1, "w's launch took nothing of v's");
    r.launch_of("v", "s1").await;
    assert_eq!(
        r.spawn(1).0,
        None,
        "cold: s1 holds a range no slot of v has"
    );
    assert!(r.sh.warm.lock()["v"].joins);
    settle().await;
    // v's slot made alone was replaced by one in the set of w's new slot.
    assert_eq!((r.ready_of("w"), r.ready_of("v")), (1, 1));
    let now = ranges(&r);
    let v_old = &first
        .iter()
        .find(|(n, _)| n.starts_with("warm-v-"))
        .unwrap()
        .0;
    assert!(r.fake.discarded.lock().unwrap().contains(v_old));
    let (w_new, v_new) = (&now[now.len() - 2], &now[now.len() - 1]);
    assert_eq!(w_new.1, v_new.1, "one set: {now:?}");

    r.launch_of("w", "s2").await;
    let (from, s2_ids) = r.spawn(2);
    assert!(from.is_some());
    // v's slot is s2's now: it no longer counts as ready for anyone.
    assert_eq!(r.ready_of("v"), 0);
    // Another new tenant spawns cold (before the refill): s2's slot is not its.
    r.launch_of("v", "s3").await;
    assert_eq!(r.spawn(3).0, None, "cold");
    // s2's second workload takes its set's slot, in s2's range.
    r.launch_of("v", "s2").await;
    let (from, ids) = r.spawn(4);
    assert!(from.is_some(), "from the set's slot");
    assert_eq!(ids, s2_ids);
    assert_eq!(
        r.sh.ids.lock().unwrap().holds("session:s2"),
        2,
        "one hold per instance"
    );
    let m = r.sh.metrics.encode(&r.sh).unwrap();
    assert!(
        m.contains("bulkhead_warm_launches_total{workload=\"v\",result=\"hit\"} 1"),
        "{m}"
    );
}

/// Whatever the order of launches and ends across three pools (which learn to join sets
/// as they go), every instance of a tenant runs in its tenant's range, two live tenants
/// never share one, and once every instance has ended nothing but the pools' own slots
/// holds a range.
#[tokio::test(start_paused = true)]
async fn tenants_never_share_a_range_whatever_the_order_of_launches() {
    // Launches of a tenant's second workload that took a slot its set kept for it.
    let mut second_from_sets = 0;
    for seed in 1..=16u64 {
        let r = Rig::new("warm: {size: 1}\n", 1 << 20);
        r.another("v", "warm: {size: 2}\n");
        r.another("u", "warm: {size: 1}\n");
        settle().await;
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut rand = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        // Live instances: (session, spawn index).
        let mut live: Vec<(String, usize)> = Vec::new();
        let mut used = std::collections::HashSet::new();
        let mut slots_taken = 0;
        for _ in 0..40 {
            if rand(4) < 3 || live.is_empty() {
                let session = format!("s{}", rand(5));
                let workload = ["w", "v", "u"][rand(3) as usize];
                if !used.insert((session.clone(), workload)) {
                    continue;
                }
                let n = r.fake.spawns.lock().unwrap().len();
                r.launch_of(workload, &session).await;
                let (from, slot_ids) = r.spawn(n);
                let ids = r.fake.spawns.lock().unwrap()[n].3;
                if from.is_some() {
                    slots_taken += 1;
                    assert_eq!(ids, slot_ids, "a slot's spawn runs in the slot's range");
                    if live.iter().any(|(s, _)| *s == session) {
                        second_from_sets += 1;
                    }
                }
                live.push((session, n));
            } else {
                let (_, n) = live.remove(rand(live.len() as u64) as usize);
                let exit = r.fake.exits.lock().unwrap()[n].clone();
                exit.send_replace(Some(ExitStatus::Exited { code: 0 }));
            }
            // Sometimes the pools get time to refill, learn and retire.
            tokio::time::sleep(Duration::from_millis(rand(4) * 400)).await;
            let spawns = r.fake.spawns.lock().unwrap().clone();
            let mut range_of: std::collections::HashMap<&str, _> = Default::default();
            for (session, n) in &live {
                let ids = spawns[*n].3.expect("a sandbox in a range");
                let held = *range_of.entry(session.as_str()).or_insert(ids);
                assert_eq!(
                    held, ids,
                    "seed {seed}: {session}'s instances share one range"
                );
            }
            let mut ranges: Vec<u32> = range_of.values().map(|m| m.uid).collect();
            ranges.sort_unstable();
            ranges.dedup();
            assert_eq!(
                ranges.len(),
                range_of.len(),
                "seed {seed}: two tenants, one range"
            );
        }
        assert!(slots_taken > 0, "seed {seed}: no launch took a slot");
        for (_, n) in live.drain(..) {
            let exit = r.fake.exits.lock().unwrap()[n].clone();
            exit.send_replace(Some(ExitStatus::Exited { code: 0 }));
        }
        settle().await;
        let ids = r.sh.ids.lock().unwrap();
        for s in 0..5 {
            let tenant = format!("session:s{s}");
            assert_eq!(
                ids.owner(&tenant),
                None,
                "seed {seed}: {tenant} still holds a range"
            );
        }
    }
    eprintln!("second workloads from their sets' slots: {second_from_sets}");
    assert!(second_from_sets > 0, "the sets were never used");
}

/// Only pools of one kind of tenant share sets: a namespace's slot never shares a range
/// with a session's, whatever the pools learned.
#[tokio::test(start_paused = true)]
async fn sets_never_mix_kinds_of_tenant() {
    let r = Rig::new("warm: {size: 1}\n", 1 << 20);
    let m = MANIFEST
        .replacen("name: w", "name: n", 1)
        .replace("isolation: session", "isolation: namespace");
    r.write_to("n", &format!("{m}warm: {{size: 1}}\n"));
    settle().await;
    r.sh.warm.lock().get_mut("n").unwrap().joins = true;
    settle().await;
    let made = r.fake.made.lock().unwrap().clone();
    assert_eq!(
        made.len(),
        2,
        "nothing replaced: no set of its kind to join"
    );
    assert_ne!(made[0].0.ids, made[1].0.ids);
}

/// A set's slots kept for a tenant go when the tenant runs nothing any more (its range
/// is free again), and give way when the budget is needed for a slot anyone can take.
#[tokio::test(start_paused = true)]
async fn a_tenants_slots_go_with_it_and_give_way_under_the_budget() {
    // v joins sets (as if it had seen a tenant's second launch).
    let joined = |budget: u64| async move {
        let r = Rig::new("warm: {size: 1}\n", budget);
        r.another("v", "warm: {size: 1}\n");
        settle().await;
        r.sh.warm.lock().get_mut("v").unwrap().joins = true;
        settle().await;
        let made = r.fake.made.lock().unwrap().clone();
        let last = &made[made.len() - 2..];
        assert_eq!(last[0].0.ids, last[1].0.ids, "one set");
        let kept = last
            .iter()
            .find(|(w, _)| w.slot.starts_with("warm-v-"))
            .unwrap();
        let kept = kept.0.slot.clone();
        r.launch_of("w", "s1").await;
        assert!(r.spawn(0).0.is_some());
        (r, kept)
    };
    // Each fake slot holds 10 bytes: 25 fit two. w's refill fits (v's kept slot and the
    // new one: 20); v's then does not, so the slot kept for s1 goes, and v gets one
    // anyone can take.
    let (r, kept) = joined(25).await;
    settle().await;
    assert!(r.fake.discarded.lock().unwrap().contains(&kept), "gave way");
    assert_eq!((r.ready_of("w"), r.ready_of("v")), (1, 1));
    assert_eq!(
        r.sh.ids.lock().unwrap().holds("session:s1"),
        1,
        "only its instance's"
    );

    // With room, the slot kept for a tenant stays while it runs and goes after.
    let (r, kept) = joined(1 << 20).await;
    settle().await;
    assert!(!r.fake.discarded.lock().unwrap().contains(&kept));
    assert_eq!(r.sh.ids.lock().unwrap().holds("session:s1"), 2);
    let exit = r.fake.exits.lock().unwrap()[0].clone();
    exit.send_replace(Some(ExitStatus::Exited { code: 0 }));
    settle().await;
    assert!(
        r.fake.discarded.lock().unwrap().contains(&kept),
        "went with s1"
    );
    assert_eq!(
        r.sh.ids.lock().unwrap().owner("session:s1"),
        None,
        "range free"
    );
}

/// A restart keeps its instance's address: it spawns cold with the port of its first run
/// (a slot's port was fixed when it was made), while a new key still takes a slot. (A
/// process workload: no id range keeps its restarts out of the slots.)
#[tokio::test(start_paused = true)]
async fn a_restart_keeps_its_port_and_spawns_cold() {
    let r = Rig::new("", 1 << 20);
    r.write(
        "name: w\ncommand: [fake]\nisolation: session\nreadiness: {notify: true}\n\
         restart: {policy: always}\nwarm: {size: 2}\n",
    );
    settle().await;
    assert_eq!(r.ready(), 2);
    let _slot = r.launch("s1").await;
    let first = r.fake.exits.lock().unwrap()[0].clone();
    first.send_replace(Some(ExitStatus::Exited { code: 1 }));
    let start = tokio::time::Instant::now();
    while r.fake.spawns.lock().unwrap().len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "never restarted"
        );
        settle().await;
    }
    let spawns = r.fake.spawns.lock().unwrap().clone();
    let port = |env: &Vec<(String, String)>| {
        env.iter()
            .find(|(k, _)| k == "PORT")
            .map(|(_, v)| v.clone())
    };
    assert!(spawns[0].1.is_some(), "the first run came from a slot");
    assert_eq!(spawns[1].1, None, "the restart spawned cold");
    assert_eq!(port(&spawns[1].2), port(&spawns[0].2), "the same address");
    let _other = r.launch("s2").await;
    let spawns = r.fake.spawns.lock().unwrap().clone();
    assert!(spawns[2].1.is_some(), "a new key takes a slot");
}
