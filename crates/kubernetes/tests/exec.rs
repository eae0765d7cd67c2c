//! Exec through the Pod's `exec` subresource, against a local HTTP server that speaks the
//! subresource's protocol (a websocket upgrade with `v4.channel.k8s.io`, one byte of
//! channel per message: 1 stdout, 2 stderr, 3 the final `Status`), written here to the
//! protocol's shape. kube's real client connects to it over TCP (the tower mock cannot
//! carry an HTTP upgrade). No kubelet is involved: the "command" is the server's reply.

use std::sync::{Arc, Mutex};

use bulkhead_kubernetes::KubernetesDriver;
use futures_util::SinkExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::Message;

type Seen = Arc<Mutex<Vec<String>>>;

async fn handle(
    req: Request<Incoming>,
    seen: Seen,
) -> Result<Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
    let uri = req.uri().to_string();
    seen.lock().unwrap().push(format!("{} {uri}", req.method()));
    if uri.contains("/exec?") {
        let key = req.headers()["sec-websocket-key"].as_bytes().to_vec();
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
        let exit3 = uri.contains("exit") && uri.contains('3');
        tokio::spawn(async move {
            let up = hyper::upgrade::on(req).await.unwrap();
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(up),
                tokio_tungstenite::tungstenite::protocol::Role::Server,
                None,
            )
            .await;
            let msg = |ch: u8, data: &[u8]| {
                let mut v = vec![ch];
                v.extend_from_slice(data);
                Message::Binary(v.into())
            };
            ws.send(msg(1, b"hello from the pod\n")).await.unwrap();
            ws.send(msg(2, b"a warning\n")).await.unwrap();
            let status = if exit3 {
                serde_json::json!({"metadata": {}, "status": "Failure",
                    "message": "command terminated with non-zero exit code: exit code 3",
                    "reason": "NonZeroExitCode",
                    "details": {"causes": [{"reason": "ExitCode", "message": "3"}]}})
            } else {
                serde_json::json!({"metadata": {}, "status": "Success"})
            };
            ws.send(msg(3, status.to_string().as_bytes()))
                .await
                .unwrap();
            let _ = ws.close(None).await;
        });
        return Ok(Response::builder()
            .status(101)
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .header("sec-websocket-protocol", "v4.channel.k8s.io")
            .body(Default::default())
            .unwrap());
    }
    // Anything else: the create and the watch of a Pod that is running at once.
    let body = if req.method() == hyper::Method::POST {
        serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "default", "resourceVersion": "1"},
            "spec": {"containers": [{"name": "main"}]},
            "status": {"phase": "Running", "containerStatuses": [{"name": "main", "image": "i",
                "imageID": "", "ready": true, "restartCount": 0,
                "state": {"running": {}}}]}})
    } else if uri.contains("watch=true") {
        // An idle watch: ends at once (the watcher re-watches after a pause).
        return Ok(Response::new(Default::default()));
    } else {
        serde_json::json!({"apiVersion": "v1", "kind": "PodList",
            "metadata": {"resourceVersion": "1"}, "items": []})
    };
    Ok(Response::builder()
        .status(if req.method() == hyper::Method::POST {
            201
        } else {
            200
        })
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(body.to_string().into()))
        .unwrap())
}

async fn server() -> (String, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let s = s.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |r| handle(r, s.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (url, seen)
}

/// The spawn of a `sleep 1000` Pod of workload `web`.
fn web() -> bulkhead_driver::SpawnSpec {
    let text =
        "name: web\ncommand: [sleep, \"1000\"]\ndriver: kubernetes\nkubernetes: {image: busybox}\n";
    let w = bulkhead_core::spec::parse_manifest("web/manifest.yaml", "web", text).unwrap();
    bulkhead_driver::SpawnSpec {
        instance: bulkhead_core::key::InstanceId::parse("ns:a:web").unwrap().0,
        argv: w.command.clone(),
        env: Vec::new(),
        cwd: "/".into(),
        spec: Arc::new(w),
        binds: Vec::new(),
        ids: None,
        inherited: Vec::new(),
        listen: Vec::new(),
    }
}

#[tokio::test]
async fn exec_runs_through_the_exec_subresource_with_its_exit_code() {
    let (url, seen) = server().await;
    let config = kube::Config::new(url.parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let driver = KubernetesDriver::with_client("execd", client);
    let pod = driver.spawn_pod(web()).await.expect("spawn");
    let out = pod
        .exec(vec!["cat".into(), "/etc/hostname".into()])
        .await
        .unwrap();
    assert_eq!(out.code, 0);
    assert_eq!(out.stdout, b"hello from the pod\n");
    assert_eq!(out.stderr, b"a warning\n");
    let out = pod
        .exec(vec!["sh".into(), "-c".into(), "exit 3".into()])
        .await
        .unwrap();
    assert_eq!(out.code, 3);
    let exec = seen
        .lock()
        .unwrap()
        .iter()
        .find(|r| r.contains("/exec?"))
        .cloned()
        .unwrap();
    assert!(
        exec.starts_with("GET /api/v1/namespaces/default/pods/"),
        "{exec}"
    );
    for part in [
        "command=cat",
        "command=%2Fetc%2Fhostname",
        "container=main",
        "stdout=true",
        "stderr=true",
    ] {
        assert!(exec.contains(part), "{part} in {exec}");
    }
}

/// `bulkhead exec`'s path: the handle's `engine_exec` streams stdin, stdout and stderr
/// through the subresource and ends with the command's exit code.
#[tokio::test]
async fn engine_exec_streams_through_the_subresource() {
    use bulkhead_driver::InstanceHandle;
    let (url, seen) = server().await;
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let driver = KubernetesDriver::with_client("execd", client);
    let pod = driver.spawn_pod(web()).await.expect("spawn");
    let req = bulkhead_driver::ExecRequest {
        argv: vec!["sh".into(), "-c".into(), "exit 3".into()],
        env: Vec::new(),
        tty: None,
    };
    let mut ex = pod.engine_exec(req).await.expect("a pod execs").unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some((stream, data)) = ex.output.recv().await {
        match stream {
            bulkhead_driver::Stream::Stdout => out.extend(data),
            bulkhead_driver::Stream::Stderr => err.extend(data),
        }
    }
    assert_eq!(out, b"hello from the pod\n");
    assert_eq!(err, b"a warning\n");
    assert_eq!(
        ex.status.await.unwrap(),
        bulkhead_core::event::ExitStatus::Exited { code: 3 }
    );
    let exec = seen
        .lock()
        .unwrap()
        .iter()
        .find(|r| r.contains("/exec?"))
        .cloned()
        .unwrap();
    assert!(exec.contains("stdin=true"), "{exec}");
}
