//! The `[gossip]` section: how this gateway takes part in global limits.
//!
//! ```toml
//! [gossip]
//! listen = "0.0.0.0:7400"        # UDP (QUIC); env TOLLGATE_GOSSIP_LISTEN
//! instance = "a"                 # this gateway within its region; env TOLLGATE_INSTANCE
//! ca = "certs/ca.pem"            # paths relative to this file; env TOLLGATE_GOSSIP_CERTS
//! cert = "certs/us-east.{instance}.pem"  # replaces the directory of all three; one
//! key = "certs/us-east.{instance}.key"   # certificate per gateway, {instance} is ours
//! interval = "50ms"
//!
//! # Every gateway of the deployment, this one included, in the SAME order in every
//! # region's file: the order is the slot list the strict shares are split by.
//! [[gossip.peers]]
//! region = "us-east"
//! instance = "a"
//! addr = "gw-us-east-a:7400"     # host:port, resolved at every dial
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::fields::{ByteSize, Errors, Section, parse_socket_addr};
use crate::crdt::Slot;

/// Overrides the gossip listen address.
pub const ENV_GOSSIP_LISTEN: &str = "TOLLGATE_GOSSIP_LISTEN";
/// Overrides this gateway's instance name (one config file for every instance of a region).
pub const ENV_INSTANCE: &str = "TOLLGATE_INSTANCE";
/// Overrides the directory of `ca`, `cert` and `key` (file names kept).
pub const ENV_GOSSIP_CERTS: &str = "TOLLGATE_GOSSIP_CERTS";
/// Replaces the peer list: `region/instance=host:port,...` in slot order (containers name
/// their peers by host names the shipped files cannot know).
pub const ENV_GOSSIP_PEERS: &str = "TOLLGATE_GOSSIP_PEERS";

/// The instance of a gateway or peer that names none: the one `tollgate certs --regions`
/// issues a certificate for.
pub const DEFAULT_INSTANCE: &str = "a";

/// Replaced by this gateway's instance in the `ca`, `cert` and `key` paths.
pub const INSTANCE_PLACEHOLDER: &str = "{instance}";

/// Most gateways in one deployment (slots are `u16` on the wire; this keeps per-key strict
/// state, a column per slot, small).
pub const MAX_PEERS: usize = 64;

/// The parsed `[gossip]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GossipSettings {
    /// UDP address of the QUIC endpoint.
    pub listen: SocketAddr,
    /// This gateway's instance name within its region.
    pub instance: String,
    /// The deployment CA (PEM).
    pub ca: PathBuf,
    /// This gateway's certificate (PEM), naming `<instance>.<region>.tollgate.internal`.
    pub cert: PathBuf,
    /// This gateway's private key (PEM).
    pub key: PathBuf,
    /// How often deltas go out.
    pub interval: Duration,
    /// A peer silent this long is dropped (QUIC keeps quiet links alive well within it).
    pub idle_timeout: Duration,
    /// Longest reconnect delay.
    pub backoff_cap: Duration,
    /// Largest gossip frame accepted or sent.
    pub max_frame: usize,
    /// Every gateway of the deployment in the shared order (the slot list), this one
    /// included.
    pub peers: Vec<PeerSettings>,
}

/// One `[[gossip.peers]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSettings {
    pub region: String,
    pub instance: String,
    /// `host:port`.
    pub addr: String,
}

impl GossipSettings {
    /// The slot list, in the configured order.
    pub fn slots(&self) -> Vec<Slot> {
        self.peers
            .iter()
            .map(|p| Slot::new(p.region.clone(), p.instance.clone()))
            .collect()
    }
}

pub(super) fn read_gossip(
    mut section: Section<'_>,
    region: Option<&str>,
    env: &impl Fn(&str) -> Option<String>,
    base_dir: &Path,
    errors: &mut Errors,
) -> Option<GossipSettings> {
    let file_listen: Option<SocketAddr> = section.required("listen", errors);
    let listen = match env(ENV_GOSSIP_LISTEN) {
        Some(text) => match parse_socket_addr(&text) {
            Ok(addr) => Some(addr),
            Err(message) => {
                errors.push(format!("(environment) {ENV_GOSSIP_LISTEN}"), message);
                None
            }
        },
        None => file_listen,
    };
    let file_instance: String = section.or("instance", DEFAULT_INSTANCE.to_owned(), errors);
    let instance = env(ENV_INSTANCE).unwrap_or(file_instance);
    if !is_name(&instance) {
        errors.push(
            section.key("instance"),
            format!("{instance:?}: {NAME_RULE}"),
        );
    }
    let certs_dir = env(ENV_GOSSIP_CERTS).map(PathBuf::from);
    let path = |key: &str, section: &mut Section<'_>, errors: &mut Errors| {
        let text: String = section.required(key, errors)?;
        // One file serves every instance of a region, and each instance has its own
        // certificate: `{instance}` stands for this gateway's instance.
        let file = base_dir.join(text.replace(INSTANCE_PLACEHOLDER, &instance));
        Some(match &certs_dir {
            Some(dir) => dir.join(file.file_name().unwrap_or(file.as_os_str())),
            None => file,
        })
    };
    let ca = path("ca", &mut section, errors);
    let cert = path("cert", &mut section, errors);
    let key = path("key", &mut section, errors);
    let interval = section.or("interval", Duration::from_millis(50), errors);
    let idle_timeout = section.or("idle_timeout", Duration::from_secs(5), errors);
    let backoff_cap = section.or("backoff_cap", Duration::from_secs(5), errors);
    let max_frame =
        usize::try_from(section.or("max_frame", ByteSize(1 << 20), errors).0).unwrap_or(usize::MAX);
    if interval < Duration::from_millis(1) || interval > Duration::from_secs(10) {
        errors.push(section.key("interval"), "must be between 1ms and 10s");
    }
    if idle_timeout < Duration::from_secs(2) {
        errors.push(
            section.key("idle_timeout"),
            "must be at least 2s (keep-alives go out every second)",
        );
    }
    if backoff_cap < Duration::from_millis(100) {
        errors.push(section.key("backoff_cap"), "must be at least 100ms");
    }
    if !(64 << 10..=64 << 20).contains(&max_frame) {
        errors.push(section.key("max_frame"), "must be between 64KiB and 64MiB");
    }

    let mut peers = Vec::new();
    let peer_sections = section.array_of_tables("peers", errors);
    let from_env = env(ENV_GOSSIP_PEERS).map(|text| parse_peers_env(&text));
    let peer_sections = match from_env {
        Some(Ok(list)) => {
            peers = list;
            Vec::new()
        }
        Some(Err(message)) => {
            errors.push(format!("(environment) {ENV_GOSSIP_PEERS}"), message);
            Vec::new()
        }
        None => peer_sections,
    };
    let from_env = !peers.is_empty();
    if peer_sections.is_empty() && !from_env {
        errors.push(
            section.key("peers"),
            "list every gateway of the deployment, this one included, as [[gossip.peers]]",
        );
    }
    if peer_sections.len() > MAX_PEERS {
        errors.push(
            section.key("peers"),
            format!("at most {MAX_PEERS} gateways per deployment"),
        );
    }
    for (i, mut peer) in peer_sections.into_iter().enumerate() {
        let at = format!("{}[{i}]", section.key("peers"));
        let region: Option<String> = peer.required("region", errors);
        let instance: String = peer.or("instance", DEFAULT_INSTANCE.to_owned(), errors);
        let addr: Option<String> = peer.required("addr", errors);
        peer.finish(errors);
        if let Some(region) = &region
            && crate::certs::validate_region(region).is_err()
        {
            errors.push(
                format!("{at}.region"),
                format!("{region:?} is not a region name"),
            );
        }
        if !is_name(&instance) {
            errors.push(
                format!("{at}.instance"),
                format!("{instance:?}: {NAME_RULE}"),
            );
        }
        if let Some(addr) = &addr
            && !is_host_port(addr)
        {
            errors.push(
                format!("{at}.addr"),
                format!("{addr:?}: expected host:port such as gw-eu-west:7400"),
            );
        }
        if let (Some(region), Some(addr)) = (region, addr) {
            if peers
                .iter()
                .any(|p: &PeerSettings| p.region == region && p.instance == instance)
            {
                errors.push(
                    format!("{at}.instance"),
                    format!("{region}/{instance} is listed twice"),
                );
            }
            peers.push(PeerSettings {
                region,
                instance,
                addr,
            });
        }
    }
    if let Some(region) = region
        && !peers.is_empty()
        && !peers
            .iter()
            .any(|p| p.region == region && p.instance == instance)
    {
        errors.push(
            section.key("peers"),
            format!(
                "this gateway ({region}/{instance}) is not in the list: every region's list \
                 names every gateway, itself included"
            ),
        );
    }
    section.finish(errors);
    Some(GossipSettings {
        listen: listen?,
        instance,
        ca: ca?,
        cert: cert?,
        key: key?,
        interval,
        idle_timeout,
        backoff_cap,
        max_frame,
        peers,
    })
}

/// `region/instance=host:port,...`.
fn parse_peers_env(text: &str) -> Result<Vec<PeerSettings>, String> {
    let mut peers: Vec<PeerSettings> = Vec::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let bad = || format!("{item:?}: expected region/instance=host:port");
        let (slot, addr) = item.split_once('=').ok_or_else(bad)?;
        let (region, instance) = slot.split_once('/').ok_or_else(bad)?;
        if crate::certs::validate_region(region).is_err()
            || !is_name(instance)
            || !is_host_port(addr)
        {
            return Err(bad());
        }
        if peers
            .iter()
            .any(|p| p.region == region && p.instance == instance)
        {
            return Err(format!("{region}/{instance} is listed twice"));
        }
        peers.push(PeerSettings {
            region: region.to_owned(),
            instance: instance.to_owned(),
            addr: addr.to_owned(),
        });
    }
    if peers.is_empty() {
        return Err("no peers listed".to_owned());
    }
    if peers.len() > MAX_PEERS {
        return Err(format!("at most {MAX_PEERS} gateways per deployment"));
    }
    Ok(peers)
}

/// What [`is_name`] takes, for error messages.
const NAME_RULE: &str = "use 1-63 lowercase letters, digits and inner hyphens, not only digits";

/// Instance names are part of the gateway's certificate name, so `tollgate certs` takes the
/// same ones.
fn is_name(text: &str) -> bool {
    crate::certs::is_dns_label(text)
}

fn is_host_port(text: &str) -> bool {
    match text.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}
