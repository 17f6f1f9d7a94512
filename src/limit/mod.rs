//! PURE rate-limit logic: token-bucket math, rates, policies, client identity, the store
//! breaker, decisions and response headers, known-empty buckets, leases, in-process buckets,
//! and the limiter machine ([`machine`]) that runs a request through all of them. No IO and
//! no clock: everything that needs time takes `now_us`. The IO around it (stores, the HTTP
//! layer) lives in `store` and `http::ratelimit`.

// The pure core is read as a library: every public item says what it is for.
#![warn(missing_docs)]

pub mod breaker;
pub mod bucket;
pub mod decision;
pub mod empty;
pub mod identity;
pub mod lease;
pub mod local;
pub mod machine;
pub mod policy;
pub mod rate;
