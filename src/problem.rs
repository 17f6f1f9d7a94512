//! RFC 9457 `application/problem+json` responses.
//!
//! Every error tollgate produces itself (not the upstream's) is a [`Problem`], so a client can
//! always tell a gateway refusal from an upstream answer by the content type and the `type`
//! URI, which names the failure in a stable, machine-readable way.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};

/// Media type of RFC 9457 problem documents.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Prefix of every problem `type` URI; the suffix is a stable slug such as `no-route`.
pub const PROBLEM_TYPE_PREFIX: &str = "urn:tollgate:problem:";

/// An RFC 9457 problem document plus the HTTP details that travel with it.
#[derive(Debug, Clone)]
pub struct Problem {
    /// HTTP status of the response, repeated in the body's `status` member.
    pub status: StatusCode,
    /// Stable slug appended to [`PROBLEM_TYPE_PREFIX`] to form the `type` URI.
    pub slug: &'static str,
    /// Short human summary that does not change between occurrences.
    pub title: &'static str,
    /// Explanation specific to this occurrence.
    pub detail: Option<String>,
    /// Extension members (RFC 9457 section 3.2), e.g. field errors or violated policies.
    pub extensions: Map<String, Value>,
    /// Seconds for a `Retry-After` header, for refusals the client should retry later.
    pub retry_after_secs: Option<u64>,
}

impl Problem {
    pub fn new(status: StatusCode, slug: &'static str, title: &'static str) -> Self {
        Self {
            status,
            slug,
            title,
            detail: None,
            extensions: Map::new(),
            retry_after_secs: None,
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn extension(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extensions.insert(key.to_owned(), value.into());
        self
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }
}

/// The document's members in RFC 9457's order, then the extensions, written straight to the
/// output: a refusal is the response a flood gets, so building it costs no intermediate map
/// or copies of its strings.
impl Serialize for Problem {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut document = serializer.serialize_map(None)?;
        document.serialize_entry("type", &TypeUri(self.slug))?;
        document.serialize_entry("title", self.title)?;
        document.serialize_entry("status", &self.status.as_u16())?;
        if let Some(detail) = &self.detail {
            document.serialize_entry("detail", detail)?;
        }
        for (key, value) in &self.extensions {
            // A duplicate member would make the document ambiguous; the standard ones win.
            if !matches!(key.as_str(), "type" | "title" | "status" | "detail") {
                document.serialize_entry(key, value)?;
            }
        }
        document.end()
    }
}

/// A `type` URI, written without building the string first.
struct TypeUri(&'static str);

impl Serialize for TypeUri {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{PROBLEM_TYPE_PREFIX}{}", self.0))
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        // Serializing string keys and JSON values into memory cannot fail; the empty object
        // is only there so that no panic path exists.
        let body = serde_json::to_vec(&self).unwrap_or_else(|_| b"{}".to_vec());
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_carries_type_status_and_extensions() {
        let problem = Problem::new(StatusCode::NOT_FOUND, "no-route", "No route matches")
            .detail("nothing serves /x")
            .extension("path", "/x")
            .extension("status", 200);
        let text = serde_json::to_string(&problem).unwrap();
        assert_eq!(
            text,
            r#"{"type":"urn:tollgate:problem:no-route","title":"No route matches","status":404,"detail":"nothing serves /x","path":"/x"}"#,
            "standard members first, in RFC order; an extension cannot shadow one"
        );
    }

    #[test]
    fn response_has_problem_content_type_and_retry_after() {
        let response = Problem::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", "Overloaded")
            .retry_after(1)
            .into_response();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
