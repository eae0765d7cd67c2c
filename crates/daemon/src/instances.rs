//! The instance table: what the daemon must know about every instance that is not final,
//! kept in the state database (`instances`, schema version 2) next to the events.
//!
//! One row per instance: the spec as launched, its folder, its main pid and that process's
//! start time (so that a reused pid cannot pass for it), its state, restart count, breaker
//! state and failure count, and its lease holders. The instance actor hands a snapshot to
//! [`InstanceTable::put`] after every change and [`InstanceTable::remove`] once the
//! instance is final; a writer thread with its own connection coalesces what is queued
//! (latest snapshot per id wins) into one transaction. The writes are off the launch path:
//! liveness itself comes from the keeper (pidfd, exit status), and the table says what to
//! restore around it. A row may lag the instance by one commit after a daemon crash, and
//! no intent depends on that lag: a termination is its `terminating` event
//! (`Shared::stops_in_progress`), the restart count is the higher of table and event log,
//! and a lease change commits before its answer ([`InstanceTable::set_leases`]).
//!
//! On start-up [`load`] returns the rows; the daemon adopts the instances the keeper still
//! holds (restoring counters and leases), resumes those that were waiting between runs,
//! and reports the others as lost (their process died unseen, e.g. with their keeper) so
//! that their restart policy applies.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Mutex;

use rusqlite::{params, Connection, OpenFlags};

/// The stored state of one instance.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRow {
    pub id: String,
    /// The workload spec as launched (JSON).
    pub spec: String,
    pub dir: PathBuf,
    pub pid: Option<u32>,
    /// The main process's start time in clock ticks after boot (`/proc/<pid>/stat`).
    pub start_time: Option<u64>,
    pub state: String,
    pub restarts: u32,
    pub breaker: String,
    pub consecutive_failures: u32,
    pub leases: Vec<String>,
    pub updated_ms: u64,
}

enum Op {
    Put(Box<InstanceRow>),
    Remove(String),
    /// An instance's lease holders, answered once committed (a release is recorded
    /// before it is acknowledged).
    Leases(String, Vec<String>, tokio::sync::oneshot::Sender<()>),
}

/// What the writer holds until its next commit: the latest operation per id wins.
#[derive(Default)]
struct Pending {
    rows: HashMap<String, Option<Box<InstanceRow>>>,
    leases: HashMap<String, Vec<String>>,
    acks: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.leases.is_empty() && self.acks.is_empty()
    }

    fn take(&mut self, op: Op) {
        match op {
            Op::Put(row) => {
                self.rows.insert(row.id.clone(), Some(row));
            }
            Op::Remove(id) => {
                self.leases.remove(&id);
                self.rows.insert(id, None);
            }
            Op::Leases(id, leases, done) => {
                self.leases.insert(id, leases);
                self.acks.push(done);
            }
        }
    }

    fn len(&self) -> usize {
        self.rows.len() + self.leases.len()
    }
}

/// The instance table's writer.
pub struct InstanceTable {
    tx: Mutex<Option<mpsc::Sender<Op>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The table could not be opened or read.
#[derive(Debug, thiserror::Error)]
#[error("cannot use the instance table of {path}: {source}")]
pub struct TableError {
    pub path: PathBuf,
    #[source]
    pub source: rusqlite::Error,
}

fn connect(path: &Path) -> Result<Connection, TableError> {
    let err = |source| TableError {
        path: path.to_owned(),
        source,
    };
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(err)?;
    // The event writer commits on its own connection: wait for its short transactions.
    crate::store::share_writes(&mut conn).map_err(err)?;
    conn.execute_batch("PRAGMA synchronous = NORMAL")
        .map_err(err)?;
    Ok(conn)
}

/// Every stored row. The database must already be migrated (the event store does it).
pub fn load(path: &Path) -> Result<Vec<InstanceRow>, TableError> {
    let conn = connect(path)?;
    let err = |source| TableError {
        path: path.to_owned(),
        source,
    };
    let mut stmt = conn
        .prepare(
            "SELECT id, spec, dir, pid, start_time, state, restarts, breaker, consecutive_failures, leases, updated_ms
             FROM instances ORDER BY id",
        )
        .map_err(err)?;
    let rows = stmt
        .query_map([], |r| {
            let leases: String = r.get(9)?;
            Ok(InstanceRow {
                id: r.get(0)?,
                spec: r.get(1)?,
                dir: PathBuf::from(r.get::<_, String>(2)?),
                pid: r.get(3)?,
                start_time: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                state: r.get(5)?,
                restarts: r.get(6)?,
                breaker: r.get(7)?,
                consecutive_failures: r.get(8)?,
                leases: serde_json::from_str(&leases).unwrap_or_default(),
                updated_ms: r.get::<_, i64>(10)? as u64,
            })
        })
        .map_err(err)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(err)
}

impl InstanceTable {
    /// Starts the writer for the database at `path`.
    pub fn open(path: &Path) -> Result<InstanceTable, TableError> {
        let conn = connect(path)?;
        let (tx, rx) = mpsc::channel::<Op>();
        let shown = path.display().to_string();
        let writer = std::thread::Builder::new()
            .name("bulkhead-instances".into())
            .spawn(move || write_loop(conn, rx, &shown))
            .map_err(|e| TableError {
                path: path.to_owned(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        Ok(InstanceTable {
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
        })
    }

    fn send(&self, op: Op) {
        if let Some(tx) = self.tx.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = tx.send(op);
        }
    }

    /// Records an instance's current state.
    pub fn put(&self, row: InstanceRow) {
        self.send(Op::Put(Box::new(row)));
    }

    /// Forgets an instance that is final.
    pub fn remove(&self, id: &str) {
        self.send(Op::Remove(id.to_owned()));
    }

    /// Records an instance's lease holders now; resolves once they are committed (never,
    /// while the state directory cannot be written: the caller bounds its wait).
    pub async fn set_leases(&self, id: &str, leases: Vec<String>) -> Result<(), ()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Op::Leases(id.to_owned(), leases, tx));
        rx.await.map_err(|_| ())
    }

    /// Writes what is queued and stops the writer.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = w.join();
        }
    }
}

impl Drop for InstanceTable {
    fn drop(&mut self) {
        self.close();
    }
}

fn write_loop(mut conn: Connection, rx: mpsc::Receiver<Op>, shown: &str) {
    // Coalesced: the latest operation per id wins. What a failed write held stays here
    // (newer operations replace it) and is tried again: a row or a removal is never
    // dropped because the state directory was full for a while.
    let mut pending = Pending::default();
    let mut failing = false;
    let take = |pending: &mut Pending, op: Op| pending.take(op);
    loop {
        let open = if pending.is_empty() {
            match rx.recv() {
                Ok(op) => {
                    take(&mut pending, op);
                    true
                }
                Err(_) => false,
            }
        } else {
            // Failing: the next try waits, gathering what arrives meanwhile.
            let due = std::time::Instant::now() + crate::events::RETRY_EVERY;
            loop {
                match rx.recv_timeout(due.saturating_duration_since(std::time::Instant::now())) {
                    Ok(op) => take(&mut pending, op),
                    Err(mpsc::RecvTimeoutError::Timeout) => break true,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break false,
                }
            }
        };
        let open = open
            && loop {
                match rx.try_recv() {
                    Ok(op) => take(&mut pending, op),
                    Err(mpsc::TryRecvError::Empty) => break true,
                    Err(mpsc::TryRecvError::Disconnected) => break false,
                }
            };
        match write_batch(&mut conn, &pending) {
            Ok(()) => {
                if failing {
                    tracing::info!("instance table of {shown}: written again");
                }
                failing = false;
                for done in pending.acks.drain(..) {
                    let _ = done.send(());
                }
                pending = Pending::default();
            }
            Err(e) if !failing => {
                failing = true;
                tracing::error!(
                    "instance table of {shown}: {e}; {} rows wait and are tried again every {} ms",
                    pending.len(),
                    crate::events::RETRY_EVERY.as_millis()
                );
            }
            Err(e) => tracing::debug!("instance table of {shown}: {e}"),
        }
        if !open {
            if !pending.is_empty() {
                tracing::error!(
                    "instance table of {shown}: {} rows were not written before the daemon stopped",
                    pending.len()
                );
            }
            return;
        }
    }
}

fn write_batch(conn: &mut Connection, pending: &Pending) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    for (id, op) in &pending.rows {
        match op {
            None => {
                tx.execute("DELETE FROM instances WHERE id = ?1", [id])?;
            }
            Some(r) => {
                tx.execute(
                    "INSERT INTO instances (id, spec, dir, pid, start_time, state, restarts, breaker, consecutive_failures, leases, updated_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                     ON CONFLICT (id) DO UPDATE SET spec = excluded.spec, dir = excluded.dir, pid = excluded.pid,
                       start_time = excluded.start_time, state = excluded.state, restarts = excluded.restarts,
                       breaker = excluded.breaker, consecutive_failures = excluded.consecutive_failures,
                       leases = excluded.leases, updated_ms = excluded.updated_ms",
                    params![
                        r.id,
                        r.spec,
                        r.dir.display().to_string(),
                        r.pid,
                        r.start_time.map(|v| v as i64),
                        r.state,
                        r.restarts,
                        r.breaker,
                        r.consecutive_failures,
                        serde_json::to_string(&r.leases).unwrap_or_else(|_| "[]".into()),
                        r.updated_ms as i64,
                    ],
                )?;
            }
        }
    }
    // After the rows: a lease change is newer than any row queued with it.
    for (id, leases) in &pending.leases {
        tx.execute(
            "UPDATE instances SET leases = ?1 WHERE id = ?2",
            params![
                serde_json::to_string(leases).unwrap_or_else(|_| "[]".into()),
                id
            ],
        )?;
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, restarts: u32) -> InstanceRow {
        InstanceRow {
            id: id.into(),
            spec: "{}".into(),
            dir: "/w".into(),
            pid: Some(42),
            start_time: Some(7),
            state: "ready".into(),
            restarts,
            breaker: "closed".into(),
            consecutive_failures: 1,
            leases: vec!["alice".into()],
            updated_ms: 5,
        }
    }

    #[test]
    fn rows_round_trip_and_latest_wins() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("bulkhead.db");
        let _store = crate::store::Store::open(&db, 10, crate::store::Synchronous::Normal).unwrap();
        let t = InstanceTable::open(&db).unwrap();
        t.put(row("ns:a:w", 1));
        t.put(row("ns:a:w", 2));
        t.put(row("ns:b:w", 0));
        t.remove("ns:b:w");
        t.close();
        let rows = load(&db).unwrap();
        assert_eq!(rows, vec![row("ns:a:w", 2)]);
    }

    /// A write that fails (the state directory full) keeps its rows and is tried again:
    /// nothing is dropped, and the latest operation per id still wins.
    #[test]
    fn a_failed_write_is_kept_and_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("bulkhead.db");
        let _store = crate::store::Store::open(&db, 10, crate::store::Synchronous::Normal).unwrap();
        let c = Connection::open(&db).unwrap();
        // Writes to the table fail while `broken` has a row.
        c.execute_batch(
            "CREATE TABLE broken (x INTEGER);
             INSERT INTO broken VALUES (1);
             CREATE TRIGGER fail BEFORE INSERT ON instances
             WHEN EXISTS (SELECT 1 FROM broken)
             BEGIN SELECT RAISE(ABORT, 'database or disk is full (test)'); END;",
        )
        .unwrap();
        let t = InstanceTable::open(&db).unwrap();
        t.put(row("ns:a:w", 1));
        t.put(row("ns:b:w", 1));
        // Give the writer time to fail at least once.
        std::thread::sleep(crate::events::RETRY_EVERY);
        assert_eq!(load(&db).unwrap(), vec![]);
        t.put(row("ns:a:w", 2));
        t.remove("ns:b:w");
        c.execute("DELETE FROM broken", []).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while load(&db).unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        t.close();
        assert_eq!(load(&db).unwrap(), vec![row("ns:a:w", 2)]);
    }
}
