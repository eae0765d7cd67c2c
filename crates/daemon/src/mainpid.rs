//! sd_notify `MAINPID=`, honoured as systemd does: a message naming a process of the
//! instance moves the run's main process there, through the driver
//! ([`InstanceHandle::set_main_pid`]), before the message reaches the actor (which then
//! records the new pid: `get`, the instance table). From then on signals, the exit status
//! and the end of the run follow the new process (see `bulkhead_driver`'s `mainpid`).
//!
//! A program that forks, sends `MAINPID=<child>` and lets its first process exit often
//! exits before the daemon has read the message: so the driver calls back, when the
//! process it started exits, to read what is queued on the socket first
//! ([`InstanceHandle::on_main_exit`]), as systemd reads notify messages before `SIGCHLD`.
//!
//! The value is a pid as the instance sees it: the driver translates it to the host's
//! ([`InstanceHandle::host_pid`]; the sandbox has a PID namespace of its own). A
//! `MAINPID=` naming a process outside the instance is dropped (the socket checks it);
//! one the driver cannot follow (docker) is logged and ignored.

use std::sync::{Arc, Weak};

use bulkhead_core::key::InstanceId;
use bulkhead_driver::InstanceHandle;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::readiness::{self, NotifyMsg, NotifySocket};

/// Reads instance `id`'s notify socket for the run `handle` (whose first process is
/// `first`): accepted messages go to `tx`, a `MAINPID=` moves the run's main process
/// first. The task ends (and the socket closes) when it is aborted.
pub(crate) fn watch_notify(
    id: InstanceId,
    sock: NotifySocket,
    handle: &Arc<dyn InstanceHandle>,
    first: u32,
    tx: mpsc::UnboundedSender<NotifyMsg>,
) -> JoinHandle<()> {
    let sock = Arc::new(sock);
    // Weak: the handle keeps the hook, which must not keep the handle or the socket.
    let weak: Weak<dyn InstanceHandle> = Arc::downgrade(handle);
    let owns = {
        let weak = weak.clone();
        move |p: u32| belongs(&weak, p, first)
    };
    let main_pid = {
        let weak = weak.clone();
        move |v: u32| named_main(&weak, v, first)
    };
    let forward = {
        let weak = weak.clone();
        move |mut msg: NotifyMsg| {
            if let (Some(mp), Some(h)) = (msg.main_pid, weak.upgrade()) {
                if let Err(e) = h.set_main_pid(mp) {
                    tracing::warn!("{id}: MAINPID={mp} ignored: {e}");
                    msg.main_pid = None;
                }
            }
            let _ = tx.send(msg);
        }
    };
    let forward = Arc::new(forward);
    let hook = {
        let sock = Arc::downgrade(&sock);
        let weak = weak.clone();
        let forward = Arc::clone(&forward);
        move || {
            if let Some(sock) = sock.upgrade() {
                let owns = |p: u32| belongs(&weak, p, first);
                let main_pid = |v: u32| named_main(&weak, v, first);
                let _ = sock.receive_queued(&owns, &main_pid, &*forward);
            }
        }
    };
    handle.on_main_exit(Arc::new(hook));
    tokio::spawn(sock.run(owns, main_pid, move |m| forward(m)))
}

/// The host pid of the process of the run that `MAINPID=value` names (the value is a pid
/// in the instance's own PID namespace, if it has one), or `None`.
fn named_main(h: &Weak<dyn InstanceHandle>, value: u32, first: u32) -> Option<u32> {
    let host = h.upgrade()?.host_pid(value)?;
    belongs(h, host, first).then_some(host)
}

/// Whether host process `p` belongs to the run: its main process (moved or not), or as
/// the driver tells (by cgroup), or else the first process's group.
fn belongs(h: &Weak<dyn InstanceHandle>, p: u32, first: u32) -> bool {
    let Some(h) = h.upgrade() else {
        return false;
    };
    h.pid() == Some(p)
        || h.owns_pid(p)
            .unwrap_or_else(|| readiness::pid_in_group(p, first))
}
