//! Warm slots of the sandbox driver against the real kernel: an instance from a slot has
//! the wall of a cold one (compared side by side), a slot that is discarded, refused or
//! left by a crashed daemon leaves no process and no cgroup, and a hand-over too large
//! for the slot fails cleanly. The conformance suite runs through slots in
//! `tests/conformance.rs` (`warm`, `warm_host_ids`): exit codes, signals, teardown.
//!
//! Every test skips with a printed reason where the driver cannot start (no root, no
//! cgroups).

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_core::event::ExitStatus;
use bulkhead_core::spec::parse_manifest;
use bulkhead_driver::conformance::{read_all, within, Fixture};
use bulkhead_driver::warm::{Warm, WarmSpec};
use bulkhead_driver::{Driver, SpawnError, SpawnSpec};
use bulkhead_sandbox::cgroup::ModeChoice;
use bulkhead_sandbox::{SandboxConfig, SandboxDriver};

const OK: ExitStatus = ExitStatus::Exited { code: 0 };

fn driver_in(mode: ModeChoice, scope: &str) -> Option<SandboxDriver> {
    match SandboxDriver::new(SandboxConfig {
        mode,
        scope: scope.to_owned(),
        min_available_memory: 0,
        ..SandboxConfig::default()
    }) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

fn new_scope() -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    format!(
        "warm-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

fn driver() -> Option<(SandboxDriver, String)> {
    let scope = new_scope();
    driver_in(ModeChoice::Auto, &scope).map(|d| (d, scope))
}

/// A spawn spec for `script` with extra manifest text, as instance `ns:conformance:<name>`;
/// the fixture's directory is bound in read-write (and open to the mapped uid).
fn spec(fx: &Fixture, name: &str, script: &str, extra: &str) -> SpawnSpec {
    let mut s = fx.spawn_spec(name, script);
    let text = format!("name: {name}\ncommand: [sh]\ndriver: sandbox\n{extra}");
    let mut w = parse_manifest(&format!("{name}/manifest.yaml"), name, &text)
        .unwrap_or_else(|e| panic!("{e}"));
    w.command = s.argv.clone();
    s.spec = Arc::new(w);
    s.binds.push(bulkhead_driver::Bind::same(&fx.workdir));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fx.workdir, std::fs::Permissions::from_mode(0o777)).unwrap();
    s
}

/// What a slot for `s` is made with: what the launch shares with every other one.
fn warm_spec(s: &SpawnSpec, slot: &str) -> WarmSpec {
    WarmSpec {
        slot: slot.to_owned(),
        spec: Arc::clone(&s.spec),
        cwd: s.cwd.clone(),
        ids: s.ids,
        binds: s.binds.clone(),
        port: 0,
    }
}

async fn prewarm(d: &SandboxDriver, s: &SpawnSpec, slot: &str) -> Box<dyn Warm> {
    within("prewarm", d.prewarm(warm_spec(s, slot)))
        .await
        .unwrap_or_else(|e| panic!("prewarm failed: {e}"))
}

/// Runs `s` to its end, cold or from a fresh slot; returns the status and stdout.
async fn run(d: &SandboxDriver, s: SpawnSpec, warm: bool) -> (ExitStatus, String) {
    let spawned = if warm {
        let slot = prewarm(d, &s, "warm-walls-0").await;
        within("spawn_warm", d.spawn_warm(slot, s)).await
    } else {
        within("spawn", d.spawn(s)).await
    }
    .unwrap_or_else(|e| panic!("spawn failed (warm: {warm}): {e}"));
    let out = within("stdout", read_all(spawned.stdout.unwrap())).await;
    let st = within("the end", spawned.handle.wait()).await;
    (st, out)
}

/// The instance cgroups (directories) of `scope`, in every hierarchy.
fn cgroups_of(scope: &str) -> Vec<std::path::PathBuf> {
    fn walk(dir: &Path, scope: &str, out: &mut Vec<std::path::PathBuf>, depth: u32) {
        if depth > 6 {
            return;
        }
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if !p.is_dir() {
                continue;
            }
            if p.file_name().is_some_and(|n| n == scope) {
                if let Ok(inner) = std::fs::read_dir(&p) {
                    out.extend(inner.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
                }
            } else {
                walk(&p, scope, out, depth + 1);
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), scope, &mut out, 0);
    out
}

/// The pids in the instance cgroups of `scope`.
fn pids_of(scope: &str) -> Vec<u32> {
    let mut pids: Vec<u32> = cgroups_of(scope)
        .iter()
        .flat_map(|d| {
            std::fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Whether `pid` is gone (a zombie counts as gone).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the wall looks like from inside: PID namespace, init, hostname, ids and their
/// map (without the host range, which is each tenant's own), capabilities, no_new_privs,
/// seccomp, the mount table, umask, limits, working directory.
const WALL: &str = "echo pid=$$; set -- /proc/[0-9]*; echo \"$*\"; tr '\\0' ' ' </proc/1/cmdline; echo; \
    hostname; grep -E '^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp)' /proc/self/status; \
    awk '{print $1, $3}' /proc/self/uid_map /proc/self/gid_map; \
    awk '{print $5, $6, $9}' /proc/self/mountinfo; umask; ulimit -n; pwd -P; \
    cat /proc/self/cgroup | sed 's/[^/]*$//'";

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_from_a_slot_has_the_wall_of_a_cold_one() {
    let Some((d, _)) = driver() else {
        return;
    };
    let fx = Fixture::temp();
    for extra in [
        "limits: {nofile: 1234}\numask: \"0027\"\n",
        "sandbox: { init: false, network: none, user: { uid: 1000 } }\n",
        "sandbox: { user_namespace: host, capabilities: [CAP_NET_BIND_SERVICE] }\n",
    ] {
        let (st, cold) = run(&d, spec(&fx, "walls", WALL, extra), false).await;
        assert_eq!(st, OK, "{extra}: cold: {cold}");
        let (st, warm) = run(&d, spec(&fx, "walls", WALL, extra), true).await;
        assert_eq!(st, OK, "{extra}: warm: {warm}");
        assert_eq!(
            warm, cold,
            "{extra}: the wall from a slot differs from a cold one"
        );
        // The comparison sees what it should: the instance's own id, not the slot's.
        assert!(
            warm.contains("ns:conformance:walls\n"),
            "{extra}: hostname: {warm}"
        );
        assert!(!warm.contains("warm-walls"), "{extra}: {warm}");
    }
    let (_, out) = run(
        &d,
        spec(
            &fx,
            "walls",
            WALL,
            "limits: {nofile: 1234}\numask: \"0027\"\n",
        ),
        true,
    )
    .await;
    // The init's title is written over this process's own argument area, so it is cut
    // to that area's size (short when the tests run as `/tests/warm` in the VM).
    let room = std::fs::read("/proc/self/cmdline")
        .map(|c| c.len())
        .unwrap_or(0)
        .saturating_sub(1);
    let title = "bulkhead-init ns:conformance:walls";
    let title = &title[..title.len().min(room)];
    for want in ["pid=2", "/proc/1 /proc/2\n", title, "0027", "1234"] {
        assert!(out.contains(want), "missing {want}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_discarded_slot_leaves_no_process_and_no_cgroup() {
    let Some((d, scope)) = driver() else {
        return;
    };
    let fx = Fixture::temp();
    let s = spec(&fx, "discard", "exit 0", "resources: { memory: 64Mi }\n");
    let slot = prewarm(&d, &s, "warm-discard-0").await;
    assert!(slot.alive());
    let pids = pids_of(&scope);
    // The init and the workload process, waiting.
    assert_eq!(pids.len(), 2, "{pids:?} in {:?}", cgroups_of(&scope));
    if d.capabilities().controllers.iter().any(|c| c == "memory") {
        assert!(slot.memory() > 0, "a slot's memory is counted");
    }
    within("discard", slot.discard()).await;
    assert_eq!(cgroups_of(&scope), Vec::<std::path::PathBuf>::new());
    until("the slot's processes to go", || {
        pids.iter().all(|p| gone(*p))
    })
    .await;
}

/// A waiting slot holds nothing of the daemon's memory: its init and its waiting process
/// both run `bulkhead-init` (from the driver's memfd; the waiting process in its waiter
/// mode, its restrictions applied) with little anonymous memory, while the process that
/// hosts the driver holds 64 MiB it wrote (the control: a copy would hold them); and the
/// slot still serves its launch.
#[tokio::test(flavor = "multi_thread")]
async fn a_waiting_slot_holds_none_of_the_daemons_memory() {
    let Some((d, scope)) = driver() else {
        return;
    };
    let heap = bulkhead_driver::conformance::daemon_memory();
    let fx = Fixture::temp();
    let s = spec(&fx, "lean", "echo hi", "");
    let slot = prewarm(&d, &s, "warm-lean-0").await;
    let pids = pids_of(&scope);
    assert_eq!(pids.len(), 2, "{pids:?}");
    for pid in pids {
        bulkhead_driver::conformance::assert_runs_alone(
            pid,
            "/memfd:bulkhead-init",
            "a slot process",
        );
    }
    drop(heap);
    let spawned = within("spawn_warm", d.spawn_warm(slot, s)).await.unwrap();
    let out = within("stdout", read_all(spawned.stdout.unwrap())).await;
    assert_eq!(within("the end", spawned.handle.wait()).await, OK);
    assert_eq!(out, "hi\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hand_over_too_large_for_the_slot_fails_cleanly_and_cold_still_works() {
    let Some((d, scope)) = driver() else {
        return;
    };
    let fx = Fixture::temp();
    // 3 arguments of 100 KiB: within the kernel's limits, beyond a slot's 256 KiB.
    let big = "x".repeat(100 << 10);
    let make = || {
        let mut s = spec(&fx, "big", "echo $#", "");
        s.argv.extend([big.clone(), big.clone(), big.clone()]);
        s
    };
    let s = make();
    let slot = prewarm(&d, &s, "warm-big-0").await;
    let pids = pids_of(&scope);
    match within("spawn_warm", d.spawn_warm(slot, s)).await {
        Err(e @ SpawnError::Invalid { .. }) => {
            assert!(e.to_string().contains("hand-over"), "{e}")
        }
        Err(e) => panic!("expected a refusal, got {e:?}"),
        Ok(_) => panic!("a hand-over of 300 KiB was taken"),
    }
    // The slot is gone with the refusal.
    assert_eq!(cgroups_of(&scope), Vec::<std::path::PathBuf>::new());
    until("the slot's processes to go", || {
        pids.iter().all(|p| gone(*p))
    })
    .await;
    // The daemon's fallback: the same launch, cold.
    // (`sh -c script a b c`: `a` is `$0`.)
    let (st, out) = run(&d, make(), false).await;
    assert_eq!((st, out.trim()), (OK, "2"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_launch_the_slot_was_not_made_for_is_refused_and_the_slot_removed() {
    let Some((d, scope)) = driver() else {
        return;
    };
    let fx = Fixture::temp();
    let other = tempfile::tempdir().unwrap();
    let file = other.path().join("f");
    std::fs::write(&file, "x").unwrap();
    type Change<'a> = Box<dyn Fn(&mut SpawnSpec) + 'a>;
    let cases: [(&str, Change<'_>); 5] = [
        (
            "a file bind the slot does not have",
            Box::new(|s: &mut SpawnSpec| {
                s.binds.push(bulkhead_driver::Bind::same(&file));
            }),
        ),
        (
            "a directory bind to a relative target",
            Box::new(|s: &mut SpawnSpec| {
                s.binds.push(bulkhead_driver::Bind {
                    source: other.path().to_owned(),
                    target: "relative".into(),
                });
            }),
        ),
        (
            "another working directory",
            Box::new(|s: &mut SpawnSpec| s.cwd = other.path().to_owned()),
        ),
        (
            "another tenant's ids than the slot maps",
            Box::new(|s: &mut SpawnSpec| {
                s.ids = Some(bulkhead_core::sandbox::UserNamespace {
                    uid: 4_000_000_000,
                    gid: None,
                    count: 65536,
                })
            }),
        ),
        (
            "a changed manifest",
            Box::new(|s: &mut SpawnSpec| {
                let mut w = (*s.spec).clone();
                w.umask = Some("0077".into());
                s.spec = Arc::new(w);
            }),
        ),
    ];
    for (what, change) in cases {
        let mut s = spec(&fx, "refused", "exit 0", "");
        let slot = prewarm(&d, &s, "warm-refused-0").await;
        change(&mut s);
        match within("spawn_warm", d.spawn_warm(slot, s)).await {
            Err(SpawnError::Invalid { .. }) => {}
            Err(e) => panic!("{what}: expected a refusal, got {e:?}"),
            Ok(_) => panic!("{what}: the slot took a launch it was not made for"),
        }
        assert_eq!(
            cgroups_of(&scope),
            Vec::<std::path::PathBuf>::new(),
            "{what}"
        );
    }
    // The control: the launch it was made for is taken.
    let s = spec(&fx, "refused", "exit 3", "");
    let slot = prewarm(&d, &s, "warm-refused-1").await;
    let spawned = within("spawn_warm", d.spawn_warm(slot, s)).await.unwrap();
    assert_eq!(
        within("the end", spawned.handle.wait()).await,
        ExitStatus::Exited { code: 3 }
    );
}

/// What a slot cannot know ahead, a tenant's channel space, is mounted into it at the
/// hand-over: the program finds the directories at `/dev/shm` and iceoryx2's root (made
/// in the slot's fresh `/tmp`), reads what the host put there and writes where the host
/// sees it, exactly as a cold spawn with the same binds does. The control: the same slot
/// launch without them sees its own empty `/dev/shm`.
#[tokio::test(flavor = "multi_thread")]
async fn directories_the_slot_lacks_are_mounted_in_at_the_hand_over() {
    use std::os::unix::fs::PermissionsExt;
    let Some((d, _)) = driver() else {
        return;
    };
    let fx = Fixture::temp();
    let space = tempfile::tempdir().unwrap();
    let (shm, iox2) = (space.path().join("shm"), space.path().join("iox2"));
    for dir in [&shm, &iox2] {
        std::fs::create_dir(dir).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    std::fs::write(shm.join("segment"), "from the host\n").unwrap();
    let script =
        "cat /dev/shm/segment 2>&1; ls /dev/shm; echo from-$0 > /tmp/iceoryx2/w && echo wrote";
    let with_space = |s: &mut SpawnSpec, who: &str| {
        s.argv.push(who.to_owned());
        s.binds.push(bulkhead_driver::Bind {
            source: shm.clone(),
            target: "/dev/shm".into(),
        });
        s.binds.push(bulkhead_driver::Bind {
            source: iox2.clone(),
            target: "/tmp/iceoryx2".into(),
        });
    };
    let mut cold = spec(&fx, "late", script, "");
    with_space(&mut cold, "cold");
    let (st, cold_out) = run(&d, cold, false).await;
    assert_eq!(st, OK, "cold: {cold_out}");
    assert_eq!(
        std::fs::read_to_string(iox2.join("w")).unwrap(),
        "from-cold\n"
    );
    // Each instance maps its own ids: the cold one's file is not the next one's to write.
    std::fs::remove_file(iox2.join("w")).unwrap();
    let mut warm = spec(&fx, "late", script, "");
    let slot = prewarm(&d, &warm, "warm-late-0").await;
    with_space(&mut warm, "warm");
    let spawned = within("spawn_warm", d.spawn_warm(slot, warm))
        .await
        .unwrap_or_else(|e| panic!("the slot refused its space: {e}"));
    let warm_out = within("stdout", read_all(spawned.stdout.unwrap())).await;
    assert_eq!(
        within("the end", spawned.handle.wait()).await,
        OK,
        "{warm_out}"
    );
    assert_eq!(
        warm_out, cold_out,
        "the space from a slot differs from a cold one"
    );
    assert_eq!(warm_out, "from the host\nsegment\nwrote\n");
    assert_eq!(
        std::fs::read_to_string(iox2.join("w")).unwrap(),
        "from-warm\n"
    );
    // Control: without the space the slot shows its own /dev/shm and no iceoryx2 root.
    let mut bare = spec(&fx, "late", script, "");
    bare.argv.push("bare".into());
    let (_, out) = run(&d, bare, true).await;
    assert!(
        !out.contains("from the host") && !out.contains("wrote"),
        "{out}"
    );
}

/// A slot made for a manifest with `sockets:` passes a launch's listening sockets as a
/// cold spawn does: the same socket at descriptor 3 (its inode), `LISTEN_FDS`,
/// `LISTEN_FDNAMES`, and `LISTEN_PID` the program's own pid. The control: a slot made
/// without `sockets:` refuses a launch that brings sockets (the daemon then spawns cold).
#[tokio::test(flavor = "multi_thread")]
async fn listening_sockets_are_handed_over_as_a_cold_spawn_passes_them() {
    use std::os::unix::fs::MetadataExt;
    let Some((d, scope)) = driver() else {
        return;
    };
    let fx = Fixture::temp();
    let sockets =
        "sockets: [{name: web, listen: \"tcp:$PORT\"}, {name: admin, listen: \"unix:a.sock\"}]\n";
    let script =
        "echo \"$LISTEN_FDS $LISTEN_FDNAMES $([ \"$LISTEN_PID\" = $$ ] && echo pid-ok)\"; \
                  readlink /proc/self/fd/3; readlink /proc/self/fd/4; [ -e /proc/self/fd/5 ] || echo no-5";
    let web = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin_path = fx.path("a.sock");
    let admin = std::os::unix::net::UnixListener::bind(&admin_path).unwrap();
    let inode = |fd: &dyn std::os::fd::AsRawFd| {
        std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap()
            .ino()
    };
    let want = format!(
        "2 web:admin pid-ok\nsocket:[{}]\nsocket:[{}]\nno-5\n",
        inode(&web),
        inode(&admin)
    );
    let listen = vec![
        bulkhead_driver::listen::ListenFd {
            name: "web".into(),
            fd: Arc::new(web.into()),
        },
        bulkhead_driver::listen::ListenFd {
            name: "admin".into(),
            fd: Arc::new(admin.into()),
        },
    ];
    let with = |extra: &str| {
        let mut s = spec(&fx, "sockets", script, extra);
        s.listen = listen.clone();
        s
    };
    let (st, cold) = run(&d, with(sockets), false).await;
    assert_eq!((st, cold.as_str()), (OK, want.as_str()), "cold");
    let (st, warm) = run(&d, with(sockets), true).await;
    assert_eq!((st, warm.as_str()), (OK, want.as_str()), "from a slot");
    // The control: a slot made without `sockets:` cannot pass them.
    let s = with("");
    let slot = prewarm(&d, &s, "warm-sockets-0").await;
    match within("spawn_warm", d.spawn_warm(slot, s)).await {
        Err(e @ SpawnError::Invalid { .. }) => {
            assert!(e.to_string().contains("listening sockets"), "{e}")
        }
        Err(e) => panic!("expected a refusal, got {e:?}"),
        Ok(_) => panic!("a slot made without sockets: took a launch with sockets"),
    }
    assert_eq!(cgroups_of(&scope), Vec::<std::path::PathBuf>::new());
}

/// The child half of the crash test: makes a slot in the scope it is given, says so,
/// and waits to be killed.
#[tokio::test(flavor = "multi_thread")]
async fn crash_child_makes_a_slot_and_waits() {
    let Ok(scope) = std::env::var("BULKHEAD_WARM_CRASH_SCOPE") else {
        return; // only as the crash test's child
    };
    let Some(d) = driver_in(ModeChoice::Auto, &scope) else {
        return;
    };
    let fx = Fixture::temp();
    let s = spec(&fx, "crash", "exit 0", "");
    let slot = prewarm(&d, &s, "warm-crash-0").await;
    println!("slot-ready");
    tokio::time::sleep(Duration::from_secs(60)).await;
    drop(slot);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_crash_takes_its_waiting_slots_and_the_next_driver_sweeps_their_cgroups() {
    let scope = new_scope();
    if driver_in(ModeChoice::Auto, &scope).is_none() {
        return;
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_makes_a_slot_and_waits",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("BULKHEAD_WARM_CRASH_SCOPE", &scope)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("slot-ready"))
    });
    assert!(within("the child's slot", ready).await.unwrap());
    let pids = pids_of(&scope);
    assert_eq!(
        pids.len(),
        2,
        "the slot's init and workload process: {pids:?}"
    );
    // The "daemon" dies: its slot's processes die with it (the init's parent-death
    // signal; the waiting workload process with the init's PID namespace).
    child.kill().unwrap();
    child.wait().unwrap();
    until("the slot's processes to die with the daemon", || {
        pids.iter().all(|p| gone(*p))
    })
    .await;
    // Its cgroups stay until the next driver of the scope sweeps them.
    assert!(
        !cgroups_of(&scope).is_empty(),
        "nothing to sweep: no control"
    );
    let _next = driver_in(ModeChoice::Auto, &scope).unwrap();
    assert_eq!(cgroups_of(&scope), Vec::<std::path::PathBuf>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exec_failure_after_the_hand_over_is_an_exec_error_and_leaves_nothing() {
    let Some((d, scope)) = driver() else {
        return;
    };
    let fx = Fixture::temp();
    // Found (it is a file), shown (the working directory is bound), but not executable:
    // only the workload process's execve can tell.
    let program = fx.path("not-executable");
    std::fs::write(&program, "#!/bin/sh\n").unwrap();
    let mut s = spec(&fx, "exec-fails", "exit 0", "");
    s.argv = vec![program.display().to_string()];
    let slot = prewarm(&d, &s, "warm-exec-0").await;
    let pids = pids_of(&scope);
    match within("spawn_warm", d.spawn_warm(slot, s)).await {
        Err(SpawnError::Exec { program: p, source }) => {
            assert_eq!(p, program.display().to_string());
            assert_eq!(
                source.kind(),
                std::io::ErrorKind::PermissionDenied,
                "{source}"
            );
        }
        Err(e) => panic!("expected an exec error, got {e:?}"),
        Ok(_) => panic!("a program without the execute bit was started"),
    }
    assert_eq!(cgroups_of(&scope), Vec::<std::path::PathBuf>::new());
    until("the slot's processes to go", || {
        pids.iter().all(|p| gone(*p))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_whose_waiting_process_died_is_not_alive() {
    let Some((d, scope)) = driver() else {
        return;
    };
    let fx = Fixture::temp();
    let s = spec(&fx, "dead", "exit 0", "");
    let slot = prewarm(&d, &s, "warm-dead-0").await;
    assert!(slot.alive());
    // The waiting workload process is PID 2 of the slot's namespace.
    let waiting = pids_of(&scope)
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status"))
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with("NSpid:") && l.ends_with("\t2"))
        })
        .expect("the slot's waiting process");
    // SAFETY: kill(2) of a process of the slot.
    assert_eq!(unsafe { libc::kill(waiting as i32, libc::SIGKILL) }, 0);
    until("the slot to report it is dead", || !slot.alive()).await;
    within("discard", slot.discard()).await;
    assert_eq!(cgroups_of(&scope), Vec::<std::path::PathBuf>::new());
}

// One thread: no other worker can see the exec's end-of-file during the one poll.
#[tokio::test(flavor = "current_thread")]
async fn a_launch_dropped_after_its_hand_over_leaves_nothing_running() {
    let Some((d, scope)) = driver() else {
        return;
    };
    let fx = Fixture::temp();
    let s = spec(&fx, "dropped", "sleep 1000", "");
    let token = bulkhead_driver::conformance::token_of(&s);
    let slot = prewarm(&d, &s, "warm-dropped-0").await;
    let pids = pids_of(&scope);
    // Polled once (the hand-over is written, the exec not yet seen), then dropped: the
    // caller went away.
    let mut launch = Box::pin(d.spawn_warm(slot, s));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let polled = std::future::Future::poll(launch.as_mut(), &mut cx);
    assert!(
        polled.is_pending(),
        "the launch finished within its first poll"
    );
    drop(launch);
    assert_eq!(cgroups_of(&scope), Vec::<std::path::PathBuf>::new());
    until("the slot's processes to go", || {
        pids.iter().all(|p| gone(*p))
    })
    .await;
    assert_eq!(
        bulkhead_driver::conformance::processes_with_token(&token),
        Vec::<u32>::new()
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_prewarm_dropped_while_its_clone_runs_leaves_nothing() {
    let Some((d, scope)) = driver() else {
        return;
    };
    let fx = Fixture::temp();
    let s = spec(&fx, "dropped-prewarm", "exit 0", "");
    let mut making = Box::pin(d.prewarm(warm_spec(&s, "warm-dropped-prewarm-0")));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let polled = std::future::Future::poll(making.as_mut(), &mut cx);
    assert!(polled.is_pending(), "the slot was made within one poll");
    assert!(!cgroups_of(&scope).is_empty(), "no cgroup yet: no control");
    drop(making);
    // The spawner thread may still be cloning: it kills what it made when it finds the
    // caller gone.
    until("the slot's cgroups and processes to go", || {
        cgroups_of(&scope).is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(cgroups_of(&scope), Vec::<std::path::PathBuf>::new());
}
