//! Gossip between regions: frames ([`codec`]), mutual-TLS QUIC transport ([`quic`], [`tls`]),
//! and (in progress for the global-limits milestone) the pure protocol state machine.

pub mod codec;
pub mod quic;
pub mod tls;
