//! The event log is durable: events survive a daemon restart (SIGTERM or SIGKILL), ids go
//! on after the last one without a gap or a duplicate, and the retention bounds what is
//! kept.

use serde_json::Value;

use crate::harness::*;

const SLEEPER: &str = "name: sleeper\ncommand: [/bin/sleep, '1000']\nisolation: namespace\n";

fn ids(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["id"].as_u64().unwrap()).collect()
}

/// Ids are 1..=n with nothing missing or repeated.
fn assert_gapless(events: &[Value]) {
    let got = ids(events);
    let want: Vec<u64> = (1..=got.len() as u64).collect();
    assert_eq!(got, want, "ids have a gap or a duplicate: {events:#?}");
}

fn launch_and_terminate(d: &Daemon, ns: &str) {
    d.json(&["launch", "sleeper", "--namespace", ns, "-o", "json"]);
    let t = d.json(&["terminate", &format!("ns:{ns}:sleeper"), "-o", "json"]);
    assert_eq!(t["state"], "terminated");
}

#[test]
fn events_survive_sigterm_and_sigkill_and_ids_continue() {
    let mut d = Daemon::start(&[("sleeper", SLEEPER)]);
    launch_and_terminate(&d, "a");
    let first = d.events();
    assert!(
        first.iter().any(|e| e["kind"] == "terminated"),
        "{first:#?}"
    );
    assert_gapless(&first);

    // A clean stop, then a restart on the same state directory.
    assert!(d.sigterm().success());
    d.spawn();
    let after_term = d.events();
    assert_eq!(
        &after_term[..first.len()],
        &first[..],
        "the history is back, unchanged"
    );
    launch_and_terminate(&d, "b");
    let second = d.events();
    assert_gapless(&second);
    assert!(second.len() > first.len());
    let health = d.json(&["health", "-o", "json"]);
    assert_eq!(
        health["last_event_id"].as_u64(),
        Some(second.len() as u64),
        "{health}"
    );

    // A crash: every event a client saw was committed before it saw it.
    d.kill9();
    d.spawn();
    let after_kill = d.events();
    assert_eq!(
        &after_kill[..second.len()],
        &second[..],
        "nothing a client saw is lost in a crash"
    );
    launch_and_terminate(&d, "c");
    let third = d.events();
    assert_gapless(&third);
    assert!(third.len() > second.len());
    assert!(third
        .iter()
        .any(|e| e["kind"] == "terminated" && e["instance"] == "ns:c:sleeper"));
}

#[test]
fn event_retention_bounds_what_is_kept_across_restarts() {
    let mut d = Daemon::start_with_args(&[("sleeper", SLEEPER)], &["--event-retention", "3"]);
    launch_and_terminate(&d, "a");
    launch_and_terminate(&d, "b");
    let all = d.events();
    assert!(all.len() > 3);
    assert!(d.sigterm().success());
    d.spawn();
    let kept = d.events();
    assert_eq!(kept.len(), 3, "{kept:#?}");
    assert_eq!(&kept[..], &all[all.len() - 3..]);
    launch_and_terminate(&d, "c");
    let ids = ids(&d.events());
    assert_eq!(
        ids[3],
        all.len() as u64 + 1,
        "ids continue after the kept ones"
    );
}

/// Garbage, and (regression) a truncated, 0-byte database, which was accepted silently
/// with its history gone: each stops the start with an error naming the file.
#[test]
fn a_state_database_that_is_not_a_database_stops_the_start_with_a_clear_error() {
    for (contents, says) in [
        (vec![0x42u8; 4096], "not a database"),
        (Vec::new(), "empty"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let db = state.join("bulkhead.db");
        std::fs::write(&db, &contents).unwrap();
        let wl = dir.path().join("workloads");
        std::fs::create_dir_all(&wl).unwrap();
        let out = std::process::Command::new(BIN)
            .args(["serve", "--no-keeper", "--workloads"])
            .arg(&wl)
            .arg("--state")
            .arg(&state)
            .arg("--socket")
            .arg(dir.path().join("api.sock"))
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains(&db.display().to_string()) && err.contains(says),
            "{err}"
        );
    }
}

/// `bulkhead serve` once on `d`'s directories, expected to fail at start-up; its stderr.
fn serve_refused(d: &Daemon) -> String {
    let out = std::process::Command::new(BIN)
        .args(["serve", "--no-keeper", "--workloads"])
        .arg(&d.workloads)
        .arg("--state")
        .arg(&d.state)
        .arg("--socket")
        .arg(&d.socket)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve started on a bad database");
    stderr(&out)
}

/// The files `--fresh-state` moved aside.
fn set_aside(state: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(state)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // The database itself (its -wal and -shm go with it).
        .filter(|n| {
            n.starts_with("bulkhead.db.bad-") && !n.ends_with("-wal") && !n.ends_with("-shm")
        })
        .collect()
}

/// A database cut short, and one written by a newer bulkhead (regression, issue #12:
/// a damaged database must stop the daemon with a clear message): each is refused,
/// naming the file and `--fresh-state`; with `--fresh-state` the daemon moves it aside as
/// `bulkhead.db.bad-<time>` and starts with a new history, its ids continuing after the
/// newest one the old file still shows.
#[test]
fn a_damaged_or_newer_database_is_refused_unless_fresh_state_is_asked_for() {
    for case in ["truncated", "newer-schema"] {
        let mut d = Daemon::start(&[("sleeper", SLEEPER)]);
        launch_and_terminate(&d, "a");
        launch_and_terminate(&d, "b");
        let old_last = d.events().len() as u64;
        assert!(d.sigterm().success());
        let db = d.state.join("bulkhead.db");
        // A clean stop leaves everything in the main file (no -wal).
        assert!(!d.state.join("bulkhead.db-wal").exists());
        let says = match case {
            "truncated" => {
                let len = std::fs::metadata(&db).unwrap().len();
                let f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
                f.set_len(len / 2).unwrap();
                "is damaged"
            }
            _ => {
                let c = rusqlite::Connection::open(&db).unwrap();
                c.execute(
                    "UPDATE meta SET value = value + 1 WHERE key = 'schema_version'",
                    [],
                )
                .unwrap();
                "newer than this bulkhead knows"
            }
        };
        let err = serve_refused(&d);
        assert!(
            err.contains(&db.display().to_string())
                && err.contains(says)
                && err.contains("--fresh-state"),
            "{case}: {err}"
        );
        assert!(
            set_aside(&d.state).is_empty(),
            "{case}: moved without the flag"
        );

        d.extra_args.push("--fresh-state".into());
        d.spawn();
        let aside = set_aside(&d.state);
        assert_eq!(aside.len(), 1, "{case}: {aside:?}");
        assert!(d.events().is_empty(), "{case}: a new history");
        launch_and_terminate(&d, "c");
        let got = ids(&d.events());
        if case == "newer-schema" {
            // The old file still shows its newest id: the new history goes on after it.
            assert_eq!(got[0], old_last + 1, "{case}");
        }
        assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "{case}: {got:?}");
        // The flag leaves a sound database alone.
        assert!(d.sigterm().success());
        d.spawn();
        assert_eq!(set_aside(&d.state).len(), 1, "{case}");
        assert_eq!(ids(&d.events()), got, "{case}");
    }
}
