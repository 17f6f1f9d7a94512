//! Gossip between regions: frames ([`codec`]), mutual-TLS QUIC transport ([`quic`], [`tls`]),
//! and the pure protocol state machine ([`proto`]) that the QUIC driver will run.

pub mod codec;
pub mod proto;
pub mod quic;
pub mod tls;
