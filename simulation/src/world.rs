//! The discrete-event loop that runs N regions' production [`Gossip`] machines.
//!
//! Virtual time is a `u64` of microseconds from 0; region `r`'s clock reads
//! `T0 + virtual + skew[r]`, and that is the `now_us` every call into its machine gets. The
//! loop always advances to the earliest of: a scheduled fault, a queued network event, a
//! machine's [`Gossip::poll_timeout`], or the next offered request. Ties are broken by a
//! sequence number, so a run is a pure function of the scenario, the mode and the seed.
//!
//! # Connections
//!
//! The machine asks to dial ([`Gossip::poll_connect`]); the dial reaches the target after a
//! one-way delay if both directions are open and the target is alive (QUIC needs a round
//! trip), and the target then reports [`Gossip::on_connected`]; the dialler learns of it one
//! one-way delay later. A dial that cannot get through is retried after [`DIAL_RETRY_US`],
//! then after twice as long each time (QUIC resends its Initial packets on its probe timeout,
//! about 1 s with quinn's default initial RTT of 333 ms, doubling), until the machine itself
//! gives up at its idle timeout.
//! Every connection has an id; messages carry it and die with it. A crashed process answers
//! nothing (its peers time it out); its restarted successor answers messages on the old
//! connection with a stateless reset, which closes it at the sender.
//!
//! # A byzantine region
//!
//! [`run_with`] may name one region whose outgoing messages pass through an
//! [`Adversary`] after its machine produced them and before they are encoded: what the
//! adversary returns is what its peers receive, on its authenticated connections.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use tollgate::crdt::{Actor, Slot};
use tollgate::gossip::codec::{self, DEFAULT_MAX_FRAME, Decoder};
use tollgate::gossip::proto::{
    GlobalCheck, Gossip, GossipConfig, GossipError, LinkState, Message, PeerId, PeerStatus,
    Policies,
};
use tollgate::limit::policy::GlobalMode as ProductionMode;

use crate::adversary::{Adversary, Outgoing};
use crate::net::{GATEWAYS, MAX_GATEWAYS, MS, Network};
use crate::scenario::{
    Action, END_US, EVENTUAL, LIMIT, Request, STRICT, Scenario, TRAFFIC_START_US, key_name,
    policies_with_reserve,
};

/// A realistic wall-clock origin (2025), so sub-window numbers look like production ones and
/// negative clock offsets stay positive.
pub const T0: u64 = 1_750_000_000_000_000;

/// The configuration digest every region agrees on.
pub const CONFIG_DIGEST: u64 = 0x7011_6a7e_0000_0005;

/// First retry of an undelivered dial: quinn's first probe timeout (initial RTT 333 ms:
/// 333 + 4 x 333 / 2 + 25 ms max ack delay, about 1 s); later retries double it.
pub const DIAL_RETRY_US: u64 = 1_000 * MS;

/// Most loop iterations at one instant before the run is declared livelocked.
const MAX_SPINS: u32 = 1_000_000;

/// The gossip configuration of every region: production defaults (50 ms interval).
pub fn gossip_config() -> GossipConfig {
    GossipConfig::default()
}

/// What global policies every request passes, decided as the gateway's request path does:
/// by [`Gossip::admit`] on the production machine, all or nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GlobalMode {
    /// One eventual policy.
    Eventual,
    /// One strict policy.
    Strict,
    /// An eventual and a strict policy of the same quota on every request: admitted only if
    /// both have room, and what one took is given back when the other refuses.
    Both,
}

impl GlobalMode {
    /// The request's checks in this mode, in the order the gateway's policies would list
    /// them.
    pub fn checks(self, key: &str) -> Vec<GlobalCheck<'_>> {
        let eventual = GlobalCheck {
            policy: EVENTUAL,
            mode: ProductionMode::Eventual,
            key,
            cost: 1,
            quota: LIMIT,
        };
        let strict = GlobalCheck {
            policy: STRICT,
            mode: ProductionMode::Strict,
            key,
            cost: 1,
            quota: LIMIT,
        };
        match self {
            GlobalMode::Eventual => vec![eventual],
            GlobalMode::Strict => vec![strict],
            GlobalMode::Both => vec![eventual, strict],
        }
    }
}

/// One admitted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Virtual time of the decision.
    pub at_us: u64,
    /// The deciding region (for `central`, where the client is).
    pub region: usize,
    /// The key.
    pub key: u32,
}

/// What one run produced.
#[derive(Debug, Clone, Default)]
pub struct RunOutput {
    /// Every admission, in decision order.
    pub admissions: Vec<Admission>,
    /// Every refused request of a live region, in decision order.
    pub refusals: Vec<Admission>,
    /// Encoded gossip bytes sent during the traffic phase.
    pub gossip_bytes: u64,
    /// Per recovery (heal or restart): microseconds until every region had merged a delta
    /// every other region sent after it (`None`: not by the end of the run).
    pub recoveries: Vec<(Action, Option<u64>)>,
    /// Regions whose strict slot had not reclaimed its share when traffic started.
    pub unreclaimed_at_start: Vec<usize>,
    /// Messages the codec refused to frame (none are expected).
    pub encode_errors: u64,
    /// At the end: every region alive, every link up and every peer's `Hello` accepted.
    pub all_connected_at_end: bool,
    /// At the end: every region's strict slot holds its share.
    pub all_reclaimed_at_end: bool,
    /// At the end: the directed pairs `(r, p)` where region `r` has an accepted, live link
    /// to `p`.
    pub links_up_at_end: BTreeSet<(usize, usize)>,
    /// At the end: actors interned in each region's usage table (0 for a dead region).
    pub actors_at_end: Vec<usize>,
}

/// Why a run could not complete.
#[derive(Debug)]
pub enum SimError {
    /// The production machine refused its configuration.
    Gossip(GossipError),
    /// The policies' window is invalid.
    Window(tollgate::crdt::window::WindowError),
    /// The loop made no progress in time.
    Livelock {
        /// Virtual time where it got stuck.
        at_us: u64,
    },
    /// The scenario names fewer than 2 or more than [`MAX_GATEWAYS`] gateways.
    Gateways(usize),
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Gossip(e) => write!(f, "gossip: {e}"),
            Self::Window(e) => write!(f, "window: {e}"),
            Self::Livelock { at_us } => write!(f, "livelock at {at_us} us"),
            Self::Gateways(n) => write!(f, "{n} gateways: the world runs 2 to {MAX_GATEWAYS}"),
        }
    }
}

impl std::error::Error for SimError {}

impl From<GossipError> for SimError {
    fn from(e: GossipError) -> Self {
        Self::Gossip(e)
    }
}

impl From<tollgate::crdt::window::WindowError> for SimError {
    fn from(e: tollgate::crdt::window::WindowError) -> Self {
        Self::Window(e)
    }
}

/// `now_us` of a clock `offset` away from virtual time `v`.
pub fn local_time(v: u64, offset: i64) -> u64 {
    T0.saturating_add(v).saturating_add_signed(offset)
}

/// Virtual time at which a clock `offset` away reads `local` (never before `floor`).
fn virtual_time(local: u64, offset: i64, floor: u64) -> u64 {
    local
        .saturating_add_signed(offset.saturating_neg())
        .saturating_sub(T0)
        .max(floor)
}

#[derive(Debug)]
enum Event {
    Deliver {
        from: usize,
        to: usize,
        conn: u64,
        sent_us: u64,
        msg: Message,
    },
    /// A dial from `from` (incarnation `inc`, dialling since `since` on its clock) reaches
    /// `to`, or is retried.
    Dial {
        from: usize,
        to: usize,
        inc: u64,
        since: u64,
        /// Wait before the next retry if this attempt does not get through.
        retry_us: u64,
    },
    /// The dialler learns its dial succeeded.
    DialerUp {
        from: usize,
        to: usize,
        inc: u64,
        since: u64,
        conn: u64,
    },
    /// `to` learns that connection `conn` with `from` was closed (or reset).
    Closed { from: usize, to: usize, conn: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Conn {
    id: u64,
    open: bool,
    /// Incarnation of each end when it came up, indexed by region.
    inc: [u64; MAX_GATEWAYS],
}

struct Region {
    gossip: Option<Gossip>,
    inc: u64,
    offset: i64,
}

struct Recovery {
    action: Action,
    at_us: u64,
    pending: BTreeSet<(usize, usize)>,
    done_us: Option<u64>,
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

fn peer(i: usize) -> PeerId {
    // At most MAX_GATEWAYS (5): every gateway index fits.
    PeerId(i as u16)
}

/// The slot list of a world of `n` gateways.
fn slots(n: usize) -> Vec<Slot> {
    GATEWAYS[..n]
        .iter()
        .map(|(r, i)| Slot::new(*r, *i))
        .collect()
}

/// Gateway `g`'s actor in incarnation `inc`.
fn actor(g: usize, inc: u64) -> Actor {
    let (region, instance) = GATEWAYS[g];
    Actor::new(region, instance, inc)
}

/// The simulated world of one run.
struct World {
    now: u64,
    regions: Vec<Region>,
    net: Network,
    queue: BTreeMap<(u64, u64), Event>,
    seq: u64,
    conns: BTreeMap<(usize, usize), Conn>,
    next_conn: u64,
    seed: u64,
    recoveries: Vec<Recovery>,
    out: RunOutput,
    /// The byzantine region and what it does to its outgoing messages.
    byzantine: Option<(usize, Box<dyn Adversary>)>,
    /// The workload's client keys.
    keys: Vec<String>,
    /// How many gateways the world runs (every one in the slot list from the start).
    gateways: usize,
    /// The policies every incarnation starts with.
    policies: Policies,
}

impl World {
    fn new(
        scenario: &Scenario,
        seed: u64,
        byzantine: Option<(usize, Box<dyn Adversary>)>,
    ) -> Result<Self, SimError> {
        let mut w = Self {
            now: 0,
            regions: Vec::new(),
            net: Network::new(scenario.net, seed ^ 0x6e65_7477_6f72_6b00),
            queue: BTreeMap::new(),
            seq: 0,
            conns: BTreeMap::new(),
            next_conn: 0,
            seed,
            recoveries: Vec::new(),
            out: RunOutput::default(),
            byzantine,
            keys: (0..scenario.keys()).map(key_name).collect(),
            gateways: scenario.gateways(),
            policies: policies_with_reserve(scenario.local_reserve)?,
        };
        if !(2..=MAX_GATEWAYS).contains(&scenario.gateways()) {
            return Err(SimError::Gateways(scenario.gateways()));
        }
        w.out.actors_at_end = vec![0; scenario.gateways()];
        for (r, offset) in scenario.skew_us.iter().enumerate() {
            w.regions.push(Region {
                gossip: None,
                inc: 1,
                offset: *offset,
            });
            w.start(r)?;
        }
        Ok(w)
    }

    /// Starts region `r`'s current incarnation with fresh state.
    fn start(&mut self, r: usize) -> Result<(), SimError> {
        let inc = self.regions[r].inc;
        let now = self.local(r);
        let me = actor(r, inc);
        let seed = self
            .seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add((r as u64 + 1) << 32 | inc);
        self.regions[r].gossip = Some(Gossip::new(
            me,
            slots(self.gateways),
            gossip_config(),
            self.policies.clone(),
            CONFIG_DIGEST,
            seed,
            now,
        )?);
        Ok(())
    }

    fn local(&self, r: usize) -> u64 {
        local_time(self.now, self.regions[r].offset)
    }

    fn schedule(&mut self, at: u64, event: Event) {
        self.seq += 1;
        self.queue.insert((at, self.seq), event);
    }

    /// Collects region `r`'s dials, closes and messages and puts them on the network.
    fn pump(&mut self, r: usize) {
        let now_local = self.local(r);
        let inc = self.regions[r].inc;
        let Some(g) = self.regions[r].gossip.as_mut() else {
            return;
        };
        let mut dials = Vec::new();
        while let Some(p) = g.poll_connect(now_local) {
            dials.push(usize::from(p.0));
        }
        let mut closes = Vec::new();
        while let Some(p) = g.poll_close() {
            closes.push(usize::from(p.0));
        }
        let mut msgs = Vec::new();
        while let Some((p, msg)) = g.poll_transmit(now_local) {
            msgs.push((usize::from(p.0), msg));
        }
        if let Some((b, adversary)) = self.byzantine.as_mut()
            && *b == r
        {
            let actors: Vec<Actor> = (0..self.regions.len())
                .map(|i| actor(i, self.regions[i].inc))
                .collect();
            let mut lies = Vec::with_capacity(msgs.len());
            for (to, msg) in msgs {
                let out = Outgoing {
                    now_us: self.now,
                    local_us: now_local,
                    from: r,
                    to,
                    actors: &actors,
                    keys: &self.keys,
                };
                lies.extend(adversary.rewrite(&out, msg).into_iter().map(|m| (to, m)));
            }
            msgs = lies;
        }
        for to in dials {
            let at = self.now + self.net.delay(r, to);
            self.schedule(
                at,
                Event::Dial {
                    from: r,
                    to,
                    inc,
                    since: now_local,
                    retry_us: DIAL_RETRY_US,
                },
            );
        }
        for to in closes {
            if let Some(c) = self.conns.get_mut(&pair(r, to))
                && c.open
                && c.inc[r] == inc
            {
                c.open = false;
                let conn = c.id;
                if self.net.open(r, to) {
                    let at = self.now + self.net.delay(r, to);
                    self.schedule(at, Event::Closed { from: r, to, conn });
                }
            }
        }
        for (to, msg) in msgs {
            let bytes = match codec::encode(&msg, DEFAULT_MAX_FRAME) {
                Ok(b) => b,
                Err(_) => {
                    self.out.encode_errors += 1;
                    continue;
                }
            };
            if self.now >= TRAFFIC_START_US {
                self.out.gossip_bytes += bytes.len() as u64;
            }
            let Some(c) = self.conns.get(&pair(r, to)).copied() else {
                continue;
            };
            if !c.open || c.inc[r] != inc || !self.net.open(r, to) {
                continue;
            }
            for _ in 0..self.net.copies() {
                // Through the real codec both ways: what arrives is what production decodes.
                let mut decoder = Decoder::new(DEFAULT_MAX_FRAME);
                decoder.extend(&bytes);
                let Ok(Some(decoded)) = decoder.decode::<Message>() else {
                    self.out.encode_errors += 1;
                    continue;
                };
                let at = self.now + self.net.delay(r, to);
                self.schedule(
                    at,
                    Event::Deliver {
                        from: r,
                        to,
                        conn: c.id,
                        sent_us: self.now,
                        msg: decoded,
                    },
                );
            }
        }
    }

    fn dialing_since(&self, r: usize, p: usize) -> Option<u64> {
        let g = self.regions[r].gossip.as_ref()?;
        g.peer_status()
            .into_iter()
            .find(|rep| usize::from(rep.peer.0) == p)
            .and_then(|rep| match rep.link {
                LinkState::Dialing { since_us } => Some(since_us),
                _ => None,
            })
    }

    fn apply(&mut self, event: Event) {
        match event {
            Event::Deliver {
                from,
                to,
                conn,
                sent_us,
                msg,
            } => self.deliver(from, to, conn, sent_us, msg),
            Event::Dial {
                from,
                to,
                inc,
                since,
                retry_us,
            } => {
                // The dialler gave up (its own timeout) or died: the dial is over.
                if self.regions[from].inc != inc || self.dialing_since(from, to) != Some(since) {
                    return;
                }
                let target_alive = self.regions[to].gossip.is_some();
                if !target_alive || !self.net.both_open(from, to) {
                    self.schedule(
                        self.now + retry_us,
                        Event::Dial {
                            from,
                            to,
                            inc,
                            since,
                            retry_us: retry_us.saturating_mul(2),
                        },
                    );
                    return;
                }
                self.next_conn += 1;
                let mut incs = [0; MAX_GATEWAYS];
                incs[from] = inc;
                incs[to] = self.regions[to].inc;
                let id = self.next_conn;
                self.conns.insert(
                    pair(from, to),
                    Conn {
                        id,
                        open: true,
                        inc: incs,
                    },
                );
                let now_to = self.local(to);
                if let Some(g) = self.regions[to].gossip.as_mut() {
                    g.on_connected(peer(from), now_to);
                }
                let at = self.now + self.net.delay(to, from);
                self.schedule(
                    at,
                    Event::DialerUp {
                        from,
                        to,
                        inc,
                        since,
                        conn: id,
                    },
                );
                self.pump(to);
            }
            Event::DialerUp {
                from,
                to,
                inc,
                since,
                conn,
            } => {
                let current = self
                    .conns
                    .get(&pair(from, to))
                    .is_some_and(|c| c.id == conn && c.open);
                if !current {
                    return;
                }
                if self.regions[from].inc == inc && self.dialing_since(from, to) == Some(since) {
                    let now_from = self.local(from);
                    if let Some(g) = self.regions[from].gossip.as_mut() {
                        g.on_connected(peer(to), now_from);
                    }
                    self.pump(from);
                } else if let Some(c) = self.conns.get_mut(&pair(from, to)) {
                    // The dialler no longer wants it: it closes the connection.
                    c.open = false;
                    if self.net.open(from, to) {
                        let at = self.now + self.net.delay(from, to);
                        self.schedule(at, Event::Closed { from, to, conn });
                    }
                }
            }
            Event::Closed { from, to, conn } => {
                let current = self.conns.get(&pair(from, to)).copied();
                let Some(c) = current else { return };
                if c.id != conn || c.inc[to] != self.regions[to].inc {
                    return;
                }
                let now_to = self.local(to);
                if let Some(g) = self.regions[to].gossip.as_mut() {
                    g.on_disconnected(peer(from), now_to);
                }
                self.pump(to);
            }
        }
    }

    fn deliver(&mut self, from: usize, to: usize, conn: u64, sent_us: u64, msg: Message) {
        let Some(c) = self.conns.get(&pair(from, to)).copied() else {
            return;
        };
        if c.id != conn || !c.open || self.regions[to].gossip.is_none() {
            return;
        }
        if c.inc[to] != self.regions[to].inc {
            // A new process got a packet of its predecessor's connection: stateless reset.
            if let Some(c) = self.conns.get_mut(&pair(from, to)) {
                c.open = false;
            }
            if self.net.open(to, from) {
                let at = self.now + self.net.delay(to, from);
                self.schedule(
                    at,
                    Event::Closed {
                        from: to,
                        to: from,
                        conn,
                    },
                );
            }
            return;
        }
        let carries_state = matches!(msg, Message::Delta { .. } | Message::FullState { .. });
        let now_to = self.local(to);
        let Some(g) = self.regions[to].gossip.as_mut() else {
            return;
        };
        g.handle(now_to, peer(from), msg);
        if carries_state && self.recoveries.iter().any(|r| r.done_us.is_none()) {
            let merged = g
                .peer_status()
                .iter()
                .any(|rep| usize::from(rep.peer.0) == from && rep.last_delta_us == Some(now_to));
            if merged {
                let now = self.now;
                for rec in &mut self.recoveries {
                    if rec.done_us.is_none() && sent_us >= rec.at_us {
                        rec.pending.remove(&(to, from));
                        if rec.pending.is_empty() {
                            rec.done_us = Some(now - rec.at_us);
                        }
                    }
                }
            }
        }
        self.pump(to);
    }

    fn act(&mut self, action: Action) -> Result<(), SimError> {
        match action {
            Action::CutAll => {
                for a in 0..self.regions.len() {
                    for b in 0..self.regions.len() {
                        if a != b {
                            self.net.cut_one_way(a, b);
                        }
                    }
                }
            }
            Action::Isolate(r) => {
                for b in 0..self.regions.len() {
                    if b != r {
                        self.net.cut(r, b);
                    }
                }
            }
            Action::CutOneWay { from, to } => self.net.cut_one_way(from, to),
            Action::Heal => {
                self.net.heal();
                self.recovery(action);
            }
            Action::Crash(r) => self.regions[r].gossip = None,
            Action::Restart(r) => {
                self.regions[r].inc += 1;
                self.start(r)?;
                self.pump(r);
                self.recovery(action);
            }
        }
        Ok(())
    }

    fn recovery(&mut self, action: Action) {
        let alive: Vec<usize> = (0..self.regions.len())
            .filter(|r| self.regions[*r].gossip.is_some())
            .collect();
        let mut pending = BTreeSet::new();
        for &a in &alive {
            for &b in &alive {
                if a != b {
                    pending.insert((a, b));
                }
            }
        }
        self.recoveries.push(Recovery {
            action,
            at_us: self.now,
            pending,
            done_us: None,
        });
    }

    fn next_timer(&self) -> Option<u64> {
        self.regions
            .iter()
            .filter_map(|reg| {
                let g = reg.gossip.as_ref()?;
                Some(virtual_time(g.poll_timeout()?, reg.offset, self.now))
            })
            .min()
    }
}

/// Runs `scenario` in `mode` on the production machines, offering `requests`.
pub fn run(
    scenario: &Scenario,
    mode: GlobalMode,
    seed: u64,
    requests: &[Request],
) -> Result<RunOutput, SimError> {
    run_with(scenario, mode, seed, requests, None)
}

/// [`run`] with one byzantine region: `byzantine` names it and rewrites what it sends (see
/// [`crate::adversary`]).
pub fn run_with(
    scenario: &Scenario,
    mode: GlobalMode,
    seed: u64,
    requests: &[Request],
    byzantine: Option<(usize, Box<dyn Adversary>)>,
) -> Result<RunOutput, SimError> {
    let mut w = World::new(scenario, seed, byzantine)?;
    let keys = w.keys.clone();
    let mut next_req = 0usize;
    let mut next_action = 0usize;
    let mut checked_reclaim = false;
    let mut spins = 0u32;
    let n = w.regions.len();
    for r in 0..n {
        w.pump(r);
    }
    loop {
        let t_action = scenario.actions.get(next_action).map(|a| a.0);
        let t_event = w.queue.keys().next().map(|k| k.0);
        let t_req = requests.get(next_req).map(|r| r.at_us);
        let t_timer = w.next_timer();
        let Some(t) = [t_action, t_event, t_req, t_timer]
            .into_iter()
            .flatten()
            .min()
        else {
            break;
        };
        let t = t.max(w.now);
        if t >= END_US {
            break;
        }
        if t == w.now {
            spins += 1;
            if spins > MAX_SPINS {
                return Err(SimError::Livelock { at_us: t });
            }
        } else {
            spins = 0;
        }
        w.now = t;
        if !checked_reclaim && t >= TRAFFIC_START_US {
            checked_reclaim = true;
            w.out.unreclaimed_at_start = (0..n)
                .filter(|r| {
                    w.regions[*r]
                        .gossip
                        .as_ref()
                        .is_some_and(|g| !g.strict().is_reclaimed())
                })
                .collect();
        }
        while let Some(&(at, action)) = scenario.actions.get(next_action) {
            if at > t {
                break;
            }
            next_action += 1;
            w.act(action)?;
        }
        while let Some(entry) = w.queue.first_entry() {
            if entry.key().0 > t {
                break;
            }
            let event = entry.remove();
            w.apply(event);
        }
        for r in 0..n {
            let now_r = w.local(r);
            let Some(g) = w.regions[r].gossip.as_mut() else {
                continue;
            };
            if g.poll_timeout().is_some_and(|d| d <= now_r) {
                g.handle_timeout(now_r);
                w.pump(r);
            }
        }
        while let Some(req) = requests.get(next_req) {
            if req.at_us > t {
                break;
            }
            next_req += 1;
            let now_r = w.local(req.region);
            // A dead region admits nothing: its clients' requests fail.
            let Some(g) = w.regions[req.region].gossip.as_mut() else {
                continue;
            };
            let key = keys.get(req.key as usize).map(String::as_str).unwrap_or("");
            let ok = g
                .admit(&mode.checks(key), now_r)
                .iter()
                .all(|outcome| outcome.admitted);
            let ok = ok
                || w.byzantine
                    .as_ref()
                    .is_some_and(|(b, a)| *b == req.region && a.admits_regardless());
            let decision = Admission {
                at_us: t,
                region: req.region,
                key: req.key,
            };
            if ok {
                w.out.admissions.push(decision);
            } else {
                w.out.refusals.push(decision);
            }
            w.pump(req.region);
        }
    }
    w.out.all_connected_at_end = w.regions.iter().all(|reg| {
        reg.gossip.as_ref().is_some_and(|g| {
            g.peer_status()
                .iter()
                .all(|p| p.status == PeerStatus::Ok && matches!(p.link, LinkState::Up { .. }))
        })
    });
    w.out.all_reclaimed_at_end = w.regions.iter().all(|reg| {
        reg.gossip
            .as_ref()
            .is_some_and(|g| g.strict().is_reclaimed())
    });
    for (r, reg) in w.regions.iter().enumerate() {
        let Some(g) = reg.gossip.as_ref() else {
            continue;
        };
        w.out.actors_at_end[r] = g.eventual().table().actors().len();
        for p in g.peer_status() {
            if p.status == PeerStatus::Ok && matches!(p.link, LinkState::Up { .. }) {
                w.out.links_up_at_end.insert((r, usize::from(p.peer.0)));
            }
        }
    }
    w.out.recoveries = w.recoveries.iter().map(|r| (r.action, r.done_us)).collect();
    Ok(w.out)
}
