//! Correlation IDs: one per request, chosen at the edge and carried everywhere.
//!
//! A client may bring its own `X-Request-ID` so that it can find its request in our logs, but
//! the value ends up in log lines, spans and upstream headers, so only a short, inert alphabet
//! is trusted; anything else is replaced by a fresh UUIDv7 (time-ordered, so IDs sort by
//! arrival in log search).

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use http::{HeaderMap, HeaderName, HeaderValue};
use tracing::Instrument;

/// The header that carries the correlation ID in both directions.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client-supplied ID we keep.
pub const MAX_LEN: usize = 128;

/// A validated correlation ID, stored in request extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// The client's ID if it is acceptable, else a new one.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        headers
            .get(&X_REQUEST_ID)
            .filter(|value| is_acceptable(value.as_bytes()))
            .map(|value| Self(value.clone()))
            .unwrap_or_else(Self::generate)
    }

    pub fn generate() -> Self {
        let id = uuid::Uuid::now_v7().hyphenated().to_string();
        // A hyphenated UUID is ASCII hex and '-', always a valid header value.
        Self(HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid")))
    }

    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        // Only IDs made of [A-Za-z0-9._-] are ever constructed, so this is valid UTF-8.
        self.0.to_str().unwrap_or_default()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// At most [`MAX_LEN`] characters of `[A-Za-z0-9._-]`, and not empty.
pub fn is_acceptable(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Middleware: settles the request's ID, forwards it (the request header is overwritten, so
/// whatever reaches the handler or upstream is the validated value), opens the request span
/// that puts `correlation_id` on every log line, and echoes the ID on the response, errors
/// included.
pub async fn correlate(mut request: Request, next: Next) -> Response {
    let id = RequestId::from_headers(request.headers());
    request
        .headers_mut()
        .insert(X_REQUEST_ID.clone(), id.header_value().clone());
    request.extensions_mut().insert(id.clone());
    let span = tracing::info_span!(
        "request",
        correlation_id = %id,
        method = %request.method(),
        path = %request.uri().path(),
    );
    let mut response = next.run(request).instrument(span).await;
    response
        .headers_mut()
        .insert(X_REQUEST_ID.clone(), id.header_value().clone());
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keeps_valid_ids() {
        let mut headers = HeaderMap::new();
        headers.insert(
            X_REQUEST_ID.clone(),
            HeaderValue::from_static("abc.DEF_123-x"),
        );
        assert_eq!(RequestId::from_headers(&headers).as_str(), "abc.DEF_123-x");
    }

    #[test]
    fn replaces_invalid_ids() {
        for bad in ["", "has space", "semi;colon", &"a".repeat(129)] {
            let mut headers = HeaderMap::new();
            headers.insert(X_REQUEST_ID.clone(), HeaderValue::from_str(bad).unwrap());
            let id = RequestId::from_headers(&headers);
            assert_ne!(id.as_str(), bad);
            assert!(uuid::Uuid::parse_str(id.as_str()).is_ok());
        }
    }

    #[test]
    fn accepts_exactly_128_chars() {
        assert!(is_acceptable("a".repeat(128).as_bytes()));
        assert!(!is_acceptable("a".repeat(129).as_bytes()));
    }

    proptest! {
        #[test]
        fn generated_or_kept_ids_are_always_acceptable(raw in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut headers = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_bytes(&raw) {
                headers.insert(X_REQUEST_ID.clone(), value);
            }
            let id = RequestId::from_headers(&headers);
            prop_assert!(is_acceptable(id.header_value().as_bytes()));
        }
    }
}
