//! The `docker` driver: one container per instance, created and started through the
//! Engine API.
//!
//! Spawn: reachability check ([`Engine::ensure`]) → image (as is, or built and cached by
//! [`ImageCache`]) → create (labels, limits, binds) → the program is looked up in the
//! container's file system (so that a missing program is a spawn error, not an instance
//! that exits 127) → attach stdout/stderr (before start: nothing is lost) → watch the
//! container's events → start → inspect for the main pid.
//!
//! Exit: the engine's `die` event (and `oom` before it) reaches the handle through the
//! engine's single event subscription; the container is then removed, and only then does
//! [`InstanceHandle::wait`] resolve. Exit codes above 128 that name a signal are reported
//! as that signal (the engine reports a signal death as `128 + n`, so `exit 137` is
//! indistinguishable from SIGKILL: documented limit).
//!
//! Signals go to the container's init through a pidfd on its host pid (`State.Pid`); with
//! `init: true` (the default) that is `docker-init`, which forwards them to the command.
//! Stop sends the manifest's signal through the engine, waits `grace`, then SIGKILL.
//!
//! Usage is read from the container's cgroup (the files the engine's own stats read), so
//! that [`InstanceHandle::stats`] stays synchronous and cheap.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, InspectContainerOptions, KillContainerOptions,
    RemoveContainerOptions, StartContainerOptions,
};
use bollard::Docker;
use bulkhead_core::channels::ENV_IOX2_ROOT;
use bulkhead_core::docker::DockerSpec;
use bulkhead_core::event::ExitStatus;
use bulkhead_core::key::InstanceId;
use bulkhead_core::signal::Signal;
use bulkhead_core::spec::{DriverKind, WorkloadSpec};
use bulkhead_driver::cgroup::keyed;
use bulkhead_driver::{
    sys, Driver, EngineExec, ExecRequest, ExitCause, Found, InstanceHandle, KillDeadline,
    RecoverError, SetupStep, SignalError, SpawnError, SpawnSpec, Spawned, Stats, StatsError,
    Stream,
};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::engine::{
    ContainerEvent, Engine, EventSink, LABEL_CONFIG, LABEL_DAEMON, LABEL_INSTANCE, LABEL_WARM,
    LABEL_WORKLOAD,
};
use crate::images::{ImageCache, Pin};

/// How long removing a dead container may take before the handle reports the exit anyway.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SIGKILLed container under a memory limit waits for the engine to say it
/// was the OOM killer, before its exit is reported as a plain SIGKILL. 1 s was too short
/// with the test suite's parallel containers on 2 cores (reported `crashed`, signal 9);
/// only that rare exit (SIGKILL under a memory limit) waits at all.
const OOM_LATE: Duration = Duration::from_secs(5);

/// The `docker` driver.
pub struct DockerDriver {
    pub(crate) engine: Arc<Engine>,
    pub(crate) images: Option<Arc<ImageCache>>,
    /// The warm-slot init's host path, once written (`crate::warm`).
    pub(crate) init: tokio::sync::OnceCell<PathBuf>,
}

impl DockerDriver {
    /// A driver on `engine`; `images` builds `docker.build` images (without it such
    /// workloads fail to spawn with a clear error).
    pub fn new(engine: Arc<Engine>, images: Option<Arc<ImageCache>>) -> DockerDriver {
        DockerDriver {
            engine,
            images,
            init: tokio::sync::OnceCell::new(),
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub(crate) async fn resolve_image(
        &self,
        client: &Docker,
        dk: &DockerSpec,
        spec: &SpawnSpec,
    ) -> Result<(String, Option<String>, Option<Pin>), SpawnError> {
        if let Some(image) = &dk.image {
            return match client.inspect_image(image).await {
                Ok(_) => Ok((image.clone(), None, None)),
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => Err(SpawnError::Image {
                    image: image.clone(),
                    reason: format!(
                        "docker image {image} is not in the engine; bulkhead pulls from no \
                         registry: load it (docker load, docker import) or describe it under \
                         docker.build"
                    ),
                }),
                Err(e) => Err(SpawnError::Engine {
                    reason: format!("cannot inspect docker image {image}: {e}"),
                }),
            };
        }
        let Some(images) = &self.images else {
            return Err(SpawnError::invalid(
                &spec.instance,
                "docker.build needs the image cache, which this driver was made without",
            ));
        };
        let (built, pin) = images
            .ensure_pinned(client, &spec.spec.name, dk, &spec.cwd)
            .await
            .map_err(|e| SpawnError::Image {
                image: format!("{} (docker.build)", spec.spec.name),
                reason: e.to_string(),
            })?;
        Ok((built.tag, Some(built.hash), Some(pin)))
    }
}

/// Whether `path` is `base` or under it.
fn under(path: &Path, base: &Path) -> bool {
    path.starts_with(base)
}

/// The container configuration for `spec`.
pub(crate) fn container_config(
    spec: &SpawnSpec,
    dk: &DockerSpec,
    image: &str,
    daemon_id: &str,
    config_hash: Option<&str>,
) -> Result<ContainerCreateBody, SpawnError> {
    let mut labels = HashMap::from([
        (LABEL_DAEMON.to_owned(), daemon_id.to_owned()),
        (LABEL_INSTANCE.to_owned(), spec.instance.as_str().to_owned()),
        (LABEL_WORKLOAD.to_owned(), spec.spec.name.clone()),
    ]);
    if let Some(h) = config_hash {
        labels.insert(LABEL_CONFIG.to_owned(), h.to_owned());
    }
    let mut binds: Vec<String> = spec
        .binds
        .iter()
        .map(|b| format!("{}:{}", b.source.display(), b.target.display()))
        .collect();
    for m in &dk.mounts {
        let src = if Path::new(&m.source).is_absolute() {
            PathBuf::from(&m.source)
        } else {
            spec.cwd.join(&m.source)
        };
        let ro = if m.read_only { ":ro" } else { "" };
        binds.push(format!("{}:{}{ro}", src.display(), m.target));
    }
    // `working_dir` (absolute, inside the container) or `docker.workdir`: one at most.
    let workdir = match dk.workdir.as_ref().or(spec.spec.working_dir.as_ref()) {
        Some(w) => Some(w.clone()),
        None if spec.binds.iter().any(|b| under(&spec.cwd, &b.target)) => {
            if !spec.cwd.is_dir() {
                return Err(SpawnError::setup(
                    &spec.instance,
                    SetupStep::WorkingDir,
                    format!("cannot start in {}: no such directory", spec.cwd.display()),
                ));
            }
            Some(spec.cwd.display().to_string())
        }
        None => None,
    };
    let res = spec.spec.resources.clone().unwrap_or_default();
    // The instance's $PORT is published on the host's loopback at the same number, so
    // that its address (127.0.0.1:$PORT) and the readiness probes work as for a process.
    let port = spec
        .env
        .iter()
        .find(|(k, _)| k == "PORT")
        .and_then(|(_, v)| v.parse::<u16>().ok())
        .filter(|&p| p > 0);
    let own_network = !matches!(dk.network.as_deref(), Some("host") | Some("none"));
    let published = port.filter(|_| own_network).map(|p| {
        let key = format!("{p}/tcp");
        let binding = bollard::models::PortBinding {
            host_ip: Some("127.0.0.1".to_owned()),
            host_port: Some(p.to_string()),
        };
        (key, binding)
    });
    let host = HostConfig {
        port_bindings: published
            .clone()
            .map(|(k, b)| HashMap::from([(k, Some(vec![b]))])),
        binds: Some(binds),
        init: Some(dk.init),
        memory: res.memory.map(|m| m as i64),
        // No swap on top of the memory limit.
        memory_swap: res.memory.map(|m| m as i64),
        nano_cpus: res.cpu.map(|c| (c * 1e9) as i64),
        pids_limit: res.pids.map(i64::from),
        cpuset_cpus: res.cpuset.clone(),
        shm_size: dk.shm_size.map(|s| s as i64),
        readonly_rootfs: Some(dk.read_only),
        network_mode: dk.network.clone(),
        cap_drop: (!dk.cap_drop.is_empty()).then(|| dk.cap_drop.clone()),
        // Deny by default: no setuid or file-capability escalation inside.
        security_opt: (!dk.new_privileges).then(|| vec!["no-new-privileges:true".to_owned()]),
        group_add: (!spec.spec.groups.is_empty()).then(|| spec.spec.groups.clone()),
        ulimits: ulimits(&spec.spec)
            .map_err(|e| SpawnError::setup(&spec.instance, SetupStep::Limits, e))?,
        ..Default::default()
    };
    Ok(ContainerCreateBody {
        image: Some(image.to_owned()),
        // The command replaces the image's command; its entrypoint stays unless the
        // manifest sets `docker.entrypoint` (as `docker run IMAGE ARGS` does).
        entrypoint: dk.entrypoint.clone(),
        cmd: Some(spec.argv.clone()),
        // The daemon's own variables stay out: the image's `ENV` (its PATH, HOME, a
        // venv's or a JDK's variables) applies unless the manifest sets them.
        env: Some(
            spec.env
                .iter()
                .filter(|(k, _)| !spec.inherited.contains(k))
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
        ),
        working_dir: workdir,
        user: container_user(&spec.env, manifest_user(&spec.spec, dk).as_deref()),
        exposed_ports: published.map(|(k, _)| vec![k]),
        labels: Some(labels),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        host_config: Some(host),
        ..Default::default()
    })
}

/// The manifest's `user[:group]` (names resolve in the container's own databases), or
/// `docker.user`; validation allows one of them at most.
fn manifest_user(spec: &WorkloadSpec, dk: &DockerSpec) -> Option<String> {
    match (&spec.user, &spec.group) {
        (Some(u), Some(g)) => Some(format!("{u}:{g}")),
        (Some(u), None) => Some(u.clone()),
        _ => dk.user.clone(),
    }
}

/// The manifest's `limits` as the engine's ulimits (`-1`: unlimited).
fn ulimits(spec: &WorkloadSpec) -> Result<Option<Vec<bollard::models::ResourcesUlimits>>, String> {
    if spec.limits.is_empty() {
        return Ok(None);
    }
    let to = |v: Option<u64>| v.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
    let limits = bulkhead_core::execution::resolve_limits(&spec.limits)
        .map_err(|(f, r)| format!("{f}: {r}"))?;
    Ok(Some(
        limits
            .into_iter()
            .map(|l| bollard::models::ResourcesUlimits {
                name: Some(l.name.to_owned()),
                soft: Some(to(l.soft)),
                hard: Some(to(l.hard)),
            })
            .collect(),
    ))
}

/// The user the container runs as: `docker.user` (or `user`) if set; else, for an instance with
/// channels, the daemon's own uid:gid. The data plane's shared-memory files are 0600 and
/// owned by the daemon's user, and `/dev/shm` is sticky: running as that user is what
/// lets the workload open them, and lets the daemon reclaim the files the workload made
/// if it dies. Otherwise the image's own user.
fn container_user(env: &[(String, String)], user: Option<&str>) -> Option<String> {
    if let Some(u) = user {
        return Some(u.to_owned());
    }
    let has_channels = env.iter().any(|(k, _)| k == ENV_IOX2_ROOT);
    has_channels.then(|| {
        format!(
            "{}:{}",
            rustix::process::getuid().as_raw(),
            rustix::process::getgid().as_raw()
        )
    })
}

/// Whether the program exists in the created container `id`: an absolute path as is, a bare
/// name in one of the `PATH` directories (all looked up at once).
pub async fn program_exists(client: &Docker, id: &str, argv0: &str, path: &str) -> bool {
    let candidates: Vec<String> = if argv0.contains('/') {
        vec![argv0.to_owned()]
    } else {
        path.split(':')
            .filter(|d| d.starts_with('/'))
            .map(|d| format!("{}/{argv0}", d.trim_end_matches('/')))
            .collect()
    };
    let checks = candidates.iter().map(|c| {
        client.get_container_archive_info(
            id,
            Some(bollard::query_parameters::ContainerArchiveInfoOptions { path: c.clone() }),
        )
    });
    futures_util::future::join_all(checks)
        .await
        .iter()
        .any(Result::is_ok)
}

#[async_trait]
impl Driver for DockerDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Docker
    }

    fn runs_host_programs(&self) -> bool {
        false
    }

    /// Containers created and started ahead, waiting in our init ([`crate::warm`]).
    fn prewarms(&self) -> bool {
        true
    }

    async fn prewarm(
        &self,
        spec: bulkhead_driver::warm::WarmSpec,
    ) -> Result<Box<dyn bulkhead_driver::warm::Warm>, SpawnError> {
        Ok(Box::new(self.make_slot(spec).await?))
    }

    async fn spawn_warm(
        &self,
        slot: Box<dyn bulkhead_driver::warm::Warm>,
        spec: SpawnSpec,
    ) -> Result<Spawned, SpawnError> {
        self.hand_over(slot, spec).await
    }

    /// This daemon's running containers, by label, watched again; a container that no
    /// longer runs is removed here (nothing of it is left to adopt).
    async fn recover(&self) -> Result<Vec<Found>, RecoverError> {
        let err = |reason: String| RecoverError {
            driver: DriverKind::Docker,
            reason,
            fatal: false,
        };
        let listed =
            tokio::time::timeout(Duration::from_secs(10), crate::recovery::list(&self.engine))
                .await
                .map_err(|_| err("listing containers timed out".into()))?
                .map_err(err)?;
        let mut out = Vec::new();
        for f in listed {
            let instance = InstanceId::parse(&f.instance).ok().map(|(id, _)| id);
            let (Some(instance), true) = (instance, f.running) else {
                match &f.warm {
                    Some(slot) if f.instance.is_empty() => {
                        tracing::info!("removing unclaimed warm slot {slot} (container {})", f.id)
                    }
                    _ => tracing::info!("removing stale container {} of {}", f.id, f.instance),
                }
                if let Err(e) = crate::recovery::remove(&self.engine, &f.id).await {
                    tracing::warn!("{e}");
                }
                continue;
            };
            let (handle, logs) = match Container::adopt(self.engine.clone(), &f.id).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!("cannot adopt container {}: {e}; removing it", f.id);
                    let _ = crate::recovery::remove(&self.engine, &f.id).await;
                    continue;
                }
            };
            out.push(Found {
                instance,
                process: None,
                describe: format!("container {}", short_id(&f.id)),
                run_id: f.id,
                launched: None,
                env: handle.env(),
                exit: None,
                spawned: Spawned {
                    handle,
                    stdout: logs.0,
                    stderr: logs.1,
                    tap: None,
                },
                // Docker workloads have no `sockets:` (refused in the manifest).
                listen: Vec::new(),
            });
        }
        Ok(out)
    }

    async fn discard(&self, found: Found) {
        if let Err(e) = crate::recovery::remove(&self.engine, &found.run_id).await {
            tracing::warn!("{e}");
        }
    }

    async fn spawn(&self, spec: SpawnSpec) -> Result<Spawned, SpawnError> {
        let client = self
            .engine
            .ensure()
            .await
            .map_err(|e| SpawnError::Engine {
                reason: e.to_string(),
            })?
            .clone();
        let Some(dk) = spec.spec.docker.clone() else {
            return Err(SpawnError::invalid(
                &spec.instance,
                "a docker workload needs a docker: section (docker.image or docker.build)",
            ));
        };
        if spec.argv.is_empty() {
            return Err(SpawnError::invalid(&spec.instance, "the command is empty"));
        }
        // The pin keeps a cached image from eviction until its container exists.
        let (image, hash, pin) = self.resolve_image(&client, &dk, &spec).await?;
        let body = container_config(&spec, &dk, &image, self.engine.daemon_id(), hash.as_deref())?;
        let created = client
            .create_container(None::<CreateContainerOptions>, body)
            .await
            .map_err(|e| SpawnError::Engine {
                reason: format!("cannot create a container of {image}: {e}"),
            })?;
        drop(pin);
        let id = created.id;
        let cleanup = |client: Docker, id: String| async move {
            let _ = client
                .remove_container(
                    &id,
                    Some(RemoveContainerOptions {
                        force: true,
                        v: true,
                        link: false,
                    }),
                )
                .await;
        };
        // The container's PATH (the image's `ENV` merged with the manifest's by the
        // engine) and what it runs first: its entrypoint, if it has one (the command is
        // then only its arguments), else the command.
        let config = client
            .inspect_container(
                &id,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
            .ok()
            .and_then(|c| c.config);
        let program = config
            .as_ref()
            .and_then(|c| c.entrypoint.as_ref())
            .and_then(|e| e.first().cloned())
            .unwrap_or_else(|| spec.argv[0].clone());
        let merged = config.and_then(|c| c.env).unwrap_or_default();
        let path = merged
            .iter()
            .find_map(|kv| kv.strip_prefix("PATH="))
            .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .to_owned();
        let attach_opts = AttachContainerOptions {
            stream: true,
            stdout: true,
            stderr: true,
            logs: true,
            ..Default::default()
        };
        let (exists, attached) = tokio::join!(
            program_exists(&client, &id, &program, &path),
            client.attach_container(&id, Some(attach_opts))
        );
        if !exists {
            cleanup(client, id.clone()).await;
            return Err(SpawnError::Exec {
                program,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("not found in image {image}"),
                ),
            });
        }
        let attached = match attached {
            Ok(a) => a,
            Err(e) => {
                cleanup(client, id.clone()).await;
                return Err(SpawnError::Engine {
                    reason: format!("cannot attach to container {id}: {e}"),
                });
            }
        };
        let pipes = match Pipes::new() {
            Ok(p) => p,
            Err(e) => {
                cleanup(client, id).await;
                return Err(SpawnError::setup(
                    &spec.instance,
                    SetupStep::Pipes,
                    format!("cannot create output pipes: {e}"),
                ));
            }
        };
        let (status_tx, _) = watch::channel(None);
        let container = Arc::new(Container {
            id: id.clone(),
            instance: spec.instance.as_str().to_owned(),
            client: client.clone(),
            engine: self.engine.clone(),
            main: Mutex::new(None),
            status: status_tx,
            died: AtomicBool::new(false),
            oom: Arc::new(AtomicBool::new(false)),
            memory_limit: spec.spec.resources.as_ref().and_then(|r| r.memory),
            pids_limit: spec.spec.resources.as_ref().and_then(|r| r.pids),
            env: spec.env.clone(),
            exec_env: Vec::new(),
        });
        let sink: Arc<dyn EventSink> = container.clone();
        self.engine.watch(&id, Arc::downgrade(&sink));
        tokio::spawn(copy_output(attached.output, pipes.out_tx, pipes.err_tx));
        if let Err(e) = client
            .start_container(&id, None::<StartContainerOptions>)
            .await
        {
            self.engine.unwatch(&id);
            cleanup(client, id).await;
            return Err(SpawnError::Engine {
                reason: format!("cannot start a container of {image}: {e}"),
            });
        }
        container.inspect_main().await;
        if dk.init {
            container.wait_init_forked().await;
        }
        Ok(Spawned {
            handle: container,
            stdout: Some(pipes.out_rx),
            stderr: Some(pipes.err_rx),
            tap: None,
        })
    }
}

/// The two output pipes: the daemon reads the `rx` ends, the attach task writes the others.
pub(crate) struct Pipes {
    pub(crate) out_rx: OwnedFd,
    pub(crate) err_rx: OwnedFd,
    pub(crate) out_tx: tokio::net::unix::pipe::Sender,
    pub(crate) err_tx: tokio::net::unix::pipe::Sender,
}

impl Pipes {
    pub(crate) fn new() -> std::io::Result<Pipes> {
        let flags = rustix::pipe::PipeFlags::CLOEXEC;
        let (out_rx, out_w) = rustix::pipe::pipe_with(flags)?;
        let (err_rx, err_w) = rustix::pipe::pipe_with(flags)?;
        Ok(Pipes {
            out_rx,
            err_rx,
            out_tx: tokio::net::unix::pipe::Sender::from_owned_fd(out_w)?,
            err_tx: tokio::net::unix::pipe::Sender::from_owned_fd(err_w)?,
        })
    }
}

/// Copies the attach stream into the pipes until the container's output ends (or the
/// reader went away).
pub(crate) async fn copy_output(
    mut output: std::pin::Pin<
        Box<
            dyn futures_util::Stream<
                    Item = Result<bollard::container::LogOutput, bollard::errors::Error>,
                > + Send,
        >,
    >,
    mut out: tokio::net::unix::pipe::Sender,
    mut err: tokio::net::unix::pipe::Sender,
) {
    use bollard::container::LogOutput;
    let (mut out_ok, mut err_ok) = (true, true);
    while let Some(item) = output.next().await {
        match item {
            Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) if out_ok => {
                out_ok = out.write_all(&message).await.is_ok();
            }
            Ok(LogOutput::StdErr { message }) if err_ok => {
                err_ok = err.write_all(&message).await.is_ok();
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
}

/// The container's init on the host: its pid and a pidfd on it.
pub(crate) struct Main {
    pub(crate) pid: u32,
    pub(crate) pidfd: OwnedFd,
    pub(crate) cgroup: Option<Cgroup>,
}

/// One container: the [`InstanceHandle`] and the receiver of its engine events.
pub struct Container {
    pub(crate) id: String,
    pub(crate) instance: String,
    pub(crate) client: Docker,
    pub(crate) engine: Arc<Engine>,
    pub(crate) main: Mutex<Option<Main>>,
    pub(crate) status: watch::Sender<Option<ExitStatus>>,
    pub(crate) died: AtomicBool,
    /// Set by the engine's `oom` event, or by the inspect made when the container dies.
    pub(crate) oom: Arc<AtomicBool>,
    pub(crate) memory_limit: Option<u64>,
    pub(crate) pids_limit: Option<u32>,
    pub(crate) env: Vec<(String, String)>,
    /// `NAME=value` given to every exec in front of its own: a warm slot's program got
    /// its environment from the hand-over, not from the container's configuration.
    pub(crate) exec_env: Vec<String>,
}

impl Container {
    /// A handle on an existing container of this daemon (recovery after a restart): it is
    /// watched from now on (and reported as ended at once if it no longer runs); its new
    /// output comes out of the returned pipes.
    #[allow(clippy::type_complexity)]
    pub async fn adopt(
        engine: Arc<Engine>,
        id: &str,
    ) -> Result<(Arc<Container>, (Option<OwnedFd>, Option<OwnedFd>)), String> {
        let client = engine.ensure().await.map_err(|e| e.to_string())?.clone();
        let info = client
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map_err(|e| format!("cannot inspect container {id}: {e}"))?;
        let config = info.config.clone().unwrap_or_default();
        let labels = config.labels.clone().unwrap_or_default();
        let mut env: Vec<(String, String)> = config
            .env
            .unwrap_or_default()
            .into_iter()
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_owned(), v.to_owned()))
            })
            .collect();
        let host = info.host_config.clone().unwrap_or_default();
        // A claimed warm slot's program got its environment at the hand-over: the
        // container's own is the slot's. Read it from the host.
        let mut exec_env = Vec::new();
        if labels.contains_key(LABEL_WARM) {
            let pid = info.state.as_ref().and_then(|s| s.pid);
            let pid = pid.and_then(|p| u32::try_from(p).ok()).filter(|&p| p > 0);
            if let Some(e) = pid.and_then(|p| crate::warm::program_env(p, host.init == Some(true)))
            {
                exec_env = e.iter().map(|(k, v)| format!("{k}={v}")).collect();
                env = e;
            }
        }
        let (status_tx, _) = watch::channel(None);
        let c = Arc::new(Container {
            id: id.to_owned(),
            instance: labels.get(LABEL_INSTANCE).cloned().unwrap_or_default(),
            client: client.clone(),
            engine: engine.clone(),
            main: Mutex::new(None),
            status: status_tx,
            died: AtomicBool::new(false),
            oom: Arc::new(AtomicBool::new(false)),
            memory_limit: host.memory.filter(|&m| m > 0).map(|m| m as u64),
            pids_limit: host.pids_limit.filter(|&p| p > 0).map(|p| p as u32),
            env,
            exec_env,
        });
        let sink: Arc<dyn EventSink> = c.clone();
        engine.watch(id, Arc::downgrade(&sink));
        let opts = AttachContainerOptions {
            stream: true,
            stdout: true,
            stderr: true,
            logs: false,
            ..Default::default()
        };
        let pipes = match (client.attach_container(id, Some(opts)).await, Pipes::new()) {
            (Ok(a), Ok(p)) => {
                tokio::spawn(copy_output(a.output, p.out_tx, p.err_tx));
                (Some(p.out_rx), Some(p.err_rx))
            }
            _ => (None, None),
        };
        c.inspect_main().await;
        Ok((c, pipes))
    }

    /// The container's environment (adopted containers: as the engine reports it).
    pub fn env(&self) -> Vec<(String, String)> {
        self.env.clone()
    }

    /// The container id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Waits (up to 2 s) until `docker-init` has forked the command. Before that, the init
    /// has not yet blocked the signals it forwards, and a SIGTERM sent to a PID 1 without
    /// a handler is dropped by the kernel: a stop right after the start would then
    /// escalate to SIGKILL. The init forks at once, so this costs well under a millisecond.
    async fn wait_init_forked(&self) {
        let Some(pid) = self.pid() else { return };
        let children = format!("/proc/{pid}/task/{pid}/children");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while tokio::time::Instant::now() < deadline {
            match std::fs::read_to_string(&children) {
                Ok(c) if c.trim().is_empty() => {}
                // Forked, or the init is gone (its die event is on its way).
                _ => return,
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Reads the init's host pid, opens a pidfd on it and finds its cgroup. A container
    /// that already ended has no pid (its `die` event is on its way).
    async fn inspect_main(&self) {
        let Ok(info) = self
            .client
            .inspect_container(&self.id, None::<InspectContainerOptions>)
            .await
        else {
            return;
        };
        let st = info.state.unwrap_or_default();
        if st.running != Some(true) {
            // Ended before we looked, or while the daemon was away: report it.
            if st.oom_killed == Some(true) {
                self.event(ContainerEvent::Oom);
            }
            if !matches!(
                st.status,
                Some(bollard::models::ContainerStateStatusEnum::CREATED)
            ) {
                self.event(ContainerEvent::Die {
                    exit_code: st.exit_code.unwrap_or(-1),
                });
            }
            return;
        }
        let Some(pid) = st
            .pid
            .and_then(|p| u32::try_from(p).ok())
            .filter(|&p| p > 0)
        else {
            return;
        };
        if let Ok(pidfd) = sys::pidfd_open(pid) {
            *self.main.lock().unwrap_or_else(|e| e.into_inner()) = Some(Main {
                pid,
                pidfd,
                cgroup: Cgroup::of(pid),
            });
            self.watch_oom();
        }
    }

    /// Under a memory limit, starts [`watch_oom`] on the init found by `inspect_main` (or
    /// kept by a warm slot).
    pub(crate) fn watch_oom(&self) {
        if self.memory_limit.is_none() {
            return;
        }
        let main = self.main.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((Ok(pidfd), Some(cg))) = main
            .as_ref()
            .map(|m| (m.pidfd.try_clone(), m.cgroup.clone()))
        {
            tokio::spawn(watch_oom(pidfd, cg, self.oom.clone()));
        }
    }

    async fn kill(&self, signal: Signal) {
        let name = format!("SIG{}", signal.name().trim_start_matches("SIG"));
        let _ = self
            .client
            .kill_container(&self.id, Some(KillContainerOptions { signal: name }))
            .await;
    }

    /// Runs `cmd` in the container through the engine's exec API; returns its exit code
    /// and its output (stdout and stderr interleaved).
    pub async fn exec(&self, cmd: Vec<String>, env: Vec<String>) -> Result<(i64, Vec<u8>), String> {
        use bollard::exec::{CreateExecOptions, StartExecResults};
        let exec = self
            .client
            .create_exec(
                &self.id,
                CreateExecOptions {
                    cmd: Some(cmd),
                    env: Some(env),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("cannot exec in container {}: {e}", self.id))?;
        let mut out = Vec::new();
        if let StartExecResults::Attached { mut output, .. } = self
            .client
            .start_exec(&exec.id, None)
            .await
            .map_err(|e| format!("cannot start exec in container {}: {e}", self.id))?
        {
            while let Some(Ok(msg)) = output.next().await {
                out.extend_from_slice(&msg.into_bytes());
            }
        }
        let info = self
            .client
            .inspect_exec(&exec.id)
            .await
            .map_err(|e| format!("cannot inspect exec in container {}: {e}", self.id))?;
        Ok((info.exit_code.unwrap_or(-1), out))
    }
}

/// The engine's exit code as an exit status: `128 + n` for a real signal `n` is that
/// signal (what the engine reports for a signal death), anything else is an exit code.
pub fn exit_status(code: i64) -> ExitStatus {
    match code {
        129..=192 => ExitStatus::Signaled {
            signal: (code - 128) as i32,
            core_dumped: false,
        },
        0..=255 => ExitStatus::Exited { code: code as i32 },
        // Unknown (the engine lost it): reported as killed.
        _ => ExitStatus::Signaled {
            signal: 9,
            core_dumped: false,
        },
    }
}

impl EventSink for Container {
    fn event(&self, ev: ContainerEvent) {
        match ev {
            ContainerEvent::Oom => {
                self.oom.store(true, Ordering::SeqCst);
                // The engine leaves a container running when the OOM killer took one of
                // its processes other than the main one. bulkhead ends the instance on
                // any OOM kill in it, as the sandbox does (and systemd's default
                // `OOMPolicy=stop`): its `die` then reports `oom_killed`. A kill of a
                // container that is already dying is refused by the engine, harmlessly.
                if !self.died.load(Ordering::SeqCst) {
                    let client = self.client.clone();
                    let id = self.id.clone();
                    tokio::spawn(async move {
                        let opts = KillContainerOptions {
                            signal: "KILL".to_owned(),
                        };
                        if let Err(e) = client.kill_container(&id, Some(opts)).await {
                            tracing::debug!("kill of OOM-hit container {id}: {e}");
                        }
                    });
                }
            }
            ContainerEvent::Die { exit_code } => {
                if self.died.swap(true, Ordering::SeqCst) {
                    return;
                }
                let st = exit_status(exit_code);
                let client = self.client.clone();
                let id = self.id.clone();
                let status = self.status.clone();
                let engine = self.engine.clone();
                let oom = self.oom.clone();
                let limited = self.memory_limit.is_some();
                let remove = async move {
                    // The engine's `oom` event and its `die` event come through one stream
                    // but the `oom` one can arrive after the `die` (or not at all after a
                    // reconnect). A SIGKILLed container under a memory limit is therefore
                    // asked directly, before it is removed and its exit is reported, so
                    // `exit_cause` sees the OOM kill whatever the order.
                    // Under load the engine learns of the OOM kill late (its `oom` event and
                    // `State.OOMKilled` both come from containerd's event): asked again for
                    // up to OOM_LATE before the exit is reported without it. Only a
                    // SIGKILLed container under a memory limit ever waits.
                    let deadline = tokio::time::Instant::now() + OOM_LATE;
                    while limited && exit_code == 137 && !oom.load(Ordering::SeqCst) {
                        if let Ok(Ok(info)) = tokio::time::timeout(
                            REMOVE_TIMEOUT,
                            client.inspect_container(&id, None::<InspectContainerOptions>),
                        )
                        .await
                        {
                            if info.state.and_then(|s| s.oom_killed) == Some(true) {
                                oom.store(true, Ordering::SeqCst);
                            }
                        }
                        if tokio::time::Instant::now() >= deadline {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    let opts = RemoveContainerOptions {
                        force: true,
                        v: true,
                        link: false,
                    };
                    match tokio::time::timeout(
                        REMOVE_TIMEOUT,
                        client.remove_container(&id, Some(opts)),
                    )
                    .await
                    {
                        Ok(Ok(())) => {}
                        Ok(Err(bollard::errors::Error::DockerResponseServerError {
                            status_code: 404,
                            ..
                        })) => {}
                        Ok(Err(e)) => tracing::warn!("cannot remove container {id}: {e}"),
                        Err(_) => tracing::warn!("removing container {id} timed out"),
                    }
                    engine.unwatch(&id);
                    status.send_replace(Some(st));
                };
                match tokio::runtime::Handle::try_current() {
                    Ok(h) => {
                        h.spawn(remove);
                    }
                    Err(_) => {
                        self.status.send_replace(Some(st));
                    }
                }
            }
        }
    }
}

#[async_trait]
impl InstanceHandle for Container {
    fn pid(&self) -> Option<u32> {
        self.main
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|m| m.pid)
    }

    fn signal(&self, signal: Signal) -> Result<(), SignalError> {
        if self.try_status().is_some() {
            return Ok(());
        }
        let main = self.main.lock().unwrap_or_else(|e| e.into_inner());
        match main.as_ref() {
            Some(m) => match sys::pidfd_send_signal(&m.pidfd, signal) {
                Ok(()) => Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
                Err(source) => Err(SignalError {
                    instance: self.instance.clone(),
                    signal,
                    source,
                }),
            },
            None => {
                // No pid known (not running yet, or ended): ask the engine.
                let client = self.client.clone();
                let id = self.id.clone();
                let name = format!("SIG{}", signal.name().trim_start_matches("SIG"));
                if let Ok(h) = tokio::runtime::Handle::try_current() {
                    h.spawn(async move {
                        let _ = client
                            .kill_container(&id, Some(KillContainerOptions { signal: name }))
                            .await;
                    });
                }
                Ok(())
            }
        }
    }

    async fn wait(&self) -> ExitStatus {
        let mut rx = self.status.subscribe();
        let st = match rx.wait_for(Option::is_some).await {
            Ok(st) => *st,
            // The sender lives in self: unreachable while we borrow self.
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

    /// The engine's kill with `signal`, then at the deadline (as moved meanwhile) its
    /// SIGKILL; resolves once the container is gone (removed).
    async fn stop_until(&self, signal: Signal, mut kill_at: KillDeadline) -> ExitStatus {
        if let Some(st) = self.try_status() {
            return st;
        }
        self.kill(signal).await;
        tokio::select! {
            st = self.wait() => st,
            _ = kill_at.passed() => {
                self.kill(Signal::KILL).await;
                self.wait().await
            }
        }
    }

    fn stats(&self) -> Result<Stats, StatsError> {
        if self.try_status().is_some() {
            return Ok(Stats::default());
        }
        let main = self.main.lock().unwrap_or_else(|e| e.into_inner());
        let Some(cg) = main.as_ref().and_then(|m| m.cgroup.as_ref()) else {
            return Ok(Stats::default());
        };
        Ok(cg.read(self.memory_limit, self.pids_limit))
    }

    /// A process is the container's when its cgroup names the container (the init's
    /// children sit in process groups of their own, so the group check does not apply).
    fn owns_pid(&self, pid: u32) -> Option<bool> {
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        Some(cg.lines().any(|l| {
            l.ends_with(&self.id)
                || l.contains(&format!("{}/", self.id))
                || l.contains(&format!("docker-{}.scope", self.id))
        }))
    }

    /// `docker exec` (the CLI, through the engine's exec API): its exit code is the
    /// command's, and `-t` gives the command the terminal the daemon made.
    /// Through the engine's exec API: the command runs in the container (its file system,
    /// its user, its environment plus `req.env`), attached; its status is the exec's exit
    /// code. Killed through its host pid when the client goes away (the exec API has no
    /// kill).
    async fn engine_exec(&self, req: ExecRequest) -> Option<std::io::Result<EngineExec>> {
        Some(self.exec_in(req).await)
    }
    fn exit_cause(&self) -> Option<ExitCause> {
        self.oom
            .load(Ordering::SeqCst)
            .then_some(ExitCause::OomKilled {
                limit_bytes: self.memory_limit,
            })
    }
}

impl Container {
    async fn exec_in(&self, mut req: ExecRequest) -> std::io::Result<EngineExec> {
        if !self.exec_env.is_empty() {
            let mut env: Vec<(String, String)> = self
                .exec_env
                .iter()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            env.append(&mut req.env);
            req.env = env;
        }
        exec_in(&self.client, &self.id, req, ExecKill::HostPid).await
    }
}

/// How an exec started by [`exec_in`] is ended when its client goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecKill {
    /// SIGKILL to its process through a pidfd: the engine runs on this host.
    HostPid,
    /// Not at all: the engine is on another host (a swarm node), where a pid means
    /// nothing here; the command runs to its end.
    None,
}

/// Runs `req` in container `id` through the engine's exec API (attached; its status is
/// the exec's exit code). The docker driver's `engine_exec`, and the swarm driver's on
/// the task's node.
pub async fn exec_in(
    client: &Docker,
    id: &str,
    req: ExecRequest,
    how: ExecKill,
) -> std::io::Result<EngineExec> {
    {
        use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
        let err = |what: &str, e: bollard::errors::Error| {
            std::io::Error::other(format!("{what} in container {}: {e}", short_id(id)))
        };
        let config = bollard::models::ExecConfig {
            console_size: req.tty.map(|(r, c)| vec![usize::from(r), usize::from(c)]),
            ..CreateExecOptions {
                attach_stdin: Some(true),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                tty: Some(req.tty.is_some()),
                env: Some(req.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
                cmd: Some(req.argv.clone()),
                ..Default::default()
            }
            .into()
        };
        let exec = client
            .create_exec(id, config)
            .await
            .map_err(|e| err("cannot create the exec", e))?
            .id;
        let start = StartExecOptions {
            detach: false,
            tty: req.tty.is_some(),
            output_capacity: None,
        };
        let StartExecResults::Attached { mut output, input } = client
            .start_exec(&exec, Some(start))
            .await
            .map_err(|e| err("cannot start the exec", e))?
        else {
            return Err(std::io::Error::other(
                "the engine started the exec detached",
            ));
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            use bollard::container::LogOutput;
            while let Some(Ok(chunk)) = output.next().await {
                let (stream, bytes) = match chunk {
                    LogOutput::StdErr { message } => (Stream::Stderr, message),
                    LogOutput::StdOut { message } | LogOutput::Console { message } => {
                        (Stream::Stdout, message)
                    }
                    LogOutput::StdIn { .. } => continue,
                };
                if tx.send((stream, bytes.to_vec())).await.is_err() {
                    break;
                }
            }
        });
        let (c, id) = (client.clone(), exec.clone());
        let status = Box::pin(async move {
            let info = c
                .inspect_exec(&id)
                .await
                .map_err(|e| std::io::Error::other(format!("cannot inspect exec {id}: {e}")))?;
            let code = info.exit_code.unwrap_or(-1);
            Ok(ExitStatus::Exited {
                code: i32::try_from(code).unwrap_or(-1),
            })
        });
        let resize = req.tty.map(|_| {
            let (client, id) = (client.clone(), exec.clone());
            Box::new(move |height: u16, width: u16| {
                let (client, id) = (client.clone(), id.clone());
                tokio::spawn(async move {
                    let size = bollard::exec::ResizeExecOptions { height, width };
                    if let Err(e) = client.resize_exec(&id, size).await {
                        tracing::debug!("cannot resize exec {id}: {e}");
                    }
                });
            }) as Box<dyn Fn(u16, u16) + Send + Sync>
        });
        let (client, id) = (client.clone(), exec);
        let kill = Box::new(move || {
            if how == ExecKill::None {
                return;
            }
            tokio::spawn(async move {
                // The exec's process as the host sees it: the engine gives no other way.
                let info = client.inspect_exec(&id).await.ok();
                let pid = info.filter(|i| i.running == Some(true)).and_then(|i| i.pid);
                let pid = pid.and_then(|p| u32::try_from(p).ok()).filter(|&p| p > 0);
                // Race: if the exec ended and was reaped between the inspect and the
                // open, the pid may name another process by now. The engine has no kill
                // for execs; the window is two system calls after an inspect that found
                // it running, the same one `docker exec`'s own clean-up has.
                if let Some(fd) = pid.and_then(|p| sys::pidfd_open(p).ok()) {
                    let _ = sys::pidfd_send_signal(&fd, Signal::KILL);
                }
            });
        }) as Box<dyn FnOnce() + Send>;
        Ok(EngineExec {
            stdin: input,
            output: rx,
            status,
            resize,
            kill,
        })
    }
}

/// The cgroup directories of a container (v1 controllers, or one v2 directory).
#[derive(Debug, Clone)]
pub(crate) struct Cgroup {
    memory: Option<PathBuf>,
    pids: Option<PathBuf>,
    cpuacct: Option<PathBuf>,
    cpu: Option<PathBuf>,
    unified: Option<PathBuf>,
}

impl Cgroup {
    pub(crate) fn of(pid: u32) -> Option<Cgroup> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let mut cg = Cgroup {
            memory: None,
            pids: None,
            cpuacct: None,
            cpu: None,
            unified: None,
        };
        let root = Path::new("/sys/fs/cgroup");
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
            let rel = path.trim_start_matches('/');
            if ctrls.is_empty() {
                let dir = root.join(rel);
                if dir.join("memory.current").exists() {
                    cg.unified = Some(dir);
                }
                continue;
            }
            for c in ctrls.split(',') {
                let dir = root.join(ctrls).join(rel);
                match c {
                    "memory" => cg.memory = Some(dir),
                    "pids" => cg.pids = Some(dir),
                    "cpuacct" => cg.cpuacct = Some(dir),
                    "cpu" => cg.cpu = Some(dir),
                    _ => {}
                }
            }
        }
        Some(cg)
    }

    /// How many processes the kernel's OOM killer took in this cgroup: `oom_kill` of v1's
    /// `memory.oom_control` or of v2's `memory.events`. None once the cgroup is gone.
    pub(crate) fn oom_kills(&self) -> Option<u64> {
        let (dir, file) = match (&self.memory, &self.unified) {
            (Some(m), _) => (m, "memory.oom_control"),
            (None, Some(u)) => (u, "memory.events"),
            (None, None) => return None,
        };
        keyed(&std::fs::read_to_string(dir.join(file)).ok()?, "oom_kill")
    }

    pub(crate) fn read(&self, memory_limit: Option<u64>, pids_limit: Option<u32>) -> Stats {
        let num = |dir: &Option<PathBuf>, file: &str| -> Option<u64> {
            std::fs::read_to_string(dir.as_ref()?.join(file))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        let keyed = |dir: &Option<PathBuf>, file: &str, key: &str| -> Option<u64> {
            keyed(
                &std::fs::read_to_string(dir.as_ref()?.join(file)).ok()?,
                key,
            )
        };
        let mut s = Stats {
            memory_limit_bytes: memory_limit,
            pids_limit,
            ..Stats::default()
        };
        if self.unified.is_some() && self.memory.is_none() {
            let u = &self.unified;
            s.memory_bytes = num(u, "memory.current").unwrap_or(0);
            s.memory_peak_bytes = num(u, "memory.peak");
            s.pids = num(u, "pids.current").unwrap_or(0) as u32;
            s.cpu_seconds = keyed(u, "cpu.stat", "usage_usec").unwrap_or(0) as f64 / 1e6;
            s.cpu_throttled_seconds =
                keyed(u, "cpu.stat", "throttled_usec").map(|v| v as f64 / 1e6);
            s.pids_limit_hits = keyed(u, "pids.events", "max");
            return s;
        }
        s.memory_bytes = num(&self.memory, "memory.usage_in_bytes").unwrap_or(0);
        s.memory_peak_bytes = num(&self.memory, "memory.max_usage_in_bytes");
        s.pids = num(&self.pids, "pids.current").unwrap_or(0) as u32;
        s.cpu_seconds = num(&self.cpuacct, "cpuacct.usage").unwrap_or(0) as f64 / 1e9;
        s.cpu_throttled_seconds =
            keyed(&self.cpu, "cpu.stat", "throttled_time").map(|v| v as f64 / 1e9);
        s.pids_limit_hits = keyed(&self.pids, "pids.events", "max");
        s
    }
}

/// Sees an OOM kill of a memory-limited container's init without the engine. The engine
/// learns of OOM kills from containerd, whose cgroup v1 watcher drops the event when the
/// cgroup is already gone by the time it looks (under load the container's exit wins that
/// race, and `State.OOMKilled` stays false). The kernel's own count is read here the
/// moment the init exits.
/// ORDER: the pidfd is readable as soon as the init has exited, before containerd's shim
/// has reaped it and had runc remove the cgroup, so the counter is normally still there;
/// when it is not, the engine's `oom` event and `State.OOMKilled` remain the sources.
async fn watch_oom(pidfd: OwnedFd, cgroup: Cgroup, oom: Arc<AtomicBool>) {
    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;
    // SAFETY: the AsyncFd owns the OwnedFd: the descriptor stays open and the same until
    // the AsyncFd drops.
    let Ok(afd) = (unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }) else {
        return;
    };
    if afd.readable().await.is_ok() {
        match cgroup.oom_kills() {
            Some(n) if n > 0 => {
                tracing::debug!("the OOM killer took {n} process(es) in {cgroup:?}");
                oom.store(true, Ordering::SeqCst);
            }
            Some(_) => {}
            None => tracing::debug!("{cgroup:?} was gone when its init exited"),
        }
    }
}

/// The first 12 characters of a container id, as `docker ps` shows it.
pub(crate) fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_run_the_container_as_the_daemons_user_unless_one_is_set() {
        let env = vec![(ENV_IOX2_ROOT.to_owned(), "/tmp/iceoryx2".to_owned())];
        let me = format!(
            "{}:{}",
            rustix::process::getuid().as_raw(),
            rustix::process::getgid().as_raw()
        );
        assert_eq!(container_user(&env, None), Some(me));
        assert_eq!(container_user(&env, Some("app")), Some("app".to_owned()));
        assert_eq!(container_user(&[], None), None);
    }

    #[test]
    fn the_process_basics_become_the_containers_settings() {
        let m = "name: w\ndriver: docker\ncommand: [sh]\ndocker: {image: x}\nworking_dir: /srv\n\
                 user: app\ngroup: \"100\"\ngroups: [audio, 7]\nlimits: {nofile: 99, core: {soft: 1Ki, hard: unlimited}}\n";
        let ws = bulkhead_core::spec::parse_manifest("w/manifest.yaml", "w", m).unwrap();
        let spec = SpawnSpec {
            instance: bulkhead_core::key::Key::new("w", ws.isolation, Some("a"), None)
                .unwrap()
                .instance_id(),
            argv: vec!["sh".into()],
            env: Vec::new(),
            cwd: PathBuf::from("/nonexistent/w"),
            spec: Arc::new(ws.clone()),
            binds: Vec::new(),
            ids: None,
            inherited: Vec::new(),
            listen: Vec::new(),
        };
        let c = container_config(&spec, ws.docker.as_ref().unwrap(), "x", "d", None).unwrap();
        assert_eq!(c.working_dir.as_deref(), Some("/srv"));
        assert_eq!(c.user.as_deref(), Some("app:100"));
        let host = c.host_config.unwrap();
        assert_eq!(host.group_add, Some(vec!["audio".into(), "7".into()]));
        let ul: Vec<(String, i64, i64)> = host
            .ulimits
            .unwrap()
            .into_iter()
            .map(|u| (u.name.unwrap(), u.soft.unwrap(), u.hard.unwrap()))
            .collect();
        assert_eq!(ul, [("core".into(), 1024, -1), ("nofile".into(), 99, 99)]);
    }

    #[test]
    fn exit_codes_map_to_statuses() {
        assert_eq!(exit_status(0), ExitStatus::Exited { code: 0 });
        assert_eq!(exit_status(255), ExitStatus::Exited { code: 255 });
        assert_eq!(exit_status(128), ExitStatus::Exited { code: 128 });
        assert_eq!(
            exit_status(137),
            ExitStatus::Signaled {
                signal: 9,
                core_dumped: false
            }
        );
        assert_eq!(
            exit_status(143),
            ExitStatus::Signaled {
                signal: 15,
                core_dumped: false
            }
        );
    }
}
