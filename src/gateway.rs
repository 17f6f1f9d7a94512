//! A regional gateway process: the proxy listener, the admin listener, and their lifecycle.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use crate::config::RegionConfig;
use crate::http::{admin::admin_app, stack::proxy_app};
use crate::proxy::Proxy;

/// How long a readiness probe waits for Redis.
const REDIS_PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// Why the gateway could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid Redis URL: {0}")]
    RedisUrl(redis::RedisError),
    #[error("server error: {0}")]
    Serve(std::io::Error),
}

/// Everything a gateway's handlers share.
pub struct Gateway {
    pub config: RegionConfig,
    pub proxy: Proxy,
    redis: Option<RedisProbe>,
}

impl Gateway {
    pub fn new(config: RegionConfig) -> Result<Self, GatewayError> {
        let redis = config
            .redis_url
            .as_deref()
            .map(RedisProbe::new)
            .transpose()?;
        Ok(Self {
            proxy: Proxy::new(&config),
            redis,
            config,
        })
    }

    pub async fn redis_status(&self) -> RedisStatus {
        match &self.redis {
            None => RedisStatus::NotConfigured,
            Some(probe) => probe.ping().await,
        }
    }
}

/// Redis as the readiness endpoint reports it.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum RedisStatus {
    NotConfigured,
    Up,
    Down { error: String },
}

impl RedisStatus {
    pub fn is_ready(&self) -> bool {
        !matches!(self, Self::Down { .. })
    }
}

/// Checks that the region's Redis answers, reusing one multiplexed connection.
struct RedisProbe {
    client: redis::Client,
    connection: Mutex<Option<redis::aio::MultiplexedConnection>>,
}

impl RedisProbe {
    fn new(url: &str) -> Result<Self, GatewayError> {
        Ok(Self {
            client: redis::Client::open(url).map_err(GatewayError::RedisUrl)?,
            connection: Mutex::new(None),
        })
    }

    async fn ping(&self) -> RedisStatus {
        let attempt = async {
            let mut slot = self.connection.lock().await;
            let mut connection = match slot.take() {
                Some(connection) => connection,
                None => self.client.get_multiplexed_async_connection().await?,
            };
            let pong: String = redis::cmd("PING").query_async(&mut connection).await?;
            *slot = Some(connection);
            Ok::<_, redis::RedisError>(pong)
        };
        match tokio::time::timeout(REDIS_PROBE_TIMEOUT, attempt).await {
            Ok(Ok(_)) => RedisStatus::Up,
            Ok(Err(error)) => RedisStatus::Down {
                error: error.to_string(),
            },
            Err(_) => RedisStatus::Down {
                error: format!("no answer within {REDIS_PROBE_TIMEOUT:?}"),
            },
        }
    }
}

/// Binds the configured addresses and serves until `shutdown` resolves.
pub async fn run(
    config: RegionConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| GatewayError::Bind { addr, source })
    };
    let listener = bind(config.listen).await?;
    let admin_listener = bind(config.admin_listen).await?;
    let gateway = Arc::new(Gateway::new(config)?);
    serve(gateway, listener, admin_listener, shutdown).await
}

/// Serves the proxy and admin apps on the given listeners until `shutdown` resolves, then
/// stops accepting, lets in-flight requests finish (up to `drain_timeout`), and returns.
pub async fn serve(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let region = gateway.config.region.clone();
    let drain_timeout = gateway.config.drain_timeout;
    let proxy_addr = listener.local_addr().map_err(GatewayError::Serve)?;
    let admin_addr = admin_listener.local_addr().map_err(GatewayError::Serve)?;
    let _health_checks = gateway.proxy.spawn_health_checks();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            // Resolves on the signal, or if the sender is gone (which also means stop).
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let proxy_server = axum::serve(
        listener,
        proxy_app(gateway.clone()).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(stopped());
    let admin_server =
        axum::serve(admin_listener, admin_app(gateway.clone())).with_graceful_shutdown(stopped());
    let mut proxy_task = tokio::spawn(async move { proxy_server.await });
    let mut admin_task = tokio::spawn(async move { admin_server.await });
    tracing::info!(%region, %proxy_addr, %admin_addr, "gateway listening");

    tokio::select! {
        () = shutdown => {}
        result = &mut proxy_task => return flatten(result),
        result = &mut admin_task => return flatten(result),
    }
    tracing::info!(%region, "draining in-flight requests (up to {drain_timeout:?})");
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(drain_timeout, async {
        let proxy = flatten(proxy_task.await);
        let admin = flatten(admin_task.await);
        proxy.and(admin)
    })
    .await;
    match drained {
        Ok(result) => {
            tracing::info!(%region, "gateway stopped");
            result
        }
        Err(_) => {
            tracing::warn!(%region, "drain timeout reached, closing remaining connections");
            Ok(())
        }
    }
}

fn flatten(
    result: Result<std::io::Result<()>, tokio::task::JoinError>,
) -> Result<(), GatewayError> {
    match result {
        Ok(inner) => inner.map_err(GatewayError::Serve),
        Err(join) => Err(GatewayError::Serve(std::io::Error::other(join))),
    }
}
