//! Issue 11, "the API socket trusts no workload": a process workload runs as the daemon's
//! uid and can open the 0600 socket. Each connection's peer is classified (see the
//! daemon's `peer` module): a workload, an orphan it left behind and a `bulkhead exec`'d
//! command are refused with PERMISSION_DENIED (exit 8) and audited, while the operator's
//! CLI, run from the test like from a shell, keeps working. The refusals here are the
//! real CLI's, not a hand-written client's.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::{stderr, write_workload, Daemon, BIN, DEADLINE};

/// Waits for `<dir>/<name>.rc` and returns (exit code, stderr of that run).
fn result_of(dir: &Path, name: &str, d: &Daemon) -> (i32, String) {
    let start = Instant::now();
    loop {
        if let Ok(rc) = std::fs::read_to_string(dir.join(format!("{name}.rc"))) {
            if rc.ends_with('\n') {
                let err =
                    std::fs::read_to_string(dir.join(format!("{name}.err"))).unwrap_or_default();
                return (rc.trim().parse().unwrap(), err);
            }
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the workload never ran {name}\n--- daemon log ---\n{}",
            d.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn workloads_are_refused(args: &[&str]) {
    let d = Daemon::start_with_args(
        &[("victim", "name: victim\ncommand: [sleep, '1000']\n")],
        args,
    );
    let dir = d.workloads.join("intruder");
    let sock = d.socket.display().to_string();
    let run = |name: &str, verb: &str| {
        format!(
            "{BIN} --socket {sock} {verb} > {dir}/{name}.out 2> {dir}/{name}.err; echo $? > {dir}/{name}.rc",
            dir = dir.display()
        )
    };
    // Its own attempts, then an orphan's (the inner subshell exits at once: the command is
    // re-parented to the keeper or the daemon, both subreapers).
    let script = format!(
        "{}; {}; ( ( {} ) & ); exec sleep 1000",
        run("list", "list"),
        run("launch", "launch victim"),
        run("orphan", "list")
    );
    write_workload(
        &d.workloads,
        "intruder",
        &format!("name: intruder\ncommand: [/bin/sh, -c, {script:?}]\n"),
        &[],
    );
    assert!(d.cli(&["reload"]).status.success());
    d.json(&["launch", "intruder", "-o", "json"]);

    for name in ["list", "launch", "orphan"] {
        let (rc, err) = result_of(&dir, name, &d);
        assert_eq!(
            rc, 8,
            "a workload's `{name}` must be refused (exit 8): {err}"
        );
        assert!(
            err.contains("refuses workloads"),
            "the refusal says why ({name}): {err}"
        );
    }
    // The launch was refused: no victim runs.
    let list = d.json(&["list", "-o", "json"]);
    assert!(
        !list.to_string().contains("ns:default:victim"),
        "the workload launched an instance: {list}"
    );

    // A command exec'd into the instance is a workload too.
    let exec = d.cli(&[
        "exec",
        "ns:default:intruder",
        "--",
        BIN,
        "--socket",
        &sock,
        "list",
    ]);
    assert_eq!(exec.status.code(), Some(8), "{}", stderr(&exec));
    assert!(
        stderr(&exec).contains("refuses workloads"),
        "{}",
        stderr(&exec)
    );

    // The operator's CLI works, and every refusal is audited.
    assert!(d.cli(&["list"]).status.success());
    let audit = std::fs::read_to_string(d.state.join("audit.log")).unwrap();
    let refused = audit
        .lines()
        .filter(|l| l.contains("permission_denied") && l.contains("refuses workloads"))
        .count();
    assert!(refused >= 4, "4 refusals audited:\n{audit}");
    d.cli(&["terminate", "ns:default:intruder"]);
}

#[test]
fn api_socket_refuses_keeper_workloads_their_orphans_and_exec() {
    workloads_are_refused(&[]);
}

#[test]
fn api_socket_refuses_process_workloads_their_orphans_and_exec() {
    workloads_are_refused(&["--no-keeper"]);
}
