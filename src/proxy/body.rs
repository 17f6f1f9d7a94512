//! Body wrappers for streaming through the proxy without buffering.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::client::Lease;

/// The request body sent upstream: the client's body, cut off with an error once it exceeds
/// `max_request_body`. Content-Length is checked before forwarding; this catches chunked
/// bodies, which announce no length. The flag tells the proxy the failure was ours (413), not
/// the upstream's (502).
#[derive(Debug)]
pub struct LimitedBody {
    inner: axum::body::Body,
    remaining: u64,
    exceeded: Arc<AtomicBool>,
}

/// Error of a [`LimitedBody`].
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error("request body exceeds the configured maximum")]
    TooLarge,
    #[error("reading the client's request body: {0}")]
    Client(#[from] axum::Error),
}

impl LimitedBody {
    pub fn new(inner: axum::body::Body, limit: u64, exceeded: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            remaining: limit,
            exceeded,
        }
    }

    pub fn empty() -> Self {
        Self::new(axum::body::Body::empty(), 0, Arc::default())
    }
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > self.remaining {
                        self.exceeded.store(true, Ordering::Release);
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge)));
                    }
                    self.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps resources (the concurrency slot, the in-flight count) until the
/// client has received the last byte or gone away, so a long streamed response still counts
/// against the limits. When the upstream's body has ended, its connection goes back to the
/// instance's idle connections; a body cut short takes its connection with it.
pub struct GuardedBody<B, G> {
    inner: B,
    lease: Option<Lease>,
    _guard: G,
}

impl<B: Body, G> GuardedBody<B, G> {
    pub fn new(inner: B, lease: Lease, guard: G) -> Self {
        let mut body = Self {
            inner,
            lease: Some(lease),
            _guard: guard,
        };
        // A response without a body (HEAD, 204, 304) may never be polled: its exchange has
        // ended already.
        body.release_if_ended();
        body
    }

    fn release_if_ended(&mut self) {
        if self.inner.is_end_stream()
            && let Some(lease) = self.lease.take()
        {
            lease.release();
        }
    }
}

impl<B: Body + Unpin, G: Unpin> Body for GuardedBody<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            // The server may stop polling once `is_end_stream` says so: give the connection
            // back as soon as the last frame is out.
            Poll::Ready(Some(Ok(_))) => self.release_if_ended(),
            Poll::Ready(None) => {
                if let Some(lease) = self.lease.take() {
                    lease.release();
                }
            }
            // A failed body leaves the connection in an unknown state: the lease drops it.
            Poll::Ready(Some(Err(_))) => self.lease = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn passes_bodies_up_to_the_limit() {
        let flag = Arc::new(AtomicBool::new(false));
        let body = LimitedBody::new(axum::body::Body::from("12345"), 5, flag.clone());
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes, "12345");
        assert!(!flag.load(Ordering::Acquire));
    }

    #[tokio::test]
    async fn fails_and_flags_past_the_limit() {
        let flag = Arc::new(AtomicBool::new(false));
        let body = LimitedBody::new(axum::body::Body::from("123456"), 5, flag.clone());
        assert!(matches!(
            body.collect().await,
            Err(RequestBodyError::TooLarge)
        ));
        assert!(flag.load(Ordering::Acquire));
    }
}
