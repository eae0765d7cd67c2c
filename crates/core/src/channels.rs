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

/// Why `spec`'s channels cannot work for a daemon running as `daemon_uid`, if they cannot.
///
/// iceoryx2 creates its files mode 0600 and `/dev/shm` is sticky: only the user who runs
/// the daemon (which creates the services) can open them, and the daemon can reclaim only
/// what the workload created as that user. A walled workload that runs as another host
/// uid would fail on its first channel; the launch says why instead. (A docker `user:`
/// given by name is resolved inside the image, which the daemon cannot see; it passes.)
pub fn user_conflict(spec: &crate::spec::WorkloadSpec, daemon_uid: u32) -> Option<String> {
    use crate::spec::DriverKind;
    spec.channels.as_ref()?;
    let (field, host_uid) = match spec.driver {
        DriverKind::Process => return None,
        DriverKind::Sandbox => {
            // No section: the defaults, an automatic user namespace.
            let default = crate::sandbox::SandboxSpec::default();
            let sb = spec.sandbox.as_ref().unwrap_or(&default);
            let inner = sb.user.as_ref().map(|u| u.uid);
            match (&sb.user_namespace, inner) {
                (crate::sandbox::UserNs::Map(ns), inner) => (
                    "sandbox.user_namespace",
                    ns.uid.saturating_add(inner.unwrap_or(0)),
                ),
                (crate::sandbox::UserNs::Auto, _) => {
                    return Some(format!(
                        "channels in a sandbox need `sandbox.user_namespace: host` for now: \
                         iceoryx2's shared memory is private to the daemon's user (uid \
                         {daemon_uid}), and the default user namespace runs the workload as \
                         an unprivileged uid of its tenant's range"
                    ));
                }
                (crate::sandbox::UserNs::Host, Some(uid)) => ("sandbox.user", uid),
                (crate::sandbox::UserNs::Host, None) => return None,
            }
        }
        DriverKind::Docker => {
            let user = spec.docker.as_ref()?.user.as_deref()?;
            let uid = user.split(':').next()?.parse::<u32>().ok()?;
            ("docker.user", uid)
        }
    };
    (host_uid != daemon_uid).then(|| {
        format!(
            "channels need the workload to run as the daemon's user (uid {daemon_uid}):              iceoryx2's shared memory is private to its owner, and {field} makes the              workload uid {host_uid} on the host"
        )
    })
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
    fn walled_workloads_with_channels_must_run_as_the_daemons_user() {
        use crate::spec::parse_manifest;
        let check = |extra: &str, uid: u32| {
            let m =
                format!("name: w\ncommand: [x]\nchannels: {{outputs: [{{name: out}}]}}\n{extra}");
            user_conflict(&parse_manifest("m.yaml", "w", &m).unwrap(), uid)
        };
        assert_eq!(check("", 0), None);
        // The default sandbox runs in a user namespace of its own: refused with the way out.
        let e = check("driver: sandbox\n", 0).unwrap();
        assert!(e.contains("user_namespace: host"), "{e}");
        let host = "driver: sandbox\nsandbox: {user_namespace: host";
        assert_eq!(check(&format!("{host}}}\n"), 1000), None);
        assert_eq!(
            check(&format!("{host}, user: {{uid: 1000}}}}\n"), 1000),
            None
        );
        let e = check(&format!("{host}, user: {{uid: 1000}}}}\n"), 0).unwrap();
        assert!(e.contains("sandbox.user") && e.contains("uid 1000"), "{e}");
        let e = check(
            "driver: sandbox\nsandbox: {user_namespace: {uid: 100000}}\n",
            0,
        )
        .unwrap();
        assert!(e.contains("uid 100000"), "{e}");
        let docker = |user: &str| format!("driver: docker\ndocker: {{image: i, user: '{user}'}}\n");
        assert!(check(&docker("1000:1000"), 0).is_some());
        assert_eq!(check(&docker("0"), 0), None);
        assert_eq!(
            check(&docker("app"), 0),
            None,
            "a name is resolved in the image"
        );
        // Without channels there is nothing to share.
        let m = "name: w\ncommand: [x]\ndriver: sandbox\nsandbox: {user: {uid: 1000}}\n";
        assert_eq!(
            user_conflict(&parse_manifest("m.yaml", "w", m).unwrap(), 0),
            None
        );
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
