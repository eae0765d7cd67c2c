//! Prometheus metrics, derived from the event stream and, at scrape time, the registry.
//!
//! Two sources, on purpose:
//!
//! - **Counters and histograms follow the event log.** [`Metrics::start`] runs one task
//!   subscribed to [`crate::events::EventLog`] and [`Metrics::observe`] turns each event
//!   published from then on into counter increments (the daemon starts it before anything
//!   can publish; the history a durable log keeps from earlier runs only sets the breaker
//!   state, so counters start at zero with the process, as Prometheus expects):
//!   starts, exits by class, crashes by signal, restarts, events by kind, the breaker
//!   state of each instance, the launch -> ready histogram (`launched` to `ready` of the
//!   same instance, from the events' own timestamps) and the delivery lag (now minus the
//!   event's time when the task receives it). Only launches are counted from the call
//!   site ([`Metrics::record_launch`]): a reuse produces no event.
//! - **Gauges are computed when scraped** ([`Metrics::encode`]) from the registry:
//!   instances by state, running instances by workload and isolation, and per-instance
//!   CPU seconds and resident memory from the driver. A fresh registry is built for every
//!   scrape, so an instance that is gone leaves no stale series behind.
//!
//! Limits: event times have millisecond resolution, so launch -> ready durations below
//! 1 ms land in the first buckets; a restarted run has no `launched` event and is not in
//! that histogram. A subscriber that falls behind the broadcast channel resubscribes from
//! the last id it saw; events that the log no longer keeps by then are counted in
//! `bulkhead_events_missed_total`, not replayed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};

use bulkhead_core::event::{Event, EventKind};
use bulkhead_core::instance::State;
use bulkhead_core::key::{InstanceId, Isolation};
use bulkhead_core::restart::BreakerState;
use bulkhead_core::signal::Signal;
use bulkhead_driver::keeper::spare::SpareStats;
use bulkhead_driver::Stats;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

use crate::Shared;

/// The prefix of every metric name.
pub const PREFIX: &str = "bulkhead";

/// The content type of [`Metrics::encode`]'s output (OpenMetrics text).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The content type of [`to_text_format`]'s output (Prometheus' classic text format).
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a scrape's `Accept` header asks for OpenMetrics (Prometheus' own scrapes do);
/// any other client (curl, `promtool check metrics`, older scrapers) gets the classic
/// text format, as client_golang negotiates.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

/// OpenMetrics text (what `prometheus-client` encodes, the only format it has) as the
/// classic Prometheus text format 0.0.4: a counter family's `HELP`/`TYPE` name its
/// samples' `_total` name, and `UNIT` and `# EOF` go (the classic format has neither).
/// The other families this daemon registers (gauges, histograms) are written the same in
/// both formats.
pub fn to_text_format(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // A family's HELP comes before its TYPE: held until the TYPE says whether it counts.
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some(h) = help.replace(rest) {
                out.push_str("# HELP ");
                out.push_str(h);
                out.push('\n');
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "unknown" => (name.to_owned(), "untyped"),
                k => (name.to_owned(), k),
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Launch -> ready buckets: 0.5 ms doubling to about 65 s.
fn ready_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0005, 2.0, 18)
}

/// Event delivery lag buckets, in seconds.
const LAG_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Metrics could not be encoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode metrics: {0}")]
pub struct EncodeError(#[from] std::fmt::Error);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SignalLabel {
    signal: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkloadIsolation {
    workload: String,
    isolation: &'static str,
}

/// An instance's series. The label is `id`, not `instance`: Prometheus sets `instance`
/// on every scraped series to the target's address (ours would arrive renamed
/// `exported_instance`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    id: String,
    workload: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkloadLabel {
    workload: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

/// The breaker gauge's value: 0 closed, 1 half-open, 2 open.
pub fn breaker_value(b: BreakerState) -> i64 {
    match b {
        BreakerState::Closed => 0,
        BreakerState::HalfOpen => 1,
        BreakerState::Open => 2,
    }
}

/// What a scrape reads of one instance in the registry.
#[derive(Debug, Clone)]
pub struct InstanceSample {
    pub id: InstanceId,
    pub workload: String,
    pub isolation: Isolation,
    pub state: State,
    /// Ready now (its readiness passed and holds).
    pub ready: bool,
    /// Usage, for a live instance whose driver reports it.
    pub stats: Option<Stats>,
}

/// The class of an exit code, a low-cardinality label (shell conventions).
pub fn exit_class(code: i32) -> &'static str {
    match code {
        0 => "success",
        1..=125 => "error",
        126 => "not_executable",
        127 => "not_found",
        // A shell reports a child killed by signal n as 128 + n.
        128..=255 => "signal_exit",
        _ => "other",
    }
}

fn signal_name(signal: i32) -> String {
    Signal::from_number(signal)
        .map(Signal::name)
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The daemon's metrics. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    launches: Family<ResultLabel, Counter>,
    starts: Counter,
    exits: Family<ReasonLabel, Counter>,
    crashes: Family<SignalLabel, Counter>,
    restarts: Family<WorkloadLabel, Counter>,
    events: Family<KindLabel, Counter>,
    events_missed: Counter,
    launch_ready: Histogram,
    delivery_lag: Histogram,
    warm_launches: Family<WarmLabel, Counter>,
    warm_slots: Family<WorkloadLabel, Gauge>,
    warm_memory: Gauge,
    state: Mutex<EventState>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WarmLabel {
    workload: String,
    result: &'static str,
}

/// What the counters need to remember between events.
#[derive(Default)]
struct EventState {
    /// `launched` time of instances not ready yet.
    launched_ms: HashMap<InstanceId, u64>,
    breakers: BTreeMap<InstanceId, BreakerState>,
    /// The id of the last event observed.
    last_id: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix(PREFIX);
        let launches = Family::<ResultLabel, Counter>::default();
        registry.register(
            "launches",
            "Launch requests by result: created (a new instance), reused (the live instance of the key), failed",
            launches.clone(),
        );
        // Zero series for every result, so rates work from the first scrape.
        for result in ["created", "reused", "failed"] {
            let _ = launches.get_or_create(&ResultLabel { result });
        }
        let starts = Counter::default();
        registry.register(
            "starts",
            "Processes started (started events)",
            starts.clone(),
        );
        let exits = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "exits",
            "Processes that exited by themselves, by exit-code class (success, error, not_executable, not_found, signal_exit, other)",
            exits.clone(),
        );
        let crashes = Family::<SignalLabel, Counter>::default();
        registry.register(
            "crashes",
            "Processes killed by a signal they did not get from a termination, by signal name",
            crashes.clone(),
        );
        let restarts = Family::<WorkloadLabel, Counter>::default();
        registry.register(
            "restarts",
            "Restarts by the restart policy (restarting events), by workload",
            restarts.clone(),
        );
        let events = Family::<KindLabel, Counter>::default();
        registry.register("events", "Events by kind", events.clone());
        let events_missed = Counter::default();
        registry.register(
            "events_missed",
            "Events the metrics subscriber could not see (it fell behind the kept history)",
            events_missed.clone(),
        );
        let launch_ready = Histogram::new(ready_buckets());
        registry.register_with_unit(
            "launch_ready_duration",
            "Time from the launched event to the ready event of the same instance",
            Unit::Seconds,
            launch_ready.clone(),
        );
        let delivery_lag = Histogram::new(LAG_BUCKETS);
        registry.register_with_unit(
            "event_delivery_lag",
            "Time from an event's publication to its delivery to a subscriber",
            Unit::Seconds,
            delivery_lag.clone(),
        );
        let warm_launches = Family::<WarmLabel, Counter>::default();
        registry.register(
            "warm_launches",
            "Spawns of workloads with warm: by result: hit (from a warm slot), miss (cold)",
            warm_launches.clone(),
        );
        let warm_slots = Family::<WorkloadLabel, Gauge>::default();
        registry.register(
            "warm_slots",
            "Warm slots ready for any new key, by workload",
            warm_slots.clone(),
        );
        let warm_memory = Gauge::default();
        registry.register_with_unit(
            "warm_memory",
            "Memory the ready warm slots hold together (the --warm-memory budget bounds it)",
            Unit::Bytes,
            warm_memory.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                launches,
                starts,
                exits,
                crashes,
                restarts,
                events,
                events_missed,
                launch_ready,
                delivery_lag,
                warm_launches,
                warm_slots,
                warm_memory,
                state: Mutex::new(EventState::default()),
            }),
        }
    }

    /// A spawn of a workload with `warm:`: from a slot (`hit`) or cold.
    pub(crate) fn warm_launch(&self, workload: &str, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.inner
            .warm_launches
            .get_or_create(&WarmLabel {
                workload: workload.to_owned(),
                result,
            })
            .inc();
    }

    /// The pools now: ready slots and their memory, by workload.
    pub(crate) fn warm_slots(&self, pools: &std::collections::BTreeMap<String, (usize, u64)>) {
        self.inner.warm_slots.clear();
        for (w, (n, _)) in pools {
            self.inner
                .warm_slots
                .get_or_create(&WorkloadLabel {
                    workload: w.clone(),
                })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        let bytes: u64 = pools.values().map(|(_, b)| *b).sum();
        self.inner
            .warm_memory
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    fn state(&self) -> std::sync::MutexGuard<'_, EventState> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a launch request; `result` is `created`, `reused` or `failed`.
    pub fn record_launch(&self, result: &str) {
        let result = match result {
            "created" => "created",
            "reused" => "reused",
            _ => "failed",
        };
        self.inner
            .launches
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Starts the task that follows the event log. Events published from now on are
    /// counted; the history the log already holds (a durable log keeps earlier runs')
    /// only sets the state it implies (breakers), so counters start at zero with the
    /// process, as Prometheus expects. The task ends when the log is dropped; abort the
    /// handle to stop it sooner.
    pub fn start(&self, sh: &Arc<Shared>) -> JoinHandle<()> {
        let since = self.state().last_id;
        let (history, rx) = sh.events.subscribe(since);
        self.seed(&history);
        let me = self.clone();
        let weak = Arc::downgrade(sh);
        tokio::spawn(me.follow(rx, weak))
    }

    /// Takes in events from before [`Metrics::start`]: state only, no counts.
    pub fn seed(&self, history: &[Event]) {
        for e in history {
            self.apply(e, 0, false);
        }
    }

    async fn follow(self, mut rx: tokio::sync::broadcast::Receiver<Event>, sh: Weak<Shared>) {
        loop {
            match rx.recv().await {
                Ok(e) => self.observe(&e, crate::events::now_ms()),
                Err(RecvError::Lagged(n)) => {
                    let Some(sh) = sh.upgrade() else { return };
                    let last = self.state().last_id;
                    tracing::debug!("metrics: {n} events behind; resubscribing after id {last}");
                    // History and the new receiver are taken together: no gap, no
                    // duplicate. Ids the log no longer keeps are counted as missed.
                    let (history, fresh) = sh.events.subscribe(last);
                    rx = fresh;
                    self.observe_all(&history);
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    fn observe_all(&self, events: &[Event]) {
        let now = crate::events::now_ms();
        for e in events {
            self.observe(e, now);
        }
    }

    /// Accounts for one event, received at `now_ms`. Events at or before the last id seen
    /// are ignored, so a replay counts nothing twice.
    pub fn observe(&self, e: &Event, now_ms: u64) {
        self.apply(e, now_ms, true);
    }

    /// Updates the state an event implies and, if `count`, the counters.
    fn apply(&self, e: &Event, now_ms: u64, count: bool) {
        let mut st = self.state();
        if e.id <= st.last_id {
            return;
        }
        let missed = if st.last_id == 0 {
            0
        } else {
            e.id - st.last_id - 1
        };
        st.last_id = e.id;
        // The state first: kept also for events that are not counted.
        let mut launch_ready_ms = None;
        match &e.kind {
            EventKind::Launched => {
                st.launched_ms.insert(e.instance.clone(), e.time_ms);
            }
            EventKind::Ready => {
                launch_ready_ms = st
                    .launched_ms
                    .remove(&e.instance)
                    .map(|t| e.time_ms.saturating_sub(t));
            }
            EventKind::Exited { .. }
            | EventKind::Crashed { .. }
            | EventKind::OomKilled { .. }
            | EventKind::Restarting { .. }
            | EventKind::LaunchFailed { .. }
            | EventKind::Terminated { .. } => {
                st.launched_ms.remove(&e.instance);
            }
            EventKind::BreakerOpen { .. } => {
                st.breakers.insert(e.instance.clone(), BreakerState::Open);
            }
            EventKind::BreakerHalfOpen => {
                st.breakers
                    .insert(e.instance.clone(), BreakerState::HalfOpen);
            }
            EventKind::BreakerClosed => {
                st.breakers.insert(e.instance.clone(), BreakerState::Closed);
            }
            EventKind::Started { .. }
            | EventKind::Adopted { .. }
            | EventKind::Lost { .. }
            | EventKind::ChannelPeerDead { .. }
            | EventKind::DependenciesReady { .. }
            | EventKind::DependencyRestarted { .. }
            | EventKind::Terminating { .. }
            | EventKind::Unhealthy { .. }
            | EventKind::LivenessFailed { .. }
            | EventKind::WatchdogTimeout { .. }
            | EventKind::RestartRequested { .. } => {}
        }
        if !count {
            return;
        }
        // Counted under the state lock, so a reader that sees `last_id` sees its counts.
        let i = &self.inner;
        if missed > 0 {
            i.events_missed.inc_by(missed);
        }
        i.delivery_lag
            .observe(now_ms.saturating_sub(e.time_ms) as f64 / 1000.0);
        i.events
            .get_or_create(&KindLabel {
                kind: e.kind.name(),
            })
            .inc();
        if let Some(ms) = launch_ready_ms {
            i.launch_ready.observe(ms as f64 / 1000.0);
        }
        match &e.kind {
            EventKind::Started { .. } => {
                i.starts.inc();
            }
            EventKind::Exited { exit_code } => {
                i.exits
                    .get_or_create(&ReasonLabel {
                        reason: exit_class(*exit_code),
                    })
                    .inc();
            }
            EventKind::Crashed { signal, .. } => {
                i.crashes
                    .get_or_create(&SignalLabel {
                        signal: signal_name(*signal),
                    })
                    .inc();
            }
            EventKind::Restarting { .. } => {
                let workload = InstanceId::parse(e.instance.as_str())
                    .map(|(_, k)| k.workload().to_owned())
                    .unwrap_or_default();
                i.restarts.get_or_create(&WorkloadLabel { workload }).inc();
            }
            _ => {}
        }
        drop(st);
    }

    /// Breaker states seen in events, by instance.
    pub fn breakers(&self) -> Vec<(InstanceId, BreakerState)> {
        self.state()
            .breakers
            .iter()
            .map(|(id, b)| (id.clone(), *b))
            .collect()
    }

    /// The id of the last event observed (0 if none).
    pub fn last_event_id(&self) -> u64 {
        self.state().last_id
    }

    /// The exposition: the event-driven metrics, then gauges read from the registry now.
    /// Reads `/proc` for every live instance: call it off the async reactor.
    pub fn encode(&self, sh: &Shared) -> Result<String, EncodeError> {
        let instances: Vec<InstanceSample> = sh
            .list()
            .into_iter()
            .map(|slot| {
                let v = slot.view();
                let live = !v.state.is_terminal();
                InstanceSample {
                    id: v.id,
                    workload: v.workload,
                    isolation: v.isolation,
                    state: v.state,
                    ready: v.ready && v.state == State::Ready,
                    stats: if live { slot.stats() } else { None },
                }
            })
            .collect();
        let spare = sh
            .keeper
            .as_ref()
            .map(|k| (k.spare_stats(), k.spare_memory()));
        self.encode_parts(&instances, spare)
    }

    /// [`Metrics::encode`] with the registry's contents given.
    pub fn encode_with(&self, instances: &[InstanceSample]) -> Result<String, EncodeError> {
        self.encode_parts(instances, None)
    }

    fn encode_parts(
        &self,
        instances: &[InstanceSample],
        spare: Option<(SpareStats, u64)>,
    ) -> Result<String, EncodeError> {
        let mut out = String::with_capacity(8 * 1024);
        encode_registry(&mut out, &self.inner.registry)?;
        encode_registry(&mut out, &self.snapshot(instances))?;
        if let Some(s) = spare.filter(|(s, _)| s.on) {
            encode_registry(&mut out, &spare_registry(s))?;
        }
        encode_registry(&mut out, &process_registry())?;
        encode_eof(&mut out)?;
        Ok(out)
    }

    /// The scrape-time gauges, in a registry made for this scrape.
    fn snapshot(&self, instances: &[InstanceSample]) -> Registry {
        let mut reg = Registry::with_prefix(PREFIX);

        let by_state = Family::<StateLabel, Gauge>::default();
        for st in State::ALL {
            let _ = by_state.get_or_create(&StateLabel { state: st.as_str() });
        }
        let running = Family::<WorkloadIsolation, Gauge>::default();
        let cpu = Family::<InstanceLabels, Counter<f64>>::default();
        let rss = Family::<InstanceLabels, Gauge>::default();
        // From a sandbox instance's cgroup (absent for drivers that cannot tell).
        let peak = Family::<InstanceLabels, Gauge>::default();
        let throttled = Family::<InstanceLabels, Counter<f64>>::default();
        let pids = Family::<InstanceLabels, Gauge>::default();
        let pids_hits = Family::<InstanceLabels, Counter>::default();
        let ready = Family::<InstanceLabels, Gauge>::default();
        for v in instances {
            by_state
                .get_or_create(&StateLabel {
                    state: v.state.as_str(),
                })
                .inc();
            if v.state.is_terminal() {
                continue;
            }
            running
                .get_or_create(&WorkloadIsolation {
                    workload: v.workload.clone(),
                    isolation: v.isolation.as_str(),
                })
                .inc();
            ready
                .get_or_create(&InstanceLabels {
                    id: v.id.to_string(),
                    workload: v.workload.clone(),
                })
                .set(i64::from(v.ready));
            if let Some(s) = &v.stats {
                let labels = InstanceLabels {
                    id: v.id.to_string(),
                    workload: v.workload.clone(),
                };
                cpu.get_or_create(&labels).inc_by(s.cpu_seconds);
                rss.get_or_create(&labels)
                    .set(i64::try_from(s.memory_bytes).unwrap_or(i64::MAX));
                pids.get_or_create(&labels).set(i64::from(s.pids));
                if let Some(p) = s.memory_peak_bytes {
                    peak.get_or_create(&labels)
                        .set(i64::try_from(p).unwrap_or(i64::MAX));
                }
                if let Some(t) = s.cpu_throttled_seconds {
                    throttled.get_or_create(&labels).inc_by(t);
                }
                if let Some(h) = s.pids_limit_hits {
                    pids_hits.get_or_create(&labels).inc_by(h);
                }
            }
        }
        let breaker = Family::<InstanceLabels, Gauge>::default();
        for (id, b) in self.breakers() {
            let workload = InstanceId::parse(id.as_str())
                .map(|(_, k)| k.workload().to_owned())
                .unwrap_or_default();
            breaker
                .get_or_create(&InstanceLabels {
                    id: id.to_string(),
                    workload,
                })
                .set(breaker_value(b));
        }
        let build = Family::<VersionLabel, Gauge>::default();
        build
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        reg.register(
            "build_info",
            "The running daemon's version (always 1)",
            build,
        );
        reg.register(
            "instance_ready",
            "Whether a live instance is ready now: 1 ready, 0 not (starting, unhealthy, stopping, restarting)",
            ready,
        );

        reg.register("instances", "Instances in the registry by state", by_state);
        reg.register(
            "instances_running",
            "Live instances (in a state that is not terminal) by workload and isolation",
            running,
        );
        reg.register(
            "breaker_state",
            "Circuit breaker of an instance: 0 closed, 1 half-open, 2 open",
            breaker,
        );
        reg.register_with_unit(
            "instance_cpu",
            "CPU time (user + system) used by a live instance",
            Unit::Seconds,
            cpu,
        );
        reg.register_with_unit(
            "instance_resident_memory",
            "Resident memory of a live instance's processes",
            Unit::Bytes,
            rss,
        );
        reg.register_with_unit(
            "instance_memory_peak",
            "The most memory a live instance has used (its cgroup's peak)",
            Unit::Bytes,
            peak,
        );
        reg.register_with_unit(
            "instance_cpu_throttled",
            "Time a live instance was held back by its CPU limit (cgroup cpu.stat)",
            Unit::Seconds,
            throttled,
        );
        reg.register(
            "instance_pids",
            "Live processes (and threads, for cgroups) of a live instance",
            pids,
        );
        reg.register(
            "instance_pids_limit_hits",
            "Forks a live instance was refused at its pids limit (pids.events max)",
            pids_hits,
        );
        reg
    }
}

/// The keeper's spare slot (`bulkhead_driver::keeper::spare`), read at the scrape.
fn spare_registry((s, bytes): (SpareStats, u64)) -> Registry {
    let mut reg = Registry::with_prefix(PREFIX);
    let ready = Gauge::<i64>::default();
    ready.set(i64::from(s.ready));
    reg.register(
        "process_spare_ready",
        "1 while the keeper's spare slot waits for the next process launch",
        ready,
    );
    let memory = Gauge::<i64>::default();
    memory.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    reg.register_with_unit(
        "process_spare_memory",
        "Memory the waiting spare slot holds (its share of the pages it maps)",
        Unit::Bytes,
        memory,
    );
    reg.register(
        "process_spare_launches",
        "Process launches that took the spare slot",
        ConstCounter::new(s.taken),
    );
    reg.register(
        "process_spares_made",
        "Spare slots made",
        ConstCounter::new(s.made),
    );
    reg
}

/// The daemon's own process, under the names every Prometheus client library uses
/// (`process_*`, no prefix), read from `/proc/self` at the scrape.
fn process_registry() -> Registry {
    use std::sync::atomic::AtomicU64;
    let mut reg = Registry::default();
    let me = std::process::id();
    // SAFETY: sysconf has no preconditions.
    let ticks = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        t if t > 0 => t as f64,
        _ => 100.0,
    };
    if let Ok(st) = bulkhead_driver::sys::read_stat(me) {
        let cpu = Counter::<f64, AtomicU64>::default();
        cpu.inc_by((st.utime + st.stime) as f64 / ticks);
        reg.register_with_unit(
            "process_cpu",
            "Total user and system CPU time of the daemon",
            Unit::Seconds,
            cpu,
        );
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        if let Some(boot) = boot {
            let start = Gauge::<f64, AtomicU64>::default();
            start.set(boot + st.starttime as f64 / ticks);
            reg.register_with_unit(
                "process_start_time",
                "Start time of the daemon since the Unix epoch",
                Unit::Seconds,
                start,
            );
        }
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<i64>().ok())
    };
    if let Some(rss) = kib("VmRSS:") {
        let g = Gauge::<i64>::default();
        g.set(rss * 1024);
        reg.register_with_unit(
            "process_resident_memory",
            "Resident memory of the daemon",
            Unit::Bytes,
            g,
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let g = Gauge::<i64>::default();
        g.set(fds.count() as i64);
        reg.register("process_open_fds", "Open descriptors of the daemon", g);
    }
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    if let Some(l) = limit {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(l).unwrap_or(i64::MAX));
        reg.register("process_max_fds", "The daemon's open-file limit", g);
    }
    reg
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_core::event::ExitStatus;

    fn id(s: &str) -> InstanceId {
        InstanceId::parse(s).unwrap().0
    }

    struct Feed {
        m: Metrics,
        next: u64,
    }

    impl Feed {
        fn new() -> Feed {
            Feed {
                m: Metrics::new(),
                next: 1,
            }
        }
        fn at(&mut self, time_ms: u64, inst: &str, kind: EventKind) {
            let e = Event {
                id: self.next,
                time_ms,
                instance: id(inst),
                kind,
            };
            self.next += 1;
            self.m.observe(&e, time_ms);
        }
    }

    /// Parses the exposition into `name{labels} -> value`, labels as written.
    fn samples(text: &str) -> HashMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').unwrap();
                (k.to_owned(), v.parse().unwrap())
            })
            .collect()
    }

    fn sample(inst: &str, state: State, stats: Option<Stats>) -> InstanceSample {
        let (id, key) = InstanceId::parse(inst).unwrap();
        InstanceSample {
            id,
            workload: key.workload().to_owned(),
            isolation: key.isolation(),
            ready: state == State::Ready,
            state,
            stats,
        }
    }

    #[test]
    fn a_sequence_of_events_gives_the_counters() {
        let mut f = Feed::new();
        let a = "ns:a:web";
        let b = "ns:b:web";
        f.at(1000, a, EventKind::Launched);
        f.at(1001, a, EventKind::Started { pid: Some(10) });
        f.at(1003, b, EventKind::Launched);
        f.at(1004, b, EventKind::Started { pid: Some(11) });
        f.at(1010, a, EventKind::Ready);
        f.at(2003, b, EventKind::Ready);
        f.at(
            3000,
            a,
            EventKind::Crashed {
                signal: 11,
                core_dumped: true,
            },
        );
        f.at(
            3001,
            a,
            EventKind::Restarting {
                attempt: 1,
                delay_ms: 100,
            },
        );
        f.at(3101, a, EventKind::Started { pid: Some(12) });
        f.at(3102, a, EventKind::Ready);
        f.at(4000, b, EventKind::Exited { exit_code: 0 });
        f.at(4001, a, EventKind::Exited { exit_code: 3 });
        f.at(4002, a, EventKind::Exited { exit_code: 127 });
        f.at(
            5000,
            b,
            EventKind::BreakerOpen {
                failures: 3,
                reason: "x".into(),
            },
        );
        f.m.record_launch("created");
        f.m.record_launch("created");
        f.m.record_launch("reused");

        let s = samples(&f.m.encode_with(&[]).unwrap());
        assert_eq!(s["bulkhead_launches_total{result=\"created\"}"], 2.0);
        assert_eq!(s["bulkhead_launches_total{result=\"reused\"}"], 1.0);
        assert_eq!(s["bulkhead_launches_total{result=\"failed\"}"], 0.0);
        assert_eq!(s["bulkhead_starts_total"], 3.0);
        assert_eq!(s["bulkhead_restarts_total{workload=\"web\"}"], 1.0);
        let build = format!(
            "bulkhead_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(s[&build], 1.0);
        assert!(s["process_resident_memory_bytes"] > 0.0);
        assert!(s["process_open_fds"] > 0.0);
        assert!(s.contains_key("process_cpu_seconds_total"));
        assert!(s["process_start_time_seconds"] > 1.6e9);
        assert_eq!(s["bulkhead_crashes_total{signal=\"SIGSEGV\"}"], 1.0);
        assert_eq!(s["bulkhead_exits_total{reason=\"success\"}"], 1.0);
        assert_eq!(s["bulkhead_exits_total{reason=\"error\"}"], 1.0);
        assert_eq!(s["bulkhead_exits_total{reason=\"not_found\"}"], 1.0);
        assert_eq!(s["bulkhead_events_total{kind=\"started\"}"], 3.0);
        assert_eq!(s["bulkhead_events_total{kind=\"ready\"}"], 3.0);
        assert_eq!(s["bulkhead_events_total{kind=\"breaker_open\"}"], 1.0);
        assert_eq!(s["bulkhead_events_missed_total"], 0.0);
        assert_eq!(
            s["bulkhead_breaker_state{id=\"ns:b:web\",workload=\"web\"}"],
            2.0
        );
        // The restarted run of `a` has no launched event: two launch -> ready samples,
        // 10 ms and 1 s.
        assert_eq!(s["bulkhead_launch_ready_duration_seconds_count"], 2.0);
        assert!((s["bulkhead_launch_ready_duration_seconds_sum"] - 1.010).abs() < 1e-9);
        assert_eq!(
            s["bulkhead_launch_ready_duration_seconds_bucket{le=\"0.016\"}"],
            1.0
        );
        assert_eq!(
            s["bulkhead_launch_ready_duration_seconds_bucket{le=\"1.024\"}"],
            2.0
        );
        assert_eq!(
            s["bulkhead_launch_ready_duration_seconds_bucket{le=\"+Inf\"}"],
            2.0
        );
    }

    #[test]
    fn breaker_events_move_the_gauge() {
        let mut f = Feed::new();
        let a = "shared:db";
        f.at(
            1,
            a,
            EventKind::BreakerOpen {
                failures: 5,
                reason: "crash loop".into(),
            },
        );
        assert_eq!(f.m.breakers(), vec![(id(a), BreakerState::Open)]);
        f.at(2, a, EventKind::BreakerHalfOpen);
        let s = samples(&f.m.encode_with(&[]).unwrap());
        assert_eq!(
            s["bulkhead_breaker_state{id=\"shared:db\",workload=\"db\"}"],
            1.0
        );
        f.at(3, a, EventKind::BreakerClosed);
        assert_eq!(f.m.breakers(), vec![(id(a), BreakerState::Closed)]);
    }

    #[test]
    fn replayed_events_count_once_and_gaps_count_as_missed() {
        let m = Metrics::new();
        let e = |n: u64| Event {
            id: n,
            time_ms: 10,
            instance: id("shared:w"),
            kind: EventKind::Started { pid: None },
        };
        m.observe(&e(1), 10);
        m.observe(&e(2), 10);
        m.observe(&e(2), 10);
        m.observe(&e(1), 10);
        m.observe(&e(6), 10);
        let s = samples(&m.encode_with(&[]).unwrap());
        assert_eq!(s["bulkhead_starts_total"], 3.0);
        assert_eq!(s["bulkhead_events_missed_total"], 3.0);
        assert_eq!(m.last_event_id(), 6);
    }

    #[test]
    fn delivery_lag_is_measured_from_the_event_time() {
        let m = Metrics::new();
        let e = Event {
            id: 1,
            time_ms: 1_000,
            instance: id("shared:w"),
            kind: EventKind::Terminated {
                status: Some(ExitStatus::Exited { code: 0 }),
            },
        };
        m.observe(&e, 1_200);
        let s = samples(&m.encode_with(&[]).unwrap());
        assert_eq!(s["bulkhead_event_delivery_lag_seconds_count"], 1.0);
        assert_eq!(
            s["bulkhead_event_delivery_lag_seconds_bucket{le=\"0.1\"}"],
            0.0
        );
        assert_eq!(
            s["bulkhead_event_delivery_lag_seconds_bucket{le=\"0.25\"}"],
            1.0
        );
    }

    #[test]
    fn scrape_time_gauges_come_from_the_registry() {
        let m = Metrics::new();
        let stats = Stats {
            cpu_seconds: 1.5,
            memory_bytes: 4096,
            pids: 1,
            ..Stats::default()
        };
        let instances = vec![
            sample("ns:a:web", State::Ready, Some(stats)),
            sample("ns:b:web", State::Starting, None),
            sample("shared:db", State::Crashed, None),
        ];
        let text = m.encode_with(&instances).unwrap();
        assert!(text.ends_with("# EOF\n"));
        let s = samples(&text);
        assert_eq!(s["bulkhead_instances{state=\"ready\"}"], 1.0);
        assert_eq!(s["bulkhead_instances{state=\"starting\"}"], 1.0);
        assert_eq!(s["bulkhead_instances{state=\"crashed\"}"], 1.0);
        assert_eq!(s["bulkhead_instances{state=\"terminated\"}"], 0.0);
        assert_eq!(
            s["bulkhead_instances_running{workload=\"web\",isolation=\"namespace\"}"],
            2.0
        );
        assert!(!text.contains("workload=\"db\",isolation"));
        let inst = "{id=\"ns:a:web\",workload=\"web\"}";
        assert_eq!(
            s[&format!("bulkhead_instance_cpu_seconds_total{inst}")],
            1.5
        );
        assert_eq!(
            s[&format!("bulkhead_instance_resident_memory_bytes{inst}")],
            4096.0
        );
    }

    #[test]
    fn exit_classes() {
        assert_eq!(exit_class(0), "success");
        assert_eq!(exit_class(42), "error");
        assert_eq!(exit_class(126), "not_executable");
        assert_eq!(exit_class(127), "not_found");
        assert_eq!(exit_class(137), "signal_exit");
        assert_eq!(exit_class(-1), "other");
        assert_eq!(signal_name(11), "SIGSEGV");
        assert_eq!(signal_name(99), "unknown");
    }

    #[tokio::test]
    async fn the_task_follows_the_log_and_catches_up_after_lagging() {
        let cfg = crate::Config::new(
            std::path::PathBuf::from("/nonexistent"),
            Some(std::path::PathBuf::from("/nonexistent/state")),
            None,
        );
        let sh = Arc::new(Shared::new(cfg, crate::events::EventLog::new(), None, None));
        let w = id("shared:w");
        // Before the start (a durable log's earlier runs): state, but no counts.
        sh.events.publish(
            &w,
            EventKind::BreakerOpen {
                failures: 3,
                reason: "x".into(),
            },
        );
        let m = Metrics::new();
        let task = m.start(&sh);
        // More than the broadcast channel holds, without yielding: the task lags.
        for _ in 0..6000 {
            sh.events.publish(&w, EventKind::Started { pid: None });
        }
        let last = sh.events.last_id();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while m.last_event_id() < last {
            assert!(
                tokio::time::Instant::now() < deadline,
                "metrics task stalled"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        task.abort();
        let s = samples(&m.encode_with(&[]).unwrap());
        assert_eq!(m.breakers(), vec![(w, BreakerState::Open)]);
        assert!(!s.contains_key("bulkhead_events_total{kind=\"breaker_open\"}"));
        assert_eq!(s["bulkhead_events_total{kind=\"started\"}"], 6000.0);
        assert_eq!(s["bulkhead_starts_total"], 6000.0);
        assert_eq!(s["bulkhead_events_missed_total"], 0.0);
    }
}

#[cfg(test)]
mod text_format_tests {
    #[test]
    fn openmetrics_counters_become_classic_total_families() {
        let om = "# HELP x_launches Launches.\n# TYPE x_launches counter\nx_launches_total{r=\"a\"} 1\n\
                  # HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n\
                  # HELP x_d Duration.\n# TYPE x_d histogram\n# UNIT x_d seconds\nx_d_sum 0.5\nx_d_count 1\nx_d_bucket{le=\"+Inf\"} 1\n\
                  # TYPE x_u unknown\nx_u 3\n# EOF\n";
        let text = super::to_text_format(om);
        assert_eq!(
            text,
            "# HELP x_launches_total Launches.\n# TYPE x_launches_total counter\nx_launches_total{r=\"a\"} 1\n\
             # HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n\
             # HELP x_d Duration.\n# TYPE x_d histogram\nx_d_sum 0.5\nx_d_count 1\nx_d_bucket{le=\"+Inf\"} 1\n\
             # TYPE x_u untyped\nx_u 3\n"
        );
        assert!(super::wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
        )));
        assert!(!super::wants_openmetrics(Some("*/*")));
        assert!(!super::wants_openmetrics(None));
    }
}
