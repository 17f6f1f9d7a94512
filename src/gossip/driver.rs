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
//!   connection cannot tear down its successor.
//!
//! # Who dials
//!
//! As in [`super::proto`]: the slot with the smaller index dials. An incoming connection is
//! mapped from the region its certificate names (authenticated by the endpoint) to the
//! configured [`PeerId`]; a region that maps to no peer, to several peers, or to a peer that
//! we are supposed to dial is closed.
//!
//! # Time
//!
//! `now_us` is [`now_us`]: a monotonic clock (a Tokio [`Instant`] since a fixed per-process
//! origin) anchored at the wall-clock time of that origin. Monotonic, so the machine never
//! sees time go back; anchored at wall-clock time, so sub-window numbers agree between regions
//! (up to clock skew), as the usage CRDT needs. Build the [`Gossip`] with [`now_us`] too.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quinn::{Connection, SendStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::codec::{self, CodecError};
use super::proto::{Gossip, GossipStats, Inspection, Message, PeerId, PeerReport};
use super::quic::{
    self, CLOSE_PROTOCOL_ERROR, CLOSE_SHUTDOWN, FrameStream, GossipEndpoint, QuicError,
};
use crate::crdt::PolicyId;

/// Frames queued per peer before further ones are dropped (and repaired by the protocol).
const PEER_QUEUE: usize = 256;
/// IO events queued towards the driver loop; producers wait when it is full (they are
/// tasks of the driver itself, never the request path).
const EVENT_QUEUE: usize = 64;
/// How long an accepted connection may take to open its gossip stream (the dialler sends
/// its `Hello` at once; a peer that does not is dropped rather than kept half-open).
const ACCEPT_STREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// Close code: the peer connected although we are the side that dials it, or its region
/// does not name exactly one configured peer.
pub const CLOSE_UNEXPECTED_PEER: quinn::VarInt = quinn::VarInt::from_u32(0x13);
/// Close code: the connection was replaced by a newer one with the same peer.
pub const CLOSE_REPLACED: quinn::VarInt = quinn::VarInt::from_u32(0x14);

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
    /// Taking the gossip stream of an accepted connection failed or timed out.
    #[error("accepting peer {peer:?}: {reason}")]
    Accept {
        /// The peer that connected.
        peer: PeerId,
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

// ----- time -----

fn origin() -> &'static (Instant, u64) {
    static ORIGIN: OnceLock<(Instant, u64)> = OnceLock::new();
    ORIGIN.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            // A clock before 1970 is broken; any fixed start keeps the clock monotonic.
            .unwrap_or(0);
        (Instant::now(), wall)
    })
}

/// The gossip clock in microseconds: monotonic, anchored at the wall-clock time of a fixed
/// per-process origin (see the module docs). Use it for [`Gossip::new`] as well.
pub fn now_us() -> u64 {
    let (start, wall) = origin();
    let elapsed = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    wall.saturating_add(elapsed)
}

fn instant_of(us: u64) -> Instant {
    let (start, wall) = origin();
    *start + Duration::from_micros(us.saturating_sub(*wall))
}

// ----- the handle -----

struct Shared {
    gossip: Mutex<Gossip>,
    /// Wakes the driver loop: the machine may have something to send or a new deadline.
    wake: Notify,
    /// Frames dropped because a peer's queue was full (or it had no connection).
    dropped: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Gossip> {
        // The machine does not panic on any input (see `proto`); if a bug made it panic
        // anyway, its state is still a valid CRDT state, so keep serving rather than
        // propagate the poison to every request.
        self.gossip.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The limiter's view of the gossip machine: cheap to clone, every call is one short
/// critical section, and calls that change state wake the driver so gossip goes out.
#[derive(Clone)]
pub struct GossipHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for GossipHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GossipHandle").finish_non_exhaustive()
    }
}

impl GossipHandle {
    /// See [`Gossip::try_admit_eventual`].
    pub fn try_admit_eventual(&self, policy: PolicyId, key: &str, cost: u64, limit: u64) -> bool {
        let ok = self
            .shared
            .lock()
            .try_admit_eventual(policy, key, cost, limit, now_us());
        self.shared.wake.notify_one();
        ok
    }

    /// See [`Gossip::try_admit_strict`] (may queue `Ask`s, hence the wake-up).
    pub fn try_admit_strict(&self, policy: PolicyId, key: &str, cost: u64) -> bool {
        let ok = self
            .shared
            .lock()
            .try_admit_strict(policy, key, cost, now_us());
        self.shared.wake.notify_one();
        ok
    }

    /// See [`Gossip::inspect`].
    pub fn inspect(&self, policy: PolicyId, key: &str) -> Inspection {
        self.shared.lock().inspect(policy, key, now_us())
    }

    /// See [`Gossip::count`].
    pub fn count(&self, policy: PolicyId, key: &str) -> u64 {
        self.shared.lock().count(policy, key, now_us())
    }

    /// See [`Gossip::peer_status`].
    pub fn peer_status(&self) -> Vec<PeerReport> {
        self.shared.lock().peer_status()
    }

    /// See [`Gossip::stats`].
    pub fn stats(&self) -> GossipStats {
        self.shared.lock().stats()
    }

    /// Frames dropped by the driver: a peer's queue was full, or it had no connection.
    pub fn dropped_frames(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

// ----- the driver -----

/// The running driver. Dropping it does not stop it; call [`DriverTask::shutdown`].
#[derive(Debug)]
pub struct DriverTask {
    join: JoinHandle<()>,
    stop: Arc<Notify>,
    endpoint: Arc<GossipEndpoint>,
}

impl DriverTask {
    /// Closes the endpoint (every connection, with [`CLOSE_SHUTDOWN`]), stops the driver and
    /// its connection tasks, and waits for it to finish.
    pub async fn shutdown(self) -> Result<(), DriverError> {
        self.endpoint.close();
        self.stop.notify_one();
        self.join.await?;
        Ok(())
    }

    /// Whether the driver loop has ended (only after [`DriverTask::shutdown`] or a panic).
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }
}

/// A connection the driver loop owns.
struct Link {
    generation: u64,
    connection: Connection,
    frames: mpsc::Sender<Vec<u8>>,
}

enum Event {
    /// A connection (dialled or accepted) is ready, with its stream.
    Up {
        peer: PeerId,
        connection: Connection,
        send: SendStream,
        recv: FrameStream,
    },
    /// A dial failed.
    DialFailed { peer: PeerId },
    /// A connection's reader or writer ended.
    Down { peer: PeerId, generation: u64 },
}

/// Starts the driver for `gossip` on `endpoint`. `peers` lists every other slot: its
/// [`PeerId`], address, and the region its certificate names (the TLS server name).
/// Must run inside a Tokio runtime.
pub fn spawn_driver(
    gossip: Gossip,
    endpoint: GossipEndpoint,
    peers: Vec<(PeerId, SocketAddr, String)>,
) -> (GossipHandle, DriverTask) {
    let me = gossip.id();
    let shared = Arc::new(Shared {
        gossip: Mutex::new(gossip),
        wake: Notify::new(),
        dropped: AtomicU64::new(0),
    });
    let endpoint = Arc::new(endpoint);
    let stop = Arc::new(Notify::new());
    let peers: HashMap<PeerId, (SocketAddr, String)> = peers
        .into_iter()
        .filter(|(peer, _, _)| *peer != me)
        .map(|(peer, addr, region)| (peer, (addr, region.to_ascii_lowercase())))
        .collect();
    let driver = Driver {
        me,
        shared: shared.clone(),
        endpoint: endpoint.clone(),
        peers: Arc::new(peers),
        links: HashMap::new(),
        next_generation: 0,
        tasks: JoinSet::new(),
    };
    let join = tokio::spawn(driver.run(stop.clone()));
    (
        GossipHandle { shared },
        DriverTask {
            join,
            stop,
            endpoint,
        },
    )
}

struct Driver {
    me: PeerId,
    shared: Arc<Shared>,
    endpoint: Arc<GossipEndpoint>,
    peers: Arc<HashMap<PeerId, (SocketAddr, String)>>,
    links: HashMap<PeerId, Link>,
    next_generation: u64,
    /// Every task the driver started; dropped (hence aborted) when the loop ends.
    tasks: JoinSet<()>,
}

impl Driver {
    async fn run(mut self, stop: Arc<Notify>) {
        let (events_tx, mut events) = mpsc::channel(EVENT_QUEUE);
        self.tasks.spawn(accept_loop(
            self.me,
            self.endpoint.clone(),
            self.peers.clone(),
            events_tx.clone(),
        ));
        loop {
            let deadline = self.drain(&events_tx);
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(instant_of(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.notified() => break,
                () = sleep => {
                    self.shared.lock().handle_timeout(now_us());
                }
                () = self.shared.wake.notified() => {}
                Some(event) = events.recv() => self.on_event(event, &events_tx),
                // Reap finished tasks so the set does not grow with connection churn.
                Some(_) = self.tasks.join_next() => {}
            }
        }
        for link in self.links.values() {
            link.connection.close(CLOSE_SHUTDOWN, b"shutdown");
        }
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
            g.poll_timeout()
        };
        for peer in closes {
            // The machine already counts it as disconnected.
            if let Some(link) = self.links.remove(&peer) {
                link.connection.close(CLOSE_SHUTDOWN, b"idle");
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
                    if link.frames.try_send(frame).is_err() {
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
        let Some((addr, region)) = self.peers.get(&peer).cloned() else {
            // A slot without an address: report the failure so the machine backs off.
            tracing::warn!(?peer, "gossip peer has no configured address");
            self.shared.lock().on_disconnected(peer, now_us());
            return;
        };
        let endpoint = self.endpoint.clone();
        let events = events.clone();
        self.tasks.spawn(async move {
            let result = async {
                let connection = endpoint.connect(addr, &region).await?;
                let (send, recv) = quic::open_stream(&connection, endpoint.max_frame()).await?;
                Ok::<_, QuicError>((connection, send, recv))
            }
            .await;
            let event = match result {
                Ok((connection, send, recv)) => Event::Up {
                    peer,
                    connection,
                    send,
                    recv,
                },
                Err(source) => {
                    let error = DriverError::Dial { peer, source };
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
            } => {
                let generation = self.next_generation;
                self.next_generation = self.next_generation.wrapping_add(1);
                let (frames_tx, frames_rx) = mpsc::channel(PEER_QUEUE);
                if let Some(old) = self.links.insert(
                    peer,
                    Link {
                        generation,
                        connection: connection.clone(),
                        frames: frames_tx,
                    },
                ) {
                    old.connection.close(CLOSE_REPLACED, b"replaced");
                }
                self.tasks.spawn(write_loop(
                    peer,
                    generation,
                    connection,
                    send,
                    frames_rx,
                    events.clone(),
                ));
                self.tasks.spawn(read_loop(
                    peer,
                    generation,
                    recv,
                    self.shared.clone(),
                    events.clone(),
                ));
                // Queues our Hello, which the next drain hands to the writer: the dialler
                // thereby sends first, as QUIC needs to announce the stream.
                self.shared.lock().on_connected(peer, now_us());
            }
            Event::DialFailed { peer } => {
                self.shared.lock().on_disconnected(peer, now_us());
            }
            Event::Down { peer, generation } => {
                if self
                    .links
                    .get(&peer)
                    .is_some_and(|l| l.generation == generation)
                {
                    if let Some(link) = self.links.remove(&peer) {
                        link.connection.close(CLOSE_SHUTDOWN, b"closed");
                    }
                    self.shared.lock().on_disconnected(peer, now_us());
                }
            }
        }
    }
}

/// Decodes the peer's messages into the machine. Ends (and reports) when the stream does.
async fn read_loop(
    peer: PeerId,
    generation: u64,
    mut recv: FrameStream,
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
) {
    loop {
        match recv.recv::<Message>().await {
            Ok(Some(msg)) => {
                shared.lock().handle(now_us(), peer, msg);
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

/// Writes queued frames to the peer. Ends (and reports) on a write error; finishes the
/// stream when the driver drops the queue (connection replaced or closed).
async fn write_loop(
    peer: PeerId,
    generation: u64,
    connection: Connection,
    mut send: SendStream,
    mut frames: mpsc::Receiver<Vec<u8>>,
    events: mpsc::Sender<Event>,
) {
    while let Some(frame) = frames.recv().await {
        if let Err(error) = quic::send_frame(&mut send, &frame).await {
            tracing::debug!(?peer, %error, "gossip write failed");
            connection.close(CLOSE_PROTOCOL_ERROR, b"write failed");
            // Fails only when the driver has stopped.
            let _ = events.send(Event::Down { peer, generation }).await;
            return;
        }
    }
    // The driver dropped the queue: nothing more to say on this stream.
    let _ = send.finish();
}

/// Hands accepted connections to the driver, mapped to their peer.
async fn accept_loop(
    me: PeerId,
    endpoint: Arc<GossipEndpoint>,
    peers: Arc<HashMap<PeerId, (SocketAddr, String)>>,
    events: mpsc::Sender<Event>,
) {
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            accepted = endpoint.accept() => {
                let Some(accepted) = accepted else { break };
                let region = accepted.region.to_ascii_lowercase();
                let mut matching = peers.iter().filter(|(_, (_, r))| *r == region);
                let peer = match (matching.next(), matching.next()) {
                    (Some((&peer, _)), None) if peer < me => peer,
                    _ => {
                        // Unknown region, ambiguous region, or a peer we dial ourselves.
                        tracing::debug!(%region, "unexpected gossip peer closed");
                        accepted.connection.close(CLOSE_UNEXPECTED_PEER, b"unexpected peer");
                        continue;
                    }
                };
                let max_frame = endpoint.max_frame();
                let events = events.clone();
                handshakes.spawn(async move {
                    let connection = accepted.connection;
                    let stream = tokio::time::timeout(
                        ACCEPT_STREAM_TIMEOUT,
                        quic::accept_stream(&connection, max_frame),
                    )
                    .await;
                    match stream {
                        Ok(Ok((send, recv))) => {
                            // Fails only when the driver has stopped.
                            let _ = events
                                .send(Event::Up { peer, connection, send, recv })
                                .await;
                        }
                        Ok(Err(source)) => {
                            let error = DriverError::Accept { peer, reason: source.to_string() };
                            tracing::debug!(%error, "gossip accept failed");
                        }
                        Err(_) => {
                            connection.close(CLOSE_PROTOCOL_ERROR, b"no stream");
                            let error = DriverError::Accept {
                                peer,
                                reason: "no stream opened in time".to_owned(),
                            };
                            tracing::debug!(%error, "gossip accept failed");
                        }
                    }
                });
            }
            Some(_) = handshakes.join_next() => {}
        }
    }
}
