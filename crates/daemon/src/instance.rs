//! The instance actor: the async shell around one [`bulkhead_core::instance::Instance`].
//!
//! One task per instance owns the state machine. It carries out the effects the core
//! returns (spawn through the driver, start or stop readiness, stop with the escalation
//! ladder, publish events) and feeds back what happens (the process exited, notify or a
//! probe passed, the readiness backstop fired, a user asked to terminate). Nothing else
//! mutates an instance, so there are no locks around its state; readers see a [`View`]
//! published through a `watch` channel after every step.
//!
//! Ordering: the events of a step are published before the view changes, so a client that
//! sees a state in the view finds the matching event in the log.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulkhead_core::event::ExitStatus;
use bulkhead_core::expand::expand_argv;
use bulkhead_core::failure::FailureKind;
use bulkhead_core::instance::{self as core_instance, Effect, Input, Instance, State};
use bulkhead_core::key::{InstanceId, Isolation, Key};
use bulkhead_core::spec::{DriverKind, WorkloadSpec};
use bulkhead_driver::{ExitCause, InstanceHandle, SpawnSpec};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Sleep;

use crate::logs::LogFile;
use crate::readiness::{self, Check, Health, NotifyMsg, NotifySocket};
use crate::Shared;

/// What clients see of an instance.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub id: InstanceId,
    pub workload: String,
    pub isolation: Isolation,
    pub namespace: Option<String>,
    pub session: Option<String>,
    pub driver: DriverKind,
    pub state: State,
    /// The process was started (it may have ended since).
    pub started: bool,
    pub pid: Option<u32>,
    pub port: u16,
    pub ready: bool,
    pub restarts: u32,
    pub started_at_ms: u64,
    pub last_exit: Option<ExitStatus>,
    pub failure: Option<String>,
    pub status_text: Option<String>,
    /// Lease holders.
    pub leases: Vec<String>,
    pub breaker: bulkhead_core::restart::BreakerState,
    pub consecutive_failures: u32,
    /// The data plane's channels of this instance (empty without `channels:`).
    pub channels: Vec<bulkhead_core::channels::ResolvedChannel>,
    /// The iceoryx2 installation (file prefix, root directory) they live in, and the
    /// host path of their channel space (walled drivers).
    pub iox2: Option<(Option<String>, Option<String>, Option<String>)>,
}

impl View {
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

pub(crate) enum Msg {
    Terminate {
        grace: Option<Duration>,
    },
    /// Stop the current run gracefully and start a new one; with `spec`, the new run (and
    /// every later one) follows that manifest, and if it fails before it is ready the
    /// instance goes back to the manifest it ran (a rollback). `done` gets the outcome.
    Restart {
        grace: Option<Duration>,
        reason: String,
        spec: Option<Arc<WorkloadSpec>>,
        done: tokio::sync::oneshot::Sender<RestartResult>,
    },
    /// The set of lease holders changed; `held` says whether any lease is left.
    Leases {
        held: bool,
    },
}

/// How a requested restart ended: `Ok(None)`, the new run is ready; `Ok(Some(reason))`,
/// the new manifest's run failed (`reason`) and the instance is ready again on its
/// previous manifest; `Err(reason)`, the new run (or the rollback's) failed, or the
/// instance ended meanwhile.
pub(crate) type RestartResult = Result<Option<String>, String>;

/// A restart the actor is carrying out for a caller.
struct PendingRestart {
    /// `restarts` when it was asked for: a later run is the new one.
    before: u32,
    done: tokio::sync::oneshot::Sender<RestartResult>,
    /// The manifest to go back to if the new one's run fails (a rollout's).
    fallback: Option<Arc<WorkloadSpec>>,
    /// Rolling back after this failure of the new manifest.
    rolling_back: Option<String>,
}

/// A live or finished instance in the registry.
pub struct Slot {
    pub id: InstanceId,
    pub key: Key,
    /// The workload as its current run was started (a rollout replaces it).
    spec: Mutex<Arc<WorkloadSpec>>,
    pub dir: PathBuf,
    /// Whether its driver runs host programs (`Driver::runs_host_programs`): a relative
    /// program path is then the workload folder's; otherwise the image's.
    host_programs: bool,
    pub log: Arc<LogFile>,
    pub(crate) view: watch::Sender<View>,
    tx: mpsc::UnboundedSender<Msg>,
    pub(crate) handle: Mutex<Option<Arc<dyn InstanceHandle>>>,
    leases: Mutex<std::collections::BTreeSet<String>>,
    /// The environment of the current run, for `bulkhead exec` (set at each spawn).
    exec_env: Mutex<Option<Vec<(String, String)>>>,
    /// The host id range of its tenant, held from the first spawn until it is final.
    pub(crate) ids: Mutex<Option<crate::dataplane::IdHold>>,
    /// The key's listening sockets (`sockets:`), bound before the first spawn and kept
    /// for every run until the instance is final.
    pub(crate) sockets: Mutex<Option<Arc<crate::sockets::BoundSockets>>>,
    /// Held from the start of a spawn until the run is ready or over (`crate::warm`).
    launching: Mutex<Option<crate::warm::Launching>>,
}

impl Slot {
    /// The workload as the current run was started.
    pub fn spec(&self) -> Arc<WorkloadSpec> {
        self.spec.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Asks the actor for a restart (see [`Msg::Restart`]). False when the instance is
    /// final (its actor is gone).
    pub(crate) fn restart(
        &self,
        grace: Option<Duration>,
        reason: String,
        spec: Option<Arc<WorkloadSpec>>,
    ) -> Option<tokio::sync::oneshot::Receiver<RestartResult>> {
        let (done, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Msg::Restart {
                grace,
                reason,
                spec,
                done,
            })
            .ok()
            .map(|_| rx)
    }

    pub fn view(&self) -> View {
        self.view.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<View> {
        self.view.subscribe()
    }

    pub(crate) fn terminate(&self, grace: Option<Duration>) {
        // The actor owns the receiver until the instance is terminal; after that there is
        // nothing to terminate and the send failing is fine.
        let _ = self.tx.send(Msg::Terminate { grace });
    }

    /// Adds a lease holder (a validated name, given in request field `field`). Returns
    /// whether it was new; refused when the instance already has
    /// [`MAX_LEASES`](bulkhead_core::lease::MAX_LEASES) other holders.
    pub(crate) fn take_lease(
        &self,
        field: &'static str,
        holder: &str,
    ) -> Result<bool, bulkhead_core::lease::LeaseError> {
        let mut l = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        bulkhead_core::lease::admit(field, self.id.as_str(), l.len(), l.contains(holder))?;
        let added = l.insert(holder.to_owned());
        let _ = self.tx.send(Msg::Leases {
            held: !l.is_empty(),
        });
        self.view
            .send_modify(|v| v.leases = l.iter().cloned().collect());
        Ok(added)
    }

    /// Drops a lease holder. Returns whether it held a lease.
    pub(crate) fn release(&self, holder: &str) -> bool {
        let mut l = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        let removed = l.remove(holder);
        let _ = self.tx.send(Msg::Leases {
            held: !l.is_empty(),
        });
        self.view
            .send_modify(|v| v.leases = l.iter().cloned().collect());
        removed
    }

    /// SIGKILL to every process of the instance, now.
    pub(crate) fn kill(&self) {
        let h = self
            .handle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(h) = h {
            if let Err(e) = h.signal(bulkhead_core::signal::Signal::KILL) {
                tracing::warn!("{e}");
            }
        }
    }

    /// Where `bulkhead exec` enters, for a driver that walls the instance off.
    pub fn exec_target(&self) -> Option<bulkhead_driver::ExecTarget> {
        let h = self
            .handle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        h.exec_target()
    }

    pub fn stats(&self) -> Option<bulkhead_driver::Stats> {
        let h = self
            .handle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        h.stats().ok()
    }

    /// The environment the current run was spawned with and its working directory, for
    /// commands run in the instance's context (`bulkhead exec`). `None` before the first
    /// spawn.
    pub fn exec_env(&self) -> Option<(Vec<(String, String)>, PathBuf)> {
        let env = self
            .exec_env
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        Some((
            env,
            bulkhead_core::execution::working_dir(&self.spec(), &self.dir),
        ))
    }
}

/// Creates the slot and starts its actor. Called with the registry lock held, so it must
/// not block: the port, the notify socket and the spawn all happen in the actor.
pub(crate) fn start(
    sh: &Arc<Shared>,
    key: Key,
    spec: Arc<WorkloadSpec>,
    dir: PathBuf,
    after_launch: Vec<bulkhead_core::event::EventKind>,
) -> Arc<Slot> {
    start_with(
        sh,
        key,
        spec,
        dir,
        Origin::Launched(after_launch),
        Vec::new(),
    )
}

/// What the instance table was last told about an instance: state, pid, restarts,
/// consecutive failures, breaker, leases.
type Stored = (
    State,
    Option<u32>,
    u32,
    u32,
    bulkhead_core::restart::BreakerState,
    Vec<String>,
);

/// How an instance came to be under this daemon.
pub(crate) enum Origin {
    /// A launch; the events to publish right after `launched` (`dependencies_ready`).
    Launched(Vec<bulkhead_core::event::EventKind>),
    /// Found by its driver after a daemon restart (`crate::recovery`).
    Adopted(Box<bulkhead_driver::Found>, core_instance::Restored),
    /// Known to the instance table, but no process: lost (with the reason) or between runs.
    Resumed(core_instance::Restored, Option<String>),
}

/// Creates the slot and starts its actor (see [`start`]).
pub(crate) fn start_with(
    sh: &Arc<Shared>,
    key: Key,
    spec: Arc<WorkloadSpec>,
    dir: PathBuf,
    origin: Origin,
    leases: Vec<String>,
) -> Arc<Slot> {
    let id = key.instance_id();
    // Rows written before holders were validated may hold any string: such a lease could
    // never be released.
    let (leases, dropped) = bulkhead_core::lease::retain_valid(leases);
    if dropped > 0 {
        tracing::warn!("{id}: dropped {dropped} recorded lease holders that are not valid names or past the limit");
    }
    // What `get` and `list` show before the actor's first turn. An adopted or resumed
    // instance must not look like a fresh launch while the API already serves (the actor
    // may run only after many others): it shows the state it was found in, as recorded.
    let (state, pid, port, restored) = match &origin {
        Origin::Launched(_) => (State::Starting, None, 0, None),
        Origin::Adopted(a, restored) => {
            let port = a
                .env
                .iter()
                .find(|(k, _)| k == "PORT")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let pid = a.process.map(|p| p.0).or_else(|| a.spawned.handle.pid());
            (State::Ready, pid, port, Some(*restored))
        }
        Origin::Resumed(restored, _) => (State::Restarting, None, 0, Some(*restored)),
    };
    let adopted = matches!(origin, Origin::Adopted(..));
    // The sockets the keeper kept for an adopted instance: the next runs get the same.
    let kept_sockets = match (&origin, &spec.sockets) {
        (Origin::Adopted(a, _), Some(list)) if !a.listen.is_empty() => {
            let b = crate::sockets::BoundSockets::adopted(
                list,
                &a.listen,
                port,
                &crate::sockets::runtime_dir(&sh.cfg.state_dir, &id),
                key.namespace(),
            );
            if b.is_none() {
                tracing::warn!("{id}: the sockets the keeper kept do not match its manifest; the next run binds new ones");
            }
            b.map(Arc::new)
        }
        _ => None,
    };
    let view = View {
        id: id.clone(),
        workload: key.workload().to_owned(),
        isolation: key.isolation(),
        namespace: key.namespace().map(str::to_owned),
        session: key.session().map(str::to_owned),
        driver: spec.driver,
        state,
        started: adopted,
        pid,
        port,
        ready: adopted,
        restarts: restored.map_or(0, |r| r.restarts),
        started_at_ms: if adopted { crate::events::now_ms() } else { 0 },
        last_exit: None,
        failure: None,
        status_text: None,
        leases: leases.clone(),
        breaker: restored.map_or(bulkhead_core::restart::BreakerState::Closed, |r| r.breaker),
        consecutive_failures: restored.map_or(0, |r| r.consecutive_failures),
        channels: spec
            .channels
            .as_ref()
            .map(|c| bulkhead_core::channels::resolve(&key, c))
            .unwrap_or_default(),
        iox2: spec
            .channels
            .as_ref()
            .map(|_| crate::dataplane::iox2_for(&sh.cfg.state_dir))
            .map(|i| {
                (
                    i.prefix.clone(),
                    Some(i.root_dir().display().to_string()),
                    None,
                )
            }),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let slot = Arc::new(Slot {
        host_programs: sh
            .drivers
            .get(&spec.driver)
            .is_none_or(|d| d.runs_host_programs()),
        log: Arc::new(LogFile::new(
            &sh.logs_dir(),
            id.file_stem(),
            spec.logs
                .and_then(|l| l.max_size)
                .unwrap_or(sh.cfg.log_max_bytes),
            spec.logs
                .and_then(|l| l.keep)
                .unwrap_or(crate::logs::DEFAULT_GENERATIONS),
        )),
        id,
        key,
        spec: Mutex::new(spec),
        dir,
        view: watch::Sender::new(view),
        tx,
        handle: Mutex::new(None),
        leases: Mutex::new(leases.into_iter().collect()),
        exec_env: Mutex::new(None),
        ids: Mutex::new(None),
        sockets: Mutex::new(kept_sockets),
        launching: Mutex::new(None),
    });
    tokio::spawn(run(slot.clone(), sh.clone(), rx, origin));
    slot
}

/// Readiness bookkeeping while `Starting`.
#[derive(Default)]
struct Readiness {
    /// Signals still to pass.
    pending: Vec<&'static str>,
    probes: Vec<JoinHandle<()>>,
    deadline: Option<Pin<Box<Sleep>>>,
    active: bool,
}

impl Readiness {
    fn stop(&mut self) {
        for p in self.probes.drain(..) {
            p.abort();
        }
        self.pending.clear();
        self.deadline = None;
        self.active = false;
    }
}

/// Tasks watching a ready instance (liveness, readiness flapping).
#[derive(Default)]
struct Monitors(Vec<JoinHandle<()>>);

impl Monitors {
    fn stop(&mut self) {
        for m in self.0.drain(..) {
            m.abort();
        }
    }
}

fn abort_all(tasks: &mut Vec<JoinHandle<()>>) {
    for t in tasks.drain(..) {
        t.abort();
    }
}

/// The actor of one instance: the state machine, the current run and everything that
/// wakes it. [`Actor::run`] alternates two halves: carry out the effects the core
/// returned and show the result ([`Actor::step`]), then wait for the next thing that
/// happens ([`Actor::next`]) and feed it to the core ([`Actor::on`]).
struct Actor {
    slot: Arc<Slot>,
    sh: Arc<Shared>,
    rx: mpsc::UnboundedReceiver<Msg>,
    /// The manifest every decision and every run follow (a rollout replaces it).
    spec: Arc<WorkloadSpec>,
    /// The same, as the instance table stores it.
    spec_json: String,
    inst: Instance,
    /// The core's clock: milliseconds since the actor started.
    t0: tokio::time::Instant,
    /// Effects the core returned, not yet carried out.
    queue: VecDeque<Effect>,
    /// What the instance table was last told, to write only on a change.
    stored: Option<Stored>,
    /// The start time of the recorded process (tells it apart from a reused pid).
    start_time: Option<u64>,
    /// The current run, if any.
    handle: Option<Arc<dyn InstanceHandle>>,
    env: Vec<(String, String)>,
    port: u16,
    status_text: Option<String>,
    started_at_ms: u64,
    /// The newest event this actor published: the View changes only once it is durable.
    last_event: u64,
    /// What the notify socket, the readiness probes and the monitors report.
    notify_tx: mpsc::UnboundedSender<NotifyMsg>,
    notify_rx: mpsc::UnboundedReceiver<NotifyMsg>,
    probe_tx: mpsc::UnboundedSender<&'static str>,
    probe_rx: mpsc::UnboundedReceiver<&'static str>,
    health_tx: mpsc::UnboundedSender<Health>,
    health_rx: mpsc::UnboundedReceiver<Health>,
    /// Tasks of the current run (its notify socket).
    run_tasks: Vec<JoinHandle<()>>,
    ready: Readiness,
    monitors: Monitors,
    /// The restart backoff or the breaker cooldown.
    timer: Option<Pin<Box<Sleep>>>,
    /// The sd_notify watchdog of the current run: re-armed by each WATCHDOG=1.
    watchdog: Option<Pin<Box<Sleep>>>,
    watchdog_every: Option<Duration>,
    /// RELOADING=1 made a ready instance not ready; the next READY=1 makes it ready again.
    reloading: bool,
    /// The idle timeout: armed while no lease holds the instance.
    idle: Option<Pin<Box<Sleep>>>,
    idle_after: Option<Duration>,
    pending: Option<PendingRestart>,
    /// The SIGKILL deadline of the stop in progress, which EXTEND_TIMEOUT_USEC= moves out.
    stop_deadline: Option<tokio::sync::watch::Sender<tokio::time::Instant>>,
}

/// What woke the actor.
enum Wake {
    /// Every process of the run is gone.
    Exited(ExitStatus),
    Notify(NotifyMsg),
    ProbePassed(&'static str),
    Health(Health),
    ReadinessTimedOut,
    WatchdogMissed,
    /// The restart backoff or the breaker cooldown is over.
    Timer,
    Idle,
    Msg(Msg),
}

async fn run(slot: Arc<Slot>, sh: Arc<Shared>, rx: mpsc::UnboundedReceiver<Msg>, origin: Origin) {
    Actor::new(slot, sh, rx, origin).await.run().await
}

impl Actor {
    async fn new(
        slot: Arc<Slot>,
        sh: Arc<Shared>,
        rx: mpsc::UnboundedReceiver<Msg>,
        origin: Origin,
    ) -> Actor {
        let spec = slot.spec();
        let t0 = tokio::time::Instant::now();
        let now = || t0.elapsed().as_millis() as u64;
        let cfg = core_config(&spec);
        let watchdog_every = cfg.watchdog.map(|(w, _)| w);
        let (inst, first) = match &origin {
            Origin::Launched(after) => {
                let (inst, mut first) = Instance::launch(cfg);
                // After the core's `launched`, before the spawn.
                let at = first
                    .iter()
                    .position(|e| {
                        matches!(e, Effect::Emit(bulkhead_core::event::EventKind::Launched))
                    })
                    .map_or(0, |i| i + 1);
                for (i, kind) in after.iter().enumerate() {
                    first.insert(at + i, Effect::Emit(kind.clone()));
                }
                (inst, first)
            }
            Origin::Adopted(a, restored) => {
                let pid = a.process.map(|p| p.0).or_else(|| a.spawned.handle.pid());
                Instance::adopt(cfg, pid, now(), *restored)
            }
            Origin::Resumed(restored, lost) => {
                Instance::resume(cfg, *restored, lost.clone(), now())
            }
        };
        let (notify_tx, notify_rx) = mpsc::unbounded_channel();
        let (probe_tx, probe_rx) = mpsc::unbounded_channel();
        let (health_tx, health_rx) = mpsc::unbounded_channel();
        let mut actor = Actor {
            spec_json: serde_json::to_string(&*spec).unwrap_or_default(),
            idle_after: spec.idle_after_release(),
            idle: spec.first_idle().map(|d| Box::pin(tokio::time::sleep(d))),
            slot,
            sh,
            rx,
            spec,
            inst,
            t0,
            queue: first.into(),
            stored: None,
            start_time: None,
            handle: None,
            env: Vec::new(),
            port: 0,
            status_text: None,
            started_at_ms: 0,
            last_event: 0,
            notify_tx,
            notify_rx,
            probe_tx,
            probe_rx,
            health_tx,
            health_rx,
            run_tasks: Vec::new(),
            ready: Readiness::default(),
            monitors: Monitors::default(),
            timer: None,
            watchdog: None,
            watchdog_every,
            reloading: false,
            pending: None,
            stop_deadline: None,
        };
        if let Origin::Adopted(a, _) = origin {
            actor.adopt(*a).await;
        }
        actor
    }

    /// Back under supervision after a daemon restart: its output, its environment (and
    /// so its port), its exit.
    async fn adopt(&mut self, a: bulkhead_driver::Found) {
        let slot = &self.slot;
        self.start_time = a.process.map(|p| p.1);
        self.env = a.env;
        self.port = self
            .env
            .iter()
            .find(|(k, _)| k == "PORT")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        self.sh.ports.reserve(self.port);
        let run = self.inst.restarts() + 1;
        slot.log.start_run(
            run,
            &format!("run {run} ({}) adopted by a restarted daemon", a.describe),
        );
        slot.log.attach(a.spawned.stdout, a.spawned.stderr);
        if let Some(tap) = &a.spawned.tap {
            slot.log.attach_tap(tap);
        }
        *slot.handle.lock().unwrap_or_else(|e| e.into_inner()) = Some(a.spawned.handle.clone());
        self.handle = Some(a.spawned.handle);
        self.started_at_ms = crate::events::now_ms();
        // Hold its channels again (the workload's node kept them alive meanwhile).
        if let Err(e) = crate::dataplane::acquire(&self.sh, slot, None, None).await {
            tracing::warn!("{}: cannot reopen channels: {e}", slot.id);
        }
    }

    async fn run(mut self) {
        loop {
            if self.step().await {
                continue;
            }
            if self.inst.state().is_terminal() {
                break;
            }
            let wake = self.next().await;
            self.on(wake).await;
        }
        self.finish();
    }

    /// The core's clock.
    fn now(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    /// Feeds `input` to the state machine; its effects are carried out next.
    fn input(&mut self, input: Input) {
        let now = self.now();
        self.queue.extend(self.inst.handle(input, now));
    }

    /// Every decision and every run from now on follow manifest `new` (a rollout or its
    /// rollback); the instance table gets it at its next write.
    fn switch_spec(&mut self, new: Arc<WorkloadSpec>) {
        self.inst.reconfigure(core_config(&new));
        self.watchdog_every = new.readiness.as_ref().and_then(|r| r.watchdog);
        self.idle_after = new.idle_after_release();
        self.spec_json = serde_json::to_string(&*new).unwrap_or_default();
        self.stored = None;
        *self.slot.spec.lock().unwrap_or_else(|e| e.into_inner()) = new.clone();
        self.spec = new;
    }

    /// Carries out the queued effects and shows the outcome (the View, the instance
    /// table, a pending restart's caller). True when a rollback queued more effects.
    async fn step(&mut self) -> bool {
        while let Some(effect) = self.queue.pop_front() {
            self.effect(effect).await;
        }
        // A final instance's channels are gone before anyone sees it final (its workload's
        // dead node reclaimed, the services dropped).
        if self.inst.state().is_terminal() {
            crate::dataplane::release(&self.sh, &self.slot).await;
            self.slot
                .ids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
        }
        // An event is durable before any client can see its effect in the View.
        self.sh.events.wait_durable(self.last_event).await;
        self.publish_view();
        self.record();
        let more = self.answer_restart();
        // Whoever watches the View (a launch waiting for `ready`) runs before a next step
        // can replace it: with the commit made here (`EventLog::wait_durable`) nothing
        // else makes the actor yield, and a launch whose instance became ready and then
        // died at once saw only the death. (A final View has no next step: the actor
        // finishes at once, as the View says.)
        if !self.inst.state().is_terminal() {
            tokio::task::yield_now().await;
        }
        more
    }

    async fn effect(&mut self, effect: Effect) {
        match effect {
            Effect::Emit(kind) => {
                self.last_event = self.sh.events.publish(&self.slot.id, kind).id;
            }
            Effect::Spawn => self.spawn().await,
            Effect::StartReadiness { timeout } => self.start_readiness(timeout),
            Effect::StopReadiness => self.ready.stop(),
            Effect::StartMonitors => self.start_monitors(),
            Effect::StopMonitors => self.monitors.stop(),
            Effect::Stop { signal, grace } => self.stop(signal, grace),
            Effect::ScheduleRestart { delay } => {
                self.timer = Some(Box::pin(tokio::time::sleep(delay)))
            }
            Effect::ScheduleCooldown { after } => {
                self.timer = Some(Box::pin(tokio::time::sleep(after)))
            }
            Effect::CancelTimer => self.timer = None,
        }
    }

    /// A new run through the driver; the core hears whether it started.
    async fn spawn(&mut self) {
        // A new run: what the previous one left behind goes first.
        abort_all(&mut self.run_tasks);
        self.handle = None;
        let input = match spawn(&self.sh, &self.slot, &mut self.port, &mut self.env).await {
            Ok((spawned, notify)) => self.started(spawned, notify),
            Err(SpawnFailure { kind, reason }) => Input::SpawnFailed { reason, kind },
        };
        self.input(input);
    }

    /// Takes a started run under supervision: its log, its notify socket, its watchdog.
    fn started(
        &mut self,
        spawned: bulkhead_driver::Spawned,
        notify: Option<NotifySocket>,
    ) -> Input {
        let slot = &self.slot;
        let pid = spawned.handle.pid();
        let run = self.inst.restarts() + 1;
        slot.log.start_run(
            run,
            &match pid {
                Some(p) => format!("run {run} started (pid {p})"),
                None => format!("run {run} started"),
            },
        );
        slot.log.attach(spawned.stdout, spawned.stderr);
        if let Some(tap) = &spawned.tap {
            slot.log.attach_tap(tap);
        }
        if let (Some(sock), Some(main)) = (notify, pid) {
            self.run_tasks.push(crate::mainpid::watch_notify(
                slot.id.clone(),
                sock,
                &spawned.handle,
                main,
                self.notify_tx.clone(),
            ));
        }
        *slot.handle.lock().unwrap_or_else(|e| e.into_inner()) = Some(spawned.handle.clone());
        *slot.exec_env.lock().unwrap_or_else(|e| e.into_inner()) = Some(self.env.clone());
        self.handle = Some(spawned.handle);
        self.started_at_ms = crate::events::now_ms();
        // From the start of the run, as systemd arms it.
        self.watchdog = self.watchdog_every.map(|w| Box::pin(tokio::time::sleep(w)));
        self.reloading = false;
        Input::Spawned { pid }
    }

    /// Starts the readiness signals of the manifest and their deadline.
    fn start_readiness(&mut self, timeout: Duration) {
        let ready = &mut self.ready;
        ready.stop();
        ready.active = true;
        ready.deadline = Some(Box::pin(tokio::time::sleep(timeout)));
        let r = self
            .spec
            .readiness
            .as_ref()
            .expect("readiness effect implies a readiness section");
        if r.notify {
            ready.pending.push("notify");
        }
        // An instance on another node: its engine judges readiness (the driver mapped the
        // manifest's probes onto the engine's), and the daemon probes nothing itself.
        let engine = self.handle.as_ref().and_then(|h| h.engine_readiness());
        if let Some(mut engine) = engine {
            ready.pending.push("engine");
            let tx = self.probe_tx.clone();
            ready.probes.push(tokio::spawn(async move {
                if engine.wait_for(|r| *r).await.is_ok() {
                    let _ = tx.send("engine");
                }
            }));
            return;
        }
        let checks = probes(
            &self.slot,
            r.http.as_ref(),
            r.tcp.as_ref(),
            r.exec.as_ref(),
            self.port,
            &self.env,
        );
        for (check, timing) in checks {
            let name = check.name();
            ready.pending.push(name);
            let tx = self.probe_tx.clone();
            ready.probes.push(tokio::spawn(async move {
                readiness::run_until_passed(check, timing).await;
                let _ = tx.send(name);
            }));
        }
        if r.exec.is_some() && !ready.pending.contains(&"exec") {
            // The exec probe could not be built (logged); it never passes, so the
            // readiness timeout reports the launch as failed.
            ready.pending.push("exec");
        }
    }

    /// Watches a ready instance: readiness probes keep watching (flapping is reported);
    /// liveness probes stop the instance when they fail.
    fn start_monitors(&mut self) {
        self.monitors.stop();
        if self
            .handle
            .as_ref()
            .is_some_and(|h| h.engine_readiness().is_some())
        {
            // Its engine watches it (and its driver refuses what it cannot map).
            return;
        }
        let spec = &self.spec;
        let sections = [
            spec.readiness
                .as_ref()
                .map(|r| (r.http.as_ref(), r.tcp.as_ref(), r.exec.as_ref(), false)),
            spec.liveness
                .as_ref()
                .map(|l| (l.http.as_ref(), l.tcp.as_ref(), l.exec.as_ref(), true)),
        ];
        for (http, tcp, exec, liveness) in sections.into_iter().flatten() {
            for (check, mut timing) in probes(&self.slot, http, tcp, exec, self.port, &self.env) {
                if !liveness {
                    // Noticing readiness wants a fast poll; watching a ready instance
                    // does not.
                    timing.period = timing.period_when_ready();
                }
                self.monitors.0.push(tokio::spawn(readiness::monitor(
                    check,
                    timing,
                    liveness,
                    self.health_tx.clone(),
                )));
            }
        }
    }

    /// The escalation ladder runs beside the actor; its end shows up as the exit.
    fn stop(&mut self, signal: bulkhead_core::signal::Signal, grace: Duration) {
        // A stopping instance owes no more WATCHDOG=1.
        self.watchdog = None;
        if let Some(h) = self.handle.clone() {
            // EXTEND_TIMEOUT_USEC= meanwhile moves its SIGKILL out.
            let (kill_at, mover) = bulkhead_driver::KillDeadline::extendable(grace);
            self.stop_deadline = Some(mover);
            tokio::spawn(async move {
                h.stop_until(signal, kill_at).await;
            });
        }
    }

    /// Shows the instance as the core has it now.
    fn publish_view(&self) {
        let inst = &self.inst;
        let state = inst.state();
        if state != State::Starting {
            // Ready, or the run is over: the launch is no longer on its way.
            self.slot
                .launching
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
        }
        self.slot.view.send_modify(|v| {
            v.state = state;
            v.started = self.handle.is_some();
            // Between runs there is no process: not the dead one's pid.
            v.pid = inst.pid().filter(|_| state != State::Restarting);
            v.port = self.port;
            v.ready = inst.ready();
            v.started_at_ms = self.started_at_ms;
            v.last_exit = inst.last_exit();
            v.failure = inst.failure().map(str::to_owned);
            v.status_text = self.status_text.clone();
            v.restarts = inst.restarts();
            v.breaker = inst.breaker();
            v.consecutive_failures = inst.consecutive_failures();
        });
    }

    /// Writes the instance table's row when what it holds changed (removes it once the
    /// instance is final).
    fn record(&mut self) {
        let Some(table) = &self.sh.instances else {
            return;
        };
        let inst = &self.inst;
        let state = inst.state();
        let leases = self.slot.view.borrow().leases.clone();
        let now_stored = (
            state,
            inst.pid(),
            inst.restarts(),
            inst.consecutive_failures(),
            inst.breaker(),
            leases,
        );
        if self.stored.as_ref() == Some(&now_stored) {
            return;
        }
        if state.is_terminal() {
            table.remove(self.slot.id.as_str());
        } else {
            if now_stored.1 != self.stored.as_ref().and_then(|s| s.1) {
                // A new process: its start time tells it apart from a reused pid.
                self.start_time = inst
                    .pid()
                    .and_then(|p| bulkhead_driver::sys::read_stat(p).ok())
                    .map(|s| s.starttime)
                    .or(self.start_time.filter(|_| self.stored.is_none()));
            }
            table.put(crate::instances::InstanceRow {
                id: self.slot.id.to_string(),
                spec: self.spec_json.clone(),
                dir: self.slot.dir.clone(),
                pid: inst.pid(),
                start_time: self.start_time,
                state: state.as_str().to_owned(),
                restarts: inst.restarts(),
                breaker: inst.breaker().as_str().to_owned(),
                consecutive_failures: inst.consecutive_failures(),
                leases: now_stored.5.clone(),
                updated_ms: crate::events::now_ms(),
            });
        }
        self.stored = Some(now_stored);
    }

    /// A requested restart: answers its caller once the new run is ready or failed, and
    /// rolls a rollout's failed trial back to the manifest it replaced (true: the
    /// rollback's effects are queued).
    fn answer_restart(&mut self) -> bool {
        let Some(p) = self.pending.as_mut() else {
            return false;
        };
        let inst = &self.inst;
        let state = inst.state();
        let later = inst.restarts() > p.before;
        let failure = || {
            inst.failure()
                .map(str::to_owned)
                .or_else(|| {
                    inst.last_exit()
                        .map(|st| format!("the new run ended with {st}"))
                })
                .unwrap_or_else(|| format!("the instance is {}", state.as_str()))
        };
        let answer = if state.is_terminal() {
            Some(Err(match p.rolling_back.take() {
                Some(first) => format!("{first}; the rollback failed too: {}", failure()),
                None => failure(),
            }))
        } else if later && state == State::Ready && inst.ready() {
            Some(Ok(p.rolling_back.take()))
        } else if later && inst.held() {
            match p.fallback.take() {
                Some(old) => {
                    let reason = failure();
                    tracing::warn!(
                        "{}: the new manifest's run failed ({reason}); rolling back",
                        self.slot.id
                    );
                    p.rolling_back = Some(reason);
                    self.switch_spec(old);
                    let before = self.inst.restarts();
                    if let Some(p) = self.pending.as_mut() {
                        p.before = before;
                    }
                    self.input(Input::Restart {
                        grace: None,
                        reason: "rollback: the new manifest's run failed".into(),
                        hold: false,
                    });
                    return true;
                }
                None => Some(Err(failure())),
            }
        } else if later && inst.failure().is_some() {
            Some(Err(match p.rolling_back.take() {
                Some(first) => format!("{first}; the rollback failed too: {}", failure()),
                None => failure(),
            }))
        } else {
            None
        };
        if let Some(a) = answer {
            if let Some(p) = self.pending.take() {
                let _ = p.done.send(a);
            }
        }
        false
    }

    /// Waits for the next thing that concerns the instance.
    async fn next(&mut self) -> Wake {
        let live = self.inst.has_live_process();
        tokio::select! {
            status = wait_exit(&self.handle), if live => Wake::Exited(status),
            Some(msg) = self.notify_rx.recv() => Wake::Notify(msg),
            Some(name) = self.probe_rx.recv() => Wake::ProbePassed(name),
            Some(h) = self.health_rx.recv() => Wake::Health(h),
            _ = deadline(&mut self.ready.deadline) => Wake::ReadinessTimedOut,
            _ = deadline(&mut self.watchdog) => Wake::WatchdogMissed,
            _ = deadline(&mut self.timer) => Wake::Timer,
            _ = deadline(&mut self.idle) => Wake::Idle,
            Some(msg) = self.rx.recv() => Wake::Msg(msg),
        }
    }

    async fn on(&mut self, wake: Wake) {
        match wake {
            Wake::Exited(status) => {
                // ORDER: what the program sent before it exited is taken first (systemd
                // reads notify messages before SIGCHLD). The driver's `on_main_exit` hook
                // queued them before it reported the exit, but `select!` picks among
                // ready branches at random.
                while let Ok(msg) = self.notify_rx.try_recv() {
                    self.on_notify(msg);
                }
                self.on_exit(status).await
            }
            Wake::Notify(msg) => self.on_notify(msg),
            Wake::ProbePassed(name) => self.on_probe_passed(name),
            Wake::Health(h) => self.input(match h {
                Health::Unhealthy(reason) => Input::Unhealthy { reason },
                Health::Healthy => Input::Healthy,
                Health::LivenessFailed(reason) => Input::LivenessFailed { reason },
            }),
            Wake::ReadinessTimedOut => self.input(Input::ReadinessTimedOut),
            Wake::WatchdogMissed => {
                self.watchdog = None;
                tracing::warn!(
                    "{}: no WATCHDOG=1 within {:?}",
                    self.slot.id,
                    self.watchdog_every.unwrap_or_default()
                );
                self.input(Input::WatchdogMissed { triggered: false });
            }
            Wake::Timer => {
                self.timer = None;
                let input = if self.inst.breaker() == bulkhead_core::restart::BreakerState::Open {
                    Input::CooldownOver
                } else {
                    Input::RestartDue
                };
                self.input(input);
            }
            Wake::Idle => {
                self.idle = None;
                tracing::info!(
                    "{}: no lease for {:?}, terminating (idle_timeout)",
                    self.slot.id,
                    self.idle_after.unwrap_or_default()
                );
                self.input(Input::Terminate { grace: None });
            }
            Wake::Msg(msg) => self.on_msg(msg),
        }
    }

    /// Every process of the run is gone: what its nodes left is reclaimed and reported.
    async fn on_exit(&mut self, status: ExitStatus) {
        crate::dataplane::after_exit(&self.sh, &self.slot).await;
        // The driver knows whether the OOM killer ended the run (memory.events, the v1
        // OOM counter, the engine's oom event); it is read once every process is gone, so
        // the counter is final. Likewise a program that daemonized: its main process
        // exited 0 and left processes in the instance's cgroup (killed by the driver's
        // sweep).
        match self.handle.as_ref().and_then(|h| h.exit_cause()) {
            Some(ExitCause::OomKilled { limit_bytes }) => {
                self.input(Input::OomKilled { limit_bytes })
            }
            Some(ExitCause::Daemonized { left }) => self.input(Input::Daemonized { left }),
            Some(ExitCause::KeeperDied) => self.input(Input::Lost {
                reason: format!("killed with the keeper, which died ({status})"),
            }),
            None => {}
        }
        self.watchdog = None;
        self.slot
            .log
            .mark(&format!("run {} ended: {status}", self.inst.restarts() + 1));
        self.stop_deadline = None;
        self.input(Input::Exited(status));
    }

    /// A message on the run's notify socket.
    fn on_notify(&mut self, msg: NotifyMsg) {
        if let Some(s) = msg.status {
            self.status_text = Some(s);
        }
        // The driver follows it already (crate::mainpid); the View and the table too.
        if let Some(pid) = msg.main_pid {
            self.input(Input::MainPid { pid });
        }
        if msg.stopping {
            tracing::info!("{}: instance reports it is stopping", self.slot.id);
        }
        if msg.watchdog {
            if let (Some(w), Some(t)) = (self.watchdog_every, self.watchdog.as_mut()) {
                t.as_mut().reset(tokio::time::Instant::now() + w);
            }
        }
        if let Some(more) = msg.extend_timeout {
            self.extend_timeout(more);
        }
        if msg.reloading && self.inst.state() == State::Ready && !self.reloading {
            self.reloading = true;
            self.input(Input::Unhealthy {
                reason: "reloading (sd_notify RELOADING=1)".into(),
            });
        }
        if msg.ready {
            self.on_probe_passed("notify");
            if self.reloading {
                self.reloading = false;
                self.input(Input::Healthy);
            }
        }
        if msg.watchdog_trigger && self.watchdog.is_some() {
            self.watchdog = None;
            self.input(Input::WatchdogMissed { triggered: true });
        }
    }

    /// EXTEND_TIMEOUT_USEC=: while starting, the readiness deadline moves out to at least
    /// `more` from now (never in); while stopping, the SIGKILL does, as systemd's.
    fn extend_timeout(&mut self, more: Duration) {
        let want = tokio::time::Instant::now() + more;
        if let Some(d) = self.ready.deadline.as_mut() {
            if want > d.deadline() {
                d.as_mut().reset(want);
            }
        }
        if self.inst.state() == State::Stopping {
            if let Some(d) = &self.stop_deadline {
                if bulkhead_driver::extend(d, want) {
                    tracing::info!(
                        "{}: stop extended by {more:?} (EXTEND_TIMEOUT_USEC)",
                        self.slot.id
                    );
                }
            }
        }
    }

    /// A readiness signal passed (`notify`: READY=1); the last one makes the run ready.
    fn on_probe_passed(&mut self, name: &'static str) {
        self.ready.pending.retain(|p| *p != name);
        if self.ready.active && self.ready.pending.is_empty() {
            self.input(Input::ReadinessPassed);
        }
    }

    /// A request from the API (through the [`Slot`]).
    fn on_msg(&mut self, msg: Msg) {
        match msg {
            Msg::Terminate { grace } => self.input(Input::Terminate { grace }),
            Msg::Restart {
                grace,
                reason,
                spec: new,
                done,
            } => {
                let fallback = new.as_ref().map(|_| self.spec.clone());
                if let Some(new) = new {
                    // A rollout: every decision and every run from now on follows the new
                    // manifest (the caller checked that its driver, isolation and channels
                    // are unchanged).
                    self.switch_spec(new);
                }
                let hold = fallback.is_some();
                // A restart asked for meanwhile replaces an earlier one (whose caller sees
                // the sender dropped).
                self.pending = Some(PendingRestart {
                    before: self.inst.restarts(),
                    done,
                    fallback,
                    rolling_back: None,
                });
                self.input(Input::Restart {
                    grace,
                    reason,
                    hold,
                });
            }
            Msg::Leases { held } => {
                // Held: no idle clock. Released by the last holder: the clock starts.
                self.idle = match (held, self.idle_after) {
                    (false, Some(d)) => Some(Box::pin(tokio::time::sleep(d))),
                    _ => None,
                };
            }
        }
    }

    /// The instance is final: everything of it goes, and the registry retires its slot.
    fn finish(mut self) {
        self.ready.stop();
        self.monitors.stop();
        // Aborting the notify task drops the socket, which removes its file.
        abort_all(&mut self.run_tasks);
        // Its listening sockets close (unless an activator holds them).
        self.slot
            .sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.sh.ports.release(self.port);
        // The finished slot stays listed for `get` a while (see `Shared::retire`) but must
        // not keep the driver's handle (a pidfd, a cgroup, a container reference) alive
        // with it.
        self.handle = None;
        *self.slot.handle.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.sh.retire(&self.slot);
    }
}

/// What the state machine needs of a workload's manifest.
fn core_config(spec: &WorkloadSpec) -> core_instance::Config {
    core_instance::Config {
        readiness_timeout: spec.readiness.as_ref().map(|r| r.timeout),
        shutdown: spec.shutdown,
        restart: spec.restart,
        watchdog: spec
            .readiness
            .as_ref()
            .and_then(|r| r.watchdog.map(|w| (w, r.watchdog_signal))),
        seed: rand::random(),
    }
}

async fn wait_exit(handle: &Option<Arc<dyn InstanceHandle>>) -> ExitStatus {
    match handle {
        Some(h) => h.wait().await,
        None => std::future::pending().await,
    }
}

async fn deadline(d: &mut Option<Pin<Box<Sleep>>>) {
    match d {
        Some(s) => s.as_mut().await,
        None => std::future::pending().await,
    }
}

/// A run could not be started: what failed (the event's `failure_kind`), and why.
#[derive(Debug)]
struct SpawnFailure {
    kind: FailureKind,
    reason: String,
}

impl From<bulkhead_driver::SpawnError> for SpawnFailure {
    fn from(e: bulkhead_driver::SpawnError) -> SpawnFailure {
        SpawnFailure {
            kind: e.kind(),
            reason: e.to_string(),
        }
    }
}

/// A failure of `kind` with a reason, for `map_err`.
fn failed(kind: FailureKind) -> impl Fn(String) -> SpawnFailure {
    move |reason| SpawnFailure { kind, reason }
}

/// Builds the environment and argv, binds the notify socket, spawns through the driver.
async fn spawn(
    sh: &Arc<Shared>,
    slot: &Slot,
    port: &mut u16,
    env: &mut Vec<(String, String)>,
) -> Result<(bulkhead_driver::Spawned, Option<NotifySocket>), SpawnFailure> {
    let spec = &slot.spec();
    let driver = sh
        .drivers
        .get(&spec.driver)
        .ok_or_else(|| format!("driver {} is not available in this daemon", spec.driver))
        .map_err(failed(FailureKind::Invalid))?
        .clone();
    // Warm pools make slots only while no launch is on its way: from here until the
    // instance is ready or its run ended (`publish_view` drops the mark).
    *slot.launching.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(crate::warm::Pools::launching(sh));
    // A restart keeps its address (below), which a slot's fixed port would change: only
    // a key's first run takes a slot.
    let first_run = *port == 0;
    if let Some(ready) = first_run.then(|| sh.warm.take(sh, slot)).flatten() {
        let name = ready.name.clone();
        match spawn_warm(sh, slot, &driver, ready, port, env).await {
            Ok(s) => return Ok(s),
            // The slot is gone; the launch goes on cold, as if there had been none.
            Err(e) => tracing::warn!(
                "{}: warm slot {name} failed: {}; spawning cold",
                slot.id,
                e.reason
            ),
        }
    }
    // A restart keeps the instance's address: the previous run's port, still held for
    // it, unless another program listens on it now. Otherwise that port goes back (it
    // was leaked before: a crash loop held a port per restart until the daemon ran out)
    // and a new one is taken; the allocator's cursor has moved past the old one, so it
    // is picked again only when no other port is free.
    // A port the key's own `tcp:$PORT` socket holds is kept as long as the socket.
    let socket_port = socket_port(slot);
    if let Some(p) = socket_port {
        *port = p;
    } else if !sh.ports.keepable(*port) {
        sh.ports.release(std::mem::take(port));
        *port = sh
            .ports
            .allocate()
            .map_err(|e| format!("cannot allocate a port: {e}"))
            .map_err(failed(FailureKind::Exhausted))?;
    }
    let listen = key_sockets(sh, slot, *port).map_err(failed(FailureKind::Setup))?;
    let notify = match sh.take_spare_notify(spec) {
        Some(n) => Some(n),
        None => bind_notify(sh, spec, || {
            sh.notify_dir().join(format!("{}.sock", sh.next_seq()))
        })
        .map_err(failed(FailureKind::Setup))?,
    };
    // Read at each start: an edit applies on the next one (systemd's EnvironmentFile=).
    let from_files = read_env_files(slot).map_err(failed(FailureKind::Setup))?;
    let file_keys: Vec<String> = from_files.iter().map(|(k, _)| k.clone()).collect();
    *env = instance_env(
        slot,
        from_files,
        *port,
        notify.as_ref().map(|n| n.path().display().to_string()),
    );
    // The tenant's host ids, held until the instance is final: its channel space
    // belongs to them.
    let ids = {
        let mut held = slot.ids.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_none() {
            *held = sh
                .reserve_ids(slot)
                .map_err(|e| format!("cannot start instance {}: {e}", slot.id))
                .map_err(failed(FailureKind::Exhausted))?;
        }
        held.as_ref().map(|h| h.ids)
    };
    // The data plane: channels exist before the workload starts (it opens them).
    let (channel_env, mut binds) = crate::dataplane::acquire(sh, slot, ids, None)
        .await
        .map_err(|e| format!("cannot create channels: {e}"))
        .map_err(failed(FailureKind::Setup))?;
    env.extend(channel_env);
    let argv = resolve_argv(slot, env).map_err(failed(FailureKind::Invalid))?;
    binds.extend(notify.iter().map(|n| bulkhead_driver::Bind::same(n.path())));
    let spawned = driver
        .spawn(SpawnSpec {
            instance: slot.id.clone(),
            argv,
            env: env.clone(),
            cwd: slot.dir.clone(),
            spec: spec.clone(),
            binds,
            ids,
            inherited: inherited_vars(slot, &file_keys),
            listen,
        })
        .await?;
    Ok((spawned, notify))
}

/// [`spawn`] in a warm slot: the slot fixed the port and the directory the notify
/// socket goes in, and (`user_namespace: auto`) the host id range, now the tenant's.
async fn spawn_warm(
    sh: &Arc<Shared>,
    slot: &Slot,
    driver: &Arc<dyn bulkhead_driver::Driver>,
    ready: crate::warm::Ready,
    port: &mut u16,
    env: &mut Vec<(String, String)>,
) -> Result<(bulkhead_driver::Spawned, Option<NotifySocket>), SpawnFailure> {
    let crate::warm::Ready {
        warm,
        dir,
        port: slot_port,
        ids,
        space,
        notify,
        ..
    } = ready;
    let made = SlotMade {
        dir,
        port: slot_port,
        ids,
        space,
        notify,
    };
    // Until the driver has it, a failure here removes the slot (off the runtime's
    // threads, as the pool does).
    match prepare_warm(sh, slot, made, port, env).await {
        Ok((spec, notify)) => Ok((driver.spawn_warm(warm, spec).await?, notify)),
        Err(e) => {
            warm.discard().await;
            Err(e)
        }
    }
}

/// What a warm slot was made with, besides the driver's part.
struct SlotMade {
    dir: std::path::PathBuf,
    port: u16,
    ids: Option<crate::dataplane::IdHold>,
    space: Option<crate::dataplane::WarmSpace>,
    notify: Option<NotifySocket>,
}

/// Everything of [`spawn_warm`] before the hand-over: the launch's [`SpawnSpec`].
async fn prepare_warm(
    sh: &Arc<Shared>,
    slot: &Slot,
    made: SlotMade,
    port: &mut u16,
    env: &mut Vec<(String, String)>,
) -> Result<(SpawnSpec, Option<NotifySocket>), SpawnFailure> {
    let SlotMade {
        dir,
        port: slot_port,
        ids: hold,
        space,
        notify,
    } = made;
    let dir = dir.as_path();
    let spec = slot.spec();
    // The instance takes the slot's port, unless the key's sockets already hold one (an
    // on-connection activator bound `tcp:$PORT`): then that one, as a cold spawn does.
    let socket_port = socket_port(slot);
    match socket_port {
        Some(p) => {
            sh.ports.release(slot_port);
            *port = p;
        }
        None => sh.ports.release(std::mem::replace(port, slot_port)),
    }
    // The key's listening sockets (bound now at that port, or the activator's), passed
    // with the hand-over.
    let listen = key_sockets(sh, slot, *port).map_err(failed(FailureKind::Setup))?;
    // Bound when the slot was made (off the launch's path), in its directory.
    let notify = match notify {
        Some(n) => Some(n),
        None => {
            bind_notify(sh, &spec, || dir.join(WARM_NOTIFY)).map_err(failed(FailureKind::Setup))?
        }
    };
    let from_files = read_env_files(slot).map_err(failed(FailureKind::Setup))?;
    let file_keys: Vec<String> = from_files.iter().map(|(k, _)| k.clone()).collect();
    *env = instance_env(
        slot,
        from_files,
        *port,
        notify.as_ref().map(|n| n.path().display().to_string()),
    );
    let ids = hold.as_ref().map(|h| h.ids);
    if let Some(hold) = hold {
        *slot.ids.lock().unwrap_or_else(|e| e.into_inner()) = Some(hold);
    }
    // The data plane, as for a cold spawn: the tenant's space (its owner the slot's ids,
    // now the tenant's) and the channels exist before the program starts. A new scope
    // takes the space the slot was made with; otherwise the driver mounts the scope's
    // into the slot at the hand-over.
    let (channel_env, channel_binds) = crate::dataplane::acquire(sh, slot, ids, space)
        .await
        .map_err(|e| format!("cannot create channels: {e}"))
        .map_err(failed(FailureKind::Setup))?;
    env.extend(channel_env);
    let mut binds = vec![bulkhead_driver::Bind::same(dir)];
    binds.extend(channel_binds);
    let argv = resolve_argv(slot, env).map_err(failed(FailureKind::Invalid))?;
    let spawn = SpawnSpec {
        instance: slot.id.clone(),
        argv,
        env: env.clone(),
        cwd: slot.dir.clone(),
        spec: spec.clone(),
        binds,
        ids,
        inherited: inherited_vars(slot, &file_keys),
        listen,
    };
    Ok((spawn, notify))
}

/// The name of a warm slot's notify socket in its directory.
pub(crate) const WARM_NOTIFY: &str = "notify.sock";

/// Whether an instance of `spec` gets a notify socket that is a file (see
/// [`bind_notify`]): then a socket bound ahead serves it.
pub(crate) fn notify_file(spec: &WorkloadSpec) -> bool {
    matches!(&spec.readiness, Some(r) if r.notify)
        && !(spec.driver == DriverKind::Process && spec.user.is_some())
}

/// The notify socket of an instance of `spec` (`readiness: {notify: true}`; `None`
/// otherwise), bound at `path()`; a process instance running as another user cannot
/// reach the state directory (0700), so its socket is an abstract one (`@...`), which
/// needs no file access.
pub(crate) fn bind_notify(
    sh: &Shared,
    spec: &WorkloadSpec,
    path: impl FnOnce() -> std::path::PathBuf,
) -> Result<Option<NotifySocket>, String> {
    match &spec.readiness {
        Some(r) if r.notify && spec.driver == DriverKind::Process && spec.user.is_some() => {
            let name = format!("bulkhead-notify-{}-{}", std::process::id(), sh.next_seq());
            NotifySocket::bind_abstract(&name)
                .map(Some)
                .map_err(|e| format!("cannot bind notify socket @{name}: {e}"))
        }
        Some(r) if r.notify => {
            let path = path();
            NotifySocket::bind(&path)
                .map(Some)
                .map_err(|e| format!("cannot bind notify socket {}: {e}", path.display()))
        }
        _ => Ok(None),
    }
}

/// The port the key's `tcp:$PORT` socket holds, if it has one bound.
fn socket_port(slot: &Slot) -> Option<u16> {
    slot.sockets
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(|s| s.port())
}

/// The key's listening sockets for a spawn: those an on-connection activator bound, or
/// bound now (first spawn), then the same for every run.
fn key_sockets(
    sh: &Arc<Shared>,
    slot: &Slot,
    port: u16,
) -> Result<Vec<bulkhead_driver::listen::ListenFd>, String> {
    let spec = slot.spec();
    let Some(list) = &spec.sockets else {
        return Ok(Vec::new());
    };
    let mut held = slot.sockets.lock().unwrap_or_else(|e| e.into_inner());
    if held.is_none() {
        let bound = match sh.activation_sockets(&slot.key, &spec) {
            Some(b) => b,
            None => Arc::new(
                crate::sockets::BoundSockets::bind(
                    list,
                    port,
                    &crate::sockets::runtime_dir(&sh.cfg.state_dir, &slot.id),
                    slot.key.namespace(),
                )
                .map_err(|e| e.to_string())?,
            ),
        };
        for (name, addr) in bound.addresses() {
            tracing::info!("{}: socket {name} listens on {addr}", slot.id);
        }
        *held = Some(bound);
    }
    Ok(held.as_ref().map(|b| b.listen_fds()).unwrap_or_default())
}

/// The variables of an instance's environment that came from the daemon's (or its
/// default `PATH`), not from the manifest.
fn inherited_vars(slot: &Slot, from_files: &[String]) -> Vec<String> {
    PASS_THROUGH
        .iter()
        .filter(|k| !slot.spec().env.iter().any(|(m, _)| m == *k))
        .filter(|k| !from_files.iter().any(|f| f == *k))
        .map(|k| (*k).to_owned())
        .collect()
}

/// The variables of the workload's `env_file`s, in order (a later file wins). A file
/// that is missing, unreadable or malformed fails the start, naming the file and line.
fn read_env_files(slot: &Slot) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for path in bulkhead_core::execution::env_files(&slot.spec(), &slot.dir) {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read env_file {}: {e}", path.display()))?;
        let vars = bulkhead_core::envfile::parse(&text)
            .map_err(|e| format!("env_file {}: {e}", path.display()))?;
        for (k, _) in &vars {
            if bulkhead_core::spec::RESERVED_ENV.contains(&k.as_str())
                || k.starts_with(bulkhead_core::channels::ENV_PREFIX)
            {
                return Err(format!(
                    "env_file {}: {k} is set by bulkhead and cannot be overridden",
                    path.display()
                ));
            }
        }
        out.extend(vars);
    }
    Ok(out)
}

/// Sets `k` in `env`, replacing an earlier value (a list with one entry per name: a
/// `posix_spawn`ed program's `getenv` would see the first of two).
fn set_var(env: &mut Vec<(String, String)>, k: String, v: String) {
    env.retain(|(e, _)| *e != k);
    env.push((k, v));
}

/// Variables passed through from the daemon's own environment.
const PASS_THROUGH: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR",
];

/// The instance environment: a few variables from the daemon, the `env_file`s, the
/// manifest's `env`, then bulkhead's own (which a manifest cannot override).
fn instance_env(
    slot: &Slot,
    from_files: Vec<(String, String)>,
    port: u16,
    notify: Option<String>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = PASS_THROUGH
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
        .collect();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
    }
    // The env files, then the manifest's `env`, which wins over them.
    for (k, v) in from_files {
        set_var(&mut env, k, v);
    }
    for (k, v) in &slot.spec().env {
        set_var(&mut env, k.clone(), v.clone());
    }
    env.push(("PORT".into(), port.to_string()));
    env.push(("BULKHEAD_INSTANCE".into(), slot.id.to_string()));
    env.push(("BULKHEAD_WORKLOAD".into(), slot.key.workload().to_owned()));
    env.push((
        "BULKHEAD_NAMESPACE".into(),
        slot.key.namespace().unwrap_or("").to_owned(),
    ));
    env.push((
        "BULKHEAD_SESSION".into(),
        slot.key.session().unwrap_or("").to_owned(),
    ));
    if let Some(n) = notify {
        env.push(("NOTIFY_SOCKET".into(), n));
        // No WATCHDOG_PID: the pid is not known before the spawn (and differs inside a
        // PID namespace); sd_watchdog_enabled() takes an absent one as "this process".
        if let Some(w) = slot.spec().readiness.as_ref().and_then(|r| r.watchdog) {
            env.push(("WATCHDOG_USEC".into(), w.as_micros().to_string()));
        }
    }
    env
}

/// Expands `${VAR}`s and resolves a relative program path against the workload folder.
fn resolve_argv(slot: &Slot, env: &[(String, String)]) -> Result<Vec<String>, String> {
    resolve_command(slot, &slot.spec().command, env)
}

fn resolve_command(
    slot: &Slot,
    command: &[String],
    env: &[(String, String)],
) -> Result<Vec<String>, String> {
    let mut argv = expand_argv(command, env).map_err(|e| e.to_string())?;
    // A container's program is a path inside its image, not in the workload folder.
    if slot.host_programs && argv[0].contains('/') && !argv[0].starts_with('/') {
        argv[0] = slot.dir.join(&argv[0]).display().to_string();
    }
    Ok(argv)
}

fn probes(
    slot: &Slot,
    http: Option<&bulkhead_core::spec::HttpProbe>,
    tcp: Option<&bulkhead_core::spec::TcpProbe>,
    exec: Option<&bulkhead_core::spec::ExecProbe>,
    port: u16,
    env: &[(String, String)],
) -> Vec<(Check, bulkhead_core::spec::ProbeTiming)> {
    let mut out = Vec::new();
    if let Some(h) = http {
        out.push((
            Check::Http(Box::new(readiness::HttpTarget {
                https: h.scheme == bulkhead_core::spec::Scheme::Https,
                host: h.host.clone(),
                port: h.port.unwrap_or(port),
                path: h.path.clone(),
                headers: h
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            })),
            h.timing(),
        ));
    }
    if let Some(t) = tcp {
        out.push((
            Check::Tcp {
                port: t.port.unwrap_or(port),
            },
            t.timing(),
        ));
    }
    if let Some(e) = exec {
        // A process instance's probe runs as the instance does (user, limits, umask, in
        // its working directory); a walled instance's (a sandbox) inside it, as
        // `bulkhead exec` runs; the others' (whose engine runs their probes) on the host,
        // in the folder.
        let inside = slot.exec_target();
        let (cwd, setup) = if inside.is_some() {
            (
                bulkhead_core::execution::working_dir(&slot.spec(), &slot.dir),
                None,
            )
        } else if slot.spec().driver == DriverKind::Process {
            match bulkhead_driver::setup::host_setup(&slot.spec()) {
                Ok(s) => (
                    bulkhead_core::execution::working_dir(&slot.spec(), &slot.dir),
                    s.map(Box::new),
                ),
                Err(err) => {
                    // Never passes; the readiness timeout reports the launch as failed.
                    tracing::warn!("{}: exec probe: {err}", slot.id);
                    return out;
                }
            }
        } else {
            (slot.dir.clone(), None)
        };
        match resolve_command(slot, &e.command, env) {
            Ok(argv) => out.push((
                Check::Exec {
                    argv,
                    env: env.to_vec(),
                    cwd,
                    setup,
                    inside,
                },
                e.timing,
            )),
            // Never passes; the readiness timeout reports the launch as failed.
            Err(err) => tracing::warn!("{}: exec probe: {err}", slot.id),
        }
    }
    out
}

#[cfg(test)]
#[path = "instance_tests.rs"]
mod tests;
