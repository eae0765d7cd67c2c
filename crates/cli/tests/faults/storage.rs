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

/// Launches in new namespaces until one is refused; returns its stderr. A commit may
/// still fit in the database's journal right after the fill; the first that does not
/// turns the daemon degraded, and from then on every launch is refused.
fn launch_until_refused(d: &Daemon, prefix: &str) -> String {
    for i in 0..64 {
        let out = d.cli(&[
            "launch",
            "sleeper",
            "--namespace",
            &format!("{prefix}{i}"),
            "--timeout",
            "60s",
        ]);
        if !out.status.success() {
            let err = stderr(&out);
            assert_eq!(
                out.status.code(),
                Some(5),
                "a launch on a full state directory fails UNAVAILABLE: {err}\n--- daemon log ---\n{}",
                d.daemon_log()
            );
            return err;
        }
    }
    panic!(
        "64 launches on a full state directory all succeeded\n--- daemon log ---\n{}",
        d.daemon_log()
    );
}

/// The refusal names the state directory and the cause.
fn assert_names_the_cause(err: &str, state: &Path) {
    assert!(
        err.contains(&format!(
            "state directory {} cannot be written",
            state.display()
        )),
        "{err}"
    );
    assert!(
        err.contains("No space left on device") || err.contains("disk is full"),
        "{err}"
    );
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
    assert_eq!(get(metrics, "/ready").0, 200);

    // --- The outage, then space returns: the daemon recovers by itself. ---
    let filler = fill(&state);
    let first = launch_until_refused(&d, "a");
    assert_names_the_cause(&first, &state);
    // Refused at once from now on, with the same words.
    let out = d.cli(&["launch", "sleeper", "--namespace", "refused"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert_names_the_cause(&stderr(&out), &state);
    // So is everything else that needs a new event.
    for args in [
        &["terminate", "ns:before:sleeper"][..],
        &["release", "ns:before:sleeper", "someone"],
        &["end-session", "s1"],
        &["end-namespace", "before"],
    ] {
        let out = d.cli(args);
        assert_eq!(out.status.code(), Some(5), "{args:?}: {}", stderr(&out));
        assert_names_the_cause(&stderr(&out), &state);
    }
    assert_eq!(listed(&d)["ns:before:sleeper"]["state"], "ready");
    // Health says degraded and why; /ready is 503.
    let h = health(&d);
    let status = h["status"].as_str().unwrap();
    assert!(status.starts_with("degraded: "), "{h}");
    assert_names_the_cause(status, &state);
    let (code, body) = get(metrics, "/ready");
    assert_eq!(code, 503, "{body}");
    assert_names_the_cause(&body, &state);
    let (_, body) = get(metrics, "/health");
    let hj: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(hj["status"], "degraded", "{hj}");
    assert_eq!(hj["state"]["writable"], false, "{hj}");
    // What clients see is gapless and ends at the last stored id.
    let seen = d.events();
    assert_gapless(&seen);
    assert_eq!(
        h["last_event_id"].as_u64(),
        event_ids(&seen).last().copied(),
        "{h}"
    );

    std::fs::remove_file(&filler).unwrap();
    wait_until("health ok again after space returned", || {
        health(&d)["status"] == "ok"
    });
    assert_eq!(get(metrics, "/ready").0, 200);
    d.json(&["launch", "sleeper", "--namespace", "after", "-o", "json"]);
    let t = d.json(&["terminate", "ns:before:sleeper", "-o", "json"]);
    assert_eq!(t["state"], "terminated");
    let after = d.events();
    assert_gapless(&after);
    assert_eq!(
        &after[..seen.len()],
        &seen[..],
        "what clients saw is unchanged"
    );
    // The events that waited during the outage are there now: the refused-at-the-last
    // launch was admitted before the store failed and went on once it could be stored.
    assert!(
        after[seen.len()..]
            .iter()
            .any(|e| e["kind"] == "launched" && e["instance"].as_str().unwrap().starts_with("ns:a")),
        "{after:#?}"
    );

    // --- The outage again, and the daemon killed during it. ---
    let filler = fill(&state);
    let err = launch_until_refused(&d, "b");
    assert_names_the_cause(&err, &state);
    let seen = d.events();
    assert_gapless(&seen);
    d.kill9();
    std::fs::remove_file(&filler).unwrap();
    d.spawn();
    assert_eq!(health(&d)["status"], "ok");
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
    launch_until_refused(&d, "c");
    assert!(d.sigterm().success(), "{}", d.daemon_log());
    assert!(
        d.daemon_log().contains("were never stored"),
        "the events that could not be stored are named in the log"
    );
}
