//! Base images made on this host with debootstrap, for `docker.build.debootstrap`: no
//! registry is needed, only a Debian archive.
//!
//! A root file system is bootstrapped into a fresh folder under the cache's work folder,
//! streamed into the engine as a single-layer image (`POST /images/create?fromSrc=-`,
//! what `docker import` does) and removed. The image is tagged
//! `bulkhead/debootstrap-<suite>:<hash12>`, the hash covering the whole configuration
//! and the host's architecture, and the image cache keeps it like any image it built.
//!
//! debootstrap mounts `/proc` and `/sys` inside its target while it configures packages,
//! and a failed or killed run can leave them mounted: it runs in a mount namespace of its
//! own, so that its mounts never exist in the daemon's namespace and vanish with it.
//!
//! Both debootstrap and tar are spawned through the daemon's reaper registry
//! ([`bulkhead_driver::reaper::spawn`]): the daemon reaps orphans as a subreaper, and a
//! child spawned around the registry could have its exit status taken (`ECHILD`). Each
//! leads a process group that is killed if the build is dropped half-way.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bollard::query_parameters::CreateImageOptions;
use bollard::Docker;
use bulkhead_core::docker::Debootstrap;
use bulkhead_driver::reaper;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

/// Lines of debootstrap's log shown when it fails.
const LOG_TAIL: usize = 20;

/// What is left out of the imported image: the downloaded packages and the archive
/// indexes (as Debian's own container images do).
const EXCLUDES: &[&str] = &["./var/cache/apt/archives/*.deb", "./var/lib/apt/lists/*"];

/// A base image could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(
        "docker.build.debootstrap needs debootstrap on the daemon's host: \
         apt-get install debootstrap"
    )]
    Missing,
    #[error("cannot prepare the debootstrap folder {path}: {source}")]
    Folder {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run {what}: {source}")]
    Spawn {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "debootstrap of {suite} failed ({status})\n--- last lines of its log ({log}) ---\n{tail}"
    )]
    Failed {
        suite: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("importing {tag} into the engine failed: {reason}")]
    Import { tag: String, reason: String },
}

/// The hash of everything that decides the root file system.
pub fn config_hash(d: &Debootstrap) -> String {
    let mut h = Sha256::new();
    h.update(b"bulkhead-debootstrap-v1\0");
    h.update(std::env::consts::ARCH.as_bytes());
    for part in [d.suite.as_str(), d.variant.as_str(), d.mirror()] {
        h.update([0]);
        h.update(part.as_bytes());
    }
    // Order does not change what is installed.
    let mut include = d.include.clone();
    include.sort();
    include.dedup();
    let mut components = if d.components.is_empty() {
        vec!["main".to_owned()]
    } else {
        d.components.clone()
    };
    components.sort();
    components.dedup();
    for list in [include, components] {
        h.update([1]);
        for p in list {
            h.update(p.as_bytes());
            h.update([0]);
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The tag of the base image for `d`.
pub fn tag(d: &Debootstrap) -> String {
    format!("bulkhead/debootstrap-{}:{}", d.suite, &config_hash(d)[..12])
}

/// debootstrap's command line for `d` into `target`.
fn args(d: &Debootstrap, target: &Path) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = Vec::new();
    if d.variant != "default" {
        a.push(format!("--variant={}", d.variant).into());
    }
    if !d.include.is_empty() {
        a.push(format!("--include={}", d.include.join(",")).into());
    }
    if !d.components.is_empty() {
        a.push(format!("--components={}", d.components.join(",")).into());
    }
    // `--` is not understood by debootstrap; the suite and the mirror are validated to
    // start with a letter, a digit or a URL scheme, so they never read as options.
    a.push(d.suite.clone().into());
    a.push(target.into());
    a.push(d.mirror().into());
    a
}

/// Makes the base image for `d` in the engine under `tag`, working in `work`.
pub async fn build(
    client: &Docker,
    d: &Debootstrap,
    tag: &str,
    work: &Path,
) -> Result<(), BootstrapError> {
    let folder = |path: &Path| {
        let path = path.to_owned();
        move |source| BootstrapError::Folder { path, source }
    };
    std::fs::create_dir_all(work).map_err(folder(work))?;
    sweep(work);
    let hash = config_hash(d);
    let target = work.join(format!("{}.root", &hash[..12]));
    let log = work.join(format!("{}.log", &hash[..12]));
    let log_file = std::fs::File::create(&log).map_err(folder(&log))?;
    let log_err = log_file.try_clone().map_err(folder(&log))?;

    let mut cmd = Command::new("debootstrap");
    cmd.args(args(d, &target))
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err)
        .env("DEBIAN_FRONTEND", "noninteractive");
    // SAFETY: runs in the child between fork and exec; it makes two system calls and
    // allocates nothing. A private mount namespace keeps debootstrap's /proc and /sys
    // mounts out of the daemon's namespace; propagation is made private first so that
    // they do not travel back to the parent namespace through a shared root.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let root = c"/";
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = std::time::Instant::now();
    tracing::info!(
        "making base image {tag}: debootstrap {} from {} (log: {})",
        d.suite,
        d.mirror(),
        log.display()
    );
    let spawn_err = |source| BootstrapError::Spawn {
        what: "debootstrap",
        source,
    };
    let mut child = match reaper::spawn(&mut cmd) {
        Ok(c) => c.child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(BootstrapError::Missing),
        Err(e) => return Err(spawn_err(e)),
    };
    let status = child.wait().await.map_err(spawn_err)?;
    let result = if status.success() {
        import(client, &target, tag).await
    } else {
        Err(BootstrapError::Failed {
            suite: d.suite.clone(),
            status: status.to_string(),
            tail: tail(&log),
            log: log.clone(),
        })
    };
    remove_tree(&target);
    if result.is_ok() {
        tracing::info!(
            "made base image {tag} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let _ = std::fs::remove_file(&log);
    }
    result
}

/// Streams `root` as a tar archive into the engine as image `tag`.
async fn import(client: &Docker, root: &Path, tag: &str) -> Result<(), BootstrapError> {
    let (repo, version) = tag.rsplit_once(':').unwrap_or((tag, "latest"));
    let mut tar = Command::new("tar");
    tar.arg("--numeric-owner").arg("-C").arg(root);
    for e in EXCLUDES {
        tar.arg(format!("--exclude={e}"));
    }
    tar.args(["-c", "."])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let spawn_err = |source| BootstrapError::Spawn {
        what: "tar",
        source,
    };
    let spawned = reaper::spawn(&mut tar).map_err(spawn_err)?;
    let mut child = spawned.child;
    let stdout = spawned
        .stdout
        .map(tokio::net::unix::pipe::Receiver::from_owned_fd)
        .transpose()
        .map_err(spawn_err)?;
    let Some(stdout) = stdout else {
        return Err(BootstrapError::Import {
            tag: tag.to_owned(),
            reason: "tar's output is not a pipe".into(),
        });
    };
    let body = bollard::body_try_stream(tokio_util::io::ReaderStream::new(stdout));
    let opts = CreateImageOptions {
        from_src: Some("-".into()),
        repo: Some(repo.to_owned()),
        tag: Some(version.to_owned()),
        changes: vec![
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            "CMD [\"/bin/bash\"]".into(),
        ],
        ..Default::default()
    };
    let mut failure = None;
    let mut stream = client.create_image(Some(opts), Some(body), None);
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(e) = info.error_detail.and_then(|d| d.message) {
                    failure = Some(e);
                }
            }
            Err(e) => {
                failure = Some(e.to_string());
                break;
            }
        }
    }
    // The request (and with it the pipe's read end) goes first: a tar still writing
    // after a refused import then ends on EPIPE instead of blocking forever.
    drop(stream);
    let status = child.wait().await.map_err(spawn_err)?;
    if !status.success() && failure.is_none() {
        failure = Some(format!("tar {} ({status})", root.display()));
    }
    match failure {
        Some(reason) => Err(BootstrapError::Import {
            tag: tag.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// The last lines of a log file.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n")
}

/// Removes the root file systems of earlier runs that did not finish (a daemon killed
/// mid-build leaves them).
fn sweep(work: &Path) {
    let Ok(entries) = std::fs::read_dir(work) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().ends_with(".root") {
            remove_tree(&e.path());
        }
    }
}

/// Removes a bootstrapped tree, unless something is mounted inside it (which only a
/// debootstrap run outside its own namespace could have left): removing through a
/// mounted /proc or /sys must never happen.
fn remove_tree(path: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if mounted_under(&mounts, path) {
        tracing::warn!(
            "not removing {}: something is mounted inside it",
            path.display()
        );
        return;
    }
    if let Err(e) = std::fs::remove_dir_all(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {e}", path.display());
        }
    }
}

/// Whether `mountinfo` lists a mount point at or under `path`.
fn mounted_under(mountinfo: &str, path: &Path) -> bool {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| Path::new(mp).starts_with(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(yaml: &str) -> Debootstrap {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn hash_ignores_order_and_follows_content() {
        let a = d("{suite: bookworm, include: [python3, curl]}");
        let b = d("{suite: bookworm, include: [curl, python3, curl]}");
        assert_eq!(config_hash(&a), config_hash(&b));
        let main = d("{suite: bookworm, include: [curl, python3], components: [main]}");
        assert_eq!(config_hash(&a), config_hash(&main));
        for other in [
            "{suite: trixie, include: [python3, curl]}",
            "{suite: bookworm, include: [python3]}",
            "{suite: bookworm, variant: buildd, include: [python3, curl]}",
            "{suite: bookworm, include: [python3, curl], mirror: 'http://m/debian'}",
        ] {
            assert_ne!(config_hash(&a), config_hash(&d(other)), "{other}");
        }
        assert!(tag(&a).starts_with("bulkhead/debootstrap-bookworm:"));
        assert_eq!(tag(&a).len(), "bulkhead/debootstrap-bookworm:".len() + 12);
    }

    #[test]
    fn command_line() {
        let a = args(
            &d("{suite: bookworm, include: [python3, curl], components: [main, contrib]}"),
            Path::new("/w/x.root"),
        );
        let a: Vec<String> = a.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        assert_eq!(
            a,
            [
                "--variant=minbase",
                "--include=python3,curl",
                "--components=main,contrib",
                "bookworm",
                "/w/x.root",
                "http://deb.debian.org/debian"
            ]
        );
        let a = args(&d("{suite: sid, variant: default}"), Path::new("/t"));
        assert_eq!(a.len(), 3);
    }

    #[test]
    fn mounts_inside_are_seen() {
        let info = "22 1 0:21 / /proc rw - proc proc rw\n\
                    90 22 0:50 / /var/lib/b/debootstrap/x.root/proc rw - proc proc rw\n";
        assert!(mounted_under(
            info,
            Path::new("/var/lib/b/debootstrap/x.root")
        ));
        assert!(!mounted_under(
            info,
            Path::new("/var/lib/b/debootstrap/y.root")
        ));
        assert!(!mounted_under(
            info,
            Path::new("/var/lib/b/debootstrap/x.roo")
        ));
    }
}
