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
//! and counted. Connections waiting for their `Hello` are bounded per gateway
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
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::codec::{self, CodecError};
use super::proto::{
    Gossip, GossipStats, HelloRefusal, Inspection, Message, OwnIdentity, PeerId, PeerReport,
};
use super::quic::{
    self, CLOSE_PROTOCOL_ERROR, CLOSE_SHUTDOWN, FrameStream, GossipEndpoint, QuicError,
};
use crate::crdt::{PolicyId, Slot};
use crate::limit::policy::GlobalMode;

/// Frames queued per peer before further ones are dropped (and repaired by the protocol).
const PEER_QUEUE: usize = 256;
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
    /// The instant (µs) the driver sleeps until, set under the machine's lock as it goes to
    /// sleep (`u64::MAX`: no deadline). A request that changes the machine wakes the driver
    /// only if there is output now or the next deadline moved before this one: admissions
    /// come by the ten thousand per second and most change nothing the driver must act on
    /// before its next delta, so waking it for each cost a task wake-up, a lock and a new
    /// timer per request.
    armed_until: AtomicU64,
    /// Frames dropped because a peer's queue was full (or it had no connection).
    dropped: AtomicU64,
    /// The generation of each peer's current connection (`u64::MAX`: none), indexed by
    /// slot. Written by the driver loop and read by the readers, both under the machine's
    /// lock, so a reader of a replaced connection never feeds the machine after its
    /// successor took over.
    generations: Vec<AtomicU64>,
}

impl Shared {
    /// Wakes the driver if what changed in `g` needs it before its armed deadline.
    fn nudge(&self, g: &Gossip) {
        let due = g.poll_timeout().unwrap_or(u64::MAX);
        if g.has_output() || due < self.armed_until.load(Ordering::Acquire) {
            self.wake.notify_one();
        }
    }

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
        let mut g = self.shared.lock();
        let ok = g.try_admit_eventual(policy, key, cost, limit, now_us());
        self.shared.nudge(&g);
        ok
    }

    /// See [`Gossip::try_admit_strict`] (may queue `Ask`s, hence the wake-up).
    pub fn try_admit_strict(&self, policy: PolicyId, key: &str, cost: u64) -> bool {
        let mut g = self.shared.lock();
        let ok = g.try_admit_strict(policy, key, cost, now_us());
        self.shared.nudge(&g);
        ok
    }

    /// Decides the request's global policies together under one lock: all admitted, or none
    /// (what was taken is given back). Returns the outcome per check, with the instant of
    /// the decision for [`GossipHandle::refund`]. Never waits for another region: the
    /// decision is local, from the rights and counts gossip has brought so far.
    pub fn admit(&self, checks: &[GlobalCheck<'_>]) -> (Vec<GlobalOutcome>, u64) {
        let now = now_us();
        let mut outcomes = Vec::with_capacity(checks.len());
        {
            let mut g = self.shared.lock();
            if g.identity_conflict().is_some() {
                // A newer process with our identity serves the slot: spending its share
                // here too would admit it twice (see the module docs).
                let refused = GlobalOutcome {
                    admitted: false,
                    remaining: 0,
                };
                return (vec![refused; checks.len()], now);
            }
            for check in checks {
                let admitted = match check.mode {
                    GlobalMode::Eventual => {
                        g.try_admit_eventual(check.policy, check.key, check.cost, check.quota, now)
                    }
                    GlobalMode::Strict => {
                        g.try_admit_strict(check.policy, check.key, check.cost, now)
                    }
                };
                outcomes.push(GlobalOutcome {
                    admitted,
                    remaining: 0,
                });
            }
            // All or nothing: a policy that admitted is refunded when another refused (its
            // outcome still says it admitted, so the caller names only the refusing ones).
            if outcomes.iter().any(|o| !o.admitted) {
                for (check, outcome) in checks.iter().zip(&outcomes) {
                    if outcome.admitted {
                        refund_one(&mut g, check, now, now);
                    }
                }
            }
            for (check, outcome) in checks.iter().zip(&mut outcomes) {
                outcome.remaining = match check.mode {
                    GlobalMode::Eventual => {
                        g.remaining_eventual(check.policy, check.key, check.quota, now)
                    }
                    GlobalMode::Strict => g.remaining_strict(check.policy, check.key, now),
                };
            }
            self.shared.nudge(&g);
        }
        (outcomes, now)
    }

    /// Gives back what [`GossipHandle::admit`] took at `admitted_at_us` for a request that
    /// was then refused by another policy.
    pub fn refund(&self, checks: &[GlobalCheck<'_>], admitted_at_us: u64) {
        let now = now_us();
        let mut g = self.shared.lock();
        for check in checks {
            refund_one(&mut g, check, admitted_at_us, now);
        }
        self.shared.nudge(&g);
    }

    /// Runs `f` on the machine at the current time, then wakes the driver for what it queued
    /// (rare operations that need no method of their own here, e.g. a reload's quotas).
    pub fn with_machine<R>(&self, f: impl FnOnce(&mut Gossip, u64) -> R) -> R {
        let mut g = self.shared.lock();
        let result = f(&mut g, now_us());
        self.shared.nudge(&g);
        result
    }

    /// See [`Gossip::is_learning`].
    pub fn is_learning(&self) -> bool {
        self.shared.lock().is_learning(now_us())
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

    /// See [`Gossip::identity_conflict`]: the newer incarnation of our own gateway that made
    /// this process stop serving global policies, if any.
    pub fn identity_conflict(&self) -> Option<u64> {
        self.shared.lock().identity_conflict()
    }

    /// Keys held in the eventual and strict tables (for the `tollgate_global_keys` gauge).
    pub fn key_counts(&self) -> (usize, usize) {
        let g = self.shared.lock();
        (g.eventual().table().key_count(), g.strict().key_count())
    }
}

/// One global policy of one request, for [`GossipHandle::admit`].
#[derive(Debug, Clone, Copy)]
pub struct GlobalCheck<'a> {
    /// The policy's id in the gossip state.
    pub policy: PolicyId,
    /// Its mode.
    pub mode: GlobalMode,
    /// The client key.
    pub key: &'a str,
    /// The request's cost.
    pub cost: u64,
    /// The global quota per window (eventual mode; strict quotas are part of the state).
    pub quota: u64,
}

/// How one [`GlobalCheck`] fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalOutcome {
    /// Whether this policy had room (the request is admitted only if all had).
    pub admitted: bool,
    /// What is left after the decision: rights held here (strict), or the quota minus the
    /// merged global count (eventual).
    pub remaining: u64,
}

fn refund_one(g: &mut Gossip, check: &GlobalCheck<'_>, admitted_at_us: u64, now_us: u64) {
    match check.mode {
        GlobalMode::Eventual => {
            g.refund(check.policy, check.key, admitted_at_us, check.cost, now_us);
        }
        GlobalMode::Strict => {
            g.refund_strict(check.policy, check.key, admitted_at_us, check.cost, now_us);
        }
    }
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

/// A connection the driver loop owns.
struct Link {
    generation: u64,
    connection: Connection,
    frames: mpsc::Sender<Vec<u8>>,
    writer: JoinHandle<()>,
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
    let slots = gossip.strict().slots().len();
    let shared = Arc::new(Shared {
        gossip: Mutex::new(gossip),
        wake: Notify::new(),
        // Until the driver first goes to sleep, every change wakes it.
        armed_until: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        generations: (0..slots).map(|_| AtomicU64::new(u64::MAX)).collect(),
    });
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
        let links: Vec<Link> = self.links.drain().map(|(_, link)| link).collect();
        let mut writers = Vec::with_capacity(links.len());
        let mut connections = Vec::with_capacity(links.len());
        for link in links {
            // Dropping the queue makes the writer send what is queued, then finish.
            drop(link.frames);
            writers.push(link.writer);
            connections.push(link.connection);
        }
        let flushed = tokio::time::timeout(grace, async {
            for writer in &mut writers {
                let _ = writer.await;
            }
        })
        .await
        .is_ok();
        for writer in &writers {
            writer.abort();
        }
        for connection in connections {
            connection.close(CLOSE_SHUTDOWN, b"shutdown");
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
                    metrics::counter!(crate::metrics::GOSSIP_SENT_BYTES_TOTAL)
                        .increment(frame.len() as u64);
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
                    if let Some(link) = self.links.remove(&peer) {
                        link.connection.close(CLOSE_SHUTDOWN, b"closed");
                    }
                    let mut g = self.shared.lock();
                    if let Some(current) = self.shared.generations.get(usize::from(peer.0)) {
                        current.store(u64::MAX, Ordering::Release);
                    }
                    g.on_disconnected(peer, now_us());
                }
            }
            Event::OwnIdentity { incarnation } => self.on_own_identity(incarnation),
        }
    }

    /// A connection is ready. An accepted one carries the `Hello` that must be vetted
    /// before the peer's live link is touched; a dialled one was asked for by the machine,
    /// so there is no live link to protect.
    fn on_up(
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
                match refusal {
                    // The genuine process reconnecting before its old link timed out.
                    HelloRefusal::AlreadyConnected => {
                        tracing::debug!(%error, "gossip peer refused")
                    }
                    HelloRefusal::Stale { .. } => tracing::error!(
                        %error,
                        "two processes claim one gateway identity: the older is refused; stop one of them"
                    ),
                    _ => tracing::warn!(%error, "gossip peer refused"),
                }
                return;
            }
        }
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        let (frames_tx, frames_rx) = mpsc::channel(PEER_QUEUE);
        let writer = tokio::spawn(write_loop(
            peer,
            generation,
            connection.clone(),
            send,
            frames_rx,
            events.clone(),
        ));
        let mut g = self.shared.lock();
        // Under the machine's lock: from here on only the new connection's reader is heard.
        if let Some(current) = self.shared.generations.get(usize::from(peer.0)) {
            current.store(generation, Ordering::Release);
        }
        if let Some(old) = self.links.insert(
            peer,
            Link {
                generation,
                connection: connection.clone(),
                frames: frames_tx,
                writer,
            },
        ) {
            old.connection.close(CLOSE_REPLACED, b"replaced");
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

    /// Dials our own configured address (see the module docs): whoever answers with our
    /// certificate tells us its incarnation.
    fn probe_own_identity(&mut self, events: &mpsc::Sender<Event>) {
        let Some(address) = self.own_address.clone() else {
            return;
        };
        let endpoint = self.endpoint.clone();
        let events = events.clone();
        let hello = {
            let g = self.shared.lock();
            Message::Hello {
                actor: g.actor().clone(),
                config_digest: g.config_digest(),
            }
        };
        self.tasks.spawn(async move {
            let probe = async {
                let addr = resolve(PeerId(u16::MAX), &address.addr).await.ok()?;
                let connection = endpoint.connect(addr, &address.gateway()).await.ok()?;
                let (mut send, mut recv) = quic::open_stream(&connection, endpoint.max_frame())
                    .await
                    .ok()?;
                let frame = codec::encode(&hello, endpoint.max_frame()).ok()?;
                quic::send_frame(&mut send, &frame).await.ok()?;
                let answer = recv.recv::<Message>().await.ok().flatten();
                connection.close(CLOSE_PROBE_DONE, b"probe done");
                match answer? {
                    Message::Hello { actor, .. } if actor.slot() == address.gateway() => {
                        Some(actor.incarnation)
                    }
                    _ => None,
                }
            };
            if let Ok(Some(incarnation)) = tokio::time::timeout(ACCEPT_STREAM_TIMEOUT, probe).await
            {
                // Fails only when the driver has stopped.
                let _ = events.send(Event::OwnIdentity { incarnation }).await;
            }
        });
    }

    /// A process holding our certificate told us its incarnation.
    fn on_own_identity(&mut self, incarnation: u64) {
        let outcome = self.shared.lock().on_own_identity(incarnation, now_us());
        match outcome {
            OwnIdentity::Ourselves | OwnIdentity::Refused => {}
            OwnIdentity::OlderProcess => tracing::error!(
                other_incarnation = incarnation,
                "another, older process runs with this gateway's identity (certificate and \
                 instance); it stops serving global policies when it learns of this one"
            ),
            OwnIdentity::StoodDown => {
                metrics::gauge!(IDENTITY_CONFLICT).set(1.0);
                tracing::error!(
                    newer_incarnation = incarnation,
                    "a newer process runs with this gateway's identity (certificate and \
                     instance): this one stops serving global policies; stop one of them"
                );
            }
        }
    }
}

fn refusal_reason(refusal: HelloRefusal) -> &'static str {
    match refusal {
        HelloRefusal::Malformed => "malformed",
        HelloRefusal::WrongSlot => "wrong-gateway",
        HelloRefusal::Future { .. } => "future-incarnation",
        HelloRefusal::Stale { .. } => "stale-incarnation",
        HelloRefusal::AlreadyConnected => "already-connected",
        HelloRefusal::IncarnationChanged => "incarnation-changed",
        HelloRefusal::TooFrequent => "too-frequent",
        HelloRefusal::ConfigMismatch { .. } => "config-mismatch",
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

/// Decodes the peer's messages into the machine. Ends (and reports) when the stream does.
async fn read_loop(
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
                let current = shared
                    .generations
                    .get(usize::from(peer.0))
                    .is_some_and(|g| g.load(Ordering::Acquire) == generation);
                if !current {
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
    // The driver dropped the queue: nothing more to say on this stream. Wait until the peer
    // has everything (the driver bounds this wait at shutdown; otherwise the stream of a
    // replaced connection is simply left to its close).
    if send.finish().is_ok() {
        let _ = send.stopped().await;
    }
}

/// Hands accepted connections to the driver, mapped to their peer by the gateway their
/// certificate names (see the module docs). A connection presenting our own certificate is
/// the probe of a process with our identity, ours or another's: it is answered with our
/// `Hello` and closed.
async fn accept_loop(
    me: PeerId,
    my_gateway: Option<Slot>,
    endpoint: Arc<GossipEndpoint>,
    peers: Arc<HashMap<PeerId, PeerAddress>>,
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
) {
    let by_gateway: HashMap<Slot, PeerId> = peers.values().map(|p| (p.gateway(), p.peer)).collect();
    let max_pending = peers.len().saturating_add(1) * MAX_PENDING_PER_GATEWAY;
    let mut pending: HashMap<Option<PeerId>, usize> = HashMap::new();
    let mut handshakes: JoinSet<Option<PeerId>> = JoinSet::new();
    loop {
        tokio::select! {
            accepted = endpoint.accept() => {
                let Some(accepted) = accepted else { break };
                let gateway = accepted.gateway;
                let connection = accepted.connection;
                let own = my_gateway.as_ref() == Some(&gateway);
                let peer = by_gateway.get(&gateway).copied();
                let refuse = |reason: &str| {
                    connection.close(CLOSE_UNEXPECTED_PEER, b"unexpected peer");
                    metrics::counter!(quic::REFUSED_PEERS_TOTAL, "reason" => "unexpected-peer")
                        .increment(1);
                    let error = DriverError::Accept { gateway: gateway.clone(), reason: reason.to_owned() };
                    tracing::warn!(%error, "gossip peer refused");
                };
                match peer {
                    None if !own => {
                        refuse("not a configured peer");
                        continue;
                    }
                    Some(p) if p > me => {
                        refuse("it should wait for our dial");
                        continue;
                    }
                    _ => {}
                }
                let waiting = pending.get(&peer).copied().unwrap_or(0);
                if waiting >= MAX_PENDING_PER_GATEWAY || handshakes.len() >= max_pending {
                    refuse("too many connections waiting for their Hello");
                    continue;
                }
                *pending.entry(peer).or_default() += 1;
                let max_frame = endpoint.max_frame();
                let events = events.clone();
                let shared = shared.clone();
                handshakes.spawn(async move {
                    let identified = tokio::time::timeout(
                        ACCEPT_STREAM_TIMEOUT,
                        identify(&connection, max_frame),
                    )
                    .await
                    .unwrap_or_else(|_| Err("no stream and Hello in time".to_owned()));
                    match (identified, peer) {
                        (Ok((send, _, hello)), None) => {
                            answer_own_probe(&connection, send, &hello, &shared, max_frame, &events).await;
                        }
                        (Ok((send, recv, hello)), Some(peer)) => {
                            // Fails only when the driver has stopped.
                            let _ = events
                                .send(Event::Up {
                                    peer,
                                    connection,
                                    send,
                                    recv: Box::new(recv),
                                    hello: Some(Box::new(hello)),
                                })
                                .await;
                        }
                        (Err(reason), _) => {
                            connection.close(CLOSE_UNEXPECTED_PEER, b"no hello");
                            metrics::counter!(quic::REFUSED_PEERS_TOTAL, "reason" => "no-hello")
                                .increment(1);
                            let error = DriverError::Accept { gateway, reason };
                            tracing::warn!(%error, "gossip peer refused");
                        }
                    }
                    peer
                });
            }
            Some(joined) = handshakes.join_next() => {
                // A cancelled or panicked task frees nothing it can name; the count of its
                // gateway then stays one too high until the driver restarts, which only
                // makes the bound stricter.
                if let Ok(peer) = joined
                    && let Some(count) = pending.get_mut(&peer)
                {
                    *count = count.saturating_sub(1);
                }
            }
        }
    }
}

/// Takes an accepted connection's stream and first message, which must be a `Hello` of the
/// gateway its certificate names (the machine vets the rest).
async fn identify(
    connection: &Connection,
    max_frame: usize,
) -> Result<(SendStream, FrameStream, Message), String> {
    let (send, mut recv) = quic::accept_stream(connection, max_frame)
        .await
        .map_err(|e| e.to_string())?;
    let hello = match recv.recv::<Message>().await {
        Ok(Some(hello)) => hello,
        Ok(None) => return Err("stream ended before its Hello".to_owned()),
        Err(e) => return Err(e.to_string()),
    };
    let Message::Hello { actor, .. } = &hello else {
        return Err("first message is not a Hello".to_owned());
    };
    let named = actor.slot();
    match quic::peer_gateway(connection) {
        Some(gateway) if gateway == named => Ok((send, recv, hello)),
        _ => Err(format!(
            "its Hello names {named}, not its certificate's gateway"
        )),
    }
}

/// Answers a connection that presented our own certificate with our `Hello`, reports the
/// incarnation it announced, and closes it.
async fn answer_own_probe(
    connection: &Connection,
    mut send: SendStream,
    hello: &Message,
    shared: &Shared,
    max_frame: usize,
    events: &mpsc::Sender<Event>,
) {
    let Message::Hello { actor, .. } = hello else {
        return;
    };
    let ours = {
        let g = shared.lock();
        Message::Hello {
            actor: g.actor().clone(),
            config_digest: g.config_digest(),
        }
    };
    if let Ok(frame) = codec::encode(&ours, max_frame)
        && quic::send_frame(&mut send, &frame).await.is_ok()
        && send.finish().is_ok()
    {
        // Bounded by the caller's timeout: the prober closes once it has our Hello.
        let _ = tokio::time::timeout(ACCEPT_STREAM_TIMEOUT, send.stopped()).await;
    }
    connection.close(CLOSE_PROBE_DONE, b"probe done");
    // Fails only when the driver has stopped.
    let _ = events
        .send(Event::OwnIdentity {
            incarnation: actor.incarnation,
        })
        .await;
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
