//! The CLI as people know it from other tools (issue 14): a closed pipe is a quiet
//! success, aliases, `list` filters and its AGE column, signal names, human units,
//! completions that load, man pages that render, colours only on a terminal, daemon logs
//! as text or JSON.

use std::io::Read;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::harness::*;

const SLEEPER: &str = "name: web\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n";
const WORKER: &str =
    "name: worker\nisolation: session\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n";
/// Dies of SIGKILL at once; no restarts, so it stays `crashed`.
const KILLED: &str =
    "name: killed\ncommand: [/bin/sh, -c, 'kill -9 $$']\nrestart: {policy: never}\n";

/// Runs the CLI with stdout on a pipe whose read end is already closed, as after `| head`
/// has read what it wanted and exited (closed before the CLI starts: no race).
fn cli_into_closed_pipe(d: &Daemon, args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(BIN)
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

fn ids(v: &Value) -> Vec<String> {
    let mut ids: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

fn launch_some(d: &Daemon) {
    d.json(&["launch", "web", "--wait", "started", "-o", "json"]);
    d.json(&[
        "launch",
        "web",
        "--namespace",
        "blue",
        "--wait",
        "started",
        "-o",
        "json",
    ]);
    for s in ["s1", "s2"] {
        d.json(&[
            "launch",
            "worker",
            "--session",
            s,
            "--wait",
            "started",
            "-o",
            "json",
        ]);
    }
}

/// Issue 14: `list -o json | head -1` printed `Broken pipe (os error 32)` and exited 1
/// (and text output panicked in `println!`).
#[test]
fn a_closed_pipe_is_a_quiet_success() {
    let d = Daemon::start(&[("web", SLEEPER), ("worker", WORKER)]);
    launch_some(&d);
    for args in [
        &["list", "-o", "json"][..],
        &["list"],
        &["ls", "--state", "ready,starting"],
        &["get", "ns:default:web"],
        &["get", "ns:default:web", "-o", "json"],
        &["events"],
        &["events", "-o", "json"],
        &["workloads"],
        &["workloads", "-o", "json"],
        &["health"],
        &["health", "-o", "json"],
        &["completions", "bash"],
        &["man"],
    ] {
        let out = cli_into_closed_pipe(&d, args);
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "bulkhead {args:?} into a closed pipe: {} {:?}",
            out.status,
            stderr(&out)
        );
    }
    // A real error on a closed stdout is still reported.
    let out = cli_into_closed_pipe(&d, &["get", "ns:default:nope"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("nope"), "{}", stderr(&out));
}

/// The issue's own command, through a shell pipe into `head -1`, with more JSON than a
/// pipe holds (so that the write after head has gone does fail).
#[test]
fn list_json_piped_into_head_exits_zero_and_says_nothing() {
    let d = Daemon::start(&[("worker", WORKER)]);
    let mut n = 0;
    loop {
        n += 1;
        d.json(&[
            "launch",
            "worker",
            "--session",
            &format!("s{n}"),
            "--wait",
            "none",
            "-o",
            "json",
        ]);
        let whole = d.cli(&["list", "-o", "json"]);
        // Twice the default pipe capacity (64 KiB): head exits after its first read and
        // at least one write of the CLI meets the closed pipe.
        if whole.stdout.len() > 2 * 65_536 {
            break;
        }
        assert!(
            n < 2_000,
            "list -o json stays small: {} bytes",
            whole.stdout.len()
        );
    }
    let script = format!(
        "set -o pipefail; '{BIN}' --socket '{}' list -o json | head -1",
        d.socket.display()
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}: {:?}",
        out.status,
        stderr(&out)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[\n");
}

#[test]
fn list_filters_aliases_and_age_column() {
    let d = Daemon::start(&[("web", SLEEPER), ("worker", WORKER), ("killed", KILLED)]);
    launch_some(&d);
    let all = ids(&d.json(&["list", "-o", "json"]));
    assert_eq!(all.len(), 4, "{all:?}");
    for alias in ["ls", "ps"] {
        assert_eq!(ids(&d.json(&[alias, "-o", "json"])), all, "{alias}");
    }
    assert_eq!(
        ids(&d.json(&["list", "--workload", "web", "-o", "json"])),
        ["ns:blue:web", "ns:default:web"]
    );
    assert_eq!(
        ids(&d.json(&["list", "--namespace", "blue", "-o", "json"])),
        ["ns:blue:web"]
    );
    assert_eq!(
        ids(&d.json(&["list", "--session", "s2", "-o", "json"])),
        ["session:s2:worker"]
    );
    // `stop` is `terminate`; then the state filter tells the stopped one apart.
    let stopped = d.json(&["stop", "session:s2:worker", "--grace", "2s", "-o", "json"]);
    assert_eq!(stopped["id"], "session:s2:worker");
    d.wait_event("session:s2:worker terminated", |e| {
        e["instance"] == "session:s2:worker" && e["kind"] == "terminated"
    });
    assert_eq!(
        ids(&d.json(&["list", "--state", "terminated", "-o", "json"])),
        ["session:s2:worker"]
    );
    assert_eq!(
        ids(&d.json(&[
            "list",
            "--workload",
            "worker",
            "--state",
            "ready,starting",
            "-o",
            "json"
        ])),
        ["session:s1:worker"]
    );
    let bad = d.cli(&["list", "--state", "runing"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("possible values"), "{}", stderr(&bad));

    // AGE: from started_at_ms, in a human unit.
    let out = d.cli(&["list", "--session", "s1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let head: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let row: Vec<&str> = lines.next().expect("one row").split_whitespace().collect();
    let at = head
        .iter()
        .position(|h| *h == "AGE")
        .expect("an AGE column");
    let age = row[at];
    let (num, unit) = age.split_at(age.len() - 1);
    assert!(
        num.parse::<u64>().is_ok() && "smhd".contains(unit),
        "AGE {age:?} in:\n{text}"
    );

    // The daemon's uptime too.
    let health = String::from_utf8_lossy(&d.cli(&["health"]).stdout).into_owned();
    let up = health
        .split_once(", up ")
        .and_then(|(_, r)| r.split_once(')'))
        .map(|(u, _)| u.to_owned())
        .unwrap_or_else(|| panic!("no uptime in:\n{health}"));
    let (num, unit) = up.split_at(up.len() - 1);
    assert!(
        num.parse::<u64>().is_ok() && "smhd".contains(unit),
        "up {up:?}"
    );

    // Signals by name in text, by number in JSON.
    d.json(&["launch", "killed", "--wait", "none", "-o", "json"]);
    d.wait_event("killed crashed", |e| {
        e["instance"] == "ns:default:killed" && e["kind"] == "crashed"
    });
    let got = d.json(&["get", "ns:default:killed", "-o", "json"]);
    assert_eq!(got["last_exit"]["signal"], 9, "{got}");
    let line = String::from_utf8_lossy(&d.cli(&["get", "ns:default:killed"]).stdout).into_owned();
    assert!(line.contains("last_exit=\"SIGKILL\""), "{line}");
    let table =
        String::from_utf8_lossy(&d.cli(&["list", "--workload", "killed"]).stdout).into_owned();
    assert!(table.contains("SIGKILL"), "{table}");
    let events = String::from_utf8_lossy(&d.cli(&["events"]).stdout).into_owned();
    let terminating = events
        .lines()
        .find(|l| l.contains("session:s2:worker terminating"))
        .unwrap_or_else(|| panic!("no terminating event in:\n{events}"));
    assert!(
        terminating.contains("signal=SIGTERM") && terminating.contains("grace=2s"),
        "{terminating}"
    );
}

/// `bash -c 'source <(bulkhead completions bash) && complete -p bulkhead'`, and the
/// completion function completes verbs, aliases and flag values.
#[test]
fn bash_loads_the_completion() {
    let script = format!("source <('{BIN}' completions bash) && complete -p bulkhead");
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("bulkhead"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // What bash does on <TAB>: COMP_WORDS/COMP_CWORD set, the function called.
    let complete = |words: &[&str]| -> Vec<String> {
        let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
        let script = format!(
            "source <('{BIN}' completions bash); COMP_WORDS=({}); COMP_CWORD={}; \
             _bulkhead bulkhead '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            quoted.join(" "),
            words.len() - 1,
            words[words.len() - 1],
            words[words.len() - 2],
        );
        let out = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    assert!(complete(&["bulkhead", "li"]).contains(&"list".to_owned()));
    assert!(complete(&["bulkhead", "list", "--st"]).contains(&"--state".to_owned()));
    let states = complete(&["bulkhead", "list", "--state", ""]);
    assert!(states.contains(&"terminated".to_owned()), "{states:?}");
    assert!(complete(&["bulkhead", "ls", "--wo"]).contains(&"--workload".to_owned()));
}

/// zsh registers the completion function and fish completes a verb with its script
/// (where they are installed).
#[test]
fn zsh_and_fish_load_their_completions() {
    let dir = tempfile::tempdir().unwrap();
    for (shell, script, expect) in [
        (
            "zsh",
            "autoload -U compinit && compinit -D -u && source \"$1\" && print -r -- $_comps[bulkhead]",
            "_bulkhead",
        ),
        ("fish", "source $argv[1]; complete -C 'bulkhead li'", "list"),
    ] {
        if Command::new(shell).arg("-c").arg("true").output().is_err() {
            eprintln!("skipped: {shell} is not installed (.ci/setup-cli.sh installs it)");
            continue;
        }
        let file = dir.path().join(format!("bulkhead.{shell}"));
        let gen = Command::new(BIN).args(["completions", shell]).output().unwrap();
        assert!(gen.status.success() && !gen.stdout.is_empty(), "{}", stderr(&gen));
        std::fs::write(&file, &gen.stdout).unwrap();
        // The shells' own files (zcompdump, fish's config) stay in the temporary directory.
        let mut cmd = Command::new(shell);
        cmd.arg("-c").arg(script);
        if shell == "zsh" {
            cmd.arg("zsh"); // $0; the file is $1
        }
        let out = cmd
            .arg(&file)
            .env("HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path())
            .env("XDG_DATA_HOME", dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && said.split_whitespace().any(|w| w == expect),
            "{shell}: {said:?} {}",
            stderr(&out)
        );
    }
}

#[test]
fn man_pages_render() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["man", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    for page in ["bulkhead.1", "bulkhead-list.1", "bulkhead-serve.1"] {
        assert!(dir.path().join(page).is_file(), "{page} written");
    }
    assert!(
        !dir.path().join("bulkhead-keeper.1").exists(),
        "no page for the hidden keeper"
    );
    let stdout = Command::new(BIN).arg("man").output().unwrap();
    let written = std::fs::read(dir.path().join("bulkhead.1")).unwrap();
    assert!(
        stdout.status.success() && stdout.stdout == written,
        "`man` prints bulkhead.1:\n{}",
        String::from_utf8_lossy(&stdout.stdout)
    );
    if Command::new("man").arg("--version").output().is_err() {
        eprintln!("skipped: man is not installed (.ci/setup-cli.sh installs man-db)");
        return;
    }
    let render = |page: &str| -> String {
        let out = Command::new("man")
            .arg("-l")
            .arg(dir.path().join(page))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .output()
            .unwrap();
        assert!(out.status.success(), "man -l {page}: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let top = render("bulkhead.1");
    for needle in [
        "NAME",
        "SYNOPSIS",
        "--socket",
        "--token",
        "bulkhead-list(1)",
    ] {
        assert!(top.contains(needle), "{needle} in bulkhead(1):\n{top}");
    }
    let list = render("bulkhead-list.1");
    assert!(
        list.contains("--workload") && list.contains("--state"),
        "{list}"
    );
}

/// Issue 14: daemon logs carried ANSI colours when not on a terminal, and could not be
/// JSON.
#[test]
fn daemon_log_has_no_colour_off_a_terminal_and_can_be_json() {
    let d = Daemon::start(&[("web", SLEEPER)]);
    d.json(&["launch", "web", "--wait", "started", "-o", "json"]);
    let log = d.daemon_log();
    assert!(log.contains("INFO") || log.contains("DEBUG"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a log file:\n{log:?}"
    );
    drop(d);

    let d = Daemon::start_with_args(&[("web", SLEEPER)], &["--log-format", "json"]);
    d.json(&["launch", "web", "--wait", "started", "-o", "json"]);
    let log = d.daemon_log();
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty());
    for l in &lines {
        assert!(
            l["level"].is_string() && l["timestamp"].is_string() && l["fields"].is_object(),
            "{l}"
        );
    }
}

/// Runs `cmd` on a pseudo-terminal (util-linux `script`); returns what it printed.
fn on_a_terminal(cmd: &str, no_color: bool) -> Option<String> {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: util-linux `script` is not installed (no pseudo-terminal)");
        return None;
    }
    let mut c = Command::new("script");
    c.args(["-qefc", cmd, "/dev/null"]).stdin(Stdio::null());
    if no_color {
        c.env("NO_COLOR", "1");
    } else {
        c.env_remove("NO_COLOR");
    }
    let mut child = c.stdout(Stdio::piped()).spawn().unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child.wait().unwrap();
    Some(out)
}

/// On a terminal the daemon's log and the CLI's help are coloured, unless NO_COLOR is set
/// (the control: colour does appear on a terminal, so its absence means something).
#[test]
fn colours_on_a_terminal_unless_no_color() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("w")).unwrap();
    // `timeout` ends the daemon once it has logged its start.
    let serve = format!(
        "timeout -s INT 3 '{BIN}' serve --workloads '{w}' --state '{s}' --socket '{s}/api.sock' --no-sandbox",
        w = dir.path().join("w").display(),
        s = dir.path().join("state").display(),
    );
    let Some(coloured) = on_a_terminal(&serve, false) else {
        return;
    };
    assert!(coloured.contains("INFO"), "{coloured}");
    assert!(
        coloured.contains('\u{1b}'),
        "no colour on a terminal:\n{coloured:?}"
    );
    let plain = on_a_terminal(&serve, true).unwrap();
    assert!(plain.contains("INFO"), "{plain}");
    assert!(
        !plain.contains('\u{1b}'),
        "colour despite NO_COLOR:\n{plain:?}"
    );

    // `list` colours its STATE column on a terminal only.
    let d = Daemon::start(&[("web", SLEEPER)]);
    d.json(&["launch", "web", "--wait", "ready", "-o", "json"]);
    let list = format!("'{BIN}' --socket '{}' list", d.socket.display());
    let coloured = on_a_terminal(&list, false).unwrap();
    assert!(coloured.contains("\u{1b}[32mready"), "{coloured:?}");
    let plain = on_a_terminal(&list, true).unwrap();
    assert!(
        plain.contains("ready") && !plain.contains('\u{1b}'),
        "{plain:?}"
    );
    let piped = d.cli(&["list"]);
    assert!(!String::from_utf8_lossy(&piped.stdout).contains('\u{1b}'));

    let help = format!("'{BIN}' --help");
    let coloured = on_a_terminal(&help, false).unwrap();
    assert!(coloured.contains('\u{1b}'), "{coloured:?}");
    let plain = on_a_terminal(&help, true).unwrap();
    assert!(
        plain.contains("Connection") && !plain.contains('\u{1b}'),
        "{plain:?}"
    );
}

/// The README's install: `bulkhead man --dir <root>/man1` makes `man bulkhead` and `man
/// bulkhead-list` work with <root> in the manual path.
#[test]
fn installed_man_pages_are_found_by_man() {
    if Command::new("man").arg("--version").output().is_err() {
        eprintln!("skipped: man is not installed (.ci/setup-cli.sh installs man-db)");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["man", "--dir"])
        .arg(root.path().join("man1"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    for (page, needle) in [("bulkhead", "Connection"), ("bulkhead-list", "--workload")] {
        let out = Command::new("man")
            .arg("-M")
            .arg(root.path())
            .arg(page)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.to_lowercase().contains(&needle.to_lowercase()),
            "man {page}: {text}{}",
            stderr(&out)
        );
    }
}

/// The daemon applies `list`'s filters; a request that names an unknown state is refused
/// (INVALID_ARGUMENT, naming the field), not answered with everything.
#[test]
fn the_api_refuses_an_unknown_state_filter() {
    let d = Daemon::start(&[("web", SLEEPER)]);
    d.json(&["launch", "web", "-o", "json"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = bulkhead_api::connect(&d.socket).await.unwrap();
        let ok = c
            .list(bulkhead_api::v1::ListRequest {
                workloads: vec!["web".into()],
                states: vec!["ready".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ok.instances.len(), 1);
        let none = c
            .list(bulkhead_api::v1::ListRequest {
                workloads: vec!["other".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(none.instances.is_empty());
        let e = c
            .list(bulkhead_api::v1::ListRequest {
                states: vec!["runing".into()],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.message().starts_with("states:"), "{e}");
    });
}
