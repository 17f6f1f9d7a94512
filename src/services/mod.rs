//! The airline's two demo upstream services, which tollgate sits in front of.
//!
//! * [`users`]: the airline's employees. Someone must be onboarded here before they may book.
//! * [`bookings`]: flights booked by a user for one or more passengers. It calls the users
//!   service for every new booking, so a request through the gateway fans out into a second
//!   upstream hop that carries the same correlation ID and trace context.
//!
//! Both keep their data in memory by default, which is enough for a single instance. Given a
//! Redis URL they keep it in Redis instead, so several instances (for example one per region)
//! serve the same data and the gateway can balance or fail over between them freely.
//!
//! Both speak JSON in camelCase, report every error as RFC 9457 problem+json (see
//! [`crate::problem`]), expose `GET /health`, and echo `X-Request-ID` on every response.
//! Every request is a server span carrying its `correlation_id` and continuing the caller's
//! W3C trace context (see [`crate::telemetry`]).

use std::net::SocketAddr;

pub mod bookings;
mod kv;
pub mod users;
pub mod users_client;
mod web;

pub use kv::StoreError;

/// Why a service could not start or stopped serving.
///
/// Request-time failures never end up here: they become problem responses.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The listen address is taken or not ours to bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The accept loop failed for good.
    #[error("serving failed: {0}")]
    Serve(#[source] std::io::Error),
    /// The configured Redis could not be reached or its URL is invalid.
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    /// The configured users service URL is unusable.
    #[error("users service client: {0}")]
    UsersClient(#[from] users_client::UsersClientError),
}

/// Command-line options of the users service.
#[derive(Debug, Clone, clap::Args)]
pub struct UsersArgs {
    /// Address the users service listens on.
    #[arg(long, default_value = "127.0.0.1:7001")]
    pub listen: SocketAddr,
    /// Redis URL (e.g. redis://127.0.0.1:6379) to keep users in, so several instances share
    /// them; without it users live in this process's memory and vanish when it exits.
    #[arg(long, env = "TOLLGATE_REDIS_URL")]
    pub redis: Option<String>,
}

/// Command-line options of the bookings service.
#[derive(Debug, Clone, clap::Args)]
pub struct BookingsArgs {
    /// Address the bookings service listens on.
    #[arg(long, default_value = "127.0.0.1:7101")]
    pub listen: SocketAddr,
    /// Redis URL (e.g. redis://127.0.0.1:6379) to keep bookings in, so several instances share
    /// them; without it bookings live in this process's memory and vanish when it exits.
    #[arg(long, env = "TOLLGATE_REDIS_URL")]
    pub redis: Option<String>,
    /// Base URL (http only) of the users service, asked whether a booking's user exists.
    #[arg(
        long,
        default_value = "http://127.0.0.1:7001",
        env = "TOLLGATE_USERS_URL"
    )]
    pub users_url: String,
}

/// Binds `addr` and serves `router` until `shutdown` resolves, then drains open requests.
async fn serve(
    name: &'static str,
    addr: SocketAddr,
    backend: &'static str,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServiceError::Bind { addr, source })?;
    // The bound address differs from `addr` when port 0 was asked for; log the real one.
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(service = name, addr = %local, storage = backend, "listening");
    // Connect info gives the server span its `client.address`.
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .map_err(ServiceError::Serve)?;
    tracing::info!(service = name, "stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        bookings: BookingsArgs,
    }

    #[test]
    fn bookings_args_parse_flags() {
        let cli = Cli::try_parse_from([
            "t",
            "--listen",
            "0.0.0.0:9000",
            "--redis",
            "redis://r:6379/",
            "--users-url",
            "http://users:7001",
        ])
        .unwrap();
        assert_eq!(cli.bookings.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(cli.bookings.redis.as_deref(), Some("redis://r:6379/"));
        assert_eq!(cli.bookings.users_url, "http://users:7001");
    }

    #[test]
    fn args_document_every_flag() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        for flag in ["--listen", "--redis", "--users-url", "TOLLGATE_REDIS_URL"] {
            assert!(help.contains(flag), "{flag} missing from:\n{help}");
        }
    }
}
