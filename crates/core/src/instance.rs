//! The instance lifecycle state machine: inputs in, effects out.
//!
//! ```text
//!             Spawned (readiness configured)         ReadinessPassed
//!  Starting ────────────────────────────────────▶ Starting(pid) ───────────────▶ Ready
//!     │ SpawnFailed         │ Exited: Failed            │ ReadinessTimedOut        │ Exited
//!     ▼                     ▼                           ▼                          ▼
//!   Failed               Failed                Stopping(then Failed)     Exited | Crashed
//!                                                       │ Exited
//!  Starting | Ready ── Terminate ──▶ Stopping ──────────┴── Exited ──▶ Terminated (or Failed)
//! ```
//!
//! One sentence per transition:
//! - **Launch** ([`Instance::launch`]): a new instance is `Starting`; it emits `launched` and
//!   asks for a spawn, exactly once.
//! - **Spawned**: the process exists; emit `started`. Without readiness the instance is
//!   `Ready` at once; with readiness the shell starts the readiness checks and its timeout.
//! - **SpawnFailed**: the process never existed; `Failed` with `launch_failed`.
//! - **ReadinessPassed** (while `Starting` with a process): `Ready`, emit `ready`.
//! - **ReadinessTimedOut** (while `Starting`): emit `launch_failed`, stop the process with the
//!   manifest's signal and grace, and end `Failed` once it is gone.
//! - **Exited** while `Starting`: the launch failed; emit the exit (`exited`/`crashed`) and
//!   `launch_failed` with the status. Readiness is bounded by liveness this way: a death ends
//!   the wait at once.
//! - **Exited** while `Ready`: `Exited` (an exit code) or `Crashed` (a signal).
//! - **Terminate** while `Starting` or `Ready`: `Stopping`, emit `terminating`, stop the
//!   process group. A terminate that arrives before the spawn reported back is remembered
//!   and carried out on `Spawned`.
//! - **Exited** while `Stopping`: emit `terminated` with the status, end `Terminated`
//!   (`Failed` if the stop was caused by a failed launch).
//! - Terminal states (`Exited`, `Crashed`, `Failed`, `Terminated`) absorb every input.
//!
//! Restarts (the supervision work) will add a transition out of `Exited`/`Crashed`; until
//! then the registry replaces a terminal instance with a new one on the next launch.

use std::time::Duration;

use crate::event::{EventKind, ExitStatus};
use crate::signal::Signal;
use crate::spec::Shutdown;

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Launched; spawning, or spawned and waiting for readiness.
    Starting,
    /// Running and ready.
    Ready,
    /// Being stopped: signal sent, waiting for every process to be gone.
    Stopping,
    /// Exited by itself with an exit code (0 or not) after it was ready.
    Exited,
    /// Killed by a signal it did not get from bulkhead, after it was ready.
    Crashed,
    /// The launch failed (spawn error, exit before ready, readiness timeout).
    Failed,
    /// Stopped on request; every process is gone.
    Terminated,
}

impl State {
    pub const ALL: [State; 7] = [
        State::Starting,
        State::Ready,
        State::Stopping,
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
    /// The driver could not start it.
    SpawnFailed { reason: String },
    /// Every readiness signal passed.
    ReadinessPassed,
    /// The readiness backstop fired.
    ReadinessTimedOut,
    /// Every process of the instance is gone; this is the main process's status.
    Exited(ExitStatus),
    /// Stop it; `grace` overrides the manifest's.
    Terminate { grace: Option<Duration> },
}

/// What the state machine asks the shell to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Start the process through the driver; answer with `Spawned` or `SpawnFailed`.
    Spawn,
    /// Start the readiness checks and the backstop; answer with `ReadinessPassed` or
    /// `ReadinessTimedOut`.
    StartReadiness { timeout: Duration },
    /// Stop the readiness checks and the backstop.
    StopReadiness,
    /// Send `signal` to the whole instance, SIGKILL after `grace`; answer with `Exited`.
    Stop { signal: Signal, grace: Duration },
    /// Publish an event.
    Emit(EventKind),
}

/// The lifecycle of one instance. Identity (key, spec) lives with the shell; this holds
/// just what the transitions need.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    state: State,
    pid: Option<u32>,
    spawned: bool,
    ready: bool,
    last_exit: Option<ExitStatus>,
    failure: Option<String>,
    pending_stop: Option<Duration>,
    readiness_timeout: Option<Duration>,
    shutdown: Shutdown,
}

impl Instance {
    /// A new instance. `readiness_timeout` is `None` when the workload has no readiness
    /// checks. Returns the first effects: emit `launched`, spawn.
    pub fn launch(
        readiness_timeout: Option<Duration>,
        shutdown: Shutdown,
    ) -> (Instance, Vec<Effect>) {
        let inst = Instance {
            state: State::Starting,
            pid: None,
            spawned: false,
            ready: false,
            last_exit: None,
            failure: None,
            pending_stop: None,
            readiness_timeout,
            shutdown,
        };
        (inst, vec![Effect::Emit(EventKind::Launched), Effect::Spawn])
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
    /// Why the launch failed, once it has.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }
    /// A process was spawned and has not been seen to exit.
    pub fn has_live_process(&self) -> bool {
        self.spawned && self.last_exit.is_none() && !self.state.is_terminal()
    }

    /// Applies one input and returns the effects to carry out, in order.
    pub fn handle(&mut self, input: Input) -> Vec<Effect> {
        use State::*;
        let mut fx = Vec::new();
        if self.state.is_terminal() {
            return fx;
        }
        match (self.state, input) {
            (Starting, Input::Spawned { pid }) if !self.spawned => {
                self.spawned = true;
                self.pid = pid;
                fx.push(Effect::Emit(EventKind::Started { pid }));
                if let Some(grace) = self.pending_stop.take() {
                    self.begin_stop(grace, &mut fx);
                } else if let Some(timeout) = self.readiness_timeout {
                    fx.push(Effect::StartReadiness { timeout });
                } else {
                    self.become_ready(&mut fx);
                }
            }
            (Starting, Input::SpawnFailed { reason }) if !self.spawned() => {
                let reason = format!("spawn failed: {reason}");
                self.failure = Some(reason.clone());
                self.state = Failed;
                fx.push(Effect::Emit(EventKind::LaunchFailed { reason }));
            }
            (Starting, Input::ReadinessPassed) if self.spawned() => {
                fx.push(Effect::StopReadiness);
                self.become_ready(&mut fx);
            }
            (Starting, Input::ReadinessTimedOut) if self.spawned() => {
                let timeout = self.readiness_timeout.unwrap_or_default();
                let reason = format!(
                    "not ready within the readiness timeout of {}",
                    crate::duration::format(timeout)
                );
                self.failure = Some(reason.clone());
                fx.push(Effect::StopReadiness);
                fx.push(Effect::Emit(EventKind::LaunchFailed { reason }));
                self.begin_stop(self.shutdown.grace, &mut fx);
            }
            (Starting, Input::Exited(status)) if self.spawned() => {
                self.last_exit = Some(status);
                let reason = format!("exited during start-up with {status}");
                self.failure = Some(reason.clone());
                self.state = Failed;
                fx.push(Effect::StopReadiness);
                fx.push(Effect::Emit(EventKind::for_exit(status)));
                fx.push(Effect::Emit(EventKind::LaunchFailed { reason }));
            }
            (Starting, Input::Terminate { grace }) => {
                let grace = grace.unwrap_or(self.shutdown.grace);
                if self.spawned() {
                    fx.push(Effect::StopReadiness);
                    self.begin_stop(grace, &mut fx);
                } else {
                    // The spawn is in flight: stop as soon as it reports back.
                    self.pending_stop = Some(grace);
                }
            }
            (Ready, Input::Exited(status)) => {
                self.last_exit = Some(status);
                self.ready = false;
                self.state = match status {
                    ExitStatus::Exited { .. } => Exited,
                    ExitStatus::Signaled { .. } => Crashed,
                };
                fx.push(Effect::Emit(EventKind::for_exit(status)));
            }
            (Ready, Input::Terminate { grace }) => {
                self.begin_stop(grace.unwrap_or(self.shutdown.grace), &mut fx);
            }
            (Stopping, Input::Exited(status)) => {
                self.last_exit = Some(status);
                self.state = if self.failure.is_some() {
                    Failed
                } else {
                    Terminated
                };
                fx.push(Effect::Emit(EventKind::Terminated { status }));
            }
            // Everything else is a duplicate or out-of-order report: ignore it. In
            // particular a second Spawned never creates a second process, and a
            // Terminate while Stopping does not restart the grace period.
            _ => {}
        }
        fx
    }

    fn spawned(&self) -> bool {
        self.spawned
    }

    fn become_ready(&mut self, fx: &mut Vec<Effect>) {
        self.state = State::Ready;
        self.ready = true;
        fx.push(Effect::Emit(EventKind::Ready));
    }

    fn begin_stop(&mut self, grace: Duration, fx: &mut Vec<Effect>) {
        self.state = State::Stopping;
        self.ready = false;
        let signal = self.shutdown.signal;
        fx.push(Effect::Emit(EventKind::Terminating {
            signal: signal.number(),
            grace_ms: grace.as_millis() as u64,
        }));
        fx.push(Effect::Stop { signal, grace });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn launch(readiness: bool) -> (Instance, Vec<Effect>) {
        Instance::launch(
            readiness.then_some(Duration::from_secs(5)),
            Shutdown::default(),
        )
    }

    fn events(fx: &[Effect]) -> Vec<&'static str> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Emit(k) => Some(k.name()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn happy_path_without_readiness() {
        let (mut i, fx) = launch(false);
        assert_eq!(fx, vec![Effect::Emit(EventKind::Launched), Effect::Spawn]);
        let fx = i.handle(Input::Spawned { pid: Some(42) });
        assert_eq!(events(&fx), vec!["started", "ready"]);
        assert_eq!(i.state(), State::Ready);
        let fx = i.handle(Input::Terminate { grace: None });
        assert_eq!(i.state(), State::Stopping);
        assert!(fx.contains(&Effect::Stop {
            signal: Signal::TERM,
            grace: Duration::from_secs(10)
        }));
        let st = ExitStatus::Signaled {
            signal: 15,
            core_dumped: false,
        };
        let fx = i.handle(Input::Exited(st));
        assert_eq!(fx, vec![Effect::Emit(EventKind::Terminated { status: st })]);
        assert_eq!(i.state(), State::Terminated);
        assert_eq!(i.last_exit(), Some(st));
    }

    #[test]
    fn readiness_then_crash_keeps_signal_and_core() {
        let (mut i, _) = launch(true);
        let fx = i.handle(Input::Spawned { pid: Some(7) });
        assert_eq!(
            fx[1],
            Effect::StartReadiness {
                timeout: Duration::from_secs(5)
            }
        );
        assert_eq!(i.state(), State::Starting);
        i.handle(Input::ReadinessPassed);
        assert_eq!(i.state(), State::Ready);
        let st = ExitStatus::Signaled {
            signal: 11,
            core_dumped: true,
        };
        let fx = i.handle(Input::Exited(st));
        assert_eq!(
            fx,
            vec![Effect::Emit(EventKind::Crashed {
                signal: 11,
                core_dumped: true
            })]
        );
        assert_eq!(i.state(), State::Crashed);
    }

    #[test]
    fn exit_during_startup_fails_the_launch_with_the_status() {
        let (mut i, _) = launch(true);
        i.handle(Input::Spawned { pid: Some(7) });
        let fx = i.handle(Input::Exited(ExitStatus::Exited { code: 3 }));
        assert_eq!(events(&fx), vec!["exited", "launch_failed"]);
        assert_eq!(i.state(), State::Failed);
        assert_eq!(i.failure(), Some("exited during start-up with exit code 3"));
    }

    #[test]
    fn readiness_timeout_stops_then_fails() {
        let (mut i, _) = launch(true);
        i.handle(Input::Spawned { pid: Some(7) });
        let fx = i.handle(Input::ReadinessTimedOut);
        assert_eq!(events(&fx), vec!["launch_failed", "terminating"]);
        assert_eq!(i.state(), State::Stopping);
        i.handle(Input::Exited(ExitStatus::Signaled {
            signal: 15,
            core_dumped: false,
        }));
        assert_eq!(i.state(), State::Failed);
        assert!(i.failure().unwrap().contains("readiness timeout of 5s"));
    }

    #[test]
    fn terminate_during_spawn_is_carried_out_after_it() {
        let (mut i, _) = launch(true);
        assert!(i
            .handle(Input::Terminate {
                grace: Some(Duration::from_millis(5))
            })
            .is_empty());
        let fx = i.handle(Input::Spawned { pid: Some(9) });
        assert_eq!(events(&fx), vec!["started", "terminating"]);
        assert!(fx.contains(&Effect::Stop {
            signal: Signal::TERM,
            grace: Duration::from_millis(5)
        }));
    }

    #[test]
    fn spawn_failure() {
        let (mut i, _) = launch(false);
        let fx = i.handle(Input::SpawnFailed {
            reason: "no such file".into(),
        });
        assert_eq!(events(&fx), vec!["launch_failed"]);
        assert_eq!(i.state(), State::Failed);
        assert_eq!(i.failure(), Some("spawn failed: no such file"));
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
            "[a-z ]{0,10}".prop_map(|reason| Input::SpawnFailed { reason }),
            Just(Input::ReadinessPassed),
            Just(Input::ReadinessTimedOut),
            any_status().prop_map(Input::Exited),
            proptest::option::of(0u64..10_000).prop_map(|g| Input::Terminate {
                grace: g.map(Duration::from_millis)
            }),
        ]
    }

    proptest! {
        /// Any order of inputs keeps the invariants.
        #[test]
        fn invariants_hold_for_any_input_order(readiness in any::<bool>(), inputs in proptest::collection::vec(any_input(), 0..40)) {
            let (mut inst, first) = launch(readiness);
            let mut all: Vec<Effect> = first;
            let mut first_exit_while_live: Option<ExitStatus> = None;
            let mut seen_terminal: Option<State> = None;
            for input in inputs {
                let live_before = inst.has_live_process();
                if let (Input::Exited(st), true) = (&input, live_before) {
                    first_exit_while_live.get_or_insert(*st);
                }
                let fx = inst.handle(input);
                // Terminal states stay terminal and absorb everything.
                if let Some(t) = seen_terminal {
                    prop_assert_eq!(inst.state(), t);
                    prop_assert!(fx.is_empty());
                }
                if inst.state().is_terminal() {
                    seen_terminal = Some(inst.state());
                    prop_assert!(!inst.has_live_process());
                }
                // Stop only while a process exists.
                for e in &fx {
                    if matches!(e, Effect::Stop { .. }) {
                        prop_assert!(inst.has_live_process());
                    }
                }
                // Ready implies the state is Ready.
                prop_assert_eq!(inst.ready(), inst.state() == State::Ready);
                all.extend(fx);
            }
            // At most one process per instance, hence per key: one spawn request ever.
            prop_assert_eq!(all.iter().filter(|e| **e == Effect::Spawn).count(), 1);
            // Events: launched first, at most one started, ready only after started,
            // at most one exit-like event.
            let names: Vec<&str> = events(&all);
            prop_assert_eq!(names[0], "launched");
            prop_assert!(names.iter().filter(|n| **n == "started").count() <= 1);
            if let Some(r) = names.iter().position(|n| *n == "ready") {
                prop_assert!(names[..r].contains(&"started"));
            }
            prop_assert!(names.iter().filter(|n| matches!(**n, "exited" | "crashed" | "terminated")).count() <= 1);
            // The exit status is preserved exactly.
            prop_assert_eq!(inst.last_exit(), first_exit_while_live);
            if let Some(st) = first_exit_while_live {
                let reported = all.iter().find_map(|e| match e {
                    Effect::Emit(EventKind::Terminated { status }) => Some(*status),
                    Effect::Emit(k @ (EventKind::Exited { .. } | EventKind::Crashed { .. })) => Some(match k {
                        EventKind::Exited { exit_code } => ExitStatus::Exited { code: *exit_code },
                        EventKind::Crashed { signal, core_dumped } => ExitStatus::Signaled { signal: *signal, core_dumped: *core_dumped },
                        _ => unreachable!(),
                    }),
                    _ => None,
                });
                prop_assert_eq!(reported, Some(st));
            }
        }
    }
}
