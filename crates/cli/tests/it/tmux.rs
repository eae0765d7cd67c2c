//! Driving `bulkhead top` in a real terminal: a tmux server of its own per test, keys
//! in with send-keys, the screen out with capture-pane (the it and faults suites).

// Shared by the it and faults suites, each of which uses part of it.
#![allow(dead_code)]

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

/// A tmux server of its own (`-L`), with one session running `bulkhead top`.
pub struct Tmux {
    server: String,
}

impl Tmux {
    /// Runs `bulkhead top` in a `width` x `height` terminal; after it exits the shell
    /// prints its exit code and whether the terminal is back in canonical mode.
    pub fn start(d: &Daemon, width: u16, height: u16, env: &[(&str, &str)]) -> Option<Tmux> {
        if Command::new("tmux").arg("-V").output().is_err() {
            eprintln!("skipped: tmux is missing (apt-get install tmux; .ci/setup-cli.sh)");
            return None;
        }
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let server = format!(
            "bulkhead-top-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let script = format!(
            "{BIN} --socket {} top --interval 500ms; echo \"top exited $?\"; stty -a | tr ' ' '\\n' | grep -x -e icanon -e -icanon; sleep 1000",
            d.socket.display()
        );
        let mut cmd = Command::new("tmux");
        cmd.args([
            "-L",
            &server,
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            "top",
        ])
        .args(["-x", &width.to_string(), "-y", &height.to_string()]);
        for (k, v) in env {
            cmd.args(["-e", &format!("{k}={v}")]);
        }
        let st = cmd.args(["sh", "-c", &script]).status().unwrap();
        assert!(st.success(), "tmux new-session failed");
        Some(Tmux { server })
    }

    pub fn tmux(&self, args: &[&str]) -> String {
        let o = Command::new("tmux")
            .args(["-L", &self.server])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", "top"])
    }

    /// The screen with its escape sequences (colours).
    pub fn screen_escaped(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-e", "-t", "top"])
    }

    /// Keys by tmux's names (`Enter`, `Escape`, `Down`) or text (`-l`).
    pub fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "top"];
        args.extend_from_slice(keys);
        self.tmux(&args);
    }

    pub fn text(&self, text: &str) {
        self.tmux(&["send-keys", "-t", "top", "-l", text]);
    }

    /// Waits until the screen satisfies `pred`; fails with the screen after the deadline.
    pub fn wait(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "top never showed {what}; the screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.server, "kill-server"])
            .output();
    }
}

/// The line of the table that shows instance `id`.
pub fn row<'a>(screen: &'a str, id: &str) -> Option<&'a str> {
    screen
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
}
