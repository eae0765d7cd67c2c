//! Dependencies between workloads (`depends_on`), resolved per key.
//!
//! A manifest names the workloads it needs and the condition each must reach before it
//! is started:
//!
//! ```yaml
//! depends_on:
//!   db: {condition: ready}            # started | ready | completed_successfully
//!   migrate: {condition: completed_successfully}
//! on_dependency_restart: restart      # or ignore (the default)
//! ```
//!
//! The short form `depends_on: [db, cache]` means `condition: ready` for each. `ready` is
//! the default because a workload without a `readiness` section is ready as soon as it is
//! started: it is never stricter than what the dependency itself declares.
//!
//! **Keys.** A dependency is launched for the key derived from the dependent's key
//! ([`dependency_key`]): the same scope when both have the same isolation (a session's
//! `web` gets that session's `db`; a namespace's, that namespace's), the one shared
//! instance when the dependency's isolation is `none`. Any other pairing is a manifest
//! error ([`scope_allowed`]): a session key carries no namespace, so a session workload
//! cannot name a namespace-isolated dependency (which namespace would it be?), and a
//! shared or namespace workload has no session to give a session-isolated one.
//!
//! **The graph** of a catalog is checked as a whole ([`check_graph`]): an unknown name and
//! a cycle are errors of the manifest that names them, on the field `depends_on.<name>`.
//! [`layers`] orders any graph (of workloads or of instances) from the leaves up; teardown
//! walks it backwards. Everything here is pure.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize};

use crate::key::{Isolation, Key, KeyError, Scope};
use crate::name::{self, NameKind};

/// How many dependencies one manifest may name.
pub const MAX_DEPENDENCIES: usize = 64;

/// What a dependency must reach before its dependent is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// Its process was started.
    Started,
    /// It is ready (its readiness passed; without readiness: started).
    #[default]
    Ready,
    /// It is a one-shot job whose run exited with code 0 (state `exited`).
    CompletedSuccessfully,
}

impl Condition {
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Started => "started",
            Condition::Ready => "ready",
            Condition::CompletedSuccessfully => "completed_successfully",
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of `depends_on`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dependency {
    #[serde(default)]
    pub condition: Condition,
}

/// `depends_on`: dependency name -> what it must reach. Written as a map or as a list of
/// names (each `condition: ready`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(transparent)]
pub struct DependsOn(pub BTreeMap<String, Dependency>);

impl DependsOn {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, Condition)> {
        self.0.iter().map(|(k, d)| (k.as_str(), d.condition))
    }
}

impl<'de> Deserialize<'de> for DependsOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<DependsOn, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = DependsOn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of workload names to {condition: ...}, or a list of names")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<DependsOn, A::Error> {
                let mut m = BTreeMap::new();
                while let Some(name) = seq.next_element::<String>()? {
                    if m.insert(name.clone(), Dependency::default()).is_some() {
                        return Err(de::Error::custom(format!(
                            "depends_on names {} twice",
                            name::show(&name)
                        )));
                    }
                }
                Ok(DependsOn(m))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<DependsOn, A::Error> {
                let m = BTreeMap::<String, Option<Dependency>>::deserialize(
                    de::value::MapAccessDeserializer::new(map),
                )?;
                Ok(DependsOn(
                    m.into_iter()
                        .map(|(k, v)| (k, v.unwrap_or_default()))
                        .collect(),
                ))
            }
        }
        d.deserialize_any(V)
    }
}

/// What a dependent does when one of its dependencies restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDependencyRestart {
    /// Restart this instance too (same key), gated on its dependencies again.
    Restart,
    /// Nothing (the default, as compose's `restart: false`).
    #[default]
    Ignore,
}

impl OnDependencyRestart {
    pub fn is_ignore(&self) -> bool {
        *self == OnDependencyRestart::Ignore
    }
}

/// Checks one manifest's `depends_on` on its own (`own`: the workload's name). On error:
/// the field path and the reason.
pub fn validate(own: &str, deps: &DependsOn) -> Result<(), (String, String)> {
    if deps.0.len() > MAX_DEPENDENCIES {
        return Err((
            "depends_on".into(),
            format!("names more than {MAX_DEPENDENCIES} workloads"),
        ));
    }
    for name in deps.names() {
        if let Err(e) = name::validate(NameKind::Workload, name) {
            return Err((
                format!("depends_on.{}", name::show(name)),
                format!("not a valid workload name: {}", e.reason),
            ));
        }
        if name == own {
            return Err((
                format!("depends_on.{name}"),
                "a workload cannot depend on itself".into(),
            ));
        }
    }
    Ok(())
}

/// Whether a workload of isolation `dependent` may depend on one of isolation
/// `dependency`: the same isolation (the same scope), or a shared dependency.
pub fn scope_allowed(dependent: Isolation, dependency: Isolation) -> bool {
    dependency == Isolation::None || dependency == dependent
}

/// Why a dependency's key cannot be derived.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DepKeyError {
    #[error("{dependency} has isolation {dependency_isolation}, which a workload of isolation {dependent_isolation} cannot depend on (a dependency has the dependent's isolation, or none){hint}")]
    Scope {
        dependency: String,
        dependency_isolation: Isolation,
        dependent_isolation: Isolation,
        hint: &'static str,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// The reason text of [`DepKeyError::Scope`] for a pairing, or `None` when allowed.
pub fn scope_error(
    dependency: &str,
    dependent: Isolation,
    dependency_isolation: Isolation,
) -> Option<DepKeyError> {
    if scope_allowed(dependent, dependency_isolation) {
        return None;
    }
    let hint = match (dependent, dependency_isolation) {
        (Isolation::Session, Isolation::Namespace) => ": a session's key carries no namespace",
        _ => "",
    };
    Some(DepKeyError::Scope {
        dependency: dependency.to_owned(),
        dependency_isolation,
        dependent_isolation: dependent,
        hint,
    })
}

/// The key of dependency `dependency` (of isolation `isolation`) for a dependent's key.
pub fn dependency_key(
    dependent: &Key,
    dependency: &str,
    isolation: Isolation,
) -> Result<Key, DepKeyError> {
    if let Some(e) = scope_error(dependency, dependent.isolation(), isolation) {
        return Err(e);
    }
    Ok(match (isolation, dependent.scope()) {
        (Isolation::None, _) | (_, Scope::Shared) => {
            Key::new(dependency, Isolation::None, None, None)?
        }
        (_, Scope::Namespace(ns)) => Key::new(dependency, isolation, Some(ns), None)?,
        (_, Scope::Session(s)) => Key::new(dependency, isolation, None, Some(s))?,
    })
}

/// An error of one manifest found by looking at the whole graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphError {
    /// `depends_on.<name>`.
    pub field: String,
    pub reason: String,
}

/// Checks a catalog's graph (workload -> the names in its `depends_on`): a name that is
/// not a key of `graph` is unknown; a workload on a cycle gets an error on the entry that
/// leads into it, showing the cycle. Returns the errors by workload (at most one each:
/// the first in name order).
pub fn check_graph(graph: &BTreeMap<String, Vec<String>>) -> BTreeMap<String, GraphError> {
    let mut out = BTreeMap::new();
    for (w, deps) in graph {
        let mut deps: Vec<&String> = deps.iter().collect();
        deps.sort();
        for d in deps {
            if !graph.contains_key(d) {
                out.insert(
                    w.clone(),
                    GraphError {
                        field: format!("depends_on.{d}"),
                        reason: format!("no workload {d} (see `bulkhead workloads`)"),
                    },
                );
                break;
            }
            if let Some(path) = path_between(graph, d, w) {
                let mut cycle = vec![w.as_str()];
                cycle.extend(path.iter().map(|s| s.as_str()));
                out.insert(
                    w.clone(),
                    GraphError {
                        field: format!("depends_on.{d}"),
                        reason: format!("a dependency cycle: {}", cycle.join(" -> ")),
                    },
                );
                break;
            }
        }
    }
    out
}

/// The shortest path `from` ... `to` along dependency edges (both ends included), if any.
fn path_between<'a>(
    graph: &'a BTreeMap<String, Vec<String>>,
    from: &'a String,
    to: &String,
) -> Option<Vec<&'a String>> {
    let mut prev: BTreeMap<&String, &String> = BTreeMap::new();
    let mut seen: BTreeSet<&String> = BTreeSet::from([from]);
    let mut queue = VecDeque::from([from]);
    while let Some(n) = queue.pop_front() {
        if n == to {
            let mut path = vec![n];
            let mut cur = n;
            while let Some(p) = prev.get(cur) {
                path.push(p);
                cur = p;
            }
            path.reverse();
            return Some(path);
        }
        for d in graph.get(n).into_iter().flatten() {
            if seen.insert(d) {
                prev.insert(d, n);
                queue.push_back(d);
            }
        }
    }
    None
}

/// Every node `root` reaches through dependency edges (not `root` itself).
pub fn closure<N: Ord + Clone>(graph: &BTreeMap<N, Vec<N>>, root: &N) -> BTreeSet<N> {
    let mut seen = BTreeSet::new();
    let mut stack: Vec<&N> = graph.get(root).into_iter().flatten().collect();
    while let Some(n) = stack.pop() {
        if n != root && seen.insert(n.clone()) {
            stack.extend(graph.get(n).into_iter().flatten());
        }
    }
    seen
}

/// The nodes of `graph` (node -> what it depends on) in layers, dependencies first: a
/// node's layer is one more than the highest layer of its dependencies among the nodes
/// (edges to nodes that are not keys are ignored). Never fails: nodes on a cycle (which a
/// checked catalog has not, but the specs of running instances may, after a reload) come
/// together in one last layer. Each layer is sorted.
pub fn layers<N: Ord + Clone>(graph: &BTreeMap<N, Vec<N>>) -> Vec<Vec<N>> {
    // Dependencies in the graph not yet placed, per node; who waits on each node.
    let mut pending: BTreeMap<&N, BTreeSet<&N>> = BTreeMap::new();
    let mut waiting: BTreeMap<&N, Vec<&N>> = BTreeMap::new();
    for (n, deps) in graph {
        let inside: BTreeSet<&N> = deps
            .iter()
            .filter(|d| graph.contains_key(*d) && *d != n)
            .collect();
        for d in &inside {
            waiting.entry(*d).or_default().push(n);
        }
        pending.insert(n, inside);
    }
    let mut out = Vec::new();
    let mut current: Vec<&N> = pending
        .iter()
        .filter(|(_, p)| p.is_empty())
        .map(|(n, _)| *n)
        .collect();
    for n in &current {
        pending.remove(n);
    }
    while !current.is_empty() {
        let mut next = Vec::new();
        for n in &current {
            for w in waiting.get(n).into_iter().flatten() {
                if let Some(p) = pending.get_mut(w) {
                    p.remove(n);
                    if p.is_empty() {
                        pending.remove(w);
                        next.push(*w);
                    }
                }
            }
        }
        let mut layer: Vec<N> = current.into_iter().cloned().collect();
        layer.sort();
        out.push(layer);
        current = next;
    }
    if !pending.is_empty() {
        out.push(pending.into_keys().cloned().collect());
    }
    out
}

/// [`layers`] reversed: dependents first, for teardown.
pub fn teardown_layers<N: Ord + Clone>(graph: &BTreeMap<N, Vec<N>>) -> Vec<Vec<N>> {
    let mut l = layers(graph);
    l.reverse();
    l
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn g(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(n, d)| (n.to_string(), d.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn map_and_list_forms() {
        let d: DependsOn =
            serde_saphyr::from_str("{db: {condition: started}, cache: {}, q: }").unwrap();
        assert_eq!(d.0["db"].condition, Condition::Started);
        assert_eq!(d.0["cache"].condition, Condition::Ready);
        assert_eq!(d.0["q"].condition, Condition::Ready);
        let d: DependsOn = serde_saphyr::from_str("[db, cache]").unwrap();
        assert_eq!(d.0.len(), 2);
        assert!(d.iter().all(|(_, c)| c == Condition::Ready));
        assert!(serde_saphyr::from_str::<DependsOn>("[db, db]").is_err());
        assert!(serde_saphyr::from_str::<DependsOn>("{db: {condition: healthy}}").is_err());
        assert!(serde_saphyr::from_str::<DependsOn>("{db: {restart: true}}").is_err());
        let d: DependsOn =
            serde_saphyr::from_str("{m: {condition: completed_successfully}}").unwrap();
        assert_eq!(d.0["m"].condition, Condition::CompletedSuccessfully);
    }

    #[test]
    fn validate_names_self_and_count() {
        let one = |n: &str| DependsOn(BTreeMap::from([(n.to_owned(), Dependency::default())]));
        assert!(validate("web", &one("db")).is_ok());
        assert_eq!(
            validate("web", &one("web")).unwrap_err().0,
            "depends_on.web"
        );
        assert!(validate("web", &one("../x"))
            .unwrap_err()
            .0
            .starts_with("depends_on."));
        let many = DependsOn(
            (0..=MAX_DEPENDENCIES)
                .map(|i| (format!("w{i}"), Dependency::default()))
                .collect(),
        );
        assert_eq!(validate("web", &many).unwrap_err().0, "depends_on");
    }

    #[test]
    fn keys_follow_the_dependent() {
        let s = Key::new("web", Isolation::Session, None, Some("s1")).unwrap();
        let n = Key::new("web", Isolation::Namespace, Some("t1"), None).unwrap();
        let sh = Key::new("web", Isolation::None, None, None).unwrap();
        let id = |k: Key| k.instance_id().to_string();
        assert_eq!(
            id(dependency_key(&s, "db", Isolation::Session).unwrap()),
            "session:s1:db"
        );
        assert_eq!(
            id(dependency_key(&s, "db", Isolation::None).unwrap()),
            "shared:db"
        );
        assert_eq!(
            id(dependency_key(&n, "db", Isolation::Namespace).unwrap()),
            "ns:t1:db"
        );
        assert_eq!(
            id(dependency_key(&n, "db", Isolation::None).unwrap()),
            "shared:db"
        );
        assert_eq!(
            id(dependency_key(&sh, "db", Isolation::None).unwrap()),
            "shared:db"
        );
        let e = dependency_key(&s, "db", Isolation::Namespace).unwrap_err();
        assert!(e.to_string().contains("carries no namespace"), "{e}");
        assert!(dependency_key(&n, "db", Isolation::Session).is_err());
        assert!(dependency_key(&sh, "db", Isolation::Namespace).is_err());
    }

    #[test]
    fn unknown_names_and_cycles_name_the_field() {
        let e = check_graph(&g(&[("web", &["db", "nope"]), ("db", &[])]));
        assert_eq!(e.len(), 1);
        assert_eq!(e["web"].field, "depends_on.nope");
        let e = check_graph(&g(&[
            ("a", &["b"]),
            ("b", &["c"]),
            ("c", &["a"]),
            ("d", &["a"]),
        ]));
        assert_eq!(e.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(e["a"].field, "depends_on.b");
        assert_eq!(e["a"].reason, "a dependency cycle: a -> b -> c -> a");
        assert_eq!(e["c"].reason, "a dependency cycle: c -> a -> b -> c");
        assert!(check_graph(&g(&[
            ("web", &["db", "cache"]),
            ("cache", &["db"]),
            ("db", &[])
        ]))
        .is_empty());
    }

    #[test]
    fn layers_put_dependencies_first() {
        let l = layers(&g(&[
            ("web", &["db", "cache"]),
            ("cache", &["db"]),
            ("db", &[]),
            ("x", &["gone"]),
        ]));
        assert_eq!(l, vec![vec!["db", "x"], vec!["cache"], vec!["web"]]);
        let t = teardown_layers(&g(&[("web", &["db"]), ("db", &[])]));
        assert_eq!(t, vec![vec!["web"], vec!["db"]]);
        // A cycle does not lose its nodes.
        let l = layers(&g(&[("a", &["b"]), ("b", &["a"]), ("c", &[])]));
        assert_eq!(l, vec![vec!["c"], vec!["a", "b"]]);
        assert_eq!(
            closure(
                &g(&[("web", &["cache"]), ("cache", &["db"]), ("db", &[])]),
                &"web".to_string()
            ),
            BTreeSet::from(["cache".to_string(), "db".to_string()])
        );
    }

    /// A random DAG: node i may depend only on nodes below i.
    fn dag() -> impl Strategy<Value = BTreeMap<u8, Vec<u8>>> {
        (1u8..24).prop_flat_map(|n| {
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..4), n as usize)
                .prop_map(move |deps| {
                    deps.into_iter()
                        .enumerate()
                        .map(|(i, ds)| {
                            let i = i as u8;
                            let ds = if i == 0 {
                                vec![]
                            } else {
                                ds.into_iter().map(|d| d % i).collect()
                            };
                            (i, ds)
                        })
                        .collect()
                })
        })
    }

    fn names(graph: &BTreeMap<u8, Vec<u8>>) -> BTreeMap<String, Vec<String>> {
        graph
            .iter()
            .map(|(n, ds)| {
                (
                    format!("w{n}"),
                    ds.iter().map(|d| format!("w{d}")).collect(),
                )
            })
            .collect()
    }

    proptest! {
        #[test]
        fn layers_order_every_edge(graph in dag()) {
            let l = layers(&graph);
            let at: BTreeMap<u8, usize> = l.iter().enumerate()
                .flat_map(|(i, layer)| layer.iter().map(move |n| (*n, i))).collect();
            prop_assert_eq!(at.len(), graph.len());
            prop_assert_eq!(l.iter().map(Vec::len).sum::<usize>(), graph.len());
            for (n, ds) in &graph {
                for d in ds {
                    prop_assert!(at[d] < at[n], "{} in layer {} not after {} in {}", n, at[n], d, at[d]);
                }
            }
            let t = teardown_layers(&graph);
            let at_t: BTreeMap<u8, usize> = t.iter().enumerate()
                .flat_map(|(i, layer)| layer.iter().map(move |n| (*n, i))).collect();
            for (n, ds) in &graph {
                for d in ds {
                    prop_assert!(at_t[n] < at_t[d]);
                }
            }
        }

        #[test]
        fn a_dag_has_no_errors_and_a_back_edge_is_a_cycle(graph in dag(), pick in any::<u8>()) {
            let named = names(&graph);
            prop_assert!(check_graph(&named).is_empty());
            // An edge from a dependency back to one that reaches it closes a cycle.
            let n = graph.len() as u8;
            let top = pick % n;
            if let Some(&low) = closure(&graph, &top).iter().next() {
                let mut cyclic = named.clone();
                cyclic.get_mut(&format!("w{low}")).unwrap().push(format!("w{top}"));
                let errs = check_graph(&cyclic);
                let (lo, hi) = (format!("w{low}"), format!("w{top}"));
                prop_assert!(errs.contains_key(&lo));
                prop_assert!(errs.contains_key(&hi));
                for e in errs.values() {
                    prop_assert!(e.reason.starts_with("a dependency cycle: "));
                    prop_assert!(e.field.starts_with("depends_on.w"));
                }
                // Layers still place every node once.
                prop_assert_eq!(layers(&cyclic).iter().map(Vec::len).sum::<usize>(), cyclic.len());
            }
        }

        #[test]
        fn derived_keys_share_the_scope_or_are_shared(
            sid in "[a-z0-9]{1,12}", which in 0u8..3, dep_iso in 0u8..3,
        ) {
            let iso = |i| [Isolation::None, Isolation::Namespace, Isolation::Session][i as usize];
            let k = match which {
                0 => Key::new("web", Isolation::None, None, None),
                1 => Key::new("web", Isolation::Namespace, Some(&sid), None),
                _ => Key::new("web", Isolation::Session, None, Some(&sid)),
            }.unwrap();
            match dependency_key(&k, "db", iso(dep_iso)) {
                Ok(d) => {
                    prop_assert!(scope_allowed(k.isolation(), iso(dep_iso)));
                    prop_assert_eq!(d.workload(), "db");
                    prop_assert!(d.scope() == k.scope() || *d.scope() == Scope::Shared);
                    prop_assert_eq!(d.isolation(), iso(dep_iso));
                }
                Err(_) => prop_assert!(!scope_allowed(k.isolation(), iso(dep_iso))),
            }
        }
    }
}
