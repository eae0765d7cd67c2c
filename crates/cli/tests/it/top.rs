//! `bulkhead top` driven as a person would: the real binary in a real terminal (tmux,
//! with send-keys and capture-pane), against a real daemon. Skips with a printed reason
//! where tmux is missing (`.ci/setup-cli.sh` installs it).

use crate::harness::*;
use crate::tmux::{row, Tmux};

const TICKER: &str = "name: web\ncommand: [/bin/sh, -c, 'n=0; while :; do n=$((n+1)); echo tick $n; sleep 0.2; done']\n";

#[test]
fn top_follows_instances_live_and_acts_on_them() {
    let d = Daemon::start(&[("web", TICKER)]);
    d.json(&["launch", "web", "--namespace", "a", "-o", "json"]);
    let Some(t) = Tmux::start(&d, 100, 30, &[]) else {
        return;
    };
    t.wait("ns:a:web ready", |s| {
        row(s, "ns:a:web").is_some_and(|r| r.contains("ready"))
    });
    // A launch made elsewhere appears, from the event stream.
    let b = d.json(&["launch", "web", "--namespace", "b", "-o", "json"]);
    t.wait("ns:b:web", |s| row(s, "ns:b:web").is_some());
    // A crash changes the row's state.
    let pid = b["pid"].as_u64().unwrap() as i32;
    // SAFETY: kill(2) on a pid the daemon reported for an instance it runs.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let s = t.wait("ns:b:web crashed", |s| {
        row(s, "ns:b:web").is_some_and(|r| r.contains("crashed"))
    });
    assert!(s.lines().next().unwrap().contains("1 crashed"), "{s}");

    // Filtering by typing.
    t.text("/ns:a");
    t.keys(&["Enter"]);
    let s = t.wait("the filter", |s| row(s, "ns:b:web").is_none());
    assert!(row(&s, "ns:a:web").is_some(), "{s}");
    assert!(s.contains("filter: ns:a (1 shown)"), "{s}");

    // The detail pane: the instance's state and the manifest its run started with.
    t.keys(&["Enter"]);
    let s = t.wait("the detail pane with the manifest", |s| {
        s.contains("manifest of the current run:") && s.contains("\"command\": [")
    });
    assert!(s.contains("last events:"), "{s}");
    t.keys(&["Escape"]);

    // The log pane follows the instance: later ticks keep arriving.
    t.text("l");
    let s = t.wait("the log pane", |s| {
        s.contains("logs of ns:a:web") && s.contains("tick")
    });
    let last_tick = |s: &str| {
        s.lines()
            .filter_map(|l| l.split("tick ").nth(1))
            .filter_map(|n| n.trim_end_matches(['│', ' ']).trim().parse::<u64>().ok())
            .max()
            .unwrap_or(0)
    };
    let seen = last_tick(&s);
    t.wait("a later tick", |s| last_tick(s) > seen + 2);
    t.keys(&["Escape"]);
    t.wait("the table again", |s| row(s, "ns:a:web").is_some());

    // Terminate from the view, with its confirmation.
    t.text("t");
    t.wait("the question", |s| s.contains("terminate ns:a:web? y/n"));
    t.text("y");
    t.wait("ns:a:web terminated", |s| {
        row(s, "ns:a:web").is_some_and(|r| r.contains("terminated"))
    });
    assert_eq!(
        d.json(&["get", "ns:a:web", "-o", "json"])["state"],
        "terminated"
    );

    // q leaves the terminal as it was: the normal screen, canonical mode.
    t.text("q");
    let s = t.wait("top to exit", |s| {
        s.contains("top exited") && s.contains("icanon")
    });
    assert!(s.contains("top exited 0"), "{s}");
    assert!(s.lines().any(|l| l.trim() == "icanon"), "{s}");
    assert_eq!(
        t.tmux(&["display", "-p", "-t", "top", "#{alternate_on}"])
            .trim(),
        "0"
    );
}

/// In an 80x24 terminal every line fits; colours are on by default and off with
/// `NO_COLOR`; the help and the launch prompt work from the keys.
#[test]
fn top_fits_80x24_honours_no_color_and_launches() {
    let d = Daemon::start(&[("web", TICKER)]);
    d.json(&["launch", "web", "--namespace", "a", "-o", "json"]);
    let Some(t) = Tmux::start(&d, 80, 24, &[]) else {
        return;
    };
    let s = t.wait("the row", |s| {
        row(s, "ns:a:web").is_some_and(|r| r.contains("ready"))
    });
    assert!(s.lines().all(|l| l.chars().count() <= 80), "{s}");
    assert!(s.lines().nth(1).unwrap().contains("STATE"), "{s}");
    // The state in green.
    let green = |e: &str| e.contains("\u{1b}[32m") || e.contains("38;5;2m");
    assert!(green(&t.screen_escaped()), "no colour on a terminal");
    // Help.
    t.text("?");
    t.wait("the help", |s| s.contains("help") && s.contains("filter"));
    t.keys(&["Escape"]);
    // Launch from the view: the prompt lists the workloads, tab completes the name.
    t.text("n");
    t.wait("the workload list", |s| {
        s.contains("launch:") && s.lines().any(|l| l.contains("│web"))
    });
    t.text("we");
    t.keys(&["Tab"]);
    t.text("ns:zz");
    t.keys(&["Enter"]);
    t.wait("the launched row", |s| row(s, "ns:zz:web").is_some());
    t.text("q");
    t.wait("top to exit", |s| s.contains("top exited 0"));

    let Some(t) = Tmux::start(&d, 80, 24, &[("NO_COLOR", "1")]) else {
        return;
    };
    t.wait("the row", |s| row(s, "ns:a:web").is_some());
    let e = t.screen_escaped();
    assert!(!e.contains("[32m") && !e.contains("38;5;"), "{e}");
}

/// Many instances: the header counts all of them, and the view scrolls to the last
/// one (only the rows on screen are drawn).
#[test]
fn top_scrolls_through_many_instances() {
    let d = Daemon::start(&[("s", "name: s\ncommand: [/bin/sleep, '1000']\n")]);
    let n = 300;
    let Some(t) = Tmux::start(&d, 100, 30, &[]) else {
        return;
    };
    for i in 0..n {
        let o = d.cli(&[
            "launch",
            "s",
            "--namespace",
            &format!("n{i:03}"),
            "--wait",
            "started",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    t.wait("every instance counted", |s| {
        s.lines().next().is_some_and(|h| {
            h.contains(&format!("{n} instances")) && h.contains(&format!("{n} ready"))
        })
    });
    t.keys(&["End"]);
    let s = t.wait("the last row", |s| row(s, "ns:n299:s").is_some());
    assert!(row(&s, "ns:n000:s").is_none(), "{s}");
    t.keys(&["Home"]);
    t.wait("the first row", |s| row(s, "ns:n000:s").is_some());
}

/// `--once` prints one frame as text, for scripts.
#[test]
fn top_once_prints_a_frame() {
    let d = Daemon::start(&[("web", TICKER)]);
    d.json(&["launch", "web", "--namespace", "a", "-o", "json"]);
    let o = d.cli(&["top", "--once", "--width", "80", "--height", "10"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = String::from_utf8_lossy(&o.stdout);
    assert_eq!(s.lines().count(), 10, "{s}");
    assert!(
        s.lines().next().unwrap().contains("1 instances  1 ready"),
        "{s}"
    );
    assert!(
        row(&s, "ns:a:web").is_some_and(|r| r.contains("ready")),
        "{s}"
    );
}
