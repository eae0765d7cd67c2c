//! Warm slots of the docker driver (`warm:`): containers created and started ahead of
//! their launch, whose first process is a small init of ours waiting for the program.
//!
//! **The init** (`init/main.rs`) is a static executable built by this crate's build
//! script (std only, `+crt-static`: it runs in any image, busybox's included) and
//! embedded here. The driver writes it once to a host file (`/run/bulkhead` as root,
//! else `$XDG_RUNTIME_DIR/bulkhead`, named after its hash) and each slot container gets it
//! read-only at [`INIT_TARGET`].
//!
//! **A slot** ([`Driver::prewarm`](bulkhead_driver::Driver::prewarm)): the image is
//! resolved as for a cold spawn; the driver listens on a Unix socket in the slot's own
//! directory (the first directory among [`WarmSpec::binds`], shown at the same path);
//! the container is created from the cold spawn's configuration (labels plus
//! `bulkhead.warm=<slot>` and an empty `bulkhead.instance`, limits, binds, user, working
//! directory, `init:`, `$PORT` published) with the init as its entrypoint and no
//! environment of its own; its output is attached, it is started, and the init's
//! connection is accepted (only from a process of that container, checked through its
//! cgroup) and the socket file removed. The slot then holds that connection, a pidfd on
//! the container's first process and the output pipes. Its memory is its cgroup's
//! usage.
//!
//! **The hand-over** ([`Driver::spawn_warm`](bulkhead_driver::Driver::spawn_warm)):
//! directories the launch binds that the slot does not show (the tenant's channel space)
//! are mounted into the container's mount namespace through its first process's pidfd
//! ([`bulkhead_driver::warm::bind_into`]); the container is then renamed
//! `bulkhead-<short id>-<instance id, escaped>`, which ties it to the instance durably (labels cannot change; the name is what
//! [`recover`](bulkhead_driver::Driver::recover) reads back); then the init gets argv
//! (the image's entrypoint, or `docker.entrypoint`, in front of the command, as the engine
//! would run it) and the environment (the spec's, without what the daemon inherited, so
//! that the image's `ENV` applies), merges it over its own and execs; an exec failure
//! comes back as its errno ([`SpawnError::Exec`], as a cold spawn reports a missing
//! program), a success as the end of the connection (close-on-exec). The handle is the
//! cold spawn's [`Container`]: pid, exit status, OOM detection, stats, logs unchanged;
//! `exec` through the engine gets the handed-over environment (the container's own is
//! the slot's).
//!
//! **Recovery**: a container of this daemon with the warm label and no claimed name is
//! an unclaimed slot: it is removed (it is no run). Its init also exits by itself when
//! the driver's end of the connection closes (a daemon killed with -9), so a slot never
//! runs on unseen. A claimed one is found as its instance's run, like a cold one.

use std::any::Any;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, InspectContainerOptions,
    RemoveContainerOptions, RenameContainerOptions, StartContainerOptions,
};
use bollard::Docker;
use bulkhead_core::key::InstanceId;
use bulkhead_core::spec::WorkloadSpec;
use bulkhead_driver::warm::{Warm, WarmSpec};
use bulkhead_driver::{sys, Bind, SpawnError, SpawnSpec, Spawned};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::driver::{container_config, copy_output, short_id, Cgroup, Container, Main, Pipes};
use crate::engine::{EventSink, LABEL_INSTANCE, LABEL_WARM};
use crate::DockerDriver;

#[allow(dead_code)] // the decoder is the init's; the driver encodes
#[path = "../init/proto.rs"]
mod proto;

/// The init, as the build script made it (empty where it could not be built).
static INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/bulkhead-warm-init"));

/// Where a slot container sees the init.
pub const INIT_TARGET: &str = "/sbin/bulkhead-warm-init";

/// How long a new slot's init may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the init may take to answer a hand-over.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);
/// The prefix of a claimed slot container's name.
const CLAIMED_PREFIX: &str = "bulkhead-";
/// `sun_path`'s size, its NUL included.
const SUN_PATH_MAX: usize = 108;

/// The directory the init is written to.
fn init_dir() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/run/bulkhead");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("bulkhead"),
        _ => std::env::temp_dir().join(format!("bulkhead-{}", rustix::process::getuid().as_raw())),
    }
}

/// Writes the init to `dir` (once per content: the file is named after its hash and
/// replaced atomically); returns its path.
pub(crate) fn install_init(dir: &Path) -> std::io::Result<PathBuf> {
    use sha2::Digest;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if INIT.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "this build has no warm-slot init (not built for Linux)",
        ));
    }
    let hash = sha2::Sha256::digest(INIT);
    let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join(format!("warm-init-{hex}"));
    if std::fs::read(&path).is_ok_and(|b| b == INIT) {
        remove_old_inits(dir, &hex);
        return Ok(path);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)?;
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".warm-init-{hex}.{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(&tmp)?;
        f.write_all(INIT)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    remove_old_inits(dir, &hex);
    Ok(path)
}

/// Removes the inits of other builds (`warm-init-<other hash>`, and their temporary files
/// a crash left), so that upgrades do not pile them up. Containers that still run one
/// keep it: a bind mount holds the file, not its name. Nothing of this build's hash is
/// touched (another spawn of this daemon may be writing it).
fn remove_old_inits(dir: &Path, hex: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name
            .strip_prefix("warm-init-")
            .or_else(|| name.strip_prefix(".warm-init-"))
        else {
            continue;
        };
        if !rest.starts_with(hex) {
            if let Err(err) = std::fs::remove_file(e.path()) {
                tracing::debug!("cannot remove an old warm-slot init {name}: {err}");
            }
        }
    }
}

/// The name a claimed slot container takes: `bulkhead-<short id>-<instance>`, the
/// instance id escaped (`:` as `_c`, `_` as `_u`, anything else outside `[A-Za-z0-9.-]`
/// as `_x` and two hex digits) so that it is a valid container name and reads back.
pub fn claimed_name(container_id: &str, instance: &str) -> String {
    let mut out = format!("{CLAIMED_PREFIX}{}-", short_id(container_id));
    for b in instance.bytes() {
        match b {
            b':' => out.push_str("_c"),
            b'_' => out.push_str("_u"),
            b if b.is_ascii_alphanumeric() || b == b'.' || b == b'-' => out.push(b as char),
            b => out.push_str(&format!("_x{b:02x}")),
        }
    }
    out
}

/// The instance id a claimed slot container's name carries (`/name` as the engine lists
/// it, or `name`); `None` for any other name.
pub fn instance_of_name(name: &str) -> Option<String> {
    let name = name.strip_prefix('/').unwrap_or(name);
    let rest = name.strip_prefix(CLAIMED_PREFIX)?;
    let (short, escaped) = rest.split_at_checked(12)?;
    if !short.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let escaped = escaped.strip_prefix('-')?;
    let mut out = Vec::new();
    let mut bytes = escaped.bytes();
    while let Some(b) = bytes.next() {
        if b != b'_' {
            out.push(b);
            continue;
        }
        match bytes.next()? {
            b'c' => out.push(b':'),
            b'u' => out.push(b'_'),
            b'x' => {
                let hex = [bytes.next()?, bytes.next()?];
                let hex = std::str::from_utf8(&hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
            }
            _ => return None,
        }
    }
    let id = String::from_utf8(out).ok()?;
    (!id.is_empty()).then_some(id)
}

/// A prepared container, waiting for its program.
pub struct DockerSlot {
    slot: String,
    id: String,
    client: Docker,
    conn: Option<tokio::net::UnixStream>,
    main: Option<Main>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    /// What the engine would run before the command.
    entrypoint: Vec<String>,
    /// The workload as the slot was made for it: a launch of another version (the
    /// manifest changed) does not take it.
    spec: Arc<WorkloadSpec>,
    port: u16,
    binds: Vec<Bind>,
    memory_limit: Option<u64>,
    pids_limit: Option<u32>,
    /// Set once the container is someone's (handed over, or removed): no removal on drop.
    done: bool,
}

impl DockerSlot {
    /// The container id.
    pub fn id(&self) -> &str {
        &self.id
    }

    async fn remove(&mut self) {
        self.done = true;
        self.conn = None;
        if let Err(e) = remove_container(&self.client, &self.id).await {
            tracing::warn!("cannot remove warm slot {} ({}): {e}", self.slot, self.id);
        }
    }
}

impl Drop for DockerSlot {
    /// A slot dropped without `discard` still goes: its init exits when the connection
    /// closes, and the container is removed in the background.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (client, id) = (self.client.clone(), self.id.clone());
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                let _ = remove_container(&client, &id).await;
            });
        }
    }
}

async fn remove_container(client: &Docker, id: &str) -> Result<(), bollard::errors::Error> {
    let opts = RemoveContainerOptions {
        force: true,
        v: true,
        link: false,
    };
    match client.remove_container(id, Some(opts)).await {
        Ok(())
        | Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether `fd` polls as readable or hung up right now.
fn ready_now(fd: impl AsFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_fd().as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the call's duration; timeout 0 does not block.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents != 0
}

#[async_trait]
impl Warm for DockerSlot {
    fn memory(&self) -> u64 {
        self.main
            .as_ref()
            .and_then(|m| m.cgroup.as_ref())
            .map_or(0, |cg| {
                cg.read(self.memory_limit, self.pids_limit).memory_bytes
            })
    }

    /// The container's first process lives (its pidfd is not readable) and the init
    /// still holds its connection (nothing readable, no hang-up: it sends nothing before
    /// the hand-over).
    fn alive(&self) -> bool {
        let (Some(conn), Some(main)) = (&self.conn, &self.main) else {
            return false;
        };
        !self.done && !ready_now(&main.pidfd) && !ready_now(conn)
    }

    async fn discard(mut self: Box<Self>) {
        self.remove().await;
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

/// What went wrong in a hand-over.
#[derive(Debug)]
enum HandOver {
    Exec(i32),
    Failed(String),
}

/// Sends `msg` and reads the init's answer to its end.
async fn hand_over(conn: &mut tokio::net::UnixStream, msg: &[u8]) -> Result<(), HandOver> {
    let io = |what: &str, e: std::io::Error| HandOver::Failed(format!("{what}: {e}"));
    conn.write_all(msg)
        .await
        .map_err(|e| io("cannot send the program to the slot's init", e))?;
    let mut first = [0u8; 1];
    let n = conn
        .read(&mut first)
        .await
        .map_err(|e| io("cannot read the slot's init", e))?;
    match (n, first[0]) {
        (0, _) => {
            return Err(HandOver::Failed(
                "the slot's init ended before it took the program".into(),
            ))
        }
        (_, proto::REPLY_STARTING) => {}
        (_, proto::REPLY_BAD_MESSAGE) => {
            return Err(HandOver::Failed(
                "the slot's init refused the hand-over message".into(),
            ))
        }
        (_, b) => {
            return Err(HandOver::Failed(format!(
                "unexpected reply {b} from the init"
            )))
        }
    }
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest)
        .await
        .map_err(|e| io("cannot read the slot's init", e))?;
    match rest.as_slice() {
        [] => Ok(()),
        [proto::REPLY_EXEC_FAILED, a, b, c, d] => {
            Err(HandOver::Exec(i32::from_le_bytes([*a, *b, *c, *d])))
        }
        other => Err(HandOver::Failed(format!(
            "unexpected reply {other:?} from the init"
        ))),
    }
}

/// The directory the slot's socket goes in: the first bind that is a directory.
fn socket_dir(ws: &WarmSpec) -> Option<&Bind> {
    ws.binds
        .iter()
        .find(|b| b.source == b.target && b.source.is_dir())
}

/// Whether `b` is inside one of the slot's binds, at the matching place.
fn within_binds(b: &Bind, slot: &[Bind]) -> bool {
    slot.iter().any(|s| {
        b.source
            .strip_prefix(&s.source)
            .is_ok_and(|rel| b.target == s.target.join(rel))
    })
}

fn port_of(env: &[(String, String)]) -> Option<u16> {
    env.iter()
        .find(|(k, _)| k == "PORT")
        .and_then(|(_, v)| v.parse().ok())
}

/// Whether `pid` runs in container `id`, whose first process is `first`: its cgroup
/// names the container, or it is that process or its child (`docker-init`'s), for a
/// daemon that does not see the host's cgroup paths.
fn in_container(pid: u32, id: &str, first: u32) -> bool {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    cg.lines().any(|l| l.contains(id))
        || pid == first
        || sys::read_stat(pid).is_ok_and(|st| st.ppid == first)
}

impl DockerDriver {
    /// The init's host path, written on first use.
    async fn init_path(&self) -> Result<PathBuf, SpawnError> {
        self.init
            .get_or_try_init(|| async {
                let dir = init_dir();
                tokio::task::spawn_blocking(move || install_init(&dir).map_err(|e| (dir, e)))
                    .await
                    .map_err(|e| SpawnError::Engine {
                        reason: format!("cannot install the warm-slot init: {e}"),
                    })?
                    .map_err(|(dir, e)| SpawnError::Engine {
                        reason: format!(
                            "cannot install the warm-slot init in {}: {e}",
                            dir.display()
                        ),
                    })
            })
            .await
            .cloned()
    }

    /// Makes a slot ([`Driver::prewarm`](bulkhead_driver::Driver::prewarm)).
    pub async fn make_slot(&self, ws: WarmSpec) -> Result<DockerSlot, SpawnError> {
        let invalid = |reason: &str| SpawnError::Invalid {
            instance: ws.slot.clone(),
            reason: reason.to_owned(),
        };
        let Some(dk) = ws.spec.docker.clone() else {
            return Err(invalid(
                "a docker workload needs a docker: section (docker.image or docker.build)",
            ));
        };
        let dir = socket_dir(&ws)
            .ok_or_else(|| invalid("a docker slot needs its own directory among its binds"))?
            .source
            .clone();
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let sock = dir.join(format!(
            ".bulkhead-warm-{}-{}.sock",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        if sock.as_os_str().len() >= SUN_PATH_MAX {
            return Err(invalid(&format!(
                "the slot's directory {} is too long a path for a socket",
                dir.display()
            )));
        }
        let client = self
            .engine
            .ensure()
            .await
            .map_err(|e| SpawnError::Engine {
                reason: e.to_string(),
            })?
            .clone();
        let init = self.init_path().await?;
        // The cold spawn's configuration, for an instance-to-be: the same workload, its
        // binds and port; only the init runs.
        let (placeholder, _) = InstanceId::parse(&format!("shared:{}", ws.spec.name))
            .map_err(|e| invalid(&e.to_string()))?;
        let model = SpawnSpec {
            instance: placeholder,
            argv: vec![INIT_TARGET.to_owned()],
            env: (ws.port > 0)
                .then(|| ("PORT".to_owned(), ws.port.to_string()))
                .into_iter()
                .collect(),
            cwd: ws.cwd.clone(),
            spec: ws.spec.clone(),
            binds: ws.binds.clone(),
            ids: ws.ids,
            inherited: Vec::new(),
            listen: Vec::new(),
        };
        let rename = |e: SpawnError| match e {
            SpawnError::Setup { step, reason, .. } => SpawnError::Setup {
                instance: ws.slot.clone(),
                step,
                reason,
            },
            SpawnError::Invalid { reason, .. } => SpawnError::Invalid {
                instance: ws.slot.clone(),
                reason,
            },
            e => e,
        };
        let (image, hash, pin) = self
            .resolve_image(&client, &dk, &model)
            .await
            .map_err(rename)?;
        let entrypoint = match &dk.entrypoint {
            Some(e) => e.clone(),
            None => client
                .inspect_image(&image)
                .await
                .map_err(|e| SpawnError::Engine {
                    reason: format!("cannot inspect docker image {image}: {e}"),
                })?
                .config
                .and_then(|c| c.entrypoint)
                .unwrap_or_default(),
        };
        let mut body = container_config(
            &model,
            &dk,
            &image,
            self.engine.daemon_id(),
            hash.as_deref(),
        )
        .map_err(rename)?;
        if let Some(labels) = body.labels.as_mut() {
            labels.insert(LABEL_INSTANCE.to_owned(), String::new());
            labels.insert(LABEL_WARM.to_owned(), ws.slot.clone());
        }
        body.entrypoint = Some(vec![INIT_TARGET.to_owned(), sock.display().to_string()]);
        body.cmd = Some(Vec::new());
        body.env = Some(Vec::new());
        if let Some(h) = body.host_config.as_mut() {
            h.binds
                .get_or_insert_with(Vec::new)
                .push(format!("{}:{INIT_TARGET}:ro", init.display()));
        }
        let listener = tokio::net::UnixListener::bind(&sock).map_err(|e| SpawnError::Engine {
            reason: format!("cannot listen on {}: {e}", sock.display()),
        })?;
        let _unlink = Unlink(sock.clone());
        {
            use std::os::unix::fs::PermissionsExt;
            // The container's user (any) connects; only a process of the container is
            // accepted (checked below).
            let _ = std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666));
        }
        let created = client
            .create_container(None::<CreateContainerOptions>, body)
            .await
            .map_err(|e| SpawnError::Engine {
                reason: format!("cannot create a warm container of {image}: {e}"),
            })?;
        drop(pin);
        let mut slot = DockerSlot {
            slot: ws.slot.clone(),
            id: created.id,
            client: client.clone(),
            conn: None,
            main: None,
            stdout: None,
            stderr: None,
            entrypoint,
            spec: ws.spec.clone(),
            port: ws.port,
            binds: ws.binds.clone(),
            memory_limit: ws.spec.resources.as_ref().and_then(|r| r.memory),
            pids_limit: ws.spec.resources.as_ref().and_then(|r| r.pids),
            done: false,
        };
        match self.start_slot(&mut slot, listener).await {
            Ok(()) => Ok(slot),
            Err(e) => {
                slot.remove().await;
                Err(e)
            }
        }
    }

    async fn start_slot(
        &self,
        slot: &mut DockerSlot,
        listener: tokio::net::UnixListener,
    ) -> Result<(), SpawnError> {
        let engine_err = |reason: String| SpawnError::Engine { reason };
        let client = slot.client.clone();
        let id = slot.id.clone();
        let attach_opts = AttachContainerOptions {
            stream: true,
            stdout: true,
            stderr: true,
            logs: true,
            ..Default::default()
        };
        let attached = client
            .attach_container(&id, Some(attach_opts))
            .await
            .map_err(|e| engine_err(format!("cannot attach to container {id}: {e}")))?;
        let pipes =
            Pipes::new().map_err(|e| engine_err(format!("cannot create output pipes: {e}")))?;
        tokio::spawn(copy_output(attached.output, pipes.out_tx, pipes.err_tx));
        slot.stdout = Some(pipes.out_rx);
        slot.stderr = Some(pipes.err_rx);
        client
            .start_container(&id, None::<StartContainerOptions>)
            .await
            .map_err(|e| engine_err(format!("cannot start warm container {id}: {e}")))?;
        let info = client
            .inspect_container(&id, None::<InspectContainerOptions>)
            .await
            .map_err(|e| engine_err(format!("cannot inspect container {id}: {e}")))?;
        let st = info.state.unwrap_or_default();
        let pid = st
            .pid
            .and_then(|p| u32::try_from(p).ok())
            .filter(|&p| p > 0 && st.running == Some(true))
            .ok_or_else(|| {
                engine_err(format!(
                    "warm container {id} ended at its start (exit code {})",
                    st.exit_code.unwrap_or(-1)
                ))
            })?;
        let pidfd = sys::pidfd_open(pid)
            .map_err(|e| engine_err(format!("cannot watch pid {pid} of container {id}: {e}")))?;
        // The init connects at once; a container that dies first ends the wait.
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        let conn = loop {
            match tokio::time::timeout(Duration::from_millis(100), listener.accept()).await {
                Ok(Ok((conn, _))) => {
                    let peer = conn.peer_cred().ok().and_then(|c| c.pid());
                    match peer.and_then(|p| u32::try_from(p).ok()) {
                        Some(p) if in_container(p, &id, pid) => break conn,
                        _ => {
                            tracing::warn!(
                                "warm slot {}: refused a connection from outside container \
                                 {id} (pid {peer:?})",
                                slot.slot
                            );
                            continue;
                        }
                    }
                }
                Ok(Err(e)) => {
                    return Err(engine_err(format!(
                        "cannot accept the init of warm container {id}: {e}"
                    )))
                }
                Err(_) => {}
            }
            if ready_now(&pidfd) {
                return Err(engine_err(format!(
                    "the init of warm container {id} ended before it connected (see the \
                     container's output)"
                )));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(engine_err(format!(
                    "the init of warm container {id} did not connect within {} s",
                    CONNECT_TIMEOUT.as_secs()
                )));
            }
        };
        // Our init connected, so `docker-init` (with `init: true`) has forked it and set
        // its signal forwarding up: no wait at the launch.
        drop(listener);
        slot.conn = Some(conn);
        slot.main = Some(Main {
            pid,
            pidfd,
            cgroup: Cgroup::of(pid),
        });
        Ok(())
    }

    /// Hands `spec` over to `slot` ([`Driver::spawn_warm`](bulkhead_driver::Driver::spawn_warm)).
    pub async fn hand_over(
        &self,
        slot: Box<dyn Warm>,
        spec: SpawnSpec,
    ) -> Result<Spawned, SpawnError> {
        let mut slot = match slot.into_any().downcast::<DockerSlot>() {
            Ok(s) => s,
            Err(_) => {
                return Err(SpawnError::invalid(
                    &spec.instance,
                    "the warm slot was not made by the docker driver",
                ))
            }
        };
        let invalid = |reason: String| SpawnError::invalid(&spec.instance, reason);
        let check = || -> Result<(), SpawnError> {
            if spec.argv.is_empty() {
                return Err(invalid("the command is empty".into()));
            }
            if !Arc::ptr_eq(&spec.spec, &slot.spec) && *spec.spec != *slot.spec {
                return Err(invalid(format!(
                    "warm slot {} was made for another version of workload {}",
                    slot.slot, slot.spec.name
                )));
            }
            if port_of(&spec.env).unwrap_or(0) != slot.port {
                return Err(invalid(format!(
                    "warm slot {} publishes port {}, not the launch's $PORT",
                    slot.slot, slot.port
                )));
            }
            // What the slot does not show is mounted in below: directories only.
            if let Some(b) = spec
                .binds
                .iter()
                .filter(|b| !within_binds(b, &slot.binds))
                .find(|b| !b.source.is_dir() || !b.target.is_absolute())
            {
                return Err(invalid(format!(
                    "warm slot {} does not show {}, and only a directory at an absolute \
                     path can be mounted in at the hand-over",
                    slot.slot,
                    b.source.display()
                )));
            }
            Ok(())
        };
        if let Err(e) = check() {
            slot.remove().await;
            return Err(e);
        }
        // The tenant's channel space (what no slot can know ahead), into the container's
        // mount namespace while only our init runs there.
        let late: Vec<Bind> = spec
            .binds
            .iter()
            .filter(|b| !within_binds(b, &slot.binds))
            .cloned()
            .collect();
        if !late.is_empty() {
            let pidfd = slot.main.as_ref().map(|m| m.pidfd.try_clone());
            let bound = match pidfd {
                Some(Ok(pidfd)) => tokio::task::spawn_blocking(move || {
                    bulkhead_driver::warm::bind_into(pidfd.as_fd(), &late, None)
                        .map_err(|e| e.to_string())
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string())),
                Some(Err(e)) => Err(format!("cannot duplicate the slot's pidfd: {e}")),
                None => Err("the slot's first process is not known".to_owned()),
            };
            if let Err(e) = bound {
                slot.remove().await;
                return Err(SpawnError::Engine {
                    reason: format!("warm container {}: {e}", short_id(&slot.id)),
                });
            }
        }
        let argv: Vec<String> = slot.entrypoint.iter().chain(&spec.argv).cloned().collect();
        let env: Vec<String> = spec
            .env
            .iter()
            .filter(|(k, _)| !spec.inherited.contains(k))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let a: Vec<&[u8]> = argv.iter().map(|s| s.as_bytes()).collect();
        let e: Vec<&[u8]> = env.iter().map(|s| s.as_bytes()).collect();
        let msg = match proto::encode(&a, &e) {
            Ok(m) => m,
            Err(why) => {
                slot.remove().await;
                return Err(invalid(format!("cannot hand the program over: {why}")));
            }
        };
        // The durable tie first: a daemon that dies after this finds the run as the
        // instance's (recover reads the name back), before it a slot (removed).
        let name = claimed_name(&slot.id, spec.instance.as_str());
        if let Err(e) = slot
            .client
            .rename_container(&slot.id, RenameContainerOptions { name })
            .await
        {
            slot.remove().await;
            return Err(SpawnError::Engine {
                reason: format!("cannot claim warm container {}: {e}", slot.id),
            });
        }
        let (status_tx, _) = watch::channel(None);
        let container = Arc::new(Container {
            id: slot.id.clone(),
            instance: spec.instance.as_str().to_owned(),
            client: slot.client.clone(),
            engine: self.engine.clone(),
            main: Mutex::new(slot.main.take()),
            status: status_tx,
            died: AtomicBool::new(false),
            oom: Arc::new(AtomicBool::new(false)),
            memory_limit: slot.memory_limit,
            pids_limit: slot.pids_limit,
            env: spec.env.clone(),
            exec_env: env,
        });
        container.watch_oom();
        // Watched before the program runs: its `die` may come at once.
        let sink: Arc<dyn EventSink> = container.clone();
        self.engine.watch(&slot.id, Arc::downgrade(&sink));
        let Some(mut conn) = slot.conn.take() else {
            self.engine.unwatch(&slot.id);
            slot.remove().await;
            return Err(invalid("the warm slot has no init connection".into()));
        };
        let result = tokio::time::timeout(HANDOVER_TIMEOUT, hand_over(&mut conn, &msg))
            .await
            .unwrap_or_else(|_| {
                Err(HandOver::Failed(format!(
                    "the slot's init did not answer within {} s",
                    HANDOVER_TIMEOUT.as_secs()
                )))
            });
        match result {
            Ok(()) => {
                slot.done = true;
                Ok(Spawned {
                    handle: container,
                    stdout: slot.stdout.take(),
                    stderr: slot.stderr.take(),
                    tap: None,
                })
            }
            Err(err) => {
                self.engine.unwatch(&slot.id);
                slot.remove().await;
                Err(match err {
                    HandOver::Exec(errno) => SpawnError::Exec {
                        program: argv[0].clone(),
                        source: std::io::Error::from_raw_os_error(errno),
                    },
                    HandOver::Failed(reason) => SpawnError::Engine {
                        reason: format!("warm container {}: {reason}", short_id(&slot.id)),
                    },
                })
            }
        }
    }
}

/// Removes a socket file when dropped.
struct Unlink(PathBuf);

impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The environment of a claimed slot's program, read from the host (the container's own
/// is the slot's): `pid` is the container's first process, its child with `docker-init`.
pub(crate) fn program_env(pid: u32, docker_init: bool) -> Option<Vec<(String, String)>> {
    let program = if docker_init {
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()?
    } else {
        pid
    };
    let raw = std::fs::read(format!("/proc/{program}/environ")).ok()?;
    Some(
        raw.split(|&b| b == 0)
            .filter_map(|kv| {
                let kv = std::str::from_utf8(kv).ok()?;
                let (k, v) = kv.split_once('=')?;
                Some((k.to_owned(), v.to_owned()))
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_name_reads_back_as_its_instance() {
        let id = "0123456789abcdef0123";
        for inst in [
            "ns:a:web",
            "shared:my_work.load-1",
            "session:s_1:w",
            "ns:x__c:y",
        ] {
            let name = claimed_name(id, inst);
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)),
                "{name}"
            );
            assert_eq!(instance_of_name(&name).as_deref(), Some(inst), "{name}");
            assert_eq!(instance_of_name(&format!("/{name}")).as_deref(), Some(inst));
        }
        assert_eq!(claimed_name(id, "ns:a:w"), "bulkhead-0123456789ab-ns_ca_cw");
        assert_eq!(
            instance_of_name(&claimed_name(id, "a b")).as_deref(),
            Some("a b")
        );
    }

    #[test]
    fn other_names_are_no_claimed_slot() {
        for name in [
            "/happy_turing",
            "bulkhead-",
            "bulkhead-0123456789ab",
            "bulkhead-0123456789ab-",
            "bulkhead-zz23456789ab-ns_ca_cw",
            "bulkhead-0123456789ab-ns_q",
            "bulkhead-0123456789ab-ns_",
            "bulkhead-0123456789abXns_ca",
        ] {
            assert_eq!(instance_of_name(name), None, "{name}");
        }
    }

    #[test]
    fn launch_binds_must_lie_in_the_slots() {
        let slot = vec![Bind::same("/var/lib/b/warm/w-1")];
        assert!(within_binds(
            &Bind::same("/var/lib/b/warm/w-1/notify"),
            &slot
        ));
        assert!(within_binds(&Bind::same("/var/lib/b/warm/w-1"), &slot));
        assert!(!within_binds(&Bind::same("/var/lib/b/other"), &slot));
        let moved = Bind {
            source: "/var/lib/b/warm/w-1/notify".into(),
            target: "/elsewhere/notify".into(),
        };
        assert!(!within_binds(&moved, &slot));
    }

    #[test]
    fn the_init_is_embedded_and_installs_once() {
        assert!(
            INIT.starts_with(b"\x7fELF"),
            "the build script made no init"
        );
        let dir = tempfile::tempdir().unwrap();
        let a = install_init(dir.path()).unwrap();
        let b = install_init(dir.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(std::fs::read(&a).unwrap(), INIT);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&a).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        // Only the init: no temporary file left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn the_inits_of_other_builds_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in [
            "warm-init-0011223344556677",
            ".warm-init-0011223344556677.42.0",
            "images.db",
            "warm-other",
        ] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        let init = install_init(d).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mine = init.file_name().unwrap().to_str().unwrap().to_owned();
        let mut want = vec!["images.db".to_owned(), mine, "warm-other".to_owned()];
        want.sort();
        assert_eq!(left, want);
    }
}
