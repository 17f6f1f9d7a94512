//! What a [`Gossip`](super::Gossip) is built from: timers and sizes, the policies it enforces, and why
//! building it can fail.
//!
//! Separate because these are the machine's inputs, read by the global setup and the
//! simulator, not its behaviour.

use thiserror::Error;

use crate::crdt::bounded::{BoundedError, StrictPolicy};
use crate::crdt::usage::UsageError;
use crate::crdt::{EventualPolicy, PolicyId};

/// Timers and sizes of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GossipConfig {
    /// How often deltas are sent (default 50 ms).
    pub interval_us: u64,
    /// Most `(key, sub-window)` entries per `Delta`/`FullState` frame; also the number of own
    /// changes that triggers a delta before the interval is up.
    pub max_entries_per_frame: usize,
    /// Send a `KeepAlive` when nothing was sent to a peer for this long.
    pub keepalive_us: u64,
    /// A peer silent for this long is disconnected (also bounds how long a dial may take).
    pub idle_timeout_us: u64,
    /// First reconnect delay.
    pub backoff_base_us: u64,
    /// Longest reconnect delay.
    pub backoff_cap_us: u64,
    /// How often digests are exchanged for anti-entropy.
    pub anti_entropy_every_us: u64,
    /// How often the strict-mode `Announce` is repeated until our share is reclaimed.
    pub announce_every_us: u64,
    /// How often usage and rights are garbage-collected.
    pub gc_every_us: u64,
}

impl Default for GossipConfig {
    fn default() -> Self {
        Self {
            interval_us: 50_000,
            max_entries_per_frame: 512,
            keepalive_us: 1_000_000,
            idle_timeout_us: 5_000_000,
            backoff_base_us: 100_000,
            backoff_cap_us: 5_000_000,
            anti_entropy_every_us: 2_000_000,
            announce_every_us: 500_000,
            gc_every_us: 1_000_000,
        }
    }
}

/// The global policies this actor enforces.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    /// Eventual-mode policies: quota and window (the quota bounds what peers' counts can
    /// claim, see [`crate::crdt::usage::writers`]).
    pub eventual: Vec<(PolicyId, EventualPolicy)>,
    /// Strict-mode policies: quota and window.
    pub strict: Vec<(PolicyId, StrictPolicy)>,
}

/// Why a [`Gossip`](super::Gossip) could not be built.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GossipError {
    /// The slot list or our actor is invalid for strict mode (see [`BoundedError`]).
    #[error("invalid slots or actor: {0}")]
    Bounded(#[from] BoundedError),
    /// Our actor could not be named in the usage table.
    #[error("invalid actor: {0}")]
    Usage(#[from] UsageError),
}
