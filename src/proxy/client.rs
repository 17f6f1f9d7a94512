//! Connections to one upstream instance: HTTP/1.1 over TCP, kept alive and reused.
//!
//! # Why not hyper-util's pooled `Client`
//!
//! That client is general: absolute URIs, one pool for every (scheme, authority) behind one
//! lock, DNS on the blocking thread pool, and request futures that are boxed and moved several
//! times. A profile of the plain proxy path (callgrind, `loadtest/proxy.toml`) put about 11,000
//! instructions per request in it, a sixth of everything the gateway did for a request. The
//! gateway has already chosen the instance when it sends, so each instance keeps its own idle
//! stack here:
//!
//! - a request takes the most recently used idle connection (warm in cache, and the least
//!   likely to have been closed by the upstream's idle timeout);
//! - the connection comes back when the response body has ended ([`Lease::release`]), so a
//!   streaming response keeps its connection to itself;
//! - a connection that closed while idle is found out before it takes the request (hyper hands
//!   an unsent request back), and the request goes out on a fresh connection instead.
//!
//! A failed connect never touched the request: it comes back inside [`SendError::Connect`], so
//! the proxy can try another instance with the same request, body included.
//!
//! The idle stacks are one per proxy worker thread ([`set_home`]): hyper drives each
//! connection as a task on the runtime that opened it, so a request sent on a connection of
//! another worker would cross threads twice (there and back). A worker with no idle connection
//! of its own opens one rather than borrow another's, as each nginx worker keeps its own
//! keep-alive cache.

use std::cell::Cell;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::body::LimitedBody;
use crate::config::Instance;

thread_local! {
    static HOME: Cell<usize> = const { Cell::new(0) };
}

/// Gives this thread its own idle connections: each proxy worker thread calls it once with
/// its index (1 and up; every other thread shares index 0).
pub fn set_home(index: usize) {
    HOME.set(index);
}

/// Idle connections older than this are closed: each may hold a slot on the upstream, and
/// servers drop idle connections themselves after a while (nginx after 75 s).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The kept-alive connections to one instance.
pub struct Connections {
    /// Host to connect to: a name or an address (IPv6 without brackets).
    host: String,
    port: u16,
    /// What the upstream sees as `Host`: its own authority, as nginx sends by default.
    host_header: HeaderValue,
    connect_timeout: Duration,
    /// Idle connections each worker keeps at most; more are closed when they come back.
    max_idle: usize,
    /// One stack per worker (its [`set_home`] index modulo their number), most recently used
    /// last: a connection is only ever taken on the worker whose runtime drives it.
    idle: Box<[Mutex<Vec<Idle>>]>,
}

struct Idle {
    sender: SendRequest<LimitedBody>,
    since: Instant,
}

/// Why a request did not get a response head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made; the request was not sent and is handed back.
    #[error("{reason}")]
    Connect {
        reason: String,
        request: Box<Request<LimitedBody>>,
    },
    /// The request went out (or its body failed) and no response came back.
    #[error("{0}")]
    Failed(hyper::Error),
}

impl Connections {
    pub fn new(instance: &Instance, connect_timeout: Duration, max_idle: usize) -> Self {
        let authority = &instance.authority;
        let host = authority.host();
        // `Authority::host` keeps an IPv6 literal's brackets; a socket address wants it bare.
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        // An authority is valid header text: it was parsed from the same characters. If it
        // somehow were not, the host alone (an address or DNS name) is.
        let host_header = HeaderValue::from_str(authority.as_str())
            .or_else(|_| HeaderValue::from_str(host))
            .unwrap_or(HeaderValue::from_static("localhost"));
        // The workers (one per core by default) and everything else (index 0). More workers
        // than that share stacks, which is correct, only slower.
        let stacks = std::thread::available_parallelism().map_or(1, |n| n.get()) + 1;
        Self {
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(super::DEFAULT_HTTP_PORT),
            host_header,
            connect_timeout,
            max_idle: max_idle.div_ceil(stacks).max(1),
            idle: (0..stacks).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    /// The `Host` header value requests to this instance carry.
    pub fn host_header(&self) -> &HeaderValue {
        &self.host_header
    }

    /// Sends `request` (origin-form URI, `Host` set) and waits for the response head. The
    /// connection stays leased until the response body has ended.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<LimitedBody>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        let home = HOME.get() % self.idle.len();
        while let Some(mut sender) = self.take_idle(home) {
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, self.lease(sender, home))),
                Err(mut error) => match error.take_message() {
                    // It closed between the check and the send: the request never left.
                    Some(unsent) => request = unsent,
                    None => return Err(SendError::Failed(error.into_error())),
                },
            }
        }
        let mut sender = match self.connect().await {
            Ok(sender) => sender,
            Err(reason) => {
                return Err(SendError::Connect {
                    reason,
                    request: Box::new(request),
                });
            }
        };
        match sender.try_send_request(request).await {
            Ok(response) => Ok((response, self.lease(sender, home))),
            Err(error) => Err(SendError::Failed(error.into_error())),
        }
    }

    /// Idle connections now open (for tests and status).
    pub fn idle_count(&self) -> usize {
        (0..self.idle.len()).map(|home| self.lock(home).len()).sum()
    }

    /// Closes idle connections that are past [`IDLE_TIMEOUT`] or already closed.
    pub fn reap(&self, now: Instant) {
        for home in 0..self.idle.len() {
            self.lock(home).retain(|idle| {
                !idle.sender.is_closed() && now.duration_since(idle.since) < IDLE_TIMEOUT
            });
        }
    }

    fn lease(self: &Arc<Self>, sender: SendRequest<LimitedBody>, home: usize) -> Lease {
        Lease {
            connections: self.clone(),
            sender: Some(sender),
            home,
        }
    }

    /// The most recently used idle connection that can take a request now. Closed and expired
    /// ones are dropped on the way; busy ones (a request body still going out after an early
    /// response) stay for later.
    fn take_idle(&self, home: usize) -> Option<SendRequest<LimitedBody>> {
        let now = Instant::now();
        let mut idle = self.lock(home);
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let entry = &idle[i];
            if entry.sender.is_closed() || now.duration_since(entry.since) >= IDLE_TIMEOUT {
                // The entries above `i` were looked at already, so moving the last one here
                // skips nothing.
                idle.swap_remove(i);
            } else if entry.sender.is_ready() {
                return Some(idle.swap_remove(i).sender);
            }
        }
        None
    }

    fn give_back(&self, sender: SendRequest<LimitedBody>, home: usize) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock(home);
        if idle.len() < self.max_idle {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<SendRequest<LimitedBody>, String> {
        let connecting = async {
            let stream = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|error| format!("tcp connect error: {error}"))?;
            // Request heads and small bodies are whole writes: sending them at once is what
            // keeps the added latency low; Nagle would hold them for the previous ACK.
            stream
                .set_nodelay(true)
                .map_err(|error| format!("setting TCP_NODELAY: {error}"))?;
            let (sender, connection) = http1::Builder::new()
                .handshake(TokioIo::new(stream))
                .await
                .map_err(|error| format!("http/1.1 handshake: {error}"))?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "upstream connection ended with an error");
                }
            });
            Ok(sender)
        };
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "tcp connect error: no connection within {:?}",
                self.connect_timeout
            )),
        }
    }

    /// The list is only pushed to and removed from whole, so a panic elsewhere while holding
    /// the lock cannot leave it inconsistent.
    /// `home` is below `self.idle.len()`: every caller takes it modulo that length.
    fn lock(&self, home: usize) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle[home]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connection taken for one exchange. [`Lease::release`] gives it back for the next request;
/// dropped without it (the response body was cut short), the connection is closed instead,
/// since whatever was left of the exchange would be read as the next response.
pub struct Lease {
    connections: Arc<Connections>,
    sender: Option<SendRequest<LimitedBody>>,
    /// The idle stack it came from: the worker whose runtime drives it.
    home: usize,
}

impl Lease {
    /// The exchange is complete: the connection may carry the next request.
    pub fn release(mut self) {
        if let Some(sender) = self.sender.take() {
            self.connections.give_back(sender, self.home);
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("connections", &self.connections)
            .finish()
    }
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("idle", &self.idle_count())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// An upstream that answers every request on a connection with a tiny body and counts
    /// the connections it accepted.
    async fn keep_alive_upstream() -> (Instance, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        let Ok(n) = socket.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if socket.write_all(reply).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (
            Instance::parse(&format!("http://{addr}")).unwrap(),
            accepted,
        )
    }

    fn get(connections: &Connections) -> Request<LimitedBody> {
        let mut request = Request::new(LimitedBody::empty());
        *request.uri_mut() = "/x".parse().unwrap();
        request
            .headers_mut()
            .insert(http::header::HOST, connections.host_header().clone());
        request
    }

    #[tokio::test]
    async fn a_released_connection_carries_the_next_request() {
        let (instance, accepted) = keep_alive_upstream().await;
        let connections = Arc::new(Connections::new(&instance, Duration::from_secs(1), 8));
        for _ in 0..5 {
            let (response, lease) = connections.send(get(&connections)).await.unwrap();
            assert_eq!(response.status(), 200);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
            lease.release();
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(connections.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_dropped_lease_closes_its_connection() {
        let (instance, accepted) = keep_alive_upstream().await;
        let connections = Arc::new(Connections::new(&instance, Duration::from_secs(1), 8));
        let (_response, lease) = connections.send(get(&connections)).await.unwrap();
        drop(lease);
        assert_eq!(connections.idle_count(), 0);
        let (_response, lease) = connections.send(get(&connections)).await.unwrap();
        lease.release();
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connect_hands_the_request_back() {
        // Bind and drop: nothing listens on the port any more.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let instance = Instance::parse(&format!("http://{addr}")).unwrap();
        let connections = Arc::new(Connections::new(&instance, Duration::from_secs(1), 8));
        let mut request = get(&connections);
        request
            .headers_mut()
            .insert("x-kept", HeaderValue::from_static("yes"));
        match connections.send(request).await {
            Err(SendError::Connect { reason, request }) => {
                assert!(reason.contains("tcp connect error"), "{reason}");
                assert_eq!(request.headers()["x-kept"], "yes");
            }
            other => panic!("expected a connect error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_replaced_without_losing_the_request() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Answers one request per connection, then closes it (as an upstream whose idle
        // timeout fires between two requests).
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = socket
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        let instance = Instance::parse(&format!("http://{addr}")).unwrap();
        let connections = Arc::new(Connections::new(&instance, Duration::from_secs(1), 8));
        for _ in 0..3 {
            let (response, lease) = connections.send(get(&connections)).await.unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
            lease.release();
            // Let the connection task see the upstream's close (polled, not slept).
            let deadline = Instant::now() + Duration::from_secs(5);
            while connections.lock(0).iter().any(|i| !i.sender.is_closed()) {
                assert!(Instant::now() < deadline, "the close was never noticed");
                tokio::task::yield_now().await;
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_expire() {
        let (instance, _) = keep_alive_upstream().await;
        let connections = Arc::new(Connections::new(&instance, Duration::from_secs(1), 8));
        let (response, lease) = connections.send(get(&connections)).await.unwrap();
        response.into_body().collect().await.unwrap();
        lease.release();
        assert_eq!(connections.idle_count(), 1);
        connections.reap(Instant::now() + IDLE_TIMEOUT);
        assert_eq!(connections.idle_count(), 0);
    }

    #[test]
    fn ipv6_hosts_lose_their_brackets_but_keep_them_in_host() {
        let instance = Instance::parse("http://[::1]:8080").unwrap();
        let connections = Connections::new(&instance, Duration::from_secs(1), 1);
        assert_eq!(connections.host, "::1");
        assert_eq!(connections.port, 8080);
        assert_eq!(connections.host_header(), "[::1]:8080");
    }
}
