//! The `kubernetes` driver: each instance is one Pod on an existing cluster, through
//! [kube-rs](https://docs.rs/kube) (in-cluster config or a kubeconfig, never a
//! hand-written client).
//!
//! # One Pod per key, not a StatefulSet of one
//!
//! A StatefulSet's Pod template must have `restartPolicy: Always`: its controller, not
//! bulkhead, would restart a crashed instance, and bulkhead's restart policy, backoff and
//! circuit breaker could not stay in charge. So the driver creates bare Pods with
//! `restartPolicy: Never`. What a StatefulSet of one would have given, a key that never
//! runs twice, comes from the Pod's **name**: it is derived from the daemon id and the
//! instance id ([`pod::pod_name`]), so the API server refuses a second Pod for a key
//! (`409 AlreadyExists`) as long as the first exists, terminating included; and a
//! handle's `wait` resolves only once its Pod is gone from the API, so a restart never
//! races its predecessor. The trade-off: a bare Pod is not moved off a node that dies;
//! its Pod stays (`Terminating`/`Unknown`) until the node returns or the Pod is
//! force-deleted, and the key stays fenced until then (availability is given up for
//! at-most-one). A force delete (`kubectl delete --force`) breaks the fence, as it does
//! for a StatefulSet.
//!
//! # What it does
//!
//! - **Spawn** ([`KubernetesDriver`]): the Pod ([`pod::pod_for`]) is labelled
//!   `bulkhead.io/daemon=<daemon id>`, `bulkhead.io/instance=<hash of the id>`,
//!   `bulkhead.io/workload`, annotated with the full instance id, in the manifest's
//!   namespace (`kubernetes.namespace`, where `${BULKHEAD_NAMESPACE}` gives one per
//!   bulkhead namespace), else the daemon's default; limits from `resources`, requests
//!   from `kubernetes.requests`; the readiness probe mapped from the manifest's;
//!   `terminationGracePeriodSeconds` from `shutdown.grace`. The spawn returns once the
//!   container has started; an image that cannot be pulled (or a config error) fails it
//!   at once, and `kubernetes.start_timeout` bounds scheduling and pulling.
//! - **Watch** ([`watch`]): one kube-runtime watcher per namespace on this daemon's
//!   label, shared by all its Pods; it relists after `410 Gone`.
//! - **Exit** ([`status`]): the container's `terminated` state: exit code, signal
//!   (`128 + n` is signal `n`), `OOMKilled` (reported through `exit_cause`), and Pods
//!   `Failed` without a container exit (evicted before the kubelet wrote one) as SIGKILL;
//!   an eviction's message is logged and kept ([`PodHandle::evicted`]).
//! - **Readiness**: the Pod's `Ready` condition, through
//!   `InstanceHandle::engine_readiness` (the daemon cannot probe a Pod on another node).
//! - **Terminate**: a delete with `gracePeriodSeconds` = the manifest's grace, then one
//!   with 1 s at the deadline ([`handle`]).
//! - **Logs**: the log API, `follow=true`, into the instance's log through
//!   `OutputTap` (stdout and stderr arrive merged: the API does not separate them).
//! - **Recovery**: `Driver::recover` lists this daemon's Pods by label (cluster-wide,
//!   else in the default namespace when listing across namespaces is forbidden) and
//!   hands back one `Found` per Pod; `discard` deletes one.
//! - **Exec** ([`exec`]): the exec subresource (websocket), [`PodHandle::exec`] on the
//!   handle [`KubernetesDriver::spawn_pod`] returns. The daemon's `bulkhead exec` does not
//!   reach it yet: its exec path runs a host command (`InstanceHandle::exec_argv`) and
//!   needs a host pid; a handle-level async exec in the driver seam would carry it.
//! - **Stats** ([`metrics`]): memory from the metrics API where a metrics server runs
//!   (refreshed in the background, at most every 5 s, only while usage is asked); CPU time
//!   is not reported (the API gives a rate). Without the API, usage reads zero.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use bulkhead_kubernetes::{ClusterConfig, KubernetesDriver};
//! // In-cluster config, else KUBECONFIG, else ~/.kube/config; connected on first use.
//! let driver = KubernetesDriver::new("0123456789abcdef", ClusterConfig::default());
//! let ns = driver.default_namespace().await?;
//! println!("pods without a namespace go to {ns}");
//! # Ok(()) }
//! ```
//!
//! **Invariant — the driver acts only on Pods labelled with its daemon id**: the watch,
//! recovery and deletes select by that label or by names derived from it.

pub mod driver;
pub mod exec;
pub mod handle;
pub mod metrics;
pub mod pod;
pub mod status;
pub mod watch;

pub use driver::{ClusterConfig, ClusterError, KubernetesDriver};
pub use handle::PodHandle;
