//! One instance's Pod: the [`InstanceHandle`], fed by the namespace's shared watcher.
//!
//! Lifecycle as the handle sees it:
//!
//! | the Pod | the handle |
//! |---|---|
//! | created (`201`) | registered with the watcher; waits for the container to start |
//! | container running (or already ended) | `started`; the log follower starts |
//! | `Ready` condition true/false | [`engine_readiness`](InstanceHandle::engine_readiness) follows it |
//! | container terminated, or Pod `Failed` (evicted) | the exit is recorded (`OOMKilled` kept for [`exit_cause`](InstanceHandle::exit_cause)); the Pod is deleted |
//! | deleted (the watch's `Delete`, or missing on a relist) | [`wait`](InstanceHandle::wait) resolves with the recorded exit (SIGKILL if none was seen) |
//!
//! **`wait` resolves only once the Pod is gone from the API**, not when its container
//! ended: the key's Pod name is then free, so a restart never meets its predecessor, and
//! a Pod on a node that cannot confirm its end keeps the key fenced (never two runs).
//!
//! Signals: a Pod takes none through the API. `TERM` is a delete with the manifest's
//! grace (`gracePeriodSeconds`: the kubelet sends SIGTERM, then SIGKILL after it),
//! `KILL` a delete with a grace of 1 s (0 would remove the object before the kubelet has
//! killed anything); any other signal is refused with `Unsupported`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bulkhead_core::event::ExitStatus;
use bulkhead_core::signal::Signal;
use bulkhead_driver::{
    ExitCause, InstanceHandle, KillDeadline, OutputTap, SignalError, Stats, StatsError, Stream,
};
use futures_util::AsyncReadExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, LogParams};
use kube::Api;
use tokio::sync::watch;

use crate::pod::CONTAINER;
use crate::status::{self, Ended};
use crate::watch::Watcher;

/// The grace of a `KILL`: the smallest that still lets the kubelet do the killing.
pub const KILL_GRACE_SECONDS: i64 = 1;
/// How long a finished Pod waits for its log to be read before it is deleted.
pub const LOG_DRAIN: Duration = Duration::from_secs(10);

/// Why a Pod's container did not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartFailure {
    /// It waits for something that will not come by itself (image pull, config).
    Stuck(String),
    /// The runtime could not run the program (missing, not executable).
    Exec(String),
}

/// One Pod.
pub struct PodHandle {
    me: std::sync::Weak<PodHandle>,
    pub(crate) name: String,
    pub(crate) namespace: String,
    pub(crate) instance: String,
    pub(crate) api: Api<Pod>,
    pub(crate) metrics: Arc<crate::metrics::Availability>,
    usage: Mutex<crate::metrics::Reading>,
    pub(crate) watcher: Arc<Watcher>,
    /// The manifest's grace, as `gracePeriodSeconds`.
    pub(crate) grace_seconds: i64,
    pub(crate) memory_limit: Option<u64>,
    /// Whether the daemon waits for the Pod's `Ready` condition.
    pub(crate) readiness: bool,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) tap: Arc<OutputTap>,
    /// Set once the Pod is gone: the exit.
    status: watch::Sender<Option<ExitStatus>>,
    ready: watch::Sender<bool>,
    /// Started, or cannot start (why): what a spawn waits for.
    pub(crate) start: watch::Sender<Option<Result<(), StartFailure>>>,
    state: Mutex<Inner>,
    log_started: AtomicBool,
    /// Set once the log follower has ended (the container's log is all in the tap).
    logs_done: Arc<watch::Sender<bool>>,
    /// Woken when the end is recorded.
    ended_notify: tokio::sync::Notify,
    /// Tailing from now (adoption) rather than from the start.
    pub(crate) logs_from_now: bool,
    /// Set once the Pod has been seen to exist (its create answered, or an event): only
    /// then can a GET that finds nothing mean it is gone.
    pub(crate) seen: AtomicBool,
}

#[derive(Default)]
struct Inner {
    ended: Option<Ended>,
}

impl PodHandle {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: String,
        namespace: String,
        instance: String,
        api: Api<Pod>,
        metrics: Arc<crate::metrics::Availability>,
        watcher: Arc<Watcher>,
        grace_seconds: i64,
        memory_limit: Option<u64>,
        readiness: bool,
        env: Vec<(String, String)>,
        logs_from_now: bool,
    ) -> Arc<PodHandle> {
        Arc::new_cyclic(|me| PodHandle {
            seen: AtomicBool::new(false),
            me: me.clone(),
            name,
            namespace,
            instance,
            api,
            metrics,
            usage: Mutex::new(crate::metrics::Reading::default()),
            watcher,
            grace_seconds,
            memory_limit,
            readiness,
            env,
            tap: Arc::new(OutputTap::default()),
            status: watch::channel(None).0,
            ready: watch::channel(false).0,
            start: watch::channel(None).0,
            state: Mutex::new(Inner::default()),
            log_started: AtomicBool::new(false),
            logs_done: Arc::new(watch::channel(false).0),
            ended_notify: tokio::sync::Notify::new(),
            logs_from_now,
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `namespace/name`.
    pub fn describe(&self) -> String {
        format!("pod {}/{}", self.namespace, self.name)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The environment the Pod's container was given.
    pub fn env(&self) -> Vec<(String, String)> {
        self.env.clone()
    }

    /// The exit seen on the Pod, before the Pod is gone.
    pub fn ended_status(&self) -> Option<ExitStatus> {
        self.inner().ended.as_ref().map(|e| e.status)
    }

    /// The node's eviction message, when the Pod was evicted.
    pub fn evicted(&self) -> Option<String> {
        self.inner().ended.as_ref().and_then(|e| e.evicted.clone())
    }

    /// Deletes the Pod with `grace` seconds (a second delete may shorten a first one's
    /// grace, never lengthen it). A Pod already gone is fine.
    pub async fn delete(&self, grace: i64) {
        let dp = DeleteParams {
            grace_period_seconds: Some(grace.max(0) as u32),
            ..DeleteParams::default()
        };
        match self.api.delete(&self.name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => tracing::warn!("cannot delete {}: {e}", self.describe()),
        }
    }

    fn delete_in_background(self: &Arc<Self>, grace: i64) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let me = self.clone();
            rt.spawn(async move { me.delete(grace).await });
        }
    }

    /// Follows the container's log (the log API, `follow=true`) into the tap; stdout and
    /// stderr arrive merged (the API does not tell them apart) and go to stdout.
    fn follow_logs(self: &Arc<Self>) {
        if self.log_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = Arc::downgrade(self);
        let api = self.api.clone();
        let name = self.name.clone();
        let tap = self.tap.clone();
        let done = self.logs_done.clone();
        let mut since: Option<tokio::time::Instant> =
            self.logs_from_now.then(tokio::time::Instant::now);
        tokio::spawn(async move {
            loop {
                let lp = LogParams {
                    container: Some(CONTAINER.to_owned()),
                    follow: true,
                    // After a broken stream: from a little before the last byte (lines of
                    // that second may repeat; none is lost).
                    since_seconds: since.map(|t| t.elapsed().as_secs() as i64 + 1),
                    ..LogParams::default()
                };
                match api.log_stream(&name, &lp).await {
                    Ok(reader) => {
                        let mut reader = Box::pin(reader);
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            match reader.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    since = Some(tokio::time::Instant::now());
                                    tap.write(Stream::Stdout, &buf[..n]);
                                }
                            }
                        }
                    }
                    Err(e) => tracing::debug!("log stream of pod {name}: {e}"),
                }
                // The stream ends when the container does (its end may reach the watch
                // a moment later: looked at after a pause); else it broke: go on.
                let over = || {
                    me.upgrade()
                        .is_none_or(|h| h.inner().ended.is_some() || h.status.borrow().is_some())
                };
                if let Some(h) = me.upgrade() {
                    let woken = h.ended_notify.notified();
                    tokio::pin!(woken);
                    woken.as_mut().enable();
                    if !over() {
                        let _ = tokio::time::timeout(Duration::from_millis(500), woken).await;
                    }
                }
                if over() {
                    break;
                }
            }
            tap.close_all();
            done.send_replace(true);
        });
    }

    fn record_end(self: &Arc<Self>, ended: Ended) {
        let first = {
            let mut st = self.inner();
            let first = st.ended.is_none();
            if first {
                st.ended = Some(ended.clone());
            }
            first
        };
        if !first {
            return;
        }
        self.ended_notify.notify_waiters();
        if let Some(msg) = &ended.evicted {
            tracing::warn!("{} was evicted: {msg}", self.describe());
        }
        // A finished Pod is deleted (`wait` resolves once it is gone), after its log has
        // been read to the end: the log goes with the Pod.
        if self.log_started.load(Ordering::SeqCst) && !*self.logs_done.borrow() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let me = self.clone();
                rt.spawn(async move {
                    let mut done = me.logs_done.subscribe();
                    let _ = tokio::time::timeout(LOG_DRAIN, done.wait_for(|d| *d)).await;
                    me.delete(KILL_GRACE_SECONDS).await;
                });
                return;
            }
        }
        self.delete_in_background(KILL_GRACE_SECONDS);
    }
}

impl PodHandle {
    /// The Pod as the API now has it (from the watcher, or a create's answer).
    pub(crate) fn observe(self: &Arc<Self>, pod: &Pod) {
        self.seen.store(true, Ordering::SeqCst);
        let o = status::observe(pod);
        self.ready.send_if_modified(|r| {
            let changed = *r != o.ready;
            *r = o.ready;
            changed
        });
        if let Some(reason) = &o.stuck {
            self.start.send_if_modified(|s| {
                let first = s.is_none();
                if first {
                    *s = Some(Err(StartFailure::Stuck(reason.clone())));
                }
                first
            });
        }
        if let Some(msg) = &o.exec_failed {
            self.start.send_if_modified(|s| {
                let first = s.is_none();
                if first {
                    *s = Some(Err(StartFailure::Exec(msg.clone())));
                }
                first
            });
        }
        if o.started {
            self.start.send_if_modified(|s| {
                let first = s.is_none();
                if first {
                    *s = Some(Ok(()));
                }
                first
            });
        }
        if o.started {
            self.follow_logs();
        }
        if let Some(e) = o.ended {
            self.record_end(e);
        }
    }

    /// The Pod no longer exists (its last known object, if the event carried one).
    pub(crate) fn gone(self: &Arc<Self>, last: Option<&Pod>) {
        if let Some(p) = last {
            let o = status::observe(p);
            let mut st = self.inner();
            if st.ended.is_none() {
                st.ended = o.ended;
            }
        }
        let exit = self
            .inner()
            .ended
            .as_ref()
            .map_or_else(status::killed, |e| e.status);
        self.ready.send_replace(false);
        self.start.send_if_modified(|s| {
            let first = s.is_none();
            if first {
                *s = Some(Err(StartFailure::Stuck(
                    "the pod was deleted before its container started".into(),
                )));
            }
            first
        });
        self.watcher.unregister(&self.name);
        self.status.send_if_modified(|s| {
            let first = s.is_none();
            if first {
                *s = Some(exit);
            }
            first
        });
    }
}

#[async_trait]
impl InstanceHandle for PodHandle {
    async fn engine_exec(
        &self,
        req: bulkhead_driver::ExecRequest,
    ) -> Option<std::io::Result<bulkhead_driver::EngineExec>> {
        Some(self.exec_streams(req).await)
    }

    /// A Pod has no process on the daemon's host.
    fn pid(&self) -> Option<u32> {
        None
    }

    fn signal(&self, signal: Signal) -> Result<(), SignalError> {
        if self.try_status().is_some() {
            return Ok(());
        }
        let grace = if signal == Signal::KILL {
            KILL_GRACE_SECONDS
        } else if signal == Signal::TERM {
            self.grace_seconds
        } else {
            return Err(SignalError {
                instance: self.instance.clone(),
                signal,
                source: std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "a kubernetes pod takes only TERM (a delete with its grace) and KILL",
                ),
            });
        };
        let Some(me) = self.me.upgrade() else {
            return Ok(());
        };
        me.delete_in_background(grace);
        Ok(())
    }

    async fn wait(&self) -> ExitStatus {
        let mut rx = self.status.subscribe();
        let st = match rx.wait_for(Option::is_some).await {
            Ok(st) => *st,
            Err(_) => None,
        };
        st.unwrap_or_else(status::killed)
    }

    fn try_status(&self) -> Option<ExitStatus> {
        *self.status.borrow()
    }

    /// A delete with the manifest's grace (the kubelet's SIGTERM, then its SIGKILL), and
    /// at the deadline a delete with [`KILL_GRACE_SECONDS`]; resolves once the Pod is gone.
    async fn stop_until(&self, _signal: Signal, mut kill_at: KillDeadline) -> ExitStatus {
        if let Some(st) = self.try_status() {
            return st;
        }
        self.delete(self.grace_seconds).await;
        tokio::select! {
            st = self.wait() => st,
            _ = kill_at.passed() => {
                self.delete(KILL_GRACE_SECONDS).await;
                self.wait().await
            }
        }
    }

    /// The last reading of the metrics API (see [`crate::metrics`]), refreshed in the
    /// background when stale.
    fn stats(&self) -> Result<Stats, StatsError> {
        if self.try_status().is_some() {
            return Ok(Stats::default());
        }
        let memory_bytes = {
            let mut u = self.usage.lock().unwrap_or_else(|e| e.into_inner());
            let stale = u.at.is_none_or(|at| at.elapsed() >= crate::metrics::FRESH);
            if stale && !u.in_flight && self.metrics.may_ask() {
                if let (Ok(rt), Some(me)) =
                    (tokio::runtime::Handle::try_current(), self.me.upgrade())
                {
                    u.in_flight = true;
                    rt.spawn(async move {
                        let client: kube::Client = me.api.clone().into_client();
                        let got = crate::metrics::fetch(
                            &client,
                            &me.metrics,
                            &me.namespace,
                            &me.name,
                            CONTAINER,
                        )
                        .await;
                        let mut u = me.usage.lock().unwrap_or_else(|e| e.into_inner());
                        u.in_flight = false;
                        u.at = Some(tokio::time::Instant::now());
                        if let Some(m) = got {
                            u.memory_bytes = m;
                        }
                    });
                }
            }
            u.memory_bytes
        };
        Ok(Stats {
            memory_bytes,
            memory_limit_bytes: self.memory_limit,
            ..Stats::default()
        })
    }

    fn exit_cause(&self) -> Option<ExitCause> {
        self.inner()
            .ended
            .as_ref()
            .filter(|e| e.oom_killed)
            .map(|_| ExitCause::OomKilled {
                limit_bytes: self.memory_limit,
            })
    }

    /// No host process is a Pod's.
    fn owns_pid(&self, _pid: u32) -> Option<bool> {
        Some(false)
    }

    fn engine_readiness(&self) -> Option<watch::Receiver<bool>> {
        self.readiness.then(|| self.ready.subscribe())
    }
}
