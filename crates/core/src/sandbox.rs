//! The `sandbox:` section of a manifest: the walls the `sandbox` driver builds.
//!
//! Every field has a default, so `sandbox: {}` (or no section at all with
//! `driver: sandbox`) gives: a new PID, mount, IPC and UTS namespace; the host network;
//! a read-only root with a private `/tmp`, a fresh `/proc` and a minimal `/dev`; the
//! hostname set to the instance id; no capabilities; the default seccomp deny-list; our
//! init as PID 1; the daemon's user.
//!
//! ```yaml
//! driver: sandbox
//! sandbox:
//!   network: loopback          # host (default) | none | loopback
//!   readonly_root: true        # default
//!   binds:
//!     - { source: /srv/data, target: /data }        # read-write
//!     - { source: /etc/ssl, readonly: true }        # target defaults to source
//!   tmpfs: [/var/cache/app]
//!   hostname: web              # default: the instance id
//!   user: { uid: 1000, gid: 1000 }
//!   user_namespace: { uid: 100000, gid: 100000, count: 65536 }  # root inside = 100000 outside
//!   capabilities: [CAP_NET_BIND_SERVICE]            # default: none
//!   seccomp: default           # default | none
//!   init: true                 # false: the workload is PID 1 and reaps itself
//! ```

use serde::{Deserialize, Serialize};

/// The most binds or tmpfs mounts one sandbox may list.
pub const MAX_MOUNTS: usize = 64;

/// The longest path accepted in a bind or tmpfs entry.
pub const MAX_PATH: usize = 1024;

/// Capability names in kernel order: the index is the capability number.
pub const CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The number of capability `name` (`CAP_NET_ADMIN` or `net_admin`), if it is one.
pub fn capability_number(name: &str) -> Option<u32> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    CAPABILITIES
        .iter()
        .position(|c| *c == full)
        .map(|i| i as u32)
}

/// The network an instance sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// The host's network namespace (no cost).
    #[default]
    Host,
    /// A new network namespace with only `lo` (up): no route out.
    None,
    /// Same walls as `none`; says that the workload talks to itself over loopback.
    Loopback,
}

impl Network {
    /// Whether the instance gets its own network namespace.
    pub fn isolated(self) -> bool {
        self != Network::Host
    }
}

/// Which seccomp filter the workload runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Seccomp {
    /// The built-in deny-list: mount and namespace changes, ptrace, kexec, module loading,
    /// bpf, reboot, swap, clock and keyring changes fail with EPERM.
    #[default]
    Default,
    /// No filter.
    None,
}

/// One bind mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bind {
    /// The host path (file or directory); must exist when the instance starts.
    pub source: String,
    /// Where it appears inside; default: the same path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Mounted read-only.
    #[serde(default)]
    pub readonly: bool,
}

impl Bind {
    /// The path inside the sandbox.
    pub fn target(&self) -> &str {
        self.target.as_deref().unwrap_or(&self.source)
    }
}

/// The user the workload runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub uid: u32,
    /// Default: the same number as `uid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

impl User {
    pub fn gid(&self) -> u32 {
        self.gid.unwrap_or(self.uid)
    }
}

/// The default number of ids a user namespace maps.
pub const USERNS_COUNT: u32 = 65536;

fn userns_count() -> u32 {
    USERNS_COUNT
}

/// A new user namespace: ids `0..count` inside map to `uid..uid+count` (and
/// `gid..gid+count`) outside, so root inside is an unprivileged user on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserNamespace {
    /// The host uid that uid 0 inside maps to (not 0).
    pub uid: u32,
    /// The host gid that gid 0 inside maps to; default: the same number as `uid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// How many consecutive ids are mapped (default 65536).
    #[serde(default = "userns_count")]
    pub count: u32,
}

impl UserNamespace {
    pub fn gid(&self) -> u32 {
        self.gid.unwrap_or(self.uid)
    }

    /// The line for `/proc/<pid>/uid_map`.
    pub fn uid_map(&self) -> String {
        format!("0 {} {}\n", self.uid, self.count)
    }

    /// The line for `/proc/<pid>/gid_map`.
    pub fn gid_map(&self) -> String {
        format!("0 {} {}\n", self.gid(), self.count)
    }
}

fn yes() -> bool {
    true
}

/// The `sandbox:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {
    #[serde(default)]
    pub network: Network,
    /// The host's root file system, read-only (binds and tmpfs mounts excepted).
    #[serde(default = "yes")]
    pub readonly_root: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub binds: Vec<Bind>,
    /// Directories that get an empty, private tmpfs (`/tmp` always does).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tmpfs: Vec<String>,
    /// Default: the instance id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Switch to this uid/gid before exec (supplementary groups are dropped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<User>,
    /// Run in a new user namespace (`user` then names ids inside it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_namespace: Option<UserNamespace>,
    /// The capabilities kept in the bounding set (default: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub seccomp: Seccomp,
    /// Our init is PID 1 (reaps, forwards signals). `false`: the workload is PID 1 and
    /// must reap its own children; only signals it handles reach it.
    #[serde(default = "yes")]
    pub init: bool,
}

impl Default for SandboxSpec {
    fn default() -> SandboxSpec {
        SandboxSpec {
            network: Network::default(),
            readonly_root: true,
            binds: Vec::new(),
            tmpfs: Vec::new(),
            hostname: None,
            user: None,
            user_namespace: None,
            capabilities: Vec::new(),
            seccomp: Seccomp::default(),
            init: true,
        }
    }
}

/// Why `path` is not acceptable as a mount path, if it is not.
fn bad_path(path: &str) -> Option<&'static str> {
    if !path.starts_with('/') {
        Some("must be an absolute path")
    } else if path.len() > MAX_PATH {
        Some("is too long (at most 1024 bytes)")
    } else if path.contains('\0') {
        Some("contains a NUL byte")
    } else if path.split('/').any(|c| c == ".." || c == ".") {
        Some("must not contain . or .. components")
    } else if path.trim_end_matches('/').is_empty() {
        Some("must not be the root directory")
    } else {
        None
    }
}

impl SandboxSpec {
    /// Checks what serde cannot. On error returns the field path (under `sandbox`) and the
    /// reason.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let fail = |field: String, reason: &str| Err((field, reason.to_owned()));
        if self.binds.len() > MAX_MOUNTS {
            return fail("binds".into(), "lists more than 64 binds");
        }
        for (i, b) in self.binds.iter().enumerate() {
            if let Some(r) = bad_path(&b.source) {
                return fail(format!("binds[{i}].source"), r);
            }
            if let Some(t) = &b.target {
                if let Some(r) = bad_path(t) {
                    return fail(format!("binds[{i}].target"), r);
                }
            }
        }
        if self.tmpfs.len() > MAX_MOUNTS {
            return fail("tmpfs".into(), "lists more than 64 mounts");
        }
        for (i, t) in self.tmpfs.iter().enumerate() {
            if let Some(r) = bad_path(t) {
                return fail(format!("tmpfs[{i}]"), r);
            }
        }
        if let Some(h) = &self.hostname {
            let ok = !h.is_empty()
                && h.len() <= 64
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:_".contains(&b));
            if !ok {
                return fail(
                    "hostname".into(),
                    "must be 1 to 64 ASCII letters, digits, '-', '.', ':' or '_'",
                );
            }
        }
        if let Some(ns) = &self.user_namespace {
            if ns.count == 0 {
                return fail("user_namespace.count".into(), "must be at least 1");
            }
            // The last outside id must stay below 4294967295 (the kernel's "no id").
            let fits = |start: u32| u64::from(start) + u64::from(ns.count) <= u64::from(u32::MAX);
            if ns.uid == 0 {
                return fail(
                    "user_namespace.uid".into(),
                    "must not be 0 (root inside would be root on the host)",
                );
            }
            if !fits(ns.uid) {
                return fail(
                    "user_namespace.uid".into(),
                    "plus count goes past the largest uid (4294967294)",
                );
            }
            if ns.gid() == 0 {
                return fail(
                    "user_namespace.gid".into(),
                    "must not be 0 (group root inside would be group root on the host)",
                );
            }
            if !fits(ns.gid()) {
                return fail(
                    "user_namespace.gid".into(),
                    "plus count goes past the largest gid (4294967294)",
                );
            }
            if let Some(u) = &self.user {
                if u.uid >= ns.count {
                    return fail(
                        "user.uid".into(),
                        "is not mapped by user_namespace (must be below its count)",
                    );
                }
                if u.gid() >= ns.count {
                    return fail(
                        "user.gid".into(),
                        "is not mapped by user_namespace (must be below its count)",
                    );
                }
            }
        }
        for (i, c) in self.capabilities.iter().enumerate() {
            if capability_number(c).is_none() {
                return fail(
                    format!("capabilities[{i}]"),
                    "is not a known capability (like CAP_NET_BIND_SERVICE)",
                );
            }
        }
        Ok(())
    }

    /// The capability numbers kept.
    pub fn capability_numbers(&self) -> Vec<u32> {
        self.capabilities
            .iter()
            .filter_map(|c| capability_number(c))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse_manifest;

    fn parse(section: &str) -> Result<SandboxSpec, String> {
        let text = format!("name: w\ncommand: [x]\ndriver: sandbox\nsandbox:\n{section}");
        parse_manifest("w/manifest.yaml", "w", &text)
            .map(|s| s.sandbox.unwrap())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_the_strict_ones() {
        let s = parse("  {}\n").unwrap();
        assert_eq!(s, SandboxSpec::default());
        assert!(s.readonly_root && s.init);
        assert_eq!(s.network, Network::Host);
        assert_eq!(s.seccomp, Seccomp::Default);
        assert!(s.capabilities.is_empty());
    }

    #[test]
    fn a_full_section_parses() {
        let s = parse(
            "  network: loopback\n  readonly_root: false\n  binds:\n    - { source: /srv, target: /data, readonly: true }\n    - { source: /var/x }\n  tmpfs: [/var/cache]\n  hostname: web\n  user: { uid: 1000 }\n  capabilities: [net_bind_service, CAP_KILL]\n  seccomp: none\n  init: false\n",
        )
        .unwrap();
        assert_eq!(s.network, Network::Loopback);
        assert!(s.network.isolated());
        assert_eq!(s.binds[0].target(), "/data");
        assert_eq!(s.binds[1].target(), "/var/x");
        assert_eq!(s.user.unwrap().gid(), 1000);
        assert_eq!(s.capability_numbers(), vec![10, 5]);
        assert!(!s.init);
    }

    #[test]
    fn bad_input_names_the_field() {
        for (section, field) in [
            ("  binds: [{ source: rel }]\n", "sandbox.binds[0].source"),
            (
                "  binds: [{ source: /a, target: /a/../b }]\n",
                "sandbox.binds[0].target",
            ),
            ("  tmpfs: [/]\n", "sandbox.tmpfs[0]"),
            ("  hostname: \"a b\"\n", "sandbox.hostname"),
            ("  capabilities: [CAP_NOPE]\n", "sandbox.capabilities[0]"),
            ("  network: bridge\n", "network"),
            (
                "  user_namespace: { uid: 0 }\n",
                "sandbox.user_namespace.uid",
            ),
            (
                "  user_namespace: { uid: 1000, gid: 0 }\n",
                "sandbox.user_namespace.gid",
            ),
            (
                "  user_namespace: { uid: 1000, count: 0 }\n",
                "sandbox.user_namespace.count",
            ),
            (
                "  user_namespace: { uid: 4294967000, count: 65536 }\n",
                "sandbox.user_namespace.uid",
            ),
            (
                "  user_namespace: { uid: 100000, count: 1000 }\n  user: { uid: 1000 }\n",
                "sandbox.user.uid",
            ),
            ("  user_namespace: { uid: 1, map: 2 }\n", "map"),
            ("  bogus: 1\n", "bogus"),
        ] {
            let e = parse(section).unwrap_err();
            assert!(e.contains(field), "{section}: {e}");
        }
    }

    #[test]
    fn a_user_namespace_maps_root_to_an_unprivileged_range() {
        let s = parse("  user_namespace: { uid: 100000 }\n").unwrap();
        let ns = s.user_namespace.unwrap();
        assert_eq!((ns.gid(), ns.count), (100000, USERNS_COUNT));
        assert_eq!(ns.uid_map(), "0 100000 65536\n");
        let s = parse(
            "  user_namespace: { uid: 100000, gid: 200000, count: 10 }\n  user: { uid: 9 }\n",
        )
        .unwrap();
        assert_eq!(s.user_namespace.unwrap().gid_map(), "0 200000 10\n");
    }

    #[test]
    fn capability_names_match_kernel_numbers() {
        assert_eq!(capability_number("CAP_SYS_ADMIN"), Some(21));
        assert_eq!(capability_number("sys_admin"), Some(21));
        assert_eq!(capability_number("CAP_CHECKPOINT_RESTORE"), Some(40));
        assert_eq!(capability_number("CAP_X"), None);
    }
}
