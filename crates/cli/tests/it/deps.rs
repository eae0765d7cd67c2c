//! Dependencies per key (`depends_on`): one launch brings up what a workload needs for
//! the same key, gated on each condition; failures, cycles and unknown names; teardown in
//! reverse order; a shared dependency; `on_dependency_restart`. Order is asserted from the
//! events' ids (assigned in publication order), never from durations.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

/// `db`: becomes ready (a readiness probe on the file `ready-$BULKHEAD_SESSION`, empty
/// for a shared db) a moment after it starts; `web` checks that file. `cache`: no readiness. `web`: exits 3 unless its session's db
/// file exists when it starts; stops slowly (so that a concurrent teardown would show).
fn stack(d: &Daemon, db_isolation: &str) {
    write_workload(
        &d.workloads,
        "db",
        &format!(
            "name: db\nisolation: {db_isolation}\n\
             command: [/bin/sh, -c, 'sleep 0.3; touch ready-$BULKHEAD_SESSION; exec sleep 1000']\n\
             readiness: {{exec: [/bin/sh, -c, 'test -f ready-$BULKHEAD_SESSION'], timeout: 30s}}\n"
        ),
        &[],
    );
    write_workload(
        &d.workloads,
        "cache",
        "name: cache\nisolation: session\ncommand: [/bin/sleep, '1000']\n",
        &[],
    );
    let db_file = if db_isolation == "none" {
        "../db/ready-".to_owned()
    } else {
        "../db/ready-$BULKHEAD_SESSION".to_owned()
    };
    write_workload(
        &d.workloads,
        "web",
        &format!(
            "name: web\nisolation: session\n\
             command: [/bin/sh, -c, 'test -f {db_file} || exit 3; trap \"sleep 0.3; exit 0\" TERM; while :; do sleep 0.05; done']\n\
             depends_on:\n  db: {{condition: ready}}\n  cache: {{condition: started}}\n"
        ),
        &[],
    );
    let out = d.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

fn of<'a>(evs: &'a [Value], id: &str, kind: &str) -> Vec<&'a Value> {
    evs.iter()
        .filter(|e| e["instance"] == id && e["kind"] == kind)
        .collect()
}

fn first_id(evs: &[Value], id: &str, kind: &str) -> u64 {
    of(evs, id, kind)
        .first()
        .unwrap_or_else(|| panic!("no {kind} event for {id}: {evs:#?}"))["id"]
        .as_u64()
        .unwrap()
}

fn last_id(evs: &[Value], id: &str, kind: &str) -> u64 {
    of(evs, id, kind)
        .last()
        .unwrap_or_else(|| panic!("no {kind} event for {id}: {evs:#?}"))["id"]
        .as_u64()
        .unwrap()
}

fn state(d: &Daemon, id: &str) -> String {
    d.json(&["get", id, "-o", "json"])["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn one_launch_brings_up_a_sessions_web_db_and_cache() {
    let d = Daemon::start(&[]);
    stack(&d, "session");
    let v = d.json(&["launch", "web", "--session", "s1", "-o", "json"]);
    assert_eq!(v["id"], "session:s1:web");
    assert_eq!(v["state"], "ready", "{v}");
    for id in ["session:s1:db", "session:s1:cache", "session:s1:web"] {
        assert_eq!(state(&d, id), "ready", "{id}");
    }
    let evs = d.events();
    // Each dependency reached its condition before web was started.
    let web_started = first_id(&evs, "session:s1:web", "started");
    assert!(first_id(&evs, "session:s1:db", "ready") < web_started);
    assert!(first_id(&evs, "session:s1:cache", "started") < web_started);
    // web's record says what it waited for, right after `launched`.
    let kinds: Vec<&str> = evs
        .iter()
        .filter(|e| e["instance"] == "session:s1:web")
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["launched", "dependencies_ready", "started", "ready"]
    );
    let met = &of(&evs, "session:s1:web", "dependencies_ready")[0]["dependencies"];
    assert_eq!(
        met,
        &serde_json::json!(["session:s1:cache", "session:s1:db"])
    );
    // Another session gets its own three; a second launch reuses what is live.
    d.json(&["launch", "web", "--session", "s2", "-o", "json"]);
    assert_eq!(state(&d, "session:s2:db"), "ready");
    let again = d.json(&["launch", "web", "--session", "s1", "-o", "json"]);
    assert_eq!(again["created"], false);
    assert_eq!(of(&d.events(), "session:s1:db", "launched").len(), 1);
    // A live web is reused as it is: a dependency stopped meanwhile stays stopped.
    d.json(&["terminate", "session:s1:cache", "-o", "json"]);
    let again = d.json(&["launch", "web", "--session", "s1", "-o", "json"]);
    assert_eq!(again["created"], false);
    assert_eq!(state(&d, "session:s1:cache"), "terminated");
}

#[test]
fn workloads_show_the_graph() {
    let d = Daemon::start(&[]);
    stack(&d, "session");
    let list = d.json(&["workloads", "-o", "json"]);
    let web = list
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "web")
        .unwrap();
    assert_eq!(
        web["depends_on"],
        serde_json::json!({"cache": {"condition": "started"}, "db": {"condition": "ready"}})
    );
    assert_eq!(web["on_dependency_restart"], "ignore");
    let table = String::from_utf8_lossy(&d.cli(&["workloads"]).stdout).into_owned();
    assert!(table.contains("DEPENDS"), "{table}");
    let line = table.lines().find(|l| l.starts_with("web")).unwrap();
    assert!(line.contains("cache:started,db"), "{table}");
}

#[test]
fn a_failing_dependency_fails_the_launch_and_web_never_starts() {
    let d = Daemon::start(&[]);
    stack(&d, "session");
    write_workload(
        &d.workloads,
        "db",
        "name: db\nisolation: session\ncommand: [/bin/sh, -c, 'echo \"db: cannot open the data directory\" >&2; exit 4']\nreadiness: {exec: [/bin/false], timeout: 30s}\n",
        &[],
    );
    assert!(d.cli(&["reload"]).status.success());
    let out = d.cli(&["launch", "web", "--session", "s1"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("launch of session:s1:web failed: its dependency session:s1:db failed"),
        "{err}"
    );
    assert!(err.contains("cannot open the data directory"), "{err}");
    assert!(err.contains("exit code 4"), "{err}");
    let evs = d.events();
    assert!(
        evs.iter().all(|e| e["instance"] != "session:s1:web"),
        "web must not exist: {evs:#?}"
    );
    assert!(!of(&evs, "session:s1:db", "launch_failed").is_empty());
    assert_eq!(
        out.status.code(),
        Some(7),
        "the dependency's own exit code (launch failed)"
    );

    // A dependency not ready within the launch's --timeout: a timeout, naming it.
    write_workload(
        &d.workloads,
        "db",
        "name: db\nisolation: session\ncommand: [/bin/sleep, '1000']\nreadiness: {exec: [/bin/false], timeout: 60s}\n",
        &[],
    );
    assert!(d.cli(&["reload"]).status.success());
    let out = d.cli(&["launch", "web", "--session", "s2", "--timeout", "500ms"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(
        err.contains("its dependency session:s2:db failed: session:s2:db is not ready after"),
        "{err}"
    );
    assert!(d.events().iter().all(|e| e["instance"] != "session:s2:web"));
}

#[test]
fn cycles_and_unknown_names_are_manifest_errors() {
    let d = Daemon::start(&[]);
    write_workload(
        &d.workloads,
        "a",
        "name: a\ncommand: [/bin/sleep, '1000']\ndepends_on: [b]\n",
        &[],
    );
    write_workload(
        &d.workloads,
        "b",
        "name: b\ncommand: [/bin/sleep, '1000']\ndepends_on: {a: {condition: started}}\n",
        &[],
    );
    write_workload(
        &d.workloads,
        "c",
        "name: c\ncommand: [/bin/sleep, '1000']\ndepends_on: [nowhere]\n",
        &[],
    );
    let out = d.cli(&["reload"]);
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(shown.contains("INVALID"), "{shown}");
    assert!(shown.contains("a dependency cycle"), "{shown}");
    let list = d.json(&["workloads", "-o", "json"]);
    let error = |n: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == n)
            .unwrap()["error"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let e = error("a");
    assert!(
        e.contains("a/manifest.yaml: field `depends_on.b`: a dependency cycle: a -> b -> a"),
        "{e}"
    );
    assert!(error("b").contains("b/manifest.yaml: field `depends_on.a`"));
    let e = error("c");
    assert!(
        e.contains("c/manifest.yaml: field `depends_on.nowhere`: no workload nowhere"),
        "{e}"
    );
    for w in ["a", "c"] {
        let out = d.cli(&["launch", w]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains(&format!("{w}/manifest.yaml")) && err.contains("depends_on."),
            "{err}"
        );
    }
    assert!(d.events().is_empty());
}

#[test]
fn teardown_goes_in_reverse_order() {
    let mut d = Daemon::start(&[]);
    stack(&d, "session");
    // terminate --with-dependencies: web, then db and cache.
    d.json(&["launch", "web", "--session", "s1", "-o", "json"]);
    let v = d.json(&[
        "terminate",
        "session:s1:web",
        "--with-dependencies",
        "-o",
        "json",
    ]);
    assert_eq!(v["state"], "terminated");
    for id in ["session:s1:db", "session:s1:cache"] {
        assert_eq!(state(&d, id), "terminated", "{id}");
    }
    let evs = d.events();
    let web_gone = last_id(&evs, "session:s1:web", "terminated");
    assert!(web_gone < first_id(&evs, "session:s1:db", "terminating"));
    assert!(web_gone < first_id(&evs, "session:s1:cache", "terminating"));
    // Without the flag only the instance goes.
    d.json(&["launch", "web", "--session", "s0", "-o", "json"]);
    d.json(&["terminate", "session:s0:web", "-o", "json"]);
    assert_eq!(state(&d, "session:s0:db"), "ready");
    // end-session: the same order.
    d.json(&["launch", "web", "--session", "s2", "-o", "json"]);
    assert!(d.cli(&["end-session", "s2"]).status.success());
    let evs = d.events();
    let web_gone = last_id(&evs, "session:s2:web", "terminated");
    assert!(web_gone < first_id(&evs, "session:s2:db", "terminating"));
    assert!(web_gone < first_id(&evs, "session:s2:cache", "terminating"));
    // end-namespace: the same order.
    write_workload(
        &d.workloads,
        "nsdb",
        "name: nsdb\ncommand: [/bin/sleep, '1000']\n",
        &[],
    );
    write_workload(
        &d.workloads,
        "nsweb",
        "name: nsweb\ncommand: [/bin/sh, -c, 'trap \"sleep 0.3; exit 0\" TERM; while :; do sleep 0.05; done']\ndepends_on: [nsdb]\n",
        &[],
    );
    assert!(d.cli(&["reload"]).status.success());
    d.json(&["launch", "nsweb", "--namespace", "t1", "-o", "json"]);
    assert!(d.cli(&["end-namespace", "t1"]).status.success());
    let evs = d.events();
    assert!(
        last_id(&evs, "ns:t1:nsweb", "terminated") < first_id(&evs, "ns:t1:nsdb", "terminating")
    );
    // Daemon shutdown: the same order (the events are durable; read them back).
    d.json(&["launch", "web", "--session", "s3", "-o", "json"]);
    assert!(d.sigterm().success());
    d.spawn();
    let evs = d.events();
    let web_gone = last_id(&evs, "session:s3:web", "terminated");
    assert!(web_gone < first_id(&evs, "session:s3:db", "terminating"));
    assert!(web_gone < first_id(&evs, "session:s3:cache", "terminating"));
}

#[test]
fn a_shared_dependency_serves_two_sessions() {
    let d = Daemon::start(&[]);
    stack(&d, "none");
    d.json(&["launch", "web", "--session", "s1", "-o", "json"]);
    d.json(&["launch", "web", "--session", "s2", "-o", "json"]);
    let live: Vec<String> = d
        .json(&["list", "-o", "json"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["workload"] == "db")
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(live, ["shared:db"]);
    assert_eq!(of(&d.events(), "shared:db", "launched").len(), 1);
    // s1 goes, with its dependencies: s2's web still needs the shared db, so it stays.
    d.json(&[
        "terminate",
        "session:s1:web",
        "--with-dependencies",
        "-o",
        "json",
    ]);
    assert_eq!(state(&d, "session:s1:cache"), "terminated");
    assert_eq!(state(&d, "shared:db"), "ready");
    assert_eq!(state(&d, "session:s2:web"), "ready");
    // Ending a session leaves the shared instance (it is not the session's).
    d.json(&["launch", "web", "--session", "s3", "-o", "json"]);
    assert!(d.cli(&["end-session", "s3"]).status.success());
    assert_eq!(state(&d, "shared:db"), "ready");
    assert_eq!(state(&d, "session:s2:web"), "ready");
    // The last dependent to go with its dependencies takes it along.
    d.json(&[
        "terminate",
        "session:s2:web",
        "--with-dependencies",
        "-o",
        "json",
    ]);
    assert_eq!(state(&d, "shared:db"), "terminated");
}

#[test]
fn a_dependency_restart_restarts_dependents_that_ask_for_it() {
    let d = Daemon::start(&[]);
    write_workload(
        &d.workloads,
        "db",
        "name: db\nisolation: session\ncommand: [/bin/sleep, '1000']\nrestart: {policy: always, backoff: {initial: 100ms, max: 1s}}\n",
        &[],
    );
    write_workload(
        &d.workloads,
        "web",
        "name: web\nisolation: session\ncommand: [/bin/sleep, '1000']\ndepends_on: [db]\non_dependency_restart: restart\n",
        &[],
    );
    // The control: depends on db, ignores its restarts (the default).
    write_workload(
        &d.workloads,
        "worker",
        "name: worker\nisolation: session\ncommand: [/bin/sleep, '1000']\ndepends_on: [db]\n",
        &[],
    );
    assert!(d.cli(&["reload"]).status.success());
    let web = d.json(&[
        "launch",
        "web",
        "--session",
        "s1",
        "--lease",
        "client-1",
        "-o",
        "json",
    ]);
    let worker = d.json(&["launch", "worker", "--session", "s1", "-o", "json"]);
    let db = d.json(&["get", "session:s1:db", "-o", "json"]);
    let db_pid = db["pid"].as_u64().unwrap() as i32;
    // SAFETY: kill(2) on a pid the daemon reported for an instance it runs.
    assert_eq!(unsafe { libc::kill(db_pid, libc::SIGKILL) }, 0);
    let e = d.wait_event("web restarted for db", |e| {
        e["instance"] == "session:s1:web" && e["kind"] == "dependency_restarted"
    });
    assert_eq!(e["dependency"], "session:s1:db");
    assert!(e["reason"]
        .as_str()
        .unwrap()
        .contains("session:s1:db restarted"));
    // web comes back (a new process), after db is back.
    let start = Instant::now();
    let new_web = loop {
        let v = d.json(&["get", "session:s1:web", "-o", "json"]);
        if v["state"] == "ready" && v["pid"] != web["pid"] {
            break v;
        }
        assert!(start.elapsed() < DEADLINE, "web did not come back: {v}");
        std::thread::sleep(Duration::from_millis(25));
    };
    assert!(new_web["pid"].is_u64());
    assert_eq!(
        new_web["leases"],
        serde_json::json!(["client-1"]),
        "{new_web}"
    );
    let evs = d.events();
    let db_back = last_id(&evs, "session:s1:db", "started");
    assert!(first_id(&evs, "session:s1:db", "restarting") < db_back);
    assert!(db_back < last_id(&evs, "session:s1:web", "started"));
    // The control kept its process and got no event.
    let w = d.json(&["get", "session:s1:worker", "-o", "json"]);
    assert_eq!(w["pid"], worker["pid"]);
    assert!(of(&evs, "session:s1:worker", "dependency_restarted").is_empty());
}

#[test]
fn completed_successfully_waits_for_a_job_to_exit_0() {
    let d = Daemon::start(&[]);
    // The job leaves a mark and exits 0 after a moment; web refuses to start without it.
    write_workload(
        &d.workloads,
        "migrate",
        "name: migrate\nisolation: session\ncommand: [/bin/sh, -c, 'sleep 0.3; echo run >> migrated-$BULKHEAD_SESSION']\n",
        &[],
    );
    write_workload(
        &d.workloads,
        "web",
        "name: web\nisolation: session\ncommand: [/bin/sh, -c, 'test -f ../migrate/migrated-$BULKHEAD_SESSION || exit 3; exec sleep 1000']\ndepends_on: {migrate: {condition: completed_successfully}}\n",
        &[],
    );
    write_workload(
        &d.workloads,
        "broken",
        "name: broken\nisolation: session\ncommand: [/bin/sh, -c, 'echo \"schema mismatch\" >&2; exit 2']\n",
        &[],
    );
    write_workload(
        &d.workloads,
        "api",
        "name: api\nisolation: session\ncommand: [/bin/sleep, '1000']\ndepends_on: {broken: {condition: completed_successfully}}\n",
        &[],
    );
    assert!(d.cli(&["reload"]).status.success());
    let v = d.json(&["launch", "web", "--session", "s1", "-o", "json"]);
    assert_eq!(v["state"], "ready", "{v}");
    let job = d.json(&["get", "session:s1:migrate", "-o", "json"]);
    assert_eq!(job["state"], "exited");
    assert_eq!(job["last_exit"]["code"], 0);
    let evs = d.events();
    assert!(
        first_id(&evs, "session:s1:migrate", "exited")
            < first_id(&evs, "session:s1:web", "started")
    );
    // A job that is not live runs again for the next dependent created.
    d.json(&["terminate", "session:s1:web", "-o", "json"]);
    d.json(&["launch", "web", "--session", "s1", "-o", "json"]);
    let marks = std::fs::read_to_string(d.workloads.join("migrate/migrated-s1")).unwrap();
    assert_eq!(marks.lines().count(), 2, "{marks}");
    // A job that exits non-zero fails its dependent's launch, with its reason.
    let out = d.cli(&["launch", "api", "--session", "s1"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("its dependency session:s1:broken failed")
            && err.contains("exit code 2")
            && err.contains("schema mismatch"),
        "{err}"
    );
    assert!(d.events().iter().all(|e| e["instance"] != "session:s1:api"));
}

#[test]
fn workloads_graph_prints_the_tree() {
    let d = Daemon::start(&[]);
    stack(&d, "session");
    write_workload(
        &d.workloads,
        "worker",
        "name: worker\nisolation: session\ncommand: [/bin/sleep, '1000']\ndepends_on: {web: {condition: started}}\n",
        &[],
    );
    write_workload(
        &d.workloads,
        "lonely",
        "name: lonely\ncommand: [/bin/sleep, '1000']\ndepends_on: [nowhere]\n",
        &[],
    );
    assert!(d.cli(&["reload"]).status.success());
    let out = d.cli(&["workloads", "--graph"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let tree = String::from_utf8_lossy(&out.stdout).into_owned();
    // Roots are what nothing depends on; each dependency under its dependent.
    assert_eq!(
        tree.trim_end(),
        "lonely INVALID\n\
         worker\n\
         └─ web (started)\n   \
            ├─ cache (started)\n   \
            └─ db (ready)",
        "{tree}"
    );
}

/// Independent branches launch concurrently: both dependencies are started before either
/// is ready (launched one after the other, the first would be ready before the second
/// started).
#[test]
fn independent_dependencies_launch_concurrently() {
    let d = Daemon::start(&[]);
    for name in ["left", "right"] {
        write_workload(
            &d.workloads,
            name,
            &format!(
                "name: {name}\nisolation: session\n\
                 command: [/bin/sh, -c, 'sleep 1; touch up-$BULKHEAD_SESSION; exec sleep 1000']\n\
                 readiness: {{exec: [/bin/sh, -c, 'test -f up-$BULKHEAD_SESSION'], timeout: 30s}}\n"
            ),
            &[],
        );
    }
    write_workload(
        &d.workloads,
        "top",
        "name: top\nisolation: session\ncommand: [/bin/sleep, '1000']\ndepends_on: [left, right]\n",
        &[],
    );
    assert!(d.cli(&["reload"]).status.success());
    d.json(&["launch", "top", "--session", "s1", "-o", "json"]);
    let evs = d.events();
    let started = ["left", "right"].map(|w| first_id(&evs, &format!("session:s1:{w}"), "started"));
    let ready = ["left", "right"].map(|w| first_id(&evs, &format!("session:s1:{w}"), "ready"));
    assert!(
        started.iter().max() < ready.iter().min(),
        "started {started:?}, ready {ready:?}"
    );
    assert!(ready.iter().max() < Some(&first_id(&evs, "session:s1:top", "started")));
}

/// An instance's spec, dependencies included, is stored with it: after the daemon is
/// killed and a new one adopts the instances, ending a session still stops the dependent
/// first, and a dependency's restart still restarts its dependent.
#[test]
fn dependencies_hold_after_a_daemon_restart() {
    let mut d = Daemon::start(&[]);
    write_workload(
        &d.workloads,
        "db",
        "name: db\nisolation: session\ncommand: [/bin/sleep, '1000']\nrestart: {policy: always, backoff: {initial: 100ms, max: 1s}}\n",
        &[],
    );
    write_workload(
        &d.workloads,
        "web",
        "name: web\nisolation: session\ncommand: [/bin/sh, -c, 'trap \"sleep 0.3; exit 0\" TERM; while :; do sleep 0.05; done']\ndepends_on: [db]\non_dependency_restart: restart\n",
        &[],
    );
    assert!(d.cli(&["reload"]).status.success());
    d.json(&["launch", "web", "--session", "s1", "-o", "json"]);
    d.json(&["launch", "web", "--session", "s2", "-o", "json"]);
    d.kill9();
    d.spawn();
    let evs = d.events();
    for id in ["session:s1:web", "session:s2:web", "session:s2:db"] {
        assert_eq!(state(&d, id), "ready");
        assert_eq!(of(&evs, id, "adopted").len(), 1, "{id}");
    }
    // The adopted instances are stopped in order.
    assert!(d.cli(&["end-session", "s2"]).status.success());
    let evs = d.events();
    assert!(
        last_id(&evs, "session:s2:web", "terminated")
            < last_id(&evs, "session:s2:db", "terminating")
    );
    let db_pid = d.json(&["get", "session:s1:db", "-o", "json"])["pid"]
        .as_u64()
        .unwrap() as i32;
    // SAFETY: kill(2) on a pid the daemon reported for an instance it runs.
    assert_eq!(unsafe { libc::kill(db_pid, libc::SIGKILL) }, 0);
    d.wait_event("web restarted for db", |e| {
        e["instance"] == "session:s1:web" && e["kind"] == "dependency_restarted"
    });
    let start = Instant::now();
    while state(&d, "session:s1:web") != "ready" {
        assert!(start.elapsed() < DEADLINE, "web did not come back");
        std::thread::sleep(Duration::from_millis(25));
    }
}
