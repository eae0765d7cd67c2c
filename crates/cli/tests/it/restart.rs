//! `bulkhead restart` and `bulkhead rollout`: a new run with the same key and address;
//! a rollout onto a reloaded manifest, one instance at a time, rolled back on failure.

use serde_json::Value;

use crate::harness::*;

fn kinds_after(d: &Daemon, id: &str, after_id: u64) -> Vec<String> {
    d.events()
        .into_iter()
        .filter(|e| e["instance"] == id && e["id"].as_u64().unwrap() > after_id)
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect()
}

fn last_event_id(d: &Daemon) -> u64 {
    d.events()
        .last()
        .map(|e| e["id"].as_u64().unwrap())
        .unwrap_or(0)
}

fn pid(v: &Value) -> u32 {
    v["pid"].as_u64().unwrap() as u32
}

#[test]
fn restart_keeps_the_key_and_address_and_starts_a_new_run_at_once() {
    // `never`: a requested restart is not the policy's to refuse.
    let d = Daemon::start(&[(
        "web",
        "name: web\ncommand: [/bin/sh, -c, 'trap \"exit 0\" TERM; while :; do sleep 0.1; done']\nshutdown: {grace: 5s}\n",
    )]);
    let first = d.json(&["launch", "web", "--wait", "ready", "-o", "json"]);
    let mark = last_event_id(&d);
    let again = d.json(&["restart", "ns:default:web", "-o", "json"]);
    assert_eq!(again["id"], "ns:default:web");
    assert_eq!(again["state"], "ready");
    assert_eq!(again["port"], first["port"], "the address is kept");
    assert_eq!(again["restarts"], 1);
    assert_ne!(pid(&again), pid(&first));
    assert!(wait_gone(pid(&first)), "the old run is gone");
    // The old run was stopped gracefully (its TERM trap exits 0), then a new run started
    // at once: no backoff, not a failure.
    assert_eq!(
        kinds_after(&d, "ns:default:web", mark),
        [
            "restart_requested",
            "terminating",
            "restarting",
            "started",
            "ready"
        ]
    );
    let ev = d.wait_event("restarting", |e| {
        e["kind"] == "restarting"
            && e["instance"] == "ns:default:web"
            && e["id"].as_u64().unwrap() > mark
    });
    assert_eq!(ev["attempt"], 0);
    assert_eq!(ev["delay_ms"], 0);
    assert_eq!(again["last_exit"]["code"], 0, "{again:#}");
    assert_eq!(again["consecutive_failures"], 0);

    // A finished instance has nothing to restart; an unknown one is not found.
    d.json(&["terminate", "ns:default:web", "-o", "json"]);
    let o = d.cli(&["restart", "ns:default:web"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("terminated"), "{}", stderr(&o));
    let o = d.cli(&["restart", "ns:default:nope"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
}

/// The version each instance runs, asked of its current run through `exec`.
fn version(d: &Daemon, id: &str) -> String {
    let o = d.cli(&["exec", id, "--", "/bin/sh", "-c", "echo $VERSION"]);
    assert!(o.status.success(), "{}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

fn manifest(version: &str, command: &str) -> String {
    format!(
        "name: svc\nenv: {{VERSION: \"{version}\"}}\ncommand: [/bin/sh, -c, '{command}']\n\
         readiness: {{exec: [/bin/sh, -c, 'test -e ready.$VERSION'], timeout: 5s}}\n\
         shutdown: {{grace: 5s}}\n"
    )
}

const SERVE: &str = "touch ready.$VERSION; trap \"exit 0\" TERM; while :; do sleep 0.1; done";

#[test]
fn rollout_moves_each_instance_onto_the_reloaded_manifest_and_rolls_back_a_failure() {
    let d = Daemon::start(&[]);
    write_workload(&d.workloads, "svc", &manifest("1", SERVE), &[]);
    d.cli(&["reload"]);
    let ids = ["ns:a:svc", "ns:b:svc", "ns:c:svc"];
    let mut before = Vec::new();
    for ns in ["a", "b", "c"] {
        before.push(d.json(&[
            "launch",
            "svc",
            "--namespace",
            ns,
            "--wait",
            "ready",
            "-o",
            "json",
        ]));
    }
    for id in ids {
        assert_eq!(version(&d, id), "1");
    }

    // A changed manifest: `reload` leaves the running instances alone ...
    write_workload(&d.workloads, "svc", &manifest("2", SERVE), &[]);
    d.cli(&["reload"]);
    assert_eq!(version(&d, "ns:a:svc"), "1");
    // ... and `rollout` moves each of them, keeping its address.
    let out = d.json(&["rollout", "svc", "-o", "json"]);
    let steps = out["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3, "{out}");
    for (s, b) in steps.iter().zip(&before) {
        assert_eq!(s["outcome"], "moved", "{out}");
        let now = d.json(&["get", s["id"].as_str().unwrap(), "-o", "json"]);
        assert_eq!(now["port"], b["port"]);
        assert_ne!(now["pid"], b["pid"]);
        assert_eq!(version(&d, s["id"].as_str().unwrap()), "2");
    }
    // Nothing left to move.
    let out = d.json(&["rollout", "svc", "-o", "json"]);
    assert!(
        out["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["outcome"] == "current"),
        "{out}"
    );

    // A manifest whose run never becomes ready: the first instance fails on it and goes
    // back to version 2; the rollout stops there and the others are not touched.
    write_workload(
        &d.workloads,
        "svc",
        &manifest("3", "echo broken >&2; exit 1"),
        &[],
    );
    d.cli(&["reload"]);
    let pids: Vec<Value> = ids
        .iter()
        .map(|id| d.json(&["get", id, "-o", "json"])["pid"].clone())
        .collect();
    let o = d.cli(&["rollout", "svc", "-o", "json"]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    let out: Value = serde_json::from_slice(&o.stdout).unwrap();
    let steps = out["steps"].as_array().unwrap();
    assert_eq!(steps[0]["id"], "ns:a:svc");
    assert_eq!(steps[0]["outcome"], "failed", "{out}");
    assert_eq!(steps[0]["rolled_back"], true, "{out}");
    assert!(
        steps[0]["reason"].as_str().unwrap().contains("exit"),
        "{out}"
    );
    assert_eq!(steps[1]["outcome"], "skipped");
    assert_eq!(steps[2]["outcome"], "skipped");
    let a = d.json(&["get", "ns:a:svc", "-o", "json"]);
    assert_eq!(a["state"], "ready");
    assert_eq!(version(&d, "ns:a:svc"), "2");
    for (id, p) in ids.iter().zip(&pids).skip(1) {
        assert_eq!(
            &d.json(&["get", id, "-o", "json"])["pid"],
            p,
            "{id} untouched"
        );
    }
    // The failed trial did not count against the instance.
    assert_eq!(a["consecutive_failures"], 0);
    assert_eq!(a["breaker"], "closed");

    // `restart --new-spec` is one instance's rollout, with the same rollback.
    let o = d.cli(&["restart", "ns:b:svc", "--new-spec"]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert!(stderr(&o).contains("previous manifest"), "{}", stderr(&o));
    assert_eq!(version(&d, "ns:b:svc"), "2");

    // A rollout that would change the instance's walls is refused before anything moves.
    write_workload(
        &d.workloads,
        "svc",
        &format!("{}isolation: none\n", manifest("4", SERVE)),
        &[],
    );
    d.cli(&["reload"]);
    let o = d.cli(&["rollout", "svc"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("isolation"), "{}", stderr(&o));
}
