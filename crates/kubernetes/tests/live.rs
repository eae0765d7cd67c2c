//! Live tests against a real cluster: they run only when `KUBECONFIG` names one, and say
//! loudly that they skipped otherwise (no API server can be installed where this project
//! is built: see PLATFORM-FACTS). The image must be pullable by the cluster
//! (`BULKHEAD_K8S_IMAGE`, default `busybox:1.36`).

use std::sync::Arc;
use std::time::Duration;

use bulkhead_core::event::ExitStatus;
use bulkhead_core::key::InstanceId;
use bulkhead_core::signal::Signal;
use bulkhead_driver::{Driver, SpawnSpec};
use bulkhead_kubernetes::{ClusterConfig, KubernetesDriver};

fn cluster() -> Option<KubernetesDriver> {
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!("skipped: no KUBECONFIG (the kubernetes live tests need a cluster)");
        return None;
    }
    let id = format!("live{:012x}", std::process::id());
    Some(KubernetesDriver::new(id, ClusterConfig::default()))
}

fn spec(instance: &str, script: &str) -> SpawnSpec {
    let image = std::env::var("BULKHEAD_K8S_IMAGE").unwrap_or_else(|_| "busybox:1.36".into());
    let text = format!(
        "name: live\ncommand: [sh, -c, '{script}']\ndriver: kubernetes\nshutdown: {{grace: 2s}}\n\
         kubernetes: {{image: \"{image}\"}}\n"
    );
    let w = bulkhead_core::spec::parse_manifest("live/manifest.yaml", "live", &text).unwrap();
    SpawnSpec {
        instance: InstanceId::parse(instance).unwrap().0,
        argv: w.command.clone(),
        env: vec![("PORT".into(), "8080".into())],
        cwd: "/".into(),
        spec: Arc::new(w),
        binds: Vec::new(),
        ids: None,
        inherited: Vec::new(),
        listen: Vec::new(),
    }
}

#[tokio::test]
async fn live_a_pod_runs_exits_with_its_code_and_is_gone() {
    let Some(d) = cluster() else { return };
    let s = d
        .spawn(spec("ns:exit:live", "echo live; exit 3"))
        .await
        .expect("spawn");
    let st = tokio::time::timeout(Duration::from_secs(120), s.handle.wait())
        .await
        .expect("the pod ends");
    assert_eq!(st, ExitStatus::Exited { code: 3 });
}

#[tokio::test]
async fn live_terminate_deletes_the_pod_with_its_grace() {
    let Some(d) = cluster() else { return };
    let s = d
        .spawn(spec("ns:stop:live", "sleep 600"))
        .await
        .expect("spawn");
    let st = tokio::time::timeout(
        Duration::from_secs(120),
        s.handle.stop(Signal::TERM, Duration::from_secs(5)),
    )
    .await
    .expect("the pod is gone");
    assert!(
        matches!(st, ExitStatus::Signaled { .. } | ExitStatus::Exited { .. }),
        "{st:?}"
    );
    assert!(
        d.recover().await.expect("list").is_empty(),
        "no pod of this daemon is left"
    );
}
