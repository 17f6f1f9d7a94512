//! `tollgate demo` end to end: the real binary, its child processes, the fixed demo ports.
//!
//! This is the only test that uses the demo's fixed ports (8081-8083, 9081-9083, 7001-7102).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);

/// Child PIDs of `parent`, from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command name: state, ppid, ...
        let Some(after_name) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
            continue;
        };
        let ppid = after_name
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            pids.push(pid);
        }
    }
    pids
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_serves_three_regions_and_stops_every_child_on_sigterm() {
    let mut demo = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("demo")
        .env_remove("TOLLGATE_REDIS_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();

    let start = Instant::now();
    for admin in [9081, 9082, 9083] {
        loop {
            let ready = http
                .get(format!("http://127.0.0.1:{admin}/ready"))
                .send()
                .await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            assert!(
                demo.try_wait().unwrap().is_none(),
                "demo exited during startup"
            );
            assert!(
                start.elapsed() < DEADLINE,
                "region on admin port {admin} never became ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The strict global policy on bookings serves once every gateway holds its share: after
    // this cold start, one window plus one sub-window (11 s), as the demo itself waits.
    for admin in [9081, 9082, 9083] {
        loop {
            let limits = http
                .get(format!(
                    "http://127.0.0.1:{admin}/limits/bookings-global?key=ip:127.0.0.1"
                ))
                .send()
                .await;
            let reclaimed = match limits {
                Ok(response) => response
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v["tiers"][0]["strict"]["share_reclaimed"] == Value::Bool(true)),
                Err(_) => false,
            };
            if reclaimed {
                break;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "gateway on admin port {admin} never held its strict share"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The airline flow across regions: onboard in one, read in another, book in a third.
    let username = format!("demo{}", std::process::id());
    let created = http
        .post("http://127.0.0.1:8081/api/v1/users")
        .json(&json!({"username": username, "password": "correct-horse", "name": "Ada", "lastName": "Lovelace"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let read = http
        .get(format!("http://127.0.0.1:8082/api/v1/users/{username}"))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    let booking = http
        .post("http://127.0.0.1:8083/api/v1/bookings")
        .json(&json!({
            "user": username, "flightNumber": "AR1132", "origin": "EZE", "destination": "MAD",
            "departureTime": "2035-05-01T10:00:00Z",
            "passengers": [{"fullName": "Ada Lovelace", "birthDate": "1815-12-10", "passportNumber": "X1234567"}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(booking.status(), 201);
    let listed: Value = http
        .get(format!(
            "http://127.0.0.1:8081/api/v1/bookings?user={username}"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);

    let children = children_of(demo.id());
    assert!(
        children.len() >= 5,
        "expected gateways and services as children: {children:?}"
    );
    kill(Pid::from_raw(demo.id() as i32), Signal::SIGTERM).unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = demo.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "demo did not stop after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "demo exited with {status}");
    let left: Vec<u32> = children.into_iter().filter(|&pid| alive(pid)).collect();
    assert!(left.is_empty(), "children left behind: {left:?}");
    for port in [8081, 8082, 8083, 9081, 7001, 7101] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} still served after the demo stopped"
        );
    }
}
