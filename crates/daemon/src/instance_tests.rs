//! The instance actor against a fake driver, under paused time: every wait is a timer
//! of the actor's (backoff, cooldown, grace, idle), so the tests see exactly when the
//! actor acts, and no test depends on how fast the machine is.
//!
//! The actor runs in a real [`Shared`] (in-memory events, no instance table, no keeper,
//! no sandbox) whose process driver is replaced by [`FakeDriver`]: its runs exit when the
//! test says so, and it records every spawn and signal with the (paused) time it came.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bulkhead_core::event::{EventKind, ExitStatus};
use bulkhead_core::instance::State;
use bulkhead_core::key::{Isolation, Key};
use bulkhead_core::restart::BreakerState;
use bulkhead_core::signal::Signal;
use bulkhead_core::spec::DriverKind;
use bulkhead_driver::{
    Driver, InstanceHandle, SignalError, SpawnError, SpawnSpec, Spawned, Stats, StatsError,
};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use super::Slot;
use crate::Shared;

/// What the fake was asked to do.
#[derive(Debug, Clone, PartialEq)]
enum Call {
    /// A spawn that started run `n` (from 1).
    Spawn(usize),
    /// A signal to run `n`.
    Signal(usize, Signal),
}

/// Every call, in order, with the (paused) time it came.
type Calls = Arc<Mutex<Vec<(Instant, Call)>>>;

#[derive(Default)]
struct FakeDriver {
    calls: Calls,
    runs: Mutex<Vec<Arc<FakeRun>>>,
    /// The environment of each run.
    envs: Mutex<Vec<Vec<(String, String)>>>,
    /// Errors the next spawns return, in order.
    failures: Mutex<VecDeque<SpawnError>>,
    /// Whether a run ends at SIGTERM (else only SIGKILL ends it).
    obeys_term: AtomicBool,
    /// Whether its runs' readiness is their engine's (`engine_readiness`).
    engine: AtomicBool,
    /// How every run ends as soon as it is spawned, if set.
    ends_at_once: Mutex<Option<ExitStatus>>,
}

/// One run of the fake: a "process" that ends when the test (or a signal) says so.
struct FakeRun {
    n: usize,
    pid: u32,
    exit: watch::Sender<Option<ExitStatus>>,
    obeys_term: bool,
    calls: Calls,
    /// The engine's readiness of the run, when the driver has an engine.
    engine: Option<watch::Sender<bool>>,
}

impl FakeRun {
    /// The run's last process ends with `status` (the first end counts).
    fn end(&self, status: ExitStatus) {
        self.exit.send_if_modified(|s| {
            let first = s.is_none();
            if first {
                *s = Some(status);
            }
            first
        });
    }
}

impl FakeDriver {
    fn new(obeys_term: bool) -> Arc<FakeDriver> {
        let d = FakeDriver::default();
        d.obeys_term.store(obeys_term, Ordering::Relaxed);
        Arc::new(d)
    }

    fn calls(&self) -> Vec<Call> {
        let calls = self.calls.lock().unwrap();
        calls.iter().map(|(_, c)| c.clone()).collect()
    }

    /// When `call` was made (its first time).
    fn when(&self, call: &Call) -> Instant {
        let found = {
            let calls = self.calls.lock().unwrap();
            calls.iter().find(|(_, c)| c == call).map(|(t, _)| *t)
        };
        found.unwrap_or_else(|| panic!("no call {call:?} in {:?}", self.calls()))
    }

    fn run(&self, n: usize) -> Arc<FakeRun> {
        self.runs.lock().unwrap()[n - 1].clone()
    }

    fn spawns(&self) -> usize {
        self.runs.lock().unwrap().len()
    }
}

static NEXT_PID: AtomicU32 = AtomicU32::new(4_000_000);

#[async_trait]
impl Driver for FakeDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Process
    }

    async fn spawn(&self, spec: SpawnSpec) -> Result<Spawned, SpawnError> {
        if let Some(e) = self.failures.lock().unwrap().pop_front() {
            return Err(e);
        }
        let run = {
            let mut runs = self.runs.lock().unwrap();
            let run = Arc::new(FakeRun {
                n: runs.len() + 1,
                pid: NEXT_PID.fetch_add(1, Ordering::Relaxed),
                exit: watch::Sender::new(None),
                obeys_term: self.obeys_term.load(Ordering::Relaxed),
                calls: self.calls.clone(),
                engine: self
                    .engine
                    .load(Ordering::Relaxed)
                    .then(|| watch::Sender::new(false)),
            });
            runs.push(run.clone());
            run
        };
        self.envs.lock().unwrap().push(spec.env);
        if let Some(st) = *self.ends_at_once.lock().unwrap() {
            run.end(st);
        }
        let call = Call::Spawn(run.n);
        self.calls.lock().unwrap().push((Instant::now(), call));
        Ok(Spawned {
            handle: Arc::new(FakeHandle(run)),
            stdout: None,
            stderr: None,
            tap: None,
        })
    }
}

struct FakeHandle(Arc<FakeRun>);

#[async_trait]
impl InstanceHandle for FakeHandle {
    fn pid(&self) -> Option<u32> {
        Some(self.0.pid)
    }

    fn signal(&self, signal: Signal) -> Result<(), SignalError> {
        let run = &self.0;
        let call = Call::Signal(run.n, signal);
        run.calls.lock().unwrap().push((Instant::now(), call));
        if signal == Signal::KILL || (signal == Signal::TERM && run.obeys_term) {
            run.end(ExitStatus::Signaled {
                signal: signal.number(),
                core_dumped: false,
            });
        }
        Ok(())
    }

    async fn wait(&self) -> ExitStatus {
        let mut rx = self.0.exit.subscribe();
        let st = rx.wait_for(Option::is_some).await.expect("the run is kept");
        st.expect("waited for")
    }

    fn try_status(&self) -> Option<ExitStatus> {
        *self.0.exit.borrow()
    }

    fn stats(&self) -> Result<Stats, StatsError> {
        Ok(Stats::default())
    }

    fn engine_readiness(&self) -> Option<watch::Receiver<bool>> {
        self.0.engine.as_ref().map(watch::Sender::subscribe)
    }

    /// The notify socket takes messages from the test itself.
    fn owns_pid(&self, _pid: u32) -> Option<bool> {
        Some(true)
    }
}

/// A daemon core with the fake as its process driver, and one workload's instance.
struct Rig {
    _sh: Arc<Shared>,
    fake: Arc<FakeDriver>,
    slot: Arc<Slot>,
    events: broadcast::Receiver<bulkhead_core::event::Event>,
    _dir: tempfile::TempDir,
}

/// Far beyond any timer of these tests: reaching it means the awaited thing never came.
const NEVER: Duration = Duration::from_secs(24 * 3600);

impl Rig {
    /// Launches workload `w` of `manifest` (YAML, without `name`) on the fake.
    fn launch(manifest: &str, obeys_term: bool) -> Rig {
        Rig::launch_with(manifest, obeys_term, |_| {})
    }

    /// [`Rig::launch`], with the fake set up by `setup` first.
    fn launch_with(manifest: &str, obeys_term: bool, setup: impl FnOnce(&FakeDriver)) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        for d in ["logs", "notify"] {
            std::fs::create_dir_all(state.join(d)).unwrap();
        }
        let mut cfg = crate::Config::new(dir.path().to_owned(), Some(state), None);
        cfg.durable_events = false;
        cfg.sandbox = false;
        let mut sh = Shared::new(cfg, crate::events::EventLog::new(), None, None);
        // The real process driver made its cgroup scope (where the host allows): removed,
        // and the fake takes its place.
        sh.drivers[&DriverKind::Process].shutdown();
        let fake = FakeDriver::new(obeys_term);
        setup(&fake);
        sh.drivers.insert(DriverKind::Process, fake.clone());
        let sh = Arc::new(sh);
        let spec = bulkhead_core::spec::parse_manifest(
            "w/bulkhead.yaml",
            "w",
            &format!("name: w\ncommand: [fake]\n{manifest}"),
        )
        .unwrap();
        let key = Key::new("w", Isolation::Namespace, Some("t"), None).unwrap();
        let (_, events) = sh.events.subscribe(0);
        let slot = super::start(&sh, key, Arc::new(spec), dir.path().to_owned(), Vec::new());
        Rig {
            _sh: sh,
            fake,
            slot,
            events,
            _dir: dir,
        }
    }

    /// The next event of the instance.
    async fn event(&mut self) -> EventKind {
        let e = tokio::time::timeout(NEVER, self.events.recv())
            .await
            .expect("no event came")
            .expect("the event bus is open");
        e.kind
    }

    /// The next events' names, `n` of them.
    async fn names(&mut self, n: usize) -> Vec<&'static str> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(self.event().await.name());
        }
        out
    }

    /// Skips events until one named `name`; returns it and when it came.
    async fn until(&mut self, name: &str) -> (EventKind, Instant) {
        loop {
            let e = self.event().await;
            if e.name() == name {
                return (e, Instant::now());
            }
        }
    }

    /// Waits until the View shows `state`.
    async fn state(&self, state: State) {
        let mut rx = self.slot.subscribe();
        tokio::time::timeout(NEVER, rx.wait_for(|v| v.state == state))
            .await
            .unwrap_or_else(|_| panic!("never {state:?}; view {:?}", self.slot.view()))
            .unwrap();
    }
}

fn crash() -> ExitStatus {
    ExitStatus::Signaled {
        signal: 11,
        core_dumped: false,
    }
}

/// Between `a` and `b` there was `d`, to the timer's millisecond.
fn took(a: Instant, b: Instant, d: Duration) {
    let passed = b - a;
    assert!(
        passed >= d && passed <= d + Duration::from_millis(1),
        "{passed:?} passed, not {d:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn without_readiness_a_launch_is_ready_once_started_and_an_exit_ends_it() {
    let mut r = Rig::launch("restart: {policy: never}\n", true);
    assert_eq!(r.names(3).await, ["launched", "started", "ready"]);
    r.state(State::Ready).await;
    assert_eq!(r.slot.view().pid, Some(r.fake.run(1).pid));
    r.fake.run(1).end(ExitStatus::Exited { code: 0 });
    assert_eq!(r.event().await, EventKind::Exited { exit_code: 0 });
    r.state(State::Exited).await;
    assert_eq!(r.fake.calls(), [Call::Spawn(1)]);
    // A final instance holds no handle.
    assert!(r.slot.handle.lock().unwrap().is_none());
}

/// A launch waiting for `ready` sees an instance that became ready, even when its run
/// ended right after: the actor lets the View's watchers run before its next step.
#[tokio::test(start_paused = true)]
async fn a_launch_sees_ready_when_the_run_ends_right_after() {
    let r = Rig::launch_with("restart: {policy: never}\n", true, |f| {
        *f.ends_at_once.lock().unwrap() = Some(ExitStatus::Exited { code: 3 });
    });
    let slot = r.slot.clone();
    let got = tokio::spawn(async move {
        crate::wait_for(&slot, crate::WaitFor::Ready, None, NEVER)
            .await
            .map(|v| v.state)
    })
    .await
    .unwrap();
    assert_eq!(got.map_err(|e| e.to_string()), Ok(State::Ready));
    r.state(State::Exited).await;
}

#[tokio::test(start_paused = true)]
async fn with_notify_readiness_the_launch_is_ready_at_ready_1_on_its_socket() {
    let mut r = Rig::launch("readiness: {notify: true, timeout: 30s}\n", true);
    assert_eq!(r.names(2).await, ["launched", "started"]);
    r.state(State::Starting).await;
    let env = r.fake.envs.lock().unwrap()[0].clone();
    let socket = env
        .iter()
        .find(|(k, _)| k == "NOTIFY_SOCKET")
        .map(|(_, v)| v.clone())
        .expect("the run gets NOTIFY_SOCKET");
    // Half of the readiness timeout passes: still starting.
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(r.slot.view().state, State::Starting);
    let s = std::os::unix::net::UnixDatagram::unbound().unwrap();
    s.send_to(b"STATUS=warm\nREADY=1", &socket).unwrap();
    assert_eq!(r.event().await, EventKind::Ready);
    r.state(State::Ready).await;
    assert_eq!(r.slot.view().status_text.as_deref(), Some("warm"));
}

#[tokio::test(start_paused = true)]
async fn without_ready_1_the_readiness_timeout_fails_the_launch_and_stops_the_run() {
    let mut r = Rig::launch(
        "readiness: {notify: true, timeout: 30s}\nshutdown: {grace: 5s}\n",
        true,
    );
    let (_, started) = r.until("started").await;
    let (failed, at) = r.until("launch_failed").await;
    took(started, at, Duration::from_secs(30));
    assert!(
        matches!(&failed, EventKind::LaunchFailed { reason, failure_kind: Some(k) }
            if reason.contains("ready") && *k == bulkhead_core::failure::FailureKind::ReadinessTimeout),
        "{failed:?}"
    );
    r.state(State::Failed).await;
    assert_eq!(
        r.fake.calls(),
        [Call::Spawn(1), Call::Signal(1, Signal::TERM)]
    );
}

#[tokio::test(start_paused = true)]
async fn a_crash_waits_out_the_backoff_then_starts_the_next_run() {
    let mut r = Rig::launch(
        "restart: {policy: on-failure, backoff: {initial: 2s, factor: 3, jitter: 0}}\n",
        true,
    );
    r.until("ready").await;
    r.fake.run(1).end(crash());
    let crashed_at = Instant::now();
    assert_eq!(
        r.event().await,
        EventKind::Crashed {
            signal: 11,
            core_dumped: false
        }
    );
    assert_eq!(
        r.event().await,
        EventKind::Restarting {
            attempt: 1,
            delay_ms: 2000
        }
    );
    r.state(State::Restarting).await;
    // No process between runs, and none shown.
    assert_eq!(r.slot.view().pid, None);
    let (_, started) = r.until("started").await;
    took(crashed_at, started, Duration::from_secs(2));
    took(
        crashed_at,
        r.fake.when(&Call::Spawn(2)),
        Duration::from_secs(2),
    );
    // The second failure in a row waits `factor` times longer.
    r.until("ready").await;
    r.fake.run(2).end(crash());
    let crashed_at = Instant::now();
    let (restarting, _) = r.until("restarting").await;
    assert_eq!(
        restarting,
        EventKind::Restarting {
            attempt: 2,
            delay_ms: 6000
        }
    );
    r.until("started").await;
    took(
        crashed_at,
        r.fake.when(&Call::Spawn(3)),
        Duration::from_secs(6),
    );
    assert_eq!(r.slot.view().restarts, 2);
}

#[tokio::test(start_paused = true)]
async fn the_breaker_opens_after_max_failures_and_allows_one_trial_after_its_cooldown() {
    let mut r = Rig::launch(
        "restart: {policy: always, backoff: {initial: 1s, factor: 1, jitter: 0}, max_failures: 3, cooldown: 60s}\n",
        true,
    );
    for run in 1..=3 {
        r.until("ready").await;
        r.fake.run(run).end(ExitStatus::Exited { code: 1 });
        if run < 3 {
            r.until("restarting").await;
        }
    }
    let opened_at = Instant::now();
    let (open, _) = r.until("breaker_open").await;
    assert!(
        matches!(open, EventKind::BreakerOpen { failures: 3, .. }),
        "{open:?}"
    );
    r.state(State::Restarting).await;
    assert_eq!(r.slot.view().breaker, BreakerState::Open);
    // Nothing runs during the cooldown.
    tokio::time::sleep(Duration::from_secs(59)).await;
    assert_eq!(r.fake.spawns(), 3);
    let (_, half_open) = r.until("breaker_half_open").await;
    took(opened_at, half_open, Duration::from_secs(60));
    // The trial run becomes ready: the breaker closes.
    r.until("started").await;
    assert_eq!(r.fake.spawns(), 4);
    r.until("breaker_closed").await;
    r.state(State::Ready).await;
    assert_eq!(r.slot.view().breaker, BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn terminate_sends_the_shutdown_signal_then_sigkill_at_the_end_of_the_grace() {
    // The run ignores SIGTERM: only the SIGKILL at the deadline ends it.
    let mut r = Rig::launch("shutdown: {signal: SIGTERM, grace: 7s}\n", false);
    r.until("ready").await;
    r.slot.terminate(None);
    let (terminating, _) = r.until("terminating").await;
    assert_eq!(
        terminating,
        EventKind::Terminating {
            signal: 15,
            grace_ms: 7000
        }
    );
    let (terminated, _) = r.until("terminated").await;
    assert_eq!(
        terminated,
        EventKind::Terminated {
            status: Some(ExitStatus::Signaled {
                signal: 9,
                core_dumped: false
            })
        }
    );
    assert_eq!(
        r.fake.calls(),
        [
            Call::Spawn(1),
            Call::Signal(1, Signal::TERM),
            Call::Signal(1, Signal::KILL)
        ]
    );
    took(
        r.fake.when(&Call::Signal(1, Signal::TERM)),
        r.fake.when(&Call::Signal(1, Signal::KILL)),
        Duration::from_secs(7),
    );
    r.state(State::Terminated).await;
}

#[tokio::test(start_paused = true)]
async fn a_run_that_ends_at_its_signal_is_never_killed() {
    let mut r = Rig::launch("shutdown: {grace: 7s}\n", true);
    r.until("ready").await;
    r.slot.terminate(Some(Duration::from_secs(1)));
    r.until("terminated").await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        r.fake.calls(),
        [Call::Spawn(1), Call::Signal(1, Signal::TERM)]
    );
}

#[tokio::test(start_paused = true)]
async fn the_idle_clock_runs_only_while_no_lease_holds_the_instance() {
    let mut r = Rig::launch("idle_timeout: 10s\n", true);
    r.until("ready").await;
    assert!(r.slot.take_lease("lease", "alice").unwrap());
    // Held far beyond the idle timeout: nothing happens.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(r.slot.view().state, State::Ready);
    assert_eq!(r.fake.calls(), [Call::Spawn(1)]);
    assert!(r.slot.release("alice"));
    let released = Instant::now();
    let (_, at) = r.until("terminating").await;
    took(released, at, Duration::from_secs(10));
    r.until("terminated").await;
    r.state(State::Terminated).await;
}

#[tokio::test(start_paused = true)]
async fn a_spawn_error_fails_the_launch_with_its_reason_and_kind_and_starts_nothing() {
    use bulkhead_core::failure::FailureKind;
    let exec = || SpawnError::Exec {
        program: "fake".into(),
        source: std::io::Error::from_raw_os_error(2),
    };
    let setup = || {
        SpawnError::setup(
            &bulkhead_core::key::InstanceId::parse("ns:t:w").unwrap().0,
            bulkhead_driver::SetupStep::WorkingDir,
            "working_dir /x: no such directory",
        )
    };
    for (error, kind, says) in [
        (exec(), FailureKind::Exec, "cannot start fake"),
        (setup(), FailureKind::Setup, "working_dir /x"),
    ] {
        let mut r = Rig::launch("restart: {policy: never}\n", true);
        // The actor's first turn comes only at the test's first await (one thread): the
        // failure is queued before its spawn.
        r.fake.failures.lock().unwrap().push_back(error);
        assert_eq!(r.event().await, EventKind::Launched);
        match r.event().await {
            EventKind::LaunchFailed {
                reason,
                failure_kind,
            } => {
                assert!(reason.contains(says), "{reason}");
                assert_eq!(failure_kind, Some(kind));
            }
            e => panic!("{e:?}"),
        }
        r.state(State::Failed).await;
        assert!(r.fake.calls().is_empty());
    }
}

/// The value of `var` in run `n`'s environment.
fn env_of(fake: &FakeDriver, n: usize, var: &str) -> Option<String> {
    let envs = fake.envs.lock().unwrap();
    envs[n - 1]
        .iter()
        .find(|(k, _)| k == var)
        .map(|(_, v)| v.clone())
}

#[tokio::test(start_paused = true)]
async fn a_rollout_whose_new_run_fails_goes_back_to_the_manifest_it_replaced() {
    let mut r = Rig::launch("env: {V: old}\n", true);
    r.until("ready").await;
    let new = bulkhead_core::spec::parse_manifest(
        "w/bulkhead.yaml",
        "w",
        "name: w\ncommand: [fake]\nenv: {V: new}\n",
    )
    .unwrap();
    r.fake.failures.lock().unwrap().push_back(SpawnError::setup(
        &r.slot.id,
        bulkhead_driver::SetupStep::Cgroup,
        "no cgroup today",
    ));
    let done = r
        .slot
        .restart(None, "rollout".into(), Some(Arc::new(new)))
        .expect("the actor runs");
    let answer = tokio::time::timeout(NEVER, done).await.unwrap().unwrap();
    let reason = answer
        .expect("the rollback made it ready")
        .expect("rolled back");
    assert!(reason.contains("no cgroup today"), "{reason}");
    // Run 1 stopped; the new manifest's spawn failed; run 2 is on the old one again.
    assert_eq!(
        r.fake.calls(),
        [
            Call::Spawn(1),
            Call::Signal(1, Signal::TERM),
            Call::Spawn(2)
        ]
    );
    assert_eq!(env_of(&r.fake, 2, "V").as_deref(), Some("old"));
    assert_eq!(r.slot.spec().env.get("V").map(String::as_str), Some("old"));
    r.state(State::Ready).await;
}

#[tokio::test(start_paused = true)]
async fn a_missed_watchdog_stops_the_run_with_its_signal_and_the_policy_restarts_it() {
    let mut r = Rig::launch(
        "readiness: {notify: true, watchdog: 4s, timeout: 1m}\nrestart: {policy: on-failure, backoff: {initial: 1s, jitter: 0}}\n",
        false,
    );
    r.until("started").await;
    let socket = env_of(&r.fake, 1, "NOTIFY_SOCKET").unwrap();
    let started = Instant::now();
    let s = std::os::unix::net::UnixDatagram::unbound().unwrap();
    s.send_to(b"READY=1", &socket).unwrap();
    r.until("ready").await;
    // Each WATCHDOG=1 re-arms the clock: 3 s, then 3 s more, then silence.
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.send_to(b"WATCHDOG=1", &socket).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.send_to(b"WATCHDOG=1", &socket).unwrap();
    let (e, at) = r.until("watchdog_timeout").await;
    took(started, at, Duration::from_secs(10));
    assert!(matches!(e, EventKind::WatchdogTimeout { .. }), "{e:?}");
    // The default watchdog signal is SIGABRT; this run ignores it until the SIGKILL.
    r.until("restarting").await;
    r.until("started").await;
    assert_eq!(
        &r.fake.calls()[..3],
        [
            Call::Spawn(1),
            Call::Signal(1, Signal::from_number(6).unwrap()),
            Call::Signal(1, Signal::KILL)
        ]
    );
}

/// A driver whose engine judges readiness (a cluster engine): the manifest's probe is not
/// run by the daemon (its port would be the daemon host's), and the instance is ready when
/// the engine says so, within the readiness timeout.
#[tokio::test(start_paused = true)]
async fn with_engine_readiness_the_engine_decides_and_the_daemon_probes_nothing() {
    let manifest = "readiness: {tcp: {port: 1}, timeout: 30s}\nrestart: {policy: never}\n";
    let mut r = Rig::launch_with(manifest, true, |f| f.engine.store(true, Ordering::Relaxed));
    r.until("started").await;
    // The tcp probe on port 1 would never pass: the daemon does not run it.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(r.slot.view().state, State::Starting);
    r.fake.run(1).engine.as_ref().unwrap().send_replace(true);
    assert_eq!(r.event().await, EventKind::Ready);
    r.state(State::Ready).await;

    // The control: without the engine's word the same manifest fails at its timeout.
    let mut r = Rig::launch(manifest, true);
    let (_, started) = r.until("started").await;
    let (_, failed) = r.until("launch_failed").await;
    took(started, failed, Duration::from_secs(30));
}
