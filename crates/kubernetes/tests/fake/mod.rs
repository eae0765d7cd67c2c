//! A small simulated Kubernetes API server behind kube's tower mock service: it keeps
//! Pods, answers list / watch (with history, by resource version) / get / create /
//! delete / log, records every request, and lets a test replay recorded watch events
//! (JSON lines in the API server's own shape).
//!
//! Its "kubelet" is minimal and optional: with `autostart`, a created Pod's container
//! is running at once (Ready when it has no readiness probe); a delete marks the Pod
//! terminating, ends its container (exit 143 if it ran) and removes it.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::StreamBody;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

pub type Body = StreamBody<UnboundedReceiverStream<Result<Frame<Bytes>, Infallible>>>;
type Chunks = mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>;

/// One request as the fake API server received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Option<Value>,
}

impl Recorded {
    /// The value of a query parameter, percent-decoded.
    pub fn param(&self, key: &str) -> Option<String> {
        self.query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == key).then(|| decode(v))
        })
    }
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Watch {
    namespace: Option<String>,
    selector: Option<String>,
    tx: Chunks,
}

#[derive(Default)]
struct State {
    rv: u64,
    pods: BTreeMap<(String, String), Value>,
    /// (resource version, namespace, event line)
    history: Vec<(u64, String, Value)>,
    requests: Vec<Recorded>,
    watches: Vec<Watch>,
    logs: BTreeMap<String, Vec<u8>>,
    log_streams: Vec<(String, Chunks)>,
    /// `None`: no metrics server (the API group is unknown); else PodMetrics by Pod.
    metrics: Option<BTreeMap<String, Value>>,
}

/// The fake API server.
#[derive(Default)]
pub struct FakeApi {
    state: Mutex<State>,
    pub autostart: std::sync::atomic::AtomicBool,
    /// Runs each created Pod's container as a local process (see [`FakeApi::run`]).
    pub kubelet: std::sync::atomic::AtomicBool,
    /// Answers a cluster-wide list with 403, as RBAC limited to a namespace does.
    pub forbid_cluster_list: std::sync::atomic::AtomicBool,
    /// Process groups of the containers the local kubelet runs, by Pod name.
    running: Mutex<BTreeMap<String, i32>>,
    notify: tokio::sync::Notify,
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn matches(selector: Option<&str>, pod: &Value) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    sel.split(',').all(|term| {
        let (k, v) = term.split_once('=').unwrap_or((term, ""));
        pod["metadata"]["labels"][k].as_str() == Some(v)
    })
}

impl FakeApi {
    pub fn new() -> Arc<FakeApi> {
        Arc::new(FakeApi::default())
    }

    /// A kube client whose every request this fake answers.
    pub fn client(self: &Arc<Self>) -> kube::Client {
        let (svc, mut handle) =
            tower_test::mock::pair::<Request<kube::client::Body>, Response<Body>>();
        let me = self.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let me = me.clone();
                tokio::spawn(async move {
                    let resp = me.serve(req).await;
                    send.send_response(resp);
                });
            }
        });
        kube::Client::new(svc, "default")
    }

    /// Serves this fake over plain HTTP on 127.0.0.1 (for a client that is not in this
    /// process: the daemon, configured by a kubeconfig naming the returned URL).
    pub async fn serve_http(self: &Arc<Self>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let me = self.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let me = me.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let me = me.clone();
                            async move {
                                use http_body_util::BodyExt;
                                let (parts, body) = req.into_parts();
                                let bytes = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let req = Request::from_parts(
                                    parts,
                                    kube::client::Body::from(bytes.to_vec()),
                                );
                                Ok::<_, Infallible>(me.serve(req).await)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        url
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// Waits until a request matching `f` has arrived; returns it.
    pub async fn wait_request(&self, f: impl Fn(&Recorded) -> bool) -> Recorded {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let n = self.notify.notified();
            if let Some(r) = self.requests().into_iter().find(|r| f(r)) {
                return r;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("no such request after 20 s; got {:#?}", self.requests());
            }
            let _ = tokio::time::timeout(std::time::Duration::from_millis(200), n).await;
        }
    }

    pub fn pod(&self, ns: &str, name: &str) -> Option<Value> {
        self.lock().pods.get(&(ns.into(), name.into())).cloned()
    }

    /// Ends the Pod's log streams as a broken connection would (the Pod still runs).
    pub fn break_logs(&self, pod: &str) {
        self.lock().log_streams.retain(|(p, _)| p != pod);
    }

    /// Serves the metrics API with this Pod's working set.
    pub fn set_memory(&self, pod: &str, quantity: &str) {
        self.lock().metrics.get_or_insert_with(BTreeMap::new).insert(
            pod.to_owned(),
            json!({"kind": "PodMetrics", "apiVersion": "metrics.k8s.io/v1beta1",
                "metadata": {"name": pod}, "timestamp": "2026-12-03T20:00:00Z", "window": "15s",
                "containers": [{"name": "main", "usage": {"cpu": "1000000n", "memory": quantity}}]}),
        );
    }

    pub fn set_log(&self, pod: &str, text: &[u8]) {
        self.lock().logs.insert(pod.to_owned(), text.to_vec());
    }

    /// Puts a Pod in the store (as if created before), with an ADDED event.
    pub fn insert(&self, mut pod: Value) {
        let mut st = self.lock();
        st.rv += 1;
        pod["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        let ns = pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let name = pod["metadata"]["name"].as_str().unwrap().to_owned();
        st.pods.insert((ns.clone(), name), pod.clone());
        let rv = st.rv;
        Self::broadcast(&mut st, rv, &ns, json!({"type": "ADDED", "object": pod}));
    }

    /// Removes a Pod with no event (as if deleted while the watch was down).
    pub fn remove_silently(&self, ns: &str, name: &str) {
        self.lock().pods.remove(&(ns.into(), name.into()));
    }

    /// Replays one recorded watch event (`{"type": ..., "object": ...}`) to the
    /// watches of `ns`, and applies it to the store. `ERROR` events are only sent.
    pub fn emit(&self, ns: &str, mut event: Value) {
        let mut st = self.lock();
        if event["type"] == "ERROR" {
            let line = format!("{event}\n");
            st.watches.retain(|w| {
                w.namespace.as_deref().is_none_or(|n| n == ns)
                    && w.tx
                        .send(Ok(Frame::data(Bytes::from(line.clone()))))
                        .is_ok()
            });
            return;
        }
        st.rv += 1;
        let rv = st.rv;
        event["object"]["metadata"]["resourceVersion"] = json!(rv.to_string());
        let name = event["object"]["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_owned();
        let key = (ns.to_owned(), name.clone());
        if event["type"] == "DELETED" {
            st.pods.remove(&key);
        } else {
            st.pods.insert(key, event["object"].clone());
        }
        let ended = event["type"] == "DELETED"
            || event["object"]["status"]["containerStatuses"][0]["state"]["terminated"].is_object();
        if ended {
            st.log_streams.retain(|(p, _)| *p != name);
        }
        Self::broadcast(&mut st, rv, ns, event);
    }

    fn broadcast(st: &mut State, rv: u64, ns: &str, event: Value) {
        st.history.push((rv, ns.to_owned(), event.clone()));
        let line = format!("{event}\n");
        st.watches.retain(|w| {
            if w.namespace.as_deref().is_some_and(|n| n != ns)
                || !matches(w.selector.as_deref(), &event["object"])
            {
                return !w.tx.is_closed();
            }
            w.tx.send(Ok(Frame::data(Bytes::from(line.clone()))))
                .is_ok()
        });
    }

    fn one(code: StatusCode, body: &Value) -> Response<Body> {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(Ok(Frame::data(Bytes::from(body.to_string()))));
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(StreamBody::new(UnboundedReceiverStream::new(rx)))
            .unwrap()
    }

    async fn serve(self: Arc<Self>, req: Request<kube::client::Body>) -> Response<Body> {
        let method = req.method().to_string();
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
        let body = serde_json::from_slice::<Value>(&bytes).ok();
        let rec = Recorded {
            method: method.clone(),
            path: path.clone(),
            query,
            body: body.clone(),
        };
        self.lock().requests.push(rec.clone());
        self.notify.notify_waiters();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        if let ["apis", "metrics.k8s.io", "v1beta1", "namespaces", _, "pods", name] =
            parts.as_slice()
        {
            let st = self.lock();
            return match &st.metrics {
                None => Self::one(
                    StatusCode::NOT_FOUND,
                    &status(
                        404,
                        "NotFound",
                        "the server could not find the requested resource",
                    ),
                ),
                Some(m) => match m.get(*name) {
                    Some(v) => Self::one(StatusCode::OK, v),
                    None => Self::one(
                        StatusCode::NOT_FOUND,
                        &status(
                            404,
                            "NotFound",
                            &format!("podmetrics.metrics.k8s.io \"{name}\" not found"),
                        ),
                    ),
                },
            };
        }
        // api/v1/pods | api/v1/namespaces/{ns}/pods[/{name}[/log]]
        let (ns, name, sub) = match parts.as_slice() {
            ["api", "v1", "pods"] => (None, None, None),
            ["api", "v1", "namespaces", ns, "pods"] => (Some(*ns), None, None),
            ["api", "v1", "namespaces", ns, "pods", name] => (Some(*ns), Some(*name), None),
            ["api", "v1", "namespaces", ns, "pods", name, sub] => {
                (Some(*ns), Some(*name), Some(*sub))
            }
            _ => return Self::one(StatusCode::NOT_FOUND, &status(404, "NotFound", "no route")),
        };
        let ns = ns.map(str::to_owned);
        match (method.as_str(), name, sub) {
            ("GET", None, _) if rec.param("watch").as_deref() == Some("true") => {
                let from: u64 = rec
                    .param("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let (tx, rx) = mpsc::unbounded_channel();
                let mut st = self.lock();
                let selector = rec.param("labelSelector");
                for (rv, ens, ev) in &st.history {
                    if *rv > from
                        && ns.as_deref().is_none_or(|n| n == ens)
                        && matches(selector.as_deref(), &ev["object"])
                    {
                        let _ = tx.send(Ok(Frame::data(Bytes::from(format!("{ev}\n")))));
                    }
                }
                st.watches.push(Watch {
                    namespace: ns,
                    selector,
                    tx,
                });
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(StreamBody::new(UnboundedReceiverStream::new(rx)))
                    .unwrap()
            }
            ("GET", None, _)
                if ns.is_none()
                    && self
                        .forbid_cluster_list
                        .load(std::sync::atomic::Ordering::SeqCst) =>
            {
                Self::one(
                    StatusCode::FORBIDDEN,
                    &status(
                        403,
                        "Forbidden",
                        "pods is forbidden: cannot list resource \"pods\" at the cluster scope",
                    ),
                )
            }
            ("GET", None, _) => {
                let st = self.lock();
                let selector = rec.param("labelSelector");
                let items: Vec<Value> = st
                    .pods
                    .iter()
                    .filter(|((n, _), p)| {
                        ns.as_deref().is_none_or(|x| x == n) && matches(selector.as_deref(), p)
                    })
                    .map(|(_, p)| p.clone())
                    .collect();
                let list = json!({"apiVersion": "v1", "kind": "PodList",
                    "metadata": {"resourceVersion": st.rv.to_string()}, "items": items});
                Self::one(StatusCode::OK, &list)
            }
            ("POST", None, _) => {
                let mut pod = body.unwrap_or_default();
                let ns = ns.unwrap_or_default();
                let name = pod["metadata"]["name"].as_str().unwrap_or("").to_owned();
                if self.pod(&ns, &name).is_some() {
                    return Self::one(
                        StatusCode::CONFLICT,
                        &status(
                            409,
                            "AlreadyExists",
                            &format!("pods \"{name}\" already exists"),
                        ),
                    );
                }
                pod["metadata"]["namespace"] = json!(ns);
                pod["metadata"]["uid"] = json!(format!("uid-{name}"));
                pod["metadata"]["creationTimestamp"] = json!("2026-12-03T20:00:00Z");
                pod["status"] = json!({"phase": "Pending"});
                self.insert(pod.clone());
                let stored = self.pod(&ns, &name).unwrap();
                if self.kubelet.load(std::sync::atomic::Ordering::SeqCst) {
                    tokio::spawn(self.clone().run(ns.clone(), name.clone()));
                } else if self.autostart.load(std::sync::atomic::Ordering::SeqCst) {
                    let me = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        me.start(&ns, &name);
                    });
                }
                Self::one(StatusCode::CREATED, &stored)
            }
            ("GET", Some(name), None) => match self.pod(ns.as_deref().unwrap_or(""), name) {
                Some(p) => Self::one(StatusCode::OK, &p),
                None => Self::one(
                    StatusCode::NOT_FOUND,
                    &status(404, "NotFound", &format!("pods \"{name}\" not found")),
                ),
            },
            ("GET", Some(name), Some("log")) => {
                let (tx, rx) = mpsc::unbounded_channel();
                let mut st = self.lock();
                if let Some(l) = st.logs.get(name).cloned() {
                    let _ = tx.send(Ok(Frame::data(Bytes::from(l))));
                }
                let alive = st
                    .pods
                    .get(&(ns.clone().unwrap_or_default(), name.to_owned()))
                    .is_some_and(|p| {
                        !p["status"]["containerStatuses"][0]["state"]["terminated"].is_object()
                    });
                if alive && rec.param("follow").as_deref() == Some("true") {
                    st.log_streams.push((name.to_owned(), tx));
                }
                Response::builder()
                    .status(200)
                    .body(StreamBody::new(UnboundedReceiverStream::new(rx)))
                    .unwrap()
            }
            ("DELETE", Some(name), None) => {
                let ns = ns.unwrap_or_default();
                let Some(mut pod) = self.pod(&ns, name) else {
                    return Self::one(
                        StatusCode::NOT_FOUND,
                        &status(404, "NotFound", &format!("pods \"{name}\" not found")),
                    );
                };
                pod["metadata"]["deletionTimestamp"] = json!("2026-12-03T20:00:01Z");
                self.emit(&ns, json!({"type": "MODIFIED", "object": pod.clone()}));
                let pgid = self.running.lock().unwrap().get(name).copied();
                if let Some(pgid) = pgid {
                    // The local kubelet: SIGTERM now, SIGKILL after the grace (a later
                    // delete with a shorter grace kills sooner); the container's end
                    // removes the Pod (`run`).
                    let grace = rec
                        .body
                        .as_ref()
                        .and_then(|b| b["gracePeriodSeconds"].as_u64());
                    kill_group(pgid, rustix::process::Signal::TERM);
                    let me = self.clone();
                    let name = name.to_owned();
                    tokio::spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_secs(grace.unwrap_or(30)))
                            .await;
                        if me.running.lock().unwrap().get(&name) == Some(&pgid) {
                            kill_group(pgid, rustix::process::Signal::KILL);
                        }
                    });
                    return Self::one(StatusCode::OK, &pod);
                }
                // The kubelet's part: the container ends (143 after the SIGTERM, if it
                // ran), then the object goes.
                let me = self.clone();
                let name = name.to_owned();
                let reply = self.pod(&ns, &name).unwrap_or(pod.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    let Some(mut pod) = me.pod(&ns, &name) else {
                        return;
                    };
                    if pod["status"]["containerStatuses"][0]["state"]["running"].is_object() {
                        pod["status"]["containerStatuses"][0]["state"] =
                            json!({"terminated": {"exitCode": 143, "reason": "Error"}});
                    }
                    me.emit(&ns, json!({"type": "DELETED", "object": pod}));
                });
                Self::one(StatusCode::OK, &reply)
            }
            _ => Self::one(
                StatusCode::METHOD_NOT_ALLOWED,
                &status(405, "MethodNotAllowed", "not in the fake"),
            ),
        }
    }

    /// Appends to a Pod's log and sends it to the log streams following it.
    fn append_log(&self, pod: &str, data: &[u8]) {
        let mut st = self.lock();
        st.logs
            .entry(pod.to_owned())
            .or_default()
            .extend_from_slice(data);
        for (p, tx) in &st.log_streams {
            if p == pod {
                let _ = tx.send(Ok(Frame::data(Bytes::copy_from_slice(data))));
            }
        }
    }

    /// The local kubelet: runs the Pod's container (`command` + `args`, its `env` and
    /// nothing else, in `workingDir`, else `$HOME`, else `/`) as a process group of this
    /// test, its output into the Pod's log; reports it running, then terminated with the
    /// runtime's exit code (`128 + n` for signal `n`), and removes the Pod once it ended
    /// if it was being deleted. A program that cannot start is `StartError`, exit 128,
    /// as containerd reports it.
    async fn run(self: Arc<Self>, ns: String, name: String) {
        use tokio::io::AsyncReadExt;
        let Some(pod) = self.pod(&ns, &name) else {
            return;
        };
        let c = &pod["spec"]["containers"][0];
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut argv = strings(&c["command"]);
        argv.extend(strings(&c["args"]));
        let env: Vec<(String, String)> = c["env"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        let s = |k: &str| e[k].as_str().unwrap_or("").to_owned();
                        (s("name"), s("value"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let cwd = c["workingDir"]
            .as_str()
            .map(str::to_owned)
            .or_else(|| {
                env.iter()
                    .find(|(k, _)| k == "HOME")
                    .map(|(_, v)| v.clone())
            })
            .unwrap_or_else(|| "/".into());
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(&cwd)
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let set_state = |state: Value, phase: &str| {
            let Some(mut pod) = self.pod(&ns, &name) else {
                return;
            };
            let ready = state["running"].is_object();
            pod["status"] = json!({
                "phase": phase,
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                "containerStatuses": [{"name": "main", "image": "local", "imageID": "",
                    "ready": ready, "restartCount": 0, "state": state}]
            });
            self.emit(&ns, json!({"type": "MODIFIED", "object": pod}));
        };
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                set_state(
                    json!({"terminated": {"exitCode": 128, "reason": "StartError",
                        "message": format!("failed to create containerd task: exec: \"{}\": {e}", argv[0])}}),
                    "Failed",
                );
                return;
            }
        };
        let pgid = child.id().unwrap_or(0) as i32;
        self.running.lock().unwrap().insert(name.clone(), pgid);
        if self.pod(&ns, &name).is_none() {
            // Deleted before it started: it must not run unseen.
            kill_group(pgid, rustix::process::Signal::KILL);
        }
        set_state(
            json!({"running": {"startedAt": "2026-12-03T20:00:02Z"}}),
            "Running",
        );
        let pump = |mut r: Box<dyn tokio::io::AsyncRead + Unpin + Send>| {
            let me = self.clone();
            let name = name.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                while let Ok(n) = r.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    me.append_log(&name, &buf[..n]);
                }
            })
        };
        let out = pump(Box::new(child.stdout.take().unwrap()));
        let err = pump(Box::new(child.stderr.take().unwrap()));
        let status = child.wait().await.unwrap();
        // Whatever is left of the group goes with the container (its cgroup).
        kill_group(pgid, rustix::process::Signal::KILL);
        self.running.lock().unwrap().remove(&name);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            let _ = out.await;
            let _ = err.await;
        })
        .await;
        use std::os::unix::process::ExitStatusExt;
        let code = status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(9));
        set_state(
            json!({"terminated": {"exitCode": code,
                "reason": if code == 0 { "Completed" } else { "Error" },
                "startedAt": "2026-12-03T20:00:02Z"}}),
            if code == 0 { "Succeeded" } else { "Failed" },
        );
        if let Some(pod) = self.pod(&ns, &name) {
            if pod["metadata"]["deletionTimestamp"].is_string() {
                self.emit(&ns, json!({"type": "DELETED", "object": pod}));
            }
        }
    }

    /// The fake kubelet starts a Pod's container (Ready unless it has a readiness probe).
    pub fn start(&self, ns: &str, name: &str) {
        let Some(mut pod) = self.pod(ns, name) else {
            return;
        };
        let probe = pod["spec"]["containers"][0]["readinessProbe"].is_object();
        pod["status"] = json!({
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": if probe { "False" } else { "True" }}],
            "containerStatuses": [{"name": "main", "image": pod["spec"]["containers"][0]["image"],
                "imageID": "", "ready": !probe, "restartCount": 0,
                "state": {"running": {"startedAt": "2026-12-03T20:00:00Z"}}}]
        });
        self.emit(ns, json!({"type": "MODIFIED", "object": pod}));
    }
}

/// Reads a fixture of recorded watch events, with `{{POD}}`, `{{NS}}` and `{{DAEMON}}`
/// filled in.
pub fn fixture(file: &str, pod: &str, ns: &str, daemon: &str) -> Vec<Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let l = l
                .replace("{{POD}}", pod)
                .replace("{{NS}}", ns)
                .replace("{{DAEMON}}", daemon);
            serde_json::from_str(&l).unwrap()
        })
        .collect()
}

fn kill_group(pgid: i32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pgid) {
        let _ = rustix::process::kill_process_group(p, sig);
    }
}
