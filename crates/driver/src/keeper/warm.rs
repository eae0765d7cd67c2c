//! Warm slots of the process driver through the keeper (`warm:`; the contract is
//! [`crate::warm`]'s).
//!
//! A slot is a cold spawn stopped short of its exec. [`KeeperDriver::make_slot`] makes the
//! instance's cgroup (named after the slot), resolves the manifest's user, limits and
//! working directory, and asks the keeper (`Request::Prewarm`) for a child that takes
//! every step of a spawn (its process group, stdio pipes held by the keeper, the cgroup,
//! signals, descriptors, user and limits, working directory, parent-death signal) and
//! then waits on a socket (`clone_spawn::spawn_slot`), whose other end comes to the
//! daemon with the slot's pidfd. The child says whether its steps went through before the
//! slot counts as made.
//!
//! At the launch, [`KeeperDriver::take_slot`] checks the launch is one the slot was made
//! for (the same manifest and folder), resolves the program as a cold spawn does, tells
//! the keeper the slot is now the instance (`Request::Assign`, with the record and the
//! listening sockets a cold spawn gives it, so a restarted daemon adopts it and its
//! sockets outlive a daemon crash), and writes the program, its
//! arguments, environment and listening sockets on the slot's socket itself: the keeper
//! is not on the launch's path. The child execs; a successful exec closes its end, a
//! failed one says the errno (typed as a cold spawn's `Exec` error). From there the
//! instance is a cold one: the same handle, exit report, output forwarding and cgroup.
//!
//! A slot whose daemon is gone sees its socket's end and exits; the keeper forgets a slot
//! no launch took once it exits, and the start-up sweep removes its cgroup. A discarded
//! slot is killed through its pidfd, and its cgroup removed once it has exited.
//!
//! What a slot holds while it waits: a copy of the keeper's address space (a fork: the
//! keeper is small and single-threaded), which the hand-over's exec drops.

use std::any::Any;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::oneshot;

use super::client::{KeeperClient, KeeperDriver, Record};
use super::{Reply, Request};
use crate::cgroup::InstanceCgroup;
use crate::warm::{Warm, WarmSpec};
use crate::{OutputTap, SetupStep, SpawnError, SpawnSpec, Spawned};

/// A waiting slot: see the module docs.
pub(super) struct Slot {
    warm: WarmSpec,
    pub(super) client: Arc<KeeperClient>,
    pub(super) pid: u32,
    /// `None` once the launch or a discard took it.
    pub(super) live: Option<Live>,
}

pub(super) struct Live {
    pub(super) pidfd: OwnedFd,
    pub(super) handover: AsyncFd<OwnedFd>,
    pub(super) tap: Arc<OutputTap>,
    pub(super) cgroup: Option<InstanceCgroup>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Dropped without a launch or a discard: closing our end of its socket ends its
        // wait (it exits); the kill makes sure of it. The keeper forgets it once it
        // exits; its cgroup goes with the next start-up sweep.
        if let Some(l) = self.live.take() {
            let _ = crate::sys::pidfd_send_signal(&l.pidfd, bulkhead_core::signal::Signal::KILL);
            self.client.forget_slot(self.pid);
        }
    }
}

#[async_trait]
impl Warm for Slot {
    fn memory(&self) -> u64 {
        pss(self.pid)
    }

    fn alive(&self) -> bool {
        self.live.as_ref().is_some_and(Live::alive)
    }

    async fn discard(mut self: Box<Self>) {
        if let Some(l) = self.live.take() {
            end(&self.client, self.pid, l).await;
        }
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

/// A waiting slot's share of the pages it maps (bytes; most are the keeper's, shared).
pub(super) fn pss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| crate::cgroup::keyed(&s.replace(" kB", ""), "Pss:"))
        .map_or(0, |kib| kib * 1024)
}

impl Live {
    /// Whether the slot's process still runs (a pidfd is readable once it has exited).
    pub(super) fn alive(&self) -> bool {
        let mut fds = [rustix::event::PollFd::new(
            &self.pidfd,
            rustix::event::PollFlags::IN,
        )];
        matches!(
            rustix::event::poll(&mut fds, Some(&rustix::event::Timespec::default())),
            Ok(0)
        )
    }
}

/// The first word of a new slot: its steps went through, or the errno of the one that
/// failed (then it exits, and is ended here). Bounded: a slot stuck in its steps (a
/// working directory on a hung file system) must not hold the one that makes slots.
pub(super) async fn first_word(
    client: &Arc<KeeperClient>,
    pid: u32,
    live: Live,
    name: &str,
) -> Result<Live, SpawnError> {
    let first = tokio::time::timeout(FIRST_WORD, said(&live.handover)).await;
    let reason = match first {
        Ok(Ok(Some(0))) => return Ok(live),
        Ok(Ok(Some(errno))) => io::Error::from_raw_os_error(errno).to_string(),
        Ok(Ok(None)) => "it exited before it was ready".to_owned(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!(
            "its steps took more than {} s; killed",
            FIRST_WORD.as_secs()
        ),
    };
    end(client, pid, live).await;
    Err(slot_error(name, reason))
}

/// Kills a slot (or an instance whose exec failed), waits for the keeper's report of its
/// exit, and removes its cgroup.
pub(super) async fn end(client: &Arc<KeeperClient>, pid: u32, l: Live) {
    let _ = crate::sys::pidfd_send_signal(&l.pidfd, bulkhead_core::signal::Signal::KILL);
    drop(l.handover);
    let mut exit = client.exit_watch(pid);
    let _ = exit.wait_for(Option::is_some).await;
    // An assigned slot whose exec failed is an instance to the keeper: it forgets it
    // once acknowledged and its output pipes have ended, which it reads only when asked
    // (a slot never assigned is forgotten at its exit, and this is a no-op).
    let _ = client.send(&Request::Attach { pid }).await;
    client.ack(pid).await;
    client.forget_slot(pid);
    if let Some(cg) = l.cgroup {
        let _ = tokio::task::spawn_blocking(move || cg.remove()).await;
    }
}

impl KeeperClient {
    /// Forgets what this client keeps for slot `pid` (its exit watch and output tap).
    pub(super) fn forget_slot(&self, pid: u32) {
        let mut st = self.state();
        st.exits.remove(&pid);
        st.taps.remove(&pid);
    }

    /// Whether the keeper makes warm slots; asks it (a `List`, whose end says so) when
    /// it has not said yet.
    async fn makes_slots(&self) -> bool {
        use std::sync::atomic::Ordering;
        if !self.prewarms.load(Ordering::SeqCst) {
            let _ = self.list().await;
        }
        self.prewarms.load(Ordering::SeqCst)
    }
}

/// How long a new slot may take to say its steps went through.
const FIRST_WORD: std::time::Duration = std::time::Duration::from_secs(10);

/// What the keeper answered a `Prewarm` with.
pub(super) struct Made {
    pub(super) client: Arc<KeeperClient>,
    pub(super) pid: u32,
    pub(super) pidfd: OwnedFd,
    pub(super) handover: AsyncFd<OwnedFd>,
    pub(super) tap: Arc<OutputTap>,
    /// The slot takes a spare's hand-over (`Reply::Spawned::takes_steps`).
    pub(super) takes_steps: bool,
}

pub(super) fn slot_error(slot: &str, reason: impl std::fmt::Display) -> SpawnError {
    SpawnError::Keeper {
        reason: format!("cannot make warm slot {slot}: {reason}"),
    }
}

impl KeeperDriver {
    /// [`crate::Driver::prewarm`]: see the module docs.
    pub(super) async fn make_slot(&self, warm: WarmSpec) -> Result<Slot, SpawnError> {
        let name = warm.slot.clone();
        let spec = &warm.spec;
        // Its errors name the slot (no instance exists yet).
        let step = |step: SetupStep| {
            let name = name.clone();
            move |e: &dyn std::fmt::Display| SpawnError::Setup {
                instance: name.clone(),
                step,
                reason: e.to_string(),
            }
        };
        crate::setup::limit_settings(spec).map_err(|e| step(SetupStep::Limits)(&e))?;
        let setup = crate::setup::host_setup(spec)
            .map_err(|e| step(SetupStep::User)(&e))?
            .map(Box::new);
        let cwd = bulkhead_core::execution::working_dir(spec, &warm.cwd);
        crate::setup::check_working_dir(spec, &cwd).map_err(|e| step(SetupStep::WorkingDir)(&e))?;
        let cgroup = match self.tracker() {
            Some(t) => Some(t.create(&name).map_err(|e| step(SetupStep::Cgroup)(&e))?),
            None => None,
        };
        let made = self
            .prewarm_at(&name, cwd, cgroup.as_ref(), setup.clone())
            .await;
        let Made {
            client,
            pid,
            pidfd,
            handover,
            tap,
            ..
        } = match made {
            Ok(m) => m,
            Err(e) => {
                if let Some(cg) = cgroup {
                    let _ = tokio::task::spawn_blocking(move || cg.remove()).await;
                }
                return Err(e);
            }
        };
        let live = Live {
            pidfd,
            handover,
            tap,
            cgroup,
        };
        let live = first_word(&client, pid, live, &name).await?;
        Ok(Slot {
            warm,
            client,
            pid,
            live: Some(live),
        })
    }

    /// Asks the first keeper that is not full for a slot; the next one when it is.
    pub(super) async fn prewarm_at(
        &self,
        name: &str,
        cwd: std::path::PathBuf,
        cgroup: Option<&InstanceCgroup>,
        setup: Option<Box<crate::setup::ChildSetup>>,
    ) -> Result<Made, SpawnError> {
        let mut shard = self
            .clients()
            .iter()
            .position(|c| !c.is_full() || c.is_closed())
            .unwrap_or(0);
        loop {
            if shard >= super::client::MAX_SHARDS {
                return Err(slot_error(name, "every keeper is full"));
            }
            let client = self.live_client(shard).await?;
            if !client.makes_slots().await {
                return Err(slot_error(
                    name,
                    format!(
                        "keeper shard {shard} is older than this daemon and makes none; \
                         restart it (stop its instances and the daemon) for warm slots"
                    ),
                ));
            }
            let req = client.next_req();
            let (tx, rx) = oneshot::channel();
            client.state().pending.insert(req, tx);
            let msg = Request::Prewarm {
                req,
                slot: name.to_owned(),
                cwd: cwd.clone(),
                cgroup: cgroup.map(|c| c.dir().to_owned()),
                setup: setup.clone(),
            };
            if let Err(e) = client.send(&msg).await {
                client.state().pending.remove(&req);
                return Err(slot_error(name, format!("cannot reach the keeper: {e}")));
            }
            match rx.await {
                Ok((
                    Reply::Spawned {
                        pid, takes_steps, ..
                    },
                    fds,
                    Some(tap),
                )) => {
                    let mut fds = fds.into_iter();
                    let (Some(pidfd), Some(handover)) = (fds.next(), fds.next()) else {
                        return Err(slot_error(name, "the keeper sent no pidfd or socket"));
                    };
                    rustix::io::ioctl_fionbio(&handover, true).map_err(|e| slot_error(name, e))?;
                    // SAFETY: the AsyncFd owns the descriptor; it is closed only when the
                    // AsyncFd drops, which deregisters it first.
                    let handover = unsafe {
                        AsyncFd::register_with_interest(
                            handover,
                            Interest::READABLE | Interest::WRITABLE,
                        )
                    }
                    .map_err(|e| slot_error(name, e.into_parts().1))?;
                    return Ok(Made {
                        client,
                        pid,
                        pidfd,
                        handover,
                        tap,
                        takes_steps,
                    });
                }
                Ok((Reply::SpawnFailed { full: true, .. }, _, _)) => {
                    client.full.store(true, std::sync::atomic::Ordering::SeqCst);
                    shard += 1;
                }
                Ok((Reply::SpawnFailed { error, .. }, _, _)) => {
                    return Err(SpawnError::Keeper { reason: error })
                }
                Ok((other, _, _)) => {
                    return Err(slot_error(
                        name,
                        format!("unexpected keeper reply {other:?}"),
                    ))
                }
                Err(_) => return Err(slot_error(name, "the keeper went away")),
            }
        }
    }

    /// [`crate::Driver::spawn_warm`]: see the module docs.
    pub(super) async fn take_slot(
        &self,
        mut slot: Box<Slot>,
        spec: SpawnSpec,
    ) -> Result<Spawned, SpawnError> {
        let id = spec.instance.clone();
        let Some(live) = slot.live.take() else {
            return Err(SpawnError::invalid(&id, "the warm slot is gone"));
        };
        let (client, pid) = (Arc::clone(&slot.client), slot.pid);
        let name = slot.warm.slot.clone();
        let refuse = |why: String| SpawnError::invalid(&id, format!("warm slot {name}: {why}"));
        let fits = if *spec.spec != *slot.warm.spec {
            Err(refuse("made for another manifest".into()))
        } else if spec.cwd != slot.warm.cwd {
            Err(refuse(format!(
                "made in {}, not {}",
                slot.warm.cwd.display(),
                spec.cwd.display()
            )))
        } else {
            Ok(())
        };
        if let Err(e) = fits {
            end(&client, pid, live).await;
            return Err(e);
        }
        let cwd = bulkhead_core::execution::working_dir(&spec.spec, &spec.cwd);
        let (program, env) = match program_and_env(&spec, pid, &cwd) {
            Ok(p) => p,
            Err(e) => {
                end(&client, pid, live).await;
                return Err(e);
            }
        };
        // Refused before the keeper hears of it: the slot goes, the launch spawns cold.
        let msg = match crate::clone_spawn::handover_message(
            &program,
            &spec.argv,
            &env,
            spec.listen.len(),
        ) {
            Ok(m) => m,
            Err(e) => {
                end(&client, pid, live).await;
                return Err(refuse(e.to_string()));
            }
        };
        self.assign_and_exec(&name, client, pid, live, &spec, msg)
            .await
    }

    /// Tells the keeper slot `pid` is now `spec`'s instance (with the record a cold spawn
    /// carries), writes the hand-over `msg` (with the instance's listening sockets) on the
    /// slot's socket, and waits for its exec: the instance's handle, or the slot ended.
    pub(super) async fn assign_and_exec(
        &self,
        name: &str,
        client: Arc<KeeperClient>,
        pid: u32,
        live: Live,
        spec: &SpawnSpec,
        msg: Vec<u8>,
    ) -> Result<Spawned, SpawnError> {
        let id = &spec.instance;
        let record = Record {
            spec: (*spec.spec).clone(),
            env: spec.env.clone(),
            cwd: spec.cwd.clone(),
            cgroup: live.cgroup.as_ref().map(|c| c.dir().to_owned()),
        };
        let record = match serde_json::to_string(&record) {
            Ok(r) => r,
            Err(e) => {
                end(&client, pid, live).await;
                return Err(SpawnError::Keeper {
                    reason: format!("cannot encode the keeper record: {e}"),
                });
            }
        };
        // ORDER: the keeper learns the slot is this instance before the program runs, so
        // a daemon that dies in between leaves an instance with its record (adopted or
        // discarded by the next one), never a program it cannot name.
        let assign = Request::Assign {
            pid,
            instance: id.to_string(),
            record,
            listen: spec.listen.iter().map(|l| l.name.clone()).collect(),
        };
        let fds: Vec<_> = spec.listen.iter().map(|l| l.fd.as_fd()).collect();
        if let Err(e) = client.send_with(&assign, &fds).await {
            end(&client, pid, live).await;
            return Err(SpawnError::Keeper {
                reason: format!("cannot reach the keeper: {e}"),
            });
        }
        let written = loop {
            let mut guard = match live.handover.writable().await {
                Ok(g) => g,
                Err(e) => break Err(e),
            };
            match guard
                .try_io(|fd| crate::clone_spawn::send_handover(fd.get_ref().as_fd(), &msg, &fds))
            {
                Ok(r) => break r,
                Err(_would_block) => continue,
            }
        };
        // Its answer: the end of the socket (exec'd), or the errno of the exec.
        let outcome = match written {
            Ok(()) => said(&live.handover).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(None) => {}
            Ok(Some(errno)) => {
                end(&client, pid, live).await;
                return Err(SpawnError::Exec {
                    program: spec.argv.first().cloned().unwrap_or_default(),
                    source: io::Error::from_raw_os_error(errno),
                });
            }
            Err(e) => {
                end(&client, pid, live).await;
                return Err(SpawnError::invalid(
                    id,
                    format!("warm slot {name}: the hand-over failed: {e}"),
                ));
            }
        }
        let Live {
            pidfd,
            handover,
            tap,
            cgroup,
        } = live;
        drop(handover);
        let handle = self.handle(&client, id.to_string(), pid, Some(pidfd), cgroup, None);
        Ok(Spawned {
            handle,
            stdout: None,
            stderr: None,
            tap: Some(tap),
        })
    }
}

/// What a slot is handed besides its steps: the program, resolved as a cold spawn
/// resolves it, and the environment as a cold spawn's child makes it (`LISTEN_*` for its
/// sockets, with its pid: the slot's, which the exec keeps).
pub(super) fn program_and_env(
    spec: &SpawnSpec,
    pid: u32,
    cwd: &std::path::Path,
) -> Result<(std::path::PathBuf, Vec<(String, String)>), SpawnError> {
    let program_name = spec.argv.first().cloned().unwrap_or_default();
    let program =
        crate::process::resolve_program(&program_name, &spec.env, cwd).map_err(|source| {
            SpawnError::Exec {
                program: program_name,
                source,
            }
        })?;
    let mut env: Vec<(String, String)> = spec
        .env
        .iter()
        .filter(|(k, _)| spec.listen.is_empty() || !k.starts_with("LISTEN_"))
        .cloned()
        .collect();
    env.extend(crate::listen::env(&spec.listen).into_iter().map(|(k, v)| {
        let v = if v == crate::listen::PID_PLACEHOLDER {
            pid.to_string()
        } else {
            v
        };
        (k, v)
    }));
    Ok((program, env))
}

/// One word from a slot: `Some(errno)` (0: ready), or `None` at the socket's end.
pub(super) async fn said(sock: &AsyncFd<OwnedFd>) -> io::Result<Option<i32>> {
    loop {
        let mut guard = sock.readable().await?;
        let got = guard.try_io(|fd| {
            let mut b = [0u8; 8];
            let (n, _) = rustix::net::recv(fd.get_ref(), &mut b, rustix::net::RecvFlags::DONTWAIT)?;
            Ok((n, b))
        });
        match got {
            Ok(Ok((0, _))) => return Ok(None),
            Ok(Ok((4, b))) => return Ok(Some(i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))),
            Ok(Ok((n, _))) => {
                return Err(io::Error::other(format!(
                    "the slot said {n} bytes, not four"
                )))
            }
            // A slot killed while it talked: its end is gone.
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}
