//! `bulkhead serve` and `bulkhead up`: the daemon in this process.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use bulkhead_daemon::{Config, Daemon, LaunchArgs, WaitFor};
use tokio::sync::broadcast::error::RecvError;

use crate::cli::{ServeArgs, UpArgs};
use crate::output;

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

pub async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let tcp = listen_config(&a)?;
    if a.metrics.is_none() && (a.metrics_tokens.is_some() || a.metrics_insecure) {
        return Err(crate::exit::fail(
            crate::exit::USAGE,
            "--metrics-tokens and --metrics-insecure only apply with --metrics ADDR",
        ));
    }
    init_tracing(a.log_format);
    let mut cfg = Config::new(a.workloads, Some(a.state), None);
    cfg.log_max_bytes = a.log_max_bytes;
    cfg.image_cache_max_count = a.image_cache_max_count;
    cfg.image_cache_max_bytes = a.image_cache_max_bytes;
    cfg.event_retention = a.event_retention;
    cfg.fresh_state = a.fresh_state;
    cfg.event_sync = match a.event_sync {
        crate::cli::EventSync::Normal => bulkhead_daemon::store::Synchronous::Normal,
        crate::cli::EventSync::Full => bulkhead_daemon::store::Synchronous::Full,
    };
    cfg.metrics_addr = a.metrics;
    cfg.metrics_tokens = match &a.metrics_tokens {
        Some(p) => Some(std::path::absolute(p)?),
        None => None,
    };
    cfg.metrics_insecure = a.metrics_insecure;
    cfg.max_instances_per_namespace = a.max_instances_per_namespace;
    cfg.finished_kept = a.finished_kept;
    cfg.port_range = a.port_range;
    cfg.tcp = tcp;
    cfg.min_available_memory = a.min_available_memory;
    cfg.max_instances = a.max_instances;
    cfg.sandbox = !a.no_sandbox;
    cfg.cgroup_favordynmods = a.cgroup_favordynmods;
    // The daemon process parents the instances: it reaps their orphans (and works as PID 1).
    cfg.reap_orphans = true;
    // Instances are spawned through the keeper so that they survive a daemon crash.
    if !a.no_keeper {
        cfg.keeper =
            Some(std::env::current_exe().context("cannot find this program for the keeper")?);
    }
    // --socket is global; serve honours it too.
    cfg.socket = std::path::absolute(socket_for_serve(&cfg))?;
    let daemon = Daemon::start(cfg).await?;
    daemon
        .run_until_signalled()
        .await
        .context("signal handling")?;
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

/// `--socket`/`BULKHEAD_SOCKET` when given, else `<state>/bulkhead.sock`.
fn socket_for_serve(cfg: &Config) -> PathBuf {
    match std::env::args_os().position(|a| a == "--socket") {
        Some(i) => std::env::args_os()
            .nth(i + 1)
            .map(PathBuf::from)
            .unwrap_or_else(|| cfg.socket.clone()),
        None => std::env::var_os("BULKHEAD_SOCKET")
            .map(PathBuf::from)
            .unwrap_or_else(|| cfg.socket.clone()),
    }
}

/// The default workloads directory for `up`: `./examples/workloads`, else the one in the
/// source tree this binary was built from.
fn default_examples() -> anyhow::Result<PathBuf> {
    let here = PathBuf::from("examples/workloads");
    if here.is_dir() {
        return Ok(here);
    }
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/workloads");
    if built.is_dir() {
        return Ok(built);
    }
    anyhow::bail!(
        "no workloads directory given and no examples/workloads here; run `bulkhead up DIR`"
    )
}

pub async fn up(a: UpArgs) -> anyhow::Result<()> {
    init_tracing(crate::cli::LogFormat::Text);
    let dir = match a.dir {
        Some(d) => d,
        None => default_examples()?,
    };
    let mut cfg = Config::new(dir, Some(a.state), None);
    cfg.reap_orphans = true;
    if !a.no_keeper {
        cfg.keeper =
            Some(std::env::current_exe().context("cannot find this program for the keeper")?);
    }
    cfg.socket = std::path::absolute(socket_for_serve(&cfg))?;
    let socket = cfg.socket.clone();
    let daemon = Daemon::start(cfg).await?;
    let shared = daemon.shared().clone();

    // Print events as they happen, from this run on (earlier runs' events are kept in the
    // state database and shown by `bulkhead events`).
    let (history, mut live) = shared.events.subscribe(shared.events.last_id());
    let printer = tokio::spawn(async move {
        for e in history {
            println!("{}", output::event_line(&bulkhead_api_event(&e)));
        }
        loop {
            match live.recv().await {
                Ok(e) => println!("{}", output::event_line(&bulkhead_api_event(&e))),
                Err(RecvError::Lagged(n)) => println!("({n} events skipped)"),
                Err(RecvError::Closed) => return,
            }
        }
    });

    let cat = shared.catalog();
    for e in cat.entries.values() {
        if let Err(err) = &e.spec {
            let msg = format!("invalid workload {}: {err}", e.name);
            eprintln!("{}", bulkhead_core::text::escape_lines(&msg));
        }
    }
    let autostart: Vec<String> = cat
        .valid()
        .filter(|(_, s)| s.autostart)
        .map(|(_, s)| s.name.clone())
        .collect();
    eprintln!(
        "bulkhead up: {} workloads, autostarting {:?}; API on {} (try: bulkhead --socket {} list); Ctrl-C to stop",
        cat.entries.len(),
        autostart,
        socket.display(),
        socket.display()
    );
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
                eprintln!("autostart of {name} failed: {e}");
            }
        });
    }
    daemon
        .run_until_signalled()
        .await
        .context("signal handling")?;
    // Let the printer show the last events (terminated).
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    printer.abort();
    Ok(())
}

fn bulkhead_api_event(e: &bulkhead_core::event::Event) -> bulkhead_api::v1::Event {
    bulkhead_daemon::event_proto(e)
}
