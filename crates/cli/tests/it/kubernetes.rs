//! `driver: kubernetes` through the daemon: its manifests validate in the catalog, what a
//! Pod cannot honour is refused naming the file and the field, and a daemon with no
//! cluster starts and fails only kubernetes launches, saying why. (The driver itself is
//! tested against kube's mock service in `crates/kubernetes/tests`.)

use crate::harness::{stderr, Daemon};

const KWEB: &str = "name: kweb\ncommand: [sh, -c, \"echo hi\"]\ndriver: kubernetes\n\
                    kubernetes: {image: \"busybox:1.36\", namespace: \"bh-${BULKHEAD_NAMESPACE}\"}\n\
                    resources: {cpu: 0.5, memory: 64Mi}\nreadiness: {tcp: {port: 8080}}\n";
const KBAD: &str = "name: kbad\ncommand: [sh]\ndriver: kubernetes\nkubernetes: {image: busybox}\n\
                    readiness: {notify: true}\n";

#[test]
fn a_kubernetes_manifest_validates_and_an_unhonourable_field_is_refused() {
    // A kubeconfig that cannot be read: no cluster, whatever this machine has.
    let d = Daemon::start_with_args(
        &[("kweb", KWEB), ("kbad", KBAD)],
        &["--kubeconfig", "/nonexistent/kubeconfig"],
    );
    let list = d.json(&["workloads", "-o", "json"]);
    let entry = |name: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == name)
            .unwrap()
            .clone()
    };
    let ok = entry("kweb");
    assert_eq!(ok["valid"], true, "{ok}");
    assert_eq!(ok["driver"], "kubernetes");
    let bad = entry("kbad");
    assert_eq!(bad["valid"], false);
    let e = bad["error"].as_str().unwrap();
    assert!(
        e.contains(
            "kbad/manifest.yaml: field `readiness.notify`: not supported by driver kubernetes"
        ),
        "{e}"
    );

    // The daemon serves without a cluster; the launch fails with the reason.
    let o = d.cli(&["launch", "kweb"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("kubernetes driver") && e.contains("/nonexistent/kubeconfig"),
        "{e}"
    );
    // Other drivers are unaffected.
    assert!(d.cli(&["list"]).status.success());
}

#[path = "../../../kubernetes/tests/fake/mod.rs"]
mod fake;

/// A real daemon and CLI against the simulated API server (`crates/kubernetes/tests/fake`,
/// served over HTTP, the daemon configured by a kubeconfig naming it, its local
/// "kubelet" running the container as a process): launch creates the Pod, its output
/// reaches `bulkhead logs`, terminate deletes it with the manifest's grace. No real
/// cluster is involved.
#[test]
fn a_kubernetes_workload_launches_logs_and_terminates_through_the_daemon() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = fake::FakeApi::new();
    api.kubelet.store(true, std::sync::atomic::Ordering::SeqCst);
    let url = rt.block_on(api.serve_http());
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: \"{url}\"}}}}]\n\
             users: [{{name: u, user: {{}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: u, namespace: apps}}}}]\n"
        ),
    )
    .unwrap();
    let manifest = "name: kweb\ncommand: [sh, -c, \"echo hello from the pod; exec sleep 1000\"]\n\
                    driver: kubernetes\nshutdown: {grace: 7s}\nkubernetes: {image: \"busybox:1.36\"}\n";
    let d = Daemon::start_with_args(
        &[("kweb", manifest)],
        &["--kubeconfig", kubeconfig.to_str().unwrap()],
    );
    let v = d.json(&["launch", "kweb", "-o", "json"]);
    assert_eq!(v["state"], "ready", "{v}");
    let id = v["id"].as_str().unwrap().to_owned();

    let post = api
        .requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .expect("the pod was created");
    assert_eq!(
        post.path, "/api/v1/namespaces/apps/pods",
        "the kubeconfig's namespace"
    );
    let body = post.body.unwrap();
    assert_eq!(
        body["metadata"]["annotations"]["bulkhead.io/instance-id"],
        id.as_str()
    );
    assert_eq!(body["spec"]["restartPolicy"], "Never");

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !d.logs_text(&id).contains("hello from the pod") {
        assert!(
            std::time::Instant::now() < deadline,
            "no log: {}",
            d.logs_text(&id)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let o = d.cli(&["terminate", &id]);
    assert!(o.status.success(), "{}", stderr(&o));
    let del = api
        .requests()
        .into_iter()
        .find(|r| r.method == "DELETE")
        .expect("the pod was deleted");
    assert_eq!(del.body.unwrap()["gracePeriodSeconds"], 7);
    d.wait_event("terminated", |e| {
        e["kind"] == "terminated" && e["instance"] == id.as_str()
    });
    let name = body["metadata"]["name"].as_str().unwrap();
    assert!(api.pod("apps", name).is_none(), "no Pod is left");
}

/// bulkhead's restart policy and breaker stay in charge (the Pod's policy is `Never`): a
/// Pod that exits 3 is reported with its code and started again as a new Pod of the same
/// name, created only once the old one is gone (the API server would refuse it before);
/// three failed runs open the breaker.
#[test]
fn a_crashed_pod_is_restarted_by_bulkheads_policy_as_a_new_pod() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = fake::FakeApi::new();
    api.kubelet.store(true, std::sync::atomic::Ordering::SeqCst);
    let url = rt.block_on(api.serve_http());
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: \"{url}\"}}}}]\n\
             users: [{{name: u, user: {{}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: u}}}}]\n"
        ),
    )
    .unwrap();
    let manifest = "name: kcrash\ncommand: [sh, -c, \"sleep 0.3; exit 3\"]\ndriver: kubernetes\n\
                    restart: {policy: on-failure, max_failures: 3, backoff: {initial: 10ms, max: 50ms}}\n\
                    kubernetes: {image: \"busybox:1.36\"}\n";
    let d = Daemon::start_with_args(
        &[("kcrash", manifest)],
        &["--kubeconfig", kubeconfig.to_str().unwrap()],
    );
    let v = d.json(&["launch", "kcrash", "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let mine = |e: &serde_json::Value| e["instance"] == id.as_str();
    d.wait_event("exited 3", |e| {
        mine(e) && e["kind"] == "exited" && e["exit_code"] == 3
    });
    d.wait_event("restarting", |e| mine(e) && e["kind"] == "restarting");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while d
        .events()
        .iter()
        .filter(|e| mine(e) && e["kind"] == "started")
        .count()
        < 2
    {
        assert!(std::time::Instant::now() < deadline, "{:#?}", d.events());
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let posts: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .map(|r| {
            r.body.unwrap()["metadata"]["name"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(
        posts.len() >= 2 && posts.iter().all(|n| *n == posts[0]),
        "{posts:?}"
    );
    assert!(
        !d.events()
            .iter()
            .any(|e| mine(e) && e["kind"] == "launch_failed"),
        "no create was refused: {:#?}",
        d.events()
    );
    // And its breaker: three failed runs in a row open it.
    d.wait_event("breaker_open", |e| mine(e) && e["kind"] == "breaker_open");
    assert!(d.cli(&["terminate", &id]).status.success());
}
