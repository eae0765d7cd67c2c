//! The `sandbox:` section of a manifest: the walls the `sandbox` driver builds.
//!
//! **Deny by default.** Every field has a default, and the defaults are the closed wall:
//! `sandbox: {}` (or no section at all with `driver: sandbox`) gives a new PID, mount,
//! IPC and UTS namespace; a **user namespace** whose root is an unprivileged host uid
//! taken from a range of the tenant's own (`user_namespace: auto`); a **minimal root**
//! (an empty tmpfs with the system's program directories read-only, the workload's
//! folder and its program read-only, and what the manifest binds: no `/root`, `/home`,
//! `/run`, `/var`, host `/tmp` or host socket); a private `/tmp`, `/dev/shm` and `/run`;
//! a fresh `/proc` with the kernel's knobs read-only and its leaky files masked
//! (`protect_kernel`); `/sys` only with a network namespace of its own (fresh, read-only);
//! a minimal `/dev`; the hostname set to the instance id; no capabilities; the default
//! seccomp deny-list (no namespace creation, mounts, keyrings, bpf, perf, userfaultfd,
//! io_uring, ...); our init as PID 1, shown as `bulkhead-init <instance id>`; the host
//! network (so that the instance's port is reachable; `network: none` closes it), with
//! the host's abstract Unix sockets out of reach (Landlock scope, where the kernel has it).
//!
//! Each opening is asked for by name:
//!
//! ```yaml
//! driver: sandbox
//! sandbox:
//!   network: loopback          # host (default) | none | loopback
//!   root: minimal              # minimal (default) | host: the host's / (read-only)
//!   abstract_sockets: scoped   # scoped (default, Linux 6.12+) | host
//!   readonly_root: true        # default
//!   binds:
//!     - { source: /srv/data, target: /data }        # read-write
//!     - { source: /etc/ssl, readonly: true }        # target defaults to source
//!   tmpfs: [/var/cache/app]
//!   hostname: web              # default: the instance id
//!   user: { uid: 1000, gid: 1000 }                  # ids inside the user namespace
//!   user_namespace: auto       # auto (default) | host | { uid: 100000, gid: 100000, count: 65536 }
//!   capabilities: [CAP_NET_BIND_SERVICE]            # default: none
//!   seccomp: default           # default | none
//!   seccomp_allow: [namespaces]                     # open groups of the deny-list by name
//!   protect_kernel: true       # false: /proc and /sys without read-only or masked paths
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

/// Which user namespace the instance runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UserNs {
    /// A new user namespace whose ids map to a range of the tenant's own (see [`IdBlocks`]):
    /// root inside is an unprivileged host uid, and two tenants never share a range
    /// while both have instances.
    #[default]
    Auto,
    /// No user namespace: the workload keeps the daemon's host ids (uid 0 for a root
    /// daemon, without capabilities). An opening: a host uid 0 passes the owner check of
    /// root's files and sockets that the workload can see.
    Host,
    /// A new user namespace with this fixed map.
    Map(UserNamespace),
}

impl UserNs {
    /// Whether the instance gets a user namespace.
    pub fn is_new(&self) -> bool {
        !matches!(self, UserNs::Host)
    }

    /// The fixed map, if one was given.
    pub fn map(&self) -> Option<&UserNamespace> {
        match self {
            UserNs::Map(m) => Some(m),
            _ => None,
        }
    }
}

impl Serialize for UserNs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            UserNs::Auto => s.serialize_str("auto"),
            UserNs::Host => s.serialize_str("host"),
            UserNs::Map(m) => m.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for UserNs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<UserNs, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = UserNs;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("auto, host or a map { uid, gid, count }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<UserNs, E> {
                match v {
                    "auto" => Ok(UserNs::Auto),
                    "host" => Ok(UserNs::Host),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> Result<UserNs, A::Error> {
                UserNamespace::deserialize(serde::de::value::MapAccessDeserializer::new(m))
                    .map(UserNs::Map)
            }
        }
        d.deserialize_any(V)
    }
}

/// The first host id of the ranges `user_namespace: auto` hands out: 2^30, above the
/// ranges `/etc/subuid` tools and systemd-nspawn hand out by default (both start low)
/// and below 2^31 (ids some tools read as negative).
pub const AUTO_ID_BASE: u32 = 1 << 30;

/// How many 65,536-id blocks `auto` hands out (2^30 .. 2^30 + 2^29).
pub const AUTO_ID_BLOCKS: u32 = 8192;

/// The tenant whose id range an instance uses: its namespace, its session, or (shared
/// instances) the workload. Instances of one tenant share a range (so that they can
/// share files through binds); different tenants never do while both are live.
pub fn id_tenant(id: &crate::key::InstanceId) -> String {
    // The id is `shared:<w>`, `ns:<ns>:<w>` or `session:<sid>:<w>`: the tenant is all
    // but the last part for the last two, the whole id for a shared instance.
    let s = id.as_str();
    if s.starts_with("shared:") {
        return s.to_owned();
    }
    match s.rfind(':') {
        Some(i) => s[..i].to_owned(),
        None => s.to_owned(),
    }
}

/// Hands out one block of [`USERNS_COUNT`] host ids per live tenant: a tenant's block
/// is stable (its preferred block is a hash of its name) unless another live tenant
/// holds it, in which case the next free one is taken. Pure: the driver holds one
/// behind a lock.
#[derive(Debug, Clone)]
pub struct IdBlocks {
    base: u32,
    blocks: u32,
    /// tenant -> (block, live holds)
    live: std::collections::HashMap<String, (u32, u32)>,
    taken: std::collections::HashSet<u32>,
    /// A name handed over -> the tenant it went to ([`IdBlocks::hand_over`]): its other
    /// holds are now that tenant's. Dropped with the block.
    moved: std::collections::HashMap<String, String>,
}

/// Every block is in use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no free user id range: all {0} ranges of 65536 ids are held by live tenants")]
pub struct NoFreeIds(pub u32);

impl IdBlocks {
    pub fn new(base: u32, blocks: u32) -> IdBlocks {
        IdBlocks {
            base,
            blocks: blocks.max(1),
            live: Default::default(),
            taken: Default::default(),
            moved: Default::default(),
        }
    }

    /// The tenant whose holds `name`'s are: itself, or the tenant it was handed to.
    fn resolve<'a>(&'a self, name: &'a str) -> &'a str {
        self.moved.get(name).map_or(name, String::as_str)
    }

    /// Who holds the block `name`'s holds are on (the tenant it was handed to, or
    /// itself), if it is held.
    pub fn owner<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        let t = self.resolve(name);
        self.live.contains_key(t).then_some(t)
    }

    /// How many holds are on the block of `name`'s owner (0: none).
    pub fn holds(&self, name: &str) -> u32 {
        self.live.get(self.resolve(name)).map_or(0, |(_, r)| *r)
    }

    fn preferred(&self, tenant: &str) -> u32 {
        // FNV-1a: stable across runs and builds (std's hasher is randomised).
        let mut h: u32 = 0x811c_9dc5;
        for b in tenant.bytes() {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        h % self.blocks
    }

    /// Takes the tenant's block for one more instance: the map for it.
    pub fn acquire(&mut self, tenant: &str) -> Result<UserNamespace, NoFreeIds> {
        let tenant = self.resolve(tenant).to_owned();
        let tenant = tenant.as_str();
        if let Some((block, refs)) = self.live.get_mut(tenant) {
            *refs += 1;
            let b = *block;
            return Ok(self.map_of(b));
        }
        let start = self.preferred(tenant);
        let block = (0..self.blocks)
            .map(|i| (start + i) % self.blocks)
            .find(|b| !self.taken.contains(b))
            .ok_or(NoFreeIds(self.blocks))?;
        self.taken.insert(block);
        self.live.insert(tenant.to_owned(), (block, 1));
        Ok(self.map_of(block))
    }

    /// Gives back one hold taken under `name` (or under a name handed to it); the block
    /// is free once its tenant has none.
    pub fn release(&mut self, name: &str) {
        let tenant = self.resolve(name).to_owned();
        if let Some((block, refs)) = self.live.get_mut(&tenant) {
            *refs -= 1;
            if *refs == 0 {
                let b = *block;
                self.taken.remove(&b);
                self.live.remove(&tenant);
                self.moved.retain(|_, to| *to != tenant);
            }
        }
    }

    /// Gives `from`'s block, with every hold on it, to `to`, which must hold none: warm
    /// slots made with a range no tenant held (a *set* of them, one per pool, all under
    /// `from`) serve a tenant new to the daemon, and then only it. The holds taken under
    /// `from` are `to`'s from now on (released under either name). Returns false
    /// (nothing changes) when `to` already holds a block or `from` holds none of its own
    /// (never taken, or already handed over).
    pub fn hand_over(&mut self, from: &str, to: &str) -> bool {
        if self.live.contains_key(to) || self.moved.contains_key(to) {
            return false;
        }
        let Some(b) = self.live.remove(from) else {
            return false;
        };
        self.live.insert(to.to_owned(), b);
        self.moved.insert(from.to_owned(), to.to_owned());
        true
    }

    fn map_of(&self, block: u32) -> UserNamespace {
        let first = self.base + block * USERNS_COUNT;
        UserNamespace {
            uid: first,
            gid: Some(first),
            count: USERNS_COUNT,
        }
    }
}

/// Groups of system calls the default seccomp filter denies and a manifest may open by
/// name in `seccomp_allow` (module loading, kexec, reboot, swap and clock changes are
/// never opened).
pub const SYSCALL_GROUPS: [&str; 9] = [
    "namespaces",
    "mount",
    "keyring",
    "bpf",
    "perf",
    "userfaultfd",
    "ptrace",
    "io_uring",
    "file_handles",
];

/// Which abstract Unix sockets the workload may connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AbstractSockets {
    /// Only those made inside the instance (Landlock's scope, Linux 6.12+): with the
    /// host's network, the host's and other tenants' abstract sockets are out of reach.
    #[default]
    Scoped,
    /// Any in its network namespace (the host's, with `network: host`): an opening.
    Host,
}

/// Where the instance's root comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Root {
    /// An empty tmpfs with the system's program directories (`/usr`, `/bin`, `/sbin`,
    /// `/lib*`, `/etc`, `/opt`) bound read-only, plus the workload's folder and program
    /// and what the manifest binds.
    #[default]
    Minimal,
    /// The host's whole `/` (read-only unless `readonly_root: false`): an opening.
    Host,
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
    /// What `/` is: a minimal view (default) or the host's.
    #[serde(default)]
    pub root: Root,
    /// Abstract Unix sockets outside the instance: out of reach (default) or reachable.
    #[serde(default)]
    pub abstract_sockets: AbstractSockets,
    /// The root is read-only (binds and tmpfs mounts excepted).
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
    /// The user namespace (`user` names ids inside it): `auto` by default.
    #[serde(default)]
    pub user_namespace: UserNs,
    /// The capabilities kept in the bounding set (default: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub seccomp: Seccomp,
    /// Groups of the default deny-list opened by name ([`SYSCALL_GROUPS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seccomp_allow: Vec<String>,
    /// `/proc/sys`, `/proc/sysrq-trigger` and the other kernel knobs read-only, and
    /// `/proc/kcore`, `/proc/keys`, `/proc/timer_list` and the like masked (runc's
    /// lists); `false` opens them.
    #[serde(default = "yes")]
    pub protect_kernel: bool,
    /// Our init is PID 1 (reaps, forwards signals). `false`: the workload is PID 1 and
    /// must reap its own children; only signals it handles reach it.
    #[serde(default = "yes")]
    pub init: bool,
}

impl Default for SandboxSpec {
    fn default() -> SandboxSpec {
        SandboxSpec {
            network: Network::default(),
            root: Root::default(),
            abstract_sockets: AbstractSockets::default(),
            readonly_root: true,
            binds: Vec::new(),
            tmpfs: Vec::new(),
            hostname: None,
            user: None,
            user_namespace: UserNs::default(),
            capabilities: Vec::new(),
            seccomp: Seccomp::default(),
            seccomp_allow: Vec::new(),
            protect_kernel: true,
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
        if let Some(ns) = self.user_namespace.map() {
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
        if self.user_namespace == UserNs::Auto {
            if let Some(u) = &self.user {
                if u.uid >= USERNS_COUNT || u.gid() >= USERNS_COUNT {
                    return fail(
                        "user".into(),
                        "is not mapped by the automatic user namespace (ids must be below 65536)",
                    );
                }
            }
        }
        for (i, g) in self.seccomp_allow.iter().enumerate() {
            if !SYSCALL_GROUPS.contains(&g.as_str()) {
                return fail(
                    format!("seccomp_allow[{i}]"),
                    "is not a group of the deny-list (namespaces, mount, keyring, bpf, perf, userfaultfd, ptrace, io_uring, file_handles)",
                );
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
        // The closed wall: a user namespace of the tenant's own, the minimal root, the
        // kernel's knobs protected, no syscall group opened.
        assert_eq!(s.user_namespace, UserNs::Auto);
        assert_eq!(s.root, Root::Minimal);
        assert!(s.protect_kernel && s.seccomp_allow.is_empty());
    }

    #[test]
    fn openings_are_named() {
        let s = parse(
            "  user_namespace: host\n  root: host\n  protect_kernel: false\n  seccomp_allow: [namespaces, mount]\n  abstract_sockets: host\n",
        )
        .unwrap();
        assert_eq!(s.abstract_sockets, AbstractSockets::Host);
        assert_eq!(s.user_namespace, UserNs::Host);
        assert_eq!(s.root, Root::Host);
        assert!(!s.protect_kernel);
        assert_eq!(s.seccomp_allow, ["namespaces", "mount"]);
        let e = parse("  user_namespace: none\n").unwrap_err();
        assert!(e.contains("auto, host"), "{e}");
        let e = parse("  seccomp_allow: [kexec]\n").unwrap_err();
        assert!(e.contains("sandbox.seccomp_allow[0]"), "{e}");
        let e = parse("  user: {uid: 70000}\n").unwrap_err();
        assert!(e.contains("sandbox.user"), "{e}");
    }

    #[test]
    fn the_spec_round_trips_through_json() {
        for section in [
            "  {}\n",
            "  user_namespace: host\n",
            "  user_namespace: { uid: 100000, count: 10 }\n",
        ] {
            let s = parse(section).unwrap();
            let json = serde_json::to_string(&s).unwrap();
            let back: SandboxSpec = serde_json::from_str(&json).unwrap();
            assert_eq!(back, s, "{json}");
        }
    }

    #[test]
    fn tenants_of_an_instance_id() {
        use crate::key::InstanceId;
        let t = |s: &str| id_tenant(&InstanceId::parse(s).unwrap().0);
        assert_eq!(t("ns:a:web"), "ns:a");
        assert_eq!(t("ns:a:db"), "ns:a");
        assert_eq!(t("session:s1:web"), "session:s1");
        assert_eq!(t("shared:web"), "shared:web");
    }

    #[test]
    fn id_blocks_are_stable_per_tenant_and_never_shared() {
        let mut b = IdBlocks::new(AUTO_ID_BASE, AUTO_ID_BLOCKS);
        let a1 = b.acquire("ns:a").unwrap();
        let a2 = b.acquire("ns:a").unwrap();
        assert_eq!(a1, a2, "one tenant, one range");
        assert!(a1.uid >= AUTO_ID_BASE && a1.uid.is_multiple_of(USERNS_COUNT));
        let other = b.acquire("ns:b").unwrap();
        assert_ne!(a1.uid, other.uid);
        b.release("ns:a");
        b.release("ns:a");
        // Free again, and the same tenant gets the same range back.
        assert_eq!(b.acquire("ns:a").unwrap(), a1);
        // A full table says so.
        let mut tiny = IdBlocks::new(AUTO_ID_BASE, 2);
        tiny.acquire("x").unwrap();
        tiny.acquire("y").unwrap();
        assert_eq!(tiny.acquire("z"), Err(NoFreeIds(2)));
        tiny.release("x");
        assert!(tiny.acquire("z").is_ok());
    }

    #[test]
    fn a_warm_slots_range_is_handed_to_a_tenant_that_holds_none() {
        let mut b = IdBlocks::new(AUTO_ID_BASE, 8);
        let slot = b.acquire("warm:w-1").unwrap();
        let live = b.acquire("ns:a").unwrap();
        // A tenant that holds a range keeps its own: the slot's cannot serve it.
        assert!(!b.hand_over("warm:w-1", "ns:a"));
        assert!(b.hand_over("warm:w-1", "ns:b"));
        // Now it is ns:b's: a second instance of ns:b shares it, the slot name is ns:b's.
        assert_eq!(b.acquire("ns:b").unwrap(), slot);
        assert_eq!(b.owner("warm:w-1"), Some("ns:b"));
        assert!(!b.hand_over("warm:w-1", "ns:c"), "handed over once");
        b.release("ns:b");
        b.release("ns:b");
        assert_eq!(b.owner("warm:w-1"), None);
        assert_ne!(b.acquire("ns:c").unwrap(), live);
    }

    #[test]
    fn a_set_of_slots_goes_to_one_tenant_with_all_its_holds() {
        let mut b = IdBlocks::new(AUTO_ID_BASE, 8);
        // Two pools' slots of one set, and a second set.
        let set = b.acquire("warm-set:1").unwrap();
        assert_eq!(b.acquire("warm-set:1").unwrap(), set);
        let other = b.acquire("warm-set:2").unwrap();
        assert_ne!(set, other);
        assert_eq!(b.owner("warm-set:1"), Some("warm-set:1"), "nobody's yet");
        assert!(b.hand_over("warm-set:1", "ns:a"));
        assert_eq!(b.owner("warm-set:1"), Some("ns:a"));
        assert_eq!(b.holds("warm-set:1"), 2);
        // The tenant's second workload takes the set's other slot (no new hold); a
        // tenant that holds a range never takes another set.
        assert!(!b.hand_over("warm-set:2", "ns:a"));
        assert_eq!(b.acquire("ns:a").unwrap(), set);
        b.release("ns:a");
        // The holds go back under either name; the last frees the block and the alias.
        b.release("warm-set:1");
        assert_eq!(b.holds("ns:a"), 1);
        b.release("ns:a");
        assert_eq!(b.owner("ns:a"), None);
        assert_eq!(b.owner("warm-set:1"), None);
        assert!(b.moved.is_empty());
    }

    proptest::proptest! {
        /// Whatever the order of acquires and releases, two live tenants never hold the
        /// same range, and every range stays inside the configured space.
        #[test]
        fn live_tenants_never_share_a_range(ops in proptest::collection::vec((0u8..12, proptest::bool::ANY), 1..200)) {
            let mut b = IdBlocks::new(AUTO_ID_BASE, 8);
            let mut held: std::collections::HashMap<String, (UserNamespace, u32)> = Default::default();
            for (t, acquire) in ops {
                let tenant = format!("ns:t{t}");
                if acquire {
                    match b.acquire(&tenant) {
                        Ok(m) => {
                            proptest::prop_assert!(m.uid >= AUTO_ID_BASE && m.uid < AUTO_ID_BASE + 8 * USERNS_COUNT);
                            let e = held.entry(tenant).or_insert((m, 0));
                            proptest::prop_assert_eq!(e.0, m);
                            e.1 += 1;
                        }
                        Err(_) => proptest::prop_assert!(held.len() >= 8),
                    }
                } else if let Some(e) = held.get_mut(&tenant) {
                    b.release(&tenant);
                    e.1 -= 1;
                    if e.1 == 0 {
                        held.remove(&tenant);
                    }
                }
                let mut uids: Vec<u32> = held.values().map(|(m, _)| m.uid).collect();
                uids.sort();
                uids.dedup();
                proptest::prop_assert_eq!(uids.len(), held.len());
            }
        }

        /// With warm-slot sets handed to tenants among the acquires and releases: every
        /// hold's range is its owner's, two owners never share one, and once every hold
        /// is given back (under the name it was taken with) nothing is held.
        #[test]
        fn handed_over_sets_keep_ranges_apart(ops in proptest::collection::vec((0u8..4, 0u8..6, 0u8..6), 1..200)) {
            let mut b = IdBlocks::new(AUTO_ID_BASE, 8);
            // (name taken under, range)
            let mut holds: Vec<(String, UserNamespace)> = Vec::new();
            for (op, x, y) in ops {
                match op {
                    0 | 1 => {
                        let name = if op == 0 { format!("ns:t{x}") } else { format!("warm-set:{x}") };
                        if let Ok(m) = b.acquire(&name) {
                            holds.push((name, m));
                        }
                    }
                    2 => {
                        if !holds.is_empty() {
                            let (name, _) = holds.remove(usize::from(x) % holds.len());
                            b.release(&name);
                        }
                    }
                    _ => {
                        let (from, to) = (format!("warm-set:{x}"), format!("ns:t{y}"));
                        let could = b.owner(&from) == Some(from.as_str()) && b.owner(&to).is_none();
                        proptest::prop_assert_eq!(b.hand_over(&from, &to), could);
                    }
                }
                let mut by_owner: std::collections::HashMap<String, UserNamespace> = Default::default();
                for (name, m) in &holds {
                    let owner = b.owner(name);
                    proptest::prop_assert!(owner.is_some(), "{} is held", name);
                    let e = by_owner.entry(owner.unwrap().to_owned()).or_insert(*m);
                    proptest::prop_assert_eq!(*e, *m);
                }
                let mut uids: Vec<u32> = by_owner.values().map(|m| m.uid).collect();
                uids.sort();
                uids.dedup();
                proptest::prop_assert_eq!(uids.len(), by_owner.len());
            }
            for (name, _) in holds.drain(..) {
                b.release(&name);
            }
            proptest::prop_assert!(b.live.is_empty() && b.taken.is_empty() && b.moved.is_empty());
        }
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
        let ns = *s.user_namespace.map().unwrap();
        assert_eq!((ns.gid(), ns.count), (100000, USERNS_COUNT));
        assert_eq!(ns.uid_map(), "0 100000 65536\n");
        let s = parse(
            "  user_namespace: { uid: 100000, gid: 200000, count: 10 }\n  user: { uid: 9 }\n",
        )
        .unwrap();
        assert_eq!(s.user_namespace.map().unwrap().gid_map(), "0 200000 10\n");
    }

    #[test]
    fn capability_names_match_kernel_numbers() {
        assert_eq!(capability_number("CAP_SYS_ADMIN"), Some(21));
        assert_eq!(capability_number("sys_admin"), Some(21));
        assert_eq!(capability_number("CAP_CHECKPOINT_RESTORE"), Some(40));
        assert_eq!(capability_number("CAP_X"), None);
    }
}
