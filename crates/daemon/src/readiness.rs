//! Readiness signals: the sd_notify socket and the http/tcp/exec probes.
//!
//! An instance is ready when every configured signal has passed: `READY=1` (when `notify`
//! is on) and each probe's `success_threshold` consecutive successes. These tasks only
//! report; the instance actor combines them, and it also watches the process, so a death
//! ends a readiness wait at once (readiness is bounded by liveness).
//!
//! ## sd_notify
//!
//! Each instance gets its own datagram socket, `$NOTIFY_SOCKET`, bound before the spawn
//! so that no message can be sent before anyone listens. The kernel attaches the sender's
//! credentials (`SO_PASSCRED`); a message is accepted only from the instance's main
//! process or a process in its process group, so one instance cannot mark another ready
//! even if it finds the other's socket. A helper that exits and is reaped before the
//! daemon reads its message cannot be attributed and is dropped (send from the main
//! process, or use `systemd-notify --pid=$$`, which sends the main pid's credentials).
//! Understood: `READY=1`, `STATUS=...`, `STOPPING=1`, `MAINPID=n`, `WATCHDOG=1`,
//! `WATCHDOG=trigger`, `EXTEND_TIMEOUT_USEC=n` (while starting: the readiness deadline is
//! at least that far away), `RELOADING=1` (not ready until the next `READY=1`); the rest
//! is ignored.
//! `STATUS` text is kept to 256 bytes with control characters and bidi overrides replaced
//! (`bulkhead_core::text::sanitize`).

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulkhead_core::spec::ProbeTiming;
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UnixDatagram};
use tokio::sync::mpsc;

/// What an instance said over sd_notify.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyMsg {
    pub ready: bool,
    pub stopping: bool,
    pub status: Option<String>,
    pub main_pid: Option<u32>,
    /// `WATCHDOG=1`: the instance is alive.
    pub watchdog: bool,
    /// `WATCHDOG=trigger`: the instance asks to be treated as having missed its watchdog.
    pub watchdog_trigger: bool,
    /// `EXTEND_TIMEOUT_USEC=`: the current deadline (readiness) is at least this far away.
    pub extend_timeout: Option<Duration>,
    /// `RELOADING=1`: not ready until the next `READY=1`.
    pub reloading: bool,
}

impl NotifyMsg {
    pub fn parse(data: &[u8]) -> NotifyMsg {
        let mut m = NotifyMsg::default();
        for line in String::from_utf8_lossy(data).lines() {
            match line.split_once('=') {
                Some(("READY", "1")) => m.ready = true,
                Some(("STOPPING", "1")) => m.stopping = true,
                // Shown by `get`, `list` and events: stored bounded and without control
                // characters or bidi overrides, whatever the workload sent.
                Some(("STATUS", s)) => {
                    m.status = Some(bulkhead_core::text::sanitize(
                        s,
                        bulkhead_core::text::MAX_STATUS_BYTES,
                    ))
                }
                Some(("MAINPID", p)) => m.main_pid = p.trim().parse().ok(),
                Some(("WATCHDOG", "1")) => m.watchdog = true,
                Some(("WATCHDOG", "trigger")) => m.watchdog_trigger = true,
                Some(("EXTEND_TIMEOUT_USEC", us)) => {
                    m.extend_timeout = us.trim().parse().ok().map(Duration::from_micros)
                }
                Some(("RELOADING", "1")) => m.reloading = true,
                _ => {}
            }
        }
        m
    }
}

/// A bound notify socket, removed from the file system when dropped.
pub struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    pub fn bind(path: &Path) -> std::io::Result<NotifySocket> {
        let _ = std::fs::remove_file(path);
        let sock = UnixDatagram::bind(path)?;
        rustix::net::sockopt::set_socket_passcred(&sock, true)?;
        Ok(NotifySocket {
            sock,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Receives messages until the socket is dropped (the task is aborted), forwarding
    /// those whose sender `owns` accepts.
    pub async fn run(self, owns: impl Fn(u32) -> bool, tx: mpsc::UnboundedSender<NotifyMsg>) {
        let mut data = vec![0u8; 4096];
        loop {
            let got = self
                .sock
                .async_io(Interest::READABLE, || {
                    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmCredentials(1))];
                    let mut control = RecvAncillaryBuffer::new(&mut space);
                    let mut iov = [IoSliceMut::new(&mut data)];
                    let msg = rustix::net::recvmsg(
                        &self.sock,
                        &mut iov,
                        &mut control,
                        RecvFlags::DONTWAIT,
                    )
                    .map_err(std::io::Error::from)?;
                    let mut pid = None;
                    for c in control.drain() {
                        if let RecvAncillaryMessage::ScmCredentials(cred) = c {
                            pid = Some(cred.pid.as_raw_nonzero().get() as u32);
                        }
                    }
                    Ok((msg.bytes, pid))
                })
                .await;
            let (n, pid) = match got {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!("notify socket {}: {e}", self.path.display());
                    return;
                }
            };
            let Some(pid) = pid else {
                tracing::warn!(
                    "notify socket {}: message without credentials dropped",
                    self.path.display()
                );
                continue;
            };
            if !owns(pid) {
                tracing::warn!(
                    "notify socket {}: message from pid {pid}, which is not part of the instance, dropped",
                    self.path.display()
                );
                continue;
            }
            let msg = NotifyMsg::parse(&data[..n.min(data.len())]);
            if let Some(mp) = msg.main_pid {
                if !owns(mp) {
                    tracing::warn!(
                        "notify socket {}: MAINPID={mp} is not part of the instance, ignored",
                        self.path.display()
                    );
                }
            }
            if tx.send(msg).is_err() {
                return;
            }
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether `pid` belongs to the instance whose main process (and process group) is
/// `main`: the main process itself or any member of its process group.
pub fn pid_in_group(pid: u32, main: u32) -> bool {
    if pid == main {
        return true;
    }
    matches!(bulkhead_driver::sys::getpgid(pid), Ok(g) if g == main)
}

/// One probe check.
#[derive(Debug, Clone)]
pub enum Check {
    Http {
        port: u16,
        path: String,
    },
    Tcp {
        port: u16,
    },
    Exec {
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: PathBuf,
    },
}

impl Check {
    pub fn name(&self) -> &'static str {
        match self {
            Check::Http { .. } => "http",
            Check::Tcp { .. } => "tcp",
            Check::Exec { .. } => "exec",
        }
    }

    /// One attempt; `Err` says why it failed.
    pub async fn attempt(&self) -> Result<(), String> {
        match self {
            Check::Tcp { port } => TcpStream::connect(("127.0.0.1", *port))
                .await
                .map(drop)
                .map_err(|e| format!("tcp 127.0.0.1:{port}: {e}")),
            Check::Http { port, path } => http_get(*port, path).await,
            Check::Exec { argv, env, cwd } => {
                let mut cmd = std::process::Command::new(&argv[0]);
                cmd.args(&argv[1..])
                    .env_clear()
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    .current_dir(cwd)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null());
                // Registered with the orphan reaper, so it never takes this status; its
                // own process group, killed if the attempt is dropped (probe timeout).
                let mut child = bulkhead_driver::reaper::spawn(&mut cmd)
                    .map_err(|e| format!("exec {}: {e}", argv[0]))?
                    .child;
                let status = child
                    .wait()
                    .await
                    .map_err(|e| format!("exec {}: {e}", argv[0]))?;
                if matches!(status, bulkhead_core::event::ExitStatus::Exited { code: 0 }) {
                    Ok(())
                } else {
                    Err(format!("exec {}: {status}", argv[0]))
                }
            }
        }
    }
}

/// `GET` over HTTP/1.1; a status from 200 to 399 passes (as in Kubernetes).
async fn http_get(port: u16, path: &str) -> Result<(), String> {
    let fail = |e: &dyn std::fmt::Display| format!("http 127.0.0.1:{port}{path}: {e}");
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| fail(&e))?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: bulkhead-probe\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.map_err(|e| fail(&e))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 4096 {
        let n = s.read(&mut chunk).await.map_err(|e| fail(&e))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| fail(&"no HTTP status line in the response"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(fail(&format_args!("status {code}")))
    }
}

/// Runs `check` until it has passed `success_threshold` times in a row, then reports and
/// ends. Before readiness, failures only reset the count: the readiness `timeout` is what
/// ends a launch.
pub async fn run_until_passed(check: Check, timing: ProbeTiming) {
    tokio::time::sleep(timing.initial_delay).await;
    let mut interval = tokio::time::interval(timing.period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut successes = 0;
    loop {
        interval.tick().await;
        match tokio::time::timeout(timing.timeout, check.attempt()).await {
            Ok(Ok(())) => {
                successes += 1;
                if successes >= timing.success_threshold {
                    return;
                }
            }
            Ok(Err(e)) => {
                tracing::debug!("readiness probe: {e}");
                successes = 0;
            }
            Err(_) => {
                tracing::debug!("readiness probe {} timed out", check.name());
                successes = 0;
            }
        }
    }
}

/// How often a probe may run at most: guards against a zero period from elsewhere.
pub const MIN_PERIOD: Duration = Duration::from_millis(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_notify_messages() {
        let m = NotifyMsg::parse(b"READY=1\nSTATUS=warming up\nMAINPID=42\nX=1");
        assert_eq!(
            m,
            NotifyMsg {
                ready: true,
                stopping: false,
                status: Some("warming up".into()),
                main_pid: Some(42)
            }
        );
        assert!(!NotifyMsg::parse(b"READY=0").ready);
        assert!(NotifyMsg::parse(b"STOPPING=1").stopping);
    }

    /// Issue 11: `STATUS=` reached terminals raw (escape sequences, U+202E) and unbounded.
    #[test]
    fn notify_status_reached_terminals_raw() {
        let mut msg = "STATUS=\u{1b}]0;owned\u{7}\u{1b}[2J\rgood\u{202e}txt.exe ".to_owned();
        msg.push_str(&"é".repeat(4000));
        let st = NotifyMsg::parse(msg.as_bytes()).status.unwrap();
        assert!(!st.chars().any(bulkhead_core::text::is_unsafe), "{st:?}");
        assert!(st.len() <= 256, "{}", st.len());
        assert!(st.contains("good") && st.contains("txt.exe"), "{st:?}");
    }

    #[tokio::test]
    async fn notify_socket_checks_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sock");
        let sock = NotifySocket::bind(&path).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let me = std::process::id();
        // First run: only accept pid 1 (not us) -> dropped. Second: accept us.
        let task = tokio::spawn(sock.run(move |pid| pid == me, tx));
        let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
        client.send_to(b"READY=1", &path).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(got.ready);
        task.abort();
        let _ = task.await;
        assert!(!path.exists(), "socket file removed with the task");
    }

    #[tokio::test]
    async fn notify_socket_rejects_strangers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sock");
        let sock = NotifySocket::bind(&path).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(sock.run(|pid| pid == 1, tx));
        let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
        client.send_to(b"READY=1", &path).unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err());
        task.abort();
    }

    #[tokio::test]
    async fn http_probe_reads_status() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            for code in [503, 200] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let resp = format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n");
                s.write_all(resp.as_bytes()).await.unwrap();
            }
        });
        let e = http_get(port, "/healthz").await.unwrap_err();
        assert!(e.contains("status 503"), "{e}");
        http_get(port, "/healthz").await.unwrap();
    }
}

/// What a monitor reports about a ready instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// A readiness probe failed `failure_threshold` times in a row.
    Unhealthy(String),
    /// The readiness probe passed `success_threshold` times in a row again.
    Healthy,
    /// A liveness probe failed `failure_threshold` times in a row.
    LivenessFailed(String),
}

/// Watches a ready instance with one probe until aborted. A readiness probe reports
/// `Unhealthy` / `Healthy` transitions; a liveness probe reports `LivenessFailed` once and
/// ends.
pub async fn monitor(
    check: Check,
    timing: ProbeTiming,
    liveness: bool,
    tx: mpsc::UnboundedSender<Health>,
) {
    tokio::time::sleep(timing.initial_delay).await;
    let mut interval = tokio::time::interval(timing.period.max(MIN_PERIOD));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The instance just became ready: start healthy.
    interval.tick().await;
    let (mut healthy, mut successes, mut failures) = (true, 0u32, 0u32);
    loop {
        interval.tick().await;
        let result = match tokio::time::timeout(timing.timeout, check.attempt()).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "{} probe timed out after {:?}",
                check.name(),
                timing.timeout
            )),
        };
        match result {
            Ok(()) => {
                failures = 0;
                successes += 1;
                if !healthy && successes >= timing.success_threshold {
                    healthy = true;
                    if tx.send(Health::Healthy).is_err() {
                        return;
                    }
                }
            }
            Err(reason) => {
                successes = 0;
                failures += 1;
                if healthy && failures >= timing.failure_threshold {
                    healthy = false;
                    let msg = if liveness {
                        Health::LivenessFailed(reason)
                    } else {
                        Health::Unhealthy(reason)
                    };
                    if tx.send(msg).is_err() || liveness {
                        return;
                    }
                }
            }
        }
    }
}
