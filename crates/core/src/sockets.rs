//! The `sockets:` and `activation:` sections of a manifest: listening sockets that
//! bulkhead binds and owns for an instance, handed over with the sd_listen_fds protocol.
//!
//! ```yaml
//! sockets:
//!   - {name: http, listen: "tcp:$PORT"}              # 127.0.0.1:<the instance's port>
//!   - {name: admin, listen: "unix:admin.sock", mode: "0660"}
//! activation: {mode: on-connection, idle_stop: 5m}   # isolation none, fixed addresses
//! ```
//!
//! With isolation `namespace`, on-connection activation names its namespaces, and every
//! socket's address differs per namespace: a Unix path that is relative (under each
//! instance's own runtime directory) or contains `${NAMESPACE}`. TCP is refused there: a
//! port cannot differ per namespace (one port map per namespace would be a second list to
//! keep in step; a Unix socket per namespace is what a per-tenant front proxy connects to).
//!
//! ```yaml
//! isolation: namespace
//! sockets: [{name: api, listen: "unix:/run/app/${NAMESPACE}.sock"}]
//! activation: {mode: on-connection, namespaces: [acme, globex], idle_stop: 5m}
//! ```
//!
//! A `listen` address is `tcp:[HOST:]PORT` (HOST defaults to `127.0.0.1`; an IPv6 host is
//! written in brackets, `tcp:[::1]:8080`; PORT is a number or `$PORT`, the port the daemon
//! allocates to the instance) or `unix:PATH` (relative: under the instance's runtime
//! directory, `<state>/sockets/<instance>/`; `mode` defaults to `0600`). `backlog`
//! defaults to [`DEFAULT_BACKLOG`] (the kernel caps it at `net.core.somaxconn`).
//!
//! The program gets them as descriptors 3, 4, ... in the order of the list, with
//! `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES` (the names, `:`-separated), as
//! systemd's `sd_listen_fds_with_names` reads them.
//!
//! This module is data only; binding is the daemon's job (`daemon/src/sockets.rs`).

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::key::Isolation;
use crate::spec::DriverKind;

/// The most sockets one workload may ask for.
pub const MAX_SOCKETS: usize = 16;
/// The default listen backlog (the kernel caps it at `net.core.somaxconn`).
pub const DEFAULT_BACKLOG: u32 = 4096;
/// The default mode of a Unix socket's file.
pub const DEFAULT_UNIX_MODE: u32 = 0o600;
/// The longest socket name (`LISTEN_FDNAMES` entries; systemd allows 255).
pub const MAX_SOCKET_NAME: usize = 63;
/// The longest Unix socket path the kernel accepts (`sun_path` less its NUL).
pub const MAX_UNIX_PATH: usize = 107;
/// In a `unix:` path: the instance's namespace (isolation `namespace` only).
pub const NAMESPACE_VAR: &str = "${NAMESPACE}";
/// The most namespaces `activation.namespaces` may list.
pub const MAX_ACTIVATION_NAMESPACES: usize = 256;

/// A `unix:` path for the instance of `namespace`: [`NAMESPACE_VAR`] replaced. `None`
/// when the path names it and there is no namespace.
pub fn unix_path_for(path: &std::path::Path, namespace: Option<&str>) -> Option<PathBuf> {
    let text = path.to_str()?;
    if !text.contains(NAMESPACE_VAR) {
        return Some(path.to_owned());
    }
    Some(PathBuf::from(text.replace(NAMESPACE_VAR, namespace?)))
}

/// One listening socket of a workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketSpec {
    /// Its name in `LISTEN_FDNAMES`.
    pub name: String,
    /// `tcp:[HOST:]PORT` or `unix:PATH` (see the module docs); parsed by [`parse_listen`].
    pub listen: String,
    /// The listen backlog (default [`DEFAULT_BACKLOG`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<u32>,
    /// A Unix socket's file mode, in octal (`"0660"`; default `0600`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// A parsed `listen` address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp {
        host: IpAddr,
        port: TcpPort,
    },
    /// Relative paths are under the instance's runtime directory.
    Unix(PathBuf),
}

/// The port of a TCP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpPort {
    /// `$PORT`: the port the daemon allocates to the instance.
    Instance,
    Fixed(u16),
}

impl SocketSpec {
    /// The parsed address (validated manifests always parse).
    pub fn address(&self) -> Result<Listen, String> {
        parse_listen(&self.listen)
    }

    pub fn backlog(&self) -> u32 {
        self.backlog.unwrap_or(DEFAULT_BACKLOG)
    }

    /// The Unix socket file's mode.
    pub fn unix_mode(&self) -> Result<u32, String> {
        match &self.mode {
            None => Ok(DEFAULT_UNIX_MODE),
            Some(m) => {
                let digits = m.strip_prefix("0o").unwrap_or(m);
                if digits.is_empty() || digits.len() > 4 {
                    return Err("must be an octal mode like \"0660\"".into());
                }
                u32::from_str_radix(digits, 8)
                    .ok()
                    .filter(|m| *m <= 0o777)
                    .ok_or_else(|| "must be an octal mode like \"0660\", at most 0777".into())
            }
        }
    }
}

/// Parses a `listen` address (see the module docs).
pub fn parse_listen(s: &str) -> Result<Listen, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("names no path (unix:PATH)".into());
        }
        if path.contains('\0') {
            return Err("contains a NUL byte".into());
        }
        if path.len() > MAX_UNIX_PATH {
            return Err(format!("path is longer than {MAX_UNIX_PATH} bytes"));
        }
        if path.ends_with('/') {
            return Err("names a directory, not a socket file".into());
        }
        return Ok(Listen::Unix(PathBuf::from(path)));
    }
    let Some(rest) = s.strip_prefix("tcp:") else {
        return Err(
            "must start with tcp: or unix: (tcp:$PORT, tcp:127.0.0.1:8080, unix:app.sock)".into(),
        );
    };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, p) = v6
            .split_once("]:")
            .ok_or("an IPv6 host is written [ADDR]:PORT")?;
        let host: std::net::Ipv6Addr = h
            .parse()
            .map_err(|_| format!("{} is not an IPv6 address", crate::name::show(h)))?;
        (IpAddr::V6(host), p)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => {
                let host: Ipv4Addr = h.parse().map_err(|_| {
                    format!(
                        "{} is not an IPv4 address (IPv6: [ADDR]:PORT; names are not resolved)",
                        crate::name::show(h)
                    )
                })?;
                (IpAddr::V4(host), p)
            }
            None => (IpAddr::V4(Ipv4Addr::LOCALHOST), rest),
        }
    };
    let port = if port == "$PORT" || port == "${PORT}" {
        TcpPort::Instance
    } else {
        match port.parse::<u16>() {
            Ok(p) if p > 0 => TcpPort::Fixed(p),
            _ => return Err("port must be $PORT or a number from 1 to 65535".into()),
        }
    };
    Ok(Listen::Tcp { host, port })
}

/// When an instance is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActivationMode {
    /// Only by a launch (or `autostart`): the default.
    #[default]
    OnLaunch,
    /// By the first connection to one of its sockets when no instance runs.
    OnConnection,
}

/// The `activation:` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Activation {
    pub mode: ActivationMode,
    /// Stop the instance after this long without a connection (see the daemon's
    /// `sockets` module for exactly what counts).
    #[serde(
        default,
        with = "crate::spec::opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle_stop: Option<Duration>,
    /// Isolation `namespace`: the namespaces whose sockets are bound, each launching its
    /// own instance (the key `launch --namespace` gives).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
}

impl Activation {
    pub fn on_connection(&self) -> bool {
        self.mode == ActivationMode::OnConnection
    }
}

/// Checks the two sections together with the isolation and driver they apply to. On
/// error returns the field path and the reason.
pub fn validate(
    sockets: Option<&[SocketSpec]>,
    activation: Option<&Activation>,
    isolation: Isolation,
    driver: DriverKind,
) -> Result<(), (String, String)> {
    let fail = |f: String, r: String| Err((f, r));
    let list = sockets.unwrap_or_default();
    if sockets.is_some() && driver == DriverKind::Docker {
        return fail(
            "sockets".into(),
            "not supported by driver docker (a container's network is the engine's; publish a port instead)".into(),
        );
    }
    if list.len() > MAX_SOCKETS {
        return fail(
            "sockets".into(),
            format!("has {} sockets, more than {MAX_SOCKETS}", list.len()),
        );
    }
    let mut names = std::collections::BTreeSet::new();
    let mut addrs: Vec<Listen> = Vec::new();
    for (i, s) in list.iter().enumerate() {
        let at = |f: &str| format!("sockets[{i}].{f}");
        let name_ok = !s.name.is_empty()
            && s.name.len() <= MAX_SOCKET_NAME
            && s.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !name_ok {
            return fail(
                at("name"),
                format!(
                    "{} must be 1 to {MAX_SOCKET_NAME} characters of A-Z, a-z, 0-9, '_', '-', '.'",
                    crate::name::show(&s.name)
                ),
            );
        }
        if !names.insert(s.name.as_str()) {
            return fail(at("name"), format!("{} is declared twice", s.name));
        }
        let addr = s.address().map_err(|r| (at("listen"), r))?;
        if addrs.contains(&addr) {
            return fail(at("listen"), "the same address is declared twice".into());
        }
        if let Some(b) = s.backlog {
            if b == 0 || b > 65535 {
                return fail(at("backlog"), "must be between 1 and 65535".into());
            }
        }
        match (&addr, &s.mode) {
            (Listen::Tcp { .. }, Some(_)) => {
                return fail(at("mode"), "applies only to a unix: socket".into());
            }
            (Listen::Unix(_), Some(_)) => {
                s.unix_mode().map_err(|r| (at("mode"), r))?;
            }
            _ => {}
        }
        let on_connection = activation.is_some_and(|a| a.on_connection());
        if let Listen::Unix(p) = &addr {
            let templated = p.to_str().is_some_and(|t| t.contains(NAMESPACE_VAR));
            if templated && isolation != Isolation::Namespace {
                return fail(
                    at("listen"),
                    format!("{NAMESPACE_VAR} applies only to isolation namespace"),
                );
            }
            if on_connection && isolation == Isolation::Namespace && p.is_absolute() && !templated {
                return fail(
                    at("listen"),
                    format!("is the same path for every namespace; with activation on-connection and isolation namespace each namespace needs its own: put {NAMESPACE_VAR} in it, or use a relative path (under each instance's own directory)"),
                );
            }
        }
        if on_connection && isolation == Isolation::Namespace && matches!(addr, Listen::Tcp { .. })
        {
            return fail(
                at("listen"),
                "a tcp: port cannot differ per namespace; with activation on-connection and isolation namespace use a unix: socket (a relative path, or ${NAMESPACE} in its path)".into(),
            );
        }
        if on_connection
            && matches!(
                addr,
                Listen::Tcp {
                    port: TcpPort::Instance,
                    ..
                }
            )
        {
            return fail(
                at("listen"),
                "$PORT is allocated per instance; with activation: on-connection clients connect before any instance exists, so the socket needs a fixed port".into(),
            );
        }
        addrs.push(addr);
    }
    if let Some(a) = activation {
        if a.idle_stop == Some(Duration::ZERO) {
            return fail(
                "activation.idle_stop".into(),
                "must be greater than zero (leave it out to never stop an idle instance)".into(),
            );
        }
        if a.on_connection() {
            if list.is_empty() {
                return fail(
                    "activation".into(),
                    "on-connection needs at least one socket in sockets".into(),
                );
            }
            match isolation {
                Isolation::None => {}
                Isolation::Namespace => {
                    if a.namespaces.is_empty() {
                        return fail(
                            "activation.namespaces".into(),
                            "must list the namespaces whose sockets bulkhead binds (on-connection with isolation namespace: each namespace has its own sockets and instance)".into(),
                        );
                    }
                    if a.namespaces.len() > MAX_ACTIVATION_NAMESPACES {
                        return fail(
                            "activation.namespaces".into(),
                            format!(
                                "lists {} namespaces, more than {MAX_ACTIVATION_NAMESPACES}",
                                a.namespaces.len()
                            ),
                        );
                    }
                    let mut seen = std::collections::BTreeSet::new();
                    for (i, n) in a.namespaces.iter().enumerate() {
                        crate::name::validate(crate::name::NameKind::Namespace, n)
                            .map_err(|e| (format!("activation.namespaces[{i}]"), e.to_string()))?;
                        if !seen.insert(n.as_str()) {
                            return fail(
                                format!("activation.namespaces[{i}]"),
                                format!("{n} is listed twice"),
                            );
                        }
                    }
                }
                Isolation::Session => {
                    return fail(
                        "activation".into(),
                        "on-connection does not apply to isolation session (a connection names no session)".into(),
                    );
                }
            }
        } else if a.idle_stop.is_some() {
            return fail(
                "activation.idle_stop".into(),
                "applies only with mode: on-connection".into(),
            );
        }
        let per_namespace = a.on_connection() && isolation == Isolation::Namespace;
        if !a.namespaces.is_empty() && !per_namespace {
            return fail(
                "activation.namespaces".into(),
                "applies only with mode: on-connection and isolation namespace".into(),
            );
        }
    }
    Ok(())
}

/// The value of `LISTEN_FDNAMES` for `sockets`.
pub fn fd_names(sockets: &[SocketSpec]) -> String {
    sockets
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse_manifest;

    fn parse(text: &str) -> Result<crate::spec::WorkloadSpec, crate::spec::ManifestError> {
        parse_manifest("w/web/manifest.yaml", "web", text)
    }

    fn field_of(text: &str) -> (Option<String>, String) {
        let e = parse(text).unwrap_err();
        assert!(e.to_string().contains("w/web/manifest.yaml"), "{e}");
        (e.field, e.reason)
    }

    #[test]
    fn listen_addresses_parse() {
        use std::net::Ipv6Addr;
        assert_eq!(
            parse_listen("tcp:$PORT").unwrap(),
            Listen::Tcp {
                host: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port: TcpPort::Instance
            }
        );
        assert_eq!(
            parse_listen("tcp:0.0.0.0:8080").unwrap(),
            Listen::Tcp {
                host: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                port: TcpPort::Fixed(8080)
            }
        );
        assert_eq!(
            parse_listen("tcp:[::1]:${PORT}").unwrap(),
            Listen::Tcp {
                host: IpAddr::V6(Ipv6Addr::LOCALHOST),
                port: TcpPort::Instance
            }
        );
        assert_eq!(
            parse_listen("tcp:9").unwrap(),
            Listen::Tcp {
                host: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port: TcpPort::Fixed(9)
            }
        );
        assert_eq!(
            parse_listen("unix:admin.sock").unwrap(),
            Listen::Unix("admin.sock".into())
        );
        for bad in [
            "http:80",
            "tcp:",
            "tcp:0",
            "tcp:70000",
            "tcp:localhost:80",
            "tcp:[::1]80",
            "tcp:1.2.3:80",
            "unix:",
            "unix:dir/",
        ] {
            assert!(parse_listen(bad).is_err(), "{bad} parsed");
        }
        assert!(parse_listen(&format!("unix:/{}", "a".repeat(200))).is_err());
    }

    #[test]
    fn a_manifest_with_sockets_parses_in_order() {
        let s = parse(
            "name: web\ncommand: [x]\nsockets:\n  - {name: http, listen: \"tcp:$PORT\"}\n  - {name: admin, listen: \"unix:admin.sock\", mode: \"0660\", backlog: 16}\n",
        )
        .unwrap();
        let socks = s.sockets.as_deref().unwrap();
        assert_eq!(fd_names(socks), "http:admin");
        assert_eq!(socks[0].backlog(), DEFAULT_BACKLOG);
        assert_eq!(socks[1].backlog(), 16);
        assert_eq!(socks[1].unix_mode().unwrap(), 0o660);
        assert_eq!(socks[0].unix_mode().unwrap(), 0o600);
    }

    #[test]
    fn bad_sockets_name_their_field() {
        let base = "name: web\ncommand: [x]\n";
        let cases = [
            ("sockets: [{name: 'a:b', listen: 'tcp:1'}]", "sockets[0].name"),
            (
                "sockets: [{name: a, listen: 'tcp:1'}, {name: a, listen: 'tcp:2'}]",
                "sockets[1].name",
            ),
            (
                "sockets: [{name: a, listen: 'tcp:1'}, {name: b, listen: 'tcp:127.0.0.1:1'}]",
                "sockets[1].listen",
            ),
            ("sockets: [{name: a, listen: 'udp:1'}]", "sockets[0].listen"),
            ("sockets: [{name: a, listen: 'tcp:1', backlog: 0}]", "sockets[0].backlog"),
            ("sockets: [{name: a, listen: 'tcp:1', mode: '0600'}]", "sockets[0].mode"),
            ("sockets: [{name: a, listen: 'unix:a', mode: '999'}]", "sockets[0].mode"),
            ("activation: {mode: on-connection}", "activation"),
            (
                "isolation: none\nsockets: [{name: a, listen: 'tcp:$PORT'}]\nactivation: {mode: on-connection}",
                "sockets[0].listen",
            ),
            (
                "sockets: [{name: a, listen: 'unix:a.sock'}]\nactivation: {mode: on-connection}",
                "activation.namespaces",
            ),
            (
                "sockets: [{name: a, listen: 'tcp:1'}]\nactivation: {mode: on-connection, namespaces: [a]}",
                "sockets[0].listen",
            ),
            (
                "sockets: [{name: a, listen: 'unix:/run/a.sock'}]\nactivation: {mode: on-connection, namespaces: [a]}",
                "sockets[0].listen",
            ),
            (
                "sockets: [{name: a, listen: 'unix:a.sock'}]\nactivation: {mode: on-connection, namespaces: [a, a]}",
                "activation.namespaces[1]",
            ),
            (
                "sockets: [{name: a, listen: 'unix:a.sock'}]\nactivation: {mode: on-connection, namespaces: ['a b']}",
                "activation.namespaces[0]",
            ),
            (
                "isolation: none\nsockets: [{name: a, listen: 'unix:a.sock'}]\nactivation: {mode: on-connection, namespaces: [a]}",
                "activation.namespaces",
            ),
            (
                "sockets: [{name: a, listen: 'unix:a.sock'}]\nactivation: {mode: on-launch, namespaces: [a]}",
                "activation.namespaces",
            ),
            (
                "isolation: none\nsockets: [{name: a, listen: 'unix:/run/${NAMESPACE}.sock'}]",
                "sockets[0].listen",
            ),
            (
                "isolation: session\nsockets: [{name: a, listen: 'tcp:1'}]\nactivation: {mode: on-connection}",
                "activation",
            ),
            (
                "isolation: none\nsockets: [{name: a, listen: 'tcp:1'}]\nactivation: {mode: on-connection, idle_stop: 0s}",
                "activation.idle_stop",
            ),
            (
                "sockets: [{name: a, listen: 'tcp:1'}]\nactivation: {mode: on-launch, idle_stop: 1s}",
                "activation.idle_stop",
            ),
            ("env: {LISTEN_FDS: '1'}", "env.LISTEN_FDS"),
            ("env: {LISTEN_PID: '1'}", "env.LISTEN_PID"),
        ];
        for (extra, field) in cases {
            let (f, reason) = field_of(&format!("{base}{extra}\n"));
            assert_eq!(f.as_deref(), Some(field), "{extra}: {reason}");
        }
    }

    #[test]
    fn docker_refuses_sockets_naming_the_driver() {
        let (f, reason) = field_of(
            "name: web\ncommand: [x]\ndriver: docker\ndocker: {image: busybox}\nsockets: [{name: a, listen: 'tcp:$PORT'}]\n",
        );
        assert_eq!(f.as_deref(), Some("sockets"));
        assert!(
            reason.contains("not supported by driver docker"),
            "{reason}"
        );
    }

    #[test]
    fn on_connection_with_a_fixed_port_and_isolation_none_is_valid() {
        let s = parse(
            "name: web\ncommand: [x]\nisolation: none\nsockets: [{name: a, listen: 'tcp:8080'}, {name: b, listen: 'unix:/run/b.sock'}]\nactivation: {mode: on-connection, idle_stop: 30s}\n",
        )
        .unwrap();
        let a = s.activation.unwrap();
        assert!(a.on_connection());
        assert_eq!(a.idle_stop, Some(Duration::from_secs(30)));
    }

    #[test]
    fn on_connection_per_namespace_is_valid_with_addresses_per_namespace() {
        let s = parse(
            "name: web\ncommand: [x]\nsockets: [{name: a, listen: 'unix:/run/${NAMESPACE}/a.sock'}, {name: b, listen: 'unix:b.sock'}]\nactivation: {mode: on-connection, namespaces: [acme, globex]}\n",
        )
        .unwrap();
        assert_eq!(s.activation.unwrap().namespaces, ["acme", "globex"]);
        let p = std::path::Path::new("/run/${NAMESPACE}/a.sock");
        assert_eq!(
            unix_path_for(p, Some("acme")).unwrap(),
            PathBuf::from("/run/acme/a.sock")
        );
        assert_eq!(unix_path_for(p, None), None);
        let plain = std::path::Path::new("/run/a.sock");
        assert_eq!(unix_path_for(plain, None).unwrap(), plain);
    }

    #[test]
    fn too_many_sockets_are_refused() {
        let list: Vec<String> = (0..=MAX_SOCKETS)
            .map(|i| format!("{{name: s{i}, listen: 'tcp:{}'}}", 1000 + i))
            .collect();
        let (f, _) = field_of(&format!(
            "name: web\ncommand: [x]\nsockets: [{}]\n",
            list.join(", ")
        ));
        assert_eq!(f.as_deref(), Some("sockets"));
    }
}
