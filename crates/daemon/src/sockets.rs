//! Listening sockets the daemon owns for a key (`sockets:` in a manifest).
//!
//! [`BoundSockets`] is bound from the manifest before the first spawn of a key's
//! instance and lives as long as that instance (its [`crate::Slot`] holds it), across
//! every restart its policy makes; each run gets the same sockets
//! ([`BoundSockets::listen_fds`], cloneable descriptors) at 3.. with `LISTEN_FDS`. A
//! connection made while no program accepts (between two runs, during a start) waits in
//! the kernel's backlog instead of being refused.
//!
//! With `activation: on-connection` ([`Activator`]), the sockets are bound when the
//! catalog loads the workload, once per key it is activated for (isolation `none`: its
//! one key; `namespace`: each namespace of `activation.namespaces`, with `${NAMESPACE}`
//! replaced in Unix paths and relative ones under each instance's directory), and the
//! first connection on a key's sockets while it has no live instance launches that key's
//! instance, which uses those sockets; `idle_stop` watches each key's instance alone.
//!
//! **What counts as a connection for `idle_stop`.** The daemon never accepts on the
//! sockets, so it looks at the kernel's tables every check (a quarter of `idle_stop`,
//! between 100 ms and 5 s): a TCP socket on the port of one of the instance's TCP
//! sockets (and its address, unless that is a wildcard) in any state but `LISTEN` and
//! `TIME_WAIT` (an accepted connection, or one being set up or closed), a non-empty accept
//! queue of a listener, or a Unix socket bound to one of its Unix paths that is accepted or waits to be
//! (`/proc/net/tcp`, `tcp6`, `unix`). An instance in which no check saw a connection for
//! `idle_stop` is terminated; a connection opened and closed between two checks is not
//! seen. Each check reads those tables once (their cost grows with the host's sockets).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bulkhead_core::sockets::{Listen, SocketSpec, TcpPort};
use bulkhead_driver::listen::ListenFd;

/// One bound socket.
#[derive(Debug)]
struct Bound {
    name: String,
    fd: Arc<OwnedFd>,
    addr: BoundAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundAddr {
    Tcp(SocketAddr),
    /// The path, and the file's device and inode (removed on drop only if unchanged).
    Unix(PathBuf, u64, u64),
}

impl std::fmt::Display for BoundAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BoundAddr::Tcp(a) => write!(f, "tcp:{a}"),
            BoundAddr::Unix(p, ..) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A socket could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind socket {name} ({listen}): {source}")]
pub struct BindError {
    pub name: String,
    pub listen: String,
    #[source]
    pub source: io::Error,
}

/// The listening sockets of one key, bound once and shared by every run.
#[derive(Debug)]
pub struct BoundSockets {
    sockets: Vec<Bound>,
    /// The instance port `tcp:$PORT` sockets were bound on, if any uses it.
    port: Option<u16>,
}

impl BoundSockets {
    /// Binds `specs` in order: `$PORT` is `port`, `${NAMESPACE}` in a Unix path is
    /// `namespace`, relative Unix paths are under `runtime_dir` (made if missing). All or
    /// nothing: on error nothing stays bound.
    pub fn bind(
        specs: &[SocketSpec],
        port: u16,
        runtime_dir: &Path,
        namespace: Option<&str>,
    ) -> Result<BoundSockets, BindError> {
        let mut sockets = Vec::with_capacity(specs.len());
        let mut uses_port = false;
        for s in specs {
            let err = |source: io::Error| BindError {
                name: s.name.clone(),
                listen: s.listen.clone(),
                source,
            };
            let addr = s
                .address()
                .map_err(|r| err(io::Error::new(io::ErrorKind::InvalidInput, r)))?;
            let (fd, addr) = match addr {
                Listen::Tcp { host, port: p } => {
                    let p = match p {
                        TcpPort::Instance => {
                            uses_port = true;
                            port
                        }
                        TcpPort::Fixed(p) => p,
                    };
                    let a = SocketAddr::new(host, p);
                    (bind_tcp(a, s.backlog()).map_err(err)?, BoundAddr::Tcp(a))
                }
                Listen::Unix(path) => {
                    let path = unix_path(&path, runtime_dir, namespace).ok_or_else(|| {
                        err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            "${NAMESPACE} in the path, and the instance has no namespace",
                        ))
                    })?;
                    let mode = s
                        .unix_mode()
                        .map_err(|r| err(io::Error::new(io::ErrorKind::InvalidInput, r)))?;
                    let (fd, dev, ino) = bind_unix(&path, mode, s.backlog()).map_err(err)?;
                    (fd, BoundAddr::Unix(path, dev, ino))
                }
            };
            sockets.push(Bound {
                name: s.name.clone(),
                fd: Arc::new(fd),
                addr,
            });
        }
        Ok(BoundSockets {
            sockets,
            port: uses_port.then_some(port),
        })
    }

    /// The sockets a keeper kept for an adopted instance (`listen`, in manifest order),
    /// described again from `specs` (`port`: the instance's `$PORT`). `None` when they do
    /// not match the manifest.
    pub fn adopted(
        specs: &[SocketSpec],
        listen: &[ListenFd],
        port: u16,
        runtime_dir: &Path,
        namespace: Option<&str>,
    ) -> Option<BoundSockets> {
        use std::os::unix::fs::MetadataExt;
        if specs.len() != listen.len() {
            return None;
        }
        let mut sockets = Vec::with_capacity(specs.len());
        let mut uses_port = false;
        for (s, l) in specs.iter().zip(listen) {
            if s.name != l.name {
                return None;
            }
            let addr = match s.address().ok()? {
                Listen::Tcp { host, port: p } => BoundAddr::Tcp(SocketAddr::new(
                    host,
                    match p {
                        TcpPort::Instance => {
                            uses_port = true;
                            port
                        }
                        TcpPort::Fixed(p) => p,
                    },
                )),
                Listen::Unix(path) => {
                    let path = unix_path(&path, runtime_dir, namespace)?;
                    let m = std::fs::symlink_metadata(&path).ok()?;
                    BoundAddr::Unix(path, m.dev(), m.ino())
                }
            };
            sockets.push(Bound {
                name: s.name.clone(),
                fd: l.fd.clone(),
                addr,
            });
        }
        Some(BoundSockets {
            sockets,
            port: uses_port.then_some(port),
        })
    }

    /// The descriptors for a spawn, in order.
    pub fn listen_fds(&self) -> Vec<ListenFd> {
        self.sockets
            .iter()
            .map(|b| ListenFd {
                name: b.name.clone(),
                fd: b.fd.clone(),
            })
            .collect()
    }

    /// The instance port the `tcp:$PORT` sockets hold, if any does.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// Name and address of each socket, in order.
    pub fn addresses(&self) -> Vec<(String, BoundAddr)> {
        self.sockets
            .iter()
            .map(|b| (b.name.clone(), b.addr.clone()))
            .collect()
    }

    /// Whether a check of the kernel's tables finds a connection on any of the sockets
    /// (see the module docs for what counts).
    pub fn has_connections(&self) -> io::Result<bool> {
        let tcp: Vec<SocketAddr> = self
            .sockets
            .iter()
            .filter_map(|b| match b.addr {
                BoundAddr::Tcp(a) => Some(a),
                _ => None,
            })
            .collect();
        if !tcp.is_empty() {
            for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
                let text = match std::fs::read_to_string(file) {
                    Ok(t) => t,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                if tcp_table_has_connection(&text, &tcp) {
                    return Ok(true);
                }
            }
        }
        let unix: Vec<&Path> = self
            .sockets
            .iter()
            .filter_map(|b| match &b.addr {
                BoundAddr::Unix(p, ..) => Some(p.as_path()),
                _ => None,
            })
            .collect();
        if !unix.is_empty() {
            let text = std::fs::read_to_string("/proc/net/unix")?;
            if unix_table_has_connection(&text, &unix) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

impl Drop for BoundSockets {
    fn drop(&mut self) {
        // A Unix socket's file goes with it, if it is still the file we bound.
        for b in &self.sockets {
            if let BoundAddr::Unix(path, dev, ino) = &b.addr {
                use std::os::unix::fs::MetadataExt;
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.dev() == *dev && m.ino() == *ino)
                {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

/// Where a `unix:` socket of the instance of `namespace` lives: `${NAMESPACE}` replaced,
/// a relative path under `runtime_dir`.
fn unix_path(path: &Path, runtime_dir: &Path, namespace: Option<&str>) -> Option<PathBuf> {
    let path = bulkhead_core::sockets::unix_path_for(path, namespace)?;
    Some(if path.is_absolute() {
        path
    } else {
        runtime_dir.join(path)
    })
}

fn bind_tcp(addr: SocketAddr, backlog: u32) -> io::Result<OwnedFd> {
    use rustix::net::{socket_with, sockopt, AddressFamily, SocketFlags, SocketType};
    let family = match addr.ip() {
        IpAddr::V4(_) => AddressFamily::INET,
        IpAddr::V6(_) => AddressFamily::INET6,
    };
    // Blocking, as systemd hands sockets over: the flag is shared with the program.
    let fd = socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    // As servers do: the previous run's connections in TIME_WAIT do not block the bind.
    sockopt::set_socket_reuseaddr(&fd, true)?;
    rustix::net::bind(&fd, &addr)?;
    rustix::net::listen(&fd, backlog.min(i32::MAX as u32) as i32)?;
    Ok(fd)
}

fn bind_unix(path: &Path, mode: u32, backlog: u32) -> io::Result<(OwnedFd, u64, u64)> {
    use rustix::net::{socket_with, AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket file left by an earlier daemon or run: replaced. Any other file: refused.
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(_) => {}
    }
    let fd = socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::bind(&fd, &SocketAddrUnix::new(path)?)?;
    let res = (|| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        rustix::net::listen(&fd, backlog.min(i32::MAX as u32) as i32)?;
        let m = std::fs::symlink_metadata(path)?;
        Ok((m.dev(), m.ino()))
    })();
    match res {
        Ok((dev, ino)) => Ok((fd, dev, ino)),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

/// `/proc/net/tcp` or `tcp6` text: is there a connection (see the module docs) on one of
/// `addrs`?
fn tcp_table_has_connection(text: &str, addrs: &[SocketAddr]) -> bool {
    const LISTEN: u8 = 0x0A;
    const TIME_WAIT: u8 = 0x06;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 {
            continue;
        }
        let Some((ip_hex, port_hex)) = f[1].split_once(':') else {
            continue;
        };
        let Ok(port) = u16::from_str_radix(port_hex, 16) else {
            continue;
        };
        let Ok(state) = u8::from_str_radix(f[3], 16) else {
            continue;
        };
        let rx_queue = f[4]
            .split_once(':')
            .and_then(|(_, rx)| u32::from_str_radix(rx, 16).ok())
            .unwrap_or(0);
        let ip = parse_proc_ip(ip_hex);
        let ours = addrs.iter().any(|a| {
            a.port() == port && (a.ip().is_unspecified() || ip.is_none_or(|ip| same_ip(ip, a.ip())))
        });
        if !ours {
            continue;
        }
        let connection = match state {
            LISTEN => rx_queue > 0,
            TIME_WAIT => false,
            _ => true,
        };
        if connection {
            return true;
        }
    }
    false
}

/// An address of `/proc/net/tcp{,6}`: 8 or 32 hex digits, each 32-bit word in host order.
fn parse_proc_ip(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    match hex.len() {
        8 => Some(IpAddr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::from(b))
        }
        _ => None,
    }
}

/// Equal, counting an IPv4-mapped IPv6 address as its IPv4 address.
fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    let canon = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    canon(a) == canon(b)
}

/// `/proc/net/unix` text: is a connected socket (not the listener) bound to one of
/// `paths`?
fn unix_table_has_connection(text: &str, paths: &[&Path]) -> bool {
    const ACCEPTCON: u32 = 0x10000;
    // SS_CONNECTING: still in the accept queue; SS_CONNECTED: accepted.
    const CONNECTING: u8 = 2;
    const CONNECTED: u8 = 3;
    for line in text.lines().skip(1) {
        // Num RefCount Protocol Flags Type St Inode Path
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let path = Path::new(f[7]);
        if !paths.contains(&path) {
            continue;
        }
        let flags = u32::from_str_radix(f[3], 16).unwrap_or(0);
        let state = u8::from_str_radix(f[5], 16).unwrap_or(0);
        if flags & ACCEPTCON == 0 && (state == CONNECTING || state == CONNECTED) {
            return true;
        }
    }
    false
}

/// How often `idle_stop` looks at the tables.
pub fn idle_check_period(idle_stop: Duration) -> Duration {
    (idle_stop / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// Waits until one of the sockets has a connection waiting (level: also one that was
/// already waiting).
pub async fn wait_for_connection(sockets: &BoundSockets) -> io::Result<()> {
    use rustix::event::epoll;
    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;
    // An epoll set of the listeners, level-triggered: it stays readable while any has a
    // connection in its queue; the runtime watches that one descriptor.
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    for (i, b) in sockets.sockets.iter().enumerate() {
        epoll::add(
            &ep,
            b.fd.as_fd(),
            epoll::EventData::new_u64(i as u64),
            epoll::EventFlags::IN,
        )?;
    }
    let ep = Arc::new(ep);
    // SAFETY: the AsyncFd owns a clone of the Arc<OwnedFd>: the descriptor is closed only
    // when the last clone drops, after the AsyncFd, and always names the same epoll set.
    let afd = unsafe { AsyncFd::register_with_interest(Arc::clone(&ep), Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    loop {
        let waiting = {
            let mut events = Vec::with_capacity(sockets.sockets.len().max(1));
            // ORDER: look first (a connection may be waiting since before), then wait
            // for the next change; readiness cleared below is looked at again here.
            epoll::wait(
                &*ep,
                rustix::buffer::spare_capacity(&mut events),
                Some(&rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                }),
            )?;
            !events.is_empty()
        };
        if waiting {
            return Ok(());
        }
        let mut guard = afd.readable().await?;
        guard.clear_ready();
    }
}

/// Launches the instance of one key of an on-connection workload (isolation `none`: its
/// one key; `namespace`: one activator per listed namespace, each with its own sockets)
/// when a connection arrives while it has no live instance, and stops it after
/// `idle_stop` without connections.
pub(crate) struct Activator {
    pub sockets: Arc<BoundSockets>,
    /// The manifest it was bound for: a reload with another one binds anew.
    pub spec: Arc<bulkhead_core::spec::WorkloadSpec>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Activator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Activator {
    pub(crate) fn start(
        sh: &Arc<crate::Shared>,
        key: bulkhead_core::key::Key,
        spec: Arc<bulkhead_core::spec::WorkloadSpec>,
        sockets: Arc<BoundSockets>,
    ) -> Activator {
        let task = tokio::spawn(activate(
            Arc::downgrade(sh),
            key,
            spec.clone(),
            sockets.clone(),
        ));
        Activator {
            sockets,
            spec,
            task,
        }
    }
}

async fn activate(
    sh: std::sync::Weak<crate::Shared>,
    key: bulkhead_core::key::Key,
    spec: Arc<bulkhead_core::spec::WorkloadSpec>,
    sockets: Arc<BoundSockets>,
) {
    let id = key.instance_id();
    let idle_stop = spec.activation.as_ref().and_then(|a| a.idle_stop);
    loop {
        // A live instance (launched by hand, or by the last connection) serves: wait
        // until it is gone.
        let live = sh
            .upgrade()
            .and_then(|sh| sh.get(&id))
            .filter(|s| !s.view.borrow().state.is_terminal());
        if let Some(slot) = live {
            let mut rx = slot.subscribe();
            drop(slot);
            match idle_stop {
                Some(d) => watch_idle(&sh, &id, &sockets, d, &mut rx).await,
                None => {
                    let _ = rx.wait_for(|v| v.state.is_terminal()).await;
                }
            }
            continue;
        }
        if let Err(e) = wait_for_connection(&sockets).await {
            tracing::error!("{id}: cannot watch its sockets for connections: {e}");
            return;
        }
        let Some(shared) = sh.upgrade() else { return };
        tracing::info!("{id}: a connection arrived; launching it (activation: on-connection)");
        let res = shared
            .launch(crate::LaunchArgs {
                workload: spec.name.clone(),
                namespace: key.namespace().map(str::to_owned),
                session: None,
                wait: crate::WaitFor::Started,
                timeout: None,
                lease: None,
            })
            .await;
        drop(shared);
        if let Err(e) = res {
            // The connection waits in the backlog; try again after a pause rather than
            // spin while it is there.
            tracing::warn!("{id}: on-connection launch failed: {e}");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// The keys an on-connection workload is activated for: isolation `none`'s one key, or
/// one per namespace of `activation.namespaces` (the key `launch --namespace` gives).
/// None for other workloads.
pub(crate) fn activation_keys(
    spec: &bulkhead_core::spec::WorkloadSpec,
) -> Vec<bulkhead_core::key::Key> {
    use bulkhead_core::key::{Isolation, Key};
    let Some(a) = spec.activation.as_ref().filter(|a| a.on_connection()) else {
        return Vec::new();
    };
    match spec.isolation {
        Isolation::None => Key::new(&spec.name, Isolation::None, None, None)
            .ok()
            .into_iter()
            .collect(),
        Isolation::Namespace => a
            .namespaces
            .iter()
            .filter_map(|n| Key::new(&spec.name, Isolation::Namespace, Some(n), None).ok())
            .collect(),
        Isolation::Session => Vec::new(),
    }
}

/// While the instance lives: terminate it once no check saw a connection for `idle`.
async fn watch_idle(
    sh: &std::sync::Weak<crate::Shared>,
    id: &bulkhead_core::key::InstanceId,
    sockets: &BoundSockets,
    idle: Duration,
    rx: &mut tokio::sync::watch::Receiver<crate::View>,
) {
    let period = idle_check_period(idle);
    let mut last_seen = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = rx.wait_for(|v| v.state.is_terminal()) => return,
            _ = tokio::time::sleep(period) => {}
        }
        match sockets.has_connections() {
            Ok(true) => last_seen = tokio::time::Instant::now(),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!("{id}: cannot count its connections: {e}");
                last_seen = tokio::time::Instant::now();
            }
        }
        if last_seen.elapsed() >= idle {
            tracing::info!("{id}: no connection for {idle:?}; stopping it (activation.idle_stop)");
            if let Some(sh) = sh.upgrade() {
                if let Some(slot) = sh.get(id) {
                    slot.terminate(None);
                }
            }
            let _ = rx.wait_for(|v| v.state.is_terminal()).await;
            return;
        }
    }
}

/// The per-instance directory relative Unix socket paths live under.
pub(crate) fn runtime_dir(state_dir: &Path, id: &bulkhead_core::key::InstanceId) -> PathBuf {
    state_dir.join("sockets").join(id.file_stem())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_table_counts_connections_not_listeners_or_time_wait() {
        // 127.0.0.1:8080 listening (empty queue), an established one, a TIME_WAIT.
        let head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";
        let listen = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n";
        let queued = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000002 00:00000000 00000000     0        0 1 1\n";
        let est = "   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n";
        let tw = "   2: 0100007F:1F90 0100007F:C351 06 00000000:00000000 00:00000000 00000000     0        0 0 1\n";
        let other = "   3: 0100007F:1F91 0100007F:C352 01 00000000:00000000 00:00000000 00000000     0        0 3 1\n";
        let a: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert!(!tcp_table_has_connection(
            &format!("{head}{listen}{tw}{other}"),
            &[a]
        ));
        assert!(tcp_table_has_connection(
            &format!("{head}{listen}{est}"),
            &[a]
        ));
        assert!(tcp_table_has_connection(&format!("{head}{queued}"), &[a]));
        let b: SocketAddr = "127.0.0.2:8080".parse().unwrap();
        assert!(!tcp_table_has_connection(&format!("{head}{est}"), &[b]));
        let any: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert!(tcp_table_has_connection(&format!("{head}{est}"), &[any]));
    }

    #[test]
    fn proc_ipv6_addresses_parse() {
        // ::1 as /proc/net/tcp6 prints it on a little-endian machine.
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_proc_ip("00000000000000000000000001000000"),
                Some("::1".parse().unwrap())
            );
        }
        assert_eq!(parse_proc_ip("xyz"), None);
    }

    #[test]
    fn unix_table_counts_connected_not_the_listener() {
        let head = "Num       RefCount Protocol Flags    Type St Inode Path\n";
        let listener = "0000000000000000: 00000002 00000000 00010000 0001 01 100 /run/a.sock\n";
        let conn = "0000000000000000: 00000003 00000000 00000000 0001 03 101 /run/a.sock\n";
        let other = "0000000000000000: 00000003 00000000 00000000 0001 03 102 /run/b.sock\n";
        let p = Path::new("/run/a.sock");
        assert!(!unix_table_has_connection(
            &format!("{head}{listener}{other}"),
            &[p]
        ));
        assert!(unix_table_has_connection(
            &format!("{head}{listener}{conn}"),
            &[p]
        ));
    }

    #[tokio::test]
    async fn bound_sockets_see_a_real_connection_and_wait_wakes() {
        let dir = tempfile::tempdir().unwrap();
        let spec = |name: &str, listen: &str| SocketSpec {
            name: name.into(),
            listen: listen.into(),
            backlog: None,
            mode: None,
        };
        // A free port from the kernel.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t = BoundSockets::bind(&[spec("t", "tcp:127.0.0.1:$PORT")], port, dir.path(), None)
            .unwrap();
        assert_eq!(t.port(), Some(port));
        assert!(!t.has_connections().unwrap());
        let waiting = tokio::time::timeout(Duration::from_millis(50), wait_for_connection(&t));
        assert!(waiting.await.is_err(), "woke without a connection");
        let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        wait_for_connection(&t).await.unwrap();
        assert!(t.has_connections().unwrap());

        let u = BoundSockets::bind(&[spec("u", "unix:u.sock")], 0, dir.path(), None).unwrap();
        assert_eq!(u.port(), None);
        let path = dir.path().join("u.sock");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!u.has_connections().unwrap());
        let _u = std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(u.has_connections().unwrap());
        wait_for_connection(&u).await.unwrap();
        drop(u);
        assert!(!path.exists(), "the socket file outlived its owner");
    }
}
