//! One connection to the Docker Engine, and one event subscription shared by every
//! container of this daemon.
//!
//! The connection is made lazily and its API version negotiated once. [`Engine::ensure`]
//! pings with a short timeout before any launch, so that an engine that is down or
//! unreachable is a clear error and never a hang.
//!
//! The event stream is filtered by this daemon's label (`bulkhead.daemon=<id>`) and by the
//! actions the driver reacts to (`die`, `oom`). It is (re)subscribed with `since` set a
//! little before the moment it (re)connects, so that an event that happened while it was
//! not listening (or before the very first subscription reached the engine) is replayed;
//! a duplicate `die` is harmless (the first one wins).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::query_parameters::{EventsOptions, InspectContainerOptions};
use bollard::Docker;
use futures_util::StreamExt;
use tokio::sync::OnceCell;

/// Label keys put on every container and image bulkhead makes.
pub const LABEL_DAEMON: &str = "bulkhead.daemon";
pub const LABEL_INSTANCE: &str = "bulkhead.instance";
pub const LABEL_WORKLOAD: &str = "bulkhead.workload";
pub const LABEL_CONFIG: &str = "bulkhead.config";
/// On a warm slot's container: the slot's name (`crate::warm`).
pub const LABEL_WARM: &str = "bulkhead.warm";

/// How long the reachability check waits for the engine's answer.
pub const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The engine cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error(
        "the docker engine is not reachable at {host}: {reason}; start dockerd (or set \
         DOCKER_HOST to where it listens)"
    )]
    Unreachable { host: String, reason: String },
    #[error(
        "permission denied on the docker engine at {host}: {reason}; run bulkhead as root or \
         as a member of the docker group (check the permissions of /var/run/docker.sock)"
    )]
    Permission { host: String, reason: String },
    #[error("the docker engine at {host} did not answer within {timeout:?}; is dockerd stuck?")]
    Timeout { host: String, timeout: Duration },
}

/// What a container's watcher learns from the event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerEvent {
    /// The container's init ended with this exit code.
    Die { exit_code: i64 },
    /// The kernel OOM killer acted in the container.
    Oom,
}

/// Receives the events of one container.
pub trait EventSink: Send + Sync + 'static {
    fn event(&self, ev: ContainerEvent);
}

/// The engine connection and the event dispatcher.
pub struct Engine {
    daemon_id: String,
    /// `None`: bollard's defaults (`DOCKER_HOST`, else the local socket).
    host: Option<String>,
    client: OnceCell<Docker>,
    sinks: Mutex<HashMap<String, Weak<dyn EventSink>>>,
    dispatcher: OnceLock<()>,
}

fn host_name() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".to_owned())
}

impl Engine {
    /// An engine for the daemon with this id (the value of its `bulkhead.daemon` label).
    /// Nothing is connected until first use.
    pub fn new(daemon_id: impl Into<String>) -> Arc<Engine> {
        Arc::new(Engine {
            daemon_id: daemon_id.into(),
            host: None,
            client: OnceCell::new(),
            sinks: Mutex::new(HashMap::new()),
            dispatcher: OnceLock::new(),
        })
    }

    /// An engine at an explicit address (`unix:///path`, `tcp://host:port`).
    pub fn with_host(daemon_id: impl Into<String>, host: impl Into<String>) -> Arc<Engine> {
        Arc::new(Engine {
            daemon_id: daemon_id.into(),
            host: Some(host.into()),
            client: OnceCell::new(),
            sinks: Mutex::new(HashMap::new()),
            dispatcher: OnceLock::new(),
        })
    }

    pub fn daemon_id(&self) -> &str {
        &self.daemon_id
    }

    /// The client, connected and version-negotiated; pings first (bounded by
    /// [`PING_TIMEOUT`]) and starts the event dispatcher.
    pub async fn ensure(self: &Arc<Self>) -> Result<&Docker, EngineError> {
        let host = self.host.clone().unwrap_or_else(host_name);
        let client = self
            .client
            .get_or_try_init(|| async {
                let docker = match &self.host {
                    Some(h) => Docker::connect_with_host(h),
                    None => Docker::connect_with_defaults(),
                }
                .map_err(|e| classify(&host, &e))?;
                match tokio::time::timeout(PING_TIMEOUT, docker.negotiate_version()).await {
                    Ok(Ok(d)) => Ok(d),
                    Ok(Err(e)) => Err(classify(&host, &e)),
                    Err(_) => Err(EngineError::Timeout {
                        host: host.clone(),
                        timeout: PING_TIMEOUT,
                    }),
                }
            })
            .await?;
        match tokio::time::timeout(PING_TIMEOUT, client.ping()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(classify(&host, &e)),
            Err(_) => {
                return Err(EngineError::Timeout {
                    host,
                    timeout: PING_TIMEOUT,
                })
            }
        }
        if self.dispatcher.set(()).is_ok() {
            tokio::spawn(dispatch(Arc::downgrade(self), client.clone()));
        }
        Ok(client)
    }

    /// The client if [`ensure`](Self::ensure) has succeeded once.
    pub fn client(&self) -> Option<&Docker> {
        self.client.get()
    }

    /// Routes the events of container `id` to `sink` until the sink is dropped.
    pub fn watch(&self, id: &str, sink: Weak<dyn EventSink>) {
        self.sinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), sink);
    }

    /// Stops routing events of container `id`.
    pub fn unwatch(&self, id: &str) {
        self.sinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    fn sink(&self, id: &str) -> Option<Arc<dyn EventSink>> {
        let mut sinks = self.sinks.lock().unwrap_or_else(|e| e.into_inner());
        match sinks.get(id).map(Weak::upgrade) {
            Some(Some(s)) => Some(s),
            Some(None) => {
                sinks.remove(id);
                None
            }
            None => None,
        }
    }

    fn watched(&self) -> Vec<(String, Arc<dyn EventSink>)> {
        let sinks = self.sinks.lock().unwrap_or_else(|e| e.into_inner());
        sinks
            .iter()
            .filter_map(|(id, w)| Some((id.clone(), w.upgrade()?)))
            .collect()
    }
}

/// Maps a connection error to what the user should do about it.
pub(crate) fn classify(host: &str, e: &bollard::errors::Error) -> EngineError {
    let reason = e.to_string();
    let lower = reason.to_lowercase();
    if lower.contains("permission denied") || lower.contains("eacces") {
        EngineError::Permission {
            host: host.to_owned(),
            reason,
        }
    } else {
        EngineError::Unreachable {
            host: host.to_owned(),
            reason,
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The dispatcher: one filtered event subscription, re-made when it breaks. After each
/// (re)subscription it also inspects every watched container, so that a death missed while
/// disconnected is still reported.
async fn dispatch(engine: Weak<Engine>, client: Docker) {
    // Replay from a little before now: the first containers may start before the
    // subscription reaches the engine.
    let mut since = unix_now() - 2;
    loop {
        let Some(e) = engine.upgrade() else { return };
        let filters = HashMap::from([
            ("type".to_owned(), vec!["container".to_owned()]),
            ("event".to_owned(), vec!["die".to_owned(), "oom".to_owned()]),
            (
                "label".to_owned(),
                vec![format!("{LABEL_DAEMON}={}", e.daemon_id)],
            ),
        ]);
        drop(e);
        let mut stream = client.events(Some(EventsOptions {
            since: Some(since.to_string()),
            until: None,
            filters: Some(filters),
        }));
        let mut swept = false;
        loop {
            // The sweep runs once the subscription is in flight (the first poll sent it).
            let next = if swept {
                stream.next().await
            } else {
                match tokio::time::timeout(Duration::from_millis(200), stream.next()).await {
                    Ok(n) => n,
                    Err(_) => {
                        swept = true;
                        if let Some(e) = engine.upgrade() {
                            sweep(&e, &client).await;
                        }
                        continue;
                    }
                }
            };
            let Some(item) = next else { break };
            let Some(e) = engine.upgrade() else { return };
            match item {
                Ok(msg) => {
                    if let Some(t) = msg.time {
                        since = since.max(t - 1);
                    }
                    let Some(actor) = msg.actor else { continue };
                    let Some(id) = actor.id else { continue };
                    let ev = match msg.action.as_deref() {
                        Some("oom") => ContainerEvent::Oom,
                        Some("die") => {
                            let code = actor
                                .attributes
                                .as_ref()
                                .and_then(|a| a.get("exitCode"))
                                .and_then(|c| c.parse().ok())
                                .unwrap_or(-1);
                            ContainerEvent::Die { exit_code: code }
                        }
                        _ => continue,
                    };
                    if let Some(sink) = e.sink(&id) {
                        sink.event(ev);
                    }
                }
                Err(err) => {
                    tracing::warn!("docker event stream: {err}");
                    break;
                }
            }
        }
        if engine.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(e) = engine.upgrade() {
            sweep(&e, &client).await;
        }
    }
}

/// Reports every watched container that is no longer running.
async fn sweep(engine: &Engine, client: &Docker) {
    for (id, sink) in engine.watched() {
        match client
            .inspect_container(&id, None::<InspectContainerOptions>)
            .await
        {
            Ok(info) => {
                let st = info.state.unwrap_or_default();
                if st.running == Some(true) || st.status.is_none() {
                    continue;
                }
                use bollard::models::ContainerStateStatusEnum as S;
                if matches!(st.status, Some(S::CREATED)) {
                    continue;
                }
                if st.oom_killed == Some(true) {
                    sink.event(ContainerEvent::Oom);
                }
                sink.event(ContainerEvent::Die {
                    exit_code: st.exit_code.unwrap_or(-1),
                });
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => sink.event(ContainerEvent::Die { exit_code: -1 }),
            Err(_) => {}
        }
    }
}
