//! The `kubernetes:` section of a manifest: the Pod the `kubernetes` driver runs, and what
//! that driver refuses because it cannot honour it.
//!
//! ```yaml
//! driver: kubernetes
//! command: [python3, app.py]          # the container's args (the image's ENTRYPOINT stays)
//! resources: { cpu: 0.5, memory: 256Mi }   # the container's limits
//! kubernetes:
//!   image: python:3.12-slim
//!   namespace: team-a                 # default: the daemon's --kubernetes-namespace,
//!                                     # else the kubeconfig's; "bh-${BULKHEAD_NAMESPACE}"
//!                                     # gives one Kubernetes namespace per bulkhead one
//!   requests: { cpu: 0.1, memory: 64Mi }
//!   entrypoint: [/usr/bin/env]        # replaces the image's ENTRYPOINT
//!   image_pull_policy: IfNotPresent   # Always, IfNotPresent or Never
//!   service_account: app
//!   node_selector: { disktype: ssd }
//!   labels: { team: a }
//!   start_timeout: 5m                 # scheduling + image pull, before the spawn fails
//! ```
//!
//! The Pod runs on another node: what the daemon does on its own host cannot reach it.
//! So with `driver: kubernetes` these are refused, each naming its field:
//! `sockets`/`activation` (the daemon's host sockets), `readiness.notify` and
//! `readiness.watchdog` (the host's notify socket), a probe's `ready_period` and a
//! probe `host` (the kubelet probes the Pod's IP with one period), `liveness` (the daemon
//! would probe its own host), `channels` (host shared memory), `limits`, `umask`, user
//! and group names (only numeric ids map to the Pod's `securityContext`), a relative
//! `working_dir`, `resources.pids`/`resources.cpuset` (no Pod field) and a
//! `shutdown.signal` other than TERM (the kubelet always sends SIGTERM, then SIGKILL
//! after the grace).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::serde_duration;
use crate::spec::{DriverKind, WorkloadSpec};

/// The placeholder a `namespace` may contain: the instance's bulkhead namespace.
pub const NAMESPACE_PLACEHOLDER: &str = "${BULKHEAD_NAMESPACE}";

/// Label keys (and annotation keys) the driver owns: a manifest's `labels` cannot set them.
pub const RESERVED_LABEL_PREFIX: &str = "bulkhead.io/";

/// The `kubernetes:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSpec {
    /// The container image (pulled by the cluster, per `image_pull_policy`).
    pub image: String,
    /// The Kubernetes namespace of the Pod; may contain [`NAMESPACE_PLACEHOLDER`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Replaces the image's `ENTRYPOINT` (the container's `command`); the manifest's
    /// `command` is always the container's `args`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Extra labels on the Pod (the `bulkhead.io/` ones are the driver's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The container's resource requests (its limits are the workload's `resources`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<Requests>,
    /// How long a Pod may take to be scheduled and to start its container (image pull
    /// included) before the spawn fails and the Pod is deleted.
    #[serde(default = "default_start_timeout", with = "serde_duration")]
    pub start_timeout: Duration,
}

fn default_start_timeout() -> Duration {
    Duration::from_secs(300)
}

/// `imagePullPolicy`, spelt as Kubernetes spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// `kubernetes.requests`: what the scheduler reserves for the container.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requests {
    /// Cores (`0.25`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    #[serde(
        default,
        with = "crate::size::opt_size",
        skip_serializing_if = "Option::is_none"
    )]
    pub memory: Option<u64>,
}

/// Whether `s` is a DNS-1123 label (a Kubernetes namespace or Pod name part).
pub fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Whether `s` is a label value (empty, or up to 63 of `[A-Za-z0-9_.-]`, alphanumeric at
/// both ends).
pub fn label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric())
}

/// Whether `s` is a label key: an optional DNS prefix and `/`, then a name.
pub fn label_key(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let prefix_ok =
        prefix.is_none_or(|p| !p.is_empty() && p.len() <= 253 && p.split('.').all(dns_label));
    prefix_ok && !name.is_empty() && label_value(name)
}

/// The namespace an instance's Pod goes to, from the section's `namespace` (with the
/// placeholder replaced by the instance's bulkhead namespace) or `default`. `Err`: the
/// reason the result is not a namespace name.
pub fn resolve_namespace(
    template: Option<&str>,
    bulkhead_namespace: Option<&str>,
    default: &str,
) -> Result<String, String> {
    let Some(t) = template else {
        return Ok(default.to_owned());
    };
    let ns = if t.contains(NAMESPACE_PLACEHOLDER) {
        let Some(b) = bulkhead_namespace else {
            return Err(format!(
                "kubernetes.namespace {t} names {NAMESPACE_PLACEHOLDER} but the instance has no bulkhead namespace"
            ));
        };
        t.replace(NAMESPACE_PLACEHOLDER, b)
    } else {
        t.to_owned()
    };
    if dns_label(&ns) {
        Ok(ns)
    } else {
        Err(format!(
            "kubernetes namespace {} is not a DNS label (lowercase letters, digits and '-', at most 63)",
            crate::name::show(&ns)
        ))
    }
}

/// Checks the `kubernetes:` section against the driver, and refuses what the driver
/// cannot honour. On error: the field and the reason.
pub fn validate(spec: &WorkloadSpec) -> Result<(), (String, String)> {
    let fail = |field: &str, reason: &str| Err((field.to_owned(), reason.to_owned()));
    let kube = spec.driver == DriverKind::Kubernetes;
    let Some(k) = &spec.kubernetes else {
        if kube {
            return fail(
                "kubernetes",
                "is required with driver: kubernetes (set kubernetes.image)",
            );
        }
        return Ok(());
    };
    if !kube {
        return Err((
            "kubernetes".into(),
            format!(
                "is only allowed with driver: kubernetes (this workload uses driver: {})",
                spec.driver
            ),
        ));
    }
    if k.image.trim().is_empty() || k.image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return fail("kubernetes.image", "must name an image, without spaces");
    }
    if let Some(ns) = &k.namespace {
        let probe = ns.replace(NAMESPACE_PLACEHOLDER, "x");
        if !dns_label(&probe) {
            return fail(
                "kubernetes.namespace",
                "must be a DNS label (lowercase letters, digits and '-', at most 63), \
                 optionally with ${BULKHEAD_NAMESPACE}",
            );
        }
    }
    if let Some(e) = &k.entrypoint {
        if e.iter().any(|a| a.contains('\0')) {
            return fail("kubernetes.entrypoint", "contains a NUL byte");
        }
    }
    if let Some(sa) = &k.service_account {
        if !sa.split('.').all(dns_label) || sa.len() > 253 {
            return fail("kubernetes.service_account", "must be a DNS subdomain name");
        }
    }
    for (key, v) in k.node_selector.iter().chain(&k.labels) {
        let field = if k.labels.contains_key(key) {
            "kubernetes.labels"
        } else {
            "kubernetes.node_selector"
        };
        if !label_key(key) {
            return Err((format!("{field}.{key}"), "is not a valid label key".into()));
        }
        if !label_value(v) {
            return Err((
                format!("{field}.{key}"),
                "is not a valid label value (at most 63 of A-Z a-z 0-9 _ . -)".into(),
            ));
        }
    }
    if k.labels
        .keys()
        .any(|key| key.starts_with(RESERVED_LABEL_PREFIX))
    {
        return fail(
            "kubernetes.labels",
            "bulkhead.io/ labels are set by bulkhead and cannot be overridden",
        );
    }
    if k.start_timeout.is_zero() {
        return fail("kubernetes.start_timeout", "must be greater than zero");
    }
    let res = spec.resources.clone().unwrap_or_default();
    if let Some(r) = &k.requests {
        if let Some(c) = r.cpu {
            if !(c.is_finite() && (0.001..=1024.0).contains(&c)) {
                return fail(
                    "kubernetes.requests.cpu",
                    "must be between 0.001 and 1024 cores",
                );
            }
            if res.cpu.is_some_and(|l| c > l) {
                return fail(
                    "kubernetes.requests.cpu",
                    "must not be above resources.cpu (the limit)",
                );
            }
        }
        if let Some(m) = r.memory {
            if res.memory.is_some_and(|l| m > l) {
                return fail(
                    "kubernetes.requests.memory",
                    "must not be above resources.memory (the limit)",
                );
            }
        }
    }
    refuse_unhonoured(spec)
}

/// What the Pod cannot honour (see the module docs).
fn refuse_unhonoured(spec: &WorkloadSpec) -> Result<(), (String, String)> {
    let fail = |field: &str, reason: &str| {
        Err((
            field.to_owned(),
            format!("not supported by driver kubernetes: {reason}"),
        ))
    };
    if spec.sockets.is_some() {
        return fail(
            "sockets",
            "the daemon binds sockets on its own host, the Pod listens in its own network (use $PORT)",
        );
    }
    if spec.activation.is_some() {
        return fail(
            "activation",
            "on-connection start needs the daemon's own sockets",
        );
    }
    if let Some(r) = &spec.readiness {
        if r.notify {
            return fail(
                "readiness.notify",
                "the sd_notify socket is on the daemon's host; use an http, tcp or exec probe (run by the kubelet)",
            );
        }
        if r.watchdog.is_some() {
            return fail("readiness.watchdog", "it is an sd_notify message");
        }
        if [r.http.is_some(), r.tcp.is_some(), r.exec.is_some()]
            .iter()
            .filter(|b| **b)
            .count()
            > 1
        {
            return fail(
                "readiness",
                "a Kubernetes readiness probe has one handler: set only one of http, tcp, exec",
            );
        }
        let once = "a Kubernetes probe has one period (periodSeconds)";
        if let Some(h) = &r.http {
            if h.ready_period.is_some() {
                return fail("readiness.http.ready_period", once);
            }
            if h.host != "127.0.0.1" {
                return fail(
                    "readiness.http.host",
                    "the kubelet probes the Pod's own address",
                );
            }
        }
        if r.tcp.as_ref().is_some_and(|t| t.ready_period.is_some()) {
            return fail("readiness.tcp.ready_period", once);
        }
        if r.exec
            .as_ref()
            .is_some_and(|e| e.timing.ready_period.is_some())
        {
            return fail("readiness.exec.ready_period", once);
        }
    }
    if spec.liveness.is_some() {
        return fail(
            "liveness",
            "the daemon would probe its own host, not the Pod (use readiness probes, which the kubelet runs)",
        );
    }
    if spec.channels.is_some() {
        return fail(
            "channels",
            "shared-memory channels live on the daemon's host",
        );
    }
    if !spec.limits.is_empty() {
        return fail("limits", "a Pod has no rlimit setting");
    }
    if spec.umask.is_some() {
        return fail(
            "umask",
            "a Pod has no umask setting (set it in the image's entrypoint)",
        );
    }
    let numeric = |v: &str| v.parse::<u32>().is_ok();
    if spec.user.as_deref().is_some_and(|u| !numeric(u)) {
        return fail("user", "only a numeric uid maps to the Pod's runAsUser");
    }
    if spec.group.as_deref().is_some_and(|g| !numeric(g)) {
        return fail("group", "only a numeric gid maps to the Pod's runAsGroup");
    }
    if spec.groups.iter().any(|g| !numeric(g)) {
        return fail(
            "groups",
            "only numeric gids map to the Pod's supplementalGroups",
        );
    }
    if spec
        .working_dir
        .as_deref()
        .is_some_and(|w| !w.starts_with('/'))
    {
        return fail(
            "working_dir",
            "must be an absolute path inside the container",
        );
    }
    if let Some(r) = &spec.resources {
        if r.pids.is_some() {
            return fail("resources.pids", "a Pod has no pids limit field");
        }
        if r.cpuset.is_some() {
            return fail("resources.cpuset", "a Pod cannot pin CPUs by list");
        }
    }
    if spec.shutdown.signal != crate::signal::Signal::TERM {
        return fail(
            "shutdown.signal",
            "the kubelet always sends SIGTERM, then SIGKILL after the grace",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse_manifest;

    fn parse(extra: &str) -> Result<WorkloadSpec, String> {
        let text = format!("name: w\ncommand: [sh]\n{extra}");
        parse_manifest("w/manifest.yaml", "w", &text).map_err(|e| e.to_string())
    }

    const KUBE: &str = "driver: kubernetes\nkubernetes: {image: busybox}\n";

    #[test]
    fn a_kubernetes_manifest_parses_with_every_field() {
        let s = parse(
            "driver: kubernetes\nresources: {cpu: 0.5, memory: 256Mi}\n\
             readiness: {http: {path: /health, port: 8080}}\n\
             kubernetes:\n  image: python:3.12-slim\n  namespace: bh-${BULKHEAD_NAMESPACE}\n\
             \x20 requests: {cpu: 0.1, memory: 64Mi}\n  entrypoint: [/bin/sh, -c]\n\
             \x20 image_pull_policy: IfNotPresent\n  service_account: app\n\
             \x20 node_selector: {disktype: ssd}\n  labels: {team: a}\n  start_timeout: 2m\n",
        )
        .unwrap();
        let k = s.kubernetes.unwrap();
        assert_eq!(k.image, "python:3.12-slim");
        assert_eq!(k.requests.unwrap().memory, Some(64 << 20));
        assert_eq!(k.image_pull_policy, Some(PullPolicy::IfNotPresent));
        assert_eq!(k.start_timeout, Duration::from_secs(120));
        assert_eq!(s.driver, DriverKind::Kubernetes);
    }

    #[test]
    fn the_section_and_the_driver_go_together() {
        let e = parse("driver: kubernetes\n").unwrap_err();
        assert!(
            e.contains("field `kubernetes`") && e.contains("required"),
            "{e}"
        );
        let e = parse("kubernetes: {image: busybox}\n").unwrap_err();
        assert!(e.contains("only allowed with driver: kubernetes"), "{e}");
        assert!(parse(KUBE).is_ok());
    }

    #[test]
    fn what_a_pod_cannot_honour_is_refused_naming_the_field() {
        let cases = [
            (
                "sockets: [{name: http, listen: \"tcp:127.0.0.1:0\"}]\n",
                "sockets",
            ),
            ("readiness: {notify: true}\n", "readiness.notify"),
            (
                "readiness: {tcp: {port: 80, ready_period: 5s}}\n",
                "readiness.tcp.ready_period",
            ),
            (
                "readiness: {http: {host: 10.0.0.1}}\n",
                "readiness.http.host",
            ),
            ("liveness: {tcp: {port: 80}}\n", "liveness"),
            ("readiness: {tcp: {port: 80}, exec: [true]}\n", "readiness"),
            ("limits: {nofile: 1024}\n", "limits"),
            ("umask: \"077\"\n", "umask"),
            ("user: app\n", "user"),
            ("working_dir: src\n", "working_dir"),
            ("resources: {pids: 10}\n", "resources.pids"),
            ("resources: {cpuset: \"0\"}\n", "resources.cpuset"),
            ("shutdown: {signal: INT}\n", "shutdown.signal"),
            (
                "resources: {memory: 64Mi}\nkubernetes: {image: b, requests: {memory: 128Mi}}\n",
                "kubernetes.requests.memory",
            ),
            (
                "kubernetes: {image: b, labels: {bulkhead.io/instance: x}}\n",
                "kubernetes.labels",
            ),
            (
                "kubernetes: {image: b, namespace: Team_A}\n",
                "kubernetes.namespace",
            ),
        ];
        for (extra, field) in cases {
            let text = if extra.starts_with("kubernetes:") || extra.contains("\nkubernetes:") {
                format!("driver: kubernetes\n{extra}")
            } else {
                format!("{KUBE}{extra}")
            };
            let e = parse(&text).unwrap_err();
            assert!(
                e.contains(&format!("w/manifest.yaml: field `{field}`")),
                "{extra}: {e}"
            );
        }
        // The controls: what does map is accepted.
        assert!(parse(&format!(
            "{KUBE}user: \"1000\"\ngroups: [\"5\"]\nworking_dir: /app\nresources: {{cpu: 1, memory: 1Gi}}\n\
             readiness: {{exec: [cat, /tmp/ready]}}\n"
        ))
        .is_ok());
    }

    #[test]
    fn the_namespace_resolves_per_bulkhead_namespace_or_falls_back() {
        assert_eq!(
            resolve_namespace(None, Some("a"), "default").unwrap(),
            "default"
        );
        assert_eq!(
            resolve_namespace(Some("bh-${BULKHEAD_NAMESPACE}"), Some("team-a"), "d").unwrap(),
            "bh-team-a"
        );
        assert!(resolve_namespace(Some("bh-${BULKHEAD_NAMESPACE}"), None, "d").is_err());
        assert!(resolve_namespace(Some("${BULKHEAD_NAMESPACE}"), Some("Team_A"), "d").is_err());
    }

    #[test]
    fn label_syntax() {
        assert!(label_key("app.kubernetes.io/name") && label_key("team"));
        assert!(!label_key("/x") && !label_key("a/b/c") && !label_key("-x"));
        assert!(label_value("") && label_value("a.b_c-9") && !label_value("a:b"));
        assert!(dns_label("bh-0") && !dns_label("Bh") && !dns_label("a-"));
    }
}
