//! sd_notify `MAINPID=` for the sandbox: the run's main process moves to another process
//! of the instance, as systemd's (and as on the process driver, see `bulkhead_driver`'s
//! `mainpid`).
//!
//! # Pids
//!
//! The value a program writes is a pid in the instance's own PID namespace; the daemon
//! asks [`InstanceHandle::host_pid`](bulkhead_driver::InstanceHandle::host_pid) for the
//! host's (the member of the instance's cgroups whose `NSpid` line in
//! `/proc/<pid>/status` has that number at the instance's level), checks it (the
//! instance's processes are those of its PID namespace: `/proc/<pid>/ns/pid`), and hands
//! it to `set_main_pid`, which tells the init the number again as the namespace sees it.
//! `pid()` (and `get`) show the host's.
//!
//! # The init and the driver
//!
//! The init (PID 1 of the namespace, see [`crate::spawn`]) reports the end of its main
//! process as a record `(pid in the namespace, raw wait status)` on the status pipe, then
//! waits for the driver's answer on a control pipe made before the clone, still reaping
//! and forwarding signals meanwhile:
//!
//! - `0`: end the run (the init exits; the kernel kills what is left of the namespace);
//! - a pid: the main process is now that one (also sent at any time by `set_main_pid`).
//!   The init follows it with a pidfd; once the process that forked it has exited, the
//!   init (PID 1, every orphan's parent) reaps it and reports its real status. One that
//!   exits while another process is its parent stays a zombie until that parent exits
//!   (the init then reaps it: its real status) or reaps it (the init looks every 50 ms):
//!   then it is reported as [`LOST`](crate::spawn::LOST), shown as
//!   [`LOST_STATUS`](bulkhead_driver::process::LOST_STATUS) and logged, as on the process
//!   driver (which reports it lost at once). One that already ended when named is
//!   reported at once (its status if the init reaped it, among the last 16).
//!
//! The driver answers a record about the process the init started by first reading the
//! notify messages queued before (the hook of
//! [`on_main_exit`](bulkhead_driver::InstanceHandle::on_main_exit); systemd reads notify
//! messages before `SIGCHLD`), so that a program that sends `MAINPID=` and exits at once
//! is followed. A record about a process that is no longer the main one (the move crossed
//! its end) is only logged. Every end waits for that answer: one wakeup of the daemon.
//! Without a driver (its end of the control pipe closed), the init ends with its main
//! process as before.
//!
//! Signals still go to the init, which forwards them to every process of the namespace,
//! the new main one among them; `SIGKILL` kills the init and with it the namespace.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use bulkhead_core::event::ExitStatus;
use bulkhead_driver::process::LOST_STATUS;
use bulkhead_driver::MainPidError;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::cgroup::InstanceCgroup;
use crate::driver::{decode, lock};
use crate::spawn::{LOST, RECORD};

/// The pids of a `/proc/<pid>/status` text's `NSpid` line, from the namespace of the
/// reader's `/proc` down to the process's own.
pub(crate) fn nspids(status: &str) -> Option<Vec<u32>> {
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    let ids: Option<Vec<u32>> = line.split_whitespace().map(|v| v.parse().ok()).collect();
    ids.filter(|v| !v.is_empty())
}

/// The number `status` (a process's `/proc/<pid>/status`) has in the PID namespace
/// `level` levels below the reader's, if it lives in exactly that one's depth.
pub(crate) fn pid_at_level(status: &str, level: usize) -> Option<u32> {
    nspids(status)
        .filter(|ids| ids.len() == level + 1)
        .and_then(|ids| ids.get(level).copied())
}

/// An instance's PID namespace, as the host sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PidNs {
    dev: u64,
    ino: u64,
    /// How deep below the daemon's `/proc` it is (1 for a daemon on the host).
    level: usize,
}

impl PidNs {
    /// The namespace of `init`, which must be its PID 1.
    pub(crate) fn of_init(init: u32) -> io::Result<PidNs> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(format!("/proc/{init}/ns/pid"))?;
        let status = std::fs::read_to_string(format!("/proc/{init}/status"))?;
        match nspids(&status) {
            Some(ids) if ids.len() >= 2 && ids.last() == Some(&1) => Ok(PidNs {
                dev: m.dev(),
                ino: m.ino(),
                level: ids.len() - 1,
            }),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("pid {init} is not the init of a PID namespace"),
            )),
        }
    }

    /// Whether host process `host` lives in this namespace (one `stat`: asked for every
    /// notify message).
    pub(crate) fn contains(&self, host: u32) -> bool {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/{host}/ns/pid"))
            .is_ok_and(|m| (m.dev(), m.ino()) == (self.dev, self.ino))
    }

    /// Host process `host`'s number in this namespace, if it lives in it.
    pub(crate) fn pid_of(&self, host: u32) -> Option<u32> {
        if !self.contains(host) {
            return None;
        }
        let status = std::fs::read_to_string(format!("/proc/{host}/status")).ok()?;
        pid_at_level(&status, self.level)
    }
}

/// A main process named by `MAINPID=`.
#[derive(Debug, Clone, Copy)]
struct Moved {
    /// In the instance's namespace.
    inner: u32,
    host: u32,
}

struct State {
    /// Write end of the init's control pipe (non-blocking); `None` once the run is decided.
    ctl: Option<OwnedFd>,
    moved: Option<Moved>,
}

/// One sandboxed run's main process, as `MAINPID=` moves it.
pub(crate) struct MainPid {
    instance: String,
    /// `None`: the namespace could not be read at spawn; `MAINPID=` is refused.
    ns: Option<PidNs>,
    state: Mutex<State>,
    hook: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
    /// `true` once `on_exit` installed the hook; watched only when `awaits_hook`.
    hooked: tokio::sync::watch::Sender<bool>,
    /// The program has a notify socket, whose reader (the daemon) installs the hook once
    /// the spawn has returned.
    awaits_hook: bool,
}

/// How long the first record of a run with a notify socket waits for the hook. The daemon
/// installs it as soon as the spawn returns; the bound only matters for a handle the
/// daemon dropped without taking the run under supervision.
const HOOK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl MainPid {
    /// `awaits_hook`: the program was given a notify socket (see [`HOOK_WAIT`]).
    pub(crate) fn new(instance: &str, init: u32, ctl: OwnedFd, awaits_hook: bool) -> MainPid {
        let ns = PidNs::of_init(init)
            .map_err(|e| {
                tracing::warn!(
                    instance,
                    "cannot read the instance's PID namespace (MAINPID= will be ignored): {e}"
                )
            })
            .ok();
        if let Err(e) = rustix::io::ioctl_fionbio(&ctl, true) {
            tracing::warn!(
                instance,
                "cannot make the init's control pipe non-blocking: {e}"
            );
        }
        MainPid {
            instance: instance.to_owned(),
            ns,
            state: Mutex::new(State {
                ctl: Some(ctl),
                moved: None,
            }),
            hook: Mutex::new(None),
            hooked: tokio::sync::watch::Sender::new(false),
            awaits_hook,
        }
    }

    /// The host pid of the main process `MAINPID=` named, if it moved.
    pub(crate) fn moved(&self) -> Option<u32> {
        lock(&self.state).moved.map(|m| m.host)
    }

    pub(crate) fn on_exit(&self, hook: Arc<dyn Fn() + Send + Sync>) {
        *lock(&self.hook) = Some(hook);
        self.hooked.send_replace(true);
    }

    /// Whether host process `pid` is one of the instance's (lives in its namespace).
    pub(crate) fn owns(&self, pid: u32) -> Option<bool> {
        Some(self.ns?.contains(pid))
    }

    /// The host pid of the instance's process numbered `inner` in its namespace.
    pub(crate) fn host_pid(&self, cg: &InstanceCgroup, inner: u32) -> Option<u32> {
        let ns = self.ns?;
        if inner == 1 {
            // Our init, not a process of the workload.
            return None;
        }
        cg.members()
            .into_iter()
            .find(|&host| ns.pid_of(host) == Some(inner))
    }

    /// `MAINPID=`: host process `host`, which must be one of the instance's, is the main
    /// process from now on; the init is told its number in the namespace.
    pub(crate) fn set(&self, host: u32) -> Result<(), MainPidError> {
        let ns = self.ns.ok_or(MainPidError::Unsupported)?;
        // Held until the init is told: records and moves are decided in one order.
        let mut st = lock(&self.state);
        let Some(ctl) = &st.ctl else {
            return Err(MainPidError::Ended);
        };
        if st.moved.is_some_and(|m| m.host == host) {
            return Ok(());
        }
        // The init (1) is ours, not the workload's: it never exits by itself.
        let inner = ns
            .pid_of(host)
            .filter(|&p| p != 1)
            .ok_or(MainPidError::NotInInstance { pid: host })?;
        match rustix::io::write(ctl, &inner.to_ne_bytes()) {
            Ok(4) => {}
            Ok(_) => {
                return Err(MainPidError::Watch {
                    pid: host,
                    source: io::Error::new(io::ErrorKind::WriteZero, "short write to the init"),
                })
            }
            Err(e) => {
                return Err(MainPidError::Watch {
                    pid: host,
                    source: e.into(),
                })
            }
        }
        st.moved = Some(Moved { inner, host });
        tracing::info!(
            instance = %self.instance,
            "main process is now pid {host} ({inner} in the sandbox) (MAINPID)"
        );
        Ok(())
    }

    /// Reads the init's records from the status pipe and answers them, until the run is
    /// decided (the status it ends with) or the init is gone without (`None`: it was
    /// killed).
    pub(crate) async fn follow(self: Arc<Self>, status: OwnedFd) -> Option<ExitStatus> {
        let afd = rustix::io::ioctl_fionbio(&status, true)
            .map_err(io::Error::from)
            .and_then(|()| {
                // SAFETY: the AsyncFd owns the OwnedFd: the descriptor stays open and the
                // same until the AsyncFd drops.
                unsafe { AsyncFd::register_with_interest(status, Interest::READABLE) }
                    .map_err(|e| e.into_parts().1)
            });
        let afd = match afd {
            Ok(afd) => afd,
            Err(e) => {
                tracing::error!(
                    instance = %self.instance,
                    "cannot poll the init's status pipe (the run ends with its first process): {e}"
                );
                // The init ends with its main process when the control pipe closes.
                lock(&self.state).ctl = None;
                return None;
            }
        };
        let mut rec = [0u8; RECORD];
        let mut got = 0;
        loop {
            let mut ready = match afd.readable().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(instance = %self.instance, "cannot poll the init's status pipe: {e}");
                    lock(&self.state).ctl = None;
                    return None;
                }
            };
            match ready.try_io(|fd| Ok(rustix::io::read(fd.get_ref(), &mut rec[got..])?)) {
                Ok(Ok(0)) => return None,
                Ok(Ok(n)) => {
                    got += n;
                    if got == RECORD {
                        got = 0;
                        let pid = u32::from_ne_bytes([rec[0], rec[1], rec[2], rec[3]]);
                        let raw = i32::from_ne_bytes([rec[4], rec[5], rec[6], rec[7]]);
                        if self.awaits_hook {
                            // RACE: this task runs from the spawn on; the daemon installs
                            // the hook only once the spawn has returned. A program that
                            // sends MAINPID= and exits at once can end before that: its
                            // record waits for the hook, so the message is still read
                            // before the run is declared over.
                            let mut hooked = self.hooked.subscribe();
                            let _ = tokio::time::timeout(HOOK_WAIT, hooked.wait_for(|h| *h)).await;
                        }
                        if let Some(status) = self.ended(pid, raw) {
                            return Some(status);
                        }
                    }
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => {
                    tracing::error!(instance = %self.instance, "cannot read the init's status pipe: {e}");
                    lock(&self.state).ctl = None;
                    return None;
                }
                Err(_would_block) => {}
            }
        }
    }

    /// The init reports that its main process `pid` (in the namespace) ended with `raw`:
    /// `Some` if that ends the run (the init is told so).
    fn ended(&self, pid: u32, raw: i32) -> Option<ExitStatus> {
        let status = if raw == LOST {
            tracing::warn!(
                instance = %self.instance,
                "main process {pid} (MAINPID, in the sandbox) exited but was another \
                 process's child: its exit status is unknown, reported as {LOST_STATUS}"
            );
            LOST_STATUS
        } else {
            decode(raw)
        };
        if lock(&self.state).moved.is_none() {
            // ORDER: the MAINPID= messages sent before this exit are read now, before the
            // run is declared over (systemd: notify before SIGCHLD). Not under the state
            // lock: the hook calls `set`.
            let hook = lock(&self.hook).clone();
            if let Some(hook) = hook {
                hook();
            }
        }
        let mut st = lock(&self.state);
        match st.moved {
            Some(m) if m.inner != pid => {
                tracing::info!(
                    instance = %self.instance,
                    "process {pid} (in the sandbox) exited ({status}); the run follows MAINPID={}",
                    m.host
                );
                None
            }
            _ => {
                if let Some(ctl) = st.ctl.take() {
                    // The init also reads end-of-file as the end; `0` does not wait for
                    // copies of this descriptor that other instances' children still hold
                    // until their exec.
                    let _ = rustix::io::write(&ctl, &0u32.to_ne_bytes());
                }
                Some(status)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tpython3\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\n\
        Ngid:\t0\nPid:\t4242\nPPid:\t4200\nNSpid:\t4242\t3\nNSpgid:\t4200\t1\n";

    #[test]
    fn nspid_lists_each_level() {
        assert_eq!(nspids(STATUS), Some(vec![4242, 3]));
        assert_eq!(nspids("Pid:\t1\nNSpid:\t17\n"), Some(vec![17]));
        assert_eq!(nspids("Pid:\t1\n"), None);
        assert_eq!(nspids("NSpid:\t12\tx\n"), None);
        assert_eq!(nspids("NSpid:\n"), None);
    }

    #[test]
    fn a_pid_is_read_at_the_instance_level_only() {
        assert_eq!(pid_at_level(STATUS, 1), Some(3));
        // A process of the host, and one of a namespace nested in the instance's.
        assert_eq!(pid_at_level("NSpid:\t3\n", 1), None);
        assert_eq!(pid_at_level("NSpid:\t4242\t3\t1\n", 1), None);
        assert_eq!(pid_at_level("NSpid:\t4242\t3\t1\n", 2), Some(1));
    }

    /// The init builds a wait status from `waitid` for a main process it reaped through
    /// its pidfd; the driver decodes it as every other status.
    #[test]
    fn a_waitid_end_decodes_as_the_same_status() {
        use crate::init_proto::wait_status;
        assert_eq!(
            decode(wait_status(libc::CLD_EXITED, 7)),
            ExitStatus::Exited { code: 7 }
        );
        assert_eq!(
            decode(wait_status(libc::CLD_KILLED, libc::SIGTERM)),
            ExitStatus::Signaled {
                signal: libc::SIGTERM,
                core_dumped: false
            }
        );
        assert_eq!(
            decode(wait_status(libc::CLD_DUMPED, libc::SIGSEGV)),
            ExitStatus::Signaled {
                signal: libc::SIGSEGV,
                core_dumped: true
            }
        );
        assert_ne!(wait_status(libc::CLD_EXITED, 255), LOST);
    }

    #[test]
    fn this_process_is_not_the_init_of_a_namespace() {
        // The test runs as PID 1 of no namespace of its own (a CI container's init
        // aside, which is not what runs tests).
        let e = PidNs::of_init(std::process::id()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }
}
