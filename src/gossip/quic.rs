//! QUIC transport for gossip: mutual-TLS connect/accept primitives and codec framing.
//!
//! Why QUIC: one UDP socket per region carries every peer connection, with TLS 1.3,
//! keep-alives and idle timeouts built in, and without TCP's head-of-line blocking across
//! peers. Why this module is thin: the protocol state machine (`proto`) owns timing, backoff
//! and reconnects, so the same logic runs in the simulator and here; this module only turns
//! sockets into authenticated connections and byte streams into messages.
//!
//! Who gets in: a peer must present a certificate chaining to the deployment CA (checked by
//! rustls during the handshake) *and* naming exactly one gateway that is in the configured
//! `allowed` list (checked right after it, see [`tls::name_of_cert`]). A valid certificate
//! of a gateway that was removed from the config is thus refused without reissuing the CA,
//! and a region certificate of an earlier version is refused with a hint to reissue. Every
//! refusal is closed (an application error code when the handshake completed), counted
//! ([`GossipEndpoint::refused_peers`] and the `tollgate_gossip_refused_peers_total{reason}`
//! metric) and logged at most once a minute per reason and peer address, the repeats in a
//! summary with their count ([`super::log_limit`]), so a misconfigured peer retrying forever
//! cannot flood the log.
//!
//! Handshakes in flight are bounded in all (`MAX_PENDING_HANDSHAKES`) and per source
//! address (`MAX_PENDING_PER_ADDRESS`), so one host opening connections as fast as it can
//! neither grows memory nor crowds out the other peers' handshakes.
//!
//! Framing: the dialling side opens one long-lived bidirectional stream per connection
//! ([`open_stream`]) and the accepting side takes it ([`accept_stream`]); each direction
//! carries [`codec`] frames. QUIC announces a stream only once data is sent on it, so the
//! dialler must send first (its Hello). [`FrameStream::recv`] decodes without trusting the
//! peer: a frame that cannot be decoded is skipped and counted, a stream whose framing is
//! lost closes the connection with [`CLOSE_PROTOCOL_ERROR`].

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use super::codec::{self, CodecError, Decoder};
use super::log_limit::{LogLimiter, LogVerdict, MAX_LOGGED_KINDS, REFUSAL_LOG_EVERY_US};
use super::tls::{self, CertName, PeerTls, TlsError};
use crate::clock::now_us;
use crate::crdt::Slot;

/// Application close code: orderly shutdown.
pub const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(0);
/// Application close code: the peer's certificate names a gateway that is not configured.
pub const CLOSE_GATEWAY_NOT_ALLOWED: VarInt = VarInt::from_u32(0x10);
/// Application close code: the peer's certificate names no single gateway (or only a
/// region, as certificates of earlier versions did).
pub const CLOSE_NO_GATEWAY: VarInt = VarInt::from_u32(0x11);
/// Application close code: the peer's byte stream is not gossip framing.
pub const CLOSE_PROTOCOL_ERROR: VarInt = VarInt::from_u32(0x12);

/// Counter: peers refused, by `reason`: `tls` (the handshake failed on a TLS alert, e.g. a
/// certificate from another CA), `handshake` (any other handshake failure), `no_gateway`,
/// `region_certificate` (a per-region certificate of an earlier version),
/// `gateway_not_allowed`, `busy` (too many handshakes in flight, in all or from one
/// address), and, from the driver, `unexpected-peer` and `bad-hello`.
pub const REFUSED_PEERS_TOTAL: &str = "tollgate_gossip_refused_peers_total";
/// Counter: frames skipped because they did not decode (unknown version, bad payload).
pub const FRAMES_SKIPPED_TOTAL: &str = "tollgate_gossip_frames_skipped_total";

/// Handshakes in flight at once; further connection attempts are refused until some finish,
/// so a flood of half-open handshakes costs bounded memory.
const MAX_PENDING_HANDSHAKES: usize = 64;
/// Handshakes in flight from one source address (IP): a deployment has at most
/// [`crate::config::MAX_PEERS`] gateways and each dials once per backoff.
const MAX_PENDING_PER_ADDRESS: usize = 4;
/// Largest chunk read from a stream at once.
const READ_CHUNK: usize = 64 * 1024;

/// What went wrong in the gossip transport.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// Loading TLS material or building the TLS config.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A configured gateway whose names cannot be a certificate name.
    #[error("bad gateway name {0:?} in the allowed gateways")]
    BadGateway(String),
    /// A transport setting out of range.
    #[error("invalid gossip transport config: {0}")]
    Config(String),
    /// The UDP socket could not be bound (at start-up: the message embeds its cause, which is
    /// not also `source()`, so that a start-up report prints it once).
    #[error("cannot bind gossip endpoint on {addr}: {error}")]
    Bind { addr: SocketAddr, error: io::Error },
    /// The endpoint's socket.
    #[error("gossip endpoint: {0}")]
    Io(#[from] io::Error),
    /// A connection could not even be attempted (e.g. a bad server name).
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed (handshake refused, timed out, closed by a peer).
    #[error("gossip connection: {0}")]
    Connection(#[from] ConnectionError),
    /// The server's certificate does not name the gateway dialled (and only it).
    #[error("peer {addr} is not gateway {expected} (its certificate names {found})")]
    WrongGateway {
        addr: SocketAddr,
        expected: Slot,
        found: String,
    },
    /// Writing to a stream.
    #[error("gossip write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from a stream.
    #[error("gossip read: {0}")]
    Read(#[from] quinn::ReadError),
    /// The peer's framing is lost; the connection was closed.
    #[error("bad gossip stream: {0}")]
    Codec(#[from] CodecError),
    /// The peer finished its stream in the middle of a frame; the connection was closed.
    #[error("gossip stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
}

/// Transport settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GossipConfig {
    /// Keep-alive interval: keeps NAT bindings and the idle timer fresh on a quiet link.
    pub keep_alive: Duration,
    /// A connection silent this long is dead (must exceed `keep_alive`).
    pub idle_timeout: Duration,
    /// Bound on one frame's payload (see [`codec::Decoder`]).
    pub max_frame: usize,
}

impl Default for GossipConfig {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            max_frame: codec::DEFAULT_MAX_FRAME,
        }
    }
}

impl GossipConfig {
    fn transport(&self) -> Result<quinn::TransportConfig, QuicError> {
        if self.keep_alive.is_zero() || self.keep_alive >= self.idle_timeout {
            return Err(QuicError::Config(format!(
                "keep-alive {:?} must be non-zero and below the idle timeout {:?}",
                self.keep_alive, self.idle_timeout
            )));
        }
        let idle = quinn::IdleTimeout::try_from(self.idle_timeout).map_err(|_| {
            QuicError::Config(format!("idle timeout {:?} too large", self.idle_timeout))
        })?;
        let mut transport = quinn::TransportConfig::default();
        transport
            .keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(Some(idle))
            // One gossip stream per connection, opened by the dialler; nothing else.
            .max_concurrent_bidi_streams(VarInt::from_u32(1))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .datagram_receive_buffer_size(None);
        Ok(transport)
    }
}

/// An accepted, authenticated peer connection.
#[derive(Debug, Clone)]
pub struct PeerConnection {
    /// The gateway the peer's certificate names (one of the allowed gateways).
    pub gateway: Slot,
    pub connection: Connection,
}

/// Counters and log rate limiting shared with the accept task.
#[derive(Debug)]
struct Refusals {
    count: AtomicU64,
    logged: Mutex<LogLimiter<(&'static str, IpAddr)>>,
}

impl Default for Refusals {
    fn default() -> Self {
        Self {
            count: AtomicU64::new(0),
            logged: Mutex::new(LogLimiter::new(REFUSAL_LOG_EVERY_US, MAX_LOGGED_KINDS)),
        }
    }
}

impl Refusals {
    fn record(&self, peer: SocketAddr, reason: &'static str, detail: &dyn std::fmt::Display) {
        self.record_at(peer, reason, detail, now_us());
    }

    fn record_at(
        &self,
        peer: SocketAddr,
        reason: &'static str,
        detail: &dyn std::fmt::Display,
        now_us: u64,
    ) -> LogVerdict {
        self.count.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(REFUSED_PEERS_TOTAL, "reason" => reason).increment(1);
        let verdict = {
            // A panic while holding this lock cannot leave the limiter inconsistent.
            let mut logged = self.logged.lock().unwrap_or_else(PoisonError::into_inner);
            logged.check((reason, peer.ip()), now_us)
        };
        let suppressed = match verdict {
            LogVerdict::Suppress => return verdict,
            LogVerdict::Log => 0,
            LogVerdict::Summary { suppressed } => suppressed,
        };
        tracing::warn!(%peer, reason, %detail, suppressed, "refused gossip peer");
        verdict
    }
}

/// A gateway's gossip endpoint: one UDP socket that accepts peers and dials them.
///
/// Dropping it closes every connection made through it (with [`CLOSE_SHUTDOWN`]) and stops
/// accepting.
#[derive(Debug)]
pub struct GossipEndpoint {
    endpoint: Endpoint,
    tls_switch: TlsSwitch,
    accepted: tokio::sync::Mutex<mpsc::Receiver<PeerConnection>>,
    refusals: Arc<Refusals>,
    accept_task: JoinHandle<()>,
    max_frame: usize,
}

/// Replaces the certificates (CA, our certificate and key) an endpoint presents and checks:
/// connections made or accepted afterwards use the new ones, established ones keep theirs
/// (TLS does not renegotiate; they are re-made with the new ones when they next drop).
#[derive(Debug, Clone)]
pub struct TlsSwitch {
    endpoint: Endpoint,
    transport: Arc<quinn::TransportConfig>,
    /// What dials use: quinn's default client config belongs to one `Endpoint` handle, not
    /// to the endpoint, so it could not be replaced from here.
    client: Arc<ArcSwap<quinn::ClientConfig>>,
}

impl TlsSwitch {
    pub fn set(&self, tls: &PeerTls) -> Result<(), QuicError> {
        let server = server_config(tls, self.transport.clone())?;
        let client = client_config(tls, self.transport.clone())?;
        self.endpoint.set_server_config(Some(server));
        self.client.store(Arc::new(client));
        Ok(())
    }
}

fn server_config(
    tls: &PeerTls,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, QuicError> {
    let crypto = QuicServerConfig::try_from(tls.server_config()?).map_err(TlsError::from)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport);
    // Regions have fixed addresses; a peer changing address is not a case to support.
    server.migration(false);
    Ok(server)
}

fn client_config(
    tls: &PeerTls,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, QuicError> {
    let crypto = QuicClientConfig::try_from(tls.client_config()?).map_err(TlsError::from)?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport);
    Ok(client)
}

impl Drop for GossipEndpoint {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.endpoint.close(CLOSE_SHUTDOWN, b"shutdown");
    }
}

impl GossipEndpoint {
    /// Binds with the default [`GossipConfig`]. Must run inside a Tokio runtime.
    pub fn bind(listen: SocketAddr, tls: PeerTls, allowed: Vec<Slot>) -> Result<Self, QuicError> {
        Self::bind_with(listen, tls, allowed, GossipConfig::default())
    }

    /// Binds `listen` and starts accepting peers whose certificate names one of the
    /// `allowed` gateways. Must run inside a Tokio runtime.
    pub fn bind_with(
        listen: SocketAddr,
        tls: PeerTls,
        allowed_gateways: Vec<Slot>,
        config: GossipConfig,
    ) -> Result<Self, QuicError> {
        let mut allowed = HashSet::with_capacity(allowed_gateways.len());
        for gateway in allowed_gateways {
            let gateway = Slot::new(
                gateway.region.to_ascii_lowercase(),
                gateway.instance.to_ascii_lowercase(),
            );
            crate::certs::Gateway::new(&gateway.region, &gateway.instance)
                .map_err(|_| QuicError::BadGateway(gateway.to_string()))?;
            allowed.insert(gateway);
        }
        let transport = Arc::new(config.transport()?);
        let server = server_config(&tls, transport.clone())?;
        let client = client_config(&tls, transport.clone())?;

        let endpoint = Endpoint::server(server, listen).map_err(|error| QuicError::Bind {
            addr: listen,
            error,
        })?;

        let refusals = Arc::new(Refusals::default());
        // Small: accepted connections are taken promptly by the owner; when it lags, the
        // accept task waits instead of piling connections up.
        let (sender, receiver) = mpsc::channel(16);
        let accept_task = tokio::spawn(accept_loop(
            endpoint.clone(),
            Arc::new(allowed),
            refusals.clone(),
            sender,
        ));
        Ok(Self {
            tls_switch: TlsSwitch {
                endpoint: endpoint.clone(),
                transport,
                client: Arc::new(ArcSwap::from_pointee(client)),
            },
            endpoint,
            accepted: tokio::sync::Mutex::new(receiver),
            refusals,
            accept_task,
            max_frame: config.max_frame,
        })
    }

    /// What replaces the certificates of this endpoint's future connections (a reload).
    pub fn tls_switch(&self) -> TlsSwitch {
        self.tls_switch.clone()
    }

    /// The bound address (with the actual port when bound to port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, QuicError> {
        Ok(self.endpoint.local_addr()?)
    }

    /// The next admitted peer; `None` once the endpoint is closed. Refused peers never show
    /// up here: they are counted and logged by the endpoint.
    pub async fn accept(&self) -> Option<PeerConnection> {
        self.accepted.lock().await.recv().await
    }

    /// Dials `addr`, requiring its certificate to chain to the CA and name the `expected`
    /// gateway (whose DNS name is the TLS server name) and no other. Presents this gateway's
    /// certificate.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        expected: &Slot,
    ) -> Result<Connection, QuicError> {
        let server_name = crate::certs::gateway_dns_name(&expected.region, &expected.instance);
        let client = quinn::ClientConfig::clone(&self.tls_switch.client.load());
        let connection = self
            .endpoint
            .connect_with(client, addr, &server_name)?
            .await?;
        let found = peer_name(&connection);
        if found != CertName::Gateway(expected.clone()) {
            connection.close(CLOSE_NO_GATEWAY, b"unexpected gateway");
            return Err(QuicError::WrongGateway {
                addr,
                expected: expected.clone(),
                found: describe(&found),
            });
        }
        Ok(connection)
    }

    /// Peers refused so far (untrusted certificate, failed handshake, unknown region).
    pub fn refused_peers(&self) -> u64 {
        self.refusals.count.load(Ordering::Relaxed)
    }

    /// The frame bound this endpoint was configured with, for [`open_stream`] and
    /// [`accept_stream`].
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Closes every connection and stops accepting.
    pub fn close(&self) {
        self.endpoint.close(CLOSE_SHUTDOWN, b"shutdown");
    }

    /// Waits until the peers were told about [`Self::close`] (bounded by the idle timeout).
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

/// Accepts connections, runs handshakes concurrently (a slow peer does not hold up the
/// others), admits or refuses each, and hands admitted ones to [`GossipEndpoint::accept`].
async fn accept_loop(
    endpoint: Endpoint,
    allowed: Arc<HashSet<Slot>>,
    refusals: Arc<Refusals>,
    sender: mpsc::Sender<PeerConnection>,
) {
    let mut handshakes = JoinSet::new();
    // Handshakes in flight per source IP; an entry leaves when its count drops to zero, so
    // the map holds at most `MAX_PENDING_HANDSHAKES` addresses.
    let mut per_address: HashMap<IpAddr, usize> = HashMap::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let peer = incoming.remote_address();
                let from_here = per_address.get(&peer.ip()).copied().unwrap_or(0);
                if handshakes.len() >= MAX_PENDING_HANDSHAKES {
                    incoming.refuse();
                    refusals.record(peer, "busy", &"too many handshakes in flight");
                    continue;
                }
                if from_here >= MAX_PENDING_PER_ADDRESS {
                    incoming.refuse();
                    refusals.record(peer, "busy", &"too many handshakes in flight from this address");
                    continue;
                }
                *per_address.entry(peer.ip()).or_default() += 1;
                handshakes.spawn(async move { (peer, incoming.await) });
            }
            Some(joined) = handshakes.join_next() => {
                // A handshake task only fails by panicking inside quinn or being cancelled
                // at shutdown; either way there is no connection to hand out (and its
                // address's count stays: a panic in quinn is not a case to optimise).
                let Ok((peer, result)) = joined else { continue };
                if let Some(count) = per_address.get_mut(&peer.ip()) {
                    *count -= 1;
                    if *count == 0 {
                        per_address.remove(&peer.ip());
                    }
                }
                let connection = match result {
                    Ok(connection) => connection,
                    Err(error) => {
                        refusals.record(peer, handshake_reason(&error), &error);
                        continue;
                    }
                };
                match admit(&connection, &allowed) {
                    Ok(gateway) => {
                        if sender.send(PeerConnection { gateway, connection }).await.is_err() {
                            break; // The endpoint was dropped.
                        }
                    }
                    Err((code, reason, detail)) => {
                        connection.close(code, reason.as_bytes());
                        refusals.record(peer, reason, &detail);
                    }
                }
            }
        }
    }
}

fn handshake_reason(error: &ConnectionError) -> &'static str {
    match error {
        // TLS alerts map to transport error codes 0x100-0x1ff (RFC 9001 §4.8).
        ConnectionError::TransportError(e) if (0x100..0x200).contains(&u64::from(e.code)) => "tls",
        _ => "handshake",
    }
}

/// The gateway an authenticated connection may speak for, or why it is refused.
fn admit(
    connection: &Connection,
    allowed: &HashSet<Slot>,
) -> Result<Slot, (VarInt, &'static str, String)> {
    match peer_name(connection) {
        CertName::Gateway(gateway) if allowed.contains(&gateway) => Ok(gateway),
        CertName::Gateway(gateway) => Err((
            CLOSE_GATEWAY_NOT_ALLOWED,
            "gateway_not_allowed",
            format!("gateway {gateway} is not configured"),
        )),
        CertName::RegionOnly(region) => Err((
            CLOSE_NO_GATEWAY,
            "region_certificate",
            format!(
                "certificate names region {region:?} but no gateway (a per-region certificate \
                 of an earlier version): issue one certificate per gateway with \
                 `tollgate certs --out DIR --gateways {region}/INSTANCE,...` and give each \
                 gateway its own"
            ),
        )),
        CertName::Nothing => Err((
            CLOSE_NO_GATEWAY,
            "no_gateway",
            "certificate names no single gateway".to_owned(),
        )),
    }
}

/// What the peer's (verified) certificate names, from its DNS SANs; [`CertName::Nothing`]
/// before the handshake or without a certificate.
pub fn peer_name(connection: &Connection) -> CertName {
    let Some(identity) = connection.peer_identity() else {
        return CertName::Nothing;
    };
    let Ok(chain) = identity.downcast::<Vec<CertificateDer<'static>>>() else {
        return CertName::Nothing;
    };
    chain
        .first()
        .map_or(CertName::Nothing, |cert| tls::name_of_cert(cert))
}

/// The gateway the peer's certificate names, if it names exactly one.
pub fn peer_gateway(connection: &Connection) -> Option<Slot> {
    match peer_name(connection) {
        CertName::Gateway(gateway) => Some(gateway),
        _ => None,
    }
}

fn describe(name: &CertName) -> String {
    match name {
        CertName::Gateway(gateway) => format!("gateway {gateway}"),
        CertName::RegionOnly(region) => format!("only region {region:?} (reissue per gateway)"),
        CertName::Nothing => "no single gateway".to_owned(),
    }
}

/// Writes one already encoded frame ([`codec::encode`]).
pub async fn send_frame(send: &mut SendStream, frame: &[u8]) -> Result<(), QuicError> {
    Ok(send.write_all(frame).await?)
}

/// Opens the connection's gossip stream (dialling side). Send a frame first: the peer only
/// sees the stream once data arrives on it.
pub async fn open_stream(
    connection: &Connection,
    max_frame: usize,
) -> Result<(SendStream, FrameStream), QuicError> {
    let (send, recv) = connection.open_bi().await?;
    Ok((send, FrameStream::new(connection.clone(), recv, max_frame)))
}

/// Takes the connection's gossip stream (accepting side).
pub async fn accept_stream(
    connection: &Connection,
    max_frame: usize,
) -> Result<(SendStream, FrameStream), QuicError> {
    let (send, recv) = connection.accept_bi().await?;
    Ok((send, FrameStream::new(connection.clone(), recv, max_frame)))
}

/// The receiving half of a gossip stream, decoding frames into messages.
#[derive(Debug)]
pub struct FrameStream {
    connection: Connection,
    recv: RecvStream,
    decoder: Decoder,
    skipped: u64,
    finished: bool,
}

impl FrameStream {
    pub fn new(connection: Connection, recv: RecvStream, max_frame: usize) -> Self {
        Self {
            connection,
            recv,
            decoder: Decoder::new(max_frame),
            skipped: 0,
            finished: false,
        }
    }

    /// The next message; `Ok(None)` when the peer finished the stream cleanly. A frame that
    /// does not decode (unknown version, bad payload) is skipped and counted; lost framing or
    /// a stream ending inside a frame closes the connection with [`CLOSE_PROTOCOL_ERROR`].
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, QuicError> {
        loop {
            match self.decoder.decode::<T>() {
                Ok(Some(message)) => return Ok(Some(message)),
                Ok(None) => {}
                Err(error) if error.is_recoverable() => {
                    self.skipped += 1;
                    metrics::counter!(FRAMES_SKIPPED_TOTAL).increment(1);
                    tracing::debug!(peer = %self.connection.remote_address(), %error, "skipped gossip frame");
                    continue;
                }
                Err(error) => {
                    self.connection
                        .close(CLOSE_PROTOCOL_ERROR, b"bad gossip frame");
                    return Err(error.into());
                }
            }
            if self.finished {
                return Ok(None);
            }
            match self.recv.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.decoder.extend(&chunk.bytes),
                None => {
                    self.finished = true;
                    let buffered = self.decoder.buffered();
                    if buffered > 0 {
                        self.connection
                            .close(CLOSE_PROTOCOL_ERROR, b"truncated gossip frame");
                        return Err(QuicError::Truncated { buffered });
                    }
                    return Ok(None);
                }
            }
        }
    }

    /// Frames skipped so far because they did not decode.
    pub fn skipped_frames(&self) -> u64 {
        self.skipped
    }

    /// The connection this stream belongs to.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_every_time_and_logged_once_per_reason_and_address() {
        let refusals = Refusals::default();
        let peer: SocketAddr = "192.0.2.1:4433".parse().unwrap();
        let other: SocketAddr = "192.0.2.2:4433".parse().unwrap();
        let verdicts: Vec<LogVerdict> = (0..3)
            .map(|i| refusals.record_at(peer, "tls", &"unknown CA", 1_000 + i))
            .collect();
        assert_eq!(
            verdicts,
            [LogVerdict::Log, LogVerdict::Suppress, LogVerdict::Suppress]
        );
        let verdict = refusals.record_at(other, "region_not_allowed", &"region \"x\"", 1_000);
        assert_eq!(verdict, LogVerdict::Log);
        assert_eq!(refusals.count.load(Ordering::Relaxed), 4);
        // A minute later the looping peer gets one summary line with the count.
        let later = refusals.record_at(peer, "tls", &"unknown CA", 1_000 + REFUSAL_LOG_EVERY_US);
        assert_eq!(later, LogVerdict::Summary { suppressed: 2 });
    }

    #[test]
    fn keep_alive_must_be_below_the_idle_timeout() {
        let config = GossipConfig {
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            ..GossipConfig::default()
        };
        assert!(matches!(config.transport(), Err(QuicError::Config(_))));
        assert!(GossipConfig::default().transport().is_ok());
    }
}
