//! Gossip between regions: frames ([`codec`]), and (in progress for the global-limits
//! milestone) the pure protocol state machine and its QUIC driver.

pub mod codec;
