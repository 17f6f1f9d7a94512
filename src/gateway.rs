//! A regional gateway process: the proxy listener, the admin listener, and their lifecycle.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::net::TcpListener;

use crate::config::RegionConfig;
use crate::global::{GlobalError, GlobalLimits};
use crate::http::admin::admin_app;
use crate::http::ratelimit::RateLimiter;
use crate::http::stack::{self, proxy_stack};
use crate::limit::breaker::Breaker;
use crate::proxy::Proxy;
use crate::store::memory::MemoryStore;
use crate::store::redis::{RedisClusterStore, RedisStore};
use crate::store::{BucketStore, StoreError};

/// How long a stopping gateway waits for its peers to receive its last gossip.
const GOSSIP_RETIRE_GRACE: Duration = Duration::from_secs(2);

/// How long a readiness probe waits for Redis.
const REDIS_PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// Why the gateway could not start or stopped abnormally.
///
/// Each message embeds its cause, so no variant also returns it as `source()`: anyhow's report
/// in main would print the cause twice (and each level below it again).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("bucket store: {0}")]
    Store(StoreError),
    #[error("global limits: {0}")]
    Global(GlobalError),
    #[error("server error: {0}")]
    Serve(std::io::Error),
}

impl From<GlobalError> for GatewayError {
    fn from(error: GlobalError) -> Self {
        Self::Global(error)
    }
}

/// Where the region's buckets live, kept concrete for readiness pings.
enum Backend {
    Memory,
    Redis(Arc<RedisStore>),
    Cluster(Arc<RedisClusterStore>),
}

/// Everything a gateway's handlers share.
pub struct Gateway {
    pub config: RegionConfig,
    pub proxy: Proxy,
    pub limiter: Arc<RateLimiter>,
    /// The gateway's share in global limits, when it gossips.
    pub global: Option<Arc<GlobalLimits>>,
    backend: Backend,
}

impl Gateway {
    /// Builds the gateway. Redis need not be up: the store connects in the background and
    /// policies apply their `on_store_error` until it answers. Peers need not be up either:
    /// gossip dials them in the background. Must run inside a Tokio runtime.
    pub fn new(config: RegionConfig) -> Result<Self, GatewayError> {
        let (store, backend): (Arc<dyn BucketStore>, Backend) = if !config.redis_cluster.is_empty()
        {
            let store = Arc::new(
                RedisClusterStore::new(&config.redis_cluster, config.store_timeout)
                    .map_err(GatewayError::Store)?,
            );
            (store.clone(), Backend::Cluster(store))
        } else if let Some(url) = &config.redis_url {
            let store =
                Arc::new(RedisStore::new(url, config.store_timeout).map_err(GatewayError::Store)?);
            (store.clone(), Backend::Redis(store))
        } else {
            (Arc::new(MemoryStore::new()), Backend::Memory)
        };
        let global = match &config.gossip {
            Some(settings) => Some(Arc::new(GlobalLimits::start(&config, settings)?)),
            None => None,
        };
        let mut limiter = RateLimiter::new(
            config.policies.clone(),
            config.identity.clone(),
            store,
            Breaker::new(config.store_breaker_failures, config.store_probe_interval),
        );
        if let Some(global) = &global {
            limiter = limiter.with_global(global.clone());
        }
        Ok(Self {
            proxy: Proxy::new(&config),
            limiter: Arc::new(limiter),
            global,
            backend,
            config,
        })
    }

    pub async fn redis_status(&self) -> RedisStatus {
        let ping = match &self.backend {
            Backend::Memory => return RedisStatus::NotConfigured,
            Backend::Redis(store) => tokio::time::timeout(REDIS_PROBE_TIMEOUT, store.ping()).await,
            Backend::Cluster(store) => {
                tokio::time::timeout(REDIS_PROBE_TIMEOUT, store.ping()).await
            }
        };
        match ping {
            Ok(Ok(())) => RedisStatus::Up,
            Ok(Err(error)) => RedisStatus::Down {
                error: error.to_string(),
            },
            Err(_) => RedisStatus::Down {
                error: format!("no answer within {REDIS_PROBE_TIMEOUT:?}"),
            },
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

/// Binds the configured addresses and serves until `shutdown` resolves.
pub async fn run(
    config: RegionConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|error| GatewayError::Bind { addr, error })
    };
    let listener = bind(config.listen).await?;
    let admin_listener = bind(config.admin_listen).await?;
    let gateway = Arc::new(Gateway::new(config)?);
    serve(gateway, listener, admin_listener, shutdown).await
}

/// Serves the proxy and admin apps on the given listeners until `shutdown` resolves, then
/// stops accepting, lets in-flight requests finish (up to `drain_timeout`), retires from
/// gossip (last delta sent, idle strict rights handed to a peer), and returns.
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
    let proxy_server = stack::serve(listener, proxy_stack(gateway.clone()), stopped());
    let admin_server =
        axum::serve(admin_listener, admin_app(gateway.clone())).with_graceful_shutdown(stopped());
    let mut proxy_task = tokio::spawn(proxy_server);
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
    let result = match drained {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(%region, "drain timeout reached, closing remaining connections");
            Ok(())
        }
    };
    // After the drain, so that the last delta includes the last requests.
    if let Some(global) = &gateway.global {
        global.shutdown(GOSSIP_RETIRE_GRACE).await;
    }
    tracing::info!(%region, "gateway stopped");
    result
}

fn flatten(
    result: Result<std::io::Result<()>, tokio::task::JoinError>,
) -> Result<(), GatewayError> {
    match result {
        Ok(inner) => inner.map_err(GatewayError::Serve),
        Err(join) => Err(GatewayError::Serve(std::io::Error::other(join))),
    }
}
