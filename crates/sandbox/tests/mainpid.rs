//! sd_notify `MAINPID=` in the sandbox driver, against the real kernel: the value is a pid
//! of the sandbox's namespace (`host_pid` translates it), the init follows the process
//! named, a move while the first process still runs makes that one's exit a mere log
//! line, a move made by the exit hook is followed (the first process's exit is not the
//! end yet), a new main process reaped by its own parent ends the run as `LOST_STATUS`
//! (one its parent leaves a zombie and exits keeps its real status), and a pid outside
//! the instance (or the init) is refused.
//!
//! Every test skips with a printed reason where the driver cannot start (no root, no
//! cgroups).

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_core::event::ExitStatus;
use bulkhead_core::signal::Signal;
use bulkhead_core::spec::parse_manifest;
use bulkhead_driver::conformance::{token_of, wait_for_file, within, Fixture, Running};
use bulkhead_driver::process::LOST_STATUS;
use bulkhead_driver::{Driver, MainPidError, SpawnSpec};
use bulkhead_sandbox::{SandboxConfig, SandboxDriver};

fn driver() -> Option<SandboxDriver> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let scope = format!(
        "mainpid-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    match SandboxDriver::new(SandboxConfig {
        scope,
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

/// `script` in a sandbox (with `extra` manifest text); the fixture's directory is bound
/// in read-write and open to the sandbox's unprivileged uid.
async fn start(d: &SandboxDriver, fx: &Fixture, name: &str, script: &str, extra: &str) -> Running {
    let mut s: SpawnSpec = fx.spawn_spec(name, script);
    let text = format!("name: {name}\ncommand: [sh]\ndriver: sandbox\n{extra}");
    let mut w = parse_manifest(&format!("{name}/manifest.yaml"), name, &text)
        .unwrap_or_else(|e| panic!("{e}"));
    w.command = s.argv.clone();
    s.spec = Arc::new(w);
    s.binds.push(bulkhead_driver::Bind::same(&fx.workdir));
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fx.workdir, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let token = token_of(&s);
    let what = format!("instance {}", s.instance);
    let spawned = within("spawn", d.spawn(s))
        .await
        .unwrap_or_else(|e| panic!("spawn failed: {e}"));
    Running {
        spawned,
        token,
        what,
    }
}

/// Starts `sleep 60` in the background, writes its pid (the sandbox's) to `main.pid`,
/// waits for the file `go`, then runs `then`.
fn script(then: &str) -> String {
    format!(
        "sleep 60 & echo $! > main.pid.tmp && mv main.pid.tmp main.pid\n\
         while [ ! -e go ]; do sleep 0.05; done\n{then}\n"
    )
}

/// The pid in `main.pid`, as the sandbox sees it.
async fn inner_main(run: &Running, fx: &Fixture) -> u32 {
    let file = fx.path("main.pid");
    wait_for_file(run, &file).await;
    std::fs::read_to_string(&file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_move_while_the_first_process_runs_is_followed_to_the_new_ones_end() {
    let Some(d) = driver() else { return };
    let fx = Fixture::temp();
    let run = start(&d, &fx, "moved", &script("exit 3"), "").await;
    let h = run.handle();
    let init = h.pid().unwrap();
    let inner = inner_main(&run, &fx).await;
    // The first process (sh, 2 in the sandbox) and the one named, as the host sees them.
    let first = h.host_pid(2).expect("sh is 2 in the sandbox");
    let main = h
        .host_pid(inner)
        .expect("the sleep is a process of the instance");
    assert!(main != init && main != first && first != init);

    // Refused: a host process, the init.
    let me = std::process::id();
    assert!(matches!(
        h.set_main_pid(me),
        Err(MainPidError::NotInInstance { pid }) if pid == me
    ));
    assert!(matches!(
        h.set_main_pid(init),
        Err(MainPidError::NotInInstance { .. })
    ));
    assert_eq!(h.host_pid(1), None, "the init is not the workload's");
    assert_eq!(h.pid(), Some(init));

    h.set_main_pid(main).unwrap();
    assert_eq!(h.pid(), Some(main));
    // The first process exits 3 and is reaped by the init: the run goes on.
    std::fs::write(fx.path("go"), "").unwrap();
    let start = Instant::now();
    while !gone(first) {
        assert!(start.elapsed() < Duration::from_secs(30), "sh never ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(h.try_status(), None);
    assert!(!gone(main));
    // SIGTERM reaches the new main process; its own end is the run's, not sh's exit 3.
    h.signal(Signal::TERM).unwrap();
    assert_eq!(
        run.wait().await,
        ExitStatus::Signaled {
            signal: libc::SIGTERM,
            core_dumped: false
        }
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_main_process_reaped_by_its_parent_ends_the_run_as_lost() {
    let Some(d) = driver() else { return };
    let fx = Fixture::temp();
    let run = start(&d, &fx, "lost", &script("kill $!; wait $!; sleep 60"), "").await;
    let h = run.handle();
    let inner = inner_main(&run, &fx).await;
    let main = h.host_pid(inner).unwrap();
    h.set_main_pid(main).unwrap();
    // sh kills and reaps the sleep: its status is sh's to take, the run's is unknown.
    std::fs::write(fx.path("go"), "").unwrap();
    assert_eq!(run.wait().await, LOST_STATUS);
}

/// A main process whose parent does not reap it (it becomes `sleep`, which waits for no
/// child) and exits later: the zombie then becomes the init's, and its real status (exit
/// 5) is the run's, not a lost one.
#[tokio::test(flavor = "multi_thread")]
async fn a_main_process_left_a_zombie_by_its_exiting_parent_keeps_its_status() {
    let Some(d) = driver() else { return };
    let fx = Fixture::temp();
    // The child exits only once its parent is `sleep` (sh reaps any child it sees exit
    // while it waits for one of its commands, or after a builtin).
    let script = "sh -c 'while [ ! -e go ] || [ \"$(cat /proc/$PPID/comm)\" != sleep ]; \
                  do sleep 0.05; done; exit 5' &\n\
                  echo $! > main.pid.tmp && mv main.pid.tmp main.pid\n\
                  exec sleep 2\n";
    let run = start(&d, &fx, "zombie", script, "").await;
    let h = run.handle();
    let inner = inner_main(&run, &fx).await;
    let main = h.host_pid(inner).unwrap();
    h.set_main_pid(main).unwrap();
    std::fs::write(fx.path("go"), "").unwrap();
    assert_eq!(run.wait().await, ExitStatus::Exited { code: 5 });
}

#[tokio::test(flavor = "multi_thread")]
async fn without_our_init_the_main_process_cannot_move() {
    let Some(d) = driver() else { return };
    let fx = Fixture::temp();
    let run = start(
        &d,
        &fx,
        "noinit",
        &script("exit 0"),
        "sandbox: {init: false}\n",
    )
    .await;
    let h = run.handle();
    let inner = inner_main(&run, &fx).await;
    // Nothing to translate with: no process of the instance is named.
    assert_eq!(h.host_pid(inner), None);
    assert!(matches!(
        h.set_main_pid(h.pid().unwrap()),
        Err(MainPidError::Unsupported)
    ));
    h.signal(Signal::KILL).unwrap();
    run.wait().await;
}

/// The order systemd keeps (notify messages before `SIGCHLD`): when the first process
/// exits, the hook runs before the run is declared over, and a move made there is
/// followed. Here sh starts `sleep`, writes its pid and exits 0 once told to (the file
/// `go`, written after the hook is installed: the program has no notify socket, so the
/// driver does not wait for a hook, and an exit before it would end the run first); the
/// hook reads the pid (as the daemon reads a queued `MAINPID=`). The control has no hook.
async fn first_exits_at_once(follow: bool) -> Option<ExitStatus> {
    let d = driver()?;
    let fx = Fixture::temp();
    let file = fx.path("main.pid");
    let run = start(&d, &fx, "hook", &script("exit 0"), "").await;
    let h = Arc::clone(&run.spawned.handle);
    let init = h.pid();
    if follow {
        let weak = Arc::downgrade(&h);
        let file = file.clone();
        h.on_main_exit(Arc::new(move || {
            let Some(h) = weak.upgrade() else { return };
            let inner: u32 = std::fs::read_to_string(&file)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            h.set_main_pid(h.host_pid(inner).unwrap()).unwrap();
        }));
    }
    let inner = inner_main(&run, &fx).await;
    std::fs::write(fx.path("go"), "").unwrap();
    if follow {
        let start = Instant::now();
        while h.pid() == init {
            assert!(start.elapsed() < Duration::from_secs(30), "never moved");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let main = h.pid().unwrap();
        assert_eq!(h.host_pid(inner), Some(main));
        h.signal(Signal::TERM).unwrap();
    }
    Some(run.wait().await)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_exit_hook_moves_the_run_before_the_first_process_ends_it() {
    let Some(status) = first_exits_at_once(true).await else {
        return;
    };
    assert_eq!(
        status,
        ExitStatus::Signaled {
            signal: libc::SIGTERM,
            core_dumped: false
        }
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_hook_the_first_process_exit_ends_the_run() {
    let Some(status) = first_exits_at_once(false).await else {
        return;
    };
    assert_eq!(status, ExitStatus::Exited { code: 0 });
}
