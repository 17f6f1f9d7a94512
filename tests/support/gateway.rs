//! An in-process gateway on free ports, for black-box tests.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::oneshot;
use tollgate::config::RegionConfig;
use tollgate::gateway::{ConfigSource, Gateway, serve as serve_gateway};

use super::client;

/// Generous bound for anything that should happen promptly.
const DEADLINE: Duration = Duration::from_secs(10);

/// A gateway running in this process on free ports.
pub struct TestGateway {
    pub gateway: Arc<Gateway>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestGateway {
    /// `services` is the TOML of the `[services.*]` tables; `extra` top-level keys.
    pub async fn start(extra: &str, services: &str) -> Self {
        let text = format!(
            "region = \"test\"\nlisten = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:2\"\n{extra}\n{services}"
        );
        let config = RegionConfig::parse(Path::new("test.toml"), &text, |_| None)
            .unwrap_or_else(|e| panic!("{e}"));
        Self::serve(Gateway::new(config).unwrap()).await
    }

    /// A gateway started from the region file `path`, which [`Gateway::reload`] reads again.
    /// Its `listen` and `admin_listen` are not used: the test binds free ports.
    pub async fn start_file(path: &Path) -> Self {
        let (config, digest) = RegionConfig::load_digested(path).unwrap_or_else(|e| panic!("{e}"));
        let source = ConfigSource {
            path: path.to_owned(),
            digest,
        };
        Self::serve(Gateway::from_source(config, source).unwrap()).await
    }

    async fn serve(gateway: Gateway) -> Self {
        let gateway = Arc::new(gateway);
        let handle = gateway.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = admin_listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve_gateway(gateway, listener, admin_listener, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self {
            gateway: handle,
            addr,
            admin,
            stop: Some(stop),
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub async fn ready(&self) -> Value {
        client()
            .get(self.admin_url("/ready"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The admin listener's `/metrics`, parsed.
    pub async fn metrics(&self) -> Vec<super::PromSample> {
        super::scrape_metrics(&self.admin_url("")).await
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(DEADLINE, &mut self.task)
            .await
            .expect("gateway did not stop")
            .unwrap();
    }
}

/// The TOML of one `[services.NAME]` table.
pub fn service(name: &str, route: &str, instances: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = instances
        .iter()
        .map(|a| format!("\"http://{a}\""))
        .collect();
    format!(
        "[services.{name}]\nroutes = [\"{route}\"]\ninstances = [{}]\n{extra}\n",
        list.join(", ")
    )
}
