//! The self-probe: finding a second process with our own identity by dialling our own
//! configured address, and answering such probes (see the driver's "A second process with
//! our identity").
//!
//! Separate because it is the only traffic on our own certificate, and the only input that
//! makes a gateway stand down.

use quinn::{Connection, SendStream};
use tokio::sync::mpsc;

use super::{
    ACCEPT_STREAM_TIMEOUT, CLOSE_PROBE_DONE, Driver, Event, IDENTITY_CONFLICT, handle::Shared,
    resolve,
};
use crate::clock::now_us;
use crate::gossip::codec;
use crate::gossip::proto::{Message, OwnIdentity, PeerId};
use crate::gossip::quic;

impl Driver {
    /// Dials our own configured address (see the module docs): whoever answers with our
    /// certificate tells us its incarnation.
    pub(super) fn probe_own_identity(&mut self, events: &mpsc::Sender<Event>) {
        let Some(address) = self.own_address.clone() else {
            return;
        };
        let endpoint = self.endpoint.clone();
        let events = events.clone();
        let hello = {
            let g = self.shared.lock();
            Message::Hello {
                actor: g.actor().clone(),
                config_digest: g.config_digest(),
            }
        };
        self.tasks.spawn(async move {
            let probe = async {
                let addr = resolve(PeerId(u16::MAX), &address.addr).await.ok()?;
                let connection = endpoint.connect(addr, &address.gateway()).await.ok()?;
                let (mut send, mut recv) = quic::open_stream(&connection, endpoint.max_frame())
                    .await
                    .ok()?;
                let frame = codec::encode(&hello, endpoint.max_frame()).ok()?;
                quic::send_frame(&mut send, &frame).await.ok()?;
                let answer = recv.recv::<Message>().await.ok().flatten();
                connection.close(CLOSE_PROBE_DONE, b"probe done");
                match answer? {
                    Message::Hello { actor, .. } if actor.slot() == address.gateway() => {
                        Some(actor.incarnation)
                    }
                    _ => None,
                }
            };
            if let Ok(Some(incarnation)) = tokio::time::timeout(ACCEPT_STREAM_TIMEOUT, probe).await
            {
                // Fails only when the driver has stopped.
                let _ = events.send(Event::OwnIdentity { incarnation }).await;
            }
        });
    }

    /// A process holding our certificate told us its incarnation.
    pub(super) fn on_own_identity(&mut self, incarnation: u64) {
        let outcome = self.shared.lock().on_own_identity(incarnation, now_us());
        match outcome {
            OwnIdentity::Ourselves | OwnIdentity::Refused => {}
            OwnIdentity::OlderProcess => tracing::error!(
                other_incarnation = incarnation,
                "another, older process runs with this gateway's identity (certificate and \
                 instance); it stops serving global policies when it learns of this one"
            ),
            OwnIdentity::StoodDown => {
                metrics::gauge!(IDENTITY_CONFLICT).set(1.0);
                tracing::error!(
                    newer_incarnation = incarnation,
                    "a newer process runs with this gateway's identity (certificate and \
                     instance): this one stops serving global policies; stop one of them"
                );
            }
        }
    }
}

/// Answers a connection that presented our own certificate with our `Hello`, reports the
/// incarnation it announced, and closes it.
pub(super) async fn answer_own_probe(
    connection: &Connection,
    mut send: SendStream,
    hello: &Message,
    shared: &Shared,
    max_frame: usize,
    events: &mpsc::Sender<Event>,
) {
    let Message::Hello { actor, .. } = hello else {
        return;
    };
    let ours = {
        let g = shared.lock();
        Message::Hello {
            actor: g.actor().clone(),
            config_digest: g.config_digest(),
        }
    };
    if let Ok(frame) = codec::encode(&ours, max_frame)
        && quic::send_frame(&mut send, &frame).await.is_ok()
        && send.finish().is_ok()
    {
        // Bounded by the caller's timeout: the prober closes once it has our Hello.
        let _ = tokio::time::timeout(ACCEPT_STREAM_TIMEOUT, send.stopped()).await;
    }
    connection.close(CLOSE_PROBE_DONE, b"probe done");
    // Fails only when the driver has stopped.
    let _ = events
        .send(Event::OwnIdentity {
            incarnation: actor.incarnation,
        })
        .await;
}
