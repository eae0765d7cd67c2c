//! Publishers, subscribers, loans and received messages: thin wrappers over iceoryx2's
//! byte-slice ports that keep its zero-copy path (a loan is a slot in shared memory; a
//! received message is read in place).

use std::mem::MaybeUninit;
use std::ops::Deref;
use std::time::{Duration, Instant};

use iceoryx2::port::listener::Listener;
use iceoryx2::port::notifier::Notifier;
use iceoryx2::port::publisher::Publisher as IoxPublisher;
use iceoryx2::port::subscriber::Subscriber as IoxSubscriber;
use iceoryx2::port::update_connections::UpdateConnections;
use iceoryx2::prelude::*;
use iceoryx2::sample::Sample;
use iceoryx2::sample_mut_uninit::SampleMutUninit;

use crate::{service_name, Ipc, OpenError};

/// A message could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("message of {len} bytes is larger than the channel's max_payload of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("cannot loan {len} bytes on channel {service}: {reason}")]
    Loan {
        service: String,
        len: usize,
        reason: String,
    },
    #[error("cannot send on channel {service}: {reason}")]
    Send { service: String, reason: String },
}

/// A message could not be received.
#[derive(Debug, thiserror::Error)]
#[error("cannot receive on channel {service}: {reason}")]
pub struct RecvError {
    pub service: String,
    pub reason: String,
}

/// Publishes byte messages on one channel.
///
/// A sent message lives in the publisher's shared memory: a subscriber that has not
/// received it when the publisher is dropped never will. A one-shot sender keeps its
/// publisher until the receiver had its chance (`bulkhead pipe send --linger`).
pub struct Publisher {
    service: String,
    max: usize,
    port: IoxPublisher<Ipc, [u8], ()>,
    /// Wakes the channel's waiting subscribers after each send (the event service of the
    /// same name: see [`Subscriber::recv_timeout`]).
    wake: Notifier<Ipc>,
}

impl Publisher {
    pub(crate) fn open(
        node: &Node<Ipc>,
        service: &str,
        max_payload: usize,
    ) -> Result<Publisher, OpenError> {
        let factory = node
            .service_builder(&service_name(service)?)
            .publish_subscribe::<[u8]>()
            .open()
            .map_err(|e| OpenError::Service {
                service: service.to_owned(),
                reason: format!("{e:?}"),
            })?;
        let port = factory
            .publisher_builder()
            .initial_max_slice_len(max_payload.max(1))
            .create()
            .map_err(|e| OpenError::Port {
                port: "publisher",
                service: service.to_owned(),
                reason: format!("{e:?}"),
            })?;
        Ok(Publisher {
            service: service.to_owned(),
            max: max_payload.max(1),
            port,
            wake: open_wake(node, service)?
                .notifier_builder()
                .create()
                .map_err(|e| OpenError::Port {
                    port: "notifier",
                    service: service.to_owned(),
                    reason: format!("{e:?}"),
                })?,
        })
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The largest message this publisher can send.
    pub fn max_payload(&self) -> usize {
        self.max
    }

    /// Loans `len` bytes of shared memory to write a message in place (no copy).
    pub fn loan(&self, len: usize) -> Result<Loan<'_>, SendError> {
        if len > self.max {
            return Err(SendError::TooLarge { len, max: self.max });
        }
        let sample = self
            .port
            .loan_slice_uninit(len)
            .map_err(|e| SendError::Loan {
                service: self.service.clone(),
                len,
                reason: format!("{e:?}"),
            })?;
        Ok(Loan {
            service: &self.service,
            wake: &self.wake,
            sample,
        })
    }

    /// Connects subscribers that appeared since the last send, and hands them the
    /// channel's history. Call it while idle: a subscriber that connects while nothing
    /// is sent gets its history only then.
    pub fn update_connections(&self) -> Result<(), SendError> {
        self.port
            .update_connections()
            .map_err(|e| SendError::Send {
                service: self.service.clone(),
                reason: format!("{e:?}"),
            })?;
        // A late subscriber may be waiting for the history just handed over.
        self.wake.notify().map(|_| ()).map_err(|e| SendError::Send {
            service: self.service.clone(),
            reason: format!("cannot wake the subscribers: {e:?}"),
        })
    }

    /// Copies `data` into a loan and sends it (one copy, into shared memory).
    pub fn send(&self, data: &[u8]) -> Result<usize, SendError> {
        self.loan(data.len())?.write_and_send(data)
    }
}

/// A slot of shared memory loaned from a [`Publisher`], not yet sent. Dropping it returns
/// the slot.
pub struct Loan<'a> {
    service: &'a str,
    wake: &'a Notifier<Ipc>,
    sample: SampleMutUninit<Ipc, [MaybeUninit<u8>], ()>,
}

/// The end of every send: an error named after the channel, and the subscribers it
/// reached woken (no wake-up when it reached none: nobody waits on it).
fn sent<E: std::fmt::Debug>(
    service: &str,
    wake: &Notifier<Ipc>,
    result: Result<usize, E>,
) -> Result<usize, SendError> {
    let n = result.map_err(|e| SendError::Send {
        service: service.to_owned(),
        reason: format!("{e:?}"),
    })?;
    if n > 0 {
        // The message is in the subscribers' queues before the wake-up: a subscriber
        // that checks its queue and then waits sees one or the other, never neither.
        if let Err(e) = wake.notify() {
            return Err(SendError::Send {
                service: service.to_owned(),
                reason: format!("sent, but cannot wake the subscribers: {e:?}"),
            });
        }
    }
    Ok(n)
}

impl Loan<'_> {
    /// The loaned bytes, uninitialised.
    pub fn as_uninit_mut(&mut self) -> &mut [MaybeUninit<u8>] {
        self.sample.payload_mut()
    }

    /// Copies `data` (exactly the loan's length) into the loan and sends it.
    pub fn write_and_send(self, data: &[u8]) -> Result<usize, SendError> {
        if data.len() != self.sample.payload().len() {
            return Err(SendError::TooLarge {
                len: data.len(),
                max: self.sample.payload().len(),
            });
        }
        let (service, wake) = (self.service, self.wake);
        sent(service, wake, self.sample.write_from_slice(data).send())
    }

    /// Zeroes the loan, lets `fill` write it, and sends it.
    pub fn fill_and_send(self, fill: impl FnOnce(&mut [u8])) -> Result<usize, SendError> {
        let (service, wake) = (self.service, self.wake);
        let mut s = self.sample.write_from_fn(|_| 0u8);
        fill(s.payload_mut());
        sent(service, wake, s.send())
    }

    /// Sends the loan as it is, without touching its bytes (the zero-copy path).
    ///
    /// # Safety
    ///
    /// Every byte of the loan must have been written through [`Loan::as_uninit_mut`].
    pub unsafe fn send_assume_init(self) -> Result<usize, SendError> {
        let (service, wake) = (self.service, self.wake);
        // SAFETY: the caller initialised every byte of the payload (this function's
        // contract).
        let s = unsafe { self.sample.assume_init() };
        sent(service, wake, s.send())
    }
}

/// Receives byte messages from one channel.
pub struct Subscriber {
    service: String,
    port: IoxSubscriber<Ipc, [u8], ()>,
    /// Woken by the channel's publishers after each send.
    wake: Listener<Ipc>,
    /// When the last message came, for the wait's spin (see `recv_timeout`).
    last: std::cell::Cell<Option<Instant>>,
}

impl Subscriber {
    pub(crate) fn open(
        node: &Node<Ipc>,
        service: &str,
        depth: usize,
    ) -> Result<Subscriber, OpenError> {
        let factory = node
            .service_builder(&service_name(service)?)
            .publish_subscribe::<[u8]>()
            .open()
            .map_err(|e| OpenError::Service {
                service: service.to_owned(),
                reason: format!("{e:?}"),
            })?;
        let max = factory.static_config().subscriber_max_buffer_size();
        let port = factory
            .subscriber_builder()
            .buffer_size(depth.clamp(1, max.max(1)))
            .create()
            .map_err(|e| OpenError::Port {
                port: "subscriber",
                service: service.to_owned(),
                reason: format!("{e:?}"),
            })?;
        Ok(Subscriber {
            service: service.to_owned(),
            port,
            wake: open_wake(node, service)?
                .listener_builder()
                .create()
                .map_err(|e| OpenError::Port {
                    port: "listener",
                    service: service.to_owned(),
                    reason: format!("{e:?}"),
                })?,
            last: std::cell::Cell::new(None),
        })
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The next message, if one is queued; never waits.
    pub fn try_recv(&self) -> Result<Option<Message>, RecvError> {
        let got = self.port.receive().map_err(|e| RecvError {
            service: self.service.clone(),
            reason: format!("{e:?}"),
        })?;
        if got.is_some() {
            self.last.set(Some(Instant::now()));
        }
        Ok(got.map(|sample| Message { sample }))
    }

    /// The next message, waiting at most `timeout`. `Ok(None)` at the deadline.
    ///
    /// Waiting spins on the queue for 50 µs (and, while messages flow, yields up to 2 ms),
    /// then blocks on the channel's event service (woken by each send of a bulkhead
    /// publisher), so an idle subscriber costs no CPU. The queue is checked before every
    /// wait and the publisher wakes after it queued: a message is never missed between
    /// the two. A publisher that does not wake (a raw iceoryx2 one) is seen at the
    /// deadline only.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Message>, RecvError> {
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            if let Some(m) = self.try_recv()? {
                return Ok(Some(m));
            }
            let now = Instant::now();
            // A reply in a busy exchange comes within microseconds: checking the queue
            // for a while spares the wake-up's latency. While messages flow (one came
            // within the last `BUSY`), the wait goes on spinning for `SPIN` and yielding
            // up to `YIELD`; an idle subscriber blocks at once (after `SPIN`).
            let waited = now.duration_since(start);
            let busy = self
                .last
                .get()
                .is_some_and(|t| now.duration_since(t) < BUSY);
            if now < deadline && waited < SPIN {
                std::hint::spin_loop();
                continue;
            }
            if now < deadline && busy && waited < YIELD {
                std::thread::yield_now();
                continue;
            }
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                return Ok(None);
            }
            // Every pending wake-up is taken at once: one check of the queue serves them.
            self.wake.timed_wait(|_| {}, left).map_err(|e| RecvError {
                service: self.service.clone(),
                reason: format!("cannot wait for a message: {e:?}"),
            })?;
        }
    }
}

/// How long [`Subscriber::recv_timeout`] spins on the queue before it yields or blocks.
const SPIN: Duration = Duration::from_micros(50);
/// How long it yields before it blocks, while messages flow.
const YIELD: Duration = Duration::from_millis(2);
/// Messages flow when one came within this long.
const BUSY: Duration = Duration::from_millis(100);

/// The event service a channel's publishers wake its subscribers with: the same name
/// as the channel's publish-subscribe service (the daemon creates both; see
/// [`crate::manager`]).
fn open_wake(
    node: &Node<Ipc>,
    service: &str,
) -> Result<iceoryx2::service::port_factory::event::PortFactory<Ipc>, OpenError> {
    node.service_builder(&service_name(service)?)
        .event()
        .open()
        .map_err(|e| OpenError::Service {
            service: service.to_owned(),
            reason: format!("its wake-up event: {e:?}"),
        })
}

/// A received message, read in place in shared memory. Dropping it releases the slot.
pub struct Message {
    sample: Sample<Ipc, [u8], ()>,
}

impl Deref for Message {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.sample.payload()
    }
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Message({} bytes)", self.len())
    }
}
