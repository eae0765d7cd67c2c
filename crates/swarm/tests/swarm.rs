//! The swarm driver's own behaviour on the real swarm of `.ci/setup-swarm.sh`: services
//! and labels, readiness from the health check, crashes seen in the task state, recovery
//! by label, spawn errors. Each test prints why it skips when the swarm is missing.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bollard::query_parameters::{KillContainerOptions, ListServicesOptions};
use bulkhead_core::event::ExitStatus;
use bulkhead_core::signal::Signal;
use bulkhead_driver::conformance::{within, Fixture};
use bulkhead_driver::{Driver, Spawned};
use bulkhead_swarm::SwarmDriver;

macro_rules! swarm_or_skip {
    ($tag:expr) => {
        match common::driver($tag).await {
            Ok(d) => d,
            Err(why) => {
                eprintln!("skipped: {why}");
                return;
            }
        }
    };
}

/// This daemon's services: (name, instance label).
async fn services(d: &SwarmDriver, daemon: &str) -> Vec<(String, String)> {
    let c = d.client().await.unwrap();
    let filters = HashMap::from([(
        "label".to_owned(),
        vec![format!("bulkhead.daemon={daemon}")],
    )]);
    c.list_services(Some(ListServicesOptions {
        filters: Some(filters),
        status: None,
    }))
    .await
    .unwrap()
    .into_iter()
    .map(|s| {
        let spec = s.spec.unwrap();
        (
            spec.name.unwrap(),
            spec.labels.unwrap()["bulkhead.instance"].clone(),
        )
    })
    .collect()
}

fn daemon_of(tag: &str) -> String {
    format!("t{tag}{}", std::process::id())
}

async fn spawn(d: &SwarmDriver, fx: &Fixture, name: &str, script: &str) -> Spawned {
    let spec = fx.spawn_spec(name, script);
    within(format!("spawn of {name}"), d.spawn(spec))
        .await
        .unwrap_or_else(|e| panic!("spawn of {name}: {e}"))
}

/// The task's node engine and container, as the driver knows them.
async fn container_of(d: &SwarmDriver, instance: &str) -> (bollard::Docker, String) {
    let (addr, container) = d
        .locate(instance)
        .unwrap_or_else(|| panic!("the node of {instance} is not reachable"));
    let node = bollard::Docker::connect_with_host(&addr)
        .unwrap()
        .negotiate_version()
        .await
        .unwrap();
    (node, container)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_is_one_labelled_service_that_its_stop_removes() {
    let d = swarm_or_skip!("svc");
    let fx = common::fixture();
    let run = spawn(&d, &fx, "svc", "exec sleep 1000").await;
    let list = services(&d, &daemon_of("svc")).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].1, "ns:conformance:svc");
    let st = within(
        "stop",
        run.handle.stop(Signal::TERM, Duration::from_secs(10)),
    )
    .await;
    assert_eq!(
        st,
        ExitStatus::Signaled {
            signal: 15,
            core_dumped: false
        }
    );
    assert!(
        services(&d, &daemon_of("svc")).await.is_empty(),
        "the stop left its service"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_follows_the_tasks_health_check() {
    let d = swarm_or_skip!("ready");
    let mut fx = common::fixture();
    fx.manifest_extra.push_str(
        "readiness:\n  timeout: 30s\n  exec: {command: [test, -f, /tmp/ok], period: 200ms}\n",
    );
    let run = spawn(&d, &fx, "ready", "sleep 1; touch /tmp/ok; exec sleep 1000").await;
    let mut ready = run
        .handle
        .engine_readiness()
        .expect("the driver judges readiness");
    assert!(!*ready.borrow(), "ready before the health check passed");
    within("readiness", ready.wait_for(|r| *r)).await.unwrap();
    run.handle.stop(Signal::KILL, Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_container_is_a_crash_with_its_signal_and_leaves_no_service() {
    let d = swarm_or_skip!("kill");
    let fx = common::fixture();
    let run = spawn(&d, &fx, "kill", "exec sleep 1000").await;
    let (node, container) = container_of(&d, "ns:conformance:kill").await;
    node.kill_container(
        &container,
        Some(KillContainerOptions {
            signal: "KILL".into(),
        }),
    )
    .await
    .unwrap();
    let st = within("the crash to be seen", run.handle.wait()).await;
    assert_eq!(
        st,
        ExitStatus::Signaled {
            signal: 9,
            core_dumped: false
        }
    );
    assert!(services(&d, &daemon_of("kill")).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn recovery_finds_this_daemons_services_by_label_and_discard_removes_them() {
    let first = swarm_or_skip!("recover");
    let fx = common::fixture();
    let running = spawn(&first, &fx, "rec-run", "exec sleep 1000").await;
    let ended = spawn(&first, &fx, "rec-end", "sleep 0.5; exit 3").await;
    // The daemon dies: its driver and handles go, the services stay.
    drop(running);
    drop(ended);
    drop(first);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let other = common::driver("recother").await.unwrap();
    assert!(
        other.recover().await.unwrap().is_empty(),
        "another daemon's services were found"
    );
    let next = SwarmDriver::new(&daemon_of("recover"), &common::host());
    let mut found = next.recover().await.unwrap();
    found.sort_by(|a, b| a.instance.as_str().cmp(b.instance.as_str()));
    let what: Vec<(String, Option<ExitStatus>)> = found
        .iter()
        .map(|f| (f.instance.as_str().to_owned(), f.exit))
        .collect();
    assert_eq!(
        what,
        [
            (
                "ns:conformance:rec-end".to_owned(),
                Some(ExitStatus::Exited { code: 3 })
            ),
            ("ns:conformance:rec-run".to_owned(), None),
        ]
    );
    for f in found {
        next.discard(f).await;
    }
    assert!(services(&next, &daemon_of("recover")).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_no_node_has_is_a_spawn_error_and_leaves_no_service() {
    let d = swarm_or_skip!("noimage");
    let mut fx = common::fixture();
    fx.manifest_extra = "driver: swarm\nswarm:\n  image: bulkhead-test/no-such-image:1\n".into();
    let spec = fx.spawn_spec("noimage", "exit 0");
    match within("spawn", d.spawn(spec)).await {
        Err(e @ bulkhead_driver::SpawnError::Image { .. }) => {
            assert!(e.to_string().contains("did not start"), "{e}")
        }
        Err(e) => panic!("expected an image error, got {e:?}"),
        Ok(s) => panic!("spawned; ended with {}", s.handle.wait().await),
    }
    assert!(services(&d, &daemon_of("noimage")).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_runs_in_the_tasks_container_on_its_node_with_the_real_exit_code() {
    let d = swarm_or_skip!("exec");
    let fx = common::fixture();
    let run = spawn(&d, &fx, "exec", "exec sleep 1000").await;
    let req = bulkhead_driver::ExecRequest {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "echo in-$HOSTNAME; test -x /bin/busybox && exit 7".into(),
        ],
        env: Vec::new(),
        tty: None,
    };
    let mut ex = within("exec", run.handle.engine_exec(req))
        .await
        .expect("the driver runs exec through the engine")
        .unwrap();
    let mut out = Vec::new();
    while let Some((_, chunk)) = within("exec output", ex.output.recv()).await {
        out.extend(chunk);
    }
    let st = within("exec status", ex.status).await.unwrap();
    assert_eq!(st, ExitStatus::Exited { code: 7 });
    assert!(String::from_utf8_lossy(&out).starts_with("in-"), "{out:?}");
    run.handle.stop(Signal::KILL, Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_and_http_probes_run_inside_the_task() {
    let d = swarm_or_skip!("probes");
    for (name, probe) in [
        ("tcp", "tcp: {port: 8080, period: 200ms}"),
        (
            "http",
            "http: {port: 8080, path: /index.html, period: 200ms}",
        ),
    ] {
        let mut fx = common::fixture();
        fx.manifest_extra
            .push_str(&format!("readiness:\n  timeout: 30s\n  {probe}\n"));
        let script = "mkdir -p /tmp/w && echo ok > /tmp/w/index.html && sleep 1 && \
                      exec httpd -f -p 8080 -h /tmp/w";
        let run = spawn(&d, &fx, &format!("probe-{name}"), script).await;
        let mut ready = run.handle.engine_readiness().unwrap();
        assert!(!*ready.borrow(), "{name}: ready before the server listens");
        within(format!("{name} readiness"), ready.wait_for(|r| *r))
            .await
            .unwrap();
        run.handle.stop(Signal::KILL, Duration::ZERO).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_way_to_the_node_a_stop_removes_the_service_and_the_engine_signals() {
    let d = swarm_or_skip!("nonode").without_node_engines();
    let mut fx = common::fixture();
    fx.manifest_extra.push_str("shutdown: {grace: 1s}\n");
    // A graceful program ends on the service's stop signal ...
    let run = spawn(&d, &fx, "nonode-term", "exec sleep 1000").await;
    let st = within(
        "stop",
        run.handle.stop(Signal::TERM, Duration::from_secs(10)),
    )
    .await;
    assert_eq!(
        st,
        ExitStatus::Signaled {
            signal: 15,
            core_dumped: false
        }
    );
    // ... one that ignores it is killed by the engine after the manifest's grace.
    let script = "trap '' TERM; : > nonode.ready; while :; do sleep 0.05; done";
    let run = spawn(&d, &fx, "nonode-kill", script).await;
    let ready = fx.path("nonode.ready");
    within("the trap", async {
        while !ready.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let st = within(
        "stop",
        run.handle.stop(Signal::TERM, Duration::from_secs(10)),
    )
    .await;
    assert_eq!(
        st,
        ExitStatus::Signaled {
            signal: 9,
            core_dumped: false
        }
    );
    assert!(services(&d, &daemon_of("nonode")).await.is_empty());
    // exec says why it cannot run.
    let run = spawn(&d, &fx, "nonode-exec", "exec sleep 1000").await;
    let req = bulkhead_driver::ExecRequest {
        argv: vec!["true".into()],
        env: Vec::new(),
        tty: None,
    };
    match run.handle.engine_exec(req).await {
        Some(Err(e)) => assert!(e.to_string().contains("cannot be reached"), "{e}"),
        Some(Ok(_)) => panic!("exec ran without a way to the node"),
        None => panic!("exec would run on the host"),
    }
    run.handle.stop(Signal::KILL, Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_that_turns_unhealthy_is_stopped_by_the_engine() {
    let d = swarm_or_skip!("unhealthy");
    let mut fx = common::fixture();
    fx.manifest_extra.push_str(
        "readiness:\n  timeout: 30s\n  exec: {command: [test, -f, /tmp/ok], period: 200ms, failure_threshold: 1}\n",
    );
    let script = "touch /tmp/ok; sleep 2; rm /tmp/ok; exec sleep 1000";
    let run = spawn(&d, &fx, "unhealthy", script).await;
    let mut ready = run.handle.engine_readiness().unwrap();
    within("readiness", ready.wait_for(|r| *r)).await.unwrap();
    // The check fails once the marker is gone: the engine stops the task with the
    // service's stop signal (SIGTERM; `exec sleep` under the init ends on it).
    let st = within("the engine's stop", run.handle.wait()).await;
    assert_eq!(
        st,
        ExitStatus::Signaled {
            signal: 15,
            core_dumped: false
        }
    );
    assert!(!*ready.borrow(), "still ready after the end");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_resources_are_the_task_containers_limits_on_its_node() {
    let d = swarm_or_skip!("limits");
    let mut fx = common::fixture();
    fx.manifest_extra
        .push_str("resources: {memory: 32Mi, cpu: 0.5, pids: 50}\n");
    let run = spawn(&d, &fx, "limits", "exec sleep 1000").await;
    let (node, container) = container_of(&d, "ns:conformance:limits").await;
    let host = node
        .inspect_container(
            &container,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .unwrap()
        .host_config
        .unwrap();
    assert_eq!(host.memory, Some(32 << 20));
    assert_eq!(host.nano_cpus, Some(500_000_000));
    assert_eq!(host.pids_limit, Some(50));
    let stats = run.handle.stats().unwrap();
    assert_eq!(stats.memory_limit_bytes, Some(32 << 20));
    run.handle.stop(Signal::KILL, Duration::ZERO).await;
}
