//! The process basics of a manifest: where an instance starts, which environment file it
//! reads, which user and groups it runs as, its resource limits (rlimits) and its umask.
//!
//! ```yaml
//! working_dir: data               # absolute, or relative to the manifest's folder
//! env_file: [common.env, .env]    # one path or a list, relative to the manifest's folder
//! user: nobody                    # a name or a numeric id
//! group: nogroup                  # default: the user's primary group
//! groups: [adm]                   # added to the user's groups from the group database
//! limits:
//!   nofile: 4096                  # soft = hard
//!   core: unlimited
//!   stack: { soft: 8Mi, hard: 16Mi }
//! umask: "0027"                   # a quoted octal string
//! ```
//!
//! The same meaning on every driver where it applies; where a driver cannot honour a
//! field, [`validate`] refuses the manifest and names the field:
//!
//! | field         | process                  | sandbox                         | docker                  |
//! |---------------|--------------------------|---------------------------------|-------------------------|
//! | `working_dir` | host path                | path inside (same rule)         | absolute path inside    |
//! | `env_file`    | read by the daemon at each start, for every driver         |||
//! | `user`/`group`| host ids (needs root)    | ids inside the user namespace   | the container's `User`  |
//! | `groups`      | `setgroups`              | `setgroups` inside              | `GroupAdd`              |
//! | `limits`      | `setrlimit` in the child | `setrlimit` in the child        | `HostConfig.Ulimits`    |
//! | `umask`       | `umask` in the child     | `umask` in the child            | refused (no engine API) |
//!
//! This module only checks shapes and values; the drivers resolve names and apply.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{de, Deserialize, Deserializer, Serialize};

use crate::spec::{DriverKind, WorkloadSpec};

/// What the numbers of a limit count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitUnit {
    /// Bytes: the size syntax (`64Mi`) is accepted.
    Bytes,
    /// A count (files, processes, signals, a priority).
    Count,
    /// CPU seconds (`cpu`).
    Seconds,
    /// Microseconds (`rttime`).
    Micros,
}

/// Every limit a manifest may set (Linux's `RLIMIT_*`, lower case, as `ulimit` and
/// Docker's `--ulimit` name them).
pub const LIMITS: [(&str, LimitUnit); 16] = [
    ("as", LimitUnit::Bytes),
    ("core", LimitUnit::Bytes),
    ("cpu", LimitUnit::Seconds),
    ("data", LimitUnit::Bytes),
    ("fsize", LimitUnit::Bytes),
    ("locks", LimitUnit::Count),
    ("memlock", LimitUnit::Bytes),
    ("msgqueue", LimitUnit::Bytes),
    ("nice", LimitUnit::Count),
    ("nofile", LimitUnit::Count),
    ("nproc", LimitUnit::Count),
    ("rss", LimitUnit::Bytes),
    ("rtprio", LimitUnit::Count),
    ("rttime", LimitUnit::Micros),
    ("sigpending", LimitUnit::Count),
    ("stack", LimitUnit::Bytes),
];

/// One value of a limit: a number, `unlimited`, or (for byte limits) a size like `64Mi`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LimitValue {
    Number(u64),
    Text(String),
}

/// A limit as written: one value (soft and hard alike) or both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Limit {
    Both(LimitValue),
    Split { soft: LimitValue, hard: LimitValue },
}

/// A checked limit: `None` is unlimited (`RLIM_INFINITY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedLimit {
    pub name: &'static str,
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

impl fmt::Display for ResolvedLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: Option<u64>| v.map_or("unlimited".to_owned(), |n| n.to_string());
        write!(
            f,
            "{} (soft {}, hard {})",
            self.name,
            show(self.soft),
            show(self.hard)
        )
    }
}

fn value(unit: LimitUnit, v: &LimitValue) -> Result<Option<u64>, String> {
    match v {
        // RLIM_INFINITY is u64::MAX: a number that large would mean unlimited by accident.
        LimitValue::Number(n) if *n >= u64::MAX / 2 => {
            Err("is too large (write unlimited for no limit)".into())
        }
        LimitValue::Number(n) => Ok(Some(*n)),
        LimitValue::Text(t) if t == "unlimited" || t == "infinity" => Ok(None),
        LimitValue::Text(t) if unit == LimitUnit::Bytes => {
            crate::size::parse(t).map(Some).map_err(|e| e.to_string())
        }
        LimitValue::Text(t) => Err(format!(
            "{} is not a number or unlimited",
            crate::name::show(t)
        )),
    }
}

/// Whether soft fits under hard (unlimited is the largest).
fn fits(soft: Option<u64>, hard: Option<u64>) -> bool {
    match (soft, hard) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(s), Some(h)) => s <= h,
    }
}

/// The limits of `limits:`, checked. On error: the field (`limits.<name>`) and the reason.
pub fn resolve_limits(
    limits: &BTreeMap<String, Limit>,
) -> Result<Vec<ResolvedLimit>, (String, String)> {
    let mut out = Vec::with_capacity(limits.len());
    for (name, limit) in limits {
        let field = format!("limits.{name}");
        let Some((known, unit)) = LIMITS.iter().find(|(n, _)| n == name) else {
            let names: Vec<&str> = LIMITS.iter().map(|(n, _)| *n).collect();
            return Err((
                field,
                format!("is not a known limit (known: {})", names.join(", ")),
            ));
        };
        let (soft, hard) = match limit {
            Limit::Both(v) => {
                let v = value(*unit, v).map_err(|r| (field.clone(), r))?;
                (v, v)
            }
            Limit::Split { soft, hard } => (
                value(*unit, soft).map_err(|r| (format!("{field}.soft"), r))?,
                value(*unit, hard).map_err(|r| (format!("{field}.hard"), r))?,
            ),
        };
        if !fits(soft, hard) {
            return Err((
                format!("{field}.soft"),
                "must not be above the hard limit".into(),
            ));
        }
        out.push(ResolvedLimit {
            name: known,
            soft,
            hard,
        });
    }
    Ok(out)
}

/// A `user` or `group` as written: a numeric id or a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal<'a> {
    Id(u32),
    Name(&'a str),
}

/// Reads a `user`/`group` value: all digits is an id (below 4294967295, the kernel's "no
/// id"); otherwise a name as `useradd` accepts it (letters, digits, `_`, `-`, `.`, not
/// starting with `-`, at most 32 characters, an optional final `$`).
pub fn principal(s: &str) -> Result<Principal<'_>, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return match s.parse::<u32>() {
            Ok(n) if n != u32::MAX => Ok(Principal::Id(n)),
            _ => Err("is not a valid id (at most 4294967294)".into()),
        };
    }
    let body = s.strip_suffix('$').unwrap_or(s);
    let ok = !body.is_empty()
        && s.len() <= 32
        && !body.starts_with('-')
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    if ok {
        Ok(Principal::Name(s))
    } else {
        Err(format!(
            "{} is not a user or group name (letters, digits, '_', '-', '.', at most 32) or a numeric id",
            crate::name::show(s)
        ))
    }
}

/// Reads an octal umask (`"0027"`, `"027"`, `"22"`): at most `0777`.
pub fn parse_umask(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        return Err(format!(
            "{} is not an octal umask like \"0027\"",
            crate::name::show(s)
        ));
    }
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err("must be at most 0777".into()),
    }
}

/// `env_file`: one path or a list.
pub fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::One(s) => vec![s],
        Raw::Many(v) => v,
    })
}

/// A `user`/`group` written as a string or a bare number.
pub fn opt_principal<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Some(id_or_name(d)?))
}

/// `groups`: names or numbers.
pub fn principals<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct Item(String);
    impl<'de> Deserialize<'de> for Item {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Item, D::Error> {
            id_or_name(d).map(Item)
        }
    }
    Ok(Vec::<Item>::deserialize(d)?
        .into_iter()
        .map(|i| i.0)
        .collect())
}

fn id_or_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl de::Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a name or a numeric id")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(V)
}

/// A umask must be a quoted string: YAML reads an unquoted `0027` as the number 27.
pub fn opt_umask<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct V;
    impl de::Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a quoted octal string like \"0027\"")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<String, E> {
            Err(E::custom(
                "umask must be a quoted octal string like \"0027\" (YAML reads an unquoted number as decimal)",
            ))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            self.visit_u64(v as u64)
        }
    }
    d.deserialize_any(V).map(Some)
}

/// Where an instance of `spec` whose manifest sits in `folder` starts, for the drivers
/// that see the host's paths (process, sandbox): `working_dir` if absolute, else joined to
/// the folder; the folder itself by default.
pub fn working_dir(spec: &WorkloadSpec, folder: &Path) -> PathBuf {
    match &spec.working_dir {
        Some(w) => folder.join(w),
        None => folder.to_path_buf(),
    }
}

/// The env files of `spec`, resolved against the manifest's folder, in order (a later
/// file wins over an earlier one; the manifest's `env` wins over all).
pub fn env_files(spec: &WorkloadSpec, folder: &Path) -> Vec<PathBuf> {
    spec.env_file.iter().map(|f| folder.join(f)).collect()
}

/// The most env files, and supplementary groups, a manifest may list.
pub const MAX_LIST: usize = 64;

fn path_ok(s: &str) -> Result<(), String> {
    if s.is_empty() {
        Err("must not be empty".into())
    } else if s.contains('\0') {
        Err("contains a NUL byte".into())
    } else if s.len() > 4096 {
        Err("is too long (at most 4096 bytes)".into())
    } else {
        Ok(())
    }
}

/// Checks the basics of `spec` for its driver. On error: the field and the reason.
pub fn validate(spec: &WorkloadSpec) -> Result<(), (String, String)> {
    let fail = |field: &str, reason: String| Err((field.to_owned(), reason));
    let driver = spec.driver;
    if let Some(w) = &spec.working_dir {
        path_ok(w).map_err(|r| ("working_dir".to_owned(), r))?;
        if driver == DriverKind::Docker && !w.starts_with('/') {
            return fail(
                "working_dir",
                "must be an absolute path inside the container with driver: docker".into(),
            );
        }
        if driver == DriverKind::Docker && spec.docker.as_ref().is_some_and(|d| d.workdir.is_some())
        {
            return fail(
                "working_dir",
                "and docker.workdir both set the working directory: keep one".into(),
            );
        }
    }
    if spec.env_file.len() > MAX_LIST {
        return fail("env_file", format!("lists more than {MAX_LIST} files"));
    }
    for (i, f) in spec.env_file.iter().enumerate() {
        path_ok(f).map_err(|r| (format!("env_file[{i}]"), r))?;
    }
    if let Some(u) = &spec.user {
        principal(u).map_err(|r| ("user".to_owned(), r))?;
    }
    if let Some(g) = &spec.group {
        principal(g).map_err(|r| ("group".to_owned(), r))?;
    }
    if spec.groups.len() > MAX_LIST {
        return fail("groups", format!("lists more than {MAX_LIST} groups"));
    }
    for (i, g) in spec.groups.iter().enumerate() {
        principal(g).map_err(|r| (format!("groups[{i}]"), r))?;
    }
    let sets_user = spec.user.is_some() || spec.group.is_some() || !spec.groups.is_empty();
    match driver {
        DriverKind::Sandbox if sets_user => {
            if spec.sandbox.as_ref().is_some_and(|s| s.user.is_some()) {
                return fail(
                    "user",
                    "and sandbox.user both set the user: keep one (user names ids inside the sandbox's user namespace)".into(),
                );
            }
            if spec.user.is_none() {
                let field = if spec.group.is_some() {
                    "group"
                } else {
                    "groups"
                };
                return fail(
                    field,
                    "needs user with driver: sandbox (the workload runs as root inside otherwise)"
                        .into(),
                );
            }
        }
        DriverKind::Docker if sets_user => {
            if spec.docker.as_ref().is_some_and(|d| d.user.is_some()) {
                return fail(
                    "user",
                    "and docker.user both set the container's user: keep one".into(),
                );
            }
            if spec.user.is_none() && spec.group.is_some() {
                return fail(
                    "group",
                    "needs user with driver: docker (the container's User is user:group)".into(),
                );
            }
        }
        _ => {}
    }
    if sets_user && spec.channels.is_some() {
        // The channel space is given to the instance's host user before the start, and
        // the core resolves no names: only the forms it can place are accepted.
        let field = if spec.user.is_some() {
            "user"
        } else if spec.group.is_some() {
            "group"
        } else {
            "groups"
        };
        match driver {
            DriverKind::Process => {
                return fail(
                    field,
                    "cannot be combined with channels on the process driver: the host's channel space belongs to the daemon's user".into(),
                );
            }
            DriverKind::Sandbox => {
                return fail(
                    field,
                    "with channels, set sandbox.user {uid, gid} instead (the channel space is given to that user before the start)".into(),
                );
            }
            // Channels are refused with driver: swarm (`crate::swarm::validate`).
            DriverKind::Swarm => {}
            DriverKind::Docker => {
                let numeric = |v: &Option<String>| {
                    v.as_deref()
                        .is_none_or(|s| matches!(principal(s), Ok(Principal::Id(_))))
                };
                if !numeric(&spec.user) || !numeric(&spec.group) {
                    return fail(
                        field,
                        "channels need a numeric user and group (the channel space is given to that host user before the container starts; a name is only known inside the image)".into(),
                    );
                }
            }
            // Refused before, by `crate::kubernetes::validate`.
            DriverKind::Kubernetes => {}
        }
    }
    resolve_limits(&spec.limits)?;
    if let Some(m) = &spec.umask {
        parse_umask(m).map_err(|r| ("umask".to_owned(), r))?;
        if driver == DriverKind::Docker {
            return fail(
                "umask",
                "cannot be set with driver: docker (the engine has no umask setting; set it in the image's entrypoint)".into(),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse_manifest;

    fn parse(extra: &str) -> Result<WorkloadSpec, String> {
        let text = format!("name: w\ncommand: [sh]\n{extra}");
        parse_manifest("w/manifest.yaml", "w", &text).map_err(|e| e.to_string())
    }

    #[test]
    fn every_field_parses_in_its_written_forms() {
        let s = parse(
            "working_dir: data\nenv_file: a.env\nuser: 65534\ngroup: nogroup\ngroups: [adm, 4]\n\
             limits: {nofile: 4096, core: unlimited, stack: {soft: 8Mi, hard: 16Mi}}\numask: \"0027\"\n",
        )
        .unwrap();
        assert_eq!(s.working_dir.as_deref(), Some("data"));
        assert_eq!(s.env_file, ["a.env"]);
        assert_eq!(s.user.as_deref(), Some("65534"));
        assert_eq!(s.group.as_deref(), Some("nogroup"));
        assert_eq!(s.groups, ["adm", "4"]);
        assert_eq!(s.umask.as_deref(), Some("0027"));
        let l = resolve_limits(&s.limits).unwrap();
        assert_eq!(
            l,
            [
                ResolvedLimit {
                    name: "core",
                    soft: None,
                    hard: None
                },
                ResolvedLimit {
                    name: "nofile",
                    soft: Some(4096),
                    hard: Some(4096)
                },
                ResolvedLimit {
                    name: "stack",
                    soft: Some(8 << 20),
                    hard: Some(16 << 20)
                },
            ]
        );
        let s = parse("env_file: [a.env, b.env]\n").unwrap();
        assert_eq!(s.env_file, ["a.env", "b.env"]);
    }

    #[test]
    fn a_bad_user_or_group_name_is_a_manifest_error_naming_the_field() {
        let e = parse("user: \"bad name\"\n").unwrap_err();
        assert!(
            e.contains("field `user`") && e.contains("not a user or group name"),
            "{e}"
        );
        let e = parse("group: \"-x\"\n").unwrap_err();
        assert!(e.contains("field `group`"), "{e}");
        let e = parse("groups: [ok, \"a:b\"]\n").unwrap_err();
        assert!(e.contains("field `groups[1]`"), "{e}");
        let e = parse("user: 4294967295\n").unwrap_err();
        assert!(e.contains("not a valid id"), "{e}");
        assert_eq!(principal("www-data").unwrap(), Principal::Name("www-data"));
        assert_eq!(principal("0").unwrap(), Principal::Id(0));
    }

    #[test]
    fn a_bad_umask_is_a_manifest_error() {
        for bad in ["\"0999\"", "\"abc\"", "\"01777\"", "\"\""] {
            let e = parse(&format!("umask: {bad}\n")).unwrap_err();
            assert!(e.contains("field `umask`"), "{bad}: {e}");
        }
        // Unquoted: YAML would read 0027 as 27; refused with the reason.
        let e = parse("umask: 0027\n").unwrap_err();
        assert!(e.contains("quoted octal string"), "{e}");
        assert_eq!(parse_umask("0027"), Ok(0o027));
        assert_eq!(parse_umask("22"), Ok(0o022));
        assert_eq!(parse_umask("0777"), Ok(0o777));
    }

    #[test]
    fn an_unknown_limit_name_or_a_soft_limit_above_the_hard_one_is_refused() {
        let e = parse("limits: {nofiles: 10}\n").unwrap_err();
        assert!(
            e.contains("field `limits.nofiles`") && e.contains("not a known limit"),
            "{e}"
        );
        let e = parse("limits: {nofile: {soft: 20, hard: 10}}\n").unwrap_err();
        assert!(e.contains("field `limits.nofile.soft`"), "{e}");
        let e = parse("limits: {nofile: {soft: unlimited, hard: 10}}\n").unwrap_err();
        assert!(e.contains("limits.nofile.soft"), "{e}");
        // Sizes only where the limit counts bytes.
        let e = parse("limits: {nofile: 4Ki}\n").unwrap_err();
        assert!(e.contains("field `limits.nofile`"), "{e}");
        assert!(parse("limits: {memlock: 64Ki}\n").is_ok());
        let e = parse("limits: {core: lots}\n").unwrap_err();
        assert!(e.contains("limits.core"), "{e}");
    }

    #[test]
    fn working_dir_is_absolute_or_relative_to_the_manifests_folder() {
        let folder = Path::new("/srv/w");
        let s = parse("working_dir: data/run\n").unwrap();
        assert_eq!(working_dir(&s, folder), Path::new("/srv/w/data/run"));
        let s = parse("working_dir: /var/lib/w\n").unwrap();
        assert_eq!(working_dir(&s, folder), Path::new("/var/lib/w"));
        let s = parse("").unwrap();
        assert_eq!(working_dir(&s, folder), folder);
        let s = parse("env_file: [../shared.env, /etc/w.env]\n").unwrap();
        assert_eq!(
            env_files(&s, folder),
            [
                PathBuf::from("/srv/w/../shared.env"),
                PathBuf::from("/etc/w.env")
            ]
        );
    }

    #[test]
    fn a_driver_that_cannot_honour_a_field_refuses_the_manifest() {
        let docker = "driver: docker\ndocker: {image: x}\n";
        let e = parse(&format!("{docker}umask: \"0022\"\n")).unwrap_err();
        assert!(
            e.contains("field `umask`") && e.contains("driver: docker"),
            "{e}"
        );
        let e = parse(&format!("{docker}working_dir: data\n")).unwrap_err();
        assert!(
            e.contains("field `working_dir`") && e.contains("absolute"),
            "{e}"
        );
        assert!(parse(&format!(
            "{docker}working_dir: /app\nuser: nobody\nlimits: {{nofile: 10}}\n"
        ))
        .is_ok());
        let e = parse("driver: docker\ndocker: {image: x, user: app}\nuser: nobody\n").unwrap_err();
        assert!(e.contains("docker.user"), "{e}");
        let e = parse("driver: sandbox\nsandbox: {user: {uid: 1}}\nuser: nobody\n").unwrap_err();
        assert!(
            e.contains("field `user`") && e.contains("sandbox.user"),
            "{e}"
        );
        let e = parse("driver: sandbox\ngroup: nogroup\n").unwrap_err();
        assert!(e.contains("field `group`"), "{e}");
        let e = parse("driver: sandbox\ngroups: [adm]\n").unwrap_err();
        assert!(e.contains("field `groups`"), "{e}");
        assert!(parse("driver: sandbox\nuser: nobody\numask: \"077\"\n").is_ok());
        // Channels: the space's owner must be known before the start.
        let ch = "channels: {outputs: [{name: out}]}\n";
        let e = parse(&format!("{ch}user: nobody\n")).unwrap_err();
        assert!(
            e.contains("field `user`") && e.contains("process driver"),
            "{e}"
        );
        let e = parse(&format!("driver: sandbox\n{ch}user: \"5\"\n")).unwrap_err();
        assert!(e.contains("sandbox.user"), "{e}");
        let e = parse(&format!("{docker}{ch}user: app\n")).unwrap_err();
        assert!(e.contains("numeric"), "{e}");
        assert!(parse(&format!("{docker}{ch}user: \"7\"\ngroup: \"8\"\n")).is_ok());
    }
}
