//! The driver, its handles and the shared poller (see the crate docs for the design).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::models::{NodeState, Task, TaskState};
use bollard::query_parameters::{
    KillContainerOptions, ListContainersOptions, ListServicesOptions, ListTasksOptions,
    LogsOptions, RemoveContainerOptions,
};
use bollard::Docker;
use bulkhead_core::event::ExitStatus;
use bulkhead_core::key::InstanceId;
use bulkhead_core::signal::Signal;
use bulkhead_core::spec::DriverKind;
use bulkhead_docker::driver::exit_status;
use bulkhead_docker::driver::ExecKill;
use bulkhead_docker::engine::{Engine, LABEL_DAEMON, LABEL_INSTANCE};
use bulkhead_driver::{
    Driver, EngineExec, ExecRequest, Found, InstanceHandle, KillDeadline, OutputTap, RecoverError,
    SignalError, SpawnError, SpawnSpec, Spawned, Stats, StatsError, Stream,
};
use futures_util::StreamExt;
use tokio::sync::watch;

use crate::task::{observe, service_spec, Observed};

/// How often the shared poller lists this daemon's tasks and the nodes.
pub const DEFAULT_POLL: Duration = Duration::from_millis(100);
/// The node label that gives a node's own engine address (`unix:///...`, `tcp://...`):
/// exec, signals and fencing reach a task's node through it.
pub const LABEL_ENGINE: &str = "bulkhead.engine";
/// The label the engine puts on a task's container.
const LABEL_TASK: &str = "com.docker.swarm.task.id";
/// How often a spawn asks for its new task, until it has started.
const SPAWN_POLL: Duration = Duration::from_millis(10);
/// How long a spawn waits for a node to start the task when the manifest sets no
/// readiness timeout.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an ended run waits at most for its last output before the service is
/// removed (the service's log stream does not end with its task)...
const LOG_DRAIN: Duration = Duration::from_millis(500);
/// ... and the quiet time that ends the wait sooner: no output for this long.
const LOG_QUIET: Duration = Duration::from_millis(50);
/// Bound on each engine request made while a run ends.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The `swarm` driver.
pub struct SwarmDriver {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Arc<Engine>,
    poll: Duration,
    services: Mutex<HashMap<String, Weak<Service>>>,
    nodes: Mutex<HashMap<String, NodeView>>,
    node_clients: Mutex<HashMap<String, Docker>>,
    poller: OnceLock<()>,
    fenced: AtomicU64,
    /// (image, program) pairs found in the image once: not looked up again.
    programs: Mutex<HashSet<(String, String)>>,
    /// Whether nodes are reached through their `bulkhead.engine` label.
    node_engines: AtomicBool,
}

#[derive(Debug, Clone)]
struct NodeView {
    hostname: String,
    ready: bool,
    /// Marked down by the manager (missed heartbeats): its runs are lost. Not `unknown`
    /// or `disconnected`, which a manager restart shows for every node for a moment.
    down: bool,
    engine: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SwarmDriver {
    /// A driver on the manager at `host` (`unix:///path`, `tcp://host:port`) for the
    /// daemon with id `daemon_id`. Nothing is connected until first use.
    pub fn new(daemon_id: &str, host: &str) -> SwarmDriver {
        SwarmDriver::with_poll(daemon_id, host, DEFAULT_POLL)
    }

    /// The same with another poll period.
    pub fn with_poll(daemon_id: &str, host: &str, poll: Duration) -> SwarmDriver {
        SwarmDriver {
            inner: Arc::new(Inner {
                engine: Engine::with_host(daemon_id, host),
                poll,
                services: Mutex::new(HashMap::new()),
                nodes: Mutex::new(HashMap::new()),
                node_clients: Mutex::new(HashMap::new()),
                poller: OnceLock::new(),
                fenced: AtomicU64::new(0),
                programs: Mutex::new(HashSet::new()),
                node_engines: AtomicBool::new(true),
            }),
        }
    }

    /// Reaches no node's own engine, as if no node carried a `bulkhead.engine` label (a
    /// swarm whose nodes the daemon cannot reach): stops remove the service at once, exec
    /// fails, fencing is left to the swarm.
    pub fn without_node_engines(self) -> SwarmDriver {
        self.inner.node_engines.store(false, Ordering::SeqCst);
        self
    }

    /// How many stale copies this driver has fenced (removed from a returning node).
    pub fn fenced(&self) -> u64 {
        self.inner.fenced.load(Ordering::SeqCst)
    }

    /// Where the current run of `instance` is: its node's engine address (from the
    /// node's `bulkhead.engine` label) and its container id, once known.
    pub fn locate(&self, instance: &str) -> Option<(String, String)> {
        let s = self
            .inner
            .watched()
            .into_iter()
            .find(|s| s.instance == instance)?;
        let r = lock(&s.run).clone();
        let addr = lock(&self.inner.nodes)
            .get(r.node.as_ref()?)?
            .engine
            .clone()?;
        Some((addr, r.container?))
    }

    /// The manager's client, checked reachable (a 2 s ping).
    pub async fn client(&self) -> Result<Docker, String> {
        self.inner.client().await
    }
}

impl Inner {
    fn daemon_id(&self) -> &str {
        self.engine.daemon_id()
    }

    async fn client(self: &Arc<Self>) -> Result<Docker, String> {
        let c = self
            .engine
            .ensure()
            .await
            .map_err(|e| format!("swarm manager: {e}"))?
            .clone();
        if self.poller.set(()).is_ok() {
            tokio::spawn(poll_loop(Arc::downgrade(self), c.clone()));
        }
        Ok(c)
    }

    fn label_filter(&self) -> HashMap<String, Vec<String>> {
        HashMap::from([(
            "label".to_owned(),
            vec![format!("{LABEL_DAEMON}={}", self.daemon_id())],
        )])
    }

    fn watched(&self) -> Vec<Arc<Service>> {
        let mut s = lock(&self.services);
        s.retain(|_, w| w.strong_count() > 0);
        s.values().filter_map(Weak::upgrade).collect()
    }

    /// A client on the engine of node `node_id`, when its `bulkhead.engine` label says
    /// where that is.
    async fn node_client(&self, node_id: &str) -> Option<Docker> {
        if !self.node_engines.load(Ordering::SeqCst) {
            return None;
        }
        let addr = lock(&self.nodes).get(node_id)?.engine.clone()?;
        if let Some(c) = lock(&self.node_clients).get(&addr) {
            return Some(c.clone());
        }
        let c = Docker::connect_with_host(&addr).ok()?;
        let c = tokio::time::timeout(REQUEST_TIMEOUT, c.negotiate_version())
            .await
            .ok()?
            .ok()?;
        lock(&self.node_clients).insert(addr, c.clone());
        Some(c)
    }

    /// Whether the program of `argv` is missing from `image`, looked up as the docker
    /// driver does (a container created, not started, on one ready node reachable
    /// through its `bulkhead.engine` label; the image's entrypoint, if it has one, is the
    /// program). `Some(program)`: missing. `None`: found, or nobody could tell (no
    /// reachable node has the image): the swarm then runs it, and a missing program is a
    /// run that exits 127. A program found once per image is not looked up again.
    async fn program_missing(
        self: &Arc<Self>,
        client: &Docker,
        image: &str,
        argv: &[String],
    ) -> Option<String> {
        let key = (image.to_owned(), argv[0].clone());
        if lock(&self.programs).contains(&key) {
            return None;
        }
        if lock(&self.nodes).is_empty() {
            if let Ok(nodes) = client.list_nodes(None).await {
                self.update_nodes(nodes);
            }
        }
        let candidates: Vec<String> = lock(&self.nodes)
            .iter()
            .filter(|(_, n)| n.ready && n.engine.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        for node in candidates {
            let Some(nc) = self.node_client(&node).await else {
                continue;
            };
            let body = bollard::models::ContainerCreateBody {
                image: Some(image.to_owned()),
                cmd: Some(argv.to_vec()),
                labels: Some(HashMap::from([(
                    LABEL_DAEMON.to_owned(),
                    self.daemon_id().to_owned(),
                )])),
                ..Default::default()
            };
            let Ok(created) = nc
                .create_container(
                    None::<bollard::query_parameters::CreateContainerOptions>,
                    body,
                )
                .await
            else {
                // Not on this node (or the node refused): ask the next one.
                continue;
            };
            let config = nc
                .inspect_container(
                    &created.id,
                    None::<bollard::query_parameters::InspectContainerOptions>,
                )
                .await
                .ok()
                .and_then(|c| c.config);
            let program = config
                .as_ref()
                .and_then(|c| c.entrypoint.as_ref())
                .and_then(|e| e.first().cloned())
                .unwrap_or_else(|| argv[0].clone());
            let path = config
                .and_then(|c| c.env)
                .unwrap_or_default()
                .iter()
                .find_map(|kv| kv.strip_prefix("PATH=").map(str::to_owned))
                .unwrap_or_else(|| {
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
                });
            let exists =
                bulkhead_docker::driver::program_exists(&nc, &created.id, &program, &path).await;
            let _ = nc
                .remove_container(
                    &created.id,
                    Some(RemoveContainerOptions {
                        force: true,
                        v: true,
                        link: false,
                    }),
                )
                .await;
            if exists {
                lock(&self.programs).insert(key);
                return None;
            }
            return Some(program);
        }
        None
    }

    /// Records the nodes; returns those that are ready again after having been seen
    /// down.
    fn update_nodes(&self, nodes: Vec<bollard::models::Node>) -> Vec<String> {
        let mut known = lock(&self.nodes);
        let mut back = Vec::new();
        for n in nodes {
            let Some(id) = n.id else { continue };
            let state = n.status.as_ref().and_then(|s| s.state);
            let ready = state == Some(NodeState::READY);
            let down = state == Some(NodeState::DOWN);
            let view = NodeView {
                hostname: n
                    .description
                    .and_then(|d| d.hostname)
                    .unwrap_or_else(|| id.clone()),
                ready,
                down,
                engine: n
                    .spec
                    .and_then(|s| s.labels)
                    .and_then(|l| l.get(LABEL_ENGINE).cloned()),
            };
            if let Some(old) = known.get(&id) {
                if old.down && ready {
                    back.push(id.clone());
                }
            }
            known.insert(id, view);
        }
        back
    }

    /// Removes this daemon's containers on node `node_id` whose task is not a live task
    /// of a service this driver watches: copies left running while the node was cut off.
    async fn fence(self: &Arc<Self>, client: &Docker, node_id: &str) {
        let Some(view) = lock(&self.nodes).get(node_id).cloned() else {
            return;
        };
        let Some(nc) = self.node_client(node_id).await else {
            tracing::warn!(
                "swarm node {} is back; it has no {LABEL_ENGINE} label, so bulkhead cannot \
                 reach its stale copies: the swarm stops them itself",
                view.hostname
            );
            return;
        };
        // Live: the current task of every watched service, from a fresh listing (a spawn
        // in progress may not have recorded its task yet).
        let watched: HashSet<String> = self.watched().iter().map(|s| s.id.clone()).collect();
        let live: HashSet<String> = match client
            .list_tasks(Some(ListTasksOptions {
                filters: Some(self.label_filter()),
            }))
            .await
        {
            Ok(tasks) => tasks
                .into_iter()
                .filter(|t| {
                    t.service_id.as_ref().is_some_and(|s| watched.contains(s))
                        && t.desired_state == Some(TaskState::RUNNING)
                })
                .filter_map(|t| t.id)
                .collect(),
            Err(e) => {
                tracing::warn!("cannot list tasks to fence node {}: {e}", view.hostname);
                return;
            }
        };
        let containers = match nc
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(self.label_filter()),
                ..Default::default()
            }))
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("cannot list containers on node {}: {e}", view.hostname);
                return;
            }
        };
        for c in containers {
            let labels = c.labels.unwrap_or_default();
            let task = labels.get(LABEL_TASK).cloned().unwrap_or_default();
            if live.contains(&task) {
                continue;
            }
            let Some(id) = c.id else { continue };
            let running = c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING);
            let opts = RemoveContainerOptions {
                force: true,
                v: true,
                link: false,
            };
            match nc.remove_container(&id, Some(opts)).await {
                Ok(()) if running => {
                    self.fenced.fetch_add(1, Ordering::SeqCst);
                    tracing::warn!(
                        "fenced a stale copy of instance {} on swarm node {}: container {} \
                         (task {task}) ran on while the node was cut off; removed",
                        labels.get(LABEL_INSTANCE).map_or("?", String::as_str),
                        view.hostname,
                        short(&id),
                    );
                }
                Ok(()) => {}
                Err(e) => tracing::warn!(
                    "cannot remove stale container {} on swarm node {}: {e}",
                    short(&id),
                    view.hostname
                ),
            }
        }
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// The shared poller: every `poll`, the nodes and this daemon's tasks, routed to the
/// handles. Ends when the driver is dropped.
async fn poll_loop(inner: Weak<Inner>, client: Docker) {
    let period = match inner.upgrade() {
        Some(i) => i.poll,
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let watched = inner.watched();
        // Idle (no run to watch, no node to fence when it returns): nothing to ask.
        let node_down = lock(&inner.nodes).values().any(|n| n.down);
        if watched.is_empty() && !node_down {
            continue;
        }
        match client.list_nodes(None).await {
            Ok(nodes) => {
                for node in inner.update_nodes(nodes) {
                    let (inner, client) = (inner.clone(), client.clone());
                    tokio::spawn(async move { inner.fence(&client, &node).await });
                }
            }
            Err(e) => tracing::debug!("swarm poller: cannot list nodes: {e}"),
        }
        if watched.is_empty() {
            continue;
        }
        let tasks = match client
            .list_tasks(Some(ListTasksOptions {
                filters: Some(inner.label_filter()),
            }))
            .await
        {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!("swarm poller: cannot list tasks: {e}");
                continue;
            }
        };
        for s in watched {
            let mine: Vec<&Task> = tasks
                .iter()
                .filter(|t| t.service_id.as_deref() == Some(s.id.as_str()))
                .collect();
            s.update(&inner, &mine);
        }
    }
}

/// The newest of a service's tasks.
fn newest<'a>(tasks: &[&'a Task]) -> Option<&'a Task> {
    tasks
        .iter()
        .copied()
        .max_by_key(|t| t.version.as_ref().and_then(|v| v.index).unwrap_or(0))
}

/// One run: a service and its task. The [`InstanceHandle`].
pub struct Service {
    id: String,
    name: String,
    instance: String,
    inner: Weak<Inner>,
    client: Docker,
    run: Mutex<Run>,
    status: watch::Sender<Option<ExitStatus>>,
    ready: watch::Sender<bool>,
    ending: AtomicBool,
    stopping: Mutex<Option<Signal>>,
    tap: Arc<OutputTap>,
    logs_done: watch::Sender<bool>,
    /// When output last arrived.
    last_output: Arc<Mutex<Option<tokio::time::Instant>>>,
    memory_limit: Option<u64>,
    pids_limit: Option<u32>,
    env: Vec<(String, String)>,
}

#[derive(Debug, Default, Clone)]
struct Run {
    task: Option<String>,
    node: Option<String>,
    container: Option<String>,
    /// The last exit code seen for the task.
    code: Option<i64>,
}

impl Service {
    #[allow(clippy::too_many_arguments)]
    fn new(
        inner: &Arc<Inner>,
        client: Docker,
        id: String,
        name: String,
        instance: String,
        memory_limit: Option<u64>,
        pids_limit: Option<u32>,
        env: Vec<(String, String)>,
    ) -> Arc<Service> {
        let s = Arc::new(Service {
            id: id.clone(),
            name,
            instance,
            inner: Arc::downgrade(inner),
            client,
            run: Mutex::new(Run::default()),
            status: watch::channel(None).0,
            ready: watch::channel(false).0,
            ending: AtomicBool::new(false),
            stopping: Mutex::new(None),
            tap: Arc::new(OutputTap::default()),
            logs_done: watch::channel(false).0,
            last_output: Arc::new(Mutex::new(None)),
            memory_limit,
            pids_limit,
            env,
        });
        lock(&inner.services).insert(id, Arc::downgrade(&s));
        s
    }

    /// The service id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current task's id, node id and container id, once known.
    pub fn task(&self) -> (Option<String>, Option<String>, Option<String>) {
        let r = lock(&self.run);
        (r.task.clone(), r.node.clone(), r.container.clone())
    }

    /// Follows the service's output into the tap (`since`: only what comes after that
    /// Unix time, for an adopted service).
    fn follow_logs(self: &Arc<Self>, since: i32) {
        let mut stream = self.client.service_logs(
            &self.id,
            Some(LogsOptions {
                follow: true,
                stdout: true,
                stderr: true,
                since,
                until: 0,
                timestamps: false,
                tail: "all".to_owned(),
            }),
        );
        let tap = self.tap.clone();
        let done = self.logs_done.clone();
        let last = self.last_output.clone();
        tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                *lock(&last) = Some(tokio::time::Instant::now());
                match item {
                    Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                        tap.write(Stream::Stdout, &message)
                    }
                    Ok(LogOutput::StdErr { message }) => tap.write(Stream::Stderr, &message),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            done.send_replace(true);
        });
    }

    /// Takes in the service's tasks as the manager lists them.
    fn update(self: &Arc<Self>, inner: &Inner, tasks: &[&Task]) {
        if self.ending.load(Ordering::SeqCst) {
            return;
        }
        let Some(t) = newest(tasks) else {
            // A task was seen and now none is listed: the service is gone (removed by
            // someone else, or its tasks reaped).
            let (seen, code) = {
                let r = lock(&self.run);
                (r.task.is_some(), r.code)
            };
            if seen {
                let st = code.map_or_else(|| self.stopped_status(), exit_status);
                self.finish(st, "its tasks are gone");
            }
            return;
        };
        let observed = observe(t);
        let node = t.node_id.clone();
        {
            let mut r = lock(&self.run);
            r.task = t.id.clone();
            if node.is_some() {
                r.node = node.clone();
            }
            let cs = t.status.as_ref().and_then(|s| s.container_status.as_ref());
            if let Some(c) = cs
                .and_then(|c| c.container_id.clone())
                .filter(|c| !c.is_empty())
            {
                r.container = Some(c);
            }
            if let Observed::Ended { code: Some(c), .. } = observed {
                r.code = Some(c);
            }
        }
        match observed {
            Observed::Pending { .. } | Observed::Starting => {
                self.ready.send_if_modified(|r| std::mem::replace(r, false));
            }
            Observed::Running => {
                self.ready.send_if_modified(|r| !std::mem::replace(r, true));
            }
            Observed::Ended { code, err, .. } => {
                let st = code.map_or_else(|| self.stopped_status(), exit_status);
                let why = err.unwrap_or_else(|| "the task ended".to_owned());
                self.finish(st, &why);
                return;
            }
        }
        // A running task whose node the manager marks down is lost to bulkhead: the run
        // ends (SIGKILL), its service is removed and the restart policy places the key
        // again; the copy left on the node is fenced when the node returns.
        if let Some(n) = node {
            let down = lock(&inner.nodes).get(&n).is_some_and(|v| v.down);
            if down {
                let host = lock(&inner.nodes)
                    .get(&n)
                    .map_or_else(|| n.clone(), |v| v.hostname.clone());
                tracing::warn!(
                    "instance {}: swarm node {host} of task {} is down; the run counts as \
                     lost, and a copy still running there is fenced when the node returns",
                    self.instance,
                    lock(&self.run).task.clone().unwrap_or_default()
                );
                self.finish(
                    ExitStatus::Signaled {
                        signal: 9,
                        core_dumped: false,
                    },
                    "its node is down",
                );
            }
        }
    }

    /// The status of a run whose exit code is unknown: the stop signal it was sent, else
    /// SIGKILL.
    fn stopped_status(&self) -> ExitStatus {
        let sig = lock(&self.stopping).unwrap_or(Signal::KILL);
        ExitStatus::Signaled {
            signal: sig.number(),
            core_dumped: false,
        }
    }

    /// The run ended: its last output is taken in, the service removed, then `wait`
    /// resolves.
    fn finish(self: &Arc<Self>, st: ExitStatus, why: &str) {
        if self.ending.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::debug!("swarm service {} ended ({why}): {st}", self.name);
        let me = self.clone();
        let end = async move {
            // Output written just before the end may still be on its way from the node:
            // wait until none has come for LOG_QUIET (at most LOG_DRAIN).
            let t0 = tokio::time::Instant::now();
            while !*me.logs_done.borrow() {
                let last = lock(&me.last_output).map_or(t0, |l| l.max(t0));
                let now = tokio::time::Instant::now();
                if now >= last + LOG_QUIET || now >= t0 + LOG_DRAIN {
                    break;
                }
                tokio::time::sleep_until((last + LOG_QUIET).min(t0 + LOG_DRAIN)).await;
            }
            me.remove().await;
            me.tap.close_all();
            me.ready.send_replace(false);
            if let Some(inner) = me.inner.upgrade() {
                lock(&inner.services).remove(&me.id);
            }
            me.status.send_replace(Some(st));
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(end);
            }
            Err(_) => {
                self.status.send_replace(Some(st));
            }
        }
    }

    /// Removes the service (404: already gone).
    async fn remove(&self) {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.client.delete_service(&self.id)).await {
            Ok(Ok(()))
            | Ok(Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            })) => {}
            Ok(Err(e)) => tracing::warn!("cannot remove swarm service {}: {e}", self.name),
            Err(_) => tracing::warn!("removing swarm service {} timed out", self.name),
        }
    }

    /// Sends `signal` to the task's container through its node's engine. `false`: the
    /// node cannot be reached (no `bulkhead.engine` label, or no container yet).
    async fn kill(&self, signal: Signal) -> bool {
        let (node, container) = {
            let r = lock(&self.run);
            (r.node.clone(), r.container.clone())
        };
        let (Some(node), Some(container), Some(inner)) = (node, container, self.inner.upgrade())
        else {
            return false;
        };
        let Some(nc) = inner.node_client(&node).await else {
            return false;
        };
        let opts = KillContainerOptions {
            signal: signal.name(),
        };
        match nc.kill_container(&container, Some(opts)).await {
            Ok(()) => true,
            // Not running any more (409) or gone (404): its end is on its way.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404 | 409,
                ..
            }) => true,
            Err(e) => {
                tracing::debug!("kill of container {} failed: {e}", short(&container));
                false
            }
        }
    }

    /// The environment the task was started with.
    pub fn env(&self) -> Vec<(String, String)> {
        self.env.clone()
    }
}

#[async_trait]
impl InstanceHandle for Service {
    fn pid(&self) -> Option<u32> {
        None
    }

    fn signal(&self, signal: Signal) -> Result<(), SignalError> {
        if self.try_status().is_some() {
            return Ok(());
        }
        let Some(me) = self
            .inner
            .upgrade()
            .and_then(|i| lock(&i.services).get(&self.id).and_then(Weak::upgrade))
        else {
            return Ok(());
        };
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                if !me.kill(signal).await {
                    if signal == Signal::KILL {
                        // No way to the node: removing the service is the engine's kill.
                        *lock(&me.stopping) = Some(signal);
                        me.remove().await;
                    } else {
                        tracing::warn!(
                            "cannot send {signal} to swarm service {}: its node cannot be \
                             reached (no {LABEL_ENGINE} label)",
                            me.name
                        );
                    }
                }
            });
        }
        Ok(())
    }

    async fn wait(&self) -> ExitStatus {
        let mut rx = self.status.subscribe();
        let st = match rx.wait_for(Option::is_some).await {
            Ok(st) => *st,
            Err(_) => None,
        };
        st.unwrap_or(ExitStatus::Signaled {
            signal: 9,
            core_dumped: false,
        })
    }

    fn try_status(&self) -> Option<ExitStatus> {
        *self.status.borrow()
    }

    /// `signal` to the task's container through its node's engine, then at the deadline
    /// SIGKILL; the service is removed once the task has ended. Where the node cannot be
    /// reached, the service is removed at once: the engine then sends the service's stop
    /// signal and SIGKILL after its stop grace (the manifest's `shutdown`).
    async fn stop_until(&self, signal: Signal, mut kill_at: KillDeadline) -> ExitStatus {
        if let Some(st) = self.try_status() {
            return st;
        }
        *lock(&self.stopping) = Some(signal);
        if !self.kill(signal).await {
            self.remove().await;
            return self.wait().await;
        }
        tokio::select! {
            st = self.wait() => st,
            _ = kill_at.passed() => {
                *lock(&self.stopping) = Some(Signal::KILL);
                if !self.kill(Signal::KILL).await {
                    self.remove().await;
                }
                self.wait().await
            }
        }
    }

    /// Usage is measured on the task's node, out of the daemon's reach: the limits only.
    fn stats(&self) -> Result<Stats, StatsError> {
        Ok(Stats {
            memory_limit_bytes: self.memory_limit,
            pids_limit: self.pids_limit,
            ..Stats::default()
        })
    }

    fn engine_readiness(&self) -> Option<watch::Receiver<bool>> {
        Some(self.ready.subscribe())
    }

    /// The engine's exec API on the task's node (reached through its `bulkhead.engine`
    /// label): the command runs in the task's container. A client that goes away does
    /// not end it (the node's pids mean nothing on this host).
    async fn engine_exec(&self, req: ExecRequest) -> Option<std::io::Result<EngineExec>> {
        let (node, container) = {
            let r = lock(&self.run);
            (r.node.clone(), r.container.clone())
        };
        let reach = async {
            let inner = self.inner.upgrade()?;
            let nc = inner.node_client(node.as_deref()?).await?;
            Some((nc, container?))
        };
        Some(match reach.await {
            Some((nc, container)) => {
                bulkhead_docker::driver::exec_in(&nc, &container, req, ExecKill::None).await
            }
            None => Err(std::io::Error::other(format!(
                "the node of swarm service {} cannot be reached for exec (no {LABEL_ENGINE} \
                 label on its node, or no task yet)",
                self.name
            ))),
        })
    }
}

/// The swarm (its manager, or the node that took the task) refused or failed.
fn engine(e: impl std::fmt::Display) -> SpawnError {
    SpawnError::Engine {
        reason: e.to_string(),
    }
}

#[async_trait]
impl Driver for SwarmDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Swarm
    }

    fn runs_host_programs(&self) -> bool {
        false
    }

    async fn spawn(&self, spec: SpawnSpec) -> Result<Spawned, SpawnError> {
        let inner = &self.inner;
        let invalid = |reason: &str| SpawnError::Invalid {
            instance: spec.instance.as_str().to_owned(),
            reason: reason.to_owned(),
        };
        let Some(sw) = spec.spec.swarm.clone() else {
            return Err(invalid(
                "a swarm workload needs a swarm: section (swarm.image)",
            ));
        };
        if spec.argv.is_empty() {
            return Err(invalid("the command is empty"));
        }
        let client = inner.client().await.map_err(engine)?;
        if let Some(program) = inner.program_missing(&client, &sw.image, &spec.argv).await {
            return Err(SpawnError::Exec {
                program,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("not found in image {}", sw.image),
                ),
            });
        }
        let body = service_spec(&spec, &sw, inner.daemon_id())?;
        let name = body.name.clone().unwrap_or_default();
        let created = client
            .create_service(body, None)
            .await
            .map_err(|e| match e {
                bollard::errors::Error::DockerResponseServerError {
                    status_code: 409, ..
                } => engine(format!(
                    "swarm service {name} already exists: a run of {} is still being removed",
                    spec.instance
                )),
                e => engine(format!("cannot create swarm service {name}: {e}")),
            })?;
        let Some(id) = created.id else {
            return Err(engine(format!(
                "swarm service {name}: the manager gave no id"
            )));
        };
        let res = spec.spec.resources.clone().unwrap_or_default();
        let svc = Service::new(
            inner,
            client.clone(),
            id.clone(),
            name.clone(),
            spec.instance.as_str().to_owned(),
            res.memory,
            res.pids,
            spec.env.clone(),
        );
        svc.follow_logs(0);
        // The first task, asked for directly until its container has started.
        let bound = spec
            .spec
            .readiness
            .as_ref()
            .map_or(SPAWN_TIMEOUT, |r| r.timeout.max(Duration::from_secs(5)));
        let deadline = tokio::time::Instant::now() + bound;
        let filters = HashMap::from([("service".to_owned(), vec![id.clone()])]);
        let mut last_err = None;
        loop {
            if let Ok(tasks) = client
                .list_tasks(Some(ListTasksOptions {
                    filters: Some(filters.clone()),
                }))
                .await
            {
                let tasks: Vec<&Task> = tasks.iter().collect();
                if let Some(t) = newest(&tasks) {
                    match observe(t) {
                        Observed::Pending { err } => last_err = err.or(last_err),
                        Observed::Ended {
                            never_started: true,
                            err,
                            ..
                        } => {
                            svc.ending.store(true, Ordering::SeqCst);
                            svc.remove().await;
                            lock(&inner.services).remove(&id);
                            let err = err.unwrap_or_else(|| "no reason given".into());
                            let lower = err.to_lowercase();
                            if lower.contains("executable file not found")
                                || lower.contains("no such file or directory")
                            {
                                return Err(SpawnError::Exec {
                                    program: spec.argv[0].clone(),
                                    source: std::io::Error::new(
                                        std::io::ErrorKind::NotFound,
                                        format!("swarm task of {name}: {err}"),
                                    ),
                                });
                            }
                            let reason =
                                format!("the swarm task of service {name} did not start: {err}");
                            if lower.contains("no such image") {
                                return Err(SpawnError::Image {
                                    image: sw.image.clone(),
                                    reason,
                                });
                            }
                            return Err(engine(reason));
                        }
                        _ => {
                            svc.update(inner, &tasks);
                            break;
                        }
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                svc.ending.store(true, Ordering::SeqCst);
                svc.remove().await;
                lock(&inner.services).remove(&id);
                return Err(engine(format!(
                    "no swarm node started the task of service {name} within {bound:?}{}",
                    last_err.map(|e| format!(": {e}")).unwrap_or_default()
                )));
            }
            tokio::time::sleep(SPAWN_POLL).await;
        }
        Ok(Spawned {
            tap: Some(svc.tap.clone()),
            handle: svc,
            stdout: None,
            stderr: None,
        })
    }

    /// This daemon's services, by label: each one's handle (watched again, its output
    /// from now on), or its exit if its task ended while no daemon watched.
    async fn recover(&self) -> Result<Vec<Found>, RecoverError> {
        let inner = &self.inner;
        // Not fatal: a key whose service could not be seen cannot get a second one, as
        // its service name is fixed (the new service is refused while the old exists).
        let fail = |reason: String| RecoverError {
            driver: DriverKind::Swarm,
            reason,
            fatal: false,
        };
        let client = inner.client().await.map_err(fail)?;
        let services = client
            .list_services(Some(ListServicesOptions {
                filters: Some(inner.label_filter()),
                status: None,
            }))
            .await
            .map_err(|e| fail(format!("cannot list services: {e}")))?;
        let tasks = client
            .list_tasks(Some(ListTasksOptions {
                filters: Some(inner.label_filter()),
            }))
            .await
            .map_err(|e| fail(format!("cannot list tasks: {e}")))?;
        if let Ok(nodes) = client.list_nodes(None).await {
            inner.update_nodes(nodes);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i32);
        let mut found = Vec::new();
        for s in services {
            let spec = s.spec.clone().unwrap_or_default();
            let labels = spec.labels.clone().unwrap_or_default();
            let (Some(id), Some(inst)) = (s.id.clone(), labels.get(LABEL_INSTANCE)) else {
                continue;
            };
            let name = spec.name.clone().unwrap_or_else(|| id.clone());
            let Ok((instance, _)) = InstanceId::parse(inst) else {
                tracing::warn!(
                    "swarm service {name} has a bad {LABEL_INSTANCE} label; removing it"
                );
                let _ = client.delete_service(&id).await;
                continue;
            };
            let template = spec.task_template.unwrap_or_default();
            let container = template.container_spec.unwrap_or_default();
            let env: Vec<(String, String)> = container
                .env
                .unwrap_or_default()
                .into_iter()
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_owned(), v.to_owned()))
                })
                .collect();
            let limits = template
                .resources
                .and_then(|r| r.limits)
                .unwrap_or_default();
            let svc = Service::new(
                inner,
                client.clone(),
                id.clone(),
                name.clone(),
                inst.clone(),
                limits.memory_bytes.map(|m| m as u64),
                limits.pids.map(|p| p as u32),
                env.clone(),
            );
            svc.follow_logs(now);
            let mine: Vec<&Task> = tasks
                .iter()
                .filter(|t| t.service_id.as_deref() == Some(id.as_str()))
                .collect();
            svc.update(inner, &mine);
            if svc.ending.load(Ordering::SeqCst) {
                let mut rx = svc.status.subscribe();
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, rx.wait_for(Option::is_some)).await;
            }
            found.push(Found {
                instance,
                process: None,
                describe: format!("swarm service {name}"),
                run_id: id.clone(),
                launched: None,
                env,
                exit: svc.try_status(),
                spawned: Spawned {
                    tap: Some(svc.tap.clone()),
                    handle: svc,
                    stdout: None,
                    stderr: None,
                },
                listen: Vec::new(),
            });
        }
        Ok(found)
    }

    /// Kills the found run (through its node, else by removing its service) and waits
    /// until its service is gone.
    async fn discard(&self, found: Found) {
        let h = found.spawned.handle;
        let _ =
            tokio::time::timeout(REQUEST_TIMEOUT * 3, h.stop(Signal::KILL, Duration::ZERO)).await;
    }
}
