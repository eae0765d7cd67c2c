//! Isolation levels, isolation keys and instance ids.
//!
//! A launch names a workload and, depending on the workload's isolation level, a namespace
//! or a session. Together they form the [`Key`]; one key has at most one live instance,
//! and the instance's id is the key's canonical text:
//!
//! | isolation   | id                               |
//! |-------------|----------------------------------|
//! | `none`      | `shared:<workload>`              |
//! | `namespace` | `ns:<namespace>:<workload>`      |
//! | `session`   | `session:<session>:<workload>`   |

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::name::{self, NameError, NameKind};

/// The namespace used when a namespace-isolated workload is launched without one.
pub const DEFAULT_NAMESPACE: &str = "default";

/// How many instances of a workload may exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// One shared instance.
    None,
    /// One instance per namespace (tenant).
    #[default]
    Namespace,
    /// One instance per session.
    Session,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::None => "none",
            Isolation::Namespace => "namespace",
            Isolation::Session => "session",
        }
    }
}

impl fmt::Display for Isolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The scope part of a key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    Shared,
    Namespace(String),
    Session(String),
}

/// A validated isolation key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    workload: String,
    scope: Scope,
}

/// A key could not be formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("workload {workload} has isolation session: a session is required (--session)")]
    SessionRequired { workload: String },
    #[error("workload {workload} has isolation {isolation}: --{given} does not apply to it")]
    NotApplicable {
        workload: String,
        isolation: Isolation,
        given: &'static str,
    },
    #[error("invalid instance id {shown}: expected shared:<workload>, ns:<namespace>:<workload> or session:<session>:<workload>")]
    BadId { shown: String },
}

impl Key {
    /// Forms the key of a launch. `namespace` and `session` are what the caller gave.
    ///
    /// Isolation `none` ignores neither silently: giving a session to a shared workload is
    /// an error, so that a caller who expects per-session isolation learns it has none.
    /// A namespace-isolated workload launched without a namespace gets [`DEFAULT_NAMESPACE`];
    /// a session given to it is an error for the same reason.
    pub fn new(
        workload: &str,
        isolation: Isolation,
        namespace: Option<&str>,
        session: Option<&str>,
    ) -> Result<Key, KeyError> {
        name::validate(NameKind::Workload, workload)?;
        let not_applicable = |given| KeyError::NotApplicable {
            workload: workload.to_owned(),
            isolation,
            given,
        };
        let scope = match isolation {
            Isolation::None => {
                if session.is_some() {
                    return Err(not_applicable("session"));
                }
                if namespace.is_some() {
                    return Err(not_applicable("namespace"));
                }
                Scope::Shared
            }
            Isolation::Namespace => {
                if session.is_some() {
                    return Err(not_applicable("session"));
                }
                let ns = namespace.unwrap_or(DEFAULT_NAMESPACE);
                name::validate(NameKind::Namespace, ns)?;
                Scope::Namespace(ns.to_owned())
            }
            Isolation::Session => {
                let Some(sid) = session else {
                    return Err(KeyError::SessionRequired {
                        workload: workload.to_owned(),
                    });
                };
                name::validate(NameKind::Session, sid)?;
                if let Some(ns) = namespace {
                    name::validate(NameKind::Namespace, ns)?;
                }
                Scope::Session(sid.to_owned())
            }
        };
        Ok(Key {
            workload: workload.to_owned(),
            scope,
        })
    }

    pub fn workload(&self) -> &str {
        &self.workload
    }

    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    pub fn isolation(&self) -> Isolation {
        match self.scope {
            Scope::Shared => Isolation::None,
            Scope::Namespace(_) => Isolation::Namespace,
            Scope::Session(_) => Isolation::Session,
        }
    }

    pub fn namespace(&self) -> Option<&str> {
        match &self.scope {
            Scope::Namespace(ns) => Some(ns),
            _ => None,
        }
    }

    pub fn session(&self) -> Option<&str> {
        match &self.scope {
            Scope::Session(s) => Some(s),
            _ => None,
        }
    }

    pub fn instance_id(&self) -> InstanceId {
        InstanceId(match &self.scope {
            Scope::Shared => format!("shared:{}", self.workload),
            Scope::Namespace(ns) => format!("ns:{ns}:{}", self.workload),
            Scope::Session(s) => format!("session:{s}:{}", self.workload),
        })
    }
}

/// The id of an instance: the canonical text of its key. Always valid once constructed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId(String);

impl InstanceId {
    /// Parses and validates an id typed by a user.
    pub fn parse(s: &str) -> Result<(InstanceId, Key), KeyError> {
        let bad = || KeyError::BadId {
            shown: name::show(s),
        };
        let mut parts = s.splitn(3, ':');
        let kind = parts.next().ok_or_else(bad)?;
        let key = match kind {
            "shared" => {
                let w = parts.next().ok_or_else(bad)?;
                if parts.next().is_some() {
                    return Err(bad());
                }
                Key::new(w, Isolation::None, None, None)?
            }
            "ns" => {
                let ns = parts.next().ok_or_else(bad)?;
                let w = parts.next().ok_or_else(bad)?;
                Key::new(w, Isolation::Namespace, Some(ns), None)?
            }
            "session" => {
                let sid = parts.next().ok_or_else(bad)?;
                let w = parts.next().ok_or_else(bad)?;
                Key::new(w, Isolation::Session, None, Some(sid))?
            }
            _ => return Err(bad()),
        };
        Ok((key.instance_id(), key))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A file-name-safe rendering (ids never contain `/`, so this is the id itself).
    pub fn file_stem(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_per_isolation() {
        let k = Key::new("web", Isolation::None, None, None).unwrap();
        assert_eq!(k.instance_id().as_str(), "shared:web");
        let k = Key::new("web", Isolation::Namespace, None, None).unwrap();
        assert_eq!(k.instance_id().as_str(), "ns:default:web");
        let k = Key::new("web", Isolation::Namespace, Some("t1"), None).unwrap();
        assert_eq!(k.instance_id().as_str(), "ns:t1:web");
        let k = Key::new("web", Isolation::Session, Some("t1"), Some("s9")).unwrap();
        assert_eq!(k.instance_id().as_str(), "session:s9:web");
        assert_eq!(k.namespace(), None);
        assert_eq!(k.session(), Some("s9"));
    }

    #[test]
    fn missing_or_inapplicable_scope_is_an_error() {
        assert!(matches!(
            Key::new("w", Isolation::Session, None, None),
            Err(KeyError::SessionRequired { .. })
        ));
        assert!(matches!(
            Key::new("w", Isolation::None, None, Some("s")),
            Err(KeyError::NotApplicable {
                given: "session",
                ..
            })
        ));
        assert!(matches!(
            Key::new("w", Isolation::Namespace, None, Some("s")),
            Err(KeyError::NotApplicable {
                given: "session",
                ..
            })
        ));
        assert!(matches!(
            Key::new("w", Isolation::Namespace, Some("../x"), None),
            Err(KeyError::Name(_))
        ));
    }

    #[test]
    fn parse_rejects_garbage() {
        for s in [
            "",
            "web",
            "shared:",
            "shared:a:b",
            "ns:a",
            "pod:a:b",
            "ns:a/b:c",
            "ns:..:c",
        ] {
            assert!(InstanceId::parse(s).is_err(), "{s:?}");
        }
    }

    proptest! {
        #[test]
        fn id_round_trips(w in "[a-z0-9][a-z0-9_-]{0,20}", s in "[a-z0-9][a-z0-9_-]{0,20}", which in 0u8..3) {
            let key = match which {
                0 => Key::new(&w, Isolation::None, None, None),
                1 => Key::new(&w, Isolation::Namespace, Some(&s), None),
                _ => Key::new(&w, Isolation::Session, None, Some(&s)),
            }.unwrap();
            let id = key.instance_id();
            let (id2, key2) = InstanceId::parse(id.as_str()).unwrap();
            prop_assert_eq!(id, id2);
            prop_assert_eq!(key, key2);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = InstanceId::parse(&s);
        }
    }
}
