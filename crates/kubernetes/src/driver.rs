//! [`KubernetesDriver`]: spawn (create the Pod, wait for its container to start),
//! recovery by label, and the connection made lazily from in-cluster config or a
//! kubeconfig.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bulkhead_core::key::InstanceId;
use bulkhead_core::signal::Signal;
use bulkhead_core::spec::DriverKind;
use bulkhead_driver::{Driver, Found, RecoverError, SpawnError, SpawnSpec, Spawned};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use tokio::sync::OnceCell;

use crate::handle::{PodHandle, StartFailure, KILL_GRACE_SECONDS};
use crate::pod::{self, ANNOTATION_INSTANCE, CONTAINER};
use crate::watch::Watcher;

/// How long a spawn that failed waits for its Pod to be gone (so that its name is free).
const GONE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long recovery waits for the cluster: it runs before the daemon serves, so an
/// unreachable API server must not hold the daemon's start-up.
pub const RECOVER_TIMEOUT: Duration = Duration::from_secs(15);

/// Where the driver finds its cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterConfig {
    /// A kubeconfig file; `None`: kube's inference (in-cluster service account, then
    /// `KUBECONFIG`, then `~/.kube/config`).
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current one).
    pub context: Option<String>,
    /// The namespace of Pods whose manifest names none (default: the config's).
    pub namespace: Option<String>,
}

/// The cluster cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "kubernetes driver: no cluster configured ({0}); run the daemon in a Pod (in-cluster \
         config) or give it a kubeconfig (KUBECONFIG, ~/.kube/config or --kubeconfig)"
    )]
    NoConfig(String),
    #[error("kubernetes driver: cannot make a client from {what}: {reason}")]
    Client { what: String, reason: String },
}

enum Source {
    Config(ClusterConfig),
    Fixed(Client),
}

/// The `kubernetes` driver.
pub struct KubernetesDriver {
    daemon_id: String,
    source: Source,
    namespace_override: Option<String>,
    client: OnceCell<Client>,
    watchers: Mutex<HashMap<String, Arc<Watcher>>>,
    metrics: Arc<crate::metrics::Availability>,
}

impl KubernetesDriver {
    /// A driver that connects on first use (a launch or recovery), so that a daemon with
    /// no cluster starts fine and only kubernetes launches fail, with the reason.
    pub fn new(daemon_id: impl Into<String>, cfg: ClusterConfig) -> KubernetesDriver {
        KubernetesDriver {
            daemon_id: daemon_id.into(),
            namespace_override: cfg.namespace.clone(),
            source: Source::Config(cfg),
            client: OnceCell::new(),
            watchers: Mutex::new(HashMap::new()),
            metrics: Arc::default(),
        }
    }

    /// A driver on a ready client (tests: kube's `Client::new` over a mock service).
    pub fn with_client(daemon_id: impl Into<String>, client: Client) -> KubernetesDriver {
        KubernetesDriver {
            daemon_id: daemon_id.into(),
            namespace_override: None,
            source: Source::Fixed(client),
            client: OnceCell::new(),
            watchers: Mutex::new(HashMap::new()),
            metrics: Arc::default(),
        }
    }

    /// The client, made once (a failure is retried at the next use).
    pub async fn client(&self) -> Result<Client, ClusterError> {
        let c = self
            .client
            .get_or_try_init(|| async {
                match &self.source {
                    Source::Fixed(c) => Ok(c.clone()),
                    Source::Config(cfg) => connect(cfg).await,
                }
            })
            .await?;
        Ok(c.clone())
    }

    /// The namespace of Pods whose manifest names none.
    pub async fn default_namespace(&self) -> Result<String, ClusterError> {
        let c = self.client().await?;
        Ok(self
            .namespace_override
            .clone()
            .unwrap_or_else(|| c.default_namespace().to_owned()))
    }

    fn watcher(&self, client: &Client, namespace: &str) -> Arc<Watcher> {
        let mut w = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        w.entry(namespace.to_owned())
            .or_insert_with(|| {
                Watcher::start(client.clone(), namespace, &pod::selector(&self.daemon_id))
            })
            .clone()
    }

    /// [`Driver::spawn`], with the Pod's own handle (for what only Pods do:
    /// [`PodHandle::exec`]).
    pub async fn spawn_pod(&self, spec: SpawnSpec) -> Result<Arc<PodHandle>, SpawnError> {
        let other = |reason: String| SpawnError::Engine { reason };
        let Some(k) = spec.spec.kubernetes.clone() else {
            return Err(other(
                "a kubernetes workload needs a kubernetes: section (kubernetes.image)".into(),
            ));
        };
        let client = self.client().await.map_err(|e| other(e.to_string()))?;
        let default_ns = self
            .namespace_override
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let bulkhead_ns = spec
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "BULKHEAD_NAMESPACE")
            .map(|(_, v)| v.as_str());
        let ns = bulkhead_core::kubernetes::resolve_namespace(
            k.namespace.as_deref(),
            bulkhead_ns,
            &default_ns,
        )
        .map_err(other)?;
        let body = pod::pod_for(&spec, &k, &self.daemon_id, &ns).map_err(other)?;
        let name = body.name_any();
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let watcher = self.watcher(&client, &ns);
        let w = &spec.spec;
        let grace =
            w.shutdown.grace.as_secs() as i64 + i64::from(w.shutdown.grace.subsec_nanos() > 0);
        let env = body.spec.as_ref().and_then(|s| s.containers[0].env.clone());
        let h = PodHandle::new(
            name.clone(),
            ns.clone(),
            spec.instance.as_str().to_owned(),
            api.clone(),
            self.metrics.clone(),
            watcher.clone(),
            grace,
            w.resources.as_ref().and_then(|r| r.memory),
            w.readiness.is_some(),
            env.iter()
                .flatten()
                .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
                .collect(),
            false,
        );
        // Registered before the create: the watch may report the Pod before the answer.
        watcher.register(&name, Arc::downgrade(&h));
        // Armed before the create: a spawn abandoned while its create is in flight must
        // not leave a Pod running unseen (the delete of a Pod never made is a 404).
        let mut guard = DeleteOnDrop(Some(h.clone()));
        let created = match api.create(&PostParams::default(), &body).await {
            Ok(p) => p,
            Err(e) => {
                // Not ours: a 409 names the key's previous Pod, which is not to be touched.
                guard.0 = None;
                watcher.unregister(&name);
                return Err(other(match e {
                    kube::Error::Api(s) if s.code == 409 => format!(
                        "pod {ns}/{name} of instance {} already exists: its previous run is \
                         still being deleted, and a key never runs twice",
                        spec.instance
                    ),
                    e => format!("cannot create pod {ns}/{name}: {e}"),
                }));
            }
        };
        h.observe(&created);
        let mut start = h.start.subscribe();
        let outcome = tokio::time::timeout(k.start_timeout, async {
            start.wait_for(Option::is_some).await.map(|r| r.clone())
        })
        .await;
        let program = k
            .entrypoint
            .as_ref()
            .and_then(|e| e.first())
            .unwrap_or(&spec.argv[0])
            .clone();
        let failure = match outcome {
            Ok(Ok(Some(Ok(())))) => None,
            Ok(Ok(Some(Err(StartFailure::Stuck(reason))))) => {
                Some(other(format!("pod {ns}/{name} cannot start: {reason}")))
            }
            Ok(Ok(Some(Err(StartFailure::Exec(reason))))) => Some(SpawnError::Exec {
                program,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("in pod {ns}/{name}: {reason}"),
                ),
            }),
            Ok(_) => Some(other(format!("pod {ns}/{name} cannot start"))),
            Err(_) => Some(other(format!(
                "pod {ns}/{name} did not start within {:?} (kubernetes.start_timeout: \
                 scheduling and image pull)",
                k.start_timeout
            ))),
        };
        guard.0 = None;
        if let Some(reason) = failure {
            use bulkhead_driver::InstanceHandle;
            h.delete(KILL_GRACE_SECONDS).await;
            if tokio::time::timeout(GONE_TIMEOUT, h.wait()).await.is_err() {
                tracing::warn!("pod {ns}/{name} is not gone {GONE_TIMEOUT:?} after its delete");
            }
            return Err(reason);
        }
        Ok(h)
    }

    /// A handle on an existing Pod of this daemon (recovery), watched from now on.
    fn adopt(&self, client: &Client, p: &Pod) -> Option<(InstanceId, Arc<PodHandle>)> {
        let ns = p.namespace()?;
        let name = p.name_any();
        let instance = p.annotations().get(ANNOTATION_INSTANCE)?.clone();
        let id = InstanceId::parse(&instance).ok()?.0;
        let spec = p.spec.as_ref()?;
        let c = spec.containers.iter().find(|c| c.name == CONTAINER)?;
        let env = c
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect();
        let memory_limit = c
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("memory"))
            .and_then(|q| q.0.parse::<u64>().ok());
        let watcher = self.watcher(client, &ns);
        let h = PodHandle::new(
            name.clone(),
            ns.clone(),
            instance,
            Api::namespaced(client.clone(), &ns),
            self.metrics.clone(),
            watcher.clone(),
            spec.termination_grace_period_seconds.unwrap_or(30),
            memory_limit,
            c.readiness_probe.is_some(),
            env,
            true,
        );
        watcher.register(&name, Arc::downgrade(&h));
        h.observe(p);
        Some((id, h))
    }
}

/// A client from the configuration: kube's own loaders, never a hand-made client.
async fn connect(cfg: &ClusterConfig) -> Result<Client, ClusterError> {
    let opts = kube::config::KubeConfigOptions {
        context: cfg.context.clone(),
        ..Default::default()
    };
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc =
                kube::config::Kubeconfig::read_from(path).map_err(|e| ClusterError::Client {
                    what: path.display().to_string(),
                    reason: e.to_string(),
                })?;
            kube::Config::from_custom_kubeconfig(kc, &opts)
                .await
                .map_err(|e| ClusterError::Client {
                    what: path.display().to_string(),
                    reason: e.to_string(),
                })?
        }
        None if cfg.context.is_some() => kube::Config::from_kubeconfig(&opts)
            .await
            .map_err(|e| ClusterError::NoConfig(e.to_string()))?,
        None => kube::Config::infer()
            .await
            .map_err(|e| ClusterError::NoConfig(e.to_string()))?,
    };
    let url = config.cluster_url.to_string();
    Client::try_from(config).map_err(|e| ClusterError::Client {
        what: url,
        reason: e.to_string(),
    })
}

/// Deletes a created Pod if the spawn is abandoned (its future dropped) before it
/// returned: nothing may run unseen.
struct DeleteOnDrop(Option<Arc<PodHandle>>);

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { h.delete(KILL_GRACE_SECONDS).await });
            }
        }
    }
}

#[async_trait]
impl Driver for KubernetesDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Kubernetes
    }

    /// The program is the image's.
    fn runs_host_programs(&self) -> bool {
        false
    }

    async fn spawn(&self, spec: SpawnSpec) -> Result<Spawned, SpawnError> {
        let h = self.spawn_pod(spec).await?;
        Ok(Spawned {
            tap: Some(h.tap.clone()),
            handle: h,
            stdout: None,
            stderr: None,
        })
    }

    /// Every Pod labelled with this daemon's id: first across the cluster, else (no
    /// permission to list cluster-wide) in the default namespace.
    async fn recover(&self) -> Result<Vec<Found>, RecoverError> {
        match tokio::time::timeout(RECOVER_TIMEOUT, self.recover_pods()).await {
            Ok(r) => r,
            Err(_) => Err(RecoverError {
                driver: DriverKind::Kubernetes,
                reason: format!("the cluster did not answer within {RECOVER_TIMEOUT:?}"),
                fatal: false,
            }),
        }
    }

    /// Deletes the Pod (grace 1 s) and waits, bounded, until it is gone.
    async fn discard(&self, found: Found) {
        let h = found.spawned.handle;
        let stop = h.stop(Signal::KILL, Duration::ZERO);
        if tokio::time::timeout(GONE_TIMEOUT, stop).await.is_err() {
            tracing::warn!(
                "{} is not gone {GONE_TIMEOUT:?} after its delete",
                found.describe
            );
        }
    }
}

impl KubernetesDriver {
    /// [`Driver::recover`], unbounded.
    async fn recover_pods(&self) -> Result<Vec<Found>, RecoverError> {
        let fail = |reason: String| RecoverError {
            driver: DriverKind::Kubernetes,
            reason,
            fatal: false,
        };
        let client = self.client().await.map_err(|e| fail(e.to_string()))?;
        let lp = ListParams::default().labels(&pod::selector(&self.daemon_id));
        let pods = match Api::<Pod>::all(client.clone()).list(&lp).await {
            Ok(l) => l.items,
            Err(kube::Error::Api(s)) if s.code == 403 => {
                let ns = self
                    .default_namespace()
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                Api::<Pod>::namespaced(client.clone(), &ns)
                    .list(&lp)
                    .await
                    .map_err(|e| fail(format!("cannot list pods in namespace {ns}: {e}")))?
                    .items
            }
            Err(e) => return Err(fail(format!("cannot list pods: {e}"))),
        };
        let mut found = Vec::new();
        for p in pods {
            let Some((instance, h)) = self.adopt(&client, &p) else {
                // Not ours to adopt (no readable instance id): nothing may run unseen.
                let (ns, name) = (p.namespace().unwrap_or_default(), p.name_any());
                tracing::warn!(
                    "pod {ns}/{name} carries this daemon's label but no instance id: deleted"
                );
                let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
                let _ = api
                    .delete(&name, &kube::api::DeleteParams::default().grace_period(1))
                    .await;
                continue;
            };
            use bulkhead_driver::InstanceHandle;
            found.push(Found {
                instance,
                process: None,
                describe: h.describe(),
                run_id: String::new(),
                launched: None,
                env: h.env(),
                exit: h.try_status().or_else(|| h.ended_status()),
                spawned: Spawned {
                    tap: Some(h.tap.clone()),
                    handle: h,
                    stdout: None,
                    stderr: None,
                },
                listen: Vec::new(),
            });
        }
        Ok(found)
    }
}
