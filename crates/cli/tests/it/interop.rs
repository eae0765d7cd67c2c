//! Stock clients nobody here wrote, with their default options, over the Unix socket:
//! Python grpcio (its stubs compiled from the API's proto by grpcio-tools) and grpc-java
//! (its Netty transport; `tests/interop/java`) and grpc-go (`tests/interop/go`). The first
//! two send the socket path as `:authority` (grpcio percent-encoded, grpc-java as it is),
//! which h2 used to reset (hyperium/h2#487): the patched h2 in `vendor/h2` serves it;
//! grpc-go sends `localhost`. Skipped, with the reason, where grpcio, the grpc-java client
//! jar or the grpc-go client binary is not there (`.ci/setup-interop.sh` installs grpcio
//! and builds the jar and the binary).

use std::process::Command;

use crate::harness::{stderr, Daemon};

/// Compiles the API's proto into Python stubs in `dir`; `None` (with the reason printed)
/// when grpcio-tools is not there.
fn python_stubs(dir: &std::path::Path) -> Option<()> {
    let Some(py) = crate::harness::python3() else {
        eprintln!("skipped: no python3");
        return None;
    };
    let have = Command::new(py)
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        eprintln!(
            "skipped: python3 has no grpcio/grpcio-tools (.ci/setup-interop.sh installs them)"
        );
        return None;
    }
    let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/../api/proto");
    let out = Command::new(py)
        .args(["-m", "grpc_tools.protoc", "-I", proto])
        .arg(format!("--python_out={}", dir.display()))
        .arg(format!("--grpc_python_out={}", dir.display()))
        .arg(format!("{proto}/bulkhead.proto"))
        .output()
        .expect("run grpc_tools.protoc");
    assert!(out.status.success(), "protoc: {}", stderr(&out));
    Some(())
}

#[test]
fn python_grpcio_with_default_options_calls_the_unix_socket() {
    let d = Daemon::start(&[(
        "web",
        "name: web\ncommand: [/bin/sh, -c, 'exec sleep 1000']\nisolation: session\n",
    )]);
    let stubs = tempfile::tempdir().unwrap();
    if python_stubs(stubs.path()).is_none() {
        return;
    }
    let client = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/client.py");
    let out = Command::new(crate::harness::python3().unwrap())
        .arg(client)
        .arg(&d.socket)
        .arg(stubs.path())
        .args(["web", "py1"])
        .output()
        .expect("run the python client");
    assert!(
        out.status.success(),
        "the python client failed: {}\n--- daemon log ---\n{}",
        stderr(&out),
        d.daemon_log()
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("the client prints one JSON object");
    assert_eq!(v["health"], "serving", "{v}");
    assert_eq!(v["launch"]["id"], "session:py1:web", "{v}");
    assert_eq!(v["launch"]["state"], "ready", "{v}");
    assert_eq!(v["launch"]["created"], true, "{v}");
    assert_eq!(v["get"], "ready", "{v}");
    assert!(
        v["list"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i == "session:py1:web"),
        "{v}"
    );
    assert_eq!(v["terminate"], "terminated", "{v}");
    let watch: Vec<&str> = v["watch"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(watch.first(), Some(&"launched"), "{v}");
    assert!(
        watch.contains(&"ready") && watch.last() == Some(&"terminated"),
        "{v}"
    );
}

/// The grpc-java client jar that `.ci/setup-interop.sh` builds; `None` (with the reason
/// printed) when it or a `java` to run it is missing.
fn java_client() -> Option<std::path::PathBuf> {
    let jar = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/java/target/bulkhead-interop-java.jar"
    ));
    let have_java = Command::new("java")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_java {
        eprintln!("skipped: no java (.ci/setup-interop.sh installs one)");
        return None;
    }
    if !jar.is_file() {
        eprintln!(
            "skipped: no grpc-java client at {} (.ci/setup-interop.sh builds it)",
            jar.display()
        );
        return None;
    }
    Some(jar.to_path_buf())
}

/// grpc-java with its default options (a `DomainSocketAddress` on Netty's epoll transport,
/// no authority override) calls every kind of method over the socket: grpc.health.v1, and
/// bulkhead's unary calls and server stream. It sends the socket path itself as
/// `:authority`, as grpc-java's `unix://` target does in later releases.
#[test]
fn java_grpc_with_default_options_calls_the_unix_socket() {
    let Some(jar) = java_client() else {
        return;
    };
    let mut cmd = Command::new("java");
    cmd.arg("-jar").arg(&jar);
    // The case this test is for: the socket path as :authority.
    stock_client_round_trip("grpc-java", cmd, "java1", |d| {
        d.socket.to_str().unwrap().to_owned()
    });
}

/// Runs a stock client (`cmd SOCKET web SESSION`) against a fresh daemon and checks what
/// it printed (one JSON object, the shape of `tests/interop/java`'s and `go`'s output):
/// the `:authority` it sent (`authority` of the daemon), grpc.health.v1, Launch, Get,
/// List, Watch and Terminate; then that the daemon really ended the instance.
fn stock_client_round_trip(
    name: &str,
    mut cmd: Command,
    session: &str,
    authority: impl Fn(&Daemon) -> String,
) {
    let d = Daemon::start(&[(
        "web",
        "name: web\ncommand: [/bin/sh, -c, 'exec sleep 1000']\nisolation: session\n",
    )]);
    let out = cmd
        .arg(&d.socket)
        .args(["web", session])
        .output()
        .unwrap_or_else(|e| panic!("run the {name} client: {e}"));
    assert!(
        out.status.success(),
        "the {name} client failed: {}\n--- daemon log ---\n{}",
        stderr(&out),
        d.daemon_log()
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("the client prints one JSON object");
    let id = format!("session:{session}:web");
    assert_eq!(v["authority"], authority(&d), "{v}");
    assert_eq!(v["grpc_health"], "SERVING", "{v}");
    assert_eq!(v["grpc_health_bulkhead"], "SERVING", "{v}");
    assert_eq!(v["health"], "serving", "{v}");
    assert_eq!(v["launch"]["id"], id.as_str(), "{v}");
    assert_eq!(v["launch"]["state"], "ready", "{v}");
    assert_eq!(v["launch"]["created"], true, "{v}");
    assert_eq!(v["get"], "ready", "{v}");
    assert!(
        v["list"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| *i == id.as_str()),
        "{v}"
    );
    assert_eq!(v["terminate"], "terminated", "{v}");
    let watch: Vec<&str> = v["watch"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(watch.first(), Some(&"launched"), "{v}");
    assert!(
        watch.contains(&"ready") && watch.last() == Some(&"terminated"),
        "{v}"
    );
    let got = d.json(&["get", &id, "-o", "json"]);
    assert_eq!(got["state"], "terminated", "{got}");
}

/// The grpc-go client binary that `.ci/setup-interop.sh` builds; `None` (with the reason
/// printed) when it is missing.
fn go_client() -> Option<std::path::PathBuf> {
    let bin = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/go/target/bulkhead-interop-go"
    ));
    if !bin.is_file() {
        eprintln!(
            "skipped: no grpc-go client at {} (.ci/setup-interop.sh builds it)",
            bin.display()
        );
        return None;
    }
    Some(bin.to_path_buf())
}

/// grpc-go with its default options (`grpc.Dial("unix://" + path, grpc.WithInsecure())`,
/// no authority, no dialer) calls every kind of method over the socket: grpc.health.v1,
/// and bulkhead's unary calls and server stream. grpc-go sends `localhost` as
/// `:authority` for a `unix:` target.
#[test]
fn go_grpc_with_default_options_calls_the_unix_socket() {
    let Some(bin) = go_client() else {
        return;
    };
    stock_client_round_trip("grpc-go", Command::new(&bin), "go1", |_| "localhost".into());
}

/// `grpc.health.v1.Health` and server reflection answer stock clients on the socket:
/// SERVING overall and for bulkhead's API, NOT_FOUND for an unknown service; reflection
/// lists the API and returns the file that defines it (what `grpcurl` needs without
/// the proto file).
#[test]
fn grpc_health_and_reflection_answer_stock_clients() {
    let d = Daemon::start(&[(
        "web",
        "name: web\ncommand: [/bin/sh, -c, 'exec sleep 1000']\n",
    )]);
    let Some(py) = crate::harness::python3() else {
        return;
    };
    let have = Command::new(py)
        .args(["-c", "import grpc_health.v1, grpc_reflection.v1alpha"])
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        eprintln!("skipped: no grpcio-health-checking/grpcio-reflection (.ci/setup-interop.sh)");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/standard.py");
    let run = || {
        let out = Command::new(py)
            .arg(script)
            .arg(&d.socket)
            .output()
            .expect("run the python client");
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let v = run();
    assert_eq!(v["overall"], "SERVING", "{v}");
    assert_eq!(v["bulkhead.v1.Bulkhead"], "SERVING", "{v}");
    assert_eq!(v["unknown"], "NOT_FOUND", "{v}");
    let services: Vec<&str> = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(
        services.contains(&"bulkhead.v1.Bulkhead") && services.contains(&"grpc.health.v1.Health"),
        "{v}"
    );
    assert_eq!(v["file_found"], true, "{v}");
}
