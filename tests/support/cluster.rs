//! Gateway processes of the built binary gossiping over real QUIC with mutual TLS on loopback:
//! one certificate and one config file per slot, each process on its own free ports, so kills
//! are real kills and `/proc/<pid>` measures one gateway.
//!
//! A slot is either run as a process ([`Role::Process`]) or only configured ([`Role::Test`]:
//! the test plays it over gossip, or nobody does). What the gateways enforce (identities,
//! policies) is the test's [`Setup`]; the rest (an upstream answering "ok" on every path, the
//! gossip section and the peer list) is the same for every cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{PromSample, client, free_port, parse_prometheus, serve};

/// Generous bound for anything that should happen promptly, even on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(40);
/// How often [`Cluster::until`] looks again.
const POLL: Duration = Duration::from_millis(25);
/// Log lines of each gateway shown when a wait times out.
const LOG_TAIL: usize = 30;

/// Who runs a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A gateway process of the built binary.
    Process,
    /// Only configured: the test plays it (or nobody does).
    Test,
}

/// What every gateway of a cluster enforces.
#[derive(Debug, Clone, Copy)]
pub struct Setup<'a> {
    /// The gateways' `drain_timeout`.
    pub drain_timeout: &'a str,
    /// TOML tables after the one service (`[services.echo]`, routes `/`): identities and
    /// policies.
    pub tables: &'a str,
}

pub struct Node {
    pub region: String,
    pub instance: String,
    pub role: Role,
    pub listen: u16,
    pub admin: u16,
    pub gossip: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    pub fn slot(&self) -> tollgate::crdt::Slot {
        tollgate::crdt::Slot::new(self.region.clone(), self.instance.clone())
    }
}

/// Gateways sharing one deployment (certificates, peer list, policies), killed on drop.
pub struct Cluster {
    dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub http: reqwest::Client,
}

/// The TOML of one global `[policies.NAME]` table: `rate` is `"N/W"`, `key` its key
/// sources, `mode` "strict" or "eventual".
pub fn global_policy(name: &str, route: &str, key: &[&str], rate: &str, mode: &str) -> String {
    let key: Vec<String> = key.iter().map(|k| format!("\"{k}\"")).collect();
    format!(
        "\n[policies.{name}]\nroutes = [\"{route}\"]\nkey = [{}]\nrate = \"{rate}\"\n\
         scope = \"global\"\nmode = \"{mode}\"\n",
        key.join(", ")
    )
}

/// Lower-case hex SHA-256 of `text` (API keys are configured by their digest).
pub fn hex_sha256(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn config_text(node: &Node, slots: &[Node], upstream: SocketAddr, setup: &Setup) -> String {
    let mut text = format!(
        r#"region = "{region}"
listen = "127.0.0.1:{listen}"
admin_listen = "127.0.0.1:{admin}"
drain_timeout = "{drain_timeout}"

[services.echo]
routes = ["/"]
instances = ["http://{upstream}"]

{tables}

[gossip]
listen = "127.0.0.1:{gossip}"
instance = "{instance}"
ca = "certs/ca.pem"
cert = "certs/{region}.{{instance}}.pem"
key = "certs/{region}.{{instance}}.key"
interval = "50ms"
backoff_cap = "500ms"
"#,
        region = node.region,
        instance = node.instance,
        listen = node.listen,
        admin = node.admin,
        gossip = node.gossip,
        drain_timeout = setup.drain_timeout,
        tables = setup.tables,
    );
    for peer in slots {
        text.push_str(&format!(
            "\n[[gossip.peers]]\nregion = \"{}\"\ninstance = \"{}\"\naddr = \"127.0.0.1:{}\"\n",
            peer.region, peer.instance, peer.gossip
        ));
    }
    text
}

impl Cluster {
    /// Issues certificates and configs for every slot and starts the [`Role::Process`] ones
    /// (without waiting for them: see [`Cluster::wait_connected`]).
    pub async fn start(slots: &[(&str, &str, Role)], setup: &Setup<'_>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let gateways: Vec<tollgate::certs::Gateway> = slots
            .iter()
            .map(|(r, i, _)| tollgate::certs::Gateway::new(r, i).unwrap())
            .collect();
        tollgate::certs::generate(&dir.path().join("certs"), &gateways, false).unwrap();
        let upstream = serve(axum::Router::new().fallback(|| async { "ok" })).await;
        let nodes: Vec<Node> = slots
            .iter()
            .enumerate()
            .map(|(i, (region, instance, role))| Node {
                region: region.to_string(),
                instance: instance.to_string(),
                role: *role,
                listen: free_port(),
                admin: free_port(),
                gossip: free_port(),
                config: dir.path().join(format!("gateway-{i}.toml")),
                log: dir.path().join(format!("gateway-{i}.log")),
                child: None,
            })
            .collect();
        for node in &nodes {
            std::fs::write(&node.config, config_text(node, &nodes, upstream, setup)).unwrap();
        }
        let mut cluster = Self {
            dir,
            nodes,
            http: client(),
        };
        for i in 0..cluster.nodes.len() {
            if cluster.nodes[i].role == Role::Process {
                cluster.spawn(i);
            }
        }
        cluster
    }

    /// Starts gateway `i`'s process: a new incarnation if it ran before.
    pub fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::File::create(&node.log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["gateway", "--config"])
            .arg(&node.config)
            .env("RUST_LOG", "info")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("TOLLGATE_INSTANCE")
            .env_remove("TOLLGATE_GOSSIP_PEERS")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        node.child = Some(child);
    }

    /// Kills gateway `i` (SIGKILL) and starts it again: a new incarnation.
    pub fn restart(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.spawn(i);
    }

    /// Signals gateway `i` and reaps it.
    pub fn signal(&mut self, i: usize, signal: Signal) -> ExitStatus {
        let mut child = self.nodes[i].child.take().expect("gateway is running");
        let pid = i32::try_from(child.id()).unwrap();
        kill(Pid::from_raw(pid), signal).unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < DEADLINE, "gateway {i} did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether gateway `i`'s process has exited (and how), `None` while it runs or when the
    /// test plays the slot.
    pub fn exited(&mut self, i: usize) -> Option<ExitStatus> {
        self.nodes[i].child.as_mut()?.try_wait().unwrap()
    }

    pub fn url(&self, i: usize, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.nodes[i].listen)
    }

    pub fn admin(&self, i: usize, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.nodes[i].admin)
    }

    pub fn gossip_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.nodes[i].gossip))
    }

    /// The deployment's certificates (`ca.pem` and one pair per slot).
    pub fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// Slot `i`'s configuration, as its gateway loads it.
    pub fn config(&self, i: usize) -> tollgate::config::RegionConfig {
        tollgate::config::RegionConfig::load_with_env(&self.nodes[i].config, |_| None).unwrap()
    }

    pub async fn json(&self, url: &str) -> Option<Value> {
        let response = self.http.get(url).send().await.ok()?;
        response.json().await.ok()
    }

    /// `/limits/{policy}?key={key}` of gateway `i`.
    pub async fn limits(&self, i: usize, policy: &str, key: &str) -> Option<Value> {
        self.json(&self.admin(i, &format!("/limits/{policy}?key={key}")))
            .await
    }

    pub async fn ready(&self, i: usize) -> Option<Value> {
        self.json(&self.admin(i, "/ready")).await
    }

    /// Gateway `i`'s `/metrics`, parsed (empty if it does not answer).
    pub async fn metrics(&self, i: usize) -> Vec<PromSample> {
        let Ok(response) = self.http.get(self.admin(i, "/metrics")).send().await else {
            return Vec::new();
        };
        parse_prometheus(&response.text().await.unwrap_or_default())
    }

    /// Polls until `check` holds, failing with `what` and the logs at [`DEADLINE`].
    pub async fn until<F, Fut>(&self, what: &str, check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        self.until_within(DEADLINE, &|| what.to_owned(), check)
            .await;
    }

    /// [`Cluster::until`] with another deadline, and what it waited for said at the
    /// deadline (so it can tell how far things got).
    pub async fn until_within<F, Fut>(
        &self,
        deadline: Duration,
        what: &dyn Fn() -> String,
        mut check: F,
    ) where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let start = Instant::now();
        while !check().await {
            if start.elapsed() > deadline {
                panic!("timed out waiting for {}\n{}", what(), self.logs());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until gateway `i` answers `/ready` with `peers` peers connected.
    pub async fn wait_connected(&self, i: usize, peers: usize) {
        self.until(&format!("gateway {i} to see {peers} peers"), || async {
            self.ready(i)
                .await
                .is_some_and(|r| r["gossip"]["peers_connected"] == peers)
        })
        .await;
    }

    /// Whether gateway `i` holds its strict share of `policy` (one key of it tells: a
    /// gateway reclaims all its keys at once).
    pub async fn reclaimed(&self, i: usize, policy: &str, key: &str) -> bool {
        self.limits(i, policy, key)
            .await
            .is_some_and(|l| l["tiers"][0]["strict"]["share_reclaimed"] == true)
    }

    /// Rewrites gateway `i`'s region file with `edit` and sends it SIGHUP: a reload of the
    /// running process.
    pub fn reload_with(&self, i: usize, edit: impl FnOnce(String) -> String) {
        let path = &self.nodes[i].config;
        let text = edit(std::fs::read_to_string(path).unwrap());
        std::fs::write(path, text).unwrap();
        let pid = i32::try_from(self.pid(i)).unwrap();
        kill(Pid::from_raw(pid), Signal::SIGHUP).unwrap();
    }

    /// The process id of gateway `i`.
    pub fn pid(&self, i: usize) -> u32 {
        self.nodes[i]
            .child
            .as_ref()
            .expect("gateway is running")
            .id()
    }

    /// Gateway `i`'s resident set size in KiB (`VmRSS` of `/proc/<pid>/status`).
    pub fn rss_kib(&self, i: usize) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid(i))).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// Gateway `i`'s whole log so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// The last lines of every gateway process's log.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .filter(|n| n.role == Role::Process)
            .map(|n| {
                let text = std::fs::read_to_string(&n.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(LOG_TAIL).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {}/{} ---\n{}", n.region, n.instance, tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
