//! The image cache: images built from `docker.build`, tagged by a hash of their full build
//! configuration and recorded in SQLite (`images.db` in the state directory).
//!
//! The hash covers the Dockerfile text (given or generated; a debootstrap base enters it
//! through its tag, itself a hash of its configuration), every file of the build context
//! (path, mode bit for executables, content), the build's network and a format version:
//! the same
//! configuration reuses its image, any change builds a new one. Tags are
//! `bulkhead/<workload>:<first 12 hex digits>`.
//!
//! A `debootstrap` base is an image of its own (see [`crate::debootstrap`]), recorded as
//! the parent of the images built on it.
//!
//! Eviction is LRU by `last_used`, down to a maximum count and/or total size, and never
//! removes an image that a container (running or not) still uses, nor a base that a
//! cached image is built on. One build runs at a
//! time (a build already saturates two cores); concurrent launches of the same
//! configuration wait for the first build and then hit the cache. A launch whose image
//! is cached never waits for a build.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use bollard::query_parameters::{BuildImageOptions, ListContainersOptions, RemoveImageOptions};
use bollard::Docker;
use bulkhead_core::docker::{DockerBuild, DockerSpec};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

/// Lines of the build log shown when a build fails.
const LOG_TAIL: usize = 20;

/// Largest context bulkhead sends to the engine.
const MAX_CONTEXT: u64 = 512 << 20;

/// One cached image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImageRecord {
    pub hash: String,
    pub tag: String,
    pub workload: String,
    pub size_bytes: u64,
    /// Unix seconds.
    pub created: i64,
    pub last_used: i64,
    /// Whether a container uses it (filled by [`ImageCache::list`]).
    pub in_use: bool,
    /// The tag of the cached base it is built on (a debootstrap base).
    pub base: Option<String>,
}

/// An image ready to run.
#[derive(Debug, Clone)]
pub struct Built {
    pub tag: String,
    pub hash: String,
    /// Whether it came from the cache.
    pub hit: bool,
}

/// Keeps an image from eviction and prune while a launch is between finding it and
/// creating its container (after that the container protects it). Released on drop.
#[derive(Debug, Clone)]
pub struct Pin {
    _inner: Arc<PinInner>,
}

#[derive(Debug)]
struct PinInner {
    tag: String,
    pins: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for PinInner {
    fn drop(&mut self) {
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = pins.get_mut(&self.tag) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.tag);
            }
        }
    }
}

/// The cache could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the image cache {path}: {source}")]
pub struct OpenError {
    pub path: PathBuf,
    #[source]
    pub source: rusqlite::Error,
}

/// An image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot read the build context {path}: {source}")]
    Context {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the build context {path} is larger than 512 MiB")]
    ContextTooLarge { path: PathBuf },
    #[error("docker build of {tag} failed: {reason}\n--- last lines of the build log ---\n{tail}")]
    Failed {
        tag: String,
        reason: String,
        tail: String,
    },
    #[error(transparent)]
    Base(#[from] crate::debootstrap::BootstrapError),
    #[error("image cache: {0}")]
    Db(#[from] rusqlite::Error),
}

/// The cache could not be listed or pruned.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("image cache: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("cannot list containers to find images in use: {0}")]
    Engine(String),
}

/// Limits the cache is evicted down to after each build.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub max_count: Option<usize>,
    pub max_bytes: Option<u64>,
}

/// The image cache.
pub struct ImageCache {
    db: Mutex<rusqlite::Connection>,
    /// Where debootstrap makes root file systems (beside the database).
    work: PathBuf,
    limits: Limits,
    build_lock: tokio::sync::Mutex<()>,
    /// Images launches are about to use (tag -> count).
    pins: Arc<Mutex<HashMap<String, usize>>>,
    /// Taken to pin an image and to check-and-remove one, so that a removal never takes
    /// an image pinned after its check.
    removal: tokio::sync::Mutex<()>,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// What goes into one build: the Dockerfile text and the context files.
struct Plan {
    dockerfile_name: String,
    dockerfile: String,
    /// (path in the context archive, host path)
    files: Vec<(String, PathBuf)>,
    /// The network of RUN steps (`build.network`), when not the engine's default.
    network: Option<String>,
}

impl ImageCache {
    /// Opens (or creates) the cache database at `path`.
    pub fn open(path: &Path, limits: Limits) -> Result<ImageCache, OpenError> {
        let err = |source| OpenError {
            path: path.to_owned(),
            source,
        };
        let db = rusqlite::Connection::open(path).map_err(err)?;
        db.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE IF NOT EXISTS images (
                 hash TEXT PRIMARY KEY,
                 tag TEXT NOT NULL,
                 workload TEXT NOT NULL,
                 size INTEGER NOT NULL,
                 created INTEGER NOT NULL,
                 last_used INTEGER NOT NULL
             );",
        )
        .map_err(err)?;
        // Added with debootstrap bases: the hash of the image this one is built on.
        let has_parent = db
            .prepare("SELECT 1 FROM pragma_table_info('images') WHERE name = 'parent'")
            .and_then(|mut s| s.exists([]))
            .map_err(err)?;
        if !has_parent {
            db.execute_batch("ALTER TABLE images ADD COLUMN parent TEXT")
                .map_err(err)?;
        }
        Ok(ImageCache {
            db: Mutex::new(db),
            work: path
                .parent()
                .unwrap_or_else(|| Path::new("."))
                .join("debootstrap"),
            limits,
            build_lock: tokio::sync::Mutex::new(()),
            pins: Arc::new(Mutex::new(HashMap::new())),
            removal: tokio::sync::Mutex::new(()),
        })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every cached image, most recently used first, without `in_use`.
    pub fn records(&self) -> Result<Vec<ImageRecord>, rusqlite::Error> {
        let db = self.db();
        let mut stmt = db.prepare(
            // `last_used` is in whole seconds (what `images` shows); uses within one second
            // are ordered by rowid, which every insert and every use moves to the end.
            "SELECT i.hash, i.tag, i.workload, i.size, i.created, i.last_used, p.tag
             FROM images i LEFT JOIN images p ON p.hash = i.parent
             ORDER BY i.last_used DESC, i.rowid DESC",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ImageRecord {
                hash: r.get(0)?,
                tag: r.get(1)?,
                workload: r.get(2)?,
                size_bytes: r.get::<_, i64>(3)? as u64,
                created: r.get(4)?,
                last_used: r.get(5)?,
                in_use: false,
                base: r.get(6)?,
            })
        })?;
        rows.collect()
    }

    /// Every cached image, with whether a container uses it.
    pub async fn list(&self, client: &Docker) -> Result<Vec<ImageRecord>, CacheError> {
        let used = images_in_use(client).await?;
        let mut recs = self.records()?;
        for r in &mut recs {
            r.in_use = used.contains(&r.tag);
        }
        Ok(recs)
    }

    /// Removes every cached image no container uses; returns the removed records.
    pub async fn prune(&self, client: &Docker) -> Result<Vec<ImageRecord>, CacheError> {
        let _guard = self.build_lock.lock().await;
        let used = images_in_use(client).await?;
        let mut removed = Vec::new();
        // A base goes once the images built on it have gone: pass again while a pass
        // removes something.
        loop {
            let recs = self.records()?;
            let parents = self.parents()?;
            let mut any = false;
            for r in recs {
                if !used.contains(&r.tag)
                    && !parents.contains(&r.hash)
                    && self.remove(client, &r).await?
                {
                    removed.push(r);
                    any = true;
                }
            }
            if !any {
                return Ok(removed);
            }
        }
    }

    /// Hashes of the images that cached images are built on.
    fn parents(&self) -> Result<HashSet<String>, rusqlite::Error> {
        let db = self.db();
        let mut stmt = db.prepare("SELECT DISTINCT parent FROM images WHERE parent IS NOT NULL")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect()
    }

    /// Pins `tag` (see [`Pin`]).
    async fn pin(&self, tag: &str) -> Pin {
        let _removal = self.removal.lock().await;
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        *pins.entry(tag.to_owned()).or_insert(0) += 1;
        Pin {
            _inner: Arc::new(PinInner {
                tag: tag.to_owned(),
                pins: Arc::clone(&self.pins),
            }),
        }
    }

    /// Removes one image and its record; false if it is pinned or the engine refused
    /// (in use).
    async fn remove(&self, client: &Docker, r: &ImageRecord) -> Result<bool, rusqlite::Error> {
        // RACE: a launch pins an image, then checks that the engine still has it; the
        // removal checks the pin, then removes. Both under `removal`, so either the launch
        // finds the image gone (and builds it again) or the removal sees the pin.
        let _removal = self.removal.lock().await;
        if self
            .pins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&r.tag)
        {
            return Ok(false);
        }
        match client
            .remove_image(&r.tag, None::<RemoveImageOptions>, None)
            .await
        {
            Ok(_)
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {
                self.db()
                    .execute("DELETE FROM images WHERE hash = ?1", [&r.hash])?;
                Ok(true)
            }
            Err(e) => {
                tracing::warn!("cannot remove cached image {}: {e}", r.tag);
                Ok(false)
            }
        }
    }

    /// Evicts least recently used images not in use until the limits hold.
    pub async fn evict(&self, client: &Docker) -> Result<Vec<ImageRecord>, CacheError> {
        if self.limits.max_count.is_none() && self.limits.max_bytes.is_none() {
            return Ok(Vec::new());
        }
        let used = images_in_use(client).await?;
        let mut recs = self.records()?;
        // Oldest last.
        let mut removed = Vec::new();
        let over = |recs: &[ImageRecord]| {
            self.limits.max_count.is_some_and(|m| recs.len() > m)
                || self
                    .limits
                    .max_bytes
                    .is_some_and(|m| recs.iter().map(|r| r.size_bytes).sum::<u64>() > m)
        };
        // Oldest first; a base is kept while an image built on it is, so pass again when
        // a pass removed an image (its base may have become removable).
        loop {
            let before = removed.len();
            let mut i = recs.len();
            while over(&recs) && i > 0 {
                i -= 1;
                if used.contains(&recs[i].tag) || self.parents()?.contains(&recs[i].hash) {
                    continue;
                }
                let r = recs.remove(i);
                if self.remove(client, &r).await? {
                    removed.push(r);
                }
            }
            if !over(&recs) || removed.len() == before {
                return Ok(removed);
            }
        }
    }

    /// The image for `dk.build`, from the cache or built now.
    pub async fn ensure(
        &self,
        client: &Docker,
        workload: &str,
        dk: &DockerSpec,
        dir: &Path,
    ) -> Result<Built, BuildError> {
        self.ensure_pinned(client, workload, dk, dir)
            .await
            .map(|(built, _)| built)
    }

    /// [`ImageCache::ensure`], with the image pinned until the [`Pin`] drops: what a
    /// launch holds until its container exists.
    pub async fn ensure_pinned(
        &self,
        client: &Docker,
        workload: &str,
        dk: &DockerSpec,
        dir: &Path,
    ) -> Result<(Built, Pin), BuildError> {
        let build = dk.build.clone().unwrap_or_default();
        let plan = plan(&build, dir)?;
        let base = build.debootstrap.as_ref().map(|d| {
            (
                crate::debootstrap::config_hash(d),
                crate::debootstrap::tag(d),
                d,
            )
        });
        let hash = hash_plan(&plan)?;
        let tag = format!("bulkhead/{}:{}", sanitize(workload), &hash[..12]);
        // A cached image never waits behind a build (one can take minutes, and different
        // keys must not wait on each other): look first without the build lock. The hit
        // moves the image to the front of the LRU order, so an eviction racing with this
        // launch takes older images first.
        if let Some(hit) = self.hit(client, &hash).await? {
            return Ok(hit);
        }
        let _guard = self.build_lock.lock().await;
        // Again under the lock: a concurrent launch of the same configuration may have
        // built it while we waited.
        if let Some(hit) = self.hit(client, &hash).await? {
            return Ok(hit);
        }
        if let Some((base_hash, base_tag, d)) = &base {
            self.ensure_base(client, base_hash, base_tag, d).await?;
        }
        let ctx = archive(&plan, dir)?;
        tracing::info!("building image {tag} for workload {workload}");
        let started = std::time::Instant::now();
        let opts = BuildImageOptions {
            dockerfile: plan.dockerfile_name.clone(),
            t: Some(tag.clone()),
            rm: true,
            forcerm: true,
            networkmode: plan.network.clone(),
            labels: Some(
                [("bulkhead.config".to_owned(), hash.clone())]
                    .into_iter()
                    .collect(),
            ),
            ..Default::default()
        };
        let mut log: Vec<String> = Vec::new();
        let mut failure = None;
        let mut stream = client.build_image(
            opts,
            None,
            Some(bollard::body_full(bytes::Bytes::from(ctx))),
        );
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(s) = info.stream {
                        log.extend(s.lines().map(str::to_owned));
                    }
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
        if let Some(reason) = failure {
            let start = log.len().saturating_sub(LOG_TAIL);
            return Err(BuildError::Failed {
                tag,
                reason,
                tail: log[start..].join("\n"),
            });
        }
        let size = match client.inspect_image(&tag).await {
            Ok(i) => i.size.unwrap_or(0).max(0) as u64,
            Err(e) => {
                return Err(BuildError::Failed {
                    tag,
                    reason: format!("the built image cannot be inspected: {e}"),
                    tail: String::new(),
                })
            }
        };
        tracing::info!(
            "built image {tag} ({}) in {:.1} s",
            bulkhead_core::size::format(size),
            started.elapsed().as_secs_f64()
        );
        let t = now();
        self.db().execute(
            "INSERT OR REPLACE INTO images (hash, tag, workload, size, created, last_used, parent)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6)",
            rusqlite::params![hash, tag, workload, size as i64, t, base.map(|b| b.0)],
        )?;
        let pin = self.pin(&tag).await;
        drop(_guard);
        if let Err(e) = self.evict(client).await {
            tracing::warn!("image cache eviction: {e}");
        }
        Ok((
            Built {
                tag,
                hash,
                hit: false,
            },
            pin,
        ))
    }
}

impl ImageCache {
    /// The cached image of configuration `hash`, if the engine still has it (its use is
    /// recorded); a record whose image was removed behind our back is dropped.
    async fn hit(&self, client: &Docker, hash: &str) -> Result<Option<(Built, Pin)>, BuildError> {
        let cached: Option<String> = self
            .db()
            .query_row("SELECT tag FROM images WHERE hash = ?1", [hash], |r| {
                r.get(0)
            })
            .ok();
        let Some(tag) = cached else {
            return Ok(None);
        };
        // Pinned before the check (see `remove`).
        let pin = self.pin(&tag).await;
        if client.inspect_image(&tag).await.is_ok() {
            self.db().execute(
                "UPDATE images SET last_used = ?1,
                    rowid = (SELECT max(rowid) + 1 FROM images) WHERE hash = ?2",
                rusqlite::params![now(), hash],
            )?;
            return Ok(Some((
                Built {
                    tag,
                    hash: hash.to_owned(),
                    hit: true,
                },
                pin,
            )));
        }
        self.db()
            .execute("DELETE FROM images WHERE hash = ?1", [hash])?;
        Ok(None)
    }

    /// Makes sure the debootstrap base `tag` exists, making and recording it if not.
    /// Called with the build lock held.
    async fn ensure_base(
        &self,
        client: &Docker,
        hash: &str,
        tag: &str,
        d: &bulkhead_core::docker::Debootstrap,
    ) -> Result<(), BuildError> {
        let recorded = self
            .db()
            .query_row("SELECT 1 FROM images WHERE hash = ?1", [hash], |_| Ok(()))
            .is_ok();
        if client.inspect_image(tag).await.is_ok() {
            if recorded {
                self.db().execute(
                    "UPDATE images SET last_used = ?1,
                        rowid = (SELECT max(rowid) + 1 FROM images) WHERE hash = ?2",
                    rusqlite::params![now(), hash],
                )?;
                return Ok(());
            }
        } else {
            crate::debootstrap::build(client, d, tag, &self.work).await?;
        }
        let size = client
            .inspect_image(tag)
            .await
            .ok()
            .and_then(|i| i.size)
            .unwrap_or(0)
            .max(0);
        let t = now();
        self.db().execute(
            "INSERT OR REPLACE INTO images (hash, tag, workload, size, created, last_used)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            rusqlite::params![hash, tag, format!("(debootstrap {})", d.suite), size, t],
        )?;
        Ok(())
    }
}

/// Tags of images that containers (any state) use.
async fn images_in_use(client: &Docker) -> Result<HashSet<String>, CacheError> {
    let list = client
        .list_containers(Some(ListContainersOptions {
            all: true,
            ..Default::default()
        }))
        .await
        .map_err(|e| CacheError::Engine(e.to_string()))?;
    Ok(list.into_iter().filter_map(|c| c.image).collect())
}

/// A workload name as a repository path component.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

fn ctx_err(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Context {
        path: path.to_owned(),
        source,
    }
}

/// Resolves `p` against the manifest's folder.
fn resolve(dir: &Path, p: &str) -> PathBuf {
    if Path::new(p).is_absolute() {
        PathBuf::from(p)
    } else {
        dir.join(p)
    }
}

/// The generated Dockerfile of `base` and `debootstrap` modes.
pub fn generated_dockerfile(b: &DockerBuild) -> String {
    let from = match (&b.base, &b.debootstrap) {
        (Some(base), _) => base.clone(),
        (None, Some(d)) => crate::debootstrap::tag(d),
        (None, None) => "scratch".to_owned(),
    };
    let mut out = format!("FROM {from}\n");
    for (k, v) in &b.env {
        out.push_str(&format!(
            "ENV {k}={}\n",
            serde_json::to_string(v).unwrap_or_default()
        ));
    }
    for (i, (_, dst)) in b.files.iter().enumerate() {
        out.push_str(&format!("COPY files/{i} {dst}\n"));
    }
    for r in &b.run {
        out.push_str(&format!("RUN {r}\n"));
    }
    out
}

fn plan(b: &DockerBuild, dir: &Path) -> Result<Plan, BuildError> {
    let context = resolve(dir, b.context.as_deref().unwrap_or("."));
    if let Some(df) = &b.dockerfile {
        let df_path = resolve(dir, df);
        let text = std::fs::read_to_string(&df_path).map_err(ctx_err(&df_path))?;
        let mut files = Vec::new();
        walk(&context, &context, &mut files)?;
        files.sort();
        // The Dockerfile travels under a name of its own, wherever it lives.
        let name = ".bulkhead.Dockerfile".to_owned();
        files.retain(|(n, _)| n != &name);
        return Ok(Plan {
            dockerfile_name: name,
            dockerfile: text,
            files,
            network: b.network.clone().filter(|n| n != "default"),
        });
    }
    let mut files = Vec::new();
    for (i, src) in b.files.keys().enumerate() {
        let host = context.join(src);
        let meta = std::fs::metadata(&host).map_err(ctx_err(&host))?;
        if meta.is_dir() {
            // `COPY files/<i> <target>` copies the folder's contents into the target.
            let mut inner = Vec::new();
            walk(&host, &host, &mut inner)?;
            inner.sort();
            files.extend(
                inner
                    .into_iter()
                    .map(|(rel, p)| (format!("files/{i}/{rel}"), p)),
            );
        } else {
            files.push((format!("files/{i}"), host));
        }
    }
    Ok(Plan {
        dockerfile_name: "Dockerfile".to_owned(),
        dockerfile: generated_dockerfile(b),
        files,
        network: b.network.clone().filter(|n| n != "default"),
    })
}

/// Every regular file under `root`, as (relative path, host path). Symlinks are followed;
/// `.git` and `__pycache__` (never part of an image, and rewritten by every Python run on
/// the host, which would change the hash) are skipped.
fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<(), BuildError> {
    for entry in std::fs::read_dir(dir).map_err(ctx_err(dir))? {
        let entry = entry.map_err(ctx_err(dir))?;
        let path = entry.path();
        if entry.file_name() == ".git" || entry.file_name() == "__pycache__" {
            continue;
        }
        let meta = std::fs::metadata(&path).map_err(ctx_err(&path))?;
        if meta.is_dir() {
            walk(root, &path, out)?;
        } else if meta.is_file() {
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            out.push((rel, path));
        }
    }
    Ok(())
}

fn is_exec(p: &Path) -> Result<bool, std::io::Error> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(p)?.permissions().mode() & 0o111 != 0)
}

/// The hash of everything that goes into the build.
fn hash_plan(plan: &Plan) -> Result<String, BuildError> {
    let mut h = Sha256::new();
    h.update(b"bulkhead-image-v1\0");
    h.update(plan.dockerfile_name.as_bytes());
    h.update([0]);
    h.update(plan.dockerfile.as_bytes());
    h.update([0]);
    if let Some(n) = &plan.network {
        h.update(b"network\0");
        h.update(n.as_bytes());
        h.update([0]);
    }
    for (name, path) in &plan.files {
        let data = std::fs::read(path).map_err(ctx_err(path))?;
        h.update(name.as_bytes());
        h.update([0, u8::from(is_exec(path).map_err(ctx_err(path))?)]);
        h.update((data.len() as u64).to_le_bytes());
        h.update(&data);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The build context as a tar archive (GNU format: long paths are kept whole).
fn archive(plan: &Plan, dir: &Path) -> Result<Vec<u8>, BuildError> {
    let io = |e| BuildError::Context {
        path: dir.to_owned(),
        source: e,
    };
    let mut tar = tar::Builder::new(Vec::new());
    let mut append = |name: &str, mode: u32, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, data)
    };
    append(&plan.dockerfile_name, 0o644, plan.dockerfile.as_bytes()).map_err(io)?;
    let mut total = 0u64;
    for (name, path) in &plan.files {
        let data = std::fs::read(path).map_err(ctx_err(path))?;
        total += data.len() as u64;
        if total > MAX_CONTEXT {
            return Err(BuildError::ContextTooLarge {
                path: dir.to_owned(),
            });
        }
        let mode = if is_exec(path).map_err(ctx_err(path))? {
            0o755
        } else {
            0o644
        };
        append(name, mode, &data).map_err(io)?;
    }
    tar.into_inner().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_dockerfile_lists_env_files_and_commands() {
        let b = DockerBuild {
            base: Some("busybox".into()),
            files: [("a.txt".to_owned(), "/a.txt".to_owned())].into(),
            run: vec!["echo hi".into()],
            env: [("X".to_owned(), "1 2".to_owned())].into(),
            ..Default::default()
        };
        assert_eq!(
            generated_dockerfile(&b),
            "FROM busybox\nENV X=\"1 2\"\nCOPY files/0 /a.txt\nRUN echo hi\n"
        );
    }

    #[test]
    fn debootstrap_base_and_folders() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("pkg/sub")).unwrap();
        std::fs::create_dir_all(dir.path().join("pkg/__pycache__")).unwrap();
        std::fs::write(dir.path().join("pkg/a.py"), "a").unwrap();
        std::fs::write(dir.path().join("pkg/sub/b.py"), "b").unwrap();
        std::fs::write(dir.path().join("pkg/__pycache__/a.pyc"), "x").unwrap();
        std::fs::write(dir.path().join("main.py"), "m").unwrap();
        let b: DockerBuild = serde_saphyr::from_str(
            "debootstrap: {suite: bookworm, include: [python3]}\n\
             files: {pkg: /opt/pkg, main.py: /app/main.py}\n",
        )
        .unwrap();
        let p = plan(&b, dir.path()).unwrap();
        let base = crate::debootstrap::tag(b.debootstrap.as_ref().unwrap());
        assert!(
            p.dockerfile.starts_with(&format!("FROM {base}\n")),
            "{}",
            p.dockerfile
        );
        let names: Vec<&str> = p.files.iter().map(|(n, _)| n.as_str()).collect();
        // BTreeMap order: main.py is files/0, pkg is files/1 (its contents, no cache).
        assert_eq!(names, ["files/0", "files/1/a.py", "files/1/sub/b.py"]);
        assert!(p
            .dockerfile
            .contains("COPY files/0 /app/main.py\nCOPY files/1 /opt/pkg\n"));
        // A Python run on the host rewrites __pycache__: the image stays the same.
        let h = hash_plan(&p).unwrap();
        std::fs::write(dir.path().join("pkg/__pycache__/a.pyc"), "y").unwrap();
        assert_eq!(h, hash_plan(&plan(&b, dir.path()).unwrap()).unwrap());
        // The build's network is part of the configuration.
        let mut hb = b.clone();
        hb.network = Some("host".into());
        assert_ne!(h, hash_plan(&plan(&hb, dir.path()).unwrap()).unwrap());
        hb.network = Some("default".into());
        assert_eq!(h, hash_plan(&plan(&hb, dir.path()).unwrap()).unwrap());
    }

    #[test]
    fn the_context_archive_keeps_modes_and_long_paths() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let long = format!("{}/run.sh", "d".repeat(150));
        std::fs::create_dir_all(dir.path().join("pkg").join("d".repeat(150))).unwrap();
        let script = dir.path().join("pkg").join(&long);
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let b = DockerBuild {
            base: Some("busybox".into()),
            files: [("pkg".to_owned(), "/opt/pkg".to_owned())].into(),
            ..Default::default()
        };
        let p = plan(&b, dir.path()).unwrap();
        let bytes = archive(&p, dir.path()).unwrap();
        let mut ar = tar::Archive::new(bytes.as_slice());
        let got: Vec<(String, u32)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().mode().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("Dockerfile".to_owned(), 0o644),
                (format!("files/0/{long}"), 0o755)
            ]
        );
    }

    #[test]
    fn hash_changes_with_any_input() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "one").unwrap();
        let mut b = DockerBuild {
            base: Some("busybox".into()),
            files: [("a.txt".to_owned(), "/a.txt".to_owned())].into(),
            ..Default::default()
        };
        let h1 = hash_plan(&plan(&b, dir.path()).unwrap()).unwrap();
        assert_eq!(h1, hash_plan(&plan(&b, dir.path()).unwrap()).unwrap());
        std::fs::write(dir.path().join("a.txt"), "two").unwrap();
        let h2 = hash_plan(&plan(&b, dir.path()).unwrap()).unwrap();
        assert_ne!(h1, h2);
        b.run.push("true".into());
        let h3 = hash_plan(&plan(&b, dir.path()).unwrap()).unwrap();
        assert_ne!(h2, h3);
    }
}
