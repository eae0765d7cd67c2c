//! The `channels:` section of a manifest: the data plane's shared-memory channels.
//!
//! A workload declares the channels it reads (`inputs`) and writes (`outputs`), each with
//! the largest payload one message may carry and the queue depth:
//!
//! ```yaml
//! channels:
//!   inputs:  [{name: frames, max_payload: 1Mi, depth: 4}]
//!   outputs: [{name: result, max_payload: 4Ki}]
//! ```
//!
//! An input may instead read another workload's output (`from: <workload>.<output>`): the
//! two instances of the same namespace or session then share one service, and the data
//! goes from one to the other without a copy through the host. That is how pipelines are
//! written: `a -> b -> c` is `b.inputs: [{name: in, from: a.out}]` and
//! `c.inputs: [{name: in, from: b.out}]`, launched under one key.
//!
//! This module is data only: the types, their validation, and the pure functions that name
//! services ([`service_name`]) and environment variables ([`env_var`]). Creating the
//! services is the daemon's job (through `bulkhead-sdk`).
//!
//! **Invariant — names are scoped by key.** A service name is
//! `bulkhead/<scope>/<workload>/<channel>` with `<scope>` one of `shared`, `ns/<namespace>`,
//! `session/<session>`. Names of workloads, namespaces, sessions and channels contain no
//! `/`, so two keys can never produce the same service name.

use serde::{Deserialize, Serialize};

use crate::key::Key;
use crate::name::{self, NameKind};

/// The most inputs, and the most outputs, one workload may declare.
pub const MAX_CHANNELS: usize = 16;
/// The longest channel name.
pub const MAX_CHANNEL_NAME: usize = 32;
/// The largest `max_payload` accepted (1 GiB).
pub const MAX_PAYLOAD: u64 = 1 << 30;
/// The deepest queue accepted.
pub const MAX_DEPTH: u32 = 1024;
/// Prefix of every channel variable in a workload's environment.
pub const ENV_PREFIX: &str = "BULKHEAD_CHANNEL_";
/// The iceoryx2 file prefix the daemon's services use (`/dev/shm/<prefix>*`).
pub const ENV_IOX2_PREFIX: &str = "BULKHEAD_IOX2_PREFIX";
/// The iceoryx2 root directory the daemon's services use.
pub const ENV_IOX2_ROOT: &str = "BULKHEAD_IOX2_ROOT";

/// The `channels:` section.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Channels {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<Channel>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<Channel>,
}

/// One channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Channel {
    /// 1 to 32 of `a-z`, `0-9`, `_`, starting with a letter.
    pub name: String,
    /// The largest payload of one message (`1Mi`); default 64Ki.
    #[serde(default = "default_max_payload", with = "crate::size::serde_size")]
    pub max_payload: u64,
    /// How many messages a subscriber keeps queued (and a late subscriber gets as
    /// history); default 4.
    #[serde(default = "default_depth")]
    pub depth: u32,
    /// Inputs only: read `<workload>.<output>` of the same namespace or session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

fn default_max_payload() -> u64 {
    64 << 10
}

fn default_depth() -> u32 {
    4
}

/// Which way data flows, seen from the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The workload subscribes; the host (or an upstream workload) publishes.
    Input,
    /// The workload publishes; the host (or a downstream workload) subscribes.
    Output,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Input => "input",
            Direction::Output => "output",
        }
    }
}

/// A channel of one instance, with its service name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedChannel {
    pub name: String,
    pub direction: Direction,
    /// The iceoryx2 service name.
    pub service: String,
    pub max_payload: u64,
    pub depth: u32,
}

impl ResolvedChannel {
    /// The environment variable that hands this channel to the workload.
    pub fn env_var(&self) -> String {
        env_var(self.direction, &self.name)
    }

    /// Its value: the service name, then `;max_payload=N;depth=N`.
    pub fn env_value(&self) -> String {
        format!(
            "{};max_payload={};depth={}",
            self.service, self.max_payload, self.depth
        )
    }
}

/// `BULKHEAD_CHANNEL_IN_<NAME>` or `BULKHEAD_CHANNEL_OUT_<NAME>` (name upper-cased).
pub fn env_var(direction: Direction, name: &str) -> String {
    let dir = match direction {
        Direction::Input => "IN",
        Direction::Output => "OUT",
    };
    format!("{ENV_PREFIX}{dir}_{}", name.to_ascii_uppercase())
}

/// Parses a channel variable's value (see [`ResolvedChannel::env_value`]) into the
/// service name, max payload and depth. A bare service name gets the defaults.
pub fn parse_env_value(value: &str) -> Result<(String, u64, u32), String> {
    let mut parts = value.split(';');
    let service = parts.next().unwrap_or_default();
    if service.is_empty() {
        return Err("the service name is empty".into());
    }
    let (mut max, mut depth) = (default_max_payload(), default_depth());
    for p in parts {
        match p.split_once('=') {
            Some(("max_payload", v)) => {
                max = v
                    .parse()
                    .map_err(|_| format!("max_payload {v:?} is not a number"))?
            }
            Some(("depth", v)) => {
                depth = v
                    .parse()
                    .map_err(|_| format!("depth {v:?} is not a number"))?
            }
            _ => return Err(format!("unknown setting {p:?}")),
        }
    }
    Ok((service.to_owned(), max, depth))
}

/// The scope part of a key's service names.
fn scope(key: &Key) -> String {
    match (key.namespace(), key.session()) {
        (_, Some(s)) => format!("session/{s}"),
        (Some(ns), None) => format!("ns/{ns}"),
        (None, None) => "shared".to_owned(),
    }
}

/// The service name of `workload`'s channel `channel` under `key`'s namespace or session.
pub fn service_name(key: &Key, workload: &str, channel: &str) -> String {
    format!("bulkhead/{}/{workload}/{channel}", scope(key))
}

/// The channels of the instance of `spec`'s workload under `key`, with service names.
/// An input with `from: w.out` gets the service of `w`'s output `out` under the same key.
pub fn resolve(key: &Key, channels: &Channels) -> Vec<ResolvedChannel> {
    let mut out = Vec::new();
    for c in &channels.inputs {
        let service = match c.from.as_deref().and_then(|f| f.split_once('.')) {
            Some((w, o)) => service_name(key, w, o),
            None => service_name(key, key.workload(), &c.name),
        };
        out.push(ResolvedChannel {
            name: c.name.clone(),
            direction: Direction::Input,
            service,
            max_payload: c.max_payload,
            depth: c.depth,
        });
    }
    for c in &channels.outputs {
        out.push(ResolvedChannel {
            name: c.name.clone(),
            direction: Direction::Output,
            service: service_name(key, key.workload(), &c.name),
            max_payload: c.max_payload,
            depth: c.depth,
        });
    }
    out
}

/// Checks a channel name. On error returns the reason.
pub fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("must not be empty");
    }
    if name.len() > MAX_CHANNEL_NAME {
        return Err("is longer than 32 characters");
    }
    if !name.as_bytes()[0].is_ascii_lowercase() {
        return Err("must start with a lowercase letter");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err("may only contain a-z, 0-9 and '_'");
    }
    Ok(())
}

impl Channels {
    /// Checks what serde cannot. `workload` is the declaring workload's name (an input may
    /// not read its own output). On error returns the field path (under `channels`) and
    /// the reason.
    pub fn validate(&self, workload: &str) -> Result<(), (String, String)> {
        if self.inputs.is_empty() && self.outputs.is_empty() {
            return Err((
                String::new(),
                "declares no channel: add inputs and/or outputs".into(),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (list, dir) in [(&self.inputs, "inputs"), (&self.outputs, "outputs")] {
            if list.len() > MAX_CHANNELS {
                return Err((
                    dir.into(),
                    format!("has {} channels, more than {MAX_CHANNELS}", list.len()),
                ));
            }
            for (i, c) in list.iter().enumerate() {
                let at = |f: &str| format!("{dir}[{i}].{f}");
                validate_name(&c.name).map_err(|r| {
                    (
                        at("name"),
                        format!("{} {r}", name::show(&c.name)).trim().to_owned(),
                    )
                })?;
                // Inputs and outputs share the instance's service names: one name, one channel.
                if !seen.insert(c.name.as_str()) {
                    return Err((at("name"), format!("{} is declared twice", c.name)));
                }
                if c.max_payload == 0 || c.max_payload > MAX_PAYLOAD {
                    return Err((at("max_payload"), "must be between 1 and 1Gi".into()));
                }
                if c.depth == 0 || c.depth > MAX_DEPTH {
                    return Err((at("depth"), format!("must be between 1 and {MAX_DEPTH}")));
                }
                if let Some(from) = &c.from {
                    if dir == "outputs" {
                        return Err((at("from"), "is only allowed on inputs".into()));
                    }
                    let Some((w, o)) = from.split_once('.') else {
                        return Err((
                            at("from"),
                            "must be <workload>.<output>, like decoder.frames".into(),
                        ));
                    };
                    if let Err(e) = name::validate(NameKind::Workload, w) {
                        return Err((at("from"), e.to_string()));
                    }
                    if let Err(r) = validate_name(o) {
                        return Err((at("from"), format!("output name {} {r}", name::show(o))));
                    }
                    if w == workload {
                        return Err((at("from"), "must name another workload's output".into()));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Where an instance's channels live.
///
/// **Invariant — one scope, one space, one owner.** A walled instance (sandbox, docker)
/// sees only its key scope's *channel space*: a size-bounded tmpfs of its own, shown at
/// `/dev/shm` and at iceoryx2's root. iceoryx2 creates its files mode 0600, so every
/// instance of a space must run as the same host user: the space's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Space {
    /// The host's `/dev/shm` and iceoryx2 root: the process driver, which is no wall.
    Host,
    /// The space of a key scope ([`space_name`]), owned by the host ids its workloads
    /// run as.
    Scope { name: String, uid: u32, gid: u32 },
}

/// The directory name of `key`'s channel space: `shared`, `ns.<namespace>` or
/// `session.<session>` (names contain no `/` and no `.` that could make two scopes meet).
pub fn space_name(key: &Key) -> String {
    scope(key).replacen('/', ".", 1)
}

/// The tenant whose id range an instance maps (`user_namespace: auto`): its namespace,
/// its session, or its workload when shared; but every shared instance *with channels*
/// maps the range of the shared scope, `shared`, since they share one channel space (a
/// pipeline under no key connects them) and so must run as one host user.
pub fn ids_tenant(id: &crate::key::InstanceId, spec: &crate::spec::WorkloadSpec) -> String {
    if spec.channels.is_some() && id.as_str().starts_with("shared:") {
        return "shared".to_owned();
    }
    crate::sandbox::id_tenant(id)
}

/// Whether the daemon must reserve a host id range for an instance of `spec` before its
/// spawn: a sandbox in an automatic user namespace.
pub fn needs_ids(spec: &crate::spec::WorkloadSpec) -> bool {
    use crate::sandbox::UserNs;
    spec.driver == crate::spec::DriverKind::Sandbox
        && matches!(
            spec.sandbox.as_ref().map(|s| &s.user_namespace),
            None | Some(UserNs::Auto)
        )
}

/// The channel space of an instance of `spec` under `key` (`None`: it has no channels).
///
/// `ids` is the range reserved for its tenant (`user_namespace: auto`), `daemon` the
/// daemon's own `(uid, gid)`. The owner is the host user the workload runs as: root
/// inside a user namespace is the range's first id (plus `sandbox.user`); a docker
/// container runs as `docker.user`, which must then be numeric (a name is resolved inside
/// the image, after the space must already belong to it), else as the daemon's ids.
pub fn space_of(
    spec: &crate::spec::WorkloadSpec,
    key: &Key,
    ids: Option<crate::sandbox::UserNamespace>,
    daemon: (u32, u32),
) -> Result<Option<Space>, String> {
    use crate::sandbox::UserNs;
    use crate::spec::DriverKind;
    if spec.channels.is_none() {
        return Ok(None);
    }
    let (uid, gid) = match spec.driver {
        DriverKind::Process => return Ok(Some(Space::Host)),
        DriverKind::Sandbox => {
            let default = crate::sandbox::SandboxSpec::default();
            let sb = spec.sandbox.as_ref().unwrap_or(&default);
            let inner = sb.user.as_ref().map_or((0, 0), |u| (u.uid, u.gid()));
            let ns = match &sb.user_namespace {
                UserNs::Host => None,
                UserNs::Map(m) => Some(*m),
                UserNs::Auto => Some(ids.ok_or_else(|| {
                    "no host id range was reserved for the instance's tenant".to_owned()
                })?),
            };
            match ns {
                Some(ns) => (
                    ns.uid.saturating_add(inner.0),
                    ns.gid().saturating_add(inner.1),
                ),
                None if sb.user.is_some() => inner,
                None => daemon,
            }
        }
        // Without `docker.user` the driver runs a channel container as the daemon's ids.
        DriverKind::Docker => match docker_user(spec).as_deref() {
            None => daemon,
            Some(user) => {
                let mut parts = user.splitn(2, ':');
                let num = |p: Option<&str>| p.and_then(|v| v.parse::<u32>().ok());
                let uid = num(parts.next());
                let group = parts.next();
                match (uid, group) {
                    (Some(u), None) => (u, 0),
                    (Some(u), Some(g)) => match g.parse::<u32>() {
                        Ok(g) => (u, g),
                        Err(_) => return Err(docker_user_error(user)),
                    },
                    (None, _) => return Err(docker_user_error(user)),
                }
            }
        },
        // Refused when the manifest is read (`crate::swarm::validate`).
        DriverKind::Swarm => return Err("channels are not supported with driver: swarm".into()),
        // Refused by the manifest's validation (`crate::kubernetes`): a Pod is on
        // another host.
        DriverKind::Kubernetes => {
            return Err("channels are not supported by driver kubernetes".to_owned())
        }
    };
    Ok(Some(Space::Scope {
        name: space_name(key),
        uid,
        gid,
    }))
}

/// The container's user as the docker driver sets it: the manifest's `user[:group]`, or
/// `docker.user` (validation allows one of them at most).
fn docker_user(spec: &crate::spec::WorkloadSpec) -> Option<String> {
    match (&spec.user, &spec.group) {
        (Some(u), Some(g)) => Some(format!("{u}:{g}")),
        (Some(u), None) => Some(u.clone()),
        _ => spec.docker.as_ref().and_then(|d| d.user.clone()),
    }
}

fn docker_user_error(user: &str) -> String {
    format!(
        "docker.user {user:?}: channels need a numeric user (uid or uid:gid): the channel \
         space is given to that host user before the container starts, and a name is only \
         known inside the image"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Isolation;

    fn ch(name: &str) -> Channel {
        Channel {
            name: name.into(),
            max_payload: 4096,
            depth: 4,
            from: None,
        }
    }

    #[test]
    fn service_names_are_scoped_by_key() {
        let s1 = Key::new("echo", Isolation::Session, None, Some("s1")).unwrap();
        let s2 = Key::new("echo", Isolation::Session, None, Some("s2")).unwrap();
        let ns = Key::new("echo", Isolation::Namespace, Some("s1"), None).unwrap();
        let sh = Key::new("echo", Isolation::None, None, None).unwrap();
        assert_eq!(
            service_name(&s1, "echo", "in"),
            "bulkhead/session/s1/echo/in"
        );
        assert_eq!(service_name(&ns, "echo", "in"), "bulkhead/ns/s1/echo/in");
        assert_eq!(service_name(&sh, "echo", "in"), "bulkhead/shared/echo/in");
        assert_ne!(
            service_name(&s1, "echo", "in"),
            service_name(&s2, "echo", "in")
        );
    }

    #[test]
    fn from_resolves_to_the_upstream_output_under_the_same_key() {
        let k = Key::new("mid", Isolation::Session, None, Some("run7")).unwrap();
        let c = Channels {
            inputs: vec![Channel {
                from: Some("src.out".into()),
                ..ch("in")
            }],
            outputs: vec![ch("out")],
        };
        c.validate("mid").unwrap();
        let r = resolve(&k, &c);
        assert_eq!(r[0].service, "bulkhead/session/run7/src/out");
        assert_eq!(r[0].direction, Direction::Input);
        assert_eq!(r[1].service, "bulkhead/session/run7/mid/out");
        assert_eq!(r[1].env_var(), "BULKHEAD_CHANNEL_OUT_OUT");
    }

    #[test]
    fn env_value_round_trips() {
        let r = ResolvedChannel {
            name: "frames".into(),
            direction: Direction::Input,
            service: "bulkhead/ns/a/w/frames".into(),
            max_payload: 1 << 20,
            depth: 8,
        };
        assert_eq!(r.env_var(), "BULKHEAD_CHANNEL_IN_FRAMES");
        assert_eq!(
            parse_env_value(&r.env_value()).unwrap(),
            ("bulkhead/ns/a/w/frames".into(), 1 << 20, 8)
        );
        assert_eq!(parse_env_value("x").unwrap(), ("x".into(), 65536, 4));
        assert!(parse_env_value("").is_err());
        assert!(parse_env_value("x;depth=z").is_err());
        assert!(parse_env_value("x;what=1").is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let bad = |c: Channels| c.validate("me").unwrap_err().0;
        assert_eq!(bad(Channels::default()), "");
        assert_eq!(
            bad(Channels {
                inputs: vec![ch("Bad")],
                ..Default::default()
            }),
            "inputs[0].name"
        );
        assert_eq!(
            bad(Channels {
                outputs: vec![ch("a"), ch("a")],
                ..Default::default()
            }),
            "outputs[1].name"
        );
        assert_eq!(
            bad(Channels {
                outputs: vec![Channel {
                    max_payload: 0,
                    ..ch("a")
                }],
                ..Default::default()
            }),
            "outputs[0].max_payload"
        );
        assert_eq!(
            bad(Channels {
                inputs: vec![Channel {
                    depth: 0,
                    ..ch("a")
                }],
                ..Default::default()
            }),
            "inputs[0].depth"
        );
        for from in ["nodot", "me.out", "../x.out", "w.Bad"] {
            assert_eq!(
                bad(Channels {
                    inputs: vec![Channel {
                        from: Some(from.into()),
                        ..ch("a")
                    }],
                    ..Default::default()
                }),
                "inputs[0].from",
                "{from}"
            );
        }
        assert_eq!(
            bad(Channels {
                outputs: vec![Channel {
                    from: Some("w.o".into()),
                    ..ch("a")
                }],
                ..Default::default()
            }),
            "outputs[0].from"
        );
        // An input and an output would share one service name.
        assert_eq!(
            bad(Channels {
                inputs: vec![ch("a")],
                outputs: vec![ch("a")],
            }),
            "outputs[0].name"
        );
    }

    #[test]
    fn each_walled_instance_gets_its_scopes_space_owned_by_the_user_it_runs_as() {
        use crate::sandbox::UserNamespace;
        use crate::spec::parse_manifest;
        let key = Key::new("w", Isolation::Session, None, Some("s1")).unwrap();
        let ids = UserNamespace {
            uid: 1 << 30,
            gid: Some(1 << 30),
            count: 65536,
        };
        let space = |extra: &str| {
            let m =
                format!("name: w\ncommand: [x]\nchannels: {{outputs: [{{name: out}}]}}\n{extra}");
            space_of(
                &parse_manifest("m.yaml", "w", &m).unwrap(),
                &key,
                Some(ids),
                (0, 0),
            )
        };
        let scope = |uid, gid| {
            Ok(Some(Space::Scope {
                name: "session.s1".into(),
                uid,
                gid,
            }))
        };
        assert_eq!(space(""), Ok(Some(Space::Host)), "process: no wall");
        assert_eq!(space("driver: sandbox\n"), scope(1 << 30, 1 << 30));
        assert_eq!(
            space("driver: sandbox\nsandbox: {user: {uid: 70, gid: 71}}\n"),
            scope((1 << 30) + 70, (1 << 30) + 71)
        );
        assert_eq!(
            space("driver: sandbox\nsandbox: {user_namespace: host}\n"),
            scope(0, 0)
        );
        assert_eq!(
            space("driver: sandbox\nsandbox: {user_namespace: host, user: {uid: 1000}}\n"),
            scope(1000, 1000)
        );
        assert_eq!(
            space("driver: sandbox\nsandbox: {user_namespace: {uid: 100000}}\n"),
            scope(100000, 100000)
        );
        let docker = |user: &str| format!("driver: docker\ndocker: {{image: i{user}}}\n");
        assert_eq!(space(&docker("")), scope(0, 0), "the daemon's ids");
        assert_eq!(space(&docker(", user: '1000:1001'")), scope(1000, 1001));
        assert_eq!(space(&docker(", user: '1000'")), scope(1000, 0));
        let e = space(&docker(", user: app")).unwrap_err();
        assert!(e.contains("docker.user") && e.contains("numeric"), "{e}");
        // The manifest's own user and group, as the container will run.
        assert_eq!(
            space(&format!("{}user: \"1000\"\ngroup: \"1002\"\n", docker(""))),
            scope(1000, 1002)
        );
        // No reservation for an automatic user namespace is a daemon bug, said so.
        let m = "name: w\ncommand: [x]\ndriver: sandbox\nchannels: {outputs: [{name: o}]}\n";
        assert!(space_of(
            &parse_manifest("m.yaml", "w", m).unwrap(),
            &key,
            None,
            (0, 0)
        )
        .is_err());
        // Without channels there is no space.
        let m = "name: w\ncommand: [x]\ndriver: sandbox\n";
        assert_eq!(
            space_of(
                &parse_manifest("m.yaml", "w", m).unwrap(),
                &key,
                None,
                (0, 0)
            ),
            Ok(None)
        );
    }

    #[test]
    fn spaces_are_named_by_scope_and_shared_channel_instances_share_one_range() {
        use crate::key::InstanceId;
        use crate::spec::parse_manifest;
        let k = |iso, ns: Option<&str>, s: Option<&str>| Key::new("w", iso, ns, s).unwrap();
        assert_eq!(space_name(&k(Isolation::None, None, None)), "shared");
        assert_eq!(
            space_name(&k(Isolation::Namespace, Some("t1"), None)),
            "ns.t1"
        );
        assert_eq!(
            space_name(&k(Isolation::Session, None, Some("s1"))),
            "session.s1"
        );
        let with = parse_manifest(
            "m.yaml",
            "w",
            "name: w\ncommand: [x]\ndriver: sandbox\nchannels: {outputs: [{name: o}]}\n",
        )
        .unwrap();
        let without =
            parse_manifest("m.yaml", "w", "name: w\ncommand: [x]\ndriver: sandbox\n").unwrap();
        let shared = InstanceId::parse("shared:w").unwrap().0;
        let session = InstanceId::parse("session:s1:w").unwrap().0;
        assert_eq!(ids_tenant(&shared, &with), "shared");
        assert_eq!(ids_tenant(&shared, &without), "shared:w");
        assert_eq!(ids_tenant(&session, &with), "session:s1");
        assert!(needs_ids(&with) && needs_ids(&without));
        let host = parse_manifest(
            "m.yaml",
            "w",
            "name: w\ncommand: [x]\ndriver: sandbox\nsandbox: {user_namespace: host}\n",
        )
        .unwrap();
        assert!(!needs_ids(&host));
        let process = parse_manifest("m.yaml", "w", "name: w\ncommand: [x]\n").unwrap();
        assert!(!needs_ids(&process));
    }

    #[test]
    fn manifests_parse_channels_and_name_the_field() {
        use crate::spec::parse_manifest;
        let ok = "name: mid\ncommand: [x]\nchannels:\n  inputs: [{name: in, from: src.out, max_payload: 1Mi, depth: 8}]\n  outputs: [{name: out}]\n";
        let spec = parse_manifest("m.yaml", "mid", ok).unwrap();
        let c = spec.channels.unwrap();
        assert_eq!(c.inputs[0].max_payload, 1 << 20);
        assert_eq!(c.inputs[0].depth, 8);
        assert_eq!(c.outputs[0].max_payload, 64 << 10);
        assert_eq!(c.outputs[0].depth, 4);
        let bad = "name: mid\ncommand: [x]\nchannels:\n  inputs: [{name: in, from: nodot}]\n";
        let e = parse_manifest("m.yaml", "mid", bad).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("channels.inputs[0].from"));
        let empty = "name: mid\ncommand: [x]\nchannels: {}\n";
        let e = parse_manifest("m.yaml", "mid", empty).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("channels"));
        let env = "name: mid\ncommand: [x]\nenv: {BULKHEAD_CHANNEL_IN_X: y}\n";
        let e = parse_manifest("m.yaml", "mid", env).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("env.BULKHEAD_CHANNEL_IN_X"));
        let unknown = "name: mid\ncommand: [x]\nchannels: {inputs: [{name: a, size: 1}]}\n";
        assert!(parse_manifest("m.yaml", "mid", unknown).is_err());
    }
}
