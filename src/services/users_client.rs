//! The bookings service's client for the users service: "does this user exist?".
//!
//! It forwards the request's correlation ID and W3C trace context (`traceparent`,
//! `tracestate`) so that the second hop shows up under the same request in logs and traces.
//! Every call has a deadline covering connect, request and response, because a booking
//! must fail fast with 503 rather than hang when the users service does.

use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, HeaderName};
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::http::correlation::{RequestId, X_REQUEST_ID};

/// Default deadline of one lookup.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// W3C trace context headers, forwarded untouched.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

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

/// A pooled HTTP/1 client for the users service. Cheap to clone: clones share the pool.
#[derive(Debug, Clone)]
pub struct UsersClient {
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:7001`.
    base: String,
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
        if uri.authority().is_none() {
            return Err(invalid("host is missing"));
        }
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
    /// `X-Request-ID`; `traceparent` and `tracestate` are copied from `incoming`.
    pub async fn lookup(
        &self,
        username: &str,
        request_id: Option<&RequestId>,
        incoming: &HeaderMap,
    ) -> Result<UserLookup, UsersClientError> {
        let mut request = Request::get(format!("{}/api/v1/users/{username}", self.base))
            .header(ACCEPT, HeaderValue::from_static("application/json"))
            .body(Empty::new())?;
        let headers = request.headers_mut();
        if let Some(id) = request_id {
            headers.insert(X_REQUEST_ID.clone(), id.header_value().clone());
        }
        for name in [&TRACEPARENT, &TRACESTATE] {
            if let Some(value) = incoming.get(name) {
                headers.insert(name.clone(), value.clone());
            }
        }
        let exchange = async {
            let response = self.client.request(request).await?;
            let status = response.status();
            // Reading the body to its end lets the connection go back to the pool.
            response.into_body().collect().await?;
            Ok::<_, UsersClientError>(status)
        };
        let status = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| UsersClientError::Timeout(self.timeout))??;
        match status {
            StatusCode::OK => Ok(UserLookup::Exists),
            StatusCode::NOT_FOUND => Ok(UserLookup::NotFound),
            other => Err(UsersClientError::UnexpectedStatus(other)),
        }
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
