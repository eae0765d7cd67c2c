//! The Pod an instance runs as: its name, labels and body, made from the spawn spec.
//! Pure (no I/O), so that the contract tests can assert every field bulkhead sends.

use std::collections::BTreeMap;
use std::time::Duration;

use bulkhead_core::kubernetes::KubernetesSpec;
use bulkhead_core::spec::{ExecProbe, HttpProbe, Readiness, Scheme, TcpProbe};
use bulkhead_driver::SpawnSpec;
use k8s_openapi::api::core::v1::{
    Container, EnvVar, ExecAction, HTTPGetAction, HTTPHeader, LocalObjectReference, Pod,
    PodSecurityContext, PodSpec, Probe, ResourceRequirements, SecurityContext, TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The label every Pod of a daemon carries: the watcher's and recovery's selector.
pub const LABEL_DAEMON: &str = "bulkhead.io/daemon";
/// A hash of the instance id (an id has `:` and may be longer than a label value).
pub const LABEL_INSTANCE: &str = "bulkhead.io/instance";
pub const LABEL_WORKLOAD: &str = "bulkhead.io/workload";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The full instance id, as an annotation (what recovery reads back).
pub const ANNOTATION_INSTANCE: &str = "bulkhead.io/instance-id";
/// The name of the one container in every Pod.
pub const CONTAINER: &str = "main";

/// FNV-1a, 64 bits: stable across builds and platforms (names must not change between
/// daemon versions, or recovery would not find its Pods).
pub fn fnv64(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.as_bytes().iter().chain(std::iter::once(&0u8)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The daemon's label value: its id when that is a label value, else a hash of it.
pub fn daemon_label(daemon_id: &str) -> String {
    if bulkhead_core::kubernetes::label_value(daemon_id) && !daemon_id.is_empty() {
        daemon_id.to_owned()
    } else {
        format!("h{:016x}", fnv64(&[daemon_id]))
    }
}

/// The selector of this daemon's Pods.
pub fn selector(daemon_id: &str) -> String {
    format!("{LABEL_DAEMON}={}", daemon_label(daemon_id))
}

/// The workload's label value: its name (workload names may end in `-`, `.` or `_`,
/// which a label value may not: those are trimmed).
pub fn workload_label(name: &str) -> String {
    let t = name.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    if bulkhead_core::kubernetes::label_value(t) {
        t.to_owned()
    } else {
        format!("h{:016x}", fnv64(&[name]))
    }
}

/// The instance's label value.
pub fn instance_label(instance: &str) -> String {
    format!("{:016x}", fnv64(&[instance]))
}

/// The Pod's name: the workload's name made a DNS label, and a hash of the daemon and the
/// instance id. **The same key always gets the same name**, so the API server itself
/// refuses a second Pod for a key while the first exists (a terminating one included).
pub fn pod_name(daemon_id: &str, instance: &str, workload: &str) -> String {
    let mut w: String = workload
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    w.truncate(40);
    let w = w.trim_matches('-');
    let h = fnv64(&[daemon_id, instance]);
    if w.is_empty() {
        format!("bh-{h:016x}")
    } else {
        format!("{w}-{h:016x}")
    }
}

/// A quantity of cores in millicores (`500m`), rounded up to a whole millicore.
pub fn cpu_quantity(cores: f64) -> Quantity {
    Quantity(format!("{}m", (cores * 1000.0).ceil().max(1.0) as u64))
}

/// Bytes as a quantity.
pub fn memory_quantity(bytes: u64) -> Quantity {
    Quantity(bytes.to_string())
}

/// Whole seconds, rounded up, at least `min` (Kubernetes probe fields are seconds).
fn secs(d: Duration, min: i32) -> i32 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(s).unwrap_or(i32::MAX).max(min)
}

/// Where the instance's `$PORT` is, for probes that name no port.
fn port_of(spec: &SpawnSpec) -> Option<u16> {
    spec.env
        .iter()
        .rev()
        .find(|(k, _)| k == "PORT")
        .and_then(|(_, v)| v.parse().ok())
        .filter(|&p| p > 0)
}

/// The readiness probe for the container, from the manifest's probes. Kubernetes takes
/// one handler per probe: a manifest with more than one is refused here (the spawn fails
/// naming them), never half-honoured.
pub fn readiness_probe(r: &Readiness, port: Option<u16>) -> Result<Probe, String> {
    let count = [r.http.is_some(), r.tcp.is_some(), r.exec.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if count > 1 {
        return Err(
            "a Kubernetes readiness probe has one handler: set only one of readiness.http, \
             readiness.tcp, readiness.exec"
                .into(),
        );
    }
    let need_port = |p: Option<u16>, field: &str| {
        p.or(port)
            .ok_or_else(|| format!("{field} names no port and the instance has no $PORT"))
    };
    if let Some(h) = &r.http {
        let HttpProbe {
            path,
            port: p,
            scheme,
            headers,
            ..
        } = h;
        let t = h.timing();
        let port = need_port(*p, "readiness.http.port")?;
        return Ok(Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.clone()),
                port: IntOrString::Int(i32::from(port)),
                scheme: Some(match scheme {
                    Scheme::Http => "HTTP".into(),
                    Scheme::Https => "HTTPS".into(),
                }),
                http_headers: (!headers.is_empty()).then(|| {
                    headers
                        .iter()
                        .map(|(name, value)| HTTPHeader {
                            name: name.clone(),
                            value: value.clone(),
                        })
                        .collect()
                }),
                host: None,
            }),
            ..timing_probe(&t)
        });
    }
    if let Some(TcpProbe { port: p, .. }) = &r.tcp {
        let t = r.tcp.as_ref().map(TcpProbe::timing).unwrap_or_default();
        let port = need_port(*p, "readiness.tcp.port")?;
        return Ok(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(i32::from(port)),
                host: None,
            }),
            ..timing_probe(&t)
        });
    }
    if let Some(ExecProbe { command, timing }) = &r.exec {
        return Ok(Probe {
            exec: Some(ExecAction {
                command: Some(command.clone()),
            }),
            ..timing_probe(timing)
        });
    }
    Err("readiness names no probe".into())
}

fn timing_probe(t: &bulkhead_core::spec::ProbeTiming) -> Probe {
    Probe {
        initial_delay_seconds: Some(secs(t.initial_delay, 0)),
        period_seconds: Some(secs(t.period, 1)),
        timeout_seconds: Some(secs(t.timeout, 1)),
        success_threshold: Some(i32::try_from(t.success_threshold).unwrap_or(i32::MAX)),
        failure_threshold: Some(i32::try_from(t.failure_threshold).unwrap_or(i32::MAX)),
        ..Probe::default()
    }
}

/// The Pod for `spec` in `namespace`.
pub fn pod_for(
    spec: &SpawnSpec,
    k: &KubernetesSpec,
    daemon_id: &str,
    namespace: &str,
) -> Result<Pod, String> {
    let w = &spec.spec;
    let instance = spec.instance.as_str();
    let mut labels: BTreeMap<String, String> = k.labels.clone();
    labels.insert(LABEL_DAEMON.into(), daemon_label(daemon_id));
    labels.insert(LABEL_INSTANCE.into(), instance_label(instance));
    labels.insert(LABEL_WORKLOAD.into(), workload_label(&w.name));
    labels.insert(LABEL_MANAGED_BY.into(), "bulkhead".into());
    let annotations = BTreeMap::from([(ANNOTATION_INSTANCE.to_owned(), instance.to_owned())]);

    let res = w.resources.clone().unwrap_or_default();
    let mut limits = BTreeMap::new();
    if let Some(c) = res.cpu {
        limits.insert("cpu".to_owned(), cpu_quantity(c));
    }
    if let Some(m) = res.memory {
        limits.insert("memory".to_owned(), memory_quantity(m));
    }
    let mut requests = BTreeMap::new();
    if let Some(r) = &k.requests {
        if let Some(c) = r.cpu {
            requests.insert("cpu".to_owned(), cpu_quantity(c));
        }
        if let Some(m) = r.memory {
            requests.insert("memory".to_owned(), memory_quantity(m));
        }
    }
    let resources = (!limits.is_empty() || !requests.is_empty()).then(|| ResourceRequirements {
        limits: (!limits.is_empty()).then_some(limits),
        requests: (!requests.is_empty()).then_some(requests),
        ..ResourceRequirements::default()
    });

    // The image brings its own PATH, HOME, ...: the daemon's pass-through variables stay
    // out (as with docker); the manifest's env, PORT and BULKHEAD_* go in.
    let env: Vec<EnvVar> = spec
        .env
        .iter()
        .filter(|(k, _)| !spec.inherited.contains(k) && k != "NOTIFY_SOCKET")
        .map(|(k, v)| EnvVar {
            name: k.clone(),
            value: Some(v.clone()),
            value_from: None,
        })
        .collect();

    let readiness_probe = match &w.readiness {
        Some(r) => Some(readiness_probe(r, port_of(spec))?),
        None => None,
    };
    let num = |v: &Option<String>| v.as_deref().and_then(|s| s.parse::<i64>().ok());
    let run_as_user = num(&w.user);
    let run_as_group = num(&w.group);
    let supplemental: Vec<i64> = w.groups.iter().filter_map(|g| g.parse().ok()).collect();
    let grace = w.shutdown.grace.as_secs() + u64::from(w.shutdown.grace.subsec_nanos() > 0);

    let container = Container {
        name: CONTAINER.into(),
        image: Some(k.image.clone()),
        image_pull_policy: k.image_pull_policy.map(|p| p.as_str().to_owned()),
        command: k.entrypoint.clone(),
        args: Some(spec.argv.clone()),
        env: (!env.is_empty()).then_some(env),
        working_dir: w.working_dir.clone(),
        resources,
        readiness_probe,
        ports: port_of(spec).map(|p| {
            vec![k8s_openapi::api::core::v1::ContainerPort {
                container_port: i32::from(p),
                name: Some("port".into()),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]
        }),
        security_context: Some(SecurityContext {
            // Deny by default, as the docker driver's no-new-privileges.
            allow_privilege_escalation: Some(false),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(daemon_id, instance, &w.name)),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![container],
            // bulkhead's restart policy and breaker decide; the kubelet never restarts.
            restart_policy: Some("Never".into()),
            termination_grace_period_seconds: Some(grace.min(i64::MAX as u64) as i64),
            service_account_name: k.service_account.clone(),
            node_selector: (!k.node_selector.is_empty()).then(|| k.node_selector.clone()),
            automount_service_account_token: Some(k.service_account.is_some()),
            enable_service_links: Some(false),
            security_context: (run_as_user.is_some()
                || run_as_group.is_some()
                || !supplemental.is_empty())
            .then(|| PodSecurityContext {
                run_as_user,
                run_as_group,
                supplemental_groups: (!supplemental.is_empty()).then_some(supplemental),
                ..PodSecurityContext::default()
            }),
            image_pull_secrets: None::<Vec<LocalObjectReference>>,
            ..PodSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bulkhead_core::key::InstanceId;
    use bulkhead_core::kubernetes::{dns_label, label_value};
    use proptest::prelude::*;

    use super::*;

    fn spawn_spec(manifest: &str) -> SpawnSpec {
        let text = format!("name: web\ncommand: [./serve, --fast]\ndriver: kubernetes\n{manifest}");
        let w = bulkhead_core::spec::parse_manifest("web/manifest.yaml", "web", &text).unwrap();
        SpawnSpec {
            instance: InstanceId::parse("ns:a:web").unwrap().0,
            argv: w.command.clone(),
            env: vec![("PORT".into(), "9000".into())],
            cwd: "/".into(),
            spec: Arc::new(w),
            binds: Vec::new(),
            ids: None,
            inherited: Vec::new(),
            listen: Vec::new(),
        }
    }

    fn pod(manifest: &str) -> Pod {
        let s = spawn_spec(manifest);
        let k = s.spec.kubernetes.clone().unwrap();
        pod_for(&s, &k, "d", "ns1").unwrap()
    }

    #[test]
    fn probes_map_with_periods_rounded_up_to_whole_seconds() {
        let p = pod("kubernetes: {image: i}\nreadiness: {tcp: {period: 100ms, timeout: 1500ms, initial_delay: 0s}}\n");
        let c = &p.spec.unwrap().containers[0];
        let r = c.readiness_probe.clone().unwrap();
        assert_eq!(r.tcp_socket.unwrap().port, IntOrString::Int(9000));
        assert_eq!(r.period_seconds, Some(1));
        assert_eq!(r.timeout_seconds, Some(2));
        assert_eq!(r.initial_delay_seconds, Some(0));
        let p = pod("kubernetes: {image: i}\nreadiness: {exec: {command: [cat, /ready], period: 3s, success_threshold: 2}}\n");
        let r = p.spec.unwrap().containers[0]
            .readiness_probe
            .clone()
            .unwrap();
        assert_eq!(
            r.exec.unwrap().command,
            Some(vec!["cat".into(), "/ready".into()])
        );
        assert_eq!((r.period_seconds, r.success_threshold), (Some(3), Some(2)));
    }

    #[test]
    fn the_entrypoint_user_and_working_dir_map_to_the_container() {
        let p = pod(
            "kubernetes: {image: i, entrypoint: [/bin/tini, --]}\nuser: \"1000\"\ngroup: \"100\"\n\
             groups: [\"5\"]\nworking_dir: /srv\n",
        );
        let spec = p.spec.unwrap();
        let c = &spec.containers[0];
        assert_eq!(c.command, Some(vec!["/bin/tini".into(), "--".into()]));
        assert_eq!(c.args, Some(vec!["./serve".into(), "--fast".into()]));
        assert_eq!(c.working_dir.as_deref(), Some("/srv"));
        let sc = spec.security_context.unwrap();
        assert_eq!((sc.run_as_user, sc.run_as_group), (Some(1000), Some(100)));
        assert_eq!(sc.supplemental_groups, Some(vec![5]));
        assert_eq!(
            c.security_context
                .as_ref()
                .unwrap()
                .allow_privilege_escalation,
            Some(false)
        );
        assert_eq!(p.metadata.namespace.as_deref(), Some("ns1"));
    }

    #[test]
    fn a_probe_without_a_port_needs_the_instances_port() {
        let mut s = spawn_spec("kubernetes: {image: i}\nreadiness: {http: {path: /}}\n");
        s.env.clear();
        let k = s.spec.kubernetes.clone().unwrap();
        let e = pod_for(&s, &k, "d", "ns1").unwrap_err();
        assert!(e.contains("readiness.http.port"), "{e}");
    }

    proptest! {
        /// Whatever the workload name and instance id, the Pod name is a DNS label and
        /// the label values are label values; two instances get two names.
        #[test]
        fn names_and_labels_are_always_valid(
            daemon in "\\PC{0,80}",
            workload in "[A-Za-z0-9_.-]{1,63}",
            a in "\\PC{1,200}",
            b in "\\PC{1,200}",
        ) {
            let n = pod_name(&daemon, &a, &workload);
            prop_assert!(dns_label(&n), "{n}");
            prop_assert!(label_value(&daemon_label(&daemon)) && !daemon_label(&daemon).is_empty());
            prop_assert!(label_value(&instance_label(&a)));
            prop_assert!(label_value(&workload_label(&workload)));
            if a != b {
                prop_assert_ne!(n, pod_name(&daemon, &b, &workload));
            }
        }
    }
}
