//! The workload catalog: manifests discovered under the workloads directory.
//!
//! Each `<dir>/<name>/manifest.yaml` is one workload. A manifest that cannot be read or
//! is invalid becomes an invalid entry carrying its error; it never stops the daemon or
//! the other workloads. A rescan (SIGHUP, Reload) builds a new catalog and swaps it in:
//! running instances keep the spec they were launched with.
//!
//! **A manifest is read only from inside the workloads directory.** A workload folder or a
//! `manifest.yaml` may be a symbolic link, but the file actually opened (its path as the
//! kernel has it, read back from `/proc/self/fd`, so a link swapped after a check cannot
//! fool it) must lie under the workloads directory; one that resolves outside is an
//! invalid entry naming the file.
//!
//! An invalid entry's error comes in two forms ([`EntryError`]): in full (it may quote the
//! file: a YAML snippet, a value) for the daemon's owner and admin tokens, and redacted
//! (the file, the field or line, a generic reason) for everyone else.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bulkhead_core::name::{self, NameKind};
use bulkhead_core::spec::{self, DriverKind, WorkloadSpec};

/// The manifest file name inside a workload folder.
pub const MANIFEST: &str = "manifest.yaml";

/// One discovered workload.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The folder name (the workload's name when valid).
    pub name: String,
    /// The workload folder: relative program paths resolve against it.
    pub dir: PathBuf,
    pub manifest: PathBuf,
    pub spec: Result<Arc<WorkloadSpec>, EntryError>,
}

/// Why a workload is invalid. `Display` is the full form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{full}")]
pub struct EntryError {
    /// Everything known; may quote the manifest (a YAML snippet, a value, a link target).
    pub full: String,
    /// The file, the field or line and a generic reason: nothing of the file's contents.
    pub redacted: String,
}

impl EntryError {
    /// An error that quotes nothing of the file: both forms are the same.
    fn plain(msg: String) -> EntryError {
        EntryError {
            redacted: msg.clone(),
            full: msg,
        }
    }

    /// The form for a caller: full for admins, redacted otherwise.
    pub fn for_caller(&self, admin: bool) -> &str {
        if admin {
            &self.full
        } else {
            &self.redacted
        }
    }
}

#[derive(Debug, Default)]
pub struct Catalog {
    pub entries: BTreeMap<String, Entry>,
    /// A problem with the directory itself (missing, unreadable).
    pub error: Option<String>,
}

impl Catalog {
    /// Scans `dir`. `drivers` are the drivers this daemon has; a manifest naming another
    /// one is invalid.
    pub fn scan(dir: &Path, drivers: &[DriverKind]) -> Catalog {
        let mut cat = Catalog::default();
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) => {
                cat.error = Some(format!(
                    "cannot read workloads directory {}: {e}",
                    dir.display()
                ));
                return cat;
            }
        };
        // Where the workloads directory really is: every manifest must be under it.
        let root = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
        for ent in rd.flatten() {
            let path = ent.path();
            if !path.is_dir() {
                continue;
            }
            let folder = ent.file_name().to_string_lossy().into_owned();
            let manifest = path.join(MANIFEST);
            if !manifest.exists() {
                continue;
            }
            let spec = load(&root, &manifest, &folder, drivers);
            cat.entries.insert(
                folder.clone(),
                Entry {
                    name: folder,
                    dir: path,
                    manifest,
                    spec,
                },
            );
        }
        check_dependencies(&mut cat);
        cat
    }

    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    pub fn valid(&self) -> impl Iterator<Item = (&Entry, &Arc<WorkloadSpec>)> {
        self.entries
            .values()
            .filter_map(|e| e.spec.as_ref().ok().map(|s| (e, s)))
    }
}

fn load(
    root: &Path,
    manifest: &Path,
    folder: &str,
    drivers: &[DriverKind],
) -> Result<Arc<WorkloadSpec>, EntryError> {
    let shown = manifest.display().to_string();
    if let Err(e) = name::validate(NameKind::Workload, folder) {
        return Err(EntryError::plain(format!(
            "{shown}: the folder name is not a valid workload name: {e}"
        )));
    }
    let mut text = String::new();
    let f = std::fs::File::open(manifest)
        .map_err(|e| EntryError::plain(format!("{shown}: cannot open: {e}")))?;
    // The file opened, not the path asked for: a link swapped after a check cannot fool it.
    let real = opened_path(&f).or_else(|_| std::fs::canonicalize(manifest));
    match real {
        Ok(real) if real.starts_with(root) => {}
        Ok(real) => {
            return Err(EntryError {
                full: format!(
                    "{shown}: is a symbolic link (or in a linked folder) to {}, outside the \
                     workloads directory {}: refused",
                    real.display(),
                    root.display()
                ),
                redacted: format!(
                    "{shown}: is a symbolic link (or in a linked folder) to a file outside the \
                     workloads directory: refused"
                ),
            })
        }
        Err(e) => {
            return Err(EntryError::plain(format!(
                "{shown}: cannot tell where the file is: {e}"
            )))
        }
    }
    // Read one byte past the limit so that an oversized file is reported, not truncated.
    f.take(spec::MAX_MANIFEST_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .map_err(|e| EntryError::plain(format!("{shown}: cannot read: {e}")))?;
    let spec = spec::parse_manifest(&shown, folder, &text).map_err(|e| EntryError {
        full: e.to_string(),
        redacted: e.redacted(),
    })?;
    if !drivers.contains(&spec.driver) {
        let have: Vec<&str> = drivers.iter().map(|d| d.as_str()).collect();
        return Err(EntryError::plain(format!(
            "{shown}: field `driver`: {} is not available in this daemon (available: {})",
            spec.driver,
            have.join(", ")
        )));
    }
    Ok(Arc::new(spec))
}

/// The checks of `depends_on` that need every manifest (`core::deps`): a name no folder
/// has, a cycle, a dependency whose isolation the dependent's key cannot give a scope,
/// `completed_successfully` on a workload that never completes (`restart.policy:
/// always`). Each makes the dependent an invalid entry naming its file and the field
/// `depends_on.<name>`; the dependency itself stays as it is. A dependency that is an
/// invalid entry is not an error here: launching the dependent fails with its error.
fn check_dependencies(cat: &mut Catalog) {
    use bulkhead_core::deps::{self, Condition};
    use bulkhead_core::spec::RestartPolicy;
    let graph: BTreeMap<String, Vec<String>> = cat
        .entries
        .iter()
        .map(|(name, e)| {
            let deps = match &e.spec {
                Ok(s) => s.depends_on.names().map(str::to_owned).collect(),
                Err(_) => Vec::new(),
            };
            (name.clone(), deps)
        })
        .collect();
    let mut errors: BTreeMap<String, (String, String)> = deps::check_graph(&graph)
        .into_iter()
        .map(|(w, e)| (w, (e.field, e.reason)))
        .collect();
    for (name, e) in &cat.entries {
        let Ok(spec) = &e.spec else { continue };
        if errors.contains_key(name) {
            continue;
        }
        let own = spec.key_isolation();
        for (dep, cond) in spec.depends_on.iter() {
            let Some(Ok(ds)) = cat.entries.get(dep).map(|d| &d.spec) else {
                continue;
            };
            if let Some(err) = deps::scope_error(dep, own, ds.key_isolation()) {
                errors.insert(name.clone(), (format!("depends_on.{dep}"), err.to_string()));
                break;
            }
            if cond == Condition::CompletedSuccessfully
                && ds.restart.policy == RestartPolicy::Always
            {
                errors.insert(
                    name.clone(),
                    (
                        format!("depends_on.{dep}"),
                        format!(
                            "condition completed_successfully needs a workload that ends, but \
                             {dep} has restart.policy: always"
                        ),
                    ),
                );
                break;
            }
        }
    }
    for (name, (field, reason)) in errors {
        if let Some(e) = cat.entries.get_mut(&name) {
            e.spec = Err(EntryError::plain(format!(
                "{}: field `{field}`: {reason}",
                e.manifest.display()
            )));
        }
    }
}

/// The path of an open file as the kernel has it.
fn opened_path(f: &std::fs::File) -> std::io::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_manifests_do_not_hide_valid_ones() {
        let dir = tempfile::tempdir().unwrap();
        let w = |name: &str, text: &str| {
            std::fs::create_dir_all(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join(MANIFEST), text).unwrap();
        };
        w("good", "name: good\ncommand: [/bin/true]\n");
        w("bad", "name: bad\ncommand: [x]\nnope: 1\n");
        w("dock", "name: dock\ncommand: [x]\ndriver: sandbox\n");
        std::fs::create_dir_all(dir.path().join("empty")).unwrap();
        let cat = Catalog::scan(dir.path(), &[DriverKind::Process]);
        assert_eq!(cat.entries.len(), 3);
        assert!(cat.get("good").unwrap().spec.is_ok());
        let e = &cat.get("bad").unwrap().spec.as_ref().unwrap_err().full;
        assert!(e.contains("manifest.yaml") && e.contains("nope"), "{e}");
        let e = &cat.get("dock").unwrap().spec.as_ref().unwrap_err().full;
        assert!(e.contains("not available"), "{e}");
    }

    #[test]
    fn dependency_errors_name_the_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let w = |name: &str, text: &str| {
            std::fs::create_dir_all(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join(MANIFEST), text).unwrap();
        };
        w(
            "web",
            "name: web\ncommand: [x]\nisolation: session\ndepends_on: [db, shareddb]\n",
        );
        w("db", "name: db\ncommand: [x]\nisolation: session\n");
        w(
            "shareddb",
            "name: shareddb\ncommand: [x]\nisolation: none\n",
        );
        w("lost", "name: lost\ncommand: [x]\ndepends_on: [nowhere]\n");
        w("a", "name: a\ncommand: [x]\ndepends_on: [b]\n");
        w(
            "b",
            "name: b\ncommand: [x]\ndepends_on: {a: {condition: started}}\n",
        );
        w(
            "tenant",
            "name: tenant\ncommand: [x]\nisolation: session\ndepends_on: [nsdb]\n",
        );
        w("nsdb", "name: nsdb\ncommand: [x]\n");
        w(
            "job",
            "name: job\ncommand: [x]\nrestart: {policy: always}\n",
        );
        w(
            "waits",
            "name: waits\ncommand: [x]\ndepends_on: {job: {condition: completed_successfully}}\n",
        );
        w("bad", "name: bad\ncommand: [x]\nnope: 1\n");
        w("onbad", "name: onbad\ncommand: [x]\ndepends_on: [bad]\n");
        let cat = Catalog::scan(dir.path(), &[DriverKind::Process]);
        let err = |n: &str| cat.get(n).unwrap().spec.as_ref().unwrap_err().full.clone();
        for ok in ["web", "db", "shareddb", "nsdb", "job", "onbad"] {
            assert!(cat.get(ok).unwrap().spec.is_ok(), "{ok}");
        }
        let e = err("lost");
        assert!(
            e.contains("lost/manifest.yaml: field `depends_on.nowhere`: no workload nowhere"),
            "{e}"
        );
        let e = err("a");
        assert!(
            e.contains("a/manifest.yaml: field `depends_on.b`: a dependency cycle: a -> b -> a"),
            "{e}"
        );
        assert!(err("b").contains("field `depends_on.a`"));
        let e = err("tenant");
        assert!(
            e.contains("field `depends_on.nsdb`") && e.contains("carries no namespace"),
            "{e}"
        );
        let e = err("waits");
        assert!(
            e.contains("field `depends_on.job`") && e.contains("restart.policy: always"),
            "{e}"
        );
    }

    #[test]
    fn missing_directory_is_reported() {
        let cat = Catalog::scan(Path::new("/nonexistent/bulkhead"), &[DriverKind::Process]);
        assert!(cat
            .error
            .unwrap()
            .contains("cannot read workloads directory"));
    }

    /// Issue 11: a manifest (or a workload folder) linked to a file outside the workloads
    /// directory was read, and its contents shown in the error.
    #[test]
    fn symlinked_manifests_outside_the_directory_were_read() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("workloads");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(outside.join("folder")).unwrap();
        let secret = "name: x\ncommand: [x]\nsecret: s3cret\n";
        std::fs::write(outside.join("secret.yaml"), secret).unwrap();
        std::fs::write(outside.join("folder").join(MANIFEST), secret).unwrap();
        std::fs::write(
            outside.join("good.yaml"),
            "name: linkfile\ncommand: [/bin/true]\n",
        )
        .unwrap();
        // A manifest linked outside; a folder linked outside; a good one linked outside.
        std::fs::create_dir_all(dir.join("linkfile")).unwrap();
        std::os::unix::fs::symlink(
            outside.join("good.yaml"),
            dir.join("linkfile").join(MANIFEST),
        )
        .unwrap();
        std::fs::create_dir_all(dir.join("leak")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret.yaml"), dir.join("leak").join(MANIFEST))
            .unwrap();
        std::os::unix::fs::symlink(outside.join("folder"), dir.join("linkdir")).unwrap();
        // Links that stay inside are fine: a folder linked to another folder here.
        std::fs::create_dir_all(dir.join("real")).unwrap();
        std::fs::write(
            dir.join("real").join(MANIFEST),
            "name: alias\ncommand: [/bin/true]\n",
        )
        .unwrap();
        std::os::unix::fs::symlink(dir.join("real"), dir.join("alias")).unwrap();

        let cat = Catalog::scan(&dir, &[DriverKind::Process]);
        for name in ["linkfile", "leak", "linkdir"] {
            let e = cat.get(name).unwrap().spec.as_ref().unwrap_err();
            assert!(
                e.full.contains(&format!("{name}/manifest.yaml")) && e.full.contains("outside"),
                "{name}: {e}"
            );
            assert!(
                !e.full.contains("s3cret") && !e.redacted.contains("s3cret"),
                "{e}"
            );
            assert!(
                !e.redacted.contains("outside/"),
                "the target is for admins: {e:?}"
            );
        }
        // A link that stays inside works ("real" itself is invalid for its name only).
        assert!(cat.get("alias").unwrap().spec.is_ok());
        let e = cat.get("real").unwrap().spec.as_ref().unwrap_err();
        assert!(!e.full.contains("outside"), "{e}");
    }
}
