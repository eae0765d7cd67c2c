//! The event log: every lifecycle change, with a monotonic id, kept in memory and fanned
//! out to watchers.
//!
//! Ids start at 1 and have no gaps. The last [`RETAIN`] events are kept so that a watcher
//! that connects late (or reconnects with `since`) gets the history first. A subscription
//! is taken under the same lock that assigns ids, so history and live events meet without
//! a gap or a duplicate. (Durable storage comes with the supervision work.)

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use bulkhead_core::event::{Event, EventKind};
use bulkhead_core::key::InstanceId;
use tokio::sync::broadcast;

/// How many events are kept in memory.
pub const RETAIN: usize = 10_000;

pub struct EventLog {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Event>,
}

struct Inner {
    next_id: u64,
    ring: VecDeque<Event>,
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

impl EventLog {
    pub fn new() -> EventLog {
        let (tx, _) = broadcast::channel(4096);
        EventLog {
            inner: Mutex::new(Inner {
                next_id: 1,
                ring: VecDeque::with_capacity(1024),
            }),
            tx,
        }
    }

    /// Stamps and publishes an event.
    pub fn publish(&self, instance: &InstanceId, kind: EventKind) -> Event {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let event = Event {
            id: inner.next_id,
            time_ms: now_ms(),
            instance: instance.clone(),
            kind,
        };
        inner.next_id += 1;
        if inner.ring.len() == RETAIN {
            inner.ring.pop_front();
        }
        inner.ring.push_back(event.clone());
        // Sent under the lock so that subscribers see ids in order. No receiver is fine.
        let _ = self.tx.send(event.clone());
        event
    }

    /// Resolves once every event up to `id` is durable. Events are in memory only for now,
    /// so this returns at once; the durable store makes it wait for the commit.
    pub async fn wait_durable(&self, id: u64) {
        let _ = id;
    }

    /// The id of the newest event, 0 if none.
    pub fn last_id(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).next_id - 1
    }

    /// History after `since` and a receiver for everything newer, with no gap between.
    pub fn subscribe(&self, since: u64) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let history = inner
            .ring
            .iter()
            .filter(|e| e.id > since)
            .cloned()
            .collect();
        // Subscribing while holding the lock: no event can be published in between.
        (history, self.tx.subscribe())
    }

    /// Events after `since` that are still kept; for a watcher that lagged behind.
    pub fn since(&self, since: u64) -> Result<Vec<Event>, Lost> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
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
}
