//! HTTP plumbing: the gateway's layer stack and admin API, and what the gateway and the demo
//! services share (correlation IDs, problem responses).

pub mod admin;
pub mod context;
pub mod correlation;
pub mod ratelimit;
pub mod refusal;
pub mod stack;
pub mod workers;
