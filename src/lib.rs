//! tollgate: a multi-region API gateway with rate limiting.
//!
//! Each regional gateway routes requests to upstream services with streaming bodies, load
//! balancing, health checks and concurrency limits; gives every request a correlation ID; and
//! answers its own failures as RFC 9457 problem documents.
//!
//! # Layout
//!
//! - [`config`]: region file → parse → validate (every error at once, with file and key).
//! - [`proxy`]: routing, instance pools and health, kept-alive upstream connections
//!   ([`proxy::client`]), concurrency limits, forwarding.
//! - [`http`]: the gateway's tower layer stack and its accept loop ([`http::stack`], in one
//!   file), what the first layer learns once per request ([`http::context`]: snapshot,
//!   route, peer), the rate-limit layer ([`http::ratelimit`], the shell around
//!   [`limit::machine`]) and its refusals, the admin API, and correlation IDs shared with
//!   the services.
//! - [`problem`]: RFC 9457 problem documents, for every answer tollgate gives itself.
//! - [`running`]: the configuration in force and the proxy built from it, one snapshot a
//!   reload swaps whole.
//! - [`gateway`]: a regional gateway process: assembles the parts (each layer and the
//!   admin API get only what they use), listeners, reload and graceful shutdown.
//! - [`clock`]: the one process clock (`u64` µs) every pure core is given `now` from.
//! - [`services`]: the airline's upstream services, users and bookings.
//! - [`demo`]: `tollgate demo`, three regions and the services on one machine.
//! - [`telemetry`](crate::telemetry): logs, OTLP trace export, W3C trace context.
//! - [`metrics`](crate::metrics): the Prometheus recorder and the metric catalogue.
//! - [`shutdown`]: the process's SIGINT/SIGTERM future.
//! - [`certs`]: `tollgate certs`, the deployment CA and one certificate per gateway for gossip.
//! - [`probe`]: `tollgate probe URL`, a GET for container health checks (the image has no curl).
//! - [`limit`] (pure): GCRA buckets, policies and their keys, caller identity, the store
//!   breaker, verdicts and RateLimit headers, known-empty buckets, hot keys' leases,
//!   in-process buckets, and the limiter machine ([`limit::machine`]) that runs one request
//!   through them (`begin` / `settle` / `abandon`).
//! - [`store`]: where regional buckets live: Redis (one Lua script per hash tag, Cluster
//!   aware) or memory.
//! - [`crdt`] (pure): sliding-window usage counters (PN-counter semantics) and the strict
//!   bounded counter, with the eventual admission rule.
//! - [`gossip`]: the pure gossip state machine ([`gossip::proto`]), its frame codec, and the
//!   QUIC transport with mutual TLS and the thin driver that runs the machine over it.
//!   - `gossip/proto.rs` (pure): the machine's state; its children `message` (wire
//!     vocabulary), `config`, `peer` (per-peer state, the connection's as a value),
//!     `links` (connection lifecycle), `hello` (handshake), `identity` (a second process
//!     with our identity), `input`, `sync` (deltas, full states, anti-entropy), `admit`
//!     (the limiter-facing API: a request's global policies all or nothing), `timers` (output and periodic work), `retire` (graceful
//!     shutdown), `report` (stats, inspection) and `rng`.
//!   - `gossip/driver.rs`: the driver loop; its children `handle` (the request path's
//!     side), `link` (one connection, owned by the connection table), `accept` (accepted
//!     connections and their `Hello`) and `identity` (the self-probe).
//! - [`global`]: global policies → gossip policy ids and config digest; one request's global
//!   decision ([`global::admission`]); starting and retiring a gateway's gossip.
//!
//! `cargo test --test layering -- --nocapture` checks and prints the module graph: no cycle
//! between top-level modules, and no edge from the pure core (`limit`, `crdt`,
//! `gossip::proto`, `gossip::codec`) to a shell.

pub mod certs;
pub mod clock;
pub mod config;
pub mod crdt;
pub mod demo;
pub mod gateway;
pub mod global;
pub mod gossip;
pub mod http;
pub mod limit;
pub mod metrics;
pub mod probe;
pub mod problem;
pub mod proxy;
pub mod running;
pub mod services;
pub mod shutdown;
pub mod store;
pub mod telemetry;
