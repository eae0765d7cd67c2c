//! `bulkhead serve` and `bulkhead up`: the daemon in this process.
//!
//! One daemon mode: both resolve the same settings (see `config`), start the daemon and
//! launch the `autostart` workloads; `up` differs only in its defaults (the local demo
//! directory) and in printing events to the terminal.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use bulkhead_daemon::{Config, Daemon, LaunchArgs, WaitFor};
use tokio::sync::broadcast::error::RecvError;

use bulkhead_daemon::notify_self::SelfNotify;

use crate::cli::{ServeArgs, UpArgs};
use crate::{config, output};

/// The daemon's own log on stderr: text (coloured only on a terminal, never with
/// `NO_COLOR`) or one JSON object per line.
fn init_tracing(format: crate::cli::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        crate::cli::LogFormat::Text => fmt
            .with_ansi(crate::output::colour(&std::io::stderr()))
            .try_init(),
        crate::cli::LogFormat::Json => fmt.json().with_ansi(false).try_init(),
    };
}

/// `serve` or `up`: which defaults apply and whether events are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The platform's locations and configuration file (see `config`).
    Serve,
    /// The local demo: `./examples/workloads`, state in `./.bulkhead`, socket
    /// `<state>/bulkhead.sock`; a configuration file only with `--config`.
    Up,
}

/// The settings after the command line, the configuration file and the defaults: every
/// `Option` that has a default is `Some`.
fn resolve(a: ServeArgs, mode: Mode, env: &config::Env) -> anyhow::Result<ServeArgs> {
    let paths = config::Paths::for_env(env);
    let default_file = match (&paths, mode) {
        (Ok(p), Mode::Serve) => Some(p.config.clone()),
        _ => None,
    };
    // A bad configuration file is bad input, like a bad flag (exit 2).
    let usage = |e: config::ConfigError| {
        let mut msg = e.to_string();
        if let Some(src) = std::error::Error::source(&e) {
            msg = format!("{msg}: {src}");
        }
        crate::exit::fail(crate::exit::USAGE, msg)
    };
    let file =
        config::file_settings(a.config.as_deref(), default_file.as_deref()).map_err(usage)?;
    // Command-line paths are relative to the working directory; the file's to its folder.
    let mut a = absolute_paths(a)?;
    if let Some((path, s)) = file {
        let dir = std::path::absolute(&path)?
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default();
        tracing::debug!("configuration file {}", path.display());
        a = a.or_file(s.relative_to(&dir));
    }
    match mode {
        Mode::Serve => {
            let need = |what: Option<PathBuf>, pick: fn(&config::Paths) -> PathBuf| match what {
                Some(p) => Ok(p),
                None => paths.as_ref().map(pick).map_err(|e| anyhow::anyhow!("{e}")),
            };
            a.workloads = Some(need(a.workloads.take(), |p| p.workloads.clone())?);
            a.state = Some(need(a.state.take(), |p| p.state.clone())?);
            a.socket = Some(need(a.socket.take(), |p| p.socket.clone())?);
        }
        Mode::Up => {
            if a.workloads.is_none() {
                a.workloads = Some(default_examples()?);
            }
            let state = a.state.take().unwrap_or_else(|| PathBuf::from(".bulkhead"));
            a.socket = Some(
                a.socket
                    .take()
                    .unwrap_or_else(|| state.join("bulkhead.sock")),
            );
            a.state = Some(state);
        }
    }
    absolute_paths(a)
}

fn absolute_paths(mut a: ServeArgs) -> anyhow::Result<ServeArgs> {
    for p in [
        &mut a.workloads,
        &mut a.state,
        &mut a.socket,
        &mut a.metrics_tokens,
        &mut a.client_ca,
        &mut a.tokens,
        &mut a.tls_cert,
        &mut a.tls_key,
    ]
    .into_iter()
    .flatten()
    {
        *p = std::path::absolute(&*p)
            .with_context(|| format!("cannot make {} absolute", p.display()))?;
    }
    Ok(a)
}

/// `bulkhead serve`: the daemon, with the platform's defaults.
pub async fn serve(a: ServeArgs, notify: Option<Arc<SelfNotify>>) -> anyhow::Result<()> {
    let a = resolve(a, Mode::Serve, &config::Env::current())?;
    init_tracing(a.log_format.unwrap_or_default());
    run(a, Mode::Serve, notify).await
}

/// `bulkhead up`: `serve` in the foreground with the local demo defaults, printing events.
pub async fn up(u: UpArgs, notify: Option<Arc<SelfNotify>>) -> anyhow::Result<()> {
    let mut a = u.serve;
    if let Some(dir) = u.dir {
        a.workloads = Some(dir);
    }
    let a = resolve(a, Mode::Up, &config::Env::current())?;
    init_tracing(a.log_format.unwrap_or_default());
    run(a, Mode::Up, notify).await
}

async fn run(a: ServeArgs, mode: Mode, notify: Option<Arc<SelfNotify>>) -> anyhow::Result<()> {
    let tcp = listen_config(&a)?;
    let flag = |b: Option<bool>| b.unwrap_or(false);
    if a.metrics.is_none() && (a.metrics_tokens.is_some() || flag(a.metrics_insecure)) {
        return Err(crate::exit::fail(
            crate::exit::USAGE,
            "--metrics-tokens and --metrics-insecure only apply with --metrics ADDR",
        ));
    }
    let (Some(workloads), Some(state), Some(socket)) = (a.workloads, a.state, a.socket) else {
        anyhow::bail!("internal: unresolved locations");
    };
    let mut cfg = Config::new(workloads, Some(state), Some(socket));
    if let Some(n) = a.log_max_bytes {
        cfg.log_max_bytes = n;
    }
    cfg.image_cache_max_count = a.image_cache_max_count;
    cfg.image_cache_max_bytes = a.image_cache_max_bytes;
    if let Some(m) = a.warm_memory {
        cfg.warm_memory = m;
    }
    cfg.swarm_host = a.swarm_host;
    cfg.kubernetes = bulkhead_kubernetes::ClusterConfig {
        kubeconfig: a.kubeconfig.clone(),
        context: a.kubernetes_context.clone(),
        namespace: a.kubernetes_namespace.clone(),
    };
    if let Some(n) = a.event_retention {
        cfg.event_retention = n;
    }
    cfg.fresh_state = flag(a.fresh_state);
    cfg.event_sync = match a.event_sync.unwrap_or(crate::cli::EventSync::Normal) {
        crate::cli::EventSync::Normal => bulkhead_daemon::store::Synchronous::Normal,
        crate::cli::EventSync::Full => bulkhead_daemon::store::Synchronous::Full,
    };
    cfg.metrics_addr = a.metrics;
    cfg.metrics_tokens = a.metrics_tokens;
    cfg.metrics_insecure = flag(a.metrics_insecure);
    cfg.max_instances_per_namespace = a.max_instances_per_namespace;
    if let Some(t) = a.finished_ttl {
        cfg.finished_ttl = t;
    }
    if let Some(n) = a.finished_kept {
        cfg.finished_kept = n;
    }
    if let Some(r) = a.port_range {
        cfg.port_range = r;
    }
    cfg.tcp = tcp;
    if let Some(n) = a.min_available_memory {
        cfg.min_available_memory = n;
    }
    cfg.max_instances = a.max_instances;
    cfg.sandbox = !flag(a.no_sandbox);
    cfg.cgroup_favordynmods = flag(a.cgroup_favordynmods);
    cfg.process_spare = !flag(a.no_process_spare);
    cfg.notify = notify;
    // The daemon process parents the instances: it reaps their orphans (and works as PID 1).
    cfg.reap_orphans = true;
    // Instances are spawned through the keeper so that they survive a daemon crash.
    if !flag(a.no_keeper) {
        cfg.keeper =
            Some(std::env::current_exe().context("cannot find this program for the keeper")?);
    }
    let socket = cfg.socket.clone();
    let daemon = Daemon::start(cfg).await?;
    let shared = daemon.shared().clone();

    // `up` prints events as they happen, from this run on (earlier runs' events are kept
    // in the state database and shown by `bulkhead events`).
    let printer = (mode == Mode::Up).then(|| {
        let (history, mut live) = shared.events.subscribe(shared.events.last_id());
        tokio::spawn(async move {
            // A closed stdout (`bulkhead up | head`) ends the printing, not the daemon.
            let print = |line: String| {
                use std::io::Write;
                writeln!(std::io::stdout().lock(), "{line}").is_ok()
            };
            for e in history {
                if !print(output::event_line(&bulkhead_api_event(&e))) {
                    return;
                }
            }
            loop {
                let line = match live.recv().await {
                    Ok(e) => output::event_line(&bulkhead_api_event(&e)),
                    Err(RecvError::Lagged(n)) => format!("({n} events skipped)"),
                    Err(RecvError::Closed) => return,
                };
                if !print(line) {
                    return;
                }
            }
        })
    });

    let cat = shared.catalog();
    if mode == Mode::Up {
        for e in cat.entries.values() {
            if let Err(err) = &e.spec {
                let msg = format!("invalid workload {}: {err}", e.name);
                eprintln!("{}", bulkhead_core::text::escape_lines(&msg));
            }
        }
    }
    let autostart: Vec<String> = cat
        .valid()
        .filter(|(_, s)| s.autostart)
        .map(|(_, s)| s.name.clone())
        .collect();
    match mode {
        Mode::Up => eprintln!(
            "bulkhead up: {} workloads, autostarting {:?}; API on {} (the CLI finds it from \
             this directory; elsewhere: export BULKHEAD_SOCKET={}); Ctrl-C to stop",
            cat.entries.len(),
            autostart,
            socket.display(),
            socket.display()
        ),
        Mode::Serve if !autostart.is_empty() => {
            tracing::info!("autostarting {autostart:?}")
        }
        Mode::Serve => {}
    }
    for name in autostart {
        let sh = Arc::clone(&shared);
        tokio::spawn(async move {
            let args = LaunchArgs {
                workload: name.clone(),
                namespace: None,
                session: None,
                wait: WaitFor::Ready,
                timeout: None,
                lease: None,
            };
            if let Err(e) = sh.launch(args).await {
                match mode {
                    Mode::Up => eprintln!("autostart of {name} failed: {e}"),
                    Mode::Serve => tracing::error!("autostart of {name} failed: {e}"),
                }
            }
        });
    }
    daemon
        .run_until_signalled()
        .await
        .context("signal handling")?;
    if let Some(printer) = printer {
        // Let the printer show the last events (terminated).
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        printer.abort();
    }
    Ok(())
}

/// `--listen` and its files: TCP is served only with mutual TLS and a token file.
fn listen_config(a: &ServeArgs) -> anyhow::Result<Option<bulkhead_daemon::auth::TcpListen>> {
    let Some(addr) = a.listen else {
        if a.client_ca.is_some() || a.tokens.is_some() {
            return Err(crate::exit::fail(
                crate::exit::USAGE,
                "--client-ca and --tokens only apply with --listen ADDR",
            ));
        }
        return Ok(None);
    };
    match (&a.tls_cert, &a.tls_key, &a.client_ca, &a.tokens) {
        (Some(cert), Some(key), Some(ca), Some(tokens)) => {
            Ok(Some(bulkhead_daemon::auth::TcpListen {
                addr,
                tls_cert: std::path::absolute(cert)?,
                tls_key: std::path::absolute(key)?,
                client_ca: std::path::absolute(ca)?,
                tokens: std::path::absolute(tokens)?,
            }))
        }
        _ => {
            let missing: Vec<&str> = [
                ("--tls-cert", a.tls_cert.is_none()),
                ("--tls-key", a.tls_key.is_none()),
                ("--client-ca", a.client_ca.is_none()),
                ("--tokens", a.tokens.is_none()),
            ]
            .into_iter()
            .filter_map(|(flag, absent)| absent.then_some(flag))
            .collect();
            Err(crate::exit::fail(
                crate::exit::USAGE,
                format!(
                    "--listen {addr} requires mutual TLS and tokens: missing {}",
                    missing.join(", ")
                ),
            ))
        }
    }
}

/// The default workloads directory for `up`: `./examples/workloads` (a checkout of the
/// repository). Never a path baked in at build time: an installed binary must not serve
/// the source tree it was built from.
fn default_examples() -> anyhow::Result<PathBuf> {
    let here = PathBuf::from("examples/workloads");
    if here.is_dir() {
        return Ok(here);
    }
    Err(crate::exit::fail(
        crate::exit::USAGE,
        "no workloads directory: give one (`bulkhead up DIR`, --workloads DIR or \
         `workloads` in --config FILE), or run `bulkhead up` where examples/workloads is",
    ))
}

fn bulkhead_api_event(e: &bulkhead_core::event::Event) -> bulkhead_api::v1::Event {
    bulkhead_daemon::event_proto(e)
}
