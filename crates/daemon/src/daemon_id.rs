//! The daemon's stable id (`<state>/daemon-id`): the label on its containers and
//! services, the name of its cgroup scopes, so that two daemons never touch each other's
//! instances.

use std::path::Path;

/// The daemon's id and whether its state directory turned out to be a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonId {
    pub id: String,
    /// The id recorded in the directory when it is a copy of another daemon's (that
    /// daemon's id: what this one must never act on).
    pub copied_from: Option<String>,
}

/// The inode numbers the id is bound to: the state directory's and the id file's.
/// (Not the device number: it is not stable across reboots on overlay, tmpfs or btrfs.)
fn binding(state_dir: &Path, id_file: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    Ok(format!(
        "{} {}",
        std::fs::metadata(state_dir)?.ino(),
        std::fs::metadata(id_file)?.ino()
    ))
}

/// Reads (or makes) the daemon id of `state_dir`, bound to the directory's identity.
///
/// A copy of a state directory carries the original's `daemon-id`: started as a second
/// daemon it would take the original's containers for its own (adopt or remove them) and
/// share its cgroup scope. So the id is bound to the inode numbers of the directory and of
/// the id file (recorded in `<state>/daemon-id.bound`); a copy has new ones, and gets a new
/// id (logged, with [`DaemonId::copied_from`] set). A rename of the directory on the same
/// filesystem keeps the binding; a move to another filesystem is a copy. An id file from
/// before the binding existed is bound as it is found.
pub fn load_daemon_id(state_dir: &Path) -> DaemonId {
    let path = state_dir.join("daemon-id");
    let bound = state_dir.join("daemon-id.bound");
    let fresh = |copied_from: Option<String>| -> DaemonId {
        let id = format!("{:016x}", rand::random::<u64>());
        let written = std::fs::create_dir_all(state_dir)
            .and_then(|()| std::fs::write(&path, &id))
            .and_then(|()| binding(state_dir, &path))
            .and_then(|b| std::fs::write(&bound, b));
        if let Err(e) = written {
            tracing::warn!("cannot write {}: {e}", path.display());
        }
        DaemonId { id, copied_from }
    };
    let Ok(text) = std::fs::read_to_string(&path) else {
        return fresh(None);
    };
    let id = text.trim().to_owned();
    if id.is_empty() {
        return fresh(None);
    }
    let here = match binding(state_dir, &path) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!("cannot stat {}: {e}; keeping its id", path.display());
            return DaemonId {
                id,
                copied_from: None,
            };
        }
    };
    match std::fs::read_to_string(&bound) {
        Ok(b) if b.trim() == here => DaemonId {
            id,
            copied_from: None,
        },
        Ok(b) => {
            let new = fresh(Some(id.clone()));
            tracing::warn!(
                "{} is a copy of another daemon's state directory (daemon id {id}, bound to \
                 inodes {}, here {here}): this daemon takes the new id {} and leaves that \
                 daemon's containers, cgroups and processes alone",
                state_dir.display(),
                b.trim(),
                new.id
            );
            new
        }
        Err(_) => {
            // An id from before the binding: bind it where it is found.
            if let Err(e) = std::fs::write(&bound, &here) {
                tracing::warn!("cannot write {}: {e}", bound.display());
            }
            DaemonId {
                id,
                copied_from: None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 11: a copy of a state directory kept the original's daemon id, so a second
    /// daemon on it removed the first one's containers and shared its cgroup scope.
    #[test]
    fn a_copied_state_directory_gets_its_own_daemon_id() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let first = load_daemon_id(&a);
        assert_eq!(first.copied_from, None);
        // Stable for the same directory, also after a rename.
        assert_eq!(load_daemon_id(&a), first);
        let moved = tmp.path().join("moved");
        std::fs::rename(&a, &moved).unwrap();
        assert_eq!(load_daemon_id(&moved), first);
        // A copy (new inodes) gets a new id, and keeps it.
        let b = tmp.path().join("b");
        std::fs::create_dir(&b).unwrap();
        for f in ["daemon-id", "daemon-id.bound"] {
            std::fs::copy(moved.join(f), b.join(f)).unwrap();
        }
        let copy = load_daemon_id(&b);
        assert_ne!(copy.id, first.id);
        assert_eq!(copy.copied_from.as_deref(), Some(first.id.as_str()));
        assert_eq!(load_daemon_id(&b).id, copy.id);
        assert_eq!(load_daemon_id(&b).copied_from, None);
        // An id file from before the binding is kept and bound.
        let old = tmp.path().join("old");
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join("daemon-id"), "0123456789abcdef\n").unwrap();
        assert_eq!(load_daemon_id(&old).id, "0123456789abcdef");
        assert!(old.join("daemon-id.bound").exists());
    }
}
