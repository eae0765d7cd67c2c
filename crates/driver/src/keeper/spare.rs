//! The keeper's spare: one waiting slot that any process workload's launch takes, so
//! that the default path (no `warm:`) does not wait for the keeper's clone or the
//! instance's cgroup (issue #18).
//!
//! A pool's slot ([`super::warm`]) is made for one workload: it has taken the manifest's
//! user, limits, umask and working directory before the launch. The spare is made for
//! none: a child of the keeper in a cgroup of its own (`spare-<n>`), in its own process
//! group, with its stdio pipes held by the keeper and its parent-death signal, waiting
//! in `/` on a socket whose other end the daemon holds. At a launch the daemon resolves
//! what a cold spawn resolves (the user's ids and groups, the limits, the working
//! directory, the program) and hands all of it over at once
//! (`clone_spawn::spare_handover_message`); the child takes those steps in a cold
//! spawn's order, sets its parent-death signal again (a uid switch clears it) and execs.
//! The keeper is told the slot is the instance (`Assign`, with the record and the
//! listening sockets a cold spawn gives it) before the program runs, as for a pool's
//! slot. From there the instance is a cold one: the same handle, exit report, output,
//! record for adoption, sockets kept across a daemon crash. Its cgroup keeps the spare's
//! name (cgroup2 refuses to rename a cgroup), as a pool's slot keeps the slot's.
//!
//! A launch the spare cannot serve (its message would not fit; the user, a limit, the
//! working directory or the program cannot be resolved) gives it back and spawns cold,
//! and the cold spawn reports what is wrong. A failed exec is the launch's error.
//!
//! **Refills stay off the launches' way.** The spare is made again once no spawn has
//! been in flight for [`QUIET`] (the program the last launch started is still starting
//! meanwhile; a fork of the keeper beside it would take its CPU), one at a time, in the
//! background. Launches closer together than that spawn cold after the first. A keeper
//! older than this daemon makes slots that do not take a spare's hand-over
//! (`Reply::Spawned::takes_steps`): then there is no spare, and it says so once.
//!
//! What it holds while it waits: a copy of the keeper's address space (a fork of a
//! small, single-threaded process; `bulkhead_process_spare_memory_bytes`) and an empty
//! cgroup. It dies with its keeper; it exits by itself when the daemon's end of its
//! socket closes (a daemon that died: the next start-up sweep removes its cgroup); a
//! clean shutdown ends it before the scope is removed ([`KeeperDriver::drop_spare`]).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::client::KeeperDriver;
use super::warm::{end, first_word, program_and_env, Live};
use crate::{SetupStep, SpawnError, SpawnSpec, Spawned};

/// How long no spawn must have been in flight before the spare is made again.
pub const QUIET: Duration = Duration::from_millis(20);

/// The spare and what its refills go by; one per driver.
pub(super) struct Spares {
    /// Whether the driver keeps one ([`KeeperDriver::keep_spare`]).
    on: AtomicBool,
    slot: Mutex<Option<Spare>>,
    /// Spawns in flight, and when the last one started or ended.
    busy: AtomicUsize,
    last: Mutex<Instant>,
    /// Rings when a spawn ends or the spare is taken.
    wake: tokio::sync::Notify,
    seq: AtomicU64,
    /// Launches that took the spare, and spares made.
    taken: AtomicU64,
    made: AtomicU64,
    /// Held while a spare is made and stored: [`KeeperDriver::drop_spare`] waits for
    /// one on its way, so that a clean shutdown leaves none behind.
    making: tokio::sync::Mutex<()>,
}

impl Default for Spares {
    fn default() -> Spares {
        Spares {
            on: AtomicBool::new(false),
            slot: Mutex::new(None),
            busy: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
            wake: tokio::sync::Notify::new(),
            seq: AtomicU64::new(0),
            taken: AtomicU64::new(0),
            made: AtomicU64::new(0),
            making: tokio::sync::Mutex::new(()),
        }
    }
}

/// A spawn in flight (see [`Spares::busy`]).
pub(super) struct Busy<'a>(&'a Spares);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        *self.0.lock_last() = Instant::now();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
        self.0.wake.notify_one();
    }
}

impl Spares {
    fn lock_last(&self) -> std::sync::MutexGuard<'_, Instant> {
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_slot(&self) -> std::sync::MutexGuard<'_, Option<Spare>> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks a spawn in flight until the guard drops.
    pub(super) fn busy(&self) -> Busy<'_> {
        self.busy.fetch_add(1, Ordering::SeqCst);
        *self.lock_last() = Instant::now();
        Busy(self)
    }

    /// The spare, if one waits and is alive (a dead one, which died with its keeper,
    /// is ended in the background: its cgroup removed). Only on the runtime.
    fn take(&self) -> Option<Spare> {
        let spare = self.lock_slot().take()?;
        self.wake.notify_one();
        if spare.live.as_ref().is_some_and(Live::alive) {
            return Some(spare);
        }
        tokio::spawn(spare.end());
        None
    }

    /// A spare a launch could not use, back for the next one.
    fn give_back(&self, spare: Spare) {
        let mut slot = self.lock_slot();
        if slot.is_none() && self.on.load(Ordering::SeqCst) {
            *slot = Some(spare);
        }
    }
}

/// The waiting slot: see the module docs.
pub(super) struct Spare {
    name: String,
    client: Arc<super::client::KeeperClient>,
    pid: u32,
    /// `None` once a launch took it.
    live: Option<Live>,
}

impl Spare {
    /// Kills it, waits for the keeper's report of its exit, removes its cgroup.
    async fn end(mut self) {
        if let Some(l) = self.live.take() {
            end(&self.client, self.pid, l).await;
        }
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        // As a pool's slot: closing our end ends its wait, the kill makes sure; its
        // cgroup goes with the next start-up sweep (a clean shutdown ends it first).
        if let Some(l) = self.live.take() {
            let _ = crate::sys::pidfd_send_signal(&l.pidfd, bulkhead_core::signal::Signal::KILL);
            self.client.forget_slot(self.pid);
        }
    }
}

/// Why a launch did not go through the spare.
enum Miss {
    /// It spawns cold (with the spare back, when the launch used nothing of it).
    Cold(Option<Spare>),
    /// The program did not start: the launch's error.
    Failed(SpawnError),
}

/// What the spare reports (`bulkhead_process_spare_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpareStats {
    /// The driver keeps a spare.
    pub on: bool,
    /// One waits now.
    pub ready: bool,
    /// Launches that took one, and spares made, since the daemon started.
    pub taken: u64,
    pub made: u64,
}

impl KeeperDriver {
    /// Keeps a spare from now on: makes one once no spawn has been in flight for
    /// [`QUIET`], and again after each launch that takes it. Idempotent.
    pub fn keep_spare(self: &Arc<Self>) {
        let spares = Arc::clone(&self.spares);
        if spares.on.swap(true, Ordering::SeqCst) {
            return;
        }
        tokio::spawn(refill(Arc::downgrade(self), spares));
    }

    /// Stops keeping a spare and ends the waiting one (its process and its cgroup):
    /// before a clean shutdown removes the cgroup scope.
    pub async fn drop_spare(&self) {
        self.spares.on.store(false, Ordering::SeqCst);
        self.spares.wake.notify_one();
        // ORDER: after `on` is false, so a spare being made now is ended by its maker
        // before the lock is ours, and none is made after.
        let _making = self.spares.making.lock().await;
        let spare = self.spares.lock_slot().take();
        if let Some(s) = spare {
            s.end().await;
        }
    }

    /// Makes a spare now, whatever the quiet, unless one waits: so that the next spawn
    /// takes it (the conformance suite runs every spawn through one). `Ok(false)`: the
    /// keeper is too old to make one.
    pub async fn make_spare_now(&self) -> Result<bool, SpawnError> {
        if self.spare_ready() {
            return Ok(true);
        }
        let Some(spare) = self.make_spare().await? else {
            return Ok(false);
        };
        *self.spares.lock_slot() = Some(spare);
        Ok(true)
    }

    /// Whether a spare waits now (cheap: no `/proc` read).
    pub fn spare_ready(&self) -> bool {
        self.spares
            .lock_slot()
            .as_ref()
            .is_some_and(|s| s.live.as_ref().is_some_and(Live::alive))
    }

    /// The waiting spare's memory (bytes; 0 when none waits): reads `/proc`, for the
    /// metrics.
    pub fn spare_memory(&self) -> u64 {
        let pid = self.spares.lock_slot().as_ref().map(|s| s.pid);
        pid.map_or(0, super::warm::pss)
    }

    /// What the spare reports (cheap: no `/proc` read).
    pub fn spare_stats(&self) -> SpareStats {
        SpareStats {
            on: self.spares.on.load(Ordering::SeqCst),
            ready: self.spare_ready(),
            taken: self.spares.taken.load(Ordering::SeqCst),
            made: self.spares.made.load(Ordering::SeqCst),
        }
    }

    /// A spawn in flight, for the refills to keep out of its way.
    pub(super) fn spawning(&self) -> Busy<'_> {
        self.spares.busy()
    }

    /// The launch through the spare, if one waits: `None` when it spawns cold.
    pub(super) async fn spawn_spare(
        &self,
        spec: &SpawnSpec,
    ) -> Option<Result<Spawned, SpawnError>> {
        let spare = self.spares.take()?;
        match self.take_spare(spare, spec).await {
            Ok(s) => {
                self.spares.taken.fetch_add(1, Ordering::SeqCst);
                Some(Ok(s))
            }
            Err(Miss::Failed(e)) => Some(Err(e)),
            Err(Miss::Cold(back)) => {
                if let Some(b) = back {
                    self.spares.give_back(b);
                }
                None
            }
        }
    }

    /// Makes a spare: see the module docs. `Ok(None)`: the keeper is too old to make one.
    async fn make_spare(&self) -> Result<Option<Spare>, SpawnError> {
        let name = format!("spare-{}", self.spares.seq.fetch_add(1, Ordering::SeqCst));
        let cgroup = match self.tracker() {
            Some(t) => Some(t.create(&name).map_err(|e| SpawnError::Keeper {
                reason: format!("cannot make the spare's cgroup: {e}"),
            })?),
            None => None,
        };
        let made = match self
            .prewarm_at(&name, std::path::PathBuf::from("/"), cgroup.as_ref(), None)
            .await
        {
            Ok(m) => m,
            Err(e) => {
                if let Some(cg) = cgroup {
                    let _ = tokio::task::spawn_blocking(move || cg.remove()).await;
                }
                return Err(e);
            }
        };
        let (client, pid, takes_steps) = (Arc::clone(&made.client), made.pid, made.takes_steps);
        let live = Live {
            pidfd: made.pidfd,
            handover: made.handover,
            tap: made.tap,
            cgroup,
        };
        let live = first_word(&client, pid, live, &name).await?;
        if !takes_steps {
            end(&client, pid, live).await;
            return Ok(None);
        }
        self.spares.made.fetch_add(1, Ordering::SeqCst);
        Ok(Some(Spare {
            name,
            client,
            pid,
            live: Some(live),
        }))
    }

    /// Hands the spare the launch of `spec`: see the module docs.
    async fn take_spare(&self, mut spare: Spare, spec: &SpawnSpec) -> Result<Spawned, Miss> {
        // What a cold spawn resolves, before anything of the spare is used: where it
        // fails, the spare goes back and the cold spawn says why.
        let id = &spec.instance;
        let resolved = (|| {
            crate::setup::limit_settings(&spec.spec)
                .map_err(|e| SpawnError::setup(id, SetupStep::Limits, e))?;
            let setup = crate::setup::host_setup(&spec.spec)
                .map_err(|e| SpawnError::setup(id, SetupStep::User, e))?;
            let cwd = bulkhead_core::execution::working_dir(&spec.spec, &spec.cwd);
            crate::setup::check_working_dir(&spec.spec, &cwd)
                .map_err(|e| SpawnError::setup(id, SetupStep::WorkingDir, e))?;
            let prepared = setup
                .map(|s| s.prepare(&cwd))
                .transpose()
                .map_err(|e| SpawnError::setup(id, SetupStep::Limits, e))?;
            let (program, env) = program_and_env(spec, spare.pid, &cwd)?;
            crate::clone_spawn::spare_handover_message(
                &program,
                &spec.argv,
                &env,
                spec.listen.len(),
                prepared.as_ref(),
                &cwd,
            )
            .map_err(|e| SpawnError::invalid(id, e))
        })();
        let msg = match resolved {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!("{id} spawns cold, not from the spare: {e}");
                return Err(Miss::Cold(Some(spare)));
            }
        };
        let Some(live) = spare.live.take() else {
            return Err(Miss::Cold(None));
        };
        let client = Arc::clone(&spare.client);
        match self
            .assign_and_exec(&spare.name, client, spare.pid, live, spec, msg)
            .await
        {
            Ok(s) => Ok(s),
            Err(e @ SpawnError::Exec { .. }) => Err(Miss::Failed(e)),
            Err(e) => {
                // Nothing of the program ran (the spare is ended): a cold spawn.
                tracing::warn!("{id} spawns cold: the spare failed: {e}");
                Err(Miss::Cold(None))
            }
        }
    }
}

/// The refill loop of [`KeeperDriver::keep_spare`]; ends with the driver or when the
/// spare is dropped.
async fn refill(driver: Weak<KeeperDriver>, spares: Arc<Spares>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        if !spares.on.load(Ordering::SeqCst) {
            return;
        }
        if spares
            .lock_slot()
            .as_ref()
            .is_some_and(|s| s.live.as_ref().is_some_and(Live::alive))
        {
            // Until a launch takes it, a spawn ends (the spare may have died with its
            // keeper: checked again), or it is dropped.
            tokio::select! {
                _ = spares.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        // Quiet: no spawn in flight, and none for QUIET.
        let since = spares.lock_last().elapsed();
        if spares.busy.load(Ordering::SeqCst) > 0 || since < QUIET {
            let wait = QUIET.saturating_sub(since).max(Duration::from_millis(1));
            tokio::time::sleep(wait).await;
            continue;
        }
        let Some(d) = driver.upgrade() else {
            return;
        };
        let making = spares.making.lock().await;
        // A dead spare (its keeper died) goes before a new one is made.
        let dead = spares.lock_slot().take();
        if let Some(s) = dead {
            s.end().await;
        }
        if !spares.on.load(Ordering::SeqCst) {
            return;
        }
        match d.make_spare().await {
            Ok(Some(spare)) => {
                backoff = Duration::from_secs(1);
                let left = {
                    let mut slot = spares.lock_slot();
                    if spares.on.load(Ordering::SeqCst) && slot.is_none() {
                        *slot = Some(spare);
                        None
                    } else {
                        Some(spare)
                    }
                };
                // Dropped meanwhile (a shutdown waits for this).
                if let Some(s) = left {
                    s.end().await;
                }
                drop(making);
            }
            Ok(None) => {
                drop(making);
                tracing::warn!(
                    "the keeper is older than this daemon: its slots take no spare's hand-over, \
                     so process launches spawn cold (restart it: stop its instances and the daemon)"
                );
                spares.on.store(false, Ordering::SeqCst);
                return;
            }
            Err(e) => {
                drop(making);
                tracing::warn!("cannot make the process driver's spare slot: {e}");
                drop(d);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}
