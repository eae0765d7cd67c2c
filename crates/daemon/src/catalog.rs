//! The workload catalog: manifests discovered under the workloads directory.
//!
//! Each `<dir>/<name>/manifest.yaml` is one workload. A manifest that cannot be read or
//! is invalid becomes an invalid entry carrying its error; it never stops the daemon or
//! the other workloads. A rescan (SIGHUP, Reload) builds a new catalog and swaps it in:
//! running instances keep the spec they were launched with.

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
    pub spec: Result<Arc<WorkloadSpec>, String>,
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
            let spec = load(&manifest, &folder, drivers);
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
    manifest: &Path,
    folder: &str,
    drivers: &[DriverKind],
) -> Result<Arc<WorkloadSpec>, String> {
    let shown = manifest.display().to_string();
    if let Err(e) = name::validate(NameKind::Workload, folder) {
        return Err(format!(
            "{shown}: the folder name is not a valid workload name: {e}"
        ));
    }
    let mut text = String::new();
    let f = std::fs::File::open(manifest).map_err(|e| format!("{shown}: cannot open: {e}"))?;
    // Read one byte past the limit so that an oversized file is reported, not truncated.
    f.take(spec::MAX_MANIFEST_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("{shown}: cannot read: {e}"))?;
    let spec = spec::parse_manifest(&shown, folder, &text).map_err(|e| e.to_string())?;
    if !drivers.contains(&spec.driver) {
        let have: Vec<&str> = drivers.iter().map(|d| d.as_str()).collect();
        return Err(format!(
            "{shown}: field `driver`: {} is not available in this daemon (available: {})",
            spec.driver,
            have.join(", ")
        ));
    }
    Ok(Arc::new(spec))
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
        let e = cat.get("bad").unwrap().spec.as_ref().unwrap_err();
        assert!(e.contains("manifest.yaml") && e.contains("nope"), "{e}");
        let e = cat.get("dock").unwrap().spec.as_ref().unwrap_err();
        assert!(e.contains("not available"), "{e}");
    }

    #[test]
    fn missing_directory_is_reported() {
        let cat = Catalog::scan(Path::new("/nonexistent/bulkhead"), &[DriverKind::Process]);
        assert!(cat
            .error
            .unwrap()
            .contains("cannot read workloads directory"));
    }
}
