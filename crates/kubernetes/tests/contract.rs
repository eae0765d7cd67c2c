//! Contract tests: the driver against kube's tower mock service, answered by a small
//! simulated API server (`fake`). They assert the requests bulkhead sends and replay
//! recorded (hand-made, see `fixtures/README.md`) watch streams. No real cluster runs
//! here: `live.rs` runs against one when `KUBECONFIG` is set.

mod fake;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulkhead_core::event::ExitStatus;
use bulkhead_core::key::InstanceId;
use bulkhead_core::signal::Signal;
use bulkhead_driver::{Driver, ExitCause, OutputSink, SpawnSpec, Stream};
use bulkhead_kubernetes::{pod, KubernetesDriver};
use fake::{fixture, FakeApi};
use serde_json::json;

const DAEMON: &str = "0123456789abcdef";
const DEADLINE: Duration = Duration::from_secs(20);

fn spec(instance: &str, manifest: &str) -> SpawnSpec {
    let text = format!("name: web\ncommand: [sh, -c, 'echo hi; sleep 60']\n{manifest}");
    let w = bulkhead_core::spec::parse_manifest("web/manifest.yaml", "web", &text).unwrap();
    SpawnSpec {
        instance: InstanceId::parse(instance).unwrap().0,
        argv: w.command.clone(),
        env: vec![
            ("PATH".into(), "/usr/bin:/bin".into()),
            ("PORT".into(), "8080".into()),
            ("BULKHEAD_NAMESPACE".into(), "team-a".into()),
            ("GREETING".into(), "hello".into()),
        ],
        cwd: "/tmp".into(),
        spec: Arc::new(w),
        binds: Vec::new(),
        ids: None,
        inherited: vec!["PATH".into()],
        listen: Vec::new(),
    }
}

const BASIC: &str = "driver: kubernetes\nkubernetes: {image: busybox:1.36}\n";

fn pod_name(instance: &str) -> String {
    pod::pod_name(DAEMON, instance, "web")
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {DEADLINE:?}"))
}

/// Spawns with the fake kubelet off and replays `file` once the Pod is created.
async fn spawn_replaying(
    api: &Arc<FakeApi>,
    driver: &KubernetesDriver,
    s: SpawnSpec,
    file: &str,
) -> Result<bulkhead_driver::Spawned, bulkhead_driver::SpawnError> {
    let name = pod_name(s.instance.as_str());
    let replay = {
        let api = api.clone();
        async move {
            api.wait_request(|r| r.method == "POST").await;
            for ev in fixture(file, &name, "default", DAEMON) {
                api.emit("default", ev);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let (spawned, ()) = tokio::join!(driver.spawn(s), replay);
    spawned
}

#[tokio::test]
async fn the_pod_carries_labels_restart_never_probe_resources_and_grace() {
    let api = FakeApi::new();
    api.autostart.store(true, Ordering::SeqCst);
    let driver = KubernetesDriver::with_client(DAEMON, api.client());
    let s = spec(
        "ns:team-a:web",
        "driver: kubernetes\nresources: {cpu: 0.5, memory: 256Mi}\nshutdown: {grace: 7s}\n\
         readiness: {http: {path: /health, period: 2s, failure_threshold: 4}}\n\
         kubernetes: {image: busybox:1.36, requests: {cpu: 0.1, memory: 64Mi}}\n",
    );
    let spawned = within("spawn", driver.spawn(s)).await.unwrap();
    let name = pod_name("ns:team-a:web");

    let post = api.wait_request(|r| r.method == "POST").await;
    assert_eq!(post.path, "/api/v1/namespaces/default/pods");
    let body = post.body.unwrap();
    let m = &body["metadata"];
    assert_eq!(m["name"], name);
    assert_eq!(m["labels"]["bulkhead.io/daemon"], DAEMON);
    assert_eq!(m["labels"]["bulkhead.io/workload"], "web");
    assert_eq!(
        m["labels"]["bulkhead.io/instance"],
        pod::instance_label("ns:team-a:web")
    );
    assert_eq!(m["annotations"]["bulkhead.io/instance-id"], "ns:team-a:web");
    let spec = &body["spec"];
    assert_eq!(spec["restartPolicy"], "Never");
    assert_eq!(spec["terminationGracePeriodSeconds"], 7);
    let c = &spec["containers"][0];
    assert_eq!(c["name"], "main");
    assert_eq!(c["image"], "busybox:1.36");
    assert_eq!(c["args"], json!(["sh", "-c", "echo hi; sleep 60"]));
    assert!(c.get("command").is_none(), "the image's entrypoint stays");
    assert_eq!(
        c["resources"]["limits"],
        json!({"cpu": "500m", "memory": "268435456"})
    );
    assert_eq!(
        c["resources"]["requests"],
        json!({"cpu": "100m", "memory": "67108864"})
    );
    let probe = &c["readinessProbe"];
    assert_eq!(probe["httpGet"]["path"], "/health");
    assert_eq!(probe["httpGet"]["port"], 8080, "the instance's $PORT");
    assert_eq!(probe["periodSeconds"], 2);
    assert_eq!(probe["failureThreshold"], 4);
    let env: Vec<&str> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        env.contains(&"PORT") && env.contains(&"GREETING"),
        "{env:?}"
    );
    assert!(
        !env.contains(&"PATH"),
        "the daemon's PATH stays out: {env:?}"
    );

    // One watch on the daemon's label, for every Pod of the namespace.
    let watch = api
        .wait_request(|r| r.param("watch").as_deref() == Some("true"))
        .await;
    assert_eq!(watch.path, "/api/v1/namespaces/default/pods");
    assert_eq!(
        watch.param("labelSelector").as_deref(),
        Some(format!("bulkhead.io/daemon={DAEMON}").as_str())
    );

    // Terminate: a delete with the manifest's grace; wait resolves once the Pod is gone.
    let h = spawned.handle;
    assert_eq!(h.pid(), None);
    let st = within("stop", h.stop(Signal::TERM, Duration::from_secs(30))).await;
    assert_eq!(
        st,
        ExitStatus::Signaled {
            signal: 15,
            core_dumped: false
        }
    );
    let del = api.wait_request(|r| r.method == "DELETE").await;
    assert_eq!(del.path, format!("/api/v1/namespaces/default/pods/{name}"));
    assert_eq!(del.body.unwrap()["gracePeriodSeconds"], 7);
    assert!(api.pod("default", &name).is_none());
}

#[tokio::test]
async fn a_second_instance_shares_the_one_watch_of_its_namespace() {
    let api = FakeApi::new();
    api.autostart.store(true, Ordering::SeqCst);
    let driver = KubernetesDriver::with_client(DAEMON, api.client());
    within("spawn", driver.spawn(spec("ns:a:web", BASIC)))
        .await
        .unwrap();
    within("spawn", driver.spawn(spec("ns:b:web", BASIC)))
        .await
        .unwrap();
    let watches = api
        .requests()
        .iter()
        .filter(|r| r.param("watch").as_deref() == Some("true"))
        .count();
    assert_eq!(watches, 1, "{:#?}", api.requests());
}

#[tokio::test]
async fn a_pod_going_ready_is_reported_through_engine_readiness() {
    let api = FakeApi::new();
    let driver = KubernetesDriver::with_client(DAEMON, api.client());
    let s = spec(
        "ns:a:web",
        "driver: kubernetes\nkubernetes: {image: busybox:1.36}\nreadiness: {tcp: {}}\n",
    );
    // Replay only up to "running, not Ready": the spawn returns on the start.
    let name = pod_name("ns:a:web");
    let events = fixture("ready.jsonl", &name, "default", DAEMON);
    let replay = {
        let api = api.clone();
        let events = events.clone();
        async move {
            api.wait_request(|r| r.method == "POST").await;
            api.emit("default", events[0].clone());
            api.emit("default", events[1].clone());
        }
    };
    let (spawned, ()) = tokio::join!(driver.spawn(s), replay);
    let h = spawned.unwrap().handle;
    let mut ready = h.engine_readiness().expect("the Pod's Ready condition");
    assert!(!*ready.borrow(), "running but not Ready yet");
    api.emit("default", events[2].clone());
    within("ready", ready.wait_for(|r| *r)).await.unwrap();
    // Without a readiness section the daemon is told nothing (ready when started).
    let api2 = FakeApi::new();
    api2.autostart.store(true, Ordering::SeqCst);
    let d2 = KubernetesDriver::with_client(DAEMON, api2.client());
    let h2 = within("spawn", d2.spawn(spec("ns:a:web", BASIC)))
        .await
        .unwrap()
        .handle;
    assert!(h2.engine_readiness().is_none());
}

#[tokio::test]
async fn exit_137_with_oomkilled_is_an_oom_kill_and_the_pod_is_deleted() {
    let api = FakeApi::new();
    let driver = KubernetesDriver::with_client(DAEMON, api.client());
    let s = spec(
        "ns:a:web",
        "driver: kubernetes\nkubernetes: {image: busybox:1.36}\nresources: {memory: 64Mi}\n",
    );
    let h = spawn_replaying(&api, &driver, s, "oom.jsonl")
        .await
        .unwrap()
        .handle;
    let st = within("wait", h.wait()).await;
    assert_eq!(
        st,
        ExitStatus::Signaled {
            signal: 9,
            core_dumped: false
        }
    );
    assert_eq!(
        h.exit_cause(),
        Some(ExitCause::OomKilled {
            limit_bytes: Some(64 << 20)
        })
    );
    // The finished Pod was deleted by the driver (and wait waited for it to go).
    let del = api.wait_request(|r| r.method == "DELETE").await;
    assert_eq!(del.body.unwrap()["gracePeriodSeconds"], 1);
    assert!(api.pod("default", &pod_name("ns:a:web")).is_none());
}

#[tokio::test]
async fn a_crash_keeps_its_exit_code_and_is_no_oom_kill() {
    let api = FakeApi::new();
    let driver = KubernetesDriver::with_client(DAEMON, api.client());
    let h = spawn_replaying(&api, &driver, spec("ns:a:web", BASIC), "crash.jsonl")
        .await
        .unwrap()
        .handle;
    assert_eq!(
        within("wait", h.wait()).await,
        ExitStatus::Exited { code: 3 }
    );
    assert_eq!(h.exit_cause(), None);
}

#[tokio::test]
async fn an_evicted_pod_ends_killed_with_the_nodes_message() {
    let api = FakeApi::new();
    let driver = KubernetesDriver::with_client(DAEMON, api.client());
    let s = spec("ns:a:web", BASIC);
    let name = pod_name("ns:a:web");
    let replay = {
        let api = api.clone();
        async move {
            api.wait_request(|r| r.method == "POST").await;
            for ev in fixture("evicted.jsonl", &name, "default", DAEMON) {
                api.emit("default", ev);
            }
        }
    };
    let (h, ()) = tokio::join!(driver.spawn_pod(s), replay);
    let h = h.unwrap();
    assert_eq!(
        within("wait", bulkhead_driver::InstanceHandle::wait(&*h)).await,
        ExitStatus::Signaled {
            signal: 9,
            core_dumped: false
        }
    );
    assert_eq!(
        bulkhead_driver::InstanceHandle::exit_cause(&*h),
        None,
        "an eviction is not an OOM kill"
    );
    let msg = h.evicted().expect("the eviction is kept");
    assert!(
        msg.contains("The node was low on resource: memory"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_spawn_abandoned_while_its_pod_starts_deletes_the_pod() {
    let api = FakeApi::new();
    let driver = KubernetesDriver::with_client(DAEMON, api.client());
    let spawn = driver.spawn(spec("ns:a:web", BASIC));
    let abandoned = async {
        api.wait_request(|r| r.method == "POST").await;
    };
    tokio::select! {
        _ = spawn => panic!("the spawn cannot finish: nothing starts the container"),
        () = abandoned => {}
    }
    // The spawn future is dropped here, with its Pod created and not started.
    let del = api.wait_request(|r| r.method == "DELETE").await;
    assert!(del.path.ends_with(&pod_name("ns:a:web")));
}

#[tokio::test]
async fn a_pod_that_does_not_start_in_time_fails_the_spawn() {
    let api = FakeApi::new();
    let driver = KubernetesDriver::with_client(DAEMON, api.client());
    let m = "driver: kubernetes\nkubernetes: {image: b, start_timeout: 200ms}\n";
    let err = within("spawn", driver.spawn(spec("ns:a:web", m)))
        .await
        .err()
        .expect("no start");
    assert!(err.to_string().contains("did not start within"), "{err}");
    assert!(api.requests().iter().any(|r| r.method == "DELETE"));
}

#[tokio::test]
async fn a_410_gone_relists_and_a_pod_deleted_meanwhile_is_reported_gone() {
    let api = FakeApi::new();
    api.autostart.store(true, Ordering::SeqCst);
    let driver = KubernetesDriver::with_client(DAEMON, api.client());
    let h = within("spawn", driver.spawn(spec("ns:a:web", BASIC)))
        .await
        .unwrap()
        .handle;
    let name = pod_name("ns:a:web");
    let lists_before = api
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.param("watch").is_none() && !r.path.ends_with(&name))
        .count();
    // The Pod vanishes while the watch is broken, then the API says 410 Gone.
    api.remove_silently("default", &name);
    for ev in fixture("gone.jsonl", &name, "default", DAEMON) {
        api.emit("default", ev);
    }
    let st = within("wait after relist", h.wait()).await;
    assert_eq!(
        st,
        ExitStatus::Signaled {
            signal: 9,
            core_dumped: false
        }
    );
    let lists_after = api
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.param("watch").is_none() && !r.path.ends_with(&name))
        .count();
    assert!(lists_after > lists_before, "the watcher relisted");
    api.wait_request(|r| r.method == "GET" && r.path.ends_with(&format!("/pods/{name}")))
        .await;
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_fails_the_spawn_and_leaves_no_pod() {
    let api = FakeApi::new();
    let driver = KubernetesDriver::with_client(DAEMON, api.client());
    let err = spawn_replaying(&api, &driver, spec("ns:a:web", BASIC), "pull-error.jsonl")
        .await
        .err()
        .expect("spawn fails");
    assert!(err.to_string().contains("ErrImagePull"), "{err}");
    assert!(api.requests().iter().any(|r| r.method == "DELETE"));
    assert!(api.pod("default", &pod_name("ns:a:web")).is_none());
}

#[tokio::test]
async fn a_key_whose_pod_still_exists_is_refused_not_run_twice() {
    let api = FakeApi::new();
    let driver = KubernetesDriver::with_client(DAEMON, api.client());
    let name = pod_name("ns:a:web");
    api.insert(json!({"metadata": {"name": name, "namespace": "default",
        "labels": {"bulkhead.io/daemon": DAEMON}}, "spec": {"containers": []}}));
    let err = within("spawn", driver.spawn(spec("ns:a:web", BASIC)))
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("already exists"), "{err}");
}

#[derive(Default)]
struct Seen(Mutex<Vec<u8>>, Mutex<bool>);
impl OutputSink for Seen {
    fn write(&self, _: Stream, data: &[u8]) {
        self.0.lock().unwrap().extend_from_slice(data);
    }
    fn close(&self, _: Stream) {
        *self.1.lock().unwrap() = true;
    }
}

#[tokio::test]
async fn logs_are_followed_from_the_log_api_into_the_tap() {
    let api = FakeApi::new();
    api.autostart.store(true, Ordering::SeqCst);
    let name = pod_name("ns:a:web");
    api.set_log(&name, b"hello from the pod\n");
    let driver = KubernetesDriver::with_client(DAEMON, api.client());
    let spawned = within("spawn", driver.spawn(spec("ns:a:web", BASIC)))
        .await
        .unwrap();
    let seen = Arc::new(Seen::default());
    spawned.tap.as_ref().unwrap().connect(seen.clone());
    let log = api
        .wait_request(|r| r.path.ends_with(&format!("/pods/{name}/log")))
        .await;
    assert_eq!(log.param("follow").as_deref(), Some("true"));
    assert_eq!(log.param("container").as_deref(), Some("main"));
    within("log", async {
        while !seen.0.lock().unwrap().ends_with(b"hello from the pod\n") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // The stream ends with the container: the tap closes.
    within(
        "stop",
        spawned.handle.stop(Signal::TERM, Duration::from_secs(5)),
    )
    .await;
    within("close", async {
        while !*seen.1.lock().unwrap() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn recovery_finds_this_daemons_pods_by_label_and_discard_deletes_them() {
    let api = FakeApi::new();
    api.autostart.store(true, Ordering::SeqCst);
    // A Pod of this daemon (made by an earlier driver) and one of another daemon.
    let before = KubernetesDriver::with_client(DAEMON, api.client());
    within("spawn", before.spawn(spec("ns:a:web", BASIC)))
        .await
        .unwrap();
    let other = KubernetesDriver::with_client("fedcba9876543210", api.client());
    within("spawn", other.spawn(spec("ns:a:web", BASIC)))
        .await
        .unwrap();
    drop(before);

    let driver = KubernetesDriver::with_client(DAEMON, api.client());
    let found = within("recover", driver.recover()).await.unwrap();
    assert_eq!(found.len(), 1);
    let f = found.into_iter().next().unwrap();
    assert_eq!(f.instance.as_str(), "ns:a:web");
    assert_eq!(f.process, None);
    assert!(f.describe.contains(&pod_name("ns:a:web")), "{}", f.describe);
    assert!(f.env.iter().any(|(k, v)| k == "GREETING" && v == "hello"));
    assert_eq!(f.exit, None, "it still runs");
    let list = api
        .requests()
        .into_iter()
        .find(|r| r.path == "/api/v1/pods")
        .expect("a cluster-wide list");
    assert_eq!(
        list.param("labelSelector").as_deref(),
        Some(format!("bulkhead.io/daemon={DAEMON}").as_str())
    );
    within("discard", driver.discard(f)).await;
    assert!(api.pod("default", &pod_name("ns:a:web")).is_none());
    assert!(
        api.pod(
            "default",
            &pod::pod_name("fedcba9876543210", "ns:a:web", "web")
        )
        .is_some(),
        "another daemon's Pod is never touched"
    );
}

#[tokio::test]
async fn without_a_cluster_a_launch_fails_with_the_reason() {
    let driver = KubernetesDriver::new(
        DAEMON,
        bulkhead_kubernetes::ClusterConfig {
            kubeconfig: Some("/nonexistent/kubeconfig".into()),
            ..Default::default()
        },
    );
    let err = driver.spawn(spec("ns:a:web", BASIC)).await.err().unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("kubernetes driver") && msg.contains("/nonexistent/kubeconfig"),
        "{msg}"
    );
    let err = driver.recover().await.err().unwrap();
    assert!(err.to_string().contains("kubernetes driver"), "{err}");
}

#[tokio::test]
async fn a_signal_other_than_term_or_kill_is_refused() {
    let api = FakeApi::new();
    api.autostart.store(true, Ordering::SeqCst);
    let driver = KubernetesDriver::with_client(DAEMON, api.client());
    let h = within("spawn", driver.spawn(spec("ns:a:web", BASIC)))
        .await
        .unwrap()
        .handle;
    let e = h.signal(Signal::parse("HUP").unwrap()).unwrap_err();
    assert_eq!(e.source.kind(), std::io::ErrorKind::Unsupported);
    h.signal(Signal::KILL).unwrap();
    assert_eq!(
        within("wait", h.wait()).await,
        ExitStatus::Signaled {
            signal: 15,
            core_dumped: false
        },
        "the fake kubelet ends a deleted container with 143"
    );
    let del = api.wait_request(|r| r.method == "DELETE").await;
    assert_eq!(del.body.unwrap()["gracePeriodSeconds"], 1);
}

#[tokio::test]
async fn usage_comes_from_the_metrics_api_where_it_is_served() {
    let api = FakeApi::new();
    api.autostart.store(true, Ordering::SeqCst);
    let name = pod_name("ns:a:web");
    api.set_memory(&name, "2048Ki");
    let driver = KubernetesDriver::with_client(DAEMON, api.client());
    let s = spec(
        "ns:a:web",
        "driver: kubernetes\nkubernetes: {image: b}\nresources: {memory: 64Mi}\n",
    );
    let h = within("spawn", driver.spawn(s)).await.unwrap().handle;
    let first = h.stats().unwrap();
    assert_eq!(first.memory_limit_bytes, Some(64 << 20));
    within("usage", async {
        while h.stats().unwrap().memory_bytes != 2048 * 1024 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    api.wait_request(|r| {
        r.path == format!("/apis/metrics.k8s.io/v1beta1/namespaces/default/pods/{name}")
    })
    .await;
}

#[tokio::test]
async fn without_a_metrics_server_usage_is_zero_and_not_asked_again_at_once() {
    let api = FakeApi::new();
    api.autostart.store(true, Ordering::SeqCst);
    let driver = KubernetesDriver::with_client(DAEMON, api.client());
    let a = within("spawn", driver.spawn(spec("ns:a:web", BASIC)))
        .await
        .unwrap()
        .handle;
    let b = within("spawn", driver.spawn(spec("ns:b:web", BASIC)))
        .await
        .unwrap()
        .handle;
    assert_eq!(a.stats().unwrap().memory_bytes, 0);
    api.wait_request(|r| r.path.starts_with("/apis/metrics.k8s.io/"))
        .await;
    // Let the answer land, then ask again for both Pods: the driver remembers.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..5 {
        assert_eq!(a.stats().unwrap().memory_bytes, 0);
        assert_eq!(b.stats().unwrap().memory_bytes, 0);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let asked = api
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/apis/metrics.k8s.io/"))
        .count();
    assert_eq!(asked, 1, "{:#?}", api.requests());
}

#[tokio::test]
async fn a_broken_log_stream_is_followed_again_from_a_little_before_its_last_byte() {
    let api = FakeApi::new();
    api.autostart.store(true, Ordering::SeqCst);
    let name = pod_name("ns:a:web");
    api.set_log(&name, b"one\n");
    let driver = KubernetesDriver::with_client(DAEMON, api.client());
    let spawned = within("spawn", driver.spawn(spec("ns:a:web", BASIC)))
        .await
        .unwrap();
    let seen = Arc::new(Seen::default());
    spawned.tap.as_ref().unwrap().connect(seen.clone());
    let log_path = format!("/api/v1/namespaces/default/pods/{name}/log");
    let first = api.wait_request(|r| r.path == log_path).await;
    assert_eq!(
        first.param("sinceSeconds"),
        None,
        "a new Pod's log from its start"
    );
    within("first line", async {
        while !seen.0.lock().unwrap().ends_with(b"one\n") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    api.break_logs(&name);
    let again = api
        .wait_request(|r| r.path == log_path && r.param("sinceSeconds").is_some())
        .await;
    let since: i64 = again.param("sinceSeconds").unwrap().parse().unwrap();
    assert!(since >= 1, "{since}");
    assert!(
        !*seen.1.lock().unwrap(),
        "the tap stays open while the Pod runs"
    );
}

#[tokio::test]
async fn a_namespace_per_bulkhead_namespace_gets_its_own_watch() {
    let api = FakeApi::new();
    api.autostart.store(true, Ordering::SeqCst);
    let driver = KubernetesDriver::with_client(DAEMON, api.client());
    let m = "driver: kubernetes\nkubernetes: {image: b, namespace: \"bh-${BULKHEAD_NAMESPACE}\"}\n";
    within("spawn", driver.spawn(spec("ns:team-a:web", m)))
        .await
        .unwrap();
    let post = api.wait_request(|r| r.method == "POST").await;
    assert_eq!(post.path, "/api/v1/namespaces/bh-team-a/pods");
    api.wait_request(|r| {
        r.path == "/api/v1/namespaces/bh-team-a/pods" && r.param("watch").as_deref() == Some("true")
    })
    .await;
}

#[tokio::test]
async fn recovery_without_cluster_wide_list_rights_looks_in_the_default_namespace() {
    let api = FakeApi::new();
    api.autostart.store(true, Ordering::SeqCst);
    let before = KubernetesDriver::with_client(DAEMON, api.client());
    within("spawn", before.spawn(spec("ns:a:web", BASIC)))
        .await
        .unwrap();
    drop(before);
    api.forbid_cluster_list.store(true, Ordering::SeqCst);
    let driver = KubernetesDriver::with_client(DAEMON, api.client());
    let found = within("recover", driver.recover()).await.unwrap();
    assert_eq!(found.len(), 1);
    assert!(api
        .requests()
        .iter()
        .any(|r| r.path == "/api/v1/namespaces/default/pods"
            && r.param("watch").is_none()
            && r.param("labelSelector").as_deref()
                == Some(&*format!("bulkhead.io/daemon={DAEMON}"))));
    // An adopted Pod's log is followed from now, not replayed from its start.
    let name = pod_name("ns:a:web");
    let log = api
        .wait_request(|r| {
            r.path.ends_with(&format!("/pods/{name}/log")) && r.param("sinceSeconds").is_some()
        })
        .await;
    let since: i64 = log.param("sinceSeconds").unwrap().parse().unwrap();
    assert!(since >= 1, "{since}");
}

#[tokio::test]
async fn a_pod_that_ended_while_no_daemon_watched_is_found_with_its_exit() {
    let api = FakeApi::new();
    api.autostart.store(true, Ordering::SeqCst);
    let before = KubernetesDriver::with_client(DAEMON, api.client());
    within("spawn", before.spawn(spec("ns:a:web", BASIC)))
        .await
        .unwrap();
    drop(before);
    // It crashed with 3 while no daemon ran.
    let name = pod_name("ns:a:web");
    let mut p = api.pod("default", &name).unwrap();
    p["status"]["phase"] = json!("Failed");
    p["status"]["containerStatuses"][0]["state"] =
        json!({"terminated": {"exitCode": 3, "reason": "Error"}});
    api.emit("default", json!({"type": "MODIFIED", "object": p}));

    let driver = KubernetesDriver::with_client(DAEMON, api.client());
    let found = within("recover", driver.recover()).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].exit, Some(ExitStatus::Exited { code: 3 }));
}

#[tokio::test]
async fn a_labelled_pod_without_an_instance_id_is_deleted_at_recovery() {
    let api = FakeApi::new();
    api.insert(json!({"metadata": {"name": "stray", "namespace": "default",
        "labels": {"bulkhead.io/daemon": DAEMON}}, "spec": {"containers": [{"name": "main"}]}}));
    let driver = KubernetesDriver::with_client(DAEMON, api.client());
    let found = within("recover", driver.recover()).await.unwrap();
    assert!(found.is_empty());
    let del = api.wait_request(|r| r.method == "DELETE").await;
    assert_eq!(del.path, "/api/v1/namespaces/default/pods/stray");
}

#[tokio::test(start_paused = true)]
async fn an_api_server_that_does_not_answer_does_not_hold_recovery() {
    // A service that takes every request and never answers.
    let (svc, mut handle) =
        tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<fake::Body>>();
    let held = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Some(r) = handle.next_request().await {
            kept.push(r);
        }
    });
    let driver = KubernetesDriver::with_client(DAEMON, kube::Client::new(svc, "default"));
    let err = driver.recover().await.err().expect("no answer is an error");
    assert!(err.to_string().contains("did not answer"), "{err}");
    held.abort();
}

#[tokio::test]
async fn a_finished_pod_is_deleted_only_after_its_log_was_read() {
    let api = FakeApi::new();
    let name = pod_name("ns:a:web");
    api.set_log(&name, b"last words\n");
    let driver = KubernetesDriver::with_client(DAEMON, api.client());
    let spawned = spawn_replaying(&api, &driver, spec("ns:a:web", BASIC), "crash.jsonl")
        .await
        .unwrap();
    let seen = Arc::new(Seen::default());
    spawned.tap.as_ref().unwrap().connect(seen.clone());
    assert_eq!(
        within("wait", spawned.handle.wait()).await,
        ExitStatus::Exited { code: 3 }
    );
    let reqs = api.requests();
    let log = reqs
        .iter()
        .position(|r| r.path.ends_with("/log"))
        .expect("a log request");
    let del = reqs
        .iter()
        .position(|r| r.method == "DELETE")
        .expect("a delete");
    assert!(
        log < del,
        "the log was asked for before the delete: {reqs:#?}"
    );
    within("log", async {
        while !*seen.1.lock().unwrap() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(*seen.0.lock().unwrap(), b"last words\n");
}
