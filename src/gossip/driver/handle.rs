//! The limiter's side of the driver: the machine behind its lock, and the calls the request
//! path makes on it.
//!
//! Separate because this is the only driver code on the request path: every call is one
//! short critical section, and the rules for waking the driver loop live here.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

use crate::clock::now_us;
use crate::crdt::PolicyId;
use crate::gossip::log_limit::{LogLimiter, LogVerdict, MAX_LOGGED_KINDS, REFUSAL_LOG_EVERY_US};
use crate::gossip::proto::{
    GlobalCheck, GlobalOutcome, Gossip, GossipStats, Inspection, PeerId, PeerReport,
};

/// [`Shared::generations`] of a peer without a current connection.
const NO_CONNECTION: u64 = u64::MAX;

/// What the request path, the driver loop and the connection readers share.
pub(super) struct Shared {
    gossip: Mutex<Gossip>,
    /// Wakes the driver loop: the machine may have something to send or a new deadline.
    pub(super) wake: Notify,
    /// The instant (µs) the driver sleeps until, set under the machine's lock as it goes to
    /// sleep (`u64::MAX`: no deadline). A request that changes the machine wakes the driver
    /// only if there is output now or the next deadline moved before this one: admissions
    /// come by the ten thousand per second and most change nothing the driver must act on
    /// before its next delta, so waking it for each cost a task wake-up, a lock and a new
    /// timer per request.
    pub(super) armed_until: AtomicU64,
    /// Frames dropped because a peer's queue was full (or it had no connection).
    pub(super) dropped: AtomicU64,
    /// The generation of each peer's current connection ([`NO_CONNECTION`]: none), indexed
    /// by slot. A new connection becomes current under the machine's lock, and readers check
    /// it under the same lock, so a reader of a replaced connection never feeds the machine
    /// after its successor took over; a connection that goes withdraws only itself.
    generations: Vec<AtomicU64>,
    /// Which refused connections are logged (see [`super::accept::log_refusal`]).
    refusal_log: Mutex<LogLimiter<(&'static str, IpAddr)>>,
}

impl Shared {
    pub(super) fn new(gossip: Gossip) -> Self {
        let slots = gossip.strict().slots().len();
        Self {
            gossip: Mutex::new(gossip),
            wake: Notify::new(),
            // Until the driver first goes to sleep, every change wakes it.
            armed_until: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            generations: (0..slots).map(|_| AtomicU64::new(NO_CONNECTION)).collect(),
            refusal_log: Mutex::new(LogLimiter::new(REFUSAL_LOG_EVERY_US, MAX_LOGGED_KINDS)),
        }
    }

    /// Wakes the driver if what changed in `g` needs it before its armed deadline.
    pub(super) fn nudge(&self, g: &Gossip) {
        let due = g.poll_timeout().unwrap_or(u64::MAX);
        if g.has_output() || due < self.armed_until.load(Ordering::Acquire) {
            self.wake.notify_one();
        }
    }

    /// Whether `generation` is the peer's current connection (ask under the machine's lock,
    /// then act on the answer before releasing it).
    pub(super) fn is_current(&self, peer: PeerId, generation: u64) -> bool {
        self.generations
            .get(usize::from(peer.0))
            .is_some_and(|g| g.load(Ordering::Acquire) == generation)
    }

    /// Makes `generation` the peer's current connection (see [`super::link::Link::new`]).
    pub(super) fn make_current(&self, peer: PeerId, generation: u64) {
        if let Some(current) = self.generations.get(usize::from(peer.0)) {
            current.store(generation, Ordering::Release);
        }
    }

    /// The connection `generation` is gone: unless a successor took over, the peer has no
    /// current connection.
    pub(super) fn withdraw(&self, peer: PeerId, generation: u64) {
        if let Some(current) = self.generations.get(usize::from(peer.0)) {
            // Fails only when a successor is current, which must stay so.
            let _ = current.compare_exchange(
                generation,
                NO_CONNECTION,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// The verdict for logging a refusal of `reason` from `addr` now.
    pub(super) fn refusal_verdict(&self, reason: &'static str, addr: IpAddr) -> LogVerdict {
        // A panic while holding this lock cannot leave the limiter inconsistent.
        let mut log = self
            .refusal_log
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        log.check((reason, addr), now_us())
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Gossip> {
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
    pub(super) shared: Arc<Shared>,
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
        let mut g = self.shared.lock();
        let outcomes = g.admit(checks, now);
        self.shared.nudge(&g);
        (outcomes, now)
    }

    /// Gives back what [`GossipHandle::admit`] took at `admitted_at_us` for a request that
    /// was then refused by another policy (see [`Gossip::refund_checks`]).
    pub fn refund(&self, checks: &[GlobalCheck<'_>], admitted_at_us: u64) {
        let mut g = self.shared.lock();
        g.refund_checks(checks, admitted_at_us, now_us());
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
