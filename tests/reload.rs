//! Reloading the config file in place (what SIGHUP does): a valid file is applied without
//! dropping a connection or failing a request; an invalid one changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use axum::Router;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tollgate::gateway::ReloadOutcome;

use support::gateway::TestGateway;
use support::{client, serve};

/// Generous bound for anything that should happen promptly.
const DEADLINE: Duration = Duration::from_secs(10);

/// An upstream answering every request with its `name`.
async fn named_upstream(name: &'static str) -> SocketAddr {
    serve(Router::new().fallback(move || async move { name })).await
}

/// A region file: one service on `/api` at `instance`, a per-address policy of `rate`, and
/// `extra` top-level keys and tables.
fn region_file(instance: SocketAddr, rate: &str, extra: &str) -> String {
    format!(
        r#"region = "test"
listen = "127.0.0.1:1"
admin_listen = "127.0.0.1:2"
{extra}

[services.api]
routes = ["/api"]
instances = ["http://{instance}"]

[policies.per-ip]
routes = ["/api"]
key = ["ip"]
rate = "{rate}"
"#
    )
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

async fn start(dir: &Path, text: &str) -> (TestGateway, std::path::PathBuf) {
    let path = dir.join("region.toml");
    std::fs::write(&path, text).unwrap();
    (TestGateway::start_file(&path).await, path)
}

/// `ratelimit-policy` of a GET on `path`, with the status and body.
async fn get(gw: &TestGateway, path: &str) -> (u16, String, String) {
    let response = client().get(gw.url(path)).send().await.unwrap();
    let status = response.status().as_u16();
    let policy = response
        .headers()
        .get("ratelimit-policy")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, policy, response.text().await.unwrap())
}

/// The value of `tollgate_config_reloads_total{result}` (0 before the first).
async fn reloads(gw: &TestGateway, result: &str) -> f64 {
    gw.metrics()
        .await
        .into_iter()
        .find(|s| s.name == "tollgate_config_reloads_total" && s.labels["result"] == result)
        .map_or(0.0, |s| s.value)
}

#[tokio::test]
async fn a_valid_file_is_applied_routes_policies_and_digest() {
    let dir = tempfile::tempdir().unwrap();
    let a = named_upstream("a").await;
    let b = named_upstream("b").await;
    let first = region_file(a, "50/10s", "");
    let (gw, path) = start(dir.path(), &first).await;
    assert_eq!(
        get(&gw, "/api/x").await,
        (200, "\"per-ip\";q=50;w=10".into(), "a".into())
    );
    assert_eq!(gw.ready().await["config_digest"], sha256_hex(&first));
    assert_eq!(get(&gw, "/other").await.0, 404);
    let applied_before = reloads(&gw, "applied").await;

    let second = format!(
        "{}\n[services.other]\nroutes = [\"/other\"]\ninstances = [\"http://{b}\"]\n",
        region_file(a, "70/20s", "log_level = \"debug\"")
    );
    std::fs::write(&path, &second).unwrap();
    assert_eq!(
        gw.gateway.reload(),
        ReloadOutcome::Applied {
            digest: sha256_hex(&second)
        }
    );
    assert_eq!(
        get(&gw, "/api/x").await,
        (200, "\"per-ip\";q=70;w=20".into(), "a".into())
    );
    assert_eq!(get(&gw, "/other").await.2, "b");
    assert_eq!(gw.ready().await["config_digest"], sha256_hex(&second));
    assert!(reloads(&gw, "applied").await > applied_before);
    gw.stop().await;
}

#[tokio::test]
async fn an_invalid_file_or_a_restart_only_change_keeps_the_running_config() {
    let dir = tempfile::tempdir().unwrap();
    let a = named_upstream("a").await;
    let first = region_file(a, "50/10s", "");
    let (gw, path) = start(dir.path(), &first).await;
    let invalid_before = reloads(&gw, "invalid").await;
    let restart_before = reloads(&gw, "restart_required").await;

    // Two mistakes: both are reported, as `--check` reports them.
    std::fs::write(
        &path,
        region_file(a, "fifty/10s", "drain_timeout = \"soon\""),
    )
    .unwrap();
    let ReloadOutcome::Invalid { errors } = gw.gateway.reload() else {
        panic!("an invalid file was not refused");
    };
    assert!(errors.contains("2 errors in config"), "{errors}");
    assert!(errors.contains("policies.per-ip.rate"), "{errors}");
    assert!(errors.contains("drain_timeout"), "{errors}");
    assert_eq!(reloads(&gw, "invalid").await, invalid_before + 1.0);

    std::fs::write(&path, "region = ").unwrap();
    assert!(matches!(gw.gateway.reload(), ReloadOutcome::Invalid { .. }));
    assert_eq!(reloads(&gw, "invalid").await, invalid_before + 2.0);

    let moved = region_file(a, "70/10s", "").replace("127.0.0.1:1", "127.0.0.1:3");
    std::fs::write(&path, moved).unwrap();
    assert_eq!(
        gw.gateway.reload(),
        ReloadOutcome::RestartRequired {
            keys: vec!["listen"]
        }
    );
    assert_eq!(reloads(&gw, "restart_required").await, restart_before + 1.0);

    assert_eq!(get(&gw, "/api/x").await.1, "\"per-ip\";q=50;w=10");
    assert_eq!(gw.ready().await["config_digest"], sha256_hex(&first));
    gw.stop().await;
}

/// One request on an open keep-alive connection: status, `ratelimit-policy`, body.
async fn request_on(connection: &mut BufReader<TcpStream>, path: &str) -> (u16, String, String) {
    let request = format!("GET {path} HTTP/1.1\r\nhost: gateway\r\n\r\n");
    connection
        .get_mut()
        .write_all(request.as_bytes())
        .await
        .unwrap();
    let mut status_line = String::new();
    connection.read_line(&mut status_line).await.unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let (mut length, mut policy) = (0, String::new());
    loop {
        let mut line = String::new();
        connection.read_line(&mut line).await.unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(": ").unwrap();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse().unwrap(),
            "ratelimit-policy" => policy = value.to_owned(),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    connection.read_exact(&mut body).await.unwrap();
    (status, policy, String::from_utf8(body).unwrap())
}

#[tokio::test]
async fn requests_in_flight_finish_and_open_connections_stay_across_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    // The old upstream holds every request until released, so they are in flight during
    // the reload.
    let (arrived, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    let (release, released) = tokio::sync::watch::channel(false);
    let held = serve(Router::new().fallback(move || {
        let arrived = arrived.clone();
        let mut released = released.clone();
        async move {
            let _ = arrived.send(());
            let _ = released.wait_for(|r| *r).await;
            "old"
        }
    }))
    .await;
    let new = named_upstream("new").await;
    let (gw, path) = start(dir.path(), &region_file(held, "1000/10s", "")).await;

    let mut connection = BufReader::new(TcpStream::connect(gw.addr).await.unwrap());
    const IN_FLIGHT: usize = 20;
    let requests: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let url = gw.url("/api/x");
            tokio::spawn(async move { client().get(url).send().await })
        })
        .collect();
    tokio::time::timeout(DEADLINE, async {
        for _ in 0..IN_FLIGHT {
            arrivals.recv().await;
        }
    })
    .await
    .expect("the requests did not reach the upstream");

    std::fs::write(&path, region_file(new, "2000/10s", "")).unwrap();
    assert!(matches!(gw.gateway.reload(), ReloadOutcome::Applied { .. }));
    // The open connection serves the next request with the new config.
    assert_eq!(
        request_on(&mut connection, "/api/x").await,
        (200, "\"per-ip\";q=2000;w=10".into(), "new".into())
    );

    release.send(true).unwrap();
    for request in requests {
        let response = request.await.unwrap().unwrap();
        assert_eq!(response.status(), 200);
        // Decided and routed on the snapshot they started with.
        assert_eq!(
            response.headers()["ratelimit-policy"],
            "\"per-ip\";q=1000;w=10"
        );
        assert_eq!(response.text().await.unwrap(), "old");
    }
    assert_eq!(
        request_on(&mut connection, "/api/x").await.2,
        "new",
        "the connection was kept"
    );
    gw.stop().await;
}
