//! Benchmark (not a test): proxies a large streamed upload through a real gateway process and
//! reports the gateway's peak RSS growth. Target: under 50 MB for 100 MB.
//!
//! Run with `loadtest/upload-rss.sh` (or `cargo run --release --example upload_rss -- [MB]`).
//! The gateway is the built `tollgate` binary next to this example in `target/release`; the
//! upstream is a sink in this process that counts and discards what it receives.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::Request;
use axum::routing::post;
use http_body_util::BodyExt;

const CHUNK: usize = 64 * 1024;

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0)
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on 127.0.0.1")
}

#[tokio::main]
async fn main() {
    let megabytes: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100);
    let total = megabytes * 1024 * 1024;

    let received = Arc::new(AtomicU64::new(0));
    let sink = Router::new().route(
        "/upload",
        post({
            let received = received.clone();
            move |request: Request| {
                let received = received.clone();
                async move {
                    let mut body = request.into_body();
                    while let Some(Ok(frame)) = body.frame().await {
                        if let Ok(data) = frame.into_data() {
                            received.fetch_add(data.len() as u64, Ordering::Relaxed);
                        }
                    }
                    "stored"
                }
            }
        }),
    );
    let sink_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink_listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(sink_listener, sink).await.unwrap() });

    let (listen, admin) = (free_addr(), free_addr());
    let dir = std::env::temp_dir().join(format!("tollgate-upload-rss-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "region = \"bench\"\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\nmax_request_body = \"1GiB\"\n\n[services.sink]\nroutes = [\"/\"]\ninstances = [\"http://{sink_addr}\"]\nrequest_timeout = \"120s\"\n"
        ),
    )
    .unwrap();
    let exe = std::env::current_exe().unwrap();
    let binary = exe
        .parent()
        .and_then(|examples| examples.parent())
        .map(|release| release.join("tollgate"))
        .unwrap();
    let mut gateway = Command::new(&binary)
        .args(["gateway", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e} (cargo build --release first)",
                binary.display()
            )
        });
    let pid = gateway.id();

    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client
        .get(format!("http://{admin}/ready"))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "gateway did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Warm up the connection pool and allocator so the baseline is the steady state.
    for _ in 0..10 {
        let _ = client
            .post(format!("http://{listen}/upload"))
            .body(vec![0u8; CHUNK])
            .send()
            .await;
    }
    let baseline_kib = status_kib(pid, "VmRSS:");

    let chunks = total / CHUNK as u64;
    let stream = futures_util::stream::iter(
        (0..chunks).map(|_| Ok::<_, std::io::Error>(Bytes::from_static(&[7u8; CHUNK]))),
    );
    let started = Instant::now();
    let before = received.load(Ordering::Relaxed);
    let response = client
        .post(format!("http://{listen}/upload"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let _ = response.bytes().await;
    let elapsed = started.elapsed();
    let peak_kib = status_kib(pid, "VmHWM:");
    let delivered = received.load(Ordering::Relaxed) - before;

    let _ = gateway.kill();
    let _ = gateway.wait();
    let _ = std::fs::remove_dir_all(&dir);

    let growth_mib = (peak_kib.saturating_sub(baseline_kib)) as f64 / 1024.0;
    println!(
        "upload size        {megabytes} MiB (chunked, {} KiB chunks)",
        CHUNK / 1024
    );
    println!("status             {status}");
    println!(
        "delivered upstream {:.1} MiB",
        delivered as f64 / (1024.0 * 1024.0)
    );
    println!(
        "throughput         {:.0} MiB/s",
        megabytes as f64 / elapsed.as_secs_f64()
    );
    println!("gateway RSS before {:.1} MiB", baseline_kib as f64 / 1024.0);
    println!("gateway peak RSS   {:.1} MiB", peak_kib as f64 / 1024.0);
    println!("peak RSS growth    {growth_mib:.1} MiB (target < 50 MiB)");
    assert_eq!(
        delivered,
        chunks * CHUNK as u64,
        "the upstream must receive every byte"
    );
}
