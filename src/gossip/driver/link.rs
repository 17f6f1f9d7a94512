//! One connection with a peer: its reader and writer tasks, the budget on what its reader
//! feeds the machine, and the [`Link`] the connection table owns.
//!
//! Separate because everything that belongs to one connection is here, and goes with it:
//! dropping a [`Link`] closes the connection and retires its generation, so nothing of a
//! replaced or lost connection is left to be cleared by hand.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use quinn::{Connection, SendStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::accept::{log_refusal, refusal_reason};
use super::{
    CLOSE_BAD_HELLO, CLOSE_REPLACED, Driver, DriverError, Event, HELLOS_REFUSED_TOTAL, PEER_QUEUE,
    PEER_QUEUE_BYTES, handle::Shared,
};
use crate::clock::now_us;
use crate::gossip::proto::{HelloRefusal, Message, PeerId};
use crate::gossip::quic::{self, CLOSE_PROTOCOL_ERROR, CLOSE_SHUTDOWN, FrameStream};

/// A connection the driver loop owns, in its connection table. It is the peer's current
/// connection from [`Link::new`] until it is dropped: dropping it closes the connection
/// (with the code [`Link::close`] chose, or a plain close) and, unless a successor already
/// took over, tells the readers that the peer has no current connection.
pub(super) struct Link {
    pub(super) generation: u64,
    pub(super) connection: Connection,
    /// The writer's queue; `None` once handed back so the writer finishes (shutdown).
    pub(super) frames: Option<mpsc::Sender<Vec<u8>>>,
    /// Bytes in `frames` (and the one being written), shared with the writer.
    queued_bytes: Arc<AtomicUsize>,
    pub(super) writer: JoinHandle<()>,
    peer: PeerId,
    shared: Arc<Shared>,
    close_with: (quinn::VarInt, &'static [u8]),
}

impl Link {
    /// Makes `generation` the peer's current connection. Call under the machine's lock:
    /// from then on only this connection's reader is heard.
    pub(super) fn new(
        peer: PeerId,
        generation: u64,
        connection: Connection,
        frames: mpsc::Sender<Vec<u8>>,
        queued_bytes: Arc<AtomicUsize>,
        writer: JoinHandle<()>,
        shared: Arc<Shared>,
    ) -> Self {
        shared.make_current(peer, generation);
        Self {
            generation,
            connection,
            frames: Some(frames),
            queued_bytes,
            writer,
            peer,
            shared,
            close_with: (CLOSE_SHUTDOWN, b"closed"),
        }
    }

    /// Drops the link, closing its connection with `code` and `reason`.
    pub(super) fn close(mut self, code: quinn::VarInt, reason: &'static [u8]) {
        self.close_with = (code, reason);
    }

    /// Queues a frame for the writer; `false` when the queue is full (in frames or in
    /// bytes) or gone: the frame is dropped and the protocol repairs the loss. A frame alone
    /// in the queue is taken whatever its size (it is at most `max_frame`).
    pub(super) fn try_send(&self, frame: Vec<u8>) -> bool {
        let Some(frames) = self.frames.as_ref() else {
            return false;
        };
        let len = frame.len();
        let queued = self.queued_bytes.load(Ordering::Acquire);
        if queued > 0 && queued.saturating_add(len) > PEER_QUEUE_BYTES {
            return false;
        }
        // Counted before the send so the writer's decrement can never come first.
        self.queued_bytes.fetch_add(len, Ordering::AcqRel);
        if frames.try_send(frame).is_ok() {
            true
        } else {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            false
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shared.withdraw(self.peer, self.generation);
        let (code, reason) = self.close_with;
        self.connection.close(code, reason);
    }
}

impl Driver {
    /// A connection is ready. An accepted one carries the `Hello` that must be vetted
    /// before the peer's live link is touched; a dialled one was asked for by the machine,
    /// so there is no live link to protect.
    pub(super) fn on_up(
        &mut self,
        peer: PeerId,
        connection: Connection,
        send: SendStream,
        recv: FrameStream,
        hello: Option<Message>,
        events: &mpsc::Sender<Event>,
    ) {
        let now = now_us();
        if let Some(Message::Hello {
            actor,
            config_digest,
        }) = &hello
        {
            let vetted = self
                .shared
                .lock()
                .vet_hello(now, peer, actor, *config_digest);
            if let Err(refusal) = vetted {
                connection.close(CLOSE_BAD_HELLO, refusal_reason(refusal).as_bytes());
                metrics::counter!(HELLOS_REFUSED_TOTAL, "reason" => refusal_reason(refusal))
                    .increment(1);
                let error = DriverError::Hello {
                    gateway: actor.slot(),
                    refusal,
                };
                let addr = connection.remote_address();
                match refusal {
                    // The genuine process reconnecting before its old link timed out.
                    HelloRefusal::AlreadyConnected => {
                        tracing::debug!(%error, "gossip peer refused")
                    }
                    HelloRefusal::Stale { .. } => {
                        log_refusal(&self.shared, refusal_reason(refusal), addr, &error, true)
                    }
                    _ => log_refusal(&self.shared, refusal_reason(refusal), addr, &error, false),
                }
                return;
            }
        }
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        let (frames_tx, frames_rx) = mpsc::channel(PEER_QUEUE);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let writer = tokio::spawn(write_loop(
            peer,
            generation,
            connection.clone(),
            send,
            (frames_rx, queued_bytes.clone()),
            events.clone(),
        ));
        let mut g = self.shared.lock();
        let link = Link::new(
            peer,
            generation,
            connection,
            frames_tx,
            queued_bytes,
            writer,
            self.shared.clone(),
        );
        if let Some(old) = self.links.insert(peer, link) {
            old.close(CLOSE_REPLACED, b"replaced");
        }
        self.tasks.spawn(read_loop(
            peer,
            generation,
            recv,
            self.shared.clone(),
            events.clone(),
        ));
        // Queues our Hello, which the next drain hands to the writer: the dialler thereby
        // sends first, as QUIC needs to announce the stream.
        g.on_connected(peer, now);
        if let Some(hello) = hello {
            g.handle(now, peer, hello);
        }
    }
}

/// Decodes the peer's messages into the machine. Ends (and reports) when the stream does.
pub(super) async fn read_loop(
    peer: PeerId,
    generation: u64,
    mut recv: FrameStream,
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
) {
    let mut budget = InputBudget::new(Instant::now());
    loop {
        match recv.recv::<Message>().await {
            Ok(Some(msg)) => {
                if let Some(wait) = budget.take(Instant::now()) {
                    // Over budget: stop reading for a while; QUIC's flow control then holds
                    // the flood at the sender instead of in our memory or under our lock.
                    tokio::time::sleep(wait).await;
                }
                let mut g = shared.lock();
                if !shared.is_current(peer, generation) {
                    // Replaced: what this connection says is no longer the peer's word.
                    break;
                }
                g.handle(now_us(), peer, msg);
                drop(g);
                shared.wake.notify_one();
            }
            Ok(None) => break,
            Err(error) => {
                tracing::debug!(?peer, %error, "gossip stream ended");
                break;
            }
        }
    }
    // Fails only when the driver has stopped.
    let _ = events.send(Event::Down { peer, generation }).await;
}

/// Messages one connection may have handled per second, sustained, and at once after a
/// quiet spell. An honest peer sends a few hundred a second (deltas in chunks, acks, and at
/// most one `Ask` per hot key and interval); a flood beyond this waits, so the machine's
/// lock, which every request takes, is never held for a peer more than a bounded share of
/// the time.
const MESSAGES_PER_SECOND: u32 = 20_000;

/// A token bucket over one connection's messages (see [`MESSAGES_PER_SECOND`]).
struct InputBudget {
    tokens: u32,
    refilled: Instant,
}

impl InputBudget {
    fn new(now: Instant) -> Self {
        Self {
            tokens: MESSAGES_PER_SECOND,
            refilled: now,
        }
    }

    /// Takes one message's token; `Some(wait)` when the bucket is empty and the reader must
    /// pause that long first (the token is then taken for it).
    fn take(&mut self, now: Instant) -> Option<Duration> {
        let per_token = Duration::from_secs(1) / MESSAGES_PER_SECOND;
        let elapsed = now.saturating_duration_since(self.refilled);
        let earned = elapsed.as_nanos() / per_token.as_nanos().max(1);
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(earned).min(MESSAGES_PER_SECOND);
            self.refilled = if self.tokens == MESSAGES_PER_SECOND {
                now
            } else {
                self.refilled + per_token * earned
            };
        }
        if self.tokens > 0 {
            self.tokens -= 1;
            None
        } else {
            self.refilled += per_token;
            Some(self.refilled.saturating_duration_since(now))
        }
    }
}

/// Writes queued frames to the peer. Ends (and reports) on a write error; finishes the
/// stream when the driver drops the queue (connection replaced or closed).
pub(super) async fn write_loop(
    peer: PeerId,
    generation: u64,
    connection: Connection,
    mut send: SendStream,
    (mut frames, queued_bytes): (mpsc::Receiver<Vec<u8>>, Arc<AtomicUsize>),
    events: mpsc::Sender<Event>,
) {
    while let Some(frame) = frames.recv().await {
        let written = quic::send_frame(&mut send, &frame).await;
        queued_bytes.fetch_sub(frame.len(), Ordering::AcqRel);
        if let Err(error) = written {
            tracing::debug!(?peer, %error, "gossip write failed");
            connection.close(CLOSE_PROTOCOL_ERROR, b"write failed");
            // Fails only when the driver has stopped.
            let _ = events.send(Event::Down { peer, generation }).await;
            return;
        }
    }
    // The driver dropped the queue: nothing more to say on this stream. Wait until the peer
    // has everything (the driver bounds this wait at shutdown; otherwise the stream of a
    // replaced connection is simply left to its close).
    if send.finish().is_ok() {
        let _ = send.stopped().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_input_budget_allows_its_rate_and_no_more() {
        let start = Instant::now();
        let mut budget = InputBudget::new(start);
        for _ in 0..MESSAGES_PER_SECOND {
            assert_eq!(budget.take(start), None);
        }
        // Empty: the next message waits one token's time, the one after two.
        let per_token = Duration::from_secs(1) / MESSAGES_PER_SECOND;
        assert_eq!(budget.take(start), Some(per_token));
        assert_eq!(budget.take(start), Some(per_token * 2));
        // A second later (after the two paid waits) a full second's worth is back, no more.
        let later = start + Duration::from_secs(1) + per_token * 2;
        let mut allowed = 0;
        while budget.take(later).is_none() {
            allowed += 1;
        }
        assert_eq!(allowed, MESSAGES_PER_SECOND);
    }
}
