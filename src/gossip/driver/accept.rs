//! Accepting connections: which gateways may connect, how many may wait for their `Hello`,
//! and the `Hello` that identifies an accepted connection.
//!
//! Separate because it is where an unauthenticated flood of connections is bounded, before
//! anything reaches the machine.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use quinn::{Connection, SendStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::identity::answer_own_probe;
use super::{
    ACCEPT_STREAM_TIMEOUT, CLOSE_UNEXPECTED_PEER, DriverError, Event, MAX_PENDING_PER_GATEWAY,
    PeerAddress, handle::Shared,
};
use crate::crdt::Slot;
use crate::gossip::log_limit::LogVerdict;
use crate::gossip::proto::{HelloRefusal, Message, PeerId};
use crate::gossip::quic::{self, FrameStream, GossipEndpoint};

/// Hands accepted connections to the driver, mapped to their peer by the gateway their
/// certificate names (see the module docs). A connection presenting our own certificate is
/// the probe of a process with our identity, ours or another's: it is answered with our
/// `Hello` and closed.
pub(super) async fn accept_loop(
    me: PeerId,
    my_gateway: Option<Slot>,
    endpoint: Arc<GossipEndpoint>,
    peers: Arc<HashMap<PeerId, PeerAddress>>,
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
) {
    let by_gateway: HashMap<Slot, PeerId> = peers.values().map(|p| (p.gateway(), p.peer)).collect();
    let max_pending = peers.len().saturating_add(1) * MAX_PENDING_PER_GATEWAY;
    let mut pending: HashMap<Option<PeerId>, Arc<AtomicUsize>> = HashMap::new();
    let mut handshakes: JoinSet<()> = JoinSet::new();
    loop {
        tokio::select! {
            accepted = endpoint.accept() => {
                let Some(accepted) = accepted else { break };
                let gateway = accepted.gateway;
                let connection = accepted.connection;
                let own = my_gateway.as_ref() == Some(&gateway);
                let peer = by_gateway.get(&gateway).copied();
                let refuse = |reason: &'static str| {
                    connection.close(CLOSE_UNEXPECTED_PEER, b"unexpected peer");
                    metrics::counter!(quic::REFUSED_PEERS_TOTAL, "reason" => "unexpected-peer")
                        .increment(1);
                    let error = DriverError::Accept { gateway: gateway.clone(), reason: reason.to_owned() };
                    log_refusal(&shared, reason, connection.remote_address(), &error, false);
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
                let waiting = pending.entry(peer).or_default();
                if waiting.load(Ordering::Acquire) >= MAX_PENDING_PER_GATEWAY
                    || handshakes.len() >= max_pending
                {
                    refuse("too many connections waiting for their Hello");
                    continue;
                }
                let place = PendingHandshake::new(waiting.clone());
                let max_frame = endpoint.max_frame();
                let events = events.clone();
                let shared = shared.clone();
                handshakes.spawn(async move {
                    // Held until the handshake ends, however it ends.
                    let _place = place;
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
                            log_refusal(&shared, "no-hello", connection.remote_address(), &error, false);
                        }
                    }
                });
            }
            // Reap finished handshakes so the set does not grow with connection churn.
            Some(_) = handshakes.join_next() => {}
        }
    }
}

/// Logs a refused connection at most once per `(reason, address)` per
/// [`crate::gossip::log_limit::REFUSAL_LOG_EVERY_US`]: a peer that reconnects in a loop is logged once, then in a
/// summary line whose `suppressed` says how many refusals went unlogged since (every one is
/// still counted in the metrics). `serious` logs at error level rather than warn.
pub(super) fn log_refusal(
    shared: &Shared,
    reason: &'static str,
    addr: SocketAddr,
    error: &DriverError,
    serious: bool,
) {
    let suppressed = match shared.refusal_verdict(reason, addr.ip()) {
        LogVerdict::Suppress => return,
        LogVerdict::Log => 0,
        LogVerdict::Summary { suppressed } => suppressed,
    };
    if serious {
        tracing::error!(
            %error,
            %addr,
            suppressed,
            "two processes claim one gateway identity: the older is refused; stop one of them"
        );
    } else {
        tracing::warn!(%error, %addr, suppressed, "gossip peer refused");
    }
}

/// One accepted connection waiting for its `Hello`, counted against its gateway's
/// [`MAX_PENDING_PER_GATEWAY`] until dropped: however the handshake ends (done, refused,
/// timed out, panicked or cancelled), its place is given back.
struct PendingHandshake(Arc<AtomicUsize>);

impl PendingHandshake {
    fn new(waiting: Arc<AtomicUsize>) -> Self {
        waiting.fetch_add(1, Ordering::AcqRel);
        Self(waiting)
    }
}

impl Drop for PendingHandshake {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
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

pub(super) fn refusal_reason(refusal: HelloRefusal) -> &'static str {
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
