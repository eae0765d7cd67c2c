//! The event log: every lifecycle change, with a monotonic id, made durable in the state
//! database, kept in memory and fanned out to watchers.
//!
//! Ids start at 1, have no gaps, and continue after a daemon restart (they go on from the
//! newest stored event). The last [`RETAIN`] events are kept in memory (loaded from the
//! database at start-up too) so that a watcher that connects late, or reconnects with
//! `since`, gets the history first.
//!
//! # Durability: group commit
//!
//! [`EventLog::open`] starts one writer thread that owns the SQLite connection
//! ([`crate::store`]). [`EventLog::publish`] assigns the id, queues the event for the
//! writer and returns at once. The writer takes everything queued, commits it in one
//! transaction (one fsync with `synchronous=FULL`), and only then appends the batch to the
//! in-memory ring and broadcasts it, in id order, and raises the durable watermark that
//! [`EventLog::wait_durable`] waits on. So:
//!
//! - **no client sees an event that is not durable**: history, live stream and
//!   [`EventLog::last_id`] only ever contain committed events;
//! - concurrent publishers share fsyncs instead of waiting for one each;
//! - the instance actor waits for its last event to be durable before it changes the View,
//!   so a client that sees a state finds its event, also after a restart.
//!
//! If a commit fails the writer retries the batch a few times (about a second in all),
//! then logs an error and lets the batch through *without* durability rather than
//! freezing every instance behind a broken disk; the batch stays queued and goes into the
//! next commit attempt. [`EventLog::store_error`] reports the last failure until a commit
//! succeeds again.
//!
//! [`EventLog::new`] is the in-memory log (tests, benchmarks, `durable_events = false`):
//! the same API, publish makes the event visible at once.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bulkhead_core::event::{Event, EventKind};
use bulkhead_core::key::InstanceId;
use tokio::sync::{broadcast, watch};

use crate::store::{Sink, Store, StoreError, Synchronous};

/// How many events are kept in memory.
pub const RETAIN: usize = 10_000;

/// The most events committed in one transaction.
const MAX_BATCH: usize = 4096;

/// Commit attempts for one batch before it is let through without durability.
const ATTEMPTS: u32 = 5;

/// Failed events carried into later commit attempts, at most (the oldest go first).
const MAX_UNSAVED: usize = 100_000;

pub struct EventLog {
    core: Arc<Core>,
    /// The highest committed id; `None` for the in-memory log.
    durable: Option<watch::Receiver<u64>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// What the publishers and the writer share.
struct Core {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Event>,
    /// The last commit failure, cleared by a successful commit.
    store_error: Mutex<Option<String>>,
}

struct Inner {
    next_id: u64,
    /// The newest id clients can see (committed, in the ring, broadcast).
    visible: u64,
    ring: VecDeque<Event>,
    /// To the writer; `None`: in memory only (or closed).
    queue: Option<mpsc::Sender<Event>>,
    /// Closed, but the writer still commits what was queued before: later events wait in
    /// `held` so that they are released after those, in id order.
    draining: bool,
    held: Vec<Event>,
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
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes events visible: ring + broadcast, in id order. The caller holds the lock that
    /// `subscribe` takes, so a subscriber gets each event exactly once, either in its
    /// history or on its receiver.
    fn release(&self, inner: &mut Inner, events: &[Event]) {
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
            core: Arc::new(Core::new(1, Vec::new(), None)),
            durable: None,
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
        let store = Store::open(path, retention, sync)?;
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
        let (qtx, qrx) = mpsc::channel::<Event>();
        let (dtx, drx) = watch::channel(last);
        let core = Arc::new(Core::new(last + 1, history, Some(qtx)));
        let name = sink.describe();
        let writer = {
            let core = core.clone();
            std::thread::Builder::new()
                .name("bulkhead-events".into())
                .spawn(move || write_loop(core, qrx, sink, dtx))
                .map_err(|source| StoreError::Thread {
                    path: name.into(),
                    source,
                })?
        };
        Ok(EventLog {
            core,
            durable: Some(drx),
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
        // Ids are assigned and queued under one lock, so the writer receives them in id
        // order; it releases them only after their commit.
        let queued = match &inner.queue {
            Some(q) => q.send(event.clone()).is_ok(),
            None => false,
        };
        if !queued {
            inner.queue = None;
            if inner.draining {
                // Closed while the writer drains: it releases these after its last batch.
                inner.held.push(event.clone());
            } else {
                // In memory (or the writer is gone): visible now, still in id order
                // because nothing else can release while we hold the lock.
                self.core.release(&mut inner, std::slice::from_ref(&event));
            }
        }
        event
    }

    /// Resolves once every event up to `id` is committed (or, if the database keeps
    /// failing, once the writer has given up on it and let it through; see the module
    /// docs). At once for the in-memory log and after [`EventLog::close`].
    pub async fn wait_durable(&self, id: u64) {
        if let Some(rx) = &self.durable {
            let mut rx = rx.clone();
            // Err: the writer is gone (closed), nothing left to wait for.
            let _ = rx.wait_for(|&d| d >= id).await;
        }
    }

    /// The id of the newest event clients can see (committed), 0 if none.
    pub fn last_id(&self) -> u64 {
        self.core.lock().visible
    }

    /// The last commit failure, until a commit succeeds again.
    pub fn store_error(&self) -> Option<String> {
        self.core
            .store_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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

    /// Commits everything queued and stops the writer. Later events are in memory only.
    /// Blocks for at most one commit; idempotent. Also done on drop.
    pub fn close(&self) {
        // Dropping the sender ends the writer once it has drained the queue.
        {
            let mut inner = self.core.lock();
            if inner.queue.take().is_some() {
                inner.draining = true;
            }
        }
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

impl Core {
    fn new(next_id: u64, history: Vec<Event>, queue: Option<mpsc::Sender<Event>>) -> Core {
        let (tx, _) = broadcast::channel(4096);
        let visible = next_id - 1;
        let skip = history.len().saturating_sub(RETAIN);
        let mut ring = VecDeque::with_capacity(RETAIN.min(history.len().max(1024)));
        ring.extend(history.into_iter().skip(skip));
        Core {
            inner: Mutex::new(Inner {
                next_id,
                visible,
                ring,
                queue,
                draining: false,
                held: Vec::new(),
            }),
            tx,
            store_error: Mutex::new(None),
        }
    }
}

/// The writer thread: group commit, then release. Ends when the queue's sender is dropped
/// and everything queued is committed.
fn write_loop(
    core: Arc<Core>,
    rx: mpsc::Receiver<Event>,
    mut sink: Box<dyn Sink>,
    durable: watch::Sender<u64>,
) {
    // Whichever way the writer ends (a panic too), the events published after `close`
    // become visible after everything it released. Dropped before `durable`, so nobody
    // waiting on the watermark wakes before they are visible.
    let _finish = Finish(core.clone());
    // Events let through after failed commits, retried with the next batch (ids in
    // order, all below the new ones).
    let mut unsaved: Vec<Event> = Vec::new();
    let mut batch: Vec<Event> = Vec::new();
    // Block for the first event, then take whatever else is queued: the events that
    // arrived during the previous commit share this one. Ends when the queue's sender is
    // dropped (close) and the queue is empty.
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let last = batch.last().map_or(0, |e| e.id);
        let committed = commit(&core, sink.as_mut(), &mut unsaved, &batch);
        {
            let mut inner = core.lock();
            core.release(&mut inner, &batch);
        }
        if !committed {
            unsaved.append(&mut batch);
            if unsaved.len() > MAX_UNSAVED {
                let drop = unsaved.len() - MAX_UNSAVED;
                tracing::error!(
                    "event store {}: giving up on {drop} unsaved events (ids {}..={})",
                    sink.describe(),
                    unsaved[0].id,
                    unsaved[drop - 1].id
                );
                unsaved.drain(..drop);
            }
        }
        // After the release: whoever sees the watermark finds the events in the ring.
        durable.send_replace(last);
        batch.clear();
    }
    if !unsaved.is_empty() && sink.append(&unsaved).is_ok() {
        unsaved.clear();
    }
    if !unsaved.is_empty() {
        tracing::error!(
            "event store {}: {} events were never saved (ids {}..={})",
            sink.describe(),
            unsaved.len(),
            unsaved[0].id,
            unsaved[unsaved.len() - 1].id
        );
    }
}

struct Finish(Arc<Core>);

impl Drop for Finish {
    fn drop(&mut self) {
        let mut inner = self.0.lock();
        inner.draining = false;
        let held = std::mem::take(&mut inner.held);
        self.0.release(&mut inner, &held);
    }
}

/// Commits `unsaved` + `batch` in one transaction, retrying a few times. On success
/// `unsaved` is emptied; on failure the caller keeps the batch for the next attempt.
fn commit(core: &Core, sink: &mut dyn Sink, unsaved: &mut Vec<Event>, batch: &[Event]) -> bool {
    let mut all: Vec<Event>;
    let events: &[Event] = if unsaved.is_empty() {
        batch
    } else {
        all = std::mem::take(unsaved);
        all.extend_from_slice(batch);
        &all
    };
    let mut backoff = Duration::from_millis(10);
    for attempt in 1..=ATTEMPTS {
        match sink.append(events) {
            Ok(()) => {
                if attempt > 1 || events.len() > batch.len() {
                    tracing::info!("event store {}: commits succeed again", sink.describe());
                }
                *core.store_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                return true;
            }
            Err(e) if attempt == ATTEMPTS => {
                let first = events.first().map_or(0, |e| e.id);
                let last = events.last().map_or(0, |e| e.id);
                tracing::error!(
                    "{e}; events {first}..={last} are not durable (kept for the next commit)"
                );
                *core.store_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
            }
            Err(e) => {
                tracing::warn!("{e} (attempt {attempt} of {ATTEMPTS})");
                std::thread::sleep(backoff);
                backoff *= 4;
            }
        }
    }
    // Keep the earlier failures; the caller appends the batch.
    if events.len() > batch.len() {
        *unsaved = events[..events.len() - batch.len()].to_vec();
    }
    false
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
    use std::sync::atomic::{AtomicUsize, Ordering};

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

    #[tokio::test]
    async fn concurrent_publishers_get_gapless_ids_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EventLog::open(&dir.path().join("bulkhead.db"), 100_000).unwrap());
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

    /// A sink whose commits wait for the test to allow them, and fail the first `fail`
    /// times.
    struct Gated {
        allow: std::sync::mpsc::Receiver<()>,
        commits: Arc<AtomicUsize>,
        fail: usize,
        saved: Arc<Mutex<Vec<u64>>>,
    }

    impl Sink for Gated {
        fn append(&mut self, events: &[Event]) -> Result<(), StoreError> {
            let _ = self.allow.recv();
            if self.commits.fetch_add(1, Ordering::SeqCst) < self.fail {
                return Err(StoreError::Write {
                    path: "gated".into(),
                    source: rusqlite::Error::InvalidQuery,
                });
            }
            let mut saved = self.saved.lock().unwrap();
            saved.extend(events.iter().map(|e| e.id));
            Ok(())
        }

        fn describe(&self) -> String {
            "gated".into()
        }
    }

    struct Harness {
        log: EventLog,
        allow: std::sync::mpsc::Sender<()>,
        commits: Arc<AtomicUsize>,
        saved: Arc<Mutex<Vec<u64>>>,
    }

    fn gated(fail: usize) -> Harness {
        let (allow_tx, allow) = std::sync::mpsc::channel();
        let commits = Arc::new(AtomicUsize::new(0));
        let saved = Arc::new(Mutex::new(Vec::new()));
        let sink = Gated {
            allow,
            commits: commits.clone(),
            fail,
            saved: saved.clone(),
        };
        let log = EventLog::start(Box::new(sink), 0, Vec::new()).unwrap();
        Harness {
            log,
            allow: allow_tx,
            commits,
            saved,
        }
    }

    #[tokio::test]
    async fn nothing_is_visible_or_durable_before_its_commit() {
        let Harness {
            log,
            allow,
            commits,
            ..
        } = gated(0);
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
        assert!(commits.load(Ordering::SeqCst) >= 1);
        assert_eq!(rx.recv().await.unwrap().id, 1);
        assert_eq!(rx.recv().await.unwrap().id, 2);
        assert_eq!(log.last_id(), 2);
        drop(allow);
        log.close();
        // After close: in memory, visible at once, wait_durable does not hang.
        let e = log.publish(&id(), EventKind::BreakerClosed);
        assert_eq!(e.id, 3);
        log.wait_durable(3).await;
        assert_eq!(log.last_id(), 3);
    }

    #[tokio::test]
    async fn a_failing_store_does_not_freeze_the_log_and_retries_with_the_next_batch() {
        let h = gated(ATTEMPTS as usize);
        for _ in 0..(ATTEMPTS as usize + 1) {
            h.allow.send(()).unwrap();
        }
        let e = h.log.publish(&id(), EventKind::Launched);
        // Every attempt fails: let through (visible, not durable), error reported.
        h.log.wait_durable(e.id).await;
        assert_eq!(h.commits.load(Ordering::SeqCst), ATTEMPTS as usize);
        assert_eq!(h.log.last_id(), 1);
        assert!(h.log.store_error().is_some());
        // The next commit succeeds and carries the failed event with it.
        let e = h.log.publish(&id(), EventKind::Ready);
        h.log.wait_durable(e.id).await;
        assert_eq!(*h.saved.lock().unwrap(), vec![1, 2]);
        assert!(h.log.store_error().is_none());
    }

    #[tokio::test]
    async fn events_published_while_closing_come_after_the_drained_ones() {
        let h = gated(0);
        let log = Arc::new(h.log);
        let (_, mut rx) = log.subscribe(0);
        log.publish(&id(), EventKind::Launched);
        // The writer is stuck committing event 1; close waits for it on another thread.
        let closer = {
            let log = log.clone();
            std::thread::spawn(move || log.close())
        };
        while log.core.lock().queue.is_some() {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Closed, still draining: event 2 must not overtake event 1.
        log.publish(&id(), EventKind::Ready);
        assert!(rx.try_recv().is_err());
        h.allow.send(()).unwrap();
        closer.join().unwrap();
        assert_eq!(rx.recv().await.unwrap().id, 1);
        assert_eq!(rx.recv().await.unwrap().id, 2);
        assert_eq!(*h.saved.lock().unwrap(), vec![1]);
        assert_eq!(log.last_id(), 2);
    }
}
