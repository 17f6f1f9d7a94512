//! Helpers shared by the integration tests: a throwaway `redis-server` per test and an
//! in-process HTTP server on a free port.
//!
//! Each test binary that declares `mod support;` compiles its own copy and may use only part
//! of it, hence the `dead_code` allowances.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// A port that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("cannot bind 127.0.0.1:0 to find a free port")
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
