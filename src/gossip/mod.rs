//! Gossip between regions: frames ([`codec`]), the mutual-TLS QUIC transport ([`quic`],
//! [`tls`]), the pure protocol state machine ([`proto`]) and the thin driver that runs it over
//! QUIC ([`driver`]).

pub mod codec;
pub mod driver;
pub mod log_limit;
pub mod proto;
pub mod quic;
pub mod tls;
