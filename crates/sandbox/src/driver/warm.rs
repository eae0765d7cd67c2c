//! Warm slots of the sandbox driver (`warm:`; the contract is
//! [`bulkhead_driver::warm`]'s).
//!
//! A slot is a cold spawn stopped short. [`SandboxDriver::make_slot`] does everything of
//! [`Driver::spawn`](bulkhead_driver::Driver::spawn) that does not depend on the
//! request: admission, the cgroups (named after the slot, with the manifest's limits),
//! the clone with every namespace and the user namespace mapped to the slot's ids, the
//! mount program with the slot's binds, the init, and the workload process, which then
//! waits on its hand-over pipe ([`crate::spawn`], "warm slots"). The output pipes are
//! made with it.
//!
//! [`SandboxDriver::take_slot`] checks that the launch is one the slot was made for (the
//! same workload, working directory and ids; a program the slot shows), mounts the
//! directories the launch binds and the slot does not (the tenant's channel space:
//! [`bulkhead_driver::warm::bind_into`]), writes the hand-over (hostname, working directory, program, argv,
//! environment; the init's title; the listening sockets, on a socket pair a slot of a
//! workload with `sockets:` is made with) and awaits the exec as a cold spawn does. From there
//! the instance is a cold one: the same handle, watcher, status pipe and teardown. A
//! launch that does not fit is refused with a [`SpawnError`] and the slot is discarded:
//! the daemon then spawns cold.
//!
//! A discarded slot (or a dropped one) is killed through its init's pidfd (the PID
//! namespace goes with it), reaped, and its cgroups are emptied and removed. While it
//! waits, a slot holds no descriptor of the daemon but its own pipes, and it dies with
//! the daemon like any instance (the init's parent-death signal; the waiting workload
//! process is in the init's PID namespace); a crashed daemon's slots are in its cgroup
//! subtree, which the next driver of the scope sweeps at start-up.
//!
//! # Limits
//!
//! - A waiting slot holds nothing of the daemon: its init and its waiting process both
//!   exec `bulkhead-init` when the slot is made (the waiting process in its waiter mode,
//!   its restrictions applied); without an init (`sandbox: {init: false}`) its one
//!   process is the waiter, and the driver sets the instance's hostname at the hand-over
//!   from a thread that enters the slot's UTS namespace ([`set_hostname_in`]).
//! - The directories of [`WarmSpec::binds`] shown at their own path are given to the user
//!   namespace's root (`chown` to the mapped ids) when the slot is made, and the sockets
//!   in them at the launch: they are meant to be the slot's own. Those shown elsewhere (a
//!   channel space's folders) are left to their owner.
//! - A launch is taken only if its manifest equals the slot's, with the same working
//!   directory, binds among the slot's or directories (mounted in at the hand-over), the
//!   slot's ids (or none), listening sockets only
//!   if the manifest has `sockets:` (at most 16), and a program the slot shows; argv and
//!   environment must fit 256 KiB and 16,384 strings. Otherwise the launch is refused
//!   and the slot removed.

use std::any::Any;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bulkhead_core::key::InstanceId;
use bulkhead_core::sandbox::{Root, SandboxSpec, UserNamespace, UserNs};
use bulkhead_driver::restrict::Restrictions;
use bulkhead_driver::warm::{Warm, WarmSpec};
use bulkhead_driver::{reaper, sys, SetupStep, SpawnError, SpawnSpec, Spawned};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::oneshot;

use super::{lock, spawner, IdHold, Job, SandboxDriver};
use crate::cgroup::{self, InstanceCgroup};
use crate::spawn::{self, ChildError, Prepared, SlotEnds};

/// A prepared slot: see the module docs.
pub(super) struct Slot {
    warm: WarmSpec,
    sb: SandboxSpec,
    userns: Option<UserNamespace>,
    /// `user_namespace: auto` without ids from the daemon: the range the slot took
    /// (under a tenant name of its own), handed to the instance's watcher.
    id_hold: Option<IdHold>,
    restrict: Restrictions,
    /// What the child was made from: describes a failure of the hand-over's steps.
    prepared: Prepared,
    /// The program the slot was made for (the manifest's, as found at `prewarm`).
    program: PathBuf,
    /// The slot's processes and cgroups; `None` once taken or destroyed.
    live: Option<Live>,
}

/// What a launch hands a slot: the strings, the init's title message (with an init), and
/// the hostname (set by the driver in a slot without an init).
struct Handover {
    /// Binds the slot does not have: mounted into it first.
    late: Vec<bulkhead_driver::Bind>,
    message: Vec<u8>,
    title: Option<Vec<u8>>,
    hostname: Vec<u8>,
}

struct Live {
    pid: u32,
    pidfd: OwnedFd,
    status: Option<OwnedFd>,
    /// The init's control pipe (`MAINPID=`).
    ctl: Option<OwnedFd>,
    ends: SlotEnds,
    out_r: OwnedFd,
    err_r: OwnedFd,
    cgroup: InstanceCgroup,
}

impl Live {
    /// Kills the slot's processes (the init: its PID namespace goes with it), reaps the
    /// init, empties and removes the cgroups. Blocking, short.
    fn destroy(self) {
        let _ = rustix::process::pidfd_send_signal(&self.pidfd, rustix::process::Signal::KILL);
        if let Err(e) = sys::reap_blocking(self.pid) {
            tracing::warn!(pid = self.pid, "cannot reap a warm slot's init: {e}");
        }
        reaper::Registry::global().unregister(self.pid);
        sweep(&self.cgroup);
    }
}

/// Kills whatever is left in `cg` until it is empty (5 s at most), then removes it.
fn sweep(cg: &InstanceCgroup) {
    let mut delay = Duration::from_micros(200);
    let mut waited = Duration::ZERO;
    while !cg.is_empty() && waited < Duration::from_secs(5) {
        cg.kill_all();
        std::thread::sleep(delay);
        waited += delay;
        delay = (delay * 2).min(Duration::from_millis(50));
    }
    cg.remove();
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(live) = self.live.take() {
            live.destroy();
        }
    }
}

/// Empties and removes a slot's cgroups unless taken.
struct CgroupGuard(Option<InstanceCgroup>);

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Some(cg) = self.0.take() {
            sweep(&cg);
        }
    }
}

/// Destroys a slot off the async threads.
async fn destroy(live: Live) {
    let _ = tokio::task::spawn_blocking(move || live.destroy()).await;
}

#[async_trait]
impl Warm for Slot {
    fn memory(&self) -> u64 {
        self.live
            .as_ref()
            .map_or(0, |l| l.cgroup.usage().memory_bytes)
    }

    /// The init has not ended, and the workload process still holds its end of the
    /// error pipe (the init closed its own before waiting): it waits.
    fn alive(&self) -> bool {
        let Some(l) = &self.live else {
            return false;
        };
        let mut fds = [
            libc::pollfd {
                fd: l.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: l.ends.err_r.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two pollfds on the stack, descriptors we own; no wait.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 0) };
        n == 0
    }

    async fn discard(mut self: Box<Self>) {
        if let Some(live) = self.live.take() {
            destroy(live).await;
        }
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

/// Names the slot in errors made for the probe spec.
fn of_slot(e: SpawnError, slot: &str) -> SpawnError {
    match e {
        SpawnError::Setup { step, reason, .. } => SpawnError::Setup {
            instance: slot.to_owned(),
            step,
            reason,
        },
        SpawnError::Invalid { reason, .. } => SpawnError::Invalid {
            instance: slot.to_owned(),
            reason,
        },
        e => e,
    }
}

/// The next record of a child's error pipe: `None` at end-of-file (the exec, or the
/// process is gone). Awaited on the runtime, not on the spawner thread.
async fn next_record(fd: &OwnedFd) -> io::Result<Option<(u32, i32)>> {
    rustix::io::ioctl_fionbio(fd, true)?;
    // SAFETY: the AsyncFd holds the raw number only and is dropped before this function
    // returns, while `fd` stays open.
    let afd = unsafe { AsyncFd::register_with_interest(fd.as_raw_fd(), Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    loop {
        let mut ready = afd.readable().await?;
        let mut rec = [0u8; 8];
        match rustix::io::read(fd, &mut rec) {
            Ok(0) => return Ok(None),
            Ok(8) => {
                let stage = u32::from_ne_bytes([rec[0], rec[1], rec[2], rec[3]]);
                let errno = i32::from_ne_bytes([rec[4], rec[5], rec[6], rec[7]]);
                return Ok(Some((stage, errno)));
            }
            Ok(n) => {
                return Err(io::Error::other(format!(
                    "a short record ({n} bytes) on the error pipe"
                )))
            }
            Err(rustix::io::Errno::AGAIN) => ready.clear_ready(),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// A child's failure, as a spawn error of `instance` running `program`.
fn child_error(instance: &str, program: &str, e: ChildError) -> SpawnError {
    match e {
        ChildError::Exec { source, .. } => SpawnError::Exec {
            program: program.to_owned(),
            source,
        },
        e => SpawnError::Setup {
            instance: instance.to_owned(),
            step: SetupStep::Walls,
            reason: e.to_string(),
        },
    }
}

/// Gives the user namespace's root the sockets in the bound directories (the daemon
/// binds the instance's notify socket in the slot's directory), at the hand-over, as a
/// cold spawn gives it a bound socket.
fn hand_sockets(binds: &[bulkhead_driver::Bind], ns: &UserNamespace) -> io::Result<()> {
    for b in binds.iter().filter(|b| b.source == b.target) {
        let Ok(rd) = std::fs::read_dir(&b.source) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_socket()) {
                std::os::unix::fs::chown(e.path(), Some(ns.uid), Some(ns.gid()))?;
            }
        }
    }
    Ok(())
}

impl SandboxDriver {
    /// Makes a slot for `w`: see the module docs.
    pub(super) async fn make_slot(&self, w: WarmSpec) -> Result<Slot, SpawnError> {
        let name = w.slot.clone();
        self.make_slot_inner(w).await.map_err(|e| of_slot(e, &name))
    }

    async fn make_slot_inner(&self, w: WarmSpec) -> Result<Slot, SpawnError> {
        let setup = |step, reason: String| SpawnError::Setup {
            instance: w.slot.clone(),
            step,
            reason,
        };
        if self.min_available_memory > 0 {
            if let Some(avail) = cgroup::mem_available() {
                if avail < self.min_available_memory {
                    return Err(SpawnError::Exhausted {
                        reason: format!(
                            "cannot prepare warm slot {}: only {} MiB of memory is \
                             available, below the floor of {} MiB (--min-available-memory)",
                            w.slot,
                            avail >> 20,
                            self.min_available_memory >> 20
                        ),
                    });
                }
            }
        }
        // What the launch brings is not known yet: the walls are built for a probe spec
        // with the manifest's program, found in the manifest's (or the daemon's) PATH.
        let (instance, _) = InstanceId::parse(&format!("shared:{}", w.spec.name)).map_err(|e| {
            SpawnError::Invalid {
                instance: w.slot.clone(),
                reason: e.to_string(),
            }
        })?;
        let path = w
            .spec
            .env
            .get("PATH")
            .cloned()
            .or_else(|| std::env::var("PATH").ok())
            .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".to_owned());
        let probe = SpawnSpec {
            instance,
            argv: w.spec.command.first().cloned().into_iter().collect(),
            env: vec![("PATH".to_owned(), path)],
            cwd: w.cwd.clone(),
            spec: Arc::clone(&w.spec),
            binds: w.binds.clone(),
            ids: w.ids,
            inherited: Vec::new(),
            listen: Vec::new(),
        };
        let sb = w.spec.sandbox.clone().unwrap_or_default();
        let restrict = self.restrictions(&probe, &sb)?;
        let (userns, id_hold) = match sb.user_namespace {
            // A range of the slot's own (never a tenant's name: no other instance shares
            // it), handed to the instance that takes the slot.
            UserNs::Auto if w.ids.is_none() => {
                let tenant = format!("warm:{}", w.slot);
                let map = lock(&self.ids)
                    .acquire(&tenant)
                    .map_err(|e| SpawnError::Exhausted {
                        reason: format!("cannot prepare warm slot {}: {e}", w.slot),
                    })?;
                let hold = IdHold {
                    ids: Arc::clone(&self.ids),
                    tenant,
                };
                (Some(map), Some(hold))
            }
            _ => self.user_namespace(&probe, &sb)?,
        };
        let mut prepared = self.prepare(&probe, &sb, userns, restrict.clone())?;
        let program = PathBuf::from(OsStr::from_bytes(prepared.program.as_bytes()));
        let host = sb
            .hostname
            .clone()
            .unwrap_or_else(|| w.slot.clone())
            .into_bytes();
        prepared.hostname = host[..host.len().min(64)].to_vec();
        prepared.title = format!("bulkhead-init {}\0", w.slot).into_bytes();
        if let Some(ns) = &userns {
            // The slot's own directories, where the daemon puts the instance's notify
            // socket: root inside must reach what is in them.
            // (Those shown elsewhere, a channel space's folders, belong to their owner.)
            for b in w
                .binds
                .iter()
                .filter(|b| b.source == b.target && b.source.is_dir())
            {
                std::os::unix::fs::chown(&b.source, Some(ns.uid), Some(ns.gid())).map_err(|e| {
                    setup(
                        SetupStep::Ids,
                        format!(
                            "cannot hand {} to the user namespace: {e}",
                            b.source.display()
                        ),
                    )
                })?;
            }
        }
        let (cg, (out_r, out_w, err_r, err_w)) =
            self.cgroups_and_pipes(&w.slot, w.spec.resources.as_ref(), &mut prepared, setup)?;
        // The clone on the spawner thread (parent-death signal), as a cold spawn; the
        // setup that follows in the child is awaited here, not there.
        let (tx, rx) = oneshot::channel();
        let sockets = w.spec.sockets.as_ref().is_some_and(|l| !l.is_empty());
        let job: Job = Box::new(move || {
            let mut prepared = prepared;
            // The reaper lock, from before the clone until the pid is registered (see
            // the cold spawn's).
            let lock = reaper::Registry::global().lock();
            let res = spawn::spawn_slot(&prepared, sockets, &out_w, &err_w, move |pid| {
                let mut lock = lock;
                lock.register(pid)
            });
            drop((out_w, err_w));
            prepared.cgroup_fd = None;
            prepared.v1_procs.clear();
            if let Err((Ok((child, _)), _)) = tx.send((res, prepared)) {
                // The caller went away: nothing will take this slot.
                let _ =
                    rustix::process::pidfd_send_signal(&child.pidfd, rustix::process::Signal::KILL);
                let _ = sys::reap_blocking(child.pid);
                reaper::Registry::global().unregister(child.pid);
            }
        });
        // Should this future be dropped while the clone runs, the job kills the child and
        // this guard empties and removes the cgroups.
        let mut guard = CgroupGuard(Some(cg));
        if lock(spawner()).send(job).is_err() {
            return Err(setup(SetupStep::Walls, "the spawner thread is gone".into()));
        }
        let Ok((res, prepared)) = rx.await else {
            return Err(setup(
                SetupStep::Walls,
                "the spawner thread dropped the request".into(),
            ));
        };
        let arg0 = w.spec.command.first().cloned().unwrap_or_default();
        let (child, ends) = match res {
            Ok(c) => c,
            Err(e) => return Err(child_error(&w.slot, &arg0, e)),
        };
        let Some(cg) = guard.0.take() else {
            return Err(setup(SetupStep::Cgroup, "the slot's cgroup is gone".into()));
        };
        let live = Live {
            pid: child.pid,
            pidfd: child.pidfd,
            status: child.status,
            ctl: child.ctl,
            ends,
            out_r,
            err_r,
            cgroup: cg,
        };
        // The slot owns its processes from here: dropped (this future cancelled, or a
        // failure below), it destroys them.
        let mut slot = Slot {
            warm: w,
            sb,
            userns,
            id_hold,
            restrict,
            prepared,
            program,
            live: Some(live),
        };
        let record = match &slot.live {
            Some(live) => next_record(&live.ends.err_r).await,
            None => Ok(None),
        };
        let name = &slot.warm.slot;
        let setup = |step, reason: String| SpawnError::Setup {
            instance: name.clone(),
            step,
            reason,
        };
        let failed = match record {
            Ok(Some((spawn::STAGE_WAITING, _))) => None,
            Ok(Some((stage, errno))) => Some(child_error(
                name,
                &arg0,
                spawn::record_error(&slot.prepared, stage, errno),
            )),
            Ok(None) => Some(setup(
                SetupStep::Walls,
                "the slot's process ended before it was ready".into(),
            )),
            Err(e) => Some(setup(
                SetupStep::Walls,
                format!("cannot read the slot's error pipe: {e}"),
            )),
        };
        if let Some(e) = failed {
            if let Some(live) = slot.live.take() {
                destroy(live).await;
            }
            return Err(e);
        }
        tracing::debug!(slot = %slot.warm.slot, "sandbox warm slot ready");
        Ok(slot)
    }

    /// Whether the slot shows `program` as a cold spawn would: a cold spawn in a minimal
    /// root binds a program of the host that its root and binds do not show; a slot was
    /// made for its manifest's program only. (A full root shows what it shows, slot or
    /// not; a program that does not exist fails at exec, slot or not.)
    fn shown_by_slot(&self, slot: &Slot, program: &Path) -> bool {
        let sb = &slot.sb;
        if sb.root != Root::Minimal {
            return true;
        }
        let real = program
            .canonicalize()
            .unwrap_or_else(|_| program.to_owned());
        if !real.is_file() {
            return true;
        }
        let bound = slot
            .warm
            .binds
            .iter()
            .any(|b| program.starts_with(&b.target))
            || sb.binds.iter().any(|b| program.starts_with(b.target()))
            || program.starts_with(&slot.warm.cwd);
        if bound {
            return true;
        }
        self.system.iter().any(|e| match e {
            spawn::SystemEntry::Dir(d) => program.starts_with(d),
            spawn::SystemEntry::Symlink { path, .. } => program.starts_with(path),
        })
    }

    /// The hand-over of `spec` to `slot` (message, and the init's title), or why the
    /// launch is not one the slot can take.
    fn handover(&self, slot: &Slot, spec: &SpawnSpec) -> Result<Handover, SpawnError> {
        let refuse = |reason: String| SpawnError::Invalid {
            instance: spec.instance.to_string(),
            reason: format!("warm slot {}: {reason}", slot.warm.slot),
        };
        let Some(live) = &slot.live else {
            return Err(refuse("it is gone".into()));
        };
        if *spec.spec != *slot.warm.spec {
            return Err(refuse("the workload changed since it was made".into()));
        }
        if spec.cwd != slot.warm.cwd {
            return Err(refuse(format!(
                "it was made for working directory {}, not {}",
                slot.warm.cwd.display(),
                spec.cwd.display()
            )));
        }
        if !spec.listen.is_empty() && live.ends.fds_w.is_none() {
            return Err(refuse(
                "it was made without a way to pass listening sockets (its manifest has no \
                 sockets:)"
                    .into(),
            ));
        }
        if spec.listen.len() > spawn::HANDOVER_FDS {
            return Err(refuse(format!(
                "{} listening sockets, more than a hand-over brings ({})",
                spec.listen.len(),
                spawn::HANDOVER_FDS
            )));
        }
        // What the slot lacks is mounted in at the hand-over: directories only (a file
        // would need its mount point made, which no launch asks for today).
        let late: Vec<bulkhead_driver::Bind> = spec
            .binds
            .iter()
            .filter(|b| !slot.warm.binds.contains(b))
            .cloned()
            .collect();
        if let Some(b) = late
            .iter()
            .find(|b| !b.source.is_dir() || !b.target.is_absolute())
        {
            return Err(refuse(format!(
                "bind {} -> {} is not among its binds, and only a directory at an absolute \
                 path can be mounted in at the hand-over",
                b.source.display(),
                b.target.display()
            )));
        }
        if slot.sb.user_namespace == UserNs::Auto && spec.ids.is_some() && spec.ids != slot.userns {
            return Err(refuse("it maps other host ids than the tenant's".into()));
        }
        let arg0 = spec
            .argv
            .first()
            .ok_or_else(|| refuse("the command line is empty".into()))?;
        let program = super::resolve_program(arg0, &spec.env, &spec.cwd).map_err(|source| {
            SpawnError::Exec {
                program: arg0.clone(),
                source,
            }
        })?;
        if program != slot.program && !self.shown_by_slot(slot, &program) {
            return Err(refuse(format!(
                "it does not show program {}",
                program.display()
            )));
        }
        let bad =
            |what: &str| SpawnError::invalid(&spec.instance, format!("{what} contains a NUL byte"));
        let cs = |s: &[u8], what: &str| CString::new(s.to_vec()).map_err(|_| bad(what));
        let argv = spec
            .argv
            .iter()
            .map(|a| cs(a.as_bytes(), "an argument"))
            .collect::<Result<Vec<_>, _>>()?;
        let listen_env = bulkhead_driver::listen::env(&spec.listen);
        let env = spec
            .env
            .iter()
            .filter(|(k, _)| !k.starts_with("LISTEN_"))
            .chain(listen_env.iter())
            .map(|(k, v)| cs(format!("{k}={v}").as_bytes(), "the environment"))
            .collect::<Result<Vec<_>, _>>()?;
        let cwd = spec.cwd.canonicalize().unwrap_or_else(|_| spec.cwd.clone());
        let workdir = bulkhead_core::execution::working_dir(&spec.spec, &cwd);
        let workdir = cs(workdir.as_os_str().as_bytes(), "the working directory")?;
        let program = cs(program.as_os_str().as_bytes(), "the program path")?;
        let host = slot
            .sb
            .hostname
            .clone()
            .unwrap_or_else(|| spec.instance.to_string())
            .into_bytes();
        let message = spawn::handover_message(
            &host[..host.len().min(64)],
            &workdir,
            &program,
            &argv,
            &env,
            spec.listen.len(),
            live.ends.capacity,
        )
        .map_err(|needed| {
            refuse(format!(
                "the program, arguments and environment take {needed} bytes, more than its \
                 hand-over holds ({} bytes, {} strings)",
                live.ends.capacity.min(spawn::HANDOVER_BYTES),
                spawn::HANDOVER_STRINGS
            ))
        })?;
        if let Some(ns) = &slot.userns {
            hand_sockets(&slot.warm.binds, ns).map_err(|e| {
                SpawnError::setup(
                    &spec.instance,
                    SetupStep::Ids,
                    format!("cannot hand the notify socket to the user namespace: {e}"),
                )
            })?;
        }
        let title = live.ends.title_w.is_some().then(|| {
            spawn::title_message(
                format!("bulkhead-init {}\0", spec.instance).as_bytes(),
                &host[..host.len().min(64)],
            )
        });
        Ok(Handover {
            late,
            message,
            title,
            hostname: host[..host.len().min(64)].to_vec(),
        })
    }

    /// Starts `spec` in `slot`: see the module docs. On an error the slot is gone.
    pub(super) async fn take_slot(
        &self,
        mut slot: Box<Slot>,
        spec: SpawnSpec,
    ) -> Result<Spawned, SpawnError> {
        let Handover {
            late,
            message,
            title,
            hostname: host,
        } = match self.handover(&slot, &spec) {
            Ok(m) => m,
            Err(e) => {
                slot.discard().await;
                return Err(e);
            }
        };
        // The slot keeps its processes until the exec is seen: should this future be
        // dropped on the way, the slot's drop destroys them (nothing runs unwatched).
        let Some(live) = &slot.live else {
            return Err(SpawnError::invalid(&spec.instance, "the warm slot is gone"));
        };
        let setup = |reason: String| SpawnError::setup(&spec.instance, SetupStep::Walls, reason);
        // ORDER: the late binds before anything is written: the program must find them
        // at its start.
        if !late.is_empty() {
            let owner = slot.userns.as_ref().map(|ns| (ns.uid, ns.gid()));
            let bound = match live.pidfd.try_clone() {
                Ok(pidfd) => tokio::task::spawn_blocking(move || {
                    use std::os::fd::AsFd;
                    bulkhead_driver::warm::bind_into(pidfd.as_fd(), &late, owner)
                        .map_err(|e| e.to_string())
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string())),
                Err(e) => Err(format!("cannot duplicate the slot's pidfd: {e}")),
            };
            if let Err(e) = bound {
                slot.discard().await;
                return Err(setup(e));
            }
        }
        let Some(live) = &slot.live else {
            return Err(SpawnError::invalid(&spec.instance, "the warm slot is gone"));
        };
        // ORDER: the init's title first (it reads it before its loop), then the
        // program, then the listening sockets (the workload process reads them after the
        // message, whose header counts them); each fits its pipe or socket, so no write
        // waits.
        // Without an init the waiter execs as soon as it has the strings: the hostname
        // goes first.
        let hostname = if live.ends.title_w.is_none() {
            set_hostname_in(&live.pidfd, &host)
        } else {
            Ok(())
        };
        let written = hostname
            .and_then(|()| {
                title
                    .iter()
                    .zip(&live.ends.title_w)
                    .try_for_each(|(t, fd)| sys::write_all(fd, t))
            })
            .and_then(|()| sys::write_all(&live.ends.handover_w, &message))
            .and_then(|()| match (&live.ends.fds_w, spec.listen.is_empty()) {
                (Some(fds_w), false) => {
                    use std::os::fd::AsFd;
                    let fds: Vec<_> = spec.listen.iter().map(|l| l.fd.as_fd()).collect();
                    spawn::send_sockets(fds_w, &fds)
                }
                _ => Ok(()),
            });
        if let Err(e) = written {
            slot.discard().await;
            return Err(setup(format!(
                "cannot hand the program over to the warm slot: {e}"
            )));
        }
        let failed = match next_record(&live.ends.err_r).await {
            Ok(None) => None,
            Ok(Some((stage, errno))) => Some(child_error(
                spec.instance.as_str(),
                &spec.argv[0],
                spawn::record_error(&slot.prepared, stage, errno),
            )),
            Err(e) => Some(setup(format!("cannot read the slot's error pipe: {e}"))),
        };
        if let Some(e) = failed {
            slot.discard().await;
            return Err(e);
        }
        let Some(live) = slot.live.take() else {
            return Err(SpawnError::invalid(&spec.instance, "the warm slot is gone"));
        };
        let Live {
            pid,
            pidfd,
            status,
            ctl,
            ends,
            out_r,
            err_r,
            cgroup: cg,
        } = live;
        drop(ends);
        tracing::debug!(instance = %spec.instance, pid, slot = %slot.warm.slot, "sandbox spawned from a warm slot");
        // From here on as the end of a cold spawn.
        super::watch_started(
            &spec.instance,
            super::Started {
                pid,
                pidfd,
                status,
                ctl,
                cgroup: cg,
                out_r,
                err_r,
                notify: super::has_notify_socket(&spec.env),
            },
            &slot.sb,
            slot.userns.is_some(),
            slot.restrict.clone(),
            slot.id_hold.take(),
        )
    }
}

/// Sets the hostname in the UTS namespace of the process `pidfd` names (a slot without an
/// init, whose processes have no capability left), from a thread of its own: `setns`
/// moves only the calling thread, which then ends, so no thread of the daemon stays in
/// the slot's namespace.
fn set_hostname_in(pidfd: &OwnedFd, host: &[u8]) -> io::Result<()> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns and sethostname on a descriptor and a buffer we hold; this
            // thread is ours alone and ends right after.
            unsafe {
                if libc::setns(pidfd.as_raw_fd(), libc::CLONE_NEWUTS) != 0
                    || libc::sethostname(host.as_ptr().cast(), host.len()) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the hostname thread panicked")))
    })
}
