//! The docker driver against the real engine, beyond the conformance suite: the image
//! cache, limits, exec, errors. Each test prints why it skips without an engine.

use std::sync::Arc;
use std::time::Duration;

use bulkhead_core::event::ExitStatus;
use bulkhead_core::signal::Signal;
use bulkhead_docker::images::{ImageCache, Limits};
use bulkhead_docker::{DockerDriver, Engine};
use bulkhead_driver::conformance::{read_all, within, Fixture};
use bulkhead_driver::{Driver, ExitCause};

const IMAGE: &str = "bulkhead-test/busybox:latest";

async fn engine() -> Option<Arc<Engine>> {
    let engine = Engine::new(format!("engine-test-{}", std::process::id()));
    match engine.ensure().await {
        Ok(c) if c.inspect_image(IMAGE).await.is_ok() => Some(engine),
        Ok(_) => {
            eprintln!("skipped: {IMAGE} missing; run .ci/setup-docker.sh");
            None
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

fn fixture(extra: &str) -> Fixture {
    let mut fx = Fixture::temp();
    fx.manifest_extra = format!("driver: docker\n{extra}");
    fx.bind_workdir = true;
    fx
}

fn docker_section(extra: &str) -> String {
    format!("docker:\n  image: {IMAGE}\n{extra}")
}

/// An image cache with at most `max_count` images in a state folder of its own, and an
/// empty build context (both folders live as long as the returned guards).
fn temp_cache(max_count: Option<usize>) -> (ImageCache, tempfile::TempDir, tempfile::TempDir) {
    let state = tempfile::tempdir().unwrap();
    let ctx = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_count,
        max_bytes: None,
    };
    let cache = ImageCache::open(&state.path().join("images.db"), limits).unwrap();
    (cache, state, ctx)
}

/// `docker.build` on the test image with one `RUN` step.
fn run_on_test_image(run: &str) -> bulkhead_core::docker::DockerSpec {
    serde_saphyr::from_str(&format!("build:\n  base: {IMAGE}\n  run: ['{run}']\n")).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_engine_is_a_clear_error_not_a_hang() {
    // A socket path nobody listens on: the error names it and says what to do.
    let engine = Engine::with_host("ping-test", "unix:///nonexistent/docker.sock");
    let Err(err) = within("the reachability check", engine.ensure()).await else {
        panic!("an engine answered at /nonexistent/docker.sock");
    };
    let msg = err.to_string();
    assert!(msg.contains("/nonexistent/docker.sock"), "{msg}");
    assert!(
        msg.contains("start dockerd") || msg.contains("DOCKER_HOST"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_image_says_what_to_do() {
    let Some(engine) = engine().await else { return };
    let fx = fixture("docker:\n  image: bulkhead-test/no-such-image:1\n");
    let err = DockerDriver::new(engine, None)
        .spawn(fx.spawn_spec("missing-image", "exit 0"))
        .await
        .err()
        .expect("spawn of a missing image");
    let msg = err.to_string();
    assert!(
        msg.contains("no-such-image") && msg.contains("registry"),
        "{msg}"
    );
}

/// An OOM kill is the exit cause, with the limit: of the main process, and of a child
/// while the main process would live on (the container is then ended, as for the
/// sandbox; the engine alone would leave it running).
#[tokio::test(flavor = "multi_thread")]
async fn oom_kill_is_the_exit_cause_with_the_limit() {
    let Some(engine) = engine().await else { return };
    let fx = fixture(&format!(
        "resources: {{memory: 16Mi}}\n{}",
        docker_section("")
    ));
    let driver = DockerDriver::new(engine, None);
    let hog = "a=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; while :; do a=$a$a; done";
    for (name, script) in [
        ("oom", hog.to_owned()),
        ("oom-child", format!("({hog}) & exec sleep 1000")),
    ] {
        let spawned = driver.spawn(fx.spawn_spec(name, &script)).await.unwrap();
        // A longer deadline than `within`'s: the engine may be busy importing the
        // debootstrap image of a test running alongside, and its events come late then.
        let st = tokio::time::timeout(Duration::from_secs(120), spawned.handle.wait())
            .await
            .unwrap_or_else(|_| panic!("{name}: no OOM kill within 120 s"));
        assert!(
            matches!(st, ExitStatus::Signaled { signal: 9, .. }),
            "{name}: {st:?}"
        );
        assert_eq!(
            spawned.handle.exit_cause(),
            Some(ExitCause::OomKilled {
                limit_bytes: Some(16 << 20)
            }),
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_reach_the_container_and_stats_read_them() {
    let Some(engine) = engine().await else { return };
    let fx = fixture(&format!(
        "resources: {{memory: 64Mi, pids: 50, cpu: 0.5}}\n{}",
        docker_section("  read_only: true\n  cap_drop: [ALL]\n  shm_size: 8Mi\n")
    ));
    let driver = DockerDriver::new(engine, None);
    let script = "touch /x 2>/dev/null && echo writable || echo read-only; \
                  df -k /dev/shm | tail -1; exec sleep 1000";
    let mut spawned = driver.spawn(fx.spawn_spec("limits", script)).await.unwrap();
    // Both lines are read before the stop: the script's `df` runs after the container's
    // first process shows in stats, and a stop before it would lose the line.
    let mut out =
        tokio::net::unix::pipe::Receiver::from_owned_fd(spawned.stdout.take().unwrap()).unwrap();
    let text = within("the script's two lines", async {
        use tokio::io::AsyncReadExt as _;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while buf.iter().filter(|b| **b == b'\n').count() < 2 {
            let n = out.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "output ended early: {}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
    .await;
    assert!(text.contains("read-only"), "{text}");
    assert!(text.contains("8192"), "shm_size: {text}");
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
    assert_eq!(stats.memory_limit_bytes, Some(64 << 20), "{stats:?}");
    // The notify socket's sender check: the container's processes, nobody else's.
    let pid = spawned.handle.pid().unwrap();
    assert_eq!(spawned.handle.owns_pid(pid), Some(true));
    assert_eq!(spawned.handle.owns_pid(std::process::id()), Some(false));
    assert_eq!(stats.pids_limit, Some(50), "{stats:?}");
    assert!(stats.memory_bytes > 0, "{stats:?}");
    let st = within(
        "stop",
        spawned.handle.stop(Signal::TERM, Duration::from_secs(5)),
    )
    .await;
    assert!(
        matches!(st, ExitStatus::Signaled { signal: 15, .. }),
        "{st:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_returns_the_real_exit_code_and_adoption_watches_the_container() {
    let Some(engine) = engine().await else { return };
    // A container made outside the driver, labelled as this daemon's, then adopted.
    let out = std::process::Command::new("docker")
        .args(["run", "-d", "--init", "--label"])
        .arg(format!("bulkhead.daemon={}", engine.daemon_id()))
        .args([
            "--label",
            "bulkhead.instance=ns:t:exec",
            IMAGE,
            "sleep",
            "1000",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let found = bulkhead_docker::recovery::list(&engine).await.unwrap();
    assert!(found
        .iter()
        .any(|f| f.id == id && f.running && f.instance == "ns:t:exec"));
    let (c, _logs) = bulkhead_docker::Container::adopt(engine, &id)
        .await
        .unwrap();
    let (code, out) = c
        .exec(
            vec!["sh".into(), "-c".into(), "echo in; exit 7".into()],
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(code, 7);
    assert_eq!(String::from_utf8_lossy(&out), "in\n");
    use bulkhead_driver::InstanceHandle as _;
    assert!(c.pid().is_some());
    let st = within("stop", c.stop(Signal::TERM, Duration::from_secs(5))).await;
    assert!(
        matches!(st, ExitStatus::Signaled { signal: 15, .. }),
        "{st:?}"
    );
    let gone = std::process::Command::new("docker")
        .args(["inspect", &id])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "the container was removed");
}

#[tokio::test(flavor = "multi_thread")]
async fn image_cache_hits_misses_rebuilds_and_evicts() {
    let Some(engine) = engine().await else { return };
    let client = engine.ensure().await.unwrap().clone();
    let state = tempfile::tempdir().unwrap();
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("greeting"), "one").unwrap();
    let cache = ImageCache::open(
        &state.path().join("images.db"),
        Limits {
            max_count: Some(2),
            max_bytes: None,
        },
    )
    .unwrap();
    let spec = |run: &str| -> bulkhead_core::docker::DockerSpec {
        serde_saphyr::from_str(&format!(
            "build:\n  base: {IMAGE}\n  files: {{greeting: /greeting}}\n  run: ['{run}']\n"
        ))
        .unwrap()
    };
    let tag = std::process::id().to_string();
    let first = cache
        .ensure(&client, &format!("cache-{tag}"), &spec("true"), ctx.path())
        .await
        .unwrap();
    assert!(!first.hit, "miss");
    let again = cache
        .ensure(&client, &format!("cache-{tag}"), &spec("true"), ctx.path())
        .await
        .unwrap();
    assert!(again.hit, "hit");
    assert_eq!(again.tag, first.tag);
    std::fs::write(ctx.path().join("greeting"), "two").unwrap();
    let changed = cache
        .ensure(&client, &format!("cache-{tag}"), &spec("true"), ctx.path())
        .await
        .unwrap();
    assert!(!changed.hit, "a changed file rebuilds");
    assert_ne!(changed.tag, first.tag);
    // A third configuration: the cache holds two, the least recently used goes.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let third = cache
        .ensure(
            &client,
            &format!("cache-{tag}"),
            &spec("echo 3"),
            ctx.path(),
        )
        .await
        .unwrap();
    let tags: Vec<String> = cache
        .records()
        .unwrap()
        .into_iter()
        .map(|r| r.tag)
        .collect();
    assert_eq!(tags.len(), 2, "{tags:?}");
    assert!(
        !tags.contains(&first.tag),
        "the LRU image was evicted: {tags:?}"
    );
    assert!(
        client.inspect_image(&first.tag).await.is_err(),
        "and removed from the engine"
    );
    assert!(tags.contains(&third.tag) && tags.contains(&changed.tag));
    // A failing build shows the tail of its log.
    let err = cache
        .ensure(
            &client,
            &format!("cache-{tag}"),
            &spec("echo about-to-fail; exit 3"),
            ctx.path(),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("about-to-fail"), "{err}");
    let removed = cache.prune(&client).await.unwrap();
    assert_eq!(removed.len(), 2);
    assert!(cache.records().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn eviction_never_removes_an_image_in_use() {
    let Some(engine) = engine().await else { return };
    let client = engine.ensure().await.unwrap().clone();
    let state = tempfile::tempdir().unwrap();
    let cache = Arc::new(
        ImageCache::open(
            &state.path().join("images.db"),
            Limits {
                max_count: Some(1),
                max_bytes: None,
            },
        )
        .unwrap(),
    );
    let fx = fixture(&format!(
        "docker:\n  build:\n    base: {IMAGE}\n    run: ['echo used-{}']\n",
        std::process::id()
    ));
    let driver = DockerDriver::new(engine, Some(cache.clone()));
    let spawned = driver
        .spawn(fx.spawn_spec("in-use", "exec sleep 1000"))
        .await
        .unwrap();
    let used = cache.records().unwrap()[0].tag.clone();
    let other: bulkhead_core::docker::DockerSpec = serde_saphyr::from_str(&format!(
        "build:\n  base: {IMAGE}\n  run: ['echo other-{}']\n",
        std::process::id()
    ))
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    cache
        .ensure(&client, "other", &other, fx.workdir.as_path())
        .await
        .unwrap();
    assert!(
        cache.records().unwrap().iter().any(|r| r.tag == used),
        "the image in use stays"
    );
    within("stop", spawned.handle.stop(Signal::KILL, Duration::ZERO)).await;
    cache.prune(&client).await.unwrap();
    assert!(cache.records().unwrap().is_empty());
}

/// Whether debootstrap is installed; prints why not otherwise.
fn debootstrap_available() -> bool {
    let ok = std::process::Command::new("debootstrap")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: no debootstrap (apt-get install debootstrap; CI installs it)");
    }
    ok
}

#[tokio::test(flavor = "multi_thread")]
async fn a_debootstrap_base_is_made_once_kept_under_its_children_and_pruned_last() {
    let Some(engine) = engine().await else { return };
    if !debootstrap_available() {
        return;
    }
    let client = engine.ensure().await.unwrap().clone();
    let (cache, state, ctx) = temp_cache(Some(2));
    let pid = std::process::id();

    // An archive that does not exist: debootstrap's own words come back, and nothing is
    // left in the work folder.
    let bad: bulkhead_core::docker::DockerSpec = serde_saphyr::from_str(&format!(
        "build:\n  debootstrap: {{suite: bookworm, mirror: 'file:///nonexistent/{pid}'}}\n"
    ))
    .unwrap();
    let err = cache
        .ensure(&client, "bad-mirror", &bad, ctx.path())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("debootstrap of bookworm failed"), "{err}");
    assert!(err.contains("last lines of its log"), "{err}");
    let work = state.path().join("debootstrap");
    let roots: Vec<_> = std::fs::read_dir(&work)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".root"))
        .collect();
    assert!(roots.is_empty(), "no root file system left: {roots:?}");

    // The real archive. The mirror is spelled out so that this base is this test's own
    // (another configuration than the examples' bookworm base), and pruning it at the
    // end does not remove an image other tests use.
    let spec = |run: &str| -> bulkhead_core::docker::DockerSpec {
        serde_saphyr::from_str(&format!(
            "build:\n  debootstrap: {{suite: bookworm, mirror: 'http://deb.debian.org/debian/'}}\n  \
             run: ['{run}']\n"
        ))
        .unwrap()
    };
    let first = cache
        .ensure(
            &client,
            "deb",
            &spec(&format!("echo {pid} > /built")),
            ctx.path(),
        )
        .await
        .unwrap();
    assert!(!first.hit);
    let recs = cache.records().unwrap();
    assert_eq!(recs.len(), 2, "the base and the image: {recs:?}");
    let base = recs
        .iter()
        .find(|r| r.workload == "(debootstrap bookworm)")
        .expect("the base is recorded")
        .clone();
    assert!(base.tag.starts_with("bulkhead/debootstrap-bookworm:"));
    assert_eq!(base.base, None);
    let child = recs.iter().find(|r| r.tag == first.tag).unwrap();
    assert_eq!(child.base.as_deref(), Some(base.tag.as_str()));
    // The image runs Debian's userland.
    let out = std::process::Command::new("docker")
        .args([
            "run",
            "--rm",
            &first.tag,
            "cat",
            "/etc/debian_version",
            "/built",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with("12.") && text.contains(&pid.to_string()),
        "{text}"
    );

    // Another image on the same base: the base is not made again.
    let started = std::time::Instant::now();
    let second = cache
        .ensure(&client, "deb", &spec("echo second"), ctx.path())
        .await
        .unwrap();
    assert!(!second.hit);
    eprintln!("second image on the cached base: {:?}", started.elapsed());
    // Three records over a limit of two: the oldest image goes, never the base under
    // the newest.
    let tags: Vec<String> = cache
        .records()
        .unwrap()
        .into_iter()
        .map(|r| r.tag)
        .collect();
    assert_eq!(tags.len(), 2, "{tags:?}");
    assert!(
        tags.contains(&base.tag) && tags.contains(&second.tag),
        "{tags:?}"
    );
    assert!(
        cache
            .ensure(&client, "deb", &spec("echo second"), ctx.path())
            .await
            .unwrap()
            .hit
    );
    // Prune: the image first, then its base.
    let removed: Vec<String> = cache
        .prune(&client)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.tag)
        .collect();
    assert_eq!(removed, [second.tag.clone(), base.tag.clone()]);
    assert!(client.inspect_image(&base.tag).await.is_err());
}

/// A launch whose image is cached does not wait for a build of another configuration
/// (builds are serialised, and one can take minutes).
#[tokio::test(flavor = "multi_thread")]
async fn a_cache_hit_does_not_wait_behind_a_build() {
    let Some(engine) = engine().await else { return };
    let client = engine.ensure().await.unwrap().clone();
    let (cache, _state, ctx) = temp_cache(None);
    let cache = Arc::new(cache);
    let pid = std::process::id();
    let spec = run_on_test_image;
    let cached = cache
        .ensure(
            &client,
            "hit",
            &spec(&format!("echo cached-{pid}")),
            ctx.path(),
        )
        .await
        .unwrap();
    // A build that holds the build lock for a while: its RUN step sleeps.
    let marker = format!("slow-{pid}");
    let slow = {
        let (cache, client) = (cache.clone(), client.clone());
        let dir = ctx.path().to_owned();
        let s = spec(&format!("echo {marker}; sleep 15"));
        tokio::spawn(async move { cache.ensure(&client, "slow", &s, &dir).await })
    };
    // The slow build is under way once the engine runs its RUN step.
    within("the slow build's RUN step", async {
        loop {
            let ps = std::process::Command::new("docker")
                .args(["ps", "--no-trunc", "--format", "{{.Command}}"])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&ps.stdout).contains(&marker) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let hit = within(
        "a cache hit while a build runs",
        cache.ensure(
            &client,
            "hit",
            &spec(&format!("echo cached-{pid}")),
            ctx.path(),
        ),
    )
    .await
    .unwrap();
    assert!(hit.hit && hit.tag == cached.tag);
    assert!(
        !slow.is_finished(),
        "the hit came back while the build was still running"
    );
    within("the slow build", slow).await.unwrap().unwrap();
    assert_eq!(cache.prune(&client).await.unwrap().len(), 2);
}

/// A launch holds a pin on its image from the cache lookup until its container exists:
/// eviction and prune leave a pinned image alone, and take it once the pin is gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_pinned_image_is_neither_evicted_nor_pruned() {
    let Some(engine) = engine().await else { return };
    let client = engine.ensure().await.unwrap().clone();
    let (cache, _state, ctx) = temp_cache(Some(1));
    let pid = std::process::id();
    let spec = run_on_test_image;
    let (pinned, pin) = cache
        .ensure_pinned(
            &client,
            "pin",
            &spec(&format!("echo pinned-{pid}")),
            ctx.path(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let other = cache
        .ensure(
            &client,
            "pin",
            &spec(&format!("echo other-{pid}")),
            ctx.path(),
        )
        .await
        .unwrap();
    let tags = || -> Vec<String> {
        cache
            .records()
            .unwrap()
            .into_iter()
            .map(|r| r.tag)
            .collect()
    };
    assert!(
        tags().contains(&pinned.tag),
        "over the limit, the pinned LRU image stays: {:?}",
        tags()
    );
    assert!(cache
        .prune(&client)
        .await
        .unwrap()
        .iter()
        .all(|r| r.tag != pinned.tag));
    assert!(client.inspect_image(&pinned.tag).await.is_ok());
    drop(pin);
    cache.prune(&client).await.unwrap();
    assert!(tags().is_empty(), "{:?}", tags());
    assert!(client.inspect_image(&pinned.tag).await.is_err());
    assert!(client.inspect_image(&other.tag).await.is_err());
}

/// Deny by default: a container runs with `no-new-privileges` (a setuid binary cannot
/// raise its privileges), unless `docker.new_privileges` opens it (the control).
#[tokio::test(flavor = "multi_thread")]
async fn containers_run_with_no_new_privileges_unless_opened() {
    let Some(engine) = engine().await else { return };
    let driver = DockerDriver::new(engine, None);
    for (extra, want) in [
        ("", "NoNewPrivs:\t1"),
        ("  new_privileges: true\n", "NoNewPrivs:\t0"),
    ] {
        let fx = fixture(&docker_section(extra));
        let mut spawned = driver
            .spawn(fx.spawn_spec("nnp", "grep NoNewPrivs /proc/self/status"))
            .await
            .unwrap();
        let out = spawned.stdout.take().unwrap();
        let text = within("output", read_all(out)).await;
        let st = within("wait", spawned.handle.wait()).await;
        assert_eq!(st, ExitStatus::Exited { code: 0 }, "{text}");
        assert!(text.contains(want), "{extra:?}: {text}");
    }
}
