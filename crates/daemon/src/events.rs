//! The event log: every lifecycle change, with a monotonic id, made durable in the state
//! database, kept in memory and fanned out to watchers.
//!
//! Ids start at 1 and continue after a daemon restart (they go on from the newest stored
//! event). The last [`RETAIN`] events are kept in memory (loaded from the database at
//! start-up too) so that a watcher that connects late, or reconnects with `since`, gets
//! the history first.
//!
//! # Durability: group commit, then publication
//!
//! [`EventLog::open`] starts one writer thread; the SQLite connection ([`crate::store`])
//! sits behind a lock, and whoever holds it commits. [`EventLog::publish`] assigns the
//! id, queues the event, rings the writer and returns at once. A committer takes
//! everything queued, commits it in one transaction, and only then appends the batch to
//! the in-memory ring and broadcasts it, in id order, and raises the durable watermark
//! that [`EventLog::wait_durable`] waits on. There is no timer in the batching: an event
//! waits for at most the commit in progress and its own (with `synchronous=NORMAL` tens
//! of microseconds each; with `FULL` one fsync each, about 1 ms here).
//!
//! The committer is usually not the writer thread: a task that waits for its event
//! commits everything queued itself when nobody else is committing and the commit is
//! short (`synchronous=NORMAL`, no trim or checkpoint due: [`Sink::quick`]), without
//! waiting for the other connection's write lock. On a launch's path that saves waking
//! the writer thread and being woken by it (`docs/benchmarks.md`, "The `ready` commit on
//! the waiter's thread"). Anything else (an fsync, a trim, a checkpoint, a busy lock, a
//! failure) is the writer thread's, which the publish has already rung. A disk that
//! stalls a write stalls at most one runtime thread (one commit at a time, and the other
//! waiters only `try_lock`): waiters commit only on a multi-thread runtime with two
//! workers or more, and not for [`SLOW_PAUSE`] after a commit that took longer than
//! [`SLOW_COMMIT`]. So:
//!
//! - **no client sees an event that is not durable**: history, live stream and
//!   [`EventLog::last_id`] only ever contain committed events;
//! - concurrent publishers share commits instead of waiting for one each;
//! - the instance actor waits for its last event to be durable before it changes the View,
//!   so a client that sees a state finds its event, also after a restart.
//!
//! # When the state directory cannot be written
//!
//! A commit that fails (ENOSPC, EIO, a read-only file system) is tried twice more at
//! once; then the log is *failing*: [`EventLog::fault`] says why (the daemon refuses
//! requests that would need a new event, `health` says degraded, `/ready` answers 503),
//! the events wait in memory, in id order, invisible (at most [`MAX_HELD`]; beyond that
//! the oldest are dropped with an error), and the writer tries them again every
//! [`RETRY_EVERY`]. The first commit that succeeds publishes them all and clears the
//! fault: the daemon recovers by itself. Meanwhile an actor whose event waits does not
//! move on (its View and its next step wait for the commit), except during a shutdown
//! ([`EventLog::stop_waiting`]), which must not hang on a full disk.
//!
//! # Ids are never reused
//!
//! An id is assigned at publish but becomes visible only with its committed event, and
//! the writer commits in id order. An event that was never stored (the daemon was killed
//! while it waited, or it was dropped beyond [`MAX_HELD`]) was never seen by anyone, so
//! the next daemon, which continues after the newest *stored* id, can give its id to
//! another event without any client seeing one id name two events. Events published
//! after [`EventLog::close`] are not stored and not shown (logged).
//!
//! [`EventLog::new`] is the in-memory log (tests, benchmarks, `durable_events = false`):
//! the same API, publish makes the event visible at once.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bulkhead_core::event::{Event, EventKind};
use bulkhead_core::key::InstanceId;
use tokio::sync::{broadcast, watch};

use crate::store::{Sink, Store, StoreError, Synchronous};
use std::sync::TryLockError;

/// How many events are kept in memory.
pub const RETAIN: usize = 10_000;

/// The most events committed in one transaction.
const MAX_BATCH: usize = 4096;

/// How often the writer tries again to store the events that wait, while it fails.
pub const RETRY_EVERY: Duration = Duration::from_millis(500);

/// Quick attempts for a commit before the log counts as failing (a transient error).
const QUICK_RETRIES: &[Duration] = &[Duration::from_millis(20), Duration::from_millis(100)];

/// Events waiting in memory for the store, at most (the oldest are dropped beyond).
pub const MAX_HELD: usize = 100_000;

/// A commit on a waiter's thread that takes longer than this (the disk is slow)...
const SLOW_COMMIT: Duration = Duration::from_millis(2);

/// ...leaves the commits to the writer thread for this long.
const SLOW_PAUSE: Duration = Duration::from_secs(10);

/// The state directory cannot be written: why, since when, and how much waits.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("state directory {dir} cannot be written: {cause} (events waiting in memory: {held}; retried every {} ms)", RETRY_EVERY.as_millis())]
pub struct StoreFault {
    /// The state directory (the database's folder).
    pub dir: PathBuf,
    /// The store's error, with what the operating system says about a test write.
    pub cause: String,
    /// Events waiting to be stored.
    pub held: usize,
    /// Since when it fails (wall clock, ms).
    pub since_ms: u64,
}

pub struct EventLog {
    core: Arc<Core>,
    /// Whether events go through the writer (and so wait for their commit).
    durable: bool,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// Where the writer is, for the waiters.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    /// The highest committed id.
    durable: u64,
    /// The last commit failed (see [`StoreFault`]).
    failing: bool,
    /// A shutdown: waiters stop waiting for a failing store.
    give_up: bool,
    /// The writer has ended: nothing more will be committed.
    closed: bool,
}

/// What the publishers and the committers share.
struct Core {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Event>,
    progress: watch::Sender<Progress>,
    /// Why the store cannot be written, until a commit succeeds again.
    fault: Mutex<Option<StoreFault>>,
    /// The store and what waits for it; whoever holds this lock commits (lock order:
    /// this one, then `inner`).
    commit: Mutex<Committer>,
}

struct Inner {
    next_id: u64,
    /// The newest id clients can see (committed, in the ring, broadcast).
    visible: u64,
    ring: VecDeque<Event>,
    /// Published, not yet taken by a committer, in id order.
    queued: VecDeque<Event>,
    /// Rings the writer thread; `None`: in memory only, or closed.
    bell: Option<mpsc::SyncSender<()>>,
}

/// A watcher fell so far behind that events it has not seen are no longer kept.
#[derive(Debug, thiserror::Error)]
#[error("events after id {after} are no longer kept (the log keeps the last {RETAIN}); resubscribe from a later id")]
pub struct Lost {
    pub after: u64,
}

impl Default for EventLog {
    fn default() -> Self {
        Self::new()
    }
}

impl Core {
    fn new(
        next_id: u64,
        history: Vec<Event>,
        bell: Option<mpsc::SyncSender<()>>,
        sink: Option<Box<dyn Sink>>,
    ) -> Core {
        let (tx, _) = broadcast::channel(4096);
        let visible = next_id - 1;
        let skip = history.len().saturating_sub(RETAIN);
        let mut ring = VecDeque::with_capacity(RETAIN.min(history.len().max(1024)));
        ring.extend(history.into_iter().skip(skip));
        let (progress, _) = watch::channel(Progress {
            durable: visible,
            ..Progress::default()
        });
        Core {
            inner: Mutex::new(Inner {
                next_id,
                visible,
                ring,
                queued: VecDeque::new(),
                bell,
            }),
            tx,
            progress,
            fault: Mutex::new(None),
            commit: Mutex::new(Committer {
                sink,
                held: VecDeque::new(),
                failing_since: None,
                slow_until: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn committer(&self) -> MutexGuard<'_, Committer> {
        self.commit.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the writer thread (at most one ring waits: it takes everything queued).
    fn ring(&self) {
        if let Some(bell) = &self.lock().bell {
            let _ = bell.try_send(());
        }
    }

    /// Commits what is queued on the caller's thread, when nobody else is committing, the
    /// log is healthy and the sink says the commit is short; never waits for a lock.
    /// Anything else is left to the writer thread, rung here if it has to be.
    fn commit_here(&self) {
        let mut c = match self.commit.try_lock() {
            Ok(c) => c,
            // Another commit runs (it or the writer's next one takes ours), or the writer
            // died holding the lock (its `Finish` tells the waiters).
            Err(TryLockError::WouldBlock | TryLockError::Poisoned(_)) => return,
        };
        if c.failing_since.is_some() {
            return;
        }
        if c.slow_until.is_some_and(|t| Instant::now() < t) {
            drop(c);
            self.ring();
            return;
        }
        c.take(self);
        let n = c.held.len();
        if n == 0 {
            return;
        }
        let c = &mut *c;
        let Some(sink) = c.sink.as_mut() else { return };
        if n > MAX_BATCH || !sink.quick(n) {
            self.ring();
            return;
        }
        let batch: Vec<Event> = c.held.iter().cloned().collect();
        let t0 = Instant::now();
        let result = sink.append_now(&batch);
        let took = t0.elapsed();
        if took > SLOW_COMMIT {
            tracing::debug!(
                "an event commit on a waiter's thread took {} ms: the writer thread commits \
                 for the next {} s",
                took.as_millis(),
                SLOW_PAUSE.as_secs()
            );
            c.slow_until = Some(Instant::now() + SLOW_PAUSE);
        }
        match result {
            Ok(()) => {
                c.held.clear();
                self.committed(&batch);
            }
            Err(e) => {
                // Busy (the instance table's commit) or failing: the writer thread tries
                // again, with its retries and its fault report.
                tracing::debug!("event commit on a waiter's thread: {e}; left to the writer");
                self.ring();
            }
        }
    }

    /// A batch is committed: shown, then the watermark raised.
    fn committed(&self, batch: &[Event]) {
        {
            let mut inner = self.lock();
            self.release(&mut inner, batch);
        }
        // After the release: whoever sees the watermark finds the events in the ring.
        let last = batch.last().map_or(0, |e| e.id);
        self.progress.send_modify(|p| p.durable = last);
    }

    fn set_fault(&self, f: Option<StoreFault>) {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = f;
    }

    /// Makes events visible: ring + broadcast, in id order. The caller holds the lock that
    /// `subscribe` takes, so a subscriber gets each event exactly once, either in its
    /// history or on its receiver.
    fn release<'a>(&self, inner: &mut Inner, events: impl IntoIterator<Item = &'a Event>) {
        for e in events {
            if inner.ring.len() == RETAIN {
                inner.ring.pop_front();
            }
            inner.ring.push_back(e.clone());
            inner.visible = e.id;
            // No receiver is fine.
            let _ = self.tx.send(e.clone());
        }
    }
}

impl EventLog {
    /// The in-memory log: nothing survives the daemon.
    pub fn new() -> EventLog {
        EventLog {
            core: Arc::new(Core::new(1, Vec::new(), None, None)),
            durable: false,
            writer: Mutex::new(None),
        }
    }

    /// Opens the durable log at `path` (the state database), keeping at most `retention`
    /// events in it. Ids continue after the newest stored event; the newest [`RETAIN`]
    /// stored events are the initial history.
    pub fn open(path: &Path, retention: usize) -> Result<EventLog, StoreError> {
        Self::open_with(path, retention, Synchronous::Full)
    }

    /// [`EventLog::open`] with a choice of how hard commits go to the disk.
    pub fn open_with(
        path: &Path,
        retention: usize,
        sync: Synchronous,
    ) -> Result<EventLog, StoreError> {
        Self::from_store(Store::open(path, retention, sync)?)
    }

    /// [`EventLog::open_with`], and with `fresh` (`bulkhead serve --fresh-state`) a bad
    /// database (empty, damaged, newer schema: [`StoreError::is_bad_database`]) is moved
    /// aside ([`crate::store::set_aside`]) and a new one started, its ids continuing after
    /// the newest one the old file still shows. Without `fresh` a bad database is an error.
    pub fn open_or_fresh(
        path: &Path,
        retention: usize,
        sync: Synchronous,
        fresh: bool,
    ) -> Result<EventLog, StoreError> {
        match Self::open_with(path, retention, sync) {
            Err(e) if fresh && e.is_bad_database() => {
                let aside = crate::store::set_aside(path)?;
                tracing::warn!(
                    "{e}\n--fresh-state: moved it to {} and started a new state database; \
                     event ids continue after {}",
                    aside.moved_to.display(),
                    aside.last_id.unwrap_or(0)
                );
                let mut store = Store::open(path, retention, sync)?;
                if let Some(id) = aside.last_id {
                    store.set_id_floor(id)?;
                }
                Self::from_store(store)
            }
            r => r,
        }
    }

    fn from_store(store: Store) -> Result<EventLog, StoreError> {
        let path = store.path().to_owned();
        let last = store.last_id()?;
        let history = store.tail(RETAIN)?;
        tracing::debug!(
            "event log {}: {} events loaded, next id {}",
            path.display(),
            history.len(),
            last + 1
        );
        Self::start(Box::new(store), last, history)
    }

    /// A log whose commits go to `sink`, which already holds events up to `last`.
    pub(crate) fn start(
        sink: Box<dyn Sink>,
        last: u64,
        history: Vec<Event>,
    ) -> Result<EventLog, StoreError> {
        let (bell, rung) = mpsc::sync_channel::<()>(1);
        let name = sink.describe();
        let core = Arc::new(Core::new(last + 1, history, Some(bell), Some(sink)));
        let writer = {
            let core = core.clone();
            let thread_name = name.clone();
            std::thread::Builder::new()
                .name("bulkhead-events".into())
                .spawn(move || write_loop(core, rung, &thread_name))
                .map_err(|source| StoreError::Thread {
                    path: name.into(),
                    source,
                })?
        };
        Ok(EventLog {
            core,
            durable: true,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Stamps an event with the next id and publishes it: at once for the in-memory log,
    /// after its commit for the durable one (see the module docs). Never blocks on I/O.
    pub fn publish(&self, instance: &InstanceId, kind: EventKind) -> Event {
        let mut inner = self.core.lock();
        let event = Event {
            id: inner.next_id,
            time_ms: now_ms(),
            instance: instance.clone(),
            kind,
        };
        inner.next_id += 1;
        if !self.durable {
            // In memory: visible now, in id order because nothing else can release while
            // we hold the lock.
            self.core.release(&mut inner, std::iter::once(&event));
            return event;
        }
        // Ids are assigned and queued under one lock, so committers take them in id order;
        // they are released only after their commit. The ring comes after the queueing:
        // a writer woken by it finds the event.
        let queued = inner.bell.is_some();
        if queued {
            inner.queued.push_back(event.clone());
            if let Some(bell) = &inner.bell {
                let _ = bell.try_send(());
            }
        }
        if !queued {
            // Closed (or the writer is gone): never stored, so never shown.
            tracing::warn!(
                "event {} ({} of {}) comes after the event log closed: not stored, not shown",
                event.id,
                event.kind.name(),
                event.instance
            );
        }
        event
    }

    /// Resolves once every event up to `id` is committed. At once for the in-memory log
    /// and once the writer has ended ([`EventLog::close`]); during a shutdown
    /// ([`EventLog::stop_waiting`]) also while the store is failing.
    ///
    /// When nobody else is committing and the commit is short, the caller commits
    /// everything queued itself (blocking its thread for that commit, tens of
    /// microseconds; see the module docs).
    pub async fn wait_durable(&self, id: u64) {
        if !self.durable {
            return;
        }
        let mut rx = self.core.progress.subscribe();
        if rx.borrow().durable < id && may_block_briefly() {
            self.core.commit_here();
        }
        let _ = rx
            .wait_for(|p| p.durable >= id || p.closed || (p.give_up && p.failing))
            .await;
    }

    /// Resolves once the store is failing (see [`EventLog::fault`]), with why. Never for
    /// the in-memory log.
    pub async fn failing(&self) -> StoreFault {
        let mut rx = self.core.progress.subscribe();
        loop {
            if rx.wait_for(|p| p.failing).await.is_err() {
                return std::future::pending().await;
            }
            if let Some(f) = self.fault() {
                return f;
            }
            // Cleared in between: wait for the next failure.
            if rx.wait_for(|p| !p.failing).await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// A shutdown begins: [`EventLog::wait_durable`] no longer waits for a store that is
    /// failing (the events still wait for their commit, and get one last try at close).
    pub fn stop_waiting(&self) {
        self.core.progress.send_modify(|p| p.give_up = true);
    }

    /// Why the state directory cannot be written, while commits fail.
    pub fn fault(&self) -> Option<StoreFault> {
        self.core
            .fault
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The id of the newest event clients can see (committed), 0 if none.
    pub fn last_id(&self) -> u64 {
        self.core.lock().visible
    }

    /// History after `since` and a receiver for everything newer, with no gap between.
    pub fn subscribe(&self, since: u64) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let inner = self.core.lock();
        let history = inner
            .ring
            .iter()
            .filter(|e| e.id > since)
            .cloned()
            .collect();
        // Subscribing while holding the lock under which events are appended to the ring
        // and broadcast (`Core::release`): none can be released in between.
        (history, self.core.tx.subscribe())
    }

    /// Events after `since` that are still kept; for a watcher that lagged behind.
    pub fn since(&self, since: u64) -> Result<Vec<Event>, Lost> {
        let inner = self.core.lock();
        match inner.ring.front() {
            Some(first) if first.id > since + 1 => Err(Lost { after: since }),
            _ => Ok(inner
                .ring
                .iter()
                .filter(|e| e.id > since)
                .cloned()
                .collect()),
        }
    }

    /// Commits everything queued (one last try if the store is failing) and stops the
    /// writer. Later events are neither stored nor shown. Blocks for at most one commit;
    /// idempotent. Also done on drop.
    pub fn close(&self) {
        // Dropping the bell ends the writer once it has committed what is queued.
        self.core.lock().bell.take();
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = writer {
            if w.join().is_err() {
                tracing::error!("the event writer thread panicked");
            }
        }
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// Whatever way the writer ends (a panic too): waiters stop waiting, and a log whose
/// writer is gone says so.
struct Finish(Arc<Core>, PathBuf);

impl Drop for Finish {
    fn drop(&mut self) {
        self.0.lock().bell = None;
        // The store is closed with the writer (a waiter no longer commits).
        let sink = match self.0.commit.lock() {
            Ok(mut c) => c.sink.take(),
            Err(poisoned) => poisoned.into_inner().sink.take(),
        };
        drop(sink);
        if std::thread::panicking() {
            // Nothing will be stored any more: say so rather than report healthy.
            self.0.set_fault(Some(StoreFault {
                dir: self.1.clone(),
                cause: "the event writer thread panicked; restart the daemon".into(),
                held: 0,
                since_ms: now_ms(),
            }));
            self.0.progress.send_modify(|p| p.failing = true);
        }
        self.0.progress.send_modify(|p| p.closed = true);
    }
}

/// The writer thread: group commit, then release. While commits fail, the events wait in
/// `held` and are tried again every [`RETRY_EVERY`]. Ends when the bell's sender is
/// dropped and everything queued is committed (or tried one last time).
fn write_loop(core: Arc<Core>, rung: mpsc::Receiver<()>, name: &str) {
    let dir = PathBuf::from(name)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let _finish = Finish(core.clone(), dir);
    let mut last_try = Instant::now();
    loop {
        let (failing, idle) = {
            let c = core.committer();
            (c.failing_since.is_some(), c.held.is_empty())
        };
        let open = if failing {
            // Failing: gather what arrives until the next try is due.
            let due = last_try + RETRY_EVERY;
            loop {
                match rung.recv_timeout(due.saturating_duration_since(Instant::now())) {
                    Ok(()) => continue,
                    Err(mpsc::RecvTimeoutError::Timeout) => break true,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break false,
                }
            }
        } else if idle {
            // Wait for a ring; what is queued meanwhile shares the next commit.
            rung.recv().is_ok()
        } else {
            // A waiter left its batch to this thread (busy, or not short).
            true
        };
        {
            let mut c = core.committer();
            c.take(&core);
            c.bound();
            c.flush(&core);
            if let Some(sink) = c.sink.as_mut() {
                sink.maintain();
            }
        }
        last_try = Instant::now();
        if !open {
            break;
        }
    }
    let c = core.committer();
    if let Some(first) = c.held.front() {
        let last = c.held.back().map_or(0, |e| e.id);
        tracing::error!(
            "event store {name}: events {}..={last} were never stored (the daemon stops while \
             the state directory cannot be written); no client saw them",
            first.id
        );
    }
}

/// The store and the events taken from the queue that are not committed yet.
struct Committer {
    /// `None` once the writer has ended: nothing is committed any more.
    sink: Option<Box<dyn Sink>>,
    /// Taken from the queue, not yet committed, in id order.
    held: VecDeque<Event>,
    /// Set while commits fail (wall clock, ms).
    failing_since: Option<u64>,
    /// Waiters leave the commits to the writer thread until then (see [`SLOW_COMMIT`]).
    slow_until: Option<Instant>,
}

impl Committer {
    /// Moves everything queued into `held`.
    fn take(&mut self, core: &Core) {
        let mut inner = core.lock();
        self.held.extend(inner.queued.drain(..));
    }

    fn describe(&self) -> String {
        self.sink.as_ref().map(|s| s.describe()).unwrap_or_default()
    }

    /// At most [`MAX_HELD`] events wait; the oldest go first (never shown, see the
    /// module docs on ids).
    fn bound(&mut self) {
        if self.held.len() <= MAX_HELD {
            return;
        }
        let drop = self.held.len() - MAX_HELD;
        let first = self.held[0].id;
        let last = self.held[drop - 1].id;
        self.held.drain(..drop);
        tracing::error!(
            "event store {}: more than {MAX_HELD} events wait for the state directory; \
             events {first}..={last} are dropped, never stored nor shown",
            self.describe()
        );
    }

    /// Commits `held` in batches of at most [`MAX_BATCH`], releasing each after its
    /// commit. Stops at the first batch that fails.
    fn flush(&mut self, core: &Core) {
        while !self.held.is_empty() {
            let n = self.held.len().min(MAX_BATCH);
            let batch: Vec<Event> = self.held.range(..n).cloned().collect();
            if let Err(e) = self.commit(&batch) {
                self.fail(core, e);
                return;
            }
            self.held.drain(..n);
            // Writable again: the fault goes before anything is shown, so whoever sees
            // the events (or the watermark) finds the daemon healthy.
            if let Some(since) = self.failing_since.take() {
                tracing::info!(
                    "event store {}: writable again after {} ms; the events that waited are \
                     stored and shown",
                    self.describe(),
                    now_ms().saturating_sub(since)
                );
                core.set_fault(None);
                core.progress.send_modify(|p| p.failing = false);
            }
            core.committed(&batch);
        }
    }

    /// One commit; when the store was healthy, a failure is tried again at once a few
    /// times before it counts (a transient error is not a fault).
    fn commit(&mut self, batch: &[Event]) -> Result<(), StoreError> {
        let healthy = self.failing_since.is_none();
        let Some(sink) = self.sink.as_mut() else {
            return Ok(());
        };
        let mut result = sink.append(batch);
        if healthy {
            for pause in QUICK_RETRIES {
                let Err(e) = &result else { break };
                tracing::warn!("{e} (trying again)");
                std::thread::sleep(*pause);
                result = sink.append(batch);
            }
        }
        result
    }

    fn fail(&mut self, core: &Core, e: StoreError) {
        let db = PathBuf::from(self.describe());
        let dir = db.parent().map(Path::to_path_buf).unwrap_or_default();
        let since_ms = *self.failing_since.get_or_insert_with(now_ms);
        let fault = StoreFault {
            cause: cause(&e, &dir),
            dir,
            held: self.held.len(),
            since_ms,
        };
        if core
            .fault
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
            tracing::error!(
                "{fault}; requests that need a new event are refused until it can be written"
            );
        } else {
            tracing::debug!("{fault}");
        }
        core.set_fault(Some(fault));
        core.progress.send_modify(|p| p.failing = true);
    }
}

/// The store's error, and what the operating system says when a small file is written
/// beside the database (SQLite says "database or disk is full"; the OS says which).
fn cause(e: &StoreError, dir: &Path) -> String {
    if !dir.is_dir() {
        return e.to_string();
    }
    let probe = dir.join(".bulkhead-write-probe");
    let os =
        std::fs::write(&probe, [0u8; 4096]).and_then(|()| std::fs::File::open(&probe)?.sync_all());
    let _ = std::fs::remove_file(&probe);
    match os {
        Err(os) => format!("{e} ({os})"),
        Ok(()) => e.to_string(),
    }
}

/// Whether the caller may block its thread for a short commit: a runtime thread of a
/// multi-thread runtime with another worker (a stalled disk then stalls one of them, not
/// the daemon), or a thread outside any runtime.
fn may_block_briefly() -> bool {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
                && h.metrics().num_workers() >= 2
        }
        Err(_) => true,
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    fn id() -> InstanceId {
        InstanceId::parse("shared:w").unwrap().0
    }

    #[test]
    fn ids_are_monotonic_and_history_meets_live() {
        let log = EventLog::new();
        for _ in 0..5 {
            log.publish(&id(), EventKind::Launched);
        }
        let (hist, mut rx) = log.subscribe(2);
        assert_eq!(hist.iter().map(|e| e.id).collect::<Vec<_>>(), vec![3, 4, 5]);
        log.publish(&id(), EventKind::Ready);
        assert_eq!(rx.try_recv().unwrap().id, 6);
        assert_eq!(log.last_id(), 6);
    }

    #[test]
    fn ring_is_bounded_and_reports_loss() {
        let log = EventLog::new();
        for _ in 0..(RETAIN + 10) {
            log.publish(&id(), EventKind::Launched);
        }
        let (hist, _) = log.subscribe(0);
        assert_eq!(hist.len(), RETAIN);
        assert_eq!(hist[0].id, 11);
        assert!(log.since(3).is_err());
        assert_eq!(log.since(10).unwrap().len(), RETAIN);
    }

    #[tokio::test]
    async fn durable_ids_continue_after_reopen_and_history_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bulkhead.db");
        {
            let log = EventLog::open(&path, 1000).unwrap();
            assert_eq!(log.last_id(), 0);
            let mut last = 0;
            for _ in 0..3 {
                last = log.publish(&id(), EventKind::Launched).id;
            }
            log.wait_durable(last).await;
            assert_eq!(log.last_id(), 3);
            // Queued but not waited for: close() commits it.
            log.publish(&id(), EventKind::Ready);
        }
        let log = EventLog::open(&path, 1000).unwrap();
        assert_eq!(log.last_id(), 4);
        let (hist, mut rx) = log.subscribe(0);
        assert_eq!(
            hist.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(hist[3].kind, EventKind::Ready);
        let e = log.publish(&id(), EventKind::BreakerClosed);
        assert_eq!(e.id, 5);
        log.wait_durable(5).await;
        assert_eq!(rx.recv().await.unwrap(), e);
        assert_eq!(log.since(2).unwrap().len(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_publishers_get_gapless_ids_in_order() {
        for sync in [Synchronous::Full, Synchronous::Normal] {
            concurrent_publishers(sync).await;
        }
    }

    /// With `Normal` the waiters commit on their own threads too (`Core::commit_here`),
    /// beside the writer thread.
    async fn concurrent_publishers(sync: Synchronous) {
        let dir = tempfile::tempdir().unwrap();
        let log =
            Arc::new(EventLog::open_with(&dir.path().join("bulkhead.db"), 100_000, sync).unwrap());
        let (_, mut rx) = log.subscribe(0);
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..25 {
                    let e = log.publish(&id(), EventKind::Ready);
                    log.wait_durable(e.id).await;
                    assert!(log.last_id() >= e.id);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        for want in 1..=200 {
            assert_eq!(rx.recv().await.unwrap().id, want);
        }
        log.close();
        let reopened = EventLog::open(&dir.path().join("bulkhead.db"), 100_000).unwrap();
        assert_eq!(reopened.last_id(), 200);
    }

    /// A sink that says its commits are short and records which thread made each.
    /// Each commit: the thread that made it, and its ids.
    type Commits = Arc<Mutex<Vec<(String, Vec<u64>)>>>;

    /// A sink that records which thread made each commit.
    struct Recorder {
        commits: Commits,
        /// How long each commit takes.
        takes: Duration,
        /// What it says of its commits.
        quick: bool,
    }

    impl Sink for Recorder {
        fn append(&mut self, events: &[Event]) -> Result<(), StoreError> {
            std::thread::sleep(self.takes);
            let name = std::thread::current().name().unwrap_or("").to_owned();
            let ids = events.iter().map(|e| e.id).collect();
            self.commits.lock().unwrap().push((name, ids));
            Ok(())
        }

        fn describe(&self) -> String {
            "recorder".into()
        }

        fn quick(&self, _n: usize) -> bool {
            self.quick
        }
    }

    /// Event `n`, as a publish would queue it.
    fn queue(core: &Core, n: u64) {
        let mut inner = core.lock();
        inner.queued.push_back(Event {
            id: n,
            time_ms: 0,
            instance: id(),
            kind: EventKind::Ready,
        });
        inner.next_id = n + 1;
    }

    /// A core with `sink` and no writer thread (what a waiter does alone), events
    /// 1..=`publish` queued.
    fn core_alone(sink: Box<dyn Sink>, publish: u64) -> Core {
        let core = Core::new(1, Vec::new(), None, Some(sink));
        for n in 1..=publish {
            queue(&core, n);
        }
        core
    }

    /// [`core_alone`] with a [`Recorder`], and what it records.
    fn recorded(takes: Duration, quick: bool, publish: u64) -> (Core, Commits) {
        let commits = Commits::default();
        let sink = Recorder {
            commits: commits.clone(),
            takes,
            quick,
        };
        (core_alone(Box::new(sink), publish), commits)
    }

    #[test]
    fn a_waiter_commits_what_is_queued_itself_when_the_commit_is_short() {
        let (core, commits) = recorded(Duration::ZERO, true, 3);
        let mut rx = core.tx.subscribe();
        core.commit_here();
        // One commit of all three, on this thread, then shown and durable.
        let made = commits.lock().unwrap().clone();
        assert_eq!(made.len(), 1, "{made:?}");
        assert_eq!(made[0].1, vec![1, 2, 3]);
        assert_ne!(made[0].0, "bulkhead-events");
        assert_eq!(core.progress.borrow().durable, 3);
        assert_eq!(core.lock().visible, 3);
        assert_eq!(rx.try_recv().unwrap().id, 1);
        // Nothing queued: nothing committed.
        core.commit_here();
        assert_eq!(commits.lock().unwrap().len(), 1);
        // A sink whose commits are not short (an fsync): left to the writer thread.
        let (core, commits) = recorded(Duration::ZERO, false, 1);
        core.commit_here();
        assert!(commits.lock().unwrap().is_empty());
        assert_eq!(core.progress.borrow().durable, 0);
        assert_eq!(core.committer().held.len(), 1, "taken, for the writer");
    }

    #[test]
    fn after_a_slow_commit_waiters_leave_the_commits_to_the_writer_thread() {
        let (core, commits) = recorded(SLOW_COMMIT + Duration::from_millis(1), true, 1);
        core.commit_here();
        assert_eq!(
            core.progress.borrow().durable,
            1,
            "the first commit is the waiter's"
        );
        queue(&core, 2);
        core.commit_here();
        assert_eq!(
            commits.lock().unwrap().len(),
            1,
            "{:?}",
            commits.lock().unwrap()
        );
        assert_eq!(core.progress.borrow().durable, 1);
        // The writer thread's commit stores it.
        let mut c = core.committer();
        c.take(&core);
        c.flush(&core);
        drop(c);
        assert_eq!(core.progress.borrow().durable, 2);
    }

    #[test]
    fn a_waiter_never_waits_for_the_other_writers_lock_and_the_writer_commits_instead() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bulkhead.db");
        let store = Store::open(&path, 100_000, Synchronous::Normal).unwrap();
        let core = core_alone(Box::new(store), 2);
        // The instance table's connection holds the write lock, and lets it go soon: a
        // commit that waited for it would go through.
        let other = rusqlite::Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let holder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            other.execute_batch("COMMIT").unwrap();
        });
        core.commit_here();
        assert_eq!(
            core.progress.borrow().durable,
            0,
            "the waiter waited for the lock"
        );
        assert_eq!(
            core.committer().held.len(),
            2,
            "the batch is left for the writer"
        );
        assert_eq!(core.lock().visible, 0);
        holder.join().unwrap();
        // The writer thread's commit (which waits for the lock) stores them.
        let mut c = core.committer();
        c.flush(&core);
        assert!(c.held.is_empty());
        drop(c);
        assert_eq!(core.progress.borrow().durable, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_durable_log_with_normal_commits_on_waiters_and_keeps_everything_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bulkhead.db");
        {
            // A small retention: trims (the writer thread's) happen among the waiters'
            // commits, and so do checkpoints.
            let log = EventLog::open_with(&path, 64, Synchronous::Normal).unwrap();
            for _ in 0..600 {
                let e = log.publish(&id(), EventKind::Ready);
                log.wait_durable(e.id).await;
                assert_eq!(log.last_id(), e.id);
            }
        }
        let log = EventLog::open_with(&path, 64, Synchronous::Normal).unwrap();
        assert_eq!(log.last_id(), 600);
        let (hist, _) = log.subscribe(0);
        assert!(hist.len() >= 64 && hist.len() < 600, "{}", hist.len());
        assert_eq!(hist.last().unwrap().id, 600);
    }

    /// A sink whose commits wait for the test to allow them.
    struct Gated {
        allow: std::sync::mpsc::Receiver<()>,
        commits: Arc<AtomicUsize>,
    }

    impl Sink for Gated {
        fn append(&mut self, events: &[Event]) -> Result<(), StoreError> {
            let _ = self.allow.recv();
            self.commits.fetch_add(events.len(), Ordering::SeqCst);
            Ok(())
        }

        fn describe(&self) -> String {
            "gated".into()
        }
    }

    /// The log, the gate, and how many events were committed.
    fn gated() -> (EventLog, std::sync::mpsc::Sender<()>, Arc<AtomicUsize>) {
        let (allow_tx, allow) = std::sync::mpsc::channel();
        let commits = Arc::new(AtomicUsize::new(0));
        let sink = Gated {
            allow,
            commits: commits.clone(),
        };
        let log = EventLog::start(Box::new(sink), 0, Vec::new()).unwrap();
        (log, allow_tx, commits)
    }

    /// A sink that fails while `broken` is set (a full disk), counting its attempts.
    struct Switch {
        broken: Arc<AtomicBool>,
        attempts: Arc<AtomicUsize>,
        saved: Arc<Mutex<Vec<u64>>>,
        /// Says its commits are short (waiters try them).
        quick: bool,
    }

    impl Sink for Switch {
        fn append(&mut self, events: &[Event]) -> Result<(), StoreError> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            if self.broken.load(Ordering::SeqCst) {
                return Err(StoreError::Write {
                    path: "/nonexistent/state/bulkhead.db".into(),
                    source: rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                        Some("database or disk is full".into()),
                    ),
                });
            }
            self.saved
                .lock()
                .unwrap()
                .extend(events.iter().map(|e| e.id));
            Ok(())
        }

        fn describe(&self) -> String {
            "/nonexistent/state/bulkhead.db".into()
        }

        fn quick(&self, _n: usize) -> bool {
            self.quick
        }
    }

    struct Switched {
        log: EventLog,
        broken: Arc<AtomicBool>,
        attempts: Arc<AtomicUsize>,
        saved: Arc<Mutex<Vec<u64>>>,
    }

    fn switched(broken: bool) -> Switched {
        switched_quick(broken, false)
    }

    fn switched_quick(broken: bool, quick: bool) -> Switched {
        let broken = Arc::new(AtomicBool::new(broken));
        let attempts = Arc::new(AtomicUsize::new(0));
        let saved = Arc::new(Mutex::new(Vec::new()));
        let sink = Switch {
            broken: broken.clone(),
            attempts: attempts.clone(),
            saved: saved.clone(),
            quick,
        };
        Switched {
            log: EventLog::start(Box::new(sink), 0, Vec::new()).unwrap(),
            broken,
            attempts,
            saved,
        }
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !f() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn nothing_is_visible_or_durable_before_its_commit() {
        let (log, allow, commits) = gated();
        let (_, mut rx) = log.subscribe(0);
        let e = log.publish(&id(), EventKind::Launched);
        assert_eq!(e.id, 1);
        // The commit is blocked: the event is neither durable nor visible anywhere.
        let waited = tokio::time::timeout(Duration::from_millis(100), log.wait_durable(1)).await;
        assert!(waited.is_err(), "wait_durable resolved before the commit");
        assert!(rx.try_recv().is_err());
        assert_eq!(log.subscribe(0).0.len(), 0);
        assert_eq!(log.since(0).unwrap().len(), 0);
        assert_eq!(log.last_id(), 0);
        // Ids are still assigned at once.
        assert_eq!(log.publish(&id(), EventKind::Ready).id, 2);

        allow.send(()).unwrap();
        allow.send(()).unwrap();
        log.wait_durable(2).await;
        assert_eq!(commits.load(Ordering::SeqCst), 2);
        assert_eq!(rx.recv().await.unwrap().id, 1);
        assert_eq!(rx.recv().await.unwrap().id, 2);
        assert_eq!(log.last_id(), 2);
        assert!(log.fault().is_none());
    }

    /// Regression (issue #12): with the state directory full, clients saw events that
    /// were never stored, and a restarted daemon gave their ids to other events.
    #[tokio::test]
    async fn a_failing_store_holds_events_unseen_reports_why_and_recovers_by_itself() {
        let s = switched(true);
        let (_, mut rx) = s.log.subscribe(0);
        let e1 = s.log.publish(&id(), EventKind::Launched);
        let fault = tokio::time::timeout(Duration::from_secs(30), s.log.failing())
            .await
            .expect("the log reports the failure");
        assert_eq!(fault.dir, PathBuf::from("/nonexistent/state"));
        assert!(
            fault.to_string().starts_with(
                "state directory /nonexistent/state cannot be written: cannot write events to state database /nonexistent/state/bulkhead.db: database or disk is full"
            ),
            "{fault}"
        );
        assert_eq!(s.log.fault().as_ref(), Some(&fault));
        // Tried at once, then again a few times before it counted.
        assert_eq!(s.attempts.load(Ordering::SeqCst), 1 + QUICK_RETRIES.len());
        // Things that happen anyway while it fails wait with the first.
        let e2 = s.log.publish(
            &id(),
            EventKind::Crashed {
                signal: 9,
                core_dumped: false,
            },
        );
        // Retried periodically, and nothing is shown or counted durable meanwhile.
        until("a periodic retry", || {
            s.attempts.load(Ordering::SeqCst) > 1 + QUICK_RETRIES.len()
        })
        .await;
        let waited =
            tokio::time::timeout(Duration::from_millis(50), s.log.wait_durable(e1.id)).await;
        assert!(waited.is_err(), "durable while the store fails");
        assert_eq!(s.log.last_id(), 0);
        assert!(s.log.subscribe(0).0.is_empty());
        assert!(rx.try_recv().is_err());
        assert!(s.saved.lock().unwrap().is_empty());

        // Space returns: the next retry stores both, in order, and the fault clears.
        s.broken.store(false, Ordering::SeqCst);
        s.log.wait_durable(e2.id).await;
        assert_eq!(*s.saved.lock().unwrap(), vec![1, 2]);
        assert_eq!(rx.recv().await.unwrap().id, 1);
        assert_eq!(rx.recv().await.unwrap().id, 2);
        assert_eq!(s.log.last_id(), 2);
        assert!(s.log.fault().is_none());
        // And commits are immediate again.
        let e3 = s.log.publish(&id(), EventKind::Ready);
        s.log.wait_durable(e3.id).await;
        assert_eq!(*s.saved.lock().unwrap(), vec![1, 2, 3]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_that_fails_on_a_waiters_thread_is_retried_and_reported_by_the_writer() {
        let s = switched_quick(true, true);
        let e1 = s.log.publish(&id(), EventKind::Launched);
        let waited =
            tokio::time::timeout(Duration::from_millis(100), s.log.wait_durable(e1.id)).await;
        assert!(waited.is_err(), "durable while the store fails");
        let fault = tokio::time::timeout(Duration::from_secs(30), s.log.failing())
            .await
            .expect("the writer reports the failure");
        assert!(fault.cause.contains("database or disk is full"), "{fault}");
        assert!(s.attempts.load(Ordering::SeqCst) > QUICK_RETRIES.len());
        assert_eq!(s.log.last_id(), 0);
        // Space returns: the writer's retry stores it and the fault clears; then waiters
        // commit again.
        s.broken.store(false, Ordering::SeqCst);
        s.log.wait_durable(e1.id).await;
        assert!(s.log.fault().is_none());
        let e2 = s.log.publish(&id(), EventKind::Ready);
        s.log.wait_durable(e2.id).await;
        assert_eq!(*s.saved.lock().unwrap(), vec![1, 2]);
        assert_eq!(s.log.last_id(), 2);
    }

    #[tokio::test]
    async fn a_transient_failure_is_retried_at_once_and_is_no_fault() {
        let s = switched(true);
        let broken = s.broken.clone();
        let attempts = s.attempts.clone();
        // Heal after the first attempt, before the quick retries run out.
        let healer = std::thread::spawn(move || {
            while attempts.load(Ordering::SeqCst) == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            broken.store(false, Ordering::SeqCst);
        });
        let e = s.log.publish(&id(), EventKind::Launched);
        s.log.wait_durable(e.id).await;
        healer.join().unwrap();
        assert_eq!(*s.saved.lock().unwrap(), vec![1]);
        assert!(s.log.fault().is_none());
        assert!(s.attempts.load(Ordering::SeqCst) >= 2);
    }

    #[tokio::test]
    async fn a_shutdown_does_not_wait_for_a_failing_store_and_nothing_unstored_is_shown() {
        let s = switched(true);
        let e = s.log.publish(&id(), EventKind::Launched);
        s.log.failing().await;
        s.log.stop_waiting();
        // Resolves although the event is not stored...
        tokio::time::timeout(Duration::from_secs(30), s.log.wait_durable(e.id))
            .await
            .expect("wait_durable ends in a shutdown");
        // ...and it is still not shown.
        assert_eq!(s.log.last_id(), 0);
        // Closing tries it once more; still failing: never stored, never shown.
        s.log.close();
        assert!(s.saved.lock().unwrap().is_empty());
        assert_eq!(s.log.last_id(), 0);
        assert!(s.log.subscribe(0).0.is_empty());
        // After close: not stored, not shown, and nobody waits for it.
        let late = s.log.publish(&id(), EventKind::Ready);
        s.log.wait_durable(late.id).await;
        assert_eq!(s.log.last_id(), 0);
    }

    #[tokio::test]
    async fn closing_stores_what_waits_when_the_store_works_again() {
        let s = switched(true);
        s.log.publish(&id(), EventKind::Launched);
        s.log.failing().await;
        s.broken.store(false, Ordering::SeqCst);
        s.log.close();
        assert_eq!(*s.saved.lock().unwrap(), vec![1]);
        assert_eq!(s.log.last_id(), 1);
    }

    #[tokio::test]
    async fn events_waiting_for_the_store_are_bounded() {
        let s = switched(true);
        s.log.publish(&id(), EventKind::Launched);
        s.log.failing().await;
        for _ in 0..MAX_HELD + 10 {
            s.log.publish(&id(), EventKind::Ready);
        }
        let total = MAX_HELD as u64 + 11;
        until("the bound applied", || {
            s.log.fault().is_some_and(|f| f.held == MAX_HELD)
        })
        .await;
        s.broken.store(false, Ordering::SeqCst);
        s.log.wait_durable(total).await;
        let saved = s.saved.lock().unwrap().clone();
        // The newest are kept, in order, without a gap among them.
        assert_eq!(saved.len(), MAX_HELD);
        assert_eq!(*saved.last().unwrap(), total);
        assert!(saved.windows(2).all(|w| w[1] == w[0] + 1));
        assert_eq!(s.log.last_id(), total);
    }

    #[test]
    fn the_fault_names_what_the_operating_system_says() {
        let dir = tempfile::tempdir().unwrap();
        let ro = dir.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        let e = StoreError::Write {
            path: ro.join("bulkhead.db"),
            source: rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_READONLY),
                None,
            ),
        };
        // A directory that takes the write: only SQLite's words.
        assert!(!cause(&e, &ro).contains("os error"));
        assert!(!ro.join(".bulkhead-write-probe").exists());
        // One that does not (here: the probe's name is taken by a directory): the
        // operating system's words follow SQLite's.
        std::fs::create_dir(ro.join(".bulkhead-write-probe")).unwrap();
        let c = cause(&e, &ro);
        assert!(c.starts_with(&e.to_string()), "{c}");
        assert!(c.contains("os error"), "{c}");
    }

    #[test]
    fn fresh_state_moves_a_bad_database_aside_and_ids_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bulkhead.db");
        {
            let mut st = Store::open(&path, 100, Synchronous::Normal).unwrap();
            st.append(&[Event {
                id: 7,
                time_ms: 1,
                instance: id(),
                kind: EventKind::Ready,
            }])
            .unwrap();
            st.conn_for_tests()
                .execute(
                    "UPDATE meta SET value = value + 1 WHERE key = 'schema_version'",
                    [],
                )
                .unwrap();
        }
        // Without the flag: refused, nothing moved.
        let err = EventLog::open_or_fresh(&path, 100, Synchronous::Normal, false)
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::TooNew { .. }), "{err}");
        assert!(path.exists());
        // With it: moved aside, a new history whose ids continue after 7.
        let log = EventLog::open_or_fresh(&path, 100, Synchronous::Normal, true).unwrap();
        assert_eq!(log.last_id(), 7);
        assert!(log.subscribe(0).0.is_empty());
        assert_eq!(log.publish(&id(), EventKind::Launched).id, 8);
        log.close();
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("bulkhead.db.bad-")
            })
            .collect();
        assert!(!aside.is_empty());
        // A sound database is left alone by the flag.
        let log = EventLog::open_or_fresh(&path, 100, Synchronous::Normal, true).unwrap();
        assert_eq!(log.last_id(), 8);
    }

    /// A daemon core (no API server) over a switchable store, serving workload `w`
    /// (`/bin/sleep`, shared), with the process driver.
    fn daemon_over(s: Switched) -> Over {
        let dir = tempfile::tempdir().unwrap();
        let (wl, state) = (dir.path().join("workloads"), dir.path().join("state"));
        std::fs::create_dir_all(wl.join("w")).unwrap();
        std::fs::write(
            wl.join("w/manifest.yaml"),
            "name: w\ncommand: [/bin/sleep, '1000']\n",
        )
        .unwrap();
        for d in ["logs", "notify"] {
            std::fs::create_dir_all(state.join(d)).unwrap();
        }
        let mut cfg = crate::Config::new(wl, Some(state), None);
        cfg.sandbox = false;
        let sh = Arc::new(crate::Shared::new(cfg, s.log, None, None));
        sh.reload();
        Over {
            sh,
            broken: s.broken,
            saved: s.saved,
            _dir: dir,
        }
    }

    struct Over {
        sh: Arc<crate::Shared>,
        broken: Arc<AtomicBool>,
        saved: Arc<Mutex<Vec<u64>>>,
        _dir: tempfile::TempDir,
    }

    fn launch_w() -> crate::LaunchArgs {
        crate::LaunchArgs {
            workload: "w".into(),
            namespace: None,
            session: None,
            wait: crate::WaitFor::Ready,
            timeout: None,
            lease: None,
        }
    }

    /// A launch admitted just before the store fails would wait for its View forever:
    /// it answers why at once, and the instance goes on once its events are stored.
    #[tokio::test]
    async fn a_launch_caught_by_a_failing_store_says_why_and_goes_on_once_stored() {
        let s = daemon_over(switched(false));
        let sh = s.sh.clone();
        s.broken.store(true, Ordering::SeqCst);
        let err = tokio::time::timeout(Duration::from_secs(30), sh.launch(launch_w()))
            .await
            .expect("the launch answers while the store fails")
            .map(|_| ())
            .expect_err("the launch cannot be recorded");
        assert!(
            matches!(err, crate::LaunchError::Unrecorded { .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(
                "cannot be recorded: state directory /nonexistent/state cannot be written"
            ),
            "{msg}"
        );
        assert!(s.saved.lock().unwrap().is_empty());
        // Space returns: the instance goes on to ready, every event stored first.
        s.broken.store(false, Ordering::SeqCst);
        let slot = sh.list().pop().expect("the instance exists");
        let mut rx = slot.subscribe();
        tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|v| v.ready))
            .await
            .expect("ready once the store works")
            .unwrap();
        let saved = s.saved.lock().unwrap().clone();
        assert_eq!(saved, (1..=saved.len() as u64).collect::<Vec<_>>());
        assert!(sh.events.last_id() >= 3, "launched, started, ready");
        sh.terminate(&slot.id, None).await;
    }

    struct Panics;

    impl Sink for Panics {
        fn append(&mut self, _: &[Event]) -> Result<(), StoreError> {
            panic!("a bug in the store (test)");
        }

        fn describe(&self) -> String {
            "/nonexistent/state/bulkhead.db".into()
        }
    }

    #[tokio::test]
    async fn a_writer_that_dies_is_a_fault_and_nobody_waits_forever() {
        let log = EventLog::start(Box::new(Panics), 0, Vec::new()).unwrap();
        let e = log.publish(&id(), EventKind::Launched);
        let f = tokio::time::timeout(Duration::from_secs(30), log.failing())
            .await
            .expect("reported");
        assert!(f.to_string().contains("panicked"), "{f}");
        log.wait_durable(e.id).await;
        assert_eq!(log.last_id(), 0);
        // Later events go nowhere and are not shown.
        log.publish(&id(), EventKind::Ready);
        assert_eq!(log.last_id(), 0);
    }

    /// The same for a terminate and an end-namespace admitted just before the failure:
    /// UNAVAILABLE with why, and the stop goes on once its events are stored.
    #[tokio::test]
    async fn a_stop_caught_by_a_failing_store_says_why_and_goes_on_once_stored() {
        use bulkhead_api::Bulkhead;
        let Over {
            sh, broken, saved, ..
        } = &daemon_over(switched(false));
        let (view, _) = sh.launch(launch_w()).await.unwrap();
        let svc = crate::service::Service { sh: sh.clone() };
        broken.store(true, Ordering::SeqCst);
        let req = local(bulkhead_api::v1::TerminateRequest {
            id: view.id.to_string(),
            grace_ms: None,
            ..Default::default()
        });
        let err = tokio::time::timeout(Duration::from_secs(30), svc.terminate(req))
            .await
            .expect("the terminate answers while the store fails")
            .map(|_| ())
            .expect_err("the terminate cannot be recorded");
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(
            err.message().starts_with(&format!(
                "terminate of {} cannot be recorded: state directory /nonexistent/state cannot be written",
                view.id
            )),
            "{}",
            err.message()
        );
        // Refused at admission from now on.
        let req = local(bulkhead_api::v1::EndScopeRequest {
            name: "n".into(),
            grace_ms: None,
        });
        let err = svc.end_namespace(req).await.map(|_| ()).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(
            err.message()
                .starts_with("end-namespace refused: state directory"),
            "{}",
            err.message()
        );
        // Space returns: the stop completes, its events stored first.
        let stored = saved.lock().unwrap().len();
        broken.store(false, Ordering::SeqCst);
        let slot = sh.get(&view.id).unwrap();
        let mut rx = slot.subscribe();
        tokio::time::timeout(
            Duration::from_secs(30),
            rx.wait_for(|v| v.state.is_terminal()),
        )
        .await
        .expect("terminated once the store works")
        .unwrap();
        assert!(saved.lock().unwrap().len() > stored);
    }

    /// A request as it comes from the Unix socket (after `AuthLayer`).
    fn local<T>(msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.extensions_mut()
            .insert(crate::auth::Identity::Local { uid: Some(0) });
        r
    }
}
