//! The daemon's side of the keeper: a client over the keeper socket and the driver that
//! spawns through it.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bulkhead_core::event::ExitStatus;
use bulkhead_core::key::InstanceId;
use bulkhead_core::spec::{DriverKind, WorkloadSpec};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, oneshot, watch};

use super::{Reply, Request, MAX_MESSAGE};
use crate::cgroup::{InstanceCgroup, Tracker};
use crate::{Driver, SpawnError, SpawnSpec, Spawned};

/// The status reported for instances of a keeper that died: they were killed by its
/// parent-death signal.
pub const KEEPER_DIED: ExitStatus = ExitStatus::Signaled {
    signal: 9,
    core_dumped: false,
};

type Packet = (Reply, Vec<OwnedFd>);

#[derive(Default)]
struct State {
    next_req: u64,
    pending: HashMap<u64, oneshot::Sender<Packet>>,
    lists: HashMap<u64, mpsc::UnboundedSender<Packet>>,
    exits: HashMap<u32, watch::Sender<Option<ExitStatus>>>,
    closed: bool,
    /// The daemon asked the keeper to exit: its closing the connection is expected.
    shutting_down: bool,
}

/// A connection to the keeper.
pub struct KeeperClient {
    /// The keeper's pid (`SO_PEERCRED` at connect), if the kernel gave it.
    peer_pid: Option<u32>,
    sock: AsyncFd<OwnedFd>,
    send_lock: tokio::sync::Mutex<()>,
    st: Mutex<State>,
    /// Turns true when the connection closes (the keeper exited or died).
    closed_tx: watch::Sender<bool>,
}

impl KeeperClient {
    /// Connects to the keeper at `path` and starts reading its messages.
    pub async fn connect(path: &Path) -> io::Result<Arc<KeeperClient>> {
        let fd = super::seqpacket(true)?;
        let addr = rustix::net::SocketAddrUnix::new(path)?;
        rustix::net::connect(&fd, &addr)?;
        super::grow_buffers(&fd);
        // The keeper's pid as the kernel saw it at connect (0 outside our PID namespace).
        let peer_pid = peer_pid(&fd);
        // SAFETY: the AsyncFd owns the descriptor; it is closed only when the AsyncFd
        // drops, which deregisters it first.
        let sock =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(|e| e.into_parts().1)?;
        let client = Arc::new(KeeperClient {
            peer_pid,
            sock,
            send_lock: tokio::sync::Mutex::new(()),
            st: Mutex::new(State::default()),
            closed_tx: watch::Sender::new(false),
        });
        tokio::spawn(read_loop(Arc::downgrade(&client)));
        Ok(client)
    }

    /// The keeper's pid, as the kernel reported it when this client connected.
    pub fn peer_pid(&self) -> Option<u32> {
        self.peer_pid
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn send(&self, req: &Request) -> io::Result<()> {
        let _order = self.send_lock.lock().await;
        loop {
            let mut guard = self.sock.writable().await?;
            match guard.try_io(|fd| super::send(fd.get_ref().as_fd(), req, &[])) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    fn next_req(&self) -> u64 {
        let mut st = self.state();
        st.next_req += 1;
        st.next_req
    }

    /// The exit status of `pid` once the keeper reaped it.
    pub fn exit_watch(&self, pid: u32) -> watch::Receiver<Option<ExitStatus>> {
        let mut st = self.state();
        let closed = st.closed;
        st.exits
            .entry(pid)
            .or_insert_with(|| watch::Sender::new(closed.then_some(KEEPER_DIED)))
            .subscribe()
    }

    /// Spawns through the keeper. Returns pid, start time, pidfd, stdout, stderr.
    pub async fn spawn(
        &self,
        instance: &str,
        record: String,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: PathBuf,
        cgroup: Option<PathBuf>,
    ) -> Result<(u32, u64, OwnedFd, OwnedFd, OwnedFd), SpawnError> {
        let req = self.next_req();
        let (tx, rx) = oneshot::channel();
        self.state().pending.insert(req, tx);
        let program = argv.first().cloned().unwrap_or_default();
        let msg = Request::Spawn {
            req,
            instance: instance.to_owned(),
            record,
            argv,
            env,
            cwd,
            cgroup,
        };
        let lost = |source: io::Error| SpawnError::Exec {
            program: program.clone(),
            source,
        };
        if let Err(e) = self.send(&msg).await {
            self.state().pending.remove(&req);
            return Err(lost(io::Error::other(format!(
                "cannot reach the keeper: {e}"
            ))));
        }
        match rx.await {
            Ok((
                Reply::Spawned {
                    pid, start_time, ..
                },
                fds,
            )) => {
                let mut fds = fds.into_iter();
                match (fds.next(), fds.next(), fds.next()) {
                    (Some(pidfd), Some(out), Some(err)) => Ok((pid, start_time, pidfd, out, err)),
                    _ => Err(SpawnError::Other(format!(
                        "the keeper sent no descriptors for pid {pid}"
                    ))),
                }
            }
            Ok((Reply::SpawnFailed { error, .. }, _)) => Err(SpawnError::Other(error)),
            Ok((other, _)) => Err(SpawnError::Other(format!(
                "unexpected keeper reply {other:?}"
            ))),
            Err(_) => Err(lost(io::Error::other("the keeper went away"))),
        }
    }

    /// Every instance the keeper holds, with its descriptors.
    pub async fn list(&self) -> io::Result<Vec<(Reply, Vec<OwnedFd>)>> {
        let req = self.next_req();
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.state().lists.insert(req, tx);
        self.send(&Request::List { req }).await?;
        let mut out = Vec::new();
        while let Some(p) = rx.recv().await {
            out.push(p);
        }
        Ok(out)
    }

    /// Tells the keeper the daemon has `pid`'s exit status.
    pub async fn ack(&self, pid: u32) {
        self.state().exits.remove(&pid);
        let _ = self.send(&Request::Ack { pid }).await;
    }

    /// Asks the keeper to exit once it holds no running instance.
    pub async fn shutdown(&self) {
        self.state().shutting_down = true;
        let _ = self.send(&Request::Shutdown).await;
    }

    pub fn is_closed(&self) -> bool {
        self.state().closed
    }

    /// Resolves once the connection has closed (at once if it already has).
    pub async fn closed(&self) {
        let mut rx = self.closed_tx.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// The daemon asked the keeper to exit (its closing the connection is expected).
    pub fn is_shutting_down(&self) -> bool {
        self.state().shutting_down
    }
}

async fn read_loop(client: std::sync::Weak<KeeperClient>) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let Some(c) = client.upgrade() else { return };
        let got = async {
            loop {
                let mut guard = c.sock.readable().await?;
                match guard.try_io(|fd| super::recv::<Reply>(fd.get_ref().as_fd(), &mut buf)) {
                    Ok(r) => return r,
                    Err(_would_block) => continue,
                }
            }
        }
        .await;
        match got {
            Ok(Some((reply, fds))) => dispatch(&c, reply, fds),
            Ok(None) | Err(_) => {
                // The keeper is gone, and with it (parent-death signal) every instance.
                let mut st = c.state();
                if st.shutting_down {
                    tracing::debug!("the keeper exited as asked");
                } else {
                    tracing::error!(
                        "the keeper connection closed; its instances were killed with it"
                    );
                }
                st.closed = true;
                c.closed_tx.send_replace(true);
                st.pending.clear();
                st.lists.clear();
                for tx in st.exits.values() {
                    tx.send_if_modified(|s| {
                        if s.is_none() {
                            *s = Some(KEEPER_DIED);
                            true
                        } else {
                            false
                        }
                    });
                }
                return;
            }
        }
    }
}

fn dispatch(c: &KeeperClient, reply: Reply, fds: Vec<OwnedFd>) {
    let mut st = c.state();
    match &reply {
        Reply::Spawned { req, pid, .. } => {
            // Registered before the spawner sees the pid, so an exit that follows at once
            // is not lost.
            st.exits
                .entry(*pid)
                .or_insert_with(|| watch::Sender::new(None));
            if let Some(tx) = st.pending.remove(req) {
                let _ = tx.send((reply, fds));
            }
        }
        Reply::SpawnFailed { req, .. } => {
            if let Some(tx) = st.pending.remove(req) {
                let _ = tx.send((reply, fds));
            }
        }
        Reply::Exited { pid, status } => {
            let tx = st
                .exits
                .entry(*pid)
                .or_insert_with(|| watch::Sender::new(None));
            tx.send_replace(Some(*status));
        }
        Reply::Instance { req, pid, exit, .. } => {
            let tx = st
                .exits
                .entry(*pid)
                .or_insert_with(|| watch::Sender::new(None));
            if let Some(s) = exit {
                tx.send_replace(Some(*s));
            }
            if let Some(tx) = st.lists.get(req) {
                let _ = tx.send((reply, fds));
            }
        }
        Reply::ListEnd { req } => {
            st.lists.remove(req);
        }
    }
}

/// What the keeper keeps for each instance: enough to adopt it after a daemon restart.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub spec: WorkloadSpec,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// The instance's cgroup (absent: tracked by process group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
}

/// An instance found at the keeper by a (re)started daemon.
pub struct Adoptable {
    pub instance: InstanceId,
    pub pid: u32,
    pub start_time: u64,
    pub record: Record,
    /// Set when the instance exited while no daemon was connected.
    pub exit: Option<ExitStatus>,
    pub spawned: Spawned,
}

/// Starts a new keeper and connects to it (the daemon's start-up path, again).
pub type Restart = Box<
    dyn Fn() -> std::pin::Pin<
            Box<dyn std::future::Future<Output = io::Result<Arc<KeeperClient>>> + Send>,
        > + Send
        + Sync,
>;

/// The process driver, spawning through the keeper so that instances survive the daemon.
///
/// **A dead keeper is replaced.** Its instances die with it (their parent-death signal)
/// and are reported crashed through their exit watches; the next spawn finds the
/// connection closed and, with a [`Restart`], starts a new keeper first (one at a time:
/// spawns that arrive meanwhile wait for it and use it).
pub struct KeeperDriver {
    client: std::sync::Mutex<Arc<KeeperClient>>,
    restart: Option<Restart>,
    restarting: tokio::sync::Mutex<()>,
    /// Each instance's cgroup is made here (see [`crate::cgroup`]); unset: process-group
    /// tracking.
    tracker: std::sync::OnceLock<Arc<Tracker>>,
}

impl KeeperDriver {
    pub fn new(client: Arc<KeeperClient>) -> KeeperDriver {
        KeeperDriver {
            client: std::sync::Mutex::new(client),
            restart: None,
            restarting: tokio::sync::Mutex::new(()),
            tracker: std::sync::OnceLock::new(),
        }
    }

    /// Tracks instances spawned from now on (and adopted ones whose record names one) by
    /// cgroup, in `tracker`'s subtree. Set once, before the first spawn or adoption.
    pub fn set_tracker(&self, tracker: Arc<Tracker>) {
        let _ = self.tracker.set(tracker);
    }

    /// The cgroup subtree instances are tracked in, if any.
    pub fn tracker(&self) -> Option<&Arc<Tracker>> {
        self.tracker.get()
    }

    /// How to start a new keeper when the current one has died.
    pub fn with_restart(mut self, restart: Restart) -> KeeperDriver {
        self.restart = Some(restart);
        self
    }

    /// Replaces a keeper that dies at once, not only at the next spawn: a task that waits
    /// for the connection to close and starts a new keeper (retrying with a growing pause
    /// while that fails), until the daemon asks the keeper to exit. Needs a [`Restart`].
    pub fn supervise(self: &Arc<Self>) {
        if self.restart.is_none() {
            return;
        }
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut pause = std::time::Duration::from_millis(100);
            loop {
                let Some(d) = me.upgrade() else { return };
                let c = d.client();
                drop(d);
                c.closed().await;
                if c.is_shutting_down() {
                    return;
                }
                let Some(d) = me.upgrade() else { return };
                match d.live_client().await {
                    Ok(_) => pause = std::time::Duration::from_millis(100),
                    Err(e) => {
                        tracing::error!("{e}; trying again in {} ms", pause.as_millis());
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(std::time::Duration::from_secs(30));
                    }
                }
            }
        });
    }

    /// Whether the current keeper connection is up (false while a dead keeper is being
    /// replaced, or when a new one cannot start).
    pub fn is_up(&self) -> bool {
        !self.client().is_closed()
    }

    /// The current keeper connection.
    pub fn client(&self) -> Arc<KeeperClient> {
        Arc::clone(&self.client.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A live connection: the current one, or (when that keeper died and a [`Restart`] is
    /// set) a new keeper's.
    async fn live_client(&self) -> Result<Arc<KeeperClient>, SpawnError> {
        let current = self.client();
        let Some(restart) = &self.restart else {
            return Ok(current);
        };
        if !current.is_closed() {
            return Ok(current);
        }
        // RACE: spawns that find the keeper dead at the same time queue here; the first
        // starts the new keeper, the others find it in place when they get the lock.
        let _one = self.restarting.lock().await;
        let current = self.client();
        if !current.is_closed() {
            return Ok(current);
        }
        let fresh = restart().await.map_err(|e| {
            SpawnError::Other(format!("the keeper died and a new one cannot start: {e}"))
        })?;
        tracing::warn!(
            "the keeper (pid {:?}) died; started a new one (pid {:?})",
            current.peer_pid(),
            fresh.peer_pid()
        );
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&fresh);
        Ok(fresh)
    }

    /// The handle of a keeper-held instance: its exit comes from the keeper.
    fn handle(
        &self,
        client: &Arc<KeeperClient>,
        instance: String,
        pid: u32,
        pidfd: OwnedFd,
        cgroup: Option<InstanceCgroup>,
    ) -> Arc<dyn crate::InstanceHandle> {
        let mut exit = client.exit_watch(pid);
        let ack = Arc::clone(client);
        crate::process::foreign_handle(
            instance,
            pid,
            pidfd,
            cgroup,
            async move {
                match exit.wait_for(Option::is_some).await {
                    Ok(s) => s.unwrap_or(KEEPER_DIED),
                    Err(_) => KEEPER_DIED,
                }
            },
            move || {
                tokio::spawn(async move { ack.ack(pid).await });
            },
        )
    }

    /// Every instance the keeper holds, ready to be put back under supervision.
    /// Records that cannot be read are reported and skipped; their instances are
    /// killed, since nothing may run unseen.
    pub async fn adopt_all(&self) -> io::Result<Vec<Adoptable>> {
        let mut out = Vec::new();
        let mut keep = Vec::new();
        let client = self.client();
        for (reply, fds) in client.list().await? {
            let Reply::Instance {
                instance,
                record,
                pid,
                start_time,
                exit,
                ..
            } = reply
            else {
                continue;
            };
            let mut fds = fds.into_iter();
            let (Some(pidfd), out_fd, err_fd) = (fds.next(), fds.next(), fds.next()) else {
                continue;
            };
            let parsed = InstanceId::parse(&instance)
                .ok()
                .zip(serde_json::from_str::<Record>(&record).ok());
            let Some(((id, _), record)) = parsed else {
                tracing::error!("keeper holds instance {instance:?} (pid {pid}) with an unreadable record; killing it");
                let _ = crate::sys::pidfd_send_signal(&pidfd, bulkhead_core::signal::Signal::KILL);
                continue;
            };
            let cgroup = record.cgroup.clone().map(InstanceCgroup::at);
            if let Some(cg) = &cgroup {
                keep.push(cg.dir().to_owned());
            }
            let spawned = Spawned {
                handle: self.handle(&client, instance, pid, pidfd, cgroup),
                stdout: out_fd,
                stderr: err_fd,
            };
            out.push(Adoptable {
                instance: id,
                pid,
                start_time,
                record,
                exit,
                spawned,
            });
        }
        // Instance cgroups of this scope that no adopted instance owns: left by a daemon
        // that did not shut down cleanly (instances of a keeper that died, their
        // double-forked descendants). Nothing may run unseen: killed and removed.
        if let Some(t) = self.tracker().cloned() {
            let n = tokio::task::spawn_blocking(move || t.remove_stale(&keep))
                .await
                .unwrap_or(0);
            if n > 0 {
                tracing::warn!("removed {n} stale instance cgroup(s) and killed their processes");
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl Driver for KeeperDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Process
    }

    fn shutdown(&self) {
        if let Some(t) = self.tracker() {
            t.remove_scope();
        }
    }

    fn tracks_every_descendant(&self) -> bool {
        self.tracker().is_some()
    }

    async fn spawn(&self, spec: SpawnSpec) -> Result<Spawned, SpawnError> {
        // The cgroup is made here and handed to the keeper by path; it is removed on any
        // error, and by the handle's sweep once the instance is gone.
        let cgroup = match self.tracker() {
            Some(t) => Some(
                t.create(spec.instance.as_str())
                    .map_err(|e| SpawnError::Other(e.to_string()))?,
            ),
            None => None,
        };
        let res = self.spawn_in(spec, cgroup.clone()).await;
        if res.is_err() {
            if let Some(cg) = cgroup {
                let _ = tokio::task::spawn_blocking(move || cg.remove()).await;
            }
        }
        res
    }
}

impl KeeperDriver {
    async fn spawn_in(
        &self,
        spec: SpawnSpec,
        cgroup: Option<InstanceCgroup>,
    ) -> Result<Spawned, SpawnError> {
        let cgroup_dir = cgroup.as_ref().map(|c| c.dir().to_owned());
        let record = Record {
            spec: (*spec.spec).clone(),
            env: spec.env.clone(),
            cwd: spec.cwd.clone(),
            cgroup: cgroup_dir.clone(),
        };
        let record = serde_json::to_string(&record)
            .map_err(|e| SpawnError::Other(format!("cannot encode the keeper record: {e}")))?;
        let mut client = self.live_client().await?;
        let mut res = client
            .spawn(
                spec.instance.as_str(),
                record.clone(),
                spec.argv.clone(),
                spec.env.clone(),
                spec.cwd.clone(),
                cgroup_dir.clone(),
            )
            .await;
        if res.is_err() && client.is_closed() && self.restart.is_some() {
            // The keeper died during this request: once more, with a new one.
            client = self.live_client().await?;
            res = client
                .spawn(
                    spec.instance.as_str(),
                    record,
                    spec.argv,
                    spec.env,
                    spec.cwd,
                    cgroup_dir,
                )
                .await;
        }
        let (pid, _start, pidfd, out, err) = res?;
        Ok(Spawned {
            handle: self.handle(&client, spec.instance.to_string(), pid, pidfd, cgroup),
            stdout: Some(out),
            stderr: Some(err),
        })
    }
}

/// The pid of a connected Unix socket's peer (`SO_PEERCRED`); `None` if unknown or
/// outside our PID namespace (pid 0). Read with libc: rustix's `UCred` cannot hold pid 0.
fn peer_pid(fd: &OwnedFd) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a ucred on our stack, and
    // updates `len`; the descriptor is a live socket we own.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid as u32)
}
