//! Names of workloads, namespaces and sessions.
//!
//! Names end up in instance ids, file names under the state dir, environment variables and
//! (later) cgroup and container names, so they are deliberately conservative: 1 to 63
//! characters of ASCII letters, digits, `.`, `_` and `-`, starting with a letter or digit,
//! and never containing `..`. That rules out `/`, NUL, control characters, `:` (the id
//! separator) and whitespace.

use std::fmt;

/// The longest name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 63;

/// What a name names; used in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    Workload,
    Namespace,
    Session,
    /// A lease holder.
    Lease,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Workload => "workload name",
            NameKind::Namespace => "namespace name",
            NameKind::Session => "session name",
            NameKind::Lease => "lease holder name",
        })
    }
}

/// A name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {shown}: {reason}")]
pub struct NameError {
    pub kind: NameKind,
    /// The offending name, escaped and shortened for display.
    pub shown: String,
    pub reason: &'static str,
}

/// Checks `name` against the rules in the module docs.
pub fn validate(kind: NameKind, name: &str) -> Result<(), NameError> {
    let fail = |reason| {
        Err(NameError {
            kind,
            shown: show(name),
            reason,
        })
    };
    if name.is_empty() {
        return fail("must not be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return fail("is longer than 63 characters");
    }
    if name.contains('\0') {
        return fail("contains a NUL byte");
    }
    if name.chars().any(char::is_control) {
        return fail("contains a control character");
    }
    if name.contains("..") {
        return fail("contains '..'");
    }
    if name.contains('/') {
        return fail("contains '/'");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return fail("may only contain ASCII letters, digits, '.', '_' and '-'");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return fail("must start with a letter or digit");
    }
    Ok(())
}

/// A short, escaped rendering of untrusted input for error messages.
pub fn show(s: &str) -> String {
    const LIMIT: usize = 64;
    let mut out: String = s
        .chars()
        .take(LIMIT)
        .collect::<String>()
        .escape_debug()
        .collect();
    if s.chars().count() > LIMIT {
        out.push_str("...");
    }
    format!("\"{out}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["web", "a", "team-a", "s_1.2", "0abc", &"x".repeat(63)] {
            validate(NameKind::Workload, n).unwrap();
        }
    }

    #[test]
    fn rejects_hostile_names_with_reasons() {
        let cases = [
            ("", "must not be empty"),
            ("..", "contains '..'"),
            ("a..b", "contains '..'"),
            ("a/b", "contains '/'"),
            ("a\0b", "contains a NUL byte"),
            ("a\nb", "contains a control character"),
            ("a:b", "may only contain"),
            ("a b", "may only contain"),
            ("-a", "must start"),
            (".a", "must start"),
            ("é", "may only contain"),
        ];
        for (name, reason) in cases {
            let err = validate(NameKind::Session, name).unwrap_err();
            assert!(err.reason.starts_with(reason), "{name:?}: {err}");
        }
        let long = "a".repeat(4096);
        let err = validate(NameKind::Namespace, &long).unwrap_err();
        assert!(
            err.to_string().len() < 200,
            "error message stays short: {err}"
        );
    }

    #[test]
    fn error_message_names_the_kind_and_escapes() {
        let err = validate(NameKind::Session, "a\0b").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid session name \"a\\0b\": contains a NUL byte"
        );
    }
}
