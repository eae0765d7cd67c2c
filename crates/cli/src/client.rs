//! The client verbs: one function per subcommand, talking gRPC over the Unix socket.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use bulkhead_api::v1;
use bulkhead_core::key::InstanceId;
use bulkhead_core::text::escape;

use crate::cli::{self, Format};
use crate::exit::{self, fail, from_status};
use crate::output::{self, out, outln};

/// The remote daemon of `--tcp`, when given (set once by `main`).
static REMOTE: std::sync::OnceLock<bulkhead_api::TcpOptions> = std::sync::OnceLock::new();

/// Reads the TLS files of `--tcp`; from then on [`connect`] dials the TCP listener.
pub fn use_remote(r: &cli::RemoteArgs) -> anyhow::Result<()> {
    let Some(addr) = &r.tcp else {
        return Ok(());
    };
    let read = |flag: &str, p: &Path| {
        std::fs::read(p).map_err(|e| {
            fail(
                exit::INVALID,
                format!("cannot read {flag} {}: {e}", p.display()),
            )
        })
    };
    let Some(ca) = &r.tls_ca else {
        return Err(fail(
            exit::USAGE,
            "--tcp needs --tls-ca (the CA that signed the daemon's certificate)",
        ));
    };
    let client_identity = match (&r.tls_cert, &r.tls_key) {
        (Some(c), Some(k)) => Some((read("--tls-cert", c)?, read("--tls-key", k)?)),
        (None, None) => None,
        _ => return Err(fail(exit::USAGE, "--tls-cert and --tls-key go together")),
    };
    let opts = bulkhead_api::TcpOptions {
        addr: addr.clone(),
        ca_pem: read("--tls-ca", ca)?,
        client_identity,
        token: r.token.clone(),
    };
    let _ = REMOTE.set(opts);
    Ok(())
}

/// Whether the client talks to a daemon over TCP (`--tcp`).
pub fn is_remote() -> bool {
    REMOTE.get().is_some()
}

pub async fn connect(socket: &Path) -> anyhow::Result<bulkhead_api::Client> {
    if let Some(opts) = REMOTE.get() {
        return bulkhead_api::connect_tcp(opts.clone()).await.map_err(|e| {
            let mut msg = e.to_string();
            let mut cur = std::error::Error::source(&e);
            while let Some(c) = cur {
                msg = format!("{msg}: {c}");
                cur = c.source();
            }
            if opts.client_identity.is_none() {
                msg.push_str(" (no client certificate given: the daemon requires one, --tls-cert and --tls-key)");
            }
            fail(
                exit::UNAVAILABLE,
                format!("cannot reach the bulkhead daemon over TCP: {msg}"),
            )
        });
    }
    bulkhead_api::connect_unix(socket).await.map_err(|e| {
        let cause = std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_else(|| e.to_string());
        fail(
            exit::UNAVAILABLE,
            format!(
                "cannot reach the bulkhead daemon at {}: {cause} (is `bulkhead serve` running? set --socket or BULKHEAD_SOCKET)",
                socket.display()
            ),
        )
    })
}

/// `--grace` as the request's `grace_ms` (absent: the manifest's).
fn grace_ms(grace: Option<&str>) -> anyhow::Result<Option<u64>> {
    Ok(grace
        .map(|g| parse_duration("--grace", g))
        .transpose()?
        .map(|g| g.as_millis() as u64))
}

pub(crate) fn parse_duration(what: &str, s: &str) -> anyhow::Result<Duration> {
    bulkhead_core::duration::parse(s).map_err(|e| fail(exit::INVALID, format!("{what}: {e}")))
}

/// Validates an id locally so that a typo gets a clear error without a round trip.
fn check_id(id: &str) -> anyhow::Result<()> {
    InstanceId::parse(id)
        .map(drop)
        .map_err(|e| fail(exit::INVALID, e.to_string()))
}

fn print_instance(inst: &v1::Instance, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => print_json(&output::instance_json(inst)),
        Format::Text => {
            outln!("{}", output::instance_line(inst));
            Ok(())
        }
    }
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    // Serialised first: a closed stdout then fails as an io::Error (which `main` treats as
    // success), not as a serde_json::Error wrapping it.
    let mut buf = serde_json::to_vec_pretty(v)?;
    buf.push(b'\n');
    let mut out = std::io::stdout().lock();
    out.write_all(&buf)?;
    out.flush()?;
    Ok(())
}

pub async fn launch(socket: &Path, a: cli::LaunchArgs) -> anyhow::Result<()> {
    let timeout = a
        .timeout
        .as_deref()
        .map(|t| parse_duration("--timeout", t))
        .transpose()?;
    let wait = match a.wait {
        cli::Wait::None => v1::WaitFor::None,
        cli::Wait::Started => v1::WaitFor::Started,
        cli::Wait::Ready => v1::WaitFor::Ready,
    };
    let mut c = connect(socket).await?;
    let resp = c
        .launch(v1::LaunchRequest {
            workload: a.workload,
            namespace: a.namespace,
            session: a.session,
            wait: wait as i32,
            timeout_ms: timeout.map(|t| t.as_millis() as u64).unwrap_or(0),
            lease: a.lease,
        })
        .await
        .map_err(from_status)?
        .into_inner();
    let inst = resp.instance.context("daemon sent no instance")?;
    match a.output {
        Format::Json => {
            let mut v = output::instance_json(&inst);
            v["created"] = serde_json::json!(resp.created);
            print_json(&v)
        }
        Format::Text => {
            outln!(
                "{} ({})",
                output::instance_line(&inst),
                if resp.created { "created" } else { "reused" }
            );
            Ok(())
        }
    }
}

pub async fn get(socket: &Path, a: cli::GetArgs) -> anyhow::Result<()> {
    check_id(&a.id)?;
    let mut c = connect(socket).await?;
    let inst = c
        .get(v1::GetRequest {
            id: a.id,
            ..Default::default()
        })
        .await
        .map_err(from_status)?
        .into_inner();
    print_instance(&inst, a.output)
}

pub async fn list(socket: &Path, a: cli::ListArgs) -> anyhow::Result<()> {
    let mut c = connect(socket).await?;
    // The daemon filters (and so reads no usage of what it leaves out).
    let list = c
        .list(v1::ListRequest {
            workloads: a.workload.clone(),
            namespace: a.namespace.clone().unwrap_or_default(),
            session: a.session.clone().unwrap_or_default(),
            states: a.state.clone(),
        })
        .await
        .map_err(from_status)?
        .into_inner()
        .instances;
    match a.output {
        Format::Json => print_json(&serde_json::Value::Array(
            list.iter().map(output::instance_json).collect(),
        )),
        Format::Text => {
            out!(
                "{}",
                output::instance_table(&list, output::now_ms(), output::colour(&std::io::stdout()))
            );
            Ok(())
        }
    }
}

pub async fn terminate(socket: &Path, a: cli::TerminateArgs) -> anyhow::Result<()> {
    check_id(&a.id)?;
    let grace_ms = grace_ms(a.grace.as_deref())?;
    let mut c = connect(socket).await?;
    let inst = c
        .terminate(v1::TerminateRequest {
            id: a.id,
            grace_ms,
            with_dependencies: a.with_dependencies,
        })
        .await
        .map_err(from_status)?
        .into_inner();
    print_instance(&inst, a.output)
}

pub async fn restart(socket: &Path, a: cli::RestartArgs) -> anyhow::Result<()> {
    check_id(&a.id)?;
    let grace_ms = grace_ms(a.grace.as_deref())?;
    let mut c = connect(socket).await?;
    let inst = c
        .restart(v1::RestartRequest {
            id: a.id,
            grace_ms,
            new_spec: a.new_spec,
        })
        .await
        .map_err(from_status)?
        .into_inner();
    print_instance(&inst, a.output)
}

pub async fn rollout(socket: &Path, a: cli::RolloutArgs) -> anyhow::Result<()> {
    let grace_ms = grace_ms(a.grace.as_deref())?;
    let mut c = connect(socket).await?;
    let steps = c
        .rollout(v1::RolloutRequest {
            workload: a.workload.clone(),
            grace_ms,
        })
        .await
        .map_err(from_status)?
        .into_inner()
        .steps;
    let failed = steps.iter().find(|s| s.outcome == "failed").cloned();
    match a.output {
        Format::Json => out!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "workload": a.workload,
                "steps": steps
                    .iter()
                    .map(|s| serde_json::json!({
                        "id": s.id,
                        "outcome": s.outcome,
                        "reason": s.reason,
                        "rolled_back": s.rolled_back,
                    }))
                    .collect::<Vec<_>>(),
            }))?
        ),
        Format::Text => {
            if steps.is_empty() {
                out!("no live instance of {}", a.workload);
            }
            for s in &steps {
                match s.outcome.as_str() {
                    "failed" => out!(
                        "{}\tfailed: {} ({})",
                        s.id,
                        bulkhead_core::text::escape(&s.reason),
                        if s.rolled_back {
                            "rolled back to its previous manifest"
                        } else {
                            "its previous manifest did not become ready either"
                        }
                    ),
                    o => out!("{}\t{}", s.id, bulkhead_core::text::escape(o)),
                }
            }
        }
    }
    match failed {
        // The answer is printed; the exit code says the rollout did not complete.
        Some(s) => Err(crate::exit::fail(
            crate::exit::LAUNCH_FAILED,
            format!(
                "rollout of {} stopped: {} failed on the new manifest",
                a.workload, s.id
            ),
        )),
        None => Ok(()),
    }
}

pub async fn events(socket: &Path, a: cli::EventsArgs) -> anyhow::Result<()> {
    let mut c = connect(socket).await?;
    let mut stream = c
        .watch(v1::WatchRequest {
            since_id: a.since,
            history_only: !a.follow,
        })
        .await
        .map_err(from_status)?
        .into_inner();
    while let Some(e) = stream.message().await.map_err(from_status)? {
        let mut out = std::io::stdout().lock();
        match a.output {
            Format::Json => {
                let mut line = serde_json::to_vec(&output::event_json(&e))?;
                line.push(b'\n');
                out.write_all(&line)?;
            }
            Format::Text => writeln!(out, "{}", output::event_line(&e))?,
        }
        out.flush()?;
    }
    Ok(())
}

pub async fn logs(socket: &Path, a: cli::LogsArgs) -> anyhow::Result<()> {
    check_id(&a.id)?;
    let since_unix_ms = match &a.since {
        None => 0,
        Some(s) => since_ms(s, now_ms())?,
    };
    let mut c = connect(socket).await?;
    let mut stream = c
        .logs(v1::LogsRequest {
            id: a.id,
            follow: a.follow,
            tail_lines: a.tail,
            since_unix_ms,
        })
        .await
        .map_err(from_status)?
        .into_inner();
    // Whether the last line printed of each stream was partial (its rest follows, with no
    // prefix of its own).
    let mut open = [false; 4];
    while let Some(chunk) = stream.message().await.map_err(from_status)? {
        let mut out = std::io::stdout().lock();
        let mut err = std::io::stderr().lock();
        for l in chunk.lines {
            let stream = v1::LogStream::try_from(l.stream).unwrap_or(v1::LogStream::Stdout);
            let name = match stream {
                v1::LogStream::Stderr => "stderr",
                v1::LogStream::Bulkhead => "bulkhead",
                _ => "stdout",
            };
            if a.output == Format::Json {
                let v = serde_json::json!({
                    "time": bulkhead_core::time::rfc3339(l.time_unix_ms),
                    "stream": name,
                    "run": l.run,
                    "line": String::from_utf8_lossy(&l.data),
                    "partial": l.partial,
                });
                writeln!(out, "{v}")?;
                continue;
            }
            let to: &mut dyn Write = match stream {
                v1::LogStream::Stderr | v1::LogStream::Bulkhead => &mut err,
                _ => &mut out,
            };
            let slot = &mut open[stream as usize % 4];
            if !*slot {
                if a.timestamps {
                    write!(
                        to,
                        "{} {name} ",
                        bulkhead_core::time::rfc3339(l.time_unix_ms)
                    )?;
                }
                if stream == v1::LogStream::Bulkhead {
                    to.write_all(b"--- ")?;
                }
            }
            to.write_all(&l.data)?;
            if !l.partial {
                if stream == v1::LogStream::Bulkhead {
                    to.write_all(b" ---")?;
                }
                to.write_all(b"\n")?;
            }
            *slot = l.partial;
        }
        out.flush()?;
        err.flush()?;
    }
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `--since`: a duration back from `now_ms` (`10m`) or a time (RFC 3339).
fn since_ms(s: &str, now_ms: u64) -> anyhow::Result<u64> {
    if let Some(t) = bulkhead_core::time::parse_rfc3339(s) {
        return Ok(t.max(1));
    }
    match bulkhead_core::duration::parse(s) {
        Ok(d) => Ok(now_ms.saturating_sub(d.as_millis() as u64).max(1)),
        Err(_) => Err(fail(
            exit::INVALID,
            format!("--since {s:?}: not a duration (10m, 2h) or a time (2026-12-03T10:00:00Z)"),
        )),
    }
}

pub async fn health(socket: &Path, a: cli::OutputArgs) -> anyhow::Result<()> {
    let mut c = connect(socket).await?;
    let h = c
        .health(v1::HealthRequest {})
        .await
        .map_err(from_status)?
        .into_inner();
    match a.output {
        Format::Json => print_json(&serde_json::json!({
            "status": h.status,
            "reason": if h.reason.is_empty() { None } else { Some(&h.reason) },
            "version": h.version,
            "pid": h.pid,
            "uptime_ms": h.uptime_ms,
            "instances_live": h.instances_live,
            "workloads_valid": h.workloads_valid,
            "workloads_invalid": h.workloads_invalid,
            "last_event_id": h.last_event_id,
            "drivers": h.drivers,
            "state_dir": h.state_dir,
            "workloads_dir": h.workloads_dir,
            "process_tracking": h.process_tracking,
            "process_spare": h.process_spare.as_ref().map(|s| serde_json::json!({
                "ready": s.ready,
                "launches": s.launches,
                "made": s.made,
            })),
            "warm": h.warm.iter().map(|w| serde_json::json!({
                "workload": w.workload,
                "ready": w.ready,
                "memory_bytes": w.memory_bytes,
            })).collect::<Vec<_>>(),
            "sandbox": h.sandbox.as_ref().map(|s| serde_json::json!({
                "available": s.available,
                "cgroup_mode": s.cgroup_mode,
                "controllers": s.controllers,
                "clone_into_cgroup": s.clone_into_cgroup,
                "favordynmods": s.favordynmods,
                "landlock_abi": s.landlock_abi,
                "abstract_sockets_scoped": s.landlock_abi >= 6,
                "error": if s.error.is_empty() { None } else { Some(&s.error) },
            })),
        })),
        Format::Text => {
            outln!(
                "{} (bulkhead {}, pid {}, up {})\ninstances live: {}\nworkloads: {} valid, {} invalid ({})\ndrivers: {}\nstate: {}\nlast event: {}",
                // Degraded names the state directory: a path, printed escaped.
                if h.reason.is_empty() {
                    escape(&h.status).into_owned()
                } else {
                    format!("{}: {}", escape(&h.status), escape(&h.reason))
                },
                h.version,
                h.pid,
                output::human_age(h.uptime_ms),
                h.instances_live,
                h.workloads_valid,
                h.workloads_invalid,
                escape(&h.workloads_dir),
                h.drivers.join(", "),
                escape(&h.state_dir),
                h.last_event_id
            );
            if !h.process_tracking.is_empty() {
                outln!(
                    "process instances tracked by: {}",
                    escape(&h.process_tracking)
                );
            }
            if let Some(s) = &h.process_spare {
                outln!(
                    "process spare: {} ({} launch{} took one)",
                    if s.ready { "ready" } else { "being made" },
                    s.launches,
                    if s.launches == 1 { "" } else { "es" }
                );
            }
            for w in &h.warm {
                outln!(
                    "warm pool {}: {} ready ({})",
                    escape(&w.workload),
                    w.ready,
                    output::human_bytes(w.memory_bytes)
                );
            }
            if let Some(s) = &h.sandbox {
                if s.available {
                    outln!(
                        "sandbox: cgroups {} (limits: {}; born in its cgroup: {}; favordynmods: {}); abstract sockets: {}",
                        s.cgroup_mode,
                        if s.controllers.is_empty() {
                            "none".to_owned()
                        } else {
                            s.controllers.join(", ")
                        },
                        if s.clone_into_cgroup {
                            "yes"
                        } else {
                            "no, attached before exec"
                        },
                        if s.favordynmods { "on" } else { "off" },
                        if s.landlock_abi >= 6 {
                            "scoped (Landlock)".to_owned()
                        } else {
                            format!("not scoped (Landlock ABI {} < 6)", s.landlock_abi)
                        }
                    );
                } else {
                    outln!("sandbox: unavailable ({})", escape(&s.error));
                }
            }
            Ok(())
        }
    }
}

fn print_workloads(list: &[v1::Workload], format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => print_json(&serde_json::Value::Array(
            list.iter()
                .map(|w| {
                    serde_json::json!({
                        "name": w.name,
                        "path": w.path,
                        "valid": w.valid,
                        "error": w.error,
                        "driver": if w.valid { Some(&w.driver) } else { None },
                        "isolation": if w.valid { Some(&w.isolation) } else { None },
                        "autostart": w.autostart,
                        "description": w.description,
                        "depends_on": if w.valid {
                            Some(w.depends_on.iter().map(|d| (d.name.clone(), serde_json::json!({"condition": d.condition}))).collect::<serde_json::Map<_, _>>())
                        } else {
                            None
                        },
                        "on_dependency_restart": if w.valid { Some(&w.on_dependency_restart) } else { None },
                        "spec": w.spec_json.as_deref().and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok()),
                    })
                })
                .collect(),
        )),
        Format::Text => {
            let rows: Vec<[String; 6]> = list
                .iter()
                .map(|w| {
                    if w.valid {
                        [
                            w.name.clone(),
                            "valid".into(),
                            w.driver.clone(),
                            w.isolation.clone(),
                            depends_text(w),
                            if w.autostart { "autostart".into() } else { w.description.clone().unwrap_or_default() },
                        ]
                    } else {
                        [w.name.clone(), "INVALID".into(), "-".into(), "-".into(), "-".into(), w.error.clone().unwrap_or_default()]
                    }
                })
                .collect();
            out!("{}", output::table(&["NAME", "STATUS", "DRIVER", "ISOLATION", "DEPENDS", "NOTES"], &rows));
            Ok(())
        }
    }
}

/// The DEPENDS column: `db,cache:started` (a condition other than `ready` is shown).
fn depends_text(w: &v1::Workload) -> String {
    if w.depends_on.is_empty() {
        return "-".into();
    }
    w.depends_on
        .iter()
        .map(|d| {
            if d.condition == "ready" {
                d.name.clone()
            } else {
                format!("{}:{}", d.name, d.condition)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

pub async fn workloads(socket: &Path, a: cli::WorkloadsArgs) -> anyhow::Result<()> {
    let mut c = connect(socket).await?;
    let list = c
        .list_workloads(v1::ListWorkloadsRequest {})
        .await
        .map_err(from_status)?
        .into_inner()
        .workloads;
    if a.graph {
        out!("{}", output::dependency_tree(&list));
        return Ok(());
    }
    print_workloads(&list, a.output)
}

pub async fn reload(socket: &Path) -> anyhow::Result<()> {
    let mut c = connect(socket).await?;
    let list = c
        .reload(v1::ReloadRequest {})
        .await
        .map_err(from_status)?
        .into_inner()
        .workloads;
    print_workloads(&list, Format::Text)
}

pub async fn release(socket: &Path, a: cli::ReleaseArgs) -> anyhow::Result<()> {
    check_id(&a.id)?;
    let mut c = connect(socket).await?;
    let inst = c
        .release(v1::ReleaseRequest {
            id: a.id,
            holder: a.holder,
        })
        .await
        .map_err(from_status)?
        .into_inner();
    print_instance(&inst, a.output)
}

pub async fn end_scope(socket: &Path, a: cli::EndScopeArgs, session: bool) -> anyhow::Result<()> {
    let grace_ms = grace_ms(a.grace.as_deref())?;
    let req = v1::EndScopeRequest {
        name: a.name,
        grace_ms,
    };
    let mut c = connect(socket).await?;
    let resp = if session {
        c.end_session(req).await
    } else {
        c.end_namespace(req).await
    }
    .map_err(from_status)?
    .into_inner();
    match a.output {
        Format::Json => print_json(&serde_json::Value::Array(
            resp.terminated.iter().map(output::instance_json).collect(),
        )),
        Format::Text => {
            for i in &resp.terminated {
                outln!("{}", output::instance_line(i));
            }
            Ok(())
        }
    }
}

/// `bulkhead images [prune] [-o json]`.
pub async fn images(socket: &Path, a: cli::ImagesArgs) -> anyhow::Result<()> {
    let mut c = connect(socket).await?;
    let resp = match a.action {
        None => c.list_images(v1::ListImagesRequest {}).await,
        Some(cli::ImagesAction::Prune) => c.prune_images(v1::PruneImagesRequest {}).await,
    }
    .map_err(from_status)?
    .into_inner();
    match a.output {
        Format::Json => print_json(&serde_json::Value::Array(
            resp.images
                .iter()
                .map(|i| {
                    serde_json::json!({
                        "hash": i.hash,
                        "tag": i.tag,
                        "workload": i.workload,
                        "size_bytes": i.size_bytes,
                        "created_s": i.created_s,
                        "last_used_s": i.last_used_s,
                        "in_use": i.in_use,
                        "base": (!i.base.is_empty()).then_some(&i.base),
                    })
                })
                .collect(),
        )),
        Format::Text => {
            if a.action.is_some() {
                outln!("removed {} images", resp.images.len());
            }
            outln!(
                "{:<40} {:>10} {:<6} {:<24} BASE",
                "TAG",
                "SIZE",
                "IN USE",
                "WORKLOAD"
            );
            for i in &resp.images {
                outln!(
                    "{:<40} {:>10} {:<6} {:<24} {}",
                    escape(&i.tag),
                    output::human_bytes(i.size_bytes),
                    if i.in_use { "yes" } else { "no" },
                    escape(&i.workload),
                    if i.base.is_empty() {
                        "-".into()
                    } else {
                        escape(&i.base)
                    }
                );
            }
            Ok(())
        }
    }
}
