//! The instance lifecycle state machine: inputs in, effects out.
//!
//! ```text
//!                 Spawned            ReadinessPassed
//!   Starting ───────────────▶ Starting(pid) ─────────────▶ Ready ◀──┐ Healthy
//!     ▲  │ SpawnFailed             │ Exited / ReadinessTimedOut │ └───┘ Unhealthy (ready=false)
//!     │  ▼                         ▼                           │ Exited / LivenessFailed
//!     │  run ended ◀───────────────┴───────────────────────────┘
//!     │     │ policy says restart, breaker closed   ──▶ Restarting ── RestartDue ──┐
//!     │     │ max_failures consecutive failed runs  ──▶ Restarting (breaker open)  │
//!     │     │                                            └─ CooldownOver (half-open)┤
//!     │     └ no restart ──▶ Exited | Crashed | Failed                             │
//!     └────────────────────────────────────────────────────────────────────────────┘
//!   Starting | Ready | Restarting ── Terminate ──▶ Stopping ── Exited ──▶ Terminated
//! ```
//!
//! One sentence per transition:
//! - **Launch** ([`Instance::launch`]): `Starting`; emit `launched`; spawn.
//! - **Spawned**: emit `started`. Without readiness the instance is `Ready` at once; with
//!   readiness the shell starts the checks and the backstop.
//! - **ReadinessPassed** (while `Starting`): `Ready`, emit `ready`, start the monitors
//!   (liveness, and readiness probes that keep watching). A half-open breaker closes here.
//! - **Unhealthy** / **Healthy** (while `Ready`): readiness flapping after start is reported
//!   (`unhealthy`, `ready`) and clears/sets `ready`; the process is not touched.
//! - **LivenessFailed** (while `Ready`): emit `liveness_failed`, stop the process; the run
//!   counts as failed.
//! - **WatchdogMissed** (while `Starting` with a process, or `Ready`; only with a
//!   watchdog): emit `watchdog_timeout`, stop the process with the watchdog signal; the run
//!   counts as failed.
//! - **ReadinessTimedOut** (while `Starting`): emit `launch_failed`, stop the process; the
//!   run counts as failed.
//! - **SpawnFailed**, or **Exited** while `Starting`: emit the exit and `launch_failed`; the
//!   run failed. Readiness is bounded by liveness this way: a death ends the wait at once.
//! - **Daemonized** (while `Starting` or `Ready`, sent just before an `Exited` with code 0:
//!   the main process left processes behind in its cgroup, which the driver killed): that
//!   exit emits `launch_failed` saying the program daemonized and to run it in the
//!   foreground; the run failed (without a restart: `Failed`). Ignored while `Stopping`.
//! - **Run ended** (any exit that was not asked for by Terminate): a run that was ready for
//!   at least `reset_after` first resets the attempt and failure counts. A failed run (a
//!   crash, a non-zero exit, readiness never reached, liveness failed) adds one
//!   consecutive failure. Then, if the policy restarts (`always`; `on-failure` and the run
//!   failed): at `max_failures` consecutive failures the breaker opens (emit
//!   `breaker_open`, wait `cooldown`); otherwise emit `restarting {attempt, delay}` and wait
//!   the backoff. Both wait in `Restarting`. Without a restart the instance ends `Exited`
//!   (an exit code), `Crashed` (a signal) or `Failed` (the launch never succeeded, or
//!   liveness failed).
//! - **RestartDue** (while `Restarting`, breaker closed): spawn again; `restarts` counts.
//! - **CooldownOver** (while `Restarting`, breaker open): half-open, emit
//!   `breaker_half_open`, one trial run. Its readiness closes the breaker (`breaker_closed`);
//!   its failure opens it again.
//! - **Terminate** while `Starting`, `Ready` or `Restarting`: `Stopping`, emit
//!   `terminating`, stop the process group; with no process (restart pending, or spawn in
//!   flight) the instance is `Terminated` at once (in flight: once the spawn reports back).
//!   **Exited** while `Stopping` for a Terminate: emit `terminated`; `Terminated`.
//! - **Restart** (a requested restart) while `Starting` or `Ready`: emit
//!   `restart_requested`, stop the process gracefully; its **Exited** emits `restarting`
//!   (attempt 0, no delay) and spawns again at once: not a failure, no backoff, the
//!   breaker untouched. In flight: once the spawn reports back (a Terminate wins). While
//!   `Restarting`: the pending timer is dropped and the run starts now (an open breaker
//!   goes half-open for it). While `Stopping` after a failure: the restart replaces the
//!   policy's decision; after a Terminate it is ignored. A restart with `hold` (a
//!   rollout's) makes the new run a trial: if it fails before it is ready, its events are
//!   emitted as for any failed start but the policy is not applied and nothing is
//!   counted; the instance is *held* in `Restarting` with no timer until the shell sends
//!   a `Restart` (the rollback) or a `Terminate`.
//! - Terminal states (`Exited`, `Crashed`, `Failed`, `Terminated`) absorb every input.
//!
//! The core has no clock: the shell passes the time (`now_ms`, any monotonic millisecond
//! count) with each input, and the jitter comes from a seeded [`Jitter`].

use std::time::Duration;

use crate::event::{EventKind, ExitStatus};
use crate::failure::FailureKind;
use crate::restart::{backoff_delay, BreakerState, Jitter};
use crate::signal::Signal;
use crate::spec::{Restart, RestartPolicy, Shutdown};

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Launched; spawning, or spawned and waiting for readiness.
    Starting,
    /// Running; `ready` tells whether its readiness currently holds.
    Ready,
    /// Being stopped: signal sent, waiting for every process to be gone.
    Stopping,
    /// Between runs: waiting for the backoff delay, or for the breaker's cooldown.
    Restarting,
    /// Exited by itself with an exit code, and will not be restarted.
    Exited,
    /// Killed by a signal bulkhead did not send, and will not be restarted.
    Crashed,
    /// The launch failed (spawn error, exit before ready, readiness timeout) or liveness
    /// failed, and it will not be restarted.
    Failed,
    /// Stopped on request; every process is gone.
    Terminated,
}

impl State {
    pub const ALL: [State; 8] = [
        State::Starting,
        State::Ready,
        State::Stopping,
        State::Restarting,
        State::Exited,
        State::Crashed,
        State::Failed,
        State::Terminated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Stopping => "stopping",
            State::Restarting => "restarting",
            State::Exited => "exited",
            State::Crashed => "crashed",
            State::Failed => "failed",
            State::Terminated => "terminated",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// No process will run for this instance again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            State::Exited | State::Crashed | State::Failed | State::Terminated
        )
    }
}

/// What the shell tells the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The driver started the process (`pid` is absent for drivers without one).
    Spawned { pid: Option<u32> },
    /// The driver could not start it; `kind` says what failed.
    SpawnFailed {
        reason: String,
        kind: crate::failure::FailureKind,
    },
    /// Every readiness signal passed.
    ReadinessPassed,
    /// The readiness backstop fired.
    ReadinessTimedOut,
    /// Every process of the instance is gone; this is the main process's status.
    Exited(ExitStatus),
    /// The driver saw the OOM killer act on the instance at its memory limit. Sent just
    /// before the `Exited` it explains: that exit is reported as `oom_killed`.
    OomKilled { limit_bytes: Option<u64> },
    /// The driver saw the run's processes die with what held them (the keeper, which
    /// died), not of anything they did: `reason` says so. Sent just before the `Exited`
    /// it explains: that exit is reported as `lost`, and the restart policy applies.
    Lost { reason: String },
    /// The driver saw the main process exit 0 by itself while `left` processes stayed in
    /// the instance's cgroup (they were killed): the program daemonized. Sent just before
    /// the `Exited` it explains: that run failed, with a message that says so.
    Daemonized { left: usize },
    /// sd_notify `MAINPID=`: the driver now follows process `pid` as the run's main
    /// process (the state does not change; [`Instance::pid`] is it from now on).
    MainPid { pid: u32 },
    /// Stop it for good; `grace` overrides the manifest's.
    Terminate { grace: Option<Duration> },
    /// Stop the current run gracefully (`grace` overrides the manifest's) and start a
    /// new one at once; `reason` goes into the `restart_requested` event. With `hold`, the
    /// new run is a trial (a rollout's): if it fails before it is ready, the instance waits
    /// in `Restarting` with no timer (see [`Instance::held`]) for the shell's next
    /// `Restart` (a rollback) or `Terminate`, instead of applying its restart policy.
    Restart {
        grace: Option<Duration>,
        reason: String,
        hold: bool,
    },
    /// A readiness probe of a ready instance failed `failure_threshold` times.
    Unhealthy { reason: String },
    /// The readiness probes pass again.
    Healthy,
    /// A liveness probe failed `failure_threshold` times.
    LivenessFailed { reason: String },
    /// The sd_notify watchdog ran out (no `WATCHDOG=1` within `readiness.watchdog`), or the
    /// instance asked for it (`WATCHDOG=trigger`, `triggered`).
    WatchdogMissed { triggered: bool },
    /// The backoff delay asked for by [`Effect::ScheduleRestart`] passed.
    RestartDue,
    /// The cooldown asked for by [`Effect::ScheduleCooldown`] passed.
    CooldownOver,
}

/// What the state machine asks the shell to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Start the process through the driver; answer with `Spawned` or `SpawnFailed`.
    Spawn,
    /// Start the readiness checks and the backstop; answer with `ReadinessPassed` or
    /// `ReadinessTimedOut`.
    StartReadiness {
        timeout: Duration,
    },
    /// Stop the readiness checks and the backstop.
    StopReadiness,
    /// Start watching a ready instance: liveness probes (answer `LivenessFailed`) and the
    /// readiness probes (answer `Unhealthy` / `Healthy`).
    StartMonitors,
    StopMonitors,
    /// Send `signal` to the whole instance, SIGKILL after `grace`; answer with `Exited`.
    Stop {
        signal: Signal,
        grace: Duration,
    },
    /// Answer with `RestartDue` after `delay` (replaces any pending timer).
    ScheduleRestart {
        delay: Duration,
    },
    /// Answer with `CooldownOver` after `after` (replaces any pending timer).
    ScheduleCooldown {
        after: Duration,
    },
    /// Drop a pending restart or cooldown timer.
    CancelTimer,
    /// Publish an event.
    Emit(EventKind),
}

/// Everything the state machine needs to know about a workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `None` when the workload has no readiness checks.
    pub readiness_timeout: Option<Duration>,
    pub shutdown: Shutdown,
    pub restart: Restart,
    /// The sd_notify watchdog: its interval and the signal a missed one sends.
    pub watchdog: Option<(Duration, Signal)>,
    /// Seed for the backoff jitter.
    pub seed: u64,
}

impl Config {
    /// A config with no readiness, the default shutdown and no restarts.
    pub fn simple() -> Config {
        Config {
            readiness_timeout: None,
            shutdown: Shutdown::default(),
            restart: Restart::default(),
            watchdog: None,
            seed: 0,
        }
    }
}

/// Counters kept across a daemon restart (the instance table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Restored {
    pub restarts: u32,
    pub consecutive_failures: u32,
    pub breaker: BreakerState,
}

/// Why the current stop was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopCause {
    /// A Terminate: the instance ends `Terminated`.
    Terminate,
    /// Liveness failed or readiness timed out: the run failed; the policy decides.
    Failure,
    /// A requested restart: a new run starts as soon as this one is gone.
    Restart,
}

/// The lifecycle of one instance. Identity (key, spec) lives with the shell.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    cfg: Config,
    state: State,
    pid: Option<u32>,
    /// The current run has a process (or had one until it exited).
    spawned: bool,
    /// A spawn was asked for and has not reported back.
    spawn_pending: bool,
    ready: bool,
    /// When the current run became ready.
    ready_at_ms: Option<u64>,
    last_exit: Option<ExitStatus>,
    /// Why the current run (or launch) failed; cleared when a new run starts.
    failure: Option<String>,
    stop_cause: Option<StopCause>,
    pending_terminate: Option<Duration>,
    /// A restart asked for while the spawn was in flight: (grace, reason).
    pending_restart: Option<(Duration, String)>,
    /// The next run (started by a requested restart) is a trial: see `Input::Restart`.
    hold_next: bool,
    /// The current run is such a trial and has not been ready yet.
    trial: bool,
    /// A trial failed: waiting in `Restarting` for the shell's decision.
    held: bool,
    restarts: u32,
    /// Restart attempts since the last healthy run (drives the backoff).
    attempt: u32,
    consecutive_failures: u32,
    breaker: BreakerState,
    jitter: Jitter,
    /// The OOM killer acted on the current run (the limit, if any): its exit is an OOM kill.
    oom: Option<Option<u64>>,
    /// Why the current run's processes died with what held them ([`Input::Lost`]).
    lost: Option<String>,
    /// The current run daemonized (how many processes it left behind).
    daemonized: Option<usize>,
}

impl Instance {
    /// A new instance. Returns the first effects: emit `launched`, spawn.
    pub fn launch(cfg: Config) -> (Instance, Vec<Effect>) {
        let jitter = Jitter::new(cfg.seed);
        let inst = Instance {
            cfg,
            state: State::Starting,
            pid: None,
            spawned: false,
            spawn_pending: true,
            ready: false,
            ready_at_ms: None,
            last_exit: None,
            failure: None,
            stop_cause: None,
            pending_terminate: None,
            pending_restart: None,
            hold_next: false,
            trial: false,
            held: false,
            restarts: 0,
            attempt: 0,
            consecutive_failures: 0,
            breaker: BreakerState::Closed,
            jitter,
            oom: None,
            lost: None,
            daemonized: None,
        };
        (inst, vec![Effect::Emit(EventKind::Launched), Effect::Spawn])
    }

    /// An instance that was already running when this daemon started (found at the
    /// keeper): `Ready`, with its process; emits `adopted` and starts the monitors. If it
    /// exited meanwhile, the shell feeds `Exited` next and the restart policy applies.
    /// `restored` carries the counters the instance table kept.
    pub fn adopt(
        cfg: Config,
        pid: Option<u32>,
        now_ms: u64,
        restored: Restored,
    ) -> (Instance, Vec<Effect>) {
        let (mut inst, _) = Instance::launch(cfg);
        inst.restore(restored);
        inst.spawn_pending = false;
        inst.spawned = true;
        inst.pid = pid;
        inst.state = State::Ready;
        inst.ready = true;
        inst.ready_at_ms = Some(now_ms);
        (
            inst,
            vec![
                Effect::Emit(EventKind::Adopted { pid }),
                Effect::StartMonitors,
            ],
        )
    }

    /// An instance the instance table knew but whose process is gone after a daemon
    /// restart. With `lost` (it had a process): emits `lost` and the run counts as failed,
    /// so the restart policy decides. Without (it was between runs): it waits in
    /// `Restarting` again, for the backoff or, with an open breaker, the cooldown.
    pub fn resume(
        cfg: Config,
        restored: Restored,
        lost: Option<String>,
        now_ms: u64,
    ) -> (Instance, Vec<Effect>) {
        let (mut inst, _) = Instance::launch(cfg);
        inst.restore(restored);
        inst.spawn_pending = false;
        let mut fx = Vec::new();
        match lost {
            Some(reason) => {
                fx.push(Effect::Emit(EventKind::Lost {
                    reason: reason.clone(),
                }));
                inst.failure = Some(reason);
                inst.run_ended(true, now_ms, &mut fx);
            }
            None => {
                inst.state = State::Restarting;
                if inst.breaker == BreakerState::Open {
                    fx.push(Effect::ScheduleCooldown {
                        after: inst.cfg.restart.cooldown,
                    });
                } else {
                    inst.breaker = BreakerState::Closed;
                    let delay = backoff_delay(
                        &inst.cfg.restart.backoff,
                        inst.attempt.max(1),
                        inst.jitter.next_unit(),
                    );
                    fx.push(Effect::ScheduleRestart { delay });
                }
            }
        }
        (inst, fx)
    }

    fn restore(&mut self, r: Restored) {
        self.restarts = r.restarts;
        self.consecutive_failures = r.consecutive_failures;
        // The backoff continues from the failures in a row (the attempt count itself is
        // not kept).
        self.attempt = r.consecutive_failures;
        self.breaker = r.breaker;
    }

    /// Replaces the workload's settings (a rollout to a changed manifest); they apply
    /// from the next decision on. The jitter's sequence continues.
    pub fn reconfigure(&mut self, cfg: Config) {
        self.cfg = cfg;
    }

    pub fn state(&self) -> State {
        self.state
    }
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }
    pub fn ready(&self) -> bool {
        self.ready
    }
    pub fn last_exit(&self) -> Option<ExitStatus> {
        self.last_exit
    }
    /// Why the current run failed, or why launches fail fast (breaker open).
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }
    pub fn restarts(&self) -> u32 {
        self.restarts
    }
    pub fn breaker(&self) -> BreakerState {
        self.breaker
    }
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }
    /// A process was spawned for the current run and has not been seen to exit.
    pub fn has_live_process(&self) -> bool {
        self.spawned && matches!(self.state, State::Starting | State::Ready | State::Stopping)
    }
    /// A spawn was asked for and has not reported back.
    pub fn spawn_pending(&self) -> bool {
        self.spawn_pending
    }
    /// A trial run (`Input::Restart` with `hold`) failed: the instance waits in
    /// `Restarting`, with no timer, for a `Restart` or a `Terminate`.
    pub fn held(&self) -> bool {
        self.held
    }

    /// Applies one input at time `now_ms` and returns the effects to carry out, in order.
    pub fn handle(&mut self, input: Input, now_ms: u64) -> Vec<Effect> {
        use State::*;
        let mut fx = Vec::new();
        if self.state.is_terminal() {
            return fx;
        }
        match (self.state, input) {
            (_, Input::MainPid { pid }) if self.has_live_process() => self.pid = Some(pid),
            (Starting, Input::Spawned { pid }) if self.spawn_pending => {
                self.spawn_pending = false;
                self.spawned = true;
                self.pid = pid;
                fx.push(Effect::Emit(EventKind::Started { pid }));
                if let Some(grace) = self.pending_terminate.take() {
                    self.pending_restart = None;
                    self.begin_stop(grace, StopCause::Terminate, &mut fx);
                } else if let Some((grace, reason)) = self.pending_restart.take() {
                    // (`hold_next` was set when the restart was asked for.)
                    fx.push(Effect::Emit(EventKind::RestartRequested { reason }));
                    self.begin_stop(grace, StopCause::Restart, &mut fx);
                } else if let Some(timeout) = self.cfg.readiness_timeout {
                    fx.push(Effect::StartReadiness { timeout });
                } else {
                    self.become_ready(now_ms, &mut fx);
                }
            }
            (Starting, Input::SpawnFailed { reason, kind }) if self.spawn_pending => {
                self.spawn_pending = false;
                let reason = format!("spawn failed: {reason}");
                fx.push(Effect::Emit(EventKind::LaunchFailed {
                    reason: reason.clone(),
                    failure_kind: Some(kind),
                }));
                self.failure = Some(reason);
                self.pending_restart = None;
                if self.pending_terminate.take().is_some() {
                    self.state = Terminated;
                } else {
                    self.run_ended(true, now_ms, &mut fx);
                }
            }
            (Starting, Input::ReadinessPassed) if self.spawned => {
                fx.push(Effect::StopReadiness);
                self.become_ready(now_ms, &mut fx);
            }
            (Starting, Input::ReadinessTimedOut) if self.spawned => {
                let timeout = self.cfg.readiness_timeout.unwrap_or_default();
                let reason = format!(
                    "not ready within the readiness timeout of {}",
                    crate::duration::format(timeout)
                );
                fx.push(Effect::StopReadiness);
                fx.push(Effect::Emit(EventKind::LaunchFailed {
                    reason: reason.clone(),
                    failure_kind: Some(FailureKind::ReadinessTimeout),
                }));
                self.failure = Some(reason);
                self.begin_stop(self.cfg.shutdown.grace, StopCause::Failure, &mut fx);
            }
            (_, Input::OomKilled { limit_bytes }) => {
                self.oom = Some(limit_bytes);
            }
            (_, Input::Lost { reason }) => {
                self.lost = Some(reason);
            }
            // Only for an exit nobody asked for: a stop's leftovers are not a daemon.
            (Starting | Ready, Input::Daemonized { left }) if self.spawned => {
                self.daemonized = Some(left);
            }
            (Starting, Input::Exited(status)) if self.spawned => {
                self.last_exit = Some(status);
                let (reason, kind) = match (self.oom, self.daemonized) {
                    _ if self.lost.is_some() => (
                        format!("{} during start-up", self.lost.as_deref().unwrap_or("")),
                        FailureKind::Exited,
                    ),
                    (Some(limit), _) => (
                        format!(
                            "killed by the OOM killer during start-up{}",
                            limit_phrase(limit)
                        ),
                        FailureKind::Exited,
                    ),
                    (None, Some(left)) if status.success() => {
                        (daemonized_reason(left), FailureKind::Daemonized)
                    }
                    _ => (
                        format!("exited during start-up with {status}"),
                        FailureKind::Exited,
                    ),
                };
                fx.push(Effect::StopReadiness);
                fx.push(Effect::Emit(self.exit_event(status)));
                fx.push(Effect::Emit(EventKind::LaunchFailed {
                    reason: reason.clone(),
                    failure_kind: Some(kind),
                }));
                self.failure = Some(reason);
                self.run_ended(true, now_ms, &mut fx);
            }
            (Starting, Input::Terminate { grace }) => {
                let grace = grace.unwrap_or(self.cfg.shutdown.grace);
                if self.spawned {
                    fx.push(Effect::StopReadiness);
                    self.begin_stop(grace, StopCause::Terminate, &mut fx);
                } else {
                    // The spawn is in flight: stop as soon as it reports back.
                    self.pending_terminate = Some(grace);
                }
            }
            (Ready, Input::Unhealthy { reason }) if self.ready => {
                self.ready = false;
                fx.push(Effect::Emit(EventKind::Unhealthy { reason }));
            }
            (Ready, Input::Healthy) if !self.ready => {
                self.ready = true;
                fx.push(Effect::Emit(EventKind::Ready));
            }
            (Starting | Ready, Input::WatchdogMissed { triggered })
                if self.spawned && self.cfg.watchdog.is_some() =>
            {
                let (every, signal) = self.cfg.watchdog.unwrap_or((Duration::ZERO, Signal::KILL));
                let reason = if triggered {
                    "the instance triggered its watchdog (WATCHDOG=trigger)".to_owned()
                } else {
                    format!(
                        "no WATCHDOG=1 within the watchdog interval of {}",
                        crate::duration::format(every)
                    )
                };
                if self.state == Starting {
                    fx.push(Effect::StopReadiness);
                }
                fx.push(Effect::Emit(EventKind::WatchdogTimeout {
                    reason: reason.clone(),
                }));
                self.failure = Some(reason);
                self.begin_stop_with(signal, self.cfg.shutdown.grace, StopCause::Failure, &mut fx);
            }
            (Ready, Input::LivenessFailed { reason }) => {
                let reason = format!("liveness probe failed: {reason}");
                fx.push(Effect::Emit(EventKind::LivenessFailed {
                    reason: reason.clone(),
                }));
                self.failure = Some(reason);
                self.begin_stop(self.cfg.shutdown.grace, StopCause::Failure, &mut fx);
            }
            (Ready, Input::Exited(status)) => {
                self.last_exit = Some(status);
                fx.push(Effect::StopMonitors);
                if let Some(limit) = self.oom {
                    self.failure = Some(format!("killed by the OOM killer{}", limit_phrase(limit)));
                }
                if let Some(reason) = &self.lost {
                    self.failure = Some(reason.clone());
                }
                fx.push(Effect::Emit(self.exit_event(status)));
                match self.daemonized {
                    // Ready at once (no readiness checks), then the main process left
                    // its daemon behind and exited: the launch did not give a running
                    // instance, whatever the exit code says.
                    Some(left) if status.success() => {
                        let reason = daemonized_reason(left);
                        fx.push(Effect::Emit(EventKind::LaunchFailed {
                            reason: reason.clone(),
                            failure_kind: Some(FailureKind::Daemonized),
                        }));
                        self.failure = Some(reason);
                        self.run_ended(true, now_ms, &mut fx);
                    }
                    _ => self.run_ended(!status.success(), now_ms, &mut fx),
                }
            }
            (Ready, Input::Terminate { grace }) => {
                let grace = grace.unwrap_or(self.cfg.shutdown.grace);
                self.begin_stop(grace, StopCause::Terminate, &mut fx);
            }
            (Stopping, Input::Exited(status)) if self.stop_cause == Some(StopCause::Restart) => {
                // The stop was ours, for a restart: not a failure, no backoff.
                self.last_exit = Some(status);
                fx.push(Effect::Emit(EventKind::Restarting {
                    attempt: 0,
                    delay_ms: 0,
                }));
                self.restarts += 1;
                self.start_run(&mut fx);
                self.trial = std::mem::take(&mut self.hold_next);
            }
            (Stopping, Input::Exited(status)) => {
                self.last_exit = Some(status);
                fx.push(Effect::Emit(EventKind::Terminated {
                    status: Some(status),
                }));
                if self.stop_cause == Some(StopCause::Terminate) {
                    self.state = Terminated;
                } else {
                    self.run_ended(true, now_ms, &mut fx);
                }
            }
            (Stopping, Input::Terminate { .. }) => {
                // A failure stop becomes a terminate: no restart after it.
                self.stop_cause = Some(StopCause::Terminate);
            }
            (Restarting, Input::RestartDue)
                if self.breaker == BreakerState::Closed && !self.held =>
            {
                self.restarts += 1;
                self.start_run(&mut fx);
            }
            (Restarting, Input::CooldownOver)
                if self.breaker == BreakerState::Open && !self.held =>
            {
                self.breaker = BreakerState::HalfOpen;
                self.restarts += 1;
                fx.push(Effect::Emit(EventKind::BreakerHalfOpen));
                self.start_run(&mut fx);
            }
            (
                Starting | Ready,
                Input::Restart {
                    grace,
                    reason,
                    hold,
                },
            ) => {
                let grace = grace.unwrap_or(self.cfg.shutdown.grace);
                self.hold_next = hold;
                if self.spawned {
                    if self.state == Starting {
                        fx.push(Effect::StopReadiness);
                    }
                    fx.push(Effect::Emit(EventKind::RestartRequested { reason }));
                    self.begin_stop(grace, StopCause::Restart, &mut fx);
                } else if self.pending_terminate.is_none() {
                    // The spawn is in flight: restart as soon as it reports back.
                    self.pending_restart = Some((grace, reason));
                }
            }
            (Stopping, Input::Restart { reason, hold, .. })
                if self.stop_cause == Some(StopCause::Failure) =>
            {
                self.hold_next = hold;
                // Its policy would decide after this failed run: a restart was asked for.
                fx.push(Effect::Emit(EventKind::RestartRequested { reason }));
                self.stop_cause = Some(StopCause::Restart);
            }
            (Restarting, Input::Restart { reason, hold, .. }) => {
                // Between runs (backoff, an open breaker, a held trial): the new run starts
                // now. An open breaker gets its trial run now, as if the cooldown had passed.
                fx.push(Effect::CancelTimer);
                self.held = false;
                fx.push(Effect::Emit(EventKind::RestartRequested { reason }));
                if self.breaker == BreakerState::Open {
                    self.breaker = BreakerState::HalfOpen;
                    fx.push(Effect::Emit(EventKind::BreakerHalfOpen));
                }
                self.restarts += 1;
                self.start_run(&mut fx);
                self.trial = hold;
            }
            (Restarting, Input::Terminate { .. }) => {
                self.held = false;
                fx.push(Effect::CancelTimer);
                fx.push(Effect::Emit(EventKind::Terminated { status: None }));
                self.state = Terminated;
            }
            // Everything else is a duplicate or out-of-order report: ignore it. In
            // particular a second Spawned never creates a second process, and a
            // Terminate while Stopping does not restart the grace period.
            _ => {}
        }
        fx
    }

    fn start_run(&mut self, fx: &mut Vec<Effect>) {
        self.state = State::Starting;
        self.trial = false;
        self.spawned = false;
        self.spawn_pending = true;
        self.pid = None;
        self.ready = false;
        self.ready_at_ms = None;
        self.failure = None;
        self.stop_cause = None;
        self.pending_restart = None;
        self.oom = None;
        self.lost = None;
        self.daemonized = None;
        fx.push(Effect::Spawn);
    }

    /// The event for a run that ended by itself: `oom_killed` when the OOM killer did it,
    /// `lost` when it died with what held it.
    fn exit_event(&self, status: ExitStatus) -> EventKind {
        if let Some(reason) = &self.lost {
            return EventKind::Lost {
                reason: reason.clone(),
            };
        }
        match (self.oom, status) {
            (Some(limit_bytes), ExitStatus::Signaled { signal, .. }) => EventKind::OomKilled {
                limit_bytes,
                signal,
            },
            _ => EventKind::for_exit(status),
        }
    }

    fn become_ready(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        self.state = State::Ready;
        self.trial = false;
        self.ready = true;
        self.ready_at_ms = Some(now_ms);
        fx.push(Effect::Emit(EventKind::Ready));
        if self.breaker == BreakerState::HalfOpen {
            self.breaker = BreakerState::Closed;
            self.consecutive_failures = 0;
            self.attempt = 0;
            fx.push(Effect::Emit(EventKind::BreakerClosed));
        }
        fx.push(Effect::StartMonitors);
    }

    fn begin_stop(&mut self, grace: Duration, cause: StopCause, fx: &mut Vec<Effect>) {
        self.begin_stop_with(self.cfg.shutdown.signal, grace, cause, fx);
    }

    /// [`Self::begin_stop`] with `signal` in place of the manifest's shutdown signal.
    fn begin_stop_with(
        &mut self,
        signal: Signal,
        grace: Duration,
        cause: StopCause,
        fx: &mut Vec<Effect>,
    ) {
        if self.state == State::Ready {
            fx.push(Effect::StopMonitors);
        }
        self.state = State::Stopping;
        self.ready = false;
        self.stop_cause = Some(cause);
        fx.push(Effect::Emit(EventKind::Terminating {
            signal: signal.number(),
            grace_ms: grace.as_millis() as u64,
        }));
        fx.push(Effect::Stop { signal, grace });
    }

    /// A run is over without a Terminate: decide between restarting, opening the breaker
    /// and ending.
    fn run_ended(&mut self, failed: bool, now_ms: u64, fx: &mut Vec<Effect>) {
        let r = self.cfg.restart;
        self.ready = false;
        if std::mem::take(&mut self.trial) {
            // A rollout's trial run failed before it was ready: not the instance's
            // failure to count, and not for its policy; the shell decides (roll back).
            self.state = State::Restarting;
            self.held = true;
            return;
        }
        let healthy_uptime = self
            .ready_at_ms
            .is_some_and(|t| now_ms.saturating_sub(t) >= r.reset_after.as_millis() as u64);
        if healthy_uptime {
            self.attempt = 0;
            self.consecutive_failures = 0;
        }
        if failed {
            self.consecutive_failures += 1;
        }
        let restart = match r.policy {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => failed,
            RestartPolicy::Always => true,
        };
        let trial_failed = self.breaker == BreakerState::HalfOpen && failed;
        if restart && (trial_failed || (failed && self.consecutive_failures >= r.max_failures)) {
            self.breaker = BreakerState::Open;
            let last = self
                .failure
                .clone()
                .or_else(|| self.last_exit.map(|s| format!("exited with {s}")))
                .unwrap_or_else(|| "failed".into());
            fx.push(Effect::Emit(EventKind::BreakerOpen {
                failures: self.consecutive_failures,
                reason: last.clone(),
            }));
            self.failure = Some(format!(
                "circuit breaker open after {} consecutive failed runs (last: {last}); next trial in {}",
                self.consecutive_failures,
                crate::duration::format(r.cooldown)
            ));
            self.state = State::Restarting;
            fx.push(Effect::ScheduleCooldown { after: r.cooldown });
        } else if restart {
            if self.breaker == BreakerState::HalfOpen {
                // The trial ended without failing (an exit 0 under `always`): closed.
                self.breaker = BreakerState::Closed;
                self.consecutive_failures = 0;
                fx.push(Effect::Emit(EventKind::BreakerClosed));
            }
            self.attempt = self.attempt.saturating_add(1);
            let delay = backoff_delay(&r.backoff, self.attempt, self.jitter.next_unit());
            fx.push(Effect::Emit(EventKind::Restarting {
                attempt: self.attempt,
                delay_ms: delay.as_millis() as u64,
            }));
            self.state = State::Restarting;
            fx.push(Effect::ScheduleRestart { delay });
        } else {
            self.state = match self.last_exit {
                // Killed by the OOM killer after it was ready: a crash (a signal it did not
                // get from a termination), not a failed launch; the reason says OOM.
                Some(ExitStatus::Signaled { .. })
                    if self.oom.is_some() && self.ready_at_ms.is_some() =>
                {
                    State::Crashed
                }
                _ if self.failure.is_some() => State::Failed,
                Some(ExitStatus::Signaled { .. }) => State::Crashed,
                Some(ExitStatus::Exited { .. }) => State::Exited,
                None => State::Failed,
            };
        }
    }
}

/// Why a run whose program daemonized failed, and what to do about it.
fn daemonized_reason(left: usize) -> String {
    format!(
        "the program daemonized: its main process exited 0 and left {left} process(es) \
         running in the background (double fork / setsid), which were killed with the \
         instance; bulkhead supervises the main process, so run the program in the \
         foreground (e.g. redis-server --daemonize no, nginx -g 'daemon off;')"
    )
}

/// ` at its memory limit of 512Mi`, or nothing when no limit is known.
fn limit_phrase(limit: Option<u64>) -> String {
    limit
        .map(|l| format!(" at its memory limit of {}", crate::size::format(l)))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(readiness: bool, policy: RestartPolicy) -> Config {
        Config {
            readiness_timeout: readiness.then_some(Duration::from_secs(5)),
            restart: Restart {
                policy,
                max_failures: 3,
                ..Restart::default()
            },
            ..Config::simple()
        }
    }

    fn launch(readiness: bool) -> (Instance, Vec<Effect>) {
        Instance::launch(cfg(readiness, RestartPolicy::Never))
    }

    fn events(fx: &[Effect]) -> Vec<&'static str> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Emit(k) => Some(k.name()),
                _ => None,
            })
            .collect()
    }

    const SEGV: ExitStatus = ExitStatus::Signaled {
        signal: 11,
        core_dumped: false,
    };

    #[test]
    fn happy_path_without_readiness() {
        let (mut i, fx) = launch(false);
        assert_eq!(fx, vec![Effect::Emit(EventKind::Launched), Effect::Spawn]);
        let fx = i.handle(Input::Spawned { pid: Some(42) }, 0);
        assert_eq!(events(&fx), vec!["started", "ready"]);
        assert!(fx.contains(&Effect::StartMonitors));
        assert_eq!(i.state(), State::Ready);
        let fx = i.handle(Input::Terminate { grace: None }, 1);
        assert_eq!(i.state(), State::Stopping);
        assert!(fx.contains(&Effect::Stop {
            signal: Signal::TERM,
            grace: Duration::from_secs(10)
        }));
        let st = ExitStatus::Signaled {
            signal: 15,
            core_dumped: false,
        };
        let fx = i.handle(Input::Exited(st), 2);
        assert_eq!(
            fx,
            vec![Effect::Emit(EventKind::Terminated { status: Some(st) })]
        );
        assert_eq!(i.state(), State::Terminated);
        assert_eq!(i.last_exit(), Some(st));
    }

    #[test]
    fn readiness_then_crash_keeps_signal_and_core() {
        let (mut i, _) = launch(true);
        let fx = i.handle(Input::Spawned { pid: Some(7) }, 0);
        assert_eq!(
            fx[1],
            Effect::StartReadiness {
                timeout: Duration::from_secs(5)
            }
        );
        assert_eq!(i.state(), State::Starting);
        i.handle(Input::ReadinessPassed, 1);
        assert_eq!(i.state(), State::Ready);
        let st = ExitStatus::Signaled {
            signal: 11,
            core_dumped: true,
        };
        let fx = i.handle(Input::Exited(st), 2);
        assert!(fx.contains(&Effect::Emit(EventKind::Crashed {
            signal: 11,
            core_dumped: true
        })));
        assert_eq!(i.state(), State::Crashed);
    }

    #[test]
    fn exit_during_startup_fails_the_launch_with_the_status() {
        let (mut i, _) = launch(true);
        i.handle(Input::Spawned { pid: Some(7) }, 0);
        let fx = i.handle(Input::Exited(ExitStatus::Exited { code: 3 }), 1);
        assert_eq!(events(&fx), vec!["exited", "launch_failed"]);
        assert_eq!(i.state(), State::Failed);
        assert_eq!(i.failure(), Some("exited during start-up with exit code 3"));
    }

    #[test]
    fn readiness_timeout_stops_then_fails() {
        let (mut i, _) = launch(true);
        i.handle(Input::Spawned { pid: Some(7) }, 0);
        let fx = i.handle(Input::ReadinessTimedOut, 1);
        assert_eq!(events(&fx), vec!["launch_failed", "terminating"]);
        assert_eq!(i.state(), State::Stopping);
        i.handle(
            Input::Exited(ExitStatus::Signaled {
                signal: 15,
                core_dumped: false,
            }),
            2,
        );
        assert_eq!(i.state(), State::Failed);
        assert!(i.failure().unwrap().contains("readiness timeout of 5s"));
    }

    #[test]
    fn terminate_during_spawn_is_carried_out_after_it() {
        let (mut i, _) = launch(true);
        assert!(i
            .handle(
                Input::Terminate {
                    grace: Some(Duration::from_millis(5))
                },
                0
            )
            .is_empty());
        let fx = i.handle(Input::Spawned { pid: Some(9) }, 1);
        assert_eq!(events(&fx), vec!["started", "terminating"]);
        assert!(fx.contains(&Effect::Stop {
            signal: Signal::TERM,
            grace: Duration::from_millis(5)
        }));
    }

    #[test]
    fn spawn_failure() {
        let (mut i, _) = launch(false);
        let fx = i.handle(
            Input::SpawnFailed {
                reason: "no such file".into(),
                kind: FailureKind::Exec,
            },
            0,
        );
        assert_eq!(events(&fx), vec!["launch_failed"]);
        assert!(fx.contains(&Effect::Emit(EventKind::LaunchFailed {
            reason: "spawn failed: no such file".into(),
            failure_kind: Some(FailureKind::Exec),
        })));
        assert_eq!(i.state(), State::Failed);
        assert_eq!(i.failure(), Some("spawn failed: no such file"));
    }

    fn failure_kind(fx: &[Effect]) -> Option<FailureKind> {
        fx.iter().find_map(|e| match e {
            Effect::Emit(EventKind::LaunchFailed { failure_kind, .. }) => *failure_kind,
            _ => None,
        })
    }

    #[test]
    fn a_failed_start_says_which_failure_it_was() {
        let (mut i, _) = launch(true);
        i.handle(Input::Spawned { pid: Some(1) }, 0);
        let fx = i.handle(Input::ReadinessTimedOut, 10);
        assert_eq!(failure_kind(&fx), Some(FailureKind::ReadinessTimeout));

        let (mut i, _) = launch(true);
        i.handle(Input::Spawned { pid: Some(1) }, 0);
        let fx = i.handle(Input::Exited(ExitStatus::Exited { code: 3 }), 10);
        assert_eq!(failure_kind(&fx), Some(FailureKind::Exited));

        let (mut i, _) = launch(true);
        i.handle(Input::Spawned { pid: Some(1) }, 0);
        i.handle(Input::Daemonized { left: 1 }, 10);
        let fx = i.handle(Input::Exited(ExitStatus::Exited { code: 0 }), 10);
        assert_eq!(failure_kind(&fx), Some(FailureKind::Daemonized));
    }

    #[test]
    fn on_failure_restarts_with_growing_backoff_then_opens_the_breaker() {
        let (mut i, _) = Instance::launch(cfg(true, RestartPolicy::OnFailure));
        let mut delays = Vec::new();
        let mut t = 0;
        for run in 1..=3u32 {
            i.handle(Input::Spawned { pid: Some(run) }, t);
            let fx = i.handle(Input::Exited(SEGV), t + 1);
            t += 10;
            if run < 3 {
                assert_eq!(i.state(), State::Restarting);
                let delay = fx
                    .iter()
                    .find_map(|e| match e {
                        Effect::ScheduleRestart { delay } => Some(*delay),
                        _ => None,
                    })
                    .unwrap();
                delays.push(delay);
                assert!(fx.contains(&Effect::Emit(EventKind::Restarting {
                    attempt: run,
                    delay_ms: delay.as_millis() as u64
                })));
                assert_eq!(i.handle(Input::RestartDue, t), vec![Effect::Spawn]);
                assert_eq!(i.restarts(), run);
            } else {
                assert_eq!(
                    events(&fx),
                    vec!["crashed", "launch_failed", "breaker_open"]
                );
                assert!(fx.contains(&Effect::ScheduleCooldown {
                    after: Duration::from_secs(60)
                }));
                assert_eq!(i.breaker(), BreakerState::Open);
                assert!(i
                    .failure()
                    .unwrap()
                    .starts_with("circuit breaker open after 3"));
            }
        }
        assert!(delays[1] > delays[0], "{delays:?}");
        // A restart timer firing while open does nothing; the cooldown gives one trial.
        assert!(i.handle(Input::RestartDue, t).is_empty());
        let fx = i.handle(Input::CooldownOver, t);
        assert_eq!(events(&fx), vec!["breaker_half_open"]);
        assert!(fx.contains(&Effect::Spawn));
        // The trial fails: open again at once.
        i.handle(Input::Spawned { pid: Some(9) }, t);
        let fx = i.handle(Input::Exited(SEGV), t + 1);
        assert_eq!(
            events(&fx),
            vec!["crashed", "launch_failed", "breaker_open"]
        );
        // The next trial becomes ready: closed.
        i.handle(Input::CooldownOver, t + 2);
        i.handle(Input::Spawned { pid: Some(10) }, t + 3);
        let fx = i.handle(Input::ReadinessPassed, t + 4);
        assert_eq!(events(&fx), vec!["ready", "breaker_closed"]);
        assert_eq!(i.breaker(), BreakerState::Closed);
        assert_eq!(i.consecutive_failures(), 0);
    }

    #[test]
    fn on_failure_does_not_restart_a_clean_exit_but_always_does() {
        let (mut i, _) = Instance::launch(cfg(false, RestartPolicy::OnFailure));
        i.handle(Input::Spawned { pid: Some(1) }, 0);
        i.handle(Input::Exited(ExitStatus::Exited { code: 0 }), 1);
        assert_eq!(i.state(), State::Exited);
        let (mut i, _) = Instance::launch(cfg(false, RestartPolicy::Always));
        i.handle(Input::Spawned { pid: Some(1) }, 0);
        let fx = i.handle(Input::Exited(ExitStatus::Exited { code: 0 }), 1);
        assert_eq!(i.state(), State::Restarting);
        assert_eq!(events(&fx), vec!["exited", "restarting"]);
        assert_eq!(i.consecutive_failures(), 0);
    }

    #[test]
    fn healthy_uptime_resets_the_backoff() {
        let mut c = cfg(false, RestartPolicy::Always);
        c.restart.reset_after = Duration::from_secs(1);
        c.restart.backoff.jitter = 0.0;
        let (mut i, _) = Instance::launch(c);
        let delay_of = |fx: &[Effect]| {
            fx.iter()
                .find_map(|e| match e {
                    Effect::ScheduleRestart { delay } => Some(*delay),
                    _ => None,
                })
                .unwrap()
        };
        i.handle(Input::Spawned { pid: Some(1) }, 0);
        let d1 = delay_of(&i.handle(Input::Exited(SEGV), 10));
        i.handle(Input::RestartDue, 200);
        i.handle(Input::Spawned { pid: Some(2) }, 200);
        let d2 = delay_of(&i.handle(Input::Exited(SEGV), 210));
        assert_eq!(d2, d1 * 2);
        i.handle(Input::RestartDue, 500);
        i.handle(Input::Spawned { pid: Some(3) }, 500);
        // Up for 5 s >= reset_after: the backoff starts over.
        let d3 = delay_of(&i.handle(Input::Exited(SEGV), 5_500));
        assert_eq!(d3, d1);
        assert_eq!(i.consecutive_failures(), 1);
    }

    #[test]
    fn liveness_failure_stops_and_restarts() {
        let (mut i, _) = Instance::launch(cfg(false, RestartPolicy::OnFailure));
        i.handle(Input::Spawned { pid: Some(1) }, 0);
        let fx = i.handle(
            Input::LivenessFailed {
                reason: "tcp refused".into(),
            },
            5,
        );
        assert_eq!(events(&fx), vec!["liveness_failed", "terminating"]);
        assert!(fx.contains(&Effect::StopMonitors));
        let fx = i.handle(
            Input::Exited(ExitStatus::Signaled {
                signal: 15,
                core_dumped: false,
            }),
            6,
        );
        assert_eq!(events(&fx), vec!["terminated", "restarting"]);
        assert_eq!(i.state(), State::Restarting);
    }

    #[test]
    fn a_missed_watchdog_stops_with_its_signal_and_fails_the_run() {
        let abrt = Signal::parse("ABRT").unwrap();
        let mut c = cfg(true, RestartPolicy::OnFailure);
        c.watchdog = Some((Duration::from_millis(300), abrt));
        // While starting (a process, not ready yet) and once ready alike.
        for ready in [false, true] {
            let (mut i, _) = Instance::launch(c.clone());
            i.handle(Input::Spawned { pid: Some(1) }, 0);
            if ready {
                i.handle(Input::ReadinessPassed, 1);
            }
            let fx = i.handle(Input::WatchdogMissed { triggered: false }, 5);
            assert_eq!(
                events(&fx),
                vec!["watchdog_timeout", "terminating"],
                "{ready}"
            );
            assert!(fx.contains(&Effect::Stop {
                signal: abrt,
                grace: Shutdown::default().grace
            }));
            assert_eq!(
                i.failure(),
                Some("no WATCHDOG=1 within the watchdog interval of 300ms")
            );
            let fx = i.handle(
                Input::Exited(ExitStatus::Signaled {
                    signal: 6,
                    core_dumped: true,
                }),
                6,
            );
            assert_eq!(events(&fx), vec!["terminated", "restarting"]);
        }
        // Without a watchdog, or without a process, the input means nothing.
        let (mut i, _) = Instance::launch(cfg(true, RestartPolicy::OnFailure));
        i.handle(Input::Spawned { pid: Some(1) }, 0);
        assert!(i
            .handle(Input::WatchdogMissed { triggered: true }, 1)
            .is_empty());
        let (mut i, _) = Instance::launch(c);
        assert!(i
            .handle(Input::WatchdogMissed { triggered: true }, 1)
            .is_empty());
    }

    #[test]
    fn readiness_flapping_is_reported_without_killing() {
        let (mut i, _) = launch(true);
        i.handle(Input::Spawned { pid: Some(1) }, 0);
        i.handle(Input::ReadinessPassed, 1);
        let fx = i.handle(
            Input::Unhealthy {
                reason: "503".into(),
            },
            2,
        );
        assert_eq!(events(&fx), vec!["unhealthy"]);
        assert!(!i.ready());
        assert_eq!(i.state(), State::Ready);
        assert!(i
            .handle(
                Input::Unhealthy {
                    reason: "503".into()
                },
                3
            )
            .is_empty());
        assert_eq!(events(&i.handle(Input::Healthy, 4)), vec!["ready"]);
        assert!(i.ready());
    }

    #[test]
    fn terminate_while_restarting_ends_at_once() {
        let (mut i, _) = Instance::launch(cfg(false, RestartPolicy::Always));
        i.handle(Input::Spawned { pid: Some(1) }, 0);
        i.handle(Input::Exited(SEGV), 1);
        let fx = i.handle(Input::Terminate { grace: None }, 2);
        assert_eq!(
            fx,
            vec![
                Effect::CancelTimer,
                Effect::Emit(EventKind::Terminated { status: None })
            ]
        );
        assert_eq!(i.state(), State::Terminated);
        assert!(i.handle(Input::RestartDue, 3).is_empty());
    }

    #[test]
    fn an_adopted_instance_is_ready_and_its_exit_applies_the_policy() {
        let (mut i, fx) = Instance::adopt(
            cfg(true, RestartPolicy::OnFailure),
            Some(42),
            0,
            Restored::default(),
        );
        assert_eq!(events(&fx), vec!["adopted"]);
        assert_eq!(i.state(), State::Ready);
        assert!(i.has_live_process());
        let fx = i.handle(Input::Exited(ExitStatus::Exited { code: 3 }), 10);
        assert_eq!(events(&fx), vec!["exited", "restarting"]);
        assert_eq!(i.last_exit(), Some(ExitStatus::Exited { code: 3 }));
    }

    #[test]
    fn a_lost_instance_counts_as_a_failed_run() {
        let restored = Restored {
            restarts: 4,
            consecutive_failures: 1,
            breaker: BreakerState::Closed,
        };
        let (i, fx) = Instance::resume(
            cfg(false, RestartPolicy::OnFailure),
            restored,
            Some("gone".into()),
            0,
        );
        assert_eq!(events(&fx), vec!["lost", "restarting"]);
        assert_eq!(i.state(), State::Restarting);
        assert_eq!(i.restarts(), 4);
        assert_eq!(i.consecutive_failures(), 2);
        let (i, fx) = Instance::resume(
            cfg(false, RestartPolicy::Never),
            restored,
            Some("gone".into()),
            0,
        );
        assert_eq!(events(&fx), vec!["lost"]);
        assert_eq!(i.state(), State::Failed);
        // Between runs with an open breaker: the cooldown again.
        let open = Restored {
            breaker: BreakerState::Open,
            ..restored
        };
        let (mut i, fx) = Instance::resume(cfg(false, RestartPolicy::Always), open, None, 0);
        assert!(matches!(fx[..], [Effect::ScheduleCooldown { .. }]));
        assert_eq!(
            events(&i.handle(Input::CooldownOver, 1)),
            vec!["breaker_half_open"]
        );
    }

    #[test]
    fn state_names_round_trip() {
        for s in State::ALL {
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
    }

    fn any_status() -> impl Strategy<Value = ExitStatus> {
        prop_oneof![
            (-1i32..256).prop_map(|code| ExitStatus::Exited { code }),
            (1i32..65, any::<bool>()).prop_map(|(signal, core_dumped)| ExitStatus::Signaled {
                signal,
                core_dumped
            }),
        ]
    }

    fn any_input() -> impl Strategy<Value = Input> {
        prop_oneof![
            proptest::option::of(1u32..100_000).prop_map(|pid| Input::Spawned { pid }),
            "[a-z ]{0,10}".prop_map(|reason| Input::SpawnFailed {
                reason,
                kind: FailureKind::Setup
            }),
            Just(Input::ReadinessPassed),
            Just(Input::ReadinessTimedOut),
            any_status().prop_map(Input::Exited),
            any_status().prop_map(Input::Exited),
            proptest::option::of(0u64..10_000).prop_map(|g| Input::Terminate {
                grace: g.map(Duration::from_millis)
            }),
            "[a-z]{0,5}".prop_map(|reason| Input::Unhealthy { reason }),
            Just(Input::Healthy),
            "[a-z]{0,5}".prop_map(|reason| Input::LivenessFailed { reason }),
            Just(Input::RestartDue),
            Just(Input::CooldownOver),
            (1usize..5).prop_map(|left| Input::Daemonized { left }),
            "[a-z]{1,5}".prop_map(|reason| Input::Lost { reason }),
            (1u32..100_000).prop_map(|pid| Input::MainPid { pid }),
            any::<bool>().prop_map(|triggered| Input::WatchdogMissed { triggered }),
            (proptest::option::of(0u64..10_000), any::<bool>()).prop_map(|(g, hold)| {
                Input::Restart {
                    grace: g.map(Duration::from_millis),
                    reason: "asked".into(),
                    hold,
                }
            }),
        ]
    }

    fn restart(grace_ms: Option<u64>) -> Input {
        Input::Restart {
            grace: grace_ms.map(Duration::from_millis),
            reason: "requested".into(),
            hold: false,
        }
    }

    #[test]
    fn a_requested_restart_stops_gracefully_and_starts_at_once_without_a_failure() {
        let (mut i, _) = Instance::launch(cfg(false, RestartPolicy::Never));
        i.handle(Input::Spawned { pid: Some(1) }, 0);
        let fx = i.handle(restart(Some(3000)), 10);
        assert_eq!(events(&fx), vec!["restart_requested", "terminating"]);
        assert!(fx.contains(&Effect::Stop {
            signal: Signal::TERM,
            grace: Duration::from_secs(3)
        }));
        assert_eq!(i.state(), State::Stopping);
        let term = ExitStatus::Signaled {
            signal: 15,
            core_dumped: false,
        };
        let fx = i.handle(Input::Exited(term), 20);
        // `never` does not matter: the restart was asked for. No backoff, no failure.
        assert_eq!(events(&fx), vec!["restarting"]);
        assert_eq!(fx.last(), Some(&Effect::Spawn));
        assert_eq!(i.state(), State::Starting);
        assert_eq!(i.restarts(), 1);
        assert_eq!(i.consecutive_failures(), 0);
        assert_eq!(i.last_exit(), Some(term));
        let fx = i.handle(Input::Spawned { pid: Some(2) }, 30);
        assert_eq!(events(&fx), vec!["started", "ready"]);
    }

    #[test]
    fn a_restart_asked_while_the_spawn_is_in_flight_waits_for_it_and_a_terminate_wins() {
        let (mut i, _) = Instance::launch(cfg(true, RestartPolicy::Never));
        assert!(i.handle(restart(None), 0).is_empty());
        let fx = i.handle(Input::Spawned { pid: Some(1) }, 1);
        assert_eq!(
            events(&fx),
            vec!["started", "restart_requested", "terminating"]
        );
        // A terminate during that stop ends the instance: no new run.
        i.handle(Input::Terminate { grace: None }, 2);
        let fx = i.handle(Input::Exited(ExitStatus::Exited { code: 0 }), 3);
        assert_eq!(events(&fx), vec!["terminated"]);
        assert_eq!(i.state(), State::Terminated);

        let (mut i, _) = Instance::launch(cfg(true, RestartPolicy::Never));
        i.handle(restart(None), 0);
        i.handle(Input::Terminate { grace: None }, 0);
        let fx = i.handle(Input::Spawned { pid: Some(1) }, 1);
        assert_eq!(events(&fx), vec!["started", "terminating"]);
    }

    #[test]
    fn a_restart_between_runs_starts_now_and_gives_an_open_breaker_its_trial() {
        let (mut i, _) = Instance::launch(cfg(false, RestartPolicy::Always));
        for n in 0..3 {
            i.handle(Input::Spawned { pid: Some(n + 1) }, n as u64);
            i.handle(Input::Exited(SEGV), n as u64);
            if n < 2 {
                i.handle(Input::RestartDue, n as u64);
            }
        }
        assert_eq!(i.breaker(), BreakerState::Open);
        assert_eq!(i.state(), State::Restarting);
        let fx = i.handle(restart(None), 100);
        assert_eq!(events(&fx), vec!["restart_requested", "breaker_half_open"]);
        assert_eq!(fx.first(), Some(&Effect::CancelTimer));
        assert_eq!(fx.last(), Some(&Effect::Spawn));
        assert_eq!(i.breaker(), BreakerState::HalfOpen);
        let fx = i.handle(Input::Spawned { pid: Some(9) }, 101);
        assert_eq!(events(&fx), vec!["started", "ready", "breaker_closed"]);
    }

    #[test]
    fn a_restart_of_a_terminating_instance_is_ignored() {
        let (mut i, _) = Instance::launch(cfg(false, RestartPolicy::Always));
        i.handle(Input::Spawned { pid: Some(1) }, 0);
        i.handle(Input::Terminate { grace: None }, 1);
        assert!(i.handle(restart(None), 2).is_empty());
        let fx = i.handle(Input::Exited(ExitStatus::Exited { code: 0 }), 3);
        assert_eq!(events(&fx), vec!["terminated"]);
        assert_eq!(i.state(), State::Terminated);
    }

    #[test]
    fn a_failed_trial_run_is_held_for_the_shell_and_a_restart_rolls_it_back() {
        let (mut i, _) = Instance::launch(cfg(true, RestartPolicy::Never));
        i.handle(Input::Spawned { pid: Some(1) }, 0);
        i.handle(Input::ReadinessPassed, 1);
        i.handle(
            Input::Restart {
                grace: None,
                reason: "rollout".into(),
                hold: true,
            },
            2,
        );
        i.handle(Input::Exited(ExitStatus::Exited { code: 0 }), 3);
        i.handle(Input::Spawned { pid: Some(2) }, 4);
        // The new manifest's run dies while starting: reported, not counted, held.
        let fx = i.handle(Input::Exited(ExitStatus::Exited { code: 1 }), 5);
        assert_eq!(events(&fx), vec!["exited", "launch_failed"]);
        assert_eq!(i.state(), State::Restarting);
        assert!(i.held());
        assert_eq!(i.consecutive_failures(), 0);
        assert!(!fx
            .iter()
            .any(|e| matches!(e, Effect::ScheduleRestart { .. })));
        // The rollback: a plain restart starts the next run now.
        let fx = i.handle(restart(None), 6);
        assert!(!i.held());
        assert_eq!(fx.last(), Some(&Effect::Spawn));
        i.handle(Input::Spawned { pid: Some(3) }, 7);
        i.handle(Input::ReadinessPassed, 8);
        assert_eq!(i.state(), State::Ready);
        // A trial that becomes ready is an ordinary run: its later failure follows the
        // policy (`never`: failed).
        i.handle(
            Input::Restart {
                grace: None,
                reason: "rollout".into(),
                hold: true,
            },
            9,
        );
        i.handle(Input::Exited(ExitStatus::Exited { code: 0 }), 10);
        i.handle(Input::Spawned { pid: Some(4) }, 11);
        i.handle(Input::ReadinessPassed, 12);
        i.handle(Input::Exited(ExitStatus::Exited { code: 1 }), 13);
        assert_eq!(i.state(), State::Exited);
        assert!(!i.held());
    }

    #[test]
    fn reconfigure_applies_to_the_next_decision() {
        let (mut i, _) = Instance::launch(cfg(false, RestartPolicy::Never));
        i.handle(Input::Spawned { pid: Some(1) }, 0);
        i.reconfigure(cfg(true, RestartPolicy::Never));
        i.handle(restart(None), 1);
        let fx = i.handle(Input::Exited(SEGV), 2);
        assert_eq!(fx.last(), Some(&Effect::Spawn));
        // The new settings have readiness: the new run waits for it.
        let fx = i.handle(Input::Spawned { pid: Some(2) }, 3);
        assert!(fx.contains(&Effect::StartReadiness {
            timeout: Duration::from_secs(5)
        }));
    }

    fn any_policy() -> impl Strategy<Value = RestartPolicy> {
        prop_oneof![
            Just(RestartPolicy::Never),
            Just(RestartPolicy::OnFailure),
            Just(RestartPolicy::Always)
        ]
    }

    proptest! {
        /// Any order of inputs keeps the invariants.
        #[test]
        fn invariants_hold_for_any_input_order(
            readiness in any::<bool>(),
            policy in any_policy(),
            seed in any::<u64>(),
            watchdog in any::<bool>(),
            inputs in proptest::collection::vec((any_input(), 0u64..100_000), 0..60),
        ) {
            let mut c = cfg(readiness, policy);
            c.seed = seed;
            c.watchdog = watchdog.then_some((Duration::from_secs(1), Signal::KILL));
            let (mut inst, first) = Instance::launch(c);
            let mut all: Vec<Effect> = first;
            // A spawn may only be asked for when no process of this instance is live and
            // no other spawn is pending.
            let mut live_or_pending = true;
            let mut seen_terminal: Option<State> = None;
            let mut asked = false;
            let mut now = 0;
            for (input, dt) in inputs {
                now += dt;
                let exit_while_live = match &input {
                    Input::Exited(st) if inst.has_live_process() => Some(*st),
                    _ => None,
                };
                let fx = inst.handle(input.clone(), now);
                if matches!(input, Input::SpawnFailed { .. }) && !inst.spawn_pending() && !inst.has_live_process() {
                    live_or_pending = false;
                }
                if let Some(st) = exit_while_live {
                    live_or_pending = false;
                    // The exit status is preserved exactly.
                    prop_assert_eq!(inst.last_exit(), Some(st));
                }
                for e in &fx {
                    match e {
                        Effect::Spawn => {
                            prop_assert!(!live_or_pending, "a second process for one key");
                            live_or_pending = true;
                        }
                        Effect::Stop { .. } => prop_assert!(inst.has_live_process()),
                        _ => {}
                    }
                }
                // Terminal states stay terminal and absorb everything.
                if let Some(t) = seen_terminal {
                    prop_assert_eq!(inst.state(), t);
                    prop_assert!(fx.is_empty());
                }
                if inst.state().is_terminal() {
                    seen_terminal = Some(inst.state());
                    prop_assert!(!inst.has_live_process());
                }
                // Ready implies the state is Ready.
                prop_assert!(!inst.ready() || inst.state() == State::Ready);
                // The breaker is open only while waiting in Restarting.
                if inst.breaker() == BreakerState::Open {
                    prop_assert!(matches!(inst.state(), State::Restarting | State::Terminated));
                }
                // Never restarts under `never` unless a restart was asked for.
                if policy == RestartPolicy::Never {
                    for e in &fx {
                        match e {
                            Effect::Emit(EventKind::RestartRequested { .. }) => asked = true,
                            Effect::Spawn => {
                                prop_assert!(asked, "a restart nobody asked for under never");
                                asked = false;
                            }
                            _ => {}
                        }
                    }
                    prop_assert!(inst.state() != State::Restarting || inst.held());
                }
                // Held only in Restarting, waiting for the shell.
                prop_assert!(!inst.held() || inst.state() == State::Restarting);
                all.extend(fx);
            }
            let names: Vec<&str> = events(&all);
            prop_assert_eq!(names[0], "launched");
            prop_assert_eq!(names.iter().filter(|n| **n == "launched").count(), 1);
            // Every `ready` follows a `started` of some run.
            if let Some(r) = names.iter().position(|n| *n == "ready") {
                prop_assert!(names[..r].contains(&"started"));
            }
        }
    }

    #[test]
    fn oom_kill_is_reported_as_such_and_counts_as_a_failure() {
        let (mut i, _) = Instance::launch(cfg(true, RestartPolicy::OnFailure));
        i.handle(Input::Spawned { pid: Some(7) }, 0);
        i.handle(Input::ReadinessPassed, 1);
        assert!(i
            .handle(
                Input::OomKilled {
                    limit_bytes: Some(64 << 20)
                },
                2
            )
            .is_empty());
        let fx = i.handle(
            Input::Exited(ExitStatus::Signaled {
                signal: 9,
                core_dumped: false,
            }),
            3,
        );
        assert!(
            fx.contains(&Effect::Emit(EventKind::OomKilled {
                limit_bytes: Some(64 << 20),
                signal: 9
            })),
            "{fx:?}"
        );
        assert!(!fx
            .iter()
            .any(|e| matches!(e, Effect::Emit(EventKind::Crashed { .. }))));
    }

    /// An OOM kill after ready ends the instance `crashed` (with the OOM reason), not
    /// `failed`, which is for launches that did not give a running instance.
    #[test]
    fn an_oom_kill_after_ready_ends_crashed_with_the_reason() {
        let (mut i, _) = Instance::launch(cfg(true, RestartPolicy::Never));
        i.handle(Input::Spawned { pid: Some(7) }, 0);
        i.handle(Input::ReadinessPassed, 1);
        assert_eq!(i.state(), State::Ready);
        i.handle(
            Input::OomKilled {
                limit_bytes: Some(64 << 20),
            },
            2,
        );
        i.handle(
            Input::Exited(ExitStatus::Signaled {
                signal: 9,
                core_dumped: false,
            }),
            3,
        );
        assert_eq!(i.state(), State::Crashed);
        assert!(
            i.failure().is_some_and(|f| f.contains("OOM killer")),
            "{:?}",
            i.failure()
        );
    }

    #[test]
    fn a_run_lost_with_its_keeper_is_reported_as_lost_and_restarted() {
        let killed = ExitStatus::Signaled {
            signal: 9,
            core_dumped: false,
        };
        let reason = "killed with the keeper, which died".to_owned();
        // A ready run lost with its keeper under `policy`: the instance, and the exit's
        // effects.
        let lost_when_ready = |policy| {
            let (mut i, _) = Instance::launch(cfg(true, policy));
            i.handle(Input::Spawned { pid: Some(7) }, 0);
            i.handle(Input::ReadinessPassed, 1);
            i.handle(
                Input::Lost {
                    reason: reason.clone(),
                },
                2,
            );
            let fx = i.handle(Input::Exited(killed), 3);
            (i, fx)
        };
        // Ready: `lost` in place of `crashed`, the reason kept, the policy restarts.
        let (mut i, fx) = lost_when_ready(RestartPolicy::Always);
        assert!(
            fx.contains(&Effect::Emit(EventKind::Lost {
                reason: reason.clone()
            })),
            "{fx:?}"
        );
        assert!(!fx
            .iter()
            .any(|e| matches!(e, Effect::Emit(EventKind::Crashed { .. }))));
        assert_eq!(i.state(), State::Restarting);
        // The next run starts afresh: a plain SIGKILL is a crash again.
        i.handle(Input::RestartDue, 10_000);
        i.handle(Input::Spawned { pid: Some(8) }, 10_001);
        i.handle(Input::ReadinessPassed, 10_002);
        let fx = i.handle(Input::Exited(killed), 10_003);
        assert!(
            fx.iter()
                .any(|e| matches!(e, Effect::Emit(EventKind::Crashed { .. }))),
            "{fx:?}"
        );
        // During start-up: the launch fails with the reason.
        let (mut i, _) = Instance::launch(cfg(true, RestartPolicy::Never));
        i.handle(Input::Spawned { pid: Some(7) }, 0);
        i.handle(
            Input::Lost {
                reason: reason.clone(),
            },
            1,
        );
        let fx = i.handle(Input::Exited(killed), 2);
        assert_eq!(
            launch_failed_reason(&fx).as_deref(),
            Some("killed with the keeper, which died during start-up")
        );
        assert_eq!(
            i.failure(),
            Some("killed with the keeper, which died during start-up")
        );
        // After ready, with no restart: failed (as a run found lost after a daemon
        // restart is), the reason kept.
        let (i, _) = lost_when_ready(RestartPolicy::Never);
        assert_eq!(i.state(), State::Failed);
        assert_eq!(i.failure(), Some(reason.as_str()));
    }

    fn launch_failed_reason(fx: &[Effect]) -> Option<String> {
        fx.iter().find_map(|e| match e {
            Effect::Emit(EventKind::LaunchFailed { reason, .. }) => Some(reason.clone()),
            _ => None,
        })
    }

    /// sd_notify `MAINPID=`: the instance's pid follows the new main process while a run
    /// lives, changes nothing else, and is ignored between runs.
    #[test]
    fn mainpid_moves_the_pid_of_a_live_run_only() {
        let (mut i, _) = Instance::launch(cfg(true, RestartPolicy::Always));
        assert!(i.handle(Input::MainPid { pid: 9 }, 0).is_empty());
        assert_eq!(i.pid(), None, "no run yet");
        i.handle(Input::Spawned { pid: Some(7) }, 0);
        assert!(i.handle(Input::MainPid { pid: 8 }, 1).is_empty());
        assert_eq!((i.pid(), i.state()), (Some(8), State::Starting));
        i.handle(Input::ReadinessPassed, 2);
        i.handle(Input::MainPid { pid: 9 }, 3);
        assert_eq!((i.pid(), i.state()), (Some(9), State::Ready));
        i.handle(
            Input::Exited(ExitStatus::Signaled {
                signal: 9,
                core_dumped: false,
            }),
            4,
        );
        assert_eq!(i.state(), State::Restarting);
        i.handle(Input::MainPid { pid: 10 }, 5);
        assert_ne!(i.pid(), Some(10), "between runs");
    }

    /// Issue 12: a program that daemonizes (main exits 0, processes left in its cgroup)
    /// fails its launch with a message that says so, with and without readiness checks,
    /// and ends `failed`, not `exited`.
    #[test]
    fn a_daemonizing_program_fails_with_a_message_that_says_so() {
        for readiness in [true, false] {
            let (mut i, _) = Instance::launch(cfg(readiness, RestartPolicy::Never));
            i.handle(Input::Spawned { pid: Some(7) }, 0);
            assert!(i.handle(Input::Daemonized { left: 1 }, 1).is_empty());
            let fx = i.handle(Input::Exited(ExitStatus::Exited { code: 0 }), 2);
            let reason = launch_failed_reason(&fx).expect("launch_failed");
            assert!(
                reason.contains("daemonized") && reason.contains("foreground"),
                "{reason}"
            );
            assert_eq!(i.state(), State::Failed, "readiness {readiness}");
            assert_eq!(i.failure(), Some(reason.as_str()));
        }
    }

    /// The control: the same exit without leftovers is a plain exit.
    #[test]
    fn an_exit_0_without_leftovers_is_not_a_daemon() {
        let (mut i, _) = Instance::launch(cfg(false, RestartPolicy::Never));
        i.handle(Input::Spawned { pid: Some(7) }, 0);
        let fx = i.handle(Input::Exited(ExitStatus::Exited { code: 0 }), 2);
        assert_eq!(launch_failed_reason(&fx), None);
        assert_eq!(i.state(), State::Exited);
    }

    /// Leftovers at a requested stop are not a daemon: terminated as usual.
    #[test]
    fn leftovers_at_a_stop_are_not_a_daemon() {
        let (mut i, _) = Instance::launch(cfg(false, RestartPolicy::Never));
        i.handle(Input::Spawned { pid: Some(7) }, 0);
        i.handle(Input::Terminate { grace: None }, 1);
        assert!(i.handle(Input::Daemonized { left: 2 }, 2).is_empty());
        let fx = i.handle(Input::Exited(ExitStatus::Exited { code: 0 }), 3);
        assert_eq!(launch_failed_reason(&fx), None);
        assert_eq!(i.state(), State::Terminated);
    }
}
