//! Hostile names and manifests: clear errors, no panic, nothing created outside the state
//! directory.

use std::path::Path;

use bulkhead_api::v1;

use crate::harness::*;

/// Every path under `root`.
fn tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&p) else {
            continue;
        };
        for e in rd.flatten() {
            let path = e.path();
            out.push(path.display().to_string());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            }
        }
    }
    out
}

#[test]
fn hostile_names_get_clear_errors_and_create_nothing() {
    let d = Daemon::start(&[(
        "svc",
        "name: svc\ncommand: [/bin/sleep, '1000']\nisolation: session\n",
    )]);
    let evil = format!("evil{}", std::process::id());
    let long = "a".repeat(4096);
    let dotdot = format!("../../{evil}");
    let slash = format!("a/{evil}");
    for (flag, value) in [
        ("--session", dotdot.as_str()),
        ("--session", slash.as_str()),
        ("--session", ".."),
        ("--session", long.as_str()),
        ("--session", "tab\there"),
        ("--namespace", dotdot.as_str()),
    ] {
        let out = d.cli(&["launch", "svc", flag, value]);
        assert_eq!(
            out.status.code(),
            Some(4),
            "{flag} {value:.40}: {}",
            stderr(&out)
        );
        let err = stderr(&out);
        assert!(
            err.contains("session") || err.contains("namespace"),
            "the error names what was wrong: {err}"
        );
    }
    for workload in [dotdot.as_str(), "/etc/passwd", long.as_str(), ""] {
        let out = d.cli(&["launch", workload, "--session", "s"]);
        assert!(
            matches!(out.status.code(), Some(3 | 4)),
            "workload {workload:.40}: {:?} {}",
            out.status,
            stderr(&out)
        );
    }
    for id in [
        format!("session:{dotdot}:svc"),
        "session:a\u{7f}:svc".into(),
        long.clone(),
    ] {
        let out = d.cli(&["terminate", &id]);
        assert!(
            matches!(out.status.code(), Some(3 | 4)),
            "{id:.40}: {}",
            stderr(&out)
        );
    }
    // A NUL cannot be passed on a command line: straight through the API.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = bulkhead_api::connect(&d.socket).await.unwrap();
        let err = c
            .launch(v1::LaunchRequest {
                workload: "svc".into(),
                session: Some("a\0b".into()),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        let err = c
            .get(v1::GetRequest {
                id: "\0".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(
            matches!(
                err.code(),
                tonic::Code::InvalidArgument | tonic::Code::NotFound
            ),
            "{err}"
        );
    });
    // The daemon is unharmed and nothing named after the attacker exists anywhere near.
    assert!(d.cli(&["health"]).status.success());
    let parent = d.dir.path().parent().unwrap();
    for p in tree(d.dir.path()) {
        assert!(!p.contains(&evil), "created {p}");
    }
    assert!(!parent.join(&evil).exists());
    assert!(d
        .json(&["list", "-o", "json"])
        .to_string()
        .find(&evil)
        .is_none());
}

#[test]
fn hostile_manifests_are_listed_invalid_with_their_field() {
    let d = Daemon::start(&[("good", "name: good\ncommand: [/bin/sleep, '1000']\n")]);
    let huge = format!(
        "name: huge\ncommand: [/bin/true]\ndescription: '{}'\n",
        "x".repeat(300 * 1024)
    );
    let deep = format!(
        "name: deep\ncommand: {}{}\n",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let cases: Vec<(&str, String, &str)> = vec![
        ("huge", huge, "limit"),
        (
            "unknown",
            "name: unknown\ncommand: [/bin/true]\nfrobnicate: 1\n".into(),
            "frobnicate",
        ),
        (
            "neg",
            "name: neg\ncommand: [/bin/true]\nshutdown: {grace: -1s}\n".into(),
            "negative",
        ),
        (
            "absurd",
            "name: absurd\ncommand: [/bin/true]\nshutdown: {grace: 100000h}\n".into(),
            "grace",
        ),
        (
            "mem",
            "name: mem\ncommand: [/bin/true]\ndriver: sandbox\nresources: {memory: -5Mi}\n".into(),
            "negative",
        ),
        (
            "bigmem",
            "name: bigmem\ncommand: [/bin/true]\nresources: {memory: 9999999Ti}\n".into(),
            "memory",
        ),
        (
            "cpu",
            "name: cpu\ncommand: [/bin/true]\nresources: {cpu: -1}\n".into(),
            "resources.cpu",
        ),
        (
            "pids",
            "name: pids\ncommand: [/bin/true]\nresources: {pids: 0}\n".into(),
            "resources.pids",
        ),
        (
            "mismatch",
            "name: other\ncommand: [/bin/true]\n".into(),
            "folder",
        ),
        (
            "nul",
            "name: nul\ncommand: [\"/bin/true\\0\"]\n".into(),
            "NUL",
        ),
        // Issue 11: YAML tags were decoded (`!!binary`) or silently ignored (`!custom`).
        (
            "tagbin",
            "name: tagbin\ncommand: [!!binary L2Jpbi90cnVl]\n".into(),
            "field `command[0]`: YAML tag \"!!binary\"",
        ),
        (
            "tagenv",
            "name: tagenv\ncommand: [/bin/true]\nenv: {A: !custom x}\n".into(),
            "field `env.A`: YAML tag \"!custom\"",
        ),
        ("deep", deep, "deep"),
        ("binary", "\u{0}\u{1}\u{2}garbage".into(), "binary"),
    ];
    for (name, text, _) in &cases {
        write_workload(&d.workloads, name, text, &[]);
    }
    assert!(d.cli(&["reload"]).status.success(), "{}", d.daemon_log());
    let w = d.json(&["workloads", "-o", "json"]);
    let list = w
        .as_array()
        .cloned()
        .unwrap_or_else(|| w["workloads"].as_array().cloned().unwrap_or_default());
    for (name, _, needle) in &cases {
        let entry = list
            .iter()
            .find(|e| e["name"] == *name)
            .unwrap_or_else(|| panic!("{name} is not listed: {w:#}"));
        assert_eq!(entry["valid"], false, "{name} should be invalid: {entry:#}");
        let err = entry["error"].as_str().unwrap_or_default();
        assert!(
            err.contains("manifest.yaml"),
            "{name}: the error names the file: {err}"
        );
        if !matches!(*name, "deep" | "binary") {
            assert!(
                err.contains(needle),
                "{name}: the error should mention {needle:?}: {err:.300}"
            );
        }
        let out = d.cli(&["launch", name, "--namespace", "x"]);
        assert_eq!(out.status.code(), Some(4), "{name}: {}", stderr(&out));
    }
    // The good one is untouched.
    let g = d.json(&["launch", "good", "--namespace", "x", "-o", "json"]);
    assert_eq!(g["state"], "ready");
}

/// Issue 11: `Launch` took any string as a lease holder (NUL, newline, U+202E, 4 KiB,
/// 3 MB) and stored it; `Release` validates holders, so such a lease could never be
/// released.
#[test]
fn launch_accepted_unreleasable_lease_holders() {
    let d = Daemon::start(&[(
        "svc",
        "name: svc\ncommand: [/bin/sleep, '1000']\nisolation: session\n",
    )]);
    let long = "h".repeat(4096);
    for holder in ["a\nb", "a\u{202e}b", "a b", long.as_str()] {
        let out = d.cli(&["launch", "svc", "--session", "s", "--lease", holder]);
        assert_eq!(
            out.status.code(),
            Some(4),
            "{holder:.40?}: {}",
            stderr(&out)
        );
        let err = stderr(&out);
        assert!(
            err.contains("request field `lease`: invalid lease holder name"),
            "the error names the field: {err}"
        );
        assert!(
            !err.contains('\u{202e}'),
            "the holder is shown escaped: {err:?}"
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = bulkhead_api::connect(&d.socket).await.unwrap();
        for holder in ["a\0b".to_owned(), "h".repeat(3 << 20)] {
            let err = c
                .launch(v1::LaunchRequest {
                    workload: "svc".into(),
                    session: Some("s".into()),
                    lease: Some(holder),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
            assert!(err.message().contains("`lease`"), "{err}");
            assert!(err.message().len() < 300, "{}", err.message().len());
        }
        // Release names its own field.
        let err = c
            .release(v1::ReleaseRequest {
                id: "session:s:svc".into(),
                holder: "a\nb".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        assert!(err.message().contains("`holder`"), "{err}");
    });
    // Nothing was launched by a refused request.
    let list = d.json(&["list", "-o", "json"]);
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list:#}");
    // A valid holder still works, and can be released.
    let i = d.json(&[
        "launch",
        "svc",
        "--session",
        "s",
        "--lease",
        "w-1",
        "-o",
        "json",
    ]);
    assert_eq!(i["leases"], serde_json::json!(["w-1"]));
    let out = d.cli(&["release", "session:s:svc", "w-1"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Issue 11: an instance took any number of lease holders (rows of 9 MB slowed launches
/// to 52 s). At most `MAX_LEASES` (1,024); re-taking one's own lease is always allowed.
#[test]
fn one_instance_took_unbounded_lease_holders() {
    use bulkhead_core::lease::MAX_LEASES;
    let d = Daemon::start(&[(
        "svc",
        "name: svc\ncommand: [/bin/sleep, '1000']\nisolation: session\n",
    )]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = bulkhead_api::connect(&d.socket).await.unwrap();
        let launch = |holder: String| v1::LaunchRequest {
            workload: "svc".into(),
            session: Some("s".into()),
            lease: Some(holder),
            wait: v1::WaitFor::Started as i32,
            ..Default::default()
        };
        for i in 0..MAX_LEASES {
            c.launch(launch(format!("h{i}"))).await.unwrap();
        }
        let err = c.launch(launch("one-more".into())).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
        assert!(
            err.message().contains("request field `lease`") && err.message().contains("1024"),
            "{err}"
        );
        // Re-taking a held lease is fine; a release makes room for one more.
        c.launch(launch("h7".into())).await.unwrap();
        c.release(v1::ReleaseRequest {
            id: "session:s:svc".into(),
            holder: "h7".into(),
        })
        .await
        .unwrap();
        let r = c
            .launch(launch("one-more".into()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.instance.unwrap().leases.len(), MAX_LEASES);
    });
}

/// Issue 11: a workload's sd_notify `STATUS=` reached `get` raw and unbounded: an escape
/// sequence (retitle the terminal, clear the screen), a CR and U+202E went straight to the
/// user's terminal.
#[test]
fn notify_status_reached_the_terminal_raw() {
    let Some(py) = python3() else { return };
    let d = Daemon::start(&[]);
    let script = "import os, socket, time\n\
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
        evil = '\\x1b]0;pwned\\x07\\x1b[2J\\rgood\\u202etxt.exe ' + 'x' * 2000\n\
        s.sendto(('STATUS=' + evil + '\\nREADY=1').encode(), os.environ['NOTIFY_SOCKET'])\n\
        time.sleep(1000)\n";
    write_workload(
        &d.workloads,
        "noisy",
        &format!("name: noisy\ncommand: [{py}, notify.py]\nisolation: session\nreadiness: {{notify: true, timeout: 30s}}\n"),
        &[("notify.py", script)],
    );
    assert!(d.cli(&["reload"]).status.success());
    let i = d.json(&["launch", "noisy", "--session", "s", "-o", "json"]);
    assert_eq!(i["state"], "ready", "{i:#}");
    let st = i["status_text"].as_str().unwrap_or_default().to_owned();
    assert!(st.contains("good") && st.contains("txt.exe"), "{st:?}");
    assert!(st.len() <= 256, "stored bounded: {} bytes", st.len());
    assert!(
        !st.chars().any(bulkhead_core::text::is_unsafe),
        "stored sanitised: {st:?}"
    );
    for args in [&["get", "session:s:noisy"][..], &["list"][..]] {
        let out = d.cli(args);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text
                .chars()
                .any(|c| c != '\n' && bulkhead_core::text::is_unsafe(c)),
            "{args:?} printed raw control text: {text:?}"
        );
    }
}
