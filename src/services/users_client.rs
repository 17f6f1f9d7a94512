//! The bookings service's client for the users service: "does this user exist?".
//!
//! It forwards the request's correlation ID, and each lookup is a client span whose W3C trace
//! context (`traceparent`, `tracestate`) is injected into the request, so that the second hop
//! shows up under the same request in logs and in the same trace. Without trace export the
//! incoming trace context is passed on unchanged instead.
//! Every call has a deadline covering connect, request and response, because a booking
//! must fail fast with 503 rather than hang when the users service does.

use std::time::Duration;

use bytes::Bytes;
use http::header::ACCEPT;
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tracing::Instrument;

use crate::http::correlation::{RequestId, X_REQUEST_ID};
use crate::telemetry;

/// Default deadline of one lookup.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// W3C trace context headers, passed on as they came when this process does not record spans.
pub use crate::telemetry::{TRACEPARENT, TRACESTATE};

/// `server.port` of an `http://` base URL written without a port.
const DEFAULT_HTTP_PORT: u16 = 80;

/// Idle pooled connections are closed after this long, well before typical server-side
/// keep-alive limits, so a reused connection is rarely one the server is about to close.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Answer of the users service about one username.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserLookup {
    Exists,
    NotFound,
}

/// Why the users service could not answer.
#[derive(Debug, thiserror::Error)]
pub enum UsersClientError {
    /// The configured base URL is not an absolute `http://` URL.
    #[error("invalid users service URL {url:?}: {reason}")]
    InvalidBaseUrl { url: String, reason: &'static str },
    /// The lookup URI could not be built (the username is not path-safe).
    #[error("cannot build the lookup request: {0}")]
    Build(#[from] http::Error),
    /// Connection refused or reset, DNS failure, protocol error.
    #[error("users service unreachable: {0}")]
    Unreachable(#[from] hyper_util::client::legacy::Error),
    /// The response body broke off.
    #[error("users service response broke off: {0}")]
    Body(#[from] hyper::Error),
    /// No full answer within the deadline.
    #[error("users service did not answer within {0:?}")]
    Timeout(Duration),
    /// Anything but 200 or 404, e.g. a 5xx.
    #[error("users service answered {0}")]
    UnexpectedStatus(StatusCode),
}

impl UsersClientError {
    /// A short, stable name for the span's `error.type`.
    fn kind(&self) -> &'static str {
        match self {
            Self::InvalidBaseUrl { .. } | Self::Build(_) => "request_invalid",
            Self::Unreachable(_) => "unreachable",
            Self::Body(_) => "body_broken",
            Self::Timeout(_) => "timeout",
            Self::UnexpectedStatus(_) => "unexpected_status",
        }
    }
}

/// A pooled HTTP/1 client for the users service. Cheap to clone: clones share the pool.
#[derive(Debug, Clone)]
pub struct UsersClient {
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:7001`.
    base: String,
    /// The base URL's host and port, for the client span's `server.*` attributes.
    host: String,
    port: u16,
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
}

impl UsersClient {
    /// A client for the users service at `base_url` (`http://host:port`, optionally with a
    /// path prefix), with the [`DEFAULT_TIMEOUT`].
    ///
    /// Only plain http is supported: the services sit on a private network behind tollgate.
    pub fn new(base_url: &str) -> Result<Self, UsersClientError> {
        let invalid = |reason| UsersClientError::InvalidBaseUrl {
            url: base_url.to_owned(),
            reason,
        };
        let uri: Uri = base_url.parse().map_err(|_| invalid("not a URL"))?;
        if uri.scheme_str() != Some("http") {
            return Err(invalid("scheme must be http"));
        }
        let Some(authority) = uri.authority() else {
            return Err(invalid("host is missing"));
        };
        let host = authority.host().to_owned();
        let port = authority.port_u16().unwrap_or(DEFAULT_HTTP_PORT);
        if uri.query().is_some() {
            return Err(invalid("must not have a query"));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(DEFAULT_TIMEOUT));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);
        Ok(Self {
            base: base_url.trim_end_matches('/').to_owned(),
            host,
            port,
            client,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Replaces the deadline of each lookup.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The base URL lookups go to.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Asks `GET {base}/api/v1/users/{username}`.
    ///
    /// `username` must be path-safe (a valid username is). `request_id` is sent as
    /// `X-Request-ID`. The trace context sent is the lookup's client span's, a child of the
    /// current span; when spans are not recorded, `traceparent` and `tracestate` are copied
    /// from `incoming` instead.
    pub async fn lookup(
        &self,
        username: &str,
        request_id: Option<&RequestId>,
        incoming: &HeaderMap,
    ) -> Result<UserLookup, UsersClientError> {
        let mut request = Request::get(format!("{}/api/v1/users/{username}", self.base))
            .header(ACCEPT, HeaderValue::from_static("application/json"))
            .body(Empty::<Bytes>::new())?;
        let span = tracing::info_span!(
            "users.lookup",
            otel.name = "GET",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            http.request.method = "GET",
            server.address = self.host.as_str(),
            server.port = self.port,
            http.response.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        let headers = request.headers_mut();
        if let Some(id) = request_id {
            headers.insert(X_REQUEST_ID.clone(), id.header_value().clone());
        }
        if !telemetry::inject(&span, headers) {
            for name in [&TRACEPARENT, &TRACESTATE] {
                if let Some(value) = incoming.get(name) {
                    headers.insert(name.clone(), value.clone());
                }
            }
        }
        let result = self.exchange(request).instrument(span.clone()).await;
        match &result {
            Ok(status) => {
                span.record("http.response.status_code", status.as_u16());
                // 404 is an answer ("no such user"), not a failed call.
                if *status != StatusCode::OK && *status != StatusCode::NOT_FOUND {
                    span.record("otel.status_code", "ERROR");
                    span.record("error.type", status.as_str());
                }
            }
            Err(error) => {
                span.record("otel.status_code", "ERROR");
                span.record("error.type", error.kind());
            }
        }
        match result? {
            StatusCode::OK => Ok(UserLookup::Exists),
            StatusCode::NOT_FOUND => Ok(UserLookup::NotFound),
            other => Err(UsersClientError::UnexpectedStatus(other)),
        }
    }

    /// Sends `request` and reads the answer to its end, within the deadline.
    async fn exchange(
        &self,
        request: Request<Empty<Bytes>>,
    ) -> Result<StatusCode, UsersClientError> {
        let exchange = async {
            let response = self.client.request(request).await?;
            let status = response.status();
            // Reading the body to its end lets the connection go back to the pool.
            response.into_body().collect().await?;
            Ok::<_, UsersClientError>(status)
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| UsersClientError::Timeout(self.timeout))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_http_urls_only() {
        assert!(UsersClient::new("http://127.0.0.1:7001").is_ok());
        assert_eq!(
            UsersClient::new("http://users.internal/prefix/")
                .unwrap()
                .base_url(),
            "http://users.internal/prefix"
        );
        for bad in ["https://x", "127.0.0.1:7001", "not a url", "http://x/?q=1"] {
            assert!(UsersClient::new(bad).is_err(), "{bad}");
        }
    }
}
