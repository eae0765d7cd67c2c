//! Start-up and shutdown of the daemon.
//!
//! Start-up order matters: the state directory is locked (one daemon per state dir), the
//! API socket is bound *before* anything slow, so a client that connects early waits in
//! the listen backlog instead of being refused; then the catalog is loaded and the server
//! starts accepting. Shutdown stops new launches, terminates every instance (each with
//! its own signal and grace, concurrently), then stops the server and removes the socket.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bulkhead_api::BulkheadServer;
use tokio::net::UnixListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;

use crate::http::HttpServer;
use crate::service::Service;
use crate::Shared;

/// Daemon configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub workloads_dir: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// Size at which an instance log rotates.
    pub log_max_bytes: u64,
    /// Events kept in the state database (`<state>/bulkhead.db`).
    pub event_retention: usize,
    /// Whether events go to the state database (committed before clients see them);
    /// `false` keeps them in memory only (benchmarks compare the two).
    pub durable_events: bool,
    /// How hard event commits go to the disk (`Full`: survive a power loss).
    pub event_sync: crate::store::Synchronous,
    /// A state database that is empty, damaged or from a newer bulkhead is moved aside
    /// and a new one started (`serve --fresh-state`); `false`: the start fails.
    pub fresh_state: bool,
    /// Where to serve `/metrics`, `/health` and `/ready` over HTTP; `None`: not served.
    pub metrics_addr: Option<SocketAddr>,
    /// Make this process a child subreaper and reap orphaned descendants of the instances
    /// (see `bulkhead_driver::reaper`). Off by default: a process embedding the daemon
    /// must then spawn every child it waits for through the reaper registry, or the
    /// reaper may take its status. `bulkhead serve` and `up` turn it on.
    pub reap_orphans: bool,
    /// Also serve the API on TCP, behind mutual TLS and tokens (see `auth`); `None`: the
    /// Unix socket only.
    pub tcp: Option<crate::auth::TcpListen>,
    /// Spawn instances through a keeper process (this program, run as
    /// `<program> keeper --state <state_dir>`), so that they survive a daemon crash and are
    /// adopted by the next daemon. `None`: the daemon is the instances' parent.
    pub keeper: Option<PathBuf>,
    /// A sandbox launch fails at once when `MemAvailable` is below this many bytes
    /// (0: no check).
    pub min_available_memory: u64,
    /// At most this many live instances; a launch that would create one more is refused
    /// (`None`: no limit).
    pub max_instances: Option<usize>,
    /// At most this many live instances in one namespace (keys `ns:<namespace>:…`);
    /// `None`: no limit.
    pub max_instances_per_namespace: Option<usize>,
    /// How many finished instances stay listed (`get`, `list`, `logs`), with their logs,
    /// before the oldest are forgotten (default [`crate::FINISHED_KEPT`]).
    pub finished_kept: usize,
    /// How long a finished instance stays listed, with its log, before it is forgotten
    /// (default [`crate::FINISHED_TTL`]).
    pub finished_ttl: std::time::Duration,
    /// The ports handed to instances as `$PORT` (see `ports`).
    pub port_range: bulkhead_core::port::PortRange,
    /// A token file (the `--tokens` format): when set, `/metrics`, `/health` and `/ready`
    /// need `Authorization: Bearer <token>` with a token from it.
    pub metrics_tokens: Option<PathBuf>,
    /// Serve the metrics listener without tokens on an address that is not loopback
    /// (refused otherwise).
    pub metrics_insecure: bool,
    /// Try to start the sandbox driver (it needs root and cgroups; `health` says why not).
    pub sandbox: bool,
    /// Remount the cgroup2 mount with `favordynmods` (system-wide; see the README).
    pub cgroup_favordynmods: bool,
    /// With a keeper: keep a spare slot any process launch takes
    /// (`bulkhead_driver::keeper::spare`).
    pub process_spare: bool,
    /// The docker driver's image cache is evicted (LRU, never an image in use) down to
    /// this many images / bytes after each build; `None`: unbounded.
    pub image_cache_max_count: Option<usize>,
    pub image_cache_max_bytes: Option<u64>,
    /// The Docker Swarm manager of the `swarm` driver (`unix:///...`, `tcp://...`);
    /// `None`: the driver is not registered.
    pub swarm_host: Option<String>,
    /// Where the kubernetes driver finds its cluster (in-cluster config or a kubeconfig)
    /// and its default namespace; connected on first use, so no cluster is fine.
    pub kubernetes: bulkhead_kubernetes::ClusterConfig,
    /// The supervisor's notify socket (`$NOTIFY_SOCKET`, see `notify_self`): `READY=1`
    /// once the API is served, `STATUS=`, `WATCHDOG=1`, `STOPPING=1`. `None`: not sent.
    pub notify: Option<Arc<crate::notify_self::SelfNotify>>,
    /// What every warm slot together may hold (`--warm-memory`, bytes).
    pub warm_memory: u64,
}

impl Config {
    /// Defaults: state in `./.bulkhead`, socket `<state>/bulkhead.sock`.
    pub fn new(
        workloads_dir: PathBuf,
        state_dir: Option<PathBuf>,
        socket: Option<PathBuf>,
    ) -> Config {
        // Absolute: instances run in their own folders and get paths under the state dir
        // (the notify socket) in their environment.
        let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
        let state_dir = abs(state_dir.unwrap_or_else(|| PathBuf::from(".bulkhead")));
        let socket = abs(socket.unwrap_or_else(|| state_dir.join("bulkhead.sock")));
        let workloads_dir = abs(workloads_dir);
        Config {
            workloads_dir,
            state_dir,
            socket,
            log_max_bytes: crate::logs::DEFAULT_MAX_BYTES,
            event_retention: crate::store::DEFAULT_RETENTION,
            durable_events: true,
            event_sync: crate::store::Synchronous::Normal,
            fresh_state: false,
            metrics_addr: None,
            reap_orphans: false,
            tcp: None,
            keeper: None,
            min_available_memory: bulkhead_sandbox::driver::DEFAULT_MIN_AVAILABLE_MEMORY,
            max_instances: None,
            max_instances_per_namespace: None,
            finished_kept: crate::FINISHED_KEPT,
            finished_ttl: crate::FINISHED_TTL,
            port_range: bulkhead_core::port::DEFAULT_RANGE,
            metrics_tokens: None,
            metrics_insecure: false,
            sandbox: true,
            cgroup_favordynmods: false,
            process_spare: true,
            image_cache_max_count: None,
            image_cache_max_bytes: None,
            swarm_host: None,
            kubernetes: Default::default(),
            notify: None,
            warm_memory: crate::warm::DEFAULT_BUDGET,
        }
    }
}

/// The daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Instances(crate::instances::TableError),
    #[error("cannot reach the keeper at {path}: {source}")]
    Keeper {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A driver may hold instances it cannot show: starting could run a key twice.
    #[error("cannot recover the instances: {0}")]
    Recover(bulkhead_driver::RecoverError),
    /// The state database (`<state>/bulkhead.db`) could not be opened; names the file.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("cannot create state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another bulkhead daemon uses state directory {path} (lock {lock} is held)")]
    Locked { path: PathBuf, lock: PathBuf },
    #[error("another bulkhead daemon is listening on {0}")]
    SocketInUse(PathBuf),
    #[error("cannot bind API socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    MetricsBind(#[from] crate::http::BindError),
    /// `--metrics-tokens` could not be read (the error names the file).
    #[error("--metrics-tokens: {0}")]
    MetricsTokens(crate::auth::TokenFileError),
    #[error("--metrics-tokens {0}: the file has no tokens, so nobody could read /metrics")]
    MetricsNoTokens(PathBuf),
    #[error("--metrics {0} is not a loopback address: give --metrics-tokens FILE so that /metrics, /health and /ready need a token, or --metrics-insecure to serve them to anyone who can connect")]
    MetricsUnauthenticated(SocketAddr),
    #[error(transparent)]
    Tcp(#[from] crate::auth::TcpSetupError),
}

/// The tokens of the metrics listener, or why it may not start: on an address that is
/// not loopback it needs tokens, unless `metrics_insecure` says otherwise.
fn metrics_auth(cfg: &Config) -> Result<Option<Arc<crate::auth::Tokens>>, StartError> {
    let Some(addr) = cfg.metrics_addr else {
        return Ok(None);
    };
    if let Some(path) = &cfg.metrics_tokens {
        let tokens = crate::auth::Tokens::load(path).map_err(StartError::MetricsTokens)?;
        if tokens.is_empty() {
            return Err(StartError::MetricsNoTokens(path.clone()));
        }
        return Ok(Some(Arc::new(tokens)));
    }
    // `::ffff:127.0.0.1` is loopback too.
    if !addr.ip().to_canonical().is_loopback() {
        if !cfg.metrics_insecure {
            return Err(StartError::MetricsUnauthenticated(addr));
        }
        tracing::warn!(
            "metrics listener {addr} is not loopback and asks no token (--metrics-insecure): anyone who can connect reads /metrics and /health"
        );
    }
    Ok(None)
}

/// A running daemon.
pub struct Daemon {
    shared: Arc<Shared>,
    stop_server: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    /// The monitoring listener and the metrics task following the events.
    http: Option<(HttpServer, JoinHandle<()>)>,
    socket: PathBuf,
    _lock: File,
    /// The orphan reaper, when `Config::reap_orphans`; stops when the daemon is dropped.
    _reaper: Option<bulkhead_driver::reaper::ReaperTask>,
    /// The TCP API server (`Config::tcp`).
    tcp: Option<crate::auth::TcpServer>,
    /// The audit log, for the summaries of suppressed refusals at shutdown.
    audit: crate::auth::AuditLog,
    /// The supervisor's notify socket and the task keeping its status and watchdog.
    notify: Option<(Arc<crate::notify_self::SelfNotify>, JoinHandle<()>)>,
}

impl Daemon {
    /// Starts the daemon: lock, bind, load, serve.
    pub async fn start(cfg: Config) -> Result<Daemon, StartError> {
        let nofile = bulkhead_driver::sys::raise_nofile_limit();
        tracing::debug!("open-file limit: {nofile}");
        let state_err = |path: &Path| {
            let path = path.to_owned();
            move |source| StartError::StateDir { path, source }
        };
        for dir in [
            cfg.state_dir.clone(),
            cfg.state_dir.join("logs"),
            cfg.state_dir.join("notify"),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(state_err(&dir))?;
        }
        let lock_path = cfg.state_dir.join("daemon.lock");
        let mut lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(state_err(&lock_path))?;
        if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            return Err(StartError::Locked {
                path: cfg.state_dir.clone(),
                lock: lock_path,
            });
        }
        let _ = lock.set_len(0);
        let _ = writeln!(lock, "{}", std::process::id());

        // Bound before the API socket so that a bad address leaves no socket behind.
        let metrics_tokens = metrics_auth(&cfg)?;
        let metrics_listener = match cfg.metrics_addr {
            Some(addr) => Some(crate::http::bind(addr).await?),
            None => None,
        };
        // Like the metrics listener: a bad token file, TLS file or address binds nothing.
        let tcp = match &cfg.tcp {
            Some(t) => Some(crate::auth::TcpSetup::prepare(t).await?),
            None => None,
        };
        let audit = crate::auth::AuditLog::start(&cfg.state_dir, cfg.log_max_bytes)
            .map_err(state_err(&cfg.state_dir.join("audit.log")))?;
        let listener = bind(&cfg.socket)?;
        // Stale notify sockets from an earlier run: nobody listens on them.
        if let Ok(rd) = std::fs::read_dir(cfg.state_dir.join("notify")) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }

        // After the bind: opening the database loads the newest events (may be slow).
        let events = if cfg.durable_events {
            let db = cfg.state_dir.join("bulkhead.db");
            crate::events::EventLog::open_or_fresh(
                &db,
                cfg.event_retention,
                cfg.event_sync,
                cfg.fresh_state,
            )?
        } else {
            crate::events::EventLog::new()
        };
        // Before anything can spawn: from here on orphaned descendants of the instances
        // come to this process, and the reaper collects those nobody waits for.
        let reaper = if cfg.reap_orphans {
            match bulkhead_driver::reaper::start() {
                Ok(task) => Some(task),
                Err(e) => {
                    tracing::warn!(
                        "cannot become a child subreaper ({e}); orphans of instances go to PID 1"
                    );
                    None
                }
            }
        } else {
            None
        };
        let keeper = match &cfg.keeper {
            Some(program) => {
                let (prog, state) = (program.clone(), cfg.state_dir.clone());
                // A keeper that dies (kill -9, OOM) is replaced by the next spawn, the
                // same way it was started here.
                let restart: bulkhead_driver::keeper::client::Restart = Box::new(move |shard| {
                    let (prog, state) = (prog.clone(), state.clone());
                    Box::pin(async move {
                        connect_keeper(&prog, &state, shard)
                            .await
                            .map_err(std::io::Error::other)
                    })
                });
                // Shard 0, then every further shard a previous daemon started (their
                // instances are adopted below); a shard whose keeper is gone gets a new,
                // empty one, so that shard numbers stay dense.
                let mut shards = vec![connect_keeper(program, &cfg.state_dir, 0).await?];
                for shard in 1..=keeper_shards_on_disk(&cfg.state_dir) {
                    shards.push(connect_keeper(program, &cfg.state_dir, shard).await?);
                }
                let k = Arc::new(
                    bulkhead_driver::keeper::client::KeeperDriver::with_shards(shards)
                        .with_restart(restart),
                );
                k.supervise();
                Some(k)
            }
            None => None,
        };
        // The instance table (with the durable events): what the last daemon knew.
        let (rows, table) = if cfg.durable_events {
            let db = cfg.state_dir.join("bulkhead.db");
            let rows = crate::instances::load(&db).map_err(StartError::Instances)?;
            (
                rows,
                Some(crate::instances::InstanceTable::open(&db).map_err(StartError::Instances)?),
            )
        } else {
            (Vec::new(), None)
        };
        let shared = Arc::new(Shared::new(cfg.clone(), events, keeper.clone(), table));
        // Before the catalog and the API: the metrics follow the events from the first one.
        let http = metrics_listener.map(|l| {
            let follower = shared.metrics.start(&shared);
            (
                HttpServer::start(l, shared.clone(), metrics_tokens),
                follower,
            )
        });
        // Everything after the bind may be slow; clients queue in the backlog meanwhile.
        let cat = shared.rescan();
        // `on_dependency_restart: restart` reacts to restarts from here on.
        drop(shared.follow_dependency_restarts());
        // Before the API serves a launch: every instance a driver holds is back under
        // supervision, so no key can get a second instance.
        // The event log's count where the table lags it.
        let logged_restarts = shared.restarts_in_log();
        let restored_of = |r: &crate::instances::InstanceRow| bulkhead_core::instance::Restored {
            restarts: bulkhead_core::key::InstanceId::parse(&r.id)
                .ok()
                .and_then(|(id, _)| logged_restarts.get(&id).copied())
                .map_or(r.restarts, |n| n.max(r.restarts)),
            consecutive_failures: r.consecutive_failures,
            breaker: match r.breaker.as_str() {
                "open" => bulkhead_core::restart::BreakerState::Open,
                "half_open" => bulkhead_core::restart::BreakerState::HalfOpen,
                _ => bulkhead_core::restart::BreakerState::Closed,
            },
        };
        // Every driver's instances: adopted when the table knows them (one run per key),
        // ended otherwise; the table's instances nobody holds any more are resumed by
        // their restart policy (see `recovery`).
        let ended = crate::recovery::recover(&shared, rows, &restored_of)
            .await
            .map_err(StartError::Recover)?;
        shared.resume_unrecorded(&cat, &ended);
        // Every instance that outlived the last daemon is back: the channel spaces none
        // of them needs are its leftovers.
        crate::dataplane::sweep(&shared);
        // On-connection workloads: their sockets, once adopted instances are back (an
        // adopted one still listens on its own).
        shared.sync_activation();
        crate::warm::start(&shared);
        if let (Some(k), true) = (&shared.keeper, cfg.process_spare) {
            // After the recovery, whose sweep kills what runs in a cgroup no adopted
            // instance owns.
            k.keep_spare();
        }
        // And the logs of instances nobody lists any more (finished under an earlier
        // daemon): bounded like this daemon's own finished instances.
        let swept = shared.sweep_stray_logs();
        if swept > 0 {
            tracing::info!("removed {swept} log(s) of instances finished under an earlier daemon");
        }
        // Finished instances past their time go even when nothing new finishes.
        {
            let sh = Arc::downgrade(&shared);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    let Some(sh) = sh.upgrade() else { return };
                    sh.forget_finished(crate::events::now_ms());
                }
            });
        }
        tracing::info!(
            "serving {} workloads from {} on {}",
            cat.entries.len(),
            cfg.workloads_dir.display(),
            cfg.socket.display()
        );

        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let svc = Service { sh: shared.clone() };
        let unix_audit = audit.clone();
        let kept_audit = audit.clone();
        let roots = crate::peer::Roots {
            daemon: std::process::id(),
            keepers: shared
                .keeper
                .as_ref()
                .map(|k| k.clients().iter().filter_map(|c| c.peer_pid()).collect())
                .unwrap_or_default(),
        };
        // Each accepted connection is classified once (operator or workload, see `peer`);
        // the verdict rides along with every request of the connection.
        let incoming = tokio_stream::StreamExt::map(UnixListenerStream::new(listener), move |s| {
            s.map(|s| crate::peer::Checked::new(s, &roots))
        });
        // grpc.health.v1 and server reflection beside the API, on both listeners.
        let standard = crate::standard::Standard::start(&shared);
        let tcp = tcp.map(|t| crate::auth::TcpServer::start(t, shared.clone(), audit, &standard));
        let (health, reflection, reflection_alpha) = (
            standard.health(),
            standard.reflection_v1(),
            standard.reflection_v1alpha(),
        );
        let server = tokio::spawn(async move {
            let res = tonic::transport::Server::builder()
                .layer(crate::auth::AuthLayer::unix(unix_audit))
                .add_service(BulkheadServer::new(svc))
                .add_service(health)
                .add_service(reflection)
                .add_service(reflection_alpha)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop_rx.await;
                })
                .await;
            if let Err(e) = res {
                tracing::error!("API server failed: {e}");
            }
        });
        // The accept loop runs (clients that came early are in the backlog): ready.
        let notify = cfg
            .notify
            .clone()
            .map(|n| (n.clone(), crate::notify_self::start(n, shared.clone())));
        Ok(Daemon {
            notify,
            shared,
            stop_server: Some(stop_tx),
            server: Some(server),
            http,
            socket: cfg.socket,
            _lock: lock,
            _reaper: reaper,
            tcp,
            audit: kept_audit,
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The address the TCP API is served on (the actual port when configured with port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().map(|t| t.addr)
    }

    /// The address `/metrics` is served on (the actual port when configured with port 0).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|(h, _)| h.addr)
    }

    /// Terminates every instance, stops the API server and removes the socket.
    pub async fn shutdown(mut self) {
        // No connection launches anything any more.
        self.shared.stop_activation();
        if let Some((n, _)) = &self.notify {
            let n_live = self.shared.live_count();
            n.send(&format!(
                "STOPPING=1\nSTATUS=stopping: terminating {n_live} instance{}",
                if n_live == 1 { "" } else { "s" }
            ));
        }
        self.shared.terminate_all().await;
        self.shared.warm.shutdown().await;
        if let Some(k) = &self.shared.keeper {
            // Before the scopes go: the spare's cgroup with it.
            k.drop_spare().await;
        }
        // Its file goes with it.
        drop(
            self.shared
                .notify_spare
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        // Every instance is gone: the drivers remove their (empty) cgroup scopes.
        let sh = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for d in sh.drivers.values() {
                d.shutdown();
            }
        })
        .await;
        if let Some(k) = &self.shared.keeper {
            // Every instance is gone: the keeper may exit.
            for c in k.clients() {
                c.shutdown().await;
            }
        }
        // Every instance is gone: the data plane reclaims and removes what is left.
        self.shared.dataplane.shutdown().await;
        if let Some(tx) = self.stop_server.take() {
            let _ = tx.send(());
        }
        if let Some(s) = self.server.take() {
            // Streams (watch --follow, logs --follow) would keep a graceful shutdown open
            // forever; give them a moment, then stop.
            if tokio::time::timeout(std::time::Duration::from_secs(2), s)
                .await
                .is_err()
            {
                tracing::debug!("API server did not drain in time");
            }
        }
        // Last: `/ready` answers 503 while the instances are being terminated.
        if let Some((http, follower)) = self.http.take() {
            http.stop().await;
            follower.abort();
        }
        if let Some(tcp) = self.tcp.take() {
            tcp.stop().await;
        }
        // Counted refusals of a window that has not ended yet get their summary line.
        self.audit.flush_summaries(u64::MAX, true);
        // Commit whatever events are still queued and stop the writer thread.
        let sh = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            sh.events.close();
            if let Some(t) = &sh.instances {
                t.close();
            }
        })
        .await;
        let _ = std::fs::remove_file(&self.socket);
        if let Some((_, task)) = self.notify.take() {
            task.abort();
        }
    }

    /// Serves until SIGTERM or SIGINT (then shuts down); SIGHUP rescans the workloads.
    pub async fn run_until_signalled(self) -> std::io::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    let cat = self.shared.reload();
                    tracing::info!("SIGHUP: rescanned, {} workloads", cat.entries.len());
                }
            }
        }
        tracing::info!(
            "shutting down: terminating {} instances (send SIGTERM again to kill them at once)",
            self.shared.live_count()
        );
        // The ladder: the first signal terminates gracefully (each instance's signal and
        // grace, in parallel); a second one SIGKILLs every instance at once, and the
        // graceful shutdown then completes as their exits arrive.
        let shared = self.shared.clone();
        let shutdown = self.shutdown();
        tokio::pin!(shutdown);
        let mut killed = false;
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = term.recv(), if !killed => killed = true,
                _ = int.recv(), if !killed => killed = true,
            }
            tracing::warn!("second signal: killing every instance now");
            shared.kill_all();
        }
    }
}

/// Binds the API socket with mode 0600, replacing a stale socket file but never a live
/// daemon's.
fn bind(path: &Path) -> Result<UnixListener, StartError> {
    let bind_err = |source| StartError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(bind_err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(StartError::SocketInUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    // Between bind and chmod the socket has the umask's mode (0755 with the usual 022):
    // connecting needs write permission, so nobody but the owner can connect meanwhile.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

/// The highest keeper shard whose socket is in the state directory (0: only the first).
fn keeper_shards_on_disk(state_dir: &Path) -> usize {
    let Ok(dir) = std::fs::read_dir(state_dir) else {
        return 0;
    };
    dir.filter_map(|e| {
        let name = e.ok()?.file_name();
        let n = name
            .to_str()?
            .strip_prefix("keeper.")?
            .strip_suffix(".sock")?;
        n.parse::<usize>().ok()
    })
    .filter(|n| *n < bulkhead_driver::keeper::client::MAX_SHARDS)
    .max()
    .unwrap_or(0)
}

/// Connects to keeper `shard` of the state directory, starting it first if none answers.
async fn connect_keeper(
    program: &Path,
    state_dir: &Path,
    shard: usize,
) -> Result<Arc<bulkhead_driver::keeper::client::KeeperClient>, StartError> {
    use bulkhead_driver::keeper::client::KeeperClient;
    let path = bulkhead_driver::keeper::server::shard_socket_path(state_dir, shard);
    let err = |source| StartError::Keeper {
        path: path.clone(),
        source,
    };
    if let Ok(c) = KeeperClient::connect(&path).await {
        tracing::info!("connected to the running keeper at {}", path.display());
        return Ok(c);
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(state_dir.join("keeper.log"))
        .map_err(err)?;
    // Its own process group: a terminal's Ctrl-C to the daemon's group must not reach it.
    // Started once per state directory; it outlives this daemon on purpose.
    let _child = std::process::Command::new(program)
        .arg("keeper")
        .arg("--state")
        .arg(state_dir)
        .arg("--shard")
        .arg(shard.to_string())
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(err)?;
    // The keeper binds its socket within milliseconds; retry briefly with a growing pause.
    let mut pause = std::time::Duration::from_millis(1);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match KeeperClient::connect(&path).await {
            Ok(c) => return Ok(c),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(err(e)),
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_millis(50));
            }
        }
    }
}
