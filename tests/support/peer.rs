//! Hostile-peer harness: gateway processes of the built binary, and gossip peers played by
//! the test itself with a valid certificate of a configured gateway.
//!
//! A [`Deployment`] is a [`Cluster`] with the hostile-peer policies: the slots marked
//! [`Role::Process`] run as real gateways, the others are only configured (the test plays
//! them, or nobody does). A [`Session`] is one gossip connection the test dialled with any
//! slot's certificate: it speaks the handshake honestly (Hello, an empty full state, settled
//! handovers for the victim's announcements, keep-alives and acks), so the victim reclaims
//! its strict share and counts the session as a peer, and on top of that it sends whatever
//! the test wants.

use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, SendStream};
use serde_json::Value;
use tollgate::crdt::{Ack, Actor, Delta, Handover, Slot};
use tollgate::gossip::codec;
use tollgate::gossip::proto::Message;
use tollgate::gossip::quic::{self, GossipEndpoint};

use super::cluster::{Cluster, Node, Setup, global_policy, hex_sha256};
pub use super::cluster::{DEADLINE, Role};

/// The strict policy: short, so that a cold start reclaims within about two seconds.
pub const STRICT_QUOTA: u64 = 10;
pub const STRICT_WINDOW_S: u64 = 2;
/// The eventual policy: a long window, so that nothing expires while a test counts.
pub const EVENTUAL_QUOTA: u64 = 100;
pub const EVENTUAL_WINDOW_S: u64 = 120;
/// Policies, by name.
pub const STRICT: &str = "hop-strict";
pub const EVENTUAL: &str = "hop-eventual";
/// An eventual policy whose quota is never reached: its requests take the gossip lock like
/// every global one, so their latency shows whether the request path waits behind a flood.
pub const OPEN: &str = "hop-open";
/// An eventual policy like [`EVENTUAL`] with a 10% local reserve: each gateway admits 10 of
/// a key's 100 per window whatever its peers report.
pub const RESERVED: &str = "hop-reserved";
/// Frame bound of the test's own endpoint (the gateways' default).
pub const MAX_FRAME: usize = codec::DEFAULT_MAX_FRAME;

/// API keys the gateways know: `secret-<name>` is the key `key:<name>` of the policies.
pub const CLIENTS: [&str; 8] = ["k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8"];

/// A [`Cluster`] with the hostile-peer policies, and what the test needs to play a slot.
pub struct Deployment {
    cluster: Cluster,
}

impl Deref for Deployment {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl DerefMut for Deployment {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.cluster
    }
}

/// The identities and policies of every gateway.
fn tables() -> String {
    let mut text = String::new();
    for name in CLIENTS {
        text.push_str(&format!(
            "\n[[identity.api_keys]]\nname = \"{name}\"\nsha256 = \"{}\"\n",
            hex_sha256(&format!("secret-{name}"))
        ));
    }
    let by = ["api_key", "ip"];
    text.push_str(&global_policy(
        STRICT,
        "/strict",
        &by,
        &format!("{STRICT_QUOTA}/{STRICT_WINDOW_S}s"),
        "strict",
    ));
    text.push_str(&global_policy(
        EVENTUAL,
        "/eventual",
        &by,
        &format!("{EVENTUAL_QUOTA}/{EVENTUAL_WINDOW_S}s"),
        "eventual",
    ));
    text.push_str(&global_policy(
        RESERVED,
        "/reserved",
        &by,
        &format!("{EVENTUAL_QUOTA}/{EVENTUAL_WINDOW_S}s"),
        "eventual",
    ));
    text.push_str("local_reserve = \"10%\"\n");
    text.push_str(&global_policy(
        OPEN,
        "/open",
        &by,
        "100000000/60s",
        "eventual",
    ));
    text
}

impl Deployment {
    /// Issues certificates and configs for every slot and starts the [`Role::Process`] ones
    /// (without waiting for them: see [`Cluster::wait_connected`]).
    pub async fn start(slots: &[(&str, &str, Role)]) -> Self {
        let tables = tables();
        let setup = Setup {
            drain_timeout: "1s",
            tables: &tables,
        };
        Self {
            cluster: Cluster::start(slots, &setup).await,
        }
    }

    /// `/limits/{policy}?key=key:{client}` of gateway `i`.
    pub async fn limits(&self, i: usize, policy: &str, client: &str) -> Option<Value> {
        self.cluster
            .limits(i, policy, &format!("key:{client}"))
            .await
    }

    /// Waits until gateway `i` holds its strict share.
    pub async fn wait_reclaimed(&self, i: usize) {
        self.until(
            &format!("gateway {i} to reclaim its strict share"),
            || async {
                self.reclaimed(i, STRICT, &format!("key:{}", CLIENTS[0]))
                    .await
            },
        )
        .await;
    }

    /// What gateway `i`'s `/ready` says of the peer named `region/instance`.
    pub async fn peer_report(&self, i: usize, name: &str) -> Option<Value> {
        let ready = self.ready(i).await?;
        ready["gossip"]["peers"]
            .as_array()?
            .iter()
            .find(|p| p["peer"] == name)
            .cloned()
    }

    /// One request through gateway `i`'s proxy as `client`: its status, or `None` if it
    /// failed or took longer than `timeout`.
    pub async fn request(
        &self,
        i: usize,
        path: &str,
        client: &str,
        timeout: Duration,
    ) -> Option<u16> {
        let response = self
            .http
            .get(self.url(i, path))
            .header("x-api-key", format!("secret-{client}"))
            .timeout(timeout)
            .send()
            .await
            .ok()?;
        let status = response.status().as_u16();
        // Read the body so the connection is reused.
        response.bytes().await.ok()?;
        Some(status)
    }

    /// Waits until gateway `i` admits through the open global policy (a new incarnation
    /// refuses eventual requests until it learnt its peers' counts, at most a second).
    pub async fn wait_serving(&self, i: usize) {
        self.until(&format!("gateway {i} to serve global policies"), || async {
            self.request(i, "/open", CLIENTS[7], Duration::from_secs(5))
                .await
                == Some(200)
        })
        .await;
    }

    /// Asserts gateway `i` still serves: alive, `/ready` answers, a proxied request without
    /// a policy and one through the open global policy are answered 200.
    pub async fn assert_serving(&mut self, i: usize) {
        let status = self.exited(i);
        assert!(
            status.is_none(),
            "gateway {i} exited with {status:?}\n{}",
            self.logs()
        );
        assert!(
            self.ready(i).await.is_some(),
            "gateway {i}: /ready unanswered\n{}",
            self.logs()
        );
        for path in ["/plain", "/open"] {
            let status = self
                .request(i, path, CLIENTS[7], Duration::from_secs(5))
                .await;
            assert_eq!(
                status,
                Some(200),
                "gateway {i}: GET {path}\n{}",
                self.logs()
            );
        }
    }

    /// Rewrites gateway `i`'s file with the strict policy's quota set to `quota` and sends
    /// it SIGHUP: a reload of the running process.
    pub fn reload_strict_quota(&self, i: usize, quota: u64) {
        self.reload_with(i, |text| {
            let header = format!("[policies.{STRICT}]");
            let (before, section) = text.split_at(text.find(&header).unwrap());
            let rate_at = section.find("\nrate = ").unwrap() + 1;
            let rate_end = rate_at + section[rate_at..].find('\n').unwrap();
            format!(
                "{before}{}rate = \"{quota}/{STRICT_WINDOW_S}s\"{}",
                &section[..rate_at],
                &section[rate_end..]
            )
        });
    }

    /// The configuration digest every Hello must carry, computed as the gateways do.
    pub fn config_digest(&self) -> u64 {
        let config = self.config(0);
        let slots = config.gossip.as_ref().unwrap().slots();
        tollgate::global::GlobalPolicies::from_policies(&config.policies).digest(&slots)
    }

    /// The gossip id of a global policy (its default tier).
    pub fn policy_id(&self, policy: &str) -> u32 {
        let config = self.config(0);
        tollgate::global::GlobalPolicies::from_policies(&config.policies)
            .find(policy, None)
            .unwrap()
            .id
    }

    /// A gossip endpoint presenting slot `i`'s certificate, bound to slot `i`'s configured
    /// address (`at_own_address`, to accept the dials meant for it) or to an ephemeral port
    /// (a second copy of a certificate that a running gateway uses too).
    pub fn endpoint(&self, i: usize, at_own_address: bool) -> GossipEndpoint {
        let certs = self.certs();
        let gateway =
            tollgate::certs::Gateway::new(&self.nodes[i].region, &self.nodes[i].instance).unwrap();
        let tls = tollgate::gossip::tls::PeerTls::load(
            &certs.join("ca.pem"),
            &certs.join(gateway.cert_file()),
            &certs.join(gateway.key_file()),
        )
        .unwrap();
        let listen = if at_own_address {
            self.gossip_addr(i)
        } else {
            "127.0.0.1:0".parse().unwrap()
        };
        let slots = self.nodes.iter().map(Node::slot).collect();
        GossipEndpoint::bind(listen, tls, slots).unwrap()
    }

    /// What the test needs to speak for slot `me` to gateway `victim`.
    pub fn peer_spec(&self, me: usize, victim: usize) -> PeerSpec {
        PeerSpec {
            me: u16::try_from(me).unwrap(),
            my_slot: self.nodes[me].slot(),
            victim: u16::try_from(victim).unwrap(),
            victim_slot: self.nodes[victim].slot(),
            victim_addr: self.gossip_addr(victim),
            digest: self.config_digest(),
        }
    }
}

/// The gossip clock of the gateways: wall-clock microseconds (incarnations are start times).
pub fn wall_us() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros(),
    )
    .unwrap()
}

/// Who the test speaks for, and to whom.
#[derive(Debug, Clone)]
pub struct PeerSpec {
    pub me: u16,
    pub my_slot: Slot,
    pub victim: u16,
    pub victim_slot: Slot,
    pub victim_addr: SocketAddr,
    pub digest: u64,
}

impl PeerSpec {
    pub fn hello(&self, incarnation: u64) -> Message {
        Message::Hello {
            actor: self.my_slot.actor(incarnation),
            config_digest: self.digest,
        }
    }
}

/// Encodes one message as a frame.
pub fn frame(message: &Message) -> Vec<u8> {
    codec::encode(message, MAX_FRAME).unwrap()
}

/// What a session heard from the victim.
#[derive(Debug, Default)]
pub struct Inbox {
    /// The victim's actor, from its Hello.
    pub victim: Option<Actor>,
    /// Messages received, any kind.
    pub messages: u64,
    /// Transfers received.
    pub transfers: u64,
    /// Highest `to_version` of the victim's complete deltas: what our acks claim.
    heard: u64,
}

/// One gossip connection dialled by the test.
pub struct Session {
    pub connection: Connection,
    send: Arc<tokio::sync::Mutex<SendStream>>,
    pub inbox: Arc<Mutex<Inbox>>,
    pub actor: Actor,
    pub spec: PeerSpec,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.connection.close(quic::CLOSE_SHUTDOWN, b"test done");
    }
}

/// Why a connection ended, as the victim said it.
pub fn close_reason(error: &quinn::ConnectionError) -> String {
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => format!(
            "{:#x} {}",
            close.error_code.into_inner(),
            String::from_utf8_lossy(&close.reason)
        ),
        other => other.to_string(),
    }
}

impl Session {
    /// Dials the victim as `spec.my_slot` with `incarnation`, sends `first` (normally our
    /// Hello, see [`PeerSpec::hello`]) and, if `honest`, plays the rest of the handshake in
    /// the background: an empty full state, a settled handover for every announcement,
    /// keep-alives and acks every 200 ms. Does not wait for the victim's verdict.
    pub async fn dial(
        endpoint: &GossipEndpoint,
        spec: &PeerSpec,
        incarnation: u64,
        first: &[u8],
        honest: bool,
    ) -> Result<Self, String> {
        let connection = endpoint
            .connect(spec.victim_addr, &spec.victim_slot)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = quic::open_stream(&connection, MAX_FRAME)
            .await
            .map_err(|e| e.to_string())?;
        quic::send_frame(&mut send, first)
            .await
            .map_err(|e| e.to_string())?;
        let actor = spec.my_slot.actor(incarnation);
        let send = Arc::new(tokio::sync::Mutex::new(send));
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let mut tasks = Vec::new();
        {
            let (send, inbox, spec, actor) =
                (send.clone(), inbox.clone(), spec.clone(), actor.clone());
            tasks.push(tokio::spawn(async move {
                let mut said_full_state = false;
                while let Ok(Some(message)) = recv.recv::<Message>().await {
                    let mut reply = Vec::new();
                    {
                        let mut inbox = inbox.lock().unwrap();
                        inbox.messages += 1;
                        match &message {
                            Message::Hello { actor, .. } => inbox.victim = Some(actor.clone()),
                            Message::Transfer(_) => inbox.transfers += 1,
                            Message::Delta { delta, .. } | Message::FullState { delta, .. }
                                if delta.chunk + 1 == delta.chunks =>
                            {
                                inbox.heard = inbox.heard.max(delta.to_version);
                            }
                            _ => {}
                        }
                    }
                    if !honest {
                        continue;
                    }
                    if !said_full_state {
                        said_full_state = true;
                        reply.push(frame(&Message::FullState {
                            delta: empty_delta(),
                            ack: Ack::default(),
                        }));
                    }
                    if let Message::Announce(a) = &message
                        && a.want_handover
                    {
                        reply.push(frame(&Message::Handover(Handover {
                            from: spec.me,
                            from_incarnation: actor.incarnation,
                            to: spec.victim,
                            to_incarnation: a.incarnation,
                            settled: true,
                            chunk: 0,
                            chunks: 1,
                            floor: 0,
                            entries: Vec::new(),
                        })));
                    }
                    if !reply.is_empty() {
                        let mut send = send.lock().await;
                        for f in reply {
                            if quic::send_frame(&mut send, &f).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }));
        }
        if honest {
            let (send, inbox) = (send.clone(), inbox.clone());
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                loop {
                    tick.tick().await;
                    let heard = inbox.lock().unwrap().heard;
                    let ack = Message::Ack(Ack {
                        heard_from_you: heard,
                        my_version: 0,
                    });
                    let mut send = send.lock().await;
                    if quic::send_frame(&mut send, &frame(&ack)).await.is_err() {
                        return;
                    }
                }
            }));
        }
        Ok(Self {
            connection,
            send,
            inbox,
            actor,
            spec: spec.clone(),
            tasks,
        })
    }

    /// [`Session::dial`] with our Hello, honest.
    pub async fn handshake(
        endpoint: &GossipEndpoint,
        spec: &PeerSpec,
        incarnation: u64,
    ) -> Result<Self, String> {
        Self::dial(
            endpoint,
            spec,
            incarnation,
            &frame(&spec.hello(incarnation)),
            true,
        )
        .await
    }

    /// Sends raw bytes on the gossip stream.
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<(), String> {
        let mut send = self.send.lock().await;
        quic::send_frame(&mut send, bytes)
            .await
            .map_err(|e| e.to_string())
    }

    /// Finishes our side of the gossip stream.
    pub async fn finish(&self) {
        let _ = self.send.lock().await.finish();
    }

    /// Sends messages, framed, in one write.
    pub async fn send(&self, messages: &[Message]) -> Result<(), String> {
        let bytes: Vec<u8> = messages.iter().flat_map(frame).collect();
        self.send_raw(&bytes).await
    }

    /// The victim's actor once its Hello arrived (it answers ours only if it accepted it).
    pub async fn victim(&self) -> Result<Actor, String> {
        let start = Instant::now();
        loop {
            if let Some(victim) = self.inbox.lock().unwrap().victim.clone() {
                return Ok(victim);
            }
            if let Some(reason) = self.connection.close_reason() {
                return Err(close_reason(&reason));
            }
            if start.elapsed() > DEADLINE {
                return Err("no Hello from the victim in time".to_owned());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the victim closes the connection; its close code and reason.
    pub async fn closed(&self) -> String {
        match tokio::time::timeout(DEADLINE, self.connection.closed()).await {
            Ok(reason) => close_reason(&reason),
            Err(_) => panic!("the victim kept a connection it should have closed"),
        }
    }
}

/// A delta with nothing in it (an empty full state when `from_version` is 0).
pub fn empty_delta() -> Delta {
    Delta {
        from_version: 0,
        to_version: 0,
        chunk: 0,
        chunks: 1,
        actors: Vec::new(),
        policies: Vec::new(),
    }
}

/// Latency figures of a series of requests.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// Requests not answered 200 within the deadline.
    pub failed: usize,
}

/// `n` sequential requests through gateway `i`'s proxy on `path`, each given `deadline`.
pub async fn measure(
    d: &Deployment,
    i: usize,
    path: &str,
    n: usize,
    deadline: Duration,
) -> Latency {
    let mut took = Vec::with_capacity(n);
    let mut failed = 0;
    for k in 0..n {
        let start = Instant::now();
        let status = d.request(i, path, CLIENTS[k % 4], deadline).await;
        took.push(start.elapsed());
        if status != Some(200) {
            failed += 1;
        }
    }
    took.sort();
    let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
    Latency {
        p50: at(0.50),
        p99: at(0.99),
        max: took[took.len() - 1],
        failed,
    }
}
