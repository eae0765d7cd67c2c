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
