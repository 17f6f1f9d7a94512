//! The configuration in force and what is built from it, as one immutable snapshot that a
//! reload swaps whole ([`crate::gateway`] builds and swaps it; the request path and the
//! admin API only read it). A request loads it once when it starts and finishes on it.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::RegionConfig;
use crate::proxy::Proxy;

/// The configuration in force and the proxy built from it.
pub struct Running {
    pub config: RegionConfig,
    pub proxy: Proxy,
    /// SHA-256 of the config file's bytes (hex), when the gateway was started from a file.
    pub digest: Option<String>,
}

/// The snapshot in force: read by every request, replaced by a reload.
pub struct InForce(ArcSwap<Running>);

impl InForce {
    pub fn new(running: Running) -> Self {
        Self(ArcSwap::from_pointee(running))
    }

    /// The snapshot in force now. A caller that holds it across awaits keeps using it after
    /// a reload, which is the point: a request finishes on the configuration it started with.
    pub fn load(&self) -> Arc<Running> {
        self.0.load_full()
    }

    /// Puts `running` in force (one pointer store).
    pub fn replace(&self, running: Running) {
        self.0.store(Arc::new(running));
    }
}
