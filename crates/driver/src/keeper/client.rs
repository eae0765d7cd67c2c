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

use super::{Incoming, Reply, Request, MAX_MESSAGE};
use crate::cgroup::{InstanceCgroup, Tracker};
use crate::{
    Driver, Found, OutputTap, RecoverError, SetupStep, SpawnError, SpawnSpec, Spawned, Stream,
};

/// The status reported for instances of a keeper that died: they were killed by its
/// parent-death signal.
pub const KEEPER_DIED: ExitStatus = ExitStatus::Signaled {
    signal: 9,
    core_dumped: false,
};

/// A reply to a request, with the output tap of a spawned instance (taken from the map
/// only by the reader, so output that ends at once is not lost to the spawner).
pub(super) type Answer = (Reply, Vec<OwnedFd>, Option<Arc<OutputTap>>);

#[derive(Default)]
pub(super) struct State {
    next_req: u64,
    pub(super) pending: HashMap<u64, oneshot::Sender<Answer>>,
    lists: HashMap<u64, mpsc::UnboundedSender<Answer>>,
    pub(super) exits: HashMap<u32, watch::Sender<Option<ExitStatus>>>,
    /// The forwarded output of each instance whose output has not ended.
    pub(super) taps: HashMap<u32, Arc<OutputTap>>,
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
    /// The keeper refused a spawn as full; cleared when one of its instances ends.
    pub(super) full: std::sync::atomic::AtomicBool,
    /// The keeper said it understands `MainPid` (see `Reply::Spawned`).
    follows_main_pid: std::sync::atomic::AtomicBool,
    /// The keeper said it makes warm slots (`Reply::Spawned`, `Reply::ListEnd`).
    pub(super) prewarms: std::sync::atomic::AtomicBool,
}

/// What a spawn through one keeper gave.
pub enum KeeperSpawn {
    Started {
        pid: u32,
        start_time: u64,
        pidfd: OwnedFd,
        tap: Arc<OutputTap>,
        /// The keeper applied the request's setup (see `Reply::Spawned`).
        setup_applied: bool,
    },
    /// The keeper holds as many instances as it can: try the next one.
    Full(String),
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
            full: std::sync::atomic::AtomicBool::new(false),
            follows_main_pid: std::sync::atomic::AtomicBool::new(false),
            prewarms: std::sync::atomic::AtomicBool::new(false),
        });
        tokio::spawn(read_loop(Arc::downgrade(&client)));
        Ok(client)
    }

    /// The keeper's pid, as the kernel reported it when this client connected.
    pub fn peer_pid(&self) -> Option<u32> {
        self.peer_pid
    }

    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) async fn send(&self, req: &Request) -> io::Result<()> {
        self.send_with(req, &[]).await
    }

    /// Sends `req` with `fds` attached (SCM_RIGHTS).
    pub(super) async fn send_with(
        &self,
        req: &Request,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> io::Result<()> {
        let _order = self.send_lock.lock().await;
        loop {
            let mut guard = self.sock.writable().await?;
            match guard.try_io(|fd| super::send(fd.get_ref().as_fd(), req, fds)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    pub(super) fn next_req(&self) -> u64 {
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

    /// Spawns `spec` through the keeper in `cwd` with `setup` (its listening sockets
    /// travel with the request).
    pub async fn spawn(
        &self,
        spec: &SpawnSpec,
        record: String,
        cgroup: Option<PathBuf>,
        cwd: PathBuf,
        setup: Option<Box<crate::setup::ChildSetup>>,
    ) -> Result<KeeperSpawn, SpawnError> {
        let (instance, argv, env, listen) = (
            spec.instance.as_str(),
            spec.argv.clone(),
            spec.env.clone(),
            &spec.listen,
        );
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
            setup,
            listen: listen.iter().map(|l| l.name.clone()).collect(),
        };
        // The keeper, not the program, failed: not an exec error.
        let lost = |source: io::Error| SpawnError::Keeper {
            reason: format!("{program}: {source}"),
        };
        let fds: Vec<_> = listen.iter().map(|l| l.fd.as_fd()).collect();
        if let Err(e) = self.send_with(&msg, &fds).await {
            self.state().pending.remove(&req);
            return Err(lost(io::Error::other(format!(
                "cannot reach the keeper: {e}"
            ))));
        }
        match rx.await {
            Ok((
                Reply::Spawned {
                    pid,
                    start_time,
                    setup_applied,
                    ..
                },
                fds,
                tap,
            )) => match (fds.into_iter().next(), tap) {
                (Some(pidfd), Some(tap)) => Ok(KeeperSpawn::Started {
                    pid,
                    start_time,
                    pidfd,
                    tap,
                    setup_applied,
                }),
                _ => Err(SpawnError::Keeper {
                    reason: format!("the keeper sent no pidfd for pid {pid}"),
                }),
            },
            Ok((
                Reply::SpawnFailed {
                    error, full, exec, ..
                },
                _,
                _,
            )) => {
                if full {
                    self.full.store(true, std::sync::atomic::Ordering::SeqCst);
                    Ok(KeeperSpawn::Full(error))
                } else if let Some((errno, cause)) = exec {
                    // The program's start failed in the keeper's child: typed as the
                    // process driver types it, with the system's error kind kept.
                    let kind = errno.map_or(io::ErrorKind::Other, |n| {
                        io::Error::from_raw_os_error(n).kind()
                    });
                    Err(SpawnError::Exec {
                        program: program.clone(),
                        source: io::Error::new(kind, cause),
                    })
                } else {
                    // The request itself was refused (not the program's start).
                    Err(SpawnError::Keeper { reason: error })
                }
            }
            Ok((other, _, _)) => Err(SpawnError::Keeper {
                reason: format!("unexpected keeper reply {other:?}"),
            }),
            Err(_) => Err(lost(io::Error::other("the keeper went away"))),
        }
    }

    /// Whether the keeper last refused a spawn as full (and none of its instances has
    /// ended since).
    pub fn is_full(&self) -> bool {
        self.full.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Every instance the keeper holds, with its descriptors.
    pub async fn list(&self) -> io::Result<Vec<Answer>> {
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
        self.full.store(false, std::sync::atomic::Ordering::SeqCst);
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
                match guard.try_io(|fd| super::recv_incoming(fd.get_ref().as_fd(), &mut buf)) {
                    Ok(r) => return r,
                    Err(_would_block) => continue,
                }
            }
        }
        .await;
        match got {
            Ok(Some(Incoming::Reply(reply, fds))) => dispatch(&c, reply, fds, &client),
            Ok(Some(Incoming::Output { pid, stream, data })) => {
                // Written by the sink on this task, in order; a slow disk slows the
                // keeper's reading (the socket fills), never the runtime's other tasks
                // for long (appends to the page cache).
                let tap = c.state().taps.get(&pid).cloned();
                if let Some(tap) = tap {
                    if data.is_empty() {
                        if tap.close(stream) {
                            c.state().taps.remove(&pid);
                        }
                    } else {
                        tap.write(stream, &data);
                    }
                }
            }
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
                for (_, tap) in st.taps.drain() {
                    tap.close_all();
                }
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

/// A tap whose connecting asks the keeper to start forwarding `pid`'s output.
fn attaching_tap(client: &std::sync::Weak<KeeperClient>, pid: u32) -> Arc<OutputTap> {
    let client = client.clone();
    Arc::new(OutputTap::with_on_connect(move || {
        if let Some(c) = client.upgrade() {
            tokio::spawn(async move {
                let _ = c.send(&Request::Attach { pid }).await;
            });
        }
    }))
}

fn dispatch(
    c: &KeeperClient,
    reply: Reply,
    fds: Vec<OwnedFd>,
    weak: &std::sync::Weak<KeeperClient>,
) {
    let mut st = c.state();
    match &reply {
        Reply::Spawned {
            req,
            pid,
            follows_main_pid,
            prewarms,
            ..
        } => {
            if *follows_main_pid {
                c.follows_main_pid
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
            if *prewarms {
                c.prewarms.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            // Registered before the spawner sees the pid, so an exit or output that
            // follows at once is not lost.
            st.exits
                .entry(*pid)
                .or_insert_with(|| watch::Sender::new(None));
            let tap = attaching_tap(weak, *pid);
            st.taps.insert(*pid, Arc::clone(&tap));
            if let Some(tx) = st.pending.remove(req) {
                let _ = tx.send((reply, fds, Some(tap)));
            }
        }
        Reply::SpawnFailed { req, .. } => {
            if let Some(tx) = st.pending.remove(req) {
                let _ = tx.send((reply, fds, None));
            }
        }
        Reply::Exited { pid, status } => {
            let tx = st
                .exits
                .entry(*pid)
                .or_insert_with(|| watch::Sender::new(None));
            tx.send_replace(Some(*status));
        }
        Reply::Instance {
            req,
            pid,
            exit,
            open,
            main,
            follows_main_pid,
            ..
        } => {
            if *follows_main_pid {
                c.follows_main_pid
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
            let tx = st
                .exits
                .entry(main.unwrap_or(*pid))
                .or_insert_with(|| watch::Sender::new(None));
            if let Some(s) = exit {
                tx.send_replace(Some(*s));
            }
            let tap = open.iter().any(|o| *o).then(|| {
                let tap = attaching_tap(weak, *pid);
                for (i, s) in [Stream::Stdout, Stream::Stderr].into_iter().enumerate() {
                    if !open[i] {
                        tap.close(s);
                    }
                }
                st.taps.insert(*pid, Arc::clone(&tap));
                tap
            });
            if let Some(tx) = st.lists.get(req) {
                let _ = tx.send((reply, fds, tap));
            }
        }
        Reply::ListEnd { req, prewarms } => {
            if *prewarms {
                c.prewarms.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            st.lists.remove(req);
        }
    }
}

/// Resolves with `pid`'s status once the keeper reports it (or [`KEEPER_DIED`]).
fn exit_of(client: &KeeperClient, pid: u32) -> crate::mainpid::ExitFuture {
    let mut exit = client.exit_watch(pid);
    Box::pin(async move {
        match exit.wait_for(Option::is_some).await {
            Ok(s) => s.unwrap_or(KEEPER_DIED),
            Err(_) => KEEPER_DIED,
        }
    })
}

/// A keeper-held instance's `MAINPID=`: the keeper (a child subreaper, so the new main
/// process's parent once its own parent has exited) reaps it and reports its status.
struct KeeperFollow {
    client: std::sync::Weak<KeeperClient>,
    /// The instance's first pid: how the keeper knows it.
    first: u32,
}

impl crate::mainpid::Follow for KeeperFollow {
    fn holder_died(&self) -> bool {
        self.client.upgrade().is_none_or(|c| c.is_closed())
    }

    fn supported(&self) -> Result<(), crate::MainPidError> {
        let follows = self
            .client
            .upgrade()
            .is_some_and(|c| c.follows_main_pid.load(std::sync::atomic::Ordering::SeqCst));
        if follows {
            Ok(())
        } else {
            Err(crate::MainPidError::OldKeeper)
        }
    }

    fn start(&self, pid: u32) {
        let Some(c) = self.client.upgrade() else {
            return;
        };
        let first = self.first;
        tokio::spawn(async move {
            if let Err(e) = c
                .send(&Request::MainPid {
                    pid: first,
                    main: pid,
                })
                .await
            {
                tracing::warn!(
                    "cannot tell the keeper that pid {first}'s main process is {pid}: {e}"
                );
            }
        });
    }

    fn exited(&self, pid: u32, _pidfd: Arc<OwnedFd>) -> crate::mainpid::ExitFuture {
        let Some(c) = self.client.upgrade() else {
            return Box::pin(std::future::ready(KEEPER_DIED));
        };
        let exit = exit_of(&c, pid);
        let client = self.client.clone();
        Box::pin(async move {
            let status = exit.await;
            // Its entry is not the instance's (acknowledged by the first pid).
            if let Some(c) = client.upgrade() {
                c.state().exits.remove(&pid);
            }
            status
        })
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

/// Starts keeper shard `n` (or connects to it, if it answers): the daemon's start-up
/// path, again.
pub type Restart = Box<
    dyn Fn(
            usize,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = io::Result<Arc<KeeperClient>>> + Send>,
        > + Send
        + Sync,
>;

/// The most keeper shards a daemon starts (each holds its open-files limit's worth of
/// instances, 9,968 at a limit of 20,000).
pub const MAX_SHARDS: usize = 64;

/// The process driver, spawning through the keepers so that instances survive the daemon.
///
/// **Shards.** A spawn goes to the first keeper that is not full (see [`super`]); when all
/// are, a new keeper is started (shard 1, 2, ...), with the [`Restart`].
///
/// **A dead keeper is replaced.** Its instances die with it (their parent-death signal)
/// and are reported crashed through their exit watches; a supervisor task (or the next
/// spawn) starts a new keeper for that shard (one at a time: spawns that arrive
/// meanwhile wait for it and use it).
pub struct KeeperDriver {
    /// Index = shard. Shards are added, never removed (an empty keeper costs little).
    shards: std::sync::Mutex<Vec<Arc<KeeperClient>>>,
    restart: Option<Restart>,
    restarting: tokio::sync::Mutex<()>,
    /// Set by [`KeeperDriver::supervise`]: shards added later get a supervisor too.
    me: std::sync::OnceLock<std::sync::Weak<KeeperDriver>>,
    /// Each instance's cgroup is made here (see [`crate::cgroup`]); unset: process-group
    /// tracking.
    tracker: std::sync::OnceLock<Arc<Tracker>>,
    /// The spare slot any launch takes (`keeper/spare.rs`).
    pub(super) spares: Arc<super::spare::Spares>,
}

impl KeeperDriver {
    pub fn new(client: Arc<KeeperClient>) -> KeeperDriver {
        KeeperDriver::with_shards(vec![client])
    }

    /// A driver over keepers that are already running (shard `i` at index `i`).
    pub fn with_shards(shards: Vec<Arc<KeeperClient>>) -> KeeperDriver {
        KeeperDriver {
            shards: std::sync::Mutex::new(shards),
            restart: None,
            restarting: tokio::sync::Mutex::new(()),
            me: std::sync::OnceLock::new(),
            tracker: std::sync::OnceLock::new(),
            spares: Arc::default(),
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

    /// How to start a keeper (a new shard, or in place of one that died).
    pub fn with_restart(mut self, restart: Restart) -> KeeperDriver {
        self.restart = Some(restart);
        self
    }

    /// Replaces a keeper that dies at once, not only at the next spawn: per shard, a task
    /// that waits for the connection to close and starts a new keeper (retrying with a
    /// growing pause while that fails), until the daemon asks the keeper to exit. Needs a
    /// [`Restart`].
    pub fn supervise(self: &Arc<Self>) {
        if self.restart.is_none() {
            return;
        }
        let _ = self.me.set(Arc::downgrade(self));
        for shard in 0..self.clients().len() {
            Self::supervise_shard(Arc::downgrade(self), shard);
        }
    }

    fn supervise_shard(me: std::sync::Weak<KeeperDriver>, shard: usize) {
        tokio::spawn(async move {
            let mut pause = std::time::Duration::from_millis(100);
            loop {
                let Some(d) = me.upgrade() else { return };
                let Some(c) = d.shard(shard) else { return };
                drop(d);
                c.closed().await;
                if c.is_shutting_down() {
                    return;
                }
                let Some(d) = me.upgrade() else { return };
                match d.live_client(shard).await {
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

    /// Whether every keeper connection is up (false while a dead keeper is being
    /// replaced, or when a new one cannot start).
    pub fn is_up(&self) -> bool {
        self.clients().iter().all(|c| !c.is_closed())
    }

    /// The first keeper's connection (shard 0).
    pub fn client(&self) -> Arc<KeeperClient> {
        Arc::clone(&self.shards.lock().unwrap_or_else(|e| e.into_inner())[0])
    }

    /// Every keeper's connection, by shard.
    pub fn clients(&self) -> Vec<Arc<KeeperClient>> {
        self.shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn shard(&self, shard: usize) -> Option<Arc<KeeperClient>> {
        self.shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(shard)
            .cloned()
    }

    /// A live connection to keeper `shard`: the current one, or (when that keeper died,
    /// or the shard is the next new one, and a [`Restart`] is set) a new keeper's.
    pub(super) async fn live_client(&self, shard: usize) -> Result<Arc<KeeperClient>, SpawnError> {
        let current = self.shard(shard);
        if let Some(c) = &current {
            if !c.is_closed() || self.restart.is_none() {
                return Ok(Arc::clone(c));
            }
        }
        let Some(restart) = &self.restart else {
            return Err(SpawnError::Exhausted {
                reason: format!(
                    "every keeper is full and no new one can be started (shard {shard})"
                ),
            });
        };
        // RACE: spawns that find the keeper dead (or all full) at the same time queue
        // here; the first starts the new keeper, the others find it in place when they
        // get the lock.
        let _one = self.restarting.lock().await;
        let current = self.shard(shard);
        if let Some(c) = &current {
            if !c.is_closed() {
                return Ok(Arc::clone(c));
            }
        }
        let fresh = restart(shard).await.map_err(|e| SpawnError::Keeper {
            reason: match &current {
                Some(_) => format!("the keeper died and a new one cannot start: {e}"),
                None => format!("cannot start keeper shard {shard}: {e}"),
            },
        })?;
        let added = {
            let mut shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
            if shard < shards.len() {
                shards[shard] = Arc::clone(&fresh);
                false
            } else {
                shards.push(Arc::clone(&fresh));
                true
            }
        };
        match current {
            Some(old) => tracing::warn!(
                "keeper {shard} (pid {:?}) died; started a new one (pid {:?})",
                old.peer_pid(),
                fresh.peer_pid()
            ),
            None => tracing::info!(
                "every keeper is full; started keeper {shard} (pid {:?})",
                fresh.peer_pid()
            ),
        }
        if added {
            if let Some(me) = self.me.get() {
                Self::supervise_shard(me.clone(), shard);
            }
        }
        Ok(fresh)
    }

    /// The handle of a keeper-held instance: its exit comes from the keeper. `moved`: the
    /// main process `MAINPID=` moved it to (adopted after the move).
    pub(super) fn handle(
        &self,
        client: &Arc<KeeperClient>,
        instance: String,
        pid: u32,
        pidfd: Option<OwnedFd>,
        cgroup: Option<InstanceCgroup>,
        moved: Option<crate::mainpid::Moved>,
    ) -> Arc<dyn crate::InstanceHandle> {
        let ack = Arc::clone(client);
        let follow = Arc::new(KeeperFollow {
            client: Arc::downgrade(client),
            first: pid,
        });
        crate::process::foreign_handle(
            instance,
            pid,
            pidfd,
            cgroup,
            exit_of(client, pid),
            follow,
            moved,
            move || {
                tokio::spawn(async move { ack.ack(pid).await });
            },
        )
    }

    /// Every instance the keepers hold, ready to be put back under supervision.
    /// Records that cannot be read are reported and skipped; their instances are
    /// killed, since nothing may run unseen.
    async fn found_at_keepers(&self) -> io::Result<Vec<Found>> {
        let mut out = Vec::new();
        let mut keep = Vec::new();
        for client in self.clients() {
            for (reply, fds, tap) in client.list().await? {
                let Reply::Instance {
                    instance,
                    record,
                    pid,
                    start_time,
                    exit,
                    listen,
                    main,
                    ..
                } = reply
                else {
                    continue;
                };
                let mut fds = fds.into_iter();
                let listen: Vec<crate::listen::ListenFd> = listen
                    .into_iter()
                    .zip(fds.by_ref())
                    .map(|(name, fd)| crate::listen::ListenFd {
                        name,
                        fd: Arc::new(fd),
                    })
                    .collect();
                let pidfd = fds.next();
                if pidfd.is_none() && exit.is_none() {
                    // Running, yet no pidfd: it cannot be signalled safely. Left to the
                    // stale-cgroup sweep below (it owns no kept cgroup).
                    tracing::error!(
                        "keeper sent no pidfd for running instance {instance:?} (pid {pid})"
                    );
                    continue;
                }
                let parsed = InstanceId::parse(&instance)
                    .ok()
                    .zip(serde_json::from_str::<Record>(&record).ok());
                let Some(((id, _), record)) = parsed else {
                    tracing::error!("keeper holds instance {instance:?} (pid {pid}) with an unreadable record; killing it");
                    if let Some(fd) = &pidfd {
                        let _ =
                            crate::sys::pidfd_send_signal(fd, bulkhead_core::signal::Signal::KILL);
                    }
                    continue;
                };
                let cgroup = record.cgroup.clone().map(InstanceCgroup::at);
                if let Some(cg) = &cgroup {
                    keep.push(cg.dir().to_owned());
                }
                // Moved by MAINPID= before the daemon restarted: the pidfd is the new main
                // process's, and the run is that one's (as the instance table recorded).
                let (pid, start_time, pidfd, moved) = match (main, pidfd) {
                    (Some(m), Some(fd)) => {
                        let st = crate::sys::read_stat(m)
                            .map(|s| s.starttime)
                            .unwrap_or(start_time);
                        let moved = crate::mainpid::Moved {
                            pid: m,
                            pidfd: Arc::new(fd),
                        };
                        (pid, st, None, Some(moved))
                    }
                    (_, fd) => (pid, start_time, fd, None),
                };
                let main_pid = moved.as_ref().map_or(pid, |m| m.pid);
                let spawned = Spawned {
                    handle: self.handle(&client, instance, pid, pidfd, cgroup, moved),
                    stdout: None,
                    stderr: None,
                    tap,
                };
                out.push(Found {
                    instance: id,
                    process: Some((main_pid, start_time)),
                    describe: format!("pid {main_pid}"),
                    run_id: String::new(),
                    launched: Some((record.spec, record.cwd)),
                    env: record.env,
                    exit,
                    spawned,
                    listen,
                });
            }
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

    /// The keepers' instances. An error is fatal to the daemon's start: the keepers may
    /// hold running instances nobody could then see.
    async fn recover(&self) -> Result<Vec<Found>, RecoverError> {
        self.found_at_keepers().await.map_err(|e| RecoverError {
            driver: DriverKind::Process,
            reason: format!("the keeper did not answer: {e}"),
            fatal: true,
        })
    }

    fn prewarms(&self) -> bool {
        true
    }

    async fn prewarm(
        &self,
        spec: crate::warm::WarmSpec,
    ) -> Result<Box<dyn crate::warm::Warm>, SpawnError> {
        Ok(Box::new(self.make_slot(spec).await?))
    }

    async fn spawn_warm(
        &self,
        slot: Box<dyn crate::warm::Warm>,
        spec: SpawnSpec,
    ) -> Result<Spawned, SpawnError> {
        let _spawning = self.spawning();
        match slot.into_any().downcast::<super::warm::Slot>() {
            Ok(slot) => self.take_slot(slot, spec).await,
            Err(_) => Err(SpawnError::invalid(
                &spec.instance,
                "the warm slot was not made by the process driver",
            )),
        }
    }

    async fn spawn(&self, spec: SpawnSpec) -> Result<Spawned, SpawnError> {
        let _spawning = self.spawning();
        if let Some(res) = self.spawn_spare(&spec).await {
            return res;
        }
        // The cgroup is made here and handed to the keeper by path; it is removed on any
        // error, and by the handle's sweep once the instance is gone.
        let cgroup = match self.tracker() {
            Some(t) => Some(
                t.create(spec.instance.as_str())
                    .map_err(|e| SpawnError::setup(&spec.instance, SetupStep::Cgroup, e))?,
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
        let record = serde_json::to_string(&record).map_err(|e| SpawnError::Keeper {
            reason: format!("cannot encode the keeper record: {e}"),
        })?;
        // user, limits, umask: resolved here (names in the host's databases), applied by
        // the keeper's child; the working directory is entered as the new user.
        let id = &spec.instance;
        crate::setup::limit_settings(&spec.spec)
            .map_err(|e| SpawnError::setup(id, SetupStep::Limits, e))?;
        let setup = crate::setup::host_setup(&spec.spec)
            .map_err(|e| SpawnError::setup(id, SetupStep::User, e))?
            .map(Box::new);
        let cwd = bulkhead_core::execution::working_dir(&spec.spec, &spec.cwd);
        crate::setup::check_working_dir(&spec.spec, &cwd)
            .map_err(|e| SpawnError::setup(id, SetupStep::WorkingDir, e))?;
        let spawn_at = |client: Arc<KeeperClient>| {
            let (record, spec, cgroup_dir) = (record.clone(), &spec, cgroup_dir.clone());
            let (setup, cwd) = (setup.clone(), cwd.clone());
            async move { client.spawn(spec, record, cgroup_dir, cwd, setup).await }
        };
        // The first keeper not known to be full; a full one may have room again (its
        // instances end), so it is asked again once the others are full too.
        let mut shard = self
            .clients()
            .iter()
            .position(|c| !c.is_full() || c.is_closed())
            .unwrap_or(0);
        let mut last_full = String::new();
        loop {
            if shard >= MAX_SHARDS {
                return Err(SpawnError::Exhausted {
                    reason: format!(
                        "every keeper is full ({MAX_SHARDS} keepers; {last_full}); raise the daemon's open-files limit"
                    ),
                });
            }
            let mut client = self.live_client(shard).await?;
            let mut res = spawn_at(Arc::clone(&client)).await;
            if res.is_err() && client.is_closed() && self.restart.is_some() {
                // The keeper died during this request: once more, with a new one.
                client = self.live_client(shard).await?;
                res = spawn_at(Arc::clone(&client)).await;
            }
            match res? {
                KeeperSpawn::Started {
                    pid,
                    pidfd,
                    tap,
                    setup_applied,
                    ..
                } => {
                    let handle = self.handle(
                        &client,
                        spec.instance.to_string(),
                        pid,
                        Some(pidfd),
                        cgroup,
                        None,
                    );
                    if setup.is_some() && !setup_applied {
                        // A keeper from before `setup` ran the child without its user,
                        // limits and umask: it must not go on running.
                        let _ = handle.signal(bulkhead_core::signal::Signal::KILL);
                        handle.wait().await;
                        return Err(SpawnError::Keeper {
                            reason: format!(
                                "cannot start instance {}: the keeper (shard {shard}) is older than this daemon and ignored the manifest's user, limits and umask; the instance was killed: restart the keeper (stop its instances and the daemon) to run this workload",
                                spec.instance
                            ),
                        });
                    }
                    return Ok(Spawned {
                        handle,
                        stdout: None,
                        stderr: None,
                        tap: Some(tap),
                    });
                }
                KeeperSpawn::Full(why) => {
                    last_full = why;
                    shard += 1;
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::time::Duration;

    /// A keeper from before `MainPid` would drop the connection that sends it: its
    /// replies do not say `follows_main_pid`, so `set_main_pid` is refused (and logged by
    /// the daemon) and nothing is sent; a current keeper's reply says it.
    #[tokio::test(flavor = "multi_thread")]
    async fn mainpid_is_not_sent_to_an_older_keeper() {
        for current in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("keeper.sock");
            let listener = super::super::seqpacket(false).unwrap();
            rustix::net::bind(&listener, &rustix::net::SocketAddrUnix::new(&path).unwrap())
                .unwrap();
            rustix::net::listen(&listener, 1).unwrap();
            let (seen_tx, seen_rx) = std::sync::mpsc::channel();
            let (child_tx, child_rx) = std::sync::mpsc::channel();
            let keeper = std::thread::spawn(move || {
                let conn = rustix::net::accept(&listener).unwrap();
                let mut buf = vec![0u8; MAX_MESSAGE];
                let mut child = None;
                loop {
                    let got = match super::super::recv::<Request>(conn.as_fd(), &mut buf) {
                        Ok(Some((req, _))) => req,
                        Ok(None) => break,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        Err(e) => panic!("{e}"),
                    };
                    seen_tx.send(got.clone()).unwrap();
                    if let Request::Spawn { req, .. } = got {
                        let c = std::process::Command::new("sleep")
                            .arg("1000")
                            .spawn()
                            .unwrap();
                        let pid = c.id();
                        child_tx.send(pid).unwrap();
                        let pidfd = crate::sys::pidfd_open(pid).unwrap();
                        let flag = if current {
                            r#","follows_main_pid":true"#
                        } else {
                            ""
                        };
                        let reply = format!(
                            r#"{{"op":"spawned","req":{req},"pid":{pid},"start_time":0{flag}}}"#
                        );
                        let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
                        super::super::send(conn.as_fd(), &v, &[pidfd.as_fd()]).unwrap();
                        child = Some(c);
                    }
                }
                if let Some(mut c) = child {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            });
            let client = KeeperClient::connect(&path).await.unwrap();
            let driver = KeeperDriver::new(client);
            let workload = bulkhead_core::spec::parse_manifest(
                "w/manifest.yaml",
                "w",
                "name: w\ncommand: [sleep, '1000']\n",
            )
            .unwrap();
            let spec = SpawnSpec {
                instance: InstanceId::parse("ns:t:w").unwrap().0,
                argv: vec!["sleep".into(), "1000".into()],
                env: vec![("PATH".into(), "/usr/bin:/bin".into())],
                cwd: dir.path().to_owned(),
                spec: Arc::new(workload),
                binds: Vec::new(),
                ids: None,
                inherited: Vec::new(),
                listen: Vec::new(),
            };
            let spawned = driver.spawn(spec).await.unwrap();
            // Any live process will do as the named one: this test's own.
            let me = std::process::id();
            let res = spawned.handle.set_main_pid(me);
            let mut sent_main_pid = false;
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            if current {
                assert!(res.is_ok(), "{res:?}");
                assert_eq!(spawned.handle.pid(), Some(me));
                while !sent_main_pid && std::time::Instant::now() < deadline {
                    if let Ok(r) = seen_rx.recv_timeout(Duration::from_millis(100)) {
                        sent_main_pid = matches!(r, Request::MainPid { main, .. } if main == me);
                    }
                }
                assert!(sent_main_pid, "no MainPid reached the keeper");
            } else {
                assert!(
                    matches!(res, Err(crate::MainPidError::OldKeeper)),
                    "{res:?}"
                );
                assert_ne!(spawned.handle.pid(), Some(me));
                std::thread::sleep(Duration::from_millis(200));
                assert!(
                    !seen_rx
                        .try_iter()
                        .any(|r| matches!(r, Request::MainPid { .. })),
                    "MainPid sent to an older keeper"
                );
            }
            // The fake keeper's child goes with this iteration (the fake keeper thread
            // ends with the test process).
            let child = child_rx.recv().unwrap();
            // SAFETY: kill(2) on the child the fake keeper above started and still holds.
            unsafe { libc::kill(child as i32, libc::SIGKILL) };
            drop(keeper);
        }
    }

    /// A keeper from before `setup`: it spawns the child as asked but ignores the setup
    /// and answers without `setup_applied`. The daemon side must kill that child and fail
    /// the spawn saying why.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_older_keeper_that_ignores_the_setup_has_its_instance_killed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keeper.sock");
        let listener = super::super::seqpacket(false).unwrap();
        rustix::net::bind(&listener, &rustix::net::SocketAddrUnix::new(&path).unwrap()).unwrap();
        rustix::net::listen(&listener, 1).unwrap();
        let (pid_tx, pid_rx) = std::sync::mpsc::channel();
        let old_keeper = std::thread::spawn(move || {
            let conn = rustix::net::accept(&listener).unwrap();
            let mut buf = vec![0u8; MAX_MESSAGE];
            loop {
                let got = match super::super::recv::<Request>(conn.as_fd(), &mut buf) {
                    Ok(Some((req, _))) => req,
                    Ok(None) => return,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(e) => panic!("{e}"),
                };
                if let Request::Spawn { req, .. } = got {
                    use std::os::unix::process::CommandExt;
                    let c = std::process::Command::new("sleep")
                        .arg("1000")
                        .process_group(0)
                        .spawn()
                        .unwrap();
                    let pid = c.id();
                    pid_tx.send(pid).unwrap();
                    let pidfd = crate::sys::pidfd_open(pid).unwrap();
                    // The old reply: no `setup_applied`.
                    let old =
                        format!(r#"{{"op":"spawned","req":{req},"pid":{pid},"start_time":0}}"#);
                    let v: serde_json::Value = serde_json::from_str(&old).unwrap();
                    super::super::send(conn.as_fd(), &v, &[pidfd.as_fd()]).unwrap();
                    // Reap it once killed and report it, as a keeper does.
                    let mut c = c;
                    let status = c.wait().unwrap();
                    use std::os::unix::process::ExitStatusExt;
                    let exited = Reply::Exited {
                        pid,
                        status: ExitStatus::Signaled {
                            signal: status.signal().unwrap_or(0),
                            core_dumped: false,
                        },
                    };
                    super::super::send(conn.as_fd(), &exited, &[]).unwrap();
                }
            }
        });
        let client = KeeperClient::connect(&path).await.unwrap();
        let driver = KeeperDriver::new(client);
        let workload = bulkhead_core::spec::parse_manifest(
            "w/manifest.yaml",
            "w",
            "name: w\ncommand: [sleep, '1000']\nlimits: {nofile: 64}\n",
        )
        .unwrap();
        let spec = SpawnSpec {
            instance: InstanceId::parse("ns:t:w").unwrap().0,
            argv: vec!["sleep".into(), "1000".into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: dir.path().to_owned(),
            spec: Arc::new(workload),
            binds: Vec::new(),
            ids: None,
            inherited: Vec::new(),
            listen: Vec::new(),
        };
        let err = match tokio::time::timeout(Duration::from_secs(30), driver.spawn(spec)).await {
            Ok(Err(e)) => e.to_string(),
            Ok(Ok(_)) => panic!("the spawn through an older keeper succeeded"),
            Err(_) => panic!("the spawn did not end"),
        };
        assert!(err.contains("older than this daemon"), "{err}");
        let pid = pid_rx.recv().unwrap();
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "the child {pid} still runs"
        );
        // The fake keeper's thread serves until the process ends (the client may outlive
        // the driver in its tasks).
        drop(old_keeper);
    }
}
