//! The daemon's side of the data plane: it owns the services.
//!
//! [`Manager`] runs one thread with one iceoryx2 node (iceoryx2 ties nodes and ports to a
//! thread). The daemon calls it, blocking, to create an instance's services before the
//! spawn ([`Manager::acquire`]), to let them go when the instance has ended
//! ([`Manager::release`]), and periodically to look for dead nodes ([`Manager::scan`]).
//!
//! **Invariant — the daemon owns every channel's lifetime.** A service exists while the
//! daemon holds it for at least one instance (a pipeline's shared service is held once per
//! instance that declares it). A workload's node keeps it only while the workload lives:
//! when the workload dies, `release` first removes the dead node's stale resources
//! (iceoryx2's dead-node cleanup: its ports, its data segments in `/dev/shm`), then drops
//! the daemon's hold, and the last hold gone removes the service itself.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use bulkhead_core::channels::ResolvedChannel;
use iceoryx2::node::NodeView;
use iceoryx2::prelude::*;
use iceoryx2::service::port_factory::publish_subscribe::PortFactory;

use crate::{new_node, service_name, Iox2, Ipc, OpenError};

/// The most publishers, subscribers and nodes one channel admits: the workload, the host
/// (a tool such as `bulkhead pipe`, a benchmark) and a pipeline neighbour, with room.
pub const MAX_PUBLISHERS: usize = 2;
pub const MAX_SUBSCRIBERS: usize = 4;
pub const MAX_NODES: usize = 16;

/// A node found dead (its process is gone without cleaning up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadPeer {
    /// The node's name (`bulkhead:<instance id>` for a workload).
    pub node: String,
    pub pid: i32,
    /// The instance the node belonged to, when it was a workload's.
    pub instance: Option<String>,
    /// `(instance holding the service, service)` for every channel the dead workload
    /// shared with an instance (itself included).
    pub affected: Vec<(String, String)>,
    /// Its shared memory was reclaimed; otherwise why not.
    pub cleanup_error: Option<String>,
}

/// Channels could not be created.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error("cannot create channel {service}: {reason}")]
    Create { service: String, reason: String },
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("the data plane thread is gone")]
    Gone,
}

/// The manager could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the data plane: {0}")]
pub struct StartError(String);

enum Cmd {
    Acquire(
        String,
        Vec<ResolvedChannel>,
        mpsc::Sender<Result<(), AcquireError>>,
    ),
    Release(String, mpsc::Sender<Vec<DeadPeer>>),
    Scan(mpsc::Sender<Vec<DeadPeer>>),
    Held(mpsc::Sender<Vec<String>>),
}

/// A handle to the data-plane thread. Dropping it ends the thread and removes every
/// service it still holds.
pub struct Manager {
    iox2: Iox2,
    tx: Mutex<Option<mpsc::Sender<Cmd>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Manager {
    /// Starts the thread and its node; removes what dead nodes of this installation left
    /// (a previous daemon that crashed, workloads that died while no daemon ran).
    pub fn start(iox2: Iox2) -> Result<Manager, StartError> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let cfg = iox2.clone();
        let thread = std::thread::Builder::new()
            .name("bulkhead-dataplane".into())
            .spawn(move || {
                // A space's manager thread lives in it (its own mount namespace and the
                // owner's file-system ids) before iceoryx2 touches a file.
                if let Some(sp) = &cfg.space {
                    if let Err(e) = crate::space::enter(sp, &cfg.root_dir()) {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                }
                let node = match new_node(&cfg, &format!("bulkhead-daemon:{}", std::process::id()))
                {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let mut st = State {
                    node,
                    cfg,
                    services: BTreeMap::new(),
                    holds: BTreeMap::new(),
                };
                st.scan();
                let _ = ready_tx.send(Ok(()));
                st.serve(rx);
            })
            .map_err(|e| StartError(format!("cannot spawn its thread: {e}")))?;
        ready_rx
            .recv()
            .map_err(|_| StartError("its thread ended".into()))?
            .map_err(StartError)?;
        Ok(Manager {
            iox2,
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The installation the services live in.
    pub fn iox2(&self) -> &Iox2 {
        &self.iox2
    }

    fn call<T>(&self, cmd: impl FnOnce(mpsc::Sender<T>) -> Cmd) -> Option<T> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()?
            .send(cmd(tx))
            .ok()?;
        rx.recv().ok()
    }

    /// Creates (or, for a pipeline's shared channel, joins) the services of `instance`.
    /// On error nothing is held for it.
    pub fn acquire(
        &self,
        instance: &str,
        channels: Vec<ResolvedChannel>,
    ) -> Result<(), AcquireError> {
        self.call(|tx| Cmd::Acquire(instance.to_owned(), channels, tx))
            .unwrap_or(Err(AcquireError::Gone))
    }

    /// Lets go of `instance`'s services once every process of it is gone: first reclaims
    /// what dead nodes left (reported), then drops the holds; a service nobody holds is
    /// removed.
    pub fn release(&self, instance: &str) -> Vec<DeadPeer> {
        self.call(|tx| Cmd::Release(instance.to_owned(), tx))
            .unwrap_or_default()
    }

    /// Finds dead nodes, reclaims their resources and reports them.
    pub fn scan(&self) -> Vec<DeadPeer> {
        self.call(Cmd::Scan).unwrap_or_default()
    }

    /// Ends the thread: reclaims what dead nodes left, drops every service still held and
    /// the node. Later calls do nothing and report nothing.
    pub fn shutdown(&self) {
        // Closing the channel ends the thread; joining it means its node and services are
        // gone when this returns.
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let t = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }

    /// The services held now.
    pub fn held(&self) -> Vec<String> {
        self.call(Cmd::Held).unwrap_or_default()
    }
}

/// A service the daemon holds, and the instances it holds it for.
/// A channel's services (its messages, and the event its publishers wake its subscribers
/// with) and the instances holding them.
type Held = (
    PortFactory<Ipc, [u8], ()>,
    iceoryx2::service::port_factory::event::PortFactory<Ipc>,
    BTreeSet<String>,
);

struct State {
    node: Node<Ipc>,
    cfg: Iox2,
    /// Service name -> (factory, instances holding it).
    services: BTreeMap<String, Held>,
    /// Instance -> its services.
    holds: BTreeMap<String, Vec<String>>,
}

impl State {
    fn serve(&mut self, rx: mpsc::Receiver<Cmd>) {
        while let Ok(cmd) = rx.recv() {
            match cmd {
                Cmd::Acquire(inst, chans, tx) => {
                    let r = self.acquire(&inst, &chans);
                    if r.is_err() {
                        self.drop_holds(&inst);
                    }
                    let _ = tx.send(r);
                }
                Cmd::Release(inst, tx) => {
                    let dead = self.scan();
                    self.drop_holds(&inst);
                    let _ = tx.send(dead);
                }
                Cmd::Scan(tx) => {
                    let _ = tx.send(self.scan());
                }
                Cmd::Held(tx) => {
                    let _ = tx.send(self.services.keys().cloned().collect());
                }
            }
        }
        // The daemon is going: reclaim what dead workloads left, then dropping the
        // factories removes the services.
        self.scan();
        self.services.clear();
    }

    fn acquire(&mut self, inst: &str, chans: &[ResolvedChannel]) -> Result<(), AcquireError> {
        for c in chans {
            let holds = self.holds.entry(inst.to_owned()).or_default();
            if holds.contains(&c.service) {
                continue;
            }
            if let Some((_, _, holders)) = self.services.get_mut(&c.service) {
                holders.insert(inst.to_owned());
                holds.push(c.service.clone());
                continue;
            }
            let depth = c.depth.max(1) as usize;
            let factory = self
                .node
                .service_builder(&service_name(&c.service)?)
                .publish_subscribe::<[u8]>()
                .max_publishers(MAX_PUBLISHERS)
                .max_subscribers(MAX_SUBSCRIBERS)
                .max_nodes(MAX_NODES)
                .subscriber_max_buffer_size(depth)
                .history_size(depth)
                .subscriber_max_borrowed_samples(depth.min(4))
                // Open when it exists: an adopted instance's workload kept it alive.
                .open_or_create()
                .map_err(|e| AcquireError::Create {
                    service: c.service.clone(),
                    reason: format!("{e:?}"),
                })?;
            let wake = self
                .node
                .service_builder(&service_name(&c.service)?)
                .event()
                .max_notifiers(MAX_PUBLISHERS)
                .max_listeners(MAX_SUBSCRIBERS)
                .max_nodes(MAX_NODES)
                .open_or_create()
                .map_err(|e| AcquireError::Create {
                    service: c.service.clone(),
                    reason: format!("its wake-up event: {e:?}"),
                })?;
            holds.push(c.service.clone());
            self.services.insert(
                c.service.clone(),
                (factory, wake, BTreeSet::from([inst.to_owned()])),
            );
        }
        Ok(())
    }

    fn drop_holds(&mut self, inst: &str) {
        for s in self.holds.remove(inst).unwrap_or_default() {
            if let Some((_, _, holders)) = self.services.get_mut(&s) {
                holders.remove(inst);
                if holders.is_empty() {
                    self.services.remove(&s);
                }
            }
        }
    }

    fn scan(&mut self) -> Vec<DeadPeer> {
        let cfg = match self.cfg.config() {
            Ok(c) => c,
            Err(_) => return Vec::new(),
        };
        let mut dead = Vec::new();
        let _ = Node::<Ipc>::list(&cfg, |state| {
            if let NodeState::Dead(view) = state {
                let (name, pid) = match view.details().as_ref() {
                    Some(d) => (d.name().to_string(), d.process_id().value()),
                    None => (String::new(), 0),
                };
                let cleanup_error = view
                    .blocking_remove_stale_resources(Duration::from_millis(500))
                    .err()
                    .map(|e| format!("{e:?}"));
                dead.push((name, pid, cleanup_error));
            }
            CallbackProgression::Continue
        });
        dead.into_iter()
            .map(|(node, pid, cleanup_error)| {
                // Workload nodes are named after their instance (cut at 128 bytes).
                let instance = self
                    .holds
                    .keys()
                    .find(|i| crate::node_name(i) == node)
                    .cloned()
                    .or_else(|| node.strip_prefix("bulkhead:").map(str::to_owned));
                let mut affected = Vec::new();
                if let Some(i) = &instance {
                    for s in self.holds.get(i).into_iter().flatten() {
                        for h in self.services.get(s).map(|x| &x.2).into_iter().flatten() {
                            affected.push((h.clone(), s.clone()));
                        }
                    }
                }
                DeadPeer {
                    node,
                    pid,
                    instance,
                    affected,
                    cleanup_error,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_core::channels::Direction;

    fn unique_iox2() -> Iox2 {
        Iox2 {
            prefix: Some(format!("iox2_bhtest{}_", std::process::id())),
            root: None,
            space: None,
        }
    }

    pub(super) fn shm_files(prefix: &str) -> Vec<String> {
        std::fs::read_dir("/dev/shm")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(prefix))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn ch(service: &str, dir: Direction) -> ResolvedChannel {
        ResolvedChannel {
            name: "x".into(),
            direction: dir,
            service: service.into(),
            max_payload: 4096,
            depth: 2,
        }
    }

    #[test]
    fn acquire_share_release_and_round_trip() {
        let iox2 = unique_iox2();
        let prefix = iox2.prefix.clone().unwrap();
        let m = Manager::start(iox2.clone()).unwrap();
        m.acquire("a", vec![ch("t/a/out", Direction::Output)])
            .unwrap();
        // A pipeline neighbour joins the same service.
        m.acquire("b", vec![ch("t/a/out", Direction::Input)])
            .unwrap();
        assert_eq!(m.held(), vec!["t/a/out".to_owned()]);
        {
            let host = crate::Host::new(&iox2).unwrap();
            let p = host.publisher("t/a/out", 16).unwrap();
            let s = host.subscriber("t/a/out", 2).unwrap();
            p.send(b"hi").unwrap();
            let got = s.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
            assert_eq!(&*got, b"hi");
            assert!(p.send(&[0u8; 17]).is_err(), "larger than max_payload");
            assert!(s.recv_timeout(Duration::from_millis(10)).unwrap().is_none());
            // A late subscriber gets the history once the publisher updates connections.
            p.send(b"h").unwrap();
            let late = host.subscriber("t/a/out", 2).unwrap();
            p.update_connections().unwrap();
            let got = late.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
            assert!(&*got == b"hi" || &*got == b"h", "{got:?}");
        }
        assert!(m.release("a").is_empty());
        assert_eq!(m.held().len(), 1, "b still holds it");
        m.release("b");
        assert!(m.held().is_empty());
        drop(m);
        assert_eq!(
            crate::leftover_files(&iox2),
            Vec::<std::path::PathBuf>::new()
        );
        // A channel not created by the daemon cannot be opened.
        let host = crate::Host::new(&iox2).unwrap();
        assert!(host.publisher("t/none", 16).is_err());
        drop(host);
        for f in shm_files(&prefix) {
            let _ = std::fs::remove_file(format!("/dev/shm/{f}"));
        }
    }
}

#[cfg(test)]
mod workload_tests {
    use super::*;
    use bulkhead_core::channels::Direction;

    #[test]
    fn host_to_workload_to_host() {
        let iox2 = Iox2 {
            prefix: Some(format!("iox2_bhwl{}_", std::process::id())),
            root: None,
            space: None,
        };
        round_trip(iox2, |_| ());
    }

    /// The same in a channel space: the manager, the host and the workload (which a
    /// wall would show the space at the usual paths; here its thread enters it) each on
    /// a thread of their own in the space; every file is the owner's, in the space, and
    /// nothing of it reaches the host's `/dev/shm`.
    #[test]
    fn host_to_workload_to_host_in_a_channel_space() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: entering a channel space needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let space = dir.path().join("space");
        let owner = 54_321;
        for d in [
            crate::space::shm_dir(&space),
            crate::space::root_dir(&space),
        ] {
            std::fs::create_dir_all(&d).unwrap();
            std::os::unix::fs::chown(&d, Some(owner), Some(owner)).unwrap();
        }
        let iox2 = Iox2 {
            prefix: Some(format!("iox2_bhsp{}_", std::process::id())),
            root: Some(dir.path().join("root")),
            space: Some(space.clone()),
        };
        let (sp, root) = (space.clone(), iox2.root_dir());
        let seen = round_trip(iox2.clone(), move |_| {
            crate::space::enter(&sp, &root).unwrap();
        });
        assert!(seen.iter().any(|(_, uid)| *uid == owner), "{seen:?}");
        assert!(seen.iter().all(|(_, uid)| *uid == owner), "{seen:?}");
        let prefix = iox2.prefix.unwrap();
        assert_eq!(super::tests::shm_files(&prefix), Vec::<String>::new());
    }

    /// A round trip through the manager's channels; `enter` runs first on the workload's
    /// thread. Returns the files (and their owners) of the installation while it ran.
    fn round_trip(
        iox2: Iox2,
        enter: impl FnOnce(()) + Send + 'static,
    ) -> Vec<(std::path::PathBuf, u32)> {
        use std::os::unix::fs::MetadataExt;
        let m = Manager::start(iox2.clone()).unwrap();
        let chans = vec![
            ResolvedChannel {
                name: "input".into(),
                direction: Direction::Input,
                service: "t/w/input".into(),
                max_payload: 1 << 20,
                depth: 4,
            },
            ResolvedChannel {
                name: "output".into(),
                direction: Direction::Output,
                service: "t/w/output".into(),
                max_payload: 1 << 20,
                depth: 4,
            },
        ];
        m.acquire("session:t:w", chans.clone()).unwrap();
        let vars: Vec<(String, String)> = chans
            .iter()
            .map(|c| (c.env_var(), c.env_value()))
            .chain([
                (
                    bulkhead_core::channels::ENV_IOX2_PREFIX.to_owned(),
                    iox2.prefix.clone().unwrap(),
                ),
                (
                    bulkhead_core::channels::ENV_IOX2_ROOT.to_owned(),
                    iox2.root_dir().display().to_string(),
                ),
                ("BULKHEAD_INSTANCE".to_owned(), "session:t:w".to_owned()),
            ])
            .collect();
        let (ready_tx, ready_rx) = mpsc::channel();
        let worker = std::thread::spawn(move || {
            enter(());
            let w = crate::Workload::from_vars(vars).unwrap();
            let rx = w.input("input").unwrap();
            let tx = w.output("output").unwrap();
            ready_tx.send(()).unwrap();
            let msg = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
            tx.send(&msg).unwrap();
            // Linger so that the host reads it from this publisher's memory.
            std::thread::sleep(Duration::from_millis(500));
        });
        ready_rx.recv().unwrap();
        let host = crate::Host::new(&iox2).unwrap();
        let p = host.publisher("t/w/input", 1 << 20).unwrap();
        let s = host.subscriber("t/w/output", 4).unwrap();
        p.send(b"ping").unwrap();
        let got = s.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(&*got, b"ping");
        drop(got);
        let seen: Vec<(std::path::PathBuf, u32)> = crate::leftover_files(&iox2)
            .into_iter()
            .filter_map(|p| std::fs::metadata(&p).ok().map(|m| (p, m.uid())))
            .collect();
        worker.join().unwrap();
        drop((p, s, host));
        m.release("session:t:w");
        drop(m);
        assert_eq!(
            crate::leftover_files(&iox2),
            Vec::<std::path::PathBuf>::new()
        );
        let prefix = iox2.prefix.unwrap();
        for f in super::tests::shm_files(&prefix) {
            let _ = std::fs::remove_file(format!("/dev/shm/{f}"));
        }
        seen
    }
}
