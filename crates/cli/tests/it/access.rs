//! Access control: the TCP listener (mutual TLS + tokens), scope rules, the audit log.
//!
//! Certificates are made at test time with rcgen: a CA, a server certificate for
//! 127.0.0.1 and a client certificate, all signed by that CA.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::Value;

use crate::harness::*;

const SLEEPER: &str =
    "name: sleeper\ncommand: [/bin/sh, -c, 'exec sleep 1000']\nisolation: namespace\n";

const TEAM_A_TOKEN: &str = "team-a-secret-token";
const ADMIN_TOKEN: &str = "ops-secret-token";

/// The exit code of UNAUTHENTICATED and PERMISSION_DENIED.
const PERMISSION_DENIED: i32 = 8;

struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn make_pki(dir: &Path) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "bulkhead test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let mut sp = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    sp.distinguished_name.push(DnType::CommonName, "bulkhead");
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = sp.signed_by(&server_key, &issuer).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap();
    cp.distinguished_name
        .push(DnType::CommonName, "team-a client");
    cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = cp.signed_by(&client_key, &issuer).unwrap();

    Pki {
        ca: write(dir, "ca.pem", &ca_cert.pem()),
        server_cert: write(dir, "server.pem", &server_cert.pem()),
        server_key: write(dir, "server.key", &server_key.serialize_pem()),
        client_cert: write(dir, "client.pem", &client_cert.pem()),
        client_key: write(dir, "client.key", &client_key.serialize_pem()),
    }
}

/// SHA-256 as lowercase hex, as `sha256sum` prints it (via the daemon crate's helper).
fn sha256_hex(token: &str) -> String {
    bulkhead_daemon::auth::token_sha256_hex(token)
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

struct Remote<'a> {
    d: &'a Daemon,
    pki: &'a Pki,
    addr: String,
}

impl Remote<'_> {
    /// Runs the CLI over TCP: `cert` sends the client certificate, `token` the bearer token.
    fn cli(&self, cert: bool, token: Option<&str>, args: &[&str]) -> Output {
        let mut c = Command::new(BIN);
        // A socket that does not exist: nothing may silently go over the Unix socket.
        c.arg("--socket")
            .arg(self.d.dir.path().join("no-such.sock"))
            .arg("--tcp")
            .arg(&self.addr)
            .arg("--tls-ca")
            .arg(&self.pki.ca);
        if cert {
            c.arg("--tls-cert")
                .arg(&self.pki.client_cert)
                .arg("--tls-key")
                .arg(&self.pki.client_key);
        }
        c.env_remove("BULKHEAD_TOKEN");
        if let Some(t) = token {
            c.env("BULKHEAD_TOKEN", t);
        }
        c.args(args).stdin(Stdio::null()).output().unwrap()
    }

    /// Waits until the TCP listener answers `health` for the admin token.
    fn wait_up(&self) {
        let start = Instant::now();
        loop {
            let out = self.cli(true, Some(ADMIN_TOKEN), &["health"]);
            if out.status.success() {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "TCP listener did not come up: {}\n--- daemon log ---\n{}",
                stderr(&out),
                self.d.daemon_log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

fn start(dir: &Path, pki: &Pki) -> (Daemon, String) {
    start_with(dir, pki, &[])
}

fn start_with(dir: &Path, pki: &Pki, extra: &[&str]) -> (Daemon, String) {
    let tokens = format!(
        "tokens:\n\
         - name: team-a\n  token_sha256: {}\n  namespaces: [team-a]\n  sessions: []\n\
         - name: ops\n  token_sha256: {}\n  admin: true\n",
        sha256_hex(TEAM_A_TOKEN),
        sha256_hex(ADMIN_TOKEN)
    );
    start_full(dir, pki, &tokens, &[("sleeper", SLEEPER)], extra)
}

/// A TCP daemon with the given token file text and workloads.
fn start_full(
    dir: &Path,
    pki: &Pki,
    tokens: &str,
    workloads: &[(&str, &str)],
    extra: &[&str],
) -> (Daemon, String) {
    let tokens = write(dir, "tokens.yaml", tokens);
    let addr = format!("127.0.0.1:{}", free_port());
    let p = |p: &Path| p.to_str().unwrap().to_owned();
    let args = [
        "--listen".to_owned(),
        addr.clone(),
        "--tls-cert".to_owned(),
        p(&pki.server_cert),
        "--tls-key".to_owned(),
        p(&pki.server_key),
        "--client-ca".to_owned(),
        p(&pki.ca),
        "--tokens".to_owned(),
        p(&tokens),
    ];
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend_from_slice(extra);
    (Daemon::start_with_args(workloads, &args), addr)
}

fn audit_lines(d: &Daemon) -> Vec<Value> {
    std::fs::read_to_string(d.state.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
        .collect()
}

/// Waits until the audit log has a result line matching `pred` (lines are written off the
/// request path, just after the answer; the `authorized` line an audited action gets
/// before it is done is skipped).
fn wait_audit(d: &Daemon, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        if let Some(l) = audit_lines(d)
            .into_iter()
            .find(|l| l["result"] != "authorized" && pred(l))
        {
            return l;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no audit line {what}; audit log: {:#?}",
            audit_lines(d)
        );
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
}

#[test]
fn tcp_needs_a_client_certificate_and_a_token_and_tokens_are_scoped() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = make_pki(tmp.path());
    let (d, addr) = start(tmp.path(), &pki);
    let r = Remote {
        d: &d,
        pki: &pki,
        addr,
    };
    r.wait_up();

    // No client certificate: refused at the TLS handshake.
    let out = r.cli(false, Some(TEAM_A_TOKEN), &["health"]);
    assert!(
        !out.status.success(),
        "a client without a certificate got in"
    );
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("client certificate"),
        "{}",
        stderr(&out)
    );

    // A certificate but no token: unauthenticated.
    let out = r.cli(true, None, &["health"]);
    assert_eq!(
        out.status.code(),
        Some(PERMISSION_DENIED),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("token"), "{}", stderr(&out));
    // A wrong token: the same.
    let out = r.cli(true, Some("not-a-token"), &["list"]);
    assert_eq!(
        out.status.code(),
        Some(PERMISSION_DENIED),
        "{}",
        stderr(&out)
    );

    // team-a may launch in team-a...
    let out = r.cli(
        true,
        Some(TEAM_A_TOKEN),
        &["launch", "sleeper", "--namespace", "team-a", "-o", "json"],
    );
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.daemon_log());
    let inst: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inst["id"], "ns:team-a:sleeper");
    assert_eq!(inst["state"], "ready");

    // ...and is denied in team-b, which is not launched.
    let out = r.cli(
        true,
        Some(TEAM_A_TOKEN),
        &["launch", "sleeper", "--namespace", "team-b"],
    );
    assert_eq!(
        out.status.code(),
        Some(PERMISSION_DENIED),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("namespace team-b"),
        "{}",
        stderr(&out)
    );
    let all = d.json(&["list", "-o", "json"]);
    let ids: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["id"].as_str())
        .collect();
    assert_eq!(ids, ["ns:team-a:sleeper"], "team-b was launched anyway");

    // The admin launches in team-b; team-a does not see it, nor may terminate it.
    let out = r.cli(
        true,
        Some(ADMIN_TOKEN),
        &["launch", "sleeper", "--namespace", "team-b"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = r.cli(true, Some(TEAM_A_TOKEN), &["list", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    let seen: Vec<&str> = seen
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["id"].as_str())
        .collect();
    assert_eq!(seen, ["ns:team-a:sleeper"]);
    let out = r.cli(
        true,
        Some(TEAM_A_TOKEN),
        &["terminate", "ns:team-b:sleeper"],
    );
    assert_eq!(
        out.status.code(),
        Some(PERMISSION_DENIED),
        "{}",
        stderr(&out)
    );
    for args in [
        &["get", "ns:team-b:sleeper"][..],
        &["logs", "ns:team-b:sleeper"],
        &["exec", "ns:team-b:sleeper", "--", "true"],
        &["end-namespace", "team-b"],
    ] {
        let out = r.cli(true, Some(TEAM_A_TOKEN), args);
        assert_eq!(
            out.status.code(),
            Some(PERMISSION_DENIED),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    wait_audit(&d, "denied exec", |l| {
        l["action"] == "exec" && l["key"] == "ns:team-b:sleeper" && l["code"] == "permission_denied"
    });
    let out = r.cli(
        true,
        Some(TEAM_A_TOKEN),
        &["exec", "ns:team-a:sleeper", "--", "true"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = r.cli(true, Some(TEAM_A_TOKEN), &["reload"]);
    assert_eq!(
        out.status.code(),
        Some(PERMISSION_DENIED),
        "{}",
        stderr(&out)
    );

    // The audit log: the allowed and the denied launch, with identity and key.
    let ok = wait_audit(&d, "allowed launch", |l| {
        l["action"] == "launch" && l["key"] == "ns:team-a:sleeper"
    });
    assert_eq!(ok["identity"], "team-a");
    assert_eq!(ok["transport"], "tcp");
    assert_eq!(ok["result"], "ok");
    assert!(ok["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    let denied = wait_audit(&d, "denied launch", |l| {
        l["action"] == "launch" && l["key"] == "ns:team-b:sleeper" && l["identity"] == "team-a"
    });
    assert_eq!(denied["result"], "error");
    assert_eq!(denied["code"], "permission_denied");
    let term = wait_audit(&d, "denied terminate", |l| l["action"] == "terminate");
    assert_eq!(term["identity"], "team-a");
    assert_eq!(term["key"], "ns:team-b:sleeper");
    assert_eq!(term["code"], "permission_denied");
    let anon = wait_audit(&d, "unauthenticated", |l| l["code"] == "unauthenticated");
    assert_eq!(anon["identity"], "anonymous");
    assert_eq!(anon["action"], "health");

    // The Unix socket is trusted: its requests are audited with the peer's uid.
    let out = d.cli(&["terminate", "ns:team-b:sleeper"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // SAFETY: getuid(2) has no preconditions.
    let uid = unsafe { libc::getuid() };
    let local = wait_audit(&d, "unix terminate", |l| {
        l["action"] == "terminate" && l["result"] == "ok"
    });
    assert_eq!(local["identity"], format!("uid:{uid}"));
    assert_eq!(local["transport"], "unix");
}

#[test]
fn listen_without_tls_files_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--workloads"])
        .arg(tmp.path())
        .arg("--state")
        .arg(tmp.path().join("state"))
        .arg("--socket")
        .arg(tmp.path().join("api.sock"))
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("--listen 127.0.0.1:0 requires mutual TLS")
            && err.contains("--tls-cert")
            && err.contains("--tokens"),
        "{err}"
    );
    assert!(!tmp.path().join("api.sock").exists(), "nothing is served");
}

#[test]
fn a_bad_token_file_fails_start_up_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = make_pki(tmp.path());
    let tokens = write(
        tmp.path(),
        "tokens.yaml",
        "tokens: [{name: a, token_sha256: nothex}]\n",
    );
    let out = Command::new(BIN)
        .args(["serve", "--workloads"])
        .arg(tmp.path())
        .arg("--state")
        .arg(tmp.path().join("state"))
        .arg("--socket")
        .arg(tmp.path().join("api.sock"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--tls-cert")
        .arg(&pki.server_cert)
        .arg("--tls-key")
        .arg(&pki.server_key)
        .arg("--client-ca")
        .arg(&pki.ca)
        .arg("--tokens")
        .arg(&tokens)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("invalid token file {}", tokens.display())) && err.contains("64 hex"),
        "{err}"
    );
    assert!(!tmp.path().join("api.sock").exists(), "nothing is served");
}

/// Issue 11: an error shown to a token without `admin: true` quoted the manifest: the
/// YAML snippet around the error (with `env` values next to it), the offending value, the
/// target of a symbolic link. `workloads` and `launch` show such a caller only the file,
/// the field or line and a generic reason (and hide `env` values of valid specs); admins
/// and the Unix socket still get everything.
#[test]
fn manifest_errors_quoted_files_to_non_admin_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = make_pki(tmp.path());
    let (d, addr) = start(tmp.path(), &pki);
    let r = Remote {
        d: &d,
        pki: &pki,
        addr,
    };
    r.wait_up();
    let secret_file = tmp.path().join("host-secret.yaml");
    std::fs::write(&secret_file, "password: s3cret-linked\n").unwrap();
    let cases = [
        // A type error: serde-saphyr's message quotes the value and shows the lines around.
        (
            "badtype",
            "name: badtype\ncommand: [/bin/true]\nenv: {API_KEY: s3cret-env}\nshutdown: {grace: s3cret-grace}\n",
        ),
        // Not YAML at all, a secret on the broken line.
        (
            "broken",
            "name: broken\ncommand: [/bin/true]\nenv: {API_KEY: s3cret-env\n",
        ),
        // A tag.
        (
            "tagged",
            "name: tagged\ncommand: [/bin/true]\nenv: {API_KEY: !vault s3cret-env}\n",
        ),
    ];
    for (name, text) in cases {
        write_workload(&d.workloads, name, text, &[]);
    }
    std::fs::create_dir_all(d.workloads.join("linked")).unwrap();
    std::os::unix::fs::symlink(&secret_file, d.workloads.join("linked/manifest.yaml")).unwrap();
    write_workload(
        &d.workloads,
        "withenv",
        "name: withenv\ncommand: [/bin/sleep, '1000']\nenv: {API_KEY: s3cret-valid}\n",
        &[],
    );
    assert!(d.cli(&["reload"]).status.success(), "{}", d.daemon_log());
    let invalid = ["badtype", "broken", "tagged", "linked"];

    // The control: the daemon's owner (Unix socket) and an admin token see the details.
    let full = d.json(&["workloads", "-o", "json"]).to_string();
    assert!(full.contains("s3cret-grace"), "{full}");
    assert!(
        full.contains("host-secret.yaml"),
        "the link target, for admins: {full}"
    );
    let out = r.cli(true, Some(ADMIN_TOKEN), &["workloads", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("s3cret"));

    // team-a: the file, the field or line, a generic reason.
    let out = r.cli(true, Some(TEAM_A_TOKEN), &["workloads", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!text.contains("s3cret"), "team-a saw a secret: {text}");
    assert!(
        !text.contains("host-secret"),
        "team-a saw the link target: {text}"
    );
    let list: Value = serde_json::from_str(&text).unwrap();
    for name in invalid {
        let e = list
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed: {text}"));
        let err = e["error"].as_str().unwrap();
        assert!(err.contains(&format!("{name}/manifest.yaml")), "{err}");
        assert!(
            err.contains("field `") || err.contains("line ") || err.contains("symbolic link"),
            "says where or why: {err}"
        );
    }
    let spec = list
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "withenv")
        .unwrap();
    assert_eq!(spec["valid"], true);
    assert_eq!(spec["spec"]["env"]["API_KEY"], "(hidden)", "{spec:#}");
    for name in invalid {
        let out = r.cli(
            true,
            Some(TEAM_A_TOKEN),
            &["launch", name, "--namespace", "team-a"],
        );
        assert_eq!(out.status.code(), Some(4), "{name}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(&format!("{name}/manifest.yaml")), "{err}");
        assert!(
            !err.contains("s3cret") && !err.contains("host-secret"),
            "{err}"
        );
    }
    // The admin's launch error has the details.
    let out = r.cli(
        true,
        Some(ADMIN_TOKEN),
        &["launch", "badtype", "--namespace", "team-a"],
    );
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("s3cret-grace"), "{}", stderr(&out));
    // reload is for admins: team-a is refused before anything is shown.
    let out = r.cli(true, Some(TEAM_A_TOKEN), &["reload"]);
    assert_eq!(out.status.code(), Some(PERMISSION_DENIED));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("s3cret"));
    assert!(!stderr(&out).contains("s3cret"));
}

/// Issue 11: refused requests without a valid token could fill the audit log until it
/// rotated the record of real requests away. Now they are limited per window and
/// summarised; the log here rotates at 4 KiB, which 60 single lines would pass.
#[test]
fn unauthenticated_requests_cannot_rotate_the_audit_log_away() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = make_pki(tmp.path());
    let (mut d, addr) = start_with(tmp.path(), &pki, &["--log-max-bytes", "4096"]);
    let r = Remote {
        d: &d,
        pki: &pki,
        addr,
    };
    r.wait_up();
    let out = r.cli(
        true,
        Some(TEAM_A_TOKEN),
        &["launch", "sleeper", "--namespace", "team-a"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    for _ in 0..60 {
        let out = r.cli(true, Some("not-a-token"), &["list"]);
        assert_eq!(out.status.code(), Some(PERMISSION_DENIED));
    }
    assert!(
        !d.state.join("audit.log.1").exists(),
        "unauthenticated requests rotated the audit log"
    );
    let lines = audit_lines(&d);
    assert!(
        lines
            .iter()
            .any(|l| l["identity"] == "team-a" && l["action"] == "launch" && l["result"] == "ok"),
        "the real launch's line is still there: {lines:#?}"
    );
    let single = lines
        .iter()
        .filter(|l| l["identity"] == "anonymous" && l["action"] == "list")
        .count();
    assert_eq!(single, 10, "{lines:#?}");
    // The rest is summarised; at shutdown at the latest.
    d.cli(&["terminate", "ns:team-a:sleeper"]);
    assert!(d.sigterm().success());
    let summary = audit_lines(&d)
        .into_iter()
        .find(|l| l["action"] == "refusals_summarised")
        .expect("a summary line");
    assert_eq!(summary["count"], 50);
    assert_eq!(summary["code"], "unauthenticated");
    assert_eq!(summary["peers"][0], "127.0.0.1");
}

/// Issue 11: a request whose audit line could not be written was served anyway. Now an
/// audited action is refused (UNAVAILABLE, exit 5) and not done; the control shows the
/// same launch served once the log can be written.
#[test]
fn a_request_whose_audit_line_cannot_be_written_is_refused() {
    let d = Daemon::start(&[("sleeper", SLEEPER)]);
    // Every write fails as on a full disk (the log is opened at its first line).
    std::os::unix::fs::symlink("/dev/full", d.state.join("audit.log")).unwrap();
    let out = d.cli(&["launch", "sleeper"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot write the audit log"),
        "{}",
        stderr(&out)
    );
    let list = d.json(&["list", "-o", "json"]);
    assert!(
        !list.to_string().contains("ns:default:sleeper"),
        "the unaudited launch was done: {list}"
    );
    // Control: the log writable again, the same launch is served and recorded first.
    std::fs::remove_file(d.state.join("audit.log")).unwrap();
    let out = d.cli(&["launch", "sleeper"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = audit_lines(&d);
    assert_eq!(lines[0]["result"], "authorized", "{lines:#?}");
    assert_eq!(lines[0]["key"], "ns:default:sleeper");
    d.cli(&["terminate", "ns:default:sleeper"]);
}

/// Issue 11: a `docker.share` workload was authorised on the key the request named
/// (`session:s1:box`: any token of session s1 could reach the one container all tenants
/// share) and audited under it, and `get`/`list` showed every tenant's session ids (its
/// lease holders) to any token. Needs the engine (`.ci/setup-docker.sh`).
#[test]
fn shared_containers_are_authorised_as_shared_and_hide_other_tenants_sessions() {
    if let Some(why) = crate::docker::skip() {
        eprintln!("skipped: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pki = make_pki(tmp.path());
    let boxed = format!(
        "name: box\ndriver: docker\ncommand: [sleep, '1000']\nisolation: session\n\
         docker:\n  image: {}\n  share: true\n",
        crate::docker::IMAGE
    );
    let tokens = format!(
        "tokens:\n\
         - name: plain\n  token_sha256: {}\n  sessions: [s1]\n\
         - name: tenant-b\n  token_sha256: {}\n  sessions: [s2]\n  shared: true\n\
         - name: tenant-c\n  token_sha256: {}\n  sessions: [s3]\n  shared: true\n",
        sha256_hex("plain-token"),
        sha256_hex("tenant-b-token"),
        sha256_hex("tenant-c-token")
    );
    let (d, addr) = start_full(tmp.path(), &pki, &tokens, &[("box", &boxed)], &[]);
    let r = Remote {
        d: &d,
        pki: &pki,
        addr,
    };
    let start = Instant::now();
    while !r
        .cli(true, Some("tenant-b-token"), &["health"])
        .status
        .success()
    {
        assert!(start.elapsed() < DEADLINE, "TCP listener did not come up");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // A session token without `shared` does not reach the shared container.
    let out = r.cli(
        true,
        Some("plain-token"),
        &["launch", "box", "--session", "s1"],
    );
    assert_eq!(
        out.status.code(),
        Some(PERMISSION_DENIED),
        "{}",
        stderr(&out)
    );
    wait_audit(&d, "denied shared launch", |l| {
        l["identity"] == "plain" && l["key"] == "shared:box" && l["code"] == "permission_denied"
    });
    // Two tenants share it; each is audited under the instance it reaches.
    for (token, sid) in [("tenant-b-token", "s2"), ("tenant-c-token", "s3")] {
        let out = r.cli(
            true,
            Some(token),
            &["launch", "box", "--session", sid, "-o", "json"],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["id"], "shared:box");
        assert_eq!(v["leases"], serde_json::json!([sid]), "{v}");
    }
    wait_audit(&d, "tenant-b's launch", |l| {
        l["identity"] == "tenant-b" && l["action"] == "launch" && l["key"] == "shared:box"
    });
    // Each sees only its own session among the holders; the socket sees both.
    for (token, sid) in [("tenant-b-token", "s2"), ("tenant-c-token", "s3")] {
        let out = r.cli(true, Some(token), &["get", "shared:box", "-o", "json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["leases"], serde_json::json!([sid]), "{v}");
        let out = r.cli(true, Some(token), &["list", "-o", "json"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let other = if sid == "s2" { "\"s3\"" } else { "\"s2\"" };
        assert!(
            !text.contains(other),
            "another tenant's session listed: {text}"
        );
    }
    let v = d.json(&["get", "shared:box", "-o", "json"]);
    assert_eq!(v["leases"], serde_json::json!(["s2", "s3"]), "{v}");
    // Nor may one tenant drop another's lease.
    let out = r.cli(
        true,
        Some("tenant-b-token"),
        &["release", "shared:box", "s3"],
    );
    assert_eq!(
        out.status.code(),
        Some(PERMISSION_DENIED),
        "{}",
        stderr(&out)
    );
    d.cli(&["terminate", "shared:box"]);
}

/// `depends_on` and tokens: a launch brings up the dependencies the manifest names, even
/// a shared one the token does not reach (the manifest's author decided it); `terminate
/// --with-dependencies` stops only those the token may act on.
#[test]
fn dependencies_are_launched_by_the_manifest_and_stopped_only_where_the_token_reaches() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = make_pki(tmp.path());
    let tokens = format!(
        "tokens:\n\
         - name: tenant\n  token_sha256: {}\n  sessions: [s1, s2]\n",
        sha256_hex("tenant-token"),
    );
    let db = "name: db\nisolation: none\ncommand: [/bin/sleep, '1000']\n";
    let web = "name: web\nisolation: session\ncommand: [/bin/sleep, '1000']\ndepends_on: [db]\n";
    let (d, addr) = start_full(tmp.path(), &pki, &tokens, &[("db", db), ("web", web)], &[]);
    let r = Remote {
        d: &d,
        pki: &pki,
        addr,
    };
    let start = Instant::now();
    while !r
        .cli(true, Some("tenant-token"), &["health"])
        .status
        .success()
    {
        assert!(start.elapsed() < DEADLINE, "TCP listener did not come up");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The token cannot launch the shared db itself...
    let out = r.cli(true, Some("tenant-token"), &["launch", "db"]);
    assert_eq!(
        out.status.code(),
        Some(PERMISSION_DENIED),
        "{}",
        stderr(&out)
    );
    // ...but its session's web brings it up.
    let out = r.cli(
        true,
        Some("tenant-token"),
        &["launch", "web", "--session", "s1", "-o", "json"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        d.json(&["get", "shared:db", "-o", "json"])["state"],
        "ready"
    );
    // Stopping web with its dependencies leaves the shared db to those who may stop it.
    let out = r.cli(
        true,
        Some("tenant-token"),
        &[
            "terminate",
            "session:s1:web",
            "--with-dependencies",
            "-o",
            "json",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "terminated");
    assert_eq!(
        d.json(&["get", "shared:db", "-o", "json"])["state"],
        "ready"
    );
    // The control: the daemon's owner (the socket) may, and does.
    d.json(&["launch", "web", "--session", "s2", "-o", "json"]);
    d.json(&[
        "terminate",
        "session:s2:web",
        "--with-dependencies",
        "-o",
        "json",
    ]);
    assert_eq!(
        d.json(&["get", "shared:db", "-o", "json"])["state"],
        "terminated"
    );
}
