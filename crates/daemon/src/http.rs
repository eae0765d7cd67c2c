//! The HTTP listener for monitoring (`bulkhead serve --metrics ADDR`).
//!
//! | path | answer |
//! |---|---|
//! | `GET /metrics` | Prometheus / OpenMetrics text ([`crate::metrics`]) |
//! | `GET /health` | JSON: status, uptime, instances by state, breakers not closed |
//! | `GET /ready` | 200 `ready` while serving, 503 `shutting down` once shutdown began, 503 while the keeper is down (replaced at once) or the state directory cannot be written |
//!
//! HTTP/1.1 only, plain text. It reads the registry and the metrics; it never changes
//! anything.
//!
//! **Authentication.** With `--metrics-tokens FILE` (a token file in the `--tokens`
//! format, see [`crate::auth`]) every path needs `Authorization: Bearer <token>` with a
//! token of that file, checked like the API's (SHA-256, constant time); anything else gets
//! 401 with `WWW-Authenticate: Bearer` before the path is looked at. Without it nothing is
//! asked, and the daemon refuses to start on an address that is not loopback unless
//! `--metrics-insecure` says so ([`crate::server`]).
//!
//! Each connection has a header-read timeout and at most [`MAX_CONNECTIONS`] are served at
//! once (more are closed on accept), so a slow or abusive client cannot pile up tasks.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use crate::auth::Tokens;
use crate::Shared;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 256;

/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The monitoring listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind metrics listener {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds the listener (before anything else starts, so a bad address fails start-up).
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// A running listener.
pub(crate) struct HttpServer {
    pub(crate) addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Serves the endpoints on `listener` until [`HttpServer::stop`].
    /// `tokens`: the tokens that may read the endpoints; `None`: no token is asked.
    pub(crate) fn start(
        listener: TcpListener,
        sh: Arc<Shared>,
        tokens: Option<Arc<Tokens>>,
    ) -> HttpServer {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (stop_tx, stop_rx) = oneshot::channel();
        let auth = if tokens.is_some() {
            " (a bearer token of --metrics-tokens required)"
        } else {
            ""
        };
        let task = tokio::spawn(accept_loop(listener, sh, tokens, stop_rx));
        tracing::info!("metrics and health on http://{addr}/metrics{auth}");
        HttpServer {
            addr,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    /// Stops accepting and closes every connection.
    pub(crate) async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    sh: Arc<Shared>,
    tokens: Option<Arc<Tokens>>,
    mut stop: oneshot::Receiver<()>,
) {
    // Dropping the set at the end aborts the connections still open.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of fds and the like: back off rather than spin.
                        tracing::warn!("metrics listener: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if conns.len() >= MAX_CONNECTIONS {
                    tracing::debug!("metrics listener: closing {peer}, {MAX_CONNECTIONS} connections open");
                    continue;
                }
                let sh = sh.clone();
                let tokens = tokens.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let sh = sh.clone();
                        let tokens = tokens.clone();
                        async move {
                            if let Some(t) = &tokens {
                                if !authenticated(t, &req) {
                                    return Ok::<_, Infallible>(unauthorized());
                                }
                            }
                            Ok::<_, Infallible>(route(&sh, req).await)
                        }
                    });
                    let res = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    if let Err(e) = res {
                        tracing::debug!("metrics listener: connection from {peer}: {e}");
                    }
                });
            }
        }
    }
}

type Resp = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

/// Whether the request carries a bearer token of `tokens`.
fn authenticated(tokens: &Tokens, req: &Request<Incoming>) -> bool {
    crate::auth::bearer(req.headers()).is_some_and(|t| tokens.verify(t).is_some())
}

fn unauthorized() -> Resp {
    let mut r = respond(
        StatusCode::UNAUTHORIZED,
        TEXT,
        "a bearer token is required (Authorization: Bearer <token>, a token of --metrics-tokens)\n",
    );
    r.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"bulkhead\""),
    );
    r
}

async fn route(sh: &Arc<Shared>, req: Request<Incoming>) -> Resp {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = respond(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET and HEAD are allowed\n",
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            let accept = req
                .headers()
                .get(hyper::header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            metrics(sh, crate::metrics::wants_openmetrics(accept)).await
        }
        "/health" => respond(StatusCode::OK, JSON, health(sh).to_string() + "\n"),
        "/ready" => {
            if shutting_down(sh) {
                respond(StatusCode::SERVICE_UNAVAILABLE, TEXT, "shutting down\n")
            } else if keeper_down(sh) {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    "the keeper is down (a new one is starting)\n",
                )
            } else if let Some(f) = sh.events.fault() {
                respond(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{f}\n"))
            } else {
                respond(StatusCode::OK, TEXT, "ready\n")
            }
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found; try /metrics, /health or /ready\n",
        ),
    }
}

async fn metrics(sh: &Arc<Shared>, openmetrics: bool) -> Resp {
    let sh2 = sh.clone();
    // Per-instance usage reads /proc: keep it off the reactor.
    match tokio::task::spawn_blocking(move || sh2.metrics.encode(&sh2)).await {
        Ok(Ok(text)) if openmetrics => respond(StatusCode::OK, crate::metrics::CONTENT_TYPE, text),
        Ok(Ok(text)) => respond(
            StatusCode::OK,
            crate::metrics::TEXT_CONTENT_TYPE,
            crate::metrics::to_text_format(&text),
        ),
        Ok(Err(e)) => {
            tracing::warn!("{e}");
            respond(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n"))
        }
        Err(e) => {
            tracing::warn!("metrics encoding task failed: {e}");
            respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                TEXT,
                format!("metrics encoding task failed: {e}\n"),
            )
        }
    }
}

/// `Shared::terminate_all` sets this first thing in a shutdown.
fn shutting_down(sh: &Shared) -> bool {
    sh.shutting_down.load(Ordering::SeqCst)
}

/// The keeper (spawning process instances) is down: launches wait for a new one.
fn keeper_down(sh: &Shared) -> bool {
    sh.keeper.as_ref().is_some_and(|k| !k.is_up())
}

/// The `/health` document.
pub(crate) fn health(sh: &Shared) -> serde_json::Value {
    let mut by_state = serde_json::Map::new();
    for st in bulkhead_core::instance::State::ALL {
        by_state.insert(st.as_str().to_owned(), 0.into());
    }
    let views: Vec<_> = sh.list().iter().map(|s| s.view()).collect();
    for v in &views {
        if let Some(n) = by_state.get_mut(v.state.as_str()) {
            *n = (n.as_u64().unwrap_or(0) + 1).into();
        }
    }
    let live = views.iter().filter(|v| !v.state.is_terminal()).count();
    let breakers: Vec<serde_json::Value> = sh
        .metrics
        .breakers()
        .into_iter()
        .filter(|(_, b)| *b != bulkhead_core::restart::BreakerState::Closed)
        .map(|(id, b)| serde_json::json!({ "instance": id.as_str(), "state": b.as_str() }))
        .collect();
    let cat = sh.catalog();
    let valid = cat.entries.values().filter(|e| e.spec.is_ok()).count();
    let fault = sh.events.fault();
    serde_json::json!({
        "status": if shutting_down(sh) {
            "shutting_down"
        } else if keeper_down(sh) || fault.is_some() {
            "degraded"
        } else {
            "serving"
        },
        "keeper": sh.keeper.as_ref().map(|k| serde_json::json!({
            "pid": k.client().peer_pid(),
            "up": k.is_up(),
        })),
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "uptime_seconds": sh.uptime().as_secs_f64(),
        "last_event_id": sh.events.last_id(),
        // Whether events can be stored; while not, what needs one is refused.
        "state": match &fault {
            None => serde_json::json!({ "writable": true }),
            Some(f) => serde_json::json!({
                "writable": false,
                "error": f.to_string(),
                "held_events": f.held,
                "since_ms": f.since_ms,
            }),
        },
        "workloads": { "valid": valid, "invalid": cat.entries.len() - valid },
        "instances": {
            "total": views.len(),
            "live": live,
            "by_state": by_state,
        },
        "open_breakers": breakers,
        "process_tracking": sh.process_tracking,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
        get_with(addr, method, path, "").await
    }

    async fn get_with(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &str,
    ) -> (u16, String, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        let (head, body) = buf.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, head.to_owned(), body.to_owned())
    }

    fn shared() -> Arc<Shared> {
        let dir = std::path::PathBuf::from("/nonexistent");
        let cfg = crate::Config::new(dir.join("workloads"), Some(dir.join("state")), None);
        Arc::new(Shared::new(cfg, crate::events::EventLog::new(), None, None))
    }

    #[tokio::test]
    async fn endpoints_answer_and_ready_turns_503_on_shutdown() {
        let sh = shared();
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let srv = HttpServer::start(listener, sh.clone(), None);
        let task = sh.metrics.start(&sh);
        let id = bulkhead_core::key::InstanceId::parse("shared:w").unwrap().0;
        sh.events.publish(
            &id,
            bulkhead_core::event::EventKind::BreakerOpen {
                failures: 3,
                reason: "crash loop".into(),
            },
        );
        sh.metrics.record_launch("failed");

        // Prometheus asks for OpenMetrics and gets it.
        let (st, head, body) = get_with(
            srv.addr,
            "GET",
            "/metrics",
            "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n",
        )
        .await;
        assert_eq!(st, 200);
        assert!(head.contains("application/openmetrics-text"), "{head}");
        assert!(body.contains("bulkhead_launches_total{result=\"failed\"} 1\n"));
        assert!(body.contains("# TYPE bulkhead_launches counter\n"));
        assert!(body.ends_with("# EOF\n"));
        // Any other client gets the classic text format.
        let (st, head, body) = get(srv.addr, "GET", "/metrics").await;
        assert_eq!(st, 200);
        assert!(head.contains("text/plain; version=0.0.4"), "{head}");
        assert!(
            body.contains("# TYPE bulkhead_launches_total counter\n"),
            "{body}"
        );
        assert!(body.contains("bulkhead_launches_total{result=\"failed\"} 1\n"));
        assert!(
            !body.contains("# EOF") && !body.contains("# UNIT"),
            "{body}"
        );

        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let health = loop {
            let (st, _, body) = get(srv.addr, "GET", "/health").await;
            assert_eq!(st, 200);
            let h: serde_json::Value = serde_json::from_str(&body).unwrap();
            if h["open_breakers"].as_array().is_some_and(|a| !a.is_empty()) {
                break h;
            }
            assert!(tokio::time::Instant::now() < deadline, "no breaker: {h}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(health["status"], "serving");
        assert_eq!(health["instances"]["total"], 0);
        assert_eq!(health["instances"]["by_state"]["ready"], 0);
        assert_eq!(health["open_breakers"][0]["instance"], "shared:w");
        assert_eq!(health["open_breakers"][0]["state"], "open");
        assert!(health["uptime_seconds"].as_f64().is_some());

        assert_eq!(get(srv.addr, "GET", "/ready").await.0, 200);
        assert_eq!(get(srv.addr, "GET", "/nope").await.0, 404);
        let (st, head, _) = get(srv.addr, "POST", "/metrics").await;
        assert_eq!(st, 405);
        assert!(head.to_ascii_lowercase().contains("allow: get, head"));

        sh.terminate_all().await;
        assert_eq!(get(srv.addr, "GET", "/ready").await.0, 503);
        let (_, _, body) = get(srv.addr, "GET", "/health").await;
        assert!(body.contains("\"shutting_down\""));

        let addr = srv.addr;
        srv.stop().await;
        task.abort();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn a_bind_error_names_the_address() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = bind(addr).await.unwrap_err();
        assert!(e
            .to_string()
            .starts_with(&format!("cannot bind metrics listener {addr}: ")));
    }
}
