//! Warm slots of the docker driver against the real engine: the conformance suite on
//! instances spawned from slots (`WarmFirst`), what a hand-over passes on, discard and
//! recovery. Each test prints why it skips without an engine or the test image (run
//! `.ci/setup-docker.sh`).

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use bollard::query_parameters::InspectContainerOptions;
use bulkhead_core::event::ExitStatus;
use bulkhead_core::signal::Signal;
use bulkhead_docker::{DockerDriver, Engine};
use bulkhead_driver::conformance::{read_all, within, DriverUnderTest, Fixture, WarmFirst};
use bulkhead_driver::warm::WarmSpec;
use bulkhead_driver::{Bind, Driver, ExecRequest, SpawnError, SpawnSpec};

const IMAGE: &str = "bulkhead-test/busybox:latest";

/// Why the engine or the test image cannot be used here.
async fn unusable(engine: &Arc<Engine>) -> Option<String> {
    match engine.ensure().await {
        Err(e) => Some(e.to_string()),
        Ok(client) => match client.inspect_image(IMAGE).await {
            Ok(_) => None,
            Err(e) => Some(format!(
                "test image {IMAGE} missing ({e}); run .ci/setup-docker.sh"
            )),
        },
    }
}

struct Warmed {
    driver: WarmFirst<DockerDriver>,
    skip: Option<String>,
}

impl DriverUnderTest for Warmed {
    fn driver(&self) -> &dyn Driver {
        &self.driver
    }

    fn fixture(&self) -> Fixture {
        let mut fx = Fixture::temp();
        fx.manifest_extra = format!("driver: docker\ndocker:\n  image: {IMAGE}\n");
        fx.bind_workdir = true;
        fx.env_extra = vec!["HOSTNAME".into()];
        fx
    }

    fn skip_reason(&self) -> Option<String> {
        self.skip.clone()
    }
}

async fn warm_docker() -> Warmed {
    let engine = Engine::new(format!("warm-conformance-{}", std::process::id()));
    let skip = unusable(&engine).await;
    Warmed {
        driver: WarmFirst(DockerDriver::new(engine, None)),
        skip,
    }
}

// Every conformance check, each instance spawned from a slot made for it.
bulkhead_driver::conformance_tests!(warm_docker);

/// An engine for one test (its own daemon id), or `None` after printing why not.
async fn engine(test: &str) -> Option<Arc<Engine>> {
    let engine = Engine::new(format!("warm-{test}-{}", std::process::id()));
    match unusable(&engine).await {
        Some(why) => {
            eprintln!("skipped: {why}");
            None
        }
        None => Some(engine),
    }
}

fn fixture(docker: &str) -> Fixture {
    let mut fx = Fixture::temp();
    fx.manifest_extra = format!("driver: docker\ndocker:\n{docker}");
    fx.bind_workdir = true;
    // The container's user may be anyone: it must reach the socket in the slot's folder.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fx.workdir, std::fs::Permissions::from_mode(0o755)).unwrap();
    fx
}

fn warm_spec(spec: &SpawnSpec, slot: &str, port: u16) -> WarmSpec {
    WarmSpec {
        slot: slot.to_owned(),
        spec: spec.spec.clone(),
        cwd: spec.cwd.clone(),
        ids: None,
        binds: spec.binds.clone(),
        port,
    }
}

/// Whether the engine still has container `id`.
async fn exists(engine: &Arc<Engine>, id: &str) -> bool {
    let client = engine.ensure().await.unwrap();
    client
        .inspect_container(id, None::<InspectContainerOptions>)
        .await
        .is_ok()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A slot made before the launch's per-instance files exist (here in a read-only
/// container without capabilities or docker-init) hands over argv and environment exactly, publishes `$PORT` on the host's loopback, and shows what the
/// daemon puts in the slot's folder at the launch (the notify socket).
#[tokio::test(flavor = "multi_thread")]
async fn a_slot_hands_over_argv_env_port_and_notify_socket() {
    let Some(engine) = engine("handover").await else {
        return;
    };
    let driver = DockerDriver::new(engine, None);
    // A hardened container: the init's mount point is made under a read-only root.
    let fx = fixture(&format!(
        "  image: {IMAGE}\n  read_only: true\n  cap_drop: [ALL]\n  init: false\n"
    ));
    let port = free_port();
    let script = "echo \"args=$0|$1 A=$A SPACED=$SPACED\"; \
                  [ -S \"$NOTIFY_SOCKET\" ] && echo notify-visible; \
                  echo served | nc -l -p \"$PORT\"";
    let mut spec = fx.spawn_spec("handover", script);
    spec.argv.extend(["one".to_owned(), "two words".to_owned()]);
    spec.env.push(("A".into(), "1".into()));
    spec.env.push(("SPACED".into(), "a  b".into()));
    spec.env.push(("PORT".into(), port.to_string()));
    let slot = within(
        "prewarm",
        driver.prewarm(warm_spec(&spec, "warm-handover-0", port)),
    )
    .await
    .unwrap();
    assert!(slot.alive(), "a fresh slot is alive");
    // What the daemon makes per launch, after the slot: the notify socket.
    let notify = fx.path("notify.sock");
    let _sock = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    spec.env
        .push(("NOTIFY_SOCKET".into(), notify.display().to_string()));
    spec.binds.push(Bind::same(&notify));
    let mut spawned = within("hand-over", driver.spawn_warm(slot, spec))
        .await
        .unwrap();
    // The port is published on the host's loopback: the program's answer comes back.
    let served = within("the published port", async {
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                if buf.contains("served") {
                    return buf;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(served.trim(), "served");
    let out = within("output", read_all(spawned.stdout.take().unwrap())).await;
    // `sh -c SCRIPT one "two words"`: $0 and $1.
    assert!(
        out.contains("args=one|two words A=1 SPACED=a  b\n"),
        "{out}"
    );
    assert!(out.contains("notify-visible"), "{out}");
    let st = within("exit", spawned.handle.wait()).await;
    assert_eq!(st, ExitStatus::Exited { code: 0 });
}

/// The image's `ENV`, `WORKDIR`, `USER` and `ENTRYPOINT` apply to a program started
/// from a slot as to a cold container (`docker run IMAGE ARGS`), the manifest's `env`
/// on top; `docker.entrypoint: []` clears the entrypoint. An `exec` through the engine
/// sees the handed-over environment.
#[tokio::test(flavor = "multi_thread")]
async fn a_slot_keeps_the_images_env_workdir_user_and_entrypoint() {
    let Some(engine) = engine("image").await else {
        return;
    };
    let tag = format!("bulkhead-test/warm-image-{}:1", std::process::id());
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM {IMAGE}\n\
             RUN mkdir -p /opt/app/bin && printf '#!/bin/sh\\necho \"entry uid=$(id -u) args=$*\"\\nexec \"$@\"\\n' > /entry.sh && chmod 755 /entry.sh \
             && printf '#!/bin/sh\\necho \"app PATH=$PATH HOME=$HOME PWD=$(pwd) MODE=$MODE\"\\n' > /opt/app/bin/myserver && chmod 755 /opt/app/bin/myserver\n\
             ENV PATH=/opt/app/bin:/bin HOME=/opt/app\n\
             WORKDIR /opt/app\n\
             USER 4321\n\
             ENTRYPOINT [\"/entry.sh\"]\n"
        ),
    )
    .unwrap();
    let built = std::process::Command::new("docker")
        .args(["build", "-q", "-t", &tag])
        .arg(ctx.path())
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "docker build: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    struct Rmi(String);
    impl Drop for Rmi {
        fn drop(&mut self) {
            let _ = std::process::Command::new("docker")
                .args(["rmi", "-f", &self.0])
                .output();
        }
    }
    let _rmi = Rmi(tag.clone());
    let driver = DockerDriver::new(engine, None);
    for (name, docker, want) in [
        (
            "kept",
            format!("  image: {tag}\n"),
            "entry uid=4321 args=myserver\napp PATH=/opt/app/bin:/bin HOME=/opt/app PWD=/opt/app MODE=prod\n",
        ),
        (
            "cleared",
            format!("  image: {tag}\n  entrypoint: []\n"),
            "app PATH=/opt/app/bin:/bin HOME=/opt/app PWD=/opt/app MODE=prod\n",
        ),
    ] {
        let fx = fixture(&docker);
        let mut spec = fx.spawn_spec(name, "unused");
        spec.argv = vec!["myserver".into()];
        // The daemon's PATH and HOME are inherited, so the image's apply.
        spec.env.push(("MODE".into(), "prod".into()));
        spec.inherited = vec!["PATH".into(), "HOME".into()];
        // A folder the container does not see: the image's WORKDIR applies.
        spec.cwd = ctx.path().to_owned();
        let slot = within("prewarm", driver.prewarm(warm_spec(&spec, name, 0)))
            .await
            .unwrap();
        let mut spawned = within("hand-over", driver.spawn_warm(slot, spec))
            .await
            .unwrap();
        let out = within("output", read_all(spawned.stdout.take().unwrap())).await;
        assert_eq!(out, want, "{name}");
        assert_eq!(
            within("exit", spawned.handle.wait()).await,
            ExitStatus::Exited { code: 0 }
        );
    }
    // exec through the engine: the handed-over environment, the image's for the rest.
    let fx = fixture(&format!("  image: {IMAGE}\n"));
    let mut spec = fx.spawn_spec("exec-env", "exec sleep 1000");
    spec.env.push(("HANDED".into(), "over".into()));
    let slot = within("prewarm", driver.prewarm(warm_spec(&spec, "exec-env", 0)))
        .await
        .unwrap();
    let spawned = within("hand-over", driver.spawn_warm(slot, spec))
        .await
        .unwrap();
    let mut ex = within(
        "exec",
        spawned.handle.engine_exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "echo HANDED=$HANDED".into()],
            env: vec![],
            tty: None,
        }),
    )
    .await
    .expect("the docker driver execs through the engine")
    .unwrap();
    let mut out = Vec::new();
    while let Some((_, b)) = within("exec output", ex.output.recv()).await {
        out.extend(b);
    }
    assert_eq!(String::from_utf8_lossy(&out), "HANDED=over\n");
    within(
        "stop",
        spawned.handle.stop(Signal::KILL, Duration::from_secs(1)),
    )
    .await;
}

/// A program the image lacks is `SpawnError::Exec` naming it, from the init's exec, and
/// the slot's container is gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_program_fails_the_hand_over_and_removes_the_slot() {
    let Some(engine) = engine("missing").await else {
        return;
    };
    let driver = DockerDriver::new(engine.clone(), None);
    let fx = fixture(&format!("  image: {IMAGE}\n"));
    let mut spec = fx.spawn_spec("missing", "exit 0");
    spec.argv = vec!["no-such-program-here".into()];
    let slot = within("prewarm", driver.prewarm(warm_spec(&spec, "missing", 0)))
        .await
        .unwrap();
    let id = slot
        .into_any()
        .downcast::<bulkhead_docker::DockerSlot>()
        .unwrap();
    let container = id.id().to_owned();
    match within("hand-over", driver.spawn_warm(id, spec)).await {
        Err(SpawnError::Exec { program, source }) => {
            assert_eq!(program, "no-such-program-here");
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound, "{source}");
        }
        Err(e) => panic!("expected an exec error, got {e:?}"),
        Ok(_) => panic!("a missing program started"),
    }
    assert!(!exists(&engine, &container).await, "the slot was removed");
}

/// A slot made for one version of a workload refuses a launch of another (the manifest
/// changed in between): the launch fails, so that the daemon spawns it cold, and the
/// slot's container goes.
#[tokio::test(flavor = "multi_thread")]
async fn a_slot_refuses_a_launch_of_a_changed_manifest() {
    let Some(engine) = engine("changed").await else {
        return;
    };
    let driver = DockerDriver::new(engine.clone(), None);
    let fx = fixture(&format!("  image: {IMAGE}\n"));
    let spec = fx.spawn_spec("changed", "exit 0");
    let slot = within("prewarm", driver.prewarm(warm_spec(&spec, "changed", 0)))
        .await
        .unwrap()
        .into_any()
        .downcast::<bulkhead_docker::DockerSlot>()
        .unwrap();
    let id = slot.id().to_owned();
    let mut changed = spec.clone();
    let mut workload = (*spec.spec).clone();
    workload.resources = Some(bulkhead_core::spec::Resources {
        memory: Some(64 << 20),
        ..Default::default()
    });
    changed.spec = Arc::new(workload);
    match within("hand-over", driver.spawn_warm(slot, changed)).await {
        Err(SpawnError::Invalid { reason, .. }) => {
            assert!(reason.contains("another version"), "{reason}")
        }
        Err(e) => panic!("expected the slot to refuse, got {e:?}"),
        Ok(_) => panic!("a slot took a launch of a changed manifest"),
    }
    assert!(!exists(&engine, &id).await, "the refused slot was removed");
}

/// A discarded slot leaves no container, nor does one dropped without a discard; a slot
/// whose container died is not alive.
#[tokio::test(flavor = "multi_thread")]
async fn a_discarded_slot_leaves_no_container() {
    let Some(engine) = engine("discard").await else {
        return;
    };
    let driver = DockerDriver::new(engine.clone(), None);
    let fx = fixture(&format!("  image: {IMAGE}\n"));
    let spec = fx.spawn_spec("discard", "exit 0");
    let slot = within("prewarm", driver.prewarm(warm_spec(&spec, "discard-0", 0)))
        .await
        .unwrap();
    assert!(slot.memory() > 0, "a slot holds some memory");
    let slot = slot
        .into_any()
        .downcast::<bulkhead_docker::DockerSlot>()
        .unwrap();
    let id = slot.id().to_owned();
    assert!(exists(&engine, &id).await);
    assert!(
        std::fs::read_dir(&fx.workdir).unwrap().next().is_none(),
        "the hand-over socket is gone from the slot's folder once the init connected"
    );
    within("discard", bulkhead_driver::warm::Warm::discard(slot)).await;
    assert!(!exists(&engine, &id).await, "container {id} is left");
    // Killed from outside: no longer alive.
    let slot = within("prewarm", driver.prewarm(warm_spec(&spec, "discard-1", 0)))
        .await
        .unwrap();
    let slot = slot
        .into_any()
        .downcast::<bulkhead_docker::DockerSlot>()
        .unwrap();
    let killed = std::process::Command::new("docker")
        .args(["kill", slot.id()])
        .output()
        .unwrap();
    assert!(killed.status.success());
    within("the slot to die", async {
        while bulkhead_driver::warm::Warm::alive(&*slot) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let id = slot.id().to_owned();
    within("discard", bulkhead_driver::warm::Warm::discard(slot)).await;
    assert!(!exists(&engine, &id).await);
    // Dropped without a discard (a pool that lost it): removed in the background.
    let slot = within("prewarm", driver.prewarm(warm_spec(&spec, "discard-2", 0)))
        .await
        .unwrap()
        .into_any()
        .downcast::<bulkhead_docker::DockerSlot>()
        .unwrap();
    let id = slot.id().to_owned();
    drop(slot);
    within("the dropped slot's removal", async {
        while exists(&engine, &id).await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// After a daemon restart (a new driver on the same daemon id), an unclaimed slot is
/// removed, also one left running by a daemon that never discarded it (killed with -9),
/// and a claimed one is found as its instance's run, with its environment (also for `exec`).
#[tokio::test(flavor = "multi_thread")]
async fn recover_removes_unclaimed_slots_and_finds_claimed_ones() {
    let Some(engine) = engine("recover").await else {
        return;
    };
    let daemon_id = engine.daemon_id().to_owned();
    let old = DockerDriver::new(engine.clone(), None);
    let fx = fixture(&format!("  image: {IMAGE}\n  init: true\n"));
    let mut spec = fx.spawn_spec("claimed", "exec sleep 1000");
    spec.env.push(("MARK".into(), "claimed-run".into()));
    let instance = spec.instance.clone();
    let slot = within("prewarm", old.prewarm(warm_spec(&spec, "claimed", 0)))
        .await
        .unwrap();
    let spawned = within("hand-over", old.spawn_warm(slot, spec))
        .await
        .unwrap();
    let unclaimed = within(
        "prewarm",
        old.prewarm(warm_spec(&fx.spawn_spec("idle", "x"), "idle", 0)),
    )
    .await
    .unwrap()
    .into_any()
    .downcast::<bulkhead_docker::DockerSlot>()
    .unwrap();
    let unclaimed_id = unclaimed.id().to_owned();
    // The old daemon goes away without cleaning up (its slot is neither discarded nor
    // dropped here: as after kill -9, the container still runs).
    std::mem::forget(unclaimed);
    let new = DockerDriver::new(Engine::new(daemon_id), None);
    let found = within("recover", new.recover()).await.unwrap();
    assert!(
        !exists(&engine, &unclaimed_id).await,
        "the unclaimed slot {unclaimed_id} was removed"
    );
    assert_eq!(
        found.len(),
        1,
        "{:?}",
        found.iter().map(|f| &f.describe).collect::<Vec<_>>()
    );
    let f = &found[0];
    assert_eq!(f.instance, instance);
    assert!(
        f.env.iter().any(|(k, v)| k == "MARK" && v == "claimed-run"),
        "{:?}",
        f.env
    );
    assert_eq!(f.spawned.handle.pid(), spawned.handle.pid());
    // exec into the adopted run gets the handed-over environment too.
    let mut ex = within(
        "exec",
        f.spawned.handle.engine_exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "echo MARK=$MARK".into()],
            env: vec![],
            tty: None,
        }),
    )
    .await
    .expect("the docker driver execs through the engine")
    .unwrap();
    let mut out = Vec::new();
    while let Some((_, b)) = within("exec output", ex.output.recv()).await {
        out.extend(b);
    }
    assert_eq!(String::from_utf8_lossy(&out), "MARK=claimed-run\n");
    let st = within(
        "stop of the adopted run",
        f.spawned.handle.stop(Signal::TERM, Duration::from_secs(5)),
    )
    .await;
    assert_eq!(
        st,
        ExitStatus::Signaled {
            signal: 15,
            core_dumped: false
        }
    );
}

/// Set in the environment of the helper process of
/// `a_slot_of_a_daemon_killed_with_9_stops_by_itself_and_recover_removes_it`: the file
/// the helper writes its slot's container id to.
const HELPER_VAR: &str = "BULKHEAD_WARM_KILL9_HELPER";

/// Not a test of its own: the "daemon" that the next test kills with SIGKILL. It makes a
/// slot, says which container it is, and waits to be killed.
#[tokio::test(flavor = "multi_thread")]
async fn kill9_helper() {
    let Some(out) = std::env::var_os(HELPER_VAR) else {
        return;
    };
    let engine = Engine::new(std::env::var("BULKHEAD_WARM_KILL9_DAEMON").unwrap());
    let driver = DockerDriver::new(engine, None);
    // The killer's folder: nothing of the helper's own is left behind.
    let dir = std::path::Path::new(&out).parent().unwrap().to_owned();
    let mut fx = Fixture::new(vec!["/bin/sh".into(), "-c".into()], dir);
    fx.manifest_extra = format!("driver: docker\ndocker:\n  image: {IMAGE}\n");
    fx.bind_workdir = true;
    let spec = fx.spawn_spec("kill9", "exit 0");
    let slot = driver
        .prewarm(warm_spec(&spec, "kill9", 0))
        .await
        .unwrap()
        .into_any()
        .downcast::<bulkhead_docker::DockerSlot>()
        .unwrap();
    std::fs::write(&out, slot.id()).unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
}

/// A slot whose daemon is killed with SIGKILL does not run on unseen: its init sees the
/// daemon's end of the socket close and exits, and the next daemon's `recover` removes
/// the container.
#[tokio::test(flavor = "multi_thread")]
async fn a_slot_of_a_daemon_killed_with_9_stops_by_itself_and_recover_removes_it() {
    let Some(engine) = engine("kill9").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("id");
    let mut helper = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "kill9_helper", "--nocapture", "--test-threads=1"])
        .env(HELPER_VAR, &out)
        .env("BULKHEAD_WARM_KILL9_DAEMON", engine.daemon_id())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let id = within("the helper's slot", async {
        loop {
            if let Ok(id) = std::fs::read_to_string(&out) {
                if !id.is_empty() {
                    return id;
                }
            }
            if let Ok(Some(st)) = helper.try_wait() {
                panic!("the helper ended with {st} before making its slot");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let client = engine.ensure().await.unwrap().clone();
    let running = |client: bollard::Docker, id: String| async move {
        client
            .inspect_container(&id, None::<InspectContainerOptions>)
            .await
            .ok()
            .and_then(|i| i.state)
            .and_then(|s| s.running)
            == Some(true)
    };
    assert!(running(client.clone(), id.clone()).await, "the slot runs");
    helper.kill().unwrap();
    helper.wait().unwrap();
    within("the orphaned slot's init to exit", async {
        while running(client.clone(), id.clone()).await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(exists(&engine, &id).await, "stopped, not yet removed");
    let found = within("recover", DockerDriver::new(engine.clone(), None).recover())
        .await
        .unwrap();
    assert!(found.is_empty());
    assert!(!exists(&engine, &id).await, "recover removed {id}");
}

/// Limits, usage and the OOM kill of a program started from a slot are a cold
/// container's: the limits were set when the slot was made, `stats` read the container's
/// cgroup, an OOM kill is the exit cause with the limit.
#[tokio::test(flavor = "multi_thread")]
async fn limits_stats_and_oom_apply_to_a_program_from_a_slot() {
    let Some(engine) = engine("limits").await else {
        return;
    };
    let driver = WarmFirst(DockerDriver::new(engine, None));
    let mut fx = fixture(&format!("  image: {IMAGE}\n"));
    fx.manifest_extra = format!(
        "resources: {{memory: 16Mi, pids: 50}}\n{}",
        fx.manifest_extra
    );
    let spawned = within(
        "spawn from a slot",
        driver.spawn(fx.spawn_spec("limits", "exec sleep 1000")),
    )
    .await
    .unwrap();
    let stats = within("stats", async {
        loop {
            let s = spawned.handle.stats().unwrap();
            if s.pids > 0 {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(stats.memory_limit_bytes, Some(16 << 20), "{stats:?}");
    assert_eq!(stats.pids_limit, Some(50), "{stats:?}");
    assert!(stats.memory_bytes > 0, "{stats:?}");
    let pid = spawned.handle.pid().unwrap();
    assert_eq!(spawned.handle.owns_pid(pid), Some(true));
    assert_eq!(spawned.handle.owns_pid(std::process::id()), Some(false));
    within(
        "stop",
        spawned.handle.stop(Signal::KILL, Duration::from_secs(1)),
    )
    .await;
    let hog = "a=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; while :; do a=$a$a; done";
    let spawned = within("spawn from a slot", driver.spawn(fx.spawn_spec("oom", hog)))
        .await
        .unwrap();
    let st = tokio::time::timeout(Duration::from_secs(120), spawned.handle.wait())
        .await
        .expect("no OOM kill within 120 s");
    assert!(
        matches!(st, ExitStatus::Signaled { signal: 9, .. }),
        "{st:?}"
    );
    assert_eq!(
        spawned.handle.exit_cause(),
        Some(bulkhead_driver::ExitCause::OomKilled {
            limit_bytes: Some(16 << 20)
        })
    );
}
