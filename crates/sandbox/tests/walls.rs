//! The walls and limits of the sandbox driver, each against the real kernel: PID 1, the
//! hostname, the read-only root and binds, `network: none`, pids.max, the OOM killer,
//! teardown, dropped capabilities, and both cgroup paths.
//!
//! Every test skips with a printed reason where the driver cannot start (no root, no
//! cgroups).

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bulkhead_core::event::ExitStatus;
use bulkhead_core::signal::Signal;
use bulkhead_core::spec::parse_manifest;
use bulkhead_driver::conformance::{
    processes_with_token, read_all, token_of, wait_for_file, within, Fixture, Running,
};
use bulkhead_driver::{Driver, ExitCause, SpawnSpec};
use bulkhead_sandbox::cgroup::ModeChoice;
use bulkhead_sandbox::{SandboxConfig, SandboxDriver};

fn driver(mode: ModeChoice) -> Option<(SandboxDriver, String)> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let scope = format!(
        "walls-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    match SandboxDriver::new(SandboxConfig {
        mode,
        scope: scope.clone(),
        min_available_memory: 0,
        ..SandboxConfig::default()
    }) {
        Ok(d) => Some((d, scope)),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// A spawn spec for `script` with the given extra manifest text (`sandbox:`,
/// `resources:` sections); the fixture's directory is bound in read-write.
fn spec(fx: &Fixture, name: &str, script: &str, extra: &str) -> SpawnSpec {
    let mut s = fx.spawn_spec(name, script);
    let text = format!("name: {name}\ncommand: [sh]\ndriver: sandbox\n{extra}");
    let mut w = parse_manifest(&format!("{name}/manifest.yaml"), name, &text)
        .unwrap_or_else(|e| panic!("{e}"));
    w.command = s.argv.clone();
    s.spec = Arc::new(w);
    s.binds.push(bulkhead_driver::Bind::same(&fx.workdir));
    // The default wall runs the workload as an unprivileged uid of its tenant's range.
    open_to_all(&fx.workdir);
    s
}

async fn start(d: &SandboxDriver, s: SpawnSpec) -> Running {
    let token = token_of(&s);
    let what = format!("instance {}", s.instance);
    // `BULKHEAD_WALLS_THROUGH_SLOTS=1` (a second run in `.ci/run`): every instance is
    // started in a warm slot, so each attack and its control also meet a pooled instance.
    let through_slots = std::env::var_os("BULKHEAD_WALLS_THROUGH_SLOTS").is_some();
    let spawn = async {
        if through_slots {
            bulkhead_driver::conformance::spawn_through_slot(d, s).await
        } else {
            d.spawn(s).await
        }
    };
    let spawned = within("spawn", spawn)
        .await
        .unwrap_or_else(|e| panic!("spawn failed: {e}"));
    Running {
        spawned,
        token,
        what,
    }
}

/// Runs to the end; returns the status and stdout.
async fn run(d: &SandboxDriver, s: SpawnSpec) -> (ExitStatus, String) {
    let mut r = start(d, s).await;
    let out = r.spawned.stdout.take().unwrap();
    let out = within("stdout", read_all(out)).await;
    (r.wait().await, out)
}

const OK: ExitStatus = ExitStatus::Exited { code: 0 };

#[tokio::test(flavor = "multi_thread")]
async fn the_instance_is_pid_1_and_sees_no_host_process() {
    let Some((d, _)) = driver(ModeChoice::Auto) else {
        return;
    };
    let fx = Fixture::temp();
    // Our init is PID 1 and the workload PID 2.
    let script = "echo $$; ls /proc | grep -c '^[0-9]'; cat /proc/1/comm";
    let (st, out) = run(&d, spec(&fx, "pid-one", script, "")).await;
    assert_eq!(st, OK, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "2", "{out}");
    let visible: u32 = lines[1].parse().unwrap();
    assert!(visible <= 4, "processes visible inside: {out}");
    // Without init the workload itself is PID 1.
    let (st, out) = run(
        &d,
        spec(
            &fx,
            "pid-one-noinit",
            "echo $$",
            "sandbox: { init: false }\n",
        ),
    )
    .await;
    assert_eq!(st, OK);
    assert_eq!(out.trim(), "1");
}

/// No long-lived process of an instance is a copy of the daemon: the init execs
/// bulkhead-init (a small static program, from a sealed memfd) once it forked the
/// workload, so it holds none of the daemon's memory, however large. Here the test
/// process, which hosts the driver as the daemon does, first writes 64 MiB; the init's
/// anonymous memory stays under 2 MiB (it would be those 64 MiB for a copy: the control
/// is this process itself).
#[tokio::test(flavor = "multi_thread")]
async fn the_init_holds_none_of_the_daemons_memory() {
    let Some((d, _)) = driver(ModeChoice::Auto) else {
        return;
    };
    let heap = bulkhead_driver::conformance::daemon_memory();
    let fx = Fixture::temp();
    let r = start(&d, spec(&fx, "init-memory", "sleep 60", "")).await;
    let h = r.handle();
    bulkhead_driver::conformance::assert_runs_alone(
        h.pid().unwrap(),
        "/memfd:bulkhead-init",
        "the init",
    );
    drop(heap);
    h.signal(bulkhead_core::signal::Signal::KILL).unwrap();
    r.wait().await;
}

/// Neither a cold spawn nor a warm slot (with an init or without) makes a copy of the
/// daemon's memory: their first processes run in it until their exec (`CLONE_VM`), so
/// none of this process's pages becomes copy-on-write and rewriting them afterwards
/// takes no fault. The control: a spawn whose hand-over does not fit its pipe (300 KiB of
/// arguments) forks, and the same rewrite then faults on every page.
#[tokio::test(flavor = "multi_thread")]
async fn neither_a_cold_spawn_nor_a_slot_copies_the_daemons_memory() {
    let Some((d, _)) = driver(ModeChoice::Auto) else {
        return;
    };
    if std::env::var_os("BULKHEAD_WALLS_THROUGH_SLOTS").is_some() {
        eprintln!("skipped: every instance comes from a slot here, and slots are made by a copy");
        return;
    }
    const LEN: usize = 64 << 20;
    const PAGE: usize = 4096;
    let mut heap = vec![0u8; LEN + 2 * (2 << 20)];
    // Small pages only (a copy of a huge page faults once for 2 MiB).
    let start = (heap.as_ptr() as usize).next_multiple_of(2 << 20) - heap.as_ptr() as usize;
    // SAFETY: madvise on a range inside our own allocation.
    unsafe {
        libc::madvise(
            heap.as_mut_ptr().add(start).cast(),
            LEN,
            libc::MADV_NOHUGEPAGE,
        )
    };
    let pages = &mut heap[start..start + LEN];
    // Minor faults of this thread while it rewrites one byte of every page.
    let mut rewrite = || {
        let faults = || {
            // SAFETY: getrusage into a zeroed struct.
            unsafe {
                let mut ru: libc::rusage = std::mem::zeroed();
                libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
                ru.ru_minflt
            }
        };
        let before = faults();
        for i in (0..LEN).step_by(PAGE) {
            pages[i] = pages[i].wrapping_add(1);
        }
        std::hint::black_box(&pages);
        faults() - before
    };
    rewrite();
    assert!(rewrite() < 100, "the baseline rewrite faults");
    let fx = Fixture::temp();
    let (st, _) = run(&d, spec(&fx, "no-copy", "true", "")).await;
    assert_eq!(st, OK);
    let shared = rewrite();
    let mut big = spec(&fx, "copy", "true", "");
    big.argv.extend((0..3).map(|_| "x".repeat(100 << 10)));
    let (st, _) = run(&d, big).await;
    assert_eq!(st, OK);
    let copied = rewrite();
    assert!(
        copied > (LEN / PAGE / 2) as i64,
        "the control: after a forked spawn the rewrite took only {copied} faults"
    );
    assert!(
        shared < 1000,
        "after a cold spawn the rewrite of {} pages took {shared} faults (a copy: {copied})",
        LEN / PAGE
    );
    // A slot: made, then handed a program that ends at once.
    let through_slot = |s| async {
        let spawned = within(
            "spawn",
            bulkhead_driver::conformance::spawn_through_slot(&d, s),
        )
        .await
        .unwrap_or_else(|e| panic!("spawn failed: {e}"));
        let r = Running {
            spawned,
            token: String::new(),
            what: "slot".into(),
        };
        assert_eq!(r.wait().await, OK);
    };
    through_slot(spec(&fx, "slot-no-copy", "true", "")).await;
    let slot = rewrite();
    through_slot(spec(
        &fx,
        "slot-no-init",
        "true",
        "sandbox: { init: false }\n",
    ))
    .await;
    let slot_no_init = rewrite();
    assert!(
        slot < 1000 && slot_no_init < 1000,
        "after a slot the rewrite took {slot} faults, after one without an init \
         {slot_no_init} (a copy: {copied})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hostname_is_the_instance_id_unless_set() {
    let Some((d, _)) = driver(ModeChoice::Auto) else {
        return;
    };
    let fx = Fixture::temp();
    let (st, out) = run(&d, spec(&fx, "host", "cat /proc/sys/kernel/hostname", "")).await;
    assert_eq!(st, OK);
    assert_eq!(out.trim(), "ns:conformance:host");
    let (_, out) = run(
        &d,
        spec(
            &fx,
            "host2",
            "cat /proc/sys/kernel/hostname",
            "sandbox: { hostname: web-1 }\n",
        ),
    )
    .await;
    assert_eq!(out.trim(), "web-1");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_root_rejects_writes_while_binds_work() {
    let Some((d, _)) = driver(ModeChoice::Auto) else {
        return;
    };
    let fx = Fixture::temp();
    let ro = tempfile::tempdir().unwrap();
    let rw = tempfile::tempdir().unwrap();
    open_to_all(rw.path());
    let extra = format!(
        "sandbox:\n  binds:\n    - {{ source: {}, target: /var/tmp/ro, readonly: true }}\n    - {{ source: {} }}\n  tmpfs: [/var/tmp]\n",
        ro.path().display(),
        rw.path().display()
    );
    let script = format!(
        "touch /usr/bulkhead-test 2>/dev/null && echo root-writable; \
         touch /var/tmp/ro/x 2>/dev/null && echo ro-writable; \
         echo in > {rw}/from-inside || echo rw-failed; \
         echo t > /tmp/t && echo tmp-ok; echo v > /var/tmp/v && echo tmpfs-ok; \
         echo w > in-workdir && echo workdir-ok; ls /dev",
        rw = rw.path().display()
    );
    let (st, out) = run(&d, spec(&fx, "readonly", &script, &extra)).await;
    assert_eq!(st, OK, "{out}");
    assert!(!out.contains("root-writable"), "{out}");
    assert!(!out.contains("ro-writable"), "{out}");
    assert!(!out.contains("rw-failed"), "{out}");
    for ok in [
        "tmp-ok",
        "tmpfs-ok",
        "workdir-ok",
        "null",
        "urandom",
        "pts",
        "shm",
    ] {
        assert!(out.contains(ok), "missing {ok}: {out}");
    }
    assert!(!Path::new("/usr/bulkhead-test").exists());
    assert_eq!(
        std::fs::read_to_string(rw.path().join("from-inside")).unwrap(),
        "in\n"
    );
    // The private /tmp did not leak to the host.
    assert!(!Path::new("/tmp/t").exists() || std::fs::read_to_string("/tmp/t").unwrap() != "t\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn network_none_has_no_route_out() {
    let Some((d, _)) = driver(ModeChoice::Auto) else {
        return;
    };
    let fx = Fixture::temp();
    let script = "tail -n +2 /proc/net/route | wc -l; tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; cat /sys/class/net/lo/operstate 2>/dev/null; ip -o link show lo 2>/dev/null | grep -c UP";
    let (st, out) = run(
        &d,
        spec(&fx, "net-none", script, "sandbox: { network: none }\n"),
    )
    .await;
    assert_eq!(st, OK, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0].trim(), "0", "routes: {out}");
    assert_eq!(lines[1], "lo", "interfaces: {out}");
    assert_ne!(lines.get(2).copied(), Some("lo"), "only one lo: {out}");
    let host_ifaces = std::fs::read_to_string("/proc/net/dev").unwrap();
    for l in host_ifaces.lines().skip(2) {
        let name = l.split(':').next().unwrap().trim();
        if name != "lo" {
            assert!(
                !lines.contains(&name),
                "host interface {name} visible: {out}"
            );
        }
    }
    assert!(out.lines().last() == Some("1"), "lo is up: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fork_bomb_stops_at_pids_max() {
    let Some((d, _)) = driver(ModeChoice::Auto) else {
        return;
    };
    if !Path::new("/usr/bin/perl").exists() {
        eprintln!("skipped: needs /usr/bin/perl");
        return;
    }
    let fx = Fixture::temp();
    // perl's fork returns undef at the limit where a shell would give up.
    let script = "exec perl -e 'my $n = 0; for (1..64) { my $p = fork; if (!defined $p) { $n++; next } if ($p == 0) { sleep 1000; exit 0 } } open(my $f, \">\", \"bomb.ready\") or die; print $f $n; close $f; sleep 1000'";
    let r = start(&d, spec(&fx, "bomb", script, "resources: { pids: 16 }\n")).await;
    wait_for_file(&r, &fx.path("bomb.ready")).await;
    // Written after the loop: the file may still be empty for a moment.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let failed: u32 = std::fs::read_to_string(fx.path("bomb.ready"))
        .unwrap()
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(failed > 0, "every fork succeeded");
    let stats = r.handle().stats().unwrap();
    assert!(stats.pids <= 16, "{stats:?}");
    assert_eq!(stats.pids_limit, Some(16));
    assert!(stats.pids_limit_hits.unwrap_or(0) > 0, "{stats:?}");
    // The host still forks.
    assert!(std::process::Command::new("true")
        .status()
        .unwrap()
        .success());
    within(
        "stop",
        r.handle().stop(Signal::TERM, Duration::from_secs(2)),
    )
    .await;
    assert!(processes_with_token(&r.token).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_hog_is_reported_oom_killed() {
    let Some((d, _)) = driver(ModeChoice::Auto) else {
        return;
    };
    let fx = Fixture::temp();
    // tail keeps the whole (newline-free) last line in memory.
    let script = "exec tail -n 1 /dev/zero";
    let r = start(
        &d,
        spec(&fx, "hog", script, "resources: { memory: 32Mi }\n"),
    )
    .await;
    let st = r.wait().await;
    assert_eq!(
        st,
        ExitStatus::Signaled {
            signal: 9,
            core_dumped: false
        }
    );
    assert_eq!(
        r.handle().exit_cause(),
        Some(ExitCause::OomKilled {
            limit_bytes: Some(32 << 20)
        }),
        "{st}"
    );
}

/// Instance cgroup directories left under the driver's scope in every hierarchy.
fn leftover_cgroups(scope: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(roots) = std::fs::read_dir("/sys/fs/cgroup") else {
        return out;
    };
    fn walk(dir: &Path, scope: &str, out: &mut Vec<String>, depth: u32) {
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
                    out.extend(
                        inner
                            .flatten()
                            .filter(|e| e.path().is_dir())
                            .map(|e| e.path().display().to_string()),
                    );
                }
            } else {
                walk(&p, scope, out, depth + 1);
            }
        }
    }
    for r in roots.flatten() {
        walk(&r.path(), scope, &mut out, 0);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn teardown_leaves_no_cgroup_and_no_process() {
    for mode in [ModeChoice::Auto, ModeChoice::V1, ModeChoice::Unified] {
        let Some((d, scope)) = driver(mode) else {
            return;
        };
        let fx = Fixture::temp();
        // Limits need controllers: none on this machine's cgroup2 mount.
        let limits = if d.capabilities().controllers.is_empty() {
            ""
        } else {
            "resources: { memory: 64Mi, pids: 32, cpu: 0.5 }\n"
        };
        let r = start(
            &d,
            spec(
                &fx,
                "teardown",
                "sleep 1000 & sleep 1000 & : > td.ready; wait",
                limits,
            ),
        )
        .await;
        wait_for_file(&r, &fx.path("td.ready")).await;
        assert!(!leftover_cgroups(&scope).is_empty(), "{mode:?}: no cgroup");
        let stats = r.handle().stats().unwrap();
        assert!(stats.pids >= 3, "{mode:?}: {stats:?}");
        within(
            "stop",
            r.handle().stop(Signal::TERM, Duration::from_secs(2)),
        )
        .await;
        assert_eq!(leftover_cgroups(&scope), Vec::<String>::new(), "{mode:?}");
        assert_eq!(
            processes_with_token(&r.token),
            Vec::<u32>::new(),
            "{mode:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_capabilities_hold() {
    let Some((d, _)) = driver(ModeChoice::Auto) else {
        return;
    };
    let fx = Fixture::temp();
    let script =
        "mkdir -p /tmp/m; mount -t tmpfs none /tmp/m 2>/dev/null && echo mounted; grep CapBnd /proc/self/status";
    // Default: no capabilities, and the seccomp filter; also without the filter.
    for extra in ["", "sandbox: { seccomp: none }\n"] {
        let (st, out) = run(&d, spec(&fx, "caps", script, extra)).await;
        assert_eq!(st, OK, "{out}");
        assert!(!out.contains("mounted"), "{extra}: {out}");
        assert!(out.contains("CapBnd:\t0000000000000000"), "{out}");
    }
    // With CAP_SYS_ADMIN kept and no filter, the same mount works: the wall was the
    // capability set.
    let (st, out) = run(
        &d,
        spec(
            &fx,
            "caps-admin",
            script,
            "sandbox: { seccomp: none, capabilities: [CAP_SYS_ADMIN] }\n",
        ),
    )
    .await;
    assert_eq!(st, OK, "{out}");
    assert!(out.contains("mounted"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_instance_is_born_in_its_cgroups_in_each_mode() {
    // Also from a user namespace: the v1 `cgroup.procs` writes are checked against the
    // daemon's credentials (the fds were opened before the clone).
    let modes = [ModeChoice::Auto, ModeChoice::V1, ModeChoice::Unified];
    for (mode, extra) in modes
        .into_iter()
        .map(|m| (m, ""))
        .chain(modes.map(|m| (m, "sandbox: { user_namespace: { uid: 100000 } }\n")))
    {
        let Some((d, scope)) = driver(mode) else {
            return;
        };
        let caps = d.capabilities();
        let fx = Fixture::temp();
        open_to_all(&fx.workdir);
        let (st, out) = run(&d, spec(&fx, "born", "cat /proc/self/cgroup", extra)).await;
        assert_eq!(st, OK, "{mode:?} {extra}: {out}");
        let unified = out.lines().find(|l| l.starts_with("0::"));
        let memory = out.lines().find(|l| l.contains(":memory:"));
        if caps.clone_into_cgroup {
            assert!(unified.unwrap().contains(&scope), "{mode:?}: {out}");
        }
        if caps.controllers.iter().any(|c| c == "memory") && caps.cgroup_mode != "v2" {
            assert!(memory.unwrap().contains(&scope), "{mode:?}: {out}");
        }
        match mode {
            ModeChoice::V1 => assert_eq!(caps.cgroup_mode, "v1"),
            ModeChoice::Unified => assert!(caps.clone_into_cgroup),
            ModeChoice::Auto => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn spawn_admission_refuses_below_the_floor() {
    let Ok(d) = SandboxDriver::new(SandboxConfig {
        min_available_memory: u64::MAX / 2,
        scope: format!("admission-{}", std::process::id()),
        ..SandboxConfig::default()
    }) else {
        eprintln!("skipped: the sandbox driver cannot start here");
        return;
    };
    let fx = Fixture::temp();
    let e = d
        .spawn(spec(&fx, "admission", "exit 0", ""))
        .await
        .err()
        .expect("a launch below the memory floor must fail");
    assert!(e.to_string().contains("min-available-memory"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_workload_runs_as_the_configured_user() {
    let Some((d, _)) = driver(ModeChoice::Auto) else {
        return;
    };
    let fx = Fixture::temp();
    let (st, out) = run(
        &d,
        spec(
            &fx,
            "user",
            "id -u; id -g; id -G; grep CapEff /proc/self/status",
            "sandbox: { user: { uid: 65534, gid: 65533 } }\n",
        ),
    )
    .await;
    assert_eq!(st, OK, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..3], ["65534", "65533", "65533"], "{out}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
}

/// Makes `dir` reachable and writable by the namespace's mapped uid.
fn open_to_all(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_namespace_runs_root_inside_as_an_unprivileged_uid_outside() {
    let Some((d, _)) = driver(ModeChoice::Auto) else {
        return;
    };
    let fx = Fixture::temp();
    open_to_all(&fx.workdir);
    let rw = tempfile::tempdir().unwrap();
    open_to_all(rw.path());
    // A root-owned file, writable by its owner only.
    std::fs::write(rw.path().join("root-owned"), "host\n").unwrap();
    let extra = format!(
        "sandbox:\n  user_namespace: {{ uid: 100000, count: 65536 }}\n  network: none\n  binds:\n    - {{ source: {} }}\n",
        rw.path().display()
    );
    let script = format!(
        "id -u; id -g; grep CapEff /proc/self/status; \
         echo made > {rw}/made-inside && echo created; \
         echo x >> {rw}/root-owned 2>/dev/null && echo root-file-writable; \
         touch /usr/bulkhead-test 2>/dev/null && echo root-writable; \
         head -c 4 /dev/urandom >/dev/null && echo > /dev/null && echo devices-ok; \
         hostname; touch started; \
         while [ ! -e stop ]; do sleep 0.05; done",
        rw = rw.path().display()
    );
    let s = spec(&fx, "userns", &script, &extra);
    let token = token_of(&s);
    let mut r = start(&d, s).await;
    wait_for_file(&r, &fx.workdir.join("started")).await;
    // Seen from the host, the workload is uid/gid 100000.
    let pids = processes_with_token(&token);
    assert!(!pids.is_empty(), "no workload process found");
    let mut seen = 0;
    for pid in pids {
        // RACE: the scan can catch the shell's fork for a `sleep` of its loop, gone by
        // now; the shell itself stays.
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        seen += 1;
        for (key, want) in [
            ("Uid:", "100000\t100000\t100000\t100000"),
            ("Gid:", "100000\t100000\t100000\t100000"),
        ] {
            let line = status.lines().find(|l| l.starts_with(key)).unwrap();
            assert_eq!(line[key.len()..].trim(), want, "{status}");
        }
    }
    assert!(seen > 0, "every workload process was gone");
    std::fs::write(fx.workdir.join("stop"), "").unwrap();
    let out = r.spawned.stdout.take().unwrap();
    let out = within("stdout", read_all(out)).await;
    assert_eq!(r.wait().await, OK, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["0", "0"], "root inside: {out}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    for ok in ["created", "devices-ok", "userns"] {
        assert!(out.contains(ok), "missing {ok}: {out}");
    }
    assert!(!out.contains("root-file-writable"), "{out}");
    assert!(!out.contains("root-writable"), "{out}");
    // Files it creates belong to the mapped uid on the host; root's stayed intact.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(rw.path().join("made-inside")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (100000, 100000));
    assert_eq!(
        std::fs::read_to_string(rw.path().join("root-owned")).unwrap(),
        "host\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_namespace_with_a_user_and_capabilities() {
    let Some((d, _)) = driver(ModeChoice::Auto) else {
        return;
    };
    let fx = Fixture::temp();
    open_to_all(&fx.workdir);
    let (st, out) = run(
        &d,
        spec(
            &fx,
            "userns-user",
            "id -u; id -g; id -G; grep -E '^(Uid|CapEff)' /proc/self/status",
            "sandbox:\n  user_namespace: { uid: 200000, gid: 300000, count: 2000 }\n  user: { uid: 1000 }\n  capabilities: [CAP_NET_BIND_SERVICE]\n",
        ),
    )
    .await;
    assert_eq!(st, OK, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..3], ["1000", "1000", "1000"], "{out}");
    assert!(out.contains("CapEff:\t0000000000000400"), "{out}");
}

/// On a pure cgroup v2 host whose controllers reach the daemon's own cgroup (a systemd
/// service with `Delegate=yes`), the driver runs in v2 mode with every limit, even though
/// that cgroup holds processes: they move into a leaf so that it can hand the
/// controllers down. Hybrid and v1 hosts skip (`scripts/vm-cgroup2` runs it on a pure v2
/// kernel).
#[tokio::test(flavor = "multi_thread")]
async fn a_pure_v2_host_gets_v2_mode_from_a_cgroup_with_processes() {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let v1 = mounts.lines().any(|l| l.contains(" - cgroup "));
    let controllers =
        std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
    if v1 || !controllers.split_whitespace().any(|c| c == "memory") {
        // scripts/vm-cgroup2 sets this: there, a skip would hide the very thing it runs for.
        assert!(
            std::env::var_os("BULKHEAD_EXPECT_CGROUP_V2").is_none(),
            "BULKHEAD_EXPECT_CGROUP_V2 is set but this is not a pure v2 host"
        );
        eprintln!("skipped: not a pure cgroup v2 host with the memory controller");
        return;
    }
    let Some((d, _)) = driver(ModeChoice::Auto) else {
        panic!("the sandbox driver must start on a pure v2 host");
    };
    let caps = d.capabilities();
    assert_eq!(caps.cgroup_mode, "v2", "{caps:?}");
    for c in ["memory", "pids", "cpu"] {
        assert!(caps.controllers.iter().any(|x| x == c), "{caps:?}");
    }
    // Our own cgroup hands the controllers down, so none of our processes may be left
    // in it: we are in its leaf.
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/");
    if own != "/" {
        assert!(
            own.ends_with(&format!("/{}", bulkhead_sandbox::cgroup::SUPERVISOR_LEAF)),
            "{own}"
        );
    }
    // The limits reach the instance's own cgroup.
    let fx = Fixture::temp();
    let r = start(
        &d,
        spec(
            &fx,
            "v2-limits",
            "exec sleep 1000",
            "resources: {memory: 64Mi, pids: 32}\n",
        ),
    )
    .await;
    let pid = r.handle().pid().expect("a pid");
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let cg = cg
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap()
        .to_owned();
    let dir = Path::new("/sys/fs/cgroup").join(cg.trim_start_matches('/'));
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    assert_eq!(
        read("memory.max").trim(),
        (64u64 << 20).to_string(),
        "{}",
        dir.display()
    );
    assert_eq!(read("pids.max").trim(), "32", "{}", dir.display());
    assert_eq!(read("memory.oom.group").trim(), "1", "{}", dir.display());
    within("stop", r.handle().stop(Signal::KILL, Duration::ZERO)).await;
}

// ---------------------------------------------------------------------------------------
// The escape suite: each case is an attack that must fail behind the default wall, and a
// control that shows the same attack working where the wall is opened on purpose (so
// that a case cannot pass because the attack itself is broken).

/// The Debian python3 (the minimal root shows `/usr`, not a pyenv under `/root`).
const PY: &str = "/usr/bin/python3";

fn python_available() -> bool {
    let ok = Path::new(PY).exists();
    if !ok {
        eprintln!("skipped: {PY} is missing (apt-get install python3)");
    }
    ok
}

/// The host's view, opened on purpose: host root, host ids, no kernel protection.
const OPEN: &str = "sandbox: { root: host, user_namespace: host, protect_kernel: false }\n";

/// A listening Unix socket owned by root, mode 0600, in a root-owned 0755 folder: what
/// `/run/docker.sock` or the daemon's own socket look like to a workload.
struct RootSocket {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    _listener: std::os::unix::net::UnixListener,
}

fn root_socket() -> RootSocket {
    use std::os::unix::fs::PermissionsExt;
    // Outside /tmp, which every sandbox replaces with its own.
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("root.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    RootSocket {
        _dir: dir,
        path,
        _listener: listener,
    }
}

fn connect_script(path: &Path) -> String {
    format!(
        "{PY} -c \"import socket; s=socket.socket(socket.AF_UNIX); s.connect('{}'); print('connected')\" 2>&1; true",
        path.display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn escape_a_root_owned_host_socket_is_out_of_reach() {
    let Some((d, _)) = driver(ModeChoice::Auto) else {
        return;
    };
    if !python_available() {
        return;
    }
    let fx = Fixture::temp();
    let sock = root_socket();
    let script = connect_script(&sock.path);
    // Default: the minimal root does not show it at all.
    let (_, out) = run(&d, spec(&fx, "sock-hidden", &script, "")).await;
    assert!(!out.contains("connected"), "{out}");
    assert!(out.contains("No such file"), "{out}");
    // Bound in on purpose: still refused, the workload is not the host's root.
    let dir = sock.path.parent().unwrap().display().to_string();
    let bound = format!("sandbox: {{ binds: [{{ source: {dir:?} }}] }}\n");
    let (_, out) = run(&d, spec(&fx, "sock-bound", &script, &bound)).await;
    assert!(!out.contains("connected"), "{out}");
    assert!(out.contains("Permission denied"), "{out}");
    // Control: the host's root and ids, as the first wave's default was.
    let (_, out) = run(&d, spec(&fx, "sock-open", &script, OPEN)).await;
    assert!(out.contains("connected"), "control: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn escape_kernel_settings_cannot_be_written() {
    let Some((d, _)) = driver(ModeChoice::Auto) else {
        return;
    };
    let fx = Fixture::temp();
    // The value is written back unchanged: the control must not change the host.
    let knob = "/proc/sys/kernel/printk_ratelimit_burst";
    let script = format!(
        "v=$(cat {knob}); (echo $v > {knob}) 2>&1 && echo knob-written; \
         (cat /proc/sys/kernel/core_pattern > /proc/sys/kernel/core_pattern) 2>/dev/null \
         && echo core-pattern-written; true"
    );
    for (name, extra) in [
        ("knob", ""),
        ("knob-hostids", "sandbox: { user_namespace: host }\n"),
        (
            "knob-hostroot",
            "sandbox: { root: host, user_namespace: host }\n",
        ),
    ] {
        let (_, out) = run(&d, spec(&fx, name, &script, extra)).await;
        assert!(!out.contains("knob-written"), "{extra}: {out}");
        assert!(!out.contains("core-pattern-written"), "{extra}: {out}");
    }
    let (_, out) = run(&d, spec(&fx, "knob-open", &script, OPEN)).await;
    assert!(out.contains("knob-written"), "control: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn escape_raw_clone_cannot_make_namespaces() {
    let Some((d, _)) = driver(ModeChoice::Auto) else {
        return;
    };
    if !python_available() {
        return;
    }
    let fx = Fixture::temp();
    // clone(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | SIGCHLD) through the raw system
    // call (glibc's unshare is not involved); clone3 with no flags; then a thread, which
    // glibc starts with clone3 and, on ENOSYS, with clone.
    std::fs::write(
        fx.workdir.join("clone.py"),
        r#"import ctypes, os, threading
libc = ctypes.CDLL(None, use_errno=True)
r = libc.syscall(56, 0x10000000 | 0x20000 | 0x40000000 | 17, 0, 0, 0, 0)
if r == 0:
    os._exit(0)
if r > 0:
    os.waitpid(r, 0)
    print('clone-made-namespaces')
else:
    print('clone-errno', ctypes.get_errno())
args = (ctypes.c_uint64 * 11)()
args[4] = 17
r = libc.syscall(435, ctypes.byref(args), 88)
if r == 0:
    os._exit(0)
if r > 0:
    os.waitpid(r, 0)
    print('clone3-ran')
else:
    print('clone3-errno', ctypes.get_errno())
t = threading.Thread(target=lambda: print('thread-ran'))
t.start()
t.join()
"#,
    )
    .unwrap();
    let script = format!("{PY} clone.py");
    let s = spec(&fx, "clone", &script, "");
    let mut r = start(&d, s).await;
    let out = within("stdout", read_all(r.spawned.stdout.take().unwrap())).await;
    let err = within("stderr", read_all(r.spawned.stderr.take().unwrap())).await;
    assert_eq!(r.wait().await, OK, "{out}{err}");
    assert!(out.contains("clone-errno 1"), "EPERM: {out}");
    assert!(out.contains("clone3-errno 38"), "ENOSYS: {out}");
    assert!(out.contains("thread-ran"), "threads still start: {out}");
    // Control: the group opened by name.
    let (st, out) = run(
        &d,
        spec(
            &fx,
            "clone-open",
            &script,
            "sandbox: { seccomp_allow: [namespaces] }\n",
        ),
    )
    .await;
    assert_eq!(st, OK, "{out}");
    assert!(out.contains("clone-made-namespaces"), "control: {out}");
    assert!(out.contains("clone3-ran"), "control: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn escape_no_descriptor_of_the_daemon_is_inherited() {
    let Some((d, _)) = driver(ModeChoice::Auto) else {
        return;
    };
    let fx = Fixture::temp();
    // What the first wave leaked: a directory fd (here `/`) at a high number, open in
    // the spawning process without close-on-exec.
    const LEAKED: i32 = 251;
    // SAFETY: open and dup2 on plain values; the fd is ours and closed below.
    let fd = unsafe {
        let fd = libc::open(c"/".as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
        assert!(fd >= 0);
        assert_eq!(libc::dup2(fd, LEAKED), LEAKED);
        libc::close(fd);
        LEAKED
    };
    // Not vacuous: the fd is open, inheritable, in this process (the spawner's).
    // SAFETY: fcntl on an fd we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    assert!(flags >= 0 && flags & libc::FD_CLOEXEC == 0);
    let script = "for f in /proc/self/fd/*; do echo fd ${f##*/}; done; \
                  ls /proc/self/fd/251/root 2>/dev/null && echo escaped; true";
    let (_, out) = run(&d, spec(&fx, "fds", script, "")).await;
    let (_, open_out) = run(&d, spec(&fx, "fds-open", script, OPEN)).await;
    // SAFETY: our fd.
    unsafe { libc::close(fd) };
    for out in [&out, &open_out] {
        assert!(!out.contains(&format!("fd {LEAKED}")), "{out}");
        assert!(!out.contains("escaped"), "{out}");
        // Only stdio, and the shell's own directory stream.
        let fds: Vec<u32> = out
            .lines()
            .filter_map(|l| l.strip_prefix("fd ")?.parse().ok())
            .collect();
        assert!(fds.iter().all(|&f| f <= 3), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn escape_host_files_and_kernel_state_are_hidden() {
    let Some((d, _)) = driver(ModeChoice::Auto) else {
        return;
    };
    let fx = Fixture::temp();
    let shm = format!("/dev/shm/bulkhead-escape-{}", std::process::id());
    std::fs::write(&shm, "host segment").unwrap();
    // A root-only host folder outside the system directories (like /root; this one
    // exists on every machine the suite runs on, the test VM included).
    let secret = tempfile::tempdir_in("/var/tmp").unwrap();
    std::fs::write(secret.path().join("secret"), "host secret").unwrap();
    let script = format!(
        "cat {}/secret 2>/dev/null; echo; \
         ls /root >/dev/null 2>&1 && echo root-listed; \
         ls /home >/dev/null 2>&1 && echo home-listed; \
         ls /run/docker.sock >/dev/null 2>&1 && echo docker-socket; \
         cat {shm} 2>/dev/null && echo; \
         echo payload > /dev/shm/from-inside; \
         echo nics: $(ls /sys/class/net 2>/dev/null); \
         echo timer_list $(wc -c < /proc/timer_list); \
         echo kcore $(head -c 16 /proc/kcore | wc -c); \
         echo cmdline: $(tr '\\0' ' ' < /proc/1/cmdline); \
         echo comm: $(cat /proc/1/comm); \
         grep -c bulkhead-escape-marker /proc/1/environ 2>/dev/null; true",
        secret.path().display()
    );
    std::env::set_var("BULKHEAD_ESCAPE_MARKER", "bulkhead-escape-marker");
    let (st, out) = run(&d, spec(&fx, "hidden", &script, "")).await;
    assert_eq!(st, OK, "{out}");
    for leak in [
        "host secret",
        "root-listed",
        "home-listed",
        "docker-socket",
        "host segment",
        "eth0",
        "bulkhead-escape-marker",
    ] {
        assert!(!out.contains(leak), "{leak}: {out}");
    }
    assert!(out.contains("timer_list 0"), "masked: {out}");
    assert!(out.contains("kcore 0"), "masked: {out}");
    // The title is cut to the length of the daemon's own argument area (short in the
    // test VM): never the daemon's command line.
    let cmdline = out
        .lines()
        .find(|l| l.starts_with("cmdline: "))
        .unwrap_or("");
    assert!(
        cmdline.starts_with("cmdline: bulkhead-init ns:conformance:") && !cmdline.contains("walls"),
        "{out}"
    );
    assert!(out.contains("comm: bulkhead-init"), "{out}");
    // The instance's /dev/shm went with it.
    assert!(!Path::new("/dev/shm/from-inside").exists());
    // A network namespace of its own gets a fresh /sys: its own devices only.
    let (_, out) = run(
        &d,
        spec(&fx, "hidden-net", &script, "sandbox: { network: none }\n"),
    )
    .await;
    assert!(out.contains("nics: lo"), "{out}");
    // Control: the host's view opened on purpose shows what the wall hides.
    let (_, out) = run(&d, spec(&fx, "hidden-open", &script, OPEN)).await;
    let _ = std::fs::remove_file(&shm);
    assert!(out.contains("host secret"), "control: {out}");
    assert!(
        out.contains("host segment") || out.contains("nics: "),
        "{out}"
    );
    assert!(!out.contains("timer_list 0"), "control: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn escape_host_abstract_sockets_are_out_of_reach() {
    let Some((d, _)) = driver(ModeChoice::Auto) else {
        return;
    };
    if !python_available() {
        return;
    }
    if bulkhead_driver::restrict::landlock_abi() < 6 {
        eprintln!("skipped: the kernel has no Landlock scopes (ABI 6, Linux 6.12)");
        return;
    }
    // A host service listening on an abstract socket (the namespace the host network
    // shares: containerd's shim, X11, other tenants' workloads).
    use std::os::linux::net::SocketAddrExt;
    let name = format!("bulkhead-escape-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    let script = format!(
        "{PY} -c \"import socket; s=socket.socket(socket.AF_UNIX)\ntry:\n  s.connect('\\0{name}'); print('connected')\nexcept OSError as e:\n  print('refused', e.errno)\n\
s2=socket.socket(socket.AF_UNIX); s2.bind('\\0{name}-inner'); s2.listen(1)\n\
c=socket.socket(socket.AF_UNIX); c.connect('\\0{name}-inner'); print('inner-ok')\"; true"
    );
    let fx = Fixture::temp();
    let (_, out) = run(&d, spec(&fx, "abstract", &script, "")).await;
    assert!(out.contains("refused 1"), "EPERM: {out}");
    assert!(
        out.contains("inner-ok"),
        "its own abstract sockets work: {out}"
    );
    let (_, out) = run(
        &d,
        spec(
            &fx,
            "abstract-open",
            &script,
            "sandbox: { abstract_sockets: host }\n",
        ),
    )
    .await;
    assert!(out.contains("connected"), "control: {out}");
}

/// Regression: a working directory of `/` was bound in read-only as "the workload's
/// folder", which put the host's whole root over the minimal one.
#[tokio::test(flavor = "multi_thread")]
async fn a_working_directory_of_slash_keeps_the_minimal_root() {
    let Some((d, _)) = driver(ModeChoice::Auto) else {
        return;
    };
    let fx = Fixture::temp();
    let mut s = spec(
        &fx,
        "slash",
        "pwd; ls /root >/dev/null 2>&1 && echo root-listed; true",
        "",
    );
    s.cwd = "/".into();
    let (st, out) = run(&d, s).await;
    assert_eq!(st, OK, "{out}");
    assert!(out.starts_with("/\n"), "{out}");
    assert!(!out.contains("root-listed"), "{out}");
}

/// The instance's own `/dev/shm`, `/tmp` and `/run` are tmpfs mounts charged to its memory
/// cgroup: filling one stops at the memory limit (an OOM kill ends the instance, as on
/// cgroup v1 here, or the write fails, as seen on cgroup v2), never on the host's memory,
/// and nothing of it is left once the instance is gone.
#[tokio::test(flavor = "multi_thread")]
async fn escape_filling_dev_shm_stops_at_the_memory_limit_and_goes_with_the_instance() {
    let Some((d, _)) = driver(ModeChoice::Auto) else {
        return;
    };
    let fx = Fixture::temp();
    let name = format!("bulkhead-fill-{}", std::process::id());
    let script = format!(
        "dd if=/dev/zero of=/dev/shm/{name} bs=1048576 count=96 2>/dev/null; echo wrote $(wc -c < /dev/shm/{name})"
    );
    let mut r = start(
        &d,
        spec(&fx, "shm-fill", &script, "resources: { memory: 32Mi }\n"),
    )
    .await;
    let out = within("stdout", read_all(r.spawned.stdout.take().unwrap())).await;
    let st = within("the fill to be stopped", r.wait()).await;
    let oom = r.handle().exit_cause()
        == Some(ExitCause::OomKilled {
            limit_bytes: Some(32 << 20),
        });
    let wrote: Option<u64> = out
        .lines()
        .find_map(|l| l.strip_prefix("wrote ")?.trim().parse().ok());
    assert!(
        oom || wrote.is_some_and(|n| n <= 32 << 20),
        "neither OOM-killed nor stopped at the limit: {st}, {out}"
    );
    assert!(!Path::new(&format!("/dev/shm/{name}")).exists());
    // Control: with the limit lifted (no `resources:`), the same fill goes through.
    let mut r = start(&d, spec(&fx, "shm-fill-open", &script, "")).await;
    let out = within("stdout", read_all(r.spawned.stdout.take().unwrap())).await;
    assert_eq!(r.wait().await, OK, "{out}");
    assert!(
        out.contains(&format!("wrote {}", 96 << 20)),
        "control: {out}"
    );
    assert!(!Path::new(&format!("/dev/shm/{name}")).exists());
}

/// `limits: {nofile: N}` holds for the program even when the process hosting the driver
/// (the daemon) holds more descriptors than N: its copies would take every number the
/// sandbox's own steps need under the new limit (Landlock's ruleset failed with "too
/// many open files"), and the waiter needs a few of its own until its exec.
#[tokio::test(flavor = "multi_thread")]
async fn a_low_nofile_holds_while_the_daemon_holds_more_descriptors() {
    let Some((d, _)) = driver(ModeChoice::Auto) else {
        return;
    };
    let held: Vec<std::fs::File> = (0..64)
        .map(|_| std::fs::File::open("/dev/null").unwrap())
        .collect();
    let open = std::fs::read_dir("/proc/self/fd").unwrap().count();
    assert!(
        open > 64,
        "the control: this process holds {open} descriptors"
    );
    let fx = Fixture::temp();
    for n in [5, 16] {
        let (st, out) = run(
            &d,
            spec(
                &fx,
                &format!("nofile-{n}"),
                "ulimit -n",
                &format!("limits: {{nofile: {n}}}\n"),
            ),
        )
        .await;
        assert_eq!((st, out.trim()), (OK, n.to_string().as_str()));
    }
    drop(held);
}
