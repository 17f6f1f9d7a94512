//! `tollgate probe URL`: one GET, exit 0 on a 2xx answer. The image has no curl, and a
//! container health check needs a command: `tollgate probe http://127.0.0.1:9090/health`.

use std::time::Duration;

use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Arguments of `tollgate probe`.
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// The URL to GET (http:// only: the probed ports are local).
    pub url: String,
    /// How long the whole request may take.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("bad URL {url:?}: {error}")]
    Url {
        url: String,
        error: http::uri::InvalidUri,
    },
    #[error("only http:// URLs can be probed, not {0:?}")]
    Scheme(String),
    #[error("GET {url}: {cause}")]
    Request { url: String, cause: String },
    #[error("GET {url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("GET {url}: {status}")]
    Status {
        url: String,
        status: http::StatusCode,
    },
}

/// GETs the URL; `Ok` with the status on a 2xx answer.
pub async fn run(args: &ProbeArgs) -> Result<http::StatusCode, ProbeError> {
    let uri: http::Uri = args.url.parse().map_err(|error| ProbeError::Url {
        url: args.url.clone(),
        error,
    })?;
    if uri.scheme_str() != Some("http") {
        return Err(ProbeError::Scheme(args.url.clone()));
    }
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let response = tokio::time::timeout(args.timeout, client.get(uri))
        .await
        .map_err(|_| ProbeError::Timeout {
            url: args.url.clone(),
            timeout: args.timeout,
        })?
        .map_err(|error| ProbeError::Request {
            url: args.url.clone(),
            cause: with_causes(&error),
        })?;
    let status = response.status();
    if status.is_success() {
        Ok(status)
    } else {
        Err(ProbeError::Status {
            url: args.url.clone(),
            status,
        })
    }
}

/// hyper's client error says only "client error (Connect)" and keeps the reason (refused,
/// no route, ...) in its sources: a probe's one line must carry it.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        text.push_str(": ");
        text.push_str(&error.to_string());
        cause = error.source();
    }
    text
}
