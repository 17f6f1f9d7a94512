//! Helpers shared by the integration tests: a throwaway `redis-server` per test and an
//! in-process HTTP server on a free port.
//!
//! Each test binary that declares `mod support;` compiles its own copy and may use only part
//! of it, hence the `dead_code` allowances.

#![allow(dead_code)]

pub mod cluster;
pub mod gateway;
pub mod peer;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Polls `check` until it holds, and fails the test naming `what` once `deadline` has passed:
/// the integration tests wait for conditions, never for a fixed time.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + deadline;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < until,
            "never happened within {deadline:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How long a fresh redis-server gets to answer PING.
const REDIS_START_DEADLINE: Duration = Duration::from_secs(10);

/// Port races (another process grabbing the port between our probe and redis-server's bind)
/// are retried with a new port this many times.
const REDIS_START_ATTEMPTS: usize = 5;

/// A `redis-server` child process on 127.0.0.1 with persistence off, killed on drop.
///
/// The binary is `redis-server` from `PATH`, or `$REDIS_SERVER` if set. If it is missing the
/// test fails (CI installs it), so Redis coverage can never silently disappear.
pub struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    /// Starts a server and waits until it answers PING.
    ///
    /// Panics with an explanation if `redis-server` cannot be run or does not come up.
    pub fn start() -> Self {
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
        let mut last_failure = String::new();
        for _ in 0..REDIS_START_ATTEMPTS {
            let port = free_port();
            let child = Command::new(&binary)
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--save", ""])
                .args(["--appendonly", "no"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let child = match child {
                Ok(child) => child,
                Err(error) => panic!(
                    "cannot run {binary:?} ({error}): the Redis-backed tests need redis-server \
                     (apt-get install redis-server, or set REDIS_SERVER to its path)"
                ),
            };
            let mut server = Self { child, port };
            match server.wait_ready() {
                Ok(()) => return server,
                Err(failure) => last_failure = failure,
            }
            // Dropping `server` kills whatever is left of it before the next attempt.
        }
        panic!("redis-server did not start after {REDIS_START_ATTEMPTS} attempts: {last_failure}");
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Polls PING until PONG, the process exiting, or the deadline.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + REDIS_START_DEADLINE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "redis-server on port {} exited with {status} (port taken?)",
                    self.port
                ));
            }
            if ping(self.port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "redis-server on port {} did not answer PING within {REDIS_START_DEADLINE:?}",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Already exited is fine; either way reap it so no zombie is left.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a Redis on `port` answers `PING` with `+PONG`.
fn ping(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    if stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .is_err()
        || stream.write_all(b"PING\r\n").is_err()
    {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// Where [`free_port`] looks: below the kernel's ephemeral range (Linux 32768-60999, BSD and
/// Windows 49152-65535), which outgoing connections draw from. The 10000 ports above it, up to
/// 30000, are left to Redis Cluster bus ports (node port + 10000).
const LISTENER_PORTS: std::ops::Range<u16> = 10_000..20_000;

/// A port on 127.0.0.1 free for both TCP and UDP a moment ago, for a child process to listen on.
///
/// Not one from binding port 0: that is an ephemeral port, and between its release and the
/// child's bind any outgoing connection of a concurrent test may take it (CI saw a gateway
/// fail with "Address already in use"). Below the ephemeral range only listeners bind, and each
/// test binary walks it from a random start so no two hand out the same port.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};

    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let span = u32::from(LISTENER_PORTS.end - LISTENER_PORTS.start);
    let next = NEXT.get_or_init(|| {
        // RandomState is seeded randomly per process: a random start without a dependency.
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        AtomicU32::new((random % u64::from(span)) as u32)
    });
    for _ in 0..span {
        // Below `span` after the modulo, so it fits the u16 range it is added to.
        let offset = (next.fetch_add(1, Ordering::Relaxed) % span) as u16;
        let port = LISTENER_PORTS.start + offset;
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, port));
        let udp = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in {LISTENER_PORTS:?}")
}

/// An address where nothing listens, for "upstream is down" tests.
pub fn closed_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))
}

/// Serves `router` on a fresh 127.0.0.1 port in the background for the rest of the test.
pub async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("cannot bind 127.0.0.1:0");
    let addr = listener
        .local_addr()
        .expect("bound listener has an address");
    tokio::spawn(async move {
        axum::serve(listener, router)
            .await
            .expect("test server failed");
    });
    addr
}

/// An HTTP client for tests that never goes through a proxy from the environment, and gives
/// up on a hung request instead of hanging the test run.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("cannot build the test HTTP client")
}

/// How long a Redis Cluster gets to agree on its slots after `redis-cli --cluster create`.
const CLUSTER_READY_DEADLINE: Duration = Duration::from_secs(30);

/// `redis-server` from `$REDIS_SERVER` or `PATH`.
fn redis_server_binary() -> String {
    std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned())
}

/// `redis-cli` from `$REDIS_CLI` or `PATH`.
fn redis_cli_binary() -> String {
    std::env::var("REDIS_CLI").unwrap_or_else(|_| "redis-cli".to_owned())
}

/// Spawns `redis-server` on 127.0.0.1:`port` with persistence off and `extra` arguments.
/// Panics (failing the test) if the binary cannot be run.
fn spawn_redis_server(port: u16, extra: &[&str]) -> Child {
    let binary = redis_server_binary();
    Command::new(&binary)
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|error| {
            panic!(
                "cannot run {binary:?} ({error}): the Redis-backed tests need redis-server \
                 (apt-get install redis-server, or set REDIS_SERVER to its path)"
            )
        })
}

impl RedisServer {
    /// Starts a server on a given `port` (e.g. to restart one on the port a store already
    /// points at) and waits until it answers PING. Retries briefly while the port is still
    /// being released by a previous server; panics if it never comes up.
    pub fn start_on(port: u16) -> Self {
        let deadline = Instant::now() + REDIS_START_DEADLINE;
        loop {
            let mut server = Self {
                child: spawn_redis_server(port, &[]),
                port,
            };
            match server.wait_ready() {
                Ok(()) => return server,
                Err(failure) if Instant::now() > deadline => {
                    panic!("redis-server did not start on port {port}: {failure}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The server's process id (to freeze it with SIGSTOP, for example).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A three-primary Redis Cluster on 127.0.0.1 (no replicas), its nodes killed and its
/// directory removed on drop.
///
/// Needs `redis-server` and `redis-cli` (or `$REDIS_SERVER`, `$REDIS_CLI`); missing either
/// fails the test.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    dir: std::path::PathBuf,
}

impl RedisCluster {
    /// Starts three cluster-enabled servers, joins them with `redis-cli --cluster create` and
    /// waits until every node reports `cluster_state:ok`.
    pub fn start() -> Self {
        let mut last_failure = String::new();
        for _ in 0..REDIS_START_ATTEMPTS {
            match Self::try_start() {
                Ok(cluster) => return cluster,
                Err(failure) => last_failure = failure,
            }
        }
        panic!("Redis Cluster did not start after {REDIS_START_ATTEMPTS} attempts: {last_failure}");
    }

    fn try_start() -> Result<Self, String> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tollgate-redis-cluster-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {dir:?}: {e}"))?;
        // From here on, dropping `cluster` kills what was started and removes the directory.
        let mut cluster = Self {
            nodes: Vec::new(),
            dir,
        };
        let dir_arg = cluster.dir.to_string_lossy().into_owned();
        for port in cluster_ports(3) {
            let config_file = format!("{dir_arg}/nodes-{port}.conf");
            let child = spawn_redis_server(
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &config_file,
                    "--dir",
                    &dir_arg,
                ],
            );
            let mut node = RedisServer { child, port };
            let ready = node.wait_ready();
            cluster.nodes.push(node);
            ready?;
        }

        let addresses: Vec<String> = cluster
            .ports()
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let cli = redis_cli_binary();
        let output = Command::new(&cli)
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot run {cli:?} ({error}): the Redis Cluster tests need redis-cli \
                     (apt-get install redis-tools, or set REDIS_CLI to its path)"
                )
            });
        if !output.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed with {}: {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }

        let deadline = Instant::now() + CLUSTER_READY_DEADLINE;
        for port in cluster.ports() {
            loop {
                let info = redis_cli(port, &["CLUSTER", "INFO"]).unwrap_or_default();
                if info.lines().any(|line| line.trim() == "cluster_state:ok") {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "node {port} not cluster_state:ok within {CLUSTER_READY_DEADLINE:?}: {info}"
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(cluster)
    }

    /// The nodes' ports.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisServer::port).collect()
    }

    /// `redis://127.0.0.1:PORT` for every node.
    pub fn urls(&self) -> Vec<String> {
        self.ports()
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect()
    }

    /// Node `i` (0..3).
    pub fn node(&self, i: usize) -> &RedisServer {
        &self.nodes[i]
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        // Kill the servers before removing the directory they write their node files to.
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `redis-cli -p PORT ARGS...` and returns its standard output.
pub fn redis_cli(port: u16, args: &[&str]) -> Result<String, String> {
    let output = Command::new(redis_cli_binary())
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("cannot run redis-cli: {error}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// `count` distinct ports that were free a moment ago, each with its cluster bus port
/// (port + 10000) free too: both stay below the ephemeral range, as [`free_port`] explains.
fn cluster_ports(count: usize) -> Vec<u16> {
    let mut ports: Vec<u16> = Vec::new();
    let mut tries = 0;
    while ports.len() < count {
        tries += 1;
        assert!(tries < 10_000, "no free port pairs for a Redis Cluster");
        let port = free_port();
        if ports.contains(&port) {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port + 10000)).is_ok() {
            ports.push(port);
        }
    }
    ports
}

/// One sample of a Prometheus text exposition: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct PromSample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

/// `GET {admin}/metrics`, parsed (`admin`: the admin listener's base URL, `http://host:port`).
pub async fn scrape_metrics(admin: &str) -> Vec<PromSample> {
    let text = client()
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    parse_prometheus(&text)
}

/// Parses the Prometheus text format (comments skipped, label values unescaped), enough for
/// what `metrics-exporter-prometheus` renders. Panics on a line it cannot read, so a format
/// change fails the test loudly.
pub fn parse_prometheus(text: &str) -> Vec<PromSample> {
    let mut samples = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let mut labels = std::collections::BTreeMap::new();
        let name = match series.split_once('{') {
            None => series.to_owned(),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                let mut chars = body.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                    assert_eq!(chars.next(), Some('"'), "unquoted label in {line:?}");
                    let mut value = String::new();
                    while let Some(c) = chars.next() {
                        match c {
                            '\\' => match chars.next() {
                                Some('n') => value.push('\n'),
                                Some(other) => value.push(other),
                                None => panic!("dangling escape in {line:?}"),
                            },
                            '"' => break,
                            other => value.push(other),
                        }
                    }
                    labels.insert(key.trim().to_owned(), value);
                    if chars.peek() == Some(&',') {
                        chars.next();
                    }
                }
                name.to_owned()
            }
        };
        samples.push(PromSample {
            name,
            labels,
            value,
        });
    }
    samples
}

/// The value of the sample named `name` whose labels include all of `labels`, summed over
/// any other labels; 0 when there is none (a counter not yet incremented).
pub fn prom_value(samples: &[PromSample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|sample| sample.name == name)
        .filter(|sample| {
            labels
                .iter()
                .all(|(key, value)| sample.labels.get(*key).map(String::as_str) == Some(*value))
        })
        .map(|sample| sample.value)
        .sum()
}
