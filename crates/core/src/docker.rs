//! The `docker:` section of a manifest: the container the `docker` driver runs.
//!
//! ```yaml
//! driver: docker
//! command: [python3, app.py]
//! docker:
//!   image: python:3.12-slim          # used as is, or:
//!   build:
//!     dockerfile: Dockerfile         # relative to the manifest's folder; context: .
//!     # or a generated Dockerfile:
//!     base: debian:12
//!     # or a Debian root file system made here with debootstrap (no registry needed),
//!     # imported and cached like any built image:
//!     debootstrap: { suite: bookworm, include: [python3] }
//!     files: { requirements.txt: /app/requirements.txt, src: /app/src }
//!     run: ["pip install -r /app/requirements.txt"]
//!     network: host                  # for RUN steps (default: the engine's default)
//!   shm_size: 64Mi
//!   user: "1000:1000"
//!   read_only: true
//!   mounts: [{ source: ./data, target: /data, read_only: true }]
//!   network: bridge                  # bridge (default), none, host or a network name
//!   cap_drop: [ALL]
//!   share: true                      # one container for every session launching it
//!   idle_timeout: 5m                 # a shared container unused this long is removed
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The `docker:` section.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerSpec {
    /// An image used as is (it must exist in the engine: no registry is assumed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// An image bulkhead builds and caches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<DockerBuild>,
    /// Size of `/dev/shm`.
    #[serde(
        default,
        with = "crate::size::opt_size",
        skip_serializing_if = "Option::is_none"
    )]
    pub shm_size: Option<u64>,
    /// `user`, `user:group`, `uid` or `uid:gid` inside the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Mounts the container's root file system read-only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
    /// Host paths bound into the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<DockerMount>,
    /// `bridge` (the default), `none`, `host`, or the name of an existing network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Capabilities removed (`ALL`, `NET_RAW`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    /// Lets the container's processes gain privileges through setuid binaries and file
    /// capabilities (`sudo`, `ping` on some images). Off by default: bulkhead runs every
    /// container with `no-new-privileges` (Docker's own default leaves it on); an
    /// opening.
    #[serde(default, skip_serializing_if = "is_false")]
    pub new_privileges: bool,
    /// The working directory inside the container (default: the image's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Replaces the image's `ENTRYPOINT` (`[]` clears it). Absent: the image's is kept
    /// and the manifest's `command` is its arguments, as with `docker run IMAGE ARGS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Runs a minimal init (`docker-init`) as PID 1, which forwards signals and reaps
    /// orphans; on by default so that the command's signals and exit status mean what they
    /// mean outside a container.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub init: bool,
    /// Sessions that launch this workload with the same configuration share one container;
    /// each launch holds a reference and the last release stops it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub share: bool,
    /// With `share`: how long a container nobody holds may stay before it is removed
    /// (default: removed at once).
    #[serde(
        default,
        with = "crate::spec::opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle_timeout: Option<Duration>,
}

/// `docker.build`: a Dockerfile and its context, or a generated Dockerfile.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerBuild {
    /// A Dockerfile, relative to the manifest's folder (or absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
    /// The build context with `dockerfile` (default: the manifest's folder); with `base`,
    /// where `files` are read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// The base image of a generated Dockerfile (`FROM`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// The base of a generated Dockerfile made with debootstrap on the host instead of
    /// `base`: imported into the engine and kept in the image cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debootstrap: Option<Debootstrap>,
    /// With `base`/`debootstrap`: files or folders copied in, source (relative to the
    /// context) to absolute target. A folder's contents land in the target folder.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
    /// With `base`/`debootstrap`: shell commands run in order (`RUN`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub run: Vec<String>,
    /// With `base`/`debootstrap`: environment set in the image (`ENV`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The network of `RUN` steps: `default` (the engine's), `host` or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// `docker.build.debootstrap`: a Debian (or derivative) root file system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Debootstrap {
    /// The release: `bookworm`, `trixie`, `stable` ...
    pub suite: String,
    /// `minbase` (the default: essential packages and apt), `buildd` or `default`.
    #[serde(default = "default_variant")]
    pub variant: String,
    /// Extra packages installed into it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<String>,
    /// Archive components (default: `main`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<String>,
    /// The archive (default: `http://deb.debian.org/debian`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
}

/// The archive debootstrap reads when the manifest names none.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

fn default_variant() -> String {
    "minbase".to_owned()
}

impl Debootstrap {
    /// The archive in use.
    pub fn mirror(&self) -> &str {
        self.mirror.as_deref().unwrap_or(DEFAULT_MIRROR)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        // Everything here ends up on debootstrap's command line: names are restricted to
        // what Debian allows, so nothing can read as an option or reach a shell.
        let word = |s: &str, extra: &[u8]| {
            !s.is_empty()
                && s.len() <= 128
                && s.as_bytes()[0].is_ascii_alphanumeric()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || extra.contains(&b))
        };
        if !word(&self.suite, b"-.") {
            return Err((
                "suite".into(),
                "must be a release name like bookworm".into(),
            ));
        }
        if !["minbase", "buildd", "default"].contains(&self.variant.as_str()) {
            return Err((
                "variant".into(),
                "must be minbase, buildd or default".into(),
            ));
        }
        for (i, p) in self.include.iter().enumerate() {
            if !word(p, b"+-.") {
                return Err((
                    format!("include[{i}]"),
                    "must be a Debian package name like python3".into(),
                ));
            }
        }
        for (i, c) in self.components.iter().enumerate() {
            if !word(c, b"-") {
                return Err((
                    format!("components[{i}]"),
                    "must be a component name like main".into(),
                ));
            }
        }
        if let Some(m) = &self.mirror {
            let ok = ["http://", "https://", "file:///"]
                .iter()
                .any(|p| m.starts_with(p))
                && m.len() <= 512
                && !m
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == ',');
            if !ok {
                return Err((
                    "mirror".into(),
                    "must be an http://, https:// or file:/// URL".into(),
                ));
            }
        }
        Ok(())
    }
}

/// One entry of `docker.mounts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerMount {
    /// A host path, relative to the manifest's folder or absolute.
    pub source: String,
    /// An absolute path inside the container.
    pub target: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_true(b: &bool) -> bool {
    *b
}

fn default_true() -> bool {
    true
}

impl DockerSpec {
    /// Checks what serde cannot. On error returns the field path (under `docker`) and the
    /// reason.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let fail = |field: &str, reason: &str| Err((field.to_owned(), reason.to_owned()));
        match (&self.image, &self.build) {
            (None, None) => return fail("image", "set docker.image or docker.build"),
            (Some(_), Some(_)) => {
                return fail("build", "docker.image and docker.build are exclusive")
            }
            (Some(i), None) if !valid_image_ref(i) => {
                return fail("image", "must be an image reference like debian:12")
            }
            _ => {}
        }
        if let Some(b) = &self.build {
            b.validate().map_err(|(f, r)| (format!("build.{f}"), r))?;
        }
        if let Some(u) = &self.user {
            if u.is_empty() || u.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return fail("user", "must be user, user:group, uid or uid:gid");
            }
        }
        for (i, m) in self.mounts.iter().enumerate() {
            if m.source.is_empty() {
                return Err((format!("mounts[{i}].source"), "must not be empty".into()));
            }
            if !m.target.starts_with('/') || m.target.contains(':') {
                return Err((
                    format!("mounts[{i}].target"),
                    "must be an absolute path without ':'".into(),
                ));
            }
        }
        if let Some(n) = &self.network {
            if n.is_empty()
                || !n
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return fail("network", "must be bridge, none, host or a network name");
            }
        }
        for (i, c) in self.cap_drop.iter().enumerate() {
            if c.is_empty() || !c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err((
                    format!("cap_drop[{i}]"),
                    "must be a capability name like NET_RAW or ALL".into(),
                ));
            }
        }
        if let Some(w) = &self.workdir {
            if !w.starts_with('/') {
                return fail("workdir", "must be an absolute path");
            }
        }
        if self.idle_timeout.is_some() && !self.share {
            return fail("idle_timeout", "is only meaningful with share: true");
        }
        Ok(())
    }
}

impl DockerBuild {
    fn validate(&self) -> Result<(), (String, String)> {
        let fail = |field: &str, reason: &str| Err((field.to_owned(), reason.to_owned()));
        let bases = [
            self.dockerfile.is_some(),
            self.base.is_some(),
            self.debootstrap.is_some(),
        ];
        match bases.iter().filter(|b| **b).count() {
            0 => {
                return fail(
                    "dockerfile",
                    "set build.dockerfile, build.base or build.debootstrap",
                )
            }
            1 => {}
            _ => {
                return fail(
                    "base",
                    "build.dockerfile, build.base and build.debootstrap are exclusive",
                )
            }
        }
        if self.dockerfile.is_some()
            && (!self.files.is_empty() || !self.run.is_empty() || !self.env.is_empty())
        {
            return fail(
                "files",
                "files, run and env go with build.base or build.debootstrap, not build.dockerfile",
            );
        }
        if let Some(b) = &self.base {
            if !valid_image_ref(b) {
                return fail("base", "must be an image reference like debian:12");
            }
        }
        if let Some(d) = &self.debootstrap {
            d.validate()
                .map_err(|(f, r)| (format!("debootstrap.{f}"), r))?;
        }
        if let Some(n) = &self.network {
            if !["default", "host", "none"].contains(&n.as_str()) {
                return fail("network", "must be default, host or none");
            }
        }
        for (src, dst) in &self.files {
            if src.is_empty() || src.starts_with('/') || src.split('/').any(|p| p == "..") {
                return Err((
                    format!("files.{src}"),
                    "the source must be a relative path inside the context".into(),
                ));
            }
            if !dst.starts_with('/') {
                return Err((
                    format!("files.{src}"),
                    "the target must be an absolute path".into(),
                ));
            }
        }
        for (i, r) in self.run.iter().enumerate() {
            if r.trim().is_empty() || r.contains('\n') {
                return Err((format!("run[{i}]"), "must be one non-empty line".into()));
            }
        }
        for (k, v) in &self.env {
            if k.is_empty()
                || k.contains('=')
                || k.chars().any(char::is_whitespace)
                || v.contains('\n')
            {
                return Err((format!("env.{k}"), "must be NAME: value on one line".into()));
            }
        }
        Ok(())
    }
}

/// A loose check of an image reference: `[registry/]name[:tag][@digest]`, no spaces.
fn valid_image_ref(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 512
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/@".contains(&b))
        && !s.starts_with(['-', ':', '/', '.'])
}

/// How long a shared container with no lease waits for the first one (the launch that
/// creates it takes its lease right after).
pub const FIRST_LEASE_GRACE: Duration = Duration::from_secs(5);

/// What `docker.share` means for the daemon, as properties of the manifest: the daemon
/// asks these and knows no driver section.
///
/// **Shared containers.** `docker.share: true` makes the workload's isolation key ignore
/// namespace and session (as `isolation: none`): every launch of the workload reaches one
/// instance, i.e. one container, and each launch with a holder takes a lease on it. When
/// the last lease is released (`release`, `end-session`), the instance's idle clock starts:
/// `docker.idle_timeout` (or the workload's `idle_timeout`), by default zero, after which
/// the container is stopped and removed. Before the first lease arrives the clock is
/// [`FIRST_LEASE_GRACE`].
impl crate::spec::WorkloadSpec {
    /// Whether one instance serves every key (`docker.share: true`).
    pub fn shared_instance(&self) -> bool {
        self.driver == crate::spec::DriverKind::Docker
            && self.docker.as_ref().is_some_and(|d| d.share)
    }

    /// The isolation the key is built with: a shared instance is one for all.
    pub fn key_isolation(&self) -> crate::key::Isolation {
        if self.shared_instance() {
            crate::key::Isolation::None
        } else {
            self.isolation
        }
    }

    /// The idle timeout after the last lease is released.
    pub fn idle_after_release(&self) -> Option<Duration> {
        if self.shared_instance() {
            let dk = self.docker.as_ref().and_then(|d| d.idle_timeout);
            Some(self.idle_timeout.or(dk).unwrap_or(Duration::ZERO))
        } else {
            self.idle_timeout
        }
    }

    /// The idle clock armed when the instance starts, before any lease.
    pub fn first_idle(&self) -> Option<Duration> {
        let d = self.idle_after_release()?;
        Some(if self.shared_instance() {
            d.max(FIRST_LEASE_GRACE)
        } else {
            d
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<DockerSpec, String> {
        let spec: DockerSpec = serde_saphyr::from_str(yaml).map_err(|e| e.to_string())?;
        spec.validate().map_err(|(f, r)| format!("{f}: {r}"))?;
        Ok(spec)
    }

    #[test]
    fn image_or_build() {
        let s = parse("image: debian:12\nshm_size: 64Mi\ncap_drop: [ALL]\n").unwrap();
        assert_eq!(s.image.as_deref(), Some("debian:12"));
        assert_eq!(s.shm_size, Some(64 << 20));
        assert!(s.init);
        let s = parse("build: { base: 'busybox', run: ['echo hi'], files: { a.txt: /a.txt } }\n")
            .unwrap();
        assert_eq!(s.build.unwrap().run, vec!["echo hi"]);
        assert!(parse("{}").unwrap_err().starts_with("image:"));
        assert!(parse("image: a\nbuild: { base: b }")
            .unwrap_err()
            .starts_with("build:"));
        assert!(parse("build: { dockerfile: D, run: [x] }")
            .unwrap_err()
            .starts_with("build.files"));
        assert!(parse("build: {}")
            .unwrap_err()
            .starts_with("build.dockerfile"));
        assert!(parse("image: 'a b'").unwrap_err().starts_with("image:"));
        assert!(parse("image: a\nmounts: [{source: x, target: rel}]")
            .unwrap_err()
            .starts_with("mounts[0].target"));
        assert!(parse("image: a\nidle_timeout: 5s")
            .unwrap_err()
            .starts_with("idle_timeout"));
        assert!(parse("image: a\nshare: true\nidle_timeout: 5s").is_ok());
        assert!(parse("image: a\nbogus: 1").is_err());
    }

    #[test]
    fn debootstrap_base() {
        let s = parse(
            "build: { debootstrap: { suite: bookworm, include: [python3, libstdc++6] }, \
             files: { sdk: /opt/sdk }, network: host }\n",
        )
        .unwrap();
        let d = s.build.as_ref().unwrap().debootstrap.clone().unwrap();
        assert_eq!(d.variant, "minbase");
        assert_eq!(d.mirror(), DEFAULT_MIRROR);
        assert_eq!(d.include, vec!["python3", "libstdc++6"]);
        let err = |y: &str| parse(y).unwrap_err();
        assert!(
            err("build: { debootstrap: { suite: bookworm }, base: busybox }")
                .starts_with("build.base:")
        );
        assert!(err("build: { debootstrap: { suite: '--foreign' } }")
            .starts_with("build.debootstrap.suite:"));
        assert!(
            err("build: { debootstrap: { suite: bookworm, include: ['a;rm'] } }")
                .starts_with("build.debootstrap.include[0]:")
        );
        assert!(
            err("build: { debootstrap: { suite: bookworm, variant: fakechroot } }")
                .starts_with("build.debootstrap.variant:")
        );
        assert!(
            err("build: { debootstrap: { suite: bookworm, mirror: 'ftp://x' } }")
                .starts_with("build.debootstrap.mirror:")
        );
        assert!(
            err("build: { debootstrap: { suite: bookworm }, network: bridge }")
                .starts_with("build.network:")
        );
        assert!(err("build: { debootstrap: { suite: bookworm, bogus: 1 } }").contains("bogus"));
    }
}
