//! Gossip over QUIC on loopback: mutual TLS admission, framing both ways, refusals, and the
//! `tollgate certs` command that issues the certificates.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tollgate::certs;
use tollgate::gossip::codec::{self, CodecError, DEFAULT_MAX_FRAME};
use tollgate::gossip::quic::{
    self, CLOSE_PROTOCOL_ERROR, CLOSE_REGION_NOT_ALLOWED, GossipEndpoint, QuicError,
};
use tollgate::gossip::tls::PeerTls;

/// Generous bound for anything on loopback; tests finish far sooner when things work.
const DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Message {
    Hello { region: String },
    Delta(Vec<(String, u64)>),
    Ack(u64),
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn regions(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn tls(dir: &Path, region: &str) -> PeerTls {
    PeerTls::load(
        &dir.join("ca.pem"),
        &dir.join(format!("{region}.pem")),
        &dir.join(format!("{region}.key")),
    )
    .unwrap()
}

fn frame(message: &Message) -> Vec<u8> {
    codec::encode(message, DEFAULT_MAX_FRAME).unwrap()
}

async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future)
        .await
        .expect("deadline passed")
}

/// Polls `condition` until it holds or the deadline passes.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The refusal counter with this reason was recorded (tests share the process's recorder,
/// so only its presence is checked, not its value).
fn assert_refusal_metric(reason: &str) {
    let rendered = tollgate::metrics::render();
    let series = format!("{}{{reason=\"{reason}\"}}", quic::REFUSED_PEERS_TOTAL);
    assert!(rendered.contains(&series), "no {series} in:\n{rendered}");
}

fn mesh(dir: &Path) -> (GossipEndpoint, GossipEndpoint) {
    // Installed before anything is counted, so the refusal metrics can be checked.
    tollgate::metrics::install();
    let east = GossipEndpoint::bind(
        loopback(),
        tls(dir, "us-east"),
        regions(&["eu-west", "ap-south"]),
    )
    .unwrap();
    let west =
        GossipEndpoint::bind(loopback(), tls(dir, "eu-west"), regions(&["us-east"])).unwrap();
    (east, west)
}

#[tokio::test]
async fn two_regions_exchange_frames_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    certs::generate(dir.path(), &regions(&["us-east", "eu-west"]), false).unwrap();
    let (east, west) = mesh(dir.path());
    let west_addr = west.local_addr().unwrap();

    let connection = within(east.connect(west_addr, "eu-west")).await.unwrap();
    assert_eq!(quic::peer_region(&connection).as_deref(), Some("eu-west"));
    let (mut send, mut frames) = quic::open_stream(&connection, east.max_frame())
        .await
        .unwrap();
    let hello = Message::Hello {
        region: "us-east".into(),
    };
    quic::send_frame(&mut send, &frame(&hello)).await.unwrap();

    let peer = within(west.accept()).await.unwrap();
    assert_eq!(peer.region, "us-east");
    assert_eq!(
        quic::peer_region(&peer.connection).as_deref(),
        Some("us-east")
    );
    let (mut west_send, mut west_frames) =
        within(quic::accept_stream(&peer.connection, west.max_frame()))
            .await
            .unwrap();
    assert_eq!(
        within(west_frames.recv::<Message>()).await.unwrap(),
        Some(hello)
    );

    // West answers: a frame of an unknown version (skipped), then two good ones.
    let mut future_frame = frame(&Message::Ack(0));
    future_frame[2] = codec::VERSION + 1;
    let delta = Message::Delta(vec![("tenant:a".into(), 3), ("tenant:b".into(), 9)]);
    let mut bytes = future_frame;
    bytes.extend(frame(&delta));
    bytes.extend(frame(&Message::Ack(1)));
    quic::send_frame(&mut west_send, &bytes).await.unwrap();
    assert_eq!(within(frames.recv::<Message>()).await.unwrap(), Some(delta));
    assert_eq!(
        within(frames.recv::<Message>()).await.unwrap(),
        Some(Message::Ack(1))
    );
    assert_eq!(frames.skipped_frames(), 1);

    // East goes on; finishing its side ends West's stream cleanly.
    quic::send_frame(&mut send, &frame(&Message::Ack(2)))
        .await
        .unwrap();
    send.finish().unwrap();
    assert_eq!(
        within(west_frames.recv::<Message>()).await.unwrap(),
        Some(Message::Ack(2))
    );
    assert_eq!(within(west_frames.recv::<Message>()).await.unwrap(), None);
    assert_eq!(east.refused_peers() + west.refused_peers(), 0);
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    certs::generate(dir.path(), &regions(&["us-east", "eu-west"]), false).unwrap();
    let rogue_dir = tempfile::tempdir().unwrap();
    certs::generate(rogue_dir.path(), &regions(&["us-east"]), false).unwrap();
    let (east, west) = mesh(dir.path());
    let west_addr = west.local_addr().unwrap();

    // Trusts the real CA (so it would accept West), but presents a certificate for
    // "us-east" from another CA.
    let rogue_tls = PeerTls::load(
        &dir.path().join("ca.pem"),
        &rogue_dir.path().join("us-east.pem"),
        &rogue_dir.path().join("us-east.key"),
    )
    .unwrap();
    let rogue = GossipEndpoint::bind(loopback(), rogue_tls, regions(&["eu-west"])).unwrap();
    // With TLS 1.3 the client may finish its side before the server rejects its certificate:
    // either the connect fails or the connection is closed right after.
    if let Ok(connection) = within(rogue.connect(west_addr, "eu-west")).await {
        within(connection.closed()).await;
    }
    eventually("west counts the refusal", || west.refused_peers() == 1).await;
    assert_refusal_metric("tls");

    // The rogue never surfaced; the real us-east is the next accepted peer.
    let connection = within(east.connect(west_addr, "eu-west")).await.unwrap();
    let (mut send, _frames) = quic::open_stream(&connection, DEFAULT_MAX_FRAME)
        .await
        .unwrap();
    quic::send_frame(&mut send, &frame(&Message::Ack(1)))
        .await
        .unwrap();
    let peer = within(west.accept()).await.unwrap();
    assert_eq!(peer.region, "us-east");
    assert_eq!(peer.connection.remote_address(), east.local_addr().unwrap());
    assert_eq!(west.refused_peers(), 1);
}

#[tokio::test]
async fn a_valid_certificate_of_an_unconfigured_region_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    certs::generate(
        dir.path(),
        &regions(&["us-east", "eu-west", "ap-south"]),
        false,
    )
    .unwrap();
    let (_east, west) = mesh(dir.path());
    let south = GossipEndpoint::bind(
        loopback(),
        tls(dir.path(), "ap-south"),
        regions(&["eu-west"]),
    )
    .unwrap();

    let result = within(south.connect(west.local_addr().unwrap(), "eu-west")).await;
    let error = match result {
        Ok(connection) => within(connection.closed()).await,
        Err(QuicError::Connection(error)) => error,
        Err(other) => panic!("unexpected error: {other}"),
    };
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, CLOSE_REGION_NOT_ALLOWED)
        }
        other => panic!("expected an application close, got {other}"),
    }
    eventually("west counts the refusal", || west.refused_peers() == 1).await;
    assert_refusal_metric("region_not_allowed");
}

#[tokio::test]
async fn a_client_expecting_another_region_refuses_the_server() {
    let dir = tempfile::tempdir().unwrap();
    certs::generate(
        dir.path(),
        &regions(&["us-east", "eu-west", "ap-south"]),
        false,
    )
    .unwrap();
    let (east, west) = mesh(dir.path());
    // West's certificate is valid, but it is not ap-south.
    let result = within(east.connect(west.local_addr().unwrap(), "ap-south")).await;
    assert!(
        matches!(result, Err(QuicError::Connection(_))),
        "{result:?}"
    );
}

#[tokio::test]
async fn garbage_on_the_stream_closes_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    certs::generate(dir.path(), &regions(&["us-east", "eu-west"]), false).unwrap();
    let (east, west) = mesh(dir.path());

    let connection = within(east.connect(west.local_addr().unwrap(), "eu-west"))
        .await
        .unwrap();
    let (mut send, _frames) = quic::open_stream(&connection, DEFAULT_MAX_FRAME)
        .await
        .unwrap();
    quic::send_frame(&mut send, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();

    let peer = within(west.accept()).await.unwrap();
    let (_west_send, mut west_frames) =
        within(quic::accept_stream(&peer.connection, DEFAULT_MAX_FRAME))
            .await
            .unwrap();
    let result = within(west_frames.recv::<Message>()).await;
    assert!(
        matches!(result, Err(QuicError::Codec(CodecError::BadMagic(_)))),
        "{result:?}"
    );
    match within(connection.closed()).await {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, CLOSE_PROTOCOL_ERROR)
        }
        other => panic!("expected an application close, got {other}"),
    }
}

#[tokio::test]
async fn a_stream_ending_inside_a_frame_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    certs::generate(dir.path(), &regions(&["us-east", "eu-west"]), false).unwrap();
    let (east, west) = mesh(dir.path());

    let connection = within(east.connect(west.local_addr().unwrap(), "eu-west"))
        .await
        .unwrap();
    let (mut send, _frames) = quic::open_stream(&connection, DEFAULT_MAX_FRAME)
        .await
        .unwrap();
    let whole = frame(&Message::Ack(1));
    let mut bytes = whole.clone();
    bytes.extend_from_slice(&whole[..whole.len() - 1]);
    quic::send_frame(&mut send, &bytes).await.unwrap();
    send.finish().unwrap();

    let peer = within(west.accept()).await.unwrap();
    let (_west_send, mut west_frames) =
        within(quic::accept_stream(&peer.connection, DEFAULT_MAX_FRAME))
            .await
            .unwrap();
    assert_eq!(
        within(west_frames.recv::<Message>()).await.unwrap(),
        Some(Message::Ack(1))
    );
    let result = within(west_frames.recv::<Message>()).await;
    assert!(
        matches!(result, Err(QuicError::Truncated { .. })),
        "{result:?}"
    );
}

#[test]
fn certs_command_writes_private_keys_and_keeps_an_existing_ca() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pki");
    let certs = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("certs")
            .arg("--out")
            .arg(&out)
            .args(["--regions", "a,b"])
            .args(extra)
            .output()
            .unwrap()
    };

    let first = certs(&[]);
    assert!(first.status.success(), "{first:?}");
    for name in ["ca", "a", "b"] {
        let key = std::fs::metadata(out.join(format!("{name}.key"))).unwrap();
        assert_eq!(key.permissions().mode() & 0o777, 0o600, "{name}.key");
        assert!(out.join(format!("{name}.pem")).is_file(), "{name}.pem");
    }
    // Usable as written.
    PeerTls::load(&out.join("ca.pem"), &out.join("a.pem"), &out.join("a.key")).unwrap();

    let ca_before = std::fs::read(out.join("ca.pem")).unwrap();
    let again = certs(&[]);
    assert_eq!(again.status.code(), Some(2), "{again:?}");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("--force"),
        "{again:?}"
    );
    assert_eq!(std::fs::read(out.join("ca.pem")).unwrap(), ca_before);

    let forced = certs(&["--force"]);
    assert!(forced.status.success(), "{forced:?}");
    assert_ne!(std::fs::read(out.join("ca.pem")).unwrap(), ca_before);
    let key = std::fs::metadata(out.join("ca.key")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
}

#[test]
fn bad_region_names_are_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["", "US-East", "-a", "a-", "a.b", "a_b", "123"] {
        let result = certs::generate(dir.path(), &regions(&["ok", bad]), false);
        assert!(
            matches!(result, Err(certs::CertsError::BadRegion(_))),
            "{bad:?}: {result:?}"
        );
    }
    assert!(matches!(
        certs::generate(dir.path(), &regions(&["a", "a"]), false),
        Err(certs::CertsError::DuplicateRegion(_))
    ));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
