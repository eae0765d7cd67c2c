//! The data plane in the daemon: an instance's channels are created before its spawn,
//! handed over in its environment (and bound into its walls), and let go when the
//! instance ends; dead nodes are reclaimed and reported as `channel_peer_dead` events.
//!
//! **Channel spaces** (`bulkhead_sdk::space`). The channels of a walled instance (sandbox,
//! docker) live in its key scope's space, a tmpfs of its own at
//! `<state>/channels/<scope>` (`shared`, `ns.<namespace>`, `session.<session>`), sized
//! for the channels its instances declare ([`space_bytes`]), owned by the host user its
//! workloads run as (`core::channels::space_of`), mounted when the scope's first channel
//! instance starts and unmounted when its last one is final. The walls show its folders
//! at `/dev/shm` and iceoryx2's root, so a tenant lists, reads and writes only its own
//! scope's segments and service names, and what a workload writes there goes with the
//! space. Each space has its own `bulkhead_sdk::manager::Manager`, whose thread lives in
//! the space (a mount namespace of its own, the owner's file-system ids). Process
//! workloads (no wall) share the host's `/dev/shm` and iceoryx2 root, under one manager
//! that lives as long as the daemon; a pipeline cannot mix the two (refused). A warm slot
//! is made with a space of its own, which the launch of a new scope takes; a scope that
//! already has one gets it mounted into the slot at the hand-over
//! (`bulkhead_driver::warm::bind_into`). The file prefix comes from the state directory,
//! so two daemons never share channels.
//!
//! The manager's calls block (they create files), so they run on tokio's blocking pool.
//! Spaces are created and removed under one async lock: two first instances of a scope
//! never mount it twice, and the last one's removal never races a new acquire.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bulkhead_core::channels::{Space, ENV_IOX2_PREFIX, ENV_IOX2_ROOT};
use bulkhead_core::event::EventKind;
use bulkhead_core::key::InstanceId;
use bulkhead_core::sandbox::{IdBlocks, UserNamespace};
use bulkhead_sdk::manager::{DeadPeer, Manager};
use bulkhead_sdk::Iox2;

use crate::instance::Slot;
use crate::Shared;

/// How often the daemon looks for dead nodes besides when an instance ends.
const SCAN_PERIOD: Duration = Duration::from_secs(1);
/// What a space holds besides the channels' data: iceoryx2's management segments, the
/// service and node records (measured: under 1 MiB for a few channels; see the test).
const SPACE_BASE: u64 = 8 << 20;
/// The key of the host's space in [`DataPlane`].
const HOST: &str = "";

/// The iceoryx2 installation of a state directory: its own file prefix (so daemons with
/// different state directories never share or clean up each other's channels), and
/// iceoryx2's default root.
pub fn iox2_for(state_dir: &Path) -> Iox2 {
    // FNV-1a: stable across builds, so a restarted daemon finds its channels again.
    let mut h: u32 = 0x811c_9dc5;
    for b in state_dir.as_os_str().as_encoded_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    Iox2 {
        prefix: Some(format!("iox2_bh{h:08x}_")),
        root: None,
        space: None,
    }
}

/// The folder that holds the channel spaces of a state directory.
pub(crate) fn spaces_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("channels")
}

/// The bytes one instance's channels may need in a space: per channel, every sample a
/// publisher can have out at once (the subscribers' queues, the history, the loans) at the
/// largest payload, for each publisher a channel admits; twice over, for iceoryx2's
/// alignment and headers.
pub(crate) fn space_bytes(channels: &[bulkhead_core::channels::ResolvedChannel]) -> u64 {
    use bulkhead_sdk::manager::{MAX_PUBLISHERS, MAX_SUBSCRIBERS};
    channels
        .iter()
        .map(|c| {
            let samples = u64::from(c.depth.max(1)) * (MAX_SUBSCRIBERS as u64 + 2) + 2;
            c.max_payload.max(1) * samples * MAX_PUBLISHERS as u64 * 2
        })
        .sum()
}

/// One space: its manager and who uses it.
struct SpaceEntry {
    manager: Arc<Manager>,
    /// `None`: the host's.
    dir: Option<PathBuf>,
    owner: (u32, u32),
    /// Instance -> (its services, the bytes its channels may need).
    instances: BTreeMap<String, (BTreeSet<String>, u64)>,
    /// The tmpfs size now.
    size: u64,
}

/// The daemon's data plane: its spaces, and the host id ranges of its tenants.
#[derive(Default)]
pub(crate) struct DataPlane {
    spaces: tokio::sync::Mutex<BTreeMap<String, SpaceEntry>>,
    scanner: std::sync::OnceLock<()>,
}

/// One instance's hold on its tenant's host id range; given back when dropped.
pub(crate) struct IdHold {
    sh: Weak<Shared>,
    pub(crate) tenant: String,
    pub ids: UserNamespace,
}

impl IdHold {
    /// A hold on `ids`, already acquired for `tenant` (a warm slot's).
    pub(crate) fn new(sh: &Arc<Shared>, tenant: String, ids: UserNamespace) -> IdHold {
        IdHold {
            sh: Arc::downgrade(sh),
            tenant,
            ids,
        }
    }
}

impl Drop for IdHold {
    fn drop(&mut self) {
        if let Some(sh) = self.sh.upgrade() {
            sh.ids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .release(&self.tenant);
        }
    }
}

impl Shared {
    /// The host id range of `slot`'s tenant, reserved for it until the hold is dropped
    /// (`None`: the workload maps no range of its own).
    pub(crate) fn reserve_ids(self: &Arc<Self>, slot: &Slot) -> Result<Option<IdHold>, String> {
        if !bulkhead_core::channels::needs_ids(&slot.spec()) {
            return Ok(None);
        }
        let tenant = bulkhead_core::channels::ids_tenant(&slot.id, &slot.spec());
        let ids = self
            .ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .acquire(&tenant)
            .map_err(|e| e.to_string())?;
        Ok(Some(IdHold {
            sh: Arc::downgrade(self),
            tenant,
            ids,
        }))
    }
}

/// The id ranges `user_namespace: auto` hands out (the sandbox driver's defaults).
pub(crate) fn id_blocks() -> std::sync::Mutex<IdBlocks> {
    std::sync::Mutex::new(IdBlocks::new(
        bulkhead_core::sandbox::AUTO_ID_BASE,
        bulkhead_core::sandbox::AUTO_ID_BLOCKS,
    ))
}

async fn scanner(sh: Weak<Shared>) {
    loop {
        tokio::time::sleep(SCAN_PERIOD).await;
        let Some(sh) = sh.upgrade() else { return };
        if sh.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        for m in sh.dataplane.managers().await {
            if let Ok(dead) = tokio::task::spawn_blocking(move || m.scan()).await {
                report(&sh, dead);
            }
        }
    }
}

impl DataPlane {
    async fn managers(&self) -> Vec<Arc<Manager>> {
        self.spaces
            .lock()
            .await
            .values()
            .map(|e| e.manager.clone())
            .collect()
    }

    async fn manager_of(&self, id: &str) -> Option<Arc<Manager>> {
        self.spaces
            .lock()
            .await
            .values()
            .find(|e| e.instances.contains_key(id))
            .map(|e| e.manager.clone())
    }

    /// Ends every manager (their services are removed) and unmounts every space.
    pub(crate) async fn shutdown(&self) {
        let entries = std::mem::take(&mut *self.spaces.lock().await);
        for (_, e) in entries {
            let SpaceEntry { manager, dir, .. } = e;
            let _ = tokio::task::spawn_blocking(move || {
                manager.shutdown();
                drop(manager);
                if let Some(d) = dir {
                    remove_space(&d);
                }
            })
            .await;
        }
    }
}

/// A channel space made with a warm slot, before the slot's tenant is known: a tmpfs at
/// `<state>/channels/warm.<n>` with its manager, owned by the host user the slot's
/// workload will run as (the slot's ids). The slot shows its folders from the start; the
/// launch that takes the slot makes it its scope's space ([`acquire`]: bound at the
/// scope's path, the warm path unmounted), so that the space's mount, sizing and manager
/// (most of a channel launch's cost) are off the launch's path. Unused (the scope has a
/// space already, the slot is discarded), it is removed when dropped; one a crashed
/// daemon left goes with the start-up sweep (no scope has its name).
pub(crate) struct WarmSpace {
    manager: Option<Arc<Manager>>,
    dir: PathBuf,
    owner: (u32, u32),
    size: u64,
}

impl WarmSpace {
    /// What the slot shows: the space's folders at `/dev/shm` and iceoryx2's root.
    pub(crate) fn binds(&self, sh: &Shared) -> Vec<bulkhead_driver::Bind> {
        space_binds(&self.dir, &iox2_for(&sh.cfg.state_dir))
    }
}

impl WarmSpace {
    /// Removes it (its manager ends, the tmpfs is unmounted), off the async threads.
    pub(crate) async fn remove(mut self) {
        let Some(manager) = self.manager.take() else {
            return;
        };
        let dir = std::mem::take(&mut self.dir);
        let _ = tokio::task::spawn_blocking(move || {
            manager.shutdown();
            drop(manager);
            remove_space(&dir);
        })
        .await;
    }
}

impl Drop for WarmSpace {
    fn drop(&mut self) {
        let Some(manager) = self.manager.take() else {
            return;
        };
        let dir = std::mem::take(&mut self.dir);
        let remove = move || {
            manager.shutdown();
            drop(manager);
            remove_space(&dir);
        };
        // Off the async threads when there are some (it joins a thread and unmounts).
        match tokio::runtime::Handle::try_current() {
            Ok(h) => drop(h.spawn_blocking(remove)),
            Err(_) => remove(),
        }
    }
}

/// A space for a warm slot of `spec`, whose instances will run as `ids` map (or as the
/// spec says): `None` when the workload has no channels or uses the host's.
pub(crate) async fn make_warm_space(
    sh: &Arc<Shared>,
    spec: &bulkhead_core::spec::WorkloadSpec,
    ids: Option<UserNamespace>,
) -> Result<Option<WarmSpace>, String> {
    if spec.channels.is_none() {
        return Ok(None);
    }
    let daemon = (
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
    );
    // The owner does not depend on the key; any key of the workload serves.
    let key =
        bulkhead_core::key::Key::new(&spec.name, bulkhead_core::key::Isolation::None, None, None)
            .map_err(|e| e.to_string())?;
    let owner = match bulkhead_core::channels::space_of(spec, &key, ids, daemon)? {
        Some(Space::Scope { uid, gid, .. }) => (uid, gid),
        _ => return Ok(None),
    };
    let dir = spaces_dir(&sh.cfg.state_dir).join(format!("warm.{}", sh.next_seq()));
    let iox2 = Iox2 {
        root: Some(PathBuf::from(bulkhead_sdk::DEFAULT_ROOT)),
        space: Some(dir.clone()),
        ..iox2_for(&sh.cfg.state_dir)
    };
    let d2 = dir.clone();
    let manager = tokio::task::spawn_blocking(move || {
        make_space(&d2, owner, SPACE_BASE)?;
        Manager::start(iox2).map_err(|e| {
            remove_space(&d2);
            e.to_string()
        })
    })
    .await
    .map_err(|e| format!("data plane: {e}"))??;
    if sh.dataplane.scanner.set(()).is_ok() {
        tokio::spawn(scanner(Arc::downgrade(sh)));
    }
    Ok(Some(WarmSpace {
        manager: Some(Arc::new(manager)),
        dir,
        owner,
        size: SPACE_BASE,
    }))
}

/// The binds that show space `dir` (`None`: the host's) at `/dev/shm` and iceoryx2's
/// root.
fn space_binds(dir: &Path, base: &Iox2) -> Vec<bulkhead_driver::Bind> {
    vec![
        bulkhead_driver::Bind {
            source: bulkhead_sdk::space::shm_dir(dir),
            target: PathBuf::from("/dev/shm"),
        },
        bulkhead_driver::Bind {
            source: bulkhead_sdk::space::root_dir(dir),
            target: base.root_dir(),
        },
    ]
}

/// Makes `warm`'s space the one at `dir` (the scope's): bound there, the warm path
/// unmounted and removed. Blocking, short.
fn rebind_space(warm: &Path, dir: &Path) -> Result<(), String> {
    let err = |what: &str, e: &dyn std::fmt::Display| {
        format!(
            "cannot make channel space {} the one of {}: {what}: {e}",
            warm.display(),
            dir.display()
        )
    };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(err("mkdir", &e)),
    }
    rustix::mount::mount_bind(warm, dir).map_err(|e| err("bind", &e))?;
    remove_space(warm);
    Ok(())
}

/// Creates `slot`'s channels in its space; returns the variables and the binds the
/// instance needs. `warm`: the space a warm slot was made with, which becomes the
/// scope's if the scope has none (the binds returned are then the slot's own); otherwise
/// it is dropped (removed).
pub(crate) async fn acquire(
    sh: &Arc<Shared>,
    slot: &Slot,
    ids: Option<UserNamespace>,
    warm: Option<WarmSpace>,
) -> Result<(Vec<(String, String)>, Vec<bulkhead_driver::Bind>), String> {
    if slot.spec().channels.is_none() {
        return Ok((Vec::new(), Vec::new()));
    }
    let mut warm = warm;
    let channels = slot.view.borrow().channels.clone();
    let daemon = (
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
    );
    let space = bulkhead_core::channels::space_of(&slot.spec(), &slot.key, ids, daemon)?
        .unwrap_or(Space::Host);
    let base = iox2_for(&sh.cfg.state_dir);
    let (name, owner) = match &space {
        Space::Host => (HOST.to_owned(), daemon),
        Space::Scope { name, uid, gid } => (name.clone(), (*uid, *gid)),
    };
    let id = slot.id.to_string();
    let services: BTreeSet<String> = channels.iter().map(|c| c.service.clone()).collect();
    let bytes = space_bytes(&channels);

    let mut spaces = sh.dataplane.spaces.lock().await;
    // A pipeline connects instances of one space only.
    for (other, e) in spaces.iter().filter(|(n, _)| **n != name) {
        for (inst, (held, _)) in &e.instances {
            if let Some(s) = held.intersection(&services).next() {
                return Err(format!(
                    "channel {s} is held by {inst} in {}: a pipeline cannot connect the \
                     process driver's channels (the host's) with a walled driver's (its \
                     scope's space)",
                    if other.is_empty() {
                        "the host's space".to_owned()
                    } else {
                        format!("space {other}")
                    }
                ));
            }
        }
    }
    // The slot's space becomes the scope's when the scope has none and it belongs to
    // the same user; the slot then already shows it.
    let mut shown = None;
    if let Some(mut w) =
        warm.take_if(|w| !name.is_empty() && !spaces.contains_key(&name) && w.owner == owner)
    {
        let dir = spaces_dir(&sh.cfg.state_dir).join(&name);
        let (from, to) = (w.dir.clone(), dir.clone());
        tokio::task::spawn_blocking(move || rebind_space(&from, &to))
            .await
            .map_err(|e| format!("data plane: {e}"))??;
        shown = Some(w.binds(sh));
        tracing::info!("channel space {name}: the one made with its warm slot");
        let manager = w.manager.take().expect("a warm space has its manager");
        spaces.insert(
            name.clone(),
            SpaceEntry {
                manager,
                dir: Some(dir),
                owner,
                instances: BTreeMap::new(),
                size: w.size,
            },
        );
    }
    // Not used: removed (off the runtime's threads), after the lock.
    let unused = warm;
    if !spaces.contains_key(&name) {
        let dir = (!name.is_empty()).then(|| spaces_dir(&sh.cfg.state_dir).join(&name));
        let iox2 = Iox2 {
            root: dir
                .as_ref()
                .map(|_| PathBuf::from(bulkhead_sdk::DEFAULT_ROOT)),
            space: dir.clone(),
            ..base.clone()
        };
        let size = SPACE_BASE + bytes;
        let d2 = dir.clone();
        let manager = tokio::task::spawn_blocking(move || {
            if let Some(d) = &d2 {
                make_space(d, owner, size)?;
            }
            Manager::start(iox2).map_err(|e| {
                if let Some(d) = &d2 {
                    remove_space(d);
                }
                e.to_string()
            })
        })
        .await
        .map_err(|e| format!("data plane: {e}"))??;
        spaces.insert(
            name.clone(),
            SpaceEntry {
                manager: Arc::new(manager),
                dir,
                owner,
                instances: BTreeMap::new(),
                size,
            },
        );
        if sh.dataplane.scanner.set(()).is_ok() {
            tokio::spawn(scanner(Arc::downgrade(sh)));
        }
    }
    let entry = spaces.get_mut(&name).expect("inserted above");
    if entry.owner != owner && !name.is_empty() {
        return Err(format!(
            "the channel space of {name} belongs to host uid {} (its running instances), \
             and this workload would run as uid {}: iceoryx2's files are private to their \
             owner, so every walled workload of one scope with channels must run as the \
             same host user",
            entry.owner.0, owner.0
        ));
    }
    entry.instances.insert(id.clone(), (services, bytes));
    if let Some(d) = entry.dir.clone() {
        // Room for what every instance of the space may need now (never below what is
        // used: the kernel refuses that, and the old size stays).
        let want = SPACE_BASE + entry.instances.values().map(|(_, b)| b).sum::<u64>();
        if want > entry.size {
            let d2 = d.clone();
            let ok = tokio::task::spawn_blocking(move || resize_space(&d2, want))
                .await
                .map_err(|e| format!("data plane: {e}"))?;
            match ok {
                Ok(()) => entry.size = want,
                Err(e) => tracing::warn!("channel space {}: {e}", d.display()),
            }
        }
    }
    let m = entry.manager.clone();
    let dir = entry.dir.clone();
    let id2 = id.clone();
    let r = tokio::task::spawn_blocking(move || m.acquire(&id2, channels))
        .await
        .map_err(|e| format!("data plane: {e}"));
    if !matches!(r, Ok(Ok(()))) {
        entry.instances.remove(&id);
    }
    r?.map_err(|e| e.to_string())?;
    drop(spaces);
    drop(unused);

    let mut env: Vec<(String, String)> = slot
        .view
        .borrow()
        .channels
        .iter()
        .map(|c| (c.env_var(), c.env_value()))
        .collect();
    if let Some(p) = &base.prefix {
        env.push((ENV_IOX2_PREFIX.into(), p.clone()));
    }
    env.push((ENV_IOX2_ROOT.into(), base.root_dir().display().to_string()));
    // Walls that hide the host's files must let iceoryx2's through at the same paths:
    // the space's folders, or the host's own directories.
    let binds = match (&dir, shown) {
        (_, Some(shown)) => shown,
        (Some(d), None) => space_binds(d, &base),
        (None, None) => vec![
            bulkhead_driver::Bind::same("/dev/shm"),
            bulkhead_driver::Bind::same(base.root_dir()),
        ],
    };
    slot.view.send_modify(|v| {
        v.iox2 = Some((
            base.prefix.clone(),
            Some(base.root_dir().display().to_string()),
            dir.as_ref().map(|d| d.display().to_string()),
        ));
    });
    Ok((env, binds))
}

/// Mounts a space: a tmpfs of `size` bytes at `dir` (the daemon's only: mode 0700),
/// with `shm/` and `iox2/` owned by `owner`, mode 0700. A space left mounted by the last
/// daemon (an adopted container still uses it) is used again as it is.
fn make_space(dir: &Path, owner: (u32, u32), size: u64) -> Result<(), String> {
    let err = |what: &str, e: &dyn std::fmt::Display| {
        format!("cannot make channel space {}: {what}: {e}", dir.display())
    };
    let parent = dir.parent().unwrap_or(dir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .map_err(|e| err("its parent", &e))?;
    if !is_mount_point(dir) {
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(err("mkdir", &e)),
        }
        use rustix::mount::MountFlags;
        rustix::mount::mount(
            "bulkhead-channels",
            dir,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            Some(c"mode=0700"),
        )
        .map_err(|e| err("mount tmpfs", &e))?;
        resize_space(dir, size).map_err(|e| err("size", &e))?;
    }
    for sub in [
        bulkhead_sdk::space::shm_dir(dir),
        bulkhead_sdk::space::root_dir(dir),
    ] {
        match std::fs::DirBuilder::new().mode(0o700).create(&sub) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(err("mkdir", &e)),
        }
        std::os::unix::fs::chown(&sub, Some(owner.0), Some(owner.1))
            .map_err(|e| err("chown", &e))?;
    }
    Ok(())
}

fn resize_space(dir: &Path, size: u64) -> Result<(), String> {
    use rustix::mount::MountFlags;
    let data = std::ffi::CString::new(format!("size={size},mode=0700")).expect("no NUL");
    rustix::mount::mount_remount(
        dir,
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        data.as_c_str(),
    )
    .map_err(|e| format!("cannot resize to {size} bytes: {e}"))
}

fn is_mount_point(dir: &Path) -> bool {
    let (Ok(d), Ok(p)) = (
        std::fs::symlink_metadata(dir),
        std::fs::symlink_metadata(dir.join("..")),
    ) else {
        return false;
    };
    d.dev() != p.dev()
}

/// Unmounts a space (detached: a container that still shows it keeps its view until it
/// goes) and removes its folder.
fn remove_space(dir: &Path) {
    if is_mount_point(dir) {
        if let Err(e) = rustix::mount::unmount(dir, rustix::mount::UnmountFlags::DETACH) {
            tracing::warn!("cannot unmount channel space {}: {e}", dir.display());
            return;
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("cannot remove channel space {}: {e}", dir.display());
        }
    }
}

/// At start-up, after recovery: removes the spaces a daemon that crashed left. Only an
/// adopted container can still use one (a sandbox dies with its daemon; an instance that
/// is started again gets its space made anew).
pub(crate) fn sweep(sh: &Shared) {
    let keep: BTreeSet<String> = sh
        .list()
        .iter()
        .filter(|s| s.spec().driver == bulkhead_core::spec::DriverKind::Docker)
        .filter(|s| !s.view.borrow().state.is_terminal())
        .filter(|s| s.spec().channels.is_some())
        .map(|s| bulkhead_core::channels::space_name(&s.key))
        .collect();
    let Ok(rd) = std::fs::read_dir(spaces_dir(&sh.cfg.state_dir)) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !keep.contains(&name) {
            tracing::info!("removing channel space {name}, left by the last daemon");
            remove_space(&e.path());
        }
    }
}

/// After a run ended (every process gone): reclaim and report what dead nodes left.
pub(crate) async fn after_exit(sh: &Arc<Shared>, slot: &Slot) {
    if slot.spec().channels.is_none() {
        return;
    }
    let Some(m) = sh.dataplane.manager_of(slot.id.as_str()).await else {
        return;
    };
    if let Ok(dead) = tokio::task::spawn_blocking(move || m.scan()).await {
        report(sh, dead);
    }
}

/// The instance is final: reclaim dead nodes, then let go of its channels; the last
/// instance of a space takes the space with it.
pub(crate) async fn release(sh: &Arc<Shared>, slot: &Slot) {
    if slot.spec().channels.is_none() {
        return;
    }
    let id = slot.id.to_string();
    let mut spaces = sh.dataplane.spaces.lock().await;
    let Some((name, entry)) = spaces
        .iter_mut()
        .find(|(_, e)| e.instances.contains_key(&id))
    else {
        return;
    };
    let name = name.clone();
    let m = entry.manager.clone();
    let id2 = id.clone();
    if let Ok(dead) = tokio::task::spawn_blocking(move || m.release(&id2)).await {
        report(sh, dead);
    }
    entry.instances.remove(&id);
    if entry.instances.is_empty() && entry.dir.is_some() {
        if let Some(SpaceEntry { manager, dir, .. }) = spaces.remove(&name) {
            let _ = tokio::task::spawn_blocking(move || {
                manager.shutdown();
                drop(manager);
                if let Some(d) = dir {
                    remove_space(&d);
                }
            })
            .await;
        }
    }
}

/// One `channel_peer_dead` event per instance that shared a channel with a dead node.
fn report(sh: &Shared, dead: Vec<DeadPeer>) {
    for d in dead {
        let peer = d.instance.clone().unwrap_or_else(|| d.node.clone());
        tracing::info!(
            "data plane: node {:?} (pid {}) died; {}",
            d.node,
            d.pid,
            match &d.cleanup_error {
                None => "its shared memory was reclaimed".to_owned(),
                Some(e) => format!("cleanup failed: {e}"),
            }
        );
        for (holder, channel) in d.affected {
            let Ok((id, _)) = InstanceId::parse(&holder) else {
                continue;
            };
            sh.events.publish(
                &id,
                EventKind::ChannelPeerDead {
                    channel,
                    peer: peer.clone(),
                    reclaimed: d.cleanup_error.is_none(),
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_space_is_sized_for_every_sample_its_channels_can_have_out() {
        use bulkhead_core::channels::{Direction, ResolvedChannel};
        let ch = |max_payload, depth| ResolvedChannel {
            name: "c".into(),
            direction: Direction::Output,
            service: "s".into(),
            max_payload,
            depth,
        };
        // max_payload x (depth x (4 subscribers + 2) + 2) x 2 publishers x 2.
        assert_eq!(super::space_bytes(&[ch(1024, 4)]), 1024 * 26 * 4);
        assert_eq!(
            super::space_bytes(&[ch(1024, 4), ch(1 << 20, 1)]),
            1024 * 26 * 4 + (1 << 20) * 8 * 4
        );
        assert_eq!(super::space_bytes(&[]), 0);
    }

    #[test]
    fn prefix_is_stable_per_state_dir() {
        let a = super::iox2_for(std::path::Path::new("/var/lib/bulkhead"));
        let b = super::iox2_for(std::path::Path::new("/var/lib/bulkhead"));
        let c = super::iox2_for(std::path::Path::new("/tmp/other"));
        assert_eq!(a, b);
        assert_ne!(a.prefix, c.prefix);
        let p = a.prefix.unwrap();
        assert_eq!(a.space, None);
        assert!(
            p.starts_with("iox2_bh") && p.ends_with('_') && p.len() == 16,
            "{p}"
        );
    }
}
