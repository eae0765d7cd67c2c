//! The daemon's SQLite database (`<state>/bulkhead.db`): durable state that survives a
//! daemon restart. Today it holds the event log; instances, leases and breaker state go
//! here next (add a [`MIGRATIONS`] entry, never edit a released one).
//!
//! One thread at a time touches a [`Store`]: the event log's writer, or a waiter that
//! commits in its place when the commit is short ([`Sink::quick`]; see [`crate::events`]).
//! The database runs in WAL mode; [`Synchronous::Full`] fsyncs the WAL on every commit,
//! so a committed transaction survives a power loss. [`Synchronous::Normal`] (the
//! daemon's default) only fsyncs at checkpoints: it survives a crash of the daemon but the
//! last transactions may roll back on a power loss (see `docs/benchmarks.md` for what it
//! buys). The event log's connection does not checkpoint by itself: its writer thread
//! does, every [`CHECKPOINT_EVERY`] commits.
//!
//! Retention: at most `retention` events are kept. The oldest are deleted inside a batch's
//! own transaction (no extra fsync) once every `retention / 16` inserted events or so;
//! freed pages are reused, so the file stays bounded without a VACUUM. The newest event is
//! never deleted, which is what lets ids continue after a restart.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use bulkhead_core::event::{Event, EventKind};
use bulkhead_core::key::InstanceId;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

/// Events kept in the database by default.
pub const DEFAULT_RETENTION: usize = 100_000;

/// The schema, one step per version. A database at version N gets every step after N, in
/// order, each in its own transaction together with the new version number.
pub const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        time_ms INTEGER NOT NULL,
        instance TEXT NOT NULL,
        kind TEXT NOT NULL,
        data TEXT NOT NULL
    );",
    ),
    (
        2,
        // One row per instance that is not final (see crate::instances).
        "CREATE TABLE instances (
        id TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        dir TEXT NOT NULL,
        pid INTEGER,
        start_time INTEGER,
        state TEXT NOT NULL,
        restarts INTEGER NOT NULL,
        breaker TEXT NOT NULL,
        consecutive_failures INTEGER NOT NULL,
        leases TEXT NOT NULL,
        updated_ms INTEGER NOT NULL
    );",
    ),
];

/// How long a writer waits for the database's write lock before its commit fails.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How a connection waits when the other writer of the state database (the event writer,
/// the instance table's writer) holds the write lock: briefly and often, as the other's
/// commit is tens of microseconds. SQLite's own busy handler sleeps 1 ms, then 2, 5, 10,
/// ...: a writer that met the other's commit lost a millisecond or more (`--bench
/// durability`, an event commit beside a busy instance table: p99 1.2-3.2 ms with SQLite's
/// handler, 0.21 ms with this one; `docs/benchmarks.md`, "Two writers, one write lock").
/// Gives up after about [`LOCK_WAIT`] (`SQLITE_BUSY`).
pub fn share_writes(conn: &mut Connection) -> rusqlite::Result<()> {
    conn.busy_handler(Some(wait_for_lock))
}

/// Waits once more, or gives up: the first [`SHORT_TRIES`] waits are 20 µs (70 µs or so
/// with the timer's slack), the next ones 1 ms, about [`LOCK_WAIT`] in all.
fn wait_for_lock(tries: i32) -> bool {
    if NO_WAIT.with(std::cell::Cell::get) {
        // A commit on a waiter's thread (`Sink::append_now`): the writer thread takes it.
        return false;
    }
    let tries = u32::try_from(tries).unwrap_or(0);
    let pause = if tries < SHORT_TRIES {
        std::time::Duration::from_micros(20)
    } else if tries < SHORT_TRIES + LOCK_WAIT.as_millis() as u32 {
        std::time::Duration::from_millis(1)
    } else {
        return false;
    };
    std::thread::sleep(pause);
    true
}

/// See [`wait_for_lock`].
const SHORT_TRIES: u32 = 100;

thread_local! {
    /// Set during [`Sink::append_now`]: the busy handler gives up at once.
    static NO_WAIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Commits between two WAL checkpoints of the event log's connection. SQLite's automatic
/// checkpoint (at 1,000 pages, two fsyncs) is off on it: a commit on a waiter's thread
/// must stay short, so the writer thread checkpoints ([`Sink::maintain`]).
const CHECKPOINT_EVERY: usize = 256;

/// The newest schema version this build knows.
pub fn schema_version() -> i64 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

/// How hard a commit goes to the disk.
///
/// The default is `Normal`: in WAL mode a committed transaction is in the operating
/// system's hands, so it survives any crash of the daemon (`kill -9` included), which is
/// the failure bulkhead recovers from; only a power loss or kernel crash can lose the last
/// commits (and with them every instance anyway). `Full` fsyncs every commit: measured on
/// the reference machine it adds about 1 ms to a launch (see docs/benchmarks.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// fsync the WAL at every commit: a committed event survives a power loss.
    Full,
    /// fsync at checkpoints only: survives a daemon crash, not a power loss.
    #[default]
    Normal,
}

/// The database could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open state database {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open state database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state database {path} has schema version {found}, newer than this bulkhead knows ({known}); run a newer bulkhead, or start with `bulkhead serve --fresh-state` to move it aside and begin a new history")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("state database {path} is empty (0 bytes): it was truncated, and its event history and instance table are gone; start with `bulkhead serve --fresh-state` to move it aside and begin a new history")]
    Empty { path: PathBuf },
    #[error("state database {path} is damaged ({detail}): it was truncated or corrupted, and its event history and instance table cannot be trusted; restore it from a backup, or start with `bulkhead serve --fresh-state` to move it aside and begin a new history")]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot migrate state database {path} to schema version {version}: {source}")]
    Migrate {
        path: PathBuf,
        version: i64,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot read events from state database {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot write events to state database {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot start the event writer thread for {path}: {source}")]
    Thread {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot move damaged state database {path} aside: {source}")]
    SetAside {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// The file is there but cannot be used as it is (empty, damaged, or from a newer
    /// bulkhead): what `--fresh-state` moves aside. Not an I/O error of the moment
    /// (permissions, a full disk), which a fresh start would not cure.
    pub fn is_bad_database(&self) -> bool {
        matches!(
            self,
            StoreError::Empty { .. } | StoreError::Corrupt { .. } | StoreError::TooNew { .. }
        )
    }
}

/// Whether SQLite says the file is not (or no longer) a sound database.
fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
    )
}

/// `e` as [`StoreError::Corrupt`] when it is damage, else as `other`.
fn damage_or(
    path: &Path,
    e: rusqlite::Error,
    other: impl FnOnce(rusqlite::Error) -> StoreError,
) -> StoreError {
    if is_damage(&e) {
        StoreError::Corrupt {
            path: path.to_owned(),
            detail: e.to_string(),
        }
    } else {
        other(e)
    }
}

/// What `--fresh-state` did with a bad database.
#[derive(Debug, Clone, PartialEq)]
pub struct SetAside {
    /// Where the file went (`<path>.bad-<unix seconds>`; its `-wal` and `-shm` beside).
    pub moved_to: PathBuf,
    /// The newest event id that could still be read from it: the new database's ids
    /// continue after it, so no id a client saw names a second event.
    pub last_id: Option<u64>,
}

/// Moves the database at `path` (with its `-wal` and `-shm`) aside as
/// `<path>.bad-<unix seconds>`, after reading what it can of its newest event id.
pub fn set_aside(path: &Path) -> Result<SetAside, StoreError> {
    let last_id = salvage_last_id(path);
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let with = |base: &Path, suffix: &str| {
        let mut p = base.as_os_str().to_owned();
        p.push(suffix);
        PathBuf::from(p)
    };
    let mut moved_to = with(path, &format!(".bad-{secs}"));
    let mut n = 1;
    while moved_to.exists() {
        moved_to = with(path, &format!(".bad-{secs}-{n}"));
        n += 1;
    }
    let err = |source| StoreError::SetAside {
        path: path.to_owned(),
        source,
    };
    // The journal files first: a database file left without its WAL is never paired
    // with another's.
    for suffix in ["-wal", "-shm"] {
        match std::fs::rename(with(path, suffix), with(&moved_to, suffix)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
    }
    std::fs::rename(path, &moved_to).map_err(err)?;
    if let Some(dir) = path.parent() {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(SetAside { moved_to, last_id })
}

/// The newest event id a damaged or foreign database still shows, read-only; `None` if
/// it shows none.
fn salvage_last_id(path: &Path) -> Option<u64> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .ok()?;
    let id: Option<i64> = conn
        .query_row("SELECT MAX(id) FROM events", [], |r| r.get(0))
        .ok()?;
    id.filter(|&i| i > 0).map(|i| i as u64)
}

enum Fresh {
    Io(std::io::Error),
    Sql(rusqlite::Error),
}

/// Makes a new database at `path`: written (WAL header) under `<path>.new`, then renamed.
fn create_fresh(path: &Path) -> Result<(), Fresh> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    // Left by a start that crashed here: it never held anything.
    for suffix in ["", "-wal", "-shm"] {
        let mut p = tmp.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
    {
        let conn = Connection::open(&tmp).map_err(Fresh::Sql)?;
        let _: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(Fresh::Sql)?;
        conn.close().map_err(|(_, e)| Fresh::Sql(e))?;
    }
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(Fresh::Io)?;
    std::fs::rename(&tmp, path).map_err(Fresh::Io)?;
    if let Some(dir) = path.parent() {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// Where committed events go. [`Store`] is the real one; tests use one that blocks.
pub(crate) trait Sink: Send + 'static {
    /// Makes `events` (ids increasing) durable, all or none.
    fn append(&mut self, events: &[Event]) -> Result<(), StoreError>;
    /// The file, for messages.
    fn describe(&self) -> String;
    /// Whether committing `n` events now is short enough to do on a waiter's thread (an
    /// async task's): no fsync, no trim and no checkpoint due. Otherwise (and by default)
    /// the writer thread commits.
    fn quick(&self, _n: usize) -> bool {
        false
    }
    /// [`Sink::append`] that fails at once instead of waiting for another connection's
    /// write lock (the waiter's thread must not sleep; the writer thread then commits).
    fn append_now(&mut self, events: &[Event]) -> Result<(), StoreError> {
        self.append(events)
    }
    /// What the writer thread does after its commits (a checkpoint when one is due).
    fn maintain(&mut self) {}
}

/// An open state database.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    retention: usize,
    /// Events inserted since the last trim.
    since_trim: usize,
    sync: Synchronous,
    /// Commits since the last checkpoint ([`CHECKPOINT_EVERY`]).
    since_checkpoint: usize,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    /// `retention` is clamped to at least 1.
    pub fn open(path: &Path, retention: usize, sync: Synchronous) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let io_err = |source| StoreError::Io {
            path: path.to_owned(),
            source,
        };
        // A new database is made under a temporary name and renamed into place once its
        // header is written, so a file at `path` is never an empty one of ours: an
        // existing empty file is a truncated database (history lost), refused rather than
        // silently started afresh with ids from 1.
        match std::fs::metadata(path) {
            Ok(m) if m.len() == 0 => {
                return Err(StoreError::Empty {
                    path: path.to_owned(),
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                create_fresh(path).map_err(|e| match e {
                    Fresh::Io(source) => io_err(source),
                    Fresh::Sql(source) => open_err(source),
                })?
            }
            Err(e) => return Err(io_err(e)),
        }
        // SQLite says only "unable to open database file"; the OS says why.
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err)?;
        let mut conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_err)?;
        // The instance table's writer commits on its own connection.
        share_writes(&mut conn).map_err(open_err)?;
        // The first statement that reads the file: a corrupt or foreign file fails here
        // ("file is not a database").
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| damage_or(path, e, open_err))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(
                "state database {} is in journal mode {mode}, not wal",
                path.display()
            );
        }
        let sync_sql = match sync {
            Synchronous::Full => "PRAGMA synchronous = FULL",
            Synchronous::Normal => "PRAGMA synchronous = NORMAL",
        };
        // No automatic checkpoint on this connection: see CHECKPOINT_EVERY.
        conn.execute_batch(&format!(
            "{sync_sql}; PRAGMA foreign_keys = ON; PRAGMA journal_size_limit = 8388608; \
             PRAGMA wal_autocheckpoint = 0;"
        ))
        .map_err(open_err)?;
        let mut store = Store {
            conn,
            path: path.to_owned(),
            retention: retention.max(1),
            since_trim: 0,
            sync,
            since_checkpoint: 0,
        };
        store.migrate().map_err(|e| match e {
            StoreError::Migrate { path, source, .. } if is_damage(&source) => StoreError::Corrupt {
                path,
                detail: source.to_string(),
            },
            e => e,
        })?;
        store.check()?;
        Ok(store)
    }

    /// `PRAGMA quick_check`: a truncated or corrupted file is refused here, at start-up,
    /// rather than failing (or silently losing rows) later. Linear in the file's size.
    fn check(&self) -> Result<(), StoreError> {
        let damaged = |e| damage_or(&self.path, e, |e| self.read_err(e));
        let mut stmt = self
            .conn
            .prepare("PRAGMA quick_check(5)")
            .map_err(damaged)?;
        let found: Vec<String> = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(damaged)?
            .collect::<Result<_, _>>()
            .map_err(damaged)?;
        if found.len() == 1 && found[0] == "ok" {
            return Ok(());
        }
        Err(StoreError::Corrupt {
            path: self.path.clone(),
            detail: found.join("; "),
        })
    }

    /// Ids continue after `id` even if no event is stored yet (a fresh start after a
    /// damaged database whose newest id is known).
    pub fn set_id_floor(&mut self, id: u64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES ('id_floor', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = MAX(value, excluded.value)",
                [id as i64],
            )
            .map_err(|source| StoreError::Write {
                path: self.path.clone(),
                source,
            })?;
        Ok(())
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let known = schema_version();
        let err = |version| {
            let path = path.clone();
            move |source| StoreError::Migrate {
                path,
                version,
                source,
            }
        };
        self.conn
            .execute_batch(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
            )
            .map_err(err(0))?;
        let found = self.version().map_err(err(0))?;
        if found > known {
            return Err(StoreError::TooNew {
                path: path.clone(),
                found,
                known,
            });
        }
        for &(version, sql) in MIGRATIONS.iter().filter(|m| m.0 > found) {
            let tx = self.conn.transaction().map_err(err(version))?;
            tx.execute_batch(sql).map_err(err(version))?;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [version],
            )
            .map_err(err(version))?;
            tx.commit().map_err(err(version))?;
            tracing::debug!(
                "state database {}: schema version {version}",
                path.display()
            );
        }
        Ok(())
    }

    /// The schema version recorded in the database (0: none yet).
    pub fn version(&self) -> rusqlite::Result<i64> {
        Ok(self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id of the newest stored event (or the floor a fresh start set), 0 if none.
    pub fn last_id(&self) -> Result<u64, StoreError> {
        let id: Option<i64> = self
            .conn
            .query_row(
                "SELECT MAX(IFNULL((SELECT MAX(id) FROM events), 0),
                            IFNULL((SELECT value FROM meta WHERE key = 'id_floor'), 0))",
                [],
                |r| r.get(0),
            )
            .map_err(|source| self.read_err(source))?;
        Ok(id.unwrap_or(0).max(0) as u64)
    }

    /// How many events are stored.
    pub fn count(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
            .map_err(|source| self.read_err(source))?;
        Ok(n.max(0) as u64)
    }

    /// The newest `n` events, oldest first. A row that does not parse (written by a
    /// buggy or foreign writer) is skipped with a warning rather than failing the start.
    pub fn tail(&self, n: usize) -> Result<Vec<Event>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, time_ms, instance, data FROM events ORDER BY id DESC LIMIT ?1")
            .map_err(|source| self.read_err(source))?;
        let rows = stmt
            .query_map([n as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })
            .map_err(|source| self.read_err(source))?;
        let mut out = Vec::with_capacity(n.min(16_384));
        for row in rows {
            let (id, time_ms, instance, data) = row.map_err(|source| self.read_err(source))?;
            let instance = match InstanceId::parse(&instance) {
                Ok((i, _)) => i,
                Err(e) => {
                    tracing::warn!("{}: event {id} skipped: {e}", self.path.display());
                    continue;
                }
            };
            let kind = match serde_json::from_str::<EventKind>(&data) {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!("{}: event {id} skipped: {e}", self.path.display());
                    continue;
                }
            };
            out.push(Event {
                id: id.max(0) as u64,
                time_ms: time_ms.max(0) as u64,
                instance,
                kind,
            });
        }
        out.reverse();
        Ok(out)
    }

    /// Inserts `events` in one transaction (one fsync), deleting the oldest beyond the
    /// retention in the same transaction when a trim is due.
    pub fn append(&mut self, events: &[Event]) -> Result<(), StoreError> {
        let Some(last) = events.last() else {
            return Ok(());
        };
        let trim = self.trim_due(events.len());
        let path = &self.path;
        let werr = |source| StoreError::Write {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(werr)?;
        {
            let mut ins = tx
                .prepare_cached(
                    // OR IGNORE: a retried batch whose earlier commit was reported failed
                    // but landed (an fsync error after the write) stores nothing twice and
                    // does not fail forever; an id names one event within a daemon's life.
                    "INSERT OR IGNORE INTO events (id, time_ms, instance, kind, data)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(werr)?;
            for e in events {
                // EventKind is plain data: serializing it cannot fail.
                let data = serde_json::to_string(&e.kind).unwrap_or_else(|_| "{}".into());
                ins.execute(params![
                    e.id as i64,
                    e.time_ms as i64,
                    e.instance.as_str(),
                    e.kind.name(),
                    data
                ])
                .map_err(werr)?;
            }
        }
        if trim {
            let keep_after = last.id.saturating_sub(self.retention as u64);
            if keep_after > 0 {
                tx.execute("DELETE FROM events WHERE id <= ?1", [keep_after as i64])
                    .map_err(werr)?;
            }
        }
        tx.commit().map_err(werr)?;
        self.since_trim = if trim {
            0
        } else {
            self.since_trim + events.len()
        };
        self.since_checkpoint += 1;
        Ok(())
    }

    /// Whether a batch of `n` events deletes the oldest ones (see the module docs).
    fn trim_due(&self, n: usize) -> bool {
        let trim_every = (self.retention / 16).clamp(1, 4096);
        self.since_trim + n >= trim_every
    }

    /// Moves the WAL's frames into the database file (`PASSIVE`: never waits for a
    /// reader or the other writer) when [`CHECKPOINT_EVERY`] commits were made since the
    /// last one. A failure is logged and tried again after the next commit.
    fn checkpoint_if_due(&mut self) {
        if self.since_checkpoint < CHECKPOINT_EVERY {
            return;
        }
        match self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        {
            Ok(()) => self.since_checkpoint = 0,
            Err(e) => tracing::debug!("state database {}: checkpoint: {e}", self.path.display()),
        }
    }

    #[cfg(test)]
    pub(crate) fn conn_for_tests(&self) -> &Connection {
        &self.conn
    }

    fn read_err(&self, source: rusqlite::Error) -> StoreError {
        damage_or(&self.path, source, |source| StoreError::Read {
            path: self.path.clone(),
            source,
        })
    }
}

impl Sink for Store {
    fn append(&mut self, events: &[Event]) -> Result<(), StoreError> {
        Store::append(self, events)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn quick(&self, n: usize) -> bool {
        self.sync == Synchronous::Normal
            && !self.trim_due(n)
            && self.since_checkpoint < CHECKPOINT_EVERY
    }

    fn append_now(&mut self, events: &[Event]) -> Result<(), StoreError> {
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                NO_WAIT.with(|w| w.set(false));
            }
        }
        NO_WAIT.with(|w| w.set(true));
        let _reset = Reset;
        Store::append(self, events)
    }

    fn maintain(&mut self) {
        self.checkpoint_if_due();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_core::event::ExitStatus;

    fn ev(id: u64, kind: EventKind) -> Event {
        Event {
            id,
            time_ms: 1_700_000_000_000 + id,
            instance: InstanceId::parse("ns:a:web").unwrap().0,
            kind,
        }
    }

    #[test]
    fn a_commit_is_quick_without_an_fsync_a_trim_or_a_checkpoint_and_the_writer_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let full = Store::open(&dir.path().join("full.db"), 100_000, Synchronous::Full).unwrap();
        assert!(!full.quick(1), "an fsync per commit is never quick");
        let path = dir.path().join("state.db");
        // Retention 1,600: a trim every 100 events.
        let mut s = Store::open(&path, 1600, Synchronous::Normal).unwrap();
        assert!(s.quick(1));
        assert!(!s.quick(100), "a batch that trims is not quick");
        let wal = || {
            std::fs::metadata(dir.path().join("state.db-wal"))
                .map(|m| m.len())
                .unwrap_or(0)
        };
        let mut id = 0;
        while s.quick(1) {
            id += 1;
            s.append_now(&[ev(id, EventKind::Ready)]).unwrap();
            assert!(id < 10_000, "never due");
        }
        // Due: a trim, or the checkpoint after CHECKPOINT_EVERY commits.
        assert!(s.trim_due(1) || s.since_checkpoint >= CHECKPOINT_EVERY);
        let before = s.since_checkpoint;
        s.maintain();
        if before >= CHECKPOINT_EVERY {
            assert_eq!(s.since_checkpoint, 0);
        }
        // No automatic checkpoint on this connection: after CHECKPOINT_EVERY commits
        // without `maintain` the WAL holds them all; after it they are in the database and
        // the next commits reuse the WAL from its start (its size stops growing).
        for _ in 0..CHECKPOINT_EVERY * 2 {
            id += 1;
            s.append(&[ev(id, EventKind::Ready)]).unwrap();
            s.maintain();
        }
        let settled = wal();
        for _ in 0..CHECKPOINT_EVERY * 2 {
            id += 1;
            s.append(&[ev(id, EventKind::Ready)]).unwrap();
            s.maintain();
        }
        assert_eq!(wal(), settled, "the WAL kept growing: no checkpoint");
        assert_eq!(s.last_id().unwrap(), id);
    }

    #[test]
    fn a_commit_waits_for_the_other_writer_and_the_wait_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut s = Store::open(&path, 100, Synchronous::Normal).unwrap();
        // The other writer (the instance table's connection) holds the write lock.
        let mut other = Connection::open(&path).unwrap();
        share_writes(&mut other).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let (started, go) = std::sync::mpsc::channel();
        let holder = std::thread::spawn(move || {
            // Released only after the append below has met the lock.
            started.send(()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(50));
            other.execute_batch("COMMIT").unwrap();
        });
        go.recv().unwrap();
        s.append(&[ev(1, EventKind::Launched)]).unwrap();
        holder.join().unwrap();
        assert_eq!(s.count().unwrap(), 1);
        // The wait gives up (SQLITE_BUSY) once LOCK_WAIT is spent, not before.
        assert!(wait_for_lock(0));
        let last = (SHORT_TRIES + LOCK_WAIT.as_millis() as u32) as i32;
        assert!(wait_for_lock(last - 1));
        assert!(!wait_for_lock(last));
    }

    #[test]
    fn round_trips_events_and_records_the_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bulkhead.db");
        let kinds = [
            EventKind::Launched,
            EventKind::Started { pid: Some(42) },
            EventKind::Terminated {
                status: Some(ExitStatus::Signaled {
                    signal: 9,
                    core_dumped: true,
                }),
            },
        ];
        {
            let mut s = Store::open(&path, 100, Synchronous::Full).unwrap();
            assert_eq!(s.version().unwrap(), schema_version());
            let evs: Vec<Event> = kinds
                .iter()
                .enumerate()
                .map(|(i, k)| ev(i as u64 + 1, k.clone()))
                .collect();
            s.append(&evs).unwrap();
        }
        let s = Store::open(&path, 100, Synchronous::Full).unwrap();
        assert_eq!(s.last_id().unwrap(), 3);
        let back = s.tail(10).unwrap();
        assert_eq!(
            back.iter().map(|e| e.kind.clone()).collect::<Vec<_>>(),
            kinds
        );
        assert_eq!(back[1].time_ms, 1_700_000_000_002);
        assert_eq!(s.tail(2).unwrap()[0].id, 2);
        let kind: String = s
            .conn
            .query_row("SELECT kind FROM events WHERE id = 3", [], |r| r.get(0))
            .unwrap();
        assert_eq!(kind, "terminated");
    }

    #[test]
    fn retention_trims_the_oldest_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bulkhead.db");
        let mut s = Store::open(&path, 50, Synchronous::Normal).unwrap();
        for batch in 0..100u64 {
            let evs: Vec<Event> = (1..=7)
                .map(|i| ev(batch * 7 + i, EventKind::Ready))
                .collect();
            s.append(&evs).unwrap();
            // Trims are amortised: never far above the retention.
            assert!(s.count().unwrap() <= 50 + 7 + 50 / 16, "batch {batch}");
        }
        assert_eq!(s.last_id().unwrap(), 700);
        let tail = s.tail(1000).unwrap();
        assert!(tail.len() >= 50);
        assert_eq!(tail.last().unwrap().id, 700);
        assert!(tail[0].id > 700 - 60);
    }

    #[test]
    fn retention_one_keeps_the_last_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bulkhead.db");
        let mut s = Store::open(&path, 0, Synchronous::Full).unwrap();
        s.append(&[ev(1, EventKind::Ready), ev(2, EventKind::Ready)])
            .unwrap();
        assert_eq!(s.count().unwrap(), 1);
        assert_eq!(s.last_id().unwrap(), 2);
    }

    /// Regression: a 0-byte `bulkhead.db` was accepted silently: history gone, event ids
    /// from 1 again.
    #[test]
    fn a_truncated_database_is_refused_not_started_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bulkhead.db");
        {
            let mut st = Store::open(&path, 100, Synchronous::Normal).unwrap();
            st.append(&[ev(1, EventKind::Ready)]).unwrap();
        }
        std::fs::File::create(&path).unwrap(); // truncated to 0 bytes
        let err = Store::open(&path, 100, Synchronous::Normal)
            .err()
            .expect("an empty database must not open");
        let msg = err.to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("empty"),
            "{msg}"
        );
        // Still empty: nothing was started in its place.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    #[test]
    fn a_new_database_appears_whole_under_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bulkhead.db");
        drop(Store::open(&path, 100, Synchronous::Normal).unwrap());
        assert!(std::fs::metadata(&path).unwrap().len() > 0);
        assert!(!dir.path().join("bulkhead.db.new").exists());
        // And it opens again, as an existing database.
        drop(Store::open(&path, 100, Synchronous::Normal).unwrap());
    }

    #[test]
    fn a_file_that_is_not_a_database_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bulkhead.db");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let err = Store::open(&path, 100, Synchronous::Full)
            .err()
            .expect("garbage must not open");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("not a database"), "{msg}");
    }

    #[test]
    fn an_unopenable_path_names_the_file_and_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be.
        let path = dir.path().join("bulkhead.db");
        std::fs::create_dir(&path).unwrap();
        let msg = Store::open(&path, 100, Synchronous::Full)
            .err()
            .expect("a directory is not a database")
            .to_string();
        assert!(msg.starts_with("cannot open state database "), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.to_lowercase().contains("is a directory"), "{msg}");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bulkhead.db");
        drop(Store::open(&path, 100, Synchronous::Full).unwrap());
        {
            let c = Connection::open(&path).unwrap();
            c.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'schema_version'",
                [schema_version() + 1],
            )
            .unwrap();
        }
        let err = Store::open(&path, 100, Synchronous::Full).err().unwrap();
        assert!(matches!(err, StoreError::TooNew { .. }), "{err}");
    }

    #[test]
    fn a_bad_row_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bulkhead.db");
        let mut s = Store::open(&path, 100, Synchronous::Full).unwrap();
        s.append(&[ev(1, EventKind::Launched)]).unwrap();
        s.conn
            .execute(
                "INSERT INTO events VALUES (2, 0, 'ns:a:web', 'what', '{\"kind\":\"nope\"}')",
                [],
            )
            .unwrap();
        s.append(&[ev(3, EventKind::Ready)]).unwrap();
        let ids: Vec<u64> = s.tail(10).unwrap().iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![1, 3]);
        assert_eq!(s.last_id().unwrap(), 3);
    }

    /// A database cut short (the tail of the file gone, as a failed copy or a full disk
    /// leaves it) is refused as damaged, naming the file and `--fresh-state`.
    #[test]
    fn a_database_cut_short_is_refused_as_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bulkhead.db");
        {
            let mut st = Store::open(&path, 100_000, Synchronous::Normal).unwrap();
            let evs: Vec<Event> = (1..=3000)
                .map(|i| {
                    ev(
                        i,
                        EventKind::LaunchFailed {
                            reason: "x".repeat(100),
                            failure_kind: None,
                        },
                    )
                })
                .collect();
            st.append(&evs).unwrap();
            st.conn
                .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
                .unwrap();
        }
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len > 64 * 1024, "{len}");
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len / 2).unwrap();
        drop(f);
        let err = Store::open(&path, 100_000, Synchronous::Normal)
            .err()
            .expect("a database cut short must not open");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.is_bad_database());
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(
            msg.contains("damaged") && msg.contains("--fresh-state"),
            "{msg}"
        );
    }

    #[test]
    fn set_aside_moves_the_file_and_its_journal_and_keeps_the_last_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bulkhead.db");
        let mut st = Store::open(&path, 100, Synchronous::Normal).unwrap();
        st.append(&[ev(41, EventKind::Ready), ev(42, EventKind::Ready)])
            .unwrap();
        // Still open: the WAL and the shared-memory file exist beside it.
        assert!(dir.path().join("bulkhead.db-wal").exists());
        let aside = set_aside(&path).unwrap();
        drop(st);
        assert_eq!(aside.last_id, Some(42));
        let name = aside
            .moved_to
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(name.starts_with("bulkhead.db.bad-"), "{name}");
        assert!(aside.moved_to.exists());
        assert!(!path.exists());
        assert!(!dir.path().join("bulkhead.db-wal").exists());
        // A new database continues the ids after the floor, and after its own events.
        let mut st = Store::open(&path, 100, Synchronous::Normal).unwrap();
        assert_eq!(st.last_id().unwrap(), 0);
        st.set_id_floor(42).unwrap();
        assert_eq!(st.last_id().unwrap(), 42);
        st.append(&[ev(43, EventKind::Ready)]).unwrap();
        assert_eq!(st.last_id().unwrap(), 43);
        // A second set-aside in the same second gets a name of its own.
        drop(st);
        let again = set_aside(&path).unwrap();
        assert_ne!(again.moved_to, aside.moved_to);
        assert_eq!(again.last_id, Some(43));
        // Garbage shows no id.
        std::fs::write(&path, vec![7u8; 4096]).unwrap();
        assert_eq!(set_aside(&path).unwrap().last_id, None);
    }

    #[test]
    fn a_batch_written_twice_is_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bulkhead.db");
        let mut st = Store::open(&path, 100, Synchronous::Normal).unwrap();
        let batch = [ev(1, EventKind::Launched), ev(2, EventKind::Ready)];
        st.append(&batch).unwrap();
        st.append(&batch).unwrap();
        assert_eq!(st.count().unwrap(), 2);
    }
}
