//! The handshake against hostile peers (issue #13, findings 2 and 4): every test here failed
//! before `Hello`s were judged by what their author could honestly have said.

use super::*;

fn node(i: usize, incarnation: u64) -> Gossip {
    Gossip::new(
        slots()[i].actor(incarnation),
        slots(),
        config(),
        policies(),
        DIGEST,
        i as u64,
        T0,
    )
    .unwrap()
}

fn hello(i: usize, incarnation: u64) -> Message {
    Message::Hello {
        actor: slots()[i].actor(incarnation),
        config_digest: DIGEST,
    }
}

fn vet(g: &mut Gossip, now: u64, i: usize, incarnation: u64) -> Result<(), HelloRefusal> {
    g.vet_hello(
        now,
        PeerId(i as u16),
        &slots()[i].actor(incarnation),
        DIGEST,
    )
}

/// Connects peer `i` with `incarnation` the way the driver does for an accepted connection.
fn connect(g: &mut Gossip, now: u64, i: usize, incarnation: u64) -> Result<(), HelloRefusal> {
    vet(g, now, i, incarnation)?;
    g.on_connected(PeerId(i as u16), now);
    g.handle(now, PeerId(i as u16), hello(i, incarnation));
    Ok(())
}

#[test]
fn an_incarnation_in_the_future_is_refused() {
    let mut g = node(0, T0);
    assert!(matches!(
        vet(&mut g, T0, 1, u64::MAX),
        Err(HelloRefusal::Future { .. })
    ));
    assert!(matches!(
        vet(&mut g, T0, 1, T0 + MAX_INCARNATION_SKEW_US + 1),
        Err(HelloRefusal::Future { .. })
    ));
    assert_eq!(vet(&mut g, T0, 1, T0 + MAX_INCARNATION_SKEW_US), Ok(()));
}

/// Before: the driver replaced the live link with any new connection, and a future
/// incarnation then shut the genuine process out as `bad-hello` for good.
#[test]
fn a_live_link_is_replaced_only_by_a_newer_incarnation() {
    let mut g = node(0, T0);
    connect(&mut g, T0, 1, T0).unwrap();
    assert_eq!(g.peer_status()[0].status, PeerStatus::Ok);
    // A second connection with the same incarnation, or an older one, leaves the live link.
    assert_eq!(
        vet(&mut g, T0 + SEC, 1, T0),
        Err(HelloRefusal::AlreadyConnected)
    );
    assert!(matches!(
        vet(&mut g, T0 + SEC, 1, T0 - 1),
        Err(HelloRefusal::Stale { .. })
    ));
    assert_eq!(g.stats().duplicate_identity, 1);
    assert_eq!(g.peer_status()[0].actor, Some(slots()[1].actor(T0)));
    // A genuine restart replaces it.
    connect(&mut g, T0 + 2 * SEC, 1, T0 + 2 * SEC).unwrap();
    assert_eq!(
        g.peer_status()[0].actor,
        Some(slots()[1].actor(T0 + 2 * SEC))
    );
    assert_eq!(g.peer_status()[0].status, PeerStatus::Ok);
}

#[test]
fn the_incarnation_never_changes_within_a_connection() {
    let mut g = node(0, T0);
    connect(&mut g, T0, 1, T0).unwrap();
    let refused = g.stats().refused_hello;
    g.handle(T0 + 2 * SEC, PeerId(1), hello(1, T0 + 2 * SEC));
    assert_eq!(g.stats().refused_hello, refused + 1);
    assert_eq!(g.peer_status()[0].actor, Some(slots()[1].actor(T0)));
    assert_eq!(g.peer_status()[0].status, PeerStatus::Ok);
}

/// Before: Hellos with rising incarnations grew the retired list without bound and rebuilt
/// the eventual peer set under the lock every request takes.
#[test]
fn a_flood_of_rising_incarnations_is_bounded() {
    let mut g = node(0, T0);
    let mut now = T0;
    let mut accepted = 0;
    for n in 0..10_000u64 {
        now += 10 * MS;
        if connect(&mut g, now, 1, T0 + n + 1).is_ok() {
            accepted += 1;
        }
    }
    // 100 s of flood: at most one new incarnation per second.
    let elapsed_s = (now - T0) / SEC;
    assert!(accepted <= elapsed_s + 1, "{accepted} in {elapsed_s} s");
    let p = g.peers[1].as_ref().unwrap();
    assert!(p.retired.len() <= MAX_RETIRED, "{}", p.retired.len());
    // N of the eventual rule: us, two peers, at most MAX_RETIRED retired incarnations.
    let n = g.inspect(LONG, "k", now).eventual.unwrap().n_actors;
    assert!(n as usize <= 3 + MAX_RETIRED, "{n}");
}

#[test]
fn repeated_hellos_are_answered_at_most_once_per_interval() {
    let mut g = node(0, T0);
    connect(&mut g, T0, 1, T0).unwrap();
    g.handle(T0, PeerId(1), Message::KeepAlive);
    while g.poll_transmit(T0).is_some() {}
    for k in 0..1_000 {
        g.handle(T0 + k, PeerId(1), hello(1, T0));
    }
    let mut answers = 0;
    while let Some((_, msg)) = g.poll_transmit(T0 + 1_000) {
        answers += usize::from(matches!(msg, Message::KeepAlive));
    }
    assert!(answers <= 1, "{answers} answers to 1,000 Hellos in 1 ms");
}

#[test]
fn a_newer_process_with_our_identity_makes_us_stand_down() {
    let mut g = node(0, T0);
    assert_eq!(g.on_own_identity(T0, T0), OwnIdentity::Ourselves);
    assert_eq!(g.on_own_identity(T0 - 5, T0), OwnIdentity::OlderProcess);
    assert_eq!(g.identity_conflict(), None);
    assert_eq!(
        g.on_own_identity(T0 + 10 * MAX_INCARNATION_SKEW_US, T0),
        OwnIdentity::Refused
    );
    assert_eq!(g.identity_conflict(), None);
    assert!(!g.strict().is_superseded());
    assert_eq!(
        g.on_own_identity(T0 + SEC, T0 + SEC),
        OwnIdentity::StoodDown
    );
    assert_eq!(g.identity_conflict(), Some(T0 + SEC));
    assert!(g.strict().is_superseded());
}
