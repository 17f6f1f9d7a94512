//! Gossip over QUIC on loopback: mutual TLS admission (one certificate per gateway), framing
//! both ways, refusals, and the `tollgate certs` command that issues the certificates.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tollgate::certs;
use tollgate::crdt::Slot;
use tollgate::gossip::codec::{self, CodecError, DEFAULT_MAX_FRAME};
use tollgate::gossip::quic::{
    self, CLOSE_GATEWAY_NOT_ALLOWED, CLOSE_NO_GATEWAY, CLOSE_PROTOCOL_ERROR, GossipEndpoint,
    QuicError,
};
use tollgate::gossip::tls::{CertName, PeerTls};

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

/// Gateways of region `r`, instance `a`.
fn gateways(regions: &[&str]) -> Vec<certs::Gateway> {
    regions
        .iter()
        .map(|r| certs::Gateway::new(r, "a").unwrap())
        .collect()
}

fn slots(regions: &[&str]) -> Vec<Slot> {
    regions.iter().map(|r| slot(r)).collect()
}

fn slot(region: &str) -> Slot {
    Slot::new(region, "a")
}

fn tls(dir: &Path, region: &str) -> PeerTls {
    PeerTls::load(
        &dir.join("ca.pem"),
        &dir.join(format!("{region}.a.pem")),
        &dir.join(format!("{region}.a.key")),
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

/// [`support::eventually`] for a condition that needs no await, within this file's
/// deadline.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    support::eventually(what, DEADLINE, || std::future::ready(condition())).await;
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
        slots(&["eu-west", "ap-south"]),
    )
    .unwrap();
    let west = GossipEndpoint::bind(loopback(), tls(dir, "eu-west"), slots(&["us-east"])).unwrap();
    (east, west)
}

#[tokio::test]
async fn two_regions_exchange_frames_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    certs::generate(dir.path(), &gateways(&["us-east", "eu-west"]), false).unwrap();
    let (east, west) = mesh(dir.path());
    let west_addr = west.local_addr().unwrap();

    let connection = within(east.connect(west_addr, &slot("eu-west")))
        .await
        .unwrap();
    assert_eq!(quic::peer_gateway(&connection), Some(slot("eu-west")));
    let (mut send, mut frames) = quic::open_stream(&connection, east.max_frame())
        .await
        .unwrap();
    let hello = Message::Hello {
        region: "us-east".into(),
    };
    quic::send_frame(&mut send, &frame(&hello)).await.unwrap();

    let peer = within(west.accept()).await.unwrap();
    assert_eq!(peer.gateway, slot("us-east"));
    assert_eq!(quic::peer_gateway(&peer.connection), Some(slot("us-east")));
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
    certs::generate(dir.path(), &gateways(&["us-east", "eu-west"]), false).unwrap();
    let rogue_dir = tempfile::tempdir().unwrap();
    certs::generate(rogue_dir.path(), &gateways(&["us-east"]), false).unwrap();
    let (east, west) = mesh(dir.path());
    let west_addr = west.local_addr().unwrap();

    // Trusts the real CA (so it would accept West), but presents a certificate for
    // "us-east" from another CA.
    let rogue_tls = PeerTls::load(
        &dir.path().join("ca.pem"),
        &rogue_dir.path().join("us-east.a.pem"),
        &rogue_dir.path().join("us-east.a.key"),
    )
    .unwrap();
    let rogue = GossipEndpoint::bind(loopback(), rogue_tls, slots(&["eu-west"])).unwrap();
    // With TLS 1.3 the client may finish its side before the server rejects its certificate:
    // either the connect fails or the connection is closed right after.
    if let Ok(connection) = within(rogue.connect(west_addr, &slot("eu-west"))).await {
        within(connection.closed()).await;
    }
    eventually("west counts the refusal", || west.refused_peers() == 1).await;
    assert_refusal_metric("tls");

    // The rogue never surfaced; the real us-east is the next accepted peer.
    let connection = within(east.connect(west_addr, &slot("eu-west")))
        .await
        .unwrap();
    let (mut send, _frames) = quic::open_stream(&connection, DEFAULT_MAX_FRAME)
        .await
        .unwrap();
    quic::send_frame(&mut send, &frame(&Message::Ack(1)))
        .await
        .unwrap();
    let peer = within(west.accept()).await.unwrap();
    assert_eq!(peer.gateway, slot("us-east"));
    assert_eq!(peer.connection.remote_address(), east.local_addr().unwrap());
    assert_eq!(west.refused_peers(), 1);
}

#[tokio::test]
async fn a_valid_certificate_of_an_unconfigured_gateway_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    certs::generate(
        dir.path(),
        &gateways(&["us-east", "eu-west", "ap-south"]),
        false,
    )
    .unwrap();
    let (_east, west) = mesh(dir.path());
    let south =
        GossipEndpoint::bind(loopback(), tls(dir.path(), "ap-south"), slots(&["eu-west"])).unwrap();

    let result = within(south.connect(west.local_addr().unwrap(), &slot("eu-west"))).await;
    let error = match result {
        Ok(connection) => within(connection.closed()).await,
        Err(QuicError::Connection(error)) => error,
        Err(other) => panic!("unexpected error: {other}"),
    };
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, CLOSE_GATEWAY_NOT_ALLOWED)
        }
        other => panic!("expected an application close, got {other}"),
    }
    eventually("west counts the refusal", || west.refused_peers() == 1).await;
    assert_refusal_metric("gateway_not_allowed");
}

/// Certificates of a test CA with arbitrary DNS names, written as `<file>.pem`/`.key` beside
/// the CA's `ca.pem`.
fn custom_pki(dir: &Path, certificates: &[(&str, &[&str])]) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);
    for (file, names) in certificates {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
    }
}

/// Issue #13, finding 2: a region's certificate let any instance of the region present
/// itself as any other. Region certificates of earlier versions are refused, with a reason
/// that says to reissue; a certificate naming two gateways names none.
#[tokio::test]
async fn region_certificates_and_ambiguous_ones_are_refused() {
    tollgate::metrics::install();
    let dir = tempfile::tempdir().unwrap();
    custom_pki(
        dir.path(),
        &[
            ("eu-west.a", &["a.eu-west.tollgate.internal"]),
            ("region", &["us-east", "us-east.tollgate.internal"]),
            (
                "two",
                &["a.us-east.tollgate.internal", "b.us-east.tollgate.internal"],
            ),
        ],
    );
    let load = |file: &str| {
        PeerTls::load(
            &dir.path().join("ca.pem"),
            &dir.path().join(format!("{file}.pem")),
            &dir.path().join(format!("{file}.key")),
        )
        .unwrap()
    };
    assert_eq!(
        load("region").name(),
        CertName::RegionOnly("us-east".into())
    );
    assert_eq!(load("two").name(), CertName::Nothing);
    let allowed = vec![Slot::new("us-east", "a"), Slot::new("us-east", "b")];
    let west = GossipEndpoint::bind(loopback(), load("eu-west.a"), allowed).unwrap();
    for (n, file) in ["region", "two"].into_iter().enumerate() {
        let client = GossipEndpoint::bind(loopback(), load(file), slots(&["eu-west"])).unwrap();
        let result = within(client.connect(west.local_addr().unwrap(), &slot("eu-west"))).await;
        let error = match result {
            Ok(connection) => within(connection.closed()).await,
            Err(QuicError::Connection(error)) => error,
            Err(other) => panic!("unexpected error: {other}"),
        };
        match error {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, CLOSE_NO_GATEWAY, "{file}")
            }
            other => panic!("{file}: expected an application close, got {other}"),
        }
        eventually("west counts the refusal", || {
            west.refused_peers() == n as u64 + 1
        })
        .await;
    }
    assert_refusal_metric("region_certificate");
    assert_refusal_metric("no_gateway");
}

#[tokio::test]
async fn a_client_expecting_another_gateway_refuses_the_server() {
    let dir = tempfile::tempdir().unwrap();
    certs::generate(
        dir.path(),
        &gateways(&["us-east", "eu-west", "ap-south"]),
        false,
    )
    .unwrap();
    let (east, west) = mesh(dir.path());
    // West's certificate is valid, but it is not ap-south.
    let result = within(east.connect(west.local_addr().unwrap(), &slot("ap-south"))).await;
    assert!(
        matches!(result, Err(QuicError::Connection(_))),
        "{result:?}"
    );
}

#[tokio::test]
async fn garbage_on_the_stream_closes_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    certs::generate(dir.path(), &gateways(&["us-east", "eu-west"]), false).unwrap();
    let (east, west) = mesh(dir.path());

    let connection = within(east.connect(west.local_addr().unwrap(), &slot("eu-west")))
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
    certs::generate(dir.path(), &gateways(&["us-east", "eu-west"]), false).unwrap();
    let (east, west) = mesh(dir.path());

    let connection = within(east.connect(west.local_addr().unwrap(), &slot("eu-west")))
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
            .args(["--gateways", "us-east/a,us-east/b"])
            .args(extra)
            .output()
            .unwrap()
    };

    let first = certs(&[]);
    assert!(first.status.success(), "{first:?}");
    for name in ["ca", "us-east.a", "us-east.b"] {
        let key = std::fs::metadata(out.join(format!("{name}.key"))).unwrap();
        assert_eq!(key.permissions().mode() & 0o777, 0o600, "{name}.key");
        assert!(out.join(format!("{name}.pem")).is_file(), "{name}.pem");
    }
    // Usable as written, and each names its own gateway.
    let b = PeerTls::load(
        &out.join("ca.pem"),
        &out.join("us-east.b.pem"),
        &out.join("us-east.b.key"),
    )
    .unwrap();
    assert_eq!(b.name(), CertName::Gateway(Slot::new("us-east", "b")));

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
fn bad_gateway_names_are_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["", "US-East", "-a", "a-", "a.b", "a_b", "123"] {
        let result = certs::Gateway::new(bad, "a");
        assert!(
            matches!(result, Err(certs::CertsError::BadRegion(_))),
            "{bad:?}: {result:?}"
        );
        let result = certs::Gateway::new("us-east", bad);
        assert!(
            matches!(result, Err(certs::CertsError::BadInstance(_))),
            "{bad:?}: {result:?}"
        );
    }
    for bad in ["us-east", "us-east/", "/a", "us-east/a/b"] {
        assert!(bad.parse::<certs::Gateway>().is_err(), "{bad:?}");
    }
    assert!(matches!(
        certs::generate(dir.path(), &gateways(&["a-1", "a-1"]), false),
        Err(certs::CertsError::DuplicateGateway(_))
    ));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
