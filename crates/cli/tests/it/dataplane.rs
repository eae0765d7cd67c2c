//! The data plane through the real daemon: channels created before the spawn, host ->
//! workload -> host round trips (Rust, Python), a three-node pipeline, a crash of its
//! middle node (detected, its shared memory reclaimed), and 100 sessions that leave no
//! shared-memory files behind. Files are checked by this daemon's own iceoryx2 prefix, so
//! tests running in parallel do not see each other's.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Daemon, BIN, DEADLINE};

/// The Rust example workload (`crates/sdk/examples/echo.rs`), built once for the suite.
pub(crate) fn echo_bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-q", "-p", "bulkhead-sdk", "--example", "echo"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build for the echo example");
        assert!(st.success(), "cannot build the echo example");
        // <target>/debug/deps/it-* -> <target>/debug/examples/echo
        let exe = std::env::current_exe().unwrap();
        let dir = exe.parent().unwrap().parent().unwrap();
        let bin = dir.join("examples").join("echo");
        assert!(bin.exists(), "{} is missing", bin.display());
        bin.display().to_string()
    })
}

fn echo_manifest(name: &str, inputs: &str, outputs: &str, args: &[&str]) -> String {
    let mut cmd = vec![format!("{:?}", echo_bin())];
    cmd.extend(args.iter().map(|a| format!("{a:?}")));
    format!(
        "name: {name}\ncommand: [{}]\nisolation: session\nreadiness: {{notify: true, timeout: 20s}}\n\
         shutdown: {{grace: 2s}}\nchannels:\n  inputs: {inputs}\n  outputs: {outputs}\n",
        cmd.join(", ")
    )
}

/// `bulkhead pipe send` with `input` on its stdin.
fn pipe_send(d: &Daemon, id: &str, channel: &str, input: &str) -> Output {
    let mut child = Command::new(BIN)
        .arg("--socket")
        .arg(&d.socket)
        .args(["pipe", "send", id, channel, "--linger", "2s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn pipe_recv(d: &Daemon, id: &str, channel: &str, count: u32) -> Output {
    d.cli(&[
        "pipe",
        "recv",
        id,
        channel,
        "--count",
        &count.to_string(),
        "--timeout",
        "20s",
    ])
}

pub(crate) fn launch(d: &Daemon, workload: &str, session: &str) -> Value {
    d.json(&["launch", workload, "--session", session, "-o", "json"])
}

/// Sends lines on `(id, input)` while receiving them on `(out_id, output)`.
pub(crate) fn round_trip(d: &Daemon, id: &str, input: &str, out_id: &str, output: &str) {
    let sent = pipe_send(d, id, input, "hello\nworld\n");
    assert!(
        sent.status.success(),
        "pipe send: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let got = pipe_recv(d, out_id, output, 2);
    assert!(
        got.status.success(),
        "pipe recv: {}\n--- daemon log ---\n{}",
        String::from_utf8_lossy(&got.stderr),
        d.daemon_log()
    );
    assert_eq!(String::from_utf8_lossy(&got.stdout), "hello\nworld\n");
}

pub(crate) fn iox2_of(d: &Daemon, id: &str) -> bulkhead_sdk::Iox2 {
    let v = d.json(&["get", id, "-o", "json"]);
    bulkhead_sdk::Iox2 {
        prefix: v["iox2_prefix"].as_str().map(str::to_owned),
        root: v["iox2_root"].as_str().map(PathBuf::from),
        space: v["channel_space"].as_str().map(PathBuf::from),
    }
}

/// The `/dev/shm` data segments of this installation (one per live publisher).
pub(crate) fn data_segments(iox2: &bulkhead_sdk::Iox2) -> Vec<PathBuf> {
    bulkhead_sdk::leftover_files(iox2)
        .into_iter()
        .filter(|p| p.starts_with(shm_of(iox2)) && p.extension().is_some_and(|e| e == "data"))
        .collect()
}

/// The folder an installation's `/dev/shm` is on the host: its channel space's, or the
/// host's own.
pub(crate) fn shm_of(iox2: &bulkhead_sdk::Iox2) -> PathBuf {
    iox2.space
        .as_deref()
        .map_or_else(|| PathBuf::from("/dev/shm"), bulkhead_sdk::space::shm_dir)
}

/// Stops the daemon, then removes the one file iceoryx2 keeps per installation (its
/// persistent node counter), so that test runs do not accumulate them.
pub(crate) fn stop_and_clean(d: Daemon, iox2: &bulkhead_sdk::Iox2) {
    drop(d);
    let Some(prefix) = &iox2.prefix else { return };
    for e in std::fs::read_dir("/dev/shm")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix.as_str()) && name.ends_with(".global_mgmt") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

pub(crate) fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn rust_workload_round_trip_and_channel_env() {
    let m = echo_manifest(
        "echo",
        "[{name: input, max_payload: 1Mi}]",
        "[{name: output, max_payload: 1Mi}]",
        &[],
    );
    let d = Daemon::start(&[("echo", &m)]);
    let v = launch(&d, "echo", "s1");
    assert_eq!(v["state"], "ready");
    assert_eq!(
        v["channels"][0]["service"], "bulkhead/session/s1/echo/input",
        "{v}"
    );
    round_trip(&d, "session:s1:echo", "input", "session:s1:echo", "output");
    // The wrong direction or an unknown channel is refused with the reason.
    let o = d.cli(&["pipe", "recv", "session:s1:echo", "input"]);
    assert_eq!(o.status.code(), Some(3), "{}", crate::harness::stderr(&o));
    assert!(crate::harness::stderr(&o).contains("no output channel \"input\""));
    let iox2 = iox2_of(&d, "session:s1:echo");
    stop_and_clean(d, &iox2);
}

#[test]
fn three_node_pipeline_then_middle_crash_is_detected_and_reclaimed() {
    let src = echo_manifest(
        "src",
        "[{name: input, max_payload: 64Ki}]",
        "[{name: out, max_payload: 64Ki}]",
        &["input", "out"],
    );
    let mid = echo_manifest(
        "mid",
        "[{name: in, from: src.out, max_payload: 64Ki}]",
        "[{name: out, max_payload: 64Ki}]",
        &["in", "out"],
    );
    let sink = echo_manifest(
        "sink",
        "[{name: in, from: mid.out, max_payload: 64Ki}]",
        "[{name: output, max_payload: 64Ki}]",
        &["in", "output"],
    );
    let d = Daemon::start(&[("src", &src), ("mid", &mid), ("sink", &sink)]);
    // Downstream first: each stage's input is created by whichever instance comes first.
    for w in ["sink", "mid", "src"] {
        assert_eq!(launch(&d, w, "p1")["state"], "ready");
    }
    round_trip(&d, "session:p1:src", "input", "session:p1:sink", "output");

    let iox2 = iox2_of(&d, "session:p1:mid");
    // src, mid and sink each publish their output: three data segments.
    wait_until("three publishers", || data_segments(&iox2).len() == 3);
    let mid_pid = d.json(&["get", "session:p1:mid", "-o", "json"])["pid"]
        .as_u64()
        .unwrap();
    // SAFETY: kill(2) on the pid of this test's own instance.
    unsafe {
        libc::kill(mid_pid as i32, libc::SIGKILL);
    }
    d.wait_event("mid crashed", |e| {
        e["instance"] == "session:p1:mid" && e["kind"] == "crashed"
    });
    // Its neighbours hear of it, on the channels they shared with it.
    for (inst, channel) in [
        ("session:p1:src", "bulkhead/session/p1/src/out"),
        ("session:p1:sink", "bulkhead/session/p1/mid/out"),
    ] {
        let e = d.wait_event("channel_peer_dead", |e| {
            e["instance"] == inst && e["kind"] == "channel_peer_dead" && e["channel"] == channel
        });
        assert!(
            e["reason"]
                .as_str()
                .unwrap()
                .contains("session:p1:mid died; its shared memory was reclaimed"),
            "{e}"
        );
    }
    // Its publisher's shared memory is gone; the others' is not.
    wait_until("mid's data segment reclaimed", || {
        data_segments(&iox2).len() == 2
    });
    // The channels mid shared stay while src and sink hold them; they go with them.
    for w in ["src", "sink"] {
        let o = d.cli(&["terminate", &format!("session:p1:{w}")]);
        assert!(o.status.success(), "{}", crate::harness::stderr(&o));
    }
    wait_until("no channel files left", || {
        bulkhead_sdk::leftover_files(&iox2)
            .iter()
            .all(|p| !p.starts_with("/dev/shm"))
    });
    stop_and_clean(d, &iox2);
}

#[test]
fn hundred_sessions_leave_no_shared_memory_behind() {
    let m = echo_manifest(
        "echo",
        "[{name: input, max_payload: 4Ki}]",
        "[{name: output, max_payload: 4Ki}]",
        &[],
    );
    let mut d = Daemon::start(&[("echo", &m)]);
    let mut iox2 = None;
    for i in 0..100 {
        let s = format!("s{i}");
        assert_eq!(launch(&d, "echo", &s)["state"], "ready");
        if iox2.is_none() {
            iox2 = Some(iox2_of(&d, &format!("session:{s}:echo")));
        }
        let o = d.cli(&["end-session", &s]);
        assert!(o.status.success(), "{}", crate::harness::stderr(&o));
    }
    let iox2 = iox2.unwrap();
    // While the daemon runs, only its own node is left: no service, no data segment.
    let left: Vec<PathBuf> = bulkhead_sdk::leftover_files(&iox2)
        .into_iter()
        .filter(|p| p.starts_with("/dev/shm") || p.to_string_lossy().contains("/services/"))
        .collect();
    assert_eq!(left, Vec::<PathBuf>::new());
    // Once it stops, nothing of this installation is left at all.
    let st = d.sigterm();
    assert!(st.success(), "{st}");
    assert_eq!(bulkhead_sdk::leftover_files(&iox2), Vec::<PathBuf>::new());
    stop_and_clean(d, &iox2);
}

/// Whether `python3` can import the iceoryx2 binding; prints why not otherwise.
pub(crate) fn python_with_iceoryx2() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import iceoryx2"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "skipping: python3 cannot import iceoryx2 (run .ci/setup-dataplane.sh or `pip install iceoryx2`)"
        );
    }
    ok
}

#[test]
fn python_workload_round_trip() {
    if !python_with_iceoryx2() {
        return;
    }
    let main = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/workloads/echo-python/main.py"
    );
    let m = format!(
        "name: echopy\ncommand: [python3, {main:?}]\nisolation: session\n\
         readiness: {{notify: true, timeout: 30s}}\nshutdown: {{grace: 2s}}\nchannels:\n  \
         inputs: [{{name: input, max_payload: 1Mi}}]\n  outputs: [{{name: output, max_payload: 1Mi}}]\n"
    );
    let d = Daemon::start(&[("echopy", &m)]);
    assert_eq!(launch(&d, "echopy", "py1")["state"], "ready");
    round_trip(
        &d,
        "session:py1:echopy",
        "input",
        "session:py1:echopy",
        "output",
    );
    let iox2 = iox2_of(&d, "session:py1:echopy");
    let o = d.cli(&["end-session", "py1"]);
    assert!(o.status.success(), "{}", crate::harness::stderr(&o));
    assert_eq!(data_segments(&iox2), Vec::<PathBuf>::new());
    stop_and_clean(d, &iox2);
}
