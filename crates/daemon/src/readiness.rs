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
use tokio::io::Interest;
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
    /// The file, or `@name` for a socket in the abstract namespace (no file).
    path: PathBuf,
    file: bool,
    /// Held while messages are read (see [`NotifySocket::receive_queued`]).
    reading: std::sync::Mutex<()>,
}

impl NotifySocket {
    pub fn bind(path: &Path) -> std::io::Result<NotifySocket> {
        let _ = std::fs::remove_file(path);
        let sock = UnixDatagram::bind(path)?;
        rustix::net::sockopt::set_socket_passcred(&sock, true)?;
        Ok(NotifySocket {
            sock,
            path: path.to_owned(),
            file: true,
            reading: std::sync::Mutex::new(()),
        })
    }

    /// A socket in the abstract namespace, `NOTIFY_SOCKET=@name` (sd_notify's form): for
    /// an instance running as another user, which could not reach a file in the daemon's
    /// 0700 state directory. Anyone in the network namespace may send to it; as for the
    /// file, only messages from the instance's own processes are taken.
    pub fn bind_abstract(name: &str) -> std::io::Result<NotifySocket> {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        let std_sock = std::os::unix::net::UnixDatagram::bind_addr(&addr)?;
        std_sock.set_nonblocking(true)?;
        let sock = UnixDatagram::from_std(std_sock)?;
        rustix::net::sockopt::set_socket_passcred(&sock, true)?;
        Ok(NotifySocket {
            sock,
            path: PathBuf::from(format!("@{name}")),
            file: false,
            reading: std::sync::Mutex::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Receives messages until the task is aborted, handing those whose sender `owns`
    /// accepts to `handle`, in order. `main_pid` maps a `MAINPID=` value (a pid as the
    /// instance sees it) to the host pid of a process of the instance, or `None`.
    pub async fn run(
        self: std::sync::Arc<Self>,
        owns: impl Fn(u32) -> bool,
        main_pid: impl Fn(u32) -> Option<u32>,
        handle: impl Fn(NotifyMsg),
    ) {
        loop {
            if let Err(e) = self.sock.readable().await {
                tracing::warn!("notify socket {}: {e}", self.path.display());
                return;
            }
            // Through tokio (its readiness is cleared when the queue is empty).
            let _one = self.reading.lock().unwrap_or_else(|e| e.into_inner());
            let got = self
                .sock
                .try_io(Interest::READABLE, || self.drain(&owns, &main_pid, &handle));
            match got {
                Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {
                    tracing::warn!("notify socket {}: {e}", self.path.display());
                    return;
                }
                _ => {}
            }
        }
    }

    /// Reads every message queued now, without waiting, and hands those whose sender
    /// `owns` accepts to `handle`, in order. One reader at a time (the task above, and the
    /// driver's hook when the main process exits: see [`crate::mainpid`]), so messages
    /// are never handled out of order. Reads the socket directly: tokio may not have
    /// seen it become readable yet.
    pub fn receive_queued(
        &self,
        owns: &dyn Fn(u32) -> bool,
        main_pid: &dyn Fn(u32) -> Option<u32>,
        handle: &dyn Fn(NotifyMsg),
    ) -> std::io::Result<()> {
        let _one = self.reading.lock().unwrap_or_else(|e| e.into_inner());
        match self.drain(owns, main_pid, handle) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            other => other,
        }
    }

    /// Reads until the queue is empty (`WouldBlock`), the caller holding `reading`.
    fn drain(
        &self,
        owns: &dyn Fn(u32) -> bool,
        main_pid: &dyn Fn(u32) -> Option<u32>,
        handle: &dyn Fn(NotifyMsg),
    ) -> std::io::Result<()> {
        let mut data = vec![0u8; 4096];
        loop {
            let got = {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmCredentials(1))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let mut iov = [IoSliceMut::new(&mut data)];
                rustix::net::recvmsg(&self.sock, &mut iov, &mut control, RecvFlags::DONTWAIT)
                    .map_err(std::io::Error::from)
                    .map(|msg| {
                        let mut pid = None;
                        for c in control.drain() {
                            if let RecvAncillaryMessage::ScmCredentials(cred) = c {
                                pid = Some(cred.pid.as_raw_nonzero().get() as u32);
                            }
                        }
                        (msg.bytes, pid)
                    })
            };
            let (n, pid) = match got {
                Ok(v) => v,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
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
            let mut msg = NotifyMsg::parse(&data[..n.min(data.len())]);
            if let Some(mp) = msg.main_pid {
                // The value is a pid as the sender sees it: the host's, unless the instance
                // has a PID namespace of its own (the sandbox).
                msg.main_pid = main_pid(mp);
                if msg.main_pid.is_none() {
                    tracing::warn!(
                        "notify socket {}: MAINPID={mp} is not part of the instance, ignored",
                        self.path.display()
                    );
                }
            }
            handle(msg);
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        if self.file {
            let _ = std::fs::remove_file(&self.path);
        }
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
    Http(Box<HttpTarget>),
    Tcp {
        port: u16,
    },
    Exec {
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: PathBuf,
        /// A process instance's user, limits and umask: the probe runs as it does.
        setup: Option<Box<bulkhead_driver::setup::ChildSetup>>,
        /// A walled instance (a sandbox): the probe runs inside it, in its namespaces
        /// and cgroups with its restrictions, as `bulkhead exec` does.
        inside: Option<bulkhead_driver::ExecTarget>,
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
            Check::Http(t) => t.get().await,
            Check::Exec {
                argv,
                env,
                cwd,
                setup,
                inside,
            } => {
                let how = match inside {
                    Some(target) => crate::exec::How::Inside(target.clone()),
                    None => crate::exec::How::Host(
                        setup
                            .as_ref()
                            .map(|s| s.prepare(cwd))
                            .transpose()
                            .map_err(|e| format!("exec {}: {e}", argv[0]))?,
                    ),
                };
                // Registered with the orphan reaper, so it never takes this status; its
                // own process group, killed if the attempt is dropped (probe timeout); on
                // the host, spawned without copying the daemon (a probe runs every
                // period).
                let mut child = crate::exec::Spawner {
                    how,
                    argv,
                    env,
                    cwd,
                }
                .spawn(bulkhead_driver::reaper::CommandIo::Null)
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

/// Where an HTTP probe goes, and what it sends.
#[derive(Debug, Clone)]
pub struct HttpTarget {
    pub https: bool,
    pub host: String,
    pub port: u16,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl HttpTarget {
    /// `GET` over HTTP/1.1 (hyper), or over TLS for `https` without verifying the
    /// certificate (as Kubernetes); a status from 200 to 399 passes.
    pub async fn get(&self) -> Result<(), String> {
        let scheme = if self.https { "https" } else { "http" };
        let fail = |e: &dyn std::fmt::Display| {
            format!("{scheme} {}:{}{}: {e}", self.host, self.port, self.path)
        };
        let mut req = hyper::Request::get(self.path.as_str())
            .header(hyper::header::HOST, format!("{}:{}", self.host, self.port))
            .header(
                hyper::header::USER_AGENT,
                concat!("bulkhead-probe/", env!("CARGO_PKG_VERSION")),
            );
        for (k, v) in &self.headers {
            // A manifest's `Host` replaces the default one.
            if k.eq_ignore_ascii_case("host") {
                if let Some(h) = req.headers_mut() {
                    h.remove(hyper::header::HOST);
                }
            }
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .map_err(|e| fail(&e))?;
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| fail(&e))?;
        let status = if self.https {
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(self.host.clone())
                .map_err(|e| fail(&e))?;
            let tls = tls_connector()
                .map_err(|e| fail(&e))?
                .connect(name, tcp)
                .await
                .map_err(|e| fail(&e))?;
            send(tls, req).await
        } else {
            send(tcp, req).await
        }
        .map_err(|e| fail(&e))?;
        if (200..400).contains(&status.as_u16()) {
            Ok(())
        } else {
            Err(fail(&format_args!("status {}", status.as_u16())))
        }
    }
}

/// One request on a new connection (a probe keeps none open between attempts).
async fn send<T>(
    io: T,
    req: hyper::Request<http_body_util::Empty<hyper::body::Bytes>>,
) -> Result<hyper::StatusCode, hyper::Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    // The connection is driven beside the request; it ends when `sender` drops.
    let driver = tokio::spawn(conn);
    let res = sender.send_request(req).await;
    drop(sender);
    driver.abort();
    Ok(res?.status())
}

/// A TLS client that accepts any certificate: an https probe checks that the instance
/// answers, not who it is (Kubernetes does the same).
fn tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    use tokio_rustls::rustls;
    static CONNECTOR: std::sync::OnceLock<Result<tokio_rustls::TlsConnector, String>> =
        std::sync::OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("cannot set up TLS: {e}"))?
                .dangerous()
                .with_custom_certificate_verifier(std::sync::Arc::new(AnyCert(provider)))
                .with_no_client_auth();
            Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
                config,
            )))
        })
        .clone()
}

/// Accepts every server certificate (signatures are still checked, so the handshake is
/// a real one).
#[derive(Debug)]
struct AnyCert(std::sync::Arc<tokio_rustls::rustls::crypto::CryptoProvider>);

impl tokio_rustls::rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &tokio_rustls::rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[tokio_rustls::rustls::pki_types::CertificateDer<'_>],
        _server_name: &tokio_rustls::rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: tokio_rustls::rustls::pki_types::UnixTime,
    ) -> Result<tokio_rustls::rustls::client::danger::ServerCertVerified, tokio_rustls::rustls::Error>
    {
        Ok(tokio_rustls::rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &tokio_rustls::rustls::pki_types::CertificateDer<'_>,
        dss: &tokio_rustls::rustls::DigitallySignedStruct,
    ) -> Result<
        tokio_rustls::rustls::client::danger::HandshakeSignatureValid,
        tokio_rustls::rustls::Error,
    > {
        tokio_rustls::rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &tokio_rustls::rustls::pki_types::CertificateDer<'_>,
        dss: &tokio_rustls::rustls::DigitallySignedStruct,
    ) -> Result<
        tokio_rustls::rustls::client::danger::HandshakeSignatureValid,
        tokio_rustls::rustls::Error,
    > {
        tokio_rustls::rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<tokio_rustls::rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
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
                main_pid: Some(42),
                ..NotifyMsg::default()
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
        let task = tokio::spawn(std::sync::Arc::new(sock).run(
            move |pid| pid == me,
            Some,
            move |m| {
                let _ = tx.send(m);
            },
        ));
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
        let task = tokio::spawn(std::sync::Arc::new(sock).run(
            |pid| pid == 1,
            Some,
            move |m| {
                let _ = tx.send(m);
            },
        ));
        let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
        client.send_to(b"READY=1", &path).unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err());
        task.abort();
    }

    /// What the driver's exit hook relies on: the messages queued now are read at once,
    /// in order, and a `MAINPID=` naming a process outside the instance is cleared; the
    /// value goes through the translation (a pid in the instance's PID namespace: 5 here).
    #[tokio::test]
    async fn queued_messages_are_read_at_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sock");
        let sock = NotifySocket::bind(&path).unwrap();
        let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
        let me = std::process::id();
        client.send_to(b"MAINPID=5\nSTATUS=a", &path).unwrap();
        client.send_to(b"MAINPID=1\nSTATUS=b", &path).unwrap();
        let got = std::sync::Mutex::new(Vec::new());
        let in_ns = |p: u32| (p == 5).then_some(me);
        sock.receive_queued(&|p| p == me, &in_ns, &|m| got.lock().unwrap().push(m))
            .unwrap();
        let got = got.into_inner().unwrap();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            (got[0].main_pid, got[0].status.as_deref()),
            (Some(me), Some("a"))
        );
        assert_eq!(
            (got[1].main_pid, got[1].status.as_deref()),
            (None, Some("b"))
        );
        // Nothing left: returns at once.
        sock.receive_queued(&|_| true, &Some, &|m| panic!("{m:?}"))
            .unwrap();
    }

    fn target(port: u16, https: bool, headers: &[(&str, &str)]) -> HttpTarget {
        HttpTarget {
            https,
            host: "127.0.0.1".into(),
            port,
            path: "/healthz".into(),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        }
    }

    /// A server that answers each connection with the next code, and hands back the
    /// requests it got.
    async fn serve(
        codes: Vec<u16>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> (u16, tokio::task::JoinHandle<Vec<String>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            for code in codes {
                let (s, _) = listener.accept().await.unwrap();
                let mut s: Box<dyn Stream> = match &tls {
                    Some(a) => Box::new(a.accept(s).await.unwrap()),
                    None => Box::new(s),
                };
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap();
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                let resp = format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n");
                s.write_all(resp.as_bytes()).await.unwrap();
                s.flush().await.unwrap();
            }
            seen
        });
        (port, task)
    }

    trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
    impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

    #[tokio::test]
    async fn http_probe_reads_status_and_sends_the_manifests_headers() {
        let (port, task) = serve(vec![503, 200], None).await;
        let e = target(port, false, &[]).get().await.unwrap_err();
        assert!(e.contains("status 503"), "{e}");
        target(port, false, &[("Host", "app.example"), ("X-Probe", "1")])
            .get()
            .await
            .unwrap();
        let seen = task.await.unwrap();
        assert!(
            seen[0].starts_with("GET /healthz HTTP/1.1\r\n"),
            "{}",
            seen[0]
        );
        assert!(seen[0]
            .to_ascii_lowercase()
            .contains(&format!("host: 127.0.0.1:{port}")));
        let second = seen[1].to_ascii_lowercase();
        assert!(second.contains("host: app.example\r\n"), "{second}");
        assert!(
            !second.contains("host: 127.0.0.1"),
            "one Host header: {second}"
        );
        assert!(second.contains("x-probe: 1\r\n"), "{second}");
    }

    #[tokio::test]
    async fn https_probe_accepts_a_self_signed_certificate_and_http_does_not_pass() {
        use tokio_rustls::rustls;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let (port, task) = serve(vec![200], Some(acceptor)).await;
        target(port, true, &[]).get().await.unwrap();
        let seen = task.await.unwrap();
        assert!(seen[0].starts_with("GET /healthz"), "{}", seen[0]);
        // The control: plain http to a TLS server does not pass.
        let (port, _task) = serve(
            vec![200],
            Some(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(
                rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![cert.der().clone()],
                    rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
                )
                .unwrap(),
            ))),
        )
        .await;
        let r = tokio::time::timeout(Duration::from_secs(5), target(port, false, &[]).get()).await;
        assert!(
            !matches!(r, Ok(Ok(()))),
            "plain http passed against a TLS server"
        );
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
