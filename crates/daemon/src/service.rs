//! The gRPC service: protocol types in, core/daemon calls, protocol types out.
//!
//! Error mapping (documented for users in the README):
//!
//! | error                                   | gRPC status          | CLI exit |
//! |-----------------------------------------|----------------------|----------|
//! | unknown workload or instance            | NOT_FOUND            | 3        |
//! | invalid name, id, key or request        | INVALID_ARGUMENT     | 4        |
//! | workload whose manifest is invalid      | FAILED_PRECONDITION  | 4        |
//! | lease: instance has `MAX_LEASES` holders | FAILED_PRECONDITION  | 4        |
//! | exec: not running / command cannot run  | FAILED_PRECONDITION  | 4        |
//! | daemon shutting down / not reachable    | UNAVAILABLE          | 5        |
//! | state directory cannot be written       | UNAVAILABLE          | 5        |
//! | wait timed out                          | DEADLINE_EXCEEDED    | 6        |
//! | launch failed (spawn, exit, readiness)  | ABORTED              | 7        |
//! | no valid token over TCP                 | UNAUTHENTICATED      | 8        |
//! | token does not grant the scope          | PERMISSION_DENIED    | 8        |

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_api::v1;
use bulkhead_core::event::{Event, EventKind};
use bulkhead_core::key::InstanceId;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::auth::{self, Scope, Visibility};
use crate::logs::LogFile;
use crate::rollout::{Outcome, RestartError};
use crate::{LaunchArgs, LaunchError, Shared, View, WaitFor};

pub(crate) struct Service {
    pub(crate) sh: Arc<Shared>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl Service {
    /// Access control (`auth`): `PERMISSION_DENIED` unless the caller may act on `scope`.
    fn authorize<T>(&self, req: &Request<T>, scope: Scope) -> Result<(), Status> {
        auth::authorize(req, scope)
    }

    /// A request that needs a new event is refused while the state directory cannot be
    /// written (`events::StoreFault`): UNAVAILABLE, naming the directory and the cause.
    fn writable(&self, what: &str) -> Result<(), Status> {
        match self.sh.events.fault() {
            Some(f) => Err(Status::unavailable(format!(
                "{what} refused: {f}; it is accepted again once the state directory can be written"
            ))),
            None => Ok(()),
        }
    }

    /// Awaits an admitted request's work, unless the store fails meanwhile: then its
    /// events cannot be stored and the work waits for them, so the caller is told why
    /// (UNAVAILABLE) rather than left hanging until the disk returns; the work goes on.
    async fn unless_unrecorded<T>(
        &self,
        what: &str,
        work: impl std::future::Future<Output = T>,
    ) -> Result<T, Status> {
        tokio::select! {
            biased;
            v = work => Ok(v),
            f = self.sh.events.failing() => Err(Status::unavailable(format!(
                "{what} cannot be recorded: {f}; it goes on once the state directory can be written"
            ))),
        }
    }
}

/// The status of a failed launch. `admin`: the caller may see a manifest's contents in
/// its error (the Unix socket, an `admin: true` token); anyone else gets the redacted form.
fn launch_status(e: LaunchError, admin: bool) -> Status {
    let msg = e.to_string();
    match e {
        LaunchError::UnknownWorkload(_) => Status::not_found(msg),
        LaunchError::InvalidWorkload { name, error } => Status::failed_precondition(format!(
            "workload {name} is invalid: {}",
            error.for_caller(admin)
        )),
        LaunchError::Key(_) => Status::invalid_argument(msg),
        LaunchError::Lease(bulkhead_core::lease::LeaseError::Holder { .. }) => {
            Status::invalid_argument(msg)
        }
        LaunchError::Lease(bulkhead_core::lease::LeaseError::TooMany { .. }) => {
            Status::failed_precondition(msg)
        }
        LaunchError::ShuttingDown | LaunchError::Unrecorded { .. } => Status::unavailable(msg),
        LaunchError::AtCapacity { .. } | LaunchError::NamespaceAtCapacity { .. } => {
            Status::resource_exhausted(msg)
        }
        LaunchError::Failed { .. } => Status::aborted(msg),
        // The dependency's own code, with its error as this caller may see it.
        LaunchError::Dependency {
            id,
            dependency,
            source,
        } => {
            let inner = launch_status(*source, admin);
            Status::new(
                inner.code(),
                format!(
                    "launch of {id} failed: its dependency {dependency} failed: {}",
                    inner.message()
                ),
            )
        }
        LaunchError::DependencyScope(_) => Status::failed_precondition(msg),
        LaunchError::Timeout { .. } => Status::deadline_exceeded(msg),
    }
}

/// The status of a failed restart or rollout (see [`launch_status`] for `admin`).
fn restart_status(e: RestartError, admin: bool) -> Status {
    let msg = e.to_string();
    match e {
        RestartError::NotFound(_) | RestartError::UnknownWorkload(_) => Status::not_found(msg),
        RestartError::InvalidWorkload { name, error } => Status::failed_precondition(format!(
            "workload {name} is invalid: {}",
            error.for_caller(admin)
        )),
        RestartError::Final { .. }
        | RestartError::Stopping { .. }
        | RestartError::Incompatible { .. } => Status::failed_precondition(msg),
        RestartError::ShuttingDown => Status::unavailable(msg),
        RestartError::Failed { .. } => Status::aborted(msg),
    }
}

/// A grace from a request: at most a week.
fn clamp_grace(ms: u64) -> Duration {
    Duration::from_millis(ms.min(7 * 24 * 3600 * 1000))
}

/// A manifest as JSON for a caller: whole for an admin, else with `env` values hidden.
fn spec_for_caller(s: &bulkhead_core::spec::WorkloadSpec, admin: bool) -> Option<String> {
    if admin {
        return serde_json::to_string(s).ok();
    }
    let mut shown = s.clone();
    for v in shown.env.values_mut() {
        *v = HIDDEN.to_owned();
    }
    serde_json::to_string(&shown).ok()
}

/// What a non-admin caller sees in place of an `env` value of a workload's spec.
const HIDDEN: &str = "(hidden)";

fn parse_id(id: &str) -> Result<InstanceId, Status> {
    InstanceId::parse(id)
        .map(|(id, _)| id)
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

fn opt(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

/// The instance with its resource usage now (when it runs and the driver can tell).
fn instance_with_usage(slot: &crate::instance::Slot) -> v1::Instance {
    let mut i = instance_proto(&slot.view());
    if matches!(i.state.as_str(), "starting" | "ready" | "stopping") {
        i.usage = slot.stats().map(|s| v1::Usage {
            cpu_seconds: s.cpu_seconds,
            memory_bytes: s.memory_bytes,
            pids: s.pids,
            memory_peak_bytes: s.memory_peak_bytes,
            cpu_throttled_seconds: s.cpu_throttled_seconds,
            pids_limit_hits: s.pids_limit_hits,
            memory_limit_bytes: s.memory_limit_bytes,
            pids_limit: s.pids_limit,
        });
    }
    i
}

pub fn instance_proto(v: &View) -> v1::Instance {
    v1::Instance {
        id: v.id.to_string(),
        workload: v.workload.clone(),
        isolation: v.isolation.as_str().to_owned(),
        namespace: v.namespace.clone(),
        session: v.session.clone(),
        driver: v.driver.as_str().to_owned(),
        state: v.state.as_str().to_owned(),
        pid: v.pid,
        address: if v.port == 0 {
            String::new()
        } else {
            v.address()
        },
        ready: v.ready,
        restarts: v.restarts,
        started_at_ms: v.started_at_ms,
        last_exit: v.last_exit.map(|st| v1::ExitStatus {
            code: st.code(),
            signal: st.signal(),
            core_dumped: st.core_dumped(),
        }),
        failure: v.failure.clone(),
        status_text: v.status_text.clone(),
        port: u32::from(v.port),
        breaker: v.breaker.as_str().to_owned(),
        consecutive_failures: v.consecutive_failures,
        leases: v.leases.clone(),
        usage: None,
        channels: v
            .channels
            .iter()
            .map(|c| v1::Channel {
                name: c.name.clone(),
                direction: c.direction.as_str().to_owned(),
                service: c.service.clone(),
                max_payload: c.max_payload,
                depth: c.depth,
            })
            .collect(),
        iox2_prefix: v.iox2.as_ref().and_then(|i| i.0.clone()),
        iox2_root: v.iox2.as_ref().and_then(|i| i.1.clone()),
        channel_space: v.iox2.as_ref().and_then(|i| i.2.clone()),
        spec_json: None,
    }
}

pub fn event_proto(e: &Event) -> v1::Event {
    let mut p = v1::Event {
        id: e.id,
        time_ms: e.time_ms,
        instance: e.instance.to_string(),
        kind: e.kind.name().to_owned(),
        ..Default::default()
    };
    match &e.kind {
        EventKind::Launched | EventKind::Ready => {}
        EventKind::Started { pid } | EventKind::Adopted { pid } => p.pid = *pid,
        EventKind::LaunchFailed {
            reason,
            failure_kind,
        } => {
            p.reason = Some(reason.clone());
            p.failure_kind = failure_kind.map(|k| k.as_str().to_owned());
        }
        EventKind::Exited { exit_code } => p.exit_code = Some(*exit_code),
        EventKind::Crashed {
            signal,
            core_dumped,
        } => {
            p.signal = Some(*signal);
            p.core_dumped = Some(*core_dumped);
        }
        EventKind::OomKilled {
            limit_bytes,
            signal,
        } => {
            p.signal = Some(*signal);
            p.limit_bytes = *limit_bytes;
        }
        EventKind::Terminating { signal, grace_ms } => {
            p.signal = Some(*signal);
            p.grace_ms = Some(*grace_ms);
        }
        EventKind::Terminated { status } => {
            if let Some(status) = status {
                p.exit_code = status.code();
                p.signal = status.signal();
                p.core_dumped = Some(status.core_dumped());
            }
        }
        EventKind::Restarting { attempt, delay_ms } => {
            p.attempt = Some(*attempt);
            p.delay_ms = Some(*delay_ms);
        }
        EventKind::BreakerOpen { failures, reason } => {
            p.failures = Some(*failures);
            p.reason = Some(reason.clone());
        }
        EventKind::BreakerHalfOpen | EventKind::BreakerClosed => {}
        EventKind::Unhealthy { reason }
        | EventKind::LivenessFailed { reason }
        | EventKind::WatchdogTimeout { reason }
        | EventKind::RestartRequested { reason }
        | EventKind::Lost { reason } => {
            p.reason = Some(reason.clone());
        }
        EventKind::ChannelPeerDead {
            channel,
            peer,
            reclaimed,
        } => {
            p.channel = Some(channel.clone());
            p.reason = Some(if *reclaimed {
                format!("{peer} died; its shared memory was reclaimed")
            } else {
                format!("{peer} died; its shared memory could not be reclaimed yet")
            });
        }
        EventKind::DependenciesReady { dependencies } => p.dependencies = dependencies.clone(),
        EventKind::DependencyRestarted { dependency } => {
            p.dependency = Some(dependency.clone());
            p.reason = Some(format!(
                "its dependency {dependency} restarted (on_dependency_restart: restart)"
            ));
        }
    }
    p
}

/// The catalog as the API shows it. `admin`: errors in full and specs as written;
/// otherwise errors redacted and `env` values hidden (they may hold secrets).
pub(crate) fn workloads_proto(sh: &Shared, admin: bool) -> v1::ListWorkloadsResponse {
    let cat = sh.catalog();
    let workloads = cat
        .entries
        .values()
        .map(|e| match &e.spec {
            Ok(s) => v1::Workload {
                name: e.name.clone(),
                path: e.manifest.display().to_string(),
                valid: true,
                error: None,
                driver: s.driver.as_str().to_owned(),
                isolation: s.isolation.as_str().to_owned(),
                autostart: s.autostart,
                description: s.description.clone(),
                depends_on: s
                    .depends_on
                    .iter()
                    .map(|(name, c)| v1::WorkloadDependency {
                        name: name.to_owned(),
                        condition: c.as_str().to_owned(),
                    })
                    .collect(),
                on_dependency_restart: match s.on_dependency_restart {
                    bulkhead_core::deps::OnDependencyRestart::Restart => "restart",
                    bulkhead_core::deps::OnDependencyRestart::Ignore => "ignore",
                }
                .to_owned(),
                spec_json: spec_for_caller(s, admin),
            },
            Err(err) => v1::Workload {
                name: e.name.clone(),
                path: e.manifest.display().to_string(),
                valid: false,
                error: Some(err.for_caller(admin).to_owned()),
                ..Default::default()
            },
        })
        .collect();
    v1::ListWorkloadsResponse { workloads }
}

/// `inst` as `vis` may see it: a shared instance's lease holders are other tenants'
/// session ids, shown only to those who hold those sessions (`auth::Identity::sees_lease`).
fn shown(mut inst: v1::Instance, vis: &Visibility) -> v1::Instance {
    inst.leases.retain(|h| vis.sees_lease(h));
    inst
}

#[tonic::async_trait]
impl bulkhead_api::Bulkhead for Service {
    async fn launch(
        &self,
        req: Request<v1::LaunchRequest>,
    ) -> Result<Response<v1::LaunchResponse>, Status> {
        let q = req.get_ref();
        let (ns, sid) = (q.namespace.as_deref(), q.session.as_deref());
        let scope = Scope::launch(&self.sh.catalog(), &q.workload, ns, sid, q.lease.as_deref());
        self.authorize(&req, scope)?;
        self.writable("launch")?;
        let vis = Visibility::of(&req);
        let admin = auth::is_admin(&req);
        let r = req.into_inner();
        let wait = match v1::WaitFor::try_from(r.wait) {
            Ok(v1::WaitFor::None) => WaitFor::Nothing,
            Ok(v1::WaitFor::Started) => WaitFor::Started,
            Ok(v1::WaitFor::Ready) => WaitFor::Ready,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown wait value {}",
                    r.wait
                )))
            }
        };
        if r.workload.is_empty() {
            return Err(Status::invalid_argument("a workload name is required"));
        }
        let args = LaunchArgs {
            workload: r.workload,
            namespace: opt(r.namespace),
            session: opt(r.session),
            wait,
            timeout: (r.timeout_ms > 0)
                .then(|| Duration::from_millis(r.timeout_ms.min(7 * 24 * 3600 * 1000))),
            lease: opt(r.lease),
        };
        let leased = args.lease.is_some();
        let (view, created) = self
            .sh
            .launch(args)
            .await
            .map_err(|e| launch_status(e, admin))?;
        if leased && !view.state.is_terminal() {
            // A lease taken is stored before it is acknowledged, like a release: a crash
            // right after the answer must not lose it (and let an idle timeout end an
            // instance its client holds).
            self.sh
                .record_leases(&view.id, view.leases.clone())
                .await
                .map_err(Status::unavailable)?;
        }
        Ok(Response::new(v1::LaunchResponse {
            instance: Some(shown(instance_proto(&view), &vis)),
            created,
        }))
    }

    async fn get(&self, req: Request<v1::GetRequest>) -> Result<Response<v1::Instance>, Status> {
        let id = parse_id(&req.get_ref().id)?;
        self.authorize(&req, Scope::read(&id))?;
        let vis = Visibility::of(&req);
        let admin = auth::is_admin(&req);
        let with_spec = req.get_ref().with_spec;
        let slot = self
            .sh
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("no instance {id}")))?;
        let mut i = instance_with_usage(&slot);
        if with_spec {
            i.spec_json = spec_for_caller(&slot.spec(), admin);
        }
        Ok(Response::new(shown(i, &vis)))
    }

    async fn list(
        &self,
        req: Request<v1::ListRequest>,
    ) -> Result<Response<v1::ListResponse>, Status> {
        let vis = Visibility::of(&req);
        let f = req.into_inner();
        let states = f
            .states
            .iter()
            .map(|st| {
                bulkhead_core::instance::State::parse(st).ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "states: unknown state {st:?} (starting, ready, stopping, restarting, exited, crashed, failed, terminated)"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let matches = move |s: &crate::instance::Slot| {
            (f.workloads.is_empty() || f.workloads.iter().any(|w| w == s.key.workload()))
                && (f.namespace.is_empty() || s.key.namespace() == Some(f.namespace.as_str()))
                && (f.session.is_empty() || s.key.session() == Some(f.session.as_str()))
                && (states.is_empty() || states.contains(&s.view.borrow().state))
        };
        let slots = self.sh.list();
        // Usage reads /proc and cgroup files: off the async runtime, so that a list of
        // thousands of instances never stalls other requests.
        let instances = tokio::task::spawn_blocking(move || {
            slots
                .iter()
                .filter(|s| vis.sees(s.id.as_str()) && matches(s))
                .map(|s| shown(instance_with_usage(s), &vis))
                .collect()
        })
        .await
        .map_err(|e| Status::internal(format!("cannot list the instances: {e}")))?;
        Ok(Response::new(v1::ListResponse { instances }))
    }

    async fn terminate(
        &self,
        req: Request<v1::TerminateRequest>,
    ) -> Result<Response<v1::Instance>, Status> {
        self.authorize(&req, Scope::of_id(&parse_id(&req.get_ref().id)?))?;
        self.writable("terminate")?;
        let vis = Visibility::of(&req);
        let who = auth::identity(&req).cloned();
        let r = req.into_inner();
        let id = parse_id(&r.id)?;
        let grace = r.grace_ms.map(clamp_grace);
        let view = if r.with_dependencies {
            // Dependencies in a scope the caller may not act on stay.
            let may =
                move |dep: &InstanceId| who.as_ref().is_some_and(|i| i.allows(&Scope::of_id(dep)));
            self.unless_unrecorded(
                &format!("terminate of {id} with its dependencies"),
                self.sh.terminate_with_dependencies(&id, grace, may),
            )
            .await?
            .map(|(v, _)| v)
        } else {
            self.unless_unrecorded(&format!("terminate of {id}"), self.sh.terminate(&id, grace))
                .await?
        }
        .ok_or_else(|| Status::not_found(format!("no instance {id}")))?;
        Ok(Response::new(shown(instance_proto(&view), &vis)))
    }

    async fn health(
        &self,
        req: Request<v1::HealthRequest>,
    ) -> Result<Response<v1::HealthResponse>, Status> {
        self.authorize(&req, Scope::daemon())?;
        let cat = self.sh.catalog();
        let valid = cat.entries.values().filter(|e| e.spec.is_ok()).count();
        // The truth while the keeper is down (process launches wait for a new one), while
        // the state directory cannot be written (what needs an event is refused), and in
        // a shutdown: one schema with HTTP's /health and /ready.
        let reason = crate::standard::not_ready(&self.sh);
        let status = if self
            .sh
            .shutting_down
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            "shutting_down"
        } else if reason.is_some() {
            "degraded"
        } else {
            "serving"
        };
        Ok(Response::new(v1::HealthResponse {
            status: status.into(),
            reason: reason.unwrap_or_default(),
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_ms: self.sh.uptime().as_millis() as u64,
            instances_live: self.sh.live_count() as u32,
            workloads_valid: valid as u32,
            workloads_invalid: (cat.entries.len() - valid) as u32,
            last_event_id: self.sh.events.last_id(),
            drivers: self
                .sh
                .drivers()
                .iter()
                .map(|d| d.as_str().to_owned())
                .collect(),
            state_dir: self.sh.cfg.state_dir.display().to_string(),
            workloads_dir: self.sh.cfg.workloads_dir.display().to_string(),
            process_tracking: self.sh.process_tracking.clone(),
            process_spare: self
                .sh
                .process_spare()
                .filter(|s| s.on)
                .map(|s| v1::ProcessSpare {
                    ready: s.ready,
                    launches: s.taken,
                    made: s.made,
                }),
            warm: self
                .sh
                .warm
                .counts(&self.sh)
                .into_iter()
                .map(|(workload, (ready, memory_bytes))| v1::WarmPool {
                    workload,
                    ready: ready as u32,
                    memory_bytes,
                })
                .collect(),
            sandbox: self.sh.sandbox.as_ref().map(|r| match r {
                Ok(c) => v1::SandboxHealth {
                    available: true,
                    cgroup_mode: c.cgroup_mode.clone(),
                    controllers: c.controllers.clone(),
                    clone_into_cgroup: c.clone_into_cgroup,
                    favordynmods: c.favordynmods,
                    landlock_abi: c.landlock_abi,
                    error: String::new(),
                },
                Err(e) => v1::SandboxHealth {
                    available: false,
                    error: e.clone(),
                    ..Default::default()
                },
            }),
        }))
    }

    type WatchStream = BoxStream<v1::Event>;

    async fn watch(
        &self,
        req: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let vis = Visibility::of(&req);
        let r = req.into_inner();
        let (history, mut live) = self.sh.events.subscribe(r.since_id);
        let (tx, rx) = mpsc::channel(256);
        let sh = self.sh.clone();
        tokio::spawn(async move {
            let mut last = r.since_id;
            for e in history {
                last = e.id;
                if tx.send(Ok(event_proto(&e))).await.is_err() {
                    return;
                }
            }
            if r.history_only {
                return;
            }
            loop {
                match live.recv().await {
                    Ok(e) if e.id <= last => {}
                    Ok(e) => {
                        last = e.id;
                        if tx.send(Ok(event_proto(&e))).await.is_err() {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        // Fell behind the live channel: catch up from the kept history.
                        match sh.events.since(last) {
                            Ok(missed) => {
                                for e in missed {
                                    last = e.id;
                                    if tx.send(Ok(event_proto(&e))).await.is_err() {
                                        return;
                                    }
                                }
                            }
                            Err(lost) => {
                                let _ = tx.send(Err(Status::data_loss(lost.to_string()))).await;
                                return;
                            }
                        }
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        // Only the events of instances the caller may see (`auth`: everything on the socket).
        let visible =
            move |e: &Result<v1::Event, Status>| e.as_ref().map_or(true, |e| vis.sees(&e.instance));
        let stream = tokio_stream::StreamExt::filter(ReceiverStream::new(rx), visible);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_workloads(
        &self,
        req: Request<v1::ListWorkloadsRequest>,
    ) -> Result<Response<v1::ListWorkloadsResponse>, Status> {
        self.authorize(&req, Scope::daemon())?;
        Ok(Response::new(workloads_proto(
            &self.sh,
            auth::is_admin(&req),
        )))
    }

    async fn list_images(
        &self,
        req: Request<v1::ListImagesRequest>,
    ) -> Result<Response<v1::ListImagesResponse>, Status> {
        self.authorize(&req, Scope::daemon())?;
        let images = crate::docker::list_images(&self.sh).await?;
        Ok(Response::new(v1::ListImagesResponse { images }))
    }

    async fn prune_images(
        &self,
        req: Request<v1::PruneImagesRequest>,
    ) -> Result<Response<v1::ListImagesResponse>, Status> {
        self.authorize(&req, Scope::admin())?;
        let images = crate::docker::prune_images(&self.sh).await?;
        Ok(Response::new(v1::ListImagesResponse { images }))
    }

    async fn restart(
        &self,
        req: Request<v1::RestartRequest>,
    ) -> Result<Response<v1::Instance>, Status> {
        self.authorize(&req, Scope::of_id(&parse_id(&req.get_ref().id)?))?;
        self.writable("restart")?;
        let vis = Visibility::of(&req);
        let admin = auth::is_admin(&req);
        let r = req.into_inner();
        let id = parse_id(&r.id)?;
        let grace = r.grace_ms.map(clamp_grace);
        let work = async {
            if r.new_spec {
                // One instance's rollout: its steps say what happened.
                let slot = self
                    .sh
                    .get(&id)
                    .ok_or_else(|| RestartError::NotFound(id.clone()))?;
                let steps = self.sh.rollout_one(&slot, grace).await?;
                match steps {
                    Outcome::Failed {
                        reason,
                        rolled_back,
                    } => Err(RestartError::Failed {
                        id: id.clone(),
                        reason: format!(
                            "{reason}; {}",
                            if rolled_back {
                                "it runs its previous manifest again"
                            } else {
                                "its previous manifest did not become ready either"
                            }
                        ),
                    }),
                    _ => Ok(self.sh.get(&id).map(|s| s.view())),
                }
            } else {
                self.sh
                    .restart(&id, grace, "requested (bulkhead restart)", None)
                    .await
                    .map(Some)
            }
        };
        let view = self
            .unless_unrecorded(&format!("restart of {id}"), work)
            .await?
            .map_err(|e| restart_status(e, admin))?
            .ok_or_else(|| Status::not_found(format!("no instance {id}")))?;
        Ok(Response::new(shown(instance_proto(&view), &vis)))
    }

    async fn rollout(
        &self,
        req: Request<v1::RolloutRequest>,
    ) -> Result<Response<v1::RolloutResponse>, Status> {
        self.authorize(&req, Scope::admin())?;
        self.writable("rollout")?;
        let admin = auth::is_admin(&req);
        let r = req.into_inner();
        bulkhead_core::name::validate(bulkhead_core::name::NameKind::Workload, &r.workload)
            .map_err(|e| Status::invalid_argument(format!("workload: {e}")))?;
        let grace = r.grace_ms.map(clamp_grace);
        // The rollout goes on to its end if the caller goes away (a half-done rollout is
        // still consistent, but nobody would hear of it).
        let sh = self.sh.clone();
        let workload = r.workload.clone();
        let task = tokio::spawn(async move { sh.rollout(&workload, grace).await });
        let steps = self
            .unless_unrecorded(&format!("rollout of {}", r.workload), task)
            .await?
            .map_err(|e| Status::internal(format!("rollout of {}: {e}", r.workload)))?
            .map_err(|e| restart_status(e, admin))?;
        Ok(Response::new(v1::RolloutResponse {
            steps: steps
                .into_iter()
                .map(|(id, o)| {
                    let (outcome, reason, rolled_back) = match o {
                        Outcome::Moved => ("moved", String::new(), false),
                        Outcome::Current => ("current", String::new(), false),
                        Outcome::Skipped => ("skipped", String::new(), false),
                        Outcome::Failed {
                            reason,
                            rolled_back,
                        } => ("failed", reason, rolled_back),
                    };
                    v1::RolloutStep {
                        id: id.to_string(),
                        outcome: outcome.into(),
                        reason,
                        rolled_back,
                    }
                })
                .collect(),
        }))
    }

    async fn reload(
        &self,
        req: Request<v1::ReloadRequest>,
    ) -> Result<Response<v1::ListWorkloadsResponse>, Status> {
        self.authorize(&req, Scope::admin())?;
        self.sh.reload();
        Ok(Response::new(workloads_proto(
            &self.sh,
            auth::is_admin(&req),
        )))
    }

    async fn release(
        &self,
        req: Request<v1::ReleaseRequest>,
    ) -> Result<Response<v1::Instance>, Status> {
        let q = req.get_ref();
        self.authorize(&req, Scope::release(&parse_id(&q.id)?, &q.holder))?;
        self.writable("release")?;
        let vis = Visibility::of(&req);
        let r = req.into_inner();
        let id = parse_id(&r.id)?;
        bulkhead_core::lease::validate_holder("holder", &r.holder)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        match self.sh.release(&id, &r.holder) {
            None => Err(Status::not_found(format!("no instance {id}"))),
            Some((_, false)) => Err(Status::not_found(format!(
                "{} holds no lease on {id}",
                r.holder
            ))),
            Some((view, true)) => {
                self.sh
                    .record_leases(&id, view.leases.clone())
                    .await
                    .map_err(Status::unavailable)?;
                Ok(Response::new(shown(instance_proto(&view), &vis)))
            }
        }
    }

    async fn end_session(
        &self,
        req: Request<v1::EndScopeRequest>,
    ) -> Result<Response<v1::EndScopeResponse>, Status> {
        let r = req.get_ref();
        bulkhead_core::name::validate(bulkhead_core::name::NameKind::Session, &r.name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.authorize(&req, Scope::session(&r.name))?;
        self.writable("end-session")?;
        let r = req.into_inner();
        let grace = r
            .grace_ms
            .map(|ms| Duration::from_millis(ms.min(7 * 24 * 3600 * 1000)));
        let views = self
            .unless_unrecorded(
                &format!("end-session {}", r.name),
                self.sh.end_session(&r.name, grace),
            )
            .await?;
        Ok(Response::new(v1::EndScopeResponse {
            terminated: views.iter().map(instance_proto).collect(),
        }))
    }

    async fn end_namespace(
        &self,
        mut req: Request<v1::EndScopeRequest>,
    ) -> Result<Response<v1::EndScopeResponse>, Status> {
        // An empty name is the default namespace, as in Launch.
        if req.get_ref().name.is_empty() {
            req.get_mut().name = bulkhead_core::key::DEFAULT_NAMESPACE.to_owned();
        }
        let r = req.get_ref();
        bulkhead_core::name::validate(bulkhead_core::name::NameKind::Namespace, &r.name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.authorize(&req, Scope::namespace(&r.name))?;
        self.writable("end-namespace")?;
        let r = req.into_inner();
        let grace = r
            .grace_ms
            .map(|ms| Duration::from_millis(ms.min(7 * 24 * 3600 * 1000)));
        let views = self
            .unless_unrecorded(
                &format!("end-namespace {}", r.name),
                self.sh.end_namespace(&r.name, grace),
            )
            .await?;
        Ok(Response::new(v1::EndScopeResponse {
            terminated: views.iter().map(instance_proto).collect(),
        }))
    }

    type LogsStream = BoxStream<v1::LogChunk>;

    async fn logs(
        &self,
        req: Request<v1::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        self.authorize(&req, Scope::of_id(&parse_id(&req.get_ref().id)?))?;
        let r = req.into_inner();
        let id = parse_id(&r.id)?;
        let log = match self.sh.get(&id) {
            Some(slot) => slot.log.clone(),
            None => {
                // An instance from before a daemon restart: its file may still be there.
                let log = Arc::new(LogFile::new(
                    &self.sh.logs_dir(),
                    id.file_stem(),
                    self.sh.cfg.log_max_bytes,
                    bulkhead_core::spec::MAX_LOG_GENERATIONS,
                ));
                if !log.path().exists() {
                    return Err(Status::not_found(format!(
                        "no instance {id} and no log for it"
                    )));
                }
                log
            }
        };
        let tail = usize::try_from(r.tail_lines).unwrap_or(usize::MAX);
        let since = (r.since_unix_ms > 0).then_some(r.since_unix_ms);
        let snap = log.snapshot(since, tail).map_err(|e| {
            Status::internal(format!("cannot read log {}: {e}", log.path().display()))
        })?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            for chunk in snap.records.chunks(256) {
                let lines = chunk.iter().map(log_line).collect();
                if tx.send(Ok(v1::LogChunk { lines })).await.is_err() {
                    return;
                }
            }
            let (true, Some(mut live)) = (r.follow, snap.live) else {
                return;
            };
            loop {
                match live.recv().await {
                    Ok(recs) => {
                        let lines = recs.iter().map(log_line).collect();
                        if tx.send(Ok(v1::LogChunk { lines })).await.is_err() {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        let note = v1::LogLine {
                            time_unix_ms: crate::events::now_ms(),
                            stream: v1::LogStream::Bulkhead as i32,
                            run: 0,
                            data: format!("{n} batches of log lines skipped: reader too slow")
                                .into_bytes(),
                            partial: false,
                        };
                        if tx
                            .send(Ok(v1::LogChunk { lines: vec![note] }))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ExecStream = BoxStream<v1::ExecResponse>;

    async fn exec(
        &self,
        req: Request<tonic::Streaming<v1::ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let check = auth::exec_check(&req);
        let stream = crate::exec::exec(self.sh.clone(), req.into_inner(), check).await?;
        Ok(Response::new(Box::pin(stream)))
    }
}

fn log_line(r: &bulkhead_core::logline::Record) -> v1::LogLine {
    use bulkhead_core::logline::LogStream;
    v1::LogLine {
        time_unix_ms: r.time_ms,
        stream: match r.stream {
            LogStream::Stdout => v1::LogStream::Stdout,
            LogStream::Stderr => v1::LogStream::Stderr,
            LogStream::Bulkhead => v1::LogStream::Bulkhead,
        } as i32,
        run: r.run,
        data: r.data.clone(),
        partial: r.partial,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{token_sha256_hex, Identity, Tokens};

    /// A dependency's error keeps its own code, and an invalid dependency's manifest
    /// quotes reach only admins, as for the workload itself.
    #[test]
    fn a_dependency_error_has_its_code_and_is_redacted_for_non_admins() {
        let inner = || LaunchError::InvalidWorkload {
            name: "db".into(),
            error: crate::catalog::EntryError {
                full: "db/manifest.yaml: field `env`: s3cret".into(),
                redacted: "db/manifest.yaml: field `env`: invalid value".into(),
            },
        };
        let e = |inner| LaunchError::Dependency {
            id: InstanceId::parse("session:s1:web").unwrap().0,
            dependency: "session:s1:db".into(),
            source: Box::new(inner),
        };
        let s = launch_status(e(inner()), false);
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert!(
            s.message().starts_with(
                "launch of session:s1:web failed: its dependency session:s1:db failed: workload db is invalid"
            ),
            "{}",
            s.message()
        );
        assert!(!s.message().contains("s3cret"), "{}", s.message());
        assert!(launch_status(e(inner()), true).message().contains("s3cret"));
        let failed = LaunchError::Failed {
            id: InstanceId::parse("session:s1:db").unwrap().0,
            reason: "exit code 4".into(),
        };
        assert_eq!(launch_status(e(failed), false).code(), tonic::Code::Aborted);
    }

    /// Issue 11: `get` and `list` of a shared container showed every tenant's session ids
    /// (its lease holders) to any token.
    #[test]
    fn a_shared_instances_leases_show_only_the_callers_sessions() {
        let t = Tokens::parse(
            std::path::Path::new("tokens.yaml"),
            &format!(
                "tokens:\n- name: b\n  token_sha256: {}\n  sessions: [s2]\n  shared: true\n",
                token_sha256_hex("tb")
            ),
            false,
        )
        .unwrap();
        let inst = v1::Instance {
            id: "shared:box".into(),
            leases: vec!["s1".into(), "s2".into(), "s3".into()],
            ..Default::default()
        };
        let mut req = Request::new(());
        req.extensions_mut().insert(Identity::Token {
            grant: t.verify("tb").unwrap(),
            peer: None,
        });
        assert_eq!(shown(inst.clone(), &Visibility::of(&req)).leases, ["s2"]);
        let mut local = Request::new(());
        local
            .extensions_mut()
            .insert(Identity::Local { uid: Some(0) });
        assert_eq!(shown(inst, &Visibility::of(&local)).leases.len(), 3);
    }
}
