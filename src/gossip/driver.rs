//! The thin IO driver that runs the pure [`Gossip`] state machine over the QUIC transport.
//!
//! # Why it is thin
//!
//! Every decision (whom to dial, what to send, when to give up on a peer) is taken by
//! [`Gossip`], which the simulator tests deterministically; this module only moves bytes and
//! events between it and [`GossipEndpoint`], so the untested surface stays small.
//!
//! # Shape
//!
//! - The machine lives in an `Arc<std::sync::Mutex<Gossip>>` shared by the [`GossipHandle`]
//!   (the limiter's request path: lock, call, unlock, notify) and the driver. Every critical
//!   section is a single non-blocking call into the machine, so a plain mutex is right: it is
//!   never held across an `.await`.
//! - One driver loop owns the connection table. It drains [`Gossip::poll_connect`],
//!   [`Gossip::poll_close`] and [`Gossip::poll_transmit`] after every event, then sleeps until
//!   [`Gossip::poll_timeout`], a [`Notify`] (a handle or a reader changed the machine), or an
//!   IO event (a dial finished, a connection was accepted or lost).
//! - Per connection: a reader task decodes [`Message`]s and feeds them to [`Gossip::handle`]
//!   under the lock, and a writer task drains a bounded channel into the send stream. A slow
//!   peer therefore only fills its own channel; when full, frames are dropped and counted
//!   ([`GossipHandle::dropped_frames`]) because the protocol repairs losses (deltas restart
//!   from what the peer confirmed; anti-entropy covers the rest).
//! - Connections are tagged with a generation, so a late "closed" report of a replaced
//!   connection cannot tear down its successor, and a reader of a replaced connection
//!   feeds nothing more to the machine: the current generation of every peer is kept beside
//!   the machine and checked under the same lock.
//!
//! # Who dials, and who gets in
//!
//! As in [`super::proto`]: the slot with the smaller index dials. Every gateway has its own
//! certificate, which names its `(region, instance)`; the endpoint admits only certificates
//! of configured gateways, so an accepted connection's slot is known before it says
//! anything. Its first message must be a `Hello` of that same gateway, and the machine vets
//! it ([`Gossip::vet_hello`]) *before* the driver touches the peer's live link: only a
//! validated `Hello` of a newer incarnation replaces a live connection. A connection from a
//! slot we dial ourselves, without a `Hello` in time, or whose `Hello` is refused, is closed
//! and counted, and logged at most once a minute per reason and address (then in a summary
//! with the count), so a peer reconnecting in a loop cannot flood the log. Connections waiting for their `Hello` are bounded per gateway
//! ([`MAX_PENDING_PER_GATEWAY`]) and in all, so a peer opening connections in a loop cannot
//! grow the driver's memory.
//!
//! # A second process with our identity
//!
//! Two processes started with the same certificate and instance would both spend the slot's
//! share. Peers refuse the older incarnation once they know the newer (and count it as a
//! duplicate), but only a message authenticated as our *own* gateway may make us stand
//! down, never a peer's word: every [`SELF_PROBE_EVERY`] the driver dials its own
//! configured address and exchanges `Hello`s with whoever answers with our certificate. If
//! that is another process with a newer incarnation, this one stops serving global policies
//! ([`Gossip::on_own_identity`]), says so at error level and in the
//! `tollgate_gossip_identity_conflict` gauge; the newer one learns of the older the same way
//! and keeps serving.
//!
//! # Shutdown
//!
//! [`DriverTask::shutdown`] first lets the machine retire ([`Gossip::retire`]: idle strict
//! rights handed to a peer, latest usage sent), then finishes every stream and waits, up to a
//! grace period, for the peers to acknowledge what was written, and only then closes the
//! connections: closing at once would discard frames still in flight.
//!
//! # Time
//!
//! `now_us` is [`crate::clock::now_us`]: a monotonic clock (a Tokio `Instant` since a fixed per-process
//! origin) anchored at the wall-clock time of that origin. Monotonic, so the machine never
//! sees time go back; anchored at wall-clock time, so sub-window numbers agree between regions
//! (up to clock skew), as the usage CRDT needs. Build the [`Gossip`] with it too.

//!
//! # Where things are
//!
//! This file holds the driver loop and what it drains from the machine; [`handle`] is the
//! request path's side, `link` one connection (its reader, writer and the [`Link`] the
//! connection table owns), `accept` the accepted connections and their `Hello`s, and
//! `identity` the self-probe. The clock is [`super::clock`].

mod accept;
mod handle;
mod identity;
mod link;

use crate::clock::now_us;
pub use handle::GossipHandle;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use quinn::{Connection, SendStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

use super::codec::{self, CodecError};
use super::proto::{Gossip, HelloRefusal, Message, PeerId};
use super::quic::{self, CLOSE_SHUTDOWN, FrameStream, GossipEndpoint, QuicError};
use crate::clock::instant_of;
use crate::crdt::Slot;
use accept::accept_loop;
use handle::Shared;
use link::Link;

/// Frames queued per peer before further ones are dropped (and repaired by the protocol).
/// Large, because one cleanup pass of the strict table queues up to 4,096 small settle
/// messages at once: with 256, 94% of them were dropped and idle keys were freed at about
/// 256 a second per peer (tests/churn.rs). Memory is bounded by [`PEER_QUEUE_BYTES`] instead.
const PEER_QUEUE: usize = 4096;
/// Bytes queued per peer before further frames are dropped: what a slow peer can make us
/// hold, whatever the size of the frames.
const PEER_QUEUE_BYTES: usize = 4 << 20;
/// IO events queued towards the driver loop; producers wait when it is full (they are
/// tasks of the driver itself, never the request path).
const EVENT_QUEUE: usize = 64;
/// How long an accepted connection may take to open its gossip stream and send its `Hello`
/// (the dialler sends it at once; a peer that does not is dropped rather than kept
/// half-open).
const ACCEPT_STREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// Close code: the peer connected although we are the side that dials it, or its region
/// does not name exactly one configured peer.
pub const CLOSE_UNEXPECTED_PEER: quinn::VarInt = quinn::VarInt::from_u32(0x13);
/// Close code: the connection was replaced by a newer one with the same peer.
pub const CLOSE_REPLACED: quinn::VarInt = quinn::VarInt::from_u32(0x14);
/// Close code: the peer's `Hello` was refused (see [`HelloRefusal`]).
pub const CLOSE_BAD_HELLO: quinn::VarInt = quinn::VarInt::from_u32(0x15);
/// Close code: a probe of our own identity ended (see the module docs).
pub const CLOSE_PROBE_DONE: quinn::VarInt = quinn::VarInt::from_u32(0x16);
/// Accepted connections of one gateway waiting for their `Hello` at once; more are closed.
pub const MAX_PENDING_PER_GATEWAY: usize = 2;
/// How often a gateway dials its own configured address to find a second process with its
/// identity (see the module docs).
pub const SELF_PROBE_EVERY: Duration = Duration::from_secs(10);
/// Gauge: 1 while this process does not serve global policies because a newer process
/// with its identity exists.
pub const IDENTITY_CONFLICT: &str = "tollgate_gossip_identity_conflict";
/// Counter: `Hello`s refused, by `reason` (see [`HelloRefusal`]).
pub const HELLOS_REFUSED_TOTAL: &str = "tollgate_gossip_hellos_refused_total";

/// What went wrong in the driver. None of these stop it: they are logged (and dials are
/// reported to the machine, which backs off); they exist so that logs and
/// [`DriverTask::shutdown`] say precisely what happened.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// Dialling a peer or opening its stream failed.
    #[error("dialling peer {peer:?}: {source}")]
    Dial {
        /// The peer dialled.
        peer: PeerId,
        /// Why.
        #[source]
        source: QuicError,
    },
    /// Taking the gossip stream of an accepted connection, or its `Hello`, failed or timed
    /// out.
    #[error("accepting gateway {gateway}: {reason}")]
    Accept {
        /// The gateway its certificate names.
        gateway: Slot,
        /// Why.
        reason: String,
    },
    /// A peer's `Hello` was refused.
    #[error("refused the Hello of {gateway}: {refusal}")]
    Hello {
        /// The gateway its certificate names.
        gateway: Slot,
        /// Why.
        refusal: HelloRefusal,
    },
    /// A peer's configured address does not resolve.
    #[error("resolving {addr} for peer {peer:?}: {reason}")]
    Resolve {
        /// The peer.
        peer: PeerId,
        /// The configured `host:port`.
        addr: String,
        /// Why.
        reason: String,
    },
    /// A message the machine produced could not be framed (a bug, or a frame bound that is
    /// too small for the configured chunk size).
    #[error("cannot frame a message for {peer:?}: {source}")]
    Encode {
        /// The destination.
        peer: PeerId,
        /// Why.
        #[source]
        source: CodecError,
    },
    /// The driver loop panicked or was cancelled.
    #[error("gossip driver task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

// ----- the driver -----

/// The running driver. Dropping it does not stop it; call [`DriverTask::shutdown`].
#[derive(Debug)]
pub struct DriverTask {
    join: JoinHandle<()>,
    stop: Option<oneshot::Sender<Duration>>,
    endpoint: Arc<GossipEndpoint>,
}

impl DriverTask {
    /// Retires the machine (idle strict rights handed to a peer, last usage sent; see the
    /// module docs), waits up to `grace` for the peers to receive it, then closes every
    /// connection and stops the driver and its connection tasks.
    pub async fn shutdown(mut self, grace: Duration) -> Result<(), DriverError> {
        if let Some(stop) = self.stop.take() {
            // Fails only if the loop already ended, and then there is nothing to stop.
            let _ = stop.send(grace);
        }
        let result = (&mut self.join).await;
        self.endpoint.close();
        result?;
        Ok(())
    }

    /// Whether the driver loop has ended (only after [`DriverTask::shutdown`] or a panic).
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }
}

/// Where a peer is and what its certificate must say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddress {
    /// The peer's slot index.
    pub peer: PeerId,
    /// `host:port`, resolved at every dial (so a container that moves keeps working).
    pub addr: String,
    /// The region its certificate names (the TLS server name).
    pub region: String,
    /// Its instance within the region (what its certificate and `Hello` must name).
    pub instance: String,
}

impl PeerAddress {
    /// The gateway its certificate must name.
    pub fn gateway(&self) -> Slot {
        Slot::new(self.region.clone(), self.instance.clone())
    }
}

enum Event {
    /// A connection (dialled or accepted) is ready, with its stream and, for an accepted
    /// one, the `Hello` that identified it.
    Up {
        peer: PeerId,
        connection: Connection,
        send: SendStream,
        recv: Box<FrameStream>,
        hello: Option<Box<Message>>,
    },
    /// A dial failed.
    DialFailed { peer: PeerId },
    /// A connection's reader or writer ended.
    Down { peer: PeerId, generation: u64 },
    /// A process presenting our own certificate announced this incarnation.
    OwnIdentity { incarnation: u64 },
}

/// Starts the driver for `gossip` on `endpoint`, with every other slot's address. Must run
/// inside a Tokio runtime.
pub fn spawn_driver(
    gossip: Gossip,
    endpoint: GossipEndpoint,
    peers: Vec<PeerAddress>,
) -> (GossipHandle, DriverTask) {
    let me = gossip.id();
    let shared = Arc::new(Shared::new(gossip));
    let endpoint = Arc::new(endpoint);
    let (stop_tx, stop_rx) = oneshot::channel();
    let mut own_address = None;
    let mut others = HashMap::new();
    for mut p in peers {
        p.region.make_ascii_lowercase();
        p.instance.make_ascii_lowercase();
        if p.peer == me {
            own_address = Some(p);
        } else {
            others.insert(p.peer, p);
        }
    }
    let driver = Driver {
        me,
        shared: shared.clone(),
        endpoint: endpoint.clone(),
        peers: Arc::new(others),
        own_address,
        links: HashMap::new(),
        next_generation: 0,
        tasks: JoinSet::new(),
    };
    let join = tokio::spawn(driver.run(stop_rx));
    (
        GossipHandle { shared },
        DriverTask {
            join,
            stop: Some(stop_tx),
            endpoint,
        },
    )
}

struct Driver {
    me: PeerId,
    shared: Arc<Shared>,
    endpoint: Arc<GossipEndpoint>,
    peers: Arc<HashMap<PeerId, PeerAddress>>,
    /// Our own slot's configured address, dialled to find a second process with our
    /// identity (see the module docs).
    own_address: Option<PeerAddress>,
    links: HashMap<PeerId, Link>,
    next_generation: u64,
    /// Every task the driver started but the writers; dropped (hence aborted) when the loop
    /// ends.
    tasks: JoinSet<()>,
}

impl Driver {
    async fn run(mut self, mut stop: oneshot::Receiver<Duration>) {
        let (events_tx, mut events) = mpsc::channel(EVENT_QUEUE);
        let me = self.own_address.as_ref().map(PeerAddress::gateway);
        self.tasks.spawn(accept_loop(
            self.me,
            me,
            self.endpoint.clone(),
            self.peers.clone(),
            self.shared.clone(),
            events_tx.clone(),
        ));
        let mut probe = tokio::time::interval(SELF_PROBE_EVERY);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let grace = loop {
            let deadline = self.drain(&events_tx);
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(instant_of(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                grace = &mut stop => break grace.unwrap_or(Duration::ZERO),
                () = sleep => {
                    self.shared.lock().handle_timeout(now_us());
                }
                () = self.shared.wake.notified() => {}
                Some(event) = events.recv() => self.on_event(event, &events_tx),
                _ = probe.tick() => self.probe_own_identity(&events_tx),
                // Reap finished tasks so the set does not grow with connection churn.
                Some(_) = self.tasks.join_next() => {}
            }
        };
        self.retire(grace, &events_tx).await;
    }

    /// The graceful end: retire the machine, hand its last frames to the writers, finish
    /// the streams and wait (up to `grace`) until the peers have them, then close.
    async fn retire(mut self, grace: Duration, events: &mpsc::Sender<Event>) {
        let handed_over = self.shared.lock().retire(now_us());
        self.drain(events);
        let mut links: Vec<Link> = self.links.drain().map(|(_, link)| link).collect();
        for link in &mut links {
            // Dropping the queue makes the writer send what is queued, then finish.
            link.frames = None;
        }
        let flushed = tokio::time::timeout(grace, async {
            for link in &mut links {
                let _ = (&mut link.writer).await;
            }
        })
        .await
        .is_ok();
        for link in links {
            link.writer.abort();
            link.close(CLOSE_SHUTDOWN, b"shutdown");
        }
        tracing::info!(
            strict_rights_handed_over = handed_over,
            flushed,
            "gossip retired"
        );
    }

    /// Drains everything the machine wants done and returns its next deadline.
    fn drain(&mut self, events: &mpsc::Sender<Event>) -> Option<u64> {
        let mut dials = Vec::new();
        let mut closes = Vec::new();
        let mut out = Vec::new();
        let deadline = {
            let mut g = self.shared.lock();
            let now = now_us();
            while let Some(peer) = g.poll_connect(now) {
                dials.push(peer);
            }
            while let Some(peer) = g.poll_close() {
                closes.push(peer);
            }
            while let Some(item) = g.poll_transmit(now) {
                out.push(item);
            }
            let deadline = g.poll_timeout();
            // Under the lock: a change made after this sees the deadline the driver will
            // sleep until (see `Shared::armed_until`).
            self.shared
                .armed_until
                .store(deadline.unwrap_or(u64::MAX), Ordering::Release);
            deadline
        };
        for peer in closes {
            // The machine already counts it as disconnected.
            if let Some(link) = self.links.remove(&peer) {
                link.close(CLOSE_SHUTDOWN, b"idle");
            }
        }
        for peer in dials {
            self.dial(peer, events);
        }
        let max_frame = self.endpoint.max_frame();
        for (peer, msg) in out {
            let Some(link) = self.links.get(&peer) else {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            match codec::encode(&msg, max_frame) {
                Ok(frame) => {
                    metrics::counter!(crate::metrics::GOSSIP_SENT_BYTES_TOTAL)
                        .increment(frame.len() as u64);
                    if !link.try_send(frame) {
                        self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(source) => {
                    self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                    let error = DriverError::Encode { peer, source };
                    tracing::warn!(%error, "gossip frame dropped");
                }
            }
        }
        deadline
    }

    fn dial(&mut self, peer: PeerId, events: &mpsc::Sender<Event>) {
        let Some(address) = self.peers.get(&peer).cloned() else {
            // A slot without an address: report the failure so the machine backs off.
            tracing::warn!(?peer, "gossip peer has no configured address");
            self.shared.lock().on_disconnected(peer, now_us());
            return;
        };
        let endpoint = self.endpoint.clone();
        let events = events.clone();
        self.tasks.spawn(async move {
            let result = async {
                let addr = resolve(peer, &address.addr).await?;
                let connection = endpoint
                    .connect(addr, &address.gateway())
                    .await
                    .map_err(|source| DriverError::Dial { peer, source })?;
                let (send, recv) = quic::open_stream(&connection, endpoint.max_frame())
                    .await
                    .map_err(|source| DriverError::Dial { peer, source })?;
                Ok::<_, DriverError>((connection, send, recv))
            }
            .await;
            let event = match result {
                Ok((connection, send, recv)) => Event::Up {
                    peer,
                    connection,
                    send,
                    recv: Box::new(recv),
                    hello: None,
                },
                Err(error) => {
                    tracing::debug!(%error, "gossip dial failed");
                    Event::DialFailed { peer }
                }
            };
            // Fails only when the driver has stopped, and then nobody needs the event.
            let _ = events.send(event).await;
        });
    }

    fn on_event(&mut self, event: Event, events: &mpsc::Sender<Event>) {
        match event {
            Event::Up {
                peer,
                connection,
                send,
                recv,
                hello,
            } => self.on_up(peer, connection, send, *recv, hello.map(|h| *h), events),
            Event::DialFailed { peer } => {
                self.shared.lock().on_disconnected(peer, now_us());
            }
            Event::Down { peer, generation } => {
                if self
                    .links
                    .get(&peer)
                    .is_some_and(|l| l.generation == generation)
                {
                    let mut g = self.shared.lock();
                    // Dropped under the machine's lock: its reader is not heard from now on.
                    drop(self.links.remove(&peer));
                    g.on_disconnected(peer, now_us());
                }
            }
            Event::OwnIdentity { incarnation } => self.on_own_identity(incarnation),
        }
    }
}

/// Resolves a configured `host:port` (the first address it gives).
async fn resolve(peer: PeerId, addr: &str) -> Result<SocketAddr, DriverError> {
    let error = |reason: String| DriverError::Resolve {
        peer,
        addr: addr.to_owned(),
        reason,
    };
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| error(e.to_string()))?
        .next()
        .ok_or_else(|| error("no address".to_owned()))
}
