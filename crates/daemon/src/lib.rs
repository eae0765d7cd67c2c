//! The bulkhead daemon.
//!
//! [`Daemon::start`] binds the API socket first (so early clients queue instead of being
//! refused), loads the workload catalog, and serves the gRPC API. Launches go through the
//! registry ([`Shared::launch`]), which holds one slot per instance id (= isolation key);
//! each slot runs an actor ([`instance`]) around the core state machine. Events go to the
//! [`events::EventLog`].
//!
//! **Invariant — at most one live instance per key.** The registry map is the only place
//! instances are created, under its lock, and a key's slot is replaced only once its
//! instance is terminal. The lock is never held across an await: the spawn, readiness and
//! waits all happen outside it, so launches of different keys never wait on each other.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bulkhead_core::instance::State;
use bulkhead_core::key::{InstanceId, Key, KeyError};
use bulkhead_core::spec::DriverKind;
use bulkhead_driver::Driver;

pub mod auth;
pub mod catalog;
mod daemon_id;
mod dataplane;
mod deps;
pub mod docker;
pub mod events;
pub mod exec;
mod http;
pub mod instance;
pub mod instances;
pub mod logs;
mod mainpid;
pub mod metrics;
pub mod notify_self;
pub mod peer; // metrics + HTTP health (observability)
pub mod ports;
pub mod readiness;
mod recovery;
pub mod rollout;
mod server;
mod service;
pub mod sockets;
mod standard;
pub mod store;
mod warm;

pub use instance::{Slot, View};
pub use server::{Config, Daemon, StartError};
pub use service::{event_proto, instance_proto};

/// What a launch waits for before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitFor {
    Nothing,
    Started,
    Ready,
}

/// A launch request, already out of its protocol form.
#[derive(Debug, Clone)]
pub struct LaunchArgs {
    pub workload: String,
    pub namespace: Option<String>,
    pub session: Option<String>,
    pub wait: WaitFor,
    /// `None`: bounded only by the instance's own readiness timeout.
    pub timeout: Option<Duration>,
    /// Take a lease for this holder.
    pub lease: Option<String>,
}

/// A launch did not give a usable instance.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("unknown workload {0:?} (see `bulkhead workloads`)")]
    UnknownWorkload(String),
    /// `Display` is the full error; `error.redacted` is for callers who are not admins.
    #[error("workload {name} is invalid: {error}")]
    InvalidWorkload {
        name: String,
        error: catalog::EntryError,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The lease holder is not a valid name, or the instance has too many holders.
    #[error(transparent)]
    Lease(#[from] bulkhead_core::lease::LeaseError),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// The instance's events cannot be stored (it was created just before the store
    /// began to fail); it goes on once they can.
    #[error("launch of {id} cannot be recorded: {fault}; it goes on once the state directory can be written")]
    Unrecorded {
        id: InstanceId,
        fault: events::StoreFault,
    },
    #[error("the daemon already runs {limit} live instances, its limit (--max-instances); terminate one or raise the limit")]
    AtCapacity { limit: usize },
    #[error("namespace {namespace} already runs {limit} live instances, its limit (--max-instances-per-namespace); terminate one there or raise the limit")]
    NamespaceAtCapacity { namespace: String, limit: usize },
    #[error("launch of {id} failed: {reason}")]
    Failed { id: InstanceId, reason: String },
    /// A dependency (`depends_on`) could not be launched or did not reach its condition;
    /// the dependent was not started.
    #[error("launch of {id} failed: its dependency {dependency} failed: {source}")]
    Dependency {
        id: InstanceId,
        /// The dependency's instance id (or its workload name when it has no key).
        dependency: String,
        source: Box<LaunchError>,
    },
    /// The dependency's isolation cannot be derived from the dependent's key (the
    /// manifests changed since the check; `core::deps`).
    #[error(transparent)]
    DependencyScope(#[from] bulkhead_core::deps::DepKeyError),
    #[error("{id} is not {what} after {waited:?} (state {state}); it goes on starting in the background")]
    Timeout {
        id: InstanceId,
        what: &'static str,
        waited: Duration,
        state: &'static str,
    },
}

/// State shared by the server, the actors and the API.
pub struct Shared {
    pub(crate) cfg: Config,
    catalog: RwLock<Arc<catalog::Catalog>>,
    registry: Mutex<HashMap<InstanceId, Arc<Slot>>>,
    /// Finished instances still in `registry` (for `get` and `list`), oldest first, with
    /// when they finished: at most [`FINISHED_KEPT`] stay, each at most [`FINISHED_TTL`],
    /// so a daemon that serves a new session per request does not grow without bound.
    finished: Mutex<std::collections::VecDeque<(InstanceId, std::sync::Weak<Slot>, u64)>>,
    pub events: events::EventLog,
    pub(crate) drivers: HashMap<DriverKind, Arc<dyn Driver>>,
    pub(crate) ports: ports::Ports,
    seq: AtomicU64,
    started: Instant,
    shutting_down: AtomicBool,
    /// The keeper the process driver spawns through, when there is one.
    pub(crate) keeper: Option<Arc<bulkhead_driver::keeper::client::KeeperDriver>>,
    /// A notify socket bound ahead for the next cold launch (`warm::spare_notify`).
    pub(crate) notify_spare: Mutex<Option<crate::readiness::NotifySocket>>,
    /// The instance table (with durable events).
    pub(crate) instances: Option<instances::InstanceTable>,
    /// Prometheus metrics; launches are counted in [`Shared::launch`].
    pub metrics: metrics::Metrics,
    /// What the sandbox driver found at start-up, or why it is unavailable; `None`:
    /// not tried.
    pub(crate) sandbox: Option<Result<bulkhead_sandbox::Capabilities, String>>,
    /// The docker driver (always registered, so docker manifests validate; launches fail
    /// clearly while the engine is unreachable) and its image cache.
    pub(crate) docker: docker::DockerState,
    /// When the state directory is a copy of another daemon's: that daemon's id. The
    /// processes its instance table names are then that daemon's, never signalled here.
    pub(crate) state_copied_from: Option<String>,
    /// How process instances are tracked: `cgroup <dir>` or `process group`.
    pub(crate) process_tracking: String,
    /// The data plane: its channel spaces and their managers.
    pub(crate) dataplane: crate::dataplane::DataPlane,
    /// The host id ranges of `user_namespace: auto`, one per live tenant (the daemon
    /// reserves them: a channel space belongs to its tenant's ids before the spawn).
    pub(crate) ids: std::sync::Mutex<bulkhead_core::sandbox::IdBlocks>,
    /// Dependents being restarted because a dependency restarted (one at a time each).
    dependency_restarts: Mutex<std::collections::HashSet<InstanceId>>,
    /// On-connection workloads (`activation:`), by instance id (one per key: isolation
    /// `none`'s, or each listed namespace's): their bound sockets and the task that
    /// launches them (`sockets::Activator`).
    pub(crate) activators: Mutex<HashMap<String, sockets::Activator>>,
    /// Warm pools (`warm:`).
    pub(crate) warm: warm::Pools,
}

/// The sandbox driver's cgroup subtree name for a daemon id (`daemon_id::load_daemon_id`):
/// daemons with different ids, a copy of a state directory included, never touch each
/// other's instance cgroups (FNV-1a of the id).
pub fn sandbox_scope(daemon_id: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in daemon_id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("d{h:016x}")
}

/// The process driver's cgroup subtree name for a daemon id: like [`sandbox_scope`], with
/// its own prefix, so that neither driver's clean-up touches the other's instances.
pub fn process_scope(daemon_id: &str) -> String {
    let mut s = sandbox_scope(daemon_id);
    s.replace_range(0..1, "p");
    s
}

/// Starts the sandbox driver when this machine allows it.
fn start_sandbox(
    cfg: &Config,
    daemon_id: &str,
    drivers: &mut HashMap<DriverKind, Arc<dyn Driver>>,
) -> Option<Result<bulkhead_sandbox::Capabilities, String>> {
    if !cfg.sandbox {
        return None;
    }
    let sc = bulkhead_sandbox::SandboxConfig {
        mode: bulkhead_sandbox::cgroup::ModeChoice::Auto,
        scope: sandbox_scope(daemon_id),
        min_available_memory: cfg.min_available_memory,
        favor_dynmods: cfg.cgroup_favordynmods,
        ..Default::default()
    };
    Some(match bulkhead_sandbox::SandboxDriver::new(sc) {
        Ok(d) => {
            let caps = d.capabilities();
            tracing::info!(
                mode = %caps.cgroup_mode,
                controllers = ?caps.controllers,
                clone_into_cgroup = caps.clone_into_cgroup,
                "sandbox driver ready"
            );
            drivers.insert(DriverKind::Sandbox, Arc::new(d));
            Ok(caps)
        }
        Err(e) => {
            tracing::info!("sandbox driver unavailable: {e}");
            Err(e.to_string())
        }
    })
}

/// How many finished instances stay visible to `get` and `list`.
pub const FINISHED_KEPT: usize = 1024;
/// How long a finished instance stays, by default.
pub const FINISHED_TTL: Duration = Duration::from_secs(24 * 3600);

/// How long a release waits for its lease change to be stored.
const LEASES_DURABLE_WAIT: Duration = Duration::from_secs(5);

impl Shared {
    /// `events`: the durable log opened on the state dir, or [`events::EventLog::new`].
    pub(crate) fn new(
        cfg: Config,
        events: events::EventLog,
        keeper: Option<Arc<bulkhead_driver::keeper::client::KeeperDriver>>,
        instances: Option<instances::InstanceTable>,
    ) -> Shared {
        let mut drivers: HashMap<DriverKind, Arc<dyn Driver>> = HashMap::new();
        // Bound to the state directory's identity: a copy of it gets an id of its own.
        let daemon_id = daemon_id::load_daemon_id(&cfg.state_dir);
        // Every process instance in a cgroup of its own, for tracking and teardown (no
        // limits): where no cgroup2 place can be used, by process group (logged once).
        let tracker = bulkhead_driver::process::detect_tracking(&process_scope(&daemon_id.id));
        let process_tracking = bulkhead_driver::process::tracking_text(tracker.as_ref());
        tracing::info!("process instances are tracked by {process_tracking}");
        let process: Arc<dyn Driver> = match &keeper {
            Some(k) => {
                if let Some(t) = tracker {
                    k.set_tracker(t);
                }
                k.clone()
            }
            None => {
                // Without a keeper nothing is adopted: an instance cgroup left in the scope
                // is a crashed daemon's (its orphans, setsid'd or not). Nothing may run
                // unseen: killed and removed before the first spawn.
                if let Some(t) = &tracker {
                    let n = t.remove_stale(&[]);
                    if n > 0 {
                        tracing::warn!(
                            "removed {n} stale instance cgroup(s) and killed their processes"
                        );
                    }
                }
                Arc::new(bulkhead_driver::process::ProcessDriver::with_tracker(
                    tracker,
                ))
            }
        };
        drivers.insert(DriverKind::Process, process);
        let sandbox = start_sandbox(&cfg, &daemon_id.id, &mut drivers);
        let docker = docker::DockerState::new(&cfg, &daemon_id.id);
        drivers.insert(DriverKind::Docker, docker.driver.clone());
        if let Some(host) = &cfg.swarm_host {
            let swarm = bulkhead_swarm::SwarmDriver::new(&daemon_id.id, host);
            drivers.insert(DriverKind::Swarm, Arc::new(swarm));
        }
        // Always registered (kubernetes manifests validate); it connects on first use,
        // so a daemon with no cluster starts and only kubernetes launches fail, saying why.
        drivers.insert(
            DriverKind::Kubernetes,
            Arc::new(bulkhead_kubernetes::KubernetesDriver::new(
                daemon_id.id.clone(),
                cfg.kubernetes.clone(),
            )),
        );
        let ports = ports::Ports::new(cfg.port_range);
        Shared {
            docker,
            notify_spare: Mutex::new(None),
            state_copied_from: daemon_id.copied_from,
            cfg,
            catalog: RwLock::new(Arc::new(catalog::Catalog::default())),
            registry: Mutex::new(HashMap::new()),
            finished: Mutex::new(std::collections::VecDeque::new()),
            events,
            drivers,
            ports,
            seq: AtomicU64::new(1),
            started: Instant::now(),
            shutting_down: AtomicBool::new(false),
            metrics: metrics::Metrics::new(),
            keeper,
            instances,
            sandbox,
            process_tracking,
            dataplane: Default::default(),
            ids: crate::dataplane::id_blocks(),
            dependency_restarts: Mutex::new(std::collections::HashSet::new()),
            activators: Mutex::new(HashMap::new()),
            warm: Default::default(),
        }
    }

    /// Puts an instance a driver found at start-up back under supervision, with what the
    /// instance table kept of it.
    pub(crate) fn adopt(
        self: &Arc<Self>,
        found: bulkhead_driver::Found,
        spec: Arc<bulkhead_core::spec::WorkloadSpec>,
        dir: PathBuf,
        restored: bulkhead_core::instance::Restored,
        leases: Vec<String>,
    ) {
        let Ok((id, key)) = InstanceId::parse(found.instance.as_str()) else {
            return;
        };
        let mut reg = self.lock_registry();
        if reg
            .get(&id)
            .is_some_and(|s| !s.view.borrow().state.is_terminal())
        {
            // Recovery adopts one run per key; this is a guard, not a path.
            tracing::error!(
                "a second run ({}) of {id} was found; killing it",
                found.describe
            );
            let _ = found
                .spawned
                .handle
                .signal(bulkhead_core::signal::Signal::KILL);
            return;
        }
        let slot = instance::start_with(
            self,
            key,
            spec,
            dir,
            instance::Origin::Adopted(Box::new(found), restored),
            leases,
        );
        reg.insert(id, slot);
    }

    /// Brings back an instance the table knew but whose process is gone (or which was
    /// between runs): its restart policy decides what happens next.
    pub(crate) fn resume(
        self: &Arc<Self>,
        key: Key,
        spec: Arc<bulkhead_core::spec::WorkloadSpec>,
        dir: PathBuf,
        restored: bulkhead_core::instance::Restored,
        lost: Option<String>,
        leases: Vec<String>,
    ) {
        let id = key.instance_id();
        let mut reg = self.lock_registry();
        if reg.contains_key(&id) {
            return;
        }
        let slot = instance::start_with(
            self,
            key,
            spec,
            dir,
            instance::Origin::Resumed(restored, lost),
            leases,
        );
        reg.insert(id, slot);
    }

    /// Records that `slot` reached a final state, and forgets the oldest finished
    /// instances beyond `Config::finished_kept` ([`FINISHED_KEPT`] by default) or older
    /// than `Config::finished_ttl`, with their logs.
    pub(crate) fn retire(&self, slot: &Arc<Slot>) {
        let now = crate::events::now_ms();
        self.finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((slot.id.clone(), Arc::downgrade(slot), now));
        self.forget_finished(now);
    }

    /// Forgets finished instances beyond the count or past the age they may stay (called
    /// on each retirement and once a minute). An entry is removed only if the registry
    /// still holds that very slot in a final state: a key launched again since has a new
    /// slot.
    pub(crate) fn forget_finished(&self, now_ms: u64) {
        let mut fin = self.finished.lock().unwrap_or_else(|e| e.into_inner());
        let kept = self.cfg.finished_kept;
        let ttl = self.cfg.finished_ttl.as_millis() as u64;
        let expired =
            |fin: &std::collections::VecDeque<(InstanceId, std::sync::Weak<Slot>, u64)>| {
                fin.front()
                    .is_some_and(|(_, _, at)| now_ms.saturating_sub(*at) > ttl)
            };
        if fin.len() <= kept && !expired(&fin) {
            return;
        }
        // Lock order: `finished`, then `registry` (nowhere is it taken the other way).
        let mut reg = self.lock_registry();
        while fin.len() > kept || expired(&fin) {
            let Some((id, weak, _)) = fin.pop_front() else {
                break;
            };
            let same = match (reg.get(&id), weak.upgrade()) {
                (Some(cur), Some(old)) => Arc::ptr_eq(cur, &old),
                _ => false,
            };
            if same
                && reg
                    .get(&id)
                    .is_some_and(|s| s.view.borrow().state.is_terminal())
            {
                // Its log goes with it (10,000 sessions must not leave 10,000 files).
                // Under the registry lock: a new launch of the key, which would write
                // the same file, cannot begin meanwhile.
                if let Some(old) = reg.remove(&id) {
                    old.log.remove_files();
                }
            }
        }
    }

    /// Log files of instances this daemon does not know (left by an earlier daemon, whose
    /// finished instances are not brought back): the newest `finished_kept` younger than
    /// `finished_ttl` stay (`logs` still reads them), the rest are removed. Called once at
    /// start-up, after recovery.
    pub(crate) fn sweep_stray_logs(&self) -> usize {
        let dir = self.logs_dir();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return 0;
        };
        let known: std::collections::HashSet<PathBuf> = self
            .lock_registry()
            .values()
            .map(|s| s.log.path().to_owned())
            .collect();
        let now = std::time::SystemTime::now();
        let mut stray: Vec<(std::time::SystemTime, PathBuf)> = entries
            .filter_map(|e| {
                let e = e.ok()?;
                let p = e.path();
                (p.extension()? == "log" && !known.contains(&p))
                    .then(|| Some((e.metadata().ok()?.modified().ok()?, p)))?
            })
            .collect();
        stray.sort_by_key(|s| std::cmp::Reverse(s.0));
        let mut removed = 0;
        for (i, (modified, p)) in stray.into_iter().enumerate() {
            let old = now
                .duration_since(modified)
                .is_ok_and(|age| age > self.cfg.finished_ttl);
            if i >= self.cfg.finished_kept || old {
                crate::logs::remove_log_files(&p);
                removed += 1;
            }
        }
        removed
    }

    /// At start-up, after the keeper's and the instance table's instances are back: an
    /// instance whose last event says it was running, but that neither brought back, died
    /// with the previous daemon (a keeper would have listed it; a sandboxed instance dies
    /// with its daemon). This happens when the daemon is killed right after a launch: the
    /// instance table is written off the launch path and may lag the (durable) event log
    /// by a commit. The event log is the truth: the instance is reported `lost` with the
    /// workload's current spec, and its restart policy decides.
    ///
    /// `ended`: instances the start-up already ended (a termination carried out): their
    /// `terminated` event may not be visible yet (an event is visible once stored).
    pub(crate) fn resume_unrecorded(
        self: &Arc<Self>,
        cat: &catalog::Catalog,
        ended: &std::collections::HashSet<InstanceId>,
    ) {
        use bulkhead_core::event::EventKind as K;
        let stops = self.stops_in_progress();
        let (history, _) = self.events.subscribe(0);
        let mut last: HashMap<&InstanceId, &K> = HashMap::new();
        for e in &history {
            last.insert(&e.instance, &e.kind);
        }
        for (id, kind) in last {
            let running = matches!(
                kind,
                K::Launched
                    | K::DependenciesReady { .. }
                    | K::Started { .. }
                    | K::Ready
                    | K::Adopted { .. }
                    | K::Unhealthy { .. }
                    | K::Terminating { .. }
            );
            if !running || ended.contains(id) || self.lock_registry().contains_key(id) {
                continue;
            }
            if stops.contains_key(id) {
                // Being terminated on request, and nothing of it is left: terminated.
                tracing::warn!(
                    "{id}: was being terminated when the last daemon ended; it is gone: terminated"
                );
                self.events.publish(id, K::Terminated { status: None });
                continue;
            }
            let Ok((_, key)) = InstanceId::parse(id.as_str()) else {
                continue;
            };
            let Some((spec, dir)) = cat
                .get(key.workload())
                .and_then(|e| e.spec.as_ref().ok().map(|s| (s.clone(), e.dir.clone())))
            else {
                // Its workload is gone: nothing can run it again, but the end is told.
                self.events.publish(
                    id,
                    K::Lost {
                        reason: "it was running when the daemon stopped, and its workload no longer exists".into(),
                    },
                );
                continue;
            };
            tracing::warn!("{id}: running at the last event but unrecorded; reporting it lost");
            self.resume(
                key,
                spec,
                dir,
                bulkhead_core::instance::Restored::default(),
                Some("it was running when the daemon stopped and its process is gone".into()),
                Vec::new(),
            );
        }
    }

    pub(crate) fn logs_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("logs")
    }

    pub(crate) fn notify_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("notify")
    }

    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    pub fn drivers(&self) -> Vec<DriverKind> {
        let mut d: Vec<DriverKind> = self.drivers.keys().copied().collect();
        d.sort_by_key(|k| k.as_str());
        d
    }

    pub fn catalog(&self) -> Arc<catalog::Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Rescans the workloads directory, swaps the catalog in, and binds the sockets of
    /// its on-connection workloads.
    pub fn reload(self: &Arc<Self>) -> Arc<catalog::Catalog> {
        let cat = self.rescan();
        self.sync_activation();
        cat
    }

    /// Rescans the workloads directory and swaps the catalog in (at start-up, before
    /// adoption: activation waits until adopted instances are back).
    pub(crate) fn rescan(&self) -> Arc<catalog::Catalog> {
        let cat = Arc::new(catalog::Catalog::scan(
            &self.cfg.workloads_dir,
            &self.drivers(),
        ));
        if let Some(e) = &cat.error {
            tracing::warn!("{e}");
        }
        for e in cat.entries.values() {
            if let Err(err) = &e.spec {
                tracing::warn!("invalid workload: {err}");
            }
        }
        *self.catalog.write().unwrap_or_else(|e| e.into_inner()) = cat.clone();
        cat
    }

    /// The sockets an activator bound for `key`'s workload, when `spec` is the manifest
    /// it bound them for.
    pub(crate) fn activation_sockets(
        &self,
        key: &Key,
        spec: &bulkhead_core::spec::WorkloadSpec,
    ) -> Option<Arc<sockets::BoundSockets>> {
        let a = self.activators.lock().unwrap_or_else(|e| e.into_inner());
        a.get(key.instance_id().as_str())
            .filter(|a| a.spec.sockets == spec.sockets)
            .map(|a| a.sockets.clone())
    }

    /// Binds the sockets of every on-connection workload of the catalog and starts its
    /// activator; drops those no longer on-connection. A workload whose sockets are
    /// unchanged keeps them. One with a live instance that holds other sockets is left
    /// for the next reload (its addresses are in use).
    pub(crate) fn sync_activation(self: &Arc<Self>) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let cat = self.catalog();
        let mut acts = self.activators.lock().unwrap_or_else(|e| e.into_inner());
        let wanted: HashMap<String, (Key, Arc<bulkhead_core::spec::WorkloadSpec>)> = cat
            .entries
            .values()
            .filter_map(|e| e.spec.as_ref().ok())
            .flat_map(|s| {
                sockets::activation_keys(s)
                    .into_iter()
                    .map(|k| (k.instance_id().to_string(), (k, s.clone())))
            })
            .collect();
        acts.retain(|name, _| wanted.contains_key(name));
        for (name, (key, spec)) in wanted {
            let reuse = match acts.get(&name) {
                Some(a) if a.spec == spec => continue,
                Some(a) if a.spec.sockets == spec.sockets => Some(a.sockets.clone()),
                _ => None,
            };
            acts.remove(&name);
            let sockets = match reuse {
                Some(s) => s,
                None => {
                    let id = key.instance_id();
                    if self
                        .get(&id)
                        .is_some_and(|s| !s.view.borrow().state.is_terminal())
                    {
                        tracing::warn!("{id}: runs with other sockets; its on-connection sockets are bound at a reload once it has ended");
                        continue;
                    }
                    let list = spec.sockets.as_deref().unwrap_or_default();
                    match sockets::BoundSockets::bind(
                        list,
                        0,
                        &sockets::runtime_dir(&self.cfg.state_dir, &id),
                        key.namespace(),
                    ) {
                        Ok(b) => {
                            for (n, addr) in b.addresses() {
                                tracing::info!("{id}: socket {n} listens on {addr} (activation: on-connection)");
                            }
                            Arc::new(b)
                        }
                        Err(e) => {
                            tracing::error!("{id}: on-connection activation is off: {e}");
                            continue;
                        }
                    }
                }
            };
            acts.insert(name, sockets::Activator::start(self, key, spec, sockets));
        }
    }

    /// Stops every activator (a shutting-down daemon launches nothing).
    pub(crate) fn stop_activation(&self) {
        self.activators
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn get(&self, id: &InstanceId) -> Option<Arc<Slot>> {
        self.lock_registry().get(id).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Slot>> {
        let mut v: Vec<Arc<Slot>> = self.lock_registry().values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    fn lock_registry(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceId, Arc<Slot>>> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Launches the instance of a key, or returns the live one. Returns the instance once
    /// `wait` is met, and whether this call created it. A new instance is created only
    /// once its dependencies (`depends_on`) reached their conditions (`deps.rs`).
    pub async fn launch(self: &Arc<Self>, args: LaunchArgs) -> Result<(View, bool), LaunchError> {
        let res = self.launch_unmetered(args).await;
        self.metrics.record_launch(match &res {
            Ok((_, true)) => "created",
            Ok((_, false)) => "reused",
            Err(_) => "failed",
        });
        res
    }

    async fn launch_unmetered(
        self: &Arc<Self>,
        args: LaunchArgs,
    ) -> Result<(View, bool), LaunchError> {
        self.launch_in_chain(args, &[]).await
    }

    /// [`Shared::launch`]; `chain`: the workloads whose launch asked for this one (as a
    /// dependency), to stop a cycle that a reload made between two catalog reads.
    async fn launch_in_chain(
        self: &Arc<Self>,
        args: LaunchArgs,
        chain: &[String],
    ) -> Result<(View, bool), LaunchError> {
        // A hostile name is an invalid request, not a missing workload.
        bulkhead_core::name::validate(bulkhead_core::name::NameKind::Workload, &args.workload)
            .map_err(KeyError::from)?;
        let catalog = self.catalog();
        let entry = catalog
            .get(&args.workload)
            .ok_or_else(|| LaunchError::UnknownWorkload(args.workload.clone()))?;
        let spec = entry
            .spec
            .clone()
            .map_err(|error| LaunchError::InvalidWorkload {
                name: entry.name.clone(),
                error,
            })?;
        // A shared docker container is one instance whatever the namespace or session;
        // the session (unless a holder is named) holds a lease on it.
        let shared_container = spec.shared_instance();
        let mut args = args;
        // Where the holder came from, for the error: an explicit lease or the session.
        let mut lease_field = "lease";
        if shared_container && args.lease.is_none() {
            args.lease = args.session.clone();
            lease_field = "session";
        }
        // Validated like every other name, before anything is created: a holder is stored
        // with the instance, shown, and must be typed again to `release` it.
        if let Some(holder) = &args.lease {
            bulkhead_core::lease::validate_holder(lease_field, holder)?;
        }
        let key = if shared_container {
            Key::new(&args.workload, spec.key_isolation(), None, None)?
        } else {
            Key::new(
                &args.workload,
                spec.isolation,
                args.namespace.as_deref(),
                args.session.as_deref(),
            )?
        };
        let id = key.instance_id();
        let deadline = args.timeout.map(|t| tokio::time::Instant::now() + t);
        // Dependencies first, each for the key derived from this one, and each at its
        // condition before this instance is created. A live instance is reused as it is.
        let mut after_launch = Vec::new();
        let live = self.get(&id).is_some_and(|s| {
            let st = s.view.borrow().state;
            !st.is_terminal() && st != State::Stopping
        });
        if !spec.depends_on.is_empty() && !live {
            let dependencies = self
                .launch_dependencies(&key, &spec, &catalog, deadline, chain)
                .await?;
            after_launch.push(bulkhead_core::event::EventKind::DependenciesReady { dependencies });
        }
        let (slot, created) = loop {
            if self.shutting_down.load(Ordering::SeqCst) {
                return Err(LaunchError::ShuttingDown);
            }
            let stopping = {
                let mut reg = self.lock_registry();
                match reg.get(&id) {
                    Some(s) if s.view.borrow().state == State::Stopping => s.subscribe(),
                    Some(s) if !s.view.borrow().state.is_terminal() => break (s.clone(), false),
                    _ => {
                        // Admission, under the lock that creates instances: the counts
                        // cannot move between the check and the insert, so concurrent
                        // launches never overshoot a limit.
                        admit(&self.cfg, &reg, &key)?;
                        let slot = instance::start(
                            self,
                            key.clone(),
                            spec.clone(),
                            entry.dir.clone(),
                            after_launch.clone(),
                        );
                        reg.insert(id.clone(), slot.clone());
                        break (slot, true);
                    }
                }
            };
            // The key's instance is being stopped: wait until it is gone, then start anew.
            let mut rx = stopping;
            let gone = rx.wait_for(|v| v.state.is_terminal());
            match deadline {
                Some(d) => {
                    if tokio::time::timeout_at(d, gone).await.is_err() {
                        return Err(LaunchError::Timeout {
                            id,
                            what: "startable",
                            waited: args.timeout.unwrap_or_default(),
                            state: "stopping",
                        });
                    }
                }
                None => {
                    let _ = gone.await;
                }
            }
        };
        if let Some(holder) = &args.lease {
            slot.take_lease(lease_field, holder)?;
        }
        let waited = wait_for(&slot, args.wait, deadline, args.timeout.unwrap_or_default());
        // The instance's events cannot be stored: its View waits for them, so say why
        // rather than hang (the request was admitted before the store failed).
        let view = tokio::select! {
            biased;
            v = waited => v?,
            fault = self.events.failing() => {
                return Err(LaunchError::Unrecorded { id, fault });
            }
        };
        Ok((view, created))
    }

    /// The terminations in progress when the last daemon ended, from the event log
    /// (durable before any client saw them): instance -> (when it began, wall clock ms;
    /// the grace it was given). An instance whose last event is `terminating` was being
    /// stopped on request, unless a failed liveness probe began that stop (then its
    /// restart policy decides, as for any run that ends).
    pub(crate) fn stops_in_progress(&self) -> HashMap<InstanceId, (u64, Duration)> {
        use bulkhead_core::event::EventKind as K;
        let (history, _) = self.events.subscribe(0);
        let mut last: HashMap<&InstanceId, (Option<&K>, &bulkhead_core::event::Event)> =
            HashMap::new();
        for e in &history {
            let before = last.get(&e.instance).map(|(_, prev)| &prev.kind);
            last.insert(&e.instance, (before, e));
        }
        last.into_iter()
            .filter_map(|(id, (before, e))| match (&e.kind, before) {
                (K::Terminating { grace_ms, .. }, b)
                    if !matches!(
                        b,
                        Some(K::LivenessFailed { .. } | K::WatchdogTimeout { .. })
                    ) =>
                {
                    Some((id.clone(), (e.time_ms, Duration::from_millis(*grace_ms))))
                }
                _ => None,
            })
            .collect()
    }

    /// Restarts since each instance's last launch, counted in the event log (durable
    /// before anyone saw them): the instance table, written off the request path, can lag
    /// it by a commit, and a restart count must never go back after a crash.
    pub(crate) fn restarts_in_log(&self) -> HashMap<InstanceId, u32> {
        use bulkhead_core::event::EventKind as K;
        let (history, _) = self.events.subscribe(0);
        let mut n: HashMap<InstanceId, u32> = HashMap::new();
        for e in &history {
            match e.kind {
                K::Launched => {
                    n.insert(e.instance.clone(), 0);
                }
                K::Restarting { .. } => *n.entry(e.instance.clone()).or_default() += 1,
                _ => {}
            }
        }
        n
    }

    /// Stops again an adopted instance that was stopping when the last daemon ended: its
    /// signal again, and SIGKILL when what is left of the grace it was given (`grace`,
    /// since `since_ms`) runs out.
    pub(crate) fn resume_stop(&self, id: &InstanceId, since_ms: u64, grace: Duration) {
        let Some(slot) = self.get(id) else { return };
        let elapsed = Duration::from_millis(crate::events::now_ms().saturating_sub(since_ms));
        let left = grace.saturating_sub(elapsed);
        tracing::warn!(
            "{id} was stopping when the last daemon ended; stopping it again (SIGKILL after {} ms)",
            left.as_millis()
        );
        slot.terminate(Some(left));
    }

    pub async fn terminate(&self, id: &InstanceId, grace: Option<Duration>) -> Option<View> {
        let slot = self.get(id)?;
        let mut rx = slot.subscribe();
        slot.terminate(grace);
        let v = rx
            .wait_for(|v| v.state.is_terminal())
            .await
            .map(|v| v.clone());
        Some(v.unwrap_or_else(|_| slot.view()))
    }

    /// Terminates, concurrently, every live instance for which `pick` is true; returns
    /// them once all are gone.
    ///
    /// Dependents go before their dependencies (`depends_on`): the picked instances are
    /// stopped in reverse topological layers, each layer concurrently.
    pub async fn terminate_where(
        &self,
        grace: Option<Duration>,
        pick: impl Fn(&Slot) -> bool,
    ) -> Vec<View> {
        let picked: HashMap<InstanceId, Arc<Slot>> = self
            .list()
            .into_iter()
            .filter(|s| !s.view.borrow().state.is_terminal() && pick(s))
            .map(|s| (s.id.clone(), s))
            .collect();
        let graph: std::collections::BTreeMap<InstanceId, Vec<InstanceId>> = self
            .instance_graph()
            .into_iter()
            .filter(|(id, _)| picked.contains_key(id))
            .collect();
        let mut out = Vec::new();
        for layer in bulkhead_core::deps::teardown_layers(&graph) {
            let slots = layer.iter().filter_map(|id| picked.get(id).cloned());
            out.extend(terminate_concurrently(slots, grace).await);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Every instance in the registry -> the instances it depends on that are in the
    /// registry (from the spec it was launched with; see [`Shared::dependency_ids`]).
    pub(crate) fn instance_graph(&self) -> std::collections::BTreeMap<InstanceId, Vec<InstanceId>> {
        let reg = self.lock_registry();
        reg.values()
            .map(|s| {
                let deps = Self::dependency_ids(&s.key, &s.spec())
                    .into_iter()
                    .filter(|d| reg.contains_key(d))
                    .collect();
                (s.id.clone(), deps)
            })
            .collect()
    }

    /// The ids the dependencies of an instance of `key` with `spec` can have: for each
    /// name in `depends_on`, the same scope's and the shared one (the dependency's
    /// isolation may have changed since it was launched; only ids in the registry count).
    pub(crate) fn dependency_ids(
        key: &Key,
        spec: &bulkhead_core::spec::WorkloadSpec,
    ) -> Vec<InstanceId> {
        use bulkhead_core::key::Isolation;
        let mut out = Vec::new();
        for name in spec.depends_on.names() {
            for iso in [key.isolation(), Isolation::None] {
                if let Ok(k) = bulkhead_core::deps::dependency_key(key, name, iso) {
                    let id = k.instance_id();
                    if !out.contains(&id) {
                        out.push(id);
                    }
                }
            }
        }
        out
    }

    /// Terminates `id`, then its dependencies (transitively, dependents first, each layer
    /// concurrently) that no other live instance depends on and that `may` allows (the
    /// caller's rights). Returns the instance and the dependencies it stopped.
    pub async fn terminate_with_dependencies(
        &self,
        id: &InstanceId,
        grace: Option<Duration>,
        may: impl Fn(&InstanceId) -> bool,
    ) -> Option<(View, Vec<View>)> {
        let view = self.terminate(id, grace).await?;
        let graph = self.instance_graph();
        let below = bulkhead_core::deps::closure(&graph, id);
        let sub: std::collections::BTreeMap<InstanceId, Vec<InstanceId>> = graph
            .iter()
            .filter(|(n, _)| below.contains(*n))
            .map(|(n, d)| (n.clone(), d.clone()))
            .collect();
        let mut stopped = Vec::new();
        for layer in bulkhead_core::deps::teardown_layers(&sub) {
            // Who still depends on what, now (the previous layer is gone).
            let graph = self.instance_graph();
            let live = |n: &InstanceId| {
                self.get(n)
                    .is_some_and(|s| !s.view.borrow().state.is_terminal())
            };
            let slots: Vec<Arc<Slot>> = layer
                .iter()
                .filter(|n| live(n) && may(n))
                .filter(|n| {
                    !graph
                        .iter()
                        .any(|(other, deps)| deps.contains(n) && live(other))
                })
                .filter_map(|n| self.get(n))
                .collect();
            stopped.extend(terminate_concurrently(slots.into_iter(), grace).await);
        }
        stopped.sort_by(|a, b| a.id.cmp(&b.id));
        Some((view, stopped))
    }

    /// Ends a session: terminates every instance launched for it.
    pub async fn end_session(&self, session: &str, grace: Option<Duration>) -> Vec<View> {
        // Shared docker containers are not the session's instances, but the session holds
        // a lease on those it launched: it goes with the session.
        for slot in self.list() {
            if slot.spec().shared_instance() && slot.view().leases.iter().any(|l| l == session) {
                slot.release(session);
            }
        }
        self.terminate_where(grace, |s| s.key.session() == Some(session))
            .await
    }

    /// Ends a namespace: terminates every instance launched for it.
    pub async fn end_namespace(&self, namespace: &str, grace: Option<Duration>) -> Vec<View> {
        self.terminate_where(grace, |s| s.key.namespace() == Some(namespace))
            .await
    }

    /// Drops `holder`'s lease on an instance. `None` when there is no such instance.
    pub fn release(&self, id: &InstanceId, holder: &str) -> Option<(View, bool)> {
        let slot = self.get(id)?;
        let had = slot.release(holder);
        Some((slot.view(), had))
    }

    /// Stores an instance's lease holders before a release is acknowledged, so that the
    /// next daemon never brings a released lease back (the instance table is otherwise
    /// written off the request path). Waits at most `LEASES_DURABLE_WAIT`.
    pub async fn record_leases(&self, id: &InstanceId, leases: Vec<String>) -> Result<(), String> {
        let Some(t) = &self.instances else {
            return Ok(());
        };
        match tokio::time::timeout(LEASES_DURABLE_WAIT, t.set_leases(id.as_str(), leases)).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(format!(
                "the lease change on {id} took effect but is not stored yet: the state \
                 directory {} cannot be written now (it is written as soon as it can)",
                self.cfg.state_dir.display()
            )),
        }
    }

    /// Stops accepting launches and terminates every live instance, concurrently.
    pub async fn terminate_all(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        // A shutdown does not wait for a state directory that cannot be written.
        self.events.stop_waiting();
        self.terminate_where(None, |_| true).await;
    }

    /// SIGKILL to every process of every live instance (the end of the shutdown ladder).
    pub fn kill_all(&self) {
        for slot in self.list() {
            slot.kill();
        }
    }

    /// The keeper's spare slot (`None` without a keeper).
    pub fn process_spare(&self) -> Option<bulkhead_driver::keeper::spare::SpareStats> {
        self.keeper.as_ref().map(|k| k.spare_stats())
    }

    /// The notify socket bound ahead (`warm::spare_notify`), for a launch of `spec` that
    /// needs a file one.
    pub(crate) fn take_spare_notify(
        &self,
        spec: &bulkhead_core::spec::WorkloadSpec,
    ) -> Option<crate::readiness::NotifySocket> {
        if !instance::notify_file(spec) {
            return None;
        }
        self.notify_spare
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Whether the keeper's spare waits now (cheap).
    pub fn process_spare_ready(&self) -> bool {
        self.keeper.as_ref().is_some_and(|k| k.spare_ready())
    }

    pub fn live_count(&self) -> usize {
        self.lock_registry()
            .values()
            .filter(|s| !s.view.borrow().state.is_terminal())
            .count()
    }
}

/// Terminates `slots` concurrently; returns their final views once all are gone.
async fn terminate_concurrently(
    slots: impl Iterator<Item = Arc<Slot>>,
    grace: Option<Duration>,
) -> Vec<View> {
    let mut set = tokio::task::JoinSet::new();
    for slot in slots {
        if slot.view.borrow().state.is_terminal() {
            continue;
        }
        let mut rx = slot.subscribe();
        slot.terminate(grace);
        set.spawn(async move {
            let v = rx
                .wait_for(|v| v.state.is_terminal())
                .await
                .map(|v| v.clone());
            v.unwrap_or_else(|_| slot.view())
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(v) = r {
            out.push(v);
        }
    }
    out
}

/// Whether one more live instance for `key` fits under the daemon's limits. A session's
/// or a shared instance's key names no namespace: it counts toward `--max-instances` only.
fn admit(cfg: &Config, reg: &HashMap<InstanceId, Arc<Slot>>, key: &Key) -> Result<(), LaunchError> {
    let per_ns = cfg
        .max_instances_per_namespace
        .and_then(|limit| key.namespace().map(|ns| (ns, limit)));
    if cfg.max_instances.is_none() && per_ns.is_none() {
        return Ok(());
    }
    let (mut live, mut in_ns) = (0usize, 0usize);
    for s in reg.values() {
        if s.view.borrow().state.is_terminal() {
            continue;
        }
        live += 1;
        if per_ns.is_some_and(|(ns, _)| s.key.namespace() == Some(ns)) {
            in_ns += 1;
        }
    }
    if let Some(limit) = cfg.max_instances {
        if live >= limit {
            return Err(LaunchError::AtCapacity { limit });
        }
    }
    if let Some((ns, limit)) = per_ns {
        if in_ns >= limit {
            return Err(LaunchError::NamespaceAtCapacity {
                namespace: ns.to_owned(),
                limit,
            });
        }
    }
    Ok(())
}

/// How many lines of its stderr a failed launch reports.
pub const FAILURE_STDERR_LINES: usize = 5;

async fn wait_for(
    slot: &Slot,
    wait: WaitFor,
    deadline: Option<tokio::time::Instant>,
    timeout: Duration,
) -> Result<View, LaunchError> {
    // Some(Ok) = done, Some(Err) = failed, None = keep waiting.
    let judge = |v: &View| -> Option<Result<(), String>> {
        let failed = || {
            Err(v.failure.clone().unwrap_or_else(|| match v.last_exit {
                Some(st) => format!(
                    "instance ended ({}, {st}) before it was ready",
                    v.state.as_str()
                ),
                None => format!("instance is {} and will not become ready", v.state.as_str()),
            }))
        };
        // Between runs: an open breaker fails fast; a pending restart is waited for.
        if v.state == State::Restarting {
            return match (wait, v.breaker) {
                (WaitFor::Nothing, _) => Some(Ok(())),
                (_, bulkhead_core::restart::BreakerState::Open) => Some(failed()),
                _ => None,
            };
        }
        match wait {
            WaitFor::Nothing => Some(Ok(())),
            WaitFor::Started if v.started => Some(Ok(())),
            WaitFor::Started if v.failure.is_some() || v.state.is_terminal() => Some(failed()),
            WaitFor::Started => None,
            WaitFor::Ready if v.ready => Some(Ok(())),
            WaitFor::Ready
                if v.failure.is_some() || v.state.is_terminal() || v.state == State::Stopping =>
            {
                Some(failed())
            }
            WaitFor::Ready => None,
        }
    };
    let mut rx = slot.subscribe();
    let fut = rx.wait_for(|v| judge(v).is_some());
    let result = match deadline {
        Some(d) => match tokio::time::timeout_at(d, fut).await {
            Ok(r) => r.map(|v| v.clone()),
            Err(_) => {
                let v = slot.view();
                return Err(LaunchError::Timeout {
                    id: slot.id.clone(),
                    what: if wait == WaitFor::Ready {
                        "ready"
                    } else {
                        "started"
                    },
                    waited: timeout,
                    state: v.state.as_str(),
                });
            }
        },
        None => fut.await.map(|v| v.clone()),
    };
    let view = result.unwrap_or_else(|_| slot.view());
    match judge(&view) {
        Some(Err(reason)) => Err(failed_with_stderr(slot, reason).await),
        _ => Ok(view),
    }
}

/// [`LaunchError::Failed`] for `slot`, with the last lines of its stderr.
pub(crate) async fn failed_with_stderr(slot: &Slot, mut reason: String) -> LaunchError {
    // The program's last words say why, more often than its exit code: the end of
    // what it wrote to stderr (once its output has ended, bounded).
    slot.log
        .output_ended(std::time::Duration::from_millis(500))
        .await;
    let tail = slot.log.stderr_tail(FAILURE_STDERR_LINES);
    if !tail.is_empty() {
        reason.push_str("; the last lines of its stderr:");
        for l in tail {
            reason.push_str("\n  ");
            reason.push_str(&l);
        }
    }
    LaunchError::Failed {
        id: slot.id.clone(),
        reason,
    }
}
