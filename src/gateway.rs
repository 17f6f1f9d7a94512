//! A regional gateway process: its parts assembled, the proxy listener, the admin listener,
//! and their lifecycle.
//!
//! The configuration in force and what is built from it ([`Running`]) is one immutable
//! snapshot, swapped whole by a reload (`gateway/reload.rs`): a request reads it once when
//! it starts and finishes on it. The layers and the admin API get narrow handles on the
//! parts ([`Gateway::proxy_stack`], [`Gateway::admin_state`]) and do not know this module.

mod reload;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::RegionConfig;
use crate::global::{GlobalError, GlobalLimits};
use crate::http::admin::{AdminState, admin_app};
use crate::http::ratelimit::RateLimiter;
use crate::http::stack::{self, ProxyStack};
use crate::http::workers;
use crate::limit::breaker::Breaker;
use crate::proxy::{Proxy, UpstreamTasks};
use crate::running::InForce;
pub use crate::running::Running;
use crate::store::backend::Backend;
use crate::store::memory::MemoryStore;
use crate::store::redis::{RedisClusterStore, RedisStore};
use crate::store::{BucketStore, StoreError};

/// How long a stopping gateway waits for its peers to receive its last gossip.
const GOSSIP_RETIRE_GRACE: Duration = Duration::from_secs(2);

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

pub use reload::{ConfigSource, ReloadOutcome};

/// A gateway's parts, assembled. The layers and the admin API each get only the parts they
/// use ([`Gateway::proxy_stack`], [`Gateway::admin_state`]), so none of them depends on this
/// module.
pub struct Gateway {
    /// Fixed for the life of the process (a reload cannot change it).
    pub region: Arc<str>,
    running: Arc<InForce>,
    pub limiter: Arc<RateLimiter>,
    /// The gateway's share in global limits, when it gossips.
    pub global: Option<Arc<GlobalLimits>>,
    backend: Arc<Backend>,
    /// The file a reload reads.
    source: Option<PathBuf>,
    /// Health checks and connection expiry of the running proxy's upstreams.
    upstream_tasks: Mutex<UpstreamTasks>,
    /// Held by a reload from reading the file to the swap, so two cannot interleave.
    reloading: Mutex<()>,
}

impl Gateway {
    /// Builds the gateway. Redis need not be up: the store connects in the background and
    /// policies apply their `on_store_error` until it answers. Peers need not be up either:
    /// gossip dials them in the background. Must run inside a Tokio runtime.
    ///
    /// Without a [`ConfigSource`] it has nothing to reload from: see
    /// [`Gateway::from_source`].
    pub fn new(config: RegionConfig) -> Result<Self, GatewayError> {
        Self::build(config, None)
    }

    /// [`Gateway::new`] for a configuration read from `source`, which a reload reads again.
    pub fn from_source(config: RegionConfig, source: ConfigSource) -> Result<Self, GatewayError> {
        Self::build(config, Some(source))
    }

    fn build(config: RegionConfig, source: Option<ConfigSource>) -> Result<Self, GatewayError> {
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
        let proxy = Proxy::new(&config);
        Ok(Self {
            region: config.region.as_str().into(),
            running: Arc::new(InForce::new(Running {
                config,
                proxy,
                digest: source.as_ref().map(|s| s.digest.clone()),
            })),
            limiter: Arc::new(limiter),
            global,
            backend: Arc::new(backend),
            source: source.map(|s| s.path),
            upstream_tasks: Mutex::new(UpstreamTasks::default()),
            reloading: Mutex::new(()),
        })
    }

    /// The snapshot in force now. A caller that holds it across awaits keeps using it after
    /// a reload, which is the point: a request finishes on the configuration it started with.
    pub fn running(&self) -> Arc<Running> {
        self.running.load()
    }

    /// The proxy listener's layer stack, on this gateway's parts.
    pub fn proxy_stack(&self) -> ProxyStack {
        stack::proxy_stack(
            self.region.clone(),
            self.running.clone(),
            self.limiter.clone(),
        )
    }

    /// What the admin API reads.
    pub fn admin_state(&self) -> AdminState {
        AdminState {
            region: self.region.clone(),
            running: self.running.clone(),
            global: self.global.clone(),
            backend: self.backend.clone(),
        }
    }

    /// Starts the background tasks of upstreams the running proxy added, stops those of
    /// upstreams it dropped.
    fn follow_upstreams(&self) {
        let running = self.running();
        self.upstream_tasks().follow(&running.proxy);
    }

    fn upstream_tasks(&self) -> std::sync::MutexGuard<'_, UpstreamTasks> {
        // Never held across a panic point; recover rather than propagate poisoning.
        self.upstream_tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Binds the configured addresses and serves until `shutdown` resolves, reloading `source`
/// on every SIGHUP that `hangups` reports.
pub async fn run(
    config: RegionConfig,
    source: ConfigSource,
    shutdown: impl Future<Output = ()> + Send + 'static,
    hangups: crate::shutdown::Hangups,
) -> Result<(), GatewayError> {
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|error| GatewayError::Bind { addr, error })
    };
    let listener = bind(config.listen).await?;
    let admin_listener = bind(config.admin_listen).await?;
    let gateway = Arc::new(Gateway::from_source(config, source)?);
    let reloads = tokio::spawn(reload::on_hangups(gateway.clone(), hangups));
    let result = serve(gateway, listener, admin_listener, shutdown).await;
    reloads.abort();
    result
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
    let region = gateway.region.clone();
    let proxy_addr = listener.local_addr().map_err(GatewayError::Serve)?;
    let admin_addr = admin_listener.local_addr().map_err(GatewayError::Serve)?;
    let _upstream_tasks = UpstreamTasksGuard::start(&gateway);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            // Resolves on the signal, or if the sender is gone (which also means stop).
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let workers = workers::count(gateway.running().config.workers);
    let proxy_server =
        workers::serve_on_workers(listener, gateway.proxy_stack(), workers, stopped());
    let admin_server = axum::serve(admin_listener, admin_app(gateway.admin_state()))
        .with_graceful_shutdown(stopped());
    let mut proxy_task = tokio::spawn(proxy_server);
    let mut admin_task = tokio::spawn(async move { admin_server.await });
    tracing::info!(%region, %proxy_addr, %admin_addr, workers, "gateway listening");

    tokio::select! {
        () = shutdown => {}
        result = &mut proxy_task => return flatten(result),
        result = &mut admin_task => return flatten(result),
    }
    // The drain timeout of the configuration in force when the signal came.
    let drain_timeout = gateway.running().config.drain_timeout;
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

/// Runs the upstreams' background tasks while the gateway serves, however `serve` returns.
struct UpstreamTasksGuard<'a>(&'a Gateway);

impl<'a> UpstreamTasksGuard<'a> {
    fn start(gateway: &'a Gateway) -> Self {
        gateway.follow_upstreams();
        Self(gateway)
    }
}

impl Drop for UpstreamTasksGuard<'_> {
    fn drop(&mut self) {
        *self.0.upstream_tasks() = UpstreamTasks::default();
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
