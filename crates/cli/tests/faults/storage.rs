//! The state directory on a small tmpfs, filled mid-run: the daemon refuses what would
//! need a new event (UNAVAILABLE, naming the directory and the cause), says so in
//! `health` and `/ready`, shows no event it has not stored, recovers by itself when space
//! returns, and after a `kill -9` during the outage no id a client saw names another
//! event.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::harness::*;
use crate::support::*;

const SLEEPER: &str = "name: sleeper\ncommand: [/bin/sleep, '1000']\nisolation: namespace\n";

/// Exits every 50 ms and is restarted: events that happen with no request at all.
const FLAPPER: &str = "name: flapper\ncommand: [/bin/sh, -c, 'sleep 0.05; exit 1']\nrestart: {policy: on-failure, max_failures: 100000, backoff: {initial: 5ms, max: 20ms}}\n";

/// A tmpfs mounted for the test, unmounted (lazily) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system holding `dir` with one file until ENOSPC; returns the file.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let chunk = vec![0x5au8; 4096];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // The control: the file system is full now.
    let e = std::fs::write(dir.join("probe"), &chunk).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    let _ = std::fs::remove_file(dir.join("probe"));
    path
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// Waits until `health` says degraded (the flapper's events hit the full disk); returns
/// the reason it gives.
fn wait_degraded(d: &Daemon) -> String {
    let mut reason = String::new();
    wait_until("health degraded on a full state directory", || {
        let h = health(d);
        reason = h["reason"].as_str().unwrap_or_default().to_owned();
        h["status"] == "degraded"
    });
    reason
}

/// A refusal names the state directory and the cause. Audited requests write their audit
/// line (`<state>/audit.log`) first, and on a full disk that can be what refuses them.
fn assert_names_the_cause(err: &str, state: &Path) {
    let store = format!("state directory {} cannot be written", state.display());
    let audit = format!(
        "cannot write the audit log {}",
        state.join("audit.log").display()
    );
    assert!(err.contains(&store) || err.contains(&audit), "{err}");
    assert!(
        err.contains("No space left on device") || err.contains("disk is full"),
        "{err}"
    );
}

/// Every request that needs a new event is refused UNAVAILABLE, with the cause.
fn assert_refused(d: &Daemon, state: &Path) {
    for args in [
        &["launch", "sleeper", "--namespace", "refused"][..],
        &["terminate", "ns:before:sleeper"],
        &["release", "ns:before:sleeper", "someone"],
        &["end-session", "s1"],
        &["end-namespace", "before"],
    ] {
        let out = d.cli(args);
        assert_eq!(out.status.code(), Some(5), "{args:?}: {}", stderr(&out));
        assert_names_the_cause(&stderr(&out), state);
    }
}

fn health(d: &Daemon) -> Value {
    d.json(&["health", "-o", "json"])
}

fn event_ids(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["id"].as_u64().unwrap()).collect()
}

#[test]
fn a_full_state_directory_is_loud_loses_nothing_and_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let _tmpfs = match Tmpfs::mount(&state, "4m") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("skipping: the test mounts a tmpfs as the state directory (root): {e}");
            return;
        }
    };
    let wl = dir.path().join("workloads");
    write_workload(&wl, "sleeper", SLEEPER, &[]);
    write_workload(&wl, "flapper", FLAPPER, &[]);
    let metrics = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut d = Daemon {
        child: None,
        socket: dir.path().join("api.sock"),
        state: state.clone(),
        workloads: wl,
        dir,
        extra_args: vec!["--metrics".into(), metrics.to_string()],
    };
    d.spawn();
    d.json(&["launch", "sleeper", "--namespace", "before", "-o", "json"]);
    d.json(&["launch", "flapper", "--wait", "started", "-o", "json"]);
    assert_eq!(get(metrics, "/ready").0, 200);

    // --- The outage, then space returns: the daemon recovers by itself. ---
    let filler = fill(&state);
    let status = wait_degraded(&d);
    assert!(
        status.contains(&format!(
            "state directory {} cannot be written",
            state.display()
        )) && status.contains("No space left on device"),
        "{status}"
    );
    assert_refused(&d, &state);
    assert_eq!(listed(&d)["ns:before:sleeper"]["state"], "ready");
    let (code, body) = get(metrics, "/ready");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("cannot be written"), "{body}");
    let (_, body) = get(metrics, "/health");
    let hj: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(hj["status"], "degraded", "{hj}");
    assert_eq!(hj["state"]["writable"], false, "{hj}");
    assert!(hj["state"]["held_events"].as_u64() >= Some(1), "{hj}");
    // What clients see is gapless and ends at the last stored id, and stays there while
    // the flapper goes on exiting.
    let seen = d.events();
    assert_gapless(&seen);
    let flapper = listed(&d)["ns:default:flapper"].clone();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The flapper, which exits every 50 ms, shows its last stored state meanwhile.
    let still = &listed(&d)["ns:default:flapper"];
    assert_eq!(
        (&still["state"], &still["restarts"]),
        (&flapper["state"], &flapper["restarts"]),
        "{still}"
    );
    let h = health(&d);
    assert_eq!(
        h["last_event_id"].as_u64(),
        event_ids(&seen).last().copied(),
        "{h}"
    );
    assert_eq!(
        d.events(),
        seen,
        "nothing new is shown while nothing can be stored"
    );

    let freed_ms = now_ms();
    std::fs::remove_file(&filler).unwrap();
    wait_until("health ok again after space returned", || {
        health(&d)["status"] == "serving"
    });
    assert_eq!(get(metrics, "/ready").0, 200);
    d.json(&["launch", "sleeper", "--namespace", "after", "-o", "json"]);
    let t = d.json(&["terminate", "ns:before:sleeper", "-o", "json"]);
    assert_eq!(t["state"], "terminated");
    let after = d.events();
    // Gapless: the events that waited in memory (the flapper's exit among them) were all
    // stored and shown, none lost.
    assert_gapless(&after);
    assert_eq!(
        &after[..seen.len()],
        &seen[..],
        "what clients saw is unchanged"
    );
    // The first event after what clients saw is the flapper's that made the store fail:
    // it happened during the outage, waited in memory, and is stored now.
    let held = &after[seen.len()];
    assert_eq!(held["instance"], "ns:default:flapper", "{after:#?}");
    assert!(held["time_ms"].as_u64().unwrap() < freed_ms, "{held}");

    // --- The outage again, and the daemon killed during it. ---
    let filler = fill(&state);
    wait_degraded(&d);
    let seen = d.events();
    assert_gapless(&seen);
    d.kill9();
    std::fs::remove_file(&filler).unwrap();
    d.spawn();
    assert_eq!(health(&d)["status"], "serving");
    let restarted = d.events();
    assert!(restarted.len() >= seen.len(), "{restarted:#?}");
    assert_eq!(
        &restarted[..seen.len()],
        &seen[..],
        "every event a client saw was stored, and its id names no other event"
    );
    d.json(&[
        "launch",
        "sleeper",
        "--namespace",
        "restarted",
        "-o",
        "json",
    ]);
    let last = d.events();
    assert_gapless(&last);
    assert_eq!(&last[..seen.len()], &seen[..]);
    assert!(
        last.iter()
            .any(|e| e["kind"] == "launched" && e["instance"] == "ns:restarted:sleeper"),
        "{last:#?}"
    );

    // --- A shutdown during an outage does not hang on it. ---
    let _filler = fill(&state);
    wait_degraded(&d);
    assert!(d.sigterm().success(), "{}", d.daemon_log());
    assert!(
        d.daemon_log().contains("were never stored"),
        "the events that could not be stored are named in the log"
    );
}
